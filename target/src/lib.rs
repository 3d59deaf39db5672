//! writeboost's ublk target: the cache engine and (in `ublk`) its kernel glue.
//!
//! Where things are, by file:
//! - `engine`      — write path, read path, FLUSH/FUA, discard, back-pressure;
//! - `ram_buffer`  — the open / in-flight segments in a tmpfs-backed file that survives a crash;
//! - `log_writer`  — sealed segments onto the cache legs (`wb-log`, `wb-log-leg<i>` threads);
//! - `legs`        — the cache legs (mirror): write to all, read with fallback;
//! - `block_map`   — backing block → newest cached copy, ≤ 16 bytes per cached block;
//! - `zero_ranges` — discarded / zeroed ranges not yet written back;
//! - `recovery`    — open a cache: replay the log, adopt a crashed daemon's buffer;
//! - `faults`      — the fault record (failed legs, a lost cache), kept on the legs and the host;
//! - `format`      — create a cache set;
//! - `lifecycle`   — threads, shutdown, drain, status, the writeback seam;
//! - `device`      — files and block devices (O_DIRECT);
//! - `ublk`        — the kernel glue: the engine as /dev/ublkbN (libublk, copy mode);
//! - `daemon`      — one process per device: create/recover checks, start, every shutdown path;
//! - `control`     — the run folder, the state file, the control socket's JSON-lines protocol.

pub mod block_map;
mod cached_block;
pub mod control;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod error;
pub mod faults;
pub mod format;
pub mod legs;
pub mod lifecycle;
mod log_writer;
pub mod mode;
pub mod ram_buffer;
pub mod recovery;
pub mod ublk;
pub mod zero_ranges;

pub use device::{AlignedBuf, Device, FileDevice};
pub use engine::{Engine, Geometry, Shared};
pub use error::{EngineError, Result};
pub use format::{format, FormatOptions};
pub use lifecycle::{CacheLostStatus, DrainProgress, EngineStatus, LegStatus, SegmentIds};
pub use log_writer::SEGMENTS_BETWEEN_LEG_FLUSHES;
pub use recovery::{open, read_superblocks, scan, OpenOptions, Repair, ScanReport};
