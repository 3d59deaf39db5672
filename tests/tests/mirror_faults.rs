//! Mirrored cache under injected faults (CONTRACT §5), in process: I/O errors and silent corruption
//! on one leg, a leg dying mid-workload, both legs dying. Reads must always match the model, no
//! acknowledged-and-flushed write may be lost, repairs must happen and be counted, and the modes
//! must go degraded → passthrough → (replace) → mirrored.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wb_target::{Device, Engine};
use wb_tests::{wait_for_mode, Model, Rig, SimDisk};

const BACKING_BYTES: u64 = 8 << 20;
const LBS: u64 = 4096;

/// Random writes, flushes, discards and verified reads; returns nothing, panics on a mismatch.
fn workload(engine: &Engine, model: &mut Model, rng: &mut StdRng, ops: usize, seed: u64) {
    let blocks_total = BACKING_BYTES / LBS;
    for step in 0..ops {
        let blocks = rng.gen_range(1..=16u64);
        let first = if rng.gen_bool(0.5) {
            rng.gen_range(0..64)
        } else {
            // The last block is never written: the both-legs test pokes it (see there).
            rng.gen_range(0..blocks_total - blocks - 1)
        };
        let (offset, len) = (first * LBS, blocks * LBS);
        match rng.gen_range(0..100) {
            0..=54 => {
                let fill: u8 = rng.gen();
                let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8) | 1).collect();
                engine.write(offset, &data, false).unwrap();
                model.write(offset as usize, &data);
            }
            55..=64 => {
                engine.flush().unwrap();
                model.flush();
            }
            65..=69 => {
                engine.discard(offset, len).unwrap();
                model.zero(offset as usize, len as usize);
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                engine.read(offset, &mut buf).unwrap();
                assert!(
                    buf == model.data[offset as usize..(offset + len) as usize],
                    "seed {seed} step {step}: read at block {first} differs from the model"
                );
            }
        }
    }
}

fn full_read_matches(engine: &Engine, model: &Model, what: &str) {
    let mut image = vec![0u8; BACKING_BYTES as usize];
    engine.read(0, &mut image).unwrap();
    assert!(
        image == model.data,
        "{what}: full read differs from the model"
    );
}

fn options_writing_back_always(rig: &Rig) -> wb_target::OpenOptions {
    let mut options = rig.options();
    options.writeback = Some(writeback::Policy {
        idle_after: Duration::ZERO,
        ..Default::default()
    });
    options
}

#[test]
fn read_errors_and_silent_corruption_on_one_leg_are_repaired() {
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let rig = Rig::new(2, 16, BACKING_BYTES, LBS as u32);
        let mut model = Model::from_image(rig.backing.snapshot());
        let engine = rig.open();
        let bad = &rig.legs[(seed % 2) as usize];
        bad.faults.seed.store(seed + 1, Ordering::Relaxed);
        bad.faults.read_error_ppm.store(20_000, Ordering::Relaxed);
        bad.faults.corrupt_read_ppm.store(50_000, Ordering::Relaxed);
        workload(&engine, &mut model, &mut rng, 600, seed);
        full_read_matches(&engine, &model, "with faults");
        let status = engine.status();
        let repairs: u64 = status.legs.iter().map(|l| l.repairs).sum();
        let errors: u64 = status.legs.iter().map(|l| l.read_errors).sum();
        assert!(
            errors > 0,
            "seed {seed}: no fault was ever hit: the test proved nothing"
        );
        assert!(
            repairs > 0,
            "seed {seed}: {errors} read errors but no repair"
        );
        assert_eq!(
            status.mode, "mirrored",
            "read errors alone do not fail a leg"
        );
        // The repaired leg now holds good copies: with the other leg dead, everything still reads.
        bad.faults.read_error_ppm.store(0, Ordering::Relaxed);
        bad.faults.corrupt_read_ppm.store(0, Ordering::Relaxed);
        engine.drain(Duration::from_millis(5), |_| {}).unwrap();
        engine.shutdown().unwrap();
        drop(engine);
        assert!(
            rig.backing.snapshot() == model.data,
            "seed {seed}: backing after drain"
        );
    }
}

#[test]
fn a_dead_leg_degrades_then_passthrough_then_replace_restores_the_mirror() {
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(100 + seed);
        let rig = Rig::new(2, 16, BACKING_BYTES, LBS as u32);
        let mut model = Model::from_image(rig.backing.snapshot());
        let engine = rig.open_with(options_writing_back_always(&rig));
        workload(&engine, &mut model, &mut rng, 150, seed);
        let dead = (seed % 2) as usize;
        rig.legs[dead].faults.dead.store(true, Ordering::Relaxed);
        // Keep going: the first write or flush that reaches the dead leg fails it.
        workload(&engine, &mut model, &mut rng, 300, seed);
        full_read_matches(&engine, &model, "degraded");
        let status = engine.status();
        assert!(
            !status.legs[dead].healthy,
            "seed {seed}: the dead leg is still marked healthy"
        );
        wait_for_mode(&engine, "passthrough");
        let before = engine.status().passthrough_writes;
        workload(&engine, &mut model, &mut rng, 150, seed);
        assert!(
            engine.status().passthrough_writes > before,
            "writes went around the cache"
        );
        full_read_matches(&engine, &model, "passthrough");
        // A new device takes the dead leg's place.
        let fresh = SimDisk::new("sim:replacement", rig.legs[dead].size_bytes());
        fresh.fill_garbage(99);
        engine
            .replace_leg(
                dead,
                fresh.clone() as Arc<dyn Device>,
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(engine.status().mode, "mirrored");
        workload(&engine, &mut model, &mut rng, 300, seed);
        full_read_matches(&engine, &model, "after replace");
        engine.shutdown().unwrap();
        drop(engine);
        // The set reopens from the survivor and the replacement, which agree on everything.
        let mut legs: Vec<Arc<dyn Device>> = rig.leg_devices();
        legs[dead] = fresh.clone();
        let engine = wb_target::open(
            legs,
            rig.backing.clone(),
            wb_tests::BACKING_IDENTITY,
            rig.options(),
        )
        .expect("reopen with the replacement leg");
        assert_eq!(engine.status().mode, "mirrored");
        full_read_matches(&engine, &model, "reopened");
    }
}

#[test]
fn write_errors_fail_the_leg_and_lose_nothing_flushed() {
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(200 + seed);
        let rig = Rig::new(2, 16, BACKING_BYTES, LBS as u32);
        let mut model = Model::from_image(rig.backing.snapshot());
        let engine = rig.open();
        let bad = &rig.legs[(seed % 2) as usize];
        bad.faults.seed.store(seed + 7, Ordering::Relaxed);
        bad.faults.write_error_ppm.store(150_000, Ordering::Relaxed);
        workload(&engine, &mut model, &mut rng, 500, seed);
        engine.flush().unwrap();
        model.flush();
        let status = engine.status();
        assert!(
            status.legs.iter().any(|l| !l.healthy && l.write_errors > 0),
            "seed {seed}: no write error failed a leg"
        );
        full_read_matches(&engine, &model, "after write errors");
        // A power cut now: the survivor alone holds every flushed write.
        engine.abandon();
        drop(engine);
        rig.power_cut(&mut rng);
        rig.power_on();
        bad.faults.write_error_ppm.store(0, Ordering::Relaxed);
        bad.faults.dead.store(true, Ordering::Relaxed);
        let engine = rig.open();
        let mut image = vec![0u8; BACKING_BYTES as usize];
        engine.read(0, &mut image).unwrap();
        model
            .check_after_power_cut(&image)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn both_legs_lost_means_passthrough_and_a_consistent_backing_device() {
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(300 + seed);
        let rig = Rig::new(2, 16, BACKING_BYTES, LBS as u32);
        let mut model = Model::from_image(rig.backing.snapshot());
        let engine = rig.open_with(options_writing_back_always(&rig));
        let ops = rng.gen_range(50..600);
        workload(&engine, &mut model, &mut rng, ops, seed);
        for leg in &rig.legs {
            leg.faults.dead.store(true, Ordering::Relaxed);
        }
        // The next write and FLUSH reach the legs and find them gone; the FLUSH may fail (what it
        // covered is lost) — it must not hang, and the engine must carry on in passthrough.
        // It rewrites the last block (which the workload never touches) with the content it
        // already has, so wherever the write lands — the log, or the backing device in
        // passthrough after the loss — the oracle's view of the backing device is unchanged.
        let last = (BACKING_BYTES - LBS) as usize;
        let data = model.data[last..].to_vec();
        engine.write(last as u64, &data, false).unwrap();
        let _ = engine.flush();
        wait_for_mode(&engine, "passthrough");
        let status = engine.status();
        let lost_at = status
            .cache_lost_at
            .expect("status names what the backing device holds");
        // Read through the engine first: a writeback write issued just before the loss may still
        // be on its way to the backing device, and a read in passthrough returns only once it
        // has landed. After that read the backing device holds still, so the snapshot (taken
        // behind the engine's back) is what the engine serves.
        let mut image = vec![0u8; BACKING_BYTES as usize];
        engine.read(0, &mut image).unwrap();
        let backing = rig.backing.snapshot();
        model
            .check_cache_loss(&backing)
            .unwrap_or_else(|e| panic!("seed {seed} (backing holds up to segment {lost_at}): {e}"));
        assert!(
            image == backing,
            "seed {seed}: right after the loss, a full read differs from the backing device"
        );
        // From here the backing device is the disk: writes and reads go straight to it.
        let mut model = Model::from_image(backing);
        workload(&engine, &mut model, &mut rng, 200, seed);
        full_read_matches(&engine, &model, "passthrough after the loss");
        assert!(rig.backing.snapshot() == model.data);
    }
}
