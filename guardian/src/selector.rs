//! Process selectors: the `match` and `orphan_match` tables of a policy.

use std::{borrow::Cow, cell::OnceCell};

use globset::GlobMatcher;
use regex::Regex;

use crate::{events::Exec, procs::ProcInfo, table::Process};

/// Conditions that must all hold. Built by [`crate::policy`].
#[derive(Debug, Default)]
pub struct Selector {
    /// Searched in the space-joined command line.
    pub cmdline: Option<Regex>,
    /// Glob on the executable path (as exec'd, or as resolved in `/proc/PID/exe`).
    pub exe: Option<(String, GlobMatcher)>,
    /// Glob on the process name (`comm`, at most 15 characters).
    pub comm: Option<(String, GlobMatcher)>,
    /// Prefix of one of the process's cgroup paths (`/proc/PID/cgroup`).
    pub cgroup: Option<String>,
    /// Effective user id.
    pub user: Option<u32>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.cmdline.is_none()
            && self.exe.is_none()
            && self.comm.is_none()
            && self.cgroup.is_none()
            && self.user.is_none()
    }

    /// Whether the candidate satisfies every condition. Conditions that need `/proc` are
    /// checked last and only if the others hold.
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        if let Some((_, g)) = &self.comm {
            if !g.is_match(c.comm) {
                return false;
            }
        }
        if let Some(re) = &self.cmdline {
            if !re.is_match(&c.cmdline) {
                return false;
            }
        }
        if let Some((_, g)) = &self.exe {
            let direct = c.exe.is_some_and(|e| g.is_match(e));
            if !direct && !c.resolved_exe().is_some_and(|e| g.is_match(e)) {
                return false;
            }
        }
        if let Some(prefix) = &self.cgroup {
            if !c.cgroups().iter().any(|p| p.starts_with(prefix.as_str())) {
                return false;
            }
        }
        if let Some(uid) = self.user {
            if c.uid() != Some(uid) {
                return false;
            }
        }
        true
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
            parts.push(format!("cgroup={c}*"));
        }
        if let Some(u) = self.user {
            parts.push(format!("uid={u}"));
        }
        parts.join(" ")
    }
}

/// A process being matched. What the kernel event gave is passed in; the rest is read from
/// `/proc` on first use.
pub struct Candidate<'a> {
    pub pid: u32,
    pub comm: &'a str,
    pub cmdline: Cow<'a, str>,
    pub exe: Option<&'a str>,
    resolved_exe: OnceCell<Option<String>>,
    cgroups: OnceCell<Vec<String>>,
    uid: OnceCell<Option<u32>>,
}

impl<'a> Candidate<'a> {
    pub fn new(
        pid: u32,
        comm: &'a str,
        cmdline: impl Into<Cow<'a, str>>,
        exe: Option<&'a str>,
    ) -> Self {
        Self {
            pid,
            comm,
            cmdline: cmdline.into(),
            exe,
            resolved_exe: OnceCell::new(),
            cgroups: OnceCell::new(),
            uid: OnceCell::new(),
        }
    }

    fn resolved_exe(&self) -> Option<&str> {
        self.resolved_exe
            .get_or_init(|| {
                std::fs::read_link(format!("/proc/{}/exe", self.pid))
                    .ok()
                    .map(|p| p.to_string_lossy().into_owned())
            })
            .as_deref()
    }

    fn cgroups(&self) -> &[String] {
        self.cgroups.get_or_init(|| {
            std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid))
                .map(|text| parse_cgroups(&text))
                .unwrap_or_default()
        })
    }

    fn uid(&self) -> Option<u32> {
        *self.uid.get_or_init(|| {
            procfs::process::Process::new(self.pid as i32)
                .ok()?
                .status()
                .ok()
                .map(|s| s.euid)
        })
    }
}

impl<'a> From<&'a Process> for Candidate<'a> {
    fn from(p: &'a Process) -> Self {
        Self::new(p.pid, &p.comm, p.cmdline(), p.exe.as_deref())
    }
}

impl<'a> From<&'a ProcInfo> for Candidate<'a> {
    fn from(p: &'a ProcInfo) -> Self {
        Self::new(p.pid, &p.comm, p.argv.join(" "), p.exe.as_deref())
    }
}

impl<'a> From<&'a Exec> for Candidate<'a> {
    fn from(e: &'a Exec) -> Self {
        Self::new(e.pid, &e.comm, e.argv.join(" "), Some(&e.filename))
    }
}

/// The paths of `/proc/PID/cgroup` ("ID:controllers:path" per line), without duplicates.
pub fn parse_cgroups(text: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for (_, path) in crate::cgroup::entries(text) {
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_owned());
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use globset::Glob;

    fn glob(g: &str) -> Option<(String, GlobMatcher)> {
        Some((g.into(), Glob::new(g).unwrap().compile_matcher()))
    }

    #[test]
    fn all_conditions_must_hold() {
        let s = Selector {
            cmdline: Some(Regex::new(r"apps\.mtproto\.worker").unwrap()),
            comm: glob("python*"),
            ..Selector::default()
        };
        let yes = Candidate::new(
            1,
            "python3",
            "python -m apps.mtproto.worker --interval 10",
            None,
        );
        assert!(s.matches(&yes));
        let wrong_comm = Candidate::new(1, "bash", "python -m apps.mtproto.worker", None);
        assert!(!s.matches(&wrong_comm));
        let wrong_cmd = Candidate::new(1, "python3", "python -m apps.api", None);
        assert!(!s.matches(&wrong_cmd));
    }

    #[test]
    fn exe_glob_matches_the_exec_path() {
        let s = Selector {
            exe: glob("/usr/bin/python3*"),
            ..Selector::default()
        };
        assert!(s.matches(&Candidate::new(
            u32::MAX,
            "x",
            "",
            Some("/usr/bin/python3.11")
        )));
        assert!(!s.matches(&Candidate::new(
            u32::MAX,
            "x",
            "",
            Some("/usr/local/bin/python3")
        )));
    }

    #[test]
    fn cgroup_and_user_are_read_from_proc() {
        let me = std::process::id();
        let cgroups =
            parse_cgroups(&std::fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap());
        let s = Selector {
            cgroup: Some(cgroups[0].clone()),
            // SAFETY: no preconditions.
            user: Some(unsafe { libc::geteuid() }),
            ..Selector::default()
        };
        assert!(s.matches(&Candidate::new(me, "x", "", None)));
        let other = Selector {
            cgroup: Some("/no/such/cgroup".into()),
            ..Selector::default()
        };
        assert!(!other.matches(&Candidate::new(me, "x", "", None)));
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
