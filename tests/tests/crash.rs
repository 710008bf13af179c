//! kill -9 of the Secondary and of the Primary during a write stream: after restart and
//! resync no acknowledged write is lost, and after a Primary crash exactly the regions of its
//! activity log are resynced.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair, PairSpec};

/// 4 KiB blocks per 4 MiB activity-log extent.
const BLOCKS_PER_EXTENT: u64 = 1024;

/// What the writer got acknowledged: block -> generation of the last acknowledged write, and
/// the write in flight when it stopped (block, generation), whose data may or may not be
/// anywhere.
#[derive(Default)]
struct Acked {
    last: BTreeMap<u64, u64>,
    in_flight: Option<(u64, u64)>,
    count: u64,
}

/// A writer thread: what it got acknowledged, and a flag that stops it.
struct Writer {
    handle: thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
}

/// Writes stamped blocks inside `extents` (round robin) until stopped or an error.
fn writer(p: &Pair, node: usize, extents: Vec<u64>) -> Writer {
    let socket = p.nbd_socket(node);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let handle = {
        let (stop, acked) = (stop.clone(), acked.clone());
        thread::spawn(move || {
            let mut c = NbdClient::connect(&socket, "r0").expect("connect");
            let mut generation = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let e = extents[(generation as usize) % extents.len()];
                let block = e * BLOCKS_PER_EXTENT + (generation * 37) % BLOCKS_PER_EXTENT;
                acked.lock().unwrap().in_flight = Some((block, generation));
                if c.write(block * 4096, &stamped_block(block, generation))
                    .is_err()
                {
                    return;
                }
                let mut a = acked.lock().unwrap();
                a.last.insert(block, generation);
                a.in_flight = None;
                a.count += 1;
                generation += 1;
            }
        })
    };
    Writer {
        handle,
        stop,
        acked,
    }
}

fn wait_for_writes(acked: &Mutex<Acked>, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().count < n {
        assert!(
            std::time::Instant::now() < deadline,
            "writer made no progress"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Every acknowledged write is what `read` returns for its block (or the write that was in
/// flight for the same block, which may have reached the disk).
fn check_acked(acked: &Acked, mut read: impl FnMut(u64) -> Vec<u8>) {
    for (&block, &generation) in &acked.last {
        let got = read(block);
        let ok = got == stamped_block(block, generation)
            || acked
                .in_flight
                .is_some_and(|(b, g)| b == block && got == stamped_block(block, g));
        assert!(
            ok,
            "acknowledged write of block {block} (generation {generation}) lost"
        );
    }
}

/// The number of activity-log extents the daemon replayed at attach, from its log.
fn replayed_extents(log: &str) -> u64 {
    log.split("sectors, disk engine")
        .nth(1)
        .and_then(|s| s.split(" activity-log extents replayed").next())
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no replay count in log:\n{log}"))
}

fn read_file_block(p: &Pair, node: usize, block: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(&p.nodes[node].disk).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, block * 4096).unwrap();
    b
}

fn export_size(p: &Pair, node: usize) -> u64 {
    NbdClient::connect(&p.nbd_socket(node), "r0").unwrap().size
}

fn new_pair(port: u16) -> Pair {
    let a = format!("127.0.0.1:{port}");
    let b = format!("127.0.0.2:{port}");
    let a: &'static str = Box::leak(a.into_boxed_str());
    let b: &'static str = Box::leak(b.into_boxed_str());
    Pair::new(PairSpec {
        addresses: [a, b],
        // The smallest activity log; the writers touch only a few extents anyway.
        disk_extra: "al-extents 67;",
        ..PairSpec::default()
    })
}

#[test]
fn kill_secondary_during_writes_then_resync_loses_nothing() {
    let mut p = new_pair(7820);
    p.up_and_sync();
    let w = writer(&p, 0, vec![1, 6, 11]);
    let acked = w.acked.clone();
    wait_for_writes(&acked, 300);
    p.kill9(1);
    // The Primary goes on alone.
    let n = acked.lock().unwrap().count;
    wait_for_writes(&acked, n + 300);
    assert_ne!(p.cstate(0), "Connected");
    w.stop.store(true, Ordering::Relaxed);
    w.handle.join().unwrap();
    assert!(p.statistic(0, "out-of-sync") > 0);
    p.start(1);
    p.adm_ok(1, &["up", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let acked = acked.lock().unwrap();
    check_acked(&acked, |b| read_file_block(&p, 1, b));
    let size = export_size(&p, 0);
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
}

#[test]
fn kill_primary_during_writes_then_failover_and_rejoin() {
    let mut p = new_pair(7821);
    p.up_and_sync();
    let w = writer(&p, 0, vec![2, 9]);
    let acked = w.acked.clone();
    wait_for_writes(&acked, 500);
    p.kill9(0);
    w.handle.join().unwrap();
    // Failover: the survivor has every acknowledged write.
    p.wait_until("bravo notices the loss", Duration::from_secs(30), |p| {
        p.cstate(1) != "Connected"
    });
    p.adm_ok(1, &["primary", "r0"]);
    let acked = acked.lock().unwrap();
    let mut c = NbdClient::connect(&p.nbd_socket(1), "r0").unwrap();
    check_acked(&acked, |b| c.read(b * 4096, 4096).unwrap());
    drop(c);
    // The old Primary comes back as Secondary and is resynced from the new Primary: the
    // regions of its activity log (it crashed) and nothing else, since the new Primary wrote
    // nothing.
    let before = p.log(0).len();
    p.start(0);
    p.adm_ok(0, &["up", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let log = p.log(0)[before..].to_string();
    let extents = replayed_extents(&log);
    assert!(
        extents >= 2,
        "the crashed primary's activity log held {extents} extents:\n{log}"
    );
    assert!(log.contains("resync started as SyncTarget"), "{log}");
    let received = p.statistic(0, "received");
    assert_eq!(
        received,
        extents * 4096,
        "resync moved {received} KiB for {extents} extents\n--- alpha\n{log}\n--- bravo\n{}",
        p.log(1)
    );
    assert_eq!(p.role(0), "Secondary/Primary");
    let size = export_size(&p, 1);
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
}

#[test]
fn kill_primary_and_restart_it_resyncs_its_activity_log_to_the_peer() {
    let mut p = new_pair(7822);
    p.up_and_sync();
    let w = writer(&p, 0, vec![3, 12]);
    let acked = w.acked.clone();
    wait_for_writes(&acked, 500);
    p.kill9(0);
    w.handle.join().unwrap();
    p.wait_until("bravo notices the loss", Duration::from_secs(30), |p| {
        p.cstate(1) != "Connected"
    });
    let received_before = p.statistic(1, "received");
    let before = p.log(0).len();
    p.start(0);
    p.adm_ok(0, &["up", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let log = p.log(0)[before..].to_string();
    // Same data generation on both: the crashed Primary is the source of its AL extents.
    assert!(log.contains("resync started as SyncSource"), "{log}");
    let extents = replayed_extents(&log);
    let received = p.statistic(1, "received") - received_before;
    assert_eq!(
        received,
        extents * 4096,
        "resync moved {received} KiB for {extents} extents\n--- alpha\n{log}\n--- bravo\n{}",
        p.log(1)
    );
    let acked = acked.lock().unwrap();
    check_acked(&acked, |b| read_file_block(&p, 1, b));
    let size = export_size(&p, 0);
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
}

#[test]
fn sigterm_of_the_primary_during_writes_finishes_cleanly_and_loses_nothing() {
    let mut p = new_pair(7823);
    p.up_and_sync();
    let w = writer(&p, 0, vec![4, 10]);
    let acked = w.acked.clone();
    wait_for_writes(&acked, 300);
    // SIGTERM while the writer streams: drbdd finishes or fails what is in flight, writes
    // its metadata and exits 0; the writer's next request fails.
    assert_eq!(p.stop(0), Some(0), "exit code of drbdd on SIGTERM");
    w.handle.join().unwrap();
    let acked = acked.lock().unwrap();
    assert!(acked.count >= 300);
    // Protocol C: what alpha acknowledged is on bravo, and on alpha's own disk.
    check_acked(&acked, |b| read_file_block(&p, 1, b));
    check_acked(&acked, |b| read_file_block(&p, 0, b));
    // The clean shutdown left a clean activity log: nothing to replay at the restart, and
    // the two come back in sync (a write cut off mid-way, if any, is resynced from alpha's
    // bitmap).
    let before = p.log(0).len();
    p.start(0);
    p.adm_ok(0, &["up", "r0"]);
    p.wait_in_sync(Duration::from_secs(60));
    let log = p.log(0)[before..].to_string();
    assert_eq!(replayed_extents(&log), 0, "{log}");
    let size = export_size(&p, 0);
    assert!(p.data(0, size) == p.data(1, size), "the replicas differ");
}
