//! The length limits of every command, and the constants they come from.
//!
//! [`payload_rule`] is what the decoder checks as soon as a header is complete (so an
//! oversized announcement never gets buffered) and what the encoder checks before writing.

use super::command::Command;
use super::error::WireError;
use super::header::HeaderKind;
use super::{WireContext, FF_WSAME};

/// Largest bio DRBD 8.4 replicates (`DRBD_MAX_BIO_SIZE`, 1 MiB): the most data one data
/// packet carries.
pub const MAX_BIO_SIZE: usize = 1 << 20;

/// Largest payload the kernel sends with an h80 header when protocol 95..99 is agreed
/// (`DRBD_MAX_SIZE_H80_PACKET`, 32 KiB); bigger payloads get an h95 header.
pub const MAX_SIZE_H80_PACKET: usize = 1 << 15;

/// Bitmap packets (`P_BITMAP`, `P_COMPRESSED_BITMAP`) must fit into one 4 KiB socket buffer,
/// header included (`DRBD_SOCKET_BUFFER_SIZE`).
pub const BITMAP_PACKET_MAX: usize = 4096;

/// Largest digest of any hash DRBD can be configured with (the kernel's
/// `HASH_MAX_DIGESTSIZE`, SHA-512): bounds the integrity digest of data packets and the
/// digests of `P_OV_REPLY` / `P_CSUM_RS_REQUEST`.
pub const MAX_DIGEST_LEN: usize = 64;

/// Size of the string fields of `P_SYNC_PARAM89` and the longest NUL-terminated string
/// (terminator included) in `P_PROTOCOL` / `P_SYNC_PARAM` (`SHARED_SECRET_MAX`).
pub const SHARED_SECRET_MAX: usize = 64;

/// Shortest cram-hmac challenge DRBD 8.4 accepts (it sends exactly this many bytes).
pub const AUTH_CHALLENGE_MIN: usize = 64;
/// Longest cram-hmac challenge DRBD 8.4 accepts.
pub const AUTH_CHALLENGE_MAX: usize = 128;
/// Longest cram-hmac response: the largest HMAC digest.
pub const AUTH_RESPONSE_MAX: usize = MAX_DIGEST_LEN;

/// `p_data`: sector, block_id, seq_num, dp_flags.
pub const P_DATA_SIZE: usize = 24;
/// `p_trim` / `p_wsame`: `p_data` plus the size covered.
pub const P_TRIM_SIZE: usize = 28;
/// `p_block_ack`.
pub const P_BLOCK_ACK_SIZE: usize = 24;
/// `p_block_req`.
pub const P_BLOCK_REQ_SIZE: usize = 24;
/// `p_block_desc`.
pub const P_BLOCK_DESC_SIZE: usize = 16;
/// `p_barrier` and `p_barrier_ack`.
pub const P_BARRIER_SIZE: usize = 8;
/// `p_connection_features`.
pub const P_FEATURES_SIZE: usize = 72;
/// `p_protocol` without the integrity algorithm string.
pub const P_PROTOCOL_SIZE: usize = 24;
/// `p_uuids`: six u64.
pub const P_UUIDS_SIZE: usize = 48;
/// `p_sizes` without queue limits.
pub const P_SIZES_SIZE: usize = 32;
/// `o_qlim`, appended to `p_sizes` when [`FF_WSAME`] is agreed.
pub const QUEUE_LIMITS_SIZE: usize = 24;
/// `p_rs_param`: the resync rate alone (protocol <= 87).
pub const P_RS_PARAM_SIZE: usize = 4;
/// `p_rs_param_89`: rate and two 64-byte algorithm names (protocol 89..94).
pub const P_RS_PARAM_89_SIZE: usize = 4 + 2 * SHARED_SECRET_MAX;
/// `p_rs_param_95`: `p_rs_param_89` plus the four resync controller values (protocol >= 95).
pub const P_RS_PARAM_95_SIZE: usize = P_RS_PARAM_89_SIZE + 16;
/// `p_state` / `p_req_state_reply`.
pub const P_STATE_SIZE: usize = 4;
/// `p_req_state`: mask and value.
pub const P_REQ_STATE_SIZE: usize = 8;
/// `p_rs_uuid`.
pub const P_RS_UUID_SIZE: usize = 8;
/// `p_delay_probe93`.
pub const P_DELAY_PROBE_SIZE: usize = 8;

/// The payload length rule of one command under one context and header kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadRule {
    /// Exactly this many bytes.
    Exact(usize),
    /// Any length in `min..=max`.
    Range {
        /// Smallest length.
        min: usize,
        /// Largest length.
        max: usize,
    },
    /// The sync parameter packets: 4 bytes, 4 + a NUL-terminated string of at most
    /// [`SHARED_SECRET_MAX`] bytes, [`P_RS_PARAM_89_SIZE`] or [`P_RS_PARAM_95_SIZE`].
    SyncParam,
}

impl PayloadRule {
    /// Smallest legal length.
    pub fn min(self) -> usize {
        match self {
            PayloadRule::Exact(n) => n,
            PayloadRule::Range { min, .. } => min,
            PayloadRule::SyncParam => P_RS_PARAM_SIZE,
        }
    }

    /// Largest legal length.
    pub fn max(self) -> usize {
        match self {
            PayloadRule::Exact(n) => n,
            PayloadRule::Range { max, .. } => max,
            PayloadRule::SyncParam => P_RS_PARAM_95_SIZE,
        }
    }

    /// Checks a payload length against the rule.
    pub fn check(self, command: Command, length: usize) -> Result<(), WireError> {
        if length > self.max() {
            return Err(WireError::TooLong {
                command,
                length,
                max: self.max(),
            });
        }
        if length < self.min() {
            return Err(WireError::TooShort {
                command,
                length,
                min: self.min(),
            });
        }
        if self == PayloadRule::SyncParam
            && length > P_RS_PARAM_SIZE + SHARED_SECRET_MAX
            && length != P_RS_PARAM_89_SIZE
            && length != P_RS_PARAM_95_SIZE
        {
            return Err(WireError::bad(
                command,
                format!(
                    "length {length} is none of the sync parameter layouts (4, 5..=68, \
                     {P_RS_PARAM_89_SIZE} or {P_RS_PARAM_95_SIZE} bytes)"
                ),
            ));
        }
        Ok(())
    }
}

/// The payload length rule of `command`.
///
/// Depends on the context (integrity digest length, `FF_WSAME`, protocol version for
/// `P_PROTOCOL`) and on the header size (bitmap packets must fit into 4 KiB with the header).
/// Fails only for an unusable context (digest length above [`MAX_DIGEST_LEN`]).
pub fn payload_rule(
    command: Command,
    ctx: &WireContext,
    kind: HeaderKind,
) -> Result<PayloadRule, WireError> {
    use Command as C;
    let digest = ctx.integrity_digest_len;
    if digest > MAX_DIGEST_LEN {
        return Err(WireError::DigestLenTooLarge {
            len: digest,
            max: MAX_DIGEST_LEN,
        });
    }
    let bitmap_max = BITMAP_PACKET_MAX - kind.size();
    Ok(match command {
        C::Data | C::DataReply | C::RsDataReply => PayloadRule::Range {
            min: P_DATA_SIZE + digest,
            max: P_DATA_SIZE + digest + MAX_BIO_SIZE,
        },
        C::Wsame => PayloadRule::Range {
            min: P_TRIM_SIZE + digest + 512,
            max: P_TRIM_SIZE + digest + MAX_BIO_SIZE,
        },
        C::Trim | C::Zeroes => PayloadRule::Exact(P_TRIM_SIZE),
        C::Barrier | C::BarrierAck => PayloadRule::Exact(P_BARRIER_SIZE),
        C::Bitmap => PayloadRule::Range {
            min: 0,
            max: bitmap_max,
        },
        C::CompressedBitmap => PayloadRule::Range {
            min: 2,
            max: bitmap_max,
        },
        C::BecomeSyncTarget
        | C::BecomeSyncSource
        | C::UnplugRemote
        | C::Ping
        | C::PingAck
        | C::InitialMeta
        | C::InitialData => PayloadRule::Exact(0),
        C::DataRequest | C::RsDataRequest | C::OvRequest | C::RsThinReq => {
            PayloadRule::Exact(P_BLOCK_REQ_SIZE)
        }
        C::OvReply | C::CsumRsRequest => PayloadRule::Range {
            min: P_BLOCK_REQ_SIZE,
            max: P_BLOCK_REQ_SIZE + MAX_DIGEST_LEN,
        },
        C::SyncParam | C::SyncParam89 => PayloadRule::SyncParam,
        C::Protocol | C::ProtocolUpdate => {
            if (1..87).contains(&ctx.protocol_version) {
                PayloadRule::Exact(P_PROTOCOL_SIZE)
            } else {
                PayloadRule::Range {
                    min: P_PROTOCOL_SIZE + 1,
                    max: P_PROTOCOL_SIZE + SHARED_SECRET_MAX,
                }
            }
        }
        C::Uuids => PayloadRule::Exact(P_UUIDS_SIZE),
        C::Sizes => {
            if ctx.features & FF_WSAME != 0 {
                PayloadRule::Exact(P_SIZES_SIZE + QUEUE_LIMITS_SIZE)
            } else {
                PayloadRule::Exact(P_SIZES_SIZE)
            }
        }
        C::State | C::StateChgReply | C::ConnStChgReply => PayloadRule::Exact(P_STATE_SIZE),
        C::StateChgReq | C::ConnStChgReq => PayloadRule::Exact(P_REQ_STATE_SIZE),
        C::SyncUuid => PayloadRule::Exact(P_RS_UUID_SIZE),
        C::AuthChallenge => PayloadRule::Range {
            min: AUTH_CHALLENGE_MIN,
            max: AUTH_CHALLENGE_MAX,
        },
        C::AuthResponse => PayloadRule::Range {
            min: 0,
            max: AUTH_RESPONSE_MAX,
        },
        C::RecvAck
        | C::WriteAck
        | C::RsWriteAck
        | C::Superseded
        | C::NegAck
        | C::NegDReply
        | C::NegRsDReply
        | C::OvResult
        | C::RsIsInSync
        | C::RsCancel
        | C::RetryWrite => PayloadRule::Exact(P_BLOCK_ACK_SIZE),
        C::DelayProbe => PayloadRule::Exact(P_DELAY_PROBE_SIZE),
        C::OutOfSync | C::RsDeallocated => PayloadRule::Exact(P_BLOCK_DESC_SIZE),
        C::ConnectionFeatures => PayloadRule::Exact(P_FEATURES_SIZE),
    })
}
