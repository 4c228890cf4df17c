//! A parent's SIGKILL: its orphans-to-be are acted on when the signal is queued, not after the
//! parent's own teardown and exit; only SIGKILL does it, only for a parent guardian follows, and
//! each worker gets exactly one decision.

use std::{fs, path::PathBuf, thread, time::Duration};

use guardian_tests::{
    alive, all_gone, decisions, kill, kill_policy, one_decision, policy_file, privileged,
    service_policy, token, Guardian, Workload,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// `tree N MODE` in the service, its root found: (the workload, its parent, its workers). The
/// workload must be kept (bound to `_w`, not `_`): dropping it ends the tree.
fn rooted_tree(g: &Guardian, n: &str, mode: &str, tok: &str) -> (Workload, u32, Vec<u32>) {
    let mut w = workload(&["tree", n, mode, tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    (w, parent, kids)
}

/// How long a "nothing happens" check watches.
const QUIET: Duration = Duration::from_millis(400);

/// The cgroup v1 freezer hierarchy, when this machine mounts one.
const FREEZER_V1: &str = "/sys/fs/cgroup/freezer";

/// A v1 freezer cgroup of the test's own; thawed and removed when dropped, whatever happened.
struct Freezer(PathBuf);

impl Freezer {
    fn new(tok: &str) -> Self {
        let dir = PathBuf::from(FREEZER_V1).join(format!("guardian-test-{tok}"));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    fn enter(&self, pid: u32) {
        fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("moving into the freezer");
    }

    fn set(&self, state: &str) {
        fs::write(self.0.join("freezer.state"), state).expect("writing freezer.state");
        guardian_tests::eventually(
            &format!("freezer.state {state}"),
            Duration::from_secs(5),
            || fs::read_to_string(self.0.join("freezer.state")).is_ok_and(|s| s.trim() == state),
        );
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("freezer.state"), "THAWED");
        // The killed parent leaves once thawed: bounded wait for the cgroup to empty.
        for _ in 0..200 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// Whether `/sys/fs/cgroup/freezer` is a cgroup v1 hierarchy with the freezer controller.
fn has_v1_freezer() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(4) == Some(&FREEZER_V1)
                && l.split(" - ").nth(1).is_some_and(|tail| {
                    tail.starts_with("cgroup ") && tail.split([' ', ',']).any(|o| o == "freezer")
                })
        })
    })
}

/// Waits (bounded) for the parent's death, then for guardian to have read its exit (a record
/// it drains within a tick; `QUIET` is many).
fn parent_gone(parent: u32) {
    all_gone(&[parent], Duration::from_secs(5));
    thread::sleep(QUIET);
}

/// Sends `signal` to the parent, waits for its workers and then for it to be gone, stops
/// guardian: each worker's one decision (failing unless there is exactly one).
fn end_tree(g: Guardian, parent: u32, kids: &[u32], signal: i32) -> Vec<Value> {
    kill(parent, signal);
    all_gone(kids, Duration::from_secs(5));
    parent_gone(parent);
    let records = g.stop();
    kids.iter().map(|&k| one_decision(&records, k)).collect()
}

/// The service's `kill_timeout`: long enough that a SIGKILL seen is the parent's, not the
/// escalation's.
const KILL_TIMEOUT: &str = "kill_timeout = \"30s\"";

/// The proof that the workers do not wait for their parent's exit: a parent frozen by the v1
/// freezer cannot exit (nor be reported exiting) until thawed, even with SIGKILL pending. Its
/// workers, outside the frozen cgroup, must die while it is still in `/proc`.
fn frozen_parent(orphans: &str, sent: &str) {
    let test = format!("frozen_parent_sigkilled_{orphans}");
    if !privileged(&test) {
        return;
    }
    if !has_v1_freezer() {
        // On cgroup v2, SIGKILL kills frozen tasks: there is nothing to hold the exit back.
        eprintln!("SKIPPED {test}: no cgroup v1 freezer at {FREEZER_V1} (does not apply on v2)");
        return;
    }
    let tok = token(&test);
    let policy = policy_file(&test, &service_policy(&tok, orphans, KILL_TIMEOUT));
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let (_w, parent, kids) = rooted_tree(&g, "3", "", &tok);
    let freezer = Freezer::new(&tok);
    // Only the parent: its children were forked before, in the test's cgroup.
    freezer.enter(parent);
    freezer.set("FROZEN");

    kill(parent, libc::SIGKILL);
    let took = all_gone(&kids, Duration::from_secs(5));
    eprintln!("{test}: workers gone {took:?} after their frozen parent's SIGKILL");
    assert!(
        alive(parent),
        "the frozen parent must still be there, its exit not reported"
    );
    for &k in &kids {
        // The worker can be gone before its decision record reaches the test.
        g.wait_decision(k);
        let d = one_decision(&g.records(), k);
        assert_eq!(d["action"], orphans, "{d}");
        assert_eq!(d["reason"], "orphan", "{d}");
        assert_eq!(d["trigger"], "parent_sigkilled", "{d}");
        assert_eq!(d["old_parent"], parent, "{d}");
        assert_eq!(d["performed"], true, "{d}");
        assert_eq!(d["result"], sent, "{d}");
    }

    // Thawed, the parent dies; its exit brings no second decision.
    drop(freezer);
    parent_gone(parent);
    let records = g.stop();
    for &k in &kids {
        one_decision(&records, k);
    }
}

#[test]
fn frozen_parent_sigkilled_workers_killed_before_its_exit() {
    frozen_parent("kill", "sent SIGKILL");
}

#[test]
fn frozen_parent_sigkilled_workers_terminated_before_its_exit() {
    frozen_parent("terminate", "sent SIGTERM");
}

/// `terminate` is brought forward too, on any host (the frozen-parent proof needs a v1 freezer):
/// each worker gets one SIGTERM at its parent's SIGKILL, and neither the parent's exit nor the
/// workers' own (they end on SIGTERM) bring a second decision.
#[test]
fn sigkill_brings_terminate_forward_once() {
    let test = "sigkill_terminate";
    let Some((tok, g)) =
        Guardian::on_policy(test, |tok| service_policy(tok, "terminate", KILL_TIMEOUT))
    else {
        return;
    };
    let (_w, parent, kids) = rooted_tree(&g, "3", "", &tok);

    for d in end_tree(g, parent, &kids, libc::SIGKILL) {
        assert_eq!(d["trigger"], "parent_sigkilled", "{d}");
        assert_eq!(d["result"], "sent SIGTERM", "{d}");
    }
}

/// A parent that ignores SIGTERM gets one: nothing happens. Then SIGKILL: each worker gets
/// exactly one decision, brought forward by the SIGKILL, none from the exit that follows.
#[test]
fn only_sigkill_brings_decisions_forward_once() {
    let test = "only_sigkill";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let (_w, parent, kids) = rooted_tree(&g, "3", "term-proof", &tok);

    kill(parent, libc::SIGTERM);
    thread::sleep(QUIET);
    assert!(alive(parent), "the parent ignores SIGTERM");
    for &k in &kids {
        assert!(alive(k), "a SIGTERM to the parent killed worker {k}");
        assert!(decisions(&g.records(), k).is_empty());
    }

    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(5));
    parent_gone(parent);
    let records = g.stop();
    for &k in &kids {
        let d = one_decision(&records, k);
        assert_eq!(d["trigger"], "parent_sigkilled", "{d}");
        assert_eq!(d["result"], "sent SIGKILL", "{d}");
    }
    assert!(decisions(&records, parent).is_empty());
}

/// A signal that can be caught brings nothing forward, even when it kills: a parent ended by
/// SIGTERM's default action leaves its workers to the exit path (one decision each, with no
/// trigger).
#[test]
fn a_fatal_sigterm_leaves_the_orphans_to_the_exit() {
    let test = "fatal_sigterm";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let (_w, parent, kids) = rooted_tree(&g, "3", "", &tok);

    for d in end_tree(g, parent, &kids, libc::SIGTERM) {
        assert!(d.get("trigger").is_none(), "{d}");
        assert_eq!(d["result"], "sent SIGKILL", "{d}");
    }
}

/// A SIGKILL to a worker (no children) kills that worker only.
#[test]
fn sigkill_to_a_worker_spares_its_siblings() {
    let test = "sigkill_worker";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let (_w, parent, kids) = rooted_tree(&g, "3", "", &tok);

    kill(kids[0], libc::SIGKILL);
    all_gone(&kids[..1], Duration::from_secs(5));
    thread::sleep(QUIET);
    assert!(alive(parent));
    for &k in &kids[1..] {
        assert!(alive(k), "sibling {k} of the killed worker must live");
    }
    let records = g.stop();
    let any: Vec<&Value> = records
        .iter()
        .filter(|v| v["event"] == "decision")
        .collect();
    assert!(any.is_empty(), "no decision at all: {any:?}");
}

/// A SIGKILL to a parent outside the policy leaves its children alone; a service's tree in the
/// same run is the positive control.
#[test]
fn sigkill_outside_the_policy_touches_nothing() {
    let test = "sigkill_outside";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let other = token("elsewhere");
    let mut outsider = workload(&["tree", "2", "", &other]);
    let (out_parent, out_kids) = outsider.read_tree();
    let (_w, parent, kids) = rooted_tree(&g, "2", "", &tok);

    kill(out_parent, libc::SIGKILL);
    thread::sleep(QUIET);
    for &k in &out_kids {
        assert!(
            alive(k),
            "child {k} of a process outside the policy must live"
        );
    }
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(5));
    let records = g.stop();
    for &k in &out_kids {
        assert!(decisions(&records, k).is_empty());
    }
    for &k in &kids {
        one_decision(&records, k);
    }
}

/// `--dry-run`: the early decision is recorded (once, as audit) and nothing is killed.
#[test]
fn dry_run_records_the_early_decision_and_kills_nothing() {
    let test = "sigkill_dry_run";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let g = Guardian::start(&["--policy", policy.to_str().unwrap(), "--dry-run"]);
    let (_w, parent, kids) = rooted_tree(&g, "3", "", &tok);

    kill(parent, libc::SIGKILL);
    for &k in &kids {
        g.wait_decision(k);
    }
    parent_gone(parent);
    for &k in &kids {
        assert!(alive(k), "audit mode killed {k}");
    }
    let records = g.stop();
    for &k in &kids {
        let d = one_decision(&records, k);
        assert_eq!(d["mode"], "audit", "{d}");
        assert_eq!(d["performed"], false, "{d}");
        assert_eq!(d["result"], "audit: would send SIGKILL", "{d}");
        assert_eq!(d["trigger"], "parent_sigkilled", "{d}");
    }
}

/// `orphans = "report"`: nothing is brought forward and nothing is killed; the exit reports
/// each orphan once, as before.
#[test]
fn report_service_waits_for_the_exit() {
    let test = "sigkill_report";
    let Some((tok, g)) =
        Guardian::on_policy(test, |tok| service_policy(tok, "report", KILL_TIMEOUT))
    else {
        return;
    };
    let (_w, parent, kids) = rooted_tree(&g, "2", "", &tok);

    kill(parent, libc::SIGKILL);
    for &k in &kids {
        g.wait_decision(k);
    }
    thread::sleep(QUIET);
    for &k in &kids {
        assert!(alive(k), "a report service's orphan {k} must live");
    }
    let records = g.stop();
    for &k in &kids {
        let d = one_decision(&records, k);
        assert_eq!(d["result"], "reported", "{d}");
        assert!(d.get("trigger").is_none(), "{d}");
    }
}
