#!/usr/bin/env bash
# The main job, for now: the configuration and metadata round trip of a two-node seed resource.
#
# Two nodes (alpha, bravo) of one dual-primary resource with file-backed disks on this machine:
# parse and dump the configuration, create v08 metadata on both backing files, dump it, show the
# generation identifiers, and -- when drbd-utils is installed and we are root -- let the real
# drbdmeta read back what we wrote. Everything lives in a temporary directory removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet -p drbd-cli
ADM="$PWD/target/release/drbdadm"
work=$(mktemp -d /tmp/drbd-main-job.XXXXXX)
loops=()
cleanup() {
    for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

size=256M
truncate -s "$size" "$work/alpha.img" "$work/bravo.img"
cat > "$work/drbd.conf" <<CONF
global { usage-count no; }
common {
    syncer { rate 1G; al-extents 127; }
    handlers {
        split-brain "/usr/lib/drbd/notify-split-brain.sh root";
        fence-peer "/usr/lib/drbd/crm-fence-peer.sh";
        after-resync-target "/usr/lib/drbd/crm-unfence-peer.sh";
    }
}
resource r0 {
    protocol C;
    net {
        allow-two-primaries;
        cram-hmac-alg sha1;
        shared-secret "main-job-secret";
        after-sb-0pri discard-zero-changes;
        after-sb-1pri discard-secondary;
        after-sb-2pri disconnect;
        rr-conflict disconnect;
    }
    disk { on-io-error detach; fencing resource-and-stonith; }
    startup { become-primary-on both; }
    on alpha { device /dev/drbd0; disk $work/alpha.img; address 127.0.0.1:7788; meta-disk internal; }
    on bravo { device /dev/drbd0; disk $work/bravo.img; address 127.0.0.1:7789; meta-disk internal; }
}
CONF

step() { printf '\n=== %s\n' "$*"; }
step "configuration: $work/drbd.conf, dumped by drbdadm (node alpha)"
"$ADM" -c "$work/drbd.conf" --node alpha dump r0

for node in alpha bravo; do
    step "$node: drbdadm create-md --force r0 ($size backing file, internal meta data)"
    "$ADM" -c "$work/drbd.conf" --node "$node" create-md --force r0
    step "$node: drbdadm show-gi r0"
    "$ADM" -c "$work/drbd.conf" --node "$node" show-gi r0
done

step "alpha: drbdadm dump-md r0"
"$ADM" -c "$work/drbd.conf" --node alpha dump-md r0 | tee "$work/ours.md"

if command -v drbdmeta >/dev/null && [ "$(id -u)" = 0 ] && command -v losetup >/dev/null; then
    step "cross-check: the real drbdmeta reads the metadata we wrote"
    l=$(losetup -f --show "$work/alpha.img"); loops+=("$l")
    drbdmeta 0 v08 "$l" internal dump-md > "$work/theirs.md"
    if diff <(grep -v '^#' "$work/ours.md") <(grep -v '^#' "$work/theirs.md"); then
        echo "drbdmeta dump-md and drbdadm dump-md agree"
    else
        echo "MISMATCH between drbdmeta and our dump-md" >&2
        exit 1
    fi
else
    step "cross-check skipped: needs root, losetup and drbdmeta (apt-get install drbd-utils)"
fi

step "alpha: drbdadm wipe-md --force r0, then dump-md must refuse"
"$ADM" -c "$work/drbd.conf" --node alpha wipe-md --force r0
if "$ADM" -c "$work/drbd.conf" --node alpha dump-md r0 >/dev/null 2>&1; then
    echo "dump-md still found meta data after wipe-md" >&2
    exit 1
fi
echo "no meta data left on alpha; bravo's is untouched:"
"$ADM" -c "$work/drbd.conf" --node bravo get-gi r0
echo
echo "main job done"
