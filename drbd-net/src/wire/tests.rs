//! Tests of the wire codec: hand-computed vectors, real kernel frames from the captures in
//! `shared/captures` (copied into `testdata/` and inline below), every limit, and property
//! tests of every packet type under all three header kinds.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::bitmap::{
    encode_rle_chunk, max_code_bytes, runs, vli_decode, vli_encode, words_for, BitmapReceiver,
    BitmapSender, Run, VLI_LEVELS, VLI_MAX,
};
use super::limits::{self, MAX_BIO_SIZE};
use super::packet::SyncParam;
use super::selfcheck::{check_bitmap_transfer, check_decode, check_stream};
use super::*;

const H80: HeaderKind = HeaderKind::H80;
const H95: HeaderKind = HeaderKind::H95;
const H100: HeaderKind = HeaderKind::H100;

/// The context of the captures after feature negotiation: protocol 101, features 0xf, no
/// data-integrity-alg.
const CAPTURE_CTX: WireContext = WireContext {
    integrity_digest_len: 0,
    features: 0xf,
    protocol_version: 101,
    integrity: None,
};

fn hex(s: &str) -> Vec<u8> {
    let digits: String = s
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    assert_eq!(digits.len() & 1, 0, "odd number of hex digits");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn encoded(frame: &Frame, ctx: &WireContext) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(frame, ctx, &mut out).expect("encodes");
    out.to_vec()
}

/// Decodes exactly one frame from `bytes`, which must hold nothing else.
fn decode_one(bytes: &[u8], ctx: &WireContext) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = Decoder::new(*ctx)
        .decode(&mut buf)
        .expect("decodes")
        .expect("complete");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    frame
}

/// Decodes `bytes` as one frame and checks that it re-encodes to the same bytes.
fn decode_exact(bytes: &[u8], ctx: &WireContext) -> Frame {
    let frame = decode_one(bytes, ctx);
    assert_eq!(
        encoded(&frame, ctx),
        bytes,
        "re-encoding {:?}",
        frame.packet.command()
    );
    frame
}

fn decode_err(bytes: &[u8], ctx: &WireContext) -> WireError {
    let mut buf = BytesMut::from(bytes);
    Decoder::new(*ctx)
        .decode(&mut buf)
        .expect_err("must be rejected")
}

fn h100(volume: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = MAGIC_100.to_be_bytes().to_vec();
    v.extend_from_slice(&volume.to_be_bytes());
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(payload);
    v
}

fn h80(command: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = MAGIC_80.to_be_bytes().to_vec();
    v.extend_from_slice(&command.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Just a header announcing `length` bytes of `command`.
fn h100_header(command: Command, length: u32) -> Vec<u8> {
    let mut v = MAGIC_100.to_be_bytes().to_vec();
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&command.code().to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

// ---------------------------------------------------------------------------------------
// Commands and header selection

#[test]
fn command_table_is_consistent() {
    assert_eq!(Command::ALL.len(), 52);
    let mut names = std::collections::HashSet::new();
    for &c in Command::ALL {
        assert_eq!(Command::from_code(c.code()), Some(c));
        assert!(c.name().starts_with("P_"), "{}", c.name());
        assert!(names.insert(c.name()), "duplicate name {}", c.name());
        assert_eq!(c.to_string(), c.name());
    }
    for code in [
        0x25u16, 0x26, 0x2e, 0x2f, 0x30, 0x35, 0x37, 0x40, 0x4b, 0x59, 0x100, 0x101, 0xfff0, 0xffff,
    ] {
        assert_eq!(Command::from_code(code), None, "{code:#x}");
    }
    assert_eq!(Command::Data.name(), "P_DATA");
    assert_eq!(Command::Zeroes.code(), 0x36);
    assert_eq!(Command::ConnectionFeatures.code(), 0xfffe);
    let meta: Vec<_> = Command::ALL
        .iter()
        .filter(|c| c.on_meta_socket())
        .map(|c| c.name())
        .collect();
    assert_eq!(
        meta,
        [
            "P_PING",
            "P_PING_ACK",
            "P_RECV_ACK",
            "P_WRITE_ACK",
            "P_RS_WRITE_ACK",
            "P_SUPERSEDED",
            "P_NEG_ACK",
            "P_NEG_DREPLY",
            "P_NEG_RS_DREPLY",
            "P_BARRIER_ACK",
            "P_STATE_CHG_REPLY",
            "P_OV_RESULT",
            "P_RS_IS_IN_SYNC",
            "P_RS_CANCEL",
            "P_CONN_ST_CHG_REPLY",
            "P_RETRY_WRITE",
            "P_INITIAL_META",
        ]
    );
}

#[test]
fn header_kind_follows_the_kernel() {
    assert_eq!(header_kind_for(0, 0), H80);
    assert_eq!(header_kind_for(0, 100_000), H80);
    assert_eq!(header_kind_for(94, 100_000), H80);
    assert_eq!(header_kind_for(95, 32 * 1024), H80);
    assert_eq!(header_kind_for(95, 32 * 1024 + 1), H95);
    assert_eq!(header_kind_for(99, 128 * 1024), H95);
    assert_eq!(header_kind_for(100, 0), H100);
    assert_eq!(header_kind_for(101, 1 << 20), H100);
    assert_eq!(H80.size(), 8);
    assert_eq!(H95.size(), 8);
    assert_eq!(H100.size(), 16);
    let ctx = WireContext {
        protocol_version: 96,
        ..WireContext::default()
    };
    let big = Packet::Data(DataPacket {
        data: Bytes::from(vec![0; 64 * 1024]),
        ..Default::default()
    });
    assert_eq!(Frame::for_context(&ctx, 0, big).kind, H95);
    assert_eq!(Frame::for_context(&ctx, 0, Packet::Ping).kind, H80);
}

// ---------------------------------------------------------------------------------------
// Hand-computed vectors, one per header kind

#[test]
fn vector_h80_connection_features() {
    let frame = Frame {
        kind: H80,
        volume: 0,
        packet: Packet::ConnectionFeatures(ConnectionFeatures::new(
            86,
            FF_TRIM | FF_THIN_RESYNC | FF_WSAME,
            101,
        )),
    };
    let mut want = hex("83740267 fffe 0048  00000056 00000007 00000065");
    want.extend_from_slice(&[0; 60]);
    assert_eq!(encoded(&frame, &WireContext::default()), want);
    assert_eq!(decode_one(&want, &WireContext::default()), frame);
}

#[test]
fn vector_h95_data() {
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let packet = Packet::Data(DataPacket {
        sector: 0x0102_0304_0506_0708,
        block_id: BlockId([0xaa, 0xbb, 0xcc, 0xdd, 0x01, 0x02, 0x03, 0x04]),
        seq_num: 9,
        dp_flags: DP_RW_SYNC | DP_SEND_WRITE_ACK,
        digest: Bytes::new(),
        data: Bytes::from(data.clone()),
    });
    let frame = Frame {
        kind: H95,
        volume: 0,
        packet,
    };
    // magic 0x835a, command 0, length 24 + 512 = 0x218 as u32.
    let mut want = hex("835a 0000 00000218  0102030405060708 aabbccdd01020304 00000009 00000102");
    want.extend_from_slice(&data);
    assert_eq!(encoded(&frame, &WireContext::default()), want);
    assert_eq!(decode_one(&want, &WireContext::default()), frame);
}

#[test]
fn vector_h100_barrier_ack_and_protocol() {
    let frame = Frame {
        kind: H100,
        volume: 3,
        packet: Packet::BarrierAck(BarrierAck {
            barrier: [0x11, 0x22, 0x33, 0x44],
            set_size: 17,
        }),
    };
    let want = hex("8620ec20 0003 001c 00000008 00000000  11223344 00000011");
    assert_eq!(encoded(&frame, &CAPTURE_CTX), want);
    assert_eq!(decode_one(&want, &CAPTURE_CTX), frame);

    let frame = Frame {
        kind: H100,
        volume: 0,
        packet: Packet::Protocol(Protocol {
            protocol: 3,
            after_sb_0p: 1,
            after_sb_1p: 2,
            after_sb_2p: 4,
            conn_flags: CF_DISCARD_MY_DATA,
            two_primaries: 0,
            integrity_alg: "md5".into(),
        }),
    };
    // 24 bytes of fields + "md5\0".
    let want = hex("8620ec20 0000 000b 0000001c 00000000
         00000003 00000001 00000002 00000004 00000001 00000000 6d643500");
    assert_eq!(encoded(&frame, &CAPTURE_CTX), want);
    assert_eq!(decode_one(&want, &CAPTURE_CTX), frame);
    // Below protocol 87 the string is not on the wire at all.
    let old = WireContext {
        protocol_version: 86,
        ..WireContext::default()
    };
    let mut frame = frame;
    frame.kind = H80;
    if let Packet::Protocol(p) = &mut frame.packet {
        p.integrity_alg.clear();
    }
    let want = hex("83740267 000b 0018  00000003 00000001 00000002 00000004 00000001 00000000");
    assert_eq!(encoded(&frame, &old), want);
    assert_eq!(decode_one(&want, &old), frame);
}

#[test]
fn vector_state_bitfield() {
    let s = State::new(
        Role::Primary,
        Role::Secondary,
        ConnState::SyncSource,
        DiskState::UpToDate,
        DiskState::Inconsistent,
    )
    .with_susp_fen(true);
    // role 1 | peer 2<<2 | conn 16<<4 | disk 8<<9 | pdsk 4<<13 | 1<<22
    assert_eq!(
        s.raw,
        1 | (2 << 2) | (16 << 4) | (8 << 9) | (4 << 13) | (1 << 22)
    );
    assert_eq!(Role::from_wire(s.role()), Some(Role::Primary));
    assert_eq!(Role::from_wire(s.peer()), Some(Role::Secondary));
    assert_eq!(ConnState::from_wire(s.conn()), Some(ConnState::SyncSource));
    assert_eq!(DiskState::from_wire(s.disk()), Some(DiskState::UpToDate));
    assert_eq!(
        DiskState::from_wire(s.pdsk()),
        Some(DiskState::Inconsistent)
    );
    assert!(
        s.susp_fen()
            && !s.susp()
            && !s.susp_nod()
            && !s.aftr_isp()
            && !s.peer_isp()
            && !s.user_isp()
    );
    let t = s
        .with_user_isp(true)
        .with_user_isp(false)
        .with_aftr_isp(true);
    assert!(t.aftr_isp() && !t.user_isp());
    assert_eq!(ConnState::WfConnection.name(), "WFConnection");
    assert_eq!(DiskState::from_wire(9), None);
    let frame = Frame {
        kind: H100,
        volume: 0,
        packet: Packet::State(s),
    };
    let want = h100(0, 0x0e, &s.raw.to_be_bytes());
    assert_eq!(encoded(&frame, &CAPTURE_CTX), want);
}

// ---------------------------------------------------------------------------------------
// Real kernel frames (DRBD 8.4.11, protocol 101, features 0xf)

fn testdata(name: &str) -> Vec<u8> {
    let text = match name {
        "01-handshake-alpha-data.hex" => include_str!("testdata/01-handshake-alpha-data.hex"),
        "01-handshake-bravo-data.hex" => include_str!("testdata/01-handshake-bravo-data.hex"),
        "p_data.hex" => include_str!("testdata/p_data.hex"),
        "p_rs_data_reply.hex" => include_str!("testdata/p_rs_data_reply.hex"),
        "p_bitmap.hex" => include_str!("testdata/p_bitmap.hex"),
        other => panic!("no test data {other}"),
    };
    hex(text)
}

/// Decodes a whole captured data-socket stream the way a connection does: h80 frames with
/// the initial context, then the agreed one after `P_CONNECTION_FEATURES`.
fn decode_handshake_stream(stream: &[u8], piece: usize) -> Vec<Frame> {
    let mut decoder = Decoder::new(WireContext::default());
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        while let Some(f) = decoder.decode(&mut buf).expect("captured stream decodes") {
            if let Packet::ConnectionFeatures(_) = f.packet {
                decoder.set_context(CAPTURE_CTX);
            }
            frames.push(f);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(decoder.consumed(), stream.len() as u64);
    frames
}

#[test]
fn captured_handshake_streams_decode_and_reencode_exactly() {
    for (name, first) in [
        ("01-handshake-bravo-data.hex", true),
        ("01-handshake-alpha-data.hex", false),
    ] {
        let stream = testdata(name);
        let frames = decode_handshake_stream(&stream, stream.len());
        let commands: Vec<_> = frames.iter().map(|f| f.packet.command().name()).collect();
        let mut want = vec![
            "P_CONNECTION_FEATURES",
            "P_AUTH_CHALLENGE",
            "P_AUTH_RESPONSE",
            "P_PROTOCOL",
            "P_SYNC_PARAM89",
            "P_SIZES",
            "P_UUIDS",
            "P_STATE",
            "P_STATE",
        ];
        if first {
            want.insert(0, "P_INITIAL_DATA");
        }
        assert_eq!(commands, want, "{name}");
        // Re-encoding frame by frame gives back the whole stream.
        let mut out = BytesMut::new();
        let mut ctx = WireContext::default();
        for f in &frames {
            encode(f, &ctx, &mut out).expect("encodes");
            if let Packet::ConnectionFeatures(_) = f.packet {
                ctx = CAPTURE_CTX;
            }
        }
        assert_eq!(&out[..], &stream[..], "{name}");
        // Byte by byte gives the same frames.
        assert_eq!(decode_handshake_stream(&stream, 1), frames, "{name}");
        assert_eq!(decode_handshake_stream(&stream, 7), frames, "{name}");

        for f in &frames {
            match &f.packet {
                Packet::InitialData | Packet::ConnectionFeatures(_) => assert_eq!(f.kind, H80),
                _ => assert_eq!(f.kind, H100),
            }
            match &f.packet {
                Packet::ConnectionFeatures(c) => {
                    assert_eq!(*c, ConnectionFeatures::new(86, 0xf, 101));
                    assert_eq!((c.sender_node_id(), c.receiver_node_id()), (0, 0));
                }
                Packet::AuthChallenge(c) => assert_eq!(c.len(), 64),
                Packet::AuthResponse(r) => assert_eq!(r.len(), 20),
                Packet::Protocol(p) => assert_eq!(
                    *p,
                    Protocol {
                        protocol: 3,
                        after_sb_0p: 3,
                        after_sb_1p: 8,
                        after_sb_2p: 0,
                        conn_flags: 0,
                        two_primaries: 1,
                        integrity_alg: String::new(),
                    }
                ),
                Packet::SyncParam89(s) => assert_eq!(
                    *s,
                    SyncParam::Controller {
                        resync_rate: 102_400,
                        verify_alg: "sha1".into(),
                        csums_alg: String::new(),
                        c_plan_ahead: 0,
                        c_delay_target: 10,
                        c_fill_target: 100,
                        c_max_rate: 102_400,
                    }
                ),
                Packet::Sizes(s) => assert_eq!(
                    *s,
                    Sizes {
                        d_size: 32688,
                        u_size: 0,
                        c_size: 32688,
                        max_bio_size: 1 << 20,
                        queue_order_type: 0,
                        dds_flags: 0,
                        queue_limits: Some(QueueLimits {
                            physical_block_size: 512,
                            logical_block_size: 512,
                            alignment_offset: 0,
                            io_min: 512,
                            io_opt: 0,
                            discard_enabled: 1,
                            discard_zeroes_data: 0,
                            write_same_capable: 0,
                            pad: 0,
                        }),
                    }
                ),
                Packet::Uuids(u) => {
                    assert_eq!(u.dirty_bits, 4086);
                    assert_eq!((u.bitmap, u.history, u.flags), (0, [0, 0], 0));
                }
                Packet::State(s) => {
                    assert_eq!(Role::from_wire(s.role()), Some(Role::Secondary));
                    assert_eq!(
                        DiskState::from_wire(s.disk()),
                        Some(DiskState::Inconsistent)
                    );
                }
                _ => {}
            }
        }
    }
}

#[test]
fn captured_sizes_without_wsame_is_32_bytes() {
    // host-peer-tap.pcap: the peer announced features 0, so the kernel sent the short P_SIZES.
    let bytes = hex("8620ec20 0000 000d 00000020 00000000
         0000000000007fb0 0000000000000000 0000000000007fb0 00100000 0000 0000");
    let ctx = WireContext {
        features: 0,
        ..CAPTURE_CTX
    };
    let f = decode_exact(&bytes, &ctx);
    let Packet::Sizes(s) = f.packet else {
        panic!("not P_SIZES")
    };
    assert_eq!(
        (s.d_size, s.c_size, s.max_bio_size, s.queue_limits),
        (32688, 32688, 1 << 20, None)
    );
    // With FF_WSAME agreed the same packet is too short.
    assert_eq!(
        decode_err(&bytes, &CAPTURE_CTX),
        WireError::TooShort {
            command: Command::Sizes,
            length: 32,
            min: 56
        }
    );
}

#[test]
fn captured_data_packets() {
    let bytes = testdata("p_data.hex");
    let mut buf = BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let f = Decoder::new(CAPTURE_CTX)
        .decode(&mut buf)
        .expect("decodes")
        .expect("complete");
    let Packet::Data(d) = &f.packet else {
        panic!("not P_DATA")
    };
    assert_eq!(d.sector, 1024 * 2);
    assert_eq!(
        d.block_id,
        BlockId(hex("205d7a068088ffff").try_into().expect("8 bytes"))
    );
    assert_eq!(d.seq_num, 0x21);
    assert_eq!(d.dp_flags, DP_RW_SYNC | DP_SEND_WRITE_ACK);
    assert!(d.digest.is_empty());
    assert_eq!(d.data.len(), 4096);
    assert!(d.data.starts_with(b"drbdlab bravo-w1 off=1024k len=64k \n"));
    // The data is a slice of the receive buffer, not a copy.
    assert_eq!(d.data.as_ptr() as usize, base + 40);
    assert_eq!(encoded(&f, &CAPTURE_CTX), bytes);

    let bytes = testdata("p_rs_data_reply.hex");
    let f = decode_exact(&bytes, &CAPTURE_CTX);
    let Packet::RsDataReply(d) = &f.packet else {
        panic!("not P_RS_DATA_REPLY")
    };
    assert_eq!(
        (d.sector, d.block_id, d.data.len()),
        (2048 * 2, ID_SYNCER, 4096)
    );
    assert!(d
        .data
        .starts_with(b"drbdlab alpha-degraded-1 off=2048k len=4k \n"));

    // encode_head leaves the data out for a vectored write.
    let mut head = BytesMut::new();
    let tail = encode_head(&f, &CAPTURE_CTX, &mut head).expect("encodes");
    assert_eq!(head.len(), 40);
    assert_eq!([&head[..], &tail[..]].concat(), bytes);
}

#[test]
fn captured_small_frames() {
    let ctx = &CAPTURE_CTX;
    let cases: &[(&str, &str)] = &[
        ("P_INITIAL_META", "83740267fff10000"),
        ("P_PING", "8620ec20000000130000000000000000"),
        ("P_PING_ACK", "8620ec20000000140000000000000000"),
        ("P_STATE_CHG_REPLY", "8620ec200000001d000000040000000000000001"),
        ("P_RS_WRITE_ACK", "8620ec200000001700000018000000000000000000000000ffffffffffffffff0010000000000001"),
        ("P_STATE_CHG_REQ", "8620ec2000000012000000080000000000001e0300001001"),
        ("P_COMPRESSED_BITMAP", "8620ec20000000240000000400000000b23fc50e"),
        ("P_SYNC_UUID", "8620ec200000000f0000000800000000071396c2e111147a"),
        ("P_RS_DATA_REQUEST", "8620ec200000000900000018000000000000000000000000ffffffffffffffff0010000000000000"),
        ("P_WRITE_ACK", "8620ec200000001600000018000000000000000000000000a0597a068088ffff0000100000000011"),
        ("P_BARRIER_ACK", "8620ec200000001c00000008000000000000000000000001"),
        ("P_UNPLUG_REMOTE", "8620ec20000000070000000000000000"),
        ("P_BARRIER", "8620ec200000000300000008000000000000000000000000"),
        ("P_CONN_ST_CHG_REQ", "8620ec200000002a0000000800000000000001f000000010"),
        ("P_CONN_ST_CHG_REPLY", "8620ec200000002b000000040000000000000001"),
        ("P_COMPRESSED_BITMAP", "8620ec20000000240000000e00000000223fcf801fe7f03dfc3c167e8805"),
        ("P_OV_REQUEST", "8620ec200000001e00000018000000000000000000000000ffffffffffffffff0000100000000000"),
        (
            "P_OV_REPLY",
            "8620ec200000001f0000002c000000000000000000000000ffffffffffffffff000010000000000054942d124934606e73d51dd9356387f9af8e7323",
        ),
        ("P_OV_RESULT", "8620ec20000000200000001800000000000000000000000000000000000012670000100000000001"),
        ("P_DATA_REQUEST", "8620ec20000000080000001800000000000000000000000080537a068088ffff0000100000000000"),
        ("P_COMPRESSED_BITMAP", "8620ec20000000240000000a00000000e23fcfe6e719e4479800"),
        ("P_PROTOCOL_UPDATE", "8620ec200000002d000000190000000000000003000000030000000800000000000000000000000100"),
        ("P_BITMAP", "8620ec20000000040000000000000000"),
    ];
    for (name, h) in cases {
        let f = decode_exact(&hex(h), ctx);
        assert_eq!(f.packet.command().name(), *name);
        match &f.packet {
            Packet::RsWriteAck(a) => {
                assert_eq!(
                    (a.sector, a.block_id, a.blksize, a.seq_num),
                    (0, ID_SYNCER, 1 << 20, 1)
                );
            }
            Packet::WriteAck(a) => {
                assert_eq!(
                    a.block_id.0,
                    [0xa0, 0x59, 0x7a, 0x06, 0x80, 0x88, 0xff, 0xff]
                );
                assert_eq!((a.blksize, a.seq_num), (4096, 0x11));
            }
            Packet::OvResult(a) => assert_eq!(a.block_id, ID_IN_SYNC),
            Packet::OvReply(d) => {
                assert_eq!(
                    (d.request.block_id, d.request.blksize, d.digest.len()),
                    (ID_SYNCER, 4096, 20)
                );
            }
            Packet::StateChgReq(r) => assert_eq!((r.mask.raw, r.val.raw), (0x1e03, 0x1001)),
            Packet::ConnStChgReq(r) => {
                assert_eq!(r.mask.conn(), 31);
                assert_eq!(
                    ConnState::from_wire(r.val.conn()),
                    Some(ConnState::Disconnecting)
                );
            }
            Packet::StateChgReply(r) | Packet::ConnStChgReply(r) => assert_eq!(r.retcode, 1),
            Packet::BarrierAck(b) => assert_eq!((b.barrier, b.set_size), ([0; 4], 1)),
            Packet::SyncUuid(u) => assert_eq!(u.uuid, 0x0713_96c2_e111_147a),
            Packet::CompressedBitmap(c) => {
                assert_eq!(c.code_kind(), CompressedBitmap::RLE_VLI_BITS);
            }
            _ => {}
        }
    }
}

#[test]
fn captured_bitmaps_decode_and_reencode_like_the_kernel() {
    const BITS: u64 = 4086; // 16 MiB disk, internal meta data: 32688 sectors.
    let ctx = &CAPTURE_CTX;
    let cases: &[(&str, &[(u64, u64)])] = &[
        // 02: full sync, everything set.
        ("8620ec20000000240000000400000000b23fc50e", &[(0, BITS)]),
        // 04: writes at 2048k+4k, 5120k+256k and 12288k+4k while disconnected: 66 bits.
        (
            "8620ec20000000240000000e00000000223fcf801fe7f03dfc3c167e8805",
            &[(512, 1), (1280, 64), (3072, 1)],
        ),
        // 09: from the reattached node: its first 8 MiB, and 10240k+12k.
        (
            "8620ec20000000240000000a00000000e23fcfe6e719e4479800",
            &[(0, 2048), (2560, 3)],
        ),
    ];
    for (h, set) in cases {
        let bytes = hex(h);
        let f = decode_exact(&bytes, ctx);
        let mut words = vec![0u64; words_for(BITS)];
        let mut rx = BitmapReceiver::new(BITS);
        assert_eq!(rx.receive(&mut words, H100, &f.packet), Ok(true));
        let mut want = vec![0u64; words_for(BITS)];
        for &(start, len) in *set {
            for b in start..start + len {
                want[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        assert_eq!(words, want, "{h}");
        // Our sender produces the very same packet from the same bitmap.
        let mut tx = BitmapSender::new(BITS, true);
        let p = tx
            .next_packet(&want, H100)
            .expect("encodes")
            .expect("a packet");
        assert!(tx.is_done());
        assert_eq!(
            encoded(
                &Frame {
                    kind: H100,
                    volume: 0,
                    packet: p
                },
                ctx
            ),
            bytes,
            "{h}"
        );
    }

    // 09, use-rle=no: one plain packet of 64 words, then the empty terminator.
    let f = decode_exact(&testdata("p_bitmap.hex"), ctx);
    let mut words = vec![0u64; words_for(BITS)];
    let mut rx = BitmapReceiver::new(BITS);
    assert_eq!(rx.receive(&mut words, H100, &f.packet), Ok(false));
    let end = decode_exact(&hex("8620ec20000000040000000000000000"), ctx);
    assert_eq!(rx.receive(&mut words, H100, &end.packet), Ok(true));
    let set: Vec<_> = (0..BITS)
        .filter(|&b| words[(b / 64) as usize] >> (b % 64) & 1 != 0)
        .collect();
    assert_eq!(set, [2560, 2561, 2562]);
    let mut tx = BitmapSender::new(BITS, false);
    let p1 = tx.next_packet(&words, H100).expect("ok").expect("packet");
    assert_eq!(
        encoded(
            &Frame {
                kind: H100,
                volume: 0,
                packet: p1
            },
            ctx
        ),
        testdata("p_bitmap.hex")
    );
    let p2 = tx.next_packet(&words, H100).expect("ok").expect("packet");
    assert_eq!(p2, Packet::Bitmap(Bitmap::default()));
    assert!(tx.is_done());
    assert_eq!(tx.next_packet(&words, H100), Ok(None));
}

// ---------------------------------------------------------------------------------------
// Limits: every violation is a typed error, header violations before any payload arrives

#[test]
fn oversized_headers_fail_before_the_payload_arrives() {
    let ctx = CAPTURE_CTX;
    let cases: Vec<(Command, u32, WireError)> = vec![
        (
            Command::Data,
            (24 + MAX_BIO_SIZE + 1) as u32,
            WireError::TooLong {
                command: Command::Data,
                length: 24 + MAX_BIO_SIZE + 1,
                max: 24 + MAX_BIO_SIZE,
            },
        ),
        (
            Command::Data,
            23,
            WireError::TooShort {
                command: Command::Data,
                length: 23,
                min: 24,
            },
        ),
        (
            Command::Data,
            u32::MAX,
            WireError::TooLong {
                command: Command::Data,
                length: u32::MAX as usize,
                max: 24 + MAX_BIO_SIZE,
            },
        ),
        (
            Command::Wsame,
            28 + 511,
            WireError::TooShort {
                command: Command::Wsame,
                length: 539,
                min: 540,
            },
        ),
        (
            Command::Trim,
            29,
            WireError::TooLong {
                command: Command::Trim,
                length: 29,
                max: 28,
            },
        ),
        (
            Command::Bitmap,
            4081,
            WireError::TooLong {
                command: Command::Bitmap,
                length: 4081,
                max: 4080,
            },
        ),
        (
            Command::CompressedBitmap,
            4081,
            WireError::TooLong {
                command: Command::CompressedBitmap,
                length: 4081,
                max: 4080,
            },
        ),
        (
            Command::CompressedBitmap,
            1,
            WireError::TooShort {
                command: Command::CompressedBitmap,
                length: 1,
                min: 2,
            },
        ),
        (
            Command::Ping,
            1,
            WireError::TooLong {
                command: Command::Ping,
                length: 1,
                max: 0,
            },
        ),
        (
            Command::WriteAck,
            25,
            WireError::TooLong {
                command: Command::WriteAck,
                length: 25,
                max: 24,
            },
        ),
        (
            Command::WriteAck,
            23,
            WireError::TooShort {
                command: Command::WriteAck,
                length: 23,
                min: 24,
            },
        ),
        (
            Command::BarrierAck,
            4,
            WireError::TooShort {
                command: Command::BarrierAck,
                length: 4,
                min: 8,
            },
        ),
        (
            Command::StateChgReply,
            8,
            WireError::TooLong {
                command: Command::StateChgReply,
                length: 8,
                max: 4,
            },
        ),
        (
            Command::Sizes,
            32,
            WireError::TooShort {
                command: Command::Sizes,
                length: 32,
                min: 56,
            },
        ),
        (
            Command::Uuids,
            56,
            WireError::TooLong {
                command: Command::Uuids,
                length: 56,
                max: 48,
            },
        ),
        (
            Command::AuthChallenge,
            63,
            WireError::TooShort {
                command: Command::AuthChallenge,
                length: 63,
                min: 64,
            },
        ),
        (
            Command::AuthChallenge,
            129,
            WireError::TooLong {
                command: Command::AuthChallenge,
                length: 129,
                max: 128,
            },
        ),
        (
            Command::AuthResponse,
            65,
            WireError::TooLong {
                command: Command::AuthResponse,
                length: 65,
                max: 64,
            },
        ),
        (
            Command::Protocol,
            24 + 65,
            WireError::TooLong {
                command: Command::Protocol,
                length: 89,
                max: 88,
            },
        ),
        (
            Command::Protocol,
            24,
            WireError::TooShort {
                command: Command::Protocol,
                length: 24,
                min: 25,
            },
        ),
        (
            Command::SyncParam89,
            149,
            WireError::TooLong {
                command: Command::SyncParam89,
                length: 149,
                max: 148,
            },
        ),
        (
            Command::SyncParam,
            3,
            WireError::TooShort {
                command: Command::SyncParam,
                length: 3,
                min: 4,
            },
        ),
        (
            Command::OvReply,
            24 + 65,
            WireError::TooLong {
                command: Command::OvReply,
                length: 89,
                max: 88,
            },
        ),
        (
            Command::ConnectionFeatures,
            71,
            WireError::TooShort {
                command: Command::ConnectionFeatures,
                length: 71,
                min: 72,
            },
        ),
        (
            Command::InitialData,
            4,
            WireError::TooLong {
                command: Command::InitialData,
                length: 4,
                max: 0,
            },
        ),
    ];
    for (command, length, want) in cases {
        let header = h100_header(command, length);
        let mut buf = BytesMut::from(&header[..]);
        let cap = buf.capacity();
        assert_eq!(
            Decoder::new(ctx).decode(&mut buf),
            Err(want),
            "{command} {length}"
        );
        // Nothing consumed, nothing reserved.
        assert_eq!(&buf[..], &header[..]);
        assert_eq!(buf.capacity(), cap);
    }
    // The sync parameter lengths between the layouts fail at the header too.
    let err = decode_err(&h100_header(Command::SyncParam89, 100), &ctx);
    assert!(
        matches!(
            err,
            WireError::BadPayload {
                command: Command::SyncParam89,
                ..
            }
        ),
        "{err}"
    );
    // h80 bitmap packets have 8 more bytes.
    let err = decode_err(&hex("83740267 0004 0ff9"), &ctx);
    assert_eq!(
        err,
        WireError::TooLong {
            command: Command::Bitmap,
            length: 4089,
            max: 4088
        }
    );
    // With an integrity digest the data limits grow by its length.
    let ctx20 = WireContext {
        integrity_digest_len: 20,
        ..ctx
    };
    assert_eq!(
        decode_err(&h100_header(Command::Data, 43), &ctx20),
        WireError::TooShort {
            command: Command::Data,
            length: 43,
            min: 44
        }
    );
    // Below protocol 87, P_PROTOCOL has no string.
    let ctx86 = WireContext {
        protocol_version: 86,
        ..WireContext::default()
    };
    assert_eq!(
        decode_err(&hex("83740267 000b 0019"), &ctx86),
        WireError::TooLong {
            command: Command::Protocol,
            length: 25,
            max: 24
        }
    );
}

#[test]
fn a_valid_big_header_reserves_exactly_its_frame() {
    let header = h100_header(Command::Data, (24 + MAX_BIO_SIZE) as u32);
    let mut buf = BytesMut::from(&header[..]);
    let mut decoder = Decoder::new(CAPTURE_CTX);
    assert_eq!(decoder.decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= 16 + 24 + MAX_BIO_SIZE);
    assert_eq!(decoder.consumed(), 0);
}

#[test]
fn header_errors() {
    let ctx = CAPTURE_CTX;
    assert_eq!(
        decode_err(&hex("deadbeef00000000"), &ctx),
        WireError::BadMagic { found: 0xdead_beef }
    );
    // h80's magic must be complete.
    assert_eq!(
        decode_err(&hex("83740268 0013 0000"), &ctx),
        WireError::BadMagic { found: 0x8374_0268 }
    );
    // Fewer than four bytes cannot be judged yet.
    let mut buf = BytesMut::from(&hex("dead")[..]);
    assert_eq!(Decoder::new(ctx).decode(&mut buf), Ok(None));
    let mut buf = BytesMut::from(&hex("8620ec20 0000 0013 0000")[..]);
    assert_eq!(Decoder::new(ctx).decode(&mut buf), Ok(None));
    assert_eq!(
        decode_err(&hex("8620ec20 0000 0013 00000000 00000001"), &ctx),
        WireError::NonZeroPad
    );
    assert_eq!(
        decode_err(&h100(0, 0x2e, &[]), &ctx),
        WireError::UnknownCommand(0x2e)
    );
    assert_eq!(
        decode_err(&h100(0, 0x100, &[]), &ctx),
        WireError::UnknownCommand(0x100)
    );
    assert_eq!(
        decode_err(&h80(0x42, &[]), &ctx),
        WireError::UnknownCommand(0x42)
    );
    // h95: 16-bit magic, 32-bit length.
    let f = decode_one(&hex("835a 0013 00000000"), &ctx);
    assert_eq!((f.kind, f.volume, f.packet), (H95, 0, Packet::Ping));
    assert_eq!(
        Header::parse(&hex("8620ec20 0007 0016 00000018 00000000")),
        Ok(Some(Header {
            kind: H100,
            command: 0x16,
            volume: 7,
            length: 24
        }))
    );
}

#[test]
fn payload_errors() {
    let ctx = CAPTURE_CTX;
    let bad = |bytes: Vec<u8>, ctx: &WireContext| match decode_err(&bytes, ctx) {
        WireError::BadPayload { command, reason } => (command, reason),
        other => panic!("expected BadPayload, got {other:?}"),
    };
    // Data not a multiple of 512.
    let (c, r) = bad(h100(0, 0x00, &[0; 24 + 100]), &ctx);
    assert_eq!(c, Command::Data);
    assert!(r.contains("multiple of 512"), "{r}");
    // Bitmap words not whole.
    assert_eq!(bad(h100(0, 0x04, &[0; 12]), &ctx).0, Command::Bitmap);
    // Compressed bitmap with another code.
    let (c, r) = bad(h100(0, 0x24, &[0x83, 0xff]), &ctx);
    assert_eq!(c, Command::CompressedBitmap);
    assert!(r.contains("RLE_VLI_Bits"), "{r}");
    // Protocol strings: unterminated, NUL inside, not UTF-8.
    let fields = [0u8; 24];
    for (tail, what) in [
        (&b"md5"[..], "NUL-terminated"),
        (b"m\0d5\0", "NUL inside"),
        (b"\xff\xfe\0", "UTF-8"),
    ] {
        let (c, r) = bad(h100(0, 0x0b, &[&fields[..], tail].concat()), &ctx);
        assert_eq!(c, Command::Protocol);
        assert!(r.contains(what), "{r}");
    }
    // P_SYNC_PARAM89 names: no NUL in the field, junk after the NUL.
    let mut p = vec![0u8; 132];
    p[4..68].fill(b'a');
    assert!(bad(h100(0, 0x23, &p), &ctx).1.contains("no NUL"));
    let mut p = vec![0u8; 148];
    p[4..8].copy_from_slice(b"sha1");
    p[70] = 1;
    let (_, r) = bad(h100(0, 0x23, &p), &ctx);
    assert!(r.contains("nonzero padding at payload byte 70"), "{r}");
    // P_SYNC_PARAM (protocol 88 layout) must end in NUL.
    assert!(bad(h100(0, 0x0a, b"\0\0\0\x01sha1"), &ctx)
        .1
        .contains("NUL-terminated"));
    // The payload error consumed the frame.
    let mut buf = BytesMut::from(&h100(0, 0x04, &[0; 12])[..]);
    let mut decoder = Decoder::new(ctx);
    assert!(decoder.decode(&mut buf).is_err());
    assert!(buf.is_empty());
    assert_eq!(decoder.consumed(), 28);
}

#[test]
fn sync_param_layouts() {
    let ctx = &CAPTURE_CTX;
    let layouts = [
        SyncParam::Rate { resync_rate: 250 },
        SyncParam::Verify {
            resync_rate: 250,
            verify_alg: String::new(),
        },
        SyncParam::Verify {
            resync_rate: 250,
            verify_alg: "crc32c".into(),
        },
        SyncParam::Algs {
            resync_rate: 1,
            verify_alg: "md5".into(),
            csums_alg: "sha1".into(),
        },
        SyncParam::default(),
    ];
    let lens = [4, 5, 11, 132, 148];
    for (s, len) in layouts.into_iter().zip(lens) {
        assert_eq!(s.wire_len(), len);
        for p in [Packet::SyncParam(s.clone()), Packet::SyncParam89(s.clone())] {
            let frame = Frame {
                kind: H100,
                volume: 0,
                packet: p,
            };
            let bytes = encoded(&frame, ctx);
            assert_eq!(bytes.len(), 16 + len);
            assert_eq!(decode_one(&bytes, ctx), frame);
        }
    }
    assert_eq!(SyncParam::default().resync_rate(), 250);
    assert_eq!(SyncParam::Rate { resync_rate: 1 }.verify_alg(), "");
}

#[test]
fn encode_errors_leave_the_output_alone() {
    let ctx = CAPTURE_CTX;
    let check = |frame: Frame, ctx: &WireContext, want: &dyn Fn(&WireError) -> bool| {
        let mut out = BytesMut::from(&b"keep"[..]);
        let err = encode(&frame, ctx, &mut out).expect_err("must fail");
        assert!(want(&err), "unexpected {err:?}");
        assert_eq!(&out[..], b"keep");
    };
    let data = |len: usize| {
        Packet::Data(DataPacket {
            data: Bytes::from(vec![0; len]),
            ..Default::default()
        })
    };
    // h80 length field overflows.
    check(
        Frame {
            kind: H80,
            volume: 0,
            packet: data(128 * 1024),
        },
        &ctx,
        &|e| {
            *e == WireError::TooLong {
                command: Command::Data,
                length: 24 + 128 * 1024,
                max: 0xffff,
            }
        },
    );
    // Data above 1 MiB.
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: data(MAX_BIO_SIZE + 512),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::TooLong {
                    command: Command::Data,
                    ..
                }
            )
        },
    );
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: data(100),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::Data,
                    ..
                }
            )
        },
    );
    // Volumes need h100.
    check(
        Frame {
            kind: H80,
            volume: 1,
            packet: Packet::Ping,
        },
        &ctx,
        &|e| {
            *e == WireError::VolumeNotRepresentable {
                kind: H80,
                volume: 1,
            }
        },
    );
    // The digest must match the context.
    let ctx20 = WireContext {
        integrity_digest_len: 20,
        ..ctx
    };
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: data(512),
        },
        &ctx20,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::Data,
                    ..
                }
            )
        },
    );
    // Queue limits only with FF_WSAME.
    let sizes = Packet::Sizes(Sizes {
        queue_limits: Some(QueueLimits::default()),
        ..Default::default()
    });
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: sizes,
        },
        &WireContext { features: 0, ..ctx },
        &|e| {
            matches!(
                e,
                WireError::TooLong {
                    command: Command::Sizes,
                    ..
                }
            )
        },
    );
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: Packet::Sizes(Sizes::default()),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::TooShort {
                    command: Command::Sizes,
                    ..
                }
            )
        },
    );
    // Names: too long, NUL inside; and none at all below protocol 87.
    let proto = |alg: &str| {
        Packet::Protocol(Protocol {
            integrity_alg: alg.into(),
            ..Default::default()
        })
    };
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: proto(&"x".repeat(64)),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::TooLong {
                    command: Command::Protocol,
                    ..
                }
            )
        },
    );
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: proto("a\0b"),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::Protocol,
                    ..
                }
            )
        },
    );
    check(
        Frame {
            kind: H80,
            volume: 0,
            packet: proto("md5"),
        },
        &WireContext {
            protocol_version: 86,
            ..ctx
        },
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::Protocol,
                    ..
                }
            )
        },
    );
    let sp = Packet::SyncParam89(SyncParam::Algs {
        resync_rate: 1,
        verify_alg: "v".repeat(64),
        csums_alg: String::new(),
    });
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: sp,
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::SyncParam89,
                    ..
                }
            )
        },
    );
    // Bitmap limits.
    let words = |n: usize| {
        Packet::Bitmap(Bitmap {
            words: Bytes::from(vec![0; n]),
        })
    };
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: words(4088),
        },
        &ctx,
        &|e| {
            *e == WireError::TooLong {
                command: Command::Bitmap,
                length: 4088,
                max: 4080,
            }
        },
    );
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: words(4),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::Bitmap,
                    ..
                }
            )
        },
    );
    let cb = |encoding: u8| {
        Packet::CompressedBitmap(CompressedBitmap {
            encoding,
            code: Bytes::from_static(&[1]),
        })
    };
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: cb(0),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::BadPayload {
                    command: Command::CompressedBitmap,
                    ..
                }
            )
        },
    );
    // Auth sizes.
    let ch = |n: usize| Packet::AuthChallenge(Bytes::from(vec![1; n]));
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: ch(32),
        },
        &ctx,
        &|e| {
            matches!(
                e,
                WireError::TooShort {
                    command: Command::AuthChallenge,
                    ..
                }
            )
        },
    );
    // A context with an impossible digest length.
    check(
        Frame {
            kind: H100,
            volume: 0,
            packet: Packet::Ping,
        },
        &WireContext {
            integrity_digest_len: 65,
            ..ctx
        },
        &|e| *e == WireError::DigestLenTooLarge { len: 65, max: 64 },
    );
}

#[test]
fn limits_are_the_documented_values() {
    assert_eq!(limits::P_RS_PARAM_89_SIZE, 132);
    assert_eq!(limits::P_RS_PARAM_95_SIZE, 148);
    assert_eq!(limits::P_FEATURES_SIZE, 72);
    assert_eq!(bitmap::plain_words_per_packet(H80), 511);
    assert_eq!(bitmap::plain_words_per_packet(H100), 510);
    assert_eq!(max_code_bytes(H100), 4079);
    assert_eq!(BlockId::IN_SYNC.0, [0, 0, 0, 0, 0, 0, 0x12, 0x67]);
    assert_eq!(BlockId::OUT_OF_SYNC.0, [0, 0, 0, 0, 0, 0, 0x12, 0x68]);
    assert_eq!(format!("{:?}", ID_SYNCER), "BlockId(ffffffffffffffff)");
}

// ---------------------------------------------------------------------------------------
// Bitmap code

#[test]
fn vli_levels_match_the_table() {
    let want: [(u32, u64, u64); 10] = [
        (2, 1, 2),
        (3, 3, 4),
        (5, 5, 8),
        (7, 9, 16),
        (10, 17, 48),
        (14, 49, 304),
        (21, 305, 8496),
        (29, 8497, 0x20_2130),
        (42, 0x20_2131, 0x4_0020_2130),
        (64, 0x4_0020_2131, 0x100_0004_0020_2130),
    ];
    for (level, (bits, first, last)) in VLI_LEVELS.iter().zip(want) {
        assert_eq!(
            (level.total_bits, level.first, level.last),
            (bits, first, last)
        );
        for v in [first, last] {
            let (code, n) = vli_encode(v).expect("encodable");
            assert_eq!(n, bits);
            assert_eq!(code & ((1 << level.prefix_bits) - 1), level.prefix);
            assert_eq!(vli_decode(code), (v, bits));
        }
    }
    assert_eq!(VLI_MAX, 0x100_0004_0020_2130);
    assert_eq!(vli_encode(0), None);
    assert_eq!(vli_encode(VLI_MAX + 1), None);
    // 1 is "00", 2 is "10" (LSB first: prefix 0, data bit).
    assert_eq!(vli_encode(1), Some((0b00, 2)));
    assert_eq!(vli_encode(2), Some((0b10, 2)));
    assert_eq!(vli_encode(3), Some((0b001, 3)));
}

#[test]
fn bitmap_receiver_rejects_what_the_kernel_rejects() {
    let mut words = vec![0u64; 2];
    // A set run past the end: 100 bits in a 64-bit bitmap (encoded: level 6 value 100).
    let (code, bits) = vli_encode(100).expect("encodable");
    assert_eq!(bits, 14);
    let c = CompressedBitmap {
        encoding: CompressedBitmap::encoding_byte(2, 2, true),
        code: Bytes::from(code.to_le_bytes()[..2].to_vec()),
    };
    let mut rx = BitmapReceiver::new(64);
    assert_eq!(
        rx.receive(&mut words, H100, &Packet::CompressedBitmap(c)),
        Err(bitmap::BitmapError::Overflow {
            start: 0,
            len: 100,
            total_bits: 64
        })
    );
    // A code word cut short by the pad bits.
    let c = CompressedBitmap {
        encoding: CompressedBitmap::encoding_byte(2, 7, false),
        code: Bytes::from_static(&[0x01]),
    };
    let got: Vec<_> = runs(&c).expect("runs").collect();
    assert_eq!(
        got,
        [Err(bitmap::BitmapError::TruncatedCode {
            bit: 0,
            need: 3,
            have: 1
        })]
    );
    // Plain packets must have the size the position calls for.
    let mut rx = BitmapReceiver::new(64);
    let p = Packet::Bitmap(Bitmap {
        words: Bytes::from(vec![0; 16]),
    });
    assert_eq!(
        rx.receive(&mut words, H100, &p),
        Err(bitmap::BitmapError::PlainSizeMismatch { want: 8, got: 16 })
    );
    assert_eq!(
        rx.receive(&mut words, H100, &Packet::Ping),
        Err(bitmap::BitmapError::NotBitmapPacket(Command::Ping))
    );
    let mut rx = BitmapReceiver::new(200);
    assert!(matches!(
        rx.receive(&mut words, H100, &p),
        Err(bitmap::BitmapError::BitmapTooSmall { .. })
    ));
}

#[test]
fn bitmap_of_alternating_bits_goes_plain() {
    // Every other bit set: 2 code bits per plain bit, so RLE does not pay off.
    let words = vec![0x5555_5555_5555_5555u64; 100];
    let total = 100 * 64;
    let chunk = encode_rle_chunk(&words, total, 0, H100)
        .expect("ok")
        .expect("chunk");
    assert!(!chunk.compresses());
    let mut tx = BitmapSender::new(total, true);
    let p = tx.next_packet(&words, H100).expect("ok").expect("packet");
    assert!(matches!(p, Packet::Bitmap(ref b) if b.words.len() == 800));
    check_bitmap_transfer(&words, total, true, H100);
}

#[test]
fn big_bitmaps_need_several_packets() {
    // 8 Mi bits with a dense random-looking middle: plain and compressed packets mixed.
    let total = 1u64 << 20;
    let mut words = vec![0u64; words_for(total)];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in words.iter_mut().skip(4000).take(3000) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    for w in words.iter_mut().skip(9000).take(100) {
        *w = u64::MAX;
    }
    for kind in [H80, H100] {
        check_bitmap_transfer(&words, total, true, kind);
        check_bitmap_transfer(&words, total, false, kind);
    }
    let mut tx = BitmapSender::new(total, true);
    let mut kinds = std::collections::BTreeMap::new();
    while let Some(p) = tx.next_packet(&words, H100).expect("ok") {
        *kinds.entry(p.command().name()).or_insert(0) += 1;
    }
    assert!(
        kinds["P_BITMAP"] >= 5 && kinds["P_COMPRESSED_BITMAP"] >= 2,
        "{kinds:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Property tests

fn bytes_between(min: usize, max: usize) -> BoxedStrategy<Bytes> {
    prop::collection::vec(any::<u8>(), min..=max)
        .prop_map(Bytes::from)
        .boxed()
}

fn block_id() -> BoxedStrategy<BlockId> {
    prop_oneof![
        3 => any::<[u8; 8]>().prop_map(BlockId),
        1 => Just(ID_SYNCER),
        1 => Just(ID_IN_SYNC),
        1 => Just(ID_OUT_OF_SYNC),
    ]
    .boxed()
}

/// 0..=max_blocks sectors of pseudo-random data.
fn sectors(min_blocks: usize, max_blocks: usize) -> BoxedStrategy<Bytes> {
    (min_blocks..=max_blocks, any::<u64>())
        .prop_map(|(n, seed)| {
            let mut x = seed | 1;
            let v: Vec<u8> = (0..n * 512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            Bytes::from(v)
        })
        .boxed()
}

fn name() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9()-]{1,63}",
        Just("x".repeat(63)),
        "[a-zäöü€]{0,15}",
    ]
    .boxed()
}

fn data_packet(ctx: WireContext) -> BoxedStrategy<DataPacket> {
    (
        any::<u64>(),
        block_id(),
        any::<u32>(),
        any::<u32>(),
        bytes_between(ctx.integrity_digest_len, ctx.integrity_digest_len),
        sectors(0, 4),
    )
        .prop_map(
            |(sector, block_id, seq_num, dp_flags, digest, data)| DataPacket {
                sector,
                block_id,
                seq_num,
                dp_flags,
                digest,
                data,
            },
        )
        .boxed()
}

fn trim() -> BoxedStrategy<Trim> {
    (
        any::<u64>(),
        block_id(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(sector, block_id, seq_num, dp_flags, size)| Trim {
            sector,
            block_id,
            seq_num,
            dp_flags,
            size,
        })
        .boxed()
}

fn block_ack() -> BoxedStrategy<BlockAck> {
    (any::<u64>(), block_id(), any::<u32>(), any::<u32>())
        .prop_map(|(sector, block_id, blksize, seq_num)| BlockAck {
            sector,
            block_id,
            blksize,
            seq_num,
        })
        .boxed()
}

fn block_req() -> BoxedStrategy<BlockRequest> {
    (
        any::<u64>(),
        block_id(),
        any::<u32>(),
        prop_oneof![3 => Just(0u32), 1 => any::<u32>()],
    )
        .prop_map(|(sector, block_id, blksize, pad)| BlockRequest {
            sector,
            block_id,
            blksize,
            pad,
        })
        .boxed()
}

fn block_desc() -> BoxedStrategy<BlockDesc> {
    (any::<u64>(), any::<u32>(), any::<u32>())
        .prop_map(|(sector, blksize, pad)| BlockDesc {
            sector,
            blksize,
            pad,
        })
        .boxed()
}

fn req_state() -> BoxedStrategy<ReqState> {
    (any::<u32>(), any::<u32>())
        .prop_map(|(m, v)| ReqState {
            mask: State::from_raw(m),
            val: State::from_raw(v),
        })
        .boxed()
}

fn state_reply() -> BoxedStrategy<StateReply> {
    any::<i32>()
        .prop_map(|retcode| StateReply { retcode })
        .boxed()
}

fn protocol(ctx: WireContext) -> BoxedStrategy<Protocol> {
    let alg = if (1..87).contains(&ctx.protocol_version) {
        Just(String::new()).boxed()
    } else {
        name()
    };
    (any::<[u32; 6]>(), alg)
        .prop_map(|(v, integrity_alg)| Protocol {
            protocol: v[0],
            after_sb_0p: v[1],
            after_sb_1p: v[2],
            after_sb_2p: v[3],
            conn_flags: v[4],
            two_primaries: v[5],
            integrity_alg,
        })
        .boxed()
}

fn sync_param() -> BoxedStrategy<SyncParam> {
    prop_oneof![
        any::<u32>().prop_map(|resync_rate| SyncParam::Rate { resync_rate }),
        (any::<u32>(), name()).prop_map(|(resync_rate, verify_alg)| SyncParam::Verify {
            resync_rate,
            verify_alg
        }),
        (any::<u32>(), name(), name()).prop_map(|(resync_rate, verify_alg, csums_alg)| {
            SyncParam::Algs {
                resync_rate,
                verify_alg,
                csums_alg,
            }
        }),
        (any::<u32>(), name(), name(), any::<[u32; 4]>()).prop_map(
            |(resync_rate, verify_alg, csums_alg, c)| {
                SyncParam::Controller {
                    resync_rate,
                    verify_alg,
                    csums_alg,
                    c_plan_ahead: c[0],
                    c_delay_target: c[1],
                    c_fill_target: c[2],
                    c_max_rate: c[3],
                }
            }
        ),
    ]
    .boxed()
}

fn sizes(ctx: WireContext) -> BoxedStrategy<Sizes> {
    let qlim = if ctx.features & FF_WSAME != 0 {
        (any::<[u32; 5]>(), any::<[u8; 4]>())
            .prop_map(|(v, b)| {
                Some(QueueLimits {
                    physical_block_size: v[0],
                    logical_block_size: v[1],
                    alignment_offset: v[2],
                    io_min: v[3],
                    io_opt: v[4],
                    discard_enabled: b[0],
                    discard_zeroes_data: b[1],
                    write_same_capable: b[2],
                    pad: b[3],
                })
            })
            .boxed()
    } else {
        Just(None).boxed()
    };
    (
        any::<[u64; 3]>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        qlim,
    )
        .prop_map(
            |(s, max_bio_size, queue_order_type, dds_flags, queue_limits)| Sizes {
                d_size: s[0],
                u_size: s[1],
                c_size: s[2],
                max_bio_size,
                queue_order_type,
                dds_flags,
                queue_limits,
            },
        )
        .boxed()
}

/// Packets of one command that are valid under `ctx` with a `kind` header. The match is
/// exhaustive, so every command has a strategy.
fn packet_for(command: Command, ctx: WireContext, kind: HeaderKind) -> BoxedStrategy<Packet> {
    use Command as C;
    let bitmap_max = limits::BITMAP_PACKET_MAX - kind.size();
    match command {
        C::Data => data_packet(ctx).prop_map(Packet::Data).boxed(),
        C::DataReply => data_packet(ctx).prop_map(Packet::DataReply).boxed(),
        C::RsDataReply => data_packet(ctx).prop_map(Packet::RsDataReply).boxed(),
        C::Barrier => (any::<[u8; 4]>(), prop_oneof![Just(0u32), any::<u32>()])
            .prop_map(|(barrier, pad)| Packet::Barrier(Barrier { barrier, pad }))
            .boxed(),
        C::Bitmap => (0..=bitmap_max / 8)
            .prop_flat_map(|n| bytes_between(n * 8, n * 8))
            .prop_map(|words| Packet::Bitmap(Bitmap { words }))
            .boxed(),
        C::BecomeSyncTarget => Just(Packet::BecomeSyncTarget).boxed(),
        C::BecomeSyncSource => Just(Packet::BecomeSyncSource).boxed(),
        C::UnplugRemote => Just(Packet::UnplugRemote).boxed(),
        C::DataRequest => block_req().prop_map(Packet::DataRequest).boxed(),
        C::RsDataRequest => block_req().prop_map(Packet::RsDataRequest).boxed(),
        C::SyncParam => sync_param().prop_map(Packet::SyncParam).boxed(),
        C::Protocol => protocol(ctx).prop_map(Packet::Protocol).boxed(),
        C::Uuids => any::<[u64; 6]>()
            .prop_map(|u| {
                Packet::Uuids(Uuids {
                    current: u[0],
                    bitmap: u[1],
                    history: [u[2], u[3]],
                    dirty_bits: u[4],
                    flags: u[5],
                })
            })
            .boxed(),
        C::Sizes => sizes(ctx).prop_map(Packet::Sizes).boxed(),
        C::State => any::<u32>()
            .prop_map(|raw| Packet::State(State::from_raw(raw)))
            .boxed(),
        C::SyncUuid => any::<u64>()
            .prop_map(|uuid| Packet::SyncUuid(SyncUuid { uuid }))
            .boxed(),
        C::AuthChallenge => bytes_between(64, 128)
            .prop_map(Packet::AuthChallenge)
            .boxed(),
        C::AuthResponse => bytes_between(0, 64).prop_map(Packet::AuthResponse).boxed(),
        C::StateChgReq => req_state().prop_map(Packet::StateChgReq).boxed(),
        C::Ping => Just(Packet::Ping).boxed(),
        C::PingAck => Just(Packet::PingAck).boxed(),
        C::RecvAck => block_ack().prop_map(Packet::RecvAck).boxed(),
        C::WriteAck => block_ack().prop_map(Packet::WriteAck).boxed(),
        C::RsWriteAck => block_ack().prop_map(Packet::RsWriteAck).boxed(),
        C::Superseded => block_ack().prop_map(Packet::Superseded).boxed(),
        C::NegAck => block_ack().prop_map(Packet::NegAck).boxed(),
        C::NegDReply => block_ack().prop_map(Packet::NegDReply).boxed(),
        C::NegRsDReply => block_ack().prop_map(Packet::NegRsDReply).boxed(),
        C::BarrierAck => (any::<[u8; 4]>(), any::<u32>())
            .prop_map(|(barrier, set_size)| Packet::BarrierAck(BarrierAck { barrier, set_size }))
            .boxed(),
        C::StateChgReply => state_reply().prop_map(Packet::StateChgReply).boxed(),
        C::OvRequest => block_req().prop_map(Packet::OvRequest).boxed(),
        C::OvReply => (block_req(), bytes_between(0, 64))
            .prop_map(|(request, digest)| Packet::OvReply(DigestRequest { request, digest }))
            .boxed(),
        C::OvResult => block_ack().prop_map(Packet::OvResult).boxed(),
        C::CsumRsRequest => (block_req(), bytes_between(0, 64))
            .prop_map(|(request, digest)| Packet::CsumRsRequest(DigestRequest { request, digest }))
            .boxed(),
        C::RsIsInSync => block_ack().prop_map(Packet::RsIsInSync).boxed(),
        C::SyncParam89 => sync_param().prop_map(Packet::SyncParam89).boxed(),
        C::CompressedBitmap => (any::<u8>(), bytes_between(1, bitmap_max - 1))
            .prop_map(|(e, code)| {
                Packet::CompressedBitmap(CompressedBitmap {
                    encoding: (e & 0xf0) | CompressedBitmap::RLE_VLI_BITS,
                    code,
                })
            })
            .boxed(),
        C::DelayProbe => any::<[u32; 2]>()
            .prop_map(|v| {
                Packet::DelayProbe(DelayProbe {
                    seq_num: v[0],
                    offset: v[1],
                })
            })
            .boxed(),
        C::OutOfSync => block_desc().prop_map(Packet::OutOfSync).boxed(),
        C::RsCancel => block_ack().prop_map(Packet::RsCancel).boxed(),
        C::ConnStChgReq => req_state().prop_map(Packet::ConnStChgReq).boxed(),
        C::ConnStChgReply => state_reply().prop_map(Packet::ConnStChgReply).boxed(),
        C::RetryWrite => block_ack().prop_map(Packet::RetryWrite).boxed(),
        C::ProtocolUpdate => protocol(ctx).prop_map(Packet::ProtocolUpdate).boxed(),
        C::Trim => trim().prop_map(Packet::Trim).boxed(),
        C::RsThinReq => block_req().prop_map(Packet::RsThinReq).boxed(),
        C::RsDeallocated => block_desc().prop_map(Packet::RsDeallocated).boxed(),
        C::Wsame => (
            trim(),
            bytes_between(ctx.integrity_digest_len, ctx.integrity_digest_len),
            sectors(1, 3),
        )
            .prop_map(|(t, digest, data)| {
                Packet::Wsame(Wsame {
                    sector: t.sector,
                    block_id: t.block_id,
                    seq_num: t.seq_num,
                    dp_flags: t.dp_flags,
                    size: t.size,
                    digest,
                    data,
                })
            })
            .boxed(),
        C::Zeroes => trim().prop_map(Packet::Zeroes).boxed(),
        C::InitialMeta => Just(Packet::InitialMeta).boxed(),
        C::InitialData => Just(Packet::InitialData).boxed(),
        C::ConnectionFeatures => (
            any::<[u32; 3]>(),
            prop_oneof![
                3 => Just([0u8; 60]),
                1 => prop::collection::vec(any::<u8>(), 60).prop_map(|v| {
                    let mut a = [0u8; 60];
                    a.copy_from_slice(&v);
                    a
                }),
            ],
        )
            .prop_map(|(v, reserved)| {
                Packet::ConnectionFeatures(ConnectionFeatures {
                    protocol_min: v[0],
                    feature_flags: v[1],
                    protocol_max: v[2],
                    reserved,
                })
            })
            .boxed(),
    }
}

fn context() -> impl Strategy<Value = WireContext> {
    (
        prop::sample::select(vec![0usize, 16, 20, 32, 64]),
        prop::sample::select(vec![0u32, FF_TRIM | FF_THIN_RESYNC, 0x7, 0xf, FF_WSAME]),
        prop::sample::select(vec![0u32, 86, 87, 88, 90, 94, 95, 96, 99, 100, 101]),
    )
        .prop_map(
            |(integrity_digest_len, features, protocol_version)| WireContext {
                integrity_digest_len,
                features,
                protocol_version,
                integrity: None,
            },
        )
}

fn kind() -> impl Strategy<Value = HeaderKind> {
    prop::sample::select(vec![H80, H95, H100])
}

/// A context and a valid frame of one of `commands` under it.
fn frame_of(commands: Vec<Command>) -> impl Strategy<Value = (WireContext, Frame)> {
    (
        context(),
        kind(),
        any::<u16>(),
        prop::sample::select(commands),
    )
        .prop_flat_map(|(ctx, kind, volume, command)| {
            let volume = if kind == H100 { volume } else { 0 };
            packet_for(command, ctx, kind).prop_map(move |packet| {
                (
                    ctx,
                    Frame {
                        kind,
                        volume,
                        packet,
                    },
                )
            })
        })
}

/// A context and several valid frames under it.
fn stream() -> impl Strategy<Value = (WireContext, Vec<Frame>)> {
    (
        context(),
        prop::collection::vec(
            (
                kind(),
                any::<u16>(),
                prop::sample::select(Command::ALL.to_vec()),
            ),
            1..6,
        ),
    )
        .prop_flat_map(|(ctx, specs)| {
            let frames: Vec<_> = specs
                .into_iter()
                .map(|(kind, volume, command)| {
                    let volume = if kind == H100 { volume } else { 0 };
                    packet_for(command, ctx, kind).prop_map(move |packet| Frame {
                        kind,
                        volume,
                        packet,
                    })
                })
                .collect();
            (Just(ctx), frames)
        })
}

fn assert_round_trip(ctx: &WireContext, frame: &Frame) -> Result<(), TestCaseError> {
    let mut out = BytesMut::new();
    encode(frame, ctx, &mut out).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let bytes = out.to_vec();
    prop_assert_eq!(
        bytes.len(),
        frame.kind.size() + frame.packet.payload_len(ctx)
    );
    let header = Header::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        header,
        Some(Header {
            kind: frame.kind,
            command: frame.packet.command().code(),
            volume: frame.volume,
            length: frame.packet.payload_len(ctx) as u32,
        })
    );
    let decoded = Decoder::new(*ctx).decode(&mut out);
    prop_assert_eq!(decoded, Ok(Some(frame.clone())));
    prop_assert!(out.is_empty());
    // And decode-then-encode reproduces the input bytes.
    let again = decode_one(&bytes, ctx);
    prop_assert_eq!(encoded(&again, ctx), bytes);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Every packet type, every header kind, many contexts.
    #[test]
    fn round_trip_any_frame((ctx, frame) in frame_of(Command::ALL.to_vec())) {
        assert_round_trip(&ctx, &frame)?;
    }


    /// Valid frames with a few bytes changed: decoding fails cleanly or yields frames that
    /// re-encode exactly.
    #[test]
    fn mutated_frames_never_panic(
        (ctx, frames) in stream(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        piece in 1usize..40,
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend_from_slice(&encoded(f, &ctx));
        }
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        check_stream(ctx, piece, &bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic and every invariant of the fuzz target holds.
    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..600)) {
        check_decode(&input);
    }

    /// Arbitrary bytes behind a valid header prefix reach the payload parsers.
    #[test]
    fn arbitrary_payloads_never_panic(
        ctx in context(),
        kind in kind(),
        command in prop::sample::select(Command::ALL.to_vec()),
        payload in prop::collection::vec(any::<u8>(), 0..300),
        piece in 1usize..20,
    ) {
        let mut bytes = BytesMut::new();
        let header = Header { kind, command: command.code(), volume: 0, length: payload.len() as u32 };
        if header.write(&mut bytes).is_ok() {
            bytes.extend_from_slice(&payload);
            check_stream(ctx, piece, &bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// One round trip per command, so no packet type depends on luck to be covered.
    #[test]
    fn round_trip_each_command(
        frames in Command::ALL.iter().map(|&c| frame_of(vec![c])).collect::<Vec<_>>()
    ) {
        for (ctx, frame) in &frames {
            assert_round_trip(ctx, frame)?;
        }
    }

    /// A stream fed one byte at a time gives the same frames as fed whole.
    #[test]
    fn byte_at_a_time_equals_whole((ctx, frames) in stream()) {
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend_from_slice(&encoded(f, &ctx));
        }
        let mut whole = BytesMut::from(&bytes[..]);
        let mut decoder = Decoder::new(ctx);
        let mut got = Vec::new();
        while let Some(f) = decoder.decode(&mut whole).map_err(|e| TestCaseError::fail(e.to_string()))? {
            got.push(f);
        }
        prop_assert_eq!(&got, &frames);
        let mut decoder = Decoder::new(ctx);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &bytes {
            buf.extend_from_slice(&[*b]);
            if let Some(f) = decoder.decode(&mut buf).map_err(|e| TestCaseError::fail(e.to_string()))? {
                got.push(f);
            }
        }
        prop_assert_eq!(&got, &frames);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoder.consumed(), bytes.len() as u64);
    }

    /// Every VLI value round-trips with its level's code length, whatever follows it.
    #[test]
    fn vli_round_trip(level in 0usize..10, offset in any::<u64>(), junk in any::<u64>()) {
        let l = VLI_LEVELS[level];
        let value = l.first + offset % (l.last - l.first + 1);
        let (code, bits) = vli_encode(value).expect("in the table");
        prop_assert_eq!(bits, l.total_bits);
        prop_assert_eq!(code & ((1u64 << l.prefix_bits) - 1), l.prefix);
        let lookahead = if bits == 64 { code } else { code | (junk << bits) };
        prop_assert_eq!(vli_decode(lookahead), (value, bits));
    }

    /// A chunk encoded from any start bit decodes to exactly the bits it covers.
    #[test]
    fn rle_chunk_round_trip(
        runs_in in prop::collection::vec(1u64..3000, 1..300),
        first_set in any::<bool>(),
        start_frac in 0.0f64..1.0,
        h80 in any::<bool>(),
    ) {
        let kind = if h80 { H80 } else { H100 };
        let total: u64 = runs_in.iter().sum();
        let mut words = vec![0u64; words_for(total)];
        let mut pos = 0;
        let mut set = first_set;
        for len in &runs_in {
            if set {
                for b in pos..pos + len {
                    words[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
            pos += len;
            set = !set;
        }
        let start = ((total as f64) * start_frac) as u64 % total;
        let chunk = encode_rle_chunk(&words, total, start, kind)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .expect("start is inside the bitmap");
        prop_assert!(chunk.end_bit > start && chunk.end_bit <= total);
        prop_assert!(chunk.bitmap.code.len() <= max_code_bytes(kind));
        let mut at = start;
        for run in runs(&chunk.bitmap).map_err(|e| TestCaseError::fail(e.to_string()))? {
            let Run { set, len } = run.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(len >= 1);
            for b in at..at + len {
                prop_assert_eq!(words[(b / 64) as usize] >> (b % 64) & 1 == 1, set);
            }
            at += len;
        }
        prop_assert_eq!(at, chunk.end_bit);
        // The run after the chunk (if any) has the other polarity: chunks end at run edges.
        if at < total && at > start {
            let last = words[((at - 1) / 64) as usize] >> ((at - 1) % 64) & 1;
            let next = words[(at / 64) as usize] >> (at % 64) & 1;
            prop_assert_ne!(last, next);
        }
    }

    /// Whole transfers of random bitmaps, compressed or plain, h80 or h100.
    #[test]
    fn bitmap_transfer_round_trip(
        runs_in in prop::collection::vec((1u64..5000, any::<u64>()), 0..200),
        tail in 0u64..64,
        use_rle in any::<bool>(),
        h80 in any::<bool>(),
    ) {
        let kind = if h80 { H80 } else { H100 };
        // Runs of constant words and runs of noisy words.
        let mut words = Vec::new();
        for (i, (len, seed)) in runs_in.iter().enumerate() {
            let n = (len / 64 + 1) as usize;
            let mut x = seed | 1;
            for _ in 0..n {
                words.push(match i % 3 {
                    0 => 0,
                    1 => u64::MAX,
                    _ => {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    }
                });
            }
        }
        let total = (words.len() as u64 * 64).saturating_sub(tail);
        if let Some(last) = words.last_mut() {
            if tail > 0 {
                *last &= u64::MAX >> tail;
            }
        }
        check_bitmap_transfer(&words, total, use_rle, kind);
    }
}
