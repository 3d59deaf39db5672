//! writeboost's ublk target: the cache engine and (in `ublk`) its kernel glue.
//!
//! Where things are, by path (dependencies point down this list, never up; `tests/tests/layers.rs`
//! checks it):
//! - `daemon/`  — one process per device: create/recover checks, start, every shutdown path;
//! - `control`  — the run folder, the state file, the control socket's JSON-lines protocol;
//! - `ublk`     — the kernel glue: the engine as /dev/ublkbN (libublk, copy mode);
//! - `open/`    — open a cache: `create` a cache set, `recover` (replay the log, adopt a crashed
//!   daemon's RAM buffer) and start the engine;
//! - `engine/`  — the cache itself: write path, read path, FLUSH/FUA, discard, back-pressure,
//!   modes (mirrored / degraded / passthrough / lost), the fault record, threads, status and
//!   the writeback seam (`impl CacheLog`);
//! - `log/`     — the log on the cache legs: RAM buffer, log writer, legs (mirror), scan;
//! - `map/`     — backing block → newest cached copy, and discarded / zeroed ranges;
//! - `panics`   — what a panic does in the daemon (it ends it, unless writeback caught it);
//! - `device`, `private_file`, `error` — files and block devices (O_DIRECT), root-only files of
//!   the run folder, the error type.

pub mod control;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod error;
pub mod log;
pub mod map;
pub mod open;
pub mod panics;
pub mod private_file;
pub mod ublk;

pub use device::{AlignedBuf, Device, FileDevice};
pub use engine::lifecycle::DrainProgress;
pub use engine::status::{CacheLostStatus, EngineStatus, LegStatus, SegmentIds};
pub use engine::{Engine, Geometry, Shared};
pub use error::{EngineError, Result};
pub use log::scan::{read_superblocks, scan, Repair, ScanReport};
pub use log::writer::LOG_BYTES_BETWEEN_LEG_FLUSHES;
pub use open::create::{format, FormatOptions};
pub use open::recover::{open, OpenOptions};

/// The log target of the lines that need someone now (a lost cache): the journal gets them at
/// priority crit (2), above the err (3) of other errors such as a failed leg.
pub const CRITICAL_LOG_TARGET: &str = "writeboost::critical";

/// Lower-case hex of `bytes` (uuids and fingerprints in file names, logs and `wbctl check`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
