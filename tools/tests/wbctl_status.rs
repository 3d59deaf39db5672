//! `wbctl status` against a stand-in daemon (`common`: a control socket in a run folder that
//! answers every `Status` request with a fixed status, no ublk, no engine), so the JSON
//! document's shape, the human table's additions, `-x` on stalled writers and `--watch` are
//! checked on the real binary. Needs root (control sockets serve root alone); skipped otherwise.

mod common;

use common::{can_test, json_of, run_folder, wbctl};

#[test]
fn json_has_one_shape_for_one_device_or_all() {
    if !can_test("json_has_one_shape_for_one_device_or_all") {
        return;
    }
    let dir = run_folder();
    let one = json_of(&wbctl(dir.path(), &["status", "d0", "--json"]));
    let all = json_of(&wbctl(dir.path(), &["status", "--json"]));
    for doc in [&one, &all] {
        assert_eq!(doc["output_version"], 1, "{doc}");
        let d0 = &doc["devices"][0];
        assert_eq!(d0["name"], "d0");
        assert_eq!(d0["oldest_dirty_age_secs"], 75);
        assert_eq!(d0["dirty_percent"], 12.5);
        assert_eq!(d0["stall_ms_last_minute"], 1500);
        assert_eq!(d0["stalled_recently"], true);
        assert_eq!(d0["policy"]["pressure_start"], 0.8);
        assert_eq!(d0["policy"]["idle_aware"], true);
    }
    assert_eq!(one["devices"].as_array().unwrap().len(), 1);
    let devices = all["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{all}");
    assert_eq!(
        (&devices[1]["name"], &devices[1]["mode"]),
        (&"d1".into(), &"down".into())
    );
}

#[test]
fn the_table_shows_lag_dirty_percent_uptime_and_recent_stalls() {
    if !can_test("the_table_shows_lag_dirty_percent_uptime_and_recent_stalls") {
        return;
    }
    let dir = run_folder();
    let out = wbctl(dir.path(), &["status", "d0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "dirty (12.5 %), writeback lag 1m 15s",
        "up 3d 4h 12m",
        "9000 ms waiting for cache space (1500 ms in the last minute)",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}

/// The stand-in daemon's legs are paths that do not exist: their SSD health is unknown, with
/// the reason, in the JSON and the table, and that alone is no warning for `-x`.
#[test]
fn legs_whose_ssd_health_is_unknown_say_why() {
    if !can_test("legs_whose_ssd_health_is_unknown_say_why") {
        return;
    }
    let dir = run_folder();
    let doc = json_of(&wbctl(dir.path(), &["status", "d0", "--json"]));
    for leg in doc["devices"][0]["legs"].as_array().unwrap() {
        assert_eq!(leg["health"], "ok", "{leg}");
        let ssd = &leg["ssd_health"];
        assert_eq!(ssd["source"], "unknown", "{leg}");
        let path = leg["path"].as_str().unwrap();
        assert!(
            ssd["reason"].as_str().unwrap().contains(path),
            "the reason names the leg: {leg}"
        );
        assert_eq!(ssd["percentage_used"], serde_json::Value::Null);
    }
    let out = wbctl(dir.path(), &["status", "d0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ssd unknown (/dev/a: No such file or directory"),
        "{text}"
    );
    let out = wbctl(dir.path(), &["metrics", "d0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("writeboost_leg_wear_ratio"), "{text}");
}

#[test]
fn writers_stalled_recently_is_a_warning() {
    if !can_test("writers_stalled_recently_is_a_warning") {
        return;
    }
    let dir = run_folder();
    let out = wbctl(dir.path(), &["status", "-x", "d0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("d0: WARNING - writers waited 1500 ms for cache space in the last minute"),
        "{text}"
    );
    let out = wbctl(dir.path(), &["status", "-x", "--json", "d0"]);
    let doc = json_of(&out);
    assert_eq!(doc["output_version"], 1);
    assert_eq!(
        (&doc["health"], &doc["code"]),
        (&"WARNING".into(), &1.into())
    );
    assert_eq!(doc["devices"][0]["name"], "d0");
    assert_eq!(doc["devices"][0]["code"], 1);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn watch_prints_a_line_per_device_per_round() {
    if !can_test("watch_prints_a_line_per_device_per_round") {
        return;
    }
    let dir = run_folder();
    let out = wbctl(
        dir.path(),
        &["status", "d0", "--watch", "100ms", "--count", "3"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "a header and three rounds:\n{text}");
    assert!(lines[0].starts_with("NAME") && lines[0].contains("WB_LAG"));
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            ["d0", "mirrored", "12.5%", "1m", "15s", "2.0", "1.0", "75.0%", "1500"],
            "{text}"
        );
    }

    // Every device, each round: one that does not answer shows as down.
    let out = wbctl(dir.path(), &["status", "--watch", "1", "--count", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(names, ["d0", "d1", "d0", "d1"], "{text}");
    assert!(text.lines().nth(2).unwrap().contains("down"), "{text}");
}
