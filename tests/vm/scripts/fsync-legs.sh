#!/usr/bin/env bash
# Where the time of an fsync'd write goes (issue 14): fio psync 4 KiB randwrite `--fsync=1`, QD1,
# in one boot, in rounds of
#   - the raw cache disk;
#   - both cache disks at once, one writer on each (what a mirrored set's legs face: in the
#     emulated VM two disks do not go as fast as one each);
#   - the null ublk target (wb-null: the WRITE and FLUSH round trips through ublk, no I/O);
#   - a single-leg writeboost set on the first cache disk, then a mirrored set on both.
# A manual benchmark, not in `make test`:
#   cargo build --release -p wb-tools --bin wbctl --bin wb-null
#   truncate -s 2G backing.img; truncate -s 4G cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/fsync-legs.sh [ROUNDS] [RUNTIME_SECS]
# Prints a "bench: ..." line per round, then "fsync-legs: DONE".
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
ROUNDS="${1:-2}" RUNTIME="${2:-6}"

for ((round = 1; round <= ROUNDS; round++)); do
    # wb_create registers its cleanup in its own subshell only
    on_exit "_wb_cleanup s$round"
    on_exit "_wb_cleanup m$round"
    raw=$(wb_fsync_fio raw-$round "$CACHE0" 1 "$RUNTIME" | cut -d" " -f1)
    both=$(wb_fsync_fio_both "$round" "$CACHE0" "$CACHE1" "$RUNTIME")
    start_wb_null --size 2G
    null=$(wb_fsync_fio null-$round "$WB_NULL_DEV" 1 "$RUNTIME" | cut -d" " -f1)
    stop_wb_null
    dev="$(wb_create s$round --backing "$BACKING" --cache "$CACHE0" --single-leg --force)"
    single=$(wb_fsync_fio single-$round "$dev" 1 "$RUNTIME" | cut -d" " -f1)
    "$WBCTL" delete s$round >/dev/null
    dev="$(wb_create m$round --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force)"
    mirrored=$(wb_fsync_fio mirrored-$round "$dev" 1 "$RUNTIME" | cut -d" " -f1)
    "$WBCTL" delete m$round >/dev/null
    log "bench: round $round, fsync'd 4k writes/s: raw cache disk $raw; both cache disks at" \
        "once $both each; null ublk target $null; writeboost single leg $single" \
        "($(awk -v a="$single" -v b="$raw" 'BEGIN{printf "%.2f", a / b}')x), mirrored $mirrored" \
        "($(awk -v a="$mirrored" -v b="$raw" 'BEGIN{printf "%.2f", a / b}')x)"
done
log "fsync-legs: DONE"
