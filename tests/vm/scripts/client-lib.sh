# tests/vm/scripts/client-lib.sh — helpers for the client tests in the VM (client-*.sh: an
# iSCSI LUN and an SMB share on a writeboost device). Source it after guest-lib.sh and
# ublk-lib.sh.
#
# Functions:
#   make_tree DIR SEED DIRS FILES BIG_MIB   a tree of files under DIR: DIRS folders of FILES
#                        files each (sizes 0..200 KB; every 10th 1..BIG_MIB MiB), some fsynced,
#                        some rewritten, some deleted, one symlink; deterministic for a SEED
#   tree_sums DIR OUT    sha256sum of every file under DIR (sorted, relative paths) into OUT
#   check_sums DIR SUMS WHAT   fail unless the files under DIR match SUMS (and no file is missing)
#   scaled_job JOB MIB OUT     fio-jobs/JOB.fio with its size= set to MIB MiB, written to OUT
#   client_fio DEV JOBFILE [ARGS]   DEV=DEV fio JOBFILE ARGS (log in $WB_OUT); fails on a
#                        non-zero exit or any error line
#   no_kernel_errors_on DEV...   fail if the kernel logged an I/O error on one of the DEVs
#                        (sdX, ublkbN: bare names) or the iSCSI initiator a connection error

make_tree() {
    python3 - "$@" <<'PY'
import os, random, sys
root, seed, dirs, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
for d in range(dirs):
    sub = os.path.join(root, f"dir{d:02}", f"sub{d % 3}")
    os.makedirs(sub, exist_ok=True)
    for f in range(files):
        size = rng.choice([0, 100, 4096, 5000, 65536, 200_000]) if f % 10 else rng.randint(1, big) << 20
        with open(os.path.join(sub, f"file{f:03}.bin"), "wb") as fh:
            fh.write(rng.randbytes(size))
            if f % 17 == 0:
                fh.flush()
                os.fsync(fh.fileno())
for d in range(0, dirs, 3):  # rewrite some, delete some
    sub = os.path.join(root, f"dir{d:02}", f"sub{d % 3}")
    for f in range(0, files, 7):
        with open(os.path.join(sub, f"file{f:03}.bin"), "r+b") as fh:
            fh.seek(rng.randint(0, 4096))
            fh.write(rng.randbytes(8192))
    for f in range(3, files, 11):
        os.unlink(os.path.join(sub, f"file{f:03}.bin"))
os.symlink("dir00", os.path.join(root, "link"))
PY
}

tree_sums() {
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$2"
}

check_sums() {
    local dir="$1" sums="$2" what="$3" now
    (cd "$dir" && sha256sum --quiet -c "$sums") || fail "files differ: $what"
    now="$(cd "$dir" && find . -type f | wc -l)"
    [[ "$now" -eq "$(wc -l <"$sums")" ]] || fail "$what: $now files, expected $(wc -l <"$sums")"
}

scaled_job() {
    awk -v mib="$2" -F= '$1 == "size" { $0 = "size=" mib "M" } 1' "fio-jobs/$1.fio" >"$3"
    grep -q "^size=$2M$" "$3" || fail "could not size fio-jobs/$1.fio to $2 MiB"
}

client_fio() {
    local dev="$1" job="$2"
    shift 2
    local out
    out="$WB_OUT/$(basename "$dev").$(basename "$job" .fio).log"
    log "fio $(basename "$job") on $dev $*"
    if ! DEV="$dev" fio --eta=never "$job" "$@" >"$out" 2>&1; then
        tail -30 "$out" >&2
        fail "fio $(basename "$job") on $dev failed (log $out)"
    fi
    if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error" "$out" >&2; then
        fail "fio $(basename "$job") on $dev reported errors (log $out)"
    fi
    grep -E "^ +(write|read):" "$out" | sed 's/^ */  /' || true
}

no_kernel_errors_on() {
    local d pat="detected conn error"
    for d in "$@"; do
        pat+="|I/O error.* $d|Buffer I/O error on dev $d|\\[$d\\].*FAILED|$d.*critical"
    done
    if dmesg | grep -E "$pat" >&2; then
        fail "the kernel logged errors on $* (see above)"
    fi
}

# copy_tree_fsync SRC DST PROGRESS   copy the files under SRC to DST one by one (folders
# too, symlinks not: an SMB3 mount without unix extensions or mfsymlinks cannot make them),
# each file fsynced before the next (what an SMB client's write-through or a careful copier
# does); the number of files done so far is kept in PROGRESS.
copy_tree_fsync() {
    python3 - "$@" <<'PY'
import os, shutil, sys
src, dst, progress = sys.argv[1:4]
done = 0
for top, dirs, files in os.walk(src):
    rel = os.path.relpath(top, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for name in sorted(files):
        s, d = os.path.join(top, name), os.path.join(dst, rel, name)
        if os.path.islink(s):
            continue
        with open(s, "rb") as fi, open(d, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        done += 1
        with open(progress + ".tmp", "w") as p:
            p.write(str(done))
        os.replace(progress + ".tmp", progress)
PY
}
