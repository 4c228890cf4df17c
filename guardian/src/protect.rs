//! Who is never signalled: pid 1, kernel threads, guardian and its ancestors, and protected
//! process names.

use std::collections::HashSet;

use crate::{
    procs::{self, Pinned},
    table::Process,
};

/// Process names never signalled whatever the policy says.
pub const BUILTIN_PROTECTED: [&str; 4] = ["init", "systemd", "sshd", "guardian"];

/// Who must never be signalled.
#[derive(Debug)]
pub struct Protections {
    self_pid: u32,
    /// guardian's ancestors (its launcher, shell, supervisor...).
    ancestors: HashSet<u32>,
    names: Vec<String>,
}

impl Protections {
    pub fn new(extra: &[String]) -> Self {
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
        names.extend(extra.iter().cloned());
        Self {
            self_pid,
            ancestors,
            names,
        }
    }

    /// Why `p` must not be signalled, if it must not.
    pub fn refuse(&self, p: &Process) -> Option<String> {
        self.refuse_parts(p.pid, p.kernel_thread, &p.comm)
    }

    /// The same checks on what `/proc` shows right now (the table may lag an exec).
    pub fn refuse_now(&self, p: &Pinned) -> Option<String> {
        self.refuse_parts(p.pid, p.stat.kernel_thread, &p.stat.comm)
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
    use crate::table::State;
    use std::collections::BTreeSet;

    fn proc(pid: u32, comm: &str) -> Process {
        Process {
            pid,
            parent: 1,
            start_ns: 0,
            comm: comm.into(),
            exe: None,
            argv: vec![comm.into()],
            children: BTreeSet::new(),
            kernel_thread: false,
            state: State::Alive,
            service: Some(0),
            root: false,
            orphan: false,
            threads: 1,
            exec_ns: None,
        }
    }

    #[test]
    fn protections_refuse_init_self_ancestors_kthreads_and_names() {
        let prot = Protections::new(&["redis-server".into()]);
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
}
