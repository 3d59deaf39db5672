# tests/vm/scripts/mirror-lib.sh — helpers for the mirrored-cache failure tests in the VM
# (mirror-*.sh, issue 6). Source it after guest-lib.sh and ublk-lib.sh:
#
#   source "$(dirname "$0")/../guest-lib.sh"
#   source "$(dirname "$0")/ublk-lib.sh"
#   source "$(dirname "$0")/mirror-lib.sh"
#   leg0=$(dm_linear wbleg0 "$(disk 1)")       # /dev/mapper/wbleg0, removed at exit
#   dm_error wbleg0                            # from now on every I/O to it fails (EIO)
#
# Functions:
#   need_dm                  load dm-mod; fail without dmsetup
#   dm_linear NAME DEV       a dm linear target NAME over all of DEV; prints /dev/mapper/NAME;
#                            removed at exit (after the writeboost devices, registered later)
#   dm_error NAME...         switch every NAME to the `error` target at once (suspend all, load,
#                            resume all): every later I/O fails with EIO
#   dm_table NAME            its current table (one line)
#   leg_field NAME I FIELD   field of leg I in `wbctl status NAME --json` (health, errors, ...)
#   wait_mode NAME MODE SECS poll `wbctl status` until mode is MODE; fail after SECS
#   mode_sampler NAME FILE   sample "secs mode leg0-health leg0-errors leg1-health leg1-errors
#                            dirty_bytes" every 0.2 s into FILE until stop_mode_sampler
#   stop_mode_sampler
#   daemon_log NAME          the daemon's log file

# shellcheck disable=SC2034 # used by the scripts that source this file
MJ="$(dirname "${BASH_SOURCE[0]}")/mirror-journal.py"

need_dm() {
    command -v dmsetup >/dev/null || fail "dmsetup is missing (tests/vm/setup.sh installs it)"
    [[ -e /dev/mapper/control ]] || need_module dm-mod
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -e /dev/mapper/control ]] && break
        sleep 0.1
    done
    [[ -e /dev/mapper/control ]] || fail "/dev/mapper/control did not appear after loading dm-mod"
}

dm_linear() {
    local name="$1" dev="$2" sectors
    sectors=$(blockdev --getsz "$dev") || fail "blockdev --getsz $dev"
    dmsetup create "$name" --noudevsync --table "0 $sectors linear $dev 0" ||
        fail "dmsetup create $name (linear over $dev) failed"
    on_exit "dmsetup remove --noudevsync --retry $name >/dev/null 2>&1 || log 'cleanup: dmsetup remove $name failed'"
    [[ -b /dev/mapper/$name ]] || dmsetup mknodes "$name"
    wait_for_blockdev "/dev/mapper/$name" 10
    echo "/dev/mapper/$name"
}

dm_error() {
    local name sectors
    for name in "$@"; do
        dmsetup suspend --noudevsync "$name" || fail "dmsetup suspend $name"
    done
    for name in "$@"; do
        sectors=$(dmsetup table "$name" | awk '{print $2}')
        dmsetup load "$name" --table "0 $sectors error" || fail "dmsetup load $name (error)"
    done
    for name in "$@"; do
        dmsetup resume --noudevsync "$name" || fail "dmsetup resume $name"
    done
}

dm_table() {
    dmsetup table "$1"
}

leg_field() {
    wb_status "$1" | python3 -c '
import json, sys
print(json.load(sys.stdin)["legs"][int(sys.argv[1])][sys.argv[2]])' "$2" "$3"
}

wait_mode() {
    local name="$1" want="$2" secs="$3" t0=$EPOCHREALTIME mode
    while :; do
        mode="$(wb_field "$name" mode)"
        [[ "$mode" == "$want" ]] && break
        if awk -v a="$t0" -v b="$EPOCHREALTIME" -v s="$secs" 'BEGIN{exit !(b-a > s)}'; then
            "$WBCTL" status "$name" >&2 || true
            fail "$name: mode still '$mode' after ${secs}s (waiting for '$want')"
        fi
        sleep 0.2
    done
    log "$name: mode $want after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')s"
}

MODE_SAMPLER_PID=""
mode_sampler() {
    local name="$1" file="$2"
    : >"$file"
    (
        t0=$WB_LIB_T0 # times as in log lines
        while :; do
            "$WBCTL" status "$name" --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)["devices"][0]
legs = " ".join("%s %s" % (l["health"], l["errors"]) for l in s["legs"])
print("%.1f %s %s %s" % (float(sys.argv[1]), s["mode"], legs, s["dirty_bytes"]))' \
                "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" >>"$file" 2>/dev/null || true
            sleep 0.2
        done
    ) &
    MODE_SAMPLER_PID=$!
    on_exit stop_mode_sampler
}

stop_mode_sampler() {
    [[ -n "$MODE_SAMPLER_PID" ]] || return 0
    kill "$MODE_SAMPLER_PID" 2>/dev/null || true
    wait "$MODE_SAMPLER_PID" 2>/dev/null || true
    MODE_SAMPLER_PID=""
}

daemon_log() {
    echo "$WRITEBOOST_RUN_DIR/$1.log"
}
