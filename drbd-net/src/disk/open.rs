//! Opening a backing file and choosing its engine.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use rustix::io::Errno;
use thiserror::Error;

use super::thread_pool::ThreadPoolEngine;
use super::uring::{setup_ring, UringEngine};
use super::{CompletionReceiver, DiskEngine};

/// Default for [`EngineOptions::queue_depth`]: enough to keep an SSD busy, and with 1 MiB
/// requests still only 128 MiB of buffers.
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;

/// Largest [`EngineOptions::queue_depth`]. It bounds the memory an engine may hold (one
/// buffer per op) and keeps the ring (`queue_depth + 1` rounded up to a power of two, 8192
/// SQEs at most) well inside the kernel's limit of 32768.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// Whether to open the file with `O_DIRECT` (bypassing the page cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirectIo {
    /// Use `O_DIRECT` if the file system accepts it (`open` does not fail with `EINVAL`),
    /// buffered I/O otherwise.
    #[default]
    Auto,
    /// Require `O_DIRECT`; opening fails if the file system refuses it.
    On,
    /// Buffered I/O.
    Off,
}

/// Which engine to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// `io_uring` if this process may use it, the thread pool otherwise.
    #[default]
    Auto,
    /// `io_uring` or an error (for benchmarks that must not measure the fallback).
    Uring,
    /// The thread pool, without trying `io_uring`.
    ThreadPool,
}

/// Failures to pretend, so tests can reach the fallback paths on a machine that has every
/// feature. All `false` by default; production code leaves them so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulatedFailures {
    /// `io_uring` setup fails with `EPERM`, as under a container's seccomp profile.
    pub uring_setup: bool,
    /// `open` with `O_DIRECT` fails with `EINVAL`, as on file systems without direct I/O.
    pub direct_open: bool,
    /// The kernel refuses `RWF_DSYNC` (FUA writes use write + `fdatasync`).
    pub rwf_dsync_unsupported: bool,
    /// The file system refuses `FALLOC_FL_ZERO_RANGE` (write-zeroes writes zero blocks).
    pub zero_range_unsupported: bool,
    /// Reads and writes move at most half of what is left per request (in whole 4 KiB
    /// blocks, so `O_DIRECT` alignment holds), as if the kernel returned short counts; the
    /// engines must continue them.
    pub short_transfers: bool,
}

/// How to open a backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// `O_DIRECT` policy.
    pub direct: DirectIo,
    /// Most ops outstanding at once, `1..=MAX_QUEUE_DEPTH`.
    pub queue_depth: u32,
    /// Engine policy.
    pub engine: EngineChoice,
    /// Test hooks.
    pub simulate: SimulatedFailures,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            direct: DirectIo::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            engine: EngineChoice::Auto,
            simulate: SimulatedFailures::default(),
        }
    }
}

/// Why no engine could be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The options are out of range.
    #[error("invalid disk engine options: {0}")]
    InvalidOptions(&'static str),
    /// The file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The backing file.
        path: PathBuf,
        /// The `open` error.
        source: io::Error,
    },
    /// [`DirectIo::On`] was asked for and the file system refused `O_DIRECT`.
    #[error("{path} does not support O_DIRECT: {source}")]
    DirectUnsupported {
        /// The backing file.
        path: PathBuf,
        /// The `open` error.
        source: io::Error,
    },
    /// [`EngineChoice::Uring`] was asked for and `io_uring` is not available.
    #[error("io_uring is not available: {0}")]
    UringUnavailable(#[source] io::Error),
    /// Setting up the engine (eventfd, threads, file flags) failed.
    #[error("cannot start the disk engine: {0}")]
    Setup(#[source] io::Error),
}

/// Whether this process may use `io_uring` with every opcode the engine needs; the error is
/// the kernel's answer (`EPERM` under seccomp, `ENOSYS` on old kernels, ...).
pub fn uring_available() -> io::Result<()> {
    setup_ring(1, &SimulatedFailures::default()).map(drop)
}

/// Opens the existing file or block device at `path` for reading and writing, and starts an
/// engine on it as `options` say; logs which engine runs and whether `O_DIRECT` is on.
///
/// Returns the engine and the receiver of its completions (see [`super`] for the protocol).
pub fn open_engine(
    path: impl AsRef<Path>,
    options: &EngineOptions,
) -> Result<(Box<dyn DiskEngine>, CompletionReceiver), OpenError> {
    let path = path.as_ref();
    check_options(options)?;
    let (file, direct) = open_file(path, options)?;
    start(file, direct, options, path)
}

/// Starts an engine on a file the caller opened; `O_DIRECT` is whatever the file was opened
/// with (`options.direct` is not used). Useful for descriptors with unusual modes.
pub fn engine_from_file(
    file: File,
    options: &EngineOptions,
) -> Result<(Box<dyn DiskEngine>, CompletionReceiver), OpenError> {
    check_options(options)?;
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|err| OpenError::Setup(err.into()))?;
    start(
        file,
        flags.contains(OFlags::DIRECT),
        options,
        Path::new("<file descriptor>"),
    )
}

fn check_options(options: &EngineOptions) -> Result<(), OpenError> {
    if !(1..=MAX_QUEUE_DEPTH).contains(&options.queue_depth) {
        return Err(OpenError::InvalidOptions(
            "queue_depth must be in 1..=MAX_QUEUE_DEPTH",
        ));
    }
    Ok(())
}

/// Opens `path`, with `O_DIRECT` if the policy and the file system allow it.
fn open_file(path: &Path, options: &EngineOptions) -> Result<(File, bool), OpenError> {
    let mut open = OpenOptions::new();
    open.read(true).write(true);
    let open_buffered = |open: &OpenOptions| {
        open.open(path)
            .map(|file| (file, false))
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })
    };
    if options.direct == DirectIo::Off {
        return open_buffered(&open);
    }
    let direct = if options.simulate.direct_open {
        Err(io::Error::from(Errno::INVAL))
    } else {
        let flags = i32::try_from(OFlags::DIRECT.bits()).expect("O_DIRECT fits in i32");
        open.clone().custom_flags(flags).open(path)
    };
    match direct {
        Ok(file) => Ok((file, true)),
        Err(source) if Errno::from_io_error(&source) == Some(Errno::INVAL) => {
            if options.direct == DirectIo::On {
                return Err(OpenError::DirectUnsupported {
                    path: path.to_owned(),
                    source,
                });
            }
            tracing::info!(
                path = %path.display(),
                "file system refuses O_DIRECT (EINVAL); using buffered I/O"
            );
            open_buffered(&open)
        }
        Err(source) => Err(OpenError::Open {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Picks and starts the engine.
fn start(
    file: File,
    direct: bool,
    options: &EngineOptions,
    path: &Path,
) -> Result<(Box<dyn DiskEngine>, CompletionReceiver), OpenError> {
    let depth = options.queue_depth;
    let (completions_tx, completions_rx) = tokio::sync::mpsc::channel(depth as usize);
    let ring = match options.engine {
        EngineChoice::ThreadPool => None,
        EngineChoice::Uring => {
            Some(setup_ring(depth, &options.simulate).map_err(OpenError::UringUnavailable)?)
        }
        EngineChoice::Auto => match setup_ring(depth, &options.simulate) {
            Ok(ring) => Some(ring),
            Err(err) => {
                tracing::info!(error = %err, "io_uring unavailable; using the thread pool");
                None
            }
        },
    };
    let simulate = &options.simulate;
    let engine: Box<dyn DiskEngine> = match ring {
        Some(ring) => Box::new(
            UringEngine::start(ring, file, direct, depth, completions_tx, simulate)
                .map_err(OpenError::Setup)?,
        ),
        None => Box::new(
            ThreadPoolEngine::start(file, direct, depth, completions_tx, simulate)
                .map_err(OpenError::Setup)?,
        ),
    };
    tracing::info!(
        path = %path.display(),
        engine = engine.name(),
        direct,
        queue_depth = depth,
        "disk engine started"
    );
    Ok((engine, completions_rx))
}

/// Size of a regular file or block device (whose metadata says 0).
pub(crate) fn file_len(file: &File) -> io::Result<u64> {
    let metadata = file.metadata()?;
    if metadata.file_type().is_block_device() {
        // The engines use positional I/O only, so moving the file position is harmless.
        let mut file = file;
        return file.seek(SeekFrom::End(0));
    }
    Ok(metadata.len())
}
