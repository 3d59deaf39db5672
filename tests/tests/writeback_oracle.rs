//! The cache-loss oracle (CONTRACT §2, "cache lost entirely") as a property test.
//!
//! Thousands of random workloads (writes, FUA writes, FLUSHes, discards, write-zeroes, reads)
//! run while writeback works as hard as it can (`idle_after = 0`: full speed all the time). At a
//! random instant the world stops and the whole cache is thrown away: either a timer fires (it
//! lands anywhere: mid-batch, mid-I/O, between batches, in the checkpoint write), or the k-th
//! I/O writeback sends to the backing device is the last one to arrive (it lands exactly inside a
//! batch). Then the backing device alone must hold the state at some flush boundary B plus a
//! subset of the writes of epoch B+1, and nothing later — both what it holds now (the host stays
//! up, only the cache legs died) and what survives if it loses power too (its unflushed writes
//! kept at random, one torn at a sector boundary).
//!
//! The oracle is shown to be able to fail: it rejects hand-made states that break the order, and
//! the same harness flags a backing device that lets one write slip past a flush barrier.
//!
//! Seeds are printed on failure; `WB_SEED=n` re-runs one case.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wb_target::{Device, FormatOptions, OpenOptions};
use wb_tests::{model, Hooked, IoOp, Model, SimDisk, BACKING_IDENTITY};

const CACHE_SEGMENTS: u64 = 16;
const CASES: u64 = 2000;
/// Cases run side by side: a stopped engine waits for its sync thread's tick, which is idle time.
const WORKERS: u64 = 4;

/// A cache set of simulated devices that is reused from case to case: re-formatting is much
/// cheaper than building (and garbage-filling) new devices.
struct Devices {
    legs: Vec<Arc<SimDisk>>,
    backing: Arc<SimDisk>,
    dir: tempfile::TempDir,
}

impl Devices {
    fn new(backing_bytes: u64) -> Devices {
        let leg_bytes =
            logfmt::SEGMENT_AREA_OFFSET + CACHE_SEGMENTS * logfmt::SEGMENT_SIZE_BYTES as u64;
        let legs: Vec<Arc<SimDisk>> = (0..2)
            .map(|i| SimDisk::new(&format!("sim:leg{i}"), leg_bytes))
            .collect();
        for (i, leg) in legs.iter().enumerate() {
            leg.fill_garbage(100 + i as u64);
        }
        Devices {
            legs,
            backing: SimDisk::new("sim:backing", backing_bytes),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn leg_devices(&self) -> Vec<Arc<dyn Device>> {
        self.legs
            .iter()
            .map(|l| l.clone() as Arc<dyn Device>)
            .collect()
    }

    /// Power back on, a fresh cache set over a backing device full of the case's garbage.
    fn reset(&self, seed: u64, lbs: u32) {
        for d in self.legs.iter().chain([&self.backing]) {
            d.power_on();
        }
        self.backing.fill_garbage(seed ^ 0x5eed);
        let _ = std::fs::remove_file(self.buffer_path());
        wb_target::format(
            &self.leg_devices(),
            self.backing.as_ref(),
            BACKING_IDENTITY,
            &FormatOptions {
                logical_block_size: lbs,
                force: true,
            },
        )
        .expect("format");
    }

    fn buffer_path(&self) -> std::path::PathBuf {
        self.dir.path().join("cache.buf")
    }
}

/// How the backing device misbehaves (only to show that the harness catches it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    Honest,
    /// Holds back a write across the next flush and applies it at the one after, so writes of
    /// the following batch (a later epoch) reach the device before it: a write reordered across
    /// a barrier.
    LeaksPastBarrier,
}

#[derive(Default)]
struct Outcome {
    /// The explained boundary is older than the last completed FLUSH (writeback was behind).
    behind: bool,
    /// Some sectors hold writes of the epoch after the boundary (a batch was cut short).
    mid_epoch: bool,
    /// The same for the image after the backing device's own power cut.
    mid_epoch_durable: bool,
    cut_by_io: bool,
}

/// One random workload, cut at a random instant; returns what the oracle saw.
fn run_case(seed: u64, devices: &Devices, backing_kind: Backing) -> Result<Outcome, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let lbs: u64 = if rng.gen_bool(0.5) { 512 } else { 4096 };
    devices.reset(seed, lbs as u32);
    let backing_bytes = devices.backing.size_bytes();
    let model = Mutex::new(Model::from_image(devices.backing.snapshot()));

    // The stop: raised first, then every device freezes (the backing first: its content at
    // that instant is what the cache loss leaves).
    let cut = Arc::new(AtomicBool::new(false));
    let stop_world = {
        let cut = cut.clone();
        let legs = devices.legs.clone();
        let backing = devices.backing.clone();
        move || {
            if !cut.swap(true, Ordering::SeqCst) {
                backing.freeze();
                for leg in &legs {
                    leg.freeze();
                }
            }
        }
    };
    // Cut by I/O: writeback's k-th operation on the backing device (write, zeroing or flush)
    // never arrives. Otherwise a timer.
    let cut_at_io = if rng.gen_bool(0.5) {
        rng.gen_range(1..80u64)
    } else {
        u64::MAX
    };
    let cut_after = Duration::from_micros(if cut_at_io == u64::MAX {
        rng.gen_range(0..25_000)
    } else {
        60_000 // a backstop, if writeback finishes first
    });
    let ios = Arc::new(AtomicU64::new(0));
    let deferred: Mutex<Option<(u64, Vec<u8>, u32)>> = Mutex::new(None);
    let backing = {
        let stop_world = stop_world.clone();
        let ios = ios.clone();
        Hooked::new(devices.backing.clone(), move |inner, op| {
            if ios.fetch_add(1, Ordering::SeqCst) + 1 == cut_at_io {
                stop_world();
            }
            if backing_kind == Backing::Honest {
                return None;
            }
            // (write held back, flushes it has been held across)
            let mut d = deferred.lock();
            match op {
                IoOp::Write { offset, data } if d.is_none() => {
                    *d = Some((*offset, data.to_vec(), 0));
                    Some(Ok(()))
                }
                IoOp::Flush => {
                    match d.take() {
                        Some((offset, data, 1)) => inner.write_at(&data, offset).unwrap(),
                        Some((offset, data, n)) => *d = Some((offset, data, n + 1)),
                        None => {}
                    }
                    None
                }
                _ => None,
            }
        })
    };

    let policy = writeback::Policy {
        idle_after: Duration::ZERO,
        ..writeback::Policy::default()
    };
    let mut options = OpenOptions::new(devices.buffer_path());
    options.ram_buffers = rng.gen_range(2..6);
    options.sync_interval = Duration::from_millis(rng.gen_range(1..30));
    options.writeback = Some(policy);
    let engine = wb_target::open(
        devices.leg_devices(),
        backing as Arc<dyn Device>,
        BACKING_IDENTITY,
        options,
    )
    .map_err(|e| format!("open: {e}"))?;

    let ops = rng.gen_range(10..3000);
    let hot_units = 64 * 1024 / lbs;
    let units_total = backing_bytes / lbs;
    let flush_percent = rng.gen_range(2..30);
    let mut cut_rng = StdRng::seed_from_u64(rng.gen());
    std::thread::scope(|scope| {
        let cutter = scope.spawn(|| {
            let started = Instant::now();
            while !cut.load(Ordering::SeqCst) && started.elapsed() < cut_after {
                std::thread::sleep(Duration::from_micros(200));
            }
            stop_world();
        });
        for _ in 0..ops {
            if cut.load(Ordering::SeqCst) {
                break;
            }
            let units = rng.gen_range(1..=(32 * 1024 / lbs));
            let unit = if rng.gen_bool(0.5) {
                rng.gen_range(0..hot_units - units)
            } else {
                rng.gen_range(0..units_total - units)
            };
            let (offset, len) = (unit * lbs, units * lbs);
            let roll = rng.gen_range(0..100);
            if roll < flush_percent {
                let flushed = engine.flush();
                // Only a FLUSH that completed before the stop is a boundary (fewer boundaries
                // only make the oracle more lenient).
                if flushed.is_ok() && !cut.load(Ordering::SeqCst) {
                    model.lock().flush();
                }
                if flushed.is_err() {
                    break;
                }
                continue;
            }
            // Every request issued is recorded: one that raced the stop may or may not have
            // reached the cache, and the oracle allows any subset of the open epoch.
            let result = match roll {
                _ if roll < 75 => {
                    let fill: u8 = rng.gen();
                    let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8) | 1).collect();
                    let fua = rng.gen_bool(0.03);
                    model.lock().write(offset as usize, &data);
                    let r = engine.write(offset, &data, fua);
                    if fua && r.is_ok() && !cut.load(Ordering::SeqCst) {
                        model.lock().flush();
                    }
                    r
                }
                75..=82 => {
                    model.lock().zero(offset as usize, len as usize);
                    engine.discard(offset, len)
                }
                83..=89 => {
                    model.lock().zero(offset as usize, len as usize);
                    engine.write_zeroes(offset, len)
                }
                _ => {
                    let mut buf = vec![0u8; len as usize];
                    let r = engine.read(offset, &mut buf);
                    // Not trusted once the stop began: the frozen legs dropped later writes.
                    if r.is_ok()
                        && !cut.load(Ordering::SeqCst)
                        && buf != model.lock().data[offset as usize..(offset + len) as usize]
                    {
                        return Err(format!("read of {len} bytes at {offset} differs"));
                    }
                    r
                }
            };
            if let Err(e) = result {
                if !cut.load(Ordering::SeqCst) {
                    return Err(format!("request failed before the stop: {e}"));
                }
                break;
            }
        }
        cutter.join().expect("cutter");
        Ok(())
    })?;
    engine.abandon();
    drop(engine);

    let model = model.into_inner();
    let now = devices.backing.snapshot();
    let (b, mid) = model
        .explain_cache_loss(&now)
        .map_err(|e| format!("backing as the cache died ({lbs}-byte blocks): {e}"))?;
    devices
        .backing
        .power_cut_atomic(&mut cut_rng, model::SECTOR);
    let durable = devices.backing.snapshot();
    let (_, mid_durable) = model
        .explain_cache_loss(&durable)
        .map_err(|e| format!("backing after its own power cut too ({lbs}-byte blocks): {e}"))?;
    Ok(Outcome {
        behind: b < model.flush_count(),
        mid_epoch: mid > 0,
        mid_epoch_durable: mid_durable > 0,
        cut_by_io: ios.load(Ordering::SeqCst) >= cut_at_io,
    })
}

fn backing_bytes_for(seed: u64) -> u64 {
    if seed.is_multiple_of(3) {
        2 << 20
    } else {
        1 << 20
    }
}

/// Runs `seeds` over `WORKERS` threads, each with its own devices; returns (seed, result) pairs.
fn run_many(seeds: std::ops::Range<u64>, backing: Backing) -> Vec<(u64, Result<Outcome, String>)> {
    let next = AtomicU64::new(seeds.start);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                let mut devices: HashMap<u64, Devices> = HashMap::new();
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= seeds.end {
                        break;
                    }
                    let size = backing_bytes_for(seed);
                    let d = devices.entry(size).or_insert_with(|| Devices::new(size));
                    let r = run_case(seed, d, backing);
                    results.lock().push((seed, r));
                }
            });
        }
    });
    let mut results = results.into_inner();
    results.sort_by_key(|r| r.0);
    results
}

#[test]
fn cache_loss_leaves_a_flush_boundary_plus_part_of_one_epoch() {
    if let Ok(seed) = std::env::var("WB_SEED") {
        let seed: u64 = seed.parse().expect("WB_SEED is a number");
        let devices = Devices::new(backing_bytes_for(seed));
        if let Err(e) = run_case(seed, &devices, Backing::Honest) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let started = Instant::now();
    let results = run_many(0..CASES, Backing::Honest);
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(seed, r)| r.as_ref().err().map(|e| format!("seed {seed}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {CASES} cases fail (re-run one with WB_SEED=n):\n{}",
        failures.len(),
        failures.join("\n")
    );
    let outcomes: Vec<&Outcome> = results.iter().map(|(_, r)| r.as_ref().unwrap()).collect();
    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let (behind, mid, mid_durable, by_io) = (
        count(&|o| o.behind),
        count(&|o| o.mid_epoch),
        count(&|o| o.mid_epoch_durable),
        count(&|o| o.cut_by_io),
    );
    eprintln!(
        "{CASES} cases in {:.1} s: writeback behind the last FLUSH in {behind}, cut inside an \
         epoch in {mid} (after the backing's power cut: {mid_durable}), stopped by the k-th \
         backing I/O in {by_io}",
        started.elapsed().as_secs_f64()
    );
    // The property must have been exercised where it can break, not only at quiet points.
    assert!(
        behind > CASES as usize / 10,
        "writeback rarely behind: {behind}"
    );
    assert!(mid > CASES as usize / 20, "few cuts inside an epoch: {mid}");
    assert!(
        mid_durable > 0,
        "no mid-epoch state survived a backing power cut"
    );
}

/// The oracle alone, on hand-made images: it accepts what a power cut at an earlier moment could
/// leave and rejects anything that skips an epoch or invents a value.
#[test]
fn oracle_rejects_states_that_break_the_order() {
    const S: usize = model::SECTOR;
    let initial = vec![7u8; 64 * S];
    let mut m = Model::from_image(initial.clone());
    let a = vec![1u8; S];
    let b = vec![2u8; S];
    let c = vec![3u8; S];
    let b2 = vec![4u8; S];
    m.write(0, &a); // epoch 1
    m.flush();
    m.write(8 * S, &b); // epoch 2
    m.write(8 * S, &b2); // epoch 2 again: either value may be on the backing device
    m.flush();
    m.write(16 * S, &c); // epoch 3 (not flushed)

    let image = |writes: &[(usize, &[u8])]| {
        let mut img = initial.clone();
        for (sector, bytes) in writes {
            img[sector * S..sector * S + bytes.len()].copy_from_slice(bytes);
        }
        img
    };
    // Accepted: any boundary, plus any subset of the epoch after it.
    assert_eq!(m.check_cache_loss(&image(&[])), Ok(0));
    assert_eq!(m.check_cache_loss(&image(&[(0, &a)])), Ok(1));
    assert_eq!(m.check_cache_loss(&image(&[(0, &a), (8, &b)])), Ok(1));
    assert_eq!(m.check_cache_loss(&image(&[(0, &a), (8, &b2)])), Ok(2));
    assert_eq!(
        m.check_cache_loss(&image(&[(0, &a), (8, &b2), (16, &c)])),
        Ok(2)
    );
    assert_eq!(
        m.explain_cache_loss(&image(&[(0, &a), (8, &b)])),
        Ok((1, 1))
    );
    // Rejected: a write of epoch B+2 without epoch B+1 (what sorting across epochs leaves).
    assert!(m.check_cache_loss(&image(&[(0, &a), (16, &c)])).is_err());
    assert!(m.check_cache_loss(&image(&[(8, &b)])).is_err());
    assert!(m.check_cache_loss(&image(&[(16, &c)])).is_err());
    // Rejected: a value nobody wrote, and a sector torn between two values.
    assert!(m.check_cache_loss(&image(&[(3, &[9u8; S])])).is_err());
    let mut torn = a.clone();
    torn[S / 2..].copy_from_slice(&initial[S / 2..S]);
    assert!(m.check_cache_loss(&image(&[(0, &torn)])).is_err());
}

/// The whole harness can fail: the same workloads over a backing device that lets the first
/// write of each batch slip past the next flush (as a device that reorders across barriers
/// would) are caught.
#[test]
fn harness_catches_a_write_reordered_across_a_flush() {
    let results = run_many(0..100, Backing::LeaksPastBarrier);
    let caught = results
        .iter()
        .filter(|(_, r)| r.as_ref().is_err_and(|e| e.starts_with("backing")))
        .count();
    eprintln!("reordering backing device: {caught} of 100 cases caught");
    assert!(caught > 0, "the oracle never noticed the reordering");
}
