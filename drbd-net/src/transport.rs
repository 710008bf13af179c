//! The tokio transport: two TCP sockets per peer, moving bytes between them and the sans-IO
//! machines of [`crate::handshake`], and after the handshake the replication core's messages.
//!
//! [`Connection::spawn`] runs the whole life of one peer connection: listen and connect until
//! the data and meta sockets are established, run the handshake on the data socket, then keep
//! the connection alive with pings on the meta socket. A failure that DRBD retries (network
//! errors, a peer closing mid-handshake, a missing ping ack) leads to a new attempt after
//! connect-int; one it does not (wrong secret, incompatible settings) leaves the connection
//! StandAlone. Every change is published on a watch channel with its reason, and logged.
//!
//! [`Connection::spawn_session`] does the same and also carries the core's messages
//! ([`PeerMsg`]) once a connection is up, as a *session*:
//!
//! * Events come out on a bounded channel the caller provides: [`SessionEvent::Connected`]
//!   after each successful handshake, with a fresh `epoch` (a connection generation, unique
//!   in the process), then [`SessionEvent::Msg`] for every message received on either
//!   socket (in order per socket), then one [`SessionEvent::Lost`] when that connection
//!   ends. No `Msg` of an epoch follows its `Lost`. When the channel is full the socket
//!   readers wait; while they do, pings from the peer are not answered either, so a
//!   consumer must keep draining (and must not stall for ping-timeout). The core bounds its
//!   buffers (max-buffers) through the session's [`ReceiveBudget`] instead: the data socket
//!   is read only while the receiver has room, the meta socket always.
//! * Messages go out through a [`SessionSender`] (cloneable): `send(epoch, msg)` encodes the
//!   message (see [`crate::peer::encode_msg`]) and queues it for the socket
//!   [`PeerMsg::socket`] names, if `epoch` is still the current connection; messages for an
//!   older epoch are refused ([`SendError::Stale`]) and never reach a newer connection. The
//!   queues are bounded (see [`DATA_QUEUE_BYTES`], [`META_QUEUE_BYTES`]): when the peer
//!   does not take data as fast, `send` waits. One writer task per socket takes everything
//!   queued (up to [`WRITE_BATCH_BYTES`]) into one buffer and writes it at once.
//! * Keep-alive runs as in [`Connection::spawn`]; sends on the data socket that make no
//!   progress for `timeout` use up ko-count.
//!
//! [`Connection::disconnect`] ends a connection on purpose (sockets closed, no retry).

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use drbd_core::replication::msg::{PeerHello as CorePeerHello, PeerMsg, Socket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{timeout, Instant};

use crate::handshake::{
    FirstPacket, Handshake, HandshakeConfig, HandshakeError, KeepAlive, KeepAliveAction,
    KeepAliveConfig, PeerHello, Progress, RoleAction, SocketId, SocketRoles, VolumeHello,
    CHALLENGE_LEN,
};
use crate::peer::{self, MsgDecoder, PeerError};
use crate::wire::{self, Command, Decoder, Frame, HeaderKind, Packet, WireContext, WireError};

/// Largest read we do at once; the decoder's own limits bound what is buffered.
const READ_CHUNK: usize = 64 * 1024;
/// How long an accepted socket may take to send its first packet (DRBD: 4 x ping-timeout,
/// at least this much here so slow test machines do not flap).
const FIRST_PACKET_TIMEOUT_MIN: Duration = Duration::from_secs(2);

/// Bytes (headers included) queued for the data socket and not yet written, at most. A
/// sender waits while the queue is this full. A single message larger than this (a big
/// bitmap) waits for the queue to drain and then takes it alone. 4 MiB is four of the
/// largest writes: enough to keep the socket busy, little enough to keep the latency of a
/// write queued behind others low (the kernel's send buffer comes on top).
pub const DATA_QUEUE_BYTES: usize = 4 << 20;
/// The data queue's budget at least, when `sndbuf-size` makes it smaller.
pub const DATA_QUEUE_MIN_BYTES: usize = 64 << 10;

/// The data queue's byte budget for a `sndbuf-size`: an operator who sets the send buffer
/// bounds what is on its way to the peer, so the queue in front of the socket holds no more
/// than the socket buffer itself (within [`DATA_QUEUE_MIN_BYTES`] ..= [`DATA_QUEUE_BYTES`]);
/// unset (0, the kernel's auto-tuning) leaves [`DATA_QUEUE_BYTES`].
pub fn data_queue_bytes(sndbuf_size: Option<u32>) -> usize {
    bounded_by_sndbuf(sndbuf_size, DATA_QUEUE_MIN_BYTES, DATA_QUEUE_BYTES)
}

/// A queue's byte bound in front of the data socket for a `sndbuf-size`: an operator who
/// sets the send buffer bounds what waits in front of it too, so the bound follows it
/// within `min ..= max`; unset (0, the kernel's auto-tuning) leaves `max`.
pub fn bounded_by_sndbuf(sndbuf_size: Option<u32>, min: usize, max: usize) -> usize {
    match sndbuf_size.filter(|&s| s > 0) {
        Some(s) => (s as usize).clamp(min, max),
        None => max,
    }
}
/// Bytes queued for the meta socket at most: acknowledgements are 40 bytes (h100), so this
/// is thousands of them.
pub const META_QUEUE_BYTES: usize = 256 << 10;
/// Messages queued per socket at most, whatever their size (the channel's bound; the byte
/// budgets above are what normally limits).
pub const QUEUE_MESSAGES: usize = 1024;
/// A writer flushes its buffer to the socket once it holds this much: everything queued
/// when it wakes up is written in batches of about this size.
pub const WRITE_BATCH_BYTES: usize = 256 << 10;
/// Notifications from the socket tasks to the keep-alive loop (ping / ping ack arrivals,
/// stuck data sends). The loop handles each at once, so a few suffice.
const CTRL_QUEUE: usize = 64;
/// Pings and ping acks waiting for the meta writer. More than a couple means the meta
/// socket is stuck, which ping-timeout / timeout will report: further ones are dropped.
const PING_QUEUE: usize = 4;

/// Connection generations: every established session gets the next one, so epochs are
/// unique across all connections of the process (also across [`Connection::spawn_session`]
/// calls).
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Supplies the per-volume hello (sizes, UUIDs, state) afresh for every connection attempt:
/// they change while the node runs. Called once per attempt, when the sockets are up and the
/// handshake starts.
#[derive(Clone)]
pub struct HelloSource(Arc<dyn Fn() -> Vec<VolumeHello> + Send + Sync>);

impl HelloSource {
    /// A source calling `f`.
    pub fn new(f: impl Fn() -> Vec<VolumeHello> + Send + Sync + 'static) -> Self {
        HelloSource(Arc::new(f))
    }

    /// The current hello.
    pub fn volumes(&self) -> Vec<VolumeHello> {
        (self.0)()
    }
}

impl fmt::Debug for HelloSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HelloSource(..)")
    }
}

/// Settings of one peer connection.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// A name for log lines (usually the resource name).
    pub name: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Our side of the handshake. Its `volumes` are used unless `hello` is set.
    pub handshake: HandshakeConfig,
    /// Where each attempt gets the volumes' hello from; `None`: `handshake.volumes`.
    pub hello: Option<HelloSource>,
    pub keepalive: KeepAliveConfig,
    /// Time between connection attempts (`connect-int`).
    pub connect_int: Duration,
    /// `sndbuf-size`: the send buffer of both sockets in bytes; `None` or 0: the kernel's
    /// auto-tuning.
    pub sndbuf_size: Option<u32>,
    /// `rcvbuf-size`: the receive buffer of both sockets; `None` or 0: auto-tuning.
    pub rcvbuf_size: Option<u32>,
    /// `use-rle`: send bitmaps RLE-compressed where that is shorter (protocol 90 and later).
    pub use_rle: bool,
}

/// The connection state as an operator sees it (DRBD 8.4 names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Listening and connecting.
    WfConnection,
    /// Sockets up, handshake running.
    WfReportParams,
    /// Handshake complete; keeping alive.
    Connected {
        protocol_version: u32,
        features: u32,
        resolve_conflicts: bool,
        pings: u64,
        ping_acks: u64,
    },
    /// Given up (or disconnected on request); the reason says why. No retry.
    StandAlone { reason: String },
}

/// What a session reports to the replication core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// A connection is established. Messages of `epoch` follow.
    Connected {
        /// This connection's generation.
        epoch: u64,
        /// What the peer said in the handshake about the session's volume (the first one
        /// configured, volume 0 in practice).
        hello: CorePeerHello,
        /// The bitmap size in bits both nodes use for bitmap transfers on this connection:
        /// `ceil(agreed sectors / 8)`, see [`crate::peer::agreed_sectors`]. Outgoing
        /// [`PeerMsg::Bitmap`]s need at least that many bits (in whole words).
        bitmap_bits: u64,
    },
    /// A message from the peer.
    Msg { epoch: u64, msg: PeerMsg },
    /// Connection `epoch` ended. `retry`: the transport connects again after connect-int (a
    /// new `Connected` with a new epoch follows if that works); otherwise it stopped.
    Lost {
        epoch: u64,
        reason: String,
        retry: bool,
    },
    /// The transport gave up before a session was established (authentication failed,
    /// incompatible settings): no retry. Reported once; after a `Lost` with `retry: false`
    /// there is none.
    StandAlone { reason: String },
}

/// Why a message was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// `epoch` is not the current connection (it ended, or never was): the message is
    /// dropped.
    #[error("connection {epoch} is not established (any more)")]
    Stale { epoch: u64 },
    /// The message cannot be put on the wire (a bug of the caller: a data block that is not
    /// whole sectors, a bitmap shorter than the agreed size, ...). Nothing was queued.
    #[error("cannot encode {name}: {error}")]
    Encode {
        name: &'static str,
        error: WireError,
    },
}

/// Why one attempt ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error on the {socket} socket at byte {offset}: {error}")]
    Wire {
        socket: &'static str,
        offset: u64,
        error: WireError,
    },
    #[error("protocol error on the {socket} socket: {error}")]
    Peer {
        socket: &'static str,
        error: PeerError,
    },
    #[error("protocol error: the peer's P_STATE for volume {0} holds values 8.4 does not define")]
    BadPeerState(u16),
    #[error("cannot encode: {0}")]
    Encode(#[from] WireError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("peer closed the {0} socket")]
    Closed(&'static str),
    #[error("{0}")]
    Timeout(&'static str),
    #[error("session: {0}")]
    Session(&'static str),
    #[error("disconnected by request")]
    Stopped,
    #[error("the session's event receiver is gone")]
    EventsClosed,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ConnectError {
    fn retry(&self) -> bool {
        match self {
            ConnectError::Handshake(e) => e.retry(),
            ConnectError::Session(_) | ConnectError::Stopped | ConnectError::EventsClosed => false,
            _ => true,
        }
    }
}

/// A running peer connection.
pub struct Connection {
    state: watch::Receiver<ConnState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// A session's data-socket flow control.
    budget: Option<Arc<ReceiveBudget>>,
}

/// Flow control of a session's data socket in 4 KiB pages (`max-buffers`, counted as
/// [`PeerMsg::held_pages`] counts them). The data socket's reader reads its next message only
/// while the pages the receiver holds ([`ReceiveBudget::set_held`]) plus those read and not
/// yet taken ([`ReceiveBudget::taken`]) are below the limit; otherwise the socket stays unread
/// and TCP slows the peer down. So the receiver holds at most the limit plus the one message
/// read last, as 8.4's receiver may allocate past max-buffers for the packet it reads. The
/// meta socket is read regardless: held writes may wait for what arrives there
/// (acknowledgements, sequence numbers), as 8.4 reads it on its own thread.
#[derive(Debug)]
pub struct ReceiveBudget {
    /// Pages; `u64::MAX` until the receiver sets it.
    limit: AtomicU64,
    /// Pages the receiver holds, as it last said.
    held: AtomicU64,
    /// Pages of messages read and sent to the receiver, not yet taken by it.
    queued: AtomicU64,
    /// Wakes the reader when the budget may have opened.
    opened: tokio::sync::Notify,
}

impl Default for ReceiveBudget {
    fn default() -> Self {
        ReceiveBudget {
            limit: AtomicU64::new(u64::MAX),
            held: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            opened: tokio::sync::Notify::new(),
        }
    }
}

impl ReceiveBudget {
    /// The receiver's limit in pages (`max-buffers`).
    pub fn set_limit(&self, pages: u64) {
        self.limit.store(pages, Ordering::Release);
        self.opened.notify_waiters();
    }

    /// The pages the receiver holds now.
    pub fn set_held(&self, pages: u64) {
        let before = self.held.swap(pages, Ordering::AcqRel);
        if pages < before {
            self.opened.notify_waiters();
        }
    }

    /// The receiver took a message of `pages` from the events channel (call it once the
    /// receiver's held pages include the message's, see [`ReceiveBudget::set_held`], so that
    /// the budget never looks larger than it is).
    pub fn taken(&self, pages: u64) {
        if pages > 0 {
            let before = self
                .queued
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                    Some(q.saturating_sub(pages))
                })
                .unwrap_or_else(|q| q);
            // Saturating: a miscount must not wrap into a budget closed for good.
            debug_assert!(before >= pages, "taken more pages than were read");
            self.opened.notify_waiters();
        }
    }

    /// Whether the data socket may be read now.
    pub fn is_open(&self) -> bool {
        let used = self
            .held
            .load(Ordering::Acquire)
            .saturating_add(self.queued.load(Ordering::Acquire));
        used < self.limit.load(Ordering::Acquire)
    }

    /// A message of `pages` was read and goes to the receiver.
    fn admitted(&self, pages: u64) {
        self.queued.fetch_add(pages, Ordering::AcqRel);
    }

    /// Waits until the data socket may be read.
    async fn wait_open(&self) {
        if self.is_open() {
            return;
        }
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            // Registered before the check, so a change between the check and the wait
            // still wakes it.
            opened.as_mut().enable();
            if self.is_open() {
                return;
            }
            opened.await;
        }
    }
}

impl Connection {
    /// Binds the listening socket and starts connecting in the background. Once connected it
    /// only keeps the connection alive; see [`Connection::spawn_session`] for replication.
    pub async fn spawn(cfg: PeerConfig) -> std::io::Result<Connection> {
        Self::start(cfg, None)
    }

    /// As [`Connection::spawn`], and after every handshake carries messages as a session:
    /// events go to `events`, messages come from the returned sender (see the module docs).
    pub async fn spawn_session(
        cfg: PeerConfig,
        events: mpsc::Sender<SessionEvent>,
    ) -> std::io::Result<(Connection, SessionSender)> {
        let (route, routes) = watch::channel(None);
        let budget = Arc::new(ReceiveBudget::default());
        let mut conn = Self::start(
            cfg,
            Some(Session {
                events,
                route,
                budget: Arc::clone(&budget),
            }),
        )?;
        conn.budget = Some(budget);
        Ok((conn, SessionSender { route: routes }))
    }

    /// The session's data-socket flow control (see [`ReceiveBudget`]); `None` without a
    /// session.
    pub fn receive_budget(&self) -> Option<&Arc<ReceiveBudget>> {
        self.budget.as_ref()
    }

    fn start(cfg: PeerConfig, session: Option<Session>) -> std::io::Result<Connection> {
        cfg.keepalive
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if cfg.connect_int.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "connect-int must be positive",
            ));
        }
        let listener = bind(&cfg)?;
        let (tx, rx) = watch::channel(ConnState::WfConnection);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(Arc::new(cfg), listener, tx, session, stop_rx));
        Ok(Connection {
            state: rx,
            stop,
            task,
            budget: None,
        })
    }

    /// The current state.
    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    /// Waits until `pred` holds for the state, or `limit` passes.
    pub async fn wait_for(
        &mut self,
        limit: Duration,
        pred: impl Fn(&ConnState) -> bool,
    ) -> Option<ConnState> {
        let r = timeout(limit, self.state.wait_for(|s| pred(s))).await;
        r.ok().and_then(|r| r.ok()).map(|s| s.clone())
    }

    /// Ends the connection on purpose and waits until both sockets are closed and the
    /// listener is released. A session reports `Lost { retry: false }` for an established
    /// connection if the events channel has room for it (it is not waited for: the caller
    /// may be the one not draining the channel); the state becomes StandAlone.
    pub async fn disconnect(self) {
        self.stop.send_replace(true);
        if let Err(e) = self.task.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    /// Stops the connection at once (both sockets close); no events are sent.
    pub fn shutdown(self) {
        self.task.abort();
    }
}

/// The outgoing half of a session: queues messages for the connection of an epoch.
#[derive(Clone)]
pub struct SessionSender {
    route: watch::Receiver<Option<Arc<Route>>>,
}

impl fmt::Debug for SessionSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSender")
            .field("epoch", &self.epoch())
            .finish()
    }
}

impl SessionSender {
    /// The epoch of the established connection, if there is one.
    pub fn epoch(&self) -> Option<u64> {
        self.route
            .borrow()
            .as_ref()
            .filter(|r| r.is_open())
            .map(|r| r.epoch)
    }

    /// Queues `msg` for connection `epoch`, waiting while its socket's queue is full.
    ///
    /// Messages of one caller go out in the order sent (per socket). `Ok` means queued, not
    /// sent: if the connection breaks first, the message is lost with it (the `Lost` event
    /// tells). A message for another epoch than the current one is refused.
    pub async fn send(&self, epoch: u64, msg: PeerMsg) -> Result<(), SendError> {
        let route = match &*self.route.borrow() {
            Some(r) if r.epoch == epoch && r.is_open() => Arc::clone(r),
            _ => return Err(SendError::Stale { epoch }),
        };
        let mut frames = Vec::with_capacity(1);
        peer::encode_msg(
            &msg,
            &route.ctx,
            route.volume,
            route.bitmap_bits,
            route.use_rle,
            &mut frames,
        )
        .map_err(|error| SendError::Encode {
            name: msg.name(),
            error,
        })?;
        let queue = match msg.socket() {
            Socket::Data => &route.data,
            Socket::Meta => &route.meta,
        };
        queue
            .push(frames, &route.ctx)
            .await
            .map_err(|Closed| SendError::Stale { epoch })
    }
}

/// Where a session's messages go while its connection is up.
struct Route {
    epoch: u64,
    ctx: WireContext,
    volume: u16,
    bitmap_bits: u64,
    use_rle: bool,
    data: Queue,
    meta: Queue,
}

impl Route {
    /// Whether the connection's writers still run. (A connection stopped with
    /// [`Connection::shutdown`] cannot withdraw its route; its writers are gone, though.)
    fn is_open(&self) -> bool {
        !self.data.tx.is_closed() && !self.meta.tx.is_closed()
    }
}

/// A bounded queue of encoded messages for one socket's writer: at most `budget_bytes`
/// bytes (counted with semaphore permits that travel with the message and are released once
/// it is written) and at most [`QUEUE_MESSAGES`] messages.
struct Queue {
    tx: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

/// The queue's writer is gone: the connection ended.
struct Closed;

/// One message's frames, with the share of the byte budget it holds until written.
struct Outgoing {
    frames: Vec<Frame>,
    bytes: usize,
    _permit: OwnedSemaphorePermit,
}

impl Queue {
    fn new(budget_bytes: usize) -> (Queue, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
        let queue = Queue {
            tx,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
        };
        (queue, rx)
    }

    async fn push(&self, frames: Vec<Frame>, ctx: &WireContext) -> Result<(), Closed> {
        let bytes: usize = frames
            .iter()
            .map(|f| f.kind.size() + f.packet.payload_len(ctx))
            .sum();
        // A message bigger than the whole budget takes all of it (it cannot wait for more).
        let cost = u32::try_from(bytes.clamp(1, self.budget_bytes)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Outgoing {
                frames,
                bytes,
                _permit: permit,
            })
            .await
            .map_err(|_| Closed)
    }

    /// Refuses further messages and wakes senders waiting for budget.
    fn close(&self) {
        self.budget.close();
    }
}

/// The session side of a [`Connection`].
struct Session {
    events: mpsc::Sender<SessionEvent>,
    route: watch::Sender<Option<Arc<Route>>>,
    /// The data socket's flow control.
    budget: Arc<ReceiveBudget>,
}

fn bind(cfg: &PeerConfig) -> std::io::Result<TcpListener> {
    let sock = if cfg.local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    // Accepted sockets inherit the listener's buffer sizes; they must be set before listen.
    set_buffer_sizes(&sock, cfg)?;
    sock.bind(cfg.local)?;
    sock.listen(16)
}

/// `sndbuf-size` / `rcvbuf-size`: set before connect or listen, as the kernel sizes the TCP
/// window from them then. (Linux doubles the value for its bookkeeping.)
fn set_buffer_sizes(sock: &TcpSocket, cfg: &PeerConfig) -> std::io::Result<()> {
    if let Some(size) = cfg.sndbuf_size.filter(|&s| s > 0) {
        sock.set_send_buffer_size(size)?;
    }
    if let Some(size) = cfg.rcvbuf_size.filter(|&s| s > 0) {
        sock.set_recv_buffer_size(size)?;
    }
    Ok(())
}

fn random_challenge() -> [u8; CHALLENGE_LEN] {
    let mut c = [0u8; CHALLENGE_LEN];
    getrandom::fill(&mut c).expect("the operating system provides random bytes");
    c
}

/// `base` varied by up to 1/7 either way, as DRBD varies its connect interval, so that two
/// nodes that collided once do not collide again in lock step.
fn jitter(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).expect("the operating system provides random bytes");
    let r = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..=1
    base.mul_f64(6.0 / 7.0 + r * 2.0 / 7.0)
}

fn coin() -> bool {
    let mut b = [0u8; 1];
    getrandom::fill(&mut b).expect("the operating system provides random bytes");
    b[0] & 1 == 1
}

/// Resolves once a stop is requested. A dropped [`Connection`] (the sender gone) is not a
/// request: the connection then runs on, as a detached task.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run(
    cfg: Arc<PeerConfig>,
    listener: TcpListener,
    state: watch::Sender<ConnState>,
    session: Option<Session>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        state.send_replace(ConnState::WfConnection);
        let (err, epoch) = attempt(&cfg, &listener, &state, session.as_ref(), &mut stop).await;
        let retry = err.retry();
        if let ConnectError::Stopped = err {
            tracing::info!(conn = %cfg.name, "disconnected by request");
        } else if retry {
            tracing::warn!(conn = %cfg.name, "connection lost: {err}; retrying in {:?}", cfg.connect_int);
        } else {
            tracing::error!(conn = %cfg.name, "{err}; going StandAlone");
        }
        if !retry {
            state.send_replace(ConnState::StandAlone {
                reason: err.to_string(),
            });
        }
        if let Some(s) = &session {
            let event = match epoch {
                Some(epoch) => Some(SessionEvent::Lost {
                    epoch,
                    reason: err.to_string(),
                    retry,
                }),
                None if !retry => Some(SessionEvent::StandAlone {
                    reason: err.to_string(),
                }),
                None => None,
            };
            match (event, &err) {
                (_, ConnectError::EventsClosed) | (None, _) => {}
                // The caller asked for the end and may not be draining the channel.
                (Some(ev), ConnectError::Stopped) => {
                    if s.events.try_send(ev).is_err() {
                        tracing::debug!(conn = %cfg.name, "no room for the final session event");
                    }
                }
                (Some(ev), _) => {
                    tokio::select! {
                        sent = s.events.send(ev) => if sent.is_err() {
                            tracing::info!(conn = %cfg.name, "session consumer gone; stopping");
                            return;
                        },
                        () = stopped(&mut stop) => return,
                    }
                }
            }
        }
        if !retry {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(cfg.connect_int) => {}
            () = stopped(&mut stop) => {
                state.send_replace(ConnState::StandAlone {
                    reason: ConnectError::Stopped.to_string(),
                });
                return;
            }
        }
    }
}

/// One connection attempt, from connecting to failure. Returns why it ended and, for a
/// session, the epoch of the connection if it got as far as reporting it.
async fn attempt(
    cfg: &PeerConfig,
    listener: &TcpListener,
    state: &watch::Sender<ConnState>,
    session: Option<&Session>,
    stop: &mut watch::Receiver<bool>,
) -> (ConnectError, Option<u64>) {
    let setup = async {
        let (data, meta, resolve_conflicts) = establish_sockets(cfg, listener).await?;
        state.send_replace(ConnState::WfReportParams);
        let (data, ctx, peer, mine) = handshake(cfg, data).await?;
        Ok::<_, ConnectError>((data, meta, resolve_conflicts, ctx, peer, mine))
    };
    let (data, meta, resolve_conflicts, ctx, peer, mine) = tokio::select! {
        r = setup => match r {
            Ok(established) => established,
            Err(e) => return (e, None),
        },
        () = stopped(stop) => return (ConnectError::Stopped, None),
    };
    tracing::info!(
        conn = %cfg.name,
        "handshake successful: agreed network protocol version {}, features 0x{:x}{}",
        peer.protocol_version,
        peer.features,
        ctx.integrity
            .map(|a| format!(", data-integrity-alg {}", a.name()))
            .unwrap_or_default()
    );
    let established = Established {
        data,
        meta,
        ctx,
        peer,
        mine,
        resolve_conflicts,
    };
    connected(cfg, established, state, session, stop).await
}

struct Pending {
    id: SocketId,
    stream: TcpStream,
}

/// Listens and connects until both sockets have their roles.
async fn establish_sockets(
    cfg: &PeerConfig,
    listener: &TcpListener,
) -> Result<(TcpStream, TcpStream, bool), ConnectError> {
    // The higher address opens the data socket first, the lower the meta socket.
    let mut roles = if addr_key(cfg.local) > addr_key(cfg.peer) {
        SocketRoles::new()
    } else {
        SocketRoles::meta_first()
    };
    let mut sockets: Vec<Pending> = Vec::new();
    let mut next_id: SocketId = 0;
    // A small random delay before the first attempt, so that two nodes started together do not
    // open their data sockets at the same instant.
    let mut next_connect = Instant::now() + jitter(cfg.connect_int) / 7;
    let first_packet_timeout = (cfg.keepalive.ping_timeout * 4).max(FIRST_PACKET_TIMEOUT_MIN);
    loop {
        let actions = tokio::select! {
            accepted = listener.accept() => {
                let (mut stream, from) = accepted?;
                if from.ip() != cfg.peer.ip() {
                    tracing::warn!(conn = %cfg.name, "refusing connection from {from}: not the peer");
                    continue;
                }
                stream.set_nodelay(true)?;
                let first = match timeout(first_packet_timeout, read_first_packet(&mut stream)).await {
                    Ok(Ok(f)) => f,
                    _ => FirstPacket::Other,
                };
                next_id += 1;
                sockets.push(Pending { id: next_id, stream });
                roles.on_accepted(next_id, first, coin())
            }
            _ = tokio::time::sleep_until(next_connect) => {
                next_connect = Instant::now() + jitter(cfg.connect_int);
                match timeout(cfg.connect_int, connect(cfg)).await {
                    Ok(Ok(stream)) => {
                        next_id += 1;
                        sockets.push(Pending { id: next_id, stream });
                        // As DRBD does, give the peer's own connection about connect-int
                        // to arrive before opening the second socket: when both nodes
                        // opened both their sockets at once, each would hold two sockets
                        // whose other ends wait unaccepted in the peer's backlog (the
                        // handshake then times out, or the meta sockets do not match).
                        next_connect = Instant::now() + jitter(cfg.connect_int);
                        roles.on_connected(next_id)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(conn = %cfg.name, "connect to {} failed: {e}", cfg.peer);
                        continue;
                    }
                    Err(_) => continue,
                }
            }
        };
        for action in actions {
            match action {
                RoleAction::SendInitialData(id) | RoleAction::SendInitialMeta(id) => {
                    let cmd = if matches!(action, RoleAction::SendInitialData(_)) {
                        Packet::InitialData
                    } else {
                        Packet::InitialMeta
                    };
                    let frame = Frame {
                        kind: HeaderKind::H80,
                        volume: 0,
                        packet: cmd,
                    };
                    // The socket was added just before the action that names it.
                    let Some(s) = sockets.iter_mut().find(|p| p.id == id) else {
                        continue;
                    };
                    if let Err(e) =
                        write_frame(&mut s.stream, &frame, &WireContext::default()).await
                    {
                        tracing::debug!(conn = %cfg.name, "sending initial packet failed: {e}");
                        roles.on_closed(id);
                        sockets.retain(|p| p.id != id);
                    }
                }
                RoleAction::Close(id) => sockets.retain(|p| p.id != id),
                RoleAction::BackOff => {
                    tracing::info!(conn = %cfg.name, "initial packets crossed; backing off");
                    next_connect = Instant::now() + jitter(cfg.connect_int);
                }
                RoleAction::Ready {
                    data,
                    meta,
                    resolve_conflicts,
                } => {
                    // When the initial packets crossed, the peer may have closed the socket we
                    // kept. Give it sock-check-timeout to do so, then look before using them.
                    tokio::time::sleep(cfg.keepalive.ping_timeout).await;
                    let mut dead = Vec::new();
                    for id in [data, meta] {
                        // A socket whose initial packet could not be sent is already gone.
                        let open = match sockets.iter().find(|p| p.id == id) {
                            Some(s) => is_open(&s.stream).await,
                            None => false,
                        };
                        if !open {
                            dead.push(id);
                        }
                    }
                    if !dead.is_empty() {
                        tracing::debug!(conn = %cfg.name, "a socket closed while connecting; continuing");
                        for id in dead {
                            roles.on_closed(id);
                            sockets.retain(|p| p.id != id);
                        }
                        continue;
                    }
                    let mut take = |id| {
                        let i = sockets
                            .iter()
                            .position(|p| p.id == id)
                            .expect("role sockets exist");
                        sockets.swap_remove(i).stream
                    };
                    let d = take(data);
                    let m = take(meta);
                    return Ok((d, m, resolve_conflicts));
                }
            }
        }
    }
}

/// Orders endpoints by address bytes, then port.
fn addr_key(a: SocketAddr) -> (Vec<u8>, u16) {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v) => v.octets().to_vec(),
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
    };
    (ip, a.port())
}

/// Whether the peer has not closed the socket: a peek that would block, or that sees data,
/// means open; end of stream or an error means closed.
async fn is_open(stream: &TcpStream) -> bool {
    let mut b = [0u8; 4];
    match timeout(Duration::ZERO, stream.peek(&mut b)).await {
        Err(_) => true,
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
    }
}

async fn connect(cfg: &PeerConfig) -> std::io::Result<TcpStream> {
    let sock = if cfg.local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    set_buffer_sizes(&sock, cfg)?;
    // Outgoing connections come from our own address (port chosen by the kernel), so the
    // peer can tell who we are.
    sock.bind(SocketAddr::new(cfg.local.ip(), 0))?;
    let stream = sock.connect(cfg.peer).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads exactly one h80 header from a fresh socket and tells what it announced.
async fn read_first_packet(stream: &mut TcpStream) -> std::io::Result<FirstPacket> {
    let mut h = [0u8; 8];
    stream.read_exact(&mut h).await?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let cmd = u16::from_be_bytes([h[4], h[5]]);
    let len = u16::from_be_bytes([h[6], h[7]]);
    if magic != wire::MAGIC_80 || len != 0 {
        return Ok(FirstPacket::Other);
    }
    Ok(match Command::from_code(cmd) {
        Some(Command::InitialData) => FirstPacket::InitialData,
        Some(Command::InitialMeta) => FirstPacket::InitialMeta,
        _ => FirstPacket::Other,
    })
}

async fn write_frame(
    stream: &mut TcpStream,
    frame: &Frame,
    ctx: &WireContext,
) -> Result<(), ConnectError> {
    let mut buf = BytesMut::new();
    wire::encode(frame, ctx, &mut buf)?;
    stream.write_all(&buf).await?;
    Ok(())
}

/// A socket (or its read half) with its receive buffer and decoder.
struct FramedRead<R> {
    stream: R,
    buf: BytesMut,
    decoder: Decoder,
    name: &'static str,
}

impl<R: AsyncRead + Unpin> FramedRead<R> {
    fn new(stream: R, ctx: WireContext, name: &'static str) -> Self {
        FramedRead {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            decoder: Decoder::new(ctx),
            name,
        }
    }

    /// The same stream state over another handle (the read half after a split): bytes
    /// already buffered stay, so nothing the peer sent right after the handshake is lost.
    fn map_stream<S>(self, f: impl FnOnce(R) -> S) -> FramedRead<S> {
        FramedRead {
            stream: f(self.stream),
            buf: self.buf,
            decoder: self.decoder,
            name: self.name,
        }
    }

    async fn next(&mut self) -> Result<Frame, ConnectError> {
        loop {
            let decoded =
                self.decoder
                    .decode(&mut self.buf)
                    .map_err(|error| ConnectError::Wire {
                        socket: self.name,
                        offset: self.decoder.consumed(),
                        error,
                    })?;
            if let Some(f) = decoded {
                return Ok(f);
            }
            self.buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnectError::Closed(self.name));
            }
        }
    }
}

/// Runs the handshake on the data socket. Returns the socket, the agreed context, what the
/// peer said and the volumes we described.
async fn handshake(
    cfg: &PeerConfig,
    data: TcpStream,
) -> Result<
    (
        FramedRead<TcpStream>,
        WireContext,
        PeerHello,
        Vec<VolumeHello>,
    ),
    ConnectError,
> {
    let mut hs_cfg = cfg.handshake.clone();
    if let Some(hello) = &cfg.hello {
        hs_cfg.volumes = hello.volumes();
    }
    let mine = hs_cfg.volumes.clone();
    let mut hs = Handshake::new(hs_cfg, random_challenge());
    let mut data = FramedRead::new(data, WireContext::default(), "data");
    // The whole handshake must complete within the time DRBD gives it.
    let limit = (cfg.keepalive.ping_timeout * 4).max(FIRST_PACKET_TIMEOUT_MIN) * 4;
    let deadline = Instant::now() + limit;
    loop {
        while let Some(frame) = hs.poll_transmit() {
            write_frame(&mut data.stream, &frame, &hs.context()).await?;
        }
        let frame = tokio::time::timeout_at(deadline, data.next())
            .await
            .map_err(|_| ConnectError::Timeout("handshake did not complete in time"))??;
        match hs.on_frame(frame)? {
            Progress::Continue => {}
            Progress::Agreed(ctx) => data.decoder.set_context(ctx),
            Progress::Established(peer) => {
                while let Some(frame) = hs.poll_transmit() {
                    write_frame(&mut data.stream, &frame, &hs.context()).await?;
                }
                return Ok((data, hs.context(), *peer, mine));
            }
        }
    }
}

/// What a successful handshake leaves.
struct Established {
    data: FramedRead<TcpStream>,
    meta: TcpStream,
    ctx: WireContext,
    peer: PeerHello,
    mine: Vec<VolumeHello>,
    resolve_conflicts: bool,
}

/// What the session layer adds to an established connection.
struct SessionSetup {
    epoch: u64,
    hello: CorePeerHello,
    volume: u16,
    bitmap_bits: u64,
}

/// Checks that a session can run on this connection and works out its parameters.
fn session_setup(est: &Established) -> Result<SessionSetup, ConnectError> {
    let Some(local) = est.mine.first() else {
        return Err(ConnectError::Session("no volume configured"));
    };
    let volume = local.volume;
    let hello = peer::peer_hello(&est.peer, est.resolve_conflicts, volume)
        .ok_or(ConnectError::BadPeerState(volume))?;
    // The handshake completes only once the peer described every volume of ours.
    let peer_sizes = est
        .peer
        .volumes
        .iter()
        .find(|v| v.volume == volume)
        .map(|v| v.sizes)
        .ok_or(ConnectError::Internal(
            "handshake without the peer's volume",
        ))?;
    let bitmap_bits = peer::bitmap_bits(peer::agreed_sectors(&local.sizes, &peer_sizes));
    Ok(SessionSetup {
        epoch: NEXT_EPOCH.fetch_add(1, Ordering::Relaxed),
        hello,
        volume,
        bitmap_bits,
    })
}

/// Notifications from the socket tasks to the keep-alive loop. Times are since the
/// connection's origin.
#[derive(Debug)]
enum Ctrl {
    /// `P_PING` or `P_PING_ACK` arrived on the meta socket.
    Meta { at: Duration, ping: bool, ack: bool },
    /// A data-socket write is waiting for buffer space (again, after progress).
    SendWaiting(Duration),
    /// That write completed.
    SendDone,
}

/// Times since `origin` as nanoseconds, for the atomics that record when a socket last
/// received something (saturating: a u64 of nanoseconds lasts 584 years).
fn nanos_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The connected phase: socket tasks, keep-alive and (for a session) the message flow,
/// until something fails or a stop is requested.
async fn connected(
    cfg: &PeerConfig,
    est: Established,
    state: &watch::Sender<ConnState>,
    session: Option<&Session>,
    stop: &mut watch::Receiver<bool>,
) -> (ConnectError, Option<u64>) {
    let setup = match session {
        Some(_) => match session_setup(&est) {
            Ok(s) => Some(s),
            Err(e) => return (e, None),
        },
        None => None,
    };
    let Established {
        data,
        meta,
        ctx,
        peer,
        resolve_conflicts,
        ..
    } = est;
    let volume = setup.as_ref().map_or(0, |s| s.volume);
    let bitmap_bits = setup.as_ref().map_or(0, |s| s.bitmap_bits);
    let epoch = setup.as_ref().map_or(0, |s| s.epoch);
    let (data_q, data_rx) = Queue::new(data_queue_bytes(cfg.sndbuf_size));
    let (meta_q, meta_rx) = Queue::new(META_QUEUE_BYTES);
    let route = Arc::new(Route {
        epoch,
        ctx,
        volume,
        bitmap_bits,
        use_rle: cfg.use_rle,
        data: data_q,
        meta: meta_q,
    });

    state.send_replace(ConnState::Connected {
        protocol_version: peer.protocol_version,
        features: peer.features,
        resolve_conflicts,
        pings: 0,
        ping_acks: 0,
    });
    if let (Some(s), Some(setup)) = (session, setup) {
        s.route.send_replace(Some(Arc::clone(&route)));
        let event = SessionEvent::Connected {
            epoch,
            hello: setup.hello,
            bitmap_bits,
        };
        let sent = tokio::select! {
            sent = s.events.send(event) => sent.map_err(|_| ConnectError::EventsClosed),
            () = stopped(stop) => Err(ConnectError::Stopped),
        };
        if let Err(e) = sent {
            s.route.send_replace(None);
            return (e, None);
        }
        tracing::info!(
            conn = %cfg.name,
            epoch,
            bitmap_bits,
            resolve_conflicts,
            "session established"
        );
    }

    let origin = Instant::now();
    let data_seen = Arc::new(AtomicU64::new(0));
    let meta_seen = Arc::new(AtomicU64::new(0));
    let (ctrl_tx, mut ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let (ping_tx, ping_rx) = mpsc::channel(PING_QUEUE);
    let (data_rd, data_wr) = data.map_stream(TcpStream::into_split).split_pair();
    let (meta_rd, meta_wr) = meta.into_split();
    let meta_rd = FramedRead::new(meta_rd, ctx, "meta");
    let sink = |socket| {
        session.map(|s| Sink {
            events: s.events.clone(),
            budget: (socket == Socket::Data).then(|| Arc::clone(&s.budget)),
            epoch,
            decoder: MsgDecoder::new(volume, bitmap_bits)
                .for_socket(socket)
                .with_integrity(ctx.integrity),
        })
    };
    let barriers = Arc::new(PingBarriers::default());
    let mut tasks: JoinSet<Result<Infallible, ConnectError>> = JoinSet::new();
    tasks.spawn(read_loop(
        data_rd,
        Socket::Data,
        origin,
        Arc::clone(&data_seen),
        ctrl_tx.clone(),
        sink(Socket::Data),
        None,
    ));
    tasks.spawn(read_loop(
        meta_rd,
        Socket::Meta,
        origin,
        Arc::clone(&meta_seen),
        ctrl_tx.clone(),
        sink(Socket::Meta),
        Some(Arc::clone(&barriers)),
    ));
    tasks.spawn(write_loop(Writer {
        stream: data_wr,
        name: "data",
        queue: data_rx,
        pings: None,
        ctx,
        ctrl: Some(ctrl_tx.clone()),
        origin,
        send_timeout: None,
        barriers: None,
    }));
    tasks.spawn(write_loop(Writer {
        stream: meta_wr,
        name: "meta",
        queue: meta_rx,
        pings: Some(ping_rx),
        ctx,
        ctrl: None,
        origin,
        // A meta-socket send that cannot complete within `timeout` ends the connection at
        // once: the meta socket carries only small packets, so a full send buffer there
        // means the peer stopped reading.
        send_timeout: Some(cfg.keepalive.timeout),
        barriers: Some(barriers),
    }));
    drop(ctrl_tx);

    let err = keep_alive(
        cfg,
        &mut tasks,
        &mut ctrl_rx,
        &ping_tx,
        origin,
        &data_seen,
        &meta_seen,
        state,
        stop,
    )
    .await;

    // Tear down in the order that keeps the event stream clean: no new messages accepted,
    // waiting senders released, then every socket task ended (no Msg after this point), and
    // only then does the caller report Lost.
    if let Some(s) = session {
        s.route.send_replace(None);
    }
    route.data.close();
    route.meta.close();
    tasks.shutdown().await;
    (err, session.map(|_| epoch))
}

impl<R> FramedRead<(OwnedReadHalf, R)> {
    /// Splits a framed `(read half, write half)` pair into the framed read half and the
    /// write half.
    fn split_pair(self) -> (FramedRead<OwnedReadHalf>, R) {
        let FramedRead {
            stream: (rd, wr),
            buf,
            decoder,
            name,
        } = self;
        (
            FramedRead {
                stream: rd,
                buf,
                decoder,
                name,
            },
            wr,
        )
    }
}

/// Where a reader delivers messages in a session.
struct Sink {
    events: mpsc::Sender<SessionEvent>,
    /// The data socket's flow control.
    budget: Option<Arc<ReceiveBudget>>,
    epoch: u64,
    decoder: MsgDecoder,
}

/// Reads one socket: records liveness, passes pings to the keep-alive loop and (in a
/// session) decoded messages to the events channel, waiting while it is full.
async fn read_loop(
    mut reader: FramedRead<OwnedReadHalf>,
    socket: Socket,
    origin: Instant,
    seen: Arc<AtomicU64>,
    ctrl: mpsc::Sender<Ctrl>,
    mut sink: Option<Sink>,
    barriers: Option<Arc<PingBarriers>>,
) -> Result<Infallible, ConnectError> {
    let mut acks: u64 = 0;
    loop {
        if let Some(budget) = sink.as_ref().and_then(|s| s.budget.as_ref()) {
            // The socket is left unread (TCP pushes back on the peer) until the receiver has
            // room again.
            budget.wait_open().await;
        }
        let frame = reader.next().await?;
        let at = nanos_since(origin);
        seen.fetch_max(at, Ordering::Relaxed);
        if socket == Socket::Meta && matches!(frame.packet, Packet::Ping | Packet::PingAck) {
            let ping = matches!(frame.packet, Packet::Ping);
            if !ping {
                acks += 1;
                // The ack of a ping the device sent as a barrier goes to the device too.
                let answered = barriers.as_ref().is_some_and(|b| b.answered(acks));
                if let (true, Some(sink)) = (answered, &mut sink) {
                    let event = SessionEvent::Msg {
                        epoch: sink.epoch,
                        msg: PeerMsg::PingAck,
                    };
                    sink.events
                        .send(event)
                        .await
                        .map_err(|_| ConnectError::EventsClosed)?;
                }
            }
            let event = Ctrl::Meta {
                at: Duration::from_nanos(at),
                ping,
                ack: !ping,
            };
            ctrl.send(event)
                .await
                .map_err(|_| ConnectError::Internal("keep-alive loop gone"))?;
            continue;
        }
        // Without a session, anything the peer sends only proves it alive.
        let Some(sink) = &mut sink else {
            continue;
        };
        match sink.decoder.on_frame(frame) {
            Ok(Some(msg)) => {
                // The slot first, then the pages: admitted and sent with nothing in between
                // that could be cancelled (a reader aborted while waiting for room would
                // otherwise leave its message's pages counted for good).
                let slot = sink
                    .events
                    .reserve()
                    .await
                    .map_err(|_| ConnectError::EventsClosed)?;
                if let Some(budget) = &sink.budget {
                    budget.admitted(msg.held_pages());
                }
                slot.send(SessionEvent::Msg {
                    epoch: sink.epoch,
                    msg,
                });
            }
            Ok(None) => {}
            Err(error) => {
                return Err(ConnectError::Peer {
                    socket: reader.name,
                    error,
                })
            }
        }
    }
}

/// One socket's writer.
struct Writer {
    stream: OwnedWriteHalf,
    name: &'static str,
    queue: mpsc::Receiver<Outgoing>,
    /// Keep-alive packets, sent before anything queued (meta socket only).
    pings: Option<mpsc::Receiver<Packet>>,
    ctx: WireContext,
    /// Where to report writes waiting for buffer space (data socket only: ko-count).
    ctrl: Option<mpsc::Sender<Ctrl>>,
    origin: Instant,
    /// Limit for one batch (meta socket only).
    send_timeout: Option<Duration>,
    /// Counting of pings written, for the device's ping barriers (meta socket only).
    barriers: Option<Arc<PingBarriers>>,
}

/// The device's own pings on the meta socket ([`PeerMsg::Ping`]): the writer counts every
/// `P_PING` it writes (keep-alive ones too) and notes the number of each device ping; the
/// reader counts `P_PING_ACK`s, which the peer sends in order, and hands the device the ack
/// whose number was noted.
#[derive(Default)]
struct PingBarriers {
    written: AtomicU64,
    /// Numbers of the device's pings not yet answered, oldest first (at most a few: the
    /// device sends one per resync).
    pending: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

impl PingBarriers {
    fn wrote_ping(&self, device: bool) {
        let n = self.written.fetch_add(1, Ordering::Relaxed) + 1;
        if device {
            self.pending.lock().expect("not poisoned").push_back(n);
        }
    }

    /// Whether the `acks`-th ack answers a device ping.
    fn answered(&self, acks: u64) -> bool {
        let mut p = self.pending.lock().expect("not poisoned");
        while p.front().is_some_and(|&n| n < acks) {
            p.pop_front();
        }
        if p.front() == Some(&acks) {
            p.pop_front();
            return true;
        }
        false
    }
}

async fn recv_ping(pings: &mut Option<mpsc::Receiver<Packet>>) -> Option<Packet> {
    match pings {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Payloads from this size on are written from the message's own buffer (a vectored
/// write) instead of being copied into the batch.
const ZERO_COPY_MIN: usize = 16 << 10;

/// What one batch writes: small frames copied together, large payloads by reference.
#[derive(Default)]
struct Segments {
    /// Headers and small frames not yet cut into a segment.
    head: BytesMut,
    /// Segments in order.
    segs: Vec<Bytes>,
    /// Bytes in `head` and `segs`.
    len: usize,
}

impl Segments {
    /// Appends `frame`: its header (and a small payload) to `head`, a large payload as a
    /// segment of its own, without copying it.
    fn push(&mut self, frame: &Frame, ctx: &WireContext) -> Result<(), WireError> {
        let before = self.head.len();
        let tail = wire::encode_head(frame, ctx, &mut self.head)?;
        self.len += self.head.len() - before + tail.len();
        if tail.len() < ZERO_COPY_MIN {
            self.head.extend_from_slice(&tail);
        } else {
            self.cut();
            self.segs.push(tail);
        }
        Ok(())
    }

    /// Ends the current run of small frames.
    fn cut(&mut self) {
        if !self.head.is_empty() {
            self.segs.push(self.head.split().freeze());
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Waits for something to send, then writes everything queued in batches of about
/// [`WRITE_BATCH_BYTES`] (large payloads by reference, in one vectored write with the
/// headers); a message's share of the queue budget is released once it is written.
async fn write_loop(mut w: Writer) -> Result<Infallible, ConnectError> {
    let mut out = Segments::default();
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        tokio::select! {
            biased;
            Some(p) = recv_ping(&mut w.pings) => {
                if let (Packet::Ping, Some(b)) = (&p, &w.barriers) {
                    b.wrote_ping(false);
                }
                out.push(&Frame::for_context(&w.ctx, 0, p), &w.ctx)?;
            }
            item = w.queue.recv() => match item {
                Some(item) => batch.push(item),
                // The connection holds the senders while it runs.
                None => return Err(ConnectError::Internal("send queue closed")),
            },
        }
        if let Some(pings) = &mut w.pings {
            while let Ok(p) = pings.try_recv() {
                if let (Packet::Ping, Some(b)) = (&p, &w.barriers) {
                    b.wrote_ping(false);
                }
                out.push(&Frame::for_context(&w.ctx, 0, p), &w.ctx)?;
            }
        }
        let mut queued: usize = batch.iter().map(|o| o.bytes).sum();
        while queued < WRITE_BATCH_BYTES {
            match w.queue.try_recv() {
                Ok(item) => {
                    queued += item.bytes;
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        for frame in batch.iter().flat_map(|o| &o.frames) {
            if let (Packet::Ping, Some(b)) = (&frame.packet, &w.barriers) {
                b.wrote_ping(true);
            }
            // `encode_msg` checked every frame under this context when it was queued.
            out.push(frame, &w.ctx)?;
            if out.len >= WRITE_BATCH_BYTES {
                flush(&mut w, &mut out).await?;
            }
        }
        if !out.is_empty() {
            flush(&mut w, &mut out).await?;
        }
        // Releases the budget of everything written.
        batch.clear();
    }
}

/// Writes the segments in order and empties `out`.
async fn flush(w: &mut Writer, out: &mut Segments) -> Result<(), ConnectError> {
    out.cut();
    let segs = std::mem::take(&mut out.segs);
    out.len = 0;
    match (w.send_timeout, &w.ctrl) {
        (Some(limit), _) => timeout(limit, write_segments(&mut w.stream, segs))
            .await
            .map_err(|_| ConnectError::Timeout("meta socket send timed out"))?
            .map_err(ConnectError::from),
        (None, Some(ctrl)) => write_watched(&w.stream, segs, ctrl, w.origin).await,
        (None, None) => Ok(write_segments(&mut w.stream, segs).await?),
    }
    .map_err(|e| match e {
        ConnectError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
            ConnectError::Closed(w.name)
        }
        e => e,
    })
}

/// The unwritten part of `segs` from segment `first`, byte `skip` of it, as I/O slices.
fn slices(segs: &[Bytes], first: usize, skip: usize) -> Vec<std::io::IoSlice<'_>> {
    segs.iter()
        .skip(first)
        .enumerate()
        .map(|(k, b)| std::io::IoSlice::new(if k == 0 { &b[skip..] } else { &b[..] }))
        .take(MAX_IOVECS)
        .collect()
}

/// Most I/O slices per write (below the kernel's `IOV_MAX`, 1024).
const MAX_IOVECS: usize = 512;

/// Moves the position (`first`, `skip`) past `n` written bytes.
fn advance(segs: &[Bytes], first: &mut usize, skip: &mut usize, mut n: usize) {
    while n > 0 && *first < segs.len() {
        let left = segs[*first].len() - *skip;
        if n >= left {
            n -= left;
            *first += 1;
            *skip = 0;
        } else {
            *skip += n;
            n = 0;
        }
    }
    // Empty segments never stay in front.
    while *first < segs.len() && segs[*first].len() == *skip {
        *first += 1;
        *skip = 0;
    }
}

async fn write_segments(stream: &mut OwnedWriteHalf, segs: Vec<Bytes>) -> std::io::Result<()> {
    let (mut first, mut skip) = (0, 0);
    advance(&segs, &mut first, &mut skip, 0);
    while first < segs.len() {
        let n = stream.write_vectored(&slices(&segs, first, skip)).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        advance(&segs, &mut first, &mut skip, n);
    }
    Ok(())
}

async fn write_watched(
    w: &OwnedWriteHalf,
    segs: Vec<Bytes>,
    ctrl: &mpsc::Sender<Ctrl>,
    origin: Instant,
) -> Result<(), ConnectError> {
    let now = || Duration::from_nanos(nanos_since(origin));
    let mut waiting = false;
    let (mut first, mut skip) = (0, 0);
    advance(&segs, &mut first, &mut skip, 0);
    while first < segs.len() {
        match w.try_write_vectored(&slices(&segs, first, skip)) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => {
                advance(&segs, &mut first, &mut skip, n);
                // Progress restarts the clock (and refills ko-count).
                if waiting && first < segs.len() {
                    let _ = ctrl.send(Ctrl::SendWaiting(now())).await;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !waiting {
                    waiting = true;
                    let _ = ctrl.send(Ctrl::SendWaiting(now())).await;
                }
                w.writable().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if waiting {
        let _ = ctrl.send(Ctrl::SendDone).await;
    }
    Ok(())
}

/// What ended a socket task.
fn task_end(r: Option<Result<Result<Infallible, ConnectError>, JoinError>>) -> ConnectError {
    match r {
        Some(Ok(Err(e))) => e,
        Some(Err(e)) if e.is_panic() => ConnectError::Internal("a connection task panicked"),
        Some(Err(_)) => ConnectError::Internal("a connection task was cancelled"),
        None => ConnectError::Internal("no connection tasks"),
    }
}

/// Runs the keep-alive machine until the connection fails: pings on the meta socket,
/// answers to the peer's pings, ko-count for stuck data sends, and the first socket task
/// that ends.
#[allow(clippy::too_many_arguments)]
async fn keep_alive(
    cfg: &PeerConfig,
    tasks: &mut JoinSet<Result<Infallible, ConnectError>>,
    ctrl: &mut mpsc::Receiver<Ctrl>,
    pings: &mpsc::Sender<Packet>,
    origin: Instant,
    data_seen: &AtomicU64,
    meta_seen: &AtomicU64,
    state: &watch::Sender<ConnState>,
    stop: &mut watch::Receiver<bool>,
) -> ConnectError {
    let now = || origin.elapsed();
    let mut ka = KeepAlive::new(cfg.keepalive, now());
    // What the machine has been told so far; the readers record arrivals in the atomics
    // (one store per frame, no message), and they are handed over before every decision.
    let mut told_data = Duration::ZERO;
    let mut told_meta = Duration::ZERO;
    let mut refresh = |ka: &mut KeepAlive, told_meta: &mut Duration| {
        let d = Duration::from_nanos(data_seen.load(Ordering::Relaxed));
        if d > told_data {
            told_data = d;
            ka.on_data_received(d);
        }
        let m = Duration::from_nanos(meta_seen.load(Ordering::Relaxed));
        if m > *told_meta {
            *told_meta = m;
            ka.on_meta_packet(m, false, false);
        }
    };
    loop {
        refresh(&mut ka, &mut told_meta);
        let deadline = origin + ka.next_deadline();
        let action = tokio::select! {
            biased;
            () = stopped(stop) => return ConnectError::Stopped,
            end = tasks.join_next() => return task_end(end),
            // Before the notifications, so that a steady stream of them (a busy data
            // socket reporting progress) cannot hold off the keep-alive deadlines.
            () = tokio::time::sleep_until(deadline) => {
                refresh(&mut ka, &mut told_meta);
                ka.poll(now())
            }
            c = ctrl.recv() => match c {
                Some(Ctrl::Meta { at, ping, ack }) => {
                    let at = at.max(told_meta);
                    told_meta = at;
                    ka.on_meta_packet(at, ping, ack)
                }
                Some(Ctrl::SendWaiting(at)) => {
                    ka.on_send_waiting(at);
                    None
                }
                Some(Ctrl::SendDone) => {
                    ka.on_send_done();
                    None
                }
                // Every socket task holds a sender: one of them ended.
                None => return task_end(tasks.join_next().await),
            },
        };
        let reply = match action {
            Some(KeepAliveAction::SendPing) => Some(Packet::Ping),
            Some(KeepAliveAction::SendPingAck) => Some(Packet::PingAck),
            Some(KeepAliveAction::Fail(why)) => return ConnectError::Timeout(why),
            None => None,
        };
        match reply.map(|p| pings.try_send(p)) {
            None | Some(Ok(())) => {}
            // The meta writer is stuck; its send timeout or ping-timeout will tell.
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                tracing::debug!(conn = %cfg.name, "meta socket backed up; ping not queued");
            }
            // The writer ended; the next round reports why.
            Some(Err(mpsc::error::TrySendError::Closed(_))) => {}
        }
        let (pings_sent, acks) = ka.counters();
        state.send_if_modified(|s| match s {
            ConnState::Connected {
                pings: p,
                ping_acks: a,
                ..
            } if (*p, *a) != (pings_sent, acks) => {
                *p = pings_sent;
                *a = acks;
                true
            }
            _ => false,
        });
    }
}

#[cfg(test)]
mod segment_tests {
    use super::*;

    #[test]
    fn advancing_over_written_bytes_skips_whole_and_partial_segments() {
        let segs: Vec<Bytes> = [&b"abc"[..], b"", b"defgh", b"i"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let (mut first, mut skip) = (0, 0);
        let joined = |f: usize, k: usize| -> Vec<u8> {
            slices(&segs, f, k)
                .iter()
                .flat_map(|s| s.to_vec())
                .collect()
        };
        assert_eq!(joined(first, skip), b"abcdefghi");
        advance(&segs, &mut first, &mut skip, 2);
        assert_eq!(joined(first, skip), b"cdefghi");
        // Past the end of "abc": the empty segment is skipped too.
        advance(&segs, &mut first, &mut skip, 1);
        assert_eq!((first, skip), (2, 0));
        advance(&segs, &mut first, &mut skip, 4);
        assert_eq!(joined(first, skip), b"hi");
        advance(&segs, &mut first, &mut skip, 2);
        assert_eq!(first, segs.len());
    }

    #[test]
    fn large_payloads_stay_segments_small_ones_are_copied() {
        let ctx = WireContext {
            integrity_digest_len: 0,
            features: 0,
            protocol_version: 101,
            integrity: None,
        };
        let data = |len: usize| {
            let p = Packet::Data(wire::DataPacket {
                sector: 0,
                block_id: wire::BlockId([0; 8]),
                seq_num: 1,
                dp_flags: 0,
                digest: Bytes::new(),
                data: Bytes::from(vec![7u8; len]),
            });
            Frame::for_context(&ctx, 0, p)
        };
        let mut out = Segments::default();
        out.push(&data(4096), &ctx).expect("encodes");
        out.push(&data(1 << 20), &ctx).expect("encodes");
        out.push(&data(512), &ctx).expect("encodes");
        out.cut();
        // [header + 4 KiB, header], [1 MiB], [header + 512]
        assert_eq!(out.segs.len(), 3);
        assert_eq!(out.segs[1].len(), 1 << 20);
        let total: usize = out.segs.iter().map(Bytes::len).sum();
        assert_eq!(total, out.len);
        // The same bytes as encoding each frame whole.
        let mut whole = BytesMut::new();
        for len in [4096, 1 << 20, 512] {
            wire::encode(&data(len), &ctx, &mut whole).expect("encodes");
        }
        let joined: Vec<u8> = out.segs.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(joined, whole.to_vec());
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[tokio::test]
    async fn the_data_socket_waits_while_held_and_queued_pages_reach_the_limit() {
        let b = Arc::new(ReceiveBudget::default());
        assert!(b.is_open(), "no limit until the receiver sets one");
        b.set_limit(32);
        // One message may take the count past the limit (its size is known once read).
        b.admitted(256);
        assert!(!b.is_open());
        let waiter = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.wait_open().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "reads on while the receiver has no room"
        );
        // The receiver takes the message and holds its pages: still closed.
        b.taken(256);
        b.set_held(256);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "reads on while the receiver holds the pages"
        );
        // The write is done: open again, and the waiting reader goes on.
        b.set_held(31);
        timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the reader is woken")
            .expect("no panic");
        assert!(b.is_open());
        b.set_held(32);
        assert!(!b.is_open(), "held pages alone reach the limit");
    }
}
