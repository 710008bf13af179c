//! Sessions on loopback: two of our nodes exchange the core's messages over the real
//! transport (both sockets, both directions, bitmaps included), lose each other and
//! reconnect with a new epoch; a fake peer that breaks the protocol after the handshake
//! makes the session end with a protocol error.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use drbd_core::replication::msg::{dp, Ack, PeerMsg, PeerState, Socket, ID_SYNCER};
use drbd_net::handshake::{
    Handshake, HandshakeConfig, KeepAliveConfig, Progress, ProtocolParams, VolumeHello, FEATURES,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use drbd_net::transport::{
    data_queue_bytes, ConnState, Connection, HelloSource, PeerConfig, SendError, SessionEvent,
    SessionSender, DATA_QUEUE_BYTES, DATA_QUEUE_MIN_BYTES,
};
use drbd_net::wire::{
    self, ConnState as WireConn, Decoder, DiskState, Frame, Packet, Role, Sizes, State, SyncParam,
    Uuids, WireContext,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Generous upper bound for anything on loopback, for slow shared CI machines.
const PATIENCE: Duration = Duration::from_secs(30);
/// 1 GiB in sectors.
const GIB_SECTORS: u64 = 2 * 1024 * 1024;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

fn volume_hello(current_uuid: u64) -> VolumeHello {
    VolumeHello {
        volume: 0,
        sync_param: SyncParam::default(),
        sizes: Sizes {
            d_size: GIB_SECTORS,
            c_size: GIB_SECTORS,
            max_bio_size: 1 << 20,
            ..Sizes::default()
        },
        uuids: Uuids {
            current: current_uuid,
            ..Uuids::default()
        },
        state: State::new(
            Role::Secondary,
            Role::Unknown,
            WireConn::WfReportParams,
            DiskState::UpToDate,
            DiskState::DUnknown,
        ),
    }
}

fn handshake_config() -> HandshakeConfig {
    HandshakeConfig {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        features: FEATURES,
        auth: None,
        protocol: ProtocolParams {
            two_primaries: true,
            ..ProtocolParams::default()
        },
        volumes: vec![volume_hello(0)],
    }
}

/// A node whose hello says UUID `uuid_base + n` on its n-th attempt (n from 0), so the
/// peer can tell that every attempt asks afresh.
fn node(name: &str, local: u16, peer: u16, uuid_base: u64) -> PeerConfig {
    let attempts = Arc::new(AtomicU64::new(0));
    PeerConfig {
        name: name.into(),
        local: SocketAddr::from(([127, 0, 0, 1], local)),
        peer: SocketAddr::from(([127, 0, 0, 1], peer)),
        handshake: handshake_config(),
        hello: Some(HelloSource::new(move || {
            vec![volume_hello(
                uuid_base + attempts.fetch_add(1, Ordering::Relaxed),
            )]
        })),
        keepalive: KeepAliveConfig {
            ping_int: Duration::from_millis(300),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            ko_count: 7,
        },
        connect_int: Duration::from_millis(300),
        sndbuf_size: Some(256 << 10),
        rcvbuf_size: Some(256 << 10),
        use_rle: true,
    }
}

/// Whether `uuid` is the hello of some attempt of the node with `uuid_base`.
fn attempt_of(uuid_base: u64, uuid: u64) -> bool {
    (uuid_base..uuid_base + 0x100).contains(&uuid)
}

struct Node {
    conn: Connection,
    tx: SessionSender,
    events: mpsc::Receiver<SessionEvent>,
}

async fn spawn(cfg: PeerConfig, capacity: usize) -> Node {
    let (etx, events) = mpsc::channel(capacity);
    let (conn, tx) = Connection::spawn_session(cfg, etx).await.unwrap();
    Node { conn, tx, events }
}

async fn next_event(events: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
    timeout(PATIENCE, events.recv())
        .await
        .expect("an event in time")
        .expect("events channel open")
}

/// Waits for `Connected`, returning epoch, the peer's UUID and the bitmap size.
async fn connected(events: &mut mpsc::Receiver<SessionEvent>) -> (u64, u64, u64, bool) {
    loop {
        match next_event(events).await {
            SessionEvent::Connected {
                epoch,
                hello,
                bitmap_bits,
            } => {
                return (
                    epoch,
                    hello.uuids.uuids.current,
                    bitmap_bits,
                    hello.resolve_conflicts,
                )
            }
            SessionEvent::Lost { .. } => continue,
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

async fn lost(events: &mut mpsc::Receiver<SessionEvent>, epoch: u64) -> (String, bool) {
    loop {
        match next_event(events).await {
            SessionEvent::Lost {
                epoch: e,
                reason,
                retry,
            } => {
                assert_eq!(e, epoch, "Lost for another epoch: {reason}");
                return (reason, retry);
            }
            SessionEvent::Msg { epoch: e, .. } => assert_eq!(e, epoch),
            other => panic!("expected Lost, got {other:?}"),
        }
    }
}

fn words_for(bits: u64) -> usize {
    bits.div_ceil(64) as usize
}

/// What one side sends: writes with distinct contents (a few of 1 MiB), trims, barriers,
/// a state change and a bitmap with a few bits set, and on the meta socket acks.
fn traffic(side: u8, bits: u64) -> Vec<PeerMsg> {
    let mut msgs = Vec::new();
    let mut bitmap = vec![0u64; words_for(bits)];
    for bit in [0, 4711, bits / 2, bits - 1] {
        bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    for i in 0..200u32 {
        let size = if i % 50 == 7 { 1 << 20 } else { 4096 };
        msgs.push(PeerMsg::Data {
            sector: u64::from(i) * 8,
            block_id: u64::from(side) << 32 | u64::from(i),
            seq: i,
            flags: dp::SEND_WRITE_ACK,
            data: Bytes::from(vec![side.wrapping_mul(31).wrapping_add(i as u8); size]),
        });
        msgs.push(PeerMsg::WriteAck(Ack {
            sector: u64::from(i) * 8,
            block_id: u64::from(side) << 40 | u64::from(i),
            size: 4096,
            seq: i,
        }));
        if i % 20 == 19 {
            msgs.push(PeerMsg::Barrier { nr: i });
            msgs.push(PeerMsg::BarrierAck {
                nr: i,
                set_size: 20,
            });
        }
        if i == 100 {
            msgs.push(PeerMsg::Trim {
                sector: 1 << 20,
                block_id: 5,
                seq: 1000,
                flags: dp::DISCARD | dp::SEND_WRITE_ACK,
                size: 1 << 20,
            });
            msgs.push(PeerMsg::Bitmap(bitmap.clone()));
            msgs.push(PeerMsg::State(PeerState {
                role: Role::Primary,
                peer_role: Role::Secondary,
                conn: WireConn::WfBitMapS,
                disk: DiskState::UpToDate,
                peer_disk: DiskState::Inconsistent,
                user_isp: false,
            }));
            msgs.push(PeerMsg::RsDataReply {
                sector: 64,
                block_id: ID_SYNCER,
                data: Bytes::from(vec![side; 4096]),
            });
        }
    }
    msgs
}

fn on(socket: Socket, msgs: &[PeerMsg]) -> Vec<PeerMsg> {
    msgs.iter()
        .filter(|m| m.socket() == socket)
        .cloned()
        .collect()
}

/// Sends `msgs` in order on `epoch`.
fn send_all(tx: SessionSender, epoch: u64, msgs: Vec<PeerMsg>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for m in msgs {
            tx.send(epoch, m).await.expect("queued");
        }
    })
}

/// Receives `n` messages of `epoch`, slowly at first (the channel is small, so the
/// transport must wait for us).
async fn receive(events: &mut mpsc::Receiver<SessionEvent>, epoch: u64, n: usize) -> Vec<PeerMsg> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match next_event(events).await {
            SessionEvent::Msg { epoch: e, msg } => {
                assert_eq!(e, epoch);
                got.push(msg);
                if got.len() < 20 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    got
}

async fn pair(capacity: usize) -> (Node, Node, u16, u16) {
    logs();
    let (pa, pb) = (free_port(), free_port());
    let a = spawn(node("alpha", pa, pb, 0xa000), capacity).await;
    let b = spawn(node("bravo", pb, pa, 0xb000), capacity).await;
    (a, b, pa, pb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_both_ways_intact_and_in_order_per_socket() {
    let (mut a, mut b, ..) = pair(4).await;
    let (ea, peer_of_a, bits_a, rc_a) = connected(&mut a.events).await;
    let (eb, peer_of_b, bits_b, rc_b) = connected(&mut b.events).await;
    // An attempt may fail before one succeeds (sockets crossing when both nodes connect at
    // once): the UUIDs are those of some attempt of each side.
    assert!(
        attempt_of(0xb000, peer_of_a),
        "alpha sees bravo's hello: {peer_of_a:#x}"
    );
    assert!(
        attempt_of(0xa000, peer_of_b),
        "bravo sees alpha's hello: {peer_of_b:#x}"
    );
    assert_eq!(bits_a, 262_144, "1 GiB in 4 KiB blocks");
    assert_eq!(bits_b, bits_a);
    assert_ne!(rc_a, rc_b, "exactly one node resolves conflicts");
    assert_eq!(a.tx.epoch(), Some(ea));

    let from_a = traffic(1, bits_a);
    let from_b = traffic(2, bits_b);
    let sa = send_all(a.tx.clone(), ea, from_a.clone());
    let sb = send_all(b.tx.clone(), eb, from_b.clone());
    let (got_b, got_a) = tokio::join!(
        receive(&mut b.events, eb, from_a.len()),
        receive(&mut a.events, ea, from_b.len()),
    );
    sa.await.unwrap();
    sb.await.unwrap();
    for socket in [Socket::Data, Socket::Meta] {
        assert!(
            on(socket, &got_b) == on(socket, &from_a),
            "bravo got alpha's {socket:?} messages changed or reordered"
        );
        assert!(
            on(socket, &got_a) == on(socket, &from_b),
            "alpha got bravo's {socket:?} messages changed or reordered"
        );
    }
    // Keep-alive ran alongside.
    assert!(a
        .conn
        .wait_for(
            PATIENCE,
            |s| matches!(s, ConnState::Connected { ping_acks, .. } if *ping_acks >= 1)
        )
        .await
        .is_some());
    a.conn.shutdown();
    b.conn.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_is_reported_and_the_reconnect_gets_a_new_epoch() {
    let (mut a, b, pa, pb) = pair(64).await;
    let (ea, peer_uuid, ..) = connected(&mut a.events).await;
    assert!(attempt_of(0xb000, peer_uuid), "{peer_uuid:#x}");

    // The peer vanishes.
    b.conn.shutdown();
    let (reason, retry) = lost(&mut a.events, ea).await;
    assert!(retry, "a lost peer is retried: {reason}");
    let stale = a.tx.send(ea, PeerMsg::Barrier { nr: 1 }).await;
    assert_eq!(stale, Err(SendError::Stale { epoch: ea }));

    // A new peer process on the same address: a new epoch, and each side's hello was
    // asked for again.
    let mut b2 = spawn(node("bravo", pb, pa, 0xb100), 64).await;
    let (ea2, peer_uuid2, ..) = connected(&mut a.events).await;
    let (eb2, alpha_uuid, ..) = connected(&mut b2.events).await;
    assert!(ea2 > ea, "epochs grow: {ea} then {ea2}");
    assert!(attempt_of(0xb100, peer_uuid2), "{peer_uuid2:#x}");
    assert!(
        attempt_of(0xa000, alpha_uuid) && alpha_uuid > 0xa000,
        "alpha's hello is asked for again: {alpha_uuid:#x}"
    );
    b2.tx
        .send(eb2, PeerMsg::SyncUuid(77))
        .await
        .expect("queued");
    let got = receive(&mut a.events, ea2, 1).await;
    assert_eq!(got, vec![PeerMsg::SyncUuid(77)]);
    // A message for the old epoch does not reach the new connection.
    assert_eq!(
        a.tx.send(ea, PeerMsg::SyncUuid(1)).await,
        Err(SendError::Stale { epoch: ea })
    );

    // Disconnecting on purpose: no retry on our side, a retry on the peer's.
    a.conn.disconnect().await;
    let (reason, retry) = lost(&mut a.events, ea2).await;
    assert!(!retry, "{reason}");
    let (reason, retry) = lost(&mut b2.events, eb2).await;
    assert!(retry, "{reason}");

    // The session can be started again on the same address.
    let mut a2 = spawn(node("alpha", pa, pb, 0xa100), 64).await;
    let (ea3, ..) = connected(&mut a2.events).await;
    let (eb3, ..) = connected(&mut b2.events).await;
    assert!(ea3 > ea2 && eb3 > eb2);
    a2.conn.shutdown();
    b2.conn.shutdown();
}

// ------------------------------------------------------------------------------------------
// A fake peer that speaks the handshake, then breaks the protocol.

async fn read_frame(
    stream: &mut TcpStream,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
) -> Option<Frame> {
    loop {
        if let Some(f) = decoder.decode(buf).expect("our node sends valid frames") {
            return Some(f);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// The send buffers (`ss`'s `tb`, bytes) of the established TCP sockets to `port` on this
/// machine, sorted; `None` (after saying so) without `ss`, except under CI.
fn send_buffers_to(port: u16) -> Option<Vec<u64>> {
    let filter = format!(":{port}");
    let out = match std::process::Command::new("ss")
        .args(["-tmnH", "state", "established", "dport", "=", &filter])
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIP: the send-buffer check needs ss (iproute2): {e}");
            return None;
        }
        Err(e) => panic!("ss (iproute2) under CI: {e}"),
    };
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sizes: Vec<u64> = text
        .split(|c: char| c == ',' || c == '(' || c == ')' || c.is_whitespace())
        .filter_map(|f| f.strip_prefix("tb"))
        .map(|v| v.parse().expect("a number after tb"))
        .collect();
    sizes.sort_unstable();
    Some(sizes)
}

#[test]
fn the_data_queue_follows_sndbuf_size() {
    assert_eq!(data_queue_bytes(None), DATA_QUEUE_BYTES);
    assert_eq!(
        data_queue_bytes(Some(0)),
        DATA_QUEUE_BYTES,
        "0 is auto-tuning"
    );
    assert_eq!(data_queue_bytes(Some(512 << 10)), 512 << 10);
    assert_eq!(data_queue_bytes(Some(4 << 10)), DATA_QUEUE_MIN_BYTES);
    assert_eq!(data_queue_bytes(Some(64 << 20)), DATA_QUEUE_BYTES);
}

/// Accepts our node's two connections and runs the handshake as the peer; returns the data
/// and meta sockets and the agreed context.
async fn fake_handshake(listener: &TcpListener) -> (TcpStream, TcpStream, WireContext) {
    let mut data = None;
    let mut meta = None;
    while data.is_none() || meta.is_none() {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut h = [0u8; 8];
        s.read_exact(&mut h).await.unwrap();
        match u16::from_be_bytes([h[4], h[5]]) {
            0xfff2 => data = Some(s),
            0xfff1 => meta = Some(s),
            other => panic!("first packet {other:#x}"),
        }
    }
    let (mut data, meta) = (data.unwrap(), meta.unwrap());
    let mut hs = Handshake::new(handshake_config(), [7; 64]);
    let mut decoder = Decoder::new(WireContext::default());
    let mut buf = BytesMut::new();
    loop {
        while let Some(f) = hs.poll_transmit() {
            let mut out = BytesMut::new();
            wire::encode(&f, &hs.context(), &mut out).unwrap();
            data.write_all(&out).await.unwrap();
        }
        let frame = read_frame(&mut data, &mut decoder, &mut buf)
            .await
            .expect("handshake frames");
        match hs.on_frame(frame).expect("handshake") {
            Progress::Continue => {}
            Progress::Agreed(ctx) => decoder.set_context(ctx),
            Progress::Established(_) => {
                while let Some(f) = hs.poll_transmit() {
                    let mut out = BytesMut::new();
                    wire::encode(&f, &hs.context(), &mut out).unwrap();
                    data.write_all(&out).await.unwrap();
                }
                return (data, meta, hs.context());
            }
        }
    }
}

/// Builds the bytes a fake peer injects, under the agreed context.
type Injection = Box<dyn Fn(&WireContext) -> BytesMut>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_breaking_the_protocol_ends_the_session_with_a_protocol_error() {
    logs();
    let (pa, pb) = (free_port(), free_port());
    let fake = TcpListener::bind(("127.0.0.1", pb)).await.unwrap();
    let mut a = spawn(node("alpha", pa, pb, 0xa000), 16).await;
    let encoded = |ctx: &WireContext, packet| {
        let mut out = BytesMut::new();
        wire::encode(&Frame::for_context(ctx, 0, packet), ctx, &mut out).unwrap();
        out
    };
    // What the fake peer sends after the handshake, and what the reason must name.
    let cases: Vec<(&str, Injection, &str)> = vec![
        (
            "P_STATE with role 3",
            Box::new(move |ctx| encoded(ctx, Packet::State(State::from_raw(3)))),
            "malformed P_STATE",
        ),
        (
            "garbage",
            Box::new(|_| BytesMut::from(&b"this is not a DRBD header"[..])),
            "bad magic",
        ),
        (
            "P_PROTOCOL after the handshake",
            Box::new(move |ctx| encoded(ctx, Packet::Protocol(wire::Protocol::default()))),
            "unexpected P_PROTOCOL",
        ),
        (
            "an ack on the data socket",
            Box::new(move |ctx| encoded(ctx, Packet::WriteAck(Default::default()))),
            "P_WRITE_ACK received on the Data socket",
        ),
    ];
    for (what, bytes, expected) in cases {
        let (mut data, _meta, ctx) = fake_handshake(&fake).await;
        let (epoch, peer_uuid, ..) = connected(&mut a.events).await;
        assert_eq!(peer_uuid, 0, "{what}");
        // A good message first: it arrives, the bad one after it ends the session.
        let good = encoded(&ctx, Packet::Barrier(wire::Barrier::default()));
        data.write_all(&good).await.unwrap();
        data.write_all(&bytes(&ctx)).await.unwrap();
        match next_event(&mut a.events).await {
            SessionEvent::Msg { epoch: e, msg } => {
                assert_eq!((e, msg), (epoch, PeerMsg::Barrier { nr: 0 }), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
        let (reason, retry) = lost(&mut a.events, epoch).await;
        assert!(reason.contains("protocol error"), "{what}: {reason}");
        assert!(reason.contains(expected), "{what}: {reason}");
        assert!(retry, "{what}: a protocol error is retried");
    }
    a.conn.shutdown();
}

/// Answers the node's pings on the meta socket, nothing else.
fn answer_pings(mut meta: TcpStream, ctx: WireContext) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut decoder = Decoder::new(ctx);
        let mut buf = BytesMut::new();
        while let Some(f) = read_frame(&mut meta, &mut decoder, &mut buf).await {
            if f.packet == Packet::Ping {
                let mut out = BytesMut::new();
                let ack = Frame::for_context(&ctx, 0, Packet::PingAck);
                wire::encode(&ack, &ctx, &mut out).unwrap();
                if meta.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_blocks_senders_and_uses_up_ko_count() {
    logs();
    let (pa, pb) = (free_port(), free_port());
    let fake = TcpListener::bind(("127.0.0.1", pb)).await.unwrap();
    let mut cfg = node("alpha", pa, pb, 0xa000);
    cfg.sndbuf_size = Some(64 << 10);
    cfg.keepalive.timeout = Duration::from_millis(300);
    cfg.keepalive.ko_count = 3;
    let mut a = spawn(cfg, 16).await;
    // The fake peer is alive on the meta socket but never reads the data socket.
    let (_data, meta, ctx) = fake_handshake(&fake).await;
    let pinger = answer_pings(meta, ctx);
    let (epoch, ..) = connected(&mut a.events).await;
    // sndbuf-size reached the kernel: both sockets have a fixed send buffer of that size
    // (the kernel reports twice the value set, its bookkeeping overhead included).
    if let Some(buffers) = send_buffers_to(pb) {
        assert_eq!(
            buffers,
            vec![2 * (64 << 10); 2],
            "send buffers of the sockets to the peer"
        );
    }

    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (tx, sent) = (a.tx.clone(), Arc::clone(&sent));
        tokio::spawn(async move {
            for i in 0..64u64 {
                let write = PeerMsg::Data {
                    sector: i * 2048,
                    block_id: i,
                    seq: i as u32,
                    flags: dp::SEND_WRITE_ACK,
                    data: Bytes::from(vec![1u8; 1 << 20]),
                };
                tx.send(epoch, write).await?;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), SendError>(())
        })
    };
    // The socket buffers fill up, then the queue: a message holds its share of the queue's
    // byte budget until written, so no more than the budget is ever taken in. With a 64 KiB
    // sndbuf-size the queue holds 64 KiB, so a 1 MiB write takes all of it: a write is taken
    // in only once the one before is written to the socket, whose buffers (128 KiB here, and
    // the peer's receive buffer) hold at most one more. With the default 4 MiB budget three
    // more would be queued.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let queued = sent.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&queued),
        "{queued} writes of 1 MiB queued for a peer that does not read"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sent.load(Ordering::Relaxed), queued, "the sender waits");
    // Sends that make no progress use up ko-count; pings alone do not save the connection.
    let (reason, retry) = lost(&mut a.events, epoch).await;
    assert!(reason.contains("ko-count"), "{reason}");
    assert!(retry);
    // The waiting sender is released with the connection.
    let r = timeout(PATIENCE, sender).await.expect("sender released");
    assert_eq!(r.unwrap(), Err(SendError::Stale { epoch }));
    pinger.abort();
    a.conn.shutdown();
}

#[tokio::test]
async fn a_reader_cut_off_while_waiting_for_room_leaves_no_pages_counted() {
    logs();
    let (pa, pb) = (free_port(), free_port());
    let fake = TcpListener::bind(("127.0.0.1", pb)).await.unwrap();
    // Room for one event: the consumer below drains nothing until the connection is gone.
    let mut a = spawn(node("alpha", pa, pb, 0xa000), 1).await;
    let budget = a
        .conn
        .receive_budget()
        .expect("a session has a budget")
        .clone();
    let (mut data, meta, ctx) = fake_handshake(&fake).await;
    let (epoch, ..) = connected(&mut a.events).await;
    // Three discards (one page each): the first fills the events channel, the second waits
    // in the data socket's reader for room.
    for i in 0..3u64 {
        let trim = wire::Trim {
            sector: i * 8,
            size: 4096,
            dp_flags: dp::DISCARD,
            ..wire::Trim::default()
        };
        let mut out = BytesMut::new();
        wire::encode(
            &Frame::for_context(&ctx, 0, Packet::Trim(trim)),
            &ctx,
            &mut out,
        )
        .unwrap();
        data.write_all(&out).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The peer goes away: the reader waiting for room is cut off with its message (the
    // connection is torn down before anything is drained).
    drop((data, meta));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut taken = 0;
    loop {
        match next_event(&mut a.events).await {
            SessionEvent::Msg { epoch: e, msg } => {
                assert_eq!(e, epoch);
                taken += 1;
                budget.taken(msg.held_pages());
            }
            SessionEvent::Lost { epoch: e, .. } => {
                assert_eq!(e, epoch);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(taken >= 1, "the first discard arrived");
    // Nothing is held and everything read was taken: even a budget of one page is open. A
    // message counted as read but lost with its reader would keep it closed for good.
    budget.set_held(0);
    budget.set_limit(1);
    assert!(
        budget.is_open(),
        "pages of a message lost with the connection are still counted"
    );
    a.conn.shutdown();
}
