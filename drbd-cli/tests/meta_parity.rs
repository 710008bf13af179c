//! Parity of our meta data commands (`drbd_cli::meta_cmd`) with drbd-utils' `drbdmeta`.
//!
//! Both tools run on loop devices over sparse files (drbdmeta refuses plain files): meta
//! data created by one is read by the other, outputs are compared line by line (apart from
//! the date/host/command header of `dump-md`), exit codes are compared, and the meta data
//! areas written by both are compared byte by byte.
//!
//! These tests need root, `losetup` with working loop devices, and `drbdmeta` (drbd-utils).
//! Without them each test prints `SKIP: <reason>` to stderr and passes, except under CI (`CI`
//! set), where a missing piece fails the test.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use drbd_cli::meta_cmd::{self, MetaCommand, MetaDisk, MetaTarget};
use drbd_core::meta::{AlGeometry, Layout, Placement};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// The sizes every placement is checked with.
const SIZES: [(&str, u64); 6] = [
    ("1MiB", MIB),
    ("4MiB", 4 * MIB),
    ("64MiB", 64 * MIB),
    ("1GiB", GIB),
    ("100GiB", 100 * GIB),
    ("1TiB", TIB),
];

const PLACEMENTS: [Placement; 4] = [
    Placement::Internal,
    Placement::FlexExternal,
    Placement::Indexed(0),
    Placement::Indexed(2),
];

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

mod common;
use common::{attach_loop, find_tool, setup, sparse, Env, Loop};

fn attach(env: &Env, file: &Path) -> Loop {
    attach_loop(env, file).expect("losetup worked in the environment probe")
}

// ---------------------------------------------------------------------------------------------
// Running both tools
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn index_arg(placement: Placement) -> String {
    match placement {
        Placement::Internal => "internal".into(),
        Placement::FlexExternal => "flex-external".into(),
        Placement::Indexed(n) => n.to_string(),
    }
}

fn cmd_name(cmd: MetaCommand) -> &'static str {
    match cmd {
        MetaCommand::CreateMd { .. } => "create-md",
        MetaCommand::DumpMd => "dump-md",
        MetaCommand::WipeMd { .. } => "wipe-md",
        MetaCommand::ShowGi => "show-gi",
        MetaCommand::GetGi => "get-gi",
    }
}

fn forced(cmd: MetaCommand) -> bool {
    matches!(
        cmd,
        MetaCommand::CreateMd { force: true } | MetaCommand::WipeMd { force: true }
    )
}

/// Runs the real drbdmeta with standard input not a terminal.
fn drbdmeta(env: &Env, minor: u32, dev: &Path, placement: Placement, cmd: MetaCommand) -> Out {
    drbdmeta_args(env, minor, dev, placement, cmd_name(cmd), &[], forced(cmd))
}

fn drbdmeta_args(
    env: &Env,
    minor: u32,
    dev: &Path,
    placement: Placement,
    cmd: &str,
    extra: &[&str],
    force: bool,
) -> Out {
    // drbdmeta remembers the last known size of internal meta data devices per minor and looks
    // at that old position when it finds nothing; our minors are test-only: forget it before
    // and after each run.
    let _ = std::fs::remove_file(format!("/var/lib/drbd/drbd-minor-{minor}.lkbd"));
    let mut command = Command::new(&env.drbdmeta);
    if force {
        command.arg("--force");
    }
    let out = command
        .arg(minor.to_string())
        .arg("v08")
        .arg(dev)
        .arg(index_arg(placement))
        .arg(cmd)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run drbdmeta");
    let _ = std::fs::remove_file(format!("/var/lib/drbd/drbd-minor-{minor}.lkbd"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn target(minor: u32, dev: &Path, placement: Placement) -> MetaTarget {
    let meta = match placement {
        Placement::Internal => MetaDisk::Internal,
        Placement::FlexExternal => MetaDisk::FlexExternal(dev.to_owned()),
        Placement::Indexed(n) => MetaDisk::Indexed(dev.to_owned(), n),
    };
    let disk = if placement == Placement::Internal {
        dev.to_owned()
    } else {
        // The data device is irrelevant for external meta data.
        PathBuf::from("/nonexistent/data-disk")
    };
    MetaTarget { minor, disk, meta }
}

/// Runs our implementation with standard input not a terminal (like drbdmeta above).
fn ours(minor: u32, dev: &Path, placement: Placement, cmd: MetaCommand) -> Out {
    ours_with_input(minor, dev, placement, cmd, None)
}

fn ours_with_input(
    minor: u32,
    dev: &Path,
    placement: Placement,
    cmd: MetaCommand,
    input: Option<&str>,
) -> Out {
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut reader = input.map(|s| std::io::Cursor::new(s.as_bytes().to_vec()));
    let code = meta_cmd::run_with(
        &cmd,
        &target(minor, dev, placement),
        &mut stdout,
        &mut stderr,
        reader.as_mut().map(|r| r as &mut dyn BufRead),
    );
    Out {
        code,
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

/// Drops the three environment-dependent header lines of a dump (date, host, command).
fn without_dump_header(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut kept = Vec::new();
    let mut skip = 0;
    for line in lines {
        if line == "# DRBD meta data dump" {
            skip = 3;
        }
        if skip > 0 {
            skip -= 1;
            continue;
        }
        kept.push(line);
    }
    kept.join("\n")
}

/// Replaces device paths (which differ between the runs) by a placeholder.
fn normalise(out: &Out, paths: &[&Path]) -> Out {
    let fix = |s: &str| {
        let mut s = without_dump_header(s);
        for p in paths {
            s = s.replace(&p.display().to_string(), "<DEV>");
        }
        s
    };
    Out {
        code: out.code,
        stdout: fix(&out.stdout),
        stderr: fix(&out.stderr),
    }
}

fn diff_report(what: &str, theirs: &Out, ours: &Out) -> Option<String> {
    if theirs == ours {
        return None;
    }
    Some(format!(
        "{what}: outputs differ\n--- drbdmeta (exit {}):\n[stdout]\n{}\n[stderr]\n{}\n--- ours (exit {}):\n[stdout]\n{}\n[stderr]\n{}\n",
        theirs.code, theirs.stdout, theirs.stderr, ours.code, ours.stdout, ours.stderr
    ))
}

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut file = File::open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut buf).unwrap();
    buf
}

/// Compares `[start, end)` of two files; returns a description of the first difference.
fn compare_bytes(what: &str, a: &Path, b: &Path, start: u64, end: u64) -> Option<String> {
    const CHUNK: u64 = 8 * MIB;
    let mut offset = start;
    while offset < end {
        let len = CHUNK.min(end - offset);
        let (x, y) = (read_range(a, offset, len), read_range(b, offset, len));
        if x != y {
            let at = x
                .iter()
                .zip(&y)
                .position(|(p, q)| p != q)
                .unwrap_or(x.len().min(y.len()));
            return Some(format!(
                "{what}: bytes differ at offset {} (ours {:02x?}, drbdmeta {:02x?})",
                offset + at as u64,
                x.get(at..at + 16),
                y.get(at..at + 16)
            ));
        }
        offset += len;
    }
    None
}

/// The byte range create-md touches, widened by up to 1 MiB on both sides to catch stray
/// writes, plus the start of the device.
fn meta_window(placement: Placement, size: u64) -> Option<(u64, u64)> {
    let layout = Layout::for_create(placement, size, AlGeometry::DEFAULT).ok()?;
    let start = layout
        .bm_offset()
        .min(layout.al_offset())
        .min(layout.md_offset());
    let end = (layout.md_offset() + 4096)
        .max(layout.al_offset() + 32 * KIB)
        .max(layout.bm_offset() + layout.create_bitmap_bytes());
    Some((start.saturating_sub(MIB), (end + MIB).min(size)))
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} parity failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Parity matrix: create-md in both directions, dump-md / show-gi / get-gi, wipe-md
// ---------------------------------------------------------------------------------------------

fn matrix_case(env: &Env, label: &str, size: u64, placement: Placement, minor: u32) -> Vec<String> {
    let mut failures = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    // A: created by us on the plain file. B: created by drbdmeta on a loop device.
    let a = sparse(dir.path(), "a.img", size);
    let b = sparse(dir.path(), "b.img", size);
    let label = format!("{label} {placement:?}");

    let create = MetaCommand::CreateMd { force: true };
    let ours_create = ours(minor, &a, placement, create);
    let theirs_create = {
        let lb = attach(env, &b);
        let out = drbdmeta(env, minor, &lb.dev, placement, create);
        normalise(&out, &[&lb.dev])
    };
    failures.extend(diff_report(
        &format!("{label} create-md"),
        &theirs_create,
        &normalise(&ours_create, &[&a]),
    ));
    if theirs_create.code != 0 {
        // A refusal (device too small): make sure the other commands agree as well.
        let la = attach(env, &a);
        for cmd in [MetaCommand::DumpMd, MetaCommand::ShowGi, MetaCommand::GetGi] {
            let t = drbdmeta(env, minor, &la.dev, placement, cmd);
            let o = ours(minor, &la.dev, placement, cmd);
            failures.extend(diff_report(&format!("{label} {}", cmd_name(cmd)), &t, &o));
        }
        return failures;
    }

    {
        let la = attach(env, &a);
        let lb = attach(env, &b);
        for cmd in [MetaCommand::DumpMd, MetaCommand::ShowGi, MetaCommand::GetGi] {
            let name = cmd_name(cmd);
            // drbdmeta reads what we created, we read what drbdmeta created.
            let theirs_on_a = normalise(&drbdmeta(env, minor, &la.dev, placement, cmd), &[&la.dev]);
            let ours_on_a = normalise(&ours(minor, &la.dev, placement, cmd), &[&la.dev]);
            let theirs_on_b = normalise(&drbdmeta(env, minor, &lb.dev, placement, cmd), &[&lb.dev]);
            let ours_on_b = normalise(&ours(minor, &lb.dev, placement, cmd), &[&lb.dev]);
            if theirs_on_a.code != 0 {
                failures.push(format!(
                    "{label} {name}: drbdmeta rejects the meta data we created: {theirs_on_a:?}"
                ));
            }
            failures.extend(diff_report(
                &format!("{label} {name} (ours created)"),
                &theirs_on_a,
                &ours_on_a,
            ));
            failures.extend(diff_report(
                &format!("{label} {name} (drbdmeta created)"),
                &theirs_on_b,
                &ours_on_b,
            ));
            failures.extend(diff_report(
                &format!("{label} {name} (both created)"),
                &theirs_on_b,
                &theirs_on_a,
            ));
        }
    }
    // Our dump of the plain file equals drbdmeta's dump of its own loop device.
    let ours_dump_file = normalise(&ours(minor, &b, placement, MetaCommand::DumpMd), &[&b]);
    let theirs_dump = {
        let lb = attach(env, &b);
        normalise(
            &drbdmeta(env, minor, &lb.dev, placement, MetaCommand::DumpMd),
            &[&lb.dev],
        )
    };
    failures.extend(diff_report(
        &format!("{label} dump-md of a plain file"),
        &theirs_dump,
        &ours_dump_file,
    ));

    let Some((start, end)) = meta_window(placement, size) else {
        failures.push(format!(
            "{label}: no layout although both created meta data"
        ));
        return failures;
    };
    failures.extend(compare_bytes(
        &format!("{label} create-md"),
        &a,
        &b,
        start,
        end,
    ));
    failures.extend(compare_bytes(
        &format!("{label} device start"),
        &a,
        &b,
        0,
        (128 * KIB).min(size),
    ));

    // wipe-md: ours on the plain file, drbdmeta on the loop device.
    let wipe = MetaCommand::WipeMd { force: true };
    let ours_wipe = normalise(&ours(minor, &a, placement, wipe), &[&a]);
    let theirs_wipe = {
        let lb = attach(env, &b);
        normalise(&drbdmeta(env, minor, &lb.dev, placement, wipe), &[&lb.dev])
    };
    failures.extend(diff_report(
        &format!("{label} wipe-md"),
        &theirs_wipe,
        &ours_wipe,
    ));
    failures.extend(compare_bytes(
        &format!("{label} wipe-md"),
        &a,
        &b,
        start,
        end,
    ));
    failures
}

fn matrix(test: &str, placement: Placement, minor: u32) {
    let Some((_guard, env)) = setup(test) else {
        return;
    };
    let mut failures = Vec::new();
    for (label, size) in SIZES {
        failures.extend(matrix_case(env, label, size, placement, minor));
    }
    report(failures);
}

#[test]
fn parity_internal() {
    matrix("parity_internal", PLACEMENTS[0], 201);
}

#[test]
fn parity_flex_external() {
    matrix("parity_flex_external", PLACEMENTS[1], 202);
}

#[test]
fn parity_indexed_0() {
    matrix("parity_indexed_0", PLACEMENTS[2], 203);
}

#[test]
fn parity_indexed_2() {
    matrix("parity_indexed_2", PLACEMENTS[3], 204);
}

// ---------------------------------------------------------------------------------------------
// Non-empty bitmaps and set UUIDs, produced by drbdmeta restore-md
// ---------------------------------------------------------------------------------------------

/// A small deterministic pseudo-random generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One item of a dump's bitmap section: `count` times the 64-bit `value`.
#[derive(Clone, Copy)]
struct Run {
    count: u64,
    value: u64,
}

/// A varied bitmap: runs of zeros and ones of all lengths (one line, more than a line, not
/// line-aligned), values whose 32-bit halves differ or repeat, and random words.
fn random_runs(rng: &mut Rng, max_words: u64) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut total = 0;
    while total < max_words {
        let count = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(6),
            2 => 1 + rng.below(20),
            _ => 1 + rng.below(200),
        }
        .min(max_words - total);
        let value = match rng.below(7) {
            0 | 1 => 0,
            2 => u64::MAX,
            3 => 0x0000_0001_0000_0001,
            4 => 0x0000_0000_FFFF_FFFF,
            5 => 1 << rng.below(64),
            _ => rng.next(),
        };
        runs.push(Run { count, value });
        total += count;
    }
    runs
}

fn dump_text(uuids: [u64; 4], flags: u32, la_size: u64, device_uuid: u64, runs: &[Run]) -> String {
    let mut s = String::from("version \"v08\";\n\nuuid {\n");
    s.push_str(&format!(
        "    0x{:016X}; 0x{:016X}; 0x{:016X}; 0x{:016X};\n    flags 0x{flags:08X};\n}}\n",
        uuids[0], uuids[1], uuids[2], uuids[3]
    ));
    s.push_str(&format!(
        "la-size-sect {la_size};\nbm-byte-per-bit 4096;\ndevice-uuid 0x{device_uuid:016X};\n\
         la-peer-max-bio-size 131072;\nal-stripes 1;\nal-stripe-size-4k 8;\nbm {{\n"
    ));
    for run in runs {
        if run.count == 1 {
            s.push_str(&format!("   0x{:016X};\n", run.value));
        } else {
            s.push_str(&format!("   {} times 0x{:016X};\n", run.count, run.value));
        }
    }
    s.push_str("}\n");
    s
}

/// Lets drbdmeta create meta data and restore `dump` into it, then compares dump-md,
/// show-gi and get-gi of both tools, on the loop device and (ours) on the plain file.
fn restore_and_compare(
    env: &Env,
    label: &str,
    size: u64,
    placement: Placement,
    minor: u32,
    dump: &str,
    after_restore: &dyn Fn(&Path),
) -> Vec<String> {
    let mut failures = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let file = sparse(dir.path(), "disk.img", size);
    let dump_file = dir.path().join("dump.txt");
    std::fs::write(&dump_file, dump).unwrap();
    let mut outputs = Vec::new();
    {
        let dev = attach(env, &file);
        let created = drbdmeta(
            env,
            minor,
            &dev.dev,
            placement,
            MetaCommand::CreateMd { force: true },
        );
        assert_eq!(created.code, 0, "{label}: drbdmeta create-md: {created:?}");
        let dump_arg = dump_file.to_str().unwrap();
        let restored = drbdmeta_args(
            env,
            minor,
            &dev.dev,
            placement,
            "restore-md",
            &[dump_arg],
            true,
        );
        assert_eq!(
            restored.code, 0,
            "{label}: drbdmeta restore-md: {restored:?}"
        );
        after_restore(&dev.dev);
        for cmd in [MetaCommand::DumpMd, MetaCommand::ShowGi, MetaCommand::GetGi] {
            let theirs = normalise(&drbdmeta(env, minor, &dev.dev, placement, cmd), &[&dev.dev]);
            let mine = normalise(&ours(minor, &dev.dev, placement, cmd), &[&dev.dev]);
            assert_eq!(
                theirs.code,
                0,
                "{label}: drbdmeta {}: {theirs:?}",
                cmd_name(cmd)
            );
            failures.extend(diff_report(
                &format!("{label} {}", cmd_name(cmd)),
                &theirs,
                &mine,
            ));
            outputs.push((cmd, theirs));
        }
    }
    for (cmd, theirs) in outputs {
        let mine = normalise(&ours(minor, &file, placement, cmd), &[&file]);
        failures.extend(diff_report(
            &format!("{label} {} (plain file)", cmd_name(cmd)),
            &theirs,
            &mine,
        ));
    }
    failures
}

fn usable_sectors(placement: Placement, size: u64) -> u64 {
    Layout::for_create(placement, size, AlGeometry::DEFAULT)
        .unwrap()
        .max_usable_sectors(4096)
}

#[test]
fn parity_bitmaps_and_uuids() {
    let Some((_guard, env)) = setup("parity_bitmaps_and_uuids") else {
        return;
    };
    let mut failures = Vec::new();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let cases = [
        ("64MiB", 64 * MIB, Placement::Internal),
        ("1GiB", GIB, Placement::Internal),
        ("1GiB", GIB, Placement::FlexExternal),
        ("1GiB", GIB, Placement::Indexed(2)),
        ("100GiB", 100 * GIB, Placement::Internal),
    ];
    for (i, (label, size, placement)) in cases.into_iter().enumerate() {
        let la = usable_sectors(placement, size).min(size / 512);
        // For external meta data, drbdmeta's usable size is bounded by the bitmap area, not
        // by the (much smaller) meta device; use half the meta device size as agreed size.
        let la = if placement.is_external() {
            size / 1024
        } else {
            la
        };
        let words = drbd_core::meta::layout::bitmap_bytes(la, 4096).unwrap() / 8;
        // Random content at the start, a long zero stretch, random content at the end.
        let mut runs = random_runs(&mut rng, (words / 3).min(3000));
        let used: u64 = runs.iter().map(|r| r.count).sum();
        let tail = random_runs(&mut rng, ((words - used) / 2).min(3000));
        let tail_words: u64 = tail.iter().map(|r| r.count).sum();
        runs.push(Run {
            count: words - used - tail_words,
            value: 0,
        });
        runs.extend(tail);
        let uuids = [rng.next(), rng.next(), rng.next(), rng.next()];
        let flags = (rng.next() as u32 & 0x7f) | 0x80; // keep MDF_AL_CLEAN
        let dump = dump_text(uuids, flags, la, rng.next(), &runs);
        failures.extend(restore_and_compare(
            env,
            &format!("bitmap {label} {placement:?}"),
            size,
            placement,
            210 + i as u32,
            &dump,
            &|_| (),
        ));
    }
    report(failures);
}

/// Bitmaps larger than drbdmeta's 32 MiB read buffer (devices above 1 TiB): runs around the
/// chunk boundaries are formatted differently from a single-buffer formatter.
#[test]
fn parity_bitmap_chunk_boundaries() {
    let Some((_guard, env)) = setup("parity_bitmap_chunk_boundaries") else {
        return;
    };
    let size = 3 * TIB;
    let layout = Layout::for_create(Placement::Internal, size, AlGeometry::DEFAULT).unwrap();
    let la = layout.max_usable_sectors(4096);
    let words = drbd_core::meta::layout::bitmap_bytes(la, 4096).unwrap() / 8;
    // 64-bit words per 32 MiB chunk.
    let chunk = 4 * MIB;
    assert!(words > 2 * chunk + 100);
    // drbdmeta's restore-md only writes the first 32 MiB of a bitmap, so restore the UUIDs
    // and size with an empty bitmap and write the bits around the boundaries directly.
    let runs = [Run {
        count: words,
        value: 0,
    }];
    let dump = dump_text([0xC0FFEE, 0, 0xBEEF, 0xDEAD], 0x81, la, 0x42, &runs);
    let bm_offset = layout.bm_offset();
    let set = |dev: &Path, first: u64, count: u64, value: u64| {
        let bytes: Vec<u8> = (0..count)
            .flat_map(|_| {
                [
                    (value as u32).to_le_bytes(),
                    ((value >> 32) as u32).to_le_bytes(),
                ]
            })
            .flatten()
            .collect();
        poke(dev, bm_offset + 8 * first, &bytes);
    };
    let ones = u64::MAX;
    let pattern = |dev: &Path| {
        set(dev, 0, 3, 0x0123_4567_89AB_CDEF);
        // One line of ones before the first boundary (printed word by word), 50 after.
        set(dev, chunk - 4, 54, ones);
        // Two lines of ones before the second boundary (a run carried over), 3 after.
        set(dev, 2 * chunk - 8, 11, ones);
        set(dev, 2 * chunk + 3, 7, 0x0000_0001_0000_0001);
        // Ones up to the very end.
        set(dev, words - 20, 20, ones);
    };
    let failures = restore_and_compare(
        env,
        "3TiB chunk boundaries",
        size,
        Placement::Internal,
        220,
        &dump,
        &pattern,
    );
    report(failures);
}

// ---------------------------------------------------------------------------------------------
// Refusals and error paths: same exit code, same output
// ---------------------------------------------------------------------------------------------

/// Runs one command that does not change anything with both tools on the same loop device.
fn both(env: &Env, minor: u32, dev: &Path, placement: Placement, cmd: MetaCommand) -> (Out, Out) {
    let theirs = normalise(&drbdmeta(env, minor, dev, placement, cmd), &[dev]);
    let mine = normalise(&ours(minor, dev, placement, cmd), &[dev]);
    (theirs, mine)
}

/// Runs one command with drbdmeta on one device and with ours on an identically prepared
/// twin device (for commands that change the device).
fn twins(
    env: &Env,
    size: u64,
    minor: u32,
    placement: Placement,
    cmd: MetaCommand,
    prepare: &dyn Fn(&Path),
) -> (Out, Out) {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, theirs: bool| {
        let file = sparse(dir.path(), name, size);
        let dev = attach(env, &file);
        prepare(&dev.dev);
        let out = if theirs {
            drbdmeta(env, minor, &dev.dev, placement, cmd)
        } else {
            ours(minor, &dev.dev, placement, cmd)
        };
        normalise(&out, &[&dev.dev])
    };
    (run("theirs.img", true), run("ours.img", false))
}

fn expect_same(failures: &mut Vec<String>, what: &str, pair: (Out, Out), code: i32) {
    let (theirs, mine) = pair;
    if theirs.code != code {
        failures.push(format!(
            "{what}: drbdmeta exited {} where {code} was expected: {theirs:?}",
            theirs.code
        ));
    }
    failures.extend(diff_report(what, &theirs, &mine));
}

#[test]
fn refusal_device_too_small() {
    let Some((_guard, env)) = setup("refusal_device_too_small") else {
        return;
    };
    let mut failures = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let cmds = [
        MetaCommand::CreateMd { force: true },
        MetaCommand::CreateMd { force: false },
        MetaCommand::DumpMd,
        MetaCommand::ShowGi,
        MetaCommand::GetGi,
        MetaCommand::WipeMd { force: true },
    ];
    // Below drbdmeta's 68 KiB minimum.
    let small = sparse(dir.path(), "small.img", 60 * KIB);
    let dev = attach(env, &small);
    for placement in PLACEMENTS {
        for cmd in cmds {
            let what = format!("60KiB {placement:?} {}", cmd_name(cmd));
            expect_same(
                &mut failures,
                &what,
                both(env, 230, &dev.dev, placement, cmd),
                10,
            );
        }
    }
    drop(dev);
    // The slot of index 2 starts beyond a 200 MiB device.
    let medium = sparse(dir.path(), "medium.img", 200 * MIB);
    let dev = attach(env, &medium);
    for cmd in cmds {
        let what = format!("200MiB Indexed(2) {}", cmd_name(cmd));
        let pair = both(env, 230, &dev.dev, Placement::Indexed(2), cmd);
        expect_same(&mut failures, &what, pair, 10);
    }
    drop(dev);
    // Exactly 68 KiB works.
    let create = MetaCommand::CreateMd { force: true };
    let pair = twins(env, 68 * KIB, 230, Placement::Internal, create, &|_| ());
    expect_same(&mut failures, "68KiB create-md", pair, 0);
    let tiny = sparse(dir.path(), "tiny.img", 68 * KIB);
    let dev = attach(env, &tiny);
    assert_eq!(ours(230, &dev.dev, Placement::Internal, create).code, 0);
    let pair = both(env, 230, &dev.dev, Placement::Internal, MetaCommand::DumpMd);
    expect_same(&mut failures, "68KiB dump-md", pair, 0);
    report(failures);
}

#[test]
fn refusal_existing_meta_data() {
    let Some((_guard, env)) = setup("refusal_existing_meta_data") else {
        return;
    };
    let mut failures = Vec::new();
    for placement in PLACEMENTS {
        let minor = 231;
        let existing = |dev: &Path| {
            let created = drbdmeta(
                env,
                minor,
                dev,
                placement,
                MetaCommand::CreateMd { force: true },
            );
            assert_eq!(created.code, 0, "{created:?}");
        };
        let label = format!("existing {placement:?}");
        let size = 300 * MIB;
        // Without --force and without a terminal: both refuse to overwrite or wipe.
        let no_force = MetaCommand::CreateMd { force: false };
        let pair = twins(env, size, minor, placement, no_force, &existing);
        expect_same(&mut failures, &format!("{label} create-md"), pair, 1);
        let wipe = MetaCommand::WipeMd { force: false };
        let pair = twins(env, size, minor, placement, wipe, &existing);
        expect_same(&mut failures, &format!("{label} wipe-md"), pair, 1);
        // Forced: both overwrite, with the same questions answered.
        let force = MetaCommand::CreateMd { force: true };
        let pair = twins(env, size, minor, placement, force, &existing);
        expect_same(
            &mut failures,
            &format!("{label} create-md --force"),
            pair,
            0,
        );
        // Typed answers (ours only: drbdmeta needs a real terminal for that).
        let dir = tempfile::tempdir().unwrap();
        let file = sparse(dir.path(), "disk.img", size);
        let dev = attach(env, &file);
        existing(&dev.dev);
        let no = ours_with_input(minor, &dev.dev, placement, no_force, Some("no\n"));
        if no.code != 1 || no.stdout != "Operation cancelled.\n" {
            failures.push(format!("{label}: answer 'no' not honoured: {no:?}"));
        }
        // External meta data also finds "some data" (itself) at the start: two questions.
        let yes = ours_with_input(minor, &dev.dev, placement, no_force, Some("yes\nyes\n"));
        if yes.code != 0 {
            failures.push(format!("{label}: answer 'yes' not honoured: {yes:?}"));
        }
    }
    // External meta data in slot 0 is "some data" at the start of the device for slot 2.
    let slot0 = |dev: &Path| {
        let created = drbdmeta(
            env,
            232,
            dev,
            Placement::Indexed(0),
            MetaCommand::CreateMd { force: true },
        );
        assert_eq!(created.code, 0, "{created:?}");
    };
    for force in [false, true] {
        let cmd = MetaCommand::CreateMd { force };
        let what = format!("slot 0 in use, create slot 2, force={force}");
        let pair = twins(env, 300 * MIB, 232, Placement::Indexed(2), cmd, &slot0);
        expect_same(&mut failures, &what, pair, if force { 0 } else { 1 });
    }
    report(failures);
}

#[test]
fn refusal_existing_v09_meta_data() {
    let Some((_guard, env)) = setup("refusal_existing_v09_meta_data") else {
        return;
    };
    let mut failures = Vec::new();
    let minor = 235;
    for placement in [
        Placement::Internal,
        Placement::FlexExternal,
        Placement::Indexed(1),
    ] {
        // DRBD 9 meta data with two peer slots.
        let v09 = |dev: &Path| {
            let _ = std::fs::remove_file(format!("/var/lib/drbd/drbd-minor-{minor}.lkbd"));
            let out = Command::new(&env.drbdmeta)
                .args(["--force", &minor.to_string(), "v09"])
                .arg(dev)
                .args([index_arg(placement).as_str(), "create-md", "2"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success(), "v09 create-md: {out:?}");
        };
        let cmd = MetaCommand::CreateMd { force: false };
        let what = format!("v09 meta data {placement:?} create-md");
        expect_same(
            &mut failures,
            &what,
            twins(env, 300 * MIB, minor, placement, cmd, &v09),
            1,
        );
        // Forced, drbdmeta converts; we refuse without touching the device.
        let dir = tempfile::tempdir().unwrap();
        let file = sparse(dir.path(), "disk.img", 300 * MIB);
        let dev = attach(env, &file);
        v09(&dev.dev);
        let before = read_range(&file, 0, 300 * MIB);
        let out = ours(
            minor,
            &dev.dev,
            placement,
            MetaCommand::CreateMd { force: true },
        );
        if out.code != 30 || read_range(&file, 0, 300 * MIB) != before {
            failures.push(format!("v09 {placement:?} create-md --force: {out:?}"));
        }
    }
    report(failures);
}

/// Puts an ext2/3/4 file system of `fs_bytes` on the start of `dev`: with mkfs.ext4 when
/// available, otherwise by writing the superblock fields drbdmeta looks at.
fn make_ext4(dev: &Path, fs_bytes: u64) {
    if let Some(mkfs) = find_tool("mkfs.ext4") {
        let status = Command::new(mkfs)
            .args(["-q", "-F"])
            .arg(dev)
            .arg(format!("{}k", fs_bytes / KIB))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            return;
        }
    }
    // Superblock at 1024: s_blocks_count (+4), s_log_block_size (+24, 2 = 4 KiB blocks),
    // s_magic (+56), s_feature_compat (+92, has_journal).
    poke(dev, 1024 + 4, &((fs_bytes / 4096) as u32).to_le_bytes());
    poke(dev, 1024 + 24, &2u32.to_le_bytes());
    poke(dev, 1024 + 56, &0xEF53u16.to_le_bytes());
    poke(dev, 1024 + 92, &4u32.to_le_bytes());
}

#[test]
fn refusal_file_system() {
    let Some((_guard, env)) = setup("refusal_file_system") else {
        return;
    };
    let mut failures = Vec::new();
    let minor = 233;
    let size = 64 * MIB;
    // A file system filling the device: refused for every placement, even with --force.
    let full = |dev: &Path| make_ext4(dev, 64 * MIB);
    for placement in [
        Placement::Internal,
        Placement::FlexExternal,
        Placement::Indexed(0),
    ] {
        for force in [false, true] {
            let cmd = MetaCommand::CreateMd { force };
            let what = format!("ext4 64MiB {placement:?} force={force}");
            expect_same(
                &mut failures,
                &what,
                twins(env, size, minor, placement, cmd, &full),
                40,
            );
        }
    }
    // A smaller file system: internal meta data fits behind it; asked, "no" without a
    // terminal, yes when forced.
    let part = |dev: &Path| make_ext4(dev, 16 * MIB);
    for (force, code) in [(false, 1), (true, 0)] {
        let cmd = MetaCommand::CreateMd { force };
        let what = format!("ext4 16MiB of 64MiB internal force={force}");
        expect_same(
            &mut failures,
            &what,
            twins(env, size, minor, Placement::Internal, cmd, &part),
            code,
        );
    }
    // Unrecognised data at the start.
    let data = |dev: &Path| poke(dev, 4000, b"some bytes");
    for placement in [Placement::Internal, Placement::FlexExternal] {
        for (force, code) in [(false, 1), (true, 0)] {
            let cmd = MetaCommand::CreateMd { force };
            let what = format!("some data {placement:?} force={force}");
            expect_same(
                &mut failures,
                &what,
                twins(env, size, minor, placement, cmd, &data),
                code,
            );
        }
    }
    report(failures);
}

/// Overwrites `bytes` at `offset` of a device and flushes it.
fn poke(dev: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.flush().unwrap();
    f.sync_all().unwrap();
}

#[test]
fn refusal_corrupt_superblock() {
    let Some((_guard, env)) = setup("refusal_corrupt_superblock") else {
        return;
    };
    let mut failures = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let md = (size - 4096) & !4095;
    let minor = 234;
    // (what, field offset in the superblock, new value)
    let corruptions: [(&str, u64, Vec<u8>); 7] = [
        ("bad magic", 60, 0x1234_5678u32.to_be_bytes().to_vec()),
        ("v09 magic", 60, 0x8374_026du32.to_be_bytes().to_vec()),
        ("al_offset", 68, 16i32.to_be_bytes().to_vec()),
        ("bm_offset", 76, 16i32.to_be_bytes().to_vec()),
        ("md_size_sect", 64, 16u32.to_be_bytes().to_vec()),
        ("AL not clean", 56, 0u32.to_be_bytes().to_vec()),
        (
            "8.4 unclean magic",
            60,
            0x8374_026cu32.to_be_bytes().to_vec(),
        ),
    ];
    for (what, field, value) in corruptions {
        let file = sparse(dir.path(), "disk.img", size);
        let dev = attach(env, &file);
        let created = drbdmeta(
            env,
            minor,
            &dev.dev,
            Placement::Internal,
            MetaCommand::CreateMd { force: true },
        );
        assert_eq!(created.code, 0);
        poke(&dev.dev, md + field, &value);
        let pair = both(
            env,
            minor,
            &dev.dev,
            Placement::Internal,
            MetaCommand::DumpMd,
        );
        expect_same(&mut failures, &format!("{what} dump-md"), pair, 1);
        for cmd in [
            MetaCommand::ShowGi,
            MetaCommand::GetGi,
            MetaCommand::WipeMd { force: false },
        ] {
            let (theirs, mine) = both(env, minor, &dev.dev, Placement::Internal, cmd);
            failures.extend(diff_report(
                &format!("{what} {}", cmd_name(cmd)),
                &theirs,
                &mine,
            ));
        }
        // create-md over it, without and with --force.
        let corrupt = |d: &Path| {
            let created = drbdmeta(
                env,
                minor,
                d,
                Placement::Internal,
                MetaCommand::CreateMd { force: true },
            );
            assert_eq!(created.code, 0);
            poke(d, md + field, &value);
        };
        for force in [false, true] {
            let cmd = MetaCommand::CreateMd { force };
            let (theirs, mine) = twins(env, size, minor, Placement::Internal, cmd, &corrupt);
            failures.extend(diff_report(
                &format!("{what} create-md force={force}"),
                &theirs,
                &mine,
            ));
        }
        drop(dev);
        std::fs::remove_file(&file).unwrap();
    }
    // A last agreed size beyond what the meta data can track is clipped by every command.
    let file = sparse(dir.path(), "disk.img", size);
    let dev = attach(env, &file);
    let created = drbdmeta(
        env,
        minor,
        &dev.dev,
        Placement::Internal,
        MetaCommand::CreateMd { force: true },
    );
    assert_eq!(created.code, 0);
    poke(&dev.dev, md, &(1u64 << 40).to_be_bytes());
    for cmd in [MetaCommand::DumpMd, MetaCommand::ShowGi, MetaCommand::GetGi] {
        let pair = both(env, minor, &dev.dev, Placement::Internal, cmd);
        expect_same(
            &mut failures,
            &format!("huge la-size {}", cmd_name(cmd)),
            pair,
            0,
        );
    }
    let pair = both(
        env,
        minor,
        &dev.dev,
        Placement::Internal,
        MetaCommand::WipeMd { force: false },
    );
    expect_same(&mut failures, "huge la-size wipe-md", pair, 1);
    // A corrupt bm_bytes_per_bit makes drbdmeta abort on an assertion; we report no valid
    // meta data instead.
    poke(&dev.dev, md + 80, &0x1001u32.to_be_bytes());
    let mine = ours(minor, &dev.dev, Placement::Internal, MetaCommand::DumpMd);
    if mine.code != 1 || !mine.stderr.ends_with("No valid meta data found\n") {
        failures.push(format!("bm_bytes_per_bit 0x1001: {mine:?}"));
    }
    report(failures);
}
