//! Why a record failed to decode. Every variant names the record and the reason, because these
//! end up in front of an administrator (`wbctl check`, a refused `create`).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("{record}: truncated ({got} bytes, need {needed})")]
    Truncated {
        record: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("{record}: bad magic (not a writeboost record)")]
    BadMagic { record: &'static str },
    #[error(
        "{record}: unsupported format version {version} (this build reads version {})",
        crate::FORMAT_VERSION
    )]
    UnsupportedVersion { record: &'static str, version: u32 },
    #[error("{record}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted")]
    BadChecksum {
        record: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{record}: belongs to another cache set (UUID differs)")]
    ForeignUuid { record: &'static str },
    #[error(
        "segment header: expected segment id {expected}, found {found} (stale slot or id gap)"
    )]
    WrongSegmentId { expected: u64, found: u64 },
    #[error("segment header: {count} entries, at most {max} fit")]
    TooManyEntries { count: usize, max: usize },
    #[error("segment header: entry {index}: {reason}")]
    BadEntry { index: usize, reason: &'static str },
    #[error("segment data block {data_slot}: checksum mismatch (torn or corrupted data)")]
    BadDataChecksum { data_slot: usize },
    #[error("segment header: {reason}")]
    BadHeader { reason: &'static str },
    #[error("checkpoint: {reason}")]
    BadCheckpoint { reason: &'static str },
    #[error("superblock: {reason}")]
    BadSuperblock { reason: &'static str },
}
