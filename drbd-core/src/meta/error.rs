//! The one error type of the metadata module.

/// Everything that can go wrong when computing a metadata layout or decoding metadata blocks.
///
/// Where `drbdmeta` prints a message for the same condition, the [`Display`](std::fmt::Display)
/// text is drbdmeta's message (without the device name, which the caller knows and adds), so a
/// front end can print it verbatim and stay output-compatible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// A buffer handed to a decoder has the wrong length.
    #[error("expected a buffer of {need} bytes, got {got}")]
    BufferLength {
        /// The length the decoder needs.
        need: usize,
        /// The length it was given.
        got: usize,
    },

    /// The device is smaller than the 68 KiB that drbdmeta insists on (it reads that much to
    /// look for existing file systems).
    #[error("is only {size} bytes. That's not enough.")]
    DeviceTooSmall {
        /// Device size in bytes.
        size: u64,
    },

    /// Indexed external meta data: the 128 MiB slot of that index starts beyond the device.
    #[error(
        "Device too small: expecting meta data block at\nbyte offset {md_offset}, but the device is only {size} bytes."
    )]
    IndexBeyondDevice {
        /// Byte offset of the slot's superblock.
        md_offset: u64,
        /// Device size in bytes.
        size: u64,
    },

    /// The device is larger than the 1 PiB drbdmeta supports (its bitmap size helper asserts
    /// this limit).
    #[error("device of {sectors} sectors is larger than the supported 1 PiB")]
    DeviceTooLarge {
        /// Device size in sectors.
        sectors: u64,
    },

    /// The bitmap of an internal meta data area would exceed the flexible-size limit.
    #[error("Bitmap for that device got too large.")]
    BitmapTooLarge,

    /// Part of the meta data area would lie outside the device (or before its start).
    #[error("meta data area [{start}; {end}) does not fit into the device of {size} bytes")]
    MetaAreaOutOfDevice {
        /// First byte of the area (may be "negative", hence signed).
        start: i128,
        /// One past the last byte of the area.
        end: i128,
        /// Device size in bytes.
        size: u64,
    },

    /// External meta data: the bitmap `create-md` clears does not fit into the meta data
    /// area (the 128 MiB slot of indexed meta data, or the `md_size_sect` of flexible external
    /// meta data, which drbdmeta truncates to 32 bits for meta devices of 2 TiB and more).
    #[error(
        "bitmap of {bitmap_bytes} bytes does not fit into the meta data area of {area_bytes} bytes"
    )]
    BitmapExceedsMetaArea {
        /// Bitmap size in bytes.
        bitmap_bytes: u64,
        /// Size of the meta data area in bytes.
        area_bytes: u64,
    },

    /// The superblock does not carry a v08 magic (neither clean nor 8.4-unclean). This is the
    /// ordinary "there is no meta data here" case; drbdmeta stays silent about it unless verbose.
    #[error("v08 Magic number not found")]
    BadMagic {
        /// The magic value found at offset 60.
        found: u32,
    },

    /// bm_bytes_per_bit is not a power-of-two multiple of 4096.
    #[error("invalid bm-byte-per-bit {0}: must be a power-of-two multiple of 4096")]
    BadBytesPerBit(u32),

    /// The activity-log striping is outside what DRBD supports (1..=N stripes, 32 KiB ..= 16 GiB
    /// in total).
    #[error("invalid activity log striping: {stripes} stripes of {stripe_size_4k} 4k blocks")]
    BadAlStripes {
        /// Number of stripes.
        stripes: u32,
        /// Stripe size in 4 KiB blocks.
        stripe_size_4k: u32,
    },

    /// Internal meta data: al_offset is not minus the AL size.
    #[error("v08 al_offset: expected {expected}, found {found}")]
    InternalAlOffset {
        /// The value the layout requires.
        expected: i64,
        /// The value in the superblock.
        found: i32,
    },

    /// Internal meta data: bm_offset does not match the size-derived layout.
    #[error("strange bm_offset {found} (expected: {expected})")]
    InternalBmOffset {
        /// The value the layout requires.
        expected: i64,
        /// The value in the superblock.
        found: i32,
    },

    /// Internal meta data: md_size_sect does not match the size-derived layout.
    #[error("strange md_size_sect {found} (expected: {expected})")]
    InternalMdSize {
        /// The value the layout requires.
        expected: u64,
        /// The value in the superblock.
        found: u32,
    },

    /// External meta data: al_offset is not 8 (the AL follows the 4 KiB superblock).
    #[error("v08 Magic number (al_offset) not found\n\texpected: 8, found {found}")]
    ExternalAlOffset {
        /// The value in the superblock.
        found: i32,
    },

    /// External meta data: bm_offset is not 8 + AL size.
    #[error("v08 bm_offset: expected {expected}, found {found}")]
    ExternalBmOffset {
        /// The value the layout requires.
        expected: i64,
        /// The value in the superblock.
        found: i32,
    },

    /// An activity-log transaction block does not start with the AL magic.
    #[error("activity log block: bad magic 0x{found:08x}")]
    AlBadMagic {
        /// The magic found.
        found: u32,
    },

    /// An activity-log transaction block fails its crc32c check.
    #[error(
        "activity log block: crc32c mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
    )]
    AlBadCrc {
        /// The checksum stored in the block.
        stored: u32,
        /// The checksum computed over the block.
        computed: u32,
    },

    /// A bitmap chunk handed to the dump formatter has the wrong number of words.
    #[error("bitmap chunk of {got} words where {expected} were expected")]
    BitmapChunk {
        /// Words expected for this chunk.
        expected: u64,
        /// Words given.
        got: u64,
    },
}

impl MetaError {
    /// Whether drbdmeta (without `--verbose`) prints a message for this validation failure.
    ///
    /// A missing magic is the normal "no meta data here" case and drbdmeta says nothing about
    /// it; inconsistent offsets are reported on stderr before "No valid meta data found".
    pub fn reported_by_drbdmeta(&self) -> bool {
        !matches!(self, MetaError::BadMagic { .. })
    }
}
