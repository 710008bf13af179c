//! Dispatch of control requests to the running resources.
//!
//! The daemon does not know how replication works: a running resource is a [`Replica`], made
//! by a [`ReplicaFactory`] on `up`. [`Host`] keeps the map of running resources, re-reads the
//! configuration for `up` (so edits take effect as they do for drbdadm) and turns each request
//! into a call on the replica and the reply into what `drbdsetup` prints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use drbd_core::config::model::{ModelError, ResourceModel};
use drbd_core::config::{self, Config, ParseOptions};
use drbd_core::replication::status::{AdminError, AdminRequest, VolumeStatus};

use super::control::{Command, Request, Response};
use super::format::{self, StatusOptions};
use crate::source::FsSource;

/// A boxed, sendable future (the traits below are object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// One running resource ("up"), as the daemon sees it.
pub trait Replica: Send + Sync + 'static {
    /// The state of each volume, in volume order.
    fn status(&self) -> Vec<VolumeStatus>;
    /// The peer's host name, for `status`.
    fn peer_name(&self) -> String;
    /// Carries out an administrative request on the whole resource. An
    /// [`AdminError::Other`] message is printed after the object (`0: ` or `r0: `), so it
    /// should not repeat it.
    fn request(&self, req: AdminRequest) -> BoxFuture<'_, Result<(), AdminError>>;
    /// "down": finish in-flight I/O, write the metadata, close the exports.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Creates replicas ("up").
pub trait ReplicaFactory: Send + Sync + 'static {
    /// Brings `resource` up on node `node`, keeping whatever state it needs under `state_dir`.
    fn start<'a>(
        &'a self,
        resource: &'a ResourceModel,
        node: &'a str,
        state_dir: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn Replica>, AdminError>>;
}

/// The factory of a daemon built without the replication runtime: every `up` fails.
pub struct UnavailableFactory;

/// What [`UnavailableFactory`] answers.
pub const NOT_BUILT_IN: &str = "replication runtime not built in";

impl ReplicaFactory for UnavailableFactory {
    fn start<'a>(
        &'a self,
        _resource: &'a ResourceModel,
        _node: &'a str,
        _state_dir: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn Replica>, AdminError>> {
        Box::pin(async {
            Err(AdminError::Other {
                exit_code: 10,
                message: NOT_BUILT_IN.to_string(),
            })
        })
    }
}

/// Exit code of drbdadm's own usage errors and unknown resources.
const E_USAGE: i32 = 1;
/// Exit code of `drbdsetup` for what the kernel refuses as a configuration request (unknown
/// resource, minor not allocated, ...).
const E_CONFIG: i32 = 10;
/// Exit code for everything else that cannot be done.
const E_OTHER: i32 = 20;

/// A configuration problem: exit code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub exit_code: i32,
    pub message: String,
}

/// Reads and parses the configuration file for `node`, as drbdadm does.
pub fn load_config(path: &Path, node: &str) -> Result<Config, ConfigProblem> {
    let file = path.to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigProblem {
        exit_code: E_OTHER,
        message: format!("Can not open '{file}': {e}"),
    })?;
    let opts = ParseOptions {
        node: node.to_string(),
        interactive: false,
    };
    config::parse(&FsSource, &file, &text, &opts).map_err(|errs| ConfigProblem {
        exit_code: errs.exit_code(),
        message: errs.to_string().trim_end().to_string(),
    })
}

/// The model of a resource of this node; the error is the response to send.
fn model_of(cfg: &Config, name: &str) -> Result<ResourceModel, Response> {
    let res = cfg.resource(name).filter(|r| !r.ignored() && !r.stacked());
    if res.is_none() {
        return Err(Response::error(
            E_USAGE,
            format!("'{name}' not defined in your config (for this host)."),
        ));
    }
    ResourceModel::new(cfg, name).map_err(|e| match e {
        ModelError::UnknownResource(_) | ModelError::NotOnThisNode { .. } => Response::error(
            E_USAGE,
            format!("'{name}' not defined in your config (for this host)."),
        ),
        other => Response::error(E_CONFIG, other.to_string()),
    })
}

/// A running resource.
struct Running {
    replica: Arc<dyn Replica>,
}

/// The daemon's resources and how requests reach them.
pub struct Host {
    config_path: PathBuf,
    node: String,
    state_dir: PathBuf,
    factory: Arc<dyn ReplicaFactory>,
    running: Mutex<BTreeMap<String, Running>>,
    /// Serialises `up`, `down` and the daemon's shutdown, so that a resource is never started
    /// twice or started while its previous instance is still shutting down. True once the
    /// daemon is shutting down: no `up` after that.
    lifecycle: tokio::sync::Mutex<bool>,
}

impl Host {
    pub fn new(
        config_path: PathBuf,
        node: String,
        state_dir: PathBuf,
        factory: Arc<dyn ReplicaFactory>,
    ) -> Host {
        Host {
            config_path,
            node,
            state_dir,
            factory,
            running: Mutex::new(BTreeMap::new()),
            lifecycle: tokio::sync::Mutex::new(false),
        }
    }

    /// The node this daemon runs as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Names of the running resources, sorted.
    pub fn running(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Running>> {
        // A panic elsewhere while holding the lock leaves the map itself consistent.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replica(&self, name: &str) -> Option<Arc<dyn Replica>> {
        self.map().get(name).map(|r| Arc::clone(&r.replica))
    }

    fn load(&self) -> Result<Config, Response> {
        load_config(&self.config_path, &self.node)
            .map_err(|p| Response::error(p.exit_code, p.message))
    }

    /// Shuts every running resource down (the daemon is stopping).
    pub async fn shutdown_all(&self) {
        let mut closed = self.lifecycle.lock().await;
        *closed = true;
        let all: Vec<(String, Running)> = std::mem::take(&mut *self.map()).into_iter().collect();
        for (name, r) in all {
            tracing::info!(resource = %name, "shutting down");
            r.replica.shutdown().await;
            tracing::info!(resource = %name, "down");
        }
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request) -> Response {
        if let Some(node) = &req.node {
            if *node != self.node {
                return Response::error(
                    E_OTHER,
                    format!(
                        "drbdd runs as node '{}', but the request was made for node '{node}'; \
                         use the same --node (or DRBD_NODE) for drbdadm and drbdd",
                        self.node
                    ),
                );
            }
        }
        let Some(name) = req.resource.clone() else {
            return Response::error(
                E_USAGE,
                format!(
                    "USAGE: drbdadm {} RESOURCE\nNo resource names specified",
                    req.command
                ),
            );
        };
        if req.volume.is_some() && req.command.whole_resource() {
            return Response::error(
                E_USAGE,
                format!(
                    "{} operates on whole resources, but you specified a specific volume!",
                    req.command
                ),
            );
        }
        tracing::debug!(command = %req.command, resource = %name, volume = ?req.volume, "request");
        match req.command {
            Command::Up => self.up(&name, req.volume).await,
            Command::Down => self.down(&name).await,
            Command::Role | Command::Cstate | Command::Dstate | Command::Status => {
                self.query(&req, &name)
            }
            _ => self.admin(&req, &name).await,
        }
    }

    /// The model of resource `name` from the configuration as it is now, with `volume`
    /// (if given) checked to exist; the error is the response to send.
    fn model_for(&self, name: &str, volume: Option<u32>) -> Result<ResourceModel, Response> {
        let cfg = self.load()?;
        let model = model_of(&cfg, name)?;
        if let Some(n) = volume {
            check_volume(&model, name, n)?;
        }
        Ok(model)
    }

    async fn up(&self, name: &str, volume: Option<u32>) -> Response {
        let closed = self.lifecycle.lock().await;
        if *closed {
            return Response::error(E_OTHER, format!("{name}: drbdd is shutting down"));
        }
        let model = match self.model_for(name, volume) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Some(n) = volume {
            if model.volumes.len() > 1 {
                return per_volume_unsupported(Command::Up, name, n);
            }
        }
        if self.map().contains_key(name) {
            // Like `drbdadm up` on a configured resource: nothing to do.
            tracing::info!(resource = %name, "up: already up");
            return Response::ok("");
        }
        tracing::info!(resource = %name, node = %self.node, "starting");
        match self
            .factory
            .start(&model, &self.node, &self.state_dir)
            .await
        {
            Ok(replica) => {
                self.map().insert(name.to_string(), Running { replica });
                tracing::info!(resource = %name, "up");
                Response::ok("")
            }
            Err(e) => {
                tracing::warn!(resource = %name, "up failed: {e}");
                admin_error(name, &e)
            }
        }
    }

    async fn down(&self, name: &str) -> Response {
        let _guard = self.lifecycle.lock().await;
        let removed = self.map().remove(name);
        match removed {
            // `down` of a resource that is not up succeeds, as it does with drbd-utils.
            None => Response::ok(""),
            Some(r) => {
                tracing::info!(resource = %name, "shutting down");
                r.replica.shutdown().await;
                tracing::info!(resource = %name, "down");
                Response::ok("")
            }
        }
    }

    /// The error for a request on a resource that is not up, as `drbdsetup` words it for an
    /// unconfigured minor or resource.
    fn not_up(&self, cmd: Command, name: &str, volume: Option<u32>) -> Response {
        let model = match self.model_for(name, volume) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let hint = format!("additional info from drbdd:\nresource '{name}' is not up");
        let minor = model
            .volumes
            .iter()
            .find(|v| volume.is_none_or(|n| n == v.vnr))
            .map(|v| v.minor);
        match (cmd, minor) {
            (Command::Status, _) => Response::error(E_CONFIG, format!("{name}: No such resource")),
            (Command::Connect | Command::Disconnect, _) | (_, None) => Response::error(
                E_CONFIG,
                format!("{name}: Failure: (158) Unknown resource\n{hint}"),
            ),
            (_, Some(m)) => Response::error(
                E_CONFIG,
                format!("{m}: Failure: (127) Device minor not allocated\n{hint}"),
            ),
        }
    }

    fn query(&self, req: &Request, name: &str) -> Response {
        let Some(replica) = self.replica(name) else {
            return self.not_up(req.command, name, req.volume);
        };
        let mut vols = replica.status();
        vols.sort_by_key(|v| v.volume);
        if let Some(n) = req.volume {
            vols.retain(|v| u32::from(v.volume) == n);
            if vols.is_empty() {
                return no_such_volume(name, n);
            }
        }
        let line: fn(&VolumeStatus) -> String = match req.command {
            Command::Role => format::role_line,
            Command::Cstate => format::cstate_line,
            Command::Dstate => format::dstate_line,
            _ => {
                let opts = StatusOptions {
                    verbose: req.options.verbose,
                    statistics: req.options.statistics,
                };
                return Response::ok(format::status_text(name, &replica.peer_name(), &vols, opts));
            }
        };
        let mut out = String::new();
        for v in &vols {
            out.push_str(&line(v));
            out.push('\n');
        }
        Response::ok(out)
    }

    async fn admin(&self, req: &Request, name: &str) -> Response {
        let Some(replica) = self.replica(name) else {
            return self.not_up(req.command, name, req.volume);
        };
        let o = req.options;
        let (admin, per_device) = match req.command {
            Command::Attach => (AdminRequest::Attach, true),
            Command::Detach => (AdminRequest::Detach, true),
            Command::Connect => (
                AdminRequest::Connect {
                    discard_my_data: o.discard_my_data,
                },
                false,
            ),
            Command::Disconnect => (AdminRequest::Disconnect, false),
            // The role belongs to the whole resource in 8.4: `primary r0/1` promotes r0.
            Command::Primary => (AdminRequest::Primary { force: o.force }, false),
            Command::Secondary => (AdminRequest::Secondary, false),
            Command::Invalidate => (AdminRequest::Invalidate, true),
            Command::InvalidateRemote => (AdminRequest::InvalidateRemote, true),
            Command::NewCurrentUuid => (
                AdminRequest::NewCurrentUuid {
                    clear_bitmap: o.clear_bitmap,
                },
                true,
            ),
            Command::Verify => (AdminRequest::Verify, true),
            Command::Outdate => (AdminRequest::Outdate, true),
            Command::PauseSync => (AdminRequest::PauseSync, true),
            Command::ResumeSync => (AdminRequest::ResumeSync, true),
            Command::SuspendIo => (AdminRequest::SuspendIo, false),
            Command::ResumeIo => (AdminRequest::ResumeIo, false),
            other => {
                return Response::error(E_OTHER, format!("drbdd: '{other}' is not a state change"))
            }
        };
        let mut vols = replica.status();
        vols.sort_by_key(|v| v.volume);
        let selected = match req.volume {
            None => vols.first(),
            Some(n) => match vols.iter().find(|v| u32::from(v.volume) == n) {
                Some(v) => Some(v),
                None => return no_such_volume(name, n),
            },
        };
        if let Some(n) = req.volume {
            if per_device && vols.len() > 1 {
                return per_volume_unsupported(req.command, name, n);
            }
        }
        // drbdsetup names the minor for device commands and the resource for connections.
        let object = match (req.command, selected) {
            (Command::Connect | Command::Disconnect, _) | (_, None) => name.to_string(),
            (_, Some(v)) => v.minor.to_string(),
        };
        match replica.request(admin).await {
            Ok(()) => Response::ok(""),
            Err(e) => {
                tracing::info!(resource = %name, command = %req.command, "refused: {e}");
                admin_error(&object, &e)
            }
        }
    }
}

fn check_volume(model: &ResourceModel, name: &str, n: u32) -> Result<(), Response> {
    if model.volumes.iter().any(|v| v.vnr == n) {
        Ok(())
    } else {
        Err(Response::error(
            E_USAGE,
            format!("'{name}/{n}' not defined in your config (for this host)."),
        ))
    }
}

fn no_such_volume(name: &str, n: u32) -> Response {
    Response::error(
        E_CONFIG,
        format!(
            "{name}: Failure: (127) Device minor not allocated\nadditional info from drbdd:\nresource '{name}' has no volume {n}"
        ),
    )
}

fn per_volume_unsupported(cmd: Command, name: &str, n: u32) -> Response {
    Response::error(
        E_OTHER,
        format!(
            "drbdd: '{cmd}' of a single volume ('{name}/{n}') of a resource with several volumes \
             is not supported yet; use 'drbdadm {cmd} {name}'"
        ),
    )
}

/// `OBJ: State change failed: (-2) Need access to UpToDate data`, or the replica's own
/// message, with the exit code drbdsetup would end with.
fn admin_error(object: &str, e: &AdminError) -> Response {
    let code = e.exit_code();
    // A failure must not look like success to scripts, and exit codes are 8 bits.
    let code = if (1..=255).contains(&code) {
        code
    } else {
        E_OTHER
    };
    Response::error(code, format!("{object}: {e}"))
}
