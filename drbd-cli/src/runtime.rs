//! The replication runtime behind `drbdd`: turns a resource of the configuration into running
//! volumes ([`drbd_net::replica::Replica`]) with their peer connection and NBD exports.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drbd_core::config::model::{MetaDisk, Protocol as ModelProtocol, ResourceModel};
use drbd_core::replication::device::{DeviceConfig, Fencing, OnIoError, Protocol, ResyncRate};
use drbd_core::replication::digest::DigestAlg;
use drbd_core::replication::status::{AdminError, AdminRequest, VolumeStatus};
use drbd_core::uuid::{AfterSbPolicy, RrConflict, SplitBrainPolicy};
use drbd_net::disk::EngineOptions;
use drbd_net::handlers::Handlers;
use drbd_net::handshake::{
    AuthConfig, HandshakeConfig, KeepAliveConfig, ProtocolParams, VolumeHello, FEATURES,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use drbd_net::nbd::{BlockDevice, Listener, NbdServer};
use drbd_net::replica::{MetaLocation, Replica, ReplicaConfig};
use drbd_net::transport::PeerConfig;
use drbd_net::wire::{Sizes, SyncParam};

use crate::daemon::host::{self, BoxFuture, ReplicaFactory};

/// The numeric option `name` in its own unit, or `default`.
fn num(m: &ResourceModel, name: &str, default: u64) -> u64 {
    m.number(name).unwrap_or(default)
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The replication settings of `model`.
pub fn device_config(m: &ResourceModel) -> Result<DeviceConfig, String> {
    let protocol = match m.protocol() {
        ModelProtocol::A => Protocol::A,
        ModelProtocol::B => Protocol::B,
        ModelProtocol::C => Protocol::C,
    };
    let policy = |name: &str| -> Result<AfterSbPolicy, String> {
        let v = m.value(name).unwrap_or_else(|| "disconnect".into());
        AfterSbPolicy::from_name(&v).ok_or_else(|| format!("{name}: unknown policy '{v}'"))
    };
    let rr = m
        .value("rr-conflict")
        .unwrap_or_else(|| "disconnect".into());
    let split_brain = SplitBrainPolicy {
        after_sb_0pri: policy("after-sb-0pri")?,
        after_sb_1pri: policy("after-sb-1pri")?,
        after_sb_2pri: policy("after-sb-2pri")?,
        rr_conflict: RrConflict::from_name(&rr)
            .ok_or_else(|| format!("rr-conflict: unknown value '{rr}'"))?,
        always_asbp: m.flag("always-asbp"),
    };
    split_brain.validate().map_err(|e| e.to_string())?;
    let verify_alg = digest_option(m, "verify-alg")?;
    let csums_alg = digest_option(m, "csums-alg")?;
    let on_io_error = match m.value("on-io-error") {
        None => OnIoError::Detach,
        Some(v) => OnIoError::from_name(&v).ok_or_else(|| format!("on-io-error: unknown '{v}'"))?,
    };
    let fencing = match m.value("fencing") {
        None => Fencing::DontCare,
        Some(v) => Fencing::from_name(&v).ok_or_else(|| format!("fencing: unknown '{v}'"))?,
    };
    let d = ResyncRate::default();
    Ok(DeviceConfig {
        protocol,
        max_epoch_size: clamp_u32(num(m, "max-epoch-size", 2048)),
        max_buffers: clamp_u32(num(m, "max-buffers", 2048)).max(32),
        disk_flushes: m.value("disk-flushes").as_deref() != Some("no"),
        resync: ResyncRate {
            rate_kib: clamp_u32(num(m, "resync-rate", u64::from(d.rate_kib))),
            c_plan_ahead: clamp_u32(num(m, "c-plan-ahead", u64::from(d.c_plan_ahead))),
            c_delay_target: clamp_u32(num(m, "c-delay-target", u64::from(d.c_delay_target))),
            c_fill_target: clamp_u32(num(m, "c-fill-target", u64::from(d.c_fill_target))),
            c_max_rate: clamp_u32(num(m, "c-max-rate", u64::from(d.c_max_rate))),
            c_min_rate: clamp_u32(num(m, "c-min-rate", u64::from(d.c_min_rate))),
        },
        split_brain,
        two_primaries: m.flag("allow-two-primaries"),
        verify_alg,
        csums_alg,
        csums_after_crash_only: m.flag("csums-after-crash-only"),
        on_io_error,
        fencing,
        before_resync_target: has_handler(m, "before-resync-target"),
        before_resync_source: has_handler(m, "before-resync-source"),
        rng_seed: 0,
    })
}

/// Whether the resource configures handler `name` with a command.
fn has_handler(m: &ResourceModel, name: &str) -> bool {
    m.handlers
        .iter()
        .any(|o| o.name == name && o.value.as_deref().is_some_and(|v| !v.is_empty()))
}

/// The digest algorithm a configuration option names (verify-alg, csums-alg,
/// data-integrity-alg), None when it is not set.
fn digest_option(m: &ResourceModel, name: &str) -> Result<Option<DigestAlg>, String> {
    DigestAlg::from_optional_name(&m.value(name).unwrap_or_default())
        .map_err(|e| format!("{name}: {e}"))
}

/// A socket address from a configuration address.
pub fn socket_addr(a: &drbd_core::config::Address) -> Result<SocketAddr, String> {
    let ip: IpAddr = a
        .addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("address '{}' is not an IP address", a.addr))?;
    let port: u16 = a
        .port
        .parse()
        .map_err(|_| format!("port '{}' is not a number", a.port))?;
    Ok(SocketAddr::new(ip, port))
}

/// The NBD socket of a resource in the state directory.
pub fn nbd_socket(state_dir: &Path, resource: &str) -> PathBuf {
    state_dir.join(format!("{resource}.nbd"))
}

/// Seconds (the unit of `connect-int` and `ping-int`) as a duration.
fn secs(v: u64) -> Duration {
    Duration::from_secs(v)
}

/// Tenths of a second (`timeout`, `ping-timeout`) as a duration.
fn tenths(v: u64) -> Duration {
    Duration::from_millis(v * 100)
}

/// The peer connection settings of `model` (None when it has no peer address).
pub fn peer_config(m: &ResourceModel) -> Result<Option<PeerConfig>, String> {
    let (Some(local), Some(peer)) = (&m.address, &m.peer_address) else {
        return Ok(None);
    };
    let local = socket_addr(local)?;
    let peer = socket_addr(peer)?;
    let auth = match m.value("cram-hmac-alg") {
        Some(alg) if !alg.is_empty() => {
            let secret = m.value("shared-secret").unwrap_or_default();
            Some(AuthConfig::new(&alg, &secret).map_err(|e| format!("cram-hmac-alg {alg}: {e}"))?)
        }
        _ => None,
    };
    let integrity = digest_option(m, "data-integrity-alg")?
        .map(|a| a.name().to_string())
        .unwrap_or_default();
    let dev = device_config(m)?;
    let protocol = ProtocolParams {
        wire_protocol: match dev.protocol {
            Protocol::A => 1,
            Protocol::B => 2,
            Protocol::C => 3,
        },
        after_sb_0p: dev.split_brain.after_sb_0pri.wire(),
        after_sb_1p: dev.split_brain.after_sb_1pri.wire(),
        after_sb_2p: dev.split_brain.after_sb_2pri.wire(),
        two_primaries: dev.two_primaries,
        discard_my_data: false,
        integrity_alg: integrity,
    };
    let sync_param = SyncParam::Controller {
        resync_rate: dev.resync.rate_kib,
        verify_alg: m.value("verify-alg").unwrap_or_default(),
        csums_alg: m.value("csums-alg").unwrap_or_default(),
        c_plan_ahead: dev.resync.c_plan_ahead,
        c_delay_target: dev.resync.c_delay_target,
        c_fill_target: dev.resync.c_fill_target,
        c_max_rate: dev.resync.c_max_rate,
    };
    let keepalive = KeepAliveConfig {
        ping_int: secs(num(m, "ping-int", 10)),
        ping_timeout: tenths(num(m, "ping-timeout", 5)),
        timeout: tenths(num(m, "timeout", 60)),
        ko_count: clamp_u32(num(m, "ko-count", 7)),
    };
    let buf = |name: &str| -> Option<u32> { m.number(name).filter(|&v| v > 0).map(clamp_u32) };
    Ok(Some(PeerConfig {
        name: m.name.clone(),
        local,
        peer,
        handshake: HandshakeConfig {
            protocol_min: PROTOCOL_MIN,
            protocol_max: PROTOCOL_MAX,
            features: FEATURES,
            auth,
            protocol,
            volumes: vec![VolumeHello {
                volume: 0,
                sync_param,
                sizes: Sizes::default(),
                uuids: Default::default(),
                state: Default::default(),
            }],
        },
        keepalive,
        connect_int: secs(num(m, "connect-int", 10)),
        hello: None,
        sndbuf_size: buf("sndbuf-size"),
        rcvbuf_size: buf("rcvbuf-size"),
        use_rle: m.value("use-rle").as_deref() != Some("no"),
    }))
}

/// The volume settings of `model` (one volume per resource in this version).
pub fn replica_config(m: &ResourceModel) -> Result<ReplicaConfig, String> {
    let vol = match m.volumes.as_slice() {
        [v] => v,
        [] => return Err("the resource has no volume on this node".into()),
        _ => {
            return Err(format!(
                "{} volumes: this version runs resources with one volume",
                m.volumes.len()
            ))
        }
    };
    if vol.meta != MetaDisk::Internal {
        return Err(
            "external meta data is not supported by this version (use meta-disk internal)".into(),
        );
    }
    Ok(ReplicaConfig {
        name: m.name.clone(),
        volume: u16::try_from(vol.vnr).map_err(|_| "volume number too large".to_string())?,
        minor: vol.minor,
        disk: PathBuf::from(&vol.disk),
        meta: MetaLocation::Internal,
        device: device_config(m)?,
        al_extents: clamp_u32(num(m, "al-extents", 1237)),
        engine: EngineOptions::default(),
        net: peer_config(m)?,
        handlers: handlers(m, vol),
    })
}

/// The resource's handler commands, with the environment 8.4's drbdadm gives them.
fn handlers(m: &ResourceModel, vol: &drbd_core::config::model::VolumeModel) -> Handlers {
    let commands = m
        .handlers
        .iter()
        .filter_map(|o| Some((o.name.clone(), o.value.clone()?)))
        .collect();
    let mut env = vec![
        ("DRBD_RESOURCE".to_string(), m.name.clone()),
        ("DRBD_MINOR".to_string(), vol.minor.to_string()),
        ("DRBD_VOLUME".to_string(), vol.vnr.to_string()),
        ("DRBD_LL_DISK".to_string(), vol.disk.clone()),
    ];
    if let Some(a) = &m.peer_address {
        env.push(("DRBD_PEER_AF".to_string(), a.af.clone()));
        env.push(("DRBD_PEER_ADDRESS".to_string(), a.addr.clone()));
    }
    if let Some(peer) = &m.peer_name {
        env.push(("DRBD_PEER".to_string(), peer.clone()));
        env.push(("DRBD_PEERS".to_string(), peer.clone()));
    }
    Handlers::new(commands, env)
}

/// A running resource: the volume, its NBD export.
pub struct Running {
    replica: Arc<Replica>,
    nbd: NbdServer,
    /// Kept so the listener stays open (dropping it stops listening).
    _listener: Listener,
    socket: PathBuf,
    peer: String,
    /// The daemon's TCP export server, if any (the export is removed at shutdown).
    tcp: Option<Arc<NbdServer>>,
}

impl host::Replica for Running {
    fn status(&self) -> Vec<VolumeStatus> {
        vec![self.replica.status()]
    }

    fn peer_name(&self) -> String {
        self.peer.clone()
    }

    fn request(&self, req: AdminRequest) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(self.replica.admin(req))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.nbd.shutdown().await;
            let _ = std::fs::remove_file(&self.socket);
            if let Some(tcp) = &self.tcp {
                tcp.remove_export(self.replica.name());
            }
            self.replica.shutdown().await;
        })
    }
}

/// The factory `drbdd` runs with: real volumes, served over NBD (always on the Unix socket
/// `DIR/RES.nbd`, and on one shared TCP listener when `nbd_tcp` is given).
pub struct RuntimeFactory {
    nbd_tcp: Option<SocketAddr>,
    /// The TCP server and its listener, started with the first resource.
    tcp: tokio::sync::Mutex<Option<(Arc<NbdServer>, Listener)>>,
}

impl RuntimeFactory {
    /// A factory; with `nbd_tcp`, exports are also served on that TCP address.
    pub fn new(nbd_tcp: Option<SocketAddr>) -> RuntimeFactory {
        RuntimeFactory {
            nbd_tcp,
            tcp: tokio::sync::Mutex::new(None),
        }
    }

    /// The shared TCP server, started on first use.
    async fn tcp_server(&self) -> Result<Option<Arc<NbdServer>>, String> {
        let Some(addr) = self.nbd_tcp else {
            return Ok(None);
        };
        let mut slot = self.tcp.lock().await;
        if slot.is_none() {
            let server = Arc::new(NbdServer::new());
            let listener = server
                .serve_tcp(addr)
                .await
                .map_err(|e| format!("NBD on TCP {addr}: {e}"))?;
            tracing::info!("NBD exports also served on TCP {addr}");
            *slot = Some((server, listener));
        }
        Ok(slot.as_ref().map(|(s, _)| Arc::clone(s)))
    }
}

impl ReplicaFactory for RuntimeFactory {
    fn start<'a>(
        &'a self,
        resource: &'a ResourceModel,
        _node: &'a str,
        state_dir: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn host::Replica>, AdminError>> {
        Box::pin(async move {
            let cfg = replica_config(resource).map_err(|message| AdminError::Other {
                exit_code: 10,
                message,
            })?;
            let replica = Replica::start(cfg).await.map_err(|e| AdminError::Other {
                exit_code: 10,
                message: e.to_string(),
            })?;
            let socket = nbd_socket(state_dir, &resource.name);
            let _ = std::fs::remove_file(&socket);
            let nbd = NbdServer::new();
            let served: Result<Listener, String> = async {
                nbd.add_export(
                    resource.name.clone(),
                    replica.clone() as Arc<dyn BlockDevice>,
                    format!("DRBD resource {}", resource.name),
                )
                .map_err(|e| e.to_string())?;
                nbd.serve_unix_with_default(&socket, &resource.name)
                    .await
                    .map_err(|e| format!("{}: {e}", socket.display()))
            }
            .await;
            let tcp = match self.tcp_server().await {
                Ok(tcp) => tcp,
                Err(e) => {
                    replica.shutdown().await;
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message: e,
                    });
                }
            };
            if let Some(tcp) = &tcp {
                // An export left by an earlier `up` of the same name is replaced.
                tcp.remove_export(&resource.name);
                if let Err(e) = tcp.add_export(
                    resource.name.clone(),
                    replica.clone() as Arc<dyn BlockDevice>,
                    format!("DRBD resource {}", resource.name),
                ) {
                    replica.shutdown().await;
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message: e.to_string(),
                    });
                }
            }
            let listener = match served {
                Ok(l) => l,
                Err(message) => {
                    replica.shutdown().await;
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message,
                    });
                }
            };
            tracing::info!(
                resource = %resource.name,
                "up: NBD export '{}' at {}, disk engine {}",
                resource.name,
                socket.display(),
                replica.engine()
            );
            Ok(Arc::new(Running {
                replica,
                nbd,
                _listener: listener,
                socket,
                peer: resource.peer_name.clone().unwrap_or_else(|| "peer".into()),
                tcp,
            }) as Arc<dyn host::Replica>)
        })
    }
}
