//! Process selectors: the `match` and `orphan_match` tables of a policy, and `protect` tables.
//!
//! What the kernel event says of a process (its name, its command line) is taken as given; every
//! other fact (the executable, the user, the cgroups) is read from `/proc`, through one
//! [`Pinned`] handle on the process so that a reused pid cannot lend another process's facts.

use std::{borrow::Cow, cell::OnceCell};

use globset::GlobMatcher;
use regex::Regex;
use serde::Serialize;

use crate::{
    kernel::events::Exec,
    procs::{Pin, Pinned, ProcInfo},
    table::Process,
};

/// Conditions that must all hold. Built by [`crate::policy`].
#[derive(Clone, Debug, Default)]
pub struct Selector {
    /// Searched in the space-joined command line.
    pub cmdline: Option<Regex>,
    /// Glob on the executable the kernel runs (`/proc/PID/exe`: symlinks and `..` resolved; for
    /// a `#!` script, its interpreter). `*` stops at `/`, `**` crosses it.
    pub exe: Option<(String, GlobMatcher)>,
    /// Glob on the process name (`comm`, at most 15 characters).
    pub comm: Option<(String, GlobMatcher)>,
    /// A cgroup path (no trailing `/`): the process must be in it or below it, in one of its
    /// hierarchies (`/proc/PID/cgroup`), by whole path components.
    pub cgroup: Option<String>,
    /// Effective user.
    pub user: Option<User>,
}

/// The `user` condition: an effective uid, given as a number or as a user name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    Id(u32),
    /// `uid` is `None` while the name does not resolve on this host: then no process matches.
    Name {
        name: String,
        uid: Option<u32>,
    },
}

impl User {
    /// A user name, looked up now (a name that does not resolve yet matches nothing).
    pub fn named(name: String) -> Self {
        let uid = lookup(&name);
        Self::Name { name, uid }
    }

    pub fn uid(&self) -> Option<u32> {
        match self {
            Self::Id(uid) => Some(*uid),
            Self::Name { uid, .. } => *uid,
        }
    }

    /// Looks an unresolved name up again; true if it resolves now.
    pub fn resolve(&mut self) -> bool {
        match self {
            Self::Name {
                name,
                uid: uid @ None,
            } => {
                *uid = lookup(name);
                uid.is_some()
            }
            _ => false,
        }
    }

    /// The name, if it does not resolve (yet).
    pub fn unresolved(&self) -> Option<&str> {
        match self {
            Self::Name { name, uid: None } => Some(name),
            _ => None,
        }
    }

    /// The condition as written, with what a name resolved to: `1000`, `alice (uid 1000)`.
    fn pattern(&self) -> String {
        match self {
            Self::Id(uid) => uid.to_string(),
            Self::Name {
                name,
                uid: Some(uid),
            } => format!("{name} (uid {uid})"),
            Self::Name { name, uid: None } => {
                format!("{name} (no such user yet: matches nothing)")
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Id(uid) => format!("uid={uid}"),
            Self::Name { .. } => format!("user={}", self.pattern()),
        }
    }
}

fn lookup(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// Whether `path` is the cgroup `under` or lies below it (whole components: `/a/b` holds
/// `/a/b/c`, not `/a/bc`).
fn in_cgroup(path: &str, under: &str) -> bool {
    under == "/"
        || path
            .strip_prefix(under)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.cmdline.is_none()
            && self.exe.is_none()
            && self.comm.is_none()
            && self.cgroup.is_none()
            && self.user.is_none()
    }

    /// Whether the selector names something a local user cannot choose for their own process:
    /// its user, its cgroup or its executable. A command line or a name anyone can copy.
    pub fn is_pinned(&self) -> bool {
        self.user.is_some() || self.cgroup.is_some() || self.exe.is_some()
    }

    /// Looks an unresolved user name up again; true if the selector changed.
    pub fn resolve_user(&mut self) -> bool {
        self.user.as_mut().is_some_and(User::resolve)
    }

    /// The user name this selector waits for, if it does not resolve (yet).
    pub fn unresolved_user(&self) -> Option<&str> {
        self.user.as_ref().and_then(User::unresolved)
    }

    /// Whether the candidate satisfies every condition. Conditions that need `/proc` are
    /// checked last and only if the others hold; a process that cannot be pinned (gone, or its
    /// pid reused) fails them all.
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        self.keys().all(|k| k.holds(c))
    }

    /// Every condition checked on the candidate, in the order [`Selector::matches`] checks them,
    /// with what the candidate showed (`/proc` is read for all of them).
    pub fn checks(&self, c: &Candidate<'_>) -> Vec<KeyCheck> {
        self.keys().map(|k| k.check(c)).collect()
    }

    /// The condition that makes [`Selector::matches`] fail, if one does: the first that does not
    /// hold, reading `/proc` only as far as `matches` would.
    pub fn first_failure(&self, c: &Candidate<'_>) -> Option<KeyCheck> {
        self.keys().find(|k| !k.holds(c)).map(|k| k.check(c))
    }

    /// The conditions in the order they are checked: what the event gives first, then what
    /// needs `/proc`.
    fn keys(&self) -> impl Iterator<Item = Key<'_>> {
        [
            self.comm.as_ref().map(|(g, m)| Key::Comm(g, m)),
            self.cmdline.as_ref().map(Key::Cmdline),
            self.user.as_ref().map(Key::User),
            self.exe.as_ref().map(|(g, m)| Key::Exe(g, m)),
            self.cgroup.as_deref().map(Key::Cgroup),
        ]
        .into_iter()
        .flatten()
    }

    /// A one-line description, for `guardian check`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(re) = &self.cmdline {
            parts.push(format!("cmdline~/{}/", re.as_str()));
        }
        if let Some((g, _)) = &self.exe {
            parts.push(format!("exe={g}"));
        }
        if let Some((g, _)) = &self.comm {
            parts.push(format!("comm={g}"));
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup={c} (and below)"));
        }
        if let Some(u) = &self.user {
            parts.push(u.describe());
        }
        parts.join(" ")
    }
}

/// One condition of a selector checked on one process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyCheck {
    /// `comm`, `cmdline`, `user`, `exe` or `cgroup`.
    pub key: &'static str,
    /// What the policy says.
    pub pattern: String,
    /// What the process showed; `None` when it could not be read (it is gone, its pid belongs
    /// to another process now, or `/proc` refused).
    pub value: Option<String>,
    pub matched: bool,
}

/// One condition of a selector.
enum Key<'s> {
    Comm(&'s str, &'s GlobMatcher),
    Cmdline(&'s Regex),
    User(&'s User),
    Exe(&'s str, &'s GlobMatcher),
    Cgroup(&'s str),
}

impl Key<'_> {
    /// The one place a condition is decided.
    fn holds(&self, c: &Candidate<'_>) -> bool {
        match *self {
            Self::Comm(_, g) => g.is_match(c.comm),
            Self::Cmdline(re) => c.cmdline().is_some_and(|cmd| re.is_match(cmd)),
            Self::User(u) => u.uid().is_some() && c.euid() == u.uid(),
            Self::Exe(_, g) => c.exe().is_some_and(|e| g.is_match(e)),
            Self::Cgroup(under) => c
                .cgroups()
                .is_some_and(|paths| paths.iter().any(|p| in_cgroup(p, under))),
        }
    }

    /// The condition's outcome with what the candidate showed (read once: the candidate keeps
    /// what it read).
    fn check(&self, c: &Candidate<'_>) -> KeyCheck {
        let matched = self.holds(c);
        let (key, pattern, value) = match *self {
            Self::Comm(g, _) => ("comm", g.to_owned(), Some(c.comm.to_owned())),
            Self::Cmdline(re) => (
                "cmdline",
                re.as_str().to_owned(),
                c.cmdline().map(str::to_owned),
            ),
            Self::User(u) => ("user", u.pattern(), c.euid().map(describe_uid)),
            Self::Exe(g, _) => ("exe", g.to_owned(), c.exe().map(str::to_owned)),
            Self::Cgroup(under) => {
                let paths = c.cgroups().map(|paths| {
                    // The path that holds it when one does, else all of them.
                    match paths.iter().find(|p| in_cgroup(p, under)) {
                        Some(p) => p.clone(),
                        None => paths.join(", "),
                    }
                });
                ("cgroup", under.to_owned(), paths)
            }
        };
        KeyCheck {
            key,
            pattern,
            value,
            matched,
        }
    }
}

/// `1000 (alice)`, or the bare uid when it has no name.
fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{uid} ({})", u.name),
        _ => uid.to_string(),
    }
}

/// How a candidate reaches its `/proc` directory.
enum ProcHandle<'a> {
    /// Already pinned by the caller.
    Pinned(&'a Pinned),
    /// Opened (and its start time checked) on first use.
    Lazy {
        start_ns: Option<u64>,
        proc: OnceCell<Option<Pinned>>,
    },
}

/// A process being matched. What the kernel event gave (name, command line) is passed in; the
/// rest is read on first use through one [`Pinned`] handle.
pub struct Candidate<'a> {
    pub pid: u32,
    pub comm: &'a str,
    /// Given, or read through the handle on first use (`None`: unreadable).
    cmdline: OnceCell<Option<Cow<'a, str>>>,
    handle: ProcHandle<'a>,
    exe: OnceCell<Option<String>>,
    cgroups: OnceCell<Option<Vec<String>>>,
    euid: OnceCell<Option<u32>>,
}

impl<'a> Candidate<'a> {
    /// A process known by its pid and, when known, its start time (boot ns): `/proc` facts are
    /// read only while that pid still belongs to the process that started then.
    pub fn new(
        pid: u32,
        start_ns: Option<u64>,
        comm: &'a str,
        cmdline: impl Into<Cow<'a, str>>,
    ) -> Self {
        Self::with(
            pid,
            comm,
            OnceCell::from(Some(cmdline.into())),
            ProcHandle::Lazy {
                start_ns,
                proc: OnceCell::new(),
            },
        )
    }

    /// A process already pinned: everything, its name and command line included, is what
    /// `/proc` shows now.
    pub fn pinned(p: &'a Pinned) -> Self {
        Self::with(p.pid, &p.stat.comm, OnceCell::new(), ProcHandle::Pinned(p))
    }

    fn with(
        pid: u32,
        comm: &'a str,
        cmdline: OnceCell<Option<Cow<'a, str>>>,
        handle: ProcHandle<'a>,
    ) -> Self {
        Self {
            pid,
            comm,
            cmdline,
            handle,
            exe: OnceCell::new(),
            cgroups: OnceCell::new(),
            euid: OnceCell::new(),
        }
    }

    /// The pinned process, or `None` if it is gone or its pid now belongs to another.
    fn proc(&self) -> Option<&Pinned> {
        match &self.handle {
            ProcHandle::Pinned(p) => Some(p),
            ProcHandle::Lazy { start_ns, proc } => proc
                .get_or_init(|| match Pinned::open(self.pid, *start_ns) {
                    Pin::Ok(p) => Some(p),
                    _ => None,
                })
                .as_ref(),
        }
    }

    fn cmdline(&self) -> Option<&str> {
        self.cmdline
            .get_or_init(|| self.proc()?.argv().map(|a| Cow::Owned(a.join(" "))))
            .as_deref()
    }

    fn exe(&self) -> Option<&str> {
        self.exe.get_or_init(|| self.proc()?.exe()).as_deref()
    }

    fn cgroups(&self) -> Option<&[String]> {
        self.cgroups
            .get_or_init(|| Some(parse_cgroups(&self.proc()?.cgroup_text()?)))
            .as_deref()
    }

    fn euid(&self) -> Option<u32> {
        *self.euid.get_or_init(|| self.proc()?.euid())
    }
}

impl<'a> From<&'a Process> for Candidate<'a> {
    fn from(p: &'a Process) -> Self {
        Self::new(p.pid, Some(p.start_ns), &p.comm, p.cmdline())
    }
}

impl<'a> From<&'a ProcInfo> for Candidate<'a> {
    fn from(p: &'a ProcInfo) -> Self {
        Self::new(p.pid, Some(p.start_ns), &p.comm, p.argv.join(" "))
    }
}

/// The path the exec was called with (`Exec::filename`) is not used: `/opt/app/bin/../../x` or a
/// symlink would pass for anything. The executable is read from `/proc` instead. The effective
/// uid is the one the exec gave the process, when the kernel read it: the kernel's exec filter
/// decided on that uid too, so the two cannot disagree about a process that changes its uid
/// right after exec.
impl<'a> From<&'a Exec> for Candidate<'a> {
    fn from(e: &'a Exec) -> Self {
        let c = Self::new(e.pid, e.start_ns, &e.comm, e.argv.join(" "));
        if let Some(uid) = e.euid {
            let _ = c.euid.set(Some(uid));
        }
        c
    }
}

/// The paths of `/proc/PID/cgroup` ("ID:controllers:path" per line), without duplicates.
pub fn parse_cgroups(text: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for (_, path) in crate::act::cgroup::entries(text) {
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_owned());
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use globset::{Glob, GlobBuilder};

    fn glob(g: &str) -> Option<(String, GlobMatcher)> {
        Some((g.into(), Glob::new(g).unwrap().compile_matcher()))
    }

    fn exe_glob(g: &str) -> Option<(String, GlobMatcher)> {
        let m = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .unwrap()
            .compile_matcher();
        Some((g.into(), m))
    }

    fn me() -> (u32, u64) {
        let me = std::process::id();
        (me, crate::procs::stat(me).unwrap().start_ns)
    }

    fn euid() -> u32 {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn all_conditions_must_hold() {
        let s = Selector {
            cmdline: Some(Regex::new(r"apps\.mtproto\.worker").unwrap()),
            comm: glob("python*"),
            ..Selector::default()
        };
        let c = |comm, cmd| Candidate::new(1, None, comm, cmd);
        assert!(s.matches(&c("python3", "python -m apps.mtproto.worker --interval 10")));
        assert!(!s.matches(&c("bash", "python -m apps.mtproto.worker")));
        assert!(!s.matches(&c("python3", "python -m apps.api")));
    }

    /// The path given to execve is the caller's choice: only the executable the kernel resolved
    /// counts.
    #[test]
    fn exe_is_what_the_kernel_runs_not_the_exec_path() {
        let (pid, start) = me();
        let real = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let exec = |filename: &str| Exec {
            ts_ns: start,
            pid,
            ppid: None,
            start_ns: Some(start),
            comm: "x".into(),
            euid: None,
            filename: filename.into(),
            argv: vec!["x".into()],
            argv_incomplete: false,
        };
        let opt = Selector {
            exe: exe_glob("/opt/app/bin/*"),
            ..Selector::default()
        };
        // A symlink placed there, or a path climbing out of it: this process runs neither.
        for forged in ["/opt/app/bin/link", "/opt/app/bin/../../../tmp/x"] {
            assert!(!opt.matches(&Candidate::from(&exec(forged))), "{forged}");
        }
        let dir = globset::escape(&real.parent().unwrap().display().to_string());
        let own = Selector {
            exe: exe_glob(&format!("{dir}/*")),
            ..Selector::default()
        };
        assert!(own.matches(&Candidate::from(&exec("/elsewhere/x"))));
    }

    /// `/proc` facts come from the process that started when the candidate says, or not at all.
    #[test]
    fn proc_facts_need_the_same_process() {
        let (pid, start) = me();
        let s = Selector {
            user: Some(User::Id(euid())),
            ..Selector::default()
        };
        assert!(s.matches(&Candidate::new(pid, Some(start), "x", "")));
        assert!(s.matches(&Candidate::new(pid, None, "x", "")));
        let later = start + 3_600 * 1_000_000_000;
        assert!(
            !s.matches(&Candidate::new(pid, Some(later), "x", "")),
            "a pid reused since"
        );
        assert!(!s.matches(&Candidate::new(u32::MAX, None, "x", "")), "gone");
        let other = Selector {
            user: Some(User::Id(euid().wrapping_add(1))),
            ..Selector::default()
        };
        assert!(!other.matches(&Candidate::new(pid, Some(start), "x", "")));
    }

    #[test]
    fn a_pinned_candidate_reads_everything_from_proc() {
        let (pid, start) = me();
        let Pin::Ok(p) = Pinned::open(pid, Some(start)) else {
            panic!("cannot pin this process");
        };
        let c = Candidate::pinned(&p);
        let argv0 = std::env::args().next().unwrap();
        let s = Selector {
            cmdline: Some(Regex::new(&regex::escape(&argv0)).unwrap()),
            user: Some(User::Id(euid())),
            ..Selector::default()
        };
        assert!(s.matches(&c));
        let cmd = Selector {
            cmdline: Some(Regex::new("^no such command line$").unwrap()),
            ..Selector::default()
        };
        assert!(!cmd.matches(&c));
    }

    #[test]
    fn unresolved_users_match_nothing() {
        let (pid, start) = me();
        let mut s = Selector {
            user: Some(User::Name {
                name: "root".into(),
                uid: None,
            }),
            ..Selector::default()
        };
        assert_eq!(s.unresolved_user(), Some("root"));
        assert!(!s.matches(&Candidate::new(pid, Some(start), "x", "")));
        assert!(s.resolve_user(), "root exists");
        assert_eq!(s.user.as_ref().unwrap().uid(), Some(0));
        assert!(!s.resolve_user(), "resolved once");
        assert_eq!(s.unresolved_user(), None);
    }

    #[test]
    fn cgroups_match_by_whole_components() {
        assert!(in_cgroup("/a/b", "/a/b"));
        assert!(in_cgroup("/a/b/c", "/a/b"));
        assert!(!in_cgroup("/a/bc", "/a/b"));
        assert!(!in_cgroup("/a", "/a/b"));
        assert!(in_cgroup("/anything", "/"));
        // The same through a real process's /proc/PID/cgroup.
        let (pid, start) = me();
        let cgroups = parse_cgroups(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        let at = |c: &str| Selector {
            cgroup: Some(c.into()),
            ..Selector::default()
        };
        let c = Candidate::new(pid, Some(start), "x", "");
        assert!(at(&cgroups[0]).matches(&c));
        assert!(!at("/no/such/cgroup").matches(&c));
        match cgroups.iter().find(|p| p.len() > 2) {
            Some(own) => assert!(
                !at(&own[..own.len() - 1]).matches(&c),
                "a cut-off name is another cgroup"
            ),
            None => eprintln!("only root cgroups here: the component check ran on strings only"),
        }
    }

    /// `checks` and `first_failure` say what `matches` decides, key by key, in its order; the
    /// first failure reads no more of `/proc` than `matches` does.
    #[test]
    fn checks_agree_with_matches_key_by_key() {
        let (pid, start) = me();
        let s = Selector {
            cmdline: Some(Regex::new("worker").unwrap()),
            comm: glob("py*"),
            user: Some(User::Id(euid())),
            cgroup: Some("/".into()),
            ..Selector::default()
        };
        let cases = [
            ("python3", "python3 worker", true),
            ("bash", "python3 worker", false),
            ("python3", "python3 api", false),
        ];
        for (comm, cmd, want) in cases {
            let c = Candidate::new(pid, Some(start), comm, cmd);
            let checks = s.checks(&c);
            let keys: Vec<&str> = checks.iter().map(|k| k.key).collect();
            assert_eq!(keys, ["comm", "cmdline", "user", "cgroup"], "match order");
            assert_eq!(s.matches(&c), want, "{comm} {cmd}");
            assert_eq!(checks.iter().all(|k| k.matched), want);
            assert_eq!(
                s.first_failure(&c),
                checks.iter().find(|k| !k.matched).cloned()
            );
        }
        let c = Candidate::new(pid, Some(start), "python3", "python3 api");
        let miss = s.first_failure(&c).unwrap();
        assert_eq!(
            (miss.key, miss.pattern.as_str(), miss.value.as_deref()),
            ("cmdline", "worker", Some("python3 api"))
        );
        assert_eq!(
            c.euid.get(),
            None,
            "stopped at the cmdline: user never read"
        );
        let user = &s.checks(&c)[2];
        assert!(
            user.matched
                && user
                    .value
                    .as_deref()
                    .unwrap()
                    .starts_with(&euid().to_string())
        );
        // A process that is gone shows no value for what `/proc` would have said.
        let gone = Candidate::new(u32::MAX, None, "python3", "python3 worker");
        let miss = s.first_failure(&gone).unwrap();
        assert_eq!((miss.key, miss.value), ("user", None));
    }

    #[test]
    fn parses_hybrid_cgroup_file() {
        let text = "12:pids:/user.slice\n1:name=systemd:/user.slice/x.scope\n0::/\n";
        assert_eq!(
            parse_cgroups(text),
            vec!["/user.slice", "/user.slice/x.scope", "/"]
        );
    }
}
