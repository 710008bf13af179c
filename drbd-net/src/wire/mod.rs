//! The DRBD 8.4 wire codec: frame headers, every packet of the two-node protocol, and the
//! run-length bitmap encoding.
//!
//! A frame is a header ([`Header`]: h80, h95 or h100, see [`HeaderKind`]) followed by the
//! payload of one [`Command`]. [`encode`] writes a [`Frame`]; a [`Decoder`] takes whole frames
//! off the front of a receive buffer as they become complete. What the codec needs to know
//! about the connection (digest length of the data-integrity algorithm, agreed feature flags
//! and protocol version) is a [`WireContext`], updated by the handshake as it progresses.
//!
//! Rules the codec keeps:
//!
//! * Integers are big-endian, except the opaque handles `block_id` ([`BlockId`]) and barrier
//!   numbers, which are kept as the bytes received so that echoing them back and re-encoding a
//!   decoded frame reproduce the exact input bytes. Every field of every packet, pads and
//!   reserved bytes included, is kept, so `decode` followed by `encode` is the identity on
//!   the bytes of every frame the decoder accepts.
//! * Bulk payloads (data blocks, digests, bitmap words, compressed bitmap code, auth
//!   challenges) are [`Bytes`](bytes::Bytes) sliced from the receive buffer, not copied.
//! * Every command has a length rule (exact size, or a bounded range; see [`limits`]); a
//!   header announcing a length outside it is rejected as soon as the header is complete,
//!   before any of the payload is buffered, so a peer cannot make the decoder wait for or
//!   allocate more than the largest legal packet.
//! * Nothing the peer sends can make the decoder panic; every rejection is a [`WireError`]
//!   that names the command and what was wrong.
//!
//! [`bitmap`] holds the RLE/VLI bitmap code (`P_COMPRESSED_BITMAP`) and the plain/compressed
//! chunking of the bitmap exchange, as pure functions over an in-memory bitmap.

#![warn(missing_docs)]

pub mod bitmap;
mod codec;
mod command;
mod digest;
mod error;
mod header;
pub mod limits;
mod packet;
/// Invariant checks that panic on a broken invariant: the oracle of the `decode` fuzz target
/// and of the seed-corpus test. Not part of the codec proper, so only compiled for tests and
/// with the `selfcheck` feature (which the fuzz crate and this package's own tests enable).
#[cfg(any(test, feature = "selfcheck"))]
pub mod selfcheck;
mod state;

#[cfg(test)]
mod tests;

pub use codec::{encode, encode_head, Decoder};
pub use command::Command;
pub use digest::integrity_digest_len;
pub use error::WireError;
pub use header::{header_kind_for, Header, HeaderKind};
pub use packet::{
    Barrier, BarrierAck, Bitmap, BlockAck, BlockDesc, BlockId, BlockRequest, CompressedBitmap,
    ConnectionFeatures, DataPacket, DelayProbe, DigestRequest, Frame, Packet, Protocol,
    ProtocolPacket, QueueLimits, ReqState, Sizes, StateReply, SyncParam, SyncUuid, Trim, Uuids,
    Wsame, ID_IN_SYNC, ID_OUT_OF_SYNC, ID_SYNCER,
};
pub use state::{ConnState, DiskState, Role, State};

/// Magic of the 8-byte h80 header (`DRBD_MAGIC`), the first four bytes of the frame.
pub const MAGIC_80: u32 = 0x8374_0267;
/// Magic of the 8-byte h95 "big" header (`DRBD_MAGIC_BIG`), a 16-bit value.
pub const MAGIC_95: u16 = 0x835a;
/// Magic of the 16-byte h100 header (`DRBD_MAGIC_100`).
pub const MAGIC_100: u32 = 0x8620_ec20;

/// Feature flag: TRIM/discard on the wire (`P_TRIM`).
pub const FF_TRIM: u32 = 1;
/// Feature flag: thin resync (`P_RS_THIN_REQ`, `P_RS_DEALLOCATED`).
pub const FF_THIN_RESYNC: u32 = 2;
/// Feature flag: write-same (`P_WSAME`); also means `P_SIZES` carries the queue limits.
pub const FF_WSAME: u32 = 4;
/// Feature flag: write-zeroes (`P_ZEROES`).
pub const FF_WZEROES: u32 = 8;

/// `dp_flags`: obsolete hard barrier.
pub const DP_HARDBARRIER: u32 = 1;
/// `dp_flags`: synchronous request (REQ_SYNC).
pub const DP_RW_SYNC: u32 = 2;
/// `dp_flags`: the receiver may mark the block in sync (write during resync).
pub const DP_MAY_SET_IN_SYNC: u32 = 4;
/// `dp_flags`: unplug hint (unused since 8.4).
pub const DP_UNPLUG: u32 = 8;
/// `dp_flags`: forced unit access.
pub const DP_FUA: u32 = 16;
/// `dp_flags`: flush before the write.
pub const DP_FLUSH: u32 = 32;
/// `dp_flags`: discard.
pub const DP_DISCARD: u32 = 64;
/// `dp_flags`: protocol B write, answer with `P_RECV_ACK`.
pub const DP_SEND_RECEIVE_ACK: u32 = 128;
/// `dp_flags`: protocol C write, answer with `P_WRITE_ACK`.
pub const DP_SEND_WRITE_ACK: u32 = 256;
/// `dp_flags`: write-same.
pub const DP_WSAME: u32 = 512;
/// `dp_flags`: write-zeroes.
pub const DP_ZEROES: u32 = 1024;

/// `P_PROTOCOL` `conn_flags`: the sender discards its data in the split-brain decision.
pub const CF_DISCARD_MY_DATA: u32 = 1;
/// `P_PROTOCOL` `conn_flags`: dry-run connect.
pub const CF_DRY_RUN: u32 = 2;

/// What the codec must know about the connection, set by the handshake as it progresses.
///
/// The default (all zero) is the state before feature negotiation: no integrity digest, no
/// features, protocol version not yet agreed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WireContext {
    /// Digest length in bytes of the agreed data-integrity algorithm (0 = none). Data packets
    /// (`P_DATA`, `P_DATA_REPLY`, `P_RS_DATA_REPLY`, `P_WSAME`) carry a digest this long
    /// after their sub-header. At most [`limits::MAX_DIGEST_LEN`].
    pub integrity_digest_len: usize,
    /// The agreed `FF_*` feature flags (both sides' flags ANDed). With [`FF_WSAME`],
    /// `P_SIZES` carries the 24-byte queue limits (56 bytes instead of 32).
    pub features: u32,
    /// The agreed protocol version; 0 = not yet negotiated. Decides whether `P_PROTOCOL`
    /// carries the integrity algorithm string (absent below 87) and which header
    /// [`header_kind_for`] picks.
    pub protocol_version: u32,
    /// The agreed data-integrity algorithm, when this side computes and verifies its
    /// digests (its length is `integrity_digest_len`).
    pub integrity: Option<drbd_core::replication::digest::DigestAlg>,
}
