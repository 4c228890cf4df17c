//! Loading and attaching the eBPF program.

use std::{collections::BTreeSet, io};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use guardian_common::{
    exec_key, Config, ExecKey, Stat, CONFIG_GLOBAL, EVENTS_BYTES, EVENTS_MAP, EXEC_FILTER_MAP,
    EXEC_KEYS_CAPACITY, EXEC_KEYS_MAP, OFFSET_NONE, READER_MAP, STATS_MAP, TRACKED_CAPACITY,
    TRACKED_MAP,
};
use tracing::{debug, info, warn};

use crate::{kernel::btf::KernelBtf, kernel::tracefs};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time. Empty when
/// the daemon was built without it (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guardian-ebpf.o"));

/// The tracepoints guardian attaches to: (program name, category, tracepoint).
const PROBES: [(&str, &str, &str); 3] = [
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];
/// Attached only when guardian acts on orphans (not under `guardian trace`, which reports every
/// exit anyway): the SIGKILL of a parent, so that its children are acted on before its exit.
const SIGNAL_PROBE: (&str, &str, &str) = ("signal_generate", "signal", "signal_generate");
/// Set (to anything) to leave [`SIGNAL_PROBE`] out: orphans are then acted on at their parent's
/// exit only. For benchmarking (`cargo xtask bench orphans` compares both); not for operators.
pub const EXIT_PATH_ONLY_ENV: &str = "GUARDIAN_BENCH_EXIT_PATH_ONLY";

/// Where the death of a whole thread group is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupDeadSource {
    /// The `group_dead` field of `sched_process_exit` (Linux 6.16 and later).
    Tracepoint,
    /// `task->signal->live`, located through BTF (older kernels).
    SignalLive,
}

impl GroupDeadSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tracepoint => "tracepoint",
            Self::SignalLive => "signal_live",
        }
    }
}

/// Options for [`Probes::load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Report every process, not only tracked ones (and their descendants).
    pub track_all: bool,
    /// Report thread starts and ends of tracked processes.
    pub track_threads: bool,
}

/// The loaded, attached program and its maps. Dropping it detaches everything.
pub struct Probes {
    // Field order matters for drop: maps and logger go before the programs' owner.
    pub events: Option<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    tracked: HashMap<MapData, u32, u32>,
    exec_filter: Array<MapData, u32>,
    exec_keys: HashMap<MapData, ExecKey, u32>,
    /// Whether the program can read an exec's effective uid (BTF located `real_cred->euid`).
    reads_euid: bool,
    reader: Array<MapData, u32>,
    /// What the [`guardian_common::reader`] slots hold (a bit each), so that telling the kernel
    /// side what it already knows costs no system call.
    reader_bits: u32,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub group_dead: GroupDeadSource,
    pub sizes: MapSizes,
    _ebpf: Ebpf,
}

/// Most processes the kernel side follows, whatever `pid_max` says. The map is preallocated
/// (about 48 bytes an entry; 6 MiB at this bound); a host with more live members than this has
/// the rest followed from `/proc` (see [`Probes::track`]).
pub const TRACKED_MAX: u32 = 131_072;
/// Environment variable that sets the ring buffer's size in bytes (a power of two, at least a
/// page): larger for hosts with bursts of execs, tiny to provoke loss in tests.
pub const RING_BYTES_ENV: &str = "GUARDIAN_RING_BYTES";
/// The ring buffer's default size when only the services' members are followed (bytes). Its
/// records are their forks and exits and the host's execs (each of which wakes the reader at
/// once): 1 MiB holds about 1,200 execs or 14,000 forks and exits between two drains. The ring
/// is mapped twice over into guardian (records wrap around), so its size counts twice in
/// guardian's resident memory. `guardian trace`, which follows every process, keeps
/// [`EVENTS_BYTES`].
pub const MEMBERS_RING_BYTES: u32 = 1 << 20;
/// Environment variable that sets how many processes the kernel side can follow (from 64 to
/// 4194304): beyond [`TRACKED_MAX`] on hosts with more members than that, or tiny to provoke a
/// full map in tests.
pub const TRACKED_ENTRIES_ENV: &str = "GUARDIAN_TRACKED_ENTRIES";

/// The sizes of the kernel maps, decided at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Entries of the tracked-process map: one per followed process. It follows `pid_max` (no
    /// host can have more live processes than pids) up to [`TRACKED_MAX`].
    pub tracked: u32,
    pub ring_bytes: u32,
}

impl MapSizes {
    fn for_this_host(opts: LoadOptions) -> anyhow::Result<Self> {
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(TRACKED_CAPACITY);
        let ring_bytes = match std::env::var(RING_BYTES_ENV) {
            Ok(v) => parse_ring_bytes(&v).with_context(|| format!("{RING_BYTES_ENV}={v:?}"))?,
            Err(_) if opts.track_all => EVENTS_BYTES,
            Err(_) => MEMBERS_RING_BYTES,
        };
        let tracked = match std::env::var(TRACKED_ENTRIES_ENV) {
            Ok(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (64..=4 << 20).contains(n))
                .with_context(|| {
                    format!("{TRACKED_ENTRIES_ENV}={v:?}: a number from 64 to 4194304")
                })?,
            Err(_) => pid_max.clamp(1024, TRACKED_MAX),
        };
        Ok(Self {
            tracked,
            ring_bytes,
        })
    }
}

/// A ring buffer size: a power of two, at least one page, at most 1 GiB.
fn parse_ring_bytes(v: &str) -> anyhow::Result<u32> {
    let n: u32 = v
        .trim()
        .parse()
        .context("the ring buffer size is a number of bytes")?;
    let page = rustix::param::page_size() as u32;
    if !n.is_power_of_two() || n < page || n > 1 << 30 {
        bail!("the ring buffer size must be a power of two from {page} to 1073741824 bytes");
    }
    Ok(n)
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub ringbuf_full: u64,
    pub tracked_full: u64,
    pub bad_field: u64,
    pub exec_filtered: u64,
}

impl Probes {
    pub fn load(opts: LoadOptions) -> anyhow::Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this guardian binary was built without its eBPF program; run \
                 `cargo xtask build-ebpf` and rebuild (or use `cargo xtask build`)"
            );
        }
        raise_memlock();
        let (mut config, group_dead) = kernel_config(opts)?;
        let sizes = MapSizes::for_this_host(opts)?;
        config.ring_wake_bytes = sizes.ring_bytes / 4;
        debug!(?config, ?sizes, "kernel configuration and map sizes");
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
            .map_max_entries(TRACKED_MAP, sizes.tracked)
            .map_max_entries(EVENTS_MAP, sizes.ring_bytes)
            .load(OBJECT)
            .map_err(|e| explain(anyhow::Error::new(e)))
            .context("loading the eBPF object")?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("kernel-side diagnostics unavailable: {e}");
                None
            }
        };

        let signal = (config.signal_sig != OFFSET_NONE).then_some(SIGNAL_PROBE);
        for (name, category, tp) in PROBES.into_iter().chain(signal) {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program `{name}` missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .map_err(|e| explain(anyhow::Error::new(e)))
                .with_context(|| format!("loading program `{name}` (verifier)"))?;
            prog.attach(category, tp)
                .map_err(|e| explain(anyhow::Error::new(e)))
                .with_context(|| format!("attaching to tracepoint `{category}:{tp}`"))?;
        }

        let events = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).context("no EVENTS map")?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(STATS_MAP).context("no STATS map")?)?;
        let tracked = HashMap::try_from(ebpf.take_map(TRACKED_MAP).context("no TRACKED map")?)?;
        let exec_filter = Array::try_from(
            ebpf.take_map(EXEC_FILTER_MAP)
                .context("no EXEC_FILTER map")?,
        )?;
        let exec_keys =
            HashMap::try_from(ebpf.take_map(EXEC_KEYS_MAP).context("no EXEC_KEYS map")?)?;
        let reader = Array::try_from(ebpf.take_map(READER_MAP).context("no READER map")?)?;
        info!(
            group_dead = group_dead.as_str(),
            parents_sigkill = signal.is_some(),
            tracked_capacity = sizes.tracked,
            ring_bytes = sizes.ring_bytes,
            "eBPF probes attached"
        );
        Ok(Self {
            events: Some(events),
            stats,
            tracked,
            exec_filter,
            exec_keys,
            reads_euid: config.task_real_cred != OFFSET_NONE && config.cred_euid != OFFSET_NONE,
            reader,
            reader_bits: 0,
            logger,
            group_dead,
            sizes,
            _ebpf: ebpf,
        })
    }

    /// Marks a process as tracked in the kernel (its forks and exit are reported, and so are
    /// its future descendants'), with [`guardian_common::tracked_flags`]. Fails when the map is
    /// full: the caller follows the process from `/proc` instead.
    pub fn track(&mut self, pid: u32, flags: u32) -> Result<(), aya::maps::MapError> {
        self.tracked.insert(pid, flags, 0)
    }

    /// Sets one of the flags the kernel side reads ([`guardian_common::reader`]).
    pub fn set_reader(&mut self, slot: u32, on: bool) -> Result<(), aya::maps::MapError> {
        let bit = 1 << slot;
        if (self.reader_bits & bit != 0) == on {
            return Ok(());
        }
        self.reader.set(slot, u32::from(on), 0)?;
        self.reader_bits ^= bit;
        Ok(())
    }

    /// Stops tracking a pid (a process that died before the kernel could see its exit).
    pub fn untrack(&mut self, pid: u32) {
        let _ = self.tracked.remove(&pid);
    }

    /// The pids tracked in the kernel now.
    pub fn tracked_pids(&self) -> Vec<u32> {
        self.tracked.keys().filter_map(Result::ok).collect()
    }

    /// Puts an exec filter in force. `Some(keys)`: an exec of a process that is not tracked is
    /// reported only if its effective uid and new `comm` match a key (no key: none is); `None`:
    /// every exec is reported. New keys go in before stale ones go out, so that what is
    /// reported meanwhile is a superset of both filters. On failure the filter is off.
    pub fn set_exec_filter(&mut self, keys: Option<&BTreeSet<ExecKey>>) -> anyhow::Result<()> {
        let Some(keys) = keys else {
            self.exec_filter_off()?;
            return Ok(());
        };
        let result = self.put_exec_keys(keys);
        if result.is_err() {
            self.exec_filter_off()?;
        }
        result
    }

    fn put_exec_keys(&mut self, keys: &BTreeSet<ExecKey>) -> anyhow::Result<()> {
        if keys.len() > EXEC_KEYS_CAPACITY as usize {
            bail!(
                "{} exec filter keys, more than the kernel's map holds ({EXEC_KEYS_CAPACITY})",
                keys.len()
            );
        }
        if !self.reads_euid && keys.iter().any(|k| k.fields & exec_key::UID != 0) {
            bail!("the program cannot read an exec's effective uid without kernel BTF");
        }
        for key in keys {
            self.exec_keys
                .insert(key, 0, 0)
                .context("adding an exec filter key")?;
        }
        for key in self.exec_keys_in_kernel() {
            if !keys.contains(&key) {
                let _ = self.exec_keys.remove(&key);
            }
        }
        self.exec_filter
            .set(0, 1, 0)
            .context("turning the exec filter on")?;
        Ok(())
    }

    fn exec_filter_off(&mut self) -> anyhow::Result<()> {
        self.exec_filter
            .set(0, 0, 0)
            .context("turning the exec filter off")?;
        for key in self.exec_keys_in_kernel() {
            let _ = self.exec_keys.remove(&key);
        }
        Ok(())
    }

    /// Whether the exec filter is in force (read back from the kernel's map).
    pub fn exec_filter_on(&self) -> bool {
        self.exec_filter.get(&0, 0).is_ok_and(|on| on != 0)
    }

    /// The keys the kernel's exec filter map holds (read back, so that a filter that failed
    /// half-way in is removed whole).
    fn exec_keys_in_kernel(&self) -> Vec<ExecKey> {
        self.exec_keys.keys().filter_map(Result::ok).collect()
    }

    /// Reads the kernel-side counters.
    pub fn kernel_stats(&self) -> KernelStats {
        let sum = |stat: Stat| -> u64 {
            self.stats
                .get(&(stat as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        KernelStats {
            ringbuf_full: sum(Stat::RingbufFull),
            tracked_full: sum(Stat::TrackedFull),
            bad_field: sum(Stat::BadField),
            exec_filtered: sum(Stat::ExecFiltered),
        }
    }
}

/// Builds the program's configuration from this kernel's tracepoint formats and BTF.
fn kernel_config(opts: LoadOptions) -> anyhow::Result<(Config, GroupDeadSource)> {
    let root = tracefs::tracefs_root()?;
    let newtask = tracefs::read_format(&root, "task", "task_newtask")?;
    let exec = tracefs::read_format(&root, "sched", "sched_process_exec")?;
    let exit = tracefs::read_format(&root, "sched", "sched_process_exit")?;

    let mut c = Config::unset();
    c.self_tgid = std::process::id();
    c.track_all = u32::from(opts.track_all);
    c.track_threads = u32::from(opts.track_threads);
    c.newtask_pid = newtask.offset("pid", 4)?;
    c.newtask_comm = newtask.offset("comm", 16)?;
    c.newtask_clone_flags = newtask.offset("clone_flags", 8)?;
    c.exec_filename = exec.offset("filename", 4)?;
    c.exec_old_pid = exec.offset("old_pid", 4)?;
    c.exit_group_dead = match exit.optional("group_dead") {
        Some(f) if f.size == 1 => f.offset,
        _ => OFFSET_NONE,
    };
    if !opts.track_all && std::env::var_os(EXIT_PATH_ONLY_ENV).is_none() {
        let signal = tracefs::read_format(&root, "signal", "signal_generate")?;
        c.signal_sig = signal.offset("sig", 4)?;
        c.signal_pid = signal.offset("pid", 4)?;
        c.signal_result = signal.offset("result", 4)?;
    }

    let btf = KernelBtf::load();
    match &btf {
        Ok(btf) => {
            let opt = |ty: &str, members: &[&str], slot: &mut u32| match btf
                .first_member_offset(ty, members)
            {
                Ok(off) => *slot = off,
                Err(e) => warn!("{e}; the data it provides will be missing"),
            };
            opt("task_struct", &["exit_code"], &mut c.task_exit_code);
            opt(
                "task_struct",
                &["start_boottime", "real_start_time"],
                &mut c.task_start_boottime,
            );
            opt("task_struct", &["mm"], &mut c.task_mm);
            opt("task_struct", &["signal"], &mut c.task_signal);
            opt("task_struct", &["real_parent"], &mut c.task_real_parent);
            opt("task_struct", &["tgid"], &mut c.task_tgid);
            opt("task_struct", &["group_leader"], &mut c.task_group_leader);
            opt("mm_struct", &["arg_start"], &mut c.mm_arg_start);
            opt("mm_struct", &["arg_end"], &mut c.mm_arg_end);
            opt("signal_struct", &["live"], &mut c.signal_live);
            opt("task_struct", &["real_cred"], &mut c.task_real_cred);
            opt("cred", &["euid"], &mut c.cred_euid);
        }
        Err(e) => {
            warn!(
                "{e}; exit codes, exact start times, exec command lines and the exec filter's \
                 uids will be missing"
            )
        }
    }

    let source = if c.exit_group_dead != OFFSET_NONE {
        GroupDeadSource::Tracepoint
    } else if c.task_signal != OFFSET_NONE && c.signal_live != OFFSET_NONE {
        GroupDeadSource::SignalLive
    } else {
        bail!(
            "cannot tell when a process (not just a thread) exits on this kernel: \
             `sched_process_exit` has no `group_dead` field and kernel BTF ({}) is unavailable",
            crate::kernel::btf::VMLINUX_BTF
        );
    };
    Ok((c, source))
}

/// Lifts the locked-memory limit: kernels before 5.11 charge BPF maps against it.
fn raise_memlock() {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(e) = setrlimit(Resource::Memlock, unlimited) {
        debug!("could not lift RLIMIT_MEMLOCK: {e}");
    }
}

/// Adds the usual cause to well-known load failures.
fn explain(err: anyhow::Error) -> anyhow::Error {
    let os = err
        .chain()
        .find_map(|e| e.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error);
    let hint = match os {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "permission denied: run guardian as root (or with CAP_BPF, CAP_PERFMON and \
             CAP_SYS_ADMIN); check `kernel.unprivileged_bpf_disabled` and lockdown"
        }
        Some(libc::ENOENT) => {
            "a tracepoint is missing: is CONFIG_FTRACE enabled and tracefs mounted?"
        }
        Some(libc::E2BIG) | Some(libc::EINVAL) => {
            "the kernel rejected the program or a map: it may be too old (guardian needs Linux \
             5.8+ for the BPF ring buffer)"
        }
        _ => return err,
    };
    err.context(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_are_checked() {
        assert_eq!(parse_ring_bytes("16384").unwrap(), 16384);
        assert!(parse_ring_bytes("1000").is_err(), "not a power of two");
        assert!(parse_ring_bytes("1024").is_err(), "below a page");
        assert!(parse_ring_bytes("4G").is_err());
        assert!(parse_ring_bytes(&(2u64 << 30).to_string()).is_err());
    }
}
