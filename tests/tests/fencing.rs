//! fencing resource-and-stonith with the fence-peer contract: a Primary that loses its peer
//! freezes application I/O and calls fence-peer, whose script outdates the peer with
//! `drbdadm outdate` (exit codes as the fence scripts read them) and answers 4; a broken
//! answer keeps I/O frozen until the peer is back.

use std::sync::mpsc;
use std::time::Duration;

use tests::{bin_dir, stamped_block, NbdClient, Pair, PairSpec};

/// A pair fencing with resource-and-stonith where node `fencer` has the fence-peer handler
/// `script` (`{OUTDATE}` stands for the command that outdates the other node, as ssh would).
fn fencing_pair(port: u16, script: &str, fencer: usize) -> Pair {
    let addresses = [format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")];
    let mut p = Pair::new(PairSpec {
        addresses: [&addresses[0], &addresses[1]],
        size_mib: 8,
        disk_extra: "fencing resource-and-stonith;",
        ..PairSpec::default()
    });
    let victim = &p.nodes[1 - fencer];
    let outdate = format!(
        "{} -c {} --node {} --state-dir {} outdate r0",
        bin_dir().join("drbdadm").display(),
        p.conf.display(),
        victim.name,
        victim.state_dir.display()
    );
    let script = script.replace("{OUTDATE}", &outdate);
    let path = p.dir.path().join("fence-peer.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("script");
    let handlers = format!(
        "    handlers {{ fence-peer \"/bin/sh {}\"; }}",
        path.display()
    );
    p.set_node_conf(fencer, |c| {
        c.replacen("resource r0 {", &format!("resource r0 {{\n{handlers}"), 1)
    });
    p
}

/// A write through alpha's export, on a thread: the receiver gets its result.
fn write_async(p: &Pair, block: u64) -> mpsc::Receiver<bool> {
    let socket = p.nbd_socket(0);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut nbd = NbdClient::connect(&socket, "r0").expect("NBD connect");
        let ok = nbd.write(block * 4096, &stamped_block(block, 9)).is_ok();
        let _ = tx.send(ok);
    });
    rx
}

#[test]
fn fence_peer_outdates_the_peer_and_io_goes_on() {
    let script = "{OUTDATE}\ncase $? in 0) exit 4;; 5) exit 3;; 17) exit 6;; *) exit 5;; esac";
    let mut p = fencing_pair(7895, script, 0);
    p.up_and_sync();
    // bravo goes away: alpha (Primary) fences it.
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("bravo outdated", Duration::from_secs(20), |p| {
        p.dstate(1) == "Outdated/DUnknown" && p.dstate(0) == "UpToDate/Outdated"
    });
    let log = p.log(0);
    for line in [
        "I/O suspended until the fence-peer handler answers",
        "fence-peer helper returned 4 (peer was fenced)",
        "I/O resumed",
    ] {
        assert!(log.contains(line), "{line}:\n{log}");
    }
    assert!(
        write_async(&p, 7).recv_timeout(Duration::from_secs(10)) == Ok(true),
        "a write after fencing did not complete"
    );
    // `outdate` as the fence scripts read it: 17 on a Primary, 0 when already Outdated.
    assert_eq!(p.adm(0, &["outdate", "r0"]).code, 17);
    assert_eq!(p.adm(1, &["outdate", "r0"]).code, 0);
}

#[test]
fn a_broken_fence_peer_keeps_io_frozen_until_the_peer_is_back() {
    let mut p = fencing_pair(7896, "exit 1", 0);
    p.up_and_sync();
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("fence-peer answered", Duration::from_secs(20), |p| {
        p.log(0).contains("fence-peer helper broken, returned 1")
    });
    // Frozen: the write waits.
    let done = write_async(&p, 3);
    assert!(
        done.recv_timeout(Duration::from_secs(2)).is_err(),
        "a write completed while I/O was frozen"
    );
    // The peer comes back: I/O resumes and the write completes, on both disks.
    p.adm_ok(1, &["connect", "r0"]);
    assert_eq!(done.recv_timeout(Duration::from_secs(20)), Ok(true));
    p.wait_in_sync(Duration::from_secs(20));
    assert!(p.data(0, 4 * 4096) == p.data(1, 4 * 4096));
}

/// Each decisive answer of fence-peer (8.4's contract) sets the disk states it names and
/// lets the frozen I/O go on.
#[test]
fn fence_peer_exit_codes_decide_the_disk_states() {
    for (k, (code, dstate)) in [
        (3, "UpToDate/Inconsistent"),
        (5, "UpToDate/Outdated"),
        (6, "Outdated/DUnknown"),
        (7, "UpToDate/Outdated"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = fencing_pair(7950 + k as u16, &format!("exit {code}"), 0);
        p.up_and_sync();
        p.adm_ok(1, &["disconnect", "r0"]);
        p.wait_until("fence-peer answered", Duration::from_secs(20), |p| {
            p.log(0)
                .contains(&format!("fence-peer helper returned {code}"))
        });
        assert_eq!(p.dstate(0), dstate, "exit {code}");
        assert!(
            write_async(&p, 2).recv_timeout(Duration::from_secs(10)) == Ok(true),
            "exit {code}: I/O stayed frozen"
        );
    }
}

/// A fence-peer still running when the peer comes back is moot; when the peer is lost
/// again, fencing starts over (a new fence-peer run and a new freeze), and the late answer
/// of the first run does not settle the second.
#[test]
fn a_second_loss_fences_again_while_the_first_fence_peer_still_runs() {
    let mut p = fencing_pair(7958, "sleep 3; exit 7", 0);
    p.up_and_sync();
    let runs = |p: &Pair| p.log(0).matches("helper command: fence-peer").count();
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("first fence-peer", Duration::from_secs(10), |p| {
        runs(p) >= 1
    });
    p.adm_ok(1, &["connect", "r0"]);
    p.wait_in_sync(Duration::from_secs(20));
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("second fence-peer", Duration::from_secs(10), |p| {
        runs(p) == 2
    });
    let status = p.adm_ok(0, &["status", "r0"]);
    assert!(
        status.starts_with("r0 role:Primary suspended:fencing\n"),
        "{status}"
    );
    // Both runs answer 7 (stonithed); the second settles the second loss.
    p.wait_until("fenced", Duration::from_secs(20), |p| {
        p.dstate(0) == "UpToDate/Outdated"
    });
    assert!(
        write_async(&p, 6).recv_timeout(Duration::from_secs(10)) == Ok(true),
        "I/O stayed frozen"
    );
}

/// The operator ends the freeze by hand: `resume-io` lets the waiting write complete on the
/// local disk; `status` shows `suspended:fencing` until then.
#[test]
fn resume_io_ends_a_freeze_left_by_a_broken_fence_peer() {
    let mut p = fencing_pair(7899, "exit 1", 0);
    p.up_and_sync();
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("fence-peer answered", Duration::from_secs(20), |p| {
        p.log(0).contains("fence-peer helper broken, returned 1")
    });
    let status = p.adm_ok(0, &["status", "r0"]);
    assert!(
        status.starts_with("r0 role:Primary suspended:fencing\n"),
        "{status}"
    );
    let done = write_async(&p, 5);
    assert!(done.recv_timeout(Duration::from_secs(1)).is_err());
    p.adm_ok(0, &["resume-io", "r0"]);
    assert_eq!(done.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert!(p
        .adm_ok(0, &["status", "r0"])
        .starts_with("r0 role:Primary\n"));
    assert_eq!(p.data(0, 6 * 4096)[5 * 4096..], stamped_block(5, 9)[..]);
    // bravo comes back and gets the write by resync.
    p.adm_ok(1, &["connect", "r0"]);
    p.wait_in_sync(Duration::from_secs(20));
    assert!(p.data(0, 8 * 4096) == p.data(1, 8 * 4096));
}

/// A disconnected Secondary is promoted (a failover): with fencing it outdates its peer
/// through fence-peer first; without a working fence-peer the promotion is refused (-7,
/// exit 11) unless forced.
#[test]
fn promotion_fences_the_peer_first() {
    let script = "{OUTDATE}\ncase $? in 0) exit 4;; *) exit 1;; esac";
    // bravo fences alpha.
    let mut p = fencing_pair(7897, script, 1);
    p.up_and_sync();
    p.adm_ok(0, &["secondary", "r0"]);
    for i in [0, 1] {
        p.adm_ok(i, &["disconnect", "r0"]);
    }
    p.adm_ok(1, &["primary", "r0"]);
    assert_eq!(p.dstate(0), "Outdated/DUnknown");
    assert_eq!(p.dstate(1), "UpToDate/Outdated");
    assert!(
        p.log(1)
            .contains("fence-peer helper returned 4 (peer was fenced)"),
        "{}",
        p.log(1)
    );

    // alpha has no fence-peer handler: its promotion is refused, unless forced. (alpha is
    // Outdated now, so take a fresh pair.)
    let mut p = fencing_pair(7898, script, 1);
    p.up_and_sync();
    p.adm_ok(0, &["secondary", "r0"]);
    for i in [0, 1] {
        p.adm_ok(i, &["disconnect", "r0"]);
    }
    let r = p.adm(0, &["primary", "r0"]);
    assert_eq!(r.code, 11, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("Refusing to be Primary while peer is not outdated"),
        "{}",
        r.stderr
    );
    p.adm_ok(0, &["primary", "--force", "r0"]);
    assert!(
        p.log(0).contains("Forced into split brain situation!"),
        "{}",
        p.log(0)
    );
}
