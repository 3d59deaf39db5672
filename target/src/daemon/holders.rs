//! Who is using /dev/ublkbN: what a stop decides on (leave the device to the kernel, or remove
//! it) and what a refused `wbctl delete` names (CONTRACT §6). The kernel names some users —
//! stacked devices (`/sys/block/ublkbN/holders`), mounts (`/proc/self/mountinfo`), LIO
//! backstores (configfs `udev_path`), processes with it open (`/proc/PID/fd`) — and betrays any
//! other exclusive opener (a filesystem in another mount namespace, a SCSI target) by refusing
//! an `O_EXCL` open with EBUSY.
//!
//! Everything here only reads; a file it cannot read (a process gone meanwhile, no configfs)
//! names nobody.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::device;

/// Where the kernel tells who uses a device; tests point them at folders of their own.
pub struct Sources {
    pub sys_block: PathBuf,
    pub mountinfo: PathBuf,
    pub lio_core: PathBuf,
    pub proc: PathBuf,
}

impl Sources {
    pub fn system() -> Sources {
        Sources {
            sys_block: "/sys/block".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            lio_core: "/sys/kernel/config/target/core".into(),
            proc: "/proc".into(),
        }
    }
}

/// Every user of `device` the kernel tells of, one phrase each ("mounted on /srv (xfs)");
/// empty when nobody uses it (or it is gone).
pub fn users(device: &Path) -> Vec<String> {
    users_in(&Sources::system(), device)
}

pub fn users_in(sources: &Sources, device: &Path) -> Vec<String> {
    let Ok(meta) = fs::metadata(device) else {
        return Vec::new();
    };
    let mut users = Vec::new();
    if let Some(name) = device.file_name() {
        users.extend(stacked(&sources.sys_block.join(name).join("holders")));
    }
    if meta.file_type().is_block_device() {
        let mountinfo = fs::read_to_string(&sources.mountinfo).unwrap_or_default();
        users.extend(mounts(&mountinfo, meta.rdev()));
    }
    users.extend(lio_backstores(&sources.lio_core, &meta));
    users.extend(processes(&sources.proc, &meta));
    if users.is_empty() && held_exclusively(device) {
        users.push(
            "held exclusively (by a filesystem, device mapper, md or a SCSI target the kernel \
             does not name here)"
                .into(),
        );
    }
    users
}

/// Devices stacked on it (device mapper, md), by the names an administrator knows.
fn stacked(holders: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(holders) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| {
            let kernel_name = e.file_name().to_string_lossy().into_owned();
            match fs::read_to_string(e.path().join("dm").join("name")) {
                Ok(dm) => format!("held by {kernel_name} (device mapper {})", dm.trim()),
                Err(_) => format!("held by {kernel_name}"),
            }
        })
        .collect();
    names.sort();
    names
}

/// Mount points of the device `rdev` in a `/proc/PID/mountinfo` text.
fn mounts(mountinfo: &str, rdev: u64) -> Vec<String> {
    let wanted = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.get(2) != Some(&wanted.as_str()) {
                return None;
            }
            let point = unescape_octal(fields.get(4)?);
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            Some(format!("mounted on {point} ({fstype})"))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// LIO backstores (`core/HBA/OBJECT/udev_path`) whose device is this one.
fn lio_backstores(core: &Path, device: &fs::Metadata) -> Vec<String> {
    let mut found = Vec::new();
    for hba in fs::read_dir(core).into_iter().flatten().flatten() {
        for object in fs::read_dir(hba.path()).into_iter().flatten().flatten() {
            let Ok(path) = fs::read_to_string(object.path().join("udev_path")) else {
                continue;
            };
            let path = path.trim();
            if !path.is_empty() && fs::metadata(path).is_ok_and(|m| same_node(&m, device)) {
                found.push(format!(
                    "exported by the LIO backstore {}/{}",
                    hba.file_name().to_string_lossy(),
                    object.file_name().to_string_lossy()
                ));
            }
        }
    }
    found.sort();
    found
}

/// Processes (other than this one) with the device open.
fn processes(proc: &Path, device: &fs::Metadata) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir(proc).into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let holds = fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::metadata(fd.path()).is_ok_and(|m| same_node(&m, device)));
        if holds {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("open by pid {pid} ({})", comm.trim()));
        }
    }
    found.sort();
    found
}

/// The same device: for block devices the same device number (two nodes may name it), for
/// anything else the same inode.
fn same_node(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    if a.file_type().is_block_device() && b.file_type().is_block_device() {
        a.rdev() == b.rdev()
    } else {
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }
}

fn held_exclusively(device: &Path) -> bool {
    matches!(device::open_node(device, true), Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn mountinfo_lines_name_mount_points_of_the_device() {
        let text = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
90 22 259:7 / /srv/my\\040share rw,relatime shared:40 - xfs /dev/ublkb0 rw,attr2
91 22 259:7 /sub /export rw master:3 - xfs /dev/ublkb0 rw
92 22 259:70 / /other rw - xfs /dev/ublkb9 rw";
        let rdev = libc::makedev(259, 7);
        assert_eq!(
            mounts(text, rdev),
            ["mounted on /srv/my share (xfs)", "mounted on /export (xfs)"]
        );
        assert!(mounts(text, libc::makedev(8, 0)).is_empty());
    }

    #[test]
    fn stacked_lio_and_process_users_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("ublkb3");
        fs::write(&device, b"x").unwrap();
        let sources = Sources {
            sys_block: dir.path().join("sys"),
            mountinfo: dir.path().join("mountinfo"),
            lio_core: dir.path().join("core"),
            proc: "/proc".into(),
        };
        assert!(users_in(&sources, &device).is_empty(), "nobody yet");

        let dm = sources.sys_block.join("ublkb3/holders/dm-4");
        fs::create_dir_all(dm.join("dm")).unwrap();
        fs::write(dm.join("dm/name"), "vg-data\n").unwrap();
        let lun = sources.lio_core.join("iblock_0/tank");
        fs::create_dir_all(&lun).unwrap();
        fs::write(lun.join("udev_path"), format!("{}\n", device.display())).unwrap();
        let other = sources.lio_core.join("iblock_1/else");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("udev_path"), "/dev/null\n").unwrap();
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(fs::File::open(&device).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let users = users_in(&sources, &device);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(users.len(), 3, "{users:?}");
        assert_eq!(users[0], "held by dm-4 (device mapper vg-data)");
        assert_eq!(users[1], "exported by the LIO backstore iblock_0/tank");
        assert_eq!(users[2], format!("open by pid {} (sleep)", child.id()));
        assert!(users_in(&sources, &dir.path().join("gone")).is_empty());
    }
}
