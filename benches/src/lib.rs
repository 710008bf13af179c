//! Benchmarks of replication throughput and latency, each figure set beside baselines
//! measured in the same run: the raw backing files through the same disk engine, our
//! resource disconnected, the network alone (our framing over loopback, no disk).
//!
//! * [`core_pair`]: the sans-IO state machine alone (the software ceiling).
//! * [`target`]: what a workload writes to, one type per state.
//! * [`workload`]: the workloads (T1, T2, I1, L1, L2) and their driver.
//! * [`bed`]: the files, volumes and link of one backing kind, and the resync (R1).
//! * [`tools`]: drbdadm in this process, fio's JSON report.
//! * [`memory`]: the resident size of two `drbdd` on a 100 GiB device under T1 (M1).
//!
//! `cargo bench -p benches` runs the Criterion benches (`benches/`); the `summary` binary
//! prints the ratios (see the README's performance section).

pub mod bed;
pub mod core_pair;
pub mod memory;
pub mod target;
pub mod tools;
pub mod workload;
