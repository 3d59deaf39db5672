//! Checkpoints: "every segment up to this id is on the backing device, and the backing device
//! was flushed". Kept in a ring of CRC-stamped slots so a torn write never loses the previous.

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
        Ok(Checkpoint {
            uuid: *uuid,
            sequence: get_u64(bytes, 32),
            last_written_back_id: get_u64(bytes, 40),
            last_written_back_epoch: get_u64(bytes, 48),
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
