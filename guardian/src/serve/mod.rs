//! What guardian serves besides its records: Prometheus metrics, the control socket, and
//! systemd's notifications.
//!
//! The servers run on a thread of their own with its own runtime: a scrape or a slow client
//! never takes a turn from the event loop. Queries that need the process table are handed to the
//! loop over a channel and answered between two drains.

pub mod control;
pub mod metrics;
pub mod notify;

use std::sync::Arc;

use tokio::sync::mpsc;

/// Queries waiting for the event loop at most (more are answered "busy").
const ASKS_QUEUED: usize = 8;

/// Starts the serving thread with what was bound at start-up; returns where queries arrive.
pub fn start(
    metrics: Option<(std::net::TcpListener, Arc<metrics::Metrics>)>,
    control: std::os::unix::net::UnixListener,
) -> anyhow::Result<mpsc::Receiver<control::Ask>> {
    let (tx, rx) = mpsc::channel(ASKS_QUEUED);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("guardian-serve".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some((listener, metrics)) = metrics {
                    tokio::spawn(metrics::serve(listener, metrics));
                }
                control::serve(control, tx).await;
            })
        })?;
    Ok(rx)
}
