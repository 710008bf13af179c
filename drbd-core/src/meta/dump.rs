//! Text output of `dump-md`, `show-gi` and `get-gi`, byte-compatible with drbdmeta (v08).
//!
//! Everything here is a pure function of decoded values; the caller reads the device and
//! passes in what drbdmeta would take from the environment (date, host name, command line).

use std::fmt::Write as _;

use super::bitmap::format_bitmap;
use super::flags::*;
use super::layout::{bitmap_bytes, Layout};
use super::{MetaError, SuperblockV08};

/// The three environment-dependent values of the `dump-md` header comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpHeader<'a> {
    /// Date as drbdmeta prints it, see [`format_dump_date`].
    pub date: &'a str,
    /// Host name.
    pub host: &'a str,
    /// The command line, words separated by single spaces (drbdmeta prints its own argv,
    /// e.g. `drbdmeta 0 v08 /dev/sdb1 internal dump-md`).
    pub command: &'a str,
}

/// What `dump-md` derives from the superblock before printing: the (possibly clipped) last
/// agreed size and the size of the bitmap it prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpPlan {
    /// The la-size-sect that is printed: the superblock's value, clipped to what the meta data
    /// can describe.
    pub la_size_sect: u64,
    /// The superblock's value when it had to be clipped.
    pub clipped_from: Option<u64>,
    /// Bytes of bitmap the dump covers (bitmap for `la_size_sect`).
    pub bitmap_bytes: u64,
}

impl DumpPlan {
    /// Computes the plan for a validated superblock and its layout.
    ///
    /// Like drbdmeta, a last agreed size larger than the meta data can track is clipped to
    /// that maximum (the dump then carries a comment saying so), and only the part of the
    /// bitmap that covers the last agreed size is dumped.
    pub fn new(sb: &SuperblockV08, layout: &Layout) -> Result<DumpPlan, MetaError> {
        let max = layout.max_usable_sectors(sb.bm_bytes_per_bit);
        let (la_size_sect, clipped_from) = if sb.la_size_sect > max {
            (max, Some(sb.la_size_sect))
        } else {
            (sb.la_size_sect, None)
        };
        Ok(DumpPlan {
            la_size_sect,
            clipped_from,
            bitmap_bytes: bitmap_bytes(la_size_sect, sb.bm_bytes_per_bit)?,
        })
    }
}

/// Everything of the `dump-md` output that precedes the bitmap, ending with `bm ` (the
/// bitmap text, starting with `{`, follows directly).
pub fn format_dump_head(
    header: &DumpHeader<'_>,
    sb: &SuperblockV08,
    layout: &Layout,
    plan: &DumpPlan,
) -> String {
    let mut s = String::new();
    if let Some(orig) = plan.clipped_from {
        // drbdmeta prints this while opening the device, i.e. before the header.
        let _ = writeln!(
            s,
            "# la-size-sect was too big ({orig}), truncated ({})!",
            plan.la_size_sect
        );
    }
    let _ = write!(
        s,
        "# DRBD meta data dump\n# {}\n# {}> {}\n#\n\n",
        header.date, header.host, header.command
    );
    s.push_str("version \"v08\";\n\n");
    if !sb.is_clean() {
        // Only reachable when the caller decided to dump unclean meta data anyway; the
        // marker line makes a later restore-md of this dump fail to parse.
        s.push_str(
            "This_is_an_unclean_meta_data_dump._Don't_trust_the_bitmap.\n\
             # You should \"apply-al\" first, if you plan to restore this.\n\n",
        );
    }
    let _ = write!(
        s,
        "# md_size_sect {}\n# md_offset {}\n# al_offset {}\n# bm_offset {}\n\n",
        sb.md_size_sect,
        layout.md_offset(),
        layout.al_offset(),
        layout.bm_offset()
    );
    // drbdmeta 9.x prints the per-peer flags of DRBD 9 meta data here, which are always zero
    // for v08; the superblock's real flags are not part of the dump. Kept for compatibility
    // (a dump of ours and of drbdmeta must be interchangeable for restore-md).
    let _ = write!(
        s,
        "uuid {{\n    0x{:016X}; 0x{:016X}; 0x{:016X}; 0x{:016X};\n    flags 0x{:08X};\n}}\n",
        sb.uuids.current, sb.uuids.bitmap, sb.uuids.history[0], sb.uuids.history[1], 0u32
    );
    let _ = writeln!(s, "# al-extents {};", sb.al_nr_extents);
    let _ = writeln!(s, "la-size-sect {};", plan.la_size_sect);
    let _ = writeln!(s, "bm-byte-per-bit {};", sb.bm_bytes_per_bit);
    let _ = writeln!(s, "device-uuid 0x{:016X};", sb.device_uuid);
    // Printed as a signed 32-bit number by drbdmeta.
    let _ = writeln!(
        s,
        "la-peer-max-bio-size {};",
        sb.la_peer_max_bio_size as i32
    );
    let _ = writeln!(s, "al-stripes {};", sb.al_stripes);
    let _ = writeln!(s, "al-stripe-size-4k {};", sb.al_stripe_size_4k);
    // A 32-bit counter in drbdmeta.
    let _ = writeln!(s, "# bm-bytes {};", plan.bitmap_bytes as u32);
    s.push_str("bm ");
    s
}

/// The line after the bitmap.
pub fn format_dump_tail(bits_set: u32) -> String {
    format!("# bits-set {bits_set};\n")
}

/// The complete `dump-md` output for a bitmap held in memory (`bitmap` has the words of
/// [`DumpPlan::bitmap_bytes`] bytes, in host order).
pub fn format_dump_md(
    header: &DumpHeader<'_>,
    sb: &SuperblockV08,
    layout: &Layout,
    bitmap: &[u32],
) -> Result<String, MetaError> {
    let plan = DumpPlan::new(sb, layout)?;
    if bitmap.len() as u64 * 4 != plan.bitmap_bytes {
        return Err(MetaError::BitmapChunk {
            expected: plan.bitmap_bytes / 4,
            got: bitmap.len() as u64,
        });
    }
    let mut s = format_dump_head(header, sb, layout, &plan);
    let (bm, bits) = format_bitmap(bitmap);
    s.push_str(&bm);
    s.push_str(&format_dump_tail(bits));
    Ok(s)
}

/// The `get-gi` line: four UUIDs and seven flag bits, e.g.
/// `0000000000000004:0000000000000000:0000000000000000:0000000000000000:0:0:0:0:0:0:0`.
pub fn format_get_gi(sb: &SuperblockV08) -> String {
    let u = &sb.uuids;
    let mut s = format!(
        "{:016X}:{:016X}:{:016X}:{:016X}",
        u.current, u.bitmap, u.history[0], u.history[1]
    );
    for flag in GET_GI_FLAGS {
        s.push_str(if sb.flags & flag != 0 { ":1" } else { ":0" });
    }
    s.push('\n');
    s
}

/// The `show-gi` output: the `get-gi` line with an explanatory diagram, a summary of the
/// flags and the last agreed size.
pub fn format_show_gi(sb: &SuperblockV08) -> String {
    // The diagram labels the columns of the get-gi line; its text is part of drbdmeta's
    // observable output and must stay as is.
    const ABOVE: [&str; 5] = [
        "       +--<  Current data generation UUID  >-",
        "       |               +--<  Bitmap's base data generation UUID  >-",
        "       |               |                 +--<  younger history UUID  >-",
        "       |               |                 |         +-<  older history  >-",
        "       V               V                 V         V",
    ];
    const BELOW: [&str; 8] = [
        "                                                                    ^ ^ ^ ^ ^ ^ ^",
        "                                      -<  Data consistency flag  >--+ | | | | | |",
        "                             -<  Data was/is currently up-to-date  >--+ | | | | |",
        "                                  -<  Node was/is currently primary  >--+ | | | |",
        "                                  -<  Node was/is currently connected  >--+ | | |",
        "         -<  Node was in the progress of setting all bits in the bitmap  >--+ | |",
        "                        -<  The peer's disk was out-dated or inconsistent  >--+ |",
        "      -<  This node was a crashed primary, and has not seen its peer since   >--+",
    ];
    let f = sb.flags;
    let mut s = String::from("\n");
    for line in ABOVE {
        s.push_str(line);
        s.push('\n');
    }
    s.push_str(&format_get_gi(sb));
    for line in BELOW {
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    let disk = if f & MDF_CONSISTENT == 0 {
        "Inconsistent"
    } else if f & MDF_WAS_UP_TO_DATE != 0 {
        "UpToDate"
    } else {
        "Outdated"
    };
    let _ = writeln!(
        s,
        "flags:{} {}, {}, {}{}{}",
        if f & MDF_CRASHED_PRIMARY != 0 {
            " crashed"
        } else {
            ""
        },
        if f & MDF_PRIMARY_IND != 0 {
            "Primary"
        } else {
            "Secondary"
        },
        if f & MDF_CONNECTED_IND != 0 {
            "Connected"
        } else {
            "StandAlone"
        },
        disk,
        if f & MDF_FULL_SYNC != 0 {
            ", need full sync"
        } else {
            ""
        },
        if f & MDF_PEER_OUT_DATED != 0 {
            ", peer Outdated"
        } else {
            ""
        },
    );
    let _ = writeln!(
        s,
        "meta-data: {}",
        if f & MDF_AL_CLEAN != 0 {
            "clean"
        } else {
            "need apply-al"
        }
    );
    if sb.la_size_sect != 0 {
        let _ = writeln!(
            s,
            "last agreed size: {} ({} sectors)",
            ppsize(sb.la_size_sect >> 1),
            sb.la_size_sect
        );
        let _ = writeln!(
            s,
            "last agreed max bio size: {} Byte",
            sb.la_peer_max_bio_size
        );
    } else {
        s.push_str("zero size device -- never seen peer yet?\n");
    }
    s
}

/// Human-readable size as drbd-utils prints it: `kib` in KiB, scaled down by 1024 (rounding
/// half up) while it has five or more digits, e.g. `65496` -> `64 MB`, `9999` -> `9999 KB`.
pub fn ppsize(kib: u64) -> String {
    const UNITS: [char; 6] = ['K', 'M', 'G', 'T', 'P', 'E'];
    let mut size = kib;
    let mut unit = 0;
    while size >= 10000 && unit < UNITS.len() - 1 {
        size = (size >> 10) + ((size >> 9) & 1);
        unit += 1;
    }
    // drbd-utils prints the value as a 32-bit unsigned number.
    format!("{} {}B", size as u32, UNITS[unit])
}

/// Formats a point in time like drbdmeta's dump header (`%F %T %z [%s]`), in UTC:
/// `2026-11-25 20:39:39 +0000 [1795639179]`.
///
/// drbdmeta uses the local time zone; this crate has no access to time zone data, so it
/// always prints UTC (the header is a comment, ignored by restore-md).
pub fn format_dump_date(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} +0000 [{unix_seconds}]",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Converts days since 1970-01-01 into a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a 400-year era's
    // years; then split into eras, years of era, and day of year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{AlGeometry, Placement};
    use super::*;

    const MIB: u64 = 1 << 20;

    fn header() -> DumpHeader<'static> {
        DumpHeader {
            date: "2026-11-25 20:38:52 +0000 [1795639132]",
            host: "vm",
            command: "drbdmeta 0 v08 /dev/loop0 internal dump-md",
        }
    }

    /// Verbatim output of drbdmeta 9.22 after `create-md` on a 64 MiB loop device.
    #[test]
    fn dump_of_fresh_internal_md() {
        let layout =
            Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let sb = SuperblockV08::new_created(&layout);
        let text = format_dump_md(&header(), &sb, &layout, &[]).unwrap();
        let expected = "\
# DRBD meta data dump
# 2026-11-25 20:38:52 +0000 [1795639132]
# vm> drbdmeta 0 v08 /dev/loop0 internal dump-md
#

version \"v08\";

# md_size_sect 80
# md_offset 67104768
# al_offset 67072000
# bm_offset 67067904

uuid {
    0x0000000000000004; 0x0000000000000000; 0x0000000000000000; 0x0000000000000000;
    flags 0x00000000;
}
# al-extents 257;
la-size-sect 0;
bm-byte-per-bit 4096;
device-uuid 0x0000000000000000;
la-peer-max-bio-size 0;
al-stripes 1;
al-stripe-size-4k 8;
# bm-bytes 0;
bm {
}
# bits-set 0;
";
        assert_eq!(text, expected);
    }

    #[test]
    fn dump_with_size_and_clipping() {
        let layout =
            Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let mut sb = SuperblockV08::new_created(&layout);
        sb.la_size_sect = 130_992;
        let plan = DumpPlan::new(&sb, &layout).unwrap();
        assert_eq!(plan.bitmap_bytes, 4096);
        assert_eq!(plan.clipped_from, None);
        let text = format_dump_md(&header(), &sb, &layout, &[0; 1024]).unwrap();
        assert!(text.contains("la-size-sect 130992;\n"));
        assert!(text.contains("# bm-bytes 4096;\nbm {\n   # at 0kB\n    512 times 0x0000000000000000;\n}\n# bits-set 0;\n"));
        assert!(format_dump_md(&header(), &sb, &layout, &[0; 1023]).is_err());

        sb.la_size_sect = 1 << 30;
        let plan = DumpPlan::new(&sb, &layout).unwrap();
        assert_eq!(plan.la_size_sect, 130_992);
        let text = format_dump_md(&header(), &sb, &layout, &[0; 1024]).unwrap();
        assert!(text.starts_with(
            "# la-size-sect was too big (1073741824), truncated (130992)!\n# DRBD meta data dump\n"
        ));
    }

    #[test]
    fn unclean_dump_marker() {
        let layout = Layout::for_create(Placement::Internal, 4 * MIB, AlGeometry::DEFAULT).unwrap();
        let mut sb = SuperblockV08::new_created(&layout);
        sb.flags = 0;
        let text = format_dump_md(&header(), &sb, &layout, &[]).unwrap();
        assert!(text.contains(
            "version \"v08\";\n\nThis_is_an_unclean_meta_data_dump._Don't_trust_the_bitmap.\n\
             # You should \"apply-al\" first, if you plan to restore this.\n\n# md_size_sect 80\n"
        ));
    }

    /// Verbatim output of drbdmeta 9.22 (`show-gi` after set-gi and restore-md).
    #[test]
    fn show_gi_matches_drbdmeta() {
        let layout =
            Layout::for_create(Placement::Internal, 64 * MIB, AlGeometry::DEFAULT).unwrap();
        let mut sb = SuperblockV08::new_created(&layout);
        sb.uuids.current = 0x1234_5678_90AB_CDEF;
        sb.uuids.bitmap = 0xFEDC_BA09_8765_4321;
        sb.uuids.history = [0x1111, 0x2222];
        sb.flags = 0xb5;
        sb.la_size_sect = 130_992;
        sb.la_peer_max_bio_size = 1_048_576;
        let expected = "
       +--<  Current data generation UUID  >-
       |               +--<  Bitmap's base data generation UUID  >-
       |               |                 +--<  younger history UUID  >-
       |               |                 |         +-<  older history  >-
       V               V                 V         V
1234567890ABCDEF:FEDCBA0987654321:0000000000001111:0000000000002222:1:1:0:1:0:1:0
                                                                    ^ ^ ^ ^ ^ ^ ^
                                      -<  Data consistency flag  >--+ | | | | | |
                             -<  Data was/is currently up-to-date  >--+ | | | | |
                                  -<  Node was/is currently primary  >--+ | | | |
                                  -<  Node was/is currently connected  >--+ | | |
         -<  Node was in the progress of setting all bits in the bitmap  >--+ | |
                        -<  The peer's disk was out-dated or inconsistent  >--+ |
      -<  This node was a crashed primary, and has not seen its peer since   >--+

flags: Secondary, Connected, UpToDate, peer Outdated
meta-data: clean
last agreed size: 64 MB (130992 sectors)
last agreed max bio size: 1048576 Byte
";
        assert_eq!(format_show_gi(&sb), expected);
        assert_eq!(
            format_get_gi(&sb),
            "1234567890ABCDEF:FEDCBA0987654321:0000000000001111:0000000000002222:1:1:0:1:0:1:0\n"
        );
        sb.flags = MDF_CRASHED_PRIMARY | MDF_PRIMARY_IND | MDF_FULL_SYNC | MDF_CONSISTENT;
        sb.la_size_sect = 0;
        let text = format_show_gi(&sb);
        assert!(text.ends_with(
            "flags: crashed Primary, StandAlone, Outdated, need full sync\n\
             meta-data: need apply-al\nzero size device -- never seen peer yet?\n"
        ));
    }

    #[test]
    fn ppsize_examples() {
        assert_eq!(ppsize(0), "0 KB");
        assert_eq!(ppsize(4), "4 KB");
        assert_eq!(ppsize(9999), "9999 KB");
        assert_eq!(ppsize(32768), "32 MB");
        assert_eq!(ppsize(65496), "64 MB");
        assert_eq!(ppsize(u64::MAX), "16384 EB");
    }

    #[test]
    fn dates() {
        assert_eq!(format_dump_date(0), "1970-01-01 00:00:00 +0000 [0]");
        assert_eq!(
            format_dump_date(1_795_639_132),
            "2026-11-25 20:38:52 +0000 [1795639132]"
        );
        assert_eq!(
            format_dump_date(951_782_400),
            "2000-02-29 00:00:00 +0000 [951782400]"
        );
        assert_eq!(format_dump_date(-1), "1969-12-31 23:59:59 +0000 [-1]");
    }
}
