#!/usr/bin/env bash
# Who may use a writeboost device's files, on a real kernel: created under the most careless
# umask (0000), the run folder is root's 0700 and the RAM buffer, state, lock and log files and
# the control socket are 0600; `runuser -u nobody` can neither read the buffer file (which holds
# the device's unflushed data) nor talk to the daemon, while root can. Where a careless chmod
# lets nobody reach the socket, the daemon refuses the connection (SO_PEERCRED).
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 256M backing.img; truncate -s 64M cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-security.sh
#
# Prints "ublk-security: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"
RUN="$WRITEBOOST_RUN_DIR"

as_nobody() {
    runuser -u nobody -- "$@"
}

# The mode, owner and type of PATH match the pattern WANT ("%a %U %F" of stat).
expect_stat() {
    local path="$1" want="$2" got
    got="$(stat -c '%a %U %F' "$path")" || fail "$path: missing"
    # shellcheck disable=SC2053 # WANT is a pattern
    [[ "$got" == $want ]] || fail "$path: '$got', expected '$want'"
    log "$path: $got"
}

umask 0000
dev="$(wb_create s0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")"
log "wbctl create s0 -> $dev (umask 0000)"

# Data a user must not read: in the RAM buffer before it reaches the cache legs.
printf 'writeboost-secret-%06d\n' $(seq 1 200) >/tmp/secret # 5000 bytes: one block is used
dd if=/tmp/secret of="$dev" bs=4096 count=1 oflag=direct status=none
grep -q writeboost-secret "$RUN/s0.buf" || fail "the written block is not in $RUN/s0.buf"

expect_stat "$RUN" "700 root directory"
for f in s0.buf s0.json s0.lock s0.log; do
    expect_stat "$RUN/$f" "600 root regular*file" # "regular empty file" for the lock
done
expect_stat "$RUN/s0.sock" "600 root socket"

# nobody: no buffer, no listing, no socket.
if as_nobody cat "$RUN/s0.buf" >/dev/null 2>&1; then
    fail "nobody read the RAM buffer file"
fi
if as_nobody ls "$RUN" >/dev/null 2>&1; then
    fail "nobody listed $RUN"
fi
if out="$(as_nobody "$WBCTL" status s0 2>&1)"; then
    fail "nobody got the status of s0: $out"
fi
log "nobody: wbctl status s0: $out"
"$WBCTL" status s0 >/dev/null || fail "root cannot get the status of s0"

# A careless chmod lets nobody reach the socket: the daemon still refuses the connection.
chmod 755 "$RUN"
chmod 666 "$RUN/s0.sock"
for args in "status s0" "delete s0 --force" "set s0 low_watermark=0.5"; do
    # shellcheck disable=SC2086 # word splitting of $args is meant
    if out="$(as_nobody "$WBCTL" $args 2>&1)"; then
        fail "nobody: wbctl $args succeeded: $out"
    fi
    [[ "$out" == *"only root may control writeboost devices"*"uid 65534"* ]] ||
        fail "nobody: wbctl $args: '$out' is not the daemon's refusal"
done
log "nobody through a 0666 socket: $out"
chmod 600 "$RUN/s0.sock"
chmod 700 "$RUN"
[[ "$(wb_field s0 mode)" == mirrored ]] || fail "s0 is $(wb_field s0 mode) after nobody's attempts"

"$WBCTL" delete s0 || fail "wbctl delete s0 failed"
log "ublk-security: PASS"
