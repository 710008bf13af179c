//! The file-system side of configuration reading: files, include globs, canonical paths and
//! local addresses, behind drbd-core's [`Source`] trait.

use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};

use drbd_core::config::Source;

/// Reads configuration files from the local file system.
pub struct FsSource;

fn join(dir: &str, name: &str) -> PathBuf {
    if name.starts_with('/') {
        PathBuf::from(name)
    } else {
        Path::new(dir).join(name)
    }
}

impl Source for FsSource {
    fn read(&self, dir: &str, name: &str) -> std::io::Result<String> {
        std::fs::read_to_string(join(dir, name))
    }

    fn glob(&self, dir: &str, pattern: &str) -> Vec<String> {
        let full = join(dir, pattern);
        let Some(full) = full.to_str() else {
            return Vec::new();
        };
        let Ok(paths) = glob::glob(full) else {
            return Vec::new();
        };
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut out: Vec<String> = paths
            .filter_map(Result::ok)
            .filter_map(|p| p.to_str().map(str::to_string))
            .map(|p| {
                // Relative patterns give names relative to the including file's directory,
                // as a glob run from that directory would.
                if pattern.starts_with('/') {
                    p
                } else {
                    p.strip_prefix(&prefix).map(str::to_string).unwrap_or(p)
                }
            })
            .collect();
        out.sort();
        out
    }

    fn canonical(&self, dir: &str, name: &str) -> String {
        let p = join(dir, name);
        std::fs::canonicalize(&p)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    }

    fn is_local_address(&self, _af: &str, addr: &str) -> bool {
        let addr = addr.split('%').next().unwrap_or(addr);
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return false;
        };
        // The addresses configured on an interface, as drbdadm checks them: 127.0.0.2 is
        // reachable locally but is not an interface address.
        if let Some(local) = interface_addresses() {
            return local.contains(&ip);
        }
        // Without /proc, binding tells whether the address is local at all.
        UdpSocket::bind((ip, 0)).is_ok()
    }
}

/// Interface addresses from /proc: IPv4 host routes marked LOCAL in the FIB, and the IPv6
/// addresses of every interface. None when /proc is not available.
fn interface_addresses() -> Option<Vec<IpAddr>> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let mut out = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in trie.lines() {
        let t = line.trim_start_matches([' ', '|', '+', '-']);
        if let Ok(ip) = t.trim().parse::<IpAddr>() {
            last = Some(ip);
        } else if t.contains("/32 host LOCAL") {
            if let Some(ip) = last {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in v6.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            // 32 hex digits; anything else (including non-ASCII text) is not an address line.
            if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            let mut bytes = [0u8; 16];
            let ok = (0..16).all(|i| {
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .map(|b| bytes[i] = b)
                    .is_ok()
            });
            if ok {
                out.push(IpAddr::from(bytes));
            }
        }
    }
    Some(out)
}
