//! guardian keeps guarding whatever befalls its output, its file descriptors, its ring buffer or
//! itself: nothing but SIGINT and SIGTERM stops enforcement, lost events are repaired from
//! `/proc`, and a root stays a root whatever the order it was found in.

use std::{
    io::{BufRead, BufReader},
    os::{fd::FromRawFd, unix::process::CommandExt},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, all_gone, children_of, collect_stderr, decisions, eventually, kill, kill_policy, pid,
    pids, policy_file, privileged, service_policy, terminate, token, Guardian, TempUser, Workload,
    WAIT,
};
use serde_json::Value;

fn workload(args: &[&str]) -> Workload {
    Workload::run(env!("CARGO_BIN_EXE_guardian-workload"), args)
}

/// R forks W, W forks C; C execs into a root, then W does. W's adoption must not make C a
/// plain member again: when W is killed, its own child dies as an orphan, and C, a root, lives.
#[test]
fn roots_stay_roots_whatever_the_order_of_adoption() {
    let test = "roots_stay_roots";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let g = Guardian::start(&[
        "--policy",
        policy_file(test, &kill_policy(&tok, "")).to_str().unwrap(),
    ]);
    let mut w = workload(&["roots-chain", &tok]);
    // C's own line (`pid= children=`) may come first: they share stdout.
    let mut p = w.read_pairs();
    if !p.contains_key("r") {
        p = w.read_pairs();
    }
    let (r, wp, c) = (pid(&p, "r"), pid(&p, "w"), pid(&p, "c"));
    w.cleanup.extend([wp, c]);
    g.wait_root(r);
    g.wait_root(c);
    let root_w = g.wait_for("W's root record after its exec", |v| {
        v["event"] == "root" && v["pid"] == wp && v["found"] == "exec"
    });
    assert_eq!(root_w["service"], "svc");
    let mut k = Vec::new();
    eventually("W's own child besides C", WAIT, || {
        k = children_of(wp).into_iter().filter(|&p| p != c).collect();
        k.len() == 1
    });
    w.cleanup.extend(&k);
    // The child is followed as W's member before W dies.
    thread::sleep(Duration::from_millis(100));
    kill(wp, libc::SIGKILL);
    all_gone(&k, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(300));
    assert!(alive(c), "C is a root and was killed as an orphan");
    let records = g.stop();
    assert!(
        decisions(&records, c).is_empty(),
        "{:?}",
        decisions(&records, c)
    );
    assert_eq!(decisions(&records, k[0]).len(), 1);
}

fn wait_text(buf: &Arc<Mutex<String>>, text: &str) {
    eventually(&format!("`{text}` on guardian's stderr"), WAIT, || {
        buf.lock().unwrap().contains(text)
    });
}

/// Stops a guardian started by hand with SIGTERM; it must exit by itself, successfully.
fn stop(child: &mut std::process::Child) {
    let status = terminate(child);
    assert!(status.success(), "guardian exited with {status}");
}

/// A service tree whose parent is killed: its children must die within a second.
fn orphans_die(tok: &str, stderr: &Arc<Mutex<String>>) {
    let mut w = workload(&["tree", "2", "", tok]);
    let (parent, kids) = w.read_tree();
    wait_text(stderr, &format!("pid={parent} found=\"exec\""));
    kill(parent, libc::SIGKILL);
    let took = all_gone(&kids, Duration::from_secs(1));
    eprintln!("orphans gone {took:?} after their parent's SIGKILL");
}

/// `guardian ... | head -1`: the reader goes away after one line. guardian goes on enforcing,
/// says on stderr that records are lost, and stops cleanly on SIGTERM.
#[test]
fn a_closed_stdout_stops_no_enforcement() {
    let test = "closed_stdout";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let mut child = Guardian::command(&["--policy", policy.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(child.stderr.take().unwrap());
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"ready\""), "{first}");
    // The reader is gone (it was dropped above): every later write gets EPIPE.
    orphans_die(&tok, &stderr);
    wait_text(&stderr, "stdout failed");
    orphans_die(&tok, &stderr);
    assert!(child.try_wait().unwrap().is_none(), "guardian exited");
    stop(&mut child);
}

/// stdout is a pipe nobody reads (as when a log shipper hangs). Decisions still happen at once,
/// and guardian still stops promptly.
#[test]
fn a_stalled_stdout_delays_no_kill() {
    let test = "stalled_stdout";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let noisy = format!("{tok}noisy");
    let policy = policy_file(
        test,
        &format!(
            "{}[[service]]\nname = \"noisy\"\nmatch = {{ cmdline = \"{noisy}\" }}\norphans = \"report\"\n",
            kill_policy(&tok, "")
        ),
    );
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a local array; the smallest pipe buffer fills after a few records.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096);
    }
    // SAFETY: both fds were just created and are owned here alone.
    let (read_end, write_end) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut child = Guardian::command(&["--policy", policy.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(child.stderr.take().unwrap());
    wait_text(&stderr, "guardian running");
    // Far more than the pipe holds: 60 reported orphans.
    let mut w = workload(&["tree", "60", "", &noisy]);
    let (parent, _) = w.read_tree();
    wait_text(&stderr, &format!("pid={parent} found=\"exec\""));
    kill(parent, libc::SIGKILL);
    thread::sleep(Duration::from_millis(300));
    orphans_die(&tok, &stderr);
    assert!(child.try_wait().unwrap().is_none(), "guardian exited");
    let start = Instant::now();
    stop(&mut child);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a stalled stdout held guardian's exit for {:?}",
        start.elapsed()
    );
    drop(read_end);
}

/// 200 orphans that ignore SIGTERM, with guardian limited to 64 open files: every one gets
/// SIGTERM, then SIGKILL after `kill_timeout`, although guardian could never hold 200 pidfds.
#[test]
fn two_hundred_stubborn_orphans_under_sixty_four_descriptors() {
    let test = "nofile_64";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(
        test,
        &service_policy(&tok, "terminate", "kill_timeout = \"1s\""),
    );
    let mut cmd = Guardian::command(&["--policy", policy.to_str().unwrap()]);
    // SAFETY: setrlimit between fork and exec touches nothing shared.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let g = Guardian::spawn(cmd);
    let mut w = workload(&["tree", "200", "ignore-term", &tok]);
    let (parent, kids) = w.read_tree();
    assert_eq!(kids.len(), 200);
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    thread::sleep(Duration::from_millis(500));
    let early = kids.iter().filter(|&&k| !alive(k)).count();
    assert_eq!(
        early, 0,
        "{early} died before kill_timeout: they ignore SIGTERM"
    );
    let took = all_gone(&kids, Duration::from_secs(20));
    eprintln!("200 stubborn orphans gone {took:?} after the first check");
    let records = g.stop();
    for &k in &kids {
        let d = decisions(&records, k);
        let actions: Vec<&str> = d.iter().map(|v| v["result"].as_str().unwrap()).collect();
        assert_eq!(
            actions,
            ["sent SIGTERM", "sent SIGKILL"],
            "decisions for {k}: {d:?}"
        );
    }
}

/// guardian is stopped (SIGSTOP) while a member forks far more than its tiny ring buffer holds,
/// then ends most of those children and keeps a few workers. Resumed, guardian reports the loss
/// and re-reads /proc: the dead are retired (a new fork fits the task budget again) and the
/// workers it never saw are followed (they die with their parent).
#[test]
fn lost_events_are_repaired_from_proc() {
    let test = "resync";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, "tasks_max = 7"));
    let mut cmd = Guardian::command(&["--policy", policy.to_str().unwrap()]);
    cmd.env("GUARDIAN_RING_BYTES", "16384");
    let g = Guardian::spawn(cmd);
    let mut w = workload(&["churn", "300", "4", &tok]);
    let root = pid(&w.read_pairs(), "pid");
    g.wait_root(root);

    kill(g.pid(), libc::SIGSTOP);
    w.step();
    let workers = pids(&w.read_pairs(), "workers");
    w.cleanup.extend(&workers);
    kill(g.pid(), libc::SIGCONT);

    let lost = g.wait_for("a lost record", |v| {
        v["event"] == "lost" && v["reason"] == "ringbuf_full"
    });
    assert!(lost["count"].as_u64().unwrap() > 100, "{lost}");
    let resync = g.wait_for("a resync record", |v| v["event"] == "resync");
    assert_eq!(resync["trigger"], "lost");
    let records = g.records();
    let at = |pred: &dyn Fn(&Value) -> bool| records.iter().position(pred).unwrap();
    assert!(
        at(&|v| v["event"] == "lost") < at(&|v| v["event"] == "resync"),
        "resync before the loss was reported"
    );
    assert!(resync["retired"].as_u64().unwrap() > 100, "{resync}");
    assert!(resync["adopted"].as_u64().unwrap() >= 4, "{resync}");
    // The service as /proc shows it: the root and its workers.
    let in_proc = 1 + children_of(root).len() as u64;
    assert_eq!(in_proc, 5);
    assert_eq!(resync["members"]["svc"], in_proc, "{resync}");

    // A fork within tasks_max survives: the dead no longer count.
    w.step();
    let extra = pid(&w.read_pairs(), "extra");
    w.cleanup.push(extra);
    thread::sleep(Duration::from_millis(500));
    assert!(alive(extra), "a fork under tasks_max was killed");

    // The workers guardian only found in /proc die with their parent.
    kill(root, libc::SIGKILL);
    let mut all = workers.clone();
    all.push(extra);
    all_gone(&all, Duration::from_secs(1));
    let records = g.stop();
    for &p in &all {
        let d = decisions(&records, p);
        assert!(
            d.iter()
                .any(|v| v["reason"] == "orphan" && v["performed"] == true),
            "{p}: {d:?}"
        );
    }
}

/// In a pid namespace other than the host's (a container without hostPID), the kernel's pids
/// and /proc's disagree: guardian refuses to start, with its own /proc or the host's.
#[test]
fn refuses_to_run_outside_the_host_pid_namespace() {
    let test = "pid_namespace";
    if !privileged(test) {
        return;
    }
    let policy = policy_file(test, &kill_policy(&token(test), ""));
    let bin = guardian_tests::guardian_bin();
    for how in [&[][..], &["--host-proc"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_guardian-workload"))
            .arg("in-pidns")
            .args(how)
            .arg(&bin)
            .args(["--policy", policy.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{how:?}: started: {stderr}");
        assert!(stderr.contains("pid namespace"), "{how:?}: {stderr}");
        assert!(
            !stderr.contains("attached"),
            "{how:?}: loaded probes: {stderr}"
        );
    }
}

/// The BPF objects a process holds, from its fdinfo: ("prog"|"map", id).
fn bpf_ids(pid: u32) -> Vec<(&'static str, u32)> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(fd.path()).unwrap_or_default();
        for line in text.lines() {
            for (key, kind) in [("prog_id:", "prog"), ("map_id:", "map")] {
                if let Some(id) = line.strip_prefix(key) {
                    ids.push((kind, id.trim().parse().unwrap()));
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn bpf_exists(kind: &str, id: u32) -> bool {
    if kind == "prog" {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .any(|p| p.id() == id)
    } else {
        aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .any(|m| m.id() == id)
    }
}

/// SIGKILLed, guardian leaves nothing loaded in the kernel; started again, it finds the
/// service's root in /proc and kills the orphans of a parent that dies afterwards.
#[test]
fn sigkill_leaves_nothing_loaded_and_a_restart_takes_over() {
    let test = "sigkill_restart";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let args = ["--policy", policy.to_str().unwrap()];
    let g = Guardian::start(&args);
    let mut w = workload(&["tree", "3", "", &tok]);
    let (parent, kids) = w.read_tree();
    g.wait_root(parent);
    let ids = bpf_ids(g.pid());
    assert!(
        ids.iter().filter(|(k, _)| *k == "prog").count() >= 3,
        "{ids:?}"
    );
    g.kill();
    eventually("guardian's programs and maps to be freed", WAIT, || {
        ids.iter().all(|&(kind, id)| !bpf_exists(kind, id))
    });

    let g = Guardian::start(&args);
    let root = g.wait_root(parent);
    assert_eq!(root["found"], "startup");
    assert_eq!(root["members"], 4);
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));
    let records = g.stop();
    for &k in &kids {
        assert_eq!(decisions(&records, k).len(), 1);
    }
}

/// The kernel's map of followed processes is full (64 entries here; the real size follows
/// pid_max): guardian says so, keeps running, and follows the members it could not track from
/// /proc, so that the orphans of one that dies unseen still die.
#[test]
fn a_full_tracked_map_falls_back_to_proc() {
    let test = "tracked_full";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let policy = policy_file(test, &kill_policy(&tok, ""));
    let mut cmd = Guardian::command(&["--policy", policy.to_str().unwrap()]);
    cmd.env("GUARDIAN_TRACKED_ENTRIES", "64")
        .env("GUARDIAN_LOG", "info,guardian::daemon=debug");
    let g = Guardian::spawn(cmd);
    let mut w = workload(&["tree", "100", "nested", &tok]);
    let (parent, kids) = w.read_tree();
    let middle = *kids.last().unwrap();
    g.wait_root(parent);
    // The kernel could not track some children, guardian some members.
    let lost = g.wait_for("the full map reported", |v| {
        v["event"] == "lost" && v["reason"] == "tracked_map_full"
    });
    assert!(lost["count"].as_u64().unwrap() > 0, "{lost}");
    g.wait_for("members guardian could not track", |v| {
        v["event"] == "lost" && v["reason"] == "untracked"
    });
    g.wait_for("the table re-read after the loss", |v| {
        v["event"] == "resync" && v["trigger"] == "lost"
    });
    // The middle child, forked last, is beyond the map, unless an entry came free meanwhile:
    // make sure of it (and that the map stays full) with pids no process can have. The
    // children it forks now are never reported, and are found in /proc.
    let mut map = tracked_map(g.pid());
    let _ = map.remove(&middle);
    let mut filler = 1 << 23; // above any pid_max (4194304 at most)
    while map.insert(filler, 0, 0).is_ok() {
        filler += 1;
        assert!(filler < (1 << 23) + 4096, "the map never filled");
    }
    let before = g.records().len();
    kill(middle, libc::SIGUSR1);
    let mut grandchildren = Vec::new();
    eventually("the last child's own children", WAIT, || {
        grandchildren = children_of(middle);
        grandchildren.len() == 2
    });
    w.cleanup.extend(&grandchildren);
    g.wait_for_after(
        "the untracked member's children found in /proc",
        before,
        WAIT,
        |v| v["event"] == "resync" && v["adopted"].as_u64() >= Some(2),
    );
    // Its death is only seen in /proc too.
    kill(middle, libc::SIGKILL);
    let start = Instant::now();
    while grandchildren.iter().any(|&c| alive(c)) {
        if start.elapsed() > Duration::from_secs(5) {
            let seen: Vec<Value> = g
                .records()
                .into_iter()
                .filter(|v| v["event"] != "root")
                .collect();
            panic!(
                "the orphans {grandchildren:?} of untracked {middle} outlived it; records: {seen:?}"
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "orphans of an untracked member gone {:?} after its SIGKILL",
        start.elapsed()
    );
    let resync = g.wait_for("a resync for untracked members", |v| {
        v["event"] == "resync" && v["trigger"] == "untracked" && v["retired"].as_u64() >= Some(1)
    });
    assert!(resync["retired"].as_u64().unwrap() >= 1, "{resync}");
    // What the re-reads found must not be taken for orphans: the root and its other children
    // (tracked or not) live on.
    let rest: Vec<u32> = kids.iter().copied().filter(|&k| k != middle).collect();
    assert!(alive(parent), "the root was killed");
    let dead: Vec<u32> = rest.iter().copied().filter(|&k| !alive(k)).collect();
    assert!(dead.is_empty(), "children of the live root died: {dead:?}");
    kill(parent, libc::SIGKILL);
    all_gone(&rest, Duration::from_secs(5));
    g.stop();
}

/// guardian's tracked-process map, opened from the kernel.
fn tracked_map(guardian: u32) -> aya::maps::HashMap<aya::maps::MapData, u32, u32> {
    let ids = bpf_ids(guardian);
    for &(kind, id) in &ids {
        if kind != "map" {
            continue;
        }
        let Ok(data) = aya::maps::MapData::from_id(id) else {
            continue;
        };
        if data
            .info()
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_owned))
            .as_deref()
            == Some("TRACKED")
        {
            return aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
        }
    }
    panic!("guardian {guardian} holds no TRACKED map: {ids:?}");
}

/// The pids in guardian's tracked-process map, read from the kernel.
fn tracked_pids(guardian: u32) -> Vec<u32> {
    tracked_map(guardian)
        .keys()
        .filter_map(Result::ok)
        .collect()
}

/// A member that clones with CLONE_PARENT gives its new child to its own parent, who belongs to
/// no service: guardian must not start tracking that parent (and with it every process the
/// parent starts from then on, for good).
#[test]
fn clone_parent_tracks_nobody_outside_the_service() {
    let test = "clone_parent";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let g = Guardian::start(&[
        "--policy",
        policy_file(test, &kill_policy(&tok, "")).to_str().unwrap(),
    ]);
    let mut w = workload(&["clone-parent", &tok]);
    let member = pid(&w.read_pairs(), "pid");
    g.wait_root(member);
    w.step();
    let sibling = pid(&w.read_pairs(), "sibling");
    w.cleanup.push(sibling);
    let me = std::process::id();
    let mut tracked = Vec::new();
    let start = Instant::now();
    while !(tracked.contains(&member) && tracked.contains(&sibling)) {
        assert!(
            start.elapsed() < WAIT,
            "the root {member} and its clone {sibling} are not both tracked: {tracked:?}"
        );
        thread::sleep(Duration::from_millis(5));
        tracked = tracked_pids(g.pid());
    }
    assert!(
        !tracked.contains(&me),
        "the member's parent ({me}), outside every service, is tracked: {tracked:?}"
    );
    g.stop();
}

/// An event that never comes and no counter reports (here: a member taken out of the kernel's
/// map behind guardian's back, so that its death is not reported): the periodic check of the
/// members against /proc finds the member gone, /proc is re-read, and its orphans die.
#[test]
fn the_periodic_check_catches_a_death_no_event_reported() {
    let test = "periodic_check";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let g = Guardian::start(&[
        "--policy",
        policy_file(test, &kill_policy(&tok, "")).to_str().unwrap(),
    ]);
    let mut w = workload(&["tree", "1", "nested", &tok]);
    let (parent, kids) = w.read_tree();
    let middle = kids[0];
    g.wait_root(parent);
    kill(middle, libc::SIGUSR1);
    let mut grandchildren = Vec::new();
    eventually("the middle process's children", WAIT, || {
        grandchildren = children_of(middle);
        grandchildren.len() == 2
    });
    w.cleanup.extend(&grandchildren);
    eventually("the grandchildren tracked", WAIT, || {
        let t = tracked_pids(g.pid());
        grandchildren.iter().all(|c| t.contains(c)) && t.contains(&middle)
    });
    tracked_map(g.pid()).remove(&middle).unwrap();
    kill(middle, libc::SIGKILL);
    let took = all_gone(&grandchildren, Duration::from_secs(10));
    eprintln!("orphans of a death no event reported gone {took:?} later");
    let resync = g.wait_for("the resync the check asked for", |v| {
        v["event"] == "resync" && v["trigger"] == "check"
    });
    assert!(resync["retired"].as_u64() >= Some(1), "{resync}");
    assert!(alive(parent), "the re-read killed the live root");
    let records = g.stop();
    for &c in &grandchildren {
        let d = decisions(&records, c);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["old_parent"], middle);
    }
    assert!(decisions(&records, parent).is_empty());
}

/// A policy naming a user that does not exist yet runs (with a warning) and makes nobody a
/// root; once the account exists, its processes already running are found and followed.
#[test]
fn a_user_created_after_start_pins_from_then_on() {
    let test = "late_user";
    if !guardian_tests::user_test_ready(test) {
        return;
    }
    let tok = token(test);
    let name = format!("g{}", std::process::id());
    let uid = 42_000 + std::process::id() % 1000;
    let policy = policy_file(
        test,
        &format!(
            "[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\", user = \"{name}\" }}\norphans = \"kill\"\n"
        ),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    g.wait_stderr(&format!("there is no user `{name}`"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guardian-workload"));
    cmd.args(["as-uid", &uid.to_string()])
        .arg(env!("CARGO_BIN_EXE_guardian-workload"))
        .args(["tree", "2", "", &tok]);
    let mut w = Workload::spawn(cmd);
    let (parent, kids) = w.read_tree();
    thread::sleep(Duration::from_millis(300));
    assert!(
        g.of("root", parent).is_empty(),
        "a root of a user that does not exist"
    );

    let _user = TempUser::add(&name, uid);
    let root = g.wait_for_within("the root found once the user exists", WAIT + WAIT, |v| {
        v["event"] == "root" && v["pid"] == parent
    });
    assert_eq!(root["found"], "resync");
    kill(parent, libc::SIGKILL);
    all_gone(&kids, Duration::from_secs(1));
    g.stop();
}
