//! The workloads (T1, T2, I1, L1, L2) and the driver that runs one against a [`Target`] for
//! a fixed time with a fixed number of requests in flight, recording every latency.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::target::Target;

/// Where the writes of a workload go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// One after the other through the region, wrapping around.
    Sequential,
    /// Block-aligned, uniformly over the region.
    Random,
}

/// One workload of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub id: &'static str,
    pub pattern: Pattern,
    /// Bytes per write.
    pub block: u32,
    /// Writes in flight.
    pub depth: usize,
    /// Each write is followed by a flush (both timed together).
    pub flush_each: bool,
}

/// T1: sequential write 1 MiB, 16 in flight.
pub const T1: Workload = Workload {
    id: "T1",
    pattern: Pattern::Sequential,
    block: 1 << 20,
    depth: 16,
    flush_each: false,
};
/// T2: sequential write 128 KiB, 64 in flight.
pub const T2: Workload = Workload {
    id: "T2",
    pattern: Pattern::Sequential,
    block: 128 << 10,
    depth: 64,
    flush_each: false,
};
/// I1: random write 4 KiB, 64 in flight.
pub const I1: Workload = Workload {
    id: "I1",
    pattern: Pattern::Random,
    block: 4096,
    depth: 64,
    flush_each: false,
};
/// L1: random write 4 KiB, 1 in flight.
pub const L1: Workload = Workload {
    id: "L1",
    pattern: Pattern::Random,
    block: 4096,
    depth: 1,
    flush_each: false,
};
/// L2: 4 KiB write + flush, 1 in flight.
pub const L2: Workload = Workload {
    id: "L2",
    pattern: Pattern::Sequential,
    block: 4096,
    depth: 1,
    flush_each: true,
};

/// Every workload but the resync, in the order the summary prints them.
pub const ALL: [Workload; 5] = [T1, T2, I1, L1, L2];

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Writes completed in the measured window.
    pub ops: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Length of the measured window.
    pub secs: f64,
    /// Latencies of those writes in microseconds (write + flush for L2), sorted.
    pub lat_us: Vec<f64>,
    /// CPU time of this process during the window, in seconds.
    pub cpu_s: f64,
}

impl Run {
    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }

    /// Writes per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    /// The `p`-th percentile latency (0..=100) in microseconds.
    pub fn pct(&self, p: f64) -> f64 {
        percentile(&self.lat_us, p)
    }

    /// CPU seconds per GB written.
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_s / (self.bytes as f64 / 1e9).max(1e-9)
    }
}

/// The `p`-th percentile (nearest rank) of sorted `v`; 0 for an empty slice.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The median of `v` (any order); 0 for an empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, 50.0)
}

/// CPU time (user + system) this process used so far, in seconds, from `/proc/self/stat`
/// (clock ticks of 1/100 s, Linux's `USER_HZ`).
pub fn process_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Runs `w` against `target` over the first `region` bytes: `ramp` unmeasured, then `time`
/// measured.
pub async fn run(
    target: Arc<dyn Target>,
    w: Workload,
    region: u64,
    ramp: Duration,
    time: Duration,
) -> io::Result<Run> {
    let blocks = (region / u64::from(w.block)).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let data = Bytes::from(vec![0x5a; w.block as usize]);
    let start = Instant::now();
    let measure_from = start + ramp;
    let end = measure_from + time;
    let mut tasks = Vec::new();
    for t in 0..w.depth {
        let target = target.clone();
        let next = next.clone();
        let data = data.clone();
        let mut rng = fastrand::Rng::with_seed(0x5eed + t as u64);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let now = Instant::now();
                if now >= end {
                    return Ok::<_, io::Error>(lat);
                }
                let block = match w.pattern {
                    Pattern::Sequential => next.fetch_add(1, Ordering::Relaxed) % blocks,
                    Pattern::Random => rng.u64(0..blocks),
                };
                target
                    .write(block * u64::from(w.block), data.clone(), false)
                    .await?;
                if w.flush_each {
                    target.flush().await?;
                }
                let done = Instant::now();
                // Counted by completion time: what completed inside the window.
                if done >= measure_from && done <= end {
                    lat.push(done.duration_since(now).as_nanos() as f64 / 1000.0);
                }
            }
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = process_cpu_s();
    tokio::time::sleep_until(end.into()).await;
    let cpu1 = process_cpu_s();
    let mut lat_us = Vec::new();
    for t in tasks {
        lat_us.extend(t.await.map_err(io::Error::other)??);
    }
    lat_us.sort_by(f64::total_cmp);
    let ops = lat_us.len() as u64;
    Ok(Run {
        ops,
        bytes: ops * u64::from(w.block),
        secs: time.as_secs_f64(),
        lat_us,
        cpu_s: cpu1 - cpu0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 99.9), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn this_process_uses_cpu_time() {
        let before = process_cpu_s();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(
            process_cpu_s() - before >= 0.1,
            "200 ms of spinning not counted"
        );
    }
}
