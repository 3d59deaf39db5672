//! Every bad input of CONTRACT §7 gets a clear error from `wbctl` and changes nothing on disk. These
//! run the real binary without a ublk-capable kernel: the checks of `wbctl create` are ordered so
//! that the device checks come before root and `/dev/ublk-control`, and nothing is written
//! before all of them pass. Each test asserts the message names the thing and the reason, and
//! that every device file is byte-for-byte unchanged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use wb_target::control::{DeviceState, RunDir};
use wb_target::device::{Device, FileDevice};

const MIB: u64 = 1 << 20;

/// Files standing in for devices, a run folder, and fingerprints of everything.
struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        // Readable by an unprivileged user too (the not-root test drops privileges).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        Rig { dir }
    }

    fn file(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Formats `caches` as a cache set for `backing` (what a successful `create` would do).
    fn format(&self, caches: &[&Path], backing: &Path) {
        let legs: Vec<Arc<dyn Device>> = caches
            .iter()
            .map(|p| Arc::new(FileDevice::open(p).unwrap()) as Arc<dyn Device>)
            .collect();
        let backing = FileDevice::open(backing).unwrap();
        let identity = backing.identity();
        wb_target::format(
            &legs,
            &backing,
            &identity,
            &wb_target::FormatOptions {
                logical_block_size: 512,
                force: false,
            },
        )
        .unwrap();
    }

    fn wbctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_wbctl"))
            .args(args)
            .env("WRITEBOOST_RUN_DIR", self.run_dir())
            .env_remove("RUST_LOG")
            .output()
            .expect("running wbctl")
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A fingerprint of a file's bytes (sparse files: cheap enough at these sizes).
fn digest(path: &Path) -> u32 {
    crc32(&std::fs::read(path).unwrap())
}

fn crc32(bytes: &[u8]) -> u32 {
    logfmt::crc32c(bytes)
}

/// Asserts wbctl failed with a message containing every one of `needles`.
#[track_caller]
fn assert_refused(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "wbctl succeeded; stdout: {} stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in needles {
        assert!(stderr.contains(n), "error message lacks {n:?}:\n{stderr}");
    }
    assert!(stderr.starts_with("wbctl: error: "), "{stderr}");
    stderr
}

/// `wbctl create d0 --backing BACKING --cache C... EXTRA...`
fn create(rig: &Rig, backing: &Path, caches: &[&Path], extra: &[&str]) -> Output {
    let mut args = vec!["create", "d0", "--backing", p(backing)];
    for c in caches {
        args.extend(["--cache", p(c)]);
    }
    args.extend(extra);
    rig.wbctl(&args)
}

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have_ublk() -> bool {
    Path::new("/dev/ublk-control").exists()
}

/// A fresh backing file and two cache legs, their digests, and a create command line.
struct Devices {
    backing: PathBuf,
    c0: PathBuf,
    c1: PathBuf,
}

fn devices(rig: &Rig) -> Devices {
    Devices {
        backing: rig.file("backing", 256 * MIB),
        c0: rig.file("cache0", 64 * MIB),
        c1: rig.file("cache1", 64 * MIB),
    }
}

fn digests(paths: &[&Path]) -> Vec<u32> {
    paths.iter().map(|p| digest(p)).collect()
}

#[test]
fn missing_backing_device() {
    let rig = Rig::new();
    let d = devices(&rig);
    let before = digests(&[&d.c0, &d.c1]);
    let missing = rig.path("no-such-disk");
    let out = create(&rig, &missing, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &[p(&missing), "backing device", "no such device"]);
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
    assert!(
        !rig.run_dir().exists(),
        "nothing may be created before the checks pass"
    );
}

#[test]
fn missing_cache_device() {
    let rig = Rig::new();
    let d = devices(&rig);
    let missing = rig.path("nvme9n1");
    let out = create(&rig, &d.backing, &[&d.c0, &missing], &[]);
    assert_refused(&out, &[p(&missing), "cache device", "no such device"]);
}

#[test]
fn not_a_block_device() {
    let rig = Rig::new();
    let d = devices(&rig);
    let out = create(&rig, &d.backing, &[&d.c0, Path::new("/dev/null")], &[]);
    assert_refused(&out, &["/dev/null", "not a block device"]);
}

#[test]
fn cache_too_small() {
    let rig = Rig::new();
    let d = devices(&rig);
    let small = rig.file("small", 4 * MIB);
    let before = digests(&[&d.c0, &small]);
    let out = create(&rig, &d.backing, &[&d.c0, &small], &[]);
    assert_refused(&out, &[p(&small), "too small", "4194304 bytes"]);
    assert_eq!(digests(&[&d.c0, &small]), before);
}

#[test]
fn odd_backing_size() {
    let rig = Rig::new();
    let d = devices(&rig);
    let odd = rig.file("odd", 100 * MIB + 512);
    let out = create(&rig, &odd, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &[p(&odd), "not a non-zero multiple of 4096"]);
}

#[test]
fn one_leg_needs_the_flag_and_legs_must_differ() {
    let rig = Rig::new();
    let d = devices(&rig);
    let out = create(&rig, &d.backing, &[&d.c0], &[]);
    assert_refused(&out, &[p(&d.c0), "--single-leg"]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c0], &[]);
    assert_refused(&out, &[p(&d.c0), "twice"]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.backing], &[]);
    assert_refused(
        &out,
        &[p(&d.backing), "both the backing device and a cache device"],
    );
    let out = rig.wbctl(&["create", "d0", "--backing", p(&d.backing)]);
    assert_refused(&out, &["--cache"]);
}

#[test]
fn bad_names_and_knobs() {
    let rig = Rig::new();
    let d = devices(&rig);
    let args = |name: &str| {
        vec![
            "create".to_string(),
            name.to_string(),
            "--backing".into(),
            p(&d.backing).into(),
            "--cache".into(),
            p(&d.c0).into(),
            "--cache".into(),
            p(&d.c1).into(),
        ]
    };
    let run = |a: Vec<String>| rig.wbctl(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&run(args("tank/lun0")), &["device name", "'/'"]);
    let mut a = args("d0");
    a.extend(["--low-watermark".into(), "150%".into()]);
    assert_refused(&run(a), &["low_watermark", "between 0 and 1"]);
    let mut a = args("d0");
    a.extend(["--set".into(), "speed=11".into()]);
    assert_refused(&run(a), &["unknown knob 'speed'"]);
    let out = rig.wbctl(&["set", "d0", "low_watermark"]);
    assert_refused(&out, &["expected KNOB=VALUE"]);
    // An event hook the daemon could not run is refused before anything is written.
    let before = digests(&[&d.c0, &d.c1]);
    let not_executable = rig.file("hook.txt", 10);
    for (hook, why) in [
        (rig.path("no-such-hook"), "event hook: No such file"),
        (not_executable, "event hook: not an executable file"),
    ] {
        let mut a = args("d0");
        a.extend(["--event-hook".into(), p(&hook).into()]);
        assert_refused(&run(a), &[p(&hook), why]);
    }
    assert_eq!(digests(&[&d.c0, &d.c1]), before, "nothing written");
}

#[test]
fn foreign_cache_is_refused_and_untouched() {
    let rig = Rig::new();
    let d = devices(&rig);
    let other_backing = rig.file("other-backing", 256 * MIB);
    rig.format(&[&d.c0, &d.c1], &other_backing);
    let before = digests(&[&d.c0, &d.c1, &d.backing]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(
        &out,
        &[
            p(&d.c0),
            "cache of another backing device",
            p(&d.backing),
            "--force",
        ],
    );
    assert_eq!(digests(&[&d.c0, &d.c1, &d.backing]), before);
}

#[test]
fn shrunk_backing_device_is_refused() {
    let rig = Rig::new();
    let d = devices(&rig);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    // Same file (same identity), now smaller.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d.backing)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    let before = digests(&[&d.c0, &d.c1]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(
        &out,
        &[p(&d.backing), "shrank from 268435456 to 134217728 bytes"],
    );
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
}

#[test]
fn corrupted_superblock_is_refused() {
    let rig = Rig::new();
    let d = devices(&rig);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    let mut bytes = std::fs::read(&d.c1).unwrap();
    bytes[100] ^= 0xff; // inside the superblock: its CRC no longer matches
    std::fs::write(&d.c1, &bytes).unwrap();
    let before = digests(&[&d.c0, &d.c1]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &[p(&d.c1), "corrupted superblock", "checksum"]);
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
}

#[test]
fn leg_of_another_set_is_refused() {
    let rig = Rig::new();
    let d = devices(&rig);
    let c2 = rig.file("cache2", 64 * MIB);
    let c3 = rig.file("cache3", 64 * MIB);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    rig.format(&[&c2, &c3], &d.backing);
    let out = create(&rig, &d.backing, &[&d.c0, &c2], &[]);
    assert_refused(&out, &[p(&c2), "another cache set"]);
    // One leg of a mirror given alone.
    let out = create(&rig, &d.backing, &[&d.c0], &["--single-leg"]);
    assert_refused(&out, &[p(&d.c0), "2 legs", "1 cache device"]);
}

#[test]
fn name_in_use_by_a_running_daemon() {
    let rig = Rig::new();
    let d = devices(&rig);
    let run = RunDir::new(rig.run_dir());
    std::fs::create_dir_all(&run.path).unwrap();
    // A daemon answers on the control socket.
    let _listener = std::os::unix::net::UnixListener::bind(run.socket("d0")).unwrap();
    let state = DeviceState {
        name: "d0".into(),
        backing: d.backing.clone(),
        caches: vec![d.c0.clone(), d.c1.clone()],
        dev_id: 7,
        device: "/dev/ublkb7".into(),
        queues: 1,
        depth: 64,
        io_buf_bytes: 524288,
        policy: Default::default(),
        pid: std::process::id(),
        started_unix_secs: 0,
        event_hook: None,
        config: None,
        handed_over: false,
        counters: None,
    };
    state.store(&run.state("d0")).unwrap();
    let before = digests(&[&d.c0, &d.c1]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &["d0", "name in use", "/dev/ublkb7"]);
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
    // Also with only the socket (no state file yet: a daemon starting up).
    std::fs::remove_file(run.state("d0")).unwrap();
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &["d0", "name in use"]);
    // And recover refuses a running device.
    state.store(&run.state("d0")).unwrap();
    let out = rig.wbctl(&["recover", "d0"]);
    assert_refused(&out, &["d0", "running", "nothing to recover"]);
}

#[test]
fn name_left_by_a_dead_daemon_of_other_devices() {
    let rig = Rig::new();
    let d = devices(&rig);
    let run = RunDir::new(rig.run_dir());
    std::fs::create_dir_all(&run.path).unwrap();
    let state = DeviceState {
        name: "d0".into(),
        backing: rig.file("elsewhere", 256 * MIB),
        caches: vec![d.c0.clone(), d.c1.clone()],
        dev_id: 3,
        device: "/dev/ublkb3".into(),
        queues: 1,
        depth: 64,
        io_buf_bytes: 524288,
        policy: Default::default(),
        pid: 0, // no such process
        started_unix_secs: 0,
        event_hook: None,
        config: None,
        handed_over: false,
        counters: None,
    };
    state.store(&run.state("d0")).unwrap();
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(
        &out,
        &["d0", "daemon died", "/dev/ublkb3", "wbctl recover d0"],
    );
    // The commands that need a daemon say how to get one back.
    for args in [
        vec!["status", "d0"],
        vec!["drain", "d0"],
        vec!["set", "d0", "low_watermark=0.2"],
    ] {
        let out = rig.wbctl(&args);
        assert_refused(&out, &["d0", "not running", "wbctl recover d0"]);
    }
    let out = rig.wbctl(&["delete", "d0"]);
    assert_refused(&out, &["d0", "not running", "wbctl recover d0", "--force"]);
    let out = rig.wbctl(&["list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("d0") && text.contains("DEAD"), "{text}");
    // A health check sees a dead daemon as critical (its device holds I/O until a recover),
    // for the device and over all devices; a device it cannot read at all is unknown.
    for args in [vec!["status", "-x", "d0"], vec!["status", "--check"]] {
        let out = rig.wbctl(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains("d0: CRITICAL - daemon down") && text.contains("wbctl recover d0"),
            "{text}"
        );
    }
    let out = rig.wbctl(&["status", "-x", "nope"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nope: UNKNOWN - nope: no such device"));
    let out = rig.wbctl(&["status", "-x", "--json", "d0"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["output_version"], 1);
    assert_eq!(v["devices"][0]["health"], "CRITICAL");
    assert_eq!(v["devices"][0]["code"], 2);
    assert_eq!(v["code"], 2, "the worst verdict");
    // Plain status still says what is wrong and fails as before (it could not read the status).
    assert_eq!(rig.wbctl(&["status", "d0"]).status.code(), Some(1));
}

#[test]
fn unknown_device_names() {
    let rig = Rig::new();
    for args in [
        vec!["status", "nope"],
        vec!["drain", "nope"],
        vec!["delete", "nope"],
        vec!["set", "nope", "low_watermark=0.2"],
        vec!["recover", "nope"],
    ] {
        let out = rig.wbctl(&args);
        assert_refused(&out, &["nope", "no such device"]);
    }
    let out = rig.wbctl(&["list"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no writeboost devices"));
    let out = rig.wbctl(&["status", "-x"]);
    assert_eq!(out.status.code(), Some(0), "no device, nothing wrong");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK - no devices"));
}

#[test]
fn config_file_errors_name_the_file() {
    let rig = Rig::new();
    let d = devices(&rig);
    let config = rig.path("d0.toml");
    std::fs::write(
        &config,
        format!(
            "backing = \"{}\"\ncaches = [\"{}\", \"{}\"]\ncolour = \"blue\"\n",
            p(&d.backing),
            p(&d.c0),
            p(&d.c1)
        ),
    )
    .unwrap();
    let out = rig.wbctl(&["create", "d0", "--config", p(&config)]);
    assert_refused(&out, &[p(&config), "colour"]);
    std::fs::write(
        &config,
        format!(
            "backing = \"{}\"\ncaches = [\"{}\", \"{}\"]\n[policy]\npressure_curve = \"cubic\"\n",
            p(&d.backing),
            p(&d.c0),
            p(&d.c1)
        ),
    )
    .unwrap();
    let out = rig.wbctl(&["create", "d0", "--config", p(&config)]);
    assert_refused(&out, &[p(&config), "pressure_curve", "cubic"]);
    let out = rig.wbctl(&["create", "d0", "--config", p(&rig.path("missing.toml"))]);
    assert_refused(&out, &["missing.toml", "cannot read"]);
}

#[test]
fn no_ublk_control_is_the_last_check_and_writes_nothing() {
    if !am_root() || have_ublk() {
        eprintln!("SKIPPED: needs root on a kernel without /dev/ublk-control");
        return;
    }
    let rig = Rig::new();
    let d = devices(&rig);
    let before = digests(&[&d.c0, &d.c1, &d.backing]);
    let out = create(&rig, &d.backing, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &["/dev/ublk-control", "ublk_drv", "kernel >= 6.0"]);
    assert_eq!(digests(&[&d.c0, &d.c1, &d.backing]), before);
    assert!(!rig.run_dir().exists());
    // The same through a configuration file.
    let config = rig.path("d0.toml");
    std::fs::write(
        &config,
        format!(
            "backing = \"{}\"\ncaches = [\"{}\", \"{}\"]\n[policy]\nlow_watermark = \"20%\"\n",
            p(&d.backing),
            p(&d.c0),
            p(&d.c1)
        ),
    )
    .unwrap();
    let out = rig.wbctl(&["create", "d0", "--config", p(&config), "--foreground"]);
    assert_refused(&out, &["/dev/ublk-control", "ublk_drv"]);
    // Re-attaching an existing cache gets as far, and leaves it alone too.
    rig.format(&[&d.c0, &d.c1], &d.backing);
    let before = digests(&[&d.c0, &d.c1]);
    let out = create(&rig, &d.backing, &[&d.c1, &d.c0], &[]);
    assert_refused(&out, &["/dev/ublk-control"]);
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
}

#[test]
fn not_root() {
    let rig = Rig::new();
    let d = devices(&rig);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbctl"));
    cmd.args(["create", "d0", "--backing", p(&d.backing)])
        .args(["--cache", p(&d.c0), "--cache", p(&d.c1)])
        .env("WRITEBOOST_RUN_DIR", rig.run_dir());
    if am_root() {
        // Drop to nobody for this one run.
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: cannot run wbctl as nobody: {e}");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Permission denied") && stderr.contains("wbctl") && !stderr.contains("root")
    {
        eprintln!("SKIPPED: nobody cannot execute the test binary: {stderr}");
        return;
    }
    assert_refused(&out, &["must run as root"]);
}

#[test]
fn check_reports_a_cache_and_writes_nothing() {
    let rig = Rig::new();
    let d = devices(&rig);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    let before = digests(&[&d.c0, &d.c1]);
    let out = rig.wbctl(&["check", "--cache", p(&d.c0), "--cache", p(&d.c1), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["leg_count"], 2);
    assert_eq!(v["backing_size_bytes"], 256 * MIB);
    assert_eq!(v["logical_block_size"], 512);
    assert_eq!(v["clean"], true);
    assert_eq!(v["dirty_blocks"], 0);
    assert_eq!(v["live_segments"], 0);
    assert_eq!(v["legs"][1]["leg_index"], 1);
    let out = rig.wbctl(&["check", "--cache", p(&d.c1)]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("clean") && text.contains("checkpoint"),
        "{text}"
    );
    assert_eq!(digests(&[&d.c0, &d.c1]), before);
}

#[test]
fn check_reports_dirty_data() {
    let rig = Rig::new();
    let d = devices(&rig);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    {
        let legs: Vec<Arc<dyn Device>> = [&d.c0, &d.c1]
            .iter()
            .map(|p| Arc::new(FileDevice::open(p).unwrap()) as Arc<dyn Device>)
            .collect();
        let backing = FileDevice::open(&d.backing).unwrap();
        let identity = backing.identity();
        let mut options = wb_target::OpenOptions::new(rig.path("buf"));
        options.writeback = None;
        let engine = wb_target::open(legs, Arc::new(backing), &identity, options).unwrap();
        engine.write(0, &vec![7u8; 64 * 1024], false).unwrap();
        engine.shutdown().unwrap();
    }
    let out = rig.wbctl(&["check", "--cache", p(&d.c0), "--cache", p(&d.c1), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clean"], false);
    assert_eq!(v["dirty_blocks"], 16);
    assert_eq!(v["live_first_id"], 1);
    assert!(v["live_last_id"].as_u64().unwrap() >= 1);
    let out = rig.wbctl(&["check", "--cache", p(&d.c0), "--cache", p(&d.c1)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("DIRTY"));
    // Formatting over it is refused without --force (dirty data of this very backing device).
    let other = rig.file("other", 256 * MIB);
    let out = create(&rig, &other, &[&d.c0, &d.c1], &[]);
    assert_refused(&out, &["cache of another backing device"]);
}

#[test]
fn check_on_something_else() {
    let rig = Rig::new();
    let plain = rig.file("plain", 64 * MIB);
    std::fs::write(&plain, vec![0x55u8; 8192]).unwrap();
    let before = digest(&plain);
    let out = rig.wbctl(&["check", "--cache", p(&plain)]);
    assert_refused(&out, &[p(&plain), "not a writeboost cache"]);
    let out = rig.wbctl(&["check", "--cache", p(&rig.path("missing"))]);
    assert_refused(&out, &["missing", "no such device"]);
    let d = devices(&rig);
    let c2 = rig.file("c2", 64 * MIB);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    rig.format(&[&c2], &d.backing);
    let out = rig.wbctl(&["check", "--cache", p(&d.c0), "--cache", p(&c2)]);
    assert_refused(&out, &[p(&c2), "another cache set"]);
    assert_eq!(digest(&plain), before);
}

#[test]
fn check_shows_failed_legs_and_a_recorded_loss() {
    let rig = Rig::new();
    let d = devices(&rig);
    rig.format(&[&d.c0, &d.c1], &d.backing);
    let c0 = FileDevice::open(&d.c0).unwrap();
    let mut sb = wb_target::AlignedBuf::new(logfmt::SUPERBLOCK_SIZE_BYTES);
    c0.read_at(&mut sb, 0).unwrap();
    let uuid = logfmt::Superblock::decode(&sb).unwrap().uuid;
    // Leg 1 failed: the record in a newer checkpoint on leg 0.
    let checkpoint = logfmt::Checkpoint {
        uuid,
        sequence: 1,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: logfmt::Faults {
            sequence: 1,
            failed_legs: 0b10,
            ..Default::default()
        },
        next_position: Default::default(),
        anchor_crc: 0,
    };
    let mut slot = wb_target::AlignedBuf::new(logfmt::CHECKPOINT_SLOT_SIZE_BYTES);
    slot.copy_from_slice(&checkpoint.encode());
    c0.write_at(&slot, logfmt::checkpoint_offset(1)).unwrap();
    c0.flush().unwrap();
    let check = |fault_dir: &Path, json: bool| {
        let mut args = vec!["check", "--cache", p(&d.c0), "--cache", p(&d.c1)];
        if json {
            args.push("--json");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_wbctl"))
            .args(&args)
            .env("WRITEBOOST_RUN_DIR", rig.run_dir())
            .env("WRITEBOOST_FAULT_DIR", fault_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let faults = rig.path("faults");
    let v: serde_json::Value = serde_json::from_str(&check(&faults, true)).unwrap();
    assert_eq!(v["faults"]["failed_legs"], serde_json::json!([1]));
    assert_eq!(v["faults"]["source"], "legs");
    assert!(v["faults"]["cache_lost"].is_null());
    let text = check(&faults, false);
    assert!(text.contains("FAILED    leg(s) [1]"), "{text}");
    // A loss recorded on the host only (no leg was writable then) is shown too.
    let lost = logfmt::Faults {
        sequence: 2,
        failed_legs: 0b11,
        cache_lost: Some(logfmt::CacheLost {
            backing_holds_id: 7,
            log_through_id: 9,
        }),
        leg_incarnations: [0, 0],
    };
    wb_target::engine::faults::FaultFile::new(&faults, &uuid)
        .store(&lost)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&check(&faults, true)).unwrap();
    assert_eq!(v["faults"]["source"], "fault file");
    assert_eq!(v["faults"]["cache_lost"]["backing_holds_id"], 7);
    assert_eq!(v["faults"]["cache_lost"]["lost_through_id"], 9);
    let text = check(&faults, false);
    assert!(
        text.contains("LOST") && text.contains("segments 8..=9"),
        "{text}"
    );
}
