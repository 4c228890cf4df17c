//! guardian's kernel side: process creation, exec, whole-group exit and the SIGKILL of a parent,
//! fed to one ring buffer.
//!
//! Only fixed-format tracepoints are used (fentry/kprobes are not available everywhere). Every
//! field offset comes from the loader through [`CONFIG`]: tracepoint fields from tracefs `format`
//! files, kernel struct members from BTF. Nothing here knows a kernel's layout.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_buf,
        generated::bpf_ktime_get_boot_ns,
    },
    macros::{map, tracepoint},
    maps::{ring_buf::RingBufEntry, Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _, Global,
};
use aya_log_ebpf::warn;
use guardian_common::{
    exec_flags, exec_key, exit_flags, reader, tracked_flags, Config, DoomedEvent, EventHeader,
    EventKind, ExecEvent, ExecKey, ExitEvent, ForkEvent, Stat, ThreadEvent, ARGS_LEN, COMM_LEN,
    EVENTS_BYTES, EXEC_KEYS_CAPACITY, OFFSET_NONE, STAT_COUNT, TRACKED_CAPACITY,
};

/// `CLONE_THREAD` from `include/uapi/linux/sched.h`: the new task joins the caller's group.
const CLONE_THREAD: u64 = 0x0001_0000;
/// `CLONE_PARENT`: the new process becomes its creator's sibling.
const CLONE_PARENT: u64 = 0x0000_8000;
/// The one signal a process can neither catch, block nor ignore.
const SIGKILL: i32 = 9;
/// `signal_generate`'s `result` (`enum trace_signal_result`): the signal was queued, or queued
/// without its siginfo. The others (ignored, already pending, queue overflow) queue nothing.
const TRACE_SIGNAL_DELIVERED: i32 = 0;
const TRACE_SIGNAL_LOSE_INFO: i32 = 4;

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::unset());

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Thread groups whose forks and exits are reported, with [`tracked_flags`].
#[map]
static TRACKED: HashMap<u32, u32> = HashMap::with_max_entries(TRACKED_CAPACITY, 0);

/// Slot 0 is 1 while the exec filter is on. Zero (the default, and `guardian trace`) reports
/// every exec.
#[map]
static EXEC_FILTER: Array<u32> = Array::with_max_entries(1, 0);

/// What an exec of a process that is not tracked must match to be reported while the filter is
/// on (see [`exec_wanted`]).
#[map]
static EXEC_KEYS: HashMap<ExecKey, u32> = HashMap::with_max_entries(EXEC_KEYS_CAPACITY, 0);

/// Flags the daemon sets, one per [`reader`] slot. While records keep coming it collects them on
/// its short timer and routine records are submitted without a wakeup, which costs more than the
/// event; when it idles ([`reader::IDLE`]) every record wakes it.
#[map]
static READER: Array<u32> = Array::with_max_entries(reader::SLOTS, 0);

#[inline(always)]
fn reader_flag(slot: u32) -> bool {
    READER.get(slot).is_some_and(|v| *v != 0)
}

/// Adds one to a counter and returns true the first time it happens on this CPU, so that
/// diagnostics are logged once per CPU and never per event.
#[inline(always)]
fn count(stat: Stat) -> bool {
    match STATS.get_ptr_mut(stat as u32) {
        Some(slot) => unsafe {
            *slot += 1;
            *slot == 1
        },
        None => false,
    }
}

/// Reserves a record, counting (and once per CPU logging) a full ring buffer.
#[inline(always)]
fn reserve<T: 'static>(ctx: &TracePointContext) -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() && count(Stat::RingbufFull) {
        warn!(ctx, "event ring buffer full: events are being lost");
    }
    entry
}

/// Submits a record: an `urgent` one wakes the reader at once, a routine one only when the
/// reader is idle (see [`reader::IDLE`]) or the ring holds more than `cfg.ring_wake_bytes`
/// (a burst between two of the reader's timed collections).
#[inline(always)]
fn submit<T: 'static>(entry: RingBufEntry<T>, urgent: bool, cfg: &Config) {
    if urgent || EVENTS.query(BPF_RB_AVAIL_DATA as u64) > u64::from(cfg.ring_wake_bytes) {
        entry.submit(BPF_RB_FORCE_WAKEUP as u64);
        return;
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    // Read after the commit (a full barrier), while the daemon sets the flag before its last
    // look at the ring: either it saw this record, or the flag is seen here.
    if reader_flag(reader::IDLE) {
        // An empty record carries the wakeup (the reader skips discarded records).
        if let Some(wake) = EVENTS.reserve::<u64>(0) {
            wake.discard(BPF_RB_FORCE_WAKEUP as u64);
        }
    }
}

#[inline(always)]
fn header(kind: EventKind, pid: u32, tgid: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid,
        tgid,
        _pad: 0,
        // SAFETY: the helper has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
    }
}

/// Reads a member of the current task (`task_struct` + `offset`).
#[inline(always)]
fn read_task<T>(offset: u32) -> Option<T> {
    if offset == OFFSET_NONE {
        return None;
    }
    // SAFETY: a probe read of kernel memory; failure is reported, never faults.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        bpf_probe_read_kernel(task.add(offset as usize) as *const T).ok()
    }
}

/// Reads `*(base + offset)` from kernel memory, where `base` itself was read from the kernel.
#[inline(always)]
fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == OFFSET_NONE {
        return None;
    }
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel((base as *const u8).add(offset as usize) as *const T).ok() }
}

/// `current->group_leader->start_boottime`: the process's start, whichever thread is running
/// (`pid_tgid` is current's). The leader itself, the usual case, reads its own: one probe read
/// rather than two, on the path of every exit.
#[inline(always)]
fn process_start(cfg: &Config, pid_tgid: u64) -> Option<u64> {
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 {
        return read_task::<u64>(cfg.task_start_boottime);
    }
    let leader = read_task::<u64>(cfg.task_group_leader)?;
    read_at::<u64>(leader, cfg.task_start_boottime)
}

/// `current->real_parent->tgid`.
#[inline(always)]
fn parent_tgid_of_current(cfg: &Config) -> Option<u32> {
    let parent = read_task::<u64>(cfg.task_real_parent)?;
    read_at::<i32>(parent, cfg.task_tgid).map(|t| t as u32)
}

/// Process creation. `task:task_newtask` fires in the caller's context for every new task and
/// carries `clone_flags`, which is how threads (dropped here, on the fork hot path) are told apart
/// from processes.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx).unwrap_or(0)
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = CONFIG.load();
    // SAFETY: offsets come from this kernel's format file for this tracepoint.
    let clone_flags: u64 = unsafe { ctx.read_at(cfg.newtask_clone_flags as usize)? };
    let pid_tgid = bpf_get_current_pid_tgid();
    if clone_flags & CLONE_THREAD != 0 {
        if cfg.track_threads != 0 {
            let tgid = (pid_tgid >> 32) as u32;
            if tgid != cfg.self_tgid && TRACKED.get_ptr(tgid).is_some() {
                // SAFETY: as above.
                let tid: i32 = unsafe { ctx.read_at(cfg.newtask_pid as usize)? };
                thread_event(ctx, &cfg, tid as u32, tgid, 1);
            }
        }
        return Ok(0);
    }
    let creator = (pid_tgid >> 32) as u32;
    if creator == cfg.self_tgid {
        return Ok(0);
    }
    let creator_entry = TRACKED.get_ptr_mut(creator);
    // SAFETY: a map value pointer, valid while this program runs.
    let creator_flags = creator_entry.map(|f| unsafe { *f });
    if cfg.track_all == 0 && creator_flags.is_none() {
        return Ok(0);
    }
    let counted = creator_flags.unwrap_or(0) & tracked_flags::TASKS_COUNTED;
    // SAFETY: as above.
    let child: i32 = unsafe { ctx.read_at(cfg.newtask_pid as usize)? };
    let child = child as u32;

    let parent = if clone_flags & CLONE_PARENT != 0 {
        parent_tgid_of_current(&cfg).unwrap_or(0)
    } else {
        creator
    };

    // The child inherits tracking (and the counting of its tasks); the parent is now someone
    // whose exit matters. `guardian trace` reports every process anyway: its map only marks
    // parents, which spares the fork and the exit of every childless process a map update.
    if cfg.track_all == 0
        && TRACKED.insert(child, counted, BPF_ANY as u64).is_err()
        && count(Stat::TrackedFull)
    {
        warn!(
            ctx,
            "tracked map full: new processes are no longer followed"
        );
    }
    // Mostly the creator, whose entry was looked up already (inserting another key leaves it
    // in place).
    let parent_entry = if parent == creator {
        creator_entry
    } else {
        TRACKED.get_ptr_mut(parent)
    };
    match parent_entry {
        // Written once: a parent forking again leaves its entry's cache line clean.
        Some(flags) => unsafe {
            if *flags & tracked_flags::HAS_CHILDREN == 0 {
                *flags |= tracked_flags::HAS_CHILDREN
            }
        },
        // Only `guardian trace` follows processes it was not told about. Otherwise the parent
        // of a `CLONE_PARENT` child is nobody guardian follows, and tracking it here would
        // follow all its future children and never be undone.
        None if cfg.track_all != 0 => {
            let _ = TRACKED.insert(parent, tracked_flags::HAS_CHILDREN, BPF_NOEXIST as u64);
        }
        None => {}
    }

    let Some(mut entry) = reserve::<ForkEvent>(ctx) else {
        return Ok(0);
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned record of the right size.
    unsafe {
        (*ev).header = header(EventKind::Fork, child, child);
        (*ev).creator_pid = pid_tgid as u32;
        (*ev).creator_tgid = creator;
        (*ev).parent_tgid = parent;
        (*ev)._pad = 0;
        (*ev).clone_flags = clone_flags;
        (*ev).comm = ctx
            .read_at::<[u8; COMM_LEN]>(cfg.newtask_comm as usize)
            .unwrap_or([0; COMM_LEN]);
    }
    // Close to `tasks_max`, this fork may be the one over it: the daemon kills it at once.
    submit(
        entry,
        counted != 0 && reader_flag(reader::NEAR_TASKS_MAX),
        &cfg,
    );
    Ok(0)
}

/// Exec. `sched:sched_process_exec` fires after the new image and credentials are in place, so
/// the command line can be read from the new stack, and `comm` and the effective uid are the
/// new ones. An exec is how a process becomes a policy's service root; the filter (see
/// [`exec_wanted`]) keeps in the kernel the execs that cannot make one.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    try_sched_process_exec(&ctx).unwrap_or(0)
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.self_tgid {
        return Ok(0);
    }
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    let (euid, euid_flag) = current_euid(&cfg);
    if !exec_wanted(&cfg, tgid, &comm, euid, euid_flag) {
        count(Stat::ExecFiltered);
        return Ok(0);
    }
    let Some(mut entry) = reserve::<ExecEvent>(ctx) else {
        return Ok(0);
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned record; reads are probe reads.
    unsafe {
        (*ev).header = header(EventKind::Exec, pid_tgid as u32, tgid);
        (*ev).old_pid = ctx.read_at::<i32>(cfg.exec_old_pid as usize).unwrap_or(0) as u32;
        (*ev).ppid = parent_tgid_of_current(&cfg).unwrap_or(0);
        (*ev).euid = euid;
        (*ev).start_ns = process_start(&cfg, pid_tgid).unwrap_or(0);
        (*ev).comm = comm;

        // `__data_loc char[] filename`: the low 16 bits are the offset of the string within the
        // record, the high 16 bits its length.
        (*ev).filename_len = 0;
        let loc: u32 = ctx.read_at(cfg.exec_filename as usize).unwrap_or(0);
        let at = (loc & 0xffff) as usize;
        if at == 0 {
            if count(Stat::BadField) {
                warn!(ctx, "sched_process_exec: empty filename __data_loc {}", loc);
            }
        } else if let Ok(name) = bpf_probe_read_kernel_str_bytes(
            (ctx.as_ptr() as *const u8).add(at),
            &mut (*ev).filename,
        ) {
            (*ev).filename_len = name.len() as u32;
        }

        let (len, flags) = read_args(&cfg, &mut (*ev).args);
        (*ev).args_len = len;
        (*ev).flags = flags | euid_flag;
    }
    // An exec can make a service root, which may fork at once: wake the reader so that it starts
    // following the root within microseconds. An exec costs far more than the wakeup.
    submit(entry, true, &cfg);
    Ok(0)
}

/// `current->real_cred->euid`: the effective uid `/proc/PID/status` shows, and
/// [`exec_flags::EUID_VALID`] when it could be read (else `(0, 0)`). Not an `Option`: rustc
/// keeps a `None`'s payload uninitialised on the stack, and the 5.10 verifier refuses any read
/// of an uninitialised stack slot.
#[inline(always)]
fn current_euid(cfg: &Config) -> (u32, u32) {
    match read_task::<u64>(cfg.task_real_cred).and_then(|cred| read_at::<u32>(cred, cfg.cred_euid))
    {
        Some(uid) => (uid, exec_flags::EUID_VALID),
        None => (0, 0),
    }
}

/// Whether an exec is reported. Always for a tracked process (a member that execs may become a
/// root of another service) and while the filter is off (`guardian trace`, or a policy with a
/// service the kernel cannot pre-select). Otherwise only when the exec's effective uid and new
/// `comm` match a key: the daemon derives each service's key from conditions its selector
/// requires, so the execs kept here are ones no service can match.
#[inline(always)]
fn exec_wanted(cfg: &Config, tgid: u32, comm: &[u8; COMM_LEN], uid: u32, euid_flag: u32) -> bool {
    if cfg.track_all != 0
        || EXEC_FILTER.get(0).is_none_or(|&on| on == 0)
        || TRACKED.get_ptr(tgid).is_some()
    {
        return true;
    }
    // An exec whose uid cannot be read cannot be ruled out.
    if euid_flag == 0 {
        return true;
    }
    let mut key = ExecKey {
        fields: exec_key::UID | exec_key::COMM,
        uid,
        comm: *comm,
    };
    if EXEC_KEYS.get_ptr(key).is_some() {
        return true;
    }
    key.fields = exec_key::UID;
    key.comm = [0; COMM_LEN];
    if EXEC_KEYS.get_ptr(key).is_some() {
        return true;
    }
    key = ExecKey {
        fields: exec_key::COMM,
        uid: 0,
        comm: *comm,
    };
    EXEC_KEYS.get_ptr(key).is_some()
}

/// Copies the new image's argv (`mm->arg_start..arg_end`) into `buf`.
#[inline(always)]
fn read_args(cfg: &Config, buf: &mut [u8; ARGS_LEN]) -> (u32, u32) {
    let Some(mm) = read_task::<u64>(cfg.task_mm) else {
        return (0, exec_flags::ARGS_MISSING);
    };
    let (Some(start), Some(end)) = (
        read_at::<u64>(mm, cfg.mm_arg_start),
        read_at::<u64>(mm, cfg.mm_arg_end),
    ) else {
        return (0, exec_flags::ARGS_MISSING);
    };
    if end <= start {
        return (0, exec_flags::ARGS_MISSING);
    }
    let total = end - start;
    let (len, flags) = if total > ARGS_LEN as u64 {
        (ARGS_LEN, exec_flags::ARGS_TRUNCATED)
    } else {
        (total as usize, 0)
    };
    // The verifier needs `len` provably within the buffer; `get_mut` gives it that bound.
    let Some(dst) = buf.get_mut(..len) else {
        return (0, exec_flags::ARGS_MISSING);
    };
    // SAFETY: a probe read of the current task's user memory.
    match unsafe { bpf_probe_read_user_buf(start as *const u8, dst) } {
        Ok(()) => (len as u32, flags),
        Err(_) => (0, exec_flags::ARGS_MISSING),
    }
}

/// Exit. `sched:sched_process_exit` fires for every thread; only the death of a whole thread
/// group is reported, because that is the moment the kernel reparents the group's children.
/// The exit of a process with children is what the daemon waits on, so it wakes the reader.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    try_sched_process_exit(&ctx).unwrap_or(0)
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = CONFIG.load();
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.self_tgid {
        return Ok(0);
    }
    // Untracked processes leave first, before any field is read: every thread exit on the
    // host passes here.
    let tracked = TRACKED.get_ptr(tgid).map(|f| unsafe { *f });
    if cfg.track_all == 0 && tracked.is_none() {
        return Ok(0);
    }
    if !group_dead(ctx, &cfg) {
        if cfg.track_threads != 0 && tracked.is_some() {
            thread_event(ctx, &cfg, pid_tgid as u32, tgid, 0);
        }
        return Ok(0);
    }
    if tracked.is_some() {
        let _ = TRACKED.remove(tgid);
    }
    let had_children = tracked.unwrap_or(0) & tracked_flags::HAS_CHILDREN != 0;

    let Some(mut entry) = reserve::<ExitEvent>(ctx) else {
        return Ok(0);
    };
    let ev = entry.as_mut_ptr();
    let mut flags = if had_children {
        exit_flags::HAD_CHILDREN
    } else {
        0
    };
    let exit_code = match read_task::<i32>(cfg.task_exit_code) {
        Some(code) => {
            flags |= exit_flags::EXIT_CODE_VALID;
            code as u32
        }
        None => 0,
    };
    // SAFETY: `ev` points to a reserved, exclusively owned record.
    unsafe {
        (*ev).header = header(EventKind::Exit, pid_tgid as u32, tgid);
        (*ev).exit_code = exit_code;
        (*ev).flags = flags;
        (*ev).start_ns = process_start(&cfg, pid_tgid).unwrap_or(0);
        (*ev).ppid = parent_tgid_of_current(&cfg).unwrap_or(0);
        (*ev)._pad = 0;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    }
    submit(entry, had_children, &cfg);
    Ok(0)
}

/// SIGKILL to a parent guardian follows. Its exit is reported only once it reaches `do_exit()`,
/// and before Linux 6.16 only after it freed its memory (milliseconds for a large one);
/// reporting the SIGKILL as it is queued lets the daemon act on the orphans-to-be meanwhile.
/// Every signal on the host passes here: all but a queued SIGKILL to a tracked parent leave
/// after two reads.
#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    try_signal_generate(&ctx).unwrap_or(0)
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<u32, i64> {
    let cfg = CONFIG.load();
    // SAFETY: offsets come from this kernel's format file for this tracepoint.
    let sig: i32 = unsafe { ctx.read_at(cfg.signal_sig as usize)? };
    if sig != SIGKILL {
        return Ok(0);
    }
    // SAFETY: as above.
    let result: i32 = unsafe { ctx.read_at(cfg.signal_result as usize)? };
    if result != TRACE_SIGNAL_DELIVERED && result != TRACE_SIGNAL_LOSE_INFO {
        return Ok(0);
    }
    // The thread signalled. `kill()` names a process by its leader, whose id is the process's
    // (the key of TRACKED). A SIGKILL sent to another thread (tgkill) kills the group too, but
    // is not recognised here: its children are acted on at the exit, as without this probe.
    // SAFETY: as above.
    let pid: i32 = unsafe { ctx.read_at(cfg.signal_pid as usize)? };
    let pid = pid as u32;
    // SAFETY: a value of the map, read once.
    let parent = TRACKED
        .get_ptr(pid)
        .is_some_and(|f| unsafe { *f } & tracked_flags::HAS_CHILDREN != 0);
    if !parent {
        return Ok(0);
    }
    // Counted, not logged: the log's formatting would triple the program, and the daemon
    // reports the count (and falls back to the exit).
    let Some(mut entry) = EVENTS.reserve::<DoomedEvent>(0) else {
        count(Stat::RingbufFull);
        return Ok(0);
    };
    // SAFETY: `entry` is a reserved, exclusively owned record.
    unsafe { (*entry.as_mut_ptr()).header = header(EventKind::Doomed, pid, pid) };
    // Urgent: the point is to act before the exit would have been reported.
    submit(entry, true, &cfg);
    Ok(0)
}

/// Reports a thread start or end of a tracked process (the callers check it is tracked).
#[inline(always)]
fn thread_event(ctx: &TracePointContext, cfg: &Config, tid: u32, tgid: u32, started: u32) {
    let Some(mut entry) = reserve::<ThreadEvent>(ctx) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, exclusively owned record.
    unsafe {
        (*ev).header = header(EventKind::Thread, tid, tgid);
        (*ev).started = started;
        (*ev)._pad = 0;
    }
    submit(entry, false, cfg);
}

/// Whether the exiting thread is the last of its group.
#[inline(always)]
fn group_dead(ctx: &TracePointContext, cfg: &Config) -> bool {
    if cfg.exit_group_dead != OFFSET_NONE {
        // SAFETY: offset from this kernel's format file.
        return unsafe { ctx.read_at::<u8>(cfg.exit_group_dead as usize) }.unwrap_or(0) != 0;
    }
    // Kernels without the field: do_exit() decrements `signal->live` before this tracepoint, so
    // it reads zero once the last thread is on its way out. Two threads dying together may both
    // read zero; the daemon treats a second report of one group's death as a duplicate.
    read_task::<u64>(cfg.task_signal)
        .and_then(|signal| read_at::<i32>(signal, cfg.signal_live))
        .is_some_and(|live| live == 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
