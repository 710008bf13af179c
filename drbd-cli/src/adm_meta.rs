//! The metadata commands of `drbdadm` (create-md, dump-md, wipe-md, show-gi, get-gi): resolve
//! each volume of the resource from the typed model and run the metadata tool on it.

use drbd_core::config::{model, Config};

use crate::adm::{find_resource, parse_res_spec, Args, Io, E_CONFIG_INVALID, E_USAGE};
pub use crate::meta_cmd::MetaCommand;
use crate::meta_cmd::{self, MetaTarget};

pub fn cmd_meta(cfg: &Config, args: &Args, cmd: &MetaCommand, io: &mut Io) -> i32 {
    if args.resources.is_empty() {
        let _ = writeln!(
            io.stderr,
            "USAGE: drbdadm {} RESOURCE\nNo resource names specified",
            meta_name(cmd)
        );
        return E_USAGE;
    }
    let names: Vec<String> = if args.resources.iter().any(|r| r == "all") {
        cfg.resources
            .iter()
            .filter(|r| !r.ignored() && !r.stacked())
            .map(|r| r.name.clone())
            .collect()
    } else {
        args.resources.clone()
    };
    let mut rv = 0;
    for spec in &names {
        let (name, vnr) = match parse_res_spec(spec) {
            Ok(s) => (s.name, s.volume),
            Err(e) => {
                let _ = writeln!(io.stderr, "{e}");
                return E_USAGE;
            }
        };
        let Some(res) = find_resource(cfg, name) else {
            let _ = writeln!(
                io.stderr,
                "'{spec}' not defined in your config (for this host)."
            );
            return E_USAGE;
        };
        let m = match model::ResourceModel::new(cfg, &res.name) {
            Ok(m) => m,
            Err(e) => {
                let _ = writeln!(io.stderr, "{e}");
                return E_CONFIG_INVALID;
            }
        };
        if let Some(n) = vnr {
            if !m.volumes.iter().any(|v| v.vnr == n) {
                let _ = writeln!(io.stderr, "'{spec}': resource {name} has no volume {n}");
                return E_USAGE;
            }
        }
        for v in m.volumes.iter().filter(|v| vnr.is_none_or(|n| n == v.vnr)) {
            let target = MetaTarget {
                minor: v.minor,
                disk: v.disk.clone().into(),
                meta: match &v.meta {
                    model::MetaDisk::Internal => meta_cmd::MetaDisk::Internal,
                    model::MetaDisk::FlexExternal(p) => meta_cmd::MetaDisk::FlexExternal(p.into()),
                    model::MetaDisk::Indexed(p, i) => meta_cmd::MetaDisk::Indexed(p.into(), *i),
                },
            };
            if args.dry_run {
                let _ = writeln!(io.stdout, "{}", meta_cmd_line(&target, cmd));
                continue;
            }
            // Like drbdmeta, only ask for confirmation on a terminal; elsewhere the answer is no.
            let stdin: Option<&mut dyn std::io::BufRead> = if io.interactive {
                Some(&mut *io.stdin)
            } else {
                None
            };
            let code = meta_cmd::run_with(cmd, &target, io.stdout, io.stderr, stdin);
            if code != 0 {
                // drbdadm reports which low-level call failed and passes its exit code on.
                let _ = writeln!(
                    io.stderr,
                    "Command '{}' terminated with exit code {code}",
                    meta_cmd_line(&target, cmd)
                );
                rv = code;
                if code >= 20 {
                    return code;
                }
            }
        }
    }
    rv
}

fn meta_name(cmd: &MetaCommand) -> &'static str {
    match cmd {
        MetaCommand::CreateMd { .. } => "create-md",
        MetaCommand::DumpMd => "dump-md",
        MetaCommand::WipeMd { .. } => "wipe-md",
        MetaCommand::ShowGi => "show-gi",
        MetaCommand::GetGi => "get-gi",
    }
}

/// The equivalent drbdmeta invocation, as `drbdadm -d` prints it.
fn meta_cmd_line(t: &MetaTarget, cmd: &MetaCommand) -> String {
    let (dev, idx) = match &t.meta {
        meta_cmd::MetaDisk::Internal => (t.disk.display().to_string(), "internal".to_string()),
        meta_cmd::MetaDisk::FlexExternal(p) => {
            (p.display().to_string(), "flex-external".to_string())
        }
        meta_cmd::MetaDisk::Indexed(p, i) => (p.display().to_string(), i.to_string()),
    };
    let force = match cmd {
        MetaCommand::CreateMd { force: true } | MetaCommand::WipeMd { force: true } => " --force",
        _ => "",
    };
    format!(
        "drbdmeta {} v08 {dev} {idx} {}{force}",
        t.minor,
        meta_name(cmd)
    )
}
