//! `drbdd`'s control plane and `drbdadm`'s state commands, end to end: an in-process daemon
//! with a fake replication runtime, driven by `drbdadm` (in-process and as a process) and by
//! raw protocol lines; and the real `drbdd` binary's lifecycle (SIGTERM, a second daemon on
//! the same state directory, a stale socket).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drbd_cli::adm::{run, Io};
use drbd_cli::daemon::control::{self, Client, Command, Request};
use drbd_cli::daemon::{BoxFuture, Daemon, DaemonOptions, Replica, ReplicaFactory};
use drbd_core::config::model::ResourceModel;
use drbd_core::replication::status::{
    AdminError, AdminRequest, ResyncProgress, StateRefusal, VolumeStatus,
};
use drbd_core::state::{ConnState, DiskState, Role};

const CONF: &str = r#"
global { usage-count no; }
resource r0 {
  startup { wfc-timeout 1; }
  on alpha { device /dev/drbd0; disk /tmp/drbd-rs-test/a0.img; address 127.0.0.1:7789; meta-disk internal; }
  on bravo { device /dev/drbd0; disk /tmp/drbd-rs-test/b0.img; address 127.0.0.2:7789; meta-disk internal; }
}
resource r1 {
  volume 0 { device /dev/drbd1; disk /tmp/drbd-rs-test/a1.img; meta-disk internal; }
  volume 1 { device /dev/drbd2; disk /tmp/drbd-rs-test/a2.img; meta-disk internal; }
  on alpha { address 127.0.0.1:7790; }
  on bravo { address 127.0.0.2:7790; }
}
resource r2 {
  on charlie { device /dev/drbd5; disk /tmp/x; address 127.0.0.3:7791; meta-disk internal; }
  on delta { device /dev/drbd5; disk /tmp/x; address 127.0.0.4:7791; meta-disk internal; }
}
"#;

// ---------------------------------------------------------------------------------------------
// A fake replication runtime.

/// One fake running resource: its state is set by the tests and changed by requests the way
/// DRBD would change it (coarsely).
struct FakeReplica {
    peer: String,
    vols: Mutex<Vec<VolumeStatus>>,
    requests: Mutex<Vec<AdminRequest>>,
    shutdowns: Mutex<u32>,
    /// After a `connect`, become Connected after this long (None: stay WFConnection).
    connect_after: Option<Duration>,
}

impl FakeReplica {
    fn set(&self, f: impl Fn(&mut VolumeStatus)) {
        for v in self.vols.lock().unwrap().iter_mut() {
            f(v);
        }
    }
}

fn volume(vnr: u32, minor: u32) -> VolumeStatus {
    VolumeStatus {
        volume: u16::try_from(vnr).unwrap(),
        minor,
        role: Role::Secondary,
        peer_role: Role::Unknown,
        conn: ConnState::StandAlone,
        disk: DiskState::Inconsistent,
        peer_disk: DiskState::DUnknown,
        size_sectors: 2 * 1024 * 1024,
        out_of_sync_kib: 0,
        resync: None,
        protocol: 'C',
        uuids: [4, 0, 0, 0],
        pending_writes: 0,
        written_kib: 0,
        read_kib: 0,
        sent_kib: 0,
        received_kib: 0,
        standalone_reason: None,
        suspended: Default::default(),
    }
}

fn connected(v: &mut VolumeStatus) {
    v.conn = ConnState::Connected;
    v.peer_role = Role::Secondary;
    v.peer_disk = v.disk;
}

impl Replica for FakeReplica {
    fn status(&self) -> Vec<VolumeStatus> {
        self.vols.lock().unwrap().clone()
    }

    fn peer_name(&self) -> String {
        self.peer.clone()
    }

    fn request(&self, req: AdminRequest) -> BoxFuture<'_, Result<(), AdminError>> {
        Box::pin(async move {
            self.requests.lock().unwrap().push(req);
            let first = self.vols.lock().unwrap()[0].clone();
            match req {
                AdminRequest::Primary { force } => {
                    if !force && first.disk != DiskState::UpToDate {
                        return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
                    }
                    self.set(|v| {
                        v.role = Role::Primary;
                        v.disk = DiskState::UpToDate;
                    });
                }
                AdminRequest::Secondary => self.set(|v| v.role = Role::Secondary),
                AdminRequest::Attach => self.set(|v| v.disk = DiskState::UpToDate),
                AdminRequest::Detach => self.set(|v| v.disk = DiskState::Diskless),
                AdminRequest::Connect { .. } => {
                    self.set(|v| v.conn = ConnState::WfConnection);
                    if let Some(after) = self.connect_after {
                        tokio::time::sleep(after).await;
                        self.set(connected);
                    }
                }
                AdminRequest::Disconnect => self.set(|v| {
                    v.conn = ConnState::StandAlone;
                    v.peer_role = Role::Unknown;
                    v.peer_disk = DiskState::DUnknown;
                }),
                AdminRequest::InvalidateRemote | AdminRequest::Verify => {
                    if first.conn < ConnState::Connected {
                        return Err(AdminError::State(StateRefusal::NeedConnection));
                    }
                }
                AdminRequest::Invalidate
                | AdminRequest::Outdate
                | AdminRequest::NewCurrentUuid { .. }
                | AdminRequest::PauseSync
                | AdminRequest::ResumeSync
                | AdminRequest::SuspendIo
                | AdminRequest::ResumeIo => {}
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            *self.shutdowns.lock().unwrap() += 1;
        })
    }
}

#[derive(Default)]
struct FakeFactory {
    started: Mutex<Vec<(String, Arc<FakeReplica>)>>,
    /// Resources whose `up` fails with this error.
    refuse: Mutex<Option<(String, AdminError)>>,
    connect_after: Option<Duration>,
}

impl FakeFactory {
    fn replica(&self, name: &str) -> Arc<FakeReplica> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, r)| Arc::clone(r))
            .unwrap_or_else(|| panic!("{name} was never started"))
    }

    fn started_names(&self) -> Vec<String> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl ReplicaFactory for FakeFactory {
    fn start<'a>(
        &'a self,
        resource: &'a ResourceModel,
        node: &'a str,
        _state_dir: &'a Path,
    ) -> BoxFuture<'a, Result<Arc<dyn Replica>, AdminError>> {
        Box::pin(async move {
            assert_eq!(node, "alpha");
            if let Some((name, e)) = self.refuse.lock().unwrap().clone() {
                if name == resource.name {
                    return Err(e);
                }
            }
            let replica = Arc::new(FakeReplica {
                peer: resource.peer_name.clone().unwrap_or_default(),
                vols: Mutex::new(
                    resource
                        .volumes
                        .iter()
                        .map(|v| volume(v.vnr, v.minor))
                        .collect(),
                ),
                requests: Mutex::new(Vec::new()),
                shutdowns: Mutex::new(0),
                connect_after: self.connect_after,
            });
            self.started
                .lock()
                .unwrap()
                .push((resource.name.clone(), Arc::clone(&replica)));
            Ok(replica as Arc<dyn Replica>)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: a daemon in-process, drbdadm in-process.

struct Harness {
    rt: tokio::runtime::Runtime,
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    conf: PathBuf,
    factory: Arc<FakeFactory>,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Harness {
    fn new() -> Harness {
        Harness::with_factory(FakeFactory::default())
    }

    fn with_factory(factory: FakeFactory) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("drbd.conf");
        std::fs::write(&conf, CONF).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let factory = Arc::new(factory);
        let opts = DaemonOptions {
            config: conf.clone(),
            node: "alpha".into(),
            state_dir: dir.path().join("state"),
            nbd_tcp: None,
        };
        let daemon = rt
            .block_on(Daemon::start(
                opts,
                Arc::clone(&factory) as Arc<dyn ReplicaFactory>,
            ))
            .unwrap();
        Harness {
            rt,
            daemon: Some(daemon),
            dir,
            conf,
            factory,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        control::socket_path(&self.state_dir())
    }

    /// Runs drbdadm in-process against this daemon.
    fn adm(&self, args: &[&str]) -> Out {
        adm_with(&self.conf, &self.state_dir(), "alpha", args)
    }

    fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            self.rt.block_on(d.shutdown());
        }
    }
}

fn adm_with(conf: &Path, state_dir: &Path, node: &str, args: &[&str]) -> Out {
    let mut argv: Vec<String> = vec![
        "-c".into(),
        conf.display().to_string(),
        "--node".into(),
        node.into(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let mut input: &[u8] = b"";
    let mut io = Io {
        stdout: &mut o,
        stderr: &mut e,
        stdin: &mut input,
        interactive: false,
    };
    let code = run(&argv, &mut io);
    Out {
        code,
        stdout: String::from_utf8(o).unwrap(),
        stderr: String::from_utf8(e).unwrap(),
    }
}

#[track_caller]
fn ok(out: &Out) -> &str {
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    &out.stdout
}

// ---------------------------------------------------------------------------------------------
// drbdadm against the in-process daemon.

#[test]
fn up_role_cstate_dstate_status_and_down() {
    let mut h = Harness::new();
    ok(&h.adm(&["up", "r0"]));
    assert_eq!(h.factory.started_names(), ["r0"]);
    // A second `up` is a no-op.
    ok(&h.adm(&["up", "r0"]));
    assert_eq!(h.factory.started_names(), ["r0"]);

    let r = h.factory.replica("r0");
    assert_eq!(r.peer, "bravo");
    assert_eq!(ok(&h.adm(&["role", "r0"])), "Secondary/Unknown\n");
    assert_eq!(ok(&h.adm(&["state", "r0"])), "Secondary/Unknown\n");
    assert_eq!(ok(&h.adm(&["cstate", "r0"])), "StandAlone\n");
    assert_eq!(ok(&h.adm(&["dstate", "r0"])), "Inconsistent/DUnknown\n");
    assert_eq!(
        ok(&h.adm(&["status", "r0"])),
        "r0 role:Secondary\n  disk:Inconsistent\n  bravo connection:StandAlone\n\n"
    );

    ok(&h.adm(&["attach", "r0"]));
    ok(&h.adm(&["connect", "r0"]));
    assert_eq!(ok(&h.adm(&["cstate", "r0"])), "WFConnection\n");
    assert_eq!(
        ok(&h.adm(&["status", "r0"])),
        "r0 role:Secondary\n  disk:UpToDate\n  bravo connection:Connecting\n\n"
    );

    r.set(connected);
    ok(&h.adm(&["primary", "r0"]));
    assert_eq!(ok(&h.adm(&["role", "r0"])), "Primary/Secondary\n");
    assert_eq!(ok(&h.adm(&["cstate", "r0"])), "Connected\n");
    assert_eq!(ok(&h.adm(&["dstate", "r0"])), "UpToDate/UpToDate\n");
    assert_eq!(
        ok(&h.adm(&["status", "r0"])),
        "r0 role:Primary\n  disk:UpToDate\n  bravo role:Secondary\n    peer-disk:UpToDate\n\n"
    );
    // Without a resource, status shows every resource of the node that is up... and says
    // which are not.
    let all = h.adm(&["status"]);
    assert_eq!(all.code, 10, "{all:?}");
    assert!(all.stdout.starts_with("r0 role:Primary\n"), "{all:?}");
    assert_eq!(
        all.stderr,
        "r1: No such resource\nCommand 'drbdsetup-84 status r1' terminated with exit code 10\n"
    );

    // Resync in progress, paused, with statistics.
    r.set(|v| {
        v.conn = ConnState::SyncSource;
        v.peer_disk = DiskState::Inconsistent;
        v.out_of_sync_kib = 605_143;
        v.sent_kib = 443_433;
        v.resync = Some(ResyncProgress {
            total_blocks: 262_144,
            remaining_blocks: 151_257,
            rate_kib_s: 40_960,
            eta_s: 14,
            paused_user: false,
            paused_peer: false,
        });
    });
    assert_eq!(ok(&h.adm(&["cstate", "r0"])), "SyncSource\n");
    assert_eq!(ok(&h.adm(&["dstate", "r0"])), "UpToDate/Inconsistent\n");
    assert_eq!(
        ok(&h.adm(&["status", "r0"])),
        "r0 role:Primary\n  disk:UpToDate\n  bravo role:Secondary\n    replication:SyncSource peer-disk:Inconsistent done:42.30\n\n"
    );
    assert_eq!(
        ok(&h.adm(&["status", "--statistics", "r0"])),
        "r0 role:Primary\n  disk:UpToDate\n      read:0 written:0\n  bravo role:Secondary\n    replication:SyncSource peer-disk:Inconsistent done:42.30\n        received:0 sent:443433 out-of-sync:605143 dbdt1:40.00 eta:14\n\n"
    );
    r.set(|v| {
        v.conn = ConnState::PausedSyncS;
        if let Some(p) = v.resync.as_mut() {
            p.paused_user = true;
        }
    });
    assert_eq!(
        ok(&h.adm(&["status", "r0"])),
        "r0 role:Primary\n  disk:UpToDate\n  bravo role:Secondary\n    replication:PausedSyncS peer-disk:Inconsistent done:42.30 resync-suspended:user\n\n"
    );
    assert_eq!(
        ok(&h.adm(&["status", "--verbose", "r0"])),
        "r0 role:Primary suspended:no\n  volume:0 minor:0 disk:UpToDate\n  bravo connection:Connected role:Secondary\n    volume:0 replication:PausedSyncS peer-disk:Inconsistent done:42.30 resync-suspended:user\n\n"
    );

    // The requests reached the replica with their options.
    ok(&h.adm(&["connect", "--discard-my-data", "r0"]));
    ok(&h.adm(&["new-current-uuid", "--clear-bitmap", "r0"]));
    ok(&h.adm(&["primary", "--force", "r0"]));
    for c in [
        "secondary",
        "detach",
        "disconnect",
        "invalidate",
        "pause-sync",
        "resume-sync",
        "suspend-io",
        "resume-io",
    ] {
        ok(&h.adm(&[c, "r0"]));
    }
    let reqs = r.requests.lock().unwrap().clone();
    assert_eq!(
        reqs,
        [
            AdminRequest::Attach,
            AdminRequest::Connect {
                discard_my_data: false
            },
            AdminRequest::Primary { force: false },
            AdminRequest::Connect {
                discard_my_data: true
            },
            AdminRequest::NewCurrentUuid { clear_bitmap: true },
            AdminRequest::Primary { force: true },
            AdminRequest::Secondary,
            AdminRequest::Detach,
            AdminRequest::Disconnect,
            AdminRequest::Invalidate,
            AdminRequest::PauseSync,
            AdminRequest::ResumeSync,
            AdminRequest::SuspendIo,
            AdminRequest::ResumeIo,
        ]
    );

    // down shuts the replica down and forgets it; a second down is a no-op.
    ok(&h.adm(&["down", "r0"]));
    assert_eq!(*r.shutdowns.lock().unwrap(), 1);
    ok(&h.adm(&["down", "r0"]));
    let role = h.adm(&["role", "r0"]);
    assert_eq!(role.code, 10, "{role:?}");
    h.stop();
    assert_eq!(*r.shutdowns.lock().unwrap(), 1);
}

#[test]
fn refused_state_changes() {
    let mut h = Harness::new();
    ok(&h.adm(&["up", "r0"]));
    let out = h.adm(&["primary", "r0"]);
    assert_eq!(out.code, 17, "{out:?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "0: State change failed: (-2) Need access to UpToDate data\n\
         Command 'drbdsetup-84 primary 0' terminated with exit code 17\n"
    );
    let out = h.adm(&["invalidate-remote", "r0"]);
    assert_eq!(out.code, 11, "{out:?}");
    assert_eq!(
        out.stderr,
        "0: State change failed: (-15) Need a connection to start verify or resync\n\
         Command 'drbdsetup-84 invalidate-remote 0' terminated with exit code 11\n"
    );
    h.stop();
}

#[test]
fn unknown_and_not_up_resources() {
    let mut h = Harness::new();
    // Not in the configuration, or not for this node: drbdadm's own message and exit code 1.
    for res in ["foo", "r2"] {
        for cmd in ["up", "role", "primary", "status", "wait-connect", "down"] {
            let out = h.adm(&[cmd, res]);
            assert_eq!(out.code, 1, "{cmd} {res}: {out:?}");
            assert_eq!(
                out.stderr,
                format!("'{res}' not defined in your config (for this host).\n")
            );
        }
    }
    let out = h.adm(&["role", "r1/7"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "'r1/7' not defined in your config (for this host).\n"
    );
    // Configured but not up: drbdsetup's answers, exit code 10.
    let out = h.adm(&["role", "r0"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert_eq!(
        out.stderr,
        "0: Failure: (127) Device minor not allocated\nadditional info from drbdd:\nresource 'r0' is not up\n\
         Command 'drbdsetup-84 role 0' terminated with exit code 10\n"
    );
    let out = h.adm(&["connect", "r1"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert_eq!(
        out.stderr,
        "r1: Failure: (158) Unknown resource\nadditional info from drbdd:\nresource 'r1' is not up\n\
         Command 'drbdsetup-84 connect r1 ipv4:127.0.0.1:7790 ipv4:127.0.0.2:7790' terminated with exit code 10\n"
    );
    let out = h.adm(&["status", "r0"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert_eq!(
        out.stderr,
        "r0: No such resource\nCommand 'drbdsetup-84 status r0' terminated with exit code 10\n"
    );
    let out = h.adm(&["primary", "r1/1"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert!(
        out.stderr
            .starts_with("2: Failure: (127) Device minor not allocated\n"),
        "{out:?}"
    );
    // down of a resource that is not up succeeds.
    ok(&h.adm(&["down", "r0"]));
    h.stop();
}

#[test]
fn up_failure_is_reported() {
    let factory = FakeFactory::default();
    *factory.refuse.lock().unwrap() = Some((
        "r1".into(),
        AdminError::Other {
            exit_code: 10,
            message: "Failure: (104) Can not open backing device.".into(),
        },
    ));
    let mut h = Harness::with_factory(factory);
    let out = h.adm(&["up", "all"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert_eq!(
        out.stderr,
        "r1: Failure: (104) Can not open backing device.\n"
    );
    assert_eq!(h.factory.started_names(), ["r0"]);
    h.stop();
}

#[test]
fn all_and_volumes() {
    let mut h = Harness::new();
    ok(&h.adm(&["up", "all"]));
    // This node's resources in configuration order; r2 belongs to other nodes.
    assert_eq!(h.factory.started_names(), ["r0", "r1"]);
    assert_eq!(
        ok(&h.adm(&["role", "all"])),
        "Secondary/Unknown\nSecondary/Unknown\nSecondary/Unknown\n"
    );
    h.factory.replica("r1").vols.lock().unwrap()[1].disk = DiskState::UpToDate;
    assert_eq!(
        ok(&h.adm(&["dstate", "r1"])),
        "Inconsistent/DUnknown\nUpToDate/DUnknown\n"
    );
    assert_eq!(ok(&h.adm(&["dstate", "r1/1"])), "UpToDate/DUnknown\n");
    // minor-2 is r1's volume 1.
    assert_eq!(ok(&h.adm(&["dstate", "minor-2"])), "UpToDate/DUnknown\n");
    assert_eq!(
        ok(&h.adm(&["status", "r1"])),
        "r1 role:Secondary\n  volume:0 disk:Inconsistent\n  volume:1 disk:UpToDate\n  bravo connection:StandAlone\n\n"
    );
    h.factory.replica("r1").set(connected);
    assert_eq!(
        ok(&h.adm(&["status", "all"])),
        "r0 role:Secondary\n  disk:Inconsistent\n  bravo connection:StandAlone\n\n\
         r1 role:Secondary\n  volume:0 disk:Inconsistent\n  volume:1 disk:UpToDate\n  bravo role:Secondary\n    volume:0 peer-disk:Inconsistent\n    volume:1 peer-disk:UpToDate\n\n"
    );

    // `primary all`: r0 is refused, r1 is not tried on without UpToDate either; the exit code
    // is the refusal's and both are reported.
    let out = h.adm(&["primary", "all"]);
    assert_eq!(out.code, 17, "{out:?}");
    assert_eq!(
        out.stderr,
        "0: State change failed: (-2) Need access to UpToDate data\n\
         Command 'drbdsetup-84 primary 0' terminated with exit code 17\n\
         1: State change failed: (-2) Need access to UpToDate data\n\
         Command 'drbdsetup-84 primary 1' terminated with exit code 17\n"
    );
    // The role is the resource's: a volume may be named.
    ok(&h.adm(&["primary", "--force", "r1/1"]));
    assert_eq!(ok(&h.adm(&["role", "r1/0"])), "Primary/Secondary\n");

    // Whole-resource commands refuse a volume, as drbdadm does.
    for cmd in ["connect", "disconnect", "down", "status"] {
        let out = h.adm(&[cmd, "r1/1"]);
        assert_eq!(out.code, 1, "{out:?}");
        assert_eq!(
            out.stderr,
            format!("{cmd} operates on whole resources, but you specified a specific volume!\n")
        );
    }
    // Per-volume device commands on a multi-volume resource need per-volume requests, which
    // the runtime interface does not have yet.
    let out = h.adm(&["attach", "r1/1"]);
    assert_eq!(out.code, 20, "{out:?}");
    assert!(out.stderr.contains("not supported yet"), "{out:?}");
    // On a single-volume resource, RES/0 is the resource.
    ok(&h.adm(&["attach", "r0/0"]));

    ok(&h.adm(&["down", "all"]));
    assert_eq!(*h.factory.replica("r0").shutdowns.lock().unwrap(), 1);
    assert_eq!(*h.factory.replica("r1").shutdowns.lock().unwrap(), 1);
    h.stop();
}

#[test]
fn usage_errors() {
    let mut h = Harness::new();
    let out = h.adm(&["primary"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.ends_with("No resource names specified\n"),
        "{out:?}"
    );
    let out = h.adm(&["role", "--force", "r0"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "drbdadm: unrecognized option '--force'\ntry 'drbdadm help role'\n"
    );
    let out = h.adm(&["primary", "--discard-my-data", "r0"]);
    assert_eq!(out.code, 1, "{out:?}");
    let out = h.adm(&["dump", "--statistics", "r0"]);
    assert_eq!(out.code, 1, "{out:?}");
    // -d prints the drbdsetup calls instead of running them (no daemon needed).
    let out = adm_with(
        &h.conf,
        Path::new("/nonexistent"),
        "alpha",
        &["-d", "up", "r1"],
    );
    assert_eq!(
        ok(&out),
        "drbdsetup-84 new-resource r1\n\
         drbdsetup-84 new-minor r1 1 0\n\
         drbdsetup-84 new-minor r1 2 1\n\
         drbdsetup-84 attach 1 /tmp/drbd-rs-test/a1.img /tmp/drbd-rs-test/a1.img internal\n\
         drbdsetup-84 attach 2 /tmp/drbd-rs-test/a2.img /tmp/drbd-rs-test/a2.img internal\n\
         drbdsetup-84 connect r1 ipv4:127.0.0.1:7790 ipv4:127.0.0.2:7790\n"
    );
    let out = adm_with(
        &h.conf,
        Path::new("/nonexistent"),
        "alpha",
        &["-d", "wait-connect", "all"],
    );
    assert_eq!(
        ok(&out),
        "drbdsetup-84 wait-connect 0 --wfc-timeout=1\n\
         drbdsetup-84 wait-connect 1\n\
         drbdsetup-84 wait-connect 2\n"
    );
    h.stop();
}

#[test]
fn node_mismatch_is_refused() {
    let mut h = Harness::new();
    // bravo's drbdadm against alpha's daemon (same state dir): refused, not misapplied.
    let out = adm_with(&h.conf, &h.state_dir(), "bravo", &["role", "r0"]);
    assert_eq!(out.code, 20, "{out:?}");
    assert!(
        out.stderr
            .starts_with("drbdd runs as node 'alpha', but the request was made for node 'bravo'"),
        "{out:?}"
    );
    h.stop();
}

#[test]
fn wait_connect_polls_until_connected_or_times_out() {
    let mut h = Harness::with_factory(FakeFactory {
        connect_after: Some(Duration::from_millis(300)),
        ..FakeFactory::default()
    });
    ok(&h.adm(&["up", "r0"]));
    // Nobody connects: wfc-timeout 1 ends it with exit code 5.
    let t0 = Instant::now();
    let out = h.adm(&["wait-connect", "r0"]);
    let took = t0.elapsed();
    assert_eq!(out.code, 5, "{out:?}");
    assert_eq!(
        out.stderr,
        "Command 'drbdsetup-84 wait-connect 0 --wfc-timeout=1' terminated with exit code 5\n"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Connect in the background (the fake connects 300 ms after the request); wait-connect
    // returns once it is Connected.
    let sock = h.socket();
    let connector = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).unwrap();
        let mut req = Request::new(Command::Connect, "r0");
        req.node = Some("alpha".into());
        c.call(&req).unwrap()
    });
    let t0 = Instant::now();
    let out = h.adm(&["wait-connect", "r0"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(connector.join().unwrap().exit_code, 0);
    assert_eq!(ok(&h.adm(&["cstate", "r0"])), "Connected\n");
    // A resync state counts as connected.
    h.factory
        .replica("r0")
        .set(|v| v.conn = ConnState::SyncTarget);
    ok(&h.adm(&["wait-connect", "r0"]));
    // Not up: the daemon's answer, under wait-connect's name.
    let out = h.adm(&["wait-connect", "r1"]);
    assert_eq!(out.code, 10, "{out:?}");
    assert!(
        out.stderr
            .ends_with("Command 'drbdsetup-84 wait-connect 1' terminated with exit code 10\n"),
        "{out:?}"
    );
    h.stop();
}

#[test]
fn daemon_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    std::fs::write(&conf, CONF).unwrap();
    let state = dir.path().join("state");
    for cmd in ["up", "role", "status", "wait-connect"] {
        let out = adm_with(&conf, &state, "alpha", &[cmd, "r0"]);
        assert_eq!(out.code, 20, "{out:?}");
        assert_eq!(
            out.stderr,
            format!(
                "drbdd is not running (no control socket at {})\n",
                state.join("drbdd.sock").display()
            )
        );
    }
    // A socket file nobody listens on is the same.
    std::fs::create_dir_all(&state).unwrap();
    drop(std::os::unix::net::UnixListener::bind(state.join("drbdd.sock")).unwrap());
    let out = adm_with(&conf, &state, "alpha", &["role", "r0"]);
    assert_eq!(out.code, 20, "{out:?}");
    assert!(out.stderr.starts_with("drbdd is not running"), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// The protocol itself.

fn raw_call(stream: &mut BufReader<UnixStream>, line: &[u8]) -> serde_json::Value {
    stream.get_mut().write_all(line).unwrap();
    let mut resp = String::new();
    stream.read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
}

#[test]
fn protocol_round_trip_and_malformed_requests() {
    let mut h = Harness::new();
    ok(&h.adm(&["up", "r0"]));
    let mut s = BufReader::new(UnixStream::connect(h.socket()).unwrap());
    let v = raw_call(
        &mut s,
        b"{\"command\":\"role\",\"resource\":\"r0\",\"node\":\"alpha\"}\n",
    );
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["stdout"], "Secondary/Unknown\n");
    assert_eq!(v["stderr"], "");
    // Bad requests get an error and the connection stays usable.
    for bad in [
        &b"this is not json\n"[..],
        b"{\"command\":\"self-destruct\",\"resource\":\"r0\"}\n",
        b"{\"command\":\"role\",\"resource\":\"r0\",\"options\":{\"forse\":true}}\n",
        b"{\"command\":\"role\",\"resource\":7}\n",
        b"\xff\xfe\xfd\n",
    ] {
        let v = raw_call(&mut s, bad);
        assert_eq!(v["exit_code"], 20, "{v}");
        assert!(
            v["stderr"]
                .as_str()
                .unwrap()
                .starts_with("drbdd: malformed request"),
            "{v}"
        );
    }
    let v = raw_call(&mut s, b"{\"command\":\"role\"}\n");
    assert_eq!(v["exit_code"], 1, "{v}");
    // Blank lines are skipped; the next request is answered.
    let v = raw_call(
        &mut s,
        b"\n\n{\"command\":\"cstate\",\"resource\":\"r0\"}\n",
    );
    assert_eq!(v["stdout"], "StandAlone\n");

    // A line over 64 KiB: an error, then the connection is closed.
    let mut huge = vec![b'x'; control::MAX_REQUEST_LINE + 10];
    huge.push(b'\n');
    let v = raw_call(&mut s, &huge);
    assert_eq!(v["exit_code"], 20);
    assert!(
        v["stderr"].as_str().unwrap().contains("longer than 65536"),
        "{v}"
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());

    // The daemon carries on.
    let mut c = Client::connect(&h.socket()).unwrap();
    let resp = c.call(&Request::new(Command::Dstate, "r0")).unwrap();
    assert_eq!(resp.stdout, "Inconsistent/DUnknown\n");
    h.stop();
}

#[test]
fn many_concurrent_clients() {
    let mut h = Harness::new();
    ok(&h.adm(&["up", "all"]));
    let sock = h.socket();
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).unwrap();
                for _ in 0..20 {
                    let res = if i % 2 == 0 { "r0" } else { "r1" };
                    let resp = c.call(&Request::new(Command::Status, res)).unwrap();
                    assert_eq!(resp.exit_code, 0, "{resp:?}");
                    assert!(resp.stdout.starts_with(&format!("{res} role:")));
                }
            })
        })
        .collect();
    // Clients that connect and go away mid-request do no harm either.
    for _ in 0..16 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"command\":\"sta").unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    h.stop();
    assert!(!sock.exists(), "socket removed on shutdown");
    // Shutdown shut every running resource down.
    for r in ["r0", "r1"] {
        assert_eq!(*h.factory.replica(r).shutdowns.lock().unwrap(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// The real binaries.

struct Proc_ {
    child: Child,
}

impl Drop for Proc_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_drbdd(conf: &Path, state: &Path) -> Proc_ {
    let child = Proc::new(env!("CARGO_BIN_EXE_drbdd"))
        .args(["-c"])
        .arg(conf)
        .args(["--node", "alpha", "--state-dir"])
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc_ { child }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(p: &mut Proc_) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "drbdd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn drbdadm_bin(conf: &Path, state: &Path, args: &[&str]) -> std::process::Output {
    Proc::new(env!("CARGO_BIN_EXE_drbdadm"))
        .arg("-c")
        .arg(conf)
        .args(["--node", "alpha", "--state-dir"])
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn drbdd_process_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    std::fs::write(&conf, CONF).unwrap();
    // The state directory does not exist yet, and a stale socket is left in it later.
    let state = dir.path().join("run").join("drbd-rs");
    let sock = state.join("drbdd.sock");

    let mut d = spawn_drbdd(&conf, &state);
    wait_for("the control socket", || UnixStream::connect(&sock).is_ok());

    // A second daemon on the same state directory refuses to start.
    let mut second = spawn_drbdd(&conf, &state);
    let status = wait_exit(&mut second);
    assert_eq!(status.code(), Some(20));
    let mut err = String::new();
    second
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("another drbdd is already running"), "{err}");
    assert!(sock.exists(), "the second daemon left the socket alone");

    // drbdadm against it: the resource is not up; up fails because the backing disk of the
    // test configuration does not exist.
    let out = drbdadm_bin(&conf, &state, &["role", "r0"]);
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .starts_with("0: Failure: (127) Device minor not allocated"),
        "{out:?}"
    );
    let out = drbdadm_bin(&conf, &state, &["up", "r0"]);
    assert_eq!(out.status.code(), Some(10), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("r0: ") && err.contains("No such file or directory"),
        "{err}"
    );

    // SIGTERM: clean exit, socket removed.
    let pid = d.child.id().to_string();
    let kill = Proc::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut d);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!sock.exists(), "socket removed");
    let mut log = String::new();
    d.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("SIGTERM received"), "{log}");

    // Now drbdadm says so.
    let out = drbdadm_bin(&conf, &state, &["role", "r0"]);
    assert_eq!(out.status.code(), Some(20), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "drbdd is not running (no control socket at {})\n",
            sock.display()
        )
    );

    // A stale socket (a daemon that was killed) is removed at the next start; SIGINT works too.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut d = spawn_drbdd(&conf, &state);
    wait_for("the control socket", || UnixStream::connect(&sock).is_ok());
    let pid = d.child.id().to_string();
    assert!(Proc::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(wait_exit(&mut d).code(), Some(0));
    assert!(!sock.exists());
}

#[test]
fn drbdd_refuses_bad_configuration_and_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    std::fs::write(&conf, "resource r0 { on alpha { bogus; } }\n").unwrap();
    let state = dir.path().join("state");
    let mut d = spawn_drbdd(&conf, &state);
    let status = wait_exit(&mut d);
    assert_eq!(status.code(), Some(10), "{status:?}");
    assert!(!state.join("drbdd.sock").exists());

    let missing = dir.path().join("missing.conf");
    let mut d = spawn_drbdd(&missing, &state);
    assert_eq!(wait_exit(&mut d).code(), Some(20));

    let out = Proc::new(env!("CARGO_BIN_EXE_drbdd"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Proc::new(env!("CARGO_BIN_EXE_drbdd"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("/run/drbd-rs"), "{help}");
    assert!(help.contains("--node"), "{help}");
    let out = Proc::new(env!("CARGO_BIN_EXE_drbdd"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("drbdd "));
}

// ---------------------------------------------------------------------------------------------
// The drbdsetup calls named in messages and printed by -d, against drbd-utils' drbdadm-84.

const ORACLE: &str = "/usr/lib/drbd/drbdadm-84";

/// drbdadm -d output without the node banner, drbdmeta calls (ours has no separate metadata
/// step) and the oracle's install path.
fn setup_calls(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| l.trim().trim_start_matches("/usr/lib/drbd/").to_string())
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("drbdmeta ")
                && !l.starts_with("found __DRBD_NODE__")
                && !l.starts_with("PRETENDING")
        })
        .collect()
}

#[test]
fn dry_run_and_errors_match_drbdadm_84() {
    if !Path::new(ORACLE).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{ORACLE} is missing under CI: .ci/run must install drbd-utils"
        );
        eprintln!("SKIP: {ORACLE} not installed (apt-get install drbd-utils); parity not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    std::fs::write(&conf, CONF).unwrap();
    let commands: &[&[&str]] = &[
        &["up"],
        &["down"],
        &["attach"],
        &["detach"],
        &["connect"],
        &["connect", "--discard-my-data"],
        &["disconnect"],
        &["primary"],
        &["primary", "--force"],
        &["secondary"],
        &["invalidate"],
        &["invalidate-remote"],
        &["new-current-uuid"],
        &["new-current-uuid", "--clear-bitmap"],
        &["pause-sync"],
        &["resume-sync"],
        &["wait-connect"],
        &["role"],
        &["cstate"],
        &["dstate"],
        &["status"],
    ];
    let mut checked = 0;
    for cmd in commands {
        for target in ["r0", "r1", "r1/1", "all", "minor-2", "foo", "r2", "r1/7"] {
            let mut args: Vec<&str> = vec!["-d"];
            args.extend_from_slice(cmd);
            args.push(target);
            let theirs = Proc::new(ORACLE)
                .env("DRBD_DONT_WARN_ON_VERSION_MISMATCH", "1")
                .env("__DRBD_NODE__", "alpha")
                .arg("-c")
                .arg(&conf)
                .args(&args)
                .output()
                .unwrap();
            let ours = adm_with(&conf, Path::new("/nonexistent"), "alpha", &args);
            let what = format!("drbdadm {}", args.join(" "));
            assert_eq!(
                Some(ours.code),
                theirs.status.code(),
                "{what}: ours {ours:?}\ntheirs {theirs:?}"
            );
            assert_eq!(
                ours.stdout.lines().map(str::to_string).collect::<Vec<_>>(),
                setup_calls(&theirs.stdout),
                "{what}"
            );
            if ours.code != 0 {
                // The same message (theirs adds the node banner on stderr).
                let theirs_err = setup_calls(&theirs.stderr);
                assert_eq!(
                    ours.stderr.lines().last(),
                    theirs_err.last().map(String::as_str),
                    "{what}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, commands.len() * 8);
}

#[test]
fn node_name_from_the_environment_then_the_host_name() {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim().to_string();
    if ["alpha", "bravo", ""].contains(&host.as_str())
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        eprintln!("SKIP: this test needs a host name other than the test's node names ({host:?})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drbd.conf");
    // r3 names this machine's host name as one of its nodes.
    let text = format!(
        "{CONF}resource r3 {{\n  on {host} {{ device /dev/drbd7; disk /tmp/x; address 127.0.0.5:7792; meta-disk internal; }}\n  on bravo {{ device /dev/drbd7; disk /tmp/x; address 127.0.0.6:7792; meta-disk internal; }}\n}}\n"
    );
    std::fs::write(&conf, text).unwrap();
    let state = dir.path().join("state");
    let mut d = spawn_drbdd(&conf, &state);
    wait_for("the control socket", || {
        UnixStream::connect(state.join("drbdd.sock")).is_ok()
    });
    // drbdadm without --node: $DRBD_NODE, then $__DRBD_NODE__, then the host name.
    let role = |res: &str, env: &[(&str, &str)]| {
        let mut c = Proc::new(env!("CARGO_BIN_EXE_drbdadm"));
        c.arg("-c")
            .arg(&conf)
            .arg("--state-dir")
            .arg(&state)
            .args(["role", res])
            .env_remove("DRBD_NODE")
            .env_remove("__DRBD_NODE__")
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The daemon's own node: the request reaches the resource (not up: 127).
    let (code, err) = role("r0", &[("DRBD_NODE", "alpha")]);
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains("(127) Device minor not allocated"), "{err}");
    let (code, err) = role("r0", &[("__DRBD_NODE__", "alpha")]);
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains("(127) Device minor not allocated"), "{err}");
    // Another node's name is refused by this node's daemon; $DRBD_NODE comes first.
    let (code, err) = role("r0", &[("DRBD_NODE", "bravo"), ("__DRBD_NODE__", "alpha")]);
    assert_eq!(code, Some(20), "{err}");
    assert!(err.contains("for node 'bravo'"), "{err}");
    let (code, err) = role("r0", &[("__DRBD_NODE__", "bravo")]);
    assert_eq!(code, Some(20), "{err}");
    assert!(err.contains("for node 'bravo'"), "{err}");
    // Neither: the host name, which r0 does not know (drbdadm's own message, exit 1) and r3 does
    // (the request reaches the daemon as the host's, which this daemon is not).
    let (code, err) = role("r0", &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("'r0' not defined in your config (for this host)"),
        "{err}"
    );
    let (code, err) = role("r3", &[]);
    assert_eq!(code, Some(20), "{err}");
    assert!(err.contains(&format!("for node '{host}'")), "{err}");
    let _ = d.child.kill();
    let _ = d.child.wait();
}
