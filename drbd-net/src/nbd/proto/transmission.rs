//! Transmission phase: request parsing and validation, simple replies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    cmd, cmd_flags, transmission_flags, ErrorCode, MAX_DISCARDED_PAYLOAD, MAX_PAYLOAD,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Length of a request header: magic, flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A request header as it is on the wire, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Request type (`NBD_CMD_*`).
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (for a write, also the length of the payload that follows).
    pub length: u32,
}

impl RequestHeader {
    /// Parse the fixed part of a request; only the magic number is checked here.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut bytes = &bytes[..];
        let magic = bytes.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        Ok(Self {
            flags: bytes.get_u16(),
            kind: bytes.get_u16(),
            cookie: bytes.get_u64(),
            offset: bytes.get_u64(),
            length: bytes.get_u32(),
        })
    }

    /// Append the header in wire format (what a client sends; used by tests and tools).
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(REQUEST_HEADER_LEN);
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// A validated request for the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length in bytes, at most [`MAX_PAYLOAD`].
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload, at most [`MAX_PAYLOAD`] bytes.
        data: Bytes,
        /// Reply only once the data is durable.
        fua: bool,
    },
    /// Make every write completed so far durable.
    Flush,
    /// Discard hint for `len` bytes at `offset`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
        /// Reply only once the discard is durable.
        fua: bool,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u32,
        /// The backend may punch a hole (the client did not set `NBD_CMD_FLAG_NO_HOLE`).
        may_trim: bool,
        /// Reply only once the zeroes are durable.
        fua: bool,
    },
}

/// A validated request and the handle to answer it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's handle.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
}

impl Request {
    /// Payload bytes this request holds in memory while it is in flight: the write data, or
    /// the read data it will produce.
    pub fn payload_len(&self) -> u32 {
        match &self.command {
            Command::Read { len, .. } => *len,
            // At most MAX_PAYLOAD, checked by the decoder.
            Command::Write { data, .. } => data.len() as u32,
            _ => 0,
        }
    }
}

/// One item of the request stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A valid request for the backend.
    Request(Request),
    /// A request the server refuses without touching the backend: answer with this error
    /// and carry on (any write payload has already been consumed).
    Reject {
        /// The client's handle.
        cookie: u64,
        /// The error to reply with.
        error: ErrorCode,
        /// Why, for the log.
        reason: &'static str,
    },
    /// `NBD_CMD_DISC`: finish the requests in flight, then close. No reply.
    Disconnect,
}

/// A request stream the server cannot resynchronise with: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The header did not start with `NBD_REQUEST_MAGIC`.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadMagic(u32),
    /// A write announced more payload than the server is willing to even skip.
    #[error("write of {0} bytes (limit {MAX_DISCARDED_PAYLOAD} even to discard)")]
    PayloadTooLarge(u32),
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload {
        header: RequestHeader,
    },
    Discard {
        cookie: u64,
        remaining: usize,
        error: ErrorCode,
        reason: &'static str,
    },
    Disconnected,
}

/// Parses the client's request stream and checks every request against the export.
///
/// Errors a client can recover from (bad flags, out-of-range offsets, oversized or
/// forbidden writes, unknown commands) become [`Decoded::Reject`]; only a stream that
/// cannot be followed any more is a [`ProtocolError`].
#[derive(Debug)]
pub struct RequestDecoder {
    size: u64,
    read_only: bool,
    state: State,
}

impl RequestDecoder {
    /// A decoder for an export of `size` bytes with the transmission `flags` the client was
    /// given.
    pub fn new(size: u64, flags: u16) -> Self {
        Self {
            size,
            read_only: flags & transmission_flags::READ_ONLY != 0,
            state: State::Header,
        }
    }

    /// How many more bytes the item being decoded needs at least (a hint for reading).
    pub fn bytes_wanted(&self, buffered: usize) -> usize {
        let total = match self.state {
            State::Header => REQUEST_HEADER_LEN,
            State::Payload { header } => header.length as usize,
            State::Discard { remaining, .. } => remaining,
            State::Disconnected => 0,
        };
        total.saturating_sub(buffered)
    }

    /// Decode the next item from `input`, consuming its bytes; `None` when more input is
    /// needed (or after [`Decoded::Disconnect`], when nothing more is read).
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Decoded>, ProtocolError> {
        loop {
            match self.state {
                State::Disconnected => return Ok(None),
                State::Header => {
                    let Some(bytes) = input
                        .get(..REQUEST_HEADER_LEN)
                        .and_then(|b| <&[u8; REQUEST_HEADER_LEN]>::try_from(b).ok())
                    else {
                        return Ok(None);
                    };
                    let header = RequestHeader::parse(bytes)?;
                    input.advance(REQUEST_HEADER_LEN);
                    if let Some(item) = self.header(header)? {
                        return Ok(Some(item));
                    }
                }
                State::Payload { header } => {
                    let len = header.length as usize;
                    if input.len() < len {
                        return Ok(None);
                    }
                    let data = input.split_to(len).freeze();
                    self.state = State::Header;
                    return Ok(Some(Decoded::Request(Request {
                        cookie: header.cookie,
                        command: Command::Write {
                            offset: header.offset,
                            data,
                            fua: header.flags & cmd_flags::FUA != 0,
                        },
                    })));
                }
                State::Discard {
                    cookie,
                    remaining,
                    error,
                    reason,
                } => {
                    let n = remaining.min(input.len());
                    input.advance(n);
                    if n < remaining {
                        self.state = State::Discard {
                            cookie,
                            remaining: remaining - n,
                            error,
                            reason,
                        };
                        return Ok(None);
                    }
                    self.state = State::Header;
                    return Ok(Some(Decoded::Reject {
                        cookie,
                        error,
                        reason,
                    }));
                }
            }
        }
    }

    /// Validate a complete header. `None`: a write payload follows (state updated).
    fn header(&mut self, h: RequestHeader) -> Result<Option<Decoded>, ProtocolError> {
        let reject = |error, reason| {
            Some(Decoded::Reject {
                cookie: h.cookie,
                error,
                reason,
            })
        };
        let fua = h.flags & cmd_flags::FUA != 0;
        let allowed_flags = match h.kind {
            cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE,
            _ => cmd_flags::FUA,
        };
        let bad_flags = h.flags & !allowed_flags != 0;
        let end = h.offset.checked_add(u64::from(h.length));
        let in_range = end.is_some_and(|end| end <= self.size);

        Ok(match h.kind {
            cmd::READ => {
                if bad_flags {
                    reject(ErrorCode::Inval, "unsupported flags on read")
                } else if h.length > MAX_PAYLOAD {
                    reject(ErrorCode::Inval, "read longer than the maximum block size")
                } else if !in_range {
                    reject(ErrorCode::Inval, "read beyond the end of the export")
                } else {
                    Some(Decoded::Request(Request {
                        cookie: h.cookie,
                        command: Command::Read {
                            offset: h.offset,
                            len: h.length,
                        },
                    }))
                }
            }
            cmd::WRITE => {
                if h.length > MAX_DISCARDED_PAYLOAD {
                    self.state = State::Disconnected;
                    return Err(ProtocolError::PayloadTooLarge(h.length));
                }
                let refusal = if bad_flags {
                    Some((ErrorCode::Inval, "unsupported flags on write"))
                } else if h.length > MAX_PAYLOAD {
                    Some((ErrorCode::Inval, "write longer than the maximum block size"))
                } else if self.read_only {
                    Some((ErrorCode::Perm, "write to a read-only export"))
                } else if !in_range {
                    Some((ErrorCode::NoSpc, "write beyond the end of the export"))
                } else {
                    None
                };
                self.state = match refusal {
                    Some((error, reason)) => State::Discard {
                        cookie: h.cookie,
                        remaining: h.length as usize,
                        error,
                        reason,
                    },
                    None => State::Payload { header: h },
                };
                None
            }
            cmd::DISC => {
                self.state = State::Disconnected;
                Some(Decoded::Disconnect)
            }
            cmd::FLUSH => {
                if bad_flags {
                    reject(ErrorCode::Inval, "unsupported flags on flush")
                } else {
                    Some(Decoded::Request(Request {
                        cookie: h.cookie,
                        command: Command::Flush,
                    }))
                }
            }
            cmd::TRIM => {
                if bad_flags {
                    reject(ErrorCode::Inval, "unsupported flags on trim")
                } else if self.read_only {
                    reject(ErrorCode::Perm, "trim on a read-only export")
                } else if !in_range {
                    reject(ErrorCode::Inval, "trim beyond the end of the export")
                } else {
                    Some(Decoded::Request(Request {
                        cookie: h.cookie,
                        command: Command::Trim {
                            offset: h.offset,
                            len: h.length,
                            fua,
                        },
                    }))
                }
            }
            cmd::WRITE_ZEROES => {
                if bad_flags {
                    reject(ErrorCode::Inval, "unsupported flags on write-zeroes")
                } else if self.read_only {
                    reject(ErrorCode::Perm, "write-zeroes on a read-only export")
                } else if !in_range {
                    reject(
                        ErrorCode::NoSpc,
                        "write-zeroes beyond the end of the export",
                    )
                } else {
                    Some(Decoded::Request(Request {
                        cookie: h.cookie,
                        command: Command::WriteZeroes {
                            offset: h.offset,
                            len: h.length,
                            may_trim: h.flags & cmd_flags::NO_HOLE == 0,
                            fua,
                        },
                    }))
                }
            }
            _ => reject(ErrorCode::Inval, "unsupported command"),
        })
    }
}

/// The header of a simple reply: success when `error` is `None` (a successful read is
/// followed by its data).
pub fn encode_simple_reply(cookie: u64, error: Option<ErrorCode>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.map_or(0, ErrorCode::wire).to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}
