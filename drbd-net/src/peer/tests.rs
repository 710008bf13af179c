//! Every message through encode_msg -> wire bytes -> wire decoder -> MsgDecoder, and the
//! packets the decoder must refuse.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::handshake::{ProtocolParams, VolumeHello};
use crate::wire::{Decoder, DelayProbe, Protocol, SyncParam, FF_TRIM, FF_WSAME};
use drbd_core::uuid::{GenerationUuids, UuidFlags};

/// 8.4.11 peers: h100 headers, every feature.
const V101: WireContext = WireContext {
    integrity_digest_len: 0,
    features: FF_TRIM | FF_WSAME | FF_WZEROES,
    protocol_version: 101,
    integrity: None,
};
/// An older peer: h80/h95 headers, no P_ZEROES.
const V96: WireContext = WireContext {
    integrity_digest_len: 0,
    features: FF_TRIM,
    protocol_version: 96,
    integrity: None,
};
/// The oldest 8.4 dialect: no compressed bitmaps.
const V86: WireContext = WireContext {
    integrity_digest_len: 0,
    features: 0,
    protocol_version: 86,
    integrity: None,
};

/// Frames to bytes, as a socket would carry them.
fn to_bytes(frames: &[Frame], ctx: &WireContext) -> BytesMut {
    let mut buf = BytesMut::new();
    for f in frames {
        wire::encode(f, ctx, &mut buf).expect("encode_msg checked the frame");
    }
    buf
}

/// Bytes to messages through the wire decoder and a message decoder.
fn decode_all(mut buf: BytesMut, ctx: &WireContext, bits: u64) -> Vec<PeerMsg> {
    let mut dec = Decoder::new(*ctx);
    let mut msgs = MsgDecoder::new(0, bits).with_integrity(ctx.integrity);
    let mut out = Vec::new();
    while let Some(frame) = dec.decode(&mut buf).expect("decodes") {
        if let Some(m) = msgs.on_frame(frame).expect("maps") {
            out.push(m);
        }
    }
    assert!(buf.is_empty(), "trailing bytes");
    assert!(!msgs.bitmap_in_progress(), "bitmap transfer left open");
    out
}

fn frames(msg: &PeerMsg, ctx: &WireContext, bits: u64, rle: bool) -> Vec<Frame> {
    let mut out = Vec::new();
    encode_msg(msg, ctx, 0, bits, rle, &mut out).expect("encodes");
    out
}

fn round_trip(msg: &PeerMsg, ctx: &WireContext, bits: u64, rle: bool) -> PeerMsg {
    let f = frames(msg, ctx, bits, rle);
    let mut got = decode_all(to_bytes(&f, ctx), ctx, bits);
    assert_eq!(got.len(), 1, "{msg:?} gave {got:?}");
    got.remove(0)
}

fn ack(n: u64) -> Ack {
    Ack {
        sector: n * 8,
        block_id: 0x0102_0304_0506_0708 ^ n,
        size: 4096,
        seq: n as u32 + 7,
    }
}

fn req(n: u64) -> BlockReq {
    BlockReq {
        sector: n * 8,
        block_id: u64::MAX - n,
        size: 32768,
    }
}

fn block(n: usize, fill: u8) -> Bytes {
    Bytes::from(vec![fill; n])
}

/// One of every variant (bitmaps separately below), in canonical form.
fn every_variant() -> Vec<PeerMsg> {
    vec![
        PeerMsg::Data {
            sector: 123_456,
            block_id: 0xdead_beef_0000_0001,
            seq: 42,
            flags: dp::SEND_WRITE_ACK | dp::FUA | dp::RW_SYNC,
            data: block(4096, 0xa5),
        },
        // An empty flush.
        PeerMsg::Data {
            sector: 0,
            block_id: 9,
            seq: 43,
            flags: dp::FLUSH | dp::SEND_WRITE_ACK,
            data: Bytes::new(),
        },
        // The largest write: h95 below protocol 100.
        PeerMsg::Data {
            sector: 8,
            block_id: 10,
            seq: 44,
            flags: 0,
            data: block(1 << 20, 0x11),
        },
        PeerMsg::Trim {
            sector: 2048,
            block_id: 77,
            seq: 45,
            flags: dp::DISCARD | dp::SEND_WRITE_ACK,
            size: 1 << 20,
        },
        PeerMsg::Trim {
            sector: 4096,
            block_id: 78,
            seq: 46,
            flags: dp::ZEROES | dp::SEND_WRITE_ACK,
            size: 65536,
        },
        PeerMsg::Barrier { nr: 0x8000_0001 },
        PeerMsg::BarrierAck {
            nr: 0x8000_0001,
            set_size: 17,
        },
        PeerMsg::RecvAck(ack(1)),
        PeerMsg::WriteAck(ack(2)),
        PeerMsg::RsWriteAck(ack(3)),
        PeerMsg::NegAck(ack(4)),
        PeerMsg::DataRequest(req(5)),
        PeerMsg::DataReply {
            sector: 40,
            block_id: 5,
            data: block(32768, 3),
        },
        PeerMsg::NegDReply(ack(6)),
        PeerMsg::RsDataRequest(BlockReq {
            block_id: drbd_core::replication::msg::ID_SYNCER,
            ..req(7)
        }),
        PeerMsg::RsDataReply {
            sector: 56,
            block_id: drbd_core::replication::msg::ID_SYNCER,
            data: block(4096, 4),
        },
        PeerMsg::NegRsDReply(ack(8)),
        PeerMsg::Superseded(ack(9)),
        PeerMsg::RetryWrite(ack(10)),
        PeerMsg::OvRequest(BlockReq {
            sector: 64,
            block_id: drbd_core::replication::msg::ID_SYNCER,
            size: 4096,
        }),
        PeerMsg::OvReply {
            sector: 64,
            block_id: drbd_core::replication::msg::ID_SYNCER,
            size: 4096,
            digest: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
        },
        PeerMsg::CsumRsRequest {
            sector: 128,
            block_id: drbd_core::replication::msg::ID_SYNCER,
            size: 65536,
            digest: Bytes::from_static(&[9, 8, 7, 6]),
        },
        PeerMsg::RsIsInSync(Ack {
            block_id: drbd_core::replication::msg::ID_SYNCER,
            ..ack(12)
        }),
        PeerMsg::OvResult(Ack {
            block_id: drbd_core::replication::msg::ID_OUT_OF_SYNC,
            ..ack(11)
        }),
        PeerMsg::ProtocolUpdate(ProtocolSettings {
            wire_protocol: 1,
            // discard-younger-primary, discard-local, disconnect
            after_sb: [1, 5, 0],
            two_primaries: false,
            integrity_alg: String::new(),
        }),
        PeerMsg::OutOfSync {
            sector: 1 << 30,
            size: 4096,
        },
        PeerMsg::Uuids(UuidInfo::new(
            GenerationUuids::from_array([0x1111, 0x2222, 0x3333, 0x4444]),
            99,
            UuidFlags::CRASHED_PRIMARY | UuidFlags::INCONSISTENT,
        )),
        PeerMsg::SyncUuid(0xabcd_ef01_2345_6789),
        PeerMsg::StateChgReq {
            mask: 0x1e03,
            val: 0x1001,
            connection: false,
        },
        PeerMsg::StateChgReq {
            mask: 0x1f0,
            val: 0x10,
            connection: true,
        },
        PeerMsg::StateChgReply {
            retcode: 1,
            connection: false,
        },
        PeerMsg::StateChgReply {
            retcode: -1,
            connection: true,
        },
        PeerMsg::State(PeerState {
            role: Role::Primary,
            peer_role: Role::Secondary,
            conn: ConnState::SyncSource,
            disk: DiskState::UpToDate,
            peer_disk: DiskState::Inconsistent,
            user_isp: true,
        }),
        PeerMsg::State(PeerState {
            role: Role::Secondary,
            peer_role: Role::Unknown,
            conn: ConnState::WfBitMapT,
            disk: DiskState::Outdated,
            peer_disk: DiskState::DUnknown,
            user_isp: false,
        }),
    ]
}

#[test]
fn every_variant_round_trips_as_one_packet_of_its_name() {
    for ctx in [V101, V96, V86] {
        for msg in every_variant() {
            if matches!(&msg, PeerMsg::Data { data, .. } if data.len() > 65535)
                && ctx.protocol_version < 95
            {
                // Below 95 only h80 headers exist: a 1 MiB write cannot be sent (such peers
                // announce a smaller max_bio_size in P_SIZES).
                let mut out = Vec::new();
                assert!(encode_msg(&msg, &ctx, 0, 0, true, &mut out).is_err());
                continue;
            }
            let f = frames(&msg, &ctx, 0, true);
            assert_eq!(f.len(), 1, "{msg:?}");
            // Without P_ZEROES a write-zeroes goes as P_TRIM (see encode_msg).
            let name = match msg.name() {
                "P_ZEROES" if ctx.features & FF_WZEROES == 0 => "P_TRIM",
                name => name,
            };
            assert_eq!(f[0].packet.command().name(), name, "{ctx:?}");
            assert_eq!(
                f[0].packet.command().on_meta_socket(),
                msg.socket() == Socket::Meta,
                "{}",
                msg.name()
            );
            assert_eq!(round_trip(&msg, &ctx, 0, true), msg, "{ctx:?}");
        }
    }
}

#[test]
fn handles_and_barrier_numbers_are_big_endian_on_the_wire() {
    let f = frames(&PeerMsg::WriteAck(ack(0)), &V101, 0, false);
    let Packet::WriteAck(a) = &f[0].packet else {
        panic!("{f:?}")
    };
    assert_eq!(a.block_id.0, [1, 2, 3, 4, 5, 6, 7, 8]);
    let f = frames(&PeerMsg::Barrier { nr: 0x0102_0304 }, &V101, 0, false);
    let Packet::Barrier(b) = &f[0].packet else {
        panic!("{f:?}")
    };
    assert_eq!(b.barrier, [1, 2, 3, 4]);
    assert_eq!(b.pad, 0);
}

#[test]
fn write_zeroes_without_p_zeroes_goes_as_a_trim_that_zeroes() {
    let zeroes = PeerMsg::Trim {
        sector: 8,
        block_id: 1,
        seq: 2,
        flags: dp::ZEROES,
        size: 4096,
    };
    let f = frames(&zeroes, &V101, 0, false);
    let Packet::Zeroes(t) = &f[0].packet else {
        panic!("{f:?}")
    };
    assert_eq!(t.dp_flags, dp::ZEROES);
    let f = frames(&zeroes, &V96, 0, false);
    let Packet::Trim(t) = &f[0].packet else {
        panic!("{f:?}")
    };
    assert_eq!(t.dp_flags, dp::ZEROES | dp::DISCARD);
    assert_eq!(round_trip(&zeroes, &V96, 0, false), zeroes);

    // What other senders put on the wire: a P_TRIM without flags is a discard, a P_ZEROES
    // that may unmap is still a write-zeroes.
    let mut dec = MsgDecoder::new(0, 0);
    let trim = |dp_flags| Trim {
        sector: 8,
        block_id: BlockId([0; 8]),
        seq_num: 1,
        dp_flags,
        size: 512,
    };
    let got = dec
        .on_frame(Frame::for_context(&V101, 0, Packet::Trim(trim(0))))
        .unwrap();
    assert!(matches!(got, Some(PeerMsg::Trim { flags, .. }) if flags == dp::DISCARD));
    let got = dec
        .on_frame(Frame::for_context(
            &V101,
            0,
            Packet::Zeroes(trim(dp::DISCARD | dp::ZEROES)),
        ))
        .unwrap();
    assert!(matches!(got, Some(PeerMsg::Trim { flags, .. }) if flags == dp::ZEROES));
}

/// A deterministic pseudo-random source for the bitmap shapes.
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn with_bits(bits: u64, mut set: impl FnMut(u64) -> bool) -> Vec<u64> {
    let mut w = vec![0u64; words_for(bits)];
    for i in (0..bits).filter(|&i| set(i)) {
        w[(i / 64) as usize] |= 1 << (i % 64);
    }
    w
}

fn shapes(bits: u64) -> Vec<(&'static str, Vec<u64>)> {
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ bits;
    let random: Vec<bool> = (0..bits).map(|_| xorshift(&mut seed) & 1 == 1).collect();
    let mut seed2 = 0x1234_5678 ^ bits;
    let runs: Vec<bool> = {
        // Long runs of random lengths: compresses well but not trivially.
        let mut v = Vec::with_capacity(bits as usize);
        let mut set = false;
        while (v.len() as u64) < bits {
            let len = 1 + xorshift(&mut seed2) % 5000;
            v.resize(v.len() + len as usize, set);
            set = !set;
        }
        v.truncate(bits as usize);
        v
    };
    vec![
        ("empty", with_bits(bits, |_| false)),
        ("full", with_bits(bits, |_| true)),
        (
            "sparse",
            with_bits(bits, |i| i % 9973 == 17 || i + 1 == bits),
        ),
        ("random", with_bits(bits, |i| random[i as usize])),
        ("alternating", with_bits(bits, |i| i % 2 == 0)),
        ("runs", with_bits(bits, |i| runs[i as usize])),
    ]
}

#[test]
fn bitmaps_of_every_shape_round_trip_with_and_without_rle() {
    // 1 GiB device = 262144 bits; the others are not multiples of 64.
    for bits in [1, 63, 65, 4095, 262_144, 262_144 + 37, 1_000_003] {
        for (shape, words) in shapes(bits) {
            for ctx in [V101, V96, V86] {
                for rle in [false, true] {
                    let msg = PeerMsg::Bitmap(words.clone());
                    let f = frames(&msg, &ctx, bits, rle);
                    let compressed = f
                        .iter()
                        .filter(|f| matches!(f.packet, Packet::CompressedBitmap(_)))
                        .count();
                    if !rle || ctx.protocol_version < 90 {
                        assert_eq!(compressed, 0, "{shape} {bits} {ctx:?}");
                    }
                    assert_eq!(
                        round_trip(&msg, &ctx, bits, rle),
                        msg,
                        "{shape}, {bits} bits, rle {rle}, {ctx:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn rle_makes_a_sparse_1_gib_bitmap_small() {
    let bits = bitmap_bits(2 * 1024 * 1024); // 1 GiB in sectors
    assert_eq!(bits, 262_144);
    let words = with_bits(bits, |i| [5, 70_000, 262_143].contains(&i));
    let plain = frames(&PeerMsg::Bitmap(words.clone()), &V101, bits, false);
    let rle = frames(&PeerMsg::Bitmap(words), &V101, bits, true);
    // 32 KiB of words in 4 KiB packets, plus the empty one that ends a plain transfer.
    assert_eq!(plain.len(), 10);
    assert_eq!(rle.len(), 1, "{rle:?}");
}

#[test]
fn bits_past_the_end_are_not_sent() {
    let bits = 70;
    let mut words = with_bits(bits, |i| i == 3);
    words[1] |= 1 << 60; // bit 124: past the end
    words.push(u64::MAX); // a whole extra word
    for rle in [false, true] {
        let got = round_trip(&PeerMsg::Bitmap(words.clone()), &V101, bits, rle);
        assert_eq!(got, PeerMsg::Bitmap(with_bits(bits, |i| i == 3)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bitmaps_round_trip(
        bits in 0u64..20_000,
        seed in any::<u64>(),
        density in 0u64..=64,
        rle in any::<bool>(),
    ) {
        let mut s = seed | 1;
        let words: Vec<u64> = with_bits(bits, |_| xorshift(&mut s) % 64 < density);
        let msg = PeerMsg::Bitmap(words);
        prop_assert_eq!(round_trip(&msg, &V101, bits, rle), msg);
    }
}

#[test]
fn a_too_short_bitmap_is_an_encode_error() {
    let mut out = vec![Frame::for_context(&V101, 0, Packet::Ping)];
    let err = encode_msg(&PeerMsg::Bitmap(vec![0; 3]), &V101, 0, 257, true, &mut out);
    assert!(err.is_err());
    assert_eq!(out.len(), 1, "nothing appended on error");
}

#[test]
fn unencodable_messages_are_refused_before_they_reach_a_socket() {
    let mut out = Vec::new();
    // Not whole sectors.
    let odd = PeerMsg::Data {
        sector: 0,
        block_id: 1,
        seq: 1,
        flags: 0,
        data: block(100, 0),
    };
    assert!(encode_msg(&odd, &V101, 0, 0, false, &mut out).is_err());
    // Volume 1 needs an h100 header.
    let barrier = PeerMsg::Barrier { nr: 1 };
    assert!(encode_msg(&barrier, &V96, 1, 0, false, &mut out).is_err());
    assert!(encode_msg(&barrier, &V101, 1, 0, false, &mut out).is_ok());
    // Data with a data-integrity algorithm agreed: no digest to send.
    let sha1 = WireContext {
        integrity_digest_len: 20,
        ..V101
    };
    let write = PeerMsg::Data {
        sector: 0,
        block_id: 1,
        seq: 1,
        flags: 0,
        data: block(512, 0),
    };
    assert!(encode_msg(&write, &sha1, 0, 0, false, &mut out).is_err());
    assert_eq!(out.len(), 1);
}

fn decode_one(dec: &mut MsgDecoder, packet: Packet) -> Result<Option<PeerMsg>, PeerError> {
    dec.on_frame(Frame::for_context(&V101, 0, packet))
}

#[test]
fn packets_the_core_does_not_handle_are_errors() {
    let mut dec = MsgDecoder::new(0, 64);
    for packet in [
        Packet::Protocol(Protocol::default()),
        Packet::InitialData,
        Packet::AuthChallenge(block(64, 1)),
    ] {
        let command = packet.command();
        assert_eq!(
            decode_one(&mut dec, packet),
            Err(PeerError::Unexpected { command })
        );
    }
}

#[test]
fn harmless_packets_are_ignored() {
    let mut dec = MsgDecoder::new(0, 64);
    for packet in [
        Packet::DelayProbe(DelayProbe::default()),
        Packet::UnplugRemote,
        Packet::Sizes(Sizes {
            queue_limits: Some(Default::default()),
            ..Sizes::default()
        }),
        Packet::Ping,
        Packet::PingAck,
    ] {
        assert_eq!(decode_one(&mut dec, packet), Ok(None));
    }
}

#[test]
fn malformed_content_is_an_error() {
    let mut dec = MsgDecoder::new(0, 64);
    // Role 3 does not exist.
    let r = decode_one(&mut dec, Packet::State(State::from_raw(3)));
    assert!(
        matches!(
            r,
            Err(PeerError::Malformed {
                command: Command::State,
                ..
            })
        ),
        "{r:?}"
    );
    // Disk state 15 does not exist.
    let r = decode_one(&mut dec, Packet::State(State::from_raw(15 << 9 | 2)));
    assert!(matches!(r, Err(PeerError::Malformed { .. })), "{r:?}");
    // A digest nobody asked for.
    let with_digest = DataPacket {
        digest: block(4, 9),
        data: block(512, 0),
        ..DataPacket::default()
    };
    let r = decode_one(&mut dec, Packet::Data(with_digest));
    assert!(
        matches!(
            r,
            Err(PeerError::Malformed {
                command: Command::Data,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn wrong_volume_and_wrong_socket_are_errors() {
    let mut dec = MsgDecoder::new(0, 64);
    let f = Frame::for_context(&V101, 3, Packet::Barrier(Barrier::default()));
    assert_eq!(
        dec.on_frame(f),
        Err(PeerError::UnknownVolume {
            command: Command::Barrier,
            volume: 3,
            expected: 0
        })
    );
    let mut data = MsgDecoder::new(0, 64).for_socket(Socket::Data);
    assert_eq!(
        decode_one(&mut data, Packet::WriteAck(BlockAck::default())),
        Err(PeerError::WrongSocket {
            command: Command::WriteAck,
            socket: Socket::Data
        })
    );
    assert_eq!(
        decode_one(&mut data, Packet::Ping),
        Err(PeerError::WrongSocket {
            command: Command::Ping,
            socket: Socket::Data
        })
    );
    let mut meta = MsgDecoder::new(0, 64).for_socket(Socket::Meta);
    let r = decode_one(&mut meta, Packet::Barrier(Barrier::default()));
    assert!(matches!(r, Err(PeerError::WrongSocket { .. })), "{r:?}");
    // P_DELAY_PROBE is accepted (and ignored) on both.
    let probe = || Packet::DelayProbe(DelayProbe::default());
    assert_eq!(decode_one(&mut meta, probe()), Ok(None));
    assert_eq!(decode_one(&mut data, probe()), Ok(None));
}

#[test]
fn bad_bitmap_sequences_are_errors_and_reset_the_transfer() {
    let bits = 10_000;
    let words = with_bits(bits, |i| i % 3 == 0);
    let f = frames(&PeerMsg::Bitmap(words.clone()), &V101, bits, false);
    assert!(f.len() > 1);

    // Another data-socket packet in the middle of a transfer.
    let mut dec = MsgDecoder::new(0, bits);
    assert_eq!(dec.on_frame(f[0].clone()), Ok(None));
    assert!(dec.bitmap_in_progress());
    assert_eq!(
        decode_one(&mut dec, Packet::Barrier(Barrier::default())),
        Err(PeerError::BitmapInterrupted {
            command: Command::Barrier
        })
    );
    // Acks on the meta socket may come in between.
    assert!(matches!(
        decode_one(&mut dec, Packet::WriteAck(BlockAck::default())),
        Ok(Some(PeerMsg::WriteAck(_)))
    ));

    // A sender that thinks the bitmap is bigger than we do.
    let mut small = MsgDecoder::new(0, 100);
    let r = small.on_frame(f[0].clone());
    assert!(matches!(r, Err(PeerError::Bitmap(_))), "{r:?}");
    assert!(!small.bitmap_in_progress());

    // A compressed bitmap whose runs pass the end.
    let rle = frames(
        &PeerMsg::Bitmap(with_bits(bits, |_| true)),
        &V101,
        bits,
        true,
    );
    let mut small = MsgDecoder::new(0, 500);
    let r = small.on_frame(rle[0].clone());
    assert!(
        matches!(r, Err(PeerError::Bitmap(BitmapError::Overflow { .. }))),
        "{r:?}"
    );

    // After a complete transfer, the next one starts afresh with the new size.
    let mut dec = MsgDecoder::new(0, bits);
    let mut got = None;
    for frame in f {
        got = dec.on_frame(frame).unwrap();
    }
    assert_eq!(got, Some(PeerMsg::Bitmap(words)));
    dec.set_bitmap_bits(64);
    let f = frames(&PeerMsg::Bitmap(vec![u64::MAX]), &V101, 64, true);
    let mut got = None;
    for frame in f {
        got = dec.on_frame(frame).unwrap();
    }
    assert_eq!(got, Some(PeerMsg::Bitmap(vec![u64::MAX])));
}

#[test]
fn peer_hello_takes_the_volume_the_protocol_and_the_conflict_role() {
    let state = PeerState {
        role: Role::Primary,
        peer_role: Role::Unknown,
        conn: ConnState::WfReportParams,
        disk: DiskState::UpToDate,
        peer_disk: DiskState::DUnknown,
        user_isp: false,
    };
    let v = |volume, current| VolumeHello {
        volume,
        sync_param: SyncParam::default(),
        sizes: Sizes {
            d_size: 2048,
            u_size: 1024,
            c_size: 1000,
            ..Sizes::default()
        },
        uuids: Uuids {
            current,
            bitmap: 2,
            history: [3, 4],
            dirty_bits: 5,
            flags: 1,
        },
        state: wire_state(&state),
    };
    let hello = handshake::PeerHello {
        protocol_version: 101,
        features: 0xf,
        protocol: ProtocolParams {
            discard_my_data: true,
            ..ProtocolParams::default()
        },
        volumes: vec![v(0, 0x10), v(1, 0x11)],
    };
    let h = peer_hello(&hello, true, 1).unwrap();
    assert_eq!(
        h,
        CorePeerHello {
            protocol_version: 101,
            features: 0xf,
            resolve_conflicts: true,
            uuids: UuidInfo::from_wire([0x11, 2, 3, 4, 5, 1]),
            state,
            disk_sectors: 2048,
            user_sectors: 1024,
            current_sectors: 1000,
            discard_my_data: true,
        }
    );
    assert_eq!(
        peer_hello(&hello, false, 0).unwrap().uuids.uuids.current,
        0x10
    );
    assert!(peer_hello(&hello, false, 2).is_none());
    let mut bad = hello.clone();
    bad.volumes[0].state = State::from_raw(3);
    assert!(peer_hello(&bad, false, 0).is_none());
    assert_eq!(uuid_info(&wire_uuids(&h.uuids)), h.uuids);
}

#[test]
fn agreed_size_is_symmetric_and_ignores_missing_disks() {
    let s = |d_size, u_size, c_size| Sizes {
        d_size,
        u_size,
        c_size,
        ..Sizes::default()
    };
    let cases = [
        (s(2048, 0, 2048), s(4096, 0, 4096), 2048),
        (s(2048, 0, 0), s(0, 0, 0), 2048),
        (s(8192, 4096, 0), s(8192, 0, 0), 4096),
        (s(8192, 4096, 0), s(8192, 2048, 0), 2048),
        (s(1000, 4096, 0), s(8192, 0, 0), 1000),
        (s(0, 0, 3000), s(0, 0, 5000), 3000),
        (s(0, 0, 0), s(0, 0, 0), 0),
    ];
    for (a, b, want) in cases {
        assert_eq!(agreed_sectors(&a, &b), want, "{a:?} {b:?}");
        assert_eq!(agreed_sectors(&b, &a), want, "{b:?} {a:?}");
    }
    assert_eq!(bitmap_bits(0), 0);
    assert_eq!(bitmap_bits(1), 1);
    assert_eq!(bitmap_bits(8), 1);
    assert_eq!(bitmap_bits(9), 2);
}

#[test]
fn sync_settings_travel_in_the_layout_of_the_agreed_version() {
    let full = SyncSettings {
        rate_kib: 40_960,
        controller: Some([30, 20, 200, 51_200]),
        verify_alg: "sha1".into(),
        csums_alg: "md5".into(),
    };
    let msg = PeerMsg::SyncParam(full.clone());
    assert_eq!(round_trip(&msg, &V101, 0, false), msg);
    assert_eq!(round_trip(&msg, &V96, 0, false), msg);
    // Protocol 86 carries the rate only, in P_SYNC_PARAM.
    let f = frames(&msg, &V86, 0, false);
    assert_eq!(f[0].packet.command().name(), "P_SYNC_PARAM");
    assert_eq!(
        round_trip(&msg, &V86, 0, false),
        PeerMsg::SyncParam(SyncSettings {
            rate_kib: 40_960,
            controller: None,
            verify_alg: String::new(),
            csums_alg: String::new(),
        })
    );
}

#[test]
fn data_packets_carry_and_check_the_integrity_digest() {
    use drbd_core::replication::digest::DigestAlg;
    for alg in [
        DigestAlg::Crc32c,
        DigestAlg::Md5,
        DigestAlg::Sha1,
        DigestAlg::Sha256,
    ] {
        let ctx = WireContext {
            integrity_digest_len: alg.digest_len(),
            integrity: Some(alg),
            ..V101
        };
        let data = block(4096, 3);
        for msg in [
            PeerMsg::Data {
                sector: 8,
                block_id: 5,
                seq: 1,
                flags: dp::SEND_WRITE_ACK,
                data: data.clone(),
            },
            PeerMsg::DataReply {
                sector: 8,
                block_id: 6,
                data: data.clone(),
            },
            PeerMsg::RsDataReply {
                sector: 8,
                block_id: drbd_core::replication::msg::ID_SYNCER,
                data: data.clone(),
            },
        ] {
            assert_eq!(round_trip(&msg, &ctx, 0, false), msg, "{}", alg.name());
            // The payload damaged on the way: the receiver refuses it.
            let mut f = frames(&msg, &ctx, 0, false).remove(0);
            match &mut f.packet {
                Packet::Data(d) | Packet::DataReply(d) | Packet::RsDataReply(d) => {
                    assert_eq!(d.digest.as_ref(), alg.digest(&data).as_slice());
                    let mut v = d.data.to_vec();
                    v[1000] ^= 0x40;
                    d.data = Bytes::from(v);
                }
                other => panic!("{other:?}"),
            }
            let mut dec = MsgDecoder::new(0, 64).with_integrity(Some(alg));
            let r = dec.on_frame(f);
            assert!(
                matches!(
                    r,
                    Err(PeerError::IntegrityCheckFailed {
                        sector: 8,
                        size: 4096,
                        ..
                    })
                ),
                "{}: {r:?}",
                alg.name()
            );
        }
    }
}
