# tests/vm/guest-lib.sh — helpers for scripts that run inside the VM
# (tests/vm/run.sh SCRIPT). Source it first thing:
#
#   #!/usr/bin/env bash
#   set -euo pipefail
#   source "$(dirname "$0")/../guest-lib.sh"     # from tests/vm/scripts/
#   need_ublk
#   start_wb_null --size 4G --queues 1 --depth 128
#   iops=$(fio_iops write --filename="$WB_NULL_DEV" --rw=randwrite --bs=4k ...)
#
# Environment set by run.sh: WB_IN_VM=1 WB_REPO WB_OUT WB_KDIR WB_KVER WB_DISKS.
#
# Functions:
#   log MSG...           "[  12.3s] MSG" on stdout (seconds since the script began)
#   fail MSG...          log "FAIL: MSG" to stderr and exit 1 (cleanups still run)
#   on_exit CMD...       register a cleanup; all run at exit, newest first
#   need_vm              fail unless running inside the run.sh VM
#   need_module NAME...  modprobe NAME from the VM kernel's module tree
#   need_ublk            ublk_drv loaded and /dev/ublk-control present
#   wb_bin NAME          path of $WB_BIN_DIR/NAME (default $WB_REPO/build/release;
#                        fail if not built)
#   disk N               N-th --disk of run.sh: disk 0 -> /dev/vda (an ":nvme" one is
#                        /dev/nvmeKn1: `need_module nvme` first)
#   wait_for_blockdev DEV [SECS]   wait until DEV is a block device
#   start_wb_null [ARGS] start the null ublk target in the background; sets
#                        WB_NULL_DEV (/dev/ublkbN) and WB_NULL_PID; stopped at exit
#   stop_wb_null         stop it now (SIGTERM, wait, device deleted)
#   fio_iops RW FIO-ARGS...   run fio with JSON output (kept in $WB_OUT as
#                        fio-<job name>-<time>.json), print
#                        the IOPS of direction RW (read|write|trim) as an integer
#   fio_json_field FILE RW FIELD   a field (iops, bw_bytes, ...) of a fio JSON

WB_LIB_T0=$EPOCHREALTIME

# The fault record's host copy (default /var/lib/writeboost) must be writable, and the host
# root is read-only in the guest: keep it on the guest's tmpfs (it outlives daemon restarts,
# which is what the VM tests cross with faults; a test of reboots would move it to a disk).
export WRITEBOOST_FAULT_DIR="${WRITEBOOST_FAULT_DIR:-/var/tmp/writeboost-faults}"

log() {
    printf '[%7.1fs] %s\n' "$(awk -v a="$WB_LIB_T0" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" "$*"
}

fail() {
    log "FAIL: $*" >&2
    exit 1
}

WB_LIB_CLEANUPS=()
on_exit() {
    WB_LIB_CLEANUPS+=("$*")
}
_wb_lib_run_cleanups() {
    local rc=$? i
    for ((i = ${#WB_LIB_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${WB_LIB_CLEANUPS[$i]}" || log "cleanup failed: ${WB_LIB_CLEANUPS[$i]}"
    done
    WB_LIB_CLEANUPS=()
    return $rc
}
trap _wb_lib_run_cleanups EXIT

need_vm() {
    [[ "${WB_IN_VM:-}" == 1 ]] || fail "this script runs inside the VM: tests/vm/run.sh $0"
}

need_module() {
    local m
    for m in "$@"; do
        modprobe -d "${WB_KDIR:?}" "$m" || fail "modprobe $m failed (kernel $WB_KVER, tree $WB_KDIR)"
    done
}

need_ublk() {
    if [[ ! -e /dev/ublk-control ]]; then
        if [[ -n "${WB_KDIR:-}" ]]; then
            modprobe -d "$WB_KDIR" ublk_drv || fail "modprobe ublk_drv failed"
        else
            modprobe ublk_drv || fail "modprobe ublk_drv failed (kernel $(uname -r) >= 6.0 with CONFIG_BLK_DEV_UBLK needed)"
        fi
    fi
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -c /dev/ublk-control ]] && break
        sleep 0.1
    done
    [[ -c /dev/ublk-control ]] || fail "/dev/ublk-control did not appear after loading ublk_drv"
    mkdir -p /run/ublksrvd
}

wb_bin() {
    local p="${WB_BIN_DIR:-${WB_REPO:-$PWD}/build/release}/$1"
    [[ -x "$p" ]] || fail "$p is missing: run 'cargo build --release --workspace' on the host before booting the VM"
    echo "$p"
}

disk() {
    # WB_DISKS lists them in --disk order (virtio and NVMe mixed).
    local disks
    read -r -a disks <<<"${WB_DISKS:-}"
    local d="${disks[$1]:-}"
    [[ -n "$d" && -b "$d" ]] || fail "disk $1 (${d:-none}) is missing: pass it with run.sh --disk FILE"
    echo "$d"
}

wait_for_blockdev() {
    local dev="$1" secs="${2:-10}" i
    for ((i = 0; i < secs * 10; i++)); do
        [[ -b "$dev" ]] && return 0
        sleep 0.1
    done
    fail "$dev did not appear within ${secs}s"
}

WB_NULL_PID=""
WB_NULL_DEV=""
start_wb_null() {
    local bin out i
    bin="$(wb_bin wb-null)"
    out="$(mktemp /tmp/wb-null.XXXXXX)"
    "$bin" "$@" --dev-file "$out.dev" >"$out" 2>"$out.err" &
    WB_NULL_PID=$!
    on_exit stop_wb_null
    for ((i = 0; i < 300; i++)); do
        [[ -s "$out.dev" ]] && break
        if ! kill -0 "$WB_NULL_PID" 2>/dev/null; then
            cat "$out.err" >&2
            WB_NULL_PID=""
            fail "wb-null exited before its device came up"
        fi
        sleep 0.1
    done
    [[ -s "$out.dev" ]] || {
        cat "$out.err" >&2
        fail "wb-null did not report a device within 30s"
    }
    WB_NULL_DEV="$(head -1 "$out.dev")"
    wait_for_blockdev "$WB_NULL_DEV" 10
    log "wb-null up: $WB_NULL_DEV (pid $WB_NULL_PID): $(cat "$out.err")"
}

stop_wb_null() {
    [[ -n "$WB_NULL_PID" ]] || return 0
    kill -TERM "$WB_NULL_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$WB_NULL_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$WB_NULL_PID" 2>/dev/null; then
        log "wb-null (pid $WB_NULL_PID) ignored SIGTERM for 10s; killing it"
        kill -KILL "$WB_NULL_PID" 2>/dev/null || true
    fi
    wait "$WB_NULL_PID" 2>/dev/null || true
    log "wb-null stopped ($WB_NULL_DEV)"
    WB_NULL_PID=""
}

fio_json_field() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
path, rw, field = sys.argv[1:4]
with open(path) as f:
    text = f.read()
# fio may print notes before the JSON object
data = json.loads(text[text.index("{"):])
total = sum(float(job[rw][field]) for job in data["jobs"])
print(int(round(total)))
PY
}

fio_iops() {
    local rw="$1" name=fio arg
    shift
    for arg in "$@"; do
        if [[ "$arg" == --name=* ]]; then name="${arg#--name=}"; fi
    done
    # Named by job and time: callers run this in $(...), a subshell, where a counter would not
    # survive from one call to the next.
    local out="${WB_OUT:-/tmp}/fio-$name-${EPOCHREALTIME/./}.json"
    fio --output-format=json --output="$out" --eta=never "$@" >&2 || {
        cat "$out" >&2 2>/dev/null
        fail "fio $* failed"
    }
    fio_json_field "$out" "$rw" iops
}
