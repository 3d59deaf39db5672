#!/usr/bin/env bash
# Daemon crash recovery through the real ublk driver (CONTRACT §2): kill -9 the daemon while fio
# writes (and later while it verifies), `wbctl recover NAME` takes the device over (ublk user
# recovery, in-flight I/O re-issued), and fio carries on without an I/O error; its verify pass
# then proves that no acknowledged write was lost, flushed or not.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 2G backing.img; truncate -s 1G cache0.img cache1.img
#   tests/vm/run.sh --disk backing.img --disk cache0.img --disk cache1.img \
#       tests/vm/scripts/ublk-recover.sh [KILLS]
#
# (Replacing a leg online is mirror-one-leg.sh's: it drains the cache first, which on this
# script's dirty cache took a minute and a half of the suite's time budget.)
#
# KILLS (default 2): how many times the daemon is killed during the run.
# Prints "ublk-recover: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
KILLS="${1:-2}"
BACKING="$(disk 0)" CACHE0="$(disk 1)" CACHE1="$(disk 2)"

dev="$(wb_create r0 --backing "$BACKING" --cache "$CACHE0" --cache "$CACHE1")"
log "wbctl create r0 -> $dev"

# Random 4 KiB writes over 128 MiB with an fsync every 64 writes (so acknowledged writes are
# both flushed and not), then a full read-back verify.
out="$WB_OUT/recover-fio.log"
fio --name=crash-verify --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite \
    --bs=4k --iodepth=32 --size=128M --randrepeat=0 --fsync=64 --verify=crc32c \
    --do_verify=1 --verify_fatal=1 --eta=never >"$out" 2>&1 &
fio_pid=$!
on_exit "kill $fio_pid 2>/dev/null || true"

recovered=0
for ((k = 1; k <= KILLS; k++)); do
    sleep $((k == 1 ? 6 : 8))
    kill -0 "$fio_pid" 2>/dev/null || {
        log "fio finished before kill $k"
        break
    }
    pid="$(wb_pid r0)"
    before="$(wb_field r0 writes)"
    log "kill $k: kill -9 daemon pid $pid (writes so far: $before)"
    kill -9 "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    ! kill -0 "$pid" 2>/dev/null || fail "daemon $pid survived kill -9"
    # fio's I/O is now held by the kernel (device quiesced), not failed.
    sleep 1
    kill -0 "$fio_pid" 2>/dev/null || {
        cat "$out" >&2
        fail "fio exited while the daemon was down"
    }
    "$WBCTL" list
    if "$WBCTL" status r0 --json >/dev/null 2>&1; then fail "status answered without a daemon"; fi
    t0=$EPOCHREALTIME
    dev_again="$("$WBCTL" recover r0)" || fail "wbctl recover r0 failed"
    log "recovered in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}') s: $dev_again (new pid $(wb_pid r0))"
    [[ "$dev_again" == "$dev" ]] || fail "recover made $dev_again, expected the same $dev"
    [[ "$(wb_field r0 mode)" == mirrored ]] || fail "mode after recovery: $(wb_field r0 mode)"
    recovered=$((recovered + 1))
done
((recovered >= 1)) || fail "fio finished before the daemon could be killed; make the job longer"

if ! wait "$fio_pid"; then
    cat "$out" >&2
    fail "fio failed after $recovered recoveries"
fi
if grep -E "err= *[1-9]|verify: bad|verify failed|Input/output error|error=" "$out" >&2; then
    fail "fio reported errors after $recovered recoveries (log $out)"
fi
grep -E "^ +(write|read):" "$out" || true
log "fio passed its verify after $recovered kill -9 + recover cycles"
"$WBCTL" status r0

# A kill -9 with no I/O in flight, right after unflushed writes were acknowledged: recover,
# and a verify-only pass of the same job (same seeds: randrepeat) reads every one of them back.
last=(--name=last-writes --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k
    --iodepth=16 --size=16M --offset=128M --randrepeat=1 --verify=crc32c --verify_state_save=0
    --eta=never)
fio "${last[@]}" --do_verify=0 >/dev/null || fail "last-writes fio failed"
kill -9 "$(wb_pid r0)"
sleep 1
"$WBCTL" recover r0 >/dev/null || fail "second-phase recover failed"
fio "${last[@]}" --verify_only=1 --verify_fatal=1 >"$WB_OUT/last-writes-verify.log" 2>&1 || {
    cat "$WB_OUT/last-writes-verify.log" >&2
    fail "unflushed writes acknowledged before kill -9 did not read back"
}
log "16 MiB of unflushed writes read back after kill -9 + recover"

"$WBCTL" delete r0 || fail "wbctl delete failed"
wb_no_kernel_io_errors
log "ublk-recover: PASS"
