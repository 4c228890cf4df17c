//! Loading and attaching the eBPF program.

use std::io;

use anyhow::{bail, Context as _};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use guardian_common::{
    tracked_flags, Config, Stat, CONFIG_GLOBAL, EVENTS_MAP, OFFSET_NONE, STATS_MAP, TRACKED_MAP,
};
use tracing::{debug, info, warn};

use crate::{kernel_btf::KernelBtf, tracefs};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded at compile time. Empty when
/// the daemon was built without it (see `build.rs`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guardian-ebpf.o"));

/// The tracepoints guardian attaches to: (program name, category, tracepoint).
const PROBES: [(&str, &str, &str); 3] = [
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

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
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub group_dead: GroupDeadSource,
    _ebpf: Ebpf,
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub ringbuf_full: u64,
    pub tracked_full: u64,
    pub bad_field: u64,
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
        let (config, group_dead) = kernel_config(opts)?;
        debug!(?config, "kernel configuration");

        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
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

        for (name, category, tp) in PROBES {
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
        info!(group_dead = group_dead.as_str(), "eBPF probes attached");
        Ok(Self {
            events: Some(events),
            stats,
            tracked,
            logger,
            group_dead,
            _ebpf: ebpf,
        })
    }

    /// Marks a process as tracked in the kernel (its forks and exit are reported, and so are
    /// its future descendants').
    pub fn track(&mut self, pid: u32, has_children: bool) -> anyhow::Result<()> {
        let flags = if has_children {
            tracked_flags::HAS_CHILDREN
        } else {
            0
        };
        self.tracked
            .insert(pid, flags, 0)
            .with_context(|| format!("tracking pid {pid}"))
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
        }
        Err(e) => {
            warn!("{e}; exit codes, exact start times and exec command lines will be missing")
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
            crate::kernel_btf::VMLINUX_BTF
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
