//! Errors of the engine layer. Each names the device (or request) and the reason, because they
//! reach administrators through `wbctl` unchanged.

use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    /// Bad input that was refused before anything was written.
    #[error("{device}: {reason}")]
    Refused { device: String, reason: String },
    #[error("{device}: {source}")]
    Io {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {source}")]
    Format {
        device: String,
        #[source]
        source: logfmt::FormatError,
    },
    #[error("request at byte {offset} length {len}: {reason}")]
    BadRequest {
        offset: u64,
        len: u64,
        reason: &'static str,
    },
    #[error("cache failed: {0}")]
    CacheFailed(String),
    #[error("engine is shutting down")]
    ShuttingDown,
    /// A drain gave up: writeback keeps failing without progress (it goes on retrying).
    #[error(
        "drain gave up: writeback failed {errors} times in a row without progress (last error: \
         {last}); the dirty data stays in the cache and writeback keeps retrying"
    )]
    WritebackStuck { errors: u64, last: String },
    /// Internal: the log is out of use (passthrough); the request is re-done on the backing
    /// device. Never returned by the engine's public methods.
    #[error("passthrough")]
    Passthrough,
}

impl EngineError {
    pub fn refused(device: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::Refused {
            device: device.into(),
            reason: reason.into(),
        }
    }

    pub fn io(device: impl Into<String>, source: io::Error) -> Self {
        EngineError::Io {
            device: device.into(),
            source,
        }
    }

    /// The errno a block request failing with this error completes with.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::BadRequest { .. } => libc::EINVAL,
            EngineError::ShuttingDown => libc::EIO,
            _ => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;
