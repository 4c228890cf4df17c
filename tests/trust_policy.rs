//! What a policy trusts: only facts a local user cannot forge make a process a service's root
//! (its resolved executable, its user), protections hold on what `/proc` says right before the
//! signal, and a policy file others than root could change is not enforced.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use guardian_tests::{
    alive, all_gone, decisions, euid_of, guardian_bin, kill, policy_file, privileged, token,
    Guardian, Workload, WAIT,
};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_guardian-workload");
/// The uid the policies pin, and another one: neither needs an account.
const PINNED_UID: u32 = 4242;
const OTHER_UID: u32 = 4243;

fn workload(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Workload {
    let mut cmd = Command::new(program);
    cmd.args(args);
    Workload::spawn(cmd)
}

/// A directory of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tok: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("guardian-{tok}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        Self(std::fs::canonicalize(&dir).expect("resolving the scratch directory"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `exe` is the executable the kernel runs, resolved: neither a path that climbs out of the
/// pattern's directory (`bin/../other/y`) nor a symlink inside it makes a root; the binary that
/// really lives there does.
#[test]
fn exe_matches_the_executable_the_kernel_runs() {
    let test = "exe_resolved";
    if !privileged(test) {
        return;
    }
    let scratch = Scratch::new(&token(test));
    let d = scratch.0.display().to_string();
    for dir in ["bin", "other"] {
        std::fs::create_dir(scratch.0.join(dir)).unwrap();
    }
    std::fs::copy(WORKLOAD, scratch.0.join("bin/x")).unwrap();
    std::fs::copy(WORKLOAD, scratch.0.join("other/y")).unwrap();
    std::os::unix::fs::symlink(scratch.0.join("other/y"), scratch.0.join("bin/link")).unwrap();
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        format!(
            "[[service]]\nname = \"svc\"\nmatch = {{ exe = \"{d}/bin/*\", cmdline = \"{tok}\" }}\norphans = \"kill\"\n"
        )
    }) else {
        return;
    };
    let args = ["tree", "2", "", &tok];
    let mut dots = workload(format!("{d}/bin/../other/y"), &args);
    let mut link = workload(format!("{d}/bin/link"), &args);
    let mut real = workload(format!("{d}/bin/x"), &args);
    let (dots_parent, dots_kids) = dots.read_tree();
    let (link_parent, link_kids) = link.read_tree();
    let (real_parent, real_kids) = real.read_tree();
    g.wait_root(real_parent);
    // The two others exec'd first: had they matched, their roots would be recorded by now.
    thread::sleep(Duration::from_millis(300));
    for (how, parent) in [("bin/../other/y", dots_parent), ("bin/link", link_parent)] {
        assert!(
            g.of("root", parent).is_empty(),
            "{how} runs {d}/other/y, not a {d}/bin/* executable, yet became a root"
        );
    }
    for parent in [dots_parent, link_parent, real_parent] {
        kill(parent, libc::SIGKILL);
    }
    all_gone(&real_kids, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(300));
    for &k in dots_kids.iter().chain(&link_kids) {
        assert!(alive(k), "{k} is no member of the service, and was killed");
    }
    let records = g.stop();
    for &k in dots_kids.iter().chain(&link_kids) {
        assert!(decisions(&records, k).is_empty());
    }
}

/// A copy of a service's command line under another uid does not join the service pinned to
/// its account; the same command as that account does (its orphans die).
#[test]
fn a_forged_command_line_under_another_uid_joins_nothing() {
    let test = "forged_uid";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        format!(
            "[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\", user = {PINNED_UID} }}\norphans = \"kill\"\n"
        )
    }) else {
        return;
    };
    let run_as = |uid: u32| {
        let uid = uid.to_string();
        workload(WORKLOAD, &["as-uid", &uid, WORKLOAD, "tree", "2", "", &tok])
    };
    let mut forged = run_as(OTHER_UID);
    let mut real = run_as(PINNED_UID);
    let (forged_parent, forged_kids) = forged.read_tree();
    let (real_parent, real_kids) = real.read_tree();
    assert_eq!(euid_of(forged_parent), Some(OTHER_UID));
    assert_eq!(euid_of(real_parent), Some(PINNED_UID));
    g.wait_root(real_parent);
    thread::sleep(Duration::from_millis(300));
    assert!(
        g.of("root", forged_parent).is_empty(),
        "uid {OTHER_UID} copied the command line and became a root"
    );
    kill(forged_parent, libc::SIGKILL);
    kill(real_parent, libc::SIGKILL);
    all_gone(&real_kids, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(300));
    for &k in &forged_kids {
        assert!(alive(k), "{k} (uid {OTHER_UID}) was killed as an orphan");
    }
    let records = g.stop();
    for &k in &forged_kids {
        assert!(decisions(&records, k).is_empty());
    }
    for &k in &real_kids {
        assert_eq!(decisions(&records, k)[0]["result"], "sent SIGKILL");
    }
}

/// `protect` selectors are checked on the process right before the signal: an orphan running
/// as a protected uid is refused and lives, its unprotected sibling dies.
#[test]
fn protected_users_outlive_their_parent() {
    let test = "protect_user";
    let Some((tok, g)) = Guardian::on_policy(test, |tok| {
        format!(
            "protect = [{{ user = {OTHER_UID} }}]\n[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\" }}\norphans = \"kill\"\n"
        )
    }) else {
        return;
    };
    let mut w = workload(
        WORKLOAD,
        &["tree", "2", &format!("as-uid={OTHER_UID}"), &tok],
    );
    let (parent, kids) = w.read_tree();
    let (plain, protected) = (kids[0], kids[1]);
    eventually_euid(protected, OTHER_UID);
    g.wait_root(parent);
    kill(parent, libc::SIGKILL);
    all_gone(&[plain], Duration::from_secs(1));
    let d = g.wait_decision(protected);
    assert_eq!(d["performed"], false, "{d}");
    assert_eq!(
        d["result"],
        format!("refused: protected by `uid={OTHER_UID}`"),
        "{d}"
    );
    thread::sleep(Duration::from_millis(200));
    assert!(alive(protected), "protected {protected} was signalled");
    let records = g.stop();
    assert_eq!(decisions(&records, plain)[0]["result"], "sent SIGKILL");
}

/// Waits (bounded) until the child's switch to `uid` shows in `/proc`.
fn eventually_euid(pid: u32, uid: u32) {
    guardian_tests::eventually(&format!("{pid} to run as uid {uid}"), WAIT, || {
        euid_of(pid) == Some(uid)
    });
}

/// `guardian check` warns (and succeeds) when a service can be joined by anyone.
#[test]
fn check_warns_about_services_anyone_can_join() {
    let check = |path: &Path| {
        let out = Command::new(guardian_bin())
            .args(["check", "--policy"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let open = policy_file(
        "check_unpinned",
        "[[service]]\nname = \"open\"\nmatch = { cmdline = \"apps\\\\.worker\" }\n",
    );
    let stderr = check(&open);
    assert!(
        stderr
            .contains("warning: service `open`: its `match` pins none of `user`, `cgroup`, `exe`"),
        "{stderr}"
    );
    assert!(stderr.contains("user = \"<service account>\""), "{stderr}");
    let pinned = policy_file(
        "check_pinned",
        &format!(
            "[[service]]\nname = \"pinned\"\nmatch = {{ cmdline = \"apps\\\\.worker\", user = {PINNED_UID} }}\n"
        ),
    );
    let stderr = check(&pinned);
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// A policy file others could write is refused in enforce mode, before anything is loaded; in
/// audit mode (and `guardian check`) it is a warning.
#[test]
fn a_policy_others_can_write_is_not_enforced() {
    let test = "writable_policy";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let path = policy_file(
        test,
        &format!("[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\", user = {PINNED_UID} }}\norphans = \"kill\"\n"),
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let shown = path.display().to_string();

    let mut child = Command::new(guardian_bin())
        .args(["--policy", &shown, "--output", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("guardian is enforcing a policy anyone can write");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    for part in [
        format!("refusing to enforce `{shown}` as root"),
        format!("policy file `{shown}` is writable by group or others"),
        "owner uid 0, mode 0666".to_owned(),
        format!("chmod go-w {shown}"),
        "--dry-run".to_owned(),
    ] {
        assert!(stderr.contains(&part), "{part}: {stderr}");
    }
    assert!(
        !stderr.contains("eBPF probes attached"),
        "loaded probes: {stderr}"
    );

    let g = Guardian::start(&["--policy", &shown, "--dry-run"]);
    let stderr = g.stderr();
    assert!(
        stderr.contains("WARN") && stderr.contains("mode 0666"),
        "{stderr}"
    );
    g.stop();

    let out = Command::new(guardian_bin())
        .args(["check", "--policy", &shown])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "warning: policy file `{shown}` is writable by group or others"
        )),
        "{stderr}"
    );
}

/// A Kubernetes ConfigMap volume: the kubelet makes its directory 0777 but mounts it read-only,
/// and the policy is reached through its `..data` symlink. Enforced there; the same layout on a
/// writable mount is refused.
#[test]
fn a_configmap_volume_is_enforced_and_a_writable_lookalike_is_not() {
    let test = "configmap_trust";
    if !privileged(test) {
        return;
    }
    let tok = token(test);
    let dir = guardian_tests::private_dir("configmap-trust");
    let ts = dir.join("..2026_11_26_02_30_00.1");
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(
        ts.join("policy.toml"),
        format!("[[service]]\nname = \"svc\"\nmatch = {{ cmdline = \"{tok}\", user = {PINNED_UID} }}\norphans = \"kill\"\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink(ts.file_name().unwrap(), dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.toml", dir.join("policy.toml")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let policy = dir.join("policy.toml");
    let shown = policy.to_str().unwrap().to_owned();

    // Writable: refused, naming the directory.
    let out = Command::new(guardian_bin())
        .args(["check", "--policy", &shown])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writable by group or others"), "{stderr}");

    // Read-only, as the kubelet mounts it: trusted.
    let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: plain mount syscalls on a directory this test made.
    let mounted = unsafe {
        libc::mount(
            c(&dir).as_ptr(),
            c(&dir).as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) == 0
            && libc::mount(
                std::ptr::null(),
                c(&dir).as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ) == 0
    };
    if !mounted {
        let e = std::io::Error::last_os_error();
        // SAFETY: undoing the bind mount, if it was made.
        unsafe { libc::umount2(c(&dir).as_ptr(), libc::MNT_DETACH) };
        guardian_tests::missing(test, &format!("cannot make a read-only bind mount: {e}"));
        return;
    }
    let out = Command::new(guardian_bin())
        .args(["check", "--policy", &shown])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("writable by group or others"), "{stderr}");
    let g = Guardian::start(&["--policy", &shown]);
    assert!(!g.stderr().contains("refusing"), "{}", g.stderr());
    g.stop();
    // SAFETY: as above.
    unsafe { libc::umount2(c(&dir).as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir_all(&dir);
}
