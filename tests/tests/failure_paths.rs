//! The failure paths keep the contract (docs/CONTRACT.md "Failures"), one deterministic test per
//! rule, in process over simulated devices:
//! - a FLUSH waiting when every leg is lost fails, and so does a FUA write logged before the
//!   loss, and the first FLUSH after it when it covers acknowledged writes; later ones succeed;
//! - leaving passthrough flushes the backing device;
//! - a cache loss is recorded and its log never replayed, after a daemon crash or a power cut;
//!   with nowhere to record it, passthrough writes are refused rather than risked;
//! - a failed leg stays out of use after a restart;
//! - a checkpoint ring unreadable or invalid on every leg is refused;
//! - a late error of a replaced leg's old device does not fail the new one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wb_target::{Device, Engine, OpenOptions};
use wb_tests::{
    block_of, finishes_within, read_block, wait_for_mode, Gate, Hooked, IoOp, Model, Rig, SimDisk,
    BACKING_IDENTITY,
};

const BACKING_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

/// Both legs behind a gate that holds their writes while armed.
fn engine_with_gated_legs(rig: &Rig, gate: &Arc<Gate>, options: OpenOptions) -> Arc<Engine> {
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .map(|leg| {
            let g = gate.clone();
            Hooked::new(leg.clone(), move |_dev, op| {
                if matches!(op, IoOp::Write { .. }) {
                    g.hold_if_armed();
                }
                None
            }) as Arc<dyn Device>
        })
        .collect();
    Arc::new(wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options).unwrap())
}

/// Runs `request` with the legs' writes held, kills both legs, lets the writes fail, and returns
/// what the request returned.
fn request_across_a_loss(
    request: impl FnOnce(&Engine) -> wb_target::Result<()> + Send + 'static,
) -> (Rig, Arc<Engine>, wb_target::Result<()>) {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let engine = engine_with_gated_legs(&rig, &gate, rig.no_writeback());
    engine.write(0, &block_of(0xaa), false).unwrap();
    gate.hold_all.store(true, Ordering::Release);
    gate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let pending = std::thread::spawn(move || request(&e));
    assert!(
        gate.wait_held(Duration::from_secs(20)),
        "the request never wrote to a leg"
    );
    rig.kill_legs(true);
    gate.release();
    let result = finishes_within(30, "the request", move || pending.join().unwrap());
    wait_for_mode(&engine, "passthrough");
    (rig, engine, result)
}

#[test]
fn a_flush_waiting_when_every_leg_is_lost_fails() {
    let (_rig, _engine, result) = request_across_a_loss(|e| e.flush());
    assert!(
        result.is_err(),
        "a FLUSH waiting when every leg was lost returned success: the write it covers is gone"
    );
}

#[test]
fn a_fua_write_logged_before_a_loss_fails() {
    let (_rig, engine, result) =
        request_across_a_loss(|e| e.write(BLOCK as u64, &block_of(0xbb), true));
    assert!(
        result.is_err(),
        "a FUA write whose log write the loss dropped was acknowledged as durable"
    );
    // The first FLUSH after the loss covers the first write (acknowledged, never flushed).
    assert!(engine.flush().is_err());
}

#[test]
fn the_first_flush_after_a_loss_fails_if_it_covers_lost_writes_and_later_ones_succeed() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    engine.write(0, &block_of(0x11), false).unwrap();
    rig.kill_legs(true);
    // No FLUSH in flight: the sync timer seals the segment and its write finds the legs dead.
    wait_for_mode(&engine, "passthrough");
    assert!(
        engine.flush().is_err(),
        "the first FLUSH after the loss covers an acknowledged write that is gone"
    );
    // From here every FLUSH covers only passthrough writes.
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    engine
        .flush()
        .expect("a FLUSH covering only passthrough writes");
    let durable = rig.backing.durable_snapshot();
    assert_eq!(&durable[BLOCK..2 * BLOCK], &block_of(0x22)[..]);
    // A FUA write in passthrough is durable once acknowledged.
    engine
        .write(2 * BLOCK as u64, &block_of(0x33), true)
        .unwrap();
    let durable = rig.backing.durable_snapshot();
    assert_eq!(&durable[2 * BLOCK..3 * BLOCK], &block_of(0x33)[..]);
}

#[test]
fn leaving_passthrough_flushes_the_backing_device() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.writing_back_always());
    rig.fail_leg_until_passthrough(&engine, 0);
    // A plain passthrough write: in the backing device's volatile cache only.
    engine
        .write(5 * BLOCK as u64, &block_of(0x55), false)
        .unwrap();
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    engine
        .replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(30))
        .unwrap();
    assert_eq!(engine.status().mode, "mirrored");
    engine.flush().unwrap();
    // The FLUSH succeeded: a power cut now must not take the passthrough write.
    let durable = rig.backing.durable_snapshot();
    assert_eq!(
        &durable[5 * BLOCK..6 * BLOCK],
        &block_of(0x55)[..],
        "a FLUSH after leaving passthrough did not cover the passthrough write"
    );
}

/// How the engine that saw the loss goes away before the legs come back.
#[derive(Debug, Clone, Copy)]
enum Restart {
    DaemonKilled,
    PowerCut,
}

#[test]
fn a_transient_cache_loss_is_never_replayed() {
    for restart in [Restart::DaemonKilled, Restart::PowerCut] {
        let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
        let engine = rig.open_with(rig.no_writeback());
        // A written and flushed, in the cache only.
        for b in 0..4u64 {
            engine
                .write(b * BLOCK as u64, &block_of(0xa0), false)
                .unwrap();
        }
        engine.flush().unwrap();
        rig.kill_legs(true);
        engine
            .write(100 * BLOCK as u64, &block_of(0xf0), false)
            .unwrap();
        let _ = engine.flush(); // the loss: it fails (the write above is gone)
        wait_for_mode(&engine, "passthrough");
        // B over A, in passthrough, acknowledged and flushed.
        for b in 0..4u64 {
            engine
                .write(b * BLOCK as u64, &block_of(0xb0), false)
                .unwrap();
        }
        engine.flush().unwrap();
        engine.abandon();
        drop(engine);
        if let Restart::PowerCut = restart {
            rig.backing.lose_unflushed();
            rig.power_on();
        }
        // The legs read fine again (an HBA reset, a loose cable).
        rig.kill_legs(false);
        let engine = rig.open_with(rig.no_writeback());
        for b in 0..4u64 {
            assert_eq!(
                read_block(&engine, b),
                block_of(0xb0),
                "{restart:?}: block {b} reads what the lost log held, not the flushed B"
            );
        }
        let status = engine.status();
        assert_eq!(status.mode, "passthrough", "{restart:?}");
        let lost = status.cache_lost.expect("status says the cache was lost");
        assert!(lost.lost_through_id >= lost.lost_from_id);
        // And the backing device holds B: nothing writes the lost log back over it.
        engine.drain(Duration::from_millis(5), |_| {}).unwrap();
        engine.shutdown().unwrap();
        drop(engine);
        assert_eq!(&rig.backing.snapshot()[..BLOCK], &block_of(0xb0)[..]);
        // A start that finds only the legs' copy of the record (written when they came back)
        // does not replay either.
        std::fs::remove_dir_all(rig.buffer_dir.path()).unwrap();
        std::fs::create_dir_all(rig.buffer_dir.path()).unwrap();
        let engine = rig.open_with(rig.no_writeback());
        assert_eq!(read_block(&engine, 0), block_of(0xb0), "{restart:?}");
        assert_eq!(engine.status().mode, "passthrough");
    }
}

#[test]
fn with_nowhere_to_record_a_loss_passthrough_writes_are_refused() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.no_writeback();
    options.fault_dir = None;
    let engine = rig.open_with(options);
    engine.write(0, &block_of(0xa0), false).unwrap();
    engine.flush().unwrap();
    rig.kill_legs(true);
    engine.write(BLOCK as u64, &block_of(0xa1), false).unwrap();
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    let before = rig.backing.snapshot();
    assert!(
        engine.write(0, &block_of(0xb0), false).is_err(),
        "a passthrough write was accepted although no later start could know the log is lost"
    );
    assert!(
        rig.backing.snapshot() == before,
        "the refused write reached the backing device"
    );
    let status = engine.status();
    let failure = status.failure.clone().unwrap_or_default();
    assert!(
        status.shown_mode() == "failed" && failure.contains("cache loss cannot be recorded"),
        "status does not say why writes are refused: mode {}, failure {failure:?}",
        status.shown_mode()
    );
}

/// While a leg failure can be recorded nowhere a restart would look, FLUSHes fail, and status
/// says so: mode "failed" with the reason in `failure` (what `status -x`, the `engine_failed`
/// metric and its alert read). Once the record succeeds (the sync thread retries it), the device
/// is degraded and FLUSHes succeed again.
#[test]
fn an_unrecordable_leg_failure_shows_as_failed_while_it_lasts() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    // Writeback on: once degraded, the log closes for passthrough as writeback catches up.
    let engine = rig.open_with(rig.writing_back_always());
    engine.write(0, &block_of(0xa0), false).unwrap();
    engine.flush().unwrap();
    assert_eq!(
        engine.status().failure,
        None,
        "a healthy engine reports a failure"
    );
    let blocked = rig.block_fault_file(&engine);
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    engine.write(0, &block_of(0xa1), false).unwrap();
    let flushed = engine.flush();
    assert!(
        flushed.is_err(),
        "a FLUSH succeeded with its leg's failure on record nowhere"
    );
    let status = engine.status();
    assert_eq!(status.shown_mode(), "failed", "{:?}", status.failure);
    let failure = status.failure.unwrap_or_default();
    assert!(
        failure.contains("cannot be recorded"),
        "status does not say why FLUSHes fail: {failure:?} (the FLUSH said {flushed:?})"
    );
    drop(blocked);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while engine.status().failure.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure was never recorded once the fault file could be written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = engine.status().shown_mode().to_string();
    assert!(mode == "degraded" || mode == "passthrough", "mode {mode}");
    engine.write(0, &block_of(0xa2), false).unwrap();
    engine
        .flush()
        .expect("a FLUSH once the failure is on record");
    assert_eq!(read_block(&engine, 0), block_of(0xa2));
}

#[test]
fn a_failed_leg_stays_out_of_use_after_a_restart() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut model = Model::from_image(rig.backing.snapshot());
    let engine = rig.open_with(rig.no_writeback());
    let mut write = |engine: &Engine, block: u64, byte: u8| {
        engine
            .write(block * BLOCK as u64, &block_of(byte), false)
            .unwrap();
        model.write(block as usize * BLOCK, &block_of(byte));
    };
    write(&engine, 0, 0x10);
    engine.flush().unwrap();
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    for b in 1..300 {
        write(&engine, b, b as u8);
    }
    engine.flush().unwrap();
    engine.abandon();
    drop(engine);
    // Leg 0 answers again, but it misses every segment written after it failed.
    rig.legs[0].faults.dead.store(false, Ordering::Relaxed);
    let engine = rig.open_with(rig.no_writeback());
    let status = engine.status();
    assert!(
        !status.legs[0].healthy,
        "a leg that failed rejoined as healthy after a restart"
    );
    assert_eq!(status.mode, "degraded");
    let mut image = vec![0u8; BACKING_BYTES as usize];
    engine.read(0, &mut image).unwrap();
    assert!(image == model.data, "data differs after the restart");
    // The surviving leg is the only one that holds the log: losing it now is a cache loss,
    // not a silent fallback to the stale leg.
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    engine.write(0, &block_of(0x99), false).unwrap();
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    assert!(engine.status().cache_lost.is_some());
}

/// A single-leg cache whose ring wrapped (slots reused) and which holds dirty data.
fn wrapped_single_leg_cache() -> (Rig, Model) {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let mut model = Model::from_image(rig.backing.snapshot());
    {
        let engine = rig.open_with(rig.writing_back_always());
        for b in 0..(40 * 127) as u64 {
            let block = b % (BACKING_BYTES / BLOCK as u64);
            let data = block_of(b as u8 | 1);
            engine.write(block * BLOCK as u64, &data, false).unwrap();
            model.write(block as usize * BLOCK, &data);
        }
        engine.drain(Duration::from_millis(5), |_| {}).unwrap();
        assert!(engine.status().segments.last_written_back_id > 16);
    }
    let engine = rig.open_with(rig.no_writeback());
    for b in 0..300u64 {
        engine
            .write(b * BLOCK as u64, &block_of(0xd1), false)
            .unwrap();
        model.write(b as usize * BLOCK, &block_of(0xd1));
    }
    engine.shutdown().unwrap();
    (rig, model)
}

#[test]
fn a_checkpoint_ring_unreadable_or_invalid_on_every_leg_is_refused() {
    let ring = logfmt::CHECKPOINT_RING_OFFSET;
    let ring_end = ring + (logfmt::CHECKPOINT_SLOTS * logfmt::CHECKPOINT_SLOT_SIZE_BYTES) as u64;
    for damage in ["unreadable", "garbage"] {
        let (rig, model) = wrapped_single_leg_cache();
        let leg = &rig.legs[0];
        let before = leg.snapshot();
        match damage {
            "unreadable" => *leg.faults.bad_read_range.lock() = Some((ring + 4096, ring + 8192)),
            _ => leg.poke(ring, &vec![0x5a; (ring_end - ring) as usize]),
        }
        let damaged = leg.snapshot();
        let opened = wb_target::open(
            rig.leg_devices(),
            rig.backing.clone(),
            BACKING_IDENTITY,
            rig.no_writeback(),
        );
        let Err(e) = opened else {
            panic!("{damage} checkpoint ring: the cache opened (and discarded its dirty data)");
        };
        assert!(e.to_string().contains("checkpoint"), "{damage}: {e}");
        assert!(
            leg.snapshot() == damaged,
            "{damage}: refusing changed the leg"
        );
        // Repaired, it opens with every dirty block.
        *leg.faults.bad_read_range.lock() = None;
        leg.poke(0, &before);
        let engine = rig.open_with(rig.no_writeback());
        let mut image = vec![0u8; BACKING_BYTES as usize];
        engine.read(0, &mut image).unwrap();
        assert!(image == model.data, "{damage}: data after repair");
    }
}

#[test]
fn a_late_error_of_a_replaced_device_does_not_fail_the_new_one() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let fail_late = Arc::new(AtomicBool::new(false));
    let (g, f) = (gate.clone(), fail_late.clone());
    let leg0 = Hooked::new(rig.legs[0].clone(), move |_dev, op| {
        // Segment writes only: a held checkpoint write would stall writeback's commit.
        if matches!(op, IoOp::Write { offset, .. } if *offset >= logfmt::SEGMENT_AREA_OFFSET) {
            g.hold_if_armed();
            if f.load(Ordering::Acquire) {
                return Some(Err(std::io::Error::other("the old device fails late")));
            }
        }
        None
    });
    let legs: Vec<Arc<dyn Device>> = vec![leg0, rig.legs[1].clone()];
    let engine = Arc::new(
        wb_target::open(
            legs,
            rig.backing.clone(),
            BACKING_IDENTITY,
            rig.writing_back_always(),
        )
        .unwrap(),
    );
    engine.write(0, &block_of(1), false).unwrap();
    engine.flush().unwrap();
    gate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let flusher = std::thread::spawn(move || {
        e.write(3 * BLOCK as u64, &block_of(3), false)?;
        e.flush()
    });
    assert!(gate.wait_held(Duration::from_secs(20)));
    fail_late.store(true, Ordering::Release);
    let e = engine.clone();
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    let replacer = std::thread::spawn(move || {
        e.replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(60))
    });
    // The replace waits: the old device still holds a write (a healthy leg stays in use until
    // the cache is clean). Time for a replace that did not wait for it to swap the device.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        engine.status().legs[0].path,
        "sim:leg0",
        "swapped under a write in flight"
    );
    gate.release();
    finishes_within(60, "replace", move || replacer.join().unwrap()).unwrap();
    finishes_within(60, "the FLUSH", move || flusher.join().unwrap()).unwrap();
    engine.write(4 * BLOCK as u64, &block_of(4), false).unwrap();
    engine.flush().unwrap();
    let status = engine.status();
    assert!(
        status.legs[0].healthy,
        "the old device's late error failed the new leg"
    );
    assert_eq!(status.mode, "mirrored");
    assert_eq!(read_block(&engine, 3), block_of(3));
}
