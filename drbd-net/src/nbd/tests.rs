//! The tokio server driven by a hand-written client over in-memory streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::proto::{
    client_flags, cmd, cmd_flags, opt, rep, ErrorCode, RequestHeader, IHAVEOPT, MAX_PAYLOAD,
    OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC,
};
use super::*;

const STEP: Duration = Duration::from_secs(10);

struct Client {
    stream: DuplexStream,
}

impl Client {
    /// Connect to `server` through an in-memory pipe.
    fn connect(server: &NbdServer) -> Self {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let server = server.clone();
        tokio::spawn(async move { server.serve_stream(theirs).await });
        Self { stream: ours }
    }

    async fn read_exact(&mut self, n: usize) -> Bytes {
        let mut buf = vec![0; n];
        timeout(STEP, self.stream.read_exact(&mut buf))
            .await
            .expect("server answers in time")
            .expect("server sends");
        Bytes::from(buf)
    }

    /// Greeting and client flags.
    async fn start(&mut self) {
        let mut greeting = self.read_exact(18).await;
        assert_eq!(greeting.get_u64(), proto::NBD_MAGIC);
        assert_eq!(greeting.get_u64(), IHAVEOPT);
        self.stream
            .write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
        self.stream.write_all(&out).await.unwrap();
    }

    /// One option reply: (type, data).
    async fn option_reply(&mut self) -> (u32, Bytes) {
        let mut h = self.read_exact(20).await;
        assert_eq!(h.get_u64(), OPTION_REPLY_MAGIC);
        let _option = h.get_u32();
        let kind = h.get_u32();
        let len = h.get_u32() as usize;
        (kind, self.read_exact(len).await)
    }

    /// `NBD_OPT_GO`; returns the final reply type and, on success, size and flags.
    async fn go(&mut self, name: &str) -> (u32, u64, u16) {
        let mut data = BytesMut::new();
        data.put_u32(name.len() as u32);
        data.put_slice(name.as_bytes());
        data.put_u16(0);
        self.send_option(opt::GO, &data).await;
        let (mut size, mut flags) = (0, 0);
        loop {
            let (kind, mut data) = self.option_reply().await;
            if kind == rep::INFO {
                if data.get_u16() == proto::info::EXPORT {
                    size = data.get_u64();
                    flags = data.get_u16();
                }
                continue;
            }
            return (kind, size, flags);
        }
    }

    async fn connect_to(server: &NbdServer, name: &str) -> (Self, u64, u16) {
        let mut client = Self::connect(server);
        client.start().await;
        let (kind, size, flags) = client.go(name).await;
        assert_eq!(kind, rep::ACK);
        (client, size, flags)
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let mut out = BytesMut::new();
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode(&mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(cmd::WRITE, 0, cookie, offset, data.len() as u32)
            .await;
        self.stream.write_all(data).await.unwrap();
    }

    /// A simple reply header: (cookie, error).
    async fn reply(&mut self) -> (u64, u32) {
        let mut h = self.read_exact(16).await;
        assert_eq!(h.get_u32(), SIMPLE_REPLY_MAGIC);
        let error = h.get_u32();
        (h.get_u64(), error)
    }

    /// Whether the server closed the connection (EOF within the time limit).
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            timeout(STEP, self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn server_with(device: Arc<dyn BlockDevice>) -> NbdServer {
    let server = NbdServer::new();
    server.add_export("r0", device, "test export").unwrap();
    server
}

#[tokio::test]
async fn nbd_server_read_write_flush_trim_zeroes() {
    let device = Arc::new(MemDevice::new(1 << 20));
    let server = server_with(device.clone());
    let (mut c, size, flags) = Client::connect_to(&server, "r0").await;
    assert_eq!(size, 1 << 20);
    assert_eq!(flags, proto::export_flags(false, true));

    c.write(1, 4096, &[0xab; 8192]).await;
    assert_eq!(c.reply().await, (1, 0));
    c.request(cmd::READ, 0, 2, 4096, 8192).await;
    assert_eq!(c.reply().await, (2, 0));
    assert_eq!(c.read_exact(8192).await, Bytes::from(vec![0xab; 8192]));
    c.request(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 3, 4096, 100)
        .await;
    assert_eq!(c.reply().await, (3, 0));
    c.request(cmd::TRIM, cmd_flags::FUA, 4, 8192, 4096).await;
    assert_eq!(c.reply().await, (4, 0));
    c.request(cmd::FLUSH, 0, 5, 0, 0).await;
    assert_eq!(c.reply().await, (5, 0));
    c.request(cmd::DISC, 0, 6, 0, 0).await;
    assert!(c.closed().await);

    let data = device.snapshot();
    assert!(data[4096..4196].iter().all(|&b| b == 0));
    assert!(data[4196..8192].iter().all(|&b| b == 0xab));
    assert!(data[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(device.flush_count(), 2);
}

#[tokio::test]
async fn nbd_server_errors_keep_the_connection() {
    let device = Arc::new(MemDevice::new(1 << 20));
    let server = server_with(device.clone());
    let (mut c, _, _) = Client::connect_to(&server, "r0").await;

    // Beyond the end, too long, unknown command, bad flags: each answered, none fatal.
    c.request(cmd::READ, 0, 1, (1 << 20) - 1, 2).await;
    assert_eq!(c.reply().await, (1, ErrorCode::Inval.wire()));
    c.write(2, (1 << 20) - 1, &[1, 2]).await;
    assert_eq!(c.reply().await, (2, ErrorCode::NoSpc.wire()));
    c.request(cmd::READ, 0, 3, 0, MAX_PAYLOAD + 1).await;
    assert_eq!(c.reply().await, (3, ErrorCode::Inval.wire()));
    c.write(4, 0, &vec![7; MAX_PAYLOAD as usize + 1]).await;
    assert_eq!(c.reply().await, (4, ErrorCode::Inval.wire()));
    c.request(99, 0, 5, 0, 0).await;
    assert_eq!(c.reply().await, (5, ErrorCode::Inval.wire()));
    c.request(cmd::READ, cmd_flags::DF, 6, 0, 1).await;
    assert_eq!(c.reply().await, (6, ErrorCode::Inval.wire()));

    // Demoted after connecting: the device refuses, the client sees EPERM.
    device.set_read_only(true);
    c.write(7, 0, b"data").await;
    assert_eq!(c.reply().await, (7, ErrorCode::Perm.wire()));
    device.set_read_only(false);

    c.request(cmd::READ, 0, 8, 0, 4).await;
    assert_eq!(c.reply().await, (8, 0));
    assert_eq!(c.read_exact(4).await, Bytes::from(vec![0; 4]));
    assert!(device.snapshot().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn nbd_server_read_only_export() {
    let device = Arc::new(MemDevice::new(4096));
    device.set_read_only(true);
    let server = server_with(device);
    let (mut c, _, flags) = Client::connect_to(&server, "r0").await;
    assert_ne!(flags & proto::transmission_flags::READ_ONLY, 0);
    c.write(1, 0, b"data").await;
    assert_eq!(c.reply().await, (1, ErrorCode::Perm.wire()));
    c.request(cmd::TRIM, 0, 2, 0, 10).await;
    assert_eq!(c.reply().await, (2, ErrorCode::Perm.wire()));
    c.request(cmd::READ, 0, 3, 0, 10).await;
    assert_eq!(c.reply().await, (3, 0));
}

#[tokio::test]
async fn nbd_server_garbage_closes_only_that_connection() {
    let server = server_with(Arc::new(MemDevice::new(4096)));
    let (mut bad, _, _) = Client::connect_to(&server, "r0").await;
    let (mut good, _, _) = Client::connect_to(&server, "r0").await;
    bad.stream
        .write_all(b"this is not an NBD request at all")
        .await
        .unwrap();
    assert!(bad.closed().await);
    good.request(cmd::READ, 0, 1, 0, 16).await;
    assert_eq!(good.reply().await, (1, 0));
}

#[tokio::test]
async fn nbd_server_handshake_errors() {
    let server = server_with(Arc::new(MemDevice::new(4096)));
    let mut c = Client::connect(&server);
    c.start().await;
    assert_eq!(c.go("nope").await.0, rep::ERR_UNKNOWN);
    c.send_option(opt::LIST, &[]).await;
    let (kind, mut data) = c.option_reply().await;
    assert_eq!(kind, rep::SERVER);
    assert_eq!(data.get_u32(), 2);
    assert_eq!(&data[..], b"r0test export");
    assert_eq!(c.option_reply().await.0, rep::ACK);
    c.send_option(opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await.0, rep::ERR_UNSUP);
    // The empty name selects the only export.
    assert_eq!(c.go("").await.0, rep::ACK);

    let mut c = Client::connect(&server);
    c.start().await;
    c.send_option(opt::EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);

    let mut c = Client::connect(&server);
    c.start().await;
    c.send_option(opt::ABORT, &[]).await;
    assert_eq!(c.option_reply().await.0, rep::ACK);
    assert!(c.closed().await);
}

#[test]
fn nbd_server_rejects_bad_export_names() {
    let server = NbdServer::new();
    let dev = || Arc::new(MemDevice::new(1)) as Arc<dyn BlockDevice>;
    assert!(server.add_export("", dev(), "").is_err());
    assert!(server.add_export("a\0b", dev(), "").is_err());
    assert!(server.add_export("x".repeat(4097), dev(), "").is_err());
    assert!(server.add_export("ok", dev(), "d\0").is_err());
    server.add_export("ok", dev(), "").unwrap();
    assert!(matches!(
        server.add_export("ok", dev(), ""),
        Err(ExportError::Exists(_))
    ));
    assert!(server.remove_export("ok").is_some());
    assert!(server.remove_export("ok").is_none());
}

/// A device whose writes wait for a gate, and whose reads of offset 0 wait too.
struct GatedDevice {
    inner: MemDevice,
    gate: Semaphore,
}

impl GatedDevice {
    fn new() -> Self {
        Self {
            inner: MemDevice::new(1 << 20),
            gate: Semaphore::new(0),
        }
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        Box::pin(async move {
            if offset == 0 {
                self.gate.acquire().await.unwrap().forget();
            }
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async move {
            self.gate.acquire().await.unwrap().forget();
            self.inner.write(offset, data, fua).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
}

#[tokio::test]
async fn nbd_server_replies_out_of_order() {
    let device = Arc::new(GatedDevice::new());
    let server = server_with(device.clone());
    let (mut c, _, _) = Client::connect_to(&server, "r0").await;
    c.request(cmd::READ, 0, 1, 0, 512).await; // waits for the gate
    c.request(cmd::READ, 0, 2, 512, 512).await;
    assert_eq!(c.reply().await, (2, 0));
    c.read_exact(512).await;
    device.gate.add_permits(1);
    assert_eq!(c.reply().await, (1, 0));
    c.read_exact(512).await;
}

#[tokio::test]
async fn nbd_server_disc_waits_for_requests_in_flight() {
    let device = Arc::new(GatedDevice::new());
    let server = server_with(device.clone());
    let (mut c, _, _) = Client::connect_to(&server, "r0").await;
    for cookie in 0..4u64 {
        c.write(cookie, cookie * 512, &[cookie as u8 + 1; 512])
            .await;
    }
    c.request(cmd::DISC, 0, 99, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    device.gate.add_permits(4);
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..4 {
        let (cookie, error) = c.reply().await;
        assert_eq!(error, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [0, 1, 2, 3]);
    assert!(c.closed().await);
    assert_eq!(device.inner.snapshot()[3 * 512], 4);
}

#[tokio::test]
async fn nbd_server_shutdown_drains_then_closes() {
    let device = Arc::new(GatedDevice::new());
    let server = server_with(device.clone());
    let (mut c, _, _) = Client::connect_to(&server, "r0").await;
    c.write(1, 0, b"in flight").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let shutdown = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Arriving after the shutdown began: refused with ESHUTDOWN, not executed.
    c.request(cmd::READ, 0, 2, 4096, 4).await;
    assert_eq!(c.reply().await, (2, ErrorCode::Shutdown.wire()));
    assert!(!shutdown.is_finished());
    device.gate.add_permits(1);
    assert_eq!(c.reply().await, (1, 0));
    assert!(c.closed().await);
    timeout(STEP, shutdown).await.unwrap().unwrap();
    assert_eq!(&device.inner.snapshot()[..9], b"in flight");
}

#[tokio::test]
async fn nbd_server_remove_export_closes_its_connections() {
    let server = NbdServer::new();
    server
        .add_export("a", Arc::new(MemDevice::new(4096)), "")
        .unwrap();
    server
        .add_export("b", Arc::new(MemDevice::new(4096)), "")
        .unwrap();
    let (mut a, _, _) = Client::connect_to(&server, "a").await;
    let (mut b, _, _) = Client::connect_to(&server, "b").await;
    server.remove_export("a");
    assert!(a.closed().await);
    b.request(cmd::READ, 0, 1, 0, 4).await;
    assert_eq!(b.reply().await, (1, 0));
}

#[tokio::test]
async fn nbd_server_pipelines_many_requests() {
    let device = Arc::new(MemDevice::new(1 << 20));
    let server = server_with(device.clone());
    let (c, _, _) = Client::connect_to(&server, "r0").await;
    // More requests than may be in flight: the server reads on as replies drain.
    let count = 4 * MAX_IN_FLIGHT_REQUESTS as u64;
    let (mut rd, mut wr) = tokio::io::split(c.stream);
    let sender = tokio::spawn(async move {
        for cookie in 0..count {
            let mut out = BytesMut::new();
            RequestHeader {
                flags: 0,
                kind: cmd::WRITE,
                cookie,
                offset: cookie * 1024,
                length: 1024,
            }
            .encode(&mut out);
            out.put_bytes(cookie as u8, 1024);
            wr.write_all(&out).await.unwrap();
        }
        wr
    });
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let mut h = [0u8; 16];
        timeout(STEP, rd.read_exact(&mut h)).await.unwrap().unwrap();
        let mut h = &h[..];
        assert_eq!(h.get_u32(), SIMPLE_REPLY_MAGIC);
        assert_eq!(h.get_u32(), 0);
        seen[h.get_u64() as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    let _wr = sender.await.unwrap();
    let data = device.snapshot();
    for cookie in 0..count as usize {
        assert!(data[cookie * 1024..(cookie + 1) * 1024]
            .iter()
            .all(|&b| b == cookie as u8));
    }
}

#[tokio::test]
async fn nbd_file_device_operations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0x55u8; 1 << 20]).unwrap();
    let dev = FileDevice::open(&path).unwrap();
    assert_eq!(dev.size(), 1 << 20);
    assert!(dev.can_multi_conn());
    dev.write(100, Bytes::from_static(b"hello"), true)
        .await
        .unwrap();
    assert_eq!(&dev.read(100, 5).await.unwrap()[..], b"hello");
    dev.write_zeroes(0, 4096, true, false).await.unwrap();
    dev.write_zeroes(8192, 4096, false, true).await.unwrap();
    dev.trim(65536, 65536, false).await.unwrap();
    dev.flush().await.unwrap();
    assert!(matches!(
        dev.read((1 << 20) - 1, 2).await,
        Err(BlockError::OutOfRange)
    ));
    assert!(matches!(
        dev.write(1 << 20, Bytes::from_static(b"x"), false).await,
        Err(BlockError::OutOfRange)
    ));
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..8192].iter().all(|&b| b == 0x55));
    assert!(data[8192..12288].iter().all(|&b| b == 0));

    let ro = FileDevice::open_read_only(&path).unwrap();
    assert!(ro.read_only());
    assert!(matches!(
        ro.write(0, Bytes::from_static(b"x"), false).await,
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(
        ro.trim(0, 1, false).await,
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(ro.read(4096, 1).await.unwrap()[0], 0x55);
}

#[test]
fn nbd_block_errors_map_to_protocol_errors() {
    use std::io;
    let os = |errno: i32| BlockError::Io(io::Error::from_raw_os_error(errno));
    assert_eq!(os(28).error_code(), ErrorCode::NoSpc); // ENOSPC
    assert_eq!(os(122).error_code(), ErrorCode::NoSpc); // EDQUOT
    assert_eq!(os(27).error_code(), ErrorCode::NoSpc); // EFBIG
    assert_eq!(os(5).error_code(), ErrorCode::Io);
    assert_eq!(os(30).error_code(), ErrorCode::Perm); // EROFS
    assert_eq!(
        BlockError::Io(io::Error::other("x")).error_code(),
        ErrorCode::Io
    );
    assert_eq!(BlockError::ReadOnly.error_code(), ErrorCode::Perm);
    assert_eq!(BlockError::OutOfRange.error_code(), ErrorCode::Inval);
    assert_eq!(BlockError::NoSpace.error_code(), ErrorCode::NoSpc);
    assert_eq!(BlockError::Shutdown.error_code(), ErrorCode::Shutdown);
}
