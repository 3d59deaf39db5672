//! A panic in a daemon thread ends the process (`wb_target::panics`), so that systemd restarts
//! the daemon and the device is recovered, instead of the dead thread's work hanging for ever
//! under a daemon that looks alive; writeback's own panics are caught and retried.
//!
//! Each case runs in a child process (this test binary again, with `WB_PANIC_CASE` set): the
//! daemon's hook, once installed, ends the process it is in.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Output};

use wb_target::panics;

const CASE_ENV: &str = "WB_PANIC_CASE";
const SIGABRT: i32 = 6;

/// The child's side: runs the case `WB_PANIC_CASE` names (nothing when it is unset, as in the
/// parent's own run of this test).
#[test]
fn child_case() {
    let Some(case) = std::env::var_os(CASE_ENV) else {
        return;
    };
    panics::abort_on_uncaught_panics();
    let thread = std::thread::Builder::new().name("wb-log-leg1".into());
    let joined = match case.to_str() {
        Some("uncaught") => thread
            .spawn(|| panic!("a leg writer's bug"))
            .unwrap()
            .join(),
        Some("caught") => thread
            .spawn(|| {
                let caught = panics::catching(|| panic!("a writeback bug"));
                let message = panics::message(&*caught.unwrap_err());
                println!("caught: {message}");
            })
            .unwrap()
            .join(),
        // Past `catching`, the thread is covered no more.
        Some("caught-then-uncaught") => thread
            .spawn(|| {
                let _ = panics::catching(|| panic!("a writeback bug"));
                panic!("a leg writer's bug");
            })
            .unwrap()
            .join(),
        // Engine code writeback calls (`fatal`) is not covered by writeback's `catching`.
        Some("fatal-inside-catching") => thread
            .spawn(|| {
                let _ = panics::catching(|| panics::fatal(|| panic!("a leg writer's bug")));
            })
            .unwrap()
            .join(),
        other => panic!("unknown case {other:?}"),
    };
    println!(
        "the process went on after the thread ended (joined: ok={})",
        joined.is_ok()
    );
}

fn run_case(case: &str) -> Output {
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "child_case", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case);
    // SAFETY: between fork and exec the closure only calls setrlimit, which is async-signal-safe
    // and touches no memory of the parent's (the aborts must not leave core files on CI hosts).
    unsafe {
        child.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    child.output().unwrap()
}

/// Without the hook the thread would die alone and the process go on (the child would print
/// "went on" and pass): a leg writer that died so leaves every later FLUSH waiting for ever.
#[test]
fn a_panic_outside_writeback_ends_the_process() {
    for case in ["uncaught", "caught-then-uncaught", "fatal-inside-catching"] {
        assert_aborted(case);
    }
}

fn assert_aborted(case: &str) {
    let out = run_case(case);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.signal(),
        Some(SIGABRT),
        "{case}: the process was not aborted: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        !stdout.contains("went on"),
        "{case}: the process went on after the panic:\n{stdout}"
    );
    assert!(
        stderr.contains("a leg writer's bug") && stderr.contains("wb-log-leg1"),
        "{case}: the panic's message and thread are not reported:\n{stderr}"
    );
}

/// A panic inside `catching` (writeback's loop) comes back as an error, and the process goes on.
#[test]
fn a_panic_inside_catching_is_returned_and_the_process_goes_on() {
    let out = run_case("caught");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the child failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("caught: a writeback bug"),
        "the panic's message did not come back:\n{stdout}"
    );
    assert!(
        stdout.contains("went on after the thread ended (joined: ok=true)"),
        "{stdout}"
    );
}
