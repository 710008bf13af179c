//! The runtime of one replicated volume: drives a [`drbd_core::replication::device::Device`]
//! with a disk engine, the metadata on the backing device, and (optionally) a peer connection.
//!
//! One tokio task (the "actor") owns the [`Device`]. Everything reaches it as a message:
//! application requests from the in-process API or the NBD export ([`Replica`] implements
//! [`BlockDevice`]), disk completions from the engine's channel, events of the peer session,
//! administrative requests and a 100 ms tick. After each input it executes the device's
//! actions: disk and metadata operations go to the engine (ops the engine cannot take yet wait
//! in a backlog bounded by the device's own limits), messages go to the session, completions
//! go back to the waiting callers.
//!
//! The metadata is the v08 layout `drbdmeta create-md` writes (internal meta data at the end
//! of the backing device). While the volume runs, the superblock carries a cleared
//! `MDF_AL_CLEAN` flag; a clean shutdown writes the bitmap and sets it again, so the next
//! start (or `drbdmeta dump-md`) knows whether the activity log must be replayed.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use drbd_core::meta::flags::{MDF_AL_CLEAN, MDF_PRIMARY_IND};
use drbd_core::meta::layout::{self, Layout, Placement};
use drbd_core::meta::superblock::{Magic, SuperblockV08, Uuids};
use drbd_core::replication::activity_log::{self, ActivityLog};
use drbd_core::replication::bitmap::DirtyBitmap;
use drbd_core::replication::device::{
    Action, AppOp, Device, DeviceConfig, DiskOp as CoreOp, Handler, IoError, LocalDisk, MetaOp,
    MAX_REQUEST_BYTES, RESYNC_STEP,
};
use drbd_core::replication::status::{AdminError, AdminRequest, StateRefusal, VolumeStatus};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::disk::{
    inject_faults, open_engine, AlignedBuf, BufPool, Completion, CompletionReceiver, DiskEngine,
    DiskOp, EngineOptions, FaultPlan, SubmitError,
};
use crate::handlers::Handlers;
use crate::handshake::VolumeHello;
use crate::nbd::{BlockDevice, BlockError, BoxFuture};
use crate::peer;
use crate::transport::{
    bounded_by_sndbuf, Connection, HelloSource, PeerConfig, ReceiveBudget, SessionEvent,
    SessionSender,
};
use crate::wire::{ConnState as WireConn, Sizes};
use drbd_core::replication::device::LocalHello;
use drbd_core::replication::msg::{PeerMsg, Socket};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Commands queued to the actor at most; callers wait beyond that (back-pressure).
const CMD_QUEUE: usize = 1024;
/// Environment variable with a [`FaultPlan`] for the backing device: a test aid that makes
/// the disk fail (`writes-after=N`, `reads-after=N`).
pub const FAULT_INJECT_ENV: &str = "DRBDD_FAULT_INJECT";
/// How long a shutdown waits for in-flight application requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Session events buffered between the transport and the actor (the transport's
/// `ReceiveBudget` bounds the pages among them, with what the device holds, by max-buffers).
const EVENT_QUEUE: usize = 64;
/// How long the sockets of a connection this node drops stay open, so that the peer can
/// process what it was sent last.
const DISCONNECT_LINGER: Duration = Duration::from_millis(500);
/// Payload bytes queued for the peer beyond which the actor stops taking new application
/// requests (back-pressure towards the application instead of unbounded queueing).
const OUTBOX_HIGH_BYTES: usize = 16 << 20;

/// Where the meta data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the backing device.
    Internal,
}

/// Everything needed to run one volume.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// Resource name (logs, NBD export).
    pub name: String,
    pub volume: u16,
    pub minor: u32,
    /// The backing device or file.
    pub disk: PathBuf,
    pub meta: MetaLocation,
    pub device: DeviceConfig,
    /// `al-extents`.
    pub al_extents: u32,
    pub engine: EngineOptions,
    /// The peer connection, if the resource has one configured (its `hello` is supplied by
    /// the volume); started at start and by `connect`.
    pub net: Option<PeerConfig>,
    /// The drbd.conf handlers.
    pub handlers: Handlers,
}

/// Why a volume could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: no valid meta data found: {reason} (run create-md)")]
    NoMetaData { path: PathBuf, reason: String },
    #[error("{0}")]
    Other(String),
}

enum Cmd {
    Io {
        sector: u64,
        op: AppOp,
        reply: oneshot::Sender<Result<Option<Bytes>, IoError>>,
    },
    Admin {
        req: AdminRequest,
        reply: oneshot::Sender<Result<(), AdminError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A running volume. Cloning the `Arc` shares it; [`Replica::shutdown`] stops it.
pub struct Replica {
    name: String,
    cmds: mpsc::Sender<Cmd>,
    status: watch::Receiver<VolumeStatus>,
    size_bytes: u64,
    engine: &'static str,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// NBD clients holding the device open (the actor reads it at each event).
    openers: Arc<AtomicU32>,
}

/// Most bytes of write buffers kept for reuse per volume.
const WRITE_POOL_BYTES: usize = 32 << 20;

/// How long a demotion refused because the device is open retries (for NBD clients that
/// closed their connection but whose end the server has not seen yet).
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// What attaching read from the backing device.
struct Attached {
    sb: SuperblockV08,
    layout: Layout,
    sectors: u64,
    bitmap: DirtyBitmap,
    al: ActivityLog,
    replayed_extents: usize,
}

fn read_at(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, StartError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| StartError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(buf)
}

/// Reads and validates the metadata (blocking).
fn read_metadata(cfg: &ReplicaConfig) -> Result<Attached, StartError> {
    let path = &cfg.disk;
    let io_err = |source| StartError::Io {
        path: path.clone(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = file_size(&file).map_err(io_err)?;
    let no_md = |reason: String| StartError::NoMetaData {
        path: path.clone(),
        reason,
    };
    let md_offset =
        layout::md_offset(Placement::Internal, size).map_err(|e| no_md(e.to_string()))?;
    let block = read_at(&file, path, md_offset, 4096)?;
    let sb = SuperblockV08::decode(&block, Placement::Internal, size)
        .map_err(|e| no_md(e.to_string()))?;
    let layout = sb
        .layout(Placement::Internal, size)
        .map_err(|e| no_md(e.to_string()))?;
    let sectors = layout.max_usable_sectors(sb.bm_bytes_per_bit);
    let bm_bytes =
        layout::bitmap_bytes(sectors, sb.bm_bytes_per_bit).map_err(|e| no_md(e.to_string()))?;
    let area = read_at(&file, path, layout.bm_offset(), bm_bytes)?;
    let mut bitmap =
        DirtyBitmap::from_disk_bytes(sectors, &area).map_err(|e| no_md(e.to_string()))?;
    let geometry = layout.al();
    let ring = read_at(&file, path, layout.al_offset(), geometry.size_bytes())?;
    let replay = activity_log::replay(&ring, geometry).map_err(|e| no_md(e.to_string()))?;
    let mut replayed_extents = 0;
    if !sb.is_clean() {
        // The volume did not stop cleanly: every extent that was active may differ from the
        // peer.
        replayed_extents = replay.extents.len();
        activity_log::mark_extents_dirty(&mut bitmap, &replay.extents);
    }
    let next_tr = replay.newest_tr.map_or(0, |n| n.wrapping_add(1));
    let al = ActivityLog::new(cfg.al_extents, geometry)
        .map_err(|e| StartError::Other(format!("al-extents {}: {e}", cfg.al_extents)))?
        .with_next_tr_number(next_tr);
    Ok(Attached {
        sb,
        layout,
        sectors,
        bitmap,
        al,
        replayed_extents,
    })
}

/// A completed read buffer, handed out as [`Bytes`] (the engine filled exactly `len` bytes).
struct ReadBuf(AlignedBuf);

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// The device's view of what attaching read.
fn local_disk(a: Attached) -> LocalDisk {
    LocalDisk {
        sectors: a.sectors,
        uuids: drbd_core::uuid::GenerationUuids::from_array([
            a.sb.uuids.current,
            a.sb.uuids.bitmap,
            a.sb.uuids.history[0],
            a.sb.uuids.history[1],
        ]),
        flags: a.sb.flags,
        bitmap: a.bitmap,
        al: a.al,
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // A block device: its size is where a seek to the end lands.
    use std::io::Seek;
    let mut f = file.try_clone()?;
    f.seek(io::SeekFrom::End(0))
}

impl Replica {
    /// Attaches the backing device, starts the actor, and connects when the configuration has
    /// a peer.
    pub async fn start(cfg: ReplicaConfig) -> Result<Arc<Replica>, StartError> {
        let c = cfg.clone();
        let attached = tokio::task::spawn_blocking(move || read_metadata(&c))
            .await
            .map_err(|e| StartError::Other(format!("attach task failed: {e}")))??;
        let (mut engine, mut completions) =
            open_engine(&cfg.disk, &cfg.engine).map_err(|e| StartError::Other(e.to_string()))?;
        if let Ok(spec) = std::env::var(FAULT_INJECT_ENV) {
            // A test aid: a disk that starts failing (on-io-error tests).
            let plan = FaultPlan::parse(&spec).map_err(StartError::Other)?;
            tracing::warn!(resource = %cfg.name, ?plan, "disk fault injection is on ({FAULT_INJECT_ENV})");
            (engine, completions) = inject_faults(engine, completions, plan);
        }
        let engine_name = engine.name();
        tracing::info!(
            resource = %cfg.name,
            "attached {}: {} sectors, disk engine {}{}, {} activity-log extents replayed, {} KiB out of sync",
            cfg.disk.display(),
            attached.sectors,
            engine_name,
            if engine.direct_io() { " (O_DIRECT)" } else { "" },
            attached.replayed_extents,
            attached.bitmap.count() * 4
        );
        let sb = attached.sb;
        let layout = attached.layout;
        let sectors = attached.sectors;
        let local = local_disk(attached);
        let mut dcfg = cfg.device.clone();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| StartError::Other(e.to_string()))?;
        dcfg.rng_seed = u64::from_le_bytes(seed);
        let dev = Device::new(dcfg, cfg.volume, cfg.minor, sectors, Some(local))
            .map_err(StartError::Other)?;
        let (status_tx, status_rx) = watch::channel(dev.status());
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (restart_tx, restart_rx) = mpsc::unbounded_channel();
        let (handler_tx, handler_rx) = mpsc::unbounded_channel();
        let size_bytes = sectors * 512;
        let openers = Arc::new(AtomicU32::new(0));
        let mut actor = Actor {
            name: cfg.name.clone(),
            dev,
            engine,
            sb,
            layout,
            origin: Instant::now(),
            app: HashMap::new(),
            next_req: 1,
            ops: HashMap::new(),
            next_op: 1,
            backlog: VecDeque::new(),
            metas: HashMap::new(),
            status: status_tx,
            // sndbuf-size bounds the outbox too, to at least one request of the largest
            // size so that requests still flow.
            outbox_high: bounded_by_sndbuf(
                cfg.net.as_ref().and_then(|c| c.sndbuf_size),
                MAX_REQUEST_BYTES as usize,
                OUTBOX_HIGH_BYTES,
            ),
            net_cfg: cfg.net.clone(),
            session: None,
            hello: Arc::new(Mutex::new(HelloSlot::default())),
            outbox_bytes: Arc::new(AtomicUsize::new(0)),
            restart_tx,
            restart_rx: Some(restart_rx),
            handler_tx,
            handler_rx: Some(handler_rx),
            openers: openers.clone(),
            write_bufs: BufPool::new(WRITE_POOL_BYTES),
            lingering: None,
            pending_detach: None,
            cfg: cfg.clone(),
            shutting_down: None,
        };
        // The superblock says "not clean" while the volume runs.
        actor.sb.flags &= !MDF_AL_CLEAN;
        actor.sb.la_size_sect = sectors;
        actor.drain_actions();
        if actor.net_cfg.is_some() {
            actor
                .start_session()
                .await
                .map_err(|e| StartError::Other(format!("cannot listen: {e}")))?;
        }
        let task = tokio::spawn(actor.run(cmd_rx, completions));
        Ok(Arc::new(Replica {
            name: cfg.name,
            cmds: cmd_tx,
            status: status_rx,
            size_bytes,
            engine: engine_name,
            task: Mutex::new(Some(task)),
            openers,
        }))
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk engine in use (`io_uring` or `thread-pool`).
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Size of the replicated device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The current state.
    pub fn status(&self) -> VolumeStatus {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the state or `limit` passes; returns the last state seen.
    pub async fn wait_for(
        &self,
        limit: Duration,
        pred: impl Fn(&VolumeStatus) -> bool,
    ) -> Result<VolumeStatus, VolumeStatus> {
        let mut rx = self.status.clone();
        let found = match tokio::time::timeout(limit, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        found.ok_or_else(|| self.status())
    }

    /// One application request of at most 1 MiB.
    pub async fn submit(&self, sector: u64, op: AppOp) -> Result<Option<Bytes>, IoError> {
        let rx = self.send_io(sector, op).await?;
        rx.await.map_err(|_| IoError::Disk)?
    }

    /// An administrative request.
    pub async fn admin(&self, req: AdminRequest) -> Result<(), AdminError> {
        let give_up = Instant::now() + CLOSE_GRACE;
        loop {
            let r = self.admin_once(req).await;
            // An NBD client that just disconnected is noticed by the server a moment later
            // (a block device's close is synchronous): a demotion refused because the device
            // is open waits a little for clients on their way out.
            if r != Err(AdminError::State(StateRefusal::DeviceInUse)) || Instant::now() > give_up {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin_once(&self, req: AdminRequest) -> Result<(), AdminError> {
        let (reply, rx) = oneshot::channel();
        let gone = || AdminError::Other {
            exit_code: 10,
            message: format!("{}: resource is shutting down", self.name),
        };
        self.cmds
            .send(Cmd::Admin { req, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Stops the volume: waits for in-flight requests, writes the metadata, closes the
    /// connection and the disk.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Reads `len` bytes at byte `offset` (both multiples of 512).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let mut out = bytes::BytesMut::with_capacity(len as usize);
        for (off, l) in chunks(offset, len)? {
            let rx = self.send_io(off / 512, AppOp::Read { len: l }).await?;
            out.extend_from_slice(&rx.await.map_err(|_| IoError::Disk)??.unwrap_or_default());
        }
        Ok(out.freeze())
    }

    /// Writes `data` at byte `offset`; with `fua`, durable on completion.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let len = u32::try_from(data.len()).map_err(|_| IoError::Invalid)?;
        // All chunks are submitted before waiting, so they run concurrently.
        let mut waits = Vec::new();
        for (off, l) in chunks(offset, len)? {
            let start = (off - offset) as usize;
            let piece = data.slice(start..start + l as usize);
            waits.push(
                self.send_io(off / 512, AppOp::Write { data: piece, fua })
                    .await?,
            );
        }
        for w in waits {
            w.await.map_err(|_| IoError::Disk)??;
        }
        Ok(())
    }

    /// Makes every completed write durable on this node and on the peer.
    pub async fn flush(&self) -> Result<(), IoError> {
        self.submit(0, AppOp::Flush).await.map(drop)
    }

    /// Discards (`zero == false`) or zeroes a range.
    pub async fn discard(&self, offset: u64, len: u32, zero: bool) -> Result<(), IoError> {
        let mut waits = Vec::new();
        for (off, l) in chunks(offset, len)? {
            let op = if zero {
                AppOp::Zeroes { len: l }
            } else {
                AppOp::Discard { len: l }
            };
            waits.push(self.send_io(off / 512, op).await?);
        }
        for w in waits {
            w.await.map_err(|_| IoError::Disk)??;
        }
        Ok(())
    }

    async fn send_io(
        &self,
        sector: u64,
        op: AppOp,
    ) -> Result<oneshot::Receiver<Result<Option<Bytes>, IoError>>, IoError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Io { sector, op, reply })
            .await
            .map_err(|_| IoError::Disk)?;
        Ok(rx)
    }
}

/// Splits a byte range into requests of at most [`MAX_REQUEST_BYTES`].
fn chunks(offset: u64, len: u32) -> Result<Vec<(u64, u32)>, IoError> {
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        return Err(IoError::Invalid);
    }
    let mut out = Vec::new();
    let mut off = offset;
    let mut left = len;
    while left > 0 {
        let l = left.min(MAX_REQUEST_BYTES);
        out.push((off, l));
        off += u64::from(l);
        left -= l;
    }
    Ok(out)
}

fn block_error(e: IoError) -> BlockError {
    match e {
        IoError::ReadOnly => BlockError::ReadOnly,
        IoError::Invalid => BlockError::OutOfRange,
        IoError::NoData | IoError::Disk => BlockError::Io(io::Error::from_raw_os_error(5)),
    }
}

impl BlockDevice for Replica {
    fn size(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        // Role changes happen while clients stay connected: writes on a Secondary fail with
        // EPERM per request instead.
        false
    }

    fn can_multi_conn(&self) -> bool {
        // Every request goes through the one actor; a flush covers all completed writes.
        true
    }

    fn opened(&self) {
        self.openers.fetch_add(1, Ordering::Relaxed);
    }

    fn closed(&self) {
        let before = self.openers.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(before > 0, "closed without opened");
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move { Replica::read(self, offset, len).await.map_err(block_error) })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            Replica::write(self, offset, data, fua)
                .await
                .map_err(block_error)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move { Replica::flush(self).await.map_err(block_error) })
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.discard(offset, len, false)
                .await
                .map_err(block_error)?;
            if fua {
                Replica::flush(self).await.map_err(block_error)?;
            }
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.discard(offset, len, true).await.map_err(block_error)?;
            if fua {
                Replica::flush(self).await.map_err(block_error)?;
            }
            Ok(())
        })
    }
}

// ------------------------------------------------------------------------------------------
// The actor
// ------------------------------------------------------------------------------------------

/// What an engine op belongs to.
enum OpFor {
    /// A data-area op of the device.
    Data { io: u64, read_len: Option<u32> },
    /// One write of a metadata operation.
    Meta { io: u64 },
}

/// A metadata operation in progress: writes left in the current stage, and a final write
/// that must wait for them (the AL block after its bitmap pages).
struct MetaProgress {
    left: u32,
    then: Option<(u64, AlignedBuf)>,
    failed: bool,
}

/// The live connection of a volume.
struct NetSession {
    conn: Connection,
    events: mpsc::Receiver<SessionEvent>,
    /// Messages for the pump tasks that feed them to the transport (which may wait for
    /// socket buffer space without stalling the actor), one per socket: a message for the
    /// meta socket (an acknowledgement, a conflict answer) never waits behind writes that
    /// wait for room on the data socket, since the peer may need it to make that room.
    outbox: [mpsc::UnboundedSender<(u64, PeerMsg)>; 2],
    /// The epoch of the established connection, if any.
    epoch: Option<u64>,
}

/// What the volume tells the peer in the next handshake, and what it told it in the last.
#[derive(Default)]
struct HelloSlot {
    current: Option<LocalHello>,
    sent: Option<LocalHello>,
}

struct Actor {
    name: String,
    dev: Device,
    engine: Box<dyn DiskEngine>,
    sb: SuperblockV08,
    layout: Layout,
    origin: Instant,
    app: HashMap<u64, oneshot::Sender<Result<Option<Bytes>, IoError>>>,
    next_req: u64,
    ops: HashMap<u64, OpFor>,
    next_op: u64,
    /// Ops the engine refused for lack of queue space, in order.
    backlog: VecDeque<DiskOp>,
    metas: HashMap<u64, MetaProgress>,
    status: watch::Sender<VolumeStatus>,
    net_cfg: Option<PeerConfig>,
    /// Payload bytes in the outbox beyond which no new application request is taken.
    outbox_high: usize,
    session: Option<NetSession>,
    hello: Arc<Mutex<HelloSlot>>,
    outbox_bytes: Arc<AtomicUsize>,
    /// A dropped connection that is to be started again reports here once it is closed.
    restart_tx: mpsc::UnboundedSender<()>,
    /// Handlers whose exit code the device wants report here.
    handler_tx: mpsc::UnboundedSender<(Handler, u64, i32)>,
    handler_rx: Option<mpsc::UnboundedReceiver<(Handler, u64, i32)>>,
    /// NBD clients holding the device open, counted by the [`Replica`].
    openers: Arc<AtomicU32>,
    restart_rx: Option<mpsc::UnboundedReceiver<()>>,
    /// Write buffers for the disk engine, reused.
    write_bufs: BufPool,
    /// A dropped connection whose sockets stay open for a moment (DISCONNECT_LINGER).
    lingering: Option<tokio::task::JoinHandle<()>>,
    /// A `detach` waiting for the local I/O in flight.
    pending_detach: Option<oneshot::Sender<Result<(), AdminError>>>,
    /// The volume's configuration (re-read metadata on `attach`).
    cfg: ReplicaConfig,
    shutting_down: Option<(Option<oneshot::Sender<()>>, Instant)>,
}

impl Actor {
    fn now(&self) -> Duration {
        Instant::now() - self.origin
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>, mut completions: CompletionReceiver) {
        let mut restart = self
            .restart_rx
            .take()
            .expect("the actor runs once with its restart channel");
        let mut tick = tokio::time::interval(RESYNC_STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut handler_results = self
            .handler_rx
            .take()
            .expect("the actor runs once with its handler channel");
        loop {
            // max-buffers: the transport reads the data socket while the device has room for
            // peer writes (see `ReceiveBudget`); events of both sockets are taken at all times
            // (acknowledgements on the meta socket may be what held peer writes wait for).
            if let Some(budget) = self.receive_budget() {
                budget.set_held(self.dev.peer_pages());
            }
            let receive = self.session.is_some();
            let accept = self.shutting_down.is_none()
                && self.pending_detach.is_none()
                && self.outbox_bytes.load(Ordering::Relaxed) < self.outbox_high;
            tokio::select! {
                c = completions.recv() => match c {
                    Some(c) => self.completion(c),
                    None => break,
                },
                cmd = cmds.recv(), if accept => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => self.begin_shutdown(None),
                },
                ev = next_event(&mut self.session), if receive => self.session_event(ev).await,
                Some(()) = restart.recv(), if self.shutting_down.is_none() => {
                    // The dropped connection is closed: connect again, unless `disconnect`
                    // made the resource StandAlone meanwhile.
                    if self.session.is_none()
                        && self.dev.conn_state() != drbd_core::state::ConnState::StandAlone
                    {
                        if let Err(e) = self.start_session().await {
                            tracing::error!(resource = %self.name, "cannot restart the connection: {e}");
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = self.now();
                    self.dev.tick(now);
                }
                Some((h, token, code)) = handler_results.recv() => {
                    let now = self.now();
                    self.dev.handler_done(now, h, token, code);
                }
            }
            self.drain_actions();
            if self.pending_detach.is_some() && !self.dev.local_io_in_flight() {
                let now = self.now();
                let r = self.dev.detach(now);
                if r.is_ok() {
                    tracing::info!(resource = %self.name, "detached {}", self.cfg.disk.display());
                }
                if let Some(reply) = self.pending_detach.take() {
                    let _ = reply.send(r);
                }
                self.drain_actions();
            }
            if self.shutdown_ready() {
                break;
            }
        }
        self.finish(&mut completions).await;
    }

    async fn command(&mut self, cmd: Cmd) {
        let now = self.now();
        self.dev.set_openers(self.openers.load(Ordering::Relaxed));
        match cmd {
            Cmd::Io { sector, op, reply } => {
                let id = self.next_req;
                self.next_req += 1;
                self.app.insert(id, reply);
                self.dev.submit(now, id, sector, op);
            }
            Cmd::Admin {
                req: AdminRequest::Detach,
                reply,
            } => {
                // Carried out once the local I/O in flight has drained (see `run`); new
                // application requests wait meanwhile.
                self.pending_detach = Some(reply);
            }
            Cmd::Admin { req, reply } => {
                let r = self.admin(req).await;
                let _ = reply.send(r);
            }
            Cmd::Shutdown { reply } => self.begin_shutdown(Some(reply)),
        }
    }

    async fn admin(&mut self, req: AdminRequest) -> Result<(), AdminError> {
        let now = self.now();
        match req {
            AdminRequest::Connect { discard_my_data } => {
                if self.net_cfg.is_none() {
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message: format!("{}: no peer configured", self.name),
                    });
                }
                if self.session.is_some() {
                    // Already connecting or connected: drbdsetup reports "net already
                    // configured" (netlink code 125).
                    return Err(AdminError::Other {
                        exit_code: 10,
                        message: "Failure: (125) Device has a net-config (use disconnect first)"
                            .to_string(),
                    });
                }
                if let Some(linger) = self.lingering.take() {
                    // A connection dropped a moment ago still holds the listening address.
                    let _ = linger.await;
                }
                self.dev.set_discard_my_data(discard_my_data);
                self.start_session().await.map_err(|e| AdminError::Other {
                    exit_code: 10,
                    message: format!("Failure: (102) Local address(port) already in use: {e}"),
                })
            }
            AdminRequest::Disconnect => {
                self.close_session().await;
                self.dev.disconnect(now);
                Ok(())
            }
            AdminRequest::Attach => self.attach().await,
            AdminRequest::Detach => unreachable!("detach is handled in command()"),
            AdminRequest::Primary { force } => {
                let r = self.dev.admin(now, req);
                if r != Err(AdminError::State(StateRefusal::PeerNotOutdated)) {
                    return r;
                }
                // The peer's data state is unknown: fence it first, as 8.4's drbd_set_role
                // does (the promotion waits for the handler, at most its time limit).
                self.dev.fence_for_promotion();
                let (tx, rx) = oneshot::channel();
                let done: Box<dyn FnOnce(i32) + Send> = Box::new(move |code| {
                    let _ = tx.send(code);
                });
                self.drain_actions();
                self.cfg
                    .handlers
                    .run(&self.name, Handler::FencePeer.name(), Some(done));
                let code = rx.await.unwrap_or(-1);
                let now = self.now();
                self.dev.promote_after_fencing(now, code, force)
            }
            other => self.dev.admin(now, other),
        }
    }

    /// Starts listening and connecting.
    /// `attach`: reads the metadata of the backing device again and hands it to the device.
    async fn attach(&mut self) -> Result<(), AdminError> {
        if self.dev.disk_state() != drbd_core::state::DiskState::Diskless {
            return Err(AdminError::Other {
                exit_code: 10,
                message: "Failure: (124) Device is attached to a disk (use detach first)"
                    .to_string(),
            });
        }
        let c = self.cfg.clone();
        let attached = tokio::task::spawn_blocking(move || read_metadata(&c))
            .await
            .map_err(|e| AdminError::Other {
                exit_code: 10,
                message: format!("attach task failed: {e}"),
            })?
            .map_err(|e| AdminError::Other {
                exit_code: 10,
                message: e.to_string(),
            })?;
        tracing::info!(
            resource = %self.name,
            "attached {} again: {} activity-log extents replayed, {} KiB out of sync",
            self.cfg.disk.display(),
            attached.replayed_extents,
            attached.bitmap.count() * 4
        );
        self.sb = attached.sb;
        self.sb.flags &= !MDF_AL_CLEAN;
        self.sb.la_size_sect = attached.sectors;
        self.layout = attached.layout;
        let local = local_disk(attached);
        let now = self.now();
        self.dev.attach(now, local)
    }

    /// The current session's data-socket flow control.
    fn receive_budget(&self) -> Option<&Arc<ReceiveBudget>> {
        self.session.as_ref().and_then(|s| s.conn.receive_budget())
    }

    async fn start_session(&mut self) -> io::Result<()> {
        let Some(mut cfg) = self.net_cfg.clone() else {
            return Ok(());
        };
        self.dev.connecting();
        self.publish_hello();
        let template = cfg.handshake.volumes.first().cloned();
        let slot = self.hello.clone();
        cfg.handshake.protocol.discard_my_data = self.dev.local_hello().discard_my_data;
        cfg.hello = Some(HelloSource::new(move || {
            let mut slot = slot.lock().expect("not poisoned");
            let Some(h) = slot.current else {
                return Vec::new();
            };
            slot.sent = Some(h);
            vec![volume_hello(&h, template.as_ref())]
        }));
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let (conn, sender) = Connection::spawn_session(cfg, tx).await?;
        if let Some(budget) = conn.receive_budget() {
            budget.set_limit(u64::from(self.dev.max_buffers()));
        }
        let outbox = [(); 2].map(|()| {
            let (outbox, rx) = mpsc::unbounded_channel();
            tokio::spawn(pump(sender.clone(), rx, self.outbox_bytes.clone()));
            outbox
        });
        self.session = Some(NetSession {
            conn,
            events,
            outbox,
            epoch: None,
        });
        Ok(())
    }

    async fn close_session(&mut self) {
        if let Some(s) = self.session.take() {
            s.conn.disconnect().await;
        }
    }

    /// Makes the volume's current hello available to the transport's next handshake.
    fn publish_hello(&mut self) {
        let h = self.dev.local_hello();
        self.hello.lock().expect("not poisoned").current = Some(h);
    }

    async fn session_event(&mut self, ev: Option<SessionEvent>) {
        let now = self.now();
        self.dev.set_openers(self.openers.load(Ordering::Relaxed));
        let Some(ev) = ev else {
            self.session = None;
            self.dev.disconnect(now);
            return;
        };
        let current = self.session.as_ref().and_then(|s| s.epoch);
        match ev {
            SessionEvent::Connected { epoch, hello, .. } => {
                if let Some(s) = self.session.as_mut() {
                    s.epoch = Some(epoch);
                }
                let sent = self.hello.lock().expect("not poisoned").sent.take();
                match sent {
                    Some(sent) => self.dev.connected(now, &hello, &sent),
                    None => tracing::error!(resource = %self.name, "connected without a hello"),
                }
            }
            SessionEvent::Msg { epoch, msg } => {
                let pages = msg.held_pages();
                if Some(epoch) == current {
                    if let Err(e) = self.dev.received(now, msg) {
                        tracing::warn!(resource = %self.name, "{e}");
                    }
                }
                // The device's held pages include the message's before the budget stops
                // counting it as read, so the budget never looks larger than it is.
                if let Some(budget) = self.receive_budget() {
                    budget.set_held(self.dev.peer_pages());
                    budget.taken(pages);
                }
            }
            SessionEvent::Lost {
                epoch,
                reason,
                retry,
            } => {
                if Some(epoch) == current {
                    if let Some(s) = self.session.as_mut() {
                        s.epoch = None;
                    }
                    self.dev.connection_lost(now, &reason);
                }
                if retry {
                    // The transport connects again by itself.
                    self.dev.connecting();
                } else {
                    self.close_session().await;
                    self.dev.disconnect(now);
                }
            }
            SessionEvent::StandAlone { reason } => {
                tracing::error!(resource = %self.name, "connection given up: {reason}");
                self.close_session().await;
                self.dev.disconnect(now);
            }
        }
    }

    fn drain_actions(&mut self) {
        while let Some(a) = self.dev.poll_action() {
            match a {
                Action::Disk { io, op } => self.disk_op(io, op),
                Action::Meta { io, op } => self.meta_op(io, op),
                Action::Send(msg) => {
                    if let Some(s) = &self.session {
                        if let Some(epoch) = s.epoch {
                            self.outbox_bytes
                                .fetch_add(payload_len(&msg), Ordering::Relaxed);
                            let socket = usize::from(msg.socket() == Socket::Meta);
                            let _ = s.outbox[socket].send((epoch, msg));
                        }
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(reply) = self.app.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
                Action::Disconnect { reason, retry } => {
                    tracing::warn!(resource = %self.name, "dropping the connection: {reason}");
                    if let Some(s) = self.session.take() {
                        // The sockets stay open for a moment: the peer must get to process
                        // what it was sent (a kernel peer decides a split brain from our
                        // P_UUIDS/P_STATE, and a socket closed at once makes it see a
                        // network failure instead and retry for good). Then the transport
                        // ends the connection; with `retry` a new one starts.
                        let restart = self.restart_tx.clone();
                        self.lingering = Some(tokio::spawn(async move {
                            tokio::time::sleep(DISCONNECT_LINGER).await;
                            s.conn.disconnect().await;
                            if retry {
                                let _ = restart.send(());
                            }
                        }));
                    }
                }
                Action::Log(line) => tracing::info!(resource = %self.name, "{line}"),
                Action::Handler(h) => {
                    // fence-peer's and the before-resync handlers' exit codes decide what the
                    // device does next.
                    let done: Option<Box<dyn FnOnce(i32) + Send>> =
                        self.dev.wants_exit_code(h).map(|token| {
                            let tx = self.handler_tx.clone();
                            Box::new(move |code| {
                                let _ = tx.send((h, token, code));
                            }) as Box<dyn FnOnce(i32) + Send>
                        });
                    self.cfg.handlers.run(&self.name, h.name(), done);
                }
            }
        }
        self.publish_hello();
        self.status.send_if_modified(|s| {
            let new = self.dev.status();
            if *s != new {
                *s = new;
                true
            } else {
                false
            }
        });
    }

    fn submit(&mut self, op: DiskOp) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(op);
            return;
        }
        match self.engine.submit(op) {
            Ok(()) => {}
            Err(SubmitError::QueueFull(op)) => self.backlog.push_back(op),
            Err(e) => {
                let op = e.into_op();
                tracing::error!(resource = %self.name, "disk engine refused op {}", op.id);
                // Report the failure through the normal completion path.
                self.fail_op(op.id);
            }
        }
    }

    fn fail_op(&mut self, op_id: u64) {
        let now = self.now();
        match self.ops.remove(&op_id) {
            Some(OpFor::Data { io, .. }) => self.dev.disk_done(now, io, Err(())),
            Some(OpFor::Meta { io }) => self.meta_step_done(io, false),
            None => {}
        }
    }

    fn pump_backlog(&mut self) {
        while let Some(op) = self.backlog.pop_front() {
            match self.engine.submit(op) {
                Ok(()) => {}
                Err(SubmitError::QueueFull(op)) => {
                    self.backlog.push_front(op);
                    break;
                }
                Err(e) => {
                    let op = e.into_op();
                    self.fail_op(op.id);
                }
            }
        }
    }

    fn op_id(&mut self, what: OpFor) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, what);
        id
    }

    fn disk_op(&mut self, io: u64, op: CoreOp) {
        let read_len = match op {
            CoreOp::Read { len, .. } => Some(len),
            _ => None,
        };
        let id = self.op_id(OpFor::Data { io, read_len });
        let disk_op = match op {
            CoreOp::Read { sector, len } => {
                DiskOp::read(id, sector * 512, AlignedBuf::zeroed(len as usize))
            }
            // The one copy of a write: into a buffer aligned for O_DIRECT, reused.
            CoreOp::Write { sector, data, fua } => {
                DiskOp::write(id, sector * 512, self.write_bufs.copy_of(&data), fua)
            }
            CoreOp::Flush => DiskOp::flush(id),
            CoreOp::Discard { sector, len } => DiskOp::discard(id, sector * 512, len),
            CoreOp::Zeroes { sector, len } => DiskOp::write_zeroes(id, sector * 512, len),
        };
        self.submit(disk_op);
    }

    fn meta_op(&mut self, io: u64, op: MetaOp) {
        match op {
            MetaOp::Superblock { uuids, flags } => {
                self.sb.uuids = Uuids {
                    current: uuids.current,
                    bitmap: uuids.bitmap,
                    history: uuids.history,
                };
                let keep_clean = self.sb.flags & MDF_AL_CLEAN;
                self.sb.flags = (flags & !MDF_AL_CLEAN) | keep_clean;
                self.sb.magic = Magic::V08;
                let block = AlignedBuf::from_slice(&self.sb.encode());
                let off = self.layout.md_offset();
                self.write_meta(io, vec![(off, block)], None);
            }
            MetaOp::BitmapPages { pages } => {
                let pages = self.page_writes(pages);
                self.write_meta(io, pages, None);
            }
            MetaOp::AlTransaction { pages, al } => {
                let off = self.layout.al_offset() + al.byte_offset();
                let block = AlignedBuf::from_slice(&al.block);
                let pages = self.page_writes(pages);
                self.write_meta(io, pages, Some((off, block)));
            }
        }
    }

    /// Bitmap pages (index within the bitmap area) as writes at their device offsets.
    fn page_writes(&self, pages: Vec<(u64, Vec<u8>)>) -> Vec<(u64, AlignedBuf)> {
        let base = self.layout.bm_offset();
        pages
            .into_iter()
            .map(|(p, bytes)| (base + p * 4096, AlignedBuf::from_slice(&bytes)))
            .collect()
    }

    /// One metadata operation: the `first` writes (concurrently), then `then` once they are
    /// all done; completes the device's `io` after the last one.
    fn write_meta(
        &mut self,
        io: u64,
        first: Vec<(u64, AlignedBuf)>,
        then: Option<(u64, AlignedBuf)>,
    ) {
        let (first, then) = if first.is_empty() {
            (then.into_iter().collect::<Vec<_>>(), None)
        } else {
            (first, then)
        };
        if first.is_empty() {
            let now = self.now();
            self.dev.disk_done(now, io, Ok(None));
            return;
        }
        self.metas.insert(
            io,
            MetaProgress {
                left: first.len() as u32,
                then,
                failed: false,
            },
        );
        for (off, buf) in first {
            let id = self.op_id(OpFor::Meta { io });
            self.submit(DiskOp::write(id, off, buf, true));
        }
    }

    fn meta_step_done(&mut self, io: u64, ok: bool) {
        let Some(m) = self.metas.get_mut(&io) else {
            return;
        };
        m.left -= 1;
        m.failed |= !ok;
        if m.left > 0 {
            return;
        }
        if let Some((off, block)) = m.then.take() {
            m.left = 1;
            let id = self.op_id(OpFor::Meta { io });
            self.submit(DiskOp::write(id, off, block, true));
            return;
        }
        let failed = self.metas.remove(&io).is_some_and(|m| m.failed);
        if failed {
            tracing::error!(resource = %self.name, "metadata write failed");
        }
        let now = self.now();
        self.dev
            .disk_done(now, io, if failed { Err(()) } else { Ok(None) });
    }

    fn completion(&mut self, c: Completion) {
        let now = self.now();
        match self.ops.remove(&c.id) {
            Some(OpFor::Data { io, read_len }) => {
                let result = match (c.result, read_len) {
                    // The read buffer becomes the reply without a copy.
                    (Ok(n), Some(len)) if n == len && c.buf.len() == len as usize => {
                        Ok(Some(Bytes::from_owner(ReadBuf(c.buf))))
                    }
                    (Ok(_), Some(_)) => Err(()),
                    (Ok(_), None) => {
                        self.write_bufs.give(c.buf);
                        Ok(None)
                    }
                    (Err(e), _) => {
                        tracing::error!(resource = %self.name, "disk I/O error: {e}");
                        Err(())
                    }
                };
                self.dev.disk_done(now, io, result);
            }
            Some(OpFor::Meta { io }) => self.meta_step_done(io, c.result.is_ok()),
            None => {}
        }
        self.pump_backlog();
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        if self.shutting_down.is_none() {
            self.shutting_down = Some((reply, Instant::now() + SHUTDOWN_GRACE));
        }
    }

    /// Whether the shutdown may proceed: the device is idle or the grace period passed.
    fn shutdown_ready(&self) -> bool {
        match &self.shutting_down {
            Some((_, deadline)) => self.dev.is_idle() || Instant::now() >= *deadline,
            None => false,
        }
    }

    /// Closes the connection, writes the final metadata and marks the activity log clean.
    async fn finish(mut self, completions: &mut CompletionReceiver) {
        self.close_session().await;
        let now = self.now();
        // The activity log is clean only if no application request is left in flight.
        let clean = self.app.is_empty();
        // Requests that did not finish in the grace period fail.
        for (_, reply) in self.app.drain() {
            let _ = reply.send(Err(IoError::Disk));
        }
        self.dev.shutdown(now);
        self.drain_actions();
        self.wait_ops(completions).await;
        if clean {
            self.sb.flags = (self.dev.md_flags() & !MDF_PRIMARY_IND) | MDF_AL_CLEAN;
            let block = AlignedBuf::from_slice(&self.sb.encode());
            let id = self.next_op;
            self.next_op += 1;
            let off = self.layout.md_offset();
            if self
                .engine
                .submit(DiskOp::write(id, off, block, true))
                .is_ok()
            {
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, completions.recv()).await;
            }
        } else {
            tracing::warn!(resource = %self.name, "stopping with requests in flight; the activity log stays unclean");
        }
        tracing::info!(resource = %self.name, "stopped");
        if let Some((Some(reply), _)) = self.shutting_down.take() {
            let _ = reply.send(());
        }
    }

    async fn wait_ops(&mut self, completions: &mut CompletionReceiver) {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !self.ops.is_empty() {
            match tokio::time::timeout_at(deadline, completions.recv()).await {
                Ok(Some(c)) => self.completion(c),
                _ => break,
            }
            self.drain_actions();
        }
    }
}

async fn next_event(session: &mut Option<NetSession>) -> Option<SessionEvent> {
    match session {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Bytes of payload a message carries (what the outbox limit counts).
fn payload_len(msg: &PeerMsg) -> usize {
    match msg {
        PeerMsg::Data { data, .. }
        | PeerMsg::DataReply { data, .. }
        | PeerMsg::RsDataReply { data, .. } => data.len(),
        PeerMsg::Bitmap(words) => words.len() * 8,
        _ => 0,
    }
}

/// Feeds queued messages to the transport, waiting for socket buffer space as needed.
async fn pump(
    sender: SessionSender,
    mut rx: mpsc::UnboundedReceiver<(u64, PeerMsg)>,
    bytes: Arc<AtomicUsize>,
) {
    while let Some((epoch, msg)) = rx.recv().await {
        let n = payload_len(&msg);
        // A stale epoch means that connection is gone: the message is dropped, as TCP
        // would have dropped it.
        let _ = sender.send(epoch, msg).await;
        bytes.fetch_sub(n, Ordering::Relaxed);
    }
}

/// The handshake's per-volume hello from the volume's [`LocalHello`].
fn volume_hello(h: &LocalHello, template: Option<&VolumeHello>) -> VolumeHello {
    let mut state = h.state;
    state.conn = drbd_core::state::ConnState::WfReportParams;
    let sync_param = template.map(|t| t.sync_param.clone()).unwrap_or_default();
    let _ = WireConn::WfReportParams;
    VolumeHello {
        volume: template.map_or(0, |t| t.volume),
        sync_param,
        sizes: Sizes {
            d_size: h.disk_sectors,
            u_size: 0,
            c_size: h.current_sectors,
            max_bio_size: MAX_REQUEST_BYTES,
            ..Sizes::default()
        },
        uuids: peer::wire_uuids(&h.uuids),
        state: peer::wire_state(&state),
    }
}
