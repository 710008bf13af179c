//! The wire codec: encode and decode of `P_DATA` (4 KiB and 1 MiB payloads), `P_WRITE_ACK`,
//! and a compressed bitmap transfer (a 1 TiB device's bitmap with 1 % of its bits set in
//! runs), in bytes and packets per second.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use drbd_core::replication::msg::{Ack, PeerMsg};
use drbd_net::peer::{bitmap_bits, encode_msg, MsgDecoder};
use drbd_net::wire::{self, Decoder, Frame};

use benches::target::wire_context;

/// Encodes `msg` into wire bytes.
fn encode(msg: &PeerMsg, bits: u64, out: &mut BytesMut) {
    let ctx = wire_context();
    let mut frames: Vec<Frame> = Vec::new();
    encode_msg(msg, &ctx, 0, bits, true, &mut frames).expect("encodes");
    for f in &frames {
        wire::encode(f, &ctx, out).expect("encodes");
    }
}

/// Decodes every message in `bytes`; returns how many.
fn decode(bytes: &Bytes, bits: u64) -> usize {
    let mut dec = Decoder::new(wire_context());
    let mut msgs = MsgDecoder::new(0, bits);
    let mut buf = BytesMut::from(&bytes[..]);
    let mut n = 0;
    while let Some(frame) = dec.decode(&mut buf).expect("decodes") {
        if msgs.on_frame(frame).expect("maps").is_some() {
            n += 1;
        }
    }
    n
}

fn data(len: usize) -> PeerMsg {
    PeerMsg::Data {
        sector: 2048,
        block_id: 0x1234,
        seq: 7,
        flags: 0,
        data: Bytes::from(vec![0x5a; len]),
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for (name, len) in [("p_data_4k", 4096usize), ("p_data_1m", 1 << 20)] {
        let msg = data(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(format!("encode_{name}"), |b| {
            let mut out = BytesMut::with_capacity(len + 64);
            b.iter(|| {
                out.clear();
                encode(black_box(&msg), 0, &mut out);
            })
        });
        let mut wire_bytes = BytesMut::new();
        encode(&msg, 0, &mut wire_bytes);
        let wire_bytes = wire_bytes.freeze();
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| assert_eq!(decode(black_box(&wire_bytes), 0), 1))
        });
    }
    // Acks: a batch of 1000, as the meta socket carries them.
    let acks: Vec<PeerMsg> = (0..1000u64)
        .map(|i| {
            PeerMsg::WriteAck(Ack {
                sector: i * 8,
                block_id: i,
                size: 4096,
                seq: i as u32,
            })
        })
        .collect();
    g.throughput(Throughput::Elements(acks.len() as u64));
    g.bench_function("encode_write_ack_x1000", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            for a in &acks {
                encode(black_box(a), 0, &mut out);
            }
        })
    });
    let mut ack_bytes = BytesMut::new();
    for a in &acks {
        encode(a, 0, &mut ack_bytes);
    }
    let ack_bytes = ack_bytes.freeze();
    g.bench_function("decode_write_ack_x1000", |b| {
        b.iter(|| assert_eq!(decode(black_box(&ack_bytes), 0), 1000))
    });
    // A bitmap of a 1 TiB device (256 Mi bits) with 1 % set, in runs of 64 bits.
    let bits = bitmap_bits(1 << 31);
    let words = wire::bitmap::words_for(bits);
    let mut bm = vec![0u64; words];
    for (i, w) in bm.iter_mut().enumerate() {
        if i % 100 == 0 {
            *w = u64::MAX;
        }
    }
    let msg = PeerMsg::Bitmap(bm);
    let mut bm_bytes = BytesMut::new();
    encode(&msg, bits, &mut bm_bytes);
    let bm_bytes = bm_bytes.freeze();
    g.throughput(Throughput::Bytes(words as u64 * 8));
    g.sample_size(10);
    g.bench_function("encode_compressed_bitmap_1tib", |b| {
        let mut out = BytesMut::with_capacity(bm_bytes.len());
        b.iter(|| {
            out.clear();
            encode(black_box(&msg), bits, &mut out);
        })
    });
    g.bench_function("decode_compressed_bitmap_1tib", |b| {
        b.iter(|| assert_eq!(decode(black_box(&bm_bytes), bits), 1))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
