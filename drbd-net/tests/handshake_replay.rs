//! Replays one kernel node's side of a captured handshake against our handshake machine and
//! checks that we answer exactly as the other kernel node did.
//!
//! `01-handshake.pcap.gz` holds two in-kernel DRBD 8.4.11 nodes connecting with cram-hmac sha1
//! (secret `drbdlab-secret`). We take the place of one node: its parameters come from what it
//! sent, its "random" challenge is the one it sent, and the other node's packets are fed in
//! capture order. Every packet we send must then be byte-identical to what the kernel sent,
//! authentication response included, and the peer's answer to our challenge must verify.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use drbd_net::capture::drbd::{analyze_file, AnalyzeOptions, DrbdRecord};
use drbd_net::handshake::{
    AuthConfig, Handshake, HandshakeConfig, HmacAlg, Progress, ProtocolParams, VolumeHello,
    CF_DISCARD_MY_DATA, FEATURES, PROTOCOL_MAX, PROTOCOL_MIN,
};
use drbd_net::wire::{self, Command, Packet};

fn captures_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/captures");
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "shared captures missing under CI: {}",
        dir.display()
    );
    eprintln!("SKIP: shared captures not found at {}", dir.display());
    None
}

/// The data-socket records of the capture's handshake, split by sender.
fn data_stream(file: &str) -> Option<Vec<DrbdRecord>> {
    let path = captures_dir()?.join(file);
    let a = analyze_file(&path, AnalyzeOptions::default()).expect("capture reads");
    assert!(a.failures.is_empty(), "{:?}", a.failures);
    let features = a
        .records
        .iter()
        .find(|r| r.decoded.packet.command() == Command::ConnectionFeatures)
        .expect("a features packet");
    let stream = features.stream;
    Some(
        a.records
            .into_iter()
            .filter(|r| r.stream == stream)
            .collect(),
    )
}

/// What a node sent during its handshake: everything up to and including its first P_STATE.
fn handshake_part(records: &[DrbdRecord], sender: &str) -> Vec<DrbdRecord> {
    let mut out = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.direction.to_string().starts_with(sender))
    {
        let cmd = r.decoded.packet.command();
        if cmd == Command::InitialData {
            continue;
        }
        out.push(r.clone());
        if cmd == Command::State {
            break;
        }
    }
    out
}

/// Our configuration, as the node that sent `sent` was configured.
fn config_of(sent: &[DrbdRecord]) -> (HandshakeConfig, [u8; 64]) {
    let mut challenge = [0u8; 64];
    let mut protocol = None;
    let mut sync = None;
    let mut sizes = None;
    let mut uuids = None;
    let mut state = None;
    for r in sent {
        match &r.decoded.packet {
            Packet::AuthChallenge(c) => challenge.copy_from_slice(c),
            Packet::Protocol(p) => {
                protocol = Some(ProtocolParams {
                    wire_protocol: p.protocol,
                    after_sb_0p: p.after_sb_0p,
                    after_sb_1p: p.after_sb_1p,
                    after_sb_2p: p.after_sb_2p,
                    two_primaries: p.two_primaries != 0,
                    discard_my_data: p.conn_flags & CF_DISCARD_MY_DATA != 0,
                    integrity_alg: p.integrity_alg.clone(),
                })
            }
            Packet::SyncParam89(s) => sync = Some(s.clone()),
            Packet::Sizes(s) => sizes = Some(*s),
            Packet::Uuids(u) => uuids = Some(*u),
            Packet::State(s) => state = Some(*s),
            _ => {}
        }
    }
    let cfg = HandshakeConfig {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        features: FEATURES,
        auth: Some(AuthConfig {
            alg: HmacAlg::Sha1,
            secret: b"drbdlab-secret".to_vec(),
        }),
        protocol: protocol.expect("P_PROTOCOL"),
        volumes: vec![VolumeHello {
            volume: 0,
            sync_param: sync.expect("P_SYNC_PARAM89"),
            sizes: sizes.expect("P_SIZES"),
            uuids: uuids.expect("P_UUIDS"),
            state: state.expect("P_STATE"),
        }],
    };
    (cfg, challenge)
}

fn replay_as(sender: &str, peer: &str) {
    let Some(records) = data_stream("01-handshake.pcap.gz") else {
        return;
    };
    let ours_expected = handshake_part(&records, sender);
    let theirs = handshake_part(&records, peer);
    assert!(
        ours_expected.len() >= 8,
        "{sender} sent {} handshake packets",
        ours_expected.len()
    );
    let (cfg, challenge) = config_of(&ours_expected);
    let mut hs = Handshake::new(cfg, challenge);
    let mut sent = Vec::new();
    let mut done = false;
    let drain = |hs: &mut Handshake, sent: &mut Vec<Vec<u8>>| {
        while let Some(f) = hs.poll_transmit() {
            let mut buf = BytesMut::new();
            wire::encode(&f, &hs.context(), &mut buf).expect("encodes");
            sent.push(buf.to_vec());
        }
    };
    drain(&mut hs, &mut sent);
    for r in &theirs {
        match hs.on_frame(r.decoded.clone()) {
            Ok(Progress::Established(peer_hello)) => {
                assert_eq!(peer_hello.protocol_version, 101);
                assert_eq!(peer_hello.features, 0xf);
                done = true;
            }
            Ok(_) => {}
            Err(e) => panic!(
                "our handshake failed on the kernel's {}: {e}",
                r.decoded.packet.command().name()
            ),
        }
        drain(&mut hs, &mut sent);
    }
    assert!(done, "handshake did not complete");
    let expected: Vec<Vec<u8>> = ours_expected.iter().map(|r| r.raw.to_vec()).collect();
    let names = |v: &[DrbdRecord]| {
        v.iter()
            .map(|r| r.decoded.packet.command().name())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sent.len(),
        expected.len(),
        "packet sequence differs; the kernel sent {:?}",
        names(&ours_expected)
    );
    for (i, (ours, kernel)) in sent.iter().zip(&expected).enumerate() {
        assert_eq!(
            ours,
            kernel,
            "packet {i} ({}) differs from the kernel's",
            ours_expected[i].decoded.packet.command().name()
        );
    }
}

#[test]
fn we_answer_as_the_connecting_kernel_node_did() {
    // bravo connected (its data socket is the one it opened).
    replay_as("10.99.0.12", "10.99.0.11");
}

#[test]
fn we_answer_as_the_accepting_kernel_node_did() {
    replay_as("10.99.0.11", "10.99.0.12");
}

#[test]
fn a_wrong_secret_is_detected_against_the_kernels_response() {
    let Some(records) = data_stream("01-handshake.pcap.gz") else {
        return;
    };
    let ours = handshake_part(&records, "10.99.0.12");
    let theirs = handshake_part(&records, "10.99.0.11");
    let (mut cfg, challenge) = config_of(&ours);
    cfg.auth.as_mut().unwrap().secret = b"not-the-secret".to_vec();
    let mut hs = Handshake::new(cfg, challenge);
    let err = theirs
        .iter()
        .find_map(|r| hs.on_frame(r.decoded.clone()).err())
        .expect("the kernel's response must not verify with another secret");
    assert_eq!(err.to_string(), "authentication of peer failed");
    assert!(!err.retry());
}
