//! `guardian --policy FILE`: finds each service's processes, follows them, and acts on their
//! orphans the moment their parent dies.
//!
//! A process that execs into a command matching a service's selectors is a **root** of that
//! service; every descendant of a root is a **member**, and stays one after it is reparented. An
//! **orphan** is a member whose parent (also a member) died while it lived. Roots are never
//! orphans: a service started by a shell that exits is left alone, even when the shell's own
//! command line matches too. Forked workers do not exec, so they stay members.

mod reload;
mod status;

pub use status::render_status;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use guardian_common::{reader, tracked_flags};
use tracing::{debug, info, warn};

use crate::{
    act::budget::{BudgetEngine, NewTask},
    act::enforce::{Enforcer, Reason, Request},
    cli::RunArgs,
    explain,
    kernel::events::{Exec, ExitStatus},
    kernel::loader::LoadOptions,
    monitor::{Handler, Monitor, Notice, Reload, State, DRAIN_INTERVAL},
    output::{Output, Proc, Record, Ts},
    policy::protect::Protections,
    policy::selector::Candidate,
    policy::{
        exec_filter::ExecFilter, watch::PolicyWatch, AtStart, Mode, OrphanAction, Policy, Service,
    },
    procs::{self, Pin, Pinned, ProcInfo},
    serve::{
        self, control,
        control::{Answer, Query},
        metrics::{self, Metrics},
        notify::Notifier,
    },
    table::Change,
};

/// Most processes one service adoption walks (a bound, not an expected size).
const MAX_ADOPT: usize = 100_000;
/// When a parent exits normally, an orphan it forked this recently that has not exec'd yet may be
/// a launcher's child on its way to exec a service of its own (`sh -c "app &"`): its decision
/// waits this long (ns). Orphans of a parent killed by a signal are acted on at once.
const FRESH_FORK_NS: u64 = 250_000_000;
/// Every member is checked against `/proc` once in this period (ns), a slice on each tick: the
/// reconciliation that catches what no loss counter reports.
const CHECK_PERIOD_NS: u64 = 5_000_000_000;
/// A member `/proc` shows differently than the table is only a suspect until it still differs
/// this much later (ns): the event that explains it may be waiting in the ring buffer.
const SUSPECT_GRACE_NS: u64 = 200_000_000;
/// While members cannot be tracked in the kernel (its map is full), `/proc` is re-read this
/// often (ns) to follow them.
const UNTRACKED_RESYNC_NS: u64 = 1_000_000_000;
/// How often pids the kernel tracks for nobody are looked for (ns).
const TRACKED_GC_NS: u64 = 30_000_000_000;
/// User names of the policy that did not resolve are looked up again this often (ns).
const USERS_EVERY_NS: u64 = 5_000_000_000;
/// `/proc` is re-read at most this often (ns), however often events are lost.
const RESYNC_EVERY_NS: u64 = 500_000_000;
/// At most one warning this often about members the kernel cannot track (ns).
const UNTRACKED_WARN_NS: u64 = 10_000_000_000;

/// An orphan whose decision waits for a possible exec.
struct Deferred {
    pid: u32,
    start_ns: u64,
    old_parent: u32,
    died_ns: u64,
}

/// What re-reading `/proc` changed.
#[derive(Clone, Copy, Debug, Default)]
struct Synced {
    retired: u64,
    adopted: u64,
    reparented: u64,
    execs: u64,
    roots: u64,
}

/// What a scan of `/proc` the daemon asked for is for.
enum ScanFor {
    Resync(&'static str),
    /// A policy put in force meets the running processes.
    Reload(reload::Pending),
}

/// Why `/proc` is read in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// guardian starts: every service's roots, and the processes already orphaned.
    Startup,
    /// Events were lost, or the table was found wrong.
    Resync,
    /// A reloaded policy's new or changed selectors meet the running processes.
    Reload,
}

impl Sync {
    /// How a root found this way is recorded (`found`).
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Resync => "resync",
            Self::Reload => "reload",
        }
    }
}

/// The periodic reconciliation's state.
#[derive(Default)]
struct Checks {
    /// Members (pid, start) still to check in this period.
    queue: Vec<(u32, u64)>,
    /// Members the period began with, and when it began (ns).
    period_members: usize,
    period_start_ns: u64,
    next_period_ns: u64,
    /// Members `/proc` showed differently, and when first seen so.
    suspects: HashMap<(u32, u64), u64>,
    next_untracked_ns: u64,
    untracked_warned_ns: u64,
    next_gc_ns: u64,
    /// Tracked pids with no process behind them at the last collection.
    gc_absent: HashSet<u32>,
    last_resync_ns: u64,
    next_users_ns: u64,
}

/// How often the metrics' gauges and systemd's status line are brought up to date (ns).
const REFRESH_NS: u64 = 100_000_000;

pub struct Daemon {
    policy: Policy,
    /// `--dry-run`: audit mode whatever the policy says, across reloads too.
    dry_run: bool,
    /// Whether the kernel reports threads (fixed at load: a reload cannot turn it on).
    track_threads: bool,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    /// What the daemon did and saw since it started, for `guardian status`.
    stats: Stats,
    next_refresh_ns: u64,
    last_status: String,
    /// The policy file's contents when last loaded: a change in its directory that leaves
    /// them as they were reloads nothing.
    policy_digest: u64,
    enforcer: Enforcer,
    budgets: BudgetEngine,
    out: Output,
    self_pid: u32,
    deferred: Vec<Deferred>,
    /// Members the kernel could not take into its tracked map (full): followed from `/proc`.
    untracked: HashSet<u32>,
    /// Processes that could not be tracked since the last report, and in all.
    untracked_new: u64,
    untracked_total: u64,
    /// A full re-read of `/proc` is due, and why.
    resync_due: Option<&'static str>,
    /// What the next scan of `/proc` is for (see [`Handler::scanned`]).
    scan_for: Option<ScanFor>,
    checks: Checks,
    /// The next tick is wanted at once (a service with a cgroup lost its last process).
    tick_now: bool,
}

/// What `guardian status` reports beyond the table.
struct Stats {
    started: std::time::Instant,
    /// When the policy in force was loaded.
    loaded: Ts,
    /// Decisions by service and action (performed or not).
    decisions: BTreeMap<String, BTreeMap<&'static str, u64>>,
    lost: u64,
    reloads_ok: u64,
    reloads_failed: u64,
}

/// The policy's mode, unless `--dry-run` forces audit.
fn mode_of(policy: &Policy, dry_run: bool) -> Mode {
    if dry_run {
        Mode::Audit
    } else {
        policy.mode
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(policy: Policy, args: &RunArgs) -> anyhow::Result<()> {
    // Before anything is bound or created: in another pid namespace nothing here is right.
    procs::check_host_pid_namespace()?;
    let dry_run = args.dry_run;
    let mode = mode_of(&policy, dry_run);
    let budgets = BudgetEngine::new(&policy, mode)?;
    // What is served is bound before anything is loaded: a taken port or a socket another
    // guardian answers is a start-up error.
    let metrics = Arc::new(Metrics::new());
    let metrics_listener = args.metrics_address.map(metrics::bind).transpose()?;
    let socket = control::socket_path(args.socket.as_deref());
    let control_listener = control::bind(&socket)?;
    let _socket_file = control::SocketFile(socket.clone());
    let track_threads = BudgetEngine::counts_tasks(&policy);
    let mut monitor = Monitor::start(LoadOptions {
        track_all: false,
        track_threads,
    })?;
    let asks = serve::start(
        metrics_listener.map(|l| (l, metrics.clone())),
        control_listener,
    )?;
    monitor.answer(asks);
    if args.watch_policy {
        match PolicyWatch::new(&policy.path) {
            Ok(w) => monitor.watch(w),
            Err(e) => warn!("cannot watch the policy's directory ({e}): reload it with SIGHUP"),
        }
    }
    let protections = Protections::new(&policy.protect);
    let policy_digest = reload::digest(&policy.path);
    let mut daemon = Daemon {
        enforcer: Enforcer::new(mode, protections),
        budgets,
        policy,
        dry_run,
        track_threads,
        metrics,
        notifier: Notifier::new(),
        stats: Stats {
            started: std::time::Instant::now(),
            loaded: monitor.state.clock.now(),
            decisions: BTreeMap::new(),
            lost: 0,
            reloads_ok: 0,
            reloads_failed: 0,
        },
        next_refresh_ns: 0,
        last_status: String::new(),
        policy_digest,
        out: Output::new(args.output),
        self_pid: std::process::id(),
        deferred: Vec::new(),
        untracked: HashSet::new(),
        untracked_new: 0,
        untracked_total: 0,
        resync_due: None,
        scan_for: None,
        checks: Checks::default(),
        tick_now: false,
    };
    // Before the scan: an exec the filter keeps back from now on is of a process the scan
    // reads, or of one no service matches.
    daemon.put_exec_filter(&mut monitor.state);
    daemon.sync(&mut monitor.state, Sync::Startup, procs::scan());
    daemon.budgets.sweep(&monitor.state, &daemon.policy);
    let ready = Record::Ready {
        ts: monitor.state.clock.now(),
        pid: daemon.self_pid,
        version: env!("CARGO_PKG_VERSION"),
        group_dead: monitor.state.probes.group_dead.as_str(),
        processes: monitor.state.table.len_alive(),
    };
    daemon.out.emit(&ready);
    info!(
        policy = %daemon.policy.path.display(),
        mode = mode.as_str(),
        services = daemon.policy.services.len(),
        members = monitor.state.table.len_alive(),
        socket = %socket.display(),
        metrics = ?args.metrics_address,
        "guardian running"
    );
    daemon.refresh(&monitor.state);
    daemon.notifier.ready(&daemon.last_status);
    monitor.run(&mut daemon).await;
    daemon.budgets.shutdown(&daemon.policy);
    let c = daemon.enforcer.counts;
    info!(
        signalled = c.signalled,
        would_signal = c.would_signal,
        reported = c.reported,
        refused = c.refused,
        put_off = c.retried,
        "guardian stopped"
    );
    daemon.out.close(std::time::Duration::from_secs(2));
    Ok(())
}

/// Puts a process just tracked in the kernel into the table (read from `/proc` unless the table
/// or the start-up scan knows it already); false if it is gone. One known from before it was
/// tracked is checked to be alive still: if it was gone already, its exit will never come to
/// take it out of the kernel's map. One read now is alive after it was tracked.
fn enter(state: &mut State, pid: u32, known: &HashMap<u32, &ProcInfo>) -> bool {
    let before = match state.table.alive(pid) {
        Some(e) => Some((e.start_ns, None)),
        None => known.get(&pid).map(|&i| (i.start_ns, Some(i))),
    };
    match before {
        Some((start, info)) => {
            if !matches!(Pinned::open(pid, Some(start)), Pin::Ok(_) | Pin::Failed(_)) {
                return false;
            }
            if let Some(info) = info {
                state.table.insert(info.clone());
            }
            true
        }
        None => match procs::read(pid) {
            Some(info) if live(&info) => {
                state.table.insert(info);
                true
            }
            _ => false,
        },
    }
}

/// Whether a `/proc` entry is a live process (a zombie leader with live threads still is one).
pub(crate) fn live(p: &ProcInfo) -> bool {
    let dead = matches!(p.state, 'Z' | 'X') && p.threads <= 1;
    !p.kernel_thread && !dead
}

/// The first service (in file order) whose selectors the candidate matches; never pid 1 nor
/// guardian itself (`self_pid`).
pub(crate) fn match_service(policy: &Policy, self_pid: u32, c: &Candidate<'_>) -> Option<usize> {
    if c.pid <= 1 || c.pid == self_pid {
        return None;
    }
    policy.services.iter().position(|s| s.selector.matches(c))
}

/// What [`find_roots`] found: (pid, service) pairs, in scan order.
pub(crate) struct Found {
    pub roots: Vec<(u32, usize)>,
    /// Processes already orphaned when found (see [`orphaned_at_start`]).
    pub at_start: Vec<(u32, usize)>,
}

/// The service roots among the live processes of `scan` (`by_pid` indexes it) that belong to no
/// service yet (`assigned` says which do), and the processes already orphaned at start. The
/// start-up rule, shared with `guardian explain --policy`.
pub(crate) fn find_roots(
    policy: &Policy,
    self_pid: u32,
    scan: &[ProcInfo],
    by_pid: &HashMap<u32, &ProcInfo>,
    assigned: impl Fn(u32) -> bool,
) -> Found {
    let mut matched: HashMap<u32, usize> = HashMap::new();
    for p in scan {
        if assigned(p.pid) {
            continue;
        }
        if let Some(svc) = match_service(policy, self_pid, &Candidate::from(p)) {
            matched.insert(p.pid, svc);
        }
    }
    let mut roots = Vec::new();
    let mut at_start = Vec::new();
    for p in scan {
        let Some(&svc) = matched.get(&p.pid) else {
            continue;
        };
        // A match below another match of the same service, with its parent's very command
        // line, is a forked worker (no exec of its own): a member, not a root.
        let mut up = p.ppid;
        let mut below_root = false;
        for _ in 0..by_pid.len() {
            match by_pid.get(&up) {
                Some(a) if a.pid > 1 => {
                    if matched.get(&a.pid) == Some(&svc) {
                        below_root = true;
                        break;
                    }
                    up = a.ppid;
                }
                _ => break,
            }
        }
        let forked = by_pid
            .get(&p.ppid)
            .is_some_and(|parent| parent.argv == p.argv);
        if below_root && forked {
            continue;
        }
        if orphaned_at_start(&policy.services[svc], p, by_pid) {
            at_start.push((p.pid, svc));
        } else {
            roots.push((p.pid, svc));
        }
    }
    // Deepest first: a root's adoption stops at the roots already adopted below it, so a
    // service launched by a matching shell (`sh -c "app &"`) stays a root of its own, and the
    // shell's exit does not make it an orphan.
    let depth = |pid: u32| {
        let mut up = pid;
        let mut d = 0usize;
        while let Some(p) = by_pid.get(&up).filter(|p| p.pid > 1 && d < by_pid.len()) {
            up = p.ppid;
            d += 1;
        }
        d
    };
    roots.sort_by_key(|&(pid, _)| std::cmp::Reverse(depth(pid)));
    Found { roots, at_start }
}

/// A selector-matching process found at start whose parent is init, which is not its own
/// process-group leader, and whose group leader is gone: the signature of a worker left behind
/// by a dead parent (a service started by init leads its own group). With `orphan_match`, that
/// must select it too.
fn orphaned_at_start(service: &Service, p: &ProcInfo, by_pid: &HashMap<u32, &ProcInfo>) -> bool {
    if p.ppid != 1 || p.pgid == p.pid || by_pid.contains_key(&p.pgid) {
        return false;
    }
    match &service.orphan_match {
        Some(m) => m.matches(&Candidate::from(p)),
        None => true,
    }
}

impl Daemon {
    /// The first service (in file order) whose selectors the candidate matches.
    fn match_service(&self, c: &Candidate<'_>) -> Option<usize> {
        match_service(&self.policy, self.self_pid, c)
    }

    /// Gives the kernel the exec filter of the policy in force (see [`ExecFilter`]); when that
    /// fails, the kernel reports every exec.
    fn put_exec_filter(&mut self, state: &mut State) {
        let filter = ExecFilter::new(&self.policy);
        let keys = filter.keys();
        match state.probes.set_exec_filter(keys.as_ref()) {
            Ok(()) => info!("exec filter {}", filter.describe()),
            Err(e) => {
                warn!("exec filter off, every exec on the host is reported: {e:#}");
            }
        }
    }

    fn emit(&mut self, records: impl IntoIterator<Item = Record>) {
        for r in records {
            self.emit_one(&r);
        }
    }

    /// Every record goes out here: printed, and counted for metrics and status.
    fn emit_one(&mut self, r: &Record) {
        match r {
            Record::Decision {
                service, action, ..
            } => {
                self.metrics.record(r);
                *self
                    .stats
                    .decisions
                    .entry(service.clone())
                    .or_default()
                    .entry(action)
                    .or_default() += 1;
            }
            Record::Lost { count, .. } => {
                self.metrics.lost(*count);
                self.stats.lost += count;
            }
            _ => {}
        }
        self.out.emit(r);
    }

    /// Brings the table in line with `/proc`: at start-up (every service's roots, and the
    /// processes already orphaned), and after events were lost or a check found the table
    /// wrong (members that died unseen are retired and their orphans acted on, parents
    /// corrected, unseen execs and children followed, new roots found).
    ///
    /// `scan` was read before the events then waiting were applied (see
    /// [`Handler::scanned`]): what it shows of a member that the table does not is read from
    /// `/proc` once more, and the table, never older than the scan, stands unless `/proc` still
    /// says otherwise.
    fn sync(&mut self, state: &mut State, why: Sync, scan: Vec<ProcInfo>) -> Synced {
        let now = procs::boottime_ns();
        let scan: Vec<ProcInfo> = scan.into_iter().filter(live).collect();
        let by_pid: HashMap<u32, &ProcInfo> = scan.iter().map(|p| (p.pid, p)).collect();
        let mut n = Synced::default();

        // Members the table has: the dead retired, parents and images corrected.
        let members: Vec<(u32, u64)> = state.table.members().map(|p| (p.pid, p.start_ns)).collect();
        let mut orphans: Vec<(u32, u32)> = Vec::new();
        let mut execs = Vec::new();
        for &(pid, start) in &members {
            let listed = by_pid
                .get(&pid)
                .filter(|i| procs::same_process(start, i.start_ns));
            // Not listed: dead, or forked after the scan (its fork applied since).
            let dead = listed.is_none()
                && match Pinned::open(pid, Some(start)) {
                    Pin::Ok(p) => p.stat.zombie,
                    Pin::Gone | Pin::Reused => true,
                    Pin::Failed(_) => false,
                };
            let Some(info) = listed else {
                if !dead {
                    continue;
                }
                debug!(pid, "a member died unseen");
                n.retired += 1;
                for change in state.table.retire_missed(pid, now) {
                    if let Change::Orphaned { pid, old_parent } = change {
                        orphans.push((pid, old_parent));
                    }
                }
                self.untracked.remove(&pid);
                continue;
            };
            let Some(entry) = state.table.alive(pid) else {
                continue;
            };
            // Compared on the resolved executable: a process may rewrite its own command line
            // (setproctitle) without exec'ing.
            if info.exe.is_some() && entry.exe.as_deref() != info.exe.as_deref() {
                execs.push(pid);
            }
        }
        for &(pid, start) in &members {
            let (Some(entry), Some(info)) = (state.table.alive(pid), by_pid.get(&pid)) else {
                continue;
            };
            if !entry.same_start(start) || info.ppid == entry.parent {
                continue;
            }
            // The parent now: the scan's may be older than the table's.
            let Some(ppid) = procs::stat(pid)
                .filter(|st| procs::same_process(start, st.start_ns))
                .map(|st| st.ppid)
                .filter(|&ppid| ppid != entry.parent)
            else {
                continue;
            };
            let old_parent = entry.parent;
            if !orphans.iter().any(|&(p, _)| p == pid)
                && state
                    .table
                    .get(old_parent)
                    .is_some_and(|op| !op.alive() && op.service.is_some())
            {
                orphans.push((pid, old_parent));
            }
            state.table.reparented(pid, ppid);
            n.reparented += 1;
        }
        for pid in execs {
            // The image now, if it still differs from the table's.
            let Some(info) = state.table.alive(pid).and_then(|e| {
                procs::read(pid).filter(|i| {
                    procs::same_process(e.start_ns, i.start_ns)
                        && i.exe.is_some()
                        && i.exe.as_deref() != e.exe.as_deref()
                })
            }) else {
                continue;
            };
            state
                .table
                .update_image(pid, &info.comm, info.exe.clone(), info.argv.clone());
            n.execs += 1;
            self.execed(state, pid, "resync");
        }
        for (pid, old_parent) in orphans {
            if let Some(st) = procs::stat(pid).filter(|st| {
                state
                    .table
                    .alive(pid)
                    .is_some_and(|e| e.same_start(st.start_ns))
            }) {
                state.table.reparented(pid, st.ppid);
            }
            self.orphaned(state, pid, old_parent, now, false);
        }

        // Processes no event announced: children of members become members (or roots of their
        // own, if they exec'd into one), in start order so that parents come first.
        if why != Sync::Startup {
            let mut unknown: Vec<&ProcInfo> = scan
                .iter()
                .filter(|p| {
                    !state
                        .table
                        .alive(p.pid)
                        .is_some_and(|e| procs::same_process(e.start_ns, p.start_ns))
                })
                .collect();
            unknown.sort_by_key(|p| p.start_ns);
            for p in &unknown {
                if state.table.alive(p.pid).is_some() {
                    continue; // adopted meanwhile, below its parent
                }
                let Some(svc) = state.table.alive(p.ppid).and_then(|pp| pp.service) else {
                    continue;
                };
                let root = match self.match_service(&Candidate::from(*p)) {
                    Some(s) if by_pid.get(&p.ppid).is_none_or(|pp| pp.argv != p.argv) => Some(s),
                    _ => None,
                };
                match root {
                    Some(s) => {
                        let members = self.adopt(state, p.pid, s, true, &by_pid);
                        n.roots += 1;
                        self.emit_root(state, p.pid, s, "resync", members);
                    }
                    None => n.adopted += self.adopt(state, p.pid, svc, false, &by_pid) as u64,
                }
            }
        }

        // Service roots among processes that belong to no service.
        let Found { roots, at_start } =
            find_roots(&self.policy, self.self_pid, &scan, &by_pid, |pid| {
                state.table.alive(pid).is_some_and(|e| e.service.is_some())
            });
        let found = why.as_str();
        for (pid, svc) in roots {
            if state.table.alive(pid).is_some_and(|e| e.service.is_some()) {
                continue; // adopted below an earlier root
            }
            let members = self.adopt(state, pid, svc, true, &by_pid);
            n.roots += 1;
            self.emit_root(state, pid, svc, found, members);
        }
        for (pid, svc) in at_start {
            self.adopt(state, pid, svc, false, &by_pid);
            // An orphan like those guardian sees made: counted as one, and first in line as a
            // memory victim under `orphans-then-largest`.
            state.table.set_orphan(pid);
            let service = &self.policy.services[svc];
            let action = match service.orphans_at_start {
                AtStart::Report => OrphanAction::Report,
                AtStart::Enforce => service.orphans,
            };
            let Some(target) = state.table.alive(pid) else {
                continue;
            };
            let record = self.enforcer.act(
                &state.clock,
                Request {
                    service: &service.name,
                    target,
                    action,
                    reason: Reason::OrphanAtStart,
                    kill_timeout: service.kill_timeout,
                    old_parent: target.parent,
                    since_ns: None,
                    usage: None,
                    limit: None,
                    trigger: None,
                },
            );
            self.emit(record);
        }

        // Every member must be in the kernel's map: those the kernel could not take when they
        // were forked (it only counts them), and those that did not fit before, are tried
        // (again); what still does not fit is followed from /proc.
        let tracked: HashSet<u32> = state.probes.tracked_pids().into_iter().collect();
        self.untracked
            .retain(|pid| state.table.alive(*pid).is_some() && !tracked.contains(pid));
        let missing: Vec<(u32, u32)> = state
            .table
            .members()
            .filter(|p| !tracked.contains(&p.pid))
            .filter_map(|p| Some((p.pid, self.track_flags(p.service?, !p.children.is_empty()))))
            .collect();
        for (pid, flags) in missing {
            self.follow(state, pid, flags);
        }
        n
    }

    /// Re-reads `/proc` and says what that changed.
    fn resync(&mut self, state: &mut State, trigger: &'static str, scan: Vec<ProcInfo>) {
        let start = procs::boottime_ns();
        let n = self.sync(state, Sync::Resync, scan);
        let mut members: BTreeMap<String, u64> = BTreeMap::new();
        for (i, s) in self.policy.services.iter().enumerate() {
            members.insert(s.name.clone(), state.table.service_count(i).processes);
        }
        let took_us = procs::boottime_ns().saturating_sub(start) / 1_000;
        info!(trigger, ?n, took_us, "process table re-read from /proc");
        let record = Record::Resync {
            ts: state.clock.now(),
            trigger,
            retired: n.retired,
            adopted: n.adopted,
            reparented: n.reparented,
            execs: n.execs,
            roots: n.roots,
            members,
            took_us,
        };
        self.emit_one(&record);
        // What was wrong has been put right; checks start afresh.
        self.checks.suspects.clear();
    }

    /// How the kernel tracks a member of `svc`: where guardian counts the service's tasks, its
    /// forks wake the loop while a counted service is near its `tasks_max` (see
    /// [`Daemon::watch_task_budgets`]).
    fn track_flags(&self, svc: usize, has_children: bool) -> u32 {
        let mut flags = 0;
        if has_children {
            flags |= tracked_flags::HAS_CHILDREN;
        }
        if self.budgets.counts_tasks_of(svc, &self.policy) {
            flags |= tracked_flags::TASKS_COUNTED;
        }
        flags
    }

    /// Tells the kernel side whether a service whose tasks guardian counts is near its
    /// `tasks_max`: then its members' forks wake the loop, and a fork over the budget is killed
    /// at once. Farther from it, a fork collected on the loop's timer cannot be over. (While the
    /// loop idles, every record wakes it anyway; while it is busy it ticks every 10 ms, and this
    /// is brought up to date on each tick.)
    fn watch_task_budgets(&mut self, state: &mut State) {
        let near = self.budgets.near_tasks_max(state, &self.policy);
        // Should the kernel side not be told, forks over a budget wait for the next tick.
        if let Err(e) = state.probes.set_reader(reader::NEAR_TASKS_MAX, near) {
            debug!("cannot tell the kernel side a task budget is near: {e}");
        }
    }

    /// Tracks a member in the kernel with [`tracked_flags`]; when its map is full, the member
    /// is followed from `/proc` instead (see [`UNTRACKED_RESYNC_NS`]).
    fn follow(&mut self, state: &mut State, pid: u32, flags: u32) {
        match state.probes.track(pid, flags) {
            Ok(()) => {
                self.untracked.remove(&pid);
            }
            Err(e) => {
                if self.untracked.insert(pid) {
                    self.untracked_new += 1;
                }
                let now = procs::boottime_ns();
                if now >= self.checks.untracked_warned_ns + UNTRACKED_WARN_NS {
                    self.checks.untracked_warned_ns = now;
                    warn!(
                        untracked = self.untracked.len(),
                        capacity = state.probes.sizes.tracked,
                        "the kernel cannot track more processes ({e}); members beyond its map are \
                         followed from /proc every second"
                    );
                }
            }
        }
    }

    /// Makes `pid` and its descendants members of service `svc` (and `pid` a root if `root`).
    /// A descendant that is a root of its own stays one, with its own members. Each process is
    /// tracked in the kernel before its children are listed, so a fork that races with the walk
    /// is either listed or reported by the kernel; one found gone once tracked is untracked
    /// (its exit will never come to remove it). Returns the member count.
    fn adopt(
        &mut self,
        state: &mut State,
        pid: u32,
        svc: usize,
        root: bool,
        known: &HashMap<u32, &ProcInfo>,
    ) -> usize {
        let mut stack = vec![pid];
        let mut n = 0;
        while let Some(p) = stack.pop() {
            if n >= MAX_ADOPT {
                warn!(pid, "service adoption stopped at {MAX_ADOPT} processes");
                break;
            }
            if p != pid && state.table.alive(p).is_some_and(|e| e.root) {
                continue;
            }
            let first = self.track_flags(svc, false);
            self.follow(state, p, first);
            if !enter(state, p, known) {
                state.probes.untrack(p);
                self.untracked.remove(&p);
                continue;
            }
            state.table.set_service(p, Some(svc), root && p == pid);
            // In the service's cgroup before its children are listed (see `follow` above).
            if let Some(member) = state.table.alive(p) {
                let records =
                    self.budgets
                        .place(&mut self.enforcer, &state.clock, &self.policy, svc, member);
                self.emit(records);
            }
            // Tracked again if it has children, or if placing it changed who counts its tasks
            // (its cgroup could not be used).
            let kids = procs::children_of(p);
            let flags = self.track_flags(svc, !kids.is_empty());
            if flags != first {
                self.follow(state, p, flags);
            }
            stack.extend(kids);
            n += 1;
        }
        n
    }

    fn emit_root(
        &mut self,
        state: &State,
        pid: u32,
        svc: usize,
        found: &'static str,
        members: usize,
    ) {
        let Some(p) = state.table.alive(pid) else {
            return;
        };
        let name = &self.policy.services[svc].name;
        info!(service = %name, pid, found, members, "service root");
        let record = Record::Root {
            ts: state.clock.now(),
            service: name.clone(),
            proc: Proc {
                pid,
                ppid: p.parent,
                comm: p.comm.clone(),
            },
            cmdline: p.cmdline(),
            found,
            members,
        };
        self.emit_one(&record);
    }

    /// A member exec'd: if it now matches a service's selectors, it becomes that service's
    /// root (a service launched by a matching shell must outlive the shell).
    fn execed(&mut self, state: &mut State, pid: u32, found: &'static str) {
        let Some(p) = state.table.alive(pid) else {
            return;
        };
        if let Some(svc) = self.match_service(&Candidate::from(p)) {
            if !(p.root && p.service == Some(svc)) {
                let members = self.adopt(state, pid, svc, true, &HashMap::new());
                self.emit_root(state, pid, svc, found, members);
            }
        }
    }

    /// The service `pid` is an orphan of if `old_parent` dies: a live member that is not a
    /// root, whose parent was a member of the same service, and whose decision was not taken
    /// already (see [`Daemon::doomed`]).
    fn orphan_service(state: &State, pid: u32, old_parent: u32) -> Option<usize> {
        let c = state.table.alive(pid)?;
        // Not in any service: never touched. A root's parent is outside the service.
        let svc = c.service.filter(|_| !c.root && !c.decided_early)?;
        (state.table.get(old_parent).and_then(|p| p.service) == Some(svc)).then_some(svc)
    }

    /// A member's parent died: act if it is an orphan of its service.
    fn orphaned(
        &mut self,
        state: &mut State,
        pid: u32,
        old_parent: u32,
        ts_ns: u64,
        may_defer: bool,
    ) {
        let Some(svc) = Self::orphan_service(state, pid, old_parent) else {
            return;
        };
        state.table.set_orphan(pid);
        let Some(c) = state.table.alive(pid) else {
            return;
        };
        let parent_exited_normally = matches!(
            state.table.get(old_parent).map(|p| p.state),
            Some(crate::table::State::Exited {
                status: Some(ExitStatus::Code(_)),
                ..
            })
        );
        if may_defer
            && parent_exited_normally
            && c.exec_ns.is_none()
            && ts_ns.saturating_sub(c.start_ns) < FRESH_FORK_NS
        {
            self.deferred.push(Deferred {
                pid,
                start_ns: c.start_ns,
                old_parent,
                died_ns: ts_ns,
            });
            return;
        }
        self.decide_orphan(state, pid, svc, old_parent, ts_ns, None);
    }

    /// A member with children was sent SIGKILL: its death is certain, but its exit is reported
    /// only once it runs again, and before Linux 6.16 only after it freed its memory
    /// (milliseconds for a large process). The children its death will
    /// make orphans of its service are decided now, by the rule, checks and enforcer of the exit
    /// path, their records saying `trigger: parent_sigkilled`; the exit then decides no second
    /// time on them, and decides on any child forked after the SIGKILL (the parent may run a
    /// moment longer). For `kill` and `terminate` (whose grace period then starts at once, the
    /// parent's death being as certain as at its exit); `report` has nothing to gain from it
    /// and waits for the exit.
    fn doomed(&mut self, state: &mut State, parent: u32, ts_ns: u64) {
        let Some(p) = state.table.alive(parent) else {
            return;
        };
        if p.service
            .is_none_or(|svc| self.policy.services[svc].orphans == OrphanAction::Report)
        {
            return;
        }
        let children: Vec<u32> = p.children.iter().copied().collect();
        for pid in children {
            let Some(svc) = Self::orphan_service(state, pid, parent) else {
                continue;
            };
            self.decide_orphan(state, pid, svc, parent, ts_ns, Some("parent_sigkilled"));
        }
    }

    /// Applies the service's `orphans` action to one of its orphans, if `orphan_match` (when
    /// given) selects it. `early`: decided at its parent's SIGKILL, with this trigger.
    fn decide_orphan(
        &mut self,
        state: &mut State,
        pid: u32,
        svc: usize,
        old_parent: u32,
        ts_ns: u64,
        early: Option<&'static str>,
    ) {
        let service = &self.policy.services[svc];
        let Some(c) = state.table.alive(pid) else {
            return;
        };
        if let Some(m) = &service.orphan_match {
            if !m.matches(&Candidate::from(c)) {
                debug!(pid, service = %service.name, "orphan not selected by orphan_match");
                return;
            }
        }
        let record = self.enforcer.act(
            &state.clock,
            Request {
                service: &service.name,
                target: c,
                action: service.orphans,
                reason: Reason::Orphan,
                kill_timeout: service.kill_timeout,
                old_parent,
                since_ns: Some(ts_ns),
                usage: None,
                limit: None,
                trigger: early,
            },
        );
        if early.is_some() {
            state.table.set_decided_early(pid);
        }
        self.emit(record);
    }

    /// The periodic reconciliation: a slice of the members is checked against `/proc` on each
    /// tick (each member once per [`CHECK_PERIOD_NS`]); a difference that outlives
    /// [`SUSPECT_GRACE_NS`] means an event was missed without a loss being counted, and `/proc`
    /// is re-read. Members the kernel cannot track are followed from `/proc` every second, and
    /// pids tracked for nobody are dropped from the kernel's map.
    fn check(&mut self, state: &mut State) {
        let now = procs::boottime_ns();
        let c = &mut self.checks;
        if c.queue.is_empty() && now >= c.next_period_ns {
            c.queue = state.table.members().map(|p| (p.pid, p.start_ns)).collect();
            c.period_members = c.queue.len();
            c.period_start_ns = now;
            c.next_period_ns = now + CHECK_PERIOD_NS;
        }
        // Ticks come every few ms or every second: each takes its share of the period by time.
        let elapsed = now.saturating_sub(c.period_start_ns).min(CHECK_PERIOD_NS);
        let due =
            (c.period_members as u128 * u128::from(elapsed)).div_ceil(u128::from(CHECK_PERIOD_NS));
        let done = c.period_members - c.queue.len();
        let take = (due as usize).saturating_sub(done).min(c.queue.len());
        let mut batch: Vec<(u32, u64)> = c.queue.split_off(c.queue.len() - take);
        // Suspects due for their second look.
        batch.extend(
            c.suspects
                .iter()
                .filter(|&(_, &since)| now >= since + SUSPECT_GRACE_NS)
                .map(|(&k, _)| k),
        );
        for (pid, start) in batch {
            let Some(entry) = state
                .table
                .alive(pid)
                .filter(|e| e.same_start(start) && e.service.is_some())
            else {
                self.checks.suspects.remove(&(pid, start));
                continue; // its exit was seen meanwhile
            };
            let wrong = match Pinned::open(pid, Some(start)) {
                Pin::Ok(p) => p.stat.ppid != entry.parent,
                Pin::Gone | Pin::Reused => true,
                Pin::Failed(_) => false,
            };
            if !wrong {
                self.checks.suspects.remove(&(pid, start));
                continue;
            }
            match self.checks.suspects.get(&(pid, start)) {
                Some(&since) if now >= since + SUSPECT_GRACE_NS => {
                    debug!(pid, "the table disagrees with /proc; re-reading it");
                    self.resync_due.get_or_insert("check");
                }
                Some(_) => {}
                None => {
                    self.checks.suspects.insert((pid, start), now);
                }
            }
        }
        if !self.untracked.is_empty() && now >= self.checks.next_untracked_ns {
            self.checks.next_untracked_ns = now + UNTRACKED_RESYNC_NS;
            self.resync_due.get_or_insert("untracked");
        }
        if now >= self.checks.next_users_ns {
            self.checks.next_users_ns = now + USERS_EVERY_NS;
            let changed = self.policy.resolve_users();
            if !changed.is_empty() {
                for &svc in &changed {
                    info!(service = %self.policy.services[svc].name, "a user the policy names exists now");
                }
                // Their execs from now on pass the kernel's filter; processes already running as
                // that user do not exec again: look for them.
                self.put_exec_filter(state);
                self.resync_due.get_or_insert("users");
            }
        }
        if now >= self.checks.next_gc_ns {
            self.checks.next_gc_ns = now + TRACKED_GC_NS;
            self.collect_tracked(state, now);
        }
    }

    /// Drops from the kernel's map the pids it tracks for no member: a pid whose process was
    /// gone at two collections in a row (a fork the kernel tracked whose record is still on
    /// its way shows up in `/proc` within microseconds), or a live process that belongs to no
    /// service and was not started in the last second (its fork record has been read).
    fn collect_tracked(&mut self, state: &mut State, now: u64) {
        let mut absent = HashSet::new();
        let mut dropped = 0;
        for pid in state.probes.tracked_pids() {
            if state.table.alive(pid).is_some_and(|p| p.service.is_some()) {
                continue;
            }
            match Pinned::open(pid, None) {
                Pin::Gone => {
                    if self.checks.gc_absent.contains(&pid) {
                        state.probes.untrack(pid);
                        dropped += 1;
                    } else {
                        absent.insert(pid);
                    }
                }
                Pin::Ok(p) if p.stat.start_ns + 1_000_000_000 < now => {
                    state.probes.untrack(pid);
                    dropped += 1;
                }
                _ => {}
            }
        }
        self.checks.gc_absent = absent;
        if dropped > 0 {
            debug!(
                dropped,
                "pids tracked for no member dropped from the kernel's map"
            );
        }
    }
}

impl Handler for Daemon {
    fn notice(&mut self, state: &mut State, notice: &Notice) {
        match *notice {
            Notice::Orphaned {
                pid,
                old_parent,
                ts_ns,
            } => self.orphaned(state, pid, old_parent, ts_ns, true),
            Notice::Doomed { pid, ts_ns } => self.doomed(state, pid, ts_ns),
            Notice::Exec { pid, .. } => {
                // Kept resolved, as `/proc` shows it: how a later re-read tells an exec it
                // never saw from a command line rewritten in place.
                if let Some(start) = state.table.alive(pid).map(|p| p.start_ns) {
                    if let Pin::Ok(p) = Pinned::open(pid, Some(start)) {
                        if let Some(exe) = p.exe() {
                            state.table.set_exe(pid, exe);
                        }
                    }
                }
                self.execed(state, pid, "exec");
            }
            Notice::Lost {
                reason,
                count,
                total,
            } => {
                let record = Record::Lost {
                    ts: state.clock.now(),
                    reason,
                    count,
                    total,
                };
                self.emit_one(&record);
                self.resync_due = Some("lost");
            }
            Notice::Fork { pid, ts_ns } | Notice::Thread { pid, ts_ns, .. } => {
                if let Some(svc) = state.table.alive(pid).and_then(|p| p.service) {
                    let task = NewTask {
                        pid,
                        thread: matches!(notice, Notice::Thread { .. }),
                        ts_ns,
                    };
                    let records =
                        self.budgets
                            .new_task(state, &mut self.enforcer, &self.policy, svc, task);
                    self.emit(records);
                }
            }
            Notice::Exit { pid, .. } => {
                // A service's last process ended: its cgroup goes at the next tick, now.
                let ended = state
                    .table
                    .get(pid)
                    .and_then(|p| p.service)
                    .is_some_and(|svc| state.table.service_count(svc).processes == 0);
                if ended && self.budgets.has_cgroups() {
                    self.tick_now = true;
                }
            }
            Notice::Reparent { .. } => {}
        }
    }

    fn reload(&mut self, state: &mut State, why: Reload) {
        // Said in the `reload` record and the log.
        let _ = self.reload_policy(state, why);
    }

    fn ask(&mut self, state: &mut State, query: &Query) -> Answer {
        match query {
            Query::Status => Ok(self.status(state)),
            Query::Reload => self.reload_policy(state, Reload::Request),
            &Query::Explain { pid, text } => {
                let ctx = explain::Context {
                    policy: &self.policy,
                    table: &state.table,
                    protections: self.enforcer.protections(),
                    mode: self.enforcer.mode,
                    source: explain::Source::Daemon,
                };
                let e = explain::explain(&ctx, pid).map_err(|e| e.to_string())?;
                if text {
                    Ok(explain::render_text(&e).into())
                } else {
                    serde_json::to_value(&e).map_err(|e| e.to_string())
                }
            }
        }
    }

    fn exec_unknown(&mut self, state: &mut State, exec: &Exec) {
        if let Some(svc) = self.match_service(&Candidate::from(exec)) {
            let members = self.adopt(state, exec.pid, svc, true, &HashMap::new());
            if members > 0 {
                self.emit_root(state, exec.pid, svc, "exec", members);
            }
        }
    }

    fn tick(&mut self, state: &mut State) {
        self.tick_now = false;
        if !self.deferred.is_empty() {
            let now = procs::boottime_ns();
            let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
                .into_iter()
                .partition(|d| now >= d.start_ns + FRESH_FORK_NS);
            self.deferred = wait;
            for d in due {
                if state
                    .table
                    .alive(d.pid)
                    .is_some_and(|p| p.same_start(d.start_ns))
                {
                    self.orphaned(state, d.pid, d.old_parent, d.died_ns, false);
                }
            }
        }
        let records = self.enforcer.tick(&state.clock);
        self.emit(records);
        self.metrics.heartbeat();
        self.notifier.watchdog();
        let records = self.budgets.tick(state, &mut self.enforcer, &self.policy);
        self.emit(records);
        self.watch_task_budgets(state);
        if self.untracked_new > 0 {
            // Their events will not come: as good as lost, and said so.
            self.untracked_total += self.untracked_new;
            let record = Record::Lost {
                ts: state.clock.now(),
                reason: "untracked",
                count: std::mem::take(&mut self.untracked_new),
                total: self.untracked_total,
            };
            self.emit_one(&record);
        }
        self.check(state);
        let now = procs::boottime_ns();
        if now >= self.next_refresh_ns {
            self.next_refresh_ns = now + REFRESH_NS;
            self.refresh(state);
        }
        // A storm of losses (an exec flood) must not turn into a storm of /proc scans.
        if let Some(trigger) = self.resync_due {
            if self.scan_for.is_none() && now >= self.checks.last_resync_ns + RESYNC_EVERY_NS {
                self.checks.last_resync_ns = now;
                self.resync_due = None;
                self.scan_for = Some(ScanFor::Resync(trigger));
            }
        }
    }

    fn next_tick(&self, state: &State, now: u64) -> Option<u64> {
        let soon = now + DRAIN_INTERVAL.as_nanos() as u64;
        let c = &self.checks;
        [
            (self.tick_now || self.untracked_new > 0).then_some(now),
            self.deferred
                .iter()
                .map(|d| d.start_ns + FRESH_FORK_NS)
                .min(),
            self.enforcer.next_due(soon),
            self.budgets.next_due(state, &self.policy, now, soon),
            self.resync_due.map(|_| c.last_resync_ns + RESYNC_EVERY_NS),
            c.suspects
                .values()
                .map(|&since| since + SUSPECT_GRACE_NS)
                .min(),
            (!self.untracked.is_empty()).then_some(c.next_untracked_ns),
            self.notifier
                .watchdog_in()
                .map(|d| now + d.as_nanos() as u64),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn poll_memory_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<usize> {
        self.budgets.poll_notifications(cx)
    }

    fn memory_event(&mut self, state: &mut State, service: usize) {
        let records = self
            .budgets
            .notified(state, &mut self.enforcer, &self.policy, service);
        self.emit(records);
    }

    fn scan_due(&self) -> bool {
        self.scan_for.is_some()
    }

    fn scanned(&mut self, state: &mut State, scan: Vec<ProcInfo>) {
        match self.scan_for.take() {
            Some(ScanFor::Resync(trigger)) => self.resync(state, trigger, scan),
            Some(ScanFor::Reload(pending)) => self.reloaded(state, pending, scan),
            None => {}
        }
    }
}

/// `guardian check`: prints what the policy says.
pub fn check(policy: &Policy) -> String {
    let mut s = format!(
        "{}: valid; mode {}; {} service(s)\n",
        policy.path.display(),
        policy.mode.as_str(),
        policy.services.len()
    );
    let filter = ExecFilter::new(policy);
    for (svc, (_, condition)) in policy.services.iter().zip(&filter.services) {
        s.push_str(&format!("  service {}\n", svc.name));
        s.push_str(&format!("    match          {}\n", svc.selector.describe()));
        s.push_str(&format!("    exec filter    {}\n", condition.describe()));
        let action = match svc.orphans {
            OrphanAction::Terminate => format!(
                "terminate (SIGTERM, SIGKILL after {})",
                humantime::format_duration(svc.kill_timeout)
            ),
            a => a.as_str().to_owned(),
        };
        s.push_str(&format!("    orphans        {action}\n"));
        s.push_str(&format!(
            "    orphan_match   {}\n",
            svc.orphan_match
                .as_ref()
                .map_or("(all orphans)".to_owned(), |m| m.describe())
        ));
        if svc.budgets.any() {
            let mut parts = Vec::new();
            if let Some(t) = svc.budgets.tasks_max {
                parts.push(format!("tasks_max {t}"));
            }
            if let Some(m) = svc.budgets.memory_max {
                parts.push(format!("memory_max {}M", m >> 20));
            }
            if let Some(h) = svc.budgets.memory_high {
                parts.push(format!(
                    "memory_high {}M (victim: {})",
                    h >> 20,
                    svc.memory_victim.as_str()
                ));
            }
            if let Some(c) = svc.budgets.cpu_max {
                let cpus = c as f64 / crate::policy::CPU_PERIOD_US as f64;
                parts.push(format!(
                    "cpu_max {} ({cpus} CPU{})",
                    crate::policy::cpu_percent(c),
                    if cpus == 1.0 { "" } else { "s" }
                ));
            }
            s.push_str(&format!(
                "    budgets        {}; cgroup {}\n",
                parts.join(", "),
                match svc.cgroup {
                    crate::policy::CgroupMode::Own =>
                        format!("own (under {})", policy.cgroup_parent),
                    crate::policy::CgroupMode::Inherit =>
                        "inherit (counted by guardian)".to_owned(),
                }
            ));
        }
        s.push_str(&format!(
            "    at start       {}\n",
            match svc.orphans_at_start {
                AtStart::Report => "report orphans found running",
                AtStart::Enforce => "apply the orphans action to orphans found running",
            }
        ));
    }
    let mut names: Vec<&str> = crate::policy::protect::BUILTIN_PROTECTED.to_vec();
    for n in &policy.protect.names {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    s.push_str(&format!(
        "  never signalled: pid 1, kernel threads, guardian and its ancestors, names {}\n",
        names.join(", ")
    ));
    for p in &policy.protect.selectors {
        s.push_str(&format!("    and processes matching {}\n", p.describe()));
    }
    s.push_str(&format!("  exec filter {}\n", filter.describe()));
    s
}
