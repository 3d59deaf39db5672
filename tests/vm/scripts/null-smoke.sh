#!/usr/bin/env bash
# Real-kernel smoke test of the VM harness: load ublk_drv, start the null ublk
# target (wb-null), run a short 4 KiB random-write fio (libaio, QD32) against
# its /dev/ublkbN, print the IOPS, stop it.
#
#   cargo build --release -p wb-tools --bin wb-null
#   tests/vm/run.sh tests/vm/scripts/null-smoke.sh [RUNTIME_SECS]
#
# Prints "null-smoke: randwrite 4k QD32 IOPS=<n>" and "null-smoke: PASS".
set -euo pipefail
# shellcheck source=tests/vm/guest-lib.sh
source "$(dirname "$0")/../guest-lib.sh"
need_vm
RUNTIME="${1:-10}"

log "kernel $(uname -r), $(nproc) CPUs"
need_ublk
start_wb_null --size 4G --queues 1 --depth 128

# The device must look like what wb-null asked for.
dev="$(basename "$WB_NULL_DEV")"
size=$(blockdev --getsize64 "$WB_NULL_DEV")
[[ "$size" -eq $((4 << 30)) ]] || fail "$WB_NULL_DEV is $size bytes, expected 4 GiB"
wc="$(cat "/sys/block/$dev/queue/write_cache" 2>/dev/null || echo "?")"
log "$WB_NULL_DEV: $size bytes, write_cache=$wc, fua=$(cat "/sys/block/$dev/queue/fua" 2>/dev/null || echo "?")"
[[ "$wc" == "write back" ]] || fail "expected a volatile write cache (UBLK_ATTR_VOLATILE_CACHE), got '$wc'"

# A read and a flush complete (full byte counts, no I/O errors).
dd if="$WB_NULL_DEV" of=/dev/null bs=1M count=8 iflag=direct status=none || fail "direct read failed"
dd if=/dev/zero of="$WB_NULL_DEV" bs=4k count=16 oflag=direct conv=fsync status=none || fail "write+fsync failed"

iops=$(fio_iops write --name=null-randwrite --filename="$WB_NULL_DEV" \
    --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
    --time_based --runtime="$RUNTIME" --ramp_time=1 --size=1G --randrepeat=0 \
    --norandommap)
log "null-smoke: randwrite 4k QD32 IOPS=$iops"
[[ "$iops" -gt 0 ]] || fail "no I/O completed"

stop_wb_null
[[ ! -b "$WB_NULL_DEV" ]] || {
    sleep 1
    [[ ! -b "$WB_NULL_DEV" ]] || fail "$WB_NULL_DEV still exists after wb-null stopped"
}
log "null-smoke: PASS"
