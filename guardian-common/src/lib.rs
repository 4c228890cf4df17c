//! Types shared by guardian's eBPF program and its daemon.
//!
//! Every record the kernel side writes to the ring buffer starts with an [`EventHeader`]; the
//! header's `kind` says which payload struct follows. All structs are `#[repr(C)]` with explicit
//! padding so that both sides agree on the layout byte for byte, and the sizes are pinned by
//! `const` assertions below.
#![no_std]

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of the executable path captured at exec. Longer paths are truncated.
pub const FILENAME_LEN: usize = 256;
/// Bytes of the command line (NUL-separated argv) captured at exec. Longer command lines are
/// truncated by the kernel side and completed from `/proc` by the daemon.
pub const ARGS_LEN: usize = 512;

/// Name of the ring buffer map.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU statistics map (indexed by [`Stat`]).
pub const STATS_MAP: &str = "STATS";
/// Name of the map of tracked thread-group ids.
pub const TRACKED_MAP: &str = "TRACKED";
/// Name of the array of flags the daemon sets for the kernel side (see [`reader`]).
pub const READER_MAP: &str = "READER";

/// Slots of [`READER_MAP`], each 0 or 1.
pub mod reader {
    /// The daemon does not collect records on its short timer (nothing came for a while):
    /// every record wakes it.
    pub const IDLE: u32 = 0;
    /// A service whose tasks the daemon counts is close to its `tasks_max`: the forks of its
    /// members (flagged [`super::tracked_flags::TASKS_COUNTED`]) wake the daemon, which kills
    /// a fork over the budget at once.
    pub const NEAR_TASKS_MAX: u32 = 1;
    /// Number of slots.
    pub const SLOTS: u32 = 2;
}
/// Name of the [`Config`] global.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the one-slot array that turns the exec filter on (1) or off (0, every exec reported).
pub const EXEC_FILTER_MAP: &str = "EXEC_FILTER";
/// Name of the map of [`ExecKey`]s: with the filter on, an exec of a process that is not
/// tracked is reported only if it matches one of them.
pub const EXEC_KEYS_MAP: &str = "EXEC_KEYS";
/// Capacity of [`EXEC_KEYS_MAP`]: one key per service at most. The daemon turns the filter off
/// rather than leave a service out.
pub const EXEC_KEYS_CAPACITY: u32 = 1024;
/// Capacity [`TRACKED_MAP`] is built with; the loader sizes it to the host's `pid_max` (within
/// bounds) before loading. A full map is counted in [`Stat::TrackedFull`].
pub const TRACKED_CAPACITY: u32 = 65_536;
/// Default size of the event ring buffer in bytes (a power of two, a multiple of the page size);
/// the loader may set another.
pub const EVENTS_BYTES: u32 = 4 << 20;

/// Kind of a ring-buffer record. Numbers are part of the wire format: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Fork = 1,
    Exec = 2,
    Exit = 3,
    Thread = 4,
    Doomed = 5,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Fork),
            2 => Some(Self::Exec),
            3 => Some(Self::Exit),
            4 => Some(Self::Thread),
            5 => Some(Self::Doomed),
            _ => None,
        }
    }
}

/// Counters kept by the kernel side, one slot each in the per-CPU [`STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A record could not be reserved in the ring buffer: the event is lost.
    RingbufFull = 0,
    /// A new process could not be added to [`TRACKED_MAP`]: its events will not be seen.
    TrackedFull = 1,
    /// A tracepoint field did not hold what its format promised (for example an empty
    /// `__data_loc`).
    BadField = 2,
    /// An exec the filter kept in the kernel (not a loss: it matches no service).
    ExecFiltered = 3,
}

/// Number of slots in [`STATS_MAP`].
pub const STAT_COUNT: u32 = 4;

/// Flags in an [`ExitEvent`].
pub mod exit_flags {
    /// The process had children when it died: someone is waiting for this record.
    pub const HAD_CHILDREN: u32 = 1 << 0;
    /// `exit_code` holds the kernel's `task_struct::exit_code`.
    pub const EXIT_CODE_VALID: u32 = 1 << 1;
}

/// Flags in an [`ExecEvent`].
pub mod exec_flags {
    /// The command line did not fit in [`super::ARGS_LEN`] bytes.
    pub const ARGS_TRUNCATED: u32 = 1 << 0;
    /// The command line could not be read at all.
    pub const ARGS_MISSING: u32 = 1 << 1;
    /// `euid` holds the effective uid the exec gave the process.
    pub const EUID_VALID: u32 = 1 << 2;
}

/// Which fields of an [`ExecKey`] an exec must equal.
pub mod exec_key {
    pub const UID: u32 = 1 << 0;
    pub const COMM: u32 = 1 << 1;
}

/// A condition the exec filter checks: the exec's effective uid, its new `comm`, or both (the
/// fields not named in `fields` are zero, so that lookups find the key byte for byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExecKey {
    /// [`exec_key`] bits.
    pub fields: u32,
    /// Effective uid after the exec.
    pub uid: u32,
    /// `comm` after the exec, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// Values of [`TRACKED_MAP`]: bit flags about a tracked thread group.
pub mod tracked_flags {
    /// The process has (or had) at least one child process.
    pub const HAS_CHILDREN: u32 = 1 << 0;
    /// A member of a service whose tasks the daemon counts (its children inherit the flag):
    /// its forks wake the daemon while [`super::reader::NEAR_TASKS_MAX`] is set.
    pub const TASKS_COUNTED: u32 = 1 << 1;
}

/// Header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// Thread id of the task the event is about (the new child for a fork).
    pub pid: u32,
    /// Thread-group id (the process id) of that task.
    pub tgid: u32,
    pub _pad: u32,
    /// When the event happened, in `CLOCK_BOOTTIME` nanoseconds.
    pub ts_ns: u64,
}

/// A new process (never a thread: thread creation is filtered in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// Thread id of the thread that called fork/clone.
    pub creator_pid: u32,
    /// Process id of the caller.
    pub creator_tgid: u32,
    /// Process id of the child's parent: the caller, or with `CLONE_PARENT` the caller's parent
    /// (0 when that could not be read).
    pub parent_tgid: u32,
    pub _pad: u32,
    /// The `clone_flags` the caller passed.
    pub clone_flags: u64,
    /// The child's `comm` (inherited from the parent).
    pub comm: [u8; COMM_LEN],
}

/// A successful exec.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread id that called exec (differs from `header.pid` when a non-leader thread execs).
    pub old_pid: u32,
    /// Process id of the parent, or 0 when unknown.
    pub ppid: u32,
    /// The process's start time (the group leader's `start_boottime`, ns) or 0 when unknown.
    pub start_ns: u64,
    /// [`exec_flags`].
    pub flags: u32,
    /// Bytes of `filename` used, without the terminating NUL.
    pub filename_len: u32,
    /// Bytes of `args` used.
    pub args_len: u32,
    /// Effective uid after the exec (valid with [`exec_flags::EUID_VALID`]).
    pub euid: u32,
    pub comm: [u8; COMM_LEN],
    pub filename: [u8; FILENAME_LEN],
    /// argv, each argument NUL-terminated, as the kernel laid it out on the new stack.
    pub args: [u8; ARGS_LEN],
}

/// The death of a whole thread group (a process). Thread exits are filtered in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// Raw `task_struct::exit_code` of the last thread (valid with `EXIT_CODE_VALID`): the exit
    /// status in bits 8..16, or the killing signal in bits 0..7.
    pub exit_code: u32,
    /// [`exit_flags`].
    pub flags: u32,
    /// The process's start time (the group leader's `start_boottime`, ns) or 0 when unknown.
    pub start_ns: u64,
    /// Process id of the parent at the time of death, or 0 when unknown.
    pub ppid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// A thread of a tracked process started or ended (only sent when [`Config::track_threads`] is
/// set: task budgets counted by guardian itself need them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadEvent {
    /// `pid` is the thread's id, `tgid` its process.
    pub header: EventHeader,
    /// 1 when the thread started, 0 when it ended.
    pub started: u32,
    pub _pad: u32,
}

/// A tracked parent was sent SIGKILL: its death is certain, but its exit (and so its children's
/// reparenting) comes only after its own teardown. `header.pid` and `header.tgid` are the
/// target process; the record is sent when the signal is generated, by whoever sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DoomedEvent {
    pub header: EventHeader,
}

/// Sentinel for an offset that is not available on the running kernel.
pub const OFFSET_NONE: u32 = u32::MAX;

/// Settings the loader writes into the program before loading it.
///
/// Tracepoint field offsets come from tracefs `format` files; kernel struct member offsets come
/// from the running kernel's BTF. Nothing is hard-coded, so one object runs on many kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// guardian's own process id: its events are ignored.
    pub self_tgid: u32,
    /// Non-zero: every process is reported (used by `guardian trace`), and [`TRACKED_MAP`] holds
    /// only processes with children. Zero: only thread groups in [`TRACKED_MAP`] and their
    /// descendants.
    pub track_all: u32,
    /// Non-zero: report thread starts and ends of tracked processes ([`ThreadEvent`]).
    pub track_threads: u32,
    /// A routine record wakes the reader when more than this many bytes wait in the ring (a
    /// quarter of it): between its timed collections, a burst on a large host must not fill it.
    pub ring_wake_bytes: u32,

    /// `task:task_newtask`: `pid`, `comm`, `clone_flags`.
    pub newtask_pid: u32,
    pub newtask_comm: u32,
    pub newtask_clone_flags: u32,
    /// `sched:sched_process_exec`: `filename` (`__data_loc`), `old_pid`.
    pub exec_filename: u32,
    pub exec_old_pid: u32,
    /// `sched:sched_process_exit`: `group_dead`, or [`OFFSET_NONE`] on kernels without it.
    pub exit_group_dead: u32,

    /// `signal:signal_generate`: `sig`, `pid` (the target thread), `result`; [`OFFSET_NONE`]
    /// when the program is not attached.
    pub signal_sig: u32,
    pub signal_pid: u32,
    pub signal_result: u32,

    /// `task_struct` members (from BTF).
    pub task_exit_code: u32,
    pub task_start_boottime: u32,
    pub task_mm: u32,
    pub task_signal: u32,
    /// `task_struct::real_parent` and `task_struct::tgid`: who the parent is.
    pub task_real_parent: u32,
    pub task_tgid: u32,
    /// `task_struct::group_leader`: a process's start time is its leader's.
    pub task_group_leader: u32,
    /// `mm_struct::arg_start`, `mm_struct::arg_end`.
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// `signal_struct::live` (an `atomic_t`): zero once the whole group is dying. Used to tell a
    /// group's death where the tracepoint has no `group_dead` field.
    pub signal_live: u32,
    /// `task_struct::real_cred` and `cred::euid`: the effective uid, as `/proc` shows it.
    pub task_real_cred: u32,
    pub cred_euid: u32,
}

impl Config {
    /// A configuration with every offset unset.
    pub const fn unset() -> Self {
        Self {
            self_tgid: 0,
            track_all: 0,
            track_threads: 0,
            ring_wake_bytes: u32::MAX,
            newtask_pid: OFFSET_NONE,
            newtask_comm: OFFSET_NONE,
            newtask_clone_flags: OFFSET_NONE,
            exec_filename: OFFSET_NONE,
            exec_old_pid: OFFSET_NONE,
            exit_group_dead: OFFSET_NONE,
            signal_sig: OFFSET_NONE,
            signal_pid: OFFSET_NONE,
            signal_result: OFFSET_NONE,
            task_exit_code: OFFSET_NONE,
            task_start_boottime: OFFSET_NONE,
            task_mm: OFFSET_NONE,
            task_signal: OFFSET_NONE,
            mm_arg_start: OFFSET_NONE,
            mm_arg_end: OFFSET_NONE,
            signal_live: OFFSET_NONE,
            task_real_parent: OFFSET_NONE,
            task_tgid: OFFSET_NONE,
            task_group_leader: OFFSET_NONE,
            task_real_cred: OFFSET_NONE,
            cred_euid: OFFSET_NONE,
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<EventHeader>() == 24);
    assert!(core::mem::size_of::<ForkEvent>() == 24 + 16 + 8 + COMM_LEN);
    assert!(core::mem::size_of::<ExecEvent>() == 24 + 32 + COMM_LEN + FILENAME_LEN + ARGS_LEN);
    assert!(core::mem::size_of::<ExitEvent>() == 24 + 24 + COMM_LEN);
    assert!(core::mem::size_of::<ThreadEvent>() == 24 + 8);
    assert!(core::mem::size_of::<DoomedEvent>() == 24);
    assert!(core::mem::size_of::<Config>() == 25 * 4);
    assert!(core::mem::size_of::<ExecKey>() == 8 + COMM_LEN);
    assert!(core::mem::align_of::<ExecEvent>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data structs with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExecKey {}
}
