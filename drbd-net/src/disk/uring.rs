//! [`UringEngine`]: a dedicated thread per backing file driving one `io_uring` ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustix::event::{EventfdFlags, PollFlags};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};
use tokio::sync::mpsc::Sender;

use super::{
    enqueue, is_unsupported, AlignedBuf, Capabilities, Completion, DiskEngine, DiskOp, DiskOpKind,
    Queued, SimulatedFailures, SubmitError, ZERO_CHUNK_BYTES,
};

/// `user_data` of the eventfd poll; op slots use their index, which is far smaller.
const WAKE_TOKEN: u64 = u64::MAX;

/// Pause after an unexpected `io_uring_enter` error before trying again, so a persistent
/// error cannot spin a core.
const ENTER_RETRY_DELAY: Duration = Duration::from_millis(1);

/// Opcodes the engine issues; a kernel lacking one of them gets the thread pool.
const REQUIRED_OPCODES: [(u8, &str); 5] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
];

/// Sets up a ring for `queue_depth` ops and checks that the kernel supports every opcode the
/// engine uses. Fails with the kernel's error where `io_uring` is forbidden (`EPERM` under
/// seccomp or `kernel.io_uring_disabled`, `ENOSYS` on old kernels).
pub(crate) fn setup_ring(queue_depth: u32, simulate: &SimulatedFailures) -> io::Result<IoUring> {
    if simulate.uring_setup {
        return Err(io::Error::from(Errno::PERM));
    }
    // One SQE per op at a time plus the wake poll; the CQ is twice the SQ (kernel default),
    // so completions can never overflow it.
    let entries = (queue_depth + 1).next_power_of_two();
    let ring = IoUring::new(entries)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in REQUIRED_OPCODES {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {name} not supported by this kernel"),
            ));
        }
    }
    assert!(
        ring.params().sq_entries() > queue_depth,
        "SQ too small for the queue depth"
    );
    assert!(
        ring.params().cq_entries() > queue_depth,
        "CQ too small for the queue depth"
    );
    Ok(ring)
}

/// The `io_uring` engine: a dedicated thread per backing file driving one ring. See
/// [`super`] for the protocol and the semantics of each op.
///
/// # Ownership discipline
///
/// The kernel reads and writes op buffers asynchronously, so a buffer must neither be freed
/// nor touched while the kernel may use it. Every accepted op lives in the worker's slot
/// table, keyed by the `user_data` of its SQE, from the moment its first SQE is built until
/// the CQE of its last SQE has been reaped; only then is the buffer handed back in the
/// [`Completion`]. An op has at most one SQE in the kernel at a time (short transfers, the
/// `fdatasync` after a FUA write and the zero-writing fallback are issued one after the
/// other), which bounds what the kernel holds to `queue_depth + 1` SQEs (the `+ 1` is the
/// wake-up poll on the eventfd). The worker leaves its loop only when the table is empty;
/// if it unwinds from a panic instead, its `Drop` waits for every SQE still in the kernel
/// before anything is freed; if even that fails it leaks the buffers (their ops complete
/// with an error and an empty buffer).
///
/// # Wake-ups
///
/// Submitters push to a bounded channel and then bump an eventfd; the worker keeps a
/// one-shot `POLL_ADD` on that eventfd in the ring, so a single `io_uring_enter` waits for
/// either new ops or completions. The worker resets the eventfd *before* draining the
/// channel, so an op sent after the drain always finds its bump pending.
pub struct UringEngine {
    /// Submission channel to the worker; `None` once `Drop` has closed it.
    ops: Option<SyncSender<Queued>>,
    /// Completion channel; each accepted op reserves one slot of it (see [`enqueue`](super::enqueue)).
    completions: Sender<Completion>,
    /// Eventfd the worker polls; bumped after every send.
    wake: Arc<OwnedFd>,
    file: Arc<File>,
    direct: bool,
    queue_depth: u32,
    worker: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Starts the worker thread on `ring` (from [`setup_ring`]) for `file`.
    pub(crate) fn start(
        ring: IoUring,
        file: File,
        direct: bool,
        queue_depth: u32,
        completions: Sender<Completion>,
        simulate: &SimulatedFailures,
    ) -> io::Result<Self> {
        assert!(queue_depth > 0);
        let wake = Arc::new(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?);
        let file = Arc::new(file);
        let depth = queue_depth as usize;
        // The channel never holds more than `queue_depth` ops: each one holds a completion
        // slot until its completion is received, and there are `queue_depth` slots.
        let (ops_tx, ops_rx) = mpsc::sync_channel(depth);
        let worker = Worker {
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            pending: VecDeque::with_capacity(depth),
            in_kernel: 0,
            wake_armed: false,
            reaped: Vec::with_capacity(depth + 1),
            ops: ops_rx,
            wake: Arc::clone(&wake),
            caps: Capabilities::new(simulate),
            direct,
            zero_chunk: None,
            file: Arc::clone(&file),
        };
        let worker = std::thread::Builder::new()
            .name("drbd-uring".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            ops: Some(ops_tx),
            completions,
            wake,
            file,
            direct,
            queue_depth,
            worker: Some(worker),
        })
    }

    fn bump_wake(&self) {
        // An eventfd write only fails with EAGAIN when the counter would overflow u64, which
        // means plenty of wake-ups are pending anyway.
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
    }
}

impl DiskEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
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
        enqueue(self.ops.as_ref(), &self.completions, op)?;
        self.bump_wake();
        Ok(())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Close intake, wake the worker so it notices, and wait until it has completed every
        // accepted op and released the ring.
        drop(self.ops.take());
        self.bump_wake();
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                tracing::error!("io_uring disk worker panicked");
            }
        }
    }
}

/// Where an op is in its sequence of SQEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Read,
    /// Writing the op's buffer; `dsync` when the SQE carries `RWF_DSYNC`.
    Write {
        dsync: bool,
    },
    /// `fdatasync` of the written range after a FUA write without `RWF_DSYNC`.
    SyncAfterWrite,
    Flush,
    Discard,
    ZeroRange,
    /// Writing zeroes from the shared zero chunk (no `FALLOC_FL_ZERO_RANGE`).
    ZeroWrite,
}

/// One accepted op in the slot table.
struct InFlight {
    queued: Queued,
    stage: Stage,
    /// Bytes transferred so far (reads, writes, zero writes).
    done: u32,
}

/// What to do with an op after one of its CQEs.
enum Step {
    /// Issue its next SQE (the rest of a short transfer, or the next stage).
    Resubmit,
    /// Deliver this result.
    Complete(io::Result<u32>),
}

/// State of the worker thread. Field order matters for the normal drop: the ring (closed
/// first) is declared before everything its SQEs pointed to.
struct Worker {
    ring: IoUring,
    /// Slot table; an SQE's `user_data` is its op's index here. Fixed size `queue_depth`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Slots whose next SQE has not been pushed yet.
    pending: VecDeque<usize>,
    /// Op SQEs pushed whose CQE has not been reaped (the wake poll is not counted).
    in_kernel: usize,
    /// Whether the wake poll is in the ring.
    wake_armed: bool,
    /// Reused buffer of `(user_data, result)` pairs taken from the CQ.
    reaped: Vec<(u64, i32)>,
    ops: Receiver<Queued>,
    wake: Arc<OwnedFd>,
    caps: Capabilities,
    direct: bool,
    /// Source of zero-writing fallback SQEs; allocated on first use, never replaced, and
    /// dropped only with the worker, after the ring is drained.
    zero_chunk: Option<AlignedBuf>,
    file: Arc<File>,
}

impl Worker {
    fn run(mut self) {
        tracing::debug!(direct = self.direct, "io_uring disk worker started");
        let mut intake_open = true;
        loop {
            if intake_open {
                intake_open = self.take_new_ops();
                if intake_open && !self.wake_armed {
                    self.pending_wake_poll();
                }
            }
            self.push_pending();
            if !intake_open && self.slots_in_use() == 0 {
                break;
            }
            assert!(
                self.in_kernel > 0 || self.wake_armed,
                "worker would wait with nothing in the kernel"
            );
            self.enter();
            self.reap();
        }
        assert_eq!(self.in_kernel, 0);
        assert!(self.pending.is_empty());
        tracing::debug!("io_uring disk worker stopped");
    }

    fn slots_in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Moves every queued op into the slot table; returns `false` once the engine is gone
    /// and the channel is empty.
    fn take_new_ops(&mut self) -> bool {
        loop {
            match self.ops.try_recv() {
                Ok(queued) => self.accept(queued),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn accept(&mut self, queued: Queued) {
        let stage = match queued.op.kind {
            DiskOpKind::Read => Stage::Read,
            DiskOpKind::Write { fua } => Stage::Write {
                dsync: fua && self.caps.rwf_dsync(),
            },
            DiskOpKind::Flush => Stage::Flush,
            DiskOpKind::Discard => Stage::Discard,
            DiskOpKind::WriteZeroes if self.caps.zero_range() => Stage::ZeroRange,
            DiskOpKind::WriteZeroes => Stage::ZeroWrite,
        };
        // The completion-slot accounting admits at most `queue_depth` ops, one per slot.
        let key = self
            .free
            .pop()
            .expect("more ops accepted than the queue depth");
        assert!(self.slots[key].is_none());
        self.slots[key] = Some(InFlight {
            queued,
            stage,
            done: 0,
        });
        self.pending.push_back(key);
    }

    /// Queues the one-shot poll that completes when the eventfd is bumped.
    fn pending_wake_poll(&mut self) {
        let poll = opcode::PollAdd::new(
            types::Fd(self.wake.as_raw_fd()),
            u32::from(PollFlags::IN.bits()),
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: a poll SQE references no memory of ours, only the eventfd, and the kernel
        // holds its own reference to that file while the poll is armed.
        let pushed = unsafe { self.ring.submission().push(&poll) };
        // The SQ has room for every op plus this poll (see `setup_ring`).
        pushed.expect("SQ full while arming the wake poll");
        self.wake_armed = true;
    }

    /// Pushes the next SQE of every pending op, as many as the SQ takes.
    fn push_pending(&mut self) {
        if self.zero_chunk.is_none()
            && self.pending.iter().any(|&key| {
                self.slots[key]
                    .as_ref()
                    .is_some_and(|op| op.stage == Stage::ZeroWrite)
            })
        {
            self.zero_chunk = Some(AlignedBuf::zeroed(ZERO_CHUNK_BYTES));
        }
        let fd = types::Fd(self.file.as_fd().as_raw_fd());
        let zero_chunk = self.zero_chunk.as_ref();
        let mut sq = self.ring.submission();
        while let Some(&key) = self.pending.front() {
            let op = self.slots[key].as_mut().expect("pending slot is empty");
            let sqe = build_sqe(op, fd, zero_chunk, &self.caps).user_data(key as u64);
            // SAFETY: the SQE points at (a) `self.file`'s descriptor, kept open by the worker
            // until it is dropped, which happens only after every SQE's CQE has been reaped
            // (`run` exits with nothing in the kernel, `Drop` drains otherwise); (b) for
            // reads and writes, bytes `done..len` of the op's buffer, in bounds because
            // `validate` checked `len <= buf.len()`; the buffer stays in `self.slots[key]`
            // untouched (its heap data does not move with the struct) until this SQE's CQE
            // is reaped; (c) for zero writes, the zero chunk, which lives as long as the
            // worker and is only ever read.
            if unsafe { sq.push(&sqe) }.is_err() {
                break;
            }
            self.pending.pop_front();
            self.in_kernel += 1;
        }
    }

    /// Submits what was pushed and waits for at least one completion.
    fn enter(&mut self) {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) => match Errno::from_io_error(&err) {
                // Interrupted by a signal; the loop comes back here.
                Some(Errno::INTR) => {}
                // Completions are backed up; reaping them makes room.
                Some(Errno::BUSY) => {}
                _ => {
                    tracing::error!(error = %err, "io_uring_enter failed; retrying");
                    std::thread::sleep(ENTER_RETRY_DELAY);
                }
            },
        }
    }

    /// Handles every CQE in the completion queue.
    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        // Account for every CQE as it leaves the CQ, before handling any, so the counts stay
        // right for `drain_after_panic` even if handling one panics.
        for cqe in self.ring.completion() {
            if cqe.user_data() == WAKE_TOKEN {
                assert!(self.wake_armed, "wake CQE without a wake poll");
                self.wake_armed = false;
            } else {
                assert!(self.in_kernel > 0, "more op CQEs than SQEs");
                self.in_kernel -= 1;
            }
            reaped.push((cqe.user_data(), cqe.result()));
        }
        for &(user_data, result) in &reaped {
            if user_data == WAKE_TOKEN {
                self.on_wake(result);
            } else {
                self.on_op_cqe(user_data as usize, result);
            }
        }
        reaped.clear();
        self.reaped = reaped;
    }

    fn on_wake(&mut self, result: i32) {
        if result < 0 {
            tracing::warn!(errno = -result, "wake poll failed; re-arming");
        }
        // Reset the counter before the next channel drain (see the module docs). EAGAIN
        // means it was already zero.
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&*self.wake, &mut counter);
    }

    fn on_op_cqe(&mut self, key: usize, result: i32) {
        let op = self.slots[key].as_mut().expect("CQE for an empty slot");
        match advance(op, result, &self.caps) {
            Step::Resubmit => self.pending.push_back(key),
            Step::Complete(outcome) => {
                let op = self.slots[key].take().expect("slot emptied twice");
                self.free.push(key);
                op.queued.complete(outcome);
            }
        }
    }

    /// Teardown after a panic in `run`: wait until the kernel has given back every SQE, then
    /// fail every op still in the table (after a panic their progress is not trusted).
    fn drain_after_panic(&mut self) {
        while self.in_kernel > 0 {
            if let Err(err) = self.ring.submit_and_wait(1) {
                if Errno::from_io_error(&err) == Some(Errno::INTR) {
                    continue;
                }
                tracing::error!(error = %err, "cannot drain io_uring; leaking op buffers");
                // The kernel may still use these buffers: never free them. Their ops still
                // complete (with an empty buffer) so that no consumer waits forever.
                for op in self.slots.iter_mut().filter_map(Option::take) {
                    op.queued
                        .fail_leaking_buffer(io::Error::other("disk engine worker stopped"));
                }
                std::mem::forget(self.zero_chunk.take());
                return;
            }
            for cqe in self.ring.completion() {
                if cqe.user_data() == WAKE_TOKEN {
                    self.wake_armed = false;
                } else {
                    self.in_kernel -= 1;
                }
            }
        }
        for op in self.slots.iter_mut().filter_map(Option::take) {
            op.queued
                .complete(Err(io::Error::other("disk engine worker stopped")));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.in_kernel > 0 || self.slots_in_use() > 0 {
            self.drain_after_panic();
        }
    }
}

/// Builds the next SQE of `op` (without `user_data`).
fn build_sqe(
    op: &mut InFlight,
    fd: types::Fd,
    zero_chunk: Option<&AlignedBuf>,
    caps: &Capabilities,
) -> squeue::Entry {
    let DiskOp {
        offset,
        len,
        ref mut buf,
        kind,
        ..
    } = op.queued.op;
    let done = op.done;
    assert!(done <= len);
    let (rest_offset, rest_len) = (offset + u64::from(done), caps.request_len(len - done));
    match op.stage {
        Stage::Read => {
            // `wrapping_add` stays in bounds: done <= len <= buf.len().
            let ptr = buf.as_mut_ptr().wrapping_add(done as usize);
            opcode::Read::new(fd, ptr, rest_len)
                .offset(rest_offset)
                .build()
        }
        Stage::Write { dsync } => {
            let ptr = buf.as_ptr().wrapping_add(done as usize);
            let flags = if dsync {
                ReadWriteFlags::DSYNC.bits()
            } else {
                0
            };
            let flags = i32::try_from(flags).expect("RWF_DSYNC fits in i32");
            opcode::Write::new(fd, ptr, rest_len)
                .offset(rest_offset)
                .rw_flags(flags)
                .build()
        }
        Stage::SyncAfterWrite => {
            assert!(matches!(kind, DiskOpKind::Write { fua: true }));
            opcode::Fsync::new(fd)
                .offset(offset)
                .len(len)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        }
        Stage::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Stage::Discard => fallocate(
            fd,
            offset,
            len,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        ),
        Stage::ZeroRange => fallocate(fd, offset, len, FallocateFlags::ZERO_RANGE),
        Stage::ZeroWrite => {
            let chunk = zero_chunk.expect("zero chunk allocated before pushing zero writes");
            let chunk_len = rest_len.min(u32::try_from(chunk.len()).expect("chunk fits u32"));
            opcode::Write::new(fd, chunk.as_ptr(), chunk_len)
                .offset(rest_offset)
                .build()
        }
    }
}

fn fallocate(fd: types::Fd, offset: u64, len: u32, mode: FallocateFlags) -> squeue::Entry {
    let mode = i32::try_from(mode.bits()).expect("fallocate mode fits in i32");
    opcode::Fallocate::new(fd, u64::from(len))
        .offset(offset)
        .mode(mode)
        .build()
}

/// Applies one CQE result to `op` and says what comes next.
fn advance(op: &mut InFlight, result: i32, caps: &Capabilities) -> Step {
    let len = op.queued.op.len;
    let error = || Step::Complete(Err(io::Error::from_raw_os_error(-result)));
    let transferred = u32::try_from(result).ok();
    match op.stage {
        Stage::Read => match transferred {
            // An error after some bytes were read, or the end of the file: a short read.
            None if op.done > 0 => Step::Complete(Ok(op.done)),
            None => error(),
            Some(0) => Step::Complete(Ok(op.done)),
            Some(n) => {
                op.done += n;
                assert!(op.done <= len, "kernel read more than asked");
                if op.done == len {
                    Step::Complete(Ok(len))
                } else {
                    Step::Resubmit
                }
            }
        },
        Stage::Write { dsync } => {
            if dsync && is_unsupported(-result) {
                caps.disable_rwf_dsync();
                op.stage = Stage::Write { dsync: false };
                return Step::Resubmit;
            }
            let fua = matches!(op.queued.op.kind, DiskOpKind::Write { fua: true });
            match advance_write(op, transferred, result) {
                Step::Complete(Ok(_)) if fua && !dsync => {
                    op.stage = Stage::SyncAfterWrite;
                    Step::Resubmit
                }
                step => step,
            }
        }
        Stage::ZeroWrite => advance_write(op, transferred, result),
        Stage::ZeroRange if is_unsupported(-result) => {
            caps.disable_zero_range();
            op.stage = Stage::ZeroWrite;
            Step::Resubmit
        }
        Stage::Flush if result >= 0 => Step::Complete(Ok(0)),
        Stage::SyncAfterWrite | Stage::Discard | Stage::ZeroRange if result >= 0 => {
            Step::Complete(Ok(len))
        }
        Stage::Flush | Stage::SyncAfterWrite | Stage::Discard | Stage::ZeroRange => error(),
    }
}

/// Progress of a data-writing stage: more to write, done, or failed.
fn advance_write(op: &mut InFlight, transferred: Option<u32>, result: i32) -> Step {
    let len = op.queued.op.len;
    match transferred {
        None => Step::Complete(Err(io::Error::from_raw_os_error(-result))),
        Some(0) if op.done < len => Step::Complete(Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the kernel wrote no bytes",
        ))),
        Some(n) => {
            op.done += n;
            assert!(op.done <= len, "kernel wrote more than asked");
            if op.done == len {
                Step::Complete(Ok(len))
            } else {
                Step::Resubmit
            }
        }
    }
}
