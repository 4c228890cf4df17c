//! Command-line interface.

use std::{io, path::PathBuf};

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

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
    /// Ask the running daemon to read its policy again, and wait for the outcome: exits 0 when
    /// the new policy is in force, 1 (the old one staying) when it is invalid. For systemd's
    /// `ExecReload=`.
    Reload {
        /// The daemon's control socket [default: /run/guardian/control.sock].
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
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

/// A parsed command line: guardian's own, or the hidden `generate` packagers run.
#[derive(Debug)]
pub enum Parsed {
    Cli(Cli),
    /// `guardian generate DIR`: write the man pages and completions into DIR.
    Generate(PathBuf),
}

/// Parses the process's arguments (exits on an error or `--help`, as clap does).
///
/// `generate` is added here rather than to [`Command`]: the completions it writes are made
/// from [`Cli`] alone, and clap's completion scripts would offer even a hidden subcommand.
pub fn parse() -> Parsed {
    let generator = clap::Command::new("generate")
        .hide(true)
        .about("Write guardian's man pages and shell completions into DIR")
        .arg(
            clap::Arg::new("dir")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        );
    let matches = Cli::command().subcommand(generator).get_matches();
    if let Some(("generate", m)) = matches.subcommand() {
        let dir = m.get_one::<PathBuf>("dir").expect("required by clap");
        return Parsed::Generate(dir.clone());
    }
    Parsed::Cli(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

/// The files `guardian generate` writes, by name: guardian(8) and a page per subcommand, and the
/// bash, zsh and fish completions.
pub fn generated() -> io::Result<Vec<(String, Vec<u8>)>> {
    use clap_complete::Shell;
    // Help is a subcommand clap adds; its man page would say nothing `--help` does not.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut files = Vec::new();
    for page in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
        // Section 8: commands for root.
        let man = clap_mangen::Man::new(page.clone())
            .section("8")
            .source(concat!("guardian ", env!("CARGO_PKG_VERSION")))
            .manual("System Administration");
        let mut roff = Vec::new();
        man.render(&mut roff)?;
        files.push((man.get_filename(), roff));
    }
    for (shell, name) in [
        (Shell::Bash, "guardian.bash"),
        (Shell::Zsh, "_guardian"),
        (Shell::Fish, "guardian.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "guardian", &mut script);
        files.push((name.to_owned(), script));
    }
    Ok(files)
}

/// Writes [`generated`] into `dir`.
pub fn generate(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for (name, bytes) in generated()? {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_cover_the_cli() {
        let files: std::collections::BTreeMap<String, String> = generated()
            .expect("rendering")
            .into_iter()
            .map(|(name, bytes)| (name, String::from_utf8(bytes).expect("UTF-8")))
            .collect();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "_guardian",
                "guardian-check.8",
                "guardian-explain.8",
                "guardian-reload.8",
                "guardian-status.8",
                "guardian-trace.8",
                "guardian.8",
                "guardian.bash",
                "guardian.fish"
            ]
        );
        let man = &files["guardian.8"];
        assert!(man.contains(".TH guardian 8"), "{man}");
        for needle in [
            "\\-\\-metrics\\-address",
            "guardian\\-status(8)",
            "guardian\\-check(8)",
        ] {
            assert!(
                man.contains(needle),
                "{needle} missing from guardian.8:\n{man}"
            );
        }
        assert!(!man.contains("guardian\\-help"), "{man}");
        let check = &files["guardian-check.8"];
        let title = concat!(
            ".TH guardian-check 8  \"guardian ",
            env!("CARGO_PKG_VERSION")
        );
        assert!(check.contains(title), "{check}");
        for (name, text) in &files {
            assert!(
                !text.contains("generate"),
                "{name} offers the packagers' generator"
            );
            if !name.ends_with(".8") {
                // fish names long options without their dashes.
                for needle in ["policy", "metrics-address", "status", "check", "trace"] {
                    assert!(text.contains(needle), "{needle} missing from {name}");
                }
            }
        }
    }
}
