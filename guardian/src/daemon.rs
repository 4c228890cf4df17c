//! `guardian --policy FILE`: finds each service's processes, follows them, and acts on their
//! orphans the moment their parent dies.
//!
//! A process that execs into a command matching a service's selectors is a **root** of that
//! service; every descendant of a root is a **member**, and stays one after it is reparented. An
//! **orphan** is a member whose parent (also a member) died while it lived. Roots are never
//! orphans: a service started by a shell that exits is left alone, even when the shell's own
//! command line matches too. Forked workers do not exec, so they stay members.

use std::collections::HashMap;

use anyhow::Context as _;
use tracing::{debug, info};

use crate::{
    budget::{BudgetEngine, NewTask},
    enforce::{Enforcer, Reason, Request},
    events::{Exec, ExitStatus},
    loader::LoadOptions,
    monitor::{Handler, Monitor, Notice, State},
    output::{Output, OutputFormat, Proc, Record},
    policy::{AtStart, Mode, OrphanAction, Policy},
    procs::{self, ProcInfo},
    protect::Protections,
    selector::Candidate,
};

/// Most processes one service adoption walks (a bound, not an expected size).
const MAX_ADOPT: usize = 100_000;
/// When a parent exits normally, an orphan it forked this recently that has not exec'd yet may be
/// a launcher's child on its way to exec a service of its own (`sh -c "app &"`): its decision
/// waits this long (ns). Orphans of a parent killed by a signal are acted on at once.
const FRESH_FORK_NS: u64 = 250_000_000;

/// An orphan whose decision waits for a possible exec.
struct Deferred {
    pid: u32,
    start_ns: u64,
    old_parent: u32,
    died_ns: u64,
}

pub struct Daemon {
    policy: Policy,
    enforcer: Enforcer,
    budgets: BudgetEngine,
    out: Output,
    self_pid: u32,
    deferred: Vec<Deferred>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(policy: Policy, dry_run: bool, format: OutputFormat) -> anyhow::Result<()> {
    // Audit mode is decided once, here: the CLI flag overrides the file.
    let mode = if dry_run { Mode::Audit } else { policy.mode };
    let budgets = BudgetEngine::new(&policy, mode)?;
    let mut monitor = Monitor::start(LoadOptions {
        track_all: false,
        track_threads: BudgetEngine::counts_tasks(&policy, mode),
    })?;
    let protections = Protections::new(&policy.protect);
    let mut daemon = Daemon {
        enforcer: Enforcer::new(mode, protections),
        budgets,
        policy,
        out: Output::new(format),
        self_pid: std::process::id(),
        deferred: Vec::new(),
    };
    daemon.startup(&mut monitor.state)?;
    let ready = Record::Ready {
        ts: monitor.state.clock.now(),
        pid: daemon.self_pid,
        version: env!("CARGO_PKG_VERSION"),
        group_dead: monitor.state.probes.group_dead.as_str(),
        processes: monitor.state.table.len_alive(),
    };
    daemon.out.emit(&ready)?;
    daemon.out.flush()?;
    info!(
        policy = %daemon.policy.path.display(),
        mode = mode.as_str(),
        services = daemon.policy.services.len(),
        members = monitor.state.table.len_alive(),
        "guardian running"
    );
    let result = monitor.run(&mut daemon).await;
    daemon.budgets.shutdown(&daemon.policy);
    daemon.out.flush()?;
    let c = daemon.enforcer.counts;
    info!(
        signalled = c.signalled,
        would_signal = c.would_signal,
        reported = c.reported,
        refused = c.refused,
        "guardian stopped"
    );
    result
}

impl Daemon {
    /// The first service (in file order) whose selectors the candidate matches.
    fn match_service(&self, c: &Candidate<'_>) -> Option<usize> {
        if c.pid <= 1 || c.pid == self.self_pid {
            return None;
        }
        self.policy
            .services
            .iter()
            .position(|s| s.selector.matches(c))
    }

    /// Reads `/proc`, finds every service's roots and the processes already orphaned, and starts
    /// following them.
    fn startup(&mut self, state: &mut State) -> anyhow::Result<()> {
        let scan: Vec<ProcInfo> = procs::scan()
            .into_iter()
            .filter(|p| !p.kernel_thread && !matches!(p.state, 'Z' | 'X'))
            .collect();
        let by_pid: HashMap<u32, &ProcInfo> = scan.iter().map(|p| (p.pid, p)).collect();
        let mut matched: HashMap<u32, usize> = HashMap::new();
        for p in &scan {
            if let Some(svc) = self.match_service(&Candidate::from(p)) {
                matched.insert(p.pid, svc);
            }
        }
        let mut roots = Vec::new();
        let mut orphans = Vec::new();
        for p in &scan {
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
            if self.orphaned_at_start(p, svc, &by_pid) {
                orphans.push((p.pid, svc));
            } else {
                roots.push((p.pid, svc));
            }
        }
        for (pid, svc) in roots {
            let members = self.adopt(state, pid, svc, true, &by_pid)?;
            self.emit_root(state, pid, svc, "startup", members)?;
        }
        for (pid, svc) in orphans {
            self.adopt(state, pid, svc, false, &by_pid)?;
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
                },
            );
            self.out.emit(&record)?;
        }
        Ok(())
    }

    /// A selector-matching process found at start whose parent is init, which is not its own
    /// process-group leader, and whose group leader is gone: the signature of a worker left
    /// behind by a dead parent (a service started by init leads its own group). With
    /// `orphan_match`, that must select it too.
    fn orphaned_at_start(
        &self,
        p: &ProcInfo,
        svc: usize,
        by_pid: &HashMap<u32, &ProcInfo>,
    ) -> bool {
        if p.ppid != 1 || p.pgid == p.pid || by_pid.contains_key(&p.pgid) {
            return false;
        }
        match &self.policy.services[svc].orphan_match {
            Some(m) => m.matches(&Candidate::from(p)),
            None => true,
        }
    }

    /// Makes `pid` and its descendants members of service `svc` (and `pid` a root if `root`).
    /// Each process is tracked in the kernel before its children are listed, so a fork that
    /// races with the walk is either listed or reported by the kernel. Returns the member count.
    fn adopt(
        &mut self,
        state: &mut State,
        pid: u32,
        svc: usize,
        root: bool,
        known: &HashMap<u32, &ProcInfo>,
    ) -> anyhow::Result<usize> {
        let mut stack = vec![pid];
        let mut n = 0;
        while let Some(p) = stack.pop() {
            if n >= MAX_ADOPT {
                break;
            }
            state.probes.track(p, false)?;
            if state.table.alive(p).is_none() {
                // What the start-up scan read already is not read again.
                match known.get(&p).map(|&i| i.clone()).or_else(|| procs::read(p)) {
                    Some(info) if !info.kernel_thread => {
                        state.table.insert(info);
                    }
                    _ => continue,
                }
            }
            state.table.set_service(p, Some(svc), root && p == pid);
            // In the service's cgroup before its children are listed (see `track` above).
            if let Some(member) = state.table.alive(p) {
                for record in
                    self.budgets
                        .place(&mut self.enforcer, &state.clock, &self.policy, svc, member)
                {
                    self.out.emit(&record)?;
                }
            }
            let kids = procs::children_of(p);
            if !kids.is_empty() {
                state.probes.track(p, true)?;
            }
            for k in kids {
                stack.push(k);
            }
            n += 1;
        }
        Ok(n)
    }

    fn emit_root(
        &mut self,
        state: &State,
        pid: u32,
        svc: usize,
        found: &'static str,
        members: usize,
    ) -> anyhow::Result<()> {
        let Some(p) = state.table.alive(pid) else {
            return Ok(());
        };
        let name = &self.policy.services[svc].name;
        info!(service = %name, pid, found, members, "service root");
        self.out.emit(&Record::Root {
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
        })?;
        self.out.flush()?;
        Ok(())
    }

    /// A member's parent died: act if it is an orphan of its service.
    fn orphaned(
        &mut self,
        state: &mut State,
        pid: u32,
        old_parent: u32,
        ts_ns: u64,
        may_defer: bool,
    ) -> anyhow::Result<()> {
        let Some(c) = state.table.alive(pid) else {
            return Ok(());
        };
        let Some(svc) = c.service else {
            return Ok(()); // not in any service: never touched
        };
        if c.root {
            return Ok(()); // a root's parent is outside the service
        }
        if state.table.get(old_parent).and_then(|p| p.service) != Some(svc) {
            return Ok(());
        }
        state.table.set_orphan(pid);
        let Some(c) = state.table.alive(pid) else {
            return Ok(());
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
            return Ok(());
        }
        let service = &self.policy.services[svc];
        if let Some(m) = &service.orphan_match {
            if !m.matches(&Candidate::from(c)) {
                debug!(pid, service = %service.name, "orphan not selected by orphan_match");
                return Ok(());
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
            },
        );
        self.out.emit(&record)?;
        self.out.flush()?;
        Ok(())
    }
}

impl Handler for Daemon {
    fn notice(&mut self, state: &mut State, notice: &Notice) -> anyhow::Result<()> {
        match *notice {
            Notice::Orphaned {
                pid,
                old_parent,
                ts_ns,
            } => self.orphaned(state, pid, old_parent, ts_ns, true)?,
            Notice::Exec { pid, .. } => {
                // A member that execs into a service's selectors becomes that service's root
                // (a service launched by a matching shell must outlive the shell).
                let Some(p) = state.table.alive(pid) else {
                    return Ok(());
                };
                if let Some(svc) = self.match_service(&Candidate::from(p)) {
                    if !(p.root && p.service == Some(svc)) {
                        let members = self.adopt(state, pid, svc, true, &HashMap::new())?;
                        self.emit_root(state, pid, svc, "exec", members)?;
                    }
                }
            }
            Notice::Lost {
                reason,
                count,
                total,
            } => {
                self.out.emit(&Record::Lost {
                    ts: state.clock.now(),
                    reason,
                    count,
                    total,
                })?;
            }
            Notice::Fork { pid, ts_ns } | Notice::Thread { pid, ts_ns, .. } => {
                if let Some(svc) = state.table.alive(pid).and_then(|p| p.service) {
                    let task = NewTask {
                        pid,
                        thread: matches!(notice, Notice::Thread { .. }),
                        ts_ns,
                    };
                    for record in
                        self.budgets
                            .new_task(state, &mut self.enforcer, &self.policy, svc, task)
                    {
                        self.out.emit(&record)?;
                    }
                }
            }
            Notice::Exit { .. } | Notice::Reparent { .. } => {}
        }
        Ok(())
    }

    fn exec_unknown(&mut self, state: &mut State, exec: &Exec) -> anyhow::Result<()> {
        if let Some(svc) = self.match_service(&Candidate::from(exec)) {
            let members = self
                .adopt(state, exec.pid, svc, true, &HashMap::new())
                .context("following a new service root")?;
            if members > 0 {
                self.emit_root(state, exec.pid, svc, "exec", members)?;
            }
        }
        Ok(())
    }

    fn tick(&mut self, state: &mut State) -> anyhow::Result<()> {
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
                    self.orphaned(state, d.pid, d.old_parent, d.died_ns, false)?;
                }
            }
        }
        for record in self.enforcer.tick(&state.clock) {
            self.out.emit(&record)?;
        }
        for record in self.budgets.tick(state, &mut self.enforcer, &self.policy) {
            self.out.emit(&record)?;
        }
        self.out.flush()?;
        Ok(())
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
    for svc in &policy.services {
        s.push_str(&format!("  service {}\n", svc.name));
        s.push_str(&format!("    match          {}\n", svc.selector.describe()));
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
    let mut names: Vec<&str> = crate::protect::BUILTIN_PROTECTED.to_vec();
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
    s
}
