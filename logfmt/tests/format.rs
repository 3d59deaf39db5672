//! Integration tests of the on-disk format through the crate's public API only, as the engine,
//! recovery and `wbctl check` see it. Offsets asserted here are the ones `FORMAT.md` documents:
//! if one of these tests has to change, the format changed and `FORMAT_VERSION` must too.

use logfmt::buffer_file;
use logfmt::*;
use proptest::prelude::*;

const UUID: [u8; 16] = *b"cache-set-uuid-A";
const OTHER_UUID: [u8; 16] = *b"cache-set-uuid-B";

/// Every self-checksummed record is 4 KiB; recomputing the CRC lets a test reach the checks that
/// come after the checksum (a real damage would stop at the checksum).
fn reseal(bytes: &mut [u8]) {
    let crc = crc32c_with_hole(&bytes[..4096], RECORD_CRC_OFFSET);
    bytes[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

fn put_u32_at(bytes: &mut [u8], off: usize, v: u32) {
    bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

fn sample_superblock() -> Superblock {
    Superblock {
        uuid: UUID,
        backing_size_bytes: 1 << 40,
        backing_fingerprint: *b"backing-identity",
        logical_block_size: 4096,
        segment_count: 1000,
        leg_count: 2,
        leg_index: 1,
        created_unix_secs: 1_700_000_000,
        leg_incarnation: 0,
    }
}

/// A header with `entries` entries, data first (unique slots) then ranges. Different `salt`s give
/// headers that differ in every entry, so a mix of two of them differs from both in every sector.
fn sample_header(segment_id: u64, entries: usize, salt: u64) -> SegmentHeader {
    let entries = (0..entries)
        .map(|i| {
            if i < DATA_BLOCKS_PER_SEGMENT {
                Entry::data(
                    salt * 1_000_000 + i as u64 * 3,
                    i as u16,
                    ALL_SECTORS_VALID,
                    (salt as u32).wrapping_mul(0x9e37_79b9) ^ i as u32,
                )
            } else {
                let kind = if i % 2 == 0 {
                    EntryKind::Discard
                } else {
                    EntryKind::WriteZeroes
                };
                Entry::range(kind, salt * 1_000_000 + i as u64 * 64, 8 + i as u32)
            }
        })
        .collect();
    SegmentHeader {
        uuid: UUID,
        segment_id,
        epoch_id: salt + 7,
        durable_id: segment_id.saturating_sub(2),
        flags: if salt.is_multiple_of(2) {
            FLAG_FLUSH
        } else {
            0
        },
        start_block: 0,
        run_nonce: salt ^ 0x6e6f_6e63_6500_0000,
        prev_crc: segment_id as u32,
        entries,
    }
}

/// A whole segment image whose `data_blocks` data entries carry the right block CRCs.
fn sample_segment(segment_id: u64, data_blocks: usize) -> (SegmentHeader, Vec<u8>) {
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    let mut entries = Vec::new();
    for slot in 0..data_blocks {
        let block = &mut image[data_block_offset(slot)..data_block_offset(slot + 1)];
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i as u8) ^ (slot as u8).wrapping_mul(31) ^ segment_id as u8;
        }
        entries.push(Entry::data(
            500 + slot as u64,
            slot as u16,
            ALL_SECTORS_VALID,
            block_crc(block),
        ));
    }
    let header = SegmentHeader {
        uuid: UUID,
        segment_id,
        epoch_id: 3,
        durable_id: segment_id - 1,
        flags: 0,
        start_block: 0,
        run_nonce: 0x6e6f_6e63_6500_0001,
        prev_crc: 0,
        entries,
    };
    header.encode_into(&mut image);
    (header, image)
}

/// Writes `entry` raw into entry `index` of an encoded header, sets the count to cover it and
/// reseals, so only the entry validation can object.
fn header_with_raw_entry(index: usize, raw: [u8; ENTRY_SIZE_BYTES]) -> Vec<u8> {
    let mut bytes = sample_header(9, index, 1).encode();
    bytes[entry_offset(index)..entry_offset(index + 1)].copy_from_slice(&raw);
    put_u32_at(&mut bytes, ENTRY_COUNT_OFFSET, index as u32 + 1);
    reseal(&mut bytes);
    bytes
}

fn raw_entry(entry: &Entry) -> [u8; ENTRY_SIZE_BYTES] {
    let mut raw = [0u8; ENTRY_SIZE_BYTES];
    entry.encode_into(&mut raw);
    raw
}

fn assert_bad_entry(bytes: &[u8], index: usize, reason_contains: &str) {
    match SegmentHeader::decode(bytes, &UUID) {
        Err(FormatError::BadEntry { index: i, reason }) => {
            assert_eq!(i, index);
            assert!(
                reason.contains(reason_contains),
                "reason {reason:?} does not mention {reason_contains:?}"
            );
        }
        other => panic!("expected BadEntry at {index} ({reason_contains}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.

fn arb_data_entry() -> impl Strategy<Value = Entry> {
    // Highest block whose 8 sectors still end inside u64 sector space.
    let max_block = u64::MAX / SECTORS_PER_BLOCK as u64;
    (
        0..max_block,
        0..DATA_BLOCKS_PER_SEGMENT as u16,
        1..=u8::MAX,
        any::<u32>(),
    )
        .prop_map(|(block, slot, valid, crc)| Entry::data(block, slot, valid, crc))
}

fn arb_range_entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![Just(EntryKind::Discard), Just(EntryKind::WriteZeroes)],
        1..=u32::MAX,
    )
        .prop_flat_map(|(kind, len)| (Just(kind), 0..=u64::MAX - len as u64, Just(len)))
        .prop_map(|(kind, start, len)| Entry::range(kind, start, len))
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    prop_oneof![arb_data_entry(), arb_range_entry()]
}

fn arb_header() -> impl Strategy<Value = SegmentHeader> {
    let entries = prop_oneof![
        prop::collection::vec(arb_entry(), 0..=MAX_ENTRIES_PER_SEGMENT),
        // Full segments: every data slot used, the rest of the table filled with ranges.
        prop::collection::vec(
            arb_data_entry(),
            DATA_BLOCKS_PER_SEGMENT..=MAX_ENTRIES_PER_SEGMENT
        ),
    ];
    let slots = Just((0..DATA_BLOCKS_PER_SEGMENT as u16).collect::<Vec<_>>()).prop_shuffle();
    (
        any::<[u8; 16]>(),
        1..=u64::MAX,
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        entries,
        slots,
    )
        .prop_map(
            |(uuid, segment_id, epoch_id, durable_id, flags, entries, slots)| {
                let mut free = slots.into_iter();
                let entries = entries
                    .into_iter()
                    .map(|e| match (e.kind, free.next()) {
                        (EntryKind::Data, Some(slot)) => Entry {
                            data_slot: slot,
                            ..e
                        },
                        (EntryKind::Data, None) => {
                            Entry::range(EntryKind::Discard, e.start_sector, e.length_sectors)
                        }
                        _ => e,
                    })
                    .collect();
                SegmentHeader {
                    uuid,
                    segment_id,
                    epoch_id,
                    durable_id,
                    flags,
                    start_block: 0,
                    run_nonce: epoch_id.rotate_left(17) ^ segment_id,
                    prev_crc: durable_id as u32 ^ flags,
                    entries,
                }
            },
        )
}

fn arb_superblock() -> impl Strategy<Value = Superblock> {
    (
        any::<[u8; 16]>(),
        1..=u64::MAX / BLOCK_SIZE_BYTES as u64,
        any::<[u8; 16]>(),
        prop_oneof![Just(512u32), Just(4096u32)],
        MIN_SEGMENTS..=(u64::MAX - SEGMENT_AREA_OFFSET) / SEGMENT_SIZE_BYTES as u64,
        prop_oneof![Just((1u32, 0u32)), Just((2, 0)), Just((2, 1))],
        any::<u64>(),
    )
        .prop_map(
            |(uuid, blocks, fingerprint, lbs, segment_count, (leg_count, leg_index), created)| {
                Superblock {
                    uuid,
                    backing_size_bytes: blocks * BLOCK_SIZE_BYTES as u64,
                    backing_fingerprint: fingerprint,
                    logical_block_size: lbs,
                    segment_count,
                    leg_count,
                    leg_index,
                    created_unix_secs: created,
                    leg_incarnation: 0,
                }
            },
        )
}

fn arb_faults() -> impl Strategy<Value = Faults> {
    (
        any::<u64>(),
        0u32..4,
        proptest::option::of((any::<u64>(), any::<u64>())),
        any::<[u32; 2]>(),
    )
        .prop_map(|(sequence, failed_legs, lost, leg_incarnations)| Faults {
            sequence,
            failed_legs,
            cache_lost: lost.map(|(backing_holds_id, log_through_id)| CacheLost {
                backing_holds_id,
                log_through_id,
            }),
            leg_incarnations,
        })
}

fn arb_checkpoint() -> impl Strategy<Value = Checkpoint> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        arb_faults(),
    )
        .prop_map(
            |(uuid, sequence, last_written_back_id, last_written_back_epoch, faults)| Checkpoint {
                uuid,
                sequence,
                last_written_back_id,
                last_written_back_epoch,
                faults,
                next_position: Position {
                    slot: sequence.rotate_left(7),
                    block: (last_written_back_id % (MAX_START_BLOCK as u64 + 1)) as u32,
                },
                anchor_crc: last_written_back_epoch as u32,
            },
        )
}

/// What a single flipped bit at `byte` of a self-checksummed record must be reported as: the
/// prologue is checked field by field before the checksum.
fn assert_flip_detected(result: Result<impl std::fmt::Debug, FormatError>, byte: usize) {
    match (byte, result) {
        (0..=7, Err(FormatError::BadMagic { .. })) => {}
        (8..=11, Err(FormatError::UnsupportedVersion { .. })) => {}
        (12.., Err(FormatError::BadChecksum { .. })) => {}
        (byte, other) => panic!("bit flip in byte {byte} gave {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips.

proptest! {
    #[test]
    fn superblock_round_trips(sb in arb_superblock()) {
        let bytes = sb.encode();
        prop_assert_eq!(bytes.len(), SUPERBLOCK_SIZE_BYTES);
        prop_assert_eq!(Superblock::decode(&bytes), Ok(sb.clone()));
        // Geometry the engine derives from a decoded superblock must not overflow.
        prop_assert_eq!(
            Some(sb.leg_size_bytes()),
            sb.segment_count
                .checked_mul(SEGMENT_SIZE_BYTES as u64)
                .and_then(|b| b.checked_add(SEGMENT_AREA_OFFSET))
        );
    }

    #[test]
    fn checkpoint_round_trips(cp in arb_checkpoint()) {
        let bytes = cp.encode();
        prop_assert_eq!(bytes.len(), CHECKPOINT_SLOT_SIZE_BYTES);
        prop_assert_eq!(Checkpoint::decode(&bytes, &cp.uuid), Ok(cp));
        prop_assert_eq!(cp.ring_index(), (cp.sequence % CHECKPOINT_SLOTS as u64) as usize);
    }

    #[test]
    fn segment_header_round_trips(header in arb_header()) {
        let bytes = header.encode();
        prop_assert_eq!(bytes.len(), SEGMENT_HEADER_SIZE_BYTES);
        prop_assert_eq!(u32_at(&bytes, ENTRY_COUNT_OFFSET) as usize, header.entries.len());
        let decoded = SegmentHeader::decode_expecting(&bytes, &header.uuid, header.segment_id);
        prop_assert_eq!(decoded, Ok(header.clone()));
        prop_assert_eq!(header.sealed_by_flush(), header.flags & FLAG_FLUSH != 0);
    }

    #[test]
    fn entry_round_trips(entry in arb_entry(), index in 0..MAX_ENTRIES_PER_SEGMENT) {
        let raw = raw_entry(&entry);
        prop_assert_eq!(u32_at(&raw, ENTRY_PLACEMENT_OFFSET), entry.placement_word());
        prop_assert_eq!(u32_at(&raw, 20), 0);
        prop_assert_eq!(Entry::decode(&raw, index), Ok(entry));
        if entry.kind == EntryKind::Data {
            prop_assert_eq!(entry.block() * SECTORS_PER_BLOCK as u64, entry.start_sector);
        }
    }

    /// The one CRC rule: CRC32C over the record with the CRC field read as zero.
    #[test]
    fn record_crc_is_crc32c_with_the_crc_field_zeroed(header in arb_header()) {
        let bytes = header.encode();
        let mut zeroed = bytes.clone();
        zeroed[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].fill(0);
        prop_assert_eq!(u32_at(&bytes, RECORD_CRC_OFFSET), crc32c(&zeroed));
    }

    /// A single-bit error anywhere in a header, entry table and padding included, is caught.
    #[test]
    fn every_single_bit_flip_in_a_header_is_detected(
        header in arb_header(),
        bit in 0..SEGMENT_HEADER_SIZE_BYTES * 8,
    ) {
        let mut bytes = header.encode();
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert_flip_detected(SegmentHeader::decode(&bytes, &header.uuid), bit / 8);
    }

    #[test]
    fn every_single_bit_flip_in_a_superblock_is_detected(
        sb in arb_superblock(),
        bit in 0..SUPERBLOCK_SIZE_BYTES * 8,
    ) {
        let mut bytes = sb.encode();
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert_flip_detected(Superblock::decode(&bytes), bit / 8);
    }

    #[test]
    fn every_single_bit_flip_in_a_checkpoint_is_detected(
        cp in arb_checkpoint(),
        bit in 0..CHECKPOINT_SLOT_SIZE_BYTES * 8,
    ) {
        let mut bytes = cp.encode();
        bytes[bit / 8] ^= 1 << (bit % 8);
        assert_flip_detected(Checkpoint::decode(&bytes, &cp.uuid), bit / 8);
    }
}

/// The property above samples bit positions; this walks all 32768 of one full header.
#[test]
fn every_bit_of_a_full_header_is_covered() {
    let header = sample_header(77, MAX_ENTRIES_PER_SEGMENT, 3);
    let bytes = header.encode();
    for bit in 0..SEGMENT_HEADER_SIZE_BYTES * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert_flip_detected(SegmentHeader::decode(&flipped, &UUID), bit / 8);
    }
}

#[test]
fn crc_is_castagnoli() {
    // The standard CRC-32C check value; a plain CRC-32 (IEEE) would give 0xcbf43926.
    assert_eq!(crc32c(b"123456789"), 0xe306_9283);
}

#[test]
fn header_encode_leaves_the_data_blocks_alone() {
    let mut image = vec![0xa5u8; SEGMENT_SIZE_BYTES];
    sample_header(4, 10, 1).encode_into(&mut image);
    assert!(image[SEGMENT_HEADER_SIZE_BYTES..]
        .iter()
        .all(|&b| b == 0xa5));
    // Unused table space is zeroed, not left as it was: the CRC covers it.
    assert!(image[entry_offset(10)..SEGMENT_HEADER_SIZE_BYTES]
        .iter()
        .all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// Byte offsets, as FORMAT.md documents them.

#[test]
fn leg_layout_offsets() {
    assert_eq!(SUPERBLOCK_SIZE_BYTES, 4096);
    assert_eq!(CHECKPOINT_RING_OFFSET, 4096);
    assert_eq!(CHECKPOINT_SLOTS, 8);
    for i in 0..CHECKPOINT_SLOTS {
        assert_eq!(checkpoint_offset(i), 4096 + 4096 * i as u64);
    }
    assert_eq!(SEGMENT_AREA_OFFSET, 512 * 1024);
    assert_eq!(segment_offset(0), 524_288);
    assert_eq!(segment_offset(3), 4 * 524_288);
    assert_eq!(DATA_BLOCKS_PER_SEGMENT, 127);
    assert_eq!(data_block_offset(0), 4096);
    assert_eq!(
        data_block_offset(126) + BLOCK_SIZE_BYTES,
        SEGMENT_SIZE_BYTES
    );
    assert_eq!(MIN_CACHE_SIZE_BYTES, 17 * 524_288);
    assert_eq!(segment_count_for(MIN_CACHE_SIZE_BYTES), 16);
    assert_eq!(segment_count_for(MIN_CACHE_SIZE_BYTES - 1), 15);
    assert_eq!(segment_count_for(0), 0);
    assert_eq!(sample_superblock().leg_size_bytes(), segment_offset(1000));
}

#[test]
fn a_segment_goes_right_behind_the_previous_one_in_its_slot() {
    let n = 16;
    let at = |slot, block| Position { slot, block };
    // A FLUSH of one 4 KiB write: header + one data block, the next starts two blocks on.
    assert_eq!(at(3, 0).next(2, n), at(3, 2));
    assert_eq!(at(3, 2).next(2, n), at(3, 4));
    // An empty segment (entries without data) uses its header block only.
    assert_eq!(at(3, 4).next(1, n), at(3, 5));
    // A header and one data block still fit behind it: same slot.
    assert_eq!(at(3, 100).next(26, n), at(3, 126));
    // Only one block left, or none: the next slot.
    assert_eq!(at(3, 100).next(27, n), at(4, 0));
    assert_eq!(at(3, 0).next(SLOT_BLOCKS, n), at(4, 0));
    assert_eq!(at(3, 126).next(2, n), at(4, 0));
    // The ring wraps.
    assert_eq!(at(15, 0).next(128, n), at(0, 0));
    assert_eq!(at(15, 120).next(7, n), at(0, 0));
}

#[test]
fn positions_offsets_and_capacity() {
    let p = Position { slot: 2, block: 5 };
    assert_eq!(p.offset(), segment_offset(2) + 5 * 4096);
    assert_eq!(p.data_capacity(), 122);
    assert_eq!(data_capacity(0), DATA_BLOCKS_PER_SEGMENT);
    assert_eq!(data_capacity(MAX_START_BLOCK as u32), 1);
    assert_eq!(
        (SLOT_BLOCKS, MIN_SEGMENT_BLOCKS, MAX_START_BLOCK),
        (128, 2, 126)
    );
}

/// Every chain of placements stays inside its slots and packs them: whatever the segments'
/// sizes, a segment never crosses its slot's end, and a slot is left only when fewer than a
/// header and one data block remain.
#[test]
fn placements_never_cross_a_slot_and_waste_at_most_one_block() {
    let n = 16;
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut p = Position::default();
    for _ in 0..10_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let room = SLOT_BLOCKS - p.block as usize;
        let used = 1 + (rng as usize % room);
        assert!(p.block as usize + used <= SLOT_BLOCKS);
        let next = p.next(used, n);
        if next.slot == p.slot {
            assert_eq!(next.block as usize, p.block as usize + used);
            assert!(next.block as usize <= MAX_START_BLOCK);
        } else {
            assert_eq!(
                next,
                Position {
                    slot: (p.slot + 1) % n,
                    block: 0
                }
            );
            assert!(SLOT_BLOCKS - (p.block as usize + used) < MIN_SEGMENT_BLOCKS);
        }
        p = next;
    }
}

#[test]
#[should_panic(expected = "cannot use")]
fn a_segment_larger_than_the_rest_of_its_slot_is_a_bug() {
    Position {
        slot: 0,
        block: 100,
    }
    .next(29, 16);
}

#[test]
fn superblock_fields_sit_at_documented_offsets() {
    let bytes = sample_superblock().encode();
    assert_eq!(&bytes[0..8], b"WBSUPER1");
    assert_eq!(u32_at(&bytes, 8), 2);
    assert_eq!(&bytes[16..32], &UUID);
    assert_eq!(u64_at(&bytes, 32), 1 << 40);
    assert_eq!(&bytes[40..56], b"backing-identity");
    assert_eq!(u32_at(&bytes, 56), 524_288);
    assert_eq!(u32_at(&bytes, 60), 4096);
    assert_eq!(u64_at(&bytes, 64), 1000);
    assert_eq!(u32_at(&bytes, 72), 2);
    assert_eq!(u32_at(&bytes, 76), 1);
    assert_eq!(u64_at(&bytes, 80), 1_700_000_000);
    assert!(bytes[88..].iter().all(|&b| b == 0));
}

#[test]
fn checkpoint_fields_sit_at_documented_offsets() {
    let cp = Checkpoint {
        uuid: UUID,
        sequence: 11,
        last_written_back_id: 222,
        last_written_back_epoch: 33,
        faults: Default::default(),
        next_position: Position {
            slot: 0x0a0b_0c0d,
            block: 77,
        },
        anchor_crc: 0xfeed_f00d,
    };
    let bytes = cp.encode();
    assert_eq!(&bytes[0..8], b"WBCHKPT1");
    assert_eq!(u32_at(&bytes, 8), 2);
    assert_eq!(&bytes[16..32], &UUID);
    assert_eq!(u64_at(&bytes, 32), 11);
    assert_eq!(u64_at(&bytes, 40), 222);
    assert_eq!(u64_at(&bytes, 48), 33);
    assert!(bytes[56..96].iter().all(|&b| b == 0));
    assert_eq!(u64_at(&bytes, 96), 0x0a0b_0c0d);
    assert_eq!(u32_at(&bytes, 104), 77);
    assert_eq!(u32_at(&bytes, 108), 0xfeed_f00d);
    assert!(bytes[112..].iter().all(|&b| b == 0));
    assert_eq!(cp.ring_index(), 3);
}

#[test]
fn segment_header_fields_sit_at_documented_offsets() {
    let header = SegmentHeader {
        uuid: UUID,
        segment_id: 0x0102_0304,
        epoch_id: 55,
        durable_id: 0x0102_0300,
        flags: FLAG_FLUSH,
        start_block: 9,
        run_nonce: 0x1122_3344_5566_7788,
        prev_crc: 0xcafe_babe,
        entries: vec![
            Entry::data(10, 5, 0x0f, 0xdead_beef),
            Entry::range(EntryKind::WriteZeroes, 1000, 24),
        ],
    };
    let bytes = header.encode();
    assert_eq!(&bytes[0..8], b"WBSEGMT1");
    assert_eq!(u32_at(&bytes, 8), 2);
    assert_eq!(&bytes[16..32], &UUID);
    assert_eq!(u64_at(&bytes, 32), 0x0102_0304);
    assert_eq!(u64_at(&bytes, 40), 55);
    assert_eq!(u64_at(&bytes, 48), 0x0102_0300);
    assert_eq!(u32_at(&bytes, 56), 1);
    assert_eq!(ENTRY_COUNT_OFFSET, 60);
    assert_eq!(u32_at(&bytes, 60), 2);
    assert_eq!(
        (RUN_NONCE_OFFSET, START_BLOCK_OFFSET, PREV_CRC_OFFSET),
        (64, 72, 76)
    );
    assert_eq!(u64_at(&bytes, 64), 0x1122_3344_5566_7788);
    assert_eq!(u32_at(&bytes, 72), 9);
    assert_eq!(u32_at(&bytes, 76), 0xcafe_babe);
    assert_eq!(stored_record_crc(&bytes), u32_at(&bytes, 12));
    assert_eq!(header.record_crc(), u32_at(&bytes, 12));

    assert_eq!(entry_offset(0), 80);
    let e = &bytes[80..104];
    assert_eq!(u64_at(e, 0), 80);
    assert_eq!(u32_at(e, 8), 8);
    assert_eq!(u32_at(e, 12), 0xdead_beef);
    assert_eq!(ENTRY_PLACEMENT_OFFSET, 16);
    assert_eq!(e[16], 1, "kind");
    assert_eq!(e[17], 0x0f, "sector-valid");
    assert_eq!(u16::from_le_bytes([e[18], e[19]]), 5, "data slot");
    assert_eq!(u32_at(e, 16), 1 | 0x0f << 8 | 5 << 16);
    assert_eq!(u32_at(e, 20), 0);

    let r = &bytes[104..128];
    assert_eq!(u64_at(r, 0), 1000);
    assert_eq!(u32_at(r, 8), 24);
    assert_eq!(u32_at(r, 12), 0);
    assert_eq!(u32_at(r, 16), 3, "write-zeroes, no sector-valid, no slot");

    assert_eq!(MAX_ENTRIES_PER_SEGMENT, 167);
    assert!(entry_offset(MAX_ENTRIES_PER_SEGMENT) <= SEGMENT_HEADER_SIZE_BYTES);
    assert!(entry_offset(MAX_ENTRIES_PER_SEGMENT + 1) > SEGMENT_HEADER_SIZE_BYTES);
    assert!(bytes[128..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// Damage: each names the FormatError it must produce.

#[test]
fn torn_header_mixing_two_laps_is_rejected_at_every_sector_boundary() {
    let n = 16;
    let old = sample_header(5, MAX_ENTRIES_PER_SEGMENT, 1).encode();
    let new = sample_header(5 + n, MAX_ENTRIES_PER_SEGMENT, 2).encode();
    for cut in (512..SEGMENT_HEADER_SIZE_BYTES).step_by(512) {
        for (first, rest) in [(&new, &old), (&old, &new)] {
            let mut torn = rest.clone();
            torn[..cut].copy_from_slice(&first[..cut]);
            let result = SegmentHeader::decode_expecting(&torn, &UUID, 5 + n);
            assert!(
                matches!(result, Err(FormatError::BadChecksum { .. })),
                "cut at {cut}: {result:?}"
            );
        }
    }
}

#[test]
fn torn_header_with_a_zero_tail_is_rejected() {
    let new = sample_header(8, MAX_ENTRIES_PER_SEGMENT, 2).encode();
    let mut torn = vec![0u8; SEGMENT_HEADER_SIZE_BYTES];
    torn[..2048].copy_from_slice(&new[..2048]);
    assert!(matches!(
        SegmentHeader::decode(&torn, &UUID),
        Err(FormatError::BadChecksum { .. })
    ));
}

#[test]
fn torn_data_block_is_rejected_by_verify_data() {
    let (header, mut image) = sample_segment(12, 10);
    header.verify_data(&image).unwrap();
    // Second half of slot 4 still holds what the previous lap wrote there.
    let torn = data_block_offset(4) + BLOCK_SIZE_BYTES / 2;
    image[torn..data_block_offset(5)].fill(0xee);
    // The header alone cannot see it: only the per-block CRCs can.
    assert_eq!(
        SegmentHeader::decode_expecting(&image, &UUID, 12),
        Ok(header.clone())
    );
    assert_eq!(
        header.verify_data(&image),
        Err(FormatError::BadDataChecksum { data_slot: 4 })
    );
}

#[test]
fn verify_data_checks_only_the_slots_the_header_lists() {
    let (header, mut image) = sample_segment(12, 3);
    // A segment sealed early is written only as far as its used bytes; the rest is old content.
    assert_eq!(header.used_bytes(), data_block_offset(3));
    image[header.used_bytes()..].fill(0x5a);
    assert_eq!(header.verify_data(&image), Ok(()));
}

#[test]
fn stale_slot_from_an_earlier_lap_is_rejected() {
    let n = 16;
    let expected = 20;
    let stale = sample_header(expected - n, 5, 1).encode();
    assert_eq!(
        SegmentHeader::decode_expecting(&stale, &UUID, expected),
        Err(FormatError::WrongSegmentId {
            expected,
            found: expected - n,
        })
    );
}

#[test]
fn id_gap_is_rejected() {
    let next = sample_header(6, 5, 1).encode();
    assert_eq!(
        SegmentHeader::decode_expecting(&next, &UUID, 5),
        Err(FormatError::WrongSegmentId {
            expected: 5,
            found: 6,
        })
    );
}

#[test]
fn a_data_slot_beyond_the_end_of_its_slot_is_rejected() {
    // At block 120 a segment has 7 data slots: 0..=6.
    let header = SegmentHeader {
        start_block: 120,
        ..sample_header(9, 7, 1)
    };
    let bytes = header.encode();
    assert_eq!(SegmentHeader::decode(&bytes, &UUID), Ok(header.clone()));
    assert_eq!(header.used_blocks(), 8);
    let mut moved = bytes.clone();
    put_u32_at(&mut moved, START_BLOCK_OFFSET, 121);
    reseal(&mut moved);
    assert_bad_entry(&moved, 6, "beyond the end of the slot");
}

#[test]
fn a_start_block_without_room_for_data_is_rejected() {
    for block in [127u32, 128, u32::MAX] {
        let mut bytes = sample_header(9, 0, 1).encode();
        put_u32_at(&mut bytes, START_BLOCK_OFFSET, block);
        reseal(&mut bytes);
        assert!(
            matches!(
                SegmentHeader::decode(&bytes, &UUID),
                Err(FormatError::BadHeader { .. })
            ),
            "start block {block}"
        );
    }
}

/// Bytes after the entry table must be zero, so a decoded header re-encodes to the bytes read
/// and its `record_crc` is the stored one (what the chain relies on).
#[test]
fn bytes_after_the_entry_table_must_be_zero() {
    let header = sample_header(9, 3, 1);
    let mut bytes = header.encode();
    assert_eq!(header.record_crc(), stored_record_crc(&bytes));
    bytes[entry_offset(3) + 5] = 1;
    reseal(&mut bytes);
    assert_eq!(
        SegmentHeader::decode(&bytes, &UUID),
        Err(FormatError::BadHeader {
            reason: "bytes after the entry table are not zero"
        })
    );
}

#[test]
fn a_checkpoint_position_past_the_last_start_block_is_rejected() {
    let mut bytes = Checkpoint {
        uuid: UUID,
        sequence: 1,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: Default::default(),
        next_position: Position {
            slot: 1,
            block: 126,
        },
        anchor_crc: 0,
    }
    .encode();
    assert!(Checkpoint::decode(&bytes, &UUID).is_ok());
    put_u32_at(&mut bytes, 104, 127);
    reseal(&mut bytes);
    assert!(matches!(
        Checkpoint::decode(&bytes, &UUID),
        Err(FormatError::BadCheckpoint { .. })
    ));
}

#[test]
fn segment_id_zero_is_rejected_even_with_a_valid_checksum() {
    let bytes = sample_header(0, 1, 1).encode();
    assert_eq!(
        SegmentHeader::decode(&bytes, &UUID),
        Err(FormatError::WrongSegmentId {
            expected: 1,
            found: 0,
        })
    );
}

/// A leg's segment area in memory: `n` slots.
fn ring_area(n: u64) -> Vec<u8> {
    vec![0u8; n as usize * SEGMENT_SIZE_BYTES]
}

/// Writes a segment with `data_blocks` data blocks of run `nonce` at `at`, chained to `prev`;
/// returns its record CRC and the next position.
fn put_segment(
    area: &mut [u8],
    at: Position,
    id: u64,
    data_blocks: usize,
    nonce: u64,
    prev: u32,
    n: u64,
) -> (u32, Position) {
    let header = SegmentHeader {
        start_block: at.block,
        run_nonce: nonce,
        prev_crc: prev,
        ..sample_header(id, data_blocks.min(at.data_capacity()), id)
    };
    let offset = (at.offset() - SEGMENT_AREA_OFFSET) as usize;
    let crc = header.encode_into(&mut area[offset..]);
    (crc, at.next(header.used_blocks(), n))
}

/// The walk of FORMAT.md §7 over a segment area: from `start` expecting `from_id` chained to
/// `anchor`, until the first header that does not decode, carry the id, sit at its start block
/// or chain. Returns the head (last id walked) and why the walk stopped.
fn walk(area: &[u8], start: Position, from_id: u64, anchor: u32) -> (u64, String) {
    let n = (area.len() / SEGMENT_SIZE_BYTES) as u64;
    let (mut at, mut id, mut prev) = (start, from_id, anchor);
    loop {
        let offset = (at.offset() - SEGMENT_AREA_OFFSET) as usize;
        let bytes = &area[offset..offset + SEGMENT_HEADER_SIZE_BYTES];
        let h = match SegmentHeader::decode_expecting(bytes, &UUID, id) {
            Ok(h) => h,
            Err(e) => return (id - 1, e.to_string()),
        };
        if h.start_block != at.block || h.prev_crc != prev {
            return (id - 1, "broken chain".into());
        }
        prev = stored_record_crc(bytes);
        at = at.next(h.used_blocks(), n);
        id += 1;
    }
}

#[test]
fn the_walk_follows_packed_segments_across_slots() {
    let n = 16;
    let mut area = ring_area(n);
    let (mut at, mut prev) = (Position { slot: 3, block: 0 }, 0xabcd);
    for id in 10..=80u64 {
        (prev, at) = put_segment(&mut area, at, id, (id % 5) as usize, 1, prev, n);
    }
    let (head, why) = walk(&area, Position { slot: 3, block: 0 }, 10, 0xabcd);
    assert_eq!(head, 80, "{why}");
    assert!(why.contains("bad magic"), "{why}");
    // From the wrong anchor nothing is taken.
    let (head, why) = walk(&area, Position { slot: 3, block: 0 }, 10, 0xabce);
    assert_eq!((head, why.as_str()), (9, "broken chain"));
}

/// A segment of an earlier run that was in flight at a crash stays valid on disk. The new run
/// writes its own segments from the head on; where the old one sits right behind them with the
/// expected id, the chain (its `prev_crc` names the old run's header) keeps it out.
#[test]
fn an_old_runs_segment_behind_the_head_is_never_spliced_onto_a_new_one() {
    let n = 16;
    let mut area = ring_area(n);
    let start = Position { slot: 0, block: 0 };
    // Run 1: ids 1..=3; 4 and 5 were in flight (4 torn, 5 whole).
    let (crc1, p2) = put_segment(&mut area, start, 1, 1, 111, 0, n);
    let (crc2, p3) = put_segment(&mut area, p2, 2, 1, 111, crc1, n);
    let (crc3, p4) = put_segment(&mut area, p3, 3, 1, 111, crc2, n);
    let (old4, p5) = put_segment(&mut area, p4, 4, 1, 111, crc3, n);
    put_segment(&mut area, p5, 5, 1, 111, old4, n);
    let torn = (p4.offset() - SEGMENT_AREA_OFFSET) as usize + 2048;
    area[torn..torn + 512].fill(0xee);
    assert_eq!(walk(&area, start, 1, 0).0, 3);
    // Run 2 writes a new 4 with the same size, so the old 5 sits exactly where the new 5 goes.
    let (_, new_p5) = put_segment(&mut area, p4, 4, 1, 222, crc3, n);
    assert_eq!(new_p5, p5);
    let (head, why) = walk(&area, start, 1, 0);
    assert_eq!((head, why.as_str()), (4, "broken chain"));
}

#[test]
fn foreign_uuid_is_rejected() {
    let header = sample_header(3, 4, 1).encode();
    assert_eq!(
        SegmentHeader::decode(&header, &OTHER_UUID),
        Err(FormatError::ForeignUuid {
            record: "segment header"
        })
    );
    let cp = Checkpoint {
        uuid: UUID,
        sequence: 1,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: Default::default(),
        next_position: Position::default(),
        anchor_crc: 0,
    }
    .encode();
    assert_eq!(
        Checkpoint::decode(&cp, &OTHER_UUID),
        Err(FormatError::ForeignUuid {
            record: "checkpoint"
        })
    );
}

/// The version is checked before the checksum (a future version may checksum differently), so
/// both a bare version change and a properly resealed future record are refused as such.
#[test]
fn wrong_version_is_rejected_in_every_record() {
    let cp = Checkpoint {
        uuid: UUID,
        sequence: 1,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: Default::default(),
        next_position: Position::default(),
        anchor_crc: 0,
    };
    let records: [(&str, Vec<u8>); 3] = [
        ("superblock", sample_superblock().encode()),
        ("checkpoint", cp.encode()),
        ("segment header", sample_header(3, 4, 1).encode()),
    ];
    for (record, good) in records {
        for resealed in [false, true] {
            let mut bytes = good.clone();
            put_u32_at(&mut bytes, 8, 1);
            if resealed {
                reseal(&mut bytes);
            }
            let result = match record {
                "superblock" => Superblock::decode(&bytes).map(|_| ()),
                "checkpoint" => Checkpoint::decode(&bytes, &UUID).map(|_| ()),
                _ => SegmentHeader::decode(&bytes, &UUID).map(|_| ()),
            };
            assert_eq!(
                result,
                Err(FormatError::UnsupportedVersion { record, version: 1 }),
                "resealed: {resealed}"
            );
        }
    }
}

#[test]
fn bad_magic_is_rejected_in_every_record() {
    let mut sb = sample_superblock().encode();
    sb[0..8].copy_from_slice(b"EXT4SUPR");
    assert_eq!(
        Superblock::decode(&sb),
        Err(FormatError::BadMagic {
            record: "superblock"
        })
    );
    // A checkpoint is not a segment header even with a valid checksum of its own.
    let cp = Checkpoint {
        uuid: UUID,
        sequence: 1,
        last_written_back_id: 0,
        last_written_back_epoch: 0,
        faults: Default::default(),
        next_position: Position::default(),
        anchor_crc: 0,
    }
    .encode();
    assert_eq!(
        SegmentHeader::decode(&cp, &UUID),
        Err(FormatError::BadMagic {
            record: "segment header"
        })
    );
    let header = sample_header(3, 4, 1).encode();
    assert_eq!(
        Checkpoint::decode(&header, &UUID),
        Err(FormatError::BadMagic {
            record: "checkpoint"
        })
    );
}

#[test]
fn truncated_records_are_rejected() {
    let sb = sample_superblock().encode();
    assert_eq!(
        Superblock::decode(&sb[..4095]),
        Err(FormatError::Truncated {
            record: "superblock",
            needed: 4096,
            got: 4095,
        })
    );
    let header = sample_header(3, 4, 1).encode();
    assert_eq!(
        SegmentHeader::decode(&header[..100], &UUID),
        Err(FormatError::Truncated {
            record: "segment header",
            needed: 4096,
            got: 100,
        })
    );
    assert_eq!(
        Checkpoint::decode(&[], &UUID),
        Err(FormatError::Truncated {
            record: "checkpoint",
            needed: 4096,
            got: 0,
        })
    );
}

#[test]
fn too_many_entries_is_rejected() {
    for count in [MAX_ENTRIES_PER_SEGMENT as u32 + 1, u32::MAX] {
        let mut bytes = sample_header(3, MAX_ENTRIES_PER_SEGMENT, 1).encode();
        put_u32_at(&mut bytes, ENTRY_COUNT_OFFSET, count);
        reseal(&mut bytes);
        assert_eq!(
            SegmentHeader::decode(&bytes, &UUID),
            Err(FormatError::TooManyEntries {
                count: count as usize,
                max: MAX_ENTRIES_PER_SEGMENT,
            })
        );
    }
}

#[test]
fn entry_of_unknown_kind_is_rejected() {
    for kind in [0u8, 4, 0xff] {
        let mut raw = raw_entry(&Entry::data(1, 0, ALL_SECTORS_VALID, 0));
        raw[16] = kind;
        assert_bad_entry(&header_with_raw_entry(2, raw), 2, "unknown kind");
    }
}

#[test]
fn misaligned_data_entry_is_rejected() {
    let mut entry = Entry::data(1, 0, ALL_SECTORS_VALID, 0);
    entry.start_sector += 1;
    assert_bad_entry(&header_with_raw_entry(2, raw_entry(&entry)), 2, "aligned");
}

#[test]
fn data_entry_not_covering_one_block_is_rejected() {
    let mut entry = Entry::data(1, 0, ALL_SECTORS_VALID, 0);
    entry.length_sectors = 16;
    assert_bad_entry(&header_with_raw_entry(0, raw_entry(&entry)), 0, "one block");
}

#[test]
fn data_entry_without_valid_sectors_is_rejected() {
    let entry = Entry::data(1, 0, 0, 0);
    assert_bad_entry(
        &header_with_raw_entry(1, raw_entry(&entry)),
        1,
        "no valid sector",
    );
}

#[test]
fn data_slot_out_of_range_is_rejected() {
    let entry = Entry::data(1, DATA_BLOCKS_PER_SEGMENT as u16, ALL_SECTORS_VALID, 0);
    assert_bad_entry(
        &header_with_raw_entry(1, raw_entry(&entry)),
        1,
        "out of range",
    );
}

#[test]
fn duplicate_data_slot_is_rejected() {
    // sample_header gives entry i data slot i; entry 3 reuses slot 1.
    let entry = Entry::data(999, 1, ALL_SECTORS_VALID, 0);
    assert_bad_entry(
        &header_with_raw_entry(3, raw_entry(&entry)),
        3,
        "used twice",
    );
}

#[test]
fn entry_with_reserved_bytes_set_is_rejected() {
    let mut raw = raw_entry(&Entry::data(1, 9, ALL_SECTORS_VALID, 0));
    raw[23] = 1;
    assert_bad_entry(&header_with_raw_entry(2, raw), 2, "reserved");
}

#[test]
fn empty_range_entry_is_rejected() {
    let mut entry = Entry::range(EntryKind::Discard, 64, 8);
    entry.length_sectors = 0;
    assert_bad_entry(
        &header_with_raw_entry(1, raw_entry(&entry)),
        1,
        "empty range",
    );
}

#[test]
fn range_entry_with_data_fields_is_rejected() {
    let base = Entry::range(EntryKind::WriteZeroes, 64, 8);
    for entry in [
        Entry {
            data_crc: 1,
            ..base
        },
        Entry {
            sector_valid: 1,
            ..base
        },
        Entry {
            data_slot: 1,
            ..base
        },
    ] {
        assert_bad_entry(
            &header_with_raw_entry(1, raw_entry(&entry)),
            1,
            "data fields",
        );
    }
}

#[test]
fn range_entry_past_the_end_of_sector_space_is_rejected() {
    let entry = Entry::range(EntryKind::Discard, u64::MAX - 3, 8);
    assert_bad_entry(&header_with_raw_entry(1, raw_entry(&entry)), 1, "overflows");
    // The last possible range is fine.
    let last = Entry::range(EntryKind::Discard, u64::MAX - 8, 8);
    assert_eq!(Entry::decode(&raw_entry(&last), 0), Ok(last));
}

// ---------------------------------------------------------------------------------------------
// Checkpoint ring.

fn ring_with(sequences: impl IntoIterator<Item = u64>) -> Vec<u8> {
    let mut ring = vec![0u8; CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES];
    for sequence in sequences {
        let cp = Checkpoint {
            uuid: UUID,
            sequence,
            last_written_back_id: sequence * 10,
            last_written_back_epoch: sequence,
            faults: Default::default(),
            next_position: Position::default(),
            anchor_crc: 0,
        };
        let at = cp.ring_index() * CHECKPOINT_SLOT_SIZE_BYTES;
        ring[at..at + CHECKPOINT_SLOT_SIZE_BYTES].copy_from_slice(&cp.encode());
    }
    ring
}

#[test]
fn newest_valid_checkpoint_wins_wherever_it_sits() {
    // Sequences 3..=10 after wrapping: the newest (10) sits in slot 2, not the last slot.
    let ring = ring_with(0..=10);
    let newest = Checkpoint::newest_in_ring(&ring, &UUID).unwrap();
    assert_eq!(newest.sequence, 10);
    assert_eq!(newest.last_written_back_id, 100);
}

#[test]
fn torn_newest_checkpoint_falls_back_to_the_previous_one() {
    let mut ring = ring_with(0..=10);
    let at = 10 % CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES;
    // Only the first sector of the new checkpoint reached the device; the slot held sequence 2.
    let mut torn = ring_with([2])[at..at + CHECKPOINT_SLOT_SIZE_BYTES].to_vec();
    torn[..512].copy_from_slice(&ring[at..at + 512]);
    torn[600] ^= 0x40;
    ring[at..at + CHECKPOINT_SLOT_SIZE_BYTES].copy_from_slice(&torn);
    assert!(matches!(
        Checkpoint::decode(&torn, &UUID),
        Err(FormatError::BadChecksum { .. })
    ));
    let newest = Checkpoint::newest_in_ring(&ring, &UUID).unwrap();
    assert_eq!(newest.sequence, 9);
    assert_eq!(newest.last_written_back_id, 90);
}

#[test]
fn checkpoint_of_another_cache_set_is_ignored_in_the_ring() {
    let mut ring = ring_with(0..=4);
    let foreign = Checkpoint {
        uuid: OTHER_UUID,
        sequence: 1000,
        last_written_back_id: 1,
        last_written_back_epoch: 1,
        faults: Default::default(),
        next_position: Position::default(),
        anchor_crc: 0,
    };
    let at = foreign.ring_index() * CHECKPOINT_SLOT_SIZE_BYTES;
    ring[at..at + CHECKPOINT_SLOT_SIZE_BYTES].copy_from_slice(&foreign.encode());
    assert_eq!(
        Checkpoint::newest_in_ring(&ring, &UUID).map(|c| c.sequence),
        Some(4)
    );
}

#[test]
fn ring_without_a_valid_checkpoint_gives_none() {
    let ring = vec![0u8; CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES];
    assert_eq!(Checkpoint::newest_in_ring(&ring, &UUID), None);
    assert_eq!(Checkpoint::newest_in_ring(&[], &UUID), None);
    // A ring cut short mid-slot reads the whole slots it has.
    let ring = ring_with(0..=1);
    assert_eq!(
        Checkpoint::newest_in_ring(&ring[..CHECKPOINT_SLOT_SIZE_BYTES + 100], &UUID)
            .map(|c| c.sequence),
        Some(0)
    );
}

// ---------------------------------------------------------------------------------------------
// Superblock field validation.

fn assert_bad_superblock(bytes: &[u8], reason_contains: &str) {
    match Superblock::decode(bytes) {
        Err(FormatError::BadSuperblock { reason }) => assert!(
            reason.contains(reason_contains),
            "reason {reason:?} does not mention {reason_contains:?}"
        ),
        other => panic!("expected BadSuperblock ({reason_contains}), got {other:?}"),
    }
}

#[test]
fn superblock_with_leg_index_out_of_range_is_rejected() {
    for (leg_count, leg_index) in [(2, 2), (1, 1), (0, 0), (3, 0)] {
        let sb = Superblock {
            leg_count,
            leg_index,
            ..sample_superblock()
        };
        assert_bad_superblock(&sb.encode(), "leg");
    }
}

#[test]
fn superblock_with_odd_logical_block_size_is_rejected() {
    for lbs in [0, 1024, 8192] {
        let sb = Superblock {
            logical_block_size: lbs,
            ..sample_superblock()
        };
        assert_bad_superblock(&sb.encode(), "logical block size");
    }
}

#[test]
fn superblock_with_too_few_segments_is_rejected() {
    let sb = Superblock {
        segment_count: MIN_SEGMENTS - 1,
        ..sample_superblock()
    };
    assert_bad_superblock(&sb.encode(), "fewer segments");
    let sb = Superblock {
        segment_count: MIN_SEGMENTS,
        ..sample_superblock()
    };
    assert!(Superblock::decode(&sb.encode()).is_ok());
}

#[test]
fn superblock_with_more_segments_than_a_device_can_hold_is_rejected() {
    let max = (u64::MAX - SEGMENT_AREA_OFFSET) / SEGMENT_SIZE_BYTES as u64;
    for segment_count in [max + 1, u64::MAX] {
        let sb = Superblock {
            segment_count,
            ..sample_superblock()
        };
        assert_bad_superblock(&sb.encode(), "more segments");
    }
    let sb = Superblock {
        segment_count: max,
        ..sample_superblock()
    };
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
}

#[test]
fn superblock_with_partial_backing_blocks_is_rejected() {
    for size in [0, 4097, (1 << 30) + 512] {
        let sb = Superblock {
            backing_size_bytes: size,
            ..sample_superblock()
        };
        assert_bad_superblock(&sb.encode(), "backing size");
    }
}

#[test]
fn superblock_with_another_segment_size_is_rejected() {
    let mut bytes = sample_superblock().encode();
    put_u32_at(&mut bytes, 56, 256 * 1024);
    reseal(&mut bytes);
    assert_bad_superblock(&bytes, "segment size");
}

// ---------------------------------------------------------------------------------------------
// RAM buffer file.

fn buffer_file(buffer_count: usize) -> Vec<u8> {
    let mut file = vec![0u8; buffer_file::file_size(buffer_count)];
    buffer_file::encode_header(&mut file, buffer_count, &UUID);
    file
}

#[test]
fn buffer_file_layout() {
    assert_eq!(buffer_file::BUFFER_FILE_HEADER_BYTES, 4096);
    assert_eq!(buffer_file::OWNER_WORDS_OFFSET, 64);
    assert_eq!(buffer_file::MAX_BUFFERS, 504);
    assert_eq!(buffer_file::owner_word_offset(2), 80);
    assert_eq!(buffer_file::owner_word(42, 9), 42 << 8 | 9);
    assert_eq!(buffer_file::owner_parts(42 << 8 | 9), (42, 9));
    assert_eq!(buffer_file::buffer_offset(0), 4096);
    assert_eq!(buffer_file::buffer_offset(2), 4096 + 2 * 524_288);
    assert_eq!(buffer_file::file_size(3), 4096 + 3 * 524_288);
    // Publication relies on single aligned stores of the count and of placement words.
    for buffer in 0..buffer_file::MAX_BUFFERS {
        let image = buffer_file::buffer_offset(buffer);
        assert_eq!((image + ENTRY_COUNT_OFFSET) % 4, 0);
        for i in 0..MAX_ENTRIES_PER_SEGMENT {
            assert_eq!((image + entry_offset(i) + ENTRY_PLACEMENT_OFFSET) % 4, 0);
        }
        assert_eq!(buffer_file::owner_word_offset(buffer) % 8, 0);
    }
}

#[test]
fn buffer_file_header_round_trips() {
    for count in [1, 3] {
        let file = buffer_file(count);
        assert_eq!(&file[0..8], b"WBRAMBF1");
        assert_eq!(u32_at(&file, 8), FORMAT_VERSION);
        assert_eq!(u32_at(&file, 12), count as u32);
        assert_eq!(&file[16..32], &UUID);
        assert_eq!(buffer_file::decode_header(&file, &UUID), Ok(count));
        // A fresh file has every buffer free.
        for i in 0..count {
            assert_eq!(u64_at(&file, buffer_file::owner_word_offset(i)), 0);
        }
    }
}

#[test]
fn buffer_file_of_another_cache_set_is_refused() {
    let file = buffer_file(2);
    assert_eq!(
        buffer_file::decode_header(&file, &OTHER_UUID),
        Err(FormatError::ForeignUuid {
            record: "RAM buffer file"
        })
    );
}

#[test]
fn buffer_file_with_bad_magic_or_version_is_refused() {
    let mut file = buffer_file(1);
    file[0] = b'X';
    assert_eq!(
        buffer_file::decode_header(&file, &UUID),
        Err(FormatError::BadMagic {
            record: "RAM buffer file"
        })
    );
    let mut file = buffer_file(1);
    put_u32_at(&mut file, 8, 7);
    assert_eq!(
        buffer_file::decode_header(&file, &UUID),
        Err(FormatError::UnsupportedVersion {
            record: "RAM buffer file",
            version: 7,
        })
    );
}

#[test]
fn buffer_file_shorter_than_its_buffers_is_refused() {
    let file = buffer_file(2);
    let short = &file[..buffer_file::file_size(2) - 1];
    assert_eq!(
        buffer_file::decode_header(short, &UUID),
        Err(FormatError::Truncated {
            record: "RAM buffer file",
            needed: buffer_file::file_size(2),
            got: buffer_file::file_size(2) - 1,
        })
    );
    for bogus in [0u32, buffer_file::MAX_BUFFERS as u32 + 1] {
        let mut file = buffer_file(1);
        put_u32_at(&mut file, 12, bogus);
        assert!(matches!(
            buffer_file::decode_header(&file, &UUID),
            Err(FormatError::Truncated { .. })
        ));
    }
}

/// An unsealed segment image as the writer leaves it: entries written, count stored last.
fn unsealed_image(entries: &[Entry], published: u32) -> Vec<u8> {
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    for (i, entry) in entries.iter().enumerate() {
        entry.encode_into(&mut image[entry_offset(i)..entry_offset(i + 1)]);
    }
    put_u32_at(&mut image, ENTRY_COUNT_OFFSET, published);
    image
}

/// Begins segment `id` at block `block` of a slot image with `entries` published, sealed or not
/// (the magic), as the engine does (FORMAT.md §6.1).
fn begin_in_image(image: &mut [u8], block: u32, id: u64, entries: &[Entry], sealed: bool) {
    let at = block as usize * BLOCK_SIZE_BYTES;
    let header = &mut image[at..at + SEGMENT_HEADER_SIZE_BYTES];
    header.fill(0);
    for (i, entry) in entries.iter().enumerate() {
        entry.encode_into(&mut header[entry_offset(i)..entry_offset(i + 1)]);
    }
    put_u32_at(header, ENTRY_COUNT_OFFSET, entries.len() as u32);
    header[SEGMENT_ID_OFFSET..SEGMENT_ID_OFFSET + 8].copy_from_slice(&id.to_le_bytes());
    if sealed {
        header[0..8].copy_from_slice(SEGMENT_MAGIC);
    }
}

fn data_entries(first_block: u64, count: u16) -> Vec<Entry> {
    (0..count)
        .map(|i| Entry::data(first_block + i as u64, i, ALL_SECTORS_VALID, 0))
        .collect()
}

#[test]
fn the_walk_of_a_slot_image_finds_its_segments_where_they_were_placed() {
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    // Stale header blocks of an earlier use of the buffer: lower ids.
    begin_in_image(&mut image, 4, 3, &data_entries(0, 1), true);
    begin_in_image(&mut image, 6, 4, &data_entries(0, 1), true);
    // This use: 20 at block 2 (2 data blocks), 21 at 5 (1), 22 at 7, open.
    begin_in_image(&mut image, 2, 20, &data_entries(100, 2), true);
    begin_in_image(&mut image, 5, 21, &data_entries(200, 1), true);
    begin_in_image(&mut image, 7, 22, &data_entries(300, 3), false);
    let found = buffer_file::walk_image(&image, buffer_file::owner_word(20, 2));
    let ids: Vec<(u64, u32, usize)> = found
        .iter()
        .map(|p| (p.segment_id, p.start_block, p.entries.len()))
        .collect();
    assert_eq!(ids, vec![(20, 2, 2), (21, 5, 1), (22, 7, 3)]);
}

#[test]
fn the_walk_stops_at_the_open_segment_and_at_stale_ids() {
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    begin_in_image(&mut image, 0, 20, &data_entries(100, 1), true);
    // Where 21 would go, an earlier use left segment 9: a lower id ends the walk.
    begin_in_image(&mut image, 2, 9, &data_entries(100, 1), true);
    assert_eq!(
        buffer_file::walk_image(&image, buffer_file::owner_word(20, 0)).len(),
        1
    );
    // The open segment 21 freed data slot 1 by a rewrite: that block holds user data that looks
    // like a header of 22. The open segment has no magic, so the walk never reads it.
    begin_in_image(&mut image, 2, 21, &data_entries(100, 1), false);
    begin_in_image(&mut image, 4, 22, &data_entries(500, 1), true);
    let found = buffer_file::walk_image(&image, buffer_file::owner_word(20, 0));
    assert_eq!(
        found.iter().map(|p| p.segment_id).collect::<Vec<_>>(),
        vec![20, 21]
    );
    // The owner's id must be at the owner's block.
    assert!(buffer_file::walk_image(&image, buffer_file::owner_word(20, 2)).is_empty());
    assert!(buffer_file::walk_image(&image, 0).is_empty());
}

#[test]
fn published_entries_stop_at_a_data_slot_beyond_the_slot() {
    let entries = vec![
        Entry::data(1, 0, ALL_SECTORS_VALID, 0),
        Entry::data(2, 3, ALL_SECTORS_VALID, 0),
    ];
    let image = unsealed_image(&entries, 2);
    assert_eq!(buffer_file::published_entries(&image, 0), entries);
    // At block 124 a segment has 3 data slots (0..3): slot 3 would be past the slot's end.
    assert_eq!(
        buffer_file::published_entries(&image, 124),
        entries[..1].to_vec()
    );
}

fn five_entries() -> Vec<Entry> {
    (0..5)
        .map(|i| Entry::data(100 + i, i as u16, ALL_SECTORS_VALID, 0))
        .collect()
}

#[test]
fn published_entries_stop_at_the_entry_count() {
    let entries = five_entries();
    // Entries 3 and 4 are written but their count store has not happened: not published.
    let image = unsealed_image(&entries, 3);
    assert_eq!(
        buffer_file::published_entries(&image, 0),
        entries[..3].to_vec()
    );
    assert_eq!(
        buffer_file::published_entries(&unsealed_image(&entries, 0), 0),
        vec![]
    );
}

#[test]
fn published_entries_stop_at_the_first_invalid_entry() {
    let entries = five_entries();
    let mut image = unsealed_image(&entries, 5);
    image[entry_offset(2)..entry_offset(3)].fill(0);
    assert_eq!(
        buffer_file::published_entries(&image, 0),
        entries[..2].to_vec()
    );
}

#[test]
fn published_entries_clamp_a_wild_count() {
    let entries: Vec<Entry> = (0..MAX_ENTRIES_PER_SEGMENT as u64)
        .map(|i| Entry::range(EntryKind::Discard, i * 8, 8))
        .collect();
    let image = unsealed_image(&entries, u32::MAX);
    assert_eq!(buffer_file::published_entries(&image, 0), entries);
}

#[test]
fn rewrite_switches_one_placement_word() {
    let entries = five_entries();
    let mut image = unsealed_image(&entries, 5);
    // Block 102 rewritten into free slot 9 with only its first sector: one aligned 32-bit store.
    let moved = Entry {
        data_slot: 9,
        sector_valid: 0x01,
        ..entries[2]
    };
    let at = entry_offset(2) + ENTRY_PLACEMENT_OFFSET;
    image[at..at + 4].copy_from_slice(&moved.placement_word().to_le_bytes());
    let published = buffer_file::published_entries(&image, 0);
    assert_eq!(published[2], moved);
    assert_eq!(published.len(), 5);
}

/// What a successor does with an adopted buffer: recompute the block CRCs, seal a real header.
#[test]
fn published_entries_rebuild_into_a_valid_segment() {
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    let entries = [
        Entry::data(40, 0, ALL_SECTORS_VALID, 0),
        Entry::range(EntryKind::Discard, 0, 64),
        Entry::data(41, 1, 0x0f, 0),
    ];
    for (i, entry) in entries.iter().enumerate() {
        entry.encode_into(&mut image[entry_offset(i)..entry_offset(i + 1)]);
    }
    image[data_block_offset(0)..data_block_offset(2)].fill(0x33);
    put_u32_at(&mut image, ENTRY_COUNT_OFFSET, 3);

    let rebuilt: Vec<Entry> = buffer_file::published_entries(&image, 0)
        .into_iter()
        .map(|e| match e.kind {
            EntryKind::Data => {
                let slot = e.data_slot as usize;
                Entry {
                    data_crc: block_crc(
                        &image[data_block_offset(slot)..data_block_offset(slot + 1)],
                    ),
                    ..e
                }
            }
            _ => e,
        })
        .collect();
    let header = SegmentHeader {
        uuid: UUID,
        segment_id: 41,
        epoch_id: 2,
        durable_id: 40,
        flags: 0,
        start_block: 0,
        run_nonce: 0x6e6f_6e63_6500_0001,
        prev_crc: 0,
        entries: rebuilt,
    };
    header.encode_into(&mut image);
    let decoded = SegmentHeader::decode_expecting(&image, &UUID, 41).unwrap();
    assert_eq!(decoded.entries.len(), 3);
    assert_eq!(decoded.verify_data(&image), Ok(()));
}

#[test]
fn buffer_file_owners_are_read_without_a_cache_set() {
    let uuid = [7u8; 16];
    let mut header = vec![0u8; buffer_file::BUFFER_FILE_HEADER_BYTES];
    buffer_file::encode_header(&mut header, 4, &uuid);
    let owners = buffer_file::peek_owners(&header).expect("a buffer file header");
    assert_eq!(owners.uuid, uuid);
    assert!(owners.segments.is_empty(), "a fresh file owns nothing");
    header[buffer_file::owner_word_offset(1)..][..8]
        .copy_from_slice(&(42u64 << 8 | 3).to_le_bytes());
    header[buffer_file::owner_word_offset(3)..][..8].copy_from_slice(&(43u64 << 8).to_le_bytes());
    assert_eq!(
        buffer_file::peek_owners(&header).unwrap().segments,
        vec![42, 43]
    );
    // An owner word past the buffer count is not a buffer.
    header[buffer_file::owner_word_offset(4)..][..8].copy_from_slice(&(44u64 << 8).to_le_bytes());
    assert_eq!(
        buffer_file::peek_owners(&header).unwrap().segments,
        vec![42, 43]
    );
    header[0] ^= 1;
    assert_eq!(buffer_file::peek_owners(&header), None, "bad magic");
    assert_eq!(buffer_file::peek_owners(&header[..100]), None, "too short");
}
