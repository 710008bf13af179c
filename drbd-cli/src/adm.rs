//! `drbdadm`: command-line parsing and the commands that work from the configuration alone;
//! the commands that act on running resources go to `drbdd` (`adm_daemon`).
//!
//! The command line follows drbd-utils: global options (`-c FILE`, `-d`, `-v`, ...) and command
//! options may stand anywhere, the first non-option word is the command and the rest are
//! resource names (or `all`). Exit codes are drbdadm's: 1 for usage errors and unknown
//! resources, 10 for an invalid configuration, 20 when something could not be run or opened.

use std::io::{IsTerminal, Write};

use drbd_core::config::{self, dump, Config, ParseOptions};

use crate::adm_daemon::{cmd_daemon, DaemonCommand};
use crate::adm_meta::{cmd_meta, MetaCommand};
use crate::source::FsSource;

/// Exit code for bad usage or an unknown resource.
pub const E_USAGE: i32 = 1;
/// Exit code for an invalid configuration.
pub const E_CONFIG_INVALID: i32 = 10;
/// Exit code when a file cannot be opened or a program cannot run.
pub const E_EXEC_ERROR: i32 = 20;

/// Configuration files tried in order when `-c` is not given (8.4's list).
pub const DEFAULT_CONFIGS: &[&str] = &[
    "/etc/drbd-84.conf",
    "/etc/drbd-83.conf",
    "/etc/drbd-82.conf",
    "/etc/drbd-08.conf",
    "/etc/drbd.conf",
];

/// Where `drbdd` keeps its state and its control socket when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = crate::daemon::DEFAULT_STATE_DIR;

/// Everything the command line said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    pub config: Option<String>,
    pub node: Option<String>,
    pub state_dir: Option<String>,
    pub dry_run: bool,
    pub verbose: bool,
    pub force: bool,
    /// `connect --discard-my-data`.
    pub discard_my_data: bool,
    /// `new-current-uuid --clear-bitmap`.
    pub clear_bitmap: bool,
    /// `status --statistics`.
    pub statistics: bool,
    pub command: Option<String>,
    pub resources: Vec<String>,
    pub help: bool,
    pub version: bool,
}

/// A usage error, printed with a hint and exit code 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

/// Parses the command line (without the program name).
pub fn parse_args(argv: &[String]) -> Result<Args, UsageError> {
    let mut a = Args::default();
    let mut i = 0;
    let mut only_words = false;
    while i < argv.len() {
        let arg = &argv[i];
        i += 1;
        let mut value_of = |name: &str, inline: Option<&str>| -> Result<String, UsageError> {
            if let Some(v) = inline {
                return Ok(v.to_string());
            }
            let v = argv
                .get(i)
                .cloned()
                .ok_or_else(|| UsageError(format!("option '{name}' requires an argument")))?;
            i += 1;
            Ok(v)
        };
        if only_words || !arg.starts_with('-') || arg == "-" {
            if a.command.is_none() {
                if arg == "help" {
                    a.help = true;
                } else {
                    a.command = Some(arg.clone());
                }
            } else {
                a.resources.push(arg.clone());
            }
            continue;
        }
        if arg == "--" {
            only_words = true;
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg.as_str(), None),
        };
        match name {
            "-c" | "--config-file" => a.config = Some(value_of(name, inline)?),
            "--node" => a.node = Some(value_of(name, inline)?),
            "--state-dir" => a.state_dir = Some(value_of(name, inline)?),
            "-d" | "--dry-run" => a.dry_run = true,
            "-v" | "--verbose" => a.verbose = true,
            "--force" | "-f" => a.force = true,
            "--discard-my-data" => a.discard_my_data = true,
            "--clear-bitmap" => a.clear_bitmap = true,
            "--statistics" => a.statistics = true,
            "-h" | "--help" => a.help = true,
            "-V" | "--version" => a.version = true,
            _ if name.starts_with("-c") && name.len() > 2 => a.config = Some(name[2..].to_string()),
            _ => return Err(UsageError(format!("unrecognized option '{arg}'"))),
        }
    }
    Ok(a)
}

/// The node name: `--node`, then `$DRBD_NODE`, then `$__DRBD_NODE__` (drbd-utils' own override),
/// then the kernel's host name.
pub fn node_name(args: &Args) -> String {
    resolve_node_name(args.node.as_deref())
}

/// The node name: `explicit` (from `--node`), then `$DRBD_NODE`, then `$__DRBD_NODE__`, then
/// the kernel's host name. `drbdadm` and `drbdd` resolve it the same way.
pub fn resolve_node_name(explicit: Option<&str>) -> String {
    if let Some(n) = explicit {
        return n.to_string();
    }
    for var in ["DRBD_NODE", "__DRBD_NODE__"] {
        if let Ok(n) = std::env::var(var) {
            if !n.is_empty() {
                return n;
            }
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Standard streams, injectable for tests.
pub struct Io<'a> {
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    pub stdin: &'a mut dyn std::io::BufRead,
    pub interactive: bool,
}

const USAGE: &str = "\
USAGE: drbdadm [OPTION...] COMMAND [--force] {all|RESOURCE...}

GENERAL OPTIONS:
  -c FILE, --config-file=FILE   configuration file (default: /etc/drbd.conf)
  --node=NAME                   act as node NAME (default: the host name)
  --state-dir=DIR               drbdd's state directory, with its control socket
                                DIR/drbdd.sock (default: /run/drbd-rs)
  -d, --dry-run                 print what would be done
  -v, --verbose
  -V, --version
  -h, --help

COMMANDS:
  dump          print the parsed configuration
  create-md     initialize meta data (--force: skip the confirmation)
  dump-md       print the meta data in restore-md format
  wipe-md       erase the meta data
  show-gi       show the data generation identifiers, explained
  get-gi        print the data generation identifiers
  sh-nop        check the configuration and do nothing
  sh-resources  list the resources of this node

COMMANDS (carried out by drbdd; RESOURCE may be RES/VNR where a volume makes sense):
  up                    attach and connect
  down                  disconnect, detach and remove the resource
  attach / detach       attach / detach the backing device
  connect [--discard-my-data]
  disconnect
  primary [--force]
  secondary
  role / cstate / dstate
  status [--verbose] [--statistics] [RESOURCE...]
  wait-connect          wait for the connection (startup { wfc-timeout })
  invalidate / invalidate-remote
  new-current-uuid [--clear-bitmap]
  verify                start an online verify (net { verify-alg })
  outdate               mark the local data Outdated (fence-peer handlers)
  pause-sync / resume-sync
  suspend-io / resume-io  suspend application I/O / resume it (also after fencing froze it)
";

/// Runs drbdadm with `argv` (without the program name); returns the exit code.
pub fn run(argv: &[String], io: &mut Io) -> i32 {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(UsageError(m)) => {
            let _ = writeln!(io.stderr, "drbdadm: {m}\ntry 'drbdadm help'");
            return E_USAGE;
        }
    };
    if args.version {
        let v = env!("CARGO_PKG_VERSION");
        let _ = writeln!(
            io.stdout,
            "DRBDADM_BUILDTAG=drbd-rs\\ {v}\nDRBDADM_API_VERSION=2\nDRBD_KERNEL_VERSION_CODE=0x08040b\nDRBD_KERNEL_VERSION=8.4.11\nDRBDADM_VERSION_CODE=0x080400\nDRBDADM_VERSION={v}"
        );
        return 0;
    }
    if args.help {
        let _ = write!(io.stdout, "{USAGE}");
        return 0;
    }
    let Some(command) = args.command.clone() else {
        let _ = write!(io.stdout, "{USAGE}\nNo command specified\n");
        return E_USAGE;
    };
    let meta = match command.as_str() {
        "create-md" => Some(MetaCommand::CreateMd { force: args.force }),
        "dump-md" => Some(MetaCommand::DumpMd),
        "wipe-md" => Some(MetaCommand::WipeMd { force: args.force }),
        "show-gi" => Some(MetaCommand::ShowGi),
        "get-gi" => Some(MetaCommand::GetGi),
        "dump" | "sh-nop" | "sh-resources" => None,
        other if DaemonCommand::from_name(other).is_some() => None,
        other => {
            let _ = writeln!(io.stderr, "drbdadm: Unknown command '{other}'");
            return E_USAGE;
        }
    };
    let cfg = match load_config(&args, io) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in &cfg.warnings {
        let _ = writeln!(io.stderr, "{w}");
    }
    if let Some(dc) = DaemonCommand::from_name(&command) {
        return cmd_daemon(&cfg, &args, dc, io);
    }
    let stray = [
        (args.discard_my_data, "--discard-my-data"),
        (args.clear_bitmap, "--clear-bitmap"),
        (args.statistics, "--statistics"),
    ];
    if let Some((_, opt)) = stray.iter().find(|(set, _)| *set) {
        return unrecognized_option(opt, &command, io);
    }
    match command.as_str() {
        "dump" => cmd_dump(&cfg, &args, io),
        "sh-nop" => 0,
        "sh-resources" => {
            let names: Vec<&str> = cfg
                .resources
                .iter()
                .filter(|r| !r.ignored() && !r.stacked())
                .map(|r| r.name.as_str())
                .collect();
            if !names.is_empty() {
                let _ = writeln!(io.stdout, "{}", names.join(" "));
            }
            0
        }
        _ => {
            let meta = meta.expect("meta command chosen above");
            cmd_meta(&cfg, &args, &meta, io)
        }
    }
}

/// drbdadm's answer to an option the command does not take.
pub(crate) fn unrecognized_option(opt: &str, command: &str, io: &mut Io) -> i32 {
    let _ = writeln!(
        io.stderr,
        "drbdadm: unrecognized option '{opt}'\ntry 'drbdadm help {command}'"
    );
    E_USAGE
}

/// Reads and parses the configuration named by `-c` (or the first default that exists).
fn load_config(args: &Args, io: &mut Io) -> Result<Config, i32> {
    let (file, text) = match &args.config {
        Some(f) if f == "-" => {
            let mut text = String::new();
            if let Err(e) = io.stdin.read_to_string(&mut text) {
                let _ = writeln!(io.stderr, "Can not read standard input: {e}");
                return Err(E_EXEC_ERROR);
            }
            ("STDIN".to_string(), text)
        }
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) => (f.clone(), t),
            Err(e) => {
                let _ = writeln!(io.stderr, "Can not open '{f}': {e}");
                return Err(E_EXEC_ERROR);
            }
        },
        None => {
            // The first default that exists is used; one that exists but cannot be read is
            // an error, not a reason to try the next.
            let found = DEFAULT_CONFIGS
                .iter()
                .find(|f| std::path::Path::new(f).exists());
            match found {
                Some(f) => match std::fs::read_to_string(f) {
                    Ok(t) => (f.to_string(), t),
                    Err(e) => {
                        let _ = writeln!(io.stderr, "Can not open '{f}': {e}");
                        return Err(E_CONFIG_INVALID);
                    }
                },
                None => {
                    let _ = writeln!(
                        io.stderr,
                        "Can not open '{}': no such file",
                        DEFAULT_CONFIGS[DEFAULT_CONFIGS.len() - 1]
                    );
                    return Err(E_CONFIG_INVALID);
                }
            }
        }
    };
    let opts = ParseOptions {
        node: node_name(args),
        interactive: io.interactive,
    };
    match config::parse(&FsSource, &file, &text, &opts) {
        Ok(cfg) => Ok(cfg),
        Err(errs) => {
            let _ = write!(io.stderr, "{errs}");
            Err(errs.exit_code())
        }
    }
}

/// The local address of a resource must exist on this machine (unless
/// `disable-ip-verification`). Returns the message when it does not.
fn ip_problem(cfg: &Config, r: &config::Resource) -> Option<String> {
    if cfg.global.disable_ip_verification || r.ignored() || r.stacked() {
        return None;
    }
    let me = &r.hosts[r.me?];
    let a = me.address.as_ref()?;
    // Only IP families can be checked; ssocks and sdp addresses are taken as given.
    if a.af != "ipv4" && a.af != "ipv6" {
        return None;
    }
    use drbd_core::config::Source;
    if FsSource.is_local_address(&a.af, &a.addr) {
        return None;
    }
    Some(format!(
        "{}:{}: in resource {}, on {}:\n\tIP {} not found on this host.",
        r.file,
        me.line,
        r.name,
        me.on_hosts.join(" "),
        a.addr
    ))
}

fn cmd_dump(cfg: &Config, args: &Args, io: &mut Io) -> i32 {
    let all = args.resources.is_empty() || args.resources.iter().any(|r| r == "all");
    if all {
        let problems: Vec<String> = cfg
            .resources
            .iter()
            .filter_map(|r| ip_problem(cfg, r))
            .collect();
        if !problems.is_empty() {
            for p in problems {
                let _ = writeln!(io.stderr, "{p}");
            }
            return E_CONFIG_INVALID;
        }
        let _ = write!(io.stdout, "{}", dump::dump_all(cfg));
        return 0;
    }
    for name in &args.resources {
        let spec = match parse_res_spec(name) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(io.stderr, "{e}");
                return E_USAGE;
            }
        };
        let Some(r) = find_resource(cfg, spec.name) else {
            let _ = writeln!(
                io.stderr,
                "'{name}' not defined in your config (for this host)."
            );
            return E_USAGE;
        };
        if let Some(p) = ip_problem(cfg, r) {
            let _ = writeln!(io.stderr, "{p}");
        }
        let _ = write!(io.stdout, "{}", dump::dump_resource(cfg, r));
    }
    0
}

/// A resource of this node by name, or by `minor-N` / `N`.
/// A command-line resource argument: `RES`, `RES/VNR`, `minor-N` or `N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResSpec<'a> {
    pub name: &'a str,
    /// The volume, when one was named.
    pub volume: Option<u32>,
}

/// Splits `RES/VNR`; a volume that is not a number is an error, not "all volumes".
pub(crate) fn parse_res_spec(spec: &str) -> Result<ResSpec<'_>, String> {
    match spec.split_once('/') {
        None => Ok(ResSpec {
            name: spec,
            volume: None,
        }),
        Some((name, v)) => match v.parse::<u32>() {
            Ok(n) => Ok(ResSpec {
                name,
                volume: Some(n),
            }),
            Err(_) => Err(format!("'{spec}': '{v}' is not a volume number")),
        },
    }
}

pub(crate) fn find_resource<'c>(cfg: &'c Config, name: &str) -> Option<&'c config::Resource> {
    if let Some(r) = cfg
        .resources
        .iter()
        .find(|r| r.name == name && !r.ignored())
    {
        return Some(r);
    }
    let minor: u32 = name.strip_prefix("minor-").unwrap_or(name).parse().ok()?;
    cfg.resources.iter().find(|r| {
        r.me.is_some_and(|me| r.hosts[me].volumes.iter().any(|v| v.minor == Some(minor)))
    })
}

/// Entry point of the `drbdadm` binary.
pub fn main_with_env() -> i32 {
    let mut argv = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => argv.push(s),
            Err(bad) => {
                eprintln!("drbdadm: argument {bad:?} is not valid UTF-8");
                return E_USAGE;
            }
        }
    }
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let interactive = std::io::stdin().is_terminal() && stdout.is_terminal();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut io = Io {
        stdout: &mut out,
        stderr: &mut err,
        stdin: &mut input,
        interactive,
    };
    let code = run(&argv, &mut io);
    let _ = io.stdout.flush();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_anywhere() {
        let a = parse_args(&s(&[
            "-c",
            "f.conf",
            "create-md",
            "--force",
            "r0",
            "--node=alpha",
        ]))
        .unwrap();
        assert_eq!(a.config.as_deref(), Some("f.conf"));
        assert_eq!(a.command.as_deref(), Some("create-md"));
        assert!(a.force);
        assert_eq!(a.node.as_deref(), Some("alpha"));
        assert_eq!(a.resources, s(&["r0"]));
    }

    #[test]
    fn bad_options_are_usage_errors() {
        assert!(parse_args(&s(&["--bogus", "dump"])).is_err());
        assert!(parse_args(&s(&["dump", "-c"])).is_err());
    }

    #[test]
    fn unknown_command_exits_1() {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"";
        let mut io = Io {
            stdout: &mut o,
            stderr: &mut e,
            stdin: &mut input,
            interactive: false,
        };
        assert_eq!(run(&s(&["frobnicate", "r0"]), &mut io), E_USAGE);
        assert!(String::from_utf8_lossy(&e).contains("Unknown command 'frobnicate'"));
    }
}
