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
use tracing::{debug, warn};

use crate::{
    output::{Clock, Record},
    policy::protect::Protections,
    policy::{Mode, OrphanAction},
    procs::{self, Pin, Pinned},
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
    /// A service's `cpu_max` (only ever a limit written: the kernel throttles, no one is killed).
    CpuMax,
    /// A budget is being put in place (cgroup created, process moved).
    Budget,
}

impl From<crate::policy::Budget> for Reason {
    fn from(b: crate::policy::Budget) -> Self {
        match b {
            crate::policy::Budget::TasksMax => Self::TasksMax,
            crate::policy::Budget::MemoryMax => Self::MemoryMax,
            crate::policy::Budget::MemoryHigh => Self::MemoryHigh,
            crate::policy::Budget::CpuMax => Self::CpuMax,
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
            Self::CpuMax => "cpu_max",
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
    /// What brought the decision forward, if not the usual event (see `Record::Decision`).
    pub trigger: Option<&'static str>,
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

/// A decision that could not be carried out yet: its process could not be checked or opened
/// for want of file descriptors or memory (retried on every tick until it is done or the
/// process is gone), or it was sent SIGTERM and waits for its deadline.
struct Waiting {
    pid: u32,
    start_ns: u64,
    decision: Decision,
    action: OrphanAction,
    kill_timeout: Duration,
    /// Terminations: when SIGKILL follows (boot ns). `None`: a decision to retry.
    deadline_ns: Option<u64>,
    /// A termination's pidfd, kept: SIGKILL goes through it, to the very process SIGTERM went
    /// to. Only so many are kept (see [`Enforcer::max_held`]); beyond them the process is opened
    /// and checked by its start time again when its deadline comes, so any number of
    /// terminations can wait under any RLIMIT_NOFILE.
    fd: Option<OwnedFd>,
}

/// Counts of what was enforced and what would have been.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub signalled: u64,
    pub would_signal: u64,
    pub reported: u64,
    pub refused: u64,
    /// Attempts put off because a process could not be opened (out of descriptors or memory).
    pub retried: u64,
}

pub struct Enforcer {
    pub mode: Mode,
    protections: Protections,
    waiting: Vec<Waiting>,
    /// Most pidfds kept for terminations: a quarter of the open-file limit.
    max_held: usize,
    pub counts: Counts,
    /// When the last warning about decisions put off was given (boot ns).
    retry_warned_ns: u64,
}

/// At most one warning this often about decisions put off for want of resources (ns).
const RETRY_WARN_NS: u64 = 5_000_000_000;

/// The outcome of opening a verified handle on a process.
enum Handle {
    Ok {
        fd: OwnedFd,
        proc: Pinned,
    },
    Gone,
    Reused,
    /// Opening failed for want of resources: try again later.
    Failed(std::io::Error),
}

/// What one attempt at a decision came to: done (its record is the waiting decision's), or
/// put off because the process could not be opened for want of resources.
#[derive(PartialEq, Eq)]
enum Attempt {
    Done,
    Later,
}

impl Enforcer {
    pub fn new(mode: Mode, protections: Protections) -> Self {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        Self {
            mode,
            protections,
            waiting: Vec::new(),
            max_held: usize::try_from(nofile / 4)
                .unwrap_or(usize::MAX)
                .clamp(4, 4096),
            counts: Counts::default(),
            retry_warned_ns: 0,
        }
    }

    /// The protections in force.
    pub fn protections(&self) -> &Protections {
        &self.protections
    }

    /// A reloaded policy: its mode and protections apply from now on, and decisions still
    /// waiting (retries, SIGKILLs due after SIGTERM) for services it no longer has are dropped:
    /// their members are forgotten, not killed.
    pub fn reconfigure(
        &mut self,
        mode: Mode,
        protections: Protections,
        keep: impl Fn(&str) -> bool,
    ) {
        self.mode = mode;
        self.protections = protections;
        self.waiting.retain(|w| keep(&w.decision.service));
    }

    /// Decides and (in enforce mode) acts. Returns the decision record, or `None` when the
    /// process could not be opened for want of resources: the decision is then retried on every
    /// tick and its record comes from [`Enforcer::tick`].
    pub fn act(&mut self, clock: &Clock, req: Request<'_>) -> Option<Record> {
        let p = req.target;
        let mut decision = Decision {
            service: req.service.to_owned(),
            pid: p.pid,
            comm: p.comm.to_string(),
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
            trigger: req.trigger,
            gone: false,
        };
        if let Some(why) = self.protections.refuse(p) {
            self.counts.refused += 1;
            decision.result = format!("refused: {why}");
            return Some(decision.record(clock, self.mode));
        }
        let mut w = Waiting {
            pid: p.pid,
            start_ns: p.start_ns,
            decision,
            action: req.action,
            kill_timeout: req.kill_timeout,
            deadline_ns: None,
            fd: None,
        };
        if self.try_once(&mut w) == Attempt::Done {
            return Some(w.decision.record(clock, self.mode));
        }
        self.counts.retried += 1;
        self.waiting.push(w);
        self.warn_waiting();
        None
    }

    /// Opens and checks the process, then carries the decision out.
    fn try_once(&mut self, w: &mut Waiting) -> Attempt {
        // The same checks in both modes: only the signal differs.
        match verified_handle(w.pid, w.start_ns) {
            Handle::Ok { fd, proc } => self.carry_out(w, fd, &proc),
            Handle::Gone => {
                w.decision.result = "gone".into();
                w.decision.gone = true;
                Attempt::Done
            }
            Handle::Reused => {
                w.decision.result = "refused: pid reused by another process".into();
                w.decision.gone = true;
                self.counts.refused += 1;
                Attempt::Done
            }
            Handle::Failed(e) => {
                debug!(pid = w.pid, "cannot open the process yet: {e}");
                Attempt::Later
            }
        }
    }

    /// SIGKILL through the pidfd SIGTERM went through, once the process is opened in `/proc`
    /// again for the protections (it may have exec'd a protected program meanwhile).
    fn escalate(&mut self, w: &mut Waiting, fd: OwnedFd) -> Attempt {
        if exited(&fd) {
            w.decision.gone = true; // it honoured SIGTERM after all
            return Attempt::Done;
        }
        // The pidfd says the process lives, so its pid is still its own: /proc speaks of it.
        match Pinned::open(w.pid, Some(w.start_ns)) {
            Pin::Ok(proc) => self.carry_out(w, fd, &proc),
            Pin::Failed(_) => {
                w.fd = Some(fd);
                Attempt::Later
            }
            Pin::Gone | Pin::Reused => {
                w.decision.gone = true;
                Attempt::Done
            }
        }
    }

    /// The last checks on the process as `/proc` shows it now, then the signal through `fd`
    /// (skipped in audit mode). A SIGTERM leaves a SIGKILL waiting for `kill_timeout`.
    fn carry_out(&mut self, w: &mut Waiting, fd: OwnedFd, proc: &Pinned) -> Attempt {
        let d = &mut w.decision;
        if let Some(why) = self.protections.refuse_now(proc) {
            self.counts.refused += 1;
            d.result = format!("refused: {why}");
            return Attempt::Done;
        }
        d.new_parent = (proc.stat.ppid != d.old_parent).then_some(proc.stat.ppid);
        let signal = match w.action {
            OrphanAction::Report => {
                self.counts.reported += 1;
                d.result = "reported".into();
                return Attempt::Done;
            }
            OrphanAction::Kill => Signal::KILL,
            OrphanAction::Terminate => Signal::TERM,
        };
        if self.mode == Mode::Audit {
            self.counts.would_signal += 1;
            d.result = format!("audit: would send {}", sig_name(signal));
            return Attempt::Done;
        }
        match pidfd_send_signal(&fd, signal) {
            Ok(()) => {
                self.counts.signalled += 1;
                d.performed = true;
                d.result = format!("sent {}", sig_name(signal));
                if signal == Signal::TERM {
                    let mut kill = d.clone();
                    kill.action = OrphanAction::Kill.as_str();
                    kill.reason = Reason::KillTimeout.as_str();
                    kill.performed = false;
                    let held = self.waiting.iter().filter(|w| w.fd.is_some()).count();
                    self.waiting.push(Waiting {
                        fd: (held < self.max_held).then_some(fd),
                        pid: w.pid,
                        start_ns: w.start_ns,
                        decision: kill,
                        action: OrphanAction::Kill,
                        kill_timeout: w.kill_timeout,
                        deadline_ns: Some(procs::boottime_ns().saturating_add(
                            u64::try_from(w.kill_timeout.as_nanos()).unwrap_or(u64::MAX),
                        )),
                    });
                }
            }
            Err(rustix::io::Errno::SRCH) => {
                d.result = "gone".into();
                d.gone = true;
            }
            Err(e) => {
                warn!(pid = w.pid, "signal failed: {e}");
                d.result = format!("error: {e}");
            }
        }
        Attempt::Done
    }

    fn warn_waiting(&mut self) {
        let now = procs::boottime_ns();
        if self.retry_warned_ns != 0 && now < self.retry_warned_ns + RETRY_WARN_NS {
            return;
        }
        self.retry_warned_ns = now;
        let n = self
            .waiting
            .iter()
            .filter(|w| w.deadline_ns.is_none())
            .count();
        warn!(
            waiting = n,
            "processes cannot be opened (out of file descriptors or memory): decisions put off \
             and retried until they are carried out"
        );
    }

    /// Retries decisions put off, and escalates terminations whose deadline passed; returns
    /// their decision records. A termination whose process is gone by then (it honoured
    /// SIGTERM, or its pid is another process's now) leaves no record.
    pub fn tick(&mut self, clock: &Clock) -> Vec<Record> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let now = procs::boottime_ns();
        let mut records = Vec::new();
        for mut w in std::mem::take(&mut self.waiting) {
            let attempt = match w.deadline_ns {
                Some(deadline) if now < deadline => Attempt::Later,
                Some(_) => match w.fd.take() {
                    Some(fd) => self.escalate(&mut w, fd),
                    None => self.try_once(&mut w),
                },
                None => self.try_once(&mut w),
            };
            match attempt {
                Attempt::Later => self.waiting.push(w),
                Attempt::Done if w.deadline_ns.is_some() && w.decision.gone => {}
                Attempt::Done => records.push(w.decision.record(clock, self.mode)),
            }
        }
        records
    }

    /// When [`Enforcer::tick`] has work next (boot ns): a termination's deadline, or `retry_ns`
    /// for decisions put off.
    pub fn next_due(&self, retry_ns: u64) -> Option<u64> {
        self.waiting
            .iter()
            .map(|w| w.deadline_ns.unwrap_or(retry_ns))
            .min()
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
            trigger: None,
            gone: false,
        }
        .record(clock, self.mode)
    }
}

#[derive(Clone)]
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
    trigger: Option<&'static str>,
    /// The process was gone (or its pid reused) when guardian came to act.
    gone: bool,
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
            trigger: self.trigger,
        }
    }
}

/// Opens a pidfd on the process, then its `/proc` directory, and checks through the latter that
/// the pid still belongs to the process the table knows (same start time). The table knew the
/// process before the pidfd was opened, so a pidfd opened on an older holder of the pid is
/// impossible, and one opened on a newer holder fails the check: a handle that passes can only
/// ever reach that process, and what the protections read comes from it too.
fn verified_handle(pid: u32, start_ns: u64) -> Handle {
    let Some(raw) = Pid::from_raw(pid as i32) else {
        return Handle::Gone;
    };
    let fd = match pidfd_open(raw, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Handle::Gone,
        Err(e) => return Handle::Failed(e.into()),
    };
    if exited(&fd) {
        return Handle::Gone; // a zombie waiting to be reaped: nothing left to signal
    }
    match Pinned::open(pid, Some(start_ns)) {
        Pin::Ok(proc) => Handle::Ok { fd, proc },
        Pin::Reused => Handle::Reused,
        Pin::Gone => Handle::Gone,
        Pin::Failed(e) => Handle::Failed(e),
    }
}

/// A pidfd becomes readable when its process has exited.
fn exited(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let now = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&now)), Ok(n) if n > 0)
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
    use crate::policy::protect::Protect;

    fn proc(pid: u32, comm: &str) -> Process {
        Process::for_test(pid, comm)
    }

    #[test]
    fn identity_window() {
        use procs::{same_process, FORK_EVENT_SLACK_NS};
        let tick = procs::tick_ns();
        let start = 1_000 * tick + tick / 2; // started mid-tick
        let proc_ns = 1_000 * tick; // /proc rounds down
        assert!(same_process(start, proc_ns), "known exactly");
        assert!(same_process(proc_ns, proc_ns), "known from /proc");
        assert!(
            same_process(start + 3_000, proc_ns),
            "fork event a few µs late"
        );
        assert!(
            same_process(start + 50_000_000, proc_ns),
            "fork event 50 ms late (a descheduled vCPU)"
        );
        assert!(!same_process(proc_ns + tick + FORK_EVENT_SLACK_NS, proc_ns));
        assert!(
            !same_process(start, proc_ns + tick),
            "a newer process with that pid, a tick later"
        );
        assert!(!same_process(start, proc_ns + 10 * tick));
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
            trigger: None,
        };
        let mut e = Enforcer::new(Mode::Audit, Protections::new(&Protect::default()));
        let v = serde_json::to_value(e.act(&Clock::new(), req(&p)).unwrap()).unwrap();
        assert_eq!(v["performed"], false);
        assert_eq!(v["mode"], "audit");
        assert_eq!(v["result"], "audit: would send SIGKILL");
        assert!(child.try_wait().unwrap().is_none(), "still running");
        assert_eq!(e.counts.would_signal, 1);

        // The same decision in enforce mode kills it, and a stale start time is refused.
        let mut stale = p.clone();
        stale.start_ns = start + 3_600 * 1_000_000_000;
        let mut e = Enforcer::new(Mode::Enforce, Protections::new(&Protect::default()));
        let v = serde_json::to_value(e.act(&Clock::new(), req(&stale)).unwrap()).unwrap();
        assert_eq!(v["performed"], false);
        assert!(v["result"].as_str().unwrap().contains("pid reused"), "{v}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the mismatch spared it"
        );
        let v = serde_json::to_value(e.act(&Clock::new(), req(&p)).unwrap()).unwrap();
        assert_eq!(v["performed"], true, "{v}");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
