#!/usr/bin/env bash
# writeboost through the real ublk driver: `wbctl create` makes /dev/ublkbN with the right queue
# limits; the fio verify jobs pass through it; `wbctl status --json` counters move as the
# workload says (writes, hits, misses, dirty bytes falling during a drain); `wbctl set` changes
# knobs; `wbctl delete --drain` leaves the backing device holding exactly what the device held.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 2G backing.img; truncate -s 1G cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-verify.sh
#
# Prints "ublk-verify: PASS" at the end. WB_VERIFY_SCALE=N (default 8) runs the fio verify jobs
# of fio-jobs/ at 1/N of their size, and the drain phase on 512/N MiB but never less than 128 MiB:
# emulated, the VM drains at a few MiB/s, and the whole suite has a time budget; but dirty bytes
# fall in steps of up to 64 MiB (one checkpoint), so a drain of 64 MiB is seen only full or clean.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
[[ -z "${WB_WATCHDOG:-}" ]] || wb_watchdog "$WB_WATCHDOG"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
SCALE="${WB_VERIFY_SCALE:-8}"
ONCE_MIB=$((512 / SCALE > 128 ? 512 / SCALE : 128))
log "kernel $(uname -r), $(nproc) CPUs; backing $BACKING, cache legs $CACHE0 $CACHE1"

# Writeback only when asked, so the counters below are the workload's alone.
dev="$(wb_create v0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" \
    --idle-aware off --low-watermark 100% --age-threshold-secs 3600 --pressure-start 0.95 \
    --pressure-full 1.0)"
log "wbctl create v0 -> $dev"
"$WBCTL" list

# The block device looks like the spec says.
b="$(basename "$dev")"
q=/sys/block/$b/queue
size=$(blockdev --getsize64 "$dev")
[[ "$size" -eq "$(blockdev --getsize64 "$BACKING")" ]] || fail "$dev is $size bytes, backing is $(blockdev --getsize64 "$BACKING")"
[[ "$(cat $q/write_cache)" == "write back" ]] || fail "write_cache is '$(cat $q/write_cache)', expected 'write back' (UBLK_ATTR_VOLATILE_CACHE)"
[[ "$(cat $q/fua)" == 1 ]] || fail "fua is '$(cat $q/fua)', expected 1 (UBLK_ATTR_FUA)"
[[ "$(cat $q/physical_block_size)" == 4096 ]] || fail "physical_block_size $(cat $q/physical_block_size)"
[[ "$(cat $q/logical_block_size)" == "$(blockdev --getss "$BACKING")" ]] || fail "logical_block_size $(cat $q/logical_block_size) differs from the backing device's"
[[ "$(cat $q/discard_granularity)" == 4096 ]] || fail "discard_granularity $(cat $q/discard_granularity)"
[[ "$(cat $q/discard_max_bytes)" -gt 0 ]] || fail "discard not supported"
log "$dev: $size bytes, write_cache=$(cat $q/write_cache) fua=$(cat $q/fua) lbs=$(cat $q/logical_block_size) pbs=$(cat $q/physical_block_size) discard_max=$(cat $q/discard_max_bytes) nr_hw_queues=$(ls /sys/block/$b/mq | wc -l)"
[[ "$(wb_field v0 mode)" == mirrored ]] || fail "mode is $(wb_field v0 mode), not mirrored"

# ---- counters move as the workload says
read -r w0 wb0 <<<"$(wb_field v0 writes write_bytes)"
# 1024 writes of 4 KiB to distinct blocks (random order) in the first 4 MiB, then a flush.
fio --name=count-writes --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=4M --end_fsync=1 --randrepeat=0 --eta=never >/dev/null || fail "count-writes fio failed"
read -r w1 wb1 dirty flushed current <<<"$(wb_field v0 writes write_bytes dirty_bytes \
    segments.last_flushed_id segments.current_id)"
log "writes $w0 -> $w1, write_bytes $wb0 -> $wb1"
[[ $((wb1 - wb0)) -eq $((4 << 20)) ]] || fail "write_bytes grew by $((wb1 - wb0)), expected 4 MiB"
# The block layer may merge adjacent requests, never split a 4 KiB one.
((w1 - w0 >= 1 && w1 - w0 <= 1024)) || fail "writes grew by $((w1 - w0)), expected 1..1024"
((dirty >= 4 << 20)) || fail "dirty_bytes $dirty < 4 MiB after writing 4 MiB (no writeback running)"
((flushed >= 1 && flushed <= current)) || fail "segments: last_flushed_id $flushed, current_id $current"

read -r h0 m0 <<<"$(wb_field v0 reads.hits reads.misses)"
dd if="$dev" of=/dev/null bs=64k count=64 iflag=direct status=none # the 4 MiB just written
read -r h1 m1 <<<"$(wb_field v0 reads.hits reads.misses)"
log "reads of the written 4 MiB: hits $h0 -> $h1, misses $m0 -> $m1"
[[ $((h1 - h0)) -eq 1024 && $((m1 - m0)) -eq 0 ]] || fail "expected 1024 block hits and no miss, got +$((h1 - h0)) hits +$((m1 - m0)) misses"
dd if="$dev" of=/dev/null bs=64k count=64 skip=1024 iflag=direct status=none # 64 MiB on: never written
read -r h2 m2 <<<"$(wb_field v0 reads.hits reads.misses)"
[[ $((h2 - h1)) -eq 0 && $((m2 - m1)) -eq 1024 ]] || fail "expected 1024 block misses, got +$((h2 - h1)) hits +$((m2 - m1)) misses"

# ---- fio verify jobs through the device
for job in verify-4k-random verify-mixed-sizes; do
    # The users' job file, its size divided by SCALE.
    awk -v scale="$SCALE" -F= '$1 == "size" { sub(/M$/, "", $2); $0 = "size=" int($2 / scale) "M" } 1' \
        "fio-jobs/$job.fio" >"$WB_OUT/$job.fio"
    grep -q "^size=$((256 / SCALE))M\|^size=$((512 / SCALE))M" "$WB_OUT/$job.fio" || fail "could not scale $job.fio"
    wb_fio v0 "$WB_OUT/$job.fio"
done
"$WBCTL" status v0

# ---- wbctl set; drain
read -r dirty wbb0 <<<"$(wb_field v0 dirty_bytes written_back_bytes)"
log "after the verify jobs: dirty_bytes $dirty, written_back_bytes $wbb0"
((dirty > 32 << 20)) || fail "only $dirty bytes dirty; writeback was not held back"
"$WBCTL" set v0 background_rate=0.5 age_threshold_secs=7200
[[ "$(wb_field v0 policy.background_rate policy.age_threshold_secs)" == "0.5 7200" ]] || fail "wbctl set did not change the knobs"
if "$WBCTL" set v0 low_watermark=2 2>/dev/null; then fail "wbctl set accepted low_watermark=2"; fi
t0=$EPOCHREALTIME
"$WBCTL" drain v0 || fail "wbctl drain failed"
log "drain of $((dirty >> 20)) MiB took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s"
read -r dirty_after wbb1 lwb cur <<<"$(wb_field v0 dirty_bytes written_back_bytes \
    segments.last_written_back_id segments.current_id)"
[[ "$dirty_after" -eq 0 ]] || fail "dirty_bytes $dirty_after after wbctl drain"
((wbb1 - wbb0 >= dirty)) || fail "written_back_bytes grew by $((wbb1 - wbb0)) < $dirty dirty bytes"
[[ "$lwb" -eq "$cur" ]] || fail "after drain: last_written_back_id $lwb != current_id $cur"

# ---- dirty bytes fall while a drain runs: ONCE_MIB written once (no block rewritten), drained
fio --name=once --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=64k \
    --iodepth=8 --size="${ONCE_MIB}M" --offset=1G --randrepeat=0 --eta=never >/dev/null || fail "write-once fio failed"
dirty=$(wb_field v0 dirty_bytes)
[[ "$dirty" -eq $((ONCE_MIB << 20)) ]] || fail "dirty_bytes $dirty after writing $ONCE_MIB MiB once, expected exactly that"
# One epoch drains in steps of at most 64 MiB (a checkpoint at least that often) and, here, in a
# second or two: capped at 16 MiB/s, the samples see it between full and clean.
"$WBCTL" set v0 max_bandwidth_mib=16
samples="$WB_OUT/drain-samples.txt"
: >"$samples"
touch "$WB_OUT/draining"
(
    while [[ -e "$WB_OUT/draining" ]]; do
        "$WBCTL" status v0 --json 2>/dev/null | sed -n 's/^ *"dirty_bytes": \([0-9]*\).*/\1/p' >>"$samples" || true
        sleep 0.2
    done
) &
sampler=$!
"$WBCTL" drain v0 || fail "wbctl drain failed"
rm -f "$WB_OUT/draining"
wait "$sampler" || true
wb_field v0 dirty_bytes >>"$samples"
log "dirty_bytes while draining: $(tr '\n' ' ' <"$samples")"
python3 - "$samples" <<'PY' || fail "dirty bytes did not fall during the drain"
import sys
v = [int(x) for x in open(sys.argv[1]).read().split()]
assert len(v) >= 3, f"only {len(v)} samples"
assert all(b <= a for a, b in zip(v, v[1:])), f"dirty bytes rose during the drain: {v}"
assert v[-1] == 0, f"not clean after the drain: {v}"
assert any(0 < x < v[0] for x in v), f"no sample between full and clean: {v}"
PY
"$WBCTL" set v0 max_bandwidth_mib=0

# ---- delete --drain: the backing device alone holds what the device held
fio --name=tail-writes --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=8 --size=32M --offset=64M --randrepeat=0 --eta=never >/dev/null || fail "tail-writes fio failed"
# What the jobs above wrote (the verify jobs from 0, the tail writes at 64 MiB): compared whole.
region=$(((512 / SCALE > 96 ? 512 / SCALE : 96) << 20))
sum_dev="$(dev_sha256 "$dev" $region)"
"$WBCTL" delete v0 --drain || fail "wbctl delete --drain failed"
[[ ! -b "$dev" ]] || {
    sleep 1
    [[ ! -b "$dev" ]] || fail "$dev still exists after wbctl delete"
}
[[ ! -e "$WRITEBOOST_RUN_DIR/v0.json" && ! -e "$WRITEBOOST_RUN_DIR/v0.sock" ]] || fail "state files left after delete"
sum_backing="$(dev_sha256 "$BACKING" $region)"
log "sha256 of the first $((region >> 20)) MiB: device $sum_dev, backing alone $sum_backing"
[[ "$sum_dev" == "$sum_backing" ]] || fail "the backing device does not hold what the device held"

# ---- check: offline, read-only, says clean
"$WBCTL" check --cache "$CACHE0" --cache "$CACHE1"
[[ "$("$WBCTL" check --cache "$CACHE0" --cache "$CACHE1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clean"])')" == True ]] ||
    fail "wbctl check says the cache is not clean after delete --drain"

# ---- re-attach: create again over the same devices finds the cache, data still there
dev2="$(wb_create v0 --backing "$BACKING" --cache "$CACHE1" --cache "$CACHE0")"
log "re-attached (legs given in the other order) -> $dev2"
[[ "$(dev_sha256 "$dev2" $region)" == "$sum_dev" ]] || fail "re-attached device reads differently"
"$WBCTL" delete v0 || fail "wbctl delete failed"

wb_no_kernel_io_errors
log "ublk-verify: PASS"
