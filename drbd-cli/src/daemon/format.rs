//! The texts `drbdadm role`, `cstate`, `dstate` and `status` print, from [`VolumeStatus`].
//!
//! * `role`: `Primary/Secondary` (local/peer; the peer is `Unknown` while not connected), one
//!   line per volume, as drbd-utils 8.4 runs `drbdsetup role MINOR` for each.
//! * `cstate`: the 8.4 connection state (`Connected`, `WFConnection`, `SyncSource`, ...).
//! * `dstate`: `UpToDate/UpToDate` (local/peer).
//! * `status`: the `drbdadm status` form of drbd-utils 8.9 and later against an 8.4 kernel:
//!
//! ```text
//! r0 role:Primary
//!   disk:UpToDate
//!   bravo role:Secondary
//!     replication:SyncSource peer-disk:Inconsistent done:42.30
//!
//! ```
//!
//! The resource line carries the role; each volume a `disk:` line (`volume:N` in front when
//! the resource has more than volume 0); the peer line says `connection:` while not connected
//! (the DRBD 9 names: `WFConnection` is `Connecting`) and `role:` once connected; the peer
//! volumes follow only while connected, with `replication:` beyond `Established`, `done:` with
//! two decimals during a resync and `resync-suspended:` when paused. `--verbose` shows every
//! field; `--statistics` adds a line of counters in KiB under each volume and peer volume,
//! including the resync rate (`dbdt1:`, MiB/s) and its estimate (`eta:`, seconds), as DRBD 9's
//! statistics show them. Each resource ends with an empty line.

use std::fmt::Write;

use drbd_core::replication::status::VolumeStatus;
use drbd_core::state::{ConnState, Role};

/// `Primary/Secondary`.
pub fn role_line(v: &VolumeStatus) -> String {
    format!("{}/{}", v.role, v.peer_role)
}

/// `Connected`.
pub fn cstate_line(v: &VolumeStatus) -> String {
    v.conn.name().to_string()
}

/// `UpToDate/UpToDate`.
pub fn dstate_line(v: &VolumeStatus) -> String {
    format!("{}/{}", v.disk, v.peer_disk)
}

/// `status` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusOptions {
    pub verbose: bool,
    pub statistics: bool,
}

/// The connection part of an 8.4 connection state, by DRBD 9's names.
pub fn connection_name(c: ConnState) -> &'static str {
    match c {
        ConnState::WfConnection => "Connecting",
        c if c >= ConnState::WfReportParams => "Connected",
        c => c.name(),
    }
}

/// The replication part of an 8.4 connection state, by DRBD 9's names.
pub fn replication_name(c: ConnState) -> &'static str {
    match c {
        ConnState::Connected => "Established",
        c if c > ConnState::Connected => c.name(),
        _ => "Off",
    }
}

/// Whether the state is a resync (or online verify) in progress, paused or not.
pub fn is_resyncing(c: ConnState) -> bool {
    matches!(
        c,
        ConnState::SyncSource
            | ConnState::SyncTarget
            | ConnState::PausedSyncS
            | ConnState::PausedSyncT
            | ConnState::VerifyS
            | ConnState::VerifyT
    )
}

/// Resync progress with two decimals (`42.30`), rounded down so that an unfinished resync
/// never shows `100.00`. From the resync's own counters, else from the out-of-sync amount.
pub fn done_percent(v: &VolumeStatus) -> String {
    let (done, total) = match &v.resync {
        Some(p) if p.total_blocks > 0 => (
            p.total_blocks.saturating_sub(p.remaining_blocks),
            p.total_blocks,
        ),
        _ => {
            let size_kib = v.size_sectors / 2;
            (size_kib.saturating_sub(v.out_of_sync_kib), size_kib)
        }
    };
    if total == 0 {
        return "100.00".to_string();
    }
    let hundredths = (u128::from(done) * 10_000 / u128::from(total)).min(10_000);
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// The `status` text of one resource (ends with an empty line).
pub fn status_text(
    resource: &str,
    peer: &str,
    vols: &[VolumeStatus],
    opts: StatusOptions,
) -> String {
    let mut out = String::new();
    let role = if vols.iter().any(|v| v.role == Role::Primary) {
        Role::Primary
    } else {
        vols.first().map_or(Role::Unknown, |v| v.role)
    };
    let suspended = vols.iter().find_map(|v| v.suspended.names());
    match (suspended, opts.verbose) {
        (Some(s), _) => {
            let _ = writeln!(out, "{resource} role:{role} suspended:{s}");
        }
        (None, true) => {
            let _ = writeln!(out, "{resource} role:{role} suspended:no");
        }
        (None, false) => {
            let _ = writeln!(out, "{resource} role:{role}");
        }
    }
    let single = vols.len() == 1 && vols[0].volume == 0;
    let show_volume = opts.verbose || !single;
    for v in vols {
        let mut f = Vec::new();
        if show_volume {
            f.push(format!("volume:{}", v.volume));
            if opts.verbose {
                f.push(format!("minor:{}", v.minor));
            }
        }
        f.push(format!("disk:{}", v.disk));
        let _ = writeln!(out, "  {}", f.join(" "));
        if opts.statistics {
            let mut s = Vec::new();
            if opts.verbose {
                s.push(format!("size:{}", v.size_sectors / 2));
            }
            s.push(format!("read:{}", v.read_kib));
            s.push(format!("written:{}", v.written_kib));
            let _ = writeln!(out, "      {}", s.join(" "));
        }
    }
    let Some(first) = vols.first() else {
        out.push('\n');
        return out;
    };
    let peer = if peer.trim().is_empty() { "peer" } else { peer };
    let connected = first.conn >= ConnState::WfReportParams;
    let mut c = vec![peer.to_string()];
    if opts.verbose || !connected {
        c.push(format!("connection:{}", connection_name(first.conn)));
    }
    if opts.verbose || connected {
        c.push(format!("role:{}", first.peer_role));
    }
    let _ = writeln!(out, "  {}", c.join(" "));
    if connected || opts.verbose || opts.statistics {
        for v in vols {
            let mut f = Vec::new();
            if show_volume {
                f.push(format!("volume:{}", v.volume));
            }
            if opts.verbose || v.conn > ConnState::Connected {
                f.push(format!("replication:{}", replication_name(v.conn)));
            }
            f.push(format!("peer-disk:{}", v.peer_disk));
            let resyncing = is_resyncing(v.conn);
            if resyncing {
                f.push(format!("done:{}", done_percent(v)));
            }
            let why: Vec<&str> = match v.resync {
                Some(p) if resyncing => [(p.paused_user, "user"), (p.paused_peer, "peer")]
                    .into_iter()
                    .filter_map(|(on, name)| on.then_some(name))
                    .collect(),
                _ => Vec::new(),
            };
            if opts.verbose || !why.is_empty() {
                f.push(format!(
                    "resync-suspended:{}",
                    if why.is_empty() {
                        "no".to_string()
                    } else {
                        why.join(",")
                    }
                ));
            }
            let _ = writeln!(out, "    {}", f.join(" "));
            if opts.statistics {
                // drbdsetup prints the out-of-sync amount even when it is 0.
                let mut s = vec![
                    format!("received:{}", v.received_kib),
                    format!("sent:{}", v.sent_kib),
                    format!("out-of-sync:{}", v.out_of_sync_kib),
                ];
                if opts.verbose {
                    s.push(format!("pending:{}", v.pending_writes));
                }
                if let (true, Some(p)) = (resyncing, v.resync) {
                    let mib_s = p.rate_kib_s as f64 / 1024.0;
                    s.push(format!("dbdt1:{mib_s:.2}"));
                    s.push(format!("eta:{}", p.eta_s));
                }
                let _ = writeln!(out, "        {}", s.join(" "));
            }
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drbd_core::replication::status::ResyncProgress;
    use drbd_core::state::DiskState;

    pub(crate) fn vol(volume: u16, conn: ConnState) -> VolumeStatus {
        let connected = conn >= ConnState::Connected;
        VolumeStatus {
            volume,
            minor: u32::from(volume),
            role: Role::Secondary,
            peer_role: if connected {
                Role::Secondary
            } else {
                Role::Unknown
            },
            conn,
            disk: DiskState::UpToDate,
            peer_disk: if connected {
                DiskState::UpToDate
            } else {
                DiskState::DUnknown
            },
            size_sectors: 2048,
            out_of_sync_kib: 0,
            resync: None,
            protocol: 'C',
            uuids: [0; 4],
            pending_writes: 0,
            written_kib: 0,
            read_kib: 0,
            sent_kib: 0,
            received_kib: 0,
            standalone_reason: None,
            suspended: Default::default(),
        }
    }

    #[test]
    fn short_forms() {
        let mut v = vol(0, ConnState::Connected);
        v.role = Role::Primary;
        assert_eq!(role_line(&v), "Primary/Secondary");
        assert_eq!(cstate_line(&v), "Connected");
        assert_eq!(dstate_line(&v), "UpToDate/UpToDate");
        let v = vol(0, ConnState::WfConnection);
        assert_eq!(role_line(&v), "Secondary/Unknown");
        assert_eq!(cstate_line(&v), "WFConnection");
        assert_eq!(dstate_line(&v), "UpToDate/DUnknown");
    }

    #[test]
    fn connected_pair() {
        let mut v = vol(0, ConnState::Connected);
        v.role = Role::Primary;
        assert_eq!(
            status_text("r0", "bravo", &[v], StatusOptions::default()),
            "r0 role:Primary\n  disk:UpToDate\n  bravo role:Secondary\n    peer-disk:UpToDate\n\n"
        );
    }

    #[test]
    fn not_connected() {
        let v = vol(0, ConnState::WfConnection);
        assert_eq!(
            status_text(
                "r0",
                "bravo",
                std::slice::from_ref(&v),
                StatusOptions::default()
            ),
            "r0 role:Secondary\n  disk:UpToDate\n  bravo connection:Connecting\n\n"
        );
        let mut v = v;
        v.conn = ConnState::StandAlone;
        v.disk = DiskState::Diskless;
        assert_eq!(
            status_text("r0", "bravo", &[v], StatusOptions::default()),
            "r0 role:Secondary\n  disk:Diskless\n  bravo connection:StandAlone\n\n"
        );
    }

    #[test]
    fn resync_progress() {
        let mut v = vol(0, ConnState::SyncSource);
        v.role = Role::Primary;
        v.peer_disk = DiskState::Inconsistent;
        v.resync = Some(ResyncProgress {
            total_blocks: 10_000,
            remaining_blocks: 5_770,
            rate_kib_s: 51_200,
            eta_s: 12,
            paused_user: false,
            paused_peer: false,
        });
        v.out_of_sync_kib = 23_080;
        assert_eq!(
            status_text("r0", "bravo", std::slice::from_ref(&v), StatusOptions::default()),
            "r0 role:Primary\n  disk:UpToDate\n  bravo role:Secondary\n    replication:SyncSource peer-disk:Inconsistent done:42.30\n\n"
        );
        let opts = StatusOptions {
            verbose: false,
            statistics: true,
        };
        assert_eq!(
            status_text("r0", "bravo", std::slice::from_ref(&v), opts),
            "r0 role:Primary\n  disk:UpToDate\n      read:0 written:0\n  bravo role:Secondary\n    replication:SyncSource peer-disk:Inconsistent done:42.30\n        received:0 sent:0 out-of-sync:23080 dbdt1:50.00 eta:12\n\n"
        );
        v.conn = ConnState::PausedSyncS;
        if let Some(p) = v.resync.as_mut() {
            p.paused_user = true;
        }
        assert!(
            status_text("r0", "bravo", &[v], StatusOptions::default()).contains(
                "replication:PausedSyncS peer-disk:Inconsistent done:42.30 resync-suspended:user\n"
            )
        );
    }

    #[test]
    fn suspended_io_on_the_resource_line() {
        let mut v = vol(0, ConnState::WfConnection);
        v.role = Role::Primary;
        v.suspended.fencing = true;
        assert!(status_text(
            "r0",
            "bravo",
            std::slice::from_ref(&v),
            StatusOptions::default()
        )
        .starts_with("r0 role:Primary suspended:fencing\n"));
        v.suspended.user = true;
        assert!(status_text("r0", "bravo", &[v], StatusOptions::default())
            .starts_with("r0 role:Primary suspended:user,fencing\n"));
    }

    #[test]
    fn several_volumes_and_verbose() {
        let a = vol(0, ConnState::Connected);
        let mut b = vol(1, ConnState::SyncTarget);
        b.disk = DiskState::Inconsistent;
        b.size_sectors = 8192;
        b.out_of_sync_kib = 1024;
        assert_eq!(
            status_text("r1", "bravo", &[a.clone(), b.clone()], StatusOptions::default()),
            "r1 role:Secondary\n  volume:0 disk:UpToDate\n  volume:1 disk:Inconsistent\n  bravo role:Secondary\n    volume:0 peer-disk:UpToDate\n    volume:1 replication:SyncTarget peer-disk:UpToDate done:75.00\n\n"
        );
        let verbose = StatusOptions {
            verbose: true,
            statistics: false,
        };
        assert_eq!(
            status_text("r1", "bravo", &[a], verbose),
            "r1 role:Secondary suspended:no\n  volume:0 minor:0 disk:UpToDate\n  bravo connection:Connected role:Secondary\n    volume:0 replication:Established peer-disk:UpToDate resync-suspended:no\n\n"
        );
    }

    #[test]
    fn done_never_claims_100_too_early() {
        let mut v = vol(0, ConnState::SyncTarget);
        v.resync = Some(ResyncProgress {
            total_blocks: 100_000,
            remaining_blocks: 1,
            rate_kib_s: 0,
            eta_s: 0,
            paused_user: false,
            paused_peer: false,
        });
        assert_eq!(done_percent(&v), "99.99");
        v.resync = None;
        v.size_sectors = 0;
        assert_eq!(done_percent(&v), "100.00");
    }

    #[test]
    fn conn_names() {
        assert_eq!(connection_name(ConnState::WfConnection), "Connecting");
        assert_eq!(connection_name(ConnState::WfReportParams), "Connected");
        assert_eq!(connection_name(ConnState::SyncSource), "Connected");
        assert_eq!(connection_name(ConnState::NetworkFailure), "NetworkFailure");
        assert_eq!(replication_name(ConnState::Connected), "Established");
        assert_eq!(replication_name(ConnState::WfReportParams), "Off");
        assert_eq!(replication_name(ConnState::WfBitMapS), "WFBitMapS");
    }
}
