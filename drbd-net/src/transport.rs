//! The tokio transport: two TCP sockets per peer, moving bytes between them and the sans-IO
//! machines of [`crate::handshake`].
//!
//! [`Connection::spawn`] runs the whole life of one peer connection: listen and connect until
//! the data and meta sockets are established, run the handshake on the data socket, then keep
//! the connection alive with pings on the meta socket. A failure that DRBD retries (network
//! errors, a peer closing mid-handshake, a missing ping ack) leads to a new attempt after
//! connect-int; one it does not (wrong secret, incompatible settings) leaves the connection
//! StandAlone. Every change is published on a watch channel with its reason, and logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use crate::handshake::{
    FirstPacket, Handshake, HandshakeConfig, HandshakeError, KeepAlive, KeepAliveAction,
    KeepAliveConfig, PeerHello, Progress, RoleAction, SocketId, SocketRoles, CHALLENGE_LEN,
};
use crate::wire::{self, Command, Decoder, Frame, HeaderKind, Packet, WireContext, WireError};

/// Largest read we do at once; the decoder's own limits bound what is buffered.
const READ_CHUNK: usize = 64 * 1024;
/// How long an accepted socket may take to send its first packet (DRBD: 4 x ping-timeout,
/// at least this much here so slow test machines do not flap).
const FIRST_PACKET_TIMEOUT_MIN: Duration = Duration::from_secs(2);

/// Settings of one peer connection.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// A name for log lines (usually the resource name).
    pub name: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub handshake: HandshakeConfig,
    pub keepalive: KeepAliveConfig,
    /// Time between connection attempts (`connect-int`).
    pub connect_int: Duration,
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
    /// Given up; the reason says why. No retry.
    StandAlone { reason: String },
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
    #[error("cannot encode: {0}")]
    Encode(#[from] WireError),
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("peer closed the {0} socket")]
    Closed(&'static str),
    #[error("{0}")]
    Timeout(&'static str),
}

impl ConnectError {
    fn retry(&self) -> bool {
        match self {
            ConnectError::Handshake(e) => e.retry(),
            _ => true,
        }
    }
}

/// A running peer connection.
pub struct Connection {
    state: watch::Receiver<ConnState>,
    task: tokio::task::JoinHandle<()>,
}

impl Connection {
    /// Binds the listening socket and starts connecting in the background.
    pub async fn spawn(cfg: PeerConfig) -> std::io::Result<Connection> {
        cfg.keepalive
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        if cfg.connect_int.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "connect-int must be positive",
            ));
        }
        let listener = bind(cfg.local)?;
        let (tx, rx) = watch::channel(ConnState::WfConnection);
        let task = tokio::spawn(run(Arc::new(cfg), listener, tx));
        Ok(Connection { state: rx, task })
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

    /// Stops the connection (both sockets close).
    pub fn shutdown(self) {
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(16)
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

async fn run(cfg: Arc<PeerConfig>, listener: TcpListener, state: watch::Sender<ConnState>) {
    loop {
        state.send_replace(ConnState::WfConnection);
        let err = match attempt(&cfg, &listener, &state).await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        if err.retry() {
            tracing::warn!(conn = %cfg.name, "connection lost: {err}; retrying in {:?}", cfg.connect_int);
            tokio::time::sleep(cfg.connect_int).await;
        } else {
            tracing::error!(conn = %cfg.name, "{err}; going StandAlone");
            state.send_replace(ConnState::StandAlone {
                reason: err.to_string(),
            });
            return;
        }
    }
}

/// One connection attempt, from connecting to failure.
async fn attempt(
    cfg: &PeerConfig,
    listener: &TcpListener,
    state: &watch::Sender<ConnState>,
) -> Result<std::convert::Infallible, ConnectError> {
    let (data, meta, resolve_conflicts) = establish_sockets(cfg, listener).await?;
    state.send_replace(ConnState::WfReportParams);
    let (data, ctx, peer) = handshake(cfg, data).await?;
    tracing::info!(
        conn = %cfg.name,
        "handshake successful: agreed network protocol version {}, features 0x{:x}",
        peer.protocol_version,
        peer.features
    );
    state.send_replace(ConnState::Connected {
        protocol_version: peer.protocol_version,
        features: peer.features,
        resolve_conflicts,
        pings: 0,
        ping_acks: 0,
    });
    keep_alive(cfg, data, meta, ctx, state).await
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
                        // Connect again right away for the second socket.
                        next_connect = Instant::now();
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

/// A socket with its receive buffer and decoder.
struct FramedRead {
    stream: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
    name: &'static str,
}

impl FramedRead {
    fn new(stream: TcpStream, ctx: WireContext, name: &'static str) -> Self {
        FramedRead {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            decoder: Decoder::new(ctx),
            name,
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

async fn handshake(
    cfg: &PeerConfig,
    data: TcpStream,
) -> Result<(FramedRead, WireContext, PeerHello), ConnectError> {
    let mut hs = Handshake::new(cfg.handshake.clone(), random_challenge());
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
                return Ok((data, hs.context(), *peer));
            }
        }
    }
}

/// Pings on the meta socket until the peer goes silent or a socket closes.
async fn keep_alive(
    cfg: &PeerConfig,
    mut data: FramedRead,
    meta: TcpStream,
    ctx: WireContext,
    state: &watch::Sender<ConnState>,
) -> Result<std::convert::Infallible, ConnectError> {
    let origin = Instant::now();
    let now = || Instant::now() - origin;
    let mut ka = KeepAlive::new(cfg.keepalive, now());
    let mut meta = FramedRead::new(meta, ctx, "meta");
    let ping = |p: Packet| Frame {
        kind: wire::header_kind_for(ctx.protocol_version, 0),
        volume: 0,
        packet: p,
    };
    loop {
        let deadline = origin + ka.next_deadline();
        let action = tokio::select! {
            f = meta.next() => {
                let f = f?;
                let is_ping = matches!(f.packet, Packet::Ping);
                let is_ack = matches!(f.packet, Packet::PingAck);
                ka.on_meta_packet(now(), is_ping, is_ack)
            }
            f = data.next() => {
                // Nothing but liveness is handled here yet: any data-socket packet proves the
                // peer alive.
                let _ = f?;
                ka.on_data_received(now());
                None
            }
            _ = tokio::time::sleep_until(deadline) => ka.poll(now()),
        };
        // A meta-socket send that cannot complete within `timeout` ends the connection at
        // once: the meta socket carries only small packets, so a full send buffer there means
        // the peer stopped reading.
        let reply = match action {
            Some(KeepAliveAction::SendPing) => Some(Packet::Ping),
            Some(KeepAliveAction::SendPingAck) => Some(Packet::PingAck),
            _ => None,
        };
        if let Some(p) = reply {
            tokio::time::timeout(
                cfg.keepalive.timeout,
                write_frame(&mut meta.stream, &ping(p), &ctx),
            )
            .await
            .map_err(|_| ConnectError::Timeout("meta socket send timed out"))??;
        }
        match action {
            Some(KeepAliveAction::SendPing | KeepAliveAction::SendPingAck) => {}
            Some(KeepAliveAction::Fail(why)) => return Err(ConnectError::Timeout(why)),
            None => {}
        }
        let (pings, ping_acks) = ka.counters();
        state.send_modify(|s| {
            if let ConnState::Connected {
                pings: p,
                ping_acks: a,
                ..
            } = s
            {
                *p = pings;
                *a = ping_acks;
            }
        });
    }
}
