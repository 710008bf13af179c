//! Interoperability: our `drbdd` replicates with the in-kernel DRBD 8.4.11 running in a QEMU
//! VM (the lab of `../shared/lab`, driven by `tests::lab`). Each test boots its own VM, runs
//! our daemon on the host side of a private network namespace, captures the traffic on the
//! bridge and requires tshark's DRBD dissector to find nothing malformed in it.
//!
//! Needs root, qemu-system-x86_64, tcpdump and tshark (skipped otherwise, failed under CI).

use std::time::Duration;

use tests::lab::{cmd, lab_skip, md5_bytes, now, Lab, LabSpec, HOST_IP, KERNEL_IP};
use tests::{stamped_block, NbdClient};

/// Connection states of our node while it waits for the peer.
fn waiting(cstate: &str) -> bool {
    matches!(cstate, "WFConnection" | "Unconnected")
}

/// Brings both nodes up, `first` first ("kernel" or "ours"), and waits until both are
/// Connected.
fn connect(lab: &mut Lab, first: &str) {
    lab.kernel_create_md();
    if first == "kernel" {
        lab.kernel_adm("up");
        lab.kernel_wait("cs:WFConnection", 30);
        lab.start_daemon();
        lab.adm_ok(&["up", "r0"]);
    } else {
        lab.start_daemon();
        lab.adm_ok(&["up", "r0"]);
        lab.wait_ours("WFConnection", Duration::from_secs(30), |l| {
            waiting(&l.cstate())
        });
        lab.kernel_adm("up");
    }
    lab.kernel_wait("cs:Connected", 60);
    lab.wait_ours("Connected", Duration::from_secs(60), |l| {
        l.cstate() == "Connected"
    });
}

fn assert_handshake(lab: &Lab) {
    let log = lab.log();
    assert!(
        log.contains("handshake successful: agreed network protocol version 101"),
        "our log:\n{log}"
    );
    let dmesg = lab.dmesg();
    for line in [
        "Handshake successful: Agreed network protocol version 101",
        "Peer authenticated using 20 bytes HMAC",
        "conn( WFReportParams -> Connected )",
    ] {
        assert!(
            dmesg.contains(line),
            "kernel dmesg lacks '{line}':\n{dmesg}"
        );
    }
}

/// Runs a handshake in which `first` (`"ours"` or `"kernel"`) opens the first socket: the
/// other node gets a 20 s connect-int and is started first, so its attempt is refused and the
/// next one is far away. Checks who sent the first initial packet, and one cram-hmac
/// challenge and response each way.
fn handshake_with_first_connector(first: &str) {
    let mut spec = LabSpec::default();
    let (slow, expected) = if first == "ours" {
        spec.kernel.connect_int = 20;
        // As the node with the lower address ours opens the meta socket first (drbd-net's
        // handshake::roles), which the kernel accepts.
        ("kernel", (HOST_IP, cmd::P_INITIAL_META))
    } else {
        spec.ours.connect_int = 20;
        // DRBD 8.4 always opens its data socket first.
        ("ours", (KERNEL_IP, cmd::P_INITIAL_DATA))
    };
    let mut lab = Lab::new(spec);
    connect(&mut lab, slow);
    assert_handshake(&lab);
    assert_eq!(lab.dstate(), "Inconsistent/Inconsistent");
    let cap = lab.finish();
    let got = cap
        .first_of(&[cmd::P_INITIAL_DATA, cmd::P_INITIAL_META])
        .expect("initial packets");
    assert_eq!(
        (got.src.as_str(), got.cmd),
        expected,
        "{first} should have connected first: {}",
        cap.summary()
    );
    for src in [HOST_IP, KERNEL_IP] {
        assert_eq!(cap.count(cmd::P_AUTH_CHALLENGE, Some(src), None, None), 1);
        assert_eq!(cap.count(cmd::P_AUTH_RESPONSE, Some(src), None, None), 1);
    }
}

/// The kernel is up first; our node connects in and opens the first socket.
#[test]
fn handshake_ours_connects_first() {
    if lab_skip() {
        return;
    }
    handshake_with_first_connector("ours");
}

/// Our node is up first; the kernel connects in and opens the first socket.
#[test]
fn handshake_kernel_connects_first() {
    if lab_skip() {
        return;
    }
    handshake_with_first_connector("kernel");
}

/// A wrong shared secret on our side: both nodes refuse the peer and stay StandAlone, with
/// the reason in the kernel's dmesg and in our log; both ways round.
#[test]
fn handshake_wrong_secret_refused_both_ways() {
    if lab_skip() {
        return;
    }
    let mut spec = LabSpec::default();
    spec.ours.secret = "not-the-secret".into();
    let mut lab = Lab::new(spec);
    lab.kernel_create_md();
    lab.start_daemon();
    for first in ["kernel", "ours"] {
        let dmark = lab.dmesg_mark();
        let lmark = lab.log_mark();
        if first == "kernel" {
            lab.kernel_adm("up");
            lab.kernel_wait("cs:WFConnection", 30);
            lab.adm_ok(&["up", "r0"]);
        } else {
            lab.adm_ok(&["up", "r0"]);
            lab.wait_ours("WFConnection", Duration::from_secs(30), |l| {
                waiting(&l.cstate())
            });
            lab.kernel_adm("up");
        }
        lab.kernel_wait("cs:StandAlone", 60);
        lab.wait_ours("StandAlone", Duration::from_secs(60), |l| {
            l.cstate() == "StandAlone"
        });
        let dmesg = lab.dmesg_since(dmark);
        assert!(
            dmesg.contains("Authentication of peer failed"),
            "kernel dmesg ({first} up first):\n{dmesg}"
        );
        let log = lab.log_since(lmark);
        assert!(
            log.to_lowercase().contains("authentication")
                && log.contains("StandAlone")
                && !log.contains("conn( WFReportParams -> Connected )"),
            "our log ({first} up first):\n{log}"
        );
        // Still StandAlone a moment later: nobody retries.
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(lab.cstate(), "StandAlone");
        assert!(lab.kernel_state().contains("cs:StandAlone"));
        lab.kernel_adm("down");
        lab.adm_ok(&["down", "r0"]);
    }
    let cap = lab.finish();
    assert_eq!(
        cap.count(cmd::P_AUTH_RESPONSE, Some(KERNEL_IP), None, None),
        2
    );
}

/// Both up, the kernel forced Primary: a full sync from the kernel to our disk.
fn kernel_primary_in_sync() -> Lab {
    let mut lab = Lab::new(LabSpec::default());
    connect(&mut lab, "kernel");
    lab.kernel_adm("primary --force");
    lab.wait_in_sync(120);
    lab.kernel_wait("ro:Primary/Secondary", 10);
    assert_eq!(lab.role(), "Secondary/Primary");
    lab
}

/// Both up, our node forced Primary: a full sync from our disk to the kernel.
fn ours_primary_in_sync() -> Lab {
    let mut lab = Lab::new(LabSpec::default());
    connect(&mut lab, "kernel");
    lab.adm_ok(&["primary", "--force", "r0"]);
    lab.wait_in_sync(120);
    lab.kernel_wait("ro:Secondary/Primary", 10);
    assert_eq!(lab.role(), "Primary/Secondary");
    lab
}

/// Kernel `primary --force`: full initial sync to us; then protocol C writes on the kernel
/// are on our disk when they complete.
#[test]
fn kernel_primary_full_sync_and_protocol_c_writes() {
    if lab_skip() {
        return;
    }
    let t0 = std::time::Instant::now();
    let mut lab = kernel_primary_in_sync();
    eprintln!("connected and synced in {:.1}s", t0.elapsed().as_secs_f64());
    lab.assert_same_data();
    // O_DIRECT writes through the kernel's device: when dd returns, protocol C has them on
    // our disk too. Each region is compared right after its write.
    for (seek, count, bs_blocks) in [(10u64, 100u64, 1u64), (2000, 4, 64), (4085, 1, 1)] {
        let kb = bs_blocks * 4;
        lab.rpc_ok(&format!(
            "dd if=/dev/urandom of=/dev/drbd0 bs={kb}k count={count} seek={} oflag=direct conv=notrunc 2>/dev/null",
            seek / bs_blocks
        ));
        let blocks = count * bs_blocks;
        let k = lab.kernel_md5("/dev/drbd0", seek, blocks);
        let o = lab.our_md5(seek, blocks);
        assert_eq!(k, o, "blocks {seek}..+{blocks}: kernel {k}, ours {o}");
    }
    lab.assert_same_data();
    let cap = lab.finish();
    assert!(cap.count(cmd::P_RS_DATA_REPLY, Some(KERNEL_IP), None, None) > 0);
    assert!(cap.count(cmd::P_RS_DATA_REQUEST, Some(HOST_IP), None, None) > 0);
    // The write acks travel on the meta socket in small segments; the dissector keeps them
    // even when a capture drops a segment of the busy data stream and loses sync there.
    assert!(cap.count(cmd::P_WRITE_ACK, Some(HOST_IP), None, None) >= 3);
}

/// Both sides with `net_extra` in `net { }`, connected (the kernel up first), the kernel
/// forced Primary and the full sync done.
fn kernel_primary_in_sync_with(net_extra: &str) -> Lab {
    let side = tests::lab::Side {
        net_extra: net_extra.to_string(),
        ..tests::lab::Side::default()
    };
    let mut lab = Lab::new(LabSpec {
        ours: side.clone(),
        kernel: side,
        ..LabSpec::default()
    });
    connect(&mut lab, "kernel");
    lab.kernel_adm("primary --force");
    lab.wait_in_sync(120);
    lab
}

/// Our `primary --force` on fresh metadata: full sync from us to the kernel.
#[test]
fn ours_primary_full_sync_to_kernel() {
    if lab_skip() {
        return;
    }
    let mut lab = ours_primary_in_sync();
    lab.assert_same_data();
    let cap = lab.finish();
    assert!(cap.count(cmd::P_RS_DATA_REQUEST, Some(KERNEL_IP), None, None) > 0);
    assert!(cap.count(cmd::P_RS_DATA_REPLY, Some(HOST_IP), None, None) > 0);
    // The kernel as SyncTarget ends the resync the careful way (checks the checker).
    assert_eq!(cap.check_resync_ends(KERNEL_IP, HOST_IP), Ok(1));
}

/// Roles swapped: our node Primary, writes through our NBD export land on the kernel's disk.
#[test]
fn ours_primary_nbd_writes_reach_kernel() {
    if lab_skip() {
        return;
    }
    let mut lab = ours_primary_in_sync();
    let mut nbd = NbdClient::connect(&lab.nbd_socket(), "r0").expect("NBD connect");
    let blocks = lab.kernel_data_blocks();
    assert_eq!(nbd.size, blocks * 4096);
    // Single blocks, a 1 MiB run, the last block.
    let mut regions: Vec<(u64, Vec<u8>)> = vec![
        (0, stamped_block(0, 1)),
        (17, stamped_block(17, 1)),
        (blocks - 1, stamped_block(blocks - 1, 1)),
    ];
    let run: Vec<u8> = (0..256).flat_map(|b| stamped_block(1024 + b, 2)).collect();
    regions.push((1024, run));
    for (block, data) in &regions {
        nbd.write(block * 4096, data).expect("NBD write");
    }
    nbd.flush().expect("NBD flush");
    for (block, data) in &regions {
        let n = data.len() as u64 / 4096;
        let want = md5_bytes(data);
        assert_eq!(
            lab.kernel_md5("/dev/vda", *block, n),
            want,
            "kernel blocks {block}..+{n}"
        );
        assert_eq!(lab.our_md5(*block, n), want, "our blocks {block}..+{n}");
        assert_eq!(
            nbd.read(block * 4096, data.len() as u32).expect("read"),
            *data
        );
    }
    drop(nbd);
    lab.assert_same_data();
    let cap = lab.finish();
    // Protocol C: the kernel acknowledged each of our writes (the acks are on the meta socket).
    assert!(cap.count(cmd::P_WRITE_ACK, Some(KERNEL_IP), None, None) >= regions.len());
    assert_eq!(cap.check_resync_ends(KERNEL_IP, HOST_IP), Ok(1));
}

/// Blocks written while disconnected: 5..8 (one run), 300, 1234, 4000: 6 bits, 24 KiB.
const DIRTY: [(u64, u64); 4] = [(5, 3), (300, 1), (1234, 1), (4000, 1)];
const DIRTY_KIB: u64 = 24;

/// One round of "disconnect, write, reconnect".
#[derive(Clone, Copy, Debug)]
struct Round {
    /// `use-rle` of the kernel (its `net` options are given again at `connect`).
    kernel_rle: bool,
    /// `use-rle` of our node (read at `up`).
    our_rle: bool,
    /// Take our node down and up again (instead of `disconnect`/`connect` on the kernel),
    /// which is how our `use-rle` changes.
    ours_down: bool,
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Disconnects, lets `write` write the dirty blocks on the Primary, reconnects as `round`
/// says; checks that the resync moved exactly the dirty blocks, each side's bitmap encoding,
/// and the data. Returns the time window of the reconnection (for the capture).
fn disconnected_writes_and_resync(
    lab: &mut Lab,
    round: Round,
    kernel_is_source: bool,
    write: &dyn Fn(&Lab, u64, u64),
) -> (f64, f64) {
    if round.ours_down {
        lab.adm_ok(&["down", "r0"]);
        lab.kernel_wait("cs:WFConnection", 30);
        // The kernel takes its new net options at `connect`.
        lab.kernel_adm("disconnect");
        lab.kernel_wait("cs:StandAlone", 30);
    } else {
        lab.kernel_adm("disconnect");
        lab.kernel_wait("cs:StandAlone", 30);
        lab.wait_ours("WFConnection", Duration::from_secs(30), |l| {
            waiting(&l.cstate())
        });
    }
    lab.spec.kernel.net_extra = format!("use-rle {};", yes_no(round.kernel_rle));
    lab.write_kernel_conf();
    lab.spec.ours.net_extra = format!("use-rle {};", yes_no(round.our_rle));
    lab.write_our_conf();
    for (block, n) in DIRTY {
        write(lab, block, n);
    }
    // The Primary counts exactly the dirty blocks out of sync.
    if kernel_is_source {
        lab.kernel_wait(&format!("oos:{DIRTY_KIB}$"), 10);
    } else {
        assert_eq!(lab.statistic("out-of-sync"), DIRTY_KIB);
    }
    let oos = DIRTY_KIB;
    let dmark = lab.dmesg_mark();
    let lmark = lab.log_mark();
    let t0 = now();
    lab.kernel_adm("connect");
    if round.ours_down {
        lab.adm_ok(&["up", "r0"]);
    }
    // 24 KiB: a fraction of a second.
    lab.wait_in_sync(30);
    let t1 = now();
    let dmesg = lab.dmesg_since(dmark);
    let log = lab.log_since(lmark);
    let (kernel_role, our_role) = if kernel_is_source {
        ("SyncSource", "SyncTarget")
    } else {
        ("SyncTarget", "SyncSource")
    };
    let want = format!("Began resync as {kernel_role} (will sync {oos} KB [6 bits set])");
    assert!(
        dmesg.contains(&want),
        "kernel dmesg lacks '{want}':\n{dmesg}\nour log:\n{log}"
    );
    let want = format!("resync started as {our_role}: {oos} KiB");
    assert!(
        log.contains(&want),
        "our log lacks '{want}':\n{log}\nkernel:\n{dmesg}"
    );
    // The kernel reports a bitmap transfer only when it was compressed
    // (INFO_bm_xfer_stats: "don't report if not compressed").
    for (what, rle) in [("send", round.kernel_rle), ("receive", round.our_rle)] {
        let stats = dmesg
            .lines()
            .find(|l| l.contains(&format!("{what} bitmap stats")));
        if rle {
            let stats =
                stats.unwrap_or_else(|| panic!("no {what} bitmap stats in dmesg:\n{dmesg}"));
            assert!(stats.contains("plain 0(0)"), "{round:?}: {stats}");
        } else {
            assert!(stats.is_none(), "{round:?}, yet: {stats:?}");
        }
    }
    lab.assert_same_data();
    (t0, t1)
}

/// Each side sent its bitmap in the encoding its `use-rle` asks for.
fn check_bitmap_packets(cap: &tests::lab::CaptureReport, windows: &[(Round, (f64, f64))]) {
    for (round, (t0, t1)) in windows {
        for (who, ip, rle) in [
            ("kernel", KERNEL_IP, round.kernel_rle),
            ("ours", HOST_IP, round.our_rle),
        ] {
            let plain = cap.count(cmd::P_BITMAP, Some(ip), Some(*t0), Some(*t1));
            let rle_n = cap.count(cmd::P_COMPRESSED_BITMAP, Some(ip), Some(*t0), Some(*t1));
            assert!(
                if rle {
                    rle_n > 0 && plain == 0
                } else {
                    plain > 0 && rle_n == 0
                },
                "{round:?}: {who} sent {plain} plain and {rle_n} RLE bitmap packets"
            );
        }
    }
}

const ROUNDS_KERNEL_SIDE: [Round; 2] = [
    Round {
        kernel_rle: true,
        our_rle: true,
        ours_down: false,
    },
    Round {
        kernel_rle: false,
        our_rle: true,
        ours_down: false,
    },
];

/// Kernel Primary; writes on the kernel while disconnected; the reconnection resyncs exactly
/// those blocks to us: the kernel's bitmap RLE-compressed and plain (kernel `disconnect`/
/// `connect`), then ours plain (our node `down`/`up` with `use-rle no`).
#[test]
fn bitmap_resync_kernel_to_ours() {
    if lab_skip() {
        return;
    }
    let mut lab = kernel_primary_in_sync();
    let mut windows = Vec::new();
    let ours_plain = Round {
        kernel_rle: true,
        our_rle: false,
        ours_down: true,
    };
    for round in ROUNDS_KERNEL_SIDE.into_iter().chain([ours_plain]) {
        let w = disconnected_writes_and_resync(&mut lab, round, true, &|lab, block, n| {
            lab.rpc_ok(&format!(
                "dd if=/dev/urandom of=/dev/drbd0 bs=4k count={n} seek={block} oflag=direct conv=notrunc 2>/dev/null"
            ));
        });
        windows.push((round, w));
    }
    let cap = lab.finish();
    check_bitmap_packets(&cap, &windows);
}

/// Our node as SyncTarget must end every resync the way the kernel's SyncTarget does (last
/// P_RS_WRITE_ACK, P_PING/P_PING_ACK round trip, then P_STATE Connected): otherwise the
/// kernel's SyncSource can see the P_STATE before the last acks, and then never finishes
/// (stays SyncSource at 100 %, oos:0). Four full resyncs: the initial one, then the kernel's
/// `invalidate-remote` three times; each must finish on the kernel too.
#[test]
fn our_sync_target_ends_resync_like_the_kernel() {
    if lab_skip() {
        return;
    }
    let mut lab = Lab::new(LabSpec::default());
    connect(&mut lab, "kernel");
    lab.kernel_adm("primary --force");
    // A 16 MiB resync takes about a second; a stuck SyncSource fails in 20 s.
    lab.wait_in_sync(20);
    for _ in 0..3 {
        lab.kernel_adm("invalidate-remote");
        lab.kernel_wait("cs:(SyncSource|Connected)", 20);
        lab.wait_in_sync(20);
    }
    lab.assert_same_data();
    let cap = lab.finish();
    assert_eq!(cap.check_resync_ends(HOST_IP, KERNEL_IP), Ok(4));
}

/// Our node Primary; writes through our NBD export while disconnected; the reconnection
/// resyncs exactly those blocks to the kernel.
#[test]
fn bitmap_resync_ours_to_kernel() {
    if lab_skip() {
        return;
    }
    let mut lab = ours_primary_in_sync();
    let mut windows = Vec::new();
    for (i, round) in ROUNDS_KERNEL_SIDE.into_iter().enumerate() {
        let w = disconnected_writes_and_resync(&mut lab, round, false, &|lab, block, n| {
            let mut nbd = NbdClient::connect(&lab.nbd_socket(), "r0").expect("NBD connect");
            let data: Vec<u8> = (block..block + n)
                .flat_map(|b| stamped_block(b, 10 + i as u64))
                .collect();
            nbd.write(block * 4096, &data)
                .expect("NBD write while disconnected");
            nbd.flush().expect("flush");
        });
        windows.push((round, w));
    }
    let cap = lab.finish();
    check_bitmap_packets(&cap, &windows);
    assert_eq!(cap.check_resync_ends(KERNEL_IP, HOST_IP), Ok(3));
}

/// DRBD 8.4 acknowledgement packets of application writes.
const P_RECV_ACK: u16 = 0x15;
const P_WRITE_ACK: u16 = 0x16;
/// A discard (`P_TRIM`, DRBD_FF_TRIM).
const P_TRIM: u16 = 0x31;
/// A write-zeroes (`P_ZEROES`, DRBD_FF_WZEROES).
const P_ZEROES: u16 = 0x36;

/// Waits until `f` returns true (polling every 100 ms) or `limit` passes; returns whether it
/// did.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `data` at `block` through our NBD export.
fn nbd_write(lab: &Lab, block: u64, data: &[u8]) {
    let mut nbd = NbdClient::connect(&lab.nbd_socket(), "r0").expect("NBD connect");
    nbd.write(block * 4096, data).expect("NBD write");
    nbd.flush().expect("NBD flush");
}

/// Scenario 9a: protocol A, then B, then C, changed on the live connection on the kernel
/// side (`net-options --protocol`: P_PROTOCOL_UPDATE and P_SYNC_PARAM89 while connected,
/// adopted by our node, which stays connected): writes on the kernel and through our NBD
/// export reach the other disk, acknowledged as each protocol asks. A resync-rate change
/// (`disk-options`) on the live connection is adopted too.
#[test]
fn protocols_a_b_c_switched_on_the_live_connection() {
    if lab_skip() {
        return;
    }
    let mut lab = Lab::new(LabSpec {
        protocol: 'A',
        ..LabSpec::default()
    });
    connect(&mut lab, "kernel");
    lab.kernel_adm("primary --force");
    lab.wait_in_sync(120);
    let mut windows = Vec::new();
    for (i, proto) in ['A', 'B', 'C'].into_iter().enumerate() {
        if proto != 'A' {
            let mark = lab.log_mark();
            let prev = ['A', 'B', 'C'][i - 1];
            lab.kernel_adm(&format!("net-options --protocol={proto}"));
            let want = format!("protocol {prev} -> {proto}");
            assert!(
                eventually(Duration::from_secs(10), || lab
                    .log_since(mark)
                    .contains(&want)),
                "our log does not show '{want}':\n{}",
                lab.log_since(mark)
            );
            let log = lab.log_since(mark);
            assert!(!log.contains("connection lost"), "{log}");
            assert_eq!(lab.cstate(), "Connected");
        }
        let st = lab.kernel_state();
        assert!(st.contains(&format!(" {proto} ")), "kernel: {st}");
        let t0 = now();
        // The kernel Primary writes.
        if !lab.kernel_state().contains("ro:Primary") {
            lab.adm_ok(&["secondary", "r0"]);
            lab.kernel_adm("primary");
        }
        let i = i as u64;
        for (block, n) in [(10 + i * 100, 8u64), (2048 + i * 100, 1)] {
            lab.rpc_ok(&format!(
                "dd if=/dev/urandom of=/dev/drbd0 bs=4k count={n} seek={block} oflag=direct conv=notrunc 2>/dev/null"
            ));
            let k = lab.kernel_md5("/dev/drbd0", block, n);
            assert!(
                eventually(Duration::from_secs(10), || lab.our_md5(block, n) == k),
                "protocol {proto}: our blocks {block}..+{n} never became the kernel's {k}"
            );
        }
        // Our node Primary, writes through NBD.
        lab.kernel_adm("secondary");
        lab.adm_ok(&["primary", "r0"]);
        for (block, n) in [(500 + i * 100, 4u64), (3500 + i * 100, 1)] {
            let data: Vec<u8> = (block..block + n)
                .flat_map(|b| stamped_block(b, 20 + i))
                .collect();
            nbd_write(&lab, block, &data);
            let want = md5_bytes(&data);
            assert!(
                eventually(Duration::from_secs(10), || lab
                    .kernel_md5("/dev/vda", block, n)
                    == want),
                "protocol {proto}: kernel blocks {block}..+{n} never got our write"
            );
        }
        lab.wait_in_sync(30);
        lab.assert_same_data();
        windows.push((proto, t0, now()));
    }
    // A resync-rate change on the live connection arrives as P_SYNC_PARAM89 alone.
    let mark = lab.log_mark();
    lab.kernel_adm("disk-options --resync-rate=20M");
    let want = "the peer changed the resync settings: resync-rate 20480 KiB/s";
    assert!(
        eventually(Duration::from_secs(10), || lab
            .log_since(mark)
            .contains(want)),
        "our log:\n{}",
        lab.log_since(mark)
    );
    assert_eq!(lab.cstate(), "Connected");
    let cap = lab.finish();
    for (proto, t0, t1) in windows {
        // Each side acknowledges the other's writes as the protocol of the moment asks.
        for src in [KERNEL_IP, HOST_IP] {
            let recv = cap.count(P_RECV_ACK, Some(src), Some(t0), Some(t1));
            let write = cap.count(P_WRITE_ACK, Some(src), Some(t0), Some(t1));
            let (want_recv, want_write) = match proto {
                'A' => (false, false),
                'B' => (true, false),
                _ => (false, true),
            };
            assert_eq!(
                (recv > 0, write > 0),
                (want_recv, want_write),
                "protocol {proto}, acks from {src}: {recv} P_RECV_ACK, {write} P_WRITE_ACK; {}",
                cap.summary()
            );
        }
    }
}

/// Scenario 9b: the kernel Primary discards a region of its device (busybox `blkdiscard`)
/// and asks for write-zeroes (BLKZEROOUT, from `tests/guest/zeroout.c`): P_TRIM and P_ZEROES
/// on the wire, zeroes on our disk.
#[test]
fn kernel_discard_and_zeroes_reach_our_disk() {
    if lab_skip() {
        return;
    }
    let mut lab = kernel_primary_in_sync();
    let zero = |n: u64| md5_bytes(&vec![0u8; (n * 4096) as usize]);
    // blkdiscard (BLKDISCARD) on 1 MiB at 4 MiB (block 1024): the kernel sends it as P_TRIM
    // (the peers agreed on TRIM) and our node zeroes the range. The VM's own disk keeps its
    // old data there (QEMU's default `discard=ignore`), so the kernel then writes zeroes over
    // the range too, to make both data areas equal again.
    let r = lab.rpc("blkdiscard -o 4194304 -l 1048576 /dev/drbd0; echo rc=$?");
    assert!(
        r.stdout.contains("rc=0"),
        "blkdiscard: {}{}",
        r.stdout,
        r.stderr
    );
    assert!(
        eventually(Duration::from_secs(10), || lab.our_md5(1024, 256)
            == zero(256)),
        "after the kernel's blkdiscard our blocks 1024..+256 are not zeroes\n{}",
        lab.log()
    );
    lab.rpc_ok(
        "dd if=/dev/zero of=/dev/drbd0 bs=1M count=1 seek=4 oflag=direct conv=notrunc 2>/dev/null",
    );
    assert_eq!(lab.kernel_md5("/dev/drbd0", 1024, 256), zero(256));
    // Write-zeroes (BLKZEROOUT) over data: 64 KiB at block 2000, 2 KiB inside block 3000
    // (a partial block), and the last block.
    lab.install_guest_tool("zeroout");
    let last = lab.kernel_data_blocks() - 1;
    lab.rpc_ok(
        "dd if=/dev/urandom of=/dev/drbd0 bs=4k count=1 seek=3000 oflag=direct conv=notrunc 2>/dev/null",
    );
    lab.rpc_ok(&format!("zeroout /dev/drbd0 {} 2048", 3000 * 4096 + 1024));
    let mut want = lab.kernel_md5("/dev/drbd0", 3000, 1);
    assert_eq!(
        lab.our_md5(3000, 1),
        want,
        "block 3000 after a 2 KiB write-zeroes"
    );
    want =
        lab.rpc_ok("dd if=/dev/drbd0 bs=1024 skip=12001 count=1 iflag=direct 2>/dev/null | md5sum");
    assert!(
        want.starts_with(&md5_bytes(&[0u8; 1024])),
        "kernel's zeroed KiB: {want}"
    );
    for (block, n) in [(2000u64, 16u64), (last, 1)] {
        lab.rpc_ok(&format!(
            "dd if=/dev/urandom of=/dev/drbd0 bs=4k count={n} seek={block} oflag=direct conv=notrunc 2>/dev/null"
        ));
        lab.rpc_ok(&format!("zeroout /dev/drbd0 {} {}", block * 4096, n * 4096));
        assert_eq!(lab.kernel_md5("/dev/drbd0", block, n), zero(n));
        assert_eq!(
            lab.our_md5(block, n),
            zero(n),
            "our blocks {block}..+{n} after the kernel wrote zeroes"
        );
    }
    lab.assert_same_data();
    let cap = lab.finish();
    assert!(
        cap.count(P_TRIM, Some(KERNEL_IP), None, None) > 0,
        "no P_TRIM from the kernel: {}",
        cap.summary()
    );
    assert!(
        cap.count(P_ZEROES, Some(KERNEL_IP), None, None) >= 3,
        "no P_ZEROES from the kernel: {}",
        cap.summary()
    );
}

/// Scenario 9c: `down` on one node while connected makes the other wait for it
/// (WFConnection, not StandAlone), and they reconnect when it comes back up: the kernel
/// first, then ours.
#[test]
fn down_on_one_side_leaves_the_other_waiting() {
    if lab_skip() {
        return;
    }
    let mut lab = kernel_primary_in_sync();
    lab.kernel_adm("secondary");
    // The kernel goes down.
    let lmark = lab.log_mark();
    lab.kernel_adm("down");
    lab.wait_ours("WFConnection", Duration::from_secs(30), |l| {
        waiting(&l.cstate())
    });
    for _ in 0..30 {
        let cs = lab.cstate();
        assert!(
            waiting(&cs),
            "ours after the kernel's down: {cs}\n{}",
            lab.log_since(lmark)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.kernel_adm("up");
    lab.wait_in_sync(60);
    // Ours goes down.
    let dmark = lab.dmesg_mark();
    lab.adm_ok(&["down", "r0"]);
    lab.kernel_wait("cs:WFConnection", 30);
    std::thread::sleep(Duration::from_secs(3));
    let st = lab.kernel_state();
    assert!(
        st.contains("cs:WFConnection"),
        "kernel after our down: {st}\n{}",
        lab.dmesg_since(dmark)
    );
    lab.adm_ok(&["up", "r0"]);
    lab.wait_in_sync(60);
    lab.assert_same_data();
    let _ = lab.finish();
}
/// Split brain: from Connected (kernel Primary, ours Secondary), both disconnect, both are
/// Primary (or only the survivor), each writes its own blocks; at the reconnection both detect
/// the split brain and go StandAlone. `survivor` ("kernel" or "ours") keeps its data: the
/// other one is demoted and reconnects with `--discard-my-data`; afterwards both disks equal
/// the survivor's.
fn split_brain_round(lab: &mut Lab, survivor: &str, round: u64, both_primary: bool) {
    // Both StandAlone.
    lab.kernel_adm("disconnect");
    lab.kernel_wait("cs:StandAlone", 30);
    lab.adm_ok(&["disconnect", "r0"]);
    lab.wait_ours("StandAlone", Duration::from_secs(30), |l| {
        l.cstate() == "StandAlone"
    });
    // Both Primary.
    if !lab.kernel_state().contains("ro:Primary") {
        lab.kernel_adm("primary");
    }
    if !lab.role().starts_with("Primary") {
        lab.adm_ok(&["primary", "r0"]);
    }
    lab.kernel_wait("ro:Primary/Unknown", 10);
    assert!(lab.role().starts_with("Primary"), "ours: {}", lab.role());
    // Different blocks on each: the kernel 100..104 + 3000, ours 200..204 + 3001.
    let k_blocks = [(100 + round * 10, 4u64), (3000 + round * 10, 1)];
    let o_blocks = [(200 + round * 10, 4u64), (3001 + round * 10, 1)];
    for (block, n) in k_blocks {
        lab.rpc_ok(&format!(
            "dd if=/dev/urandom of=/dev/drbd0 bs=4k count={n} seek={block} oflag=direct conv=notrunc 2>/dev/null"
        ));
    }
    for (block, n) in o_blocks {
        let data: Vec<u8> = (block..block + n)
            .flat_map(|b| stamped_block(b, 100 + round))
            .collect();
        nbd_write(lab, block, &data);
    }
    // The survivor's view of all written regions, before the reconnection.
    let regions: Vec<(u64, u64)> = k_blocks.iter().chain(&o_blocks).copied().collect();
    let survivor_md5: Vec<String> = regions
        .iter()
        .map(|&(b, n)| {
            if survivor == "kernel" {
                lab.kernel_md5("/dev/drbd0", b, n)
            } else {
                lab.our_md5(b, n)
            }
        })
        .collect();
    // With `both_primary` false the victim is demoted before the reconnection: the data
    // still diverged, so it is a split brain all the same (after-sb-1pri disconnect).
    if !both_primary {
        if survivor == "kernel" {
            lab.adm_ok(&["secondary", "r0"]);
        } else {
            lab.kernel_adm("secondary");
        }
    }
    // Reconnect: split brain on both sides.
    let dmark = lab.dmesg_mark();
    let lmark = lab.log_mark();
    lab.kernel_adm("connect");
    lab.adm_ok(&["connect", "r0"]);
    lab.kernel_wait("cs:StandAlone", 60);
    lab.wait_ours("StandAlone", Duration::from_secs(60), |l| {
        l.cstate() == "StandAlone"
    });
    let dmesg = lab.dmesg_since(dmark);
    let log = lab.log_since(lmark);
    assert!(
        dmesg.contains("Split-Brain detected"),
        "kernel dmesg lacks 'Split-Brain detected':\n{dmesg}\nour log:\n{log}"
    );
    assert!(
        log.contains("Split-Brain detected but unresolved"),
        "our log lacks 'Split-Brain detected but unresolved':\n{log}\nkernel:\n{dmesg}"
    );
    // Nobody retries.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.cstate(), "StandAlone");
    assert!(lab.kernel_state().contains("cs:StandAlone"));
    // Recovery.
    let dmark = lab.dmesg_mark();
    let lmark = lab.log_mark();
    if survivor == "kernel" {
        lab.adm_ok(&["secondary", "r0"]);
        lab.adm_ok(&["connect", "--discard-my-data", "r0"]);
        lab.kernel_adm("connect");
    } else {
        lab.kernel_adm("secondary");
        lab.kernel_adm("connect --discard-my-data");
        lab.adm_ok(&["connect", "r0"]);
    }
    lab.wait_in_sync(60);
    let dmesg = lab.dmesg_since(dmark);
    let log = lab.log_since(lmark);
    let kernel_role = if survivor == "kernel" {
        "SyncSource"
    } else {
        "SyncTarget"
    };
    assert!(
        dmesg.contains(&format!("Began resync as {kernel_role}")),
        "kernel dmesg:\n{dmesg}\nour log:\n{log}"
    );
    for (&(b, n), want) in regions.iter().zip(&survivor_md5) {
        // The backing disk: a Secondary's /dev/drbd0 cannot be opened in 8.4.
        assert_eq!(
            &lab.kernel_md5("/dev/vda", b, n),
            want,
            "kernel blocks {b}..+{n} after recovery (survivor {survivor})"
        );
        assert_eq!(
            &lab.our_md5(b, n),
            want,
            "our blocks {b}..+{n} after recovery (survivor {survivor})"
        );
    }
    lab.assert_same_data();
}

/// Scenario 8: split brain with both nodes Primary; resolved with `--discard-my-data` on our
/// side (the kernel survives), then, in a second split brain, on the kernel's side.
#[test]
fn split_brain_detected_and_resolved_by_discard_my_data() {
    if lab_skip() {
        return;
    }
    split_brain_test(true);
}

/// Scenario 8 with the victim demoted before the reconnection (one Primary, diverged data).
#[test]
fn split_brain_one_primary_resolved_by_discard_my_data() {
    if lab_skip() {
        return;
    }
    split_brain_test(false);
}

fn split_brain_test(both_primary: bool) {
    let mut lab = kernel_primary_in_sync();
    split_brain_round(&mut lab, "kernel", 0, both_primary);
    lab.kernel_wait("ro:Primary/Secondary", 10);
    assert_eq!(lab.role(), "Secondary/Primary");
    split_brain_round(&mut lab, "ours", 1, both_primary);
    lab.kernel_wait("ro:Secondary/Primary", 10);
    assert_eq!(lab.role(), "Primary/Secondary");
    let _ = lab.finish();
}

/// Scenario 9: the kernel Primary detaches its disk and keeps working Diskless, reading and
/// writing through our node (P_DATA_REQUEST / P_DATA_REPLY, and P_DATA that we mark out of
/// sync for its disk). When it attaches again while connected, the blocks written meanwhile
/// are resynced to its disk from our bitmap. Then the same the other way round: our node
/// detaches under the kernel Primary's writes and gets them back by a resync on attach.
#[test]
fn diskless_kernel_primary_reads_and_writes_through_ours() {
    if lab_skip() {
        return;
    }
    let mut lab = kernel_primary_in_sync();
    lab.kernel_adm("detach");
    lab.kernel_wait("ds:Diskless/UpToDate", 30);
    // Reads through us: what the kernel reads is what our disk holds.
    assert_eq!(lab.kernel_md5("/dev/drbd0", 256, 64), lab.our_md5(256, 64));
    // Writes through us land on our disk.
    lab.rpc_ok(
        "dd if=/dev/urandom of=/dev/drbd0 bs=4k count=8 seek=512 oflag=direct conv=notrunc 2>/dev/null",
    );
    assert_eq!(lab.kernel_md5("/dev/drbd0", 512, 8), lab.our_md5(512, 8));
    // Our node holds the only copy of those writes: they are out of sync for the kernel.
    assert_eq!(lab.dstate(), "UpToDate/Diskless");
    assert_ne!(lab.kernel_md5("/dev/vda", 512, 8), lab.our_md5(512, 8));

    // Re-attach while connected: our bitmap drives a resync to the kernel's disk.
    attach_and_resync(
        &lab,
        |l| drop(l.kernel_adm("attach")),
        "SyncTarget",
        (512, 8),
    );

    // Our node detaches; the kernel Primary writes; our attach resyncs those blocks to us.
    lab.adm_ok(&["detach", "r0"]);
    lab.kernel_wait("ds:UpToDate/Diskless", 30);
    lab.rpc_ok(
        "dd if=/dev/urandom of=/dev/drbd0 bs=4k count=4 seek=1500 oflag=direct conv=notrunc 2>/dev/null",
    );
    assert_ne!(lab.kernel_md5("/dev/vda", 1500, 4), lab.our_md5(1500, 4));
    attach_and_resync(
        &lab,
        |l| drop(l.adm_ok(&["attach", "r0"])),
        "SyncSource",
        (1500, 4),
    );
    let _ = lab.finish();
}

/// Runs `attach` on one side while connected and waits for the resync it starts: the kernel
/// logs its part in it (`kernel_role`), and the `blocks` written meanwhile are then the same
/// on both disks, as are the whole data areas.
fn attach_and_resync(lab: &Lab, attach: impl Fn(&Lab), kernel_role: &str, blocks: (u64, u64)) {
    let mark = lab.dmesg_mark();
    attach(lab);
    lab.wait_in_sync(60);
    let dmesg = lab.dmesg_since(mark);
    assert!(
        dmesg.contains(&format!("Began resync as {kernel_role}")),
        "kernel log after attach:\n{dmesg}"
    );
    let (skip, count) = blocks;
    assert_eq!(
        lab.kernel_md5("/dev/vda", skip, count),
        lab.our_md5(skip, count)
    );
    lab.assert_same_data();
}

/// `P_SUPERSEDED` and `P_RETRY_WRITE`: the resolving node's answers to concurrent writes.
const P_SUPERSEDED: u16 = 0x18;
const P_RETRY_WRITE: u16 = 0x2c;

/// The kernel's part of the dual-primary hammering: four background loops of O_DIRECT
/// writes into the first 256 KiB, 4 KiB blocks and single sectors mixed; each loop appends
/// to /tmp/dp.done when it ends.
const KERNEL_HAMMER: &str = r#"rm -f /tmp/dp.done /tmp/dp.err
for t in 1 2 3 4; do
  ( i=0
    while [ $i -lt 50 ]; do
      if [ $((RANDOM % 2)) = 0 ]; then
        n=$((RANDOM % 4 + 1)); s=$((RANDOM % (65 - n)))
        dd if=/dev/urandom of=/dev/drbd0 bs=4k count=$n seek=$s oflag=direct conv=notrunc 2>/dev/null || echo "4k $s+$n" >> /tmp/dp.err
      else
        n=$((RANDOM % 8 + 1)); s=$((RANDOM % (513 - n)))
        dd if=/dev/urandom of=/dev/drbd0 bs=512 count=$n seek=$s oflag=direct conv=notrunc 2>/dev/null || echo "512 $s+$n" >> /tmp/dp.err
      fi
      i=$((i + 1))
    done
    echo $t >> /tmp/dp.done ) &
done"#;

/// Scenario 6: both Primary (allow-two-primaries), both write the same blocks at the same
/// time, the kernel through its device and ours through the NBD export; afterwards nothing is
/// out of sync and both disks are identical. Once with the kernel resolving conflicts (it
/// accepts the connection, being up first) and once with our node resolving.
#[test]
fn dual_primary_concurrent_writes_end_identical() {
    if lab_skip() {
        return;
    }
    for first in ["kernel", "ours"] {
        let two = tests::lab::Side {
            net_extra: "allow-two-primaries yes;".into(),
            ..tests::lab::Side::default()
        };
        // The node that accepts the connection resolves conflicts. Ours up first with a long
        // connect-int: the kernel connects to it as it comes up, before ours tries again.
        let ours = tests::lab::Side {
            connect_int: if first == "ours" { 20 } else { 2 },
            ..two.clone()
        };
        let mut lab = Lab::new(LabSpec {
            ours,
            kernel: two,
            ..LabSpec::default()
        });
        if first == "ours" {
            // Ours first, and long enough alone that its first attempt to connect (within
            // 8/49 of connect-int 20 s) has failed: the kernel then connects to it, and
            // ours does not try again for 17 s at least.
            lab.kernel_create_md();
            lab.start_daemon();
            lab.adm_ok(&["up", "r0"]);
            std::thread::sleep(Duration::from_secs(5));
            lab.kernel_adm("up");
            lab.kernel_wait("cs:Connected", 60);
            lab.wait_ours("Connected", Duration::from_secs(60), |l| {
                l.cstate() == "Connected"
            });
        } else {
            connect(&mut lab, first);
        }
        let ours_resolve = lab.log().contains("resolve_conflicts=true");
        assert_eq!(
            ours_resolve,
            first == "ours",
            "who resolves conflicts:\n{}",
            lab.log()
        );
        lab.kernel_adm("primary --force");
        lab.wait_in_sync(120);
        lab.adm_ok(&["primary", "r0"]);
        lab.kernel_wait("ro:Primary/Primary", 10);
        assert_eq!(lab.role(), "Primary/Primary");

        lab.rpc_ok(KERNEL_HAMMER);
        let mut nbd = NbdClient::connect(&lab.nbd_socket(), "r0").expect("NBD connect");
        let mut rng = fastrand::Rng::with_seed(7);
        let mut k = 0u64;
        let kernel_done =
            |lab: &Lab| lab.rpc_ok("cat /tmp/dp.done 2>/dev/null | wc -l").trim() == "4";
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while !kernel_done(&lab) {
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel's writes did not finish"
            );
            // A burst of our writes between polls, into the same 256 KiB.
            for _ in 0..20 {
                let (offset, len) = if rng.bool() {
                    let blocks = rng.u64(1..=4);
                    (rng.u64(0..=64 - blocks) * 4096, blocks * 4096)
                } else {
                    let sectors = rng.u64(1..=8);
                    (rng.u64(0..=512 - sectors) * 512, sectors * 512)
                };
                let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
                nbd.write(offset, &data).expect("NBD write");
                k += 1;
            }
        }
        nbd.flush().expect("flush");
        drop(nbd);
        let errors = lab.rpc_ok("cat /tmp/dp.err 2>/dev/null; true");
        assert!(
            errors.trim().is_empty(),
            "the kernel's writes failed: {errors}"
        );

        lab.wait_in_sync(60);
        assert_eq!(lab.statistic("out-of-sync"), 0);
        assert!(lab.proc_drbd().contains("oos:0"), "{}", lab.proc_drbd());
        // Both devices read the same, and so do both disks.
        let ours_view = {
            let mut nbd = NbdClient::connect(&lab.nbd_socket(), "r0").expect("NBD connect");
            md5_bytes(&nbd.read(0, 256 << 10).expect("read"))
        };
        assert_eq!(lab.kernel_md5("/dev/drbd0", 0, 64), ours_view);
        lab.assert_same_data();
        let cap = lab.finish();
        let resolver = if first == "kernel" {
            KERNEL_IP
        } else {
            HOST_IP
        };
        let answers = cap.count(P_SUPERSEDED, Some(resolver), None, None)
            + cap.count(P_RETRY_WRITE, Some(resolver), None, None);
        eprintln!(
            "{first} up first: {k} writes of ours, {answers} conflicts answered by {resolver}; {}",
            cap.summary()
        );
    }
}

/// Runs an online verify started on `initiator` ("kernel" or "ours") and waits until both
/// nodes are Connected again; returns the initiator's log lines of this verify.
fn run_verify(lab: &Lab, initiator: &str) -> String {
    let mark = lab.dmesg_mark();
    let lmark = lab.log_mark();
    if initiator == "kernel" {
        lab.kernel_adm("verify");
    } else {
        lab.adm_ok(&["verify", "r0"]);
    }
    let done = |l: &Lab| {
        let log = if initiator == "kernel" {
            l.dmesg_since(mark)
        } else {
            l.log_since(lmark)
        };
        log.contains("Online verify done")
    };
    assert!(
        eventually(Duration::from_secs(120), || done(lab)
            && lab.cstate() == "Connected"
            && lab.kernel_state().contains("cs:Connected")),
        "verify from {initiator} did not end: kernel\n{}\nours\n{}",
        lab.dmesg_since(mark),
        lab.log_since(lmark)
    );
    if initiator == "kernel" {
        lab.dmesg_since(mark)
    } else {
        lab.log_since(lmark)
    }
}

/// The kernel's out-of-sync count in KiB (`oos:` of /proc/drbd).
fn kernel_oos(lab: &Lab) -> u64 {
    let p = lab.proc_drbd();
    p.split_whitespace()
        .find_map(|w| w.strip_prefix("oos:"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no oos in {p}"))
}

/// Scenario 7: online verify started on each side (sha1 from the kernel, crc32c from ours)
/// finds nothing on identical data, then finds blocks changed behind DRBD's back on either
/// disk; both nodes mark them out of sync, and a disconnect/connect resyncs them.
#[test]
fn online_verify_with_the_kernel_from_either_side() {
    if lab_skip() {
        return;
    }
    for (alg, initiator) in [("sha1", "kernel"), ("crc32c", "ours")] {
        let mut lab = kernel_primary_in_sync_with(&format!("verify-alg {alg};"));

        let clean = run_verify(&lab, initiator);
        assert!(
            !clean.contains("out of sync!"),
            "{initiator} ({alg}):\n{clean}"
        );
        assert_eq!(lab.statistic("out-of-sync"), 0);
        assert_eq!(kernel_oos(&lab), 0);

        // One block differs on the kernel's disk, two adjacent ones on ours.
        lab.rpc_ok(
            "dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=100 oflag=direct conv=notrunc 2>/dev/null",
        );
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&lab.disk)
                .expect("our disk");
            f.seek(SeekFrom::Start(2000 * 4096)).expect("seek");
            f.write_all(&[0x5a; 8192]).expect("write");
            f.sync_all().expect("sync");
        }
        let found = run_verify(&lab, initiator);
        assert!(
            found.contains("Online verify found 3 4k block out of sync!"),
            "{initiator} ({alg}):\n{found}"
        );
        assert_eq!(lab.statistic("out-of-sync"), 12, "ours");
        assert_eq!(kernel_oos(&lab), 12, "kernel");
        // The kernel is Primary: reconnecting resyncs the three blocks from it.
        lab.kernel_adm("disconnect");
        lab.kernel_adm("connect");
        lab.wait_in_sync(60);
        lab.assert_same_data();
        let cap = lab.finish();
        let (asker, answerer) = if initiator == "kernel" {
            (KERNEL_IP, HOST_IP)
        } else {
            (HOST_IP, KERNEL_IP)
        };
        assert!(cap.count(P_OV_REQUEST, Some(asker), None, None) >= 2 * 4086);
        assert!(cap.count(P_OV_REPLY, Some(answerer), None, None) >= 2 * 4086);
        assert!(cap.count(P_OV_RESULT, Some(asker), None, None) >= 2 * 4086);
    }
}

const P_OV_REQUEST: u16 = 0x1e;
const P_OV_REPLY: u16 = 0x1f;
const P_OV_RESULT: u16 = 0x20;

/// `P_CSUM_RS_REQUEST` and `P_RS_IS_IN_SYNC`: checksum-based resync.
const P_CSUM_RS_REQUEST: u16 = 0x21;
const P_RS_IS_IN_SYNC: u16 = 0x22;

/// Checksum-based resync (`csums-alg md5`) both ways on identical disks, and full syncs
/// started by `invalidate` / `invalidate-remote` on either side (8.4's cluster-wide
/// StartingSyncS / StartingSyncT requests): the SyncSource answers the target's digests with
/// P_RS_IS_IN_SYNC and no block travels.
#[test]
fn checksum_based_resync_both_ways() {
    if lab_skip() {
        return;
    }
    let side = tests::lab::Side {
        net_extra: "csums-alg md5;".into(),
        ..tests::lab::Side::default()
    };
    let mut lab = Lab::new(LabSpec {
        ours: side.clone(),
        kernel: side,
        random_disks: false,
        ..LabSpec::default()
    });
    connect(&mut lab, "kernel");
    let mut windows = Vec::new();
    let t0 = now();
    lab.kernel_adm("primary --force");
    lab.wait_in_sync(120);
    windows.push(("kernel primary --force", HOST_IP, t0, now()));
    assert!(lab.log().contains("checksum based"), "{}", lab.log());
    lab.kernel_adm("secondary");
    for (what, target) in [
        ("ours invalidate-remote", KERNEL_IP),
        ("kernel invalidate", KERNEL_IP),
        ("ours invalidate", HOST_IP),
        ("kernel invalidate-remote", HOST_IP),
    ] {
        let mark = lab.dmesg_mark();
        let t0 = now();
        match what {
            "ours invalidate-remote" => drop(lab.adm_ok(&["invalidate-remote", "r0"])),
            "ours invalidate" => drop(lab.adm_ok(&["invalidate", "r0"])),
            "kernel invalidate" => drop(lab.kernel_adm("invalidate")),
            _ => drop(lab.kernel_adm("invalidate-remote")),
        }
        let done = if target == KERNEL_IP {
            "Resync done"
        } else {
            "Began resync as SyncSource"
        };
        assert!(
            eventually(Duration::from_secs(60), || lab
                .dmesg_since(mark)
                .contains(done)),
            "{what}: {}",
            lab.dmesg_since(mark)
        );
        lab.wait_in_sync(60);
        let dmesg = lab.dmesg_since(mark);
        if target == KERNEL_IP {
            assert!(
                dmesg.contains("100 % had equal checksums"),
                "{what}: {dmesg}"
            );
        }
        windows.push((what, target, t0, now()));
    }
    assert!(
        lab.log().matches("100 % had equal checksums").count() >= 3,
        "{}",
        lab.log()
    );
    lab.assert_same_data();
    let cap = lab.finish();
    assert_eq!(
        cap.count(cmd::P_RS_DATA_REPLY, None, None, None),
        0,
        "{}",
        cap.summary()
    );
    for (what, target, t0, t1) in windows {
        let source = if target == HOST_IP {
            KERNEL_IP
        } else {
            HOST_IP
        };
        let asked = cap.count(P_CSUM_RS_REQUEST, Some(target), Some(t0), Some(t1));
        let same = cap.count(P_RS_IS_IN_SYNC, Some(source), Some(t0), Some(t1));
        assert!(
            asked > 0 && same > 0,
            "{what}: {asked} digests, {same} in-sync answers"
        );
    }
}

/// data-integrity-alg (crc32c, then sha1) on both sides: the full sync from the kernel
/// (P_RS_DATA_REPLY), the kernel's writes (P_DATA) and ours carry digests each side computes
/// and checks; neither finds a damaged packet, and the disks end identical.
#[test]
fn data_integrity_digests_agree_with_the_kernel() {
    if lab_skip() {
        return;
    }
    for alg in ["crc32c", "sha1"] {
        let mut lab = kernel_primary_in_sync_with(&format!("data-integrity-alg {alg};"));
        lab.rpc_ok(
            "dd if=/dev/urandom of=/dev/drbd0 bs=4k count=16 seek=100 oflag=direct conv=notrunc 2>/dev/null",
        );
        lab.kernel_adm("secondary");
        lab.adm_ok(&["primary", "r0"]);
        let data: Vec<u8> = (300..316).flat_map(|b| stamped_block(b, 5)).collect();
        nbd_write(&lab, 300, &data);
        lab.wait_in_sync(30);
        lab.assert_same_data();
        let dmesg = lab.dmesg();
        assert!(
            !dmesg.contains("Digest integrity check FAILED"),
            "{alg}: {dmesg}"
        );
        let log = lab.log();
        // Both sides agreed on it (P_PROTOCOL must name the same algorithm).
        assert!(
            log.contains(&format!("data-integrity-alg {alg}")),
            "{alg}: {log}"
        );
        assert!(!log.contains("integrity check failed"), "{alg}: {log}");
        assert_eq!(lab.cstate(), "Connected");
        assert!(!log.contains("connection lost"), "{alg}: {log}");
        let _ = lab.finish();
    }
}
