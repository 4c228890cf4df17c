//! `guardian trace` on real processes: every record is checked against the pids the workload
//! reports, and what must not appear is checked as well as what must.

use std::{process::Command, thread, time::Duration};

use guardian_tests::{
    alive, eventually, kill, pid, pids, ppid_of, privileged, python, script, Guardian, Workload,
    WAIT,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

fn index_of(records: &[Value], pred: impl Fn(&Value) -> bool) -> Option<usize> {
    records.iter().position(pred)
}

#[test]
fn fork_and_exit() {
    if !privileged("fork_and_exit") {
        return;
    }
    let g = Guardian::trace();
    let mut w = workload(&["fork-exit", "7"]);
    let p = w.read_pairs();
    let (parent, child) = (pid(&p, "parent"), pid(&p, "child"));
    assert!(w.wait().success());

    let fork = g.wait_for("fork of the child", |v| {
        v["event"] == "fork" && v["pid"] == child
    });
    assert_eq!(fork["ppid"], parent);
    assert_eq!(fork["comm"], "guardian-worklo");
    let exit = g.wait_for("exit of the child", |v| {
        v["event"] == "exit" && v["pid"] == child
    });
    assert_eq!(exit["exit_code"], 7);
    assert_eq!(exit["ppid"], parent);
    let pexit = g.wait_for("exit of the parent", |v| {
        v["event"] == "exit" && v["pid"] == parent
    });
    assert_eq!(pexit["exit_code"], 0);
    assert_eq!(pexit["ppid"], std::process::id());

    let records = g.stop();
    let count = |event: &str, pid: u32| {
        records
            .iter()
            .filter(|v| v["event"] == event && v["pid"] == pid)
            .count()
    };
    assert_eq!(count("fork", child), 1);
    assert_eq!(count("exit", child), 1);
    assert_eq!(count("exit", parent), 1);
    assert_eq!(
        count("reparent", child),
        0,
        "the child was reaped, not orphaned"
    );
}

#[test]
fn threads_are_not_processes() {
    if !privileged("threads_are_not_processes") {
        return;
    }
    let g = Guardian::trace();
    let mut w = workload(&["threads", "4"]);
    let p = w.read_pairs();
    let me = pid(&p, "pid");
    let tids = pids(&p, "tids");
    assert_eq!(tids.len(), 4);
    assert!(w.wait().success());
    g.wait_for("exit of the threaded process", |v| {
        v["event"] == "exit" && v["pid"] == me
    });
    let records = g.stop();
    for v in &records {
        let pid = v["pid"].as_u64().unwrap_or(0) as u32;
        assert!(
            !tids.contains(&pid),
            "a thread produced a process record: {v}"
        );
        if v["event"] == "fork" {
            assert_ne!(v["ppid"], me, "the threaded process forked nothing: {v}");
        }
    }
    let exits = records
        .iter()
        .filter(|v| v["event"] == "exit" && v["pid"] == me)
        .count();
    assert_eq!(exits, 1, "one exit for the whole thread group");
}

#[test]
fn exec_reports_command_line() {
    if !privileged("exec_reports_command_line") {
        return;
    }
    let g = Guardian::trace();
    let mut child = Command::new("/bin/echo")
        .args(["guardian-exec-test", "two words"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("echo");
    let echo = child.id();
    child.wait().unwrap();
    let exec = g.wait_for("exec of echo", |v| v["event"] == "exec" && v["pid"] == echo);
    assert_eq!(exec["ppid"], std::process::id());
    assert_eq!(exec["comm"], "echo");
    assert!(exec["exe"].as_str().unwrap().ends_with("/echo"), "{exec}");
    assert_eq!(
        exec["argv"],
        serde_json::json!(["/bin/echo", "guardian-exec-test", "two words"])
    );
    assert_eq!(exec["cmdline"], "/bin/echo guardian-exec-test two words");

    // A command line longer than the kernel side copies is completed from /proc.
    let long: Vec<String> = (0..60).map(|i| format!("argument-{i:04}")).collect();
    let mut child = Command::new("/bin/sh")
        .args(["-c", "sleep 1; true", "sh-long"])
        .args(&long)
        .spawn()
        .expect("sh");
    let sh = child.id();
    let exec = g.wait_for("exec of the long command", |v| {
        v["event"] == "exec" && v["pid"] == sh
    });
    child.wait().unwrap();
    let argv: Vec<String> = serde_json::from_value(exec["argv"].clone()).unwrap();
    assert_eq!(argv.len(), 4 + long.len(), "{argv:?}");
    assert_eq!(&argv[4..], &long[..]);
    g.stop();
}

#[test]
fn double_fork_reparents_grandchild_to_the_reaper() {
    if !privileged("double_fork_reparents_grandchild_to_the_reaper") {
        return;
    }
    let g = Guardian::trace();
    let mut w = workload(&["double-fork"]);
    let p = w.read_pairs();
    let (parent, middle, grandchild) =
        (pid(&p, "parent"), pid(&p, "middle"), pid(&p, "grandchild"));
    w.cleanup.push(grandchild);

    let rep = g.wait_for("reparent of the grandchild", |v| {
        v["event"] == "reparent" && v["pid"] == grandchild
    });
    assert_eq!(rep["old_parent"], middle);
    let reaper = ppid_of(grandchild).expect("grandchild alive");
    assert_eq!(
        rep["new_parent"], reaper,
        "new parent is the reaper /proc shows"
    );
    assert_ne!(reaper, middle);
    assert_ne!(reaper, parent, "the parent is no subreaper");
    assert_eq!(rep["ppid"], reaper);

    let records = g.records();
    let exit_mid = index_of(&records, |v| v["event"] == "exit" && v["pid"] == middle)
        .expect("exit of the middle process");
    let rep_at = index_of(&records, |v| {
        v["event"] == "reparent" && v["pid"] == grandchild
    })
    .unwrap();
    assert!(
        exit_mid < rep_at,
        "the middle's exit comes before the reparent"
    );
    let fork_gc = records
        .iter()
        .find(|v| v["event"] == "fork" && v["pid"] == grandchild)
        .expect("fork of the grandchild");
    assert_eq!(fork_gc["ppid"], middle);

    kill(grandchild, libc::SIGKILL);
    let exit = g.wait_for("exit of the grandchild", |v| {
        v["event"] == "exit" && v["pid"] == grandchild
    });
    assert_eq!(exit["signal"], 9);
    assert_eq!(exit["ppid"], reaper);
    let records = g.stop();
    let reparents = records
        .iter()
        .filter(|v| v["event"] == "reparent" && v["pid"] == grandchild)
        .count();
    assert_eq!(reparents, 1);
}

#[test]
fn subreaper_receives_the_orphan() {
    if !privileged("subreaper_receives_the_orphan") {
        return;
    }
    let g = Guardian::trace();
    let mut w = workload(&["subreaper"]);
    let p = w.read_pairs();
    let (parent, middle, grandchild) =
        (pid(&p, "parent"), pid(&p, "middle"), pid(&p, "grandchild"));
    w.cleanup.push(grandchild);
    let rep = g.wait_for("reparent to the subreaper", |v| {
        v["event"] == "reparent" && v["pid"] == grandchild
    });
    assert_eq!(rep["old_parent"], middle);
    assert_eq!(rep["new_parent"], parent);
    assert_eq!(ppid_of(grandchild), Some(parent));
    g.stop();
}

#[test]
fn leader_exiting_first_orphans_nothing_until_the_last_thread() {
    if !privileged("leader_exiting_first_orphans_nothing_until_the_last_thread") {
        return;
    }
    let g = Guardian::trace();
    let mut w = workload(&["leader-exit"]);
    let p = w.read_pairs();
    let (me, child) = (pid(&p, "pid"), pid(&p, "child"));
    w.cleanup.push(child);
    // The leader thread is gone (the workload waited for it); the group still lives.
    thread::sleep(Duration::from_millis(300));
    assert!(g.of("exit", me).is_empty(), "no exit while a thread lives");
    assert!(
        g.of("reparent", child).is_empty(),
        "no orphan while a thread lives"
    );
    assert_eq!(ppid_of(child), Some(me));

    w.release();
    let exit = g.wait_for("exit of the whole group", |v| {
        v["event"] == "exit" && v["pid"] == me
    });
    assert_eq!(exit["exit_code"], 0);
    let rep = g.wait_for("reparent of the child", |v| {
        v["event"] == "reparent" && v["pid"] == child
    });
    assert_eq!(rep["old_parent"], me);
    assert_eq!(
        Some(rep["new_parent"].as_u64().unwrap() as u32),
        ppid_of(child)
    );
    let records = g.stop();
    assert_eq!(
        records
            .iter()
            .filter(|v| v["event"] == "exit" && v["pid"] == me)
            .count(),
        1
    );
}

fn python_workers_are_reparented(method: &str, kind: &str) {
    let test = format!("python_{method}_{kind}");
    if !privileged(&test) {
        return;
    }
    let Some(py) = python() else {
        guardian_tests::missing(&test, "python3 is not installed");
        return;
    };
    let g = Guardian::trace();
    let mut cmd = Command::new(py);
    cmd.arg(script("mp_workers.py")).args([method, "3", kind]);
    let mut w = Workload::spawn(cmd);
    let p = w.read_pairs();
    let parent = pid(&p, "parent");
    let workers = pids(&p, "workers");
    assert_eq!(workers.len(), 3);
    w.cleanup.extend(&workers);
    for &wk in &workers {
        assert_eq!(
            ppid_of(wk),
            Some(parent),
            "worker {wk} is the parent's child"
        );
    }

    kill(parent, libc::SIGKILL);
    let exit = g.wait_for("exit of the killed parent", |v| {
        v["event"] == "exit" && v["pid"] == parent
    });
    assert_eq!(exit["signal"], 9);
    // Every worker is either reparented, or (pool workers, which end on their own when their
    // task queue closes) dies while the dying parent is still its parent.
    for &wk in &workers {
        let v = g.wait_for(&format!("reparent or exit of worker {wk}"), |v| {
            (v["event"] == "reparent" || v["event"] == "exit") && v["pid"] == wk
        });
        if v["event"] == "reparent" {
            assert_eq!(v["old_parent"], parent);
            let new_parent = v["new_parent"].as_u64().unwrap() as u32;
            assert_ne!(new_parent, parent);
            if alive(wk) {
                assert_eq!(Some(new_parent), ppid_of(wk));
            }
        } else {
            assert!(kind == "pool", "only pool workers end by themselves: {v}");
            assert_eq!(v["ppid"], parent, "died before the kernel moved it: {v}");
        }
    }
    for &wk in &workers {
        kill(wk, libc::SIGKILL);
    }
    for &wk in &workers {
        g.wait_for(&format!("exit of worker {wk}"), |v| {
            v["event"] == "exit" && v["pid"] == wk
        });
    }
    let records = g.stop();
    for &wk in &workers {
        let n = records
            .iter()
            .filter(|v| v["event"] == "reparent" && v["pid"] == wk)
            .count();
        let expected = if kind == "pool" { n.min(1) } else { 1 };
        assert_eq!(n, expected, "one reparent record for worker {wk}");
    }
}

#[test]
fn python_multiprocessing_spawn_processes() {
    python_workers_are_reparented("spawn", "process");
}

#[test]
fn python_multiprocessing_spawn_pool() {
    python_workers_are_reparented("spawn", "pool");
}

#[test]
fn python_multiprocessing_fork_pool() {
    python_workers_are_reparented("fork", "pool");
}

#[test]
fn python_multiprocessing_fork_processes() {
    python_workers_are_reparented("fork", "process");
}

fn our_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            matches!(
                p.name_as_str(),
                Some("task_newtask" | "sched_process_exec" | "sched_process_exit")
                    | Some("sched_process_e")
            )
        })
        .count()
}

#[test]
fn clean_shutdown_leaves_nothing_loaded() {
    if !privileged("clean_shutdown_leaves_nothing_loaded") {
        return;
    }
    let before = our_programs();
    let g = Guardian::trace();
    assert_eq!(our_programs(), before + 3, "three programs attached");
    g.stop();
    eventually("programs to be unloaded", WAIT, || our_programs() == before);
}

/// guardian reads a whole group's death from the tracepoint where the kernel has `group_dead`,
/// and from the thread group's live count elsewhere; the `ready` record says which ran.
#[test]
fn group_dead_source_matches_the_kernel() {
    if !privileged("group_dead_source_matches_the_kernel") {
        return;
    }
    let g = Guardian::trace();
    let ready = g.wait_for("ready", |v| v["event"] == "ready");
    // guardian has mounted tracefs if it was missing, so the format is readable now.
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(format!("{root}/events/sched/sched_process_exit/format")).ok()
        })
        .expect("sched_process_exit format");
    let expected = if format.contains(" group_dead;") {
        "tracepoint"
    } else {
        "signal_live"
    };
    assert_eq!(ready["group_dead"], expected);
    eprintln!("group_dead source on this kernel: {expected}");
    g.stop();
}

/// `guardian trace` collects routine records on a timer (50 ms). A fork storm that fills more
/// than its ring buffer between two collections must wake it first (the kernel side does once a
/// quarter of the ring is used): with a 64 KiB ring, two fork loops lose nothing, and every fork
/// is reported.
#[test]
fn a_burst_wakes_the_reader_before_the_ring_is_full() {
    let test = "ring_fill_wakeup";
    if !privileged(test) {
        return;
    }
    const RING_BYTES: f64 = 65536.0;
    // A fork record and an exit record, with the ring's 8-byte headers.
    const BYTES_PER_FORK: f64 = 2.0 * (64.0 + 8.0);
    const FORKS: &str = "20000";
    let mut cmd = Guardian::command(&["trace"]);
    cmd.env("GUARDIAN_RING_BYTES", (RING_BYTES as u64).to_string());
    let g = Guardian::spawn(cmd);
    let mut loops = [
        workload(&["fork-loop", FORKS]),
        workload(&["fork-loop", FORKS]),
    ];
    let done: Vec<_> = loops.iter_mut().map(|w| w.read_pairs()).collect();
    // Records the test's own pipe reader could not take in time are dropped by guardian's
    // output (and said on stderr): that is not the ring's loss, but then forks go unprinted.
    thread::sleep(Duration::from_millis(200));
    let printed_all = !g.stderr().contains("not printed");
    let records = g.stop();

    // What the storm wrote per 50 ms: more than the ring holds, or this run shows nothing.
    let per_interval: f64 = done
        .iter()
        .map(|p| {
            let n: f64 = p["forks"].parse().unwrap();
            let secs = p["ns"].parse::<f64>().unwrap() / 1e9;
            n / secs * 0.05 * BYTES_PER_FORK
        })
        .sum();
    if per_interval < RING_BYTES {
        eprintln!(
            "SKIPPED {test}: this machine forks {per_interval:.0} bytes of records per 50 ms, \
             less than the 64 KiB ring holds; the burst cannot overflow it"
        );
        return;
    }
    let lost: Vec<&Value> = records.iter().filter(|v| v["event"] == "lost").collect();
    assert!(
        lost.is_empty(),
        "{per_interval:.0} bytes per 50 ms in a 64 KiB ring: {lost:?}"
    );
    if !printed_all {
        eprintln!("{test}: the test read guardian's output too slowly; fork counts not checked");
        return;
    }
    for p in &done {
        let parent = pid(p, "pid");
        let forks = records
            .iter()
            .filter(|v| v["event"] == "fork" && v["ppid"] == parent)
            .count();
        assert_eq!(forks.to_string(), p["forks"], "forks of {parent} reported");
    }
}
