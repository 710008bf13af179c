//! The `bm { ... }` section of `dump-md`: the bitmap as text, with run-length compression.
//!
//! The on-disk bitmap is an array of little-endian 32-bit words (bit `n` of the device is bit
//! `n % 32` of word `n / 32`). drbdmeta prints it as 64-bit values, four per line, each value
//! `0x` + high word + low word in upper-case hex:
//!
//! ```text
//! bm {
//!    # at 0kB
//!     0x00000000000000FF; 0x8000000000000001; 0xFFFFFFFFFFFFFFFF; 0xFFFFFFFFFFFFFFFF;
//!     8 times 0xFFFFFFFFFFFFFFFF;
//!     0x0000000000000003; 0x0000000000000000; 0x0000000000000000; 0x0000000000000000;
//!     484 times 0x0000000000000000;
//! }
//! ```
//!
//! The rules, as drbdmeta applies them (observed and checked against drbd-utils 9.22):
//!
//! * Runs are only looked for at line starts (every 8th 32-bit word). A run is the longest
//!   stretch of 32-bit words equal to the line's first word, rounded down to whole lines; it is
//!   used only if it spans more than one line (more than 8 words). It is printed as
//!   `N times 0xWWWWWWWWWWWWWWWW;` with N = words / 2 and the 32-bit word printed twice (so a
//!   64-bit value whose halves differ never forms a run).
//! * A line break precedes every line that does not continue a run; every 64th word (2048 bits,
//!   8 MiB of data) the break carries a `# at NkB` comment with the data offset.
//! * drbdmeta reads the bitmap in 32 MiB chunks and a run scan never looks past the end of the
//!   current chunk. A run that reaches the chunk end continues into the next chunk only if it
//!   already spans more than one line; otherwise its words are printed individually. This
//!   affects bitmaps larger than 32 MiB (devices above 1 TiB) and is reproduced by feeding the
//!   dumper chunk by chunk.

use std::fmt::Write as _;

use super::MetaError;

/// drbdmeta's read buffer, and therefore the chunking of the bitmap dump: 32 MiB.
pub const DUMP_CHUNK_BYTES: u64 = 32 << 20;

/// [`DUMP_CHUNK_BYTES`] in 32-bit words.
pub const DUMP_CHUNK_WORDS: u64 = DUMP_CHUNK_BYTES / 4;

/// 32-bit words per output line (four 64-bit values).
const WORDS_PER_LINE: u64 = 8;
const _: () = assert!(WORDS_PER_LINE.is_power_of_two());

/// Streaming formatter for the bitmap section of `dump-md`.
///
/// Usage: [`BitmapDumper::new`] with the bitmap size, then [`feed`](BitmapDumper::feed) the
/// words chunk by chunk (each chunk exactly [`next_chunk_words`](BitmapDumper::next_chunk_words)
/// long, i.e. [`DUMP_CHUNK_WORDS`] except for the last one), then
/// [`finish`](BitmapDumper::finish). The output starts with `{` and ends with `}` and a newline.
#[derive(Debug, Clone)]
pub struct BitmapDumper {
    /// Total number of 32-bit words.
    total: u64,
    /// Index of the first word of the next chunk to feed.
    chunk_start: u64,
    /// Index of the next word to print.
    pos: u64,
    /// Words of a run that is still being collected (only across a chunk boundary).
    run_words: u64,
    /// The word of that run.
    run_word: u32,
    /// Low half of the 64-bit value being printed word by word.
    low_word: u32,
    /// Set bits seen so far.
    bits_set: u64,
}

impl BitmapDumper {
    /// A dumper for a bitmap of `bitmap_bytes` bytes (a multiple of 8). Appends the opening
    /// `{` to `out`.
    pub fn new(bitmap_bytes: u64, out: &mut String) -> BitmapDumper {
        debug_assert_eq!(bitmap_bytes % 8, 0, "bitmaps are whole 64-bit words");
        out.push('{');
        BitmapDumper {
            total: bitmap_bytes / 4,
            chunk_start: 0,
            pos: 0,
            run_words: 0,
            run_word: 0,
            low_word: 0,
            bits_set: 0,
        }
    }

    /// Number of words the next [`feed`](BitmapDumper::feed) must supply (0 when done).
    pub fn next_chunk_words(&self) -> u64 {
        (self.total - self.chunk_start).min(DUMP_CHUNK_WORDS)
    }

    /// Byte offset (within the bitmap) of the next chunk.
    pub fn next_chunk_offset(&self) -> u64 {
        self.chunk_start * 4
    }

    fn line_break(&self, out: &mut String) {
        if self.pos & 63 == 0 {
            // drbdmeta computes the offset from a 32-bit word index; keep its wrap-around.
            let _ = write!(out, "\n   # at {}kB\n   ", 128 * u64::from(self.pos as u32));
        } else {
            out.push_str("\n   ");
        }
    }

    /// Formats the next chunk of bitmap words (host-order values of the little-endian on-disk
    /// words).
    pub fn feed(&mut self, chunk: &[u32], out: &mut String) -> Result<(), MetaError> {
        let expected = self.next_chunk_words();
        if chunk.len() as u64 != expected || expected == 0 {
            return Err(MetaError::BitmapChunk {
                expected,
                got: chunk.len() as u64,
            });
        }
        let chunk_end = self.chunk_start + expected;
        debug_assert_eq!(
            self.pos, self.chunk_start,
            "each chunk is consumed completely"
        );
        while self.pos < chunk_end {
            let local = (self.pos - self.chunk_start) as usize;
            if self.run_words == 0 {
                self.run_word = chunk[local];
            }
            if self.pos & (WORDS_PER_LINE - 1) == 0 {
                if self.run_words == 0 {
                    self.line_break(out);
                }
                let same = chunk[local..]
                    .iter()
                    .take_while(|&&w| w == self.run_word)
                    .count() as u64;
                let whole_lines = same / WORDS_PER_LINE * WORDS_PER_LINE;
                if whole_lines > WORDS_PER_LINE {
                    self.run_words += whole_lines;
                    self.pos += whole_lines;
                    if self.pos == chunk_end && self.pos < self.total {
                        // The run may go on in the next chunk.
                        break;
                    }
                }
                if self.run_words > 0 {
                    self.flush_run(out);
                    if self.pos >= self.total {
                        break;
                    }
                    // Re-examine the current position as the start of a fresh line.
                    continue;
                }
            }
            let word = chunk[local];
            if self.pos & 1 == 0 {
                self.low_word = word;
            } else {
                let _ = write!(out, " 0x{:08X}{:08X};", word, self.low_word);
            }
            self.bits_set += u64::from(word.count_ones());
            self.pos += 1;
        }
        self.chunk_start = chunk_end;
        Ok(())
    }

    fn flush_run(&mut self, out: &mut String) {
        // drbdmeta counts in 32-bit unsigned integers; printing the count modulo 2^32 keeps
        // its output even for absurdly long runs.
        let _ = write!(
            out,
            " {} times 0x{:08X}{:08X};",
            (self.run_words as u32) / 2,
            self.run_word,
            self.run_word
        );
        self.bits_set += self.run_words * u64::from(self.run_word.count_ones());
        self.run_words = 0;
    }

    /// Closes the section (`\n}\n`) and returns the number of set bits as drbdmeta prints it
    /// in `# bits-set` (a 32-bit counter).
    ///
    /// Returns an error if not all words were fed.
    pub fn finish(mut self, out: &mut String) -> Result<u32, MetaError> {
        if self.chunk_start != self.total {
            return Err(MetaError::BitmapChunk {
                expected: self.next_chunk_words(),
                got: 0,
            });
        }
        if self.run_words > 0 {
            // Unreachable in practice: a run is only carried over when more words follow.
            self.flush_run(out);
        }
        out.push_str("\n}\n");
        Ok(self.bits_set as u32)
    }
}

/// Formats a whole bitmap held in memory (words in host order), returning the text and the
/// `# bits-set` count. Convenience wrapper around [`BitmapDumper`].
pub fn format_bitmap(words: &[u32]) -> (String, u32) {
    let mut out = String::new();
    let mut dumper = BitmapDumper::new(words.len() as u64 * 4, &mut out);
    let mut rest = words;
    while dumper.next_chunk_words() > 0 {
        let n = dumper.next_chunk_words() as usize;
        let (chunk, tail) = rest.split_at(n);
        // Cannot fail: the chunk has exactly the requested length.
        let _ = dumper.feed(chunk, &mut out);
        rest = tail;
    }
    let bits = dumper.finish(&mut out).unwrap_or(0);
    (out, bits)
}

/// Converts little-endian on-disk bitmap bytes into words. `bytes.len()` must be a multiple
/// of 4 (trailing bytes are ignored).
pub fn words_from_le_bytes(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 64-bit values as drbdmeta's restore-md writes them: low word first.
    fn from_u64s(values: &[u64]) -> Vec<u32> {
        values
            .iter()
            .flat_map(|v| [*v as u32, (*v >> 32) as u32])
            .collect()
    }

    #[test]
    fn empty_bitmap() {
        assert_eq!(format_bitmap(&[]), ("{\n}\n".to_owned(), 0));
    }

    /// The exact text drbdmeta 9.22 printed for this bitmap (4096 bytes) after restore-md.
    #[test]
    fn matches_drbdmeta_sample() {
        let mut v: Vec<u64> = vec![0xFF, 0x8000_0000_0000_0001];
        v.extend([u64::MAX; 10]);
        v.push(3);
        v.extend([0; 3]);
        v.extend([0x1111_1111_1111_1111, 0x2222_2222_2222_2222]);
        v.extend([0; 9]);
        v.push(0x0000_0001_0000_0002);
        v.resize(512, 0);
        let (text, bits) = format_bitmap(&from_u64s(&v));
        let expected = [
            "{",
            "   # at 0kB",
            "    0x00000000000000FF; 0x8000000000000001; 0xFFFFFFFFFFFFFFFF; 0xFFFFFFFFFFFFFFFF;",
            "    8 times 0xFFFFFFFFFFFFFFFF;",
            "    0x0000000000000003; 0x0000000000000000; 0x0000000000000000; 0x0000000000000000;",
            "    0x1111111111111111; 0x2222222222222222; 0x0000000000000000; 0x0000000000000000;",
            "    0x0000000000000000; 0x0000000000000000; 0x0000000000000000; 0x0000000000000000;",
            "    0x0000000000000000; 0x0000000000000000; 0x0000000000000000; 0x0000000100000002;",
            "    484 times 0x0000000000000000;",
            "}",
            "",
        ]
        .join("\n");
        assert_eq!(text, expected);
        assert_eq!(bits, 686);
    }

    #[test]
    fn at_comment_every_64_words() {
        // Alternating values never form runs: every line is printed, with a comment every
        // 8th line (64 words).
        let words: Vec<u32> = (0..256u32).map(|i| i % 2).collect();
        let (text, _) = format_bitmap(&words);
        assert_eq!(text.matches("# at").count(), 4);
        assert!(text.contains("# at 8192kB"));
        assert!(text.contains("# at 24576kB"));
        assert_eq!(text.lines().filter(|l| l.starts_with("    0x")).count(), 32);
    }

    #[test]
    fn exactly_one_line_is_not_a_run() {
        let mut words = vec![7u32; 8];
        words.extend([0u32; 8]);
        let (text, _) = format_bitmap(&words);
        assert_eq!(
            text,
            "{\n   # at 0kB\n    0x0000000700000007; 0x0000000700000007; 0x0000000700000007; \
             0x0000000700000007;\n    0x0000000000000000; 0x0000000000000000; \
             0x0000000000000000; 0x0000000000000000;\n}\n"
        );
        let (text, bits) = format_bitmap(&[0u32; 16]);
        assert_eq!(text, "{\n   # at 0kB\n    8 times 0x0000000000000000;\n}\n");
        assert_eq!(bits, 0);
    }

    /// A bitmap larger than one chunk: a one-line run at the end of chunk 0 is printed word by
    /// word, and the run in chunk 1 is counted from the chunk start.
    #[test]
    fn chunk_boundary_quirk() {
        let n = (DUMP_CHUNK_WORDS * 2) as usize;
        let mut words = vec![0u32; n];
        let boundary = DUMP_CHUNK_WORDS as usize;
        words[boundary - 8..boundary + 100].fill(u32::MAX);
        let (text, bits) = format_bitmap(&words);
        assert_eq!(bits, 108 * 32);
        assert!(text.contains(
            "\n    0xFFFFFFFFFFFFFFFF; 0xFFFFFFFFFFFFFFFF; 0xFFFFFFFFFFFFFFFF; 0xFFFFFFFFFFFFFFFF;\
             \n   # at 1073741824kB\n    48 times 0xFFFFFFFFFFFFFFFF;\n"
        ));

        // A multi-line run crossing the boundary is carried over and printed once.
        let mut words = vec![0u32; n];
        words[boundary - 16..boundary + 16].fill(u32::MAX);
        let (text, _) = format_bitmap(&words);
        assert!(text.contains("\n    16 times 0xFFFFFFFFFFFFFFFF;\n"));
    }

    #[test]
    fn feed_checks_chunk_sizes() {
        let mut out = String::new();
        let mut d = BitmapDumper::new(64, &mut out);
        assert!(d.feed(&[0; 3], &mut out).is_err());
        assert!(d.clone().finish(&mut out).is_err());
        assert!(d.feed(&[0; 16], &mut out).is_ok());
        assert!(d.feed(&[0; 16], &mut out).is_err());
    }

    /// Parses the text back into words, following the restore-md semantics.
    fn parse_back(text: &str) -> Vec<u32> {
        let mut words = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line == "{" || line == "}" || line.is_empty() {
                continue;
            }
            for item in line.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let (times, value) = match item.split_once(" times ") {
                    Some((n, v)) => (n.parse::<usize>().unwrap(), v),
                    None => (1, item),
                };
                let v = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
                for _ in 0..times {
                    words.push(v as u32);
                    words.push((v >> 32) as u32);
                }
            }
        }
        words
    }

    proptest! {
        #[test]
        fn text_round_trips(
            runs in proptest::collection::vec((0u32..4, 1usize..40), 0..30)
        ) {
            let mut words = Vec::new();
            for (v, len) in runs {
                let word = [0, u32::MAX, 1, 0x8000_0000][v as usize];
                words.resize(words.len() + len, word);
            }
            words.resize(words.len().div_ceil(2) * 2, 0);
            let (text, bits) = format_bitmap(&words);
            prop_assert_eq!(parse_back(&text), words.clone());
            let expected_bits: u32 = words.iter().map(|w| w.count_ones()).sum();
            prop_assert_eq!(bits, expected_bits);
        }
    }
}
