//! Bad input at the engine layer (CONTRACT §7): each is refused with an error that names the device
//! and the reason, and changes nothing on any device.

use std::sync::Arc;

use wb_target::{Device, EngineError, FormatOptions};
use wb_tests::{Rig, SimDisk, BACKING_IDENTITY};

fn format_options() -> FormatOptions {
    FormatOptions {
        logical_block_size: 4096,
        force: false,
    }
}

fn snapshots(disks: &[&Arc<SimDisk>]) -> Vec<Vec<u8>> {
    disks.iter().map(|d| d.snapshot()).collect()
}

/// Asserts the error names `device` and contains `reason`, and that no disk changed.
fn assert_refused(
    result: Result<impl Sized, EngineError>,
    device: &str,
    reason: &str,
    disks: &[&Arc<SimDisk>],
    before: &[Vec<u8>],
) {
    let message = match result {
        Ok(_) => panic!("accepted; expected a refusal naming {device}: {reason}"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains(device),
        "error does not name {device}: {message}"
    );
    assert!(
        message.contains(reason),
        "error does not say '{reason}': {message}"
    );
    assert!(snapshots(disks) == before, "a device changed: {message}");
}

fn open(
    rig: &Rig,
    backing: Arc<SimDisk>,
    identity: &str,
) -> Result<wb_target::Engine, EngineError> {
    wb_target::open(rig.leg_devices(), backing, identity, rig.options())
}

#[test]
fn cache_too_small_is_refused() {
    let leg = SimDisk::new("sim:tiny", logfmt::MIN_CACHE_SIZE_BYTES - 4096);
    let backing = SimDisk::new("sim:backing", 1 << 20);
    let before = snapshots(&[&leg, &backing]);
    let result = wb_target::format(
        &[leg.clone() as Arc<dyn Device>],
        backing.as_ref(),
        "b",
        &format_options(),
    );
    assert_refused(result, "sim:tiny", "too small", &[&leg, &backing], &before);
}

#[test]
fn unaligned_sizes_are_refused() {
    let leg = SimDisk::new("sim:odd-leg", logfmt::MIN_CACHE_SIZE_BYTES + 512);
    let backing = SimDisk::new("sim:backing", 1 << 20);
    let before = snapshots(&[&leg, &backing]);
    let result = wb_target::format(
        &[leg.clone() as Arc<dyn Device>],
        backing.as_ref(),
        "b",
        &format_options(),
    );
    assert_refused(
        result,
        "sim:odd-leg",
        "not a multiple of 4096",
        &[&leg, &backing],
        &before,
    );

    let leg = SimDisk::new("sim:leg", logfmt::MIN_CACHE_SIZE_BYTES);
    let backing = SimDisk::new("sim:odd-backing", (1 << 20) + 512);
    let before = snapshots(&[&leg, &backing]);
    let result = wb_target::format(
        &[leg.clone() as Arc<dyn Device>],
        backing.as_ref(),
        "b",
        &format_options(),
    );
    assert_refused(
        result,
        "sim:odd-backing",
        "not a non-zero multiple of 4096",
        &[&leg, &backing],
        &before,
    );
}

#[test]
fn bad_logical_block_size_is_refused() {
    let leg = SimDisk::new("sim:leg", logfmt::MIN_CACHE_SIZE_BYTES);
    let backing = SimDisk::new("sim:backing", 1 << 20);
    let before = snapshots(&[&leg, &backing]);
    let options = FormatOptions {
        logical_block_size: 1024,
        force: false,
    };
    let result = wb_target::format(
        &[leg.clone() as Arc<dyn Device>],
        backing.as_ref(),
        "b",
        &options,
    );
    assert_refused(
        result,
        "sim:backing",
        "logical block size 1024",
        &[&leg, &backing],
        &before,
    );
}

#[test]
fn corrupt_superblock_is_refused() {
    let rig = Rig::new(2, 16, 1 << 20, 4096);
    rig.legs[1].poke(100, &[0xde, 0xad]);
    let disks = [&rig.legs[0], &rig.legs[1], &rig.backing];
    let before = snapshots(&disks);
    let result = open(&rig, rig.backing.clone(), BACKING_IDENTITY);
    assert_refused(result, "sim:leg1", "checksum mismatch", &disks, &before);
}

#[test]
fn a_device_that_is_not_a_cache_is_refused() {
    let rig = Rig::new(1, 16, 1 << 20, 4096);
    rig.legs[0].poke(0, b"XFSB not a cache");
    let disks = [&rig.legs[0], &rig.backing];
    let before = snapshots(&disks);
    let result = open(&rig, rig.backing.clone(), BACKING_IDENTITY);
    assert_refused(
        result,
        "sim:leg0",
        "not a writeboost record",
        &disks,
        &before,
    );
}

#[test]
fn cache_of_another_backing_device_is_refused() {
    let rig = Rig::new(2, 16, 1 << 20, 4096);
    let other = SimDisk::new("sim:other-backing", 1 << 20);
    let disks = [&rig.legs[0], &rig.legs[1], &rig.backing, &other];
    let before = snapshots(&disks);
    let result = open(&rig, other.clone(), "sim:other-backing");
    assert_refused(
        result,
        "sim:other-backing",
        "belongs to another backing device",
        &disks,
        &before,
    );
}

#[test]
fn shrunk_backing_device_is_refused() {
    let rig = Rig::new(2, 16, 1 << 20, 4096);
    let shrunk = SimDisk::new("sim:backing", 1 << 19);
    let disks = [&rig.legs[0], &rig.legs[1], &rig.backing, &shrunk];
    let before = snapshots(&disks);
    let result = open(&rig, shrunk.clone(), BACKING_IDENTITY);
    assert_refused(result, "sim:backing", "shrank", &disks, &before);
}

#[test]
fn legs_of_different_cache_sets_are_refused() {
    let a = Rig::new(1, 16, 1 << 20, 4096);
    let b = Rig::new(1, 16, 1 << 20, 4096);
    let legs: Vec<Arc<dyn Device>> = vec![a.legs[0].clone(), b.legs[0].clone()];
    let disks = [&a.legs[0], &b.legs[0], &a.backing];
    let before = snapshots(&disks);
    let result = wb_target::open(legs, a.backing.clone(), BACKING_IDENTITY, a.options());
    assert_refused(result, "sim:leg0", "another cache set", &disks, &before);
}

#[test]
fn formatting_over_dirty_data_is_refused_unless_forced() {
    let rig = Rig::new(2, 16, 1 << 20, 4096);
    {
        let mut options = rig.options();
        options.writeback = None;
        let engine = rig.open_with(options);
        engine.write(0, &[7u8; 8192], false).unwrap();
        engine.flush().unwrap();
        engine.shutdown().unwrap();
    }
    let disks = [&rig.legs[0], &rig.legs[1], &rig.backing];
    let before = snapshots(&disks);
    let result = wb_target::format(
        &rig.leg_devices(),
        rig.backing.as_ref(),
        BACKING_IDENTITY,
        &format_options(),
    );
    assert_refused(result, "sim:leg0", "dirty blocks", &disks, &before);
    // Forced, it formats (the dirty data is knowingly discarded).
    let forced = FormatOptions {
        logical_block_size: 4096,
        force: true,
    };
    wb_target::format(
        &rig.leg_devices(),
        rig.backing.as_ref(),
        BACKING_IDENTITY,
        &forced,
    )
    .unwrap();
    let engine = rig.open();
    let mut buf = vec![1u8; 8192];
    engine.read(0, &mut buf).unwrap();
    assert!(
        buf != vec![7u8; 8192],
        "the forced format discarded the dirty data"
    );
}

#[test]
fn a_clean_cache_is_reformatted_without_force() {
    let rig = Rig::new(1, 16, 1 << 20, 4096);
    {
        let engine = rig.open();
        engine.write(0, &[7u8; 4096], false).unwrap();
        engine
            .drain(std::time::Duration::from_millis(5), |_| {})
            .unwrap();
        engine.shutdown().unwrap();
    }
    wb_target::format(
        &rig.leg_devices(),
        rig.backing.as_ref(),
        BACKING_IDENTITY,
        &format_options(),
    )
    .expect("a drained cache holds nothing to lose");
}

#[test]
fn requests_out_of_range_or_misaligned_are_refused() {
    let rig = Rig::new(1, 16, 1 << 20, 512);
    let engine = rig.open();
    let err = engine.write(1 << 20, &[0u8; 512], false).unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");
    let err = engine.write(100, &[0u8; 512], false).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    let mut buf = [0u8; 700];
    let err = engine.read(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    assert_eq!(err.errno(), libc::EINVAL);
}

#[test]
fn a_buffer_file_of_another_cache_is_not_overwritten() {
    let a = Rig::new(1, 16, 1 << 20, 4096);
    let b = Rig::new(1, 16, 1 << 20, 4096);
    {
        let mut options = a.options();
        options.writeback = None;
        let engine = a.open_with(options);
        engine.write(0, &[9u8; 4096], false).unwrap();
        engine.abandon(); // a killed daemon: its buffer file holds an acknowledged write
    }
    let foreign = std::fs::read(a.buffer_path()).unwrap();
    let mut options = b.options();
    options.buffer_path = a.buffer_path();
    let err = wb_target::open(
        b.leg_devices(),
        b.backing.clone(),
        BACKING_IDENTITY,
        options,
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("another cache set"), "{err}");
    assert!(
        std::fs::read(a.buffer_path()).unwrap() == foreign,
        "buffer file changed"
    );
}

/// A buffer file an older format version left with segments in it (a daemon killed before it
/// logged them, then an upgrade) is refused, not emptied: this version cannot log them.
#[test]
fn a_buffer_file_of_another_format_version_is_not_overwritten() {
    let a = Rig::new(1, 16, 1 << 20, 4096);
    {
        let mut options = a.options();
        options.writeback = None;
        let engine = a.open_with(options);
        engine.write(0, &[9u8; 4096], false).unwrap();
        engine.abandon();
    }
    let mut old = std::fs::read(a.buffer_path()).unwrap();
    old[8..12].copy_from_slice(&1u32.to_le_bytes()); // the header's format version
    std::fs::write(a.buffer_path(), &old).unwrap();
    let err = wb_target::open(
        a.leg_devices(),
        a.backing.clone(),
        BACKING_IDENTITY,
        a.options(),
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("format version 1"), "{err}");
    assert!(
        std::fs::read(a.buffer_path()).unwrap() == old,
        "buffer file changed"
    );
}
