//! Looking for existing data before `create-md` overwrites part of a device.
//!
//! drbdmeta reads the first 68 KiB of the device that will hold the meta data and, unless
//! they are all zero, tries to recognise what is there (swap, LVM2, ext2/3/4, XFS, JFS,
//! reiserfs). Depending on what it finds and where the meta data goes, it refuses (exit 40)
//! or asks for confirmation. This module makes that decision and produces drbdmeta's report
//! text; the caller does the reading, printing and asking.

use std::fmt::Write as _;

use super::layout::{Layout, Placement, DEFAULT_BM_BYTES_PER_BIT};

/// How many bytes from the start of the device the probe looks at.
pub const PROBE_BYTES: usize = 68 * 1024;

/// How much space the data found appears to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedSize {
    /// Unrecognised non-zero data: size unknown, the user is asked.
    Unknown,
    /// A file system of this many KiB.
    Kib(u64),
    /// Something that must never be overwritten (swap space).
    Refuse,
    /// Something whose size could not be determined (an LVM2 physical volume; drbdmeta asks
    /// `pvs`, which this implementation does not do) and which is therefore refused.
    RefuseUnknownSize,
}

/// Data recognised at the start of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundData {
    /// What it is, in drbdmeta's words (`ext3 filesystem`, `some data`, ...).
    pub kind: &'static str,
    /// How much of the device it seems to use.
    pub size: UsedSize,
}

fn byte(data: &[u8], at: usize) -> u8 {
    data.get(at).copied().unwrap_or(0)
}

fn le(data: &[u8], at: usize, len: usize) -> u64 {
    (0..len).fold(0, |acc, i| acc | u64::from(byte(data, at + i)) << (8 * i))
}

fn be(data: &[u8], at: usize, len: usize) -> u64 {
    (0..len).fold(0, |acc, i| acc << 8 | u64::from(byte(data, at + i)))
}

fn has(data: &[u8], at: usize, text: &[u8]) -> bool {
    data.get(at..at + text.len()) == Some(text)
}

fn kib(blocks: u64, block_size: u64) -> UsedSize {
    UsedSize::Kib(blocks.saturating_mul(block_size).div_ceil(1024))
}

/// Examines the first [`PROBE_BYTES`] of a device (shorter input is treated as zero-padded).
/// Returns `None` when they are all zero.
pub fn probe_existing_data(head: &[u8]) -> Option<FoundData> {
    let head = &head[..head.len().min(PROBE_BYTES)];
    if head.iter().all(|&b| b == 0) {
        return None;
    }
    let swap = [4096 - 10, 8192 - 10]
        .iter()
        .any(|&at| has(head, at, b"SWAP-SPACE") || has(head, at, b"SWAPSPACE2"));
    let found = if swap {
        FoundData {
            kind: "swap space signature",
            size: UsedSize::Refuse,
        }
    } else if has(head, 0x218, b"LVM2") {
        FoundData {
            kind: "LVM2 physical volume signature",
            size: UsedSize::RefuseUnknownSize,
        }
    } else if le(head, 0x438, 2) == 0xEF53 {
        // ext2/3/4 superblock at 1024: s_magic at +0x38, s_blocks_count at +0x04,
        // s_log_block_size at +0x18; drbdmeta calls it ext3 when the has_journal compat
        // feature (bit 2 of the byte at +0x5c) is set.
        let kind = if byte(head, 0x45c) & 4 != 0 {
            "ext3 filesystem"
        } else {
            "ext2 filesystem"
        };
        let block_size = match le(head, 0x418, 4) {
            0 => 1024,
            1 => 2048,
            _ => 4096,
        };
        FoundData {
            kind,
            size: kib(le(head, 0x404, 4), block_size),
        }
    } else if be(head, 0, 4) == 0x5846_5342 {
        // "XFSB": sb_blocksize at 4, sb_dblocks at 8, big-endian.
        FoundData {
            kind: "xfs filesystem",
            size: kib(be(head, 8, 8), be(head, 4, 4)),
        }
    } else if has(head, 0x8000, b"JFS1") {
        FoundData {
            kind: "JFS filesystem",
            size: kib(le(head, 0x8008, 8), le(head, 0x8018, 4)),
        }
    } else if has(head, 0x10034, b"ReIsErFs") || has(head, 0x10034, b"ReIsEr2Fs") {
        FoundData {
            kind: "reiser filesystem",
            size: kib(le(head, 0x10000, 4), le(head, 0x1002c, 2)),
        }
    } else {
        FoundData {
            kind: "some data",
            size: UsedSize::Unknown,
        }
    };
    Some(found)
}

/// What `create-md` does about data it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse (drbdmeta exit code 40), even with `--force`.
    Refuse,
    /// Ask "Do you want to proceed?" (answered by `--force`).
    Confirm,
}

const ZERO_OUT_ADVICE: &str = "If you want me to do this, you need to zero out the first part\n\
                               of the device (destroy the content).\n\
                               You should be very sure that you mean it.\n\
                               Operation refused.\n\n";

const TRUNCATE_WARNING: &str = "Device size would be truncated, which\n\
                                would corrupt data and result in\n\
                                'access beyond end of device' errors.\n";

/// drbdmeta's report about `found` (printed on stdout) and the resulting verdict, for meta
/// data about to be created with `layout`.
pub fn existing_data_report(found: &FoundData, layout: &Layout) -> (String, Verdict) {
    let mut s = String::new();
    let _ = write!(
        s,
        "md_offset {}\nal_offset {}\nbm_offset {}\n\nFound {}\n",
        layout.md_offset(),
        layout.al_offset(),
        layout.bm_offset(),
        found.kind
    );
    if found.size == UsedSize::Unknown {
        s.push_str("\n ==> This might destroy existing data! <==\n");
        return (s, Verdict::Confirm);
    }
    if layout.placement() != Placement::Internal {
        // External meta data would overwrite the start of the meta device itself.
        s.push_str("\nThis would corrupt existing data.\n");
        s.push_str(ZERO_OUT_ADVICE);
        return (s, Verdict::Refuse);
    }
    let usable_kib = layout.max_usable_sectors(DEFAULT_BM_BYTES_PER_BIT) / 2;
    if let UsedSize::Kib(used) = found.size {
        let _ = writeln!(s, "{used:>12} kB data area apparently used");
    }
    let _ = writeln!(
        s,
        "{usable_kib:>12} kB left usable by current configuration"
    );
    match found.size {
        UsedSize::Kib(used) if used > usable_kib => {
            s.push('\n');
            s.push_str(TRUNCATE_WARNING);
            s.push_str(
                "You need to either\n   * use external meta data (recommended)\n   \
                 * shrink that filesystem first\n   * zero out the device (destroy the filesystem)\n\
                 Operation refused.\n\n",
            );
            (s, Verdict::Refuse)
        }
        UsedSize::Kib(_) => {
            s.push_str(
                "\nEven though it looks like this would place the new meta data into\n\
                 unused space, you still need to confirm, as this is only a guess.\n",
            );
            (s, Verdict::Confirm)
        }
        UsedSize::Refuse | UsedSize::RefuseUnknownSize | UsedSize::Unknown => {
            if found.size == UsedSize::RefuseUnknownSize {
                s.push_str("Could not determine the size of the actually used data area.\n\n");
            }
            s.push_str(TRUNCATE_WARNING);
            s.push_str(ZERO_OUT_ADVICE);
            (s, Verdict::Refuse)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::AlGeometry;
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn ext_head(blocks: u32, log_block_size: u32, journal: bool) -> Vec<u8> {
        let mut h = vec![0u8; PROBE_BYTES];
        h[0x438..0x43a].copy_from_slice(&0xEF53u16.to_le_bytes());
        h[0x404..0x408].copy_from_slice(&blocks.to_le_bytes());
        h[0x418..0x41c].copy_from_slice(&log_block_size.to_le_bytes());
        if journal {
            h[0x45c] = 4;
        }
        h
    }

    #[test]
    fn recognises_signatures() {
        assert_eq!(probe_existing_data(&[0; PROBE_BYTES]), None);
        assert_eq!(probe_existing_data(&[]), None);
        let f = probe_existing_data(&ext_head(16384, 2, true)).unwrap();
        assert_eq!(f.kind, "ext3 filesystem");
        assert_eq!(f.size, UsedSize::Kib(65536));
        let f = probe_existing_data(&ext_head(100, 0, false)).unwrap();
        assert_eq!((f.kind, f.size), ("ext2 filesystem", UsedSize::Kib(100)));
        let mut h = vec![0u8; PROBE_BYTES];
        h[8182..8192].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(probe_existing_data(&h).unwrap().size, UsedSize::Refuse);
        let mut h = vec![0u8; 10];
        h[3] = 1;
        assert_eq!(probe_existing_data(&h).unwrap().kind, "some data");
        let mut h = vec![0u8; PROBE_BYTES];
        h[0..4].copy_from_slice(b"XFSB");
        h[4..8].copy_from_slice(&4096u32.to_be_bytes());
        h[8..16].copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(
            probe_existing_data(&h).unwrap(),
            FoundData {
                kind: "xfs filesystem",
                size: UsedSize::Kib(4000)
            }
        );
    }

    /// drbdmeta 9.22 on a 64 MiB device holding a whole-device ext4 (from mkfs.ext4).
    #[test]
    fn whole_device_fs_is_refused_for_internal() {
        let layout =
            Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let found = probe_existing_data(&ext_head(16384, 2, true)).unwrap();
        let (text, verdict) = existing_data_report(&found, &layout);
        assert_eq!(verdict, Verdict::Refuse);
        assert_eq!(
            text,
            "md_offset 67104768\nal_offset 67072000\nbm_offset 67067904\n\n\
             Found ext3 filesystem\n       65536 kB data area apparently used\n       \
             65496 kB left usable by current configuration\n\n\
             Device size would be truncated, which\nwould corrupt data and result in\n\
             'access beyond end of device' errors.\nYou need to either\n   \
             * use external meta data (recommended)\n   * shrink that filesystem first\n   \
             * zero out the device (destroy the filesystem)\nOperation refused.\n\n"
        );
        let small = probe_existing_data(&ext_head(1000, 2, true)).unwrap();
        assert_eq!(existing_data_report(&small, &layout).1, Verdict::Confirm);
    }

    #[test]
    fn any_fs_is_refused_for_external() {
        let layout =
            Layout::for_create(Placement::FlexExternal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let found = probe_existing_data(&ext_head(10, 2, true)).unwrap();
        let (text, verdict) = existing_data_report(&found, &layout);
        assert_eq!(verdict, Verdict::Refuse);
        let tail = format!("\nThis would corrupt existing data.\n{ZERO_OUT_ADVICE}");
        assert!(text.ends_with(&tail));
        let unknown = FoundData {
            kind: "some data",
            size: UsedSize::Unknown,
        };
        let (text, verdict) = existing_data_report(&unknown, &layout);
        assert_eq!(verdict, Verdict::Confirm);
        assert!(text.ends_with("Found some data\n\n ==> This might destroy existing data! <==\n"));
    }

    proptest! {
        #[test]
        fn probe_never_panics(head in proptest::collection::vec(any::<u8>(), 0..(PROBE_BYTES + 100))) {
            if let Some(found) = probe_existing_data(&head) {
                let layout = Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
                let _ = existing_data_report(&found, &layout);
            }
        }
    }
}
