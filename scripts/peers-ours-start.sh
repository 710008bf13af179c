#!/usr/bin/env bash
# OURS_START command for ../shared/peers/run.sh: two drbdd daemons replicating the
# harness's prepared files $PEER_A (alpha, Primary) and $PEER_B (bravo) with protocol C over
# loopback, alpha's export served on the NBD socket given as $1. Runs in the foreground
# until SIGTERM, then takes both down. Example (from ../shared/peers):
#
#   OURS_START="$PWD/../../main/scripts/peers-ours-start.sh /tmp/ours-r0.nbd" \
#   OURS_URI='nbd+unix:///r0?socket=/tmp/ours-r0.nbd' TARGETS='raw qsd qsd-mirror' ./run.sh
#
# The files' last 64 MiB hold the internal metadata (the harness compares only the region
# it writes). Needs target/release/drbdd and drbdadm (cargo build --release).
set -euo pipefail
sock=$1
bin=$(cd "$(dirname "$0")/../target/release" && pwd)
run=${PEER_RUN:-$(mktemp -d)}
dir=$run/ours
rm -rf "$dir" "$sock"
mkdir -p "$dir/alpha" "$dir/bravo"
port=$((7700 + RANDOM % 100))
cat >"$dir/drbd.conf" <<CONF
resource r0 {
    protocol C;
    net { connect-int 1; max-buffers 8000; max-epoch-size 8000; }
    disk { c-plan-ahead 0; resync-rate 4194304; }
    on alpha { device /dev/drbd0; disk $PEER_A; address 127.0.0.1:$port; meta-disk internal; }
    on bravo { device /dev/drbd0; disk $PEER_B; address 127.0.0.2:$port; meta-disk internal; }
}
CONF
adm() { local node=$1; shift; "$bin/drbdadm" -c "$dir/drbd.conf" --node "$node" --state-dir "$dir/$node" "$@"; }
pids=()
for node in alpha bravo; do
    adm "$node" create-md --force r0 >/dev/null
    RUST_LOG=warn "$bin/drbdd" -c "$dir/drbd.conf" --node "$node" --state-dir "$dir/$node" \
        >"$dir/$node.log" 2>&1 &
    pids+=($!)
done
echo "${pids[1]}" >"$run/ours-peer.pid"
for node in alpha bravo; do
    for _ in $(seq 200); do [ -S "$dir/$node/drbdd.sock" ] && break; sleep 0.05; done
    adm "$node" up r0
done
for _ in $(seq 600); do
    [ "$(adm alpha cstate r0)" = Connected ] && [ "$(adm bravo cstate r0)" = Connected ] && break
    sleep 0.05
done
# The files are identical (the harness wrote zeros to both): no initial sync.
adm alpha new-current-uuid --clear-bitmap r0
adm alpha primary r0
ln -sf "$dir/alpha/r0.nbd" "$sock"
stop() {
    adm alpha secondary r0 || true
    for node in alpha bravo; do adm "$node" down r0 || true; done
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
    rm -f "$sock"
    exit 0
}
trap stop TERM INT
wait
