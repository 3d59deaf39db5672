//! `wbctl status -x`: one verdict per device in the Nagios plugin convention, so that a cron
//! job, Nagios, Zabbix or a shell `if` can notice a dead SSD without a JSON parser.
//!
//! - 0 OK — mirrored (or single, as created), the cache in use;
//! - 1 WARNING — a leg failed (degraded, or passthrough until `wbctl replace`), dirty data
//!   above the writeback pressure point, writers stalled recently (they waited for cache space
//!   within the last minute: `stall_ms_last_minute`), backing-device errors, a cache leg's SSD
//!   worn past 80 %, its spare below the drive's threshold, a critical warning in its SMART log
//!   or a failed SMART self-assessment (`ssd_health::warnings`);
//! - 2 CRITICAL — the cache was lost, no cache leg is usable, requests fail (a fault that can be
//!   recorded nowhere: status `failure`), the daemon is down (its device waits for
//!   `wbctl recover`);
//! - 3 UNKNOWN — the status could not be read (e.g. not root).
//!
//! The exit status of `status -x` is the worst verdict over the devices shown.

use wb_target::control::DeviceStatus;

use crate::ssd_health::{self, LegHealth};

/// A verdict, ordered from best to worst except `Unknown`, which ranks below `Critical` when
/// verdicts are combined (a device known to be critical is worse than one not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Critical => "CRITICAL",
            Health::Unknown => "UNKNOWN",
        }
    }

    fn rank(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Unknown => 2,
            Health::Critical => 3,
        }
    }

    /// The worse of two verdicts (the exit status over several devices).
    pub fn worst(self, other: Health) -> Health {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

/// The verdict on one device whose daemon answered, and why, in a few words.
pub fn of_status(s: &DeviceStatus) -> (Health, String) {
    let failed_legs: Vec<&str> = s
        .legs
        .iter()
        .filter(|l| l.health != "ok")
        .map(|l| l.path.as_str())
        .collect();
    let dirty = percent(s.dirty_bytes, s.capacity_bytes);
    if let Some(lost) = &s.cache_lost {
        let gone = lost
            .lost_dirty_bytes
            .map_or("its dirty data".to_string(), |b| format!("{b} dirty bytes"));
        return (
            Health::Critical,
            format!(
                "cache lost ({gone}); the backing device holds segments up to {}; passthrough",
                lost.backing_holds_id
            ),
        );
    }
    if let Some(why) = &s.failure {
        return (Health::Critical, format!("requests fail: {why}"));
    }
    if !s.legs.is_empty() && failed_legs.len() == s.legs.len() {
        return (Health::Critical, "no usable cache leg".into());
    }
    if !failed_legs.is_empty() {
        return (
            Health::Warning,
            format!(
                "{}: cache leg {} failed; `wbctl replace` it",
                s.mode,
                failed_legs.join(", ")
            ),
        );
    }
    // A number; a string from a daemon older than typed knobs.
    let pressure = s
        .policy
        .get("pressure_start")
        .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
        .map_or(100.0, |f| f * 100.0);
    if dirty >= pressure {
        return (
            Health::Warning,
            format!("{dirty:.0}% dirty, above the writeback pressure point ({pressure:.0}%)"),
        );
    }
    if s.stalled_recently || s.stall_ms_last_minute > 0 {
        return (
            Health::Warning,
            format!(
                "writers waited {} ms for cache space in the last minute (writeback is behind)",
                s.stall_ms_last_minute
            ),
        );
    }
    if s.backing_errors > 0 {
        return (
            Health::Warning,
            format!(
                "{} backing-device I/O errors (writeback retries them)",
                s.backing_errors
            ),
        );
    }
    (Health::Ok, format!("{}, {dirty:.0}% dirty", s.mode))
}

/// The verdict on a device from its status and its legs' SSD health: a leg whose SSD wears
/// out (see `ssd_health::warnings`) makes an OK device a WARNING, and its reason joins a
/// warning the status gave; a CRITICAL verdict stays as it is (it says more).
pub fn of_status_and_ssds(s: &DeviceStatus, legs: &LegHealth) -> (Health, String) {
    let (health, why) = of_status(s);
    let ssd: Vec<String> = s
        .legs
        .iter()
        .filter_map(|l| Some((l.path.as_str(), legs.get(&l.path)?)))
        .flat_map(|(path, h)| {
            ssd_health::warnings(h)
                .into_iter()
                .map(move |w| format!("cache leg {path} SSD: {w}"))
        })
        .collect();
    match health {
        _ if ssd.is_empty() => (health, why),
        Health::Ok => (Health::Warning, ssd.join("; ")),
        Health::Warning => (Health::Warning, format!("{why}; {}", ssd.join("; "))),
        Health::Critical | Health::Unknown => (health, why),
    }
}

/// The verdict on a device whose status could not be read: its daemon is down (critical: its
/// /dev/ublkbN holds I/O until `wbctl recover`), or the reason is not known (e.g. permission).
pub fn of_error(daemon_down: bool, error: &str) -> (Health, String) {
    if daemon_down {
        (Health::Critical, format!("daemon down: {error}"))
    } else {
        (Health::Unknown, error.to_string())
    }
}

/// `a` as a percentage of `b` (0 when `b` is).
pub fn percent(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wb_target::control::{CacheLostReport, LegReport};

    fn leg(path: &str, health: &str) -> LegReport {
        LegReport {
            path: path.into(),
            health: health.into(),
            errors: 0,
            read_errors: 0,
            write_errors: 0,
            repairs: 0,
        }
    }

    fn status(mode: &str, legs: Vec<LegReport>, dirty_bytes: u64) -> DeviceStatus {
        let mut s: DeviceStatus = serde_json::from_value(serde_json::json!({
            "name": "d", "device": "/dev/ublkb0", "dev_id": 0, "pid": 1, "mode": mode,
            "failure": null, "cache_lost_at": null, "backing": "/dev/sda", "legs": [],
            "device_size_bytes": 1u64 << 30, "logical_block_size": 4096,
            "capacity_bytes": 1000, "used_bytes": 0, "dirty_bytes": dirty_bytes,
            "segments": {"current_id": 1, "last_flushed_id": 0, "last_written_back_id": 0},
            "epoch_id": 1, "reads": {"requests": 0, "hits": 0, "misses": 0},
            "writes": 0, "write_bytes": 0, "flushes": 0, "written_back_bytes": 0,
            "backing_write_ios": 0, "backing_errors": 0, "passthrough_writes": 0,
            "write_bytes_per_sec": 0, "written_back_bytes_per_sec": 0, "stall_ms": 0,
            "map_bytes": 0, "metadata_bytes": 0, "queues": 1, "depth": 64,
            "uptime_secs": 1, "policy": {"pressure_start": 0.8}
        }))
        .expect("a status");
        s.legs = legs;
        s
    }

    #[test]
    fn verdicts_by_mode() {
        let both = || vec![leg("/dev/a", "ok"), leg("/dev/b", "ok")];
        let one_failed = || vec![leg("/dev/a", "failed"), leg("/dev/b", "ok")];
        let rows: Vec<(DeviceStatus, Health, &str)> = vec![
            (
                status("mirrored", both(), 100),
                Health::Ok,
                "mirrored, 10% dirty",
            ),
            (
                status("single", vec![leg("/dev/a", "ok")], 0),
                Health::Ok,
                "single",
            ),
            (
                status("degraded", one_failed(), 100),
                Health::Warning,
                "cache leg /dev/a failed",
            ),
            (
                status("passthrough", one_failed(), 0),
                Health::Warning,
                "passthrough: cache leg",
            ),
            (
                status("mirrored", both(), 850),
                Health::Warning,
                "85% dirty, above",
            ),
            (
                {
                    let mut s = status("mirrored", both(), 100);
                    (s.stall_ms, s.stall_ms_last_minute, s.stalled_recently) = (9000, 1500, true);
                    s
                },
                Health::Warning,
                "writers waited 1500 ms for cache space in the last minute",
            ),
            (
                {
                    // Stalls long ago: the total alone is no warning.
                    let mut s = status("mirrored", both(), 100);
                    s.stall_ms = 9000;
                    s
                },
                Health::Ok,
                "mirrored, 10% dirty",
            ),
            (
                status(
                    "passthrough",
                    vec![leg("/dev/a", "failed"), leg("/dev/b", "failed")],
                    0,
                ),
                Health::Critical,
                "no usable cache leg",
            ),
        ];
        for (s, health, why) in rows {
            let (h, text) = of_status(&s);
            assert_eq!(h, health, "{} → {text}", s.mode);
            assert!(text.contains(why), "{text:?} lacks {why:?}");
        }
    }

    #[test]
    fn a_lost_cache_a_failed_engine_and_backing_errors() {
        let mut s = status("passthrough", vec![leg("/dev/a", "failed")], 0);
        s.cache_lost = Some(CacheLostReport {
            backing_holds_id: 41,
            lost_from_id: 42,
            lost_through_id: 45,
            lost_dirty_bytes: Some(12),
        });
        let (h, text) = of_status(&s);
        assert_eq!(h, Health::Critical);
        assert!(
            text.contains("cache lost (12 dirty bytes)") && text.contains("41"),
            "{text}"
        );

        let mut s = status(
            "failed",
            vec![leg("/dev/a", "failed"), leg("/dev/b", "ok")],
            0,
        );
        s.failure = Some("a cache leg failed and its failure cannot be recorded: x".into());
        let (h, text) = of_status(&s);
        assert_eq!(h, Health::Critical);
        assert!(text.contains("requests fail: a cache leg failed"), "{text}");

        let mut s = status("mirrored", vec![leg("/dev/a", "ok")], 0);
        s.backing_errors = 3;
        assert_eq!(of_status(&s).0, Health::Warning);

        // A daemon older than typed knobs sends the pressure point as a string.
        let mut s = status("mirrored", vec![leg("/dev/a", "ok")], 850);
        s.policy
            .insert("pressure_start".into(), serde_json::json!("0.9"));
        assert_eq!(of_status(&s).0, Health::Ok, "85% is below 90%");
    }

    /// SSD health joins the verdict: a worn leg makes an OK device a WARNING and is named; a
    /// healthy or unknown one changes nothing; a critical verdict stays critical.
    #[test]
    fn a_worn_ssd_leg_is_a_warning() {
        use crate::ssd_health::{Source, SsdHealth};
        let nvme = |used: u32, spare: u32, warning: u32| SsdHealth {
            source: Source::Nvme,
            device: Some("/dev/nvme0n1".into()),
            reason: None,
            percentage_used: Some(used),
            available_spare: Some(spare),
            available_spare_threshold: Some(10),
            critical_warning: Some(warning),
            ..SsdHealth::unknown(None, "")
        };
        let both = || vec![leg("/dev/a", "ok"), leg("/dev/b", "ok")];
        let legs = |a: SsdHealth| {
            LegHealth::from([
                ("/dev/a".to_string(), a),
                ("/dev/b".to_string(), SsdHealth::unknown(None, "a file")),
            ])
        };
        let ok = status("mirrored", both(), 100);
        let verdict = |s: &DeviceStatus, a: SsdHealth| of_status_and_ssds(s, &legs(a));
        assert_eq!(
            verdict(&ok, nvme(80, 100, 0)),
            of_status(&ok),
            "80 % is fine"
        );
        assert_eq!(
            verdict(&ok, nvme(81, 100, 0)),
            (
                Health::Warning,
                "cache leg /dev/a SSD: wear 81 % of its rated life (above 80 %)".into()
            )
        );
        let (h, why) = verdict(&ok, nvme(5, 9, 0));
        assert_eq!(h, Health::Warning);
        assert!(
            why.contains("available spare 9 % below its threshold 10 %"),
            "{why}"
        );
        let (h, why) = verdict(&ok, nvme(5, 100, 0x02));
        assert_eq!(h, Health::Warning);
        assert!(
            why.contains("critical warning 0x02 (temperature out of range)"),
            "{why}"
        );
        // Joined to a warning the status gives.
        let full = status("mirrored", both(), 900);
        let (h, why) = verdict(&full, nvme(95, 100, 0));
        assert_eq!(h, Health::Warning);
        assert!(
            why.contains("90% dirty") && why.contains("wear 95 %"),
            "{why}"
        );
        // Critical stays critical.
        let dead = status(
            "passthrough",
            vec![leg("/dev/a", "failed"), leg("/dev/b", "failed")],
            0,
        );
        assert_eq!(verdict(&dead, nvme(95, 100, 0)).0, Health::Critical);
    }

    #[test]
    fn the_worst_verdict_wins_and_exit_codes_follow_nagios() {
        assert_eq!(Health::Ok.worst(Health::Warning), Health::Warning);
        assert_eq!(Health::Warning.worst(Health::Unknown), Health::Unknown);
        assert_eq!(Health::Critical.worst(Health::Unknown), Health::Critical);
        assert_eq!(Health::Unknown.worst(Health::Critical), Health::Critical);
        let codes: Vec<i32> = [
            Health::Ok,
            Health::Warning,
            Health::Critical,
            Health::Unknown,
        ]
        .iter()
        .map(|h| h.exit_code())
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3]);
        assert_eq!(of_error(true, "x").0, Health::Critical);
        assert_eq!(of_error(false, "permission denied").0, Health::Unknown);
    }
}
