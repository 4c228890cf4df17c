//! Who is never signalled: pid 1, kernel threads, guardian and its ancestors, the built-in and
//! policy-named process names, and processes matching the policy's `protect` selectors.

use std::collections::HashSet;

use crate::{
    policy::selector::{Candidate, Selector},
    procs::{self, Pinned},
    table::Process,
};

/// Process names never signalled whatever the policy says.
pub const BUILTIN_PROTECTED: [&str; 4] = ["init", "systemd", "sshd", "guardian"];

/// The policy's `protect` list: process names, and selectors (the keys of `match`).
#[derive(Clone, Debug, Default)]
pub struct Protect {
    /// `comm` names, 1 to 15 characters.
    pub names: Vec<String>,
    pub selectors: Vec<Selector>,
}

/// Who must never be signalled.
#[derive(Debug)]
pub struct Protections {
    self_pid: u32,
    /// guardian's ancestors (its launcher, shell, supervisor...).
    ancestors: HashSet<u32>,
    names: Vec<String>,
    selectors: Vec<Selector>,
}

impl Protections {
    pub fn new(protect: &Protect) -> Self {
        let self_pid = std::process::id();
        let mut ancestors = HashSet::new();
        let mut pid = self_pid;
        for _ in 0..4096 {
            match procs::stat(pid) {
                Some(st) if st.ppid > 0 && ancestors.insert(st.ppid) => pid = st.ppid,
                _ => break,
            }
        }
        let mut names: Vec<String> = BUILTIN_PROTECTED.iter().map(|s| s.to_string()).collect();
        names.extend(protect.names.iter().cloned());
        Self {
            self_pid,
            ancestors,
            names,
            selectors: protect.selectors.clone(),
        }
    }

    /// Why `p` must not be signalled, if it must not: the checks that need no `/proc` read.
    pub fn refuse(&self, p: &Process) -> Option<String> {
        self.refuse_parts(p.pid, p.kernel_thread, &p.comm)
    }

    /// Every check on what `/proc` shows right now, read through `p` (the table may lag an
    /// exec, and selectors need the process's current executable, user and cgroups). Called on
    /// the freshly pinned process right before a signal.
    pub fn refuse_now(&mut self, p: &Pinned) -> Option<String> {
        if let Some(why) = self.refuse_parts(p.pid, p.stat.kernel_thread, &p.stat.comm) {
            return Some(why);
        }
        let c = Candidate::pinned(p);
        for s in &mut self.selectors {
            // A user created since guardian started is protected from then on.
            s.resolve_user();
            if s.matches(&c) {
                return Some(format!("protected by `{}`", s.describe()));
            }
        }
        None
    }

    fn refuse_parts(&self, pid: u32, kernel_thread: bool, comm: &str) -> Option<String> {
        if pid <= 1 {
            return Some(format!("pid {pid} is init"));
        }
        if pid == self.self_pid {
            return Some("guardian itself".into());
        }
        if self.ancestors.contains(&pid) {
            return Some("an ancestor of guardian".into());
        }
        if kernel_thread {
            return Some("a kernel thread".into());
        }
        if self.names.iter().any(|n| n == comm) {
            return Some(format!("protected name `{comm}`"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::selector::User, procs::Pin};

    fn proc(pid: u32, comm: &str) -> Process {
        Process::for_test(pid, comm)
    }

    fn names(n: &[&str]) -> Protect {
        Protect {
            names: n.iter().map(|s| s.to_string()).collect(),
            selectors: Vec::new(),
        }
    }

    #[test]
    fn protections_refuse_init_self_ancestors_kthreads_and_names() {
        let prot = Protections::new(&names(&["redis-server"]));
        assert!(prot.refuse(&proc(1, "x")).unwrap().contains("init"));
        assert!(prot.refuse(&proc(std::process::id(), "x")).is_some());
        let parent = std::os::unix::process::parent_id();
        assert!(prot
            .refuse(&proc(parent, "x"))
            .unwrap()
            .contains("ancestor"));
        let mut k = proc(99_999, "kworker/0:1");
        k.kernel_thread = true;
        assert!(prot.refuse(&k).unwrap().contains("kernel thread"));
        assert!(prot.refuse(&proc(99_999, "sshd")).is_some());
        assert!(prot.refuse(&proc(99_999, "redis-server")).is_some());
        assert!(prot.refuse(&proc(99_999, "python3")).is_none());
    }

    /// Selectors are checked on the pinned process, against what `/proc` says now.
    #[test]
    fn selectors_protect_the_pinned_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let Pin::Ok(pinned) = Pinned::open(pid, None) else {
            panic!("cannot pin the child");
        };
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        let by_user = |uid| Protect {
            names: Vec::new(),
            selectors: vec![Selector {
                user: Some(User::Id(uid)),
                ..Selector::default()
            }],
        };
        let why = Protections::new(&by_user(euid)).refuse_now(&pinned);
        let other = Protections::new(&by_user(euid.wrapping_add(1))).refuse_now(&pinned);
        let by_name = Protections::new(&names(&["sleep"])).refuse_now(&pinned);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(why, Some(format!("protected by `uid={euid}`")));
        assert_eq!(other, None, "another user's process is not protected");
        assert_eq!(by_name, Some("protected name `sleep`".into()));
        assert_eq!(
            Protections::new(&by_user(euid)).refuse(&proc(pid, "sleep")),
            None,
            "the cheap check reads nothing"
        );
    }
}
