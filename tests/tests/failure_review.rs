//! Failure paths, third round: what a second independent review of the failure paths found
//! (R12–R18; each failed before its fix, see the commit that added this file). Like
//! failure_interleavings.rs, each test drives one engine over simulated devices through one
//! exact interleaving of writes, FLUSHes, faults and restarts, and checks what the contract
//! (docs/CONTRACT.md §2, §5) says a FLUSH may return and what a later start may read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wb_target::Device;
use wb_tests::{
    block_of, finishes_within, read_block, wait_for_mode, Gate, Hooked, IoOp, Rig, SimDisk,
    BACKING_IDENTITY,
};

const BACKING_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

fn is_checkpoint_slot(op: &IoOp<'_>) -> bool {
    matches!(op, IoOp::Write { offset, data } if *offset < logfmt::SEGMENT_AREA_OFFSET && *offset > 0 && data.len() == 4096)
}

/// Writes a slot's worth of blocks from `first`, the last one FUA if `fua`: the log moves on to
/// the next slot, so once they are on the legs the RAM buffer of the slot before is released and
/// reads of what it held go to the legs (format v2 keeps a slot's blocks in RAM until then).
fn fill_a_slot_from(engine: &wb_target::Engine, first: u64, fua: bool) {
    let n = logfmt::SLOT_BLOCKS as u64 + 8;
    for b in first..first + n {
        let last = b == first + n - 1;
        engine
            .write(b * BLOCK as u64, &block_of(0x5a), fua && last)
            .unwrap();
    }
}

/// R12: a FUA write advances `flushed_id`: an earlier plain write, never covered by a FLUSH, is
/// lost with the cache and the first FLUSH after the loss succeeds.
#[test]
fn r12_a_fua_write_does_not_count_as_a_flush_of_earlier_writes() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    engine.write(0, &block_of(0x11), false).unwrap(); // never FLUSHed
    engine.write(BLOCK as u64, &block_of(0x22), true).unwrap(); // FUA
    fill_a_slot_from(&engine, 2, true); // more FUA-covered writes; reads go to the legs
    rig.kill_legs(true);
    // Noticed by reads (nothing new is logged).
    for _ in 0..40 {
        let mut b = vec![0u8; BLOCK];
        let _ = engine.read(0, &mut b);
        if engine.status().cache_lost.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_mode(&engine, "passthrough");
    assert!(engine.status().cache_lost.is_some());
    assert_ne!(
        read_block(&engine, 0),
        block_of(0x11),
        "the plain write is gone"
    );
    assert!(
        engine.flush().is_err(),
        "R12: the first FLUSH after the loss succeeded although it covers a lost write"
    );
}

/// R13: two FLUSHes in log mode while a passthrough write that raced the switch is unflushed: the
/// second returns Ok while the first's backing flush is still in flight.
#[test]
fn r13_a_flush_waits_for_a_backing_flush_already_in_flight() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let wgate = Arc::new(Gate::default());
    let fgate = Arc::new(Gate::default());
    let p = 50 * BLOCK as u64;
    let (wg, fg) = (wgate.clone(), fgate.clone());
    let backing = Hooked::new(rig.backing.clone(), move |_d, op| {
        match op {
            IoOp::Write { offset, .. } if *offset == p => wg.hold_if_armed(),
            IoOp::Flush if std::thread::current().name() != Some("wb-writeback") => {
                fg.hold_if_armed()
            }
            _ => {}
        }
        None
    });
    let engine = Arc::new(
        wb_target::open(
            rig.leg_devices(),
            backing,
            BACKING_IDENTITY,
            rig.writing_back_always(),
        )
        .unwrap(),
    );
    rig.fail_leg_until_passthrough(&engine, 0);
    wgate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let t1 = std::thread::spawn(move || e.write(p, &block_of(0x55), false));
    assert!(wgate.wait_held(Duration::from_secs(20)));
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    engine
        .replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(30))
        .unwrap();
    assert_eq!(engine.status().mode, "mirrored");
    wgate.release();
    t1.join().unwrap().expect("P acknowledged");
    fgate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let t2 = std::thread::spawn(move || e.flush());
    assert!(fgate.wait_held(Duration::from_secs(20)));
    // The second FLUSH may return only once P is durable (it waits for the first one's backing
    // flush), or fail.
    let (e, backing) = (engine.clone(), rig.backing.clone());
    let f2 = std::thread::spawn(move || {
        let result = e.flush();
        let durable = backing.durable_snapshot();
        (
            result,
            durable[p as usize..p as usize + BLOCK] == block_of(0x55)[..],
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    fgate.release();
    let _ = t2.join();
    let (f2, p_durable) = f2.join().unwrap();
    assert!(
        f2.is_err() || p_durable,
        "R13: a FLUSH returned Ok while the passthrough write it covers is not durable"
    );
}

/// R14: a leg fails while recovery logs the adopted RAM buffers; the engine starts with every id
/// durable, so a FLUSH succeeds on the survivor before the failure is on record anywhere.
#[test]
fn r14_a_leg_failing_during_recovery_is_on_record_before_a_flush_succeeds() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine = rig.open_with(options.clone());
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0x11), false).unwrap(); // RAM buffer only
    engine.abandon(); // kill -9
    drop(engine);
    // Leg 0 fails every write now (a transient fault).
    let leg0 = Hooked::new(rig.legs[0].clone(), |_d, _op| {
        Some(Err(std::io::Error::other("leg 0 write error")))
    });
    let legs: Vec<Arc<dyn Device>> = vec![leg0, rig.legs[1].clone()];
    // The successor either refuses to start (the failure cannot be recorded) or records it
    // before a FLUSH may succeed.
    let flushed =
        match wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options.clone()) {
            Err(e) => {
                eprintln!("successor refused: {e}");
                false
            }
            Ok(engine) => {
                let flushed = engine.flush();
                eprintln!(
                    "successor FLUSH: {flushed:?}; status {:?}",
                    engine.status().legs
                );
                engine.abandon();
                flushed.is_ok()
            }
        };
    // Leg 1 dies; leg 0 is back; the fault file is writable again.
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    drop(blocked);
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        options,
    ) {
        Err(e) => assert!(
            !flushed,
            "R14: a FLUSH succeeded, then no start could serve it: {e}"
        ),
        Ok(engine) => assert_eq!(
            read_block(&engine, 0),
            block_of(0x11),
            "R14: started on leg 0 without the acknowledged write (successor FLUSH ok: \
             {flushed}; {})",
            engine.status().mode
        ),
    }
}

/// R15: `replace` of the only healthy leg (a single-leg set) takes it out of use at once: every
/// leg is gone, the cache is declared lost and FLUSHed dirty data is dropped, although the
/// device never failed.
#[test]
fn r15_replacing_the_last_healthy_leg_keeps_flushed_data() {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    let r = engine.replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(5));
    eprintln!(
        "replace: {r:?}; status: {} lost {:?}",
        engine.status().mode,
        engine.status().cache_lost
    );
    assert_eq!(
        read_block(&engine, 0),
        block_of(0x11),
        "R15: a FLUSHed write vanished because its healthy leg was replaced"
    );
}

/// R16: a leg fails and its failure cannot be recorded (fault file unwritable, the leg dead);
/// degraded and clean, the engine goes to passthrough anyway and acknowledges a FLUSH of a
/// passthrough write. The survivor dies, the failed leg comes back: the start trusts it and
/// replays its stale log over the FLUSHed write.
#[test]
fn r16_no_passthrough_while_a_leg_failure_is_unrecorded() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.options();
    options.writeback = Some(writeback::Policy {
        idle_aware: false,
        low_watermark: 0.99,
        age_threshold: Duration::from_secs(3600),
        ..Default::default()
    });
    let engine = rig.open_with(options);
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    let blocked = rig.block_fault_file(&engine);
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    engine.set_policy(writeback::Policy {
        idle_after: Duration::ZERO,
        ..Default::default()
    });
    // Degraded, and soon clean: but the failure is on record only on the survivor, so the
    // engine must not go to passthrough, where this write would reach the backing device alone.
    for _ in 0..40 {
        assert_ne!(
            engine.status().mode,
            "passthrough",
            "R16: passthrough while the leg failure is on record nowhere a restart would look"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let flushed = engine
        .write(0, &block_of(0xbb), false)
        .and_then(|()| engine.flush());
    eprintln!("write + FLUSH with the failure unrecorded: {flushed:?}");
    engine.abandon();
    drop(engine);
    rig.legs[0].faults.dead.store(false, Ordering::Relaxed);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    drop(blocked);
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => eprintln!("refused: {e}"),
        Ok(_) if flushed.is_err() => {}
        Ok(engine) => assert_eq!(
            read_block(&engine, 0),
            block_of(0xbb),
            "R16: a FLUSHed passthrough write reads back as the failed leg's stale log ({})",
            engine.status().mode
        ),
    }
}

/// R17: leg 0 is taken out of use by read errors (not by its writer, whose queued Flush job
/// would wake the FLUSH after the record attempt); the record attempt (sync thread) fails after
/// the FLUSH went to sleep: nothing wakes it.
#[test]
fn r17_a_flush_fails_when_a_leg_failure_found_by_reads_cannot_be_recorded() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let leg1 = Hooked::new(rig.legs[1].clone(), move |_d, op| {
        if is_checkpoint_slot(op) {
            g.hold_if_armed();
        }
        None
    });
    let legs: Vec<Arc<dyn Device>> = vec![rig.legs[0].clone(), leg1];
    let engine = Arc::new(
        wb_target::open(
            legs,
            rig.backing.clone(),
            BACKING_IDENTITY,
            rig.no_writeback(),
        )
        .unwrap(),
    );
    let _blocked = rig.block_fault_file(&engine);
    for b in 0..32u64 {
        engine
            .write(b * BLOCK as u64, &block_of(0xaa), false)
            .unwrap();
    }
    fill_a_slot_from(&engine, 32, false); // reads of blocks 0..32 go to the legs
    engine.flush().unwrap();
    gate.armed.store(true, Ordering::Release);
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    for b in 0..32u64 {
        assert_eq!(read_block(&engine, b), block_of(0xaa));
    }
    assert!(!engine.status().legs[0].healthy, "reads did not fail leg 0");
    assert!(
        gate.wait_held(Duration::from_secs(20)),
        "record never attempted"
    );
    engine.write(0, &block_of(0xbb), false).unwrap();
    let e = engine.clone();
    let f = std::thread::spawn(move || e.flush());
    std::thread::sleep(Duration::from_millis(500));
    assert!(!f.is_finished(), "the FLUSH should wait for the record");
    gate.release();
    let r = finishes_within(10, "R17: the FLUSH (record failed)", move || {
        f.join().unwrap()
    });
    eprintln!("P1b FLUSH returned {r:?}");
    assert!(r.is_err());
}

/// R18: a cache loss that is never recorded (fault file unwritable, legs dead), then both legs
/// replaced: the record that ends the loss says "not lost", so the lost log's buffers keep
/// their owner words. kill -9 after a new write: the successor refuses the buffer file.
#[test]
fn r18_no_leg_is_attached_while_a_cache_loss_is_unrecorded() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine = rig.open_with(options.clone());
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    rig.kill_legs(true);
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    let new0 = SimDisk::new("sim:new0", rig.legs[0].size_bytes());
    let new1 = SimDisk::new("sim:new1", rig.legs[0].size_bytes());
    let r0 = engine.replace_leg(0, new0.clone() as Arc<dyn Device>, Duration::from_secs(10));
    let r1 = engine.replace_leg(1, new1.clone() as Arc<dyn Device>, Duration::from_secs(10));
    eprintln!(
        "replace 0: {r0:?}\nreplace 1: {r1:?}\nmode {}",
        engine.status().mode
    );
    assert!(
        r0.is_err() && r1.is_err() && engine.status().mode == "passthrough",
        "R18: legs were attached while the loss was on record nowhere ({r0:?}, {r1:?}, {})",
        engine.status().mode
    );
    // Once the loss can be recorded, the same replaces bring the cache back, and a write
    // acknowledged then survives a kill -9.
    drop(blocked);
    for (i, new) in [(0, &new0), (1, &new1)] {
        engine
            .replace_leg(i, new.clone() as Arc<dyn Device>, Duration::from_secs(10))
            .unwrap();
    }
    assert_eq!(engine.status().mode, "mirrored");
    engine
        .write(7 * BLOCK as u64, &block_of(0x77), false)
        .unwrap(); // acknowledged
    engine.abandon(); // kill -9
    drop(engine);
    let reopened = wb_target::open(
        vec![new0 as Arc<dyn Device>, new1 as Arc<dyn Device>],
        rig.backing.clone(),
        BACKING_IDENTITY,
        options,
    );
    match reopened {
        Err(e) => panic!("R18: the successor refused to start: {e}"),
        Ok(engine) => assert_eq!(read_block(&engine, 7), block_of(0x77)),
    }
}

/// R19: every leg lost, the fault file unwritable; the loss is "on record" only on a failed leg
/// that happened to take the best-effort checkpoint write. Passthrough writes and FLUSHes go
/// on. That leg then dies for good, the other comes back: the start replays the lost log.
#[test]
fn r19_a_loss_is_on_record_only_where_every_later_start_looks() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let seg_writes_fail = Arc::new(AtomicBool::new(false));
    let f = seg_writes_fail.clone();
    let leg0 = Hooked::new(rig.legs[0].clone(), move |_d, op| {
        if f.load(Ordering::Acquire)
            && matches!(op, IoOp::Write { offset, .. } if *offset >= logfmt::SEGMENT_AREA_OFFSET)
        {
            return Some(Err(std::io::Error::other("leg 0 segment write error")));
        }
        None
    });
    let legs: Vec<Arc<dyn Device>> = vec![leg0, rig.legs[1].clone()];
    let engine = wb_target::open(
        legs,
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    )
    .unwrap();
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    seg_writes_fail.store(true, Ordering::Release);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    let _ = engine.flush(); // the loss
    wait_for_mode(&engine, "passthrough");
    let flushed = engine
        .write(0, &block_of(0xbb), false)
        .and_then(|()| engine.flush());
    eprintln!("passthrough write + FLUSH after the loss: {flushed:?}");
    engine.abandon();
    drop(engine);
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    rig.legs[1].faults.dead.store(false, Ordering::Relaxed);
    drop(blocked);
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => eprintln!("refused: {e}"),
        Ok(_) if flushed.is_err() => {}
        Ok(engine) => assert_eq!(
            read_block(&engine, 0),
            block_of(0xbb),
            "R19: the lost log was replayed over a FLUSHed passthrough write ({})",
            engine.status().mode
        ),
    }
}

// ---- A third review (of the fixes above) found these.

fn lazy_policy() -> writeback::Policy {
    writeback::Policy {
        idle_aware: false,
        low_watermark: 0.99,
        age_threshold: Duration::from_secs(3600),
        ..Default::default()
    }
}

/// R20: single-leg replace of the last healthy leg: writeback is not forced (Activity.degraded
/// ignores replacing_last_leg), so with a lazy policy the cache never empties.
#[test]
fn r20_a_single_leg_replace_drains_with_a_lazy_policy() {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.options();
    options.writeback = Some(lazy_policy());
    let engine = rig.open_with(options);
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    let t = Instant::now();
    let r = engine.replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(8));
    eprintln!(
        "R20: replace {r:?} after {:?}, mode {}",
        t.elapsed(),
        engine.status().mode
    );
    assert!(
        r.is_ok(),
        "R20: single-leg replace timed out: writeback never ran at full speed"
    );
}

/// R21: the R18 rule is checked once, before the wait: a loss during the wait (unrecordable)
/// lets the swap attach the leg with the loss on record nowhere; the lost buffers keep owners.
#[test]
fn r21_a_loss_while_a_replace_waits_is_on_record_before_a_leg_is_attached() {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    let engine = Arc::new(rig.open_with(options));
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap(); // open segment, RAM only
    rig.kill_legs(true);
    let fresh = SimDisk::new("sim:new-leg", rig.legs[0].size_bytes());
    let e = engine.clone();
    let f = fresh.clone();
    let replace =
        std::thread::spawn(move || e.replace_leg(0, f as Arc<dyn Device>, Duration::from_secs(20)));
    let r = replace.join().unwrap();
    eprintln!(
        "R21: replace {r:?}; mode {}; lost {:?}",
        engine.status().mode,
        engine.status().cache_lost
    );
    let e = engine.clone();
    let w = std::thread::spawn(move || e.write(2 * BLOCK as u64, &block_of(0x33), false)).join();
    eprintln!("R21: write after replace: {w:?}");
    drop(blocked);
    assert!(
        w.is_ok(),
        "R21: a write after the replace panicked (lost buffer still owned)"
    );
    assert!(
        r.is_err(),
        "R21: a leg was attached while the loss was on record nowhere"
    );
}

/// R22: R16 through a restart: the failed persist left the failure on the survivor's checkpoint;
/// a restart (fault file still blocked) takes it as on record and goes to passthrough.
#[test]
fn r22_an_unrecorded_leg_failure_stays_unrecorded_across_a_restart() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let mut options = rig.options();
    options.writeback = Some(lazy_policy());
    let engine = rig.open_with(options.clone());
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    let blocked = rig.block_fault_file(&engine);
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    let _ = engine.write(BLOCK as u64, &block_of(0x22), false);
    eprintln!(
        "R22: flush with the failure unrecordable: {:?}",
        engine.flush()
    );
    std::thread::sleep(Duration::from_millis(300));
    engine.abandon();
    drop(engine);
    // Restart, fault file still blocked, leg 0 still dead.
    let flushed = match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.writing_back_always(),
    ) {
        Err(e) => {
            eprintln!("R22: restart refused: {e}");
            false
        }
        Ok(engine) => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while engine.status().mode != "passthrough" && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("R22: restarted, mode {}", engine.status().mode);
            let r = engine
                .write(0, &block_of(0xbb), false)
                .and_then(|()| engine.flush());
            eprintln!("R22: passthrough write + FLUSH after restart: {r:?}");
            engine.abandon();
            r.is_ok()
        }
    };
    rig.legs[0].faults.dead.store(false, Ordering::Relaxed);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    drop(blocked);
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => eprintln!("R22: final start refused: {e}"),
        Ok(engine) => {
            let got = read_block(&engine, 0);
            eprintln!(
                "R22: final mode {}, block0 {:#x}",
                engine.status().mode,
                got[0]
            );
            if flushed {
                assert_eq!(
                    got,
                    block_of(0xbb),
                    "R22: stale log of the failed leg replayed over a FLUSHed passthrough write"
                );
            }
        }
    }
}

/// R23: R19 through a restart.
#[test]
fn r23_an_unrecorded_loss_stays_unrecorded_across_a_restart() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let seg_writes_fail = Arc::new(AtomicBool::new(false));
    let f = seg_writes_fail.clone();
    let leg0 = Hooked::new(rig.legs[0].clone(), move |_d, op| {
        if f.load(Ordering::Acquire)
            && matches!(op, IoOp::Write { offset, .. } if *offset >= logfmt::SEGMENT_AREA_OFFSET)
        {
            return Some(Err(std::io::Error::other("leg 0 segment write error")));
        }
        None
    });
    let legs: Vec<Arc<dyn Device>> = vec![leg0.clone(), rig.legs[1].clone()];
    let engine = wb_target::open(
        legs.clone(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    )
    .unwrap();
    let blocked = rig.block_fault_file(&engine);
    engine.write(0, &block_of(0xaa), false).unwrap();
    engine.flush().unwrap();
    seg_writes_fail.store(true, Ordering::Release);
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed);
    engine.write(BLOCK as u64, &block_of(0x22), false).unwrap();
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    eprintln!(
        "R23: passthrough write before restart: {:?}",
        engine.write(0, &block_of(0xcc), false)
    );
    engine.abandon();
    drop(engine);
    let flushed = match wb_target::open(
        legs,
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => {
            eprintln!("R23: restart refused: {e}");
            false
        }
        Ok(engine) => {
            eprintln!("R23: restarted, mode {}", engine.status().mode);
            let r = engine
                .write(0, &block_of(0xbb), false)
                .and_then(|()| engine.flush());
            eprintln!("R23: passthrough write + FLUSH after restart: {r:?}");
            engine.abandon();
            r.is_ok()
        }
    };
    rig.legs[0].faults.dead.store(true, Ordering::Relaxed);
    rig.legs[1].faults.dead.store(false, Ordering::Relaxed);
    drop(blocked);
    match wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.no_writeback(),
    ) {
        Err(e) => eprintln!("R23: final start refused: {e}"),
        Ok(engine) => {
            let got = read_block(&engine, 0);
            eprintln!(
                "R23: final mode {}, block0 {:#x}",
                engine.status().mode,
                got[0]
            );
            if flushed {
                assert_eq!(
                    got,
                    block_of(0xbb),
                    "R23: lost log replayed over a FLUSHed passthrough write"
                );
            }
        }
    }
}

struct Rendezvous {
    inner: Arc<SimDisk>,
    barrier: Arc<std::sync::Barrier>,
    armed: AtomicBool,
}
impl Device for Rendezvous {
    fn name(&self) -> &str {
        if self.armed.swap(false, Ordering::AcqRel) {
            self.barrier.wait();
        }
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// R24: two concurrent replaces of the two healthy legs of a mirrored pair: each sees the other
/// leg healthy, both mark their leg failed, the cache is lost with FLUSHed dirty data.
#[test]
fn r24_concurrent_replaces_of_a_healthy_pair_keep_flushed_data() {
    let mut lost = 0;
    for i in 0..3 {
        let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
        let engine = Arc::new(rig.open_with(rig.no_writeback()));
        engine.write(0, &block_of(0x11), false).unwrap();
        engine.flush().unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let mut threads = Vec::new();
        for leg in 0..2 {
            let dev = Arc::new(Rendezvous {
                inner: SimDisk::new(&format!("sim:new{leg}"), rig.legs[0].size_bytes()),
                barrier: barrier.clone(),
                armed: AtomicBool::new(true),
            });
            let e = engine.clone();
            threads.push(std::thread::spawn(move || {
                e.replace_leg(leg, dev as Arc<dyn Device>, Duration::from_millis(1500))
            }));
        }
        for t in threads {
            let _ = t.join();
        }
        let st = engine.status();
        if st.cache_lost.is_some() || read_block(&engine, 0) != block_of(0x11) {
            lost += 1;
            eprintln!(
                "R24[{i}]: cache lost {:?}, mode {}",
                st.cache_lost.is_some(),
                st.mode
            );
        }
    }
    assert_eq!(
        lost, 0,
        "R24: {lost}/3 concurrent replace pairs lost FLUSHed data"
    );
}

/// R25: replacing a healthy leg of a mirrored pair takes it out of use for the whole drain; the
/// other leg failing meanwhile loses FLUSHed data that the healthy leg still holds.
#[test]
fn r25_a_real_failure_during_a_replace_of_the_other_leg_keeps_flushed_data() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = Arc::new(rig.open_with(rig.no_writeback()));
    engine.write(0, &block_of(0x11), false).unwrap();
    engine.flush().unwrap();
    let fresh = SimDisk::new("sim:new0", rig.legs[0].size_bytes());
    let e = engine.clone();
    let t = std::thread::spawn(move || {
        e.replace_leg(0, fresh as Arc<dyn Device>, Duration::from_secs(3))
    });
    std::thread::sleep(Duration::from_millis(300));
    rig.legs[1].faults.dead.store(true, Ordering::Relaxed); // the only real failure
    let mut failed_reads = 0;
    for _ in 0..20 {
        let mut b = vec![0u8; BLOCK];
        if engine.read(0, &mut b).is_err() {
            failed_reads += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("R25: reads of a FLUSHed block that failed: {failed_reads}/20");
    let r = t.join().unwrap();
    let st = engine.status();
    eprintln!(
        "R25: replace {r:?}; mode {}; lost {:?}",
        st.mode,
        st.cache_lost.is_some()
    );
    assert_eq!(
        read_block(&engine, 0),
        block_of(0x11),
        "R25: FLUSHed write lost after one leg failed during a replace of the other"
    );
}
