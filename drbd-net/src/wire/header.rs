//! The three frame header formats.

use bytes::{BufMut, BytesMut};

use super::command::Command;
use super::error::WireError;
use super::limits::MAX_SIZE_H80_PACKET;
use super::{MAGIC_100, MAGIC_80, MAGIC_95};

/// Which of the three header formats a frame uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderKind {
    /// 8 bytes: magic `0x83740267` (u32), command (u16), length (u16). No volume.
    H80,
    /// 8 bytes: magic `0x835a` (u16), command (u16), length (u32). No volume.
    H95,
    /// 16 bytes: magic `0x8620ec20` (u32), volume (u16), command (u16), length (u32),
    /// pad (u32, must be zero).
    H100,
}

impl HeaderKind {
    /// Header size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HeaderKind::H80 | HeaderKind::H95 => 8,
            HeaderKind::H100 => 16,
        }
    }

    /// Largest payload length the header's length field can express.
    pub const fn max_length(self) -> usize {
        match self {
            HeaderKind::H80 => u16::MAX as usize,
            HeaderKind::H95 | HeaderKind::H100 => u32::MAX as usize,
        }
    }
}

/// The header the kernel puts in front of a payload of `payload_len` bytes once
/// `protocol_version` is agreed.
///
/// 100 and above: h100. 95..99: h95 if the payload is larger than 32 KiB, else h80. Below 95,
/// and 0 (not yet negotiated: `P_INITIAL_*` and `P_CONNECTION_FEATURES`): h80.
pub fn header_kind_for(protocol_version: u32, payload_len: usize) -> HeaderKind {
    if protocol_version >= 100 {
        HeaderKind::H100
    } else if protocol_version >= 95 && payload_len > MAX_SIZE_H80_PACKET {
        HeaderKind::H95
    } else {
        HeaderKind::H80
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The format, detected from the magic.
    pub kind: HeaderKind,
    /// The raw command code (not necessarily a known [`Command`]).
    pub command: u16,
    /// The volume number (always 0 for h80 and h95).
    pub volume: u16,
    /// Payload bytes following the header.
    pub length: u32,
}

impl Header {
    /// Reads a header from the start of `buf`.
    ///
    /// `Ok(None)` means `buf` is too short to tell: fewer than 4 bytes, or fewer than the
    /// header size the magic calls for. The magic is judged only once 4 bytes are there, so
    /// the outcome does not depend on how the bytes arrived.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, WireError> {
        let Some(&[b0, b1, b2, b3]) = buf.get(..4) else {
            return Ok(None);
        };
        let magic32 = u32::from_be_bytes([b0, b1, b2, b3]);
        let kind = if u16::from_be_bytes([b0, b1]) == MAGIC_95 {
            HeaderKind::H95
        } else if magic32 == MAGIC_80 {
            HeaderKind::H80
        } else if magic32 == MAGIC_100 {
            HeaderKind::H100
        } else {
            return Err(WireError::BadMagic { found: magic32 });
        };
        let Some(h) = buf.get(..kind.size()) else {
            return Ok(None);
        };
        let be16 = |at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        Ok(Some(match kind {
            HeaderKind::H80 => Header {
                kind,
                command: be16(4),
                volume: 0,
                length: u32::from(be16(6)),
            },
            HeaderKind::H95 => Header {
                kind,
                command: be16(2),
                volume: 0,
                length: be32(4),
            },
            HeaderKind::H100 => {
                if be32(12) != 0 {
                    return Err(WireError::NonZeroPad);
                }
                Header {
                    kind,
                    command: be16(6),
                    volume: be16(4),
                    length: be32(8),
                }
            }
        }))
    }

    /// Appends the header to `out`.
    ///
    /// Fails if the length does not fit the header's length field (reported as
    /// [`WireError::TooLong`], which needs a known command; an unknown code is reported as
    /// [`WireError::UnknownCommand`]) or a nonzero volume is given for h80/h95.
    pub fn write(&self, out: &mut BytesMut) -> Result<(), WireError> {
        self.check()?;
        match self.kind {
            HeaderKind::H80 => {
                out.put_u32(MAGIC_80);
                out.put_u16(self.command);
                // check() made sure the length fits.
                out.put_u16(u16::try_from(self.length).unwrap_or(u16::MAX));
            }
            HeaderKind::H95 => {
                out.put_u16(MAGIC_95);
                out.put_u16(self.command);
                out.put_u32(self.length);
            }
            HeaderKind::H100 => {
                out.put_u32(MAGIC_100);
                out.put_u16(self.volume);
                out.put_u16(self.command);
                out.put_u32(self.length);
                out.put_u32(0);
            }
        }
        Ok(())
    }

    /// The checks of [`Header::write`], without writing.
    pub(crate) fn check(&self) -> Result<(), WireError> {
        if self.kind != HeaderKind::H100 && self.volume != 0 {
            return Err(WireError::VolumeNotRepresentable {
                kind: self.kind,
                volume: self.volume,
            });
        }
        let length = self.length as usize;
        if length > self.kind.max_length() {
            let command =
                Command::from_code(self.command).ok_or(WireError::UnknownCommand(self.command))?;
            return Err(WireError::TooLong {
                command,
                length,
                max: self.kind.max_length(),
            });
        }
        Ok(())
    }
}
