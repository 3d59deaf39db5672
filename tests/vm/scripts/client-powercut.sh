#!/usr/bin/env bash
# "Crash through the whole stack" (issue 13): a power cut of the VM in the middle of writeback,
# under xfs on an iSCSI LUN whose writes the initiator syncs often. Two boots on the same disks:
#
#   client-powercut.sh cut [SECS]      (boot 1) a writeboost device with writeback always on
#       (--low-watermark 0) in front of a slow (throttled) backing disk, exported by LIO and
#       logged into over 127.0.0.1 (the client-iscsi.sh setup); mkfs.xfs on /dev/sdX, mount;
#       once the mkfs is written back, a writer creates files of random content, fsyncs each
#       file and its folder, and only then appends "sha256  path" to $WB_OUT/journal.sha256
#       (the journal line itself fsynced, on the host); beside it, unsynced data keeps being
#       written. After SECS (default 25) seconds, with writeback mid-way (dirty data in the
#       cache, some already written back), `echo o > /proc/sysrq-trigger`: the guest powers off
#       at once, no sync, no unmount, the daemon's RAM buffer in /run gone. The last line this
#       boot prints is "client-powercut: power cut now ..."; it cannot pass.
#   client-powercut.sh check BOOT1_OUT (boot 2) with BOOT1_OUT = boot 1's $WB_OUT (host path,
#       readable in the guest):
#       (a) the backing device alone, through a dm-snapshot (COW in /tmp: the image is left
#           untouched), mounts (xfs log recovery) and `xfs_repair -n` finds it clean: a
#           consistent older disk (how many journaled files it already holds is reported: any
#           number is fine);
#       (b) `wbctl create` with the same devices re-attaches the cache; /dev/ublkbN mounts (xfs
#           log recovery), EVERY journaled file is there with its journaled sha256, and
#           `xfs_repair -n` is clean.
#       Prints "client-powercut: PASS".
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 1G backing.img; truncate -s 512M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img:throttle --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/client-powercut.sh cut          # -> run.sh: run folder DIR
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/client-powercut.sh check DIR
#
# Needs targetcli-fb, open-iscsi (tests/vm/setup.sh installs them) for boot 1.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
source "$(dirname "$0")/client-lib.sh"
need_vm
need_ublk
PHASE="${1:?usage: client-powercut.sh cut [SECS] | check BOOT1_OUT}"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
WB_ARGS=(--backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1" --low-watermark 0)
MNT=/tmp/pc-xfs
mkdir -p "$MNT"
wb_watchdog 400

# The synced writer: files of random content under DIR/synced, each fsynced with its folder
# before its line goes to the journal (fsynced too). Runs until the power goes.
synced_writer() {
    python3 - "$@" <<'PY'
import hashlib, os, random, sys
mnt, journal = sys.argv[1], sys.argv[2]
d = os.path.join(mnt, "synced")
os.makedirs(d, exist_ok=True)
for p in (mnt, d):
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rng = random.Random(os.urandom(16))
n = 0
while True:
    name = f"f{n:05}.bin"
    data = rng.randbytes(rng.choice([512, 4096, 12345, 65536, 200_000, 1 << 20]))
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    os.fsync(dfd)
    os.write(jfd, f"{hashlib.sha256(data).hexdigest()}  synced/{name}\n".encode())
    os.fsync(jfd)
    n += 1
PY
}

cut() {
    local secs="${1:-25}"
    local IQN=iqn.2026-11.lan.storage:lun0
    local TPG="/iscsi/$IQN/tpg1"
    [[ -w /proc/sysrq-trigger ]] || fail "no writable /proc/sysrq-trigger"
    echo 1 >/proc/sys/kernel/sysrq || fail "cannot enable sysrq"

    # ---- LIO target + iSCSI initiator on the loopback: the client-iscsi.sh setup
    need_module crc32c_generic configfs target_core_mod target_core_iblock iscsi_target_mod \
        scsi_transport_iscsi libiscsi libiscsi_tcp iscsi_tcp sd_mod xfs
    mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config ||
        fail "mounting configfs failed"
    ip link set lo up || fail "ip link set lo up failed"
    mkdir -p /run/dbus
    dbus-daemon --system --fork --print-pid >/tmp/dbus.pid || fail "dbus-daemon failed to start"
    cp -a /etc/iscsi /tmp/etc-iscsi
    mount --bind /tmp/etc-iscsi /etc/iscsi || fail "bind-mounting a writable /etc/iscsi failed"
    mkdir -p /run/lock/iscsi
    iscsid || fail "iscsid failed to start"

    local dev
    dev="$(wb_create p0 "${WB_ARGS[@]}")"
    log "wbctl create p0 -> $dev (backing $BACKING throttled, writeback always on)"
    log "targetcli: block backstore lun0 on $dev, target $IQN, LUN 0, demo-mode tpg"
    targetcli >"$WB_OUT/targetcli-setup.log" 2>&1 <<TCLI || true
set global auto_save_on_exit=false
/backstores/block create name=lun0 dev=$dev
/iscsi create $IQN
$TPG/luns create /backstores/block/lun0
$TPG set attribute authentication=0 generate_node_acls=1 demo_mode_write_protect=0
TCLI
    local tpg_cfs="/sys/kernel/config/target/iscsi/$IQN/tpgt_1"
    [[ -d "$tpg_cfs/lun/lun_0" && "$(cat "$tpg_cfs/enable")" == 1 ]] || {
        cat "$WB_OUT/targetcli-setup.log" >&2
        fail "targetcli did not build the target (no enabled $tpg_cfs with lun_0)"
    }
    iscsiadm -m discovery -t sendtargets -p 127.0.0.1 >/dev/null || fail "iSCSI discovery failed"
    iscsiadm -m node -T "$IQN" -p 127.0.0.1 --login >/dev/null || fail "iSCSI login failed"
    local sd="" i
    for ((i = 0; i < 100; i++)); do
        sd="$(iscsiadm -m session -P3 2>/dev/null | awk '/Attached scsi disk/ {print $4; exit}')"
        [[ -n "$sd" && -b "/dev/$sd" ]] && break
        sleep 0.1
    done
    [[ -n "$sd" && -b "/dev/$sd" ]] || fail "no /dev/sdX after the iSCSI login"
    local SD="/dev/$sd"
    log "logged in: $SD (cache: $(cat "/sys/block/$sd/queue/write_cache"))"
    [[ "$(cat "/sys/block/$sd/queue/write_cache")" == "write back" ]] ||
        fail "the initiator sees no volatile write cache on $SD: its syncs would not reach writeboost"

    # ---- xfs on the LUN; its mkfs written back before the workload, so that the backing
    # device alone holds a filesystem to recover
    mkfs.xfs -q -f -K "$SD" || fail "mkfs.xfs $SD failed"
    mount -t xfs "$SD" "$MNT" || fail "mount $SD failed"
    sync -f "$MNT"
    local dirty wb0 wb1
    local deadline=$((SECONDS + 300))
    while :; do
        dirty="$(wb_field p0 dirty_bytes)"
        ((dirty == 0 || SECONDS > deadline)) && break
        sleep 0.5
    done
    ((dirty == 0)) || fail "the mkfs was not written back within 300 s ($dirty bytes dirty)"
    wb0="$(wb_field p0 written_back_bytes)"
    log "mkfs.xfs on $SD written back ($wb0 bytes written back)"

    # ---- the workload: synced files + a journal of them; unsynced data beside it
    echo 200 >/proc/sys/vm/dirty_expire_centisecs # unsynced data reaches the device within ~2 s
    mkdir -p "$MNT/unsynced"
    (
        n=0
        while :; do
            dd if=/dev/urandom of="$MNT/unsynced/u$((n % 6))" bs=1M count=4 conv=notrunc status=none
            n=$((n + 1))
        done
    ) &
    local unsynced_pid=$!
    local journal="$WB_OUT/journal.sha256"
    synced_writer "$MNT" "$journal" &
    local writer_pid=$!
    log "writing for ${secs}s: synced files journaled in $journal, unsynced data beside them"
    sleep "$secs"
    kill -0 "$writer_pid" 2>/dev/null || fail "the synced writer died"
    kill -0 "$unsynced_pid" 2>/dev/null || fail "the unsynced writer died"
    local files
    files="$(wc -l <"$journal")"
    ((files >= 10)) || fail "only $files files synced in ${secs}s: too few to tell anything"
    read -r dirty wb1 < <(wb_field p0 dirty_bytes written_back_bytes)
    log "$files files synced and journaled; $dirty bytes dirty in the cache, $((wb1 - wb0)) bytes written back during the workload"
    ((dirty > 0 && wb1 > wb0)) ||
        fail "not mid-writeback (dirty $dirty, written back during the workload $((wb1 - wb0))): the cut would test nothing"
    no_kernel_errors_on "$sd" "$(basename "$dev")"
    echo "$files $dirty $wb1" >"$WB_OUT/power-cut"
    log "client-powercut: power cut now (writers running, $files files journaled, $dirty bytes dirty)"
    sleep 1 # the line reaches the console; the writers go on
    echo o >/proc/sysrq-trigger
    sleep 30
    fail "still running 30 s after sysrq o"
}

check() {
    local boot1="${1:?check needs the WB_OUT folder of boot 1}"
    local journal="$boot1/journal.sha256"
    [[ -e "$boot1/power-cut" ]] || fail "boot 1 ($boot1) did not reach the power cut"
    [[ -s "$journal" ]] || fail "no journal $journal"
    need_module xfs dm-snapshot loop
    # Every complete line is a file that was synced (a line cut short by the power cut would
    # be the last one, and its file synced anyway: it is left out).
    local jok=/tmp/journal.ok total
    total="$(wc -l <"$journal")"
    head -n "$total" "$journal" | grep -E '^[0-9a-f]{64}  synced/f[0-9]{5}\.bin$' >"$jok" || true
    [[ "$(wc -l <"$jok")" -eq "$total" ]] || fail "malformed lines in $journal"
    ((total > 0)) || fail "no complete line in $journal"
    cp "$journal" "$WB_OUT/boot1-journal.sha256"
    log "boot 1 journaled $total synced files before the cut (at the last status before it: $(cat "$boot1/power-cut") = files, dirty bytes, written back bytes)"

    # ---- (a) the backing device alone, through a snapshot (writes, log recovery's included,
    # go to a COW file in /tmp)
    truncate -s 768M /tmp/cow.img
    local loop sectors i
    loop="$(losetup -f --show /tmp/cow.img)" || fail "losetup failed"
    on_exit "losetup -d $loop 2>/dev/null || true"
    sectors="$(blockdev --getsz "$BACKING")"
    for ((i = 0; i < 50; i++)); do
        [[ -e /dev/mapper/control ]] && break
        sleep 0.1
    done
    # No udev in the VM: no waiting for it, the node made by dmsetup itself.
    dmsetup create pc-backing --noudevsync --table "0 $sectors snapshot $BACKING $loop N 8" ||
        fail "dmsetup create of a snapshot of $BACKING failed"
    on_exit "dmsetup remove --noudevsync pc-backing 2>/dev/null || true"
    local snap=/dev/mapper/pc-backing
    [[ -b "$snap" ]] || dmsetup mknodes pc-backing
    wait_for_blockdev "$snap" 10
    local from
    from="$(dmesg | wc -l)"
    mount -t xfs "$snap" "$MNT" || {
        dmesg | tail -n +"$((from + 1))" >&2
        fail "the backing device alone does not mount"
    }
    dmesg | tail -n +"$((from + 1))" | grep -i xfs || true
    local counts present matching
    counts="$(cd "$MNT" && python3 -c '
import hashlib, os, sys
present = matching = 0
for line in open(sys.argv[1]):
    sha, path = line.split()
    if os.path.exists(path):
        present += 1
        with open(path, "rb") as f:
            matching += hashlib.sha256(f.read()).hexdigest() == sha
print(present, matching)' "$jok")" || fail "reading the journaled files on the backing device failed"
    read -r present matching <<<"$counts"
    log "backing device alone: mounted (log recovered); $present of the $total journaled files there, $matching of them with their synced content"
    umount "$MNT" || fail "umount of the backing snapshot failed"
    xfs_repair -n "$snap" >"$WB_OUT/repair-backing.log" 2>&1 || {
        cat "$WB_OUT/repair-backing.log" >&2
        fail "xfs_repair -n on the backing device alone found problems"
    }
    mount -t xfs -o ro "$snap" "$MNT" || fail "the backing device alone does not mount after xfs_repair -n"
    umount "$MNT"
    dmsetup remove --noudevsync pc-backing || fail "dmsetup remove failed"
    losetup -d "$loop"
    rm -f /tmp/cow.img
    log "backing device alone: xfs_repair -n clean: a consistent older disk"

    # ---- (b) the cache re-attached: every synced file is back
    local dev
    dev="$(wb_create p0 "${WB_ARGS[@]}")"
    log "wbctl create p0 (same devices) -> $dev: mode $(wb_field p0 mode), $(wb_field p0 dirty_bytes) bytes dirty"
    from="$(dmesg | wc -l)"
    mount -t xfs "$dev" "$MNT" || {
        dmesg | tail -n +"$((from + 1))" >&2
        fail "$dev does not mount after the power cut"
    }
    on_exit "umount $MNT 2>/dev/null || true"
    dmesg | tail -n +"$((from + 1))" | grep -i xfs || true
    local ok
    ok="$(cd "$MNT" && sha256sum -c "$jok" 2>/dev/null | grep -c ': OK$' || true)"
    if ((ok != total)); then
        (cd "$MNT" && sha256sum -c "$jok" 2>&1 | grep -v ': OK$' | head -20) >&2
        fail "only $ok of the $total synced files are on $dev with their synced content"
    fi
    log "$dev: all $total synced files are there with their synced content"
    umount "$MNT"
    xfs_repair -n "$dev" >"$WB_OUT/repair-cache.log" 2>&1 || {
        cat "$WB_OUT/repair-cache.log" >&2
        fail "xfs_repair -n on $dev found problems"
    }
    log "$dev: xfs_repair -n clean"
    wb_no_kernel_io_errors
    log "client-powercut: PASS"
}

case "$PHASE" in
cut) cut "${2:-25}" ;;
check) check "${2:-}" ;;
*) fail "unknown phase $PHASE (cut | check)" ;;
esac
