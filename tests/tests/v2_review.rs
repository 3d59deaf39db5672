//! Review of on-disk format v2 (sub-segments packed in a slot, hash chain, per-slot RAM buffers,
//! group commit, 4 MiB leg-flush cadence). Each test drives one engine over simulated devices
//! through one exact scenario and checks what the contract (docs/CONTRACT.md §2, §3, §5) says a
//! later start or a read must return.
//!
//! Status at review time (see the report): every test here PASSED on the reviewed code; each
//! one asserts a suspicion that turned out unfounded, and is kept as a regression test.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use wb_target::{Device, Engine, OpenOptions};
use wb_tests::{
    block_of, read_block, wait_for_mode, Gate, Hooked, IoOp, Rig, SimDisk, BACKING_IDENTITY,
};

const BACKING_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

/// A block whose content names `tag` and the block number (a misplaced block is caught).
fn content(tag: u32, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[0..4].copy_from_slice(&tag.to_le_bytes());
        chunk[4..12].copy_from_slice(&block.to_le_bytes());
        chunk[12..16].copy_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

/// The power goes with nothing in flight: every leg (and, if `backing`, the backing device)
/// forgets what it did not flush, the tmpfs buffer file is gone, the devices come back. (Unlike
/// `Rig::power_cut`, nothing is torn: these scenarios place the cut themselves.)
fn power_cut_without_tearing(rig: &Rig, engine: Engine, backing: bool) {
    for leg in &rig.legs {
        leg.lose_unflushed();
    }
    if backing {
        rig.backing.lose_unflushed();
    }
    engine.abandon();
    drop(engine);
    let _ = std::fs::remove_file(rig.buffer_path());
    rig.power_on();
}

fn write_tag(engine: &Engine, model: &mut HashMap<u64, Vec<u8>>, block: u64, tag: u32, fua: bool) {
    let data = content(tag, block);
    engine.write(block * BLOCK as u64, &data, fua).unwrap();
    model.insert(block, data);
}

fn check_model(engine: &Engine, model: &HashMap<u64, Vec<u8>>, what: &str) {
    let mut blocks: Vec<_> = model.keys().copied().collect();
    blocks.sort();
    for b in blocks {
        let got = read_block(engine, b);
        assert!(
            got == model[&b],
            "{what}: block {b} does not hold its last acknowledged write (tag found {:?}, \
             block found {:?}); recovery: {}",
            u32::from_le_bytes(got[0..4].try_into().unwrap()),
            u64::from_le_bytes(got[4..12].try_into().unwrap()),
            engine.recovery_report().stop_reason
        );
    }
}

fn is_log_write(op: &IoOp<'_>) -> bool {
    matches!(op, IoOp::Write { offset, .. } if *offset >= logfmt::SEGMENT_AREA_OFFSET)
}

/// A copy of a device as it is now (unflushed writes included: a process crash loses nothing
/// the kernel took).
fn copy_of(disk: &SimDisk, name: &str) -> Arc<SimDisk> {
    let copy = SimDisk::new(name, disk.size_bytes());
    copy.poke(0, &disk.snapshot());
    copy
}

/// kill -9 at one instant, recovered in a new place: the legs as they are now and a copy of
/// the RAM buffer file taken now.
struct Killed {
    legs: Vec<Arc<SimDisk>>,
    backing: Arc<SimDisk>,
    dir: tempfile::TempDir,
}

impl Killed {
    fn take(rig: &Rig, buffer: &std::path::Path) -> Killed {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(buffer).unwrap();
        let path = dir.path().join("cache.buf");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Killed {
            legs: rig
                .legs
                .iter()
                .enumerate()
                .map(|(i, l)| copy_of(l, &format!("sim:leg{i}-copy")))
                .collect(),
            backing: copy_of(&rig.backing, "sim:backing-copy"),
            dir,
        }
    }

    fn open(&self, mut options: OpenOptions) -> Engine {
        options.buffer_path = self.dir.path().join("cache.buf");
        options.fault_dir = Some(self.dir.path().to_path_buf());
        let legs: Vec<Arc<dyn Device>> = self
            .legs
            .iter()
            .map(|l| l.clone() as Arc<dyn Device>)
            .collect();
        wb_target::open(legs, self.backing.clone(), BACKING_IDENTITY, options)
            .expect("the successor starts")
    }
}

/// Several segments per slot, over several slots, sealed but not on any leg, plus an open
/// segment with rewrites in place, in buffers taken mid-slot after a restart: a kill -9 at that
/// instant loses nothing acknowledged (CONTRACT §2, FORMAT.md §6.1). PASSED.
#[test]
fn kill9_with_sealed_segments_of_several_slots_only_in_ram_loses_nothing() {
    // 512-byte logical blocks: a partial-block rewrite in the open segment.
    let rig = Rig::new(2, 16, BACKING_BYTES, 512);
    let mut model = HashMap::new();
    let mut options = rig.no_writeback();
    options.ram_buffers = 8;
    options.sync_interval = Duration::from_secs(3600);
    // Run A: small FLUSHed segments packed in slot 0; a clean stop mid-slot.
    {
        let engine = rig.open_with(options.clone());
        for b in 0..5 {
            write_tag(&engine, &mut model, b, 1, false);
            engine.flush().unwrap();
        }
        engine.shutdown().unwrap();
    }
    // Run B: its first buffer is taken mid-slot. Then the legs stop taking log writes.
    let gate = Arc::new(Gate::default());
    gate.hold_all.store(true, Ordering::Release);
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .map(|l| {
            let g = gate.clone();
            Hooked::new(l.clone(), move |_d, op| {
                if is_log_write(op) {
                    g.hold_if_armed();
                }
                None
            }) as Arc<dyn Device>
        })
        .collect();
    let engine = Arc::new(
        wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options.clone()).unwrap(),
    );
    write_tag(&engine, &mut model, 10, 2, false);
    engine.flush().unwrap();
    write_tag(&engine, &mut model, 11, 2, false);
    engine.flush().unwrap();
    gate.armed.store(true, Ordering::Release);
    // A FLUSHed small segment that never reaches a leg (its FLUSH waits forever).
    write_tag(&engine, &mut model, 12, 3, false);
    let e = engine.clone();
    let _waiting_flush = std::thread::spawn(move || {
        let _ = e.flush();
    });
    assert!(gate.wait_held(Duration::from_secs(20)));
    // More than two slots of writes, all sealed as full segments behind it.
    for b in 100..400 {
        write_tag(&engine, &mut model, b, 4, false);
    }
    // The open segment: new blocks, rewrites in place, a partial rewrite.
    for b in 500..520 {
        write_tag(&engine, &mut model, b, 5, false);
    }
    for b in 505..510 {
        write_tag(&engine, &mut model, b, 6, false);
    }
    let half = vec![0xeeu8; 2048];
    engine.write(511 * BLOCK as u64, &half, false).unwrap();
    let mut merged = model[&511].clone();
    merged[..2048].copy_from_slice(&half);
    model.insert(511, merged);
    check_model(&engine, &model, "before the kill");
    // Let the log writer finish sealing what is queued (it does not wait for the legs).
    std::thread::sleep(Duration::from_millis(300));
    let killed = Killed::take(&rig, &rig.buffer_path());
    gate.release();
    engine.abandon();
    let successor = killed.open(rig.no_writeback());
    check_model(&successor, &model, "after kill -9");
    // And once more, after the successor stops cleanly.
    successor.shutdown().unwrap();
    drop(successor);
    let again = killed.open(rig.no_writeback());
    check_model(&again, &model, "after the successor's clean stop");
}

/// A run that starts mid-slot (after a restart) and packs FLUSHed segments behind the
/// recovered head; the power goes with unflushed segments behind them: every FLUSHed write
/// reads back, twice over (the second run's leftovers must not join the third run's chain).
/// PASSED.
#[test]
fn power_cut_in_a_slot_shared_by_two_runs_keeps_every_flushed_write() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut model = HashMap::new();
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    {
        let engine = rig.open_with(options.clone());
        for b in 0..4 {
            write_tag(&engine, &mut model, b, 1, false);
            engine.flush().unwrap();
        }
        engine.shutdown().unwrap();
    }
    for round in 0..3u32 {
        let tag = round + 2;
        let engine = rig.open_with(options.clone());
        check_model(&engine, &model, &format!("round {round} start"));
        for i in 0..6u64 {
            write_tag(&engine, &mut model, 20 + i, tag, false);
            engine.flush().unwrap();
        }
        // Unflushed: sealed by a rewrite-heavy burst that fills a segment, then lost.
        let mut lost = HashMap::new();
        for b in 40..200u64 {
            write_tag(&engine, &mut lost, b, tag + 100, false);
        }
        power_cut_without_tearing(&rig, engine, false);
    }
    let engine = rig.open_with(options);
    check_model(&engine, &model, "after the last power cut");
}

/// Many one-block FLUSHed segments (64 per slot) over several laps of a 16-slot ring while
/// writeback runs: reads always return the newest data (RAM buffer, legs, backing), and after
/// the power goes (unflushed writes lost) every FLUSHed write reads back. PASSED.
#[test]
fn small_flushed_segments_over_several_laps_read_back_and_survive_a_power_cut() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut model = HashMap::new();
    let engine = rig.open_with(rig.writing_back_always());
    let mut x = 12345u64;
    for i in 0..2600u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % 300;
        write_tag(&engine, &mut model, block, i, false);
        if i % 3 != 0 {
            engine.flush().unwrap();
        } else {
            // A FUA write sometimes, a read of another block always.
            let other = (x >> 20) % 300;
            if let Some(want) = model.get(&other) {
                assert!(
                    read_block(&engine, other) == *want,
                    "op {i}: block {other} stale"
                );
            }
        }
    }
    engine.flush().unwrap();
    check_model(&engine, &model, "live");
    let status = engine.status();
    eprintln!("segments {:?}", status.segments);
    power_cut_without_tearing(&rig, engine, true);
    let engine = rig.open();
    check_model(&engine, &model, "after the power cut");
}

/// Every leg lost with a log spread over several slots; the loss recorded, the daemon
/// restarted in passthrough, and the same devices given back as replacements (their old log
/// still on them): the new log goes on where the checkpoint says, and after a power cut every
/// FLUSHed write (passthrough and log) reads back. PASSED.
#[test]
fn a_lost_cache_given_back_as_its_own_replacement_does_not_replay_its_old_log() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut model = HashMap::new();
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine = rig.open_with(options.clone());
    for b in 0..300u64 {
        write_tag(&engine, &mut model, b, 1, b % 50 == 0);
    }
    engine.flush().unwrap();
    rig.kill_legs(true);
    // Noticed by a log write.
    let _ = engine.write(0, &block_of(1), true);
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    let lost = engine.status().cache_lost;
    eprintln!("lost: {lost:?}");
    // What the cache held is gone: the model is what the backing device holds now.
    let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
    for b in 0..400u64 {
        model.insert(b, read_block(&engine, b));
    }
    engine
        .write(7 * BLOCK as u64, &content(2, 7), false)
        .unwrap();
    model.insert(7, content(2, 7));
    let _ = engine.flush();
    engine.abandon();
    drop(engine);
    rig.kill_legs(false);
    let engine = rig.open_with(options.clone());
    assert_eq!(engine.status().mode, "passthrough");
    for (i, leg) in rig.legs.iter().enumerate() {
        engine
            .replace_leg(i, leg.clone() as Arc<dyn Device>, Duration::from_secs(30))
            .unwrap();
    }
    wait_for_mode(&engine, "mirrored");
    for b in 0..20u64 {
        write_tag(&engine, &mut model, 1000 + b, 3, false);
        engine.flush().unwrap();
    }
    check_model(&engine, &model, "after replace");
    power_cut_without_tearing(&rig, engine, true);
    let engine = rig.open_with(options);
    check_model(&engine, &model, "after the power cut");
}

/// A FLUSH returns only once its segment is flushed on every healthy leg: with leg 1's flush
/// held, the FLUSH waits; and segments written past the 4 MiB cadence are vouched durable only
/// after a flush of the leg that holds them. PASSED.
#[test]
fn a_flush_waits_for_every_legs_flush() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let leg1 = Hooked::new(rig.legs[1].clone(), move |_d, op| {
        if matches!(op, IoOp::Flush) {
            g.hold_if_armed();
        }
        None
    });
    let legs: Vec<Arc<dyn Device>> = vec![rig.legs[0].clone(), leg1];
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine =
        Arc::new(wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options).unwrap());
    let mut model = HashMap::new();
    write_tag(&engine, &mut model, 3, 1, false);
    gate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let flush = std::thread::spawn(move || e.flush());
    assert!(gate.wait_held(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !flush.is_finished(),
        "a FLUSH returned before leg 1 flushed"
    );
    gate.release();
    flush.join().unwrap().unwrap();
}
