#!/usr/bin/env bash
# The writeboost .deb under a real systemd (issue 15: "the .deb installs, `systemctl cat
# writeboost@x` shows the unit, `man wbctl` resolves, purge leaves nothing but the config"), in
# the VM, where ublk_drv is there for the daemon to really start:
#   cargo build --release -p wb-tools --bin wbctl
#   tools/debian/build-deb.sh --wbctl build/release/wbctl --out .vm-cache/deb
#   truncate -s 256M backing.img; truncate -s 64M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/pkg-systemd.sh .vm-cache/deb/writeboost_VERSION_ARCH.deb
# (tests/tests/vm_package.rs does all of this.)
#
# 1. A writable copy of the guest's root: an overlay whose lower layer is / (the host's root over
#    9p, read-only) and whose upper layer is a tmpfs, so every write is visible in the upper
#    folder (what purge must clean up). `dpkg -i` the package in it (chroot).
# 2. /etc/writeboost/x.toml over the VM's disks (backing /dev/vda, mirrored legs /dev/vdb and
#    /dev/vdc, dev_id 7), and a check unit wb-check.service that runs pkg-systemd-check.sh.
# 3. systemd itself, PID 1 of a new PID and mount namespace, chrooted into the copy, in container
#    mode, isolating wb-check.target; the check unit ends it (SuccessAction=/FailureAction=exit).
#    The checks (see pkg-systemd-check.sh) write one line each into a results file.
#    The last check purges the package (`dpkg --purge`) with the manager running.
# 4. Back here: every expected check is in the results; the purge left nothing in the copy but
#    x.toml (pkg-lib.sh's check, shared with pkg-install.sh).
# Prints "pkg-systemd: PASS" at the end.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)

# ---------------------------------------------------------------- stage 2: PID 1
# `pkg-systemd.sh --pid1 ROOT CGROUP`: run by unshare (below) as PID 1 of the new PID namespace,
# in the new mount namespace; mounts what systemd needs in ROOT and becomes systemd (exec: it
# must be PID 1 itself to run as the system manager), in CGROUP (a cgroup2 folder) as the root
# of a new cgroup namespace, as a container manager would start it. Nothing of this outlives the
# namespaces.
if [[ ${1:-} == --pid1 ]]; then
    R=$2
    CG=$3
    # This namespace's own /proc (its PID 1 is systemd), a fresh sysfs (systemd mounts the
    # cgroup2 hierarchy on it: in the new cgroup namespace, its root is CGROUP), and an empty
    # /run as at boot.
    mount -t proc proc "$R/proc"
    mount -t sysfs sysfs "$R/sys"
    mount -t tmpfs -o mode=755 wb-sysd-run "$R/run"
    # The host's generators make units from its fstab, init scripts, gettys, crypttab...:
    # nothing the package uses, and ~15 s at start under emulation. Masked in this /run only.
    mkdir -p "$R/run/systemd/system-generators"
    for g in "$R"/lib/systemd/system-generators/*; do
        ln -s /dev/null "$R/run/systemd/system-generators/${g##*/}"
    done
    echo 0 >"$CG/cgroup.procs" # this process, soon systemd
    # container=: systemd's container mode (it leaves the kernel's own work to the host: no
    # console setup, no hardware units, `systemctl exit` / the exit actions are allowed).
    # --log-target=console: its progress on the VM console; services' output there too.
    exec unshare --cgroup env -i container=writeboost-vm-test TERM=dumb LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        chroot "$R" /lib/systemd/systemd --unit=wb-check.target \
        --log-target=console --log-level=info --log-color=no --log-time=yes --show-status=no \
        --default-standard-output=tty --default-standard-error=tty
fi

# ---------------------------------------------------------------- stage 1: the guest
# shellcheck source=tests/vm/guest-lib.sh
source "$HERE/../guest-lib.sh"
# shellcheck source=tests/vm/scripts/pkg-lib.sh
source "$HERE/pkg-lib.sh"
need_vm
need_ublk
need_module overlay

DEB=$(realpath "${1:?usage: pkg-systemd.sh PACKAGE.deb}")
[[ -f $DEB ]] || fail "no package at $DEB"
# How long systemd may run: start, checks and exit took 77-106 s under TCG on a busy host; a hung
# job must not eat the VM's whole timeout.
SYSTEMD_SECS=${WB_PKG_SYSTEMD_SECS:-240}
NAME=x
DEV_ID=7
BACKING=$(disk 0)
LEG0=$(disk 1)
LEG1=$(disk 2)

# ------------------------------------------------------------------ 1. the copy
T=$(mktemp -d /tmp/wb-sysd.XXXXXX)
mount -t tmpfs -o size=512m wb-sysd "$T"
on_exit "umount -R '$T'"
mkdir "$T/up" "$T/work" "$T/root"
R=$T/root
if ! mount -t overlay wb-sysd -o "lowerdir=/,upperdir=$T/up,workdir=$T/work" "$R" 2>"$T/err"; then
    # The features that need more of the lower layer than 9p may give (file handles, xattrs on
    # directories), off explicitly.
    log "overlay with defaults refused ($(cat "$T/err")); again without redirect_dir/index/metacopy"
    mount -t overlay wb-sysd \
        -o "lowerdir=/,upperdir=$T/up,workdir=$T/work,redirect_dir=off,index=off,metacopy=off" "$R" ||
        fail "overlayfs refuses the 9p root as its lower layer (see dmesg: $(dmesg | grep -i overlay | tail -3))"
fi
marker=etc/wb-sysd-marker.$$
touch "$R/$marker"
[[ -e $T/up/$marker ]] || fail "a file made in the overlay is not in its upper folder"
rm "$R/$marker"
# The guest's /dev (the disks, /dev/ublk-control, and the /dev/ublkbN devtmpfs makes), a /proc
# for dpkg, private /tmp and /run (dpkg's maintainer scripts must see no running systemd yet).
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t tmpfs -o mode=1777 wb-sysd-tmp "$R/tmp"
mount -t tmpfs -o mode=755 wb-sysd-run "$R/run"
log "overlay root $R: lower / (9p), upper tmpfs $T/up"

cp "$DEB" "$R/tmp/writeboost.deb"
# man-db's trigger rebuilds the whole man page index at every install and purge: ~50 s under
# emulation. Its own switch (debconf man-db/auto-update) turns it off here; `man -w` finds the
# pages without the index, and pkg-install.sh runs the trigger on the host.
rm -f "$R/var/lib/man-db/auto-update"
t0=$EPOCHREALTIME
in_root dpkg -i /tmp/writeboost.deb >"$WB_OUT/dpkg-i.log" 2>&1 ||
    fail "dpkg -i $(basename "$DEB") failed: $(tail -5 "$WB_OUT/dpkg-i.log")"
log "dpkg -i $(basename "$DEB"): installed in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s"

# ------------------------------------------------------------------ 2. config and check unit
# The administrator's configuration (example.toml's keys): the VM's disks, a pinned dev_id, and
# one knob the check changes before `systemctl reload`.
cat >"$R/etc/writeboost/$NAME.toml" <<EOF
backing = "$BACKING"
caches = ["$LEG0", "$LEG1"]
single_leg = false
dev_id = $DEV_ID
queues = 1
depth = 64

[policy]
age_threshold_secs = 30
EOF
# node_exporter's textfile folder: writeboost-metrics.service runs only where it exists.
mkdir -p "$R/var/lib/prometheus/node-exporter"
RESULTS=var/lib/wb-check/results
mkdir -p "$R/${RESULTS%/*}"
# The check unit and its target go in /etc (the /run systemd gets is its own, empty); removed
# again before the purge check, with the results.
cat >"$R/etc/systemd/system/wb-check.target" <<EOF
[Unit]
Description=writeboost package checks (tests/vm/scripts/pkg-systemd.sh)
Requires=wb-check.service
After=wb-check.service
AllowIsolate=yes
EOF
cat >"$R/etc/systemd/system/wb-check.service" <<EOF
[Unit]
Description=writeboost package checks under systemd (pkg-systemd-check.sh)
DefaultDependencies=no
# Either way the manager exits when the checks end: the results are in $RESULTS.
SuccessAction=exit
FailureAction=exit

[Service]
Type=oneshot
ExecStart=/bin/bash $HERE/pkg-systemd-check.sh /$RESULTS $NAME /dev/ublkb$DEV_ID
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TimeoutStartSec=$((SYSTEMD_SECS - 20))
EOF

# ------------------------------------------------------------------ 3. systemd
# systemd's cgroup: a child of the guest's root, whose only process will be systemd.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
CG=/sys/fs/cgroup/wb-systemd
mkdir -p "$CG"
log "starting systemd as PID 1 of a new PID namespace in $R (limit ${SYSTEMD_SECS}s)"
t0=$EPOCHREALTIME
# --kill-child: if unshare dies (the timeout), its child, the namespace's PID 1, is killed, and
# with it every process of the namespace.
set +e
timeout -k 10 "$SYSTEMD_SECS" unshare --mount --pid --fork --kill-child --propagation private \
    bash "$HERE/pkg-systemd.sh" --pid1 "$R" "$CG"
rc=$?
set -e
secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
log "systemd exited with status $rc after ${secs} s"
[[ $rc -ne 124 && $rc -ne 137 ]] || fail "systemd did not finish within ${SYSTEMD_SECS}s"

# ------------------------------------------------------------------ 4. results, what purge left
[[ -f $R/$RESULTS ]] || fail "the check unit wrote no results (did systemd start it? see the console)"
cp "$R/$RESULTS" "$WB_OUT/pkg-systemd.results"
sed 's/^/    result: /' "$R/$RESULTS"
if grep -q '^FAIL' "$R/$RESULTS"; then
    fail "under systemd: $(grep '^FAIL' "$R/$RESULTS" | head -1)"
fi
for check in pid1 cat enable start io status reload metrics stop man purge; do
    grep -q "^ok $check\b" "$R/$RESULTS" || fail "no result for the check '$check' (it did not run)"
done
grep -qx done "$R/$RESULTS" || fail "the checks did not reach their end"
[[ $rc -eq 0 ]] || fail "systemd exited with status $rc after the checks passed"
[[ ! -e /dev/ublkb$DEV_ID ]] || fail "/dev/ublkb$DEV_ID outlived systemd"

rm -r "$R/${RESULTS%/*}" "$R/etc/systemd/system/wb-check.target" "$R/etc/systemd/system/wb-check.service"
# The package was purged under systemd (pkg-systemd-check.sh): what is left in the copy is the
# package's, its daemon's and metrics service's, or the administrator's, less what is not the
# package's: systemd's records of its run, /etc/machine-id (systemd opens it for writing at
# start, which copies it up unchanged) and man-db's switch removed above.
not_the_package='^(var/lib/systemd/|etc/machine-id$|var/lib/man-db/auto-update$)'
log "in the copy, not the package's: $(pkg_leftovers "$T/up" | grep -E "$not_the_package" | xargs)"
pkg_check_purged "$T/up" "etc/writeboost/$NAME.toml" "$not_the_package"
log "pkg-systemd: PASS"
