use std::os::unix::fs::symlink;

use super::*;

fn nvme(used: u32, spare: u32, threshold: u32, warning: u32) -> SsdHealth {
    SsdHealth {
        source: Source::Nvme,
        device: Some("/dev/nvme0n1".into()),
        reason: None,
        percentage_used: Some(used),
        available_spare: Some(spare),
        available_spare_threshold: Some(threshold),
        critical_warning: Some(warning),
        media_errors: Some(0),
        ..SsdHealth::unknown(None, "")
    }
}

#[test]
fn warning_thresholds() {
    assert!(warnings(&nvme(0, 100, 10, 0)).is_empty());
    assert!(
        warnings(&nvme(80, 100, 10, 0)).is_empty(),
        "80 % is not past 80 %"
    );
    assert_eq!(
        warnings(&nvme(81, 100, 10, 0)),
        ["wear 81 % of its rated life (above 80 %)"]
    );
    assert!(
        warnings(&nvme(10, 10, 10, 0)).is_empty(),
        "at the threshold"
    );
    assert_eq!(
        warnings(&nvme(10, 9, 10, 0)),
        ["available spare 9 % below its threshold 10 %"]
    );
    // QEMU's emulated controller: spare 0, threshold 0: not below.
    assert!(warnings(&nvme(0, 0, 0, 0)).is_empty());
    assert_eq!(
        warnings(&nvme(0, 100, 10, 0x04)),
        ["critical warning 0x04 (reliability degraded)"]
    );
    assert_eq!(warnings(&nvme(120, 1, 10, 0x03)).len(), 3, "all three");
    let mut failed = SsdHealth::unknown(None, "");
    (failed.source, failed.smart_passed) = (Source::Smartctl, Some(false));
    assert_eq!(
        warnings(&failed),
        ["SMART overall health self-assessment FAILED"]
    );
    // Unknown is not a warning: most legs in VMs and tests are image files.
    assert!(warnings(&SsdHealth::unknown(None, "an image file")).is_empty());
}

#[test]
fn critical_warning_bits_in_words() {
    assert_eq!(
        critical_warning_text(0x09),
        "0x09 (spare below threshold, media read-only)"
    );
}

#[test]
fn a_file_backed_leg_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("cache0.img");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let h = read(&image);
    assert_eq!(h.source, Source::Unknown);
    assert_eq!(h.device, None);
    assert!(h.reason.as_deref().unwrap().contains("not a block device"));
    assert!(warnings(&h).is_empty());
    assert!(h.summary().starts_with("unknown (not a block device"));
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["source"], "unknown");
    assert_eq!(json["percentage_used"], serde_json::Value::Null);
    // A leg that is gone.
    let h = read(&dir.path().join("missing"));
    assert!(h.reason.unwrap().contains("No such file"));
}

/// A sysfs tree with what a machine with an NVMe drive, a SATA disk, a loop device and device
/// mapper devices shows: `class/block/NAME` links to each device's folder, partitions inside
/// their disk's folder with a `partition` file, dm devices with `slaves/`.
fn fake_sys() -> tempfile::TempDir {
    let sys = tempfile::tempdir().unwrap();
    let s = sys.path();
    let dev = |rel: &str| {
        std::fs::create_dir_all(s.join(rel)).unwrap();
        let name = rel.rsplit('/').next().unwrap();
        std::fs::create_dir_all(s.join("class/block")).unwrap();
        symlink(s.join(rel), s.join("class/block").join(name)).unwrap();
        // Every block device has one, empty unless stacked (and partitions too, here: a
        // test that it is the disk's that counts).
        std::fs::create_dir(s.join(rel).join("slaves")).unwrap();
        s.join(rel)
    };
    dev("devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1");
    let p2 = dev("devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1/nvme0n1p2");
    std::fs::write(p2.join("partition"), "2\n").unwrap();
    dev("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda");
    dev("devices/virtual/block/loop0");
    dev("devices/pci0000:00/0000:00:05.0/virtio1/block/vda");
    dev("devices/virtual/block/dm-9"); // a dm device with nothing under it yet
    for (dm, under) in [
        ("dm-0", &["nvme0n1p2"][..]),
        ("dm-1", &["sda", "nvme0n1p2"][..]),
        ("dm-2", &["dm-0"][..]),
    ] {
        let d = dev(&format!("devices/virtual/block/{dm}"));
        for u in under {
            symlink(s.join("class/block").join(u), d.join("slaves").join(u)).unwrap();
        }
    }
    sys
}

#[test]
fn legs_map_to_the_disk_that_answers() {
    let sys = fake_sys();
    let s = sys.path();
    let target = |name: &str| {
        let dir = std::fs::canonicalize(s.join("class/block").join(name)).unwrap();
        target_of_entry(&dir, s, 0)
    };
    let nvme = Target::Nvme("nvme0n1".into());
    assert_eq!(target("nvme0n1"), nvme);
    assert_eq!(target("nvme0n1p2"), nvme, "a partition: its namespace");
    assert_eq!(target("dm-0"), nvme, "dm over one partition");
    assert_eq!(target("dm-2"), nvme, "dm over dm over one partition");
    assert_eq!(target("sda"), Target::Scsi("sda".into()));
    for (name, why) in [
        ("dm-1", "over 2 devices"),
        ("loop0", "loop device"),
        ("vda", "neither NVMe nor SCSI"),
        ("dm-9", "neither NVMe nor SCSI"),
    ] {
        match target(name) {
            Target::Unknown(reason) => assert!(reason.contains(why), "{name}: {reason}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn only_namespace_names_are_nvme() {
    assert_eq!(classify_disk("nvme12n3"), Target::Nvme("nvme12n3".into()));
    for name in ["nvme0", "nvme0c0n1", "nvmen1", "nvme0n"] {
        assert!(
            matches!(classify_disk(name), Target::Unknown(_)),
            "{name} is not a namespace"
        );
    }
}

#[test]
fn the_summary_names_the_figures() {
    let mut h = nvme(3, 100, 10, 0);
    (
        h.data_units_written,
        h.power_on_hours,
        h.temperature_celsius,
    ) = (Some(2_000_000), Some(5), Some(40));
    assert_eq!(
        h.summary(),
        "nvme /dev/nvme0n1: 3 % used, spare 100 % (threshold 10 %), 0 media errors, \
         no critical warning, 1.0 TB written, 5 h on, 40 °C"
    );
    h.data_units_written = Some(3);
    assert!(h.summary().contains(", 1.5 MB written,"), "{}", h.summary());
    h.data_units_written = Some(0);
    assert!(h.summary().contains(", 0 B written,"), "{}", h.summary());
    h.critical_warning = Some(1);
    assert!(h
        .summary()
        .contains("CRITICAL WARNING 0x01 (spare below threshold)"));
}
