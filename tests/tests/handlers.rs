//! drbd.conf handlers run at DRBD's moments with DRBD's environment: before/after a resync,
//! on a split brain; a handler that hangs does not hold up the daemon.

use std::time::{Duration, Instant};

use tests::{stamped_block, NbdClient, Pair, PairSpec};

#[test]
fn handlers_run_with_drbds_environment_and_never_wedge_the_daemon() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().display().to_string();
    // Each node appends "HANDLER RESOURCE MINOR PEER_ADDRESS" to events.<its peer's name>;
    // the split-brain handler then hangs for a while.
    let line = |h: &str| {
        format!(
            "{h} \"echo {h} $DRBD_RESOURCE $DRBD_MINOR $DRBD_PEER_ADDRESS >> {out}/events.$DRBD_PEER{}\";",
            if h == "split-brain" { "; sleep 20" } else { "" }
        )
    };
    let handlers: String = [
        "before-resync-target",
        "after-resync-target",
        "before-resync-source",
        "initial-split-brain",
        "split-brain",
    ]
    .iter()
    .map(|h| line(h))
    .collect::<Vec<_>>()
    .join(" ");
    let resource_extra = format!("    handlers {{ {handlers} }}");
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7880", "127.0.0.2:7880"],
        size_mib: 8,
        resource_extra: &resource_extra,
        ..PairSpec::default()
    });
    p.up_and_sync();
    let events = |peer: &str| {
        std::fs::read_to_string(dir.path().join(format!("events.{peer}"))).unwrap_or_default()
    };
    // bravo (peer alpha) was SyncTarget, alpha (peer bravo) SyncSource.
    p.wait_until("resync handlers", Duration::from_secs(10), |_| {
        events("alpha").contains("after-resync-target")
    });
    assert_eq!(
        events("alpha"),
        "before-resync-target r0 0 127.0.0.1\nafter-resync-target r0 0 127.0.0.1\n"
    );
    assert_eq!(events("bravo"), "before-resync-source r0 0 127.0.0.2\n");

    // A split brain: both Primary and writing while disconnected.
    for i in 0..2 {
        p.adm_ok(i, &["disconnect", "r0"]);
    }
    p.adm_ok(1, &["primary", "r0"]);
    for i in 0..2 {
        let mut nbd = NbdClient::connect(&p.nbd_socket(i), "r0").expect("NBD connect");
        nbd.write(4096 * (10 + i as u64), &stamped_block(10, i as u64))
            .expect("write");
    }
    for i in 0..2 {
        p.adm_ok(i, &["connect", "r0"]);
    }
    p.wait_until("split brain handlers", Duration::from_secs(20), |_| {
        events("alpha").contains("\nsplit-brain") && events("bravo").contains("\nsplit-brain")
    });
    for peer in ["alpha", "bravo"] {
        let e = events(peer);
        let initial = e
            .find("initial-split-brain")
            .expect("initial-split-brain ran");
        let unresolved = e.find("\nsplit-brain").expect("split-brain ran");
        assert!(initial < unresolved, "{e}");
    }
    // The split-brain handlers still run (sleep 20): the daemons answer meanwhile.
    for i in 0..2 {
        let t = Instant::now();
        assert_eq!(p.cstate(i), "StandAlone");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "node {i} answered slowly"
        );
    }
}

/// before-resync-target runs before the SyncTarget overwrites anything and the resync waits
/// for it (it sees WFSyncUUID, and drbdadm keeps answering meanwhile); a non-zero exit drops
/// the connection with the data left as it was. The SyncSource, fencing, runs unfence-peer
/// once both disks are UpToDate again.
#[test]
fn a_resync_waits_for_before_resync_target_whose_failure_drops_the_connection() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7936", "127.0.0.2:7936"],
        size_mib: 8,
        ..PairSpec::default()
    });
    let cstate = p.adm_command(1, &["cstate", "r0"]);
    let seen = p.file("seen-by-before-resync-target");
    let before = format!("{cstate} > {}; sleep 1; exit 0", seen.display());
    let after = format!("echo done > {}", p.file("after-resync-target").display());
    p.set_handlers(
        1,
        &[
            ("before-resync-target", &before),
            ("after-resync-target", &after),
        ],
    );
    let unfence = format!("echo \"$DRBD_PEER\" >> {}", p.file("unfence").display());
    p.set_handlers(0, &[("unfence-peer", &unfence)]);
    p.set_node_conf(0, |c| {
        c.replacen(
            "c-plan-ahead 0;",
            "c-plan-ahead 0; fencing resource-only;",
            1,
        )
    });
    p.up_and_sync();
    let read = |name: &str| std::fs::read_to_string(p.file(name)).unwrap_or_default();
    assert_eq!(read("seen-by-before-resync-target").trim(), "WFSyncUUID");
    assert_eq!(read("unfence").trim(), "bravo");

    let write = |p: &Pair, block: u64, generation: u64| {
        let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
        c.write(block * 4096, &stamped_block(block, generation))
            .expect("write");
        c.flush().expect("flush");
    };
    // bravo fails its before-resync-target: no resync, StandAlone, its data untouched.
    p.handler_script(1, "before-resync-target", "exit 1");
    p.adm_ok(1, &["disconnect", "r0"]);
    write(&p, 40, 1);
    p.adm_ok(1, &["connect", "r0"]);
    p.wait_until("bravo StandAlone", Duration::from_secs(30), |p| {
        p.cstate(1) == "StandAlone"
    });
    let log = p.log(1);
    assert!(
        log.contains("before-resync-target handler returned 1, dropping connection"),
        "{log}"
    );
    assert_ne!(p.data(1, 41 * 4096)[40 * 4096..], stamped_block(40, 1)[..]);
    assert_eq!(p.dstate(1), "UpToDate/DUnknown");

    // Once it agrees, the resync runs.
    p.handler_script(1, "before-resync-target", "exit 0");
    p.adm_ok(1, &["connect", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    assert_eq!(p.data(1, 41 * 4096)[40 * 4096..], stamped_block(40, 1)[..]);
    assert_eq!(read("unfence").lines().count(), 2, "{}", read("unfence"));
}
