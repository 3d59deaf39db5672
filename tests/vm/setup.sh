#!/usr/bin/env bash
# tests/vm/setup.sh — prepare everything the real-kernel (QEMU) tests need.
#
# Idempotent; a re-run with everything in place touches neither apt nor the
# network and takes well under a second.
#   1. Debian packages: qemu-system-x86 busybox-static cpio fio kmod xz-utils
#      libclang-dev xfsprogs e2fsprogs dmsetup, prometheus (for promtool; its
#      server is disabled), and for the client tests (the guest runs the host's
#      binaries) targetcli-fb open-iscsi dbus iproute2 samba cifs-utils (only the
#      missing ones are installed; with --no-install-recommends; the guest starts
#      the daemons it needs itself).
#   2. Debian's newest linux-image-6.12.*+deb12-amd64-unsigned, downloaded with
#      `apt-get download` and unpacked into $REPO/.vm-cache/kernel (git-ignored),
#      with `depmod -b` run over it, so `modprobe -d <that folder> MODULE` works
#      inside the VM (ublk_drv, virtio_blk, dm-*, ext4, xfs, ...).
#   3. A tiny busybox initramfs ($REPO/.vm-cache/initrd.img) whose /init mounts
#      the host root read-only over 9p and chroots into it (see init below).
#
# Everything lives under $REPO/.vm-cache, never /tmp: inside the VM /tmp is a
# tmpfs that hides the host's /tmp.
#
# Environment: WB_VM_CACHE overrides the cache folder; WB_VM_KERNEL_PKG pins
# the kernel package name instead of taking the newest.
# Exit status: 0 ready; non-zero with an "setup.sh: ERROR: ..." line naming
# what failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${WB_VM_CACHE:-$REPO/.vm-cache}"
# prometheus: only for /usr/bin/promtool (`promtool check metrics|rules` in tools/tests); its
# server is disabled again below if this script installed it.
# dpkg-dev (dpkg-shlibdeps), man-db, lintian: `make deb` and its test (tools/tests/package.rs).
# systemd: the VM runs it as PID 1 of a container over the installed package (vm_package.rs); a
# container image of Debian may not have it.
PKGS=(qemu-system-x86 busybox-static cpio fio kmod xz-utils libclang-dev xfsprogs e2fsprogs dmsetup
    prometheus targetcli-fb open-iscsi dbus iproute2 samba cifs-utils dpkg-dev man-db lintian systemd)

log() { echo "setup.sh: $*" >&2; }
die() {
    echo "setup.sh: ERROR: $*" >&2
    exit 1
}

if [[ $(id -u) -ne 0 ]]; then
    die "must run as root (it installs Debian packages with apt-get)"
fi

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        if ! DEBIAN_FRONTEND=noninteractive apt-get update -q >"$CACHE/apt-update.log" 2>&1; then
            tail -20 "$CACHE/apt-update.log" >&2 || true
            die "apt-get update failed (log: $CACHE/apt-update.log)"
        fi
        APT_UPDATED=1
    fi
}

mkdir -p "$CACHE"
# One setup at a time (two test runs starting together must not both unpack).
exec 8>"$CACHE/setup.lock"
flock 8

# ---------------------------------------------------------------- 1. packages
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    apt_update_once
    log "installing: ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"$CACHE/apt-install.log" 2>&1; then
        tail -20 "$CACHE/apt-install.log" >&2 || true
        die "apt-get install of '${missing[*]}' failed (log: $CACHE/apt-install.log)"
    fi
fi
# Debian starts the Prometheus server (port 9090) it installs; the tests need only promtool, so
# a server this script brought is stopped and disabled (one installed before is left alone).
if [[ " ${missing[*]:-} " == *" prometheus "* ]] && command -v systemctl >/dev/null &&
    [[ -d /run/systemd/system ]]; then
    log "disabling the prometheus server that came with promtool"
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
for tool in qemu-system-x86_64 busybox cpio fio depmod xz promtool targetcli iscsiadm iscsid dbus-daemon ip smbd smbpasswd mount.cifs \
    dpkg-shlibdeps man lintian; do
    command -v "$tool" >/dev/null || die "'$tool' is still missing after installing packages"
done

# ------------------------------------------------------------------ 2. kernel
KDIR="$CACHE/kernel"
if [[ -s "$CACHE/kernel.version" && -d "$KDIR/lib/modules/$(cat "$CACHE/kernel.version")" ]]; then
    KVER="$(cat "$CACHE/kernel.version")"
else
    rm -rf "$KDIR" "$CACHE/kernel.version" "$CACHE/debs"
    mkdir -p "$CACHE/debs"
    pick_kernel() {
        apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' 2>/dev/null |
            awk '{print $1}' | sort -V | tail -1
    }
    pkg="${WB_VM_KERNEL_PKG:-}"
    if [[ -z "$pkg" ]]; then
        # A fresh list first: an old list may name a .deb the mirror dropped.
        apt_update_once
        pkg="$(pick_kernel)"
        [[ -n "$pkg" ]] || die "no linux-image-6.12.*+deb12-amd64-unsigned package found by apt-cache search"
    fi
    log "downloading kernel package $pkg"
    if ! (cd "$CACHE/debs" && apt-get download "$pkg" >"$CACHE/apt-download.log" 2>&1); then
        tail -20 "$CACHE/apt-download.log" >&2 || true
        die "apt-get download $pkg failed (log: $CACHE/apt-download.log)"
    fi
    deb="$(compgen -G "$CACHE/debs/*.deb" | head -1 || true)"
    [[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb in $CACHE/debs"
    mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$deb" "$KDIR.tmp" || die "dpkg-deb -x $deb failed"
    KVER="$(ls "$KDIR.tmp/lib/modules")"
    [[ -n "$KVER" && -f "$KDIR.tmp/boot/vmlinuz-$KVER" ]] || die "unexpected layout in $deb (no boot/vmlinuz-*)"
    depmod -b "$KDIR.tmp" "$KVER" || die "depmod -b $KDIR.tmp $KVER failed"
    for m in ublk_drv virtio_blk dm-mod; do
        [[ -n "$(find "$KDIR.tmp/lib/modules/$KVER" -name "$m.ko*")" ]] ||
            die "module $m is missing from $pkg"
    done
    mv "$KDIR.tmp" "$KDIR"
    rm -rf "$CACHE/debs" # the unpacked tree is all we need
    echo "$KVER" >"$CACHE/kernel.version"
    log "kernel $KVER ready in $KDIR"
fi

# --------------------------------------------------------------- 3. initramfs
# Regenerated whenever this script (which holds /init) or the kernel changes.
STAMP="$(
    {
        sha256sum <"${BASH_SOURCE[0]}"
        echo "$KVER"
    } | sha256sum | cut -c1-16
)"
if [[ ! -s "$CACHE/initrd.img" || "$(cat "$CACHE/initrd.stamp" 2>/dev/null)" != "$STAMP" ]]; then
    IR="$CACHE/initramfs"
    rm -rf "$IR"
    mkdir -p "$IR"/{bin,dev,proc,sys,root,mods}
    cp "$(command -v busybox)" "$IR/bin/busybox"
    if ldd "$IR/bin/busybox" >/dev/null 2>&1; then
        die "$(command -v busybox) is dynamically linked; install busybox-static"
    fi
    for m in netfs 9pnet 9pnet_virtio 9p; do
        f="$(find "$KDIR/lib/modules/$KVER/kernel" \( -name "$m.ko.xz" -o -name "$m.ko" \) -print -quit)"
        [[ -n "$f" ]] || die "module $m not found under $KDIR"
        case "$f" in
        *.xz) xz -dc "$f" >"$IR/mods/$m.ko" ;;
        *) cp "$f" "$IR/mods/$m.ko" ;;
        esac
    done
    cat >"$IR/init" <<'INIT'
#!/bin/busybox sh
# writeboost VM init: host root over 9p (read-only), chroot, run one script.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "wb-init: $*" >/dev/console; }
halt() { sync; poweroff -f; sleep 5; echo o >/proc/sysrq-trigger; }

arg() { # value of NAME= on the kernel command line
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return ;; esac
    done
}
RUN="$(arg wbrun)"
KDIR="$(arg wbkdir)"
[ -n "$RUN" ] || { say "no wbrun= on the kernel command line"; halt; }

for m in netfs 9pnet 9pnet_virtio 9p; do
    insmod /mods/$m.ko || { say "insmod $m failed"; halt; }
done
R=/root
# cache=loose: the guest caches what it reads of the (read-only, unchanging during a run) host
# root; without it every exec re-walks its libraries over 9p (python3 took 4-5 s to start,
# fio 10 s).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot $R ||
    { say "mounting the host root over 9p failed"; halt; }
# Keep a handle on the repo: the tmpfs mounts below would hide a repo that
# lives under /tmp, /run or /var/tmp on the host (CI clones may).
REPO="$(arg wbrepo)"
mkdir -p /hostrepo
[ -n "$REPO" ] && mount --bind "$R$REPO" /hostrepo
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/shm $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t devpts devpts $R/dev/pts 2>/dev/null
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp 2>/dev/null
mkdir -p $R/run/ublksrvd $R/run/lock
case "$REPO" in
/tmp | /tmp/* | /run | /run/* | /var/tmp | /var/tmp/*)
    mkdir -p "$R$REPO" && mount --bind /hostrepo "$R$REPO" ||
        { say "cannot re-expose $REPO over the guest's tmpfs"; halt; }
    ;;
esac
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 results "$R$RUN" ||
    { say "mounting the results share on $RUN failed"; halt; }
[ -d $R/sys/kernel/config ] && mount -t configfs configfs $R/sys/kernel/config 2>/dev/null
[ -d $R/sys/kernel/debug ] && mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
hostname wb-vm

chroot $R /sbin/modprobe -d "$KDIR" virtio_blk || say "modprobe virtio_blk failed"
chroot $R /sbin/modprobe -d "$KDIR" ublk_drv || say "modprobe ublk_drv failed"
echo booted >"$R$RUN/booted"
chroot $R /bin/bash "$RUN/cmd.sh" </dev/null >/dev/console 2>&1
rc=$?
echo "$rc" >"$R$RUN/status"
sync
umount "$R$RUN" 2>/dev/null
halt
INIT
    chmod 755 "$IR/init"
    (cd "$IR" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 >"$CACHE/initrd.img.tmp") ||
        die "building the initramfs with cpio failed"
    mv "$CACHE/initrd.img.tmp" "$CACHE/initrd.img"
    echo "$STAMP" >"$CACHE/initrd.stamp"
    log "initramfs built: $CACHE/initrd.img"
fi

log "ready: kernel $KVER, cache $CACHE"
