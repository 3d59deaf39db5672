//! `wbctl metrics` end to end, against the stand-in daemon of `common` (d0 answers, d1 has a
//! state file and no daemon): what it prints, `--output FILE`, and `promtool check metrics` on
//! that real output. Needs root (control sockets serve root alone); skipped otherwise.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{can_test, canned_status, run_folder, wbctl};
use wb_tools::metrics::{exposition, Scrape};

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "wbctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8")
}

#[test]
fn metrics_of_every_device_and_of_one() {
    if !can_test("metrics_of_every_device_and_of_one") {
        return;
    }
    let dir = run_folder();
    let all = stdout(&wbctl(dir.path(), &["metrics"]));
    // Exactly the library's exposition of what the daemons said (the golden test pins that).
    let expected = exposition(&[
        Scrape::Up(Box::new(canned_status())),
        Scrape::Down("d1".into()),
    ]);
    assert_eq!(all, expected);
    for line in [
        r#"writeboost_daemon_up{device="d0"} 1"#,
        r#"writeboost_daemon_up{device="d1"} 0"#,
        r#"writeboost_mode{device="d0",mode="mirrored"} 1"#,
        r#"writeboost_leg_up{device="d0",leg="/dev/b"} 1"#,
        r#"writeboost_oldest_dirty_age_seconds{device="d0"} 75"#,
        r#"writeboost_stall_seconds_total{device="d0"} 9.0"#,
    ] {
        assert!(all.lines().any(|l| l == line), "{line:?} not in:\n{all}");
    }

    let one = stdout(&wbctl(dir.path(), &["metrics", "d0"]));
    assert!(!one.contains(r#"device="d1""#), "{one}");
    assert!(
        one.contains(r#"writeboost_daemon_up{device="d0"} 1"#),
        "{one}"
    );
    // A device with a state file whose daemon is down, asked for by name.
    let down = stdout(&wbctl(dir.path(), &["metrics", "d1"]));
    assert_eq!(
        down,
        exposition(&[Scrape::Down("d1".into())]),
        "only daemon_up 0"
    );
    // A name with neither a daemon nor a state file is an error, as in `status`.
    let out = wbctl(dir.path(), &["metrics", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such device"));
}

/// `--output FILE`: the same text, in a 0644 file, no `FILE.tmp` left behind; a stale
/// `FILE.tmp` planted as a link to another file is replaced, the other file untouched.
#[test]
fn output_file_is_replaced_atomically() {
    if !can_test("output_file_is_replaced_atomically") {
        return;
    }
    let dir = run_folder();
    let out_dir = dir.path().join("node-exporter");
    std::fs::create_dir(&out_dir).unwrap();
    let file = out_dir.join("writeboost.prom");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    std::fs::write(&file, "old").unwrap();
    std::os::unix::fs::symlink(&victim, out_dir.join("writeboost.prom.tmp")).unwrap();

    let printed = stdout(&wbctl(dir.path(), &["metrics"]));
    let file_arg = file.to_str().unwrap();
    let out = wbctl(dir.path(), &["metrics", "--output", file_arg]);
    assert_eq!(stdout(&out), "", "nothing on stdout with --output");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), printed);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "node_exporter runs as another user");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["writeboost.prom"], "the temp file is gone");
}

/// `promtool check metrics` (Debian package `prometheus`, installed by tests/vm/setup.sh) on
/// the real output: the format parses and the names pass Prometheus' own lint.
#[test]
fn promtool_accepts_the_real_output() {
    if !can_test("promtool_accepts_the_real_output") {
        return;
    }
    let Some(promtool) = common::promtool("promtool_accepts_the_real_output") else {
        return;
    };
    let dir = run_folder();
    let text = stdout(&wbctl(dir.path(), &["metrics"]));
    common::assert_promtool_accepts(promtool, &text);
}
