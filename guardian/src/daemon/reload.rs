//! SIGHUP: the policy file is read again and, if valid, put in force without a restart.
//!
//! Services are matched by name. A kept service keeps its members; one whose `match` changed
//! forgets the roots it no longer selects (with their members). New and changed selectors meet
//! the running processes at once, through the same `/proc` scan as at start-up. A removed
//! service's members are forgotten, never killed, and its cgroup goes once empty. An invalid
//! policy changes nothing: the one in force stays, and the `reload` record says why.

use anyhow::bail;
use serde_json::json;
use tracing::{debug, info, warn};

use super::{mode_of, Daemon, ScanFor, Sync};
use crate::{
    act::budget::BudgetEngine,
    monitor::{Reload, State},
    output::Record,
    policy::{protect::Protections, selector::Candidate, Policy, Service},
    procs::{self, ProcInfo},
    serve::control::Answer,
};

/// What a reload changed.
struct Changes {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    forgotten: u64,
    /// Services whose members are placed again (their cgroup settings changed).
    place_again: Vec<usize>,
}

/// A policy put in force, waiting for the `/proc` scan that meets it with the running
/// processes (see [`crate::monitor::Handler::scanned`]).
pub(super) struct Pending {
    changes: Changes,
    why: Reload,
    start_ns: u64,
}

/// Everything a service says, in a form two policies' services can be compared by.
fn settings(s: &Service) -> String {
    format!(
        "{} | {:?} | {:?} | {:?} | {:?} | {:?} | {:?} | {:?}",
        s.selector.describe(),
        s.orphan_match.as_ref().map(|m| m.describe()),
        s.orphans,
        s.kill_timeout,
        s.orphans_at_start,
        s.budgets,
        s.memory_victim,
        s.cgroup
    )
}

/// A digest of the policy file's contents (0 when it cannot be read).
pub(super) fn digest(path: &std::path::Path) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap_or_default().hash(&mut h);
    h.finish()
}

impl Daemon {
    /// Reads the policy again and puts it in force (the scan that meets it with the running
    /// processes follows); what changed, or why the policy in force stays.
    pub(super) fn reload_policy(&mut self, state: &mut State, why: Reload) -> Answer {
        let digest = digest(&self.policy.path);
        if why == Reload::FileChanged && digest == self.policy_digest {
            debug!("the policy's directory changed, its contents did not: nothing to reload");
            return Ok(json!({ "result": "unchanged" }));
        }
        // A file that fails to load is not tried again until it changes once more.
        self.policy_digest = digest;
        let start = procs::boottime_ns();
        self.notifier.reloading();
        match self.try_reload(state) {
            Ok(changes) => {
                let answer = json!({
                    "result": "ok",
                    "policy": self.policy.path,
                    "added": changes.added,
                    "removed": changes.removed,
                    "changed": changes.changed,
                });
                self.scan_for = Some(ScanFor::Reload(Pending {
                    changes,
                    why,
                    start_ns: start,
                }));
                Ok(answer)
            }
            Err(e) => {
                self.stats.reloads_failed += 1;
                self.metrics.reload(false);
                let path = self.policy.path.display().to_string();
                warn!(policy = %path, "policy reload refused, the policy in force stays: {e:#}");
                let error = format!("{e:#}");
                let record = Record::Reload {
                    ts: state.clock.now(),
                    trigger: why.as_str(),
                    result: "error",
                    policy: path,
                    error: Some(error.clone()),
                    added: Vec::new(),
                    removed: Vec::new(),
                    changed: Vec::new(),
                    roots: 0,
                    forgotten: 0,
                    took_us: procs::boottime_ns().saturating_sub(start) / 1_000,
                };
                self.emit_one(&record);
                self.refresh(state);
                self.notifier.ready(&self.last_status);
                Err(format!(
                    "reload refused, the policy in force stays: {error}"
                ))
            }
        }
    }

    /// The new policy meets the running processes (`scan`, as at start-up), its services'
    /// members are placed again where their cgroups changed, and the reload is said done.
    pub(super) fn reloaded(&mut self, state: &mut State, pending: Pending, scan: Vec<ProcInfo>) {
        let Pending {
            changes: c,
            why,
            start_ns,
        } = pending;
        let roots = self.sync(state, Sync::Reload, scan).roots;
        for &svc in &c.place_again {
            let members: Vec<u32> = state
                .table
                .members()
                .filter(|p| p.service == Some(svc))
                .map(|p| p.pid)
                .collect();
            for pid in members {
                if let Some(member) = state.table.alive(pid) {
                    let has_children = !member.children.is_empty();
                    let records = self.budgets.place(
                        &mut self.enforcer,
                        &state.clock,
                        &self.policy,
                        svc,
                        member,
                    );
                    self.emit(records);
                    // Whether its forks wake the loop follows the new budgets.
                    let flags = self.track_flags(svc, has_children);
                    self.follow(state, pid, flags);
                }
            }
        }
        let ts = state.clock.now();
        let path = self.policy.path.display().to_string();
        self.stats.reloads_ok += 1;
        self.stats.loaded = ts;
        self.metrics.reload(true);
        info!(
            policy = %path,
            added = ?c.added,
            removed = ?c.removed,
            changed = ?c.changed,
            roots,
            forgotten = c.forgotten,
            "policy reloaded"
        );
        let record = Record::Reload {
            ts,
            trigger: why.as_str(),
            result: "ok",
            policy: path,
            error: None,
            added: c.added,
            removed: c.removed,
            changed: c.changed,
            roots,
            forgotten: c.forgotten,
            took_us: procs::boottime_ns().saturating_sub(start_ns) / 1_000,
        };
        self.emit_one(&record);
        self.refresh(state);
        self.notifier.ready(&self.last_status);
    }

    /// Reads and checks the policy, then puts it in force; nothing changes unless it succeeds.
    /// The scan that finds its roots among running processes follows (see [`Self::reloaded`]).
    fn try_reload(&mut self, state: &mut State) -> anyhow::Result<Changes> {
        let new = crate::trusted_policy(&self.policy.path, self.dry_run)?;
        if BudgetEngine::counts_tasks(&new) && !self.track_threads {
            bail!(
                "tasks_max appears in a policy that had none: the kernel was told at start-up \
                 not to report threads; restart guardian to count them"
            );
        }
        if new.cgroup_parent != self.policy.cgroup_parent && self.budgets.has_cgroups() {
            bail!(
                "cgroup_parent changed ({} -> {}) while services have cgroups of guardian's: \
                 they cannot move while they run; restart guardian",
                self.policy.cgroup_parent,
                new.cgroup_parent
            );
        }
        let old = &self.policy;
        let index = |p: &Policy, name: &str| p.services.iter().position(|s| s.name == name);
        let map: Vec<Option<usize>> = old.services.iter().map(|s| index(&new, &s.name)).collect();
        let mode = mode_of(&new, self.dry_run);
        // The one step that can fail (opening a cgroup hierarchy), before anything changes.
        let place_again = self.budgets.reload(old, &new, mode, &map)?;

        let mut c = Changes {
            place_again,
            added: new
                .services
                .iter()
                .filter(|s| index(old, &s.name).is_none())
                .map(|s| s.name.clone())
                .collect(),
            removed: Vec::new(),
            changed: Vec::new(),
            forgotten: 0,
        };
        let mut rematch = Vec::new();
        for (o, s) in old.services.iter().enumerate() {
            match map[o] {
                None => c.removed.push(s.name.clone()),
                Some(n) if settings(s) != settings(&new.services[n]) => {
                    c.changed.push(s.name.clone());
                    if s.selector.describe() != new.services[n].selector.describe() {
                        rematch.push(n);
                    }
                }
                Some(_) => {}
            }
        }

        let mut forgotten = state.table.remap_services(&map);
        // Roots the changed selectors no longer select are forgotten, with their members.
        for svc in rematch {
            let roots: Vec<u32> = state
                .table
                .members()
                .filter(|p| p.root && p.service == Some(svc))
                .map(|p| p.pid)
                .collect();
            for pid in roots {
                let selected = state
                    .table
                    .alive(pid)
                    .is_some_and(|p| new.services[svc].selector.matches(&Candidate::from(p)));
                if !selected {
                    forgotten.extend(state.table.forget_root(pid));
                }
            }
        }
        for &pid in &forgotten {
            state.probes.untrack(pid);
            self.untracked.remove(&pid);
        }
        c.forgotten = forgotten.len() as u64;
        let names: Vec<String> = new.services.iter().map(|s| s.name.clone()).collect();
        self.enforcer
            .reconfigure(mode, Protections::new(&new.protect), |service| {
                names.iter().any(|n| n == service)
            });
        self.policy = new;
        // Before the scan that meets the running processes, as at start-up.
        self.put_exec_filter(state);
        // Users the new policy names that do not resolve are looked for from now on.
        self.checks.next_users_ns = 0;

        Ok(c)
    }
}
