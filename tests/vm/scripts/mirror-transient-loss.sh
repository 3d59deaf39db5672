#!/usr/bin/env bash
# Transient loss of the whole mirrored cache (CONTRACT §2 "cache lost entirely", the failure-path
# contract): both legs are dm linear targets that go to the dm `error` target and later come
# back. A lost log must never be replayed, even when its legs turn readable again.
#
#   1. writeback held back; 1 MiB of pattern A at offset 0 (O_DIRECT) + fsync: A lives only in
#      the cache;
#   2. both legs -> `error`; a 4 KiB write (pattern S, at 4 MiB) + fsync: the write is
#      acknowledged, the fsync FAILS with EIO (what it covers went with the cache); status says
#      passthrough with cache_lost{backing_holds_id, lost_from_id, lost_through_id,
#      lost_dirty_bytes}, fault_record_sequence > 0; the fault file exists; the daemon logged the
#      CRITICAL line;
#   3. 1 MiB of pattern B at offset 0 (O_DIRECT) + fsync: SUCCEEDS (passthrough, nothing lost);
#   4. kill -9 the daemon; both legs back to their linear tables (readable, holding A's log as
#      a valid, dirty live log: only the host's fault file knows of the loss at this point);
#      `wbctl recover`: passthrough, cache_lost set; the device reads B at 0 and not S at 4 MiB
#      (the lost log, RAM buffer file included, is not replayed);
#   5. `wbctl delete --drain`: the backing device holds B at 0 and no S at 4 MiB;
#   6. `wbctl check` (offline) of the two legs shows the loss (JSON faults.cache_lost, a "  LOST"
#      line), from the legs alone too (the recovery wrote the record onto the legs once they
#      were writable again).
# The kernel logs no I/O error on the device other than that one failed FLUSH.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 256M backing.img c0.img c1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk c0.img --disk c1.img \
#       tests/vm/scripts/mirror-transient-loss.sh
#
# Prints "mirror-transient-loss: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/mirror-lib.sh"
need_vm
need_ublk
need_dm
[[ -z "${WB_WATCHDOG:-}" ]] || wb_watchdog "$WB_WATCHDOG"
BACKING="$(disk 0)" RAW0="$(disk 1)" RAW1="$(disk 2)"
NAME=tl
MIB=$((1 << 20))
S_OFF=$((4 << 20)) # the small write the loss takes
log "kernel $(uname -r), $(nproc) CPUs; backing $BACKING (throttled), legs over $RAW0 $RAW1; fault dir $WRITEBOOST_FAULT_DIR"

# ---- helpers (few python3 runs: under emulation each costs seconds)
# pattern FILE TAG BYTES: 64-byte lines naming the tag and their offset (recognisable in a dump)
pattern() {
    awk -v tag="$2" -v size="$3" 'BEGIN {
        pad = sprintf("%23s", ""); gsub(/ /, tag, pad)
        for (o = 0; o < size; o += 64) printf "writeboost transient-loss %s @%010d %s\n", tag, o, pad
    }' >"$1"
    [[ "$(stat -c %s "$1")" == "$3" ]] || fail "pattern $2: $(stat -c %s "$1") bytes, not $3"
}

# direct_write DEV FILE OFFSET: FILE written at OFFSET with O_DIRECT in one request, then fsync
# (dd conv=fsync).
# Prints what happened; exit 0 both ok, 2 the write failed, 3 the fsync failed, 4 other.
direct_write() {
    local size err rc=0
    size="$(stat -c %s "$2")"
    (($3 % size == 0)) || fail "direct_write: offset $3 is not a multiple of $size"
    err="$(timeout 120 dd if="$2" of="$1" bs="$size" seek=$(($3 / size)) count=1 \
        oflag=direct conv=fsync,notrunc status=none 2>&1)" || rc=$?
    if ((rc == 0)); then
        echo "write of $size bytes at $3: ok; fsync: ok"
    elif [[ "$err" == *"fsync failed"*"Input/output error"* ]]; then
        echo "write of $size bytes at $3: ok; fsync: FAILED EIO ($err)"
        return 3
    elif [[ "$err" == *"error writing"* ]]; then
        echo "write of $size bytes at $3: FAILED ($err)"
        return 2
    else
        echo "write of $size bytes at $3: dd exit $rc ($err)"
        return 4
    fi
}

# sha_at DEV OFFSET BYTES: SHA-256 of BYTES at OFFSET of DEV, read with O_DIRECT in one request
# (OFFSET a multiple of BYTES)
sha_at() {
    timeout 120 dd if="$1" bs="$3" skip=$(($2 / $3)) count=1 iflag=direct status=none |
        sha256sum | cut -d' ' -f1
}

# jval FILE KEY: the value of the first "KEY": in a pretty-printed JSON file (numbers, null,
# strings without quotes; "{" for an object)
jval() {
    sed -n -E "s/^ *\"$2\": \"?([^\",]*)\"?,?\$/\\1/p" "$1" | head -1
}

# dm_restore NAME TABLE: back to TABLE (suspend, load, resume)
dm_restore() {
    dmsetup suspend --noudevsync "$1" || fail "dmsetup suspend $1"
    dmsetup load "$1" --table "$2" || fail "dmsetup load $1 ($2)"
    dmsetup resume --noudevsync "$1" || fail "dmsetup resume $1"
}

A=/tmp/pattern-A S=/tmp/pattern-S B=/tmp/pattern-B
pattern $A A $MIB
pattern $S S 4096
pattern $B B $MIB
SUM_A="$(sha256sum <$A | cut -d' ' -f1)"
SUM_S="$(sha256sum <$S | cut -d' ' -f1)"
SUM_B="$(sha256sum <$B | cut -d' ' -f1)"
SUM_Z1M="$(head -c $MIB /dev/zero | sha256sum | cut -d' ' -f1)"
SUM_Z4K="$(head -c 4096 /dev/zero | sha256sum | cut -d' ' -f1)"
log "patterns: A ${SUM_A:0:16}..., B ${SUM_B:0:16}..., S ${SUM_S:0:16}... (zeroes: ${SUM_Z1M:0:16}...)"

# ---- 1. the device, writeback held back; A only in the cache
LEG0="$(dm_linear wbleg0 "$RAW0")"
LEG1="$(dm_linear wbleg1 "$RAW1")"
TABLE0="$(dm_table wbleg0)" TABLE1="$(dm_table wbleg1)"
log "legs: $LEG0 = $TABLE0; $LEG1 = $TABLE1"
dev="$(wb_create $NAME --backing "$BACKING" --cache "$LEG0" --cache "$LEG1" \
    --idle-aware false --low-watermark 99% --age-threshold-secs 100000)"
log "wbctl create $NAME -> $dev"

out="$(direct_write "$dev" $A 0)" || fail "writing pattern A: $out"
log "pattern A: $out"
[[ "$(sha_at "$dev" 0 $MIB)" == "$SUM_A" ]] || fail "the device does not read A back"
F="$WB_OUT/status-before.json"
wb_status $NAME >"$F"
dirty="$(jval "$F" dirty_bytes)"
log "before the loss: mode $(jval "$F" mode), dirty $dirty bytes, last flushed segment $(jval "$F" last_flushed_id), last written back $(jval "$F" last_written_back_id)"
[[ "$(jval "$F" mode)" == mirrored ]] || fail "mode is $(jval "$F" mode), not mirrored"
((dirty >= MIB)) || fail "only $dirty bytes dirty after writing 1 MiB: writeback was not held back"
[[ "$(sha_at "$BACKING" 0 $MIB)" == "$SUM_Z1M" ]] || fail "A reached the backing device: writeback was not held back"

# ---- 2. both legs fail; the flush after the loss fails
dm_error wbleg0 wbleg1
log "INJECTED: both legs -> error ('$(dm_table wbleg0)', '$(dm_table wbleg1)')"
rc=0
out="$(direct_write "$dev" $S $S_OFF)" || rc=$?
log "small write + fsync after the loss: $out (exit $rc)"
((rc == 3)) || fail "expected the write to succeed and its fsync to fail with EIO (exit 3), got exit $rc: $out"

F="$WB_OUT/status-at-loss.json"
t0=$EPOCHREALTIME
while :; do
    wb_status $NAME >"$F"
    [[ "$(jval "$F" mode)" == passthrough && "$(jval "$F" cache_lost)" == "{" ]] && break
    if awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{exit !(b-a > 30)}'; then
        cat "$F" >&2
        fail "no passthrough with cache_lost 30 s after the loss"
    fi
    sleep 0.2
done
log "passthrough seen (cache_lost set) $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')s after the failed fsync"
LOST_AT="$(jval "$F" cache_lost_at)"
[[ "$LOST_AT" =~ ^[0-9]+$ ]] || fail "cache_lost_at is '$LOST_AT', not a segment id"
critical="$(grep -E "ERROR .*CRITICAL: every cache leg has failed" "$(daemon_log $NAME)" || true)"
[[ -n "$critical" ]] || fail "no error-level CRITICAL line in $(daemon_log $NAME)"
log "daemon log: $critical"
[[ "$critical" == *"up to id $LOST_AT "* ]] || fail "the CRITICAL line does not name cache_lost_at ($LOST_AT)"
faults="$(find "$WRITEBOOST_FAULT_DIR" -type f 2>/dev/null)"
[[ -n "$faults" ]] || fail "no fault file under $WRITEBOOST_FAULT_DIR after the loss"
mkdir -p "$WB_OUT/faults-at-loss" && cp $faults "$WB_OUT/faults-at-loss/"
log "fault file: $faults: $(tr -d ' \n' <$faults | head -c 300)"
sum="$(sha_at "$dev" 0 $MIB)"
[[ "$sum" != "$SUM_A" ]] || fail "in passthrough the device still reads the lost A"
[[ "$sum" == "$(sha_at "$BACKING" 0 $MIB)" ]] || fail "in passthrough the device reads differently from the backing device"

# ---- 3. a passthrough write and its flush succeed
out="$(direct_write "$dev" $B 0)" || fail "pattern B after the loss (passthrough): $out"
log "pattern B: $out"
[[ "$(sha_at "$dev" 0 $MIB)" == "$SUM_B" ]] || fail "the device does not read B back"
wb_status $NAME >"$WB_OUT/status-after-B.json"

# The loss as status showed it (one python3 run for both snapshots)
python3 - "$WB_OUT/status-at-loss.json" "$WB_OUT/status-after-B.json" <<'PY' || fail "status after the loss"
import json, sys
for path, when in zip(sys.argv[1:], ("at the loss", "after B")):
    s = json.load(open(path))
    lost = s["cache_lost"]
    keep = ("mode", "cache_lost_at", "cache_lost", "fault_record_sequence", "fault_file", "passthrough_writes")
    print(f"status {when}: " + json.dumps({k: s.get(k) for k in keep}))
    assert s["mode"] == "passthrough", s["mode"]
    assert lost is not None, "cache_lost is null"
    for k in ("backing_holds_id", "lost_from_id", "lost_through_id", "lost_dirty_bytes"):
        assert k in lost, f"cache_lost lacks {k}: {lost}"
    assert s["cache_lost_at"] == lost["backing_holds_id"], (s["cache_lost_at"], lost)
    assert lost["lost_from_id"] == lost["backing_holds_id"] + 1, lost
    assert lost["lost_through_id"] >= lost["lost_from_id"], f"no lost segment although A was dirty: {lost}"
    assert (lost["lost_dirty_bytes"] or 0) >= 1 << 20, f"lost_dirty_bytes below A's 1 MiB: {lost}"
    assert s["fault_record_sequence"] > 0, s["fault_record_sequence"]
    assert all(l["health"] == "failed" for l in s["legs"]), s["legs"]
PY

# ---- 4. kill -9; the legs come back readable; recover
pid="$(jval "$WB_OUT/status-after-B.json" pid)"
[[ "$pid" =~ ^[0-9]+$ ]] || fail "no daemon pid in the status ($pid)"
kill -9 "$pid"
for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
! kill -0 "$pid" 2>/dev/null || fail "daemon $pid survived kill -9"
log "killed the daemon (pid $pid) with SIGKILL"
if "$WBCTL" status $NAME --json >/dev/null 2>&1; then fail "status answered without a daemon"; fi
dm_restore wbleg0 "$TABLE0"
dm_restore wbleg1 "$TABLE1"
[[ "$(dm_table wbleg0)" == "$TABLE0" && "$(dm_table wbleg1)" == "$TABLE1" ]] || fail "the legs' linear tables did not come back"
log "legs back: wbleg0 '$(dm_table wbleg0)', wbleg1 '$(dm_table wbleg1)'"
# The legs hold A's log again (readable, valid): the test is that recovery does not replay it.
F="$WB_OUT/check-before-recover.json"
"$WBCTL" check --cache "$LEG0" --cache "$LEG1" --json >"$F" 2>&1 ||
    log "note: wbctl check before recover failed (see $F)"
log "legs before recover: live segments $(jval "$F" live_segments), dirty bytes $(jval "$F" dirty_bytes), fault record $(jval <(sed -n '/"faults": {/,$p' "$F") sequence) from the $(jval "$F" source)"

t0=$EPOCHREALTIME
dev_again="$(timeout 120 "$WBCTL" recover $NAME)" || fail "wbctl recover $NAME failed"
log "recovered in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}') s: $dev_again"
[[ "$dev_again" == "$dev" ]] || fail "recover made $dev_again, expected the same $dev"
wb_status $NAME >"$WB_OUT/status-after-recover.json"
sum0="$(sha_at "$dev" 0 $MIB)"
sum4="$(sha_at "$dev" $S_OFF 4096)"
grep -E "CRITICAL: cache .* was lost" "$(daemon_log $NAME)" | tail -1 | sed 's/^/  recovered daemon: /' || true

# ---- 5. delete --drain: the backing device holds B
timeout 120 "$WBCTL" delete $NAME --drain || fail "wbctl delete $NAME --drain failed"
log "wbctl delete $NAME --drain done"
back0="$(sha_at "$BACKING" 0 $MIB)"
back4="$(sha_at "$BACKING" $S_OFF 4096)"

# ---- 6. the loss stays on record: wbctl check, offline; the legs alone carry it too (the
# recovery wrote the record onto them once they were writable again)
"$WBCTL" check --cache "$LEG0" --cache "$LEG1" --json >"$WB_OUT/check.json" ||
    { cat "$WB_OUT/check.json" >&2; fail "wbctl check --json failed"; }
"$WBCTL" check --cache "$LEG0" --cache "$LEG1" >"$WB_OUT/check.txt" ||
    { cat "$WB_OUT/check.txt" >&2; fail "wbctl check failed"; }
mkdir -p /tmp/no-faults
WRITEBOOST_FAULT_DIR=/tmp/no-faults "$WBCTL" check --cache "$LEG0" --cache "$LEG1" --json \
    >"$WB_OUT/check-legs-only.json" || fail "wbctl check --json (legs only) failed"
sed 's/^/  check: /' "$WB_OUT/check.txt"

# ---- the verdicts of 4-6
python3 - "$WB_OUT/status-after-recover.json" "$LOST_AT" "$WB_OUT/check.json" "$WB_OUT/check-legs-only.json" <<'PY' || fail "after recover / wbctl check"
import json, sys
s = json.load(open(sys.argv[1]))
lost_at = int(sys.argv[2])
print("status after recover: " + json.dumps({k: s.get(k) for k in ("mode", "cache_lost_at", "cache_lost", "fault_record_sequence", "dirty_bytes")}))
assert s["mode"] == "passthrough", f"mode {s['mode']} after recovering a lost cache"
assert s["cache_lost"] is not None, "cache_lost is null after recover"
assert s["cache_lost_at"] == lost_at and s["cache_lost"]["backing_holds_id"] == lost_at, (s["cache_lost_at"], s["cache_lost"], lost_at)
assert s["fault_record_sequence"] > 0, s["fault_record_sequence"]
assert s["dirty_bytes"] == 0, f"dirty_bytes {s['dirty_bytes']}: something of the lost log was taken back"
for path, what in ((sys.argv[3], "check faults"), (sys.argv[4], "check faults, legs only")):
    f = json.load(open(path))["faults"]
    print(f"{what}: " + json.dumps(f))
    assert f["cache_lost"] is not None, f"{what}: cache_lost is null"
    assert f["cache_lost"]["backing_holds_id"] == lost_at, f
    assert f["sequence"] > 0, f
assert f["source"] == "legs", f"without the host's fault file the loss is not on the legs: {f}"
PY
[[ "$sum0" != "$SUM_A" ]] || fail "REPLAYED: after recover the device reads the lost pattern A at 0"
[[ "$sum0" == "$SUM_B" ]] || fail "after recover the device does not read B at 0 (sha256 $sum0)"
[[ "$sum4" != "$SUM_S" ]] || fail "REPLAYED: after recover the device reads the lost small write S at $S_OFF"
[[ "$sum4" == "$SUM_Z4K" ]] || fail "after recover the device reads neither zeroes nor S at $S_OFF (sha256 $sum4)"
log "after recover the device reads B at 0 and zeroes at $S_OFF: the lost log was not replayed"
[[ "$back0" != "$SUM_A" ]] || fail "REPLAYED: after delete --drain the backing device holds the lost A"
[[ "$back0" == "$SUM_B" ]] || fail "after delete --drain the backing device does not hold B at 0 (sha256 $back0)"
[[ "$back4" == "$SUM_Z4K" ]] || fail "after delete --drain the backing device does not read zeroes at $S_OFF"
log "backing device after delete --drain: B at 0 (sha256 ${SUM_B:0:16}...), zeroes at $S_OFF"
grep -q "^  LOST" "$WB_OUT/check.txt" || fail "wbctl check printed no '  LOST' line"
log "check: $(grep "^  LOST" "$WB_OUT/check.txt" | sed 's/^ *//')"

# The FLUSH that failed on purpose (step 2) may be logged by the kernel: as a FLUSH, or as the
# empty PREFLUSH write it came as (no data: phys_seg 0). Any other I/O error on the device fails.
if dmesg | grep -E "I/O error.*ublkb|error on dev ublkb" | grep -v -E "FLUSH|phys_seg 0 "; then
    fail "the kernel logged I/O errors (other than a FLUSH) on the writeboost device"
fi
log "kernel: $(dmesg | grep -c -E 'I/O error.*ublkb.*(FLUSH|phys_seg 0 )' || true) failed FLUSH(es) logged on the device"
cp "$(daemon_log $NAME)" "$WB_OUT/" 2>/dev/null || true
cp -r "$WRITEBOOST_FAULT_DIR" "$WB_OUT/faults-at-end" 2>/dev/null || true
log "mirror-transient-loss: PASS"
