//! Harness for guardian's privileged end-to-end tests: starts the real daemon, collects its JSON
//! records, and starts real workloads.
//!
//! Tests need root (they load eBPF programs and signal processes). Without it they print why and
//! skip, unless `GUARDIAN_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test`), where they fail.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Generous bound for anything the tests wait on.
pub const WAIT: Duration = Duration::from_secs(10);

/// Returns false (after saying why) when privileged tests cannot run here.
pub fn privileged(test: &str) -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("GUARDIAN_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: needs root, and GUARDIAN_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root to load eBPF programs (run `sudo cargo xtask test`)");
    false
}

/// The guardian binary under test.
pub fn guardian_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GUARDIAN_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test> -> target/debug/guardian
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("guardian"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

#[derive(Default)]
struct Records {
    lines: Vec<Value>,
    closed: bool,
}

/// A running guardian whose stdout records are collected.
pub struct Guardian {
    child: Child,
    /// The daemon's control socket (in a directory of its own), when it runs one.
    socket: Option<PathBuf>,
    records: Arc<(Mutex<Records>, Condvar)>,
    stderr: Arc<Mutex<String>>,
}

impl Guardian {
    /// Starts `guardian <args> --output json` and waits for its `ready` record.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Self::command(args))
    }

    /// The command [`Guardian::start`] runs, to be adjusted before [`Guardian::spawn`].
    pub fn command(args: &[&str]) -> Command {
        let mut cmd = Command::new(guardian_bin());
        cmd.args(args)
            .args(["--output", "json"])
            .env("GUARDIAN_LOG", "info");
        // Each daemon answers on a socket of its own, never on the host's default one.
        if args.contains(&"--policy") && !args.contains(&"--socket") {
            cmd.arg("--socket")
                .arg(private_dir("socket").join("control.sock"));
        }
        cmd
    }

    /// Runs `guardian ARGS --socket SOCKET` against this daemon (`status`, `explain`).
    pub fn ask(&self, args: &[&str]) -> std::process::Output {
        Command::new(guardian_bin())
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("running a guardian client")
    }

    /// `guardian status --output json`, parsed.
    pub fn status(&self) -> Value {
        let out = self.ask(&["status", "--output", "json"]);
        assert!(
            out.status.success(),
            "guardian status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status is JSON")
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .expect("this guardian has no control socket")
    }

    /// Starts guardian from `cmd` with its stdout and stderr collected, and waits for its
    /// `ready` record.
    pub fn spawn(mut cmd: Command) -> Self {
        let socket = cmd
            .get_args()
            .skip_while(|a| *a != "--socket")
            .nth(1)
            .map(PathBuf::from);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting guardian");
        let records = Arc::new((Mutex::new(Records::default()), Condvar::new()));
        let stdout = child.stdout.take().expect("stdout");
        let r = Arc::clone(&records);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("guardian printed a non-JSON line {line:?}: {e}"));
                r.0.lock().unwrap().lines.push(v);
                r.1.notify_all();
            }
            r.0.lock().unwrap().closed = true;
            r.1.notify_all();
        });
        let stderr = collect_stderr(child.stderr.take().expect("stderr"));
        let g = Self {
            child,
            socket,
            records,
            stderr,
        };
        g.wait_for("the ready record", |v| v["event"] == "ready");
        g
    }

    /// Starts guardian on the policy `text` builds from the test's token (see [`token`]);
    /// `None` (said aloud) when the test cannot run here.
    pub fn on_policy(test: &str, text: impl FnOnce(&str) -> String) -> Option<(String, Self)> {
        if !privileged(test) {
            return None;
        }
        let tok = token(test);
        let policy = policy_file(test, &text(&tok));
        let g = Self::start(&["--policy", policy.to_str().unwrap()]);
        Some((tok, g))
    }

    /// `guardian trace`.
    pub fn trace() -> Self {
        Self::start(&["trace"])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What guardian printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) until stderr holds `text`.
    pub fn wait_stderr(&self, text: &str) {
        eventually(&format!("`{text}` on guardian's stderr"), WAIT, || {
            self.stderr().contains(text)
        });
    }

    /// Kills guardian with SIGKILL and reaps it (nothing of a clean stop runs).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// All records so far.
    pub fn records(&self) -> Vec<Value> {
        self.records.0.lock().unwrap().lines.clone()
    }

    /// Waits (bounded by [`WAIT`]) for a record matching `pred`, and returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_within(what, WAIT, pred)
    }

    pub fn wait_for_within(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for_after(what, 0, limit, pred)
    }

    /// Waits (bounded by `limit`) for a record matching `pred` among those after the first
    /// `skip` (see [`Guardian::records`]), and returns it.
    pub fn wait_for_after(
        &self,
        what: &str,
        skip: usize,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        let (lock, cv) = &*self.records;
        let mut rec = lock.lock().unwrap();
        loop {
            if let Some(v) = rec.lines.iter().skip(skip).find(|v| pred(v)) {
                return v.clone();
            }
            let now = Instant::now();
            if rec.closed || now >= deadline {
                let tail: Vec<String> = rec
                    .lines
                    .iter()
                    .rev()
                    .take(30)
                    .map(|v| v.to_string())
                    .collect();
                panic!(
                    "no record for {what} within {limit:?} (guardian {}); last records, newest first:\n{}\nstderr:\n{}",
                    if rec.closed { "exited" } else { "running" },
                    tail.join("\n"),
                    self.stderr.lock().unwrap()
                );
            }
            rec = cv.wait_timeout(rec, deadline - now).unwrap().0;
        }
    }

    /// Waits (bounded) for the decision record on `pid`.
    pub fn wait_decision(&self, pid: u32) -> Value {
        self.wait_for(&format!("decision on {pid}"), |v| {
            v["event"] == "decision" && v["pid"] == pid
        })
    }

    /// Waits (bounded) for the `root` record of `pid`.
    pub fn wait_root(&self, pid: u32) -> Value {
        self.wait_for(&format!("root record for {pid}"), |v| {
            v["event"] == "root" && v["pid"] == pid
        })
    }

    /// Records of one event kind about one pid.
    pub fn of(&self, event: &str, pid: u32) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|v| v["event"] == event && v["pid"] == pid)
            .collect()
    }

    /// Stops guardian with SIGTERM and checks that it shut down cleanly.
    pub fn stop(mut self) -> Vec<Value> {
        let status = terminate(&mut self.child);
        assert!(
            status.success(),
            "guardian exited with {status}; stderr:\n{}",
            self.stderr.lock().unwrap()
        );
        let (lock, cv) = &*self.records;
        let mut rec = lock.lock().unwrap();
        while !rec.closed {
            rec = cv.wait_timeout(rec, WAIT).unwrap().0;
        }
        rec.lines.clone()
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collects a guardian's stderr lines (echoed to the test's own stderr as they come).
pub fn collect_stderr(stderr: std::process::ChildStderr) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = Arc::clone(&buf);
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[guardian] {line}");
            let mut s = b.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    buf
}

/// Sends SIGTERM to a guardian and waits (bounded by [`WAIT`]) for it to exit by itself.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    kill(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for guardian") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "guardian did not stop on SIGTERM"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// A workload process that reports `key=value` pairs on its first line of stdout.
pub struct Workload {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Other pids to kill when the test ends (grandchildren, workers).
    pub cleanup: Vec<u32>,
}

impl Workload {
    /// Starts `program ARGS...`.
    pub fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Self::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
            cleanup: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the next `key=value ...` line (bounded: the workloads print promptly).
    pub fn read_pairs(&mut self) -> HashMap<String, String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading workload output");
        assert!(!line.is_empty(), "workload ended without output");
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Reads a `tree` workload's `parent=P children=C,...` line; the children are killed when
    /// the workload is dropped.
    pub fn read_tree(&mut self) -> (u32, Vec<u32>) {
        let p = self.read_pairs();
        let (parent, kids) = (pid(&p, "parent"), pids(&p, "children"));
        self.cleanup.extend(&kids);
        (parent, kids)
    }

    /// Reads the next line as-is.
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading workload output");
        line
    }

    /// Sends a line to the workload (ends its `hold`).
    pub fn release(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
    }

    /// Sends a line and keeps stdin open (for workloads that wait more than once).
    pub fn step(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
            let _ = stdin.flush();
        }
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.release();
        self.child.wait().expect("waiting for workload")
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for &pid in &self.cleanup {
            kill(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pid(pairs: &HashMap<String, String>, key: &str) -> u32 {
    pairs
        .get(key)
        .unwrap_or_else(|| panic!("workload did not report `{key}`: {pairs:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("`{key}` is not a pid: {e}"))
}

pub fn pids(pairs: &HashMap<String, String>, key: &str) -> Vec<u32> {
    pairs
        .get(key)
        .unwrap_or_else(|| panic!("workload did not report `{key}`: {pairs:?}"))
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("pid"))
        .collect()
}

/// A policy with one service, `svc`, whose roots have `tok` on their command line and whose
/// orphans get `orphans`; `extra` adds keys to the service.
pub fn service_policy(tok: &str, orphans: &str, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\" }}\norphans = \"{orphans}\"\n{extra}\n"
    )
}

/// [`service_policy`] whose orphans are killed at once.
pub fn kill_policy(tok: &str, extra: &str) -> String {
    service_policy(tok, "kill", extra)
}

/// [`service_policy`] reporting orphans, with its cgroups below `cgroup_parent = tok` (see
/// [`CgroupCleanup`]).
pub fn cgroup_policy(tok: &str, extra: &str) -> String {
    format!(
        "cgroup_parent = \"{tok}\"\n{}",
        service_policy(tok, "report", extra)
    )
}

/// Removes, when dropped (the test passed or not), the cgroup of service `svc` and its parent
/// `self.0` in each hierarchy, as [`service_cgroup_dirs`] and [`service_cpu_cgroup_dir`] find
/// them: empty ones only (rmdir refuses others).
pub struct CgroupCleanup(pub String);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        let cpu = service_cpu_cgroup_dir(&self.0, "svc");
        for d in service_cgroup_dirs(&self.0, "svc").into_iter().chain(cpu) {
            let _ = std::fs::remove_dir(&d);
            if let Some(parent) = d.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Whether a budget test can run here: root, and the cgroup controllers when it needs them
/// (said aloud when not).
pub fn budget_test_ready(test: &str, needs_cgroups: bool) -> bool {
    if !privileged(test) {
        return false;
    }
    if needs_cgroups && !has_memory_and_pids_controllers() {
        missing(
            test,
            "no memory and pids cgroup controllers on this machine",
        );
        return false;
    }
    true
}

/// Whether a test that creates a user and has guardian look it up can run here: root, and user
/// names that resolve (said aloud when not).
pub fn user_test_ready(test: &str) -> bool {
    if !privileged(test) {
        return false;
    }
    if !resolves_users() {
        missing(test, "user names cannot be looked up here (no NSS)");
        return false;
    }
    true
}

/// The decision records about one pid.
pub fn decisions(records: &[Value], pid: u32) -> Vec<Value> {
    records
        .iter()
        .filter(|v| v["event"] == "decision" && v["pid"] == pid)
        .cloned()
        .collect()
}

/// The one decision about `pid` in `records`; fails unless there is exactly one.
pub fn one_decision(records: &[Value], pid: u32) -> Value {
    let mut d = decisions(records, pid);
    assert_eq!(d.len(), 1, "exactly one decision for {pid}: {d:?}");
    d.remove(0)
}

/// Waits (bounded) until every pid is gone; returns how long that took.
pub fn all_gone(pids: &[u32], limit: Duration) -> Duration {
    let start = Instant::now();
    eventually(&format!("{pids:?} to be gone"), limit, || {
        pids.iter().all(|&p| !alive(p))
    });
    start.elapsed()
}

/// The effective uid of a process, from `/proc/PID/status`.
pub fn euid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: signalling a pid this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The parent of a process as `/proc` shows it now.
pub fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits (bounded) until `pred` holds.
pub fn eventually(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A Python interpreter for the multiprocessing tests.
pub fn python() -> Option<PathBuf> {
    ["python3", "python"].iter().find_map(|name| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Path of a file in `tests/scripts`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// A test prerequisite other than root is missing: skip loudly, or fail when the full suite is
/// required (`GUARDIAN_REQUIRE_PRIVILEGED=1`, as in CI, where every prerequisite is installed).
pub fn missing(test: &str, why: &str) {
    if std::env::var("GUARDIAN_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {why}, and GUARDIAN_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// A word unique to this test run, for policies to match on command lines.
pub fn token(test: &str) -> String {
    format!(
        "gtk{}x{}",
        std::process::id(),
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    )
}

/// A new directory only root may enter (0700), unique to this test run.
pub fn private_dir(what: &str) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt as _;
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("guardian-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .expect("creating a private directory");
    dir
}

/// Writes a policy file for one test and returns its path.
pub fn policy_file(test: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "guardian-{}-{}.toml",
        token(test),
        std::process::id()
    ));
    std::fs::write(&path, text).expect("writing the test policy");
    path
}

/// The child processes of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                kids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    kids
}

/// Starts `sleep 30` under exactly `pid` (which must be free), by setting the kernel's last
/// allocated pid just below it. Other forks on the machine can take the pid first: retried a few
/// times; `None` if it never landed.
pub fn spawn_with_pid(pid: u32) -> Option<Child> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let mut child = Command::new("sleep").arg("30").spawn().ok()?;
        if child.id() == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// The directories of a service cgroup guardian creates with a relative `cgroup_parent`: below
/// this process's own cgroup, in the v2 hierarchy when it has the memory and pids controllers,
/// else in the v1 memory and pids hierarchies. (Worked out independently of guardian's code.)
pub fn service_cgroup_dirs(parent: &str, service: &str) -> Vec<PathBuf> {
    let dir = |mount: &str, own: String| PathBuf::from(mount).join(own).join(parent).join(service);
    if v2_has("memory") && v2_has("pids") {
        vec![dir("/sys/fs/cgroup", own_cgroup(""))]
    } else {
        vec![
            dir("/sys/fs/cgroup/memory", own_cgroup("memory")),
            dir("/sys/fs/cgroup/pids", own_cgroup("pids")),
        ]
    }
}

/// The directory of a service cgroup in the cpu controller's hierarchy, as guardian creates it
/// for a service with a `cpu_max` and a relative `cgroup_parent`: the v2 directory where the
/// memory and pids controllers are on v2, else the one in the v1 cpu hierarchy (also reached as
/// `/sys/fs/cgroup/cpu` where it is mounted as `cpu,cpuacct`). `None`: no cpu controller there
/// (or no CPU bandwidth control in the kernel).
pub fn service_cpu_cgroup_dir(parent: &str, service: &str) -> Option<PathBuf> {
    if v2_has("memory") && v2_has("pids") {
        let own = PathBuf::from("/sys/fs/cgroup").join(own_cgroup(""));
        return v2_has("cpu").then(|| own.join(parent).join(service));
    }
    let own = PathBuf::from("/sys/fs/cgroup/cpu").join(own_cgroup("cpu"));
    own.join("cpu.cfs_quota_us")
        .is_file()
        .then(|| own.join(parent).join(service))
}

/// This process's cgroup in the hierarchy of controller `ctrl` (`""`: the v2 one), without its
/// leading `/`.
fn own_cgroup(ctrl: &str) -> String {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own.lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            let hit = if ctrl.is_empty() {
                c.is_empty()
            } else {
                c.split(',').any(|x| x == ctrl)
            };
            hit.then(|| path.trim_start_matches('/').to_owned())
        })
        .unwrap_or_default()
}

/// Whether the v2 hierarchy at `/sys/fs/cgroup` offers controller `c`.
fn v2_has(c: &str) -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .unwrap_or_default()
        .split_whitespace()
        .any(|x| x == c)
}

/// Whether the machine has the cgroup controllers the budget tests need.
pub fn has_memory_and_pids_controllers() -> bool {
    service_cgroup_dirs("x", "y")
        .iter()
        .all(|d| d.ancestors().nth(2).is_some_and(|p| p.is_dir()))
}

/// Adds a user to /etc/passwd for the test's duration (the line is removed when dropped).
pub struct TempUser(String);

impl TempUser {
    pub fn add(name: &str, uid: u32) -> Self {
        let line = format!("{name}:x:{uid}:{uid}:guardian test:/:/bin/false\n");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open("/etc/passwd")
            .expect("opening /etc/passwd");
        std::io::Write::write_all(&mut f, line.as_bytes()).expect("adding the test user");
        Self(line)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string("/etc/passwd") {
            let _ = std::fs::write("/etc/passwd", text.replace(&self.0, ""));
        }
    }
}

/// Whether this build can look user names up (a static build without NSS cannot).
fn resolves_users() -> bool {
    // SAFETY: getpwnam with a static C string; the result is only tested for null.
    !unsafe { libc::getpwnam(c"root".as_ptr()) }.is_null()
}
