//! `guardian explain PID`: why guardian treats a process as it does. Its role (root, member,
//! orphan or none) and service, its ancestors up to its service's root, the selector keys that
//! matched, what guardian would do if its parent died now, where it ranks as a budget victim,
//! the protections that apply, and for a process of no service, the key each service failed on.
//!
//! One function answers from a process table: the daemon's own, kept by kernel events, or one
//! built from `/proc` now by the daemon's start-up rule (`--policy`, no daemon), which cannot
//! know what happened before now and says so.

use std::{collections::HashSet, fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    act::budget,
    daemon,
    output::OutputFormat,
    policy::{
        protect::Protections,
        selector::{Candidate, KeyCheck},
        AtStart, Mode, OrphanAction, Policy, Service,
    },
    procs::{self, Pin, Pinned, ProcInfo},
    table::{Process, Table},
};

/// Most ancestors a chain follows (a bound, not an expected depth).
const MAX_CHAIN: usize = 4096;

/// Where an explanation's process table comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The running daemon's table.
    Daemon,
    /// A policy file and `/proc` as it is now (`guardian explain --policy FILE`).
    PolicyFile,
}

/// What [`explain`] answers from.
pub struct Context<'a> {
    pub policy: &'a Policy,
    /// Processes with their service, root and orphan marks.
    pub table: &'a Table,
    /// The protections in force (of the daemon, when one is known).
    pub protections: &'a Protections,
    /// The mode decisions are made in.
    pub mode: Mode,
    pub source: Source,
}

/// A process's place in its service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Root,
    Member,
    Orphan,
    /// In no service: never signalled.
    None,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Member => "member",
            Self::Orphan => "orphan",
            Self::None => "none",
        }
    }
}

/// Why guardian treats a process as it does.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub pid: u32,
    pub comm: String,
    pub cmdline: String,
    pub source: Source,
    /// `enforce` or `audit`.
    pub mode: &'static str,
    pub role: Role,
    pub service: Option<String>,
    /// The process, then its ancestors: up to and including its service's root, else (no
    /// service, or an orphan whose root is not among its ancestors any more) up to pid 1.
    pub chain: Vec<Link>,
    /// The process its service's `match` is checked on: its root, or itself when its root is
    /// not among its ancestors.
    pub matched_on: Option<u32>,
    /// Each key of its service's `match`, in the order guardian checks them.
    pub matched: Vec<KeyCheck>,
    pub if_parent_dies: Outcome,
    /// Its place in the order guardian kills members above a memory budget.
    pub budget: Option<VictimRank>,
    /// Every protection that applies: whatever the policy says, it is never signalled.
    pub protections: Vec<String>,
    /// For a process of no service: each service with the first key of its `match` that failed.
    pub services: Vec<Miss>,
    /// What this source cannot know.
    pub unknown: Vec<String>,
}

/// One process of a chain.
#[derive(Debug, Serialize)]
pub struct Link {
    pub pid: u32,
    pub comm: String,
    pub role: Role,
    pub service: Option<String>,
}

/// What guardian does with the process as an orphan.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// `kill`, `terminate`, `report` or `none`.
    pub action: &'static str,
    pub detail: String,
    /// Each key of the service's `orphan_match`, when it has one.
    pub orphan_match: Vec<KeyCheck>,
}

/// Where a member ranks among its service's members as a memory victim.
#[derive(Debug, Serialize)]
pub struct VictimRank {
    /// `memory_high`, or `memory_max` where guardian enforces it itself.
    pub budget: &'static str,
    /// 1: the first to be killed.
    pub victim_rank: usize,
    pub of: usize,
    pub size_bytes: u64,
    /// `pss` (proportional set size) or `rss` (resident set, where the kernel's cgroup charge
    /// is the usage).
    pub sized_by: &'static str,
    /// The service's `memory_victim`.
    pub order: &'static str,
}

/// Why a service passed a process by.
#[derive(Debug, Serialize)]
pub struct Miss {
    pub service: String,
    /// The first key of its `match` that failed; `None` when every key holds.
    pub first_failure: Option<KeyCheck>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no process {0}")]
    NoSuchProcess(u32),
    #[error("process {0} has exited (a zombie its parent has not reaped)")]
    Exited(u32),
    #[error("cannot read `/proc/{pid}`")]
    Read {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A process as an explanation sees it: the table's entry, or what `/proc` says of one the
/// table does not hold (the daemon's table holds only members).
struct Node {
    pid: u32,
    parent: u32,
    start_ns: u64,
    comm: String,
    argv: Vec<String>,
    service: Option<usize>,
    role: Role,
}

impl Node {
    fn lookup(table: &Table, pid: u32) -> Option<Self> {
        if let Some(p) = table.alive(pid) {
            return Some(Self::from(p));
        }
        // Kernel threads are processes here (protected ones).
        let info = procs::read(pid).filter(|i| daemon::live(i) || i.kernel_thread)?;
        Some(Self::from(info))
    }

    /// What guardian matches selectors on: the name and command line it knows, `/proc` for the
    /// rest.
    fn candidate(&self) -> Candidate<'_> {
        Candidate::new(
            self.pid,
            Some(self.start_ns),
            &self.comm,
            self.argv.join(" "),
        )
    }

    fn link(&self, policy: &Policy) -> Link {
        Link {
            pid: self.pid,
            comm: self.comm.clone(),
            role: self.role,
            service: self.service.map(|s| policy.services[s].name.clone()),
        }
    }
}

impl From<&Process> for Node {
    fn from(p: &Process) -> Self {
        let role = match (p.service, p.root, p.orphan) {
            (None, ..) => Role::None,
            (Some(_), true, _) => Role::Root,
            (Some(_), false, true) => Role::Orphan,
            (Some(_), false, false) => Role::Member,
        };
        Self {
            pid: p.pid,
            parent: p.parent,
            start_ns: p.start_ns,
            comm: p.comm.to_string(),
            argv: p.argv.to_vec(),
            service: p.service,
            role,
        }
    }
}

impl From<ProcInfo> for Node {
    fn from(i: ProcInfo) -> Self {
        Self {
            pid: i.pid,
            parent: i.ppid,
            start_ns: i.start_ns,
            comm: i.comm,
            argv: i.argv,
            service: None,
            role: Role::None,
        }
    }
}

/// Why guardian treats `pid` as it does, from `ctx`'s table. Reads `/proc` for the process's
/// protections, for what its selectors need, and, in a service with a memory budget, for every
/// member's memory.
pub fn explain(ctx: &Context<'_>, pid: u32) -> Result<Explanation, ExplainError> {
    let Some(subject) = Node::lookup(ctx.table, pid) else {
        return Err(match procs::stat(pid) {
            Some(st) if st.zombie => ExplainError::Exited(pid),
            _ => ExplainError::NoSuchProcess(pid),
        });
    };
    let pinned = match Pinned::open(pid, Some(subject.start_ns)) {
        Pin::Ok(p) => p,
        Pin::Gone | Pin::Reused => return Err(ExplainError::NoSuchProcess(pid)),
        Pin::Failed(source) => return Err(ExplainError::Read { pid, source }),
    };
    let protections = ctx.protections.applying(&pinned);
    let ancestors = ancestors(ctx.table, &subject);
    let service = subject.service.map(|s| &ctx.policy.services[s]);
    let matched_on = subject.service.map(|svc| {
        ancestors
            .last()
            .filter(|a| a.role == Role::Root && a.service == Some(svc))
            .unwrap_or(&subject)
    });
    let services = match service {
        Some(_) => Vec::new(),
        None => {
            let c = subject.candidate();
            ctx.policy
                .services
                .iter()
                .map(|s| Miss {
                    service: s.name.clone(),
                    first_failure: s.selector.first_failure(&c),
                })
                .collect()
        }
    };
    let budget = victim_rank(ctx, &subject);
    let mut unknown = unknown(ctx.source);
    if ctx.source == Source::Daemon {
        if ctx.table.alive(pid).is_none() {
            unknown.push(
                "guardian does not follow this process: its ancestors are read from /proc now"
                    .into(),
            );
        }
        if budget.is_some() {
            unknown.push(
                "members already chosen as memory victims (audit mode, refused) are ranked as if \
                 they could be chosen again"
                    .into(),
            );
        }
    }
    Ok(Explanation {
        pid,
        comm: subject.comm.clone(),
        cmdline: subject.argv.join(" "),
        source: ctx.source,
        mode: ctx.mode.as_str(),
        role: subject.role,
        service: service.map(|s| s.name.clone()),
        chain: std::iter::once(&subject)
            .chain(&ancestors)
            .map(|n| n.link(ctx.policy))
            .collect(),
        matched_on: matched_on.map(|n| n.pid),
        matched: match (service, matched_on) {
            (Some(s), Some(on)) => s.selector.checks(&on.candidate()),
            _ => Vec::new(),
        },
        if_parent_dies: if_parent_dies(ctx, &subject, &protections),
        budget,
        protections,
        services,
        unknown,
    })
}

/// The ancestors of `subject`, nearest first: up to and including the root of its service,
/// else up to pid 1. None for a root.
fn ancestors(table: &Table, subject: &Node) -> Vec<Node> {
    let mut out = Vec::new();
    if subject.role == Role::Root {
        return out;
    }
    let mut pid = subject.parent;
    while pid > 0 && out.len() < MAX_CHAIN {
        let Some(n) = Node::lookup(table, pid) else {
            break;
        };
        let last = n.pid == 1 || (n.role == Role::Root && n.service == subject.service);
        pid = n.parent;
        out.push(n);
        if last {
            break;
        }
    }
    out
}

/// What the service's orphan action does, in words.
fn action_text(s: &Service) -> String {
    match s.orphans {
        OrphanAction::Kill => "SIGKILL at once".into(),
        OrphanAction::Terminate => format!(
            "SIGTERM, then SIGKILL after {} if it still lives",
            humantime::format_duration(s.kill_timeout)
        ),
        OrphanAction::Report => "recorded only".into(),
    }
}

/// What guardian does with `subject` if its parent dies now (or, for an orphan, did with it
/// when its parent died), by the rule the daemon's orphan handling follows.
fn if_parent_dies(ctx: &Context<'_>, subject: &Node, protections: &[String]) -> Outcome {
    let none = |detail: String| Outcome {
        action: "none",
        detail,
        orphan_match: Vec::new(),
    };
    let Some(svc) = subject.service else {
        return none("in no service (never signalled)".into());
    };
    let service = &ctx.policy.services[svc];
    match subject.role {
        Role::Root => return none("roots are never orphans".into()),
        Role::Member if ctx.table.get(subject.parent).and_then(|p| p.service) != Some(svc) => {
            return none(format!(
                "its parent {} is not a member of `{}`: its death makes no orphan of the service",
                subject.parent, service.name
            ));
        }
        _ => {}
    }
    let orphan_match = service
        .orphan_match
        .as_ref()
        .map(|m| m.checks(&subject.candidate()))
        .unwrap_or_default();
    if let Some(miss) = orphan_match.iter().find(|k| !k.matched) {
        let detail = format!("not selected by orphan_match (key `{}` failed)", miss.key);
        return Outcome {
            action: "none",
            detail,
            orphan_match,
        };
    }
    let (action, mut detail) = match (subject.role, ctx.source) {
        (Role::Orphan, Source::PolicyFile) => match service.orphans_at_start {
            AtStart::Report => (
                OrphanAction::Report,
                "already an orphan (its parent died before now): a guardian starting now records \
                 it (orphans_at_start = report)"
                    .to_owned(),
            ),
            AtStart::Enforce => (
                service.orphans,
                format!(
                    "already an orphan (its parent died before now): a guardian starting now \
                     acts on it (orphans_at_start = enforce): {}",
                    action_text(service)
                ),
            ),
        },
        (Role::Orphan, Source::Daemon) => (
            service.orphans,
            format!(
                "already an orphan: its parent died while guardian watched, and the action \
                 applied then: {}",
                action_text(service)
            ),
        ),
        _ => (service.orphans, action_text(service)),
    };
    if action != OrphanAction::Report {
        if ctx.mode == Mode::Audit {
            detail.push_str(" (audit mode: recorded, nothing signalled)");
        } else if let Some(why) = protections.first() {
            let _ = write!(detail, " (refused: {why})");
        }
    }
    Outcome {
        action: action.as_str(),
        detail,
        orphan_match,
    }
}

/// Where `subject` ranks among its service's members as a memory victim, sized and ordered as
/// the budget engine sizes and orders them; `None` outside a service with a memory budget
/// guardian enforces itself, or when its memory cannot be read.
fn victim_rank(ctx: &Context<'_>, subject: &Node) -> Option<VictimRank> {
    let svc = subject.service?;
    let s = &ctx.policy.services[svc];
    let kernel = budget::kernel_charged(s, ctx.mode);
    let name = if s.budgets.memory_high.is_some() {
        "memory_high"
    } else if s.budgets.memory_max.is_some() && !kernel {
        "memory_max"
    } else {
        return None;
    };
    let members = budget::pinned_members(ctx.table, svc, &HashSet::new());
    let order = budget::victim_order(budget::victim_sizes(members, !kernel), s.memory_victim);
    let (i, &(_, size)) = order
        .iter()
        .enumerate()
        .find(|(_, (p, _))| p.pid == subject.pid)?;
    Some(VictimRank {
        budget: name,
        victim_rank: i + 1,
        of: order.len(),
        size_bytes: size,
        sized_by: if kernel { "rss" } else { "pss" },
        order: s.memory_victim.as_str(),
    })
}

/// What a source cannot know.
fn unknown(source: Source) -> Vec<String> {
    match source {
        Source::Daemon => Vec::new(),
        Source::PolicyFile => [
            "history before now: ancestors are /proc's as they are now, so a member whose \
             parent died earlier is judged by its current ancestors (an orphan is known only by \
             its start-up signature)",
            "execs: a process is judged by what it runs now, even one that exec'd after it was \
             forked",
            "the daemon: which process it is (it and its ancestors are never signalled), and \
             whether it runs with --dry-run",
            "decisions taken: signals sent, terminations waiting, memory victims chosen",
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// The table a guardian starting now would build for `policy`: `/proc` read, and services
/// marked by the daemon's start-up rule ([`daemon::find_roots`]): roots and their descendants
/// (a descendant that is a root of its own keeps its own members), then the processes already
/// orphaned at start with theirs.
pub fn startup_table(policy: &Policy) -> Table {
    let scan: Vec<ProcInfo> = procs::scan().into_iter().filter(daemon::live).collect();
    let by_pid = scan.iter().map(|p| (p.pid, p)).collect();
    let found = daemon::find_roots(policy, std::process::id(), &scan, &by_pid, |_| false);
    let mut table = Table::new(false);
    table.seed(scan.iter().cloned());
    for (pid, svc) in found.roots {
        if table.alive(pid).is_some_and(|e| e.service.is_some()) {
            continue; // adopted below an earlier root, as the daemon does
        }
        adopt(&mut table, pid, svc, true);
    }
    for (pid, svc) in found.at_start {
        adopt(&mut table, pid, svc, false);
        table.set_orphan(pid);
    }
    table
}

/// Makes `pid` and its descendants members of `svc` (and `pid` a root if `root`), leaving
/// descendants that are roots to their own service.
fn adopt(table: &mut Table, pid: u32, svc: usize, root: bool) {
    let mut stack = vec![pid];
    let (mut n, most) = (0, table.len_alive());
    while let Some(p) = stack.pop() {
        if n > most {
            break; // a cycle would be a bug; never loop forever on it
        }
        n += 1;
        if p != pid && table.alive(p).is_some_and(|e| e.root) {
            continue;
        }
        table.set_service(p, Some(svc), root && p == pid);
        stack.extend(table.alive(p).into_iter().flat_map(|e| e.children.iter()));
    }
}

/// `guardian explain --policy FILE PID`: the answer without a daemon, from `/proc` now.
pub fn offline(policy: &Policy, pid: u32) -> Result<Explanation, ExplainError> {
    let table = startup_table(policy);
    let protections = Protections::of(&policy.protect, None);
    let ctx = Context {
        policy,
        table: &table,
        protections: &protections,
        mode: policy.mode,
        source: Source::PolicyFile,
    };
    explain(&ctx, pid)
}

/// Asks the daemon listening on `socket`, and renders its answer as [`render`] does.
pub fn from_daemon(socket: &Path, pid: u32, format: OutputFormat) -> anyhow::Result<String> {
    let text = !format.json();
    let answer =
        crate::serve::control::ask(socket, &crate::serve::control::Query::Explain { pid, text })?;
    Ok(match answer {
        serde_json::Value::String(s) if text => s,
        v => {
            let mut s = serde_json::to_string_pretty(&v)?;
            s.push('\n');
            s
        }
    })
}

/// The explanation as JSON (one pretty-printed object) or as text.
pub fn render(e: &Explanation, format: OutputFormat) -> String {
    if format.json() {
        let mut s = serde_json::to_string_pretty(e).expect("an explanation serializes");
        s.push('\n');
        s
    } else {
        render_text(e)
    }
}

/// A few aligned lines for a terminal.
pub fn render_text(e: &Explanation) -> String {
    let mut s = String::new();
    let what = match (&e.service, e.role) {
        (Some(svc), role) => format!("{} of service `{svc}`", role.as_str()),
        (None, _) => "in no service".to_owned(),
    };
    let _ = writeln!(s, "pid {} ({}): {what}", e.pid, e.comm);
    let mut line = |label: &str, values: &[String]| {
        for (i, v) in values.iter().enumerate() {
            let label = if i == 0 { label } else { "" };
            let _ = writeln!(s, "  {label:<13}{v}");
        }
    };
    line("cmdline", std::slice::from_ref(&e.cmdline));
    let source = match e.source {
        Source::Daemon => "the running daemon",
        Source::PolicyFile => "policy file and /proc now (no daemon asked)",
    };
    line("source", &[format!("{source}; mode {}", e.mode)]);
    let chain: Vec<String> = e
        .chain
        .iter()
        .map(|l| {
            let role = match (&l.service, l.role) {
                (Some(svc), role) => format!("{} of {svc}", role.as_str()),
                (None, _) => "none".to_owned(),
            };
            format!("{} {} ({role})", l.pid, l.comm)
        })
        .collect();
    line("chain", &[chain.join(" <- ")]);
    if let Some(on) = e.matched_on {
        let mut values = vec![format!("on {on}:")];
        values.extend(e.matched.iter().map(|k| format!("  {}", key_text(k))));
        line("matched", &values);
    }
    let o = &e.if_parent_dies;
    line("parent dies", &[format!("{}: {}", o.action, o.detail)]);
    let keys: Vec<String> = o.orphan_match.iter().map(key_text).collect();
    line("orphan_match", &keys);
    if let Some(b) = &e.budget {
        line(
            "budget",
            &[format!(
                "{}: victim {} of {} ({:.1} MiB by {}; {})",
                b.budget,
                b.victim_rank,
                b.of,
                b.size_bytes as f64 / f64::from(1 << 20),
                b.sized_by,
                b.order
            )],
        );
    }
    if e.protections.is_empty() {
        line("protected", &["no".to_owned()]);
    } else {
        line("protected", &e.protections);
    }
    let services: Vec<String> = e
        .services
        .iter()
        .map(|m| match &m.first_failure {
            Some(k) => format!("{}: {}", m.service, key_text(k)),
            None => format!("{}: every key holds", m.service),
        })
        .collect();
    line("services", &services);
    line("unknown", &e.unknown);
    s
}

/// `cmdline `worker` matches "python3 worker"`
fn key_text(k: &KeyCheck) -> String {
    let value = match &k.value {
        Some(v) => format!("{v:?}"),
        None => "(unreadable)".to_owned(),
    };
    let verdict = if k.matched { "matches" } else { "fails on" };
    format!("{} `{}` {verdict} {value}", k.key, k.pattern)
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command};

    use super::*;

    /// Made-up pids (above the kernel's limit): processes of the table only, never in `/proc`.
    const FAKE: u32 = 5_000_000;
    const CMD: &str = "python3 app gtkexplain";

    /// `sleep` children: the processes explained (explain pins its subject in `/proc`). Killed
    /// when dropped.
    struct Sleepers(Vec<Child>);

    impl Sleepers {
        fn new(n: usize) -> Self {
            Self(
                (0..n)
                    .map(|_| Command::new("sleep").arg("30").spawn().unwrap())
                    .collect(),
            )
        }

        fn pid(&self, i: usize) -> u32 {
            self.0[i].id()
        }
    }

    impl Drop for Sleepers {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse(Path::new("t.toml"), text).unwrap()
    }

    /// One service, `svc`, whose roots run [`CMD`] and whose orphans are killed.
    const SERVICE: &str =
        "[[service]]\nname = \"svc\"\nmatch = { cmdline = \"app gtkexplain\" }\norphans = \"kill\"\n";

    /// [`SERVICE`] with more keys.
    fn service(extra: &str) -> Policy {
        policy(&format!("{SERVICE}{extra}\n"))
    }

    /// A table entry: a sleeper (its start time read, so that it can be pinned) or a made-up
    /// process, with the parent, name and command line given.
    fn proc(pid: u32, ppid: u32, comm: &str, cmd: &str) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            start_ns: procs::stat(pid).map_or(0, |s| s.start_ns),
            comm: comm.into(),
            state: 'S',
            threads: 1,
            pgid: pid,
            kernel_thread: false,
            exe: None,
            argv: cmd.split(' ').map(String::from).collect(),
        }
    }

    fn run(policy: &Policy, table: &Table, source: Source, pid: u32) -> Explanation {
        let protections = Protections::of(&policy.protect, None);
        let ctx = Context {
            policy,
            table,
            protections: &protections,
            mode: policy.mode,
            source,
        };
        explain(&ctx, pid).unwrap()
    }

    /// A root (made up) with a forked member (made up) whose child is `sleeper`, a member too.
    fn tree(sleeper: u32) -> Table {
        let mut t = Table::new(false);
        t.seed([
            proc(FAKE + 1, 1, "python3", CMD),
            proc(FAKE + 2, FAKE + 1, "python3", CMD),
            proc(sleeper, FAKE + 2, "python3", CMD),
        ]);
        t.set_service(FAKE + 1, Some(0), true);
        t.set_service(FAKE + 2, Some(0), false);
        t.set_service(sleeper, Some(0), false);
        t
    }

    fn chain(e: &Explanation) -> Vec<(u32, Role)> {
        e.chain.iter().map(|l| (l.pid, l.role)).collect()
    }

    #[test]
    fn a_member_is_explained_up_to_its_root() {
        let s = Sleepers::new(1);
        let e = run(&service(""), &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!((e.role, e.service.as_deref()), (Role::Member, Some("svc")));
        assert_eq!(
            chain(&e),
            [
                (s.pid(0), Role::Member),
                (FAKE + 2, Role::Member),
                (FAKE + 1, Role::Root)
            ]
        );
        assert_eq!(e.matched_on, Some(FAKE + 1), "checked on the root");
        assert_eq!(e.matched.len(), 1);
        let k = &e.matched[0];
        assert_eq!(
            (k.key, k.pattern.as_str(), k.value.as_deref(), k.matched),
            ("cmdline", "app gtkexplain", Some(CMD), true)
        );
        assert_eq!(e.if_parent_dies.action, "kill");
        assert_eq!(e.if_parent_dies.detail, "SIGKILL at once");
        assert!(e.protections.is_empty() && e.services.is_empty() && e.unknown.is_empty());
        assert!(e.budget.is_none(), "no memory budget");

        let terminate = policy(&format!(
            "{}kill_timeout = \"3s\"\n",
            SERVICE.replace("\"kill\"", "\"terminate\"")
        ));
        let e = run(&terminate, &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!(e.if_parent_dies.action, "terminate");
        assert_eq!(
            e.if_parent_dies.detail,
            "SIGTERM, then SIGKILL after 3s if it still lives"
        );
        let audit = policy(&format!("mode = \"audit\"\n{SERVICE}"));
        let e = run(&audit, &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!(e.mode, "audit");
        assert!(e
            .if_parent_dies
            .detail
            .ends_with("(audit mode: recorded, nothing signalled)"));
    }

    #[test]
    fn a_root_is_its_own_chain_and_never_an_orphan() {
        let s = Sleepers::new(1);
        let mut t = Table::new(false);
        t.seed([proc(s.pid(0), 1, "python3", CMD)]);
        t.set_service(s.pid(0), Some(0), true);
        let e = run(&service(""), &t, Source::Daemon, s.pid(0));
        assert_eq!(e.role, Role::Root);
        assert_eq!(chain(&e), [(s.pid(0), Role::Root)]);
        assert_eq!(e.matched_on, Some(s.pid(0)));
        assert!(e.matched.iter().all(|k| k.matched));
        assert_eq!(e.if_parent_dies.action, "none");
        assert_eq!(e.if_parent_dies.detail, "roots are never orphans");
    }

    #[test]
    fn orphan_match_decides_whether_the_action_applies() {
        let s = Sleepers::new(1);
        let picky = service("orphan_match = { cmdline = \"multiprocessing\" }");
        let e = run(&picky, &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!(e.if_parent_dies.action, "none");
        assert_eq!(
            e.if_parent_dies.detail,
            "not selected by orphan_match (key `cmdline` failed)"
        );
        let k = &e.if_parent_dies.orphan_match[0];
        assert_eq!(
            (k.key, k.value.as_deref(), k.matched),
            ("cmdline", Some(CMD), false)
        );
        let broad = service("orphan_match = { cmdline = \"gtkexplain\" }");
        let e = run(&broad, &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!(e.if_parent_dies.action, "kill");
        assert!(e.if_parent_dies.orphan_match[0].matched);
    }

    #[test]
    fn orphans_and_members_below_outsiders() {
        let s = Sleepers::new(2);
        let (orphan, stray) = (s.pid(0), s.pid(1));
        let mut t = Table::new(false);
        t.seed([
            proc(orphan, 1, "python3", CMD),
            proc(FAKE + 3, 1, "bash", "bash"),
            proc(stray, FAKE + 3, "python3", CMD),
        ]);
        t.set_service(orphan, Some(0), false);
        t.set_orphan(orphan);
        t.set_service(stray, Some(0), false);
        let p = service("");
        // Orphaned while the daemon watched: the action applied then.
        let e = run(&p, &t, Source::Daemon, orphan);
        assert_eq!(e.role, Role::Orphan);
        assert_eq!(chain(&e).last().map(|l| l.0), Some(1), "up to pid 1");
        assert_eq!(
            e.matched_on,
            Some(orphan),
            "its root is not among its ancestors"
        );
        assert_eq!(e.if_parent_dies.action, "kill");
        assert!(e
            .if_parent_dies
            .detail
            .starts_with("already an orphan: its parent died while guardian watched"));
        // Found so at start: orphans_at_start decides (report unless enforce).
        let e = run(&p, &t, Source::PolicyFile, orphan);
        assert_eq!(e.if_parent_dies.action, "report");
        assert!(e
            .if_parent_dies
            .detail
            .contains("orphans_at_start = report"));
        let enforce = service("orphans_at_start = \"enforce\"");
        let e = run(&enforce, &t, Source::PolicyFile, orphan);
        assert_eq!(e.if_parent_dies.action, "kill");
        assert!(
            !e.unknown.is_empty(),
            "the offline source says what it cannot know"
        );
        // A member whose parent is in no service is nobody's orphan when that parent dies.
        let e = run(&p, &t, Source::Daemon, stray);
        assert_eq!(e.role, Role::Member);
        assert_eq!(e.if_parent_dies.action, "none");
        assert!(e
            .if_parent_dies
            .detail
            .starts_with(&format!("its parent {} is not a member", FAKE + 3)));
    }

    #[test]
    fn in_no_service_each_service_names_its_first_failing_key() {
        let s = Sleepers::new(1);
        let p = policy(
            "[[service]]\nname = \"a\"\nmatch = { cmdline = \"nothing like it\" }\n\
             [[service]]\nname = \"b\"\nmatch = { cmdline = \"zzz\", comm = \"sle*\" }\n",
        );
        let mut t = Table::new(false);
        t.seed([proc(s.pid(0), 1, "sleep", "sleep 30")]);
        let e = run(&p, &t, Source::PolicyFile, s.pid(0));
        assert_eq!((e.role, e.service.as_deref()), (Role::None, None));
        assert_eq!(e.if_parent_dies.action, "none");
        assert!(e.matched.is_empty() && e.matched_on.is_none() && e.budget.is_none());
        let misses: Vec<(&str, &str, Option<&str>)> = e
            .services
            .iter()
            .map(|m| {
                let k = m.first_failure.as_ref().unwrap();
                (m.service.as_str(), k.key, k.value.as_deref())
            })
            .collect();
        // `b`: its name holds (checked first), its command line fails.
        assert_eq!(
            misses,
            [
                ("a", "cmdline", Some("sleep 30")),
                ("b", "cmdline", Some("sleep 30"))
            ]
        );
        let all = policy("[[service]]\nname = \"c\"\nmatch = { comm = \"sleep\" }\n");
        let e = run(&all, &t, Source::PolicyFile, s.pid(0));
        assert!(e.services[0].first_failure.is_none(), "every key holds");
        assert!(render_text(&e).contains("c: every key holds"));
    }

    /// Orphans first, then the largest; the root last. Sized as the budget engine sizes them.
    #[test]
    fn victim_rank_follows_the_budget_order() {
        let s = Sleepers::new(3);
        let (root, member, orphan) = (s.pid(0), s.pid(1), s.pid(2));
        let table = |extra: &str| {
            let mut t = Table::new(false);
            t.seed([
                proc(root, 1, "python3", CMD),
                proc(member, root, "python3", CMD),
                proc(orphan, 1, "python3", CMD),
            ]);
            t.set_service(root, Some(0), true);
            t.set_service(member, Some(0), false);
            t.set_service(orphan, Some(0), false);
            t.set_orphan(orphan);
            (service(extra), t)
        };
        let (p, t) = table("memory_high = \"100M\"");
        let rank = |pid| run(&p, &t, Source::Daemon, pid).budget.unwrap();
        let ranks: Vec<(usize, usize)> = [orphan, member, root]
            .iter()
            .map(|&pid| {
                let r = rank(pid);
                (r.victim_rank, r.of)
            })
            .collect();
        assert_eq!(ranks, [(1, 3), (2, 3), (3, 3)]);
        let r = rank(member);
        assert_eq!(
            (r.budget, r.sized_by, r.order),
            ("memory_high", "pss", "orphans-then-largest")
        );
        assert!(r.size_bytes > 0);
        // The kernel's charge is the usage in an own cgroup: resident sets.
        let (p, t) = table("memory_high = \"100M\"\ncgroup = \"own\"");
        let e = run(&p, &t, Source::Daemon, member);
        assert_eq!(e.budget.unwrap().sized_by, "rss");
        // memory_max alone: the kernel's in an own cgroup, guardian's own in inherit.
        let (p, t) = table("memory_max = \"100M\"\ncgroup = \"own\"");
        assert!(run(&p, &t, Source::Daemon, member).budget.is_none());
        let (p, t) = table("memory_max = \"100M\"");
        assert_eq!(
            run(&p, &t, Source::Daemon, member).budget.unwrap().budget,
            "memory_max"
        );
    }

    #[test]
    fn every_protection_is_listed_and_refuses_the_action() {
        let s = Sleepers::new(1);
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        let p = policy(&format!(
            "protect = [\"sleep\", {{ user = {euid} }}]\n{SERVICE}"
        ));
        let e = run(&p, &tree(s.pid(0)), Source::Daemon, s.pid(0));
        assert_eq!(
            e.protections,
            [
                "protected name `sleep`".to_owned(),
                format!("protected by `uid={euid}`")
            ]
        );
        assert_eq!(e.if_parent_dies.action, "kill");
        assert_eq!(
            e.if_parent_dies.detail,
            "SIGKILL at once (refused: protected name `sleep`)"
        );
        let init = run(&p, &Table::new(false), Source::Daemon, 1);
        assert_eq!(
            init.protections.first().map(String::as_str),
            Some("pid 1 is init")
        );
        assert_eq!(chain(&init), [(1, Role::None)]);
        // The daemon's own process and its ancestors, when it is known.
        let ours = Protections::of(&p.protect, Some(s.pid(0)));
        let ctx = Context {
            policy: &p,
            table: &Table::new(false),
            protections: &ours,
            mode: Mode::Enforce,
            source: Source::Daemon,
        };
        let e = explain(&ctx, s.pid(0)).unwrap();
        assert_eq!(e.protections[0], "guardian itself");
        let e = explain(&ctx, std::process::id()).unwrap();
        assert!(e
            .protections
            .contains(&"an ancestor of guardian".to_owned()));
        assert!(
            e.unknown[0].starts_with("guardian does not follow this process"),
            "{:?}",
            e.unknown
        );
    }

    #[test]
    fn missing_and_exited_processes_are_errors() {
        let p = service("");
        let protections = Protections::of(&p.protect, None);
        let t = Table::new(false);
        let ctx = Context {
            policy: &p,
            table: &t,
            protections: &protections,
            mode: Mode::Enforce,
            source: Source::PolicyFile,
        };
        let err = explain(&ctx, 4_194_305).unwrap_err();
        assert_eq!(err.to_string(), "no process 4194305");
        let mut s = Sleepers::new(1);
        let pid = s.pid(0);
        s.0[0].kill().unwrap();
        // Not reaped yet: a zombie, until the sleepers are dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !procs::stat(pid).is_some_and(|st| st.zombie) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never became a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(explain(&ctx, pid), Err(ExplainError::Exited(p)) if p == pid));
    }

    #[test]
    fn json_and_text_carry_the_same_answer() {
        let s = Sleepers::new(1);
        let e = run(&service(""), &tree(s.pid(0)), Source::PolicyFile, s.pid(0));
        let v: serde_json::Value = serde_json::from_str(&render(&e, OutputFormat::Json)).unwrap();
        assert_eq!(v["role"], "member");
        assert_eq!(v["source"], "policy_file");
        assert_eq!(v["service"], "svc");
        assert_eq!(v["chain"][2]["role"], "root");
        assert_eq!(v["matched"][0]["key"], "cmdline");
        assert_eq!(v["if_parent_dies"]["action"], "kill");
        assert!(v["budget"].is_null());
        assert_eq!(v["unknown"].as_array().unwrap().len(), e.unknown.len());
        let text = render(&e, OutputFormat::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!("pid {} (python3): member of service `svc`", s.pid(0))
        );
        assert!(
            lines.contains(&format!("  cmdline      {CMD}").as_str()),
            "{text}"
        );
        assert!(
            lines.contains(&"  parent dies  kill: SIGKILL at once"),
            "{text}"
        );
        let chain = format!(
            "  chain        {} python3 (member of svc) <- {} python3 (member of svc) <- {} python3 (root of svc)",
            s.pid(0),
            FAKE + 2,
            FAKE + 1
        );
        assert!(lines.contains(&chain.as_str()), "{text}");
        // Every line after the first is a label column and a value.
        for l in &lines[1..] {
            assert!(l.starts_with("  ") && l.len() > 15, "{l:?}");
        }
    }
}
