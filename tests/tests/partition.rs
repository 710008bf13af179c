//! The two-node test in two network namespaces joined by a veth pair, with an nftables rule
//! in alpha's namespace cutting the link for a while: the Primary goes on acknowledging
//! writes once it has declared the connection lost, records them in its bitmap, and after
//! the link heals a resync brings bravo up to date with every acknowledged write.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tests::{have, is_root, skip_unless, stamped_block, NbdClient, Pair, PairSpec};

/// Blocks (4 KiB) the writer spreads its writes over: 32 MiB, eight activity-log extents.
const BLOCKS: u64 = 8192;
/// Step between consecutive blocks of the writer (odd, so it visits every block).
const STRIDE: u64 = 2741;
/// The name of the nftables table that cuts the link.
const CUT_TABLE: &str = "drbdcut";

/// Connection states of a node that lost its connection and keeps trying to get it back
/// (StandAlone would never heal).
const DISCONNECTED: [&str; 6] = [
    "Unconnected",
    "Timeout",
    "BrokenPipe",
    "NetworkFailure",
    "TearDown",
    "WFConnection",
];

/// Runs a command, panicking with its output unless it succeeds.
fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two network namespaces joined by a veth pair with addresses `10.231.<x>.1/24` (in the
/// first) and `.2/24` (in the second). Dropping it deletes both namespaces, and with them the
/// veth pair and any nftables ruleset inside (the daemons running in them must be stopped
/// first: declare the guard before the [`Pair`]).
struct NetnsPair {
    names: [String; 2],
    addrs: [String; 2],
}

impl NetnsPair {
    fn new() -> NetnsPair {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{seq}");
        // Each namespace has its own addresses, so the subnet only has to be unique within
        // this pair; taking it from the pid keeps concurrent runs apart in `ip` listings.
        let x = (pid as u64 * 7 + u64::from(seq)) % 250 + 1;
        let guard = NetnsPair {
            names: [format!("drbdA-{tag}"), format!("drbdB-{tag}")],
            addrs: [format!("10.231.{x}.1"), format!("10.231.{x}.2")],
        };
        for ns in &guard.names {
            // A namespace of this name can only be a leftover of a killed run whose pid was
            // reused.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh("ip", &["netns", "add", ns]);
        }
        // From here on, Drop cleans up whatever the following steps leave behind.
        let [a, b] = &guard.names;
        // The veth ends are created directly inside the namespaces: no name in the host's.
        sh(
            "ip",
            &[
                "link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth0",
                "netns", b,
            ],
        );
        for (ns, addr) in guard.names.iter().zip(&guard.addrs) {
            sh(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "veth0",
                ],
            );
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
            sh("ip", &["-n", ns, "link", "set", "veth0", "up"]);
        }
        guard
    }

    /// Runs a command inside namespace `i`.
    fn exec(&self, i: usize, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.names[i]];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Cuts the link: in namespace `i`, drops every TCP packet to and from the other node's
    /// address, counting them.
    fn cut(&self, i: usize, dir: &std::path::Path) {
        let peer = &self.addrs[1 - i];
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             \x20   chain out {{ type filter hook output priority 0; policy accept;\n\
             \x20       ip daddr {peer} meta l4proto tcp counter drop\n    }}\n\
             \x20   chain in {{ type filter hook input priority 0; policy accept;\n\
             \x20       ip saddr {peer} meta l4proto tcp counter drop\n    }}\n\
             }}\n"
        );
        let file = dir.join("cut.nft");
        std::fs::write(&file, rules).expect("write nft ruleset");
        self.exec(i, &["nft", "-f", file.to_str().expect("utf-8 path")]);
    }

    /// Packets dropped so far by the `out` and `in` chains of the cut in namespace `i`.
    fn dropped(&self, i: usize) -> (u64, u64) {
        let listing = self.exec(i, &["nft", "list", "table", "inet", CUT_TABLE]);
        let mut counts = listing.lines().filter(|l| l.contains("drop")).map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|&x| x == "packets")
                .and_then(|k| w.get(k + 1))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no packet counter in {l:?}:\n{listing}"))
        });
        let out = counts
            .next()
            .unwrap_or_else(|| panic!("no rule:\n{listing}"));
        let inp = counts
            .next()
            .unwrap_or_else(|| panic!("no rule:\n{listing}"));
        (out, inp)
    }

    /// Heals the link cut in namespace `i`.
    fn heal(&self, i: usize) {
        self.exec(i, &["nft", "delete", "table", "inet", CUT_TABLE]);
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A thread writing stamped 4 KiB blocks through alpha's NBD export, one at a time, until told
/// to stop. Block `(n * STRIDE) % BLOCKS` gets generation `n`.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    /// Why the writer stopped early, if it did.
    failed: Arc<Mutex<Option<String>>>,
    thread: JoinHandle<Option<BTreeMap<u64, u64>>>,
}

impl Writer {
    fn start(p: &Pair) -> Writer {
        let mut c = NbdClient::connect(&p.nbd_socket(0), "r0").expect("connect to alpha");
        assert!(c.size >= BLOCKS * 4096, "export of {} bytes", c.size);
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (s, a, f) = (stop.clone(), acked.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let fail = |why: String| {
                *f.lock().expect("not poisoned") = Some(why);
                None
            };
            // Block -> generation of its last acknowledged write.
            let mut last = BTreeMap::new();
            let mut n = 1u64;
            while !s.load(Ordering::Relaxed) {
                let block = (n * STRIDE) % BLOCKS;
                if let Err(e) = c.write(block * 4096, &stamped_block(block, n)) {
                    return fail(format!("write #{n} (block {block}) failed: {e:?}"));
                }
                last.insert(block, n);
                a.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            if let Err(e) = c.flush() {
                return fail(format!("the final flush failed: {e:?}"));
            }
            Some(last)
        });
        Writer {
            stop,
            acked,
            failed,
            thread,
        }
    }

    /// Writes acknowledged so far.
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `more` further writes have been acknowledged (the writer must not have
    /// failed meanwhile).
    fn wait_for_more(&self, p: &Pair, more: u64, what: &str) {
        let target = self.acked() + more;
        p.wait_until(what, Duration::from_secs(60), |p| {
            if let Some(e) = self.failed.lock().expect("not poisoned").as_ref() {
                panic!(
                    "{e} (waiting for {what})\n--- alpha log\n{}\n--- bravo log\n{}",
                    p.log(0),
                    p.log(1)
                );
            }
            self.acked() >= target
        });
    }

    /// Stops the writer; returns block -> generation of its last acknowledged write.
    fn finish(self) -> BTreeMap<u64, u64> {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.thread.join().expect("writer thread");
        last.unwrap_or_else(|| {
            panic!(
                "{}",
                self.failed
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .unwrap_or_default()
            )
        })
    }
}

/// Every acknowledged write is on both disks, and the two data areas are identical.
fn check_disks(p: &Pair, last: &BTreeMap<u64, u64>) {
    let a = p.data(0, BLOCKS * 4096);
    let b = p.data(1, BLOCKS * 4096);
    for (&block, &generation) in last {
        let want = stamped_block(block, generation);
        let at = (block * 4096) as usize..(block * 4096 + 4096) as usize;
        assert!(
            a[at.clone()] == want[..],
            "alpha's block {block} lacks write #{generation}"
        );
        assert!(
            b[at] == want[..],
            "bravo's block {block} lacks acknowledged write #{generation}"
        );
    }
    let size = NbdClient::connect(&p.nbd_socket(0), "r0")
        .expect("connect to alpha")
        .size;
    assert!(
        p.data(0, size) == p.data(1, size),
        "the data areas of the two replicas differ"
    );
}

/// Sets up the namespaces and the pair, synced, with alpha Primary. None: skipped.
fn partitioned_pair() -> Option<(NetnsPair, Pair)> {
    if skip_unless(
        is_root() && have("ip") && have("nft"),
        "needs root, ip (iproute2) and nft (nftables) for network namespaces",
    ) {
        return None;
    }
    let ns = NetnsPair::new();
    let addresses = ns.addrs.clone().map(|a| format!("{a}:7789"));
    let mut p = Pair::new(PairSpec {
        addresses: [&addresses[0], &addresses[1]],
        netns: [Some(&ns.names[0]), Some(&ns.names[1])],
        ..PairSpec::default()
    });
    p.up_and_sync();
    Some((ns, p))
}

/// Cuts the link while `w` writes, checks that alpha declares the connection lost and goes on
/// acknowledging writes into its bitmap, and checks the cut really dropped packets both ways.
fn cut_and_write(ns: &NetnsPair, p: &Pair, w: &Writer) {
    w.wait_for_more(p, 200, "writes while connected");
    assert_eq!(p.cstate(0), "Connected");
    ns.cut(0, p.dir.path());
    p.wait_until(
        "alpha to declare the connection lost",
        Duration::from_secs(30),
        |p| p.cstate(0) != "Connected",
    );
    w.wait_for_more(p, 300, "writes acknowledged after the connection was lost");
    // Both sides have noticed by now and keep trying to connect, in vain.
    p.wait_until(
        "both nodes without a connection",
        Duration::from_secs(30),
        |p| (0..2).all(|i| DISCONNECTED.contains(&p.cstate(i).as_str())),
    );
    let cstate = p.cstate(0);
    assert!(
        DISCONNECTED.contains(&cstate.as_str()),
        "alpha's cstate {cstate}"
    );
    assert_eq!(p.dstate(0), "UpToDate/DUnknown");
    assert_eq!(p.role(0), "Primary/Unknown");
    let oos = p.statistic(0, "out-of-sync");
    assert!(
        oos > 0,
        "no out-of-sync blocks on alpha after writes during the cut"
    );
    // The rule is in place and drops traffic in both directions: alpha's packets to bravo
    // (pings, data, connection attempts) and bravo's connection attempts to alpha.
    p.wait_until(
        "the cut to drop packets both ways",
        Duration::from_secs(30),
        |_| {
            let (out, inp) = ns.dropped(0);
            out > 0 && inp > 0
        },
    );
    w.wait_for_more(p, 100, "writes while the link is cut");
    let (out, inp) = ns.dropped(0);
    eprintln!(
        "cut: alpha {cstate}, {} writes acknowledged, out-of-sync {oos} KiB before and {} KiB \
         now, {out} packets dropped out and {inp} in",
        w.acked(),
        p.statistic(0, "out-of-sync"),
    );
    assert!(DISCONNECTED.contains(&p.cstate(0).as_str()));
    assert!(p.statistic(0, "out-of-sync") >= oos);
    assert!(
        p.log(0).contains("connection lost") || p.log(0).contains("dropping connection"),
        "alpha's log does not say the connection was lost:\n{}",
        p.log(0)
    );
}

#[test]
fn writes_go_on_through_a_partition_and_the_heal_resyncs_them() {
    let Some((ns, p)) = partitioned_pair() else {
        return;
    };
    let w = Writer::start(&p);
    cut_and_write(&ns, &p, &w);
    let last = w.finish();
    // Nothing writes any more: the bitmap holds exactly what the resync must move.
    let oos = p.statistic(0, "out-of-sync");
    let received_before = p.statistic(1, "received");
    let log_before = p.log(1).len();
    ns.heal(0);
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(p.statistic(0, "out-of-sync"), 0);
    assert_eq!(p.role(0), "Primary/Secondary");
    let received = p.statistic(1, "received") - received_before;
    assert_eq!(
        received, oos,
        "the resync moved {received} KiB, alpha had {oos} KiB out of sync"
    );
    let log = p.log(1)[log_before..].to_string();
    assert!(
        log.contains(&format!("resync started as SyncTarget: {oos} KiB"))
            && log.contains("resync done (SyncTarget)"),
        "bravo's log since the heal:\n{log}"
    );
    check_disks(&p, &last);
}

#[test]
fn writes_go_on_while_the_healed_link_resyncs() {
    let Some((ns, p)) = partitioned_pair() else {
        return;
    };
    let w = Writer::start(&p);
    cut_and_write(&ns, &p, &w);
    // Heal while writing: the writes race with the reconnect and the resync.
    ns.heal(0);
    p.wait_until("alpha reconnected", Duration::from_secs(60), |p| {
        matches!(
            p.cstate(0).as_str(),
            "WFBitMapS" | "SyncSource" | "PausedSyncS" | "Connected"
        )
    });
    w.wait_for_more(&p, 300, "writes after the heal");
    let last = w.finish();
    p.wait_in_sync(Duration::from_secs(60));
    assert_eq!(p.statistic(0, "out-of-sync"), 0);
    check_disks(&p, &last);
}
