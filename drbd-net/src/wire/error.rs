//! The error type of the wire codec.

use thiserror::Error;

use super::command::Command;
use super::header::HeaderKind;

/// Everything the codec rejects, on decode (peer input) and on encode (frames we build).
///
/// After a decode error the byte stream cannot be resynchronised: DRBD treats every one of
/// these as a protocol error and drops the connection, and so should the caller.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The first four bytes of a frame are none of the three header magics.
    #[error(
        "bad magic {found:#010x} at the start of a frame header (expected h80 0x83740267, \
         h95 0x835a or h100 0x8620ec20)"
    )]
    BadMagic {
        /// The first four bytes of the would-be header, big-endian.
        found: u32,
    },

    /// The header names a command this codec does not know (DRBD 9-only commands included:
    /// an 8.4 peer treats them as protocol errors too).
    #[error("unknown command {0:#06x} in the frame header")]
    UnknownCommand(u16),

    /// The payload length is above the command's limit (or, on encode, above what the
    /// header's length field can express).
    #[error("{command} payload of {length} bytes is longer than its limit of {max} bytes")]
    TooLong {
        /// The command.
        command: Command,
        /// The payload length announced (decode) or produced (encode).
        length: usize,
        /// The largest length allowed.
        max: usize,
    },

    /// The payload length is below the command's minimum.
    #[error("{command} payload of {length} bytes is shorter than its minimum of {min} bytes")]
    TooShort {
        /// The command.
        command: Command,
        /// The payload length announced (decode) or produced (encode).
        length: usize,
        /// The smallest length allowed.
        min: usize,
    },

    /// The payload has a legal length but its content is malformed, or (on encode) the
    /// packet cannot be represented on the wire.
    #[error("malformed {command} payload: {reason}")]
    BadPayload {
        /// The command.
        command: Command,
        /// What is wrong, and where in the payload.
        reason: String,
    },

    /// The pad field of an h100 header (bytes 12..16) is not zero; DRBD rejects such headers.
    #[error("the pad field of an h100 header (header bytes 12..16) is not zero")]
    NonZeroPad,

    /// Encode only: h80 and h95 headers have no volume field, so a frame for volume other
    /// than 0 needs an h100 header.
    #[error("volume {volume} cannot be sent with an {kind:?} header (it has no volume field)")]
    VolumeNotRepresentable {
        /// The header kind of the frame.
        kind: HeaderKind,
        /// The volume of the frame.
        volume: u16,
    },

    /// The [`WireContext`](super::WireContext) is not usable: its integrity digest length is
    /// larger than any digest DRBD uses.
    #[error("integrity digest length {len} in the wire context is above the limit of {max}")]
    DigestLenTooLarge {
        /// The digest length in the context.
        len: usize,
        /// [`MAX_DIGEST_LEN`](super::limits::MAX_DIGEST_LEN).
        max: usize,
    },
}

impl WireError {
    /// Shorthand for [`WireError::BadPayload`].
    pub(crate) fn bad(command: Command, reason: impl Into<String>) -> WireError {
        WireError::BadPayload {
            command,
            reason: reason.into(),
        }
    }
}
