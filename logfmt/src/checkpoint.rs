//! Checkpoints: "every segment up to this id is on the backing device, and the backing device
//! was flushed". Kept in a ring of CRC-stamped slots so a torn write never loses the previous.
//!
//! A checkpoint also carries the cache set's fault record (`Faults`): which legs are out of use
//! and whether the whole cache was lost. A later start must know both before it reads a single
//! segment header: a failed leg may miss segments the other holds, and a lost log must never be
//! replayed over what was written to the backing device since.

use crate::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub uuid: [u8; 16],
    /// Grows by one per checkpoint written; the valid slot with the highest sequence wins.
    pub sequence: u64,
    pub last_written_back_id: u64,
    /// Epoch of that segment, so a resumed writeback knows whether its next segment starts a
    /// new epoch (and needs a backing flush first; re-flushing is harmless).
    pub last_written_back_epoch: u64,
    /// The fault record in force when the checkpoint was written.
    pub faults: Faults,
    /// Where segment `last_written_back_id + 1` starts (or will start): recovery walks the log
    /// from here.
    pub next_position: Position,
    /// Record CRC of the header of segment `last_written_back_id` (0 before the first segment):
    /// the `prev_crc` segment `last_written_back_id + 1` must carry. The anchor of the chain.
    pub anchor_crc: u32,
}

/// What a later start must know about failures (FORMAT.md §4.1). Zero everywhere (what caches
/// formatted before these fields existed hold) means "no fault".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Grows by one at every change of the record; of several copies (every leg's newest
    /// checkpoint, the host's fault file) the highest sequence wins.
    pub sequence: u64,
    /// Bit `i`: leg `i` failed. It is not read again until it is replaced, because it may miss
    /// segments the other leg holds.
    pub failed_legs: u32,
    /// Every leg was lost.
    pub cache_lost: Option<CacheLost>,
    /// The current device of each leg (the superblock's `leg_incarnation`); a leg whose
    /// superblock names another is an old device, replaced since, and treated as failed.
    pub leg_incarnations: [u32; 2],
}

/// The record of a lost cache: what the backing device holds, and the log that is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLost {
    /// The backing device holds every segment up to this id (a consistent older state).
    pub backing_holds_id: u64,
    /// Segments `backing_holds_id + 1 ..= log_through_id` were lost. No start may replay them:
    /// the backing device has been written directly (passthrough) since.
    pub log_through_id: u64,
}

/// Bit 0 of the checkpoint's fault flags: `cache_lost` is present.
const FAULT_FLAG_CACHE_LOST: u32 = 1;

impl Faults {
    pub fn leg_failed(&self, leg: usize) -> bool {
        self.failed_legs & (1 << leg) != 0
    }
}
impl Checkpoint {
    /// The ring slot this checkpoint is written to.
    pub fn ring_index(&self) -> usize {
        (self.sequence % CHECKPOINT_SLOTS as u64) as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; CHECKPOINT_SLOT_SIZE_BYTES];
        out[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut out, 32, self.sequence);
        put_u64(&mut out, 40, self.last_written_back_id);
        put_u64(&mut out, 48, self.last_written_back_epoch);
        put_u32(&mut out, 56, self.faults.failed_legs);
        let flags = if self.faults.cache_lost.is_some() {
            FAULT_FLAG_CACHE_LOST
        } else {
            0
        };
        put_u32(&mut out, 60, flags);
        put_u64(&mut out, 64, self.faults.sequence);
        if let Some(lost) = self.faults.cache_lost {
            put_u64(&mut out, 72, lost.backing_holds_id);
            put_u64(&mut out, 80, lost.log_through_id);
        }
        put_u32(&mut out, 88, self.faults.leg_incarnations[0]);
        put_u32(&mut out, 92, self.faults.leg_incarnations[1]);
        put_u64(&mut out, 96, self.next_position.slot);
        put_u32(&mut out, 104, self.next_position.block);
        put_u32(&mut out, 108, self.anchor_crc);
        seal_record(&mut out, CHECKPOINT_MAGIC);
        out
    }

    pub fn decode(bytes: &[u8], uuid: &[u8; 16]) -> Result<Checkpoint, FormatError> {
        check_record(
            bytes,
            "checkpoint",
            CHECKPOINT_SLOT_SIZE_BYTES,
            CHECKPOINT_MAGIC,
        )?;
        if &bytes[16..32] != uuid {
            return Err(FormatError::ForeignUuid {
                record: "checkpoint",
            });
        }
        let next_block = get_u32(bytes, 104);
        if next_block as usize > MAX_START_BLOCK {
            return Err(FormatError::BadCheckpoint {
                reason: "next segment position beyond the last start block of a slot",
            });
        }
        Ok(Checkpoint {
            uuid: *uuid,
            sequence: get_u64(bytes, 32),
            last_written_back_id: get_u64(bytes, 40),
            last_written_back_epoch: get_u64(bytes, 48),
            faults: Faults {
                sequence: get_u64(bytes, 64),
                failed_legs: get_u32(bytes, 56),
                cache_lost: (get_u32(bytes, 60) & FAULT_FLAG_CACHE_LOST != 0).then(|| CacheLost {
                    backing_holds_id: get_u64(bytes, 72),
                    log_through_id: get_u64(bytes, 80),
                }),
                leg_incarnations: [get_u32(bytes, 88), get_u32(bytes, 92)],
            },
            next_position: Position {
                slot: get_u64(bytes, 96),
                block: next_block,
            },
            anchor_crc: get_u32(bytes, 108),
        })
    }

    /// The newest valid checkpoint of a whole ring (`CHECKPOINT_SLOTS` slots back to back), or
    /// `None` if no slot validates.
    pub fn newest_in_ring(ring: &[u8], uuid: &[u8; 16]) -> Option<Checkpoint> {
        ring.chunks(CHECKPOINT_SLOT_SIZE_BYTES)
            .take(CHECKPOINT_SLOTS)
            .filter_map(|slot| Checkpoint::decode(slot, uuid).ok())
            .max_by_key(|c| c.sequence)
    }
}
