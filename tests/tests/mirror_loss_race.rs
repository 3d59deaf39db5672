//! Every cache leg lost while writeback is in the middle of a batch (CONTRACT §2, §5), in process and
//! deterministic: the devices are wrapped (`Hooked`) so that writeback stops at an exact point
//! (a backing write, the FLUSH of a commit) until the test has killed both legs and seen
//! passthrough.
//!
//! The engine goes to passthrough at once, but the batch in flight still holds block images read
//! from the cache before the loss. Whatever happens to that batch:
//! - a write acknowledged in passthrough is never overwritten by it (read-your-writes; an
//!   acknowledged write must not vanish), not even after the legs are replaced;
//! - writeback survives (no panic) and writes back again once new legs are attached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wb_target::{Device, Engine};
use wb_tests::{finishes_within, wait_for_mode, Gate, Hooked, IoOp, Rig, BACKING_IDENTITY};

const BACKING_BYTES: u64 = 8 << 20;
const BLOCK: usize = 4096;

fn writing_back_always(rig: &Rig) -> wb_target::OpenOptions {
    let mut options = rig.options();
    options.writeback = Some(writeback::Policy {
        idle_after: Duration::ZERO,
        ..Default::default()
    });
    options
}

/// An engine over `rig`'s legs and a backing device whose writes pass `gate`.
fn engine_with_gated_backing(rig: &Rig, gate: &Arc<Gate>) -> Arc<Engine> {
    let g = gate.clone();
    let backing = Hooked::new(rig.backing.clone(), move |_dev, op| {
        if matches!(op, IoOp::Write { .. }) {
            g.hold_if_armed();
        }
        None
    });
    Arc::new(
        wb_target::open(
            rig.leg_devices(),
            backing as Arc<dyn Device>,
            BACKING_IDENTITY,
            writing_back_always(rig),
        )
        .expect("open engine"),
    )
}

/// Kills both legs and makes the engine notice (a logged write and a FLUSH, which may fail:
/// what it covered is lost); returns once the engine is in passthrough.
fn lose_both_legs(rig: &Rig, engine: &Engine) {
    for leg in &rig.legs {
        leg.faults.dead.store(true, Ordering::Relaxed);
    }
    // Logged in RAM until the FLUSH seals it, so that the FLUSH meets the dead legs (a write
    // right after a FLUSH could go to the legs at once, `seal_if_sync_writer`, and the loss be
    // noticed before the FLUSH, which would then wait in passthrough for the held backing write).
    engine
        .write_zeroes(BLOCK as u64 * 100, BLOCK as u64)
        .unwrap();
    let _ = engine.flush();
    wait_for_mode(engine, "passthrough");
    assert!(engine.status().cache_lost_at.is_some());
}

fn read_block(engine: &Engine, block: u64) -> Vec<u8> {
    let mut got = vec![0u8; BLOCK];
    engine.read(block * BLOCK as u64, &mut got).unwrap();
    got
}

/// Both legs back (the same simulated disks, revived), as `wbctl replace` would attach them.
fn replace_both_legs(rig: &Rig, engine: &Arc<Engine>) {
    for (i, leg) in rig.legs.iter().enumerate() {
        leg.faults.dead.store(false, Ordering::Relaxed);
        let (engine, leg) = (engine.clone(), leg.clone());
        finishes_within(30, "replace_leg", move || {
            engine
                .replace_leg(i, leg as Arc<dyn Device>, Duration::from_secs(20))
                .expect("replace leg")
        });
    }
    assert_eq!(engine.status().mode, "mirrored");
}

/// After the legs are replaced writeback still runs: a new write is drained to the backing device.
fn writeback_still_works(rig: &Rig, engine: &Arc<Engine>) {
    engine
        .write(BLOCK as u64 * 200, &[0x99u8; BLOCK], false)
        .unwrap();
    let e = engine.clone();
    finishes_within(30, "drain (is wb-writeback alive?)", move || {
        e.drain(Duration::from_millis(100), |_| {})
    })
    .expect("drain");
    assert!(rig.backing.snapshot()[200 * BLOCK..201 * BLOCK] == [0x99u8; BLOCK][..]);
}

/// Writes `data` to block 0 and flushes; once writeback's backing write of it is held at the
/// gate (issued before the loss, not landed), both legs die.
fn write_block_0_and_lose_both_legs_while_writeback_holds_it(
    rig: &Rig,
    engine: &Engine,
    gate: &Gate,
    data: &[u8],
) {
    gate.armed.store(true, Ordering::Release);
    engine.write(0, data, false).unwrap();
    engine.flush().unwrap();
    assert!(
        gate.wait_held(Duration::from_secs(30)),
        "writeback never wrote block 0 back"
    );
    lose_both_legs(rig, engine);
}

/// The batch in flight has one backing write, issued before the loss and landing after it: the
/// passthrough write to the same block must land after it, not under it.
#[test]
fn a_passthrough_write_is_not_overwritten_by_the_write_in_flight_at_the_loss() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let engine = engine_with_gated_backing(&rig, &gate);
    let (old, new) = (vec![0xa1u8; BLOCK], vec![0xb2u8; BLOCK]);

    write_block_0_and_lose_both_legs_while_writeback_holds_it(&rig, &engine, &gate, &old);

    let writer = {
        let (engine, new) = (engine.clone(), new.clone());
        std::thread::spawn(move || engine.write(0, &new, false))
    };
    std::thread::sleep(Duration::from_millis(300));
    gate.release();
    writer
        .join()
        .unwrap()
        .expect("a passthrough write succeeds");
    std::thread::sleep(Duration::from_millis(1500)); // writeback finishes (and fails) the batch
    assert!(
        read_block(&engine, 0) == new,
        "block 0 reads the copy writeback held when the cache was lost, not the write \
         acknowledged in passthrough"
    );
    replace_both_legs(&rig, &engine);
    assert!(read_block(&engine, 0) == new);
    writeback_still_works(&rig, &engine);
}

/// A read in passthrough while writeback's write issued before the loss is still on its way to
/// the backing device: the read must wait for it. Returning the block as it was before would let
/// the device change under the reader with no write in between (the next read differs).
#[test]
fn a_passthrough_read_waits_for_the_write_in_flight_at_the_loss() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let engine = engine_with_gated_backing(&rig, &gate);
    let data = vec![0xc3u8; BLOCK];

    write_block_0_and_lose_both_legs_while_writeback_holds_it(&rig, &engine, &gate, &data);

    let reader = {
        let engine = engine.clone();
        std::thread::spawn(move || read_block(&engine, 0))
    };
    std::thread::sleep(Duration::from_millis(300));
    gate.release();
    let first = reader.join().unwrap();
    let again = read_block(&engine, 0);
    assert!(
        again == data,
        "block 0: writeback's write issued before the loss did not land"
    );
    assert!(
        first == again,
        "block 0: a read in passthrough returned the block as it was before writeback's write \
         in flight at the loss landed; the next read returns other data"
    );
    assert!(rig.backing.snapshot()[..BLOCK] == data[..]);
}

/// The batch in flight has more backing writes than are issued at once: some were issued before
/// the loss, the rest were not. A passthrough write goes to one of the blocks not yet written
/// back; then both legs are replaced. The stale batch must never land on top of it, and
/// writeback must carry on (it must not be left retrying the stale batch, nor replay it after
/// the replacement, nor trip over the cache's reset state).
#[test]
fn a_stale_batch_never_lands_after_passthrough_writes_even_after_replace() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    gate.hold_all.store(true, Ordering::Release);
    let engine = engine_with_gated_backing(&rig, &gate);
    let (old, new) = (vec![0xa1u8; BLOCK], vec![0xb2u8; BLOCK]);
    // 16 separate blocks (every other one): 16 backing writes, 4 in flight at a time.
    gate.armed.store(true, Ordering::Release);
    for i in 0..16u64 {
        engine.write(i * 2 * BLOCK as u64, &old, false).unwrap();
    }
    engine.flush().unwrap();
    assert!(
        gate.wait_held(Duration::from_secs(30)),
        "writeback never wrote back"
    );
    std::thread::sleep(Duration::from_millis(200)); // every writer of the batch is held
    lose_both_legs(&rig, &engine);

    let last = 30u64; // the batch's last block: not issued before the loss
    let writer = {
        let (engine, new) = (engine.clone(), new.clone());
        std::thread::spawn(move || engine.write(last * BLOCK as u64, &new, false))
    };
    std::thread::sleep(Duration::from_millis(300));
    gate.release();
    writer
        .join()
        .unwrap()
        .expect("a passthrough write succeeds");
    std::thread::sleep(Duration::from_millis(2500)); // writeback deals with the stale batch
    assert!(
        read_block(&engine, last) == new,
        "block {last}: the stale batch landed on the passthrough write"
    );
    replace_both_legs(&rig, &engine);
    std::thread::sleep(Duration::from_millis(2500)); // writeback's next attempt, if any
    assert!(
        read_block(&engine, last) == new,
        "block {last}: after the legs were replaced, the stale batch was written back over \
         the write acknowledged in passthrough"
    );
    writeback_still_works(&rig, &engine);
}

/// Every leg lost between writeback's checkpoint write (which the legs took) and the end of its
/// commit: the commit must give up (the log was reset under it), not trip over the reset slots;
/// writeback lives on, passthrough writes go through, and after both legs are replaced the cache
/// writes back again.
#[test]
fn every_leg_lost_during_a_commit_leaves_writeback_alive() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let gate = Arc::new(Gate::default());
    let killed = Arc::new(AtomicBool::new(false));
    // Leg 1 holds the FLUSH that follows a checkpoint write (writeback's commit) while the gate
    // is armed; once `killed`, both legs fail every new write and flush.
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let (gate, killed) = (gate.clone(), killed.clone());
            let after_checkpoint = AtomicBool::new(false);
            Hooked::new(leg.clone(), move |_dev, op| {
                if killed.load(Ordering::Acquire) {
                    return Some(Err(std::io::Error::other("leg pulled")));
                }
                match op {
                    IoOp::Write { offset, .. } if *offset < logfmt::SEGMENT_AREA_OFFSET => {
                        after_checkpoint.store(true, Ordering::Release);
                    }
                    IoOp::Flush if i == 1 && after_checkpoint.swap(false, Ordering::AcqRel) => {
                        gate.hold_if_armed();
                    }
                    _ => {}
                }
                None
            }) as Arc<dyn Device>
        })
        .collect();
    let engine = Arc::new(
        wb_target::open(
            legs,
            rig.backing.clone() as Arc<dyn Device>,
            BACKING_IDENTITY,
            writing_back_always(&rig),
        )
        .expect("open engine"),
    );
    let data = vec![0x3cu8; BLOCK];
    gate.armed.store(true, Ordering::Release);
    engine.write(0, &data, false).unwrap();
    engine.flush().unwrap();
    assert!(
        gate.wait_held(Duration::from_secs(30)),
        "writeback never committed"
    );
    // The checkpoint is on the legs; now they go, and the log writer finds out.
    killed.store(true, Ordering::Release);
    engine.write(BLOCK as u64 * 50, &data, false).unwrap();
    let _ = engine.flush();
    wait_for_mode(&engine, "passthrough");
    gate.release();
    std::thread::sleep(Duration::from_millis(500));

    let e = engine.clone();
    finishes_within(20, "a passthrough write", move || {
        e.write(BLOCK as u64 * 7, &[0x7eu8; BLOCK], false)
    })
    .expect("passthrough write");
    assert!(rig.backing.snapshot()[7 * BLOCK..8 * BLOCK] == [0x7eu8; BLOCK][..]);
    // The legs were only pulled at the hook; the same devices come back.
    killed.store(false, Ordering::Release);
    for (i, leg) in rig.legs.iter().enumerate() {
        let (engine, leg) = (engine.clone(), leg.clone());
        finishes_within(30, "replace_leg", move || {
            engine
                .replace_leg(i, leg as Arc<dyn Device>, Duration::from_secs(20))
                .expect("replace leg")
        });
    }
    assert_eq!(engine.status().mode, "mirrored");
    writeback_still_works(&rig, &engine);
}
