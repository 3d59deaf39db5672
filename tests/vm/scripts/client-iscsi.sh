#!/usr/bin/env bash
# The README's iSCSI recipe for real, on the VM's loopback: a writeboost device exported by LIO
# (targetcli, block backstore) and logged into with open-iscsi over 127.0.0.1, so every test I/O
# goes initiator (/dev/sdX) -> iSCSI -> LIO -> /dev/ublkbN -> the daemon.
#   1. fio verify on /dev/sdX (the users' verify jobs, sized down: random 4 KiB; mixed sizes
#      with an fsync every 32 writes);
#   2. the initiator's syncs arrive as FLUSH: `flushes` in the status rises by at least one per
#      fsync of /dev/sdX (sd sees the LUN's volatile write cache and sends SYNCHRONIZE CACHE);
#   3. kill -9 of the daemon while fio writes over iSCSI, `wbctl recover`: fio goes on without
#      an error and its verify passes; no I/O or connection error in the kernel log;
#   3b. SIGTERM of the daemon (a systemctl stop/restart) while fio writes over iSCSI: LIO holds
#      the device, so it is left to the kernel, and `wbctl create` (the unit's start) takes it
#      over: fio goes on without an error and its verify passes;
#   4. mkfs.xfs on /dev/sdX, a tree of files, sync, umount, `xfs_repair -n` clean, mount again
#      and the checksums match;
#   5. logout, the LIO config removed, `wbctl delete --drain`: the backing device alone mounts
#      and holds the same files.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 1G backing.img; truncate -s 512M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/client-iscsi.sh [FIO_MIB]
#
# FIO_MIB (default 8): size of the random 4 KiB verify job on /dev/sdX; the mixed-sizes job
# and the job the daemon is killed under write twice that (under emulation, with the host
# busy, 4 KiB random I/O over iSCSI has run at ~600 writes/s and ~350 reads/s).
# Needs targetcli-fb, open-iscsi (tests/vm/setup.sh installs them).
# Prints "client-iscsi: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/client-lib.sh"
need_vm
need_ublk
FIO_MIB="${1:-8}"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
IQN=iqn.2026-11.lan.storage:lun0
TPG="/iscsi/$IQN/tpg1"
MNT=/tmp/iscsi-xfs
mkdir -p "$MNT"
wb_watchdog 600

# ---- the kernel side: LIO target + iSCSI initiator. The VM loads no module by itself;
# crc32c_generic is what iSCSI login needs for its digests ("crypto_alloc_ahash() failed").
need_module crc32c_generic configfs target_core_mod target_core_iblock iscsi_target_mod \
    scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp sd_mod xfs
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config ||
    fail "mounting configfs failed"
ip link set lo up || fail "ip link set lo up failed"
# targetcli asks the system D-Bus about tcmu backstores and dies without one.
mkdir -p /run/dbus
dbus-daemon --system --fork --print-pid >/tmp/dbus.pid || fail "dbus-daemon failed to start"
on_exit "kill \$(cat /tmp/dbus.pid) 2>/dev/null || true"
# iscsiadm writes its node database under /etc/iscsi (read-only here: a tmpfs copy over it).
cp -a /etc/iscsi /tmp/etc-iscsi
mount --bind /tmp/etc-iscsi /etc/iscsi || fail "bind-mounting a writable /etc/iscsi failed"
on_exit "umount /etc/iscsi 2>/dev/null || true"
mkdir -p /run/lock/iscsi
iscsid || fail "iscsid failed to start"
on_exit "kill \$(cat /run/iscsid.pid 2>/dev/null) 2>/dev/null || true"

dev="$(wb_create i0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")"
on_exit "_wb_cleanup i0" # (wb_create's own registration is lost in the $(...) subshell)
log "wbctl create i0 -> $dev"

# ---- the README's targetcli steps (the loopback initiator is let in by a demo-mode tpg
# instead of an ACL naming it). One targetcli for all of them: under emulation each start of
# targetcli (python + rtslib) costs ~30 s. Its shell reads the commands from stdin; the first
# one keeps it from saving the config to the read-only /etc/target at exit. What it built is
# checked in configfs.
log "targetcli: block backstore lun0 on $dev, target $IQN, LUN 0, demo-mode tpg"
targetcli >"$WB_OUT/targetcli-setup.log" 2>&1 <<TCLI || true
set global auto_save_on_exit=false
/backstores/block create name=lun0 dev=$dev
/iscsi create $IQN
$TPG/luns create /backstores/block/lun0
$TPG set attribute authentication=0 generate_node_acls=1 demo_mode_write_protect=0
ls /
TCLI
on_exit "targetcli clearconfig confirm=True >/dev/null 2>&1 || true"
CFS=/sys/kernel/config/target
tpg_cfs="$CFS/iscsi/$IQN/tpgt_1"
[[ -d "$tpg_cfs/lun/lun_0" && "$(cat "$tpg_cfs/enable")" == 1 ]] || {
    cat "$WB_OUT/targetcli-setup.log" >&2
    fail "targetcli did not build the target (no enabled $tpg_cfs with lun_0)"
}
[[ "$(cat "$tpg_cfs/attrib/generate_node_acls") $(cat "$tpg_cfs/attrib/authentication") $(cat "$tpg_cfs/attrib/demo_mode_write_protect")" == "1 0 0" ]] ||
    fail "tpg attributes not set (see $WB_OUT/targetcli-setup.log)"
grep -qs "$dev" "$CFS"/core/iblock_*/lun0/udev_path ||
    fail "the LUN's backstore is not on $dev"
# (Its attrib/emulate_write_cache reads 0: a block backstore reports the write cache of the
# device under it, checked below on the initiator's side.)

iscsiadm -m discovery -t sendtargets -p 127.0.0.1 || fail "iSCSI discovery on 127.0.0.1 failed"
iscsiadm -m node -T "$IQN" -p 127.0.0.1 --login || fail "iSCSI login failed"
on_exit "iscsiadm -m node -T $IQN -p 127.0.0.1 --logout >/dev/null 2>&1 || true"
# A step that fails with the daemon down (killed or stopped under the LUN) leaves the LUN's I/O
# held by the kernel, and the logout and clearconfig above would wait for it for ever (LIO
# cannot release a session with commands outstanding): bring the daemon back first.
daemon_back_if_down() {
    [[ -e "$WRITEBOOST_RUN_DIR/i0.json" ]] || return 0 # deleted: nothing is held
    "$WBCTL" status i0 >/dev/null 2>&1 && return 0
    log "cleanup: the daemon is down under the LUN; bringing it back before the logout"
    "$WBCTL" recover i0 >/dev/null 2>&1 ||
        "$WBCTL" create i0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" >/dev/null 2>&1 ||
        log "cleanup: could not bring the daemon back"
}
on_exit daemon_back_if_down
sd=""
for ((i = 0; i < 100; i++)); do
    sd="$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/ {print $4; exit}')"
    [[ -n "$sd" && -b "/dev/$sd" ]] && break
    sleep 0.1
done
[[ -n "$sd" && -b "/dev/$sd" ]] || fail "no /dev/sdX after the iSCSI login"
SD="/dev/$sd"
size="$(blockdev --getsize64 "$SD")"
log "logged in: $SD ($(cat "/sys/block/$sd/device/vendor" | xargs) $(cat "/sys/block/$sd/device/model" | xargs), $((size >> 20)) MiB, cache: $(cat "/sys/block/$sd/queue/write_cache"))"
[[ "$size" -eq "$(blockdev --getsize64 "$dev")" ]] || fail "$SD is $size bytes, $dev $(blockdev --getsize64 "$dev")"
[[ "$(cat "/sys/block/$sd/queue/write_cache")" == "write back" ]] ||
    fail "the initiator sees no volatile write cache on $SD: its syncs would not reach writeboost"
dmesg | grep -E "\[$sd\].*(Write cache|FUA)" || true

# ---- 1. fio verify through iSCSI
scaled_job verify-4k-random "$FIO_MIB" "$WB_OUT/verify-4k-random.fio"
scaled_job verify-mixed-sizes "$((2 * FIO_MIB))" "$WB_OUT/verify-mixed-sizes.fio"
f0="$(wb_field i0 flushes)"
client_fio "$SD" "$WB_OUT/verify-4k-random.fio"
client_fio "$SD" "$WB_OUT/verify-mixed-sizes.fio"
f1="$(wb_field i0 flushes)"
log "flushes during the verify jobs: $f0 -> $f1"
((f1 > f0)) || fail "no FLUSH reached writeboost during fio with fsync=32 over iSCSI"

# ---- 2. every sync of /dev/sdX reaches writeboost as a FLUSH
SYNCS=20
f0="$(wb_field i0 flushes)"
# SYNCS 4 KiB writes, each followed by an fsync of /dev/sdX (one process: under emulation
# every exec costs a second). fio's fsync=1 syncs before each next write, so none follows the
# last one: end_fsync=1 adds it.
fio --name=syncs --filename="$SD" --ioengine=psync --direct=1 --rw=write --bs=4k \
    --size=$((SYNCS * 4))k --fsync=1 --end_fsync=1 --eta=never >"$WB_OUT/iscsi-syncs-fio.log" 2>&1 || {
    cat "$WB_OUT/iscsi-syncs-fio.log" >&2
    fail "fio write+fsync on $SD failed"
}
f1="$(wb_field i0 flushes)"
log "flushes across $SYNCS write+fsync of $SD: $f0 -> $f1"
((f1 - f0 >= SYNCS)) || fail "$SYNCS fsyncs of $SD brought only $((f1 - f0)) FLUSHes to writeboost"

# ---- 3. kill -9 of the daemon while fio writes over iSCSI; recover
# The daemon must go down while fio is still writing: its writes are paced (not its verifying
# reads), so that the write phase lasts >= 10 s however fast the host is (a fast one once wrote
# the 16 MiB in 1.4 s, and fio was gone before the kill).
WRITE_IOPS=$((2 * FIO_MIB * 256 / 10))
out="$WB_OUT/iscsi-crash-fio.log"
fio --name=iscsi-crash --filename="$SD" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --rate_iops=,$WRITE_IOPS --iodepth=16 --size="$((2 * FIO_MIB))M" --offset="$((2 * FIO_MIB))M" \
    --randrepeat=0 --fsync=64 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never >"$out" 2>&1 &
fio_pid=$!
on_exit "kill $fio_pid 2>/dev/null || true"
sleep 4
kill -0 "$fio_pid" 2>/dev/null || {
    cat "$out" >&2
    fail "fio finished (or failed) before the daemon could be killed; make FIO_MIB larger"
}
pid="$(wb_pid i0)"
log "kill -9 daemon pid $pid during fio over iSCSI"
kill -9 "$pid"
for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
! kill -0 "$pid" 2>/dev/null || fail "daemon $pid survived kill -9"
sleep 1
kill -0 "$fio_pid" 2>/dev/null || {
    cat "$out" >&2
    fail "fio exited while the daemon was down"
}
dev_again="$("$WBCTL" recover i0)" || fail "wbctl recover i0 failed"
[[ "$dev_again" == "$dev" ]] || fail "recover made $dev_again, expected the same $dev"
log "recovered: $dev_again (new pid $(wb_pid i0))"
if ! wait "$fio_pid"; then
    cat "$out" >&2
    fail "fio over iSCSI failed after kill -9 + recover"
fi
if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error|error=" "$out" >&2; then
    fail "fio over iSCSI reported errors after kill -9 + recover (log $out)"
fi
grep -E "^ +(write|read):" "$out" || true
no_kernel_errors_on "$sd" "$(basename "$dev")"
log "fio over iSCSI wrote and verified across kill -9 + recover; no error in the kernel log"

# ---- 3b. a stop under the LUN (SIGTERM: what `systemctl stop|restart` sends): LIO holds the
# device, so the daemon seals and flushes the log and leaves the device to the kernel; the
# unit's start (`wbctl create` with the same devices) takes it over. fio sees no error.
out="$WB_OUT/iscsi-stop-fio.log"
fio --name=iscsi-stop --filename="$SD" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --rate_iops=,$WRITE_IOPS --iodepth=16 --size="$((2 * FIO_MIB))M" --offset="$((4 * FIO_MIB))M" \
    --randrepeat=0 --fsync=64 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never >"$out" 2>&1 &
fio_pid=$!
on_exit "kill $fio_pid 2>/dev/null || true"
sleep 4
kill -0 "$fio_pid" 2>/dev/null || { cat "$out" >&2; fail "fio finished before the stop; make FIO_MIB larger"; }
pid="$(wb_pid i0)"
from=$(($(wc -l <"$WRITEBOOST_RUN_DIR/i0.log") + 1))
log "SIGTERM daemon pid $pid during fio over iSCSI"
kill -TERM "$pid"
for ((i = 0; i < 600; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
! kill -0 "$pid" 2>/dev/null || fail "daemon $pid did not exit within 60 s of SIGTERM"
tail -n +"$from" "$WRITEBOOST_RUN_DIR/i0.log" >"$WB_OUT/i0.stop.log"
grep -q "is in use (exported by the LIO backstore .*leaving it to the kernel" "$WB_OUT/i0.stop.log" ||
    { cat "$WB_OUT/i0.stop.log" >&2; fail "the daemon did not leave the LUN's device to the kernel"; }
[[ -b "$dev" ]] || fail "$dev went away with its daemon although LIO exports it"
kill -0 "$fio_pid" 2>/dev/null || { cat "$out" >&2; fail "fio exited while the daemon was stopped"; }
dev_again="$("$WBCTL" create i0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")" ||
    fail "the start (wbctl create) did not take the device over"
[[ "$dev_again" == "$dev" ]] || fail "the start made $dev_again, expected the same $dev"
log "taken over by the start: $dev_again (new pid $(wb_pid i0))"
if ! wait "$fio_pid"; then
    cat "$out" >&2
    fail "fio over iSCSI failed across a stop and start of the daemon"
fi
if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error|error=" "$out" >&2; then
    fail "fio over iSCSI reported errors across a stop and start (log $out)"
fi
no_kernel_errors_on "$sd" "$(basename "$dev")"
log "fio over iSCSI wrote and verified across a stop and start of the daemon"

# ---- 4. xfs on the LUN
mkfs.xfs -q -f "$SD" || fail "mkfs.xfs $SD failed"
mount -t xfs "$SD" "$MNT" || fail "mount $SD failed"
on_exit "umount $MNT 2>/dev/null || true"
make_tree "$MNT" 13 6 30 1
sync
tree_sums "$MNT" "$WB_OUT/iscsi-tree.sha256"
files=$(wc -l <"$WB_OUT/iscsi-tree.sha256")
log "wrote $files files, $(($(df -k --output=used "$MNT" | tail -1) / 1024)) MiB used on $SD"
umount "$MNT"
xfs_repair -n "$SD" >"$WB_OUT/repair-lun.log" 2>&1 || {
    cat "$WB_OUT/repair-lun.log" >&2
    fail "xfs_repair -n on $SD found problems"
}
log "xfs_repair -n $SD: clean"
mount -t xfs "$SD" "$MNT" || fail "second mount of $SD failed"
check_sums "$MNT" "$WB_OUT/iscsi-tree.sha256" "second mount of $SD"
umount "$MNT"
"$WBCTL" status i0

# ---- 5. logout, LIO config removed, drain: the backing device alone
iscsiadm -m node -T "$IQN" -p 127.0.0.1 --logout || fail "iSCSI logout failed"
targetcli clearconfig confirm=True >"$WB_OUT/targetcli-clear.log" 2>&1 || {
    cat "$WB_OUT/targetcli-clear.log" >&2
    fail "targetcli clearconfig failed"
}
[[ ! -e "$CFS/iscsi/$IQN" ]] && ! compgen -G "$CFS/core/iblock_*/lun0" >/dev/null ||
    fail "the LIO config is still there after clearconfig"
[[ -z "$(ls "/sys/block/$(basename "$dev")/holders")" ]] || fail "$dev still has holders"
no_kernel_errors_on "$sd" "$(basename "$dev")"
"$WBCTL" delete i0 --drain || fail "wbctl delete i0 --drain failed"
for ((i = 0; i < 20; i++)); do
    [[ -b "$dev" ]] || break
    sleep 0.1
done
[[ ! -b "$dev" ]] || fail "$dev still exists after delete"
xfs_repair -n "$BACKING" >"$WB_OUT/repair-backing.log" 2>&1 || {
    cat "$WB_OUT/repair-backing.log" >&2
    fail "xfs_repair -n on the backing device alone found problems"
}
mount -t xfs -o ro "$BACKING" "$MNT" || fail "the backing device alone does not mount"
check_sums "$MNT" "$WB_OUT/iscsi-tree.sha256" "backing device alone"
[[ -L "$MNT/link" ]] || fail "symlink missing on the backing device"
umount "$MNT"
log "backing device alone: clean, $files files match"
log "client-iscsi: PASS"
