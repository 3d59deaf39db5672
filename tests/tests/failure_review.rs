//! Failure paths, third round: what a second independent review of the failure paths found
//! (R12–R18; each failed before its fix, see the commit that added this file). Like
//! failure_interleavings.rs, each test drives one engine over simulated devices through one
//! exact interleaving of writes, FLUSHes, faults and restarts, and checks what the contract
//! (docs/CONTRACT.md §2, §5) says a FLUSH may return and what a later start may read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

/// R12: a FUA write advances `flushed_id`: an earlier plain write, never covered by a FLUSH, is
/// lost with the cache and the first FLUSH after the loss succeeds.
#[test]
fn r12_a_fua_write_does_not_count_as_a_flush_of_earlier_writes() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let engine = rig.open_with(rig.no_writeback());
    engine.write(0, &block_of(0x11), false).unwrap(); // never FLUSHed
    engine.write(BLOCK as u64, &block_of(0x22), true).unwrap(); // FUA
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
    use std::sync::atomic::AtomicBool;
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
