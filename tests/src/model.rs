//! The reference model of the exported device and the oracles of CONTRACT §2.
//!
//! The model is a plain byte array updated by every acknowledged write, discard and zeroing,
//! plus, per flush epoch, what each 512-byte sector could legally hold after a crash:
//! - power cut: the value at the last completed FLUSH, or any value written since;
//! - cache lost: the state at some flush boundary B plus a subset of epoch B+1's writes.

use std::collections::{HashMap, HashSet};

pub const SECTOR: usize = 512;

fn digest(bytes: &[u8]) -> u64 {
    // Content identity of a sector; collisions are irrelevant at test sizes with crc + len mix.
    let lo = crc32c::crc32c(bytes) as u64;
    let hi = crc32c::crc32c_append(0x5bd1_e995, bytes) as u64;
    lo | hi << 32
}

pub struct Model {
    pub data: Vec<u8>,
    /// Sector digests at each completed FLUSH boundary, oldest first (boundary 0 = initial).
    boundaries: Vec<Vec<u64>>,
    /// Per epoch (after boundary i): sector → digests written during it.
    epochs: Vec<HashMap<usize, HashSet<u64>>>,
}

impl Model {
    pub fn new(size: usize) -> Model {
        Self::from_image(vec![0; size])
    }

    pub fn from_image(data: Vec<u8>) -> Model {
        let sectors = data.chunks(SECTOR).map(digest).collect();
        Model {
            data,
            boundaries: vec![sectors],
            epochs: vec![HashMap::new()],
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        self.data[offset..offset + bytes.len()].copy_from_slice(bytes);
        let epoch = self.epochs.last_mut().expect("an open epoch");
        for s in offset / SECTOR..(offset + bytes.len()) / SECTOR {
            let d = digest(&self.data[s * SECTOR..(s + 1) * SECTOR]);
            epoch.entry(s).or_default().insert(d);
        }
    }

    pub fn zero(&mut self, offset: usize, len: usize) {
        self.write(offset, &vec![0; len]);
    }

    /// A FLUSH completed: everything written so far must survive a power cut.
    pub fn flush(&mut self) {
        // Only the sectors written during the epoch changed since the previous boundary.
        let mut sectors = self.boundaries.last().expect("boundary 0").clone();
        for &s in self.epochs.last().expect("an open epoch").keys() {
            sectors[s] = digest(&self.data[s * SECTOR..(s + 1) * SECTOR]);
        }
        self.boundaries.push(sectors);
        self.epochs.push(HashMap::new());
    }

    /// After a power cut that passed `check_after_power_cut`: `image` is the device now, and it
    /// is durable — a new flush boundary. The history stays: a later cache loss may still leave
    /// the backing device at an older boundary.
    pub fn power_cut_to(&mut self, image: &[u8]) {
        assert_eq!(image.len(), self.data.len());
        for (s, (now, was)) in image
            .chunks(SECTOR)
            .zip(self.data.chunks(SECTOR))
            .enumerate()
        {
            if now != was {
                self.epochs
                    .last_mut()
                    .expect("an open epoch")
                    .entry(s)
                    .or_default()
                    .insert(digest(now));
            }
        }
        self.data.copy_from_slice(image);
        // Every sector the epoch touched takes its value in the image.
        let touched: Vec<usize> = self
            .epochs
            .last()
            .expect("an open epoch")
            .keys()
            .copied()
            .collect();
        let mut sectors = self.boundaries.last().expect("boundary 0").clone();
        for s in touched {
            sectors[s] = digest(&self.data[s * SECTOR..(s + 1) * SECTOR]);
        }
        self.boundaries.push(sectors);
        self.epochs.push(HashMap::new());
    }

    /// Power-cut oracle: every sector holds its value at the last completed FLUSH or one value
    /// written since. Returns the first violating sector.
    pub fn check_after_power_cut(&self, image: &[u8]) -> Result<(), String> {
        let last = self.boundaries.len() - 1;
        for (s, sector) in image.chunks(SECTOR).enumerate() {
            let d = digest(sector);
            if d == self.boundaries[last][s] {
                continue;
            }
            if self.epochs[last]
                .get(&s)
                .is_some_and(|set| set.contains(&d))
            {
                continue;
            }
            return Err(format!(
                "sector {s}: holds neither its flushed value nor a value written since the last FLUSH"
            ));
        }
        Ok(())
    }

    /// Cache-loss oracle: the image equals the state at some flush boundary B plus a subset of
    /// the writes of the epoch after B. Returns the boundary that explains it.
    pub fn check_cache_loss(&self, image: &[u8]) -> Result<usize, String> {
        self.explain_cache_loss(image).map(|(b, _)| b)
    }

    /// `check_cache_loss`, also saying how many sectors hold a value of the epoch after the
    /// boundary rather than their value at it (0: the image is exactly that boundary's state).
    pub fn explain_cache_loss(&self, image: &[u8]) -> Result<(usize, usize), String> {
        self.explain_cache_loss_except(image, 0..0)
    }

    /// `explain_cache_loss`, taking any content of the bytes `except` as explained: a write
    /// racing the loss may have been logged (and lost) or gone straight to the backing device.
    pub fn explain_cache_loss_except(
        &self,
        image: &[u8],
        except: std::ops::Range<usize>,
    ) -> Result<(usize, usize), String> {
        let skip = except.start / SECTOR..except.end.div_ceil(SECTOR);
        let digests: Vec<u64> = image.chunks(SECTOR).map(digest).collect();
        'boundary: for b in (0..self.boundaries.len()).rev() {
            let mut from_next_epoch = 0;
            for (s, d) in digests.iter().enumerate() {
                if *d == self.boundaries[b][s] || skip.contains(&s) {
                    continue;
                }
                if self.epochs[b].get(&s).is_some_and(|set| set.contains(d)) {
                    from_next_epoch += 1;
                    continue;
                }
                continue 'boundary;
            }
            return Ok((b, from_next_epoch));
        }
        // Name the sector that the closest boundary cannot explain (for the failure report).
        let (best, sector) = (0..self.boundaries.len())
            .map(|b| {
                let bad: Vec<usize> = digests
                    .iter()
                    .enumerate()
                    .filter(|(s, d)| {
                        !skip.contains(s)
                            && **d != self.boundaries[b][*s]
                            && !self.epochs[b].get(s).is_some_and(|set| set.contains(d))
                    })
                    .map(|(s, _)| s)
                    .collect();
                (bad.len(), b, bad.first().copied().unwrap_or(0))
            })
            .min()
            .map(|(_, b, s)| (b, s))
            .expect("boundary 0");
        Err(format!(
            "sector {sector}: the backing device is not any flush boundary plus a subset of the \
             next epoch (closest: boundary {best} of {})",
            self.boundaries.len() - 1
        ))
    }

    /// Completed FLUSHes recorded so far (boundary 0 is the initial state).
    pub fn flush_count(&self) -> usize {
        self.boundaries.len() - 1
    }
}
