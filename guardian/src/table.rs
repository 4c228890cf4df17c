//! The live process table: seeded from `/proc`, then kept by kernel events.
//!
//! Processes are identified by (pid, start time): pid_max can be small and PIDs wrap within
//! seconds under a fork storm. Exited entries are kept for a grace period so that late
//! references still resolve, and an exit that arrives before its fork is held until the fork
//! shows up.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
    sync::Arc,
};

use crate::{
    kernel::events::{Event, Exec, Exit, ExitStatus, Fork, Thread},
    procs::ProcInfo,
};

/// Two start times this close (ns) belong to the same process. Start times are known exactly
/// (BTF), to a clock tick (`/proc`) or from the fork event's timestamp (a few µs late); reusing a
/// PID takes pid_max forks, which no host does within this window.
pub const SAME_START_NS: u64 = 100_000_000;
/// How long an exited process stays in the table (ns).
pub const EXITED_GRACE_NS: u64 = 5_000_000_000;
/// kthreadd: the parent of every kernel thread.
const KTHREADD: u32 = 2;

/// A map keyed by pid. Pids are numbers the kernel hands out, in order, which no one can aim at
/// a hash function's weak spots (what std's SipHash guards against): the pid itself places them
/// (see [`PidHasher`]), at a fraction of SipHash's cost, on the path every event takes.
type PidMap<V> = HashMap<u32, V, BuildHasherDefault<PidHasher>>;

#[derive(Default)]
struct PidHasher(u64);

impl Hasher for PidHasher {
    fn write_u32(&mut self, pid: u32) {
        // The table's slot comes from the low bits, the 7-bit tag its lookups compare first from
        // the top ones. The low bits are the pid itself: pids are handed out in order, and a
        // fork storm's processes are looked up, added and (5 s later) removed in that order, side
        // by side (a few cache lines rather than a miss per lookup, which was most of the
        // table's cost). The tag multiplies it by 2^64 divided by the golden ratio, so that
        // neighbours' tags differ.
        let pid = u64::from(pid);
        self.0 = (pid.wrapping_mul(0x9e37_79b9_7f4a_7c15) & (0x7f << 57)) | pid;
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(((self.0 as u32) << 8) | u32::from(b));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Parent process id (0 when not known). An orphan keeps its dead parent here until its new
    /// parent is confirmed.
    pub parent: u32,
    /// Start time, `CLOCK_BOOTTIME` ns (see [`SAME_START_NS`] for its precision).
    pub start_ns: u64,
    // The image is shared (`Arc`) with the parent a process was forked from until it execs: a
    // service's thousands of forked workers hold one copy of their name and command line.
    pub comm: Arc<str>,
    pub exe: Option<Arc<str>>,
    pub argv: Arc<[String]>,
    /// Live child processes.
    pub children: BTreeSet<u32>,
    pub kernel_thread: bool,
    pub state: State,
    /// The policy service this process belongs to (index into the policy's services).
    pub service: Option<usize>,
    /// The process matched its service's selectors itself (rather than descending from a root).
    pub root: bool,
    /// A member whose member parent died while it lived.
    pub orphan: bool,
    /// Its orphan decision was taken when its parent was sent SIGKILL, before the parent's exit:
    /// that exit takes no second one.
    pub decided_early: bool,
    /// Live threads (1 for a single-threaded process). Kept up to date only while thread events
    /// are reported (task budgets counted by guardian).
    pub threads: u32,
    /// When it was last seen exec'ing (boot ns); `None` for a forked copy that has not exec'd
    /// since, or a process read from `/proc`.
    pub exec_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Alive,
    Exited {
        at_ns: u64,
        status: Option<ExitStatus>,
    },
}

impl Process {
    /// A live process with no image known yet (no executable, no command line), in no service.
    fn new(pid: u32, parent: u32, start_ns: u64, comm: Arc<str>) -> Self {
        Self {
            pid,
            parent,
            start_ns,
            comm,
            exe: None,
            argv: Vec::new().into(),
            children: BTreeSet::new(),
            kernel_thread: false,
            state: State::Alive,
            service: None,
            root: false,
            orphan: false,
            decided_early: false,
            threads: 1,
            exec_ns: None,
        }
    }

    pub fn alive(&self) -> bool {
        self.state == State::Alive
    }

    /// Whether a start time read elsewhere is this process's.
    pub fn same_start(&self, start_ns: u64) -> bool {
        self.start_ns.abs_diff(start_ns) <= SAME_START_NS
    }

    /// The command line joined by spaces (what policies match against).
    pub fn cmdline(&self) -> String {
        self.argv.join(" ")
    }
}

#[cfg(test)]
impl Process {
    /// A live member of service 0, child of init, for tests.
    pub(crate) fn for_test(pid: u32, comm: &str) -> Self {
        Self {
            argv: vec![comm.to_owned()].into(),
            service: Some(0),
            ..Self::new(pid, 1, 0, comm.into())
        }
    }
}

/// What an event changed. The process named is in the table when the change is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Forked {
        pid: u32,
    },
    Execed {
        pid: u32,
    },
    Exited {
        pid: u32,
    },
    /// A thread of `pid` started.
    ThreadStarted {
        pid: u32,
        tid: u32,
    },
    /// `pid`'s parent died: the kernel reparents it to a reaper. The new parent is to be
    /// confirmed (from `/proc`) and recorded with [`Table::reparented`].
    Orphaned {
        pid: u32,
        old_parent: u32,
    },
}

#[derive(Clone, Debug)]
struct EarlyExit {
    exit: Exit,
    expires_ns: u64,
}

/// Counters of inconsistencies the table repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// A PID came back while its previous holder was still alive in the table: that exit was
    /// never seen.
    pub missed_exits: u64,
    /// Exits seen before their fork.
    pub early_exits: u64,
    /// Second reports of the same group death.
    pub duplicate_exits: u64,
    /// Exec records applied (the kernel's exec filter keeps the others back).
    pub execs: u64,
}

/// Live members of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCount {
    pub processes: u64,
    /// Processes plus their threads.
    pub tasks: u64,
}

#[derive(Debug, Default)]
pub struct Table {
    /// Boxed: under a fork storm the table holds tens of thousands of exited processes for
    /// their grace period, and a map of pointers stays small enough to probe and grow cheaply.
    procs: PidMap<Box<Process>>,
    /// Kept as processes come and go, so that budget checks on the fork path cost O(1).
    services: HashMap<usize, ServiceCount>,
    /// Exited entries in the order they expire: (expiry ns, pid, start ns).
    expiry: VecDeque<(u64, u32, u64)>,
    early_exits: PidMap<EarlyExit>,
    /// Insert processes the table first hears of at exec (every process is being traced).
    /// Otherwise execs of unknown processes are left to the caller.
    adopt_unknown: bool,
    pub stats: TableStats,
}

impl Table {
    pub fn new(adopt_unknown: bool) -> Self {
        Self {
            adopt_unknown,
            ..Self::default()
        }
    }

    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.procs.get(&pid).map(|p| &**p)
    }

    /// The live process with this pid.
    pub fn alive(&self, pid: u32) -> Option<&Process> {
        self.get(pid).filter(|p| p.alive())
    }

    pub fn len_alive(&self) -> usize {
        self.procs.values().filter(|p| p.alive()).count()
    }

    pub fn iter_alive(&self) -> impl Iterator<Item = &Process> {
        self.procs.values().map(|p| &**p).filter(|p| p.alive())
    }

    /// Live members of a service.
    pub fn service_count(&self, svc: usize) -> ServiceCount {
        self.services.get(&svc).copied().unwrap_or_default()
    }

    fn account(&mut self, svc: Option<usize>, processes: i64, tasks: i64) {
        let Some(svc) = svc else { return };
        let c = self.services.entry(svc).or_default();
        c.processes = c.processes.saturating_add_signed(processes);
        c.tasks = c.tasks.saturating_add_signed(tasks);
    }

    /// Makes a live process a member of `service` (or of none), a root or not.
    pub fn set_service(&mut self, pid: u32, service: Option<usize>, root: bool) {
        let Some(p) = self.procs.get_mut(&pid).filter(|p| p.alive()) else {
            return;
        };
        let (old, threads) = (p.service, i64::from(p.threads));
        p.service = service;
        p.root = root;
        self.account(old, -1, -threads);
        self.account(service, 1, threads);
    }

    /// Marks a live member as an orphan of its service.
    pub fn set_orphan(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.alive()) {
            p.orphan = true;
        }
    }

    /// Marks a live member as an orphan of its service whose decision is taken already (see
    /// [`Process::decided_early`]).
    pub fn set_decided_early(&mut self, pid: u32) {
        if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.alive()) {
            p.orphan = true;
            p.decided_early = true;
        }
    }

    /// Adds processes read from `/proc`. A process already known with the same start time is
    /// left as the events made it.
    pub fn seed(&mut self, infos: impl IntoIterator<Item = ProcInfo>) {
        let mut added = Vec::new();
        for info in infos {
            // A zombie leader with live threads is a live process (its leader called
            // pthread_exit); a zombie without threads is dead.
            if matches!(info.state, 'Z' | 'X') && info.threads <= 1 {
                continue;
            }
            if let Some(p) = self.procs.get(&info.pid) {
                if p.alive() && p.same_start(info.start_ns) {
                    continue;
                }
            }
            added.push(info.pid);
            self.procs.insert(
                info.pid,
                Box::new(Process {
                    exe: info.exe.map(Into::into),
                    argv: info.argv.into(),
                    kernel_thread: info.kernel_thread,
                    threads: u32::try_from(info.threads).unwrap_or(1).max(1),
                    ..Process::new(info.pid, info.ppid, info.start_ns, info.comm.into())
                }),
            );
        }
        for pid in added {
            let parent = self.procs[&pid].parent;
            if let Some(p) = self.procs.get_mut(&parent).filter(|p| p.alive()) {
                p.children.insert(pid);
            }
        }
    }

    /// Inserts one process found outside the event stream (for example a policy root found at
    /// exec, or its descendants found in `/proc`). Returns false if it was already known.
    pub fn insert(&mut self, info: ProcInfo) -> bool {
        if self
            .alive(info.pid)
            .is_some_and(|p| p.same_start(info.start_ns))
        {
            return false;
        }
        self.seed([info]);
        true
    }

    /// Applies one kernel event, appending what it changed to `changes` (a buffer the caller
    /// reuses: this runs for every record, and under a fork storm an allocation per event is a
    /// measurable part of `guardian trace`'s cost).
    pub fn apply_into(&mut self, ev: &Event, changes: &mut Vec<Change>) {
        match ev {
            Event::Fork(f) => self.fork(f, changes),
            Event::Exec(e) => {
                self.stats.execs += 1;
                changes.extend(self.exec(e));
            }
            Event::Exit(x) => self.exit(x, changes),
            Event::Thread(t) => changes.extend(self.thread(t)),
            // The process lives on until its exit.
            Event::Doomed(_) => {}
        }
    }

    #[cfg(test)]
    pub fn apply(&mut self, ev: &Event) -> Vec<Change> {
        let mut changes = Vec::new();
        self.apply_into(ev, &mut changes);
        changes
    }

    fn fork(&mut self, f: &Fork, changes: &mut Vec<Change>) {
        if let Some(old) = self.procs.get(&f.pid) {
            if old.alive() {
                if old.same_start(f.ts_ns) {
                    // Seen in /proc already (the scan raced with the event).
                    return;
                }
                // The previous holder of this PID died without an exit event: its children are
                // orphans, but there is no exit to report.
                self.stats.missed_exits += 1;
                self.retire(f.pid, f.ts_ns, None, changes);
            }
            self.procs.remove(&f.pid);
        }
        let parent = f.parent.unwrap_or(f.creator);
        // The child is a copy of its creator: same image (shared), same service.
        let (comm, exe, argv, kernel_thread, service) = match self.procs.get(&f.creator) {
            Some(c) => (
                // Compared as bytes: a name that is valid UTF-8 (all but a few) is its own
                // text, and an invalid one differs from its lossy text and is decoded anew.
                if c.comm.as_bytes() == f.comm.bytes() {
                    c.comm.clone()
                } else {
                    f.comm.as_str().into()
                },
                c.exe.clone(),
                c.argv.clone(),
                c.kernel_thread,
                c.service,
            ),
            None => (f.comm.as_str().into(), None, Vec::new().into(), false, None),
        };
        self.procs.insert(
            f.pid,
            Box::new(Process {
                exe,
                argv,
                kernel_thread: kernel_thread || parent == KTHREADD,
                service,
                ..Process::new(f.pid, parent, f.ts_ns, comm)
            }),
        );
        if let Some(p) = self.procs.get_mut(&parent).filter(|p| p.alive()) {
            p.children.insert(f.pid);
        }
        self.account(service, 1, 1);
        changes.push(Change::Forked { pid: f.pid });

        if let Some(early) = self.early_exits.remove(&f.pid) {
            if early
                .exit
                .start_ns
                .is_none_or(|s| s.abs_diff(f.ts_ns) <= SAME_START_NS)
            {
                self.exit(&early.exit, changes);
            } else {
                self.early_exits.insert(f.pid, early);
            }
        }
    }

    fn thread(&mut self, t: &Thread) -> Option<Change> {
        let p = self.procs.get_mut(&t.pid).filter(|p| p.alive())?;
        let service = p.service;
        if t.started {
            p.threads += 1;
            self.account(service, 0, 1);
            Some(Change::ThreadStarted {
                pid: t.pid,
                tid: t.tid,
            })
        } else {
            if p.threads > 1 {
                p.threads -= 1;
                self.account(service, 0, -1);
            }
            None
        }
    }

    fn exec(&mut self, e: &Exec) -> Option<Change> {
        let known = self
            .procs
            .get(&e.pid)
            .is_some_and(|p| p.alive() && e.start_ns.is_none_or(|s| p.same_start(s)));
        if !known {
            if !self.adopt_unknown {
                return None;
            }
            self.procs.remove(&e.pid);
            let parent = e.ppid.unwrap_or(0);
            self.procs.insert(
                e.pid,
                Box::new(Process::new(
                    e.pid,
                    parent,
                    e.start_ns.unwrap_or(e.ts_ns),
                    "".into(),
                )),
            );
            if let Some(p) = self.procs.get_mut(&parent).filter(|p| p.alive()) {
                p.children.insert(e.pid);
            }
        }
        let p = self.procs.get_mut(&e.pid)?;
        let (service, gone_threads) = (p.service, i64::from(p.threads) - 1);
        p.comm = e.comm.as_str().into();
        p.exe = Some(e.filename.as_str().into());
        p.argv = e.argv.as_slice().into();
        // A user-space exec is never a kernel thread (kthreads exec only through usermode helpers,
        // which become ordinary processes).
        p.kernel_thread = false;
        p.exec_ns = Some(e.ts_ns);
        // exec leaves a single thread.
        p.threads = 1;
        if let Some(start) = e.start_ns {
            p.start_ns = start;
        }
        self.account(service, 0, -gone_threads);
        Some(Change::Execed { pid: e.pid })
    }

    fn exit(&mut self, x: &Exit, changes: &mut Vec<Change>) {
        let Some(p) = self.procs.get(&x.pid) else {
            self.hold_early(x);
            return;
        };
        let same = x.start_ns.is_none_or(|s| p.same_start(s));
        if !p.alive() {
            if same {
                self.stats.duplicate_exits += 1;
            } else {
                self.hold_early(x);
            }
            return;
        }
        if !same {
            // The table still holds an older process with this PID; the one that exited is newer
            // and its fork has not been seen yet.
            if x.start_ns.is_some_and(|s| s < p.start_ns) {
                return;
            }
            self.stats.missed_exits += 1;
            // Its children are orphans, but that exit was never seen: there is none to report.
            self.retire(x.pid, x.ts_ns, None, changes);
            self.hold_early(x);
            return;
        }
        if let Some(p) = self.procs.get_mut(&x.pid) {
            if p.comm.is_empty() {
                p.comm = x.comm.as_str().into();
            }
        }
        changes.push(Change::Exited { pid: x.pid });
        self.retire(x.pid, x.ts_ns, x.status, changes);
    }

    fn hold_early(&mut self, x: &Exit) {
        self.stats.early_exits += 1;
        self.early_exits.insert(
            x.pid,
            EarlyExit {
                exit: x.clone(),
                expires_ns: x.ts_ns + EXITED_GRACE_NS,
            },
        );
    }

    /// Marks a live process exited, unlinks it from its parent, and appends one `Orphaned` per
    /// live child.
    fn retire(
        &mut self,
        pid: u32,
        at_ns: u64,
        status: Option<ExitStatus>,
        changes: &mut Vec<Change>,
    ) {
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.state = State::Exited { at_ns, status };
        let parent = p.parent;
        let start = p.start_ns;
        let children = std::mem::take(&mut p.children);
        let (service, threads) = (p.service, i64::from(p.threads));
        self.account(service, -1, -threads);
        self.expiry.push_back((at_ns + EXITED_GRACE_NS, pid, start));
        if let Some(pp) = self.procs.get_mut(&parent) {
            pp.children.remove(&pid);
        }
        // The children keep the dead parent as theirs until the new one is confirmed: until the
        // kernel has moved them (right after this exit) that is what the kernel says too.
        for child in children {
            if self.alive(child).is_some() {
                changes.push(Change::Orphaned {
                    pid: child,
                    old_parent: pid,
                });
            }
        }
    }

    /// A live process found gone (or its pid held by another process) in `/proc`: its exit was
    /// never seen. Returns one `Orphaned` per live child, as an exit would.
    pub fn retire_missed(&mut self, pid: u32, at_ns: u64) -> Vec<Change> {
        if self.alive(pid).is_none() {
            return Vec::new();
        }
        self.stats.missed_exits += 1;
        let mut changes = Vec::new();
        self.retire(pid, at_ns, None, &mut changes);
        changes
    }

    /// A live process found running another program in `/proc` than the table says: an exec
    /// that was never seen.
    pub fn update_image(&mut self, pid: u32, comm: &str, exe: Option<String>, argv: Vec<String>) {
        if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.alive()) {
            p.comm = comm.into();
            p.exe = exe.map(Into::into);
            p.argv = argv.into();
        }
    }

    /// Records the executable of a live process as `/proc` resolves it (the exec event carries
    /// the path as passed to execve).
    pub fn set_exe(&mut self, pid: u32, exe: String) {
        if let Some(p) = self.procs.get_mut(&pid).filter(|p| p.alive()) {
            p.exe = Some(exe.into());
        }
    }

    /// Live members of any service.
    pub fn members(&self) -> impl Iterator<Item = &Process> {
        self.iter_alive().filter(|p| p.service.is_some())
    }

    /// A reloaded policy renumbered its services: `map[old]` is each old service's new index,
    /// `None` for a service that is gone, whose members are forgotten (no longer members, roots
    /// or orphans). Exited entries are renumbered too (an orphan's dead parent is looked up).
    /// Returns the live processes forgotten.
    pub fn remap_services(&mut self, map: &[Option<usize>]) -> Vec<u32> {
        let mut forgotten = Vec::new();
        for p in self.procs.values_mut() {
            let Some(old) = p.service else { continue };
            p.service = map.get(old).copied().flatten();
            if p.service.is_none() {
                p.root = false;
                p.orphan = false;
                if p.alive() {
                    forgotten.push(p.pid);
                }
            }
        }
        self.recount();
        forgotten
    }

    /// Makes a root and its descendants no longer members (its selectors stopped matching it
    /// after a reload); descendants that are roots of their own stay. Returns those forgotten.
    pub fn forget_root(&mut self, pid: u32) -> Vec<u32> {
        let Some(svc) = self.alive(pid).and_then(|p| p.service) else {
            return Vec::new();
        };
        let mut forgotten = Vec::new();
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            if forgotten.len() > self.procs.len() {
                break; // a cycle would be a bug; never loop forever on it
            }
            let Some(e) = self.alive(p) else { continue };
            if p != pid && (e.root || e.service != Some(svc)) {
                continue;
            }
            stack.extend(e.children.iter().copied());
            self.set_service(p, None, false);
            if let Some(e) = self.procs.get_mut(&p) {
                e.orphan = false;
            }
            forgotten.push(p);
        }
        forgotten
    }

    /// Counts every service's live members afresh.
    fn recount(&mut self) {
        self.services.clear();
        let counts: Vec<(Option<usize>, u32)> =
            self.iter_alive().map(|p| (p.service, p.threads)).collect();
        for (svc, threads) in counts {
            self.account(svc, 1, i64::from(threads));
        }
    }

    /// Records a confirmed new parent (from `/proc`) of a live process.
    pub fn reparented(&mut self, pid: u32, new_parent: u32) {
        let Some(c) = self.procs.get_mut(&pid).filter(|c| c.alive()) else {
            return;
        };
        let old = std::mem::replace(&mut c.parent, new_parent);
        if let Some(op) = self.procs.get_mut(&old) {
            op.children.remove(&pid);
        }
        if let Some(np) = self.procs.get_mut(&new_parent).filter(|p| p.alive()) {
            np.children.insert(pid);
        }
    }

    /// Drops exited entries and unmatched early exits older than the grace period.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some(&(expiry, pid, start)) = self.expiry.front() {
            if expiry > now_ns {
                break;
            }
            self.expiry.pop_front();
            if self
                .procs
                .get(&pid)
                .is_some_and(|p| !p.alive() && p.start_ns == start)
            {
                self.procs.remove(&pid);
            }
        }
        self.early_exits.retain(|_, e| e.expires_ns > now_ns);
    }

    /// Live descendants of `pid` (not including it), depth first.
    pub fn descendants(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut stack: Vec<u32> = self
            .alive(pid)
            .map(|p| p.children.iter().copied().collect())
            .unwrap_or_default();
        while let Some(c) = stack.pop() {
            if out.len() > self.procs.len() {
                break; // a cycle would be a bug; never loop forever on it
            }
            if let Some(p) = self.alive(c) {
                out.push(c);
                stack.extend(p.children.iter().copied());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn fork(pid: u32, parent: u32, ts_ns: u64) -> Event {
        Event::Fork(Fork {
            ts_ns,
            pid,
            creator: parent,
            parent: Some(parent),
            comm: "w".into(),
        })
    }

    fn exit(pid: u32, start_ns: u64, ts_ns: u64) -> Event {
        Event::Exit(Exit {
            ts_ns,
            pid,
            ppid: None,
            start_ns: Some(start_ns),
            comm: "w".into(),
            status: Some(ExitStatus::Code(0)),
            had_children: false,
        })
    }

    fn info(pid: u32, ppid: u32, start_ns: u64) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            start_ns,
            comm: format!("p{pid}"),
            state: 'S',
            threads: 1,
            pgid: pid,
            kernel_thread: false,
            exe: Some("/bin/p".into()),
            argv: vec!["p".into()],
        }
    }

    fn seeded() -> Table {
        let mut t = Table::new(true);
        t.seed([info(1, 0, 0), info(100, 1, 10 * MS)]);
        t
    }

    #[test]
    fn fork_links_child_and_exit_orphans_grandchildren() {
        let mut t = seeded();
        assert_eq!(
            t.apply(&fork(200, 100, 1000 * MS)),
            vec![Change::Forked { pid: 200 }]
        );
        t.apply(&fork(300, 200, 1001 * MS));
        assert!(t.alive(100).unwrap().children.contains(&200));
        assert_eq!(*t.get(300).unwrap().argv, ["p"], "inherits argv");
        // One copy of the image between a forked child and its creator (the comm too, when the
        // kernel reports the same).
        let (child, creator) = (t.get(300).unwrap(), t.get(200).unwrap());
        assert!(Arc::ptr_eq(&child.argv, &creator.argv));
        assert!(Arc::ptr_eq(
            child.exe.as_ref().unwrap(),
            creator.exe.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(&child.comm, &creator.comm));
        let changes = t.apply(&exit(200, 1000 * MS + 5_000, 1500 * MS));
        assert_eq!(
            changes,
            vec![
                Change::Exited { pid: 200 },
                Change::Orphaned {
                    pid: 300,
                    old_parent: 200
                }
            ]
        );
        assert!(!t.alive(100).unwrap().children.contains(&200));
        t.reparented(300, 1);
        assert_eq!(t.alive(300).unwrap().parent, 1);
        assert!(t.alive(1).unwrap().children.contains(&300));
    }

    #[test]
    fn exit_before_fork_is_applied_when_the_fork_arrives() {
        let mut t = seeded();
        assert!(t.apply(&exit(200, 1000 * MS, 1200 * MS)).is_empty());
        let changes = t.apply(&fork(200, 100, 1000 * MS + 3_000));
        assert_eq!(
            changes,
            vec![Change::Forked { pid: 200 }, Change::Exited { pid: 200 }]
        );
        assert!(t.alive(200).is_none());
        assert_eq!(t.stats.early_exits, 1);
    }

    #[test]
    fn reused_pid_is_a_new_process() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.apply(&exit(200, 1000 * MS, 1100 * MS));
        // Same PID, seconds later, another parent.
        t.apply(&fork(200, 1, 9000 * MS));
        let p = t.alive(200).unwrap();
        assert_eq!((p.parent, p.start_ns), (1, 9000 * MS));
        assert!(!t.alive(100).unwrap().children.contains(&200));
        // A late duplicate exit of the old process must not kill the new one.
        t.apply(&exit(200, 1000 * MS, 1100 * MS));
        assert!(t.alive(200).is_some());
    }

    #[test]
    fn missed_exit_is_repaired_by_the_next_fork_of_the_pid() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.apply(&fork(201, 200, 1001 * MS));
        let changes = t.apply(&fork(200, 1, 9000 * MS));
        assert_eq!(
            changes,
            vec![
                Change::Orphaned {
                    pid: 201,
                    old_parent: 200
                },
                Change::Forked { pid: 200 }
            ]
        );
        assert_eq!(t.stats.missed_exits, 1);
        assert_eq!(t.alive(200).unwrap().parent, 1);
    }

    #[test]
    fn exit_of_a_newer_process_with_a_stale_entry() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        // The kernel reports the death of a *newer* pid 200 whose fork we have not seen.
        assert!(t.apply(&exit(200, 9000 * MS, 9500 * MS)).is_empty());
        assert!(t.alive(200).is_none());
        let changes = t.apply(&fork(200, 1, 9000 * MS + 1_000));
        assert_eq!(
            changes,
            vec![Change::Forked { pid: 200 }, Change::Exited { pid: 200 }]
        );
    }

    #[test]
    fn duplicate_exit_is_counted_once() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.apply(&exit(200, 1000 * MS, 1100 * MS));
        assert!(t.apply(&exit(200, 1000 * MS, 1100 * MS)).is_empty());
        assert_eq!(t.stats.duplicate_exits, 1);
    }

    #[test]
    fn seed_does_not_override_event_state() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.seed([info(200, 100, 1000 * MS + 4 * MS)]);
        assert_eq!(&*t.alive(200).unwrap().comm, "w", "kept the event's entry");
    }

    #[test]
    fn exec_updates_identity_and_adopts_unknown_processes() {
        let mut t = seeded();
        let ev = Event::Exec(Exec {
            ts_ns: 2000 * MS,
            pid: 500,
            ppid: Some(100),
            start_ns: Some(1990 * MS),
            comm: "python3".into(),
            euid: None,
            filename: "/usr/bin/python3".into(),
            argv: vec!["python3".into(), "-m".into(), "x".into()],
            argv_incomplete: false,
        });
        assert_eq!(t.apply(&ev), vec![Change::Execed { pid: 500 }]);
        let p = t.alive(500).unwrap();
        assert_eq!(p.cmdline(), "python3 -m x");
        assert_eq!(p.parent, 100);
        assert!(t.alive(100).unwrap().children.contains(&500));

        let mut strict = Table::new(false);
        assert!(strict.apply(&ev).is_empty());
        assert!(strict.alive(500).is_none());
    }

    #[test]
    fn expire_drops_old_exited_entries_only() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.apply(&exit(200, 1000 * MS, 1100 * MS));
        t.expire(1100 * MS + EXITED_GRACE_NS - 1);
        assert!(t.get(200).is_some());
        t.expire(1100 * MS + EXITED_GRACE_NS);
        assert!(t.get(200).is_none());
        assert!(t.get(100).is_some());
    }

    #[test]
    fn threads_are_counted_per_process() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        let th = |started| {
            Event::Thread(Thread {
                ts_ns: 1001 * MS,
                tid: 201,
                pid: 200,
                started,
            })
        };
        assert_eq!(
            t.apply(&th(true)),
            vec![Change::ThreadStarted { pid: 200, tid: 201 }]
        );
        assert_eq!(t.alive(200).unwrap().threads, 2);
        assert!(t.apply(&th(false)).is_empty());
        assert!(t.apply(&th(false)).is_empty());
        assert_eq!(
            t.alive(200).unwrap().threads,
            1,
            "never below the process itself"
        );
    }

    #[test]
    fn service_counts_follow_forks_threads_execs_and_exits() {
        let mut t = seeded();
        t.set_service(100, Some(0), true);
        t.apply(&fork(200, 100, 1000 * MS));
        let th = Event::Thread(Thread {
            ts_ns: 1001 * MS,
            tid: 201,
            pid: 200,
            started: true,
        });
        t.apply(&th);
        t.apply(&th);
        assert_eq!(
            t.service_count(0),
            ServiceCount {
                processes: 2,
                tasks: 4
            }
        );
        t.apply(&Event::Exec(Exec {
            ts_ns: 1002 * MS,
            pid: 200,
            ppid: Some(100),
            start_ns: None,
            comm: "x".into(),
            euid: None,
            filename: "/bin/x".into(),
            argv: vec![],
            argv_incomplete: false,
        }));
        assert_eq!(t.service_count(0).tasks, 2, "exec leaves one thread");
        t.apply(&exit(200, 1000 * MS, 1100 * MS));
        assert_eq!(
            t.service_count(0),
            ServiceCount {
                processes: 1,
                tasks: 1
            }
        );
        t.set_service(100, None, false);
        assert_eq!(t.service_count(0), ServiceCount::default());
    }

    #[test]
    fn descendants_walks_the_tree() {
        let mut t = seeded();
        t.apply(&fork(200, 100, 1000 * MS));
        t.apply(&fork(300, 200, 1001 * MS));
        t.apply(&fork(301, 200, 1002 * MS));
        let mut d = t.descendants(100);
        d.sort();
        assert_eq!(d, vec![200, 300, 301]);
    }
}
