#!/usr/bin/env bash
# The checks pkg-systemd.sh runs under a real systemd, as wb-check.service (the manager is PID 1
# of the container pkg-systemd.sh made; the writeboost .deb is installed; /etc/writeboost/NAME.toml
# names the VM's disks and dev_id N):
#   pkg-systemd-check.sh RESULTS NAME /dev/ublkbN
# In order: systemd is PID 1 (container, own cgroup namespace); `systemctl cat` shows the packaged
# writeboost@.service; enable/disable; start (Type=notify: active only with the device there),
# a MiB through the device, `wbctl status`, reload (a knob changed in the file), the metrics
# service, stop (device removed), `man -w wbctl`, and last `dpkg --purge` with the manager running.
# Each check appends "ok CHECK: detail" to RESULTS; the first failure appends "FAIL CHECK: why"
# and ends the script (the unit fails, and its FailureAction= ends the manager). pkg-systemd.sh
# reads RESULTS once systemd is gone. The last line is "done".
# Every systemctl costs one to three seconds under emulation on a busy host: the checks ask for
# several properties at once, and test files where the manager's answer adds nothing.
set -euo pipefail

RESULTS=${1:?usage: pkg-systemd-check.sh RESULTS NAME DEV}
NAME=${2:?}
DEV=${3:?}
UNIT=writeboost@$NAME.service
CONFIG=/etc/writeboost/$NAME.toml

CHECK=setup # the check running, named in a failure
T0=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "pkg-systemd-check: [$(since "$T0")s] $*"; }
ok() {
    echo "ok $CHECK: $*" >>"$RESULTS"
    log "ok $CHECK: $*"
}
fail() {
    echo "FAIL $CHECK: $*" >>"$RESULTS"
    log "FAIL $CHECK: $*" >&2
    exit 1
}
# A command that fails without a message of ours (set -e) still names the check and itself.
trap 'echo "FAIL $CHECK: exit $? at line $LINENO: $BASH_COMMAND" >>"$RESULTS"' ERR

# UNIT's properties PROP... into the associative array P (P[ActiveState]=active, ...); no UNIT
# ("") for the manager's own.
declare -A P
props() {
    local unit=$1 line
    shift
    P=()
    while IFS= read -r line; do
        P[${line%%=*}]=${line#*=}
    done < <(systemctl show "${@/#/--property=}" ${unit:+"$unit"})
}

# Polls COMMAND... for up to 10 s.
eventually() {
    local i
    for ((i = 0; i < 100; i++)); do
        if "$@"; then return 0; fi
        sleep 0.1
    done
    return 1
}

CHECK=pid1
[[ $(cat /proc/1/comm) == systemd ]] || fail "PID 1 is '$(cat /proc/1/comm)', not systemd"
[[ -d /run/systemd/system ]] || fail "no /run/systemd/system: systemd does not run as the system manager"
props "" Version Virtualization
[[ ${P[Virtualization]:-} == container-other ]] ||
    fail "the manager sees virtualization '${P[Virtualization]:-}', not a container"
# In a cgroup namespace of its own: the manager put this service where it would on a host.
[[ $(cat /proc/self/cgroup) == "0::/system.slice/wb-check.service" ]] ||
    fail "this service runs in cgroup '$(cat /proc/self/cgroup)'"
ok "systemd ${P[Version]:-?} is PID 1, ${P[Virtualization]}, unified cgroups"

CHECK=cat
out=$(systemctl cat "$UNIT" writeboost-metrics.service writeboost-metrics.timer 2>&1) ||
    fail "systemctl cat $UNIT writeboost-metrics.service writeboost-metrics.timer: $out"
# One "# PATH" header per file shown, the instance's first.
headers=$(grep '^# /' <<<"$out" | xargs)
[[ $headers == "# /lib/systemd/system/writeboost@.service # /lib/systemd/system/writeboost-metrics.service # /lib/systemd/system/writeboost-metrics.timer" ]] ||
    fail "systemctl cat shows the files '$headers', not the packaged units"
grep -qx 'ExecStart=/usr/sbin/wbctl create %i --config /etc/writeboost/%i.toml --foreground' <<<"$out" ||
    fail "systemctl cat $UNIT has no ExecStart=/usr/sbin/wbctl create: $out"
grep -qx 'Type=notify' <<<"$out" || fail "systemctl cat $UNIT: not Type=notify"
# The manager's own parse of the instance: %i filled in.
props "$UNIT" ExecStart
[[ ${P[ExecStart]} == *"argv[]=/usr/sbin/wbctl create $NAME --config $CONFIG --foreground "* ]] ||
    fail "the manager's ExecStart of $UNIT is '${P[ExecStart]}'"
ok "$(head -1 <<<"$out"), ExecStart=/usr/sbin/wbctl create $NAME --config $CONFIG --foreground"

CHECK=enable
# The README's `systemctl enable`: nothing is enabled by the package; enable and disable work.
# (--no-reload: is-enabled reads the files; a reload of the manager costs seconds here.)
units=("$UNIT" writeboost-metrics.timer)
links=(/etc/systemd/system/multi-user.target.wants/"$UNIT"
    /etc/systemd/system/timers.target.wants/writeboost-metrics.timer)
[[ ! -e ${links[0]} && ! -e ${links[1]} ]] || fail "the package enabled ${units[*]}"
systemctl enable --no-reload "${units[@]}" 2>/dev/null || fail "systemctl enable ${units[*]} failed"
[[ -L ${links[0]} && -L ${links[1]} ]] || fail "systemctl enable did not make ${links[*]}"
enabled=$(systemctl is-enabled "${units[@]}" | xargs || true)
[[ $enabled == "enabled enabled" ]] || fail "after systemctl enable, ${units[*]} are: $enabled"
systemctl disable --no-reload "${units[@]}" 2>/dev/null || fail "systemctl disable ${units[*]} failed"
[[ ! -e ${links[0]} && ! -e ${links[1]} ]] || fail "systemctl disable left ${links[*]}"
ok "${units[*]}: not enabled by the package; enable makes their links (is-enabled: $enabled), disable removes them"

CHECK=start
[[ ! -e $DEV ]] || fail "$DEV exists before the start"
t0=$EPOCHREALTIME
systemctl start "$UNIT" || fail "systemctl start $UNIT: $(systemctl status --no-pager "$UNIT" 2>&1 | head -20)"
secs=$(since "$t0")
# Type=notify: `systemctl start` returns once the unit is active, which it becomes at the
# daemon's READY=1, sent once the device is live: the device must be there now, without waiting.
[[ -b $DEV ]] || fail "systemctl start $UNIT returned but $DEV is not there (READY=1 before the device?)"
props "$UNIT" ActiveState StatusText MainPID
[[ ${P[ActiveState]} == active ]] || fail "$UNIT is '${P[ActiveState]}' after systemctl start"
[[ ${P[StatusText]} == "serving $DEV" ]] || fail "$UNIT's status text is '${P[StatusText]}'"
main_pid=${P[MainPID]}
[[ $(cat "/proc/$main_pid/comm") == wbctl ]] || fail "the main process $main_pid is not wbctl"
ok "active in ${secs} s with $DEV present, status '${P[StatusText]}', main PID $main_pid"

CHECK=io
# A block through the device and back, bypassing the page cache both ways.
head -c 1M /dev/urandom >/tmp/wb-block
dd if=/tmp/wb-block of="$DEV" bs=1M count=1 oflag=direct conv=fsync status=none ||
    fail "dd to $DEV failed"
dd if="$DEV" of=/tmp/wb-back bs=1M count=1 iflag=direct status=none || fail "dd from $DEV failed"
cmp -s /tmp/wb-block /tmp/wb-back || fail "the MiB read back from $DEV differs from the one written"
ok "1 MiB written with O_DIRECT and read back identical"

CHECK=status
status=$(wbctl status "$NAME" 2>&1) || fail "wbctl status $NAME: $status"
grep -q " age_threshold_secs=30\b" <<<"$status" || fail "wbctl status $NAME shows no age_threshold_secs=30: $status"
check=$(wbctl status -x "$NAME" 2>&1) || fail "wbctl status -x $NAME: $check"
ok "wbctl status answers; $check"

CHECK=reload
# The file is the truth on reload: change a knob in it, `systemctl reload` (SIGHUP), and the
# running daemon takes it; same process, device still there.
sed -i 's/^age_threshold_secs = 30$/age_threshold_secs = 45/' "$CONFIG"
grep -q '^age_threshold_secs = 45$' "$CONFIG" || fail "could not edit $CONFIG"
systemctl reload "$UNIT" || fail "systemctl reload $UNIT failed"
props "$UNIT" ActiveState MainPID
[[ ${P[ActiveState]} == active ]] || fail "$UNIT is '${P[ActiveState]}' after reload"
[[ ${P[MainPID]} == "$main_pid" ]] || fail "reload replaced the daemon ($main_pid, now ${P[MainPID]})"
[[ -b $DEV ]] || fail "$DEV went away on reload"
reloaded() { wbctl status "$NAME" 2>/dev/null | grep -q " age_threshold_secs=45\b"; }
eventually reloaded || fail "wbctl status $NAME does not show age_threshold_secs=45 10 s after the reload"
ok "still active, same PID, age_threshold_secs=45 applied"

CHECK=metrics
# The unit as installed, started alone (its default dependencies would pull in sysinit.target,
# which starts the whole host's early boot in this container: not what is checked here). A
# oneshot: `systemctl start` fails if it does; an unmet condition would skip it, and leave no file.
prom=/var/lib/prometheus/node-exporter/writeboost.prom
systemctl start --job-mode=ignore-requirements writeboost-metrics.service ||
    fail "systemctl start writeboost-metrics.service failed"
grep -qx "writeboost_daemon_up{device=\"$NAME\"} 1" "$prom" ||
    fail "$prom has no writeboost_daemon_up{device=\"$NAME\"} 1: $(head -5 "$prom" 2>&1)"
ok "writeboost-metrics.service wrote $prom ($(grep -c '^writeboost_' "$prom") samples)"

CHECK=stop
# Unused, the device is removed at the stop; the daemon exits cleanly (no kill, no failure).
systemctl stop "$UNIT" || fail "systemctl stop $UNIT failed"
props "$UNIT" ActiveState Result ExecMainStatus
[[ ${P[ActiveState]} == inactive ]] || fail "$UNIT is '${P[ActiveState]}' after stop"
[[ ${P[Result]} == success ]] || fail "$UNIT stopped with result '${P[Result]}'"
[[ ${P[ExecMainStatus]} == 0 ]] || fail "the daemon exited with status ${P[ExecMainStatus]}"
eventually test ! -e "$DEV" || fail "$DEV is still there 10 s after the stop"
ok "inactive, result success, exit status 0, $DEV removed"

CHECK=man
page=$(man -w wbctl 2>&1) || fail "man -w wbctl: $page"
[[ $page == /usr/share/man/man8/wbctl.8.gz ]] || fail "man -w wbctl resolves to '$page'"
ok "man -w wbctl: $page"

CHECK=purge
# `apt purge` as on a running system: postrm's daemon-reload reaches the manager, which then
# finds no writeboost unit. (What else the purge must remove, pkg-systemd.sh checks in the
# overlay once systemd is gone; `dpkg -r` alone, keeping the conffile, is pkg-install.sh's on
# the host: every dpkg run reads its whole database, ~15 s under emulation.)
t0=$EPOCHREALTIME
dpkg --purge writeboost >/tmp/dpkg-purge.log 2>&1 ||
    fail "dpkg --purge writeboost: $(tail -5 /tmp/dpkg-purge.log)"
secs=$(since "$t0")
if out=$(systemctl cat "$UNIT" 2>&1); then
    fail "systemctl cat $UNIT still works after dpkg --purge: $out"
fi
props "$UNIT" LoadState
[[ ${P[LoadState]} == not-found ]] || fail "$UNIT is '${P[LoadState]}' after dpkg --purge"
[[ -f $CONFIG ]] || fail "dpkg --purge removed the administrator's $CONFIG"
ok "dpkg --purge in ${secs} s; systemctl cat: '$out'; $CONFIG stays"

echo done >>"$RESULTS"
log "all checks passed"
