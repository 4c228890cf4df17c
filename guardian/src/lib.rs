//! guardian: a policy-driven eBPF resource guardian.

pub mod cli;
pub mod events;
pub mod kernel_btf;
pub mod loader;
pub mod monitor;
pub mod output;
pub mod procs;
pub mod table;
pub mod trace;
pub mod tracefs;

use cli::{Cli, Command};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Trace { output } => trace::run(output).await,
        }
    })
}
