#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, lints, release build, all tests.
# Tests that compare with drbd-utils (drbdadm-84, drbdmeta) need it installed and root for
# loop devices; .ci/run installs what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --release (drbdadm, drbdd)"
cargo build --release --workspace
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# The README's main job, as an operator runs it: two nodes, written to and verified.
echo "== main job (scripts/main-job.sh)"
if ! ./scripts/main-job.sh; then
    echo "main job FAILED"
    status=1
fi
# The benchmarks: built, and the summary of ratios printed once in its short mode (the
# figures are informational; an error setting up or running a workload fails the run).
echo "== cargo bench --no-run"
cargo bench -p benches --no-run
echo "== benchmark summary (--quick)"
cargo run --release -p benches --bin summary -- --quick
# One closing line for the whole run: the sum over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
