//! `benches` will hold the Criterion benchmarks of the project: codec encode and decode, the
//! sans-IO core driving a simulated pair, and end-to-end replication throughput and latency on
//! loopback, each reported as a ratio to baselines measured in the same run.
