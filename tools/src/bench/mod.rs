//! `wbbench` subcommands: each measures a budget of CONTRACT §8 as a ratio against a limit measured
//! in the same run, and prints its figures (JSON with `--json`).

pub mod engine;
pub mod files;
pub mod sync;
pub mod writeback;
