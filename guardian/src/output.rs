//! What guardian prints on stdout: one record per line, as JSON or as human text.

use std::{
    borrow::Cow,
    cell::Cell,
    collections::BTreeMap,
    io::{self, IsTerminal, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tracing::warn;

use crate::{kernel::events::ExitStatus, procs};

/// How records are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// One human-readable line per record.
    Text,
    /// One JSON object per line.
    Json,
}

impl OutputFormat {
    /// Whether JSON is printed (`auto`: when stdout is not a terminal).
    pub fn json(self) -> bool {
        match self {
            Self::Json => true,
            Self::Text => false,
            Self::Auto => !io::stdout().is_terminal(),
        }
    }
}

/// A process as it appears in records.
#[derive(Clone, Debug, Serialize)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: Arc<str>,
}

/// A record's time, RFC 3339 in UTC with microseconds, held inline: a record is made for every
/// event, by the thousand a second under a fork storm, and a `String` each was an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Ts([u8; Ts::LEN]);

impl Ts {
    /// `2026-11-25T15:16:19.123456Z` (years 1000 to 9999).
    const LEN: usize = 27;

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for Ts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Ts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Ts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One line of output.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// guardian is attached and has read the process table: everything after this is seen.
    Ready {
        ts: Ts,
        pid: u32,
        version: &'static str,
        /// Where a whole thread group's death is read from: `tracepoint` (the `group_dead`
        /// field) or `signal_live` (the kernel's live-thread count, on kernels without it).
        group_dead: &'static str,
        processes: usize,
    },
    Fork {
        ts: Ts,
        #[serde(flatten)]
        proc: Proc,
    },
    Exec {
        ts: Ts,
        #[serde(flatten)]
        proc: Proc,
        exe: String,
        cmdline: String,
        argv: Vec<String>,
    },
    Exit {
        ts: Ts,
        #[serde(flatten)]
        proc: Proc,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        core_dumped: bool,
    },
    /// A process's parent died and the kernel gave it to a reaper.
    Reparent {
        ts: Ts,
        #[serde(flatten)]
        proc: Proc,
        old_parent: u32,
        new_parent: u32,
    },
    /// A process matched a service's selectors and became one of its roots: it and its
    /// descendants are the service's members.
    Root {
        ts: Ts,
        service: String,
        #[serde(flatten)]
        proc: Proc,
        cmdline: String,
        /// `exec` (seen at exec) or `startup` (running when guardian started).
        found: &'static str,
        members: usize,
    },
    /// guardian decided to act on a process (or, in audit mode, would have).
    Decision {
        ts: Ts,
        mode: &'static str,
        action: &'static str,
        performed: bool,
        reason: &'static str,
        service: String,
        pid: u32,
        comm: String,
        cmdline: String,
        old_parent: u32,
        new_parent: Option<u32>,
        /// From the parent's death (kernel time) to the signal, in µs.
        latency_us: Option<u64>,
        result: String,
        /// For budget decisions: the usage seen (bytes or tasks) and the budget it crossed.
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        /// What brought the decision forward, when not the usual event: `parent_sigkilled`
        /// (an orphan decided when its parent was sent SIGKILL, before the parent's exit).
        #[serde(skip_serializing_if = "Option::is_none")]
        trigger: Option<&'static str>,
    },
    /// The policy was read again (SIGHUP): what changed, or why the policy in force stays.
    Reload {
        ts: Ts,
        /// `signal` (SIGHUP) or `file` (the policy file changed).
        trigger: &'static str,
        /// `ok`, or `error` (the policy in force is unchanged).
        result: &'static str,
        policy: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Services by name: new ones, ones no longer in the policy (their members are
        /// forgotten, not killed), and kept ones whose settings changed.
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        /// Roots the new selectors found among running processes.
        roots: u64,
        /// Processes that are no longer members of any service.
        forgotten: u64,
        took_us: u64,
    },
    /// Events the kernel side could not deliver, or guardian could not decode.
    Lost {
        ts: Ts,
        /// `ringbuf_full`, `tracked_map_full` (children the kernel could not follow),
        /// `bad_tracepoint_field`, `decode_error`, or `untracked` (members guardian could not
        /// have the kernel follow: their events will not come, `/proc` is read instead).
        reason: &'static str,
        count: u64,
        total: u64,
    },
    /// The process table was re-read from `/proc` after events were lost (or a check found it
    /// wrong), and what that changed.
    Resync {
        ts: Ts,
        /// `lost` (the kernel could not deliver events), `untracked` (members the kernel cannot
        /// follow, checked from `/proc`), `check` (the periodic reconciliation found a change
        /// no event reported), or `users` (a user the policy names was created).
        trigger: &'static str,
        /// Members found dead (their exit was never seen).
        retired: u64,
        /// Members found that no fork event announced.
        adopted: u64,
        /// Members whose parent `/proc` shows differently.
        reparented: u64,
        /// Members that exec'd without an event.
        execs: u64,
        /// Service roots found.
        roots: u64,
        /// Live members per service afterwards.
        members: BTreeMap<String, u64>,
        took_us: u64,
    },
}

impl Record {
    pub fn exit(ts: Ts, proc: Proc, status: Option<ExitStatus>) -> Self {
        let (exit_code, signal, core_dumped) = match status {
            Some(ExitStatus::Code(c)) => (Some(c), None, false),
            Some(ExitStatus::Signal {
                signal,
                core_dumped,
            }) => (None, Some(signal), core_dumped),
            None => (None, None, false),
        };
        Self::Exit {
            ts,
            proc,
            exit_code,
            signal,
            core_dumped,
        }
    }

    /// The record as one JSON object, appended to `out`. Fork, exit and reparent records (the
    /// stream of `guardian trace`, thousands a second under a fork storm) are written by hand,
    /// byte for byte as serde writes them; the rest go through serde.
    fn write_json(&self, out: &mut Vec<u8>) {
        /// `{"event":"EVENT","ts":"TS","pid":N,"ppid":N,"comm":"COMM"`
        fn head(out: &mut Vec<u8>, event: &str, ts: &Ts, proc: &Proc) {
            out.extend_from_slice(b"{\"event\":\"");
            out.extend_from_slice(event.as_bytes());
            out.extend_from_slice(b"\",\"ts\":\"");
            out.extend_from_slice(ts.as_str().as_bytes());
            out.push(b'"');
            number(out, "pid", proc.pid);
            number(out, "ppid", proc.ppid);
            out.extend_from_slice(b",\"comm\":");
            string(out, &proc.comm);
        }
        fn number(out: &mut Vec<u8>, key: &str, n: impl itoa::Integer) {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        fn string(out: &mut Vec<u8>, s: &str) {
            if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
                out.push(b'"');
                out.extend_from_slice(s.as_bytes());
                out.push(b'"');
            } else {
                // Writing into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, s);
            }
        }
        match self {
            Self::Fork { ts, proc } => head(out, "fork", ts, proc),
            Self::Exit {
                ts,
                proc,
                exit_code,
                signal,
                core_dumped,
            } => {
                head(out, "exit", ts, proc);
                if let Some(c) = exit_code {
                    number(out, "exit_code", *c);
                }
                if let Some(s) = signal {
                    number(out, "signal", *s);
                }
                if *core_dumped {
                    out.extend_from_slice(b",\"core_dumped\":true");
                }
            }
            Self::Reparent {
                ts,
                proc,
                old_parent,
                new_parent,
            } => {
                head(out, "reparent", ts, proc);
                number(out, "old_parent", *old_parent);
                number(out, "new_parent", *new_parent);
            }
            // Writing into a Vec cannot fail, and a Record always serializes.
            _ => {
                let _ = serde_json::to_writer(&mut *out, self);
                return;
            }
        }
        out.push(b'}');
    }

    fn text(&self) -> String {
        fn p(proc: &Proc) -> String {
            format!(
                "pid={} ppid={} comm={}",
                proc.pid,
                proc.ppid,
                escape_controls(&proc.comm)
            )
        }
        match self {
            Self::Ready {
                ts,
                pid,
                version,
                group_dead,
                processes,
            } => format!(
                "{ts} ready    guardian {version} pid={pid} processes={processes} group_dead={group_dead}"
            ),
            Self::Fork { ts, proc } => format!("{ts} fork     {}", p(proc)),
            Self::Exec {
                ts, proc, exe, cmdline, ..
            } => format!(
                "{ts} exec     {} exe={} cmdline={cmdline:?}",
                p(proc),
                escape_controls(exe)
            ),
            Self::Exit {
                ts,
                proc,
                exit_code,
                signal,
                core_dumped,
            } => {
                let how = match (exit_code, signal) {
                    (Some(c), _) => format!(" exit_code={c}"),
                    (_, Some(s)) if *core_dumped => format!(" signal={s} (core dumped)"),
                    (_, Some(s)) => format!(" signal={s}"),
                    _ => String::new(),
                };
                format!("{ts} exit     {}{how}", p(proc))
            }
            Self::Reparent {
                ts,
                proc,
                old_parent,
                new_parent,
            } => format!(
                "{ts} reparent {} old_parent={old_parent} new_parent={new_parent}",
                p(proc)
            ),
            Self::Root {
                ts,
                service,
                proc,
                cmdline,
                found,
                members,
            } => format!(
                "{ts} root     service={service} {} members={members} found={found} cmdline={cmdline:?}",
                p(proc)
            ),
            Self::Decision {
                ts,
                mode,
                action,
                performed,
                reason,
                service,
                pid,
                comm,
                old_parent,
                new_parent,
                latency_us,
                result,
                trigger,
                ..
            } => {
                let new_parent = new_parent.map_or("?".to_owned(), |p| p.to_string());
                let latency = latency_us.map_or(String::new(), |l| format!(" latency={l}us"));
                let trigger = trigger.map_or(String::new(), |t| format!(" trigger={t}"));
                format!(
                    "{ts} DECISION [{mode}] {action} {reason} service={service} pid={pid} comm={} \
                     parent={old_parent}->{new_parent} performed={performed} result={result:?}{latency}{trigger}",
                    escape_controls(comm)
                )
            }
            Self::Lost {
                ts,
                reason,
                count,
                total,
            } => format!("{ts} LOST     {count} events ({reason}, {total} in all)"),
            Self::Reload {
                ts,
                trigger,
                result,
                policy,
                error: Some(error),
                ..
            } => format!(
                "{ts} RELOAD   trigger={trigger} result={result} policy={} error={error:?} (the policy in force stays)",
                escape_controls(policy)
            ),
            Self::Reload {
                ts,
                trigger,
                result,
                policy,
                added,
                removed,
                changed,
                roots,
                forgotten,
                took_us,
                ..
            } => format!(
                "{ts} RELOAD   trigger={trigger} result={result} policy={} added=[{}] removed=[{}] changed=[{}] \
                 roots={roots} forgotten={forgotten} took={took_us}us",
                escape_controls(policy),
                added.join(","),
                removed.join(","),
                changed.join(",")
            ),
            Self::Resync {
                ts,
                trigger,
                retired,
                adopted,
                reparented,
                execs,
                roots,
                members,
                took_us,
            } => {
                let members: Vec<String> =
                    members.iter().map(|(s, n)| format!("{s}:{n}")).collect();
                format!(
                    "{ts} RESYNC   trigger={trigger} retired={retired} adopted={adopted} \
                     reparented={reparented} execs={execs} roots={roots} members={} took={took_us}us",
                    members.join(",")
                )
            }
        }
    }
}

/// Converts kernel `CLOCK_BOOTTIME` stamps to wall-clock text.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Wall-clock time at boot, in ns since the Unix epoch.
    boot_epoch_ns: u128,
}

impl Clock {
    pub fn new() -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Self {
            boot_epoch_ns: now.saturating_sub(procs::boottime_ns() as u128),
        }
    }

    /// RFC 3339 UTC time with microseconds.
    pub fn ts(&self, boot_ns: u64) -> Ts {
        let ns = self.boot_epoch_ns + boot_ns as u128;
        let secs = (ns / 1_000_000_000) as u64;
        let mut micros = (ns % 1_000_000_000 / 1_000) as u32;
        // The date and time of day change once a second, and records come by the thousand
        // under a fork storm: they are worked out once per second.
        thread_local! {
            static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
        }
        let (at, mut date) = SECOND.get();
        if at != secs {
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let text = humantime::format_rfc3339_seconds(t).to_string();
            // `2026-11-25T15:16:19Z`: the `Z` goes after the fraction.
            if let Some(d) = text.as_bytes().get(..19) {
                date.copy_from_slice(d);
            }
            SECOND.set((secs, date));
        }
        let mut ts = Ts([0; Ts::LEN]);
        ts.0[..19].copy_from_slice(&date);
        ts.0[19] = b'.';
        for digit in ts.0[20..26].iter_mut().rev() {
            *digit = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        ts.0[26] = b'Z';
        ts
    }

    pub fn now(&self) -> Ts {
        self.ts(procs::boottime_ns())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Records waiting for the writer thread. Beyond this many, new records are dropped (and
/// counted) rather than delay a decision.
pub const QUEUE_RECORDS: usize = 8192;
/// How long the writer lets records gather once woken: the most a record waits before it is
/// printed.
const COALESCE: Duration = Duration::from_millis(1);
/// At most one warning this often about records that could not be printed (ns).
const DROP_WARN_NS: u64 = 10_000_000_000;

/// Lines waiting for the writer: one buffer the daemon appends to and the writer takes whole,
/// so that a record costs neither an allocation nor a wakeup of its own (an allocation made on
/// one thread and freed on another is slow in glibc's allocator).
#[derive(Debug, Default)]
struct Queue {
    lines: Vec<u8>,
    records: usize,
    /// The writer waits for a record (and must be woken).
    idle: bool,
    /// No record will come any more: the writer prints what is left and ends.
    done: bool,
}

/// What the writer thread and the daemon share.
#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Records not printed: the queue was full (a stalled reader), or stdout failed.
    dropped: AtomicU64,
    /// stdout failed for good: further records are discarded by the writer.
    closed: AtomicBool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while the lock was held cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Prints records on stdout from a thread of its own, through a bounded queue: a closed or
/// stalled stdout costs records (counted, and warned about on stderr), never a decision or a
/// delay in one.
pub struct Output {
    json: bool,
    /// The line being built (reused).
    line: Vec<u8>,
    capacity: usize,
    writer: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    /// Drops already warned about, and when (boot ns).
    warned: (u64, u64),
}

impl Output {
    /// Prints to stdout.
    pub fn new(format: OutputFormat) -> Self {
        let json = format.json();
        Self::to_writer(json, io::stdout(), QUEUE_RECORDS)
    }

    fn to_writer(json: bool, out: impl Write + Send + 'static, capacity: usize) -> Self {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("guardian-output".into())
            .spawn(move || write_records(out, &s))
            .expect("spawning the output thread");
        Self {
            json,
            line: Vec::new(),
            capacity,
            writer: Some(writer),
            shared,
            warned: (0, 0),
        }
    }

    /// Queues a record; never blocks (but for the moment the writer takes the queue).
    pub fn emit(&mut self, record: &Record) {
        if self.writer.is_none() {
            return;
        }
        self.line.clear();
        if self.json {
            record.write_json(&mut self.line);
        } else {
            self.line.extend_from_slice(record.text().as_bytes());
        }
        self.line.push(b'\n');
        let mut q = self.shared.queue();
        if q.records >= self.capacity {
            drop(q);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            q.lines.extend_from_slice(&self.line);
            q.records += 1;
            let wake = std::mem::take(&mut q.idle);
            drop(q);
            if wake {
                self.shared.wake.notify_one();
            }
        }
        self.warn_drops();
    }

    /// Records not printed so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Says on stderr (at most every [`DROP_WARN_NS`]) that records are being lost.
    fn warn_drops(&mut self) {
        let dropped = self.dropped();
        if dropped == self.warned.0 {
            return;
        }
        let now = procs::boottime_ns();
        if self.warned.1 != 0 && now < self.warned.1 + DROP_WARN_NS {
            return;
        }
        let why = if self.shared.closed.load(Ordering::Relaxed) {
            "stdout is closed or failing"
        } else {
            "stdout is not being read fast enough"
        };
        warn!(
            dropped,
            "{why}: {} record(s) not printed since the last warning; enforcement goes on",
            dropped - self.warned.0
        );
        self.warned = (dropped, now);
    }

    /// Lets the writer print what is queued, waiting at most `limit` (a stalled stdout must not
    /// hold guardian's exit), and reports what was lost.
    pub fn close(&mut self, limit: Duration) {
        self.shared.queue().done = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let deadline = std::time::Instant::now() + limit;
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let dropped = self.dropped();
        if dropped > 0 {
            warn!(dropped, "records that could not be printed on stdout");
        }
    }
}

/// The writer thread: takes the queued lines whole and prints them with one write. Once stdout
/// fails, it only counts what it discards.
fn write_records(mut out: impl Write, shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        let mut q = shared.queue();
        if q.records == 0 && !q.done {
            q.idle = true;
            while q.idle && !q.done {
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            // Woken by the first record of a burst (a drain of the ring buffer brings many):
            // the rest queue up meanwhile, and the burst costs one wakeup and one write.
            drop(q);
            std::thread::sleep(COALESCE);
            q = shared.queue();
        }
        if q.records == 0 {
            break; // done, and nothing left
        }
        std::mem::swap(&mut q.lines, &mut batch);
        let records = std::mem::take(&mut q.records) as u64;
        drop(q);
        if shared.closed.load(Ordering::Relaxed) {
            shared.dropped.fetch_add(records, Ordering::Relaxed);
        } else if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
            shared.dropped.fetch_add(records, Ordering::Relaxed);
            if !shared.closed.swap(true, Ordering::Relaxed) {
                warn!("stdout failed ({e}): records are no longer printed; enforcement goes on");
            }
        }
        batch.clear();
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`...), for text output: a process name or
/// command line can hold anything, and must not forge a line or drive the terminal.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_debug().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc() -> Proc {
        Proc {
            pid: 10,
            ppid: 1,
            comm: "sleep".into(),
        }
    }

    #[test]
    fn exit_json_has_code_or_signal() {
        let r = Record::exit(
            Clock { boot_epoch_ns: 0 }.ts(0),
            proc(),
            Some(ExitStatus::Code(3)),
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "exit");
        assert_eq!(v["pid"], 10);
        assert_eq!(v["ppid"], 1);
        assert_eq!(v["exit_code"], 3);
        assert!(v.get("signal").is_none());
        let r = Record::exit(
            Clock { boot_epoch_ns: 0 }.ts(0),
            proc(),
            Some(ExitStatus::Signal {
                signal: 9,
                core_dumped: false,
            }),
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["signal"], 9);
        assert!(v.get("exit_code").is_none());
        assert!(r.text().ends_with("comm=sleep signal=9"), "{}", r.text());
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config())]

        /// The records written by hand are the bytes serde writes, whatever the name holds
        /// (quotes, backslashes, control characters, any Unicode) and however the process ended.
        #[test]
        fn hand_written_json_is_serdes(
            pid: u32,
            ppid: u32,
            comm in "(\\PC|[\"\\\\\u{0}-\u{1f}\u{7f}]){0,16}",
            boot_ns in 0u64..u64::MAX / 2,
            status in proptest::option::of((proptest::bool::ANY, -300i32..300, proptest::bool::ANY)),
            parents: (u32, u32),
        ) {
            let ts = Clock { boot_epoch_ns: 1_764_170_179_000_000_000 }.ts(boot_ns);
            let proc = Proc { pid, ppid, comm: comm.as_str().into() };
            let status = status.map(|(code, n, core_dumped)| {
                if code {
                    ExitStatus::Code(n)
                } else {
                    ExitStatus::Signal { signal: n, core_dumped }
                }
            });
            for record in [
                Record::Fork { ts, proc: proc.clone() },
                Record::exit(ts, proc.clone(), status),
                Record::Reparent {
                    ts,
                    proc: proc.clone(),
                    old_parent: parents.0,
                    new_parent: parents.1,
                },
            ] {
                let mut by_hand = Vec::new();
                record.write_json(&mut by_hand);
                let by_serde = serde_json::to_vec(&record).unwrap();
                proptest::prop_assert_eq!(
                    String::from_utf8(by_hand).unwrap(),
                    String::from_utf8(by_serde).unwrap()
                );
            }
        }
    }

    #[test]
    fn reparent_json_fields() {
        let r = Record::Reparent {
            ts: Clock { boot_epoch_ns: 0 }.ts(0),
            proc: proc(),
            old_parent: 5,
            new_parent: 1,
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "reparent");
        assert_eq!(v["old_parent"], 5);
        assert_eq!(v["new_parent"], 1);
        assert_eq!(v["comm"], "sleep");
    }

    #[test]
    fn decision_trigger_only_when_set() {
        let decision = |trigger| Record::Decision {
            ts: Clock { boot_epoch_ns: 0 }.ts(0),
            mode: "enforce",
            action: "kill",
            performed: true,
            reason: "orphan",
            service: "svc".into(),
            pid: 10,
            comm: "python3".into(),
            cmdline: "python3 -m app".into(),
            old_parent: 5,
            new_parent: None,
            latency_us: Some(300),
            result: "sent SIGKILL".into(),
            usage: None,
            limit: None,
            trigger,
        };
        let r = decision(None);
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert!(v.get("trigger").is_none(), "{v}");
        assert!(!r.text().contains("trigger"), "{}", r.text());
        let r = decision(Some("parent_sigkilled"));
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["trigger"], "parent_sigkilled");
        assert_eq!(
            v["reason"], "orphan",
            "the reason (a metrics label) is unchanged"
        );
        assert!(
            r.text().ends_with("latency=300us trigger=parent_sigkilled"),
            "{}",
            r.text()
        );
    }

    #[test]
    fn text_escapes_control_characters() {
        let mut forged = proc();
        forged.comm = "x\n2026 DECISION".into();
        let r = Record::Fork {
            ts: Clock { boot_epoch_ns: 0 }.ts(0),
            proc: forged,
        };
        let text = r.text();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("comm=x\\n2026"), "{text}");
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(escape_controls("a\u{1b}[31m"), "a\\u{1b}[31m");
    }

    /// A writer that blocks until told to go on, like a pipe nobody reads; counts the lines it
    /// was given.
    struct Stalled(std::sync::mpsc::Receiver<()>, Arc<AtomicU64>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            let lines = buf.iter().filter(|&&b| b == b'\n').count() as u64;
            self.1.fetch_add(lines, Ordering::Relaxed);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose reader has gone (EPIPE).
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    fn lost(n: u64) -> Record {
        Record::Lost {
            ts: Clock { boot_epoch_ns: 0 }.ts(0),
            reason: "test",
            count: n,
            total: n,
        }
    }

    #[test]
    fn a_stalled_reader_costs_records_not_time() {
        let (go, wait) = std::sync::mpsc::channel();
        let written = Arc::new(AtomicU64::new(0));
        let mut out = Output::to_writer(true, Stalled(wait, Arc::clone(&written)), 4);
        let start = std::time::Instant::now();
        for i in 0..5000 {
            out.emit(&lost(i));
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "emitting blocked for {:?}",
            start.elapsed()
        );
        // The writer holds the records it took before it stalled, and the queue four more:
        // the rest is dropped and counted.
        let dropped = out.dropped();
        assert!(dropped > 3000, "dropped {dropped}");
        drop(go);
        out.close(Duration::from_secs(5));
        assert_eq!(written.load(Ordering::Relaxed) + dropped, 5000);
    }

    #[test]
    fn a_closed_stdout_is_counted_and_never_an_error() {
        let mut out = Output::to_writer(true, Closed, 16);
        for i in 0..100 {
            out.emit(&lost(i));
            std::thread::sleep(Duration::from_micros(50));
        }
        out.close(Duration::from_secs(5));
        assert!(out.shared.closed.load(Ordering::Relaxed));
        assert_eq!(out.dropped(), 100);
    }

    #[test]
    fn records_reach_the_writer_in_order() {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Output::to_writer(true, Shared(Arc::clone(&buf)), 64);
        for i in 0..50 {
            out.emit(&lost(i));
        }
        out.close(Duration::from_secs(5));
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let counts: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["count"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(counts, (0..50).collect::<Vec<_>>());
        assert_eq!(out.dropped(), 0);
    }

    #[test]
    fn clock_formats_rfc3339() {
        let c = Clock::new();
        let ts = c.now().to_string();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        assert_eq!(ts.len(), "2026-11-25T15:16:19.123456Z".len());
        // What humantime says, whether or not the second was formatted before.
        let at = Clock { boot_epoch_ns: 0 };
        for ns in [
            1_764_170_179_000_001_999u64,
            1_764_170_179_999_999_000,
            1_764_170_180_000_000_000,
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns);
            assert_eq!(
                at.ts(ns).as_str(),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
    }
}
