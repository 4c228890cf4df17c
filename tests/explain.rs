//! `guardian explain --policy FILE PID` on real processes: roots, forked workers, processes of no
//! service, pid 1, orphans found at start, and pids that do not exist. The answers come from
//! `/proc` alone (no daemon, no root needed); where root is there, the daemon started on the same
//! policy is checked to find the same roots and orphans.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Output},
};

use guardian_tests::{
    guardian_bin, kill_policy, missing, pid, policy_file, ppid_of, privileged, token, Guardian,
    Workload,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

fn explain(policy: &Path, pid: u32, output: &str) -> Output {
    Command::new(guardian_bin())
        .args(["explain", "--policy"])
        .arg(policy)
        .args([&pid.to_string(), "--output", output])
        .output()
        .expect("running guardian explain")
}

/// `guardian explain --policy POLICY PID --output json`, which must succeed.
fn explain_json(policy: &Path, pid: u32) -> Value {
    let out = explain(policy, pid, "json");
    assert!(
        out.status.success(),
        "explain {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "explain printed no JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn chain(v: &Value) -> Vec<(u64, String)> {
    v["chain"]
        .as_array()
        .expect("a chain")
        .iter()
        .map(|l| {
            (
                l["pid"].as_u64().unwrap(),
                l["role"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// A parent with two forked workers: the parent is the root (its own chain, its `match` checked
/// on itself, never an orphan, the last memory victim); each worker is a member whose chain
/// ends at the root, killed if the root dies.
#[test]
fn a_root_and_its_forked_workers() {
    let test = "explain_root_and_workers";
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, "memory_high = \"1G\""));
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();

    let root = explain_json(&policy, parent);
    assert_eq!(root["source"], "policy_file");
    assert_eq!(root["role"], "root", "{root:#}");
    assert_eq!(root["service"], "svc");
    assert_eq!(chain(&root), [(u64::from(parent), "root".to_owned())]);
    assert_eq!(root["matched_on"], parent);
    assert_eq!(root["matched"][0]["key"], "cmdline");
    assert_eq!(root["matched"][0]["pattern"], tok.as_str());
    assert_eq!(root["matched"][0]["matched"], true);
    assert_eq!(root["if_parent_dies"]["action"], "none");
    assert_eq!(
        root["budget"]["victim_rank"], 3,
        "a root is the last victim"
    );
    assert_eq!(root["budget"]["of"], 3);
    assert_eq!(root["protections"], Value::Array(vec![]));
    assert!(!root["unknown"].as_array().unwrap().is_empty());

    for &kid in &kids {
        let m = explain_json(&policy, kid);
        assert_eq!(m["role"], "member", "{m:#}");
        assert_eq!(m["service"], "svc");
        assert_eq!(
            chain(&m),
            [
                (u64::from(kid), "member".to_owned()),
                (u64::from(parent), "root".to_owned())
            ]
        );
        assert_eq!(m["matched_on"], parent, "checked on its root");
        assert_eq!(m["if_parent_dies"]["action"], "kill");
        assert_eq!(m["if_parent_dies"]["detail"], "SIGKILL at once");
        let rank = m["budget"]["victim_rank"].as_u64().unwrap();
        assert!((1..=2).contains(&rank), "{m:#}");
        assert_eq!(m["budget"]["sized_by"], "pss");
    }

    let text = explain(&policy, kids[0], "text");
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.starts_with(&format!(
            "pid {} (guardian-worklo): member of service `svc`\n",
            kids[0]
        )),
        "{text}"
    );
    assert!(
        text.contains("\n  parent dies  kill: SIGKILL at once\n"),
        "{text}"
    );
}

/// A process no service selects: each service names the first key of its `match` that failed,
/// in the order guardian checks them (a name that holds, then the user it does not run as).
#[test]
fn a_process_of_no_service_names_the_failing_key_per_service() {
    let test = "explain_outsider";
    let tok = token(test);
    // SAFETY: no preconditions.
    let other_uid = unsafe { libc::geteuid() } + 4242;
    let policy = policy_file(
        test,
        &format!(
            "[[service]]\nname = \"by-cmdline\"\nmatch = {{ cmdline = \"{tok}-elsewhere\" }}\n\
             [[service]]\nname = \"by-user\"\nmatch = {{ comm = \"guardian-work*\", user = {other_uid} }}\n"
        ),
    );
    let mut w = workload(&["tree", "1", "", &tok]);
    let (parent, _) = w.read_tree();
    let v = explain_json(&policy, parent);
    assert_eq!(v["role"], "none", "{v:#}");
    assert!(v["service"].is_null());
    assert_eq!(v["matched"], Value::Array(vec![]));
    assert_eq!(v["if_parent_dies"]["action"], "none");
    assert!(v["budget"].is_null());
    let last = chain(&v).last().cloned().unwrap();
    assert_eq!(last.0, 1, "a chain of no service runs up to pid 1: {v:#}");
    let misses = v["services"].as_array().unwrap();
    assert_eq!(misses.len(), 2);
    assert_eq!(misses[0]["service"], "by-cmdline");
    assert_eq!(misses[0]["first_failure"]["key"], "cmdline");
    assert!(misses[0]["first_failure"]["value"]
        .as_str()
        .unwrap()
        .contains(&tok));
    assert_eq!(misses[1]["service"], "by-user");
    assert_eq!(misses[1]["first_failure"]["key"], "user");
    assert_eq!(misses[1]["first_failure"]["matched"], false);
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() }.to_string();
    assert!(
        misses[1]["first_failure"]["value"]
            .as_str()
            .unwrap()
            .starts_with(&euid),
        "{v:#}"
    );
}

#[test]
fn pid_1_is_protected() {
    let test = "explain_pid_1";
    let policy = policy_file(test, &kill_policy(&token(test), ""));
    let v = explain_json(&policy, 1);
    assert_eq!(v["role"], "none");
    assert_eq!(chain(&v), [(1, "none".to_owned())]);
    assert_eq!(v["protections"][0], "pid 1 is init", "{v:#}");
}

#[test]
fn a_pid_that_does_not_exist_is_an_error() {
    let test = "explain_no_pid";
    let policy = policy_file(test, &kill_policy(&token(test), ""));
    // Above the kernel's largest pid_max: never a process.
    let out = explain(&policy, 4_194_305, "json");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing explained");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no process 4194305"), "{stderr}");
}

/// A worker left behind before guardian starts (parent init, its process group's leader gone)
/// is an orphan found at start: reported unless `orphans_at_start = "enforce"`. With root, the
/// daemon started on the same policy finds the same.
#[test]
fn an_orphan_found_at_start() {
    let test = "explain_orphan_at_start";
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    // Its own process group, whose leader exits: the grandchild keeps the group id.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guardian-workload"));
    cmd.args(["double-fork", &tok]).process_group(0);
    let mut w = Workload::spawn(cmd);
    let p = w.read_pairs();
    let orphan = pid(&p, "grandchild");
    w.cleanup.push(orphan);
    w.wait();
    if ppid_of(orphan) != Some(1) {
        missing(
            test,
            &format!(
                "a subreaper ({:?}) took the orphan, so it has no start-up signature",
                ppid_of(orphan)
            ),
        );
        return;
    }
    let v = explain_json(&policy, orphan);
    assert_eq!(v["role"], "orphan", "{v:#}");
    assert_eq!(v["service"], "svc");
    assert_eq!(
        v["matched_on"], orphan,
        "matched on itself: no root above it"
    );
    assert_eq!(v["if_parent_dies"]["action"], "report");
    assert!(v["if_parent_dies"]["detail"]
        .as_str()
        .unwrap()
        .starts_with("already an orphan"));
    let enforce = policy_file(
        &format!("{test}_enforce"),
        &kill_policy(&tok, "orphans_at_start = \"enforce\""),
    );
    assert_eq!(
        explain_json(&enforce, orphan)["if_parent_dies"]["action"],
        "kill"
    );
    if !privileged(test) {
        return;
    }
    // The daemon's start-up finds it so (in audit mode: it is only recorded).
    let g = Guardian::start(&["--policy", policy.to_str().unwrap(), "--dry-run"]);
    let d = g.wait_decision(orphan);
    assert_eq!(d["reason"], "orphan_at_start", "{d}");
    // ... and it is an orphan of the service there too.
    let live = g.ask(&["explain", &orphan.to_string(), "--output", "json"]);
    let live: Value = serde_json::from_slice(&live.stdout).expect("a JSON explanation");
    assert_eq!(live["role"], "orphan", "{live:#}");
    assert_eq!(g.status()["services"][0]["orphans_alive"], 1);
    g.stop();
}

/// The offline answer is the daemon's start-up rule: a daemon started on the same policy finds
/// the root explain names, with the workers as its members.
#[test]
fn the_daemon_finds_the_roots_explain_names() {
    let test = "explain_agrees_with_daemon";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    assert_eq!(explain_json(&policy, parent)["role"], "root");
    let g = Guardian::start(&["--policy", policy.to_str().unwrap(), "--dry-run"]);
    let root = g.wait_root(parent);
    assert_eq!(root["found"], "startup");
    assert_eq!(root["members"], 1 + kids.len(), "{root}");
    let records = g.stop();
    let roots: Vec<&Value> = records.iter().filter(|v| v["event"] == "root").collect();
    assert_eq!(roots.len(), 1, "the workers are not roots: {roots:?}");
}

/// `guardian explain PID` asks the running daemon: a root, a forked worker, an orphan it saw
/// made (audit mode keeps it alive), and a process of no service; text as well as JSON.
#[test]
fn the_daemon_explains_what_it_saw() {
    let test = "explain_daemon";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(
        test,
        &format!("mode = \"audit\"\n{}", kill_policy(&tok, "")),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    let ask = |pid: u32| -> Value {
        let out = g.ask(&["explain", &pid.to_string(), "--output", "json"]);
        assert!(
            out.status.success(),
            "explain {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("a JSON explanation")
    };
    let root = ask(parent);
    assert_eq!(root["source"], "daemon");
    assert_eq!(root["role"], "root");
    assert_eq!(root["service"], "svc");
    assert_eq!(root["if_parent_dies"]["action"], "none");
    let worker = ask(kids[0]);
    assert_eq!(worker["role"], "member");
    assert_eq!(
        chain(&worker),
        vec![
            (u64::from(kids[0]), "member".into()),
            (u64::from(parent), "root".into())
        ]
    );
    assert_eq!(worker["if_parent_dies"]["action"], "kill");

    guardian_tests::kill(parent, libc::SIGKILL);
    g.wait_decision(kids[0]);
    let orphan = ask(kids[0]);
    assert_eq!(orphan["role"], "orphan", "{orphan}");
    assert_eq!(orphan["service"], "svc");

    let outsider = ask(g.pid());
    assert_eq!(outsider["role"], "none");
    assert!(
        outsider["protections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("guardian itself")),
        "{outsider}"
    );
    let text = g.ask(&["explain", &kids[1].to_string(), "--output", "text"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("orphan of service `svc`"), "{text}");
    let gone = g.ask(&["explain", "4194303", "--output", "json"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no process 4194303"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    g.stop();
}
