//! The messages two replicating nodes exchange after the connection handshake, as the core
//! sees them: one variant per 8.4 packet the replication machine sends or handles, with the
//! fields it uses. The wire layer (`drbd-net`) maps each variant to exactly one packet (or, for
//! [`PeerMsg::Bitmap`], to the sequence of `P_BITMAP` / `P_COMPRESSED_BITMAP` packets that
//! carries one bitmap) and back, so the core never sees bytes and the simulation can pass
//! messages directly.

use bytes::Bytes;

use crate::state::{ConnState, DiskState, Role};
use crate::uuid::UuidInfo;

/// `DP_*` flags of data packets (`p_data.dp_flags`).
pub mod dp {
    /// Synchronous request (`REQ_SYNC`).
    pub const RW_SYNC: u32 = 2;
    /// The write may clear bits of the bitmap on both sides (resync running).
    pub const MAY_SET_IN_SYNC: u32 = 4;
    /// Forced unit access: durable when acknowledged.
    pub const FUA: u32 = 16;
    /// Flush the volatile cache before the write.
    pub const FLUSH: u32 = 32;
    /// A discard (`P_TRIM`).
    pub const DISCARD: u32 = 64;
    /// Protocol B: answer with `P_RECV_ACK` on receipt.
    pub const SEND_RECEIVE_ACK: u32 = 128;
    /// Protocol C: answer with `P_WRITE_ACK` when written.
    pub const SEND_WRITE_ACK: u32 = 256;
    /// Zero the range (`P_ZEROES`, or `P_TRIM` with [`DISCARD`]).
    pub const ZEROES: u32 = 1024;
}

/// `block_id` of resync and verify requests (`ID_SYNCER`).
pub const ID_SYNCER: u64 = u64::MAX;
/// `block_id` of a `P_OV_RESULT` for a block found identical.
pub const ID_IN_SYNC: u64 = 4711;
/// `block_id` of a `P_OV_RESULT` for a block found different.
pub const ID_OUT_OF_SYNC: u64 = 4712;

/// Which of the two TCP sockets a message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// Data packets, requests, state and bitmaps.
    Data,
    /// Acknowledgements.
    Meta,
}

/// The state word as sent in `P_STATE`: the sender's own view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    /// The sender's role.
    pub role: Role,
    /// The sender's view of our role.
    pub peer_role: Role,
    /// The sender's connection state.
    pub conn: ConnState,
    /// The sender's disk state.
    pub disk: DiskState,
    /// The sender's view of our disk state.
    pub peer_disk: DiskState,
    /// The sender's user-requested sync pause (`user_isp`).
    pub user_isp: bool,
}

/// What the handshake exchanged about one volume, as the core needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHello {
    /// The agreed protocol version.
    pub protocol_version: u32,
    /// The agreed feature flags.
    pub features: u32,
    /// This node holds `RESOLVE_CONFLICTS` (it accepted the meta socket).
    pub resolve_conflicts: bool,
    /// The peer's `P_UUIDS`.
    pub uuids: UuidInfo,
    /// The peer's `P_STATE`.
    pub state: PeerState,
    /// The peer's backing device size in sectors (`p_sizes.d_size`).
    pub disk_sectors: u64,
    /// The peer's configured size in sectors (`u_size`, 0 = none).
    pub user_sectors: u64,
    /// The peer's exposed size in sectors (`c_size`).
    pub current_sectors: u64,
    /// The peer asked to discard its own data (`CF_DISCARD_MY_DATA` in `P_PROTOCOL`).
    pub discard_my_data: bool,
}

/// Resync settings a peer announces (`P_SYNC_PARAM*`), adopted when they change while
/// connected (8.4 `receive_SyncParam`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSettings {
    /// resync-rate (KiB/s).
    pub rate_kib: u32,
    /// c-plan-ahead (0.1 s), c-delay-target (0.1 s), c-fill-target (sectors), c-max-rate
    /// (KiB/s): present from protocol 95 on.
    pub controller: Option<[u32; 4]>,
    pub verify_alg: String,
    pub csums_alg: String,
}

/// Connection settings a peer changed while connected (`P_PROTOCOL_UPDATE`), adopted as
/// they come (8.4 `receive_protocol`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolSettings {
    /// 1 = A, 2 = B, 3 = C.
    pub wire_protocol: u32,
    /// after-sb-0pri, -1pri, -2pri in this node's view (the peer's discard-local is our
    /// discard-remote).
    pub after_sb: [u32; 3],
    pub two_primaries: bool,
    pub integrity_alg: String,
}

/// One message between peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMsg {
    /// `P_DATA`: an application write. Empty `data` with [`dp::FLUSH`] is an empty flush.
    Data {
        sector: u64,
        block_id: u64,
        seq: u32,
        flags: u32,
        data: Bytes,
    },
    /// `P_TRIM` (flags hold [`dp::DISCARD`]) or `P_ZEROES` (flags hold [`dp::ZEROES`]).
    Trim {
        sector: u64,
        block_id: u64,
        seq: u32,
        flags: u32,
        size: u32,
    },
    /// `P_BARRIER`: all writes of epoch `nr` were sent.
    Barrier { nr: u32 },
    /// `P_BARRIER_ACK`: epoch `nr` with `set_size` writes is on stable storage.
    BarrierAck { nr: u32, set_size: u32 },
    /// `P_RECV_ACK` (protocol B).
    RecvAck(Ack),
    /// `P_WRITE_ACK` (protocol C).
    WriteAck(Ack),
    /// `P_RS_WRITE_ACK`: a resync (or in-sync setting) write is done; clear the bits.
    RsWriteAck(Ack),
    /// `P_NEG_ACK`: the peer could not write.
    NegAck(Ack),
    /// `P_SUPERSEDED` (allow-two-primaries): the peer did not apply our write because a
    /// concurrent write of its own covers it and reaches us too; the write is done.
    Superseded(Ack),
    /// `P_RETRY_WRITE` (allow-two-primaries, apv >= 100): the peer did not apply our write
    /// because it conflicts with a concurrent write of its own; send it again once the
    /// peer's write has been applied here.
    RetryWrite(Ack),
    /// `P_DATA_REQUEST`: read for an application request on a node without good local data.
    DataRequest(BlockReq),
    /// `P_DATA_REPLY`.
    DataReply {
        sector: u64,
        block_id: u64,
        data: Bytes,
    },
    /// `P_NEG_DREPLY`: the read failed.
    NegDReply(Ack),
    /// `P_RS_DATA_REQUEST`: the SyncTarget asks for a block.
    RsDataRequest(BlockReq),
    /// `P_RS_DATA_REPLY`.
    RsDataReply {
        sector: u64,
        block_id: u64,
        data: Bytes,
    },
    /// `P_NEG_RS_DREPLY`: the SyncSource could not read the block.
    NegRsDReply(Ack),
    /// `P_OV_REQUEST`: online verify asks for the digest of a block.
    OvRequest(BlockReq),
    /// `P_OV_REPLY`: the digest (verify-alg) of the requested block.
    OvReply {
        sector: u64,
        block_id: u64,
        size: u32,
        digest: Bytes,
    },
    /// `P_OV_RESULT`: the verdict on a block (`block_id` [`ID_IN_SYNC`] or
    /// [`ID_OUT_OF_SYNC`]).
    OvResult(Ack),
    /// `P_CSUM_RS_REQUEST`: checksum-based resync; the SyncTarget's digest (csums-alg) of
    /// the block it asks for.
    CsumRsRequest {
        sector: u64,
        block_id: u64,
        size: u32,
        digest: Bytes,
    },
    /// `P_RS_IS_IN_SYNC`: the SyncSource found the same digest; the block is in sync.
    RsIsInSync(Ack),
    /// `P_SYNC_PARAM` / `P_SYNC_PARAM89` after the handshake.
    SyncParam(SyncSettings),
    /// `P_PROTOCOL_UPDATE`.
    ProtocolUpdate(ProtocolSettings),
    /// `P_OUT_OF_SYNC`: mark the range out of sync.
    OutOfSync { sector: u64, size: u32 },
    /// `P_UUIDS` after the handshake (new current UUID, skip initial sync).
    Uuids(UuidInfo),
    /// `P_SYNC_UUID`: the SyncSource's new bitmap UUID; the target starts.
    SyncUuid(u64),
    /// `P_STATE`.
    State(PeerState),
    /// One whole bitmap, as a sequence of `P_BITMAP` / `P_COMPRESSED_BITMAP` packets on the
    /// wire: 64-bit words, bit `i` of the device is bit `i % 64` of word `i / 64`.
    Bitmap(Vec<u64>),
    /// `P_STATE_CHG_REQ` (or `P_CONN_ST_CHG_REQ` with `connection`): the peer asks to change
    /// the fields in `mask` to `val` (raw state words, in the sender's view).
    StateChgReq {
        mask: u32,
        val: u32,
        connection: bool,
    },
    /// `P_STATE_CHG_REPLY` (or `P_CONN_ST_CHG_REPLY`): 1 granted, negative refused
    /// (`enum drbd_state_rv`).
    StateChgReply { retcode: i32, connection: bool },
    /// `P_PING` sent by the device as a barrier on the meta socket: its `P_PING_ACK` proves
    /// that the peer processed everything sent on the meta socket before it. (Keep-alive
    /// pings are the transport's business and never reach the device.)
    Ping,
    /// `P_PING_ACK` of the device's own [`PeerMsg::Ping`].
    PingAck,
}

/// Fields of a raw 8.4 state word (`P_STATE`, `P_STATE_CHG_REQ`).
pub mod state_word {
    /// Role (bits 0-1).
    pub const ROLE: (u32, u32) = (0, 2);
    /// The peer's role (bits 2-3).
    pub const PEER: (u32, u32) = (2, 2);
    /// Connection state (bits 4-8).
    pub const CONN: (u32, u32) = (4, 5);
    /// Disk state (bits 9-12).
    pub const DISK: (u32, u32) = (9, 4);
    /// The peer's disk state (bits 13-16).
    pub const PDSK: (u32, u32) = (13, 4);

    /// The value of `field` in `word`.
    pub fn get(word: u32, field: (u32, u32)) -> u32 {
        (word >> field.0) & ((1 << field.1) - 1)
    }

    /// Whether `mask` selects `field`.
    pub fn selects(mask: u32, field: (u32, u32)) -> bool {
        get(mask, field) != 0
    }
}

/// `p_block_ack` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub sector: u64,
    pub block_id: u64,
    pub size: u32,
    pub seq: u32,
}

/// `p_block_req` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockReq {
    pub sector: u64,
    pub block_id: u64,
    pub size: u32,
}

/// The 4 KiB pages a receiver holds for a peer write with `payload` bytes (`max-buffers`
/// counts these): its payload's pages, and at least one for any write, discards and zeroes
/// included.
pub fn write_pages(payload: usize) -> u64 {
    (payload as u64).div_ceil(4096).max(1)
}

impl PeerMsg {
    /// The socket DRBD sends this message on.
    pub fn socket(&self) -> Socket {
        match self {
            PeerMsg::BarrierAck { .. }
            | PeerMsg::RecvAck(_)
            | PeerMsg::WriteAck(_)
            | PeerMsg::RsWriteAck(_)
            | PeerMsg::NegAck(_)
            | PeerMsg::Superseded(_)
            | PeerMsg::RetryWrite(_)
            | PeerMsg::OvResult(_)
            | PeerMsg::RsIsInSync(_)
            | PeerMsg::NegDReply(_)
            | PeerMsg::NegRsDReply(_)
            | PeerMsg::StateChgReply { .. }
            | PeerMsg::Ping
            | PeerMsg::PingAck => Socket::Meta,
            _ => Socket::Data,
        }
    }

    /// The 4 KiB pages a receiver holds for this message until its write is done
    /// (`max-buffers` counts these): a write's payload, at least one page for any write
    /// (discards and zeroes included), none for anything else.
    pub fn held_pages(&self) -> u64 {
        match self {
            PeerMsg::Data { data, .. } | PeerMsg::RsDataReply { data, .. } => {
                write_pages(data.len())
            }
            PeerMsg::Trim { .. } => write_pages(0),
            _ => 0,
        }
    }

    /// A short name for logs and errors (the 8.4 packet name).
    pub fn name(&self) -> &'static str {
        match self {
            PeerMsg::Data { .. } => "P_DATA",
            PeerMsg::Trim { flags, .. } if flags & dp::DISCARD == 0 => "P_ZEROES",
            PeerMsg::Trim { .. } => "P_TRIM",
            PeerMsg::Barrier { .. } => "P_BARRIER",
            PeerMsg::BarrierAck { .. } => "P_BARRIER_ACK",
            PeerMsg::RecvAck(_) => "P_RECV_ACK",
            PeerMsg::WriteAck(_) => "P_WRITE_ACK",
            PeerMsg::RsWriteAck(_) => "P_RS_WRITE_ACK",
            PeerMsg::NegAck(_) => "P_NEG_ACK",
            PeerMsg::Superseded(_) => "P_SUPERSEDED",
            PeerMsg::RetryWrite(_) => "P_RETRY_WRITE",
            PeerMsg::OvRequest(_) => "P_OV_REQUEST",
            PeerMsg::OvReply { .. } => "P_OV_REPLY",
            PeerMsg::OvResult(_) => "P_OV_RESULT",
            PeerMsg::CsumRsRequest { .. } => "P_CSUM_RS_REQUEST",
            PeerMsg::RsIsInSync(_) => "P_RS_IS_IN_SYNC",
            PeerMsg::SyncParam(_) => "P_SYNC_PARAM89",
            PeerMsg::ProtocolUpdate(_) => "P_PROTOCOL_UPDATE",
            PeerMsg::DataRequest(_) => "P_DATA_REQUEST",
            PeerMsg::DataReply { .. } => "P_DATA_REPLY",
            PeerMsg::NegDReply(_) => "P_NEG_DREPLY",
            PeerMsg::RsDataRequest(_) => "P_RS_DATA_REQUEST",
            PeerMsg::RsDataReply { .. } => "P_RS_DATA_REPLY",
            PeerMsg::NegRsDReply(_) => "P_NEG_RS_DREPLY",
            PeerMsg::OutOfSync { .. } => "P_OUT_OF_SYNC",
            PeerMsg::Uuids(_) => "P_UUIDS",
            PeerMsg::SyncUuid(_) => "P_SYNC_UUID",
            PeerMsg::State(_) => "P_STATE",
            PeerMsg::Bitmap(_) => "P_BITMAP",
            PeerMsg::StateChgReq {
                connection: false, ..
            } => "P_STATE_CHG_REQ",
            PeerMsg::StateChgReq { .. } => "P_CONN_ST_CHG_REQ",
            PeerMsg::StateChgReply {
                connection: false, ..
            } => "P_STATE_CHG_REPLY",
            PeerMsg::StateChgReply { .. } => "P_CONN_ST_CHG_REPLY",
            PeerMsg::Ping => "P_PING",
            PeerMsg::PingAck => "P_PING_ACK",
        }
    }
}
