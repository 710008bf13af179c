//! The sans-IO core alone: two [`Device`]s connected with zero latency, every disk op
//! completing at once, messages delivered in order as soon as they are sent. What it
//! measures is the software ceiling of the replication state machine (writes/s), without
//! sockets, threads or disks.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use drbd_core::meta::flags::{MDF_CONSISTENT, MDF_WAS_UP_TO_DATE};
use drbd_core::meta::layout::AlGeometry;
use drbd_core::replication::activity_log::ActivityLog;
use drbd_core::replication::bitmap::DirtyBitmap;
use drbd_core::replication::device::{Action, AppOp, Device, DeviceConfig, DiskOp, LocalDisk};
use drbd_core::replication::msg::PeerMsg;
use drbd_core::replication::status::AdminRequest;
use drbd_core::state::{ConnState, Role};
use drbd_core::uuid::GenerationUuids;

/// Device size of the pair: 1 GiB.
pub const SECTORS: u64 = 1 << 21;

/// Two connected devices, node 0 Primary, both UpToDate with the same data generation.
pub struct CorePair {
    nodes: [Device; 2],
    /// Messages on their way, per receiving node, in sending order.
    wire: [VecDeque<PeerMsg>; 2],
    now: Duration,
    next_id: u64,
    /// Requests completed to the application.
    pub completed: u64,
}

impl CorePair {
    /// A connected pair ready for writes on node 0.
    pub fn new() -> CorePair {
        let uuid = 0x1234_5678_9abc_def0;
        let make = |n: u32| {
            let cfg = DeviceConfig {
                max_buffers: 8000,
                max_epoch_size: 8000,
                rng_seed: u64::from(n) * 2 + 2,
                ..DeviceConfig::default()
            };
            let local = LocalDisk {
                sectors: SECTORS,
                uuids: GenerationUuids::from_array([uuid, 0, 0, 0]),
                flags: MDF_CONSISTENT | MDF_WAS_UP_TO_DATE,
                bitmap: DirtyBitmap::new(SECTORS).expect("bitmap of a 1 GiB device"),
                al: ActivityLog::new(1237, AlGeometry::DEFAULT).expect("activity log"),
            };
            Device::new(cfg, 0, n, SECTORS, Some(local)).expect("device")
        };
        let mut p = CorePair {
            nodes: [make(0), make(1)],
            wire: [VecDeque::new(), VecDeque::new()],
            now: Duration::ZERO,
            next_id: 1,
            completed: 0,
        };
        let hellos = [p.nodes[0].local_hello(), p.nodes[1].local_hello()];
        for n in 0..2 {
            let peer = hellos[1 - n].as_seen_by_peer(101, 0xf, n == 0);
            p.nodes[n].connected(p.now, &peer, &hellos[n]);
        }
        p.settle();
        p.nodes[0]
            .admin(p.now, AdminRequest::Primary { force: false })
            .expect("node 0 becomes Primary");
        p.settle();
        assert_eq!(p.nodes[0].role(), Role::Primary);
        assert_eq!(p.nodes[1].conn_state(), ConnState::Connected);
        p
    }

    /// Submits `count` writes of `data` on node 0 at consecutive offsets from `sector` (with
    /// at most `depth` in flight) and runs the pair until all completed.
    pub fn write_batch(&mut self, sector: u64, data: &Bytes, count: u64, depth: u64) {
        let sectors = data.len() as u64 / 512;
        let start = self.completed;
        let mut issued = 0;
        while self.completed - start < count {
            while issued < count && issued - (self.completed - start) < depth {
                let id = self.next_id;
                self.next_id += 1;
                let s = (sector + issued * sectors) % (SECTORS - sectors);
                self.nodes[0].submit(
                    self.now,
                    id,
                    s,
                    AppOp::Write {
                        data: data.clone(),
                        fua: false,
                    },
                );
                issued += 1;
            }
            if !self.step() {
                // Nothing moved: let the timers run (barrier acks, epochs closing).
                self.now += Duration::from_millis(1);
                for n in 0..2 {
                    self.nodes[n].tick(self.now);
                }
            }
        }
    }

    /// Handles every pending action and message once; false when there were none.
    fn step(&mut self) -> bool {
        let mut moved = false;
        for n in 0..2 {
            while let Some(a) = self.nodes[n].poll_action() {
                moved = true;
                match a {
                    Action::Disk { io, op } => {
                        let data = match op {
                            DiskOp::Read { len, .. } => Some(Bytes::from(vec![0u8; len as usize])),
                            _ => None,
                        };
                        self.nodes[n].disk_done(self.now, io, Ok(data));
                    }
                    Action::Meta { io, .. } => self.nodes[n].disk_done(self.now, io, Ok(None)),
                    Action::Send(m) => self.wire[1 - n].push_back(m),
                    Action::Complete { result, .. } => {
                        assert!(result.is_ok(), "a write failed: {result:?}");
                        self.completed += 1;
                    }
                    Action::Disconnect { reason, .. } => panic!("node {n} disconnects: {reason}"),
                    Action::Handler(_) | Action::Log(_) => {}
                }
            }
            while let Some(m) = self.wire[n].pop_front() {
                if !self.nodes[n].can_receive() {
                    self.wire[n].push_front(m);
                    break;
                }
                moved = true;
                self.nodes[n]
                    .received(self.now, m)
                    .expect("the peer's messages are valid");
            }
        }
        moved
    }

    fn settle(&mut self) {
        while self.step() {}
    }
}

impl Default for CorePair {
    fn default() -> Self {
        CorePair::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_complete_on_the_zero_latency_pair() {
        let mut p = CorePair::new();
        let data = Bytes::from(vec![7u8; 4096]);
        p.write_batch(0, &data, 1000, 64);
        assert_eq!(p.completed, 1000);
        p.settle();
        assert!(p.nodes[0].is_idle() && p.nodes[1].is_idle());
    }
}
