//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio.
//!
//! Needs `qemu-utils`, `libnbd-bin` and `fio`. Where a tool is missing the test prints
//! `SKIP: <tool> not installed` and passes, except under CI (`CI` set), where it fails.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drbd_net::nbd::{
    BlockDevice, BlockError, BoxFuture, FileDevice, ListenAddr, Listener, NbdServer,
};

/// Longest any one client command may run before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// Whether every tool is installed; prints SKIP (or fails under CI) if not.
fn require(tools: &[&str]) -> bool {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
        if !found {
            if std::env::var_os("CI").is_some() {
                panic!("{tool} not installed (CI needs the packages qemu-utils, libnbd-bin, fio)");
            }
            println!("SKIP: {tool} not installed");
            return false;
        }
    }
    true
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "drbd_net=info".into()),
        )
        .try_init();
}

struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn ok(&self) -> bool {
        self.status.success()
    }

    fn text(&self) -> String {
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run a command with a time limit, capturing its output.
fn run(program: &str, args: &[&str]) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[track_caller]
fn run_ok(program: &str, args: &[&str]) -> Output {
    let output = run(program, args);
    assert!(output.ok(), "{program} {args:?} failed:\n{}", output.text());
    output
}

/// Deterministic pseudo-random bytes (xorshift).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A server with export `r0` (a file of `size` bytes filled with 0x5a) on a Unix socket.
struct Fixture {
    rt: tokio::runtime::Runtime,
    server: NbdServer,
    dir: tempfile::TempDir,
    image: PathBuf,
    unix: Listener,
}

impl Fixture {
    fn new(size: usize) -> Self {
        init_tracing();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("r0.img");
        std::fs::write(&image, vec![0x5a; size]).unwrap();
        let server = NbdServer::new();
        server
            .add_export(
                "r0",
                Arc::new(FileDevice::open(&image).unwrap()),
                "resource r0",
            )
            .unwrap();
        let socket = dir.path().join("r0.nbd");
        let unix = rt.block_on(server.serve_unix(&socket)).unwrap();
        Self {
            rt,
            server,
            dir,
            image,
            unix,
        }
    }

    fn socket(&self) -> &Path {
        match self.unix.local_addr() {
            ListenAddr::Unix(path) => path,
            ListenAddr::Tcp(_) => unreachable!(),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    fn add(&self, name: &str, device: Arc<dyn BlockDevice>) {
        self.server.add_export(name, device, "").unwrap();
    }

    fn tcp(&self) -> (Listener, SocketAddr) {
        let listener = self
            .rt
            .block_on(self.server.serve_tcp("127.0.0.1:0".parse().unwrap()))
            .unwrap();
        let ListenAddr::Tcp(addr) = *listener.local_addr() else {
            unreachable!()
        };
        (listener, addr)
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn shutdown(self) {
        let start = Instant::now();
        self.rt.block_on(self.server.shutdown());
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "shutdown was slow"
        );
        assert!(!self.socket().exists(), "socket file left behind");
    }
}

#[test]
fn nbdinfo_shows_size_name_and_description() {
    if !require(&["nbdinfo"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB);
    let out = run_ok("nbdinfo", &["--json", &fx.uri("r0")]);
    assert!(
        out.stdout.contains("\"export-size\": 67108864"),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("\"export-name\": \"r0\""),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("\"description\": \"resource r0\""),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("\"is_read_only\": false"),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("\"can_multi_conn\": true"),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("\"block_size_maximum\": 33554432"),
        "{}",
        out.text()
    );

    let out = run_ok("nbdinfo", &["--size", &fx.uri("r0")]);
    assert_eq!(out.stdout.trim(), "67108864");

    fx.add("r1", Arc::new(drbd_net::nbd::MemDevice::new(MIB)));
    let out = run_ok("nbdinfo", &["--list", &fx.uri("")]);
    assert!(out.stdout.contains("export=\"r0\""), "{}", out.text());
    assert!(out.stdout.contains("export=\"r1\""), "{}", out.text());

    let (tcp, addr) = fx.tcp();
    let out = run_ok("nbdinfo", &["--size", &format!("nbd://{addr}/r0")]);
    assert_eq!(out.stdout.trim(), "67108864");
    drop(tcp);
    fx.shutdown();
}

#[test]
fn qemu_io_write_read_zero_discard_flush() {
    if !require(&["qemu-io"]) {
        return;
    }
    let fx = Fixture::new(64 * MIB);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &fx.uri("r0"),
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "discard 2M 1M",
            "-c",
            "flush",
        ],
    );
    assert!(!out.stdout.contains("failed"), "{}", out.text());
    assert!(
        !out.stdout.contains("Pattern verification"),
        "{}",
        out.text()
    );
    let image = fx.image();
    assert!(image[..MIB].iter().all(|&b| b == 0xab));
    assert!(image[MIB..2 * MIB].iter().all(|&b| b == 0));
    // Trimmed: the file device punches a hole, which reads back as zeroes.
    assert!(image[2 * MIB..3 * MIB].iter().all(|&b| b == 0));
    assert!(image[3 * MIB..].iter().all(|&b| b == 0x5a));

    // The same over TCP, reading back what the first client wrote.
    let (_tcp, addr) = fx.tcp();
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &format!("nbd://{addr}/r0"),
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "write -P 0x11 63M 1M",
            "-c",
            "read -P 0x5a 62M 1M",
        ],
    );
    assert!(!out.stdout.contains("failed"), "{}", out.text());
    assert!(
        !out.stdout.contains("Pattern verification"),
        "{}",
        out.text()
    );
    assert!(fx.image()[63 * MIB..].iter().all(|&b| b == 0x11));
    fx.shutdown();
}

#[test]
fn qemu_img_info_and_convert() {
    if !require(&["qemu-img"]) {
        return;
    }
    let fx = Fixture::new(16 * MIB);
    let out = run_ok("qemu-img", &["info", "--output=json", &fx.uri("r0")]);
    assert!(
        out.stdout.contains("\"virtual-size\": 16777216"),
        "{}",
        out.text()
    );

    // Into the export (parallel out-of-order writes), then out of it into a file.
    let source = fx.path("source.img");
    let mut data = random_bytes(16 * MIB, 7);
    data[4 * MIB..6 * MIB].fill(0);
    std::fs::write(&source, &data).unwrap();
    let source = source.to_str().unwrap().to_owned();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-W",
            "-m",
            "16",
            "-f",
            "raw",
            "-O",
            "raw",
            &source,
            &fx.uri("r0"),
        ],
    );
    assert!(
        fx.image() == data,
        "export differs from the converted image"
    );
    let copy = fx.path("copy.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &fx.uri("r0"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy).unwrap() == data,
        "converted copy differs"
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &source, &fx.uri("r0")],
    );
    fx.shutdown();
}

/// FNV-1a, as a checksum.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn nbdcopy_round_trip_over_four_connections() {
    if !require(&["nbdcopy"]) {
        return;
    }
    let fx = Fixture::new(16 * MIB);
    let source = fx.path("random.img");
    let data = random_bytes(16 * MIB, 42);
    std::fs::write(&source, &data).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=64",
            "--flush",
            source.to_str().unwrap(),
            &fx.uri("r0"),
        ],
    );
    assert_eq!(checksum(&fx.image()), checksum(&data));
    let back = fx.path("back.img");
    run_ok(
        "nbdcopy",
        &["--connections=4", &fx.uri("r0"), back.to_str().unwrap()],
    );
    assert_eq!(checksum(&std::fs::read(&back).unwrap()), checksum(&data));
    fx.shutdown();
}

/// A device that was writable when the client connected and is read-only now (a Primary
/// demoted to Secondary): it announces itself writable but refuses every write.
struct Demoted(FileDevice);

impl BlockDevice for Demoted {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<bytes::Bytes, BlockError>> {
        self.0.read(offset, len)
    }
    fn write(&self, _: u64, _: bytes::Bytes, _: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Err(BlockError::ReadOnly) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), BlockError>> {
        self.0.flush()
    }
    fn trim(&self, _: u64, _: u32, _: bool) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Err(BlockError::ReadOnly) })
    }
    fn write_zeroes(
        &self,
        _: u64,
        _: u32,
        _: bool,
        _: bool,
    ) -> BoxFuture<'_, Result<(), BlockError>> {
        Box::pin(async { Err(BlockError::ReadOnly) })
    }
}

#[test]
fn read_only_exports_refuse_writes() {
    if !require(&["qemu-io", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let fx = Fixture::new(4 * MIB);
    fx.add(
        "ro",
        Arc::new(FileDevice::open_read_only(&fx.image).unwrap()),
    );
    fx.add(
        "demoted",
        Arc::new(Demoted(FileDevice::open(&fx.image).unwrap())),
    );

    let out = run_ok("nbdinfo", &["--json", &fx.uri("ro")]);
    assert!(
        out.stdout.contains("\"is_read_only\": true"),
        "{}",
        out.text()
    );
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", &fx.uri("ro"), "-c", "read -P 0x5a 0 64k"],
    );

    // qemu refuses to open a read-only export for writing.
    let out = run(
        "qemu-io",
        &["-f", "raw", &fx.uri("ro"), "-c", "write 0 64k"],
    );
    assert!(!out.ok(), "{}", out.text());
    assert!(out.stderr.contains("Permission denied"), "{}", out.text());
    // nbdcopy cannot write to it either.
    let source = fx.path("src.img");
    std::fs::write(&source, vec![1u8; 4 * MIB]).unwrap();
    let out = run("nbdcopy", &[source.to_str().unwrap(), &fx.uri("ro")]);
    assert!(!out.ok(), "{}", out.text());
    assert!(out.stderr.contains("read-only"), "{}", out.text());

    // Writes refused by the device after connecting: the client sees EPERM.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &fx.uri("demoted"),
            "-c",
            "write -P 1 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    let text = out.text();
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(fx.image().iter().all(|&b| b == 0x5a));
    fx.shutdown();
}

#[test]
fn unknown_export_fails_cleanly() {
    if !require(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let fx = Fixture::new(MIB);
    let out = run("nbdinfo", &[&fx.uri("nope")]);
    assert!(!out.ok(), "{}", out.text());
    assert!(out.stderr.contains("nope"), "{}", out.text());
    let out = run(
        "qemu-io",
        &["-f", "raw", &fx.uri("nope"), "-c", "read 0 4k"],
    );
    assert!(!out.ok(), "{}", out.text());
    assert!(
        out.stderr.contains("export \"nope\" not found"),
        "{}",
        out.text()
    );
    // Still serving.
    run_ok("nbdinfo", &["--size", &fx.uri("r0")]);
    fx.shutdown();
}

/// Handshake by hand with `NBD_OPT_GO`, returning the connected socket.
fn raw_connect(socket: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut msg = Vec::new();
    msg.extend_from_slice(&3u32.to_be_bytes());
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&(6 + export.len() as u32).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&msg).unwrap();
    loop {
        let mut header = [0u8; 20];
        s.read_exact(&mut header).unwrap();
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).unwrap();
        if kind == 1 {
            return s;
        }
        assert_eq!(kind, 3, "expected NBD_REP_INFO or NBD_REP_ACK");
    }
}

/// Whether the peer closed the socket (EOF or reset) within the read timeout.
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn garbage_disconnects_only_that_client() {
    if !require(&["qemu-io"]) {
        return;
    }
    let fx = Fixture::new(MIB);
    let mut idle = raw_connect(fx.socket(), "r0");

    let mut bad = raw_connect(fx.socket(), "r0");
    bad.write_all(&random_bytes(4096, 3)).unwrap();
    assert!(
        closed_by_server(&mut bad),
        "garbage after the handshake was tolerated"
    );

    let mut early = UnixStream::connect(fx.socket()).unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    early.write_all(&random_bytes(512, 4)).unwrap();
    assert!(
        closed_by_server(&mut early),
        "garbage in the handshake was tolerated"
    );

    run_ok(
        "qemu-io",
        &["-f", "raw", &fx.uri("r0"), "-c", "read -P 0x5a 0 64k"],
    );

    // The idle client is still served.
    let mut request = Vec::new();
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    request.extend_from_slice(&[0, 0, 0, 0]); // flags, NBD_CMD_READ
    request.extend_from_slice(&77u64.to_be_bytes());
    request.extend_from_slice(&0u64.to_be_bytes());
    request.extend_from_slice(&4u32.to_be_bytes());
    idle.write_all(&request).unwrap();
    let mut reply = [0u8; 20];
    idle.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0]);
    assert_eq!(&reply[8..16], &77u64.to_be_bytes());
    assert_eq!(&reply[16..], &[0x5a; 4]);
    fx.shutdown();
}

#[test]
fn many_parallel_requests() {
    if !require(&["qemu-io", "fio"]) {
        return;
    }
    let fx = Fixture::new(32 * MIB);
    // 32 asynchronous writes of different patterns in flight at once, then read back.
    let mut args = vec!["-f".to_owned(), "raw".to_owned(), fx.uri("r0")];
    for i in 0..32 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {}k 64k", i + 1, i * 64));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    for i in 0..32 {
        args.push("-c".into());
        args.push(format!("aio_read -P {} {}k 64k", i + 1, i * 64));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ok("qemu-io", &args);
    assert!(!out.stdout.contains("failed"), "{}", out.text());
    let image = fx.image();
    for i in 0..32 {
        let chunk = &image[i * 64 * 1024..(i + 1) * 64 * 1024];
        assert!(chunk.iter().all(|&b| b == i as u8 + 1), "chunk {i}");
    }

    // fio's nbd engine: random writes at queue depth 32, verified when read back.
    let uri = format!("--uri={}", fx.uri("r0"));
    run_ok(
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=8M",
            "--offset=16M",
            "--verify=crc32c",
            "--do_verify=1",
            // No verify state file in the working directory.
            "--verify_state_save=0",
        ],
    );
    fx.shutdown();
}
