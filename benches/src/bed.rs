//! The test bed of one backing kind (tmpfs or the real disk): the files, the volumes and the
//! network link every state of a workload is measured on, all in this process.
//!
//! * `raw-a.img`, `raw-b.img`: the raw baseline ([`RawDisks`]).
//! * resource `solo` (`solo.img`): a volume whose peer never comes, StandAlone and Primary:
//!   our resource disconnected (local only; it marks what it writes out of sync, as DRBD does).
//! * resource `r0` (`alpha.img`, `bravo.img`): the pair on 127.0.0.1 / 127.0.0.2, connected,
//!   protocol C, alpha Primary, the initial sync skipped (`new-current-uuid --clear-bitmap`).
//! * [`NetLink`]: the network alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drbd_cli::daemon::host::load_config;
use drbd_cli::runtime::replica_config;
use drbd_core::config::model::ResourceModel;
use drbd_core::replication::status::{AdminRequest, VolumeStatus};
use drbd_core::state::{ConnState, DiskState};
use drbd_net::replica::Replica;

use crate::target::{NetLink, RawDisks, ReplicaTarget, Target};
use crate::tools::drbdadm;

/// Room for the internal metadata at the end of each backing file.
const META_ROOM: u64 = 64 << 20;

/// The files and volumes of one backing kind.
pub struct Bed {
    /// The folder holding the files (removed on drop).
    pub dir: tempfile::TempDir,
    /// Bytes each workload may write, from offset 0.
    pub region: u64,
    pub raw: Arc<RawDisks>,
    pub solo: Arc<Replica>,
    pub alpha: Arc<Replica>,
    pub bravo: Arc<Replica>,
    pub net: Arc<NetLink>,
    /// The configuration file.
    pub conf: PathBuf,
}

/// The configuration of the bed's resources.
fn config(dir: &Path, port: u16, extra_net: &str) -> String {
    let d = dir.display();
    format!(
        "global {{ usage-count no; }}\n\
         common {{\n\
           net {{ connect-int 1; ping-int 10; max-buffers 8000; max-epoch-size 8000; {extra_net} }}\n\
           disk {{ resync-rate 4194304; c-plan-ahead 0; al-extents 1237; }}\n\
         }}\n\
         resource r0 {{\n\
           protocol C;\n\
           on alpha {{ device /dev/drbd0; disk {d}/alpha.img; address 127.0.0.1:{port}; meta-disk internal; }}\n\
           on bravo {{ device /dev/drbd0; disk {d}/bravo.img; address 127.0.0.2:{port}; meta-disk internal; }}\n\
         }}\n\
         resource solo {{\n\
           protocol C;\n\
           on alpha {{ device /dev/drbd1; disk {d}/solo.img; address 127.0.0.1:{p1}; meta-disk internal; }}\n\
           on bravo {{ device /dev/drbd1; disk {d}/nowhere.img; address 127.0.0.2:{p1}; meta-disk internal; }}\n\
         }}\n",
        p1 = port + 1
    )
}

async fn start(conf: &Path, node: &str, resource: &str) -> Result<Arc<Replica>, String> {
    let cfg = load_config(conf, node).map_err(|e| format!("{e:?}"))?;
    let model = ResourceModel::new(&cfg, resource).map_err(|e| format!("{e:?}"))?;
    let rc = replica_config(&model)?;
    Replica::start(rc).await.map_err(|e| e.to_string())
}

async fn admin(r: &Replica, req: AdminRequest) -> Result<(), String> {
    r.admin(req).await.map_err(|e| format!("{req:?}: {e:?}"))
}

/// Waits until `r`'s state satisfies `f`.
pub async fn wait(
    r: &Replica,
    limit: Duration,
    f: impl Fn(&VolumeStatus) -> bool,
) -> Result<(), String> {
    r.wait_for(limit, f)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Connected, UpToDate on both sides.
pub fn in_sync(s: &VolumeStatus) -> bool {
    s.conn == ConnState::Connected
        && s.disk == DiskState::UpToDate
        && s.peer_disk == DiskState::UpToDate
}

impl Bed {
    /// Creates the files of `region` bytes (plus metadata room) in a new folder under
    /// `parent`, their metadata, and starts everything; `port` and `port + 1` are used.
    pub async fn new(parent: &Path, region: u64, port: u16) -> Result<Bed, String> {
        let dir = tempfile::Builder::new()
            .prefix("drbd-bench-")
            .tempdir_in(parent)
            .map_err(|e| format!("{}: {e}", parent.display()))?;
        for name in ["raw-a", "raw-b", "solo", "alpha", "bravo", "nowhere"] {
            let path = dir.path().join(format!("{name}.img"));
            let f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let len = if name == "nowhere" {
                META_ROOM
            } else {
                region + META_ROOM
            };
            f.set_len(len).map_err(|e| e.to_string())?;
        }
        let conf = dir.path().join("drbd.conf");
        std::fs::write(&conf, config(dir.path(), port, "")).map_err(|e| e.to_string())?;
        let c = conf.to_string_lossy().to_string();
        for (node, res) in [("alpha", "r0"), ("bravo", "r0"), ("alpha", "solo")] {
            drbdadm(&["-c", &c, "--node", node, "create-md", "--force", res])?;
        }
        let raw = Arc::new(
            RawDisks::open(&dir.path().join("raw-a.img"), &dir.path().join("raw-b.img"))
                .map_err(|e| e.to_string())?,
        );
        let solo = start(&conf, "alpha", "solo").await?;
        admin(&solo, AdminRequest::Disconnect).await?;
        admin(&solo, AdminRequest::Primary { force: true }).await?;
        let alpha = start(&conf, "alpha", "r0").await?;
        let bravo = start(&conf, "bravo", "r0").await?;
        let connected = |s: &VolumeStatus| s.conn == ConnState::Connected;
        wait(&alpha, Duration::from_secs(30), connected).await?;
        wait(&bravo, Duration::from_secs(30), connected).await?;
        admin(&alpha, AdminRequest::NewCurrentUuid { clear_bitmap: true }).await?;
        wait(&alpha, Duration::from_secs(30), in_sync).await?;
        admin(&alpha, AdminRequest::Primary { force: false }).await?;
        wait(&bravo, Duration::from_secs(30), in_sync).await?;
        let net = Arc::new(
            NetLink::start("127.0.0.1")
                .await
                .map_err(|e| e.to_string())?,
        );
        Ok(Bed {
            dir,
            region,
            raw,
            solo,
            alpha,
            bravo,
            net,
            conf,
        })
    }

    /// The target of state `s`.
    pub fn target(&self, s: State) -> Arc<dyn Target> {
        match s {
            State::Raw => self.raw.clone(),
            State::Local => Arc::new(ReplicaTarget(self.solo.clone())),
            State::Replicated => Arc::new(ReplicaTarget(self.alpha.clone())),
            State::Net => self.net.clone(),
        }
    }

    /// R1: bravo disconnects, alpha writes `fraction` of the region's 4 KiB blocks (spread
    /// evenly), bravo connects again; returns the bytes resynced, the seconds from the
    /// established connection (bitmap exchange included) until both are UpToDate, and the
    /// seconds the connection took to establish.
    pub async fn resync(&self, fraction: f64) -> Result<(u64, f64, f64), String> {
        admin(&self.bravo, AdminRequest::Disconnect).await?;
        let blocks = self.region / 4096;
        let every = (1.0 / fraction).round().max(1.0) as u64;
        let dirty: Vec<u64> = (0..blocks).filter(|b| b % every == 0).collect();
        let data = bytes::Bytes::from(vec![0xa5u8; 4096]);
        let mut writes = tokio::task::JoinSet::new();
        for chunk in dirty.chunks(dirty.len().div_ceil(32).max(1)) {
            let alpha = self.alpha.clone();
            let chunk = chunk.to_vec();
            let data = data.clone();
            writes.spawn(async move {
                for b in chunk {
                    alpha.write(b * 4096, data.clone(), false).await?;
                }
                Ok::<_, drbd_core::replication::device::IoError>(())
            });
        }
        while let Some(r) = writes.join_next().await {
            r.map_err(|e| e.to_string())?
                .map_err(|e| format!("write: {e:?}"))?;
        }
        let t = Instant::now();
        admin(
            &self.bravo,
            AdminRequest::Connect {
                discard_my_data: false,
            },
        )
        .await?;
        let talking = |s: &VolumeStatus| s.conn >= ConnState::WfReportParams;
        wait(&self.bravo, Duration::from_secs(60), talking).await?;
        let connect_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        wait(&self.bravo, Duration::from_secs(600), in_sync).await?;
        let secs = t.elapsed().as_secs_f64();
        wait(&self.alpha, Duration::from_secs(60), in_sync).await?;
        Ok((dirty.len() as u64 * 4096, secs, connect_secs))
    }

    /// Stops the volumes.
    pub async fn shutdown(&self) {
        for r in [&self.solo, &self.alpha, &self.bravo] {
            r.shutdown().await;
        }
    }
}

/// The states a workload is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The two backing files written directly, at once.
    Raw,
    /// Our resource, disconnected.
    Local,
    /// Our resource, connected, protocol C.
    Replicated,
    /// The network alone.
    Net,
}

impl State {
    pub const ALL: [State; 4] = [State::Raw, State::Local, State::Replicated, State::Net];

    pub fn name(self) -> &'static str {
        match self {
            State::Raw => "raw",
            State::Local => "local",
            State::Replicated => "repl",
            State::Net => "net",
        }
    }
}
