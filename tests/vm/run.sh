#!/usr/bin/env bash
# tests/vm/run.sh — run one script inside a QEMU VM that boots Debian's 6.12
# kernel (which has ublk_drv), with the host's root shared read-only.
#
# Usage:
#   tests/vm/run.sh [options] SCRIPT [ARGS...]
#
# Options:
#   --disk FILE[:throttle|:nvme[,PROP=V...]]
#                           attach an existing image file as a virtio disk
#                           (repeatable; /dev/vda, /dev/vdb, ... in order;
#                           cache=none,aio=threads). ":throttle" makes it a
#                           slow "HDD": iops-total=300, bps-total=60000000
#                           (override with WB_VM_THROTTLE_IOPS/_BPS).
#                           ":nvme" attaches it instead as the namespace of
#                           QEMU's emulated NVMe controller (-device nvme,
#                           serial wbnvmeK for the K-th such disk, K from 0),
#                           which serves a real SMART / Health log page; the
#                           guest sees /dev/nvmeKn1 once the script ran
#                           `need_module nvme`. PROP=V are more -device nvme
#                           properties, e.g. ":nvme,smart_critical_warning=4".
#   --timeout SECS          kill the VM after SECS (default $WB_VM_TIMEOUT or 900)
#   --mem MIB               guest memory (default $WB_VM_MEM or 2048)
#   --smp N                 vCPUs (default $WB_VM_SMP or 2)
#   -h, --help              this text
#
# SCRIPT is a path on the host; inside the VM it runs as root with bash, in a
# chroot of the host's root filesystem (read-only, over 9p), cwd = repo root,
# stdin = /dev/null, with ARGS. Writable inside the VM: /tmp, /run, /var/tmp,
# /dev/shm (tmpfs, in guest RAM) and $WB_OUT (a fresh folder on the host:
# $REPO/.vm-cache/runs/<id>, kept afterwards with console.log).
# ublk_drv and virtio_blk are already loaded; /run/ublksrvd exists.
# The guest script sees: WB_IN_VM=1 WB_REPO WB_OUT WB_KDIR WB_KVER
# WB_DISKS ("/dev/vda /dev/nvme0n1 /dev/vdb ...", in --disk order) and every WB_*/RUST_LOG/RUST_BACKTRACE
# variable of the caller. Source tests/vm/guest-lib.sh for helpers.
# Build what the script needs (cargo build --release ...) BEFORE calling this:
# the guest cannot write the host's tree.
#
# Output: the guest console (the script's stdout+stderr and kernel warnings),
# CR-stripped, streamed to stdout; harness messages ("run.sh: ...") go to
# stderr.
#
# Exit status: the script's own exit status, or
#   250  harness error (bad arguments, setup failed, QEMU could not start)
#   251  the guest never reported a status (kernel panic, crash, init failed)
#   252  timed out: the VM was killed after --timeout seconds
#
# Only one VM runs at a time on the machine (each uses both cores): run.sh
# waits on a lock in the cache folder (WB_VM_NO_LOCK=1 skips it).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/tests/vm"
CACHE="${WB_VM_CACHE:-$REPO/.vm-cache}"
RC_HARNESS=250
RC_NOSTATUS=251
RC_TIMEOUT=252

say() { echo "run.sh: $*" >&2; }
harness_fail() {
    echo "run.sh: ERROR: $*" >&2
    exit $RC_HARNESS
}
usage() {
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

TIMEOUT="${WB_VM_TIMEOUT:-900}"
MEM="${WB_VM_MEM:-2048}"
SMP="${WB_VM_SMP:-2}"
THR_IOPS="${WB_VM_THROTTLE_IOPS:-300}"
THR_BPS="${WB_VM_THROTTLE_BPS:-60000000}"
DISKS=()
while (($#)); do
    case "$1" in
    --disk)
        [[ $# -ge 2 ]] || harness_fail "--disk needs FILE[:throttle]"
        DISKS+=("$2")
        shift 2
        ;;
    --disk=*)
        DISKS+=("${1#--disk=}")
        shift
        ;;
    --timeout)
        [[ $# -ge 2 ]] || harness_fail "--timeout needs SECS"
        TIMEOUT="$2"
        shift 2
        ;;
    --mem)
        [[ $# -ge 2 ]] || harness_fail "--mem needs MIB"
        MEM="$2"
        shift 2
        ;;
    --smp)
        [[ $# -ge 2 ]] || harness_fail "--smp needs N"
        SMP="$2"
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        break
        ;;
    -*) harness_fail "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
done
[[ $# -ge 1 ]] || harness_fail "no SCRIPT given (see --help)"
[[ "$TIMEOUT" =~ ^[0-9]+$ && "$TIMEOUT" -gt 0 ]] || harness_fail "bad --timeout '$TIMEOUT'"
SCRIPT="$(realpath -e -- "$1" 2>/dev/null)" || harness_fail "script '$1' not found"
shift
[[ -f "$SCRIPT" ]] || harness_fail "script '$SCRIPT' is not a file"
case "$SCRIPT" in
"$REPO"/*) ;; # the repo stays visible in the guest wherever it lives
/tmp/* | /proc/* | /sys/* | /dev/* | /run/* | /var/tmp/*)
    harness_fail "script '$SCRIPT' lives where the VM cannot see it (tmpfs inside the guest); put it under the repo"
    ;;
esac

[[ $(id -u) -eq 0 ]] || harness_fail "must run as root"
[[ "$CACHE" != *[[:space:]]* ]] || harness_fail "the repo/cache path '$CACHE' contains whitespace (it goes on the kernel command line)"
bash "$HERE/setup.sh" || harness_fail "tests/vm/setup.sh failed (see above)"
KVER="$(cat "$CACHE/kernel.version")"
KDIR="$CACHE/kernel"
KERNEL="$KDIR/boot/vmlinuz-$KVER"
INITRD="$CACHE/initrd.img"
[[ -f "$KERNEL" && -f "$INITRD" ]] || harness_fail "kernel or initrd missing in $CACHE after setup"

# ------------------------------------------------------------------ disks
DRIVE_ARGS=()
GUEST_DISKS=()
letters=(a b c d e f g h i j k l m n o p)
i=0    # virtio disks so far
nvme=0 # NVMe controllers so far
for spec in "${DISKS[@]}"; do
    file="$spec"
    throttle=0
    kind=virtio
    props=""
    case "$spec" in
    *:throttle)
        file="${spec%:throttle}"
        throttle=1
        ;;
    *:nvme | *:nvme,*)
        file="${spec%:nvme*}"
        kind=nvme
        props="${spec##*:nvme}"
        ;;
    esac
    [[ -f "$file" || -b "$file" ]] || harness_fail "disk image '$file' does not exist (create it first, e.g. truncate -s 1G $file)"
    file="$(realpath -e -- "$file")"
    case "$file" in
    /tmp/* | /dev/shm/*) say "warning: $file is on tmpfs on the host; cache=none (O_DIRECT) may fail" ;;
    esac
    if [[ $kind == nvme ]]; then
        # One controller per image, its namespace 1 the image; the guest enumerates the
        # controllers in PCI order, which is the order of the -device options.
        DRIVE_ARGS+=(-drive "file=${file//,/,,},if=none,id=nvd$nvme,format=raw,cache=none,aio=threads"
            -device "nvme,serial=wbnvme$nvme,drive=nvd$nvme$props")
        GUEST_DISKS+=("/dev/nvme${nvme}n1")
        say "disk /dev/nvme${nvme}n1 = $file (emulated NVMe, serial wbnvme$nvme${props:+, ${props#,}})"
        nvme=$((nvme + 1))
        continue
    fi
    ((i < ${#letters[@]})) || harness_fail "too many disks"
    opt="file=${file//,/,,},if=virtio,format=raw,cache=none,aio=threads"
    if ((throttle)); then
        opt+=",throttling.iops-total=$THR_IOPS,throttling.bps-total=$THR_BPS"
    fi
    DRIVE_ARGS+=(-drive "$opt")
    GUEST_DISKS+=("/dev/vd${letters[$i]}")
    say "disk /dev/vd${letters[$i]} = $file$( ((throttle)) && echo " (throttled: $THR_IOPS IOPS, $THR_BPS B/s)")"
    i=$((i + 1))
done

# ------------------------------------------------------------------ run dir
mkdir -p "$CACHE/runs"
# keep the newest 30 run folders
ls -1dt "$CACHE"/runs/*/ 2>/dev/null | tail -n +30 | xargs -r rm -rf --
RUNDIR="$CACHE/runs/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUNDIR" || harness_fail "cannot create $RUNDIR"

{
    echo "# generated by tests/vm/run.sh"
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "export HOME=/tmp TERM=dumb LANG=C.UTF-8"
    while IFS='=' read -r name _; do
        case "$name" in
        WB_* | RUST_LOG | RUST_BACKTRACE) printf 'export %s=%q\n' "$name" "${!name}" ;;
        esac
    done < <(env)
    printf 'export WB_IN_VM=1 WB_REPO=%q WB_OUT=%q WB_KDIR=%q WB_KVER=%q WB_DISKS=%q\n' \
        "$REPO" "$RUNDIR" "$KDIR" "$KVER" "${GUEST_DISKS[*]}"
    printf 'cd %q || exit 99\n' "$REPO"
    printf 'exec bash %q' "$SCRIPT"
    for a in "$@"; do printf ' %q' "$a"; done
    echo
} >"$RUNDIR/cmd.sh"

# ------------------------------------------------------------------ lock
if [[ -z "${WB_VM_NO_LOCK:-}" ]]; then
    exec 9>"$CACHE/vm.lock"
    if ! flock -n 9; then
        say "another VM is running; waiting for it (lock $CACHE/vm.lock)"
        flock 9
    fi
fi

# ------------------------------------------------------------------ boot
say "kernel $KVER, ${SMP} vCPU, ${MEM} MiB, timeout ${TIMEOUT}s, script ${SCRIPT#"$REPO"/} $*"
say "run folder $RUNDIR"
start=$(date +%s)
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" \
    -nographic -no-reboot -nic none \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 wbrun=$RUNDIR wbkdir=$KDIR wbrepo=$REPO" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$RUNDIR,mount_tag=results,security_model=none,multidevs=remap" \
    "${DRIVE_ARGS[@]}" \
    </dev/null 2>&1 | sed -u -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' -e 's/\r//g' | tee "$RUNDIR/console.log"
qrc=${PIPESTATUS[0]}
elapsed=$(($(date +%s) - start))

if [[ -s "$RUNDIR/status" ]]; then
    rc="$(tr -dc '0-9' <"$RUNDIR/status")"
    say "guest script exited with status $rc after ${elapsed}s (console log $RUNDIR/console.log)"
    exit "${rc:-$RC_NOSTATUS}"
fi
if [[ $qrc -eq 124 || $qrc -eq 137 ]]; then
    say "ERROR: TIMEOUT: the VM was killed after ${TIMEOUT}s without reporting a status (console log $RUNDIR/console.log)"
    exit $RC_TIMEOUT
fi
if [[ ! -e "$RUNDIR/booted" && $qrc -ne 0 ]]; then
    say "ERROR: QEMU failed (exit $qrc after ${elapsed}s) before the guest booted — see the messages above"
    exit $RC_HARNESS
elif [[ ! -e "$RUNDIR/booted" ]]; then
    say "ERROR: the guest never reached the test script (QEMU exit $qrc after ${elapsed}s; init/9p/kernel problem?) — console log $RUNDIR/console.log"
else
    say "ERROR: the guest never reported a status: crashed, panicked or powered off mid-script (QEMU exit $qrc after ${elapsed}s) — console log $RUNDIR/console.log"
fi
exit $RC_NOSTATUS
