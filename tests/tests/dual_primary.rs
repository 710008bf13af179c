//! Two `drbdd` Primaries (allow-two-primaries, protocol C) on loopback, written through both
//! NBD exports at once, many clients hammering the same blocks: the conflict resolution must
//! leave both replicas identical, and a block read through either node must be the same.

use std::time::Duration;

use tests::{NbdClient, Pair, PairSpec};

/// The region all clients write: 256 KiB.
const REGION: u64 = 256 << 10;
const CLIENTS_PER_NODE: usize = 4;
const WRITES_PER_CLIENT: u64 = 400;

/// Data of write `id`: every 16 bytes name the write and the offset inside it.
fn payload(id: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_exact_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&id.to_le_bytes());
        chunk[8..].copy_from_slice(&(i as u64).to_le_bytes());
    }
    v
}

#[test]
fn two_primaries_hammering_the_same_blocks_end_identical() {
    hammer(
        "127.0.0.1:7830",
        "127.0.0.2:7830",
        "allow-two-primaries yes;",
        8,
    );
}

/// With the smallest max-buffers (32 pages, 128 KiB) and writes up to 128 KiB, each node
/// often stops reading its data socket while peer writes wait for conflict decisions that
/// need what arrives on the meta socket: the replicas still end identical.
#[test]
fn two_primaries_with_the_smallest_max_buffers_end_identical() {
    hammer(
        "127.0.0.1:7831",
        "127.0.0.2:7831",
        "allow-two-primaries yes; max-buffers 32;",
        32,
    );
}

/// Both nodes Primary, `CLIENTS_PER_NODE` clients on each writing `WRITES_PER_CLIENT` writes
/// of 512-byte granular lengths up to 8 KiB or whole 4 KiB blocks up to `max_blocks`, all
/// inside `REGION`; then both replicas must be identical.
fn hammer(a: &'static str, b: &'static str, net_extra: &'static str, max_blocks: u64) {
    let mut p = Pair::new(PairSpec {
        addresses: [a, b],
        size_mib: 16,
        net_extra,
        ..PairSpec::default()
    });
    p.up_and_sync();
    p.adm_ok(1, &["primary", "r0"]);
    p.wait_until("both Primary", Duration::from_secs(10), |p| {
        p.role(0) == "Primary/Primary" && p.role(1) == "Primary/Primary"
    });

    let sockets = [p.nbd_socket(0), p.nbd_socket(1)];
    let workers: Vec<_> = (0..2 * CLIENTS_PER_NODE)
        .map(|c| {
            let socket = sockets[c % 2].clone();
            std::thread::spawn(move || {
                let max_blocks = max_blocks;
                let mut nbd = NbdClient::connect(&socket, "r0").expect("NBD connect");
                let mut rng = fastrand::Rng::with_seed(c as u64);
                for k in 0..WRITES_PER_CLIENT {
                    // 512-byte granular or whole 4 KiB blocks.
                    let (offset, len) = if rng.bool() {
                        let sectors = rng.u64(1..=16);
                        (rng.u64(0..=REGION / 512 - sectors) * 512, sectors * 512)
                    } else {
                        let blocks = rng.u64(1..=max_blocks);
                        (rng.u64(0..=REGION / 4096 - blocks) * 4096, blocks * 4096)
                    };
                    let id = (c as u64) << 32 | k;
                    nbd.write(offset, &payload(id, len as usize))
                        .unwrap_or_else(|e| panic!("client {c}: write {k}: {e:?}"));
                }
                nbd.flush().expect("flush");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("client thread");
    }

    // Nothing to resync: every write reached both disks.
    p.wait_in_sync(Duration::from_secs(30));
    for i in 0..2 {
        assert_eq!(p.statistic(i, "out-of-sync"), 0, "node {i}");
        assert_eq!(p.role(i), "Primary/Primary");
    }
    let mut views = Vec::new();
    for i in 0..2 {
        let mut nbd = NbdClient::connect(&p.nbd_socket(i), "r0").expect("NBD connect");
        views.push(nbd.read(0, REGION as u32).expect("read the region"));
    }
    assert!(views[0] == views[1], "the two exports read differently");
    assert!(
        p.data(0, REGION) == p.data(1, REGION),
        "the backing disks differ in the written region"
    );
    assert!(
        views[0] == p.data(0, REGION),
        "the export does not read the disk"
    );
    // The clients did collide: the resolving node resolved concurrent writes.
    let logs = format!("{}{}", p.log(0), p.log(1));
    assert!(
        logs.contains("Concurrent writes detected"),
        "no conflict was resolved; the test did not exercise the resolution"
    );
}

/// fio on both Primaries at queue depth 32 with 128 KiB writes into the same 4 MiB, with the
/// smallest max-buffers (32 pages: one such write fills it) and a 64 KiB sndbuf-size: each
/// node stops reading its data socket at nearly every write while conflict answers and
/// acknowledgements must still get through on the meta sockets in both directions. The
/// connection survives, nothing is left out of sync, and the replicas are identical.
#[test]
fn two_primaries_at_depth_with_small_buffers_keep_their_connection() {
    if tests::skip_unless(tests::have("fio"), "fio not installed") {
        return;
    }
    let mut p = Pair::new(PairSpec {
        addresses: ["127.0.0.1:7832", "127.0.0.2:7832"],
        size_mib: 16,
        net_extra: "allow-two-primaries yes; max-buffers 32; sndbuf-size 64k;",
        ..PairSpec::default()
    });
    p.up_and_sync();
    p.adm_ok(1, &["primary", "r0"]);
    p.wait_until("both Primary", Duration::from_secs(10), |p| {
        p.role(0) == "Primary/Primary" && p.role(1) == "Primary/Primary"
    });
    let marks = [p.log(0).len(), p.log(1).len()];
    let fios: Vec<_> = (0..2)
        .map(|i| {
            let uri = format!("--uri={}", p.nbd_uri(i));
            std::process::Command::new("fio")
                .args([
                    "--name=hammer",
                    "--ioengine=nbd",
                    &uri,
                    "--rw=randwrite",
                    "--bs=128k",
                    "--iodepth=32",
                    "--size=4M",
                    "--time_based",
                    "--runtime=4",
                    &format!("--randseed={}", 7 + i),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("fio")
        })
        .collect();
    for (i, f) in fios.into_iter().enumerate() {
        let out = f.wait_with_output().expect("fio runs");
        assert!(
            out.status.success(),
            "fio on node {i}: {}{}\n--- alpha\n{}\n--- bravo\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            p.log(0),
            p.log(1)
        );
    }
    for (i, &mark) in marks.iter().enumerate() {
        let log = p.log(i)[mark..].to_string();
        assert!(
            !log.contains("connection lost") && !log.contains("dropping the connection"),
            "node {i} lost its connection under load:\n{log}"
        );
    }
    p.wait_in_sync(Duration::from_secs(30));
    for i in 0..2 {
        assert_eq!(p.statistic(i, "out-of-sync"), 0, "node {i}");
    }
    let size = 4 << 20;
    assert!(
        p.data(0, size) == p.data(1, size),
        "the backing disks differ in the written region"
    );
    let logs = format!("{}{}", p.log(0), p.log(1));
    assert!(
        logs.contains("Concurrent writes detected"),
        "no conflict was resolved; the test did not exercise the resolution"
    );
}
