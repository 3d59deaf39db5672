#!/usr/bin/env bash
# Issue 6, one cache leg fails (CONTRACT §5): leg A of a mirrored cache is a dm linear target over a
# disk; while a fio verify job writes through the device, leg A's table is switched to the dm
# `error` target (every I/O to it fails with EIO from then on). The job must pass (no I/O error,
# verify ok); `wbctl status --json` must show leg A failed with errors and the mode go
# mirrored → degraded → passthrough (once writeback made the cache clean). `wbctl replace`
# puts a spare disk in leg A's place → mirrored; a second fio verify job passes; `wbctl delete
# --drain` leaves the backing device holding what the device held; `wbctl check` says clean.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 1G backing.img; truncate -s 512M c0.img c1.img spare.img
#   tests/vm/run.sh --disk backing.img:throttle --disk c0.img --disk c1.img --disk spare.img \
#       tests/vm/scripts/mirror-one-leg.sh [WRITE_MIB [FIO_RATE]]
#
# WRITE_MIB (default 64): what the first fio job writes; FIO_RATE (default 8m): its write rate
# cap, so its write phase lasts some seconds. Prints "mirror-one-leg: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/mirror-lib.sh"
need_vm
need_ublk
need_dm
[[ -z "${WB_WATCHDOG:-}" ]] || wb_watchdog "$WB_WATCHDOG"
WRITE_MIB="${1:-64}"
FIO_RATE="${2:-8m}"
BACKING="$(disk 0)" RAW0="$(disk 1)" CACHE1="$(disk 2)" SPARE="$(disk 3)"
log "kernel $(uname -r), $(nproc) CPUs; backing $BACKING (throttled), leg A over $RAW0, leg B $CACHE1, spare $SPARE"

LEG0="$(dm_linear wbleg0 "$RAW0")"
log "leg A: $LEG0 = $(dm_table wbleg0)"
# The event hook appends each event's WRITEBOOST_* facts, one line per event; the daemon's log
# is written as for the journal (JOURNAL_STREAM set: sd-daemon <N> priority prefixes).
HOOK="$WB_OUT/hook.sh" EVENTS="$WB_OUT/events.txt"
printf '#!/bin/sh\necho "$(env | grep "^WRITEBOOST_" | sort | tr "\\n" " ")" >>"%s"\n' "$EVENTS" >"$HOOK"
chmod 755 "$HOOK"
# Created from a configuration file, which SIGHUP re-reads (checked during the second fio job).
CONF="$WB_OUT/d1.toml"
printf 'backing = "%s"\ncaches = ["%s", "%s"]\nevent_hook = "%s"\n[policy]\nlow_watermark = "0.1"\n' \
    "$BACKING" "$LEG0" "$CACHE1" "$HOOK" >"$CONF"
dev="$(JOURNAL_STREAM=8:1 wb_create d1 --config "$CONF")"
log "wbctl create d1 -> $dev"
[[ "$(wb_field d1 mode)" == mirrored ]] || fail "mode is $(wb_field d1 mode), not mirrored"
wb_metrics_check d1 mirrored
mode_sampler d1 "$WB_OUT/modes.txt"

fio_job() { # NAME SIZE OFFSET RATE
    local f="$WB_OUT/$1.fio"
    cat >"$f" <<EOF
[global]
filename=\${DEV}
ioengine=libaio
direct=1
group_reporting=1

[$1]
rw=randwrite
bssplit=4k/40:16k/30:64k/30
iodepth=16
size=$2
offset=$3
randrepeat=0
fsync=64
verify=crc32c
do_verify=1
verify_fatal=1
EOF
    [[ -z "$4" ]] || echo "rate=$4" >>"$f"
    echo "$f"
}

# ---- fio verify job; leg A fails while it writes
job1="$(fio_job mirror-one-leg-1 "${WRITE_MIB}M" 0 "$FIO_RATE")"
(wb_fio d1 "$job1") &
fio_pid=$!
# The trigger is sampled from the block layer's own counter (/sys/block/ublkbN/stat, field 7:
# sectors written), not `wbctl status` + python: on a slow (TCG) CI VM one status sample took
# seconds and fio's whole write phase passed between two of them (CI: "after 64 MiB of 64 MiB").
quarter=$(((WRITE_MIB << 20) / 4))
stat_file="/sys/block/$(basename "$dev")/stat"
for ((i = 0; ; i++)); do
    read -r _ _ _ _ _ _ sectors _ <"$stat_file"
    written=$((sectors << 9))
    ((written >= quarter)) && break
    kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before it wrote a quarter of its data ($written bytes)"
    ((i < 4800)) || fail "fio wrote only $written bytes in 240 s"
    sleep 0.05
done
kill -0 "$fio_pid" 2>/dev/null || fail "fio is no longer running at the injection"
inj_written="$written"
dm_error wbleg0
t_inj=$EPOCHREALTIME
log "INJECTED: leg A ($LEG0) is now '$(dm_table wbleg0)' after $((written >> 20)) MiB of ${WRITE_MIB} MiB written"
# Degraded while fio writes (writeback cannot catch up with it): the metrics of that mode.
wb_metrics_check d1 degraded 30
wait "$fio_pid" || fail "the fio verify job failed after leg A failed (see above)"
read -r _ _ _ _ _ _ sectors _ <"$stat_file"
after=$((sectors << 9))
log "fio verify job passed: $(((after - inj_written) >> 20)) MiB written after the injection"
((after > inj_written)) || fail "fio wrote nothing after the injection: the failure did not hit a write phase"
grep -E "err= *0|READ:|WRITE:" "$WB_OUT/d1.mirror-one-leg-1.log" | sed 's/^ */  /' || true

wait_mode d1 passthrough 900
wb_metrics_check d1 passthrough
stop_mode_sampler
log "mode samples (secs mode legA-health legA-errors legB-health legB-errors dirty_bytes): $(wc -l <"$WB_OUT/modes.txt") in $WB_OUT/modes.txt"
python3 - "$WB_OUT/modes.txt" "$(awk -v a="$WB_LIB_T0" -v b="$t_inj" 'BEGIN{print b-a}')" "$(daemon_log d1)" <<'PY' || fail "the modes did not go mirrored -> degraded -> passthrough"
import re, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
t_inj = float(sys.argv[2])
runs = []  # [mode, first secs, last secs]
for r in rows:
    t, mode = float(r[0]), r[1]
    if runs and runs[-1][0] == mode:
        runs[-1][2] = t
    else:
        runs.append([mode, t, t])
print("mode history: " + ", ".join(f"{m} {a:.1f}-{b:.1f}s" for m, a, b in runs) + f" (injection at {t_inj:.1f}s)")
modes = [m for m, _, _ in runs]
order = ["mirrored", "degraded", "passthrough"]
assert modes[0] == "mirrored", f"did not start mirrored: {modes}"
assert modes[-1] == "passthrough", f"did not end in passthrough: {modes}"
assert all(m in order for m in modes) and modes == sorted(modes, key=order.index), f"unexpected mode sequence {modes}"
# The daemon's own log is the record of the transitions; the samples (a wbctl status each, seconds
# apart on a loaded host) may miss the degraded phase.
steps = [r"cache leg 0 \(.*\) failed", r"degraded: writeback has caught up", r"degraded and clean: passthrough"]
log = open(sys.argv[3]).read().splitlines()
at = 0
for i, step in enumerate(steps):
    at = next((n for n in range(at, len(log)) if re.search(step, log[n])), None)
    assert at is not None, f"daemon log: no line matching {step!r} after the previous step"
    print(f"daemon log: {log[at].strip()}")
deg = [r for r in rows if r[1] == "degraded"]
if deg:
    first_degraded = deg[0][0]
    assert float(first_degraded) >= t_inj - 0.5, "degraded before the injection"
    assert all(r[2] == "failed" and int(r[3]) > 0 and r[4] == "ok" for r in deg), "leg health while degraded"
    print(f"degraded sampled {len(deg)} times from {float(first_degraded) - t_inj:.1f}s after the injection; "
          f"dirty bytes while degraded: {deg[0][6]} -> {deg[-1][6]}")
else:
    print("degraded not sampled (status samples were too far apart); the daemon log shows it")
PY
# The hook heard the leg fail and each mode change, in order, with the documented facts; the
# failed leg reached the daemon's log at journal priority err (<3>).
log "event hook calls: $(wc -l <"$EVENTS")"
sed 's/^/  hook: /' "$EVENTS"
event_with() { # every WORD on one line of the events file
    local rest=("$@") f="$EVENTS" line
    while IFS= read -r line; do
        local w ok=1
        for w in "${rest[@]}"; do [[ " $line " == *" $w "* ]] || ok=0; done
        ((ok)) && return 0
    done <"$f"
    return 1
}
event_with WRITEBOOST_EVENT=leg_failed WRITEBOOST_LEG=0 "WRITEBOOST_LEG_PATH=$LEG0" \
    WRITEBOOST_SEVERITY=err WRITEBOOST_NAME=d1 "WRITEBOOST_DEVICE=$dev" ||
    fail "the event hook did not get leg A's failure (leg_failed, leg 0, $LEG0, severity err)"
event_with WRITEBOOST_EVENT=mode_changed WRITEBOOST_PREVIOUS_MODE=mirrored WRITEBOOST_MODE=degraded ||
    fail "the event hook did not get the change to degraded"
event_with WRITEBOOST_EVENT=mode_changed WRITEBOOST_MODE=passthrough WRITEBOOST_SEVERITY=warning ||
    fail "the event hook did not get the change to passthrough"
grep -E '^<3>[a-z_:]+: cache leg 0 \(.*\) failed' "$(daemon_log d1)" | head -1 | sed 's/^/  journal: /' | grep . ||
    fail "the failed leg's log line is not at journal priority err (<3>)"

status_excerpt() {
    wb_status "$1" | python3 -c '
import json, sys
s = json.load(sys.stdin)
keep = {k: s[k] for k in ("mode", "cache_lost_at", "dirty_bytes", "passthrough_writes", "failure")}
keep["legs"] = [{k: l[k] for k in ("path", "health", "errors", "read_errors", "write_errors", "repairs")} for l in s["legs"]]
keep["segments"] = s["segments"]
print(json.dumps(keep))'
}
log "status after: $(status_excerpt d1)"
[[ "$(leg_field d1 0 health)" == failed ]] || fail "leg A health is $(leg_field d1 0 health), not failed"
(($(leg_field d1 0 errors) > 0)) || fail "leg A shows no errors"
[[ "$(leg_field d1 1 health)" == ok && "$(leg_field d1 1 errors)" == 0 ]] || fail "leg B is not ok with 0 errors"
[[ "$(wb_field d1 dirty_bytes)" == 0 ]] || fail "passthrough with $(wb_field d1 dirty_bytes) dirty bytes"
grep -E "cache leg 0 .* failed|degraded|passthrough" "$(daemon_log d1)" | sed 's/^/  daemon: /' | head -10 || true

# ---- passthrough serves I/O: a short verify job straight to the backing device
job_pt="$(fio_job mirror-one-leg-pt 8M "$((WRITE_MIB + 64))M" "")"
wb_fio d1 "$job_pt"
(($(wb_field d1 passthrough_writes) > 0)) || fail "passthrough_writes is 0 after writing in passthrough"

# ---- the health check: a dead leg is a WARNING (exit 1) naming it
set +e
check="$("$WBCTL" status -x d1)"
code=$?
set -e
log "status -x with leg A dead: exit $code: $check"
((code == 1)) && [[ "$check" == "d1: WARNING - "*"$LEG0"* ]] || fail "status -x: exit $code, '$check'"

# ---- replace leg A by the spare: mirrored again
if "$WBCTL" replace d1 --old /dev/nonexistent --new "$SPARE" 2>/dev/null; then fail "replace of a non-leg succeeded"; fi
t0=$EPOCHREALTIME
"$WBCTL" replace d1 --old "$LEG0" --new "$SPARE" || fail "wbctl replace d1 --old $LEG0 --new $SPARE failed"
log "wbctl replace took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')s"
wait_mode d1 mirrored 30
[[ "$(leg_field d1 0 path)" == "$SPARE" && "$(leg_field d1 0 health)" == ok ]] || fail "leg 0 is $(leg_field d1 0 path) $(leg_field d1 0 health)"
grep -q "$SPARE" "$WRITEBOOST_RUN_DIR/d1.json" || fail "the state file does not name the new leg"
log "status after replace: $(status_excerpt d1)"
set +e
check="$("$WBCTL" status -x d1)"
code=$?
set -e
log "status -x after replace: exit $code: $check"
# Writers that waited for cache space while leg A was failing, less than a minute ago, make a
# WARNING of their own (exit 1, "writers waited N ms ..."): about the stall, not the legs.
[[ ($code == 0 && "$check" == "d1: OK - mirrored"*) ||
    ($code == 1 && "$check" == "d1: WARNING - writers waited "*) ]] ||
    fail "status -x after replace: exit $code, '$check'"

read -r pt0 w0 <<<"$(wb_field d1 passthrough_writes write_bytes)"
JOB2_MIB=32
job2="$(fio_job mirror-one-leg-2 "${JOB2_MIB}M" "$((WRITE_MIB + 128))M" "4m")"
(wb_fio d1 "$job2") &
fio2_pid=$!
# ---- SIGHUP (systemctl reload) while fio writes: the changed knob applies, nothing stops
sed -i -e 's/^low_watermark = .*/low_watermark = "0.25"/' -e "s#\"$LEG0\"#\"$SPARE\"#" "$CONF"
kill -HUP "$(wb_field d1 pid)"
for ((i = 0; ; i++)); do
    [[ "$(wb_field d1 policy.low_watermark)" == 0.25 ]] && break
    ((i < 100)) || fail "SIGHUP: low_watermark is $(wb_field d1 policy.low_watermark), not 0.25"
    sleep 0.1
done
log "SIGHUP applied low_watermark=0.25 with fio running; mode $(wb_field d1 mode)"
wait "$fio2_pid" || fail "the fio job running across SIGHUP failed"
# ---- wbctl set is kept in the configuration file (a restart keeps it), its comments too
sed -i 's/^low_watermark = .*/& # tuned/' "$CONF"
"$WBCTL" set d1 low_watermark=0.3 || fail "wbctl set d1 low_watermark=0.3 failed"
grep -qx 'low_watermark = 0.3 # tuned' "$CONF" || fail "wbctl set did not keep low_watermark=0.3 in $CONF: $(cat "$CONF")"
[[ "$(wb_field d1 policy.low_watermark)" == 0.3 ]] || fail "wbctl set: low_watermark is $(wb_field d1 policy.low_watermark)"
read -r mode pt1 w1 <<<"$(wb_field d1 mode passthrough_writes write_bytes)"
[[ "$mode" == mirrored ]] || fail "mode $mode after the second fio job"
[[ "$(leg_field d1 0 errors)" == 0 && "$(leg_field d1 1 errors)" == 0 ]] || fail "errors on the legs after replace"
[[ "$pt1" == "$pt0" ]] || fail "passthrough_writes grew $pt0 -> $pt1 in mirrored mode"
(((w1 - w0) >> 20 == JOB2_MIB)) || fail "write_bytes grew by $((w1 - w0)), expected $JOB2_MIB MiB"
log "status after the second fio job: $(status_excerpt d1)"

# ---- delete --drain: the backing device alone holds what the device held
region=$(((WRITE_MIB + 128 + JOB2_MIB) << 20))
sum_dev="$(dev_sha256 "$dev" $region)"
"$WBCTL" delete d1 --drain || fail "wbctl delete d1 --drain failed"
sum_backing="$(dev_sha256 "$BACKING" $region)"
log "sha256 of the first $((region >> 20)) MiB: device $sum_dev, backing alone $sum_backing"
[[ "$sum_dev" == "$sum_backing" ]] || fail "the backing device does not hold what the device held"
[[ "$("$WBCTL" check --cache "$SPARE" --cache "$CACHE1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clean"])')" == True ]] ||
    fail "wbctl check says the replaced cache set is not clean after delete --drain"
if dmesg | grep -E "I/O error.*ublkb|error on dev ublkb"; then
    fail "the kernel logged I/O errors on the writeboost device"
fi
log "mirror-one-leg: PASS"
