//! The cache legs: one or two devices (a mirror) holding the same log. Writes go to every healthy
//! leg; reads come from the first healthy leg that answers, and fall back to the other.
//!
//! Invariants:
//! - a leg that failed is never read again until it is replaced, because it may miss segments
//!   the other leg has — not in this run, and not after a restart (the failure is recorded, see
//!   `faults`);
//! - a failure belongs to the device that failed: an I/O issued to a leg's old device that fails
//!   after `replace` installed the new one does not fail the new one (`generation`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::device::Device;

pub struct Leg {
    /// Swapped only by `replace`, while the leg is failed and nothing is in flight to it.
    device: RwLock<Arc<dyn Device>>,
    pub index: usize,
    failed: AtomicBool,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    /// Blocks rewritten on this leg from the other one after a read error or bad checksum.
    pub repairs: AtomicU64,
    /// Read I/O errors in a row: a leg that answers no read at all is dead even if nothing
    /// was written to it since (a full cache writes nothing until writeback frees space).
    consecutive_read_errors: AtomicU64,
    /// Bumped by `replace`: which device an I/O was issued to.
    generation: AtomicU64,
    /// The newest segment id this leg's writer has handled (written, or skipped while the leg
    /// is failed): `replace` waits until it has handled every sealed segment, so that no write
    /// of a segment from before the swap lands on the new device.
    pub(crate) handled_id: AtomicU64,
}

impl Leg {
    pub fn device(&self) -> Arc<dyn Device> {
        self.device.read().clone()
    }

    /// The device and its generation, for an I/O whose failure is reported with `failed_at`.
    pub(crate) fn device_for_io(&self) -> (Arc<dyn Device>, u64) {
        let device = self.device.read();
        (device.clone(), self.generation.load(Ordering::Acquire))
    }

    /// Puts a new device in place of the old one (a failed leg, or the last healthy one of a
    /// clean cache in passthrough) and brings the leg back.
    pub(crate) fn replace(&self, device: Arc<dyn Device>) {
        let mut slot = self.device.write();
        *slot = device;
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(slot);
        // The counters describe the device (status shows them next to its path): the new one
        // starts with none of the old one's errors.
        self.read_errors.store(0, Ordering::Relaxed);
        self.write_errors.store(0, Ordering::Relaxed);
        self.repairs.store(0, Ordering::Relaxed);
        self.failed.store(false, Ordering::Release);
    }

    /// Bumped by every `replace`: two replaces of one leg tell that the other came first.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    /// Counts a read I/O error of the device of `generation`; too many in a row take the leg out
    /// of use.
    pub(crate) fn note_read_error(&self, generation: u64, e: &io::Error) {
        if generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        self.read_errors.fetch_add(1, Ordering::Relaxed);
        let in_a_row = self.consecutive_read_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= MAX_CONSECUTIVE_READ_ERRORS {
            self.mark_failed(e);
        }
    }

    /// A write or flush to the device of `generation` failed: counted, and the leg taken out of
    /// use — unless the device was replaced since (the error is the old device's).
    pub(crate) fn write_failed(&self, generation: u64, e: &io::Error) {
        // Under the device lock: `replace` cannot swap in between the check and the mark.
        let device = self.device.read();
        if generation != self.generation.load(Ordering::Acquire) {
            log::warn!(
                "cache leg {}: a late error of the replaced device ignored: {e}",
                self.index
            );
            return;
        }
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        self.mark_failed_with(&device, e);
    }

    pub fn note_read_ok(&self) {
        self.consecutive_read_errors.store(0, Ordering::Relaxed);
    }

    pub fn mark_failed(&self, why: &io::Error) {
        let device = self.device.read();
        self.mark_failed_with(&device, why);
    }

    fn mark_failed_with(&self, device: &Arc<dyn Device>, why: &io::Error) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "cache leg {} ({}) failed: {why}; it is no longer used, and not after a restart \
                 either, until it is replaced (`wbctl replace`)",
                self.index,
                device.name()
            );
        }
    }
}

/// A predicate a read's bytes must pass (a checksum).
pub type BytesCheck<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// A leg whose reads fail this many times in a row is taken out of use.
const MAX_CONSECUTIVE_READ_ERRORS: u64 = 8;

/// Granularity at which reads of a block alternate between the legs; reads of more than a
/// block (writeback reading whole segments) alternate per segment.
const BLOCK_SPREAD_BYTES: u64 = 4096;

pub struct CacheLegs {
    legs: Vec<Leg>,
}

impl CacheLegs {
    pub fn new(devices: Vec<Arc<dyn Device>>) -> CacheLegs {
        assert!(!devices.is_empty() && devices.len() <= 2);
        CacheLegs {
            legs: devices
                .into_iter()
                .enumerate()
                .map(|(index, device)| Leg {
                    device: RwLock::new(device),
                    index,
                    failed: AtomicBool::new(false),
                    read_errors: AtomicU64::new(0),
                    write_errors: AtomicU64::new(0),
                    repairs: AtomicU64::new(0),
                    consecutive_read_errors: AtomicU64::new(0),
                    generation: AtomicU64::new(0),
                    handled_id: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    pub fn all(&self) -> &[Leg] {
        &self.legs
    }

    pub fn healthy_count(&self) -> usize {
        self.legs.iter().filter(|l| l.is_healthy()).count()
    }

    /// Bit `i` set: leg `i` is out of use (the fault record's `failed_legs`).
    pub fn failed_mask(&self) -> u32 {
        self.legs
            .iter()
            .filter(|l| !l.is_healthy())
            .fold(0, |mask, l| mask | 1 << l.index)
    }

    fn no_leg_left() -> io::Error {
        io::Error::other("every cache leg has failed")
    }

    /// Writes to every healthy leg; succeeds if at least one leg took the write.
    pub fn write_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.for_each_healthy(|device| device.write_at(buf, offset))
    }

    /// Flushes every healthy leg; succeeds if at least one leg is still healthy afterwards.
    pub fn flush_all(&self) -> io::Result<()> {
        self.for_each_healthy(|device| device.flush())
    }

    /// Writes to every healthy leg and flushes it (a checkpoint); succeeds if at least one leg
    /// has it durably.
    pub fn write_durably_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.for_each_healthy(|device| {
            device.write_at(buf, offset)?;
            device.flush()
        })
    }

    /// Runs `op` on every healthy leg, the legs side by side (the caller waits for the slowest
    /// leg, not for each in turn); a leg whose `op` fails is taken out of use.
    fn for_each_healthy(
        &self,
        op: impl Fn(&dyn Device) -> io::Result<()> + Sync,
    ) -> io::Result<()> {
        let healthy: Vec<(&Leg, Arc<dyn Device>, u64)> = self
            .legs
            .iter()
            .filter(|l| l.is_healthy())
            .map(|l| {
                let (device, generation) = l.device_for_io();
                (l, device, generation)
            })
            .collect();
        let results: Vec<io::Result<()>> = match &healthy[..] {
            [] => Vec::new(),
            [(_, device, _)] => vec![op(device.as_ref())],
            _ => std::thread::scope(|scope| {
                let op = &op;
                let handles: Vec<_> = healthy
                    .iter()
                    .map(|(_, device, _)| scope.spawn(move || op(device.as_ref())))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("leg I/O thread"))
                    .collect()
            }),
        };
        let mut ok = 0;
        for ((leg, _, generation), result) in healthy.into_iter().zip(results) {
            match result {
                Ok(()) => ok += 1,
                Err(e) => leg.write_failed(generation, &e),
            }
        }
        if ok == 0 {
            return Err(Self::no_leg_left());
        }
        Ok(())
    }

    /// Reads from the first healthy leg that answers and whose bytes pass `check` (when given); a
    /// leg that errors or fails the check is counted, the next one is tried, and once a good copy
    /// is found it is written back over the bad one (mirror repair). `buf` must be aligned for
    /// direct I/O.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        check: Option<&BytesCheck<'_>>,
    ) -> io::Result<()> {
        let mut last_error = Self::no_leg_left();
        let mut bad_legs: Vec<(&Leg, Arc<dyn Device>, u64)> = Vec::new();
        // Spread reads over the legs by address, so both serve reads (and a leg that returns
        // bad data is found by reads, not only when the other one fails).
        let spread = if buf.len() as u64 > BLOCK_SPREAD_BYTES {
            logfmt::SEGMENT_SIZE_BYTES as u64
        } else {
            BLOCK_SPREAD_BYTES
        };
        let first = (offset / spread) as usize % self.legs.len();
        let order = self.legs[first..].iter().chain(&self.legs[..first]);
        for leg in order.filter(|l| l.is_healthy()) {
            let (device, generation) = leg.device_for_io();
            match device.read_at(buf, offset) {
                Ok(()) if check.is_none_or(|c| c(buf)) => {
                    leg.note_read_ok();
                    for (bad, device, generation) in bad_legs {
                        Self::repair(bad, device.as_ref(), generation, buf, offset);
                    }
                    return Ok(());
                }
                Ok(()) => {
                    leg.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("checksum mismatch on {}", device.name()),
                    );
                    bad_legs.push((leg, device, generation));
                }
                Err(e) => {
                    leg.note_read_error(generation, &e);
                    last_error = e;
                    bad_legs.push((leg, device, generation));
                }
            }
        }
        Err(last_error)
    }

    fn repair(leg: &Leg, device: &dyn Device, generation: u64, good: &[u8], offset: u64) {
        match device.write_at(good, offset) {
            Ok(()) => {
                leg.repairs.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "cache leg {}: repaired {} bytes at {offset} from the other leg",
                    device.name(),
                    good.len()
                );
            }
            Err(e) => leg.write_failed(generation, &e),
        }
    }
}
