//! The kernel lab: a QEMU VM (TCG) running the in-kernel DRBD 8.4.11 as node `alpha`, and our
//! `drbdd` as node `hostpeer` on the host side of a private network namespace, replicating
//! resource `r0` with each other (see `../shared/lab/README.md`).
//!
//! Topology of one [`Lab`] (the names are unique per lab, so labs can run side by side):
//!
//! ```text
//! netns drbdit-<pid>-<n>:  bridge dib<n> 10.99.0.1/24   <- tcpdump; our drbdd (hostpeer) listens here
//!                             `- tap dit<n>0 - VM alpha eth0 10.99.0.11  (DRBD :7789, rpc :5000)
//! ```
//!
//! The VM is booted the way the lab's `lib.sh` boots it (the lab's kernel and initramfs from
//! `$LAB_CACHE`, built by `lib.sh`'s `ensure_images` when missing); scripts run in it through
//! the lab's command server (`rpc-client.sh`, as `lib.sh`'s `rpc`). Every process the lab
//! starts (qemu, tcpdump, our daemon) is a [`Child`] of the test, and dropping the lab stops
//! them all and deletes the namespace, also when the test panics; a panicking test prints the
//! kernel's dmesg, `/proc/drbd` and our daemon's log first and keeps its scratch directory
//! (with the capture).
//!
//! Labs are serialized by a file lock (`$LAB_CACHE/interop.lock`: the TCG guests are
//! CPU-bound and the kernel's DRBD times out a silent peer after 0.5 s); set
//! `DRBD_LAB_PARALLEL=1` to let them run concurrently.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::{bin_dir, have, is_root, skip_unless, Run};

/// The kernel node's address and the DRBD port.
pub const KERNEL_IP: &str = "10.99.0.11";
/// Our node's address (the bridge in the namespace).
pub const HOST_IP: &str = "10.99.0.1";
/// The DRBD port of both nodes.
pub const PORT: u16 = 7789;
/// The kernel node's name in drbd.conf.
pub const KERNEL_NODE: &str = "alpha";
/// Our node's name in drbd.conf.
pub const OUR_NODE: &str = "hostpeer";

/// The lab's scripts (`lib.sh`, `rpc-client.sh`, `guest/`): `$LAB`, else `../shared/lab`
/// beside the workspace.
pub fn lab_dir() -> PathBuf {
    match std::env::var_os("LAB") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/lab"),
    }
}

/// Where the lab's images live: `$LAB_CACHE`, else `/var/tmp/drbd-lab`.
pub fn lab_cache() -> PathBuf {
    std::env::var_os("LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/drbd-lab"))
}

/// Skips (returns true) unless the lab can run here: root, qemu, tcpdump, tshark and the lab's
/// scripts. Fails instead under CI (see [`skip_unless`]).
pub fn lab_skip() -> bool {
    skip_unless(
        is_root(),
        "the kernel lab needs root (netns, bridge, tap, tcpdump)",
    ) || skip_unless(
        have("qemu-system-x86_64"),
        "the kernel lab needs qemu-system-x86_64 (../shared/lab/install-deps.sh)",
    ) || skip_unless(
        have("tcpdump") && have("tshark"),
        "the kernel lab needs tcpdump and tshark",
    ) || skip_unless(
        lab_dir().join("lib.sh").exists(),
        &format!("no lab scripts at {}", lab_dir().display()),
    )
}

/// How one side's configuration differs.
#[derive(Clone, Debug)]
pub struct Side {
    /// `shared-secret` (cram-hmac-alg sha1).
    pub secret: String,
    /// `connect-int` in seconds.
    pub connect_int: u32,
    /// More options inside `net { ... }`.
    pub net_extra: String,
}

impl Default for Side {
    fn default() -> Self {
        Side {
            secret: "drbdlab-secret".into(),
            connect_int: 2,
            net_extra: String::new(),
        }
    }
}

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Size of both backing disks (the VM's /dev/vda and our file), MiB.
    pub disk_mib: u64,
    /// Replication protocol (`A`, `B`, `C`).
    pub protocol: char,
    /// Our configuration.
    pub ours: Side,
    /// The kernel's configuration.
    pub kernel: Side,
    /// Options inside `disk { ... }` (both sides), after `resync-rate 100M; c-plan-ahead 0;`.
    pub disk_extra: String,
    /// Fill the backing disks with pseudo-random bytes (different on each side) before the
    /// metadata is created, so that a sync has something to move.
    pub random_disks: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            disk_mib: 16,
            protocol: 'C',
            ours: Side::default(),
            kernel: Side::default(),
            disk_extra: String::new(),
            random_disks: true,
        }
    }
}

/// One DRBD packet of the capture as Wireshark's DRBD dissector decodes it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub frame: u64,
    /// Capture time, seconds since the epoch.
    pub time: f64,
    pub src: String,
    pub dst: String,
    pub cmd: u16,
    /// The state word of a P_STATE (`drbd.state`).
    pub state: Option<u32>,
}

/// DRBD 8.4 connection states (`enum drbd_conns`) used by the checks.
pub mod conn {
    pub const CONNECTED: u32 = 10;
}

/// The connection state in a state word (`union drbd_state`: role:2 peer:2 conn:5 ...).
pub fn state_conn(state: u32) -> u32 {
    (state >> 4) & 0x1f
}

/// The capture, checked.
pub struct CaptureReport {
    pub pcap: PathBuf,
    /// Every DRBD packet, in capture order.
    pub packets: Vec<Packet>,
    /// TCP-level expert warnings (resets of refused connection attempts, ...), as
    /// `frame: message` lines; not counted as failures.
    pub tcp_warnings: Vec<String>,
}

impl CaptureReport {
    /// How many DRBD packets with command `cmd` were sent by `src` in `[from, to)` (epoch
    /// seconds; `None`: unbounded).
    pub fn count(&self, cmd: u16, src: Option<&str>, from: Option<f64>, to: Option<f64>) -> usize {
        self.packets
            .iter()
            .filter(|p| p.cmd == cmd)
            .filter(|p| src.is_none_or(|s| p.src == s))
            .filter(|p| from.is_none_or(|t| p.time >= t) && to.is_none_or(|t| p.time < t))
            .count()
    }

    /// The first packet with one of the commands `cmds`.
    pub fn first_of(&self, cmds: &[u16]) -> Option<&Packet> {
        self.packets.iter().find(|p| cmds.contains(&p.cmd))
    }

    /// Per-command counts `SRC:0xCMD=n`, for messages.
    pub fn summary(&self) -> String {
        let mut m = std::collections::BTreeMap::<(String, u16), usize>::new();
        for p in &self.packets {
            *m.entry((p.src.clone(), p.cmd)).or_default() += 1;
        }
        let mut s = String::new();
        for ((src, c), n) in m {
            let _ = write!(s, "{src}:0x{c:04x}={n} ");
        }
        s
    }

    /// Checks how every resync with `target` as SyncTarget ended, against what DRBD 8.4's
    /// `drbd_resync_finished()` does on the SyncTarget: all its P_RS_WRITE_ACKs are sent,
    /// then it pings the SyncSource (`ping_peer()`: P_PING, wait for P_PING_ACK on the meta
    /// socket, which the source's ack receiver answers only after the acks before it), and
    /// only then announces the end with a P_STATE (conn Connected). An 8.4 SyncSource
    /// (protocol > 95) finishes its side of the resync on that P_STATE alone, and only if
    /// its bitmap is clear by then (`receive_state()`: "peer_state.conn == C_CONNECTED" ->
    /// `drbd_resync_finished()` if `drbd_bm_total_weight() <= rs_failed`), so an ack still
    /// in flight leaves it SyncSource forever. Returns how many resync ends were checked.
    pub fn check_resync_ends(&self, target: &str, source: &str) -> Result<usize, String> {
        let mut ends = 0;
        let mut last_ack: Option<&Packet> = None;
        let mut ping: Option<&Packet> = None;
        let mut ping_ack: Option<&Packet> = None;
        let mut ended: Option<&Packet> = None;
        for p in &self.packets {
            match p.cmd {
                cmd::P_RS_WRITE_ACK if p.src == target => {
                    if let Some(e) = ended {
                        return Err(format!(
                            "the SyncTarget {target} sent a P_RS_WRITE_ACK (frame {}) after announcing the end of the resync (P_STATE conn=Connected, frame {})",
                            p.frame, e.frame
                        ));
                    }
                    last_ack = Some(p);
                    (ping, ping_ack) = (None, None);
                }
                cmd::P_PING if p.src == target && last_ack.is_some() => ping = Some(p),
                cmd::P_PING_ACK if p.src == source && ping.is_some() => ping_ack = Some(p),
                cmd::P_STATE if p.src == target => match p.state.map(state_conn) {
                    Some(conn::CONNECTED) if last_ack.is_some() => {
                        ends += 1;
                        if ping_ack.is_none() {
                            return Err(format!(
                                "the SyncTarget {target} announced the end of the resync (P_STATE conn=Connected, frame {}) without a P_PING/P_PING_ACK round trip after its last P_RS_WRITE_ACK (frame {}){}",
                                p.frame,
                                last_ack.map_or(0, |a| a.frame),
                                ping.map_or(String::new(), |q| format!("; P_PING in frame {} unanswered yet", q.frame))
                            ));
                        }
                        ended = Some(p);
                        (last_ack, ping, ping_ack) = (None, None, None);
                    }
                    Some(conn::CONNECTED) => {}
                    _ => ended = None,
                },
                // A new resync (or a new connection) begins.
                cmd::P_SYNC_UUID | cmd::P_UUIDS => ended = None,
                _ => {}
            }
        }
        Ok(ends)
    }
}

/// DRBD command codes used by the tests.
pub mod cmd {
    pub const P_DATA: u16 = 0x00;
    pub const P_UUIDS: u16 = 0x0c;
    pub const P_STATE: u16 = 0x0e;
    pub const P_SYNC_UUID: u16 = 0x0f;
    pub const P_STATE_CHG_REQ: u16 = 0x12;
    pub const P_PING: u16 = 0x13;
    pub const P_PING_ACK: u16 = 0x14;
    pub const P_WRITE_ACK: u16 = 0x16;
    pub const P_RS_WRITE_ACK: u16 = 0x17;
    pub const P_CONN_ST_CHG_REQ: u16 = 0x2a;
    pub const P_RS_DATA_REPLY: u16 = 0x02;
    pub const P_BITMAP: u16 = 0x04;
    pub const P_RS_DATA_REQUEST: u16 = 0x09;
    pub const P_COMPRESSED_BITMAP: u16 = 0x24;
    pub const P_INITIAL_META: u16 = 0xfff1;
    pub const P_INITIAL_DATA: u16 = 0xfff2;
    pub const P_CONNECTION_FEATURES: u16 = 0xfffe;
    pub const P_AUTH_CHALLENGE: u16 = 0x10;
    pub const P_AUTH_RESPONSE: u16 = 0x11;
}

/// A running lab: namespace + bridge + tap, tcpdump on the bridge, the VM `alpha`, and our
/// daemon (once started).
pub struct Lab {
    /// Scratch directory: VM disk and console, our disk, state dir, logs, capture.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub ns: String,
    pub br: String,
    pub tap: String,
    pub spec: LabSpec,
    /// Our configuration file.
    pub conf: PathBuf,
    /// Our backing file.
    pub disk: PathBuf,
    /// Our state directory (control socket, NBD socket).
    pub state_dir: PathBuf,
    /// The VM's disk image (its /dev/vda).
    pub vm_disk: PathBuf,
    /// The capture on the bridge.
    pub pcap: PathBuf,
    log: PathBuf,
    console: PathBuf,
    bin: PathBuf,
    vm: Option<Child>,
    daemon: Option<Child>,
    tcpdump: Option<Child>,
    _lock: Option<File>,
    started: Instant,
}

/// Runs a command with stdin closed and returns its result.
fn run_cmd(c: &mut Command) -> Run {
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {c:?}: {e}"))
        .into()
}

/// Runs a command and panics unless it succeeds.
fn run_ok(c: &mut Command) -> String {
    let desc = format!("{c:?}");
    let r = run_cmd(c);
    assert_eq!(r.code, 0, "{desc} failed: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// The md5 of `data` (hex), by `md5sum`.
pub fn md5_bytes(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    let mut stdin = c.stdin.take().expect("stdin");
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = c.wait_with_output().expect("md5sum");
    w.join().expect("writer").expect("write to md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Epoch seconds now (to mark phases of the capture).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

impl Lab {
    /// Sets up the namespace, bridge, tap and capture, boots the VM, writes both
    /// configurations and our backing file with its metadata. The kernel's metadata is not
    /// created yet ([`Lab::kernel_create_md`]), our daemon not started ([`Lab::start_daemon`]).
    pub fn new(spec: LabSpec) -> Lab {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let started = Instant::now();
        let cache = lab_cache();
        std::fs::create_dir_all(&cache).expect("lab cache dir");
        let lock = if std::env::var_os("DRBD_LAB_PARALLEL").is_some() {
            None
        } else {
            let f = File::create(cache.join("interop.lock")).expect("lock file");
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).expect("flock");
            Some(f)
        };
        let waited = started.elapsed();
        let started = Instant::now();
        ensure_images();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // Interface names live in the namespace, so they only need to be short; the namespace
        // name carries the pid for `ip netns` listings and the cleanup of killed runs.
        let ns = format!("drbdit-{pid}-{seq}");
        let br = format!("dib{seq}");
        let tap = format!("dit{seq}0");
        remove_stale_namespaces();
        let tmp = tempfile::Builder::new()
            .prefix("drbd-lab-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let mut lab = Lab {
            conf: dir.join("drbd.conf"),
            disk: dir.join("hostpeer.img"),
            vm_disk: dir.join("alpha.img"),
            pcap: dir.join("bridge.pcap"),
            log: dir.join("drbdd.log"),
            console: dir.join("alpha.console"),
            state_dir,
            dir,
            _tmp: Some(tmp),
            ns,
            br,
            tap,
            spec,
            bin: bin_dir(),
            vm: None,
            daemon: None,
            tcpdump: None,
            _lock: lock,
            started,
        };
        lab.note(&format!(
            "lab {} in {} (waited {:.1}s for the lab lock)",
            lab.ns,
            lab.dir.display(),
            waited.as_secs_f64()
        ));
        lab.net_up();
        lab.start_tcpdump();
        // Disks: the VM's image and ours, random or zero.
        let size = (lab.spec.disk_mib << 20) as usize;
        for (path, seed) in [(&lab.vm_disk, 0x5eed_a1fa_u64), (&lab.disk, 0x5eed_b0a7)] {
            if lab.spec.random_disks {
                std::fs::write(path, pseudo_random(size, seed ^ u64::from(pid))).expect("disk");
            } else {
                let f = File::create(path).expect("disk");
                f.set_len(size as u64).expect("disk size");
            }
        }
        lab.boot_vm();
        std::fs::write(
            &lab.conf,
            lab.config_text(&lab.spec.ours, &lab.disk.display().to_string()),
        )
        .expect("our config");
        let r = lab.adm(&["create-md", "--force", "r0"]);
        assert_eq!(r.code, 0, "our create-md: {}{}", r.stdout, r.stderr);
        lab.vm_wait();
        lab.write_kernel_conf();
        lab
    }

    fn note(&self, what: &str) {
        eprintln!("[lab {:6.2}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// A command run inside the lab's namespace.
    pub fn nsx(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    fn net_up(&self) {
        run_ok(Command::new("ip").args(["netns", "add", &self.ns]));
        let steps: [&[&str]; 7] = [
            &["ip", "link", "set", "lo", "up"],
            &[
                "ip",
                "link",
                "add",
                &self.br,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
            &[
                "ip",
                "addr",
                "add",
                &format!("{HOST_IP}/24"),
                "dev",
                &self.br,
            ],
            &["ip", "link", "set", &self.br, "up"],
            &["ip", "tuntap", "add", "dev", &self.tap, "mode", "tap"],
            &["ip", "link", "set", &self.tap, "master", &self.br],
            &["ip", "link", "set", &self.tap, "up"],
        ];
        for s in steps {
            run_ok(self.nsx(s[0]).args(&s[1..]));
        }
    }

    fn start_tcpdump(&mut self) {
        let mut c = self
            .nsx("tcpdump")
            .args([
                "-Z",
                "root",
                "-i",
                &self.br,
                "-U",
                "--immediate-mode",
                // A large kernel buffer: a full sync at TCG speed still bursts, and a dropped
                // segment makes the dissector lose the stream's packet boundaries.
                "-B",
                "32768",
                "-s",
                "0",
                "-w",
            ])
            .arg(&self.pcap)
            .arg(format!("tcp port {PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts");
        let err = c.stderr.take().expect("stderr");
        let mut reader = BufReader::new(err);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
            line.clear();
        }
        assert!(
            line.contains("listening on"),
            "tcpdump did not start: {line}"
        );
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        self.tcpdump = Some(c);
    }

    fn boot_vm(&mut self) {
        let cache = lab_cache();
        let console = File::create(&self.console).expect("console file");
        let child = self
            .nsx("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-smp",
                "1",
                "-nographic",
                "-no-reboot",
            ])
            .args(["-bios", "qboot.rom", "-kernel"])
            .arg(cache.join("vmlinux"))
            .arg("-initrd")
            .arg(cache.join("initramfs.cpio.gz"))
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 lab_host={KERNEL_NODE} lab_ip={KERNEL_IP}/24"
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                self.vm_disk.display()
            ))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                self.tap
            ))
            .args(["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:99:00:11"])
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console"))
            .stderr(console)
            .spawn()
            .expect("qemu starts");
        self.vm = Some(child);
    }

    fn vm_wait(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains("LAB-READY")) {
                self.note(&format!("VM up: {}", l.trim()));
                return;
            }
            if let Some(Ok(Some(status))) = self.vm.as_mut().map(Child::try_wait) {
                panic!("VM died ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "VM did not boot in 120 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text of a drbd.conf for `side`, with our backing file `our_disk`.
    fn config_text(&self, side: &Side, our_disk: &str) -> String {
        format!(
            "global {{ usage-count no; }}\n\
             resource r0 {{\n\
             \x20   protocol {};\n\
             \x20   net {{ cram-hmac-alg sha1; shared-secret \"{}\"; connect-int {}; {} }}\n\
             \x20   disk {{ resync-rate 100M; c-plan-ahead 0; {} }}\n\
             \x20   on {KERNEL_NODE} {{ device /dev/drbd0 minor 0; disk /dev/vda; address ipv4 {KERNEL_IP}:{PORT}; meta-disk internal; }}\n\
             \x20   on {OUR_NODE} {{ device /dev/drbd0 minor 0; disk {our_disk}; address ipv4 {HOST_IP}:{PORT}; meta-disk internal; }}\n\
             }}\n",
            self.spec.protocol, side.secret, side.connect_int, side.net_extra, self.spec.disk_extra
        )
    }

    /// (Re)writes /etc/drbd.conf in the VM from `spec.kernel`.
    pub fn write_kernel_conf(&self) {
        let text = self.config_text(&self.spec.kernel, "/dev/vda");
        self.rpc_ok(&format!(
            "cat > /etc/drbd.conf <<'__CONF__'\n{text}__CONF__\n"
        ));
    }

    /// Rewrites our configuration file from `spec.ours` (read by the daemon at `up`).
    pub fn write_our_conf(&self) {
        std::fs::write(
            &self.conf,
            self.config_text(&self.spec.ours, &self.disk.display().to_string()),
        )
        .expect("our config");
    }

    // ---------------------------------------------------------------------------------------
    // The kernel node.
    // ---------------------------------------------------------------------------------------

    /// Runs a shell script in the VM (`lib.sh`'s `rpc`), with a time limit.
    pub fn rpc_timeout(&self, script: &str, limit_s: u32) -> Run {
        let mut c = self
            .nsx("timeout")
            .arg(limit_s.to_string())
            .arg(lab_dir().join("rpc-client.sh"))
            .args([KERNEL_IP, "5000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rpc-client.sh");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("rpc script");
        c.wait_with_output().expect("rpc").into()
    }

    /// Runs a shell script in the VM.
    pub fn rpc(&self, script: &str) -> Run {
        self.rpc_timeout(script, 120)
    }

    /// Runs a shell script in the VM and asserts that it succeeds; returns its output.
    pub fn rpc_ok(&self, script: &str) -> String {
        let r = self.rpc(script);
        assert_eq!(
            r.code, 0,
            "in the VM: {script}\nfailed: {}{}",
            r.stdout, r.stderr
        );
        r.stdout
    }

    /// Builds one of the small guest programs in `tests/guest/` (C without libc, for the
    /// busybox-only guest) with the host's C compiler, and installs it in the VM as
    /// `/bin/NAME`, carried as base64 in one RPC script.
    pub fn install_guest_tool(&self, name: &str) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("guest")
            .join(format!("{name}.c"));
        let bin = self.dir.join(name);
        let out = Command::new("cc")
            .args([
                "-Os",
                "-static",
                "-nostdlib",
                "-fno-stack-protector",
                "-fno-asynchronous-unwind-tables",
                "-s",
                "-o",
            ])
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("the guest tools need a C compiler (cc)");
        assert!(
            out.status.success(),
            "cc {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let b64 = Command::new("base64")
            .arg(&bin)
            .output()
            .expect("base64 (coreutils)");
        assert!(b64.status.success(), "base64 {}", bin.display());
        let text = String::from_utf8(b64.stdout).expect("base64 is ASCII");
        self.rpc_ok(&format!(
            "base64 -d > /bin/{name} <<'B64'\n{text}B64\nchmod +x /bin/{name}"
        ));
    }

    /// `drbdmeta --force 0 v08 /dev/vda internal create-md` in the VM.
    pub fn kernel_create_md(&self) {
        self.rpc_ok("drbdmeta --force 0 v08 /dev/vda internal create-md >/tmp/cm.out 2>&1 || { cat /tmp/cm.out; exit 1; }");
    }

    /// `drbdadm-84 ARGS r0` in the VM; asserts success.
    pub fn kernel_adm(&self, args: &str) -> String {
        self.note(&format!("kernel: drbdadm-84 {args} r0"));
        self.rpc_ok(&format!("drbdadm-84 {args} r0"))
    }

    /// The kernel's `/proc/drbd`.
    pub fn proc_drbd(&self) -> String {
        self.rpc("cat /proc/drbd").stdout
    }

    /// The line of minor 0 in the kernel's `/proc/drbd` (`0: cs:... ro:... ds:...`).
    pub fn kernel_state(&self) -> String {
        self.proc_drbd()
            .lines()
            .find(|l| l.trim_start().starts_with("0:"))
            .unwrap_or("")
            .trim()
            .to_string()
    }

    /// Waits until the kernel's `/proc/drbd` matches `regex` (egrep, polled in the VM).
    pub fn kernel_wait(&self, regex: &str, limit_s: u32) {
        let script = format!(
            "i=0\nwhile ! grep -Eq '{regex}' /proc/drbd; do\n  i=$((i+1)); [ $i -gt {} ] && {{ echo \"timeout waiting for '{regex}'\"; cat /proc/drbd; exit 1; }}\n  sleep 0.05\ndone\n",
            limit_s * 20
        );
        let r = self.rpc_timeout(&script, limit_s + 30);
        if r.code != 0 {
            panic!(
                "kernel: {}{}\nours: {} {} {}",
                r.stdout,
                r.stderr,
                self.cstate(),
                self.dstate(),
                self.role()
            );
        }
    }

    /// The kernel's dmesg.
    pub fn dmesg(&self) -> String {
        self.rpc("dmesg").stdout
    }

    /// The number of dmesg lines so far (for [`Lab::dmesg_since`]).
    pub fn dmesg_mark(&self) -> usize {
        self.dmesg().lines().count()
    }

    /// The dmesg lines after `mark`.
    pub fn dmesg_since(&self, mark: usize) -> String {
        self.dmesg()
            .lines()
            .skip(mark)
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Runs `dd ... iflag=direct | md5sum` in the VM over `count` 4 KiB blocks of `dev` from
    /// block `skip`.
    pub fn kernel_md5(&self, dev: &str, skip: u64, count: u64) -> String {
        let out = self.rpc_ok(&format!(
            "set -o pipefail; dd if={dev} bs=4096 skip={skip} count={count} iflag=direct 2>/dev/null | md5sum"
        ));
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The size of the replicated data area in 4 KiB blocks, as the kernel's device says.
    pub fn kernel_data_blocks(&self) -> u64 {
        let s: u64 = self
            .rpc_ok("cat /sys/block/drbd0/size")
            .trim()
            .parse()
            .expect("/sys/block/drbd0/size");
        s / 8
    }

    // ---------------------------------------------------------------------------------------
    // Our node.
    // ---------------------------------------------------------------------------------------

    /// Starts our daemon inside the namespace and waits for its control socket.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = self
            .nsx(self.bin.join("drbdd"))
            .arg("-c")
            .arg(&self.conf)
            .args(["--node", OUR_NODE])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("drbdd starts");
        self.daemon = Some(child);
        let sock = self.state_dir.join("drbdd.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "drbdd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops our daemon with SIGTERM; returns its exit code.
    pub fn stop_daemon(&mut self) -> Option<i32> {
        let c = self.daemon.take()?;
        crate::terminate(c, || self.log())
    }

    /// Runs our `drbdadm` (inside the namespace).
    pub fn adm(&self, args: &[&str]) -> Run {
        run_cmd(
            self.nsx(self.bin.join("drbdadm"))
                .arg("-c")
                .arg(&self.conf)
                .args(["--node", OUR_NODE])
                .arg("--state-dir")
                .arg(&self.state_dir)
                .args(args),
        )
    }

    /// Runs our `drbdadm` and asserts success.
    pub fn adm_ok(&self, args: &[&str]) -> String {
        self.note(&format!("ours: drbdadm {}", args.join(" ")));
        let r = self.adm(args);
        assert_eq!(
            r.code,
            0,
            "our drbdadm {args:?} failed: {}{}\nlog:\n{}",
            r.stdout,
            r.stderr,
            self.log()
        );
        r.stdout
    }

    pub fn cstate(&self) -> String {
        self.adm(&["cstate", "r0"]).stdout.trim().to_string()
    }
    pub fn dstate(&self) -> String {
        self.adm(&["dstate", "r0"]).stdout.trim().to_string()
    }
    pub fn role(&self) -> String {
        self.adm(&["role", "r0"]).stdout.trim().to_string()
    }

    /// A counter of our `drbdadm status --statistics` (first occurrence of `name:`), KiB.
    pub fn statistic(&self, name: &str) -> u64 {
        let out = self.adm_ok(&["status", "--statistics", "r0"]);
        let key = format!("{name}:");
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in status:\n{out}"))
    }

    /// Our daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The length of our log so far (for [`Lab::log_since`]).
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// Our log after `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        self.log().get(mark..).unwrap_or_default().to_string()
    }

    /// Waits until `f` holds for our node (polling), else panics with both sides' state.
    pub fn wait_ours(&self, what: &str, limit: Duration, f: impl Fn(&Lab) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} on our node: {} {} {}\nkernel: {}\n--- our log\n{}",
                    self.cstate(),
                    self.dstate(),
                    self.role(),
                    self.kernel_state(),
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both nodes are Connected and UpToDate/UpToDate.
    pub fn wait_in_sync(&self, limit_s: u32) {
        self.kernel_wait("cs:Connected .* ds:UpToDate/UpToDate", limit_s);
        self.wait_ours(
            "Connected UpToDate/UpToDate",
            Duration::from_secs(limit_s.into()),
            |l| l.cstate() == "Connected" && l.dstate() == "UpToDate/UpToDate",
        );
    }

    /// md5 of `count` 4 KiB blocks of our backing file from block `skip`.
    pub fn our_md5(&self, skip: u64, count: u64) -> String {
        let mut f = File::open(&self.disk).expect("our disk");
        let mut buf = vec![0u8; (count * 4096) as usize];
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(skip * 4096)).expect("seek");
        f.read_exact(&mut buf).expect("read our disk");
        md5_bytes(&buf)
    }

    /// Asserts that the data areas of both backing disks are identical (the kernel's
    /// /dev/vda read with O_DIRECT in the VM, our backing file on the host).
    pub fn assert_same_data(&self) {
        let blocks = self.kernel_data_blocks();
        let k = self.kernel_md5("/dev/vda", 0, blocks);
        let o = self.our_md5(0, blocks);
        assert_eq!(
            k, o,
            "data areas ({blocks} blocks) differ: kernel /dev/vda {k}, ours {o}"
        );
        self.note(&format!("data areas identical: {blocks} blocks, md5 {k}"));
    }

    /// The NBD socket of our export.
    pub fn nbd_socket(&self) -> PathBuf {
        self.state_dir.join("r0.nbd")
    }

    // ---------------------------------------------------------------------------------------
    // End of a scenario.
    // ---------------------------------------------------------------------------------------

    /// Takes both nodes down (the kernel first), stops our daemon (expects exit code 0),
    /// stops the capture and checks it with tshark: no frame malformed, no expert warning
    /// outside TCP's own analysis. Returns the decoded DRBD packets.
    pub fn finish(&mut self) -> CaptureReport {
        let r = self.rpc("drbdadm-84 down r0");
        let _ = std::fs::write(self.dir.join("alpha.dmesg"), self.dmesg());
        assert_eq!(r.code, 0, "kernel down: {}{}", r.stdout, r.stderr);
        if self.daemon.is_some() {
            let r = self.adm(&["down", "r0"]);
            assert!(
                r.code == 0 || r.code == 10,
                "our down: {}{}\n{}",
                r.stdout,
                r.stderr,
                self.log()
            );
            let code = self.stop_daemon();
            assert_eq!(code, Some(0), "drbdd exit code\n{}", self.log());
        }
        std::thread::sleep(Duration::from_millis(200));
        self.stop_tcpdump();
        let report = check_capture(&self.pcap);
        self.note(&format!(
            "capture: {} DRBD packets, nothing malformed; {}",
            report.packets.len(),
            report.summary()
        ));
        if !report.tcp_warnings.is_empty() {
            let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
            for w in &report.tcp_warnings {
                let msg = w.split_once(": ").map_or(w.as_str(), |(_, m)| m);
                let msg = msg.split(" (drbd commands").next().unwrap_or(msg);
                *kinds.entry(msg).or_default() += 1;
            }
            self.note(&format!(
                "TCP expert warnings (not DRBD), by kind: {kinds:?}"
            ));
        }
        report
    }

    fn stop_tcpdump(&mut self) {
        if let Some(mut c) = self.tcpdump.take() {
            signal(&c, rustix::process::Signal::INT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Prints what is needed to understand a failure: the kernel's state and dmesg, our log.
    fn diagnostics(&self) {
        eprintln!(
            "===== lab {} failed; scratch dir kept: {}",
            self.ns,
            self.dir.display()
        );
        if self.vm.is_some() {
            let r = self.rpc_timeout(
                "cat /proc/drbd; echo; dmesg | grep -E 'drbd|r0' | tail -60",
                15,
            );
            eprintln!("----- kernel /proc/drbd + dmesg\n{}{}", r.stdout, r.stderr);
        }
        eprintln!("----- our log (tail)\n{}", tail(&self.log(), 80));
        eprintln!("----- capture: {}", self.pcap.display());
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn signal(c: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.diagnostics();
        }
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.vm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stop_tcpdump();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
        if failed || std::env::var_os("KEEP").is_some() {
            if let Some(t) = self._tmp.take() {
                let _ = t.keep();
            }
        } else if let Some(t) = self._tmp.take() {
            let _ = t.close();
        }
        self.note("lab torn down");
    }
}

/// Builds the lab's kernel and initramfs when missing (`lib.sh`'s `ensure_images`), under a
/// lock shared by concurrent tests.
fn ensure_images() {
    let cache = lab_cache();
    let f = File::create(cache.join("images.lock")).expect("lock file");
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let lib = lab_dir().join("lib.sh");
    let r = run_cmd(
        Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && ensure_images", lib.display()))
            .env("LAB_CACHE", &cache),
    );
    assert_eq!(r.code, 0, "lab images: {}{}", r.stdout, r.stderr);
}

/// Deletes namespaces of earlier runs that were killed (their pid is gone).
fn remove_stale_namespaces() {
    let r = run_cmd(Command::new("ip").args(["netns", "list"]));
    for line in r.stdout.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("drbdit-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Checks a capture with tshark's DRBD dissector: panics on any malformed frame or expert
/// warning/error that is not TCP's own analysis (resets of refused connection attempts,
/// retransmissions); returns the DRBD packets.
pub fn check_capture(pcap: &Path) -> CaptureReport {
    let tshark = |filter: &str, fields: &[&str]| -> Vec<Vec<String>> {
        let mut c = Command::new("tshark");
        c.arg("-r").arg(pcap).args([
            "--enable-heuristic",
            "drbd_tcp",
            // DRBD's heuristic before port-registered dissectors: an ephemeral port
            // such as 48049 (CBSP) must not claim a DRBD connection.
            "-o",
            "tcp.try_heuristic_first:TRUE",
            "-Y",
            filter,
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "aggregator=;",
        ]);
        for f in fields {
            c.args(["-e", f]);
        }
        let r = run_cmd(&mut c);
        assert_eq!(r.code, 0, "tshark -Y {filter}: {}", r.stderr);
        r.stdout
            .lines()
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    };
    // Malformed frames and expert warnings/errors (severity >= PI_WARN, 0x00600000). TCP's
    // own analysis reports in the group PI_SEQUENCE (0x02000000): resets of connection
    // attempts to a port nobody listens on yet, retransmissions; those are listed, not failed.
    const PI_WARN: u64 = 0x0060_0000;
    const PI_SEQUENCE: u64 = 0x0200_0000;
    let flagged = tshark(
        "_ws.malformed || _ws.expert.severity >= 6291456",
        &[
            "frame.number",
            "_ws.expert.message",
            "_ws.expert.severity",
            "_ws.expert.group",
            "_ws.malformed",
            "drbd.command",
        ],
    );
    let mut bad = Vec::new();
    let mut tcp_warnings = Vec::new();
    for row in flagged {
        let get = |i: usize| row.get(i).map(String::as_str).unwrap_or("");
        let list = |i: usize| get(i).split(';').map(str::to_string).collect::<Vec<_>>();
        let (messages, severities, groups) = (list(1), list(2), list(3));
        let mut tcp_only = get(4).is_empty();
        for (k, sev) in severities.iter().enumerate() {
            let sev: u64 = sev.parse().unwrap_or(u64::MAX);
            let group: u64 = groups.get(k).and_then(|g| g.parse().ok()).unwrap_or(0);
            if sev >= PI_WARN && group != PI_SEQUENCE {
                tcp_only = false;
            }
        }
        let line = format!(
            "frame {}: {} (drbd commands: {})",
            get(0),
            messages.join("; "),
            get(5)
        );
        if tcp_only {
            tcp_warnings.push(line);
        } else {
            bad.push(line);
        }
    }
    if !bad.is_empty() {
        let detail = run_cmd(Command::new("tshark").arg("-r").arg(pcap).args([
            "--enable-heuristic",
            "drbd_tcp",
            // DRBD's heuristic before port-registered dissectors: an ephemeral port
            // such as 48049 (CBSP) must not claim a DRBD connection.
            "-o",
            "tcp.try_heuristic_first:TRUE",
            "-V",
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 6291456",
        ]));
        panic!(
            "tshark flags {} frames in {}:\n{}\n--- decode:\n{}",
            bad.len(),
            pcap.display(),
            bad.join("\n"),
            tail(&detail.stdout, 300)
        );
    }
    let mut packets = Vec::new();
    for row in tshark(
        "drbd",
        &[
            "frame.number",
            "frame.time_epoch",
            "ip.src",
            "ip.dst",
            "drbd.command",
            "drbd.state",
        ],
    ) {
        let get = |i: usize| row.get(i).cloned().unwrap_or_default();
        let hex = |v: &str| u32::from_str_radix(v.trim_start_matches("0x"), 16).expect("hex");
        let cmds: Vec<u16> = get(4)
            .split(';')
            .filter(|c| !c.is_empty())
            .map(|c| hex(c) as u16)
            .collect();
        let states: Vec<u32> = get(5)
            .split(';')
            .filter(|c| !c.is_empty())
            .map(hex)
            .collect();
        // The state words belong, in order, to the packets that carry one.
        let carriers = cmds
            .iter()
            .filter(|c| {
                matches!(
                    **c,
                    cmd::P_STATE | cmd::P_STATE_CHG_REQ | cmd::P_CONN_ST_CHG_REQ
                )
            })
            .count();
        let mut states = (carriers == states.len()).then(|| states.into_iter());
        for c in cmds {
            let state = if matches!(
                c,
                cmd::P_STATE | cmd::P_STATE_CHG_REQ | cmd::P_CONN_ST_CHG_REQ
            ) {
                states.as_mut().and_then(Iterator::next)
            } else {
                None
            };
            packets.push(Packet {
                frame: get(0).parse().unwrap_or(0),
                time: get(1).parse().unwrap_or(0.0),
                src: get(2),
                dst: get(3),
                cmd: c,
                state: if c == cmd::P_STATE { state } else { None },
            });
        }
    }
    CaptureReport {
        pcap: pcap.to_path_buf(),
        packets,
        tcp_warnings,
    }
}
