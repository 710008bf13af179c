//! drbd.conf: the syntax tree, the parser, the canonical printer and the typed model.
//!
//! The parser accepts the grammar of drbd-utils' 8.4 front end, 8.3 spellings included
//! (`syncer { }`, `protocol` at resource level, bare booleans, `no-` flags, deprecated aliases),
//! and keeps what it read in the same shape that front end keeps it: options in input order,
//! per section. [`dump::dump_all`] prints that tree the way `drbdadm dump` prints it, and
//! [`model`] turns a resource into typed, defaulted values for the daemon.
//!
//! File access goes through [`Source`], so the parser itself does no I/O: the CLI passes a
//! file-system source, tests pass an in-memory one.

pub mod dump;
pub mod lexer;
pub mod model;
pub mod options;
pub mod parser;

use std::fmt;

pub use parser::{parse, ParseOptions};

/// Exit code drbdadm uses for an invalid configuration (`E_CONFIG_INVALID`).
pub const EXIT_CONFIG_INVALID: i32 = 10;
/// Exit code drbdadm uses for bad usage or an unknown resource (`E_USAGE`).
pub const EXIT_USAGE: i32 = 1;
/// Exit code drbdadm uses when a number cannot be read at all.
pub const EXIT_BAD_NUMBER: i32 = 20;

/// A configuration error: where, what, and the exit code drbdadm uses for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub file: String,
    pub line: u32,
    pub message: String,
    pub exit_code: i32,
}

impl ParseError {
    pub fn at(file: &str, line: u32, message: String) -> Self {
        ParseError {
            file: file.to_string(),
            line,
            message,
            exit_code: EXIT_CONFIG_INVALID,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

/// The parse failed: every error found (the first fatal one ends the parse), plus the exit code
/// of the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub errors: Vec<ParseError>,
}

impl ConfigErrors {
    /// The exit code drbdadm would end with.
    pub fn exit_code(&self) -> i32 {
        self.errors
            .first()
            .map_or(EXIT_CONFIG_INVALID, |e| e.exit_code)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Access to configuration files, so that the parser does no I/O itself.
pub trait Source {
    /// Reads a file. `dir` is the directory of the including file (relative names are looked up
    /// there), `name` the name as the include statement or glob produced it.
    fn read(&self, dir: &str, name: &str) -> std::io::Result<String>;
    /// Expands a glob pattern relative to `dir`, returning sorted names in the same form as the
    /// pattern (relative patterns give relative names).
    fn glob(&self, dir: &str, pattern: &str) -> Vec<String>;
    /// The absolute, canonical form of `name` relative to `dir` (used to read each file once and
    /// for the `# defined at` comments).
    fn canonical(&self, dir: &str, name: &str) -> String;
    /// Whether `addr` (of family `af`) is configured on this machine (for `floating` sections).
    fn is_local_address(&self, af: &str, addr: &str) -> bool;
}

/// One option as written: `name value;` (flags carry `yes`/`no`; `stacked-timeouts` has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub name: String,
    pub value: Option<String>,
    /// The value is printed as is (already a list of names), not quoted.
    pub raw: bool,
}

impl Opt {
    pub fn new(name: &str, value: &str) -> Self {
        Opt {
            name: name.to_string(),
            value: Some(value.to_string()),
            raw: false,
        }
    }
}

/// `usage-count` in the global section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageCount {
    Yes,
    No,
    #[default]
    Ask,
}

/// The `global { }` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub minor_count: u32,
    pub dialog_refresh: u32,
    pub disable_ip_verification: bool,
    pub udev_always_use_vnr: bool,
    pub usage_count: UsageCount,
    pub cmd_timeout_short: u32,
    pub cmd_timeout_medium: u32,
    pub cmd_timeout_long: u32,
}

/// Defaults of the drbdadm command time-outs (seconds).
pub const CMD_TIMEOUT_SHORT_DEF: u32 = 5;
pub const CMD_TIMEOUT_MEDIUM_DEF: u32 = 121;
pub const CMD_TIMEOUT_LONG_DEF: u32 = 600;

impl Default for Global {
    fn default() -> Self {
        // The 8.4 front end starts medium and long from other values than the defaults it
        // compares against when printing; `dump` therefore shows them whenever it prints a
        // global section, and so do we.
        Global {
            minor_count: 0,
            dialog_refresh: 1,
            disable_ip_verification: false,
            udev_always_use_vnr: false,
            usage_count: UsageCount::Ask,
            cmd_timeout_short: CMD_TIMEOUT_SHORT_DEF,
            cmd_timeout_medium: 600,
            cmd_timeout_long: 0,
        }
    }
}

/// A network endpoint: address family (`ipv4`, `ipv6`, `ssocks`, `sdp`), address and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub af: String,
    pub addr: String,
    pub port: String,
}

/// One volume: a minor, a backing disk and its meta-data location.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Volume {
    pub vnr: u32,
    /// Written as `device/disk/meta-disk` directly in the host or resource (volume 0).
    pub implicit: bool,
    pub device: Option<String>,
    pub minor: Option<u32>,
    pub disk: Option<String>,
    /// `internal` or the meta-data device.
    pub meta_disk: Option<String>,
    /// `internal`, `flexible` or an index number.
    pub meta_index: Option<String>,
    pub disk_options: Vec<Opt>,
}

/// How a host section names its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKind {
    /// `on NAME [NAME...] { }`
    On,
    /// `floating [AF] ADDR:PORT { }`: matched by local address.
    Floating,
    /// `stacked-on-top-of LOWER { }`
    Stacked {
        lower: String,
    },
    /// `_this_host { }` / `_remote_host { }` (as drbdsetup show prints).
    ThisHost,
    RemoteHost,
}

/// drbd-proxy settings of a host section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    pub on_hosts: Vec<String>,
    pub inside: Address,
    pub outside: Address,
    pub options: Vec<Opt>,
    pub plugins: Vec<Opt>,
}

/// A host section of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub kind: HostKind,
    pub on_hosts: Vec<String>,
    pub address: Option<Address>,
    pub alt_address: Option<Address>,
    pub volumes: Vec<Volume>,
    pub options: Vec<Opt>,
    pub proxy: Option<ProxyInfo>,
    pub line: u32,
}

/// A resource (or the `common` section, which has no hosts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resource {
    pub name: String,
    /// Canonical path of the file that defines it, and the line of `resource NAME {`.
    pub file: String,
    pub line: u32,
    pub hosts: Vec<Host>,
    /// Volumes written at resource level; inherited into each host section.
    pub volumes: Vec<Volume>,
    pub net: Vec<Opt>,
    pub disk: Vec<Opt>,
    pub startup: Vec<Opt>,
    pub handlers: Vec<Opt>,
    pub options: Vec<Opt>,
    pub proxy_options: Vec<Opt>,
    pub proxy_plugins: Vec<Opt>,
    pub become_primary_on: Vec<String>,
    pub stacked_timeouts: bool,
    /// Index into `hosts` of the section that describes this node (None: not for this node,
    /// "ignored" in drbdadm's words).
    pub me: Option<usize>,
    /// Index of the peer's host section, when it can be told.
    pub peer: Option<usize>,
}

impl Resource {
    /// True when this node has no host section in the resource.
    pub fn ignored(&self) -> bool {
        self.me.is_none()
    }

    /// True when this node's section is a `stacked-on-top-of` section.
    pub fn stacked(&self) -> bool {
        self.me
            .is_some_and(|i| matches!(self.hosts[i].kind, HostKind::Stacked { .. }))
    }
}

/// A whole parsed configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// Canonical path of the main file (`STDIN` for standard input).
    pub path: String,
    /// The node the configuration was resolved for.
    pub node: String,
    pub global: Global,
    pub common: Option<Resource>,
    pub resources: Vec<Resource>,
    /// Warnings that do not make the configuration invalid.
    pub warnings: Vec<ParseError>,
}

impl Config {
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

#[cfg(test)]
mod tests;
