//! Two `drbdd` processes on loopback with file-backed disks: initial sync, writes through the
//! NBD export with real clients, role rules, and a bitmap-based resync that moves only the
//! blocks written while disconnected.

use std::time::Duration;

use tests::{have, run, skip_unless, stamped_block, NbdClient, Pair, PairSpec};

const MIB: u64 = 1 << 20;

fn size_of_export(p: &Pair) -> u64 {
    NbdClient::connect(&p.nbd_socket(0), "r0")
        .expect("connect to alpha's export")
        .size
}

#[test]
fn initial_sync_then_qemu_io_and_nbdcopy_writes_reach_both_disks() {
    if skip_unless(
        have("qemu-io") && have("nbdcopy"),
        "qemu-io and nbdcopy (qemu-utils, libnbd-bin) not installed",
    ) {
        return;
    }
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7810", "127.0.0.2:7810"],
        ..PairSpec::default()
    });
    for i in 0..2 {
        p.start(i);
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_until("Connected", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
    });
    assert_eq!(p.dstate(0), "Inconsistent/Inconsistent");
    // Without good data, promotion is refused with drbdsetup's exit code 17.
    p.adm_refused(0, &["primary", "r0"], 17, "Need access to UpToDate data");
    p.adm_ok(0, &["primary", "--force", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(p.role(0), "Primary/Secondary");
    assert_eq!(p.role(1), "Secondary/Primary");

    let size = size_of_export(&p);
    assert!(size > 60 * MIB && size < 64 * MIB, "export size {size}");
    let uri0 = p.nbd_uri(0);
    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 8M",
            "-c",
            "write -P 0xa5 20M 512k",
            "-c",
            "flush",
            &uri0,
        ],
    );
    assert_eq!(r.code, 0, "qemu-io: {}{}", r.stdout, r.stderr);
    // nbdcopy a pseudo-random file into the middle of the device.
    let src = p.dir.path().join("random.bin");
    let mut data = vec![0u8; (16 * MIB) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&src, &data).expect("source file");
    // nbdcopy copies the whole source; write it at offset 32 MiB through qemu-io's view?
    // nbdcopy has no offset option: copy into a sub-range by copying the device out, patching,
    // and copying back would be circular; instead copy the file onto the start of the device.
    let r = run("nbdcopy", &[src.to_str().expect("utf-8 path"), &uri0]);
    assert_eq!(r.code, 0, "nbdcopy: {}{}", r.stdout, r.stderr);

    // The secondary refuses writes with EPERM, and serves reads of its UpToDate data.
    let uri1 = p.nbd_uri(1);
    let r = run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4k", &uri1]);
    assert!(
        r.stdout.contains("Operation not permitted")
            || r.stderr.contains("Operation not permitted"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    let r = run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xa5 20M 512k", &uri1],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        !r.stdout.contains("Pattern verification failed"),
        "{}",
        r.stdout
    );

    // Both backing files hold the same data area, and it is what was written.
    let a = p.data(0, size);
    let b = p.data(1, size);
    assert!(a == b, "the replicas differ");
    assert_eq!(&a[..data.len()], &data[..], "nbdcopy data");
    assert!(a[(20 * MIB) as usize..(20 * MIB + 512 * 1024) as usize]
        .iter()
        .all(|&x| x == 0xa5));
}

#[test]
fn disconnect_write_reconnect_resyncs_exactly_the_dirty_blocks() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7811", "127.0.0.2:7811"],
        ..PairSpec::default()
    });
    p.up_and_sync();
    let size = size_of_export(&p);
    let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
    c.write(0, &stamped_block(0, 1))
        .expect("write while connected");
    // A flush completes once the peer acknowledged the epoch: nothing is left in the
    // transfer log to be marked out of sync by the disconnect.
    c.flush().expect("flush");

    p.adm_ok(1, &["disconnect", "r0"]);
    p.wait_until("StandAlone / WFConnection", Duration::from_secs(10), |p| {
        p.cstate(1) == "StandAlone" && p.cstate(0) == "WFConnection"
    });
    assert_eq!(p.dstate(0), "UpToDate/DUnknown");
    // 37 scattered 4 KiB blocks, one of them written twice, plus a 12 KiB write: 40 blocks.
    let blocks: Vec<u64> = (0..37).map(|i| 7 + i * 389).collect();
    for (n, &b) in blocks.iter().enumerate() {
        c.write(b * 4096, &stamped_block(b, 2 + n as u64))
            .expect("write while disconnected");
    }
    c.write(blocks[3] * 4096, &stamped_block(blocks[3], 99))
        .expect("rewrite");
    let mut three = Vec::new();
    for k in 0..3 {
        three.extend_from_slice(&stamped_block(9000 + k, 7));
    }
    c.write(9000 * 4096, &three).expect("12 KiB write");
    c.flush().expect("flush");
    let dirty_kib = 40 * 4;
    assert_eq!(
        p.statistic(0, "out-of-sync"),
        dirty_kib,
        "bitmap of the primary"
    );

    let received_before = p.statistic(1, "received");
    p.adm_ok(1, &["connect", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    let received = p.statistic(1, "received") - received_before;
    assert_eq!(
        received, dirty_kib,
        "resync moved {received} KiB, expected {dirty_kib} KiB"
    );
    assert_eq!(p.statistic(0, "out-of-sync"), 0);
    assert!(
        p.data(0, size) == p.data(1, size),
        "the replicas differ after the resync"
    );
    assert!(p.log(1).contains("resync done (SyncTarget)"));
}

#[test]
fn sigterm_shuts_down_cleanly_and_a_restart_needs_no_resync() {
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7812", "127.0.0.2:7812"],
        ..PairSpec::default()
    });
    p.up_and_sync();
    let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
    for b in 0..64 {
        c.write(b * 4096 * 17, &stamped_block(b, 5)).expect("write");
    }
    drop(c);
    p.adm_ok(0, &["secondary", "r0"]);
    for i in 0..2 {
        assert_eq!(p.stop(i), Some(0), "exit code of drbdd on SIGTERM");
    }
    // The metadata is clean: drbdmeta-compatible dump-md works and shows no dirty bits.
    for i in 0..2 {
        let out = p.adm_ok(i, &["dump-md", "r0"]);
        assert!(
            out.contains("flags 0x") || out.contains("la-size-sect"),
            "{out}"
        );
    }
    let before: Vec<usize> = (0..2).map(|i| p.log(i).len()).collect();
    for i in 0..2 {
        p.start(i);
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_in_sync(Duration::from_secs(30));
    for (i, &from) in before.iter().enumerate() {
        let log = p.log(i)[from..].to_string();
        assert!(
            !log.contains("resync started"),
            "unexpected resync after a clean restart:\n{log}"
        );
        assert!(log.contains("0 activity-log extents replayed"), "{log}");
    }
}

#[test]
fn protocols_a_and_b_replicate_too() {
    for (port, proto) in [(7813u16, "A"), (7814, "B")] {
        let extra: &'static str = Box::leak(format!("protocol {proto};").into_boxed_str());
        let mut p = Pair::on_port(port, extra);
        p.up_and_sync();
        let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
        for b in 0..500u64 {
            c.write((b * 13 % 16000) * 4096, &stamped_block(b, 3))
                .expect("write");
        }
        c.flush().expect("flush");
        drop(c);
        // Protocol A and B complete before the peer wrote: wait until it has caught up.
        p.wait_until(
            "the peer received every write",
            Duration::from_secs(20),
            |p| p.statistic(1, "written") >= p.statistic(0, "sent"),
        );
        let size = size_of_export(&p);
        assert!(
            p.data(0, size) == p.data(1, size),
            "protocol {proto}: the replicas differ"
        );
    }
}

#[test]
fn new_current_uuid_clear_bitmap_skips_the_initial_sync() {
    let mut p = Pair::on_port(7815, "");
    for i in 0..2 {
        p.start(i);
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_until("Connected", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
    });
    assert_eq!(p.dstate(0), "Inconsistent/Inconsistent");
    p.adm_ok(0, &["new-current-uuid", "--clear-bitmap", "r0"]);
    p.wait_in_sync(Duration::from_secs(10));
    assert_eq!(p.statistic(1, "received"), 0, "no data moved");
    let gi0 = p.adm_ok(0, &["get-gi", "r0"]);
    let gi1 = p.adm_ok(1, &["get-gi", "r0"]);
    assert_eq!(
        gi0.split(':').next(),
        gi1.split(':').next(),
        "same current UUID: {gi0} {gi1}"
    );
    p.adm_ok(0, &["primary", "r0"]);
}

#[test]
fn invalidate_and_invalidate_remote_resync_the_whole_device() {
    let mut p = Pair::on_port(7816, "");
    p.up_and_sync();
    let size = size_of_export(&p);
    let device_kib = size.div_ceil(4096) * 4;
    // invalidate on the Secondary: its data is fetched again from the Primary.
    let before = p.statistic(1, "received");
    p.adm_ok(1, &["invalidate", "r0"]);
    p.wait_until("resync started", Duration::from_secs(10), |p| {
        p.cstate(1) != "Connected"
    });
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(p.statistic(1, "received") - before, device_kib);
    // invalidate-remote on the Primary: the peer's data is overwritten again.
    let before = p.statistic(1, "received");
    p.adm_ok(0, &["invalidate-remote", "r0"]);
    p.wait_until("resync started", Duration::from_secs(10), |p| {
        p.cstate(0) != "Connected"
    });
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(p.statistic(1, "received") - before, device_kib);
    // invalidate-remote needs a connection; invalidate on a Primary without a peer fails.
    p.adm_ok(1, &["disconnect", "r0"]);
    let r = p.adm(0, &["invalidate-remote", "r0"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("State change failed"), "{}", r.stderr);
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
}

#[test]
fn split_brain_leaves_both_standalone() {
    let mut p = Pair::on_port(7817, "");
    p.up_and_sync();
    p.adm_ok(1, &["disconnect", "r0"]);
    p.adm_ok(0, &["disconnect", "r0"]);
    // Both Primary while disconnected, both write.
    p.adm_ok(1, &["primary", "r0"]);
    for i in 0..2 {
        let mut c = NbdClient::connect(&p.nbd_socket(i), "r0").expect("connect");
        c.write(4096 * (1 + i as u64), &stamped_block(i as u64, 1))
            .expect("write");
    }
    p.adm_ok(1, &["secondary", "r0"]);
    for i in 0..2 {
        p.adm_ok(i, &["connect", "r0"]);
    }
    p.wait_until("both StandAlone", Duration::from_secs(30), |p| {
        p.cstate(0) == "StandAlone" && p.cstate(1) == "StandAlone"
    });
    for i in 0..2 {
        assert!(
            p.log(i).contains("Split-Brain detected but unresolved"),
            "{}",
            p.log(i)
        );
    }
    // Both keep their own data.
    assert_eq!(p.dstate(0), "UpToDate/DUnknown");
    assert_eq!(p.dstate(1), "UpToDate/DUnknown");
}

#[test]
fn detach_and_attach_at_run_time() {
    let mut p = Pair::on_port(7818, "");
    p.up_and_sync();
    let size = size_of_export(&p);
    // The Secondary detaches: the Primary goes on, marking what the peer misses.
    p.adm_ok(1, &["detach", "r0"]);
    p.wait_until("Diskless secondary", Duration::from_secs(10), |p| {
        p.dstate(1) == "Diskless/UpToDate" && p.dstate(0) == "UpToDate/Diskless"
    });
    let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
    for b in 0..10u64 {
        c.write(b * 8192, &stamped_block(b * 2, 1)).expect("write");
    }
    c.flush().expect("flush");
    assert_eq!(p.statistic(0, "out-of-sync"), 40);
    let before = p.statistic(1, "received");
    p.adm_ok(1, &["attach", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    assert_eq!(
        p.statistic(1, "received") - before,
        40,
        "only the blocks written meanwhile"
    );
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");

    // The Primary detaches: it serves reads and writes through its peer.
    p.adm_ok(0, &["detach", "r0"]);
    p.wait_until("Diskless primary", Duration::from_secs(10), |p| {
        p.dstate(0) == "Diskless/UpToDate"
    });
    c.write(100 * 4096, &stamped_block(100, 2))
        .expect("write through the peer");
    assert_eq!(
        c.read(100 * 4096, 4096).expect("read through the peer"),
        stamped_block(100, 2)
    );
    assert_eq!(read_block(&p, 1, 100), stamped_block(100, 2));
    // A Primary cannot detach from its only good data: the peer goes away first.
    p.adm_ok(0, &["attach", "r0"]);
    p.wait_in_sync(Duration::from_secs(30));
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
    p.adm_ok(1, &["disconnect", "r0"]);
    let r = p.adm(0, &["detach", "r0"]);
    assert_eq!(r.code, 17, "{}{}", r.stdout, r.stderr);
}

fn read_block(p: &Pair, node: usize, block: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&p.nodes[node].disk).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, block * 4096).unwrap();
    b
}

#[test]
fn nbd_export_on_tcp_when_configured() {
    if skip_unless(have("qemu-io"), "qemu-io (qemu-utils) not installed") {
        return;
    }
    let mut p = Pair::on_port(7819, "");
    p.start_with(0, &["--nbd-tcp", "127.0.0.1:10819"]);
    p.start(1);
    for i in 0..2 {
        p.adm_ok(i, &["up", "r0"]);
    }
    p.wait_until("Connected", Duration::from_secs(30), |p| {
        p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
    });
    p.adm_ok(0, &["primary", "--force", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let uri = "nbd://127.0.0.1:10819/r0";
    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1M 64k",
            "-c",
            "flush",
            uri,
        ],
    );
    assert_eq!(r.code, 0, "qemu-io over TCP: {}{}", r.stdout, r.stderr);
    let b = p.data(1, 2 * MIB);
    assert!(b[MIB as usize..(MIB + 65536) as usize]
        .iter()
        .all(|&x| x == 0x3c));
}

/// Automatic split-brain recovery by after-sb policies, with the report of the diverged
/// regions on both nodes before the victim's changes are overwritten.
#[test]
fn split_brain_recovered_by_policy_with_a_report_of_what_is_lost() {
    // After-sb-0pri discard-least-changes: alpha changed 1 block, bravo 3: alpha loses.
    let mut p = Pair::on_port(7890, "after-sb-0pri discard-least-changes;");
    p.split_and_reconnect(1, 3, &[0, 1]);
    p.wait_in_sync(Duration::from_secs(30));
    let alpha = p.log(0);
    assert!(
        alpha.contains("split brain: 16 KiB diverged (this node's changes there are discarded); sectors 800-807 1600-1623"),
        "{alpha}"
    );
    assert!(
        p.log(1)
            .contains("split brain: 16 KiB diverged (the peer's changes there are discarded)"),
        "{}",
        p.log(1)
    );
    assert!(p.data(0, 300 * 4096) == p.data(1, 300 * 4096));
    let bravo_block = stamped_block(201, 11);
    assert!(
        p.data(0, 202 * 4096)[201 * 4096..] == bravo_block[..],
        "bravo's change lost"
    );

    // After-sb-1pri discard-secondary: alpha stays Primary and wins over bravo.
    let mut p = Pair::on_port(7891, "after-sb-1pri discard-secondary;");
    p.split_and_reconnect(2, 1, &[1]);
    p.wait_in_sync(Duration::from_secs(30));
    assert_eq!(p.role(0), "Primary/Secondary");
    assert!(
        p.log(1)
            .contains("(this node's changes there are discarded); sectors 800-815 1600-1607"),
        "{}",
        p.log(1)
    );
    assert!(p.data(0, 300 * 4096) == p.data(1, 300 * 4096));
    let alpha_block = stamped_block(101, 10);
    assert!(
        p.data(1, 102 * 4096)[101 * 4096..] == alpha_block[..],
        "alpha's change lost"
    );
}

/// More after-sb-0pri policies, each deciding the victim of a split brain between two
/// Secondaries: (policy, blocks alpha changed, blocks bravo changed, victim). bravo was
/// promoted after alpha, so it is the younger Primary.
#[test]
fn after_sb_0pri_policies_pick_the_victim() {
    let cases = [
        ("discard-zero-changes", 2, 0, 1),
        ("discard-younger-primary", 1, 1, 1),
        ("discard-older-primary", 1, 1, 0),
        ("discard-least-changes", 3, 1, 1),
    ];
    for (k, (policy, a, b, victim)) in cases.into_iter().enumerate() {
        let net: &'static str = Box::leak(format!("after-sb-0pri {policy};").into_boxed_str());
        let mut p = Pair::on_port(7900 + k as u16, net);
        p.split_and_reconnect(a, b, &[0, 1]);
        p.wait_in_sync(Duration::from_secs(30));
        assert!(
            p.log(victim)
                .contains("(this node's changes there are discarded)"),
            "{policy}: node {victim} should lose:\n{}",
            p.log(victim)
        );
        assert!(
            !p.log(1 - victim)
                .contains("(this node's changes there are discarded)"),
            "{policy}"
        );
        assert!(p.data(0, 300 * 4096) == p.data(1, 300 * 4096), "{policy}");
    }
}

/// after-sb-1pri consensus: the after-sb-0pri decision stands when its victim is the
/// Secondary (here bravo, with the fewer changes, while alpha stays Primary).
#[test]
fn after_sb_1pri_consensus_follows_the_0pri_decision() {
    let mut p = Pair::on_port(
        7910,
        "after-sb-0pri discard-least-changes; after-sb-1pri consensus;",
    );
    p.split_and_reconnect(3, 1, &[1]);
    p.wait_in_sync(Duration::from_secs(30));
    assert_eq!(p.role(0), "Primary/Secondary");
    assert!(
        p.log(1)
            .contains("(this node's changes there are discarded)"),
        "{}",
        p.log(1)
    );
    assert!(p.data(0, 300 * 4096) == p.data(1, 300 * 4096));
}

#[test]
fn wait_connect_discard_zeroes_fua_and_down_between_two_daemons() {
    if skip_unless(have("qemu-io"), "qemu-io (qemu-utils) not installed") {
        return;
    }
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7813", "127.0.0.2:7813"],
        resource_extra: "    startup { wfc-timeout 2; }",
        ..PairSpec::default()
    });
    for i in 0..2 {
        p.start(i);
    }
    // wait-connect without a peer ends after wfc-timeout with drbdsetup's exit code 5.
    p.adm_ok(0, &["up", "r0"]);
    let r = p.adm(0, &["wait-connect", "r0"]);
    assert_eq!(
        r.code, 5,
        "wait-connect without a peer: {}{}",
        r.stdout, r.stderr
    );
    p.adm_ok(1, &["up", "r0"]);
    p.adm_ok(0, &["wait-connect", "r0"]);
    assert_eq!(p.cstate(0), "Connected");
    p.adm_ok(0, &["primary", "--force", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));

    // Writes with FUA, zeroes and discards through alpha's export reach bravo's disk.
    let r = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -f -P 0x22 2M 1M",
            "-c",
            "write -P 0x33 4M 2M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0x44 6M 2M",
            "-c",
            "discard 6M 1M",
            "-c",
            "flush",
            &p.nbd_uri(0),
        ],
    );
    assert_eq!(r.code, 0, "qemu-io: {}{}", r.stdout, r.stderr);
    let expect = |range: std::ops::Range<u64>, byte: u8, what: &str| {
        for i in 0..2 {
            let d = p.data(i, 8 * MIB);
            let part = &d[range.start as usize..range.end as usize];
            assert!(
                part.iter().all(|&b| b == byte),
                "{what} on {}'s disk: not all {byte:#x}",
                p.nodes[i].name
            );
        }
    };
    expect(0..2 * MIB, 0x11, "plain write");
    expect(2 * MIB..3 * MIB, 0x22, "FUA write");
    expect(4 * MIB..5 * MIB, 0, "write-zeroes");
    expect(5 * MIB..6 * MIB, 0x33, "the write beside the zeroes");
    expect(7 * MIB..8 * MIB, 0x44, "the write beside the discard");
    // File-backed disks punch a hole for a discard: both read zeroes where 0x44 was.
    expect(6 * MIB..7 * MIB, 0, "discard");

    // `down` on the Secondary: the Primary waits for it, writes on, and the Secondary's
    // return resyncs what it missed.
    p.adm_ok(1, &["down", "r0"]);
    p.wait_until("alpha waits for its peer", Duration::from_secs(30), |p| {
        p.cstate(0) == "WFConnection"
    });
    assert_eq!(p.role(0), "Primary/Unknown");
    assert_eq!(p.dstate(0), "UpToDate/DUnknown");
    p.adm_refused(1, &["role", "r0"], 10, "(127) Device minor not allocated");
    let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
    c.write(9 * MIB, &stamped_block(9 * MIB / 4096, 3))
        .expect("write while the peer is down");
    drop(c);
    p.adm_ok(1, &["up", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(
        p.statistic(1, "received"),
        4,
        "KiB resynced to the returning node"
    );
    assert!(
        p.data(0, 10 * MIB) == p.data(1, 10 * MIB),
        "the replicas differ"
    );
}
