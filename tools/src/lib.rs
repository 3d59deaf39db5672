//! Shared code of the command-line tools: the benchmark driver's subcommands (`wbbench`).

pub mod bench;
