use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const R0_SIZE: u64 = 1 << 20;
const RO_SIZE: u64 = 4096;

struct TestCatalog(BTreeMap<String, ExportInfo>);

impl ExportCatalog for TestCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.0.get(name).cloned()
    }

    fn list(&self) -> Vec<ExportListing> {
        self.0
            .values()
            .map(|e| ExportListing {
                name: e.name.clone(),
                description: e.description.clone(),
            })
            .collect()
    }
}

fn catalog() -> TestCatalog {
    let mut exports = BTreeMap::new();
    exports.insert(
        "r0".to_owned(),
        ExportInfo {
            name: "r0".into(),
            description: "first resource".into(),
            size: R0_SIZE,
            flags: export_flags(false, true),
        },
    );
    exports.insert(
        "ro".to_owned(),
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: RO_SIZE,
            flags: export_flags(true, false),
        },
    );
    TestCatalog(exports)
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u64(IHAVEOPT);
    out.put_u32(opt);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_u16(requests.len() as u16);
    for r in requests {
        out.put_u16(*r);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Bytes,
}

/// Parse one option reply the way a client does; `None` if incomplete or malformed.
fn parse_reply(out: &mut Bytes) -> Option<OptReply> {
    if out.len() < 20 {
        return None;
    }
    let mut peek = &out[..];
    if peek.get_u64() != OPTION_REPLY_MAGIC {
        return None;
    }
    let option = peek.get_u32();
    let kind = peek.get_u32();
    let len = peek.get_u32() as usize;
    if peek.len() < len {
        return None;
    }
    out.advance(20);
    Some(OptReply {
        option,
        kind,
        data: out.split_to(len),
    })
}

/// Replies to one option up to and including the final one.
fn replies_until_final(out: &mut Bytes) -> Vec<OptReply> {
    let mut replies = Vec::new();
    loop {
        let reply = parse_reply(out).expect("a complete option reply");
        let last = reply.kind == rep::ACK || reply.kind & rep::ERROR_BIT != 0;
        replies.push(reply);
        if last {
            return replies;
        }
    }
}

/// A handshake past the greeting and the client flags.
fn started(flags: u32) -> (ServerHandshake, Bytes) {
    let mut hs = ServerHandshake::new();
    let mut input = BytesMut::new();
    input.put_u32(flags);
    assert_eq!(hs.handle(&mut input, &catalog()), Ok(Progress::NeedInput));
    let greeting = hs.take_output();
    (hs, greeting)
}

fn run(hs: &mut ServerHandshake, bytes: &[u8]) -> (Result<Progress, HandshakeError>, Bytes) {
    let mut input = BytesMut::from(bytes);
    let progress = hs.handle(&mut input, &catalog());
    (progress, hs.take_output())
}

#[test]
fn nbd_greeting_is_fixed_newstyle_with_no_zeroes() {
    let (_, greeting) = started(client_flags::FIXED_NEWSTYLE);
    let mut g = &greeting[..];
    assert_eq!(g.len(), 18);
    assert_eq!(g.get_u64(), NBD_MAGIC);
    assert_eq!(g.get_u64(), IHAVEOPT);
    assert_eq!(
        g.get_u16(),
        handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES
    );
}

#[test]
fn nbd_unknown_client_flags_end_the_handshake() {
    let mut hs = ServerHandshake::new();
    let mut input = BytesMut::from(&[0u8, 0, 0, 4][..]);
    assert_eq!(
        hs.handle(&mut input, &catalog()),
        Err(HandshakeError::UnknownClientFlags(4))
    );
    assert_eq!(
        hs.handle(&mut input, &catalog()),
        Err(HandshakeError::Finished)
    );
}

#[test]
fn nbd_export_name_with_and_without_padding() {
    for (flags, padding) in [
        (client_flags::FIXED_NEWSTYLE, 124),
        (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES, 0),
    ] {
        let (mut hs, _) = started(flags);
        let mut stream = option(opt::EXPORT_NAME, b"r0");
        stream.extend_from_slice(b"leftover");
        let mut input = BytesMut::from(&stream[..]);
        let progress = hs.handle(&mut input, &catalog()).unwrap();
        assert_eq!(
            progress,
            Progress::Transmission(Negotiated {
                export: "r0".into(),
                size: R0_SIZE,
                flags: export_flags(false, true),
            })
        );
        assert_eq!(&input[..], b"leftover");
        let mut out = hs.take_output();
        assert_eq!(out.len(), 10 + padding);
        assert_eq!(out.get_u64(), R0_SIZE);
        assert_eq!(out.get_u16(), export_flags(false, true));
        assert!(out.iter().all(|&b| b == 0));
    }
}

#[test]
fn nbd_export_name_unknown_or_invalid_disconnects() {
    let (mut hs, _) = started(1);
    let (progress, out) = run(&mut hs, &option(opt::EXPORT_NAME, b"nope"));
    assert_eq!(progress, Err(HandshakeError::UnknownExport("nope".into())));
    assert!(out.is_empty());

    let (mut hs, _) = started(1);
    let (progress, _) = run(&mut hs, &option(opt::EXPORT_NAME, &[0xff, 0xfe]));
    assert_eq!(progress, Err(HandshakeError::ExportNameNotUtf8));

    let (mut hs, _) = started(1);
    let (progress, _) = run(&mut hs, &option(opt::EXPORT_NAME, &[b'a'; 4097]));
    assert_eq!(progress, Err(HandshakeError::ExportNameTooLong(4097)));
}

#[test]
fn nbd_list_names_every_export() {
    let (mut hs, _) = started(1);
    let (progress, mut out) = run(&mut hs, &option(opt::LIST, &[]));
    assert_eq!(progress, Ok(Progress::NeedInput));
    let replies = replies_until_final(&mut out);
    assert_eq!(replies.len(), 3);
    let mut first = replies[0].data.clone();
    assert_eq!(replies[0].kind, rep::SERVER);
    assert_eq!(first.get_u32(), 2);
    assert_eq!(&first[..], b"r0first resource");
    assert_eq!(&replies[1].data[..], b"\0\0\0\x02ro");
    assert_eq!(replies[2].kind, rep::ACK);
    assert!(replies.iter().all(|r| r.option == opt::LIST));

    let (_, mut out) = run(&mut hs, &option(opt::LIST, b"x"));
    assert_eq!(replies_until_final(&mut out)[0].kind, rep::ERR_INVALID);
}

fn info_items(replies: &[OptReply]) -> BTreeMap<u16, Bytes> {
    replies
        .iter()
        .filter(|r| r.kind == rep::INFO)
        .map(|r| {
            let mut data = r.data.clone();
            (data.get_u16(), data)
        })
        .collect()
}

#[test]
fn nbd_info_then_go() {
    let (mut hs, _) = started(1);
    let request = info_data("r0", &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]);
    let (progress, mut out) = run(&mut hs, &option(opt::INFO, &request));
    assert_eq!(progress, Ok(Progress::NeedInput));
    let replies = replies_until_final(&mut out);
    assert_eq!(replies.last().unwrap().kind, rep::ACK);
    let items = info_items(&replies);
    let mut export = items[&info::EXPORT].clone();
    assert_eq!(export.len(), 10);
    assert_eq!(export.get_u64(), R0_SIZE);
    assert_eq!(export.get_u16(), export_flags(false, true));
    assert_eq!(&items[&info::NAME][..], b"r0");
    assert_eq!(&items[&info::DESCRIPTION][..], b"first resource");
    let mut sizes = items[&info::BLOCK_SIZE].clone();
    assert_eq!(
        (sizes.get_u32(), sizes.get_u32(), sizes.get_u32()),
        (MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD)
    );

    // Without requests: only the mandatory export item and the block sizes.
    let (progress, mut out) = run(&mut hs, &option(opt::GO, &info_data("ro", &[])));
    let replies = replies_until_final(&mut out);
    let items = info_items(&replies);
    assert_eq!(
        items.keys().copied().collect::<Vec<_>>(),
        [info::EXPORT, info::BLOCK_SIZE]
    );
    assert!(out.is_empty());
    assert_eq!(
        progress,
        Ok(Progress::Transmission(Negotiated {
            export: "ro".into(),
            size: RO_SIZE,
            flags: export_flags(true, false),
        }))
    );
}

#[test]
fn nbd_go_unknown_export_can_be_retried() {
    let (mut hs, _) = started(1);
    let (progress, mut out) = run(&mut hs, &option(opt::GO, &info_data("nope", &[])));
    assert_eq!(progress, Ok(Progress::NeedInput));
    let replies = replies_until_final(&mut out);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].kind, rep::ERR_UNKNOWN);
    assert!(std::str::from_utf8(&replies[0].data)
        .unwrap()
        .contains("nope"));
    let (progress, _) = run(&mut hs, &option(opt::GO, &info_data("r0", &[])));
    assert!(matches!(progress, Ok(Progress::Transmission(_))));
}

#[test]
fn nbd_malformed_info_is_invalid() {
    let mut name_too_long = info_data("r0", &[]);
    name_too_long[3] = 200;
    let mut count_mismatch = info_data("r0", &[info::NAME]);
    count_mismatch.pop();
    let mut not_utf8 = info_data("r0", &[]);
    not_utf8[4] = 0xff;
    for data in [&b"\0\0\0"[..], &name_too_long, &count_mismatch, &not_utf8] {
        let (mut hs, _) = started(1);
        let (progress, mut out) = run(&mut hs, &option(opt::GO, data));
        assert_eq!(progress, Ok(Progress::NeedInput));
        assert_eq!(replies_until_final(&mut out)[0].kind, rep::ERR_INVALID);
    }
}

#[test]
fn nbd_unsupported_options() {
    for o in [
        opt::STRUCTURED_REPLY,
        opt::STARTTLS,
        opt::LIST_META_CONTEXT,
        opt::SET_META_CONTEXT,
        opt::EXTENDED_HEADERS,
        opt::PEEK_EXPORT,
        0,
        77,
        u32::MAX,
    ] {
        let (mut hs, _) = started(1);
        let (progress, mut out) = run(&mut hs, &option(o, b"some data"));
        assert_eq!(progress, Ok(Progress::NeedInput));
        let replies = replies_until_final(&mut out);
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0].option, replies[0].kind), (o, rep::ERR_UNSUP));
    }
}

#[test]
fn nbd_abort_is_acknowledged() {
    let (mut hs, _) = started(1);
    let (progress, mut out) = run(&mut hs, &option(opt::ABORT, b"ignored"));
    assert_eq!(progress, Ok(Progress::Aborted));
    assert_eq!(replies_until_final(&mut out)[0].kind, rep::ACK);
    assert!(out.is_empty());
}

#[test]
fn nbd_oversized_option_is_skipped_without_buffering() {
    let (mut hs, _) = started(1);
    let big = vec![7u8; MAX_OPTION_DATA as usize * 5];
    let mut stream = option(99, &big);
    stream.extend(option(opt::LIST, &[]));
    let mut out = BytesMut::new();
    let mut input = BytesMut::new();
    for chunk in stream.chunks(1000) {
        input.extend_from_slice(chunk);
        assert_eq!(hs.handle(&mut input, &catalog()), Ok(Progress::NeedInput));
        // Skipped bytes are consumed as they arrive.
        assert!(input.len() < 1000 + 16);
        out.extend_from_slice(&hs.take_output());
    }
    let mut out = out.freeze();
    assert_eq!(replies_until_final(&mut out)[0].kind, rep::ERR_TOO_BIG);
    assert_eq!(replies_until_final(&mut out).last().unwrap().kind, rep::ACK);
}

#[test]
fn nbd_bad_option_magic_and_too_many_options() {
    let (mut hs, _) = started(1);
    let mut bad = option(opt::LIST, &[]);
    bad[0] ^= 1;
    let (progress, _) = run(&mut hs, &bad);
    assert!(matches!(progress, Err(HandshakeError::BadOptionMagic(_))));

    let (mut hs, _) = started(1);
    let stream: Vec<u8> = (0..=MAX_OPTIONS)
        .flat_map(|_| option(opt::STRUCTURED_REPLY, &[]))
        .collect();
    let (progress, _) = run(&mut hs, &stream);
    assert_eq!(progress, Err(HandshakeError::TooManyOptions));
}

#[test]
fn nbd_shutdown_refuses_options_but_allows_abort() {
    let (mut hs, _) = started(1);
    hs.begin_shutdown();
    let (progress, mut out) = run(&mut hs, &option(opt::GO, &info_data("r0", &[])));
    assert_eq!(progress, Ok(Progress::NeedInput));
    assert_eq!(replies_until_final(&mut out)[0].kind, rep::ERR_SHUTDOWN);
    let (progress, _) = run(&mut hs, &option(opt::ABORT, &[]));
    assert_eq!(progress, Ok(Progress::Aborted));

    let (mut hs, _) = started(1);
    hs.begin_shutdown();
    let (progress, _) = run(&mut hs, &option(opt::EXPORT_NAME, b"r0"));
    assert_eq!(progress, Err(HandshakeError::ShuttingDown));
}

// ---- transmission ----

const SIZE: u64 = 1 << 20;

fn header(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length,
    }
}

fn encode(h: RequestHeader, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    h.encode(&mut out);
    out.extend_from_slice(payload);
    out
}

fn decode_one(decoder: &mut RequestDecoder, bytes: &mut BytesMut) -> Decoded {
    decoder
        .decode(bytes)
        .expect("no protocol error")
        .expect("a complete item")
}

fn rejected(error: ErrorCode) -> impl Fn(&Decoded) -> bool {
    move |d| matches!(d, Decoded::Reject { cookie: 9, error: e, .. } if *e == error)
}

#[test]
fn nbd_valid_requests() {
    let mut d = RequestDecoder::new(SIZE, export_flags(false, true));
    let mut input = encode(header(cmd::READ, 0, 1, 512, 4096), &[]);
    input.extend(encode(header(cmd::WRITE, cmd_flags::FUA, 2, 0, 3), b"abc"));
    input.extend(encode(header(cmd::FLUSH, 0, 3, 0, 0), &[]));
    input.extend(encode(header(cmd::TRIM, 0, 4, SIZE - 10, 10), &[]));
    input.extend(encode(
        header(
            cmd::WRITE_ZEROES,
            cmd_flags::NO_HOLE | cmd_flags::FUA,
            5,
            0,
            100,
        ),
        &[],
    ));
    input.extend(encode(header(cmd::READ, cmd_flags::FUA, 6, SIZE, 0), &[]));
    input.extend(encode(header(cmd::DISC, 0, 7, 0, 0), &[]));
    input.extend_from_slice(b"after disc");
    let expected = [
        Command::Read {
            offset: 512,
            len: 4096,
        },
        Command::Write {
            offset: 0,
            data: Bytes::from_static(b"abc"),
            fua: true,
        },
        Command::Flush,
        Command::Trim {
            offset: SIZE - 10,
            len: 10,
            fua: false,
        },
        Command::WriteZeroes {
            offset: 0,
            len: 100,
            may_trim: false,
            fua: true,
        },
        Command::Read {
            offset: SIZE,
            len: 0,
        },
    ];
    for (i, command) in expected.into_iter().enumerate() {
        assert_eq!(
            decode_one(&mut d, &mut input),
            Decoded::Request(Request {
                cookie: i as u64 + 1,
                command
            })
        );
    }
    assert_eq!(decode_one(&mut d, &mut input), Decoded::Disconnect);
    assert_eq!(d.decode(&mut input), Ok(None));
}

#[test]
fn nbd_rejected_requests_keep_the_stream_in_sync() {
    let big = MAX_PAYLOAD + 1;
    let cases: Vec<(RequestHeader, usize, ErrorCode)> = vec![
        (header(cmd::READ, 0, 9, SIZE - 1, 2), 0, ErrorCode::Inval),
        (header(cmd::READ, 0, 9, u64::MAX, 1), 0, ErrorCode::Inval),
        (header(cmd::READ, 0, 9, 0, big), 0, ErrorCode::Inval),
        (
            header(cmd::READ, cmd_flags::DF, 9, 0, 1),
            0,
            ErrorCode::Inval,
        ),
        (header(cmd::WRITE, 0, 9, SIZE - 1, 2), 2, ErrorCode::NoSpc),
        (
            header(cmd::WRITE, 0, 9, 0, big),
            big as usize,
            ErrorCode::Inval,
        ),
        (
            header(cmd::WRITE, cmd_flags::NO_HOLE, 9, 0, 5),
            5,
            ErrorCode::Inval,
        ),
        (header(cmd::TRIM, 0, 9, SIZE, 1), 0, ErrorCode::Inval),
        (
            header(cmd::TRIM, cmd_flags::NO_HOLE, 9, 0, 1),
            0,
            ErrorCode::Inval,
        ),
        (
            header(cmd::WRITE_ZEROES, 0, 9, SIZE, 1),
            0,
            ErrorCode::NoSpc,
        ),
        (
            header(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 9, 0, 1),
            0,
            ErrorCode::Inval,
        ),
        (
            header(cmd::FLUSH, cmd_flags::NO_HOLE, 9, 0, 0),
            0,
            ErrorCode::Inval,
        ),
        (header(cmd::CACHE, 0, 9, 0, 1), 0, ErrorCode::Inval),
        (header(cmd::BLOCK_STATUS, 0, 9, 0, 1), 0, ErrorCode::Inval),
        (header(0x4242, 0, 9, 0, 1), 0, ErrorCode::Inval),
    ];
    for (h, payload, error) in cases {
        let mut d = RequestDecoder::new(SIZE, export_flags(false, false));
        let mut input = encode(h, &vec![0xaa; payload]);
        input.extend(encode(header(cmd::FLUSH, 0, 10, 0, 0), &[]));
        let item = decode_one(&mut d, &mut input);
        assert!(rejected(error)(&item), "{h:?}: {item:?}");
        assert_eq!(
            decode_one(&mut d, &mut input),
            Decoded::Request(Request {
                cookie: 10,
                command: Command::Flush
            }),
            "{h:?}"
        );
    }
}

#[test]
fn nbd_read_only_export_refuses_writes() {
    let mut d = RequestDecoder::new(SIZE, export_flags(true, false));
    let mut input = encode(header(cmd::WRITE, 0, 9, 0, 4), b"data");
    input.extend(encode(header(cmd::TRIM, 0, 9, 0, 4), &[]));
    input.extend(encode(header(cmd::WRITE_ZEROES, 0, 9, 0, 4), &[]));
    for _ in 0..3 {
        assert!(rejected(ErrorCode::Perm)(&decode_one(&mut d, &mut input)));
    }
    let mut input = encode(header(cmd::READ, 0, 9, 0, 4), &[]);
    assert!(matches!(
        decode_one(&mut d, &mut input),
        Decoded::Request(_)
    ));
}

#[test]
fn nbd_stream_errors() {
    let mut d = RequestDecoder::new(SIZE, export_flags(false, false));
    let mut input = encode(header(cmd::READ, 0, 1, 0, 1), &[]);
    input[0] = 0;
    assert!(matches!(
        d.decode(&mut input),
        Err(ProtocolError::BadMagic(_))
    ));
    let mut d = RequestDecoder::new(SIZE, export_flags(false, false));
    let mut input = encode(header(cmd::WRITE, 0, 1, 0, MAX_DISCARDED_PAYLOAD + 1), &[]);
    assert_eq!(
        d.decode(&mut input),
        Err(ProtocolError::PayloadTooLarge(MAX_DISCARDED_PAYLOAD + 1))
    );
}

#[test]
fn nbd_simple_reply_encoding() {
    let reply = encode_simple_reply(0x0102_0304_0506_0708, Some(ErrorCode::Shutdown));
    assert_eq!(
        reply,
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 108, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(&encode_simple_reply(1, None)[4..8], &[0, 0, 0, 0]);
    for code in [
        ErrorCode::Perm,
        ErrorCode::Io,
        ErrorCode::NoMem,
        ErrorCode::Inval,
        ErrorCode::NoSpc,
        ErrorCode::Overflow,
        ErrorCode::NotSup,
        ErrorCode::Shutdown,
    ] {
        assert_eq!(ErrorCode::from_wire(code.wire()), Some(code));
    }
    assert_eq!(
        [1, 5, 12, 22, 28, 75, 95, 108].map(|v| ErrorCode::from_wire(v).unwrap().wire()),
        [1, 5, 12, 22, 28, 75, 95, 108]
    );
}

// ---- property tests ----

/// A valid request and the bytes a client sends for it.
fn valid_request() -> impl Strategy<Value = (Request, BytesMut)> {
    let range = (0..SIZE).prop_flat_map(|offset| {
        let max = (SIZE - offset).min(8192) as u32;
        (Just(offset), 0..=max)
    });
    (0u8..5, any::<u64>(), range, any::<bool>(), any::<bool>()).prop_map(
        |(kind, cookie, (offset, len), fua, no_hole)| {
            let fua_flag = if fua { cmd_flags::FUA } else { 0 };
            let (kind, flags, payload, command) = match kind {
                0 => (cmd::READ, fua_flag, vec![], Command::Read { offset, len }),
                1 => {
                    let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (cookie as u8)).collect();
                    (
                        cmd::WRITE,
                        fua_flag,
                        data.clone(),
                        Command::Write {
                            offset,
                            data: Bytes::from(data),
                            fua,
                        },
                    )
                }
                2 => (cmd::FLUSH, fua_flag, vec![], Command::Flush),
                3 => (
                    cmd::TRIM,
                    fua_flag,
                    vec![],
                    Command::Trim { offset, len, fua },
                ),
                _ => (
                    cmd::WRITE_ZEROES,
                    fua_flag | if no_hole { cmd_flags::NO_HOLE } else { 0 },
                    vec![],
                    Command::WriteZeroes {
                        offset,
                        len,
                        may_trim: !no_hole,
                        fua,
                    },
                ),
            };
            let (offset, length) = if kind == cmd::FLUSH {
                (0, 0)
            } else {
                (offset, len)
            };
            let bytes = encode(header(kind, flags, cookie, offset, length), &payload);
            (Request { cookie, command }, bytes)
        },
    )
}

/// Feed `stream` to the decoder in pieces of the given sizes, collecting what it yields.
fn feed(
    decoder: &mut RequestDecoder,
    stream: &[u8],
    pieces: &[usize],
) -> (Vec<Decoded>, Option<ProtocolError>) {
    let mut input = BytesMut::new();
    let mut items = Vec::new();
    let mut rest = stream;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        input.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return (items, Some(e)),
            }
        }
    }
    (items, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn nbd_request_header_round_trip(
        flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
        offset in any::<u64>(), length in any::<u32>(),
    ) {
        let h = header(kind, flags, cookie, offset, length);
        let bytes = encode(h, &[]);
        prop_assert_eq!(bytes.len(), REQUEST_HEADER_LEN);
        let array: &[u8; REQUEST_HEADER_LEN] = bytes[..].try_into().unwrap();
        prop_assert_eq!(RequestHeader::parse(array), Ok(h));
    }

    #[test]
    fn nbd_requests_round_trip_in_any_pieces(
        requests in prop::collection::vec(valid_request(), 1..16),
        pieces in prop::collection::vec(1usize..64, 1..8),
    ) {
        let mut stream = Vec::new();
        for (_, bytes) in &requests {
            stream.extend_from_slice(bytes);
        }
        let mut d = RequestDecoder::new(SIZE, export_flags(false, true));
        let (items, error) = feed(&mut d, &stream, &pieces);
        prop_assert_eq!(error, None);
        let expected: Vec<Decoded> =
            requests.into_iter().map(|(r, _)| Decoded::Request(r)).collect();
        prop_assert_eq!(items, expected);
    }

    #[test]
    fn nbd_decoder_survives_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        prefix in prop::collection::vec(valid_request(), 0..3),
        pieces in prop::collection::vec(1usize..300, 1..8),
        size in any::<u64>(),
        read_only in any::<bool>(),
    ) {
        let mut stream = Vec::new();
        for (_, b) in &prefix {
            stream.extend_from_slice(b);
        }
        stream.extend_from_slice(&bytes);
        let mut d = RequestDecoder::new(size, export_flags(read_only, false));
        let (items, _) = feed(&mut d, &stream, &pieces);
        for item in items {
            if let Decoded::Request(r) = item {
                prop_assert!(r.payload_len() <= MAX_PAYLOAD);
            }
        }
    }

    #[test]
    fn nbd_handshake_survives_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        valid_start in any::<bool>(),
        pieces in prop::collection::vec(1usize..300, 1..8),
    ) {
        let mut stream = Vec::new();
        if valid_start {
            stream.extend_from_slice(&1u32.to_be_bytes());
            stream.extend_from_slice(&IHAVEOPT.to_be_bytes());
        }
        stream.extend_from_slice(&bytes);
        let mut hs = ServerHandshake::new();
        let mut input = BytesMut::new();
        let mut rest = &stream[..];
        let mut sizes = pieces.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            input.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            match hs.handle(&mut input, &catalog()) {
                Ok(Progress::NeedInput) => {}
                _ => break,
            }
            let _ = hs.take_output();
        }
    }
}

// ---- scripted clients against the handshake ----

#[derive(Debug, Clone)]
enum Op {
    List,
    ListWithData,
    Info(usize, Vec<u16>),
    Go(usize, Vec<u16>),
    ExportName(usize),
    Abort,
    Unsupported(u32),
    TooBig(u32),
    MalformedGo,
}

const NAMES: [&str; 4] = ["r0", "ro", "missing", ""];

fn op() -> impl Strategy<Value = Op> {
    let requests = prop::collection::vec(0u16..6, 0..4);
    prop_oneof![
        4 => Just(Op::List),
        1 => Just(Op::ListWithData),
        4 => (0..NAMES.len(), requests.clone()).prop_map(|(n, r)| Op::Info(n, r)),
        2 => (0..NAMES.len(), requests).prop_map(|(n, r)| Op::Go(n, r)),
        1 => (0..NAMES.len()).prop_map(Op::ExportName),
        1 => Just(Op::Abort),
        3 => prop_oneof![Just(opt::STRUCTURED_REPLY), Just(opt::STARTTLS), 12u32..1000]
            .prop_map(Op::Unsupported),
        1 => (MAX_OPTION_DATA + 1..MAX_OPTION_DATA * 3).prop_map(Op::TooBig),
        1 => Just(Op::MalformedGo),
    ]
}

fn op_bytes(op: &Op) -> Vec<u8> {
    match op {
        Op::List => option(opt::LIST, &[]),
        Op::ListWithData => option(opt::LIST, b"junk"),
        Op::Info(n, r) => option(opt::INFO, &info_data(NAMES[*n], r)),
        Op::Go(n, r) => option(opt::GO, &info_data(NAMES[*n], r)),
        Op::ExportName(n) => option(opt::EXPORT_NAME, NAMES[*n].as_bytes()),
        Op::Abort => option(opt::ABORT, &[]),
        Op::Unsupported(o) => option(*o, b"whatever"),
        Op::TooBig(len) => option(77, &vec![1u8; *len as usize]),
        Op::MalformedGo => option(opt::GO, b"\0\0\0\x09r0\0\0"),
    }
}

/// Check the answer to one option against the model. `Some(outcome)` ends the handshake.
fn check_op(
    op: &Op,
    out: &mut Bytes,
    no_zeroes: bool,
    cat: &TestCatalog,
) -> Result<Option<Result<Progress, HandshakeError>>, TestCaseError> {
    let known = |n: usize| cat.lookup(NAMES[n]);
    let single = |out: &mut Bytes, option: u32, kind: u32| -> Result<(), TestCaseError> {
        let replies = replies_until_final(out);
        prop_assert_eq!(replies.len(), 1);
        prop_assert_eq!((replies[0].option, replies[0].kind), (option, kind));
        Ok(())
    };
    match op {
        Op::List => {
            let replies = replies_until_final(out);
            prop_assert_eq!(replies.len(), 3);
            prop_assert_eq!(replies[2].kind, rep::ACK);
        }
        Op::ListWithData => single(out, opt::LIST, rep::ERR_INVALID)?,
        Op::MalformedGo => single(out, opt::GO, rep::ERR_INVALID)?,
        Op::Unsupported(o) => single(out, *o, rep::ERR_UNSUP)?,
        Op::TooBig(_) => single(out, 77, rep::ERR_TOO_BIG)?,
        Op::Abort => {
            single(out, opt::ABORT, rep::ACK)?;
            return Ok(Some(Ok(Progress::Aborted)));
        }
        Op::Info(n, requests) | Op::Go(n, requests) => {
            let option = if matches!(op, Op::Go(..)) {
                opt::GO
            } else {
                opt::INFO
            };
            let Some(info) = known(*n) else {
                single(out, option, rep::ERR_UNKNOWN)?;
                return Ok(None);
            };
            let replies = replies_until_final(out);
            prop_assert!(replies.iter().all(|r| r.option == option));
            prop_assert_eq!(replies.last().unwrap().kind, rep::ACK);
            let items = info_items(&replies);
            let mut export = items[&info::EXPORT].clone();
            prop_assert_eq!(export.get_u64(), info.size);
            prop_assert_eq!(export.get_u16(), info.flags);
            prop_assert!(items.contains_key(&info::BLOCK_SIZE));
            prop_assert_eq!(
                items.contains_key(&info::NAME),
                requests.contains(&info::NAME)
            );
            if option == opt::GO {
                return Ok(Some(Ok(Progress::Transmission(Negotiated {
                    export: info.name,
                    size: info.size,
                    flags: info.flags,
                }))));
            }
        }
        Op::ExportName(n) => {
            let Some(info) = known(*n) else {
                return Ok(Some(Err(HandshakeError::UnknownExport(NAMES[*n].into()))));
            };
            prop_assert_eq!(out.len(), if no_zeroes { 10 } else { 134 });
            prop_assert_eq!(out.get_u64(), info.size);
            prop_assert_eq!(out.get_u16(), info.flags);
            out.clear();
            return Ok(Some(Ok(Progress::Transmission(Negotiated {
                export: info.name,
                size: info.size,
                flags: info.flags,
            }))));
        }
    }
    Ok(None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn nbd_scripted_clients(
        ops in prop::collection::vec(op(), 1..12),
        no_zeroes in any::<bool>(),
        pieces in prop::collection::vec(1usize..200, 1..6),
    ) {
        let cat = catalog();
        let flags = client_flags::FIXED_NEWSTYLE | if no_zeroes { client_flags::NO_ZEROES } else { 0 };
        let mut stream = flags.to_be_bytes().to_vec();
        let mut ends = Vec::new();
        for op in &ops {
            stream.extend(op_bytes(op));
            ends.push(stream.len());
        }

        // Feed the script in pieces until the machine stops.
        let mut hs = ServerHandshake::new();
        let mut out = BytesMut::new();
        let mut input = BytesMut::new();
        let mut fed = 0;
        let mut sizes = pieces.iter().cycle();
        let mut outcome = Ok(Progress::NeedInput);
        while fed < stream.len() {
            let n = (*sizes.next().unwrap()).clamp(1, stream.len() - fed);
            input.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            outcome = hs.handle(&mut input, &cat);
            out.extend_from_slice(&hs.take_output());
            if outcome != Ok(Progress::NeedInput) {
                break;
            }
        }

        // Walk the model over the output.
        let mut out = out.freeze();
        prop_assert_eq!(out.get_u64(), NBD_MAGIC);
        prop_assert_eq!(out.get_u64(), IHAVEOPT);
        let _ = out.get_u16();
        let mut expected = Ok(Progress::NeedInput);
        let mut consumed_up_to = stream.len();
        for (op, end) in ops.iter().zip(&ends) {
            if let Some(done) = check_op(op, &mut out, no_zeroes, &cat)? {
                expected = done;
                consumed_up_to = *end;
                break;
            }
        }
        prop_assert_eq!(outcome.clone(), expected);
        prop_assert!(out.is_empty(), "unexpected extra output");
        // Whatever follows the final option stays unread, for the next phase.
        if outcome.is_ok() {
            prop_assert_eq!(fed - input.len(), consumed_up_to);
        }
    }
}
