//! guardian: a policy-driven eBPF resource guardian.

pub mod act;
pub mod cli;
pub mod daemon;
pub mod explain;
pub mod kernel;
pub mod monitor;
pub mod output;
pub mod policy;
pub mod procs;
pub mod serve;
pub mod table;
pub mod trace;

use anyhow::bail;
use cli::{Cli, Command};
use policy::{Mode, Policy};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Check { policy }) = &cli.command {
        let policy = Policy::load(policy)?;
        print!("{}", daemon::check(&policy));
        for w in policy.warnings() {
            eprintln!("warning: {w}");
        }
        return Ok(());
    }
    if let Some(Command::Status { socket, output }) = &cli.command {
        let status = serve::control::ask(
            &serve::control::socket_path(socket.as_deref()),
            &serve::control::Query::Status,
        )?;
        if output.json() {
            println!("{status}");
        } else {
            print!("{}", daemon::render_status(&status));
        }
        return Ok(());
    }
    if let Some(Command::Reload { socket }) = &cli.command {
        let done = serve::control::ask(
            &serve::control::socket_path(socket.as_deref()),
            &serve::control::Query::Reload,
        )?;
        println!("{done}");
        return Ok(());
    }
    if let Some(Command::Explain {
        pid,
        policy,
        socket,
        output,
    }) = &cli.command
    {
        let text = match policy {
            Some(path) => explain::render(&explain::offline(&Policy::load(path)?, *pid)?, *output),
            None => explain::from_daemon(
                &serve::control::socket_path(socket.as_deref()),
                *pid,
                *output,
            )?,
        };
        // Not `print!`, which panics when stdout is a closed pipe.
        std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
        return Ok(());
    }
    // The policy is validated before anything is loaded or changed.
    let policy = match &cli.command {
        None => match &cli.run.policy {
            Some(path) => Some(trusted_policy(path, cli.run.dry_run)?),
            None => bail!("no policy given: run `guardian --policy FILE` (or `guardian trace`)"),
        },
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match (cli.command, policy) {
            (Some(Command::Trace { output }), _) => trace::run(output).await,
            (None, Some(policy)) => daemon::run(policy, &cli.run).await,
            _ => unreachable!("handled above"),
        }
    })
}

/// Loads the daemon's policy. As root in enforce mode (the decision `daemon::run` makes: the
/// policy's mode unless `--dry-run`), a policy file others than root can change is refused:
/// whoever writes it decides what root kills. Audit mode signals nothing, so there it is a
/// warning, like everything else [`Policy::warnings`] finds.
pub(crate) fn trusted_policy(path: &std::path::Path, dry_run: bool) -> anyhow::Result<Policy> {
    let policy = Policy::load(path)?;
    if !dry_run && policy.mode == Mode::Enforce && rustix::process::geteuid().is_root() {
        policy.enforceable_as_root()?;
    }
    for w in policy.warnings() {
        tracing::warn!("{w}");
    }
    Ok(policy)
}

/// The fuzz tests' proptest settings: few enough cases that the whole set stays within seconds
/// in a debug build; `GUARDIAN_FUZZ_CASES=N` runs N cases per property instead.
#[cfg(test)]
pub(crate) fn fuzz_config() -> proptest::test_runner::Config {
    let cases = std::env::var("GUARDIAN_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    proptest::test_runner::Config {
        cases,
        // Failures are reported with their input; nothing is written into the source tree.
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}
