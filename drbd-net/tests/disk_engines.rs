//! The disk engines against one suite: every test in `suite` runs once on the `io_uring`
//! engine and once on the thread pool (modules `uring` and `thread_pool` below).
//!
//! The model tests submit random reads, writes (some FUA), flushes, discards and zeroings
//! with many ops in flight and compare every read with an in-memory model of the file. Ops
//! whose outcome depends on their order (overlapping ranges, or ranges that reach past the
//! end of the file while another op may move it) are never in flight together, so the
//! model can apply each op at submission.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drbd_net::disk::{
    engine_from_file, open_engine, uring_available, AlignedBuf, Completion, CompletionReceiver,
    DirectIo, DiskEngine, DiskOp, DiskOpKind, EngineChoice, EngineOptions, OpenError,
    SimulatedFailures, SubmitError,
};

/// Upper bound for any single completion, for slow shared machines.
const PATIENCE: Duration = Duration::from_secs(60);

/// `O_DIRECT` alignment used by the direct tests (the page size; covers 512-byte and 4 KiB
/// logical blocks).
const DIRECT_ALIGN: u64 = 4096;

/// An engine with its receiver and a small runtime to wait for completions with a timeout.
struct Harness {
    engine: Box<dyn DiskEngine>,
    completions: CompletionReceiver,
    runtime: tokio::runtime::Runtime,
}

impl Harness {
    fn new((engine, completions): (Box<dyn DiskEngine>, CompletionReceiver)) -> Self {
        init_logging();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        Self {
            engine,
            completions,
            runtime,
        }
    }

    fn open(path: &Path, options: &EngineOptions) -> Self {
        Self::new(open_engine(path, options).unwrap())
    }

    fn next(&mut self) -> Completion {
        let completions = &mut self.completions;
        self.runtime
            .block_on(async { tokio::time::timeout(PATIENCE, completions.recv()).await })
            .expect("no completion in time")
            .expect("completion channel closed")
    }

    fn submit(&self, op: DiskOp) {
        self.engine.submit(op).unwrap();
    }

    /// Submits one op and waits for its completion.
    fn run(&mut self, op: DiskOp) -> Completion {
        let id = op.id;
        self.submit(op);
        let completion = self.next();
        assert_eq!(completion.id, id);
        completion
    }

    fn read(&mut self, offset: u64, len: usize) -> (io::Result<u32>, AlignedBuf) {
        let done = self.run(DiskOp::read(0, offset, AlignedBuf::zeroed(len)));
        (done.result, done.buf)
    }
}

/// Shows the engines' log lines (engine choice, `O_DIRECT`, fallbacks) with `--nocapture`.
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

fn options(engine: EngineChoice, direct: DirectIo, queue_depth: u32) -> EngineOptions {
    EngineOptions {
        direct,
        queue_depth,
        engine,
        simulate: SimulatedFailures::default(),
    }
}

/// `None` (and a note on stderr) when `choice` cannot run on this machine.
fn runnable(choice: EngineChoice) -> Option<EngineChoice> {
    if choice == EngineChoice::Uring {
        if let Err(err) = uring_available() {
            eprintln!("SKIPPED: io_uring unavailable here ({err})");
            return None;
        }
    }
    Some(choice)
}

fn expected_name(choice: EngineChoice) -> &'static str {
    match choice {
        EngineChoice::ThreadPool => "thread-pool",
        _ => "io_uring",
    }
}

/// A fresh file of `contents` in `dir`.
fn file_with(dir: &Path, contents: &[u8]) -> PathBuf {
    let path = dir.join("backing.img");
    std::fs::write(&path, contents).unwrap();
    path
}

/// A directory on tmpfs if the machine has `/dev/shm`.
fn tmpfs_dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn errno(result: &io::Result<u32>) -> Option<i32> {
    result.as_ref().err().and_then(io::Error::raw_os_error)
}

/// splitmix64: small, seedable, good enough to drive op generation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// What the completion of an op in flight must look like.
enum Expect {
    Read(Vec<u8>),
    Len(u32),
}

/// Ops in flight in a model run: the range each claims, and its expected result.
type InFlight = HashMap<u64, (Option<(u64, u64)>, Expect)>;

/// The file as it must be once every submitted op has completed.
struct Model {
    data: Vec<u8>,
}

impl Model {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Range other ops must not overlap while this one is in flight. An op reaching past the
    /// end depends on (or moves) the file size, so it claims everything from the end on.
    fn claim(&self, op: &DiskOp) -> Option<(u64, u64)> {
        if op.kind == DiskOpKind::Flush {
            return None;
        }
        let end = op.offset + u64::from(op.len);
        if end > self.size() {
            Some((op.offset.min(self.size()), u64::MAX))
        } else {
            Some((op.offset, end))
        }
    }

    fn apply(&mut self, op: &DiskOp) -> Expect {
        let start = op.offset as usize;
        let end = start + op.len as usize;
        match op.kind {
            DiskOpKind::Read => {
                let stop = end.min(self.data.len());
                Expect::Read(self.data.get(start..stop).unwrap_or_default().to_vec())
            }
            DiskOpKind::Write { .. } => {
                if end > self.data.len() {
                    self.data.resize(end, 0);
                }
                self.data[start..end].copy_from_slice(&op.buf[..op.len as usize]);
                Expect::Len(op.len)
            }
            DiskOpKind::Flush => Expect::Len(0),
            DiskOpKind::Discard => {
                let stop = end.min(self.data.len());
                if start < stop {
                    self.data[start..stop].fill(0);
                }
                Expect::Len(op.len)
            }
            DiskOpKind::WriteZeroes => {
                if end > self.data.len() {
                    self.data.resize(end, 0);
                }
                self.data[start..end].fill(0);
                Expect::Len(op.len)
            }
        }
    }
}

/// Shape of one model run.
struct ModelRun<'a> {
    dir: &'a Path,
    direct: DirectIo,
    /// Granularity of offsets and lengths (1 for buffered I/O).
    align: u64,
    simulate: SimulatedFailures,
    seed: u64,
    ops: usize,
}

/// Largest offset + length the generator uses: ops straddle the initial end of the file.
const MODEL_SPAN: u64 = 768 * 1024;
/// Largest op length in the model runs.
const MODEL_OP_MAX: u64 = 96 * 1024;
/// Ops in flight at most in the model runs.
const MODEL_QUEUE_DEPTH: u32 = 32;

fn model_run(choice: EngineChoice, run: &ModelRun<'_>) -> Harness {
    let mut rng = Rng(run.seed);
    let initial_len = (rng.below(MODEL_SPAN / 2) / run.align * run.align) as usize;
    let mut model = Model {
        data: rng.bytes(initial_len),
    };
    let path = file_with(run.dir, &model.data);
    let mut opts = options(choice, run.direct, MODEL_QUEUE_DEPTH);
    opts.simulate = run.simulate.clone();
    let mut harness = Harness::open(&path, &opts);
    assert_eq!(harness.engine.name(), expected_name(choice));
    let mut in_flight = InFlight::new();
    let mut most_in_flight = 0;
    let units = MODEL_SPAN / run.align;

    let check = |completion: Completion, expect: Expect, seed: u64| {
        let id = completion.id;
        match expect {
            Expect::Read(data) => {
                let n = completion
                    .result
                    .unwrap_or_else(|e| panic!("seed {seed} op {id}: {e}"));
                assert_eq!(n as usize, data.len(), "seed {seed} op {id}: read length");
                assert!(
                    completion.buf[..data.len()] == data[..],
                    "seed {seed} op {id}: data"
                );
            }
            Expect::Len(len) => {
                let n = completion
                    .result
                    .unwrap_or_else(|e| panic!("seed {seed} op {id}: {e}"));
                assert_eq!(n, len, "seed {seed} op {id}: result");
            }
        }
    };

    for id in 0..run.ops as u64 {
        let offset = rng.below(units) * run.align;
        let max_units = (MODEL_OP_MAX / run.align).min(units - offset / run.align);
        let len = ((1 + rng.below(max_units)) * run.align) as u32;
        let op = match rng.below(20) {
            0..=5 => DiskOp::read(id, offset, AlignedBuf::zeroed(len as usize)),
            6..=12 => {
                let data = AlignedBuf::from_slice(&rng.bytes(len as usize));
                DiskOp::write(id, offset, data, rng.below(4) == 0)
            }
            13 => DiskOp::flush(id),
            14..=16 => DiskOp::discard(id, offset, len),
            _ => DiskOp::write_zeroes(id, offset, len),
        };
        let claim = model.claim(&op);
        let conflicts = |in_flight: &InFlight| {
            let Some((start, end)) = claim else {
                return false;
            };
            in_flight.values().any(|(other, _)| {
                other.is_some_and(|(other_start, other_end)| start < other_end && other_start < end)
            })
        };
        while conflicts(&in_flight) {
            let completion = harness.next();
            let (_, expect) = in_flight.remove(&completion.id).unwrap();
            check(completion, expect, run.seed);
        }
        let expect = model.apply(&op);
        let mut op = op;
        loop {
            match harness.engine.submit(op) {
                Ok(()) => break,
                Err(SubmitError::QueueFull(back)) => {
                    assert_eq!(in_flight.len(), MODEL_QUEUE_DEPTH as usize);
                    op = back;
                    let completion = harness.next();
                    let (_, expect) = in_flight.remove(&completion.id).unwrap();
                    check(completion, expect, run.seed);
                }
                Err(err) => panic!("seed {}: {err:?}", run.seed),
            }
        }
        in_flight.insert(id, (claim, expect));
        most_in_flight = most_in_flight.max(in_flight.len());
    }
    while !in_flight.is_empty() {
        let completion = harness.next();
        let (_, expect) = in_flight.remove(&completion.id).unwrap();
        check(completion, expect, run.seed);
    }
    assert!(
        most_in_flight > 4,
        "seed {}: only {most_in_flight} ops in flight",
        run.seed
    );

    // The whole file, through the engine, matches the model.
    assert_eq!(
        harness.engine.file_len().unwrap(),
        model.size(),
        "seed {}",
        run.seed
    );
    let whole = (model.size().max(1)).next_multiple_of(DIRECT_ALIGN) as usize;
    let (result, buf) = harness.read(0, whole);
    assert_eq!(result.unwrap() as u64, model.size());
    assert!(
        buf[..model.data.len()] == model.data[..],
        "seed {}: final contents",
        run.seed
    );
    harness
}

/// Tests run against each engine; `choice` is the engine under test.
mod suite {
    use super::*;

    const SEEDS: [u64; 3] = [1, 0xd1b5_4a32_d192_ed03, 20_261_125];

    pub fn model_buffered_ext4(choice: EngineChoice) {
        for seed in SEEDS {
            let dir = tempfile::tempdir().unwrap();
            let run = ModelRun {
                dir: dir.path(),
                direct: DirectIo::Off,
                align: 1,
                simulate: SimulatedFailures::default(),
                seed,
                ops: 400,
            };
            let harness = model_run(choice, &run);
            assert!(!harness.engine.direct_io());
        }
    }

    pub fn model_direct_ext4(choice: EngineChoice) {
        for seed in SEEDS {
            let dir = tempfile::tempdir().unwrap();
            let run = ModelRun {
                dir: dir.path(),
                direct: DirectIo::On,
                align: DIRECT_ALIGN,
                simulate: SimulatedFailures::default(),
                seed,
                ops: 300,
            };
            let harness = model_run(choice, &run);
            assert!(harness.engine.direct_io());
        }
    }

    /// tmpfs has no `FALLOC_FL_ZERO_RANGE`, so write-zeroes takes the zero-writing path.
    pub fn model_tmpfs(choice: EngineChoice) {
        for seed in SEEDS {
            let dir = tmpfs_dir();
            let run = ModelRun {
                dir: dir.path(),
                direct: DirectIo::Auto,
                align: DIRECT_ALIGN,
                simulate: SimulatedFailures::default(),
                seed,
                ops: 300,
            };
            model_run(choice, &run);
        }
    }

    /// FUA as write + fdatasync, write-zeroes as zero writes, and every read and write
    /// split into several requests.
    pub fn model_fallbacks(choice: EngineChoice) {
        for seed in SEEDS {
            let dir = tempfile::tempdir().unwrap();
            let run = ModelRun {
                dir: dir.path(),
                direct: DirectIo::Off,
                align: 1,
                simulate: SimulatedFailures {
                    rwf_dsync_unsupported: true,
                    zero_range_unsupported: true,
                    short_transfers: true,
                    ..SimulatedFailures::default()
                },
                seed,
                ops: 300,
            };
            model_run(choice, &run);
        }
    }

    /// Split transfers with `O_DIRECT`: the continuation requests stay aligned.
    pub fn model_direct_short_transfers(choice: EngineChoice) {
        for seed in SEEDS {
            let dir = tempfile::tempdir().unwrap();
            let run = ModelRun {
                dir: dir.path(),
                direct: DirectIo::On,
                align: DIRECT_ALIGN,
                simulate: SimulatedFailures {
                    short_transfers: true,
                    zero_range_unsupported: true,
                    ..SimulatedFailures::default()
                },
                seed,
                ops: 200,
            };
            let harness = model_run(choice, &run);
            assert!(harness.engine.direct_io());
        }
    }

    pub fn short_file_and_end_of_file(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let contents: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let path = file_with(dir.path(), &contents);
        let mut h = Harness::open(&path, &options(choice, DirectIo::Off, 8));

        // A read across the end is short; at or past the end it reads nothing and leaves
        // the buffer alone.
        let (result, buf) = h.read(0, 4096);
        assert_eq!(result.unwrap(), 1000);
        assert_eq!(&buf[..1000], &contents[..]);
        let (result, buf) = h.read(990, 100);
        assert_eq!(result.unwrap(), 10);
        assert_eq!(&buf[..10], &contents[990..]);
        let mut marked = AlignedBuf::from_slice(&[0xaa; 64]);
        marked[0] = 0x55;
        let done = h.run(DiskOp::read(1, 1000, marked));
        assert_eq!(done.result.unwrap(), 0);
        assert_eq!(done.buf[0], 0x55);
        assert_eq!(h.read(1 << 20, 10).0.unwrap(), 0);

        // A write at the end extends the file; one past it leaves a hole of zeroes.
        let done = h.run(DiskOp::write(
            2,
            1000,
            AlignedBuf::from_slice(b"tail"),
            false,
        ));
        assert_eq!(done.result.unwrap(), 4);
        let done = h.run(DiskOp::write(3, 2000, AlignedBuf::from_slice(b"far"), true));
        assert_eq!(done.result.unwrap(), 3);
        assert_eq!(h.engine.file_len().unwrap(), 2003);
        let (result, buf) = h.read(996, 1100);
        assert_eq!(result.unwrap(), 1007);
        assert_eq!(
            &buf[..8],
            &[
                contents[996],
                contents[997],
                contents[998],
                contents[999],
                b't',
                b'a',
                b'i',
                b'l'
            ]
        );
        assert!(buf[8..1004].iter().all(|&b| b == 0));
        assert_eq!(&buf[1004..1007], b"far");

        // Discard keeps the size, even when it reaches past the end; write-zeroes extends.
        assert_eq!(h.run(DiskOp::discard(4, 1500, 4096)).result.unwrap(), 4096);
        assert_eq!(h.engine.file_len().unwrap(), 2003);
        assert!(h.read(1500, 503).1.iter().all(|&b| b == 0));
        assert_eq!(
            h.run(DiskOp::write_zeroes(5, 2003, 997)).result.unwrap(),
            997
        );
        assert_eq!(h.engine.file_len().unwrap(), 3000);
        assert_eq!(h.run(DiskOp::flush(6)).result.unwrap(), 0);

        // Zero-length reads and writes complete with 0.
        assert_eq!(h.read(10, 0).0.unwrap(), 0);
        let done = h.run(DiskOp::write(7, 10, AlignedBuf::zeroed(0), false));
        assert_eq!(done.result.unwrap(), 0);
        assert_eq!(h.engine.file_len().unwrap(), 3000);
    }

    /// With `O_DIRECT` the end of the file still gives a short count, even mid-block.
    pub fn short_file_direct(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let contents = vec![7u8; 1000];
        let path = file_with(dir.path(), &contents);
        let mut h = Harness::open(&path, &options(choice, DirectIo::On, 8));
        assert!(h.engine.direct_io());
        let (result, buf) = h.read(0, 8192);
        assert_eq!(result.unwrap(), 1000);
        assert!(buf[..1000].iter().all(|&b| b == 7));
        assert_eq!(h.read(4096, 4096).0.unwrap(), 0);
    }

    /// `/tmp` is ext4 here: `Auto` gets `O_DIRECT`, and misaligned ops fail cleanly.
    pub fn direct_io_on_ext4(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[1u8; 8192]);
        let mut h = Harness::open(&path, &options(choice, DirectIo::Auto, 8));
        assert_eq!(h.engine.name(), expected_name(choice));
        assert!(h.engine.direct_io(), "ext4 supports O_DIRECT");
        let done = h.run(DiskOp::write(
            1,
            4096,
            AlignedBuf::from_slice(&[2u8; 4096]),
            true,
        ));
        assert_eq!(done.result.unwrap(), 4096);
        let (result, buf) = h.read(0, 8192);
        assert_eq!(result.unwrap(), 8192);
        assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 2));
        // Misaligned offset and length: the kernel says EINVAL, the engine reports it.
        let (result, _) = h.read(1, 4096);
        assert_eq!(
            errno(&result),
            Some(rustix::io::Errno::INVAL.raw_os_error())
        );
        let done = h.run(DiskOp::write(
            2,
            0,
            AlignedBuf::from_slice(&[3u8; 100]),
            false,
        ));
        assert_eq!(
            errno(&done.result),
            Some(rustix::io::Errno::INVAL.raw_os_error())
        );
        assert_eq!(done.buf.len(), 100, "the buffer comes back with the error");
        // The engine keeps working after errors.
        assert_eq!(h.read(0, 4096).0.unwrap(), 4096);
    }

    /// Linux 6.6 and later do `O_DIRECT` on tmpfs; older kernels refuse it with `EINVAL` and
    /// `Auto` falls back. Either way, the engine works in the mode it reports.
    pub fn tmpfs_direct_mode(choice: EngineChoice) {
        let dir = tmpfs_dir();
        let path = file_with(dir.path(), &[5u8; 4096]);
        let mut h = Harness::open(&path, &options(choice, DirectIo::Auto, 8));
        eprintln!(
            "tmpfs: engine {} direct {}",
            h.engine.name(),
            h.engine.direct_io()
        );
        let done = h.run(DiskOp::write(
            1,
            4096,
            AlignedBuf::from_slice(&[6u8; 4096]),
            true,
        ));
        assert_eq!(done.result.unwrap(), 4096);
        let (result, buf) = h.read(0, 8192);
        assert_eq!(result.unwrap(), 8192);
        assert!(buf[..4096].iter().all(|&b| b == 5) && buf[4096..].iter().all(|&b| b == 6));
        let on = open_engine(&path, &options(choice, DirectIo::On, 8));
        assert_eq!(
            on.is_ok(),
            h.engine.direct_io(),
            "On succeeds exactly when Auto got it"
        );
    }

    /// A file system refusing `O_DIRECT` (simulated): `Auto` reopens buffered, `On` fails.
    pub fn direct_refused_falls_back(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[9u8; 100]);
        let mut opts = options(choice, DirectIo::Auto, 8);
        opts.simulate.direct_open = true;
        let mut h = Harness::open(&path, &opts);
        assert!(!h.engine.direct_io());
        assert_eq!(
            h.read(50, 100).0.unwrap(),
            50,
            "buffered I/O takes unaligned ops"
        );
        opts.direct = DirectIo::On;
        match open_engine(&path, &opts) {
            Err(OpenError::DirectUnsupported { .. }) => {}
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("O_DIRECT required but refused, yet the engine opened"),
        }
    }

    /// Outstanding ops are bounded until their completions are received; the refused op
    /// comes back whole.
    pub fn queue_full_returns_op(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[0u8; 8192]);
        let mut h = Harness::open(&path, &options(choice, DirectIo::Off, 2));
        assert_eq!(h.engine.queue_depth(), 2);
        h.submit(DiskOp::write(1, 0, AlignedBuf::from_slice(b"one"), false));
        h.submit(DiskOp::write(2, 100, AlignedBuf::from_slice(b"two"), false));
        // Give the engine time to finish both; they still count until received.
        std::thread::sleep(Duration::from_millis(50));
        let extra = DiskOp::write(3, 200, AlignedBuf::from_slice(b"three"), false);
        let back = match h.engine.submit(extra) {
            Err(SubmitError::QueueFull(op)) => op,
            other => panic!("expected QueueFull, got {other:?}"),
        };
        assert_eq!((back.id, back.offset, back.len), (3, 200, 5));
        assert_eq!(back.buf.as_slice(), b"three");
        let first = h.next();
        assert!(first.result.is_ok());
        h.submit(back);
        let mut ids = vec![first.id, h.next().id, h.next().id];
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(&std::fs::read(&path).unwrap()[200..205], b"three");
    }

    /// Dropping the engine with ops in flight runs them all to completion before the
    /// buffers go; the receiver then sees every completion and the end of the stream.
    pub fn drop_with_ops_in_flight(choice: EngineChoice) {
        const OPS: u64 = 64;
        const OP_BYTES: usize = 128 * 1024;
        for direct in [DirectIo::Off, DirectIo::On] {
            let dir = tempfile::tempdir().unwrap();
            let path = file_with(dir.path(), &[]);
            let (engine, mut completions) =
                open_engine(&path, &options(choice, direct, OPS as u32)).unwrap();
            for id in 0..OPS {
                let data = AlignedBuf::from_slice(&vec![id as u8; OP_BYTES]);
                engine
                    .submit(DiskOp::write(id, id * OP_BYTES as u64, data, id % 8 == 0))
                    .unwrap();
            }
            drop(engine);
            let mut seen = 0;
            while let Some(done) = completions.blocking_recv() {
                assert_eq!(done.result.unwrap(), OP_BYTES as u32);
                assert!(done.buf.iter().all(|&b| b == done.id as u8));
                seen += 1;
            }
            assert_eq!(seen, OPS);
            let file = std::fs::read(&path).unwrap();
            assert_eq!(file.len(), OPS as usize * OP_BYTES);
            for (id, chunk) in file.chunks(OP_BYTES).enumerate() {
                assert!(chunk.iter().all(|&b| b == id as u8), "op {id} not written");
            }
        }
    }

    /// Reads in flight into buffers when both the receiver and the engine go away: no
    /// completion can be delivered, the engine still waits for the kernel before freeing.
    pub fn drop_receiver_then_engine(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &vec![3u8; 4 << 20]);
        let (engine, completions) = open_engine(&path, &options(choice, DirectIo::On, 64)).unwrap();
        for id in 0..32u64 {
            engine
                .submit(DiskOp::read(id, id * 65536, AlignedBuf::zeroed(65536)))
                .unwrap();
        }
        for id in 32..64u64 {
            let data = AlignedBuf::from_slice(&[4u8; 65536]);
            engine
                .submit(DiskOp::write(id, id * 65536, data, false))
                .unwrap();
        }
        drop(completions);
        // With the receiver gone, nothing more is accepted.
        let refused = engine.submit(DiskOp::flush(99));
        assert!(
            matches!(refused, Err(SubmitError::Closed(_))),
            "{refused:?}"
        );
        drop(engine);
        let file = std::fs::read(&path).unwrap();
        assert!(file[..32 * 65536].iter().all(|&b| b == 3));
        assert!(
            file[32 * 65536..].iter().all(|&b| b == 4),
            "accepted writes still ran"
        );
    }

    /// Errors from the kernel become error completions: a write to a read-only descriptor,
    /// a positional read on a pipe.
    pub fn error_completions(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), b"read only");
        let opts = options(choice, DirectIo::Off, 4);
        let mut h = Harness::new(engine_from_file(File::open(&path).unwrap(), &opts).unwrap());
        assert_eq!(h.engine.name(), expected_name(choice));
        let (result, buf) = h.read(0, 9);
        assert_eq!(result.unwrap(), 9);
        assert_eq!(buf.as_slice(), b"read only");
        let ebadf = Some(rustix::io::Errno::BADF.raw_os_error());
        let done = h.run(DiskOp::write(1, 0, AlignedBuf::from_slice(b"x"), false));
        assert_eq!(errno(&done.result), ebadf);
        assert_eq!(
            errno(
                &h.run(DiskOp::write(2, 0, AlignedBuf::from_slice(b"x"), true))
                    .result
            ),
            ebadf
        );
        assert_eq!(errno(&h.run(DiskOp::discard(3, 0, 4)).result), ebadf);
        assert_eq!(errno(&h.run(DiskOp::write_zeroes(4, 0, 4)).result), ebadf);
        drop(h);

        // A directory descriptor: reads fail with EISDIR.
        let mut h = Harness::new(engine_from_file(File::open(dir.path()).unwrap(), &opts).unwrap());
        let (result, _) = h.read(0, 16);
        assert_eq!(
            errno(&result),
            Some(rustix::io::Errno::ISDIR.raw_os_error())
        );
        assert_eq!(
            h.run(DiskOp::flush(5)).result.unwrap(),
            0,
            "fsync of a directory is fine"
        );
    }

    /// Malformed ops are refused at submission and handed back.
    pub fn invalid_ops_refused(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), b"data");
        let h = Harness::open(&path, &options(choice, DirectIo::Off, 4));
        let mut op = DiskOp::read(1, 0, AlignedBuf::zeroed(4));
        op.len = 5;
        match h.engine.submit(op) {
            Err(SubmitError::Invalid { op, reason }) => {
                assert_eq!(op.id, 1);
                assert_eq!(reason, "len exceeds the buffer");
            }
            other => panic!("{other:?}"),
        }
        let refused = h.engine.submit(DiskOp::discard(2, u64::MAX - 1, 10));
        assert!(matches!(refused, Err(SubmitError::Invalid { .. })));
        let refused = h.engine.submit(DiskOp::write_zeroes(3, 0, 0));
        assert!(matches!(refused, Err(SubmitError::Invalid { .. })));
    }

    /// Completions awaited from async code.
    pub fn async_completions(choice: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(dir.path(), &[0u8; 4096]);
        let (engine, mut completions) =
            open_engine(&path, &options(choice, DirectIo::Auto, 16)).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async move {
            for id in 0..16u64 {
                let data = AlignedBuf::from_slice(&[id as u8; 4096]);
                engine
                    .submit(DiskOp::write(id, id * 4096, data, false))
                    .unwrap();
            }
            let mut ids = Vec::new();
            for _ in 0..16 {
                let done = tokio::time::timeout(PATIENCE, completions.recv())
                    .await
                    .unwrap();
                let done = done.unwrap();
                assert_eq!(done.result.unwrap(), 4096);
                ids.push(done.id);
            }
            ids.sort_unstable();
            assert_eq!(ids, (0..16).collect::<Vec<_>>());
            drop(engine);
            assert!(
                completions.recv().await.is_none(),
                "stream ends after the engine"
            );
        });
    }
}

macro_rules! engine_tests {
    ($module:ident, $choice:expr, [$($test:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $(
                #[test]
                fn $test() {
                    if let Some(choice) = runnable($choice) {
                        suite::$test(choice);
                    }
                }
            )*
        }
    };
}

macro_rules! both_engines {
    ($($test:ident),* $(,)?) => {
        engine_tests!(uring, EngineChoice::Uring, [$($test),*]);
        engine_tests!(thread_pool, EngineChoice::ThreadPool, [$($test),*]);
    };
}

both_engines!(
    model_buffered_ext4,
    model_direct_ext4,
    model_tmpfs,
    model_fallbacks,
    model_direct_short_transfers,
    short_file_and_end_of_file,
    short_file_direct,
    direct_io_on_ext4,
    tmpfs_direct_mode,
    direct_refused_falls_back,
    queue_full_returns_op,
    drop_with_ops_in_flight,
    drop_receiver_then_engine,
    error_completions,
    invalid_ops_refused,
    async_completions,
);

#[test]
fn auto_uses_uring_where_permitted() {
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), &[0u8; 512]);
    let h = Harness::open(&path, &options(EngineChoice::Auto, DirectIo::Auto, 8));
    let expected = if uring_available().is_ok() {
        "io_uring"
    } else {
        "thread-pool"
    };
    assert_eq!(h.engine.name(), expected);
}

#[test]
fn forced_thread_pool() {
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), b"pool");
    let mut h = Harness::open(&path, &options(EngineChoice::ThreadPool, DirectIo::Off, 1));
    assert_eq!(h.engine.name(), "thread-pool");
    assert_eq!(h.read(0, 4).1.as_slice(), b"pool");
}

/// `io_uring` setup refused (as under seccomp): `Auto` falls back, `Uring` fails.
#[test]
fn uring_setup_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = file_with(dir.path(), b"fallback");
    let mut opts = options(EngineChoice::Auto, DirectIo::Off, 4);
    opts.simulate.uring_setup = true;
    let mut h = Harness::open(&path, &opts);
    assert_eq!(h.engine.name(), "thread-pool");
    assert_eq!(h.read(0, 8).1.as_slice(), b"fallback");
    opts.engine = EngineChoice::Uring;
    match open_engine(&path, &opts) {
        Err(OpenError::UringUnavailable(err)) => {
            assert_eq!(
                err.raw_os_error(),
                Some(rustix::io::Errno::PERM.raw_os_error())
            );
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("io_uring required but unavailable, yet the engine opened"),
    }
}

#[test]
fn open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let opts = EngineOptions::default();
    assert!(matches!(
        open_engine(&missing, &opts),
        Err(OpenError::Open { .. })
    ));
    let path = file_with(dir.path(), b"x");
    for queue_depth in [0, drbd_net::disk::MAX_QUEUE_DEPTH + 1] {
        let opts = EngineOptions {
            queue_depth,
            ..EngineOptions::default()
        };
        assert!(matches!(
            open_engine(&path, &opts),
            Err(OpenError::InvalidOptions(_))
        ));
    }
}
