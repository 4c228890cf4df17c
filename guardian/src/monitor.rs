//! The event loop: drains the ring buffer, keeps the process table, confirms reparents, reports
//! losses, and hands every change to a [`Handler`] (the trace printer, or the policy engine).
//!
//! While records keep coming, routine ones are submitted without a wakeup (a wakeup costs more
//! than the event) and collected by a short timer. When a tick finds none, the loop tells the
//! kernel side it is idle and sleeps until the next record, the handler's next deadline, or its
//! housekeeping: then every record wakes it, and a routine one makes it collect on the timer
//! again. Records that matter at once (an exec, the exit of a process with children, a fork of a
//! member whose tasks are counted) always wake it. One task owns the table: nothing else
//! mutates it.

use std::{
    future::poll_fn,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    time::Instant,
};
use tracing::{debug, warn};

use guardian_common::{reader, tracked_flags};

use crate::{
    kernel::events::{self, Event, Exec, ExitStatus},
    kernel::loader::{KernelStats, LoadOptions, Probes},
    output::Clock,
    policy::watch::PolicyWatch,
    procs,
    serve::control::{Answer, Ask, Query},
    table::{Change, Table},
};

/// How often routine records are collected while they keep coming.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// The same for `guardian trace`, which decides nothing: every collection costs two thread
/// wakeups (the loop's and the output writer's), about a third of its CPU under a fork storm at
/// [`DRAIN_INTERVAL`]. A burst cannot fill the ring meanwhile: the kernel side wakes the loop
/// once a quarter of it is used.
const TRACE_DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest the loop sleeps: housekeeping (the watchdog, the metrics, the periodic checks)
/// runs at least this often, and so does a drain, whatever the kernel side did.
pub const IDLE_INTERVAL: Duration = Duration::from_secs(1);
/// Kernel counters are read at most this often (ns).
const STATS_EVERY_NS: u64 = 100_000_000;
/// Once the loop is idle after records came, what they freed goes back to the kernel, at most
/// this often (ns): a trim that finds nothing costs tens of microseconds.
const TRIM_EVERY_NS: u64 = 1_000_000_000;
/// A reparent not visible in `/proc` after this long is given up (ns).
const REPARENT_GIVE_UP_NS: u64 = 2_000_000_000;

/// Why the configuration is read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// SIGHUP.
    Signal,
    /// `guardian reload`, over the control socket.
    Request,
    /// The policy file (or the ConfigMap it comes from) changed in its directory.
    FileChanged,
}

impl Reload {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::Request => "request",
            Self::FileChanged => "file",
        }
    }
}

/// A change in the policy's directory is acted on once it has been quiet this long (ns): an
/// editor's or the kubelet's steps come as a burst.
const RELOAD_SETTLE_NS: u64 = 100_000_000;

/// Something the monitor saw, in kernel order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Fork {
        pid: u32,
        ts_ns: u64,
    },
    Exec {
        pid: u32,
        ts_ns: u64,
    },
    Exit {
        pid: u32,
        ts_ns: u64,
        status: Option<ExitStatus>,
    },
    /// A thread of `pid` started (only reported when threads are tracked).
    Thread {
        pid: u32,
        tid: u32,
        ts_ns: u64,
    },
    /// `pid`, a process with children, was sent SIGKILL at `ts_ns`: it is dying, and its exit
    /// (with its children's `Orphaned`) follows.
    Doomed {
        pid: u32,
        ts_ns: u64,
    },
    /// `pid`'s parent group died at `ts_ns`; the new parent is being confirmed.
    Orphaned {
        pid: u32,
        old_parent: u32,
        ts_ns: u64,
    },
    /// The kernel has given `pid` to `new_parent` (confirmed in `/proc`).
    Reparent {
        pid: u32,
        old_parent: u32,
        new_parent: u32,
        ts_ns: u64,
    },
    Lost {
        reason: &'static str,
        count: u64,
        total: u64,
    },
}

/// The state a handler works with.
pub struct State {
    pub table: Table,
    pub probes: Probes,
    pub clock: Clock,
}

/// Receives every notice, then a call per timer tick. Nothing a handler meets at run time (a
/// vanished process, a failed write) may end the loop: only SIGINT and SIGTERM do, so handlers
/// report faults as records or warnings and return nothing.
pub trait Handler {
    fn notice(&mut self, state: &mut State, notice: &Notice);

    /// An exec of a process the table does not follow (only when not every process is
    /// tracked): the policy engine matches it against service selectors.
    fn exec_unknown(&mut self, _state: &mut State, _exec: &Exec) {}

    /// Called after each timer drain: every [`DRAIN_INTERVAL`] (for a policy) while records
    /// come, otherwise at [`Handler::next_tick`] or after [`IDLE_INTERVAL`].
    fn tick(&mut self, _state: &mut State) {}

    /// When the handler needs its next tick (boot ns), if that is sooner than [`IDLE_INTERVAL`]
    /// from `now_ns`. A deadline already past means at once: work to retry on every tick asks
    /// for `now_ns` plus [`DRAIN_INTERVAL`].
    fn next_tick(&self, _state: &State, _now_ns: u64) -> Option<u64> {
        None
    }

    /// Waits on the kernel's memory notifications the handler holds, beside the ring buffer;
    /// returns the service whose notification fired (and consumes that readiness).
    fn poll_memory_event(&mut self, _cx: &mut Context<'_>) -> Poll<usize> {
        Poll::Pending
    }

    /// The kernel said `service`'s memory crossed a threshold: check it now (events waiting
    /// have been applied first).
    fn memory_event(&mut self, _state: &mut State, _service: usize) {}

    /// SIGHUP, or the policy file changed: re-read the configuration (events waiting have
    /// been applied first).
    fn reload(&mut self, _state: &mut State, _why: Reload) {}

    /// Whether `/proc` is to be read in full now (see [`Handler::scanned`]).
    fn scan_due(&self) -> bool {
        false
    }

    /// `/proc` as read just before the events then waiting in the ring were applied. The
    /// table may be newer than the scan (a process forked, exec'd or died while it was read),
    /// never older: where the two disagree, `/proc` is to be read again.
    fn scanned(&mut self, _state: &mut State, _scan: Vec<procs::ProcInfo>) {}

    /// A question from the control socket (events waiting have been applied first).
    fn ask(&mut self, _state: &mut State, _query: &Query) -> Answer {
        Err("not served by this command".into())
    }
}

#[derive(Clone, Debug)]
struct PendingReparent {
    pid: u32,
    start_ns: u64,
    old_parent: u32,
    ts_ns: u64,
}

pub struct Monitor {
    pub state: State,
    ring: AsyncFd<RingBuf<MapData>>,
    // Installed before anything is reported, so that a SIGTERM right after `ready` is a clean
    // stop rather than the default (abrupt) termination.
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    /// SIGHUP reloads; it never ends the loop.
    sighup: tokio::signal::unix::Signal,
    /// Questions from the control socket, when it is served.
    asks: Option<mpsc::Receiver<Ask>>,
    /// The policy's directory, when it is watched.
    watch: Option<PolicyWatch>,
    /// When a change seen there is to be acted on (boot ns).
    reload_due_ns: Option<u64>,
    pending: Vec<PendingReparent>,
    kstats: KernelStats,
    /// When the kernel counters are read next (boot ns).
    next_stats_ns: u64,
    /// Records came since freed memory was last given back, and when it may be next (boot ns).
    trim_due: bool,
    next_trim_ns: u64,
    decode_errors: u64,
    /// Reused between drains.
    decoded: Vec<Result<Event, events::DecodeError>>,
    /// The table's changes for one record (kept for its allocation).
    changes: Vec<Change>,
    /// How often routine records are collected while they come ([`DRAIN_INTERVAL`], or
    /// [`TRACE_DRAIN_INTERVAL`] when every process is followed).
    collect: Duration,
    /// When the last tick ran (boot ns).
    last_tick_ns: u64,
    /// Records were drained since the last tick.
    drained: bool,
    /// The kernel side wakes the loop for every record (see the module's documentation).
    idle: bool,
    /// Whether the kernel side can be told so: if it cannot, the loop never idles.
    can_idle: bool,
}

impl Monitor {
    /// Loads the probes, then (when every process is tracked) reads `/proc`: processes started
    /// in between are seen twice, which the table tolerates, and none is missed. Otherwise the
    /// handler adds the processes it follows.
    pub fn start(opts: LoadOptions) -> anyhow::Result<Self> {
        // The kernel side sees the host's pids; /proc and signals must speak of the same ones.
        procs::check_host_pid_namespace()?;
        raise_nofile();
        let sigint = signal(SignalKind::interrupt())?;
        let sigterm = signal(SignalKind::terminate())?;
        let sighup = signal(SignalKind::hangup())?;
        let mut probes = Probes::load(opts)?;
        let ring = probes.events.take().context("ring buffer already taken")?;
        // SAFETY: the ring buffer owns its map fd and keeps it open for as long as it is wrapped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with the runtime: {e}"))?;
        let mut table = Table::new(opts.track_all);
        if opts.track_all {
            table.seed(procs::scan());
            // Only parents: the kernel side reports every process, and marks parents itself.
            let pids: Vec<u32> = table
                .iter_alive()
                .filter(|p| !p.children.is_empty())
                .map(|p| p.pid)
                .collect();
            let mut untracked = 0;
            for pid in pids {
                if probes.track(pid, tracked_flags::HAS_CHILDREN).is_err() {
                    untracked += 1;
                }
            }
            if untracked > 0 {
                // Only the wakeup on their exit is lost: every process is reported anyway.
                warn!(untracked, "the kernel's tracked map is full");
            }
        }
        Ok(Self {
            state: State {
                table,
                probes,
                clock: Clock::new(),
            },
            ring,
            sigint,
            sigterm,
            sighup,
            asks: None,
            watch: None,
            reload_due_ns: None,
            pending: Vec::new(),
            kstats: KernelStats::default(),
            next_stats_ns: 0,
            trim_due: false,
            next_trim_ns: 0,
            decode_errors: 0,
            decoded: Vec::new(),
            changes: Vec::new(),
            collect: if opts.track_all {
                TRACE_DRAIN_INTERVAL
            } else {
                DRAIN_INTERVAL
            },
            last_tick_ns: procs::boottime_ns(),
            drained: false,
            idle: false,
            can_idle: true,
        })
    }

    /// Where the control socket's questions arrive.
    pub fn answer(&mut self, asks: mpsc::Receiver<Ask>) {
        self.asks = Some(asks);
    }

    /// Reloads when the policy file changes.
    pub fn watch(&mut self, watch: PolicyWatch) {
        self.watch = Some(watch);
    }

    /// Runs until SIGINT or SIGTERM: nothing else ends it.
    pub async fn run(&mut self, handler: &mut impl Handler) {
        // What loading (the kernel's BTF) and the first reading of /proc freed goes back now.
        release_freed_memory();
        let timer = tokio::time::sleep(self.collect);
        tokio::pin!(timer);
        // The ring's readiness can only fail if the runtime is going away; should it ever, the
        // timer drain alone keeps guardian working.
        let mut ring_wakeups = true;
        loop {
            // Whatever the last turn did (records drained, a decision that waits, a deadline
            // the handler set) is reflected in when the next tick comes.
            let now = procs::boottime_ns();
            let wait = self.next_tick_ns(handler, now).saturating_sub(now);
            let due = Instant::now() + Duration::from_nanos(wait);
            if timer.deadline() != due {
                timer.as_mut().reset(due);
            }
            tokio::select! {
                guard = self.ring.readable_mut(), if ring_wakeups => {
                    match guard {
                        // Cleared before draining: a record committed meanwhile is drained now
                        // and at worst wakes one empty pass; none is left waiting for an edge.
                        Ok(mut guard) => guard.clear_ready(),
                        Err(e) => {
                            warn!("ring buffer wakeups failed ({e}); draining on the timer only");
                            ring_wakeups = false;
                            self.set_idle(false);
                            self.can_idle = false;
                        }
                    }
                    self.drain(handler);
                }
                () = &mut timer => self.tick(handler),
                service = poll_fn(|cx| handler.poll_memory_event(cx)) => {
                    self.drain(handler);
                    handler.memory_event(&mut self.state, service);
                    self.scan_if_due(handler);
                }
                _ = self.sighup.recv() => {
                    self.drain(handler);
                    handler.reload(&mut self.state, Reload::Signal);
                    self.scan_if_due(handler);
                }
                changed = next_change(&mut self.watch) => match changed {
                    Ok(true) => self.reload_due_ns = Some(procs::boottime_ns() + RELOAD_SETTLE_NS),
                    Ok(false) => {}
                    Err(e) => {
                        warn!("watching the policy's directory failed ({e}); reload it with SIGHUP");
                        self.watch = None;
                    }
                },
                ask = next_ask(&mut self.asks) => match ask {
                    Some(ask) => {
                        self.drain(handler);
                        let answer = handler.ask(&mut self.state, &ask.query);
                        // A reload asked for is complete before it is answered.
                        self.scan_if_due(handler);
                        // The client may have given up meanwhile.
                        let _ = ask.reply.send(answer);
                    }
                    None => {
                        warn!("the control socket's server stopped; status and explain are unavailable");
                        self.asks = None;
                    }
                },
                _ = self.sigint.recv() => break,
                _ = self.sigterm.recv() => break,
            }
        }
        self.drain(handler);
        self.report_losses(handler);
        debug!(stats = ?self.state.table.stats, "stopping");
    }

    /// A timer tick: drains, retries reparents, reads the kernel's counters and lets the handler
    /// do its periodic work; then, if no record came since the last tick, the loop idles (see
    /// [`Monitor::next_tick_ns`] for when it comes back).
    fn tick(&mut self, handler: &mut impl Handler) {
        self.last_tick_ns = procs::boottime_ns();
        self.drain(handler);
        self.confirm_reparents(handler);
        let now = procs::boottime_ns();
        if now >= self.next_stats_ns {
            self.next_stats_ns = now + STATS_EVERY_NS;
            self.report_losses(handler);
        }
        self.state.table.expire(now);
        if let Some(logger) = self.state.probes.logger.as_mut() {
            logger.flush();
        }
        handler.tick(&mut self.state);
        if self
            .reload_due_ns
            .is_some_and(|due| procs::boottime_ns() >= due)
        {
            self.reload_due_ns = None;
            handler.reload(&mut self.state, Reload::FileChanged);
        }
        self.scan_if_due(handler);

        if !std::mem::take(&mut self.drained) && self.can_idle && !self.idle {
            self.set_idle(true);
            // The kernel side sees the flag from its next commit on; what was committed before
            // is drained here (which makes the loop busy again).
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.drain(handler);
            self.drained = false;
        }
        // A burst (a service adopted, a fork storm) leaves freed memory behind; the next idle
        // tick after it gives it back (the housekeeping comes within a second).
        if self.idle && self.trim_due && now >= self.next_trim_ns {
            self.trim_due = false;
            self.next_trim_ns = now + TRIM_EVERY_NS;
            release_freed_memory();
        }
    }

    /// When the next tick is due (boot ns): the collection interval after the last one while
    /// records come or reparents wait for `/proc`; otherwise at the handler's or a reload's
    /// deadline, and at most [`IDLE_INTERVAL`] after it. Ticks are never closer than
    /// [`DRAIN_INTERVAL`].
    fn next_tick_ns(&self, handler: &impl Handler, now: u64) -> u64 {
        let last = self.last_tick_ns;
        let busy = !self.idle || !self.pending.is_empty();
        let mut next = last + nanos(if busy { self.collect } else { IDLE_INTERVAL });
        if let Some(due) = self.reload_due_ns {
            next = next.min(due);
        }
        if let Some(due) = handler.next_tick(&self.state, now) {
            next = next.min(due);
        }
        next.max(last + nanos(DRAIN_INTERVAL))
    }

    /// Tells the kernel side whether to wake the loop for every record. Should that fail, the
    /// loop stays busy: it never sleeps on records that would not wake it.
    fn set_idle(&mut self, idle: bool) {
        if idle == self.idle {
            return;
        }
        match self.state.probes.set_reader(reader::IDLE, idle) {
            Ok(()) => self.idle = idle,
            Err(e) => {
                warn!(
                    "cannot tell the kernel side when the loop idles ({e}); collecting every {:?}",
                    self.collect
                );
                self.can_idle = false;
            }
        }
    }

    /// Reads `/proc` for a handler that asked, then applies the events that came meanwhile, so
    /// that the table it compares the scan with is never older than the scan.
    fn scan_if_due(&mut self, handler: &mut impl Handler) {
        if handler.scan_due() {
            let scan = procs::scan();
            self.drain(handler);
            handler.scanned(&mut self.state, scan);
            release_freed_memory();
        }
    }

    /// Decodes every record waiting in the ring buffer (in place, no copy of the bytes), then
    /// applies them in kernel order.
    fn drain(&mut self, handler: &mut impl Handler) {
        let mut decoded = std::mem::take(&mut self.decoded);
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            decoded.push(events::decode(&item));
        }
        // Routine records come: collect them on the short timer rather than be woken for each.
        // Records that always wake the loop (execs, exits of processes with children, a parent's
        // SIGKILL) leave it as it is: idling costs them nothing. (A fork that woke it cannot be
        // told from one that did not.)
        let routine = |ev: &Result<Event, events::DecodeError>| {
            !matches!(
                ev,
                Ok(Event::Exec(_))
                    | Ok(Event::Doomed(_))
                    | Ok(Event::Exit(events::Exit {
                        had_children: true,
                        ..
                    }))
            )
        };
        if decoded.iter().any(routine) {
            self.drained = true;
            self.trim_due = true;
            self.set_idle(false);
        }
        for ev in decoded.drain(..) {
            match ev {
                Ok(ev) => self.apply(ev, handler),
                Err(e) => {
                    self.decode_errors += 1;
                    warn!("undecodable ring-buffer record: {e}");
                    handler.notice(
                        &mut self.state,
                        &Notice::Lost {
                            reason: "decode_error",
                            count: 1,
                            total: self.decode_errors,
                        },
                    );
                }
            }
        }
        self.decoded = decoded;
    }

    fn apply(&mut self, mut ev: Event, handler: &mut impl Handler) {
        if let Event::Exec(e) = &mut ev {
            if e.argv_incomplete {
                // Longer than the kernel side copies: complete it while the process lives.
                if let Some(argv) = procs::argv(e.pid).filter(|a| a.len() >= e.argv.len()) {
                    e.argv = argv;
                }
            }
        }
        let ts_ns = match &ev {
            Event::Fork(f) => f.ts_ns,
            Event::Exec(e) => e.ts_ns,
            Event::Thread(t) => t.ts_ns,
            Event::Doomed(d) => {
                // The table does not change: the process lives until its exit.
                let notice = Notice::Doomed {
                    pid: d.pid,
                    ts_ns: d.ts_ns,
                };
                handler.notice(&mut self.state, &notice);
                return;
            }
            Event::Exit(x) => {
                // An orphan dying before /proc showed its new parent: the kernel just told it.
                if let Some(i) = self.pending.iter().position(|p| p.pid == x.pid) {
                    let p = self.pending.swap_remove(i);
                    self.confirm(p, x.ppid, handler);
                }
                x.ts_ns
            }
        };
        let mut changes = std::mem::take(&mut self.changes);
        self.state.table.apply_into(&ev, &mut changes);
        if changes.is_empty() {
            if let Event::Exec(e) = &ev {
                handler.exec_unknown(&mut self.state, e);
            }
        } else {
            self.notify(&mut changes, ts_ns, handler);
        }
        self.changes = changes;
    }

    /// Hands table changes to the handler, in order, emptying `changes`; orphans get their new
    /// parent confirmed.
    fn notify(&mut self, changes: &mut Vec<Change>, ts_ns: u64, handler: &mut impl Handler) {
        for change in changes.drain(..) {
            let notice = match change {
                Change::Forked { pid } => Notice::Fork { pid, ts_ns },
                Change::Execed { pid } => Notice::Exec { pid, ts_ns },
                Change::ThreadStarted { pid, tid } => Notice::Thread { pid, tid, ts_ns },
                Change::Exited { pid } => Notice::Exit {
                    pid,
                    ts_ns,
                    status: match self.state.table.get(pid).map(|p| p.state) {
                        Some(crate::table::State::Exited { status, .. }) => status,
                        _ => None,
                    },
                },
                Change::Orphaned { pid, old_parent } => {
                    handler.notice(
                        &mut self.state,
                        &Notice::Orphaned {
                            pid,
                            old_parent,
                            ts_ns,
                        },
                    );
                    if let Some(p) = self.state.table.alive(pid) {
                        let pending = PendingReparent {
                            pid,
                            start_ns: p.start_ns,
                            old_parent,
                            ts_ns,
                        };
                        self.confirm(pending, None, handler);
                    }
                    continue;
                }
            };
            handler.notice(&mut self.state, &notice);
        }
    }

    /// Retries the reparents `/proc` did not show yet.
    fn confirm_reparents(&mut self, handler: &mut impl Handler) {
        for p in std::mem::take(&mut self.pending) {
            self.confirm(p, None, handler);
        }
    }

    /// Confirms one orphan's new parent and reports it. The kernel reparents right after the
    /// tracepoint fires, so `/proc` can still show the old parent for a moment: the orphan is then
    /// kept for the next pass. `at_exit` is the parent the kernel saw when the orphan itself died,
    /// for orphans that die before `/proc` showed their new parent.
    fn confirm(&mut self, p: PendingReparent, at_exit: Option<u32>, handler: &mut impl Handler) {
        let Some(entry) = self
            .state
            .table
            .alive(p.pid)
            .filter(|e| e.same_start(p.start_ns))
        else {
            return; // the PID belongs to someone else now
        };
        let seen = match at_exit {
            Some(ppid) => Some(ppid),
            None => procs::stat(p.pid)
                .filter(|st| entry.same_start(st.start_ns))
                .map(|st| st.ppid),
        };
        let new_parent = match seen {
            Some(ppid) if ppid != p.old_parent => ppid,
            Some(_) if procs::boottime_ns().saturating_sub(p.ts_ns) < REPARENT_GIVE_UP_NS => {
                self.pending.push(p);
                return;
            }
            Some(_) => {
                warn!(pid = p.pid, "no reparent visible in /proc; giving up");
                return;
            }
            None => return, // gone without an exit event yet; its exit will say
        };
        self.state.table.reparented(p.pid, new_parent);
        handler.notice(
            &mut self.state,
            &Notice::Reparent {
                pid: p.pid,
                old_parent: p.old_parent,
                new_parent,
                ts_ns: p.ts_ns,
            },
        );
    }

    fn report_losses(&mut self, handler: &mut impl Handler) {
        let now = self.state.probes.kernel_stats();
        let before = std::mem::replace(&mut self.kstats, now);
        for (reason, count, total) in [
            (
                "ringbuf_full",
                now.ringbuf_full - before.ringbuf_full,
                now.ringbuf_full,
            ),
            (
                "tracked_map_full",
                now.tracked_full - before.tracked_full,
                now.tracked_full,
            ),
            (
                "bad_tracepoint_field",
                now.bad_field - before.bad_field,
                now.bad_field,
            ),
        ] {
            if count > 0 {
                warn!(reason, count, total, "kernel events lost");
                handler.notice(
                    &mut self.state,
                    &Notice::Lost {
                        reason,
                        count,
                        total,
                    },
                );
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Whether the policy's directory changed, or never when it is not watched.
async fn next_change(watch: &mut Option<PolicyWatch>) -> std::io::Result<bool> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// The next question, or never when none can come.
async fn next_ask(asks: &mut Option<mpsc::Receiver<Ask>>) -> Option<Ask> {
    match asks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Gives the heap's free pages back to the kernel. Parsing the kernel's BTF at start-up (to find
/// a few offsets), reading all of `/proc` and bursts of events take MiBs for a moment; glibc
/// keeps what they freed mapped, and resident, unless asked (it only trims the heap's top on its
/// own).
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Raises the soft limit on open files to the hard one: every signal opens a pidfd and a
/// `/proc` directory, and a burst of orphans must not run guardian out of descriptors. (A
/// decision that still finds none is retried, see [`crate::act::enforce::Enforcer::tick`].)
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => debug!(limit = ?limit.maximum, "RLIMIT_NOFILE soft limit raised to the hard one"),
        Err(e) => warn!("could not raise RLIMIT_NOFILE to its hard limit: {e}"),
    }
}
