//! Events for the administrator's hook (`event_hook` in the device's TOML, `wbctl create
//! --event-hook`): a mode change, a cache leg failing or coming back, a cache loss. They are
//! found by comparing the engine's status once a second (the `wb-stats` thread) and handed to
//! the hook as a separate process with the facts in its environment — the way ZED zedlets and
//! `mdadm --monitor --program` work. Nothing on the I/O path waits for it: a thread of its own
//! runs the hook once per event, one after the other, in the order the events happened.
//!
//! The hook's environment:
//! - `WRITEBOOST_EVENT`: `mode_changed`, `leg_failed`, `leg_restored` or `cache_lost`;
//! - `WRITEBOOST_SEVERITY`: `crit`, `err`, `warning` or `info` (as in the journal);
//! - `WRITEBOOST_NAME`, `WRITEBOOST_DEVICE` (/dev/ublkbN), `WRITEBOOST_MODE`,
//!   `WRITEBOOST_PREVIOUS_MODE`, `WRITEBOOST_DIRTY_BYTES`;
//! - for leg events, `WRITEBOOST_LEG` (its index) and `WRITEBOOST_LEG_PATH`;
//! - for a cache loss, `WRITEBOOST_BACKING_HOLDS_ID` (the backing device holds the log up to it).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::engine::status::EngineStatus;

/// One event and its facts (`WRITEBOOST_*` variables besides name, device and mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: &'static str,
    pub severity: &'static str,
    pub vars: Vec<(&'static str, String)>,
}

/// What changed from `prev` to `now`: leg events first, then a loss, then the mode change.
pub fn between(prev: &EngineStatus, now: &EngineStatus) -> Vec<Event> {
    let mut events = Vec::new();
    for (i, (was, is)) in prev.legs.iter().zip(&now.legs).enumerate() {
        if was.healthy == is.healthy && was.path == is.path {
            continue;
        }
        let (kind, severity) = if is.healthy {
            ("leg_restored", "info")
        } else {
            ("leg_failed", "err")
        };
        events.push(Event {
            kind,
            severity,
            vars: vec![
                ("WRITEBOOST_LEG", i.to_string()),
                ("WRITEBOOST_LEG_PATH", is.path.clone()),
            ],
        });
    }
    if let (None, Some(lost)) = (&prev.cache_lost, &now.cache_lost) {
        events.push(Event {
            kind: "cache_lost",
            severity: "crit",
            vars: vec![(
                "WRITEBOOST_BACKING_HOLDS_ID",
                lost.backing_holds_id.to_string(),
            )],
        });
    }
    if prev.shown_mode() != now.shown_mode() {
        let severity = match now.shown_mode() {
            "mirrored" | "single" => "info",
            "failed" => "crit",
            _ => "warning",
        };
        events.push(Event {
            kind: "mode_changed",
            severity,
            vars: Vec::new(),
        });
    }
    events
}

/// Runs `hook` once per event, one after the other in their order, on a thread of its own:
/// returns at once, so the caller never waits for the hook. A hook that cannot start or fails
/// is logged.
pub fn run_hooks(
    hook: &Path,
    name: &str,
    device: &str,
    prev: &EngineStatus,
    now: &EngineStatus,
    events: Vec<Event>,
) {
    if events.is_empty() {
        return;
    }
    let commands: Vec<(Command, &'static str)> = events
        .iter()
        .map(|e| (command(hook, name, device, prev, now, e), e.kind))
        .collect();
    let shown = hook.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("wb-hook".into())
        .spawn(move || {
            for (mut cmd, kind) in commands {
                match cmd.status() {
                    Ok(status) if status.success() => {}
                    Ok(status) => log::warn!("event hook {shown} ({kind}) exited with {status}"),
                    Err(e) => log::warn!("event hook {shown} ({kind}): {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("event hook {}: {e}", hook.display());
    }
}

/// The hook's command and environment for one event.
fn command(
    hook: &Path,
    name: &str,
    device: &str,
    prev: &EngineStatus,
    now: &EngineStatus,
    event: &Event,
) -> Command {
    let mut cmd = Command::new(hook);
    cmd.stdin(Stdio::null())
        .env("WRITEBOOST_EVENT", event.kind)
        .env("WRITEBOOST_SEVERITY", event.severity)
        .env("WRITEBOOST_NAME", name)
        .env("WRITEBOOST_DEVICE", device)
        .env("WRITEBOOST_MODE", now.shown_mode())
        .env("WRITEBOOST_PREVIOUS_MODE", prev.shown_mode())
        .env("WRITEBOOST_DIRTY_BYTES", now.dirty_bytes.to_string());
    for (k, v) in &event.vars {
        cmd.env(k, v);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::status::{CacheLostStatus, LegStatus};

    fn status(mode: &str, healthy: &[bool]) -> EngineStatus {
        EngineStatus {
            mode: mode.into(),
            legs: healthy
                .iter()
                .enumerate()
                .map(|(i, &healthy)| LegStatus {
                    path: format!("/dev/leg{i}"),
                    healthy,
                    read_errors: 0,
                    write_errors: 0,
                    repairs: 0,
                })
                .collect(),
            dirty_bytes: 4096,
            ..EngineStatus::default()
        }
    }

    fn kinds(events: &[Event]) -> Vec<(&str, &str)> {
        events.iter().map(|e| (e.kind, e.severity)).collect()
    }

    #[test]
    fn events_between_two_statuses() {
        let mirrored = status("mirrored", &[true, true]);
        assert!(
            between(&mirrored, &mirrored).is_empty(),
            "no change, no event"
        );
        let degraded = status("degraded", &[false, true]);
        let e = between(&mirrored, &degraded);
        assert_eq!(
            kinds(&e),
            vec![("leg_failed", "err"), ("mode_changed", "warning")]
        );
        assert_eq!(
            e[0].vars,
            vec![
                ("WRITEBOOST_LEG", "0".to_string()),
                ("WRITEBOOST_LEG_PATH", "/dev/leg0".to_string())
            ]
        );
        let passthrough = status("passthrough", &[false, true]);
        assert_eq!(
            kinds(&between(&degraded, &passthrough)),
            vec![("mode_changed", "warning")]
        );
        let mut lost = status("passthrough", &[false, false]);
        lost.cache_lost = Some(CacheLostStatus {
            backing_holds_id: 9,
            lost_from_id: 10,
            lost_through_id: 12,
            lost_dirty_bytes: Some(8192),
        });
        let e = between(&passthrough, &lost);
        assert_eq!(
            kinds(&e),
            vec![("leg_failed", "err"), ("cache_lost", "crit")]
        );
        assert_eq!(
            e[1].vars,
            vec![("WRITEBOOST_BACKING_HOLDS_ID", "9".to_string())]
        );
        assert_eq!(
            kinds(&between(&passthrough, &mirrored)),
            vec![("leg_restored", "info"), ("mode_changed", "info")]
        );
    }

    #[test]
    fn the_hook_gets_the_facts_in_its_environment_one_event_after_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events");
        let hook = dir.path().join("hook");
        // One line per event, appended in one write; a second hook at once would interleave.
        let script = format!(
            "#!/bin/sh\nline=$(env | grep ^WRITEBOOST_ | sort | tr '\\n' ' ')\n\
             [ -e {0}.busy ] && echo OVERLAP >> {0}\ntouch {0}.busy\nsleep 0.2\n\
             echo \"$line\" >> {0}\nrm {0}.busy\n",
            out.display()
        );
        std::fs::write(&hook, script).unwrap();
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (prev, now) = (
            status("mirrored", &[true, true]),
            status("degraded", &[false, true]),
        );
        let events = between(&prev, &now);
        assert_eq!(events.len(), 2, "leg_failed, then mode_changed");
        run_hooks(&hook, "d0", "/dev/ublkb3", &prev, &now, events);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let lines = loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            if text.lines().count() >= 2 {
                break text.lines().map(str::to_string).collect::<Vec<_>>();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the hook did not run twice: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(lines.len(), 2, "{lines:?}");
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        let first = words(&lines[0]);
        for w in [
            "WRITEBOOST_EVENT=leg_failed",
            "WRITEBOOST_SEVERITY=err",
            "WRITEBOOST_NAME=d0",
            "WRITEBOOST_DEVICE=/dev/ublkb3",
            "WRITEBOOST_MODE=degraded",
            "WRITEBOOST_PREVIOUS_MODE=mirrored",
            "WRITEBOOST_DIRTY_BYTES=4096",
            "WRITEBOOST_LEG=0",
            "WRITEBOOST_LEG_PATH=/dev/leg0",
        ] {
            assert!(first.iter().any(|x| x == w), "{w} not in {first:?}");
        }
        let second = words(&lines[1]);
        assert!(
            second.iter().any(|x| x == "WRITEBOOST_EVENT=mode_changed"),
            "{second:?}"
        );
    }
}
