//! The v08 superblock (DRBD 8.4 `struct meta_data_on_disk`, drbdmeta's `md_on_disk_08`).
//!
//! One 4096-byte block, all integers big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | la_size_sect: last agreed device size in sectors |
//! | 8 | 32 | `uuid[4]`: current, bitmap, `history[0]`, `history[1]` |
//! | 40 | 8 | device_uuid |
//! | 48 | 8 | reserved |
//! | 56 | 4 | flags (`MDF_*`) |
//! | 60 | 4 | magic |
//! | 64 | 4 | md_size_sect |
//! | 68 | 4 | al_offset (signed sectors from the superblock) |
//! | 72 | 4 | al_nr_extents |
//! | 76 | 4 | bm_offset (signed sectors from the superblock) |
//! | 80 | 4 | bm_bytes_per_bit |
//! | 84 | 4 | la_peer_max_bio_size |
//! | 88 | 4 | al_stripes |
//! | 92 | 4 | al_stripe_size_4k |
//! | 96 | 4000 | zero |

use super::layout::{
    bitmap_bytes, check_bytes_per_bit, md_offset, AlGeometry, Layout, Placement, SECTOR_BYTES,
};
use super::{flags, MetaError, EXTERNAL_AL_OFFSET_SECTORS};

/// Size of the superblock block in bytes.
pub const SUPERBLOCK_BYTES: usize = 4096;

/// DRBD's base magic; the meta data magics are small offsets from it.
pub const DRBD_MAGIC: u32 = 0x8374_0267;
/// Magic of v07 (DRBD 0.7) meta data.
pub const MAGIC_V07: u32 = DRBD_MAGIC + 3;
/// Magic of clean v08 meta data (DRBD 8.0 .. 8.4).
pub const MAGIC_V08: u32 = DRBD_MAGIC + 4;
/// Magic a DRBD 8.4 kernel writes while the device is attached ("unclean": the AL may hold
/// extents that need to be applied to the bitmap).
pub const MAGIC_84_UNCLEAN: u32 = DRBD_MAGIC + 5;
/// Magic of v09 (DRBD 9) meta data.
pub const MAGIC_V09: u32 = DRBD_MAGIC + 6;

/// The current UUID `create-md` writes: "just created", never synced with anybody.
pub const UUID_JUST_CREATED: u64 = 4;

/// The `al_nr_extents` value `create-md` writes (drbdmeta calls it arbitrary; the kernel
/// rewrites it with the configured `al-extents` on attach).
pub const CREATE_MD_AL_EXTENTS: u32 = 257;

/// Which of the two v08 magics a superblock carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Magic {
    /// `MAGIC_V08`: written by drbdmeta and by pre-8.4 kernels.
    V08,
    /// `MAGIC_84_UNCLEAN`: written by an 8.4 kernel while attached.
    V84Unclean,
}

impl Magic {
    /// The on-disk value.
    pub fn value(self) -> u32 {
        match self {
            Magic::V08 => MAGIC_V08,
            Magic::V84Unclean => MAGIC_84_UNCLEAN,
        }
    }

    /// Recognises a v08 magic value.
    pub fn from_value(value: u32) -> Option<Magic> {
        match value {
            MAGIC_V08 => Some(Magic::V08),
            MAGIC_84_UNCLEAN => Some(Magic::V84Unclean),
            _ => None,
        }
    }
}

/// The four generation UUIDs of a v08 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuids {
    /// Current data generation.
    pub current: u64,
    /// Base generation of the bitmap (0 when the bitmap is empty / not in use).
    pub bitmap: u64,
    /// Younger and older history generations.
    pub history: [u64; 2],
}

/// A decoded v08 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SuperblockV08 {
    /// Last agreed size of the replicated device, in sectors.
    pub la_size_sect: u64,
    /// Generation UUIDs.
    pub uuids: Uuids,
    /// Identifies the backing device (drbdmeta `create-md` writes 0).
    pub device_uuid: u64,
    /// `MDF_*` flags, see [`flags`].
    pub flags: u32,
    /// Clean or 8.4-unclean magic.
    pub magic: Magic,
    /// Size of the whole meta data area in sectors.
    pub md_size_sect: u32,
    /// Signed sector offset of the activity log from the superblock.
    pub al_offset: i32,
    /// Number of AL extents in use when last written.
    pub al_nr_extents: u32,
    /// Signed sector offset of the bitmap from the superblock.
    pub bm_offset: i32,
    /// Bytes of data per bitmap bit (4096).
    pub bm_bytes_per_bit: u32,
    /// Last known max bio size of the peer.
    pub la_peer_max_bio_size: u32,
    /// Activity-log stripes.
    pub al_stripes: u32,
    /// Activity-log stripe size in 4 KiB blocks.
    pub al_stripe_size_4k: u32,
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

impl SuperblockV08 {
    /// The superblock `create-md` writes for `layout`: current UUID "just created", everything
    /// else zero, the AL marked clean.
    pub fn new_created(layout: &Layout) -> SuperblockV08 {
        SuperblockV08 {
            la_size_sect: 0,
            uuids: Uuids {
                current: UUID_JUST_CREATED,
                ..Uuids::default()
            },
            device_uuid: 0,
            flags: flags::MDF_AL_CLEAN,
            magic: Magic::V08,
            md_size_sect: layout.md_size_sect(),
            al_offset: layout.al_offset_sect(),
            al_nr_extents: CREATE_MD_AL_EXTENTS,
            bm_offset: layout.bm_offset_sect(),
            bm_bytes_per_bit: super::DEFAULT_BM_BYTES_PER_BIT,
            la_peer_max_bio_size: 0,
            al_stripes: layout.al().stripes(),
            al_stripe_size_4k: layout.al().stripe_size_4k(),
        }
    }

    /// Serialises into the 4096-byte on-disk block (reserved space zeroed).
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &self.la_size_sect.to_be_bytes());
        put(8, &self.uuids.current.to_be_bytes());
        put(16, &self.uuids.bitmap.to_be_bytes());
        put(24, &self.uuids.history[0].to_be_bytes());
        put(32, &self.uuids.history[1].to_be_bytes());
        put(40, &self.device_uuid.to_be_bytes());
        // 48..56: reserved u64, zero.
        put(56, &self.flags.to_be_bytes());
        put(60, &self.magic.value().to_be_bytes());
        put(64, &self.md_size_sect.to_be_bytes());
        put(68, &self.al_offset.to_be_bytes());
        put(72, &self.al_nr_extents.to_be_bytes());
        put(76, &self.bm_offset.to_be_bytes());
        put(80, &self.bm_bytes_per_bit.to_be_bytes());
        put(84, &self.la_peer_max_bio_size.to_be_bytes());
        put(88, &self.al_stripes.to_be_bytes());
        put(92, &self.al_stripe_size_4k.to_be_bytes());
        b
    }

    /// Extracts the fields of a v08 superblock, checking only the buffer length and the magic.
    ///
    /// A superblock written before 8.4 has zero striping fields; like drbdmeta and the kernel,
    /// that is read as the fixed 32 KiB activity log (1 stripe of 8 blocks).
    pub fn parse(block: &[u8]) -> Result<SuperblockV08, MetaError> {
        if block.len() != SUPERBLOCK_BYTES {
            return Err(MetaError::BufferLength {
                need: SUPERBLOCK_BYTES,
                got: block.len(),
            });
        }
        let raw_magic = be_u32(block, 60);
        let magic = Magic::from_value(raw_magic).ok_or(MetaError::BadMagic { found: raw_magic })?;
        let (mut al_stripes, mut al_stripe_size_4k) = (be_u32(block, 88), be_u32(block, 92));
        if al_stripes == 0 && al_stripe_size_4k == 0 {
            al_stripes = 1;
            al_stripe_size_4k = 8;
        }
        Ok(SuperblockV08 {
            la_size_sect: be_u64(block, 0),
            uuids: Uuids {
                current: be_u64(block, 8),
                bitmap: be_u64(block, 16),
                history: [be_u64(block, 24), be_u64(block, 32)],
            },
            device_uuid: be_u64(block, 40),
            flags: be_u32(block, 56),
            magic,
            md_size_sect: be_u32(block, 64),
            al_offset: be_u32(block, 68) as i32,
            al_nr_extents: be_u32(block, 72),
            bm_offset: be_u32(block, 76) as i32,
            bm_bytes_per_bit: be_u32(block, 80),
            la_peer_max_bio_size: be_u32(block, 84),
            al_stripes,
            al_stripe_size_4k,
        })
    }

    /// Parses and validates a superblock read from `placement` on a device of `device_bytes`
    /// (the meta device for external placements).
    pub fn decode(
        block: &[u8],
        placement: Placement,
        device_bytes: u64,
    ) -> Result<SuperblockV08, MetaError> {
        let sb = SuperblockV08::parse(block)?;
        sb.layout(placement, device_bytes)?;
        Ok(sb)
    }

    /// Validates the superblock against where it was found and returns the layout it
    /// describes.
    ///
    /// The checks and their order follow drbdmeta's validity test, so the first failure
    /// reported is the one drbdmeta reports: activity-log striping (a kernel limit drbdmeta
    /// leaves implicit), then the AL offset, the bitmap granularity, the bitmap offset and,
    /// for internal meta data, the size of the meta data area, which must be exactly what the
    /// device size calls for (a device that was resized without moving its meta data fails
    /// here, as in drbdmeta). Finally, superblock and AL must lie inside the device.
    pub fn layout(&self, placement: Placement, device_bytes: u64) -> Result<Layout, MetaError> {
        let md_offset = md_offset(placement, device_bytes)?;
        let al = AlGeometry::new(self.al_stripes, self.al_stripe_size_4k)?;
        let al_sect = i64::from(al.size_sectors());
        match placement {
            Placement::Internal => {
                if i64::from(self.al_offset) != -al_sect {
                    return Err(MetaError::InternalAlOffset {
                        expected: -al_sect,
                        found: self.al_offset,
                    });
                }
                check_bytes_per_bit(self.bm_bytes_per_bit)?;
                let bm_bytes = bitmap_bytes(device_bytes / SECTOR_BYTES, self.bm_bytes_per_bit)?;
                let md_size = (bm_bytes / SECTOR_BYTES).div_ceil(8) * 8 + 8 + al_sect as u64;
                let expected_bm = 8 - md_size as i64;
                if i64::from(self.bm_offset) != expected_bm {
                    return Err(MetaError::InternalBmOffset {
                        expected: expected_bm,
                        found: self.bm_offset,
                    });
                }
                if u64::from(self.md_size_sect) != md_size {
                    return Err(MetaError::InternalMdSize {
                        expected: md_size,
                        found: self.md_size_sect,
                    });
                }
            }
            Placement::FlexExternal | Placement::Indexed(_) => {
                if self.al_offset != EXTERNAL_AL_OFFSET_SECTORS {
                    return Err(MetaError::ExternalAlOffset {
                        found: self.al_offset,
                    });
                }
                let expected_bm = i64::from(EXTERNAL_AL_OFFSET_SECTORS) + al_sect;
                if i64::from(self.bm_offset) != expected_bm {
                    return Err(MetaError::ExternalBmOffset {
                        expected: expected_bm,
                        found: self.bm_offset,
                    });
                }
                check_bytes_per_bit(self.bm_bytes_per_bit)?;
            }
        }
        Layout::from_parts(
            placement,
            device_bytes,
            md_offset,
            self.md_size_sect,
            self.al_offset,
            self.bm_offset,
            al,
        )
    }

    /// Whether the activity log is clean: v08 magic (not 8.4-unclean) and `MDF_AL_CLEAN` set.
    /// drbdmeta refuses to dump unclean meta data (the bitmap may be missing AL extents).
    pub fn is_clean(&self) -> bool {
        self.magic == Magic::V08 && self.flags & flags::MDF_AL_CLEAN != 0
    }
}

/// Maximum number of peers of DRBD 9 meta data.
pub const V09_PEERS_MAX: u32 = 32;

/// What `create-md` learns when it looks for DRBD 9 (v09) meta data where v08 meta data is
/// to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V09Probe {
    /// Whether drbdmeta would consider it valid v09 meta data.
    pub valid: bool,
    /// The complaints drbdmeta prints about it (it prints some even for valid meta data).
    pub messages: Vec<String>,
}

/// Checks a superblock-sized block for DRBD 9 meta data the way drbdmeta does before creating
/// v08 meta data over it. Returns `None` when the block does not carry the v09 magic.
///
/// Only the fields drbdmeta checks are looked at (v09 superblock: al_offset at 68, bm_offset
/// at 76, bm_bytes_per_bit at 80, bm_max_peers at 88, node_id at 92, al_stripes at 96,
/// al_stripe_size_4k at 100, per-peer slots of 32 bytes from 112 with bitmap_index at +20).
pub fn probe_v09(block: &[u8], placement: Placement, device_bytes: u64) -> Option<V09Probe> {
    if block.len() != SUPERBLOCK_BYTES || be_u32(block, 60) != MAGIC_V09 {
        return None;
    }
    let invalid = |message: String| {
        Some(V09Probe {
            valid: false,
            messages: vec![message],
        })
    };
    let max_peers = be_u32(block, 88).min(V09_PEERS_MAX);
    if max_peers < 1 {
        return invalid(format!("v09 max-peers value {max_peers} out of bounds"));
    }
    let node_limit = V09_PEERS_MAX as i32 + 1;
    let node_id = be_u32(block, 92) as i32;
    if !(-1..=node_limit).contains(&node_id) {
        return invalid(format!("v09 device node-id value {node_id} out of bounds"));
    }
    for peer in 0..max_peers as usize {
        let index = be_u32(block, 112 + 32 * peer + 20) as i32;
        if !(-1..=node_limit).contains(&index) {
            return invalid(format!(
                "v09 peer device {peer} node-id value {index} out of bounds"
            ));
        }
    }
    // drbdmeta multiplies in 32-bit arithmetic and uses the result as a signed int.
    let al_sect = be_u32(block, 96)
        .wrapping_mul(be_u32(block, 100))
        .wrapping_mul(8) as i32;
    let al_offset = be_u32(block, 68) as i32;
    let bm_offset = be_u32(block, 76) as i32;
    let mut messages = Vec::new();
    match placement {
        Placement::FlexExternal | Placement::Indexed(_) => {
            if al_offset != EXTERNAL_AL_OFFSET_SECTORS {
                return invalid(format!(
                    "v09 Magic number (al_offset) not found\n\texpected: 8, found {al_offset}"
                ));
            }
            let expected = EXTERNAL_AL_OFFSET_SECTORS.wrapping_add(al_sect);
            if bm_offset != expected {
                return invalid(format!(
                    "v09 bm_offset: expected {expected}, found {bm_offset}"
                ));
            }
        }
        Placement::Internal => {
            if al_offset != al_sect.wrapping_neg() {
                return invalid(format!(
                    "v09 al_offset: expected {}, found {al_offset}",
                    al_sect.wrapping_neg()
                ));
            }
            // One bitmap per peer, interleaved: the v08 bitmap size before its rounding to
            // 4 KiB, times max_peers, then rounded.
            let bytes_per_bit = be_u32(block, 80);
            let sectors = device_bytes / SECTOR_BYTES;
            if let Err(e) = bitmap_bytes(sectors, bytes_per_bit) {
                return invalid(e.to_string());
            }
            let sectors_per_bit = u64::from(bytes_per_bit >> 9);
            let single = sectors.div_ceil(sectors_per_bit).div_ceil(64) * 64 / 8;
            let total = (single * u64::from(max_peers)).div_ceil(4096) * 4096;
            let md_size = ((total / SECTOR_BYTES).div_ceil(8) * 8) as i64 + 8 + i64::from(al_sect);
            let expected_bm = 8 - md_size;
            if i64::from(bm_offset) != expected_bm {
                return invalid(format!(
                    "strange bm_offset {bm_offset} (expected: {expected_bm})"
                ));
            }
            let found = be_u32(block, 64);
            if i64::from(found) != md_size {
                // Reported, but not held against v09 meta data.
                messages.push(format!(
                    "strange md_size_sect {found} (expected: {})",
                    md_size as u64
                ));
            }
        }
    }
    Some(V09Probe {
        valid: true,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    /// The superblock drbdmeta 9.22 wrote on a 64 MiB loop device (`create-md`, then `set-gi
    /// 1234567890ABCDEF:FEDCBA0987654321:1111:2222:1:1:0:1:0:1:0`), first 96 bytes.
    const DRBDMETA_64M: [u8; 96] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x12, 0x34, 0x56, 0x78, 0x90, 0xab, 0xcd,
        0xef, 0xfe, 0xdc, 0xba, 0x09, 0x87, 0x65, 0x43, 0x21, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x11, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x22, 0x22, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xb5,
        0x83, 0x74, 0x02, 0x6b, 0x00, 0x00, 0x00, 0x50, 0xff, 0xff, 0xff, 0xc0, 0x00, 0x00, 0x01,
        0x01, 0xff, 0xff, 0xff, 0xb8, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x01, 0x00, 0x00, 0x00, 0x08,
    ];

    fn block_from(prefix: &[u8]) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        b[..prefix.len()].copy_from_slice(prefix);
        b
    }

    #[test]
    fn decodes_drbdmeta_block() {
        let block = block_from(&DRBDMETA_64M);
        let sb = SuperblockV08::decode(&block, Placement::Internal, 64 * MIB).unwrap();
        assert_eq!(sb.uuids.current, 0x1234_5678_90AB_CDEF);
        assert_eq!(sb.uuids.bitmap, 0xFEDC_BA09_8765_4321);
        assert_eq!(sb.uuids.history, [0x1111, 0x2222]);
        assert_eq!(sb.flags, 0xb5);
        assert_eq!(sb.md_size_sect, 80);
        assert_eq!((sb.al_offset, sb.bm_offset), (-64, -72));
        assert_eq!(sb.al_nr_extents, 257);
        assert!(sb.is_clean());
        assert_eq!(sb.encode(), block);
    }

    #[test]
    fn created_superblock_matches_drbdmeta() {
        let layout =
            Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let sb = SuperblockV08::new_created(&layout);
        let mut expected = DRBDMETA_64M;
        // create-md (before set-gi): current UUID 4, others 0, flags AL_CLEAN.
        expected[8..40].fill(0);
        expected[15] = 4;
        expected[59] = 0x80;
        assert_eq!(sb.encode(), block_from(&expected));
        assert_eq!(sb.layout(Placement::Internal, 64 * MIB), Ok(layout));
    }

    #[test]
    fn validation_errors_match_drbdmeta_messages() {
        let good = block_from(&DRBDMETA_64M);
        let dev = 4 * MIB;
        let layout = Layout::for_create(Placement::Internal, dev, AlGeometry::DEFAULT).unwrap();
        let mut sb = SuperblockV08::new_created(&layout);
        sb.al_offset = 16;
        let err = sb.layout(Placement::Internal, dev).unwrap_err();
        assert_eq!(err.to_string(), "v08 al_offset: expected -64, found 16");
        sb.al_offset = -64;
        sb.bm_offset = 16;
        let err = sb.layout(Placement::Internal, dev).unwrap_err();
        assert_eq!(err.to_string(), "strange bm_offset 16 (expected: -72)");
        sb.bm_offset = -72;
        sb.md_size_sect = 16;
        let err = sb.layout(Placement::Internal, dev).unwrap_err();
        assert_eq!(err.to_string(), "strange md_size_sect 16 (expected: 80)");
        sb.md_size_sect = 80;
        sb.bm_bytes_per_bit = 0x1001;
        assert_eq!(
            sb.layout(Placement::Internal, dev),
            Err(MetaError::BadBytesPerBit(0x1001))
        );
        // 8192 bytes per bit is accepted (drbdmeta accepts power-of-two multiples of 4096).
        sb.bm_bytes_per_bit = 8192;
        assert!(sb.layout(Placement::Internal, dev).is_ok());

        // The 64 MiB superblock is still valid on a 128 MiB device (same bitmap size), but not
        // on one that needs a larger bitmap.
        assert!(SuperblockV08::decode(&good, Placement::Internal, 128 * MIB).is_ok());
        assert_eq!(
            SuperblockV08::decode(&good, Placement::Internal, 256 * MIB),
            Err(MetaError::InternalBmOffset {
                expected: -80,
                found: -72
            })
        );
        // Nor as external meta data.
        let err = SuperblockV08::decode(&good, Placement::FlexExternal, 64 * MIB).unwrap_err();
        assert_eq!(
            err.to_string(),
            "v08 Magic number (al_offset) not found\n\texpected: 8, found -64"
        );
        let mut zero = [0u8; SUPERBLOCK_BYTES];
        assert_eq!(
            SuperblockV08::decode(&zero, Placement::Internal, 64 * MIB),
            Err(MetaError::BadMagic { found: 0 })
        );
        zero[60..64].copy_from_slice(&MAGIC_84_UNCLEAN.to_be_bytes());
        assert_eq!(
            SuperblockV08::parse(&zero).unwrap().magic,
            Magic::V84Unclean
        );
        assert!(!SuperblockV08::parse(&zero).unwrap().is_clean());
        assert!(SuperblockV08::parse(&zero[..100]).is_err());
    }

    #[test]
    fn pre_84_striping_defaults() {
        let mut block = block_from(&DRBDMETA_64M);
        block[88..96].fill(0);
        let sb = SuperblockV08::decode(&block, Placement::Internal, 64 * MIB).unwrap();
        assert_eq!((sb.al_stripes, sb.al_stripe_size_4k), (1, 8));
    }

    #[test]
    fn external_validation() {
        for placement in [
            Placement::FlexExternal,
            Placement::Indexed(0),
            Placement::Indexed(2),
        ] {
            let layout = Layout::for_create(placement, 300 * MIB, AlGeometry::DEFAULT).unwrap();
            let sb = SuperblockV08::new_created(&layout);
            assert_eq!(sb.layout(placement, 300 * MIB), Ok(layout));
            let mut bad = sb;
            bad.bm_offset = 80;
            assert_eq!(
                bad.layout(placement, 300 * MIB).unwrap_err().to_string(),
                "v08 bm_offset: expected 72, found 80"
            );
        }
    }

    /// The v09 superblock drbdmeta 9.22 wrote with `v09 ... internal create-md 2` on a 64 MiB
    /// loop device: the fields its validity check looks at.
    fn v09_block() -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put(12, 4);
        put(56, 0x80);
        put(60, MAGIC_V09);
        put(64, 80);
        put(68, -64i32 as u32);
        put(72, 257);
        put(76, -72i32 as u32);
        put(80, 4096);
        put(88, 2);
        put(92, u32::MAX);
        put(96, 1);
        put(100, 8);
        put(132, u32::MAX);
        put(164, u32::MAX);
        b
    }

    #[test]
    fn v09_detection() {
        let block = v09_block();
        let valid = V09Probe {
            valid: true,
            messages: vec![],
        };
        assert_eq!(
            probe_v09(&block, Placement::Internal, 64 * MIB),
            Some(valid)
        );
        let probe = probe_v09(&block, Placement::FlexExternal, 64 * MIB).unwrap();
        assert!(!probe.valid);
        assert_eq!(
            probe.messages,
            vec!["v09 Magic number (al_offset) not found\n\texpected: 8, found -64".to_owned()]
        );
        // Two bitmaps for 128 MiB need 8 KiB: the offsets no longer fit.
        let probe = probe_v09(&block, Placement::Internal, 128 * MIB).unwrap();
        assert!(!probe.valid);
        assert_eq!(
            probe.messages,
            vec!["strange bm_offset -72 (expected: -80)".to_owned()]
        );
        // A wrong md_size_sect alone is reported but not held against v09 meta data.
        let mut odd = block;
        odd[64..68].copy_from_slice(&16u32.to_be_bytes());
        let probe = probe_v09(&odd, Placement::Internal, 64 * MIB).unwrap();
        assert!(probe.valid);
        assert_eq!(
            probe.messages,
            vec!["strange md_size_sect 16 (expected: 80)".to_owned()]
        );
        // A v08 block is not v09; a v08 block with the v09 magic is invalid v09 (drbdmeta 9.22
        // prints exactly this).
        let mut v08 = block_from(&DRBDMETA_64M);
        assert_eq!(probe_v09(&v08, Placement::Internal, 64 * MIB), None);
        v08[60..64].copy_from_slice(&MAGIC_V09.to_be_bytes());
        let probe = probe_v09(&v08, Placement::Internal, 64 * MIB).unwrap();
        assert_eq!(
            (probe.valid, probe.messages),
            (
                false,
                vec!["v09 al_offset: expected 0, found -64".to_owned()]
            )
        );
    }

    fn arb_superblock() -> impl Strategy<Value = SuperblockV08> {
        (
            (any::<u64>(), any::<[u64; 4]>(), any::<u64>(), any::<u32>()),
            (
                any::<bool>(),
                any::<u32>(),
                any::<i32>(),
                any::<u32>(),
                any::<i32>(),
            ),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        )
            .prop_filter(
                "pre-8.4 striping is normalised on parse",
                |(_, _, (_, _, stripes, size))| *stripes != 0 || *size != 0,
            )
            .prop_map(
                |(
                    (la, u, dev_uuid, flags),
                    (unclean, md_size, al_off, al_ext, bm_off),
                    (bpb, bio, stripes, size),
                )| SuperblockV08 {
                    la_size_sect: la,
                    uuids: Uuids {
                        current: u[0],
                        bitmap: u[1],
                        history: [u[2], u[3]],
                    },
                    device_uuid: dev_uuid,
                    flags,
                    magic: if unclean {
                        Magic::V84Unclean
                    } else {
                        Magic::V08
                    },
                    md_size_sect: md_size,
                    al_offset: al_off,
                    al_nr_extents: al_ext,
                    bm_offset: bm_off,
                    bm_bytes_per_bit: bpb,
                    la_peer_max_bio_size: bio,
                    al_stripes: stripes,
                    al_stripe_size_4k: size,
                },
            )
    }

    fn arb_placement() -> impl Strategy<Value = Placement> {
        prop_oneof![
            Just(Placement::Internal),
            Just(Placement::FlexExternal),
            (0u32..300).prop_map(Placement::Indexed),
            any::<u32>().prop_map(Placement::Indexed),
        ]
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(sb in arb_superblock()) {
            prop_assert_eq!(SuperblockV08::parse(&sb.encode()), Ok(sb));
        }

        #[test]
        fn created_layouts_validate(
            placement in arb_placement(),
            dev in (68u64 * 1024)..(1u64 << 44),
            stripes in 1u32..4,
            size in 8u32..64,
        ) {
            let al = AlGeometry::new(stripes, size).unwrap();
            if let Ok(layout) = Layout::for_create(placement, dev, al) {
                let sb = SuperblockV08::new_created(&layout);
                let block = sb.encode();
                prop_assert_eq!(SuperblockV08::decode(&block, placement, dev), Ok(sb));
                prop_assert_eq!(sb.layout(placement, dev), Ok(layout));
            }
        }

        #[test]
        fn probe_v09_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 4096),
            placement in arb_placement(),
            dev in any::<u64>(),
        ) {
            bytes[60..64].copy_from_slice(&MAGIC_V09.to_be_bytes());
            prop_assert!(probe_v09(&bytes, placement, dev).is_some());
        }

        #[test]
        fn decode_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..5000),
            placement in arb_placement(),
            dev in any::<u64>(),
        ) {
            let _ = SuperblockV08::decode(&bytes, placement, dev);
        }

        #[test]
        fn decode_never_panics_with_v08_magic(
            mut bytes in proptest::collection::vec(any::<u8>(), 4096),
            unclean in any::<bool>(),
            small_offsets in any::<bool>(),
            placement in arb_placement(),
            dev in any::<u64>(),
        ) {
            let magic = if unclean { MAGIC_84_UNCLEAN } else { MAGIC_V08 };
            bytes[60..64].copy_from_slice(&magic.to_be_bytes());
            if small_offsets {
                // Make it likely to get past the offset checks into the layout arithmetic.
                bytes[68..72].copy_from_slice(&(-64i32).to_be_bytes());
                bytes[88..96].fill(0);
            }
            if let Ok(sb) = SuperblockV08::decode(&bytes, placement, dev) {
                let layout = sb.layout(placement, dev).unwrap();
                let _ = layout.max_usable_sectors(sb.bm_bytes_per_bit);
                prop_assert!(layout.md_offset() + 4096 <= dev);
            }
        }
    }
}
