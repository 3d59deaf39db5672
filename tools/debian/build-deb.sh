#!/usr/bin/env bash
# Builds the writeboost Debian package from an already built wbctl (`make deb` builds it first):
#   tools/debian/build-deb.sh [--wbctl build/release/wbctl] [--out build/deb]
# Prints the path of the .deb. Plain dpkg-deb (no cargo-deb): every tool it needs comes with
# dpkg-dev, binutils and man-db, Debian packages, so it builds offline and in CI unchanged.
# The man pages and completions come from wbctl's own clap definitions (`wbctl generate-docs`).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WBCTL=$REPO/build/release/wbctl
OUT=$REPO/build/deb

die() { echo "build-deb.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --wbctl) WBCTL=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) die "unknown argument '$1' (usage: build-deb.sh [--wbctl FILE] [--out DIR])" ;;
    esac
done
[[ -x $WBCTL ]] || die "no wbctl at $WBCTL (cargo build --release -p wb-tools --bin wbctl)"
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$tool" >/dev/null || die "'$tool' is missing (dpkg-dev, binutils)"
done

# "wbctl 0.1.0": the package version is the binary's, so the two cannot disagree.
VERSION=$("$WBCTL" --version | awk '{print $2}')
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

# Files are installed with explicit modes: the checkout's umask and modes must not leak in.
put() { install -D -m "$1" "$2" "$ROOT/$3"; }
gz() { gzip -9n <"$1" >"$WORK/gz" && put 0644 "$WORK/gz" "$2"; }

stage_files() {
    local docs=$WORK/docs
    put 0755 "$WBCTL" usr/sbin/wbctl
    # What dh_strip does: the release profile keeps line tables (debug = 1) for backtraces in
    # the tree; an installed binary does not carry them.
    strip --remove-section=.comment --remove-section=.note --strip-unneeded "$ROOT/usr/sbin/wbctl"
    "$WBCTL" generate-docs --out "$docs" >/dev/null
    for page in "$docs"/man/*.8; do gz "$page" "usr/share/man/man8/$(basename "$page").gz"; done
    gz "$HERE/writeboost.toml.5" usr/share/man/man5/writeboost.toml.5.gz
    put 0644 "$docs/completions/wbctl.bash" usr/share/bash-completion/completions/wbctl
    put 0644 "$docs/completions/_wbctl" usr/share/zsh/vendor-completions/_wbctl
    put 0644 "$docs/completions/wbctl.fish" usr/share/fish/vendor_completions.d/wbctl.fish
    local unit
    for unit in writeboost@.service writeboost-metrics.service writeboost-metrics.timer; do
        put 0644 "$REPO/tools/systemd/$unit" "lib/systemd/system/$unit"
    done
    put 0644 "$REPO/tools/systemd/example.toml" etc/writeboost/example.toml
    local f
    for f in writeboost-alerts.yml writeboost-alerts.test.yml writeboost-dashboard.json; do
        put 0644 "$REPO/tools/monitoring/$f" "usr/share/writeboost/$f"
    done
    put 0755 "$REPO/tools/writeboost-mail-hook" usr/share/writeboost/writeboost-mail-hook
    put 0644 "$HERE/copyright" usr/share/doc/writeboost/copyright
    sed -e "s/@VERSION@/$VERSION/" -e "s/@DATE@/$(changelog_date)/" "$HERE/changelog" >"$WORK/cl"
    gz "$WORK/cl" usr/share/doc/writeboost/changelog.gz
}

changelog_date() {
    date -R -u -d "@$SOURCE_DATE_EPOCH"
}

# Depends: from the libraries wbctl links against, as dpkg-shlibdeps sees them (it wants a
# debian/control to exist, so it runs in a scratch folder holding a minimal one).
shlib_depends() {
    mkdir -p "$WORK/shlibs/debian"
    printf 'Source: writeboost\n\nPackage: writeboost\nArchitecture: any\n' \
        >"$WORK/shlibs/debian/control"
    (cd "$WORK/shlibs" && dpkg-shlibdeps -O "$ROOT/usr/sbin/wbctl" 2>/dev/null) |
        sed -n 's/^shlibs:Depends=//p'
}

stage_control() {
    local depends size
    depends=$(shlib_depends)
    [[ -n $depends ]] || die "dpkg-shlibdeps found no dependencies for wbctl"
    size=$(du -sk --apparent-size "$ROOT" | cut -f1)
    mkdir -p "$ROOT/DEBIAN"
    sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$size/" \
        -e "s/@DEPENDS@/$depends/" "$HERE/control.in" >"$ROOT/DEBIAN/control"
    echo /etc/writeboost/example.toml >"$ROOT/DEBIAN/conffiles"
    install -m 0755 "$HERE/postinst" "$HERE/postrm" "$ROOT/DEBIAN/"
    (cd "$ROOT" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' |
        LC_ALL=C sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
    chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles" "$ROOT/DEBIAN/md5sums"
}

umask 022
# dpkg-deb clamps the files' times to this: the same commit gives the same package.
SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
export SOURCE_DATE_EPOCH
stage_files
stage_control
mkdir -p "$OUT"
DEB=$OUT/writeboost_${VERSION}_${ARCH}.deb
# The files belong to root:root in the package whoever builds it.
dpkg-deb --root-owner-group --build -Zxz "$ROOT" "$DEB" >/dev/null
echo "$DEB"
