//! The `drbdadm` commands that act on running resources (`up`, `down`, `primary`, `role`,
//! `status`, ...): checked against the configuration here, carried out by `drbdd` over its
//! control socket.
//!
//! drbd-utils' `drbdadm` runs `drbdsetup` for these; `drbdd` answers as `drbdsetup` would
//! (text and exit code) and this side adds what `drbdadm` itself prints: the
//! `Command 'drbdsetup-84 primary 0' terminated with exit code 17` line after a failure, and
//! with `-d` the `drbdsetup` calls instead of running anything. `wait-connect` polls the
//! connection state every 100 ms until it is `Connected` (or a resync state), for at most
//! `startup { wfc-timeout }` seconds (0: forever), and ends with exit code 5 on timeout.

use std::time::{Duration, Instant};

use drbd_core::config::model::{MetaDisk, ResourceModel};
use drbd_core::config::{Address, Config};
use drbd_core::state::ConnState;

use crate::adm::{
    find_resource, parse_res_spec, unrecognized_option, Args, Io, E_CONFIG_INVALID, E_EXEC_ERROR,
    E_USAGE,
};
use crate::daemon::control::{self, Client, Command, Options, Request};

/// How often `wait-connect` asks for the connection state.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// `drbdsetup wait-connect`'s exit code on timeout.
const E_TIMEOUT: i32 = 5;
/// The low-level tool drbdadm 8.4 names in its messages.
const SETUP: &str = "drbdsetup-84";

/// A drbdadm command carried out by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DaemonCommand {
    Remote(Command),
    WaitConnect,
}

impl DaemonCommand {
    pub(crate) fn from_name(name: &str) -> Option<DaemonCommand> {
        match name {
            "wait-connect" => Some(DaemonCommand::WaitConnect),
            // The deprecated alias drbd-utils still accepts.
            "state" => Some(DaemonCommand::Remote(Command::Role)),
            other => Command::from_name(other).map(DaemonCommand::Remote),
        }
    }

    fn name(self) -> &'static str {
        match self {
            DaemonCommand::Remote(c) => c.name(),
            DaemonCommand::WaitConnect => "wait-connect",
        }
    }
}

/// One resource (or one volume of it) to act on.
struct Target {
    model: ResourceModel,
    volume: Option<u32>,
}

impl Target {
    fn name(&self) -> &str {
        &self.model.name
    }

    /// The minors the command applies to, as drbdadm iterates them.
    fn minors(&self) -> Vec<u32> {
        self.model
            .volumes
            .iter()
            .filter(|v| self.volume.is_none_or(|n| n == v.vnr))
            .map(|v| v.minor)
            .collect()
    }
}

pub(crate) fn cmd_daemon(cfg: &Config, args: &Args, cmd: DaemonCommand, io: &mut Io) -> i32 {
    let name = cmd.name();
    let takes = |c: Command| cmd == DaemonCommand::Remote(c);
    let stray = [
        (args.force && !takes(Command::Primary), "--force"),
        (
            args.discard_my_data && !takes(Command::Connect),
            "--discard-my-data",
        ),
        (
            args.clear_bitmap && !takes(Command::NewCurrentUuid),
            "--clear-bitmap",
        ),
        (args.statistics && !takes(Command::Status), "--statistics"),
    ];
    if let Some((_, opt)) = stray.iter().find(|(bad, _)| *bad) {
        return unrecognized_option(opt, name, io);
    }
    let targets = match resolve_targets(cfg, args, cmd) {
        Ok(t) => t,
        Err((code, msg)) => {
            let _ = writeln!(io.stderr, "{msg}");
            return code;
        }
    };
    if args.dry_run {
        let mut lines: Vec<String> = targets
            .iter()
            .flat_map(|t| setup_lines(cmd, t, args))
            .collect();
        if cmd == DaemonCommand::Remote(Command::Up) {
            // drbdadm runs `up` in stages over all resources: create every resource and minor,
            // then attach every disk, then connect.
            let (attach, connect) = (format!("{SETUP} attach "), format!("{SETUP} connect "));
            let stage = |l: &String| {
                if l.starts_with(&attach) {
                    1
                } else if l.starts_with(&connect) {
                    2
                } else {
                    0
                }
            };
            lines.sort_by_key(stage);
        }
        for line in lines {
            let _ = writeln!(io.stdout, "{line}");
        }
        return 0;
    }
    let state_dir = args
        .state_dir
        .as_deref()
        .unwrap_or(crate::adm::DEFAULT_STATE_DIR);
    let socket = control::socket_path(std::path::Path::new(state_dir));
    let mut client = match Client::connect(&socket) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(io.stderr, "{e}");
            return E_EXEC_ERROR;
        }
    };
    let options = Options {
        force: args.force,
        discard_my_data: args.discard_my_data,
        clear_bitmap: args.clear_bitmap,
        verbose: args.verbose,
        statistics: args.statistics,
    };
    let mut rv = 0;
    for t in &targets {
        let code = match cmd {
            DaemonCommand::Remote(c) => {
                let req = Request {
                    command: c,
                    resource: Some(t.name().to_string()),
                    volume: t.volume,
                    options,
                    node: Some(cfg.node.clone()),
                };
                match client.call(&req) {
                    Ok(resp) => {
                        let _ = io.stdout.write_all(resp.stdout.as_bytes());
                        let _ = io.stderr.write_all(resp.stderr.as_bytes());
                        if resp.exit_code != 0 {
                            // `up` is several drbdsetup calls; the daemon's message says which
                            // part failed.
                            if c != Command::Up {
                                if let Some(line) = setup_lines(cmd, t, args).first() {
                                    let _ = writeln!(
                                        io.stderr,
                                        "Command '{line}' terminated with exit code {}",
                                        resp.exit_code
                                    );
                                }
                            }
                        }
                        resp.exit_code
                    }
                    Err(e) => {
                        let _ = writeln!(io.stderr, "drbdadm: {e}");
                        E_EXEC_ERROR
                    }
                }
            }
            DaemonCommand::WaitConnect => wait_connect(&mut client, cfg, t, io),
        };
        if code != 0 {
            rv = code;
            // As drbdadm: a resource that fails does not stop the others, unless the failure
            // is one of running things at all.
            if code >= E_EXEC_ERROR {
                return code;
            }
        }
    }
    let _ = io.stdout.flush();
    rv
}

/// The resources (and volumes) named on the command line, checked against the configuration
/// before anything is sent: an unknown name stops the command before it acts on any resource.
fn resolve_targets(
    cfg: &Config,
    args: &Args,
    cmd: DaemonCommand,
) -> Result<Vec<Target>, (i32, String)> {
    let name = cmd.name();
    let mine = || {
        cfg.resources
            .iter()
            .filter(|r| !r.ignored() && !r.stacked())
            .map(|r| r.name.clone())
    };
    // (name, named on the command line rather than through `all`)
    let specs: Vec<(String, bool)> = if args.resources.is_empty() {
        if cmd != DaemonCommand::Remote(Command::Status) {
            return Err((
                E_USAGE,
                format!(
                    "USAGE: drbdadm {name} [OPTION...] {{all|RESOURCE...}}\nNo resource names specified"
                ),
            ));
        }
        mine().map(|n| (n, false)).collect()
    } else {
        let mut v = Vec::new();
        for r in &args.resources {
            if r == "all" {
                v.extend(mine().map(|n| (n, false)));
            } else {
                v.push((r.clone(), true));
            }
        }
        v
    };
    let whole = match cmd {
        DaemonCommand::Remote(c) => c.whole_resource(),
        DaemonCommand::WaitConnect => false,
    };
    let mut targets = Vec::new();
    for (spec, named) in &specs {
        let rs = parse_res_spec(spec).map_err(|e| (E_USAGE, e))?;
        let not_defined = || {
            (
                E_USAGE,
                format!("'{spec}' not defined in your config (for this host)."),
            )
        };
        let res = find_resource(cfg, rs.name).ok_or_else(not_defined)?;
        let model =
            ResourceModel::new(cfg, &res.name).map_err(|e| (E_CONFIG_INVALID, e.to_string()))?;
        let mut volume = rs.volume;
        if res.name != rs.name && volume.is_none() {
            // `minor-N` names one volume.
            let minor: Option<u32> = rs
                .name
                .strip_prefix("minor-")
                .unwrap_or(rs.name)
                .parse()
                .ok();
            volume = model
                .volumes
                .iter()
                .find(|v| Some(v.minor) == minor)
                .map(|v| v.vnr);
        }
        if let Some(n) = volume {
            if !model.volumes.iter().any(|v| v.vnr == n) {
                return Err(not_defined());
            }
        }
        if *named
            && volume.is_none()
            && cmd == DaemonCommand::Remote(Command::NewCurrentUuid)
            && model.volumes.len() > 1
        {
            return Err((
                E_USAGE,
                format!(
                    "{name} requires a specific volume id, but none is specified.\n\
                     Try '{name} minor-<minor_number>' or '{name} {}/<vnr>'",
                    model.name
                ),
            ));
        }
        if volume.is_some() && whole {
            return Err((
                E_USAGE,
                format!("{name} operates on whole resources, but you specified a specific volume!"),
            ));
        }
        targets.push(Target { model, volume });
    }
    Ok(targets)
}

/// `ipv4:10.0.0.1:7789`, `ipv6:[fd00::1]:7789`, as drbdsetup takes addresses.
fn setup_address(a: &Address) -> String {
    if a.af == "ipv6" {
        format!("{}:[{}]:{}", a.af, a.addr, a.port)
    } else {
        format!("{}:{}:{}", a.af, a.addr, a.port)
    }
}

/// The drbdsetup calls drbd-utils' drbdadm makes for the command (`drbdadm -d` prints them),
/// one per minor for the per-device commands.
fn setup_lines(cmd: DaemonCommand, t: &Target, args: &Args) -> Vec<String> {
    let res = t.name();
    let per_minor = |what: &str, suffix: &str| -> Vec<String> {
        t.minors()
            .into_iter()
            .map(|m| format!("{SETUP} {what} {m}{suffix}"))
            .collect()
    };
    let addresses = match (&t.model.address, &t.model.peer_address) {
        (Some(a), Some(p)) => Some(format!("{} {}", setup_address(a), setup_address(p))),
        _ => None,
    };
    let connect = |discard: bool| {
        let flag = if discard { " --discard-my-data" } else { "" };
        match &addresses {
            Some(a) => format!("{SETUP} connect {res} {a}{flag}"),
            None => format!("{SETUP} connect {res}{flag}"),
        }
    };
    let attach = || -> Vec<String> {
        t.model
            .volumes
            .iter()
            .filter(|v| t.volume.is_none_or(|n| n == v.vnr))
            .map(|v| {
                let (dev, idx) = match &v.meta {
                    MetaDisk::Internal => (v.disk.clone(), "internal".to_string()),
                    MetaDisk::FlexExternal(p) => (p.clone(), "flexible".to_string()),
                    MetaDisk::Indexed(p, i) => (p.clone(), i.to_string()),
                };
                format!("{SETUP} attach {} {} {dev} {idx}", v.minor, v.disk)
            })
            .collect()
    };
    let c = match cmd {
        DaemonCommand::WaitConnect => {
            let explicit = t.model.startup.iter().any(|o| o.name == "wfc-timeout");
            let suffix = match (explicit, t.model.number("wfc-timeout")) {
                (true, Some(n)) => format!(" --wfc-timeout={n}"),
                _ => String::new(),
            };
            return per_minor("wait-connect", &suffix);
        }
        DaemonCommand::Remote(c) => c,
    };
    match c {
        Command::Up => {
            let mut v = vec![format!("{SETUP} new-resource {res}")];
            for vol in t
                .model
                .volumes
                .iter()
                .filter(|v| t.volume.is_none_or(|n| n == v.vnr))
            {
                v.push(format!("{SETUP} new-minor {res} {} {}", vol.minor, vol.vnr));
            }
            v.extend(attach());
            v.push(connect(false));
            v
        }
        Command::Down | Command::Status => vec![format!("{SETUP} {c} {res}")],
        Command::Attach => attach(),
        Command::Connect => vec![connect(args.discard_my_data)],
        Command::Disconnect => vec![match &addresses {
            Some(a) => format!("{SETUP} disconnect {a}"),
            None => format!("{SETUP} disconnect {res}"),
        }],
        Command::Primary => per_minor("primary", if args.force { " --force" } else { "" }),
        Command::NewCurrentUuid => per_minor(
            "new-current-uuid",
            if args.clear_bitmap {
                " --clear-bitmap"
            } else {
                ""
            },
        ),
        Command::Detach
        | Command::Secondary
        | Command::Invalidate
        | Command::InvalidateRemote
        | Command::Verify
        | Command::Outdate
        | Command::PauseSync
        | Command::ResumeSync
        | Command::SuspendIo
        | Command::ResumeIo
        | Command::Role
        | Command::Cstate
        | Command::Dstate => per_minor(c.name(), ""),
    }
}

/// The connection state a `cstate` answer names.
fn parse_cstate(line: &str) -> Option<ConnState> {
    (0..=u8::MAX)
        .map_while(ConnState::from_wire)
        .find(|c| c.name() == line.trim())
}

/// `wait-connect` on one resource: each selected volume in turn, as drbdadm runs
/// `drbdsetup wait-connect MINOR` for each.
fn wait_connect(client: &mut Client, cfg: &Config, t: &Target, io: &mut Io) -> i32 {
    let timeout_s = t.model.number("wfc-timeout").unwrap_or(0);
    let explicit = t.model.startup.iter().any(|o| o.name == "wfc-timeout");
    for vol in t
        .model
        .volumes
        .iter()
        .filter(|v| t.volume.is_none_or(|n| n == v.vnr))
    {
        let line = if explicit {
            format!(
                "{SETUP} wait-connect {} --wfc-timeout={timeout_s}",
                vol.minor
            )
        } else {
            format!("{SETUP} wait-connect {}", vol.minor)
        };
        let deadline = (timeout_s > 0).then(|| Instant::now() + Duration::from_secs(timeout_s));
        let req = Request {
            command: Command::Cstate,
            resource: Some(t.name().to_string()),
            volume: Some(vol.vnr),
            options: Options::default(),
            node: Some(cfg.node.clone()),
        };
        let code = loop {
            let resp = match client.call(&req) {
                Ok(r) => r,
                Err(e) => {
                    let _ = writeln!(io.stderr, "drbdadm: {e}");
                    return E_EXEC_ERROR;
                }
            };
            if resp.exit_code != 0 {
                let _ = io.stderr.write_all(resp.stderr.as_bytes());
                break resp.exit_code;
            }
            let first = resp.stdout.lines().next().unwrap_or("");
            let Some(state) = parse_cstate(first) else {
                let _ = writeln!(
                    io.stderr,
                    "drbdadm: unexpected connection state from drbdd: '{first}'"
                );
                break E_EXEC_ERROR;
            };
            // Connected, or beyond: resync, verify, Ahead/Behind.
            if state >= ConnState::Connected {
                break 0;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break E_TIMEOUT;
            }
            std::thread::sleep(WAIT_POLL);
        };
        if code != 0 {
            // The first volume that fails ends the wait for this resource.
            let _ = writeln!(
                io.stderr,
                "Command '{line}' terminated with exit code {code}"
            );
            return code;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cstate_names_parse() {
        assert_eq!(parse_cstate("Connected"), Some(ConnState::Connected));
        assert_eq!(
            parse_cstate("WFConnection\n"),
            Some(ConnState::WfConnection)
        );
        assert_eq!(parse_cstate("Behind"), Some(ConnState::Behind));
        assert_eq!(parse_cstate("Unconfigured"), None);
        assert_eq!(parse_cstate(""), None);
    }

    #[test]
    fn command_names() {
        assert_eq!(
            DaemonCommand::from_name("state"),
            Some(DaemonCommand::Remote(Command::Role))
        );
        assert_eq!(
            DaemonCommand::from_name("wait-connect"),
            Some(DaemonCommand::WaitConnect)
        );
        assert_eq!(DaemonCommand::from_name("dump"), None);
    }
}
