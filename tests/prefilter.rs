//! The kernel's exec filter: execs that cannot make a root stay in the kernel, and no root is
//! ever missed. Every selector kind is tried, alone and in combinations: a matching exec is
//! found as a root at exec (`found: "exec"`), and the execs the filter keeps back make no record
//! (`guardian status` counts the exec records the daemon received and the execs the kernel kept).

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use guardian_tests::{
    guardian_bin, pid, policy_file, private_dir, privileged, token, Guardian, TempUser, Workload,
    WAIT,
};
use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_guardian-workload");

/// A uid of this test run that no other process on the host has (`k` < 8).
fn test_uid(k: u32) -> u32 {
    60_000 + (std::process::id() % 1000) * 8 + k
}

/// A process name (comm) unique to this test run, at most 15 bytes.
fn test_comm(k: u32) -> String {
    format!("gpf{}n{k}", std::process::id() % 100_000)
}

/// A link to the workload named `comm`: exec'd through it, the workload's comm is `comm` (the
/// kernel names a process after the base name of the path given to execve).
fn named(comm: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = private_dir("comm");
    // Other uids exec through it too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("opening the link's directory");
    let link = dir.join(comm);
    std::os::unix::fs::symlink(WORKLOAD, &link).expect("linking the workload");
    link
}

/// Runs `program ARGS` as `uid` (the workload's `as-uid` execs it in place).
fn as_uid(uid: u32, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Workload {
    let mut cmd = Command::new(WORKLOAD);
    cmd.args(["as-uid", &uid.to_string()])
        .arg(program)
        .args(args);
    Workload::spawn(cmd)
}

/// `guardian reload`, which must succeed.
fn reload(g: &Guardian) {
    let out = g.ask(&["reload"]);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a lingering workload and waits for its root record: found at exec, in `service`.
fn root_at_exec(g: &Guardian, service: &str, mut w: Workload) -> Workload {
    let p = pid(&w.read_pairs(), "pid");
    let root = g.wait_root(p);
    assert_eq!(root["service"], service, "{root}");
    assert_eq!(root["found"], "exec", "{root}");
    w
}

/// The exec counters of `guardian status`: (records received, execs kept in the kernel).
fn exec_counts(g: &Guardian) -> (u64, u64) {
    let s = g.status();
    (
        s["exec_records"].as_u64().expect("exec_records"),
        s["execs_filtered"].as_u64().expect("execs_filtered"),
    )
}

/// Runs a workload to its end.
fn finish(mut w: Workload) {
    assert!(w.wait().success(), "the workload failed");
}

fn roots(g: &Guardian) -> Vec<Value> {
    g.records()
        .into_iter()
        .filter(|v| v["event"] == "root")
        .collect()
}

/// What `guardian check` prints about the policy's exec filter.
fn check(policy: &Path) -> String {
    let out = Command::new(guardian_bin())
        .args(["check", "--policy"])
        .arg(policy)
        .output()
        .expect("guardian check");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Services the kernel can pre-select: by `user`, by `comm`, and combined with each other and
/// with the keys it cannot check. Each one's root is found at exec; execs that match no key
/// (another uid, another name, the right name under the wrong uid) make no record; an exec that
/// passes a key without matching its service is reported and makes no root.
#[test]
fn filtered_selector_kinds_find_their_roots_at_exec() {
    let test = "prefilter_on";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let exe = std::fs::canonicalize(WORKLOAD).expect("the workload's path");
    let (c1, c2, c3, c4) = (test_comm(1), test_comm(2), test_comm(3), test_comm(4));
    let (u1, u2, u3, u4) = (test_uid(1), test_uid(2), test_uid(3), test_uid(4));
    let policy = policy_file(
        test,
        &format!(
            "[[service]]\nname = \"user\"\nmatch = {{ user = {u1} }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"comm\"\nmatch = {{ comm = \"{c1}\" }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"user-comm\"\nmatch = {{ user = {u2}, comm = \"{c2}\" }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"user-cmdline\"\nmatch = {{ user = {u3}, cmdline = \"{tok}a\" }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"comm-cmdline\"\nmatch = {{ comm = \"{c3}\", cmdline = \"{tok}b\" }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"user-exe\"\nmatch = {{ user = {u4}, exe = \"{}\" }}\norphans = \"report\"\n\n\
             [[service]]\nname = \"comm-cgroup\"\nmatch = {{ comm = \"{c4}\", cgroup = \"/\" }}\norphans = \"report\"\n",
            exe.display()
        ),
    );
    let said = check(&policy);
    assert!(said.contains("  exec filter on: "), "{said}");
    assert!(
        said.contains(&format!("execs with uid {u2} and comm `{c2}`")),
        "{said}"
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    g.wait_stderr("exec filter on: ");
    assert_eq!(g.status()["exec_filter"], "on");
    let (c2_link, c3_link) = (named(&c2), named(&c3));

    // Execs no key lets through: root's /bin/true; uid u2 under another name; the name c2
    // under root's uid.
    let (records, filtered) = exec_counts(&g);
    finish(Workload::run(WORKLOAD, &["exec-loop", "30"]));
    finish(as_uid(u2, WORKLOAD, &["exec-loop", "10"]));
    finish(Workload::run(&c2_link, &["exec-loop", "10"]));
    let (records_after, filtered_after) = exec_counts(&g);
    assert_eq!(
        records_after, records,
        "execs no service can match were reported"
    );
    // The three loops, their 50 children, and the exec of the uid change.
    assert!(
        filtered_after >= filtered + 54,
        "the kernel kept {} execs back",
        filtered_after - filtered
    );

    // Through the uid key of `user-cmdline` without its command line: reported, no root.
    finish(as_uid(u3, WORKLOAD, &["exec-loop", "10"]));
    let (records_after_u3, _) = exec_counts(&g);
    assert!(
        records_after_u3 >= records_after + 11,
        "uid {u3}'s execs were not all reported: {}",
        records_after_u3 - records_after
    );
    assert!(roots(&g).is_empty(), "{:?}", roots(&g));

    let _held = [
        root_at_exec(&g, "user", as_uid(u1, WORKLOAD, &["linger", "0"])),
        root_at_exec(&g, "comm", Workload::run(named(&c1), &["linger", "0"])),
        root_at_exec(&g, "user-comm", as_uid(u2, &c2_link, &["linger", "0"])),
        root_at_exec(
            &g,
            "user-cmdline",
            as_uid(u3, WORKLOAD, &["linger", "0", &format!("{tok}a")]),
        ),
        root_at_exec(
            &g,
            "comm-cmdline",
            Workload::run(&c3_link, &["linger", "0", &format!("{tok}b")]),
        ),
        root_at_exec(&g, "user-exe", as_uid(u4, &exe, &["linger", "0"])),
        root_at_exec(
            &g,
            "comm-cgroup",
            Workload::run(named(&c4), &["linger", "0"]),
        ),
    ];
    g.stop();
}

/// A service the kernel cannot pre-select turns the filter off (`guardian check`, the log and
/// `guardian status` say so): every exec is reported, and its roots are found at exec.
fn unfiltered(test: &str, service: &str, start: impl FnOnce(&str) -> Workload) {
    let tok = token(test);
    let policy = policy_file(
        test,
        &format!("[[service]]\nname = \"svc\"\nmatch = {service}\norphans = \"report\"\n"),
    );
    let said = check(&policy);
    assert!(
        said.contains("  exec filter off: ") && said.contains("`svc`"),
        "{said}"
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    g.wait_stderr("exec filter off: ");
    assert_eq!(g.status()["exec_filter"], "off");
    let (records, _) = exec_counts(&g);
    let status = Command::new("/bin/sh")
        .args(["-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"])
        .status()
        .expect("sh");
    assert!(status.success());
    let (after, _) = exec_counts(&g);
    assert!(
        after >= records + 11,
        "with the filter off every exec is reported; {} were",
        after - records
    );
    let _held = root_at_exec(&g, "svc", start(&tok));
    g.stop();
}

#[test]
fn an_exe_only_service_is_found_at_exec() {
    let test = "prefilter_exe";
    if !privileged(test) {
        return;
    }
    let exe = std::fs::canonicalize(WORKLOAD).expect("the workload's path");
    unfiltered(test, &format!("{{ exe = \"{}\" }}", exe.display()), |_| {
        Workload::run(WORKLOAD, &["linger", "0"])
    });
}

#[test]
fn a_cmdline_only_service_is_found_at_exec() {
    let test = "prefilter_cmdline";
    if !privileged(test) {
        return;
    }
    unfiltered(
        test,
        &format!("{{ cmdline = \"{}\" }}", token(test)),
        |tok| Workload::run(WORKLOAD, &["linger", "0", tok]),
    );
}

/// A cgroup v2 directory of the test's own (removed when dropped): `/sys/fs/cgroup/unified` on
/// hybrid hosts, `/sys/fs/cgroup` where v2 is the only hierarchy.
struct OwnCgroup(PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // Its process may still be on its way out.
        for _ in 0..200 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn a_cgroup_only_service_is_found_at_exec() {
    let test = "prefilter_cgroup";
    if !privileged(test) {
        return;
    }
    let Some(mount) = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|m| m.join("cgroup.procs").is_file())
    else {
        guardian_tests::missing(test, "no cgroup v2 hierarchy is mounted");
        return;
    };
    let name = token(test);
    let cg = OwnCgroup(mount.join(&name));
    std::fs::create_dir(&cg.0).expect("creating the test's cgroup");
    let procs = cg.0.join("cgroup.procs");
    unfiltered(test, &format!("{{ cgroup = \"/{name}\" }}"), |_| {
        // The shell moves itself into the cgroup, then execs the workload: a root at that exec.
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            &format!("echo $$ > {} && exec {WORKLOAD} linger 0", procs.display()),
        ]);
        Workload::spawn(cmd)
    });
    drop(cg);
}

/// A service for a new uid, added by a reload, has its execs reported from the moment the
/// reload is in force: its root is found at exec. A reload that removes it again takes its key
/// out: that uid's execs are kept in the kernel once more.
#[test]
fn a_reload_adding_a_service_for_a_new_uid_sees_its_execs_at_once() {
    let test = "prefilter_reload";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let (u1, u2) = (test_uid(5), test_uid(6));
    let service = |name: &str, uid: u32| {
        format!(
            "[[service]]\nname = \"{name}\"\nmatch = {{ user = {uid}, cmdline = \"{tok}\" }}\norphans = \"report\"\n"
        )
    };
    let policy = policy_file(test, &service("a", u1));
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    let (records, _) = exec_counts(&g);
    finish(as_uid(u2, WORKLOAD, &["exec-loop", "5"]));
    assert_eq!(exec_counts(&g).0, records, "uid {u2} is no service's yet");

    std::fs::write(
        &policy,
        format!("{}\n{}", service("a", u1), service("b", u2)),
    )
    .expect("rewriting the policy");
    reload(&g);
    let _held = root_at_exec(&g, "b", as_uid(u2, WORKLOAD, &["linger", "0", &tok]));

    std::fs::write(&policy, service("a", u1)).expect("rewriting the policy");
    reload(&g);
    let (records, filtered) = exec_counts(&g);
    finish(as_uid(u2, WORKLOAD, &["exec-loop", "5"]));
    let (records_after, filtered_after) = exec_counts(&g);
    assert_eq!(
        records_after, records,
        "uid {u2}'s service was removed, yet its execs were reported"
    );
    assert!(
        filtered_after > filtered,
        "the kernel kept none of uid {u2}'s execs back"
    );
    g.stop();
}

/// A user name that does not resolve gives its service no key (the kernel reports none of its
/// execs); once the account exists, the next exec of its processes is reported and found.
#[test]
fn a_user_created_after_start_is_found_at_exec() {
    let test = "prefilter_late_user";
    if !guardian_tests::user_test_ready(test) {
        return;
    }
    let tok = token(test);
    let name = format!("gpf{}", std::process::id());
    let uid = test_uid(7);
    let policy = policy_file(
        test,
        &format!(
            "[[service]]\nname = \"svc\"\nmatch = {{ user = \"{name}\", cmdline = \"{tok}\" }}\norphans = \"report\"\n"
        ),
    );
    let g = Guardian::start(&["--policy", policy.to_str().unwrap()]);
    g.wait_stderr(&format!("there is no user `{name}`"));
    let (records, _) = exec_counts(&g);
    finish(as_uid(
        uid,
        WORKLOAD,
        &["exec-loop", "5", "/bin/true", &tok],
    ));
    assert_eq!(
        exec_counts(&g).0,
        records,
        "a user that does not exist has no key"
    );

    let _user = TempUser::add(&name, uid);
    // The filter takes the uid before the re-read of /proc that this resolution triggers.
    g.wait_for_within("the re-read for the new user", WAIT + WAIT, |v| {
        v["event"] == "resync" && v["trigger"] == "users"
    });
    let _held = root_at_exec(&g, "svc", as_uid(uid, WORKLOAD, &["linger", "0", &tok]));
    g.stop();
}
