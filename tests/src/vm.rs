//! Glue of the real-kernel tests (`tests/tests/vm*.rs`): set up the VM harness, build the
//! binaries the guest runs, make image files, boot Debian's 6.12 kernel in QEMU through
//! `tests/vm/run.sh` (see tests/vm/README.md and `tests/vm/run.sh --help`) on one script of
//! `tests/vm/scripts/`, and hand back what it printed.
//!
//! Before booting, each test:
//! 1. runs `tests/vm/setup.sh` (installs packages, fetches the kernel, builds the initramfs; a
//!    no-op once done);
//! 2. runs `cargo build --release` for the binaries the guest script needs (a no-op when
//!    `make test` / `cargo build --release --workspace` already built them): the guest sees the
//!    host tree read-only and runs `build/release/*` from it.
//!
//! A test is SKIPPED (loud message, returns without failing) only when it cannot run at all: not
//! root, or `qemu-system-x86_64` missing even after setup. VM tests never run side by side: each
//! VM takes both cores (`VM_LOCK` within a test binary, run.sh's machine-wide lock across them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Holds the VM for one test (a test that failed while holding it does not poison it).
pub fn lock_vm() -> MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Says loudly that `test` did not run, and why.
pub fn skip(test: &str, why: &str) {
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

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Setup, then the release build of `bins` (of crate wb-tools); `Err(reason)` means the test
/// must be skipped.
pub fn prepare(test: &str, bins: &[&str]) -> Result<(), String> {
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

/// Where the release binaries are (what the guest runs), handed to the guest as WB_BIN_DIR when
/// Cargo's target dir is not the default `build/`.
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

/// A release binary as the guest runs it: `$CARGO_TARGET_DIR/release/NAME`, else
/// `build/release/NAME` (.cargo/config.toml's target dir).
pub fn release_bin(name: &str) -> PathBuf {
    bin_dir()
        .unwrap_or_else(|| repo_root().join("build/release"))
        .join(name)
}

/// What one boot gave: the script's exit status (run.sh's), everything printed, and how long.
pub struct VmRun {
    pub status: Option<i32>,
    pub output: String,
    pub wall: Duration,
}

/// `tests/vm/run.sh ARGS...`, echoing the guest console line by line.
pub fn run_vm(args: &[&str]) -> VmRun {
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

/// run.sh's exit status in words.
pub fn explain(status: Option<i32>) -> &'static str {
    match status {
        Some(0) => "passed",
        Some(250) => "harness error (see run.sh: ERROR above)",
        Some(251) => "the guest never reported a status (crash/panic)",
        Some(252) => "timeout: the VM was killed",
        None => "run.sh killed by a signal",
        _ => "the guest script failed",
    }
}

/// Fails `test` unless the run exited 0.
pub fn assert_passed(test: &str, run: &VmRun) {
    assert_eq!(
        run.status,
        Some(0),
        "{test}: {} (exit {:?})",
        explain(run.status),
        run.status
    );
}

/// The guest died in its kernel (run.sh: no status reported, and the console shows a panic).
fn guest_kernel_panicked(run: &VmRun) -> bool {
    run.status == Some(251) && run.output.contains("Kernel panic")
}

/// A disk image for the VM: name, size (truncate syntax), throttled like an HDD or not, and
/// whether it is attached as the namespace of an emulated NVMe controller (with these extra
/// `-device nvme` properties, e.g. ",smart_critical_warning=4") instead of a virtio disk.
pub struct Disk {
    pub name: &'static str,
    pub size: &'static str,
    pub throttle: bool,
    pub nvme: Option<&'static str>,
}

pub const fn disk(name: &'static str, size: &'static str, throttle: bool) -> Disk {
    Disk {
        name,
        size,
        throttle,
        nvme: None,
    }
}

/// A disk attached as an emulated NVMe namespace (`run.sh --disk FILE:nvme...`): /dev/nvmeKn1
/// in the guest once the script loads the nvme module.
pub const fn nvme_disk(name: &'static str, size: &'static str, props: &'static str) -> Disk {
    Disk {
        name,
        size,
        throttle: false,
        nvme: Some(props),
    }
}

/// One boot of a test: the binaries it needs, fresh sparse images under `.vm-cache/<test>/`
/// (never /tmp: QEMU opens them with cache=none), the script and its arguments, a time limit,
/// and the line that says the script passed.
pub struct VmTest<'a> {
    pub test: &'a str,
    pub bins: &'a [&'a str],
    pub disks: &'a [Disk],
    pub script: &'a str,
    pub args: &'a [&'a str],
    pub timeout_secs: u32,
    pub pass_line: &'a str,
}

impl VmTest<'_> {
    /// Fresh sparse images in `dir`, then one boot on the script.
    fn boot(&self, dir: &Path) -> VmRun {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("creating the image folder");
        self.boot_on(dir, true)
    }

    /// One boot on the images in `dir`: made fresh (`truncate`) when `fresh`, else the ones a
    /// previous boot left there (which must exist).
    fn boot_on(&self, dir: &Path, fresh: bool) -> VmRun {
        let test = self.test;
        let mut vm_args: Vec<String> = vec!["--timeout".into(), self.timeout_secs.to_string()];
        for d in self.disks {
            let path = dir.join(format!("{}.img", d.name));
            if fresh {
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
            } else {
                assert!(
                    path.is_file(),
                    "{test}: no image {} left by the previous boot",
                    path.display()
                );
            }
            vm_args.push("--disk".into());
            let attach = match (d.throttle, d.nvme) {
                (_, Some(props)) => format!(":nvme{props}"),
                (true, None) => ":throttle".into(),
                (false, None) => String::new(),
            };
            vm_args.push(format!("{}{attach}", path.display()));
        }
        vm_args.push(self.script.into());
        vm_args.extend(self.args.iter().map(|a| a.to_string()));
        run_vm(&vm_args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Builds, makes the images, boots, and checks the script exited 0 and printed `pass_line`.
    /// Returns the run (for figures), or `None` when the test was skipped.
    pub fn run(&self) -> Option<VmRun> {
        let test = self.test;
        let _guard = lock_vm();
        if let Err(why) = prepare(test, self.bins) {
            skip(test, &why);
            return None;
        }
        let dir = repo_root().join(".vm-cache").join(test);
        let mut run = self.boot(&dir);
        if guest_kernel_panicked(&run) {
            // Emulated (TCG), the guest kernel has been seen to die at random in code the test
            // does not touch (seen once in a few dozen boots: a double fault in kmalloc under a
            // 9p lookup).
            // One more boot, on fresh images, tells such a fluke from a crash the test causes:
            // that one repeats.
            eprintln!(
                "\n!!! {test}: THE GUEST KERNEL PANICKED (console above); booting once more\n"
            );
            println!("{test}: guest kernel panic on the first boot; retried");
            run = self.boot(&dir);
        }
        eprintln!("{test}: VM wall time {:.1?}", run.wall);
        assert_passed(test, &run);
        assert!(
            run.output.contains(self.pass_line),
            "{test}: no '{}' line in the VM output",
            self.pass_line
        );
        let _ = std::fs::remove_dir_all(&dir);
        Some(run)
    }
}

/// Tests that boot twice on the same images: a first boot that must end in a power cut (the
/// guest powers itself off mid-script, `echo o > /proc/sysrq-trigger`), then a second boot on
/// what the cut left in the image files (QEMU's cache=none: what the guest saw complete is
/// there). `run` stays the one-boot path of every other test.
impl VmTest<'_> {
    /// Builds, makes fresh images, boots, and checks the guest powered off before the script
    /// could report a status (run.sh's 251 without a kernel panic) after printing `pass_line`
    /// (the line the script prints just before the cut). The images stay in
    /// `.vm-cache/<test>/` for `run_again`. Returns the run, or `None` when skipped.
    pub fn run_until_power_cut(&self) -> Option<VmRun> {
        let test = self.test;
        let _guard = lock_vm();
        if let Err(why) = prepare(test, self.bins) {
            skip(test, &why);
            return None;
        }
        let dir = repo_root().join(".vm-cache").join(test);
        let mut run = self.boot(&dir);
        if guest_kernel_panicked(&run) {
            eprintln!(
                "\n!!! {test}: THE GUEST KERNEL PANICKED (console above); booting once more\n"
            );
            println!("{test}: guest kernel panic on the first boot; retried");
            run = self.boot(&dir);
        }
        eprintln!(
            "{test}: VM wall time {:.1?} (boot ending in a power cut)",
            run.wall
        );
        assert!(
            !guest_kernel_panicked(&run),
            "{test}: the guest kernel panicked instead of powering off"
        );
        assert_eq!(
            run.status,
            Some(251),
            "{test}: the boot did not end in a power cut: {} (exit {:?})",
            explain(run.status),
            run.status
        );
        assert!(
            run.output.contains(self.pass_line),
            "{test}: no '{}' line before the power cut",
            self.pass_line
        );
        Some(run)
    }

    /// Like `run`, but boots on the images a previous boot of the same `test` left in
    /// `.vm-cache/<test>/` (`run_until_power_cut`) instead of fresh ones; `disks` must name
    /// the same images (their throttling may differ). Removes the images when it passed.
    pub fn run_again(&self) -> Option<VmRun> {
        let test = self.test;
        let _guard = lock_vm();
        if let Err(why) = prepare(test, self.bins) {
            skip(test, &why);
            return None;
        }
        let dir = repo_root().join(".vm-cache").join(test);
        let run = self.boot_on(&dir, false);
        eprintln!(
            "{test}: VM wall time {:.1?} (boot on the same images)",
            run.wall
        );
        assert_passed(test, &run);
        assert!(
            run.output.contains(self.pass_line),
            "{test}: no '{}' line in the VM output",
            self.pass_line
        );
        let _ = std::fs::remove_dir_all(&dir);
        Some(run)
    }
}

/// The host folder of a boot's `$WB_OUT` (run.sh's "run folder" line).
pub fn run_folder(test: &str, output: &str) -> PathBuf {
    let line = lines_with(test, output, "run.sh: run folder ")[0];
    PathBuf::from(line.split("run.sh: run folder ").nth(1).unwrap().trim())
}

/// The output lines containing `needle`; at least one must exist.
pub fn lines_with<'a>(test: &str, output: &'a str, needle: &str) -> Vec<&'a str> {
    let found: Vec<&str> = output.lines().filter(|l| l.contains(needle)).collect();
    assert!(
        !found.is_empty(),
        "{test}: no line containing '{needle}' in the VM output"
    );
    found
}

/// Prints, prefixed with the test's name, the output lines containing any of `needles` (the
/// figures and milestones worth seeing in a passing run).
pub fn echo_lines_with(test: &str, output: &str, needles: &[&str]) {
    for l in output
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
    {
        println!("{test}: {}", l.trim());
    }
}
