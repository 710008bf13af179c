//! The meta data commands of `drbdadm`: `create-md`, `dump-md`, `wipe-md`, `show-gi` and
//! `get-gi`.
//!
//! This is the I/O side around [`drbd_core::meta`]: it opens the device, reads and writes the
//! meta data areas, asks the confirmation questions, and prints what drbd-utils' `drbdmeta`
//! (9.22, format v08) prints, with its exit codes. Differences from drbdmeta, all deliberate:
//!
//! * Regular files are accepted as devices (their length is the device size); drbdmeta wants
//!   block devices unless forced.
//! * No `/var/lib/drbd/drbd-minor-N.lkbd` "last known device" files are written or consulted,
//!   so meta data left behind by an offline resize of the backing device is not found at its
//!   old position.
//! * Valid DRBD 9 (v09) meta data in the way of `create-md` is recognised as drbdmeta
//!   recognises it, but not converted: a yes to drbdmeta's "convert to v08?" question (also
//!   by `--force`) ends the command with exit code 30 and nothing written. Answering no leads
//!   to drbdmeta's "replace it?" question. DRBD 0.7 (v07) meta data is not looked for.
//! * A superblock with a corrupt bm_bytes_per_bit is reported as no valid meta data (exit 1);
//!   drbdmeta aborts on an assertion (exit 134).
//! * An LVM2 physical volume found by `create-md` is refused (drbdmeta asks `pvs` for its size).
//! * The `dump-md` header prints the date in UTC.
//!
//! For external meta data only the meta device is touched; `MetaTarget::disk` (the data
//! device) is not needed, exactly as with drbdmeta.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use drbd_core::meta::al::initialized_area;
use drbd_core::meta::bitmap::BitmapDumper;
use drbd_core::meta::dump::{
    format_dump_date, format_dump_head, format_dump_tail, format_get_gi, format_show_gi, ppsize,
    DumpHeader, DumpPlan,
};
use drbd_core::meta::layout::md_offset;
use drbd_core::meta::probe::{existing_data_report, probe_existing_data, Verdict, PROBE_BYTES};
use drbd_core::meta::superblock::probe_v09;
use drbd_core::meta::{AlGeometry, Layout, MetaError, Placement, SuperblockV08, SUPERBLOCK_BYTES};

/// Which device and which meta data area a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaTarget {
    /// Minor number of the DRBD device (appears in the `dump-md` header).
    pub minor: u32,
    /// The backing (data) device; holds the meta data when it is internal.
    pub disk: PathBuf,
    /// Where the meta data is.
    pub meta: MetaDisk,
}

/// The `meta-disk` setting of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaDisk {
    /// `meta-disk internal;`: at the end of the data device.
    Internal,
    /// `meta-disk /dev/x;`: the whole meta device.
    FlexExternal(PathBuf),
    /// `meta-disk /dev/x[n];`: 128 MiB slot `n` of the meta device.
    Indexed(PathBuf, u32),
}

/// A meta data command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaCommand {
    /// Initialise meta data; `force` answers every question with yes (but does not override
    /// refusals such as a file system in the way).
    CreateMd {
        /// Answer confirmation questions with yes.
        force: bool,
    },
    /// Print the meta data as text (restorable by `drbdmeta restore-md`).
    DumpMd,
    /// Destroy the superblock.
    WipeMd {
        /// Answer the confirmation question with yes.
        force: bool,
    },
    /// Print the generation identifiers with an explanation.
    ShowGi,
    /// Print the generation identifiers as one line.
    GetGi,
}

/// Exit codes, as drbdmeta uses them.
pub mod exit_codes {
    /// Success, also `wipe-md` when there is nothing to wipe.
    pub const OK: i32 = 0;
    /// No valid meta data (`dump-md`, `show-gi`, `get-gi`), unclean meta data (`dump-md`), or
    /// a confirmation question answered with no.
    pub const NO_META_DATA_OR_CANCELLED: i32 = 1;
    /// Device too small, bitmap too large, or a read/write failure.
    pub const DEVICE_OR_IO: i32 = 10;
    /// The device cannot be opened (or is neither a block device nor a regular file).
    pub const OPEN: i32 = 20;
    /// `create-md` was asked to change only the AL striping of existing meta data (not
    /// implemented by drbdmeta either), or to convert DRBD 9 meta data (drbdmeta can, this
    /// implementation cannot).
    pub const NOT_IMPLEMENTED: i32 = 30;
    /// `create-md` refuses to overwrite existing data (a file system, swap, LVM), even with
    /// `--force`.
    pub const REFUSED: i32 = 40;
}

use exit_codes::*;

/// Where output goes and where answers come from.
struct Console<'a> {
    stdout: &'a mut dyn Write,
    stderr: &'a mut dyn Write,
    /// `None` when standard input is not a terminal.
    stdin: Option<&'a mut dyn BufRead>,
}

/// Runs the command, printing to stdout/stderr like drbdmeta does; returns the process exit
/// code drbdmeta would use.
///
/// Confirmation questions are read from standard input when it is a terminal; otherwise
/// (like drbdmeta 9.22) they are answered with no unless the command is forced.
pub fn run(cmd: &MetaCommand, target: &MetaTarget) -> i32 {
    let stdin = io::stdin();
    let is_tty = stdin.is_terminal();
    let mut stdin_lock = stdin.lock();
    run_with(
        cmd,
        target,
        &mut io::stdout(),
        &mut io::stderr(),
        if is_tty { Some(&mut stdin_lock) } else { None },
    )
}

/// [`run`] with explicit output streams and input, for embedding and tests.
///
/// `stdin` is where typed answers to confirmation questions come from; pass `None` when
/// standard input is not a terminal: drbdmeta 9.22 then does not wait for an answer
/// ("stdin not a TTY, not waiting for confirmation") and takes it as no.
pub fn run_with(
    cmd: &MetaCommand,
    target: &MetaTarget,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    stdin: Option<&mut dyn BufRead>,
) -> i32 {
    let force = match *cmd {
        MetaCommand::CreateMd { force } | MetaCommand::WipeMd { force } => force,
        _ => false,
    };
    let mut console = Console {
        stdout,
        stderr,
        // Re-borrow to unify the three independent lifetimes of the arguments.
        stdin: stdin.map(|input| input as &mut dyn BufRead),
    };
    let mut session = Session {
        console: &mut console,
        force,
    };
    let result = match cmd {
        MetaCommand::CreateMd { .. } => session.create_md(target),
        MetaCommand::DumpMd => session.dump_md(target),
        MetaCommand::WipeMd { .. } => session.wipe_md(target),
        MetaCommand::ShowGi => session.show_gi(target, true),
        MetaCommand::GetGi => session.show_gi(target, false),
    };
    let _ = session.console.stdout.flush();
    let _ = session.console.stderr.flush();
    match result {
        Ok(()) => OK,
        Err(code) => code,
    }
}

impl MetaTarget {
    /// The device that holds the meta data.
    pub fn meta_device(&self) -> &Path {
        match &self.meta {
            MetaDisk::Internal => &self.disk,
            MetaDisk::FlexExternal(p) | MetaDisk::Indexed(p, _) => p,
        }
    }

    /// The placement of the meta data on [`meta_device`](MetaTarget::meta_device).
    pub fn placement(&self) -> Placement {
        match self.meta {
            MetaDisk::Internal => Placement::Internal,
            MetaDisk::FlexExternal(_) => Placement::FlexExternal,
            MetaDisk::Indexed(_, n) => Placement::Indexed(n),
        }
    }
}

/// `O_EXCL` on a block device (without `O_CREAT`) makes the open fail with EBUSY while the
/// device is mounted or otherwise claimed. The value is 0o200 on the architectures listed;
/// elsewhere the exclusive open is skipped.
#[cfg(all(
    target_os = "linux",
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
))]
const O_EXCL: Option<i32> = Some(0o200);
#[cfg(not(all(
    target_os = "linux",
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
)))]
const O_EXCL: Option<i32> = None;

/// EBUSY is 16 on every Linux architecture.
const EBUSY: i32 = 16;

/// Bytes of zeros written per call when clearing the bitmap.
const ZERO_CHUNK: usize = 1 << 20;

/// An open meta device.
struct Device {
    file: File,
    path: PathBuf,
    /// Size in bytes (file length or block device size).
    size: u64,
}

/// Error text like C's `strerror`: Rust appends " (os error N)", drbdmeta does not.
fn error_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

/// One command run: the console plus the `--force` flag. Methods return `Err(exit_code)`
/// after having printed the reason.
struct Session<'c, 'a> {
    console: &'c mut Console<'a>,
    force: bool,
}

impl Session<'_, '_> {
    fn out(&mut self, text: &str) {
        let _ = self.console.stdout.write_all(text.as_bytes());
        let _ = self.console.stdout.flush();
    }

    fn err(&mut self, text: &str) {
        // Keep stdout and stderr in order on a terminal.
        let _ = self.console.stdout.flush();
        let _ = self.console.stderr.write_all(text.as_bytes());
        let _ = self.console.stderr.flush();
    }

    /// drbdmeta's confirmation: only the exact answer "yes" (typed on a terminal) counts.
    fn confirm(&mut self, question: &str) -> bool {
        self.err(&format!("\n{question}\n"));
        if self.force {
            self.err("*** confirmation forced via --force option ***\n");
            return true;
        }
        if self.console.stdin.is_none() {
            self.err("stdin not a TTY, not waiting for confirmation\n");
            return false;
        }
        self.err("[need to type 'yes' to confirm] ");
        let mut line = Vec::new();
        let read = match self.console.stdin.as_mut() {
            Some(input) => input.read_until(b'\n', &mut line).is_ok(),
            None => false,
        };
        self.err("\n");
        // drbdmeta compares the first three of exactly four bytes read, i.e. "yes\n".
        read && line.len() == 4 && line.starts_with(b"yes")
    }

    /// Opens the meta device. Internal and flex-external meta data on a block device are
    /// opened exclusively (like drbdmeta), to avoid damaging a device that is in use; if that
    /// fails the user is asked whether to go on anyway.
    fn open(&mut self, target: &MetaTarget, writable: bool) -> Result<Device, i32> {
        let path = target.meta_device();
        let shown = path.display().to_string();
        let metadata = std::fs::metadata(path).map_err(|e| {
            self.err(&format!("open({shown}) failed: {}\n", error_text(&e)));
            OPEN
        })?;
        let file_type = metadata.file_type();
        if !file_type.is_block_device() && !file_type.is_file() {
            self.err(&format!("'{shown}' is not a block device!\n"));
            return Err(OPEN);
        }
        let exclusive = file_type.is_block_device()
            && !matches!(target.placement(), Placement::Indexed(_))
            && O_EXCL.is_some();
        let open = |exclusive: bool| {
            let mut options = OpenOptions::new();
            options.read(true).write(writable);
            if let (true, Some(flag)) = (exclusive, O_EXCL) {
                options.custom_flags(flag);
            }
            options.open(path)
        };
        let mut file = match open(exclusive) {
            Ok(file) => file,
            Err(e) if exclusive && e.raw_os_error() == Some(EBUSY) => {
                self.err(&format!("open({shown}) failed: {}\n", error_text(&e)));
                if !self.confirm("Exclusive open failed. Do it anyways?") {
                    self.out("Operation canceled.\n");
                    return Err(OPEN);
                }
                open(false).map_err(|e| {
                    self.err(&format!("open({shown}) failed: {}\n", error_text(&e)));
                    OPEN
                })?
            }
            Err(e) => {
                self.err(&format!("open({shown}) failed: {}\n", error_text(&e)));
                return Err(OPEN);
            }
        };
        // Seeking to the end yields the size of regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0)).map_err(|e| {
            self.err(&format!("lseek({shown}) failed: {}\n", error_text(&e)));
            OPEN
        })?;
        Ok(Device {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// Where the superblock is, or drbdmeta's complaint about the device size.
    fn md_offset(&mut self, dev: &Device, placement: Placement) -> Result<u64, i32> {
        md_offset(placement, dev.size).map_err(|e| self.layout_error(dev, &e))
    }

    fn layout_error(&mut self, dev: &Device, e: &MetaError) -> i32 {
        let path = dev.path.display();
        let text = match e {
            MetaError::DeviceTooSmall { size } => {
                format!("{path} is only {size} bytes. That's not enough.\n")
            }
            MetaError::IndexBeyondDevice { md_offset, size } => format!(
                "Device too small: expecting meta data block at\n\
                 byte offset {md_offset}, but {path} is only {size} bytes.\n"
            ),
            other => format!("{other}\n"),
        };
        self.err(&text);
        DEVICE_OR_IO
    }

    fn read_at(
        &mut self,
        dev: &Device,
        buf: &mut [u8],
        offset: u64,
        what: &str,
    ) -> Result<(), i32> {
        dev.file.read_exact_at(buf, offset).map_err(|e| {
            self.err(&format!(
                "pread({},...,{},{}) in {what} failed: {}\n",
                dev.path.display(),
                buf.len(),
                offset,
                error_text(&e)
            ));
            DEVICE_OR_IO
        })
    }

    fn write_at(&mut self, dev: &Device, buf: &[u8], offset: u64, what: &str) -> Result<(), i32> {
        // drbdmeta's last line of defence: never write outside the device.
        assert!(
            offset + buf.len() as u64 <= dev.size,
            "meta data write beyond the end of the device"
        );
        dev.file.write_all_at(buf, offset).map_err(|e| {
            self.err(&format!(
                "pwrite({},...,{},{}) in {what} failed: {}\n",
                dev.path.display(),
                buf.len(),
                offset,
                error_text(&e)
            ));
            DEVICE_OR_IO
        })
    }

    fn sync(&mut self, dev: &Device) -> Result<(), i32> {
        dev.file.sync_all().map_err(|e| {
            self.err(&format!(
                "fsync({}) failed: {}\n",
                dev.path.display(),
                error_text(&e)
            ));
            DEVICE_OR_IO
        })
    }

    /// Reads the superblock block and validates it. Validation failures other than a missing
    /// magic are reported the way drbdmeta reports them; `None` means no valid v08 meta data.
    fn read_superblock(
        &mut self,
        dev: &Device,
        placement: Placement,
        md_offset: u64,
    ) -> Result<(Vec<u8>, Option<SuperblockV08>), i32> {
        let mut block = vec![0u8; SUPERBLOCK_BYTES];
        self.read_at(dev, &mut block, md_offset, "md_open")?;
        let mut sb = self.validate(&block, placement, dev.size);
        if let Some(sb) = sb.as_mut() {
            // Like drbdmeta, every command clips a last agreed size that the meta data cannot
            // track while opening the device, and says so on stdout.
            if let Ok(layout) = sb.layout(placement, dev.size) {
                let max = layout.max_usable_sectors(sb.bm_bytes_per_bit);
                if sb.la_size_sect > max {
                    self.out(&format!(
                        "# la-size-sect was too big ({}), truncated ({max})!\n",
                        sb.la_size_sect
                    ));
                    sb.la_size_sect = max;
                }
            }
        }
        Ok((block, sb))
    }

    fn validate(&mut self, block: &[u8], placement: Placement, size: u64) -> Option<SuperblockV08> {
        match SuperblockV08::decode(block, placement, size) {
            Ok(sb) => Some(sb),
            Err(e) => {
                if e.reported_by_drbdmeta() {
                    self.err(&format!("{e}\n"));
                }
                None
            }
        }
    }

    fn create_md(&mut self, target: &MetaTarget) -> Result<(), i32> {
        let placement = target.placement();
        let dev = self.open(target, true)?;
        let md_offset = self.md_offset(&dev, placement)?;
        let (block, existing) = self.read_superblock(&dev, placement, md_offset)?;
        let al = AlGeometry::DEFAULT;
        let path = dev.path.display().to_string();

        if let Some(sb) = existing {
            if placement == Placement::Internal {
                self.err(&format!(
                    "You want me to create a v08 style flexible-size internal meta data block.\n\
                     There appears to be a v08 flexible-size internal meta data block\n\
                     already in place on {path} at byte offset {md_offset}\n"
                ));
                if (sb.al_stripes, sb.al_stripe_size_4k) != (al.stripes(), al.stripe_size_4k())
                    && self
                        .confirm("Do you want to change the activity log stripe settings *only*?")
                {
                    self.err(
                        "Sorry, not yet fully implemented\n\
                         Try dump-md > dump.txt; restore-md -s x -z y dump.txt\n",
                    );
                    return Err(NOT_IMPLEMENTED);
                }
                if !self.confirm("Do you really want to overwrite the existing meta-data?") {
                    self.out("Operation cancelled.\n");
                    return Err(NO_META_DATA_OR_CANCELLED);
                }
            } else if !self
                .confirm("Valid meta data seems to be in place.\nDo you really want to overwrite?")
            {
                self.out("Operation cancelled.\n");
                return Err(NO_META_DATA_OR_CANCELLED);
            }
        } else {
            // drbdmeta looks for meta data of every format a second time, which repeats the
            // complaints about inconsistent v08 meta data, then checks for DRBD 9 meta data.
            self.validate(&block, placement, dev.size);
            self.check_for_v09(&block, placement, &dev, md_offset)?;
        }

        let layout =
            Layout::for_create(placement, dev.size, al).map_err(|e| self.layout_error(&dev, &e))?;
        self.check_for_existing_data(&dev, &layout)?;

        self.out("initializing activity log\n");
        let area = initialized_area(al);
        self.write_at(&dev, &area, layout.al_offset(), "md_initialize_common:AL")?;

        // Zero the bitmap, so that set-gi can declare the devices in sync without a resync
        // (with the "just created" UUID the kernel sets all bits anyway).
        let bitmap_bytes = layout.create_bitmap_bytes();
        self.err(&format!(
            "initializing bitmap ({}) to all zero\n",
            ppsize(bitmap_bytes >> 10)
        ));
        let zeros = vec![0u8; ZERO_CHUNK.min(bitmap_bytes as usize)];
        let mut done = 0;
        while done < bitmap_bytes {
            let n = (bitmap_bytes - done).min(ZERO_CHUNK as u64) as usize;
            self.write_at(
                &dev,
                &zeros[..n],
                layout.bm_offset() + done,
                "md_initialize_common:BM",
            )?;
            done += n as u64;
        }

        self.out("Writing meta data...\n");
        let sb = SuperblockV08::new_created(&layout);
        debug_assert_eq!(sb.layout(placement, dev.size), Ok(layout));
        self.write_at(&dev, &sb.encode(), layout.md_offset(), "md_cpu_to_disk")?;
        self.sync(&dev)?;
        self.out("New drbd meta data block successfully created.\n");
        Ok(())
    }

    /// Valid DRBD 9 meta data where v08 meta data is to be created: drbdmeta offers to
    /// convert it; conversion is not implemented here, so a yes to that question ends the
    /// command (nothing written), and the user is asked to confirm replacing it instead.
    fn check_for_v09(
        &mut self,
        block: &[u8],
        placement: Placement,
        dev: &Device,
        md_offset: u64,
    ) -> Result<(), i32> {
        let Some(probe) = probe_v09(block, placement, dev.size) else {
            return Ok(());
        };
        for message in &probe.messages {
            self.err(&format!("{message}\n"));
        }
        if !probe.valid {
            return Ok(());
        }
        if placement == Placement::Internal {
            self.err(&format!(
                "You want me to create a v08 style flexible-size internal meta data block.\n\
                 There appears to be a v09 flexible-size internal meta data block\n\
                 already in place on {} at byte offset {md_offset}\n",
                dev.path.display()
            ));
        }
        if self.confirm("Valid v09 meta-data found, convert to v08?") {
            self.err(
                "Converting v09 meta data to v08 is not supported; \
                 wipe-md it first to create new v08 meta data.\n",
            );
            return Err(NOT_IMPLEMENTED);
        }
        if !self.confirm(
            "So you want me to replace the v09 meta-data\nwith newly initialized v08 meta-data?",
        ) {
            self.out("Operation cancelled.\n");
            return Err(NO_META_DATA_OR_CANCELLED);
        }
        Ok(())
    }

    /// Looks at the first 68 KiB of the device for data that the new meta data could destroy.
    fn check_for_existing_data(&mut self, dev: &Device, layout: &Layout) -> Result<(), i32> {
        let mut head = vec![0u8; PROBE_BYTES];
        // The device is at least MIN_DEVICE_BYTES (= PROBE_BYTES) long, checked before.
        self.read_at(dev, &mut head, 0, "check_for_existing_data")?;
        let Some(found) = probe_existing_data(&head) else {
            return Ok(());
        };
        let (report, verdict) = existing_data_report(&found, layout);
        self.out(&report);
        match verdict {
            Verdict::Refuse => Err(REFUSED),
            Verdict::Confirm => {
                if self.confirm("Do you want to proceed?") {
                    Ok(())
                } else {
                    self.out("Operation canceled.\n");
                    Err(NO_META_DATA_OR_CANCELLED)
                }
            }
        }
    }

    fn dump_md(&mut self, target: &MetaTarget) -> Result<(), i32> {
        let placement = target.placement();
        let dev = self.open(target, false)?;
        let md_offset = self.md_offset(&dev, placement)?;
        let Some(sb) = self.read_superblock(&dev, placement, md_offset)?.1 else {
            self.err("No valid meta data found\n");
            return Err(NO_META_DATA_OR_CANCELLED);
        };
        if !sb.is_clean() {
            self.err("Found meta data is \"unclean\", please apply-al first\n");
            return Err(NO_META_DATA_OR_CANCELLED);
        }
        let layout = sb
            .layout(placement, dev.size)
            .map_err(|e| self.layout_error(&dev, &e))?;
        let plan = DumpPlan::new(&sb, &layout).map_err(|e| self.layout_error(&dev, &e))?;

        let date = format_dump_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        let host = hostname();
        let command = format!(
            "drbdmeta {} v08 {} {} dump-md",
            target.minor,
            dev.path.display(),
            placement.drbdmeta_index()
        );
        let header = DumpHeader {
            date: &date,
            host: &host,
            command: &command,
        };
        let mut text = format_dump_head(&header, &sb, &layout, &plan);
        let mut dumper = BitmapDumper::new(plan.bitmap_bytes, &mut text);
        self.out(&text);
        let mut bytes = Vec::new();
        while dumper.next_chunk_words() > 0 {
            let words = dumper.next_chunk_words() as usize;
            bytes.resize(words * 4, 0);
            let offset = layout.bm_offset() + dumper.next_chunk_offset();
            self.read_at(&dev, &mut bytes, offset, "fprintf_bm")?;
            let chunk = drbd_core::meta::bitmap::words_from_le_bytes(&bytes);
            text.clear();
            dumper
                .feed(&chunk, &mut text)
                .map_err(|e| self.layout_error(&dev, &e))?;
            self.out(&text);
        }
        text.clear();
        let bits = dumper
            .finish(&mut text)
            .map_err(|e| self.layout_error(&dev, &e))?;
        text.push_str(&format_dump_tail(bits));
        self.out(&text);
        Ok(())
    }

    fn show_gi(&mut self, target: &MetaTarget, pretty: bool) -> Result<(), i32> {
        let placement = target.placement();
        let dev = self.open(target, false)?;
        let md_offset = self.md_offset(&dev, placement)?;
        // drbdmeta says nothing more than the validation messages when there is no meta data.
        let Some(sb) = self.read_superblock(&dev, placement, md_offset)?.1 else {
            return Err(NO_META_DATA_OR_CANCELLED);
        };
        let text = if pretty {
            format_show_gi(&sb)
        } else {
            format_get_gi(&sb)
        };
        self.out(&text);
        Ok(())
    }

    fn wipe_md(&mut self, target: &MetaTarget) -> Result<(), i32> {
        let placement = target.placement();
        let dev = self.open(target, true)?;
        let md_offset = self.md_offset(&dev, placement)?;
        if self
            .read_superblock(&dev, placement, md_offset)?
            .1
            .is_none()
        {
            self.err("There appears to be no drbd meta data to wipe out?\n");
            return Ok(());
        }
        if !self.confirm("Do you really want to wipe out the DRBD meta data?") {
            self.out("Operation cancelled.\n");
            return Err(NO_META_DATA_OR_CANCELLED);
        }
        self.out("Wiping meta data...\n");
        self.write_at(&dev, &[0u8; SUPERBLOCK_BYTES], md_offset, "meta_wipe_md")?;
        self.sync(&dev)?;
        self.out("DRBD meta data block successfully wiped out.\n");
        Ok(())
    }
}

/// The host name as `gethostname()` reports it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim_end().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    struct Output {
        code: i32,
        stdout: String,
        stderr: String,
    }

    fn run_on(cmd: MetaCommand, target: &MetaTarget, answer: Option<&str>) -> Output {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut input = answer.map(|a| Cursor::new(a.as_bytes().to_vec()));
        let code = run_with(
            &cmd,
            target,
            &mut stdout,
            &mut stderr,
            input.as_mut().map(|c| c as &mut dyn BufRead),
        );
        Output {
            code,
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }

    fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    fn internal(path: &Path) -> MetaTarget {
        MetaTarget {
            minor: 7,
            disk: path.to_owned(),
            meta: MetaDisk::Internal,
        }
    }

    #[test]
    fn create_dump_wipe_cycle_on_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path(), "disk", 64 * MIB);
        let target = internal(&path);

        let out = run_on(MetaCommand::CreateMd { force: false }, &target, None);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stdout,
            "initializing activity log\nWriting meta data...\n\
             New drbd meta data block successfully created.\n"
        );
        assert_eq!(out.stderr, "initializing bitmap (4 KB) to all zero\n");

        let out = run_on(MetaCommand::DumpMd, &target, None);
        assert_eq!(out.code, 0);
        assert!(out.stdout.contains("\n# md_offset 67104768\n"));
        assert!(out
            .stdout
            .ends_with("# bm-bytes 0;\nbm {\n}\n# bits-set 0;\n"));
        assert!(out.stdout.contains(&format!(
            "> drbdmeta 7 v08 {} internal dump-md\n",
            path.display()
        )));

        let out = run_on(MetaCommand::GetGi, &target, None);
        assert_eq!(
            out.stdout,
            "0000000000000004:0000000000000000:0000000000000000:0000000000000000:0:0:0:0:0:0:0\n"
        );

        // Existing meta data: not a terminal -> no.
        let out = run_on(MetaCommand::CreateMd { force: false }, &target, None);
        assert_eq!(out.code, 1);
        assert_eq!(out.stdout, "Operation cancelled.\n");
        assert!(out.stderr.ends_with(
            "\nDo you really want to overwrite the existing meta-data?\n\
             stdin not a TTY, not waiting for confirmation\n"
        ));
        // Typed answers other than "yes" -> no.
        for answer in ["no\n", "YES\n", "yes", "yes please\n", ""] {
            let out = run_on(
                MetaCommand::CreateMd { force: false },
                &target,
                Some(answer),
            );
            assert_eq!(out.code, 1, "answer {answer:?}");
        }
        let out = run_on(
            MetaCommand::CreateMd { force: false },
            &target,
            Some("yes\n"),
        );
        assert_eq!(out.code, 0);
        assert!(out.stderr.contains("[need to type 'yes' to confirm] \n"));

        let out = run_on(MetaCommand::WipeMd { force: false }, &target, None);
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (1, "Operation cancelled.\n")
        );
        let out = run_on(MetaCommand::WipeMd { force: true }, &target, None);
        assert_eq!(out.code, 0);
        assert_eq!(
            out.stdout,
            "Wiping meta data...\nDRBD meta data block successfully wiped out.\n"
        );
        let out = run_on(MetaCommand::WipeMd { force: true }, &target, None);
        assert_eq!(out.code, 0);
        assert_eq!(
            out.stderr,
            "There appears to be no drbd meta data to wipe out?\n"
        );

        let out = run_on(MetaCommand::DumpMd, &target, None);
        assert_eq!(
            (out.code, out.stderr.as_str()),
            (1, "No valid meta data found\n")
        );
        let out = run_on(MetaCommand::ShowGi, &target, None);
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (1, "", "")
        );
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let small = sparse_file(dir.path(), "small", 60 * 1024);
        let out = run_on(
            MetaCommand::CreateMd { force: true },
            &internal(&small),
            None,
        );
        assert_eq!(out.code, 10);
        assert_eq!(
            out.stderr,
            format!(
                "{} is only 61440 bytes. That's not enough.\n",
                small.display()
            )
        );

        let meta = sparse_file(dir.path(), "meta", 300 * MIB);
        let target = MetaTarget {
            minor: 1,
            disk: PathBuf::from("/nonexistent"),
            meta: MetaDisk::Indexed(meta.clone(), 3),
        };
        let out = run_on(MetaCommand::CreateMd { force: true }, &target, None);
        assert_eq!(out.code, 10);
        assert!(out
            .stderr
            .starts_with("Device too small: expecting meta data block at\n"));

        let missing = internal(&dir.path().join("missing"));
        assert_eq!(run_on(MetaCommand::DumpMd, &missing, None).code, 20);
        assert_eq!(
            run_on(MetaCommand::DumpMd, &internal(dir.path()), None).code,
            20
        );

        // Unrecognised data at the start: asked, and cancelled without a terminal.
        let data = sparse_file(dir.path(), "data", 4 * MIB);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .unwrap()
            .write_all_at(b"hello", 100)
            .unwrap();
        let out = run_on(
            MetaCommand::CreateMd { force: false },
            &internal(&data),
            None,
        );
        assert_eq!(out.code, 1);
        assert!(out.stdout.ends_with(
            "Found some data\n\n ==> This might destroy existing data! <==\nOperation canceled.\n"
        ));
        let out = run_on(
            MetaCommand::CreateMd { force: true },
            &internal(&data),
            None,
        );
        assert_eq!(out.code, 0);
    }

    #[test]
    fn corrupt_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse_file(dir.path(), "disk", 4 * MIB);
        let target = internal(&path);
        assert_eq!(
            run_on(MetaCommand::CreateMd { force: true }, &target, None).code,
            0
        );
        let md_offset = 4 * MIB - 4096;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&16i32.to_be_bytes(), md_offset + 68)
            .unwrap();
        let out = run_on(MetaCommand::DumpMd, &target, None);
        assert_eq!(out.code, 1);
        assert_eq!(
            out.stderr,
            "v08 al_offset: expected -64, found 16\nNo valid meta data found\n"
        );
        file.write_all_at(&(-64i32).to_be_bytes(), md_offset + 68)
            .unwrap();
        // Clear MDF_AL_CLEAN: unclean meta data is not dumped.
        file.write_all_at(&0u32.to_be_bytes(), md_offset + 56)
            .unwrap();
        let out = run_on(MetaCommand::DumpMd, &target, None);
        assert_eq!(out.code, 1);
        assert_eq!(
            out.stderr,
            "Found meta data is \"unclean\", please apply-al first\n"
        );
        assert!(run_on(MetaCommand::ShowGi, &target, None)
            .stdout
            .contains("meta-data: need apply-al\n"));
    }
}
