//! Operations: Prometheus metrics compared with `/proc` and with the decisions printed, `guardian
//! status` over the control socket (and who may ask), live reload while orphans are being made,
//! systemd's notifications and JSON diagnostics.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram, process::CommandExt as _},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, all_gone, budget_test_ready, children_of, eventually, guardian_bin, kill, kill_policy,
    policy_file, private_dir, privileged, python, script, service_cgroup_dirs, token,
    CgroupCleanup, Guardian, Workload, WAIT,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// One HTTP GET on loopback: (status code, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let code = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Small replies come whole; a chunked one is joined back.
    let body = if reply
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// The samples of an exposition, parsed by the Prometheus client library's OpenMetrics parser.
fn parse_metrics(py: &std::path::Path, text: &str) -> Vec<Value> {
    let mut child = Command::new(py)
        .arg(script("parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the metrics parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`; 0 when there is none.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

/// Whether the Prometheus client library (its parser) is installed; says why not.
fn metrics_parser(test: &str) -> Option<std::path::PathBuf> {
    // The distribution's package goes with the system interpreter, which may not be the
    // first python3 on PATH (pyenv).
    let found = python()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/bin/python3")])
        .find(|py| {
            Command::new(py)
                .args(["-c", "import prometheus_client.openmetrics.parser"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if found.is_none() {
        guardian_tests::missing(
            test,
            "python3's prometheus_client is not installed (`cargo xtask test` installs it)",
        );
    }
    found
}

/// Audit mode: orphans stay, and the metrics say so; the counts agree with `/proc` and the
/// decision counter with the decisions printed.
#[test]
fn metrics_agree_with_proc_and_the_decisions() {
    let test = "metrics_audit";
    if !privileged(test) {
        return;
    }
    let Some(py) = metrics_parser(test) else {
        return;
    };
    let tok = token(test);
    let policy = policy_file(
        test,
        &format!("mode = \"audit\"\n{}", kill_policy(&tok, "")),
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let g = Guardian::start(&[
        "--policy",
        policy.to_str().unwrap(),
        "--metrics-address",
        &addr,
    ]);
    let mut w = workload(&["tree", "3", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);

    let svc = [("service", "svc")];
    let scrape = || parse_metrics(&py, &get(port, "/metrics").1);
    eventually("members in the metrics", WAIT, || {
        sample(&scrape(), "guardian_service_members", &svc) == 4.0
    });
    let m = scrape();
    assert_eq!(
        1.0 + children_of(parent).len() as f64,
        4.0,
        "the workload's own count"
    );
    assert_eq!(sample(&m, "guardian_service_roots", &svc), 1.0);
    assert_eq!(sample(&m, "guardian_service_orphans", &svc), 0.0);
    assert_eq!(
        m.iter()
            .find(|s| s["name"] == "guardian_build_info")
            .map(|s| s["labels"]["version"].clone()),
        Some(Value::from(env!("CARGO_PKG_VERSION")))
    );

    kill(parent, libc::SIGKILL);
    for &k in &kids {
        g.wait_decision(k);
    }
    eventually("orphans in the metrics", WAIT, || {
        sample(&scrape(), "guardian_service_orphans", &svc) == 3.0
    });
    let m = scrape();
    let live = kids.iter().filter(|&&k| alive(k)).count() as f64;
    assert_eq!(live, 3.0, "audit mode killed an orphan");
    assert_eq!(sample(&m, "guardian_service_members", &svc), live);
    let printed = g
        .records()
        .iter()
        .filter(|v| v["event"] == "decision" && v["reason"] == "orphan")
        .count() as f64;
    let counted = sample(
        &m,
        "guardian_decisions_total",
        &[
            ("service", "svc"),
            ("action", "kill"),
            ("reason", "orphan"),
            ("performed", "false"),
        ],
    );
    assert_eq!(counted, printed);
    // No pid or command name is ever a label.
    for s in &m {
        for key in s["labels"].as_object().unwrap().keys() {
            assert!(
                [
                    "service",
                    "action",
                    "reason",
                    "performed",
                    "result",
                    "version",
                    "le"
                ]
                .contains(&key.as_str()),
                "unbounded label {key} in {s}"
            );
        }
    }
    g.stop();
}

/// Enforce mode: orphans go, the gauge returns to 0, and every kill's latency is observed.
#[test]
fn metrics_in_enforce_mode_count_kills_and_their_latency() {
    let test = "metrics_enforce";
    if !privileged(test) {
        return;
    }
    let Some(py) = metrics_parser(test) else {
        return;
    };
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let g = Guardian::start(&[
        "--policy",
        policy.to_str().unwrap(),
        "--metrics-address",
        &addr,
    ]);
    assert_eq!(get(port, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(port, "/nothing").0, 404);
    let mut w = workload(&["tree", "3", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(2));
    let scrape = || parse_metrics(&py, &get(port, "/metrics").1);
    eventually("the service emptied in the metrics", WAIT, || {
        sample(&scrape(), "guardian_service_members", &[("service", "svc")]) == 0.0
    });
    let m = scrape();
    assert_eq!(
        sample(&m, "guardian_service_orphans", &[("service", "svc")]),
        0.0
    );
    let performed = [
        ("service", "svc"),
        ("reason", "orphan"),
        ("performed", "true"),
    ];
    assert_eq!(sample(&m, "guardian_decisions_total", &performed), 3.0);
    assert_eq!(
        sample(&m, "guardian_orphan_kill_latency_seconds_count", &[]),
        3.0
    );
    let sum = sample(&m, "guardian_orphan_kill_latency_seconds_sum", &[]);
    assert!(sum > 0.0 && sum < 3.0, "latency sum {sum} s");
    assert_eq!(sample(&m, "guardian_events_lost_total", &[]), 0.0);
    g.stop();
}

/// `guardian status` on a live service: what `/proc` shows, in JSON and for a terminal.
#[test]
fn status_reports_the_live_services() {
    let test = "status_live";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(
        test,
        &format!("mode = \"audit\"\n{}", kill_policy(&tok, "tasks_max = 50")),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    for &k in &kids {
        g.wait_decision(k);
    }
    let st = g.status();
    assert_eq!(st["pid"], g.pid());
    assert_eq!(st["mode"], "audit");
    assert_eq!(st["policy"], policy.to_str().unwrap());
    assert_eq!(st["events_lost"], 0);
    let svc = &st["services"][0];
    assert_eq!(svc["name"], "svc");
    assert_eq!(svc["orphans"], "kill");
    assert_eq!(svc["members"], kids.iter().filter(|&&k| alive(k)).count());
    assert_eq!(svc["orphans_alive"], 2);
    assert_eq!(svc["roots"], 0, "the root is dead");
    assert_eq!(svc["tasks_max"], 50);
    assert_eq!(svc["decisions"]["kill"], 2);

    let text = g.ask(&["status", "--output", "text"]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("audit mode"), "{text}");
    let line = text.lines().find(|l| l.starts_with("svc ")).expect(&text);
    assert!(line.contains("kill 2"), "{line}");
    g.stop();
}

/// Only root may ask: a user is refused by the socket's permissions, and, where those were
/// loosened, by its peer credentials.
#[test]
fn a_client_that_is_not_root_is_refused() {
    let test = "status_not_root";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let socket = g.socket().to_path_buf();
    let dir = socket.parent().unwrap().to_path_buf();
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // The client binary where user 65534 may run it.
    let bin_dir = private_dir("client");
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.join("guardian");
    std::fs::copy(guardian_bin(), &bin).unwrap();
    let as_nobody = || {
        Command::new(&bin)
            .args(["status", "--socket"])
            .arg(&socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = as_nobody();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only root may ask"), "{err}");

    // An operator loosened the permissions: the daemon still refuses by peer credentials.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    g.wait_stderr("refused a client that is not root");
    // Root still gets its answer.
    assert_eq!(g.status()["services"][0]["name"], "svc");
    let _ = std::fs::remove_dir_all(&bin_dir);
    g.stop();
}

/// Reloads, valid and invalid, while one service's orphans keep being made: none is missed; a
/// service added finds its running root at once; an invalid policy changes nothing; a removed
/// service's members are forgotten, not killed.
#[test]
fn reloads_while_orphans_are_made() {
    let test = "reload_live";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    // Not containing `tok`, which the first service matches.
    let tok_b = token("added_reload");
    let v1 = kill_policy(&tok, "");
    let v2 = format!(
        "{v1}\n[[service]]\nname = \"added\"\nmatch = {{ cmdline = \"{tok_b}\" }}\norphans = \"kill\"\n"
    );
    let policy = policy_file(test, &v1);
    // Reloads on SIGHUP only here (the file watch has a test of its own).
    let g = Guardian::start(&[
        "--policy",
        policy.to_str().unwrap(),
        "--watch-policy",
        "false",
    ]);
    let reload = |text: &str, n: usize| -> Value {
        std::fs::write(&policy, text).unwrap();
        kill(g.pid(), libc::SIGHUP);
        eventually("the reload record", WAIT, || {
            g.records()
                .iter()
                .filter(|v| v["event"] == "reload")
                .count()
                >= n
        });
        g.records()
            .into_iter()
            .filter(|v| v["event"] == "reload")
            .nth(n - 1)
            .unwrap()
    };

    // A tree of the service the reload adds, already running.
    let mut b = workload(&["tree", "2", "", &tok_b]);
    let (b_parent, b_kids) = b.read_tree();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let made = thread::scope(|scope| {
        let churn = scope.spawn(|| {
            let mut made = 0;
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
            {
                let mut w = workload(&["tree", "2", "", &tok]);
                let (parent, kids) = w.read_tree();
                g.wait_root(parent);
                kill(parent, libc::SIGKILL);
                all_gone(&kids, Duration::from_secs(2));
                made += kids.len();
            }
            made
        });
        thread::sleep(Duration::from_millis(300));
        let r = reload(&v2, 1);
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["added"], serde_json::json!(["added"]));
        // The running tree of the added service (and perhaps a churn root whose exec had
        // not been read yet).
        assert!(r["roots"].as_u64().unwrap() >= 1, "{r}");
        let root = g.wait_root(b_parent);
        assert_eq!(root["service"], "added");
        assert_eq!(root["found"], "reload");

        let r = reload("[[service]]\nname = \"broken\"\n", 2);
        assert_eq!(r["result"], "error");
        assert!(r["error"].as_str().unwrap().contains("match"), "{r}");
        thread::sleep(Duration::from_millis(300));

        let r = reload(&v1, 3);
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["removed"], serde_json::json!(["added"]));
        assert_eq!(r["forgotten"], 3);
        thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap()
    });
    assert!(made >= 4, "only {made} orphans made during the reloads");

    // The removed service's tree: forgotten, so its orphans live on.
    kill(b_parent, libc::SIGKILL);
    thread::sleep(Duration::from_millis(500));
    for &k in &b_kids {
        assert!(alive(k), "a forgotten member {k} was killed");
    }
    let records = g.stop();
    assert!(
        !records
            .iter()
            .any(|v| v["event"] == "decision"
                && b_kids.contains(&(v["pid"].as_u64().unwrap() as u32))),
        "a decision on a forgotten member"
    );
    let st: Vec<&Value> = records.iter().filter(|v| v["event"] == "reload").collect();
    assert_eq!(st.len(), 3);
}

/// `guardian reload` waits for the outcome: what changed and exit status 0, or why not and 1.
#[test]
fn guardian_reload_answers_with_the_outcome() {
    let test = "reload_request";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let v1 = kill_policy(&tok, "");
    let policy = policy_file(test, &v1);
    let g = Guardian::start(&[
        "--policy",
        policy.to_str().unwrap(),
        "--watch-policy",
        "false",
    ]);
    std::fs::write(
        &policy,
        format!("{v1}\n[[service]]\nname = \"more\"\nmatch = {{ comm = \"nothing-{tok}\" }}\n"),
    )
    .unwrap();
    let out = g.ask(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "ok");
    assert_eq!(v["added"], serde_json::json!(["more"]));
    // Answered once in force: the status already has it.
    assert_eq!(g.status()["services"].as_array().unwrap().len(), 2);

    std::fs::write(&policy, "mode = \"sometimes\"\n").unwrap();
    let out = g.ask(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the policy in force stays") && err.contains("mode"),
        "{err}"
    );
    assert_eq!(g.status()["services"].as_array().unwrap().len(), 2);
    let r = g.wait_for("the refused reload", |v| {
        v["event"] == "reload" && v["result"] == "error"
    });
    assert_eq!(r["trigger"], "request");
    g.stop();
}

/// A Kubernetes ConfigMap mounted as a directory: the kubelet writes the new contents into a
/// timestamped directory and renames a `..data` symlink over the old one. guardian reloads on
/// its own; a rewrite that leaves the contents as they were reloads nothing; a bad edit is
/// refused and the policy in force stays.
#[test]
fn a_configmap_update_is_reloaded_without_a_signal() {
    let test = "reload_configmap";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let v1 = kill_policy(&tok, "");
    let v2 = format!(
        "{v1}\n[[service]]\nname = \"added\"\nmatch = {{ cmdline = \"{}\" }}\n",
        token("configmap_added")
    );
    let dir = private_dir("configmap");
    let publish = |version: &str, text: &str| {
        let ts = dir.join(format!("..2026_11_26_02_00_00.{version}"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("policy.toml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(ts.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    publish("1", &v1);
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    let policy = dir.join("policy.toml");
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let reloads = || -> Vec<Value> {
        g.records()
            .into_iter()
            .filter(|v| v["event"] == "reload")
            .collect()
    };

    publish("2", &v2);
    eventually("a reload after the ConfigMap swap", WAIT, || {
        reloads().len() == 1
    });
    let r = &reloads()[0];
    assert_eq!(r["trigger"], "file", "{r}");
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["added"], serde_json::json!(["added"]));

    // The same contents again: nothing to reload.
    publish("3", &v2);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(reloads().len(), 1, "{:?}", reloads());

    // A broken edit: refused, and the service it would remove stays.
    publish("4", "[[service]]\nname = \"broken\"\n");
    eventually("the refused reload", WAIT, || reloads().len() == 2);
    assert_eq!(reloads()[1]["result"], "error");
    assert_eq!(g.status()["services"].as_array().unwrap().len(), 2);
    g.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that changes a kept `own` service's budgets writes them to its cgroup, members in
/// place; one that removes the service leaves its members alone and removes its cgroup once
/// they are gone.
#[test]
fn a_reload_rewrites_a_kept_services_limits_and_retires_a_removed_ones_cgroup() {
    let test = "reload_limits";
    if !budget_test_ready(test, true) {
        return;
    }
    let tok = token(test);
    let _cleanup = CgroupCleanup(tok.clone());
    let policy_text = |memory_max: &str, tasks_max: u32| {
        let memory_max = if memory_max.is_empty() {
            String::new()
        } else {
            format!("memory_max = \"{memory_max}\"\n")
        };
        format!(
            "cgroup_parent = \"{tok}\"\n[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\" }}\n\
             orphans = \"report\"\ncgroup = \"own\"\n{memory_max}tasks_max = {tasks_max}\n"
        )
    };
    // What the kernel shows for no limit: `max` on v2, a huge number on v1.
    let unlimited = |v: &str| v == "max" || v.parse::<u64>().is_ok_and(|n| n >= 1 << 60);
    let policy = policy_file(test, &policy_text("300M", 40));
    let g = Guardian::start(&[
        "--policy",
        policy.to_str().unwrap(),
        "--watch-policy",
        "false",
    ]);
    let mut w = workload(&["tree", "2", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    let dirs = service_cgroup_dirs(&tok, "svc");
    let memory_file = if dirs.len() == 1 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let read = |dir: &std::path::Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    eventually("the first limits", WAIT, || {
        read(&dirs[0], memory_file) == (300u64 << 20).to_string()
    });
    assert_eq!(read(dirs.last().unwrap(), "pids.max"), "40");

    std::fs::write(&policy, policy_text("400M", 50)).unwrap();
    kill(g.pid(), libc::SIGHUP);
    let r = g.wait_for("the reload", |v| v["event"] == "reload");
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["changed"], serde_json::json!(["svc"]));
    assert_eq!(read(&dirs[0], memory_file), (400u64 << 20).to_string());
    assert_eq!(read(dirs.last().unwrap(), "pids.max"), "50");
    let procs = read(&dirs[0], "cgroup.procs");
    for pid in std::iter::once(parent).chain(kids.iter().copied()) {
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{pid} left the cgroup: {procs}"
        );
    }

    // memory_max dropped: its limit is lifted, tasks_max stays.
    std::fs::write(&policy, policy_text("", 50)).unwrap();
    kill(g.pid(), libc::SIGHUP);
    let reloads = || {
        g.records()
            .iter()
            .filter(|v| v["event"] == "reload")
            .count()
    };
    eventually("the second reload", WAIT, || reloads() == 2);
    let memory = read(&dirs[0], memory_file);
    assert!(unlimited(&memory), "memory_max left at {memory}");
    assert_eq!(read(dirs.last().unwrap(), "pids.max"), "50");

    // The service removed: its members stay where they are, alive and no longer limited, and
    // its cgroup goes once they are gone.
    let other = format!(
        "cgroup_parent = \"{tok}\"\n{}",
        kill_policy(&token("reload_limits_other"), "").replace("\"svc\"", "\"other\"")
    );
    std::fs::write(&policy, other).unwrap();
    kill(g.pid(), libc::SIGHUP);
    eventually("the third reload", WAIT, || reloads() == 3);
    let r = g
        .records()
        .into_iter()
        .filter(|v| v["event"] == "reload")
        .nth(2)
        .unwrap();
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["removed"], serde_json::json!(["svc"]));
    assert_eq!(r["added"], serde_json::json!(["other"]));
    assert_eq!(r["forgotten"], 3);
    assert!(dirs[0].is_dir(), "a cgroup with processes was removed");
    assert!(unlimited(&read(dirs.last().unwrap(), "pids.max")));
    kill(parent, libc::SIGKILL);
    thread::sleep(Duration::from_millis(300));
    for &k in &kids {
        assert!(alive(k), "a forgotten member {k} was killed");
        kill(k, libc::SIGKILL);
    }
    all_gone(&kids, Duration::from_secs(2));
    eventually("the removed service's cgroup gone", WAIT, || {
        dirs.iter().all(|d| !d.exists())
    });
    g.stop();
}

/// Under systemd: READY=1 with a status line, WATCHDOG=1 from the event loop, RELOADING=1 (with
/// MONOTONIC_USEC) then READY=1 around a reload; diagnostics as JSON lines.
#[test]
fn systemd_notifications_and_json_diagnostics() {
    let test = "sd_notify";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let dir = private_dir("notify");
    let notify = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd =
        Guardian::command(&["--policy", policy.to_str().unwrap(), "--log-format", "json"]);
    cmd.env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000");
    let g = Guardian::spawn(cmd);
    let mut seen: Vec<String> = Vec::new();
    let mut read_until = |what: &str, pred: &dyn Fn(&[String]) -> bool| {
        let start = Instant::now();
        while !pred(&seen) {
            assert!(start.elapsed() < WAIT, "no {what} among {seen:?}");
            let mut buf = [0u8; 4096];
            if let Ok(n) = sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read_until("READY=1 with STATUS=", &|s| {
        s.iter()
            .any(|m| m.contains("READY=1") && m.contains("STATUS=enforce: 1 service(s)"))
    });
    read_until("three WATCHDOG=1", &|s| {
        s.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3
    });
    kill(g.pid(), libc::SIGHUP);
    read_until("RELOADING=1 then READY=1", &|s| {
        let reloading = s
            .iter()
            .position(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="));
        reloading.is_some_and(|i| s[i..].iter().any(|m| m.contains("READY=1")))
    });
    // A frozen loop sends no WATCHDOG=1: systemd would restart it.
    kill(g.pid(), libc::SIGSTOP);
    thread::sleep(Duration::from_millis(100));
    while sock.recv(&mut [0u8; 4096]).is_ok() {}
    let frozen = Instant::now();
    let mut during = 0;
    while frozen.elapsed() < Duration::from_millis(600) {
        if let Ok(n) = sock.recv(&mut [0u8; 4096]) {
            during += usize::from(n > 0);
        }
    }
    kill(g.pid(), libc::SIGCONT);
    assert_eq!(during, 0, "notifications from a stopped guardian");

    g.wait_stderr("policy reloaded");
    for line in g.stderr().lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a diagnostic that is not JSON: {line:?}: {e}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    g.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
