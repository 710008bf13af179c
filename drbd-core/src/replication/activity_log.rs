//! The activity log (AL): the bounded set of 4 MiB extents that may have writes in flight.
//!
//! Before a write to an extent outside the active set may be submitted, the extent must be
//! recorded on disk: [`ActivityLog::begin_io`] then returns an [`AlWrite`], an encoded 4 KiB
//! transaction block and the ring position to write it to (and, if an extent was evicted to
//! make room, the bitmap pages that must reach the disk before the transaction does, because
//! after the eviction a crash no longer marks that extent out of sync). The caller writes
//! those synchronously, then submits the data write. [`ActivityLog::complete_io`] drops the
//! references again; only extents without references are evicted (least recently used
//! first), and when every extent is referenced the write has to wait ([`BeginIoError::Busy`]).
//!
//! The transactions are DRBD 8.4's (`al_transaction_on_disk`, see [`crate::meta::al`]): each
//! carries the slot changes it makes (at most [`AL_UPDATES_PER_TRANSACTION`]) and a rolling
//! *context* window of [`AL_CONTEXT_PER_TRANSACTION`] slots of the whole active set, whose
//! start advances by 919 slots per transaction and wraps to 0 at `al-extents`. Transaction
//! `t` goes to ring slot `t mod blocks` ([`block_of_transaction`]). Unused update slots hold
//! 0xffff / 0xffffffff, unused context entries 0xffffffff.
//!
//! After a crash, [`replay`] rebuilds the active set from the ring (valid transactions only,
//! oldest to newest in wrap-aware `tr_number` order, each applying its context then its
//! updates), and [`mark_extents_dirty`] marks those extents out of sync in the bitmap
//! (4 MiB = 1024 bits per extent). This is what `drbdmeta apply-al` does.
//!
//! `al-extents` is limited so that any `blocks - 1` consecutive transactions cover every slot
//! with their context windows: a crash may tear the block being written, and the remaining
//! valid blocks must still describe the whole active set.

use std::collections::{BTreeSet, HashMap};

use super::bitmap::DirtyBitmap;
use crate::meta::al::{
    block_of_transaction, AlTransaction, AL_BLOCK_BYTES, AL_CONTEXT_PER_TRANSACTION, AL_TR_UPDATE,
    AL_UPDATES_PER_TRANSACTION,
};
use crate::meta::layout::AlGeometry;

/// Sectors per AL extent: 4 MiB (AL_EXTENT_SHIFT 22).
pub const SECTORS_PER_EXTENT: u64 = 8192;

/// Bitmap bits per AL extent (4 MiB of 4 KiB blocks).
pub const BITS_PER_EXTENT: u64 = 1024;

/// Smallest `al-extents` DRBD accepts (`DRBD_AL_EXTENTS_MIN` in drbd_limits.h).
pub const MIN_AL_EXTENTS: u32 = 67;

/// Largest `al-extents` DRBD accepts (`DRBD_AL_EXTENTS_MAX`): slot numbers are 16 bit and
/// 0xffff marks an unused update slot.
pub const MAX_AL_EXTENTS: u32 = 0xfffe;

/// Largest write handed to [`ActivityLog::begin_io`]: DRBD's maximum bio size (1 MiB,
/// `DRBD_MAX_BIO_SIZE`). Such a write touches at most two extents, so one transaction always
/// suffices.
pub const MAX_IO_SECTORS: u64 = 2048;

/// Extent number marking an unused slot (`LC_FREE`).
const FREE_EXTENT: u32 = u32::MAX;

/// Slot number marking an unused update entry.
const FREE_SLOT: u16 = u16::MAX;

/// Errors configuring or driving the activity log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    /// `al-extents` outside 67..=65534.
    #[error("al-extents {0} outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}")]
    ExtentsOutOfRange(u32),
    /// The ring is too small for that many extents.
    #[error("al-extents {al_extents} needs a larger activity log (at most {max} fit)")]
    RingTooSmall {
        /// Requested `al-extents`.
        al_extents: u32,
        /// Most that the ring supports.
        max: u32,
    },
    /// [`ActivityLog::complete_io`] for a range that no write can have (empty, longer than
    /// [`MAX_IO_SECTORS`] or beyond the last extent number).
    #[error("write of {sectors} sectors at sector {sector} is not a valid AL request")]
    BadRequest {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
    /// [`ActivityLog::complete_io`] for an extent that holds no reference.
    #[error("extent {0} completed without a matching begin_io")]
    NotActive(u32),
    /// The buffer handed to [`replay`] is not the whole ring.
    #[error("activity log area of {got} bytes, expected {need}")]
    AreaLength {
        /// The ring size in bytes.
        need: u64,
        /// The bytes given.
        got: u64,
    },
}

/// Why [`ActivityLog::begin_io`] did not admit a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeginIoError {
    /// Every slot the write could use holds an extent with writes in flight: wait for a
    /// [`ActivityLog::complete_io`] and retry (DRBD's "AL busy").
    #[error("all activity log extents have writes in flight")]
    Busy,
    /// The write is empty, longer than [`MAX_IO_SECTORS`] or beyond the last extent number.
    #[error("write of {sectors} sectors at sector {sector} is not a valid AL request")]
    BadRequest {
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
    },
}

/// A transaction block the caller must write before submitting the data write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlWrite {
    /// Transaction number.
    pub tr_number: u32,
    /// Index of the 4 KiB block within the AL area ([`block_of_transaction`]).
    pub ring_block: u32,
    /// The encoded transaction ([`AL_BLOCK_BYTES`] bytes).
    pub block: Vec<u8>,
    /// Extents evicted from the active set by this transaction.
    pub evicted: Vec<u32>,
    /// Bitmap pages (4 KiB, index within the bitmap area) holding the bits of the evicted
    /// extents: write those that are dirty before the transaction.
    pub bitmap_pages: Vec<u64>,
}

impl AlWrite {
    /// Byte offset of the block from the start of the AL area.
    pub fn byte_offset(&self) -> u64 {
        u64::from(self.ring_block) * AL_BLOCK_BYTES as u64
    }
}

/// What [`ActivityLog::begin_io`] decided; either way the write now holds references on its
/// extents and must be followed by [`ActivityLog::complete_io`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlDecision {
    /// All extents were active already: submit the write.
    Proceed,
    /// Write this transaction (after the listed bitmap pages), then submit the write.
    Transaction(AlWrite),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    extent: u32,
    refs: u32,
    last_used: u64,
}

/// The activity log of one device.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    geometry: AlGeometry,
    slots: Vec<Slot>,
    by_extent: HashMap<u32, u16>,
    next_tr: u32,
    context_start: u16,
    clock: u64,
}

/// Extents (first..=last) touched by a write, or `None` if it is not a valid request.
fn extents_of(sector: u64, sectors: u64) -> Option<(u32, u32)> {
    if sectors == 0 || sectors > MAX_IO_SECTORS {
        return None;
    }
    let first = sector / SECTORS_PER_EXTENT;
    let last = sector.checked_add(sectors - 1)? / SECTORS_PER_EXTENT;
    let last = u32::try_from(last).ok().filter(|&l| l != FREE_EXTENT)?;
    Some((first as u32, last))
}

/// The largest `al-extents` a ring of this geometry supports: `blocks - 1` transactions
/// must cover every slot with their context windows (capped at [`MAX_AL_EXTENTS`]).
pub fn max_al_extents(geometry: AlGeometry) -> u32 {
    let max = u64::from(geometry.blocks() - 1) * AL_CONTEXT_PER_TRANSACTION as u64;
    max.min(u64::from(MAX_AL_EXTENTS)) as u32
}

impl ActivityLog {
    /// An empty activity log of `al_extents` slots on a ring of `geometry`, whose first
    /// transaction is number 0.
    pub fn new(al_extents: u32, geometry: AlGeometry) -> Result<ActivityLog, AlError> {
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
            return Err(AlError::ExtentsOutOfRange(al_extents));
        }
        let max = max_al_extents(geometry);
        if al_extents > max {
            return Err(AlError::RingTooSmall { al_extents, max });
        }
        let free = Slot {
            extent: FREE_EXTENT,
            refs: 0,
            last_used: 0,
        };
        Ok(ActivityLog {
            geometry,
            slots: vec![free; al_extents as usize],
            by_extent: HashMap::new(),
            next_tr: 0,
            context_start: 0,
            clock: 0,
        })
    }

    /// Continues transaction numbering at `tr_number` (e.g. one past the newest transaction
    /// found by [`replay`]).
    pub fn with_next_tr_number(mut self, tr_number: u32) -> ActivityLog {
        self.next_tr = tr_number;
        self
    }

    /// Number of slots (`al-extents`).
    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The ring geometry.
    pub fn geometry(&self) -> AlGeometry {
        self.geometry
    }

    /// Number of the next transaction.
    pub fn next_tr_number(&self) -> u32 {
        self.next_tr
    }

    /// Whether `extent` is in the active set.
    pub fn is_active(&self, extent: u32) -> bool {
        self.by_extent.contains_key(&extent)
    }

    /// Writes in flight on `extent` (0 if not active).
    pub fn refs(&self, extent: u32) -> u32 {
        self.by_extent
            .get(&extent)
            .map_or(0, |&s| self.slots[usize::from(s)].refs)
    }

    /// The active extents, in ascending order.
    pub fn active_extents(&self) -> BTreeSet<u32> {
        self.by_extent.keys().copied().collect()
    }

    /// Asks to submit a write of `sectors` sectors at `sector`; see [`AlDecision`].
    /// On error nothing changes.
    pub fn begin_io(&mut self, sector: u64, sectors: u64) -> Result<AlDecision, BeginIoError> {
        let (first, last) =
            extents_of(sector, sectors).ok_or(BeginIoError::BadRequest { sector, sectors })?;
        let missing: Vec<u32> = (first..=last)
            .filter(|e| !self.by_extent.contains_key(e))
            .collect();
        // Victims: unreferenced slots not holding one of this write's extents, free slots
        // first, then least recently used.
        let mut victims: Vec<u16> = Vec::new();
        if !missing.is_empty() {
            let mut candidates: Vec<(bool, u64, u16)> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.refs == 0 && !(first..=last).contains(&s.extent))
                .map(|(i, s)| (s.extent != FREE_EXTENT, s.last_used, i as u16))
                .collect();
            if candidates.len() < missing.len() {
                return Err(BeginIoError::Busy);
            }
            candidates.sort_unstable();
            victims = candidates[..missing.len()].iter().map(|c| c.2).collect();
        }
        self.clock += 1;
        for e in first..=last {
            if let Some(&s) = self.by_extent.get(&e) {
                let slot = &mut self.slots[usize::from(s)];
                slot.refs += 1;
                slot.last_used = self.clock;
            }
        }
        if missing.is_empty() {
            return Ok(AlDecision::Proceed);
        }
        let mut tr = AlTransaction::initialized();
        tr.transaction_type = AL_TR_UPDATE;
        let mut evicted = Vec::new();
        for (i, (&extent, &s)) in missing.iter().zip(&victims).enumerate() {
            let slot = &mut self.slots[usize::from(s)];
            if slot.extent != FREE_EXTENT {
                evicted.push(slot.extent);
                self.by_extent.remove(&slot.extent);
            }
            *slot = Slot {
                extent,
                refs: 1,
                last_used: self.clock,
            };
            self.by_extent.insert(extent, s);
            tr.update_slot_nr[i] = s;
            tr.update_extent_nr[i] = extent;
        }
        // At most two extents per write (MAX_IO_SECTORS), far below the 64 updates.
        debug_assert!(missing.len() <= AL_UPDATES_PER_TRANSACTION);
        for i in missing.len()..AL_UPDATES_PER_TRANSACTION {
            tr.update_slot_nr[i] = FREE_SLOT;
            tr.update_extent_nr[i] = FREE_EXTENT;
        }
        tr.n_updates = missing.len() as u16;
        tr.context_size = self.capacity() as u16;
        tr.context_start_slot_nr = self.context_start;
        // The context shows the slots as they are after this transaction; replay applies the
        // context before the updates, so the result is the same as with the slots' previous
        // contents.
        for (i, c) in tr.context.iter_mut().enumerate() {
            *c = self
                .slots
                .get(usize::from(self.context_start) + i)
                .map_or(FREE_EXTENT, |s| s.extent);
        }
        tr.tr_number = self.next_tr;
        let next_start = usize::from(self.context_start) + AL_CONTEXT_PER_TRANSACTION;
        self.context_start = if next_start >= self.slots.len() {
            0
        } else {
            next_start as u16
        };
        self.next_tr = self.next_tr.wrapping_add(1);
        let mut bitmap_pages: Vec<u64> = evicted
            .iter()
            .map(|&e| u64::from(e) * BITS_PER_EXTENT / super::bitmap::BITS_PER_PAGE)
            .collect();
        bitmap_pages.sort_unstable();
        bitmap_pages.dedup();
        Ok(AlDecision::Transaction(AlWrite {
            tr_number: tr.tr_number,
            ring_block: block_of_transaction(tr.tr_number, self.geometry),
            block: tr.encode().to_vec(),
            evicted,
            bitmap_pages,
        }))
    }

    /// Releases the references a write of `sectors` at `sector` took in
    /// [`begin_io`](ActivityLog::begin_io). Call it when the write is done in DRBD's sense:
    /// locally complete and, while connected, acknowledged by the peer up to its barrier.
    /// The extents stay active until evicted. On error nothing changes.
    pub fn complete_io(&mut self, sector: u64, sectors: u64) -> Result<(), AlError> {
        let (first, last) =
            extents_of(sector, sectors).ok_or(AlError::BadRequest { sector, sectors })?;
        for e in first..=last {
            let held = self
                .by_extent
                .get(&e)
                .is_some_and(|&s| self.slots[usize::from(s)].refs > 0);
            if !held {
                return Err(AlError::NotActive(e));
            }
        }
        for e in first..=last {
            let s = self.by_extent[&e];
            self.slots[usize::from(s)].refs -= 1;
        }
        Ok(())
    }
}

/// The outcome of [`replay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlReplay {
    /// Extents that were active at the crash.
    pub extents: BTreeSet<u32>,
    /// Number of the newest valid transaction, if any.
    pub newest_tr: Option<u32>,
    /// Number of valid update transactions applied.
    pub applied: usize,
}

/// Rebuilds the active set from the whole AL area `ring` (`geometry.size_bytes()` bytes).
///
/// Blocks with a bad magic or checksum and blocks that are not update transactions (such as
/// the initialized blocks of `create-md`) are skipped. The others are applied from oldest to
/// newest in wrap-aware `tr_number` order; transactions more than a ring length older than the
/// newest are stale and ignored.
pub fn replay(ring: &[u8], geometry: AlGeometry) -> Result<AlReplay, AlError> {
    if ring.len() as u64 != geometry.size_bytes() {
        return Err(AlError::AreaLength {
            need: geometry.size_bytes(),
            got: ring.len() as u64,
        });
    }
    let trs: Vec<AlTransaction> = ring
        .chunks_exact(AL_BLOCK_BYTES)
        .filter_map(|b| AlTransaction::decode(b).ok())
        .filter(|t| t.transaction_type == AL_TR_UPDATE)
        .collect();
    let Some(newest) = trs
        .iter()
        .reduce(|a, b| {
            if (b.tr_number.wrapping_sub(a.tr_number) as i32) > 0 {
                b
            } else {
                a
            }
        })
        .cloned()
    else {
        return Ok(AlReplay {
            extents: BTreeSet::new(),
            newest_tr: None,
            applied: 0,
        });
    };
    let age = |t: &AlTransaction| newest.tr_number.wrapping_sub(t.tr_number);
    let mut ordered: Vec<&AlTransaction> =
        trs.iter().filter(|t| age(t) < geometry.blocks()).collect();
    ordered.sort_by_key(|t| std::cmp::Reverse(age(t)));
    let size = usize::from(newest.context_size);
    let mut table = vec![FREE_EXTENT; size];
    for t in &ordered {
        let start = usize::from(t.context_start_slot_nr);
        for (i, &e) in t.context.iter().enumerate() {
            if let Some(slot) = table.get_mut(start + i) {
                *slot = e;
            }
        }
        let n = usize::from(t.n_updates).min(AL_UPDATES_PER_TRANSACTION);
        for i in 0..n {
            if let Some(slot) = table.get_mut(usize::from(t.update_slot_nr[i])) {
                *slot = t.update_extent_nr[i];
            }
        }
    }
    Ok(AlReplay {
        extents: table.into_iter().filter(|&e| e != FREE_EXTENT).collect(),
        newest_tr: Some(newest.tr_number),
        applied: ordered.len(),
    })
}

/// Marks every block of `extents` out of sync (1024 bits per extent, clipped to the device);
/// returns how many bits were newly set.
pub fn mark_extents_dirty(bitmap: &mut DirtyBitmap, extents: &BTreeSet<u32>) -> u64 {
    extents
        .iter()
        .map(|&e| {
            let start = u64::from(e) * BITS_PER_EXTENT;
            bitmap.set_bits(start..start + BITS_PER_EXTENT)
        })
        .sum()
}

#[cfg(test)]
mod tests;
