//! tools/monitoring: the alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`: each alert fires on the series of its failure), and the Grafana
//! dashboard is JSON with the panels named, every query referring only to metric names that
//! `wbctl metrics` emits.

mod common;

use std::path::PathBuf;
use std::process::Command;

use wb_tools::metrics::{exposition_with_health, metric_names, Scrape, MODES};

fn monitoring(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("monitoring")
        .join(file)
}

/// The `writeboost_*` names a PromQL text refers to.
fn writeboost_names(expr: &str) -> Vec<String> {
    expr.match_indices("writeboost_")
        .filter(|(at, _)| {
            // Not the tail of a longer identifier.
            !expr[..*at]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The names in the real exposition of a device with every figure known, its legs' SSD
/// health included.
fn emitted() -> Vec<String> {
    let text = exposition_with_health(
        &[Scrape::Up(Box::new(common::canned_status()))],
        &common::canned_ssds(),
    );
    let names: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let mut listed = metric_names();
    listed.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, listed, "the canned status leaves a family out");
    names
}

fn assert_known(what: &str, exprs: &[String]) {
    let emitted = emitted();
    let mut seen = 0;
    for expr in exprs {
        for name in writeboost_names(expr) {
            assert!(
                emitted.contains(&name),
                "{what}: {name} (in {expr:?}) is not emitted by `wbctl metrics`"
            );
            seen += 1;
        }
    }
    assert!(seen > 0, "{what}: no writeboost_ names found");
}

#[test]
fn the_dashboard_is_json_with_its_panels_on_emitted_metrics() {
    let text = std::fs::read_to_string(monitoring("writeboost-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Cache utilisation",
        "Dirty data",
        "Writeback lag",
        "Write vs writeback throughput",
        "Read hit ratio",
        "Writer stalls",
        "Cache leg health",
        "Cache leg SSD wear and spare",
        "Cache leg SSD alarms",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    let mut exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("a target with an expr")
                .to_string()
        })
        .collect();
    exprs.extend(
        dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["definition"].as_str().map(str::to_string)),
    );
    assert!(exprs.len() >= titles.len(), "every panel has a query");
    assert_known("dashboard", &exprs);
}

#[test]
fn the_alert_rules_refer_to_emitted_metrics() {
    let text = std::fs::read_to_string(monitoring("writeboost-alerts.yml")).unwrap();
    let exprs: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(str::to_string)
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");
    assert_known("alert rules", &exprs);
}

#[test]
fn promtool_checks_and_tests_the_alert_rules() {
    let Some(promtool) = common::promtool("promtool_checks_and_tests_the_alert_rules") else {
        return;
    };
    for args in [
        ["check", "rules", "writeboost-alerts.yml"],
        ["test", "rules", "writeboost-alerts.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(monitoring(""))
            .output()
            .expect("running promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `promtool check metrics` on the exposition of a device in each mode, a lost cache with a
/// failed leg, and a down device (the real binary's output is checked in wbctl_metrics.rs).
#[test]
fn promtool_accepts_every_mode() {
    let Some(promtool) = common::promtool("promtool_accepts_every_mode") else {
        return;
    };
    let mut devices: Vec<Scrape> = MODES
        .iter()
        .map(|mode| {
            let mut s = common::canned_status();
            (s.name, s.mode) = (format!("d_{mode}"), mode.to_string());
            Scrape::Up(Box::new(s))
        })
        .collect();
    let mut lost = common::canned_status();
    lost.name = "lost".into();
    lost.cache_lost_at = Some(3);
    lost.legs[0].health = "failed".into();
    devices.push(Scrape::Up(Box::new(lost)));
    devices.push(Scrape::Down("down".into()));
    let text = exposition_with_health(&devices, &common::canned_ssds());
    common::assert_promtool_accepts(promtool, &text);
    assert!(text.contains(r#"writeboost_mode{device="d_failed",mode="failed"} 1"#));
}
