//! Command-line interface.

use clap::{Parser, Subcommand};

use crate::output::OutputFormat;

/// guardian: a policy-driven eBPF resource guardian. It follows fork, exec and exit in the
/// kernel and keeps a live process table.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the live stream of fork, exec, exit, reparent and lost-event records.
    Trace {
        /// Output format: `text` (the default on a terminal) or `json` (one object per line,
        /// the default otherwise).
        #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
        output: OutputFormat,
    },
}
