//! Real-kernel tests: each boots Debian's 6.12 kernel in QEMU through
//! `tests/vm/run.sh` (see /work/shared/VM.md and tests/vm/run.sh --help) and
//! runs one script from `tests/vm/scripts/` inside it.
//!
//! Each test, before booting:
//! 1. runs `tests/vm/setup.sh` (installs packages, fetches the kernel, builds
//!    the initramfs; a no-op once done);
//! 2. runs `cargo build --release` for the binaries the guest script needs
//!    (a no-op when `make test` / `cargo build --release --workspace` already
//!    built them): the guest sees the host tree read-only and runs
//!    `build/release/*` from it.
//!
//! A test is SKIPPED (loud message, returns without failing) only when it
//! cannot run at all: not root, or `qemu-system-x86_64` missing even after
//! setup. VM tests never run in parallel: each VM takes both cores
//! (`VM_LOCK`, and run.sh's own machine-wide lock).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static VM_LOCK: Mutex<()> = Mutex::new(());

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn skip(test: &str, why: &str) {
    let msg = format!("SKIPPED {test}: {why}");
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! {msg}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    println!("{msg}");
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .is_some_and(|euid| euid == "0")
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Setup and build; `Err(reason)` means the test must be skipped.
fn prepare(test: &str, bins: &[&str]) -> Result<(), String> {
    if !is_root() {
        return Err("not root (the VM harness installs packages and boots QEMU as root)".into());
    }
    let root = repo_root();
    let setup = Command::new("bash")
        .arg(root.join("tests/vm/setup.sh"))
        .status()
        .expect("running tests/vm/setup.sh");
    if !have("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 is missing even after tests/vm/setup.sh".into());
    }
    assert!(setup.success(), "{test}: tests/vm/setup.sh failed: {setup}");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .args(["build", "--release", "-p", "wb-tools"]);
    for b in bins {
        build.args(["--bin", b]);
    }
    let t = Instant::now();
    let st = build.status().expect("running cargo build --release");
    assert!(
        st.success(),
        "{test}: cargo build --release of {bins:?} failed: {st}"
    );
    eprintln!(
        "{test}: release build of {bins:?} ready in {:.1?}",
        t.elapsed()
    );
    Ok(())
}

/// Where the release binaries are (what the guest runs), handed to the guest
/// as WB_BIN_DIR when Cargo's target dir is not the default `build/`.
fn bin_dir() -> Option<PathBuf> {
    std::env::var_os("CARGO_TARGET_DIR").map(|d| {
        let d = PathBuf::from(d);
        let d = if d.is_absolute() {
            d
        } else {
            repo_root().join(d)
        };
        d.join("release")
    })
}

struct VmRun {
    status: Option<i32>,
    output: String,
    wall: Duration,
}

/// `tests/vm/run.sh ARGS...`, echoing the guest console line by line.
fn run_vm(args: &[&str]) -> VmRun {
    let root = repo_root();
    let t = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.current_dir(&root)
        .arg(root.join("tests/vm/run.sh"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = bin_dir() {
        cmd.env("WB_BIN_DIR", d);
    }
    let mut child = cmd.spawn().expect("spawning tests/vm/run.sh");
    let stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut output = String::new();
    for line in BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait().expect("waiting for run.sh").code();
    output.push_str(&err_thread.join().unwrap_or_default());
    VmRun {
        status,
        output,
        wall: t.elapsed(),
    }
}

fn explain(status: Option<i32>) -> &'static str {
    match status {
        Some(0) => "passed",
        Some(250) => "harness error (see run.sh: ERROR above)",
        Some(251) => "the guest never reported a status (crash/panic)",
        Some(252) => "timeout: the VM was killed",
        None => "run.sh killed by a signal",
        _ => "the guest script failed",
    }
}

/// The harness end to end: ublk_drv loads, wb-null serves a device, fio
/// writes through it at some rate, the device goes away again.
#[test]
fn vm_null_target_smoke() {
    let test = "vm_null_target_smoke";
    let _guard = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(why) = prepare(test, &["wb-null"]) {
        return skip(test, &why);
    }
    let run = run_vm(&["--timeout", "600", "tests/vm/scripts/null-smoke.sh", "10"]);
    eprintln!("{test}: VM wall time {:.1?}", run.wall);
    assert_eq!(
        run.status,
        Some(0),
        "{test}: {} (exit {:?})",
        explain(run.status),
        run.status
    );
    let iops: u64 = run
        .output
        .lines()
        .find_map(|l| l.split("IOPS=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{test}: no 'IOPS=<n>' line in the VM output"));
    assert!(iops > 0, "{test}: zero IOPS");
    assert!(
        run.output.contains("null-smoke: PASS"),
        "{test}: no PASS line"
    );
    println!(
        "{test}: null ublk target in the VM: {iops} IOPS (4 KiB randwrite, QD32); VM wall time {:.1}s",
        run.wall.as_secs_f64()
    );
}

// ------------------------------------------------------------------------------------------
// writeboost through the real ublk driver (issue 4): wbctl, the daemon, the ublk glue.
// Each test boots one VM with fresh sparse image files under .vm-cache/<test>/ (never /tmp:
// QEMU opens them with cache=none) and runs one script of tests/vm/scripts/ublk-*.sh.

/// A disk for `run_wb_vm`: image name, size (truncate syntax), throttled like an HDD or not.
struct Disk {
    name: &'static str,
    size: &'static str,
    throttle: bool,
}

const fn disk(name: &'static str, size: &'static str, throttle: bool) -> Disk {
    Disk {
        name,
        size,
        throttle,
    }
}

/// Builds `bins`, makes the images, boots the VM on `script ARGS`, and checks it exited 0 and
/// printed `pass_line`. Returns the run (for figures), or `None` when the test was skipped.
fn run_wb_vm(
    test: &str,
    bins: &[&str],
    disks: &[Disk],
    script: &str,
    args: &[&str],
    timeout_secs: u32,
    pass_line: &str,
) -> Option<VmRun> {
    let _guard = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(why) = prepare(test, bins) {
        skip(test, &why);
        return None;
    }
    let dir = repo_root().join(".vm-cache").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the image folder");
    let mut vm_args: Vec<String> = vec!["--timeout".into(), timeout_secs.to_string()];
    for d in disks {
        let path = dir.join(format!("{}.img", d.name));
        let st = Command::new("truncate")
            .args(["-s", d.size])
            .arg(&path)
            .status()
            .expect("running truncate");
        assert!(
            st.success(),
            "{test}: truncate -s {} {}",
            d.size,
            path.display()
        );
        vm_args.push("--disk".into());
        vm_args.push(format!(
            "{}{}",
            path.display(),
            if d.throttle { ":throttle" } else { "" }
        ));
    }
    vm_args.push(script.into());
    vm_args.extend(args.iter().map(|a| a.to_string()));
    let run = run_vm(&vm_args.iter().map(String::as_str).collect::<Vec<_>>());
    eprintln!("{test}: VM wall time {:.1?}", run.wall);
    assert_eq!(
        run.status,
        Some(0),
        "{test}: {} (exit {:?})",
        explain(run.status),
        run.status
    );
    assert!(
        run.output.contains(pass_line),
        "{test}: no '{pass_line}' line in the VM output"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Some(run)
}

/// `wbctl create` makes /dev/ublkbN with a volatile write cache, FUA, 4 KiB physical blocks and
/// discard; the fio verify jobs (random 4 KiB, mixed sizes with fsync) pass through it; `wbctl
/// status --json` counters move as the workload says (writes, write bytes, hits, misses, dirty
/// bytes falling during `wbctl drain`); `wbctl set` changes knobs (and refuses bad ones);
/// `wbctl delete --drain` leaves the backing device holding exactly what the device held;
/// `wbctl check` then says clean; `create` over the same legs (in the other order) re-attaches.
#[test]
fn vm_ublk_create_verify_status_drain_delete() {
    run_wb_vm(
        "vm_ublk_create_verify_status_drain_delete",
        &["wbctl"],
        &[
            disk("backing", "2G", false),
            disk("cache0", "1G", false),
            disk("cache1", "1G", false),
        ],
        "tests/vm/scripts/ublk-verify.sh",
        &[],
        1500,
        "ublk-verify: PASS",
    );
}

/// mkfs.xfs on the device, a tree of files, umount, `xfs_repair -n` clean; `wbctl delete
/// --drain`; the backing device alone is clean, mounts, and holds the same files.
#[test]
fn vm_ublk_xfs_then_backing_alone() {
    run_wb_vm(
        "vm_ublk_xfs_then_backing_alone",
        &["wbctl"],
        &[
            disk("backing", "2G", false),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
        ],
        "tests/vm/scripts/ublk-xfs.sh",
        &[],
        1200,
        "ublk-xfs: PASS",
    );
}

/// kill -9 of the daemon during fio (three times, in the write and the verify phase), `wbctl
/// recover` each time: fio carries on without an I/O error and its verify passes; unflushed
/// writes acknowledged just before a kill read back after recovery. Then `wbctl replace` swaps a
/// leg for a spare disk online, and the data reads back the same.
#[test]
fn vm_ublk_kill_and_recover_during_fio() {
    run_wb_vm(
        "vm_ublk_kill_and_recover_during_fio",
        &["wbctl"],
        &[
            disk("backing", "2G", false),
            disk("cache0", "1G", false),
            disk("cache1", "1G", false),
            disk("spare", "1G", false),
        ],
        "tests/vm/scripts/ublk-recover.sh",
        &["3"],
        1200,
        "ublk-recover: PASS",
    );
}

/// SPEC §8 through ublk, from one boot: 4 KiB random-write IOPS against the null ublk target
/// (goal ≥ 0.8) and a burst that fits in the cache against the throttled backing device alone
/// (goal ≥ 3×). Prints the figures; asserts only that they were measured (benchmarks never
/// assert timings).
#[test]
fn vm_ublk_bench_iops_and_burst() {
    let test = "vm_ublk_bench_iops_and_burst";
    let Some(run) = run_wb_vm(
        test,
        &["wbctl", "wb-null"],
        &[
            disk("backing", "2G", true),
            disk("cache0", "4G", false),
            disk("cache1", "4G", false),
        ],
        "tests/vm/scripts/ublk-bench.sh",
        &["15", "64"],
        1500,
        "ublk-bench: DONE",
    ) else {
        return;
    };
    let figures: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.contains("bench: IOPS ratio") || l.contains("bench: burst speed-up"))
        .collect();
    assert_eq!(figures.len(), 2, "{test}: missing figures in the VM output");
    for f in figures {
        let at = f.find("bench:").unwrap_or(0);
        println!("{test}: {}", &f[at..]);
    }
}
