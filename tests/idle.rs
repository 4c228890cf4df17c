//! After an idle spell the event loop sleeps until a record or a deadline wakes it: what must not
//! wait for its housekeeping (once a second) still happens at once, or on time. Each test lets
//! guardian idle for a few seconds first. Bounds are generous against what the kernel and
//! guardian take (milliseconds), but shorter than the housekeeping interval where that is what
//! would otherwise run the decision.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, all_gone, budget_test_ready, cgroup_policy, decisions, eventually, kill, kill_policy,
    pid, pids, policy_file, privileged, service_cgroup_dirs, service_policy, token, CgroupCleanup,
    Guardian, Workload,
};

/// Long enough for the loop to have gone idle and slept its longest (1 s) more than once.
const IDLE_SPELL: Duration = Duration::from_secs(3);

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// Records that wake nobody while the loop collects them every few milliseconds (a fork, the
/// exit of a process without children) wake it when it idles: `guardian trace` prints them at
/// once rather than at the next housekeeping.
#[test]
fn a_routine_record_wakes_an_idle_loop() {
    let test = "idle_routine_record";
    if !privileged(test) {
        return;
    }
    let g = Guardian::trace();
    // After the idle spell: one child, which ends 300 ms later.
    let mut w = workload(&["storm", "1", "300"]);
    let parent = pid(&w.read_pairs(), "pid");
    thread::sleep(IDLE_SPELL);
    w.release();
    let fork = g.wait_for("the fork", |v| v["event"] == "fork" && v["ppid"] == parent);
    let child = u32::try_from(fork["pid"].as_u64().unwrap()).unwrap();
    w.cleanup.push(child);
    eventually("the child to end", Duration::from_secs(5), || !alive(child));
    g.wait_for_within("its exit record", Duration::from_millis(300), |v| {
        v["event"] == "exit" && v["pid"] == child
    });
    let _ = w.wait();
    g.stop();
}

/// A killed parent's orphans go at once, and a normally exiting parent's young orphans at the
/// end of their 250 ms grace, not at the next housekeeping.
#[test]
fn orphans_go_on_time_after_an_idle_spell() {
    let test = "idle_orphans";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    thread::sleep(IDLE_SPELL);
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));

    // The children come after the idle spell, and the parent exits normally right away.
    let mut late = workload(&["tree", "2", "late", &tok]);
    let parent = pid(&late.read_pairs(), "parent");
    g.wait_root(parent);
    thread::sleep(IDLE_SPELL);
    late.release();
    let young = pids(&late.read_pairs(), "children");
    late.cleanup.extend(&young);
    let exited = Instant::now();
    assert!(late.wait().success());
    all_gone(&young, Duration::from_secs(2));
    let took = exited.elapsed();

    let records = g.stop();
    for &k in kids.iter().chain(&young) {
        let d = decisions(&records, k);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["result"], "sent SIGKILL", "{}", d[0]);
    }
    for &k in &kids {
        let latency = decisions(&records, k)[0]["latency_us"].as_u64().unwrap();
        assert!(latency < 200_000, "an orphan waited {latency} µs");
    }
    // The grace is 250 ms; the next housekeeping would have come up to a second later.
    assert!(
        took < Duration::from_millis(900),
        "young orphans went {took:?} after their parent"
    );
}

/// A fork over `tasks_max` loses its new process at once, however long the loop slept.
#[test]
fn a_fork_over_tasks_max_dies_at_once_after_an_idle_spell() {
    let test = "idle_tasks_max";
    if !budget_test_ready(test, false) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(
        test,
        &service_policy(&tok, "report", "tasks_max = 3\ncgroup = \"inherit\""),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    // Six children that linger 2 s each: the storm process and two of them fit the budget.
    let mut w = workload(&["storm", "6", "2000", &tok]);
    let root = pid(&w.read_pairs(), "pid");
    g.wait_root(root);
    thread::sleep(IDLE_SPELL);
    w.release();
    let line = w.read_line();
    assert!(line.contains("killed="), "{line}");
    let records = g.stop();
    let kills: Vec<_> = records
        .iter()
        .filter(|v| v["event"] == "decision" && v["reason"] == "tasks_max")
        .collect();
    assert!(!kills.is_empty(), "no fork was over the budget: {line}");
    for k in &kills {
        assert_eq!(k["action"], "kill", "{k}");
        assert_eq!(k["performed"], true, "{k}");
        let latency = k["latency_us"].as_u64().unwrap();
        assert!(
            latency < 300_000,
            "a fork over the budget lived {latency} µs"
        );
    }
}

/// The SIGKILL that follows an ignored SIGTERM comes at its deadline, not at the housekeeping
/// after it.
#[test]
fn sigkill_after_sigterm_is_on_time_after_an_idle_spell() {
    let test = "idle_kill_timeout";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        service_policy(tok, "terminate", "kill_timeout = \"500ms\"")
    }) else {
        return;
    };
    let mut w = workload(&["tree", "2", "split", &tok]);
    let (parent, kids) = w.read_tree();
    let (honours, ignores) = (kids[0], kids[1]);
    g.wait_root(parent);
    thread::sleep(IDLE_SPELL);
    let killed = Instant::now();
    kill(parent, libc::SIGKILL);
    all_gone(&[honours], Duration::from_millis(400));
    assert!(
        alive(ignores),
        "SIGTERM is ignored: alive until kill_timeout"
    );
    all_gone(&[ignores], Duration::from_secs(5));
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "killed before the timeout ({took:?} after the parent)"
    );
    assert!(
        took < Duration::from_millis(900),
        "a 500 ms kill_timeout took {took:?}"
    );
    let records = g.stop();
    let d = decisions(&records, ignores);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[1]["reason"], "kill_timeout");
    assert_eq!(d[1]["performed"], true);
}

/// A memory_high crossing is acted on when the kernel notifies it: the backup poll comes only
/// once a second, and the victim goes well before that.
#[test]
fn a_memory_high_crossing_is_acted_on_when_notified() {
    let test = "idle_memory_high";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let policy = policy_file(
        test,
        &cgroup_policy(
            &tok,
            "memory_high = \"100M\"\nmemory_max = \"300M\"\ncgroup = \"own\"",
        ),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let mut w = workload(&["hog-tree", "150", &tok]);
    let m = w.read_pairs();
    let (root, hog) = (pid(&m, "parent"), pid(&m, "hog"));
    w.cleanup.push(hog);
    g.wait_for(&format!("move of {root}"), |v| {
        v["event"] == "decision" && v["action"] == "move" && v["pid"] == root
    });
    let dir = &service_cgroup_dirs(&tok, "svc")[0];
    let usage_file = ["memory.current", "memory.usage_in_bytes"]
        .iter()
        .map(|f| dir.join(f))
        .find(|f| f.exists())
        .expect("a memory usage file in the service cgroup");
    thread::sleep(IDLE_SPELL);
    w.release();
    // The crossing as this test sees it, reading the usage every millisecond.
    let deadline = Instant::now() + Duration::from_secs(10);
    let crossed = loop {
        let usage: u64 = fs::read_to_string(&usage_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if usage > 100 << 20 || !alive(hog) {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the hog never crossed memory_high"
        );
        thread::sleep(Duration::from_millis(1));
    };
    all_gone(&[hog], Duration::from_secs(5));
    let took = crossed.elapsed();
    let d = g.wait_decision(hog);
    assert_eq!(d["reason"], "memory_high", "{d}");
    assert_eq!(d["performed"], true, "{d}");
    assert!(
        took < Duration::from_millis(500),
        "the victim went {took:?} after the crossing"
    );
    assert!(alive(root), "the root was not the victim");
    drop(w);
    g.stop();
}
