//! `drbdd`, the daemon that hosts the resources of this node.
//!
//! It listens on the control socket `STATE_DIR/drbdd.sock` ([`control`]) for `drbdadm`'s
//! requests and hands them to the running resources ([`host`]), which come from a
//! [`ReplicaFactory`]: the daemon itself knows nothing about replication.
//!
//! Start-up: the configuration is read and checked; the state directory is created if
//! missing; if a daemon answers on the socket (or holds `STATE_DIR/drbdd.lock`) this one
//! refuses to start, else a socket file left behind is removed and the socket is bound
//! (mode 0600). [`run_daemon`] then serves until SIGTERM or SIGINT, shuts every running
//! resource down and removes the socket.

pub mod control;
pub mod format;
pub mod host;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use control::{Request, Response, E_PROTOCOL};
pub use host::{BoxFuture, Host, Replica, ReplicaFactory, UnavailableFactory};

/// The state directory when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/run/drbd-rs";
/// File name of the lock that makes one daemon per state directory.
pub const LOCK_NAME: &str = "drbdd.lock";
/// Control connections served at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 128;

/// How the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonOptions {
    /// The configuration file (re-read on every `up`).
    pub config: PathBuf,
    /// This node's name (host sections are matched against it).
    pub node: String,
    /// Where the control socket and the resources' state live.
    pub state_dir: PathBuf,
    /// Also serve every resource's NBD export on this TCP address (export name = resource).
    pub nbd_tcp: Option<std::net::SocketAddr>,
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration cannot be read or is invalid.
    #[error("{message}")]
    Config { exit_code: i32, message: String },
    #[error("cannot create the state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another drbdd is already running: {reason}")]
    AlreadyRunning { reason: String },
    #[error("{} exists and is not a socket; refusing to remove it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot remove the stale control socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signal(std::io::Error),
}

impl DaemonError {
    /// The exit code of `drbdd` for this error: 10 for an invalid configuration (as drbdadm),
    /// 20 for everything the system refused.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config { exit_code, .. } => *exit_code,
            _ => 20,
        }
    }
}

/// A running daemon: its socket is bound and served until [`Daemon::shutdown`].
pub struct Daemon {
    host: Arc<Host>,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    /// Held (locked) for the daemon's lifetime.
    _lock: std::fs::File,
}

impl Daemon {
    /// Checks the configuration, takes the state directory and starts serving the socket.
    /// Must be called within a tokio runtime.
    pub async fn start(
        opts: DaemonOptions,
        factory: Arc<dyn ReplicaFactory>,
    ) -> Result<Daemon, DaemonError> {
        let cfg = host::load_config(&opts.config, &opts.node).map_err(|p| DaemonError::Config {
            exit_code: p.exit_code,
            message: p.message,
        })?;
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let mine: Vec<&str> = cfg
            .resources
            .iter()
            .filter(|r| !r.ignored() && !r.stacked())
            .map(|r| r.name.as_str())
            .collect();
        tracing::info!(
            node = %opts.node,
            config = %opts.config.display(),
            "resources of this node: {}",
            if mine.is_empty() { "(none)".to_string() } else { mine.join(" ") }
        );
        std::fs::create_dir_all(&opts.state_dir).map_err(|source| DaemonError::StateDir {
            path: opts.state_dir.clone(),
            source,
        })?;
        let socket = control::socket_path(&opts.state_dir);
        // A daemon that answers is running, whatever the lock says.
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(DaemonError::AlreadyRunning {
                reason: format!("it is listening on {}", socket.display()),
            });
        }
        let lock = take_lock(&opts.state_dir)?;
        remove_stale_socket(&socket)?;
        let listener = UnixListener::bind(&socket).map_err(|source| DaemonError::Bind {
            path: socket.clone(),
            source,
        })?;
        // Only root may steer the resources.
        if let Err(e) = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("cannot restrict {} to mode 0600: {e}", socket.display());
        }
        let host = Arc::new(Host::new(
            opts.config.clone(),
            opts.node.clone(),
            opts.state_dir.clone(),
            factory,
        ));
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&host), stopped));
        tracing::info!("listening on {}", socket.display());
        Ok(Daemon {
            host,
            socket,
            stop,
            accept,
            _lock: lock,
        })
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The dispatcher (for tests and embedding).
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Stops accepting requests, shuts every running resource down and removes the socket.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.stop.send(true);
        // The accept loop ends its client tasks when it stops.
        if let Err(e) = self.accept.await {
            tracing::warn!("control loop ended abnormally: {e}");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.socket.display());
            }
        }
        self.host.shutdown_all().await;
        tracing::info!("stopped");
    }
}

/// Takes `STATE_DIR/drbdd.lock` (flock, non-blocking): one daemon per state directory, even
/// when two start at the same moment.
fn take_lock(state_dir: &Path) -> Result<std::fs::File, DaemonError> {
    let path = state_dir.join(LOCK_NAME);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::StateDir {
            path: path.clone(),
            source,
        })?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(DaemonError::AlreadyRunning {
            reason: format!("{} is locked", path.display()),
        }),
        Err(e) => Err(DaemonError::StateDir {
            path,
            source: e.into(),
        }),
    }
}

/// Removes a socket file nobody listens on; refuses to remove anything else.
fn remove_stale_socket(socket: &Path) -> Result<(), DaemonError> {
    match std::fs::symlink_metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DaemonError::RemoveStale {
            path: socket.to_path_buf(),
            source,
        }),
        Ok(m) if !m.file_type().is_socket() => Err(DaemonError::NotASocket(socket.to_path_buf())),
        Ok(_) => {
            tracing::info!("removing stale control socket {}", socket.display());
            std::fs::remove_file(socket).map_err(|source| DaemonError::RemoveStale {
                path: socket.to_path_buf(),
                source,
            })
        }
    }
}

async fn accept_loop(listener: UnixListener, host: Arc<Host>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut clients = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            // Reap finished client tasks so the set stays as small as the live clients.
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept on the control socket failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => {
                let host = Arc::clone(&host);
                clients.spawn(async move {
                    control::serve_connection(stream, |req| handle_detached(&host, req)).await;
                    drop(permit);
                });
            }
            Err(_) => {
                clients.spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut stream = stream;
                    let resp = Response::error(
                        E_PROTOCOL,
                        format!("drbdd: too many control connections ({MAX_CLIENTS}); try again"),
                    );
                    let mut line = serde_json::to_vec(&resp).unwrap_or_default();
                    line.push(b'\n');
                    let _ = stream.write_all(&line).await;
                });
            }
        }
    }
    clients.shutdown().await;
}

/// Handles a request on a task of its own: a request in progress (an `up`, say) is finished
/// even when its client goes away or the daemon stops serving, and a panic in a replica costs
/// that request an error response, not the daemon.
fn handle_detached(host: &Arc<Host>, req: Request) -> impl std::future::Future<Output = Response> {
    let host = Arc::clone(host);
    let command = req.command;
    let task = tokio::spawn(async move { host.handle(req).await });
    async move {
        match task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%command, "request handler failed: {e}");
                Response::error(
                    E_PROTOCOL,
                    format!("drbdd: internal error while handling '{command}'"),
                )
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts it down cleanly.
pub async fn run_daemon(
    opts: DaemonOptions,
    factory: Arc<dyn ReplicaFactory>,
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before the socket exists, so that a signal sent as soon as the socket appears
    // is not lost to the default action.
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?;
    let daemon = Daemon::start(opts, factory).await?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{which} received");
    daemon.shutdown().await;
    Ok(())
}

/// The `drbdd` command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "drbdd",
    version,
    about = "The drbd-rs daemon: hosts this node's DRBD resources and serves drbdadm's requests",
    after_help = "The node name is, in this order: --node, $DRBD_NODE, $__DRBD_NODE__, the host name.\n\
                  drbdd runs in the foreground and logs to stderr (RUST_LOG sets the level, default info);\n\
                  SIGTERM or SIGINT shut every running resource down and remove the control socket."
)]
pub struct DaemonArgs {
    /// Configuration file [default: the first of /etc/drbd-84.conf, /etc/drbd-83.conf,
    /// /etc/drbd-82.conf, /etc/drbd-08.conf, /etc/drbd.conf that exists]
    #[arg(short = 'c', long = "config-file", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Act as node NAME [default: the host name]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// State directory; the control socket is DIR/drbdd.sock
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Also serve the NBD exports on TCP at ADDR:PORT (export name = resource name); the
    /// Unix socket DIR/RES.nbd is always served
    #[arg(long, value_name = "ADDR:PORT")]
    pub nbd_tcp: Option<std::net::SocketAddr>,
}

impl DaemonArgs {
    /// The options the daemon runs with; the error is a message for the user.
    pub fn options(self) -> Result<DaemonOptions, String> {
        let config = match self.config {
            Some(c) => c,
            None => crate::adm::DEFAULT_CONFIGS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    format!(
                        "no configuration file: none of {} exists; use -c FILE",
                        crate::adm::DEFAULT_CONFIGS.join(", ")
                    )
                })?,
        };
        Ok(DaemonOptions {
            config,
            node: crate::adm::resolve_node_name(self.node.as_deref()),
            state_dir: self.state_dir,
            nbd_tcp: self.nbd_tcp,
        })
    }
}

/// Entry point of the `drbdd` binary with the given factory; returns the exit code.
pub fn main_with_factory(factory: Arc<dyn ReplicaFactory>) -> i32 {
    main_with(move |_| factory)
}

/// Entry point of the `drbdd` binary with a factory made from the daemon's options; returns
/// the exit code.
pub fn main_with(make: impl FnOnce(&DaemonOptions) -> Arc<dyn ReplicaFactory>) -> i32 {
    use clap::Parser;
    let args = match DaemonArgs::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    init_logging();
    let opts = match args.options() {
        Ok(o) => o,
        Err(m) => {
            tracing::error!("{m}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("drbdd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return 20;
        }
    };
    let factory = make(&opts);
    match runtime.block_on(run_daemon(opts, factory)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            e.exit_code()
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
