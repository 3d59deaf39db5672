//! Shared by the fuzz targets. A checksum is a wall the fuzzer rarely climbs on its own, and a
//! field deep in a zero-padded record is one it rarely reaches, so mode bits (usually the first
//! input byte) let an input start from a valid record, XOR the rest of the input over it, and
//! have its prologue and CRC repaired: that is how inputs reach the checks behind the checksum.

#![allow(dead_code)]

use logfmt::*;

/// Mode bits taken from the first input byte.
pub const FIX_PROLOGUE: u8 = 1;
pub const FIX_CRC: u8 = 2;
pub const FROM_TEMPLATE: u8 = 4;

/// `data` XORed over `template` (or over zeros), cut or padded to `template`'s length: a zero
/// byte keeps the template's byte, so small inputs are small edits of a valid record.
pub fn shaped(template: &[u8], data: &[u8], mode: u8) -> Vec<u8> {
    let mut out = if mode & FROM_TEMPLATE != 0 {
        template.to_vec()
    } else {
        vec![0u8; template.len()]
    };
    for (o, d) in out.iter_mut().zip(data) {
        *o ^= d;
    }
    out
}

/// Applies the repairs `mode` asks for to a 4 KiB self-checksummed record.
pub fn repair(bytes: &mut [u8], mode: u8, magic: &[u8; 8]) {
    if mode & FIX_PROLOGUE != 0 {
        bytes[0..8].copy_from_slice(magic);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    }
    if mode & FIX_CRC != 0 {
        let crc = crc32c_with_hole(bytes, RECORD_CRC_OFFSET);
        bytes[RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The UUID stored in a record (bytes 16..32), so decodes get past the cache-set check.
pub fn uuid_of(bytes: &[u8]) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if bytes.len() >= 32 {
        uuid.copy_from_slice(&bytes[16..32]);
    }
    uuid
}

/// A re-encoding of a record that decoded must reproduce every byte it defines (`..defined`,
/// CRC aside), and the whole record, CRC included, when the rest is zero as the encoder writes it.
pub fn assert_reencodes(original: &[u8], encoded: &[u8], defined: usize) {
    assert_eq!(original.len(), encoded.len());
    let crc = RECORD_CRC_OFFSET..RECORD_CRC_OFFSET + 4;
    assert_eq!(original[..crc.start], encoded[..crc.start]);
    assert_eq!(original[crc.end..defined], encoded[crc.end..defined]);
    if original[defined..].iter().all(|&b| b == 0) {
        assert_eq!(original, encoded);
    }
}

/// An entry that decoded is 24 fully defined bytes: it must re-encode exactly.
pub fn assert_entry_reencodes(raw: &[u8], entry: &Entry) {
    let mut out = [0u8; ENTRY_SIZE_BYTES];
    entry.encode_into(&mut out);
    assert_eq!(raw, &out[..]);
}
