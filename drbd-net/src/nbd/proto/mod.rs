//! The NBD protocol, server side, without I/O.
//!
//! Everything here works on byte buffers: the tokio server ([`super::NbdServer`]) reads from a
//! socket into a [`bytes::BytesMut`], hands it to these machines, and writes out what they
//! produce. Nothing in this module blocks, sleeps, spawns or touches a socket, so the whole
//! protocol can be driven by tests byte by byte.
//!
//! * [`ServerHandshake`]: the fixed newstyle handshake and option haggling, up to the point
//!   where the client enters the transmission phase (or gives up).
//! * [`RequestDecoder`]: parses and validates transmission-phase requests, including the
//!   payload of writes, and turns every malformed-but-recoverable request into an error
//!   reply instead of a dropped connection.
//! * [`encode_simple_reply`]: the 16-byte simple reply header.
//!
//! Numbers and rules follow the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd repository). Structured replies, metadata contexts, extended
//! headers and TLS are not offered: the client is told `NBD_REP_ERR_UNSUP` and falls back to
//! simple replies, which qemu, libnbd (nbdinfo, nbdcopy, fio's nbd engine) and the kernel
//! client all support.

mod handshake;
mod transmission;

#[cfg(test)]
mod tests;

pub use handshake::{
    ExportCatalog, ExportInfo, ExportListing, HandshakeError, Negotiated, Progress, ServerHandshake,
};
pub use transmission::{
    encode_simple_reply, Command, Decoded, ProtocolError, Request, RequestDecoder, RequestHeader,
    REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN,
};

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`] to announce newstyle negotiation, and
/// by the client in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic number in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic number of a transmission-phase request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic number of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (16 bits, sent by the server after the magic numbers).
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the server can leave out the 124 bytes of padding.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, the client's answer to the handshake flags).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`: no padding after the `NBD_OPT_EXPORT_NAME` reply.
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag a client may set; anything else makes the server drop the connection.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Transmission flags (16 bits, per export).
pub mod transmission_flags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes fail with `EPERM`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`: a scheduling hint (never set by this server).
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF` (structured replies only; never set by this server).
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA on one connection cover all of them.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE` (never set by this server).
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO` (never set by this server).
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission; cannot fail with an error reply.
    pub const EXPORT_NAME: u32 = 1;
    /// Soft disconnect during option haggling.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Withdrawn; answered with `NBD_REP_ERR_UNSUP`.
    pub const PEEK_EXPORT: u32 = 4;
    /// TLS upgrade; answered with `NBD_REP_ERR_UNSUP` (this server runs in NOTLS mode).
    pub const STARTTLS: u32 = 5;
    /// Describe an export without entering transmission.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Structured replies; answered with `NBD_REP_ERR_UNSUP`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// Metadata contexts; answered with `NBD_REP_ERR_UNSUP`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Metadata contexts; answered with `NBD_REP_ERR_UNSUP`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit extended headers; answered with `NBD_REP_ERR_UNSUP`.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    /// Success; final reply.
    pub const ACK: u32 = 1;
    /// One export of an `NBD_OPT_LIST` answer.
    pub const SERVER: u32 = 2;
    /// One piece of information of an `NBD_OPT_INFO` / `NBD_OPT_GO` answer.
    pub const INFO: u32 = 3;
    /// Bit 31: the reply is an error (and final).
    pub const ERROR_BIT: u32 = 1 << 31;
    /// The option is unknown to this server.
    pub const ERR_UNSUP: u32 = ERROR_BIT | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERROR_BIT | 2;
    /// Syntactically or semantically invalid option data.
    pub const ERR_INVALID: u32 = ERROR_BIT | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERROR_BIT | 4;
    /// TLS required first (never sent: NOTLS mode).
    pub const ERR_TLS_REQD: u32 = ERROR_BIT | 5;
    /// The requested export does not exist.
    pub const ERR_UNKNOWN: u32 = ERROR_BIT | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT | 7;
    /// Block size information must be requested first (never sent).
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT | 8;
    /// The request or its reply is too large.
    pub const ERR_TOO_BIG: u32 = ERROR_BIT | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags (mandatory before a successful ACK).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types (`NBD_CMD_*`).
pub mod cmd {
    /// Read `length` bytes at `offset`.
    pub const READ: u16 = 0;
    /// Write the `length` bytes that follow the header.
    pub const WRITE: u16 = 1;
    /// Soft disconnect; no reply.
    pub const DISC: u16 = 2;
    /// Make every completed write durable.
    pub const FLUSH: u16 = 3;
    /// Discard hint.
    pub const TRIM: u16 = 4;
    /// Prefetch hint (not advertised; answered with `EINVAL`).
    pub const CACHE: u16 = 5;
    /// Write zeroes without a payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status (needs structured replies; answered with `EINVAL`).
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: reply only once the command's writes are durable.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_WRITE_ZEROES` must not leave a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment (structured replies only; rejected).
    pub const DF: u16 = 1 << 2;
    /// One extent only (block status only; rejected).
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fast zero (not advertised; rejected).
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers only (rejected).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// The error values of a reply, with the protocol's own numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// `NBD_EPERM`: a write to a read-only export.
    Perm = 1,
    /// `NBD_EIO`: the backend failed.
    Io = 5,
    /// `NBD_ENOMEM`.
    NoMem = 12,
    /// `NBD_EINVAL`: malformed or out-of-range request.
    Inval = 22,
    /// `NBD_ENOSPC`: a write beyond the end, or the backend ran out of space.
    NoSpc = 28,
    /// `NBD_EOVERFLOW`.
    Overflow = 75,
    /// `NBD_ENOTSUP`.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is going away; the client must disconnect.
    Shutdown = 108,
}

impl ErrorCode {
    /// The value on the wire.
    pub fn wire(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, if it is one the protocol defines.
    pub fn from_wire(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::Perm,
            5 => Self::Io,
            12 => Self::NoMem,
            22 => Self::Inval,
            28 => Self::NoSpc,
            75 => Self::Overflow,
            95 => Self::NotSup,
            108 => Self::Shutdown,
            _ => return None,
        })
    }
}

/// Largest `NBD_CMD_READ` / `NBD_CMD_WRITE` length served, advertised as the maximum block
/// size. 32 MiB is the size the protocol tells clients to stay under for maximum
/// interoperability, so every client already splits its I/O below it; it is also what one
/// request may pin in memory.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Minimum block size advertised: any byte is addressable (the backends do
/// read-modify-write themselves where they need to).
pub const MIN_BLOCK_SIZE: u32 = 1;

/// Preferred block size advertised: the page size, below which backends pay for
/// read-modify-write.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Largest oversized write whose payload is still read and thrown away so that the
/// connection survives an `EINVAL` reply. Discarding costs no memory, only bandwidth, but a
/// length this far beyond [`MAX_PAYLOAD`] is far more likely a desynchronised stream than a
/// client's mistake, so the connection is dropped instead.
pub const MAX_DISCARDED_PAYLOAD: u32 = 4 * MAX_PAYLOAD;

/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Largest option payload the handshake buffers. The biggest legitimate one is an
/// `NBD_OPT_GO` with a maximal name (4 + 4096 bytes) and its list of information requests
/// (2 + 2 per request; four types exist): 8 KiB leaves ample room. Longer options are
/// skipped unread and answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 8 << 10;

/// Most options one client may send before the server calls it a denial of service and
/// hangs up. Real clients send fewer than ten (nbdinfo --list about a dozen per export).
pub const MAX_OPTIONS: u32 = 1024;

/// The transmission flags of an export this server offers.
///
/// Flush, FUA, trim and write-zeroes are always offered (a read-only export answers the
/// writing ones with `EPERM`); `multi_conn` must only be true when the backend makes a flush
/// through any connection cover writes completed through every other one.
pub fn export_flags(read_only: bool, multi_conn: bool) -> u16 {
    use transmission_flags::*;
    let mut flags = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES;
    if read_only {
        flags |= READ_ONLY;
    }
    if multi_conn {
        flags |= CAN_MULTI_CONN;
    }
    flags
}
