//! on-io-error detach with a disk that starts failing under a live write stream: the Primary
//! gives its disk up, goes on Diskless through its peer, and no write or read fails.

use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair, PairSpec};

const BLOCKS: u64 = 300;

/// Runs a write stream through alpha, whose disk fails every write after the first 100,
/// with `on-io-error POLICY`; every write succeeds and reads back right through alpha, and
/// bravo's disk holds it all. Returns the pair for the policy's own checks.
fn failing_disk_under_writes(policy: &str, port: u16) -> (Pair, NbdClient) {
    let addresses = [format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")];
    let disk_extra = format!("on-io-error {policy};");
    let mut p = Pair::new(PairSpec {
        addresses: [&addresses[0], &addresses[1]],
        size_mib: 16,
        disk_extra: &disk_extra,
        ..PairSpec::default()
    });
    p.nodes[0]
        .env
        .push(("DRBDD_FAULT_INJECT".into(), "writes-after=100".into()));
    // alpha's handlers leave a trace of each run.
    let mark = |p: &Pair, h: &str| format!("echo \"$DRBD_RESOURCE\" >> {}", p.file(h).display());
    let handlers = ["local-io-error", "pri-on-incon-degr"].map(|h| (h, mark(&p, h)));
    p.set_handlers(0, &handlers.each_ref().map(|(h, b)| (*h, b.as_str())));
    p.up_and_sync();
    let mut nbd = NbdClient::connect(&p.nbd_socket(0), "r0").expect("NBD connect");
    for b in 0..BLOCKS {
        nbd.write(b * 4096, &stamped_block(b, 3))
            .unwrap_or_else(|e| panic!("{policy}: write of block {b} failed: {e:?}"));
    }
    nbd.flush().expect("flush");
    for b in 0..BLOCKS {
        let got = nbd.read(b * 4096, 4096).expect("read");
        assert!(
            got == stamped_block(b, 3),
            "{policy}: block {b} reads wrong"
        );
    }
    let all: Vec<u8> = (0..BLOCKS).flat_map(|b| stamped_block(b, 3)).collect();
    assert!(
        p.data(1, BLOCKS * 4096) == all,
        "{policy}: bravo's disk misses writes"
    );
    (p, nbd)
}

/// How many times alpha ran handler `h`.
fn runs(p: &Pair, h: &str) -> usize {
    std::fs::read_to_string(p.file(h)).map_or(0, |s| s.lines().filter(|l| *l == "r0").count())
}

/// `detach`: alpha gives its disk up and goes on Diskless through bravo.
#[test]
fn a_primary_whose_disk_fails_goes_on_through_its_peer() {
    let (p, mut nbd) = failing_disk_under_writes("detach", 7870);
    assert_eq!(runs(&p, "local-io-error"), 0, "detach calls no handler");
    p.wait_until("alpha Diskless", Duration::from_secs(10), |p| {
        p.dstate(0) == "Diskless/UpToDate"
    });
    let log = p.log(0);
    assert!(
        log.contains("Local IO failed in WRITE. Detaching..."),
        "{log}"
    );
    assert_eq!(p.role(0), "Primary/Secondary");
    assert_eq!(p.cstate(0), "Connected");
    // More writes go on, through the peer only.
    nbd.write(5 * 4096, &stamped_block(5, 4))
        .expect("write after the detach");
    assert!(nbd.read(5 * 4096, 4096).expect("read") == stamped_block(5, 4));
}

/// `call-local-io-error`: as detach, and the local-io-error handler runs once.
#[test]
fn call_local_io_error_detaches_and_runs_the_handler() {
    let (p, _nbd) = failing_disk_under_writes("call-local-io-error", 7872);
    p.wait_until("alpha Diskless", Duration::from_secs(10), |p| {
        p.dstate(0) == "Diskless/UpToDate"
    });
    p.wait_until("local-io-error handler", Duration::from_secs(10), |p| {
        runs(p, "local-io-error") == 1
    });
}

/// `pass_on`: alpha keeps its disk but no longer trusts it (Inconsistent); reads come from
/// bravo.
#[test]
fn pass_on_keeps_the_disk_inconsistent_and_reads_from_the_peer() {
    let (p, _nbd) = failing_disk_under_writes("pass_on", 7871);
    assert_eq!(p.dstate(0), "Inconsistent/UpToDate");
    let log = p.log(0);
    assert!(
        log.contains("Local IO failed in WRITE. Passing error on..."),
        "{log}"
    );
    // Then the peer goes away: a Primary left without good data runs pri-on-incon-degr.
    assert_eq!(runs(&p, "pri-on-incon-degr"), 0);
    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("pri-on-incon-degr handler", Duration::from_secs(10), |p| {
        runs(p, "pri-on-incon-degr") == 1
    });
}
