//! Shared test utilities.
