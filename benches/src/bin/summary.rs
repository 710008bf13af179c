//! Prints one line per workload and backing kind: the workload id, then `key=value` fields.
//!
//! ```text
//! cargo run --release -p benches --bin summary [-- --quick] [--backing tmpfs|disk|both]
//! ```
//!
//! Every workload runs in four states, interleaved (the order rotates with each
//! repetition, so that drifts of a shared VM hit every state alike): `raw` (the two backing
//! files written at once through the same io_uring engine), `local` (our resource
//! disconnected), `repl` (connected, protocol C) and `net` (our framing over loopback, no
//! disk). Figures are medians over the repetitions.
//!
//! * `R_tput` = repl / min(raw, net), in the workload's unit (MB/s or IOPS).
//! * `dL_p50_us`, `dL_p99_us` = repl latency - (raw latency + net round trip), at p50/p99.
//! * `cpu_s_per_gb` = CPU seconds of this process (both nodes, the workload driver) per GB
//!   replicated.
//! * R1: bravo disconnects, alpha dirties 10 % / 100 % of the region, bravo reconnects:
//!   `R_tput` = resync MB/s / min(raw T1, net T1).
//! * `nbd_*`: the same workload through the NBD export with fio's nbd engine (when fio has
//!   it), and `nbd_vs_lib` its ratio to the library path.
//!
//! `--quick` (1 repetition of 1 s, a 256 MiB region) finishes in a few minutes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::bed::{Bed, State};
use benches::workload::{self, median, Run, Workload};
use benches::{memory, tools};
use drbd_net::nbd::NbdServer;

struct Opts {
    reps: usize,
    ramp: Duration,
    time: Duration,
    region: u64,
    backings: Vec<(&'static str, PathBuf)>,
    /// Only these workloads (`--only T1,R1`; for profiling one of them).
    only: Option<Vec<String>>,
}

impl Opts {
    fn wants(&self, id: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == id))
    }
}

fn parse_args() -> Result<Opts, String> {
    let mut quick = false;
    let mut backing = "both".to_string();
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--backing" => backing = args.next().ok_or("--backing needs a value")?,
            "--only" => {
                let v = args.next().ok_or("--only needs a list of workload ids")?;
                only = Some(v.split(',').map(str::to_string).collect());
            }
            "-h" | "--help" => {
                return Err(
                    "usage: summary [--quick] [--backing tmpfs|disk|both] [--only T1,I1,R1,M1]"
                        .into(),
                )
            }
            // `cargo bench` passes --bench to every target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let disk_dir = std::env::var_os("BENCH_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let backings = match backing.as_str() {
        "tmpfs" => vec![("tmpfs", PathBuf::from("/dev/shm"))],
        "disk" => vec![("disk", disk_dir)],
        "both" => vec![("tmpfs", PathBuf::from("/dev/shm")), ("disk", disk_dir)],
        other => return Err(format!("--backing {other:?}: tmpfs, disk or both")),
    };
    Ok(if quick {
        Opts {
            reps: 1,
            ramp: Duration::from_millis(300),
            time: Duration::from_secs(1),
            region: 256 << 20,
            backings,
            only,
        }
    } else {
        Opts {
            reps: 3,
            ramp: Duration::from_millis(500),
            time: Duration::from_secs(3),
            region: 1 << 30,
            backings,
            only,
        }
    })
}

/// The medians of one (workload, state).
#[derive(Debug, Clone, Copy, Default)]
struct Fig {
    /// MB/s, or IOPS for the 4 KiB workloads.
    tput: f64,
    p50: f64,
    p99: f64,
    cpu_s_per_gb: f64,
}

fn fig(runs: &[Run], iops: bool) -> Fig {
    let pick = |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Fig {
        tput: pick(&|r| if iops { r.iops() } else { r.mb_s() }),
        p50: pick(&|r| r.pct(50.0)),
        p99: pick(&|r| r.pct(99.0)),
        cpu_s_per_gb: pick(&|r| r.cpu_s_per_gb()),
    }
}

fn uses_iops(w: &Workload) -> bool {
    w.block <= 4096
}

/// fio through the NBD export: (throughput in MB/s or IOPS, p50 µs, p99 µs).
fn fio_nbd(socket: &Path, w: &Workload, region: u64, opts: &Opts) -> Result<Fig, String> {
    let uri = format!("nbd+unix:///r0?socket={}", socket.display());
    let rw = match w.pattern {
        workload::Pattern::Sequential => "write",
        workload::Pattern::Random => "randwrite",
    };
    let mut args = vec![
        "--name=nbd".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={}", w.block),
        format!("--iodepth={}", w.depth),
        format!("--size={region}"),
        "--time_based".to_string(),
        format!("--runtime={}ms", opts.time.as_millis()),
        format!("--ramp_time={}ms", opts.ramp.as_millis()),
        "--randrepeat=0".to_string(),
    ];
    if w.flush_each {
        args.push("--fsync=1".to_string());
    }
    let job = &tools::fio_write_report(&args)?;
    let bw = job["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let iops = job["iops"].as_f64().unwrap_or(0.0);
    let pct = |p: &str| job["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Fig {
        tput: if uses_iops(w) { iops } else { bw },
        p50: pct("50.000000"),
        p99: pct("99.000000"),
        cpu_s_per_gb: 0.0,
    })
}

fn fio_has_nbd() -> bool {
    Command::new("fio")
        .arg("--enghelp")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nbd"))
}

async fn backing(name: &str, parent: &Path, port: u16, opts: &Opts) -> Result<(), String> {
    let started = Instant::now();
    let bed = Bed::new(parent, opts.region, port).await?;
    println!(
        "# backing={name} dir={} O_DIRECT={} engine={} region={}MiB reps={} time={}ms",
        parent.display(),
        if bed.raw.direct_io() { "yes" } else { "no" },
        bed.alpha.engine(),
        opts.region >> 20,
        opts.reps,
        opts.time.as_millis()
    );
    let mut runs: HashMap<(&str, &str), Vec<Run>> = HashMap::new();
    for rep in 0..opts.reps {
        for w in workload::ALL {
            // R1's floor is T1's.
            let needed = opts.wants(w.id) || (w.id == "T1" && opts.wants("R1"));
            if !needed {
                continue;
            }
            for k in 0..State::ALL.len() {
                let s = State::ALL[(k + rep) % State::ALL.len()];
                let r = workload::run(bed.target(s), w, opts.region, opts.ramp, opts.time)
                    .await
                    .map_err(|e| format!("{} {}: {e}", w.id, s.name()))?;
                runs.entry((w.id, s.name())).or_default().push(r);
            }
        }
    }
    // The NBD path: alpha's export on a Unix socket, fio as the client.
    let nbd = if !["T1", "I1", "L1"].iter().any(|w| opts.wants(w)) {
        None
    } else if fio_has_nbd() {
        let server = NbdServer::new();
        server
            .add_export("r0", bed.alpha.clone(), "")
            .map_err(|e| e.to_string())?;
        let socket = bed.dir.path().join("r0.nbd");
        let listener = server
            .serve_unix(&socket)
            .await
            .map_err(|e| e.to_string())?;
        let mut figs = HashMap::new();
        for w in [workload::T1, workload::I1, workload::L1] {
            if !opts.wants(w.id) {
                continue;
            }
            let mut v = Vec::new();
            for _ in 0..opts.reps {
                v.push(fio_nbd(&socket, &w, opts.region, opts)?);
            }
            let m = |f: &dyn Fn(&Fig) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            figs.insert(
                w.id,
                Fig {
                    tput: m(&|f| f.tput),
                    p50: m(&|f| f.p50),
                    p99: m(&|f| f.p99),
                    cpu_s_per_gb: 0.0,
                },
            );
        }
        listener.shutdown().await;
        server.shutdown().await;
        Some(figs)
    } else {
        println!("# NBD path not measured: fio without the nbd engine");
        None
    };
    let mut t1_floor = 0.0;
    for w in workload::ALL {
        if !runs.contains_key(&(w.id, State::Raw.name())) {
            continue;
        }
        let iops = uses_iops(&w);
        let f = |s: State| fig(&runs[&(w.id, s.name())], iops);
        let (raw, local, repl, net) = (
            f(State::Raw),
            f(State::Local),
            f(State::Replicated),
            f(State::Net),
        );
        let floor = raw.tput.min(net.tput);
        if w.id == "T1" {
            t1_floor = floor;
        }
        let unit = if iops { "iops" } else { "MBps" };
        let mut line = format!(
            "{} backing={name} R_tput={:.3} dL_p50_us={:.1} dL_p99_us={:.1} cpu_s_per_gb={:.2} \
             raw_{unit}={:.0} local_{unit}={:.0} repl_{unit}={:.0} net_{unit}={:.0} \
             raw_p50_us={:.1} local_p50_us={:.1} repl_p50_us={:.1} net_p50_us={:.1} \
             repl_p99_us={:.1} local_vs_raw={:.3}",
            w.id,
            repl.tput / floor.max(1e-9),
            repl.p50 - (raw.p50 + net.p50),
            repl.p99 - (raw.p99 + net.p99),
            repl.cpu_s_per_gb,
            raw.tput,
            local.tput,
            repl.tput,
            net.tput,
            raw.p50,
            local.p50,
            repl.p50,
            net.p50,
            repl.p99,
            local.tput / raw.tput.max(1e-9),
        );
        if let Some(n) = nbd.as_ref().and_then(|m| m.get(w.id)) {
            line.push_str(&format!(
                " nbd_{unit}={:.0} nbd_p50_us={:.1} nbd_vs_lib={:.3}",
                n.tput,
                n.p50,
                n.tput / repl.tput.max(1e-9)
            ));
        }
        println!("{line}");
    }
    for fraction in [0.1, 1.0] {
        if !opts.wants("R1") {
            break;
        }
        let (bytes, secs, connect_secs) = bed.resync(fraction).await?;
        let mb_s = bytes as f64 / 1e6 / secs.max(1e-9);
        println!(
            "R1 backing={name} dirty={}% R_tput={:.3} resync_MBps={mb_s:.0} floor_MBps={t1_floor:.0} \
             resynced_MB={:.0} secs={secs:.2} connect_secs={connect_secs:.2}",
            (fraction * 100.0) as u32,
            mb_s / t1_floor.max(1e-9),
            bytes as f64 / 1e6
        );
    }
    bed.shutdown().await;
    println!(
        "# backing={name} done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("summary: {e}");
            std::process::exit(2);
        }
    };
    // Measure what the daemon runs with.
    drbd_cli::alloc::tune();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = Arc::new(opts);
    let code = rt.block_on(async {
        for (i, (name, dir)) in opts.backings.iter().enumerate() {
            if let Err(e) = backing(name, dir, 8950 + 10 * i as u16, &opts).await {
                eprintln!("summary: backing {name}: {e}");
                return 1;
            }
        }
        0
    });
    if code != 0 {
        std::process::exit(code);
    }
    // M1: two real daemons on a 100 GiB sparse device, on the disk backing's folder.
    let dir = opts
        .backings
        .iter()
        .find(|(n, _)| *n == "disk")
        .map_or_else(|| PathBuf::from("/var/tmp"), |(_, d)| d.clone());
    match memory::drbdd_binary() {
        _ if !opts.wants("M1") => {}
        Some(drbdd) if fio_has_nbd() => match memory::measure(&drbdd, &dir, 8980, opts.time * 2) {
            Ok(m) => {
                let mib = |b: u64| b as f64 / f64::from(1 << 20);
                println!(
                    "M1 device=100GiB alpha_peak_rss_MiB={:.1} bravo_peak_rss_MiB={:.1} \
                         limit_MiB={:.1} within={} written_MB={:.0}",
                    mib(m.peak[0]),
                    mib(m.peak[1]),
                    mib(m.limit),
                    if m.peak.iter().all(|&p| p <= m.limit) {
                        "yes"
                    } else {
                        "no"
                    },
                    m.written as f64 / 1e6
                );
            }
            Err(e) => {
                eprintln!("summary: M1: {e}");
                std::process::exit(1);
            }
        },
        Some(_) => println!("# M1 not measured: fio without the nbd engine"),
        None => println!(
            "# M1 not measured: drbdd is not built next to this program \
             (cargo build --release -p drbd-cli)"
        ),
    }
}
