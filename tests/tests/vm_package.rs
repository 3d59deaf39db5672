//! The Debian package under a real systemd, in the VM (issue 15: "the .deb installs,
//! `systemctl cat writeboost@x` shows the unit, `man wbctl` resolves, purge leaves nothing but
//! the config"). The host cannot run a systemd (its PID 1 is not one, and its cgroups are v1),
//! the VM's kernel has ublk: tests/vm/scripts/pkg-systemd.sh installs the .deb in an overlay of
//! the guest's root and runs systemd as PID 1 of a PID namespace there, which starts, reloads
//! and stops a real device from /etc/writeboost/x.toml. The offline checks of the package
//! (contents, lintian, install and purge on the host) are tools/tests/package.rs. Glue:
//! `wb_tests::vm`.

use std::process::Command;

use wb_tests::vm::{
    disk, echo_lines_with, lines_with, prepare, release_bin, repo_root, skip, VmTest,
};

/// Under systemd 252 as PID 1 (container mode) in the guest, with the .deb installed:
/// `systemctl cat writeboost@x.service` shows the packaged unit and its ExecStart; the units
/// install disabled and enable/disable; `systemctl start` returns with the unit active only once
/// /dev/ublkb7 exists (Type=notify); a MiB goes through the device and back (O_DIRECT);
/// `wbctl status` answers; `systemctl reload` keeps the same daemon and applies a knob changed in
/// x.toml; writeboost-metrics.service writes the textfile; `systemctl stop` ends the daemon with
/// status 0 and removes the device; `man -w wbctl` resolves; `dpkg --purge` under the running
/// manager makes it forget the units (postrm's daemon-reload). Then, with systemd gone, nothing the
/// package, its daemon or its metrics service wrote is left in the overlay but x.toml.
#[test]
fn vm_pkg_under_systemd() {
    let test = "vm_pkg_under_systemd";
    if let Err(why) = prepare(test, &["wbctl"]) {
        skip(test, &why);
        return;
    }
    // The package from the wbctl the guest would run, where the guest sees it (under the repo:
    // the guest's /tmp is its own).
    let deb_dir = repo_root().join(".vm-cache").join(format!("{test}.deb"));
    let _ = std::fs::remove_dir_all(&deb_dir);
    let out = Command::new("bash")
        .arg(repo_root().join("tools/debian/build-deb.sh"))
        .arg("--wbctl")
        .arg(release_bin("wbctl"))
        .arg("--out")
        .arg(&deb_dir)
        .output()
        .expect("running tools/debian/build-deb.sh");
    assert!(
        out.status.success(),
        "{test}: build-deb.sh: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let Some(run) = VmTest {
        test,
        bins: &["wbctl"],
        disks: &[
            disk("backing", "256M", false),
            disk("cache0", "64M", false),
            disk("cache1", "64M", false),
        ],
        script: "tests/vm/scripts/pkg-systemd.sh",
        args: &[&deb],
        timeout_secs: 420,
        pass_line: "pkg-systemd: PASS",
    }
    .run() else {
        return;
    };
    let _ = std::fs::remove_dir_all(&deb_dir);
    // The script checks each result; here, that all of them were printed, one per check.
    assert_eq!(lines_with(test, &run.output, "    result: ok ").len(), 11);
    echo_lines_with(
        test,
        &run.output,
        &[
            "dpkg -i ",
            "    result: ",
            "systemd exited",
            "not the package's: ",
            "after purge: ",
        ],
    );
    println!("{test}: VM wall time {:.1}s", run.wall.as_secs_f64());
}
