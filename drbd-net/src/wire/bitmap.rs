//! The bitmap exchange encodings: plain `P_BITMAP` words and the RLE/VLI code of
//! `P_COMPRESSED_BITMAP`, as pure functions over an in-memory bitmap.
//!
//! The in-memory bitmap is a slice of `u64` words: bit `i` of the device bitmap is bit
//! `i % 64` of `words[i / 64]` (the value, not a byte order; plain packets carry the words
//! little-endian). `total_bits` is the bitmap's size in bits; the slice needs
//! [`words_for`]`(total_bits)` words.
//!
//! RLE_VLI_Bits: the bits from the current position on are cut into runs of equal bits; the
//! first run's polarity is in the encoding byte, the runs alternate, each length (>= 1) is a
//! variable-length code ([`VLI_LEVELS`]) appended to a little-endian bitstream (code bits
//! LSB first, bytes filled from bit 0 up).
//!
//! [`BitmapSender`] and [`BitmapReceiver`] implement the packet sequence of one direction
//! of the exchange the way DRBD 8.4 does: compressed packets while the code compresses,
//! plain packets (from the 64-bit word containing the current bit) where it does not, and
//! an empty `P_BITMAP` to end a transfer whose last packet was plain.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::command::Command;
use super::header::HeaderKind;
use super::limits::BITMAP_PACKET_MAX;
use super::packet::{Bitmap, CompressedBitmap, Packet};

/// One level of the VLI code: a prefix of `prefix_bits` bits (read from the lowest bits of
/// the stream) with value `prefix`, then `total_bits - prefix_bits` data bits holding
/// `value - first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VliLevel {
    /// Bits of the whole code word.
    pub total_bits: u32,
    /// Bits of the prefix.
    pub prefix_bits: u32,
    /// The prefix value (of the low `prefix_bits` bits).
    pub prefix: u64,
    /// Smallest value of the level.
    pub first: u64,
    /// Largest value of the level.
    pub last: u64,
}

/// (total bits, prefix bits, prefix value) of the ten levels, from `drbd_vli.h`'s table.
const LEVEL_SHAPES: [(u32, u32, u64); 10] = [
    (2, 1, 0x00),
    (3, 2, 0x01),
    (5, 3, 0x03),
    (7, 4, 0x07),
    (10, 5, 0x0f),
    (14, 6, 0x1f),
    (21, 8, 0x3f),
    (29, 8, 0x7f),
    (42, 8, 0xbf),
    (64, 8, 0xff),
];

const fn build_levels() -> [VliLevel; 10] {
    let mut out = [VliLevel {
        total_bits: 0,
        prefix_bits: 0,
        prefix: 0,
        first: 0,
        last: 0,
    }; 10];
    let mut first = 1u64;
    let mut i = 0;
    while i < LEVEL_SHAPES.len() {
        let (total_bits, prefix_bits, prefix) = LEVEL_SHAPES[i];
        let capacity = 1u64 << (total_bits - prefix_bits);
        out[i] = VliLevel {
            total_bits,
            prefix_bits,
            prefix,
            first,
            last: first + capacity - 1,
        };
        first += capacity;
        i += 1;
    }
    out
}

/// The VLI code table: values 1..=2 in 2 bits, 3..=4 in 3, 5..=8 in 5, 9..=16 in 7,
/// 17..=48 in 10, 49..=304 in 14, 305..=8496 in 21, 8497..=0x202130 in 29,
/// ..=0x400202130 in 42 and ..=0x100000400202130 in 64 bits.
pub const VLI_LEVELS: [VliLevel; 10] = build_levels();

/// Largest run length the code can express.
pub const VLI_MAX: u64 = VLI_LEVELS[9].last;

/// The code word and its length in bits for `value` (1..=[`VLI_MAX`]); `None` for 0 and
/// values above the table.
pub fn vli_encode(value: u64) -> Option<(u64, u32)> {
    VLI_LEVELS
        .iter()
        .find(|l| (l.first..=l.last).contains(&value))
        .map(|l| {
            (
                ((value - l.first) << l.prefix_bits) | l.prefix,
                l.total_bits,
            )
        })
}

/// Decodes the code word at the low end of `lookahead`: returns the value and the code
/// length in bits. Every bit pattern is the start of some code word, so this cannot fail;
/// whether all `total_bits` bits were really available is the caller's check.
pub fn vli_decode(lookahead: u64) -> (u64, u32) {
    let last = VLI_LEVELS[VLI_LEVELS.len() - 1];
    let level = VLI_LEVELS
        .iter()
        .find(|l| lookahead & ((1u64 << l.prefix_bits) - 1) == l.prefix)
        .copied()
        // Unreachable: the last level's prefix covers what the others leave.
        .unwrap_or(last);
    let mask = u64::MAX >> (64 - level.total_bits);
    (
        ((lookahead & mask) >> level.prefix_bits) + level.first,
        level.total_bits,
    )
}

/// What can go wrong encoding or decoding bitmap packets.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    /// The word slice is shorter than the bitmap's bit count needs.
    #[error("bitmap of {total_bits} bits needs {needed} words, got {words}")]
    BitmapTooSmall {
        /// Bits in the bitmap.
        total_bits: u64,
        /// Words needed.
        needed: usize,
        /// Words given.
        words: usize,
    },
    /// The encoding byte names a code other than RLE_VLI_Bits.
    #[error("compressed bitmap encoding {0:#04x} is not RLE_VLI_Bits (2)")]
    UnknownEncoding(u8),
    /// The compressed bitmap has no code bits.
    #[error("compressed bitmap without code bits")]
    EmptyCode,
    /// The last code word is cut off by the end of the code.
    #[error("VLI code word at code bit {bit} needs {need} bits, only {have} are left")]
    TruncatedCode {
        /// Bit offset of the code word in the code.
        bit: u64,
        /// Its length.
        need: u32,
        /// Valid bits left.
        have: u32,
    },
    /// A run reaches past the end of the bitmap.
    #[error("run of {len} bits at bit {start} goes past the end of the {total_bits}-bit bitmap")]
    Overflow {
        /// First bit of the run.
        start: u64,
        /// Its length.
        len: u64,
        /// Bits in the bitmap.
        total_bits: u64,
    },
    /// A run is longer than the VLI code can express.
    #[error("run of {0} bits is longer than the VLI code can express")]
    RunTooLong(u64),
    /// A plain packet has another size than the receiver's position calls for.
    #[error("P_BITMAP of {got} bytes where {want} were expected")]
    PlainSizeMismatch {
        /// Bytes expected.
        want: usize,
        /// Bytes received.
        got: usize,
    },
    /// A packet other than `P_BITMAP` / `P_COMPRESSED_BITMAP` was fed to the receiver.
    #[error("{0} is not a bitmap packet")]
    NotBitmapPacket(Command),
    /// A packet arrived after the transfer had ended.
    #[error("bitmap packet after the end of the transfer")]
    TransferComplete,
}

/// Words needed for a bitmap of `total_bits` bits.
pub fn words_for(total_bits: u64) -> usize {
    usize::try_from(total_bits.div_ceil(64)).unwrap_or(usize::MAX)
}

/// Bytes of RLE code that fit into one `P_COMPRESSED_BITMAP` with a `kind` header
/// (4096 minus header minus the encoding byte).
pub fn max_code_bytes(kind: HeaderKind) -> usize {
    BITMAP_PACKET_MAX - kind.size() - 1
}

/// Words one `P_BITMAP` with a `kind` header carries at most.
pub fn plain_words_per_packet(kind: HeaderKind) -> usize {
    (BITMAP_PACKET_MAX - kind.size()) / 8
}

fn check_words(words: usize, total_bits: u64) -> Result<(), BitmapError> {
    let needed = words_for(total_bits);
    if words < needed {
        Err(BitmapError::BitmapTooSmall {
            total_bits,
            needed,
            words,
        })
    } else {
        Ok(())
    }
}

fn bit(words: &[u64], i: u64) -> bool {
    let w = usize::try_from(i / 64)
        .ok()
        .and_then(|w| words.get(w))
        .copied()
        .unwrap_or(0);
    (w >> (i % 64)) & 1 != 0
}

/// First bit at or after `from` (and below `total_bits`) that equals `set`, else
/// `total_bits`.
fn find_next(words: &[u64], total_bits: u64, from: u64, set: bool) -> u64 {
    let mut i = from;
    while i < total_bits {
        let w = usize::try_from(i / 64)
            .ok()
            .and_then(|w| words.get(w))
            .copied()
            .unwrap_or(0);
        let w = if set { w } else { !w };
        let rest = w >> (i % 64);
        if rest != 0 {
            return (i + u64::from(rest.trailing_zeros())).min(total_bits);
        }
        i = (i / 64 + 1) * 64;
    }
    total_bits
}

/// Sets bits `start..start + len` (the caller checked they are inside `words`).
pub(crate) fn set_range(words: &mut [u64], start: u64, len: u64) {
    let end = start + len;
    let mut i = start;
    while i < end {
        let in_word = i % 64;
        let n = (64 - in_word).min(end - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << in_word
        };
        if let Some(w) = usize::try_from(i / 64).ok().and_then(|w| words.get_mut(w)) {
            *w |= mask;
        }
        i += n;
    }
}

/// Appends bits LSB-first to a bounded byte buffer.
struct BitWriter {
    bytes: Vec<u8>,
    bits: usize,
    cap_bytes: usize,
}

impl BitWriter {
    fn new(cap_bytes: usize) -> Self {
        BitWriter {
            bytes: Vec::with_capacity(cap_bytes),
            bits: 0,
            cap_bytes,
        }
    }

    /// Appends the low `n` bits of `val`; false (and nothing written) if they do not fit.
    fn put(&mut self, mut val: u64, mut n: u32) -> bool {
        if (self.bits + n as usize).div_ceil(8) > self.cap_bytes {
            return false;
        }
        while n > 0 {
            let at = self.bits % 8;
            if at == 0 {
                self.bytes.push(0);
            }
            let take = (8 - at as u32).min(n);
            let chunk = (val & ((1u64 << take) - 1)) as u8;
            if let Some(b) = self.bytes.last_mut() {
                *b |= chunk << at;
            }
            // `take` is at most 8, so the shift never reaches the width of `val`.
            val >>= take;
            n -= take;
            self.bits += take as usize;
        }
        true
    }
}

/// Reads bits LSB-first from `data`, up to `end` bits.
struct BitReader<'a> {
    data: &'a [u8],
    pos: u64,
    end: u64,
}

impl BitReader<'_> {
    /// Up to 64 bits from the current position (zero above what is left) and how many of
    /// them are valid.
    fn peek(&self) -> (u64, u32) {
        let have = self.end.saturating_sub(self.pos).min(64) as u32;
        if have == 0 {
            return (0, 0);
        }
        let first = usize::try_from(self.pos / 8).unwrap_or(usize::MAX);
        let mut acc: u128 = 0;
        for (i, &b) in self
            .data
            .get(first..)
            .unwrap_or(&[])
            .iter()
            .take(9)
            .enumerate()
        {
            acc |= u128::from(b) << (8 * i);
        }
        let val = (acc >> (self.pos % 8)) as u64;
        let val = if have < 64 {
            val & ((1u64 << have) - 1)
        } else {
            val
        };
        (val, have)
    }
}

/// One run of equal bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Whether the run is of set bits.
    pub set: bool,
    /// Its length in bits (>= 1).
    pub len: u64,
}

/// The runs of a compressed bitmap packet, in order (see [`runs`]).
pub struct Runs<'a> {
    reader: BitReader<'a>,
    set: bool,
    done: bool,
}

impl Runs<'_> {
    /// Code bits consumed so far.
    pub fn bits_consumed(&self) -> u64 {
        self.reader.pos
    }
}

impl Iterator for Runs<'_> {
    type Item = Result<Run, BitmapError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (lookahead, have) = self.reader.peek();
        if have == 0 {
            self.done = true;
            return None;
        }
        let (len, bits) = vli_decode(lookahead);
        if bits > have {
            self.done = true;
            return Some(Err(BitmapError::TruncatedCode {
                bit: self.reader.pos,
                need: bits,
                have,
            }));
        }
        self.reader.pos += u64::from(bits);
        let run = Run { set: self.set, len };
        self.set = !self.set;
        Some(Ok(run))
    }
}

/// The runs of a `P_COMPRESSED_BITMAP`. Each code word takes at least 2 bits, so a packet
/// has at most 4 runs per code byte.
pub fn runs(bitmap: &CompressedBitmap) -> Result<Runs<'_>, BitmapError> {
    if bitmap.code_kind() != CompressedBitmap::RLE_VLI_BITS {
        return Err(BitmapError::UnknownEncoding(bitmap.encoding));
    }
    let end = (bitmap.code.len() as u64 * 8).saturating_sub(u64::from(bitmap.pad_bits()));
    if end == 0 {
        return Err(BitmapError::EmptyCode);
    }
    Ok(Runs {
        reader: BitReader {
            data: &bitmap.code,
            pos: 0,
            end,
        },
        set: bitmap.first_run_set(),
        done: false,
    })
}

/// One RLE-coded chunk of a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RleChunk {
    /// The packet payload.
    pub bitmap: CompressedBitmap,
    /// First bitmap bit covered.
    pub start_bit: u64,
    /// One past the last bitmap bit covered.
    pub end_bit: u64,
}

impl RleChunk {
    /// Bitmap bits covered.
    pub fn plain_bits(&self) -> u64 {
        self.end_bit - self.start_bit
    }

    /// DRBD's test whether sending this chunk is worth it: it covers at least as many
    /// bitmap bits as it has code bits (whole bytes). Otherwise a plain packet is sent.
    pub fn compresses(&self) -> bool {
        self.plain_bits() >= self.bitmap.code.len() as u64 * 8
    }
}

/// RLE-codes the bitmap from `start_bit` on into as many runs as fit into one
/// `P_COMPRESSED_BITMAP` with a `kind` header (at most 4096 bytes in all).
///
/// `None` if `start_bit` is at or past the end. The chunk ends at a run boundary: the next
/// chunk starts at its `end_bit`, with the polarity of the bit there.
pub fn encode_rle_chunk(
    words: &[u64],
    total_bits: u64,
    start_bit: u64,
    kind: HeaderKind,
) -> Result<Option<RleChunk>, BitmapError> {
    check_words(words.len(), total_bits)?;
    if start_bit >= total_bits {
        return Ok(None);
    }
    let mut w = BitWriter::new(max_code_bytes(kind));
    let first_set = bit(words, start_bit);
    let mut set = first_set;
    let mut pos = start_bit;
    while pos < total_bits {
        let next = find_next(words, total_bits, pos, !set);
        let len = next - pos;
        let (code, bits) = vli_encode(len).ok_or(BitmapError::RunTooLong(len))?;
        if !w.put(code, bits) {
            break;
        }
        pos = next;
        set = !set;
    }
    if w.bits == 0 {
        return Ok(None);
    }
    let pad_bits = ((8 - w.bits % 8) % 8) as u8;
    let encoding =
        CompressedBitmap::encoding_byte(CompressedBitmap::RLE_VLI_BITS, pad_bits, first_set);
    Ok(Some(RleChunk {
        bitmap: CompressedBitmap {
            encoding,
            code: Bytes::from(w.bytes),
        },
        start_bit,
        end_bit: pos,
    }))
}

/// The plain packet payload of up to [`plain_words_per_packet`] words from `word_offset`.
pub fn plain_chunk(words: &[u64], total_bits: u64, word_offset: usize, kind: HeaderKind) -> Bitmap {
    let bm_words = words_for(total_bits).min(words.len());
    let n = plain_words_per_packet(kind).min(bm_words.saturating_sub(word_offset));
    let mut out = BytesMut::with_capacity(n * 8);
    for &w in words.iter().skip(word_offset).take(n) {
        out.put_u64_le(w);
    }
    Bitmap {
        words: out.freeze(),
    }
}

/// The sending side of one bitmap transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSender {
    total_bits: u64,
    bit_offset: u64,
    word_offset: usize,
    use_rle: bool,
    done: bool,
}

impl BitmapSender {
    /// A transfer of a `total_bits` bitmap. `use_rle`: the `use-rle` option and agreed
    /// protocol >= 90; without it every packet is plain.
    pub fn new(total_bits: u64, use_rle: bool) -> Self {
        BitmapSender {
            total_bits,
            bit_offset: 0,
            word_offset: 0,
            use_rle,
            done: false,
        }
    }

    /// Whether the last packet has been produced.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next packet to send (with a `kind` header), `None` when the transfer is over.
    /// `words` must hold the bitmap and not change during the transfer.
    pub fn next_packet(
        &mut self,
        words: &[u64],
        kind: HeaderKind,
    ) -> Result<Option<Packet>, BitmapError> {
        if self.done {
            return Ok(None);
        }
        check_words(words.len(), self.total_bits)?;
        if self.use_rle {
            if let Some(chunk) = encode_rle_chunk(words, self.total_bits, self.bit_offset, kind)? {
                if chunk.compresses() {
                    self.bit_offset = chunk.end_bit;
                    self.word_offset = usize::try_from(self.bit_offset / 64).unwrap_or(usize::MAX);
                    self.done = self.bit_offset >= self.total_bits;
                    return Ok(Some(Packet::CompressedBitmap(chunk.bitmap)));
                }
                // Does not compress: send plain from the word holding the current bit.
                self.word_offset = usize::try_from(self.bit_offset / 64).unwrap_or(usize::MAX);
            }
        }
        let bitmap = plain_chunk(words, self.total_bits, self.word_offset, kind);
        let n = bitmap.words.len() / 8;
        self.word_offset += n;
        self.bit_offset = (self.word_offset as u64 * 64).min(self.total_bits);
        // A transfer whose last packet is plain ends with an empty one.
        self.done = n == 0;
        Ok(Some(Packet::Bitmap(bitmap)))
    }
}

/// The receiving side of one bitmap transfer: merges (ORs) each packet into the caller's
/// bitmap and checks it is the packet DRBD's sender would send at this point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapReceiver {
    total_bits: u64,
    bit_offset: u64,
    word_offset: usize,
    done: bool,
}

impl BitmapReceiver {
    /// A transfer of a `total_bits` bitmap.
    pub fn new(total_bits: u64) -> Self {
        BitmapReceiver {
            total_bits,
            bit_offset: 0,
            word_offset: 0,
            done: false,
        }
    }

    /// Whether the transfer is complete.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Merges one packet (received with a `kind` header) into `words`. Returns whether the
    /// transfer is complete.
    ///
    /// Stricter than DRBD in one point: a run of clear bits past the end of the bitmap is an
    /// error too (DRBD only checks runs of set bits; its own sender never produces either).
    pub fn receive(
        &mut self,
        words: &mut [u64],
        kind: HeaderKind,
        packet: &Packet,
    ) -> Result<bool, BitmapError> {
        if self.done {
            return Err(BitmapError::TransferComplete);
        }
        check_words(words.len(), self.total_bits)?;
        match packet {
            Packet::Bitmap(b) => {
                let bm_words = words_for(self.total_bits);
                let n = plain_words_per_packet(kind).min(bm_words.saturating_sub(self.word_offset));
                if b.words.len() != n * 8 {
                    return Err(BitmapError::PlainSizeMismatch {
                        want: n * 8,
                        got: b.words.len(),
                    });
                }
                if n == 0 {
                    self.done = true;
                    return Ok(true);
                }
                for (chunk, w) in b
                    .words
                    .chunks_exact(8)
                    .zip(words.iter_mut().skip(self.word_offset))
                {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(chunk);
                    *w |= u64::from_le_bytes(le);
                }
                self.word_offset += n;
                self.bit_offset = (self.word_offset as u64 * 64).min(self.total_bits);
                Ok(false)
            }
            Packet::CompressedBitmap(c) => {
                let mut s = self.bit_offset;
                for run in runs(c)? {
                    let run = run?;
                    let end = s
                        .checked_add(run.len)
                        .filter(|&e| e <= self.total_bits)
                        .ok_or(BitmapError::Overflow {
                            start: s,
                            len: run.len,
                            total_bits: self.total_bits,
                        })?;
                    if run.set {
                        set_range(words, s, run.len);
                    }
                    s = end;
                }
                self.bit_offset = s;
                self.word_offset = usize::try_from(s / 64).unwrap_or(usize::MAX);
                self.done = s == self.total_bits;
                Ok(self.done)
            }
            other => Err(BitmapError::NotBitmapPacket(other.command())),
        }
    }
}
