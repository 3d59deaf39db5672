#!/usr/bin/env bash
# SSD health of NVMe cache legs (issue 15) on QEMU's emulated NVMe controller, which answers
# the Get Log Page admin command with a real SMART / Health Information page. Two controllers:
# wbnvme0 as shipped, wbnvme1 started with smart_critical_warning=4 ("reliability degraded").
# A mirrored device over the two; then:
#   - `wbctl status NAME --json`: each leg's "ssd_health" has source "nvme" and what QEMU
#     serves (see the expectations below), the warned leg's critical_warning 4;
#   - the table has an "ssd nvme ..." line per leg;
#   - `wbctl status -x NAME` is WARNING (exit 1), naming the warned leg and no other;
#   - `wbctl metrics NAME` has the wear, spare, threshold, media error and critical warning
#     samples of the legs.
#
#   cargo build --release -p wb-tools --bin wbctl
#   truncate -s 256M backing.img; truncate -s 64M nvme0.img nvme1.img
#   tests/vm/run.sh --disk backing.img --disk nvme0.img:nvme \
#       --disk nvme1.img:nvme,smart_critical_warning=4 tests/vm/scripts/ssd-health.sh
#
# Prints "ssd-health: PASS" at the end.
set -euo pipefail
source "$(dirname "$0")/../guest-lib.sh"
source "$(dirname "$0")/ublk-lib.sh"
need_vm
need_ublk
need_module nvme
read -r -a DISKS <<<"$WB_DISKS"
for d in "${DISKS[1]}" "${DISKS[2]}"; do
    wait_for_blockdev "$d" 30
done
BACKING="$(disk 0)"

# The namespace of the controller with serial SERIAL (the kernel numbers controllers in probe
# order, which is usually but not surely the order of the -device options).
namespace_of() {
    local ns
    for ns in /sys/block/nvme*n1; do
        if [[ "$(tr -d ' ' <"$ns/device/serial")" == "$1" ]]; then
            echo "/dev/$(basename "$ns")"
            return
        fi
    done
    fail "no NVMe namespace with serial $1"
}
CLEAN="$(namespace_of wbnvme0)"
WARNED="$(namespace_of wbnvme1)"
log "NVMe legs: $CLEAN (serial wbnvme0), $WARNED (serial wbnvme1, smart_critical_warning=4)"

dev="$(wb_create h0 --backing "$BACKING" --cache "$CLEAN" --cache "$WARNED")"
on_exit "_wb_cleanup h0" # (wb_create's own registration is lost in the $(...) subshell)
log "wbctl create h0 -> $dev"
# Some data through the log, so that both namespaces have data units written.
dd if=/dev/urandom of="$dev" bs=1M count=1 oflag=direct conv=fsync status=none

# What QEMU 7.2's controller serves (hw/nvme/ctrl.c, nvme_smart_info): the critical warning
# byte is the smart_critical_warning property; the composite temperature is its constant
# 323 K (50 °C); data units and commands come from the block layer's accounting; power-on
# hours count from the controller's start (0 in a short VM); available spare, its threshold,
# percentage used and media errors are never set: 0.
check_legs="$(
    cat <<'PY'
import json, sys
clean, warned = sys.argv[1:3]
legs = {l["path"]: l for l in json.load(sys.stdin)["devices"][0]["legs"]}
assert set(legs) == {clean, warned}, legs
for path, want_cw in ((clean, 0), (warned, 4)):
    h = legs[path]["ssd_health"]
    print("ssd-health: leg %s: %s" % (path, json.dumps(h, sort_keys=True)))
    assert legs[path]["health"] == "ok", legs[path]
    assert h["source"] == "nvme" and h["device"] == path and h["reason"] is None, h
    assert h["critical_warning"] == want_cw, h
    assert (h["percentage_used"], h["available_spare"], h["available_spare_threshold"],
            h["media_errors"]) == (0, 0, 0, 0), h
    assert h["temperature_celsius"] == 50, h
    assert h["power_on_hours"] == 0, h
    assert h["data_units_written"] >= 1, h
    assert h["smart_passed"] is None and h["reallocated_sectors"] is None, h
PY
)"
status="$("$WBCTL" status h0 --json)" || fail "wbctl status h0 --json failed"
python3 -c "$check_legs" "$CLEAN" "$WARNED" <<<"$status" ||
    fail "the legs' SSD health is not what QEMU serves: $status"

table="$("$WBCTL" status h0)" || fail "wbctl status h0 failed"
grep -F "ssd nvme $CLEAN: 0 % used, spare 0 % (threshold 0 %), 0 media errors, no critical warning" <<<"$table" ||
    fail "no SSD line for $CLEAN in the table: $table"
grep -F "ssd nvme $WARNED: 0 % used, spare 0 % (threshold 0 %), 0 media errors, CRITICAL WARNING 0x04 (reliability degraded)" <<<"$table" ||
    fail "no SSD line for $WARNED in the table: $table"

rc=0
check="$("$WBCTL" status -x h0)" || rc=$?
log "wbctl status -x h0 (exit $rc): $check"
[[ $rc -eq 1 ]] || fail "status -x exited $rc, not 1 (WARNING)"
grep -F "h0: WARNING - cache leg $WARNED SSD: critical warning 0x04 (reliability degraded)" <<<"$check" ||
    fail "status -x does not name the warned leg"
if grep -F "$CLEAN" <<<"$check"; then fail "status -x names the clean leg"; fi

metrics="$("$WBCTL" metrics h0)" || fail "wbctl metrics h0 failed"
wants=(
    "writeboost_leg_wear_ratio{device=\"h0\",leg=\"$CLEAN\"} 0.0"
    "writeboost_leg_wear_ratio{device=\"h0\",leg=\"$WARNED\"} 0.0"
    "writeboost_leg_available_spare_ratio{device=\"h0\",leg=\"$CLEAN\"} 0.0"
    "writeboost_leg_available_spare_threshold_ratio{device=\"h0\",leg=\"$CLEAN\"} 0.0"
    "writeboost_leg_media_errors_total{device=\"h0\",leg=\"$CLEAN\"} 0"
    "writeboost_leg_critical_warning{device=\"h0\",leg=\"$CLEAN\"} 0"
    "writeboost_leg_critical_warning{device=\"h0\",leg=\"$WARNED\"} 4"
    "writeboost_leg_temperature_celsius{device=\"h0\",leg=\"$CLEAN\"} 50.0"
)
# One grep for all (each exec costs under emulation); every wanted line must be there.
found="$(grep -xF -f <(printf '%s\n' "${wants[@]}") <<<"$metrics" || true)"
sed 's/^/ssd-health: metrics: /' <<<"$found"
[[ $(grep -c . <<<"$found") -eq ${#wants[@]} ]] ||
    fail "wbctl metrics lacks some of: $(printf '\n  %s' "${wants[@]}")"$'\n'"in: $metrics"
# (promtool check metrics on this exposition runs on the host: tools/tests/monitoring.rs, with
# SSD health of both kinds; starting it here costs ~20 s under emulation.)

# A one-leg set on the clean SSD: its mode is "single", and its metrics pass promtool (the other
# modes' are checked in mirror-one-leg.sh and mirror-both-fail.sh).
"$WBCTL" delete h0 || fail "wbctl delete h0 failed"
wb_create h1 --backing "$BACKING" --cache "$CLEAN" --single-leg --force >/dev/null
wb_metrics_check h1 single
"$WBCTL" delete h1 || fail "wbctl delete h1 failed"
echo "ssd-health: PASS"
