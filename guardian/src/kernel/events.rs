//! Decoding of the records the eBPF program writes to the ring buffer.

use guardian_common::{
    exec_flags, exit_flags, DoomedEvent, EventHeader, EventKind, ExecEvent, ExitEvent, ForkEvent,
    ThreadEvent, ARGS_LEN, COMM_LEN, FILENAME_LEN,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {need}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{what} length {len} exceeds its {max}-byte buffer")]
    BadLength {
        what: &'static str,
        len: u32,
        max: usize,
    },
}

/// A decoded kernel event. Times are `CLOCK_BOOTTIME` nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Fork(Fork),
    Exec(Exec),
    Exit(Exit),
    Thread(Thread),
    Doomed(Doomed),
}

/// A process with children was sent SIGKILL (queued: its death is certain); its exit follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doomed {
    pub ts_ns: u64,
    pub pid: u32,
}

/// A thread of a tracked process started or ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thread {
    pub ts_ns: u64,
    pub tid: u32,
    pub pid: u32,
    pub started: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    pub ts_ns: u64,
    pub pid: u32,
    /// The process that called fork.
    pub creator: u32,
    /// The child's parent: the creator, or the creator's parent for `CLONE_PARENT`. `None` when
    /// the kernel could not tell.
    pub parent: Option<u32>,
    pub comm: Comm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    pub ts_ns: u64,
    pub pid: u32,
    pub ppid: Option<u32>,
    /// Exact start time, when the kernel could read it.
    pub start_ns: Option<u64>,
    pub comm: String,
    /// The effective uid the exec gave the process, when the kernel could read it.
    pub euid: Option<u32>,
    pub filename: String,
    pub argv: Vec<String>,
    /// The argv above is cut short (or missing) and should be completed from `/proc`.
    pub argv_incomplete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub ts_ns: u64,
    pub pid: u32,
    /// The parent at the time of death (after any reparenting), when the kernel could read it.
    pub ppid: Option<u32>,
    /// Exact start time, when the kernel could read it.
    pub start_ns: Option<u64>,
    pub comm: Comm,
    pub status: Option<ExitStatus>,
    pub had_children: bool,
}

/// A process name as the kernel sends it (NUL-padded, at most 15 bytes), kept as bytes: fork
/// and exit records are decoded for every event, and most of their names are never looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm([u8; COMM_LEN]);

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.bytes())
    }

    /// The name's bytes, as the kernel has them (up to the first NUL).
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.0[..end]
    }
}

impl From<&str> for Comm {
    /// The kernel's way: cut to 15 bytes.
    fn from(s: &str) -> Self {
        let mut c = [0; COMM_LEN];
        let n = s.len().min(COMM_LEN - 1);
        c[..n].copy_from_slice(&s.as_bytes()[..n]);
        Self(c)
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.as_str(), f)
    }
}

/// How a process ended, decoded from the kernel's `exit_code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// Decodes a wait-status-shaped kernel `exit_code`.
    pub fn from_raw(raw: u32) -> Self {
        let sig = (raw & 0x7f) as i32;
        if sig == 0 {
            Self::Code(((raw >> 8) & 0xff) as i32)
        } else {
            Self::Signal {
                signal: sig,
                core_dumped: raw & 0x80 != 0,
            }
        }
    }
}

fn read<T: Copy>(buf: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if buf.len() < need {
        return Err(DecodeError::Short {
            what,
            len: buf.len(),
            need,
        });
    }
    // SAFETY: length checked; `T` is a plain-old-data `#[repr(C)]` struct; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// Splits NUL-separated argv.
pub fn split_args(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn bounded(len: u32, max: usize, what: &'static str) -> Result<usize, DecodeError> {
    if len as usize > max {
        return Err(DecodeError::BadLength { what, len, max });
    }
    Ok(len as usize)
}

/// Zero is how the kernel side says "could not read".
fn known<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

/// Decodes one ring-buffer record.
pub fn decode(buf: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(buf, "event header")?;
    match EventKind::from_u32(header.kind) {
        Some(EventKind::Fork) => {
            let ev: ForkEvent = read(buf, "fork event")?;
            Ok(Event::Fork(Fork {
                ts_ns: ev.header.ts_ns,
                pid: ev.header.tgid,
                creator: ev.creator_tgid,
                parent: known(ev.parent_tgid),
                comm: Comm(ev.comm),
            }))
        }
        Some(EventKind::Exec) => {
            let ev: ExecEvent = read(buf, "exec event")?;
            let flen = bounded(ev.filename_len, FILENAME_LEN, "filename")?;
            let alen = bounded(ev.args_len, ARGS_LEN, "argv")?;
            Ok(Event::Exec(Exec {
                ts_ns: ev.header.ts_ns,
                pid: ev.header.tgid,
                ppid: known(ev.ppid),
                start_ns: known(ev.start_ns),
                comm: Comm(ev.comm).as_str().into_owned(),
                euid: (ev.flags & exec_flags::EUID_VALID != 0).then_some(ev.euid),
                filename: String::from_utf8_lossy(&ev.filename[..flen]).into_owned(),
                argv: split_args(&ev.args[..alen]),
                argv_incomplete: ev.flags & (exec_flags::ARGS_TRUNCATED | exec_flags::ARGS_MISSING)
                    != 0,
            }))
        }
        Some(EventKind::Exit) => {
            let ev: ExitEvent = read(buf, "exit event")?;
            Ok(Event::Exit(Exit {
                ts_ns: ev.header.ts_ns,
                pid: ev.header.tgid,
                ppid: known(ev.ppid),
                start_ns: known(ev.start_ns),
                comm: Comm(ev.comm),
                status: (ev.flags & exit_flags::EXIT_CODE_VALID != 0)
                    .then(|| ExitStatus::from_raw(ev.exit_code)),
                had_children: ev.flags & exit_flags::HAD_CHILDREN != 0,
            }))
        }
        Some(EventKind::Thread) => {
            let ev: ThreadEvent = read(buf, "thread event")?;
            Ok(Event::Thread(Thread {
                ts_ns: ev.header.ts_ns,
                tid: ev.header.pid,
                pid: ev.header.tgid,
                started: ev.started != 0,
            }))
        }
        Some(EventKind::Doomed) => {
            let ev: DoomedEvent = read(buf, "doomed event")?;
            Ok(Event::Doomed(Doomed {
                ts_ns: ev.header.ts_ns,
                pid: ev.header.tgid,
            }))
        }
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use guardian_common::COMM_LEN;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    fn comm(s: &str) -> [u8; COMM_LEN] {
        let mut c = [0; COMM_LEN];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn header(kind: EventKind, pid: u32) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            pid,
            tgid: pid,
            _pad: 0,
            ts_ns: 1_000,
        }
    }

    pub(crate) fn exec_record(pid: u32, filename: &str, args: &[&str]) -> Vec<u8> {
        let mut ev = ExecEvent {
            header: header(EventKind::Exec, pid),
            old_pid: pid,
            ppid: 1,
            start_ns: 900,
            flags: 0,
            filename_len: filename.len() as u32,
            args_len: 0,
            euid: 0,
            comm: comm("python3"),
            filename: [0; FILENAME_LEN],
            args: [0; ARGS_LEN],
        };
        ev.filename[..filename.len()].copy_from_slice(filename.as_bytes());
        let mut at = 0;
        for a in args {
            ev.args[at..at + a.len()].copy_from_slice(a.as_bytes());
            at += a.len() + 1;
        }
        ev.args_len = at as u32;
        bytes_of(&ev)
    }

    #[test]
    fn decodes_fork() {
        let ev = ForkEvent {
            header: header(EventKind::Fork, 42),
            creator_pid: 7,
            creator_tgid: 5,
            parent_tgid: 4,
            _pad: 0,
            clone_flags: 0x8011,
            comm: comm("bash"),
        };
        let got = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(
            got,
            Event::Fork(Fork {
                ts_ns: 1_000,
                pid: 42,
                creator: 5,
                parent: Some(4),
                comm: "bash".into()
            })
        );
    }

    #[test]
    fn decodes_exec_with_argv() {
        let rec = exec_record(9, "/usr/bin/python3", &["python3", "-m", "apps.bot"]);
        let Event::Exec(e) = decode(&rec).unwrap() else {
            panic!("not an exec")
        };
        assert_eq!(e.filename, "/usr/bin/python3");
        assert_eq!(e.argv, vec!["python3", "-m", "apps.bot"]);
        assert_eq!(e.start_ns, Some(900));
        assert_eq!(e.ppid, Some(1));
        assert!(!e.argv_incomplete);
        assert_eq!(e.euid, None, "no EUID_VALID flag");
        let mut ev: ExecEvent = read(&rec, "exec").unwrap();
        ev.flags = exec_flags::EUID_VALID;
        let Event::Exec(e) = decode(&bytes_of(&ev)).unwrap() else {
            panic!("not an exec")
        };
        assert_eq!(e.euid, Some(0), "root's uid is 0, not unknown");
    }

    #[test]
    fn decodes_exit_status() {
        let mut ev = ExitEvent {
            header: header(EventKind::Exit, 3),
            exit_code: 9,
            flags: exit_flags::EXIT_CODE_VALID | exit_flags::HAD_CHILDREN,
            start_ns: 0,
            ppid: 1,
            _pad: 0,
            comm: comm("sleep"),
        };
        let Event::Exit(e) = decode(&bytes_of(&ev)).unwrap() else {
            panic!("not an exit")
        };
        assert_eq!(
            e.status,
            Some(ExitStatus::Signal {
                signal: 9,
                core_dumped: false
            })
        );
        assert!(e.had_children);
        assert_eq!(e.start_ns, None);
        ev.exit_code = 3 << 8;
        ev.flags = 0;
        let Event::Exit(e) = decode(&bytes_of(&ev)).unwrap() else {
            panic!("not an exit")
        };
        assert_eq!(e.status, None, "exit code not valid without its flag");
        assert_eq!(ExitStatus::from_raw(3 << 8), ExitStatus::Code(3));
        assert_eq!(
            ExitStatus::from_raw(0x80 | 6),
            ExitStatus::Signal {
                signal: 6,
                core_dumped: true
            }
        );
    }

    #[test]
    fn decodes_thread() {
        let ev = ThreadEvent {
            header: EventHeader {
                kind: EventKind::Thread as u32,
                pid: 11,
                tgid: 10,
                _pad: 0,
                ts_ns: 5,
            },
            started: 1,
            _pad: 0,
        };
        assert_eq!(
            decode(&bytes_of(&ev)).unwrap(),
            Event::Thread(Thread {
                ts_ns: 5,
                tid: 11,
                pid: 10,
                started: true
            })
        );
    }

    #[test]
    fn decodes_doomed() {
        let ev = DoomedEvent {
            header: header(EventKind::Doomed, 12),
        };
        assert_eq!(
            decode(&bytes_of(&ev)).unwrap(),
            Event::Doomed(Doomed {
                ts_ns: 1_000,
                pid: 12
            })
        );
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(matches!(
            decode(&[0u8; 8]),
            Err(DecodeError::Short {
                what: "event header",
                ..
            })
        ));
        let rec = exec_record(9, "/bin/true", &[]);
        assert!(matches!(
            decode(&rec[..100]),
            Err(DecodeError::Short {
                what: "exec event",
                ..
            })
        ));
        let mut bad = bytes_of(&header(EventKind::Fork, 1));
        bad[0] = 99;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn rejects_lengths_beyond_buffers() {
        let mut rec = exec_record(9, "/bin/true", &[]);
        // filename_len follows header(24), old_pid(4), ppid(4), start_ns(8), flags(4).
        rec[44..48].copy_from_slice(&(FILENAME_LEN as u32 + 1).to_ne_bytes());
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::BadLength {
                what: "filename",
                ..
            })
        ));
    }

    #[test]
    fn splits_args() {
        assert_eq!(split_args(b"a\0b c\0"), vec!["a", "b c"]);
        assert_eq!(split_args(b"a\0\0b\0"), vec!["a", "", "b"]);
        assert!(split_args(b"").is_empty());
    }

    /// Fuzzing: no byte string makes the decoder panic, and every refusal is the typed error
    /// that fits the bytes.
    mod fuzz {
        use super::*;
        use guardian_common::ForkEvent;
        use proptest::{prelude::*, sample::Index};

        fn fork_record(pid: u32) -> Vec<u8> {
            bytes_of(&ForkEvent {
                header: header(EventKind::Fork, pid),
                creator_pid: pid - 1,
                creator_tgid: pid - 1,
                parent_tgid: 1,
                _pad: 0,
                clone_flags: 0x11,
                comm: comm("bash"),
            })
        }

        fn exit_record(pid: u32) -> Vec<u8> {
            bytes_of(&ExitEvent {
                header: header(EventKind::Exit, pid),
                exit_code: 9,
                flags: exit_flags::EXIT_CODE_VALID,
                start_ns: 900,
                ppid: 1,
                _pad: 0,
                comm: comm("sleep"),
            })
        }

        fn thread_record(pid: u32) -> Vec<u8> {
            bytes_of(&ThreadEvent {
                header: header(EventKind::Thread, pid),
                started: 1,
                _pad: 0,
            })
        }

        fn record(kind: usize) -> Vec<u8> {
            match kind {
                0 => fork_record(42),
                1 => exec_record(42, "/usr/bin/python3", &["python3", "-m", "é🦀"]),
                2 => exit_record(42),
                3 => thread_record(42),
                _ => bytes_of(&DoomedEvent {
                    header: header(EventKind::Doomed, 42),
                }),
            }
        }

        fn check(buf: &[u8]) -> Result<(), TestCaseError> {
            let kind = (buf.len() >= 4).then(|| u32::from_ne_bytes(buf[..4].try_into().unwrap()));
            match decode(buf) {
                Ok(ev) => {
                    let need = match ev {
                        Event::Fork(_) => std::mem::size_of::<ForkEvent>(),
                        Event::Exec(_) => std::mem::size_of::<ExecEvent>(),
                        Event::Exit(_) => std::mem::size_of::<ExitEvent>(),
                        Event::Thread(_) => std::mem::size_of::<ThreadEvent>(),
                        Event::Doomed(_) => std::mem::size_of::<DoomedEvent>(),
                    };
                    prop_assert!(buf.len() >= need);
                }
                Err(DecodeError::Short { len, need, .. }) => {
                    prop_assert_eq!(len, buf.len());
                    prop_assert!(len < need);
                }
                Err(DecodeError::UnknownKind(k)) => {
                    prop_assert_eq!(Some(k), kind);
                    prop_assert!(EventKind::from_u32(k).is_none());
                }
                Err(DecodeError::BadLength { len, max, .. }) => {
                    prop_assert_eq!(kind, Some(EventKind::Exec as u32));
                    prop_assert!(len as usize > max);
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(crate::fuzz_config())]

            #[test]
            fn arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..1_200)) {
                check(&buf)?;
            }

            /// Valid records of every kind with bytes changed and cut short anywhere.
            #[test]
            fn mutated_records(
                kind in 0..5usize,
                changes in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..12),
                lengths in proptest::collection::vec((any::<Index>(), any::<u32>()), 0..2),
                cut in proptest::option::of(any::<Index>()),
            ) {
                let mut buf = record(kind);
                for (at, byte) in changes {
                    let i = at.index(buf.len());
                    buf[i] = byte;
                }
                if kind == 1 {
                    // filename_len and args_len (bytes 44..52), with any value.
                    for (which, len) in lengths {
                        let at = 44 + 4 * which.index(2);
                        buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
                    }
                }
                if let Some(cut) = cut {
                    buf.truncate(cut.index(buf.len() + 1));
                }
                check(&buf)?;
            }
        }
    }
}
