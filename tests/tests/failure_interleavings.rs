//! Interleavings an independent review of the failure paths found (docs/CONTRACT.md §5), one
//! deterministic test each (R1-R11); every one failed before its fix. In process, over simulated
//! devices, with gates (`Hooked`) holding a device operation where the interleaving needs it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use wb_target::{Device, Engine};
use wb_tests::{
    block_of, finishes_within, read_block, wait_for_mode, Gate, Hooked, IoOp, Rig, SimDisk,
    BACKING_IDENTITY,
};

const BACKING_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

/// Acknowledged write, then every leg lost (noticed by the sync timer), no FLUSH yet.
fn lose_cache_with_unflushed_write(rig: &Rig, engine: &Engine) {
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    rig.kill_legs(true);
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    wait_for_mode(engine, "passthrough");
    assert!(engine.status().cache_lost.is_some());
}

fn fresh(rig: &Rig, name: &str) -> Arc<SimDisk> {
    SimDisk::new(name, rig.legs[0].size_bytes())
}

/// R1: the owed FLUSH error is dropped by a restart after both legs were replaced.
#[test]
fn r1_owed_flush_error_survives_replace_and_daemon_crash() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    lose_cache_with_unflushed_write(&rig, &engine);
    let new0 = fresh(&rig, "sim:new0");
    let new1 = fresh(&rig, "sim:new1");
    engine
        .replace_leg(0, new0.clone() as Arc<dyn Device>, Duration::from_secs(20))
        .unwrap();
    engine
        .replace_leg(1, new1.clone() as Arc<dyn Device>, Duration::from_secs(20))
        .unwrap();
    assert_eq!(engine.status().mode, "mirrored");
    assert!(
        rig.buffer_path().with_extension("flush-error").exists(),
        "marker present before the crash"
    );
    // kill -9
    engine.abandon();
    drop(engine);
    let engine = wb_target::open(
        vec![new0 as Arc<dyn Device>, new1 as Arc<dyn Device>],
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    )
    .unwrap();
    assert!(
        engine.flush().is_err(),
        "R1: the first FLUSH after the loss succeeded after a daemon restart (owed error dropped)"
    );
}

/// R2: `wbctl drain` (Engine::drain) consumes the FLUSH error owed to the client.
#[test]
fn r2_drain_swallows_the_owed_flush_error() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    lose_cache_with_unflushed_write(&rig, &engine);
    let drained = engine.drain(Duration::from_millis(5), |_| {});
    eprintln!("drain returned {drained:?}");
    assert!(
        engine.flush().is_err(),
        "R2: the client's first FLUSH after the loss succeeded (drain consumed its error)"
    );
}

/// R3: a FUA write after the legs were replaced consumes the owed FLUSH error.
#[test]
fn r3_fua_write_swallows_the_owed_flush_error() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    lose_cache_with_unflushed_write(&rig, &engine);
    for i in 0..2 {
        engine
            .replace_leg(
                i,
                fresh(&rig, &format!("sim:new{i}")) as Arc<dyn Device>,
                Duration::from_secs(20),
            )
            .unwrap();
    }
    let fua = engine.write(9 * BLOCK as u64, &block_of(0x99), true);
    eprintln!("FUA write returned {fua:?}");
    assert!(
        engine.flush().is_err(),
        "R3: the first FLUSH after the loss succeeded (a FUA write consumed its error)"
    );
}

/// R4: a loss that could not be recorded yet, then kill -9: the RAM buffers were released, the
/// successor opens normally and removes the marker.
#[test]
fn r4_unrecorded_loss_then_daemon_crash() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    let fault_file = std::path::PathBuf::from(engine.status().fault_file.unwrap());
    // Models the daemon being killed before the fault file's fsync completed.
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    rig.kill_legs(true);
    // acknowledged, never flushed
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    wait_for_mode(&engine, "passthrough");
    assert!(!fault_file.exists());
    engine.abandon();
    drop(engine);
    rig.kill_legs(false);
    blocked.unblock();
    let engine = rig.open_with(rig.no_writeback());
    let got = read_block(&engine, 1);
    let flush = engine.flush();
    eprintln!(
        "mode {}, block 1 = {:#x}, flush {flush:?}",
        engine.status().mode,
        got[0]
    );
    assert!(
        got == block_of(0x22) || flush.is_err(),
        "R4: the acknowledged write is gone and the first FLUSH after the restart succeeded"
    );
}

/// R5: ring invalid on the only readable leg: refused? apply_fault_record writes a checkpoint
/// (sequence 1, written back 0) first.
#[test]
fn r5_invalid_ring_on_the_readable_leg_with_the_other_leg_dead() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.writing_back_always());
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    engine.drain(Duration::from_millis(5), |_| {}).unwrap();
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    engine
        .write(5 * BLOCK as u64, &block_of(0x55), false)
        .unwrap();
    engine.flush().unwrap();
    wait_for_mode(&engine, "passthrough");
    // B over A, straight to the backing device, flushed.
    engine.write(0, &block_of(0xbb), false).unwrap();
    engine.flush().unwrap();
    let new1 = fresh(&rig, "sim:new1");
    engine
        .replace_leg(1, new1.clone() as Arc<dyn Device>, Duration::from_secs(20))
        .unwrap();
    engine.shutdown().unwrap();
    drop(engine);
    assert_eq!(&rig.backing.snapshot()[..BLOCK], &block_of(0xbb)[..]);
    // Leg 0's ring is garbage, the new leg 1 is dead.
    let ring = logfmt::CHECKPOINT_RING_OFFSET;
    let len = logfmt::CHECKPOINT_SLOTS * logfmt::CHECKPOINT_SLOT_SIZE_BYTES;
    rig.legs[0].poke(ring, &vec![0x5a; len]);
    new1.faults.dead.store(true, Ordering::Relaxed);
    let opened = wb_target::open(
        vec![
            rig.legs[0].clone() as Arc<dyn Device>,
            new1 as Arc<dyn Device>,
        ],
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    );
    match opened {
        Err(e) => eprintln!("refused: {e}"),
        Ok(engine) => {
            let got = read_block(&engine, 0);
            panic!(
                "R5: opened although the only readable ring was invalid; block 0 reads {:#x} \
                 (flushed passthrough write was 0xbb)",
                got[0]
            );
        }
    }
}

/// R6: the failed leg's old device given back as the leg after a replace (daemon state file not
/// updated: crash between `replace_leg` and `store_state`) rejoins as healthy.
#[test]
fn r6_old_device_rejoins_after_replace() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.writing_back_always());
    rig.fail_leg_until_passthrough(&engine, 0);
    let new0 = fresh(&rig, "sim:new0");
    engine
        .replace_leg(0, new0 as Arc<dyn Device>, Duration::from_secs(20))
        .unwrap();
    // Writeback off from here (the policy knob), so new writes stay in the cache.
    engine.set_policy(writeback::Policy {
        idle_aware: false,
        low_watermark: 1.0,
        age_threshold: Duration::from_secs(3600),
        ..Default::default()
    });
    engine
        .write(7 * BLOCK as u64, &block_of(0x77), false)
        .unwrap();
    engine.flush().unwrap();
    // Later segments whose headers vouch for the one holding block 7.
    for b in 8..12u64 {
        engine
            .write(b * BLOCK as u64, &block_of(b as u8), false)
            .unwrap();
        engine.flush().unwrap();
    }
    engine.abandon();
    drop(engine);
    rig.legs[0].faults.dead.store(false, Ordering::Relaxed);
    // `wbctl recover` with the stale state file: the old leg 0 path.
    let engine = rig.open_with(rig.no_writeback());
    let status = engine.status();
    eprintln!("mode {} legs {:?}", status.mode, status.legs);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    let mut buf = vec![0u8; BLOCK];
    let r = engine.read(7 * BLOCK as u64, &mut buf);
    eprintln!(
        "read of the flushed block 7 after losing leg 1: {r:?} {:#x}",
        buf[0]
    );
    assert!(
        !status.legs[0].healthy,
        "R6: the failed leg's old device rejoined as a healthy leg ({})",
        status.mode
    );
}

/// R7: two replaces of one leg at once after a cache loss.
#[test]
fn r7_concurrent_replace_of_one_leg_after_a_loss() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = Arc::new(rig.open_with(rig.no_writeback()));
    lose_cache_with_unflushed_write(&rig, &engine);
    let gate = Arc::new(Gate::default());
    gate.armed.store(true, Ordering::Release);
    let g = gate.clone();
    let first = Hooked::new(fresh(&rig, "sim:a"), move |_d, op| {
        if matches!(op, IoOp::Write { .. }) {
            g.hold_if_armed();
        }
        None
    });
    let e = engine.clone();
    let t1 = std::thread::spawn(move || {
        e.replace_leg(0, first as Arc<dyn Device>, Duration::from_secs(20))
    });
    assert!(gate.wait_held(Duration::from_secs(10)));
    let e = engine.clone();
    let second = fresh(&rig, "sim:b");
    let t2 = std::thread::spawn(move || {
        e.replace_leg(0, second as Arc<dyn Device>, Duration::from_secs(20))
    });
    std::thread::sleep(Duration::from_millis(300));
    gate.release();
    let r1 = t1.join();
    let r2 = t2.join();
    eprintln!("first {r1:?}");
    eprintln!(
        "second {:?}",
        r2.as_ref().map(|r| r.as_ref().map_err(|e| e.to_string()))
    );
    assert!(r2.is_ok(), "R7: the second replace_leg panicked");
}

/// R8: after a loss, the second replace leaves passthrough before the new fault record (no loss)
/// is durable anywhere; a FLUSH completes meanwhile; kill -9 then: the restart finds the loss on
/// record and drops the FLUSHed write.
#[test]
fn r8_flushed_write_after_replace_lost_if_killed_before_record() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = Arc::new(rig.open_with(rig.no_writeback()));
    let fault_file = std::path::PathBuf::from(engine.status().fault_file.unwrap());
    lose_cache_with_unflushed_write(&rig, &engine);
    let _ = engine.flush(); // the owed error
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fault_file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "loss never recorded in the file"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let new0 = fresh(&rig, "sim:new0");
    let new1 = fresh(&rig, "sim:new1");
    let gate = Arc::new(Gate::default());
    gate.hold_all.store(true, Ordering::Release);
    let hook = |g: Arc<Gate>| {
        move |_d: &dyn Device, op: &IoOp<'_>| {
            // One checkpoint slot (the fault record's), not replace's whole ring.
            if matches!(op, IoOp::Write { offset, data } if *offset < logfmt::SEGMENT_AREA_OFFSET && *offset > 0 && data.len() == 4096)
            {
                g.hold_if_armed();
            }
            None
        }
    };
    let leg0 = Hooked::new(new0.clone(), hook(gate.clone()));
    let leg1 = Hooked::new(new1.clone(), hook(gate.clone()));
    engine
        .replace_leg(0, leg0 as Arc<dyn Device>, Duration::from_secs(20))
        .unwrap();
    // The file copy cannot be written from here on (models: killed during its fsync).
    let blocked = rig.block_fault_file(&engine);
    gate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let replacer = std::thread::spawn(move || {
        e.replace_leg(1, leg1 as Arc<dyn Device>, Duration::from_secs(20))
    });
    assert!(
        gate.wait_held(Duration::from_secs(20)),
        "record write never reached the legs"
    );
    // Not mirrored before the record says the cache is no longer lost.
    assert_eq!(engine.status().mode, "passthrough");
    let e = engine.clone();
    finishes_within(20, "write + FLUSH", move || {
        e.write(7 * BLOCK as u64, &block_of(0x77), false).unwrap();
        e.flush()
    })
    .expect("FLUSH after leaving passthrough");
    // kill -9 now: copy what the devices hold.
    let copy = |d: &SimDisk, name: &str| {
        let c = SimDisk::new(name, d.size_bytes());
        c.poke(0, &d.snapshot());
        c
    };
    let c0 = copy(&new0, "sim:c0");
    let c1 = copy(&new1, "sim:c1");
    let cb = copy(&rig.backing, "sim:backing");
    blocked.unblock();
    let restarted = wb_target::open(
        vec![c0 as Arc<dyn Device>, c1 as Arc<dyn Device>],
        cb as Arc<dyn Device>,
        BACKING_IDENTITY,
        {
            let mut o = rig.no_writeback();
            o.buffer_path = rig.buffer_dir.path().join("other.buf");
            o
        },
    )
    .unwrap();
    let got = read_block(&restarted, 7);
    eprintln!("restarted mode {}", restarted.status().mode);
    gate.release();
    let _ = replacer.join();
    assert_eq!(
        got,
        block_of(0x77),
        "R8: a FLUSHed write was dropped at the restart"
    );
}

/// R9: a write that waits for a RAM buffer is counted by a FLUSH issued meanwhile; when that FLUSH
/// fails on a loss it clears the owed error, although the write was acknowledged after the FLUSH
/// was issued; the next FLUSH covers it, and succeeds.
#[test]
fn r9_flush_counting_a_write_in_flight_clears_the_owed_error() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let writes = Arc::new(Gate::default());
    writes.hold_all.store(true, Ordering::Release);
    let flushes = Arc::new(Gate::default());
    flushes.hold_all.store(true, Ordering::Release);
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .map(|leg| {
            let (w, f) = (writes.clone(), flushes.clone());
            Hooked::new(leg.clone(), move |_d, op| {
                match op {
                    IoOp::Write { offset, .. } if *offset >= logfmt::SEGMENT_AREA_OFFSET => {
                        w.hold_if_armed()
                    }
                    IoOp::Flush => f.hold_if_armed(),
                    _ => {}
                }
                None
            }) as Arc<dyn Device>
        })
        .collect();
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine =
        Arc::new(wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options).unwrap());
    writes.armed.store(true, Ordering::Release);
    // Fill every RAM buffer (4): 4 * 127 blocks.
    for b in 0..(4 * 127) as u64 {
        engine.write(b * BLOCK as u64, &block_of(1), false).unwrap();
    }
    let e = engine.clone();
    let w = std::thread::spawn(move || e.write(600 * BLOCK as u64, &block_of(0x66), false));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!w.is_finished(), "the write should wait for a RAM buffer");
    flushes.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let f1 = std::thread::spawn(move || e.flush());
    std::thread::sleep(Duration::from_millis(300));
    writes.release();
    w.join().unwrap().expect("W acknowledged");
    assert!(flushes.wait_held(Duration::from_secs(10)));
    // W is acknowledged. Now every leg dies, and the held flushes fail.
    rig.kill_legs(true);
    flushes.release();
    let r1 = f1.join().unwrap();
    wait_for_mode(&engine, "passthrough");
    eprintln!("F1 (issued while W was in flight) returned {r1:?}");
    let r2 = engine.flush();
    eprintln!("F2 (issued after W was acknowledged) returned {r2:?}");
    assert!(
        r2.is_err(),
        "R9: a FLUSH covering an acknowledged write that the loss took succeeded"
    );
}

/// R10: the fault file cannot be written: leg 0's failure is on record on leg 1 only, and a FLUSH
/// completes on leg 1 alone. Leg 1 dies, leg 0 comes back: the start uses leg 0's stale log.
#[test]
fn r10_failed_leg_recorded_only_on_the_survivor() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    engine.write(0, &block_of(0xbb), false).unwrap();
    // The failure cannot be recorded anywhere but on leg 1: the FLUSH must not succeed on leg 1
    // alone (or, if it does, no later start may take leg 0 for a good leg).
    let flushed = engine.flush();
    engine.abandon();
    drop(engine);
    rig.legs[0].faults.dead.store(false, Ordering::Relaxed);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    blocked.unblock();
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => eprintln!("refused: {e}"),
        Ok(_) if flushed.is_err() => {}
        Ok(engine) => {
            let got = read_block(&engine, 0);
            panic!(
                "R10: started on the stale leg ({}); block 0 reads {:#x}, the FLUSHed write was 0xbb",
                engine.status().mode,
                got[0]
            );
        }
    }
}

/// R11: one unreadable block on a single-leg cache: writeback's retries count as consecutive
/// read errors, the leg is declared dead and every dirty block (readable ones too) is dropped.
#[test]
fn r11_one_bad_block_escalates_to_a_cache_loss() {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let seg = logfmt::SEGMENT_AREA_OFFSET;
    *rig.legs[0].faults.bad_read_range.lock() = Some((seg + 4096, seg + 8192));
    let engine = rig.open_with(rig.writing_back_always());
    for b in 0..(3 * 127) as u64 {
        engine
            .write(b * BLOCK as u64, &block_of(0x42), false)
            .unwrap();
    }
    engine.flush().unwrap();
    // Long enough for writeback to retry the bad segment many times.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while engine.status().mode != "passthrough" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = engine.status();
    let got = read_block(&engine, 300);
    eprintln!(
        "mode {} lost {:?}; block 300 reads {:#x}",
        status.mode, status.cache_lost, got[0]
    );
    assert_eq!(
        got,
        block_of(0x42),
        "R11: a readable, FLUSHed block was dropped"
    );
}
