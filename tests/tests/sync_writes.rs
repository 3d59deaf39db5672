//! Sync-heavy workloads on format v2 (issue 14): a FLUSH costs the blocks it writes, not a
//! whole slot; FLUSHes that arrive while one is being committed share the next log write;
//! a torn segment written behind durable ones in their slot never damages them; an old
//! cache format is refused by name. Byte and write counts are asserted, never timings.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wb_target::{Device, Engine};
use wb_tests::*;

const BLOCK: usize = 4096;
const BACKING_BYTES: u64 = 64 << 20;

/// Counts, per leg, what reaches the segment area: write operations, bytes and flushes.
#[derive(Default)]
struct LogCounters {
    writes: AtomicU64,
    bytes: AtomicU64,
    flushes: AtomicU64,
}

/// Opens the rig's legs through `hook` (leg index, device, operation).
fn open_hooked(
    rig: &Rig,
    options: wb_target::OpenOptions,
    hook: impl Fn(usize, &dyn Device, &IoOp<'_>) -> Option<std::io::Result<()>>
        + Send
        + Sync
        + Clone
        + 'static,
) -> Engine {
    let legs: Vec<Arc<dyn Device>> = rig
        .legs
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let hook = hook.clone();
            Hooked::new(leg.clone(), move |d, op| hook(i, d, op)) as Arc<dyn Device>
        })
        .collect();
    wb_target::open(legs, rig.backing.clone(), BACKING_IDENTITY, options).expect("open engine")
}

/// Leg 0's log traffic, counted.
fn counting(
    counters: Arc<LogCounters>,
) -> impl Fn(usize, &dyn Device, &IoOp<'_>) -> Option<std::io::Result<()>> + Send + Sync + Clone {
    move |leg, _d, op| {
        if leg == 0 {
            match op {
                IoOp::Write { offset, data } if *offset >= logfmt::SEGMENT_AREA_OFFSET => {
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                    counters
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                IoOp::Flush => {
                    counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        None
    }
}

/// Options without writeback and without the sync timer: only FLUSHes seal segments.
fn quiet(rig: &Rig) -> wb_target::OpenOptions {
    let mut options = rig.no_writeback();
    options.sync_interval = Duration::from_secs(3600);
    options
}

/// Issue 14's figure: an fsync'd 4 KiB write costs a header block and its data block in the
/// log (8 KiB), not a 512 KiB slot; 1000 of them fit in a few slots of a 32-slot cache.
#[test]
fn an_fsynced_4k_write_costs_at_most_12_kib_of_log() {
    let rig = Rig::new(2, 32, BACKING_BYTES, BLOCK as u32);
    let counters = Arc::new(LogCounters::default());
    let engine = open_hooked(&rig, quiet(&rig), counting(counters.clone()));
    let writes = 1000u64;
    for i in 0..writes {
        engine
            .write(i * 7 % 4096 * BLOCK as u64, &block_of(i as u8), false)
            .unwrap();
        engine.flush().unwrap();
    }
    let per_write = counters.bytes.load(Ordering::Relaxed) / writes;
    eprintln!(
        "{per_write} log bytes per fsync'd 4 KiB write; {} leg flushes for {writes} FLUSHes",
        counters.flushes.load(Ordering::Relaxed)
    );
    assert!(per_write <= 12 * 1024, "{per_write} bytes of log per write");
    // 1000 × 8 KiB = 125 blocks of 512 KiB slots... 16 slots, out of 32: the cache holds them.
    let status = engine.status();
    assert!(
        status.used_bytes < status.capacity_bytes * 3 / 4,
        "used {} of {}",
        status.used_bytes,
        status.capacity_bytes
    );
    // And every one of them is there after a power cut: each was FLUSHed.
    engine.abandon();
    drop(engine);
    rig.power_cut(&mut rand::thread_rng());
    rig.power_on();
    let engine = rig.open_with(quiet(&rig));
    for i in writes - 200..writes {
        let block = i * 7 % 4096;
        // A later write of the same block may have superseded it (i·7 mod 4096 repeats).
        let newest = (i..writes).rev().find(|&j| j * 7 % 4096 == block).unwrap();
        assert_eq!(
            read_block(&engine, block),
            block_of(newest as u8),
            "block {block}"
        );
    }
}

/// Group commit: while one FLUSH's leg flush is held, seven writers write and FLUSH; when it
/// completes, one more log write and one leg flush serve all seven.
#[test]
fn flushes_that_arrive_during_a_commit_share_the_next_log_write() {
    let rig = Rig::new(2, 32, BACKING_BYTES, BLOCK as u32);
    let counters = Arc::new(LogCounters::default());
    let gate = Arc::new(Gate::default());
    let count = counting(counters.clone());
    let g = gate.clone();
    let hook = move |leg: usize, d: &dyn Device, op: &IoOp<'_>| {
        if leg == 0 && matches!(op, IoOp::Flush) {
            g.hold_if_armed();
        }
        count(leg, d, op)
    };
    let engine = Arc::new(open_hooked(&rig, quiet(&rig), hook));
    let before = counters.writes.load(Ordering::Relaxed);
    gate.armed.store(true, Ordering::Release);
    let e = engine.clone();
    let first = std::thread::spawn(move || {
        e.write(0, &block_of(1), false).unwrap();
        e.flush().unwrap();
    });
    assert!(gate.wait_held(Duration::from_secs(20)), "no leg flush");
    let followers: Vec<_> = (1..8u64)
        .map(|i| {
            let e = engine.clone();
            std::thread::spawn(move || {
                e.write(i * BLOCK as u64, &block_of(i as u8 + 1), false)
                    .unwrap();
                e.flush().unwrap();
            })
        })
        .collect();
    // Every follower's write is logged (in the open segment) before the held commit ends.
    while engine.status().writes < 8 {
        std::thread::yield_now();
    }
    gate.release();
    first.join().unwrap();
    for f in followers {
        f.join().unwrap();
    }
    let log_writes = counters.writes.load(Ordering::Relaxed) - before;
    let status = engine.status();
    eprintln!("{} FLUSHes, {log_writes} log writes", status.flushes);
    assert_eq!(status.flushes, 8);
    assert_eq!(
        log_writes, 2,
        "the first FLUSH's segment, then one segment for the seven that waited"
    );
    for i in 0..8u64 {
        assert_eq!(read_block(&engine, i), block_of(i as u8 + 1));
    }
}

/// Waits (at most 20 s) until `counter` reaches `n`; panics naming `what` if it does not.
fn wait_for_count(counter: &AtomicU64, n: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while counter.load(Ordering::Acquire) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: never reached {n}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Leg 0 has had `writes` segment writes and, since `flushes_before`, `flushes` flushes.
#[track_caller]
fn assert_traffic(c: &LogCounters, flushes_before: u64, writes: u64, flushes: u64, what: &str) {
    assert_eq!(
        c.writes.load(Ordering::Acquire),
        writes,
        "{what}: segment writes"
    );
    assert_eq!(
        c.flushes.load(Ordering::Acquire) - flushes_before,
        flushes,
        "{what}: leg flushes"
    );
}

/// The legs lose what they did not flush, the RAM buffer file is gone, the power comes back.
fn power_cut_without_buffer(rig: &Rig, engine: Engine) -> Engine {
    engine.abandon();
    drop(engine);
    for leg in &rig.legs {
        leg.lose_unflushed();
    }
    let _ = std::fs::remove_file(rig.buffer_path());
    rig.power_on();
    rig.open_with(quiet(rig))
}

/// A sync writer alternates a write and a FLUSH: its write after a FLUSH is written and flushed
/// at once, so that its own FLUSH finds it durable or on its way and writes nothing more. A
/// second and third write before the FLUSH share the segment the FLUSH seals, and writes before
/// this run's first FLUSH stay in RAM as any others. Every FLUSHed write survives a power cut.
#[test]
fn a_sync_writers_write_reaches_the_legs_before_its_flush() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let c = Arc::new(LogCounters::default());
    let engine = open_hooked(&rig, quiet(&rig), counting(c.clone()));
    let b = BLOCK as u64;
    // Opening flushes the legs too: count from here.
    let f0 = c.flushes.load(Ordering::Acquire);
    engine.write(0, &block_of(0xa), false).unwrap();
    engine.write(b, &block_of(0xa), false).unwrap();
    engine.flush().unwrap();
    assert_traffic(&c, f0, 1, 1, "no FLUSH before: one segment");
    // B, the first write after the FLUSH, is written and flushed before any FLUSH asks.
    engine.write(2 * b, &block_of(0xb), false).unwrap();
    wait_for_count(&c.writes, 2, "B's segment");
    wait_for_count(&c.flushes, f0 + 2, "B's leg flush");
    // C and D share the segment the FLUSH seals.
    engine.write(3 * b, &block_of(0xc), false).unwrap();
    engine.write(4 * b, &block_of(0xd), false).unwrap();
    engine.flush().unwrap();
    assert_traffic(&c, f0, 3, 3, "C and D in one segment");
    // E: written and flushed early; its FLUSH writes and flushes nothing more.
    engine.write(5 * b, &block_of(0xe), false).unwrap();
    engine.flush().unwrap();
    assert_traffic(&c, f0, 4, 4, "E's FLUSH wrote and flushed nothing more");
    let engine = power_cut_without_buffer(&rig, engine);
    for (block, byte) in [(0, 0xa), (1, 0xa), (2, 0xb), (3, 0xc), (4, 0xd), (5, 0xe)] {
        assert_eq!(read_block(&engine, block), block_of(byte), "block {block}");
    }
}

/// A FLUSH that arrives while the sync writer's early segment is still being written waits for
/// it (a commit in flight) and fails nothing: the write reads back after a power cut. The leg
/// flush of the early segment is held until the FLUSH is waiting.
#[test]
fn a_flush_waits_for_the_early_segment_in_flight() {
    let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
    let c = Arc::new(LogCounters::default());
    let gate = Arc::new(Gate::default());
    let count = counting(c.clone());
    let g = gate.clone();
    let hook = move |leg: usize, d: &dyn Device, op: &IoOp<'_>| {
        if matches!(op, IoOp::Flush) {
            g.hold_if_armed();
        }
        count(leg, d, op)
    };
    let engine = Arc::new(open_hooked(&rig, quiet(&rig), hook));
    engine.write(0, &block_of(0x1), false).unwrap();
    engine.flush().unwrap();
    gate.armed.store(true, Ordering::Release);
    engine.write(BLOCK as u64, &block_of(0x2), false).unwrap();
    assert!(
        gate.wait_held(Duration::from_secs(20)),
        "no early leg flush"
    );
    let e = engine.clone();
    let flush = std::thread::spawn(move || e.flush());
    // The FLUSH is issued (counted) and must wait: the leg flush it needs is held.
    while engine.status().flushes < 2 {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(200)); // time to complete, were it wrong to
    assert!(
        !flush.is_finished(),
        "a FLUSH completed before its write was durable"
    );
    gate.release();
    flush.join().unwrap().expect("the FLUSH succeeds");
    assert_eq!(
        c.writes.load(Ordering::Acquire),
        2,
        "the FLUSH sealed no segment of its own"
    );
    let engine = Arc::into_inner(engine).expect("one owner");
    let engine = power_cut_without_buffer(&rig, engine);
    assert_eq!(read_block(&engine, 1), block_of(0x2));
}

/// A segment written behind durable ones in the same slot and torn by a power cut damages
/// nothing before it: it writes only its own blocks. Every FLUSHed write reads back, the torn
/// one reads old or new, and the log goes on behind the last whole segment.
#[test]
fn a_torn_sub_segment_never_damages_the_durable_ones_before_it_in_its_slot() {
    for cut in [0usize, 512, 4096, 4096 + 1024, 2 * 4096 + 512] {
        let rig = Rig::new(2, 16, BACKING_BYTES, BLOCK as u32);
        let tear = Arc::new(AtomicU64::new(0));
        let t = tear.clone();
        // Once armed (the offset of the segment to tear), that write keeps only `cut` bytes
        // on both legs, and the power goes right after.
        let hook = move |_leg: usize, d: &dyn Device, op: &IoOp<'_>| match op {
            IoOp::Write { offset, data } if *offset == t.load(Ordering::Acquire) => {
                Some(d.write_at(&data[..cut.min(data.len())], *offset))
            }
            _ => None,
        };
        let engine = open_hooked(&rig, quiet(&rig), hook);
        let backing_block_9 = read_block(&engine, 9);
        let backing_block_11 = read_block(&engine, 11);
        for i in 0..5u64 {
            engine
                .write(i * BLOCK as u64, &block_of(0x10 + i as u8), false)
                .unwrap();
            engine.flush().unwrap();
        }
        // Segments 1..=5 sit at blocks 0, 2, 4, 6, 8 of slot 0. The next write, the first after
        // a FLUSH, is segment 6 at block 10 (written and flushed at once: a sync writer's);
        // the two after it are segment 7 at block 12, which the FLUSH seals: it is torn.
        let seventh = logfmt::Position { slot: 0, block: 12 };
        tear.store(seventh.offset(), Ordering::Release);
        engine.write(0, &block_of(0x99), false).unwrap();
        engine
            .write(9 * BLOCK as u64, &block_of(0x9a), false)
            .unwrap();
        engine
            .write(11 * BLOCK as u64, &block_of(0x9b), false)
            .unwrap();
        engine.flush().unwrap();
        engine.abandon();
        drop(engine);
        for leg in &rig.legs {
            leg.lose_unflushed();
        }
        let _ = std::fs::remove_file(rig.buffer_path());
        rig.power_on();
        let engine = rig.open_with(quiet(&rig));
        let report = engine.recovery_report();
        assert_eq!(report.head_id(), 6, "cut {cut}: {}", report.stop_reason);
        for i in 1..5u64 {
            assert_eq!(
                read_block(&engine, i),
                block_of(0x10 + i as u8),
                "cut {cut}"
            );
        }
        assert_eq!(read_block(&engine, 0), block_of(0x99), "cut {cut}");
        assert_eq!(read_block(&engine, 9), backing_block_9, "cut {cut}");
        assert_eq!(read_block(&engine, 11), backing_block_11, "cut {cut}");
        // The log goes on where the torn segment was: a new write is durable and reads back.
        engine.write(0, &block_of(0x77), false).unwrap();
        engine.flush().unwrap();
        engine.abandon();
        drop(engine);
        let engine = rig.open_with(quiet(&rig));
        assert_eq!(read_block(&engine, 0), block_of(0x77), "cut {cut}");
        assert_eq!(engine.recovery_report().head_id(), 7, "cut {cut}");
    }
}

/// A cache of on-disk format version 1 is refused at open and at create (without --force), by
/// name, saying what to do; nothing is written to it.
#[test]
fn a_version_1_cache_is_refused_by_name() {
    let rig = Rig::new(1, 16, BACKING_BYTES, BLOCK as u32);
    let leg = &rig.legs[0];
    // Make the superblock a version-1 one (a version-1 daemon wrote the same prologue).
    let mut sb = leg.snapshot()[..4096].to_vec();
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = logfmt::crc32c_with_hole(&sb, logfmt::RECORD_CRC_OFFSET);
    sb[12..16].copy_from_slice(&crc.to_le_bytes());
    leg.poke(0, &sb);
    let before = leg.snapshot();
    let err = wb_target::open(
        rig.leg_devices(),
        rig.backing.clone(),
        BACKING_IDENTITY,
        rig.options(),
    )
    .err()
    .expect("a version-1 cache does not open")
    .to_string();
    assert!(err.contains("format version 1"), "{err}");
    assert!(err.contains("--force") && err.contains("drain"), "{err}");
    let options = wb_target::FormatOptions {
        logical_block_size: BLOCK as u32,
        force: false,
    };
    let err = wb_target::format(&rig.leg_devices(), rig.backing.as_ref(), "b", &options)
        .expect_err("create over a version-1 cache needs --force")
        .to_string();
    assert!(err.contains("format version 1"), "{err}");
    assert!(leg.snapshot() == before, "a refusal changes nothing");
    let forced = wb_target::FormatOptions {
        force: true,
        ..options
    };
    wb_target::format(&rig.leg_devices(), rig.backing.as_ref(), "b", &forced)
        .expect("--force re-creates it");
}
