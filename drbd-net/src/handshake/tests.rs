//! Two handshake machines talking to each other through the real codec.

use bytes::BytesMut;

use super::*;
use crate::wire::{Decoder, QueueLimits};

fn volume(current_uuid: u64) -> VolumeHello {
    VolumeHello {
        volume: 0,
        sync_param: SyncParam::default(),
        sizes: Sizes {
            d_size: 32688,
            u_size: 0,
            c_size: 32688,
            max_bio_size: 1 << 20,
            queue_order_type: 0,
            dds_flags: 0,
            queue_limits: Some(QueueLimits::default()),
        },
        uuids: Uuids {
            current: current_uuid,
            bitmap: 0,
            history: [0, 0],
            dirty_bits: 0,
            flags: 0,
        },
        state: State::default(),
    }
}

fn config(secret: Option<&str>) -> HandshakeConfig {
    HandshakeConfig {
        protocol_min: PROTOCOL_MIN,
        protocol_max: PROTOCOL_MAX,
        features: FEATURES,
        auth: secret.map(|s| AuthConfig {
            alg: HmacAlg::Sha1,
            secret: s.as_bytes().to_vec(),
        }),
        protocol: ProtocolParams {
            two_primaries: true,
            ..ProtocolParams::default()
        },
        volumes: vec![volume(4)],
    }
}

/// Moves frames between the two machines through encode/decode until both are quiet.
/// Returns each side's result.
fn run(
    a: &mut Handshake,
    b: &mut Handshake,
) -> (
    Result<Option<PeerHello>, HandshakeError>,
    Result<Option<PeerHello>, HandshakeError>,
) {
    let mut res = [Ok(None), Ok(None)];
    let mut decoders = [
        Decoder::new(WireContext::default()),
        Decoder::new(WireContext::default()),
    ];
    for _ in 0..100 {
        let mut moved = false;
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            let (src, dst) = if from == 0 {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            while let Some(frame) = src.poll_transmit() {
                moved = true;
                let mut buf = BytesMut::new();
                wire::encode(&frame, &src.context(), &mut buf).expect("encodes");
                let decoded = decoders[to]
                    .decode(&mut buf)
                    .expect("decodes")
                    .expect("complete");
                assert!(buf.is_empty());
                assert_eq!(decoded, frame, "codec round trip");
                if res[to].as_ref().is_ok_and(|r| r.is_none()) && !dst.is_failed() {
                    match dst.on_frame(decoded) {
                        Ok(Progress::Agreed(ctx)) => decoders[to].set_context(ctx),
                        Ok(Progress::Established(p)) => res[to] = Ok(Some(*p)),
                        Ok(Progress::Continue) => {}
                        Err(e) => res[to] = Err(e),
                    }
                }
            }
        }
        if !moved {
            break;
        }
    }
    let [x, y] = res;
    (x, y)
}

#[test]
fn handshake_with_and_without_cram_hmac() {
    for secret in [None, Some("s3cret")] {
        let mut a = Handshake::new(config(secret), [1; 64]);
        let mut b = Handshake::new(config(secret), [2; 64]);
        let (ra, rb) = run(&mut a, &mut b);
        let (pa, pb) = (ra.unwrap().expect("a done"), rb.unwrap().expect("b done"));
        assert_eq!(pa.protocol_version, 101);
        assert_eq!(pa.features, 0xf);
        assert!(pa.protocol.two_primaries && pb.protocol.two_primaries);
        assert_eq!(pa.volumes[0].uuids.current, 4);
        assert_eq!(a.context().protocol_version, 101);
    }
}

#[test]
fn every_hmac_algorithm_authenticates() {
    for alg in [HmacAlg::Sha1, HmacAlg::Sha256, HmacAlg::Sha512] {
        let mut ca = config(Some("k"));
        ca.auth.as_mut().unwrap().alg = alg;
        let cb = ca.clone();
        let (ra, rb) = run(
            &mut Handshake::new(ca, [3; 64]),
            &mut Handshake::new(cb, [4; 64]),
        );
        assert!(ra.unwrap().is_some() && rb.unwrap().is_some(), "{alg:?}");
    }
}

#[test]
fn wrong_secret_is_refused_by_both_without_retry() {
    let mut a = Handshake::new(config(Some("right")), [1; 64]);
    let mut b = Handshake::new(config(Some("wrong")), [2; 64]);
    let (ra, rb) = run(&mut a, &mut b);
    assert_eq!(ra.unwrap_err(), HandshakeError::AuthFailed);
    assert_eq!(rb.unwrap_err(), HandshakeError::AuthFailed);
    assert!(!HandshakeError::AuthFailed.retry());
}

#[test]
fn reflected_challenge_is_refused() {
    let mut a = Handshake::new(config(Some("k")), [7; 64]);
    let mut b = Handshake::new(config(Some("k")), [7; 64]);
    let (ra, _) = run(&mut a, &mut b);
    assert_eq!(ra.unwrap_err(), HandshakeError::ReflectedChallenge);
}

#[test]
fn auth_on_one_side_only_fails() {
    let (ra, rb) = run(
        &mut Handshake::new(config(Some("k")), [1; 64]),
        &mut Handshake::new(config(None), [2; 64]),
    );
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::AuthUnexpected { .. }
    ));
    assert_eq!(rb.unwrap_err(), HandshakeError::AuthNotConfigured);
    assert!(!HandshakeError::AuthNotConfigured.retry());
}

#[test]
fn incompatible_versions_and_settings_are_refused() {
    let mut old = config(None);
    old.protocol_min = 80;
    old.protocol_max = 85;
    let (ra, _) = run(
        &mut Handshake::new(config(None), [1; 64]),
        &mut Handshake::new(old, [2; 64]),
    );
    assert!(matches!(
        ra.unwrap_err(),
        HandshakeError::IncompatibleVersions { .. }
    ));

    type Change = fn(&mut ProtocolParams);
    let cases: Vec<(Change, &str)> = vec![
        (|p| p.wire_protocol = 1, "communication protocols"),
        (
            |p| p.two_primaries = false,
            "setting of allow-two-primaries",
        ),
        (
            |p| p.after_sb_0p = asb::DISCARD_ZERO_CHG,
            "after-sb-0pri settings",
        ),
        (|p| p.integrity_alg = "crc32c".into(), "data-integrity-alg"),
    ];
    for (change, what) in cases {
        let mut other = config(None);
        change(&mut other.protocol);
        let (ra, rb) = run(
            &mut Handshake::new(config(None), [1; 64]),
            &mut Handshake::new(other, [2; 64]),
        );
        assert_eq!(ra.unwrap_err(), HandshakeError::Incompatible(what));
        assert_eq!(rb.unwrap_err(), HandshakeError::Incompatible(what));
    }
}

#[test]
fn discard_local_matches_peers_discard_remote() {
    let mut a = config(None);
    a.protocol.after_sb_0p = asb::DISCARD_LOCAL;
    let mut b = config(None);
    b.protocol.after_sb_0p = asb::DISCARD_REMOTE;
    let (ra, rb) = run(
        &mut Handshake::new(a, [1; 64]),
        &mut Handshake::new(b, [2; 64]),
    );
    assert!(ra.unwrap().is_some() && rb.unwrap().is_some());
    let mut a = config(None);
    a.protocol.discard_my_data = true;
    let b = a.clone();
    let (ra, _) = run(
        &mut Handshake::new(a, [1; 64]),
        &mut Handshake::new(b, [2; 64]),
    );
    assert_eq!(
        ra.unwrap_err(),
        HandshakeError::Incompatible("both sides have the discard-my-data flag set")
    );
}

#[test]
fn a_connection_without_volumes_completes_after_p_protocol() {
    let mut a = config(None);
    a.volumes.clear();
    let b = a.clone();
    let (ra, rb) = run(
        &mut Handshake::new(a, [1; 64]),
        &mut Handshake::new(b, [2; 64]),
    );
    assert!(ra.unwrap().is_some_and(|p| p.volumes.is_empty()));
    assert!(rb.unwrap().is_some());
}

#[test]
fn an_unknown_integrity_algorithm_is_refused_not_misparsed() {
    let mut a = config(None);
    a.protocol.integrity_alg = "whirlpool".into();
    let b = a.clone();
    let (ra, _) = run(
        &mut Handshake::new(a, [1; 64]),
        &mut Handshake::new(b, [2; 64]),
    );
    assert_eq!(
        ra.unwrap_err(),
        HandshakeError::UnsupportedIntegrityAlg("whirlpool".into())
    );
}
