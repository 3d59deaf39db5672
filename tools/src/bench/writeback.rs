//! `wbbench writeback`: how fast writeback drains the cache, against what the backing file itself
//! can take, every figure from the same run on the same files.
//!
//! 0. both files are written once end to end, so that file-block allocation is paid by neither
//!    the limits nor the drains.
//!
//! Then, in each of `--rounds` rounds (the figures are the medians; each round's ratio compares
//! measurements taken moments apart, which keeps drift of a shared machine out of the ratios):
//!
//! 1. limit (sequential): the backing file's own sequential 512 KiB O_DIRECT write rate over the
//!    region the drain will write;
//! 2. copy bound: the cache file copied onto that region of the backing file (512 KiB O_DIRECT
//!    reads and writes, overlapped). Writeback must read every byte it writes from the cache, so
//!    when both files share one device this, not (1), is what a drain can at best reach; and
//!    the cache file's own read rate (512 KiB O_DIRECT reads, as many at a time as writeback
//!    issues): a drain can never be faster than the cache can be read;
//! 3. the engine takes the region as sequential 4 KiB writes with writeback held off (a policy
//!    that never fires: not idle-aware, watermark 100 %, pressure from 99 %, no age limit), then
//!    the default policy is restored and `drain()` is timed → `drain_ratio_seq` (against 1) and
//!    `drain_vs_copy_seq` (against 2);
//! 4. limit (random): the backing file takes random 4 KiB O_DIRECT writes directly (distinct
//!    blocks over a wide span, one at a time, then fdatasync);
//! 5. the engine takes the same 4 KiB writes (same offsets, same order), held off again, and the
//!    drain is timed → `drain_ratio_random`.
//!
//! And `io_reduction`: backing write I/Os one per logged block (what writeback without merging
//! would issue: every write of this benchmark is a distinct block, so one entry each) over the
//! backing write I/Os the drains actually issued (`EngineStatus::backing_write_ios`).
//!
//! Drain rates count the bytes the drain wrote to the backing device over the time `drain()`
//! took (it returns once the last checkpoint is on the cache), so per-batch flushes and
//! checkpoints are paid inside the figure.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use wb_target::{AlignedBuf, Engine, FileDevice, FormatOptions, OpenOptions};
use writeback::Policy;

use super::files::{self, Xorshift};

#[derive(clap::Args, Debug)]
pub struct WritebackArgs {
    /// Folder for the image files (on the device under test).
    #[arg(long)]
    pub dir: PathBuf,
    /// Folder for the cache file, if not `--dir` (a cache SSD apart from the backing device).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Dirty data written as sequential 4 KiB writes, in MiB (per round).
    #[arg(long, default_value_t = 1024)]
    pub seq_mib: u64,
    /// Dirty data written as random 4 KiB writes, in MiB (per round).
    #[arg(long, default_value_t = 256)]
    pub random_mib: u64,
    /// Span of the backing file the random writes are spread over, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub random_span_mib: u64,
    /// Rounds of every measurement; the figures are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Keep the image files afterwards.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Serialize, Debug)]
pub struct WritebackReport {
    pub backing_seq_limit_mib_s: f64,
    pub copy_limit_mib_s: f64,
    /// The cache file's sequential read rate: what any drain is bounded by, on any device.
    pub cache_read_limit_mib_s: f64,
    /// What the drain ratio can at best be here: min(1, cache read rate / backing write rate).
    pub drain_ratio_seq_bound: f64,
    pub drain_seq_mib_s: f64,
    /// Drain rate of sequentially written data / the backing file's sequential write rate.
    pub drain_ratio_seq: f64,
    /// Drain rate of sequentially written data / the cache-to-backing copy rate.
    pub drain_vs_copy_seq: f64,
    pub backing_random_4k_mib_s: f64,
    pub drain_random_mib_s: f64,
    /// Drain rate of randomly written data / the backing file taking the same writes directly.
    pub drain_ratio_random: f64,
    /// Backing write I/Os without merging / with merging, all drains together.
    pub io_reduction: f64,
    pub io_reduction_seq: f64,
    pub io_reduction_random: f64,
    pub backing_ios_unmerged: u64,
    pub backing_ios_merged: u64,
    pub seq_bytes: u64,
    pub random_bytes: u64,
    pub rounds: usize,
    pub drain_ratio_seq_rounds: Vec<f64>,
    pub drain_vs_copy_seq_rounds: Vec<f64>,
    pub drain_ratio_random_rounds: Vec<f64>,
    /// The cache and backing files are on one device (they share its bandwidth).
    pub same_device: bool,
    /// Written back while the cache was being filled (should be 0: writeback held off).
    pub written_back_during_fill_bytes: u64,
    pub stall_ms: u64,
}

/// Writeback held off: nothing in the policy fires at the fill levels used here. (Writers that
/// wait for space or a drain still get full speed.)
pub fn held_off() -> Policy {
    Policy {
        idle_aware: false,
        low_watermark: 1.0,
        pressure_start: 0.99,
        pressure_full: 1.0,
        age_threshold: Duration::from_secs(1 << 30),
        ..Policy::default()
    }
}

const BLOCK: u64 = logfmt::BLOCK_SIZE_BYTES as u64;

struct Drain {
    bytes: u64,
    ios: u64,
    elapsed: Duration,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Default)]
struct Rounds {
    seq_limit: Vec<f64>,
    copy_limit: Vec<f64>,
    read_limit: Vec<f64>,
    seq_drain: Vec<f64>,
    random_limit: Vec<f64>,
    random_drain: Vec<f64>,
    seq_ios: u64,
    random_ios: u64,
    during_fill: u64,
}

pub fn run(args: &WritebackArgs) -> Result<WritebackReport> {
    let cache_dir = args.cache_dir.as_ref().unwrap_or(&args.dir);
    for dir in [&args.dir, cache_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cache_path = cache_dir.join("wbbench-wb-cache.img");
    let backing_path = args.dir.join("wbbench-wb-backing.img");
    let buffer_path = args.dir.join("wbbench-wb.buf");
    let seq_bytes = (args.seq_mib << 20).next_multiple_of(BLOCK);
    let random_bytes = (args.random_mib << 20).next_multiple_of(BLOCK);
    let span_bytes = (args.random_span_mib << 20).next_multiple_of(BLOCK);
    ensure!(
        seq_bytes > 0 && random_bytes > 0 && args.rounds > 0,
        "nothing to measure"
    );
    ensure!(
        random_bytes <= span_bytes / 2,
        "--random-span-mib must be at least twice --random-mib (distinct random blocks)"
    );
    // The cache holds the larger fill below the held-off policy's 99 % with room to spare.
    let data_per_segment = logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * BLOCK;
    let segments = seq_bytes.max(random_bytes).div_ceil(data_per_segment) * 10 / 8 + 64;
    let cache_bytes = logfmt::SEGMENT_AREA_OFFSET
        + segments.max(logfmt::MIN_SEGMENTS) * logfmt::SEGMENT_SIZE_BYTES as u64;
    let backing_bytes = seq_bytes.max(span_bytes);
    files::create_image(&cache_path, cache_bytes)?;
    files::create_image(&backing_path, backing_bytes)?;
    let _ = std::fs::remove_file(&buffer_path);
    let same_device =
        std::fs::metadata(&cache_path)?.dev() == std::fs::metadata(&backing_path)?.dev();

    // 0. Allocate both files.
    write_through(&cache_path, cache_bytes)?;
    files::sequential_write_bandwidth(&backing_path, 0, backing_bytes)?;

    {
        let cache = FileDevice::open(&cache_path)?;
        let backing = FileDevice::open(&backing_path)?;
        wb_target::format(
            &[Arc::new(cache)],
            &backing,
            &backing.identity(),
            &FormatOptions {
                logical_block_size: 4096,
                force: true,
            },
        )?;
    }
    let engine = {
        let backing = FileDevice::open(&backing_path)?;
        let identity = backing.identity();
        let mut options = OpenOptions::new(buffer_path.clone());
        options.writeback = Some(held_off());
        options.sync_interval = Duration::from_secs(3600);
        wb_target::open(
            vec![Arc::new(FileDevice::open(&cache_path)?)],
            Arc::new(backing),
            &identity,
            options,
        )?
    };

    let seq_blocks: Vec<u64> = (0..seq_bytes / BLOCK).collect();
    let random_blocks = distinct_random_blocks(random_bytes / BLOCK, span_bytes / BLOCK);
    let mut r = Rounds::default();
    for _ in 0..args.rounds {
        // 1-3. Sequential.
        r.seq_limit.push(files::sequential_write_bandwidth(
            &backing_path,
            0,
            seq_bytes,
        )?);
        r.read_limit.push(files::sequential_read_bandwidth(
            &cache_path,
            logfmt::SEGMENT_AREA_OFFSET,
            seq_bytes,
            writeback::READS_IN_FLIGHT,
        )?);
        r.copy_limit.push(copy_bandwidth(
            &cache_path,
            logfmt::SEGMENT_AREA_OFFSET,
            &backing_path,
            seq_bytes,
        )?);
        engine.set_policy(held_off());
        r.during_fill += fill(&engine, &seq_blocks)?;
        let seq = drain(&engine)?;
        verify_sample(&backing_path, &seq_blocks)?;
        r.seq_drain.push(seq.rate());
        r.seq_ios += seq.ios;

        // 4-5. Random.
        r.random_limit.push(files::random_write_bandwidth(
            &backing_path,
            &random_blocks,
        )?);
        engine.set_policy(held_off());
        r.during_fill += fill(&engine, &random_blocks)?;
        let random = drain(&engine)?;
        verify_sample(&backing_path, &random_blocks)?;
        r.random_drain.push(random.rate());
        r.random_ios += random.ios;
    }
    let stall_ms = engine.status().stall_ms;
    engine.shutdown()?;
    drop(engine);

    if !args.keep {
        for p in [&cache_path, &backing_path, &buffer_path] {
            let _ = std::fs::remove_file(p);
        }
    }
    let ratios =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let seq_ratios = ratios(&r.seq_drain, &r.seq_limit);
    let copy_ratios = ratios(&r.seq_drain, &r.copy_limit);
    let random_ratios = ratios(&r.random_drain, &r.random_limit);
    let rounds = args.rounds as u64;
    let (seq_unmerged, random_unmerged) = (
        rounds * seq_blocks.len() as u64,
        rounds * random_blocks.len() as u64,
    );
    Ok(WritebackReport {
        backing_seq_limit_mib_s: files::mib_per_sec(median(&r.seq_limit)),
        copy_limit_mib_s: files::mib_per_sec(median(&r.copy_limit)),
        cache_read_limit_mib_s: files::mib_per_sec(median(&r.read_limit)),
        drain_ratio_seq_bound: median(&ratios(&r.read_limit, &r.seq_limit)).min(1.0),
        drain_seq_mib_s: files::mib_per_sec(median(&r.seq_drain)),
        drain_ratio_seq: median(&seq_ratios),
        drain_vs_copy_seq: median(&copy_ratios),
        backing_random_4k_mib_s: files::mib_per_sec(median(&r.random_limit)),
        drain_random_mib_s: files::mib_per_sec(median(&r.random_drain)),
        drain_ratio_random: median(&random_ratios),
        io_reduction: (seq_unmerged + random_unmerged) as f64
            / (r.seq_ios + r.random_ios).max(1) as f64,
        io_reduction_seq: seq_unmerged as f64 / r.seq_ios.max(1) as f64,
        io_reduction_random: random_unmerged as f64 / r.random_ios.max(1) as f64,
        backing_ios_unmerged: seq_unmerged + random_unmerged,
        backing_ios_merged: r.seq_ios + r.random_ios,
        seq_bytes,
        random_bytes,
        rounds: args.rounds,
        drain_ratio_seq_rounds: seq_ratios,
        drain_vs_copy_seq_rounds: copy_ratios,
        drain_ratio_random_rounds: random_ratios,
        same_device,
        written_back_during_fill_bytes: r.during_fill,
        stall_ms,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One 4 KiB write per block, in order, then a FLUSH. Returns the bytes written back meanwhile.
fn fill(engine: &Engine, blocks: &[u64]) -> Result<u64> {
    let before = engine.status().written_back_bytes;
    let mut data = vec![0u8; BLOCK as usize];
    for (i, &b) in blocks.iter().enumerate() {
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        engine.write(b * BLOCK, &data, false)?;
    }
    engine.flush()?;
    Ok(engine.status().written_back_bytes - before)
}

/// Checks a sample of the drained blocks on the backing file: block `blocks[i]` holds `i` (what
/// `fill` wrote), so a fast but wrong drain does not pass for a result.
fn verify_sample(backing: &Path, blocks: &[u64]) -> Result<()> {
    let file = files::open_direct(backing, false)?;
    let mut buf = AlignedBuf::new(BLOCK as usize);
    let step = (blocks.len() / 512).max(1);
    for (i, &b) in blocks.iter().enumerate().step_by(step) {
        file.read_exact_at(&mut buf, b * BLOCK)?;
        let mut expected = [0u8; BLOCK as usize];
        expected[..8].copy_from_slice(&(i as u64).to_le_bytes());
        ensure!(
            buf[..] == expected[..],
            "after the drain, block {b} of the backing file does not hold what was written"
        );
    }
    Ok(())
}

/// Restores the default policy and times a drain to a clean cache.
fn drain(engine: &Engine) -> Result<Drain> {
    let before = engine.status();
    let started = Instant::now();
    engine.set_policy(Policy::default());
    engine.drain(Duration::from_millis(1), |_| {})?;
    let elapsed = started.elapsed();
    let after = engine.status();
    ensure!(
        after.dirty_bytes == 0,
        "the cache is not clean after the drain"
    );
    Ok(Drain {
        bytes: after.written_back_bytes - before.written_back_bytes,
        ios: after.backing_write_ios - before.backing_write_ios,
        elapsed,
    })
}

/// Bandwidth (bytes/s) of copying `bytes` from `src` (at `src_offset`) to the start of `dst` in
/// 512 KiB O_DIRECT reads and writes, reading the next chunk while the last is written, then
/// fdatasync: what any writeback of that data can at best do when it shares the devices.
fn copy_bandwidth(src: &Path, src_offset: u64, dst: &Path, bytes: u64) -> Result<f64> {
    let (src, dst) = (
        files::open_direct(src, false)?,
        files::open_direct(dst, true)?,
    );
    let chunk = logfmt::SEGMENT_SIZE_BYTES as u64;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, AlignedBuf)>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<AlignedBuf>();
    for _ in 0..3 {
        empty_tx.send(AlignedBuf::new(chunk as usize))?;
    }
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let reader = scope.spawn(move || -> Result<()> {
            let mut done = 0;
            while done < bytes {
                let mut buf = empty_rx.recv()?;
                src.read_exact_at(&mut buf, src_offset + done)?;
                full_tx.send((done, buf))?;
                done += chunk;
            }
            Ok(())
        });
        for (at, buf) in full_rx {
            dst.write_all_at(&buf, at)?;
            let _ = empty_tx.send(buf);
        }
        reader.join().expect("copy reader")
    })?;
    dst.sync_data()?;
    Ok(bytes.next_multiple_of(chunk) as f64 / started.elapsed().as_secs_f64())
}

/// Writes the whole file once (allocating its blocks), then fdatasync.
fn write_through(path: &Path, bytes: u64) -> Result<()> {
    let file = files::open_direct(path, true)?;
    let buf = AlignedBuf::new(logfmt::SEGMENT_SIZE_BYTES);
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(buf.len() as u64) as usize;
        file.write_all_at(&buf[..n], done)?;
        done += n as u64;
    }
    file.sync_data()?;
    Ok(())
}

/// `count` distinct blocks below `span`, in random order.
fn distinct_random_blocks(count: u64, span: u64) -> Vec<u64> {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut taken = vec![false; span as usize];
    let mut blocks = Vec::with_capacity(count as usize);
    while (blocks.len() as u64) < count {
        let b = rng.below(span);
        if !std::mem::replace(&mut taken[b as usize], true) {
            blocks.push(b);
        }
    }
    blocks
}

pub fn print(report: &WritebackReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "(medians of {} rounds; cache and backing files {})",
        report.rounds,
        if report.same_device {
            "on one device"
        } else {
            "on two devices"
        }
    );
    println!(
        "backing sequential 512 KiB limit : {:>10.1} MiB/s",
        report.backing_seq_limit_mib_s
    );
    println!(
        "cache sequential read rate       : {:>10.1} MiB/s",
        report.cache_read_limit_mib_s
    );
    println!(
        "cache → backing copy bound       : {:>10.1} MiB/s",
        report.copy_limit_mib_s
    );
    println!(
        "drain of sequential 4 KiB writes : {:>10.1} MiB/s ({} MiB a round)",
        report.drain_seq_mib_s,
        report.seq_bytes >> 20
    );
    println!(
        "drain_ratio_seq                  : {:>10.3}  (goal ≥ 0.80; rounds {})",
        report.drain_ratio_seq,
        rounds(&report.drain_ratio_seq_rounds)
    );
    println!(
        "drain_ratio_seq at best here     : {:>10.3}  (cache read rate / backing write rate)",
        report.drain_ratio_seq_bound
    );
    println!(
        "drain_vs_copy_seq                : {:>10.3}  (rounds {})",
        report.drain_vs_copy_seq,
        rounds(&report.drain_vs_copy_seq_rounds)
    );
    println!(
        "backing random 4 KiB writes      : {:>10.1} MiB/s",
        report.backing_random_4k_mib_s
    );
    println!(
        "drain of random 4 KiB writes     : {:>10.1} MiB/s ({} MiB a round)",
        report.drain_random_mib_s,
        report.random_bytes >> 20
    );
    println!(
        "drain_ratio_random               : {:>10.3}  (goal ≥ 0.90; rounds {})",
        report.drain_ratio_random,
        rounds(&report.drain_ratio_random_rounds)
    );
    println!(
        "io_reduction                     : {:>10.1}  ({} unmerged / {} merged; seq {:.1}, random {:.2})",
        report.io_reduction,
        report.backing_ios_unmerged,
        report.backing_ios_merged,
        report.io_reduction_seq,
        report.io_reduction_random
    );
    if report.written_back_during_fill_bytes > 0 {
        println!(
            "note: {} MiB were written back while filling (writers waited for space)",
            report.written_back_during_fill_bytes >> 20
        );
    }
    Ok(())
}
