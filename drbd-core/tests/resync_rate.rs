//! The resync controller of two directly coupled devices (instant network, instant in-memory
//! disks, virtual time): the fixed rate (`c-plan-ahead 0`) and the dynamic controller's
//! `c-max-rate` bound the data moved per unit of time, and `c-min-rate` pauses the resync while
//! the application writes.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use drbd_core::meta::layout::AlGeometry;
use drbd_core::replication::activity_log::ActivityLog;
use drbd_core::replication::bitmap::DirtyBitmap;
use drbd_core::replication::device::{
    Action, AppOp, Device, DeviceConfig, DiskOp, LocalDisk, ResyncRate, RESYNC_STEP,
};
use drbd_core::replication::msg::PeerMsg;
use drbd_core::replication::status::AdminRequest;
use drbd_core::state::ConnState;
use drbd_core::uuid::GenerationUuids;

const SECTORS: u64 = 64 << 11; // 64 MiB

struct Node {
    dev: Device,
    disk: Vec<u8>,
    inbox: VecDeque<PeerMsg>,
}

fn node(rate: ResyncRate, seed: u64) -> Node {
    let cfg = DeviceConfig {
        resync: rate,
        rng_seed: seed,
        ..DeviceConfig::default()
    };
    let local = LocalDisk {
        sectors: SECTORS,
        uuids: GenerationUuids::just_created(),
        flags: 0,
        bitmap: DirtyBitmap::new(SECTORS).unwrap(),
        al: ActivityLog::new(1237, AlGeometry::DEFAULT).unwrap(),
    };
    Node {
        dev: Device::new(cfg, 0, 0, SECTORS, Some(local)).unwrap(),
        disk: vec![0; (SECTORS * 512) as usize],
        inbox: VecDeque::new(),
    }
}

/// Runs every action of both nodes until nothing is left: disk ops complete at once,
/// messages are delivered at once.
fn settle(nodes: &mut [Node; 2], now: Duration) {
    loop {
        let mut progress = false;
        for i in 0..2 {
            while let Some(a) = nodes[i].dev.poll_action() {
                progress = true;
                match a {
                    Action::Disk { io, op } => {
                        let n = &mut nodes[i];
                        let data = match op {
                            DiskOp::Read { sector, len } => {
                                let at = (sector * 512) as usize;
                                Some(Bytes::copy_from_slice(&n.disk[at..at + len as usize]))
                            }
                            DiskOp::Write { sector, data, .. } => {
                                let at = (sector * 512) as usize;
                                n.disk[at..at + data.len()].copy_from_slice(&data);
                                None
                            }
                            DiskOp::Discard { sector, len } | DiskOp::Zeroes { sector, len } => {
                                let at = (sector * 512) as usize;
                                n.disk[at..at + len as usize].fill(0);
                                None
                            }
                            DiskOp::Flush => None,
                        };
                        n.dev.disk_done(now, io, Ok(data));
                    }
                    Action::Meta { io, .. } => nodes[i].dev.disk_done(now, io, Ok(None)),
                    Action::Send(m) => nodes[1 - i].inbox.push_back(m),
                    Action::Disconnect { reason, .. } => panic!("disconnect: {reason}"),
                    Action::Complete { .. } | Action::Log(_) | Action::Handler(_) => {}
                }
            }
            while let Some(m) = nodes[i].inbox.pop_front() {
                progress = true;
                nodes[i].dev.received(now, m).expect("no protocol error");
            }
        }
        if !progress {
            return;
        }
    }
}

/// Two fresh nodes, connected; node 0 forced Primary: a full sync 0 -> 1 starts.
fn pair(rate: ResyncRate) -> [Node; 2] {
    let mut nodes = [node(rate, 1), node(rate, 2)];
    let now = Duration::ZERO;
    settle(&mut nodes, now);
    let hellos = [nodes[0].dev.local_hello(), nodes[1].dev.local_hello()];
    for i in 0..2 {
        let hello = hellos[1 - i].as_seen_by_peer(101, 0xf, i == 0);
        nodes[i].dev.connected(now, &hello, &hellos[i]);
    }
    settle(&mut nodes, now);
    nodes[0]
        .dev
        .admin(now, AdminRequest::Primary { force: true })
        .unwrap();
    settle(&mut nodes, now);
    assert_eq!(nodes[1].dev.conn_state(), ConnState::SyncTarget);
    nodes
}

/// KiB moved to the target after `steps` resync steps, with `write` called before each step.
fn run(
    nodes: &mut [Node; 2],
    steps: u32,
    mut write: impl FnMut(&mut [Node; 2], Duration, u32),
) -> u64 {
    let start = nodes[1].dev.status().received_kib;
    for k in 1..=steps {
        let now = RESYNC_STEP * k;
        write(nodes, now, k);
        for n in nodes.iter_mut() {
            n.dev.tick(now);
        }
        settle(nodes, now);
    }
    nodes[1].dev.status().received_kib - start
}

fn rate(rate_kib: u32, c_plan_ahead: u32, c_max_rate: u32, c_min_rate: u32) -> ResyncRate {
    ResyncRate {
        rate_kib,
        c_plan_ahead,
        c_max_rate,
        c_min_rate,
        ..ResyncRate::default()
    }
}

#[test]
fn fixed_rate_moves_resync_rate_per_second() {
    // 2 MiB/s for 2 s: 4 MiB, give or take one step's worth.
    let mut nodes = pair(rate(2048, 0, 102_400, 0));
    let moved = run(&mut nodes, 20, |_, _, _| {});
    let step = 2048 / 10;
    assert!(
        (4096 - step..=4096 + step).contains(&moved),
        "moved {moved} KiB in 2 s at 2048 KiB/s"
    );
}

#[test]
fn dynamic_controller_is_bounded_by_c_max_rate() {
    // The controller starts from resync-rate and is capped at c-max-rate (4 MiB/s).
    let mut nodes = pair(rate(100_000, 20, 4096, 0));
    let moved = run(&mut nodes, 20, |_, _, _| {});
    assert!(
        moved <= 8192 + 410,
        "moved {moved} KiB in 2 s with c-max-rate 4096"
    );
    assert!(moved >= 4096, "moved only {moved} KiB in 2 s");
}

#[test]
fn c_min_rate_pauses_the_resync_while_the_application_writes() {
    let app_writes = |nodes: &mut [Node; 2], now: Duration, k: u32| {
        // 64 KiB of application writes per step on the Primary, replicated to the target.
        let data = Bytes::from(vec![k as u8; 64 << 10]);
        nodes[0].dev.submit(
            now,
            u64::from(k),
            (u64::from(k) % 100) * 128,
            AppOp::Write { data, fua: false },
        );
        settle(nodes, now);
    };
    // Without writes the resync runs at the fixed rate.
    let mut quiet = pair(rate(4096, 0, 102_400, 250));
    let moved_quiet = run(&mut quiet, 20, |_, _, _| {});
    // With writes and c-min-rate 250 KiB/s: the resync pauses until its average rate falls
    // below c-min-rate, runs one step, pauses again.
    let mut busy = pair(rate(4096, 0, 102_400, 250));
    let moved_busy = run(&mut busy, 20, app_writes);
    // With writes and c-min-rate 0 (no throttling): full speed.
    let mut unthrottled = pair(rate(4096, 0, 102_400, 0));
    let moved_unthrottled = run(&mut unthrottled, 20, app_writes);
    assert!(moved_quiet >= 7000, "quiet resync moved {moved_quiet} KiB");
    assert!(
        moved_unthrottled >= 7000,
        "unthrottled resync moved {moved_unthrottled} KiB"
    );
    assert!(
        moved_busy * 3 <= moved_quiet,
        "throttled resync moved {moved_busy} KiB, unthrottled {moved_quiet} KiB"
    );
}

#[test]
fn status_reports_progress_rate_and_time_left() {
    // 2 MiB/s for 3 s of a 64 MiB full sync: about 6 MiB done, 58 MiB left at 2 MiB/s.
    let mut nodes = pair(rate(2048, 0, 102_400, 0));
    let moved = run(&mut nodes, 30, |_, _, _| {});
    let total = SECTORS / 8;
    for (i, role) in [(0, "SyncSource"), (1, "SyncTarget")] {
        let st = nodes[i].dev.status();
        let r = st
            .resync
            .unwrap_or_else(|| panic!("{role} reports no resync progress"));
        assert_eq!(r.total_blocks, total, "{role}");
        let remaining = total - moved / 4;
        assert!(
            r.remaining_blocks.abs_diff(remaining) <= 64,
            "{role}: {} blocks left, {remaining} expected",
            r.remaining_blocks
        );
        let done = (total - r.remaining_blocks) as f64 * 100.0 / total as f64;
        assert!(
            (r.percent_done() - done).abs() <= 0.1,
            "{role}: done:{} for {done:.2} %",
            r.percent_done()
        );
        assert!(
            (1800..=2300).contains(&r.rate_kib_s),
            "{role}: rate {} KiB/s at resync-rate 2048",
            r.rate_kib_s
        );
        let expect_eta = r.remaining_blocks * 4 / 2048;
        assert!(
            r.eta_s.abs_diff(expect_eta) <= expect_eta / 5 + 1,
            "{role}: {} s left, about {expect_eta} expected",
            r.eta_s
        );
    }
}
