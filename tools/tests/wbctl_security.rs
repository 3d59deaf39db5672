//! Who may do what: only root may read a device's RAM buffer, talk to its daemon, or have what
//! lies in the run folder believed. These run the real `wbctl` (as root, and as `nobody` through
//! `setpriv`) and the daemon's own socket and start-up code, without a ublk-capable kernel: the
//! run folder, its files and the control socket come before the ublk device.

use std::io::BufRead;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use wb_target::control::{self, DeviceState, Reply, RunDir};
use wb_target::daemon::{self, DaemonSpec, Start};
use wb_target::device::open_node;

const MIB: u64 = 1 << 20;
const NOBODY: u32 = 65534;

/// Files standing in for devices and a run folder, in a temporary folder others may enter.
struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        Rig { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    fn run(&self) -> RunDir {
        RunDir::new(self.path("run"))
    }

    /// A backing device and two cache legs (blank).
    fn devices(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.file("backing", 64 * MIB),
            self.file("cache0", 16 * MIB),
            self.file("cache1", 16 * MIB),
        )
    }

    /// `wbctl ARGS`, as root or (`as_nobody`) as uid/gid 65534 through `setpriv`.
    fn wbctl(&self, as_nobody: bool, args: &[&str]) -> Output {
        let wbctl = env!("CARGO_BIN_EXE_wbctl");
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                wbctl,
            ]);
            c
        } else {
            Command::new(wbctl)
        };
        cmd.args(args)
            .env(control::RUN_DIR_ENV, &self.run().path)
            .env_remove("RUST_LOG")
            .output()
            .expect("running wbctl")
    }

    /// A state file of a dead daemon of `name` over `backing` and `cache`.
    fn dead_daemon_state(&self, name: &str, backing: &Path, cache: &Path) -> DeviceState {
        DeviceState {
            name: name.into(),
            backing: backing.to_path_buf(),
            caches: vec![cache.to_path_buf()],
            dev_id: 5,
            device: "/dev/ublkb5".into(),
            queues: 1,
            depth: 64,
            io_buf_bytes: 524288,
            policy: Default::default(),
            pid: 0,
            started_unix_secs: 0,
            event_hook: None,
            config: None,
            handed_over: false,
            counters: None,
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let all = text(out);
    assert!(!out.status.success(), "succeeded: {all}");
    for n in needles {
        assert!(all.contains(n), "{n:?} not in: {all}");
    }
}

/// Root, and `setpriv` there to drop to nobody; else the test cannot say anything.
fn can_test(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(root && setpriv) {
        eprintln!("SKIPPED {test}: needs root and setpriv (root: {root})");
    }
    root && setpriv
}

fn have_ublk() -> bool {
    Path::new("/dev/ublk-control").exists()
}

/// Waits until nobody holds d0's lock any more. A child that another test thread forks keeps
/// a copy of every descriptor until it execs (then O_CLOEXEC closes it), and the lock lives as
/// long as any copy: only in this many-threaded test process, never in the daemon.
fn unlocked(run: &RunDir) {
    for _ in 0..200 {
        if !run.name_locked("d0") {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("d0's lock is still held");
}

/// What `wbctl create` would hand the daemon for these devices (a new cache set).
fn spec(run: &RunDir, backing: &Path, caches: &[&Path]) -> DaemonSpec {
    let nodes = std::iter::once(backing)
        .chain(caches.iter().copied())
        .map(|d| open_node(d, false).unwrap().1)
        .collect();
    DaemonSpec {
        name: "d0".into(),
        backing: backing.to_path_buf(),
        caches: caches.iter().map(|c| c.to_path_buf()).collect(),
        policy: Default::default(),
        queues: 1,
        depth: 64,
        io_buf_bytes: 524288,
        run_dir: run.clone(),
        nodes,
        event_hook: None,
        config: None,
    }
}

const FORMAT: Start = Start::Format {
    logical_block_size: 512,
    force: false,
    dev_id: -1,
};

#[test]
fn the_daemon_makes_a_private_run_folder_and_private_files() {
    let test = "the_daemon_makes_a_private_run_folder_and_private_files";
    if !can_test(test) || have_ublk() {
        return eprintln!("SKIPPED {test}: also needs a kernel without ublk");
    }
    let rig = Rig::new();
    let (backing, c0, c1) = rig.devices();
    let run = rig.run();
    // Everything up to the ublk device: folder, lock, socket, cache format, RAM buffer file.
    let err = daemon::run(spec(&run, &backing, &[&c0, &c1]), FORMAT, |_| {}).unwrap_err();
    assert!(err.to_string().contains("ublk-control"), "{err}");
    assert_eq!(mode_of(&run.path), 0o700, "run folder");
    for file in [run.buffer("d0"), run.lock("d0")] {
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert!(meta.is_file() && meta.uid() == 0, "{}", file.display());
        assert_eq!(mode_of(&file), 0o600, "{}", file.display());
    }
    let state = rig.dead_daemon_state("d0", &backing, &c0);
    state.store(&run.state("d0")).unwrap();
    assert_eq!(mode_of(&run.state("d0")), 0o600, "state file");
    drop(run.open_log("d0").unwrap());
    assert_eq!(mode_of(&run.log("d0")), 0o600, "log file");
    let listener = control::bind_socket(&run.socket("d0")).unwrap();
    assert!(std::fs::symlink_metadata(run.socket("d0"))
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(mode_of(&run.socket("d0")), 0o600, "control socket");
    drop(listener);

    // Nobody can read the buffer, the state or the log, nor list the folder.
    let out = rig.wbctl(true, &["list"]);
    assert_fails_with(&out, &["ermission denied"]);
    for file in [run.buffer("d0"), run.state("d0"), run.log("d0")] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(&file)
            .output()
            .unwrap();
        assert_fails_with(&out, &["ermission denied"]);
    }
}

#[test]
fn an_untrusted_run_folder_is_refused_and_left_alone() {
    let test = "an_untrusted_run_folder_is_refused_and_left_alone";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let (backing, c0, _) = rig.devices();
    let run = rig.run();
    std::fs::create_dir(&run.path).unwrap();
    set_mode(&run.path, 0o700);
    // A dead daemon's state file, as someone else might plant it: `delete --force` would remove
    // /dev/ublkb5, `recover` would write to the devices it names.
    rig.dead_daemon_state("d0", &backing, &c0)
        .store(&run.state("d0"))
        .unwrap();
    let state_bytes = std::fs::read(run.state("d0")).unwrap();
    let create = ["create", "d0", "--backing", p(&backing), "--cache", p(&c0)];
    let commands: [&[&str]; 5] = [
        &["list"],
        &["delete", "d0", "--force"],
        &["recover", "d0"],
        &["status", "d0"],
        &create,
    ];
    let check = |needle: &str| {
        for args in commands {
            let out = rig.wbctl(false, args);
            assert_fails_with(&out, &[p(&run.path), needle, "refusing to trust"]);
            assert_eq!(std::fs::read(run.state("d0")).unwrap(), state_bytes);
        }
    };
    std::os::unix::fs::chown(&run.path, Some(NOBODY), Some(NOBODY)).unwrap();
    check("owned by uid 65534, not by root");
    std::os::unix::fs::chown(&run.path, Some(0), Some(0)).unwrap();
    for mode in [0o777, 0o775, 0o1777, 0o757] {
        set_mode(&run.path, mode);
        check("writable by group or others");
    }
    set_mode(&run.path, 0o700);
    let real = rig.path("real-run");
    std::fs::rename(&run.path, &real).unwrap();
    std::os::unix::fs::symlink(&real, &run.path).unwrap();
    check("is a symbolic link");
    std::fs::remove_file(&run.path).unwrap();
    std::fs::rename(&real, &run.path).unwrap();

    // With a non-root uid: a folder of one's own is refused just the same.
    let theirs = rig.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    set_mode(&theirs, 0o700);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_wbctl"))
        .args(["--run-dir", p(&theirs), "list"])
        .output()
        .unwrap();
    assert_fails_with(&out, &["owned by uid 65534, not by root"]);

    // A state file that names another device than its own is not believed either.
    let mut other = rig.dead_daemon_state("d0", &backing, &c0);
    other.name = "../d1".into();
    other.store(&run.state("d0")).unwrap();
    let out = rig.wbctl(false, &["delete", "d0", "--force"]);
    assert_fails_with(&out, &["describes device '../d1', not 'd0'"]);
    assert!(run.state("d0").exists());
}

#[test]
fn a_symlinked_buffer_file_stops_create_and_its_target_is_untouched() {
    let test = "a_symlinked_buffer_file_stops_create_and_its_target_is_untouched";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let (backing, c0, c1) = rig.devices();
    let run = rig.run();
    std::fs::create_dir(&run.path).unwrap();
    set_mode(&run.path, 0o700);
    let victim = rig.path("victim");
    std::fs::write(&victim, b"someone else's file").unwrap();
    std::os::unix::fs::symlink(&victim, run.buffer("d0")).unwrap();
    let caches = [&c0, &c1].map(|c| std::fs::read(c).unwrap());
    let out = rig.wbctl(
        false,
        &[
            "create",
            "d0",
            "--backing",
            p(&backing),
            "--cache",
            p(&c0),
            "--cache",
            p(&c1),
        ],
    );
    assert_fails_with(&out, &[p(&run.buffer("d0")), "symbolic link"]);
    assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's file");
    assert!(caches == [&c0, &c1].map(|c| std::fs::read(c).unwrap()));

    // The daemon's own open refuses it too (`create` checks, then the daemon opens again).
    if !have_ublk() {
        let err = daemon::run(spec(&run, &backing, &[&c0, &c1]), FORMAT, |_| {}).unwrap_err();
        // A new cache set removes the old name's buffer file: the link itself, not its target.
        assert!(err.to_string().contains("ublk-control"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's file");
        let attach = Start::Attach { dev_id: -1 };
        unlocked(&run);
        std::fs::remove_file(run.buffer("d0")).unwrap();
        std::os::unix::fs::symlink(&victim, run.buffer("d0")).unwrap();
        let err = daemon::run(spec(&run, &backing, &[&c0, &c1]), attach, |_| {}).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"someone else's file");
    }
}

/// Serves a control socket at `run`'s d0 with the daemon's own accept loop; every request that
/// gets through is counted and answered "served".
fn serve(run: &RunDir) -> Arc<AtomicUsize> {
    let listener = control::bind_socket(&run.socket("d0")).unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        control::serve_socket(listener, 4, move |_request, mut stream| {
            count.fetch_add(1, Ordering::SeqCst);
            let message = "served".to_string();
            let _ = control::send_line(&mut stream, &Reply::Done { message });
        })
    });
    served
}

#[test]
fn the_control_socket_admits_root_alone() {
    let test = "the_control_socket_admits_root_alone";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let run = rig.run();
    // 0755 here, so that nobody reaches the socket itself: what it allows is its own mode.
    std::fs::create_dir(&run.path).unwrap();
    set_mode(&run.path, 0o755);
    let served = serve(&run);
    assert_eq!(mode_of(&run.socket("d0")), 0o600);
    let out = rig.wbctl(false, &["drain", "d0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("served"));
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // The socket's mode keeps nobody out ...
    for args in [["drain", "d0"], ["status", "d0"]] {
        let out = rig.wbctl(true, &args);
        assert_fails_with(&out, &["permission denied", "only root"]);
    }
    // ... and where it does not (a careless mode), the daemon asks the kernel who connected.
    set_mode(&run.socket("d0"), 0o666);
    for args in [
        vec!["drain", "d0"],
        vec!["delete", "d0", "--force"],
        vec!["set", "d0", "low_watermark=0.5"],
    ] {
        let out = rig.wbctl(true, &args);
        assert_fails_with(
            &out,
            &[
                "permission denied: only root may control writeboost devices",
                "uid 65534",
            ],
        );
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        1,
        "a request of nobody's was served"
    );
}

/// Sends `bytes` on a fresh connection (then half-closes it) and returns the reply.
fn raw_request(run: &RunDir, bytes: &[u8]) -> Reply {
    let mut stream = UnixStream::connect(run.socket("d0")).unwrap();
    // The daemon may answer before it has read everything: a refused write is no failure.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // One line: the daemon may close (with our unread bytes: ECONNRESET) right after it.
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .unwrap();
    serde_json::from_str(reply.trim_end()).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

#[test]
fn an_oversize_control_line_is_refused() {
    let test = "an_oversize_control_line_is_refused";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let run = rig.run();
    run.prepare().unwrap();
    let served = serve(&run);
    // Just within the bound: read whole (and refused as JSON, not for its size).
    let mut line = vec![b' '; control::MAX_REQUEST_BYTES - 20];
    line.extend_from_slice(b"{\"cmd\":\"drain\"}\n");
    assert!(matches!(raw_request(&run, &line), Reply::Done { .. }));
    assert_eq!(served.load(Ordering::SeqCst), 1);
    // Beyond it, with and without a newline at the end: refused unread.
    for tail in [&b""[..], b"\n"] {
        let mut line = vec![b'x'; 4 * control::MAX_REQUEST_BYTES];
        line.extend_from_slice(tail);
        match raw_request(&run, &line) {
            Reply::Error { error } => {
                assert!(error.contains("request longer than 65536 bytes"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }
    match raw_request(&run, b"{\"cmd\":\"no such thing\"}\n") {
        Reply::Error { error } => assert!(error.contains("bad request"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[test]
fn a_process_named_wbctl_is_no_running_daemon_but_the_lock_is() {
    let test = "a_process_named_wbctl_is_no_running_daemon_but_the_lock_is";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let (backing, c0, _) = rig.devices();
    let run = rig.run();
    run.prepare().unwrap();
    // Any user can run a program called wbctl (its /proc/PID/comm says so).
    let fake = rig.path("wbctl");
    std::fs::copy("/bin/sleep", &fake).unwrap();
    set_mode(&fake, 0o755);
    let mut impostor = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&fake)
        .arg("60")
        .spawn()
        .unwrap();
    let mut state = rig.dead_daemon_state("d0", &backing, &c0);
    state.pid = impostor.id();
    state.store(&run.state("d0")).unwrap();
    let running = |rig: &Rig| {
        let out = rig.wbctl(false, &["list", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list[0]["running"].as_bool().unwrap()
    };
    // setpriv execs the impostor under the same pid; wait for that (not a timing assertion).
    let comm = || std::fs::read_to_string(format!("/proc/{}/comm", impostor.id()));
    for _ in 0..200 {
        if comm().is_ok_and(|c| c.trim() == "wbctl") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(comm().unwrap().trim(), "wbctl");
    assert!(
        !running(&rig),
        "a process of nobody's called wbctl passed for the daemon"
    );
    // The daemon's lock (root's file, in root's folder) does say it runs.
    let lock = run.lock_name("d0").unwrap();
    assert!(running(&rig));
    assert!(run.lock_name("d0").is_err(), "the lock is taken twice");
    drop(lock);
    unlocked(&run);
    assert!(!running(&rig));
    let _ = impostor.kill();
    let _ = impostor.wait();
}

#[test]
fn a_second_daemon_of_a_name_leaves_the_first_ones_socket_alone() {
    let test = "a_second_daemon_of_a_name_leaves_the_first_ones_socket_alone";
    if !can_test(test) {
        return;
    }
    let rig = Rig::new();
    let (backing, c0, c1) = rig.devices();
    let run = rig.run();
    run.prepare().unwrap();
    // The first daemon has its lock and has just bound its socket (not listening yet, or
    // between bind and listen): to a second daemon it looks stale.
    let _first = run.lock_name("d0").unwrap();
    let listener = control::bind_socket(&run.socket("d0")).unwrap();
    let ino = std::fs::symlink_metadata(run.socket("d0")).unwrap().ino();
    drop(listener);
    let before = [&c0, &c1].map(|c| std::fs::read(c).unwrap());
    let err = daemon::run(spec(&run, &backing, &[&c0, &c1]), FORMAT, |_| {}).unwrap_err();
    assert!(err.to_string().contains("name in use"), "{err}");
    assert_eq!(
        std::fs::symlink_metadata(run.socket("d0")).unwrap().ino(),
        ino,
        "the second daemon replaced the first one's socket"
    );
    assert!(before == [&c0, &c1].map(|c| std::fs::read(c).unwrap()));
}

/// A user other than root is told to run as root, never that a device is down (which would
/// send them to `wbctl recover`), and a health check from such a user is UNKNOWN, not OK.
#[test]
fn a_non_root_user_is_told_to_run_as_root() {
    if !can_test("a_non_root_user_is_told_to_run_as_root") {
        return;
    }
    let rig = Rig::new();
    let run = rig.run();
    std::fs::create_dir_all(&run.path).unwrap();
    set_mode(&run.path, 0o700);
    let (backing, c0, _) = rig.devices();
    rig.dead_daemon_state("d0", &backing, &c0)
        .store(&run.state("d0"))
        .unwrap();
    for args in [
        vec!["--run-dir", p(&run.path), "status"],
        vec!["--run-dir", p(&run.path), "list"],
        vec!["--run-dir", p(&run.path), "status", "d0"],
    ] {
        let out = rig.wbctl(true, &args);
        assert_fails_with(&out, &["permission denied", "root"]);
        assert!(!text(&out).contains("not running"), "{}", text(&out));
    }
    let out = rig.wbctl(true, &["--run-dir", p(&run.path), "status", "-x"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("UNKNOWN") && text(&out).contains("run as root"));
}
