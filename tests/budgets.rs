//! Task and memory budgets on real processes, with cgroups created below this test's own cgroup
//! (a relative `cgroup_parent`) and removed afterwards.

use std::{thread, time::Duration};

use guardian_tests::{
    alive, budget_test_ready, eventually, pid, policy_file, service_cgroup_dirs, token,
    CgroupCleanup, Guardian, Workload, WAIT,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// A policy with one service `svc` matching `tok`, below a cgroup parent named after it.
fn policy(test: &str, tok: &str, keys: &str) -> std::path::PathBuf {
    CLEANUP.with(|c| c.borrow_mut().push(CgroupCleanup(tok.to_owned())));
    policy_file(
        test,
        &format!(
            "cgroup_parent = \"{tok}\"\n[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\" }}\norphans = \"report\"\n{keys}\n"
        ),
    )
}

thread_local! {
    /// Cleanups run when the test's thread ends, pass or fail.
    static CLEANUP: std::cell::RefCell<Vec<CgroupCleanup>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Starts guardian on a one-service policy for `test` (with `policy` keys and extra arguments);
/// `None` (said aloud) when the test cannot run here.
fn start(test: &str, needs_cgroups: bool, keys: &str, args: &[&str]) -> Option<(String, Guardian)> {
    if !budget_test_ready(test, needs_cgroups) {
        return None;
    }
    let tok = token(test);
    let p = policy(test, &tok, keys);
    let mut all = vec!["--policy", p.to_str().unwrap()];
    all.extend(args);
    Some((tok, Guardian::start(&all)))
}
fn decisions<'a>(records: &'a [Value], pred: impl Fn(&Value) -> bool + 'a) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|v| v["event"] == "decision" && pred(v))
        .collect()
}

fn pairs(line: &str) -> std::collections::HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn num(map: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    map.get(key)
        .unwrap_or_else(|| panic!("no `{key}` in {map:?}"))
        .parse()
        .unwrap()
}

/// Waits for guardian to report the root, and (own mode) to move it into its cgroup.
fn wait_placed(g: &Guardian, root: u32, own: bool) {
    g.wait_for(&format!("root {root}"), |v| {
        v["event"] == "root" && v["pid"] == root
    });
    if own {
        let mv = g.wait_for(&format!("move of {root}"), |v| {
            v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
        });
        assert_eq!(mv["performed"], true, "{mv}");
    }
}

/// The service cgroup, and the parent guardian created for it, are removed.
fn assert_removed(tok: &str) {
    let dirs = service_cgroup_dirs(tok, "svc");
    eventually(
        "the service cgroup and its parent to be removed",
        WAIT,
        || {
            dirs.iter()
                .all(|d| !d.exists() && !d.parent().unwrap().exists())
        },
    );
}

fn storm(test: &str, mode: &str) {
    let own = mode == "own";
    let Some((tok, g)) = start(
        test,
        own,
        &format!("tasks_max = 8\ncgroup = \"{mode}\""),
        &[],
    ) else {
        return;
    };
    let mut inside = workload(&["storm", "60", "800", &tok]);
    let root = pid(&inside.read_pairs(), "pid");
    wait_placed(&g, root, own);
    if own {
        let limit = g.wait_for("pids.max record", |v| {
            v["event"] == "decision" && v["action"] == "limit" && v["reason"] == "tasks_max"
        });
        assert_eq!(limit["performed"], true, "{limit}");
        assert_eq!(limit["limit"], 8);
        for d in service_cgroup_dirs(&tok, "svc") {
            assert!(d.is_dir(), "{} was not created", d.display());
        }
    }
    // A process outside the service storms at the same time, unhindered.
    let mut outside = workload(&["storm", "60", "800"]);
    outside.read_pairs();
    inside.release();
    outside.release();
    let ins = pairs(&inside.read_line());
    let out = pairs(&outside.read_line());
    eprintln!("{test}: inside {ins:?}, outside {out:?}");
    assert_eq!(
        num(&out, "refused") + num(&out, "killed"),
        0,
        "the outsider was limited"
    );
    assert!(num(&out, "most_alive") > 8);
    if own {
        // The storm process is one task: at most 7 children at once, and the kernel refused.
        assert!(num(&ins, "most_alive") <= 7, "{ins:?}");
        assert!(num(&ins, "refused") > 0, "{ins:?}");
        let r = g.wait_for("the kernel's refusals reported", |v| {
            v["event"] == "decision" && v["reason"] == "tasks_max" && v["action"] == "report"
        });
        assert!(r["result"].as_str().unwrap().contains("refused"), "{r}");
    } else {
        // guardian counts and kills each new process over the budget; those left ran to the
        // end, never more than the budget allows.
        assert!(num(&ins, "killed") > 0, "{ins:?}");
        assert!(num(&ins, "survived") <= 7, "{ins:?}");
    }
    let _ = inside.wait();
    let _ = outside.wait();
    if own {
        assert_removed(&tok);
    }
    let records = g.stop();
    if !own {
        let kills = decisions(&records, |v| {
            v["reason"] == "tasks_max" && v["action"] == "kill"
        });
        assert!(!kills.is_empty());
        assert!(kills
            .iter()
            .all(|v| v["performed"] == true && v["limit"] == 8));
        for d in service_cgroup_dirs(&tok, "svc") {
            assert!(!d.exists(), "inherit mode created {}", d.display());
        }
    }
}

#[test]
fn own_tasks_max_holds_a_fork_storm() {
    storm("own_tasks_max", "own");
}

#[test]
fn inherit_tasks_max_kills_forks_over_budget() {
    storm("inherit_tasks_max", "inherit");
}

fn memory_high(test: &str, mode: &str) {
    let own = mode == "own";
    let Some((tok, g)) = start(
        test,
        own,
        &format!("memory_high = \"100M\"\nmemory_max = \"200M\"\ncgroup = \"{mode}\""),
        &[],
    ) else {
        return;
    };
    let mut w = workload(&["hog-tree", "150", &tok]);
    let m = w.read_pairs();
    let (root, hog) = (pid(&m, "parent"), pid(&m, "hog"));
    w.cleanup.push(hog);
    wait_placed(&g, root, own);
    // An unrelated process takes the same amount at the same time.
    let mut other = workload(&["hog", "150"]);
    let other_pid = pid(&other.read_pairs(), "pid");
    w.release();
    let d = g.wait_for("the memory_high victim", |v| {
        v["event"] == "decision" && v["pid"] == hog
    });
    assert_eq!(d["reason"], "memory_high", "{d}");
    assert_eq!(d["performed"], true, "{d}");
    assert_eq!(d["limit"], 100u64 << 20);
    assert!(d["usage"].as_u64().unwrap() > 100 << 20, "{d}");
    eventually("the hog to die", WAIT, || !alive(hog));
    thread::sleep(Duration::from_millis(300));
    assert!(
        alive(root),
        "the root was not the victim: {:?}",
        decisions(&g.records(), |v| v["pid"] == root)
    );
    assert!(alive(other_pid), "the unrelated process was touched");
    drop(other);
    drop(w);
    if own {
        assert_removed(&tok);
    }
    let records = g.stop();
    let kernel = decisions(&records, |v| {
        v["reason"] == "memory_max" && v["action"] == "report"
    });
    assert!(
        kernel.is_empty(),
        "guardian acted before the kernel: {kernel:?}"
    );
    let victims = decisions(&records, |v| v["action"] == "kill");
    assert_eq!(victims.len(), 1, "one victim: {victims:?}");
}

#[test]
fn own_memory_high_kills_before_the_oom_killer() {
    memory_high("own_memory_high", "own");
}

#[test]
fn inherit_memory_high_kills_the_largest_member() {
    memory_high("inherit_memory_high", "inherit");
}

#[test]
fn own_memory_max_reports_the_kernel_oom_kill() {
    let test = "own_memory_max";
    let Some((tok, g)) = start(test, true, "memory_max = \"100M\"\ncgroup = \"own\"", &[]) else {
        return;
    };
    let mut w = workload(&["hog-tree", "150", &tok]);
    let m = w.read_pairs();
    let (root, hog) = (pid(&m, "parent"), pid(&m, "hog"));
    w.cleanup.push(hog);
    wait_placed(&g, root, true);
    w.release();
    let d = g.wait_for("the kernel OOM kill report", |v| {
        v["event"] == "decision" && v["reason"] == "memory_max" && v["action"] == "report"
    });
    assert_eq!(d["action"], "report", "{d}");
    assert!(
        d["result"]
            .as_str()
            .unwrap()
            .contains("OOM killer killed 1"),
        "{d}"
    );
    eventually("the OOM victim to be gone", WAIT, || !alive(hog));
    assert!(alive(root));
    drop(w);
    assert_removed(&tok);
    let records = g.stop();
    assert!(
        decisions(&records, |v| v["action"] == "kill").is_empty(),
        "guardian killed nothing itself"
    );
}

#[test]
fn memory_victim_takes_the_orphan_first() {
    let test = "victim_orphan";
    let Some((tok, g)) = start(
        test,
        true,
        "memory_high = \"100M\"\nmemory_max = \"400M\"\ncgroup = \"own\"",
        &[],
    ) else {
        return;
    };
    let mut w = workload(&["victims", "60", "80", &tok]);
    let root = pid(&w.read_pairs(), "parent");
    wait_placed(&g, root, true);
    w.step();
    let m = w.read_pairs();
    let (member, orphan) = (pid(&m, "member"), pid(&m, "orphan"));
    w.cleanup.extend([member, orphan]);
    // The orphan was reported (orphans = "report"), not killed.
    let o = g.wait_for("the orphan report", |v| {
        v["event"] == "decision" && v["pid"] == orphan && v["reason"] == "orphan"
    });
    assert_eq!(o["result"], "reported");
    w.release();
    let d = g.wait_for("the memory_high victim", |v| {
        v["event"] == "decision" && v["reason"] == "memory_high" && v["action"] == "kill"
    });
    assert_eq!(
        d["pid"], orphan,
        "the smaller orphan goes before the larger member: {d}"
    );
    eventually("the orphan to die", WAIT, || !alive(orphan));
    thread::sleep(Duration::from_millis(500));
    assert!(alive(member), "back under budget: the member stays");
    assert!(alive(root));
    drop(w);
    assert_removed(&tok);
    let records = g.stop();
    let kills = decisions(&records, |v| v["action"] == "kill");
    assert_eq!(kills.len(), 1, "{kills:?}");
}

#[test]
fn audit_mode_limits_and_kills_nothing() {
    let test = "budget_audit";
    let Some((tok, g)) = start(
        test,
        true,
        "tasks_max = 8\nmemory_high = \"100M\"\nmemory_max = \"200M\"\ncgroup = \"own\"",
        &["--dry-run"],
    ) else {
        return;
    };
    let mut w = workload(&["hog-tree", "150", &tok]);
    let m = w.read_pairs();
    let (root, hog) = (pid(&m, "parent"), pid(&m, "hog"));
    w.cleanup.push(hog);
    wait_placed(&g, root, false);
    let mut storm = workload(&["storm", "12", "1500", &tok]);
    let storm_pid = pid(&storm.read_pairs(), "pid");
    g.wait_for("the storm's root", |v| {
        v["event"] == "root" && v["pid"] == storm_pid
    });
    w.release();
    storm.release();
    let s = pairs(&storm.read_line());
    assert_eq!(
        num(&s, "refused") + num(&s, "killed"),
        0,
        "audit mode limited the storm: {s:?}"
    );
    let v = g.wait_for("the would-be memory victim", |v| {
        v["event"] == "decision" && v["pid"] == hog
    });
    assert_eq!(v["performed"], false);
    assert_eq!(v["mode"], "audit");
    thread::sleep(Duration::from_millis(800));
    assert!(alive(hog), "audit mode killed the hog");
    for d in service_cgroup_dirs(&tok, "svc") {
        assert!(!d.exists(), "audit mode created {}", d.display());
    }
    let records = g.stop();
    let all = decisions(&records, |_| true);
    assert!(all.iter().all(|v| v["performed"] == false), "{all:?}");
    let limits = decisions(&records, |v| v["action"] == "limit");
    assert_eq!(limits.len(), 3, "each limit recorded once: {limits:?}");
    assert!(limits.iter().all(|v| v["result"]
        .as_str()
        .unwrap()
        .starts_with("audit: would write")));
    let hog_records = decisions(&records, |v| v["pid"] == hog);
    assert_eq!(
        hog_records.len(),
        1,
        "the hog recorded once: {hog_records:?}"
    );
    // Each fork over the budget is recorded once, and only those.
    let over = decisions(&records, |v| v["reason"] == "tasks_max");
    let mut pids: Vec<u64> = over.iter().map(|v| v["pid"].as_u64().unwrap()).collect();
    let n = pids.len();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), n, "a fork recorded twice: {over:?}");
    assert!(!over.is_empty());
}
