//! A stop that no client sees (CONTRACT §6). SIGTERM or SIGINT (`systemctl stop`/`restart`, an
//! upgrade) while /dev/ublkbN is in use — mounted, exported by LIO, open by a process — does not
//! remove the device under its user: the daemon closes the `RequestGate` (requests already in
//! the engine complete; later ones stay with the kernel), seals and flushes the log, stops the
//! engine and exits, leaving the state file. The kernel quiesces the device and holds its I/O
//! (ublk user recovery) until the next `wbctl create`/`recover` of the name takes it over and
//! the kernel re-issues what it held. Nobody using it: the device is removed as before.
//!
//! At system shutdown nobody would take it over, so the daemon instead serves the device until
//! its users let go (units ordered after this one stop first; a mount needs
//! `x-systemd.after=writeboost@NAME.service`), then removes it; systemd's stop timeout
//! bounds the wait.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

use super::{holders, notify_systemd, Daemon};
use crate::ublk::RequestGate;

/// How often a shutdown-time stop looks whether the device's users let go.
const USERS_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a process that is the device's only user must stay to count: udev workers and
/// blkid open a device for a moment after every change event.
const PASSING_OPENER: Duration = Duration::from_secs(1);
/// How long the hand-over waits for the requests inside the engine (a writer waiting for cache
/// space, a FLUSH on a slow backing device). Past it the daemon leaves without the flush, as a
/// kill -9 would: the RAM buffer file keeps what the log does not.
const HOLD_LIMIT: Duration = Duration::from_secs(120);

/// What a stop signal does with the device.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StopPlan {
    /// Nobody uses it: stop and delete it.
    Remove,
    /// In use: leave it to the kernel for the next daemon.
    LeaveToKernel,
    /// In use while the system shuts down: serve it until its users let go, then remove it.
    WaitForUsers,
}

pub(super) fn plan(users: &[String], system_shutting_down: bool) -> StopPlan {
    match (users.is_empty(), system_shutting_down) {
        (true, _) => StopPlan::Remove,
        (false, false) => StopPlan::LeaveToKernel,
        (false, true) => StopPlan::WaitForUsers,
    }
}

/// Runs on a stop signal, before the device is stopped. Returns when the device is to be
/// removed; leaving it to the kernel ends the process here.
pub(super) fn on_stop_signal(daemon: &Daemon, gate: &RequestGate, queues_down: &AtomicBool) {
    let device = Path::new(&daemon.device);
    let users = lasting_users(device);
    match plan(&users, !users.is_empty() && system_shutting_down()) {
        StopPlan::Remove => {}
        StopPlan::LeaveToKernel => leave_to_kernel(daemon, gate, &users),
        StopPlan::WaitForUsers => {
            log::warn!(
                "{}: the system is shutting down and {} is still in use ({}); serving it until \
                 they let go (order them after writeboost@{}.service; for a mount: \
                 x-systemd.after=writeboost@{}.service)",
                daemon.spec.name,
                daemon.device,
                users.join("; "),
                daemon.spec.name,
                daemon.spec.name
            );
            while !queues_down.load(Ordering::SeqCst) && !holders::users(device).is_empty() {
                std::thread::sleep(USERS_POLL_INTERVAL);
            }
        }
    }
}

/// The device's users; a process that is the only user counts only if it is still there a
/// moment later.
fn lasting_users(device: &Path) -> Vec<String> {
    let users = holders::users(device);
    if users.is_empty() || !users.iter().all(|u| u.starts_with(holders::PROCESS_PREFIX)) {
        return users;
    }
    std::thread::sleep(PASSING_OPENER);
    let again = holders::users(device);
    users.into_iter().filter(|u| again.contains(u)).collect()
}

/// Holds the device's I/O in the kernel, seals and flushes the log, and exits: 0 when the log
/// holds everything acknowledged, 1 when it could not be flushed (the RAM buffer file keeps
/// what the log does not, for the next start). The RAM buffer file is never removed here: a
/// flush that "succeeded" without writing (a cache loss not yet on record keeps its segments
/// there) must not take the last copy with it, and after a real flush the next daemon finds
/// nothing in it to adopt.
fn leave_to_kernel(daemon: &Daemon, gate: &RequestGate, users: &[String]) -> ! {
    let name = &daemon.spec.name;
    log::info!(
        "{name}: {} is in use ({}): leaving it to the kernel, which holds its I/O until the next \
         start takes it over (`systemctl start writeboost@{name}` or `wbctl recover {name}`)",
        daemon.device,
        users.join("; ")
    );
    notify_systemd(&[
        NotifyState::Stopping,
        NotifyState::Status("leaving the device to the kernel"),
    ]);
    let code = if !gate.hold(HOLD_LIMIT) {
        log::error!(
            "{name}: requests still inside after {HOLD_LIMIT:?}; leaving without flushing the log \
             (the RAM buffer file keeps what it holds for the next start)"
        );
        1
    } else {
        match daemon.engine.shutdown() {
            Ok(()) => {
                log::info!("{name}: log sealed and flushed; the device waits for the next start");
                0
            }
            Err(e) => {
                log::error!(
                    "{name}: sealing and flushing the log failed: {e}; the RAM buffer file \
                     keeps what it held for the next start"
                );
                1
            }
        }
    };
    // The state file stays: it is how the next start finds the device to take over. It says
    // the daemon left on purpose, so that status and the next start do not report a crash.
    let mut state = daemon.state();
    state.handed_over = true;
    state.counters = Some(daemon.engine.counters());
    if let Err(e) = state.store(&daemon.spec.run_dir.state(name)) {
        log::warn!("{name}: marking the state file as handed over: {e}");
    }
    let _ = std::fs::remove_file(daemon.spec.run_dir.socket(name));
    log::logger().flush();
    // SAFETY: _exit ends the process at once, without running atexit handlers or destructors
    // while the queue threads still wait in the gate; the log was flushed just above, and every
    // file the successor needs (state file, RAM buffer, cache legs) is already written.
    unsafe { libc::_exit(code) }
}

/// Whether systemd is taking the system down (only asked when run by systemd).
fn system_shutting_down() -> bool {
    if std::env::var_os("INVOCATION_ID").is_none() {
        return false;
    }
    Command::new("systemctl")
        .arg("is-system-running")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "stopping")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_removed_only_when_nobody_uses_it() {
        let used = vec!["mounted on /srv (xfs)".to_string()];
        assert_eq!(plan(&[], false), StopPlan::Remove);
        assert_eq!(plan(&[], true), StopPlan::Remove);
        assert_eq!(plan(&used, false), StopPlan::LeaveToKernel);
        assert_eq!(plan(&used, true), StopPlan::WaitForUsers);
    }
}
