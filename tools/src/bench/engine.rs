//! `wbbench engine`: the in-process engine against the physical limit of its cache file.
//!
//! 1. limit: sequential 512 KiB O_DIRECT writes onto the cache file (what the log can at best do),
//!    after a first pass over the same region so that file-block allocation is paid by neither;
//! 2. engine: the same number of bytes as random 4 KiB writes into the engine (then a FLUSH), on
//!    the same file, in the same run → `write_ratio`;
//! 3. the cache is filled to the brim (writeback off) → `map_bytes_per_block`, the engine's
//!    metadata per cached 4 KiB block;
//! 4. the daemon "crashes" (threads stop, nothing flushed, the RAM buffer file stays) and a new
//!    engine recovers through a byte-counting device → `recovery_read_fraction`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use wb_target::{Device, Engine, EngineStatus, FileDevice, OpenOptions};

use super::files::{self, CountingDevice, Xorshift};

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// Folder for the image files (on the device under test).
    #[arg(long)]
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Cache file size in GiB (recovery reads headers, so larger caches read a smaller share).
    #[arg(long, default_value_t = 8)]
    pub cache_gib: u64,
    /// Bytes written in each of the limit and engine phases, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub measure_mib: u64,
    /// Writer threads driving the engine.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Keep the image files afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Sync mode: a FLUSH after every N writes of each writer (fio's `--fsync=N`) instead of the
    /// phases above; prints FLUSHes/s against the cache file's own pwrite + fdatasync rate.
    #[arg(long)]
    pub fsync_every: Option<u64>,
    /// Writers in sync mode (QD1 each).
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Seconds each sync-mode phase runs.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

#[derive(Serialize, Debug)]
pub struct EngineReport {
    pub sequential_limit_mib_s: f64,
    pub engine_random_4k_mib_s: f64,
    pub engine_random_4k_iops: f64,
    pub write_ratio: f64,
    pub map_bytes_per_block: f64,
    pub cached_blocks: u64,
    pub recovery_bytes_read: u64,
    pub cache_bytes: u64,
    pub recovery_read_fraction: f64,
    pub recovery_ms: f64,
    pub stall_ms: u64,
}

const BACKING_BYTES: u64 = 64 << 30;

pub fn run(args: &EngineArgs) -> Result<EngineReport> {
    let images = Images::create(args)?;
    let cache_bytes = args.cache_gib << 30;
    let measure_bytes = args.measure_mib << 20;

    // 1. The physical limit, measured on the cache file itself, over the region the log will
    //    use; a first pass allocates the file's blocks so that neither phase pays for that.
    files::sequential_write_bandwidth(&images.cache, 0, measure_bytes)?;
    let limit = files::sequential_write_bandwidth(&images.cache, 0, measure_bytes)?;

    images.format()?;
    let engine = images.open(Arc::new(FileDevice::open(&images.cache)?))?;

    // 2. Random 4 KiB writes into the engine.
    let blocks_total = measure_bytes / logfmt::BLOCK_SIZE_BYTES as u64;
    let started = Instant::now();
    write_random(&engine, blocks_total, args.threads, 1)?;
    engine.flush()?;
    let engine_bw = measure_bytes as f64 / started.elapsed().as_secs_f64();

    // 3. Fill the cache: leave room only for the RAM buffers' segments.
    let (status, map_bytes_per_block) = fill_to_the_brim(&engine, args.threads)?;

    // 4. Crash with a full cache, then recover through a counting device.
    let (recovery_ms, recovery_bytes) = crash_and_recover(engine, &images)?;

    if !args.keep {
        images.remove();
    }
    Ok(EngineReport {
        sequential_limit_mib_s: files::mib_per_sec(limit),
        engine_random_4k_mib_s: files::mib_per_sec(engine_bw),
        engine_random_4k_iops: engine_bw / logfmt::BLOCK_SIZE_BYTES as f64,
        write_ratio: engine_bw / limit,
        map_bytes_per_block,
        cached_blocks: status.dirty_bytes / logfmt::BLOCK_SIZE_BYTES as u64,
        recovery_bytes_read: recovery_bytes,
        cache_bytes,
        recovery_read_fraction: recovery_bytes as f64 / cache_bytes as f64,
        recovery_ms,
        stall_ms: status.stall_ms,
    })
}

/// The benchmark's files: the cache and backing images and the RAM buffer file.
pub(super) struct Images {
    pub(super) cache: PathBuf,
    backing: PathBuf,
    buffer: PathBuf,
}

impl Images {
    /// Creates the folder and the images at their sizes; no RAM buffer file is left over.
    pub(super) fn create(args: &EngineArgs) -> Result<Images> {
        std::fs::create_dir_all(&args.dir)
            .with_context(|| format!("creating {}", args.dir.display()))?;
        let images = Images {
            cache: args.dir.join("wbbench-cache.img"),
            backing: args.dir.join("wbbench-backing.img"),
            buffer: args.dir.join("wbbench.buf"),
        };
        files::create_image(&images.cache, args.cache_gib << 30)?;
        files::create_image(&images.backing, BACKING_BYTES)?;
        let _ = std::fs::remove_file(&images.buffer);
        Ok(images)
    }

    /// Formats the cache image for the backing image. The RAM buffer file an earlier phase left
    /// (it stops as a crash would: `abandon`) belonged to the cache this replaces: it goes too.
    pub(super) fn format(&self) -> Result<()> {
        let _ = std::fs::remove_file(&self.buffer);
        files::format_single_leg(&self.cache, &self.backing)
    }

    /// An engine on `cache` (the cache image, maybe wrapped) and the backing image; writeback
    /// off, no periodic sync.
    pub(super) fn open(&self, cache: Arc<dyn Device>) -> Result<Engine> {
        let backing = FileDevice::open(&self.backing)?;
        let identity = backing.identity();
        let mut options = OpenOptions::new(self.buffer.clone());
        options.writeback = None;
        options.sync_interval = Duration::from_secs(3600);
        Ok(wb_target::open(
            vec![cache],
            Arc::new(backing),
            &identity,
            options,
        )?)
    }

    pub(super) fn remove(&self) {
        for p in [&self.cache, &self.backing, &self.buffer] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Random writes until only the RAM buffers' segments are left free (writeback is off). Returns
/// the engine's status then, and its metadata per block the cache holds.
fn fill_to_the_brim(engine: &Engine, threads: usize) -> Result<(EngineStatus, f64)> {
    let status = engine.status();
    let capacity_blocks = status.capacity_bytes / logfmt::BLOCK_SIZE_BYTES as u64;
    let headroom = 40 * logfmt::DATA_BLOCKS_PER_SEGMENT as u64;
    let live_blocks = status.used_bytes / logfmt::BLOCK_SIZE_BYTES as u64;
    let more = capacity_blocks.saturating_sub(headroom + live_blocks);
    write_random(engine, more, threads, 2)?;
    let status = engine.status();
    let map_bytes_per_block = status.metadata_bytes as f64 / capacity_blocks as f64;
    Ok((status, map_bytes_per_block))
}

/// Stops `engine` as a crash would (nothing flushed, the RAM buffer file left), then times a new
/// engine's recovery through a device that counts the bytes read. Returns (ms, bytes read).
fn crash_and_recover(engine: Engine, images: &Images) -> Result<(f64, u64)> {
    engine.abandon();
    drop(engine);
    let counting = CountingDevice::new(Arc::new(FileDevice::open(&images.cache)?));
    let started = Instant::now();
    let engine = images.open(counting.clone())?;
    let recovery_ms = started.elapsed().as_secs_f64() * 1e3;
    let recovery_bytes = counting.bytes_read.load(Ordering::Relaxed);
    engine.abandon();
    drop(engine);
    Ok((recovery_ms, recovery_bytes))
}

/// `blocks` random 4 KiB writes over the backing device's range, split over `threads`.
fn write_random(engine: &Engine, blocks: u64, threads: usize, seed: u64) -> Result<()> {
    let device_blocks = engine.device_size_bytes() / logfmt::BLOCK_SIZE_BYTES as u64;
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = blocks / threads as u64 + (t == 0) as u64 * (blocks % threads as u64);
                scope.spawn(move || -> Result<()> {
                    let mut rng = Xorshift(0x2545_f491_4f6c_dd1d ^ ((seed << 8) | (t as u64 + 1)));
                    let mut data = vec![0u8; logfmt::BLOCK_SIZE_BYTES];
                    for i in 0..share {
                        data[..8].copy_from_slice(&i.to_le_bytes());
                        let block = rng.below(device_blocks);
                        engine.write(block * logfmt::BLOCK_SIZE_BYTES as u64, &data, false)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("writer thread")?;
        }
        Ok(())
    })
}

pub fn print(report: &EngineReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "sequential 512 KiB O_DIRECT limit : {:>10.1} MiB/s",
        report.sequential_limit_mib_s
    );
    println!(
        "engine random 4 KiB writes        : {:>10.1} MiB/s ({:.0} IOPS)",
        report.engine_random_4k_mib_s, report.engine_random_4k_iops
    );
    println!(
        "write_ratio                       : {:>10.3}  (budget ≥ 0.90)",
        report.write_ratio
    );
    println!(
        "map_bytes_per_block               : {:>10.2}  (budget ≤ 16)",
        report.map_bytes_per_block
    );
    println!(
        "recovery_read_fraction            : {:>10.4}  (budget ≤ 0.01; {} of {} bytes, {:.0} ms)",
        report.recovery_read_fraction,
        report.recovery_bytes_read,
        report.cache_bytes,
        report.recovery_ms
    );
    Ok(())
}
