//! `suspend-io` / `resume-io` and `pause-sync` / `resume-sync` between two `drbdd`, with
//! drbd-utils' exit codes and `drbdadm status` fields.

use std::sync::mpsc;
use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair, PairSpec};

fn pair(port: u16) -> Pair {
    let a = format!("127.0.0.1:{port}");
    let b = format!("127.0.0.2:{port}");
    Pair::new(PairSpec {
        addresses: [&a, &b],
        size_mib: 8,
        ..PairSpec::default()
    })
}

#[test]
fn suspend_io_holds_writes_until_resume_io() {
    let mut p = pair(7940);
    p.up_and_sync();
    p.adm_ok(0, &["suspend-io", "r0"]);
    // Twice is no error (nothing to do), as with drbdsetup.
    p.adm_ok(0, &["suspend-io", "r0"]);
    let status = p.adm_ok(0, &["status", "r0"]);
    assert!(
        status.starts_with("r0 role:Primary suspended:user\n"),
        "{status}"
    );
    let socket = p.nbd_socket(0);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = NbdClient::connect(&socket, "r0").expect("connect");
        let _ = tx.send(c.write(4096 * 9, &stamped_block(9, 4)).is_ok());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "a write completed while I/O was suspended"
    );
    // State queries answer while I/O is suspended.
    assert_eq!(p.cstate(0), "Connected");
    p.adm_ok(0, &["resume-io", "r0"]);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert!(p
        .adm_ok(0, &["status", "r0"])
        .starts_with("r0 role:Primary\n"));
    // Protocol C: the write is on both disks.
    p.wait_in_sync(Duration::from_secs(10));
    for i in 0..2 {
        assert_eq!(p.data(i, 10 * 4096)[9 * 4096..], stamped_block(9, 4)[..]);
    }
}

/// The sync-pause flag belongs to the node, not to one resync: set while Connected, the
/// next resync starts paused on both sides (the peer sees `resync-suspended:peer`).
#[test]
fn pause_sync_pauses_the_next_resync_until_resume_sync() {
    let mut p = pair(7941);
    for i in 0..2 {
        p.start(i);
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_until("connection", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
    });
    p.adm_ok(0, &["pause-sync", "r0"]);
    let again = p.adm(0, &["pause-sync", "r0"]);
    assert_eq!(again.code, 10, "{}{}", again.stdout, again.stderr);
    assert!(
        again
            .stderr
            .contains("Failure: (134) Sync-pause flag is already set"),
        "{}",
        again.stderr
    );
    p.adm_ok(0, &["primary", "--force", "r0"]);
    p.wait_until("paused resync", Duration::from_secs(10), |p| {
        p.cstate(0) == "PausedSyncS" && p.cstate(1) == "PausedSyncT"
    });
    let oos = p.statistic(0, "out-of-sync");
    // The whole data area (8 MiB less the internal metadata) is out of sync.
    assert!(oos > 8000, "{oos} KiB out of sync");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.statistic(1, "out-of-sync"), oos, "a paused resync moved");
    assert!(p.adm_ok(0, &["status", "r0"]).contains(
        "replication:PausedSyncS peer-disk:Inconsistent done:0.00 resync-suspended:user\n"
    ));
    assert!(p
        .adm_ok(1, &["status", "r0"])
        .contains("replication:PausedSyncT peer-disk:UpToDate done:0.00 resync-suspended:peer\n"));
    // bravo's own flag is clear: its resume-sync says who paused.
    let r = p.adm(1, &["resume-sync", "r0"]);
    assert_eq!(r.code, 10);
    assert!(
        r.stderr.contains("(157) Sync-pause flag is already cleared.\nNote: Resync pause caused by the peer node."),
        "{}",
        r.stderr
    );
    p.adm_ok(0, &["resume-sync", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    let r = p.adm(0, &["resume-sync", "r0"]);
    assert_eq!(r.code, 10);
    assert!(
        r.stderr
            .contains("(135) Sync-pause flag is already cleared"),
        "{}",
        r.stderr
    );
}
