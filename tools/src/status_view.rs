//! Pieces of `wbctl status` that are pure functions of a status: the JSON document's shape
//! (`output_version`), human durations, and the `--watch` lines (one per device per interval,
//! like `zpool iostat N`).

use std::time::Duration;

use jiff::{RoundMode, SignedDuration, Span, SpanRound, Unit};
use serde_json::Value;
use wb_target::control::DeviceStatus;

use crate::health::percent;
use crate::ssd_health::LegHealth;

/// The version of the `status --json` and `status -x --json` documents. Raise it when a field
/// changes meaning or goes away (adding one does not).
pub const OUTPUT_VERSION: u32 = 1;

/// The one shape of `status --json`, whether one device was asked for or all:
/// `{"output_version": 1, "devices": [...]}`.
pub fn json_document(devices: Vec<Value>) -> Value {
    serde_json::json!({ "output_version": OUTPUT_VERSION, "devices": devices })
}

/// One device's object in `status --json`: the daemon's status, each leg with its SSD health
/// (`"ssd_health": {"source": "nvme"|"smartctl"|"unknown", ...}`) read by wbctl; a leg's
/// `"health"` stays the engine's word on it (`ok`, `failed`).
pub fn device_json(s: &DeviceStatus, ssds: &LegHealth) -> serde_json::Result<Value> {
    let mut v = serde_json::to_value(s)?;
    if let Some(legs) = v["legs"].as_array_mut() {
        for leg in legs {
            let path = leg["path"].as_str().unwrap_or_default().to_string();
            if let Some(h) = ssds.get(&path) {
                leg["ssd_health"] = serde_json::to_value(h)?;
            }
        }
    }
    Ok(v)
}

/// `3d 4h 12m`, `4h`, `12m 5s`, `5s`, for people: to the minute from an hour up, else to the
/// second (a unit that is zero is left out).
pub fn human_duration(secs: u64) -> String {
    let smallest = if secs >= 3600 {
        Unit::Minute
    } else {
        Unit::Second
    };
    let rounding = SpanRound::new()
        .largest(Unit::Day)
        .smallest(smallest)
        .mode(RoundMode::Trunc)
        .days_are_24_hours();
    let span = i64::try_from(secs)
        .ok()
        .and_then(|s| Span::new().try_seconds(s).ok())
        .and_then(|span| span.round(rounding).ok());
    match span {
        // `{:#}`: jiff's "friendly" format, `1m 15s`.
        Some(span) => format!("{span:#}"),
        // Past jiff's range (some 20,000 years): no real age or uptime, so the number as is.
        None => format!("{secs}s"),
    }
}

/// The interval of `--watch`: whole seconds (`2`, as `zpool iostat 2` takes it), or a duration
/// with units (`500ms`, `2s`, `1m`, `1h30m`). At least 100 ms, so a typo cannot make a busy
/// loop of status queries.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("'{text}': not an interval (e.g. 2, 2s, 500ms, 1m)");
    let interval = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(text.parse().map_err(|_| bad())?)
    } else {
        // Days and weeks are refused: they are calendar units to jiff, and no one watches a
        // device once a week.
        let signed: SignedDuration = text.parse().map_err(|_| bad())?;
        Duration::try_from(signed).map_err(|_| bad())?
    };
    if interval < Duration::from_millis(100) {
        return Err(format!("'{text}': the interval must be at least 100ms"));
    }
    Ok(interval)
}

const MIB: f64 = (1u64 << 20) as f64;

/// The column titles of `--watch`.
pub fn watch_header() -> String {
    format!(
        "{:<16} {:<12} {:>7} {:>9} {:>11} {:>10} {:>7} {:>9}",
        "NAME", "MODE", "DIRTY", "WB_LAG", "WRITE_MiB/s", "WB_MiB/s", "HITS", "STALL_1m"
    )
}

/// One device's `--watch` line: mode, dirty %, writeback lag, write and writeback rates (over
/// the daemon's last second), read hits (since start) and the ms writers waited for cache
/// space in the last minute.
pub fn watch_line(s: &DeviceStatus) -> String {
    format!(
        "{:<16} {:<12} {:>6.1}% {:>9} {:>11.1} {:>10.1} {:>6.1}% {:>9}",
        s.name,
        s.mode,
        s.dirty_percent,
        human_duration(s.oldest_dirty_age_secs),
        s.write_bytes_per_sec as f64 / MIB,
        s.written_back_bytes_per_sec as f64 / MIB,
        percent(s.reads.hits, s.reads.hits + s.reads.misses),
        s.stall_ms_last_minute
    )
}

/// The `--watch` line of a device whose status could not be read.
pub fn watch_line_down(name: &str, error: &str) -> String {
    format!("{name:<16} {:<12} {error}", "down")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_leg_object_carries_its_ssd_health() {
        use crate::ssd_health::SsdHealth;
        let s: DeviceStatus = serde_json::from_value(serde_json::json!({
            "name": "d", "device": "/dev/ublkb0", "dev_id": 0, "pid": 1, "mode": "mirrored",
            "failure": null, "cache_lost_at": null, "backing": "/dev/sda",
            "legs": [
                {"path": "/dev/a", "health": "ok", "errors": 0, "read_errors": 0,
                 "write_errors": 0, "repairs": 0},
                {"path": "/dev/b", "health": "failed", "errors": 0, "read_errors": 0,
                 "write_errors": 0, "repairs": 0}
            ],
            "device_size_bytes": 1u64 << 30, "logical_block_size": 4096,
            "capacity_bytes": 1000, "used_bytes": 0, "dirty_bytes": 0,
            "segments": {"current_id": 1, "last_flushed_id": 0, "last_written_back_id": 0},
            "epoch_id": 1, "reads": {"requests": 0, "hits": 0, "misses": 0},
            "writes": 0, "write_bytes": 0, "flushes": 0, "written_back_bytes": 0,
            "backing_write_ios": 0, "backing_errors": 0, "passthrough_writes": 0,
            "write_bytes_per_sec": 0, "written_back_bytes_per_sec": 0, "stall_ms": 0,
            "map_bytes": 0, "metadata_bytes": 0, "queues": 1, "depth": 64,
            "uptime_secs": 1, "policy": {}
        }))
        .expect("a status");
        let ssds = LegHealth::from([(
            "/dev/a".to_string(),
            SsdHealth::unknown(None, "not a block device"),
        )]);
        let v = device_json(&s, &ssds).unwrap();
        assert_eq!(v["legs"][0]["health"], "ok", "the engine's word stays");
        assert_eq!(v["legs"][0]["ssd_health"]["source"], "unknown");
        assert_eq!(v["legs"][0]["ssd_health"]["reason"], "not a block device");
        assert_eq!(v["legs"][1]["health"], "failed");
        assert!(
            v["legs"][1].get("ssd_health").is_none(),
            "not read: not shown"
        );
        assert_eq!(v["name"], "d");
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(65), "1m 5s");
        assert_eq!(human_duration(3600), "1h");
        assert_eq!(human_duration(3600 + 59), "1h", "to the minute");
        assert_eq!(
            human_duration(3 * 86_400 + 4 * 3600 + 12 * 60 + 7),
            "3d 4h 12m"
        );
        assert_eq!(human_duration(86_400 + 60), "1d 1m");
        assert_eq!(human_duration(u64::MAX), "18446744073709551615s");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_interval("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "0", "10ms", "2 weeks", "-1", "-2s", "s", "1x"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_watch_line_has_a_column_per_title() {
        let mut s: DeviceStatus = serde_json::from_value(serde_json::json!({
            "name": "tank0", "device": "/dev/ublkb0", "dev_id": 0, "pid": 1, "mode": "mirrored",
            "failure": null, "cache_lost_at": null, "backing": "/dev/sda", "legs": [],
            "device_size_bytes": 1u64 << 30, "logical_block_size": 4096,
            "capacity_bytes": 1000, "used_bytes": 0, "dirty_bytes": 125,
            "segments": {"current_id": 1, "last_flushed_id": 0, "last_written_back_id": 0},
            "epoch_id": 1, "reads": {"requests": 4, "hits": 3, "misses": 1},
            "writes": 0, "write_bytes": 0, "flushes": 0, "written_back_bytes": 0,
            "backing_write_ios": 0, "backing_errors": 0, "passthrough_writes": 0,
            "write_bytes_per_sec": 3u64 << 20, "written_back_bytes_per_sec": 1u64 << 19,
            "stall_ms": 900, "map_bytes": 0, "metadata_bytes": 0, "queues": 1, "depth": 64,
            "uptime_secs": 1, "policy": {}
        }))
        .expect("a status");
        (
            s.dirty_percent,
            s.oldest_dirty_age_secs,
            s.stall_ms_last_minute,
        ) = (12.5, 75, 40);
        let line = watch_line(&s);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            ["tank0", "mirrored", "12.5%", "1m", "15s", "3.0", "0.5", "75.0%", "40"],
            "{line}"
        );
        // The columns line up with the titles (the lag's two words are one column).
        let header = watch_header();
        assert_eq!(header.split_whitespace().count(), 8);
        assert_eq!(line.len(), header.len(), "\n{header}\n{line}");
    }
}
