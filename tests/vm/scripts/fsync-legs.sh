#!/usr/bin/env bash
# Where the time of an fsync'd write goes (issue 14): fio psync 4 KiB randwrite `--fsync=1`, QD1,
# on the raw cache disk, through a single-leg writeboost set on it, through a mirrored set, and on
# the raw disk again, in one boot. A manual benchmark, not in `make test`:
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 2G backing.img; truncate -s 4G cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/fsync-legs.sh
# Prints "bench: ..." lines, then "fsync-legs: DONE".
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
RUNTIME=8
sync_run() {
    local out="$WB_OUT/sync-$1.json"
    fio --name="$1" --filename="$2" --numjobs=1 --ioengine=psync --rw=randwrite --bs=4k \
        --fsync=1 --time_based --runtime="$RUNTIME" --size=256M --offset=1536M --randrepeat=0 \
        --norandommap --output-format=json --output="$out" --eta=never >&2 || fail "fio $1"
    fio_json_field "$out" write iops
}
raw=$(sync_run raw "$CACHE0")
log "bench: raw $raw/s"
dev="$(wb_create s1 --backing "$BACKING" --cache "$CACHE0" --single-leg --force)"
single=$(sync_run single "$dev")
log "bench: single-leg $single/s"
"$WBCTL" delete s1 >/dev/null
dev="$(wb_create m1 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force)"
mirrored=$(sync_run mirrored "$dev")
log "bench: mirrored $mirrored/s"
"$WBCTL" delete m1 >/dev/null
raw2=$(sync_run raw2 "$CACHE0")
log "bench: raw again $raw2/s"
log "fsync-legs: DONE"
