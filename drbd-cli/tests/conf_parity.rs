//! `drbdadm dump` parity with drbd-utils' 8.4 front end (`/usr/lib/drbd/drbdadm-84`).
//!
//! Every configuration in `tests/corpus/good` must dump to the same text (comment lines and
//! white space aside) for several node names: one that matches no host section (every
//! resource "ignored"), `alpha` and `bravo` (each resource dumped on its own too). Every
//! configuration in `tests/corpus/bad` must be rejected with the same exit code, and our
//! message must name the file and line (the same line when drbdadm names one).
//!
//! The real drbdadm-84 is the oracle. Without it the tests say so and do nothing, except under
//! CI (`CI` set), where a missing oracle is a failure: CI installs drbd-utils.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ORACLE: &str = "/usr/lib/drbd/drbdadm-84";

fn corpus(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(kind)
}

fn confs(kind: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(corpus(kind))
        .expect("corpus directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conf"))
        .collect();
    v.sort();
    v
}

fn oracle_available() -> bool {
    if Path::new(ORACLE).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{ORACLE} is missing under CI: .ci/run must install drbd-utils"
    );
    eprintln!("SKIP: {ORACLE} not installed (apt-get install drbd-utils); parity not checked");
    false
}

fn oracle(dir: &Path, node: &str, args: &[&str]) -> Output {
    Command::new(ORACLE)
        .current_dir(dir)
        .env("DRBD_DONT_WARN_ON_VERSION_MISMATCH", "1")
        .env("__DRBD_NODE__", node)
        .args(args)
        .output()
        .expect("run drbdadm-84")
}

fn ours(dir: &Path, node: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_drbdadm"))
        .current_dir(dir)
        .arg("--node")
        .arg(node)
        .args(args)
        .output()
        .expect("run our drbdadm")
}

/// Drops comment lines and folds white space.
fn normalize(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

fn first_location(stderr: &[u8], file: &str) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(file)?.strip_prefix(':')?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        (!digits.is_empty()).then_some(digits)
    })
}

fn compare(dir: &Path, file: &str, node: &str, args: &[&str], failures: &mut Vec<String>) {
    let theirs = oracle(dir, node, args);
    let mine = ours(dir, node, args);
    let (a, b) = (normalize(&theirs.stdout), normalize(&mine.stdout));
    if theirs.status.code() != mine.status.code() || a != b {
        let first_diff = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        failures.push(format!(
            "{file} node={node} {args:?}: exit {:?} vs ours {:?}; first difference at line {first_diff}: {:?} vs {:?}\nour stderr: {}",
            theirs.status.code(),
            mine.status.code(),
            a.get(first_diff),
            b.get(first_diff),
            String::from_utf8_lossy(&mine.stderr)
        ));
    }
}

/// Resource names of this node in `file`, per our own sh-resources (compared below too).
fn resources_of(dir: &Path, file: &str, node: &str) -> Vec<String> {
    let out = ours(dir, node, &["-c", file, "sh-resources"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn corpus_is_large_enough() {
    assert!(
        confs("good").len() >= 25,
        "the parity corpus needs at least 25 configurations"
    );
    assert!(confs("bad").len() >= 10);
}

#[test]
fn good_configs_dump_like_drbdadm_84() {
    if !oracle_available() {
        return;
    }
    let dir = corpus("good");
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in confs("good") {
        // A node name that matches nothing: every resource is printed as "ignored".
        compare(
            &dir,
            &file,
            "node-without-section",
            &["-c", &file, "dump", "all"],
            &mut failures,
        );
        checked += 1;
        for node in ["alpha", "bravo"] {
            compare(
                &dir,
                &file,
                node,
                &["-c", &file, "dump", "all"],
                &mut failures,
            );
            checked += 1;
            for res in resources_of(&dir, &file, node) {
                compare(
                    &dir,
                    &file,
                    node,
                    &["-c", &file, "dump", &res],
                    &mut failures,
                );
                checked += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} dumps differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} dumps identical to drbdadm-84's");
}

#[test]
fn bad_configs_are_rejected_like_drbdadm_84() {
    if !oracle_available() {
        return;
    }
    let dir = corpus("bad");
    let mut failures = Vec::new();
    for file in confs("bad") {
        let theirs = oracle(&dir, "node-without-section", &["-c", &file, "dump", "all"]);
        let mine = ours(&dir, "node-without-section", &["-c", &file, "dump", "all"]);
        assert_ne!(
            theirs.status.code(),
            Some(0),
            "{file} is accepted by drbdadm-84: not a bad config"
        );
        if theirs.status.code() != mine.status.code() {
            failures.push(format!(
                "{file}: exit {:?}, ours {:?}: {}",
                theirs.status.code(),
                mine.status.code(),
                String::from_utf8_lossy(&mine.stderr)
            ));
            continue;
        }
        if !mine.stdout.is_empty() {
            failures.push(format!("{file}: we printed a dump for a rejected config"));
        }
        let our_line = first_location(&mine.stderr, &file);
        match (first_location(&theirs.stderr, &file), &our_line) {
            (_, None) => failures.push(format!(
                "{file}: our message does not start with {file}:LINE: {}",
                String::from_utf8_lossy(&mine.stderr)
            )),
            (Some(t), Some(o)) if &t != o => failures.push(format!(
                "{file}: drbdadm-84 reports line {t}, we report line {o}"
            )),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_configs_never_panic() {
    // Independent of the oracle: every bad config gives a clean error exit, never a crash.
    let dir = corpus("bad");
    for file in confs("bad") {
        let mine = ours(&dir, "alpha", &["-c", &file, "dump", "all"]);
        let code = mine
            .status
            .code()
            .expect("exited normally, not by a signal");
        assert!(
            code == 10 || code == 20 || code == 1,
            "{file}: exit code {code}"
        );
        let stderr = String::from_utf8_lossy(&mine.stderr);
        assert!(!stderr.contains("panicked"), "{file}: {stderr}");
    }
}

#[test]
fn dump_output_parses_back_to_the_same_dump() {
    // A dump is itself a configuration that dumps to the same text. One known exception is
    // shared with drbd-utils: a host section with `disk { options }` dumps them next to the
    // backing `disk` line, which the grammar then reads as two disk statements; drbdadm-84
    // rejects its own dump there too, and so may we.
    let dir = corpus("good");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut round_trips = 0;
    for file in confs("good") {
        let first = ours(&dir, "node-without-section", &["-c", &file, "dump", "all"]);
        assert_eq!(
            first.status.code(),
            Some(0),
            "{file}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        std::fs::write(tmp.path().join(&file), &first.stdout).expect("write dump");
        let again = ours(
            tmp.path(),
            "node-without-section",
            &["-c", &file, "dump", "all"],
        );
        if again.status.code() != Some(0) {
            let text = String::from_utf8_lossy(&first.stdout);
            let host_disk_options =
                text.contains("\n        disk {\n") || text.lines().any(|l| l == "        disk {");
            assert!(
                host_disk_options,
                "{file}: our dump does not read back: {}",
                String::from_utf8_lossy(&again.stderr)
            );
            if Path::new(ORACLE).exists() {
                let theirs = oracle(
                    tmp.path(),
                    "node-without-section",
                    &["-c", &file, "dump", "all"],
                );
                assert_ne!(
                    theirs.status.code(),
                    Some(0),
                    "{file}: drbdadm-84 reads our dump back"
                );
            }
            continue;
        }
        assert_eq!(
            normalize(&first.stdout),
            normalize(&again.stdout),
            "{file}: dump of the dump differs"
        );
        round_trips += 1;
    }
    assert!(
        round_trips >= 25,
        "only {round_trips} configurations round-trip"
    );
}
