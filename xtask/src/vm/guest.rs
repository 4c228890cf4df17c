//! The guest: one initramfs for every kernel, holding busybox, statically linked guardian,
//! workload and test binaries, and an init that mounts what guardian needs, runs each test
//! binary and reports on the console.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::util::{cargo, is_static_elf, step, which, workspace_root};

/// Lines of the guest's init start with this; everything else is kernel or test output.
pub const MARK: &str = "guardian-vm:";

/// A line of a guest's driver, `{MARK} WORD REST`, as (WORD, REST) (REST empty when absent);
/// `None` for any other line.
pub fn marker(line: &str) -> Option<(&str, &str)> {
    let marker = line.strip_prefix(MARK)?.trim();
    Some(marker.split_once(' ').unwrap_or((marker, "")))
}
/// The guests' binaries are built for this target (as the host's, but linked statically).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where the daemon sits in the guest.
const GUARDIAN: &str = "/guardian/guardian";
/// Repository folders the tests read through compile-time paths (`CARGO_MANIFEST_DIR`).
const DATA_DIRS: [&str; 2] = ["policies", "tests/scripts"];

/// The statically linked executables a guest runs.
pub struct Binaries {
    guardian: PathBuf,
    workload: PathBuf,
    /// (name, executable) of each integration test of `guardian-tests`.
    tests: Vec<(String, PathBuf)>,
}

/// One executable cargo reported building.
struct Artifact {
    name: String,
    kind: String,
    test: bool,
    executable: PathBuf,
}

/// Builds the daemon and `guardian-tests` (its helper binaries and every integration test) into
/// `target/vm-static`, statically linked, with the eBPF object embedded.
pub fn build(object: &Path) -> anyhow::Result<Binaries> {
    step("static binaries for the guests");
    let guardian = static_guardian(object)?;
    let built = artifacts(
        cargo().args(["test", "--no-run", "-p", "guardian-tests"]),
        object,
    )?;
    let workload = built
        .iter()
        .find(|a| a.kind == "bin" && a.name == "guardian-workload" && !a.test)
        .context("cargo built no `guardian-workload` binary")?
        .executable
        .clone();
    let mut tests: Vec<(String, PathBuf)> = built
        .into_iter()
        .filter(|a| a.kind == "test")
        .map(|a| (a.name, a.executable))
        .collect();
    tests.sort();
    if tests.is_empty() {
        bail!("guardian-tests has no integration test");
    }
    for path in [&guardian, &workload]
        .into_iter()
        .chain(tests.iter().map(|t| &t.1))
    {
        if !is_static_elf(path)? {
            bail!(
                "{} is dynamically linked: the guests have no C library",
                path.display()
            );
        }
    }
    Ok(Binaries {
        guardian,
        workload,
        tests,
    })
}

/// The daemon alone, built as for the guests (the container image holds it too).
pub fn static_guardian(object: &Path) -> anyhow::Result<PathBuf> {
    let built = artifacts(cargo().args(["build", "-p", "guardian"]), object)?;
    Ok(built
        .into_iter()
        .find(|a| a.kind == "bin" && a.name == "guardian" && !a.test)
        .context("cargo built no `guardian` binary")?
        .executable)
}

/// Runs a cargo build for the guests and returns the executables it reports.
fn artifacts(cmd: &mut Command, object: &Path) -> anyhow::Result<Vec<Artifact>> {
    // With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
    // and proc macros (which must stay dynamic).
    cmd.args(["--release", "--target", TARGET, "--target-dir"])
        .arg(workspace_root().join("target/vm-static"))
        .arg("--message-format=json-render-diagnostics")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("GUARDIAN_EBPF_OBJECT", object)
        .stderr(Stdio::inherit());
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("command failed ({}): {cmd:?}", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name), Some(kind)) = (
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
            v["target"]["kind"][0].as_str(),
        ) else {
            continue;
        };
        found.push(Artifact {
            name: name.to_owned(),
            kind: kind.to_owned(),
            test: v["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(exe),
        });
    }
    Ok(found)
}

/// Writes `target/vm/initramfs.cpio` (uncompressed: the kernel copies it faster than it
/// would decompress it under emulation).
pub fn initramfs(vm_dir: &Path, bins: &Binaries) -> anyhow::Result<PathBuf> {
    step("initramfs");
    let root = vm_dir.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let busybox = which("busybox").context("busybox not found: run `cargo xtask setup`")?;
    place(&root, &busybox, Path::new("/bin/busybox"))?;
    place(&root, &bins.guardian, Path::new(GUARDIAN))?;
    for (name, exe) in &bins.tests {
        place(&root, exe, &Path::new("/guardian/tests").join(name))?;
    }
    // The tests find the workload and their data files by absolute paths compiled into them
    // (`CARGO_BIN_EXE_*`, `CARGO_MANIFEST_DIR`): the guest has them at the same paths.
    place(&root, &bins.workload, &bins.workload)?;
    for dir in DATA_DIRS {
        let src = workspace_root().join(dir);
        for entry in fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
            let path = entry?.path();
            if path.is_file() {
                place(&root, &path, &path)?;
            }
        }
    }
    let init = root.join("init");
    fs::write(&init, init_script(&bins.tests))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let mut entries = Vec::new();
    walk(&root, Path::new("."), &mut entries)?;
    let out = vm_dir.join("initramfs.cpio");
    let mut cpio = Command::new(&busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&out)?)
        .stderr(Stdio::null())
        .spawn()
        .context("starting busybox cpio")?;
    let list: String = entries
        .iter()
        .map(|e| format!("{}\n", e.display()))
        .collect();
    cpio.stdin
        .take()
        .expect("piped")
        .write_all(list.as_bytes())?;
    if !cpio.wait()?.success() {
        bail!("busybox cpio failed to write {}", out.display());
    }
    let size = fs::metadata(&out)?.len();
    eprintln!("{} ({} MiB)", out.display(), size >> 20);
    Ok(out)
}

/// The absolute guest path `dest` inside the guest's root `root`.
pub(super) fn in_root(root: &Path, dest: &Path) -> PathBuf {
    root.join(dest.strip_prefix("/").unwrap_or(dest))
}

/// Copies `src` to the absolute path `dest` inside the guest's root.
pub(super) fn place(root: &Path, src: &Path, dest: &Path) -> anyhow::Result<()> {
    let target = in_root(root, dest);
    fs::create_dir_all(target.parent().expect("has a parent"))?;
    fs::copy(src, &target)
        .with_context(|| format!("copying {} into the initramfs", src.display()))?;
    Ok(())
}

/// Lists `rel` and everything below it, parents before children (as cpio needs).
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    out.push(rel.to_path_buf());
    let path = root.join(rel);
    if path.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            walk(root, &rel.join(name), out)?;
        }
    }
    Ok(())
}

/// The guest's /init. Python is absent, so the Python tests skip (loudly) there; every other
/// prerequisite is present. PID 1 stays in the root cgroup, which has no `pids.max`.
fn init_script(tests: &[(String, PathBuf)]) -> String {
    let mut s = format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# The console is the kernel's (ttyS1); the host reads the tests' output on ttyS0.
mount -t devtmpfs devtmpfs /dev && exec </dev/null >/dev/ttyS0 2>&1
fail() {{ echo "{MARK} error $*"; }}
mount -t proc proc /proc || fail "mounting proc"
mount -t sysfs sysfs /sys || fail "mounting sysfs"
mount -t tracefs tracefs /sys/kernel/tracing || fail "mounting tracefs"
mount -t bpf bpf /sys/fs/bpf || fail "mounting bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mounting cgroup2"
echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control || fail "enabling memory and pids in cgroup2"
echo "{MARK} kernel $(uname -r)"
"#
    );
    for (name, _) in tests {
        s.push_str(&format!(
            "echo \"{MARK} begin {name}\"\n\
             GUARDIAN_BIN={GUARDIAN} /guardian/tests/{name} --test-threads=1 --show-output --color never\n\
             echo \"{MARK} end {name} exit=$?\"\n"
        ));
    }
    s.push_str(&format!("echo \"{MARK} done\"\npoweroff -f\n"));
    s
}
