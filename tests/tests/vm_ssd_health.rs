//! SSD health of the cache legs in the VM (issue 15): QEMU's emulated NVMe controller serves a
//! real SMART / Health log page, which `wbctl` reads through the NVMe admin ioctl. Glue:
//! `wb_tests::vm` (setup, build, skip rules, one VM at a time).

use wb_tests::vm::{disk, echo_lines_with, lines_with, nvme_disk, VmTest};

/// A mirrored device over two emulated NVMe namespaces, one of whose controllers reports
/// critical warning 0x04: `status --json` shows each leg's health with source "nvme" and what
/// QEMU serves (0 % used, spare and threshold 0, no media errors, 50 °C, the warning byte),
/// the table has an SSD line per leg, `status -x` is a WARNING naming the warned leg, and
/// `wbctl metrics` has the wear, spare, threshold, media error and warning gauges of the legs.
#[test]
fn vm_ssd_health_of_nvme_legs() {
    let test = "vm_ssd_health_of_nvme_legs";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "256M", false),
            nvme_disk("nvme0", "64M", ""),
            nvme_disk("nvme1", "64M", ",smart_critical_warning=4"),
        ],
        script: "tests/vm/scripts/ssd-health.sh",
        args: &[],
        timeout_secs: 600,
        pass_line: "ssd-health: PASS",
    }
    .run() else {
        return;
    };
    // The script asserts the values; here, that each leg's health and the verdict were shown.
    assert_eq!(lines_with(test, &run.output, "ssd-health: leg ").len(), 2);
    assert_eq!(
        lines_with(test, &run.output, "ssd-health: metrics: ").len(),
        8
    );
    lines_with(test, &run.output, "h0: WARNING - cache leg ");
    echo_lines_with(
        test,
        &run.output,
        &[
            "ssd-health: leg ",
            "ssd nvme ",
            "status -x h0",
            "ssd-health: metrics: ",
        ],
    );
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}
