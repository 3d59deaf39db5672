//! Real-kernel tests of issue 6 (mirrored cache failures, SPEC §2 and §5): each boots Debian's
//! 6.12 kernel in QEMU through `tests/vm/run.sh` and runs one `tests/vm/scripts/mirror-*.sh`,
//! which puts device-mapper targets under the cache legs and switches them to the `error`
//! target mid-workload.
//!
//! Like `vm.rs` (whose glue is copied here, not shared, to keep the two files independent):
//! before booting, `tests/vm/setup.sh` runs and `cargo build --release` builds `wbctl`; a test is
//! SKIPPED (loud message, no failure) only when the VM cannot run at all: not root, or
//! `qemu-system-x86_64` missing even after setup. One VM at a time (`VM_LOCK` in this binary,
//! run.sh's machine-wide lock across binaries).
//!
//! `mirror_oracle_self_test` needs no VM: it runs the cache-loss oracle of
//! `tests/vm/scripts/mirror-journal.py` on synthetic journals and checks that it accepts states
//! a flush boundary allows and rejects reordered, torn, misdirected and foreign images.

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
fn prepare(test: &str) -> Result<(), String> {
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
    let t = Instant::now();
    let st = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "wb-tools", "--bin", "wbctl"])
        .status()
        .expect("running cargo build --release");
    assert!(
        st.success(),
        "{test}: cargo build --release of wbctl failed: {st}"
    );
    eprintln!(
        "{test}: release build of wbctl ready in {:.1?}",
        t.elapsed()
    );
    Ok(())
}

/// Where the release binaries are, handed to the guest as WB_BIN_DIR when Cargo's target dir is
/// not the default `build/`.
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
fn run_vm(args: &[String]) -> VmRun {
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

/// A disk image for the VM: name, size (truncate syntax), throttled like an HDD or not.
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

/// Builds wbctl, makes fresh sparse images under `.vm-cache/<test>/`, boots the VM on
/// `script ARGS`, and checks it exited 0 and printed `pass_line`. `None` when skipped.
fn run_mirror_vm(
    test: &str,
    disks: &[Disk],
    script: &str,
    args: &[&str],
    timeout_secs: u32,
    pass_line: &str,
) -> Option<VmRun> {
    let _guard = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(why) = prepare(test) {
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
    let run = run_vm(&vm_args);
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

/// The output lines containing `needle`; at least one must exist.
fn lines_with<'a>(test: &str, output: &'a str, needle: &str) -> Vec<&'a str> {
    let found: Vec<&str> = output.lines().filter(|l| l.contains(needle)).collect();
    assert!(
        !found.is_empty(),
        "{test}: no line containing '{needle}' in the VM output"
    );
    found
}

/// One leg fails during a fio verify job: leg A is a dm linear target switched to the `error`
/// target while fio writes. The job passes (no I/O error, verify ok); status shows leg A failed
/// with errors, the mode goes mirrored → degraded → passthrough once the cache is clean;
/// passthrough serves a verify job; `wbctl replace` → mirrored; a second verify job passes;
/// `wbctl delete --drain` leaves the backing device equal to what the device held.
#[test]
fn vm_mirror_one_leg_fails_during_fio_verify() {
    let test = "vm_mirror_one_leg_fails_during_fio_verify";
    let Some(run) = run_mirror_vm(
        test,
        &[
            disk("backing", "1G", true),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
            disk("spare", "512M", false),
        ],
        "tests/vm/scripts/mirror-one-leg.sh",
        &[],
        1500,
        "mirror-one-leg: PASS",
    ) else {
        return;
    };
    let out = &run.output;
    lines_with(test, out, "INJECTED: leg A");
    lines_with(test, out, "fio verify job passed");
    let history = lines_with(test, out, "mode history: mirrored");
    assert!(
        history[0].contains("degraded") && history[0].contains("passthrough"),
        "{test}: mode history lacks degraded/passthrough: {}",
        history[0]
    );
    let after = lines_with(test, out, "status after: ");
    assert!(
        after[0].contains(r#""mode": "passthrough""#) && after[0].contains(r#""health": "failed""#),
        "{test}: status after the failure: {}",
        after[0]
    );
    lines_with(test, out, "mode mirrored after");
    for l in out.lines().filter(|l| {
        l.contains("INJECTED")
            || l.contains("mode history")
            || l.contains("degraded from")
            || l.contains("status after")
            || l.contains("wbctl replace took")
            || l.contains("sha256 of the first")
    }) {
        println!("{test}: {}", l.trim());
    }
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}

/// Both legs fail mid-workload (dm `error` under both at once) while a journaled workload
/// writes tagged blocks with FLUSHes: the device goes to passthrough with `cache_lost_at` set and
/// an error-level CRITICAL log line; the backing device alone passes the cache-loss oracle
/// (SPEC §2: the state at some flush boundary B plus a subset of epoch B, nothing later, and every
/// write made after passthrough); the oracle rejects reordered images of the same journal;
/// replacing both legs returns to mirrored, and a drained second workload is complete on the
/// backing device. Short epochs (an fsync every 1..48 writes).
#[test]
fn vm_mirror_both_legs_fail_cache_loss_oracle() {
    both_legs_fail("vm_mirror_both_legs_fail_cache_loss_oracle", &[]);
}

/// The same with long epochs (an fsync every 1..3000 writes): writeback batches are ~30
/// segments of one epoch, so one is usually being written to the throttled backing device when
/// the legs fail, and passthrough writes follow right after the loss.
#[test]
fn vm_mirror_both_legs_fail_long_epochs() {
    both_legs_fail(
        "vm_mirror_both_legs_fail_long_epochs",
        &["20", "1500", "3000"],
    );
}

fn both_legs_fail(test: &str, args: &[&str]) {
    let Some(run) = run_mirror_vm(
        test,
        &[
            disk("backing", "1G", true),
            disk("cache0", "256M", false),
            disk("cache1", "256M", false),
            disk("spare0", "256M", false),
            disk("spare1", "256M", false),
        ],
        "tests/vm/scripts/mirror-both-fail.sh",
        args,
        1500,
        "mirror-both-fail: PASS",
    ) else {
        return;
    };
    let out = &run.output;
    lines_with(test, out, "passthrough seen");
    lines_with(test, out, "CRITICAL: every cache leg has failed");
    let after = lines_with(test, out, "status after: ");
    assert!(
        after[0].contains(r#""mode": "passthrough""#)
            && !after[0].contains(r#""cache_lost_at": null"#),
        "{test}: status after the loss: {}",
        after[0]
    );
    let verdicts = lines_with(test, out, "oracle: PASS");
    assert_eq!(
        verdicts.len(),
        2,
        "{test}: expected two oracle PASS lines (after the loss, after the drain)"
    );
    let selftests = lines_with(test, out, "oracle self-test: PASS");
    assert_eq!(
        selftests.len(),
        2,
        "{test}: expected two self-test PASS lines"
    );
    lines_with(test, out, "rejected as expected");
    for l in out.lines().filter(|l| {
        l.contains("injecting after")
            || l.contains("passthrough seen")
            || l.contains("mirror-journal: done")
            || l.contains("CRITICAL")
            || l.contains("status after")
            || l.contains("oracle:")
            || l.contains("oracle self-test")
            || l.contains("mode history")
    }) {
        println!("{test}: {}", l.trim());
    }
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}

/// The cache-loss oracle can fail (no VM needed): on synthetic journals it accepts the state at
/// a flush boundary plus any subset of the next epoch, and rejects a reordered image (a write of
/// epoch B+1 present while one of epoch B is missing), a later epoch's write alone, a lost
/// post-loss write, and torn, misdirected and foreign blocks.
#[test]
fn mirror_oracle_self_test() {
    let test = "mirror_oracle_self_test";
    if !have("python3") {
        return skip(test, "python3 is missing");
    }
    let out = Command::new("python3")
        .arg(repo_root().join("tests/vm/scripts/mirror-journal.py"))
        .args(["selftest", "--seed", "7", "--rounds", "4"])
        .output()
        .expect("running mirror-journal.py selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{test}: self-test failed: {}",
        out.status
    );
    assert!(
        stdout.contains("oracle self-test: PASS"),
        "{test}: no PASS line"
    );
    for kind in [
        "reordered",
        "later epoch alone",
        "post-loss write",
        "torn",
        "holds block",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(kind) && l.contains("rejected as expected")),
            "{test}: no '{kind}' image was rejected"
        );
    }
}
