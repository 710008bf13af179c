//! Two of our nodes on loopback: connection setup, handshake with and without cram-hmac,
//! keep-alive pings, the failures that end in StandAlone or in a retry, and Wireshark's view
//! of our traffic.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command as Proc, Stdio};
use std::time::Duration;

use drbd_net::capture::drbd::{analyze_file, AnalyzeOptions};
use drbd_net::handshake::{
    AuthConfig, HandshakeConfig, KeepAliveConfig, ProtocolParams, VolumeHello, FEATURES,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use drbd_net::transport::{ConnState, Connection, PeerConfig};
use drbd_net::wire::{
    Command, ConnState as WireConn, DiskState, Role, Sizes, State, SyncParam, Uuids,
};

/// Generous upper bound for anything on loopback, for slow shared CI machines.
const PATIENCE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hello() -> VolumeHello {
    VolumeHello {
        volume: 0,
        sync_param: SyncParam::default(),
        sizes: Sizes {
            d_size: 2048,
            c_size: 2048,
            max_bio_size: 1 << 20,
            ..Sizes::default()
        },
        uuids: Uuids {
            current: 4,
            ..Uuids::default()
        },
        state: State::new(
            Role::Secondary,
            Role::Unknown,
            WireConn::WfReportParams,
            DiskState::Inconsistent,
            DiskState::DUnknown,
        ),
    }
}

fn node(name: &str, local: u16, peer: u16, secret: Option<&str>) -> PeerConfig {
    PeerConfig {
        name: name.into(),
        local: SocketAddr::from(([127, 0, 0, 1], local)),
        peer: SocketAddr::from(([127, 0, 0, 1], peer)),
        handshake: HandshakeConfig {
            protocol_min: PROTOCOL_MIN,
            protocol_max: PROTOCOL_MAX,
            features: FEATURES,
            auth: secret.map(|s| AuthConfig::new("sha1", s).unwrap()),
            protocol: ProtocolParams {
                two_primaries: true,
                ..ProtocolParams::default()
            },
            volumes: vec![hello()],
        },
        keepalive: KeepAliveConfig {
            ping_int: Duration::from_millis(300),
            ping_timeout: Duration::from_millis(500),
            timeout: Duration::from_secs(6),
            ko_count: 7,
        },
        connect_int: Duration::from_millis(300),
        hello: None,
        sndbuf_size: None,
        rcvbuf_size: None,
        use_rle: true,
    }
}

fn connected_with_pings(n: u64) -> impl Fn(&ConnState) -> bool {
    move |s| matches!(s, ConnState::Connected { ping_acks, .. } if *ping_acks >= n)
}

/// Log lines of the nodes go to the test output (shown for failing tests; RUST_LOG filters).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("debug")),
        )
        .with_test_writer()
        .try_init();
}

async fn pair(
    secret_a: Option<&str>,
    secret_b: Option<&str>,
) -> (Connection, Connection, u16, u16) {
    logs();
    let (pa, pb) = (free_port(), free_port());
    let a = Connection::spawn(node("alpha", pa, pb, secret_a))
        .await
        .unwrap();
    let b = Connection::spawn(node("bravo", pb, pa, secret_b))
        .await
        .unwrap();
    (a, b, pa, pb)
}

async fn connect_and_ping(secret: Option<&str>) -> (Connection, Connection, u16, u16) {
    let (mut a, mut b, pa, pb) = pair(secret, secret).await;
    let sa = a.wait_for(PATIENCE, connected_with_pings(2)).await;
    let sb = b.wait_for(PATIENCE, connected_with_pings(2)).await;
    let (
        Some(ConnState::Connected {
            protocol_version,
            features,
            resolve_conflicts: ra,
            ..
        }),
        Some(ConnState::Connected {
            resolve_conflicts: rb,
            ..
        }),
    ) = (sa, sb)
    else {
        panic!(
            "not connected and pinging: {:?} / {:?}",
            a.state(),
            b.state()
        );
    };
    assert_eq!(protocol_version, 101);
    assert_eq!(features, FEATURES);
    assert_ne!(ra, rb, "exactly one node resolves conflicts");
    (a, b, pa, pb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_keepalive_without_auth() {
    let (a, b, ..) = connect_and_ping(None).await;
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_keepalive_with_cram_hmac() {
    let (a, b, ..) = connect_and_ping(Some("loopback-secret")).await;
    a.shutdown();
    b.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_leaves_both_standalone_with_the_reason() {
    let (mut a, mut b, ..) = pair(Some("one"), Some("two")).await;
    let standalone = |s: &ConnState| matches!(s, ConnState::StandAlone { .. });
    let sa = a
        .wait_for(PATIENCE, standalone)
        .await
        .expect("alpha gives up");
    let sb = b
        .wait_for(PATIENCE, standalone)
        .await
        .expect("bravo gives up");
    for s in [sa, sb] {
        let ConnState::StandAlone { reason } = s else {
            unreachable!()
        };
        assert!(reason.contains("authentication of peer failed"), "{reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_peer_is_detected_and_the_connection_comes_back() {
    let (mut a, b, pa, pb) = connect_and_ping(None).await;
    // The peer vanishes: its sockets close. We notice, retry, and reconnect to a new peer
    // process on the same address.
    b.shutdown();
    let back = a
        .wait_for(PATIENCE, |s| !matches!(s, ConnState::Connected { .. }))
        .await;
    assert!(back.is_some(), "loss of the peer not noticed");
    let mut b2 = Connection::spawn(node("bravo", pb, pa, None))
        .await
        .unwrap();
    assert!(
        b2.wait_for(PATIENCE, connected_with_pings(1))
            .await
            .is_some(),
        "{:?}",
        b2.state()
    );
    assert!(
        a.wait_for(PATIENCE, connected_with_pings(1))
            .await
            .is_some(),
        "{:?}",
        a.state()
    );
    a.shutdown();
    b2.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out_and_is_retried() {
    // A fake peer completes the TCP connections but never speaks: our handshake times out and
    // we retry (never StandAlone: this is a network problem, not a configuration one).
    let (pa, pb) = (free_port(), free_port());
    let silent = tokio::net::TcpListener::bind(("127.0.0.1", pb))
        .await
        .unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut a = Connection::spawn(node("alpha", pa, pb, None))
        .await
        .unwrap();
    let started = a
        .wait_for(PATIENCE, |s| matches!(s, ConnState::WfReportParams))
        .await;
    assert!(
        started.is_some(),
        "sockets never established: {:?}",
        a.state()
    );
    let retried = a
        .wait_for(PATIENCE, |s| !matches!(s, ConnState::WfReportParams))
        .await;
    assert_eq!(
        retried,
        Some(ConnState::WfConnection),
        "a silent peer must lead to a retry"
    );
    a.shutdown();
    hold.abort();
}

// ------------------------------------------------------------------------------------------
// Wireshark's view

fn have(tool: &str) -> bool {
    Proc::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {reason}"
    );
    eprintln!("SKIP: {reason}");
}

struct Capture(Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = Proc::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn tshark_fields(file: &Path, filter: &str, field: &str) -> Vec<String> {
    let out = Proc::new("tshark")
        .args(["-r"])
        .arg(file)
        .args([
            "--enable-heuristic",
            "drbd_tcp",
            // DRBD's heuristic before port-registered dissectors: an ephemeral port
            // such as 48049 (CBSP) must not claim a DRBD connection.
            "-o",
            "tcp.try_heuristic_first:TRUE",
            "-Y",
            filter,
            "-T",
            "fields",
            "-e",
            field,
        ])
        .output()
        .expect("tshark runs");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireshark_decodes_our_handshake_and_pings() {
    if !is_root() || !have("tshark") {
        return skip("needs root and tshark to capture on loopback");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("loopback.pcap");
    let (pa, pb) = (free_port(), free_port());
    // tshark captures (classic pcap, so that our own reader can check the same file).
    let mut dump = Proc::new("tshark")
        .args(["-i", "lo", "-F", "pcap", "-f"])
        .arg(format!("tcp port {pa} or tcp port {pb}"))
        .arg("-w")
        .arg(&file)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tshark starts");
    // tshark says "Capturing on ..." once the capture runs.
    {
        use std::io::BufRead;
        let err = dump.stderr.take().unwrap();
        let mut reader = std::io::BufReader::new(err);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 && !line.contains("Capturing on") {
            line.clear();
        }
        assert!(
            line.contains("Capturing on"),
            "tshark did not start capturing"
        );
        // Keep draining its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    }
    let capture = Capture(dump);
    let mut a = Connection::spawn(node("alpha", pa, pb, Some("wireshark")))
        .await
        .unwrap();
    let mut b = Connection::spawn(node("bravo", pb, pa, Some("wireshark")))
        .await
        .unwrap();
    assert!(
        a.wait_for(PATIENCE, connected_with_pings(2))
            .await
            .is_some(),
        "{:?}",
        a.state()
    );
    assert!(
        b.wait_for(PATIENCE, connected_with_pings(2))
            .await
            .is_some(),
        "{:?}",
        b.state()
    );
    a.shutdown();
    b.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(capture);

    // Every DRBD packet is decoded by Wireshark's dissector under its right name...
    let commands = tshark_fields(&file, "drbd", "drbd.command");
    let names: Vec<String> = commands
        .iter()
        .map(|c| {
            let code = u16::from_str_radix(c.trim_start_matches("0x"), 16).expect("hex command");
            Command::from_code(code).map_or(format!("unknown {c}"), |c| c.name().to_string())
        })
        .collect();
    for expected in [
        "P_INITIAL_DATA",
        "P_INITIAL_META",
        "P_CONNECTION_FEATURES",
        "P_AUTH_CHALLENGE",
        "P_AUTH_RESPONSE",
        "P_PROTOCOL",
        "P_SYNC_PARAM89",
        "P_SIZES",
        "P_UUIDS",
        "P_STATE",
        "P_PING",
        "P_PING_ACK",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "Wireshark saw no {expected}: {names:?}"
        );
    }
    // ...and nothing is malformed or flagged as an error.
    let bad = tshark_fields(
        &file,
        "_ws.malformed || _ws.expert.severity >= 8388608",
        "frame.number",
    );
    assert!(bad.is_empty(), "frames Wireshark flags: {bad:?}");

    // Our own capture reader agrees with Wireshark packet for packet.
    let ours = analyze_file(&file, AnalyzeOptions::default()).unwrap();
    assert!(ours.failures.is_empty(), "{:?}", ours.failures);
    let mut theirs_sorted = names.clone();
    theirs_sorted.sort();
    let mut ours_sorted: Vec<String> = ours
        .records
        .iter()
        .map(|r| r.decoded.packet.command().name().to_string())
        .collect();
    ours_sorted.sort();
    assert_eq!(ours_sorted, theirs_sorted);
}
