//! Parity of our activity log (`drbd_core::replication::activity_log`) with drbd-utils'
//! `drbdmeta apply-al`.
//!
//! Meta data is created with `drbdmeta create-md` on a loop device over a sparse file; the AL
//! transactions our [`ActivityLog`] produces for a write workload are written at the ring
//! positions our code computes; the superblock is left the way a crashed 8.4 Primary leaves it
//! (magic "8.4 unclean", `MDF_PRIMARY_IND` set, `MDF_AL_CLEAN` clear); then `drbdmeta
//! apply-al` replays the ring into the on-disk bitmap. The bits it sets must be exactly the
//! 1024 bits of each extent of our active set, and our own [`replay`] of the same ring must
//! yield the same set.
//!
//! These tests need root, `losetup` with working loop devices, and `drbdmeta` (drbd-utils).
//! Without them each test prints `SKIP: <reason>` to stderr and passes, except under CI (`CI`
//! set), where a missing piece fails the test.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use drbd_core::meta::al::{block_of_transaction, initialized_area, AlTransaction, AL_TR_UPDATE};
use drbd_core::meta::flags::{MDF_AL_CLEAN, MDF_PRIMARY_IND};
use drbd_core::meta::{AlGeometry, Layout, Magic, Placement, SuperblockV08};
use drbd_core::replication::activity_log::{
    replay, ActivityLog, AlDecision, BITS_PER_EXTENT, SECTORS_PER_EXTENT,
};
use drbd_core::replication::bitmap::DirtyBitmap;

const MIB: u64 = 1 << 20;

mod common;
use common::{attach_loop, setup, sparse, Env};

/// Runs drbdmeta on internal meta data; returns (exit code, stdout, stderr).
fn drbdmeta(env: &Env, minor: u32, dev: &Path, args: &[&str]) -> (i32, String, String) {
    let lkbd = format!("/var/lib/drbd/drbd-minor-{minor}.lkbd");
    let _ = std::fs::remove_file(&lkbd);
    let out = Command::new(&env.drbdmeta)
        .arg("--force")
        .arg(minor.to_string())
        .arg("v08")
        .arg(dev)
        .arg("internal")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run drbdmeta");
    let _ = std::fs::remove_file(&lkbd);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read_at(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = File::open(dev).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// A small deterministic generator for the workload.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Runs a workload of `writes` random writes over `extents` extents against an activity log
/// of `al_extents` slots, writing each transaction into the AL area; some writes are left in
/// flight. Returns the log.
fn workload(
    dev: &Path,
    layout: &Layout,
    al_extents: u32,
    extents: u64,
    writes: usize,
    seed: u64,
    first_tr: u32,
) -> ActivityLog {
    let mut al = ActivityLog::new(al_extents, layout.al())
        .unwrap()
        .with_next_tr_number(first_tr);
    let mut rng = Lcg(seed);
    let mut in_flight: Vec<(u64, u64)> = Vec::new();
    let mut done = 0;
    while done < writes {
        if !in_flight.is_empty() && (rng.next(3) == 0 || in_flight.len() > 40) {
            let (s, n) = in_flight.swap_remove(rng.next(in_flight.len() as u64) as usize);
            al.complete_io(s, n).unwrap();
            continue;
        }
        let sector = rng.next(extents) * SECTORS_PER_EXTENT + rng.next(SECTORS_PER_EXTENT);
        let len = (1 + rng.next(2048)).min(extents * SECTORS_PER_EXTENT - sector);
        match al.begin_io(sector, len) {
            Ok(AlDecision::Proceed) => {}
            Ok(AlDecision::Transaction(w)) => {
                write_at(dev, layout.al_offset() + w.byte_offset(), &w.block);
            }
            Err(_) => continue,
        }
        in_flight.push((sector, len));
        done += 1;
    }
    al
}

/// The runs of bits the extents cover, adjacent extents merged.
fn expected_runs(extents: &BTreeSet<u32>) -> Vec<std::ops::Range<u64>> {
    let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
    for &e in extents {
        let start = u64::from(e) * BITS_PER_EXTENT;
        match runs.last_mut() {
            Some(r) if r.end == start => r.end += BITS_PER_EXTENT,
            _ => runs.push(start..start + BITS_PER_EXTENT),
        }
    }
    runs
}

/// One scenario: returns (transactions written, active extents).
/// Parameters of one scenario.
#[derive(Debug, Clone, Copy)]
struct Case {
    /// drbdmeta minor number (only names its lock file).
    minor: u32,
    /// Size of the sparse backing file.
    device_bytes: u64,
    /// al-extents; `None`: the value create-md writes (257).
    al_extents: Option<u32>,
    /// Writes in the workload.
    writes: usize,
    /// Workload seed.
    seed: u64,
    /// Number of the first transaction.
    first_tr: u32,
    /// Tear the newest transaction block before replaying.
    tear_newest: bool,
}

impl Case {
    fn new(minor: u32, device_bytes: u64, writes: usize, seed: u64) -> Case {
        Case {
            minor,
            device_bytes,
            al_extents: None,
            writes,
            seed,
            first_tr: 0,
            tear_newest: false,
        }
    }
}

fn scenario(env: &Env, case: Case) -> (u32, usize, Vec<u8>) {
    let Case {
        minor,
        device_bytes,
        al_extents,
        writes,
        seed,
        first_tr,
        tear_newest,
    } = case;
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), "al.img", device_bytes);
    let lo = attach_loop(env, &file).expect("losetup worked in the probe");
    let dev = lo.dev.clone();
    let (code, _, err) = drbdmeta(env, minor, &dev, &["create-md"]);
    assert_eq!(code, 0, "create-md: {err}");
    let layout =
        Layout::for_create(Placement::Internal, device_bytes, AlGeometry::DEFAULT).unwrap();
    let sb_bytes = read_at(&dev, layout.md_offset(), 4096);
    let mut sb = SuperblockV08::parse(&sb_bytes).unwrap();
    let extents = device_bytes / (4 * MIB) - 1;
    let al_extents = al_extents.unwrap_or(sb.al_nr_extents);
    sb.al_nr_extents = al_extents;
    let al = workload(&dev, &layout, al_extents, extents, writes, seed, first_tr);
    let mut active = al.active_extents();
    if tear_newest {
        // A crash while the newest transaction was being written: its block is torn.
        let newest = al.next_tr_number().wrapping_sub(1);
        let at = layout.al_offset() + u64::from(block_of_transaction(newest, layout.al())) * 4096;
        let mut block = read_at(&dev, at, 4096);
        block[2000] ^= 0x5a;
        write_at(&dev, at, &block);
    }

    // Our replay of the ring as written.
    let ring = read_at(&dev, layout.al_offset(), layout.al().size_bytes());
    let ours = replay(&ring, layout.al()).unwrap();
    if tear_newest {
        // Without the newest transaction the log still covers everything it covered before.
        assert!(ours.extents.len() + 2 >= active.len());
        active = ours.extents.clone();
    }
    assert_eq!(ours.extents, active, "our replay");

    // Leave the superblock as a crashed 8.4 Primary does.
    // drbdmeta sizes the bitmap it replays into by the last agreed size: the data area of
    // internal meta data ends where the bitmap starts.
    sb.la_size_sect = layout.bm_offset() / 512;
    sb.magic = Magic::V84Unclean;
    sb.flags = (sb.flags | MDF_PRIMARY_IND) & !MDF_AL_CLEAN;
    write_at(&dev, layout.md_offset(), &sb.encode());

    let (code, out, err) = drbdmeta(env, minor, &dev, &["-v", "apply-al"]);
    assert_eq!(code, 0, "apply-al: {out}{err}");
    let bm_bytes = read_at(&dev, layout.bm_offset(), layout.create_bitmap_bytes());
    let bm = DirtyBitmap::from_disk_bytes(device_bytes / 512, &bm_bytes).unwrap();
    let runs: Vec<_> = bm.dirty_runs().collect();
    let expected = expected_runs(&active);
    assert!(
        runs == expected,
        "bits set by drbdmeta apply-al: {runs:?}\nexpected {expected:?}\napply-al said: {out}{err}"
    );

    // apply-al leaves clean meta data that dump-md accepts, with the same bit count.
    let after = SuperblockV08::parse(&read_at(&dev, layout.md_offset(), 4096)).unwrap();
    assert!(after.is_clean(), "apply-al leaves the AL clean: {after:?}");
    let (code, out, err) = drbdmeta(env, minor, &dev, &["dump-md"]);
    assert_eq!(code, 0, "dump-md: {err}");
    let bits_line = format!("# bits-set {};", active.len() as u64 * BITS_PER_EXTENT);
    assert!(
        out.contains(&bits_line),
        "dump-md lacks {bits_line:?}:\n{out}"
    );
    (al.next_tr_number(), active.len(), ring)
}

/// Fewer transactions than ring blocks: the remaining blocks are create-md's initialized ones.
#[test]
fn apply_al_partial_ring() {
    let Some((_guard, env)) = setup("apply_al_partial_ring") else {
        return;
    };
    let (trs, active, _) = scenario(env, Case::new(240, 256 * MIB, 5, 7));
    assert!(
        trs < 8 && active > 0,
        "{trs} transactions, {active} extents"
    );
}

/// Many transactions with evictions (more extents than al-extents): the 8-block ring wraps
/// many times.
#[test]
fn apply_al_wrapped_ring_with_evictions() {
    let Some((_guard, env)) = setup("apply_al_wrapped_ring_with_evictions") else {
        return;
    };
    let (trs, active, _) = scenario(env, Case::new(241, 2048 * MIB, 2000, 11));
    assert!(trs > 300, "only {trs} transactions");
    assert!(active > 200, "{active} extents");
}

/// A torn newest block: drbdmeta skips it (bad checksum) exactly as our replay does.
#[test]
fn apply_al_torn_newest_block() {
    let Some((_guard, env)) = setup("apply_al_torn_newest_block") else {
        return;
    };
    let (trs, _, _) = scenario(
        env,
        Case {
            tear_newest: true,
            ..Case::new(242, 2048 * MIB, 600, 13)
        },
    );
    assert!(trs > 8, "only {trs} transactions");
}

/// al-extents above 919: the context windows (start 0, 919, 1838, 2757, then 0 again) wrap
/// within the ring, and the ring holds more than one window cycle.
#[test]
fn apply_al_wrapping_context_windows() {
    let Some((_guard, env)) = setup("apply_al_wrapping_context_windows") else {
        return;
    };
    let (trs, active, _) = scenario(
        env,
        Case {
            al_extents: Some(3000),
            ..Case::new(243, 16 * 1024 * MIB, 4000, 17)
        },
    );
    assert!(
        trs > 2000 && active > 2000,
        "{trs} transactions, {active} extents"
    );
}

/// When does `apply-al` replay? The same ring under each combination of magic (v08 or 8.4
/// unclean) and the flags `MDF_PRIMARY_IND` and `MDF_AL_CLEAN`. Observed with drbd-utils
/// 9.22: the ring is replayed exactly when `MDF_PRIMARY_IND` is set, whatever the magic and
/// `MDF_AL_CLEAN`; afterwards the magic is v08, `MDF_AL_CLEAN` is set (other flags are kept)
/// and the ring is re-initialized.
#[test]
fn apply_al_replay_condition() {
    let Some((_guard, env)) = setup("apply_al_replay_condition") else {
        return;
    };
    let minor = 244;
    let device_bytes = 256 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), "cond.img", device_bytes);
    let lo = attach_loop(env, &file).expect("losetup worked in the probe");
    let dev = lo.dev.clone();
    let (code, _, err) = drbdmeta(env, minor, &dev, &["create-md"]);
    assert_eq!(code, 0, "create-md: {err}");
    let layout =
        Layout::for_create(Placement::Internal, device_bytes, AlGeometry::DEFAULT).unwrap();
    let mut sb = SuperblockV08::parse(&read_at(&dev, layout.md_offset(), 4096)).unwrap();
    sb.la_size_sect = layout.bm_offset() / 512;
    let al = workload(&dev, &layout, sb.al_nr_extents, 60, 20, 5, 0);
    let expected_bits = al.active_extents().len() as u64 * BITS_PER_EXTENT;
    let ring = read_at(&dev, layout.al_offset(), layout.al().size_bytes());
    let zero_bm = vec![0u8; layout.create_bitmap_bytes() as usize];
    for magic in [Magic::V08, Magic::V84Unclean] {
        for primary in [0, MDF_PRIMARY_IND] {
            for clean in [0, MDF_AL_CLEAN] {
                write_at(&dev, layout.al_offset(), &ring);
                write_at(&dev, layout.bm_offset(), &zero_bm);
                sb.magic = magic;
                sb.flags = primary | clean;
                write_at(&dev, layout.md_offset(), &sb.encode());
                let (code, out, err) = drbdmeta(env, minor, &dev, &["apply-al"]);
                let case = format!("{magic:?} flags {:#x}: {out}{err}", sb.flags);
                assert_eq!(code, 0, "{case}");
                let bm = read_at(&dev, layout.bm_offset(), layout.create_bitmap_bytes());
                let bits = DirtyBitmap::from_disk_bytes(device_bytes / 512, &bm)
                    .unwrap()
                    .count();
                let want = if primary != 0 { expected_bits } else { 0 };
                assert_eq!(bits, want, "{case}");
                let after = SuperblockV08::parse(&read_at(&dev, layout.md_offset(), 4096)).unwrap();
                assert_eq!(after.magic, Magic::V08, "{case}");
                assert_eq!(after.flags, primary | MDF_AL_CLEAN, "{case}");
                let ring_after = read_at(&dev, layout.al_offset(), layout.al().size_bytes());
                assert!(ring_after == initialized_area(layout.al()), "{case}");
            }
        }
    }
}

/// Transaction numbers wrapping from 0xffffffff to 0 inside the ring, with evictions (so the
/// order of replay matters): drbdmeta orders them wrap-aware, as our replay does.
#[test]
fn apply_al_tr_number_wrap() {
    let Some((_guard, env)) = setup("apply_al_tr_number_wrap") else {
        return;
    };
    // First find out how many transactions the workload writes, then start numbering so
    // that the newest four come after the wrap.
    let (trs, _, _) = scenario(env, Case::new(245, 2048 * MIB, 1500, 19));
    let first = 0u32.wrapping_sub(trs - 4);
    let (next, active, ring) = scenario(
        env,
        Case {
            first_tr: first,
            ..Case::new(245, 2048 * MIB, 1500, 19)
        },
    );
    assert_eq!(next, 4);
    assert!(active > 200, "{active} extents");
    // The check has teeth: ordering by the raw numbers would replay a different set.
    let wrap_aware = replay(&ring, AlGeometry::DEFAULT).unwrap().extents;
    assert_ne!(raw_order_replay(&ring), wrap_aware);
}

/// A deliberately wrong replay that orders transactions by their raw 32-bit numbers.
fn raw_order_replay(ring: &[u8]) -> BTreeSet<u32> {
    let mut trs: Vec<AlTransaction> = ring
        .chunks_exact(4096)
        .filter_map(|b| AlTransaction::decode(b).ok())
        .filter(|t| t.transaction_type == AL_TR_UPDATE)
        .collect();
    trs.sort_by_key(|t| t.tr_number);
    let size = trs.last().map_or(0, |t| usize::from(t.context_size));
    let mut table = vec![u32::MAX; size];
    for t in &trs {
        for (i, &e) in t.context.iter().enumerate() {
            if let Some(slot) = table.get_mut(usize::from(t.context_start_slot_nr) + i) {
                *slot = e;
            }
        }
        for i in 0..usize::from(t.n_updates).min(t.update_slot_nr.len()) {
            if let Some(slot) = table.get_mut(usize::from(t.update_slot_nr[i])) {
                *slot = t.update_extent_nr[i];
            }
        }
    }
    table.into_iter().filter(|&e| e != u32::MAX).collect()
}
