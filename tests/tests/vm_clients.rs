//! Real-kernel tests of the clients writeboost is for (issue 13): the README's iSCSI LUN (LIO +
//! open-iscsi) and SMB share (Samba + cifs) recipes, run inside the VM on its own loopback, with
//! a daemon crash under each. Each boots Debian's 6.12 kernel in QEMU through
//! `tests/vm/run.sh` and runs one `tests/vm/scripts/client-*.sh` (glue: `wb_tests::vm`; the
//! packages come from `tests/vm/setup.sh`).

use wb_tests::vm::{disk, echo_lines_with, lines_with, run_folder, VmTest};

/// writeboost → LIO block backstore → iSCSI login over 127.0.0.1 → /dev/sdX: fio verify
/// (random 4 KiB, mixed sizes with fsync) passes; each fsync of /dev/sdX arrives as a FLUSH
/// (`flushes` rises by at least the number of syncs); kill -9 of the daemon during fio over
/// iSCSI + `wbctl recover`: no error at the initiator, verify passes, no I/O or connection error
/// in the kernel log; xfs on the LUN with a file tree is `xfs_repair -n` clean and reads back;
/// after logout, the LIO config's removal and `wbctl delete --drain` the backing device alone
/// mounts and holds the same files.
#[test]
fn vm_client_iscsi_lun_verify_flush_crash_drain() {
    let test = "vm_client_iscsi_lun_verify_flush_crash_drain";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "1G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script: "tests/vm/scripts/client-iscsi.sh",
        args: &["8"],
        timeout_secs: 900,
        pass_line: "client-iscsi: PASS",
    }
    .run() else {
        return;
    };
    echo_lines_with(test, &run.output, &["flushes ", "logged in:", "recovered:"]);
}

/// xfs on /dev/ublkbN shared by smbd (minimal smb.conf, `strict sync = yes`) and mounted with
/// `mount.cifs //127.0.0.1/share`: a tree copied onto the share with an fsync per file brings at
/// least one FLUSH per file to writeboost and reads back the same through the share and on the
/// server's xfs; kill -9 of the daemon during a second copy + `wbctl recover`: the copy finishes
/// and its checksums match; `xfs_repair -n` clean, and after `wbctl delete --drain` the backing
/// device alone holds both copies.
#[test]
fn vm_client_smb_share_copy_crash_drain() {
    let test = "vm_client_smb_share_copy_crash_drain";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "1G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script: "tests/vm/scripts/client-smb.sh",
        args: &["3"],
        timeout_secs: 900,
        pass_line: "client-smb: PASS",
    }
    .run() else {
        return;
    };
    echo_lines_with(test, &run.output, &["source tree:", "copy1:", "recovered:"]);
}

/// Crash through the whole stack: xfs on the iSCSI LUN (the first test's setup) in front of a
/// slow (throttled) backing disk, writeback always on (`--low-watermark 0`); a writer creates
/// files of random content, fsyncs each file and its folder and only then journals its sha256
/// (on the host), unsynced data is written beside it, and with writeback mid-way (data dirty in
/// the cache, some written back) the guest powers off at once (`echo o >
/// /proc/sysrq-trigger`: no sync, no unmount, the RAM buffer in /run lost). Second boot on the
/// same images: (a) the backing device alone (through a dm-snapshot) mounts with xfs log
/// recovery and `xfs_repair -n` is clean — a consistent older disk; (b) `wbctl create` with the
/// same devices re-attaches the cache, /dev/ublkbN mounts and EVERY journaled (synced) file is
/// there with its content; `xfs_repair -n` clean.
#[test]
fn vm_client_iscsi_power_cut_mid_writeback() {
    let test = "vm_client_iscsi_power_cut_mid_writeback";
    let script = "tests/vm/scripts/client-powercut.sh";
    let Some(cut) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "1G", true),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script,
        args: &["cut", "25"],
        timeout_secs: 900,
        pass_line: "client-powercut: power cut now",
    }
    .run_until_power_cut() else {
        return;
    };
    let boot1 = run_folder(test, &cut.output);
    let journal = std::fs::read_to_string(boot1.join("journal.sha256"))
        .unwrap_or_else(|e| panic!("{test}: no journal in {}: {e}", boot1.display()));
    assert!(
        journal.lines().count() > 0,
        "{test}: the journal of synced files is empty"
    );
    lines_with(test, &cut.output, "files synced and journaled");
    let boot1 = boot1.to_str().expect("a UTF-8 run folder").to_string();
    let Some(check) = VmTest {
        test,
        bins: &["wbctl"],
        // The same images; the backing disk unthrottled: nothing is timed in this boot.
        disks: &[
            disk("backing", "1G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        script,
        args: &["check", &boot1],
        timeout_secs: 900,
        pass_line: "client-powercut: PASS",
    }
    .run_again() else {
        return;
    };
    echo_lines_with(
        test,
        &format!("{}{}", cut.output, check.output),
        &[
            "files synced and journaled",
            "backing device alone:",
            "synced files are there",
        ],
    );
}
