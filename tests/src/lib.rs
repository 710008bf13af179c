//! Integration tests of the workspace. The tests in `tests/tests/` drive the binaries
//! (`drbdadm`, `drbdd`) as separate processes, the way an operator and the scripts around DRBD
//! do, and use real clients (`qemu-io`, `nbdcopy`) on the NBD exports.
//!
//! This library is the harness: a [`Pair`] of nodes with file-backed disks and their own state
//! directories, started as `drbdd` processes on this machine (optionally each inside a network
//! namespace), plus a small synchronous NBD client ([`NbdClient`]) for writers that must know
//! exactly which writes were acknowledged.

pub mod lab;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory of the workspace's built binaries (next to the test executable's `deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    for b in ["drbdd", "drbdadm"] {
        assert!(
            dir.join(b).exists(),
            "{} not built: run `cargo build -p drbd-cli` (or `cargo test --workspace`)",
            dir.join(b).display()
        );
    }
    dir
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips a test (returns true) when `ok` is false: prints why, and fails instead under CI,
/// where every prerequisite is installed.
pub fn skip_unless(ok: bool, why: &str) -> bool {
    if ok {
        return false;
    }
    if std::env::var_os("CI").is_some() {
        panic!("prerequisite missing under CI: {why}");
    }
    eprintln!("SKIP: {why}");
    true
}

/// One node of a pair.
pub struct Node {
    pub name: String,
    pub state_dir: PathBuf,
    pub disk: PathBuf,
    /// Network namespace to run in, if any.
    pub netns: Option<String>,
    /// More environment for the daemon (for example a disk fault plan).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

/// Two nodes of one resource `r0` on this machine.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    /// A node's own configuration file, when it differs from `conf` (see
    /// [`Pair::set_node_conf`]).
    pub node_confs: [Option<PathBuf>; 2],
    pub nodes: [Node; 2],
    bin: PathBuf,
}

/// How to build a pair.
pub struct PairSpec<'a> {
    /// Backing file size in MiB.
    pub size_mib: u64,
    /// Addresses `ip:port` of alpha and bravo.
    pub addresses: [&'a str; 2],
    /// Extra lines inside `resource r0 { ... }` (net/disk sections).
    pub resource_extra: &'a str,
    /// Network namespaces for alpha and bravo (None: the host's).
    pub netns: [Option<&'a str>; 2],
    /// Extra options inside the resource's `disk { ... }` section.
    pub disk_extra: &'a str,
    /// Extra options inside the resource's `net { ... }` section.
    pub net_extra: &'a str,
}

impl Default for PairSpec<'_> {
    fn default() -> Self {
        PairSpec {
            size_mib: 64,
            addresses: ["127.0.0.1:7800", "127.0.0.2:7800"],
            resource_extra: "",
            netns: [None, None],
            disk_extra: "",
            net_extra: "",
        }
    }
}

/// The result of a command: exit code, stdout, stderr.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Pair {
    /// Writes the configuration and creates the backing files and their metadata.
    pub fn new(spec: PairSpec<'_>) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("drbd-pair-")
            .tempdir()
            .expect("temp dir");
        let bin = bin_dir();
        let names = ["alpha", "bravo"];
        let nodes = [0, 1].map(|i| {
            let name = names[i].to_string();
            let state_dir = dir.path().join(&name);
            std::fs::create_dir_all(&state_dir).expect("state dir");
            let disk = dir.path().join(format!("{name}.img"));
            let f = std::fs::File::create(&disk).expect("backing file");
            f.set_len(spec.size_mib << 20).expect("size");
            Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                state_dir,
                disk,
                netns: spec.netns[i].map(str::to_string),
                env: Vec::new(),
                child: None,
            }
        });
        let conf = dir.path().join("drbd.conf");
        let hosts: String = (0..2)
            .map(|i| {
                format!(
                    "    on {} {{ device /dev/drbd0; disk {}; address {}; meta-disk internal; }}\n",
                    nodes[i].name,
                    nodes[i].disk.display(),
                    spec.addresses[i]
                )
            })
            .collect();
        let text = format!(
            "global {{ usage-count no; }}\nresource r0 {{\n    protocol C;\n    net {{ connect-int 1; ping-int 1; {} }}\n    disk {{ resync-rate 400M; c-plan-ahead 0; {} }}\n{}\n{hosts}}}\n",
            spec.net_extra, spec.disk_extra, spec.resource_extra
        );
        std::fs::write(&conf, text).expect("config");
        let pair = Pair {
            dir,
            conf,
            node_confs: [None, None],
            nodes,
            bin,
        };
        for i in 0..2 {
            let r = pair.adm(i, &["create-md", "--force", "r0"]);
            assert_eq!(
                r.code, 0,
                "create-md on {}: {}",
                pair.nodes[i].name, r.stderr
            );
        }
        pair
    }

    fn wrap(&self, i: usize, program: &Path) -> Command {
        match &self.nodes[i].netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// The configuration file node `i` uses.
    pub fn conf_of(&self, i: usize) -> &Path {
        self.node_confs[i].as_deref().unwrap_or(&self.conf)
    }

    /// Gives node `i` its own configuration: its current one (at first the shared one)
    /// with `edit` applied (for example a peer address that leads through a proxy).
    pub fn set_node_conf(&mut self, i: usize, edit: impl Fn(&str) -> String) {
        let text = std::fs::read_to_string(self.conf_of(i)).expect("config");
        let path = self.dir.path().join(format!("{}.conf", self.nodes[i].name));
        std::fs::write(&path, edit(&text)).expect("node config");
        self.node_confs[i] = Some(path);
    }

    /// Starts node `i`'s daemon and waits for its control socket.
    pub fn start(&mut self, i: usize) {
        self.start_with(i, &[]);
    }

    /// Starts node `i`'s daemon with extra arguments and waits for its control socket.
    pub fn start_with(&mut self, i: usize, extra: &[&str]) {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log file");
        let mut c = self.wrap(i, &self.bin.join("drbdd"));
        c.arg("-c")
            .arg(self.conf_of(i))
            .args(["--node", &n.name])
            .arg("--state-dir")
            .arg(&n.state_dir)
            .args(extra)
            .envs(n.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = c.spawn().expect("spawn drbdd");
        self.nodes[i].child = Some(child);
        let sock = self.nodes[i].state_dir.join("drbdd.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "drbdd did not start:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `drbdadm` for node `i`.
    pub fn adm(&self, i: usize, args: &[&str]) -> Run {
        let n = &self.nodes[i];
        self.wrap(i, &self.bin.join("drbdadm"))
            .arg("-c")
            .arg(self.conf_of(i))
            .args(["--node", &n.name])
            .arg("--state-dir")
            .arg(&n.state_dir)
            .args(args)
            .output()
            .expect("run drbdadm")
            .into()
    }

    /// Runs `drbdadm` and asserts that it fails with exit code `code` and says `text` on
    /// standard error.
    #[track_caller]
    pub fn adm_refused(&self, i: usize, args: &[&str], code: i32, text: &str) -> Run {
        let r = self.adm(i, args);
        assert_eq!(
            r.code, code,
            "drbdadm {args:?} on {}: {}{}",
            self.nodes[i].name, r.stdout, r.stderr
        );
        assert!(
            r.stderr.contains(text),
            "drbdadm {args:?} on {}: no {text:?} in: {}",
            self.nodes[i].name,
            r.stderr
        );
        r
    }

    /// Runs `drbdadm` and asserts success.
    pub fn adm_ok(&self, i: usize, args: &[&str]) -> String {
        let r = self.adm(i, args);
        assert_eq!(
            r.code,
            0,
            "drbdadm {args:?} on {} failed: {}{}\nlog:\n{}",
            self.nodes[i].name,
            r.stdout,
            r.stderr,
            self.log(i)
        );
        r.stdout
    }

    /// Kills node `i`'s daemon with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.nodes[i].state_dir.join("drbdd.sock"));
    }

    /// Stops node `i`'s daemon with SIGTERM and waits for it; returns its exit code.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        let c = self.nodes[i].child.take()?;
        terminate(c, || self.log(i))
    }

    /// The daemon log of node `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// `drbdadm cstate`, `dstate`, `role` of node `i`.
    pub fn cstate(&self, i: usize) -> String {
        self.adm(i, &["cstate", "r0"]).stdout.trim().to_string()
    }
    pub fn dstate(&self, i: usize) -> String {
        self.adm(i, &["dstate", "r0"]).stdout.trim().to_string()
    }
    pub fn role(&self, i: usize) -> String {
        self.adm(i, &["role", "r0"]).stdout.trim().to_string()
    }

    /// Waits until `f` holds (polling), else panics with both logs.
    pub fn wait_until(&self, what: &str, limit: Duration, f: impl Fn(&Pair) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nalpha: {} {} {}\nbravo: {} {} {}\n--- alpha log\n{}\n--- bravo log\n{}",
                    self.cstate(0),
                    self.dstate(0),
                    self.role(0),
                    self.cstate(1),
                    self.dstate(1),
                    self.role(1),
                    self.log(0),
                    self.log(1)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both nodes are Connected and UpToDate/UpToDate.
    pub fn wait_in_sync(&self, limit: Duration) {
        self.wait_until("Connected UpToDate/UpToDate on both", limit, |p| {
            (0..2).all(|i| p.cstate(i) == "Connected" && p.dstate(i) == "UpToDate/UpToDate")
        });
    }

    /// Brings both nodes up from fresh metadata and makes alpha Primary with a full sync.
    pub fn up_and_sync(&mut self) {
        for i in 0..2 {
            self.start(i);
            self.adm_ok(i, &["up", "r0"]);
        }
        self.wait_until("connection", Duration::from_secs(30), |p| {
            p.cstate(0) == "Connected" && p.cstate(1) == "Connected"
        });
        self.adm_ok(0, &["primary", "--force", "r0"]);
        self.wait_in_sync(Duration::from_secs(60));
    }

    /// The NBD URI of node `i`'s export.
    pub fn nbd_uri(&self, i: usize) -> String {
        format!(
            "nbd+unix:///r0?socket={}",
            self.nodes[i].state_dir.join("r0.nbd").display()
        )
    }

    /// The NBD socket of node `i`.
    pub fn nbd_socket(&self, i: usize) -> PathBuf {
        self.nodes[i].state_dir.join("r0.nbd")
    }

    /// A counter of `drbdadm status --statistics` (first occurrence of `name:`), in KiB.
    pub fn statistic(&self, i: usize, name: &str) -> u64 {
        let out = self.adm_ok(i, &["status", "--statistics", "r0"]);
        let key = format!("{name}:");
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in status:\n{out}"))
    }

    /// A pair on loopback port `port` (alpha 127.0.0.1, bravo 127.0.0.2) with `net_extra`
    /// in the `net { }` section.
    pub fn on_port(port: u16, net_extra: &str) -> Pair {
        let a = format!("127.0.0.1:{port}");
        let b = format!("127.0.0.2:{port}");
        Pair::new(PairSpec {
            addresses: [&a, &b],
            net_extra,
            ..PairSpec::default()
        })
    }

    /// Splits the pair: disconnected, bravo promoted too; alpha writes `alpha_blocks` blocks
    /// (from 100), bravo `bravo_blocks` (from 200); `secondaries` lists who demotes again;
    /// then both connect.
    pub fn split_and_reconnect(
        &mut self,
        alpha_blocks: u64,
        bravo_blocks: u64,
        secondaries: &[usize],
    ) {
        self.up_and_sync();
        for i in [1, 0] {
            self.adm_ok(i, &["disconnect", "r0"]);
        }
        self.adm_ok(1, &["primary", "r0"]);
        for (i, base, n) in [(0usize, 100u64, alpha_blocks), (1, 200, bravo_blocks)] {
            let mut c = NbdClient::connect(&self.nbd_socket(i), "r0").expect("connect");
            for b in base..base + n {
                c.write(4096 * b, &stamped_block(b, 10 + i as u64))
                    .expect("write");
            }
            c.flush().expect("flush");
        }
        for &i in secondaries {
            self.adm_ok(i, &["secondary", "r0"]);
        }
        for i in 0..2 {
            self.adm_ok(i, &["connect", "r0"]);
        }
    }

    /// The shell command line of `drbdadm ARGS` for node `i` (for handler scripts).
    pub fn adm_command(&self, i: usize, args: &[&str]) -> String {
        let n = &self.nodes[i];
        format!(
            "{} -c {} --node {} --state-dir {} {}",
            self.bin.join("drbdadm").display(),
            self.conf_of(i).display(),
            n.name,
            n.state_dir.display(),
            args.join(" ")
        )
    }

    /// Gives node `i` a `handlers { }` section: each handler runs `/bin/sh SCRIPT`, the
    /// script file `<dir>/<node>-<handler>.sh` holding `body` (rewrite it with
    /// [`Pair::handler_script`] to change what the handler does).
    pub fn set_handlers(&mut self, i: usize, handlers: &[(&str, &str)]) {
        let mut section = String::from("    handlers {\n");
        for (name, body) in handlers {
            let path = self.handler_script(i, name, body);
            section.push_str(&format!("        {name} \"/bin/sh {}\";\n", path.display()));
        }
        section.push_str("    }\n");
        self.set_node_conf(i, |c| {
            c.replacen("resource r0 {\n", &format!("resource r0 {{\n{section}"), 1)
        });
    }

    /// (Re)writes the script of handler `name` on node `i`; returns its path.
    pub fn handler_script(&self, i: usize, name: &str, body: &str) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("{}-{name}.sh", self.nodes[i].name));
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("handler script");
        path
    }

    /// A file in the pair's directory (for handlers to leave traces in).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The first `len` bytes of node `i`'s backing file (the data area starts at 0).
    pub fn data(&self, i: usize, len: u64) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.nodes[i].disk).expect("backing file");
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).expect("read backing file");
        buf
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for i in 0..2 {
            if let Some(mut c) = self.nodes[i].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Stops a daemon with SIGTERM and waits for it (20 s at most, then kills it and panics
/// with its `log`); returns its exit code (None when a signal ended it).
pub fn terminate(mut c: Child, log: impl Fn() -> String) -> Option<i32> {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("drbdd did not stop on SIGTERM:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a program and returns its result.
pub fn run(program: &str, args: &[&str]) -> Run {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
        .into()
}

// ------------------------------------------------------------------------------------------
// A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies), one request at a time.
// ------------------------------------------------------------------------------------------

/// A synchronous NBD client on a Unix socket.
pub struct NbdClient {
    s: UnixStream,
    handle: u64,
    /// Export size in bytes.
    pub size: u64,
}

/// An NBD request failed: the server's error number, or the connection broke.
#[derive(Debug)]
pub enum NbdError {
    Errno(u32),
    Io(std::io::Error),
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::Io(e)
    }
}

const NBD_OPT_GO: u32 = 7;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;

impl NbdClient {
    /// Connects and selects `export`.
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient, NbdError> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(NbdError::Io(std::io::Error::other("not an NBD server")));
        }
        // Fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        let data_len = 4 + export.len() + 2;
        opt.extend_from_slice(&(data_len as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let typ = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match typ {
                NBD_REP_ACK => break,
                NBD_REP_INFO if len >= 12 && data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                NBD_REP_INFO => {}
                t if t & 0x8000_0000 != 0 => return Err(NbdError::Errno(t)),
                _ => {}
            }
        }
        Ok(NbdClient { s, handle: 0, size })
    }

    fn request(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let err = u32::from_be_bytes(h[4..8].try_into().expect("4 bytes"));
        if err != 0 {
            return Err(NbdError::Errno(err));
        }
        let mut out = Vec::new();
        if cmd == NBD_CMD_READ {
            out.resize(len as usize, 0);
            self.s.read_exact(&mut out)?;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; Ok means acknowledged.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.request(NBD_CMD_WRITE, offset, data.len() as u32, data)
            .map(drop)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(NBD_CMD_READ, offset, len, &[])
    }

    /// Flushes.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(NBD_CMD_FLUSH, 0, 0, &[]).map(drop)
    }
}

/// A 4 KiB block whose content names its block number and a generation.
pub fn stamped_block(block: u64, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, chunk) in b.chunks_exact_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&block.to_le_bytes());
        chunk[8..].copy_from_slice(&(generation ^ i as u64).to_le_bytes());
    }
    b
}
