#![no_main]

mod common;

use common::*;
use libfuzzer_sys::fuzz_target;
use logfmt::*;

/// Bytes of a checkpoint that carry fields; the rest of its slot is zero padding.
const DEFINED: usize = 56;
const RING_BYTES: usize = CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES;
const UUID: [u8; 16] = *b"fuzz-cache-set-!";

/// `newest_in_ring` must agree with decoding each whole slot by hand.
fn check_ring(ring: &[u8], uuid: &[u8; 16]) {
    let valid: Vec<Checkpoint> = ring
        .chunks_exact(CHECKPOINT_SLOT_SIZE_BYTES)
        .take(CHECKPOINT_SLOTS)
        .filter_map(|slot| Checkpoint::decode(slot, uuid).ok())
        .collect();
    let newest = Checkpoint::newest_in_ring(ring, uuid);
    match newest {
        None => assert!(valid.is_empty()),
        Some(cp) => {
            assert!(valid.contains(&cp));
            assert!(valid.iter().all(|c| c.sequence <= cp.sequence));
            assert_eq!(cp.uuid, *uuid);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The input as a raw ring of any length (partial slots included).
    check_ring(data, &uuid_of(data));

    // A full ring built from small pieces: each 64-byte piece edits the start of one slot. Byte 0
    // says which slots start from a valid checkpoint (sequence = 8 + slot index), byte 1 which
    // get a repaired prologue and checksum, byte 2 which get our UUID.
    let [template, seal, own, rest @ ..] = data else {
        return;
    };
    let mut ring = vec![0u8; RING_BYTES];
    for (i, slot) in ring
        .chunks_exact_mut(CHECKPOINT_SLOT_SIZE_BYTES)
        .enumerate()
    {
        let bit = |mask: u8| mask & (1 << i) != 0;
        let valid = Checkpoint {
            uuid: UUID,
            sequence: 8 + i as u64,
            last_written_back_id: 100 + i as u64,
            last_written_back_epoch: 7,
            faults: Default::default(),
            next_position: Position { slot: 3, block: i as u32 },
            anchor_crc: 0xabcd_0000 + i as u32,
        };
        let piece = rest.chunks(64).nth(i).unwrap_or(&[]);
        let from = if bit(*template) { FROM_TEMPLATE } else { 0 };
        slot.copy_from_slice(&shaped(&valid.encode(), piece, from));
        if bit(*own) {
            slot[16..32].copy_from_slice(&UUID);
        }
        let mode = if bit(*seal) {
            FIX_PROLOGUE | FIX_CRC
        } else {
            0
        };
        repair(slot, mode, CHECKPOINT_MAGIC);
        if let Ok(cp) = Checkpoint::decode(slot, &UUID) {
            let encoded = cp.encode();
            assert_eq!(Checkpoint::decode(&encoded, &UUID), Ok(cp));
            assert_reencodes(slot, &encoded, DEFINED);
        }
    }
    check_ring(&ring, &UUID);
});
