//! Test support shared by the drbdmeta parity tests: root and tool checks, the SKIP/CI rule,
//! serialisation, sparse files and loop devices.
//!
//! Without root, `losetup` with working loop devices or `drbdmeta`, a test prints
//! `SKIP: <test>: <reason>` and passes, except under CI (`CI` set), where it fails.
#![allow(dead_code)] // each test binary uses its own subset

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

const MIB: u64 = 1 << 20;

pub struct Env {
    pub drbdmeta: PathBuf,
    pub losetup: PathBuf,
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn probe_env() -> Result<Env, String> {
    if !is_root() {
        return Err("not running as root (loop devices need root)".into());
    }
    let drbdmeta = find_tool("drbdmeta").ok_or("drbdmeta (drbd-utils) not installed")?;
    let losetup = find_tool("losetup").ok_or("losetup not installed")?;
    let env = Env { drbdmeta, losetup };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = sparse(dir.path(), "probe.img", MIB);
    let dev = attach_loop(&env, &file).map_err(|e| format!("cannot attach a loop device: {e}"))?;
    drop(dev);
    Ok(env)
}

/// Serialises the tests and checks the environment once.
pub fn setup(test: &str) -> Option<(MutexGuard<'static, ()>, &'static Env)> {
    static SERIAL: Mutex<()> = Mutex::new(());
    static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    match ENV.get_or_init(probe_env) {
        Ok(env) => Some((guard, env)),
        Err(reason) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: cannot run under CI: {reason}"
            );
            let _ = writeln!(std::io::stderr(), "SKIP: {test}: {reason}");
            None
        }
    }
}

pub fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// A loop device, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
    pub losetup: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(&self.losetup)
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

pub fn attach_loop(env: &Env, file: &Path) -> Result<Loop, String> {
    let out = Command::new(&env.losetup)
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Loop {
        dev: PathBuf::from(dev),
        losetup: env.losetup.clone(),
    })
}
