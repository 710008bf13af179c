//! [`ThreadPoolEngine`]: a small fixed pool of threads doing blocking positional I/O, for
//! hosts where `io_uring` is not permitted.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};
use tokio::sync::mpsc::Sender;

use super::{
    enqueue, is_unsupported, AlignedBuf, Capabilities, Completion, DiskEngine, DiskOp, DiskOpKind,
    Queued, SimulatedFailures, SubmitError, ZERO_CHUNK_BYTES,
};

/// Most threads in one pool. Each thread blocks in one syscall at a time, so this is the
/// pool's I/O depth at the device; a handful keeps a device queue busy with buffered I/O,
/// and more mostly adds contention on the small machines the fallback is meant for.
pub const POOL_THREADS_MAX: u32 = 4;

/// State shared by the pool threads.
struct Shared {
    file: Arc<File>,
    caps: Capabilities,
    /// Source for zero-writing fallbacks, allocated on first use.
    zero_chunk: OnceLock<AlignedBuf>,
    ops: Mutex<Receiver<Queued>>,
}

/// The thread-pool engine. Same protocol and semantics as the `io_uring` engine (see
/// [`super`]); up to `min(queue_depth, POOL_THREADS_MAX)` ops run at once.
pub struct ThreadPoolEngine {
    /// Submission channel; `None` once `Drop` has closed it.
    ops: Option<SyncSender<Queued>>,
    /// Completion channel; each accepted op reserves one slot of it.
    completions: Sender<Completion>,
    file: Arc<File>,
    direct: bool,
    queue_depth: u32,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadPoolEngine {
    /// Starts the pool for `file`.
    pub(crate) fn start(
        file: File,
        direct: bool,
        queue_depth: u32,
        completions: Sender<Completion>,
        simulate: &SimulatedFailures,
    ) -> io::Result<Self> {
        assert!(queue_depth > 0);
        let file = Arc::new(file);
        // At most `queue_depth` ops wait here: each holds a completion slot (see `admit`).
        let (ops_tx, ops_rx) = mpsc::sync_channel(queue_depth as usize);
        let shared = Arc::new(Shared {
            file: Arc::clone(&file),
            caps: Capabilities::new(simulate),
            zero_chunk: OnceLock::new(),
            ops: Mutex::new(ops_rx),
        });
        let mut engine = Self {
            ops: Some(ops_tx),
            completions,
            file,
            direct,
            queue_depth,
            threads: Vec::new(),
        };
        for index in 0..queue_depth.min(POOL_THREADS_MAX) {
            let shared = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("drbd-disk-{index}"))
                .spawn(move || pool_thread(&shared))?;
            // On a spawn error, dropping `engine` stops the threads already started.
            engine.threads.push(thread);
        }
        Ok(engine)
    }
}

impl DiskEngine for ThreadPoolEngine {
    fn name(&self) -> &'static str {
        "thread-pool"
    }

    fn direct_io(&self) -> bool {
        self.direct
    }

    fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    fn file_len(&self) -> io::Result<u64> {
        super::open::file_len(&self.file)
    }

    fn submit(&self, op: DiskOp) -> Result<(), SubmitError> {
        enqueue(self.ops.as_ref(), &self.completions, op)
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        // The threads finish the ops already queued, then see the channel closed.
        drop(self.ops.take());
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("disk pool thread panicked");
            }
        }
    }
}

fn pool_thread(shared: &Shared) {
    loop {
        // Hold the lock only while waiting for an op, not while doing I/O.
        let next = shared
            .ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(mut queued) = next else {
            return;
        };
        let result = execute(shared, &mut queued.op);
        queued.complete(result);
    }
}

/// Runs one op to the end, blocking.
fn execute(shared: &Shared, op: &mut DiskOp) -> io::Result<u32> {
    let file = &*shared.file;
    let len = op.len;
    match op.kind {
        DiskOpKind::Read => read_at(file, &mut op.buf[..len as usize], op.offset, &shared.caps),
        DiskOpKind::Write { fua } => {
            let data = &op.buf[..len as usize];
            if fua && shared.caps.rwf_dsync() {
                match write_all_dsync(file, data, op.offset, &shared.caps) {
                    Err(err) if err.raw_os_error().is_some_and(is_unsupported) => {
                        shared.caps.disable_rwf_dsync();
                    }
                    other => return other.map(|()| len),
                }
            }
            write_all_at(file, data, op.offset, &shared.caps)?;
            if fua {
                file.sync_data()?;
            }
            Ok(len)
        }
        DiskOpKind::Flush => file.sync_data().map(|()| 0),
        DiskOpKind::Discard => {
            let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(file, mode, op.offset, u64::from(len))?;
            Ok(len)
        }
        DiskOpKind::WriteZeroes => {
            if shared.caps.zero_range() {
                match rustix::fs::fallocate(file, FallocateFlags::ZERO_RANGE, op.offset, len.into())
                {
                    Err(Errno::OPNOTSUPP) => shared.caps.disable_zero_range(),
                    other => return other.map(|()| len).map_err(io::Error::from),
                }
            }
            let chunk = shared
                .zero_chunk
                .get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK_BYTES));
            let mut done = 0u64;
            while done < u64::from(len) {
                let step = (u64::from(len) - done).min(chunk.len() as u64) as usize;
                write_all_at(file, &chunk[..step], op.offset + done, &shared.caps)?;
                done += step as u64;
            }
            Ok(len)
        }
    }
}

/// [`Capabilities::request_len`] for slices (whose lengths are op lengths, so fit `u32`).
fn request_len(caps: &Capabilities, rest: usize) -> usize {
    let rest = u32::try_from(rest).expect("op lengths fit u32");
    caps.request_len(rest) as usize
}

/// Reads until `buf` is full or the file ends. An error after some bytes were read ends the
/// read short instead (the same rule as the `io_uring` engine).
fn read_at(file: &File, buf: &mut [u8], offset: u64, caps: &Capabilities) -> io::Result<u32> {
    let mut done = 0usize;
    while done < buf.len() {
        let end = done + request_len(caps, buf.len() - done);
        match file.read_at(&mut buf[done..end], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if done > 0 => break,
            Err(err) => return Err(err),
        }
    }
    Ok(u32::try_from(done).expect("read length fits u32 (validated len)"))
}

fn write_all_at(file: &File, data: &[u8], offset: u64, caps: &Capabilities) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let end = done + request_len(caps, data.len() - done);
        match file.write_at(&data[done..end], offset + done as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the kernel wrote no bytes",
                ))
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// `pwritev2(RWF_DSYNC)` until all of `data` is written.
fn write_all_dsync(file: &File, data: &[u8], offset: u64, caps: &Capabilities) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let end = done + request_len(caps, data.len() - done);
        let slice = [io::IoSlice::new(&data[done..end])];
        match rustix::io::pwritev2(file, &slice, offset + done as u64, ReadWriteFlags::DSYNC) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the kernel wrote no bytes",
                ))
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
