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
    /// The guardian daemon, if known.
    guardian: Option<u32>,
    /// guardian's ancestors (its launcher, shell, supervisor...).
    ancestors: HashSet<u32>,
    names: Vec<String>,
    selectors: Vec<Selector>,
}

impl Protections {
    /// The protections of the guardian running them.
    pub fn new(protect: &Protect) -> Self {
        Self::of(protect, Some(std::process::id()))
    }

    /// The protections of the guardian daemon `guardian` (with its ancestors); `None` when no
    /// daemon is known, and only the other protections apply.
    pub fn of(protect: &Protect, guardian: Option<u32>) -> Self {
        let mut ancestors = HashSet::new();
        if let Some(mut pid) = guardian {
            for _ in 0..4096 {
                match procs::stat(pid) {
                    Some(st) if st.ppid > 0 && ancestors.insert(st.ppid) => pid = st.ppid,
                    _ => break,
                }
            }
        }
        let mut names: Vec<String> = BUILTIN_PROTECTED.iter().map(|s| s.to_string()).collect();
        names.extend(protect.names.iter().cloned());
        Self {
            guardian,
            ancestors,
            names,
            selectors: protect.selectors.clone(),
        }
    }

    /// Why `p` must not be signalled, if it must not: the checks that need no `/proc` read.
    pub fn refuse(&self, p: &Process) -> Option<String> {
        self.plain(p.pid, p.kernel_thread, &p.comm).next()
    }

    /// Every check on what `/proc` shows right now, read through `p` (the table may lag an
    /// exec, and selectors need the process's current executable, user and cgroups). Called on
    /// the freshly pinned process right before a signal.
    pub fn refuse_now(&mut self, p: &Pinned) -> Option<String> {
        // A user created since guardian started is protected from then on.
        for s in &mut self.selectors {
            s.resolve_user();
        }
        self.all(p).next()
    }

    /// Every protection that applies to `p`, as [`Protections::refuse_now`] would check it now
    /// (without looking user names up again), in the order they are checked.
    pub fn applying(&self, p: &Pinned) -> Vec<String> {
        self.all(p).collect()
    }

    fn all<'s>(&'s self, p: &'s Pinned) -> impl Iterator<Item = String> + 's {
        let c = Candidate::pinned(p);
        self.plain(p.pid, p.stat.kernel_thread, &p.stat.comm).chain(
            self.selectors
                .iter()
                .filter(move |s| s.matches(&c))
                .map(|s| format!("protected by `{}`", s.describe())),
        )
    }

    /// The protections that need no `/proc` read, each said only if it applies.
    fn plain<'s>(
        &'s self,
        pid: u32,
        kernel_thread: bool,
        comm: &'s str,
    ) -> impl Iterator<Item = String> + 's {
        [
            (pid <= 1).then(|| format!("pid {pid} is init")),
            (self.guardian == Some(pid)).then(|| "guardian itself".into()),
            self.ancestors
                .contains(&pid)
                .then(|| "an ancestor of guardian".into()),
            kernel_thread.then(|| "a kernel thread".into()),
            self.names
                .iter()
                .any(|n| n == comm)
                .then(|| format!("protected name `{comm}`")),
        ]
        .into_iter()
        .flatten()
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
        // Without a known daemon, this process and its ancestors are nobody in particular.
        let none = Protections::of(&names(&[]), None);
        assert_eq!(none.refuse(&proc(std::process::id(), "x")), None);
        assert_eq!(none.refuse(&proc(parent, "x")), None);
        assert!(none.refuse(&proc(1, "x")).is_some());
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
        let mut both = by_user(euid);
        both.names.push("sleep".into());
        let all = Protections::new(&both).applying(&pinned);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(why, Some(format!("protected by `uid={euid}`")));
        assert_eq!(other, None, "another user's process is not protected");
        assert_eq!(by_name, Some("protected name `sleep`".into()));
        assert_eq!(
            all,
            [
                "protected name `sleep`".to_owned(),
                format!("protected by `uid={euid}`")
            ],
            "every protection that applies, the first being the refusal's"
        );
        assert_eq!(
            Protections::new(&by_user(euid)).refuse(&proc(pid, "sleep")),
            None,
            "the cheap check reads nothing"
        );
    }
}
