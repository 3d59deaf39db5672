#!/usr/bin/env bash
# Issue 6, both cache legs fail (CONTRACT §2 "cache lost entirely", §5): both legs of a mirrored
# cache are dm linear targets; mirror-journal.py writes distinct tagged 4 KiB blocks through the
# device (O_DIRECT, an fsync = FLUSH every 1..48 writes) and journals every write and fsync;
# mid-workload it switches BOTH legs to the dm `error` target at once, keeps writing until
# `wbctl status` says passthrough, then writes some more (these go straight to the backing
# device). Then:
#   - status: mode passthrough, cache_lost_at set, both legs failed; the daemon logged the
#     error-level CRITICAL line naming the last written-back segment;
#   - the backing device, read directly, passes the cache-loss oracle (state at some flush
#     boundary B + a subset of epoch B, nothing later; every post-loss write present);
#   - the device reads the same as the backing device (passthrough);
#   - the oracle rejects reordered/torn/misdirected images built from this very journal;
#   - `wbctl replace` of both legs by spare disks → mirrored again; a second journaled workload,
#     `wbctl delete --drain`, and the backing device holds every write of it.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 1G backing.img; truncate -s 256M c0.img c1.img s0.img s1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk c0.img --disk c1.img --disk s0.img \
#       --disk s1.img tests/vm/scripts/mirror-both-fail.sh [PRE_SECS [POST_WRITES [EPOCH_WRITES]]]
#
# PRE_SECS (default 12): how long the workload writes before the injection; POST_WRITES (default
# 600): writes after passthrough was seen; EPOCH_WRITES: an fsync every 1..N writes (large N:
# long epochs, so writeback batches are large and one is likely in flight when the legs fail);
# by default 48 or 3000, by the seed's parity, so that runs cover both. WB_MIRROR_SEED picks the
# workload's random sequence (default: random, printed). Prints "mirror-both-fail: PASS" at the
# end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/mirror-lib.sh"
need_vm
need_ublk
need_dm
[[ -z "${WB_WATCHDOG:-}" ]] || wb_watchdog "$WB_WATCHDOG"
PRE_SECS="${1:-12}"
POST_WRITES="${2:-600}"
SEED="${WB_MIRROR_SEED:-$((RANDOM * 32768 + RANDOM))}"
EPOCH_WRITES="${3:-$((SEED % 2 ? 3000 : 48))}"
BACKING="$(disk 0)" RAW0="$(disk 1)" RAW1="$(disk 2)" SPARE0="$(disk 3)" SPARE1="$(disk 4)"
log "kernel $(uname -r), $(nproc) CPUs; backing $BACKING (throttled), legs over $RAW0 $RAW1, spares $SPARE0 $SPARE1; seed $SEED, an fsync every 1..$EPOCH_WRITES writes"

# The oracle can fail: synthetic journals, good and bad images.
python3 "$MJ" selftest --seed "$SEED" >"$WB_OUT/selftest-synthetic.txt" ||
    { tail -30 "$WB_OUT/selftest-synthetic.txt"; fail "oracle self-test (synthetic journals) failed"; }
log "$(tail -1 "$WB_OUT/selftest-synthetic.txt")"

LEG0="$(dm_linear wbleg0 "$RAW0")"
LEG1="$(dm_linear wbleg1 "$RAW1")"
log "legs: $LEG0 = $(dm_table wbleg0); $LEG1 = $(dm_table wbleg1)"
# Writeback always on, so the backing device is mid-way through the log when the legs go.
dev="$(wb_create m2 --backing "$BACKING" --cache "$LEG0" --cache "$LEG1" --low-watermark 0)"
log "wbctl create m2 -> $dev"
[[ "$(wb_field m2 mode)" == mirrored ]] || fail "mode is $(wb_field m2 mode), not mirrored"
mode_sampler m2 "$WB_OUT/modes.txt"

J=/tmp/journal-1.txt
on_exit "cp $J $WB_OUT/ 2>/dev/null || true"
inject="$WB_OUT/inject.sh"
cat >"$inject" <<EOF
#!/usr/bin/env bash
# Both legs to the error target at once (suspend both, load both, resume both).
set -e
"$WBCTL" status m2 --json >"$WB_OUT/status-before.json"
dmsetup suspend --noudevsync wbleg0
dmsetup suspend --noudevsync wbleg1
dmsetup load wbleg0 --table "0 $(blockdev --getsz "$RAW0") error"
dmsetup load wbleg1 --table "0 $(blockdev --getsz "$RAW1") error"
dmsetup resume --noudevsync wbleg0
dmsetup resume --noudevsync wbleg1
EOF
t0=$EPOCHREALTIME
python3 "$MJ" write "$dev" --journal "$J" --base $((16 << 20)) --blocks 8192 --seed "$SEED" \
    --max-epoch-writes "$EPOCH_WRITES" --inject-after "$PRE_SECS" --inject-cmd "bash $inject" \
    --status-cmd "$WBCTL status m2 --json" --status-out "$WB_OUT/status-at-passthrough.json" \
    --post-writes "$POST_WRITES" || fail "the journaled workload failed (see above)"
log "workload done in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')s"
stop_mode_sampler
log "legs now: wbleg0 '$(dm_table wbleg0)', wbleg1 '$(dm_table wbleg1)'"

# ---- status and log
status_excerpt() {
    wb_status "$1" | python3 -c '
import json, sys
s = json.load(sys.stdin)
keep = {k: s[k] for k in ("mode", "cache_lost_at", "dirty_bytes", "passthrough_writes", "failure")}
keep["legs"] = [{k: l[k] for k in ("path", "health", "errors", "read_errors", "write_errors")} for l in s["legs"]]
keep["segments"] = s["segments"]
print(json.dumps(keep))'
}
log "status before the injection: $(python3 -c 'import json,sys; s=json.load(sys.stdin)["devices"][0]; print({k: s[k] for k in ("mode","segments","dirty_bytes","written_back_bytes")})' <"$WB_OUT/status-before.json")"
# (mirror-journal.py wrote the device's object of the status document, not the document)
log "first status showing passthrough: $(python3 -c 'import json,sys; s=json.load(sys.stdin); print({k: s[k] for k in ("mode","cache_lost_at","segments","dirty_bytes")})' <"$WB_OUT/status-at-passthrough.json")"
log "status after:  $(status_excerpt m2)"
read -r mode lost <<<"$(wb_field m2 mode cache_lost_at)"
[[ "$mode" == passthrough ]] || fail "mode is $mode after both legs failed, not passthrough"
[[ "$lost" =~ ^[0-9]+$ ]] || fail "cache_lost_at is '$lost', not a segment id"
wb_metrics_check m2 passthrough
grep -q '^writeboost_cache_lost{device="m2"} 1$' "$WB_OUT/metrics-m2-passthrough.prom" ||
    fail "wbctl metrics does not say the cache of m2 is lost"
[[ "$(leg_field m2 0 health) $(leg_field m2 1 health)" == "failed failed" ]] || fail "both legs should be failed"
critical="$(grep -E "ERROR .*CRITICAL: every cache leg has failed" "$(daemon_log m2)" || true)"
[[ -n "$critical" ]] || fail "no error-level CRITICAL line in $(daemon_log m2)"
log "daemon log: $critical"
[[ "$critical" == *"up to id $lost "* ]] || fail "the CRITICAL line does not name cache_lost_at ($lost)"
python3 - "$WB_OUT/modes.txt" <<'PY' || fail "mode history"
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
runs = []
for r in rows:
    if runs and runs[-1][0] == r[1]:
        runs[-1][2] = r[0]
    else:
        runs.append([r[1], r[0], r[0]])
print("mode history: " + ", ".join(f"{m} {a}-{b}s" for m, a, b in runs))
modes = [m for m, _, _ in runs]
assert modes[0] == "mirrored" and modes[-1] == "passthrough", modes
assert "mirrored" not in modes[1:], f"back to mirrored after the loss: {modes}"
PY

# ---- the oracle on the backing device alone (after any writeback write in flight at the loss
# landed: a passthrough read waits for those)
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none
python3 "$MJ" check "$BACKING" --journal "$J" || fail "the backing device fails the cache-loss oracle"
region=$((48 << 20))
sum_dev="$(dev_sha256 "$dev" $region)"
sum_backing="$(dev_sha256 "$BACKING" $region)"
[[ "$sum_dev" == "$sum_backing" ]] || fail "in passthrough the device reads differently from the backing device"
log "the device and the backing device read the same (first $((region >> 20)) MiB, sha256 ${sum_dev:0:16}...)"
# The oracle's self-test on this run's journal (reordered, torn, misdirected images built from
# it must be rejected) runs on the host after the boot (vm_mirror.rs): it needs no device, and
# under TCG it took ~45 s of the suite.
cp "$J" "$WB_OUT/journal-1.txt"
log "journal for the host's self-test: journal-1.txt, seed $SEED"

# ---- replace both legs: mirrored again, and the cache works
"$WBCTL" replace m2 --old "$LEG0" --new "$SPARE0" || fail "wbctl replace leg 0 failed"
[[ "$(wb_field m2 mode)" == passthrough ]] || fail "one leg replaced, one still failed: mode $(wb_field m2 mode), expected passthrough"
"$WBCTL" replace m2 --old "$LEG1" --new "$SPARE1" || fail "wbctl replace leg 1 failed"
wait_mode m2 mirrored 30
read -r lost2 <<<"$(wb_field m2 cache_lost_at)"
[[ "$lost2" == None ]] || fail "cache_lost_at is still $lost2 after both legs were replaced"
log "status after both replacements: $(status_excerpt m2)"
[[ "$(leg_field m2 0 errors) $(leg_field m2 1 errors)" == "0 0" ]] || fail "the new legs show errors (the old devices'?)"
J2=/tmp/journal-2.txt
on_exit "cp $J2 $WB_OUT/ 2>/dev/null || true"
python3 "$MJ" write "$dev" --journal "$J2" --base $((64 << 20)) --blocks 4096 --seed "$((SEED + 1))" \
    --secs 3 | tail -1
(($(wb_field m2 dirty_bytes) > 0)) || fail "nothing dirty after writing in mirrored mode"
"$WBCTL" delete m2 --drain || fail "wbctl delete m2 --drain failed"
python3 "$MJ" check "$BACKING" --journal "$J2" --complete || fail "after delete --drain the backing device lacks writes"
[[ "$("$WBCTL" check --cache "$SPARE0" --cache "$SPARE1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clean"])')" == True ]] ||
    fail "wbctl check says the replaced cache set is not clean after delete --drain"
# A FLUSH in flight when the cache was lost fails (its writes are gone), and so does the first
# one after it: the kernel may log those, as a FLUSH or as the empty PREFLUSH write they came as
# (no data: phys_seg 0). Any other I/O error on the device is a failure.
if dmesg | grep -E "I/O error.*ublkb|error on dev ublkb" | grep -v -E "FLUSH|phys_seg 0 "; then
    fail "the kernel logged I/O errors (other than a FLUSH) on the writeboost device"
fi
log "kernel: $(dmesg | grep -c -E 'I/O error.*ublkb.*(FLUSH|phys_seg 0 )' || true) failed FLUSH(es) logged on the device"
log "mirror-both-fail: PASS"
