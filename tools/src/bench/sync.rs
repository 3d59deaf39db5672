//! `wbbench engine --fsync-every N [--writers W]`: sync-heavy writes (issue 14) in process.
//!
//! 1. limit: 4 KiB `pwrite` + `fdatasync` on the cache file itself, QD1, for `--seconds`;
//! 2. engine: `W` writers, each a random 4 KiB write and a FLUSH after every `N` writes, for
//!    `--seconds`, through a device that counts the bytes the log writes → FLUSHes/s against
//!    the limit, log bytes per fsync'd write, and how many such writes the cache holds before
//!    writers would wait (its slots' bytes over the log bytes each write costs);
//! 3. with `W` > 1, first the same with one writer on a fresh cache: `W` writers' FLUSHes/s over
//!    one writer's is what group commit gains (FLUSHes arriving together share a log write).
//!
//! Figures are printed, never asserted.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use wb_target::FileDevice;

use super::engine::{EngineArgs, Images};
use super::files::{CountingDevice, Xorshift};

#[derive(Serialize, Debug)]
pub struct SyncReport {
    pub writers: usize,
    pub fsync_every: u64,
    pub raw_fsyncs_per_sec: f64,
    pub engine_flushes_per_sec: f64,
    pub flush_ratio: f64,
    pub engine_writes_per_sec: f64,
    /// One writer's FLUSHes/s in the same run (only with more than one writer).
    pub single_writer_flushes_per_sec: Option<f64>,
    /// `engine_flushes_per_sec` over `single_writer_flushes_per_sec`: group commit.
    pub group_commit_ratio: Option<f64>,
    pub log_bytes_per_fsynced_write: f64,
    pub cache_bytes: u64,
    pub writes_the_cache_holds: u64,
    pub stall_ms: u64,
}

pub fn run(args: &EngineArgs, every: u64) -> Result<SyncReport> {
    let every = every.max(1);
    let images = Images::create(args)?;
    let duration = Duration::from_secs(args.seconds.max(1));
    let raw = raw_fsync_rate(&images, duration)?;
    let single = if args.writers > 1 {
        let one = phase(&images, 1, every, duration)?;
        Some(one.flushes as f64 / one.elapsed)
    } else {
        None
    };
    let p = phase(&images, args.writers.max(1), every, duration)?;
    if !args.keep {
        images.remove();
    }
    let (writes, flushes, elapsed, status) = (p.writes, p.flushes, p.elapsed, p.status);
    let per_write = p.log_bytes as f64 / writes.max(1) as f64;
    // The ring's bytes (slots of 512 KiB), as the cost per write fills them.
    let ring_bytes =
        status.capacity_bytes / logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * logfmt::SLOT_BLOCKS as u64;
    let flushes_per_sec = flushes as f64 / elapsed;
    Ok(SyncReport {
        writers: args.writers,
        fsync_every: every,
        raw_fsyncs_per_sec: raw,
        engine_flushes_per_sec: flushes_per_sec,
        flush_ratio: flushes_per_sec / raw,
        engine_writes_per_sec: writes as f64 / elapsed,
        single_writer_flushes_per_sec: single,
        group_commit_ratio: single.map(|one| flushes_per_sec / one),
        log_bytes_per_fsynced_write: per_write,
        cache_bytes: args.cache_gib << 30,
        writes_the_cache_holds: (ring_bytes as f64 / per_write.max(1.0)) as u64,
        stall_ms: status.stall_ms,
    })
}

/// What one engine phase did: writes, FLUSHes, seconds, the log's bytes, the final status.
struct Phase {
    writes: u64,
    flushes: u64,
    elapsed: f64,
    log_bytes: u64,
    status: wb_target::EngineStatus,
}

/// `writers` writers for `duration` on a freshly formatted cache.
fn phase(images: &Images, writers: usize, every: u64, duration: Duration) -> Result<Phase> {
    images.format()?;
    let counting = CountingDevice::new(Arc::new(FileDevice::open(&images.cache)?));
    let engine = images.open(counting.clone())?;
    let start_bytes = counting.bytes_written.load(Ordering::Relaxed);
    let (writes, flushes, elapsed) = drive(&engine, writers, every, duration)?;
    let log_bytes = counting.bytes_written.load(Ordering::Relaxed) - start_bytes;
    let status = engine.status();
    engine.abandon();
    Ok(Phase {
        writes,
        flushes,
        elapsed,
        log_bytes,
        status,
    })
}

/// QD1 4 KiB `pwrite` + `fdatasync` on the cache file, over its first 64 MiB.
fn raw_fsync_rate(images: &Images, duration: Duration) -> Result<f64> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&images.cache)
        .with_context(|| format!("opening {}", images.cache.display()))?;
    let block = vec![0x5au8; logfmt::BLOCK_SIZE_BYTES];
    let (started, mut n) = (Instant::now(), 0u64);
    while started.elapsed() < duration {
        let offset = (n % 16384) * logfmt::BLOCK_SIZE_BYTES as u64;
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// `writers` threads: a random 4 KiB write, and a FLUSH after every `every` of them, until
/// `duration` passes. Returns (writes, FLUSHes, seconds).
fn drive(
    engine: &wb_target::Engine,
    writers: usize,
    every: u64,
    duration: Duration,
) -> Result<(u64, u64, f64)> {
    let device_blocks = engine.device_size_bytes() / logfmt::BLOCK_SIZE_BYTES as u64;
    let (writes, flushes, stop) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..writers)
            .map(|t| {
                let (writes, flushes, stop) = (&writes, &flushes, &stop);
                scope.spawn(move || -> Result<()> {
                    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                    let mut data = vec![0u8; logfmt::BLOCK_SIZE_BYTES];
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        data[..8].copy_from_slice(&i.to_le_bytes());
                        let block = rng.below(device_blocks);
                        engine.write(block * logfmt::BLOCK_SIZE_BYTES as u64, &data, false)?;
                        writes.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        if i.is_multiple_of(every) {
                            engine.flush()?;
                            flushes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("writer thread")?;
        }
        Ok(())
    })?;
    Ok((
        writes.into_inner(),
        flushes.into_inner(),
        started.elapsed().as_secs_f64(),
    ))
}

pub fn print(r: &SyncReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "cache file 4 KiB pwrite+fdatasync : {:>10.0} /s",
        r.raw_fsyncs_per_sec
    );
    println!(
        "engine FLUSHes ({} writers, every {}): {:>7.0} /s ({:.0} writes/s)",
        r.writers, r.fsync_every, r.engine_flushes_per_sec, r.engine_writes_per_sec
    );
    println!(
        "flush_ratio                       : {:>10.3}  (budget ≥ 0.5 single writer)",
        r.flush_ratio
    );
    if let (Some(one), Some(ratio)) = (r.single_writer_flushes_per_sec, r.group_commit_ratio) {
        println!(
            "group_commit_ratio                : {:>10.3}  ({} writers over 1 writer's {:.0} /s; budget ≥ 2 with 8)",
            ratio, r.writers, one
        );
    }
    println!(
        "log bytes per fsync'd write       : {:>10.0}  (budget ≤ 12288)",
        r.log_bytes_per_fsynced_write
    );
    println!(
        "such writes a {} GiB cache holds  : {:>10}  (stall so far {} ms)",
        r.cache_bytes >> 30,
        r.writes_the_cache_holds,
        r.stall_ms
    );
    Ok(())
}
