#!/usr/bin/env bash
# The writeboost .deb's life cycle on a throwaway copy of this machine:
#   tests/vm/scripts/pkg-install.sh build/deb/writeboost_VERSION_ARCH.deb
# Runs as root, on the host (tools/tests/package.rs runs it). It never touches the real system:
# it re-executes itself in a private mount namespace, where a tmpfs-backed overlay of / is the
# root that `dpkg -i` / `-r` / `--purge` run in (chroot), so dpkg works on this machine's real
# package database and dependencies, and every write lands in the tmpfs, dropped at exit.
# Checks: install; `wbctl --version`; `man -w` finds wbctl(8), a subcommand page and
# writeboost.toml(5); systemd's offline tools see and verify the units in that root (no systemd
# runs there: `systemctl cat`, start, reload and stop through a running manager are checked in
# the VM by pkg-systemd.sh, where a real systemd is PID 1 of a container); bash completion
# completes a subcommand; remove keeps the conffile; purge leaves nothing but the administrator's
# config (the metrics file the timer wrote goes too; that check is pkg-lib.sh's, shared with
# pkg-systemd.sh).
# Prints "pkg-install: PASS" at the end.
set -euo pipefail

log() { echo "pkg-install: $*"; }
fail() { echo "pkg-install: FAIL: $*" >&2; exit 1; }

# shellcheck source=tests/vm/scripts/pkg-lib.sh
source "$(dirname "$0")/pkg-lib.sh"

DEB=$(realpath "${1:?usage: pkg-install.sh PACKAGE.deb}")
[[ -f $DEB ]] || fail "no package at $DEB"
[[ $(id -u) -eq 0 ]] || fail "must run as root (dpkg, mount)"

# WB_PKG_CALLER_NS: the caller's mount namespace. The mounts below must never be made in it.
if [[ -z ${WB_PKG_CALLER_NS:-} ]]; then
    WB_PKG_CALLER_NS=$(readlink /proc/self/ns/mnt)
    export WB_PKG_CALLER_NS
    exec unshare --mount --propagation private bash "$0" "$@"
fi
here_ns=$(readlink /proc/self/ns/mnt)
[[ -n $here_ns && $here_ns != "$WB_PKG_CALLER_NS" ]] || fail "not in a private mount namespace"

T=$(mktemp -d /tmp/wb-pkg.XXXXXX)
trap 'umount -R "$T" 2>/dev/null; rmdir "$T"' EXIT
mount -t tmpfs -o size=512m wb-pkg "$T"
mkdir "$T/up" "$T/work" "$T/root"
mount -t overlay wb-pkg -o "lowerdir=/,upperdir=$T/up,workdir=$T/work" "$T/root"
R=$T/root
# Proof that writes go to the copy: a file made in it must not appear in the real /.
marker=etc/wb-pkg-marker.$$
touch "$R/$marker"
[[ -e $T/up/$marker && ! -e /$marker ]] || fail "the overlay is not where writes go"
rm "$R/$marker"
# The real /dev (its /dev/null: without it, `>/dev/null` in the root makes a file), a /proc,
# and an empty /run as at boot (no /run/systemd/system: no systemd runs here).
mount --bind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t tmpfs wb-pkg-run "$R/run"

cp "$DEB" "$R/tmp/writeboost.deb"

check_installed() {
    in_root dpkg -i /tmp/writeboost.deb || fail "dpkg -i failed"
    local pkg_version wbctl_version
    pkg_version=$(dpkg-deb -f "$DEB" Version)
    wbctl_version=$(in_root wbctl --version)
    log "wbctl --version: $wbctl_version"
    [[ $wbctl_version == "wbctl $pkg_version" ]] || fail "wbctl says '$wbctl_version'"
    local page
    for page in "8 wbctl" "8 wbctl-create" "5 writeboost.toml"; do
        # shellcheck disable=SC2086 # "SECTION NAME" on purpose
        path=$(in_root man -w $page) || fail "man -w $page found nothing"
        log "man -w $page: $path"
    done
    in_root man -P cat 8 wbctl-create 2>/dev/null | grep -q -- '--backing' ||
        fail "man wbctl-create does not render --backing"
}

check_units() {
    local listed
    listed=$(systemctl --root="$R" list-unit-files 'writeboost*' --no-legend)
    log "systemctl --root list-unit-files: $(echo "$listed" | awk '{print $1}' | xargs)"
    for unit in writeboost@.service writeboost-metrics.service writeboost-metrics.timer; do
        grep -q "^$unit " <<<"$listed" || fail "systemd does not see $unit in the root"
    done
    systemd-analyze --root="$R" cat-config systemd/system/writeboost@.service |
        grep -q '^ExecStart=/usr/sbin/wbctl create %i' || fail "writeboost@.service has no ExecStart"
    # systemd's own parser and loader on the installed units, an instance of the template
    # included: syntax, the units they name, the programs they run and their man pages.
    local verify
    # In the root (not --root=): it runs `man` for the units' Documentation= pages.
    verify=$(in_root systemd-analyze verify writeboost@tank0.service \
        writeboost-metrics.service writeboost-metrics.timer 2>&1) ||
        fail "systemd-analyze verify: $verify"
    [[ -z $verify ]] || fail "systemd-analyze verify complains: $verify"
    log "systemd-analyze verify: clean"
    # The timer can be enabled the way the README says (offline: symlinks in the root).
    systemctl --root="$R" enable writeboost-metrics.timer 2>/dev/null
    [[ -L $R/etc/systemd/system/timers.target.wants/writeboost-metrics.timer ]] ||
        fail "enabling writeboost-metrics.timer made no symlink"
    systemctl --root="$R" disable writeboost-metrics.timer 2>/dev/null
}

check_completion() {
    local words
    words=$(in_root bash -c 'source /usr/share/bash-completion/completions/wbctl
        COMP_WORDS=(wbctl st); COMP_CWORD=1; _wbctl wbctl st wbctl; echo "${COMPREPLY[*]}"')
    log "bash completion of 'wbctl st': $words"
    [[ " $words " == *" status "* ]] || fail "bash completion does not offer 'status'"
}

check_remove_and_purge() {
    mkdir -p "$R/etc/writeboost"
    echo 'backing = "/dev/zvol/tank/lun0"' >"$R/etc/writeboost/tank0.toml"
    # What writeboost-metrics.service writes: the package's own output, gone with a purge.
    mkdir -p "$R/var/lib/prometheus/node-exporter"
    echo 'writeboost_daemon_up{device="tank0"} 1' >"$R/var/lib/prometheus/node-exporter/writeboost.prom"
    in_root dpkg -r writeboost || fail "dpkg -r failed"
    [[ ! -e $R/usr/sbin/wbctl ]] || fail "remove left /usr/sbin/wbctl"
    [[ -f $R/etc/writeboost/example.toml ]] || fail "remove did not keep the conffile"
    in_root dpkg --purge writeboost || fail "dpkg --purge failed"
    pkg_check_purged "$T/up" etc/writeboost/tank0.toml
}

check_installed
check_units
check_completion
check_remove_and_purge
log PASS
