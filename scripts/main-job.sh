#!/usr/bin/env bash
# The main job: a two-node replicated device on this machine, written to and verified.
#
# Two nodes, alpha (127.0.0.1) and bravo (127.0.0.2), each a `drbdd` with its own state
# directory and a 256 MiB file-backed disk, replicate resource r0 with protocol C. The script
# creates the metadata, brings both nodes up, promotes alpha (initial full sync to bravo),
# writes a 96 MiB data set through alpha's NBD export with nbdcopy plus a few qemu-io writes,
# shows `drbdadm status` of both nodes, and checks that both backing files hold the same bytes
# and that they are the bytes written. Everything lives in a temporary directory removed at
# the end; the daemons are stopped with SIGTERM (a clean shutdown).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v qemu-io >/dev/null || need+=(qemu-utils)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing the NBD clients this demo uses: ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
            { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
    else
        echo "please install: ${need[*]} (nbdcopy and qemu-io are the NBD clients this demo uses)" >&2
        exit 1
    fi
fi

cargo build --release --quiet -p drbd-cli
ADM="$PWD/target/release/drbdadm"
DRBDD="$PWD/target/release/drbdd"
work=$(mktemp -d /tmp/drbd-main-job.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n=== %s\n' "$*"; }
adm() { local node=$1; shift; "$ADM" -c "$work/drbd.conf" --node "$node" --state-dir "$work/$node" "$@"; }

truncate -s 256M "$work/alpha.img" "$work/bravo.img"
mkdir -p "$work/alpha" "$work/bravo"
cat > "$work/drbd.conf" <<CONF
global { usage-count no; }
resource r0 {
    protocol C;
    net {
        cram-hmac-alg sha1;
        shared-secret "main-job-secret";
        connect-int 2;
        ping-int 2;
    }
    disk { resync-rate 200M; c-plan-ahead 0; al-extents 257; }
    startup { wfc-timeout 60; }
    on alpha { device /dev/drbd0; disk $work/alpha.img; address 127.0.0.1:7788; meta-disk internal; }
    on bravo { device /dev/drbd0; disk $work/bravo.img; address 127.0.0.2:7788; meta-disk internal; }
}
CONF

step "configuration ($work/drbd.conf), as drbdadm parses it"
adm alpha dump r0

for node in alpha bravo; do
    step "$node: create-md, start drbdd, up"
    adm "$node" create-md --force r0
    RUST_LOG=info "$DRBDD" -c "$work/drbd.conf" --node "$node" --state-dir "$work/$node" \
        2> "$work/$node.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$work/$node/drbdd.sock" ] && break; sleep 0.05; done
    adm "$node" up r0
done

step "wait-connect; both disks are Inconsistent (fresh metadata)"
adm alpha wait-connect r0
echo "alpha: $(adm alpha cstate r0) $(adm alpha dstate r0)"

step "alpha: primary (refused without UpToDate data), then primary --force (initial full sync)"
if adm alpha primary r0; then echo "unexpected: promotion without good data" >&2; exit 1; fi
adm alpha primary --force r0
sleep 0.5
adm alpha status r0
for _ in $(seq 600); do
    [ "$(adm bravo dstate r0)" = "UpToDate/UpToDate" ] && [ "$(adm alpha cstate r0)" = Connected ] && break
    sleep 0.1
done
echo "after the initial sync: alpha $(adm alpha role r0) $(adm alpha dstate r0), bravo $(adm bravo role r0) $(adm bravo dstate r0)"

step "write a 96 MiB data set through alpha's NBD export (nbdcopy), and a few qemu-io writes"
head -c 96M /dev/urandom > "$work/dataset.bin"
uri="nbd+unix:///r0?socket=$work/alpha/r0.nbd"
nbdcopy "$work/dataset.bin" "$uri"
qemu-io -f raw -c "write -P 0x5a 128M 4M" -c "write -P 0xc3 200M 64k" -c flush "$uri" | grep -v '^$'
echo "bravo refuses writes while Secondary:"
qemu-io -f raw -c "write -P 0x11 0 4k" "nbd+unix:///r0?socket=$work/bravo/r0.nbd" 2>&1 | head -1 || true

step "drbdadm status on both nodes"
adm alpha status --statistics r0
adm bravo status --statistics r0

step "verify: both backing files hold the same bytes, and they are the bytes written"
size=$(nbdinfo --size "$uri")
a=$(head -c "$size" "$work/alpha.img" | sha256sum | cut -d' ' -f1)
b=$(head -c "$size" "$work/bravo.img" | sha256sum | cut -d' ' -f1)
echo "alpha data area ($size bytes): $a"
echo "bravo data area ($size bytes): $b"
[ "$a" = "$b" ] || { echo "the replicas differ" >&2; exit 1; }
cmp -n $((96 << 20)) "$work/dataset.bin" "$work/bravo.img" || { echo "bravo does not hold the data set" >&2; exit 1; }
qemu-io -f raw -r -c "read -P 0x5a 128M 4M" -c "read -P 0xc3 200M 64k" "nbd+unix:///r0?socket=$work/bravo/r0.nbd" | grep -v '^$'
echo "both replicas are identical and hold the data set"

step "down on both nodes, stop the daemons"
adm alpha secondary r0
for node in alpha bravo; do adm "$node" down r0; done
echo
echo "main job done"
