//! Real-kernel tests: each boots Debian's 6.12 kernel in QEMU through
//! `tests/vm/run.sh` (see tests/vm/README.md and tests/vm/run.sh --help) and
//! runs one script from `tests/vm/scripts/` inside it (glue: `wb_tests::vm`).
//!
//! Setup, build, skip rules and one-VM-at-a-time: see `tests/src/vm.rs`.

use wb_tests::vm::{disk, VmTest};

// The harness's own smoke test (wb-null + fio, `make vm-smoke`) is not repeated here: the bench
// below starts wb-null and measures it in the same boot, and every test here needs the harness.

// ------------------------------------------------------------------------------------------
// writeboost through the real ublk driver (issue 4): wbctl, the daemon, the ublk glue.
// Each test boots one VM with fresh sparse image files under .vm-cache/<test>/ (never /tmp:
// QEMU opens them with cache=none) and runs one script of tests/vm/scripts/ublk-*.sh.

/// `wbctl create` makes /dev/ublkbN with a volatile write cache, FUA, 4 KiB physical blocks and
/// discard; the fio verify jobs (random 4 KiB, mixed sizes with fsync) pass through it; `wbctl
/// status --json` counters move as the workload says (writes, write bytes, hits, misses, dirty
/// bytes falling during `wbctl drain`); `wbctl set` changes knobs (and refuses bad ones);
/// `wbctl delete --drain` leaves the backing device holding exactly what the device held;
/// `wbctl check` then says clean; `create` over the same legs (in the other order) re-attaches.
#[test]
fn vm_ublk_create_verify_status_drain_delete() {
    VmTest {
        test: "vm_ublk_create_verify_status_drain_delete",
        bins: &["wbctl"],
        disks: &[
            disk("backing", "2G", false),
            disk("cache0", "1G", false),
            disk("cache1", "1G", false),
        ],
        script: "tests/vm/scripts/ublk-verify.sh",
        args: &[],
        timeout_secs: 1500,
        pass_line: "ublk-verify: PASS",
    }
    .run();
}

/// mkfs.xfs on the device, a tree of files, umount, `xfs_repair -n` clean; `wbctl delete
/// --drain`; the backing device alone is clean, mounts, and holds the same files.
#[test]
fn vm_ublk_xfs_then_backing_alone() {
    VmTest {
        test: "vm_ublk_xfs_then_backing_alone",
        bins: &["wbctl"],
        disks: &[
            disk("backing", "2G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script: "tests/vm/scripts/ublk-xfs.sh",
        args: &[],
        timeout_secs: 1200,
        pass_line: "ublk-xfs: PASS",
    }
    .run();
}

/// Stop, start and upgrade under a mounted xfs with fio verify writing on it (CONTRACT §6):
/// SIGTERM leaves the in-use device to the kernel, `wbctl create` (the unit's start) and, after
/// a binary installed by rename, `wbctl recover` from the new file take it over; fio sees no
/// error and verifies, `xfs_repair -n` is clean. A `delete` of the mounted device is refused
/// naming the mount; SIGTERM with nobody using the device removes it.
#[test]
fn vm_ublk_stop_start_upgrade_under_mounted_xfs() {
    VmTest {
        test: "vm_ublk_stop_start_upgrade_under_mounted_xfs",
        bins: &["wbctl"],
        disks: &[
            disk("backing", "2G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script: "tests/vm/scripts/ublk-restart.sh",
        args: &[],
        timeout_secs: 1200,
        pass_line: "ublk-restart: PASS",
    }
    .run();
}

/// kill -9 of the daemon during fio (twice: in the write and the verify phase), `wbctl
/// recover` each time: fio carries on without an I/O error and its verify passes; unflushed
/// writes acknowledged just before a kill read back after recovery. (Replacing a leg online is
/// vm_mirror_one_leg_fails_during_fio_verify's.)
#[test]
fn vm_ublk_kill_and_recover_during_fio() {
    VmTest {
        test: "vm_ublk_kill_and_recover_during_fio",
        bins: &["wbctl"],
        disks: &[
            disk("backing", "2G", false),
            disk("cache0", "1G", false),
            disk("cache1", "1G", false),
        ],
        script: "tests/vm/scripts/ublk-recover.sh",
        args: &["2"],
        timeout_secs: 1200,
        pass_line: "ublk-recover: PASS",
    }
    .run();
}

/// CONTRACT §8 through ublk, from one boot: 4 KiB random-write IOPS against the null ublk target
/// (goal ≥ 0.8) and a burst that fits in the cache against the throttled backing device alone
/// (goal ≥ 3×), and fsync'd 4 KiB writes (1 and 8 writers) against the raw cache disk with the
/// leg bytes each cost, and one writer in three side-by-side rounds (goal: median ≥ 0.4×; both
/// cache disks written at once measured in each round too, what a mirror's legs face).
/// Prints the figures; asserts only that they were measured (benchmarks never assert timings).
#[test]
fn vm_ublk_bench_iops_and_burst() {
    let test = "vm_ublk_bench_iops_and_burst";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl", "wb-null"],
        disks: &[
            disk("backing", "2G", true),
            disk("cache0", "4G", false),
            disk("cache1", "4G", false),
        ],
        script: "tests/vm/scripts/ublk-bench.sh",
        args: &["8", "32"],
        timeout_secs: 1500,
        pass_line: "ublk-bench: DONE",
    }
    .run() else {
        return;
    };
    let figures: Vec<&str> = run
        .output
        .lines()
        .filter(|l| {
            [
                "bench: IOPS ratio",
                "bench: burst speed-up",
                "bench: fsync'd",
                "bench: raw cache",
                "bench: round",
            ]
            .iter()
            .any(|f| l.contains(f))
        })
        .collect();
    // The IOPS ratio, the burst, the raw disk, two lines each for 1 and 8 writers, three rounds
    // and their median.
    assert_eq!(
        figures.len(),
        11,
        "{test}: missing figures in the VM output"
    );
    for f in figures {
        let at = f.find("bench:").unwrap_or(0);
        println!("{test}: {}", &f[at..]);
    }
}

/// Who may use a device's files (issue 16), under the most careless umask: the run folder is
/// root's 0700, the RAM buffer, state, lock and log files and the control socket 0600;
/// `runuser -u nobody` can neither read the buffer file (which holds the written block) nor
/// talk to the daemon, and where a chmod lets it reach the socket the daemon refuses the
/// connection (SO_PEERCRED); root still can.
#[test]
fn vm_ublk_security_nobody_is_locked_out() {
    VmTest {
        test: "vm_ublk_security_nobody_is_locked_out",
        bins: &["wbctl"],
        disks: &[
            disk("backing", "256M", false),
            disk("cache0", "64M", false),
            disk("cache1", "64M", false),
        ],
        script: "tests/vm/scripts/ublk-security.sh",
        args: &[],
        timeout_secs: 600,
        pass_line: "ublk-security: PASS",
    }
    .run();
}
