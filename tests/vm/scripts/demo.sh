#!/usr/bin/env bash
# The `make demo` scenario: a writeboost device over a slow backing device
# and two mirrored cache legs, a 4 KiB random-write burst through it, status.
#
#   demo.sh [BACKING CACHE0 CACHE1]
#
# Devices: block devices, or image files (attached to loop devices here and
# detached at the end). Without arguments, inside the VM: /dev/vda (backing,
# throttled like an HDD by run.sh), /dev/vdb and /dev/vdc (cache legs).
# `make demo` calls it natively when this kernel has ublk_drv, else as
#   tests/vm/run.sh --disk backing.img:throttle --disk cache0.img \
#       --disk cache1.img tests/vm/scripts/demo.sh
# Needs build/release/wbctl (cargo build --release --workspace).
set -euo pipefail
# shellcheck source=tests/vm/guest-lib.sh
source "$(dirname "$0")/../guest-lib.sh"
export WB_REPO="${WB_REPO:-$(cd "$(dirname "$0")/../../.." && pwd)}"
REPO="$WB_REPO"

if (($# == 3)); then
    devs=("$@")
elif (($# == 0)) && [[ "${WB_IN_VM:-}" == 1 ]]; then
    devs=("$(disk 0)" "$(disk 1)" "$(disk 2)")
else
    fail "usage: $0 BACKING CACHE0 CACHE1 (or no arguments inside the VM)"
fi
for i in 0 1 2; do
    d="${devs[$i]}"
    if [[ -f "$d" ]]; then
        loop="$(losetup --find --show --direct-io=on "$d")" || fail "losetup $d failed"
        on_exit "losetup -d $loop"
        log "$d -> $loop"
        devs[i]="$loop"
    fi
    [[ -b "${devs[$i]}" ]] || fail "${devs[$i]} is not a block device"
done
BACKING="${devs[0]}" CACHE0="${devs[1]}" CACHE1="${devs[2]}"
log "backing $BACKING ($(blockdev --getsize64 "$BACKING") bytes), cache legs $CACHE0 $CACHE1"

need_ublk
WBCTL="$(wb_bin wbctl)"

# For comparison: the same 4 KiB random writes on the backing device alone
# (10 s sample; the demo then writes a 256 MiB burst through writeboost).
iops=$(fio_iops write --name=backing-alone --filename="$BACKING" --ioengine=libaio \
    --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size=256M --time_based \
    --runtime=10 --randrepeat=0)
log "backing device alone: 4 KiB randwrite QD32: $iops IOPS"

before="$(ls /dev/ublkb* 2>/dev/null || true)"
log "wbctl create demo"
"$WBCTL" create demo --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1"
DEMO_UP=1
demo_cleanup() { if [[ "${DEMO_UP:-0}" == 1 ]]; then "$WBCTL" delete demo || true; fi; }
on_exit demo_cleanup
DEV=""
for ((i = 0; i < 100; i++)); do
    DEV="$(comm -13 <(echo "$before" | sort) <(ls /dev/ublkb* 2>/dev/null | sort) | head -1)"
    [[ -n "$DEV" ]] && break
    sleep 0.1
done
[[ -n "$DEV" ]] || fail "wbctl create demo made no new /dev/ublkbN"
log "writeboost device: $DEV"

log "fio burst (fio-jobs/burst-4k-randwrite.fio) through $DEV"
DEV="$DEV" fio --eta=never "$REPO/fio-jobs/burst-4k-randwrite.fio" || fail "fio burst failed"

log "wbctl status demo"
"$WBCTL" status demo

log "wbctl delete demo"
"$WBCTL" delete demo
DEMO_UP=0
log "demo: done"
