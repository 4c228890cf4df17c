use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
};

use guardian::cli::{LogFormat, Parsed};
use tracing_subscriber::EnvFilter;

/// Diagnostic lines queued for stderr at most. The queue's slots are allocated (and touched) up
/// front: tracing-appender's default of 128,000 lines holds 4 MiB for nothing.
const STDERR_LINES: usize = 1024;

fn main() -> ExitCode {
    let cli = match guardian::cli::parse() {
        Parsed::Cli(cli) => cli,
        Parsed::Generate(dir) => return exit(guardian::cli::generate(&dir)),
    };
    // Diagnostics go through a queue to a thread of their own: a stalled or closed stderr loses
    // lines, never holds a decision.
    let (stderr, flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(STDERR_LINES)
        .thread_name("guardian-stderr")
        .finish(std::io::stderr());
    let filter = EnvFilter::try_from_env("GUARDIAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let result = guardian::run(cli);
    // Diagnostics queued so far go out before the final word.
    drop(flush_on_exit);
    exit(result)
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "guardian: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
