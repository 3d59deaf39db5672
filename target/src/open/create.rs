//! Creating a cache set: validate the devices, refuse to format over dirty data unless forced,
//! then write the checkpoint ring and, last, the superblocks.
//!
//! Every check happens before the first write, so a refused format changes nothing on disk.

use std::sync::Arc;

use logfmt::{
    checkpoint_offset, segment_count_for, Checkpoint, Superblock, BLOCK_SIZE_BYTES,
    CHECKPOINT_SLOTS, MIN_CACHE_SIZE_BYTES,
};

use crate::device::{AlignedBuf, Device};
use crate::error::{EngineError, Result};
use crate::log::legs::CacheLegs;
use crate::log::scan::{other_format_version, other_version_message, read_superblocks, scan};
use crate::open::recover::backing_fingerprint;

pub struct FormatOptions {
    pub logical_block_size: u32,
    /// Format even over a cache that holds dirty data (which is then lost).
    pub force: bool,
}

/// Formats `legs` as a new cache set for `backing`. `backing_identity` is the device's stable
/// identity (see `FileDevice::identity`).
pub fn format(
    legs: &[Arc<dyn Device>],
    backing: &dyn Device,
    backing_identity: &str,
    options: &FormatOptions,
) -> Result<Superblock> {
    check_devices(legs, backing, options.logical_block_size)?;
    let (lbs, backing_size) = (options.logical_block_size, backing.size_bytes());
    if !options.force {
        refuse_if_dirty(legs)?;
    }

    let segment_count = legs
        .iter()
        .map(|l| segment_count_for(l.size_bytes()))
        .min()
        .expect("at least one leg")
        .min(crate::map::block_map::MAX_SLOTS);
    let uuid: [u8; 16] = rand::random();
    let cache_legs = CacheLegs::new(legs.to_vec());
    // The checkpoint ring first: fresh slots of the new set (sequence 0: nothing written back).
    let mut ring = AlignedBuf::new(CHECKPOINT_SLOTS * logfmt::CHECKPOINT_SLOT_SIZE_BYTES);
    let initial = Checkpoint {
        uuid,
        sequence: 0,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: Default::default(),
        // The log starts at block 0 of slot 0, segment 1 chained to anchor 0.
        next_position: Default::default(),
        anchor_crc: 0,
    };
    ring[..logfmt::CHECKPOINT_SLOT_SIZE_BYTES].copy_from_slice(&initial.encode());
    cache_legs
        .write_all(&ring, checkpoint_offset(0))
        .map_err(|e| EngineError::io(legs[0].name(), e))?;
    let mut superblock = Superblock {
        uuid,
        backing_size_bytes: backing_size,
        backing_fingerprint: backing_fingerprint(backing_identity),
        logical_block_size: lbs,
        segment_count,
        leg_count: legs.len() as u32,
        leg_index: 0,
        created_unix_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        leg_incarnation: 0,
    };
    // Superblocks last: until they are written, the legs are not a cache set of the new UUID.
    for (i, leg) in legs.iter().enumerate() {
        superblock.leg_index = i as u32;
        let mut buf = AlignedBuf::new(logfmt::SUPERBLOCK_SIZE_BYTES);
        buf.copy_from_slice(&superblock.encode());
        leg.write_at(&buf, 0)
            .and_then(|()| leg.flush())
            .map_err(|e| EngineError::io(leg.name(), e))?;
    }
    superblock.leg_index = 0;
    Ok(superblock)
}

/// The set's shape and sizes: one or two distinct legs, each a whole number of blocks and at
/// least `MIN_CACHE_SIZE_BYTES`; a backing device of whole blocks; a logical block size the
/// device can expose.
fn check_devices(legs: &[Arc<dyn Device>], backing: &dyn Device, lbs: u32) -> Result<()> {
    if legs.is_empty() || legs.len() > 2 {
        return Err(EngineError::refused(
            "cache",
            "a cache set has one or two legs",
        ));
    }
    if lbs != 512 && lbs != 4096 {
        return Err(EngineError::refused(
            backing.name(),
            format!("logical block size {lbs} is not 512 or 4096"),
        ));
    }
    let backing_size = backing.size_bytes();
    if backing_size == 0 || !backing_size.is_multiple_of(BLOCK_SIZE_BYTES as u64) {
        return Err(EngineError::refused(
            backing.name(),
            format!("size {backing_size} bytes is not a non-zero multiple of 4096"),
        ));
    }
    for leg in legs {
        let size = leg.size_bytes();
        if size % BLOCK_SIZE_BYTES as u64 != 0 {
            return Err(EngineError::refused(
                leg.name(),
                format!("size {size} bytes is not a multiple of 4096"),
            ));
        }
        if size < MIN_CACHE_SIZE_BYTES {
            return Err(EngineError::refused(
                leg.name(),
                format!(
                    "cache device too small: {size} bytes, need at least {MIN_CACHE_SIZE_BYTES}"
                ),
            ));
        }
    }
    if legs.len() == 2 && legs[0].name() == legs[1].name() {
        return Err(EngineError::refused(
            legs[0].name(),
            "given twice as a cache leg; a mirror needs two devices",
        ));
    }
    Ok(())
}

/// Refuses to format over a cache set that still holds data not written back.
fn refuse_if_dirty(legs: &[Arc<dyn Device>]) -> Result<()> {
    for leg in legs {
        if let Some(version) = other_format_version(leg.as_ref()) {
            // It may hold dirty data this build cannot read: only --force formats over it.
            return Err(EngineError::refused(
                leg.name(),
                other_version_message(version),
            ));
        }
        let Ok(superblocks) = read_superblocks(std::slice::from_ref(leg)) else {
            continue; // not a cache: nothing to lose
        };
        let report = scan(&CacheLegs::new(vec![leg.clone()]), &superblocks[0]);
        if let Some(why) = &report.checkpoint_error {
            return Err(EngineError::refused(
                leg.name(),
                format!(
                    "is a writeboost cache whose checkpoint cannot be read ({why}): whether it \
                     holds dirty data is unknown; pass --force to format it anyway"
                ),
            ));
        }
        if report.is_dirty() {
            return Err(EngineError::refused(
                leg.name(),
                format!(
                    "holds {} dirty blocks in segments {}..={} not yet written back to its \
                     backing device; re-attach it and drain it (`wbctl drain`), or pass --force \
                     to discard them",
                    report.dirty_data_blocks(),
                    report.written_back_id() + 1,
                    report.head_id()
                ),
            ));
        }
    }
    Ok(())
}
