//! Real-kernel tests of issue 6 (mirrored cache failures, CONTRACT §2 and §5): each boots Debian's
//! 6.12 kernel in QEMU through `tests/vm/run.sh` and runs one `tests/vm/scripts/mirror-*.sh`,
//! which puts device-mapper targets under the cache legs and switches them to the `error`
//! target mid-workload.
//!
//! Setup, build, skip rules and one-VM-at-a-time are `vm.rs`'s: see `tests/src/vm.rs`.
//!
//! `mirror_oracle_self_test` needs no VM: it runs the cache-loss oracle of
//! `tests/vm/scripts/mirror-journal.py` on synthetic journals and checks that it accepts states
//! a flush boundary allows and rejects reordered, torn, misdirected and foreign images.

use std::process::Command;

use wb_tests::vm::{disk, echo_lines_with, have, lines_with, repo_root, run_folder, skip, VmTest};

/// One leg fails during a fio verify job: leg A is a dm linear target switched to the `error`
/// target while fio writes. The job passes (no I/O error, verify ok); status shows leg A failed
/// with errors, the mode goes mirrored → degraded → passthrough once the cache is clean;
/// passthrough serves a verify job; `wbctl replace` → mirrored; a second verify job passes;
/// `wbctl delete --drain` leaves the backing device equal to what the device held.
#[test]
fn vm_mirror_one_leg_fails_during_fio_verify() {
    let test = "vm_mirror_one_leg_fails_during_fio_verify";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "1G", true),
            disk("cache0", "512M", false),
            disk("cache1", "512M", false),
            disk("spare", "512M", false),
        ],
        script: "tests/vm/scripts/mirror-one-leg.sh",
        args: &[],
        timeout_secs: 1500,
        pass_line: "mirror-one-leg: PASS",
    }
    .run() else {
        return;
    };
    let out = &run.output;
    lines_with(test, out, "INJECTED: leg A");
    lines_with(test, out, "fio verify job passed");
    let history = lines_with(test, out, "mode history: mirrored");
    assert!(
        history[0].contains("degraded") && history[0].contains("passthrough"),
        "{test}: mode history lacks degraded/passthrough: {}",
        history[0]
    );
    let after = lines_with(test, out, "status after: ");
    assert!(
        after[0].contains(r#""mode": "passthrough""#) && after[0].contains(r#""health": "failed""#),
        "{test}: status after the failure: {}",
        after[0]
    );
    lines_with(test, out, "mode mirrored after");
    echo_lines_with(
        test,
        out,
        &[
            "INJECTED",
            "mode history",
            "degraded from",
            "status after",
            "wbctl replace took",
            "sha256 of the first",
        ],
    );
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}

/// Both legs fail mid-workload (dm `error` under both at once) while a journaled workload
/// writes tagged blocks with FLUSHes: the device goes to passthrough with `cache_lost_at` set and
/// an error-level CRITICAL log line; the backing device alone passes the cache-loss oracle
/// (CONTRACT §2: the state at some flush boundary B plus a subset of epoch B, nothing later, and every
/// write made after passthrough); the oracle rejects reordered images of the same journal;
/// replacing both legs returns to mirrored, and a drained second workload is complete on the
/// backing device. The run's random seed picks short epochs (an fsync every 1..48 writes) or long
/// ones (1..3000: writeback batches of ~30 segments of one epoch, so one is usually being written
/// to the throttled backing device when the legs fail); the output says which.
#[test]
fn vm_mirror_both_legs_fail_cache_loss_oracle() {
    both_legs_fail("vm_mirror_both_legs_fail_cache_loss_oracle", &[]);
}

fn both_legs_fail(test: &str, args: &[&str]) {
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "1G", true),
            disk("cache0", "256M", false),
            disk("cache1", "256M", false),
            disk("spare0", "256M", false),
            disk("spare1", "256M", false),
        ],
        script: "tests/vm/scripts/mirror-both-fail.sh",
        args,
        timeout_secs: 1500,
        pass_line: "mirror-both-fail: PASS",
    }
    .run() else {
        return;
    };
    let out = &run.output;
    lines_with(test, out, "passthrough seen");
    lines_with(test, out, "CRITICAL: every cache leg has failed");
    let after = lines_with(test, out, "status after: ");
    assert!(
        after[0].contains(r#""mode": "passthrough""#)
            && !after[0].contains(r#""cache_lost_at": null"#),
        "{test}: status after the loss: {}",
        after[0]
    );
    let verdicts = lines_with(test, out, "oracle: PASS");
    assert_eq!(
        verdicts.len(),
        2,
        "{test}: expected two oracle PASS lines (after the loss, after the drain)"
    );
    let selftests = lines_with(test, out, "oracle self-test: PASS");
    assert_eq!(
        selftests.len(),
        1,
        "{test}: expected the self-test PASS line"
    );
    journal_selftest_on_the_host(test, out);
    echo_lines_with(
        test,
        out,
        &[
            "an fsync every",
            "injecting after",
            "passthrough seen",
            "mirror-journal: done",
            "CRITICAL",
            "status after",
            "oracle:",
            "oracle self-test",
            "mode history",
        ],
    );
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}

/// The cache-loss oracle can fail (no VM needed): on synthetic journals it accepts the state at
/// a flush boundary plus any subset of the next epoch, and rejects a reordered image (a write of
/// epoch B+1 present while one of epoch B is missing), a later epoch's write alone, a lost
/// post-loss write, and torn, misdirected and foreign blocks.
#[test]
fn mirror_oracle_self_test() {
    let test = "mirror_oracle_self_test";
    if !have("python3") {
        return skip(test, "python3 is missing");
    }
    let stdout = oracle_selftest(test, &["--seed", "7", "--rounds", "4"]);
    print!("{stdout}");
    for kind in [
        "reordered",
        "later epoch alone",
        "post-loss write",
        "torn",
        "holds block",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(kind) && l.contains("rejected as expected")),
            "{test}: no '{kind}' image was rejected"
        );
    }
}

/// Transient loss of the whole cache (the issue where flushed data was lost): writeback held
/// back, 1 MiB of pattern A is written and fsynced (it lives only in the cache); both legs go to
/// dm `error`; a small write's fsync fails with EIO and the device is in passthrough with
/// `cache_lost` and a fault record; 1 MiB of pattern B over A is written and its fsync succeeds;
/// the daemon is killed with SIGKILL and both legs come back readable (holding A's log); `wbctl
/// recover` comes up in passthrough with the loss on record and the device reads B, not A (the
/// lost log is never replayed); `wbctl delete --drain` leaves B on the backing device; `wbctl
/// check` of the legs shows the loss, from the legs alone too.
#[test]
fn vm_mirror_transient_loss_is_never_replayed() {
    let test = "vm_mirror_transient_loss_is_never_replayed";
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "256M", true),
            disk("cache0", "256M", false),
            disk("cache1", "256M", false),
        ],
        script: "tests/vm/scripts/mirror-transient-loss.sh",
        args: &[],
        timeout_secs: 600,
        pass_line: "mirror-transient-loss: PASS",
    }
    .run() else {
        return;
    };
    let out = &run.output;
    let failed = lines_with(test, out, "small write + fsync after the loss: ");
    assert!(
        failed[0].contains("fsync: FAILED EIO"),
        "{test}: the fsync after the loss did not fail with EIO: {}",
        failed[0]
    );
    lines_with(test, out, "CRITICAL: every cache leg has failed");
    let at_loss = lines_with(test, out, "status at the loss: ");
    assert!(
        at_loss[0].contains(r#""mode": "passthrough""#)
            && at_loss[0].contains(r#""lost_dirty_bytes""#)
            && !at_loss[0].contains(r#""cache_lost": null"#),
        "{test}: status at the loss: {}",
        at_loss[0]
    );
    let b = lines_with(test, out, "pattern B: ");
    assert!(
        b[0].contains("fsync: ok"),
        "{test}: the passthrough write's fsync did not succeed: {}",
        b[0]
    );
    let recovered = lines_with(test, out, "status after recover: ");
    assert!(
        recovered[0].contains(r#""mode": "passthrough""#)
            && !recovered[0].contains(r#""cache_lost": null"#),
        "{test}: status after recover: {}",
        recovered[0]
    );
    lines_with(test, out, "the lost log was not replayed");
    lines_with(test, out, "backing device after delete --drain: B at 0");
    lines_with(test, out, "check:   LOST");
    echo_lines_with(
        test,
        out,
        &[
            "before the loss",
            "INJECTED",
            "small write + fsync",
            "passthrough seen",
            "status at the loss",
            "pattern B",
            "recovered in",
            "status after recover",
            "not replayed",
            "after delete --drain",
            "check faults",
            "LOST",
        ],
    );
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}

/// The oracle's self-test on the boot's own journal, on the host (no device needed; under TCG it
/// took ~45 s): images built from the journal with reordered, torn and misdirected writes must be
/// rejected, the faithful ones accepted.
fn journal_selftest_on_the_host(test: &str, out: &str) {
    let line = lines_with(test, out, "journal for the host's self-test: ")[0];
    let seed = line.rsplit("seed ").next().unwrap().trim();
    let journal = run_folder(test, out).join("journal-1.txt");
    let journal = journal.to_str().expect("a UTF-8 path");
    let stdout = oracle_selftest(
        test,
        &["--journal", journal, "--seed", seed, "--rounds", "0"],
    );
    let rejected: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("rejected as expected"))
        .collect();
    assert!(
        !rejected.is_empty(),
        "{test}: the self-test rejected no image: {stdout}"
    );
    for l in rejected.iter().take(3) {
        println!("{test}: {}", &l[..l.len().min(220)]);
    }
    println!(
        "{test}: {} (images built from this run's journal, on the host)",
        stdout.lines().last().unwrap_or("")
    );
}

/// `mirror-journal.py selftest ARGS` on the host: it must exit 0 and print its PASS line.
/// Returns what it printed.
fn oracle_selftest(test: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/vm/scripts/mirror-journal.py"))
        .arg("selftest")
        .args(args)
        .output()
        .expect("running mirror-journal.py selftest");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{test}: self-test {args:?} failed ({}): {stdout}",
        out.status
    );
    assert!(
        stdout.contains("oracle self-test: PASS"),
        "{test}: self-test {args:?}: no PASS line: {stdout}"
    );
    stdout
}
