#!/usr/bin/env bash
# The ublk performance budgets of CONTRACT §8, from one boot:
#   1. 4 KiB random-write IOPS (libaio, QD32) through writeboost against the null ublk target
#      (wb-null, the transport ceiling) with the same queues and depth -> ratio (goal >= 0.8);
#   2. the time for a 4 KiB random-write burst that fits in the cache (QD32, then one fsync,
#      like fio-jobs/burst-4k-randwrite.fio) through writeboost against the same burst on the
#      throttled backing device alone -> speed-up (goal >= 3x);
#   3. fsync'd 4 KiB writes (fio --fsync=1: one writer at QD1, then 8 writers) through writeboost
#      against the raw cache disk (measured before the cache is created on it), with the bytes
#      each fsync'd write cost the cache leg (its /sys/block/*/stat) and how many such writes the
#      cache holds at that cost; then one writer in three rounds of the raw disk and a fresh
#      mirrored set back to back -> the median of the rounds' ratios (goal >= 0.4), with both
#      cache disks written at once in each round (a mirror's legs) printed beside it.
#
#   cargo build --release -p wb-tools --bin wbctl --bin wb-null
#   truncate -s 2G backing.img; truncate -s 4G cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-bench.sh [RUNTIME_SECS] [BURST_MIB]
#
# Prints "bench: ..." lines with every figure, then "ublk-bench: DONE". Benchmarks print; they
# do not assert timings (the Rust test prints the ratios and the goals).
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
RUNTIME="${1:-15}"
BURST_MIB="${2:-64}"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
QUEUES="${WB_BENCH_QUEUES:-$(nproc)}"
DEPTH="${WB_BENCH_DEPTH:-128}"
log "kernel $(uname -r), $(nproc) CPUs; queues $QUEUES depth $DEPTH; runtime ${RUNTIME}s; burst ${BURST_MIB} MiB"

randwrite=(--ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 --time_based
    --runtime="$RUNTIME" --ramp_time=2 --size=256M --randrepeat=0 --norandommap)

sectors_written() { awk '{print $7}' "/sys/block/$(basename "$1")/stat"; }

# ---- 3a. fsync'd writes on the raw cache disk, before writeboost formats it
read -r raw1 _ <<<"$(wb_fsync_fio raw-sync-1 "$CACHE0" 1 "$RUNTIME")"
read -r raw8 _ <<<"$(wb_fsync_fio raw-sync-8 "$CACHE0" 8 "$RUNTIME")"
log "bench: raw cache disk $CACHE0: 4k randwrite fsync=1: 1 writer $raw1/s, 8 writers $raw8/s"

# The writeboost device: a fresh cache, large enough that neither measurement fills it (every
# write takes log space, rewrites included; a full cache runs at the backing device's pace).
dev="$(wb_create b0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force \
    --queues "$QUEUES" --depth "$DEPTH")"
log "writeboost device $dev: cache $(wb_field b0 capacity_bytes) bytes"

# ---- 1. Burst absorption: the burst on the backing device alone, then through writeboost
burst=(--ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size="${BURST_MIB}M"
    --randrepeat=0 --end_fsync=1)
t0=$EPOCHREALTIME
fio --name=burst-backing --filename="$BACKING" --offset=1G "${burst[@]}" --eta=never \
    --output="$WB_OUT/burst-backing.log" || fail "burst on the backing device failed"
t_backing=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}')
log "bench: burst ${BURST_MIB} MiB 4k randwrite + fsync on the throttled backing alone: ${t_backing} s"
t0=$EPOCHREALTIME
fio --name=burst-wb --filename="$dev" --offset=1G "${burst[@]}" --eta=never \
    --output="$WB_OUT/burst-wb.log" || fail "burst through writeboost failed"
t_wb=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}')
log "bench: burst ${BURST_MIB} MiB 4k randwrite + fsync through writeboost: ${t_wb} s (stall_ms $(wb_field b0 stall_ms))"
awk -v a="$t_backing" -v b="$t_wb" 'BEGIN{printf "bench: burst speed-up = %.2f / %.2f = %.1fx (goal >= 3x)\n", a, b, a / b}'

# ---- 2. IOPS: writeboost between two runs of the null target (TCG drifts a little)
"$WBCTL" set b0 idle_aware=off >/dev/null # no full-speed writeback between the runs
start_wb_null --size 2G --queues "$QUEUES" --depth "$DEPTH"
null1=$(fio_iops write --name=null-randwrite-1 --filename="$WB_NULL_DEV" "${randwrite[@]}")
stop_wb_null
log "bench: null ublk target: 4k randwrite QD32 IOPS=$null1"
read -r stall0 <<<"$(wb_field b0 stall_ms)"
wbi=$(fio_iops write --name=wb-randwrite --filename="$dev" "${randwrite[@]}")
read -r stall1 used cap <<<"$(wb_field b0 stall_ms used_bytes capacity_bytes)"
log "bench: writeboost: 4k randwrite QD32 IOPS=$wbi (stalled $((stall1 - stall0)) ms; cache $((used >> 20)) of $((cap >> 20)) MiB used)"
start_wb_null --size 2G --queues "$QUEUES" --depth "$DEPTH"
null2=$(fio_iops write --name=null-randwrite-2 --filename="$WB_NULL_DEV" "${randwrite[@]}")
stop_wb_null
log "bench: null ublk target (again): 4k randwrite QD32 IOPS=$null2"
python3 - "$wbi" "$null1" "$null2" <<'PY'
import sys
wb, n1, n2 = map(int, sys.argv[1:4])
null = (n1 + n2) / 2
print(f"bench: IOPS ratio writeboost/null = {wb}/{null:.0f} = {wb / null:.3f} (goal >= 0.8)")
PY
"$WBCTL" status b0
"$WBCTL" delete b0 >/dev/null || fail "wbctl delete failed"
# ---- 3b. fsync'd writes through writeboost, on a fresh device: the data the phases above left
# would be written back meanwhile (after 30 s), and under TCG writeback's reads and checkpoints
# take the CPU the sync path needs. The cache is far from full: no writer waits.
dev="$(wb_create b1 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force \
    --queues "$QUEUES" --depth "$DEPTH")"
for jobs in 1 8; do
    read -r stall0 <<<"$(wb_field b1 stall_ms)"
    s0=$(sectors_written "$CACHE0")
    read -r iops writes <<<"$(wb_fsync_fio wb-sync-$jobs "$dev" $jobs "$RUNTIME")"
    s1=$(sectors_written "$CACHE0")
    read -r stall1 cap <<<"$(wb_field b1 stall_ms capacity_bytes)"
    raw=$([[ $jobs == 1 ]] && echo "$raw1" || echo "$raw8")
    python3 - "$jobs" "$iops" "$raw" "$writes" "$((s1 - s0))" "$cap" "$((stall1 - stall0))" <<'PY'
import sys
jobs, iops, raw, writes, sectors, cap, stall = map(int, sys.argv[1:8])
per = sectors * 512 / max(writes, 1)
print(f"bench: fsync'd 4k writes, {jobs} writer(s): writeboost {iops}/s vs raw cache disk {raw}/s"
      f" (before the cache) = {iops / raw:.3f}")
print(f"bench: fsync'd 4k writes, {jobs} writer(s): {writes} writes, {per:.0f} bytes each on a cache leg,"
      f" so the {cap >> 20} MiB cache holds {int(cap / per)} of them (goal >= 200000); stalled {stall} ms")
PY
done
"$WBCTL" status b1
"$WBCTL" delete b1 >/dev/null || fail "wbctl delete failed"
# ---- 3c. one writer, side by side: TCG's pace drifts within a boot (the raw disk has measured
# 990/s at the start of a run and 1342/s at its end), so the QD1 goal is judged on rounds that
# each measure the raw cache disk and a fresh mirrored set on it back to back — the raw disk
# first in rounds 1 and 3, writeboost first in round 2, so that a steady drift favours neither —
# and on the median of the rounds' ratios, which one disturbed round does not move. Each round
# also measures both cache disks written at once, one writer each: what a mirror's two legs face
# (in the emulated VM two disks go slower together than one alone), printed beside the goal.
sync_iops() { # NAME DEV: the IOPS of one fsync'd writer, failing the script if fio did
    local out
    out="$(wb_fsync_fio "$1" "$2" 1 "$RUNTIME")" || exit 1
    [[ $out =~ ^([1-9][0-9]*)\  ]] || fail "fio $1 on $2 measured no writes: '$out'"
    echo "${BASH_REMATCH[1]}"
}
round_on_writeboost() { # ROUND: the IOPS through a fresh mirrored set
    local dev
    dev="$(wb_create r$1 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --force \
        --queues "$QUEUES" --depth "$DEPTH")" || exit 1
    sync_iops wb-sync-1-r$1 "$dev"
    "$WBCTL" delete r$1 >/dev/null || fail "wbctl delete r$1 failed"
}
both_disks_iops() { # ROUND: the IOPS of each cache disk with both written at once
    local out
    out="$(wb_fsync_fio_both r$1 "$CACHE0" "$CACHE1" "$RUNTIME")" || exit 1
    [[ $out =~ ^[1-9][0-9]*$ ]] || fail "fio on both cache disks measured no writes: '$out'"
    echo "$out"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", a / b}'; }
median_of_3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
ratios=() of_both=()
for round in 1 2 3; do
    on_exit "_wb_cleanup r$round" # wb_create registers it in its own subshell only
    if ((round == 2)); then
        wb=$(round_on_writeboost $round)
        both=$(both_disks_iops $round)
        raw=$(sync_iops raw-sync-1-r$round "$CACHE0")
    else
        raw=$(sync_iops raw-sync-1-r$round "$CACHE0")
        both=$(both_disks_iops $round)
        wb=$(round_on_writeboost $round)
    fi
    ratios+=("$(ratio "$wb" "$raw")") of_both+=("$(ratio "$wb" "$both")")
    log "bench: round $round, 1 writer: raw cache disk $raw/s, both cache disks at once" \
        "$both/s each, writeboost $wb/s = ${ratios[-1]} of the raw disk, ${of_both[-1]} of both at once"
done
log "bench: fsync'd 4k writes, 1 writer: writeboost/raw cache disk per round ${ratios[*]}," \
    "median $(median_of_3 "${ratios[@]}") (goal >= 0.4); writeboost/both cache disks at once" \
    "per round ${of_both[*]}, median $(median_of_3 "${of_both[@]}")"
log "ublk-bench: DONE"
