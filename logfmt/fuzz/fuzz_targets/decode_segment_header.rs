#![no_main]

mod common;

use common::*;
use libfuzzer_sys::fuzz_target;
use logfmt::*;

/// The valid record `FROM_TEMPLATE` inputs edit.
fn template() -> Vec<u8> {
    let entries = (0..40u16)
        .map(|i| match i % 4 {
            0 => Entry::range(EntryKind::Discard, i as u64 * 64, 16),
            1 => Entry::range(EntryKind::WriteZeroes, i as u64 * 64, 9),
            _ => Entry::data(
                i as u64 * 3,
                i,
                ALL_SECTORS_VALID >> (i % 8),
                0x1234_5678 + i as u32,
            ),
        })
        .collect();
    SegmentHeader {
        uuid: *b"fuzz-cache-set-!",
        segment_id: 1000,
        epoch_id: 10,
        durable_id: 998,
        flags: FLAG_FLUSH,
        start_block: 0,
        run_nonce: 0x0123_4567_89ab_cdef,
        prev_crc: 0xfeed_beef,
        entries,
    }
    .encode()
}

fuzz_target!(|data: &[u8]| {
    // Any length, unrepaired: the length, magic, version and checksum checks.
    let _ = SegmentHeader::decode(data, &uuid_of(data));

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = shaped(&template(), rest, mode);
    repair(&mut bytes, mode, SEGMENT_MAGIC);
    let uuid = uuid_of(&bytes);

    for i in 0..MAX_ENTRIES_PER_SEGMENT {
        let raw = &bytes[entry_offset(i)..entry_offset(i + 1)];
        if let Ok(entry) = Entry::decode(raw, i) {
            assert_entry_reencodes(raw, &entry);
        }
    }

    let Ok(header) = SegmentHeader::decode(&bytes, &uuid) else {
        return;
    };
    assert!(header.segment_id >= 1);
    assert!(header.entries.len() <= MAX_ENTRIES_PER_SEGMENT);
    let encoded = header.encode();
    assert_eq!(
        SegmentHeader::decode_expecting(&encoded, &uuid, header.segment_id).as_ref(),
        Ok(&header)
    );
    assert_reencodes(&bytes, &encoded, entry_offset(header.entries.len()));

    // Whatever a valid header lists must lie inside its segment.
    assert!(header.used_bytes() <= SEGMENT_SIZE_BYTES);
    let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
    image[..SEGMENT_HEADER_SIZE_BYTES].copy_from_slice(&encoded);
    let _ = header.verify_data(&image);
});
