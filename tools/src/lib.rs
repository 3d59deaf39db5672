//! Shared code of the command-line tools: the benchmark driver's subcommands (`wbbench`), the
//! health verdicts of `wbctl status -x`, the shape and `--watch` lines of `wbctl status`, the
//! journal's log format, the Prometheus exposition of `wbctl metrics`, the SSD health of the
//! cache legs (NVMe SMART log, smartctl), wbctl's generated man pages and completions.

pub mod bench;
pub mod docs;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod ssd_health;
pub mod status_view;
