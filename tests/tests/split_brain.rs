//! Split-brain policies that need more than one shared configuration or a device held
//! open, between two `drbdd`: discard-local / discard-remote (each node names the victim
//! from its own side), rr-conflict (a Primary that would become SyncTarget),
//! call-pri-lost-after-sb (the losing Primary demotes, or runs its handler when it cannot),
//! and the after-sb-2pri policies with both nodes Primary.

use std::time::Duration;

use tests::{stamped_block, NbdClient, Pair};

const SYNC: Duration = Duration::from_secs(30);

/// Whether node `i` holds bravo's block 201 from the split (so alpha's data was discarded
/// where they differ).
fn has_bravos_write(p: &Pair, i: usize) -> bool {
    p.data(i, 202 * 4096)[201 * 4096..] == stamped_block(201, 11)[..]
}

fn same_data(p: &Pair) -> bool {
    p.data(0, 300 * 4096) == p.data(1, 300 * 4096)
}

/// A handler body that writes `$DRBD_RESOURCE` into `file`.
fn mark(p: &Pair, file: &str) -> String {
    format!("echo \"$DRBD_RESOURCE\" > {}", p.file(file).display())
}

fn marked(p: &Pair, file: &str) -> bool {
    std::fs::read_to_string(p.file(file)).is_ok_and(|s| s.trim() == "r0")
}

#[test]
fn discard_local_and_discard_remote_name_the_same_victim_from_both_sides() {
    for (k, (alpha_policy, bravo_policy, victim)) in [
        ("discard-local", "discard-remote", 0usize),
        ("discard-remote", "discard-local", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = Pair::on_port(7920 + k as u16, "");
        for (i, policy) in [(0, alpha_policy), (1, bravo_policy)] {
            p.set_node_conf(i, |c| {
                c.replacen(
                    "connect-int 1;",
                    &format!("connect-int 1; after-sb-0pri {policy};"),
                    1,
                )
            });
        }
        p.split_and_reconnect(2, 2, &[0, 1]);
        p.wait_in_sync(SYNC);
        assert!(
            p.log(victim)
                .contains("(this node's changes there are discarded)"),
            "alpha {alpha_policy}: node {victim} should lose:\n{}",
            p.log(victim)
        );
        assert!(!p
            .log(1 - victim)
            .contains("(this node's changes there are discarded)"));
        assert!(same_data(&p), "alpha {alpha_policy}");
        assert_eq!(has_bravos_write(&p, 0), victim == 0, "alpha {alpha_policy}");
    }
}

/// alpha stays Primary through the split without writing, bravo (promoted meanwhile)
/// writes and demotes: after-sb-1pri violently-as0p with after-sb-0pri discard-zero-changes
/// makes alpha the SyncTarget although it is Primary, and rr-conflict decides.
#[test]
fn rr_conflict_decides_for_a_primary_that_would_become_sync_target() {
    for (k, rr) in ["disconnect", "call-pri-lost", "violently"]
        .into_iter()
        .enumerate()
    {
        let net = format!(
            "after-sb-0pri discard-zero-changes; after-sb-1pri violently-as0p; rr-conflict {rr};"
        );
        let mut p = Pair::on_port(7925 + k as u16, &net);
        let body = mark(&p, "pri-lost");
        p.set_handlers(0, &[("pri-lost", &body)]);
        p.split_and_reconnect(0, 2, &[1]);
        if rr == "violently" {
            p.wait_in_sync(SYNC);
            assert_eq!(p.role(0), "Primary/Secondary");
            assert!(has_bravos_write(&p, 0), "alpha did not take bravo's data");
            assert!(same_data(&p));
            assert!(!marked(&p, "pri-lost"));
            continue;
        }
        p.wait_until("alpha StandAlone", SYNC, |p| p.cstate(0) == "StandAlone");
        assert!(
            p.log(0)
                .contains("I shall become SyncTarget, but I am primary"),
            "{}",
            p.log(0)
        );
        assert_eq!(p.role(0), "Primary/Unknown");
        assert!(!has_bravos_write(&p, 0), "alpha's data was overwritten");
        if rr == "call-pri-lost" {
            p.wait_until("pri-lost handler", SYNC, |p| marked(p, "pri-lost"));
        } else {
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !marked(&p, "pri-lost"),
                "pri-lost ran for rr-conflict disconnect"
            );
        }
    }
}

/// after-sb-1pri call-pri-lost-after-sb: the Primary whose data the after-sb-0pri policy
/// discards gives up its role and becomes SyncTarget; held open by a client it cannot, so
/// the pri-lost-after-sb handler runs and the split brain stays unresolved.
#[test]
fn call_pri_lost_after_sb_demotes_the_loser_or_runs_its_handler() {
    let net = "after-sb-0pri discard-zero-changes; after-sb-1pri call-pri-lost-after-sb;";

    let mut p = Pair::on_port(7928, net);
    let body = mark(&p, "pri-lost-after-sb");
    p.set_handlers(0, &[("pri-lost-after-sb", &body)]);
    p.split_and_reconnect(0, 2, &[1]);
    p.wait_in_sync(SYNC);
    assert_eq!(p.role(0), "Secondary/Secondary");
    assert!(
        p.log(0).contains("Successfully gave up primary role."),
        "{}",
        p.log(0)
    );
    assert!(has_bravos_write(&p, 0));
    assert!(same_data(&p));
    assert!(!marked(&p, "pri-lost-after-sb"));

    // The same split, but a client holds alpha's device open.
    let mut p = Pair::on_port(7929, net);
    let body = mark(&p, "pri-lost-after-sb");
    p.set_handlers(0, &[("pri-lost-after-sb", &body)]);
    p.up_and_sync();
    for i in [1, 0] {
        p.adm_ok(i, &["disconnect", "r0"]);
    }
    p.adm_ok(1, &["primary", "r0"]);
    {
        let mut c = NbdClient::connect(&p.nbd_socket(1), "r0").expect("connect");
        for b in 200..202 {
            c.write(4096 * b, &stamped_block(b, 11)).expect("write");
        }
        c.flush().expect("flush");
    }
    p.adm_ok(1, &["secondary", "r0"]);
    let _held = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect");
    // A device held open is not demoted by hand either.
    p.adm_refused(
        0,
        &["secondary", "r0"],
        11,
        "(-12) Device is held open by someone",
    );
    for i in 0..2 {
        p.adm_ok(i, &["connect", "r0"]);
    }
    p.wait_until("pri-lost-after-sb handler", SYNC, |p| {
        marked(p, "pri-lost-after-sb")
    });
    p.wait_until("alpha StandAlone", SYNC, |p| p.cstate(0) == "StandAlone");
    assert!(
        p.log(0)
            .contains("Split-Brain detected but unresolved, dropping connection"),
        "{}",
        p.log(0)
    );
    assert_eq!(p.role(0), "Primary/Unknown");
    assert!(!has_bravos_write(&p, 0));
}

/// Both nodes stay Primary through the split (allow-two-primaries): after-sb-2pri
/// violently-as0p and call-pri-lost-after-sb resolve it by the after-sb-0pri decision (alpha,
/// with no changes, loses), disconnect leaves both StandAlone with the split-brain handler
/// run.
#[test]
fn after_sb_2pri_policies_with_both_nodes_primary() {
    for (k, policy) in ["violently-as0p", "call-pri-lost-after-sb", "disconnect"]
        .into_iter()
        .enumerate()
    {
        let net = format!(
            "allow-two-primaries yes; after-sb-0pri discard-zero-changes; after-sb-2pri {policy}; rr-conflict violently;"
        );
        let mut p = Pair::on_port(7930 + k as u16, &net);
        let body = mark(&p, "split-brain");
        p.set_handlers(0, &[("split-brain", &body)]);
        p.split_and_reconnect(0, 2, &[]);
        match policy {
            "violently-as0p" => {
                p.wait_in_sync(SYNC);
                assert_eq!(p.role(0), "Primary/Primary");
                assert!(has_bravos_write(&p, 0));
                assert!(same_data(&p));
            }
            "call-pri-lost-after-sb" => {
                p.wait_in_sync(SYNC);
                assert_eq!(p.role(0), "Secondary/Primary");
                assert!(has_bravos_write(&p, 0));
                assert!(same_data(&p));
            }
            _ => {
                p.wait_until("both StandAlone", SYNC, |p| {
                    p.cstate(0) == "StandAlone" && p.cstate(1) == "StandAlone"
                });
                p.wait_until("split-brain handler", SYNC, |p| marked(p, "split-brain"));
                assert!(!has_bravos_write(&p, 0));
            }
        }
        assert!(!marked(&p, "split-brain") || policy == "disconnect");
    }
}
