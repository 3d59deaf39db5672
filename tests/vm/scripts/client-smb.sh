#!/usr/bin/env bash
# The README's SMB recipe for real, on the VM's loopback: xfs on a writeboost device, shared by
# smbd (a minimal smb.conf written here, `strict sync = yes`) and mounted with
# `mount.cifs //127.0.0.1/share`, so every file goes client (cifs) -> smbd -> xfs ->
# /dev/ublkbN -> the daemon.
#   1. a tree of files copied onto the share, each file fsynced: `flushes` rises by at least
#      one per file (strict sync turns the client's SMB2 FLUSH into an fsync on the server);
#      the checksums match through the share and on the server's xfs;
#   2. kill -9 of the daemon during a second copy, `wbctl recover`: the copy finishes without
#      an error and its checksums match; no I/O error in the kernel log;
#   3. umount, `xfs_repair -n` clean, `wbctl delete --drain`: the backing device alone holds
#      both copies.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 1G backing.img; truncate -s 512M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/client-smb.sh [DIRS]
#
# DIRS (default 6): folders in the copied tree (40 files each, ~8 MiB per folder).
# Needs samba, cifs-utils (tests/vm/setup.sh installs them).
# Prints "client-smb: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/client-lib.sh"
need_vm
need_ublk
DIRS="${1:-6}"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
SRV=/tmp/smb          # smb.conf and every folder smbd writes
EXPORT=/tmp/smb-export # the xfs on /dev/ublkbN, shared as [share]
MNT=/tmp/smb-client   # the cifs mount of //127.0.0.1/share
SRC=/tmp/smb-src      # the tree to copy (tmpfs)
mkdir -p "$SRV"/{lock,state,cache,private,run,ncalrpc,binddns,log} "$EXPORT" "$MNT" "$SRC"
wb_watchdog 600

# cifs names its crypto as soft dependencies without "pre:", which modprobe ignores, and the
# VM cannot autoload: without cmac the SMB3 mount fails ("Could not allocate shash TFM
# 'cmac(aes)'", "Failed alloc encrypt aead", mount error 2).
need_module xfs cifs cmac gcm ghash_generic ccm
ip link set lo up || fail "ip link set lo up failed"

dev="$(wb_create s0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")"
on_exit "_wb_cleanup s0" # (wb_create's own registration is lost in the $(...) subshell)
log "wbctl create s0 -> $dev"
mkfs.xfs -q -f "$dev" || fail "mkfs.xfs $dev failed"
mount -t xfs "$dev" "$EXPORT" || fail "mount $dev failed"
on_exit "umount $EXPORT 2>/dev/null || true"

# ---- smbd: the README's share plus what a server in a read-only root needs (every state
# folder on tmpfs, loopback only, no printing, no NetBIOS); root is the SMB user.
cat >"$SRV/smb.conf" <<CONF
[global]
   server role = standalone server
   interfaces = lo
   bind interfaces only = yes
   disable netbios = yes
   smb ports = 445
   load printers = no
   printing = bsd
   printcap name = /dev/null
   disable spoolss = yes
   lock directory = $SRV/lock
   state directory = $SRV/state
   cache directory = $SRV/cache
   private dir = $SRV/private
   pid directory = $SRV/run
   ncalrpc dir = $SRV/ncalrpc
   binddns dir = $SRV/binddns
   log file = $SRV/log/log.%m
   passdb backend = tdbsam:$SRV/private/passdb.tdb

[share]
   path = $EXPORT
   read only = no
   strict sync = yes
CONF
testparm -s "$SRV/smb.conf" >"$WB_OUT/testparm.txt" 2>&1 || {
    cat "$WB_OUT/testparm.txt" >&2
    fail "testparm rejects the smb.conf"
}
printf 'wbtest\nwbtest\n' | smbpasswd -c "$SRV/smb.conf" -s -a root >/dev/null || fail "smbpasswd -a root failed"
smbd -D -s "$SRV/smb.conf" -l "$SRV/log" || fail "smbd failed to start"
on_exit "kill \$(cat $SRV/run/smbd.pid 2>/dev/null) 2>/dev/null || true; cp -r $SRV/log \$WB_OUT/smbd-log 2>/dev/null || true"
for ((i = 0; i < 100; i++)); do
    (exec 3<>/dev/tcp/127.0.0.1/445) 2>/dev/null && break
    sleep 0.1
done
mount.cifs //127.0.0.1/share "$MNT" -o username=root,password=wbtest ||
    fail "mount.cifs //127.0.0.1/share failed (smbd log: $(tail -5 "$SRV"/log/log.* 2>/dev/null))"
on_exit "umount $MNT 2>/dev/null || true"
log "//127.0.0.1/share mounted: $(grep " $MNT " /proc/mounts | cut -d' ' -f4 | cut -c1-120)"

make_tree "$SRC" 21 "$DIRS" 40 2
tree_sums "$SRC" "$WB_OUT/smb-src.sha256"
files=$(wc -l <"$WB_OUT/smb-src.sha256")
log "source tree: $files files, $(du -sm "$SRC" | cut -f1) MiB"

# ---- 1. copy with an fsync per file; FLUSHes arrive; checksums on both sides
f0="$(wb_field s0 flushes)"
t0=$EPOCHREALTIME
copy_tree_fsync "$SRC" "$MNT/copy1" /tmp/copy1.progress || fail "copy onto the share failed"
f1="$(wb_field s0 flushes)"
log "copy1: $files files in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s; flushes $f0 -> $f1"
((f1 - f0 >= files)) || fail "$files fsyncs over SMB (strict sync) brought only $((f1 - f0)) FLUSHes to writeboost"
check_sums "$MNT/copy1" "$WB_OUT/smb-src.sha256" "copy1 through the share"
check_sums "$EXPORT/copy1" "$WB_OUT/smb-src.sha256" "copy1 on the server's xfs"

# ---- 2. kill -9 + recover during a copy
rm -f /tmp/copy2.progress
copy_tree_fsync "$SRC" "$MNT/copy2" /tmp/copy2.progress >"$WB_OUT/copy2.log" 2>&1 &
cp_pid=$!
on_exit "kill $cp_pid 2>/dev/null || true"
for ((i = 0; i < 600; i++)); do
    [[ "$(cat /tmp/copy2.progress 2>/dev/null || echo 0)" -ge $((files / 4)) ]] && break
    kill -0 "$cp_pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$cp_pid" 2>/dev/null || {
    cat "$WB_OUT/copy2.log" >&2
    fail "the copy ended before the daemon could be killed (progress $(cat /tmp/copy2.progress 2>/dev/null))"
}
pid="$(wb_pid s0)"
log "kill -9 daemon pid $pid during the copy ($(cat /tmp/copy2.progress) of $files files done)"
kill -9 "$pid"
for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
! kill -0 "$pid" 2>/dev/null || fail "daemon $pid survived kill -9"
sleep 1
kill -0 "$cp_pid" 2>/dev/null || {
    cat "$WB_OUT/copy2.log" >&2
    fail "the copy ended while the daemon was down (progress $(cat /tmp/copy2.progress))"
}
dev_again="$("$WBCTL" recover s0)" || fail "wbctl recover s0 failed"
[[ "$dev_again" == "$dev" ]] || fail "recover made $dev_again, expected the same $dev"
log "recovered: $dev_again (new pid $(wb_pid s0)); copy at $(cat /tmp/copy2.progress) files"
if ! wait "$cp_pid"; then
    cat "$WB_OUT/copy2.log" >&2
    fail "the copy onto the share failed after kill -9 + recover"
fi
[[ "$(cat /tmp/copy2.progress)" -eq "$files" ]] || fail "copy2 copied $(cat /tmp/copy2.progress) of $files files"
check_sums "$MNT/copy2" "$WB_OUT/smb-src.sha256" "copy2 (across kill -9 + recover) through the share"
check_sums "$EXPORT/copy2" "$WB_OUT/smb-src.sha256" "copy2 on the server's xfs"
no_kernel_errors_on "$(basename "$dev")"
log "the copy across kill -9 + recover finished; checksums match"

# ---- 3. the share away, xfs clean, drained: the backing device alone
umount "$MNT" || fail "umount of the cifs mount failed"
kill "$(cat "$SRV/run/smbd.pid")" || fail "stopping smbd failed"
for ((i = 0; i < 50; i++)); do
    pgrep -x smbd >/dev/null || break
    sleep 0.1
done
umount "$EXPORT" || fail "umount $EXPORT failed"
xfs_repair -n "$dev" >"$WB_OUT/repair-device.log" 2>&1 || {
    cat "$WB_OUT/repair-device.log" >&2
    fail "xfs_repair -n on $dev found problems"
}
"$WBCTL" status s0
"$WBCTL" delete s0 --drain || fail "wbctl delete s0 --drain failed"
mount -t xfs -o ro "$BACKING" "$EXPORT" || fail "the backing device alone does not mount"
check_sums "$EXPORT/copy1" "$WB_OUT/smb-src.sha256" "copy1 on the backing device alone"
check_sums "$EXPORT/copy2" "$WB_OUT/smb-src.sha256" "copy2 on the backing device alone"
umount "$EXPORT"
log "xfs_repair -n clean; the backing device alone holds both copies"
log "client-smb: PASS"
