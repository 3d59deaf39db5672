# tests/vm/scripts/pkg-lib.sh — the .deb checks that pkg-install.sh (on the host, in a throwaway
# overlay of its root) and pkg-systemd.sh (in the VM, under a real systemd) share: what a purge
# must leave. Source it; the caller defines `log` and `fail`, and sets
#   R   the root the package is installed in, as seen from here ("" when it is /).

# CMD... run in that root, with a clean environment (what dpkg and its maintainer scripts see
# when an administrator runs them).
in_root() {
    if [[ -z $R ]]; then
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
    else
        chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
    fi
}

# What was written into the root, as paths relative to it: the files, links and whiteouts in the
# overlay's upper folder UP, less dpkg's and man-db's own records, /tmp, and what matches the
# extended regex IGNORE (the caller's own files, e.g. a service manager's state).
pkg_leftovers() {
    local up=$1 ignore=${2:-}
    (cd "$up" && find . \( -type f -o -type l -o -type c \) -printf '%P\n') |
        grep -v -E '^(var/lib/dpkg/|var/log/|var/cache/(man|debconf)/|tmp/)' |
        { if [[ -n $ignore ]]; then grep -v -E "$ignore"; else cat; fi; } | sort || true
}

# After `dpkg --purge writeboost`: nothing the package or its programs wrote is left in the root
# but the administrator's configuration CONFIG (a path relative to the root), and dpkg has
# forgotten the package. UP and IGNORE as for pkg_leftovers.
pkg_check_purged() {
    local up=$1 config=$2 ignore=${3:-} left
    left=$(pkg_leftovers "$up" "$ignore")
    log "after purge: $(echo "$left" | xargs)"
    [[ $left == "$config" ]] || fail "purge left more than the config $config: $(echo "$left" | xargs)"
    if in_root dpkg -s writeboost >/dev/null 2>&1; then
        fail "dpkg still knows writeboost after the purge"
    fi
}
