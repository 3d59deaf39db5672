//! Who is using /dev/ublkbN: what a stop decides on (leave the device to the kernel, or remove
//! it) and what a refused `wbctl delete` names (CONTRACT §6). The kernel names some users —
//! stacked devices (`/sys/block/ublkbN/holders`), mounts (`/proc/self/mountinfo`), LIO
//! backstores (configfs `udev_path`), processes with it open (`/proc/PID/fd`) — and betrays any
//! other exclusive opener (a filesystem in another mount namespace, a SCSI target) by refusing
//! an `O_EXCL` open with EBUSY.
//!
//! Its partitions count as the device (a mount of /dev/ublkb0p1 uses /dev/ublkb0), and so do a
//! loop device over it and an NVMe-oF namespace exporting it (neither leaves a holder).
//!
//! Everything here only reads, and never waits on another filesystem: a process's open files
//! are looked at by link name (`/proc/PID/fd/N` → `/dev/...`), and only device nodes are
//! stat()ed — a file on a hung NFS server must not hang a stop. A file it cannot read (a
//! process gone meanwhile, no configfs) names nobody.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::device;

/// Where the kernel tells who uses a device; tests point them at folders of their own.
pub struct Sources {
    pub sys_block: PathBuf,
    pub mountinfo: PathBuf,
    pub lio_core: PathBuf,
    pub nvmet_subsystems: PathBuf,
    pub proc: PathBuf,
}

impl Sources {
    pub fn system() -> Sources {
        Sources {
            sys_block: "/sys/block".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            lio_core: "/sys/kernel/config/target/core".into(),
            nvmet_subsystems: "/sys/kernel/config/nvmet/subsystems".into(),
            proc: "/proc".into(),
        }
    }
}

/// How a process user is named (a stop looks twice at users that are only processes).
pub const PROCESS_PREFIX: &str = "open by pid ";

/// Every user of `device` the kernel tells of, one phrase each ("mounted on /srv (xfs)");
/// empty when nobody uses it (or it is gone).
pub fn users(device: &Path) -> Vec<String> {
    users_in(&Sources::system(), device)
}

pub fn users_in(sources: &Sources, device: &Path) -> Vec<String> {
    let Ok(meta) = fs::metadata(device) else {
        return Vec::new();
    };
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = sources.sys_block.join(&name);
    let parts = partition_names(&sys, &name);
    let mut nodes = vec![Node::of(&meta)];
    nodes.extend(partition_nodes(&sys, &parts));
    let mut users = stacked(&sys.join("holders"));
    for part in &parts {
        users.extend(stacked(&sys.join(part).join("holders")));
    }
    let mountinfo = fs::read_to_string(&sources.mountinfo).unwrap_or_default();
    users.extend(mounts(&mountinfo, &nodes));
    users.extend(loop_devices(&sources.sys_block, &nodes));
    users.extend(lio_backstores(&sources.lio_core, &nodes));
    users.extend(nvmet_namespaces(&sources.nvmet_subsystems, &nodes));
    users.extend(processes(&sources.proc, &nodes));
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

/// Mount points of any of `nodes` in a `/proc/PID/mountinfo` text.
fn mounts(mountinfo: &str, nodes: &[Node]) -> Vec<String> {
    let wanted: Vec<String> = nodes
        .iter()
        .filter_map(|n| match n {
            Node::Block(rdev) => Some(format!("{}:{}", libc::major(*rdev), libc::minor(*rdev))),
            Node::Inode(..) => None,
        })
        .collect();
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            if !wanted.iter().any(|w| fields.get(2) == Some(&w.as_str())) {
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

/// What a device-file argument names: a block device by number (two nodes may name it),
/// anything else (tests' plain files) by inode.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Node {
    Block(u64),
    Inode(u64, u64),
}

impl Node {
    fn of(meta: &fs::Metadata) -> Node {
        if meta.file_type().is_block_device() {
            Node::Block(meta.rdev())
        } else {
            Node::Inode(meta.dev(), meta.ino())
        }
    }

    /// The node a path names, stat()ed only when it is under /dev (or is a test's file under
    /// the same folder as the device): never a path on some other, maybe hung, filesystem.
    fn at(path: &Path, nodes: &[Node]) -> Option<Node> {
        let local = path.starts_with("/dev/") || nodes.iter().any(|n| matches!(n, Node::Inode(..)));
        local
            .then(|| fs::metadata(path).ok().map(|m| Node::of(&m)))
            .flatten()
    }
}

/// The device numbers of the partitions `parts` (`/sys/block/NAME/NAMEpN/dev`).
fn partition_nodes(sys: &Path, parts: &[String]) -> Vec<Node> {
    parts
        .iter()
        .filter_map(|p| {
            let dev = fs::read_to_string(sys.join(p).join("dev")).ok()?;
            let (major, minor) = dev.trim().split_once(':')?;
            Some(Node::Block(libc::makedev(
                major.parse().ok()?,
                minor.parse().ok()?,
            )))
        })
        .collect()
}

/// The partitions of the device NAME: the `NAMEpN` folders of `/sys/block/NAME`.
fn partition_names(sys: &Path, name: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(sys)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name) && n.len() > name.len())
        .collect();
    names.sort();
    names
}

/// Loop devices whose backing file is the device (or a partition of it).
fn loop_devices(sys_block: &Path, nodes: &[Node]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(sys_block).into_iter().flatten().flatten() {
        let Ok(file) = fs::read_to_string(entry.path().join("loop").join("backing_file")) else {
            continue;
        };
        if Node::at(Path::new(file.trim()), nodes).is_some_and(|n| nodes.contains(&n)) {
            found.push(format!(
                "backs loop device {}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found.sort();
    found
}

/// configfs objects `ROOT/GROUP/OBJECT/ATTR` whose device path is one of `nodes`: LIO
/// backstores (`core/HBA/OBJECT/udev_path`) and NVMe-oF namespaces
/// (`subsystems/NQN/namespaces/NSID/device_path`, with ROOT a subsystem's folder).
fn configfs_exports(root: &Path, attr: &str, nodes: &[Node]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for group in fs::read_dir(root).into_iter().flatten().flatten() {
        for object in fs::read_dir(group.path()).into_iter().flatten().flatten() {
            let Ok(path) = fs::read_to_string(object.path().join(attr)) else {
                continue;
            };
            if Node::at(Path::new(path.trim()), nodes).is_some_and(|n| nodes.contains(&n)) {
                let name = |e: &fs::DirEntry| e.file_name().to_string_lossy().into_owned();
                found.push((name(&group), name(&object)));
            }
        }
    }
    found.sort();
    found
}

fn lio_backstores(core: &Path, nodes: &[Node]) -> Vec<String> {
    configfs_exports(core, "udev_path", nodes)
        .into_iter()
        .map(|(hba, object)| format!("exported by the LIO backstore {hba}/{object}"))
        .collect()
}

fn nvmet_namespaces(subsystems: &Path, nodes: &[Node]) -> Vec<String> {
    let mut found = Vec::new();
    for subsystem in fs::read_dir(subsystems).into_iter().flatten().flatten() {
        let nqn = subsystem.file_name().to_string_lossy().into_owned();
        for (_, nsid) in configfs_exports(&subsystem.path(), "device_path", nodes) {
            found.push(format!(
                "exported by NVMe-oF subsystem {nqn} namespace {nsid}"
            ));
        }
    }
    found
}

/// Processes (other than this one) with the device (or a partition) open, judged by where
/// their descriptors link.
fn processes(proc: &Path, nodes: &[Node]) -> Vec<String> {
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
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .any(|target| Node::at(&target, nodes).is_some_and(|n| nodes.contains(&n)));
        if holds {
            let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{PROCESS_PREFIX}{pid} ({})", comm.trim()));
        }
    }
    found.sort();
    found
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
        let disk = Node::Block(libc::makedev(259, 7));
        assert_eq!(
            mounts(text, &[disk]),
            ["mounted on /srv/my share (xfs)", "mounted on /export (xfs)"]
        );
        let part = Node::Block(libc::makedev(259, 70));
        assert_eq!(
            mounts(text, &[disk, part]).len(),
            3,
            "a partition's mount counts"
        );
        assert!(mounts(text, &[Node::Block(libc::makedev(8, 0))]).is_empty());
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
            nvmet_subsystems: dir.path().join("nvmet"),
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
        let ns = sources.nvmet_subsystems.join("nqn.x/namespaces/1");
        fs::create_dir_all(&ns).unwrap();
        fs::write(ns.join("device_path"), format!("{}\n", device.display())).unwrap();
        let lo = sources.sys_block.join("loop7/loop");
        fs::create_dir_all(&lo).unwrap();
        fs::write(lo.join("backing_file"), format!("{}\n", device.display())).unwrap();
        let mut child = Command::new("sleep")
            .arg("60")
            .stdin(fs::File::open(&device).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let users = users_in(&sources, &device);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            users,
            [
                "held by dm-4 (device mapper vg-data)".to_string(),
                "backs loop device loop7".into(),
                "exported by the LIO backstore iblock_0/tank".into(),
                "exported by NVMe-oF subsystem nqn.x namespace 1".into(),
                format!("open by pid {} (sleep)", child.id()),
            ]
        );
        assert!(users_in(&sources, &dir.path().join("gone")).is_empty());
    }
}
