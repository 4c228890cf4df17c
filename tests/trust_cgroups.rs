//! What guardian trusts in the cgroups it finds and in the memory it reads: its own cgroups are
//! recognised after a restart (reused, then removed), another user's are refused and left
//! untouched, the operator's are used and kept, and memory shared by forked workers counts once.
//! Cgroups go below this test's own cgroup (a relative `cgroup_parent`) and are removed afterwards.

use std::{
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use guardian_tests::{
    alive, budget_test_ready, cgroup_policy, eventually, kill, pid, pids, policy_file,
    service_cgroup_dirs, token, CgroupCleanup, Guardian, Workload, WAIT,
};
use serde_json::Value;

/// Longer than the 250 ms memory poll, with room to spare: what guardian would do, it has done.
const SETTLE: Duration = Duration::from_millis(1750);

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// A policy with one service `svc` matching `tok`, below a cgroup parent named after it.
fn policy(test: &str, tok: &str, keys: &str) -> PathBuf {
    policy_file(test, &cgroup_policy(tok, keys))
}

fn start(policy: &Path) -> Guardian {
    Guardian::start(&["--policy", policy.to_str().unwrap()])
}

fn decisions(records: &[Value], pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    records
        .iter()
        .filter(|v| v["event"] == "decision" && pred(v))
        .cloned()
        .collect()
}

fn result(v: &Value) -> &str {
    v["result"].as_str().unwrap_or_default()
}

/// Waits for the `limit` decision of each budget in `reasons`.
fn limits(g: &Guardian, reasons: &[&str]) -> Vec<Value> {
    reasons
        .iter()
        .map(|r| {
            g.wait_for(&format!("the {r} limit decision"), |v| {
                v["event"] == "decision" && v["action"] == "limit" && v["reason"] == *r
            })
        })
        .collect()
}

/// The limit files and `cgroup.procs` of the service's directories, with their contents.
fn cgroup_files(dirs: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let files = [
        "cgroup.procs",
        "pids.max",
        "memory.limit_in_bytes",
        "memory.soft_limit_in_bytes",
        "memory.max",
        "memory.high",
    ];
    dirs.iter()
        .flat_map(|d| files.iter().map(move |f| d.join(f)))
        .filter_map(|f| std::fs::read_to_string(&f).ok().map(|s| (f, s)))
        .collect()
}

#[test]
fn restarted_guardian_reuses_its_cgroup_then_removes_it() {
    let test = "restart_reuse";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let p = policy(
        test,
        &tok,
        "tasks_max = 32\nmemory_max = \"400M\"\ncgroup = \"own\"",
    );
    let dirs = service_cgroup_dirs(&tok, "svc");
    let first = start(&p);
    let mut w = workload(&["tree", "2", &tok]);
    let (root, _) = w.read_tree();
    first.wait_for("the move of the root", |v| {
        v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
    });
    for l in limits(&first, &["tasks_max", "memory_max"]) {
        assert!(result(&l).starts_with("wrote "), "created, not reused: {l}");
    }

    // guardian dies without cleaning up: its cgroups stay, with the service inside.
    kill(first.pid(), libc::SIGKILL);
    drop(first);
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
        assert!(
            procs.lines().any(|l| l == root.to_string()),
            "{} lost the root: {procs:?}",
            d.display()
        );
    }

    let second = start(&p);
    second.wait_for("the root found at start-up", |v| {
        v["event"] == "root" && v["pid"] == root && v["found"] == "startup"
    });
    for l in limits(&second, &["tasks_max", "memory_max"]) {
        assert_eq!(l["performed"], true, "{l}");
        assert!(
            result(&l).starts_with("reused guardian's cgroup from an earlier run: wrote "),
            "its own cgroup, recognised: {l}"
        );
    }
    let mv = second.wait_for("the root moved again", |v| {
        v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
    });
    assert_eq!(mv["performed"], true, "{mv}");

    // The service ends: the cgroup, and the parent the first guardian made, are removed.
    drop(w);
    eventually(
        "the service cgroup and its parent to be removed",
        WAIT,
        || {
            dirs.iter()
                .all(|d| !d.exists() && !d.parent().unwrap().exists())
        },
    );
    let records = second.stop();
    let errors = decisions(&records, |v| result(v).starts_with("error"));
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn another_users_service_cgroup_is_refused_and_left_untouched() {
    let test = "foreign_cgroup";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let dirs = service_cgroup_dirs(&tok, "svc");
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
    }
    let before = cgroup_files(&dirs);
    assert!(!before.is_empty());
    let p = policy(
        test,
        &tok,
        "tasks_max = 32\nmemory_high = \"100M\"\nmemory_max = \"200M\"\ncgroup = \"own\"",
    );
    let g = start(&p);
    let mut w = workload(&["hog-tree", "150", &tok]);
    let m = w.read_pairs();
    let (root, hog) = (pid(&m, "parent"), pid(&m, "hog"));
    w.cleanup.push(hog);
    g.wait_for("the root", |v| v["event"] == "root" && v["pid"] == root);
    for l in limits(&g, &["tasks_max", "memory_max", "memory_high"]) {
        assert_eq!(l["performed"], false, "{l}");
        assert!(
            result(&l).starts_with("error: refused") && result(&l).contains("uid 65534"),
            "refused, naming the owner: {l}"
        );
    }
    // The budgets fall back to guardian's own count: the hog goes at memory_high.
    w.release();
    let d = g.wait_for("the memory_high victim", |v| {
        v["event"] == "decision" && v["pid"] == hog && v["action"] == "kill"
    });
    assert_eq!(d["reason"], "memory_high", "{d}");
    assert_eq!(d["performed"], true, "{d}");
    eventually("the hog to die", WAIT, || !alive(hog));
    assert!(alive(root), "the root was not the victim");
    drop(w);
    let records = g.stop();
    let moves = decisions(&records, |v| v["action"] == "move");
    assert!(moves.is_empty(), "nothing moved into it: {moves:?}");
    assert_eq!(
        cgroup_files(&dirs),
        before,
        "guardian wrote into the refused cgroup"
    );
    for d in &dirs {
        assert!(
            d.is_dir(),
            "guardian removed another user's {}",
            d.display()
        );
    }
}

#[test]
fn the_operators_cgroup_is_used_and_kept() {
    let test = "operator_cgroup";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let dirs = service_cgroup_dirs(&tok, "svc");
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let p = policy(test, &tok, "tasks_max = 32\ncgroup = \"own\"");
    let g = start(&p);
    let mut w = workload(&["tree", "1", &tok]);
    let (root, _) = w.read_tree();
    let l = &limits(&g, &["tasks_max"])[0];
    assert_eq!(l["performed"], true, "{l}");
    assert!(
        result(l).starts_with("reused the operator's cgroup"),
        "root-owned and unmarked: {l}"
    );
    let mv = g.wait_for("the move of the root", |v| {
        v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
    });
    assert_eq!(mv["performed"], true, "{mv}");
    let pids_dir = dirs.last().unwrap();
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "32"
    );
    drop(w);
    eventually("the service's cgroup to empty", WAIT, || {
        dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty())
        })
    });
    thread::sleep(SETTLE);
    g.stop();
    for d in &dirs {
        assert!(
            d.is_dir(),
            "guardian removed the operator's {}",
            d.display()
        );
    }
}

#[test]
fn inherit_memory_counts_pages_shared_by_forked_workers_once() {
    let test = "shared_pages";
    if !budget_test_ready(test, false) {
        return;
    }
    let tok = token(test);
    let g = start(&policy(
        test,
        &tok,
        "memory_high = \"800M\"\ncgroup = \"inherit\"",
    ));
    // A 300 MiB parent heap shared by 4 workers: resident sets sum to about 1.5 GiB, proportional
    // sets to about 300 MiB.
    let mut w = workload(&["shared-heap", "300", "4", "600", &tok]);
    let m = w.read_pairs();
    let root = pid(&m, "parent");
    let workers = pids(&m, "workers");
    w.cleanup.extend(&workers);
    g.wait_for("the root", |v| v["event"] == "root" && v["pid"] == root);
    thread::sleep(SETTLE);
    let early = decisions(&g.records(), |v| v["action"] == "kill");
    assert!(early.is_empty(), "killed below memory_high: {early:?}");
    assert!(alive(root) && workers.iter().all(|&p| alive(p)));

    // Positive control: the first worker takes 600 MiB of its own, and the service is over.
    w.release();
    let d = g.wait_for("the memory_high victim", |v| {
        v["event"] == "decision" && v["action"] == "kill"
    });
    assert_eq!(d["reason"], "memory_high", "{d}");
    assert_eq!(d["pid"], workers[0], "the worker that grew: {d}");
    assert_eq!(d["performed"], true, "{d}");
    let usage = d["usage"].as_u64().unwrap();
    assert!(
        usage > 800 << 20 && usage < 1200 << 20,
        "about 900 MiB counted once, not the 2.1 GiB the resident sets add up to: {d}"
    );
    eventually("the victim to die", WAIT, || !alive(workers[0]));
    thread::sleep(SETTLE);
    assert!(alive(root), "the root stays");
    assert!(
        workers[1..].iter().all(|&p| alive(p)),
        "back under budget: the other workers stay"
    );
    drop(w);
    let records = g.stop();
    let kills = decisions(&records, |v| v["action"] == "kill");
    assert_eq!(kills.len(), 1, "one victim: {kills:?}");
}

/// guardian is killed, then its service ends while it is down: the next guardian removes the
/// empty cgroup (and the parent) the first one left, at start-up.
#[test]
fn a_leftover_empty_cgroup_is_removed_at_start() {
    let test = "leftover_cgroup";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let p = policy(test, &tok, "tasks_max = 32\ncgroup = \"own\"");
    let dirs = service_cgroup_dirs(&tok, "svc");
    let first = start(&p);
    let mut w = workload(&["tree", "2", &tok]);
    let (root, _) = w.read_tree();
    first.wait_for("the move of the root", |v| {
        v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
    });
    kill(first.pid(), libc::SIGKILL);
    drop(first);
    drop(w);
    eventually("the service's processes to be gone", WAIT, || {
        dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty())
        })
    });
    assert!(
        dirs.iter().all(|d| d.is_dir()),
        "the first guardian removed them"
    );
    let second = start(&p);
    eventually(
        "the leftover cgroup and its parent to be removed",
        WAIT,
        || {
            dirs.iter()
                .all(|d| !d.exists() && !d.parent().unwrap().exists())
        },
    );
    second.stop();
}
