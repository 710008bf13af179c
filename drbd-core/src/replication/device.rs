//! The replication state machine of one volume: the sans-IO heart of a node.
//!
//! A [`Device`] owns everything DRBD keeps per volume — roles, connection and disk states,
//! generation UUIDs, the dirty bitmap, the activity log, the transfer log of writes sent to the
//! peer, the receive-side epochs, and the resync — and no I/O. Its inputs are method calls:
//! application requests ([`Device::submit`]), completions of the disk operations it asked for
//! ([`Device::disk_done`]), the connection coming up ([`Device::connected`]), messages from the
//! peer ([`Device::received`]), the connection going away ([`Device::connection_lost`]),
//! administrative requests ([`Device::admin`]) and the passing of time ([`Device::tick`]).
//! Its outputs are [`Action`]s, drained with [`Device::poll_action`]: disk operations, messages
//! to send, completions of application requests, metadata to persist, connection drops.
//!
//! # Write path (Primary)
//!
//! A write takes activity-log references on its 4 MiB extents (writing an AL transaction first
//! when an extent was not active), is tagged with the current epoch, sent to the peer as
//! `P_DATA` and written locally. It completes to the application when the local write is done
//! and the network part is no longer pending: at once for protocol A, on `P_RECV_ACK` for B,
//! on `P_WRITE_ACK` for C. It stays in the transfer log until the peer acknowledges its epoch
//! with `P_BARRIER_ACK` (which the peer sends only after its writes of the epoch are on
//! stable storage); if the connection is lost before that, its blocks are marked out of sync.
//! An epoch is closed (`P_BARRIER` sent) when one of its writes completes to the application —
//! later writes may depend on it — when it reached `max-epoch-size` writes, and by a flush.
//!
//! # Receive path (Secondary)
//!
//! Incoming writes are submitted at once, except that a write overlapping one still in flight
//! waits for it: same-block writes reach the disk in the order they arrived on the data socket
//! (application writes and resync data travel on the same socket). After `P_BARRIER(n)` and
//! the completion of every write of epoch `n`, the backing device is flushed and
//! `P_BARRIER_ACK(n, count)` sent.
//!
//! # Resync
//!
//! After the handshake both nodes run the 8.4 UUID comparison ([`crate::uuid::decide`]). The
//! future SyncSource sends its bitmap, the future target merges it and answers with its own,
//! the source merges that, starts a new bitmap UUID and sends `P_SYNC_UUID`. The target then
//! pulls: every 100 ms the rate controller decides how many sectors to request, the bitmap is
//! scanned for dirty blocks, merged into requests of up to [`RS_MAX_REQUEST_BYTES`], and sent
//! as `P_RS_DATA_REQUEST`. The source reads and answers `P_RS_DATA_REPLY`; the target writes,
//! clears the bits and answers `P_RS_WRITE_ACK`, on which the source clears its bits. A source
//! never reads a block for resync while an application write to it is in flight locally, and
//! an application write waits for a resync read of its blocks: so the order of a block's data
//! on the data socket is the order of its versions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use crate::meta::flags::{
    MDF_CONNECTED_IND, MDF_CONSISTENT, MDF_CRASHED_PRIMARY, MDF_PEER_OUT_DATED, MDF_PRIMARY_IND,
    MDF_WAS_UP_TO_DATE,
};
use crate::replication::activity_log::{ActivityLog, AlDecision, AlWrite, BeginIoError};
use crate::replication::bitmap::{DirtyBitmap, SECTORS_PER_BIT};
use crate::replication::digest::DigestAlg;
use crate::replication::msg::{
    dp, write_pages, Ack, BlockReq, PeerHello, PeerMsg, PeerState, Socket, ID_IN_SYNC,
    ID_OUT_OF_SYNC, ID_SYNCER,
};
use crate::replication::status::{
    AdminError, AdminRequest, ResyncProgress, StateRefusal, Suspended, VolumeStatus,
};
use crate::state::{ConnState, DiskState, Role};
use crate::uuid::{
    self, CompareContext, GenerationUuids, HandshakeInput, HandshakeOutcome, LinkState,
    NewCurrentUuid, Resync, SplitBrainPolicy, UuidFlags, UuidInfo,
};

/// Largest application request in bytes (DRBD's `DRBD_MAX_BIO_SIZE`); callers split larger
/// ones.
pub const MAX_REQUEST_BYTES: u32 = 1 << 20;
/// Largest resync request: 256 KiB keeps one request's disk and network time short so that
/// application writes are not starved behind it.
pub const RS_MAX_REQUEST_BYTES: u32 = 256 << 10;
/// Resync requests never cross a 16 MiB boundary (DRBD's resync extent).
const RS_EXTENT_SECTORS: u64 = (16 << 20) / 512;
/// The resync controller's step (DRBD's `SLEEP_TIME`).
pub const RESYNC_STEP: Duration = Duration::from_millis(100);
/// Most application requests in flight at once in one device; the runtime keeps below it.
pub const MAX_APP_REQUESTS: usize = 1 << 16;

/// allow-two-primaries: how long a write from the peer may wait for the ack that precedes it
/// in the peer's sequence. The ack was sent before the write, on the other socket, so only a
/// stalled meta socket delays it (8.4 waits a ping-timeout; this is more forgiving of a
/// loaded runtime, and the keep-alive catches a dead socket anyway).
pub const SEQ_WAIT_LIMIT: Duration = Duration::from_secs(5);
/// The smallest bound on data-socket messages held behind a write that waits for the peer's
/// sequence number (see `Device::seq_held_limit`): messages without pages (a read reply,
/// say) queue there too, and max-buffers does not slow those down.
pub const SEQ_HELD_LIMIT_MIN: usize = 1024;
/// The bound on writes answered with P_SUPERSEDED / P_RETRY_WRITE and not yet acknowledged:
/// they hold no pages, so max-buffers does not slow the peer down for them, and a peer may
/// legitimately have as many open as it has requests in flight.
pub const ANSWERED_OPEN_LIMIT: usize = MAX_APP_REQUESTS;
/// allow-two-primaries: a write the peer answered with `P_RETRY_WRITE` is sent again at the
/// latest this long after, if nothing else restarted it.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Most plan slots of the resync controller (`c-plan-ahead` is at most 300 steps).
const MAX_PLAN_STEPS: usize = 300;

/// Replication protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Complete when handed to the network.
    A,
    /// Complete when the peer received the data.
    B,
    /// Complete when the peer wrote the data.
    C,
}

impl Protocol {
    /// The letter.
    pub fn letter(self) -> char {
        match self {
            Protocol::A => 'A',
            Protocol::B => 'B',
            Protocol::C => 'C',
        }
    }
}

/// Resync speed settings (units as in drbd.conf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRate {
    /// `resync-rate`, KiB/s (fixed rate, and the controller's initial rate).
    pub rate_kib: u32,
    /// `c-plan-ahead`, 0.1 s; 0 = fixed rate.
    pub c_plan_ahead: u32,
    /// `c-delay-target`, 0.1 s.
    pub c_delay_target: u32,
    /// `c-fill-target`, sectors.
    pub c_fill_target: u32,
    /// `c-max-rate`, KiB/s.
    pub c_max_rate: u32,
    /// `c-min-rate`, KiB/s.
    pub c_min_rate: u32,
}

impl Default for ResyncRate {
    fn default() -> ResyncRate {
        ResyncRate {
            rate_kib: 250,
            c_plan_ahead: 20,
            c_delay_target: 10,
            c_fill_target: 100,
            c_max_rate: 102_400,
            c_min_rate: 250,
        }
    }
}

/// `on-io-error`: what an I/O error of the local disk leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIoError {
    /// `pass_on`: the error stays with the request (which the peer may still serve).
    PassOn,
    /// `call-local-io-error`: the `local-io-error` handler runs, and the disk is detached.
    CallLocalIoError,
    /// `detach` (the default): the disk is given up; the node goes on Diskless, served by
    /// its peer, and no error reaches the application while the peer has good data.
    Detach,
}

impl OnIoError {
    /// The policy of its drbd.conf name.
    pub fn from_name(name: &str) -> Option<OnIoError> {
        match name {
            "pass_on" => Some(OnIoError::PassOn),
            "call-local-io-error" => Some(OnIoError::CallLocalIoError),
            "detach" => Some(OnIoError::Detach),
            _ => None,
        }
    }
}

/// `fencing`: how a Primary that lost its peer makes sure the peer's data is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// `dont-care` (the default): nothing.
    DontCare,
    /// `resource-only`: the `fence-peer` handler is called to outdate the peer.
    ResourceOnly,
    /// `resource-and-stonith`: as `resource-only`, and application I/O is frozen until the
    /// handler's answer is decisive.
    ResourceAndStonith,
}

impl Fencing {
    /// The policy of its drbd.conf name.
    pub fn from_name(name: &str) -> Option<Fencing> {
        match name {
            "dont-care" => Some(Fencing::DontCare),
            "resource-only" => Some(Fencing::ResourceOnly),
            "resource-and-stonith" => Some(Fencing::ResourceAndStonith),
            _ => None,
        }
    }
}

/// Per-volume replication settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub protocol: Protocol,
    /// `max-epoch-size`: writes per epoch.
    pub max_epoch_size: u32,
    /// `max-buffers`: peer writes and resync requests in flight, in 4 KiB pages.
    pub max_buffers: u32,
    /// `disk-flushes`: flush the backing device before acknowledging a barrier.
    pub disk_flushes: bool,
    pub resync: ResyncRate,
    pub split_brain: SplitBrainPolicy,
    /// `allow-two-primaries`.
    pub two_primaries: bool,
    /// `verify-alg`: online verify needs it on both nodes.
    pub verify_alg: Option<DigestAlg>,
    /// `csums-alg`: a SyncTarget asks with the digest of its own block, and only blocks
    /// whose digests differ travel.
    pub csums_alg: Option<DigestAlg>,
    /// `csums-after-crash-only`: checksums only for the resync after a Primary crashed.
    pub csums_after_crash_only: bool,
    /// `on-io-error`: what a failing local disk leads to.
    pub on_io_error: OnIoError,
    /// `fencing`: what a Primary does when it loses its peer.
    pub fencing: Fencing,
    /// A before-resync-target handler is configured: a SyncTarget starts only after it
    /// exits 0 (any other exit drops the connection).
    pub before_resync_target: bool,
    /// A before-resync-source handler is configured: a SyncSource starts only after it exits
    /// 0 or 3.
    pub before_resync_source: bool,
    /// Seed of the generator for new UUIDs.
    pub rng_seed: u64,
}

impl Default for DeviceConfig {
    fn default() -> DeviceConfig {
        DeviceConfig {
            protocol: Protocol::C,
            max_epoch_size: 2048,
            max_buffers: 2048,
            disk_flushes: true,
            resync: ResyncRate::default(),
            split_brain: SplitBrainPolicy::default(),
            two_primaries: false,
            verify_alg: None,
            csums_alg: None,
            csums_after_crash_only: false,
            on_io_error: OnIoError::Detach,
            fencing: Fencing::DontCare,
            before_resync_target: false,
            before_resync_source: false,
            rng_seed: 0x5eed,
        }
    }
}

/// A resync waiting for its before-resync handler.
#[derive(Debug, Clone, Copy)]
struct ResyncHandlerWait {
    handler: Handler,
    /// Identifies this wait: an exit code of an earlier run of the same handler (from a
    /// connection since lost) does not answer it.
    token: u64,
    /// The connection the resync belongs to.
    conn_gen: u64,
    /// SyncSource: the new bitmap UUID to send once the handler agreed.
    sync_uuid: u64,
}

/// What the backing device's metadata held when it was attached.
#[derive(Debug, Clone)]
pub struct LocalDisk {
    /// Usable size in sectors.
    pub sectors: u64,
    pub uuids: GenerationUuids,
    /// `MDF_*` flags from the superblock.
    pub flags: u32,
    /// The bitmap, with the extents of the activity log already marked (crash recovery).
    pub bitmap: DirtyBitmap,
    /// The activity log (empty active set, next transaction number after the replayed ones).
    pub al: ActivityLog,
}

/// Identifies an application request (chosen by the caller, unique while in flight).
pub type ReqId = u64;
/// Identifies a disk or metadata operation (chosen by the device).
pub type IoId = u64;

/// An application request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppOp {
    Read { len: u32 },
    Write { data: Bytes, fua: bool },
    Flush,
    Discard { len: u32 },
    Zeroes { len: u32 },
}

/// Why an application request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// Writes on a Secondary (EPERM).
    #[error("the device is not Primary")]
    ReadOnly,
    /// Neither the local disk nor the peer has good data / could take the write (EIO).
    #[error("no access to good data")]
    NoData,
    /// The local disk failed and the peer could not help (EIO).
    #[error("I/O error")]
    Disk,
    /// Outside the device, misaligned, or too large (EINVAL).
    #[error("invalid request")]
    Invalid,
}

/// A disk operation for the runtime to perform on the backing device's data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    Read { sector: u64, len: u32 },
    Write { sector: u64, data: Bytes, fua: bool },
    Flush,
    Discard { sector: u64, len: u32 },
    Zeroes { sector: u64, len: u32 },
}

/// Metadata to persist; the runtime writes it and reports completion with [`Device::disk_done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOp {
    /// The superblock's UUIDs and flags (the runtime keeps the other fields), durably.
    Superblock { uuids: GenerationUuids, flags: u32 },
    /// Bitmap pages (index within the bitmap area, 4096 bytes each), durably.
    BitmapPages { pages: Vec<(u64, Vec<u8>)> },
    /// Write `pages` first, then the activity-log transaction, durably.
    AlTransaction {
        pages: Vec<(u64, Vec<u8>)>,
        al: AlWrite,
    },
}

/// Something the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Perform a disk operation; report with [`Device::disk_done`].
    Disk { io: IoId, op: DiskOp },
    /// Persist metadata; report with [`Device::disk_done`]. At most one is outstanding at a
    /// time: the next comes after the completion of the previous.
    Meta { io: IoId, op: MetaOp },
    /// Send a message on the current connection.
    Send(PeerMsg),
    /// Complete an application request (read data for reads).
    Complete {
        id: ReqId,
        result: Result<Option<Bytes>, IoError>,
    },
    /// Drop the connection; `retry`: connect again after connect-int, else stay StandAlone.
    Disconnect { reason: String, retry: bool },
    /// A state change or event worth a log line.
    Log(String),
    /// Run the configured handler (drbd.conf `handlers { }`), if any. Only `fence-peer`'s
    /// exit code is wanted back ([`Device::handler_done`]); the others are not waited for.
    Handler(Handler),
}

/// The handlers DRBD calls at given moments (drbd.conf `handlers { }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handler {
    PriOnInconDegr,
    PriLostAfterSb,
    /// `rr-conflict call-pri-lost`: this Primary would have become SyncTarget.
    PriLost,
    LocalIoError,
    InitialSplitBrain,
    SplitBrain,
    BeforeResyncTarget,
    BeforeResyncSource,
    AfterResyncTarget,
    OutOfSync,
    FencePeer,
    /// The SyncSource finished a resync with fencing configured: both disks UpToDate, the
    /// peer's fence (a cluster constraint) can be lifted.
    UnfencePeer,
}

impl Handler {
    /// Its drbd.conf name.
    pub fn name(self) -> &'static str {
        match self {
            Handler::PriOnInconDegr => "pri-on-incon-degr",
            Handler::PriLostAfterSb => "pri-lost-after-sb",
            Handler::PriLost => "pri-lost",
            Handler::LocalIoError => "local-io-error",
            Handler::InitialSplitBrain => "initial-split-brain",
            Handler::SplitBrain => "split-brain",
            Handler::BeforeResyncTarget => "before-resync-target",
            Handler::BeforeResyncSource => "before-resync-source",
            Handler::AfterResyncTarget => "after-resync-target",
            Handler::OutOfSync => "out-of-sync",
            Handler::FencePeer => "fence-peer",
            Handler::UnfencePeer => "unfence-peer",
        }
    }
}

impl From<uuid::Handler> for Handler {
    fn from(h: uuid::Handler) -> Handler {
        match h {
            uuid::Handler::InitialSplitBrain => Handler::InitialSplitBrain,
            uuid::Handler::PriLostAfterSb => Handler::PriLostAfterSb,
            uuid::Handler::SplitBrain => Handler::SplitBrain,
            uuid::Handler::PriLost => Handler::PriLost,
        }
    }
}

/// A protocol violation by the peer: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {0}")]
pub struct ProtocolError(pub String);

/// What the local node tells the peer in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalHello {
    pub uuids: UuidInfo,
    pub state: PeerState,
    /// Backing device size in sectors (0 when diskless).
    pub disk_sectors: u64,
    /// Exposed size in sectors.
    pub current_sectors: u64,
    pub discard_my_data: bool,
}

impl LocalHello {
    /// What the peer learns from this hello in a handshake that agreed on
    /// `protocol_version` and `features`, where the peer holds `RESOLVE_CONFLICTS` when
    /// `peer_resolves` (for embedding the core without the wire, as the simulations do).
    pub fn as_seen_by_peer(
        &self,
        protocol_version: u32,
        features: u32,
        peer_resolves: bool,
    ) -> PeerHello {
        PeerHello {
            protocol_version,
            features,
            resolve_conflicts: peer_resolves,
            uuids: self.uuids,
            state: self.state,
            disk_sectors: self.disk_sectors,
            user_sectors: 0,
            current_sectors: self.current_sectors,
            discard_my_data: self.discard_my_data,
        }
    }
}

// ------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Request {
    sector: u64,
    sectors: u64,
    kind: ReqKind,
    /// Waiting for its AL transaction (io id).
    al_io: Option<IoId>,
    /// Holds activity-log references (released when the request is destroyed).
    al_held: bool,
    local_pending: bool,
    local_ok: bool,
    net_pending: bool,
    net_ok: bool,
    /// Epochs of the transfer log holding this write (sent, epoch not yet acknowledged):
    /// more than one when a write was sent again after a `P_RETRY_WRITE`.
    tl_refs: u32,
    /// The epoch the write was last sent in.
    epoch_nr: u32,
    /// A write that has started (it passed [`Device::may_start`]): it takes part in conflict
    /// detection until it completes.
    active: bool,
    /// Sent to the peer (or, unreplicated, issued to the disk) at least once.
    issued: bool,
    /// The peer answered `P_RETRY_WRITE`: it is sent again (and written again locally)
    /// once the peer's conflicting write has been applied here.
    postponed: bool,
    /// When it was postponed.
    postponed_at: Duration,
    completed: bool,
    /// Read data, for reads.
    data: Option<Bytes>,
    /// A flush waiting for the acknowledgement of this barrier number.
    flush_barrier: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ReqKind {
    Read,
    Write { data: Bytes, fua: bool },
    Flush,
    Discard,
    Zeroes,
}

impl ReqKind {
    fn is_write(&self) -> bool {
        matches!(
            self,
            ReqKind::Write { .. } | ReqKind::Discard | ReqKind::Zeroes
        )
    }
}

/// One epoch of the transfer log.
#[derive(Debug)]
struct TlEpoch {
    nr: u32,
    /// Requests sent in this epoch (ids; a request may already be completed).
    reqs: Vec<ReqId>,
    /// Ranges sent, for marking out of sync when the connection is lost.
    ranges: Vec<(u64, u64)>,
    /// `P_BARRIER` sent.
    closed: bool,
    /// Writes of this epoch the peer answered with `P_SUPERSEDED`, and with
    /// `P_RETRY_WRITE`: a peer may leave them out of the epoch's size in `P_BARRIER_ACK`.
    superseded: u32,
    retried: u32,
}

/// A write received from the peer (application or resync).
#[derive(Debug, Clone)]
struct PeerWrite {
    sector: u64,
    sectors: u64,
    block_id: u64,
    flags: u32,
    op: DiskOp,
    resync: bool,
    /// Receive epoch (index into the epoch sequence), for application writes.
    epoch: Option<u64>,
    /// Connection generation it arrived on.
    conn_gen: u64,
    /// allow-two-primaries: applied over local writes the peer told us to send again; they
    /// are sent again once this write is done.
    restart: bool,
}

impl PeerWrite {
    /// 4 KiB pages it holds (`max-buffers`), as [`PeerMsg::held_pages`] counts the message
    /// it came in: its payload, at least one page (discards and zeroes too).
    fn pages(&self) -> u64 {
        match &self.op {
            DiskOp::Write { data, .. } => write_pages(data.len()),
            _ => write_pages(0),
        }
    }
}

#[derive(Debug)]
struct RecvEpoch {
    id: u64,
    barrier: Option<u32>,
    writes: u32,
    /// Writes answered with `P_SUPERSEDED` or `P_RETRY_WRITE` that the peer's sender
    /// surely forgot (not in `writes`).
    answered: u32,
    /// Answered writes the peer's sender may still count: the epoch's ack waits for them.
    answers_open: u32,
    pending: u32,
    flushing: bool,
    flushed: bool,
}

/// A peer write this node answered with `P_SUPERSEDED` / `P_RETRY_WRITE` whose epoch's
/// acknowledgement waits until the peer's sender surely forgot it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenAnswer {
    /// Until the peer acknowledges our covering write `by`.
    Superseded { epoch: u64, by: ReqId },
    /// Until the peer sends the write again.
    Retried {
        epoch: u64,
        sector: u64,
        sectors: u64,
    },
}

impl OpenAnswer {
    fn epoch(self) -> u64 {
        match self {
            OpenAnswer::Superseded { epoch, .. } | OpenAnswer::Retried { epoch, .. } => epoch,
        }
    }
}

/// How a peer write relates to the local writes to its blocks (allow-two-primaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conflict {
    /// No unfinished local write to its blocks: apply it.
    None,
    /// Wait until the local writes are decided or finished.
    Wait,
    /// Apply it, then send the postponed local writes to its blocks again.
    Restart,
    /// Resolving node: this local write covers it; answer `P_SUPERSEDED`.
    Superseded(ReqId),
    /// Resolving node: answer `P_RETRY_WRITE`.
    Retry,
}

/// A read for the peer (data request or resync request).
#[derive(Debug, Clone)]
struct PeerRead {
    sector: u64,
    len: u32,
    block_id: u64,
    resync: bool,
    /// Checksum-based resync: the SyncTarget's digest of the block.
    digest: Option<Bytes>,
    conn_gen: u64,
}

#[derive(Debug)]
enum IoPurpose {
    AppLocal(ReqId),
    AlFor(ReqId),
    /// The flush before an AL transaction that evicts extents.
    AlFlushFor(ReqId, AlWrite),
    PeerWrite(PeerWrite),
    PeerRead(PeerRead),
    /// Online verify: a block read to digest, for the peer (`peer_digest` None: reply with
    /// `P_OV_REPLY`) or to compare with the peer's digest.
    VerifyRead {
        sector: u64,
        len: u32,
        block_id: u64,
        peer_digest: Option<Bytes>,
        conn_gen: u64,
    },
    /// Checksum-based resync: the SyncTarget reads a block to digest it for its request.
    CsumRead {
        sector: u64,
        len: u32,
        conn_gen: u64,
    },
    BarrierFlush {
        epoch: u64,
        conn_gen: u64,
    },
    /// The superblock holding a new bitmap UUID, to send in `P_SYNC_UUID` once written.
    SyncUuid {
        uuid: u64,
        conn_gen: u64,
    },
    /// The flush of the backing device when it is attached.
    AttachFlush,
    /// A flush making resync writes durable before they are acknowledged.
    ResyncFlush {
        ranges: Vec<(u64, u64)>,
        conn_gen: u64,
    },
    Meta,
    /// A superblock write that application writes wait for.
    MetaGate,
}

/// A cluster-wide state change this node asked the peer for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateRequest {
    /// `verify`: VerifyS here, VerifyT there.
    Verify,
    /// `invalidate`: a full sync to this node.
    FullSyncAsTarget,
    /// `invalidate-remote`: a full sync to the peer.
    FullSyncAsSource,
}

impl StateRequest {
    fn what(self) -> &'static str {
        match self {
            StateRequest::Verify => "online verify",
            StateRequest::FullSyncAsTarget => "invalidate",
            StateRequest::FullSyncAsSource => "invalidate-remote",
        }
    }
}

/// A running online verify (`VerifyS` asks, `VerifyT` answers).
#[derive(Debug)]
struct VerifyState {
    source: bool,
    /// Source: the next sector to ask about.
    position: u64,
    /// Source: requests sent and not answered (sector -> bytes).
    in_flight: BTreeMap<u64, u32>,
    /// Source: local reads for comparisons in progress.
    reading: u32,
    /// Blocks compared so far.
    done: u64,
    /// Blocks found different.
    found: u64,
    /// The run of different blocks being collected for the log: (sector, sectors).
    run: Option<(u64, u64)>,
    started: Duration,
    /// Target: the first request arrived.
    seen_request: bool,
}

#[derive(Debug)]
struct ResyncState {
    /// Bits out of sync when the resync started.
    total: u64,
    /// Target: ask with checksums (csums-alg).
    use_csums: bool,
    /// Target: sectors found in sync by their checksums.
    same_csum: u64,
    /// Target: next bit to look at.
    cursor: u64,
    /// Target: requests in flight: sector -> sectors.
    in_flight: BTreeMap<u64, u64>,
    in_flight_sectors: u64,
    /// Target: blocks whose resync failed.
    failed: u64,
    // Controller state.
    last_step: Option<Duration>,
    sect_in: u64,
    plan: VecDeque<i64>,
    plan_total: i64,
    ctrl_in_flight: i64,
    // Rate: (time, remaining bits) samples.
    marks: VecDeque<(Duration, u64)>,
    /// Sectors of this step's budget not requested yet (the in-flight cap was reached); taken
    /// as replies make room, so the rate is reached even when the cap is small.
    step_left: u64,
    /// Sectors of application writes received from the peer since the last step (c-min-rate).
    app_sectors: u64,
    /// Resync sectors received in the last step (c-min-rate).
    last_step_sectors: u64,
    /// Average resync sectors per step, decaying by a quarter per step (c-min-rate compares
    /// it, so that one paused step does not make the resync look slow).
    avg_step_sectors: u64,
    /// Target: the ping round trip before the end of the resync: `Some(false)` sent,
    /// `Some(true)` answered.
    final_ping: Option<bool>,
}

impl ResyncState {
    fn new(total: u64) -> ResyncState {
        ResyncState {
            total,
            use_csums: false,
            same_csum: 0,
            cursor: 0,
            in_flight: BTreeMap::new(),
            in_flight_sectors: 0,
            failed: 0,
            last_step: None,
            sect_in: 0,
            plan: VecDeque::new(),
            plan_total: 0,
            ctrl_in_flight: 0,
            marks: VecDeque::new(),
            step_left: 0,
            app_sectors: 0,
            last_step_sectors: 0,
            avg_step_sectors: 0,
            final_ping: None,
        }
    }
}

/// The replication state machine of one volume. See the module documentation.
#[derive(Debug)]
pub struct Device {
    cfg: DeviceConfig,
    volume: u16,
    minor: u32,
    sectors: u64,
    role: Role,
    peer_role: Role,
    conn: ConnState,
    disk: DiskState,
    peer_disk: DiskState,
    standalone_reason: Option<String>,
    uuids: GenerationUuids,
    md_flags: u32,
    bitmap: DirtyBitmap,
    al: Option<ActivityLog>,
    rng: u64,
    now: Duration,

    // Connection.
    connected: bool,
    conn_gen: u64,
    protocol_version: u32,
    features: u32,
    resolve_conflicts: bool,
    peer_uuids: Option<UuidInfo>,
    /// A disk attached while connected: the state its metadata gives, until the handshake
    /// (the local disk is `Negotiating` meanwhile, as in DRBD).
    negotiating: Option<DiskState>,
    peer_user_isp: bool,
    /// This node's sync-pause flag (`pause-sync`; 8.4 `user_isp`).
    user_isp: bool,
    /// Application I/O suspended by `suspend-io` (8.4 `susp`).
    user_suspended: bool,
    discard_my_data: bool,
    packet_seq: u32,
    /// allow-two-primaries, resolving node: the highest sequence number seen from the peer
    /// (its data packets and acks share one counter).
    peer_seq: u32,
    /// allow-two-primaries, resolving node: data-socket messages held back because a write
    /// arrived before the peer's ack that precedes it (on the other socket); bounded by
    /// `max-buffers`.
    seq_held: VecDeque<PeerMsg>,
    /// Resolving node: peer writes answered with `P_SUPERSEDED` / `P_RETRY_WRITE` that the
    /// peer's sender may still count in their epochs.
    answered_open: Vec<OpenAnswer>,
    /// When the oldest held message arrived.
    seq_held_since: Duration,
    last_state_sent: Option<PeerState>,

    // Application requests.
    reqs: HashMap<ReqId, Request>,
    /// Active writes ([`Request::active`]) by (first sector, id) -> sectors: the local side of
    /// conflict detection.
    active_writes: BTreeMap<(u64, ReqId), u64>,
    waiting: VecDeque<ReqId>,
    /// [`Device::retry_waiting`] is running; `retry_again`: a nested call asked for another
    /// round.
    retrying: bool,
    retry_again: bool,
    /// [`Device::pump_peer_writes`] is running; `pump_again`: likewise.
    pumping: bool,
    pump_again: bool,
    /// Superblock writes that application writes must wait for.
    md_gate: u32,

    // Transfer log.
    tl: VecDeque<TlEpoch>,
    epoch_nr: u32,
    epoch_writes: u32,
    close_epoch: bool,

    // Receive side.
    recv_epochs: VecDeque<RecvEpoch>,
    next_recv_epoch: u64,
    peer_writes_in_flight: HashMap<IoId, (u64, u64)>,
    peer_waiting: VecDeque<PeerWrite>,
    /// 4 KiB pages of the peer writes held (waiting or in flight): what `max-buffers`
    /// bounds, as 8.4 counts the receiver's pages.
    peer_pages: u64,
    rs_reads_waiting: VecDeque<PeerRead>,
    peer_reads_in_flight: HashMap<IoId, (u64, u64)>,
    /// SyncTarget: resync writes done but not yet flushed (sector, sectors).
    rs_unflushed: Vec<(u64, u64)>,
    /// SyncTarget: a [`IoPurpose::ResyncFlush`] is in flight.
    rs_flushing: bool,
    /// The [`IoPurpose::AttachFlush`] is in flight.
    attach_flushing: bool,
    /// A resync as SyncSource waiting for the attach flush: (sync UUID, connection).
    sync_uuid_deferred: Option<(u64, u64)>,

    // I/O.
    next_io: IoId,
    ios: HashMap<IoId, IoPurpose>,
    /// Metadata writes waiting for the one in flight: they go out one at a time, in order.
    meta_queue: VecDeque<(IoId, MetaOp)>,
    meta_busy: bool,

    resync: Option<ResyncState>,
    verify: Option<VerifyState>,
    /// The resync about to start resolves a split brain: report the diverged regions when
    /// the bitmaps are merged.
    sb_report: bool,
    /// `fence-peer` runs and its exit code is awaited: the token of that wait (see
    /// [`Device::wants_exit_code`]).
    fence_wait: Option<u64>,
    /// Source of handler-wait tokens.
    wait_tokens: u64,
    /// Application I/O is frozen (resource-and-stonith, until fence-peer's answer).
    frozen: bool,
    /// Clients holding the device open (NBD connections): a Primary held open is not
    /// demoted, by `secondary` or by `call-pri-lost-after-sb`.
    openers: u32,
    /// before-resync-target / before-resync-source runs and the resync waits for its exit
    /// code (8.4 runs it synchronously before the resync starts).
    resync_handler: Option<ResyncHandlerWait>,
    /// A cluster-wide state change asked of the peer (`P_STATE_CHG_REQ`), waiting for its
    /// answer.
    state_request: Option<StateRequest>,
    actions: VecDeque<Action>,

    // Counters (sectors).
    written: u64,
    read: u64,
    sent: u64,
    received: u64,
}

/// The metadata flags and the disk state a disk gets when it is attached.
fn attach_state(flags: u32) -> (u32, DiskState) {
    let mut flags = flags;
    // A node that was Primary when it stopped without demoting crashed as Primary.
    if flags & MDF_PRIMARY_IND != 0 {
        flags |= MDF_CRASHED_PRIMARY;
    }
    let state = if flags & MDF_CONSISTENT == 0 {
        DiskState::Inconsistent
    } else if flags & MDF_WAS_UP_TO_DATE == 0 {
        // Consistent data that was not up to date when last written: Outdated.
        DiskState::Outdated
    } else {
        // Consistent data is UpToDate when no fencing policy asks to wait for the peer (8.4
        // attach with fencing dont-care).
        DiskState::UpToDate
    };
    (flags, state)
}

fn sectors_of(len: u32) -> u64 {
    u64::from(len) / 512
}

/// `a` is later than `b` in a wrapping 32-bit sequence (8.4's `seq_greater`).
fn seq_greater(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The sequence number a message carries, if any.
fn seq_of(msg: &PeerMsg) -> Option<u32> {
    match msg {
        PeerMsg::Data { seq, .. } | PeerMsg::Trim { seq, .. } => Some(*seq),
        PeerMsg::RecvAck(a)
        | PeerMsg::WriteAck(a)
        | PeerMsg::RsWriteAck(a)
        | PeerMsg::NegAck(a)
        | PeerMsg::NegDReply(a)
        | PeerMsg::NegRsDReply(a)
        | PeerMsg::Superseded(a)
        | PeerMsg::RetryWrite(a)
        | PeerMsg::OvResult(a)
        | PeerMsg::RsIsInSync(a) => Some(a.seq),
        _ => None,
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Device {
    /// A device with `disk` attached (or Diskless when `None`), Secondary and StandAlone.
    /// `sectors` is the exposed size (the disk's when attached).
    pub fn new(
        cfg: DeviceConfig,
        volume: u16,
        minor: u32,
        sectors: u64,
        disk: Option<LocalDisk>,
    ) -> Result<Device, String> {
        let rng = cfg.rng_seed | 1;
        let (uuids, flags, bitmap, al, disk_state) = match disk {
            Some(d) => {
                if d.bitmap.device_sectors() != d.sectors || d.sectors != sectors {
                    return Err(format!(
                        "bitmap covers {} sectors, disk has {}, device {}",
                        d.bitmap.device_sectors(),
                        d.sectors,
                        sectors
                    ));
                }
                let (flags, state) = attach_state(d.flags);
                (d.uuids, flags, d.bitmap, Some(d.al), state)
            }
            None => (
                GenerationUuids::default(),
                0,
                DirtyBitmap::new(sectors).map_err(|e| e.to_string())?,
                None,
                DiskState::Diskless,
            ),
        };
        let mut dev = Device {
            cfg,
            volume,
            minor,
            sectors,
            role: Role::Secondary,
            peer_role: Role::Unknown,
            conn: ConnState::StandAlone,
            disk: disk_state,
            // A peer fenced before the restart stays Outdated until it connects.
            peer_disk: if flags & MDF_PEER_OUT_DATED != 0 {
                DiskState::Outdated
            } else {
                DiskState::DUnknown
            },
            standalone_reason: None,
            uuids,
            md_flags: flags,
            bitmap,
            al,
            rng,
            now: Duration::ZERO,
            connected: false,
            conn_gen: 0,
            protocol_version: 0,
            features: 0,
            resolve_conflicts: false,
            peer_uuids: None,
            negotiating: None,
            peer_user_isp: false,
            user_isp: false,
            user_suspended: false,
            discard_my_data: false,
            packet_seq: 0,
            peer_seq: 0,
            seq_held: VecDeque::new(),
            answered_open: Vec::new(),
            seq_held_since: Duration::ZERO,
            last_state_sent: None,
            reqs: HashMap::new(),
            active_writes: BTreeMap::new(),
            retrying: false,
            retry_again: false,
            pumping: false,
            pump_again: false,
            waiting: VecDeque::new(),
            md_gate: 0,
            tl: VecDeque::new(),
            epoch_nr: 1,
            epoch_writes: 0,
            close_epoch: false,
            recv_epochs: VecDeque::new(),
            next_recv_epoch: 0,
            peer_writes_in_flight: HashMap::new(),
            peer_waiting: VecDeque::new(),
            peer_pages: 0,
            rs_reads_waiting: VecDeque::new(),
            peer_reads_in_flight: HashMap::new(),
            rs_unflushed: Vec::new(),
            rs_flushing: false,
            attach_flushing: false,
            sync_uuid_deferred: None,
            next_io: 1,
            ios: HashMap::new(),
            meta_queue: VecDeque::new(),
            meta_busy: false,
            resync: None,
            verify: None,
            state_request: None,
            sb_report: false,
            fence_wait: None,
            wait_tokens: 0,
            frozen: false,
            openers: 0,
            resync_handler: None,
            actions: VecDeque::new(),
            written: 0,
            read: 0,
            sent: 0,
            received: 0,
        };
        if dev.disk != DiskState::Diskless {
            // Writes from before a crash of this process may still sit in the disk's volatile
            // cache while the new activity log no longer covers them: once a resync declared
            // them in sync, a power loss would silently revert them (found by tests/sim.rs).
            // Flush them first; a SyncSource resync waits for it (`sync_uuid_persisted`).
            dev.attach_flushing = true;
            let io = dev.io(IoPurpose::AttachFlush);
            dev.actions.push_back(Action::Disk {
                io,
                op: DiskOp::Flush,
            });
            // The bits of replayed activity-log extents must reach the on-disk bitmap before
            // any new AL transaction (metadata writes go out in order): the new transactions
            // describe only the new active set, so a second crash would otherwise forget
            // that those extents may differ from the peer (found by tests/sim.rs).
            dev.persist_bitmap();
            // Record the crashed-primary flag and that the node is no longer Primary.
            dev.persist_superblock(false);
        }
        Ok(dev)
    }

    // --------------------------------------------------------------------------------------
    // Queries
    // --------------------------------------------------------------------------------------

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn peer_role(&self) -> Role {
        self.peer_role
    }
    pub fn conn_state(&self) -> ConnState {
        self.conn
    }
    pub fn disk_state(&self) -> DiskState {
        self.disk
    }
    pub fn peer_disk_state(&self) -> DiskState {
        self.peer_disk
    }
    pub fn uuids(&self) -> GenerationUuids {
        self.uuids
    }
    /// The in-memory bitmap.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }
    /// The metadata flags as they should be on disk now.
    pub fn md_flags(&self) -> u32 {
        self.md_flags
    }
    /// Exposed size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
    /// Whether the device has nothing in flight (requests, peer I/O, metadata writes).
    pub fn is_idle(&self) -> bool {
        self.reqs.is_empty() && self.ios.is_empty() && self.peer_waiting.is_empty()
    }
    /// Whether another peer write may be accepted now (`max-buffers`); when not, a runtime
    /// stops reading the data socket until disk completions arrive (the drbd-net runtime
    /// does it with [`Device::peer_pages`] against the same limit). The meta socket must be
    /// read on regardless: held writes may wait for what arrives there (a sequence number,
    /// or the acknowledgement of a local write they conflict with), as 8.4 reads it on its
    /// own thread.
    pub fn can_receive(&self) -> bool {
        debug_assert_eq!(self.peer_pages, self.peer_pages_recounted());
        // One write may take the count past the limit (its size is known only once read),
        // as 8.4's receiver may allocate past max-buffers for the packet it is reading.
        self.peer_pages < u64::from(self.cfg.max_buffers)
    }
    /// 4 KiB pages held by peer writes (`max-buffers` counts these).
    pub fn peer_pages(&self) -> u64 {
        debug_assert_eq!(self.peer_pages, self.peer_pages_recounted());
        self.peer_pages
    }
    /// `max-buffers`, in 4 KiB pages.
    pub fn max_buffers(&self) -> u32 {
        self.cfg.max_buffers
    }
    fn peer_pages_recounted(&self) -> u64 {
        let flight: u64 = self
            .ios
            .values()
            .map(|p| match p {
                IoPurpose::PeerWrite(w) => w.pages(),
                _ => 0,
            })
            .sum();
        let waiting: u64 = self.peer_waiting.iter().map(|w| w.pages()).sum();
        let held: u64 = self.seq_held.iter().map(PeerMsg::held_pages).sum();
        flight + waiting + held
    }
    /// How many data-socket messages a peer may leave waiting for its sequence numbers
    /// before that counts as a protocol error: a bound on what a misbehaving peer can make
    /// this node keep, never below [`SEQ_HELD_LIMIT_MIN`].
    fn seq_held_limit(&self) -> usize {
        (self.cfg.max_buffers as usize).max(SEQ_HELD_LIMIT_MIN)
    }
    /// The current connection generation (incremented by every [`Device::connected`]).
    pub fn conn_gen(&self) -> u64 {
        self.conn_gen
    }

    /// What to tell the peer in the next handshake.
    pub fn local_hello(&self) -> LocalHello {
        LocalHello {
            uuids: self.uuid_info(),
            state: self.state_word(),
            disk_sectors: if self.disk == DiskState::Diskless {
                0
            } else {
                self.sectors
            },
            current_sectors: self.sectors,
            discard_my_data: self.discard_my_data,
        }
    }

    /// The operator's view.
    pub fn status(&self) -> VolumeStatus {
        let resync = self.resync.as_ref().map(|r| {
            let remaining = self.bitmap.count();
            let rate_blocks = match (r.marks.front(), r.marks.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => {
                    let secs = (b.0 - a.0).as_secs_f64();
                    (a.1.saturating_sub(b.1)) as f64 / secs
                }
                _ => 0.0,
            };
            ResyncProgress {
                total_blocks: r.total.max(remaining),
                remaining_blocks: remaining,
                rate_kib_s: (rate_blocks * 4.0) as u64,
                eta_s: if rate_blocks > 0.0 {
                    (remaining as f64 / rate_blocks) as u64
                } else {
                    0
                },
                paused_user: self.user_isp,
                paused_peer: self.peer_user_isp,
            }
        });
        VolumeStatus {
            volume: self.volume,
            minor: self.minor,
            role: self.role,
            peer_role: self.peer_role,
            conn: self.conn,
            disk: self.disk,
            peer_disk: self.peer_disk,
            size_sectors: self.sectors,
            out_of_sync_kib: self.bitmap.count() * 4,
            resync,
            protocol: self.cfg.protocol.letter(),
            uuids: self.uuids.to_array(),
            pending_writes: self
                .reqs
                .values()
                .filter(|r| r.kind.is_write() && !r.completed)
                .count() as u32,
            written_kib: self.written / 2,
            read_kib: self.read / 2,
            sent_kib: self.sent / 2,
            received_kib: self.received / 2,
            standalone_reason: self.standalone_reason.clone(),
            suspended: Suspended {
                user: self.user_suspended,
                fencing: self.frozen,
            },
        }
    }

    fn uuid_info(&self) -> UuidInfo {
        let mut flags = 0;
        if self.discard_my_data {
            flags |= UuidFlags::DISCARD_MY_DATA.0;
        }
        if self.md_flags & MDF_CRASHED_PRIMARY != 0 {
            flags |= UuidFlags::CRASHED_PRIMARY.0;
        }
        // While negotiating after an attach, the flag describes the attached data.
        if self.negotiating.unwrap_or(self.disk) <= DiskState::Inconsistent {
            flags |= UuidFlags::INCONSISTENT.0;
        }
        UuidInfo::new(self.uuids, self.bitmap.count(), UuidFlags(flags))
    }

    fn state_word(&self) -> PeerState {
        PeerState {
            role: self.role,
            peer_role: self.peer_role,
            conn: self.conn,
            disk: self.disk,
            peer_disk: self.peer_disk,
            user_isp: self.user_isp,
        }
    }

    // --------------------------------------------------------------------------------------
    // Small helpers
    // --------------------------------------------------------------------------------------

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic for a seed, which the simulation relies on.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn io(&mut self, purpose: IoPurpose) -> IoId {
        let id = self.next_io;
        self.next_io += 1;
        self.ios.insert(id, purpose);
        id
    }

    fn handler(&mut self, h: Handler) {
        self.log(format!("helper command: {}", h.name()));
        self.actions.push_back(Action::Handler(h));
    }

    fn log(&mut self, msg: impl Into<String>) {
        self.actions.push_back(Action::Log(msg.into()));
    }

    fn send(&mut self, msg: PeerMsg) {
        debug_assert!(self.connected, "send while not connected: {}", msg.name());
        if self.connected {
            self.actions.push_back(Action::Send(msg));
        }
    }

    fn has_disk(&self) -> bool {
        self.disk >= DiskState::Inconsistent
    }

    /// Whether writes are replicated now.
    fn replicating(&self) -> bool {
        self.connected
            && matches!(
                self.conn,
                ConnState::Connected
                    | ConnState::SyncSource
                    | ConnState::SyncTarget
                    | ConnState::PausedSyncS
                    | ConnState::PausedSyncT
                    | ConnState::VerifyS
                    | ConnState::VerifyT
            )
            && self.peer_disk >= DiskState::Inconsistent
    }

    /// A connection state between the handshake and the start of a resync: writes wait.
    fn transitional(&self) -> bool {
        matches!(
            self.conn,
            ConnState::WfBitMapS | ConnState::WfBitMapT | ConnState::WfSyncUuid
        )
    }

    fn in_sync_state(&self) -> bool {
        matches!(
            self.conn,
            ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::PausedSyncS
                | ConnState::PausedSyncT
        )
    }

    fn set_conn(&mut self, c: ConnState) {
        if self.conn != c {
            self.log(format!("conn( {} -> {} )", self.conn, c));
            self.conn = c;
        }
    }

    fn set_disk(&mut self, d: DiskState) {
        if self.disk != d {
            self.log(format!("disk( {} -> {} )", self.disk, d));
            self.disk = d;
        }
    }

    fn set_peer_disk(&mut self, d: DiskState) {
        if self.peer_disk != d {
            self.log(format!("pdsk( {} -> {} )", self.peer_disk, d));
            self.peer_disk = d;
        }
    }

    /// Sends `P_STATE` if the state word changed since the last one sent.
    fn send_state(&mut self) {
        if !self.connected {
            return;
        }
        let s = self.state_word();
        if self.last_state_sent != Some(s) {
            self.last_state_sent = Some(s);
            self.send(PeerMsg::State(s));
        }
    }

    fn compute_flags(&self) -> u32 {
        let mut f = self.md_flags
            & !(MDF_CONSISTENT
                | MDF_WAS_UP_TO_DATE
                | MDF_PRIMARY_IND
                | MDF_CONNECTED_IND
                | MDF_PEER_OUT_DATED);
        if self.disk >= DiskState::Outdated && self.disk != DiskState::DUnknown {
            f |= MDF_CONSISTENT;
        }
        if self.disk == DiskState::UpToDate {
            f |= MDF_WAS_UP_TO_DATE;
        }
        if self.role == Role::Primary {
            f |= MDF_PRIMARY_IND;
        }
        if self.connected {
            f |= MDF_CONNECTED_IND;
        }
        if self.peer_disk == DiskState::Outdated {
            f |= MDF_PEER_OUT_DATED;
        }
        f
    }

    /// Persists UUIDs and flags. With `gate`, application writes wait for it to be durable
    /// (a new data generation must be on disk before data of that generation).
    fn persist_superblock(&mut self, gate: bool) {
        if !self.has_disk() {
            return;
        }
        self.md_flags = self.compute_flags();
        let id = if gate {
            self.md_gate += 1;
            self.io(IoPurpose::MetaGate)
        } else {
            self.io(IoPurpose::Meta)
        };
        let op = MetaOp::Superblock {
            uuids: self.uuids,
            flags: self.md_flags,
        };
        self.push_meta(id, op);
    }

    /// Writes the bitmap pages changed since the last write.
    fn persist_bitmap(&mut self) {
        if !self.has_disk() {
            return;
        }
        let pages = self.bitmap.take_dirty_pages();
        if pages.is_empty() {
            return;
        }
        let pages = pages
            .into_iter()
            .filter_map(|p| self.bitmap.page_bytes(p).map(|b| (p, b)))
            .collect();
        let id = self.io(IoPurpose::Meta);
        self.push_meta(id, MetaOp::BitmapPages { pages });
    }

    /// Hands a metadata write to the runtime, or queues it while another is in flight.
    /// Metadata writes go out one at a time: the runtime may complete concurrent writes in
    /// any order, and an older superblock (or bitmap page) landing after a newer one would
    /// leave stale metadata on disk (found by tests/sim.rs: the superblock `Device::new`
    /// writes landed after the promotion's, so a crash forgot the new data generation).
    fn push_meta(&mut self, io: IoId, op: MetaOp) {
        if self.meta_busy {
            self.meta_queue.push_back((io, op));
        } else {
            self.meta_busy = true;
            self.actions.push_back(Action::Meta { io, op });
        }
    }

    /// The metadata write in flight completed: the next one goes out.
    fn next_meta(&mut self) {
        match self.meta_queue.pop_front() {
            Some((io, op)) => self.actions.push_back(Action::Meta { io, op }),
            None => self.meta_busy = false,
        }
    }

    fn mark_out_of_sync(&mut self, sector: u64, sectors: u64) {
        let end = (sector + sectors).min(self.sectors);
        if sector < end {
            // The range was validated against the device size.
            let _ = self.bitmap.set_sectors(sector, end - sector);
        }
    }

    /// Clears the bits of blocks wholly inside the range (a partial block stays dirty).
    fn mark_in_sync(&mut self, sector: u64, sectors: u64) {
        let end = (sector + sectors).min(self.sectors);
        let first = sector.div_ceil(SECTORS_PER_BIT);
        // The device's last block may be partial: the range reaching the device end covers it.
        let last = if end == self.sectors {
            self.sectors.div_ceil(SECTORS_PER_BIT)
        } else {
            end / SECTORS_PER_BIT
        };
        if first < last {
            self.bitmap.clear_bits(first..last);
        }
    }

    // --------------------------------------------------------------------------------------
    // Application requests
    // --------------------------------------------------------------------------------------

    /// Submits an application request; its completion comes as [`Action::Complete`].
    pub fn submit(&mut self, now: Duration, id: ReqId, sector: u64, op: AppOp) {
        self.now = now;
        let fail = |dev: &mut Device, e: IoError| {
            dev.actions
                .push_back(Action::Complete { id, result: Err(e) })
        };
        let len = match &op {
            AppOp::Read { len } | AppOp::Discard { len } | AppOp::Zeroes { len } => *len,
            AppOp::Write { data, .. } => match u32::try_from(data.len()) {
                Ok(l) => l,
                Err(_) => return fail(self, IoError::Invalid),
            },
            AppOp::Flush => 0,
        };
        let sectors = sectors_of(len);
        let valid = len % 512 == 0
            && len <= MAX_REQUEST_BYTES
            && (len > 0 || matches!(op, AppOp::Flush))
            && sector
                .checked_add(sectors)
                .is_some_and(|e| e <= self.sectors);
        if !valid || self.reqs.contains_key(&id) || self.reqs.len() >= MAX_APP_REQUESTS {
            return fail(self, IoError::Invalid);
        }
        let kind = match op {
            AppOp::Read { .. } => ReqKind::Read,
            AppOp::Write { data, fua } => ReqKind::Write { data, fua },
            AppOp::Flush => ReqKind::Flush,
            AppOp::Discard { .. } => ReqKind::Discard,
            AppOp::Zeroes { .. } => ReqKind::Zeroes,
        };
        if kind.is_write() && self.role != Role::Primary {
            return fail(self, IoError::ReadOnly);
        }
        self.reqs.insert(
            id,
            Request {
                sector,
                sectors,
                kind,
                al_io: None,
                al_held: false,
                local_pending: false,
                local_ok: false,
                net_pending: false,
                net_ok: false,
                tl_refs: 0,
                epoch_nr: 0,
                active: false,
                issued: false,
                postponed: false,
                postponed_at: Duration::ZERO,
                completed: false,
                data: None,
                flush_barrier: None,
            },
        );
        if self.may_start(id) {
            self.start(id);
        } else {
            self.waiting.push_back(id);
        }
    }

    /// Whether a request may start now (else it waits in `waiting`).
    fn may_start(&self, id: ReqId) -> bool {
        if self.frozen || self.user_suspended {
            return false;
        }
        let r = &self.reqs[&id];
        if !r.kind.is_write() {
            return true;
        }
        if self.md_gate > 0 || self.transitional() {
            return false;
        }
        // A write waits for resync reads of its blocks in flight.
        let range = (r.sector, r.sectors);
        if self
            .peer_reads_in_flight
            .values()
            .any(|&(s, n)| overlaps(range, (s, n)))
        {
            return false;
        }
        // ... and for every unfinished write to its blocks, local or from the peer (8.4's
        // `complete_conflicting_writes`): the disk may reorder overlapping writes in flight,
        // and both replicas must end with the same one.
        let local = self.overlapping_active(range).any(|other| other != id);
        let peer = self
            .peer_writes_in_flight
            .values()
            .any(|&other| overlaps(range, other))
            || self
                .peer_waiting
                .iter()
                .any(|w| overlaps(range, (w.sector, w.sectors)));
        !local && !peer
    }

    /// The active writes overlapping `range`.
    fn overlapping_active(&self, range: (u64, u64)) -> impl Iterator<Item = ReqId> + '_ {
        let max = u64::from(MAX_REQUEST_BYTES) / 512;
        let from = range.0.saturating_sub(max - 1);
        self.active_writes
            .range((from, 0)..(range.0 + range.1, 0))
            .filter(move |(&(s, _), &n)| overlaps(range, (s, n)))
            .map(|(&(_, id), _)| id)
    }

    /// A write starts: it takes part in conflict detection until it completes.
    fn activate(&mut self, id: ReqId) {
        let r = self.reqs.get_mut(&id).expect("exists");
        if !r.active {
            r.active = true;
            self.active_writes.insert((r.sector, id), r.sectors);
        }
    }

    fn deactivate(&mut self, id: ReqId) {
        if let Some(r) = self.reqs.get_mut(&id) {
            if r.active {
                r.active = false;
                self.active_writes.remove(&(r.sector, id));
            }
        }
    }

    fn retry_waiting(&mut self) {
        // Starting a request can complete others, which retries again: the nested call only
        // asks the outer one for another round.
        if self.retrying {
            self.retry_again = true;
            return;
        }
        self.retrying = true;
        loop {
            self.retry_again = false;
            self.retry_waiting_once();
            if !self.retry_again {
                break;
            }
        }
        self.retrying = false;
    }

    fn retry_waiting_once(&mut self) {
        // Work on a copy: `start` puts a write the activity log cannot admit yet back into
        // `waiting`, and popping it from there again looped forever (found by tests/sim.rs).
        let mut queue = std::mem::take(&mut self.waiting);
        let mut still = VecDeque::new();
        while let Some(id) = queue.pop_front() {
            if !self.reqs.contains_key(&id) {
                continue;
            }
            // Keep order among writes: once one waits, the ones behind it wait too.
            if still.is_empty() && self.may_start(id) {
                self.start(id);
                still.append(&mut self.waiting);
            } else {
                still.push_back(id);
            }
        }
        still.append(&mut self.waiting);
        self.waiting = still;
    }

    fn start(&mut self, id: ReqId) {
        let (kind_is_write, is_read, is_flush) = {
            let r = &self.reqs[&id];
            (
                r.kind.is_write(),
                matches!(r.kind, ReqKind::Read),
                matches!(r.kind, ReqKind::Flush),
            )
        };
        if is_read {
            return self.start_read(id);
        }
        if is_flush {
            return self.start_flush(id);
        }
        debug_assert!(kind_is_write);
        if !self.has_disk() && !self.replicating() {
            return self.finish_early(id, IoError::NoData);
        }
        self.activate(id);
        if self.has_disk() {
            let (sector, sectors) = (self.reqs[&id].sector, self.reqs[&id].sectors);
            let al = self
                .al
                .as_mut()
                .expect("an attached disk has an activity log");
            match al.begin_io(sector, sectors) {
                Ok(AlDecision::Proceed) => {
                    self.reqs.get_mut(&id).expect("exists").al_held = true;
                }
                Ok(AlDecision::Transaction(w)) => {
                    let r = self.reqs.get_mut(&id).expect("exists");
                    r.al_held = true;
                    if !w.evicted.is_empty() && self.cfg.disk_flushes {
                        // The writes to evicted extents must be durable before the
                        // transaction that forgets them: after a power loss only active
                        // extents are resynced, and a write still in the volatile cache
                        // would be lost silently (found by tests/sim.rs).
                        // DRBD's AL writes flush the (internal meta data) device; the
                        // runtime writes metadata with FUA only.
                        let io = self.io(IoPurpose::AlFlushFor(id, w));
                        self.reqs.get_mut(&id).expect("exists").al_io = Some(io);
                        self.actions.push_back(Action::Disk {
                            io,
                            op: DiskOp::Flush,
                        });
                    } else {
                        self.write_al_transaction(id, w);
                    }
                    return;
                }
                Err(BeginIoError::Busy) => {
                    // Retried when a write releases its extents.
                    self.waiting.push_front(id);
                    return;
                }
                Err(BeginIoError::BadRequest { .. }) => {
                    return self.finish_early(id, IoError::Invalid);
                }
            }
        }
        self.issue_write(id);
    }

    /// Writes the activity-log transaction a write waits for.
    fn write_al_transaction(&mut self, id: ReqId, w: AlWrite) {
        // Bits of evicted extents must be on disk before the transaction that forgets them:
        // after a crash only active extents are resynced.
        let pages = w
            .bitmap_pages
            .iter()
            .filter(|&&p| self.bitmap.page_is_dirty(p))
            .filter_map(|&p| self.bitmap.page_bytes(p).map(|b| (p, b)))
            .collect::<Vec<_>>();
        for (p, _) in &pages {
            self.bitmap.mark_page_clean(*p);
        }
        let io = self.io(IoPurpose::AlFor(id));
        self.reqs.get_mut(&id).expect("exists").al_io = Some(io);
        self.push_meta(io, MetaOp::AlTransaction { pages, al: w });
    }

    fn finish_early(&mut self, id: ReqId, e: IoError) {
        self.deactivate(id);
        self.reqs.remove(&id);
        self.actions
            .push_back(Action::Complete { id, result: Err(e) });
    }

    /// Closes the current epoch: later writes go into a new one, and the peer is told with
    /// `P_BARRIER` that the epoch is complete.
    fn close_current_epoch(&mut self) {
        self.close_epoch = false;
        if self.epoch_writes == 0 {
            return;
        }
        let nr = self.epoch_nr;
        if let Some(e) = self.tl.back_mut() {
            if e.nr == nr && !e.closed {
                e.closed = true;
                self.actions
                    .push_back(Action::Send(PeerMsg::Barrier { nr }));
            }
        }
        self.epoch_nr = self.epoch_nr.wrapping_add(1).max(1);
        self.epoch_writes = 0;
    }

    fn issue_write(&mut self, id: ReqId) {
        if self.close_epoch {
            self.close_current_epoch();
        }
        let replicate = self.replicating();
        let has_disk = self.has_disk();
        let proto = self.cfg.protocol;
        let r = self.reqs.get_mut(&id).expect("exists");
        r.issued = true;
        let (sector, sectors) = (r.sector, r.sectors);
        let len = (sectors * 512) as u32;
        // Protocol B asks the peer for P_RECV_ACK, C for P_WRITE_ACK (apv >= 100: the sender
        // says which).
        let ack_flag = match proto {
            Protocol::A => 0,
            Protocol::B => dp::SEND_RECEIVE_ACK,
            Protocol::C => dp::SEND_WRITE_ACK,
        };
        let (disk_op, msg) = match &r.kind {
            ReqKind::Write { data, fua } => {
                let flags = if *fua { dp::FUA } else { 0 } | ack_flag;
                (
                    DiskOp::Write {
                        sector,
                        data: data.clone(),
                        fua: *fua,
                    },
                    (data.clone(), flags),
                )
            }
            ReqKind::Discard => (
                DiskOp::Discard { sector, len },
                (Bytes::new(), dp::DISCARD | ack_flag),
            ),
            ReqKind::Zeroes => (
                DiskOp::Zeroes { sector, len },
                (Bytes::new(), dp::ZEROES | ack_flag),
            ),
            _ => unreachable!("issue_write on a non-write"),
        };
        if replicate {
            self.packet_seq = self.packet_seq.wrapping_add(1);
            let seq = self.packet_seq;
            let r = self.reqs.get_mut(&id).expect("exists");
            r.net_pending = proto != Protocol::A;
            r.net_ok = proto == Protocol::A;
            r.tl_refs += 1;
            r.epoch_nr = self.epoch_nr;
            let (data, flags) = msg;
            let m = if matches!(r.kind, ReqKind::Write { .. }) {
                PeerMsg::Data {
                    sector,
                    block_id: id,
                    seq,
                    flags,
                    data,
                }
            } else {
                PeerMsg::Trim {
                    sector,
                    block_id: id,
                    seq,
                    flags,
                    size: len,
                }
            };
            let nr = self.epoch_nr;
            if self.tl.back().map(|e| e.nr) != Some(nr) {
                self.tl.push_back(TlEpoch {
                    nr,
                    reqs: Vec::new(),
                    ranges: Vec::new(),
                    closed: false,
                    superseded: 0,
                    retried: 0,
                });
            }
            let e = self.tl.back_mut().expect("just ensured");
            e.reqs.push(id);
            e.ranges.push((sector, sectors));
            self.epoch_writes += 1;
            self.sent += sectors;
            self.send(m);
            if self.epoch_writes >= self.cfg.max_epoch_size {
                self.close_epoch = true;
            }
        } else {
            // The peer does not get this write: it is out of sync.
            self.mark_out_of_sync(sector, sectors);
            if self.connected && self.conn == ConnState::WfBitMapS {
                // The bitmap already went to the peer: tell it (DRBD's
                // `drbd_should_send_out_of_sync`). A write whose AL transaction completed
                // during the bitmap exchange was otherwise never resynced (found by
                // tests/sim.rs).
                self.send(PeerMsg::OutOfSync { sector, size: len });
            }
        }
        if has_disk {
            self.reqs.get_mut(&id).expect("exists").local_pending = true;
            let io = self.io(IoPurpose::AppLocal(id));
            self.actions.push_back(Action::Disk { io, op: disk_op });
        }
        self.maybe_complete(id);
    }

    fn start_read(&mut self, id: ReqId) {
        let (sector, sectors) = (self.reqs[&id].sector, self.reqs[&id].sectors);
        // A SyncTarget reads locally what is already in sync.
        let first = sector / SECTORS_PER_BIT;
        let last = (sector + sectors).div_ceil(SECTORS_PER_BIT);
        let range_clean = self.bitmap.next_set(first).is_none_or(|b| b >= last);
        let local_good = self.disk == DiskState::UpToDate
            || (self.has_disk() && self.in_sync_state() && range_clean);
        if local_good {
            self.reqs.get_mut(&id).expect("exists").local_pending = true;
            let io = self.io(IoPurpose::AppLocal(id));
            self.actions.push_back(Action::Disk {
                io,
                op: DiskOp::Read {
                    sector,
                    len: (sectors * 512) as u32,
                },
            });
        } else if self.role == Role::Primary
            && self.replicating()
            && self.peer_disk == DiskState::UpToDate
        {
            self.reqs.get_mut(&id).expect("exists").net_pending = true;
            self.send(PeerMsg::DataRequest(BlockReq {
                sector,
                block_id: id,
                size: (sectors * 512) as u32,
            }));
        } else {
            self.finish_early(id, IoError::NoData);
        }
    }

    fn start_flush(&mut self, id: ReqId) {
        // Close the epoch so the peer flushes what it has, and wait for that acknowledgement.
        if self.replicating() {
            self.close_current_epoch();
            let newest_sent = self.tl.iter().rev().find(|e| e.closed).map(|e| e.nr);
            if let Some(nr) = newest_sent {
                let r = self.reqs.get_mut(&id).expect("exists");
                r.flush_barrier = Some(nr);
                r.net_pending = true;
            }
        }
        if self.has_disk() {
            self.reqs.get_mut(&id).expect("exists").local_pending = true;
            let io = self.io(IoPurpose::AppLocal(id));
            self.actions.push_back(Action::Disk {
                io,
                op: DiskOp::Flush,
            });
        } else {
            self.reqs.get_mut(&id).expect("exists").local_ok = true;
        }
        self.maybe_complete(id);
    }

    fn maybe_complete(&mut self, id: ReqId) {
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        if !r.completed && !r.local_pending && !r.net_pending {
            r.completed = true;
            let ok = r.local_ok || r.net_ok;
            let result = if ok {
                Ok(r.data.take())
            } else if matches!(r.kind, ReqKind::Read) {
                Err(IoError::NoData)
            } else {
                Err(IoError::Disk)
            };
            let is_write = r.kind.is_write();
            self.actions.push_back(Action::Complete { id, result });
            if is_write {
                self.deactivate(id);
                // Peer writes and local writes may have waited for this one.
                self.pump_peer_writes();
                if !self.waiting.is_empty() {
                    self.retry_waiting();
                }
                // Later writes may depend on this one: they go into a new epoch.
                self.close_epoch = true;
                self.close_epoch_if_idle();
            }
        }
        self.maybe_destroy(id);
    }

    /// Whether the epochs before epoch `nr` may be released by its barrier ack: with
    /// allow-two-primaries only, `nr` is a closed epoch of the transfer log, and every write
    /// of the epochs before it has its answer (acknowledged, postponed by the peer, or sent
    /// again in a later epoch).
    fn skippable_epochs(&self, nr: u32) -> bool {
        if !self.cfg.two_primaries || !self.tl.iter().any(|e| e.nr == nr && e.closed) {
            return false;
        }
        // A write sent again later (after P_RETRY_WRITE) has its answer for this epoch.
        self.tl
            .iter()
            .take_while(|e| e.nr != nr)
            .flat_map(|e| e.reqs.iter().map(move |id| (e.nr, id)))
            .all(|(enr, id)| {
                self.reqs
                    .get(id)
                    .is_none_or(|r| !r.net_pending || r.postponed || r.epoch_nr != enr)
            })
    }

    /// When no write is still on its way to the peer, no later completion may come to close
    /// the epoch: close it now (DRBD's sender sends the barrier when it runs out of work), or
    /// the peer never acknowledges (and flushes) it and its writes stay in the transfer log
    /// for good (found by tests/sim.rs). A write not sent yet or postponed by the peer
    /// closes the epoch itself when it is sent.
    fn close_epoch_if_idle(&mut self) {
        let on_its_way = self
            .reqs
            .values()
            .any(|r| r.kind.is_write() && r.issued && !r.completed && !r.postponed);
        if self.connected && self.close_epoch && !on_its_way {
            self.close_current_epoch();
        }
    }

    fn maybe_destroy(&mut self, id: ReqId) {
        let Some(r) = self.reqs.get(&id) else {
            return;
        };
        if !(r.completed && r.tl_refs == 0 && r.al_io.is_none()) {
            return;
        }
        let r = self.reqs.remove(&id).expect("exists");
        if r.kind.is_write() && !r.local_ok && self.has_disk() {
            // The local disk does not have this write.
            self.mark_out_of_sync(r.sector, r.sectors);
        }
        if r.al_held {
            if let Some(al) = self.al.as_mut() {
                let _ = al.complete_io(r.sector, r.sectors);
            }
            if !self.waiting.is_empty() {
                self.retry_waiting();
            }
        }
    }

    // --------------------------------------------------------------------------------------
    // Disk completions
    // --------------------------------------------------------------------------------------

    /// A disk or metadata operation finished; `data` holds what a read returned.
    pub fn disk_done(&mut self, now: Duration, io: IoId, result: Result<Option<Bytes>, ()>) {
        self.now = now;
        let Some(purpose) = self.ios.remove(&io) else {
            debug_assert!(false, "completion of unknown io {io}");
            return;
        };
        if matches!(
            purpose,
            IoPurpose::Meta
                | IoPurpose::MetaGate
                | IoPurpose::AlFor(_)
                | IoPurpose::SyncUuid { .. }
        ) {
            self.next_meta();
        }
        if result.is_err() {
            self.local_io_error(&purpose);
        }
        self.dispatch_disk_done(io, purpose, result);
        if self.disk == DiskState::Failed && !self.local_io_in_flight() {
            self.failed_disk_gone();
        }
    }

    /// A local disk operation failed: `on-io-error` decides (8.4 `__drbd_chk_io_error`).
    fn local_io_error(&mut self, purpose: &IoPurpose) {
        if !self.has_disk() {
            return;
        }
        let what = match purpose {
            IoPurpose::AppLocal(id) => match self.reqs.get(id).map(|r| &r.kind) {
                Some(ReqKind::Read) => "READ",
                _ => "WRITE",
            },
            IoPurpose::PeerRead(_) | IoPurpose::CsumRead { .. } | IoPurpose::VerifyRead { .. } => {
                "READ"
            }
            IoPurpose::Meta
            | IoPurpose::MetaGate
            | IoPurpose::AlFor(_)
            | IoPurpose::AlFlushFor(..)
            | IoPurpose::SyncUuid { .. } => "META",
            _ => "WRITE",
        };
        if let IoPurpose::AppLocal(id) = purpose {
            // The local copy of this block is unknown now.
            if let Some(r) = self.reqs.get(id).filter(|r| r.kind.is_write()) {
                let (s, n) = (r.sector, r.sectors);
                self.mark_out_of_sync(s, n);
            }
        }
        match self.cfg.on_io_error {
            OnIoError::PassOn => {
                // The disk stays, but its data is no longer trusted: reads go to the peer
                // and a resync repairs it (8.4 makes it Inconsistent).
                self.log(format!("Local IO failed in {what}. Passing error on..."));
                if self.disk > DiskState::Inconsistent {
                    self.set_disk(DiskState::Inconsistent);
                    self.send_state();
                }
            }
            OnIoError::CallLocalIoError | OnIoError::Detach => {
                if self.cfg.on_io_error == OnIoError::CallLocalIoError {
                    self.handler(Handler::LocalIoError);
                }
                self.log(format!("Local IO failed in {what}. Detaching..."));
                self.set_disk(DiskState::Failed);
            }
        }
    }

    /// The failed disk has no I/O in flight any more: the node is Diskless, served by its
    /// peer (which marks what this disk misses from now on).
    fn failed_disk_gone(&mut self) {
        self.negotiating = None;
        self.go_diskless("the local disk failed during a resync");
        if self.role == Role::Primary && self.peer_disk < DiskState::UpToDate {
            self.handler(Handler::PriOnInconDegr);
        }
    }

    /// The disk is gone (detached or failed): Diskless, and the peer is told; a resync
    /// needs both disks, so one in progress starts over with a fresh handshake.
    fn go_diskless(&mut self, resync_reason: &str) {
        let resyncing = self.in_sync_state() || self.transitional();
        self.set_disk(DiskState::Diskless);
        self.al = None;
        if resyncing {
            self.lose_connection(resync_reason, true);
        } else {
            self.send_state();
        }
    }

    fn dispatch_disk_done(
        &mut self,
        io: IoId,
        purpose: IoPurpose,
        result: Result<Option<Bytes>, ()>,
    ) {
        match purpose {
            IoPurpose::AppLocal(id) => self.app_local_done(id, result),
            IoPurpose::MetaGate => {
                if result.is_err() {
                    self.log("metadata write failed".to_string());
                }
                self.md_gate -= 1;
                if self.md_gate == 0 {
                    self.retry_waiting();
                }
            }
            IoPurpose::AlFor(id) => {
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.al_io = None;
                }
                if result.is_err() {
                    self.log("activity log write failed; writing data anyway".to_string());
                }
                self.issue_write(id);
            }
            IoPurpose::PeerWrite(w) => self.peer_write_done(io, w, result.is_ok()),
            IoPurpose::PeerRead(r) => self.peer_read_done(io, r, result),
            IoPurpose::CsumRead {
                sector,
                len,
                conn_gen,
            } => {
                let current = conn_gen == self.conn_gen
                    && self.connected
                    && self
                        .resync
                        .as_ref()
                        .is_some_and(|rs| rs.in_flight.contains_key(&sector));
                if current {
                    let q = BlockReq {
                        sector,
                        block_id: ID_SYNCER,
                        size: len,
                    };
                    match (result, self.cfg.csums_alg) {
                        (Ok(Some(data)), Some(alg)) => self.send(PeerMsg::CsumRsRequest {
                            sector,
                            block_id: ID_SYNCER,
                            size: len,
                            digest: Bytes::from(alg.digest(&data)),
                        }),
                        // Unreadable here: ask for the data itself.
                        _ => self.send(PeerMsg::RsDataRequest(q)),
                    }
                }
            }
            IoPurpose::VerifyRead {
                sector,
                len,
                block_id,
                peer_digest,
                conn_gen,
            } => {
                if conn_gen == self.conn_gen && self.connected {
                    self.verify_read_done(sector, len, block_id, peer_digest, result);
                }
            }
            IoPurpose::BarrierFlush { epoch, conn_gen } => {
                if conn_gen == self.conn_gen && self.connected {
                    if let Some(e) = self.recv_epochs.iter_mut().find(|e| e.id == epoch) {
                        e.flushing = false;
                        e.flushed = true;
                    }
                    self.finish_recv_epochs();
                }
            }
            IoPurpose::AlFlushFor(id, w) => {
                if result.is_err() {
                    self.log("flush before an activity log transaction failed".to_string());
                }
                self.write_al_transaction(id, w);
            }
            IoPurpose::AttachFlush => {
                if result.is_err() {
                    self.log("flush of the backing device failed".to_string());
                }
                self.attach_flushing = false;
                if let Some((u, conn_gen)) = self.sync_uuid_deferred.take() {
                    self.sync_uuid_persisted(u, conn_gen);
                }
            }
            IoPurpose::SyncUuid { uuid, conn_gen } => {
                if result.is_err() {
                    self.log("metadata write failed".to_string());
                }
                self.sync_uuid_persisted(uuid, conn_gen);
            }
            IoPurpose::ResyncFlush { ranges, conn_gen } => {
                self.rs_flushing = false;
                if conn_gen == self.conn_gen && self.connected {
                    self.resync_writes_done(&ranges, result.is_ok());
                    self.flush_resync_writes();
                }
            }
            IoPurpose::Meta => {
                if result.is_err() {
                    self.log("metadata write failed".to_string());
                }
            }
        }
    }

    fn app_local_done(&mut self, id: ReqId, result: Result<Option<Bytes>, ()>) {
        let remote_read_possible = self.replicating()
            && self.peer_disk == DiskState::UpToDate
            && self.role == Role::Primary;
        let Some(r) = self.reqs.get_mut(&id) else {
            return;
        };
        r.local_pending = false;
        let (sector, sectors) = (r.sector, r.sectors);
        match result {
            Ok(data) => {
                r.local_ok = true;
                if matches!(r.kind, ReqKind::Read) {
                    r.data = data;
                    self.read += sectors;
                } else if r.kind.is_write() {
                    self.written += sectors;
                }
            }
            Err(()) => {
                r.local_ok = false;
                if matches!(r.kind, ReqKind::Read) && remote_read_possible {
                    // Retry the read at the peer.
                    r.net_pending = true;
                    self.send(PeerMsg::DataRequest(BlockReq {
                        sector,
                        block_id: id,
                        size: (sectors * 512) as u32,
                    }));
                }
            }
        }
        self.maybe_complete(id);
        // Resync reads waiting for this write may go now.
        if !self.rs_reads_waiting.is_empty() {
            self.retry_rs_reads();
        }
        // A peer write may wait for this write's local part (allow-two-primaries).
        if !self.peer_waiting.is_empty() {
            self.pump_peer_writes();
        }
        // A write the peer asked to send again goes once its local part is done.
        if self.reqs.get(&id).is_some_and(|r| r.postponed) {
            self.restart_if_ready(vec![id]);
        }
    }

    // --------------------------------------------------------------------------------------
    // Connection
    // --------------------------------------------------------------------------------------

    /// The handshake completed. `sent` is the [`LocalHello`] the runtime sent in it; if the
    /// local state changed since, the handshake is repeated (the connection is dropped with a
    /// retry).
    pub fn connected(&mut self, now: Duration, hello: &PeerHello, sent: &LocalHello) {
        self.now = now;
        self.connected = true;
        self.conn_gen += 1;
        self.standalone_reason = None;
        self.protocol_version = hello.protocol_version;
        self.features = hello.features;
        self.resolve_conflicts = hello.resolve_conflicts;
        self.peer_uuids = Some(hello.uuids);
        self.peer_role = hello.state.role;
        self.peer_disk = hello.state.disk;
        self.peer_user_isp = hello.state.user_isp;
        self.last_state_sent = Some(sent.state);
        self.recv_epochs.clear();
        self.open_recv_epoch();
        // Both sequences start over with each connection (8.4 `drbd_connected`): the
        // resolving peer orders our writes after our acks by them.
        self.packet_seq = 0;
        self.peer_seq = 0;
        self.drop_seq_held();
        // The peer is back: fencing is moot (8.4 ignores the handler's late answer), and a
        // later loss must fence again.
        self.fence_wait = None;
        if self.frozen {
            self.frozen = false;
            self.log("I/O resumed: the peer is connected again".to_string());
        }
        self.conn = ConnState::WfReportParams;
        // Only the data generation and the role matter: the bitmap weight sent in P_UUIDS is
        // informational, and writes during the handshake go into the bitmap that is
        // exchanged next (comparing it dropped handshakes under a steady write load).
        let now_info = self.uuid_info();
        if sent.uuids.uuids != now_info.uuids
            || sent.uuids.flags != now_info.flags
            || sent.state.role != self.role
            || sent.state.disk != self.disk
        {
            self.lose_connection("local state changed during the handshake", true);
            return;
        }
        if hello.current_sectors != 0
            && hello.disk_sectors != 0
            && hello.disk_sectors < self.sectors
        {
            self.lose_connection(
                &format!(
                    "the peer's disk ({} sectors) is smaller than this device ({} sectors)",
                    hello.disk_sectors, self.sectors
                ),
                false,
            );
            return;
        }
        if self.cfg.two_primaries && self.protocol_version < 100 {
            // Concurrent writes of two Primaries are resolved with P_RETRY_WRITE (protocol
            // 100): without it a partly overlapping write would be dropped on one side.
            self.lose_connection(
                &format!(
                    "allow-two-primaries needs protocol version 100, the peer speaks {}",
                    self.protocol_version
                ),
                false,
            );
            return;
        }
        self.log(format!(
            "connected: protocol {} features 0x{:x}",
            self.protocol_version, self.features
        ));
        // The sync handshake comes first, as in DRBD's `receive_state`: two Primaries whose
        // data diverged are a split brain (after-sb-2pri decides), not a role conflict.
        self.sync_handshake(hello.discard_my_data);
        if self.connected
            && self.role == Role::Primary
            && self.peer_role == Role::Primary
            && !self.cfg.two_primaries
        {
            self.lose_connection(
                "both nodes are Primary and allow-two-primaries is not set",
                false,
            );
        }
    }

    /// Runs the UUID comparison and acts on it (after connecting, or when the peer's data
    /// generation changed while connected).
    fn sync_handshake(&mut self, _peer_discard: bool) {
        let Some(peer) = self.peer_uuids else { return };
        let local_data = self.has_disk() || self.negotiating.is_some();
        let peer_data =
            self.peer_disk >= DiskState::Inconsistent || self.peer_disk == DiskState::Negotiating;
        if !local_data || !peer_data {
            // Nothing to compare: a diskless side just follows.
            self.set_conn(ConnState::Connected);
            self.send_state();
            return;
        }
        let input = HandshakeInput {
            local: self.uuid_info(),
            peer,
            context: CompareContext {
                protocol_version: self.protocol_version,
                feature_flags: self.features,
                local_role: self.role,
                peer_role: self.peer_role,
                resolve_conflicts: self.resolve_conflicts,
            },
            local_disk: self.disk,
            pending_disk: self.negotiating,
            peer_disk: self.peer_disk,
            policy: self.cfg.split_brain,
            // `call-pri-lost-after-sb` demotes the losing Primary unless its device is open.
            can_demote: self.openers == 0,
            dry_run: false,
        };
        let d = uuid::decide(&input);
        if let Some(attached) = self.negotiating.take() {
            // The attached disk is in use from here on, in the state its metadata says.
            self.set_disk(attached);
        }
        if let Some(c) = d.comparison.correction.and_then(|c| c.local()) {
            self.uuids = c;
        }
        if let Some(c) = d.comparison.correction.and_then(|c| c.peer()) {
            if let Some(p) = self.peer_uuids.as_mut() {
                p.uuids = c;
            }
        }
        let from = |survivor: uuid::Side| match survivor {
            uuid::Side::Local => "this",
            uuid::Side::Peer => "peer",
        };
        match d.split_brain {
            Some(uuid::SplitBrainResolution::Automatic {
                primaries,
                survivor,
                ..
            }) => self.log(format!(
                "Split-Brain detected, {primaries} primaries, automatically solved. Sync from {} node",
                from(survivor)
            )),
            Some(uuid::SplitBrainResolution::Manual { survivor }) => self.log(format!(
                "Split-Brain detected, manually solved. Sync from {} node",
                from(survivor)
            )),
            Some(uuid::SplitBrainResolution::Unresolved) => {
                self.log("Split-Brain detected".to_string())
            }
            None => {}
        }
        if d.demote {
            // The policy chose this Primary's data to be discarded and nobody has the device
            // open: it gives up its role before becoming SyncTarget.
            self.become_secondary();
            self.log("Successfully gave up primary role.".to_string());
        }
        // initial-split-brain, pri-lost-after-sb, split-brain, pri-lost, in DRBD's order.
        for h in d.handlers.iter().copied() {
            self.handler(h.into());
        }
        match d.outcome {
            HandshakeOutcome::Proceed(plan) => {
                self.discard_my_data = false;
                // A split brain resolved (by policy or by hand): once both bitmaps are
                // merged, say which regions the resync is about to overwrite.
                self.sb_report = d.split_brain.is_some()
                    && matches!(plan, Resync::AsSource { .. } | Resync::AsTarget { .. });
                self.start_plan(plan);
            }
            HandshakeOutcome::Disconnect(reason) => {
                let why = match reason {
                    uuid::DisconnectReason::UnrelatedData => "unrelated data, aborting".to_string(),
                    uuid::DisconnectReason::SplitBrain => {
                        "Split-Brain detected but unresolved, dropping connection".to_string()
                    }
                    uuid::DisconnectReason::InconsistentSyncSource => {
                        "I shall become SyncSource, but I am inconsistent".to_string()
                    }
                    uuid::DisconnectReason::RrConflict => {
                        "I shall become SyncTarget, but I am primary".to_string()
                    }
                    uuid::DisconnectReason::NeedsProtocol { version, .. } => {
                        format!("the situation needs protocol version {version}")
                    }
                };
                self.lose_connection(&why, false);
            }
            HandshakeOutcome::DryRun(_) => self.lose_connection("dry run", false),
        }
    }

    fn start_plan(&mut self, plan: Resync) {
        match plan {
            Resync::None => {
                // Same data generation: consistent disks are UpToDate together.
                if self.disk >= DiskState::Outdated && self.peer_disk >= DiskState::Outdated {
                    self.set_disk(DiskState::UpToDate);
                    self.set_peer_disk(DiskState::UpToDate);
                }
                self.set_conn(ConnState::Connected);
                self.persist_superblock(false);
                self.send_state();
                self.retry_waiting();
            }
            Resync::AsSource { full } => {
                if full {
                    let bits = self.bitmap.bits();
                    self.bitmap.set_bits(0..bits);
                }
                self.set_conn(ConnState::WfBitMapS);
                self.send_state();
                let words = self.bitmap.words().to_vec();
                self.send(PeerMsg::Bitmap(words));
            }
            Resync::AsTarget { full } => {
                if full {
                    let bits = self.bitmap.bits();
                    self.bitmap.set_bits(0..bits);
                }
                self.set_conn(ConnState::WfBitMapT);
                self.send_state();
            }
        }
    }

    /// The connection ended (socket closed, timeout, protocol error, disconnect).
    pub fn connection_lost(&mut self, now: Duration, reason: &str) {
        self.now = now;
        if !self.connected {
            return;
        }
        self.log(format!("connection lost: {reason}"));
        self.teardown();
        if self.conn != ConnState::StandAlone {
            self.set_conn(ConnState::Unconnected);
        }
    }

    /// A running resync is paused while either side's sync-pause flag is set (8.4
    /// `sanitize_state`: SyncSource <-> PausedSyncS, SyncTarget <-> PausedSyncT).
    fn apply_pause(&mut self) {
        if self.resync.is_none() {
            return;
        }
        let paused = self.user_isp || self.peer_user_isp;
        let c = match (self.conn, paused) {
            (ConnState::SyncSource, true) => ConnState::PausedSyncS,
            (ConnState::SyncTarget, true) => ConnState::PausedSyncT,
            (ConnState::PausedSyncS, false) => ConnState::SyncSource,
            (ConnState::PausedSyncT, false) => ConnState::SyncTarget,
            _ => return,
        };
        self.set_conn(c);
    }

    /// Primary -> Secondary (the caller tells the peer).
    fn become_secondary(&mut self) {
        debug_assert_eq!(self.role, Role::Primary);
        self.role = Role::Secondary;
        self.log("role( Primary -> Secondary )".to_string());
        self.uuids.demote();
        self.persist_superblock(false);
    }

    /// Drops the connection from our side.
    fn lose_connection(&mut self, reason: &str, retry: bool) {
        self.actions.push_back(Action::Disconnect {
            reason: reason.to_string(),
            retry,
        });
        self.log(format!("dropping connection: {reason}"));
        self.teardown();
        if retry {
            self.set_conn(ConnState::Unconnected);
        } else {
            self.standalone_reason = Some(reason.to_string());
            self.set_conn(ConnState::StandAlone);
        }
    }

    fn teardown(&mut self) {
        self.connected = false;
        self.resync_handler = None;
        // A Primary that loses a peer that may hold good data fences it (8.4
        // `conn_try_outdate_peer`): the fence-peer handler outdates or shoots it.
        let peer_may_be_good = self.peer_disk >= DiskState::DUnknown;
        if self.cfg.fencing != Fencing::DontCare
            && self.role == Role::Primary
            && peer_may_be_good
            && self.disk >= DiskState::Consistent
            && self.fence_wait.is_none()
        {
            self.fence_wait = Some(self.next_wait_token());
            if self.cfg.fencing == Fencing::ResourceAndStonith {
                self.frozen = true;
                self.log("I/O suspended until the fence-peer handler answers".to_string());
            }
            self.handler(Handler::FencePeer);
        }
        if self.negotiating.take().is_some() {
            // The attached disk was never compared with the peer's: its data may be stale,
            // and using it now could serve stale reads. Back to Diskless; attach again.
            self.log("attach abandoned: connection lost before the attached disk was compared with the peer's".to_string());
            self.set_disk(DiskState::Diskless);
            self.al = None;
        }
        let was_sync_target = matches!(
            self.conn,
            ConnState::SyncTarget | ConnState::PausedSyncT | ConnState::WfSyncUuid
        );
        // Every write not yet acknowledged by a barrier may be missing on the peer.
        let tl = std::mem::take(&mut self.tl);
        for e in tl {
            for (s, n) in e.ranges {
                self.mark_out_of_sync(s, n);
            }
            for id in e.reqs {
                if let Some(r) = self.reqs.get_mut(&id) {
                    r.tl_refs = r.tl_refs.saturating_sub(1);
                    r.postponed = false;
                    if r.net_pending {
                        r.net_pending = false;
                    }
                }
                self.maybe_complete(id);
            }
        }
        // Requests still waiting for the peer (reads, flushes).
        let mut ids: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.net_pending)
            .map(|(id, _)| *id)
            .collect();
        // In id order, not the hash map's random order: runs must replay exactly.
        ids.sort_unstable();
        for id in ids {
            let r = self.reqs.get_mut(&id).expect("exists");
            r.net_pending = false;
            if matches!(r.kind, ReqKind::Flush) {
                r.net_ok = false;
            }
            self.maybe_complete(id);
        }
        self.epoch_writes = 0;
        self.epoch_nr = self.epoch_nr.wrapping_add(1).max(1);
        self.close_epoch = false;
        self.recv_epochs.clear();
        self.rs_reads_waiting.clear();
        if let Some(v) = self.verify.take() {
            self.log(format!(
                "online verify aborted after {} blocks ({} out of sync)",
                v.done, v.found
            ));
        }
        self.state_request = None;
        // Peer writes not yet applied were not acknowledged: the peer marks them out of
        // sync. Those waiting for a conflict decision would wait for good.
        let dropped: u64 = self.peer_waiting.iter().map(|w| w.pages()).sum();
        self.peer_pages -= dropped;
        self.peer_waiting.clear();
        self.drop_seq_held();
        self.answered_open.clear();
        // Unflushed resync writes were not acknowledged: their bits stay set.
        self.rs_unflushed.clear();
        self.resync = None;
        self.peer_role = Role::Unknown;
        let lost_peer_data = self.peer_disk >= DiskState::Inconsistent;
        self.set_peer_disk(DiskState::DUnknown);
        self.last_state_sent = None;
        if was_sync_target && self.disk == DiskState::Inconsistent {
            // Stays Inconsistent; the bitmap tells what is missing.
        }
        if lost_peer_data {
            let random = self.random();
            // The roles after the change: the peer's is Unknown now. Passing its role from
            // before made a Secondary that lost its Primary draw a new current UUID too, so
            // that the next handshake saw a split brain (found by tests/sim.rs).
            let a =
                self.uuids
                    .on_peer_data_lost(random, self.role, Role::Unknown, self.disk, false);
            if a == uuid::PeerLossAction::NewCurrentUuid {
                self.log(format!("new current UUID {:016X}", self.uuids.current));
            }
        }
        self.persist_bitmap();
        self.persist_superblock(false);
        if self.role == Role::Primary && self.disk < DiskState::UpToDate {
            // A Primary without good data and without its peer's.
            self.handler(Handler::PriOnInconDegr);
        }
        self.retry_waiting();
    }

    // --------------------------------------------------------------------------------------
    // Messages from the peer
    // --------------------------------------------------------------------------------------

    /// A message from the peer arrived. An error means the peer violated the protocol: the
    /// device already dropped the connection (an [`Action::Disconnect`] is queued).
    pub fn received(&mut self, now: Duration, msg: PeerMsg) -> Result<(), ProtocolError> {
        self.now = now;
        if !self.connected {
            return Ok(());
        }
        let r = self.receive_in_order(msg);
        if let Err(e) = &r {
            self.lose_connection(&e.to_string(), true);
        }
        r
    }

    /// allow-two-primaries, resolving node: a write from the peer is processed only after
    /// everything the peer sent before it, acks on the meta socket included (8.4's
    /// `wait_for_and_update_peer_seq`), so that a write the peer issued after acknowledging
    /// ours is not taken for a concurrent one. Data-socket messages behind a held write wait
    /// with it.
    fn receive_in_order(&mut self, msg: PeerMsg) -> Result<(), ProtocolError> {
        let ordered = self.cfg.two_primaries && self.resolve_conflicts;
        if ordered
            && msg.socket() == Socket::Data
            && (!self.seq_held.is_empty() || self.seq_ahead(&msg))
        {
            if self.seq_held.len() >= self.seq_held_limit() {
                return Err(ProtocolError(format!(
                    "{} data packets wait for the peer's sequence number {} (have {})",
                    self.seq_held.len(),
                    self.seq_held.front().map_or(0, |m| seq_of(m).unwrap_or(0)),
                    self.peer_seq
                )));
            }
            if self.seq_held.is_empty() {
                self.seq_held_since = self.now;
            }
            self.peer_pages += msg.held_pages();
            self.seq_held.push_back(msg);
            return Ok(());
        }
        self.handle(msg)?;
        while let Some(front) = self.seq_held.front() {
            if self.seq_ahead(front) {
                break;
            }
            let m = self.seq_held.pop_front().expect("checked");
            self.peer_pages -= m.held_pages();
            self.seq_held_since = self.now;
            self.handle(m)?;
            if !self.connected {
                break;
            }
        }
        Ok(())
    }

    fn drop_seq_held(&mut self) {
        let pages: u64 = self.seq_held.iter().map(PeerMsg::held_pages).sum();
        self.peer_pages -= pages;
        self.seq_held.clear();
    }

    /// A write whose predecessor in the peer's sequence has not been seen yet.
    fn seq_ahead(&self, msg: &PeerMsg) -> bool {
        match msg {
            PeerMsg::Data { seq, .. } | PeerMsg::Trim { seq, .. } => {
                seq_greater(seq.wrapping_sub(1), self.peer_seq)
            }
            _ => false,
        }
    }

    /// Notes a sequence number from the peer (resolving node, allow-two-primaries).
    fn note_peer_seq(&mut self, seq: u32) {
        if self.cfg.two_primaries && self.resolve_conflicts && seq_greater(seq, self.peer_seq) {
            self.peer_seq = seq;
        }
    }

    /// SyncTarget: the source answered the resync request at `sector` (`what`); it leaves the
    /// requests in flight and counts for the controller. Returns its sectors.
    fn resync_answered(&mut self, sector: u64, what: &str) -> Result<u64, ProtocolError> {
        let known = self
            .resync
            .as_mut()
            .and_then(|r| r.in_flight.remove(&sector).map(|n| (r, n)));
        let Some((rs, n)) = known else {
            return Err(ProtocolError(format!(
                "{what} for sector {sector} that was not requested"
            )));
        };
        rs.in_flight_sectors -= n;
        rs.sect_in += n;
        rs.last_step_sectors += n;
        Ok(n)
    }

    fn check_range(&self, sector: u64, size: u32, what: &str) -> Result<(), ProtocolError> {
        let ok = size.is_multiple_of(512)
            && size <= MAX_REQUEST_BYTES
            && sector
                .checked_add(sectors_of(size))
                .is_some_and(|e| e <= self.sectors);
        if ok {
            Ok(())
        } else {
            Err(ProtocolError(format!(
                "{what}: sector {sector} size {size} outside the device of {} sectors",
                self.sectors
            )))
        }
    }

    fn handle(&mut self, msg: PeerMsg) -> Result<(), ProtocolError> {
        if msg.socket() == Socket::Meta {
            if let Some(seq) = seq_of(&msg) {
                self.note_peer_seq(seq);
            }
        }
        match msg {
            PeerMsg::Data {
                sector,
                block_id,
                seq,
                flags,
                data,
            } => {
                let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
                if data.is_empty() && flags & dp::FLUSH != 0 {
                    // An empty flush: the next barrier ack covers it.
                    return Ok(());
                }
                self.check_range(sector, size, "P_DATA")?;
                if self.answered_open.len() > ANSWERED_OPEN_LIMIT {
                    // Each of them holds back the acknowledgement of its epoch.
                    return Err(ProtocolError(format!(
                        "{} writes answered with P_SUPERSEDED / P_RETRY_WRITE are still open",
                        self.answered_open.len()
                    )));
                }
                let fua = flags & dp::FUA != 0;
                self.receive_write(
                    sector,
                    size,
                    block_id,
                    seq,
                    flags,
                    DiskOp::Write { sector, data, fua },
                    false,
                );
                Ok(())
            }
            PeerMsg::Trim {
                sector,
                block_id,
                seq,
                flags,
                size,
            } => {
                self.check_range(sector, size, "P_TRIM")?;
                let op = if flags & dp::ZEROES != 0 {
                    DiskOp::Zeroes { sector, len: size }
                } else {
                    DiskOp::Discard { sector, len: size }
                };
                self.receive_write(sector, size, block_id, seq, flags, op, false);
                Ok(())
            }
            PeerMsg::Barrier { nr } => {
                let e = self
                    .recv_epochs
                    .back_mut()
                    .ok_or_else(|| ProtocolError("barrier without epoch".into()))?;
                e.barrier = Some(nr);
                self.open_recv_epoch();
                self.finish_recv_epochs();
                Ok(())
            }
            PeerMsg::BarrierAck { nr, set_size } => self.barrier_acked(nr, set_size),
            PeerMsg::RecvAck(a) | PeerMsg::WriteAck(a) => self.write_acked(a, true),
            PeerMsg::RsWriteAck(a) => {
                if a.block_id == ID_SYNCER {
                    self.check_range(a.sector, a.size, "P_RS_WRITE_ACK")?;
                    self.mark_in_sync(a.sector, sectors_of(a.size));
                    self.note_resync_progress();
                    self.maybe_finish_source();
                    Ok(())
                } else {
                    self.write_acked(a, true)
                }
            }
            PeerMsg::NegAck(a) => {
                if a.block_id == ID_SYNCER {
                    return Ok(());
                }
                self.write_acked(a, false)
            }
            PeerMsg::Superseded(a) => {
                // The peer's concurrent write covers ours and reaches our disk after it: done.
                self.note_conflict_answer(a.block_id, false);
                self.write_acked(a, true)
            }
            PeerMsg::RetryWrite(a) => {
                let r = self
                    .reqs
                    .get_mut(&a.block_id)
                    .filter(|r| r.kind.is_write() && r.net_pending && r.sector == a.sector)
                    .ok_or_else(|| {
                        ProtocolError(format!(
                            "P_RETRY_WRITE for unknown request {:#x}",
                            a.block_id
                        ))
                    })?;
                if !self.cfg.two_primaries {
                    return Err(ProtocolError(
                        "P_RETRY_WRITE without allow-two-primaries".into(),
                    ));
                }
                r.postponed = true;
                r.postponed_at = self.now;
                self.note_conflict_answer(a.block_id, true);
                self.log(format!(
                    "write {}s+{} postponed: the peer applies its concurrent write first",
                    a.sector, a.size
                ));
                // The epoch it was sent in must reach the peer's barrier ack, which sends it
                // again at the latest.
                self.close_epoch = true;
                self.close_epoch_if_idle();
                self.pump_peer_writes();
                Ok(())
            }
            PeerMsg::DataRequest(q) => {
                self.check_range(q.sector, q.size, "P_DATA_REQUEST")?;
                self.peer_read(q, false, None);
                Ok(())
            }
            PeerMsg::RsDataRequest(q) => {
                self.check_range(q.sector, q.size, "P_RS_DATA_REQUEST")?;
                if !self.in_sync_state() && self.conn != ConnState::Connected {
                    return Err(ProtocolError(format!(
                        "P_RS_DATA_REQUEST in state {}",
                        self.conn
                    )));
                }
                self.peer_read(q, true, None);
                Ok(())
            }
            PeerMsg::CsumRsRequest {
                sector,
                block_id,
                size,
                digest,
            } => {
                self.check_range(sector, size, "P_CSUM_RS_REQUEST")?;
                if !self.in_sync_state() && self.conn != ConnState::Connected {
                    return Err(ProtocolError(format!(
                        "P_CSUM_RS_REQUEST in state {}",
                        self.conn
                    )));
                }
                let q = BlockReq {
                    sector,
                    block_id,
                    size,
                };
                self.peer_read(q, true, Some(digest));
                Ok(())
            }
            PeerMsg::RsIsInSync(a) => {
                self.check_range(a.sector, a.size, "P_RS_IS_IN_SYNC")?;
                let n = self.resync_answered(a.sector, "P_RS_IS_IN_SYNC")?;
                if let Some(rs) = self.resync.as_mut() {
                    rs.same_csum += n;
                }
                self.mark_in_sync(a.sector, n);
                self.note_resync_progress();
                self.maybe_finish_target();
                self.refill_resync();
                Ok(())
            }
            PeerMsg::DataReply {
                sector,
                block_id,
                data,
            } => {
                let r = self
                    .reqs
                    .get_mut(&block_id)
                    .filter(|r| matches!(r.kind, ReqKind::Read) && r.net_pending)
                    .ok_or_else(|| {
                        ProtocolError(format!("P_DATA_REPLY for unknown request {block_id:#x}"))
                    })?;
                if r.sector != sector || r.sectors * 512 != data.len() as u64 {
                    return Err(ProtocolError(
                        "P_DATA_REPLY does not match its request".into(),
                    ));
                }
                r.net_pending = false;
                r.net_ok = true;
                r.data = Some(data);
                self.maybe_complete(block_id);
                Ok(())
            }
            PeerMsg::NegDReply(a) => {
                if let Some(r) = self.reqs.get_mut(&a.block_id) {
                    r.net_pending = false;
                    r.net_ok = false;
                }
                self.maybe_complete(a.block_id);
                Ok(())
            }
            PeerMsg::RsDataReply {
                sector,
                block_id: _,
                data,
            } => {
                let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
                self.check_range(sector, size, "P_RS_DATA_REPLY")?;
                let n = self.resync_answered(sector, "P_RS_DATA_REPLY")?;
                self.received += n;
                self.receive_write(
                    sector,
                    size,
                    ID_SYNCER,
                    0,
                    0,
                    DiskOp::Write {
                        sector,
                        data,
                        fua: false,
                    },
                    true,
                );
                self.refill_resync();
                Ok(())
            }
            PeerMsg::NegRsDReply(a) => {
                if let Some(rs) = self.resync.as_mut() {
                    if let Some(n) = rs.in_flight.remove(&a.sector) {
                        rs.in_flight_sectors -= n;
                        rs.failed += n.div_ceil(SECTORS_PER_BIT);
                    }
                }
                self.maybe_finish_target();
                Ok(())
            }
            PeerMsg::OutOfSync { sector, size } => {
                self.check_range(sector, size, "P_OUT_OF_SYNC")?;
                self.mark_out_of_sync(sector, sectors_of(size));
                Ok(())
            }
            PeerMsg::Uuids(info) => {
                self.peer_uuids = Some(info);
                let link = LinkState::Connected {
                    protocol_version: self.protocol_version,
                };
                let role = self.role;
                if self.uuids.accept_skip_initial_sync(&info, role, link) {
                    self.log("skipping the initial sync: adopting the peer's UUID".to_string());
                    let bits = self.bitmap.bits();
                    self.bitmap.clear_bits(0..bits);
                    self.set_disk(DiskState::UpToDate);
                    self.set_peer_disk(DiskState::UpToDate);
                    self.persist_bitmap();
                    self.persist_superblock(false);
                    self.send_state();
                }
                Ok(())
            }
            PeerMsg::SyncUuid(u) => {
                if self.conn != ConnState::WfSyncUuid {
                    return Err(ProtocolError(format!("P_SYNC_UUID in state {}", self.conn)));
                }
                let role = self.role;
                self.uuids.adopt_sync_uuid(u, role);
                if self.cfg.before_resync_target {
                    self.persist_superblock(false);
                    self.resync_handler = Some(ResyncHandlerWait {
                        handler: Handler::BeforeResyncTarget,
                        token: self.next_wait_token(),
                        conn_gen: self.conn_gen,
                        sync_uuid: u,
                    });
                    self.handler(Handler::BeforeResyncTarget);
                    return Ok(());
                }
                self.handler(Handler::BeforeResyncTarget);
                self.start_sync_target();
                Ok(())
            }
            PeerMsg::State(s) => self.peer_state(s),
            PeerMsg::StateChgReq {
                mask,
                val,
                connection,
            } => {
                let retcode = self.state_change_requested(mask, val, connection);
                self.send(PeerMsg::StateChgReply {
                    retcode,
                    connection,
                });
                Ok(())
            }
            // This node changes its own state with plain P_STATE and asks only to start an
            // online verify.
            PeerMsg::StateChgReply {
                retcode,
                connection,
            } => {
                let Some(req) = self.state_request.take().filter(|_| !connection) else {
                    return Ok(());
                };
                if retcode >= 1 && self.conn == ConnState::Connected {
                    match req {
                        StateRequest::Verify => self.begin_verify(true),
                        StateRequest::FullSyncAsTarget => self.begin_full_sync(true),
                        StateRequest::FullSyncAsSource => self.begin_full_sync(false),
                    }
                } else {
                    self.log(format!(
                        "{} refused by the peer ({retcode}): {}",
                        req.what(),
                        StateRefusal::from_code(retcode).map_or("", |r| r.text())
                    ));
                }
                Ok(())
            }
            PeerMsg::OvRequest(q) => {
                self.check_range(q.sector, q.size, "P_OV_REQUEST")?;
                self.verify_request(q);
                Ok(())
            }
            PeerMsg::OvReply {
                sector,
                block_id,
                size,
                digest,
            } => {
                self.check_range(sector, size, "P_OV_REPLY")?;
                self.verify_reply(sector, block_id, size, digest)
            }
            PeerMsg::OvResult(a) => {
                self.check_range(a.sector, a.size, "P_OV_RESULT")?;
                self.verify_result(a)
            }
            PeerMsg::SyncParam(p) => self.peer_sync_settings(p),
            PeerMsg::ProtocolUpdate(p) => self.peer_protocol_update(p),
            // The transport answers the peer's pings itself; a device answers those that
            // reach it (the simulation delivers them).
            PeerMsg::Ping => {
                self.send(PeerMsg::PingAck);
                Ok(())
            }
            PeerMsg::PingAck => {
                if let Some(rs) = self.resync.as_mut() {
                    if rs.final_ping == Some(false) {
                        rs.final_ping = Some(true);
                    }
                }
                self.maybe_finish_target();
                Ok(())
            }
            PeerMsg::Bitmap(words) => self.bitmap_received(&words),
        }
    }

    fn peer_state(&mut self, s: PeerState) -> Result<(), ProtocolError> {
        let old_role = self.peer_role;
        self.peer_role = s.role;
        if self.peer_role != old_role {
            self.log(format!("peer( {} -> {} )", old_role, self.peer_role));
        }
        if self.peer_user_isp != s.user_isp {
            self.peer_user_isp = s.user_isp;
            self.apply_pause();
        }
        if self.role == Role::Primary && s.role == Role::Primary && !self.cfg.two_primaries {
            return Err(ProtocolError(
                "the peer became Primary and allow-two-primaries is not set".into(),
            ));
        }
        match self.conn {
            ConnState::Connected => {
                if matches!(s.conn, ConnState::WfBitMapT | ConnState::StartingSyncT) {
                    // The peer invalidated itself: we become the source.
                    self.set_peer_disk(DiskState::Inconsistent);
                    self.start_plan(Resync::AsSource { full: false });
                    return Ok(());
                }
                if matches!(s.conn, ConnState::WfBitMapS | ConnState::StartingSyncS) {
                    // The peer invalidated us.
                    self.set_conn(ConnState::WfBitMapT);
                    return Ok(());
                }
                // The peer was forced UpToDate and Primary while both were Inconsistent
                // (8.4's CONSIDER_RESYNC): compare generations again, which starts the full
                // sync from it.
                let consider_resync = self.disk == DiskState::Inconsistent
                    && self.peer_disk == DiskState::Inconsistent
                    && old_role == Role::Secondary
                    && s.role == Role::Primary
                    && s.disk == DiskState::UpToDate;
                if consider_resync {
                    self.set_peer_disk(s.disk);
                    self.sync_handshake(false);
                    return Ok(());
                }
                let lost =
                    self.peer_disk >= DiskState::Inconsistent && s.disk < DiskState::Inconsistent;
                let peer_attached =
                    s.disk == DiskState::Negotiating && self.peer_disk != DiskState::Negotiating;
                self.set_peer_disk(s.disk);
                if peer_attached {
                    // The peer attached a disk: compare its data with ours (its P_UUIDS came
                    // just before this state). The attaching node dropped what it knew of our
                    // UUIDs and compares only once it has them again: as 8.4 does on "attach
                    // on the peer", our P_UUIDS go out before the P_STATE (and bitmap) of the
                    // decision, or the peer would take its disk into use without a resync.
                    let info = self.uuid_info();
                    self.send(PeerMsg::Uuids(info));
                    self.sync_handshake(false);
                    return Ok(());
                }
                if lost {
                    // The peer detached while connected: its copy no longer follows. As on a
                    // connection loss, a node with the data (while someone is Primary) starts
                    // a new data generation, so that the peer's re-attach resyncs from the
                    // bitmap instead of finding equal UUIDs.
                    self.peer_data_lost_while_connected();
                }
                self.send_state();
            }
            ConnState::SyncSource | ConnState::PausedSyncS => {
                if s.conn == ConnState::Connected {
                    // The target finished (or gave up).
                    self.set_peer_disk(s.disk);
                    self.finish_source(s.disk == DiskState::UpToDate);
                }
            }
            ConnState::SyncTarget | ConnState::PausedSyncT => {}
            ConnState::VerifyT => {
                if s.conn == ConnState::Connected {
                    // The verify source is done (or stopped).
                    self.finish_verify();
                }
            }
            ConnState::VerifyS => {}
            _ => {
                if s.disk != DiskState::Negotiating && !self.transitional() {
                    self.set_peer_disk(s.disk);
                }
            }
        }
        Ok(())
    }

    fn bitmap_received(&mut self, words: &[u64]) -> Result<(), ProtocolError> {
        let merged = self
            .bitmap
            .merge_words(words)
            .map_err(|e| ProtocolError(format!("bitmap: {e}")))?;
        if std::mem::take(&mut self.sb_report) {
            self.report_diverged_regions();
        }
        match self.conn {
            ConnState::WfBitMapT => {
                self.log(format!("received bitmap: {merged} new bits"));
                let mine = self.bitmap.words().to_vec();
                self.send(PeerMsg::Bitmap(mine));
                self.set_conn(ConnState::WfSyncUuid);
                Ok(())
            }
            ConnState::WfBitMapS => {
                self.start_source_with_new_uuid();
                Ok(())
            }
            c => Err(ProtocolError(format!("bitmap received in state {c}"))),
        }
    }

    /// After a split brain, before the resync overwrites the victim's changes: the regions
    /// the two nodes changed since they split (both bitmaps merged), for the operator to see
    /// what the victim loses.
    fn report_diverged_regions(&mut self) {
        const MAX_RUNS: usize = 32;
        let bits = self.bitmap.bits();
        let mut runs = Vec::new();
        let mut total = 0;
        let mut at = 0;
        while let Some(first) = self.bitmap.next_set(at) {
            let end = self.bitmap.next_clear(first).min(bits);
            total += end - first;
            if runs.len() < MAX_RUNS {
                runs.push(format!(
                    "{}-{}",
                    first * SECTORS_PER_BIT,
                    end * SECTORS_PER_BIT - 1
                ));
            }
            if end >= bits {
                break;
            }
            at = end;
        }
        let role = if self.conn == ConnState::WfBitMapT {
            "this node's changes there are discarded"
        } else {
            "the peer's changes there are discarded"
        };
        let more = if runs.len() == MAX_RUNS { " ..." } else { "" };
        self.log(format!(
            "split brain: {} KiB diverged ({role}); sectors {}{more}",
            total * 4,
            runs.join(" ")
        ));
    }

    /// Becomes SyncSource: a new bitmap UUID, sent to the target once it is on disk.
    fn start_source_with_new_uuid(&mut self) {
        let random = self.random();
        let u = self.uuids.start_sync_source(random);
        // The new bitmap UUID must be durable before the target adopts it, as DRBD writes the
        // metadata before sending P_SYNC_UUID: a source that crashed with the write still in
        // flight and a target holding the new UUID share no UUID any more ("unrelated data",
        // found by tests/sim.rs). The resync starts when the superblock is written
        // (`sync_uuid_persisted`).
        self.md_flags = self.compute_flags();
        let io = self.io(IoPurpose::SyncUuid {
            uuid: u,
            conn_gen: self.conn_gen,
        });
        let op = MetaOp::Superblock {
            uuids: self.uuids,
            flags: self.md_flags,
        };
        self.push_meta(io, op);
        self.persist_bitmap();
    }

    /// The superblock with the new bitmap UUID is on disk: send it and start the resync.
    fn sync_uuid_persisted(&mut self, u: u64, conn_gen: u64) {
        let starting = matches!(self.conn, ConnState::WfBitMapS | ConnState::StartingSyncS);
        if conn_gen != self.conn_gen || !self.connected || !starting {
            return;
        }
        if self.attach_flushing {
            self.sync_uuid_deferred = Some((u, conn_gen));
            return;
        }
        if self.cfg.before_resync_source {
            self.resync_handler = Some(ResyncHandlerWait {
                handler: Handler::BeforeResyncSource,
                token: self.next_wait_token(),
                conn_gen,
                sync_uuid: u,
            });
            self.handler(Handler::BeforeResyncSource);
            return;
        }
        self.handler(Handler::BeforeResyncSource);
        self.start_sync_source(u);
    }

    /// The sync UUID is adopted: the resync starts as SyncTarget.
    fn start_sync_target(&mut self) {
        self.set_disk(DiskState::Inconsistent);
        self.set_peer_disk(DiskState::UpToDate);
        self.set_conn(ConnState::SyncTarget);
        self.persist_superblock(false);
        let total = self.bitmap.count();
        let mut rs = ResyncState::new(total);
        rs.marks.push_back((self.now, total));
        // 8.4 `use_checksum_based_resync`.
        rs.use_csums = self.cfg.csums_alg.is_some()
            && self.protocol_version >= 89
            && (!self.cfg.csums_after_crash_only || self.md_flags & MDF_CRASHED_PRIMARY != 0);
        let csums = rs.use_csums;
        self.resync = Some(rs);
        self.log(format!(
            "resync started as SyncTarget: {} KiB{}",
            total * 4,
            if csums { ", checksum based" } else { "" }
        ));
        self.apply_pause();
        self.send_state();
        self.maybe_finish_target();
        self.retry_waiting();
    }

    /// A before-resync handler the resync waits for answered `exit_code` (8.4's
    /// `drbd_start_resync`): 0 starts the resync, anything else drops the connection (3 from
    /// before-resync-source is taken as 0, as old tools returned it).
    fn resync_handler_done(&mut self, h: Handler, exit_code: i32) {
        let Some(w) = self.resync_handler else { return };
        if w.handler != h {
            return;
        }
        self.resync_handler = None;
        let waiting = match h {
            Handler::BeforeResyncTarget => self.conn == ConnState::WfSyncUuid,
            _ => matches!(self.conn, ConnState::WfBitMapS | ConnState::StartingSyncS),
        };
        if w.conn_gen != self.conn_gen || !self.connected || !waiting {
            return;
        }
        let agreed = exit_code == 0 || (h == Handler::BeforeResyncSource && exit_code == 3);
        if !agreed {
            self.lose_connection(
                &format!(
                    "{} handler returned {exit_code}, dropping connection",
                    h.name()
                ),
                false,
            );
            return;
        }
        if h == Handler::BeforeResyncSource && exit_code == 3 {
            self.log("before-resync-source handler returned 3, ignoring. Old userland tools?");
        }
        match h {
            Handler::BeforeResyncTarget => self.start_sync_target(),
            _ => self.start_sync_source(w.sync_uuid),
        }
    }

    /// Sends the new bitmap UUID and starts the resync as SyncSource.
    fn start_sync_source(&mut self, u: u64) {
        self.send(PeerMsg::SyncUuid(u));
        self.set_conn(ConnState::SyncSource);
        self.set_peer_disk(DiskState::Inconsistent);
        let total = self.bitmap.count();
        let mut rs = ResyncState::new(total);
        rs.marks.push_back((self.now, total));
        self.resync = Some(rs);
        self.log(format!("resync started as SyncSource: {} KiB", total * 4));
        self.apply_pause();
        self.send_state();
        self.retry_waiting();
    }

    fn write_acked(&mut self, a: Ack, ok: bool) -> Result<(), ProtocolError> {
        let Some(r) = self.reqs.get_mut(&a.block_id) else {
            return Err(ProtocolError(format!(
                "ack for unknown request {:#x}",
                a.block_id
            )));
        };
        if !r.kind.is_write() || r.sector != a.sector {
            return Err(ProtocolError(format!(
                "ack for request {:#x} does not match it",
                a.block_id
            )));
        }
        if r.net_pending {
            r.net_pending = false;
            r.net_ok = ok;
        }
        if !ok {
            let (s, n) = (r.sector, r.sectors);
            self.mark_out_of_sync(s, n);
        }
        // The peer applied our write only after its own superseded one finished there.
        let id = a.block_id;
        self.close_answers(|o| matches!(o, OpenAnswer::Superseded { by, .. } if *by == id));
        self.maybe_complete(a.block_id);
        Ok(())
    }

    fn barrier_acked(&mut self, nr: u32, set_size: u32) -> Result<(), ProtocolError> {
        if self.tl.front().is_some_and(|e| e.nr != nr) && self.skippable_epochs(nr) {
            // 8.4 never acknowledges an epoch in which it answered a write with
            // P_SUPERSEDED or P_RETRY_WRITE (the answer does not release the epoch), and
            // acknowledges later epochs regardless. Every write of the skipped epochs has
            // its answer already (acks travel before barrier acks on the meta socket), so the
            // ack of a later epoch releases them too.
            while self.tl.front().is_some_and(|e| e.nr != nr) {
                let e = self.tl.pop_front().expect("checked");
                self.log(format!(
                    "epoch {} released by the barrier ack of epoch {nr}",
                    e.nr
                ));
                let postponed: Vec<ReqId> = e
                    .reqs
                    .iter()
                    .copied()
                    .filter(|id| self.reqs.get(id).is_some_and(|r| r.postponed))
                    .collect();
                for id in e.reqs {
                    if let Some(r) = self.reqs.get_mut(&id) {
                        r.tl_refs = r.tl_refs.saturating_sub(1);
                    }
                    self.maybe_complete(id);
                }
                self.restart_if_ready(postponed);
            }
        }
        let Some(e) = self.tl.front() else {
            return Err(ProtocolError(format!(
                "P_BARRIER_ACK {nr} with an empty transfer log"
            )));
        };
        // The peer counts the writes it received; one of ours leaves out those it
        // superseded (as 8.4's sender forgets them), and a sender that had already sent a
        // retried write again would not count that one either.
        let n = e.reqs.len();
        let (sup, ret) = (e.superseded as usize, e.retried as usize);
        let sizes = [n, n - sup, n - sup - ret];
        if !e.closed || e.nr != nr || !sizes.contains(&(set_size as usize)) {
            return Err(ProtocolError(format!(
                "P_BARRIER_ACK {nr} (set size {set_size}) does not match the oldest epoch {} ({} writes)",
                e.nr,
                e.reqs.len()
            )));
        }
        let e = self.tl.pop_front().expect("checked");
        // A write the peer answered with P_RETRY_WRITE goes again at the latest now: the
        // peer finished the epoch it came in, so its conflicting write is on its way (8.4
        // restarts a postponed request when the barrier ack completes its network part).
        let postponed: Vec<ReqId> = e
            .reqs
            .iter()
            .copied()
            .filter(|id| {
                self.reqs
                    .get(id)
                    .is_some_and(|r| r.postponed && r.epoch_nr == nr)
            })
            .collect();
        for id in e.reqs {
            if let Some(r) = self.reqs.get_mut(&id) {
                r.tl_refs = r.tl_refs.saturating_sub(1);
                if r.net_pending && !r.postponed && r.epoch_nr == nr {
                    // The barrier ack implies the write is on the peer's disk. Not so for a
                    // write the peer answered with P_RETRY_WRITE: it counts in this epoch
                    // but was not applied, and only its sending again (in a later epoch)
                    // can complete it.
                    r.net_pending = false;
                    r.net_ok = true;
                }
            }
            self.maybe_complete(id);
        }
        if !postponed.is_empty() {
            self.restart_if_ready(postponed);
        }
        // Flushes waiting for this barrier.
        let mut flushes: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.flush_barrier.is_some_and(|b| b == nr))
            .map(|(id, _)| *id)
            .collect();
        // In id order, not the hash map's random order: runs must replay exactly.
        flushes.sort_unstable();
        for id in flushes {
            let r = self.reqs.get_mut(&id).expect("exists");
            r.flush_barrier = None;
            r.net_pending = false;
            r.net_ok = true;
            self.maybe_complete(id);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_write(
        &mut self,
        sector: u64,
        size: u32,
        block_id: u64,
        seq: u32,
        flags: u32,
        op: DiskOp,
        resync: bool,
    ) {
        let sectors = sectors_of(size);
        if !resync {
            // A write answered with P_RETRY_WRITE came again: its first epoch no longer
            // counts it (the peer's sender forgot that copy).
            self.close_answers(|a| {
                matches!(a, OpenAnswer::Retried { sector: s, sectors: n, .. }
                    if *s == sector && *n == sectors)
            });
            self.note_peer_seq(seq);
            self.received += sectors;
            if let Some(rs) = self.resync.as_mut() {
                rs.app_sectors += sectors;
            }
        }
        let epoch = if resync {
            None
        } else {
            let e = self.recv_epochs.back_mut().expect("connected has an epoch");
            e.writes += 1;
            e.pending += 1;
            Some(e.id)
        };
        if !resync && self.peer_disk < DiskState::Inconsistent && self.has_disk() {
            // The sender has no disk (or is still negotiating one): this node holds the only
            // copy, and the sender's disk must get it when it attaches.
            self.mark_out_of_sync(sector, sectors);
        }
        if !self.has_disk() {
            // Nothing to write to: the peer marks the block out of sync.
            if flags & (dp::SEND_WRITE_ACK | dp::SEND_RECEIVE_ACK) != 0 || resync {
                self.packet_seq = self.packet_seq.wrapping_add(1);
                self.send(PeerMsg::NegAck(Ack {
                    sector,
                    block_id,
                    size,
                    seq: self.packet_seq,
                }));
            }
            self.peer_write_finished(epoch);
            return;
        }
        if flags & dp::SEND_RECEIVE_ACK != 0 {
            self.packet_seq = self.packet_seq.wrapping_add(1);
            let seq = self.packet_seq;
            self.send(PeerMsg::RecvAck(Ack {
                sector,
                block_id,
                size,
                seq,
            }));
        }
        let w = PeerWrite {
            sector,
            sectors,
            block_id,
            flags,
            op,
            resync,
            epoch,
            conn_gen: self.conn_gen,
            restart: false,
        };
        self.peer_pages += w.pages();
        self.peer_waiting.push_back(w);
        self.pump_peer_writes();
    }

    /// Submits the queued peer writes that may go now, in arrival order: a write waits for
    /// earlier peer writes to its blocks and, with allow-two-primaries, is resolved against
    /// the local writes to its blocks ([`Device::peer_conflict`]).
    fn pump_peer_writes(&mut self) {
        if self.pumping {
            self.pump_again = true;
            return;
        }
        self.pumping = true;
        loop {
            self.pump_again = false;
            let mut queue = std::mem::take(&mut self.peer_waiting);
            let mut still: VecDeque<PeerWrite> = VecDeque::new();
            while let Some(mut w) = queue.pop_front() {
                let range = (w.sector, w.sectors);
                let blocked = self
                    .peer_writes_in_flight
                    .values()
                    .any(|&r| overlaps(r, range))
                    || still.iter().any(|q| overlaps((q.sector, q.sectors), range));
                if blocked {
                    still.push_back(w);
                    continue;
                }
                match self.peer_conflict(&w) {
                    Conflict::None => self.submit_peer_write(w),
                    Conflict::Wait => still.push_back(w),
                    Conflict::Restart => {
                        w.restart = true;
                        self.submit_peer_write(w);
                    }
                    Conflict::Superseded(by) => self.answer_conflict(w, Some(by)),
                    Conflict::Retry => self.answer_conflict(w, None),
                }
            }
            // Anything queued meanwhile goes behind.
            still.append(&mut self.peer_waiting);
            self.peer_waiting = still;
            if !self.pump_again {
                break;
            }
        }
        self.pumping = false;
    }

    /// How a peer write relates to the local writes to its blocks (8.4's
    /// `handle_write_conflicts`). Without allow-two-primaries only one side writes.
    fn peer_conflict(&self, w: &PeerWrite) -> Conflict {
        if !self.cfg.two_primaries || w.resync {
            return Conflict::None;
        }
        let range = (w.sector, w.sectors);
        let local: Vec<(ReqId, &Request)> = self
            .overlapping_active(range)
            .map(|id| (id, &self.reqs[&id]))
            .collect();
        if local.is_empty() {
            return Conflict::None;
        }
        if self.resolve_conflicts {
            // This node decides. A local write the peer has not acknowledged yet (or not
            // even received) is concurrent with the peer's write: the local one wins where
            // it covers the peer's completely (the peer applies it over its own write), and
            // else the peer sends its write again after applying ours.
            let undecided: Vec<&(ReqId, &Request)> = local
                .iter()
                .filter(|(_, r)| !r.issued || r.net_pending)
                .collect();
            if undecided.is_empty() {
                // The peer acknowledged all of them before it sent this write (its ack's
                // sequence number came first): this write is the later one. It waits for
                // them to finish here and then applies. (8.4 answers as if concurrent here.)
                return Conflict::Wait;
            }
            let covering = undecided.iter().find(|(_, r)| {
                r.sector <= w.sector && w.sector + w.sectors <= r.sector + r.sectors
            });
            match covering {
                Some((id, _)) => Conflict::Superseded(*id),
                None => Conflict::Retry,
            }
        } else if local.iter().any(|(_, r)| r.local_pending || !r.postponed) {
            // The peer decides about our writes (P_WRITE_ACK, P_SUPERSEDED or P_RETRY_WRITE),
            // and our disk must finish them first.
            Conflict::Wait
        } else {
            // All of them are to be sent again: this write goes first.
            Conflict::Restart
        }
    }

    /// The resolving node did not apply a peer write that conflicted with its own: tell the
    /// peer (`P_SUPERSEDED` or `P_RETRY_WRITE`) and count the write as done in its epoch.
    /// `superseded_by`: the local write covering it (`P_SUPERSEDED`), or None
    /// (`P_RETRY_WRITE`).
    fn answer_conflict(&mut self, w: PeerWrite, superseded_by: Option<ReqId>) {
        // Taken from the waiting queue and answered without a disk write.
        self.peer_pages -= w.pages();
        let retry = superseded_by.is_none();
        self.log(format!(
            "Concurrent writes detected: remote={}s+{}, {}",
            w.sector,
            w.sectors * 512,
            if retry {
                "the peer writes again after ours"
            } else {
                "superseded by ours"
            }
        ));
        let ack = self.ack_for(&w);
        self.send(if retry {
            PeerMsg::RetryWrite(ack)
        } else {
            PeerMsg::Superseded(ack)
        });
        // 8.4's sender forgets a superseded write once its own disk finished it, and a
        // write it must send again when it sends it again: the epoch's size leaves both out,
        // and its ack waits until that surely happened: until the peer acknowledged our
        // covering write (it applies it only after its own one finished), or sent the
        // retried one again.
        if let Some(id) = w.epoch {
            if let Some(e) = self.recv_epochs.iter_mut().find(|e| e.id == id) {
                e.answers_open += 1;
            }
            self.answered_open.push(match superseded_by {
                Some(by) => OpenAnswer::Superseded { epoch: id, by },
                None => OpenAnswer::Retried {
                    epoch: id,
                    sector: w.sector,
                    sectors: w.sectors,
                },
            });
        }
        self.peer_write_finished(w.epoch);
    }

    /// The ack answering peer write `w`, with the next number of our sequence.
    fn ack_for(&mut self, w: &PeerWrite) -> Ack {
        self.packet_seq = self.packet_seq.wrapping_add(1);
        Ack {
            sector: w.sector,
            block_id: w.block_id,
            size: (w.sectors * 512) as u32,
            seq: self.packet_seq,
        }
    }

    /// The peer answered our write `id` with `P_SUPERSEDED` or `P_RETRY_WRITE`: the size of
    /// the epoch it was last sent in may leave it out.
    fn note_conflict_answer(&mut self, id: ReqId, retry: bool) {
        let Some(nr) = self.reqs.get(&id).map(|r| r.epoch_nr) else {
            return;
        };
        if let Some(e) = self.tl.iter_mut().find(|e| e.nr == nr) {
            if retry {
                e.retried += 1;
            } else {
                e.superseded += 1;
            }
        }
    }

    /// Closes the open answers `done` selects: their epochs no longer count those writes.
    fn close_answers(&mut self, done: impl Fn(&OpenAnswer) -> bool) {
        if self.answered_open.is_empty() {
            return;
        }
        let (closed, open): (Vec<OpenAnswer>, Vec<OpenAnswer>) =
            self.answered_open.iter().partition(|a| done(a));
        if closed.is_empty() {
            return;
        }
        self.answered_open = open;
        for a in closed {
            if let Some(e) = self.recv_epochs.iter_mut().find(|e| e.id == a.epoch()) {
                e.writes -= 1;
                e.answered += 1;
                e.answers_open -= 1;
            }
        }
        self.finish_recv_epochs();
    }

    /// A peer write of receive epoch `epoch` is done (applied or answered).
    fn peer_write_finished(&mut self, epoch: Option<u64>) {
        if let Some(id) = epoch {
            if let Some(e) = self.recv_epochs.iter_mut().find(|e| e.id == id) {
                e.pending -= 1;
            }
            self.finish_recv_epochs();
        }
    }

    /// A peer write applied over postponed local writes is done: send those again (and write
    /// them again locally, over the peer's data) once no other peer write to their blocks is
    /// in flight or queued here (its completion comes back here): the disk must not hold
    /// both at once, and the peer must see our ack of each of them before the write sent
    /// again.
    fn restart_postponed(&mut self, range: (u64, u64)) {
        let ids: Vec<ReqId> = self.overlapping_active(range).collect();
        self.restart_if_ready(ids);
    }

    /// Sends the postponed writes among `ids` again when they are ready (see
    /// [`Device::restart_postponed`]).
    fn restart_if_ready(&mut self, ids: Vec<ReqId>) {
        for id in ids {
            // Checked one by one: a write may be listed twice (sent twice in one epoch), and
            // sending one changes nothing for the others.
            let ready = self.reqs.get(&id).is_some_and(|r| {
                let own = (r.sector, r.sectors);
                r.postponed
                    && !r.local_pending
                    && !self
                        .peer_writes_in_flight
                        .values()
                        .any(|&p| overlaps(p, own))
                    && !self
                        .peer_waiting
                        .iter()
                        .any(|p| overlaps((p.sector, p.sectors), own))
            });
            if ready {
                self.reqs.get_mut(&id).expect("exists").postponed = false;
                self.issue_write(id);
            }
        }
    }

    fn submit_peer_write(&mut self, w: PeerWrite) {
        let op = w.op.clone();
        let range = (w.sector, w.sectors);
        let io = self.io(IoPurpose::PeerWrite(w));
        self.peer_writes_in_flight.insert(io, range);
        self.actions.push_back(Action::Disk { io, op });
    }

    fn peer_write_done(&mut self, io: IoId, w: PeerWrite, ok: bool) {
        self.peer_writes_in_flight.remove(&io);
        self.peer_pages -= w.pages();
        if ok {
            self.written += w.sectors;
        }
        let current = w.conn_gen == self.conn_gen && self.connected;
        if w.resync {
            // A resync write is acknowledged, and its bits cleared, only once it is durable:
            // on P_RS_WRITE_ACK the source clears its bits, and the target's bitmap on disk
            // need not hold them, so a write lost from the volatile cache in a power loss
            // would never be resynced (found by tests/sim.rs). A write completing after the
            // connection was lost keeps its bits (a later resync repeats it).
            if current && ok && self.cfg.disk_flushes {
                self.rs_unflushed.push((w.sector, w.sectors));
                self.flush_resync_writes();
            } else if current {
                self.resync_writes_done(&[(w.sector, w.sectors)], ok);
            }
        } else {
            if !ok {
                self.mark_out_of_sync(w.sector, w.sectors);
            }
            if current {
                if w.flags & dp::SEND_WRITE_ACK != 0 {
                    let ack = self.ack_for(&w);
                    self.send(if ok {
                        PeerMsg::WriteAck(ack)
                    } else {
                        PeerMsg::NegAck(ack)
                    });
                }
                self.peer_write_finished(w.epoch);
                if w.restart || self.cfg.two_primaries {
                    // After the ack: its sequence number makes the resolving peer process
                    // the ack before our writes sent again, which then come after its own.
                    self.restart_postponed((w.sector, w.sectors));
                }
            }
        }
        // Peer writes and local writes that waited for this one.
        self.pump_peer_writes();
        if !self.waiting.is_empty() {
            self.retry_waiting();
        }
    }

    /// Flushes the resync writes done so far, unless a flush is already in flight (the
    /// writes done meanwhile wait for the next one).
    fn flush_resync_writes(&mut self) {
        if self.rs_flushing || self.rs_unflushed.is_empty() {
            return;
        }
        self.rs_flushing = true;
        let ranges = std::mem::take(&mut self.rs_unflushed);
        let io = self.io(IoPurpose::ResyncFlush {
            ranges,
            conn_gen: self.conn_gen,
        });
        self.actions.push_back(Action::Disk {
            io,
            op: DiskOp::Flush,
        });
    }

    /// Resync writes on the current connection are durable (`ok`) or failed: clear their
    /// bits and acknowledge them, or report them failed.
    fn resync_writes_done(&mut self, ranges: &[(u64, u64)], ok: bool) {
        for &(sector, sectors) in ranges {
            if ok {
                self.mark_in_sync(sector, sectors);
            } else if let Some(rs) = self.resync.as_mut() {
                rs.failed += sectors.div_ceil(SECTORS_PER_BIT);
            }
            let ack = Ack {
                sector,
                block_id: ID_SYNCER,
                size: (sectors * 512) as u32,
                seq: 0,
            };
            self.send(if ok {
                PeerMsg::RsWriteAck(ack)
            } else {
                PeerMsg::NegAck(ack)
            });
        }
        self.note_resync_progress();
        self.maybe_finish_target();
    }

    /// Starts a new receive epoch (after the handshake and after each `P_BARRIER`).
    fn open_recv_epoch(&mut self) {
        self.next_recv_epoch += 1;
        self.recv_epochs.push_back(RecvEpoch {
            id: self.next_recv_epoch,
            barrier: None,
            writes: 0,
            answered: 0,
            answers_open: 0,
            pending: 0,
            flushing: false,
            flushed: false,
        });
    }

    /// Acknowledges finished receive epochs in order (flushing first when configured).
    fn finish_recv_epochs(&mut self) {
        while let Some(e) = self.recv_epochs.front() {
            let Some(nr) = e.barrier else { break };
            if e.pending > 0 || e.flushing || e.answers_open > 0 {
                break;
            }
            if self.cfg.disk_flushes && e.writes > 0 && !e.flushed && self.has_disk() {
                let (id, gen) = (e.id, self.conn_gen);
                self.recv_epochs.front_mut().expect("exists").flushing = true;
                let io = self.io(IoPurpose::BarrierFlush {
                    epoch: id,
                    conn_gen: gen,
                });
                self.actions.push_back(Action::Disk {
                    io,
                    op: DiskOp::Flush,
                });
                break;
            }
            let (n, answered) = (e.writes, e.answered);
            self.recv_epochs.pop_front();
            if n == 0 && answered > 0 {
                // Every write of the epoch was superseded or sent again: the peer's sender
                // keeps nothing of it, and 8.4 acknowledges no such epoch (the ack of a later
                // epoch releases it on a peer of ours).
                continue;
            }
            self.send(PeerMsg::BarrierAck { nr, set_size: n });
        }
    }

    fn peer_read(&mut self, q: BlockReq, resync: bool, digest: Option<Bytes>) {
        let r = PeerRead {
            sector: q.sector,
            len: q.size,
            block_id: q.block_id,
            resync,
            digest,
            conn_gen: self.conn_gen,
        };
        // Application and resync reads alike need UpToDate data.
        let good = self.disk == DiskState::UpToDate;
        if !good {
            let ack = Ack {
                sector: q.sector,
                block_id: q.block_id,
                size: q.size,
                seq: 0,
            };
            self.send(if resync {
                PeerMsg::NegRsDReply(ack)
            } else {
                PeerMsg::NegDReply(ack)
            });
            return;
        }
        if resync && self.rs_read_blocked(&r) {
            self.rs_reads_waiting.push_back(r);
            return;
        }
        self.submit_peer_read(r);
    }

    /// A resync read waits while an application write to its blocks is in flight locally.
    fn rs_read_blocked(&self, r: &PeerRead) -> bool {
        let range = (r.sector, sectors_of(r.len));
        self.reqs.values().any(|q| {
            q.kind.is_write()
                && (q.local_pending || q.al_io.is_some())
                && overlaps(range, (q.sector, q.sectors))
        }) || self.waiting.iter().any(|id| {
            self.reqs
                .get(id)
                .is_some_and(|q| q.kind.is_write() && overlaps(range, (q.sector, q.sectors)))
        })
    }

    fn retry_rs_reads(&mut self) {
        let mut still = VecDeque::new();
        while let Some(r) = self.rs_reads_waiting.pop_front() {
            if self.rs_read_blocked(&r) {
                still.push_back(r);
            } else {
                self.submit_peer_read(r);
            }
        }
        self.rs_reads_waiting = still;
    }

    fn submit_peer_read(&mut self, r: PeerRead) {
        let (sector, len, resync) = (r.sector, r.len, r.resync);
        let io = self.io(IoPurpose::PeerRead(r));
        if resync {
            self.peer_reads_in_flight
                .insert(io, (sector, sectors_of(len)));
        }
        self.actions.push_back(Action::Disk {
            io,
            op: DiskOp::Read { sector, len },
        });
    }

    fn peer_read_done(&mut self, io: IoId, r: PeerRead, result: Result<Option<Bytes>, ()>) {
        self.peer_reads_in_flight.remove(&io);
        if r.conn_gen == self.conn_gen && self.connected {
            let same_digest = match (&result, &r.digest, self.cfg.csums_alg) {
                (Ok(Some(data)), Some(theirs), Some(alg)) => {
                    alg.digest(data).as_slice() == theirs.as_ref()
                }
                _ => false,
            };
            match result {
                Ok(Some(_)) if same_digest => {
                    // Checksum-based resync: the target has this block already.
                    self.read += sectors_of(r.len);
                    self.packet_seq = self.packet_seq.wrapping_add(1);
                    self.send(PeerMsg::RsIsInSync(Ack {
                        sector: r.sector,
                        block_id: r.block_id,
                        size: r.len,
                        seq: self.packet_seq,
                    }));
                    self.mark_in_sync(r.sector, sectors_of(r.len));
                    self.note_resync_progress();
                    self.maybe_finish_source();
                }
                Ok(Some(data)) if data.len() == r.len as usize => {
                    self.sent += sectors_of(r.len);
                    self.read += sectors_of(r.len);
                    self.send(if r.resync {
                        PeerMsg::RsDataReply {
                            sector: r.sector,
                            block_id: r.block_id,
                            data,
                        }
                    } else {
                        PeerMsg::DataReply {
                            sector: r.sector,
                            block_id: r.block_id,
                            data,
                        }
                    });
                }
                _ => {
                    let ack = Ack {
                        sector: r.sector,
                        block_id: r.block_id,
                        size: r.len,
                        seq: 0,
                    };
                    self.send(if r.resync {
                        PeerMsg::NegRsDReply(ack)
                    } else {
                        PeerMsg::NegDReply(ack)
                    });
                }
            }
        }
        if r.resync && !self.waiting.is_empty() {
            self.retry_waiting();
        }
    }

    // --------------------------------------------------------------------------------------
    // Resync
    // --------------------------------------------------------------------------------------

    fn note_resync_progress(&mut self) {
        let now = self.now;
        let remaining = self.bitmap.count();
        if let Some(rs) = self.resync.as_mut() {
            if rs
                .marks
                .back()
                .is_none_or(|m| now >= m.0 + Duration::from_secs(1))
            {
                rs.marks.push_back((now, remaining));
                while rs.marks.len() > 6 {
                    rs.marks.pop_front();
                }
            }
        }
    }

    fn maybe_finish_source(&mut self) {
        if matches!(self.conn, ConnState::SyncSource | ConnState::PausedSyncS)
            && self.bitmap.count() == 0
        {
            self.finish_source(true);
        }
    }

    fn finish_source(&mut self, peer_up_to_date: bool) {
        if self.resync.take().is_none() {
            return;
        }
        if peer_up_to_date {
            // The target wrote every block it was missing. Its P_STATE (data socket) can
            // overtake the last P_RS_WRITE_ACKs (meta socket): bits those acks would clear are
            // cleared here, or they would stay set on disk and be resynced after a crash for
            // nothing.
            let bits = self.bitmap.bits();
            self.bitmap.clear_bits(0..bits);
            self.uuids.finish_sync_source();
            self.set_peer_disk(DiskState::UpToDate);
            self.md_flags &= !MDF_CRASHED_PRIMARY;
            self.log("resync done (SyncSource)".to_string());
            if self.cfg.fencing != Fencing::DontCare && self.disk == DiskState::UpToDate {
                // Both UpToDate again: the peer's fence can go (8.4 `drbd_resync_finished`).
                self.handler(Handler::UnfencePeer);
            }
        } else {
            self.log("resync ended with failed blocks on the target".to_string());
        }
        self.set_conn(ConnState::Connected);
        self.persist_superblock(false);
        self.persist_bitmap();
        self.send_state();
    }

    fn maybe_finish_target(&mut self) {
        if !matches!(self.conn, ConnState::SyncTarget | ConnState::PausedSyncT) {
            return;
        }
        let Some(rs) = self.resync.as_ref() else {
            return;
        };
        let pending_writes = !self.peer_writes_in_flight.is_empty()
            || !self.peer_waiting.is_empty()
            || !self.rs_unflushed.is_empty()
            || self.rs_flushing;
        if !rs.in_flight.is_empty() || pending_writes {
            return;
        }
        let remaining = self.bitmap.count();
        if remaining > 0 && (rs.failed == 0 || rs.cursor < self.bitmap.bits()) {
            return;
        }
        // Before announcing the end (P_STATE, data socket), make sure the peer has processed
        // every P_RS_WRITE_ACK (meta socket): a P_PING/P_PING_ACK round trip on the meta
        // socket, as DRBD's `drbd_resync_finished` does. A kernel SyncSource finishes only if
        // its bitmap is already clear when that P_STATE arrives; otherwise it stays
        // SyncSource for good (seen against DRBD 8.4.11).
        match rs.final_ping {
            None => {
                if let Some(rs) = self.resync.as_mut() {
                    rs.final_ping = Some(false);
                }
                self.send(PeerMsg::Ping);
                return;
            }
            Some(false) => return,
            Some(true) => {}
        }
        let failed = remaining > 0;
        let rs_same_csum = rs.same_csum;
        let rs_csums = rs.use_csums;
        let rs_total_sectors = rs.total * SECTORS_PER_BIT;
        self.resync = None;
        if failed {
            self.log(format!("resync finished with {remaining} blocks failed"));
        } else if let Some(peer) = self.peer_uuids {
            let role = self.role;
            self.uuids.finish_sync_target(&peer.uuids, role);
            self.set_disk(DiskState::UpToDate);
            self.md_flags &= !MDF_CRASHED_PRIMARY;
            self.log("resync done (SyncTarget)".to_string());
            self.handler(Handler::AfterResyncTarget);
            if rs_same_csum > 0 || rs_csums {
                let total = rs_total_sectors.max(1);
                self.log(format!(
                    "{} % had equal checksums, eliminated: {}K; transferred {}K total {}K",
                    rs_same_csum * 100 / total,
                    rs_same_csum / 2,
                    (total - rs_same_csum.min(total)) / 2,
                    total / 2
                ));
            }
        }
        self.set_conn(ConnState::Connected);
        self.persist_superblock(false);
        self.persist_bitmap();
        self.send_state();
    }

    /// The resync controller (8.4 `drbd_rs_controller`): sectors to request in this step.
    fn controller(&mut self) -> u64 {
        let cfg = self.cfg.resync;
        let Some(rs) = self.resync.as_mut() else {
            return 0;
        };
        let step_secs = RESYNC_STEP.as_secs_f64();
        if cfg.c_plan_ahead == 0 {
            return (f64::from(cfg.rate_kib) * 2.0 * step_secs) as u64;
        }
        let steps = (cfg.c_plan_ahead as usize).clamp(1, MAX_PLAN_STEPS);
        if rs.plan.len() != steps {
            rs.plan = VecDeque::from(vec![0; steps]);
            rs.plan_total = 0;
        }
        let sect_in = rs.sect_in as i64;
        rs.sect_in = 0;
        rs.ctrl_in_flight = (rs.ctrl_in_flight - sect_in).max(0);
        let want: i64 = if rs.ctrl_in_flight == 0 && sect_in == 0 && rs.plan_total == 0 {
            (f64::from(cfg.rate_kib) * 2.0 * step_secs) as i64 * steps as i64
        } else if cfg.c_fill_target != 0 {
            i64::from(cfg.c_fill_target)
        } else {
            sect_in * i64::from(cfg.c_delay_target) * 10 / 10
        };
        let correction = want - rs.ctrl_in_flight - rs.plan_total;
        let cps = correction / steps as i64;
        for slot in rs.plan.iter_mut() {
            *slot += cps;
        }
        rs.plan_total += cps * steps as i64;
        let curr = rs.plan.pop_front().unwrap_or(0);
        rs.plan_total -= curr;
        rs.plan.push_back(0);
        let max = (f64::from(cfg.c_max_rate) * 2.0 * step_secs) as i64;
        let req = (sect_in + curr).clamp(0, max);
        // `ctrl_in_flight` grows by what is actually requested (see `tick`), as DRBD's
        // `rs_in_flight` does: counting the whole budget, of which the cap on requests in
        // flight may leave most unused, made the controller believe forever that sectors
        // were in flight and stop requesting (found by tests/sim.rs).
        req as u64
    }

    /// Time passed: the SyncTarget requests the next blocks.
    pub fn tick(&mut self, now: Duration) {
        self.now = now;
        if self.cfg.two_primaries && self.connected {
            // A write postponed by the peer goes again after a while even when nothing
            // triggers it: 8.4 answers P_RETRY_WRITE also when its conflicting write was
            // applied here already (its local part still running), and then sends nothing
            // more that would restart ours.
            let mut stale: Vec<ReqId> = self
                .reqs
                .iter()
                .filter(|(_, r)| r.postponed && now.saturating_sub(r.postponed_at) >= RETRY_AFTER)
                .map(|(id, _)| *id)
                .collect();
            stale.sort_unstable();
            if !stale.is_empty() {
                self.restart_if_ready(stale);
            }
        }
        if self.connected
            && !self.seq_held.is_empty()
            && now.saturating_sub(self.seq_held_since) > SEQ_WAIT_LIMIT
        {
            let want = self.seq_held.front().and_then(seq_of).unwrap_or(0);
            self.lose_connection(
                &format!(
                    "timed out waiting for the peer's sequence number {} (have {})",
                    want.wrapping_sub(1),
                    self.peer_seq
                ),
                true,
            );
            return;
        }
        if self.conn == ConnState::VerifyS && self.connected {
            self.verify_step();
            return;
        }
        if !matches!(self.conn, ConnState::SyncTarget) || !self.connected {
            return;
        }
        let due = {
            let Some(rs) = self.resync.as_mut() else {
                return;
            };
            if self.user_isp || self.peer_user_isp {
                return;
            }
            match rs.last_step {
                Some(t) if now < t + RESYNC_STEP => false,
                _ => {
                    rs.last_step = Some(now);
                    true
                }
            }
        };
        if !due {
            return;
        }
        if let Some(rs) = self.resync.as_mut() {
            rs.avg_step_sectors = (rs.avg_step_sectors * 3 + rs.last_step_sectors) / 4;
        }
        let throttle = self.throttle_resync();
        let budget = self.controller();
        let budget = if throttle { 0 } else { budget };
        let requested = self.request_resync_blocks(budget);
        if let Some(rs) = self.resync.as_mut() {
            rs.ctrl_in_flight += requested as i64;
            rs.step_left = budget.saturating_sub(requested);
            rs.app_sectors = 0;
            rs.last_step_sectors = 0;
        }
        self.note_resync_progress();
        self.maybe_finish_target();
    }

    /// c-min-rate (DRBD's `drbd_rs_should_slow_down`): while the application writes (more
    /// than 64 sectors since the last step) and the resync runs faster than `c-min-rate`,
    /// the resync pauses for this step so the application's writes get the disk.
    fn throttle_resync(&self) -> bool {
        let min = u64::from(self.cfg.resync.c_min_rate);
        let Some(rs) = self.resync.as_ref() else {
            return false;
        };
        if min == 0 || rs.app_sectors <= 64 {
            return false;
        }
        // Sectors per step -> KiB/s.
        let rate_kib = rs.avg_step_sectors / 2 * (1000 / RESYNC_STEP.as_millis() as u64);
        rate_kib > min
    }

    /// Requests more of this step's budget after replies made room under the in-flight cap.
    fn refill_resync(&mut self) {
        if !matches!(self.conn, ConnState::SyncTarget) || !self.connected {
            return;
        }
        let left = self.resync.as_ref().map_or(0, |r| r.step_left);
        if left == 0 {
            return;
        }
        let requested = self.request_resync_blocks(left);
        if let Some(rs) = self.resync.as_mut() {
            rs.ctrl_in_flight += requested as i64;
            rs.step_left = left.saturating_sub(requested);
        }
    }

    /// Sends resync requests for up to `budget` sectors; returns the sectors requested.
    fn request_resync_blocks(&mut self, mut budget: u64) -> u64 {
        // At most half of max-buffers in flight, as DRBD caps its resync requests.
        let cap = u64::from(self.cfg.max_buffers).max(2) / 2 * SECTORS_PER_BIT;
        let bits = self.bitmap.bits();
        let max_bits = u64::from(RS_MAX_REQUEST_BYTES) / 512 / SECTORS_PER_BIT;
        let mut requested = 0;
        loop {
            let Some(rs) = self.resync.as_ref() else {
                return requested;
            };
            if budget == 0 || rs.in_flight_sectors >= cap {
                break;
            }
            let cursor = rs.cursor;
            let Some(first) = self.bitmap.next_set(cursor) else {
                let rs = self.resync.as_mut().expect("checked");
                rs.cursor = bits;
                break;
            };
            // Extend the run, not past the request size, a resync extent or the device end.
            let extent_end_bit = ((first * SECTORS_PER_BIT) / RS_EXTENT_SECTORS + 1)
                * RS_EXTENT_SECTORS
                / SECTORS_PER_BIT;
            // Never more than the budget left (at least one block), so the rate holds.
            let budget_bits = budget.div_ceil(SECTORS_PER_BIT).max(1);
            let limit = (first + max_bits.min(budget_bits))
                .min(extent_end_bit)
                .min(bits);
            let end = self.bitmap.next_clear(first).min(limit);
            let sector = first * SECTORS_PER_BIT;
            let end_sector = (end * SECTORS_PER_BIT).min(self.sectors);
            let sectors = end_sector - sector;
            let rs = self.resync.as_mut().expect("checked");
            rs.cursor = end;
            if rs
                .in_flight
                .range(..end_sector)
                .next_back()
                .is_some_and(|(&s, &n)| s + n > sector)
            {
                continue;
            }
            rs.in_flight.insert(sector, sectors);
            rs.in_flight_sectors += sectors;
            let csums = rs.use_csums;
            budget = budget.saturating_sub(sectors);
            requested += sectors;
            let len = (sectors * 512) as u32;
            if csums {
                // Digest our own copy first; the request goes out with it.
                let io = self.io(IoPurpose::CsumRead {
                    sector,
                    len,
                    conn_gen: self.conn_gen,
                });
                self.actions.push_back(Action::Disk {
                    io,
                    op: DiskOp::Read { sector, len },
                });
            } else {
                self.send(PeerMsg::RsDataRequest(BlockReq {
                    sector,
                    block_id: ID_SYNCER,
                    size: len,
                }));
            }
        }
        requested
    }

    // --------------------------------------------------------------------------------------
    // Administration
    // --------------------------------------------------------------------------------------

    /// Applies an administrative request. Attach, detach, connect and disconnect are the
    /// runtime's business (they create, rebuild or reconnect the device); here they are
    /// refused.
    pub fn admin(&mut self, now: Duration, req: AdminRequest) -> Result<(), AdminError> {
        self.now = now;
        match req {
            AdminRequest::Primary { force } => self.promote(force),
            AdminRequest::Secondary => {
                if self.role == Role::Secondary {
                    return Ok(());
                }
                if self.openers > 0 {
                    // As 8.4: a device someone holds open stays Primary.
                    return Err(AdminError::State(StateRefusal::DeviceInUse));
                }
                self.become_secondary();
                self.send_state();
                Ok(())
            }
            AdminRequest::Invalidate => {
                if !self.has_disk() {
                    return Err(AdminError::State(StateRefusal::NoLocalDisk));
                }
                if self.conn == ConnState::Connected {
                    if self.peer_disk != DiskState::UpToDate {
                        return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
                    }
                    if self.state_request.is_some() {
                        return Err(AdminError::State(StateRefusal::ConcurrentChange));
                    }
                    self.request_state(StateRequest::FullSyncAsTarget);
                    Ok(())
                } else if !self.connected
                    || self.conn == ConnState::StandAlone
                    || self.conn == ConnState::Unconnected
                {
                    // Not connected: the whole device will be synced from the peer.
                    if self.role == Role::Primary {
                        return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
                    }
                    let bits = self.bitmap.bits();
                    self.bitmap.set_bits(0..bits);
                    self.set_disk(DiskState::Inconsistent);
                    self.persist_bitmap();
                    self.persist_superblock(false);
                    Ok(())
                } else {
                    Err(AdminError::State(StateRefusal::ConcurrentChange))
                }
            }
            AdminRequest::InvalidateRemote => {
                if self.conn != ConnState::Connected {
                    return Err(AdminError::State(StateRefusal::NeedConnection));
                }
                if self.disk != DiskState::UpToDate {
                    return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
                }
                if self.state_request.is_some() {
                    return Err(AdminError::State(StateRefusal::ConcurrentChange));
                }
                self.request_state(StateRequest::FullSyncAsSource);
                Ok(())
            }
            AdminRequest::NewCurrentUuid { clear_bitmap } => {
                if !self.has_disk() {
                    return Err(AdminError::State(StateRefusal::NoLocalDisk));
                }
                let link = if !self.connected {
                    LinkState::StandAlone
                } else if self.conn == ConnState::Connected {
                    LinkState::Connected {
                        protocol_version: self.protocol_version,
                    }
                } else {
                    LinkState::Other
                };
                let random = self.random();
                let role = self.role;
                match self
                    .uuids
                    .new_current_by_user(random, role, clear_bitmap, link)
                {
                    Ok(NewCurrentUuid::Generated { clear_bitmap }) => {
                        if clear_bitmap {
                            let bits = self.bitmap.bits();
                            self.bitmap.clear_bits(0..bits);
                            self.persist_bitmap();
                        }
                        self.persist_superblock(true);
                        Ok(())
                    }
                    Ok(NewCurrentUuid::SkipInitialSync { announce }) => {
                        let bits = self.bitmap.bits();
                        self.bitmap.clear_bits(0..bits);
                        let mut info = UuidInfo::new(announce, 0, UuidFlags::SKIP_INITIAL_SYNC);
                        info.flags.0 |= self.uuid_info().flags.0 & !UuidFlags::INCONSISTENT.0;
                        self.send(PeerMsg::Uuids(info));
                        self.set_disk(DiskState::UpToDate);
                        self.set_peer_disk(DiskState::UpToDate);
                        self.persist_bitmap();
                        self.persist_superblock(true);
                        self.send_state();
                        Ok(())
                    }
                    Err(e) => Err(AdminError::Other {
                        exit_code: 11,
                        message: format!("new-current-uuid: {e}"),
                    }),
                }
            }
            AdminRequest::Verify => self.request_verify(),
            AdminRequest::Outdate => self.outdate(),
            AdminRequest::PauseSync | AdminRequest::ResumeSync => {
                // 8.4's user_isp: a flag of the device, not of one resync; set while no
                // resync runs, the next one starts paused.
                let pause = req == AdminRequest::PauseSync;
                if self.user_isp == pause {
                    let (code, text) = if pause {
                        (134, "Sync-pause flag is already set")
                    } else if self.peer_user_isp
                        && matches!(self.conn, ConnState::PausedSyncS | ConnState::PausedSyncT)
                    {
                        (
                            157,
                            "Sync-pause flag is already cleared.\nNote: Resync pause caused by the peer node.",
                        )
                    } else {
                        (135, "Sync-pause flag is already cleared")
                    };
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message: format!("Failure: ({code}) {text}"),
                    });
                }
                self.user_isp = pause;
                self.apply_pause();
                self.send_state();
                Ok(())
            }
            AdminRequest::SuspendIo => {
                if !self.user_suspended {
                    self.user_suspended = true;
                    self.log("I/O suspended by suspend-io".to_string());
                }
                Ok(())
            }
            AdminRequest::ResumeIo => {
                // Ends either suspension (8.4 clears susp, susp_nod and susp_fen); requests
                // that waited go on, locally only when the peer is gone.
                if self.user_suspended || self.frozen {
                    self.user_suspended = false;
                    self.frozen = false;
                    self.log("I/O resumed by resume-io".to_string());
                    self.retry_waiting();
                }
                Ok(())
            }
            AdminRequest::Attach
            | AdminRequest::Detach
            | AdminRequest::Connect { .. }
            | AdminRequest::Disconnect => Err(AdminError::Other {
                exit_code: 20,
                message: "handled by the runtime".to_string(),
            }),
        }
    }

    /// Sets the `discard-my-data` flag for the next handshake (`connect --discard-my-data`).
    pub fn set_discard_my_data(&mut self, v: bool) {
        self.discard_my_data = v;
    }

    /// The runtime started connecting (`connect`): leave StandAlone.
    pub fn connecting(&mut self) {
        if !self.connected {
            self.standalone_reason = None;
            self.set_conn(ConnState::WfConnection);
        }
    }

    /// The runtime stopped connecting (`disconnect`): StandAlone. If connected, the
    /// connection is torn down first (the runtime closes the sockets).
    pub fn disconnect(&mut self, now: Duration) {
        self.now = now;
        if self.connected {
            self.teardown();
        }
        self.set_conn(ConnState::StandAlone);
    }

    fn promote(&mut self, force: bool) -> Result<(), AdminError> {
        if self.role == Role::Primary {
            return Ok(());
        }
        if self.peer_role == Role::Primary && !self.cfg.two_primaries {
            return Err(AdminError::State(StateRefusal::TwoPrimaries));
        }
        if self.transitional() {
            return Err(AdminError::State(StateRefusal::ConcurrentChange));
        }
        if self.cfg.fencing != Fencing::DontCare
            && !self.connected
            && self.peer_disk >= DiskState::DUnknown
        {
            // The peer may hold newer data: it must be fenced first (8.4 SS_PRIMARY_NOP; the
            // runtime runs fence-peer and asks again, see `fence_for_promotion`).
            return Err(AdminError::State(StateRefusal::PeerNotOutdated));
        }
        let peer_good = self.connected && self.peer_disk == DiskState::UpToDate;
        let local_good = self.disk == DiskState::UpToDate;
        let mut forced = false;
        if !local_good {
            let syncing_target =
                matches!(self.conn, ConnState::SyncTarget | ConnState::PausedSyncT);
            if peer_good && (self.disk == DiskState::Diskless || syncing_target) {
                // Diskless Primary, or a SyncTarget reading through the peer.
            } else if force && self.has_disk() && !self.in_sync_state() {
                forced = true;
                self.set_disk(DiskState::UpToDate);
            } else {
                return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
            }
        }
        let random = self.random();
        let connected = self.connected;
        let peer_disk = self.peer_disk;
        self.role = Role::Primary;
        self.log("role( Secondary -> Primary )".to_string());
        let new_uuid = if self.has_disk() {
            self.uuids.promote(random, connected, peer_disk, forced)
        } else {
            false
        };
        if new_uuid {
            self.log(format!("new current UUID {:016X}", self.uuids.current));
        }
        self.persist_superblock(true);
        if self.connected {
            if new_uuid {
                let info = self.uuid_info();
                self.send(PeerMsg::Uuids(info));
            }
            self.send_state();
            if forced && self.conn == ConnState::Connected {
                // Our data became the newest: sync it to the peer.
                self.sync_handshake(false);
            }
        }
        Ok(())
    }

    /// Whether the device waits for handler `h`'s exit code, and the token of that wait:
    /// the runtime reports the code with [`Device::handler_done`] and this token (also when
    /// no command is configured or it could not run). Handlers run one after the other, so a
    /// run started for a connection since lost can finish while a newer wait is open; its
    /// token tells them apart.
    pub fn wants_exit_code(&self, h: Handler) -> Option<u64> {
        match h {
            Handler::FencePeer => self.fence_wait,
            Handler::BeforeResyncTarget | Handler::BeforeResyncSource => self
                .resync_handler
                .filter(|w| w.handler == h)
                .map(|w| w.token),
            _ => None,
        }
    }

    fn next_wait_token(&mut self) -> u64 {
        self.wait_tokens += 1;
        self.wait_tokens
    }

    /// How many clients hold the device open (the runtime keeps this current).
    pub fn set_openers(&mut self, openers: u32) {
        self.openers = openers;
    }

    /// A handler whose answer is wanted finished with `exit_code` (`fence-peer`: 8.4's
    /// contract, exit codes 3 to 7; before-resync-target/-source: 0 lets the resync start).
    pub fn handler_done(&mut self, now: Duration, h: Handler, token: u64, exit_code: i32) {
        self.now = now;
        if self.wants_exit_code(h) != Some(token) {
            self.log(format!(
                "{} helper returned {exit_code} for a wait that is over, ignored",
                h.name()
            ));
            return;
        }
        if matches!(h, Handler::BeforeResyncTarget | Handler::BeforeResyncSource) {
            self.resync_handler_done(h, exit_code);
            return;
        }
        if h != Handler::FencePeer || self.fence_wait.take().is_none() {
            return;
        }
        if self.connected {
            self.log(format!(
                "fence-peer helper returned {exit_code}, ignored: the peer is connected again"
            ));
            return;
        }
        let decisive = match exit_code {
            3 => {
                self.log("fence-peer helper returned 3 (peer is inconsistent)".to_string());
                self.set_peer_disk(DiskState::Inconsistent);
                true
            }
            4 => {
                self.log("fence-peer helper returned 4 (peer was fenced)".to_string());
                self.set_peer_disk(DiskState::Outdated);
                true
            }
            5 => {
                self.log(
                    "fence-peer helper returned 5 (peer is unreachable, assumed to be dead)"
                        .to_string(),
                );
                if self.disk == DiskState::UpToDate {
                    self.set_peer_disk(DiskState::Outdated);
                }
                true
            }
            6 => {
                self.log(
                    "fence-peer helper returned 6 (peer is primary, outdating myself)".to_string(),
                );
                self.set_disk(DiskState::Outdated);
                true
            }
            7 => {
                if self.cfg.fencing != Fencing::ResourceAndStonith {
                    self.log("fence-peer helper returned 7 (peer was stonithed) although fencing is not resource-and-stonith".to_string());
                } else {
                    self.log("fence-peer helper returned 7 (peer was stonithed)".to_string());
                }
                self.set_peer_disk(DiskState::Outdated);
                true
            }
            other => {
                self.log(format!("fence-peer helper broken, returned {other}"));
                false
            }
        };
        // The flags record an outdated peer (or our own outdated disk).
        self.persist_superblock(false);
        if self.frozen && decisive {
            self.frozen = false;
            self.log("I/O resumed".to_string());
            self.retry_waiting();
        }
    }

    /// A promotion was refused with [`StateRefusal::PeerNotOutdated`]: the runtime runs the
    /// fence-peer handler itself, waits for it, reports with [`Device::handler_done`] and
    /// asks again.
    pub fn fence_for_promotion(&mut self) {
        self.fence_wait = Some(self.next_wait_token());
        self.log("fencing the peer before the promotion".to_string());
    }

    /// The fence-peer handler started by [`Device::fence_for_promotion`] answered
    /// `exit_code`: the promotion is asked again; still refused and `force` (`primary
    /// --force`), the peer is taken as Outdated (8.4's "Forced into split brain situation!").
    pub fn promote_after_fencing(
        &mut self,
        now: Duration,
        exit_code: i32,
        force: bool,
    ) -> Result<(), AdminError> {
        // Tokens start at 1: without a wait, the answer is logged as late and ignored.
        let token = self.fence_wait.unwrap_or(0);
        self.handler_done(now, Handler::FencePeer, token, exit_code);
        let r = self.promote(force);
        if r == Err(AdminError::State(StateRefusal::PeerNotOutdated)) && force {
            self.log("Forced into split brain situation!".to_string());
            self.set_peer_disk(DiskState::Outdated);
            return self.promote(force);
        }
        r
    }

    /// `outdate`: the local data is marked Outdated (on a disconnected Secondary; the
    /// fence-peer handler of a Primary runs it here).
    fn outdate(&mut self) -> Result<(), AdminError> {
        if self.role == Role::Primary {
            return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
        }
        if self.connected && self.conn >= ConnState::Connected {
            return Err(AdminError::State(StateRefusal::ConnectedOutdates));
        }
        match self.disk {
            DiskState::Outdated => Ok(()),
            DiskState::UpToDate | DiskState::Consistent => {
                self.set_disk(DiskState::Outdated);
                // The superblock keeps it: Consistent, not up to date.
                self.persist_superblock(false);
                Ok(())
            }
            _ => Err(AdminError::State(StateRefusal::LowerThanOutdated)),
        }
    }

    /// Prepares a clean stop: the runtime calls this after in-flight requests finished.
    /// The bitmap and superblock are written (Primary indication cleared).
    pub fn shutdown(&mut self, now: Duration) {
        self.now = now;
        if self.connected {
            self.teardown();
        }
        if self.role == Role::Primary {
            self.role = Role::Secondary;
            self.uuids.demote();
        }
        self.persist_bitmap();
        self.persist_superblock(false);
    }

    /// Volume number.
    pub fn volume(&self) -> u16 {
        self.volume
    }
}

// ------------------------------------------------------------------------------------------
// Attaching and detaching the backing device at run time
// ------------------------------------------------------------------------------------------

impl Device {
    /// Whether any operation on the backing device's data area is in flight (application or
    /// peer I/O). The runtime waits for this to clear before [`Device::detach`].
    pub fn local_io_in_flight(&self) -> bool {
        self.ios
            .values()
            .any(|p| !matches!(p, IoPurpose::Meta | IoPurpose::MetaGate))
            || self
                .reqs
                .values()
                .any(|r| r.local_pending || r.al_io.is_some())
    }

    /// `detach`: the node goes Diskless. A Primary keeps serving through its peer, which must
    /// be UpToDate (else the request is refused, as DRBD refuses to leave a Primary without
    /// good data). Call only when [`Device::local_io_in_flight`] is false. The bitmap and the
    /// superblock are written first; the runtime may close the backing device afterwards.
    pub fn detach(&mut self, now: Duration) -> Result<(), AdminError> {
        self.now = now;
        if !self.has_disk() {
            return Ok(());
        }
        if self.local_io_in_flight() {
            return Err(AdminError::State(StateRefusal::ConcurrentChange));
        }
        let peer_good = self.connected && self.peer_disk == DiskState::UpToDate;
        if self.role == Role::Primary && !peer_good {
            return Err(AdminError::State(StateRefusal::NoUpToDateDisk));
        }
        self.persist_bitmap();
        self.persist_superblock(false);
        self.go_diskless("detached during a resync");
        Ok(())
    }

    /// `attach` of a backing device at run time. When connected, the connection is dropped
    /// and made again, so that the handshake compares the attached data with the peer's.
    pub fn attach(&mut self, now: Duration, disk: LocalDisk) -> Result<(), AdminError> {
        self.now = now;
        if self.has_disk() {
            return Err(AdminError::Other {
                exit_code: 10,
                message: "Failure: (124) Device is attached to a disk (use detach first)".into(),
            });
        }
        if disk.sectors != self.sectors || disk.bitmap.device_sectors() != self.sectors {
            return Err(AdminError::Other {
                exit_code: 10,
                message: format!(
                    "Failure: (111) Low.dev. smaller than requested DRBD-dev. size: {} sectors, the device has {}",
                    disk.sectors, self.sectors
                ),
            });
        }
        let (flags, state) = attach_state(disk.flags);
        self.uuids = disk.uuids;
        if self.role == Role::Primary {
            self.uuids.current |= 1;
        }
        self.md_flags = flags;
        self.bitmap = disk.bitmap;
        self.al = Some(disk.al);
        if self.connected && self.conn == ConnState::Connected {
            // As DRBD: the disk is Negotiating while both nodes compare its data with the
            // peer's; writes meanwhile go to the peer only, which marks them out of sync.
            self.negotiating = Some(state);
            self.set_disk(DiskState::Negotiating);
            let info = self.uuid_info();
            self.send(PeerMsg::Uuids(info));
            self.send_state();
            self.sync_handshake(false);
        } else {
            self.set_disk(state);
            self.persist_superblock(false);
            if self.connected {
                self.lose_connection("attached a disk during a state change", true);
            }
        }
        Ok(())
    }

    fn peer_data_lost_while_connected(&mut self) {
        let random = self.random();
        let a = self
            .uuids
            .on_peer_data_lost(random, self.role, self.peer_role, self.disk, false);
        if a == uuid::PeerLossAction::NewCurrentUuid {
            self.log(format!("new current UUID {:016X}", self.uuids.current));
            self.persist_superblock(true);
            let info = self.uuid_info();
            self.send(PeerMsg::Uuids(info));
        }
    }

    /// The peer changed its resync settings while connected (`disk-options`, `adjust`): as
    /// 8.4 does, this node adopts them, so that both run the same resync.
    fn peer_sync_settings(
        &mut self,
        p: crate::replication::msg::SyncSettings,
    ) -> Result<(), ProtocolError> {
        // Both names are checked before anything is adopted.
        let alg = |name: &str, what: &str| {
            DigestAlg::from_optional_name(name)
                .map_err(|e| ProtocolError(format!("P_SYNC_PARAM: {what}: {e}")))
        };
        let verify_alg = alg(&p.verify_alg, "verify-alg")?;
        let csums_alg = alg(&p.csums_alg, "csums-alg")?;
        let r = &mut self.cfg.resync;
        r.rate_kib = p.rate_kib;
        if let Some([plan_ahead, delay_target, fill_target, max_rate]) = p.controller {
            r.c_plan_ahead = plan_ahead;
            r.c_delay_target = delay_target;
            r.c_fill_target = fill_target;
            r.c_max_rate = max_rate;
        }
        self.cfg.verify_alg = verify_alg;
        self.cfg.csums_alg = csums_alg;
        self.log(format!(
            "the peer changed the resync settings: resync-rate {} KiB/s{}{}",
            p.rate_kib,
            p.controller
                .map(|c| format!(
                    ", c-plan-ahead {} c-delay-target {} c-fill-target {} c-max-rate {}",
                    c[0], c[1], c[2], c[3]
                ))
                .unwrap_or_default(),
            verify_alg
                .map(|a| format!(", verify-alg {}", a.name()))
                .unwrap_or_default()
        ));
        Ok(())
    }

    /// The peer changed the connection settings while connected (`net-options`, `adjust`;
    /// `P_PROTOCOL_UPDATE`): as 8.4 does, this node adopts them. Protocol A, B or C applies
    /// to the writes issued from now on.
    fn peer_protocol_update(
        &mut self,
        p: crate::replication::msg::ProtocolSettings,
    ) -> Result<(), ProtocolError> {
        use crate::uuid::AfterSbPolicy;
        let protocol = match p.wire_protocol {
            1 => Protocol::A,
            2 => Protocol::B,
            3 => Protocol::C,
            other => {
                return Err(ProtocolError(format!(
                    "P_PROTOCOL_UPDATE: unknown protocol {other}"
                )))
            }
        };
        if !p.integrity_alg.is_empty() {
            return Err(ProtocolError(format!(
                "P_PROTOCOL_UPDATE: data-integrity-alg {} is not supported",
                p.integrity_alg
            )));
        }
        if p.two_primaries && protocol != Protocol::C {
            return Err(ProtocolError(
                "P_PROTOCOL_UPDATE: allow-two-primaries without protocol C".into(),
            ));
        }
        let policy = |n: u32| {
            AfterSbPolicy::from_wire(n).ok_or_else(|| {
                ProtocolError(format!("P_PROTOCOL_UPDATE: unknown after-sb policy {n}"))
            })
        };
        let mut sb = self.cfg.split_brain;
        sb.after_sb_0pri = policy(p.after_sb[0])?;
        sb.after_sb_1pri = policy(p.after_sb[1])?;
        sb.after_sb_2pri = policy(p.after_sb[2])?;
        let old = self.cfg.protocol;
        self.cfg.protocol = protocol;
        self.cfg.two_primaries = p.two_primaries;
        self.cfg.split_brain = sb;
        self.log(format!(
            "the peer changed the connection settings: protocol {} -> {}, allow-two-primaries {}",
            old.letter(),
            protocol.letter(),
            if p.two_primaries { "yes" } else { "no" }
        ));
        Ok(())
    }

    // --------------------------------------------------------------------------------------
    // Online verify
    // --------------------------------------------------------------------------------------

    /// Whether an online verify may start now (either side).
    fn verify_possible(&self) -> Result<(), StateRefusal> {
        if !self.connected {
            return Err(StateRefusal::NeedConnection);
        }
        if self.conn != ConnState::Connected
            || self.state_request.is_some()
            || self.verify.is_some()
        {
            return Err(StateRefusal::ResyncRunning);
        }
        if self.cfg.verify_alg.is_none() {
            return Err(StateRefusal::NoVerifyAlg);
        }
        if self.disk != DiskState::UpToDate || self.peer_disk != DiskState::UpToDate {
            return Err(StateRefusal::NoUpToDateDisk);
        }
        Ok(())
    }

    /// `verify`: asks the peer to take part (a cluster-wide state change in 8.4); the verify
    /// starts when it agrees.
    fn request_verify(&mut self) -> Result<(), AdminError> {
        self.verify_possible().map_err(AdminError::State)?;
        self.request_state(StateRequest::Verify);
        Ok(())
    }

    /// Asks the peer for a cluster-wide connection state change (8.4 sends these for
    /// `verify`, `invalidate` and `invalidate-remote`); it happens when the peer agrees.
    fn request_state(&mut self, req: StateRequest) {
        use crate::replication::msg::state_word::CONN;
        let conn = match req {
            StateRequest::Verify => ConnState::VerifyS,
            StateRequest::FullSyncAsTarget => ConnState::StartingSyncT,
            StateRequest::FullSyncAsSource => ConnState::StartingSyncS,
        };
        self.state_request = Some(req);
        let mask = ((1u32 << CONN.1) - 1) << CONN.0;
        let val = u32::from(conn.wire()) << CONN.0;
        self.send(PeerMsg::StateChgReq {
            mask,
            val,
            connection: false,
        });
    }

    /// A full sync agreed on with the peer (`invalidate` / `invalidate-remote` on either
    /// side, 8.4's StartingSyncT / StartingSyncS): every block is out of sync; the source
    /// starts with a new sync UUID as after a bitmap exchange, the target waits for it.
    fn begin_full_sync(&mut self, as_target: bool) {
        let bits = self.bitmap.bits();
        self.bitmap.set_bits(0..bits);
        self.log(format!(
            "full sync as {}: all {} KiB out of sync",
            if as_target {
                "SyncTarget"
            } else {
                "SyncSource"
            },
            bits * 4
        ));
        if as_target {
            self.set_conn(ConnState::StartingSyncT);
            self.set_disk(DiskState::Inconsistent);
            self.persist_bitmap();
            self.persist_superblock(false);
            self.set_conn(ConnState::WfSyncUuid);
        } else {
            self.set_conn(ConnState::StartingSyncS);
            self.set_peer_disk(DiskState::Inconsistent);
            self.start_source_with_new_uuid();
        }
    }

    fn begin_verify(&mut self, source: bool) {
        self.set_conn(if source {
            ConnState::VerifyS
        } else {
            ConnState::VerifyT
        });
        if source {
            self.log("Starting Online Verify from sector 0".to_string());
        }
        self.verify = Some(VerifyState {
            source,
            position: 0,
            in_flight: BTreeMap::new(),
            reading: 0,
            done: 0,
            found: 0,
            run: None,
            started: self.now,
            seen_request: false,
        });
        if source {
            self.verify_step();
        }
    }

    /// VerifyS: asks for the digests of the next blocks, at `resync-rate`, with at most
    /// `max-buffers / 2` blocks outstanding.
    fn verify_step(&mut self) {
        let per_step = (u64::from(self.cfg.resync.rate_kib) * 2 * RESYNC_STEP.as_millis() as u64
            / 1000)
            .max(SECTORS_PER_BIT);
        let max_blocks = u64::from(self.cfg.max_buffers / 2).max(1);
        let sectors = self.sectors;
        let mut budget = per_step;
        let mut asks = Vec::new();
        {
            let Some(v) = self.verify.as_mut().filter(|v| v.source) else {
                return;
            };
            while budget > 0 && v.position < sectors && (v.in_flight.len() as u64) < max_blocks {
                let n = SECTORS_PER_BIT.min(sectors - v.position);
                let size = (n * 512) as u32;
                v.in_flight.insert(v.position, size);
                asks.push(BlockReq {
                    sector: v.position,
                    block_id: ID_SYNCER,
                    size,
                });
                v.position += n;
                budget = budget.saturating_sub(n);
            }
        }
        for q in asks {
            self.send(PeerMsg::OvRequest(q));
        }
        self.maybe_finish_verify();
    }

    /// VerifyT: the digest of a block for the peer.
    fn verify_request(&mut self, q: BlockReq) {
        if let Some(v) = self.verify.as_mut() {
            if !v.seen_request {
                v.seen_request = true;
                let sector = q.sector;
                self.log(format!("Online Verify start sector: {sector}"));
            }
        }
        if self.disk != DiskState::UpToDate {
            self.send(PeerMsg::NegRsDReply(Ack {
                sector: q.sector,
                block_id: q.block_id,
                size: q.size,
                seq: 0,
            }));
            return;
        }
        let io = self.io(IoPurpose::VerifyRead {
            sector: q.sector,
            len: q.size,
            block_id: q.block_id,
            peer_digest: None,
            conn_gen: self.conn_gen,
        });
        self.actions.push_back(Action::Disk {
            io,
            op: DiskOp::Read {
                sector: q.sector,
                len: q.size,
            },
        });
    }

    /// VerifyS: the peer's digest of a block we asked about; ours is computed from a read.
    fn verify_reply(
        &mut self,
        sector: u64,
        block_id: u64,
        size: u32,
        digest: Bytes,
    ) -> Result<(), ProtocolError> {
        let Some(v) = self.verify.as_mut().filter(|v| v.source) else {
            // The verify ended (or never started here): nothing to compare.
            return Ok(());
        };
        if v.in_flight.get(&sector) != Some(&size) {
            return Err(ProtocolError(format!(
                "P_OV_REPLY for sector {sector} (+{size}), which was not asked for"
            )));
        }
        v.in_flight.remove(&sector);
        v.reading += 1;
        let io = self.io(IoPurpose::VerifyRead {
            sector,
            len: size,
            block_id,
            peer_digest: Some(digest),
            conn_gen: self.conn_gen,
        });
        self.actions.push_back(Action::Disk {
            io,
            op: DiskOp::Read { sector, len: size },
        });
        Ok(())
    }

    fn verify_read_done(
        &mut self,
        sector: u64,
        len: u32,
        block_id: u64,
        peer_digest: Option<Bytes>,
        result: Result<Option<Bytes>, ()>,
    ) {
        let alg = self.cfg.verify_alg;
        // A block that cannot be read has no digest: it counts as different.
        let mine = match (&result, alg) {
            (Ok(Some(data)), Some(alg)) => alg.digest(data),
            _ => Vec::new(),
        };
        match peer_digest {
            None => {
                self.send(PeerMsg::OvReply {
                    sector,
                    block_id,
                    size: len,
                    digest: Bytes::from(mine),
                });
            }
            Some(theirs) => {
                let Some(v) = self.verify.as_mut().filter(|v| v.source) else {
                    return;
                };
                v.reading -= 1;
                let same = !mine.is_empty() && theirs.as_ref() == mine.as_slice();
                self.packet_seq = self.packet_seq.wrapping_add(1);
                self.send(PeerMsg::OvResult(Ack {
                    sector,
                    block_id: if same { ID_IN_SYNC } else { ID_OUT_OF_SYNC },
                    size: len,
                    seq: self.packet_seq,
                }));
                self.verify_block(sector, sectors_of(len), same);
                self.maybe_finish_verify();
            }
        }
    }

    /// VerifyT: the source's verdict on a block.
    fn verify_result(&mut self, a: Ack) -> Result<(), ProtocolError> {
        if self.verify.as_ref().is_none_or(|v| v.source) {
            return Ok(());
        }
        let same = match a.block_id {
            ID_IN_SYNC => true,
            ID_OUT_OF_SYNC => false,
            other => {
                return Err(ProtocolError(format!(
                    "P_OV_RESULT with block id {other:#x}"
                )))
            }
        };
        self.verify_block(a.sector, sectors_of(a.size), same);
        Ok(())
    }

    /// Records the verdict on one block: a different block is marked out of sync (a later
    /// resync repairs it) and logged in runs, as 8.4 logs them.
    fn verify_block(&mut self, sector: u64, sectors: u64, same: bool) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        v.done += 1;
        let mut flushed = None;
        if same {
            flushed = v.run.take();
        } else {
            v.found += 1;
            v.run = match v.run {
                Some((s, n)) if s + n == sector => Some((s, n + sectors)),
                other => {
                    flushed = other;
                    Some((sector, sectors))
                }
            };
        }
        if let Some((s, n)) = flushed {
            self.log(format!("Out of sync: start={s}, size={n} (sectors)"));
        }
        if !same {
            self.mark_out_of_sync(sector, sectors);
        }
    }

    fn maybe_finish_verify(&mut self) {
        let done = self.verify.as_ref().is_some_and(|v| {
            v.source && v.position >= self.sectors && v.in_flight.is_empty() && v.reading == 0
        });
        if done {
            self.finish_verify();
            // The peer (VerifyT) ends when it sees us Connected again; it never saw the
            // VerifyS state, so this P_STATE goes out although ours looks unchanged.
            self.last_state_sent = None;
            self.send_state();
        }
    }

    fn finish_verify(&mut self) {
        let Some(v) = self.verify.take() else {
            return;
        };
        if let Some((s, n)) = v.run {
            self.log(format!("Out of sync: start={s}, size={n} (sectors)"));
        }
        let secs = self.now.saturating_sub(v.started).as_secs().max(1);
        self.log(format!(
            "Online verify done (total {secs} sec; paused 0 sec; {} K/sec)",
            v.done * 4 / secs
        ));
        if v.found > 0 {
            self.log(format!(
                "Online verify found {} 4k block out of sync!",
                v.found
            ));
            self.handler(Handler::OutOfSync);
        }
        self.set_conn(ConnState::Connected);
        self.persist_bitmap();
    }

    /// The peer asks whether it may change the state (8.4 `receive_req_state`): a cluster-wide
    /// change such as its promotion (`P_STATE_CHG_REQ`) or its disconnect
    /// (`P_CONN_ST_CHG_REQ`). `mask`/`val` are in the peer's view: its `role` is our
    /// `peer_role`. Returns the `drbd_state_rv` to answer: 1 to grant, -1 when the peer would
    /// become a second Primary without `allow-two-primaries`. The change itself arrives
    /// afterwards as `P_STATE`.
    fn state_change_requested(&mut self, mask: u32, val: u32, connection: bool) -> i32 {
        use crate::replication::msg::state_word::{get, selects, CONN, ROLE};
        if !connection
            && selects(mask, CONN)
            && get(val, CONN) == u32::from(ConnState::VerifyS.wire())
        {
            // The peer starts an online verify: this node answers as VerifyT.
            if let Err(refusal) = self.verify_possible() {
                self.log(format!(
                    "refusing the peer's online verify: {}",
                    refusal.text()
                ));
                return refusal.code();
            }
            self.begin_verify(false);
            return 1;
        }
        if !connection && selects(mask, CONN) {
            let c = get(val, CONN);
            let full_sync = if c == u32::from(ConnState::StartingSyncS.wire()) {
                // The peer's invalidate-remote: this node becomes the target.
                Some(true)
            } else if c == u32::from(ConnState::StartingSyncT.wire()) {
                // The peer's invalidate: this node becomes the source.
                Some(false)
            } else {
                None
            };
            if let Some(as_target) = full_sync {
                let refusal = if self.conn != ConnState::Connected || self.state_request.is_some() {
                    Some(StateRefusal::ResyncRunning)
                } else if !self.has_disk() {
                    Some(StateRefusal::NoLocalDisk)
                } else if !as_target && self.disk != DiskState::UpToDate {
                    Some(StateRefusal::NoUpToDateDisk)
                } else if as_target && self.role == Role::Primary {
                    // 8.4 lets a Primary become SyncTarget only with a good peer; keep it
                    // simple and safe: a Primary keeps its data.
                    Some(StateRefusal::NoUpToDateDisk)
                } else {
                    None
                };
                if let Some(r) = refusal {
                    self.log(format!(
                        "refusing the peer's full sync request: {}",
                        r.text()
                    ));
                    return r.code();
                }
                self.begin_full_sync(as_target);
                return 1;
            }
        }
        let peer_becomes_primary =
            selects(mask, ROLE) && get(val, ROLE) == u32::from(Role::Primary.wire());
        if peer_becomes_primary && self.role == Role::Primary && !self.cfg.two_primaries {
            self.log("refusing the peer's promotion: allow-two-primaries is not set".to_string());
            return StateRefusal::TwoPrimaries.code();
        }
        self.log(format!(
            "peer requested a {}state change (mask {mask:#x} val {val:#x}): granted",
            if connection { "connection " } else { "" }
        ));
        1
    }
}
