//! Typed payloads of every 8.4 command, the [`Packet`] enum and the [`Frame`].

use std::fmt;

use bytes::Bytes;

use super::command::Command;
use super::header::{header_kind_for, HeaderKind};
use super::limits::{P_RS_PARAM_89_SIZE, P_RS_PARAM_95_SIZE, P_RS_PARAM_SIZE};
use super::state::State;
use super::WireContext;

/// An opaque request handle (`block_id`): 8 bytes in the sender's native byte order that the
/// peer echoes back verbatim.
///
/// Only the special values below are interpreted by anybody.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 8]);

impl BlockId {
    /// `ID_SYNCER`: resync and verify traffic (all ones, byte order irrelevant).
    pub const SYNCER: BlockId = BlockId([0xff; 8]);
    /// `ID_IN_SYNC` (4711, big-endian): `P_OV_RESULT` "block is in sync".
    pub const IN_SYNC: BlockId = BlockId(4711u64.to_be_bytes());
    /// `ID_OUT_OF_SYNC` (4712, big-endian): `P_OV_RESULT` "block differs".
    pub const OUT_OF_SYNC: BlockId = BlockId(4712u64.to_be_bytes());
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// `ID_SYNCER`, see [`BlockId::SYNCER`].
pub const ID_SYNCER: BlockId = BlockId::SYNCER;
/// `ID_IN_SYNC`, see [`BlockId::IN_SYNC`].
pub const ID_IN_SYNC: BlockId = BlockId::IN_SYNC;
/// `ID_OUT_OF_SYNC`, see [`BlockId::OUT_OF_SYNC`].
pub const ID_OUT_OF_SYNC: BlockId = BlockId::OUT_OF_SYNC;

/// `P_DATA`, `P_DATA_REPLY`, `P_RS_DATA_REPLY`: `p_data` + integrity digest + data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataPacket {
    /// First sector (512 bytes).
    pub sector: u64,
    /// Request handle, echoed in the ack (or the request's handle, echoed in a reply).
    pub block_id: BlockId,
    /// Sender's per-volume packet sequence number.
    pub seq_num: u32,
    /// `DP_*` flags.
    pub dp_flags: u32,
    /// Integrity digest of the data: exactly
    /// [`WireContext::integrity_digest_len`] bytes (empty without data-integrity-alg).
    pub digest: Bytes,
    /// The data; a multiple of 512 bytes, at most 1 MiB, empty for an empty flush.
    pub data: Bytes,
}

/// `P_TRIM` and `P_ZEROES` (`p_trim`): a data packet without data, covering `size` bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trim {
    /// First sector.
    pub sector: u64,
    /// Request handle.
    pub block_id: BlockId,
    /// Sender's packet sequence number.
    pub seq_num: u32,
    /// `DP_*` flags.
    pub dp_flags: u32,
    /// Bytes covered.
    pub size: u32,
}

/// `P_WSAME` (`p_wsame` + digest + one logical block, repeated over `size` bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wsame {
    /// First sector.
    pub sector: u64,
    /// Request handle.
    pub block_id: BlockId,
    /// Sender's packet sequence number.
    pub seq_num: u32,
    /// `DP_*` flags.
    pub dp_flags: u32,
    /// Bytes covered.
    pub size: u32,
    /// Integrity digest (as for [`DataPacket::digest`]).
    pub digest: Bytes,
    /// The block written everywhere: a nonzero multiple of 512 bytes.
    pub data: Bytes,
}

/// `p_block_ack`: every ack on the meta socket (`P_RECV_ACK`, `P_WRITE_ACK`,
/// `P_RS_WRITE_ACK`, `P_SUPERSEDED`, `P_RETRY_WRITE`, `P_NEG_ACK`, `P_NEG_DREPLY`,
/// `P_NEG_RS_DREPLY`, `P_OV_RESULT`, `P_RS_IS_IN_SYNC`, `P_RS_CANCEL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockAck {
    /// First sector.
    pub sector: u64,
    /// The request's handle, echoed.
    pub block_id: BlockId,
    /// Bytes acknowledged.
    pub blksize: u32,
    /// Sender's packet sequence number.
    pub seq_num: u32,
}

/// `p_block_req`: `P_DATA_REQUEST`, `P_RS_DATA_REQUEST`, `P_OV_REQUEST`, `P_RS_THIN_REQ`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockRequest {
    /// First sector.
    pub sector: u64,
    /// Request handle (`ID_SYNCER` for resync and verify).
    pub block_id: BlockId,
    /// Bytes requested.
    pub blksize: u32,
    /// The pad word: send 0. Kept as received because the 8.4 kernel does not initialize it
    /// when it sends a request, so it may carry stale bytes.
    pub pad: u32,
}

/// `P_CSUM_RS_REQUEST` and `P_OV_REPLY`: `p_block_req` followed by a digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestRequest {
    /// The block.
    pub request: BlockRequest,
    /// The digest of the block (csums-alg / verify-alg), at most 64 bytes.
    pub digest: Bytes,
}

/// `p_block_desc`: `P_OUT_OF_SYNC`, `P_RS_DEALLOCATED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockDesc {
    /// First sector.
    pub sector: u64,
    /// Bytes described.
    pub blksize: u32,
    /// The pad word: send 0; kept as received (not always initialized by 8.4 senders).
    pub pad: u32,
}

/// `P_BARRIER` (`p_barrier`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Barrier {
    /// The epoch number: an opaque handle in the sender's byte order, echoed in the ack.
    pub barrier: [u8; 4],
    /// The pad word: send 0; kept as received.
    pub pad: u32,
}

/// `P_BARRIER_ACK` (`p_barrier_ack`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BarrierAck {
    /// The barrier's epoch handle, echoed verbatim.
    pub barrier: [u8; 4],
    /// Number of writes the receiver counted in that epoch.
    pub set_size: u32,
}

/// `P_CONNECTION_FEATURES` (`p_connection_features`, 72 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionFeatures {
    /// Lowest protocol version the sender speaks.
    pub protocol_min: u32,
    /// `FF_*` flags the sender supports.
    pub feature_flags: u32,
    /// Highest protocol version the sender speaks (0 means "= protocol_min").
    pub protocol_max: u32,
    /// Bytes 12..72, zero from an 8.4 sender. DRBD 9 puts its node ids at 12..20 (see
    /// [`ConnectionFeatures::sender_node_id`]); they are kept so any peer's packet re-encodes
    /// exactly.
    pub reserved: [u8; 60],
}

impl Default for ConnectionFeatures {
    fn default() -> Self {
        ConnectionFeatures {
            protocol_min: 0,
            feature_flags: 0,
            protocol_max: 0,
            reserved: [0; 60],
        }
    }
}

impl ConnectionFeatures {
    /// The highest version offered: a `protocol_max` of 0 means "only `protocol_min`".
    pub fn effective_max(&self) -> u32 {
        if self.protocol_max == 0 {
            self.protocol_min
        } else {
            self.protocol_max
        }
    }

    /// Whether the two ranges of versions overlap.
    pub fn compatible_with(&self, peer: &ConnectionFeatures) -> bool {
        self.effective_max() >= peer.protocol_min && self.protocol_min <= peer.effective_max()
    }

    /// The agreed protocol version (the lower of both maxima) and feature flags (those both
    /// offer). Meaningful only for compatible ranges.
    pub fn agree(&self, peer: &ConnectionFeatures) -> (u32, u32) {
        (
            self.effective_max().min(peer.effective_max()),
            self.feature_flags & peer.feature_flags,
        )
    }

    /// An 8.4 features packet (reserved bytes zero).
    pub fn new(protocol_min: u32, feature_flags: u32, protocol_max: u32) -> Self {
        ConnectionFeatures {
            protocol_min,
            feature_flags,
            protocol_max,
            reserved: [0; 60],
        }
    }

    /// DRBD 9's `sender_node_id` (payload bytes 12..16; 0 from an 8.4 sender).
    pub fn sender_node_id(&self) -> u32 {
        u32::from_be_bytes([
            self.reserved[0],
            self.reserved[1],
            self.reserved[2],
            self.reserved[3],
        ])
    }

    /// DRBD 9's `receiver_node_id` (payload bytes 16..20; 0 from an 8.4 sender).
    pub fn receiver_node_id(&self) -> u32 {
        u32::from_be_bytes([
            self.reserved[4],
            self.reserved[5],
            self.reserved[6],
            self.reserved[7],
        ])
    }
}

/// `P_PROTOCOL` and `P_PROTOCOL_UPDATE` (`p_protocol` + integrity algorithm name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protocol {
    /// Wire protocol: 1 = A, 2 = B, 3 = C.
    pub protocol: u32,
    /// after-sb-0pri policy number.
    pub after_sb_0p: u32,
    /// after-sb-1pri policy number.
    pub after_sb_1p: u32,
    /// after-sb-2pri policy number.
    pub after_sb_2p: u32,
    /// `CF_*` flags.
    pub conn_flags: u32,
    /// allow-two-primaries (0 or 1).
    pub two_primaries: u32,
    /// data-integrity-alg, empty for none. On the wire NUL-terminated (at most 63
    /// characters, no NUL inside) from protocol 87 on; absent below 87, where it must be
    /// empty.
    pub integrity_alg: String,
}

/// Another name of [`Protocol`].
pub type ProtocolPacket = Protocol;

/// The sync parameter packets `P_SYNC_PARAM` and `P_SYNC_PARAM89`, one variant per layout.
///
/// The kernel sends `P_SYNC_PARAM` below protocol 89 and `P_SYNC_PARAM89` from 89 on, with
/// the layout of the agreed version (`Rate` <= 87, `Verify` 88, `Algs` 89..94,
/// `Controller` >= 95), and accepts any layout under either command; so does the codec.
/// Algorithm names have at most 63 characters and no NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncParam {
    /// 4 bytes: the resync rate only.
    Rate {
        /// resync-rate (KiB/s).
        resync_rate: u32,
    },
    /// 4 bytes + verify-alg, NUL-terminated.
    Verify {
        /// resync-rate (KiB/s).
        resync_rate: u32,
        /// verify-alg.
        verify_alg: String,
    },
    /// 132 bytes (`p_rs_param_89`): rate and two NUL-padded 64-byte names.
    Algs {
        /// resync-rate (KiB/s).
        resync_rate: u32,
        /// verify-alg.
        verify_alg: String,
        /// csums-alg.
        csums_alg: String,
    },
    /// 148 bytes (`p_rs_param_95`): `Algs` plus the resync controller settings.
    Controller {
        /// resync-rate (KiB/s).
        resync_rate: u32,
        /// verify-alg.
        verify_alg: String,
        /// csums-alg.
        csums_alg: String,
        /// c-plan-ahead (0.1 s).
        c_plan_ahead: u32,
        /// c-delay-target (0.1 s).
        c_delay_target: u32,
        /// c-fill-target (sectors).
        c_fill_target: u32,
        /// c-max-rate (KiB/s).
        c_max_rate: u32,
    },
}

impl Default for SyncParam {
    /// The 8.4 disk-option defaults in the protocol >= 95 layout: resync-rate 250,
    /// c-plan-ahead 20, c-delay-target 10, c-fill-target 100, c-max-rate 102400, no
    /// algorithms.
    fn default() -> Self {
        SyncParam::Controller {
            resync_rate: 250,
            verify_alg: String::new(),
            csums_alg: String::new(),
            c_plan_ahead: 20,
            c_delay_target: 10,
            c_fill_target: 100,
            c_max_rate: 102_400,
        }
    }
}

impl SyncParam {
    /// The resync rate, present in every layout.
    pub fn resync_rate(&self) -> u32 {
        match self {
            SyncParam::Rate { resync_rate }
            | SyncParam::Verify { resync_rate, .. }
            | SyncParam::Algs { resync_rate, .. }
            | SyncParam::Controller { resync_rate, .. } => *resync_rate,
        }
    }

    /// The verify algorithm ("" where the layout has none).
    pub fn verify_alg(&self) -> &str {
        match self {
            SyncParam::Rate { .. } => "",
            SyncParam::Verify { verify_alg, .. }
            | SyncParam::Algs { verify_alg, .. }
            | SyncParam::Controller { verify_alg, .. } => verify_alg,
        }
    }

    /// c-plan-ahead, c-delay-target, c-fill-target and c-max-rate, where the layout has them.
    pub fn controller(&self) -> Option<[u32; 4]> {
        match self {
            SyncParam::Controller {
                c_plan_ahead,
                c_delay_target,
                c_fill_target,
                c_max_rate,
                ..
            } => Some([*c_plan_ahead, *c_delay_target, *c_fill_target, *c_max_rate]),
            _ => None,
        }
    }

    /// The csums algorithm ("" where the layout has none).
    pub fn csums_alg(&self) -> &str {
        match self {
            SyncParam::Rate { .. } | SyncParam::Verify { .. } => "",
            SyncParam::Algs { csums_alg, .. } | SyncParam::Controller { csums_alg, .. } => {
                csums_alg
            }
        }
    }

    /// Payload length of this layout.
    pub fn wire_len(&self) -> usize {
        match self {
            SyncParam::Rate { .. } => P_RS_PARAM_SIZE,
            SyncParam::Verify { verify_alg, .. } => P_RS_PARAM_SIZE + verify_alg.len() + 1,
            SyncParam::Algs { .. } => P_RS_PARAM_89_SIZE,
            SyncParam::Controller { .. } => P_RS_PARAM_95_SIZE,
        }
    }
}

/// `P_UUIDS` (`p_uuids`, 48 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Uuids {
    /// Current data generation UUID.
    pub current: u64,
    /// Bitmap UUID.
    pub bitmap: u64,
    /// The two history UUIDs.
    pub history: [u64; 2],
    /// Number of set bits in the sender's bitmap.
    pub dirty_bits: u64,
    /// UUID flags (1 discard-my-data, 2 crashed primary, 4 inconsistent, 8 skip initial sync).
    pub flags: u64,
}

/// The queue limits (`o_qlim`, 24 bytes) that follow `p_sizes` when `FF_WSAME` is agreed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLimits {
    /// Physical block size.
    pub physical_block_size: u32,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Alignment offset.
    pub alignment_offset: u32,
    /// Minimum I/O size.
    pub io_min: u32,
    /// Optimal I/O size.
    pub io_opt: u32,
    /// Backing device can discard (0/1).
    pub discard_enabled: u8,
    /// Discard zeroes data (0/1).
    pub discard_zeroes_data: u8,
    /// Backing device can write-same (0/1).
    pub write_same_capable: u8,
    /// Last byte: pad in 8.4 (9.x: bm_block_shift_minus_12); kept as received.
    pub pad: u8,
}

/// `P_SIZES` (`p_sizes`, 32 bytes, or 56 with queue limits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sizes {
    /// Usable size of the backing disk (sectors).
    pub d_size: u64,
    /// User-configured size (sectors; 0 = none).
    pub u_size: u64,
    /// Currently exposed size (sectors).
    pub c_size: u64,
    /// Largest bio the sender accepts (bytes).
    pub max_bio_size: u32,
    /// Unused by DRBD (0).
    pub queue_order_type: u16,
    /// `DDSF_*` flags (1 forced, 2 no resync).
    pub dds_flags: u16,
    /// The queue limits: present exactly when `FF_WSAME` is agreed.
    pub queue_limits: Option<QueueLimits>,
}

/// `P_STATE_CHG_REQ` and `P_CONN_ST_CHG_REQ` (`p_req_state`): change the fields in `mask`
/// to the values in `val`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReqState {
    /// Which fields to change (same bit layout as the state).
    pub mask: State,
    /// The new values.
    pub val: State,
}

/// `P_STATE_CHG_REPLY` and `P_CONN_ST_CHG_REPLY` (`p_req_state_reply`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateReply {
    /// `enum drbd_state_rv`: 1 success, 0 unknown error, negative = refused.
    pub retcode: i32,
}

/// `P_SYNC_UUID` (`p_rs_uuid`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncUuid {
    /// The new sync UUID.
    pub uuid: u64,
}

/// `P_BITMAP`: plain bitmap words, little-endian u64 each (bit i of the device bitmap is bit
/// i mod 8 of byte i div 8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    /// The words' bytes: a multiple of 8, fitting in 4096 bytes with the header.
    pub words: Bytes,
}

/// `P_COMPRESSED_BITMAP` (`p_compressed_bm`): an encoding byte and the code bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompressedBitmap {
    /// Bits 0..3: the code (only [`CompressedBitmap::RLE_VLI_BITS`] exists); bits 4..6: pad
    /// bits (unused high bits of the last code byte); bit 7: the first run is of set bits.
    pub encoding: u8,
    /// The code bytes (at least one).
    pub code: Bytes,
}

impl CompressedBitmap {
    /// The only encoding: RLE of alternating runs, VLI coded, in a little-endian bitstream.
    pub const RLE_VLI_BITS: u8 = 2;

    /// Builds the encoding byte from its parts (`pad_bits` is taken mod 8).
    pub fn encoding_byte(code: u8, pad_bits: u8, first_run_set: bool) -> u8 {
        (code & 0x0f) | ((pad_bits & 0x07) << 4) | (u8::from(first_run_set) << 7)
    }

    /// The code (bits 0..3 of the encoding byte).
    pub fn code_kind(&self) -> u8 {
        self.encoding & 0x0f
    }

    /// Number of unused bits at the top of the last code byte.
    pub fn pad_bits(&self) -> u8 {
        (self.encoding >> 4) & 0x07
    }

    /// Whether the first run is of set bits.
    pub fn first_run_set(&self) -> bool {
        self.encoding & 0x80 != 0
    }
}

/// `P_DELAY_PROBE` (`p_delay_probe93`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayProbe {
    /// Matches the probes of the two sockets.
    pub seq_num: u32,
    /// Microseconds after the reference point.
    pub offset: u32,
}

/// One packet: a command with its typed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `P_DATA`.
    Data(DataPacket),
    /// `P_DATA_REPLY`.
    DataReply(DataPacket),
    /// `P_RS_DATA_REPLY`.
    RsDataReply(DataPacket),
    /// `P_BARRIER`.
    Barrier(Barrier),
    /// `P_BITMAP`.
    Bitmap(Bitmap),
    /// `P_BECOME_SYNC_TARGET` (legacy, no payload).
    BecomeSyncTarget,
    /// `P_BECOME_SYNC_SOURCE` (legacy, no payload).
    BecomeSyncSource,
    /// `P_UNPLUG_REMOTE`.
    UnplugRemote,
    /// `P_DATA_REQUEST`.
    DataRequest(BlockRequest),
    /// `P_RS_DATA_REQUEST`.
    RsDataRequest(BlockRequest),
    /// `P_SYNC_PARAM`.
    SyncParam(SyncParam),
    /// `P_PROTOCOL`.
    Protocol(Protocol),
    /// `P_UUIDS`.
    Uuids(Uuids),
    /// `P_SIZES`.
    Sizes(Sizes),
    /// `P_STATE`.
    State(State),
    /// `P_SYNC_UUID`.
    SyncUuid(SyncUuid),
    /// `P_AUTH_CHALLENGE`: 64..=128 random bytes.
    AuthChallenge(Bytes),
    /// `P_AUTH_RESPONSE`: the HMAC, at most 64 bytes.
    AuthResponse(Bytes),
    /// `P_STATE_CHG_REQ`.
    StateChgReq(ReqState),
    /// `P_PING`.
    Ping,
    /// `P_PING_ACK`.
    PingAck,
    /// `P_RECV_ACK`.
    RecvAck(BlockAck),
    /// `P_WRITE_ACK`.
    WriteAck(BlockAck),
    /// `P_RS_WRITE_ACK`.
    RsWriteAck(BlockAck),
    /// `P_SUPERSEDED`.
    Superseded(BlockAck),
    /// `P_NEG_ACK`.
    NegAck(BlockAck),
    /// `P_NEG_DREPLY`.
    NegDReply(BlockAck),
    /// `P_NEG_RS_DREPLY`.
    NegRsDReply(BlockAck),
    /// `P_BARRIER_ACK`.
    BarrierAck(BarrierAck),
    /// `P_STATE_CHG_REPLY`.
    StateChgReply(StateReply),
    /// `P_OV_REQUEST`.
    OvRequest(BlockRequest),
    /// `P_OV_REPLY`.
    OvReply(DigestRequest),
    /// `P_OV_RESULT` (block_id `ID_IN_SYNC` or `ID_OUT_OF_SYNC`).
    OvResult(BlockAck),
    /// `P_CSUM_RS_REQUEST`.
    CsumRsRequest(DigestRequest),
    /// `P_RS_IS_IN_SYNC`.
    RsIsInSync(BlockAck),
    /// `P_SYNC_PARAM89`.
    SyncParam89(SyncParam),
    /// `P_COMPRESSED_BITMAP`.
    CompressedBitmap(CompressedBitmap),
    /// `P_DELAY_PROBE`.
    DelayProbe(DelayProbe),
    /// `P_OUT_OF_SYNC`.
    OutOfSync(BlockDesc),
    /// `P_RS_CANCEL`.
    RsCancel(BlockAck),
    /// `P_CONN_ST_CHG_REQ`.
    ConnStChgReq(ReqState),
    /// `P_CONN_ST_CHG_REPLY`.
    ConnStChgReply(StateReply),
    /// `P_RETRY_WRITE`.
    RetryWrite(BlockAck),
    /// `P_PROTOCOL_UPDATE`.
    ProtocolUpdate(Protocol),
    /// `P_TRIM`.
    Trim(Trim),
    /// `P_RS_THIN_REQ`.
    RsThinReq(BlockRequest),
    /// `P_RS_DEALLOCATED`.
    RsDeallocated(BlockDesc),
    /// `P_WSAME`.
    Wsame(Wsame),
    /// `P_ZEROES`.
    Zeroes(Trim),
    /// `P_INITIAL_META`.
    InitialMeta,
    /// `P_INITIAL_DATA`.
    InitialData,
    /// `P_CONNECTION_FEATURES`.
    ConnectionFeatures(ConnectionFeatures),
}

impl Packet {
    /// The command of this packet.
    pub fn command(&self) -> Command {
        use Command as C;
        match self {
            Packet::Data(_) => C::Data,
            Packet::DataReply(_) => C::DataReply,
            Packet::RsDataReply(_) => C::RsDataReply,
            Packet::Barrier(_) => C::Barrier,
            Packet::Bitmap(_) => C::Bitmap,
            Packet::BecomeSyncTarget => C::BecomeSyncTarget,
            Packet::BecomeSyncSource => C::BecomeSyncSource,
            Packet::UnplugRemote => C::UnplugRemote,
            Packet::DataRequest(_) => C::DataRequest,
            Packet::RsDataRequest(_) => C::RsDataRequest,
            Packet::SyncParam(_) => C::SyncParam,
            Packet::Protocol(_) => C::Protocol,
            Packet::Uuids(_) => C::Uuids,
            Packet::Sizes(_) => C::Sizes,
            Packet::State(_) => C::State,
            Packet::SyncUuid(_) => C::SyncUuid,
            Packet::AuthChallenge(_) => C::AuthChallenge,
            Packet::AuthResponse(_) => C::AuthResponse,
            Packet::StateChgReq(_) => C::StateChgReq,
            Packet::Ping => C::Ping,
            Packet::PingAck => C::PingAck,
            Packet::RecvAck(_) => C::RecvAck,
            Packet::WriteAck(_) => C::WriteAck,
            Packet::RsWriteAck(_) => C::RsWriteAck,
            Packet::Superseded(_) => C::Superseded,
            Packet::NegAck(_) => C::NegAck,
            Packet::NegDReply(_) => C::NegDReply,
            Packet::NegRsDReply(_) => C::NegRsDReply,
            Packet::BarrierAck(_) => C::BarrierAck,
            Packet::StateChgReply(_) => C::StateChgReply,
            Packet::OvRequest(_) => C::OvRequest,
            Packet::OvReply(_) => C::OvReply,
            Packet::OvResult(_) => C::OvResult,
            Packet::CsumRsRequest(_) => C::CsumRsRequest,
            Packet::RsIsInSync(_) => C::RsIsInSync,
            Packet::SyncParam89(_) => C::SyncParam89,
            Packet::CompressedBitmap(_) => C::CompressedBitmap,
            Packet::DelayProbe(_) => C::DelayProbe,
            Packet::OutOfSync(_) => C::OutOfSync,
            Packet::RsCancel(_) => C::RsCancel,
            Packet::ConnStChgReq(_) => C::ConnStChgReq,
            Packet::ConnStChgReply(_) => C::ConnStChgReply,
            Packet::RetryWrite(_) => C::RetryWrite,
            Packet::ProtocolUpdate(_) => C::ProtocolUpdate,
            Packet::Trim(_) => C::Trim,
            Packet::RsThinReq(_) => C::RsThinReq,
            Packet::RsDeallocated(_) => C::RsDeallocated,
            Packet::Wsame(_) => C::Wsame,
            Packet::Zeroes(_) => C::Zeroes,
            Packet::InitialMeta => C::InitialMeta,
            Packet::InitialData => C::InitialData,
            Packet::ConnectionFeatures(_) => C::ConnectionFeatures,
        }
    }

    /// The payload length this packet encodes to under `ctx` (what the header's length
    /// field will say), without validating the packet.
    pub fn payload_len(&self, ctx: &WireContext) -> usize {
        use super::limits as l;
        match self {
            Packet::Data(d) | Packet::DataReply(d) | Packet::RsDataReply(d) => {
                l::P_DATA_SIZE + d.digest.len() + d.data.len()
            }
            Packet::Wsame(w) => l::P_TRIM_SIZE + w.digest.len() + w.data.len(),
            Packet::Trim(_) | Packet::Zeroes(_) => l::P_TRIM_SIZE,
            Packet::Barrier(_) | Packet::BarrierAck(_) => l::P_BARRIER_SIZE,
            Packet::Bitmap(b) => b.words.len(),
            Packet::CompressedBitmap(c) => 1 + c.code.len(),
            Packet::BecomeSyncTarget
            | Packet::BecomeSyncSource
            | Packet::UnplugRemote
            | Packet::Ping
            | Packet::PingAck
            | Packet::InitialMeta
            | Packet::InitialData => 0,
            Packet::DataRequest(_)
            | Packet::RsDataRequest(_)
            | Packet::OvRequest(_)
            | Packet::RsThinReq(_) => l::P_BLOCK_REQ_SIZE,
            Packet::OvReply(d) | Packet::CsumRsRequest(d) => l::P_BLOCK_REQ_SIZE + d.digest.len(),
            Packet::SyncParam(s) | Packet::SyncParam89(s) => s.wire_len(),
            Packet::Protocol(p) | Packet::ProtocolUpdate(p) => {
                if (1..87).contains(&ctx.protocol_version) {
                    l::P_PROTOCOL_SIZE
                } else {
                    l::P_PROTOCOL_SIZE + p.integrity_alg.len() + 1
                }
            }
            Packet::Uuids(_) => l::P_UUIDS_SIZE,
            Packet::Sizes(s) => {
                l::P_SIZES_SIZE
                    + if s.queue_limits.is_some() {
                        l::QUEUE_LIMITS_SIZE
                    } else {
                        0
                    }
            }
            Packet::State(_) | Packet::StateChgReply(_) | Packet::ConnStChgReply(_) => {
                l::P_STATE_SIZE
            }
            Packet::StateChgReq(_) | Packet::ConnStChgReq(_) => l::P_REQ_STATE_SIZE,
            Packet::SyncUuid(_) => l::P_RS_UUID_SIZE,
            Packet::AuthChallenge(b) | Packet::AuthResponse(b) => b.len(),
            Packet::RecvAck(_)
            | Packet::WriteAck(_)
            | Packet::RsWriteAck(_)
            | Packet::Superseded(_)
            | Packet::NegAck(_)
            | Packet::NegDReply(_)
            | Packet::NegRsDReply(_)
            | Packet::OvResult(_)
            | Packet::RsIsInSync(_)
            | Packet::RsCancel(_)
            | Packet::RetryWrite(_) => l::P_BLOCK_ACK_SIZE,
            Packet::DelayProbe(_) => l::P_DELAY_PROBE_SIZE,
            Packet::OutOfSync(_) | Packet::RsDeallocated(_) => l::P_BLOCK_DESC_SIZE,
            Packet::ConnectionFeatures(_) => l::P_FEATURES_SIZE,
        }
    }
}

/// One frame: header kind, volume and packet. The header's command and length follow from
/// the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header format (kept from decoding, so re-encoding gives the same bytes).
    pub kind: HeaderKind,
    /// Volume number (0 for h80/h95 and for connection-wide packets).
    pub volume: u16,
    /// The packet.
    pub packet: Packet,
}

impl Frame {
    /// A frame with the header the kernel would use for this packet under `ctx`
    /// ([`header_kind_for`] the agreed version and the payload length).
    pub fn for_context(ctx: &WireContext, volume: u16, packet: Packet) -> Frame {
        let kind = header_kind_for(ctx.protocol_version, packet.payload_len(ctx));
        Frame {
            kind,
            volume,
            packet,
        }
    }
}
