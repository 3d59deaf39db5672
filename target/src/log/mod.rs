//! The log on the cache legs: segments gathered in a RAM buffer (`ram_buffer`), sealed and
//! written to every leg by the log writer (`writer`), the legs themselves (`legs`: the mirror),
//! and the read-only `scan` that recovery and `wbctl check` share. Nothing here names the
//! engine: the writer reports to a `LogHost`.

pub mod legs;
pub mod ram_buffer;
pub mod scan;
pub mod writer;

pub use writer::LogHost;
