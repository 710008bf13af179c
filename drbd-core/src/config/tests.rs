//! Parser, printer and model tests on in-memory files.

use std::collections::HashMap;

use proptest::prelude::*;

use super::model::{MetaDisk, ModelError, Protocol, ResourceModel};
use super::{dump, parse, Config, ConfigErrors, ParseOptions, Source};

/// Files in memory, all in directory `/etc`.
struct Mem(HashMap<String, String>);

impl Source for Mem {
    fn read(&self, _dir: &str, name: &str) -> std::io::Result<String> {
        let key = name.trim_start_matches("/etc/");
        self.0
            .get(key)
            .cloned()
            .ok_or_else(|| std::io::ErrorKind::NotFound.into())
    }
    fn glob(&self, _dir: &str, pattern: &str) -> Vec<String> {
        let pattern = pattern.trim_start_matches("/etc/");
        let mut v: Vec<String> = self
            .0
            .keys()
            .filter(|k| match pattern.split_once('*') {
                Some((pre, post)) => k.starts_with(pre) && k.ends_with(post),
                None => *k == pattern,
            })
            .cloned()
            .collect();
        v.sort();
        v
    }
    fn canonical(&self, _dir: &str, name: &str) -> String {
        format!("/etc/{}", name.trim_start_matches("/etc/"))
    }
    fn is_local_address(&self, _af: &str, addr: &str) -> bool {
        addr == "10.0.0.1"
    }
}

fn parse_as(node: &str, files: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let mem = Mem(files
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect());
    let main = files[0].1;
    parse(
        &mem,
        files[0].0,
        main,
        &ParseOptions {
            node: node.into(),
            interactive: false,
        },
    )
}

const DUAL_PRIMARY: &str = r#"
global { usage-count no; }
common {
  syncer { rate 1G; al-extents 127; }
  handlers { split-brain "/usr/lib/drbd/notify-split-brain.sh root"; }
}
resource r0 {
  protocol C;
  net {
    allow-two-primaries;
    cram-hmac-alg sha1;
    shared-secret "s3cret";
    after-sb-0pri discard-zero-changes;
    after-sb-1pri discard-secondary;
    after-sb-2pri disconnect;
    rr-conflict disconnect;
  }
  disk { on-io-error detach; fencing resource-and-stonith; }
  startup { become-primary-on both; }
  on alpha { device /dev/drbd0; disk /dev/sdb1; address 10.0.0.1:7788; meta-disk internal; }
  on bravo { device /dev/drbd0; disk /dev/sdb1; address 10.0.0.2:7788; meta-disk internal; }
}
"#;

#[test]
fn classic_dual_primary_resource() {
    let cfg = parse_as("alpha", &[("drbd.conf", DUAL_PRIMARY)]).unwrap();
    let r = cfg.resource("r0").unwrap();
    assert_eq!(r.me, Some(0));
    assert_eq!(r.peer, Some(1));
    assert_eq!(r.net[0].name, "protocol");
    // syncer options land in disk, renamed to their 8.4 names.
    let common = cfg.common.as_ref().unwrap();
    assert_eq!(common.disk[0].name, "resync-rate");
    assert_eq!(common.disk[0].value.as_deref(), Some("1G"));
    let m = ResourceModel::new(&cfg, "r0").unwrap();
    assert_eq!(m.protocol(), Protocol::C);
    assert!(m.flag("allow-two-primaries"));
    assert_eq!(
        m.value("after-sb-1pri").as_deref(),
        Some("discard-secondary")
    );
    // Inherited from common, converted to KiB.
    assert_eq!(m.number("resync-rate"), Some(1 << 20));
    assert_eq!(m.number("al-extents"), Some(127));
    // Defaults fill in the rest.
    assert_eq!(m.number("max-buffers"), Some(2048));
    assert_eq!(m.number("timeout"), Some(60));
    assert_eq!(m.value("on-congestion").as_deref(), Some("block"));
    assert_eq!(m.number("protocol"), None, "not numeric");
    assert_eq!(m.number("no-such-option"), None);
    assert_eq!(
        m.handler("split-brain").as_deref(),
        Some("/usr/lib/drbd/notify-split-brain.sh root")
    );
    assert_eq!(m.volumes.len(), 1);
    assert_eq!(m.volumes[0].minor, 0);
    assert_eq!(m.volumes[0].meta, MetaDisk::Internal);
    assert_eq!(m.peer_name.as_deref(), Some("bravo"));
}

#[test]
fn dump_canonical_spelling() {
    let cfg = parse_as("bravo", &[("drbd.conf", DUAL_PRIMARY)]).unwrap();
    let out = dump::dump_all(&cfg);
    assert!(out.contains("        allow-two-primaries yes;\n"), "{out}");
    assert!(
        out.contains("        address          ipv4 10.0.0.2:7788;\n"),
        "{out}"
    );
    assert!(
        out.contains("        device           /dev/drbd0 minor 0;\n"),
        "{out}"
    );
    assert!(
        out.contains("        split-brain      \"/usr/lib/drbd/notify-split-brain.sh root\";\n")
    );
    assert!(out.contains("        become-primary-on both;\n"), "{out}");
    assert!(out.contains("# resource r0 on bravo: not ignored, not stacked\n"));
    assert!(out.contains(
        "global {\n    usage-count no;\n    cmd-timeout-medium 600;\n    cmd-timeout-long 0;\n}\n"
    ));
}

#[test]
fn includes_with_globs_are_expanded_in_order() {
    let main = "include \"drbd.d/*.res\";\n";
    let a = "resource a { on x { device minor 1; disk /d1; address 10.0.0.5:1; meta-disk internal; } on y { device minor 1; disk /d1; address 10.0.0.6:1; meta-disk internal; } }";
    let b = "resource b { on x { device minor 2; disk /d2; address 10.0.0.5:2; meta-disk /dev/md [3]; } on y { device minor 2; disk /d2; address 10.0.0.6:2; meta-disk /dev/md; } }";
    let cfg = parse_as(
        "x",
        &[
            ("drbd.conf", main),
            ("drbd.d/b.res", b),
            ("drbd.d/a.res", a),
        ],
    )
    .unwrap();
    let names: Vec<&str> = cfg.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let m = ResourceModel::new(&cfg, "b").unwrap();
    assert_eq!(m.volumes[0].meta, MetaDisk::Indexed("/dev/md".into(), 3));
    let cfg = parse_as(
        "y",
        &[
            ("drbd.conf", main),
            ("drbd.d/b.res", b),
            ("drbd.d/a.res", a),
        ],
    )
    .unwrap();
    let m = ResourceModel::new(&cfg, "b").unwrap();
    assert_eq!(m.volumes[0].meta, MetaDisk::FlexExternal("/dev/md".into()));
}

fn err_of(text: &str) -> ConfigErrors {
    parse_as("alpha", &[("bad.conf", text)]).expect_err("must be rejected")
}

#[test]
fn errors_name_file_and_line() {
    let e = err_of("resource r0 {\n  net { foo-bar 1; }\n}\n");
    assert_eq!(e.exit_code(), 10);
    assert!(
        e.to_string()
            .starts_with("bad.conf:2: Parse error: 'an option keyword' expected"),
        "{e}"
    );

    let e = err_of("resource r0 {\n  net { protocol C }\n}\n");
    assert!(
        e.to_string()
            .starts_with("bad.conf:2: Parse error: ';' expected"),
        "{e}"
    );

    let e = err_of("resource r0 {\n  net { timeout 9999; }\n  on a { device minor 0; disk /d; address 1.2.3.4:5; meta-disk internal; }\n}\n");
    assert!(
        e.to_string()
            .contains("bad.conf:2: timeout 9999 => 9999 out of range [1..600]."),
        "{e}"
    );

    let e = err_of("resource r0 {\n  net { max-buffers lots; }\n}\n");
    assert_eq!(e.exit_code(), 20);
}

#[test]
fn duplicates_and_missing_address_are_rejected() {
    let host = |n: &str, minor: u32, addr: &str| {
        format!("on {n} {{ device minor {minor}; disk /d{minor}; {addr} meta-disk internal; }}")
    };
    let dup_res = format!(
        "resource r {{ {} {} }}\nresource r {{ {} {} }}",
        host("a", 0, "address 1.1.1.1:1;"),
        host("b", 0, "address 1.1.1.2:1;"),
        host("a", 1, "address 1.1.1.1:2;"),
        host("b", 1, "address 1.1.1.2:2;")
    );
    assert!(err_of(&dup_res)
        .to_string()
        .contains("conflicting use of resource section 'r'"));
    let dup_minor = format!(
        "resource r {{ {} {} }}\nresource s {{ {} {} }}",
        host("a", 0, "address 1.1.1.1:1;"),
        host("b", 0, "address 1.1.1.2:1;"),
        host("a", 0, "address 1.1.1.1:2;"),
        host("b", 3, "address 1.1.1.2:2;")
    );
    assert!(
        err_of(&dup_minor).to_string().contains("device-minor:a:0"),
        "{}",
        err_of(&dup_minor)
    );
    let no_addr = format!(
        "resource r {{ {} {} }}",
        host("a", 0, ""),
        host("b", 0, "address 1.1.1.2:1;")
    );
    assert!(err_of(&no_addr)
        .to_string()
        .contains("on a { ... }: 'address' keyword missing."));
    let unbalanced = "resource r { on a { device minor 0; }";
    assert_eq!(err_of(unbalanced).exit_code(), 10);
    let extra = format!(
        "resource r {{ {} {} }} }}",
        host("a", 0, "address 1.1.1.1:1;"),
        host("b", 0, "address 1.1.1.2:1;")
    );
    assert!(err_of(&extra).to_string().contains("Parse error"));
}

#[test]
fn model_rejects_values_drbd_cannot_use() {
    let text = DUAL_PRIMARY.replace(
        "after-sb-0pri discard-zero-changes",
        "after-sb-0pri discard-everything",
    );
    let cfg = parse_as("alpha", &[("drbd.conf", &text)]).unwrap();
    match ResourceModel::new(&cfg, "r0") {
        Err(ModelError::BadValue { option, value, .. }) => {
            assert_eq!(option, "after-sb-0pri");
            assert_eq!(value, "discard-everything");
        }
        other => panic!("expected a bad value, got {other:?}"),
    }
    let text = DUAL_PRIMARY.replace("protocol C;", "protocol A;");
    let cfg = parse_as("alpha", &[("drbd.conf", &text)]).unwrap();
    assert!(matches!(
        ResourceModel::new(&cfg, "r0"),
        Err(ModelError::Invalid { .. })
    ));
    let cfg = parse_as("charlie", &[("drbd.conf", DUAL_PRIMARY)]).unwrap();
    assert!(matches!(
        ResourceModel::new(&cfg, "r0"),
        Err(ModelError::NotOnThisNode { .. })
    ));
    assert!(matches!(
        ResourceModel::new(&cfg, "nope"),
        Err(ModelError::UnknownResource(_))
    ));
}

#[test]
fn floating_sections_match_local_addresses() {
    let text = "resource f { floating 10.0.0.1:7788 { device minor 4; disk /d; meta-disk internal; } floating 10.0.0.2:7788 { device minor 4; disk /d; meta-disk internal; } }";
    let cfg = parse_as("whatever", &[("drbd.conf", text)]).unwrap();
    let r = cfg.resource("f").unwrap();
    assert_eq!(r.me, Some(0));
    let out = dump::dump_resource(&cfg, r);
    assert!(out.contains("    floating ipv4 10.0.0.1:7788 {\n"), "{out}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary text never panics the parser.
    #[test]
    fn parser_never_panics(text in "\\PC{0,200}") {
        let _ = parse_as("alpha", &[("fuzz.conf", &text)]);
    }

    /// Token soup built from the grammar's own words never panics either, and whatever parses
    /// also dumps and re-parses.
    #[test]
    fn grammar_soup_never_panics(words in proptest::collection::vec(prop::sample::select(vec![
        "resource", "r0", "{", "}", ";", "on", "alpha", "bravo", "device", "minor", "0", "disk",
        "/dev/sdb", "meta-disk", "internal", "address", "10.0.0.1:7788", "net", "protocol", "C",
        "syncer", "rate", "10M", "volume", "1", "[", "]", "floating", "ipv6", "[::1]:1", "\"x y\"",
        "common", "global", "usage-count", "no", "startup", "become-primary-on", "both",
        "handlers", "fence-peer", "allow-two-primaries", "skip", "include", "*.conf",
    ]), 0..60)) {
        let text = words.join(" ");
        if let Ok(cfg) = parse_as("alpha", &[("soup.conf", &text)]) {
            let out = dump::dump_all(&cfg);
            let _ = parse_as("alpha", &[("again.conf", &out)]);
        }
    }
}
