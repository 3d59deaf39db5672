//! Shared code of the command-line tools: the benchmark driver's subcommands (`wbbench`), the
//! health verdicts of `wbctl status -x`, the shape and `--watch` lines of `wbctl status`, the
//! journal's log format, the Prometheus exposition of `wbctl metrics`,
//! wbctl's generated man pages and completions.

pub mod bench;
pub mod docs;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod status_view;
