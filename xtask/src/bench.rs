//! Benchmarks.

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Fork+exit rate without and with `guardian trace` attached, alternating.
    Fork,
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    match which {
        Bench::Fork => anyhow::bail!("not yet"),
    }
}
