//! What a workload writes to: the four states a figure is measured in.
//!
//! * [`RawDisks`]: the two backing files written directly with the same disk engine the
//!   daemon uses (io_uring, O_DIRECT where the file system allows it), each write going to
//!   both at once: the disk with the same two writers as a replicated pair.
//! * [`ReplicaTarget`]: one of our volumes through the library API: a resource without a peer
//!   (local only), or the Primary of a connected pair (protocol C).
//! * [`NetLink`]: the network alone: `P_DATA` frames of our codec over a loopback TCP data
//!   socket, each answered by a `P_WRITE_ACK` on a second (meta) socket, no disk behind.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use drbd_net::disk::{
    open_engine, AlignedBuf, Completion, DiskEngine, DiskOp, EngineOptions, SubmitError,
};
use drbd_net::replica::Replica;
use drbd_net::wire::{
    self, BlockAck, BlockId, DataPacket, Decoder, Frame, Packet, WireContext, DP_SEND_WRITE_ACK,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// A boxed future, so that [`Target`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something a workload writes to.
pub trait Target: Send + Sync {
    /// Writes `data` at `offset`; with `fua`, durable on return.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>>;
    /// Makes the completed writes durable.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;
}

// ------------------------------------------------------------------------------------------
// Raw backing files
// ------------------------------------------------------------------------------------------

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Completion>>>>;

/// One engine with a completion dispatcher: ops wait on a oneshot keyed by op id. Write
/// buffers are kept for reuse (filled once), so the baseline pays no allocation or copy per
/// write: the cheapest way to drive the engine.
struct Engine {
    engine: Box<dyn DiskEngine>,
    waiting: Waiting,
    next: AtomicU64,
    spare: Mutex<Vec<AlignedBuf>>,
}

impl Engine {
    fn open(path: &Path) -> io::Result<Engine> {
        let options = EngineOptions {
            queue_depth: 256,
            ..EngineOptions::default()
        };
        let (engine, mut completions) =
            open_engine(path, &options).map_err(|e| io::Error::other(e.to_string()))?;
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            while let Some(c) = completions.recv().await {
                if let Some(tx) = w.lock().expect("not poisoned").remove(&c.id) {
                    let _ = tx.send(c);
                }
            }
        });
        Ok(Engine {
            engine,
            waiting,
            next: AtomicU64::new(1),
            spare: Mutex::new(Vec::new()),
        })
    }

    /// Writes `data` from a reused buffer of its size.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let buf = {
            let mut spare = self.spare.lock().expect("not poisoned");
            match spare.iter().position(|b| b.len() == data.len()) {
                Some(i) => spare.swap_remove(i),
                None => AlignedBuf::from_slice(data),
            }
        };
        let c = self
            .run(move |id| DiskOp::write(id, offset, buf, fua))
            .await?;
        let result = c.result.map(|_| ());
        self.spare.lock().expect("not poisoned").push(c.buf);
        result
    }

    async fn flush(&self) -> io::Result<()> {
        self.run(DiskOp::flush).await?.result.map(|_| ())
    }

    async fn run(&self, make: impl FnOnce(u64) -> DiskOp) -> io::Result<Completion> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("not poisoned").insert(id, tx);
        let mut op = make(id);
        loop {
            match self.engine.submit(op) {
                Ok(()) => break,
                Err(SubmitError::QueueFull(back)) => {
                    op = back;
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    self.waiting.lock().expect("not poisoned").remove(&id);
                    return Err(io::Error::other(e.to_string()));
                }
            }
        }
        rx.await.map_err(|_| io::Error::other("engine stopped"))
    }
}

/// The two backing files of a pair, written directly and at once.
pub struct RawDisks {
    engines: [Engine; 2],
}

impl RawDisks {
    /// Opens the two files (each at least as large as the region written).
    pub fn open(a: &Path, b: &Path) -> io::Result<RawDisks> {
        Ok(RawDisks {
            engines: [Engine::open(a)?, Engine::open(b)?],
        })
    }

    /// Whether the files are open with O_DIRECT.
    pub fn direct_io(&self) -> bool {
        self.engines[0].engine.direct_io()
    }
}

impl Target for RawDisks {
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let (a, b) = tokio::join!(
                self.engines[0].write(offset, &data, fua),
                self.engines[1].write(offset, &data, fua)
            );
            a.and(b)
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let (a, b) = tokio::join!(self.engines[0].flush(), self.engines[1].flush());
            a.and(b)
        })
    }
}

// ------------------------------------------------------------------------------------------
// Our volume
// ------------------------------------------------------------------------------------------

/// A volume through the library API.
pub struct ReplicaTarget(pub Arc<Replica>);

impl Target for ReplicaTarget {
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.0
                .write(offset, data, fua)
                .await
                .map_err(|e| io::Error::other(format!("{e:?}")))
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.0
                .flush()
                .await
                .map_err(|e| io::Error::other(format!("{e:?}")))
        })
    }
}

// ------------------------------------------------------------------------------------------
// The network alone
// ------------------------------------------------------------------------------------------

/// The wire context of a connection speaking protocol 101, no integrity digests.
pub fn wire_context() -> WireContext {
    WireContext {
        integrity_digest_len: 0,
        features: 0xf,
        protocol_version: 101,
        integrity: None,
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

/// A sender and an echoing receiver on loopback: writes travel as `P_DATA` on the data
/// socket, acks come back as `P_WRITE_ACK` on the meta socket (flushes: `P_BARRIER` /
/// `P_BARRIER_ACK`), framed by our codec, as between two nodes but with no disk.
pub struct NetLink {
    out: mpsc::Sender<(Bytes, Bytes)>,
    pending: Pending,
    next: AtomicU64,
}

/// Most frames queued for the data socket.
const NET_QUEUE: usize = 1024;

impl NetLink {
    /// Starts the receiver on `ip` (any free port) and connects to it.
    pub async fn start(ip: &str) -> io::Result<NetLink> {
        let data_l = TcpListener::bind((ip, 0)).await?;
        let meta_l = TcpListener::bind((ip, 0)).await?;
        let data = TcpStream::connect(data_l.local_addr()?).await?;
        let meta = TcpStream::connect(meta_l.local_addr()?).await?;
        let (data_peer, _) = data_l.accept().await?;
        let (meta_peer, _) = meta_l.accept().await?;
        for s in [&data, &meta, &data_peer, &meta_peer] {
            s.set_nodelay(true)?;
        }
        tokio::spawn(echo(data_peer, meta_peer));
        let pending: Pending = Arc::default();
        // Acks on the meta socket complete the waiting writes.
        let p = pending.clone();
        tokio::spawn(async move {
            let mut meta = meta;
            let mut dec = Decoder::new(wire_context());
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                while let Ok(Some(frame)) = dec.decode(&mut buf) {
                    let id = match frame.packet {
                        Packet::WriteAck(a) => u64::from_be_bytes(a.block_id.0),
                        Packet::BarrierAck(a) => u64::from(u32::from_be_bytes(a.barrier)),
                        _ => continue,
                    };
                    if let Some(tx) = p.lock().expect("not poisoned").remove(&id) {
                        let _ = tx.send(());
                    }
                }
                match meta.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        // One writer owns the data socket: header and payload go out in one vectored write.
        let (out, mut rx) = mpsc::channel::<(Bytes, Bytes)>(NET_QUEUE);
        tokio::spawn(async move {
            let mut data = data;
            while let Some((head, payload)) = rx.recv().await {
                let mut bufs = vec![head, payload];
                while let Ok(more) = rx.try_recv() {
                    bufs.push(more.0);
                    bufs.push(more.1);
                }
                for b in &bufs {
                    if data.write_all(b).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(NetLink {
            out,
            pending,
            next: AtomicU64::new(1),
        })
    }

    async fn send(&self, id: u64, packet: Packet) -> io::Result<()> {
        let ctx = wire_context();
        let frame = Frame::for_context(&ctx, 0, packet);
        let mut head = BytesMut::new();
        let payload = wire::encode_head(&frame, &ctx, &mut head)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("not poisoned").insert(id, tx);
        self.out
            .send((head.freeze(), payload))
            .await
            .map_err(|_| io::Error::other("link closed"))?;
        rx.await.map_err(|_| io::Error::other("link closed"))
    }
}

impl Target for NetLink {
    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            // Write ids are even, barrier numbers odd: one table for both.
            let id = self.next.fetch_add(1, Ordering::Relaxed) * 2;
            let packet = Packet::Data(DataPacket {
                sector: offset / 512,
                block_id: BlockId(id.to_be_bytes()),
                seq_num: 0,
                dp_flags: DP_SEND_WRITE_ACK,
                digest: Bytes::new(),
                data,
            });
            self.send(id, packet).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let nr = (self.next.fetch_add(1, Ordering::Relaxed) * 2 + 1) as u32;
            let barrier = wire::Barrier {
                barrier: nr.to_be_bytes(),
                pad: 0,
            };
            self.send(u64::from(nr), Packet::Barrier(barrier)).await
        })
    }
}

/// The receiving end: decodes every frame of the data socket and acknowledges it on the meta
/// socket, batching the acks of what one read brought.
async fn echo(mut data: TcpStream, mut meta: TcpStream) {
    let ctx = wire_context();
    let mut dec = Decoder::new(ctx);
    let mut buf = BytesMut::with_capacity(4 << 20);
    let mut acks = BytesMut::new();
    loop {
        match data.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let frame = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            let ack = match frame.packet {
                Packet::Data(d) => Packet::WriteAck(BlockAck {
                    sector: d.sector,
                    block_id: d.block_id,
                    blksize: d.data.len() as u32,
                    seq_num: 0,
                }),
                Packet::Barrier(b) => Packet::BarrierAck(wire::BarrierAck {
                    barrier: b.barrier,
                    set_size: 0,
                }),
                _ => continue,
            };
            let f = Frame::for_context(&ctx, 0, ack);
            if wire::encode(&f, &ctx, &mut acks).is_err() {
                return;
            }
        }
        if !acks.is_empty() && meta.write_all(&acks.split()).await.is_err() {
            return;
        }
    }
}
