//! `wbbench engine --fsync-every 1 --writers 2` runs its two phases (one writer, then two, each on
//! a freshly formatted cache) and prints its figures. Figures are not asserted (benchmarks print);
//! that the run completes and reports is.

use std::process::Command;

#[test]
fn the_sync_bench_runs_both_phases_and_prints_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wbbench"))
        .args(["engine", "--dir"])
        .arg(dir.path())
        .args([
            "--cache-gib",
            "1",
            "--fsync-every",
            "1",
            "--writers",
            "2",
            "--seconds",
            "1",
        ])
        .output()
        .expect("run wbbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wbbench failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "flush_ratio",
        "log bytes per fsync'd write",
        "group_commit_ratio",
    ] {
        assert!(stdout.contains(figure), "no '{figure}' in: {stdout}");
    }
}
