#![no_main]

mod common;

use common::*;
use libfuzzer_sys::fuzz_target;
use logfmt::*;

/// Bytes of the superblock that carry fields; the rest is zero padding.
const DEFINED: usize = 92;

/// The valid record `FROM_TEMPLATE` inputs edit.
fn template() -> Vec<u8> {
    Superblock {
        uuid: *b"fuzz-cache-set-!",
        backing_size_bytes: 1 << 40,
        backing_fingerprint: *b"backing-identity",
        logical_block_size: 512,
        segment_count: 4096,
        leg_count: 2,
        leg_index: 1,
        created_unix_secs: 1_700_000_000,
        leg_incarnation: 0,
    }
    .encode()
}

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);

    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = shaped(&template(), rest, mode);
    repair(&mut bytes, mode, SUPERBLOCK_MAGIC);

    let Ok(sb) = Superblock::decode(&bytes) else {
        return;
    };
    assert!(sb.leg_index < sb.leg_count);
    assert!(sb.segment_count >= MIN_SEGMENTS);
    // Geometry derived from an accepted superblock must be computable.
    assert_eq!(segment_count_for(sb.leg_size_bytes()), sb.segment_count);
    let encoded = sb.encode();
    assert_eq!(Superblock::decode(&encoded).as_ref(), Ok(&sb));
    assert_reencodes(&bytes, &encoded, DEFINED);
});
