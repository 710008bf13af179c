//! The in-memory dirty bitmap: one bit per 4 KiB block of the replicated device.
//!
//! A set bit means "this block may differ from the peer" (it needs resync). Bit `n` covers
//! sectors `8n .. 8n + 8`. The on-disk v08 bitmap area stores the same bits as little-endian
//! words (bit `n` is bit `n % 8` of byte `n / 8`, which is the same whether read as 32- or
//! 64-bit little-endian words, see [`crate::meta::bitmap`]), padded to whole 4 KiB blocks.
//!
//! Setting a sector range marks every block the range touches (a partial write makes the
//! whole block suspect); clearing only clears blocks the range covers completely (a block that
//! is only partly known to be in sync is still out of sync), as DRBD does.
//!
//! The bitmap remembers which 4 KiB on-disk pages changed since they were last written, so a
//! caller writes back only those ([`DirtyBitmap::take_dirty_pages`]).

use std::ops::Range;

use crate::meta::layout::{bitmap_bytes, DEFAULT_BM_BYTES_PER_BIT, MAX_DEVICE_SECTORS};

/// Sectors (512 B) covered by one bit: 4 KiB of data per bit (BM_BLOCK_SHIFT 12).
pub const SECTORS_PER_BIT: u64 = 8;

/// Size of one on-disk bitmap page; meta data I/O is done in 4 KiB blocks.
pub const PAGE_BYTES: usize = 4096;

/// Bits held by one on-disk bitmap page (32768 bits = 128 MiB of data).
pub const BITS_PER_PAGE: u64 = PAGE_BYTES as u64 * 8;

/// Largest bitmap (in 64-bit words: 128 KiB, 4 GiB of data) whose count debug builds verify
/// by a full recount after each change; beyond that the recount would dominate debug runs.
const DEBUG_RECOUNT_MAX_WORDS: usize = 16 * 1024;

/// Errors of the dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The device is larger than the 1 PiB the v08 meta data supports.
    #[error("device of {sectors} sectors is larger than the supported 1 PiB")]
    DeviceTooLarge {
        /// Device size in sectors.
        sectors: u64,
    },
    /// A sector range reaches beyond the end of the device.
    #[error("sectors {start}..{end} lie beyond the device end at sector {device_sectors}")]
    RangeOutOfDevice {
        /// First sector of the range.
        start: u64,
        /// One past the last sector of the range (saturated).
        end: u64,
        /// Device size in sectors.
        device_sectors: u64,
    },
    /// Two bitmaps of different sizes cannot be merged.
    #[error("bitmap sizes differ: {ours} bits here, {theirs} bits in the other bitmap")]
    SizeMismatch {
        /// Bits of this bitmap.
        ours: u64,
        /// Bits of the other bitmap.
        theirs: u64,
    },
    /// The on-disk bitmap area is too short for the device.
    #[error("on-disk bitmap of {got} bytes is too short, {need} bytes are needed")]
    AreaTooShort {
        /// Bytes needed.
        need: u64,
        /// Bytes given.
        got: u64,
    },
}

/// The dirty bitmap of one device, with an incrementally maintained count of set bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    device_sectors: u64,
    bits: u64,
    words: Vec<u64>,
    set: u64,
    /// One flag per on-disk page: changed since last taken.
    dirty_pages: Vec<bool>,
}

impl DirtyBitmap {
    /// An all-clear bitmap for a device of `device_sectors` sectors (the last partial 4 KiB
    /// block, if any, gets a bit of its own).
    pub fn new(device_sectors: u64) -> Result<DirtyBitmap, BitmapError> {
        if device_sectors > MAX_DEVICE_SECTORS {
            return Err(BitmapError::DeviceTooLarge {
                sectors: device_sectors,
            });
        }
        let bits = device_sectors.div_ceil(SECTORS_PER_BIT);
        let pages = bits.div_ceil(BITS_PER_PAGE) as usize;
        Ok(DirtyBitmap {
            device_sectors,
            bits,
            words: vec![0; bits.div_ceil(64) as usize],
            set: 0,
            dirty_pages: vec![false; pages],
        })
    }

    /// Device size in sectors.
    pub fn device_sectors(&self) -> u64 {
        self.device_sectors
    }

    /// Number of bits (4 KiB blocks).
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits, maintained incrementally.
    pub fn count(&self) -> u64 {
        self.debug_check();
        self.set
    }

    /// Number of set bits, counted from scratch (for checks).
    pub fn recount(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Debug builds check the incremental count against a recount after every change, but
    /// only for small bitmaps: a recount is linear in the bitmap size.
    fn debug_check(&self) {
        if cfg!(debug_assertions) && self.words.len() <= DEBUG_RECOUNT_MAX_WORDS {
            assert_eq!(self.set, self.recount(), "incremental count drifted");
        }
    }

    /// Whether bit `bit` is set (bits beyond the end read as clear).
    pub fn is_set(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn check_range(&self, sector: u64, sectors: u64) -> Result<u64, BitmapError> {
        match sector.checked_add(sectors) {
            Some(end) if end <= self.device_sectors => Ok(end),
            end => Err(BitmapError::RangeOutOfDevice {
                start: sector,
                end: end.unwrap_or(u64::MAX),
                device_sectors: self.device_sectors,
            }),
        }
    }

    /// Marks every block that sectors `sector .. sector + sectors` touch; returns how many
    /// bits were newly set.
    pub fn set_sectors(&mut self, sector: u64, sectors: u64) -> Result<u64, BitmapError> {
        let end = self.check_range(sector, sectors)?;
        if sectors == 0 {
            return Ok(0);
        }
        Ok(self.set_bits(sector / SECTORS_PER_BIT..end.div_ceil(SECTORS_PER_BIT)))
    }

    /// Clears the blocks that sectors `sector .. sector + sectors` cover completely (the
    /// last block of a device whose size is not a multiple of 4 KiB counts as covered when
    /// the range reaches the device end); returns how many bits were newly cleared.
    pub fn clear_sectors(&mut self, sector: u64, sectors: u64) -> Result<u64, BitmapError> {
        let end = self.check_range(sector, sectors)?;
        if sectors == 0 {
            return Ok(0);
        }
        let first = sector.div_ceil(SECTORS_PER_BIT);
        let last = if end == self.device_sectors {
            self.bits
        } else {
            end / SECTORS_PER_BIT
        };
        Ok(self.clear_bits(first..last.max(first)))
    }

    /// Sets or clears the bits of `bits` (clipped to the bitmap) word by word, keeping the
    /// count and the dirty pages up to date; returns how many bits changed.
    fn update_words(&mut self, bits: Range<u64>, set: bool) -> u64 {
        let end = bits.end.min(self.bits);
        let mut bit = bits.start;
        let mut changed = 0;
        while bit < end {
            let word = (bit / 64) as usize;
            let lo = bit % 64;
            let hi = (end - (bit - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[word];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                changed += u64::from((old ^ new).count_ones());
                self.words[word] = new;
                self.dirty_pages[(bit / BITS_PER_PAGE) as usize] = true;
            }
            bit = bit - lo + 64;
        }
        if set {
            self.set += changed;
        } else {
            self.set -= changed;
        }
        self.debug_check();
        changed
    }

    /// Sets the bits of `bits` (clipped to the bitmap); returns how many were newly set.
    pub fn set_bits(&mut self, bits: Range<u64>) -> u64 {
        self.update_words(bits, true)
    }

    /// Clears the bits of `bits` (clipped to the bitmap); returns how many were newly cleared.
    pub fn clear_bits(&mut self, bits: Range<u64>) -> u64 {
        self.update_words(bits, false)
    }

    /// The maximal runs of set bits, in ascending order (for resync planning).
    pub fn dirty_runs(&self) -> DirtyRuns<'_> {
        DirtyRuns { bm: self, next: 0 }
    }

    fn next_with(&self, from: u64, set: bool) -> u64 {
        let mut bit = from;
        while bit < self.bits {
            let word = (bit / 64) as usize;
            let w = if set {
                self.words[word]
            } else {
                !self.words[word]
            } >> (bit % 64);
            if w != 0 {
                return (bit + u64::from(w.trailing_zeros())).min(self.bits);
            }
            bit = (word as u64 + 1) * 64;
        }
        self.bits
    }

    /// ORs `other` into this bitmap (the bitmap exchange on connect); returns how many bits
    /// were newly set.
    pub fn merge_or(&mut self, other: &DirtyBitmap) -> Result<u64, BitmapError> {
        if other.bits != self.bits {
            return Err(BitmapError::SizeMismatch {
                ours: self.bits,
                theirs: other.bits,
            });
        }
        let mut changed = 0;
        for (i, (mine, theirs)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let new = *mine | theirs;
            if new != *mine {
                changed += u64::from((new ^ *mine).count_ones());
                *mine = new;
                self.dirty_pages[i / (BITS_PER_PAGE / 64) as usize] = true;
            }
        }
        self.set += changed;
        self.debug_check();
        Ok(changed)
    }

    /// The bitmap as 64-bit words (bit `i` is bit `i % 64` of word `i / 64`), as the bitmap
    /// exchange sends it.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs a received bitmap (in the layout of [`DirtyBitmap::words`]) into this one; bits
    /// past the end of the device are ignored. Returns how many bits were newly set, or an
    /// error if the word count does not match.
    pub fn merge_words(&mut self, words: &[u64]) -> Result<u64, BitmapError> {
        if words.len() != self.words.len() {
            return Err(BitmapError::SizeMismatch {
                ours: self.bits,
                theirs: words.len() as u64 * 64,
            });
        }
        let mut other = DirtyBitmap::new(self.device_sectors)?;
        other.words.copy_from_slice(words);
        if let Some(last) = other.words.last_mut() {
            let tail = self.bits % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        other.set = other.recount();
        self.merge_or(&other)
    }

    /// The first set bit at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let b = self.next_with(from, true);
        (b < self.bits).then_some(b)
    }

    /// The first clear bit at or after `from` (the bit count if none).
    pub fn next_clear(&self, from: u64) -> u64 {
        self.next_with(from, false).min(self.bits)
    }

    /// Size of the on-disk bitmap for this device: whole 64-bit words, rounded up to 4 KiB.
    pub fn disk_bytes(&self) -> u64 {
        // Cannot fail: the size was checked in `new` and the granularity is the default.
        bitmap_bytes(self.device_sectors, DEFAULT_BM_BYTES_PER_BIT).unwrap_or(0)
    }

    /// The whole on-disk bitmap area ([`disk_bytes`](DirtyBitmap::disk_bytes) long).
    pub fn to_disk_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.disk_bytes() as usize);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(self.disk_bytes() as usize, 0);
        out
    }

    /// Reads a bitmap from the on-disk area (at least
    /// [`disk_bytes`](DirtyBitmap::disk_bytes) long; bits beyond the device are ignored).
    /// No page is marked dirty.
    pub fn from_disk_bytes(device_sectors: u64, area: &[u8]) -> Result<DirtyBitmap, BitmapError> {
        let mut bm = DirtyBitmap::new(device_sectors)?;
        let need = bm.disk_bytes();
        if (area.len() as u64) < need {
            return Err(BitmapError::AreaTooShort {
                need,
                got: area.len() as u64,
            });
        }
        for (w, chunk) in bm.words.iter_mut().zip(area.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        if bm.bits % 64 != 0 {
            if let Some(last) = bm.words.last_mut() {
                *last &= (1u64 << (bm.bits % 64)) - 1;
            }
        }
        bm.set = bm.recount();
        Ok(bm)
    }

    /// Number of 4 KiB on-disk pages that hold bits of this device.
    pub fn pages(&self) -> u64 {
        self.dirty_pages.len() as u64
    }

    /// The bytes of on-disk page `page` (4096 bytes, at byte offset `page * 4096` of the
    /// bitmap area), or `None` beyond the last page.
    pub fn page_bytes(&self, page: u64) -> Option<Vec<u8>> {
        if page >= self.pages() {
            return None;
        }
        let words_per_page = PAGE_BYTES / 8;
        let start = page as usize * words_per_page;
        let end = (start + words_per_page).min(self.words.len());
        let mut out = Vec::with_capacity(PAGE_BYTES);
        for w in &self.words[start..end] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.resize(PAGE_BYTES, 0);
        Some(out)
    }

    /// Whether page `page` changed since it was last taken.
    pub fn page_is_dirty(&self, page: u64) -> bool {
        self.dirty_pages
            .get(page as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The pages changed since the last call, in ascending order; they count as clean
    /// afterwards (the caller writes them with [`page_bytes`](DirtyBitmap::page_bytes)).
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, d) in self.dirty_pages.iter_mut().enumerate() {
            if std::mem::take(d) {
                out.push(i as u64);
            }
        }
        out
    }

    /// Marks page `page` as written (clean) without taking the others.
    pub fn mark_page_clean(&mut self, page: u64) {
        if let Some(d) = self.dirty_pages.get_mut(page as usize) {
            *d = false;
        }
    }
}

/// Iterator over maximal runs of set bits, see [`DirtyBitmap::dirty_runs`].
#[derive(Debug, Clone)]
pub struct DirtyRuns<'a> {
    bm: &'a DirtyBitmap,
    next: u64,
}

impl Iterator for DirtyRuns<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let start = self.bm.next_with(self.next, true);
        if start >= self.bm.bits {
            self.next = self.bm.bits;
            return None;
        }
        let end = self.bm.next_with(start, false);
        self.next = end;
        Some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_blocks() {
        let mut bm = DirtyBitmap::new(100).unwrap();
        assert_eq!(bm.bits(), 13);
        assert_eq!(bm.set_sectors(7, 0).unwrap(), 0);
        assert_eq!(bm.set_sectors(7, 2).unwrap(), 2); // touches blocks 0 and 1
        assert_eq!(bm.clear_sectors(1, 14).unwrap(), 0); // covers no block fully
        assert_eq!(bm.clear_sectors(8, 8).unwrap(), 1);
        assert_eq!(bm.count(), 1);
        assert_eq!(bm.set_sectors(99, 1).unwrap(), 1);
        assert!(bm.is_set(12));
        // The short last block counts as covered when the range reaches the device end.
        assert_eq!(bm.clear_sectors(96, 4).unwrap(), 1);
        assert!(bm.set_sectors(99, 2).is_err());
        assert!(bm.set_sectors(u64::MAX, 2).is_err());
    }

    #[test]
    fn disk_layout_and_pages() {
        // 1 GiB: 262144 bits = 32 KiB = 8 pages.
        let mut bm = DirtyBitmap::new(1 << 21).unwrap();
        assert_eq!(bm.disk_bytes(), 32768);
        assert_eq!(bm.pages(), 8);
        bm.set_bits(0..1);
        bm.set_bits(BITS_PER_PAGE * 3 + 9..BITS_PER_PAGE * 3 + 10);
        let disk = bm.to_disk_bytes();
        assert_eq!(disk[0], 1);
        assert_eq!(disk[3 * PAGE_BYTES + 1], 2);
        assert_eq!(bm.take_dirty_pages(), vec![0, 3]);
        assert!(bm.take_dirty_pages().is_empty());
        assert_eq!(
            bm.page_bytes(3).unwrap(),
            disk[3 * PAGE_BYTES..4 * PAGE_BYTES]
        );
        let back = DirtyBitmap::from_disk_bytes(1 << 21, &disk).unwrap();
        assert_eq!(back, bm);
        assert!(DirtyBitmap::from_disk_bytes(1 << 21, &disk[..100]).is_err());
        // Same bit positions as the 32-bit little-endian words of the dump formatter.
        let words = crate::meta::bitmap::words_from_le_bytes(&disk);
        assert_eq!(words[0], 1);
        assert_eq!(words[(3 * BITS_PER_PAGE / 32) as usize], 1 << 9);
    }

    /// Naive model: one bool per block.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
        Merge(Vec<(u64, u64)>),
    }

    fn arb_op(sectors: u64) -> impl Strategy<Value = Op> {
        let range = (0..sectors).prop_flat_map(move |s| (Just(s), 0..=(sectors - s).min(300)));
        prop_oneof![
            range.clone().prop_map(|(s, n)| Op::Set(s, n)),
            range.clone().prop_map(|(s, n)| Op::Clear(s, n)),
            proptest::collection::vec(range, 0..4).prop_map(Op::Merge),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_model(
            sectors in 1u64..2000,
            seed_ops in proptest::collection::vec(arb_op(2000), 0..40),
        ) {
            let mut bm = DirtyBitmap::new(sectors).unwrap();
            let mut model = vec![false; sectors.div_ceil(8) as usize];
            for op in seed_ops {
                match op {
                    Op::Set(s, n) | Op::Clear(s, n) if s + n > sectors => {
                        prop_assert!(bm.set_sectors(s, n).is_err());
                    }
                    Op::Set(s, n) => {
                        bm.set_sectors(s, n).unwrap();
                        for (b, m) in model.iter_mut().enumerate() {
                            let (lo, hi) = (b as u64 * 8, b as u64 * 8 + 8);
                            if n > 0 && lo < s + n && s < hi { *m = true; }
                        }
                    }
                    Op::Clear(s, n) => {
                        bm.clear_sectors(s, n).unwrap();
                        for (b, m) in model.iter_mut().enumerate() {
                            let (lo, hi) = (b as u64 * 8, (b as u64 * 8 + 8).min(sectors));
                            if n > 0 && s <= lo && hi <= s + n { *m = false; }
                        }
                    }
                    Op::Merge(ranges) => {
                        let mut other = DirtyBitmap::new(sectors).unwrap();
                        for (s, n) in ranges {
                            if s + n <= sectors {
                                other.set_sectors(s, n).unwrap();
                            }
                        }
                        bm.merge_or(&other).unwrap();
                        for (b, m) in model.iter_mut().enumerate() {
                            *m |= other.is_set(b as u64);
                        }
                    }
                }
                prop_assert_eq!(bm.count(), bm.recount());
            }
            for (b, m) in model.iter().enumerate() {
                prop_assert_eq!(bm.is_set(b as u64), *m);
            }
            prop_assert_eq!(bm.count(), model.iter().filter(|m| **m).count() as u64);
            // Runs are maximal, ascending, and cover exactly the set bits.
            let mut covered = vec![false; model.len()];
            let mut last_end = None;
            for run in bm.dirty_runs() {
                prop_assert!(run.start < run.end);
                if let Some(e) = last_end { prop_assert!(run.start > e); }
                last_end = Some(run.end);
                for b in run { covered[b as usize] = true; }
            }
            prop_assert_eq!(covered, model);
            let disk = bm.to_disk_bytes();
            prop_assert_eq!(disk.len() as u64, bm.disk_bytes());
            let mut back = DirtyBitmap::from_disk_bytes(sectors, &disk).unwrap();
            back.dirty_pages.clone_from(&bm.dirty_pages);
            prop_assert_eq!(back, bm);
        }
    }
}
