#![no_main]

mod common;

use common::*;
use libfuzzer_sys::fuzz_target;
use logfmt::buffer_file::*;
use logfmt::*;

/// The image `FROM_TEMPLATE` inputs edit: 30 published entries of every kind, no checksum (an
/// unsealed image has none).
fn template() -> Vec<u8> {
    let mut image = vec![0u8; SEGMENT_HEADER_SIZE_BYTES];
    for i in 0..30usize {
        let entry = match i % 3 {
            0 => Entry::range(EntryKind::Discard, i as u64 * 64, 8),
            1 => Entry::range(EntryKind::WriteZeroes, i as u64 * 64, 3),
            _ => Entry::data(i as u64, i as u16, ALL_SECTORS_VALID, 0),
        };
        entry.encode_into(&mut image[entry_offset(i)..entry_offset(i + 1)]);
    }
    image[ENTRY_COUNT_OFFSET..ENTRY_COUNT_OFFSET + 4].copy_from_slice(&30u32.to_le_bytes());
    image
}

fuzz_target!(|data: &[u8]| {
    // The input as a buffer file header (any length).
    if let Ok(count) = decode_header(data, &uuid_of(data)) {
        assert!((1..=MAX_BUFFERS).contains(&count));
        assert!(data.len() >= file_size(count));
    }

    // The input as the header block of an unsealed segment image: everything
    // `published_entries` reads lies in it.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let image = shaped(&template(), rest, mode);
    // The start block comes from the input too: it bounds the data slots that may be published.
    let start_block = (mode as u32 >> 3) % (MAX_START_BLOCK as u32 + 1);
    let entries = published_entries(&image, start_block);
    let count = u32::from_le_bytes(
        image[ENTRY_COUNT_OFFSET..ENTRY_COUNT_OFFSET + 4]
            .try_into()
            .unwrap(),
    );
    let limit = (count as usize).min(MAX_ENTRIES_PER_SEGMENT);
    assert!(entries.len() <= limit);
    for (i, entry) in entries.iter().enumerate() {
        assert_entry_reencodes(&image[entry_offset(i)..entry_offset(i + 1)], entry);
    }
    // It stopped early only at an entry that does not decode or names a slot beyond the slot.
    if entries.len() < limit {
        let i = entries.len();
        match Entry::decode(&image[entry_offset(i)..entry_offset(i + 1)], i) {
            Err(_) => {}
            Ok(e) => assert!(
                e.kind == EntryKind::Data && e.data_slot as usize >= data_capacity(start_block)
            ),
        }
    }
    // The walk of a slot image never panics and only grows ids.
    let mut slot = vec![0u8; SEGMENT_SIZE_BYTES];
    slot[..image.len().min(SEGMENT_SIZE_BYTES)].copy_from_slice(&image[..image.len().min(SEGMENT_SIZE_BYTES)]);
    let found = walk_image(&slot, u64::from_le_bytes(image[32..40].try_into().unwrap()));
    assert!(found.windows(2).all(|w| w[1].segment_id == w[0].segment_id + 1));
});
