//! `guardian --policy`: orphaned workers die the moment their parent dies (or are only recorded
//! in audit mode), and nothing outside the policy is ever touched.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, all_gone, children_of, decisions, eventually, guardian_bin, kill, kill_policy, pid,
    pids, policy_file, privileged, python, script, service_policy, spawn_with_pid, token, Guardian,
    Workload, WAIT,
};

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// Python workers of a SIGKILLed parent: killed in enforce mode, recorded once each in audit mode.
fn python_orphans(method: &str, kind: &str, n: usize, audit: bool) {
    let test = format!(
        "orphans_{method}_{kind}_{}",
        if audit { "audit" } else { "enforce" }
    );
    if !privileged(&test) {
        return;
    }
    let Some(py) = python() else {
        guardian_tests::missing(&test, "python3 is not installed");
        return;
    };
    let tok = token(&test);
    let policy = policy_file(&test, &kill_policy(&tok, ""));
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    if audit {
        args.push("--dry-run");
    }
    let g = Guardian::start(&args);
    let mut cmd = Command::new(py);
    cmd.arg(script("mp_workers.py"))
        .args([method, &n.to_string(), kind, &tok]);
    let mut w = Workload::spawn(cmd);
    let p = w.read_pairs();
    let parent = pid(&p, "parent");
    let workers = pids(&p, "workers");
    assert_eq!(workers.len(), n);
    w.cleanup.extend(&workers);
    // The parent's own children are the orphans: the workers themselves, or (forkserver) the
    // fork server whose children the workers are; and the resource tracker.
    let direct = children_of(parent);
    w.cleanup.extend(&direct);
    let root = g.wait_root(parent);
    assert_eq!(root["service"], "svc");

    kill(parent, libc::SIGKILL);
    if audit {
        for &o in &direct {
            let d = g.wait_decision(o);
            assert_eq!(d["mode"], "audit");
            assert_eq!(d["performed"], false);
            assert_eq!(d["action"], "kill");
            assert_eq!(d["reason"], "orphan");
            assert_eq!(d["old_parent"], parent);
        }
        thread::sleep(Duration::from_millis(500));
        for &wk in workers.iter().chain(&direct) {
            assert!(alive(wk), "audit mode killed {wk}");
        }
    } else {
        let mut everyone = workers.clone();
        everyone.extend(&direct);
        let took = all_gone(&everyone, Duration::from_secs(1));
        eprintln!("{test}: {n} workers gone {took:?} after their parent's SIGKILL");
    }
    // Stop guardian first so that cleanup kills are not recorded as decisions.
    let records = g.stop();
    for &o in workers.iter().chain(&direct) {
        let d = decisions(&records, o);
        // In audit mode a fork server outlives the parent, so its workers are never orphaned.
        let expected = usize::from(!audit || direct.contains(&o));
        assert_eq!(d.len(), expected, "decisions for {o}: {d:?}");
        let Some(d) = d.first() else { continue };
        assert_eq!(d["service"], "svc");
        assert_eq!(d["performed"], !audit, "{d}");
        assert!(d["cmdline"].is_string() && d["comm"].is_string());
        if direct.contains(&o) {
            assert_eq!(d["old_parent"], parent, "{d}");
        }
        if !audit {
            assert_eq!(d["result"], "sent SIGKILL", "{d}");
            assert!(d["latency_us"].as_u64().is_some(), "{d}");
        }
    }
    let root_decisions = decisions(&records, parent);
    assert!(
        root_decisions.is_empty(),
        "the root is never an orphan: {root_decisions:?}"
    );
}

#[test]
fn spawn_processes_are_killed() {
    python_orphans("spawn", "process", 3, false);
}

#[test]
fn fork_processes_are_killed() {
    python_orphans("fork", "process", 3, false);
}

#[test]
fn forkserver_processes_are_killed() {
    python_orphans("forkserver", "process", 3, false);
}

#[test]
fn pool_of_four_is_killed() {
    python_orphans("fork", "pool", 4, false);
}

#[test]
fn process_pool_executor_is_killed() {
    python_orphans("spawn", "executor", 3, false);
}

#[test]
fn audit_mode_spawn_kills_nothing() {
    python_orphans("spawn", "process", 3, true);
}

#[test]
fn audit_mode_fork_pool_kills_nothing() {
    python_orphans("fork", "pool", 4, true);
}

#[test]
fn audit_mode_forkserver_kills_nothing() {
    python_orphans("forkserver", "process", 3, true);
}

#[test]
fn terminate_escalates_only_when_sigterm_is_ignored() {
    let test = "terminate_escalates";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        service_policy(tok, "terminate", "kill_timeout = \"1s\"")
    }) else {
        return;
    };
    let mut w = workload(&["tree", "2", "split", &tok]);
    let (parent, kids) = w.read_tree();
    let (honours, ignores) = (kids[0], kids[1]);
    g.wait_root(parent);
    let killed = Instant::now();
    kill(parent, libc::SIGKILL);
    all_gone(&[honours], Duration::from_millis(900));
    assert!(
        alive(ignores),
        "SIGTERM is ignored: alive until kill_timeout"
    );
    all_gone(&[ignores], Duration::from_secs(5));
    // kill_timeout is 1 s from the SIGTERM, which followed the parent's death.
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed before the timeout ({took:?} after the parent)"
    );
    let records = g.stop();
    let h = decisions(&records, honours);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["action"], "terminate");
    assert_eq!(h[0]["result"], "sent SIGTERM");
    let i = decisions(&records, ignores);
    assert_eq!(i.len(), 2, "{i:?}");
    assert_eq!(i[0]["action"], "terminate");
    assert_eq!(i[1]["action"], "kill");
    assert_eq!(i[1]["reason"], "kill_timeout");
    assert_eq!(i[1]["performed"], true);
}

#[test]
fn processes_outside_the_policy_survive() {
    let test = "outside_policy";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    // An orphan of a process no service names.
    let mut outsider = workload(&["double-fork"]);
    let p = outsider.read_pairs();
    let grandchild = pid(&p, "grandchild");
    outsider.cleanup.push(grandchild);
    // A service tree in the same run, as a positive control.
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(300));
    assert!(alive(grandchild), "the outsider's orphan was touched");
    let records = g.stop();
    assert!(decisions(&records, grandchild).is_empty());
}

#[test]
fn orphans_not_selected_by_orphan_match_survive() {
    let test = "orphan_match";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        kill_policy(tok, "orphan_match = { cmdline = \"multiprocessing\" }")
    }) else {
        return;
    };
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    thread::sleep(Duration::from_millis(500));
    for &k in &kids {
        assert!(
            alive(k),
            "orphan {k} does not match orphan_match and must live"
        );
    }
    let records = g.stop();
    for &k in &kids {
        assert!(decisions(&records, k).is_empty());
    }
}

/// The same, found at start: the shell (whose own command line matches) and the service it
/// launched are both roots, however the scan orders them, and the shell's normal exit leaves the
/// service alone.
#[test]
fn a_root_found_at_start_below_its_launching_shell_outlives_it() {
    let test = "shell_root_at_start";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let out = std::env::temp_dir().join(format!("{tok}.out"));
    let script = format!(
        "{} tree 2 keep {tok} > {} 2>&1 & read x; exit 0",
        env!("CARGO_BIN_EXE_guardian-workload"),
        out.display()
    );
    let mut shell = Command::new("/bin/sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    eventually("the backgrounded root to report", WAIT, || {
        line = std::fs::read_to_string(&out).unwrap_or_default();
        line.contains("children=")
    });
    let pairs = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let (root, kids) = (pid(&pairs, "parent"), pids(&pairs, "children"));
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    assert_eq!(g.wait_root(root)["found"], "startup");
    assert_eq!(g.wait_root(shell.id())["found"], "startup");
    drop(shell.stdin.take()); // `read` ends: the shell exits normally
    assert!(shell.wait().unwrap().success());
    thread::sleep(Duration::from_millis(400));
    assert!(alive(root), "the root lost its shell, and must live");
    for &k in &kids {
        assert!(alive(k), "a child of a live root is no orphan");
    }
    kill(root, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));
    let records = g.stop();
    assert!(decisions(&records, root).is_empty(), "{records:?}");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn a_root_whose_launching_shell_exits_is_left_alone() {
    let test = "shell_root";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let out = std::env::temp_dir().join(format!("{tok}.out"));
    let script = format!(
        "{} tree 2 keep {tok} > {} 2>&1 &",
        env!("CARGO_BIN_EXE_guardian-workload"),
        out.display()
    );
    let status = Command::new("/bin/sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut line = String::new();
    eventually("the backgrounded root to report", WAIT, || {
        line = std::fs::read_to_string(&out).unwrap_or_default();
        line.contains("children=")
    });
    let pairs = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let (root, kids) = (pid(&pairs, "parent"), pids(&pairs, "children"));
    g.wait_root(root);
    thread::sleep(Duration::from_millis(300));
    assert!(alive(root), "the root lost its shell, and must live");
    for &k in &kids {
        assert!(alive(k), "a child of a live root is no orphan");
    }
    // Positive control: once the root itself dies, its children are orphans.
    kill(root, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));
    let records = g.stop();
    assert!(decisions(&records, root).is_empty());
    let _ = std::fs::remove_file(out);
}

#[test]
fn protected_names_are_never_signalled() {
    let test = "protected";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        format!(
            "protect = [\"sleep\"]\n[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\" }}\norphans = \"kill\"\n"
        )
    }) else {
        return;
    };
    let mut sh = Command::new("/bin/sh")
        .args(["-c", "sleep 60 & sleep 60 & wait", &tok])
        .spawn()
        .unwrap();
    let root = sh.id();
    g.wait_root(root);
    let mut kids = Vec::new();
    eventually("two sleeps", WAIT, || {
        kids = children_of(root);
        kids.len() == 2
            && kids.iter().all(|k| {
                std::fs::read_to_string(format!("/proc/{k}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            })
    });
    kill(root, libc::SIGKILL);
    let _ = sh.wait();
    for &k in &kids {
        let d = g.wait_decision(k);
        assert_eq!(d["performed"], false);
        assert!(
            d["result"]
                .as_str()
                .unwrap()
                .contains("protected name `sleep`"),
            "{d}"
        );
    }
    thread::sleep(Duration::from_millis(200));
    for &k in &kids {
        assert!(alive(k), "protected {k} was signalled");
        kill(k, libc::SIGKILL);
    }
    g.stop();
}

#[test]
fn a_reused_pid_is_not_signalled() {
    let test = "pid_reuse";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        service_policy(tok, "terminate", "kill_timeout = \"2s\"")
    }) else {
        return;
    };
    let mut w = workload(&["tree", "1", "", &tok]);
    let (parent, kids) = w.read_tree();
    let orphan = kids[0];
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    // The orphan honours SIGTERM; its pid then goes to a newcomer before kill_timeout ends.
    all_gone(&[orphan], Duration::from_secs(1));
    eventually("the orphan to be reaped", WAIT, || {
        !std::path::Path::new(&format!("/proc/{orphan}")).exists()
    });
    let Some(mut newcomer) = spawn_with_pid(orphan) else {
        guardian_tests::missing(test, "could not place a process on the freed pid");
        return;
    };
    thread::sleep(Duration::from_millis(2_800));
    assert!(
        newcomer.try_wait().unwrap().is_none(),
        "the newcomer on pid {orphan} was signalled; guardian's decisions on that pid: {:?}",
        decisions(&g.records(), orphan)
    );
    let _ = newcomer.kill();
    let _ = newcomer.wait();
    let records = g.stop();
    let d = decisions(&records, orphan);
    assert_eq!(d.len(), 1, "only the SIGTERM to the orphan: {d:?}");
}

#[test]
fn a_multithreaded_parent_orphans_nothing_until_its_last_thread_exits() {
    let test = "leader_exit";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };
    let mut w = workload(&["leader-exit", &tok]);
    let p = w.read_pairs();
    let (me, child) = (pid(&p, "pid"), pid(&p, "child"));
    w.cleanup.push(child);
    g.wait_root(me);
    thread::sleep(Duration::from_millis(300));
    assert!(alive(child), "the group lives on in its second thread");
    assert!(decisions(&g.records(), child).is_empty());
    w.release();
    all_gone(&[child], Duration::from_secs(1));
    let records = g.stop();
    assert_eq!(decisions(&records, child).len(), 1);
}

/// Bad policies: a clear error naming file, line, column and key; nothing starts.
#[test]
fn invalid_policies_are_refused() {
    let cases = [
        ("unknown_key", "[[service]]\nname = \"a\"\nmatch = { cmdline = \"x\" }\norphan = \"kill\"\n", ":4:1: key `service[0].orphan`"),
        ("bad_regex", "[[service]]\nname = \"a\"\nmatch = { cmdline = \"(\" }\n", ":3:21: key `service[0].match.cmdline`"),
        ("bad_duration", "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\nkill_timeout = \"soon\"\n", ":4:16: key `service[0].kill_timeout`"),
        ("duplicate", "[[service]]\nname = \"a\"\nmatch = { comm = \"x\" }\n[[service]]\nname = \"a\"\nmatch = { comm = \"y\" }\n", ":5:8: key `service[1].name`: duplicate service name"),
    ];
    for (name, text, expect) in cases {
        let path = policy_file(name, text);
        for args in [vec!["check", "--policy"], vec!["--policy"]] {
            let out = Command::new(guardian_bin())
                .args(&args)
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{name}: accepted");
            assert!(
                stderr.contains(&format!("{}{expect}", path.display())),
                "{name}: {stderr}"
            );
            assert!(
                !stderr.contains("attached"),
                "{name}: loaded probes: {stderr}"
            );
        }
    }
    let good = Command::new(guardian_bin())
        .args(["check", "--policy"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/analyticbot.toml"))
        .output()
        .unwrap();
    assert!(good.status.success());
    let summary = String::from_utf8_lossy(&good.stdout);
    assert!(summary.contains("analyticbot-mtproto"), "{summary}");
}

/// The grace a launcher's young child gets to exec into a root of its own spares nothing else:
/// orphans that never exec die after it when their parent exits normally, and orphans of a
/// killed parent get no grace at all.
#[test]
fn the_launcher_grace_spares_no_orphan_that_does_not_exec() {
    let test = "launcher_grace";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| kill_policy(tok, "")) else {
        return;
    };

    // The parent exits normally (exit code 0) right after forking.
    let mut exits = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = exits.read_tree();
    g.wait_root(parent);
    assert!(exits.wait().success());
    all_gone(&kids, Duration::from_secs(2));

    // The parent is killed right after forking: its young orphans go at once.
    let mut killed = workload(&["tree", "2", "", &tok]);
    let (parent, young) = killed.read_tree();
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    all_gone(&young, Duration::from_secs(1));

    let records = g.stop();
    for &k in &kids {
        let d = decisions(&records, k);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["result"], "sent SIGKILL", "{}", d[0]);
    }
    for &k in &young {
        let d = decisions(&records, k);
        assert_eq!(d.len(), 1, "{d:?}");
        // Held back by the 250 ms grace, this would read at least ~200 ms.
        let latency = d[0]["latency_us"].as_u64().unwrap();
        assert!(
            latency < 200_000,
            "a killed parent's orphan waited {latency} µs"
        );
    }
}
