//! M1: the resident size of two real `drbdd` daemons replicating a 100 GiB sparse device
//! while fio writes T1 through the Primary's NBD export. The goal: at most 64 MiB plus the
//! bitmap (32 KiB per GiB) plus the configured buffers (`max-buffers` pages of 4 KiB).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::{drbdadm as adm, fio_write_report};

/// Device size: 100 GiB.
pub const DEVICE: u64 = 100 << 30;
/// `max-buffers` of the resource.
pub const MAX_BUFFERS: u64 = 8000;

/// What M1 measured.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Peak resident size (VmHWM) of each daemon, in bytes.
    pub peak: [u64; 2],
    /// The goal, in bytes.
    pub limit: u64,
    /// Bytes fio wrote.
    pub written: u64,
}

/// A daemon that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peak resident size of process `pid` in bytes.
fn vm_hwm(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no VmHWM".to_string())
}

/// The `drbdd` binary next to this program (the same target folder), if built.
pub fn drbdd_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    // Bench executables live in target/release/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let d = dir.join("drbdd");
    d.exists().then_some(d)
}

/// Runs M1 in a new folder under `parent`, fio writing for `time`.
pub fn measure(drbdd: &Path, parent: &Path, port: u16, time: Duration) -> Result<Memory, String> {
    let dir = tempfile::Builder::new()
        .prefix("drbd-m1-")
        .tempdir_in(parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    let d = dir.path();
    for n in ["alpha", "bravo"] {
        let f = std::fs::File::create(d.join(format!("{n}.img"))).map_err(|e| e.to_string())?;
        f.set_len(DEVICE).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(d.join(n)).map_err(|e| e.to_string())?;
    }
    let conf = d.join("drbd.conf");
    std::fs::write(
        &conf,
        format!(
            "resource r0 {{\n protocol C;\n net {{ connect-int 1; max-buffers {MAX_BUFFERS}; max-epoch-size 8000; }}\n\
             disk {{ c-plan-ahead 0; resync-rate 4194304; }}\n\
             on alpha {{ device /dev/drbd0; disk {p}/alpha.img; address 127.0.0.1:{port}; meta-disk internal; }}\n\
             on bravo {{ device /dev/drbd0; disk {p}/bravo.img; address 127.0.0.2:{port}; meta-disk internal; }}\n}}\n",
            p = d.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let args = |node: &str, rest: &[&str]| -> Vec<String> {
        let mut v = vec![
            "-c".to_string(),
            conf.display().to_string(),
            "--node".to_string(),
            node.to_string(),
            "--state-dir".to_string(),
            d.join(node).display().to_string(),
        ];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let mut daemons = Vec::new();
    for node in ["alpha", "bravo"] {
        adm(&args(node, &["create-md", "--force", "r0"]))?;
        let child = Command::new(drbdd)
            .arg("-c")
            .arg(&conf)
            .args(["--node", node, "--state-dir"])
            .arg(d.join(node))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", drbdd.display()))?;
        daemons.push(Daemon(child));
        let sock = d.join(node).join("drbdd.sock");
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{node}: drbdd did not start"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        adm(&args(node, &["up", "r0"]))?;
    }
    let t = Instant::now();
    while ["alpha", "bravo"].iter().any(|n| {
        adm(&args(n, &["cstate", "r0"]))
            .map(|s| s.trim() != "Connected")
            .unwrap_or(true)
    }) {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the daemons did not connect".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    adm(&args(
        "alpha",
        &["new-current-uuid", "--clear-bitmap", "r0"],
    ))?;
    adm(&args("alpha", &["primary", "r0"]))?;
    let uri = format!(
        "nbd+unix:///r0?socket={}",
        d.join("alpha").join("r0.nbd").display()
    );
    let report = fio_write_report(&[
        "--name=m1".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=write".to_string(),
        "--bs=1M".to_string(),
        "--iodepth=16".to_string(),
        "--size=100G".to_string(),
        "--time_based".to_string(),
        format!("--runtime={}ms", time.as_millis()),
    ])?;
    let written = report["io_bytes"].as_u64().unwrap_or(0);
    let peak = [vm_hwm(daemons[0].0.id())?, vm_hwm(daemons[1].0.id())?];
    let limit = (64 << 20) + DEVICE / (1 << 30) * (32 << 10) + MAX_BUFFERS * 4096;
    drop(daemons);
    Ok(Memory {
        peak,
        limit,
        written,
    })
}
