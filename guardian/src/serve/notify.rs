//! systemd's service notifications (`sd_notify`): readiness, reloads, the watchdog and a
//! one-line status. Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::debug;

pub struct Notifier {
    /// Half the watchdog interval systemd asked for, when it asked.
    watchdog_every: Option<Duration>,
    last_watchdog: Instant,
}

impl Notifier {
    pub fn new() -> Self {
        Self {
            watchdog_every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last_watchdog: Instant::now(),
        }
    }

    fn send(states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            debug!("sd_notify: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        Self::send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload begins (systemd's `Type=notify-reload` waits for the `READY=1` that ends it).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => Self::send(&[NotifyState::Reloading, now]),
            Err(_) => Self::send(&[NotifyState::Reloading]),
        }
    }

    pub fn status(&self, status: &str) {
        Self::send(&[NotifyState::Status(status)]);
    }

    /// How long until the watchdog is due, when systemd asked for one: the loop that drains
    /// kernel events ticks by then however idle it is.
    pub fn watchdog_in(&self) -> Option<Duration> {
        self.watchdog_every
            .map(|every| every.saturating_sub(self.last_watchdog.elapsed()))
    }

    /// Called from the loop that drains kernel events: if that loop stops, systemd's
    /// watchdog restarts guardian.
    pub fn watchdog(&mut self) {
        if let Some(every) = self.watchdog_every {
            if self.last_watchdog.elapsed() >= every {
                self.last_watchdog = Instant::now();
                Self::send(&[NotifyState::Watchdog]);
            }
        }
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}
