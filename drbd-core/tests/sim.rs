//! Deterministic simulation of two nodes running the replication state machine
//! ([`Device`]): no sockets, no threads, no wall clock.
//!
//! # Structure
//!
//! * One event queue ordered by (virtual time, sequence number); everything random comes from
//!   one seeded generator, so a seed replays exactly.
//! * **Disks**: each node has a data disk with a durable image and a volatile cache of
//!   completed but unflushed writes (a write lands in the cache, FUA writes and flushes make
//!   data durable; a flush covers the writes completed before it was submitted), and a
//!   metadata area (superblock UUIDs and flags, the bitmap pages, the activity-log ring) that
//!   is durable when a metadata write completes. Operations complete after a random latency,
//!   in any order. Data carries a stamp (write id and sector) in every sector, so the disks
//!   store one version id per sector and the checkers know which write a sector holds.
//! * **Network**: one link at a time, with two FIFO sockets per direction
//!   ([`PeerMsg::socket`]); messages get random delays (with spikes), so messages on
//!   different sockets overtake each other. A link breaks (network failure, crash, or a
//!   [`Action::Disconnect`]); each socket then delivers a random prefix of what was in flight,
//!   each node notices after its own delay, and the nodes reconnect after a random delay
//!   while the network is up. The data socket stops being read while the receiver's
//!   `can_receive()` is false.
//! * **Crashes**: a process kill keeps the disks' volatile caches and applies in-flight writes
//!   completely, partly or not at all; a power loss keeps each unflushed write with
//!   probability 1/2 and drops in-flight data writes. In-flight metadata writes may or may not
//!   land (AL transactions: a prefix of their bitmap pages and AL block). A restarted node
//!   attaches like the runtime does: UUIDs and flags from the superblock, the bitmap with the
//!   replayed activity-log extents marked, an empty activity log continuing the transaction
//!   numbers.
//! * **Parameters** per seed: protocol A, B or C; `max-buffers`, `max-epoch-size`, a fixed
//!   or a dynamic resync rate, latencies, the share of flushes (none in some seeds) and FUA
//!   writes. Most seeds use a 16 MiB device; one in ten a 320 MiB device with the smallest
//!   activity log (67 extents), so that extents get evicted.
//! * **Scenario**: both nodes start from fresh metadata, connect, node A is forced Primary
//!   (the initial full sync A -> B must happen), then a workload of random writes (4 KiB
//!   aligned and 512-byte granular, never overlapping an unfinished request), FUA writes,
//!   flushes, reads, discards and zeroing runs on the Primary while faults happen: network
//!   failures, delay spikes on one socket, process kills and power losses of either node,
//!   and planned switchovers (the Primary drains, demotes, the peer is promoted once it saw
//!   the demotion). When the Primary crashes while its peer is Connected and UpToDate, the
//!   peer is promoted (failover) and the old Primary must become SyncTarget when it returns;
//!   otherwise the last Primary is promoted again after its restart (never anything that
//!   could make a split brain). Then the workload stops, the network heals, crashed nodes
//!   restart, and the run waits until both nodes are Connected, UpToDate/UpToDate, idle.
//!
//! # Checkers
//!
//! 1. Protocol C: a write completed to the application while the connection was up and the
//!    same since the write was submitted is in the peer's disk view.
//! 2. After quiescence both disks (volatile over durable) are identical, both bitmaps clear
//!    and both nodes Connected UpToDate/UpToDate.
//! 3. No acknowledged write is lost: for every sector the final content is the last
//!    acknowledged write or a later one. Reads on the Primary obey the same rule. A power loss
//!    of the node holding the newest data (the Primary, or the last one) may lose what was
//!    acknowledged but not made durable (by a later completed flush, or FUA): only the durable
//!    ones count after it, unless its synced peer takes over. A power loss of the other node
//!    changes nothing (the Primary holds every acknowledged write). A failover under protocol
//!    A or B may lose what the new Primary never received: the expectation is rebased to the
//!    new Primary's data then; under protocol C the new Primary must hold every acknowledged
//!    write. An old Primary must resync as SyncTarget; the node holding the newest data (the
//!    last one promoted) never becomes WFBitMapT or SyncTarget.
//!
//! # Running
//!
//! `cargo test -p drbd-core --test sim` runs 500 seeds (`SIM_SEEDS=N` for more,
//! `SIM_SEED_START=N` to shift them); a failing seed is printed with the command that replays
//! it: `SIM_SEED=N cargo test -p drbd-core --test sim -- --nocapture` runs that seed alone and
//! prints its trace (`SIM_TRACE=1` prints the trace of every seed run). Debugging aids:
//! `SIM_WATCH=SECTOR` adds both nodes' view of one sector (and its bitmap bit) to the trace,
//! `SIM_LARGE=1` gives every seed the large device, `SIM_DUMP=1` adds the devices' internal
//! state to a failure report, `SIM_PROGRESS=1` prints each seed as it starts (to find a hang).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drbd_core::meta::al::initialized_area;
use drbd_core::meta::flags::MDF_CONSISTENT;
use drbd_core::meta::layout::AlGeometry;
use drbd_core::replication::activity_log::{self, ActivityLog};
use drbd_core::replication::bitmap::DirtyBitmap;
use drbd_core::replication::device::{
    Action, AppOp, Device, DeviceConfig, DiskOp, IoError, IoId, LocalDisk, LocalHello, MetaOp,
    Protocol, ReqId, ResyncRate,
};
use drbd_core::replication::msg::{PeerMsg, Socket};
use drbd_core::replication::status::AdminRequest;
use drbd_core::state::{ConnState, DiskState, Role};
use drbd_core::uuid::{GenerationUuids, FF_WSAME, PRO_VERSION_MAX};

/// Sectors per 4 KiB block.
const BLOCK: u64 = 8;
/// Device size of most seeds: 16 MiB (4 activity-log extents).
const SMALL_SECTORS: u64 = 16 << 11;
/// Device size of some seeds: 320 MiB, 80 extents, more than the activity log holds.
const LARGE_SECTORS: u64 = 320 << 11;
/// Give up on a seed after this much virtual time.
const TIME_LIMIT: Duration = Duration::from_secs(3600);
/// The workload stops after this much virtual time even if it did not issue all its requests.
const WORK_LIMIT: Duration = Duration::from_secs(120);
/// Give up on a seed after this many events (a livelock).
const EVENT_LIMIT: u64 = 5_000_000;
/// Lines of the device logs kept for a failure report.
const LOG_KEEP: usize = 300;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

// ------------------------------------------------------------------------------------------
// Random numbers
// ------------------------------------------------------------------------------------------

/// SplitMix64.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut r = Rng(seed ^ 0x5851_f42d_4c95_7f2d);
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 for n = 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    /// A duration in `lo..=hi` microseconds.
    fn us(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_micros(self.range(lo, hi))
    }
}

// ------------------------------------------------------------------------------------------
// Data stamps
// ------------------------------------------------------------------------------------------

/// Data of write `id` for `sectors` sectors at `sector`: every sector starts with the write
/// id and its own sector number.
fn stamp(id: u64, sector: u64, sectors: u64) -> Bytes {
    let mut v = vec![0u8; (sectors * 512) as usize];
    for i in 0..sectors {
        let o = (i * 512) as usize;
        v[o..o + 8].copy_from_slice(&id.to_le_bytes());
        v[o + 8..o + 16].copy_from_slice(&(sector + i).to_le_bytes());
    }
    Bytes::from(v)
}

/// The version (write id, 0 for zeroes) of every sector of `data` written at `sector`.
fn parse(sector: u64, data: &[u8]) -> Result<Vec<u64>, String> {
    if !data.len().is_multiple_of(512) {
        return Err(format!("data of {} bytes at sector {sector}", data.len()));
    }
    let mut out = Vec::with_capacity(data.len() / 512);
    for (i, s) in data.chunks_exact(512).enumerate() {
        let id = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
        let at = u64::from_le_bytes(s[8..16].try_into().expect("8 bytes"));
        let want = sector + i as u64;
        if (id == 0 && at != 0) || (id != 0 && at != want) {
            return Err(format!(
                "sector {want} receives data of write {id} stamped for sector {at}"
            ));
        }
        out.push(id);
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------
// Disks
// ------------------------------------------------------------------------------------------

/// A list per sector, allocated on first use: the table of a large device is one zeroed
/// allocation of 8-byte slots (hence the box around the vector).
#[derive(Debug, Clone)]
#[allow(clippy::box_collection)]
struct Lists<T>(Vec<Option<Box<Vec<T>>>>);

impl<T: Clone> Lists<T> {
    fn new(sectors: u64) -> Lists<T> {
        Lists(vec![None; sectors as usize])
    }

    fn get(&self, s: u64) -> &[T] {
        self.0[s as usize].as_deref().map_or(&[], |v| v.as_slice())
    }

    fn get_mut(&mut self, s: u64) -> &mut Vec<T> {
        self.0[s as usize].get_or_insert_with(Default::default)
    }

    fn take(&mut self, s: u64) -> Vec<T> {
        self.0[s as usize].take().map_or_else(Vec::new, |b| *b)
    }
}

/// The data area of one node: durable image plus volatile cache, one version per sector.
#[derive(Debug, Clone)]
struct DataDisk {
    durable: Vec<u64>,
    /// Completed, not yet durable writes per sector: (completion number, version), oldest
    /// first.
    volatile: Lists<(u64, u64)>,
    /// The sectors that may have volatile entries, each once.
    dirty: Vec<u64>,
    in_dirty: Vec<bool>,
    /// Completion counter of writes.
    seq: u64,
}

impl DataDisk {
    fn new(sectors: u64) -> DataDisk {
        DataDisk {
            durable: vec![0; sectors as usize],
            volatile: Lists::new(sectors),
            dirty: Vec::new(),
            in_dirty: vec![false; sectors as usize],
            seq: 0,
        }
    }

    /// What a read sees.
    fn view(&self, s: u64) -> u64 {
        let durable = self.durable[s as usize];
        if !self.in_dirty[s as usize] {
            return durable;
        }
        self.volatile.get(s).last().map_or(durable, |e| e.1)
    }

    fn write(&mut self, sector: u64, versions: &[u64], fua: bool) {
        self.seq += 1;
        for (i, &v) in versions.iter().enumerate() {
            self.write_sector(sector + i as u64, v, fua);
        }
    }

    fn write_sector(&mut self, s: u64, v: u64, fua: bool) {
        let i = s as usize;
        if fua {
            self.durable[i] = v;
            if self.in_dirty[i] {
                self.volatile.get_mut(s).clear();
            }
        } else if !self.in_dirty[i] && self.durable[i] == v {
            // Nothing to lose: a cache entry would hold what the media holds.
        } else {
            self.volatile.get_mut(s).push((self.seq, v));
            if !self.in_dirty[i] {
                self.in_dirty[i] = true;
                self.dirty.push(s);
            }
        }
    }

    /// A flush submitted when the completion counter was `mark` completed.
    fn flush(&mut self, mark: u64) {
        let dirty = std::mem::take(&mut self.dirty);
        for s in dirty {
            let i = s as usize;
            let entries = self.volatile.get_mut(s);
            if let Some(pos) = entries.iter().rposition(|e| e.0 <= mark) {
                self.durable[i] = entries[pos].1;
                entries.drain(..=pos);
            }
            if entries.is_empty() {
                self.volatile.take(s);
                self.in_dirty[i] = false;
            } else {
                self.dirty.push(s);
            }
        }
    }

    /// Power loss: every unflushed write independently reached the media or not.
    fn power_loss(&mut self, rng: &mut Rng) {
        for s in std::mem::take(&mut self.dirty) {
            let i = s as usize;
            self.in_dirty[i] = false;
            for (_, v) in self.volatile.take(s) {
                if rng.chance(0.5) {
                    self.durable[i] = v;
                }
            }
        }
    }

    fn read(&self, sector: u64, sectors: u64) -> Bytes {
        let versions: Vec<u64> = (sector..sector + sectors).map(|s| self.view(s)).collect();
        if versions.iter().all(|&v| v == 0) {
            return Bytes::from_static(&ZEROS[..(sectors * 512) as usize]);
        }
        let mut out = vec![0u8; (sectors * 512) as usize];
        for (i, &v) in versions.iter().enumerate() {
            if v != 0 {
                let o = i * 512;
                out[o..o + 8].copy_from_slice(&v.to_le_bytes());
                out[o + 8..o + 16].copy_from_slice(&(sector + i as u64).to_le_bytes());
            }
        }
        Bytes::from(out)
    }
}

/// The metadata area of one node (durable).
#[derive(Debug, Clone)]
struct MetaArea {
    uuids: GenerationUuids,
    flags: u32,
    bitmap: Vec<u8>,
    al: Vec<u8>,
}

impl MetaArea {
    /// What `create-md` writes.
    fn create(sectors: u64) -> MetaArea {
        let bm = DirtyBitmap::new(sectors).expect("bitmap");
        MetaArea {
            uuids: GenerationUuids::just_created(),
            flags: 0,
            bitmap: vec![0; bm.disk_bytes() as usize],
            al: initialized_area(AlGeometry::DEFAULT),
        }
    }

    fn write_page(&mut self, p: u64, bytes: &[u8]) {
        let o = (p * 4096) as usize;
        self.bitmap[o..o + bytes.len()].copy_from_slice(bytes);
    }

    /// Applies a metadata write; with `rng` (a crash), only part of it may land.
    fn apply(&mut self, op: &MetaOp, mut rng: Option<&mut Rng>) {
        match op {
            MetaOp::Superblock { uuids, flags } => {
                if rng.as_mut().is_none_or(|r| r.chance(0.5)) {
                    self.uuids = *uuids;
                    self.flags = *flags;
                }
            }
            MetaOp::BitmapPages { pages } => {
                for (p, bytes) in pages {
                    if rng.as_mut().is_none_or(|r| r.chance(0.5)) {
                        self.write_page(*p, bytes);
                    }
                }
            }
            MetaOp::AlTransaction { pages, al } => {
                // The pages go first, then the transaction block.
                let steps = pages.len() + 1;
                let done = match rng {
                    Some(r) => r.below(steps as u64 + 1) as usize,
                    None => steps,
                };
                for (p, bytes) in pages.iter().take(done) {
                    self.write_page(*p, bytes);
                }
                if done == steps {
                    let o = al.byte_offset() as usize;
                    self.al[o..o + al.block.len()].copy_from_slice(&al.block);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Params {
    protocol: Protocol,
    /// Device size in sectors.
    sectors: u64,
    al_extents: u32,
    max_buffers: u32,
    max_epoch_size: u32,
    resync: ResyncRate,
    /// Base latency of the data / meta socket, microseconds (range).
    net_lat: [(u64, u64); 2],
    /// Chance of a latency spike per message.
    spike: f64,
    disk_lat: (u64, u64),
    disk_slow: f64,
    /// Workload operations.
    ops: u64,
    max_in_flight: usize,
    /// Mean gap between workload steps, microseconds.
    work_gap: u64,
    /// Percent of operations that are flushes.
    flush_percent: u64,
    /// Share of writes with FUA.
    fua: f64,
    /// Gap between faults, milliseconds (range).
    fault_gap: (u64, u64),
    /// Hot region for half of the writes (first sector, sectors).
    hot: (u64, u64),
}

impl Params {
    fn random(rng: &mut Rng) -> Params {
        let protocol = match rng.below(4) {
            0 => Protocol::A,
            1 => Protocol::B,
            _ => Protocol::C,
        };
        let resync = if rng.chance(0.7) {
            ResyncRate {
                rate_kib: rng.range(20_000, 400_000) as u32,
                c_plan_ahead: 0,
                ..ResyncRate::default()
            }
        } else {
            ResyncRate {
                rate_kib: rng.range(10_000, 100_000) as u32,
                c_plan_ahead: rng.range(5, 30) as u32,
                c_delay_target: rng.range(1, 20) as u32,
                c_fill_target: if rng.chance(0.5) {
                    0
                } else {
                    rng.range(100, 20_000) as u32
                },
                c_max_rate: rng.range(50_000, 1_000_000) as u32,
                c_min_rate: 250,
            }
        };
        // A large device with the smallest activity log: extents get evicted.
        let large = rng.chance(0.1) || std::env::var("SIM_LARGE").is_ok_and(|v| v != "0");
        let sectors = if large { LARGE_SECTORS } else { SMALL_SECTORS };
        // The hot region takes half of the writes; on a large device it is the whole device,
        // so that many extents are written.
        let (hot_start, hot_len) = if large {
            (0, sectors)
        } else {
            let len = rng.range(64, 512) * BLOCK;
            (rng.below(sectors / BLOCK - len / BLOCK) * BLOCK, len)
        };
        Params {
            protocol,
            sectors,
            al_extents: if large { 67 } else { rng.range(67, 300) as u32 },
            max_buffers: if rng.chance(0.15) {
                rng.range(16, 64) as u32
            } else {
                rng.range(256, 4096) as u32
            },
            max_epoch_size: if rng.chance(0.3) {
                rng.range(1, 8) as u32
            } else {
                2048
            },
            resync,
            net_lat: [(50, rng.range(100, 2000)), (20, rng.range(50, 2000))],
            spike: [0.0, 0.01, 0.05][rng.below(3) as usize],
            disk_lat: (20, rng.range(100, 3000)),
            disk_slow: [0.0, 0.02, 0.1][rng.below(3) as usize],
            ops: if large {
                rng.range(300, 500)
            } else {
                rng.range(150, 450)
            },
            max_in_flight: rng.range(1, 32) as usize,
            work_gap: rng.range(1_000, 8_000),
            flush_percent: [0, 3, 10][rng.below(3) as usize],
            fua: [0.0, 0.1][rng.below(2) as usize],
            fault_gap: {
                let lo = rng.range(50, 300);
                (lo, lo + rng.range(100, 800))
            },
            hot: (hot_start, hot_len),
        }
    }

    fn device_config(&self, rng_seed: u64) -> DeviceConfig {
        DeviceConfig {
            protocol: self.protocol,
            max_epoch_size: self.max_epoch_size,
            max_buffers: self.max_buffers,
            disk_flushes: true,
            resync: self.resync,
            rng_seed,
            ..DeviceConfig::default()
        }
    }
}

// ------------------------------------------------------------------------------------------
// Events
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Ev {
    /// A disk or metadata operation of `node` (incarnation `inc`) completes.
    Io {
        node: usize,
        inc: u32,
        io: IoId,
    },
    /// The head of a socket stream of `link` may be delivered.
    Deliver {
        link: u64,
        stream: usize,
    },
    /// `node` notices that `link` is gone.
    Detect {
        node: usize,
        link: u64,
    },
    /// The handshake of `link` completes on both nodes.
    Handshake {
        link: u64,
    },
    TryConnect,
    Tick,
    Work,
    Fault,
    Restart {
        node: usize,
    },
}

struct Queued {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Queued) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Queued) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Queued) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

// ------------------------------------------------------------------------------------------
// Nodes, links, requests
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Pending {
    Data { op: DiskOp, flush_mark: u64 },
    Meta(MetaOp),
}

struct Node {
    name: char,
    dev: Option<Device>,
    /// Incarnation: completions of an earlier one are dropped.
    inc: u32,
    data: DataDisk,
    meta: MetaArea,
    pending: BTreeMap<IoId, Pending>,
    /// The link this node's device considers itself connected on.
    link: Option<u64>,
    restart_scheduled: bool,
    /// An old Primary after a failover: its next resync must be as SyncTarget.
    must_be_target: bool,
    saw_sync_target: bool,
    ever_up_to_date: bool,
}

impl Node {
    fn new(name: char, sectors: u64) -> Node {
        Node {
            name,
            dev: None,
            inc: 0,
            data: DataDisk::new(sectors),
            meta: MetaArea::create(sectors),
            pending: BTreeMap::new(),
            link: None,
            restart_scheduled: false,
            must_be_target: false,
            saw_sync_target: false,
            ever_up_to_date: false,
        }
    }

    fn alive(&self) -> bool {
        self.dev.is_some()
    }

    fn dev(&self) -> &Device {
        self.dev.as_ref().expect("alive")
    }

    /// What the runtime does on attach: superblock, bitmap with the replayed activity-log
    /// extents marked, activity log continuing the transaction numbers.
    fn attach(&self, p: &Params) -> Result<LocalDisk, String> {
        let mut bitmap = DirtyBitmap::from_disk_bytes(p.sectors, &self.meta.bitmap)
            .map_err(|e| e.to_string())?;
        let replay =
            activity_log::replay(&self.meta.al, AlGeometry::DEFAULT).map_err(|e| e.to_string())?;
        activity_log::mark_extents_dirty(&mut bitmap, &replay.extents);
        let next = replay.newest_tr.map_or(0, |n| n.wrapping_add(1));
        let al = ActivityLog::new(p.al_extents, AlGeometry::DEFAULT)
            .map_err(|e| e.to_string())?
            .with_next_tr_number(next);
        Ok(LocalDisk {
            sectors: p.sectors,
            uuids: self.meta.uuids,
            flags: self.meta.flags,
            bitmap,
            al,
        })
    }
}

const STREAMS: usize = 4;

fn stream_of(from: usize, s: Socket) -> usize {
    from * 2
        + match s {
            Socket::Data => 0,
            Socket::Meta => 1,
        }
}

struct Link {
    id: u64,
    established: bool,
    /// When the link broke, if it did.
    broken: Option<Duration>,
    /// After a break: messages due later than this are lost.
    cut: [Duration; STREAMS],
    streams: [VecDeque<(Duration, PeerMsg)>; STREAMS],
    last: [Duration; STREAMS],
    hello: [LocalHello; 2],
    resolver: usize,
    /// Extra latency per stream until the given time (delay spike).
    slow: [(Duration, Duration); STREAMS],
    /// Writes delivered on each stream since its last barrier (`max-epoch-size`).
    epoch_writes: [u32; STREAMS],
}

#[derive(Debug, Clone)]
enum ReqKind {
    Write { fua: bool, versions: Vec<u64> },
    Flush { ack_mark: u64 },
    Read,
}

impl ReqKind {
    fn short(&self) -> &'static str {
        match self {
            ReqKind::Write { fua: true, .. } => "FUA write",
            ReqKind::Write { .. } => "write",
            ReqKind::Flush { .. } => "flush",
            ReqKind::Read => "read",
        }
    }
}

#[derive(Debug, Clone)]
struct AppReq {
    node: usize,
    sector: u64,
    sectors: u64,
    kind: ReqKind,
    /// The link the write was replicated on, if connected and replicating at submission.
    link: Option<u64>,
}

/// Unflushed acknowledgements of some sectors: (sector, [(ack number, write id)]).
type Acks = Vec<(u64, Vec<(u64, u64)>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Work,
    Quiesce,
    Done,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    ops: u64,
    acked_writes: u64,
    proto_c_checks: u64,
    net_breaks: u64,
    kills: u64,
    power_losses: u64,
    failovers: u64,
    switchovers: u64,
    al_evictions: u64,
    large_devices: u64,
    resyncs: u64,
    reconnects: u64,
    events: u64,
    virtual_time: Duration,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.ops += o.ops;
        self.acked_writes += o.acked_writes;
        self.proto_c_checks += o.proto_c_checks;
        self.net_breaks += o.net_breaks;
        self.kills += o.kills;
        self.power_losses += o.power_losses;
        self.failovers += o.failovers;
        self.switchovers += o.switchovers;
        self.al_evictions += o.al_evictions;
        self.large_devices += o.large_devices;
        self.resyncs += o.resyncs;
        self.reconnects += o.reconnects;
        self.events += o.events;
        self.virtual_time += o.virtual_time;
    }
}

// ------------------------------------------------------------------------------------------
// The simulation
// ------------------------------------------------------------------------------------------

struct Sim {
    seed: u64,
    p: Params,
    rng: Rng,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    nodes: [Node; 2],
    link: Option<Link>,
    next_link: u64,
    net_down_until: Duration,
    connect_scheduled: bool,
    phase: Phase,
    faults_on: bool,
    quiesce_at: Duration,

    // Workload.
    /// The node holding the newest data: the last one promoted.
    primary: usize,
    promoted_once: bool,
    failover_to: Option<usize>,
    /// A switchover away from this node: (node, demoted yet).
    switching: Option<(usize, bool)>,
    next_id: u64,
    inflight: BTreeMap<ReqId, AppReq>,
    ops_issued: u64,

    // Expectations.
    /// Every version issued per sector: (id, content), content 0 for zeroes.
    versions: Lists<(u64, u64)>,
    /// The sectors with versions.
    touched: Vec<bool>,
    /// Per sector: the newest acknowledged version that is durable.
    safe: Vec<u64>,
    /// Per sector: acknowledged, not yet durable versions (ack number, id).
    acks: Lists<(u64, u64)>,
    /// The sectors with entries in `acks`, each once.
    acked: Vec<u64>,
    in_acked: Vec<bool>,
    /// The unflushed acknowledgements a power loss of the Primary took, kept while its peer
    /// may take over.
    stashed_acks: Option<Acks>,
    ack_seq: u64,

    log: VecDeque<String>,
    trace: bool,
    /// `SIM_WATCH=sector`: trace what happens to that sector.
    watch: Option<u64>,
    failure: Option<String>,
    stats: Stats,
    hash: u64,
}

fn conn_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("conn( ")?;
    let (_, to) = rest.split_once(" -> ")?;
    to.strip_suffix(" )")
}

fn disk_of(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("disk( ")?;
    let (_, to) = rest.split_once(" -> ")?;
    to.strip_suffix(" )")
}

impl Sim {
    fn new(seed: u64, trace: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let p = Params::random(&mut rng);
        let sectors = p.sectors;
        Sim {
            seed,
            p,
            rng,
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: [Node::new('A', sectors), Node::new('B', sectors)],
            link: None,
            next_link: 1,
            net_down_until: Duration::ZERO,
            connect_scheduled: false,
            phase: Phase::Setup,
            faults_on: false,
            quiesce_at: Duration::ZERO,
            primary: 0,
            promoted_once: false,
            failover_to: None,
            switching: None,
            next_id: 1,
            inflight: BTreeMap::new(),
            ops_issued: 0,
            versions: Lists::new(sectors),
            touched: vec![false; sectors as usize],
            safe: vec![0; sectors as usize],
            acks: Lists::new(sectors),
            acked: Vec::new(),
            in_acked: vec![false; sectors as usize],
            stashed_acks: None,
            ack_seq: 0,
            log: VecDeque::new(),
            trace,
            watch: env_u64("SIM_WATCH"),
            failure: None,
            stats: Stats::default(),
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn fail(&mut self, msg: impl Into<String>) {
        if self.failure.is_none() {
            self.failure = Some(format!("t={:?}: {}", self.now, msg.into()));
        }
    }

    fn note(&mut self, line: String) {
        for b in line.bytes() {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let line = format!("{:>12.6} {}", self.now.as_secs_f64(), line);
        if self.trace {
            println!("{line}");
        }
        self.log.push_back(line);
        if self.log.len() > LOG_KEEP {
            self.log.pop_front();
        }
    }

    fn at(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn after(&mut self, d: Duration, ev: Ev) {
        self.at(self.now + d, ev);
    }

    fn cfg_seed(&self, n: usize) -> u64 {
        // Distinct generators per node and incarnation (the device forces bit 0 on).
        Rng::new(self.seed ^ ((n as u64) << 56) ^ (u64::from(self.nodes[n].inc) << 40)).next()
    }

    fn start_node(&mut self, n: usize) {
        let local = match self.nodes[n].attach(&self.p) {
            Ok(l) => l,
            Err(e) => return self.fail(format!("{}: attach: {e}", self.nodes[n].name)),
        };
        let cfg = self.p.device_config(self.cfg_seed(n));
        match Device::new(cfg, 0, n as u32, self.p.sectors, Some(local)) {
            Ok(mut dev) => {
                dev.connecting();
                self.nodes[n].dev = Some(dev);
                let (name, inc) = (self.nodes[n].name, self.nodes[n].inc);
                let d = self.nodes[n].dev().disk_state();
                self.note(format!("{name}: started (incarnation {inc}), disk {d}"));
            }
            Err(e) => self.fail(format!("{}: Device::new: {e}", self.nodes[n].name)),
        }
        self.schedule_connect(Duration::from_millis(1));
    }

    fn schedule_connect(&mut self, d: Duration) {
        if !self.connect_scheduled {
            self.connect_scheduled = true;
            self.after(d, Ev::TryConnect);
        }
    }

    // --------------------------------------------------------------------------------------
    // Main loop
    // --------------------------------------------------------------------------------------

    fn run(&mut self) -> Result<(), String> {
        self.note(format!("seed {} params {:?}", self.seed, self.p));
        if self.p.sectors == LARGE_SECTORS {
            self.stats.large_devices += 1;
        }
        self.start_node(0);
        self.start_node(1);
        self.drain();
        self.after(Duration::from_millis(100), Ev::Tick);
        while let Some(Reverse(q)) = self.queue.pop() {
            self.now = q.at;
            self.stats.events += 1;
            self.handle(q.ev);
            self.drain();
            self.after_event();
            if let Some(f) = self.failure.take() {
                return Err(f);
            }
            if self.phase == Phase::Done {
                self.stats.virtual_time = self.now;
                return Ok(());
            }
            if self.now > TIME_LIMIT {
                return Err(format!("no quiescence after {:?}", self.now));
            }
            if self.stats.events > EVENT_LIMIT {
                return Err(format!("{} events without quiescence", self.stats.events));
            }
        }
        Err("event queue ran dry".into())
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Io { node, inc, io } => self.io_done(node, inc, io),
            Ev::Deliver { link, stream } => self.deliver(link, stream),
            Ev::Detect { node, link } => {
                if self.nodes[node].link == Some(link) && self.nodes[node].alive() {
                    self.nodes[node].link = None;
                    let now = self.now;
                    self.nodes[node]
                        .dev
                        .as_mut()
                        .expect("alive")
                        .connection_lost(now, "simulated network failure");
                    let d = self.rng.us(1_000, 100_000);
                    self.schedule_connect(d);
                }
            }
            Ev::Handshake { link } => self.handshake(link),
            Ev::TryConnect => {
                self.connect_scheduled = false;
                self.try_connect();
            }
            Ev::Tick => {
                let now = self.now;
                for n in 0..2 {
                    if let Some(d) = self.nodes[n].dev.as_mut() {
                        d.tick(now);
                    }
                }
                self.after(Duration::from_millis(100), Ev::Tick);
            }
            Ev::Work => {
                if self.phase == Phase::Work && self.now > WORK_LIMIT {
                    // No Primary for too long: stop the workload anyway.
                    self.phase = Phase::Quiesce;
                    self.quiesce();
                }
                if self.phase == Phase::Work {
                    self.work();
                    let gap = self.rng.range(0, 2 * self.p.work_gap);
                    self.after(Duration::from_micros(gap), Ev::Work);
                }
            }
            Ev::Fault => {
                if self.phase == Phase::Work {
                    self.fault();
                    let (lo, hi) = self.p.fault_gap;
                    let gap = self.rng.range(lo, hi);
                    self.after(Duration::from_millis(gap), Ev::Fault);
                }
            }
            Ev::Restart { node } => {
                self.nodes[node].restart_scheduled = false;
                if !self.nodes[node].alive() {
                    self.start_node(node);
                }
            }
        }
    }

    /// Processes the actions of both devices until there are none.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            for n in 0..2 {
                while let Some(a) = self.nodes[n].dev.as_mut().and_then(|d| d.poll_action()) {
                    any = true;
                    self.action(n, a);
                }
            }
            if !any {
                break;
            }
        }
    }

    /// Folds a value into the run's fingerprint (the determinism test compares them).
    fn mix(&mut self, v: u64) {
        self.hash = (self.hash ^ v).wrapping_mul(0x100_0000_01b3);
    }

    fn action(&mut self, n: usize, a: Action) {
        self.mix(self.now.as_nanos() as u64 ^ ((n as u64) << 62));
        match &a {
            Action::Disk { io, .. } | Action::Meta { io, .. } => self.mix(*io),
            Action::Send(m) => {
                for b in m.name().bytes() {
                    self.mix(u64::from(b));
                }
            }
            Action::Complete { id, .. } => self.mix(*id),
            Action::Disconnect { .. } | Action::Log(_) | Action::Handler(_) => {}
        }
        match a {
            Action::Disk { io, op } => {
                let flush_mark = self.nodes[n].data.seq;
                self.nodes[n]
                    .pending
                    .insert(io, Pending::Data { op, flush_mark });
                let d = self.disk_latency();
                let inc = self.nodes[n].inc;
                self.after(d, Ev::Io { node: n, inc, io });
            }
            Action::Meta { io, op } => {
                if self.trace {
                    let what = match &op {
                        MetaOp::Superblock { uuids, flags } => {
                            format!("superblock {uuids} flags {flags:#x}")
                        }
                        MetaOp::BitmapPages { pages } => format!("{} bitmap pages", pages.len()),
                        MetaOp::AlTransaction { pages, al } => {
                            format!(
                                "AL transaction {} after {} pages",
                                al.tr_number,
                                pages.len()
                            )
                        }
                    };
                    let name = self.nodes[n].name;
                    self.note(format!("{name}: meta io {io}: {what}"));
                }
                if let MetaOp::AlTransaction { al, .. } = &op {
                    self.stats.al_evictions += al.evicted.len() as u64;
                    if let Some(w) = self.watch {
                        let e = (w / activity_log::SECTORS_PER_EXTENT) as u32;
                        if al.evicted.contains(&e) {
                            let name = self.nodes[n].name;
                            self.note(format!("{name}: watch {w}: extent {e} evicted"));
                        }
                    }
                }
                self.nodes[n].pending.insert(io, Pending::Meta(op));
                let d = self.disk_latency();
                let inc = self.nodes[n].inc;
                self.after(d, Ev::Io { node: n, inc, io });
            }
            Action::Send(msg) => self.send(n, msg),
            Action::Complete { id, result } => self.app_complete(n, id, result),
            Action::Disconnect { reason, retry } => {
                let name = self.nodes[n].name;
                self.note(format!("{name}: Disconnect retry={retry}: {reason}"));
                if !retry {
                    self.fail(format!("{name} went StandAlone: {reason}"));
                } else if reason != "local state changed during the handshake" {
                    self.fail(format!("{name} dropped the connection: {reason}"));
                }
                if self.nodes[n].link.is_some() {
                    self.nodes[n].link = None;
                    self.break_link(Some(n));
                }
                let d = self.rng.us(1_000, 100_000);
                self.schedule_connect(d);
            }
            Action::Log(line) => self.device_log(n, line),
            // No handlers are configured here.
            Action::Handler(_) => {}
        }
    }

    fn device_log(&mut self, n: usize, line: String) {
        let name = self.nodes[n].name;
        if let Some(to) = conn_of(&line) {
            if to == ConnState::SyncTarget.name() {
                self.stats.resyncs += 1;
                self.nodes[n].saw_sync_target = true;
                self.nodes[n].must_be_target = false;
            }
            let source = [ConnState::WfBitMapS, ConnState::SyncSource]
                .iter()
                .any(|c| c.name() == to);
            // The node holding the newest data never receives a resync (outside a pending
            // failover, which moves the newest data to its peer).
            let target = [ConnState::WfBitMapT, ConnState::SyncTarget]
                .iter()
                .any(|c| c.name() == to);
            if target && n == self.primary && self.promoted_once && self.failover_to.is_none() {
                self.fail(format!(
                    "resync in the wrong direction: {name}, holding the newest data, becomes {to}"
                ));
            }
            if self.nodes[n].must_be_target && source {
                self.fail(format!(
                    "resync in the wrong direction: {name}, the old Primary after a failover, \
                     becomes {to}"
                ));
            }
            if self.nodes[n].must_be_target
                && to == ConnState::Connected.name()
                && line.contains(ConnState::WfReportParams.name())
            {
                self.fail(format!(
                    "{name}, the old Primary after a failover, connects without a resync"
                ));
            }
        }
        if disk_of(&line) == Some(DiskState::UpToDate.name()) {
            if n == 1 && !self.nodes[n].ever_up_to_date && !self.nodes[n].saw_sync_target {
                self.fail("B became UpToDate without the initial sync");
            }
            self.nodes[n].ever_up_to_date = true;
        }
        let extra = self.watch_state();
        self.note(format!("{name}: {line}{extra}"));
    }

    /// With `SIM_WATCH`: both nodes' view of the watched sector and its bitmap bit.
    fn watch_state(&self) -> String {
        let Some(w) = self.watch else {
            return String::new();
        };
        let mut out = format!("   [watch {w}, floor {}:", self.floor(w));
        for node in &self.nodes {
            let bit = node.dev.as_ref().map_or("-".to_string(), |d| {
                d.bitmap().is_set(w / BLOCK).to_string()
            });
            out.push_str(&format!(
                " {} view {} durable {} bit {bit};",
                node.name,
                node.data.view(w),
                node.data.durable[w as usize]
            ));
        }
        out.push(']');
        out
    }

    fn disk_latency(&mut self) -> Duration {
        let (lo, hi) = self.p.disk_lat;
        let mut d = self.rng.us(lo, hi);
        if self.rng.chance(self.p.disk_slow) {
            d += self.rng.us(2_000, 30_000);
        }
        d
    }

    // --------------------------------------------------------------------------------------
    // Disks
    // --------------------------------------------------------------------------------------

    fn io_done(&mut self, n: usize, inc: u32, io: IoId) {
        if self.nodes[n].inc != inc || !self.nodes[n].alive() {
            return;
        }
        let Some(p) = self.nodes[n].pending.remove(&io) else {
            return self.fail(format!(
                "{}: completion of unknown io {io}",
                self.nodes[n].name
            ));
        };
        if let Some(w) = self.watch {
            let what = match &p {
                Pending::Data {
                    op: DiskOp::Write { sector, data, fua },
                    ..
                } if (*sector..*sector + data.len() as u64 / 512).contains(&w) => {
                    let i = ((w - sector) * 512) as usize;
                    let v = u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
                    Some(format!("write of version {v} (fua {fua})"))
                }
                Pending::Data {
                    op: DiskOp::Discard { sector, len } | DiskOp::Zeroes { sector, len },
                    ..
                } if (*sector..*sector + u64::from(*len) / 512).contains(&w) => {
                    Some("zeroing".to_string())
                }
                Pending::Data {
                    op: DiskOp::Flush, ..
                } => Some("flush".to_string()),
                _ => None,
            };
            if let Some(what) = what {
                let name = self.nodes[n].name;
                let before = self.nodes[n].data.view(w);
                let durable = self.nodes[n].data.durable[w as usize];
                self.note(format!(
                    "{name}: watch {w}: {what} done (view {before}, durable {durable})"
                ));
            }
        }
        let node = &mut self.nodes[n];
        let result = match p {
            Pending::Data { op, flush_mark } => match op {
                DiskOp::Read { sector, len } => {
                    Ok(Some(node.data.read(sector, u64::from(len) / 512)))
                }
                DiskOp::Write { sector, data, fua } => match parse(sector, &data) {
                    Ok(v) => {
                        node.data.write(sector, &v, fua);
                        Ok(None)
                    }
                    Err(e) => {
                        let name = node.name;
                        return self.fail(format!("{name}: bad data written: {e}"));
                    }
                },
                DiskOp::Flush => {
                    node.data.flush(flush_mark);
                    Ok(None)
                }
                DiskOp::Discard { sector, len } | DiskOp::Zeroes { sector, len } => {
                    node.data.write(sector, &vec![0; len as usize / 512], false);
                    Ok(None)
                }
            },
            Pending::Meta(op) => {
                node.meta.apply(&op, None);
                if self.trace {
                    let name = node.name;
                    self.note(format!("{name}: meta io {io} done"));
                }
                Ok(None)
            }
        };
        let now = self.now;
        self.nodes[n]
            .dev
            .as_mut()
            .expect("alive")
            .disk_done(now, io, result);
    }

    // --------------------------------------------------------------------------------------
    // Network
    // --------------------------------------------------------------------------------------

    fn send(&mut self, n: usize, msg: PeerMsg) {
        let Some(id) = self.nodes[n].link else {
            let name = self.nodes[n].name;
            return self.fail(format!("{name} sends {} while not connected", msg.name()));
        };
        let now = self.now;
        let st = stream_of(n, msg.socket());
        let (lo, hi) = self.p.net_lat[st % 2];
        let mut d = self.rng.us(lo, hi);
        if self.rng.chance(self.p.spike) {
            d += self.rng.us(1_000, 50_000);
        }
        let Some(link) = self.link.as_mut().filter(|l| l.id == id) else {
            return;
        };
        if link.broken.is_some() {
            return;
        }
        if link.slow[st].0 > now {
            d += link.slow[st].1;
        }
        let due = (now + d).max(link.last[st]);
        link.last[st] = due;
        link.streams[st].push_back((due, msg));
        self.at(
            due,
            Ev::Deliver {
                link: id,
                stream: st,
            },
        );
    }

    fn deliver(&mut self, id: u64, st: usize) {
        let now = self.now;
        let Some(link) = self.link.as_mut().filter(|l| l.id == id) else {
            return;
        };
        let Some(&(due, _)) = link.streams[st].front() else {
            return;
        };
        if due > now {
            return;
        }
        if link.broken.is_some() && due > link.cut[st] {
            link.streams[st].clear();
            return;
        }
        let to = 1 - st / 2;
        if self.nodes[to].link != Some(id) || !self.nodes[to].alive() {
            link.streams[st].clear();
            return;
        }
        if st == stream_of(1 - to, Socket::Data) && !self.nodes[to].dev().can_receive() {
            // The receiver stops reading the data socket until disk completions arrive.
            let retry = Duration::from_micros(200);
            self.after(
                retry,
                Ev::Deliver {
                    link: id,
                    stream: st,
                },
            );
            return;
        }
        let (_, msg) = link.streams[st].pop_front().expect("checked");
        let name = msg.name();
        // Checker: no epoch holds more writes than max-epoch-size.
        match &msg {
            PeerMsg::Data { .. } | PeerMsg::Trim { .. } => link.epoch_writes[st] += 1,
            PeerMsg::Barrier { .. } => link.epoch_writes[st] = 0,
            _ => {}
        }
        let epoch_writes = link.epoch_writes[st];
        let data_socket = st == stream_of(1 - to, Socket::Data);
        let pages = msg.held_pages();
        let dev = self.nodes[to].dev.as_mut().expect("alive");
        let result = dev.received(now, msg);
        let held = dev.peer_pages();
        let who = self.nodes[to].name;
        if let Err(e) = result {
            self.fail(format!("{who}: {name}: {e}"));
        }
        if epoch_writes > self.p.max_epoch_size {
            self.fail(format!(
                "{who} received {epoch_writes} writes in one epoch (max-epoch-size {})",
                self.p.max_epoch_size
            ));
        }
        // Checker: reading the data socket, the receiver holds at most max-buffers pages of
        // peer writes, plus the one it read last (its size was unknown until read).
        if data_socket && held + 1 > u64::from(self.p.max_buffers) + pages.max(1) {
            self.fail(format!(
                "{who} holds {held} pages of peer writes (max-buffers {})",
                self.p.max_buffers
            ));
        }
    }

    /// The current link breaks; `initiator` already tore its side down.
    fn break_link(&mut self, initiator: Option<usize>) {
        let now = self.now;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if link.broken.is_some() {
            return;
        }
        link.broken = Some(now);
        let id = link.id;
        for st in 0..STREAMS {
            link.cut[st] = if self.rng.chance(0.5) {
                now
            } else {
                now + self.rng.us(0, 5_000)
            };
        }
        self.stats.net_breaks += 1;
        for n in 0..2 {
            if Some(n) != initiator && self.nodes[n].link == Some(id) {
                let d = if self.rng.chance(0.8) {
                    self.rng.us(0, 50_000)
                } else {
                    self.rng.us(50_000, 500_000)
                };
                self.after(d, Ev::Detect { node: n, link: id });
            }
        }
    }

    fn try_connect(&mut self) {
        let both_free = (0..2).all(|n| self.nodes[n].alive() && self.nodes[n].link.is_none());
        let pending = self
            .link
            .as_ref()
            .is_some_and(|l| !l.established && l.broken.is_none());
        if !both_free || pending || self.now < self.net_down_until {
            if (0..2).any(|n| self.nodes[n].link.is_none()) {
                let retry = if self.now < self.net_down_until {
                    self.net_down_until - self.now + self.rng.us(0, 10_000)
                } else {
                    self.rng.us(5_000, 100_000)
                };
                self.schedule_connect(retry);
            }
            return;
        }
        let id = self.next_link;
        self.next_link += 1;
        let hello = [
            self.nodes[0].dev().local_hello(),
            self.nodes[1].dev().local_hello(),
        ];
        let resolver = self.rng.below(2) as usize;
        self.link = Some(Link {
            id,
            established: false,
            broken: None,
            cut: [Duration::ZERO; STREAMS],
            streams: Default::default(),
            last: [Duration::ZERO; STREAMS],
            hello,
            resolver,
            slow: [(Duration::ZERO, Duration::ZERO); STREAMS],
            epoch_writes: [0; STREAMS],
        });
        let d = self.rng.us(100, 20_000);
        self.after(d, Ev::Handshake { link: id });
    }

    fn handshake(&mut self, id: u64) {
        let ok = self
            .link
            .as_ref()
            .is_some_and(|l| l.id == id && l.broken.is_none())
            && (0..2).all(|n| self.nodes[n].alive() && self.nodes[n].link.is_none())
            && self.now >= self.net_down_until;
        if !ok {
            if self.link.as_ref().is_some_and(|l| l.id == id) {
                self.link = None;
            }
            let d = self.rng.us(1_000, 50_000);
            self.schedule_connect(d);
            return;
        }
        self.stats.reconnects += 1;
        let link = self.link.as_mut().expect("checked");
        link.established = true;
        let hello = link.hello;
        let resolver = link.resolver;
        self.nodes[0].link = Some(id);
        self.nodes[1].link = Some(id);
        self.note(format!("link {id} established"));
        let first = self.rng.below(2) as usize;
        let now = self.now;
        for n in [first, 1 - first] {
            let peer = hello[1 - n].as_seen_by_peer(PRO_VERSION_MAX, FF_WSAME | 1, n == resolver);
            self.nodes[n]
                .dev
                .as_mut()
                .expect("alive")
                .connected(now, &peer, &hello[n]);
        }
    }

    // --------------------------------------------------------------------------------------
    // Faults
    // --------------------------------------------------------------------------------------

    fn fault(&mut self) {
        let r = self.rng.below(100);
        let secondary = 1 - self.primary;
        match r {
            0..=19 => {
                // Network failure.
                let established = self.link.as_ref().is_some_and(|l| l.established);
                if established {
                    self.note("fault: network failure".into());
                    self.break_link(None);
                }
                let down = self.rng.us(0, 300_000);
                self.net_down_until = self.net_down_until.max(self.now + down);
            }
            20..=33 => {
                // Planned switchover: the Primary drains, demotes, the peer takes over.
                let p = self.primary;
                if self.switching.is_none() && self.synced_pair(p) {
                    let name = self.nodes[p].name;
                    self.note(format!("switchover from {name} starts"));
                    self.switching = Some((p, false));
                }
            }
            34..=43 => {
                // Delay spike on one stream: messages on the other socket overtake.
                let now = self.now;
                let st = self.rng.below(STREAMS as u64) as usize;
                let until = now + self.rng.us(1_000, 100_000);
                let extra = self.rng.us(1_000, 40_000);
                if let Some(l) = self.link.as_mut() {
                    l.slow[st] = (until, extra);
                }
            }
            44..=69 => {
                let power = self.rng.chance(0.5);
                self.crash(self.primary, power);
            }
            70..=94 => {
                let power = self.rng.chance(0.5);
                self.crash(secondary, power);
            }
            _ => {
                let power = self.rng.chance(0.5);
                self.crash(0, power);
                let power = self.rng.chance(0.5);
                self.crash(1, power);
            }
        }
    }

    fn crash(&mut self, n: usize, power: bool) {
        if !self.nodes[n].alive() {
            return;
        }
        let name = self.nodes[n].name;
        let kind = if power { "power loss" } else { "process kill" };
        let extra = self.watch_state();
        self.note(format!("fault: {name} crashes ({kind}){extra}"));
        if power {
            self.stats.power_losses += 1;
        } else {
            self.stats.kills += 1;
        }
        // Failover: the Primary crashes while its peer is Connected with UpToDate data.
        let other = 1 - n;
        if self.nodes[n].dev().role() == Role::Primary {
            let o = &self.nodes[other];
            let synced = o.alive()
                && o.link.is_some()
                && o.link == self.nodes[n].link
                && o.dev().conn_state() == ConnState::Connected
                && o.dev().disk_state() == DiskState::UpToDate
                && o.dev().peer_disk_state() == DiskState::UpToDate
                && self.nodes[n].dev().conn_state() == ConnState::Connected;
            if synced && self.phase == Phase::Work {
                self.failover_to = Some(other);
            }
        }
        if self.failover_to == Some(n) {
            self.failover_to = None;
            self.stashed_acks = None;
        }
        // In-flight operations.
        let pending = std::mem::take(&mut self.nodes[n].pending);
        for (_, p) in pending {
            match p {
                Pending::Data { op, .. } => {
                    if power {
                        continue;
                    }
                    let (sector, versions, fua) = match op {
                        DiskOp::Write { sector, data, fua } => match parse(sector, &data) {
                            Ok(v) => (sector, v, fua),
                            Err(e) => return self.fail(format!("{name}: bad data: {e}")),
                        },
                        DiskOp::Discard { sector, len } | DiskOp::Zeroes { sector, len } => {
                            (sector, vec![0; len as usize / 512], false)
                        }
                        _ => continue,
                    };
                    let mode = self.rng.below(3);
                    self.nodes[n].data.seq += 1;
                    for (i, v) in versions.into_iter().enumerate() {
                        if mode == 1 || (mode == 2 && self.rng.chance(0.5)) {
                            self.nodes[n].data.write_sector(sector + i as u64, v, fua);
                        }
                    }
                }
                Pending::Meta(op) => {
                    let mut rng = self.rng.clone();
                    self.nodes[n].meta.apply(&op, Some(&mut rng));
                    self.rng = rng;
                }
            }
        }
        if power {
            let mut rng = self.rng.clone();
            self.nodes[n].data.power_loss(&mut rng);
            self.rng = rng;
            // Every acknowledged write is on the disk of the node with the newest data (its
            // local write completed before the acknowledgement): only that node's power loss
            // may lose acknowledged writes not yet made durable. If its synced peer takes
            // over, they must be there, so they are kept aside until that is decided.
            if n == self.primary {
                let acks = self.take_acks();
                if self.failover_to.is_some() {
                    self.stashed_acks = Some(acks);
                }
            }
        }
        self.nodes[n].dev = None;
        self.nodes[n].inc += 1;
        if self.nodes[n].link.take().is_some() {
            self.break_link(Some(n));
        } else if self.link.as_ref().is_some_and(|l| !l.established) {
            self.link = None;
        }
        self.inflight.retain(|_, r| r.node != n);
        self.schedule_restart(n);
    }

    fn schedule_restart(&mut self, n: usize) {
        if self.nodes[n].restart_scheduled || self.nodes[n].alive() {
            return;
        }
        self.nodes[n].restart_scheduled = true;
        let d = if self.phase == Phase::Quiesce {
            self.rng.us(1_000, 50_000)
        } else {
            self.rng.us(20_000, 600_000)
        };
        self.after(d, Ev::Restart { node: n });
    }

    // --------------------------------------------------------------------------------------
    // Roles
    // --------------------------------------------------------------------------------------

    fn promote(&mut self, n: usize) -> bool {
        let now = self.now;
        let name = self.nodes[n].name;
        let dev = self.nodes[n].dev.as_mut().expect("alive");
        match dev.admin(now, AdminRequest::Primary { force: false }) {
            Ok(()) => {
                self.note(format!("{name}: promoted"));
                true
            }
            Err(e) => {
                self.note(format!("{name}: promotion refused: {e}"));
                false
            }
        }
    }

    /// Whether `p` is Primary and both nodes are Connected, UpToDate/UpToDate.
    fn synced_pair(&self, p: usize) -> bool {
        let o = 1 - p;
        let Some(link) = self.link.as_ref() else {
            return false;
        };
        let up = link.established && link.broken.is_none();
        up && (0..2).all(|n| {
            let node = &self.nodes[n];
            node.alive()
                && node.link == Some(link.id)
                && node.dev().conn_state() == ConnState::Connected
                && node.dev().disk_state() == DiskState::UpToDate
                && node.dev().peer_disk_state() == DiskState::UpToDate
        }) && self.nodes[p].dev().role() == Role::Primary
            && self.nodes[o].dev().role() == Role::Secondary
    }

    fn step_switchover(&mut self) {
        let Some((p, demoted)) = self.switching else {
            return;
        };
        let o = 1 - p;
        if !demoted {
            if !self.inflight.is_empty() {
                return;
            }
            if !self.synced_pair(p) {
                self.note("switchover aborted".into());
                self.switching = None;
                return;
            }
            let now = self.now;
            let dev = self.nodes[p].dev.as_mut().expect("alive");
            if let Err(e) = dev.admin(now, AdminRequest::Secondary) {
                return self.fail(format!("demotion refused: {e}"));
            }
            let name = self.nodes[p].name;
            self.note(format!("{name}: demoted"));
            self.drain();
            self.switching = Some((p, true));
            return;
        }
        let up = self.link.as_ref().is_some_and(|l| {
            l.established
                && l.broken.is_none()
                && (0..2).all(|n| self.nodes[n].alive() && self.nodes[n].link == Some(l.id))
        });
        if !up {
            // The old Primary is promoted again (or after its restart).
            self.note("switchover aborted".into());
            self.switching = None;
            return;
        }
        let od = self.nodes[o].dev();
        // The peer sees the demotion after all the writes sent before it.
        if od.peer_role() == Role::Secondary
            && od.conn_state() == ConnState::Connected
            && od.disk_state() == DiskState::UpToDate
        {
            self.switching = None;
            if self.promote(o) {
                self.primary = o;
                self.stats.switchovers += 1;
                self.drain();
            }
        }
    }

    fn maybe_promote(&mut self) {
        if !matches!(self.phase, Phase::Work) || self.switching.is_some() {
            return;
        }
        let any_primary =
            (0..2).any(|n| self.nodes[n].alive() && self.nodes[n].dev().role() == Role::Primary);
        if any_primary {
            return;
        }
        if let Some(o) = self.failover_to {
            let old = 1 - o;
            if self.nodes[old].alive() {
                // Restarted before the peer noticed: no failover.
                self.failover_to = None;
                self.stashed_acks = None;
            } else if self.nodes[o].alive() && self.nodes[o].link.is_none() {
                self.failover_to = None;
                if !self.promote(o) {
                    return self.fail("failover: the synced peer cannot be promoted");
                }
                self.stats.failovers += 1;
                self.drain();
                self.primary = o;
                self.nodes[old].must_be_target = true;
                if let Some(acks) = self.stashed_acks.take() {
                    self.restore_acks(acks);
                }
                self.rebase_after_failover(o);
                return;
            } else {
                return;
            }
        }
        let p = self.primary;
        if self.nodes[p].alive() && self.nodes[p].dev().disk_state() == DiskState::UpToDate {
            self.promote(p);
            self.drain();
        }
    }

    /// The new Primary's data is what survives a failover: under protocol C it must hold
    /// every acknowledged write; under A and B the expectation becomes its data.
    fn rebase_after_failover(&mut self, o: usize) {
        let mut pending: HashMap<u64, Vec<u64>> = HashMap::new();
        for p in self.nodes[o].pending.values() {
            if let Pending::Data {
                op: DiskOp::Write { sector, data, .. },
                ..
            } = p
            {
                if let Ok(v) = parse(*sector, data) {
                    for (i, v) in v.into_iter().enumerate() {
                        pending.entry(sector + i as u64).or_default().push(v);
                    }
                }
            }
        }
        for s in 0..self.p.sectors {
            if !self.touched[s as usize] {
                continue;
            }
            let have = self.nodes[o].data.view(s);
            if self.acceptable(s, have)
                || pending
                    .get(&s)
                    .is_some_and(|v| v.iter().any(|&v| self.acceptable(s, v)))
            {
                continue;
            }
            let name = self.nodes[o].name;
            if self.p.protocol == Protocol::C {
                let f = self.floor(s);
                return self.fail(format!(
                    "failover under protocol C: {name} holds version {have} of sector {s}, \
                     acknowledged was {f}"
                ));
            }
            let floor = self.floor(s);
            let matching = self
                .versions
                .get(s)
                .iter()
                .filter(|&&(id, c)| c == have && id <= floor)
                .map(|&(id, _)| id)
                .max();
            match matching {
                Some(id) => {
                    self.safe[s as usize] = id;
                    self.acks.take(s);
                }
                None if have == 0 => {
                    self.safe[s as usize] = 0;
                    self.acks.take(s);
                }
                None => {
                    return self.fail(format!(
                        "failover: {name} holds unknown version {have} of sector {s}"
                    ))
                }
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // Workload
    // --------------------------------------------------------------------------------------

    fn overlaps_inflight(&self, sector: u64, sectors: u64) -> bool {
        self.inflight.values().any(|r| {
            !matches!(r.kind, ReqKind::Flush { .. })
                && sector < r.sector + r.sectors
                && r.sector < sector + sectors
        })
    }

    fn pick_range(&mut self, max_blocks: u64) -> Option<(u64, u64)> {
        for _ in 0..8 {
            let (base, len) = if self.rng.chance(0.5) {
                self.p.hot
            } else {
                (0, self.p.sectors)
            };
            let (sector, sectors) = if self.rng.chance(0.3) {
                let n = self.rng.range(1, 16);
                (base + self.rng.below(len - n + 1), n)
            } else {
                let blocks = self.rng.range(1, max_blocks);
                let b = self.rng.below(len / BLOCK - blocks + 1);
                (base + b * BLOCK, blocks * BLOCK)
            };
            if !self.overlaps_inflight(sector, sectors) {
                return Some((sector, sectors));
            }
        }
        None
    }

    /// The link writes are replicated on now, if any.
    fn replicating_link(&self, n: usize) -> Option<u64> {
        let id = self.nodes[n].link?;
        let link = self.link.as_ref().filter(|l| l.id == id && l.established)?;
        let dev = self.nodes[n].dev();
        let replicating = matches!(
            dev.conn_state(),
            ConnState::Connected | ConnState::SyncSource | ConnState::PausedSyncS
        );
        (link.broken.is_none() && replicating).then_some(id)
    }

    fn work(&mut self) {
        let p = self.primary;
        if !self.nodes[p].alive() || self.nodes[p].dev().role() != Role::Primary {
            return;
        }
        if self.inflight.len() >= self.p.max_in_flight || self.switching.is_some() {
            return;
        }
        if self.ops_issued >= self.p.ops {
            if self.phase == Phase::Work {
                self.phase = Phase::Quiesce;
                self.quiesce();
            }
            return;
        }
        let id = self.next_id;
        // Percent: writes, discards and zeroing, flushes (the per-seed rate), reads.
        let r = self.rng.below(100);
        let flush = self.p.flush_percent;
        let (sector, sectors, kind, op) = match r {
            r if r < 72 - flush => {
                let Some((sector, sectors)) = self.pick_range(32) else {
                    return;
                };
                let fua = self.rng.chance(self.p.fua);
                let data = stamp(id, sector, sectors);
                (
                    sector,
                    sectors,
                    ReqKind::Write {
                        fua,
                        versions: vec![id; sectors as usize],
                    },
                    AppOp::Write { data, fua },
                )
            }
            r if r < 76 - flush => {
                let Some((sector, sectors)) = self.pick_range(64) else {
                    return;
                };
                let len = (sectors * 512) as u32;
                let op = if self.rng.chance(0.5) {
                    AppOp::Discard { len }
                } else {
                    AppOp::Zeroes { len }
                };
                (
                    sector,
                    sectors,
                    ReqKind::Write {
                        fua: false,
                        versions: vec![0; sectors as usize],
                    },
                    op,
                )
            }
            r if r < 76 => (
                0,
                0,
                ReqKind::Flush {
                    ack_mark: self.ack_seq,
                },
                AppOp::Flush,
            ),
            _ => {
                let Some((sector, sectors)) = self.pick_range(64) else {
                    return;
                };
                (
                    sector,
                    sectors,
                    ReqKind::Read,
                    AppOp::Read {
                        len: (sectors * 512) as u32,
                    },
                )
            }
        };
        self.next_id += 1;
        self.ops_issued += 1;
        self.stats.ops += 1;
        if let ReqKind::Write { versions, .. } = &kind {
            for (i, &v) in versions.iter().enumerate() {
                let s = sector + i as u64;
                self.versions.get_mut(s).push((id, v));
                self.touched[s as usize] = true;
            }
        }
        let link = self.replicating_link(p);
        self.inflight.insert(
            id,
            AppReq {
                node: p,
                sector,
                sectors,
                kind,
                link,
            },
        );
        let now = self.now;
        self.nodes[p]
            .dev
            .as_mut()
            .expect("alive")
            .submit(now, id, sector, op);
    }

    /// Takes the acknowledged writes not yet made durable (a power loss of the Primary).
    fn take_acks(&mut self) -> Acks {
        let mut out = Vec::new();
        for s in std::mem::take(&mut self.acked) {
            out.push((s, self.acks.take(s)));
            self.in_acked[s as usize] = false;
        }
        out
    }

    fn restore_acks(&mut self, acks: Acks) {
        for (s, list) in acks {
            if list.is_empty() {
                continue;
            }
            self.acks.get_mut(s).extend(list);
            if !self.in_acked[s as usize] {
                self.in_acked[s as usize] = true;
                self.acked.push(s);
            }
        }
    }

    fn floor(&self, s: u64) -> u64 {
        if !self.touched[s as usize] {
            return 0;
        }
        let safe = self.safe[s as usize];
        let acked = self.acks.get(s).last().map_or(0, |a| a.1);
        safe.max(acked)
    }

    /// Whether content `c` of sector `s` is the newest acknowledged version or a later one.
    fn acceptable(&self, s: u64, c: u64) -> bool {
        let f = self.floor(s);
        if c == 0 && f == 0 {
            return true;
        }
        self.versions
            .get(s)
            .iter()
            .any(|&(id, content)| id >= f && content == c)
    }

    fn app_complete(&mut self, n: usize, id: ReqId, result: Result<Option<Bytes>, IoError>) {
        let name = self.nodes[n].name;
        let Some(r) = self.inflight.remove(&id) else {
            return self.fail(format!("{name}: completion of unknown request {id}"));
        };
        if r.node != n {
            return self.fail(format!("{name}: completion of another node's request {id}"));
        }
        if self
            .watch
            .is_some_and(|w| (r.sector..r.sector + r.sectors).contains(&w))
        {
            let extra = self.watch_state();
            self.note(format!(
                "{name}: request {id} {:?} completes: {}{extra}",
                r.kind.short(),
                result.is_ok()
            ));
        }
        let data = match result {
            Ok(d) => d,
            Err(e) => return self.fail(format!("{name}: request {id} {:?} failed: {e}", r.kind)),
        };
        match r.kind {
            ReqKind::Write { fua, versions } => {
                self.stats.acked_writes += 1;
                self.ack_seq += 1;
                for i in 0..r.sectors {
                    let s = r.sector + i;
                    let i = s as usize;
                    if fua {
                        self.safe[i] = id;
                        self.acks.take(s);
                    } else {
                        self.acks.get_mut(s).push((self.ack_seq, id));
                        if !self.in_acked[i] {
                            self.in_acked[i] = true;
                            self.acked.push(s);
                        }
                    }
                }
                // Checker 1: protocol C writes are on the peer's disk when they complete.
                if self.p.protocol == Protocol::C
                    && r.link.is_some()
                    && self.replicating_link(n) == r.link
                {
                    self.stats.proto_c_checks += 1;
                    let peer = &self.nodes[1 - n];
                    for (i, &v) in versions.iter().enumerate() {
                        let s = r.sector + i as u64;
                        let have = peer.data.view(s);
                        if have != v {
                            let pn = peer.name;
                            return self.fail(format!(
                                "checker 1: write {id} completed under protocol C but {pn} \
                                 holds version {have} of sector {s}"
                            ));
                        }
                    }
                }
            }
            ReqKind::Flush { ack_mark } => {
                for s in std::mem::take(&mut self.acked) {
                    let i = s as usize;
                    let list = self.acks.get_mut(s);
                    if let Some(pos) = list.iter().rposition(|a| a.0 <= ack_mark) {
                        self.safe[i] = list[pos].1;
                        list.drain(..=pos);
                    }
                    if list.is_empty() {
                        self.acks.take(s);
                        self.in_acked[i] = false;
                    } else {
                        self.acked.push(s);
                    }
                }
            }
            ReqKind::Read => {
                let Some(data) = data else {
                    return self.fail(format!("{name}: read {id} without data"));
                };
                let versions = match parse(r.sector, &data) {
                    Ok(v) => v,
                    Err(e) => return self.fail(format!("{name}: read {id}: {e}")),
                };
                if versions.len() as u64 != r.sectors {
                    return self.fail(format!("{name}: read {id}: wrong length"));
                }
                for (i, &v) in versions.iter().enumerate() {
                    let s = r.sector + i as u64;
                    if !self.acceptable(s, v) {
                        let f = self.floor(s);
                        return self.fail(format!(
                            "{name}: read {id} returns version {v} of sector {s}, acknowledged \
                             was {f}"
                        ));
                    }
                }
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // Phases
    // --------------------------------------------------------------------------------------

    fn quiesce(&mut self) {
        self.note("quiesce: workload stopped, network healed".into());
        self.quiesce_at = self.now;
        self.net_down_until = self.now;
        if let Some(l) = self.link.as_mut() {
            l.slow = [(Duration::ZERO, Duration::ZERO); STREAMS];
        }
        for n in 0..2 {
            if !self.nodes[n].alive() && !self.nodes[n].restart_scheduled {
                self.schedule_restart(n);
            }
        }
        self.schedule_connect(Duration::from_millis(1));
    }

    fn after_event(&mut self) {
        if self.failure.is_some() {
            return;
        }
        match self.phase {
            Phase::Setup => {
                let both_connected = (0..2).all(|n| {
                    self.nodes[n].alive()
                        && self.nodes[n].dev().conn_state() == ConnState::Connected
                });
                if both_connected && !self.promoted_once {
                    let now = self.now;
                    let dev = self.nodes[0].dev.as_mut().expect("alive");
                    if let Err(e) = dev.admin(now, AdminRequest::Primary { force: true }) {
                        return self.fail(format!("A: primary --force: {e}"));
                    }
                    self.note("A: forced Primary".into());
                    self.promoted_once = true;
                    self.drain();
                    self.phase = Phase::Work;
                    self.after(Duration::from_micros(100), Ev::Work);
                }
            }
            Phase::Work => {
                if !self.faults_on
                    && self.nodes[1].saw_sync_target
                    && self.nodes[0].meta.flags & MDF_CONSISTENT != 0
                    && !self.nodes[0].meta.uuids.is_just_created()
                {
                    self.faults_on = true;
                    let (lo, hi) = self.p.fault_gap;
                    let gap = self.rng.range(lo, hi);
                    self.after(Duration::from_millis(gap), Ev::Fault);
                }
                self.step_switchover();
                self.maybe_promote();
            }
            Phase::Quiesce => {
                if self.quiet() {
                    self.final_check();
                    self.phase = Phase::Done;
                }
            }
            Phase::Done => {}
        }
        // At most one Primary.
        let primaries = (0..2)
            .filter(|&n| self.nodes[n].alive() && self.nodes[n].dev().role() == Role::Primary)
            .count();
        if primaries > 1 {
            self.fail("two Primaries");
        }
    }

    fn quiet(&self) -> bool {
        let Some(link) = self.link.as_ref() else {
            return false;
        };
        self.inflight.is_empty()
            && link.established
            && link.broken.is_none()
            && link.streams.iter().all(|s| s.is_empty())
            && (0..2).all(|n| {
                let node = &self.nodes[n];
                node.alive() && node.link == Some(link.id) && node.pending.is_empty() && {
                    let d = node.dev();
                    d.conn_state() == ConnState::Connected
                        && d.disk_state() == DiskState::UpToDate
                        && d.peer_disk_state() == DiskState::UpToDate
                        && d.is_idle()
                }
            })
    }

    fn final_check(&mut self) {
        self.note("quiescent: checking".into());
        for n in 0..2 {
            let c = self.nodes[n].dev().bitmap().count();
            if c != 0 {
                let name = self.nodes[n].name;
                return self.fail(format!(
                    "checker 2: {name} still has {c} out-of-sync blocks"
                ));
            }
        }
        if !self.nodes[1].saw_sync_target {
            return self.fail("the initial sync never ran");
        }
        let mut diffs = Vec::new();
        for s in 0..self.p.sectors {
            let (a, b) = (self.nodes[0].data.view(s), self.nodes[1].data.view(s));
            if a != b {
                diffs.push((s, a, b));
            }
        }
        if !diffs.is_empty() {
            let first: Vec<String> = diffs
                .iter()
                .take(8)
                .map(|(s, a, b)| format!("sector {s}: A {a} B {b}"))
                .collect();
            return self.fail(format!(
                "checker 2: the disks differ in {} sectors, e.g. {}",
                diffs.len(),
                first.join(", ")
            ));
        }
        for s in 0..self.p.sectors {
            let c = self.nodes[0].data.view(s);
            if !self.acceptable(s, c) {
                let f = self.floor(s);
                let versions = self.versions.get(s).to_vec();
                return self.fail(format!(
                    "checker 3: sector {s} holds version {c}, acknowledged was {f} \
                     (versions {versions:?})"
                ));
            }
        }
    }

    fn report(&self) -> String {
        let mut out = String::new();
        if !self.trace {
            for l in &self.log {
                out.push_str(l);
                out.push('\n');
            }
        }
        for n in 0..2 {
            let node = &self.nodes[n];
            match node.dev.as_ref() {
                Some(d) => out.push_str(&format!(
                    "{}: {:?} {:?} {}/{} {} pdsk {} oos {} idle {} uuids {} pending {}\n",
                    node.name,
                    d.role(),
                    d.peer_role(),
                    d.conn_state(),
                    node.link.map_or("-".to_string(), |l| l.to_string()),
                    d.disk_state(),
                    d.peer_disk_state(),
                    d.bitmap().count(),
                    d.is_idle(),
                    d.uuids(),
                    node.pending.len()
                )),
                None => out.push_str(&format!("{}: down\n", node.name)),
            }
        }
        if std::env::var("SIM_DUMP").is_ok() {
            for n in 0..2 {
                if let Some(d) = self.nodes[n].dev.as_ref() {
                    out.push_str(&format!("{d:#?}\n"));
                }
            }
        }
        out.push_str(&format!(
            "in flight: {} requests; phase {:?}\n",
            self.inflight.len(),
            self.phase
        ));
        out
    }
}

fn run_seed(seed: u64, trace: bool) -> (Result<(), String>, Stats, u64, String) {
    let mut sim = Sim::new(seed, trace);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {msg}"))
        }
    };
    let report = if r.is_err() {
        sim.report()
    } else {
        String::new()
    };
    (r, sim.stats.clone(), sim.hash, report)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulation() {
    let trace = std::env::var("SIM_TRACE").is_ok_and(|v| v != "0");
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let start = env_u64("SIM_SEED_START").unwrap_or(0);
            let n = env_u64("SIM_SEEDS").unwrap_or(500);
            (start..start + n).collect()
        }
    };
    let single = seeds.len() == 1;
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    let progress = std::env::var("SIM_PROGRESS").is_ok_and(|v| v != "0");
    for &seed in &seeds {
        if progress {
            eprintln!("seed {seed}");
        }
        let (r, stats, _, report) = run_seed(seed, trace || single);
        total.add(&stats);
        if let Err(e) = r {
            if failed.is_empty() || single {
                println!("{report}");
            }
            println!("seed {seed} FAILED: {e}");
            println!("replay: SIM_SEED={seed} cargo test -p drbd-core --test sim -- --nocapture\n");
            failed.push(seed);
        }
    }
    println!(
        "{} seeds in {:.1} s: {:?}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        total
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// The same seed gives the same run.
#[test]
fn deterministic() {
    for seed in [1, 2, 3] {
        let (r1, _, h1, _) = run_seed(seed, false);
        let (r2, _, h2, _) = run_seed(seed, false);
        assert_eq!(r1, r2, "seed {seed}");
        assert_eq!(h1, h2, "seed {seed}: the runs differ");
    }
}

/// A write the activity log cannot admit waits, and goes once an extent is free: with every
/// slot referenced, a completion that leaves its extent referenced must not spin on the
/// waiting write (it once did: `retry_waiting` took the write back from the queue it was
/// putting it into).
#[test]
fn write_waits_for_a_busy_activity_log() {
    let sectors = LARGE_SECTORS;
    let p = Params {
        sectors,
        al_extents: 67,
        ..Params::random(&mut Rng::new(1))
    };
    let node = Node::new('A', sectors);
    let local = node.attach(&p).expect("attach");
    let mut dev = Device::new(p.device_config(7), 0, 0, sectors, Some(local)).expect("device");
    let now = Duration::ZERO;
    dev.admin(now, AdminRequest::Primary { force: true })
        .expect("primary --force");
    // Metadata writes and flushes complete at once; data writes stay in flight.
    let mut writes: HashMap<IoId, u64> = HashMap::new();
    let mut completed = Vec::new();
    let mut run = |dev: &mut Device, writes: &mut HashMap<IoId, u64>| {
        while let Some(a) = dev.poll_action() {
            match a {
                Action::Meta { io, .. } => dev.disk_done(now, io, Ok(None)),
                Action::Disk { io, op } => match op {
                    DiskOp::Write { sector, .. } => {
                        writes.insert(io, sector);
                    }
                    _ => dev.disk_done(now, io, Ok(None)),
                },
                Action::Complete { id, result } => {
                    assert!(result.is_ok(), "request {id}: {result:?}");
                    completed.push(id);
                }
                _ => {}
            }
        }
    };
    let extent = activity_log::SECTORS_PER_EXTENT;
    let block = |id: u64, sector: u64| AppOp::Write {
        data: stamp(id, sector, BLOCK),
        fua: false,
    };
    // One write in each of 67 extents, and a second one in extent 0: the log is full.
    for e in 0..67 {
        dev.submit(now, e + 1, e * extent, block(e + 1, e * extent));
        run(&mut dev, &mut writes);
    }
    dev.submit(now, 100, BLOCK, block(100, BLOCK));
    run(&mut dev, &mut writes);
    assert_eq!(
        writes.len(),
        68,
        "every write admitted so far is on its way"
    );
    // A write to a 68th extent has to wait.
    dev.submit(now, 200, 67 * extent, block(200, 67 * extent));
    run(&mut dev, &mut writes);
    assert_eq!(writes.len(), 68, "the write to a new extent waits");
    // The first write to extent 0 completes; extent 0 is still referenced.
    let io = *writes.iter().find(|(_, &s)| s == 0).expect("write at 0").0;
    writes.remove(&io);
    dev.disk_done(now, io, Ok(None));
    run(&mut dev, &mut writes);
    assert_eq!(writes.len(), 67, "the waiting write still waits");
    // The second one completes: extent 0 is free, the waiting write goes.
    let io = *writes
        .iter()
        .find(|(_, &s)| s == BLOCK)
        .expect("write at 8")
        .0;
    writes.remove(&io);
    dev.disk_done(now, io, Ok(None));
    run(&mut dev, &mut writes);
    assert!(
        writes.values().any(|&s| s == 67 * extent),
        "the waiting write was submitted"
    );
}
