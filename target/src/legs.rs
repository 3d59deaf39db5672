//! The cache legs: one or two devices (a mirror) holding the same log. Writes go to every healthy
//! leg; reads come from the first healthy leg that answers, and fall back to the other.
//!
//! Invariant: a leg that failed a write is never read again until it is replaced, because it may
//! miss segments the other leg has.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::device::Device;

pub struct Leg {
    pub device: Arc<dyn Device>,
    pub index: usize,
    failed: AtomicBool,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
}

impl Leg {
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
    }

    pub fn mark_failed(&self, why: &io::Error) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!(
                "cache leg {} ({}) failed: {why}; it is no longer used",
                self.index,
                self.device.name()
            );
        }
    }
}

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
                    device,
                    index,
                    failed: AtomicBool::new(false),
                    read_errors: AtomicU64::new(0),
                    write_errors: AtomicU64::new(0),
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
        self.for_each_healthy(|leg| leg.device.write_at(buf, offset))
    }

    /// Flushes every healthy leg; succeeds if at least one leg is still healthy afterwards.
    pub fn flush_all(&self) -> io::Result<()> {
        self.for_each_healthy(|leg| leg.device.flush())
    }

    fn for_each_healthy(&self, op: impl Fn(&Leg) -> io::Result<()>) -> io::Result<()> {
        let mut ok = 0;
        for leg in self.legs.iter().filter(|l| l.is_healthy()) {
            match op(leg) {
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

    /// Reads from the first healthy leg that answers and whose bytes pass `check` (when given);
    /// a leg that errors is counted and the next one tried.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        check: Option<&dyn Fn(&[u8]) -> bool>,
    ) -> io::Result<()> {
        let mut last_error = Self::no_leg_left();
        for leg in self.legs.iter().filter(|l| l.is_healthy()) {
            match leg.device.read_at(buf, offset) {
                Ok(()) if check.is_none_or(|c| c(buf)) => return Ok(()),
                Ok(()) => {
                    leg.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("checksum mismatch on {}", leg.device.name()),
                    );
                }
                Err(e) => {
                    leg.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = e;
                }
            }
        }
        Err(last_error)
    }
}
