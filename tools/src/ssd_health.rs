//! SSD health of the cache legs, read by `wbctl` (never by the I/O daemon): for an NVMe leg
//! the SMART / Health Information log page (log id 02h) through the NVMe admin passthrough
//! ioctl, for a SATA/SAS leg `smartctl --json -a` where smartmontools is installed, and
//! "unknown", with the reason, for anything else (an image file, a loop device, a virtio disk,
//! a dm or md device over more than one disk).
//!
//! A leg is mapped to the disk that answers through sysfs: `/sys/dev/block/MAJ:MIN` of the
//! leg's device number gives its entry; a partition's disk is the folder above it; a device
//! mapper (or md) device with exactly one device under it (`slaves/`) is followed down.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Where a leg's health figures came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Nvme,
    Smartctl,
    Unknown,
}

/// One leg's SSD health, as `status --json` shows it (`"ssd_health"` inside each leg) and the
/// metrics export it. A figure the source does not report is `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SsdHealth {
    pub source: Source,
    /// The device asked (`/dev/nvme0n1` for a leg on `/dev/nvme0n1p2` or on a dm device over
    /// it); `null` when none could be.
    pub device: Option<String>,
    /// Why the health is unknown (`null` when it is known).
    pub reason: Option<String>,
    /// The vendor's estimate of the life used, in percent; may pass 100.
    pub percentage_used: Option<u32>,
    /// Spare capacity left, in percent of the factory spare (NVMe).
    pub available_spare: Option<u32>,
    /// The spare level below which the drive itself raises a critical warning (NVMe).
    pub available_spare_threshold: Option<u32>,
    /// NVMe critical warning bits (0: none; see `critical_warning_text`).
    pub critical_warning: Option<u32>,
    /// Unrecovered data integrity errors over the drive's life (NVMe).
    pub media_errors: Option<u64>,
    /// NVMe data units written: thousands of 512-byte units.
    pub data_units_written: Option<u64>,
    pub power_on_hours: Option<u64>,
    pub temperature_celsius: Option<i64>,
    /// ATA attribute 5 or the SCSI grown defect list (smartctl).
    pub reallocated_sectors: Option<u64>,
    /// smartctl's overall health self-assessment.
    pub smart_passed: Option<bool>,
}

/// The health of each leg, by leg path (one physical device is a leg of one cache at most).
pub type LegHealth = BTreeMap<String, SsdHealth>;

impl SsdHealth {
    /// Nothing known, for this reason.
    pub fn unknown(device: Option<String>, reason: impl Into<String>) -> SsdHealth {
        SsdHealth {
            source: Source::Unknown,
            device,
            reason: Some(reason.into()),
            percentage_used: None,
            available_spare: None,
            available_spare_threshold: None,
            critical_warning: None,
            media_errors: None,
            data_units_written: None,
            power_on_hours: None,
            temperature_celsius: None,
            reallocated_sectors: None,
            smart_passed: None,
        }
    }

    /// One line for people: `nvme /dev/nvme0n1: 3 % used, spare 100 % (threshold 10 %), ...`.
    pub fn summary(&self) -> String {
        let device = self.device.as_deref().unwrap_or("-");
        let mut parts = Vec::new();
        let mut add = |text: Option<String>| parts.extend(text);
        add(self.percentage_used.map(|p| format!("{p} % used")));
        add(self
            .available_spare
            .map(|s| match self.available_spare_threshold {
                Some(t) => format!("spare {s} % (threshold {t} %)"),
                None => format!("spare {s} %"),
            }));
        add(self.media_errors.map(|m| format!("{m} media errors")));
        add(self
            .reallocated_sectors
            .map(|r| format!("{r} reallocated sectors")));
        add(self.critical_warning.map(|c| match c {
            0 => "no critical warning".to_string(),
            c => format!("CRITICAL WARNING {}", critical_warning_text(c)),
        }));
        add(self
            .smart_passed
            .map(|p| if p { "SMART passed" } else { "SMART FAILED" }.to_string()));
        add(self
            .data_units_written
            .map(|u| format!("{} written", written_bytes(u))));
        add(self.power_on_hours.map(|h| format!("{h} h on")));
        add(self.temperature_celsius.map(|t| format!("{t} °C")));
        match self.source {
            Source::Unknown => format!(
                "unknown ({})",
                self.reason.as_deref().unwrap_or("no reason given")
            ),
            Source::Nvme => format!("nvme {device}: {}", parts.join(", ")),
            Source::Smartctl => format!("smartctl {device}: {}", parts.join(", ")),
        }
    }
}

/// NVMe's data units written (thousands of 512-byte blocks) in the decimal units drive makers
/// rate endurance in: `1.5 MB`, `12.3 TB` (saturating at 18.4 EB, far past any drive's life).
fn written_bytes(data_units: u64) -> String {
    ByteSize(data_units.saturating_mul(512_000))
        .display()
        .si()
        .to_string()
}

/// Wear above this percentage of the rated life is a warning in `status -x`.
pub const WEAR_WARNING_PERCENT: u32 = 80;

/// Why this health deserves a person's attention (empty: it does not, or it is unknown):
/// wear past 80 %, spare below the drive's threshold, any critical warning bit, a failed SMART
/// self-assessment. The verdict of `wbctl status -x` turns each into a WARNING.
pub fn warnings(h: &SsdHealth) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = h.percentage_used.filter(|&p| p > WEAR_WARNING_PERCENT) {
        out.push(format!(
            "wear {p} % of its rated life (above {WEAR_WARNING_PERCENT} %)"
        ));
    }
    if let (Some(s), Some(t)) = (h.available_spare, h.available_spare_threshold) {
        if s < t {
            out.push(format!("available spare {s} % below its threshold {t} %"));
        }
    }
    if let Some(c) = h.critical_warning.filter(|&c| c != 0) {
        out.push(format!("critical warning {}", critical_warning_text(c)));
    }
    if h.smart_passed == Some(false) {
        out.push("SMART overall health self-assessment FAILED".into());
    }
    out
}

/// The critical warning byte in words: `0x04 (reliability degraded)`.
pub fn critical_warning_text(bits: u32) -> String {
    // Bits 0-5 of byte 0 of the SMART / Health log (NVMe base specification).
    const NAMES: [&str; 6] = [
        "spare below threshold",
        "temperature out of range",
        "reliability degraded",
        "media read-only",
        "volatile memory backup failed",
        "persistent memory region unreliable",
    ];
    let named: Vec<&str> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{bits:#04x} ({})", named.join(", "))
}

/// What answers for a leg's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An NVMe namespace block device (`nvme0n1`): its SMART log through the admin ioctl.
    Nvme(String),
    /// A SCSI-attached disk (`sda`: SATA behind libata, or SAS): smartctl.
    Scsi(String),
    /// Nothing does, for this reason.
    Unknown(String),
}

/// The health of the leg at `path`: resolved through `/sys`, then read.
pub fn read(path: &Path) -> SsdHealth {
    match target_of(path, Path::new("/sys")) {
        Target::Nvme(name) => nvme::read(&format!("/dev/{name}")),
        Target::Scsi(name) => smartctl::read(&format!("/dev/{name}")),
        Target::Unknown(why) => SsdHealth::unknown(None, why),
    }
}

/// The health of every leg of `legs` (paths), by path.
pub fn read_all<'a>(legs: impl IntoIterator<Item = &'a str>) -> LegHealth {
    legs.into_iter()
        .map(|p| (p.to_string(), read(Path::new(p))))
        .collect()
}

/// What answers for the leg at `path`, looked up in the sysfs mounted at `sys`.
pub fn target_of(path: &Path, sys: &Path) -> Target {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Target::Unknown(format!("{}: {e}", path.display())),
    };
    if !meta.file_type().is_block_device() {
        return Target::Unknown("not a block device (an image file has no SMART data)".into());
    }
    let rdev = meta.rdev();
    let entry = sys.join(format!(
        "dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    match fs::canonicalize(&entry) {
        Ok(dir) => target_of_entry(&dir, sys, 0),
        Err(e) => Target::Unknown(format!("{}: {e}", entry.display())),
    }
}

/// The target of the block device whose sysfs folder is `dir` (a disk, a partition, a dm or
/// md device); `depth` counts the stacked devices followed down so far.
pub fn target_of_entry(dir: &Path, sys: &Path, depth: u32) -> Target {
    let name = |d: &Path| {
        d.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into())
    };
    // A partition's folder is inside its disk's and holds a `partition` file.
    let disk = if dir.join("partition").exists() {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let disk_name = name(disk);
    // Every disk has a `slaves` folder; a stacked one (dm, md) lists what is under it.
    let under: Vec<PathBuf> = fs::read_dir(disk.join("slaves"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if !under.is_empty() {
        return match under.as_slice() {
            [one] if depth < 8 => match fs::canonicalize(sys.join("class/block").join(name(one))) {
                Ok(d) => target_of_entry(&d, sys, depth + 1),
                Err(e) => Target::Unknown(format!("{disk_name}: {e}")),
            },
            [_] => Target::Unknown(format!("{disk_name}: devices stacked too deep")),
            many => Target::Unknown(format!(
                "{disk_name}: over {} devices, no single SSD to ask",
                many.len()
            )),
        };
    }
    classify_disk(&disk_name)
}

/// The target of a whole disk, by its kernel name.
fn classify_disk(name: &str) -> Target {
    let digits_after = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.split('n').count() == 2 && rest.split('n').all(is_number))
    };
    if digits_after("nvme") {
        Target::Nvme(name.to_string())
    } else if name.starts_with("sd") {
        Target::Scsi(name.to_string())
    } else if name.starts_with("loop") {
        Target::Unknown(format!("{name}: a loop device (backed by a file)"))
    } else {
        Target::Unknown(format!(
            "{name}: neither NVMe nor SCSI/SATA, no health log to read"
        ))
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

pub mod nvme;
pub mod smartctl;

#[cfg(test)]
mod tests;
