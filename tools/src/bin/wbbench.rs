//! `wbbench`: writeboost's benchmark driver. Every subcommand measures its figure against a limit
//! measured in the same run and prints both (CONTRACT §8: performance claims are ratios).

use anyhow::Result;
use clap::{Parser, Subcommand};
use wb_tools::bench;

#[derive(Parser)]
#[command(name = "wbbench", about = "writeboost benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// In-process engine: 4 KiB random writes vs the cache file's sequential limit; metadata per
    /// block; bytes read by recovery.
    Engine(bench::engine::EngineArgs),
    /// Writeback: drain rate of sequentially and randomly written dirty data vs the backing
    /// file's own sequential and random write rates; backing I/Os saved by merging.
    Writeback(bench::writeback::WritebackArgs),
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    match Cli::parse().command {
        Command::Engine(args) => match args.fsync_every {
            Some(every) => {
                let report = bench::sync::run(&args, every)?;
                bench::sync::print(&report, args.json)
            }
            None => {
                let report = bench::engine::run(&args)?;
                bench::engine::print(&report, args.json)
            }
        },
        Command::Writeback(args) => {
            let report = bench::writeback::run(&args)?;
            bench::writeback::print(&report, args.json)
        }
    }
}
