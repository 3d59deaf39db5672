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
//! The one exception is writeback, whose thread runs its loop under `catching`: a panic there
//! is logged, counted and retried from the checkpoint (`engine::lifecycle`) while the front end
//! keeps serving.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, PanicHookInfo};

thread_local! {
    /// Set while this thread runs inside `catching`.
    static CAUGHT_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` and returns its panic, if any, as an error: under `abort_on_uncaught_panics` this
/// is the only place a panic unwinds to instead of ending the process.
pub fn catching<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    let outer = CAUGHT_HERE.replace(true);
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
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
