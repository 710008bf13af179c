//! The sans-IO core alone: a connected pair at zero latency, 4 KiB and 1 MiB writes with 64
//! in flight (writes/s): the software ceiling of the replication state machine.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use benches::core_pair::CorePair;

fn core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    for (name, len, count) in [("write_4k", 4096usize, 1000u64), ("write_1m", 1 << 20, 100)] {
        let mut pair = CorePair::new();
        let data = Bytes::from(vec![0x5a; len]);
        let mut sector = 0;
        g.throughput(Throughput::Elements(count));
        g.bench_function(format!("{name}_x{count}_depth64"), |b| {
            b.iter(|| {
                pair.write_batch(sector, &data, count, 64);
                sector += count * len as u64 / 512;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, core);
criterion_main!(benches);
