use super::*;

/// `d0`: mirrored over /dev/a and /dev/b, 12.5 % dirty, busy; every figure distinct so a
/// figure read from the wrong field shows.
pub(super) fn status() -> DeviceStatus {
    serde_json::from_value(serde_json::json!({
        "name": "d0", "device": "/dev/ublkb0", "dev_id": 0, "pid": 1, "mode": "mirrored",
        "failure": null, "cache_lost_at": null, "backing": "/dev/sda",
        "legs": [
            {"path": "/dev/a", "health": "ok", "errors": 1, "read_errors": 1,
             "write_errors": 0, "repairs": 2},
            {"path": "/dev/b", "health": "ok", "errors": 0, "read_errors": 0,
             "write_errors": 0, "repairs": 0}
        ],
        "device_size_bytes": 1u64 << 30, "logical_block_size": 4096,
        "capacity_bytes": 8000, "used_bytes": 2000, "dirty_bytes": 1000, "dirty_percent": 12.5,
        "oldest_dirty_age_secs": 75,
        "segments": {"current_id": 9, "last_flushed_id": 8, "last_written_back_id": 3},
        "epoch_id": 1, "reads": {"requests": 4, "hits": 3, "misses": 1},
        "writes": 10, "write_bytes": 40960, "flushes": 5, "written_back_bytes": 20480,
        "backing_write_ios": 6, "backing_errors": 7, "passthrough_writes": 11,
        "write_bytes_per_sec": 0, "written_back_bytes_per_sec": 0,
        "stall_ms": 9000, "stall_ms_last_minute": 1500, "stalled_recently": true,
        "map_bytes": 0, "metadata_bytes": 0, "queues": 1, "depth": 64, "uptime_secs": 600,
        "policy": {"pressure_start": 0.7, "idle_aware": true, "pressure_curve": "linear"}
    }))
    .expect("a status")
}

/// The SSD health of d0's legs: /dev/a an NVMe drive 3 % used, /dev/b a SATA SSD by smartctl
/// 12 % used whose self-assessment passed (every SSD figure is reported by one of them).
pub(super) fn ssds() -> LegHealth {
    use crate::ssd_health::Source;
    let nvme = SsdHealth {
        source: Source::Nvme,
        device: Some("/dev/nvme0n1".into()),
        reason: None,
        percentage_used: Some(3),
        available_spare: Some(100),
        available_spare_threshold: Some(10),
        critical_warning: Some(0),
        media_errors: Some(2),
        data_units_written: Some(1000),
        power_on_hours: Some(100),
        temperature_celsius: Some(41),
        ..SsdHealth::unknown(None, "")
    };
    let sata = SsdHealth {
        source: Source::Smartctl,
        device: Some("/dev/sdb".into()),
        reason: None,
        percentage_used: Some(12),
        reallocated_sectors: Some(0),
        smart_passed: Some(true),
        temperature_celsius: Some(30),
        ..SsdHealth::unknown(None, "")
    };
    LegHealth::from([("/dev/a".into(), nvme), ("/dev/b".into(), sata)])
}

fn up(s: DeviceStatus) -> Scrape {
    Scrape::Up(Box::new(s))
}

fn lines(devices: &[Scrape]) -> Vec<String> {
    exposition(devices).lines().map(str::to_string).collect()
}

/// The whole exposition of one device up and one down, byte for byte. After an intended change,
/// `WB_UPDATE_GOLDEN=1 cargo test -p wb-tools metrics` rewrites the file; review its diff.
#[test]
fn golden_exposition() {
    let text = exposition_with_health(&[up(status()), Scrape::Down("d1".into())], &ssds());
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics/golden.prom");
    if std::env::var_os("WB_UPDATE_GOLDEN").is_some() {
        std::fs::write(golden, &text).expect("writing the golden file");
    }
    let expected = std::fs::read_to_string(golden).expect("the golden file");
    assert_eq!(
        text, expected,
        "the exposition changed (see this test's comment)"
    );
}

/// (why, the device, lines that must be there, names that must not).
type Row = (
    &'static str,
    Scrape,
    &'static [&'static str],
    &'static [&'static str],
);

fn check(rows: Vec<Row>) {
    for (why, scrape, present, absent) in rows {
        let lines = lines(&[scrape]);
        for want in present {
            assert!(
                lines.iter().any(|l| l == want),
                "{why}: {want:?} not in\n{}",
                lines.join("\n")
            );
        }
        for name in absent {
            assert!(
                !lines.iter().any(|l| l.starts_with(name)),
                "{why}: {name:?} in\n{}",
                lines.join("\n")
            );
        }
    }
}

#[test]
fn mode_state_set_legs_and_failures() {
    check(vec![
        (
            "a degraded device: the state set has one 1",
            up(DeviceStatus {
                mode: "degraded".into(),
                ..status()
            }),
            &[
                r#"writeboost_mode{device="d0",mode="degraded"} 1"#,
                r#"writeboost_mode{device="d0",mode="mirrored"} 0"#,
                r#"writeboost_mode{device="d0",mode="passthrough"} 0"#,
            ],
            &[],
        ),
        (
            "a mode this version does not know is still exported",
            up(DeviceStatus {
                mode: "draining".into(),
                ..status()
            }),
            &[
                r#"writeboost_mode{device="d0",mode="draining"} 1"#,
                r#"writeboost_mode{device="d0",mode="mirrored"} 0"#,
            ],
            &[],
        ),
        (
            "a failed leg is down, its partner up",
            up({
                let mut s = status();
                s.legs[0].health = "failed".into();
                s
            }),
            &[
                r#"writeboost_leg_up{device="d0",leg="/dev/a"} 0"#,
                r#"writeboost_leg_up{device="d0",leg="/dev/b"} 1"#,
                r#"writeboost_leg_repairs_total{device="d0",leg="/dev/a"} 2"#,
            ],
            &[],
        ),
        (
            "a lost cache and failing FLUSHes",
            up(DeviceStatus {
                cache_lost_at: Some(3),
                failure: Some("a cache leg failed and its failure cannot be recorded".into()),
                ..status()
            }),
            &[
                r#"writeboost_cache_lost{device="d0"} 1"#,
                r#"writeboost_engine_failed{device="d0"} 1"#,
            ],
            &[],
        ),
    ]);
}

#[test]
fn units_knobs_and_down_devices() {
    check(vec![
        (
            "milliseconds become seconds, percent a ratio",
            up(status()),
            &[
                r#"writeboost_stall_seconds_total{device="d0"} 9.0"#,
                r#"writeboost_stall_last_minute_seconds{device="d0"} 1.5"#,
                r#"writeboost_dirty_ratio{device="d0"} 0.125"#,
                r#"writeboost_pressure_start_ratio{device="d0"} 0.7"#,
                r#"writeboost_cache_lost{device="d0"} 0"#,
            ],
            &[],
        ),
        (
            "a daemon older than typed knobs: the pressure point as a string",
            up({
                let mut s = status();
                s.policy
                    .insert("pressure_start".into(), serde_json::json!("0.9"));
                s
            }),
            &[r#"writeboost_pressure_start_ratio{device="d0"} 0.9"#],
            &[],
        ),
        (
            "no pressure point known: no sample rather than a made-up one",
            up(DeviceStatus {
                policy: Default::default(),
                ..status()
            }),
            &[r#"writeboost_dirty_bytes{device="d0"} 1000"#],
            &["writeboost_pressure_start_ratio"],
        ),
        (
            "a device whose daemon is down has daemon_up 0 and nothing else",
            Scrape::Down("d1".into()),
            &[r#"writeboost_daemon_up{device="d1"} 0"#],
            &["writeboost_mode", "writeboost_dirty", "writeboost_leg"],
        ),
    ]);
}

/// Counters and gauges are typed as such, counters end in `_total`, every family has a HELP.
#[test]
fn types_and_suffixes() {
    let text = exposition_with_health(&[up(status())], &ssds());
    let types: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert!(!types.is_empty());
    for (name, kind) in &types {
        assert!(name.starts_with("writeboost_"), "{name}");
        assert_eq!(
            name.ends_with("_total"),
            *kind == "counter",
            "{name} is a {kind}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

/// `metric_names` (what the dashboard and rules are checked against) is exactly what a device
/// with every figure known emits.
#[test]
fn metric_names_are_the_names_emitted() {
    let text = exposition_with_health(&[up(status())], &ssds());
    let mut emitted: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut names = metric_names();
    emitted.sort_unstable();
    names.sort_unstable();
    assert_eq!(emitted, names);
}

/// SSD health per leg: percentages as ratios, the drive's media error count a counter, only
/// the figures a leg's source reports, nothing for a leg whose health is unknown.
#[test]
fn ssd_health_of_the_legs() {
    let lines = |ssds: &LegHealth| -> Vec<String> {
        exposition_with_health(&[up(status())], ssds)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let all = lines(&ssds());
    for want in [
        r#"writeboost_leg_wear_ratio{device="d0",leg="/dev/a"} 0.03"#,
        r#"writeboost_leg_wear_ratio{device="d0",leg="/dev/b"} 0.12"#,
        r#"writeboost_leg_available_spare_ratio{device="d0",leg="/dev/a"} 1.0"#,
        r#"writeboost_leg_available_spare_threshold_ratio{device="d0",leg="/dev/a"} 0.1"#,
        r#"writeboost_leg_media_errors_total{device="d0",leg="/dev/a"} 2"#,
        r#"writeboost_leg_critical_warning{device="d0",leg="/dev/a"} 0"#,
        r#"writeboost_leg_temperature_celsius{device="d0",leg="/dev/a"} 41.0"#,
        r#"writeboost_leg_smart_passed{device="d0",leg="/dev/b"} 1"#,
        "# TYPE writeboost_leg_media_errors_total counter",
    ] {
        assert!(
            all.iter().any(|l| l == want),
            "{want:?} not in\n{}",
            all.join("\n")
        );
    }
    // smartctl reports no spare; NVMe no self-assessment.
    assert!(!all.iter().any(
        |l| l.starts_with("writeboost_leg_available_spare_ratio{device=\"d0\",leg=\"/dev/b\"")
    ));
    assert!(!all
        .iter()
        .any(|l| l.starts_with("writeboost_leg_smart_passed{device=\"d0\",leg=\"/dev/a\"")));
    // Unknown health (an image file): no SSD family at all; a leg not in the map neither.
    let mut unknown = LegHealth::new();
    unknown.insert(
        "/dev/a".into(),
        SsdHealth::unknown(None, "not a block device"),
    );
    let text = lines(&unknown).join("\n");
    for family in [
        "wear",
        "available_spare",
        "media_errors",
        "critical_warning",
        "temperature",
    ] {
        assert!(
            !text.contains(&format!("writeboost_leg_{family}")),
            "{family} in\n{text}"
        );
    }
    assert_eq!(text + "\n", exposition(&[up(status())]));
}

#[test]
fn no_devices_no_families() {
    assert_eq!(exposition(&[]), "");
}

#[test]
fn write_atomically_replaces_the_file_and_leaves_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("writeboost.prom");
    std::fs::write(&file, "old").unwrap();
    // A stale temp file from an interrupted run is replaced, not appended to.
    std::fs::write(dir.path().join("writeboost.prom.tmp"), "stale and longer").unwrap();
    write_atomically(&file, b"new\n").unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["writeboost.prom"]);
    // A folder that is not there: an error, and nothing made.
    let missing = dir.path().join("no/such/writeboost.prom");
    assert!(write_atomically(&missing, b"x").is_err());
}
