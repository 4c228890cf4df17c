//! Per-service task, memory and CPU budgets.
//!
//! `cgroup = "own"`: the kernel enforces `tasks_max`, `memory_max` and `cpu_max` on a cgroup
//! guardian creates; guardian reports what the kernel refused or killed, and acts above
//! `memory_high` itself (one victim, then a re-check), before the kernel's OOM killer picks a
//! wrong one. (`cpu_max` exists only there: counting cannot throttle.)
//! `cgroup = "inherit"` (and audit mode, where nothing is created): guardian counts tasks from
//! its process table and memory from the members' own, and acts itself. So does an `own`
//! service whose cgroup cannot be used (refused, or a write failed) until its last process ends.
//!
//! Memory is read through each member's pinned `/proc` directory, never by bare pid. The cheap
//! figure comes first (the cgroup's charge, or the members' resident sets summed); only when it
//! is over a budget is every member's proportional set size read, and the decision (and the
//! victims' sizes) taken on that: shared pages count once, however many workers map them.

use std::{
    cmp::Reverse,
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll},
};

use anyhow::Context as _;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{debug, info, warn};

use crate::{
    act::cgroup::{
        budget_values, fired, CgroupError, Cgroupfs, Counters, Layout, Origin, Plan, ServiceCgroup,
    },
    act::enforce::{Enforcer, Note, Reason, Request},
    monitor::State,
    output::{Clock, Record},
    policy::{
        cpu_percent, Budget, Budgets, CgroupMode, Mode, OrphanAction, Policy, Service, Victim,
    },
    procs::{self, Pin, Pinned},
    table::{Process, Table},
};

/// Fallback memory check interval when no kernel notification applies (ns).
const MEMORY_POLL_NS: u64 = 250_000_000;
/// Where the kernel notifies crossings, memory is checked when it does; this poll only backs
/// the notification up (ns).
const WATCHED_POLL_NS: u64 = 1_000_000_000;
/// A service whose tasks guardian counts is near its `tasks_max` within a quarter of it, and at
/// least this many tasks: then its members' forks wake the event loop. Farther from it, more
/// forks than that between two of the loop's drains (10 ms apart) are needed to go over the
/// budget before the loop looks.
const NEAR_TASKS_MIN: u64 = 8;
/// At most one report a second of threads over `tasks_max` (threads cannot be killed alone).
const THREAD_REPORT_NS: u64 = 1_000_000_000;
/// A victim still alive after this long is given up on, and the next one is chosen (ns).
const VICTIM_WAIT_NS: u64 = 5_000_000_000;
/// After a memory notification, usage is re-read on every tick (every few ms, however idle the
/// loop) for this long (ns): the kernel's usage figure lags its threshold event by a few pages,
/// and the next event may never come.
const NOTIFIED_FOLLOW_NS: u64 = 200_000_000;
/// At most one warning this often (ns) per service for a fault that can recur on every tick.
const WARN_EVERY_NS: u64 = 1_000_000_000;
/// After a PSS pass finds a service under its budgets, the next pass waits at least this long
/// (ns) unless the members' resident memory grew past the headroom (see [`PssSnapshot`]).
const PSS_REFRESH_NS: u64 = 1_000_000_000;
/// ... and at least this many times what the pass cost, so that PSS passes never take more than
/// about 1/20 of a core however large the service (a 300 MiB process costs about 3.5 ms).
const PSS_COST_FACTOR: u64 = 20;

/// Set once `smaps_rollup` could not be read for a live process; said once.
static NO_PSS: AtomicBool = AtomicBool::new(false);

/// A task a member just started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewTask {
    /// The new process, or the process of the new thread.
    pub pid: u32,
    pub thread: bool,
    pub ts_ns: u64,
}

#[derive(Default)]
struct ServiceState {
    cgroup: Option<ServiceCgroup>,
    /// The kernel's notification of memory crossings, registered with the runtime: the event
    /// loop waits on it (see [`BudgetEngine::poll_notifications`]).
    watch: Option<AsyncFd<OwnedFd>>,
    seen: Counters,
    /// The victim killed last: (pid, start) and when.
    victim: Option<(u32, u64, u64)>,
    /// Processes guardian will not count or choose again: those it would have killed in audit
    /// mode (nothing happened to them, but the decisions go on as if it had), and those it may
    /// not signal.
    skip: HashSet<(u32, u64)>,
    next_poll_ns: u64,
    /// Until when every tick re-reads usage (see [`NOTIFIED_FOLLOW_NS`]).
    follow_until_ns: u64,
    /// The last PSS pass that found the service under its budgets.
    pss: Option<PssSnapshot>,
    /// Audit mode: the limits guardian would write were recorded.
    limits_noted: bool,
    thread_report_ns: u64,
    /// The service's cgroup could not be used: guardian enforces its budgets itself, as in
    /// `inherit` mode, until its last process ends (then the next root tries again).
    fallback: bool,
    /// When the next warning of a recurring fault may be logged.
    warn_ns: u64,
    /// The service's memory at the last check (bytes), for status and metrics.
    memory: Option<u64>,
}

impl ServiceState {
    /// Whether a warning may be logged now (at most one each [`WARN_EVERY_NS`]).
    fn warn_due(&mut self, now: u64) -> bool {
        if now < self.warn_ns {
            return false;
        }
        self.warn_ns = now + WARN_EVERY_NS;
        true
    }
}

pub struct BudgetEngine {
    mode: Mode,
    cgroupfs: Option<Cgroupfs>,
    parent: String,
    services: Vec<ServiceState>,
    /// Cgroups of services a reload removed (or moved out of `own`): removed once empty.
    retiring: Vec<ServiceCgroup>,
}

impl BudgetEngine {
    pub fn new(policy: &Policy, mode: Mode) -> anyhow::Result<Self> {
        let own = policy
            .services
            .iter()
            .find(|s| s.cgroup == CgroupMode::Own && s.budgets.any());
        let cgroupfs = match own {
            Some(s) => Some(
                Layout::detect()
                    .and_then(Cgroupfs::open)
                    .with_context(|| format!("service `{}` wants cgroup = \"own\"", s.name))?,
            ),
            None => None,
        };
        // Nothing else holds a cpu_max: better not to start than to run without it.
        let layout = cgroupfs.as_ref().map(Cgroupfs::layout);
        let cpu_max = policy
            .services
            .iter()
            .find_map(|s| s.budgets.cpu_max.map(|quota| (s, quota)));
        if let Some((s, quota)) = cpu_max.filter(|_| !layout.is_some_and(Layout::has_cpu)) {
            return Err(anyhow::Error::new(CgroupError::NoCpu).context(format!(
                "service `{}` wants cpu_max = \"{}\"",
                s.name,
                cpu_percent(quota)
            )));
        }
        Ok(Self {
            mode,
            cgroupfs,
            parent: policy.cgroup_parent.clone(),
            services: policy
                .services
                .iter()
                .map(|_| ServiceState::default())
                .collect(),
            retiring: Vec::new(),
        })
    }

    /// Whether a service has a cgroup of guardian's now (or one waits to be removed).
    pub fn has_cgroups(&self) -> bool {
        !self.retiring.is_empty() || self.services.iter().any(|st| st.cgroup.is_some())
    }

    /// The service's memory as last measured (services with a memory budget).
    pub fn memory_used(&self, svc: usize) -> Option<u64> {
        self.services.get(svc).and_then(|st| st.memory)
    }

    /// A reloaded policy: `map[old]` is each old service's index in `new` (`None`: removed).
    /// A kept service whose budgets, cgroup mode and the mode in force are unchanged keeps its
    /// state and cgroup. Any other kept service starts afresh: the indices returned are those
    /// whose members must be placed again. Cgroups of removed services, and of services no
    /// longer in `own` mode, are removed once empty; their processes are left where they are.
    /// The only failure (a cgroup hierarchy the new policy needs cannot be opened) comes before
    /// anything changed.
    pub fn reload(
        &mut self,
        old: &Policy,
        new: &Policy,
        mode: Mode,
        map: &[Option<usize>],
    ) -> anyhow::Result<Vec<usize>> {
        if self.cgroupfs.is_none() {
            let engine = Self::new(new, mode)?;
            self.cgroupfs = engine.cgroupfs;
        }
        let mut states: Vec<ServiceState> = new
            .services
            .iter()
            .map(|_| ServiceState::default())
            .collect();
        let mut again = Vec::new();
        for (o, mut st) in std::mem::take(&mut self.services).into_iter().enumerate() {
            let (before, after) = (&old.services[o], map[o].map(|n| (n, &new.services[n])));
            match after {
                Some((n, s))
                    if mode == self.mode
                        && s.budgets == before.budgets
                        && s.cgroup == before.cgroup =>
                {
                    states[n] = st;
                }
                Some((n, s)) => {
                    again.push(n);
                    // Still `own` in enforce mode: the same directory is opened again (it is
                    // guardian's, marked) and given the new limits as members are placed;
                    // the limits the new budgets drop are lifted here.
                    let reused =
                        mode == Mode::Enforce && s.cgroup == CgroupMode::Own && s.budgets.any();
                    if let Some(cg) = st.cgroup.take() {
                        let dropped = if reused {
                            dropped(&before.budgets, &s.budgets)
                        } else {
                            before.budgets.clone()
                        };
                        lift(&cg, &dropped, &before.name);
                        if !reused {
                            self.retiring.push(cg);
                        }
                    }
                }
                None => {
                    // Forgotten, and no longer limited: its processes stay where they are.
                    if let Some(cg) = st.cgroup.take() {
                        lift(&cg, &before.budgets, &before.name);
                        self.retiring.push(cg);
                    }
                }
            }
        }
        self.services = states;
        self.mode = mode;
        self.parent.clone_from(&new.cgroup_parent);
        Ok(again)
    }

    /// Whether guardian itself may count tasks (and so needs thread events): in `inherit` and
    /// audit mode, and in `own` mode too, for a service whose cgroup cannot be used.
    pub fn counts_tasks(policy: &Policy) -> bool {
        policy
            .services
            .iter()
            .any(|s| s.budgets.tasks_max.is_some())
    }

    /// Whether guardian counts this service's tasks itself (it has `tasks_max`, and no cgroup
    /// of guardian's holds it).
    pub fn counts_tasks_of(&self, svc: usize, policy: &Policy) -> bool {
        self.counted_tasks_max(svc, &policy.services[svc]).is_some()
    }

    /// The service's `tasks_max` when guardian counts its tasks itself (no cgroup of guardian's
    /// holds it).
    fn counted_tasks_max(&self, svc: usize, s: &Service) -> Option<u64> {
        s.budgets
            .tasks_max
            .filter(|_| !self.kernel_enforced(svc, s))
    }

    /// Whether a service whose tasks guardian counts is near its `tasks_max` (see
    /// [`NEAR_TASKS_MIN`]).
    pub fn near_tasks_max(&self, state: &State, policy: &Policy) -> bool {
        policy.services.iter().enumerate().any(|(svc, s)| {
            self.counted_tasks_max(svc, s)
                .is_some_and(|max| self.tasks(state, svc) + (max / 4).max(NEAR_TASKS_MIN) >= max)
        })
    }

    /// Whether the kernel enforces this service's budgets on a cgroup of guardian's.
    fn kernel_enforced(&self, svc: usize, s: &Service) -> bool {
        kernel_charged(s, self.mode) && self.cgroupfs.is_some() && !self.services[svc].fallback
    }

    /// A process became a member: in `own` mode it is moved into the service's cgroup (created,
    /// with its limits, on first use). Called before the process's children are listed, so a
    /// child forked meanwhile is either listed afterwards or born inside.
    pub fn place(
        &mut self,
        enforcer: &mut Enforcer,
        clock: &Clock,
        policy: &Policy,
        svc: usize,
        p: &Process,
    ) -> Vec<Record> {
        let service = &policy.services[svc];
        let Some(fs) = &self.cgroupfs else {
            return Vec::new();
        };
        if service.cgroup != CgroupMode::Own || !service.budgets.any() {
            return Vec::new();
        }
        let mut records = Vec::new();
        let st = &mut self.services[svc];
        let note =
            |action: &'static str, reason: Reason, performed: bool, result: String, limit| Note {
                service: &service.name,
                pid: p.pid,
                comm: &p.comm,
                cmdline: p.cmdline(),
                parent: p.parent,
                action,
                reason,
                performed,
                result,
                usage: None,
                limit,
            };
        let plan = || Plan::new(fs.layout(), &self.parent, &service.name, &service.budgets);
        if self.mode == Mode::Audit {
            if !st.limits_noted {
                st.limits_noted = true;
                let results: Vec<(Reason, u64, String)> =
                    match plan().and_then(|plan| plan.limits(&service.budgets)) {
                        Ok(limits) => limits
                            .iter()
                            .map(|l| {
                                let r = format!("audit: would write {}", l.describe());
                                (l.budget.into(), l.value, r)
                            })
                            .collect(),
                        Err(e) => budget_values(&service.budgets)
                            .map(|(b, v)| (b.into(), v, format!("error: {}", chain(&e))))
                            .collect(),
                    };
                for (reason, value, result) in results {
                    records.push(
                        enforcer.note(clock, note("limit", reason, false, result, Some(value))),
                    );
                }
            }
            return records;
        }
        if st.cgroup.is_none() && !st.fallback {
            let set_up = plan().and_then(|plan| {
                let cg = plan.create(fs)?;
                match cg.apply_limits(&service.budgets) {
                    Ok(limits) => Ok((cg, limits)),
                    Err(e) => {
                        // Whatever guardian made for it goes again (it is still empty).
                        let mut cg = cg;
                        cg.remove();
                        Err(e)
                    }
                }
            });
            match set_up {
                Ok((cg, limits)) => {
                    for l in limits {
                        let how = match cg.origin(&l) {
                            Some(Origin::Marked) => {
                                "reused guardian's cgroup from an earlier run: "
                            }
                            Some(Origin::Operator) => {
                                "reused the operator's cgroup (never removed by guardian): "
                            }
                            Some(Origin::Created) | None => "",
                        };
                        let result = format!("{how}wrote {}", l.describe());
                        records.push(enforcer.note(
                            clock,
                            note("limit", l.budget.into(), true, result, Some(l.value)),
                        ));
                    }
                    if let Some(high) = service.budgets.memory_high {
                        let watch = cg
                            .memory_watch(high)
                            .map_err(|e| chain(&e))
                            .and_then(|fd| registered(fd).map_err(|e| e.to_string()));
                        match watch {
                            Ok(watch) => st.watch = Some(watch),
                            Err(e) => {
                                warn!(service = %service.name, "memory notifications unavailable, polling: {e}")
                            }
                        }
                    }
                    st.seen = cg.counters(Counters::default());
                    st.cgroup = Some(cg);
                }
                Err(e) => {
                    warn!(service = %service.name, "cannot use the service cgroup, guardian enforces its budgets itself: {}", chain(&e));
                    st.fallback = true;
                    for (budget, value) in budget_values(&service.budgets) {
                        let result = format!("error: {}; {}", chain(&e), without_cgroup(budget));
                        records.push(enforcer.note(
                            clock,
                            note("limit", budget.into(), false, result, Some(value)),
                        ));
                    }
                }
            }
        }
        let Some(cg) = &st.cgroup else {
            return records;
        };
        match cg.add(p.pid) {
            Ok(()) if p.root => records.push(enforcer.note(
                clock,
                note(
                    "move",
                    Reason::Budget,
                    true,
                    format!("moved into {}", cg.dirs()[0].display()),
                    None,
                ),
            )),
            Ok(()) => {}
            // It may have just exited: nothing to say.
            Err(_) if !matches!(Pinned::open(p.pid, Some(p.start_ns)), Pin::Ok(_)) => {}
            // A live member the kernel's limits miss: guardian counts the service itself.
            Err(e) if !st.fallback => {
                st.fallback = true;
                records.push(enforcer.note(
                    clock,
                    note(
                        "move",
                        Reason::Budget,
                        false,
                        format!(
                            "error: {}; guardian enforces the budgets itself{}",
                            chain(&e),
                            if service.budgets.cpu_max.is_some() {
                                " (cpu_max excepted: it cannot throttle CPU by counting)"
                            } else {
                                ""
                            }
                        ),
                        None,
                    ),
                ));
            }
            Err(e) => {
                if st.warn_due(procs::boottime_ns()) {
                    warn!(pid = p.pid, service = %service.name, "cannot move into the service cgroup: {}", chain(&e));
                }
            }
        }
        records
    }

    /// Tasks of a service as guardian counts them (processes and their threads), without those
    /// it already decided to kill.
    fn tasks(&self, state: &State, svc: usize) -> u64 {
        let skipped: u64 = self.services[svc]
            .skip
            .iter()
            .filter_map(|&(pid, start)| state.table.alive(pid).filter(|p| p.start_ns == start))
            .map(|p| u64::from(p.threads))
            .sum();
        state.table.service_count(svc).tasks.saturating_sub(skipped)
    }

    /// A member gained a task. Where guardian counts tasks, a fork over `tasks_max` loses its
    /// new process at once; a thread over it is reported, at most once a second (a thread cannot
    /// be killed without its whole process).
    pub fn new_task(
        &mut self,
        state: &State,
        enforcer: &mut Enforcer,
        policy: &Policy,
        svc: usize,
        task: NewTask,
    ) -> Vec<Record> {
        let NewTask { pid, thread, ts_ns } = task;
        let service = &policy.services[svc];
        let Some(max) = self.counted_tasks_max(svc, service) else {
            return Vec::new();
        };
        let count = self.tasks(state, svc);
        let st = &mut self.services[svc];
        let Some(p) = state.table.alive(pid) else {
            return Vec::new();
        };
        if count <= max {
            return Vec::new();
        }
        if !thread {
            st.skip.insert((p.pid, p.start_ns));
            let request = Request {
                service: &service.name,
                target: p,
                action: OrphanAction::Kill,
                reason: Reason::TasksMax,
                kill_timeout: service.kill_timeout,
                old_parent: p.parent,
                since_ns: Some(ts_ns),
                usage: Some(count),
                limit: Some(max),
                trigger: None,
            };
            return enforcer.act(&state.clock, request).into_iter().collect();
        }
        if ts_ns < st.thread_report_ns {
            return Vec::new();
        }
        st.thread_report_ns = ts_ns + THREAD_REPORT_NS;
        vec![enforcer.note(
            &state.clock,
            Note {
                service: &service.name,
                pid,
                comm: &p.comm,
                cmdline: p.cmdline(),
                parent: p.parent,
                action: "report",
                reason: Reason::TasksMax,
                performed: false,
                result:
                    "a new thread took the service over tasks_max (threads are not killed alone)"
                        .into(),
                usage: Some(count),
                limit: Some(max),
            },
        )]
    }

    /// Kernel counters, memory checks and cgroup clean-up, once per monitor tick.
    pub fn tick(&mut self, state: &State, enforcer: &mut Enforcer, policy: &Policy) -> Vec<Record> {
        let mut records = Vec::new();
        let now = procs::boottime_ns();
        self.retiring.retain_mut(|cg| !cg.remove());
        for (svc, service) in policy.services.iter().enumerate() {
            if !service.budgets.any() {
                continue;
            }
            let members = state.table.service_count(svc).processes > 0;
            // Forget decided-on processes that are gone (pids come back).
            self.services[svc].skip.retain(|&(pid, start)| {
                state.table.alive(pid).is_some_and(|p| p.start_ns == start)
            });
            self.kernel_events(state, enforcer, service, svc, &mut records);
            if !members {
                self.release(svc, &service.name);
                continue;
            }
            self.memory(state, enforcer, service, svc, now, &mut records);
        }
        records
    }

    /// Whether guardian checks this service's memory: it has `memory_high`, or a `memory_max`
    /// no cgroup of guardian's holds.
    fn checks_memory(&self, svc: usize, s: &Service) -> bool {
        s.budgets.memory_high.is_some()
            || (s.budgets.memory_max.is_some() && !self.kernel_enforced(svc, s))
    }

    /// When [`BudgetEngine::tick`] has memory to check next (boot ns): `soon` while a victim's
    /// end or a notification's aftermath is awaited, else the service's next poll.
    pub fn next_due(&self, state: &State, policy: &Policy, now: u64, soon: u64) -> Option<u64> {
        self.services
            .iter()
            .zip(&policy.services)
            .enumerate()
            .filter(|&(svc, (_, s))| {
                self.checks_memory(svc, s) && state.table.service_count(svc).processes > 0
            })
            .map(|(_, (st, _))| {
                if st.victim.is_some() || now < st.follow_until_ns {
                    soon
                } else {
                    st.next_poll_ns
                }
            })
            .min()
    }

    /// Waits on every service's memory notification; returns the first service whose
    /// notification is ready (that readiness is consumed: [`BudgetEngine::notified`] reads it).
    pub fn poll_notifications(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        for (svc, st) in self.services.iter_mut().enumerate() {
            let Some(watch) = &st.watch else {
                continue;
            };
            let failed = match watch.poll_read_ready(cx) {
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    return Poll::Ready(svc);
                }
                Poll::Ready(Err(e)) => e,
                Poll::Pending => continue,
            };
            warn!(
                service = svc,
                "memory notifications failed, polling: {failed}"
            );
            st.watch = None;
        }
        Poll::Pending
    }

    /// `svc`'s memory notification is ready: its memory is checked now, and on every tick for
    /// a moment after (see [`NOTIFIED_FOLLOW_NS`]).
    pub fn notified(
        &mut self,
        state: &State,
        enforcer: &mut Enforcer,
        policy: &Policy,
        svc: usize,
    ) -> Vec<Record> {
        let mut records = Vec::new();
        let (Some(st), Some(service)) = (self.services.get_mut(svc), policy.services.get(svc))
        else {
            return records;
        };
        // Read to the end: the descriptor is edge-triggered.
        if !st.watch.as_ref().is_some_and(|w| fired(w.get_ref())) {
            return records;
        }
        let now = procs::boottime_ns();
        st.follow_until_ns = now + NOTIFIED_FOLLOW_NS;
        if state.table.service_count(svc).processes > 0 {
            self.memory(state, enforcer, service, svc, now, &mut records);
        }
        records
    }

    /// Reports forks the kernel refused and processes its OOM killer took.
    fn kernel_events(
        &mut self,
        state: &State,
        enforcer: &mut Enforcer,
        service: &Service,
        svc: usize,
        records: &mut Vec<Record>,
    ) {
        let st = &mut self.services[svc];
        let Some(cg) = &st.cgroup else {
            return;
        };
        let now = cg.counters(st.seen);
        let before = std::mem::replace(&mut st.seen, now);
        if now == before {
            return;
        }
        let root = state
            .table
            .iter_alive()
            .find(|p| p.service == Some(svc) && p.root)
            .or_else(|| state.table.iter_alive().find(|p| p.service == Some(svc)));
        let (pid, comm, cmdline, parent) = root.map_or((0, String::new(), String::new(), 0), |p| {
            (p.pid, p.comm.to_string(), p.cmdline(), p.parent)
        });
        let mut report =
            |reason: Reason, result: String, usage: Option<u64>, limit: Option<u64>| {
                records.push(enforcer.note(
                    &state.clock,
                    Note {
                        service: &service.name,
                        pid,
                        comm: &comm,
                        cmdline: cmdline.clone(),
                        parent,
                        action: "report",
                        reason,
                        performed: false,
                        result,
                        usage,
                        limit,
                    },
                ));
            };
        if now.pids_max > before.pids_max {
            report(
                Reason::TasksMax,
                format!(
                    "the kernel refused {} fork(s) at pids.max",
                    now.pids_max - before.pids_max
                ),
                cg.tasks(),
                service.budgets.tasks_max,
            );
        }
        if now.oom_kills > before.oom_kills {
            report(
                Reason::MemoryMax,
                format!(
                    "the kernel's OOM killer killed {} process(es) in the service",
                    now.oom_kills - before.oom_kills
                ),
                cg.memory_usage(),
                service.budgets.memory_max,
            );
        }
    }

    /// Above `memory_high` (or, where guardian enforces it, `memory_max`): one victim, then a
    /// re-check once it is gone.
    fn memory(
        &mut self,
        state: &State,
        enforcer: &mut Enforcer,
        service: &Service,
        svc: usize,
        now: u64,
        records: &mut Vec<Record>,
    ) {
        if !self.checks_memory(svc, service) {
            return;
        }
        let kernel = self.kernel_enforced(svc, service);
        let high = service.budgets.memory_high;
        let own_max = if kernel {
            None
        } else {
            service.budgets.memory_max
        };
        let st = &mut self.services[svc];
        if let Some((pid, start, since)) = st.victim {
            // Its exit can be reported before its memory is released (recent kernels fire the
            // exit tracepoint before `exit_mm()`): it is gone once `/proc` shows it dead.
            let releasing =
                || matches!(Pinned::open(pid, Some(start)), Pin::Ok(p) if !p.stat.zombie);
            let alive = state.table.alive(pid).is_some_and(|p| p.start_ns == start);
            if (alive || releasing()) && now < since + VICTIM_WAIT_NS {
                return;
            }
            st.victim = None;
        } else if now >= st.follow_until_ns && now < st.next_poll_ns {
            return;
        }
        st.next_poll_ns = now
            + if st.watch.is_some() {
                WATCHED_POLL_NS
            } else {
                MEMORY_POLL_NS
            };
        let over = |usage: u64| match (own_max, high) {
            (Some(max), _) if usage > max => Some((max, Reason::MemoryMax)),
            (_, Some(h)) if usage > h => Some((h, Reason::MemoryHigh)),
            _ => None,
        };
        // The cheap figure first: what the kernel charges the cgroup, or the members' resident
        // sets summed (an upper bound of their proportional sets).
        let charged = match (&st.cgroup, kernel) {
            (Some(cg), true) => {
                let usage = cg.memory_usage();
                if usage.is_none() && st.warn_due(now) {
                    warn!(service = %service.name, "cannot read the cgroup's memory usage: counting the members' memory instead");
                }
                usage
            }
            _ => None,
        };
        // Under the budget by the cgroup's charge: no member needs opening (thousands of them
        // would cost milliseconds on every check).
        if charged.is_some_and(|usage| over(usage).is_none()) {
            st.memory = charged;
            st.pss = None;
            return;
        }
        let members = pinned_members(&state.table, svc, &st.skip);
        let cheap = charged.unwrap_or_else(|| members.iter().map(|m| m.rss).sum());
        st.memory = Some(cheap);
        if over(cheap).is_none() {
            st.pss = None;
            return;
        }
        // Resident sets stay over a budget that proportional sets are well under for as long as
        // workers share a large heap: between full passes, a bound from the last one will do.
        if let Some(snap) = st.pss.as_ref().filter(|_| charged.is_none()) {
            if now < snap.due_ns
                && over(snap.bound(members.iter().map(Member::keyed_rss))).is_none()
            {
                return;
            }
        }
        let pass_ns = procs::boottime_ns();
        // Where the kernel's charge is the usage, victims are sized by resident memory: reading
        // every member's PSS would cost milliseconds (a page-table walk each) between the
        // crossing and the kill. Otherwise the resident sets are kept for the next bound.
        let (sized, rss) = match charged {
            Some(_) => (victim_sizes(members, false), None),
            None => {
                let rss: HashMap<(u32, u64), u64> = members.iter().map(Member::keyed_rss).collect();
                (victim_sizes(members, true), Some(rss))
            }
        };
        let mut usage = charged.unwrap_or_else(|| sized.iter().map(|(_, pss)| pss).sum());
        st.memory = Some(usage);
        st.pss = match rss {
            Some(rss) if over(usage).is_none() => {
                let cost = procs::boottime_ns().saturating_sub(pass_ns);
                Some(PssSnapshot {
                    due_ns: now + PSS_REFRESH_NS.max(PSS_COST_FACTOR * cost),
                    total: usage,
                    rss,
                })
            }
            _ => None,
        };
        // At most one real kill per check; in audit mode every would-be victim, each once.
        for (victim, size) in victim_order(sized, service.memory_victim) {
            let Some((limit, reason)) = over(usage) else {
                return;
            };
            let record = enforcer.act(
                &state.clock,
                Request {
                    service: &service.name,
                    target: victim,
                    action: OrphanAction::Kill,
                    reason,
                    kill_timeout: service.kill_timeout,
                    old_parent: victim.parent,
                    since_ns: Some(now),
                    usage: Some(usage),
                    limit: Some(limit),
                    trigger: None,
                },
            );
            // No record yet: the victim could not be opened for want of resources, and the
            // kill is being retried; wait for it as for a kill sent.
            let performed = record.as_ref().is_none_or(|r| {
                matches!(
                    r,
                    Record::Decision {
                        performed: true,
                        ..
                    }
                )
            });
            records.extend(record);
            if performed {
                st.victim = Some((victim.pid, victim.start_ns, now));
                return;
            }
            // Not signalled (audit mode, or refused): decide on as if it had gone. (Pages it
            // shares stay mapped by the others, so what is left is, if anything, above this.)
            st.skip.insert((victim.pid, victim.start_ns));
            usage = usage.saturating_sub(size);
        }
        if over(usage).is_some() {
            debug!(service = %service.name, "over budget with no member left to choose");
        }
    }

    /// The service has no process left: its cgroup is removed (kept if not empty).
    fn release(&mut self, svc: usize, name: &str) {
        let st = &mut self.services[svc];
        st.skip.clear();
        st.victim = None;
        st.fallback = false;
        st.pss = None;
        st.memory = None;
        if let Some(mut cg) = st.cgroup.take() {
            st.watch = None;
            if !cg.remove() {
                debug!(service = %name, "service cgroup kept: not empty");
                st.cgroup = Some(cg);
            }
        }
    }

    /// At start-up, after the services' processes were found: removes the empty cgroups an
    /// earlier guardian left (it was killed, or its services ended while it was down) for
    /// services with no process now. Only directories marked as guardian's go; an operator's
    /// stay.
    pub fn sweep(&mut self, state: &State, policy: &Policy) {
        let Some(fs) = &self.cgroupfs else {
            return;
        };
        if self.mode != Mode::Enforce {
            return;
        }
        for (svc, service) in policy.services.iter().enumerate() {
            if service.cgroup != CgroupMode::Own
                || !service.budgets.any()
                || self.services[svc].cgroup.is_some()
                || state.table.service_count(svc).processes > 0
            {
                continue;
            }
            let Ok(plan) = Plan::new(fs.layout(), &self.parent, &service.name, &service.budgets)
            else {
                continue;
            };
            // Opening is creating where a directory is missing: only a complete leftover is
            // opened, to be removed.
            if !plan.dirs().iter().all(|d| d.is_dir()) {
                continue;
            }
            match plan.create(fs) {
                Ok(mut cg) if cg.is_empty() => {
                    if cg.remove() {
                        info!(service = %service.name, "removed the empty cgroup an earlier guardian left");
                    }
                }
                Ok(_) => {
                    debug!(service = %service.name, "a cgroup of the service holds processes of no root")
                }
                Err(e) => debug!(service = %service.name, "leftover cgroup not opened: {e}"),
            }
        }
    }

    /// Removes the cgroups guardian created that are empty; those with processes stay, with
    /// their limits.
    pub fn shutdown(&mut self, policy: &Policy) {
        for mut cg in self.retiring.drain(..) {
            cg.remove();
        }
        for (svc, service) in policy.services.iter().enumerate() {
            if let Some(mut cg) = self.services[svc].cgroup.take() {
                if !cg.remove() {
                    tracing::info!(
                        service = %service.name,
                        dir = %cg.dirs()[0].display(),
                        "service cgroup left in place with its limits: processes remain"
                    );
                }
            }
        }
    }
}

/// Whether the policy puts this service's budgets on a cgroup of guardian's, in `mode`: then
/// the kernel enforces `memory_max`, its charge is the usage, and victims are sized by resident
/// memory (unless the cgroup cannot be used, when guardian counts as in `inherit` mode).
pub(crate) fn kernel_charged(s: &Service, mode: Mode) -> bool {
    s.cgroup == CgroupMode::Own && mode == Mode::Enforce
}

/// The budgets `old` sets and `new` does not.
fn dropped(old: &Budgets, new: &Budgets) -> Budgets {
    Budgets {
        tasks_max: old.tasks_max.filter(|_| new.tasks_max.is_none()),
        memory_max: old.memory_max.filter(|_| new.memory_max.is_none()),
        memory_high: old.memory_high.filter(|_| new.memory_high.is_none()),
        cpu_max: old.cpu_max.filter(|_| new.cpu_max.is_none()),
    }
}

/// Lifts a cgroup's limits `b` sets, saying so (or why not).
fn lift(cg: &ServiceCgroup, b: &Budgets, service: &str) {
    if !b.any() {
        return;
    }
    match cg.lift_limits(b) {
        Ok(()) => {
            info!(service, dir = %cg.dirs()[0].display(), "limits the policy no longer sets were lifted")
        }
        Err(e) => warn!(
            service,
            "cannot lift limits the policy no longer sets: {}",
            chain(&e)
        ),
    }
}

/// A notification descriptor registered with the runtime, so that the event loop wakes for it.
fn registered(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // Outside a runtime (unit tests) there is nothing to register with: the poll stands in.
    tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    // SAFETY: the AsyncFd owns the descriptor, which stays open for as long as it is wrapped.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// An error with its causes, for a decision's `result`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// What becomes of a budget while the service's cgroup cannot be used.
fn without_cgroup(budget: Budget) -> &'static str {
    match budget {
        Budget::CpuMax => "cpu_max is not enforced (guardian cannot throttle CPU by counting)",
        Budget::TasksMax | Budget::MemoryMax | Budget::MemoryHigh => {
            "guardian enforces the budget itself"
        }
    }
}

/// What a PSS pass found, for the passes it spares.
struct PssSnapshot {
    /// When the next full pass is due whatever the bound says.
    due_ns: u64,
    /// The members' proportional sets summed.
    total: u64,
    /// Each member's resident set then, by (pid, start).
    rss: HashMap<(u32, u64), u64>,
}

impl PssSnapshot {
    /// An upper bound of the members' proportional sets summed now: the last total, plus what
    /// each member's resident set grew by since, plus the whole resident set of each newcomer.
    /// A member that left only lowers the total. What it misses are pages that stopped being
    /// shared without any resident set growing (copy-on-write of a shared page): those wait for
    /// the next full pass, at most `due_ns` away.
    fn bound(&self, rss_now: impl Iterator<Item = ((u32, u64), u64)>) -> u64 {
        let grown: u64 = rss_now
            .map(|(id, now)| match self.rss.get(&id) {
                Some(&then) => now.saturating_sub(then),
                None => now,
            })
            .sum();
        self.total + grown
    }
}

/// A member with its resident memory, read through its pinned `/proc` directory. The directory
/// is not kept: a service may have thousands of members, and descriptors are for signals.
pub(crate) struct Member<'a> {
    p: &'a Process,
    rss: u64,
}

impl Member<'_> {
    /// ((pid, start), resident bytes)
    fn keyed_rss(&self) -> ((u32, u64), u64) {
        ((self.p.pid, self.p.start_ns), self.rss)
    }
}

/// The members guardian may still choose, each checked to be the process the table knows: one
/// that has gone, or whose pid another process holds now, is left out.
pub(crate) fn pinned_members<'a>(
    table: &'a Table,
    svc: usize,
    skip: &HashSet<(u32, u64)>,
) -> Vec<Member<'a>> {
    table
        .iter_alive()
        .filter(|p| p.service == Some(svc) && !skip.contains(&(p.pid, p.start_ns)))
        .filter_map(|p| match Pinned::open(p.pid, Some(p.start_ns)) {
            Pin::Ok(proc) => Some(Member {
                p,
                rss: proc.rss_bytes()?,
            }),
            // Out of descriptors: left out of this check, counted again at the next.
            Pin::Gone | Pin::Reused | Pin::Failed(_) => None,
        })
        .collect()
}

/// Members with the size their victim order goes by: their proportional set size (`pss`), or
/// their resident memory where the kernel's charge is the service's usage (no page-table walk
/// between the crossing and the kill).
pub(crate) fn victim_sizes(members: Vec<Member<'_>>, pss: bool) -> Vec<(&Process, u64)> {
    if pss {
        proportional(members)
    } else {
        members.into_iter().map(|m| (m.p, m.rss)).collect()
    }
}

/// Members with their proportional set size, read through their pinned directories (opened
/// again). Where `smaps_rollup` cannot be read while the process lives (a kernel before 4.14),
/// its resident size stands in (said once); a member that ended meanwhile is left out.
fn proportional(members: Vec<Member<'_>>) -> Vec<(&Process, u64)> {
    members
        .into_iter()
        .filter_map(|m| {
            if m.rss == 0 {
                return Some((m.p, 0)); // a zombie, or nothing resident
            }
            let Pin::Ok(proc) = Pinned::open(m.p.pid, Some(m.p.start_ns)) else {
                return None;
            };
            match proc.pss_bytes() {
                Some(pss) => Some((m.p, pss)),
                None => {
                    proc.rss_bytes()?;
                    if !NO_PSS.swap(true, Ordering::Relaxed) {
                        warn!(pid = m.p.pid, "cannot read smaps_rollup: counting resident memory, which counts shared pages once per process");
                    }
                    Some((m.p, m.rss))
                }
            }
        })
        .collect()
}

/// Members with their sizes in the order `memory_victim` kills them; a root comes only after
/// every other member.
pub(crate) fn victim_order(mut sized: Vec<(&Process, u64)>, how: Victim) -> Vec<(&Process, u64)> {
    match how {
        Victim::OrphansThenLargest => {
            sized.sort_by_key(|(p, r)| (p.root, Reverse(p.orphan), Reverse(*r)))
        }
        Victim::Largest => sized.sort_by_key(|(p, r)| (p.root, Reverse(*r))),
        Victim::Newest => sized.sort_by_key(|(p, _)| (p.root, Reverse(p.start_ns))),
    }
    sized
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use super::*;
    use crate::policy::protect::Protections;

    /// An engine for one `own` service with tasks_max and memory_max, on a scratch v1 tree
    /// (`m` and `p` stand in for the memory and pids hierarchies).
    fn engine(root: &Path) -> (BudgetEngine, Policy) {
        engine_for(root, Mode::Enforce, "tasks_max = 8\nmemory_max = \"200M\"")
    }

    /// An engine in `mode` for one `own` service with the budget keys `budgets`, on a scratch
    /// v1 tree (`m`, `p` and `c` stand in for the memory, pids and cpu hierarchies).
    fn engine_for(root: &Path, mode: Mode, budgets: &str) -> (BudgetEngine, Policy) {
        let policy = Policy::parse(
            Path::new("p.toml"),
            &format!("cgroup_parent = \"/guardian\"\n[[service]]\nname = \"svc\"\nmatch = {{ comm = \"x\" }}\n{budgets}\ncgroup = \"own\"\n"),
        )
        .unwrap();
        for d in ["m", "p", "c"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let mi = format!(
            "33 25 0:30 / {} rw - cgroup cgroup rw,memory\n35 25 0:32 / {} rw - cgroup cgroup rw,pids\n32 25 0:29 / {} rw - cgroup cgroup rw,cpu,cpuacct\n",
            root.join("m").display(),
            root.join("p").display(),
            root.join("c").display()
        );
        let layout =
            Layout::from_proc(&mi, "8:pids:/\n4:memory:/\n2:cpu,cpuacct:/\n", |_| None).unwrap();
        let engine = BudgetEngine {
            mode,
            cgroupfs: Some(Cgroupfs::open_scratch(layout).unwrap()),
            parent: policy.cgroup_parent.clone(),
            services: vec![ServiceState::default()],
            retiring: Vec::new(),
        };
        (engine, policy)
    }

    fn member(pid: u32, root: bool) -> Process {
        Process {
            root,
            ..Process::for_test(pid, "x")
        }
    }

    fn entries(d: &Path) -> usize {
        fs::read_dir(d).map_or(0, |r| r.count())
    }

    /// A cgroup that cannot be set up (a limit file the kernel would have made is missing; a
    /// symlink planted on the way) is one `error:` decision per budget, nothing made is left, the
    /// service falls back to guardian's own enforcement, and further members add nothing.
    #[test]
    fn a_cgroup_that_cannot_be_set_up_is_reported_once_and_counted_instead() {
        for case in ["missing limit file", "planted symlink"] {
            let root = std::env::temp_dir().join(format!(
                "guardian-budget-{}-{}",
                std::process::id(),
                case.replace(' ', "-")
            ));
            let _ = fs::remove_dir_all(&root);
            for d in ["m", "p", "outside"] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            let want = if case == "planted symlink" {
                std::os::unix::fs::symlink(root.join("outside"), root.join("p/guardian")).unwrap();
                "error: refused"
            } else {
                "error: cannot write `8` to"
            };
            let (mut engine, policy) = engine(&root);
            let mut enforcer = Enforcer::new(
                Mode::Enforce,
                Protections::new(&crate::policy::protect::Protect::default()),
            );
            let clock = Clock::new();
            let records = engine.place(&mut enforcer, &clock, &policy, 0, &member(999_999, true));
            let values: Vec<serde_json::Value> = records
                .iter()
                .map(|r| serde_json::to_value(r).unwrap())
                .collect();
            assert_eq!(values.len(), 2, "{case}: one per budget: {values:?}");
            for v in &values {
                assert_eq!(v["action"], "limit", "{case}: {v}");
                assert_eq!(v["performed"], false, "{case}: {v}");
                let result = v["result"].as_str().unwrap();
                assert!(result.starts_with(want), "{case}: {v}");
                assert!(
                    result.ends_with("guardian enforces the budget itself"),
                    "{case}: {v}"
                );
            }
            assert!(
                !engine.kernel_enforced(0, &policy.services[0]),
                "{case}: guardian counts the service itself"
            );
            assert!(BudgetEngine::counts_tasks(&policy));
            let more = engine.place(&mut enforcer, &clock, &policy, 0, &member(999_998, false));
            assert!(more.is_empty(), "{case}: reported once: {more:?}");
            assert_eq!(
                (entries(&root.join("m")), entries(&root.join("outside"))),
                (0, 0),
                "{case}: what was made is gone again, nothing went through the symlink"
            );
            // The service ended: its next root tries the cgroup again.
            engine.release(0, "svc");
            assert!(engine.kernel_enforced(0, &policy.services[0]));
            fs::remove_dir_all(&root).unwrap();
        }
    }

    /// The `limit` records of a cpu_max: what audit mode would write, what was written, and, when
    /// the cgroup cannot be used, that nothing else holds it.
    #[test]
    fn cpu_max_records_in_audit_enforce_and_failure() {
        let root = std::env::temp_dir().join(format!("guardian-budget-{}-cpu", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let keys = "tasks_max = 8\ncpu_max = \"50%\"";
        let place = |mode: Mode| {
            let (mut engine, policy) = engine_for(&root, mode, keys);
            let mut enforcer = Enforcer::new(
                mode,
                Protections::new(&crate::policy::protect::Protect::default()),
            );
            let records = engine.place(
                &mut enforcer,
                &Clock::new(),
                &policy,
                0,
                &member(999_999, true),
            );
            let cpu: Vec<serde_json::Value> = records
                .iter()
                .map(|r| serde_json::to_value(r).unwrap())
                .filter(|v| v["reason"] == "cpu_max")
                .collect();
            assert_eq!(
                cpu.len(),
                1,
                "{mode:?}: one record for the cpu_max: {records:?}"
            );
            assert_eq!(cpu[0]["action"], "limit");
            assert_eq!(cpu[0]["limit"], 50_000, "µs per 100 ms period");
            (cpu[0].clone(), engine)
        };
        let svc = |d: &str| root.join(d).join("guardian/svc");

        let (audit, _) = place(Mode::Audit);
        assert_eq!(audit["performed"], false);
        assert_eq!(
            audit["result"],
            format!(
                "audit: would write cpu.cfs_period_us=100000 to {}, then cpu.cfs_quota_us=50000 to {}",
                svc("c").join("cpu.cfs_period_us").display(),
                svc("c").join("cpu.cfs_quota_us").display()
            )
        );
        assert_eq!(entries(&root.join("c")), 0, "audit mode creates nothing");

        // The limit files the kernel would have made are missing: the cgroup cannot be used.
        let (failed, mut engine) = place(Mode::Enforce);
        assert_eq!(failed["performed"], false);
        let result = failed["result"].as_str().unwrap();
        assert!(result.starts_with("error: cannot write"), "{result}");
        assert!(
            result.ends_with("cpu_max is not enforced (guardian cannot throttle CPU by counting)"),
            "{result}"
        );
        assert_eq!(entries(&root.join("c")), 0, "what was made is gone again");
        engine.release(0, "svc");

        // As the kernel makes them (here: the operator's directories).
        for (d, files) in [
            ("m", &[][..]),
            ("p", &["pids.max"][..]),
            ("c", &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..]),
        ] {
            fs::create_dir_all(svc(d)).unwrap();
            for f in files.iter().chain(&["cgroup.procs"]) {
                fs::write(svc(d).join(f), "").unwrap();
            }
        }
        let (wrote, _) = place(Mode::Enforce);
        assert_eq!(wrote["performed"], true, "{wrote}");
        assert!(
            wrote["result"].as_str().unwrap().ends_with(&format!(
                "then cpu.cfs_quota_us=50000 to {}",
                svc("c").join("cpu.cfs_quota_us").display()
            )),
            "{wrote}"
        );
        assert_eq!(
            fs::read_to_string(svc("c").join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(
            fs::read_to_string(svc("c").join("cgroup.procs")).unwrap(),
            "999999",
            "moved into the cpu hierarchy with the others"
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pss_bound_adds_growth_and_newcomers_and_forgets_leavers() {
        const M: u64 = 1 << 20;
        let snap = PssSnapshot {
            due_ns: 0,
            total: 300 * M,
            rss: HashMap::from([((1, 10), 300 * M), ((2, 20), 300 * M), ((3, 30), 300 * M)]),
        };
        // 1 grew by 100 MiB, 2 shrank, 3 left, 4 is new with 50 MiB resident.
        let now = [((1, 10), 400 * M), ((2, 20), 250 * M), ((4, 40), 50 * M)];
        assert_eq!(snap.bound(now.into_iter()), 450 * M);
        // A pid reused by another process is a newcomer, not the old member grown.
        assert_eq!(snap.bound([((1, 11), 300 * M)].into_iter()), 600 * M);
        assert_eq!(snap.bound(std::iter::empty()), 300 * M);
    }

    #[test]
    fn recurring_warnings_are_rate_limited() {
        let mut st = ServiceState::default();
        assert!(st.warn_due(10));
        assert!(!st.warn_due(10 + WARN_EVERY_NS - 1));
        assert!(st.warn_due(10 + WARN_EVERY_NS));
    }
}
