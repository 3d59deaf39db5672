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
//! `x-systemd.requires=writeboost@NAME.service`), then removes it; systemd's stop timeout
//! bounds the wait.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{holders, notify_systemd, Daemon};
use crate::ublk::RequestGate;

/// How often a shutdown-time stop looks whether the device's users let go.
const USERS_POLL_INTERVAL: Duration = Duration::from_millis(500);

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
    let users = holders::users(device);
    match plan(&users, !users.is_empty() && system_shutting_down()) {
        StopPlan::Remove => {}
        StopPlan::LeaveToKernel => leave_to_kernel(daemon, gate, &users),
        StopPlan::WaitForUsers => {
            log::warn!(
                "{}: the system is shutting down and {} is still in use ({}); serving it until \
                 they let go (order them after writeboost@{}.service; for a mount: \
                 x-systemd.requires=writeboost@{}.service)",
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

/// Holds the device's I/O in the kernel, seals and flushes the log, and exits: 0 when the log
/// holds everything acknowledged, 1 when the flush failed (the RAM buffer file keeps it for the
/// next start, and systemd's `Restart=on-failure` starts that at once).
fn leave_to_kernel(daemon: &Daemon, gate: &RequestGate, users: &[String]) -> ! {
    let name = &daemon.spec.name;
    log::info!(
        "{name}: {} is in use ({}): leaving it to the kernel, which holds its I/O until the next \
         start takes it over (`systemctl start writeboost@{name}` or `wbctl recover {name}`)",
        daemon.device,
        users.join("; ")
    );
    notify_systemd("STATUS=leaving the device to the kernel");
    gate.hold();
    let run_dir = &daemon.spec.run_dir;
    let code = match daemon.engine.shutdown() {
        Ok(()) => {
            // Everything acknowledged is in the log: the next daemon needs no RAM buffer.
            let _ = std::fs::remove_file(run_dir.buffer(name));
            log::info!("{name}: log sealed and flushed; the device waits for the next start");
            0
        }
        Err(e) => {
            log::error!(
                "{name}: sealing and flushing the log failed: {e}; {} keeps what it held for \
                 the next start",
                run_dir.buffer(name).display()
            );
            1
        }
    };
    // The state file stays: it is how the next start finds the device to take over.
    let _ = std::fs::remove_file(run_dir.socket(name));
    std::process::exit(code)
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
