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
raw=$(wb_fsync_fio raw "$CACHE0" 1 "$RUNTIME" | cut -d" " -f1)
log "bench: raw $raw/s"
dev="$(wb_create s1 --backing "$BACKING" --cache "$CACHE0" --single-leg --force)"
single=$(wb_fsync_fio single "$dev" 1 "$RUNTIME" | cut -d" " -f1)
log "bench: single-leg $single/s"
"$WBCTL" delete s1 >/dev/null
dev="$(wb_create m1 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force)"
mirrored=$(wb_fsync_fio mirrored "$dev" 1 "$RUNTIME" | cut -d" " -f1)
log "bench: mirrored $mirrored/s"
"$WBCTL" delete m1 >/dev/null
raw2=$(wb_fsync_fio raw2 "$CACHE0" 1 "$RUNTIME" | cut -d" " -f1)
log "bench: raw again $raw2/s"
log "fsync-legs: DONE"
