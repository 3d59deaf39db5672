//! What a panic does in the daemon: it ends the process, unless writeback caught it.
//!
//! A panic is a bug, and a thread of the I/O path that died of one alone would hurt clients
//! while the daemon looks alive: a dead leg writer or log writer leaves every later FLUSH
//! waiting for ever, a dead ublk queue thread has the device removed under a mounted file
//! system. And the engine's lock (parking_lot) is not poisoned by a panic, so the other threads
//! would go on with whatever half-made change the dead one left. Ending the whole process is a
//! crash like `kill -9`, the path the crash tests prove: the kernel holds the device's I/O
//! (ublk user recovery), systemd restarts the daemon, and `wbctl create` takes the device over
//! and recovers the log; nothing acknowledged is lost.
//!
//! The one exception is writeback's own logic: its thread (`wb-writeback`) runs its loop under
//! `catching`, and a panic there is logged, counted and retried from the checkpoint
//! (`engine::lifecycle`) while the front end keeps serving. Not covered, so fatal as anywhere
//! else: the engine code writeback calls that changes the engine's state (`fatal`: the commit
//! that frees log space, reading a segment from a leg), and writeback's helper threads
//! (`wb-read`, `wb-read-ahead`, `wb-write`: the flag is per thread).

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};

thread_local! {
    /// Set while this thread runs inside `catching`.
    static CAUGHT_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` and returns its panic, if any, as an error: under `abort_on_uncaught_panics` this
/// is the only place a panic unwinds to instead of ending the process. The caller vouches that
/// what `f` changes is sound after a panic half-way (code that changes the engine's state runs
/// under `fatal`). Only this thread is covered: a thread `f` starts is not.
pub fn catching<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    within(true, || std::panic::catch_unwind(AssertUnwindSafe(f)))
}

/// Runs `f` with a panic in it ending the process even inside `catching`: for code that
/// changes state other threads share, which a half-made change would leave unsound.
pub fn fatal<R>(f: impl FnOnce() -> R) -> R {
    within(false, f)
}

/// Runs `f` with `CAUGHT_HERE` set to `caught`, then puts the outer value back (an unwinding
/// panic passes through here only on its way to a `catching`, which then restores its own).
fn within<R>(caught: bool, f: impl FnOnce() -> R) -> R {
    let outer = CAUGHT_HERE.replace(caught);
    let result = f();
    CAUGHT_HERE.set(outer);
    result
}

/// The message of a panic's payload (`panic!` gives a `&str` or a `String`).
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Installs the daemon's panic hook: every panic is reported as Rust reports it (stderr, which
/// systemd puts in the journal), and one outside `catching` then ends the process (`abort`:
/// no destructor runs, as with `kill -9`, and the core dump shows where).
pub fn abort_on_uncaught_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
        report(info);
        if CAUGHT_HERE.get() {
            return;
        }
        let thread = std::thread::current();
        log::error!(
            target: crate::CRITICAL_LOG_TARGET,
            "a panic in thread {}: {info}; ending the daemon (the kernel holds the device's \
             I/O until the daemon is started again: systemd restarts it, or `wbctl recover`)",
            thread.name().unwrap_or("(unnamed)")
        );
        std::process::abort();
    }));
}
