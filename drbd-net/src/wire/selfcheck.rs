//! Invariant checks over arbitrary input: the logic of the `decode` fuzz target
//! (`fuzz/fuzz_targets/decode.rs`), shared with a regular test that runs it over the seed
//! corpus so CI exercises it without a nightly toolchain.
//!
//! Unlike the rest of the codec, [`check_decode`] panics: a panic is how it reports a broken
//! invariant to the fuzzer. It never panics because input is malformed.

use bytes::{Bytes, BytesMut};

use super::bitmap::{runs, set_range, vli_encode, words_for, BitmapReceiver, BitmapSender};
use super::codec::{encode, Decoder};
use super::error::WireError;
use super::header::HeaderKind;
use super::packet::{CompressedBitmap, Frame, Packet};
use super::WireContext;

/// Largest bitmap (in bits) the bitmap checks build, to keep each run cheap.
const MAX_CHECK_BITS: u64 = 1 << 20;

/// Largest number of input bytes turned into a bitmap for the bitmap round trip.
const MAX_BITMAP_INPUT: usize = 16 * 1024;

/// The wire context selected by the first input byte: bits 0..1 pick the integrity digest
/// length (0, 16, 20, 64), bit 2 the features (0 or 0xf, i.e. with `FF_WSAME`), bits 3..4
/// the protocol version (0, 86, 96, 101).
pub fn context_from_selector(selector: u8) -> WireContext {
    const DIGESTS: [usize; 4] = [0, 16, 20, 64];
    const VERSIONS: [u32; 4] = [0, 86, 96, 101];
    WireContext {
        integrity_digest_len: DIGESTS[usize::from(selector & 3)],
        features: if selector & 4 != 0 { 0xf } else { 0 },
        protocol_version: VERSIONS[usize::from((selector >> 3) & 3)],
        integrity: None,
    }
}

/// Runs every check on one input: byte 0 selects the context ([`context_from_selector`];
/// bit 5 turns RLE off and bit 6 selects h80 headers for the bitmap round trip), byte 1 is
/// the piece size for the incremental decode (0 = 1), the rest is a byte stream.
///
/// Checks: decoding the stream whole and in pieces gives the same frames and the same error;
/// every decoded frame re-encodes to exactly its input bytes and decodes again to itself;
/// compressed bitmap code decodes into runs whose VLI code words re-encode to the same bits
/// and merge into a bitmap; the stream bytes, read as a bitmap (and as run lengths), survive
/// the bitmap sender, the codec and the bitmap receiver unchanged.
pub fn check_decode(input: &[u8]) {
    let [selector, piece, stream @ ..] = input else {
        return;
    };
    check_stream(
        context_from_selector(*selector),
        usize::from(*piece),
        stream,
    );
    let use_rle = selector & 0x20 == 0;
    let kind = if selector & 0x40 != 0 {
        HeaderKind::H80
    } else {
        HeaderKind::H100
    };
    let stream = &stream[..stream.len().min(MAX_BITMAP_INPUT)];
    let (words, total_bits) = bitmap_from_words(stream, *selector);
    check_bitmap_transfer(&words, total_bits, use_rle, kind);
    let (words, total_bits) = bitmap_from_runs(stream);
    check_bitmap_transfer(&words, total_bits, use_rle, kind);
}

/// The stream checks of [`check_decode`] under an explicit context: decoding `stream` whole
/// and in pieces of `piece` bytes (0 = 1) gives the same frames and the same outcome, and
/// every decoded frame re-encodes to exactly its bytes and decodes again to itself.
pub fn check_stream(ctx: WireContext, piece: usize, stream: &[u8]) {
    let whole = decode_all(ctx, stream, stream.len().max(1));
    let piece = piece.max(1);
    let pieces = decode_all(ctx, stream, piece);
    assert_eq!(
        whole, pieces,
        "decoding whole vs in pieces of {piece} bytes"
    );
    for (frame, bytes) in &whole.0 {
        let mut out = BytesMut::new();
        if let Err(e) = encode(frame, &ctx, &mut out) {
            panic!("decoded frame {frame:?} does not encode: {e}");
        }
        assert_eq!(
            &out[..],
            &bytes[..],
            "re-encoding {:?} changed its bytes",
            frame.packet.command()
        );
        let again = Decoder::new(ctx).decode(&mut out);
        assert_eq!(
            again,
            Ok(Some(frame.clone())),
            "re-encoded frame decodes differently"
        );
        assert!(out.is_empty(), "re-encoded frame leaves bytes behind");
        if let Packet::CompressedBitmap(c) = &frame.packet {
            check_runs(c);
        }
    }
}

/// Decoded frames with their input bytes, and how decoding ended.
type Outcome = (Vec<(Frame, Bytes)>, Result<(), WireError>);

fn decode_all(ctx: WireContext, stream: &[u8], piece: usize) -> Outcome {
    let mut decoder = Decoder::new(ctx);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut start = 0usize;
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let end = usize::try_from(decoder.consumed()).unwrap_or(usize::MAX);
                    assert!(
                        end > start && end <= stream.len(),
                        "decoder consumed bytes it was not given"
                    );
                    frames.push((frame, Bytes::copy_from_slice(&stream[start..end])));
                    start = end;
                }
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    (frames, Ok(()))
}

/// `n` bits of `data` from bit `pos` on, LSB first.
fn read_bits(data: &[u8], pos: u64, n: u32) -> u64 {
    (0..u64::from(n)).fold(0u64, |acc, i| {
        let at = pos + i;
        let byte = usize::try_from(at / 8)
            .ok()
            .and_then(|b| data.get(b))
            .copied()
            .unwrap_or(0);
        acc | (u64::from((byte >> (at % 8)) & 1) << i)
    })
}

fn check_runs(c: &CompressedBitmap) {
    let iter = match runs(c) {
        Ok(iter) => iter,
        Err(e) => panic!("a decoded P_COMPRESSED_BITMAP has no runs: {e}"),
    };
    let mut pos = 0u64;
    let mut total = 0u64;
    let mut set_bits = 0u64;
    let mut complete = true;
    for run in iter {
        let Ok(run) = run else {
            complete = false;
            break;
        };
        let Some((code, bits)) = vli_encode(run.len) else {
            panic!("decoded run length {} is not encodable", run.len);
        };
        assert_eq!(
            read_bits(&c.code, pos, bits),
            code,
            "VLI code word at bit {pos} re-encodes differently"
        );
        pos += u64::from(bits);
        total = total.saturating_add(run.len);
        if run.set {
            set_bits = set_bits.saturating_add(run.len);
        }
    }
    if !complete || total > MAX_CHECK_BITS {
        return;
    }
    let mut words = vec![0u64; words_for(total)];
    let mut rx = BitmapReceiver::new(total);
    let packet = Packet::CompressedBitmap(c.clone());
    assert_eq!(rx.receive(&mut words, HeaderKind::H100, &packet), Ok(true));
    let counted: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(
        counted, set_bits,
        "merged bitmap has another number of set bits than the runs"
    );
}

/// The stream read as little-endian words; the bit count is trimmed by the selector's low
/// six bits, and bits past it are cleared (DRBD keeps them clear).
fn bitmap_from_words(stream: &[u8], selector: u8) -> (Vec<u64>, u64) {
    let mut words: Vec<u64> = stream
        .chunks(8)
        .map(|c| {
            let mut le = [0u8; 8];
            le[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(le)
        })
        .collect();
    let total_bits = (words.len() as u64 * 64).saturating_sub(u64::from(selector & 63));
    clear_tail(&mut words, total_bits);
    (words, total_bits)
}

/// The stream read as alternating run lengths (1..=256 bits each, long runs every other
/// byte), which compresses well.
fn bitmap_from_runs(stream: &[u8]) -> (Vec<u64>, u64) {
    let mut total = 0u64;
    let mut set_runs = Vec::new();
    for (i, &b) in stream.iter().enumerate() {
        let len = (u64::from(b) + 1) * if i % 4 == 3 { 37 } else { 1 };
        if total + len > MAX_CHECK_BITS {
            break;
        }
        if i % 2 == 1 {
            set_runs.push((total, len));
        }
        total += len;
    }
    let mut words = vec![0u64; words_for(total)];
    for (start, len) in set_runs {
        set_range(&mut words, start, len);
    }
    (words, total)
}

fn clear_tail(words: &mut [u64], total_bits: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        let first = i as u64 * 64;
        if first >= total_bits {
            *w = 0;
        } else if total_bits - first < 64 {
            *w &= (1u64 << (total_bits - first)) - 1;
        }
    }
}

/// Sends `words` (`total_bits` bits, bits past the end clear) through [`BitmapSender`], the
/// codec and [`BitmapReceiver`], and checks the receiver ends with the same bitmap at the
/// same packet as the sender.
pub fn check_bitmap_transfer(words: &[u64], total_bits: u64, use_rle: bool, kind: HeaderKind) {
    let ctx = WireContext::default();
    let mut tx = BitmapSender::new(total_bits, use_rle);
    let mut rx = BitmapReceiver::new(total_bits);
    let mut got = vec![0u64; words.len()];
    // Every packet covers at least 8 bits (RLE) or one word (plain), plus the terminator.
    let max_packets = total_bits / 8 + words.len() as u64 + 2;
    for _ in 0..max_packets {
        let packet = match tx.next_packet(words, kind) {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => panic!("bitmap sender failed: {e}"),
        };
        let mut buf = BytesMut::new();
        if let Err(e) = encode(
            &Frame {
                kind,
                volume: 0,
                packet,
            },
            &ctx,
            &mut buf,
        ) {
            panic!("bitmap packet does not encode: {e}");
        }
        let frame = match Decoder::new(ctx).decode(&mut buf) {
            Ok(Some(f)) => f,
            other => panic!("bitmap packet does not decode: {other:?}"),
        };
        match rx.receive(&mut got, kind, &frame.packet) {
            Ok(done) => assert_eq!(
                done,
                tx.is_done(),
                "sender and receiver disagree on the end"
            ),
            Err(e) => panic!("bitmap receiver rejects the sender's packet: {e}"),
        }
    }
    assert!(
        tx.is_done() && rx.is_done(),
        "bitmap transfer did not finish"
    );
    assert_eq!(got, words, "bitmap changed in transfer");
}
