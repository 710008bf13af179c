//! The tokio side: listeners, connections, and the request pipeline.
//!
//! One task per listener accepts clients; one task per connection runs the handshake and
//! then reads requests, spawning one task per request so that backend operations run in
//! parallel; one writer task per connection sends the replies in completion order. The
//! number of requests and payload bytes in flight per connection is bounded, and the
//! reader stops reading while the bound is reached, which pushes back on the client.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout_at, Instant};
use tracing::{debug, info, warn, Instrument};

use super::device::{BlockDevice, BlockError};
use super::proto::{
    encode_simple_reply, export_flags, Command, Decoded, ErrorCode, ExportCatalog, ExportInfo,
    ExportListing, HandshakeError, Negotiated, Progress, ProtocolError, Request, RequestDecoder,
    ServerHandshake, MAX_PAYLOAD, MAX_STRING_LEN, SIMPLE_REPLY_LEN,
};

/// Requests one connection may have in flight. qemu keeps at most 16, nbdcopy 64 per
/// connection by default; more buys no throughput, only memory and backend queue depth.
pub const MAX_IN_FLIGHT_REQUESTS: usize = 64;

/// Payload bytes (write data received, read data to send) one connection may hold at once.
/// At least [`MAX_PAYLOAD`], so that every valid request fits; twice that lets a
/// maximal request overlap with the next one.
pub const MAX_IN_FLIGHT_BYTES: usize = 2 * MAX_PAYLOAD as usize;

/// Connections one listener serves at once; further clients are accepted and closed at
/// once, so a misbehaving program cannot exhaust file descriptors and memory.
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 256;

/// Time a client has to finish option haggling. Real clients need milliseconds; the limit
/// frees sockets of clients that connect and never negotiate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a client still in the handshake has, once the server shuts down, to act on
/// `NBD_REP_ERR_SHUTDOWN` and leave by itself before it is disconnected.
pub const SHUTDOWN_HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// Time requests in flight have to finish once the server (or the export, or the
/// listener) shuts down, before the connection is dropped regardless. Generous: a write
/// the backend has accepted should be answered, but a stuck backend or a client that stops
/// reading replies must not block shutdown forever.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes read from the socket at once (at least; a write payload is read in one go).
const READ_CHUNK: usize = 256 << 10;
/// Replies are gathered up to this many bytes before one write to the socket.
const REPLY_BATCH: usize = 256 << 10;
/// Read data up to this size is copied into the reply batch; larger data is written
/// directly from the backend's buffer.
const INLINE_DATA_MAX: usize = 64 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Why an export could not be added.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// An export of that name exists.
    #[error("export {0:?} already exists")]
    Exists(String),
    /// The name breaks the protocol's rules for export names.
    #[error("invalid export name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The description breaks the protocol's rules for strings.
    #[error("invalid description: {0}")]
    InvalidDescription(&'static str),
}

/// Where a [`Listener`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (with the actual port if port 0 was asked for).
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

struct Export {
    device: Arc<dyn BlockDevice>,
    description: String,
    /// Set (or dropped) when the export is removed: its connections drain and close.
    stop: watch::Sender<bool>,
}

struct Inner {
    exports: RwLock<BTreeMap<String, Export>>,
    /// Set by [`NbdServer::shutdown`].
    stop: watch::Sender<bool>,
    /// Listener and connection tasks alive.
    active: watch::Sender<usize>,
    next_connection: AtomicU64,
}

/// Counts a listener or connection task as alive for [`NbdServer::shutdown`].
struct ActiveGuard(Arc<Inner>);

impl ActiveGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.active.send_modify(|n| *n += 1);
        Self(inner.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

/// An NBD server: a set of named exports served on any number of listeners.
///
/// Cloning gives another handle to the same server. Listeners and connections run as
/// tokio tasks, so the methods that start them must be called within a tokio runtime.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl Default for NbdServer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.export_names())
            .finish_non_exhaustive()
    }
}

impl NbdServer {
    /// A server with no exports and no listeners.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                exports: RwLock::new(BTreeMap::new()),
                stop: watch::Sender::new(false),
                active: watch::Sender::new(0),
                next_connection: AtomicU64::new(1),
            }),
        }
    }

    /// Offer `device` as export `name`. The device's size and read-only state are read
    /// whenever a client connects.
    pub fn add_export(
        &self,
        name: impl Into<String>,
        device: Arc<dyn BlockDevice>,
        description: impl Into<String>,
    ) -> Result<(), ExportError> {
        let name = name.into();
        let description = description.into();
        if let Err(reason) = check_string(&name) {
            return Err(ExportError::InvalidName { name, reason });
        }
        if name.is_empty() {
            return Err(ExportError::InvalidName {
                name,
                reason: "the empty name is reserved for the default export",
            });
        }
        check_string(&description).map_err(ExportError::InvalidDescription)?;
        let mut exports = self
            .inner
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if exports.contains_key(&name) {
            return Err(ExportError::Exists(name));
        }
        info!(export = %name, size = device.size(), read_only = device.read_only(), "NBD export added");
        exports.insert(
            name,
            Export {
                device,
                description,
                stop: watch::Sender::new(false),
            },
        );
        Ok(())
    }

    /// Withdraw export `name`. New clients no longer see it; connected clients finish the
    /// requests in flight, get `ESHUTDOWN` for new ones and are disconnected. Returns the
    /// device, or `None` if there was no such export.
    pub fn remove_export(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let export = self
            .inner
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)?;
        export.stop.send_replace(true);
        info!(export = %name, "NBD export removed");
        Some(export.device)
    }

    /// The names of all exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Listen on a Unix socket at `path`. A stale socket file (nobody accepting on it) is
    /// replaced; the file is removed again when the listener stops. The empty export name
    /// selects the only export, if there is exactly one.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> io::Result<Listener> {
        self.start_unix(path.as_ref(), None)
    }

    /// Like [`serve_unix`](Self::serve_unix), with `default_export` as the export a client
    /// gets when it asks for the empty name (as `nbd+unix:///?socket=...` does).
    pub async fn serve_unix_with_default(
        &self,
        path: impl AsRef<Path>,
        default_export: &str,
    ) -> io::Result<Listener> {
        self.start_unix(path.as_ref(), Some(default_export.to_owned()))
    }

    /// Listen on TCP at `addr` (port 0 picks a free port; see [`Listener::local_addr`]).
    pub async fn serve_tcp(&self, addr: SocketAddr) -> io::Result<Listener> {
        self.check_running()?;
        let listener = TcpListener::bind(addr).await?;
        let local = ListenAddr::Tcp(listener.local_addr()?);
        Ok(self.spawn_listener(Acceptor::Tcp(listener), local, None, None))
    }

    /// Serve one client already connected over `stream` (for example a socket handed over
    /// by a supervisor), until it disconnects or the server shuts down.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let guard = ActiveGuard::new(&self.inner);
        let stops = Stops {
            listener: None,
            server: self.inner.stop.subscribe(),
            export: None,
        };
        connection(
            guard,
            Box::new(rd),
            Box::new(wr),
            "stream".into(),
            stops,
            None,
        )
        .await;
    }

    /// Stop every listener, let every connection finish its requests in flight (new ones
    /// get `ESHUTDOWN`), close them, and wait until all of that is done. Final: a server
    /// that was shut down accepts no new listeners.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let mut active = self.inner.active.subscribe();
        let _ = active.wait_for(|&n| n == 0).await;
        info!("NBD server stopped");
    }

    fn check_running(&self) -> io::Result<()> {
        if *self.inner.stop.borrow() {
            return Err(io::Error::other("the NBD server has been shut down"));
        }
        Ok(())
    }

    fn start_unix(&self, path: &Path, default_export: Option<String>) -> io::Result<Listener> {
        self.check_running()?;
        let listener = bind_unix(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        let cleanup = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(self.spawn_listener(
            Acceptor::Unix(listener),
            ListenAddr::Unix(path.to_owned()),
            default_export,
            Some(cleanup),
        ))
    }

    fn spawn_listener(
        &self,
        acceptor: Acceptor,
        addr: ListenAddr,
        default_export: Option<String>,
        cleanup: Option<SocketFile>,
    ) -> Listener {
        let (stop, stop_rx) = watch::channel(false);
        let guard = ActiveGuard::new(&self.inner);
        info!(listen = %addr, "NBD listener started");
        let task = tokio::spawn(accept_loop(
            guard,
            acceptor,
            addr.clone(),
            stop_rx,
            default_export,
            cleanup,
        ));
        Listener {
            addr,
            stop,
            task: Some(task),
        }
    }
}

/// A running listener. Dropping it stops accepting and lets its connections drain and
/// close in the background; [`shutdown`](Self::shutdown) does the same and waits.
#[derive(Debug)]
pub struct Listener {
    addr: ListenAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Listener {
    /// Where this listener listens.
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Stop accepting, drain and close this listener's connections, and wait for that.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Check the protocol's rules for strings: at most 4096 bytes, no NUL (UTF-8 is given).
fn check_string(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_STRING_LEN {
        return Err("longer than 4096 bytes");
    }
    if s.contains('\0') {
        return Err("contains a NUL character");
    }
    Ok(())
}

/// Bind a Unix socket, replacing a stale socket file that nobody accepts on.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return Err(e);
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is being served by another process", path.display()),
                )),
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    UnixListener::bind(path)
                }
                Err(_) => Err(e),
            }
        }
        other => other,
    }
}

/// The socket file a Unix listener created, removed when it stops (unless replaced).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn remove(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

enum Acceptor {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Acceptor {
    async fn accept(&self) -> io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Acceptor::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(cred) => format!("unix pid {}", cred.pid().unwrap_or(0)),
                    Err(_) => "unix".to_owned(),
                };
                let (rd, wr) = stream.into_split();
                Ok((Box::new(rd), Box::new(wr), peer))
            }
            Acceptor::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let (rd, wr) = stream.into_split();
                Ok((Box::new(rd), Box::new(wr), peer.to_string()))
            }
        }
    }
}

/// The stop signals a connection obeys. A closed channel counts as a stop.
#[derive(Clone)]
struct Stops {
    listener: Option<watch::Receiver<bool>>,
    server: watch::Receiver<bool>,
    export: Option<watch::Receiver<bool>>,
}

async fn stop_signalled(rx: Option<&mut watch::Receiver<bool>>) {
    match rx {
        Some(rx) => {
            let _ = rx.wait_for(|&stop| stop).await;
        }
        None => std::future::pending().await,
    }
}

impl Stops {
    /// Resolves once any of the signals is set.
    async fn stopped(&mut self) {
        tokio::select! {
            _ = stop_signalled(self.listener.as_mut()) => {}
            _ = stop_signalled(Some(&mut self.server)) => {}
            _ = stop_signalled(self.export.as_mut()) => {}
        }
    }
}

async fn accept_loop(
    guard: ActiveGuard,
    acceptor: Acceptor,
    addr: ListenAddr,
    stop: watch::Receiver<bool>,
    default_export: Option<String>,
    cleanup: Option<SocketFile>,
) {
    let inner = guard.0.clone();
    let mut stops = Stops {
        listener: Some(stop),
        server: inner.stop.subscribe(),
        export: None,
    };
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stops.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = acceptor.accept() => match accepted {
                Ok((rd, wr, peer)) => {
                    if connections.len() >= MAX_CONNECTIONS_PER_LISTENER {
                        warn!(listen = %addr, %peer, "too many NBD connections; closing the new one");
                        continue;
                    }
                    let conn_guard = ActiveGuard::new(&inner);
                    connections.spawn(connection(
                        conn_guard,
                        rd,
                        wr,
                        peer,
                        stops.clone(),
                        default_export.clone(),
                    ));
                }
                Err(e) => {
                    warn!(listen = %addr, error = %e, "NBD accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(acceptor);
    if let Some(file) = cleanup {
        file.remove();
    }
    while connections.join_next().await.is_some() {}
    info!(listen = %addr, "NBD listener stopped");
    drop(guard);
}

/// How a connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client left during the handshake (`NBD_OPT_ABORT` or closing the socket).
    HandshakeClosed,
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket in the transmission phase.
    ClientClosed,
    /// Server, listener or export shutdown.
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::HandshakeClosed => "left during the handshake",
            End::Disconnect => "NBD_CMD_DISC",
            End::ClientClosed => "client closed the connection",
            End::Shutdown => "server shutdown",
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("network: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("export {0:?} was removed during the handshake")]
    ExportGone(String),
    #[error("requests in flight did not finish within {0:?} of the shutdown")]
    DrainTimeout(Duration),
    #[error("reply writer stopped")]
    WriterGone,
}

async fn connection(
    guard: ActiveGuard,
    rd: BoxRead,
    wr: BoxWrite,
    peer: String,
    stops: Stops,
    default_export: Option<String>,
) {
    let inner = guard.0.clone();
    let id = inner.next_connection.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("nbd", conn = id, peer = %peer);
    async move {
        info!("NBD client connected");
        match run_connection(&inner, rd, wr, stops, default_export.as_deref()).await {
            Ok(end) => info!(reason = %end, "NBD client disconnected"),
            Err(e) => warn!(error = %e, "NBD connection closed"),
        }
        drop(guard);
    }
    .instrument(span)
    .await
}

struct Catalog<'a> {
    exports: &'a BTreeMap<String, Export>,
    default: Option<&'a str>,
}

impl ExportCatalog for Catalog<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let (name, export) = if name.is_empty() {
            match self.default {
                Some(default) => self.exports.get_key_value(default)?,
                None if self.exports.len() == 1 => self.exports.iter().next()?,
                None => return None,
            }
        } else {
            self.exports.get_key_value(name)?
        };
        Some(ExportInfo {
            name: name.clone(),
            description: export.description.clone(),
            size: export.device.size(),
            flags: export_flags(export.device.read_only(), export.device.can_multi_conn()),
        })
    }

    fn list(&self) -> Vec<ExportListing> {
        self.exports
            .iter()
            .map(|(name, export)| ExportListing {
                name: name.clone(),
                description: export.description.clone(),
            })
            .collect()
    }
}

async fn run_connection(
    inner: &Arc<Inner>,
    mut rd: BoxRead,
    mut wr: BoxWrite,
    mut stops: Stops,
    default_export: Option<&str>,
) -> Result<End, ConnectionError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let Some(negotiated) = handshake(
        inner,
        &mut rd,
        &mut wr,
        &mut buf,
        &mut stops,
        default_export,
    )
    .await?
    else {
        return Ok(End::HandshakeClosed);
    };

    let (device, export_stop) = {
        let exports = inner.exports.read().unwrap_or_else(PoisonError::into_inner);
        match exports.get(&negotiated.export) {
            Some(export) => (export.device.clone(), export.stop.subscribe()),
            None => return Err(ConnectionError::ExportGone(negotiated.export)),
        }
    };
    stops.export = Some(export_stop);
    // The client holds the device open until the connection ends, however it ends.
    let _open = OpenGuard::new(device.clone());
    info!(
        export = %negotiated.export,
        size = negotiated.size,
        flags = format_args!("{:#x}", negotiated.flags),
        "NBD transmission started"
    );

    let mut drain_stops = stops.clone();
    tokio::select! {
        result = transmission(rd, wr, buf, device, &negotiated, stops) => result,
        _ = async {
            drain_stops.stopped().await;
            sleep(DRAIN_TIMEOUT).await;
        } => Err(ConnectionError::DrainTimeout(DRAIN_TIMEOUT)),
    }
}

/// Counts a connection in transmission as an opener of its device
/// ([`BlockDevice::opened`] / [`BlockDevice::closed`]).
struct OpenGuard(Arc<dyn BlockDevice>);

impl OpenGuard {
    fn new(device: Arc<dyn BlockDevice>) -> OpenGuard {
        device.opened();
        OpenGuard(device)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// Run option haggling. `None`: the client left before choosing an export.
async fn handshake(
    inner: &Arc<Inner>,
    rd: &mut BoxRead,
    wr: &mut BoxWrite,
    buf: &mut BytesMut,
    stops: &mut Stops,
    default_export: Option<&str>,
) -> Result<Option<Negotiated>, ConnectionError> {
    let mut hs = ServerHandshake::new();
    let mut deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        let progress = {
            let exports = inner.exports.read().unwrap_or_else(PoisonError::into_inner);
            let catalog = Catalog {
                exports: &exports,
                default: default_export,
            };
            hs.handle(buf, &catalog)
        };
        // Replies to the options before a fatal one are still worth sending.
        let out = hs.take_output();
        let sent = if out.is_empty() {
            Ok(())
        } else {
            timeout_at(deadline, wr.write_all(&out))
                .await
                .map_err(|_| ConnectionError::HandshakeTimeout(HANDSHAKE_TIMEOUT))
                .and_then(|r| r.map_err(ConnectionError::from))
        };
        match progress? {
            Progress::NeedInput => sent?,
            Progress::Transmission(negotiated) => {
                sent?;
                return Ok(Some(negotiated));
            }
            Progress::Aborted => {
                // Clients may close without waiting for the ACK; that is no error.
                debug!("client sent NBD_OPT_ABORT");
                let _ = wr.shutdown().await;
                return Ok(None);
            }
        }
        buf.reserve(READ_CHUNK);
        let shutting_down = hs.is_shutting_down();
        tokio::select! {
            read = rd.read_buf(buf) => {
                if read? == 0 {
                    return Ok(None);
                }
            }
            _ = sleep_until(deadline) => {
                return Err(ConnectionError::HandshakeTimeout(HANDSHAKE_TIMEOUT));
            }
            _ = stops.stopped(), if !shutting_down => {
                debug!("shutdown during the handshake; refusing further options");
                hs.begin_shutdown();
                deadline = deadline.min(Instant::now() + SHUTDOWN_HANDSHAKE_GRACE);
            }
        }
    }
}

/// One reply on its way to the writer.
struct Reply {
    header: [u8; SIMPLE_REPLY_LEN],
    data: Option<Bytes>,
    /// The payload budget of the request, returned once the reply has been written.
    _budget: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn error(cookie: u64, error: ErrorCode) -> Self {
        Self {
            header: encode_simple_reply(cookie, Some(error)),
            data: None,
            _budget: None,
        }
    }
}

/// The request loop of one connection.
async fn transmission(
    mut rd: BoxRead,
    wr: BoxWrite,
    mut buf: BytesMut,
    device: Arc<dyn BlockDevice>,
    negotiated: &Negotiated,
    mut stops: Stops,
) -> Result<End, ConnectionError> {
    let mut decoder = RequestDecoder::new(negotiated.size, negotiated.flags);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT_REQUESTS);
    let writer = tokio::spawn(write_replies(wr, rx).in_current_span());
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS));
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    let mut draining = false;

    let outcome: Result<End, ConnectionError> = 'conn: loop {
        loop {
            let item = match decoder.decode(&mut buf) {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => break 'conn Err(e.into()),
            };
            let reply = match item {
                Decoded::Disconnect => break 'conn Ok(End::Disconnect),
                Decoded::Reject {
                    cookie,
                    error,
                    reason,
                } => {
                    debug!(cookie, ?error, reason, "request rejected");
                    Reply::error(cookie, error)
                }
                Decoded::Request(request) if draining => {
                    Reply::error(request.cookie, ErrorCode::Shutdown)
                }
                Decoded::Request(request) => {
                    // Backpressure: while the bounds are reached, no more is read.
                    let (Ok(slot), Ok(bytes)) = (
                        slots.clone().acquire_owned().await,
                        budget
                            .clone()
                            .acquire_many_owned(request.payload_len())
                            .await,
                    ) else {
                        // Unreachable: these semaphores are never closed.
                        break 'conn Err(ConnectionError::WriterGone);
                    };
                    tokio::spawn(
                        execute(device.clone(), request, tx.clone(), slot, bytes).in_current_span(),
                    );
                    continue;
                }
            };
            if tx.send(reply).await.is_err() {
                break 'conn Err(ConnectionError::WriterGone);
            }
        }
        if draining && slots.available_permits() == MAX_IN_FLIGHT_REQUESTS {
            break Ok(End::Shutdown);
        }
        let wanted = decoder.bytes_wanted(buf.len()).min(MAX_PAYLOAD as usize);
        buf.reserve(wanted.max(READ_CHUNK));
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) => break Ok(End::ClientClosed),
                Ok(_) => {}
                Err(e) => break Err(e.into()),
            },
            _ = stops.stopped(), if !draining => {
                debug!("shutdown: finishing requests in flight, refusing new ones");
                draining = true;
            }
            _ = slots.acquire_many(MAX_IN_FLIGHT_REQUESTS as u32), if draining => {}
            _ = tx.closed() => break Err(ConnectionError::WriterGone),
        }
    };

    // Whatever ended the loop: finish the requests in flight, let the writer send their
    // replies, then close.
    drop(tx);
    let _ = slots.acquire_many(MAX_IN_FLIGHT_REQUESTS as u32).await;
    let written = writer.await;
    match (outcome, written) {
        // The client is gone; failing to write to it is expected.
        (Ok(End::ClientClosed), _) => Ok(End::ClientClosed),
        (Ok(end), Ok(Ok(()))) => Ok(end),
        (Ok(_), Ok(Err(e))) => Err(e.into()),
        (Ok(_), Err(e)) => Err(io::Error::other(e).into()),
        (Err(ConnectionError::WriterGone), Ok(Err(e))) => Err(e.into()),
        (Err(e), _) => Err(e),
    }
}

/// Run one request on the backend and queue its reply.
async fn execute(
    device: Arc<dyn BlockDevice>,
    request: Request,
    tx: mpsc::Sender<Reply>,
    slot: OwnedSemaphorePermit,
    budget: OwnedSemaphorePermit,
) {
    let cookie = request.cookie;
    let command = request.command;
    // A separate task, so that a panicking backend costs an EIO reply, not a lost one.
    let result = tokio::spawn(async move { run_command(&*device, command).await })
        .await
        .unwrap_or_else(|e| Err(BlockError::Io(io::Error::other(e))));
    let reply = match result {
        Ok(data) => Reply {
            header: encode_simple_reply(cookie, None),
            data,
            _budget: Some(budget),
        },
        Err(e) => {
            let code = e.error_code();
            match e {
                BlockError::ReadOnly | BlockError::Shutdown => {
                    debug!(cookie, error = %e, ?code, "request failed")
                }
                _ => warn!(cookie, error = %e, ?code, "request failed"),
            }
            Reply::error(cookie, code)
        }
    };
    let _ = tx.send(reply).await;
    drop(slot);
}

async fn run_command(
    device: &dyn BlockDevice,
    command: Command,
) -> Result<Option<Bytes>, BlockError> {
    match command {
        Command::Read { offset, len } => {
            let data = device.read(offset, len).await?;
            if data.len() != len as usize {
                // Sending it would desynchronise the client.
                return Err(BlockError::Io(io::Error::other(format!(
                    "backend returned {} bytes for a {len}-byte read",
                    data.len()
                ))));
            }
            Ok(Some(data))
        }
        Command::Write { offset, data, fua } => {
            if !data.is_empty() {
                device.write(offset, data, fua).await?;
            }
            Ok(None)
        }
        Command::Flush => device.flush().await.map(|()| None),
        Command::Trim { offset, len, fua } => device.trim(offset, len, fua).await.map(|()| None),
        Command::WriteZeroes {
            offset,
            len,
            may_trim,
            fua,
        } => device
            .write_zeroes(offset, len, may_trim, fua)
            .await
            .map(|()| None),
    }
}

/// Send replies in the order they complete, batching small ones into one write.
async fn write_replies(mut wr: BoxWrite, mut rx: mpsc::Receiver<Reply>) -> io::Result<()> {
    let mut batch = BytesMut::with_capacity(REPLY_BATCH);
    let mut written = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            batch.extend_from_slice(&reply.header);
            if let Some(data) = &reply.data {
                if data.len() <= INLINE_DATA_MAX {
                    batch.extend_from_slice(data);
                } else {
                    wr.write_all(&batch).await?;
                    batch.clear();
                    wr.write_all(data).await?;
                }
            }
            // Keep the reply (and its budget) until its bytes are out.
            written.push(reply);
            if batch.len() < REPLY_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            wr.write_all(&batch).await?;
            batch.clear();
        }
        wr.flush().await?;
        written.clear();
    }
    wr.shutdown().await
}
