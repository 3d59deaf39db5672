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
use wb_target::{AlignedBuf, Engine, FileDevice, OpenOptions};
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
    /// Backing writes one per logged block would have taken (every block here is distinct).
    seq_unmerged: u64,
    random_unmerged: u64,
    during_fill: u64,
}

/// The image files and the sizes of one run.
struct Setup {
    cache_path: PathBuf,
    backing_path: PathBuf,
    buffer_path: PathBuf,
    seq_bytes: u64,
    random_bytes: u64,
    span_bytes: u64,
    cache_bytes: u64,
    backing_bytes: u64,
}

pub fn run(args: &WritebackArgs) -> Result<WritebackReport> {
    let setup = Setup::new(args)?;
    files::create_image(&setup.cache_path, setup.cache_bytes)?;
    files::create_image(&setup.backing_path, setup.backing_bytes)?;
    let _ = std::fs::remove_file(&setup.buffer_path);
    let same_device = std::fs::metadata(&setup.cache_path)?.dev()
        == std::fs::metadata(&setup.backing_path)?.dev();

    // 0. Allocate both files.
    write_through(&setup.cache_path, setup.cache_bytes)?;
    files::sequential_write_bandwidth(&setup.backing_path, 0, setup.backing_bytes)?;

    let engine = setup.format_and_open()?;
    let seq_blocks: Vec<u64> = (0..setup.seq_bytes / BLOCK).collect();
    let random_blocks =
        distinct_random_blocks(setup.random_bytes / BLOCK, setup.span_bytes / BLOCK);
    let mut r = Rounds::default();
    for _ in 0..args.rounds {
        r.sequential(&setup, &engine, &seq_blocks)?;
        r.random(&setup, &engine, &random_blocks)?;
    }
    let stall_ms = engine.status().stall_ms;
    engine.shutdown()?;
    drop(engine);

    if !args.keep {
        for p in [&setup.cache_path, &setup.backing_path, &setup.buffer_path] {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(r.report(&setup, args.rounds, same_device, stall_ms))
}

impl Setup {
    /// The paths and sizes `args` ask for (the folders are created), or why there is nothing to
    /// measure.
    fn new(args: &WritebackArgs) -> Result<Setup> {
        let cache_dir = args.cache_dir.as_ref().unwrap_or(&args.dir);
        for dir in [&args.dir, cache_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
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
        Ok(Setup {
            cache_path: cache_dir.join("wbbench-wb-cache.img"),
            backing_path: args.dir.join("wbbench-wb-backing.img"),
            buffer_path: args.dir.join("wbbench-wb.buf"),
            seq_bytes,
            random_bytes,
            span_bytes,
            cache_bytes: logfmt::SEGMENT_AREA_OFFSET
                + segments.max(logfmt::MIN_SEGMENTS) * logfmt::SEGMENT_SIZE_BYTES as u64,
            backing_bytes: seq_bytes.max(span_bytes),
        })
    }

    /// Formats the cache file for the backing file and opens an engine on them, writeback held
    /// off.
    fn format_and_open(&self) -> Result<Engine> {
        files::format_single_leg(&self.cache_path, &self.backing_path)?;
        let backing = FileDevice::open(&self.backing_path)?;
        let identity = backing.identity();
        let mut options = OpenOptions::new(self.buffer_path.clone());
        options.writeback = Some(held_off());
        options.sync_interval = Duration::from_secs(3600);
        Ok(wb_target::open(
            vec![Arc::new(FileDevice::open(&self.cache_path)?)],
            Arc::new(backing),
            &identity,
            options,
        )?)
    }
}

impl Rounds {
    /// 1-3 of a round: the backing file's sequential write rate, the cache file's read rate, the
    /// copy bound, then a drain of `blocks` written in order.
    fn sequential(&mut self, setup: &Setup, engine: &Engine, blocks: &[u64]) -> Result<()> {
        self.seq_limit.push(files::sequential_write_bandwidth(
            &setup.backing_path,
            0,
            setup.seq_bytes,
        )?);
        self.read_limit.push(files::sequential_read_bandwidth(
            &setup.cache_path,
            logfmt::SEGMENT_AREA_OFFSET,
            setup.seq_bytes,
            writeback::READS_IN_FLIGHT,
        )?);
        self.copy_limit.push(copy_bandwidth(
            &setup.cache_path,
            logfmt::SEGMENT_AREA_OFFSET,
            &setup.backing_path,
            setup.seq_bytes,
        )?);
        engine.set_policy(held_off());
        self.during_fill += fill(engine, blocks)?;
        let seq = drain(engine)?;
        verify_sample(&setup.backing_path, blocks)?;
        self.seq_drain.push(seq.rate());
        self.seq_ios += seq.ios;
        self.seq_unmerged += blocks.len() as u64;
        Ok(())
    }

    /// 4-5 of a round: the backing file takes the random writes `blocks` directly, then a drain
    /// of the same writes.
    fn random(&mut self, setup: &Setup, engine: &Engine, blocks: &[u64]) -> Result<()> {
        self.random_limit
            .push(files::random_write_bandwidth(&setup.backing_path, blocks)?);
        engine.set_policy(held_off());
        self.during_fill += fill(engine, blocks)?;
        let random = drain(engine)?;
        verify_sample(&setup.backing_path, blocks)?;
        self.random_drain.push(random.rate());
        self.random_ios += random.ios;
        self.random_unmerged += blocks.len() as u64;
        Ok(())
    }

    /// The figures: medians over the rounds, and ratios taken round by round.
    fn report(
        &self,
        setup: &Setup,
        rounds: usize,
        same_device: bool,
        stall_ms: u64,
    ) -> WritebackReport {
        let ratios =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
        let seq_ratios = ratios(&self.seq_drain, &self.seq_limit);
        let copy_ratios = ratios(&self.seq_drain, &self.copy_limit);
        let random_ratios = ratios(&self.random_drain, &self.random_limit);
        let (seq_unmerged, random_unmerged) = (self.seq_unmerged, self.random_unmerged);
        WritebackReport {
            backing_seq_limit_mib_s: files::mib_per_sec(median(&self.seq_limit)),
            copy_limit_mib_s: files::mib_per_sec(median(&self.copy_limit)),
            cache_read_limit_mib_s: files::mib_per_sec(median(&self.read_limit)),
            drain_ratio_seq_bound: median(&ratios(&self.read_limit, &self.seq_limit)).min(1.0),
            drain_seq_mib_s: files::mib_per_sec(median(&self.seq_drain)),
            drain_ratio_seq: median(&seq_ratios),
            drain_vs_copy_seq: median(&copy_ratios),
            backing_random_4k_mib_s: files::mib_per_sec(median(&self.random_limit)),
            drain_random_mib_s: files::mib_per_sec(median(&self.random_drain)),
            drain_ratio_random: median(&random_ratios),
            io_reduction: (seq_unmerged + random_unmerged) as f64
                / (self.seq_ios + self.random_ios).max(1) as f64,
            io_reduction_seq: seq_unmerged as f64 / self.seq_ios.max(1) as f64,
            io_reduction_random: random_unmerged as f64 / self.random_ios.max(1) as f64,
            backing_ios_unmerged: seq_unmerged + random_unmerged,
            backing_ios_merged: self.seq_ios + self.random_ios,
            seq_bytes: setup.seq_bytes,
            random_bytes: setup.random_bytes,
            rounds,
            drain_ratio_seq_rounds: seq_ratios,
            drain_vs_copy_seq_rounds: copy_ratios,
            drain_ratio_random_rounds: random_ratios,
            same_device,
            written_back_during_fill_bytes: self.during_fill,
            stall_ms,
        }
    }
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
    println!(
        "(medians of {} rounds; cache and backing files {})",
        report.rounds,
        if report.same_device {
            "on one device"
        } else {
            "on two devices"
        }
    );
    print_sequential(report);
    print_random(report);
    if report.written_back_during_fill_bytes > 0 {
        println!(
            "note: {} MiB were written back while filling (writers waited for space)",
            report.written_back_during_fill_bytes >> 20
        );
    }
    Ok(())
}

/// Per-round figures, as the table shows them.
fn rounds(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The limits, then the drain of sequentially written data against them.
fn print_sequential(report: &WritebackReport) {
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
}

/// Random writes: the backing file's rate, the drain's, and the I/Os merging saved.
fn print_random(report: &WritebackReport) {
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
}
