//! The one place that acts: protections, identity checks, signals through pidfds, and the
//! SIGTERM → timeout → SIGKILL escalation.
//!
//! The mode is decided once. The decision path is the same in both modes; in audit mode the
//! signal itself is skipped and the decision is recorded as not performed.

use std::{os::fd::OwnedFd, time::Duration};

use rustix::{
    event::{poll, PollFd, PollFlags},
    process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal},
};
use tracing::warn;

use crate::{
    output::{Clock, Record},
    policy::{Mode, OrphanAction},
    procs::{self, Pin, Pinned},
    protect::Protections,
    table::Process,
};

/// Why a process is being acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its parent died while it lived.
    Orphan,
    /// It was found orphaned when guardian started.
    OrphanAtStart,
    /// It did not end within `kill_timeout` after SIGTERM.
    KillTimeout,
    /// Its service is over `tasks_max`.
    TasksMax,
    /// Its service is over `memory_high`.
    MemoryHigh,
    /// Its service is over `memory_max`.
    MemoryMax,
    /// A budget is being put in place (cgroup created, process moved).
    Budget,
}

impl From<crate::policy::Budget> for Reason {
    fn from(b: crate::policy::Budget) -> Self {
        match b {
            crate::policy::Budget::TasksMax => Self::TasksMax,
            crate::policy::Budget::MemoryMax => Self::MemoryMax,
            crate::policy::Budget::MemoryHigh => Self::MemoryHigh,
        }
    }
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orphan => "orphan",
            Self::OrphanAtStart => "orphan_at_start",
            Self::KillTimeout => "kill_timeout",
            Self::TasksMax => "tasks_max",
            Self::MemoryHigh => "memory_high",
            Self::MemoryMax => "memory_max",
            Self::Budget => "budget",
        }
    }
}

/// One decision to act on a process.
pub struct Request<'a> {
    pub service: &'a str,
    pub target: &'a Process,
    pub action: OrphanAction,
    pub reason: Reason,
    pub kill_timeout: Duration,
    pub old_parent: u32,
    /// When the cause happened (boot ns: the parent's death, the budget crossing), for the
    /// latency figure; `None` when there is no such moment (at start).
    pub since_ns: Option<u64>,
    /// Budget decisions: the usage seen and the budget crossed.
    pub usage: Option<u64>,
    pub limit: Option<u64>,
}

/// A decision that is not a signal: a limit written, a kernel event reported.
pub struct Note<'a> {
    pub service: &'a str,
    pub pid: u32,
    pub comm: &'a str,
    pub cmdline: String,
    pub parent: u32,
    pub action: &'static str,
    pub reason: Reason,
    /// Whether guardian changed something (always false in audit mode).
    pub performed: bool,
    pub result: String,
    pub usage: Option<u64>,
    pub limit: Option<u64>,
}

/// A process sent SIGTERM, waiting for its deadline.
struct Termination {
    fd: OwnedFd,
    deadline_ns: u64,
    pid: u32,
    service: String,
    comm: String,
    cmdline: String,
    old_parent: u32,
    new_parent: Option<u32>,
    since_ns: Option<u64>,
}

/// Counts of what was enforced and what would have been.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub signalled: u64,
    pub would_signal: u64,
    pub reported: u64,
    pub refused: u64,
}

pub struct Enforcer {
    pub mode: Mode,
    protections: Protections,
    terminations: Vec<Termination>,
    pub counts: Counts,
}

/// The outcome of opening a verified handle on a process.
enum Handle {
    Ok { fd: OwnedFd, proc: Pinned },
    Gone,
    Reused,
}

impl Enforcer {
    pub fn new(mode: Mode, protections: Protections) -> Self {
        Self {
            mode,
            protections,
            terminations: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// Decides and (in enforce mode) acts; returns the decision record.
    pub fn act(&mut self, clock: &Clock, req: Request<'_>) -> Record {
        let p = req.target;
        let mut decision = Decision {
            service: req.service.to_owned(),
            pid: p.pid,
            comm: p.comm.clone(),
            cmdline: p.cmdline(),
            action: req.action.as_str(),
            reason: req.reason.as_str(),
            old_parent: req.old_parent,
            new_parent: None,
            since_ns: req.since_ns,
            performed: false,
            result: String::new(),
            usage: req.usage,
            limit: req.limit,
        };
        if let Some(why) = self.protections.refuse(p) {
            self.counts.refused += 1;
            decision.result = format!("refused: {why}");
            return decision.record(clock, self.mode);
        }
        // The same checks in both modes: only the signal differs.
        let (fd, proc) = match verified_handle(p) {
            Handle::Ok { fd, proc } => (fd, proc),
            Handle::Gone => {
                decision.result = "gone".into();
                return decision.record(clock, self.mode);
            }
            Handle::Reused => {
                decision.result = "refused: pid reused by another process".into();
                self.counts.refused += 1;
                return decision.record(clock, self.mode);
            }
        };
        if let Some(why) = self.protections.refuse_now(&proc) {
            self.counts.refused += 1;
            decision.result = format!("refused: {why}");
            return decision.record(clock, self.mode);
        }
        decision.new_parent = (proc.stat.ppid != req.old_parent).then_some(proc.stat.ppid);
        let signal = match req.action {
            OrphanAction::Report => {
                self.counts.reported += 1;
                decision.result = "reported".into();
                return decision.record(clock, self.mode);
            }
            OrphanAction::Kill => Signal::KILL,
            OrphanAction::Terminate => Signal::TERM,
        };
        if self.mode == Mode::Audit {
            self.counts.would_signal += 1;
            decision.result = format!("audit: would send {}", sig_name(signal));
            return decision.record(clock, self.mode);
        }
        match pidfd_send_signal(&fd, signal) {
            Ok(()) => {
                self.counts.signalled += 1;
                decision.performed = true;
                decision.result = format!("sent {}", sig_name(signal));
                if signal == Signal::TERM {
                    self.terminations.push(Termination {
                        fd,
                        deadline_ns: procs::boottime_ns() + req.kill_timeout.as_nanos() as u64,
                        pid: p.pid,
                        service: decision.service.clone(),
                        comm: decision.comm.clone(),
                        cmdline: decision.cmdline.clone(),
                        old_parent: req.old_parent,
                        new_parent: decision.new_parent,
                        since_ns: req.since_ns,
                    });
                }
            }
            Err(rustix::io::Errno::SRCH) => decision.result = "gone".into(),
            Err(e) => {
                warn!(pid = p.pid, "signal failed: {e}");
                decision.result = format!("error: {e}");
            }
        }
        decision.record(clock, self.mode)
    }

    /// Escalates terminations whose deadline passed; returns their decision records.
    pub fn tick(&mut self, clock: &Clock) -> Vec<Record> {
        if self.terminations.is_empty() {
            return Vec::new();
        }
        let now = procs::boottime_ns();
        let mut records = Vec::new();
        let mut keep = Vec::new();
        for t in std::mem::take(&mut self.terminations) {
            if exited(&t.fd) {
                continue; // it honoured SIGTERM
            }
            if now < t.deadline_ns {
                keep.push(t);
                continue;
            }
            let mut d = Decision {
                service: t.service,
                pid: t.pid,
                comm: t.comm,
                cmdline: t.cmdline,
                action: OrphanAction::Kill.as_str(),
                reason: Reason::KillTimeout.as_str(),
                old_parent: t.old_parent,
                new_parent: t.new_parent,
                since_ns: t.since_ns,
                performed: false,
                result: String::new(),
                usage: None,
                limit: None,
            };
            // The pidfd still names the process SIGTERM went to: a reused pid cannot be hit.
            match pidfd_send_signal(&t.fd, Signal::KILL) {
                Ok(()) => {
                    self.counts.signalled += 1;
                    d.performed = true;
                    d.result = "sent SIGKILL".into();
                }
                Err(rustix::io::Errno::SRCH) => d.result = "gone".into(),
                Err(e) => d.result = format!("error: {e}"),
            }
            records.push(d.record(clock, self.mode));
        }
        self.terminations = keep;
        records
    }

    /// Records a decision that signals nothing.
    pub fn note(&mut self, clock: &Clock, n: Note<'_>) -> Record {
        Decision {
            service: n.service.to_owned(),
            pid: n.pid,
            comm: n.comm.to_owned(),
            cmdline: n.cmdline,
            action: n.action,
            reason: n.reason.as_str(),
            old_parent: n.parent,
            new_parent: None,
            since_ns: None,
            performed: n.performed && self.mode == Mode::Enforce,
            result: n.result,
            usage: n.usage,
            limit: n.limit,
        }
        .record(clock, self.mode)
    }
}

struct Decision {
    service: String,
    pid: u32,
    comm: String,
    cmdline: String,
    action: &'static str,
    reason: &'static str,
    old_parent: u32,
    new_parent: Option<u32>,
    since_ns: Option<u64>,
    performed: bool,
    result: String,
    usage: Option<u64>,
    limit: Option<u64>,
}

impl Decision {
    fn record(self, clock: &Clock, mode: Mode) -> Record {
        let now = procs::boottime_ns();
        Record::Decision {
            ts: clock.ts(now),
            mode: mode.as_str(),
            action: self.action,
            performed: self.performed,
            reason: self.reason,
            service: self.service,
            pid: self.pid,
            comm: self.comm,
            cmdline: self.cmdline,
            old_parent: self.old_parent,
            new_parent: self.new_parent,
            latency_us: self.since_ns.map(|s| now.saturating_sub(s) / 1_000),
            result: self.result,
            usage: self.usage,
            limit: self.limit,
        }
    }
}

/// Opens a pidfd on `p`, then its `/proc` directory, and checks through the latter that the pid
/// still belongs to the process the table knows (same start time). The table knew the process
/// before the pidfd was opened, so a pidfd opened on an older holder of the pid is impossible,
/// and one opened on a newer holder fails the check: a handle that passes can only ever reach
/// that process, and what the protections read comes from it too.
fn verified_handle(p: &Process) -> Handle {
    let Some(pid) = Pid::from_raw(p.pid as i32) else {
        return Handle::Gone;
    };
    let fd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(_) => return Handle::Gone,
    };
    match Pinned::open(p.pid, Some(p.start_ns)) {
        Pin::Ok(proc) => Handle::Ok { fd, proc },
        Pin::Reused => Handle::Reused,
        Pin::Gone => Handle::Gone,
    }
}

/// A pidfd becomes readable when its process has exited.
fn exited(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
}

fn sig_name(s: Signal) -> &'static str {
    if s == Signal::KILL {
        "SIGKILL"
    } else {
        "SIGTERM"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{protect::Protect, table::State};
    use std::collections::BTreeSet;

    fn proc(pid: u32, comm: &str) -> Process {
        Process {
            pid,
            parent: 1,
            start_ns: 0,
            comm: comm.into(),
            exe: None,
            argv: vec![comm.into()],
            children: BTreeSet::new(),
            kernel_thread: false,
            state: State::Alive,
            service: Some(0),
            root: false,
            orphan: false,
            threads: 1,
            exec_ns: None,
        }
    }

    #[test]
    fn identity_window() {
        use procs::{same_process, IDENTITY_SLACK_NS};
        let tick = procs::tick_ns();
        let start = 1_000 * tick + tick / 2; // started mid-tick
        let proc_ns = 1_000 * tick; // /proc rounds down
        assert!(same_process(start, proc_ns));
        assert!(
            same_process(start + 3_000, proc_ns),
            "fork event a few µs late"
        );
        assert!(!same_process(start + 2 * tick + IDENTITY_SLACK_NS, proc_ns));
        assert!(
            !same_process(start, proc_ns + 10 * tick),
            "a newer process with that pid"
        );
    }

    #[test]
    fn audit_mode_signals_nothing() {
        // A real child that must survive an audit-mode kill decision.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = procs::stat(pid).unwrap().start_ns;
        let mut p = proc(pid, "sleep");
        p.start_ns = start;
        let req = |t| Request {
            service: "s",
            target: t,
            action: OrphanAction::Kill,
            reason: Reason::Orphan,
            kill_timeout: Duration::from_secs(1),
            old_parent: 42,
            since_ns: None,
            usage: None,
            limit: None,
        };
        let mut e = Enforcer::new(Mode::Audit, Protections::new(&Protect::default()));
        let v = serde_json::to_value(e.act(&Clock::new(), req(&p))).unwrap();
        assert_eq!(v["performed"], false);
        assert_eq!(v["mode"], "audit");
        assert_eq!(v["result"], "audit: would send SIGKILL");
        assert!(child.try_wait().unwrap().is_none(), "still running");
        assert_eq!(e.counts.would_signal, 1);

        // The same decision in enforce mode kills it, and a stale start time is refused.
        let mut stale = p.clone();
        stale.start_ns = start + 3_600 * 1_000_000_000;
        let mut e = Enforcer::new(Mode::Enforce, Protections::new(&Protect::default()));
        let v = serde_json::to_value(e.act(&Clock::new(), req(&stale))).unwrap();
        assert_eq!(v["performed"], false);
        assert!(v["result"].as_str().unwrap().contains("pid reused"), "{v}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the mismatch spared it"
        );
        let v = serde_json::to_value(e.act(&Clock::new(), req(&p))).unwrap();
        assert_eq!(v["performed"], true, "{v}");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
