//! Where the v08 meta data lives on a device: superblock, activity log and bitmap placement.
//!
//! Three placements exist (drbd.conf `meta-disk`):
//!
//! * **internal** (drbdmeta's "flexible internal"): the meta data sits at the end of the data
//!   device and grows downwards from the superblock, which occupies the last 4 KiB-aligned
//!   4 KiB block:
//!   `[ data ... ][ bitmap ][ activity log ][ superblock ][ 0..4095 bytes slack ]`.
//!   `al_offset` and `bm_offset` are negative sector offsets relative to the superblock.
//! * **flex-external** (`meta-disk /dev/x;`): the whole meta device is the meta data area,
//!   superblock at byte 0, AL right after it, bitmap after the AL.
//! * **indexed external** (`meta-disk /dev/x[n];`): like flex-external, but inside a fixed
//!   128 MiB slot that starts at `n * 128 MiB`.
//!
//! All numbers follow `drbdmeta` (drbd-utils 9.x, format v08) exactly, so that a layout computed
//! here lands on the same bytes as the one `drbdmeta create-md` writes.

use super::MetaError;

/// Size of a sector, the unit of the superblock's offsets and sizes.
pub const SECTOR_BYTES: u64 = 512;

/// Size of the superblock, of one AL transaction block, and the alignment of all meta data IO.
pub const BLOCK_BYTES: u64 = 4096;

/// drbdmeta reads this much from the start of the device to look for file systems (reiserfs
/// keeps its superblock at 64 KiB, rounded up to 4 KiB) and refuses devices smaller than that.
pub const MIN_DEVICE_BYTES: u64 = 68 * 1024;

/// Size of one fixed slot of indexed external meta data, in sectors (128 MiB).
pub const INDEXED_SLOT_SECTORS: u32 = 128 << 11;

/// Sector offset of the AL from the superblock for external meta data (right after the 4 KiB
/// superblock).
pub const EXTERNAL_AL_OFFSET_SECTORS: i32 = 8;

/// The only bitmap granularity DRBD 8.4 uses: one bit per 4 KiB of data.
pub const DEFAULT_BM_BYTES_PER_BIT: u32 = 4096;

/// drbdmeta (64-bit build) refuses internal bitmaps larger than 32 GiB.
pub const MAX_FLEX_BITMAP_BYTES: u64 = 1 << 35;

/// drbdmeta supports devices of at most 1 PiB (its bitmap-size helper asserts this).
pub const MAX_DEVICE_SECTORS: u64 = 1 << 41;

/// Smallest activity log: 8 blocks of 4 KiB (32 KiB), the pre-8.4 fixed size.
pub const MIN_AL_BLOCKS: u64 = 8;

/// Largest activity log the kernel accepts: 16 GiB in 4 KiB blocks.
pub const MAX_AL_BLOCKS: u64 = (16 << 30) / BLOCK_BYTES;

/// Where the meta data is placed relative to the device it lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// At the end of the data device (`meta-disk internal`).
    Internal,
    /// On a separate device that it fills completely (`meta-disk /dev/x`).
    FlexExternal,
    /// In fixed 128 MiB slot `n` of a separate device (`meta-disk /dev/x[n]`).
    Indexed(u32),
}

impl Placement {
    /// Whether this is one of the external placements (superblock first, AL and bitmap after).
    pub fn is_external(self) -> bool {
        !matches!(self, Placement::Internal)
    }

    /// The index argument drbdmeta takes for this placement: `internal`, `flex-external` or
    /// the slot number.
    pub fn drbdmeta_index(self) -> String {
        match self {
            Placement::Internal => "internal".to_owned(),
            Placement::FlexExternal => "flex-external".to_owned(),
            Placement::Indexed(n) => n.to_string(),
        }
    }
}

/// Shape of the on-disk activity-log ring: `stripes` stripes of `stripe_size_4k` 4 KiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AlGeometry {
    stripes: u32,
    stripe_size_4k: u32,
}

impl AlGeometry {
    /// The default (and pre-8.4 fixed) activity log: one stripe of 8 blocks, 32 KiB.
    pub const DEFAULT: AlGeometry = AlGeometry {
        stripes: 1,
        stripe_size_4k: 8,
    };

    /// Validates a striping: at least one stripe, and 32 KiB ..= 16 GiB in total (the limits
    /// the kernel enforces when it reads a superblock).
    pub fn new(stripes: u32, stripe_size_4k: u32) -> Result<Self, MetaError> {
        let blocks = u64::from(stripes) * u64::from(stripe_size_4k);
        if stripes == 0 || stripe_size_4k == 0 || !(MIN_AL_BLOCKS..=MAX_AL_BLOCKS).contains(&blocks)
        {
            return Err(MetaError::BadAlStripes {
                stripes,
                stripe_size_4k,
            });
        }
        Ok(AlGeometry {
            stripes,
            stripe_size_4k,
        })
    }

    /// Number of stripes.
    pub fn stripes(self) -> u32 {
        self.stripes
    }

    /// Blocks per stripe.
    pub fn stripe_size_4k(self) -> u32 {
        self.stripe_size_4k
    }

    /// Total number of 4 KiB transaction blocks in the ring.
    pub fn blocks(self) -> u32 {
        // Cannot overflow: `new` bounds the product by MAX_AL_BLOCKS (2^22).
        self.stripes * self.stripe_size_4k
    }

    /// Ring size in sectors.
    pub fn size_sectors(self) -> u32 {
        // At most 2^25, see `blocks`.
        self.blocks() * 8
    }

    /// Ring size in bytes.
    pub fn size_bytes(self) -> u64 {
        u64::from(self.blocks()) * BLOCK_BYTES
    }
}

impl Default for AlGeometry {
    fn default() -> Self {
        AlGeometry::DEFAULT
    }
}

fn align_up(value: u64, alignment: u64) -> u64 {
    debug_assert!(alignment.is_power_of_two());
    value.div_ceil(alignment) * alignment
}

/// Checks that `bytes_per_bit` is a power-of-two multiple of 4096, as drbdmeta requires.
pub fn check_bytes_per_bit(bytes_per_bit: u32) -> Result<(), MetaError> {
    if bytes_per_bit < DEFAULT_BM_BYTES_PER_BIT || !bytes_per_bit.is_power_of_two() {
        return Err(MetaError::BadBytesPerBit(bytes_per_bit));
    }
    Ok(())
}

/// Size in bytes of the on-disk bitmap that tracks `sectors` of data at `bytes_per_bit`.
///
/// One bit per `bytes_per_bit` of data (rounded up), the bit count rounded up to whole 64-bit
/// words (for 32/64-bit interoperability), and the byte count rounded up to 4 KiB because all
/// meta data IO is done in 4 KiB blocks. Example: 64 MiB of data -> 16384 bits -> 2048 bytes ->
/// 4096 bytes.
pub fn bitmap_bytes(sectors: u64, bytes_per_bit: u32) -> Result<u64, MetaError> {
    if sectors > MAX_DEVICE_SECTORS {
        return Err(MetaError::DeviceTooLarge { sectors });
    }
    check_bytes_per_bit(bytes_per_bit)?;
    let sectors_per_bit = u64::from(bytes_per_bit >> 9);
    let bits = align_up(sectors.div_ceil(sectors_per_bit), 64);
    Ok(align_up(bits / 8, BLOCK_BYTES))
}

/// Byte offset of the superblock for `placement` on a device of `device_bytes`.
///
/// Fails like drbdmeta when the device is smaller than [`MIN_DEVICE_BYTES`], or when the slot of
/// an indexed placement does not start at least 4 KiB before the end of the device.
pub fn md_offset(placement: Placement, device_bytes: u64) -> Result<u64, MetaError> {
    if device_bytes < MIN_DEVICE_BYTES {
        return Err(MetaError::DeviceTooSmall { size: device_bytes });
    }
    let offset = match placement {
        // The last 4 KiB-aligned 4 KiB block.
        Placement::Internal => (device_bytes - BLOCK_BYTES) & !(BLOCK_BYTES - 1),
        Placement::FlexExternal => 0,
        Placement::Indexed(index) => {
            u64::from(index) * u64::from(INDEXED_SLOT_SECTORS) * SECTOR_BYTES
        }
    };
    if offset > device_bytes - BLOCK_BYTES {
        return Err(MetaError::IndexBeyondDevice {
            md_offset: offset,
            size: device_bytes,
        });
    }
    Ok(offset)
}

/// A complete, consistent meta data layout on one device.
///
/// Constructed either for a new meta data area ([`Layout::for_create`]) or from a validated
/// superblock ([`SuperblockV08::layout`](super::SuperblockV08::layout)). The constructors
/// guarantee that the superblock and the activity log lie inside the device, so the byte
/// offsets returned by the accessors never underflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    placement: Placement,
    device_bytes: u64,
    md_offset: u64,
    md_size_sect: u32,
    al_offset_sect: i32,
    bm_offset_sect: i32,
    al: AlGeometry,
}

impl Layout {
    /// The layout `create-md` writes for `placement` on a device (the meta device for external
    /// placements) of `device_bytes`, with activity log `al`.
    pub fn for_create(
        placement: Placement,
        device_bytes: u64,
        al: AlGeometry,
    ) -> Result<Layout, MetaError> {
        let md_offset = md_offset(placement, device_bytes)?;
        let al_sect = al.size_sectors();
        let (md_size_sect, al_offset_sect, bm_offset_sect) = match placement {
            Placement::Internal => {
                let bm_sect = align_up(
                    bitmap_bytes(device_bytes / SECTOR_BYTES, DEFAULT_BM_BYTES_PER_BIT)?
                        / SECTOR_BYTES,
                    8,
                );
                if bm_sect > MAX_FLEX_BITMAP_BYTES / SECTOR_BYTES {
                    return Err(MetaError::BitmapTooLarge);
                }
                // bm_sect <= 2^26 and al_sect <= 2^25, so this fits into u32 and i32.
                let md_size = bm_sect + 8 + u64::from(al_sect);
                let md_size = u32::try_from(md_size).map_err(|_| MetaError::BitmapTooLarge)?;
                let bm_offset =
                    8 - i32::try_from(md_size).map_err(|_| MetaError::BitmapTooLarge)?;
                (md_size, -(al_sect as i32), bm_offset)
            }
            // drbdmeta stores the device size in sectors into the 32-bit md_size_sect field,
            // truncating for meta devices of 2 TiB and more; we do the same to stay
            // byte-compatible.
            Placement::FlexExternal => (
                (device_bytes / SECTOR_BYTES) as u32,
                EXTERNAL_AL_OFFSET_SECTORS,
                EXTERNAL_AL_OFFSET_SECTORS + al_sect as i32,
            ),
            Placement::Indexed(_) => (
                INDEXED_SLOT_SECTORS,
                EXTERNAL_AL_OFFSET_SECTORS,
                EXTERNAL_AL_OFFSET_SECTORS + al_sect as i32,
            ),
        };
        let layout = Layout {
            placement,
            device_bytes,
            md_offset,
            md_size_sect,
            al_offset_sect,
            bm_offset_sect,
            al,
        };
        layout.check_in_device()?;
        // Everything create-md writes must be inside the device and inside the meta data area.
        let bm_end = u128::from(layout.bm_offset()) + u128::from(layout.create_bitmap_bytes());
        if bm_end > u128::from(device_bytes) {
            return Err(MetaError::MetaAreaOutOfDevice {
                start: i128::from(layout.bm_offset()),
                end: bm_end as i128,
                size: device_bytes,
            });
        }
        if placement.is_external() {
            // drbdmeta checks every write against [md_offset, md_offset + md_size_sect).
            let area_bytes = u64::from(layout.md_size_sect) * SECTOR_BYTES;
            if bm_end > u128::from(md_offset) + u128::from(area_bytes) {
                return Err(MetaError::BitmapExceedsMetaArea {
                    bitmap_bytes: layout.create_bitmap_bytes(),
                    area_bytes,
                });
            }
        }
        Ok(layout)
    }

    /// Builds a layout from superblock fields that the caller has already checked for
    /// consistency; verifies that superblock and AL are inside the device.
    pub(crate) fn from_parts(
        placement: Placement,
        device_bytes: u64,
        md_offset: u64,
        md_size_sect: u32,
        al_offset_sect: i32,
        bm_offset_sect: i32,
        al: AlGeometry,
    ) -> Result<Layout, MetaError> {
        let layout = Layout {
            placement,
            device_bytes,
            md_offset,
            md_size_sect,
            al_offset_sect,
            bm_offset_sect,
            al,
        };
        layout.check_in_device()?;
        Ok(layout)
    }

    /// Superblock, AL and (for internal meta data) the start of the bitmap must be inside the
    /// device.
    fn check_in_device(&self) -> Result<(), MetaError> {
        let md = i128::from(self.md_offset);
        let al = md + i128::from(self.al_offset_sect) * i128::from(SECTOR_BYTES);
        let bm = md + i128::from(self.bm_offset_sect) * i128::from(SECTOR_BYTES);
        let start = md.min(al).min(bm);
        let end = (md + BLOCK_BYTES as i128).max(al + i128::from(self.al.size_bytes()));
        if start < 0 || end > i128::from(self.device_bytes) {
            return Err(MetaError::MetaAreaOutOfDevice {
                start,
                end,
                size: self.device_bytes,
            });
        }
        Ok(())
    }

    /// The placement this layout was computed for.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Size of the device the meta data lives on, in bytes.
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// The activity-log geometry.
    pub fn al(&self) -> AlGeometry {
        self.al
    }

    /// Superblock field `md_size_sect`: size of the whole meta data area in sectors.
    pub fn md_size_sect(&self) -> u32 {
        self.md_size_sect
    }

    /// Superblock field `al_offset`: sector offset of the AL relative to the superblock.
    pub fn al_offset_sect(&self) -> i32 {
        self.al_offset_sect
    }

    /// Superblock field `bm_offset`: sector offset of the bitmap relative to the superblock.
    pub fn bm_offset_sect(&self) -> i32 {
        self.bm_offset_sect
    }

    /// Byte offset of the superblock on the device.
    pub fn md_offset(&self) -> u64 {
        self.md_offset
    }

    fn absolute(&self, offset_sect: i32) -> u64 {
        let abs = i128::from(self.md_offset) + i128::from(offset_sect) * i128::from(SECTOR_BYTES);
        debug_assert!(
            abs >= 0,
            "constructors keep the meta data area inside the device"
        );
        u64::try_from(abs).unwrap_or(0)
    }

    /// Byte offset of the activity log on the device.
    pub fn al_offset(&self) -> u64 {
        self.absolute(self.al_offset_sect)
    }

    /// Byte offset of the bitmap on the device.
    pub fn bm_offset(&self) -> u64 {
        self.absolute(self.bm_offset_sect)
    }

    /// Bytes of bitmap that `create-md` zeroes: drbdmeta sizes this by the size of the device
    /// the meta data lives on (also for external meta data, where that is the meta device).
    pub fn create_bitmap_bytes(&self) -> u64 {
        // Cannot fail: the constructors only accept devices up to MIN..=1 PiB for internal,
        // and larger external devices are clamped to the limit here.
        bitmap_bytes(
            (self.device_bytes / SECTOR_BYTES).min(MAX_DEVICE_SECTORS),
            DEFAULT_BM_BYTES_PER_BIT,
        )
        .unwrap_or(0)
    }

    /// How many sectors of data this meta data can describe (drbdmeta's `max_usable_sect`).
    ///
    /// Internal: everything before the first meta data byte. External: what the bitmap area
    /// (`md_size_sect - bm_offset` sectors) can track at `bytes_per_bit`.
    pub fn max_usable_sectors(&self, bytes_per_bit: u32) -> u64 {
        match self.placement {
            Placement::Internal => {
                self.md_offset.min(self.al_offset()).min(self.bm_offset()) / SECTOR_BYTES
            }
            Placement::FlexExternal | Placement::Indexed(_) => {
                // drbdmeta subtracts in 32-bit unsigned arithmetic; keep that wrap-around.
                let bm_sect =
                    u128::from(self.md_size_sect.wrapping_sub(self.bm_offset_sect as u32));
                // bitmap bytes -> bits, rounded down to whole 64-bit words, -> data bytes
                // -> sectors.
                let bits = bm_sect * 512 * 8 / 64 * 64;
                let sectors = bits * u128::from(bytes_per_bit) / 512;
                u64::try_from(sectors).unwrap_or(u64::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    #[test]
    fn bitmap_bytes_examples() {
        assert_eq!(bitmap_bytes(0, 4096), Ok(0));
        assert_eq!(bitmap_bytes(1, 4096), Ok(4096));
        assert_eq!(bitmap_bytes(64 * MIB / 512, 4096), Ok(4096));
        // 128 MiB per 4 KiB of bitmap.
        assert_eq!(bitmap_bytes(128 * MIB / 512, 4096), Ok(4096));
        assert_eq!(bitmap_bytes(128 * MIB / 512 + 8, 4096), Ok(8192));
        assert_eq!(bitmap_bytes(TIB / 512, 4096), Ok(32 * MIB));
        assert_eq!(bitmap_bytes(1, 4095), Err(MetaError::BadBytesPerBit(4095)));
        assert_eq!(
            bitmap_bytes(1, 12288),
            Err(MetaError::BadBytesPerBit(12288))
        );
        assert!(bitmap_bytes(MAX_DEVICE_SECTORS + 1, 4096).is_err());
    }

    /// Values observed from `drbdmeta 0 v08 DEV internal create-md` + `dump-md`.
    #[test]
    fn internal_matches_drbdmeta() {
        let l = Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        assert_eq!(l.md_size_sect(), 80);
        assert_eq!(l.md_offset(), 67_104_768);
        assert_eq!(l.al_offset(), 67_072_000);
        assert_eq!(l.bm_offset(), 67_067_904);
        assert_eq!(l.al_offset_sect(), -64);
        assert_eq!(l.bm_offset_sect(), -72);
        assert_eq!(l.max_usable_sectors(4096), 130_992);

        let l = Layout::for_create(Placement::Internal, 68 * 1024, AlGeometry::DEFAULT).unwrap();
        assert_eq!(l.md_offset(), 65536);
        assert_eq!(l.al_offset(), 32768);
        assert_eq!(l.bm_offset(), 28672);

        let l = Layout::for_create(Placement::Internal, TIB, AlGeometry::DEFAULT).unwrap();
        assert_eq!(l.md_size_sect(), 32 * 2048 + 72);
        assert_eq!(l.create_bitmap_bytes(), 32 * MIB);
    }

    #[test]
    fn external_matches_drbdmeta() {
        let l = Layout::for_create(Placement::Indexed(2), 300 * MIB, AlGeometry::DEFAULT).unwrap();
        assert_eq!(l.md_size_sect(), 262_144);
        assert_eq!(l.md_offset(), 268_435_456);
        assert_eq!(l.al_offset(), 268_439_552);
        assert_eq!(l.bm_offset(), 268_472_320);
        assert_eq!(l.create_bitmap_bytes(), 12288);

        let l =
            Layout::for_create(Placement::FlexExternal, 300 * MIB, AlGeometry::DEFAULT).unwrap();
        assert_eq!(l.md_size_sect(), 614_400);
        assert_eq!(
            (l.md_offset(), l.al_offset(), l.bm_offset()),
            (0, 4096, 36864)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            Layout::for_create(Placement::Internal, 60 * 1024, AlGeometry::DEFAULT),
            Err(MetaError::DeviceTooSmall { size: 61440 })
        );
        assert_eq!(
            md_offset(Placement::Indexed(3), 300 * MIB),
            Err(MetaError::IndexBeyondDevice {
                md_offset: 402_653_184,
                size: 314_572_800
            })
        );
        // A 16 GiB activity log does not fit on a 1 GiB device.
        let huge_al = AlGeometry::new(1, (MAX_AL_BLOCKS) as u32).unwrap();
        assert!(matches!(
            Layout::for_create(Placement::Internal, GIB, huge_al),
            Err(MetaError::MetaAreaOutOfDevice { .. })
        ));
        // 8 TiB of meta device: the bitmap for that does not fit into a 128 MiB slot.
        assert!(matches!(
            Layout::for_create(Placement::Indexed(0), 8 * TIB, AlGeometry::DEFAULT),
            Err(MetaError::BitmapExceedsMetaArea { .. })
        ));
        // Flexible external meta data on a 2 TiB device: md_size_sect wraps to 0 in drbdmeta.
        assert!(matches!(
            Layout::for_create(Placement::FlexExternal, 2 * TIB, AlGeometry::DEFAULT),
            Err(MetaError::BitmapExceedsMetaArea { .. })
        ));
        assert!(
            Layout::for_create(Placement::FlexExternal, 2 * TIB - 4096, AlGeometry::DEFAULT)
                .is_ok()
        );
        assert!(matches!(
            Layout::for_create(Placement::Internal, 2 << 50, AlGeometry::DEFAULT),
            Err(MetaError::DeviceTooLarge { .. })
        ));
    }

    #[test]
    fn al_geometry_limits() {
        assert!(AlGeometry::new(1, 8).is_ok());
        assert!(AlGeometry::new(1, 7).is_err());
        assert!(AlGeometry::new(0, 8).is_err());
        assert!(AlGeometry::new(8, 1).is_ok());
        assert!(AlGeometry::new(1024, 4096).is_ok());
        assert!(AlGeometry::new(1024, 4097).is_err());
        assert!(AlGeometry::new(u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn internal_layout_invariants_over_sizes() {
        // Every size from the minimum up to 1 PiB (in coarse steps) yields a layout whose
        // bitmap is large enough for the usable data and whose areas are contiguous.
        let mut size = MIN_DEVICE_BYTES;
        while size <= 1 << 50 {
            for delta in [0, 511, 4095] {
                let dev = size + delta;
                let l = Layout::for_create(Placement::Internal, dev, AlGeometry::DEFAULT).unwrap();
                assert!(l.md_offset() + 4096 <= dev);
                assert_eq!(l.al_offset() + 32 * 1024, l.md_offset());
                assert!(l.bm_offset() + l.create_bitmap_bytes() <= l.al_offset());
                let usable = l.max_usable_sectors(4096);
                assert!(bitmap_bytes(usable, 4096).unwrap() <= l.create_bitmap_bytes());
            }
            size = size * 3 / 2;
        }
    }
}
