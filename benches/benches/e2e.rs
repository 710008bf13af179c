//! End to end on loopback with tmpfs-backed files (software overhead only), in the four
//! states of the summary: raw backing files, our resource disconnected, connected
//! (protocol C), the network alone. T1-like throughput (1 MiB writes, 16 in flight) and
//! L1-like latency (4 KiB writes, 1 in flight). The `summary` binary runs the full matrix
//! (also on the real disk) and prints the ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use benches::bed::{Bed, State};
use benches::target::Target;

const REGION: u64 = 256 << 20;

/// Writes `count` blocks of `data` sequentially with `depth` in flight; returns the time.
async fn writes(target: Arc<dyn Target>, data: Bytes, count: u64, depth: u64) -> Duration {
    let t = Instant::now();
    let len = data.len() as u64;
    let blocks = REGION / len;
    let mut tasks = Vec::new();
    for k in 0..depth {
        let target = target.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = k;
            while i < count {
                target
                    .write((i % blocks) * len, data.clone(), false)
                    .await
                    .expect("write");
                i += depth;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    t.elapsed()
}

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bed = rt
        .block_on(Bed::new(std::path::Path::new("/dev/shm"), REGION, 8990))
        .expect("test bed on /dev/shm");
    let mut g = c.benchmark_group("e2e_tmpfs");
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for s in State::ALL {
        let big = Bytes::from(vec![0x5a; 1 << 20]);
        g.throughput(Throughput::Bytes(16 << 20));
        g.bench_function(format!("t1_{}", s.name()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(writes(bed.target(s), big.clone(), 16, 16));
                }
                total
            })
        });
        let small = Bytes::from(vec![0x5a; 4096]);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("l1_{}", s.name()), |b| {
            b.iter_custom(|iters| rt.block_on(writes(bed.target(s), small.clone(), iters, 1)))
        });
    }
    g.finish();
    rt.block_on(bed.shutdown());
}

criterion_group!(benches, e2e);
criterion_main!(benches);
