//! What guardian prints on stdout: one record per line, as JSON or as human text.

use std::{
    io::{self, IsTerminal, Write},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{events::ExitStatus, procs};

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

/// A process as it appears in records.
#[derive(Clone, Debug, Serialize)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
}

/// One line of output.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// guardian is attached and has read the process table: everything after this is seen.
    Ready {
        ts: String,
        pid: u32,
        version: &'static str,
        /// Where a whole thread group's death is read from: `tracepoint` (the `group_dead`
        /// field) or `signal_live` (the kernel's live-thread count, on kernels without it).
        group_dead: &'static str,
        processes: usize,
    },
    Fork {
        ts: String,
        #[serde(flatten)]
        proc: Proc,
    },
    Exec {
        ts: String,
        #[serde(flatten)]
        proc: Proc,
        exe: String,
        cmdline: String,
        argv: Vec<String>,
    },
    Exit {
        ts: String,
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
        ts: String,
        #[serde(flatten)]
        proc: Proc,
        old_parent: u32,
        new_parent: u32,
    },
    /// A process matched a service's selectors and became one of its roots: it and its
    /// descendants are the service's members.
    Root {
        ts: String,
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
        ts: String,
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
    },
    /// Events the kernel side could not deliver, or guardian could not decode.
    Lost {
        ts: String,
        reason: &'static str,
        count: u64,
        total: u64,
    },
}

impl Record {
    pub fn exit(ts: String, proc: Proc, status: Option<ExitStatus>) -> Self {
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

    fn text(&self) -> String {
        fn p(proc: &Proc) -> String {
            format!("pid={} ppid={} comm={}", proc.pid, proc.ppid, proc.comm)
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
            } => format!("{ts} exec     {} exe={exe} cmdline={cmdline:?}", p(proc)),
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
                ..
            } => {
                let new_parent = new_parent.map_or("?".to_owned(), |p| p.to_string());
                let latency = latency_us.map_or(String::new(), |l| format!(" latency={l}us"));
                format!(
                    "{ts} DECISION [{mode}] {action} {reason} service={service} pid={pid} comm={comm} \
                     parent={old_parent}->{new_parent} performed={performed} result={result:?}{latency}"
                )
            }
            Self::Lost {
                ts,
                reason,
                count,
                total,
            } => format!("{ts} LOST     {count} events ({reason}, {total} in all)"),
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
    pub fn ts(&self, boot_ns: u64) -> String {
        let ns = self.boot_epoch_ns + boot_ns as u128;
        let t = SystemTime::UNIX_EPOCH
            + Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
        humantime::format_rfc3339_micros(t).to_string()
    }

    pub fn now(&self) -> String {
        self.ts(procs::boottime_ns())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Buffered record writer for stdout.
pub struct Output {
    json: bool,
    out: io::BufWriter<io::Stdout>,
}

impl Output {
    pub fn new(format: OutputFormat) -> Self {
        let json = match format {
            OutputFormat::Json => true,
            OutputFormat::Text => false,
            OutputFormat::Auto => !io::stdout().is_terminal(),
        };
        Self {
            json,
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
        }
    }

    pub fn emit(&mut self, record: &Record) -> io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, record)?;
        } else {
            self.out.write_all(record.text().as_bytes())?;
        }
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
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
        let r = Record::exit("t".into(), proc(), Some(ExitStatus::Code(3)));
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "exit");
        assert_eq!(v["pid"], 10);
        assert_eq!(v["ppid"], 1);
        assert_eq!(v["exit_code"], 3);
        assert!(v.get("signal").is_none());
        let r = Record::exit(
            "t".into(),
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

    #[test]
    fn reparent_json_fields() {
        let r = Record::Reparent {
            ts: "t".into(),
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
    fn clock_formats_rfc3339() {
        let c = Clock::new();
        let ts = c.now();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        assert_eq!(ts.len(), "2026-11-25T15:16:19.123456Z".len());
    }
}
