//! A simulated block device with a volatile write cache, for crash and fault tests.
//!
//! Writes land in a volatile layer (readable at once, like a disk's cache) and reach the durable
//! image only on `flush`. `power_cut` freezes the device (later writes vanish, as in a dead
//! host), then keeps a random subset of the unflushed writes — tearing one of them at a random
//! byte — and drops the rest. Faults for mirror tests: I/O errors on reads or writes, silent
//! corruption of what is read, a dead device.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use wb_target::Device;

pub struct SimDisk {
    name: String,
    size: u64,
    inner: Mutex<Inner>,
    frozen: AtomicBool,
    pub faults: Faults,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub flushes: AtomicU64,
}

struct Inner {
    /// What the device holds including unflushed writes.
    current: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Unflushed writes, in order.
    pending: Vec<(u64, Vec<u8>)>,
}

/// Injected faults, each a probability in parts per million or a switch.
#[derive(Default)]
pub struct Faults {
    pub dead: AtomicBool,
    pub read_error_ppm: AtomicU64,
    pub write_error_ppm: AtomicU64,
    pub corrupt_read_ppm: AtomicU64,
    pub seed: AtomicU64,
    /// Reads overlapping this byte range fail (a media error), as `(start, end)`.
    pub bad_read_range: Mutex<Option<(u64, u64)>>,
}

impl Faults {
    fn roll(&self, ppm: &AtomicU64) -> bool {
        let p = ppm.load(Ordering::Relaxed);
        if p == 0 {
            return false;
        }
        // A cheap deterministic generator per device, so faults reproduce from the seed.
        let mut x = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x % 1_000_000 < p
    }
}

impl SimDisk {
    pub fn new(name: &str, size: u64) -> Arc<SimDisk> {
        Arc::new(SimDisk {
            name: name.to_string(),
            size,
            inner: Mutex::new(Inner {
                current: vec![0; size as usize],
                durable: vec![0; size as usize],
                pending: Vec::new(),
            }),
            frozen: AtomicBool::new(false),
            faults: Faults::default(),
            writes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        })
    }

    /// Everything the device holds now (including unflushed writes).
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.lock().current.clone()
    }

    /// Fills the whole device, durably, with pseudo-random bytes from `seed`.
    pub fn fill_garbage(&self, seed: u64) {
        let mut inner = self.inner.lock();
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        };
        // Whole words in a loop the compiler turns into plain stores (a slice of a run-time
        // length was a memmove call per 8 bytes: most of the fault campaign's time).
        let mut words = inner.current.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&next());
        }
        let tail = words.into_remainder();
        let n = tail.len();
        tail.copy_from_slice(&next()[..n]);
        let Inner {
            current, durable, ..
        } = &mut *inner;
        durable.copy_from_slice(current);
        inner.pending.clear();
    }

    /// Overwrites bytes directly (test set-up and corruption), durably.
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        let mut inner = self.inner.lock();
        let r = offset as usize..offset as usize + bytes.len();
        inner.current[r.clone()].copy_from_slice(bytes);
        inner.durable[r].copy_from_slice(bytes);
    }

    /// The power goes: from now on writes and flushes silently do nothing.
    pub fn freeze(&self) {
        let _inner = self.inner.lock();
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn power_cut(&self, rng: &mut impl Rng) {
        self.power_cut_atomic(rng, 1);
    }

    /// `power_cut` on a device that writes `unit` bytes atomically (a disk's sector): the torn
    /// write keeps a whole number of units, so no unit holds a mix of old and new bytes.
    pub fn power_cut_atomic(&self, rng: &mut impl Rng, unit: usize) {
        self.freeze();
        let mut inner = self.inner.lock();
        let pending = std::mem::take(&mut inner.pending);
        let torn = if pending.is_empty() {
            usize::MAX
        } else {
            rng.gen_range(0..pending.len())
        };
        let Inner {
            current, durable, ..
        } = &mut *inner;
        for (i, (offset, data)) in pending.iter().enumerate() {
            let keep = if i == torn {
                rng.gen_range(0..=data.len() / unit) * unit
            } else if rng.gen_bool(0.5) {
                data.len()
            } else {
                0
            };
            let o = *offset as usize;
            durable[o..o + keep].copy_from_slice(&data[..keep]);
        }
        // `current` differed from `durable` only where writes were pending: copy just those
        // ranges back (the devices are megabytes; a campaign cuts the power thousands of times).
        for (offset, data) in &pending {
            let r = *offset as usize..*offset as usize + data.len();
            current[r.clone()].copy_from_slice(&durable[r]);
        }
    }

    /// The power goes and the device keeps none of its unflushed writes (the worst case of
    /// `power_cut`, for tests that must not depend on luck).
    pub fn lose_unflushed(&self) {
        self.freeze();
        let mut inner = self.inner.lock();
        let pending = std::mem::take(&mut inner.pending);
        let Inner {
            current, durable, ..
        } = &mut *inner;
        for (offset, data) in &pending {
            let r = *offset as usize..*offset as usize + data.len();
            current[r.clone()].copy_from_slice(&durable[r]);
        }
    }

    /// What survives a power cut now (flushed writes only).
    pub fn durable_snapshot(&self) -> Vec<u8> {
        self.inner.lock().durable.clone()
    }

    pub fn power_on(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        if self.faults.dead.load(Ordering::Relaxed) {
            return Err(io::Error::other(format!("{}: device is dead", self.name)));
        }
        if offset + len as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: I/O beyond the end", self.name),
            ));
        }
        Ok(())
    }
}

impl Device for SimDisk {
    fn name(&self) -> &str {
        &self.name
    }
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let bad = *self.faults.bad_read_range.lock();
        if bad.is_some_and(|(start, end)| offset < end && offset + buf.len() as u64 > start) {
            return Err(io::Error::other(format!("{}: media error", self.name)));
        }
        if self.faults.roll(&self.faults.read_error_ppm) {
            return Err(io::Error::other(format!(
                "{}: injected read error",
                self.name
            )));
        }
        let inner = self.inner.lock();
        buf.copy_from_slice(&inner.current[offset as usize..offset as usize + buf.len()]);
        drop(inner);
        if !buf.is_empty() && self.faults.roll(&self.faults.corrupt_read_ppm) {
            let i = (offset as usize * 31 + buf.len()) % buf.len();
            buf[i] ^= 0x5a;
        }
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len())?;
        if self.faults.roll(&self.faults.write_error_ppm) {
            return Err(io::Error::other(format!(
                "{}: injected write error",
                self.name
            )));
        }
        // Checked under the lock: a write racing the power cut happens wholly before it or not.
        let mut inner = self.inner.lock();
        if self.frozen.load(Ordering::SeqCst) {
            return Ok(()); // the power is off: the write never happens
        }
        inner.current[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        inner.pending.push((offset, buf.to_vec()));
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check(0, 0)?;
        let mut inner = self.inner.lock();
        if self.frozen.load(Ordering::SeqCst) {
            return Ok(());
        }
        let pending = std::mem::take(&mut inner.pending);
        for (offset, data) in pending {
            let o = offset as usize;
            inner.durable[o..o + data.len()].copy_from_slice(&data);
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
