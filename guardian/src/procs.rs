//! What guardian reads from `/proc`: the starting process table, and confirmations (a process's
//! current parent and start time) that the kernel events do not carry.

use std::sync::OnceLock;

use procfs::process::Process;

/// `PF_KTHREAD` in `/proc/PID/stat` flags.
const PF_KTHREAD: u32 = 0x0020_0000;

/// A process as `/proc` shows it.
#[derive(Clone, Debug)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Start time in `CLOCK_BOOTTIME` nanoseconds (clock-tick resolution).
    pub start_ns: u64,
    pub comm: String,
    /// `Z` for a zombie, `X` for dead, and so on.
    pub state: char,
    pub threads: i64,
    /// Process group id.
    pub pgid: u32,
    pub kernel_thread: bool,
    pub exe: Option<String>,
    pub argv: Vec<String>,
}

/// Nanoseconds per clock tick (`USER_HZ`), the unit of start times in `/proc/PID/stat`.
pub fn tick_ns() -> u64 {
    static TICK_NS: OnceLock<u64> = OnceLock::new();
    *TICK_NS.get_or_init(|| 1_000_000_000 / procfs::ticks_per_second().max(1))
}

/// What `/proc/PID/stat` alone says of a process (one cheap read; zombies included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ppid: u32,
    /// Start time in `CLOCK_BOOTTIME` nanoseconds (clock-tick resolution).
    pub start_ns: u64,
    pub comm: String,
    pub kernel_thread: bool,
    /// Dead, waiting to be reaped: its memory and files are released.
    pub zombie: bool,
}

impl From<procfs::process::Stat> for Stat {
    fn from(st: procfs::process::Stat) -> Self {
        Self {
            ppid: st.ppid.max(0) as u32,
            start_ns: st.starttime * tick_ns(),
            kernel_thread: st.flags & PF_KTHREAD != 0,
            zombie: matches!(st.state, 'Z' | 'X'),
            comm: st.comm,
        }
    }
}

pub fn stat(pid: u32) -> Option<Stat> {
    Some(Process::new(pid as i32).ok()?.stat().ok()?.into())
}

/// Everything guardian keeps about a process.
pub fn read(pid: u32) -> Option<ProcInfo> {
    let proc = Process::new(pid as i32).ok()?;
    let stat = proc.stat().ok()?;
    let kernel_thread = stat.flags & PF_KTHREAD != 0;
    let (exe, argv) = if kernel_thread {
        (None, Vec::new())
    } else {
        (
            proc.exe()
                .ok()
                .map(|p| strip_deleted(p.to_string_lossy().into_owned())),
            proc.cmdline().unwrap_or_default(),
        )
    };
    Some(ProcInfo {
        pid,
        ppid: stat.ppid.max(0) as u32,
        start_ns: stat.starttime * tick_ns(),
        comm: stat.comm,
        state: stat.state,
        threads: stat.num_threads,
        pgid: stat.pgrp.max(0) as u32,
        kernel_thread,
        exe,
        argv,
    })
}

/// How much later than its true start a fork event may be stamped (ns): `copy_process()` sets the
/// start time, and the tracepoint fires at its end — tens of milliseconds later when the vCPU is
/// descheduled in between (seen under CPU steal: a live orphan refused as "pid reused" at 10 ms).
/// Generous on purpose: this bound only rejects a `/proc` process *older* than the table's,
/// which pid uniqueness already rules out; a later holder of the pid fails the other bound.
pub const FORK_EVENT_SLACK_NS: u64 = 1_000_000_000;
/// Clock disagreement tolerated between the kernel's stamps (ns).
const CLOCK_SLACK_NS: u64 = 1_000;

/// Whether a `/proc` start time is that of the process the table knows. `/proc` gives a start to
/// the clock tick, rounded down; the table holds it exactly (kernel BTF), from the fork event (a
/// little late), or from `/proc` itself. The same process therefore reads within
/// `[proc, proc + tick + slack)`, and a later holder of the pid, started after the table's
/// process, fails unless it started within that same tick. (A pid comes back only after the
/// kernel has handed out every other one, which takes far longer than that, unless root
/// steers the allocation.)
pub fn same_process(table_ns: u64, proc_ns: u64) -> bool {
    proc_ns <= table_ns + CLOCK_SLACK_NS && table_ns < proc_ns + tick_ns() + FORK_EVENT_SLACK_NS
}

/// A process opened through its `/proc/PID` directory and checked to be the one guardian knows
/// (same start time). Every later read goes through that directory, which the kernel ties to the
/// process: once the process is gone the reads fail, even if its pid has been reused, so nothing
/// read here can belong to another process.
#[derive(Debug)]
pub struct Pinned {
    proc: Process,
    pub pid: u32,
    pub stat: Stat,
}

/// The outcome of [`Pinned::open`].
#[derive(Debug)]
pub enum Pin {
    Ok(Pinned),
    /// No such process (or it has exited).
    Gone,
    /// The pid belongs to another process now.
    Reused,
    /// `/proc` could not be read for another reason (out of file descriptors or memory): the
    /// process may well be there, so this is worth retrying.
    Failed(std::io::Error),
}

/// A `/proc` read error that says nothing about the process (the reader is short of file
/// descriptors or memory), as opposed to the process being gone.
fn resource_error(e: &procfs::ProcError) -> Option<std::io::Error> {
    match e {
        procfs::ProcError::Io(io, _)
            if matches!(
                io.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN)
            ) =>
        {
            Some(std::io::Error::from_raw_os_error(io.raw_os_error()?))
        }
        _ => None,
    }
}

impl Pinned {
    /// Opens `pid`; with `start_ns`, checks that it is still the process that started then.
    pub fn open(pid: u32, start_ns: Option<u64>) -> Pin {
        let proc = match Process::new(pid as i32) {
            Ok(p) => p,
            Err(e) => return resource_error(&e).map_or(Pin::Gone, Pin::Failed),
        };
        let st = match proc.stat() {
            Ok(st) => st,
            Err(e) => return resource_error(&e).map_or(Pin::Gone, Pin::Failed),
        };
        let stat = Stat::from(st);
        if start_ns.is_some_and(|s| !same_process(s, stat.start_ns)) {
            return Pin::Reused;
        }
        Pin::Ok(Self { proc, pid, stat })
    }

    /// The executable as the kernel resolved it (`/proc/PID/exe`). An executable deleted or
    /// replaced since it was started (a package upgrade) keeps its path, without the kernel's
    /// ` (deleted)` mark.
    pub fn exe(&self) -> Option<String> {
        Some(strip_deleted(
            self.proc.exe().ok()?.to_string_lossy().into_owned(),
        ))
    }

    pub fn argv(&self) -> Option<Vec<String>> {
        self.proc.cmdline().ok()
    }

    /// Effective user id.
    pub fn euid(&self) -> Option<u32> {
        self.proc.status().ok().map(|s| s.euid)
    }

    /// The text of `/proc/PID/cgroup`.
    pub fn cgroup_text(&self) -> Option<String> {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut self.proc.open_relative("cgroup").ok()?, &mut text)
            .ok()?;
        Some(text)
    }

    /// Resident memory in bytes (`/proc/PID/statm`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let statm = self.proc.statm().ok()?;
        Some(statm.resident * rustix::param::page_size() as u64)
    }

    /// Proportional set size in bytes (`Pss` of `/proc/PID/smaps_rollup`, Linux 4.14+): each
    /// page counted divided by the number of processes that map it, so pages a forked worker
    /// shares with its parent count once across them. The kernel walks the page tables to
    /// produce it, which costs far more than [`Self::rss_bytes`].
    pub fn pss_bytes(&self) -> Option<u64> {
        let rollup = self.proc.smaps_rollup().ok()?;
        rollup
            .memory_map_rollup
            .0
            .iter()
            .map(|m| m.extension.map.get("Pss").copied())
            .sum()
    }
}

/// `/proc/PID/exe` of an executable deleted or replaced since it started (a package upgrade)
/// ends in ` (deleted)`: the process still runs that path's program.
fn strip_deleted(path: String) -> String {
    match path.strip_suffix(" (deleted)") {
        Some(p) => p.to_owned(),
        None => path,
    }
}

/// The command line of a live process.
pub fn argv(pid: u32) -> Option<Vec<String>> {
    Process::new(pid as i32).ok()?.cmdline().ok()
}

/// The child processes of `pid` (from `/proc/PID/task/*/children`, or a full scan on kernels
/// without that file).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut kids = Vec::new();
    for task in tasks.filter_map(Result::ok) {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => kids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // CONFIG_PROC_CHILDREN is off: find them by parent.
                return scan_children(pid);
            }
            Err(_) => {}
        }
    }
    kids.sort_unstable();
    kids.dedup();
    kids
}

fn scan_children(pid: u32) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter_map(|p| p.stat().ok())
        .filter(|s| s.ppid == pid as i32)
        .map(|s| s.pid as u32)
        .collect()
}

/// Every process on the host (processes that vanish during the scan are skipped).
pub fn scan() -> Vec<ProcInfo> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(|p| p.ok())
        .filter_map(|p| read(p.pid as u32))
        .collect()
}

/// The inode number of the host's (initial) pid namespace, fixed by the kernel
/// (`PROC_PID_INIT_INO`).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(
        "guardian runs in a pid namespace other than the host's ({ns}): the kernel reports host \
         pids, and this process would read and signal other numbers. Run it on the host, or in a \
         container sharing the host's pid namespace (Kubernetes `hostPID: true`, `docker run \
         --pid=host`)"
    )]
    NotHost { ns: String },
    #[error(
        "/proc belongs to another pid namespace than guardian (it is pid {own}, /proc says \
         {proc}): mount the host's /proc"
    )]
    ForeignProc { own: u32, proc: u32 },
    #[error("cannot read `{path}`")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses to run outside the host's pid namespace, or with a `/proc` of another one.
pub fn check_host_pid_namespace() -> Result<(), NamespaceError> {
    let path = "/proc/self/ns/pid";
    let meta = std::fs::metadata(path).map_err(|source| NamespaceError::Read { path, source })?;
    if std::os::unix::fs::MetadataExt::ino(&meta) != INIT_PID_NS_INO {
        let ns = std::fs::read_link(path)
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("inode {}", std::os::unix::fs::MetadataExt::ino(&meta)));
        return Err(NamespaceError::NotHost { ns });
    }
    let own = std::process::id();
    let proc = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|l| l.to_string_lossy().parse::<u32>().ok())
        .unwrap_or(0);
    if proc != own {
        return Err(NamespaceError::ForeignProc { own, proc });
    }
    Ok(())
}

/// The current `CLOCK_BOOTTIME` in nanoseconds.
pub fn boottime_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let info = read(me).expect("own /proc entry");
        assert_eq!(info.pid, me);
        assert_eq!(info.ppid, std::os::unix::process::parent_id());
        assert!(!info.kernel_thread);
        assert!(info.start_ns <= boottime_ns());
        assert!(!info.argv.is_empty());
        let st = stat(me).unwrap();
        assert_eq!((st.ppid, st.start_ns), (info.ppid, info.start_ns));
        assert_eq!(st.comm, info.comm);
    }

    #[test]
    fn this_test_runs_in_the_host_pid_namespace() {
        // Unit tests run on the host (or in the VM guests' only namespace).
        check_host_pid_namespace().unwrap();
    }

    #[test]
    fn pinned_memory_reads_fail_once_the_process_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let start = stat(child.id()).unwrap().start_ns;
        let Pin::Ok(p) = Pinned::open(child.id(), Some(start)) else {
            panic!("cannot pin a live child")
        };
        let (rss, pss) = (p.rss_bytes().unwrap(), p.pss_bytes().unwrap());
        assert!(pss > 0 && pss <= rss, "pss {pss} rss {rss}");
        let _ = child.kill();
        let _ = child.wait();
        // Reaped: whoever holds the pid next, nothing is read through the old directory.
        assert_eq!((p.rss_bytes(), p.pss_bytes()), (None, None));
    }

    #[test]
    fn lists_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let kids = children_of(std::process::id());
        let scanned = scan_children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(kids.contains(&child.id()), "{kids:?}");
        // The fallback for kernels without /proc/PID/task/*/children finds it too.
        assert!(scanned.contains(&child.id()), "{scanned:?}");
        assert!(
            !children_of(std::process::id()).contains(&child.id()),
            "reaped: no longer a child"
        );
    }
}
