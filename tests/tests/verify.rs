//! Online verify between two `drbdd` nodes: identical data verifies clean, a difference put
//! into one backing disk behind DRBD's back is found from either side, marked out of sync on
//! both, and repaired by the resync of the next connect.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair, PairSpec};

/// Writes `data` into node `i`'s backing file at `offset`, bypassing DRBD.
fn corrupt(p: &Pair, i: usize, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.nodes[i].disk)
        .expect("backing file");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

/// Runs `verify` on node `i` and waits until both nodes are Connected again.
fn verify(p: &Pair, i: usize) {
    let done = |p: &Pair, n: usize| p.log(n).matches("Online verify done").count();
    let before = [done(p, 0), done(p, 1)];
    p.adm_ok(i, &["verify", "r0"]);
    p.wait_until("verify ends on both", Duration::from_secs(60), |p| {
        (0..2).all(|n| done(p, n) > before[n] && p.cstate(n) == "Connected")
    });
}

#[test]
fn online_verify_finds_injected_differences_from_either_side() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7840", "127.0.0.2:7840"],
        size_mib: 16,
        net_extra: "verify-alg sha1;",
        ..PairSpec::default()
    });
    let found = p.file("out-of-sync");
    let mark = format!("echo \"$DRBD_RESOURCE\" >> {}", found.display());
    p.set_handlers(0, &[("out-of-sync", &mark)]);
    p.up_and_sync();
    let runs = || std::fs::read_to_string(&found).map_or(0, |s| s.lines().count());
    let mut nbd = NbdClient::connect(&p.nbd_socket(0), "r0").expect("NBD connect");
    for b in 0..64u64 {
        nbd.write(b * 4096, &stamped_block(b, 1)).expect("write");
    }
    nbd.flush().expect("flush");
    drop(nbd);

    // Identical data: nothing found.
    verify(&p, 0);
    for i in 0..2 {
        assert_eq!(p.statistic(i, "out-of-sync"), 0, "node {i}");
    }
    assert!(!p.log(0).contains("out of sync!"), "{}", p.log(0));
    assert_eq!(runs(), 0, "out-of-sync ran after a clean verify");

    // Two adjacent blocks and a lone one differ on bravo's disk.
    corrupt(&p, 1, 10 * 4096, &stamped_block(10, 99));
    corrupt(&p, 1, 11 * 4096 + 512, &[0xee; 512]);
    corrupt(&p, 1, 40 * 4096, &stamped_block(40, 99));
    verify(&p, 0);
    let log = p.log(0);
    assert!(
        log.contains("Online verify found 3 4k block out of sync!"),
        "{log}"
    );
    p.wait_until("out-of-sync handler", Duration::from_secs(10), |_| {
        runs() == 1
    });
    assert!(
        log.contains("Out of sync: start=80, size=16 (sectors)"),
        "{log}"
    );
    assert!(
        log.contains("Out of sync: start=320, size=8 (sectors)"),
        "{log}"
    );
    // Both nodes marked them; nothing is repaired until the next resync.
    for i in 0..2 {
        assert_eq!(p.statistic(i, "out-of-sync"), 12, "node {i} (KiB)");
    }
    assert!(p.data(0, 64 * 4096) != p.data(1, 64 * 4096));
    // Disconnect and connect: the bitmap resyncs exactly those blocks (alpha is Primary).
    p.adm_ok(0, &["disconnect", "r0"]);
    p.adm_ok(0, &["connect", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    assert!(p.data(0, 64 * 4096) == p.data(1, 64 * 4096));

    // Started from the other node, found all the same.
    corrupt(&p, 0, 20 * 4096, &stamped_block(20, 77));
    verify(&p, 1);
    assert!(
        p.log(1)
            .contains("Online verify found 1 4k block out of sync!"),
        "{}",
        p.log(1)
    );
    for i in 0..2 {
        assert_eq!(p.statistic(i, "out-of-sync"), 4, "node {i} (KiB)");
    }
}

#[test]
fn verify_needs_a_verify_alg_and_a_connection() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7841", "127.0.0.2:7841"],
        size_mib: 8,
        ..PairSpec::default()
    });
    let refused = |p: &Pair, why: &str| {
        let r = p.adm(0, &["verify", "r0"]);
        assert_eq!(r.code, 11, "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(why), "{}", r.stderr);
    };
    p.start(0);
    p.adm_ok(0, &["up", "r0"]);
    refused(&p, "Need a connection to start verify or resync");
    p.start(1);
    p.adm_ok(1, &["up", "r0"]);
    p.wait_until("Connected", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected"
    });
    refused(&p, "Need a verify algorithm to start online verify");
}
