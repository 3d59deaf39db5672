//! The cache legs: one or two devices (a mirror) holding the same log. Writes go to every healthy
//! leg; reads come from the first healthy leg that answers, and fall back to the other.
//!
//! Invariant: a leg that failed a write is never read again until it is replaced, because it may
//! miss segments the other leg has.

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
}

impl Leg {
    pub fn device(&self) -> Arc<dyn Device> {
        self.device.read().clone()
    }

    /// Puts a new device in place of a failed one and brings the leg back.
    pub(crate) fn replace(&self, device: Arc<dyn Device>) {
        assert!(!self.is_healthy(), "only a failed leg is replaced");
        *self.device.write() = device;
        // The counters describe the device (status shows them next to its path): the new one
        // starts with none of the old one's errors.
        self.read_errors.store(0, Ordering::Relaxed);
        self.write_errors.store(0, Ordering::Relaxed);
        self.repairs.store(0, Ordering::Relaxed);
        self.failed.store(false, Ordering::Release);
    }

    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    /// Counts a read I/O error; too many in a row take the leg out of use.
    pub fn note_read_error(&self, e: &io::Error) {
        self.read_errors.fetch_add(1, Ordering::Relaxed);
        let in_a_row = self.consecutive_read_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if in_a_row >= MAX_CONSECUTIVE_READ_ERRORS {
            self.mark_failed(e);
        }
    }

    pub fn note_read_ok(&self) {
        self.consecutive_read_errors.store(0, Ordering::Relaxed);
    }

    pub fn mark_failed(&self, why: &io::Error) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "cache leg {} ({}) failed: {why}; it is no longer used",
                self.index,
                self.device().name()
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

    fn no_leg_left() -> io::Error {
        io::Error::other("every cache leg has failed")
    }

    /// Writes to every healthy leg; succeeds if at least one leg took the write.
    pub fn write_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.for_each_healthy(|leg| leg.device().write_at(buf, offset))
    }

    /// Flushes every healthy leg; succeeds if at least one leg is still healthy afterwards.
    pub fn flush_all(&self) -> io::Result<()> {
        self.for_each_healthy(|leg| leg.device().flush())
    }

    /// Writes to every healthy leg and flushes it (a checkpoint); succeeds if at least one leg
    /// has it durably.
    pub fn write_durably_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.for_each_healthy(|leg| {
            leg.device().write_at(buf, offset)?;
            leg.device().flush()
        })
    }

    /// Runs `op` on every healthy leg, the legs side by side (the caller waits for the slowest
    /// leg, not for each in turn); a leg whose `op` fails is taken out of use.
    fn for_each_healthy(&self, op: impl Fn(&Leg) -> io::Result<()> + Sync) -> io::Result<()> {
        let healthy: Vec<&Leg> = self.legs.iter().filter(|l| l.is_healthy()).collect();
        let results: Vec<io::Result<()>> = match healthy[..] {
            [] => Vec::new(),
            [leg] => vec![op(leg)],
            _ => std::thread::scope(|scope| {
                let op = &op;
                let handles: Vec<_> = healthy
                    .iter()
                    .map(|&leg| scope.spawn(move || op(leg)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("leg I/O thread"))
                    .collect()
            }),
        };
        let mut ok = 0;
        for (leg, result) in healthy.into_iter().zip(results) {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    leg.write_errors.fetch_add(1, Ordering::Relaxed);
                    leg.mark_failed(&e);
                }
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
        let mut bad_legs: Vec<&Leg> = Vec::new();
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
            match leg.device().read_at(buf, offset) {
                Ok(()) if check.is_none_or(|c| c(buf)) => {
                    leg.note_read_ok();
                    for bad in bad_legs {
                        self.repair(bad, buf, offset);
                    }
                    return Ok(());
                }
                Ok(()) => {
                    leg.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("checksum mismatch on {}", leg.device().name()),
                    );
                    bad_legs.push(leg);
                }
                Err(e) => {
                    leg.note_read_error(&e);
                    last_error = e;
                    bad_legs.push(leg);
                }
            }
        }
        Err(last_error)
    }

    fn repair(&self, leg: &Leg, good: &[u8], offset: u64) {
        match leg.device().write_at(good, offset) {
            Ok(()) => {
                leg.repairs.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "cache leg {}: repaired {} bytes at {offset} from the other leg",
                    leg.device().name(),
                    good.len()
                );
            }
            Err(e) => {
                leg.write_errors.fetch_add(1, Ordering::Relaxed);
                leg.mark_failed(&e);
            }
        }
    }
}
