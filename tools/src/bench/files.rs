//! What the benchmarks share: image files, the physical limits they are measured against
//! (sequential 512 KiB and random 4 KiB O_DIRECT writes on the same files, in the same run), and a
//! device wrapper that counts bytes read.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use wb_target::{AlignedBuf, Device, FileDevice, FormatOptions};

/// Formats the image at `cache` as a one-leg cache set for the image at `backing` (4 KiB blocks,
/// over whatever was there: benchmark images only).
pub fn format_single_leg(cache: &Path, backing: &Path) -> Result<()> {
    let cache: Arc<dyn Device> = Arc::new(FileDevice::open(cache)?);
    let backing = FileDevice::open(backing)?;
    wb_target::format(
        &[cache],
        &backing,
        &backing.identity(),
        &FormatOptions {
            logical_block_size: 4096,
            force: true,
        },
    )?;
    Ok(())
}

/// Creates (or truncates) a sparse file of `bytes`.
pub fn create_image(path: &Path, bytes: u64) -> Result<()> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("sizing {}", path.display()))?;
    Ok(())
}

/// Bandwidth (bytes/s) of `bytes` written to `path` from `offset` in sequential 512 KiB
/// O_DIRECT writes, one at a time, then fdatasync: the limit the log writer works against.
pub fn sequential_write_bandwidth(path: &Path, offset: u64, bytes: u64) -> Result<f64> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let mut buf = AlignedBuf::new(logfmt::SEGMENT_SIZE_BYTES);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let started = Instant::now();
    let mut done = 0;
    while done < bytes {
        file.write_all_at(&buf, offset + done)?;
        done += buf.len() as u64;
    }
    file.sync_data()?;
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Bandwidth (bytes/s) of reading `bytes` of `path` from `offset` in 512 KiB O_DIRECT reads,
/// `threads` at a time (thread `t` reads every `threads`-th chunk), as writeback reads the log.
pub fn sequential_read_bandwidth(
    path: &Path,
    offset: u64,
    bytes: u64,
    threads: usize,
) -> Result<f64> {
    let file = open_direct(path, false)?;
    let chunk = logfmt::SEGMENT_SIZE_BYTES as u64;
    let chunks = bytes.div_ceil(chunk);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let readers: Vec<_> = (0..threads as u64)
            .map(|t| {
                let file = &file;
                scope.spawn(move || -> Result<()> {
                    let mut buf = AlignedBuf::new(chunk as usize);
                    for i in (t..chunks).step_by(threads) {
                        file.read_exact_at(&mut buf, offset + i * chunk)?;
                    }
                    Ok(())
                })
            })
            .collect();
        readers
            .into_iter()
            .try_for_each(|r| r.join().expect("reader"))
    })?;
    Ok((chunks * chunk) as f64 / started.elapsed().as_secs_f64())
}

/// Bandwidth (bytes/s) of 4 KiB O_DIRECT writes at `blocks` (in that order), then fdatasync.
pub fn random_write_bandwidth(path: &Path, blocks: &[u64]) -> Result<f64> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
    let buf = AlignedBuf::new(logfmt::BLOCK_SIZE_BYTES);
    let started = Instant::now();
    for &b in blocks {
        file.write_all_at(&buf, b * logfmt::BLOCK_SIZE_BYTES as u64)?;
    }
    file.sync_data()?;
    Ok((blocks.len() * logfmt::BLOCK_SIZE_BYTES) as f64 / started.elapsed().as_secs_f64())
}

/// Opens with O_DIRECT, or buffered where the filesystem refuses it (tmpfs), as the engine does.
pub fn open_direct(path: &Path, write: bool) -> Result<std::fs::File> {
    let mut options = OpenOptions::new();
    options.read(!write).write(write);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => options.open(path),
        other => other,
    }
    .with_context(|| format!("opening {}", path.display()))
}

/// A device that counts the bytes read through it.
pub struct CountingDevice {
    pub inner: Arc<dyn Device>,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl CountingDevice {
    pub fn new(inner: Arc<dyn Device>) -> Arc<CountingDevice> {
        Arc::new(CountingDevice {
            inner,
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }
}

impl Device for CountingDevice {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> std::io::Result<()> {
        self.inner.zero_range(offset, len, discard)
    }
}

/// A small xorshift generator: benchmarks need speed and repeatability, not quality.
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

pub fn mib_per_sec(bytes_per_sec: f64) -> f64 {
    bytes_per_sec / (1u64 << 20) as f64
}
