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
    pub kernel_thread: bool,
    pub exe: Option<String>,
    pub argv: Vec<String>,
}

/// Nanoseconds per clock tick (`USER_HZ`), the unit of start times in `/proc/PID/stat`.
pub fn tick_ns() -> u64 {
    static TICK_NS: OnceLock<u64> = OnceLock::new();
    *TICK_NS.get_or_init(|| 1_000_000_000 / procfs::ticks_per_second().max(1))
}

/// A process's parent and start time, from `/proc/PID/stat` alone (cheap), zombies included.
pub fn parent_and_start(pid: u32) -> Option<(u32, u64)> {
    let stat = Process::new(pid as i32).ok()?.stat().ok()?;
    Some((stat.ppid.max(0) as u32, stat.starttime * tick_ns()))
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
            proc.exe().ok().map(|p| p.to_string_lossy().into_owned()),
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
        kernel_thread,
        exe,
        argv,
    })
}

/// The command line of a live process.
pub fn argv(pid: u32) -> Option<Vec<String>> {
    Process::new(pid as i32).ok()?.cmdline().ok()
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
        let (ppid, start) = parent_and_start(me).unwrap();
        assert_eq!((ppid, start), (info.ppid, info.start_ns));
    }
}
