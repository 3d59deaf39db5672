//! Shared code of the command-line tools: the benchmark driver's subcommands (`wbbench`) and
//! the health verdicts of `wbctl status -x`, the journal's log format.

pub mod bench;
pub mod health;
pub mod journal;
