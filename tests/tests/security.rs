//! A crashed daemon's RAM buffer file is adopted only when it can be what that daemon left: a
//! root-owned 0600 regular file (never a link), whose buffers hold consecutive segment ids in
//! the window the log allows and address only blocks inside the device. Anything else is
//! refused with a message, and neither the cache legs nor the file (nor a link's target) change.
//! Also: a bandwidth cap of 0 bytes/s (which used to panic the writeback thread for good) does
//! not stop writeback.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use logfmt::buffer_file as bf;
use wb_tests::Rig;

const BLOCK: usize = 4096;
/// The simulated backing device: 1 MiB, 2048 sectors.
const BACKING_BYTES: u64 = 1 << 20;

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// (buffer, first segment id) of every owned buffer of a buffer file.
fn owned(file: &[u8]) -> Vec<(usize, u64)> {
    let count = u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| (i, bf::owner_parts(u64_at(file, bf::owner_word_offset(i))).0))
        .filter(|&(_, id)| id != 0)
        .collect()
}

/// The segments buffer `buffer` holds, as a successor walks them (FORMAT.md §6.1).
fn walked(file: &[u8], buffer: usize) -> Vec<bf::Published> {
    let image = &file[bf::buffer_offset(buffer)..][..logfmt::SEGMENT_SIZE_BYTES];
    bf::walk_image(image, u64_at(file, bf::owner_word_offset(buffer)))
}

/// Makes buffer `buffer` start with segment `id` at slot block `block`: the owner word and the
/// id in the image agree, as the engine writes them.
fn set_id(file: &mut [u8], buffer: usize, id: u64, block: u32) {
    put_u64(
        file,
        bf::owner_word_offset(buffer),
        bf::owner_word(id, block),
    );
    let header = bf::buffer_offset(buffer) + block as usize * BLOCK;
    put_u64(file, header + logfmt::SEGMENT_ID_OFFSET, id);
}

fn write_private(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cache set whose daemon was killed with one acknowledged write (block 7, 0xAB) only in its
/// RAM buffer, after six flushed segments: returns the rig and the buffer file's bytes.
fn crashed_daemon() -> (Rig, Vec<u8>) {
    let rig = Rig::new(1, 16, BACKING_BYTES, 4096);
    let mut options = rig.options();
    options.writeback = None;
    let engine = rig.open_with(options);
    for i in 0..6u8 {
        engine
            .write(i as u64 * BLOCK as u64, &[i + 1; BLOCK], false)
            .unwrap();
        engine.flush().unwrap();
    }
    engine
        .write(7 * BLOCK as u64, &[0xAB; BLOCK], false)
        .unwrap();
    engine.abandon();
    drop(engine);
    let file = std::fs::read(rig.buffer_path()).unwrap();
    let held = owned(&file);
    // Format v2: the six FLUSHed segments and the open one share slot 0, and so its buffer.
    assert_eq!(held.len(), 1, "one slot in the buffer: {held:?}");
    let ids: Vec<u64> = walked(&file, held[0].0)
        .iter()
        .map(|p| p.segment_id)
        .collect();
    assert_eq!(
        ids,
        (1..=7).collect::<Vec<_>>(),
        "six segments and the open one"
    );
    (rig, file)
}

/// Opening the cache is refused with a message containing `needle`, and changes neither the
/// cache leg nor the file at the buffer path.
#[track_caller]
fn assert_refused(rig: &Rig, needle: &str) {
    let leg = rig.legs[0].snapshot();
    let file = std::fs::read(rig.buffer_path()).ok();
    let mut options = rig.options();
    options.writeback = None;
    let err = wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        wb_tests::BACKING_IDENTITY,
        options,
    )
    .err()
    .unwrap_or_else(|| panic!("opened the cache; expected a refusal containing {needle:?}"));
    let text = err.to_string();
    assert!(text.contains(needle), "{needle:?} not in: {text}");
    assert!(
        text.contains("cache.buf"),
        "the message names the file: {text}"
    );
    assert!(rig.legs[0].snapshot() == leg, "the cache leg changed");
    assert!(
        std::fs::read(rig.buffer_path()).ok() == file,
        "the buffer file changed"
    );
}

/// The genuine file is adopted: the write only it held reads back.
fn assert_adopted(rig: &Rig, genuine: &[u8]) {
    write_private(&rig.buffer_path(), genuine);
    let engine = rig.open();
    let mut block = vec![0u8; BLOCK];
    engine.read(7 * BLOCK as u64, &mut block).unwrap();
    assert!(
        block.iter().all(|&b| b == 0xAB),
        "the adopted write is lost"
    );
    engine.shutdown().unwrap();
}

#[test]
fn forged_segment_ids_are_refused() {
    let (rig, genuine) = crashed_daemon();
    let (buffer, id) = owned(&genuine)[0];
    let open = walked(&genuine, buffer).last().unwrap().start_block;
    let path = rig.buffer_path();

    // An id far below the head (the open segment's block named segment 2): it would be written
    // over a live segment of the log.
    let mut forged = genuine.clone();
    set_id(&mut forged, buffer, 2, open);
    write_private(&path, &forged);
    assert_refused(&rig, "outside what the log allows");

    // A second buffer two ids further on: a gap no daemon leaves.
    let mut forged = genuine.clone();
    let other = (buffer + 1) % owned_count(&genuine);
    let (from, to) = (bf::buffer_offset(buffer), bf::buffer_offset(other));
    let image = forged[from..from + logfmt::SEGMENT_SIZE_BYTES].to_vec();
    forged[to..to + image.len()].copy_from_slice(&image);
    set_id(&mut forged, other, id + 2, 0);
    write_private(&path, &forged);
    assert_refused(&rig, "with nothing between them");

    // Past the log head (6), with a hole before it.
    let mut forged = genuine.clone();
    set_id(&mut forged, buffer, id + 8, 0);
    write_private(&path, &forged);
    assert_refused(&rig, "hole in the log");

    assert_adopted(&rig, &genuine);
}

fn owned_count(file: &[u8]) -> usize {
    u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize
}

#[test]
fn blocks_outside_the_device_are_refused() {
    let (rig, genuine) = crashed_daemon();
    let (buffer, _) = owned(&genuine)[0];
    // The open segment's entry 0, in its header block.
    let open = walked(&genuine, buffer).last().unwrap().start_block;
    let entry = bf::buffer_offset(buffer) + open as usize * BLOCK + logfmt::entry_offset(0);
    assert_eq!(u64_at(&genuine, entry), 7 * 8, "entry 0 is block 7's");
    // One block past the end of the 1 MiB device (2048 sectors), and far beyond it.
    for sector in [2048u64, 1 << 40] {
        let mut forged = genuine.clone();
        put_u64(&mut forged, entry, sector);
        write_private(&rig.buffer_path(), &forged);
        assert_refused(&rig, "beyond the device's 2048 sectors");
    }
    assert_adopted(&rig, &genuine);
}

#[test]
fn a_buffer_file_that_is_not_roots_own_0600_file_is_refused() {
    let (rig, genuine) = crashed_daemon();
    let path = rig.buffer_path();
    for mode in [0o644, 0o640, 0o660, 0o666] {
        write_private(&path, &genuine);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        assert_refused(&rig, &format!("has mode {mode:o}, not 600"));
    }
    if am_root() {
        write_private(&path, &genuine);
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        assert_refused(&rig, "is owned by uid 65534");
    } else {
        eprintln!("SKIPPED the foreign-owner case: not root");
    }
    // A second name for the file (a hard link planted elsewhere) is refused too.
    write_private(&path, &genuine);
    let twin = rig.buffer_dir.path().join("twin");
    std::fs::hard_link(&path, &twin).unwrap();
    assert_refused(&rig, "2 hard links");
    std::fs::remove_file(&twin).unwrap();
    assert_adopted(&rig, &genuine);
}

#[test]
fn a_symlinked_buffer_file_is_refused_and_its_target_untouched() {
    let (rig, genuine) = crashed_daemon();
    let path = rig.buffer_path();
    let elsewhere = tempfile::tempdir().unwrap();
    // A link to the genuine file (adopting through it would be believing the link) and to some
    // other file (a start afresh would truncate it).
    for target_bytes in [genuine.clone(), b"precious data of someone else".to_vec()] {
        let target = elsewhere.path().join("target");
        write_private(&target, &target_bytes);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert_refused(&rig, "symbolic link");
        assert_eq!(
            std::fs::read(&target).unwrap(),
            target_bytes,
            "target changed"
        );
    }
    // A dangling link: the engine would create the file at the link's target.
    let target = elsewhere.path().join("created-through-the-link");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert_refused(&rig, "symbolic link");
    assert!(!target.exists(), "a file was created through the link");
    std::fs::remove_file(&path).unwrap();
    assert_adopted(&rig, &genuine);
}

#[test]
fn a_new_buffer_file_is_private() {
    let rig = Rig::new(1, 16, BACKING_BYTES, 4096);
    let engine = rig.open();
    let meta = std::fs::symlink_metadata(rig.buffer_path()).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    engine.shutdown().unwrap();
}

/// `max_bandwidth_mib` once wrapped to a cap of 0 bytes/s; the throttle divided by it and the
/// panic killed the writeback thread for good (a drain then waited for ever). A cap of 0 set
/// directly now means no cap, and the drain completes.
#[test]
fn a_zero_bandwidth_cap_does_not_stop_writeback() {
    let rig = Rig::new(1, 16, BACKING_BYTES, 4096);
    let mut options = rig.options();
    options.writeback = Some(writeback::Policy {
        max_bandwidth_bytes_per_sec: Some(0),
        ..Default::default()
    });
    let engine = Arc::new(rig.open_with(options));
    engine.write(0, &[5u8; BLOCK], false).unwrap();
    engine.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || {
        let drained = e.drain(Duration::from_millis(5), |_| {});
        let _ = tx.send(drained.map_err(|err| err.to_string()));
    });
    // Not a timing assertion: a guard against waiting for ever on a dead thread.
    let drained = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the drain never returned: the writeback thread is dead");
    drained.unwrap();
    assert!(rig.backing.snapshot()[..BLOCK].iter().all(|&b| b == 5));
    engine.shutdown().unwrap();
}
