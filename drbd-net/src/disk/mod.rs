//! Disk engines: asynchronous reads, writes, flushes, discards and zeroing on one backing
//! file or block device, behind the [`DiskEngine`] trait.
//!
//! Two implementations:
//!
//! * [`UringEngine`]: one dedicated thread per backing file owning an `io_uring` ring. Ops
//!   arrive over a bounded channel, are batched into one `io_uring_enter` per loop turn and
//!   stay in an in-flight table (which owns their buffers) until their completion arrives.
//! * [`ThreadPoolEngine`]: a small fixed pool of threads doing `pread`/`pwrite`/`fdatasync`/
//!   `fallocate`. Used where `io_uring` is not permitted (seccomp profiles of container
//!   runtimes, `kernel.io_uring_disabled`, old kernels).
//!
//! [`open_engine`] picks one, opens the file with `O_DIRECT` when the file system allows it,
//! and logs its choice.
//!
//! # Call protocol
//!
//! 1. [`open_engine`] returns the engine and a [`CompletionReceiver`], a bounded tokio mpsc
//!    receiver. It can be used from async code (`recv().await`) and from plain threads
//!    (`blocking_recv()`, outside a runtime).
//! 2. [`DiskEngine::submit`] never blocks. It either accepts the op or returns it inside a
//!    [`SubmitError`]: [`SubmitError::QueueFull`] when `queue_depth` ops are outstanding.
//! 3. Every accepted op yields exactly one [`Completion`] carrying its `id`, its result and
//!    its buffer. An op counts as outstanding from `submit` until its completion has been
//!    *received*: each accepted op reserves a slot of the completion channel, so the engine
//!    never waits for the consumer and the memory held by an engine is bounded by
//!    `queue_depth` buffers.
//! 4. Dropping the engine stops intake, runs every accepted op to completion (their
//!    completions are still delivered, or dropped with their buffers if the receiver is
//!    gone) and joins the engine's threads. After that the receiver yields `None`.
//!
//! # Semantics
//!
//! * Ops complete in any order, as in the kernel. Overlapping ops in flight at the same
//!   time have no defined order; a [`DiskOpKind::Flush`] makes durable the writes that had
//!   *completed* before it was submitted (DRBD's barrier rule: wait for the writes of an
//!   epoch, then flush).
//! * [`DiskOpKind::Read`]: `Ok(n)` with `n == len`, or `n < len` when the file ends inside the
//!   range (`n == 0` at or past the end); bytes of the buffer past `n` are left as they were.
//!   An error after part of the range was read is reported as the short count.
//! * [`DiskOpKind::Write`]: `Ok(len)`; short writes are continued until done. With
//!   `fua: true` the data is durable when the completion arrives (`RWF_DSYNC`, or a write
//!   followed by `fdatasync` where the kernel refuses `RWF_DSYNC`).
//! * [`DiskOpKind::Flush`]: `Ok(0)` after `fdatasync` of the whole file.
//! * [`DiskOpKind::Discard`]: `Ok(len)` after punching a hole (`FALLOC_FL_PUNCH_HOLE |
//!   FALLOC_FL_KEEP_SIZE`); the range then reads as zeroes and the file size is unchanged.
//! * [`DiskOpKind::WriteZeroes`]: `Ok(len)` after `FALLOC_FL_ZERO_RANGE`, or after writing
//!   zeroes where the file system does not support that (tmpfs); like a write, it extends
//!   the file when the range ends past it.
//! * Errors are `std::io::Error`s carrying the errno (`EBADF` for a write on a read-only
//!   file, `EINVAL` for a misaligned `O_DIRECT` op, ...). An op that is malformed before any
//!   I/O (length beyond its buffer, offset overflow) is refused by `submit` instead.
//!
//! With `O_DIRECT` on, offsets, lengths and buffer addresses must be multiples of the
//! device's logical block size (512 or 4096 bytes); [`AlignedBuf`] takes care of addresses.

mod buf;
mod faulty;
mod open;
mod thread_pool;
mod uring;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{OwnedPermit, Sender};

pub use buf::{AlignedBuf, BufPool, BUF_ALIGN};
pub use faulty::{inject_faults, FaultPlan};
pub use open::{
    engine_from_file, open_engine, uring_available, DirectIo, EngineChoice, EngineOptions,
    OpenError, SimulatedFailures, DEFAULT_QUEUE_DEPTH, MAX_QUEUE_DEPTH,
};
pub use thread_pool::{ThreadPoolEngine, POOL_THREADS_MAX};
pub use uring::UringEngine;

/// Largest `len` of one read or write, in bytes.
///
/// Linux moves at most `MAX_RW_COUNT` (2 GiB minus a page) per read/write call; staying far
/// below keeps every op a single kernel request in the common case. DRBD's own largest
/// request (`DRBD_MAX_BIO_SIZE`) is 1 MiB.
pub const MAX_IO_BYTES: u32 = 1 << 30;

/// Largest `offset + len` of any op: the kernel's file offsets are signed 64-bit (`loff_t`).
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// Size of the zero-filled buffer used to emulate [`DiskOpKind::WriteZeroes`] on file
/// systems without `FALLOC_FL_ZERO_RANGE`: large enough that a 1 MiB zeroing takes four
/// writes, small enough to allocate lazily per engine.
pub(crate) const ZERO_CHUNK_BYTES: usize = 256 * 1024;

/// What an op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOpKind {
    /// Read `len` bytes at `offset` into the op's buffer.
    Read,
    /// Write the first `len` bytes of the op's buffer at `offset`.
    Write {
        /// Force unit access: the completion means the data is durable.
        fua: bool,
    },
    /// Make completed writes durable (`fdatasync` of the whole file; `offset` and `len` are
    /// ignored).
    Flush,
    /// Deallocate `len` bytes at `offset`; they read back as zeroes.
    Discard,
    /// Make `len` bytes at `offset` read as zeroes.
    WriteZeroes,
}

/// One request to a [`DiskEngine`].
#[derive(Debug)]
pub struct DiskOp {
    /// Caller's tag, returned in the [`Completion`]; the engine does not interpret it.
    pub id: u64,
    /// What to do.
    pub kind: DiskOpKind,
    /// Byte offset in the file.
    pub offset: u64,
    /// Byte count. For reads and writes at most `buf.len()` and at most [`MAX_IO_BYTES`].
    pub len: u32,
    /// Data for writes, destination for reads, unused otherwise (an empty buffer will do).
    /// Owned by the engine until the completion hands it back.
    pub buf: AlignedBuf,
}

impl DiskOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub fn read(id: u64, offset: u64, buf: AlignedBuf) -> Self {
        let len = len_of(&buf);
        Self {
            id,
            kind: DiskOpKind::Read,
            offset,
            len,
            buf,
        }
    }

    /// Write all of `buf` at `offset`.
    pub fn write(id: u64, offset: u64, buf: AlignedBuf, fua: bool) -> Self {
        let len = len_of(&buf);
        Self {
            id,
            kind: DiskOpKind::Write { fua },
            offset,
            len,
            buf,
        }
    }

    /// Flush completed writes to stable storage.
    pub fn flush(id: u64) -> Self {
        Self::without_data(id, DiskOpKind::Flush, 0, 0)
    }

    /// Discard `len` bytes at `offset`.
    pub fn discard(id: u64, offset: u64, len: u32) -> Self {
        Self::without_data(id, DiskOpKind::Discard, offset, len)
    }

    /// Zero `len` bytes at `offset`.
    pub fn write_zeroes(id: u64, offset: u64, len: u32) -> Self {
        Self::without_data(id, DiskOpKind::WriteZeroes, offset, len)
    }

    fn without_data(id: u64, kind: DiskOpKind, offset: u64, len: u32) -> Self {
        Self {
            id,
            kind,
            offset,
            len,
            buf: AlignedBuf::zeroed(0),
        }
    }

    /// Checks what can be checked without doing I/O; the engines call this in `submit`.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        match self.offset.checked_add(u64::from(self.len)) {
            Some(end) if end <= MAX_OFFSET => {}
            _ => return Err("offset + len exceeds the largest file offset"),
        }
        match self.kind {
            DiskOpKind::Read | DiskOpKind::Write { .. } => {
                if self.len > MAX_IO_BYTES {
                    return Err("len exceeds MAX_IO_BYTES");
                }
                if self.len as usize > self.buf.len() {
                    return Err("len exceeds the buffer");
                }
            }
            DiskOpKind::Discard | DiskOpKind::WriteZeroes => {
                if self.len == 0 {
                    return Err("discard and write-zeroes need a non-zero len");
                }
            }
            DiskOpKind::Flush => {}
        }
        Ok(())
    }
}

/// A buffer's length as an op length; lengths past `u32::MAX` saturate and are then refused
/// by `submit` (they exceed [`MAX_IO_BYTES`]).
fn len_of(buf: &AlignedBuf) -> u32 {
    u32::try_from(buf.len()).unwrap_or(u32::MAX)
}

/// The outcome of one [`DiskOp`].
#[derive(Debug)]
pub struct Completion {
    /// The op's `id`.
    pub id: u64,
    /// Bytes transferred (see the module docs for each kind), or the error.
    pub result: io::Result<u32>,
    /// The op's buffer, handed back.
    pub buf: AlignedBuf,
}

/// Receives the [`Completion`]s of one engine; yields `None` once the engine has been dropped
/// and every completion has been received.
pub type CompletionReceiver = tokio::sync::mpsc::Receiver<Completion>;

/// Why [`DiskEngine::submit`] did not accept an op. Every variant hands the op back.
#[derive(Error)]
pub enum SubmitError {
    /// `queue_depth` ops are outstanding (submitted, completion not yet received).
    #[error("disk engine queue is full")]
    QueueFull(DiskOp),
    /// The engine's thread has stopped or the completion receiver was dropped.
    #[error("disk engine is closed")]
    Closed(DiskOp),
    /// The op is malformed (see [`DiskOp::len`]).
    #[error("invalid disk op: {reason}")]
    Invalid {
        /// The refused op.
        op: DiskOp,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl SubmitError {
    /// The refused op, with its buffer.
    pub fn into_op(self) -> DiskOp {
        match self {
            Self::QueueFull(op) | Self::Closed(op) | Self::Invalid { op, .. } => op,
        }
    }
}

impl fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, op) = match self {
            Self::QueueFull(op) => ("QueueFull", op),
            Self::Closed(op) => ("Closed", op),
            Self::Invalid { op, .. } => ("Invalid", op),
        };
        write!(
            f,
            "{name}({self}; op {} {:?} @{}+{})",
            op.id, op.kind, op.offset, op.len
        )
    }
}

/// An asynchronous disk engine on one backing file. See the [module docs](self) for the
/// call protocol and the semantics of each op.
pub trait DiskEngine: Send + Sync {
    /// Short name for logs: `"io_uring"` or `"thread-pool"`.
    fn name(&self) -> &'static str;

    /// Whether the file is open with `O_DIRECT`.
    fn direct_io(&self) -> bool;

    /// Most ops outstanding at once.
    fn queue_depth(&self) -> u32;

    /// Current size of the file in bytes.
    fn file_len(&self) -> io::Result<u64>;

    /// Queue `op`; never blocks. Its [`Completion`] arrives on the engine's
    /// [`CompletionReceiver`].
    fn submit(&self, op: DiskOp) -> Result<(), SubmitError>;
}

/// An accepted op on its way through an engine, with the completion-channel slot reserved
/// for its [`Completion`].
pub(crate) struct Queued {
    pub(crate) op: DiskOp,
    permit: OwnedPermit<Completion>,
}

impl Queued {
    /// Delivers the completion. Never blocks: the slot was reserved at submission. If the
    /// receiver is gone, the completion (and the buffer) is dropped with the channel.
    pub(crate) fn complete(self, result: io::Result<u32>) {
        let Self { op, permit } = self;
        drop(permit.send(Completion {
            id: op.id,
            result,
            buf: op.buf,
        }));
    }

    /// Delivers an error completion with an empty buffer and never frees the op's buffer:
    /// for ops whose buffer the kernel may still be using when the engine cannot wait.
    pub(crate) fn fail_leaking_buffer(self, error: io::Error) {
        let Self { op, permit } = self;
        let DiskOp { id, buf, .. } = op;
        std::mem::forget(buf);
        drop(permit.send(Completion {
            id,
            result: Err(error),
            buf: AlignedBuf::zeroed(0),
        }));
    }
}

/// The admission check shared by the engines: validate `op` and reserve a slot of the
/// completion channel, which bounds the ops outstanding to the channel's capacity.
pub(crate) fn admit(op: DiskOp, completions: &Sender<Completion>) -> Result<Queued, SubmitError> {
    if let Err(reason) = op.validate() {
        return Err(SubmitError::Invalid { op, reason });
    }
    match completions.clone().try_reserve_owned() {
        Ok(permit) => Ok(Queued { op, permit }),
        Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull(op)),
        Err(TrySendError::Closed(_)) => Err(SubmitError::Closed(op)),
    }
}

/// The submission path shared by the engines: admit `op` and hand it to the worker(s) over
/// `ops` (`None` once the engine is closing).
pub(crate) fn enqueue(
    ops: Option<&std::sync::mpsc::SyncSender<Queued>>,
    completions: &Sender<Completion>,
    op: DiskOp,
) -> Result<(), SubmitError> {
    let Some(ops) = ops else {
        return Err(SubmitError::Closed(op));
    };
    let queued = admit(op, completions)?;
    match ops.try_send(queued) {
        Ok(()) => Ok(()),
        // Unreachable while the slot accounting holds; dropping the permit frees the slot.
        Err(std::sync::mpsc::TrySendError::Full(queued)) => Err(SubmitError::QueueFull(queued.op)),
        Err(std::sync::mpsc::TrySendError::Disconnected(queued)) => {
            Err(SubmitError::Closed(queued.op))
        }
    }
}

/// Optional kernel features, learnt at run time and shared by an engine's threads. A
/// feature starts as "supported" and is switched off the first time the kernel answers
/// `EOPNOTSUPP`; the op that got the answer is redone the portable way.
#[derive(Debug)]
pub(crate) struct Capabilities {
    /// `RWF_DSYNC` on writes (otherwise write, then `fdatasync`).
    pub(crate) rwf_dsync: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` (otherwise write zeroes).
    pub(crate) zero_range: AtomicBool,
    /// Test hook: see [`SimulatedFailures::short_transfers`].
    short_transfers: bool,
}

impl Capabilities {
    pub(crate) fn new(simulate: &SimulatedFailures) -> Self {
        Self {
            rwf_dsync: AtomicBool::new(!simulate.rwf_dsync_unsupported),
            zero_range: AtomicBool::new(!simulate.zero_range_unsupported),
            short_transfers: simulate.short_transfers,
        }
    }

    /// Bytes to ask for in the next read or write request of an op with `rest` bytes left.
    pub(crate) fn request_len(&self, rest: u32) -> u32 {
        const BLOCK: u32 = BUF_ALIGN as u32;
        if self.short_transfers && rest > BLOCK {
            (rest / 2 / BLOCK * BLOCK).max(BLOCK)
        } else {
            rest
        }
    }

    pub(crate) fn rwf_dsync(&self) -> bool {
        self.rwf_dsync.load(Ordering::Relaxed)
    }

    pub(crate) fn zero_range(&self) -> bool {
        self.zero_range.load(Ordering::Relaxed)
    }

    pub(crate) fn disable_rwf_dsync(&self) {
        if self.rwf_dsync.swap(false, Ordering::Relaxed) {
            tracing::info!("RWF_DSYNC not supported; FUA writes fall back to write + fdatasync");
        }
    }

    pub(crate) fn disable_zero_range(&self) {
        if self.zero_range.swap(false, Ordering::Relaxed) {
            tracing::info!("FALLOC_FL_ZERO_RANGE not supported; write-zeroes writes zero blocks");
        }
    }
}

/// Whether an error means "this kernel/file system does not do that".
pub(crate) fn is_unsupported(errno: i32) -> bool {
    errno == rustix::io::Errno::OPNOTSUPP.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_catches_malformed_ops() {
        assert_eq!(
            DiskOp::read(1, 0, AlignedBuf::zeroed(10)).validate(),
            Ok(())
        );
        let mut op = DiskOp::read(1, 0, AlignedBuf::zeroed(10));
        op.len = 11;
        assert_eq!(op.validate(), Err("len exceeds the buffer"));
        let op = DiskOp::write(1, MAX_OFFSET - 5, AlignedBuf::zeroed(10), false);
        assert!(op.validate().is_err());
        let op = DiskOp::write(1, u64::MAX, AlignedBuf::zeroed(10), false);
        assert!(op.validate().is_err());
        assert!(DiskOp::discard(1, 0, 0).validate().is_err());
        assert!(DiskOp::write_zeroes(1, 0, 0).validate().is_err());
        assert_eq!(DiskOp::discard(1, 0, 1).validate(), Ok(()));
        assert_eq!(DiskOp::flush(1).validate(), Ok(()));
        let mut op = DiskOp::read(1, 0, AlignedBuf::zeroed(0));
        op.len = MAX_IO_BYTES + 1;
        assert_eq!(op.validate(), Err("len exceeds MAX_IO_BYTES"));
    }

    #[test]
    fn short_transfer_hook_splits_in_whole_blocks() {
        let plain = Capabilities::new(&SimulatedFailures::default());
        assert_eq!(plain.request_len(1 << 20), 1 << 20);
        let short = Capabilities::new(&SimulatedFailures {
            short_transfers: true,
            ..SimulatedFailures::default()
        });
        assert_eq!(short.request_len(1 << 20), 1 << 19);
        assert_eq!(short.request_len(3 * 4096), 4096);
        assert_eq!(short.request_len(4097), 4096);
        assert_eq!(short.request_len(4096), 4096);
        assert_eq!(short.request_len(100), 100);
        assert_eq!(short.request_len(0), 0);
    }

    #[test]
    fn submit_error_returns_the_op() {
        let err = SubmitError::QueueFull(DiskOp::read(7, 0, AlignedBuf::from_slice(b"abc")));
        assert_eq!(err.to_string(), "disk engine queue is full");
        assert!(format!("{err:?}").contains("op 7 Read @0+3"));
        let op = err.into_op();
        assert_eq!((op.id, op.buf.as_slice()), (7, &b"abc"[..]));
    }
}
