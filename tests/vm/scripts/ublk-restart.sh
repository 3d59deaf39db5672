#!/usr/bin/env bash
# Stop, start and upgrade under a mounted filesystem (CONTRACT §6, issue 12): xfs on the device,
# fio verify writing a file on it (fsyncs included) while
#   1. the daemon is stopped (SIGTERM, what `systemctl stop` sends): the device is in use, so the
#      daemon seals and flushes the log and leaves the device to the kernel, which holds fio's
#      I/O; `wbctl create` with the unit's arguments takes it over (what `systemctl start` runs);
#   2. the binary is upgraded: a new wbctl is installed by rename over the old one while the old
#      daemon runs from it, SIGTERM, and `wbctl recover` from the new file takes the device over;
# fio sees no error and its verify passes; the kernel logs no I/O error; `xfs_repair -n` is clean.
# Before that, `wbctl delete` of the mounted device is refused, names the mount, and changes
# nothing; after it, SIGTERM with nobody using the device removes it as before.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 2G backing.img; truncate -s 512M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-restart.sh
#
# Prints "ublk-restart: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
need_module xfs
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
MNT=/tmp/wb-restart
mkdir -p "$MNT"
devices=(--backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")

dev="$(wb_create u0 "${devices[@]}")"
log "wbctl create u0 -> $dev"
mkfs.xfs -q -f "$dev" || fail "mkfs.xfs $dev failed"
mount -t xfs "$dev" "$MNT" || fail "mount $dev failed"
on_exit "umount $MNT 2>/dev/null || true"

# ---- delete of a mounted device: refused, names the mount, changes nothing
pid0="$(wb_pid u0)"
if out="$("$WBCTL" delete u0 2>&1)"; then fail "delete of a mounted device succeeded: $out"; fi
log "delete refused: $out"
[[ "$out" == *"mounted on $MNT (xfs)"* ]] || fail "the refusal does not name the mount $MNT"
[[ -b "$dev" && "$(wb_pid u0)" == "$pid0" && "$(wb_field u0 mode)" == mirrored ]] ||
    fail "the refused delete changed something"
echo still-writable >"$MNT/after-refused-delete" && sync -f "$MNT" || fail "the filesystem broke"

# ---- fio verify on a file of the filesystem, its writes paced (~40 s) so that both restarts
# fall inside them; an fsync every 128 writes (each one seals a log segment: more would fill
# the 512 MiB cache and make the test slow, not stronger)
out="$WB_OUT/restart-fio.log"
fio --name=restart-verify --filename="$MNT/fio.dat" --size=96M --ioengine=libaio --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --rate_iops=,600 --randrepeat=0 --fsync=128 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never >"$out" 2>&1 &
fio_pid=$!
on_exit "kill $fio_pid 2>/dev/null || true"

# stop_daemon NAME: SIGTERM its daemon (as systemd does) and wait for it to exit; the daemon's
# log lines from then on are in $WB_OUT/NAME.stop.log.
stop_daemon() {
    local pid i from
    pid="$(wb_pid "$1")"
    from=$(($(wc -l <"$WRITEBOOST_RUN_DIR/$1.log") + 1))
    kill -TERM "$pid"
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            tail -n +"$from" "$WRITEBOOST_RUN_DIR/$1.log" >"$WB_OUT/$1.stop.log"
            return 0
        }
        sleep 0.1
    done
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "daemon $pid did not exit within 60 s of SIGTERM"
}

# handed_over NAME: the daemon left the device to the kernel; fio is alive and waiting.
handed_over() {
    grep -q "is in use (mounted on $MNT (xfs).*leaving it to the kernel" "$WB_OUT/$1.stop.log" ||
        fail "the daemon log does not say it left the device to the kernel"
    grep -q "log sealed and flushed; the device waits for the next start" "$WB_OUT/$1.stop.log" ||
        fail "the daemon did not seal and flush the log before leaving"
    [[ -b "$dev" ]] || fail "$dev went away with its daemon"
    [[ -e "$WRITEBOOST_RUN_DIR/$1.json" ]] || fail "the state file went away"
    local said
    if said="$("$WBCTL" status "$1" 2>&1)"; then fail "status answered without a daemon"; fi
    [[ "$said" == *"stopped with $dev in use; the kernel holds its I/O until the next start"* ]] ||
        fail "status of the handed-over device says: $said"
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || { cat "$out" >&2; fail "fio exited while the daemon was gone"; }
}

# The installed binary, as a package would place it; the takeovers run the daemon from it.
sbin=/tmp/wb-install/sbin
mkdir -p "$sbin"
cp "$WBCTL" "$sbin/wbctl"

sleep 6
before="$(wb_field u0 writes)"
stop_daemon u0
handed_over u0
t0=$EPOCHREALTIME
again="$("$sbin/wbctl" create u0 "${devices[@]}" 2>"$WB_OUT/takeover.err")" ||
    { cat "$WB_OUT/takeover.err" >&2; fail "create (the unit's start) failed to take over"; }
grep -q "its daemon stopped and left $dev to the kernel; taking it over" "$WB_OUT/takeover.err" ||
    { cat "$WB_OUT/takeover.err" >&2; fail "create did not say it takes over a handed-over device"; }
[[ "$again" == "$dev" ]] || fail "the start made $again, expected the same $dev"
log "stop + start under fio: taken over in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}') s (writes before the stop: $before; new pid $(wb_pid u0))"
[[ "$(wb_field u0 mode)" == mirrored ]] || fail "mode after the start: $(wb_field u0 mode)"
after="$(wb_field u0 writes)"
((after >= before)) || fail "the writes counter went back across the hand-over: $before -> $after"

# ---- upgrade: a new binary installed by rename while the old daemon runs from the old file
sleep 5
old_pid="$(wb_pid u0)"
[[ "$(readlink "/proc/$old_pid/exe")" == "$sbin/wbctl" ]] || fail "the daemon does not run $sbin/wbctl"
cp "$WBCTL" "$sbin/wbctl.new" && mv -f "$sbin/wbctl.new" "$sbin/wbctl"
[[ "$(readlink "/proc/$old_pid/exe")" == "$sbin/wbctl (deleted)" ]] ||
    fail "the install did not replace the running daemon's file: $(readlink "/proc/$old_pid/exe")"
stop_daemon u0
handed_over u0
"$sbin/wbctl" recover u0 >/dev/null || fail "recover with the new binary failed"
new_pid="$(wb_pid u0)"
[[ "$new_pid" != "$old_pid" && "$(readlink "/proc/$new_pid/exe")" == "$sbin/wbctl" ]] ||
    fail "the device is not served by the new binary (pid $new_pid, exe $(readlink "/proc/$new_pid/exe"))"
log "upgrade under fio: pid $old_pid -> $new_pid running $sbin/wbctl"

if ! wait "$fio_pid"; then
    cat "$out" >&2
    fail "fio failed across the stop/start and the upgrade"
fi
if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error|error=" "$out" >&2; then
    fail "fio reported errors (log $out)"
fi
grep -E "^ +(write|read):" "$out" || true
log "fio verify passed across a stop/start and an upgrade"
wb_no_kernel_io_errors
"$WBCTL" status u0

umount "$MNT"
xfs_repair -n "$dev" >"$WB_OUT/repair.log" 2>&1 || {
    cat "$WB_OUT/repair.log" >&2
    fail "xfs_repair -n found problems"
}
log "xfs_repair -n: clean"

# ---- nobody uses it now: SIGTERM removes the device as before
stop_daemon u0
grep -q "stopped by signal 15" "$WB_OUT/u0.stop.log" || fail "the last stop was not a removal"
! grep -q "leaving it to the kernel" "$WB_OUT/u0.stop.log" || fail "the last stop left the device to the kernel"
for ((i = 0; i < 50; i++)); do [[ -b "$dev" ]] || break; sleep 0.1; done
[[ ! -b "$dev" ]] || fail "$dev is still there after SIGTERM with nobody using it"
[[ ! -e "$WRITEBOOST_RUN_DIR/u0.json" ]] || fail "the state file is still there after a removal"
log "SIGTERM with nobody using the device removed it"
log "ublk-restart: PASS"
