# tests/vm/scripts/ublk-lib.sh — helpers for the writeboost device tests in the VM
# (ublk-*.sh). Source it after tests/vm/guest-lib.sh:
#
#   source "$(dirname "$0")/../guest-lib.sh"
#   source "$(dirname "$0")/ublk-lib.sh"
#   need_ublk
#   dev=$(wb_create d0 --backing "$(disk 0)" --cache "$(disk 1)" --cache "$(disk 2)")
#
# Functions:
#   wb_create NAME ARGS...   `wbctl create NAME ARGS...`; prints /dev/ublkbN; the device is
#                            deleted at exit if still there
#   wb_status NAME           NAME's object of `wbctl status NAME --json` (the document is
#                            {"output_version": 1, "devices": [{...}]}), pretty-printed
#   wb_field NAME PATH...    fields of that object (e.g. reads.hits segments.current_id),
#                            space-separated, from one status query (booleans as true/false)
#   wb_dev NAME              the device of NAME (from its state file)
#   wb_pid NAME              the daemon's pid (from its state file)
#   wb_fio NAME JOB [ARGS]   DEV=<device of NAME> fio JOB ARGS (output kept in $WB_OUT/NAME.fio.log);
#                            fails on a non-zero exit or any "err=" other than 0
#   wb_metrics_check NAME MODE [SECS]  `wbctl metrics NAME` says MODE (within SECS) and passes
#                              `promtool check metrics`
#   wb_fsync_fio NAME DEV JOBS SECS  fio 4 KiB random writes with an fsync after each, JOBS writers
#                            at QD1 for SECS on DEV: prints "IOPS WRITES" (JSON in $WB_OUT)
#   dev_sha256 DEV BYTES     SHA-256 of the first BYTES of DEV (direct I/O)
#   wb_no_kernel_io_errors   fail if the kernel logged an I/O error on a /dev/ublkb* device
#   wb_diagnose              dump what every process waits on and the daemons' logs (called
#                            when a step fails; also by the watchdog)
#   wb_watchdog SECS         run wb_diagnose if the script is still running after SECS
#
# At exit the daemons' logs are copied to $WB_OUT.

WBCTL="$(wb_bin wbctl)"
export WRITEBOOST_RUN_DIR=/run/writeboost

wb_create() {
    local name="$1" dev
    shift
    dev="$("$WBCTL" create "$name" "$@")" || fail "wbctl create $name $* failed"
    [[ "$dev" == /dev/ublkb* ]] || fail "wbctl create printed '$dev', not /dev/ublkbN"
    wait_for_blockdev "$dev" 10
    on_exit "_wb_cleanup $name"
    echo "$dev"
}

_wb_cleanup() {
    local name="$1"
    if "$WBCTL" status "$name" --json >/dev/null 2>&1; then
        "$WBCTL" delete "$name" --force >/dev/null 2>&1 || log "cleanup: delete $name failed"
    elif [[ -e "$WRITEBOOST_RUN_DIR/$name.json" ]]; then
        "$WBCTL" delete "$name" --force >/dev/null 2>&1 || true
    fi
}

wb_status() {
    local out
    out="$("$WBCTL" status "$1" --json)" || fail "wbctl status $1 --json failed"
    python3 -c '
import json, sys
doc = json.load(sys.stdin)
assert doc["output_version"] == 1, doc["output_version"]
print(json.dumps(doc["devices"][0], indent=2))' <<<"$out" || fail "wbctl status $1 --json: not a status document: $out"
}

wb_field() {
    local name="$1" out
    shift
    out="$("$WBCTL" status "$name" --json)" || fail "wbctl status $name --json failed"
    # One interpreter start per call: under emulation each costs about a second.
    python3 -c '
import json, sys
doc = json.load(sys.stdin)
assert doc["output_version"] == 1, doc["output_version"]
status = doc["devices"][0]
out = []
for path in sys.argv[1:]:
    v = status
    for part in path.split("."):
        v = v[part]
    out.append(json.dumps(v) if isinstance(v, bool) else str(v))
print(" ".join(out))' "$@" <<<"$out" || fail "wbctl status $name --json: no $* in: $out"
}

wb_dev() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["device"])' \
        "$WRITEBOOST_RUN_DIR/$1.json"
}

wb_pid() {
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' \
        "$WRITEBOOST_RUN_DIR/$1.json"
}

wb_fio() {
    local name="$1" job="$2"
    shift 2
    local dev out
    dev="$(wb_dev "$name")"
    out="${WB_OUT:-/tmp}/$name.$(basename "$job" .fio).log"
    log "fio $(basename "$job") on $dev $*"
    if ! DEV="$dev" fio --eta=never "$job" "$@" >"$out" 2>&1; then
        tail -30 "$out" >&2
        fail "fio $(basename "$job") on $dev failed (log $out)"
    fi
    if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error" "$out" >&2; then
        fail "fio $(basename "$job") on $dev reported errors (log $out)"
    fi
    grep -E "^ +(write|read):" "$out" | sed 's/^ */  /' || true
}

wb_metrics_check() {
    local name="$1" mode="$2" secs="${3:-0}" out="$WB_OUT/metrics-$1-$2.prom" i
    # With SECS, a passing mode (degraded) is waited for: each try is one snapshot, so what
    # promtool checks is the metrics of that mode, whatever the device did in between.
    for ((i = 0; ; i++)); do
        "$WBCTL" metrics "$name" >"$out" || fail "wbctl metrics $name failed"
        grep -q "^writeboost_mode{device=\"$name\",mode=\"$mode\"} 1\$" "$out" && break
        ((i < secs * 4)) ||
            fail "wbctl metrics $name does not say mode $mode: $(grep '^writeboost_mode{' "$out" | grep ' 1$')"
        sleep 0.25
    done
    if ! promtool check metrics <"$out" >"$out.check" 2>&1; then
        cat "$out.check" >&2
        fail "promtool check metrics rejects wbctl metrics $name in mode $mode ($out)"
    fi
    log "promtool check metrics: wbctl metrics $name in mode $mode passes ($(grep -c '^writeboost_' "$out") samples)"
}

wb_fsync_fio() {
    local out="$WB_OUT/sync-$1.json"
    fio --name="$1" --filename="$2" --numjobs="$3" --ioengine=psync --rw=randwrite --bs=4k \
        --fsync=1 --time_based --runtime="$4" --size=256M --offset=1536M --randrepeat=0 \
        --norandommap --output-format=json --output="$out" --eta=never >&2 ||
        fail "fio $1 on $2 failed: $(cat "$out" 2>/dev/null)"
    echo "$(fio_json_field "$out" write iops) $(fio_json_field "$out" write total_ios)"
}

# wb_fsync_fio_both NAME DISK0 DISK1 RUNTIME: wb_fsync_fio's job, one writer on each of two
# disks at once (what a mirrored set's two legs face); prints the IOPS of one disk (the two
# writers' mean).
wb_fsync_fio_both() {
    local out="$WB_OUT/sync-both-$1.json"
    fio --ioengine=psync --rw=randwrite --bs=4k --fsync=1 --time_based --runtime="$4" \
        --size=256M --offset=1536M --randrepeat=0 --norandommap --output-format=json \
        --output="$out" --eta=never --name=leg0 --filename="$2" --name=leg1 --filename="$3" >&2 ||
        fail "fio $1 on $2 and $3 at once failed: $(cat "$out" 2>/dev/null)"
    echo $(($(fio_json_field "$out" write iops) / 2))
}

dev_sha256() {
    dd if="$1" bs=1M count=$(($2 >> 20)) iflag=direct status=none | sha256sum | cut -d' ' -f1
}

wb_diagnose() {
    {
        echo "==== wb_diagnose: processes (wchan)"
        ps -eLo pid,tid,stat,wchan:32,comm,args 2>/dev/null | grep -vE ' \[.*\]$' | head -200
        local pid t
        for pid in $(pgrep -x wbctl) $(pgrep -x fio); do
            for t in /proc/"$pid"/task/*; do
                echo "==== $pid/$(basename "$t") $(cat "$t/comm" 2>/dev/null)"
                cat "$t/stack" 2>/dev/null | head -20
            done
        done
        for f in "$WRITEBOOST_RUN_DIR"/*.log; do
            [[ -e "$f" ]] || continue
            echo "==== $f (last 60 lines)"
            tail -60 "$f"
        done
    } >&2
}

wb_watchdog() {
    local secs="$1"
    (
        sleep "$secs"
        log "WATCHDOG: still running after ${secs}s"
        wb_diagnose
    ) &
    local pid=$!
    on_exit "kill $pid 2>/dev/null || true"
}

_wb_save_logs() {
    [[ -n "${WB_OUT:-}" ]] || return 0
    cp "$WRITEBOOST_RUN_DIR"/*.log "$WB_OUT"/ 2>/dev/null || true
}
on_exit _wb_save_logs

wb_no_kernel_io_errors() {
    if dmesg | grep -E "I/O error.*ublkb|error on dev ublkb"; then
        fail "the kernel logged I/O errors on a writeboost device (see above)"
    fi
}
