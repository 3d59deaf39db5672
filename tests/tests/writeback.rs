//! Writeback in the running engine (issue 3): crashes that land inside writeback batches, torn
//! checkpoints, a write storm into a full cache, the policy obeyed at run time, drain progress.
//!
//! No test asserts a timing. Where a test must know that writeback reached a point, a device hook
//! tells it (or stops the world there); positive waits poll with a generous deadline.
//!
//! Seeds are printed on failure; `WB_SEED=n` re-runs one case of the seeded tests.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{CHECKPOINT_RING_OFFSET, CHECKPOINT_SLOTS, CHECKPOINT_SLOT_SIZE_BYTES};
use parking_lot::{Condvar, Mutex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wb_target::{Device, Engine, OpenOptions};
use wb_tests::{Hooked, IoOp, Model, Rig, BACKING_IDENTITY};
use writeback::Policy;

/// Writeback at full speed all the time.
fn aggressive() -> Policy {
    Policy {
        idle_after: Duration::ZERO,
        ..Policy::default()
    }
}

/// No writeback unless writers wait for space or a drain asks: not idle-aware, a watermark and a
/// pressure curve that never trigger at the fill levels the tests use, no age limit.
fn paused() -> Policy {
    Policy {
        idle_aware: false,
        low_watermark: 1.0,
        pressure_start: 0.99,
        pressure_full: 1.0,
        age_threshold: Duration::from_secs(1 << 30),
        ..Policy::default()
    }
}

fn open_over(
    rig: &Rig,
    legs: Vec<Arc<dyn Device>>,
    backing: Arc<dyn Device>,
    policy: Policy,
) -> Engine {
    let mut options: OpenOptions = rig.options();
    options.writeback = Some(policy);
    wb_target::open(legs, backing, BACKING_IDENTITY, options).expect("open engine")
}

fn is_checkpoint_write(offset: u64) -> bool {
    let ring = CHECKPOINT_SLOTS as u64 * CHECKPOINT_SLOT_SIZE_BYTES as u64;
    (CHECKPOINT_RING_OFFSET..CHECKPOINT_RING_OFFSET + ring).contains(&offset)
}

/// Polls `done` until it holds; panics with `what` after a generous deadline (never a timing
/// assertion: only a hang fails it).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `case` for every seed on a few threads (cases spend much of their time asleep in engine
/// shutdowns); `WB_SEED` runs just that one. Panics listing every failing seed.
fn for_seeds(seeds: std::ops::Range<u64>, case: impl Fn(u64) -> Result<(), String> + Sync) {
    if let Ok(seed) = std::env::var("WB_SEED") {
        let seed: u64 = seed.parse().expect("WB_SEED is a number");
        if let Err(e) = case(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let next = AtomicU64::new(seeds.start);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= seeds.end {
                    break;
                }
                if let Err(e) = case(seed) {
                    failures.lock().push(format!("seed {seed}: {e}"));
                }
            });
        }
    });
    let failures = failures.into_inner();
    assert!(
        failures.is_empty(),
        "{} cases fail (re-run one with WB_SEED=n):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn pattern(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let fill: u8 = rng.gen();
    (0..len).map(|i| fill ^ (i as u8) | 1).collect()
}

// ------------------------------------------------------------ crash inside writeback batches

const CRASH_BACKING_BYTES: u64 = 2 << 20;

/// How often the crash landed inside writeback (at its k-th I/O) rather than at rest.
static CRASHES_INSIDE_WRITEBACK: AtomicU64 = AtomicU64::new(0);

/// Two rounds of: a random workload with writeback at full speed; the power fails just before
/// writeback's k-th I/O (a backing write, zeroing or flush, or a checkpoint write on a leg); the
/// engine is reopened on what survived. Every write acknowledged before a completed FLUSH must
/// read back and nothing may be invented; a drain then (re-writing segments that were already
/// written back before the crash) must leave the backing device equal to what reads returned.
fn crash_in_writeback_case(seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let lbs: u64 = if rng.gen_bool(0.5) { 512 } else { 4096 };
    let rig = Arc::new(Rig::new(2, 16, CRASH_BACKING_BYTES, lbs as u32));
    let mut model = Model::from_image(rig.backing.snapshot());
    for round in 0..2 {
        let cut = Arc::new(AtomicBool::new(false));
        let cut_rng = Arc::new(Mutex::new(StdRng::seed_from_u64(rng.gen())));
        let pull_plug = {
            let (cut, rig) = (cut.clone(), rig.clone());
            move || {
                if !cut.swap(true, Ordering::SeqCst) {
                    rig.power_cut(&mut *cut_rng.lock());
                }
            }
        };
        let events = Arc::new(AtomicU64::new(0));
        let crash_at = rng.gen_range(1..60u64);
        let event = {
            let (events, pull_plug) = (events.clone(), pull_plug.clone());
            move || {
                if events.fetch_add(1, Ordering::SeqCst) + 1 == crash_at {
                    pull_plug();
                }
            }
        };
        let backing = {
            let event = event.clone();
            Hooked::new(rig.backing.clone(), move |_, _| {
                event();
                None
            })
        };
        let legs: Vec<Arc<dyn Device>> = rig
            .legs
            .iter()
            .map(|leg| {
                let event = event.clone();
                Hooked::new(leg.clone(), move |_, op| {
                    if let IoOp::Write { offset, .. } = op {
                        if is_checkpoint_write(*offset) {
                            event();
                        }
                    }
                    None
                }) as Arc<dyn Device>
            })
            .collect();
        let engine = open_over(&rig, legs, backing, aggressive());
        let units_total = CRASH_BACKING_BYTES / lbs;
        for _ in 0..rng.gen_range(20..1500) {
            if cut.load(Ordering::SeqCst) {
                break;
            }
            let units = rng.gen_range(1..=(32 * 1024 / lbs));
            let unit = if rng.gen_bool(0.5) {
                rng.gen_range(0..(128 * 1024 / lbs) - units)
            } else {
                rng.gen_range(0..units_total - units)
            };
            let (offset, len) = (unit * lbs, units * lbs);
            let result = match rng.gen_range(0..100) {
                0..=69 => {
                    let data = pattern(&mut rng, len as usize);
                    let fua = rng.gen_bool(0.03);
                    let r = engine.write(offset, &data, fua);
                    // A write racing the cut may or may not have happened: the oracle allows any
                    // value written since the last FLUSH.
                    model.write(offset as usize, &data);
                    if fua && r.is_ok() && !cut.load(Ordering::SeqCst) {
                        model.flush();
                    }
                    r
                }
                70..=84 => {
                    let r = engine.flush();
                    if r.is_ok() && !cut.load(Ordering::SeqCst) {
                        model.flush();
                    }
                    r
                }
                85..=92 => {
                    model.zero(offset as usize, len as usize);
                    engine.discard(offset, len)
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    let r = engine.read(offset, &mut buf);
                    if r.is_ok()
                        && !cut.load(Ordering::SeqCst)
                        && buf != model.data[offset as usize..(offset + len) as usize]
                    {
                        return Err(format!("round {round}: read at {offset} differs"));
                    }
                    r
                }
            };
            if let Err(e) = result {
                if !cut.load(Ordering::SeqCst) {
                    return Err(format!(
                        "round {round}: request failed before the crash: {e}"
                    ));
                }
                break;
            }
        }
        // Writeback goes on after the workload: the crash still lands in it, unless it runs
        // out of work first (then the power fails at rest).
        wait_until("the crash, or a clean cache", || {
            cut.load(Ordering::SeqCst) || engine.status().dirty_bytes == 0
        });
        if events.load(Ordering::SeqCst) >= crash_at {
            CRASHES_INSIDE_WRITEBACK.fetch_add(1, Ordering::Relaxed);
        }
        pull_plug();
        engine.abandon();
        drop(engine);

        rig.power_on();
        let engine = rig.open();
        let mut image = vec![0u8; CRASH_BACKING_BYTES as usize];
        engine
            .read(0, &mut image)
            .map_err(|e| format!("round {round}: read after recovery: {e}"))?;
        model
            .check_after_power_cut(&image)
            .map_err(|e| format!("round {round} ({lbs}-byte blocks): {e}"))?;
        engine
            .drain(Duration::from_millis(1), |_| {})
            .map_err(|e| format!("round {round}: drain: {e}"))?;
        if engine.status().dirty_bytes != 0 {
            return Err(format!("round {round}: dirty after drain"));
        }
        engine.shutdown().map_err(|e| e.to_string())?;
        drop(engine);
        if rig.backing.snapshot() != image {
            return Err(format!(
                "round {round}: after the drain the backing device differs from what reads returned"
            ));
        }
        model = Model::from_image(image);
    }
    Ok(())
}

#[test]
fn crash_inside_writeback_loses_nothing_flushed() {
    const CASES: u64 = 150;
    for_seeds(0..CASES, crash_in_writeback_case);
    let inside = CRASHES_INSIDE_WRITEBACK.load(Ordering::Relaxed);
    eprintln!("{inside} of {} crashes landed inside writeback", 2 * CASES);
    if std::env::var("WB_SEED").is_err() {
        assert!(
            inside >= CASES,
            "too few crashes inside writeback: {inside}"
        );
    }
}

// ------------------------------------------------------------ torn checkpoint

const TORN_BACKING_BYTES: u64 = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Tail {
    /// Past the tear the slot keeps what it held before (the write stopped there).
    Old,
    /// Past the tear the slot holds garbage (a sector caught mid-write).
    Garbage,
}

/// The engine writes checkpoint number `target`; that write is torn after `tear_at` bytes on
/// every leg (or on the first leg only, the second never getting it), made durable, and the
/// power fails at once. The engine must come back from the previous checkpoint (or from the torn
/// one, if the tear happens to leave it whole), re-write the segments the torn checkpoint
/// covered, read back everything flushed, and drain to a backing device equal to the model.
fn torn_checkpoint_case(
    seed: u64,
    target: u64,
    tear_at: usize,
    tail: Tail,
    both_legs: bool,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let lbs: u64 = if rng.gen_bool(0.5) { 512 } else { 4096 };
    let rig = Arc::new(Rig::new(2, 16, TORN_BACKING_BYTES, lbs as u32));
    let mut model = Model::from_image(rig.backing.snapshot());

    // 1. Many small epochs, all flushed, nothing written back yet: twelve at least (a batch,
    //    and so a checkpoint, each), over twelve segments at least.
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    let mut epochs = 0;
    while engine.status().segments.current_id < 12 || epochs < 12 {
        epochs += 1;
        for _ in 0..rng.gen_range(1..40) {
            let units = rng.gen_range(1..=(16 * 1024 / lbs));
            let unit = rng.gen_range(0..TORN_BACKING_BYTES / lbs - units);
            let data = pattern(&mut rng, (units * lbs) as usize);
            engine.write(unit * lbs, &data, false).unwrap();
            model.write((unit * lbs) as usize, &data);
        }
        engine.flush().unwrap();
        model.flush();
    }
    if engine.status().segments.last_written_back_id != 0 {
        return Err("writeback ran while paused".into());
    }
    engine.shutdown().unwrap();
    drop(engine);

    // 2. Writeback runs until checkpoint `target` is written: that write is torn.
    let cut = Arc::new(AtomicBool::new(false));
    let torn_image: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let new_image: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let (cut, rig) = (cut.clone(), rig.clone());
            let (torn_image, new_image) = (torn_image.clone(), new_image.clone());
            Hooked::new(leg.clone(), move |inner, op| {
                let IoOp::Write { offset, data } = op else {
                    return None;
                };
                if !is_checkpoint_write(*offset)
                    || u64::from_le_bytes(data[32..40].try_into().unwrap()) != target
                {
                    return None;
                }
                if cut.load(Ordering::SeqCst) {
                    return Some(Ok(())); // the power is already off
                }
                let mut slot = vec![0u8; data.len()];
                inner.read_at(&mut slot, *offset).unwrap();
                slot[..tear_at].copy_from_slice(&data[..tear_at]);
                if let Tail::Garbage = tail {
                    for (j, b) in slot[tear_at..].iter_mut().enumerate() {
                        *b = (j as u8).wrapping_mul(151) ^ 0xa5;
                    }
                }
                inner.write_at(&slot, *offset).unwrap();
                inner.flush().unwrap();
                *torn_image.lock() = Some(slot);
                *new_image.lock() = Some(data.to_vec());
                if !both_legs || i == rig.legs.len() - 1 {
                    cut.store(true, Ordering::SeqCst);
                    rig.power_cut(&mut StdRng::seed_from_u64(seed));
                }
                Some(Ok(()))
            }) as Arc<dyn Device>
        })
        .collect();
    let engine = open_over(&rig, legs, rig.backing.clone(), aggressive());
    wait_until("the torn checkpoint write", || {
        cut.load(Ordering::SeqCst) || engine.status().dirty_bytes == 0
    });
    if !cut.load(Ordering::SeqCst) {
        return Err(format!("writeback finished before checkpoint {target}"));
    }
    engine.abandon();
    drop(engine);
    rig.power_on();

    // 3. Recovery: from the previous checkpoint, unless the tear left the new one whole.
    let engine = rig.open();
    let recovered = engine
        .recovery_report()
        .checkpoint
        .map_or(0, |c| c.sequence);
    let whole = *torn_image.lock() == *new_image.lock();
    let expected = if whole { target } else { target - 1 };
    if recovered != expected {
        return Err(format!(
            "recovered checkpoint {recovered}, expected {expected} (tear at {tear_at}, {tail:?})"
        ));
    }
    let mut image = vec![0u8; TORN_BACKING_BYTES as usize];
    engine.read(0, &mut image).unwrap();
    if image != model.data {
        return Err(format!("reads differ from the model (tear at {tear_at})"));
    }
    engine.drain(Duration::from_millis(1), |_| {}).unwrap();
    if engine.status().dirty_bytes != 0 {
        return Err("dirty after drain".into());
    }
    engine.shutdown().unwrap();
    drop(engine);
    if rig.backing.snapshot() != model.data {
        return Err(format!(
            "backing after drain differs from the model (tear at {tear_at})"
        ));
    }
    Ok(())
}

#[test]
fn checkpoint_torn_at_any_byte_is_tolerated() {
    // Every byte of the part of the slot that holds data, then every 97th byte of the rest.
    let mut offsets: Vec<usize> = (0..=64).chain((0..4096).step_by(97)).collect();
    offsets.extend([4095, 4096]);
    offsets.sort_unstable();
    offsets.dedup();
    let cases: Vec<(usize, Tail)> = offsets
        .iter()
        .flat_map(|&o| [(o, Tail::Old), (o, Tail::Garbage)])
        .collect();
    for_seeds(0..cases.len() as u64, |i| {
        let (tear_at, tail) = cases[i as usize];
        // Tear the first checkpoint ever written (no previous one but format's) and later ones,
        // including one whose slot held an older checkpoint (the ring has 8 slots).
        let target = [1, 2, 3, 5, 9][i as usize % 5];
        torn_checkpoint_case(i, target, tear_at, tail, i % 3 != 0)
    });
}

// ------------------------------------------------------------ full-cache storm

#[test]
fn write_storm_into_a_full_cache_waits_finishes_and_drains() {
    const WRITERS: u64 = 4;
    const REGION: u64 = 4 << 20;
    const PER_WRITER: u64 = 16 << 20; // 64 MiB in all through an 8 MiB cache
    let rig = Rig::new(2, 16, WRITERS * REGION, 4096);
    // A slow backing device (an HDD pool): writers outrun writeback and must wait.
    let backing = Hooked::new(rig.backing.clone(), |_, op| {
        if let IoOp::Write { .. } = op {
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    });
    let engine = Arc::new(open_over(
        &rig,
        rig.leg_devices(),
        backing,
        Policy::default(),
    ));
    let initial = rig.backing.snapshot();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for w in 0..WRITERS {
        let (engine, done_tx) = (engine.clone(), done_tx.clone());
        let base = w * REGION;
        let mut region = initial[base as usize..(base + REGION) as usize].to_vec();
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(w);
            let mut written = 0;
            while written < PER_WRITER {
                let blocks = rng.gen_range(1..=16u64);
                let block = rng.gen_range(0..REGION / 4096 - blocks);
                let data = pattern(&mut rng, (blocks * 4096) as usize);
                engine
                    .write(base + block * 4096, &data, false)
                    .expect("write");
                region[(block * 4096) as usize..][..data.len()].copy_from_slice(&data);
                written += data.len() as u64;
                if rng.gen_ratio(1, 64) {
                    engine.flush().expect("flush");
                }
            }
            done_tx.send((w, region)).unwrap();
        });
    }
    let mut expected = vec![Vec::new(); WRITERS as usize];
    for _ in 0..WRITERS {
        // A deadlock shows as a writer that never finishes.
        match done_rx.recv_timeout(Duration::from_secs(300)) {
            Ok((w, region)) => expected[w as usize] = region,
            Err(_) => panic!("writers stuck (deadlock?): {:?}", engine.status()),
        }
    }
    let status = engine.status();
    eprintln!(
        "storm: {} MiB written, {} MiB written back in {} backing writes, writers stalled {} ms",
        status.write_bytes >> 20,
        status.written_back_bytes >> 20,
        status.backing_write_ios,
        status.stall_ms
    );
    assert!(status.stall_ms > 0, "writers never waited: {status:?}");
    assert!(status.failure.is_none());
    engine.drain(Duration::from_millis(10), |_| {}).unwrap();
    let status = engine.status();
    assert_eq!(status.dirty_bytes, 0);
    assert_eq!(
        status.segments.last_written_back_id,
        status.segments.current_id
    );
    engine.shutdown().unwrap();
    assert!(
        rig.backing.snapshot() == expected.concat(),
        "backing device differs from the writers' data after the drain"
    );
}

// ------------------------------------------------------------ policy at run time

/// Writes `segments` segments, each its own epoch (so each is its own writeback batch).
/// `segments` epochs of one segment each, every one filling a slot of its own (127 data
/// blocks: a slot's worth), so that the policy's occupancy, counted in slots, is one slot per
/// epoch.
fn write_epochs(engine: &Engine, segments: u64) {
    let start = engine.status().segments.current_id;
    let mut block = 0u64;
    let per_slot = logfmt::DATA_BLOCKS_PER_SEGMENT as u64;
    while engine.status().segments.current_id < start + segments {
        let data = vec![block as u8 | 1; 4096 * per_slot as usize];
        engine.write(block * 4096, &data, false).unwrap();
        block += per_slot;
        engine.flush().unwrap();
    }
}

fn written_back(engine: &Engine) -> u64 {
    engine.status().segments.last_written_back_id
}

#[test]
fn paused_policy_holds_and_set_policy_resumes() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    write_epochs(&engine, 2);
    // A negative can only be shown by waiting: several writeback polls, then nothing done.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(written_back(&engine), 0, "written back while paused");
    assert!(engine.status().dirty_bytes > 0);
    engine.set_policy(aggressive());
    wait_until("written back after set_policy", || {
        engine.status().dirty_bytes == 0
    });
    assert_eq!(written_back(&engine), engine.status().segments.current_id);
}

/// `status` has a writeback lag while data waits for writeback (in the open segment, then
/// sealed) and none once writeback passed it.
#[test]
fn the_writeback_lag_lasts_until_writeback_passes_the_data() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    assert_eq!(
        engine.status().oldest_dirty_age,
        None,
        "a new cache is clean"
    );
    engine.write(0, &[7u8; 4096], false).unwrap();
    assert!(
        engine.status().oldest_dirty_age.is_some(),
        "in the open segment"
    );
    engine.flush().unwrap();
    let sealed = engine.status();
    assert!(sealed.segments.last_flushed_id > sealed.segments.last_written_back_id);
    assert!(
        sealed.oldest_dirty_age.is_some(),
        "sealed, not written back"
    );
    engine.drain(Duration::from_millis(20), |_| {}).unwrap();
    assert_eq!(engine.status().oldest_dirty_age, None, "written back");
}

#[test]
fn age_threshold_writes_back_below_the_watermark() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    write_epochs(&engine, 1);
    let mut p = paused();
    p.age_threshold = Duration::ZERO;
    engine.set_policy(p);
    wait_until("old data written back", || engine.status().dirty_bytes == 0);
}

#[test]
fn low_watermark_writes_back_down_to_it_and_no_further() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    // 3 of 16 segments dirty (18.75 %), each its own batch; the watermark is 10 %: writeback
    // takes it to 1 segment (6.25 %) and stops there.
    write_epochs(&engine, 3);
    let head = engine.status().segments.current_id;
    let mut p = paused();
    p.low_watermark = 0.10;
    engine.set_policy(p);
    wait_until("written back down to the watermark", || {
        written_back(&engine) >= head - 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(written_back(&engine), head - 1, "went below the watermark");
    assert!(engine.status().dirty_bytes > 0);
}

#[test]
fn idle_awareness_writes_back_once_users_are_idle() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    write_epochs(&engine, 1);
    let mut p = paused();
    p.idle_aware = true;
    p.idle_after = Duration::from_millis(50);
    engine.set_policy(p);
    wait_until("written back while idle", || {
        engine.status().dirty_bytes == 0
    });
}

#[test]
fn drain_reports_every_step_of_its_progress() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    // Each batch's backing flush waits until the drain has reported progress since the batch
    // began, so every value of `segments_left` is seen, whatever the scheduling.
    let reports = Arc::new((Mutex::new(0u64), Condvar::new()));
    let backing = {
        let reports = reports.clone();
        Hooked::new(rig.backing.clone(), move |_, op| {
            if let IoOp::Flush = op {
                let (count, changed) = &*reports;
                let mut count = count.lock();
                let wanted = *count + 1;
                while *count < wanted {
                    changed.wait(&mut count);
                }
            }
            None
        })
    };
    let engine = open_over(&rig, rig.leg_devices(), backing, paused());
    write_epochs(&engine, 5);
    let mut seen: Vec<(u64, u64)> = Vec::new();
    engine
        .drain(Duration::from_millis(1), |p| {
            seen.push((p.segments_left, p.segments_done));
            let (count, changed) = &*reports;
            *count.lock() += 1;
            changed.notify_all();
        })
        .unwrap();
    let mut left: Vec<u64> = seen.iter().map(|s| s.0).collect();
    left.dedup();
    assert_eq!(left, vec![5, 4, 3, 2, 1], "segments_left as reported");
    let mut done: Vec<u64> = seen.iter().map(|s| s.1).collect();
    done.dedup();
    assert_eq!(done, vec![0, 1, 2, 3, 4], "segments_done as reported");
    assert_eq!(engine.status().dirty_bytes, 0);
}

// ------------------------------------------------------------ real files, direct I/O

/// Writeback over real files opened with O_DIRECT (the simulated devices check no alignment):
/// segment images read straight into writeback's buffers, stretches written from them without a
/// copy, merged writes, partial sectors, zeroed ranges. After a drain, the backing file alone
/// equals the model.
#[test]
fn writeback_over_direct_io_files_leaves_the_backing_file_equal_to_the_model() {
    use wb_target::{FileDevice, FormatOptions};
    const BACKING: u64 = 8 << 20;
    for lbs in [4096u64, 512] {
        let dir = tempfile::tempdir().unwrap();
        let (cache_path, backing_path) = (dir.path().join("cache"), dir.path().join("backing"));
        let cache_bytes = logfmt::SEGMENT_AREA_OFFSET + 16 * logfmt::SEGMENT_SIZE_BYTES as u64;
        for (path, size) in [(&cache_path, cache_bytes), (&backing_path, BACKING)] {
            std::fs::File::create(path).unwrap().set_len(size).unwrap();
        }
        let backing = FileDevice::open(&backing_path).unwrap();
        let identity = backing.identity();
        let cache: Arc<dyn Device> = Arc::new(FileDevice::open(&cache_path).unwrap());
        wb_target::format(
            std::slice::from_ref(&cache),
            &backing,
            &identity,
            &FormatOptions {
                logical_block_size: lbs as u32,
                force: false,
            },
        )
        .unwrap();
        let mut options = OpenOptions::new(dir.path().join("buf"));
        options.writeback = Some(aggressive());
        let engine = wb_target::open(vec![cache], Arc::new(backing), &identity, options).unwrap();
        let mut model = Model::new(BACKING as usize);
        let mut rng = StdRng::seed_from_u64(lbs);
        for i in 0..3000 {
            let units = rng.gen_range(1..=(64 * 1024 / lbs));
            let unit = rng.gen_range(0..BACKING / lbs - units);
            let (offset, len) = (unit * lbs, units * lbs);
            match rng.gen_range(0..100) {
                0..=84 => {
                    let data = pattern(&mut rng, len as usize);
                    engine.write(offset, &data, false).unwrap();
                    model.write(offset as usize, &data);
                }
                85..=89 => {
                    engine.discard(offset, len).unwrap();
                    model.zero(offset as usize, len as usize);
                }
                _ => engine.flush().unwrap(),
            }
            if i % 500 == 499 {
                // Sequential runs too, so that whole images go out without a copy.
                let data = pattern(&mut rng, 1 << 20);
                let offset = rng.gen_range(0..(BACKING >> 20)) << 20;
                engine.write(offset, &data, false).unwrap();
                model.write(offset as usize, &data);
            }
        }
        engine.drain(Duration::from_millis(1), |_| {}).unwrap();
        let status = engine.status();
        assert_eq!(status.dirty_bytes, 0);
        assert!(status.failure.is_none(), "{status:?}");
        assert_eq!(
            status.backing_errors, 0,
            "e.g. EINVAL from a misaligned direct write"
        );
        engine.shutdown().unwrap();
        drop(engine);
        let on_disk = std::fs::read(&backing_path).unwrap();
        assert!(
            on_disk == model.data,
            "{lbs}-byte blocks: backing file differs from the model after the drain"
        );
    }
}

/// A backing device that refuses every write: the drain gives up with an error naming the cause
/// (instead of waiting forever), nothing is lost, and once the device is back writeback resumes
/// and a second drain completes with the backing device holding every write.
#[test]
fn drain_gives_up_on_a_failing_backing_device_and_resumes_after() {
    let rig = Rig::new(2, 16, 8 << 20, 4096);
    let engine = open_over(&rig, rig.leg_devices(), rig.backing.clone(), paused());
    let mut model = Model::from_image(rig.backing.snapshot());
    for block in 0..300u64 {
        let data = vec![block as u8 | 1; 4096];
        engine.write(block * 4096, &data, false).unwrap();
        model.write(block as usize * 4096, &data);
    }
    engine.flush().unwrap();
    rig.backing
        .faults
        .write_error_ppm
        .store(1_000_000, Ordering::Relaxed);
    let err = engine
        .drain(Duration::from_millis(10), |_| {})
        .expect_err("a drain onto a device that refuses every write cannot succeed");
    let message = err.to_string();
    assert!(
        matches!(err, wb_target::EngineError::WritebackStuck { .. })
            && message.contains("injected write error"),
        "drain error does not say why: {message}"
    );
    assert_eq!(
        written_back(&engine),
        0,
        "nothing can have been written back"
    );
    rig.backing
        .faults
        .write_error_ppm
        .store(0, Ordering::Relaxed);
    engine.drain(Duration::from_millis(10), |_| {}).unwrap();
    assert_eq!(engine.status().dirty_bytes, 0);
    assert!(
        rig.backing.snapshot() == model.data,
        "after the second drain the backing device differs from what was written"
    );
}
