//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::output::OutputFormat;

/// guardian: a policy-driven eBPF resource guardian. It follows fork, exec and exit in the
/// kernel and kills a service's orphaned workers the moment their parent dies.
///
/// Run the daemon with `guardian --policy FILE [--dry-run]`.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Format of the diagnostics on stderr: `text`, or `json` (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The daemon's options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The policy file (TOML) naming the services to guard.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Audit mode: decide exactly as in enforce mode, signal nothing, record every decision.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format: `text` (the default on a terminal) or `json` (one object per line, the
    /// default otherwise).
    #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
    pub output: OutputFormat,
    /// Serve Prometheus metrics (`/metrics`) and a health check (`/healthz`) on this address
    /// (for instance `127.0.0.1:9464`). Off unless given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The control socket `guardian status` and `guardian explain` ask (created 0600, in a
    /// directory of root's only) [default: /run/guardian/control.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Reload the policy when its file changes (saved in place, renamed over, or a Kubernetes
    /// ConfigMap update); `false`: only on SIGHUP.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch_policy: bool,
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
    /// Ask the running daemon what it guards: per service its roots, members, orphans alive,
    /// tasks and memory against the budgets, and decisions.
    Status {
        /// The daemon's control socket [default: /run/guardian/control.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// `text` (the default on a terminal) or `json`.
        #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
        output: OutputFormat,
    },
    /// Explain why guardian treats a process as it does: its role (root, member, orphan or
    /// none) and service, its ancestors, the selector keys that matched, what happens if its
    /// parent dies, its rank as a memory victim, and the protections that apply.
    Explain {
        /// The process id.
        pid: u32,
        /// Answer from this policy file and `/proc` now, without the daemon (as a guardian
        /// starting now would see the processes; it cannot know what happened before).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// The running daemon's control socket (without `--policy`).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Output format: `text` (the default on a terminal) or `json` (the default otherwise).
        #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
        output: OutputFormat,
    },
    /// Validate a policy and print a summary of its services.
    Check {
        /// The policy file to check.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
    },
}
