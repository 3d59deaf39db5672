#!/usr/bin/env bash
# A filesystem on writeboost through the real ublk driver: mkfs.xfs, mount, write a tree of
# files, umount, `xfs_repair -n` clean; then `wbctl delete --drain`, and the backing device
# alone mounts, holds the same files (checksums compared) and is clean too.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 2G backing.img; truncate -s 512M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-xfs.sh
#
# Prints "ublk-xfs: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
need_module xfs
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
MNT=/tmp/wb-xfs
mkdir -p "$MNT"

dev="$(wb_create x0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")"
log "wbctl create x0 -> $dev"
mkfs.xfs -q -f "$dev" || fail "mkfs.xfs $dev failed"
mount -t xfs "$dev" "$MNT" || fail "mount $dev failed"
on_exit "umount $MNT 2>/dev/null || true"

# A tree of files: many small ones, some large, some rewritten, some deleted, a few fsynced.
python3 - "$MNT" <<'PY'
import hashlib, os, random, sys
root = sys.argv[1]
rng = random.Random(4)
for d in range(12):
    sub = os.path.join(root, f"dir{d:02}", f"sub{d % 3}")
    os.makedirs(sub, exist_ok=True)
    for f in range(60):
        size = rng.choice([0, 100, 4096, 5000, 65536, 200_000]) if f % 10 else rng.randint(1, 4) << 20
        path = os.path.join(sub, f"file{f:03}.bin")
        with open(path, "wb") as fh:
            fh.write(rng.randbytes(size))
            if f % 17 == 0:
                fh.flush()
                os.fsync(fh.fileno())
for d in range(0, 12, 3):  # rewrite some, delete some
    sub = os.path.join(root, f"dir{d:02}", f"sub{d % 3}")
    for f in range(0, 60, 7):
        with open(os.path.join(sub, f"file{f:03}.bin"), "r+b") as fh:
            fh.seek(rng.randint(0, 4096))
            fh.write(rng.randbytes(8192))
    for f in range(3, 60, 11):
        os.unlink(os.path.join(sub, f"file{f:03}.bin"))
os.symlink("dir00", os.path.join(root, "link"))
PY
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WB_OUT/tree.sha256"
files=$(wc -l <"$WB_OUT/tree.sha256")
used=$(df -k --output=used "$MNT" | tail -1)
log "wrote $files files, $((used / 1024)) MiB used"
umount "$MNT"
xfs_repair -n "$dev" >"$WB_OUT/repair-device.log" 2>&1 || {
    cat "$WB_OUT/repair-device.log" >&2
    fail "xfs_repair -n on $dev found problems"
}
log "xfs_repair -n $dev: clean"

# Mount again through the cache and compare (reads from RAM, cache legs and backing).
mount -t xfs "$dev" "$MNT" || fail "second mount of $dev failed"
(cd "$MNT" && sha256sum --quiet -c "$WB_OUT/tree.sha256") || fail "files differ on the second mount"
umount "$MNT"
"$WBCTL" status x0

# Everything back onto the backing device; the device goes away.
"$WBCTL" delete x0 --drain || fail "wbctl delete x0 --drain failed"
[[ ! -b "$dev" ]] || {
    sleep 1
    [[ ! -b "$dev" ]] || fail "$dev still exists after delete"
}
xfs_repair -n "$BACKING" >"$WB_OUT/repair-backing.log" 2>&1 || {
    cat "$WB_OUT/repair-backing.log" >&2
    fail "xfs_repair -n on the backing device alone found problems"
}
log "xfs_repair -n $BACKING (backing alone): clean"
mount -t xfs -o ro "$BACKING" "$MNT" || fail "the backing device alone does not mount"
(cd "$MNT" && sha256sum --quiet -c "$WB_OUT/tree.sha256") || fail "files on the backing device alone differ"
[[ -L "$MNT/link" ]] || fail "symlink missing on the backing device"
umount "$MNT"
log "backing device alone: $files files match"
wb_no_kernel_io_errors
log "ublk-xfs: PASS"
