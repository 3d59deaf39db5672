//! The stand-in daemon shared by the tests that run the real `wbctl` without ublk: a control
//! socket in a run folder that answers every `Status` request with a fixed status (no ublk, no
//! engine). Needs root (control sockets serve root alone).
#![allow(dead_code)] // Each test binary uses its own part.

use std::path::Path;
use std::process::{Command, Output};

use wb_target::control::{self, DeviceStatus, Reply, Request, RunDir};

/// Root, or the stand-in daemon turns the client away (as a real one would).
pub fn can_test(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    if !root {
        eprintln!("SKIPPED {test}: needs root");
    }
    root
}

/// A device 12.5 % dirty, its oldest dirty data 75 s old, up 3d 4h 12m, whose writers waited
/// 1500 ms for space in the last minute.
pub fn canned_status() -> DeviceStatus {
    serde_json::from_value(serde_json::json!({
        "name": "d0", "device": "/dev/ublkb0", "dev_id": 0, "pid": 1, "mode": "mirrored",
        "failure": null, "cache_lost_at": null, "backing": "/dev/sda",
        "legs": [
            {"path": "/dev/a", "health": "ok", "errors": 0, "read_errors": 0,
             "write_errors": 0, "repairs": 0},
            {"path": "/dev/b", "health": "ok", "errors": 0, "read_errors": 0,
             "write_errors": 0, "repairs": 0}
        ],
        "device_size_bytes": 1u64 << 30, "logical_block_size": 4096,
        "capacity_bytes": 8000, "used_bytes": 2000, "dirty_bytes": 1000, "dirty_percent": 12.5,
        "oldest_dirty_age_secs": 75,
        "segments": {"current_id": 9, "last_flushed_id": 8, "last_written_back_id": 3},
        "epoch_id": 1, "reads": {"requests": 4, "hits": 3, "misses": 1},
        "writes": 10, "write_bytes": 40960, "flushes": 1, "written_back_bytes": 0,
        "backing_write_ios": 0, "backing_errors": 0, "passthrough_writes": 0,
        "write_bytes_per_sec": 2u64 << 20, "written_back_bytes_per_sec": 1u64 << 20,
        "stall_ms": 9000, "stall_ms_last_minute": 1500, "stalled_recently": true,
        "map_bytes": 0, "metadata_bytes": 0, "queues": 1, "depth": 64,
        "uptime_secs": 3 * 86_400 + 4 * 3600 + 12 * 60,
        "policy": {"pressure_start": 0.8, "idle_aware": true, "pressure_curve": "linear"}
    }))
    .expect("a status")
}

/// SSD health for the canned status's legs, every SSD figure reported by one of them: /dev/a
/// an NVMe drive, /dev/b a SATA SSD read by smartctl. (The stand-in daemon's legs are paths
/// that do not exist, so the real `wbctl` finds their health unknown.)
pub fn canned_ssds() -> wb_tools::ssd_health::LegHealth {
    let h = |v: serde_json::Value| -> wb_tools::ssd_health::SsdHealth {
        serde_json::from_value(v).expect("an SSD health")
    };
    let none = serde_json::Value::Null;
    wb_tools::ssd_health::LegHealth::from([
        (
            "/dev/a".to_string(),
            h(serde_json::json!({
                "source": "nvme", "device": "/dev/nvme0n1", "reason": none,
                "percentage_used": 3, "available_spare": 100, "available_spare_threshold": 10,
                "critical_warning": 0, "media_errors": 0, "data_units_written": 10,
                "power_on_hours": 1, "temperature_celsius": 40, "reallocated_sectors": none,
                "smart_passed": none
            })),
        ),
        (
            "/dev/b".to_string(),
            h(serde_json::json!({
                "source": "smartctl", "device": "/dev/sdb", "reason": none,
                "percentage_used": 12, "available_spare": none, "available_spare_threshold": none,
                "critical_warning": none, "media_errors": none, "data_units_written": none,
                "power_on_hours": 2, "temperature_celsius": 30, "reallocated_sectors": 0,
                "smart_passed": true
            })),
        ),
    ])
}

/// A run folder with `d0`, served by a stand-in daemon for the life of the process, and `d1`,
/// a state file without a daemon (it shows as down).
pub fn run_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::new(dir.path().join("run"));
    run.prepare().unwrap();
    for name in ["d0", "d1"] {
        std::fs::write(run.state(name), "{}").unwrap();
    }
    let listener = std::os::unix::net::UnixListener::bind(run.socket("d0")).unwrap();
    std::thread::spawn(move || {
        control::serve_socket(listener, 4, |request, mut stream| {
            let reply = match request {
                Request::Status => Reply::Status {
                    status: Box::new(canned_status()),
                },
                _ => Reply::Error {
                    error: "not in this test".into(),
                },
            };
            let _ = control::send_line(&mut stream, &reply);
        })
    });
    dir
}

pub fn wbctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wbctl"))
        .args(args)
        .env("WRITEBOOST_RUN_DIR", dir.join("run"))
        .env_remove("RUST_LOG")
        .output()
        .expect("running wbctl")
}

pub fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `promtool` (Debian package `prometheus`; tests/vm/setup.sh installs it), or `None` with a
/// SKIPPED line naming what to install.
pub fn promtool(test: &str) -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED {test}: promtool not found (apt-get install --no-install-recommends \
             prometheus, or `make setup`)"
        );
    }
    found.then_some("promtool")
}

/// Asserts that `promtool check metrics` accepts `text` (fed on its stdin).
pub fn assert_promtool_accepts(promtool: &str, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
