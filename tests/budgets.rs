//! Task, memory and CPU budgets on real processes, with cgroups created below this test's own
//! cgroup (a relative `cgroup_parent`) and removed afterwards.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, budget_test_ready, cgroup_policy, eventually, missing, pid, policy_file,
    service_cgroup_dirs, service_cpu_cgroup_dir, token, CgroupCleanup, Guardian, Workload, WAIT,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// A policy with one service `svc` matching `tok`, below a cgroup parent named after it.
fn policy(test: &str, tok: &str, keys: &str) -> std::path::PathBuf {
    CLEANUP.with(|c| c.borrow_mut().push(CgroupCleanup(tok.to_owned())));
    policy_file(test, &cgroup_policy(tok, keys))
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
    let mut dirs = service_cgroup_dirs(tok, "svc");
    dirs.extend(service_cpu_cgroup_dir(tok, "svc"));
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
    let d = g.wait_decision(hog);
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
    let v = g.wait_decision(hog);
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

/// CPU time (user + system) a process has used, in clock ticks, from `/proc/PID/stat`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // After the name come the state (field 3) ... utime (14) and stime (15).
    let after_name: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let field = |n: usize| -> u64 { after_name[n - 3].parse().unwrap() };
    field(14) + field(15)
}

/// The share of one CPU each process used over `window`, side by side.
fn cpu_shares(pids: &[u32], window: Duration) -> Vec<f64> {
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let start = Instant::now();
    thread::sleep(window);
    let after: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let wall = start.elapsed().as_secs_f64();
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) as f64 / hz / wall)
        .collect()
}

/// How many periods the kernel throttled a cgroup in (`nr_throttled` of `cpu.stat`, v1 and v2).
fn nr_throttled(dir: &std::path::Path) -> u64 {
    let stat = fs::read_to_string(dir.join("cpu.stat"))
        .unwrap_or_else(|e| panic!("reading {}/cpu.stat: {e}", dir.display()));
    stat.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no nr_throttled in {}/cpu.stat: {stat}", dir.display()))
}

/// A busy loop in a service with `cpu_max = "50%"` gets at most about half a CPU (the kernel's
/// quota: v1 `cpu.cfs_quota_us` on this host, v2 `cpu.max` in the kernel matrix), while a busy
/// loop outside the service, measured side by side, is neither moved nor throttled.
#[test]
fn own_cpu_max_throttles_a_busy_loop() {
    let test = "own_cpu_max";
    if !budget_test_ready(test, true) {
        return;
    }
    if service_cpu_cgroup_dir("x", "y").is_none() {
        missing(
            test,
            "no cpu cgroup controller with CPU bandwidth control here (neither `cpu` in cgroup v2's cgroup.controllers nor a v1 cpu hierarchy with cpu.cfs_quota_us)",
        );
        return;
    }
    let Some((tok, g)) = start(test, true, "cpu_max = \"50%\"\ncgroup = \"own\"", &[]) else {
        return;
    };
    let cpu_dir = service_cpu_cgroup_dir(&tok, "svc").unwrap();
    let mut inside = workload(&["spin", "30", &tok]);
    let root = pid(&inside.read_pairs(), "pid");
    wait_placed(&g, root, true);
    let limit = g.wait_for("the cpu_max limit record", |v| {
        v["event"] == "decision" && v["action"] == "limit" && v["reason"] == "cpu_max"
    });
    assert_eq!(limit["performed"], true, "{limit}");
    assert_eq!(limit["limit"], 50_000, "µs per 100 ms period: {limit}");
    let mut outside = workload(&["spin", "30"]);
    let other = pid(&outside.read_pairs(), "pid");
    let throttled = nr_throttled(&cpu_dir);

    let shares = cpu_shares(&[root, other], Duration::from_secs(3));
    let (held, free) = (shares[0] * 100.0, shares[1] * 100.0);
    eprintln!(
        "{test}: over 3 s, the busy loop under cpu_max 50% used {held:.1}% of a CPU; the one outside the service {free:.1}%"
    );
    assert!(
        held <= 55.0,
        "cpu_max 50% did not hold: {held:.1}% of a CPU"
    );
    assert!(
        held >= 20.0,
        "the busy loop hardly ran ({held:.1}%): nothing was measured"
    );
    // The loop outside getting well over the quota shows the machine had room for the one inside
    // too: then the kernel must have held it back. (A machine too busy to give either loop half
    // a CPU leaves nothing to throttle.)
    if free > 60.0 {
        assert!(
            nr_throttled(&cpu_dir) > throttled,
            "the kernel never throttled {}",
            cpu_dir.display()
        );
    } else {
        eprintln!("{test}: the machine was too busy for throttling to show ({free:.1}% outside)");
    }
    // The limit as the kernel shows it, and the loop where the kernel applies it.
    let read = |f: &str| {
        fs::read_to_string(cpu_dir.join(f))
            .unwrap_or_else(|e| panic!("reading {}/{f}: {e}", cpu_dir.display()))
    };
    if cpu_dir.join("cpu.max").exists() {
        assert_eq!(read("cpu.max").trim(), "50000 100000");
    } else {
        assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
        assert_eq!(read("cpu.cfs_quota_us").trim(), "50000");
    }
    let procs = read("cgroup.procs");
    assert!(
        procs.lines().any(|l| l == root.to_string()),
        "{root} is not in {}: {procs}",
        cpu_dir.display()
    );
    // What must not happen: the loop outside the service is left where it was.
    let other_cgroups = fs::read_to_string(format!("/proc/{other}/cgroup")).unwrap();
    assert!(!other_cgroups.contains(&tok), "{other_cgroups}");

    drop(inside);
    drop(outside);
    assert_removed(&tok);
    let records = g.stop();
    let limits = decisions(&records, |v| v["action"] == "limit");
    assert_eq!(limits.len(), 1, "the cpu_max alone: {limits:?}");
}
