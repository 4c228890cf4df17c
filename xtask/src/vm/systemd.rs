//! `cargo xtask integration-test systemd`: guardian installed from its Debian package in a
//! Debian 12 guest with systemd as pid 1, beside the production guide's own services (its three
//! systemd units and its supervisord programs, run as `abcdeveloper`).
//!
//! The guest boots a kernel of the matrix under qemu from one initramfs: the cached root
//! filesystem ([`rootfs`]) followed by a small archive of this run's files (the package and
//! the fixtures of `tests/systemd/`). A oneshot unit runs `tests/systemd/cases.py`, which
//! prints one `CASE NAME PASS|FAIL DETAIL` line per case on the serial console and powers the
//! guest off; the host decides from those lines alone, and a case the plan announced that
//! never reported fails.

mod rootfs;

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{
    console,
    guest::{self, marker},
    kernel, MATRIX,
};
use crate::{
    setup,
    util::{step, workspace_root},
};

/// The kernel the guest boots: Debian 12's own, the release of the root filesystem.
const SERIES: &str = "6.1";
/// Bound on the guest (boot and every case; about 4 minutes when all goes well).
const GUEST_TIMEOUT: Duration = Duration::from_secs(420);
/// systemd from the initramfs: there is no /init, and no root disk to switch to.
const INIT: &str = "rdinit=/sbin/init";
/// Where the run's own files go in the guest.
const GUEST_DIR: &str = "/usr/local/lib/guardian-it";
/// The unit that runs the cases once the guest is up.
const CASES_UNIT: &str = "guardian-cases.service";
/// The fixtures (repository path, guest path).
const FIXTURES: [(&str, &str); 5] = [
    ("tests/systemd/units", "/etc/systemd/system"),
    (
        "tests/systemd/analyticbot",
        "/home/abcdeveloper/projects/analyticbot",
    ),
    (
        "tests/systemd/supervisor",
        "/usr/local/lib/guardian-it/supervisor",
    ),
    (
        "tests/systemd/cases.py",
        "/usr/local/lib/guardian-it/cases.py",
    ),
    // The shipped policy, which the cases enable in enforce mode.
    (
        "policies/analyticbot.toml",
        "/usr/local/lib/guardian-it/analyticbot.toml",
    ),
];

/// Builds (or reuses) the guest, boots it, installs the package `deb` (`cargo xtask dist`'s)
/// and runs the cases. Fails if a case failed, or did not report, or the guest broke.
pub fn run(deb: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::systemd_tools(false)?;
    eprintln!("package under test: {}", deb.display());
    let dir = workspace_root().join("target/systemd");
    let series = MATRIX
        .iter()
        .find(|s| s.series == SERIES)
        .expect("the guest's kernel is in the matrix");
    let kernel = kernel::fetch(&workspace_root().join("target/vm"), &[series])?.remove(0);
    let base = rootfs::build(&dir)?;
    let initramfs = initramfs(&dir, &base, deb)?;

    step(&format!(
        "systemd guest: boot {} {} and run the cases",
        kernel.package, kernel.version
    ));
    let log = |kind: &str| dir.join(format!("logs/{kind}.log"));
    let booted = Instant::now();
    let console = console::run(
        &kernel.vmlinuz,
        &initramfs,
        &format!("{} {INIT}", console::KERNEL_ARGS),
        &log("console"),
        &log("kernel"),
        GUEST_TIMEOUT,
    )
    .context("running qemu")?;
    let guest_time = booted.elapsed();
    let mut report = Report::parse(&console.lines);
    report.problems.extend(console.problems);
    report.print();
    if !report.problems.is_empty() {
        println!("\n  end of the kernel and systemd console:");
        for line in &console.kernel_tail {
            println!("    | {line}");
        }
    }
    let (passed, failed) = report.counts();
    println!(
        "\nsystemd guest ({}): {passed} passed, {failed} failed; guest {:.1} s (systemd up \
         after {}), total {:.1} s; logs {}, {}",
        report.uname.as_deref().unwrap_or("did not boot"),
        guest_time.as_secs_f64(),
        console
            .boot_time
            .map_or("-".to_owned(), |b| format!("{:.1} s", b.as_secs_f64())),
        started.elapsed().as_secs_f64(),
        log("console").display(),
        log("kernel").display(),
    );
    if !report.ok() {
        bail!(
            "the systemd guest's cases failed (logs in {})",
            dir.join("logs").display()
        );
    }
    Ok(())
}

/// The guest's initramfs: the cached root filesystem, then an archive of this run's files
/// (the kernel unpacks concatenated archives one over the other).
fn initramfs(dir: &Path, base: &Path, deb: &Path) -> anyhow::Result<PathBuf> {
    step("systemd guest: this run's files");
    let tree = dir.join("overlay");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let root = workspace_root();
    for (src, dest) in FIXTURES {
        place_all(&tree, &root.join(src), Path::new(dest))?;
    }
    guest::place(&tree, deb, Path::new(&format!("{GUEST_DIR}/guardian.deb")))?;
    let units = guest::in_root(&tree, Path::new("/etc/systemd/system"));
    fs::create_dir_all(units.join("multi-user.target.wants"))?;
    symlink(
        format!("/etc/systemd/system/{CASES_UNIT}"),
        units.join("multi-user.target.wants").join(CASES_UNIT),
    )?;
    // Without udev (minbase has none) the console's device unit never appears, and its getty
    // would hold multi-user.target for 90 s: masked.
    symlink("/dev/null", units.join("serial-getty@ttyS1.service"))?;

    let out = dir.join("initramfs.cpio");
    fs::copy(base, &out).with_context(|| format!("copying {}", base.display()))?;
    // The overlay's archive written straight after the base's.
    rootfs::pack(&tree, fs::OpenOptions::new().append(true).open(&out)?)?;
    eprintln!(
        "{} ({} MiB)",
        out.display(),
        fs::metadata(&out)?.len() >> 20
    );
    Ok(out)
}

/// [`guest::place`] for a file, or a folder and everything below it: copies `src` to the
/// absolute guest path `dest` inside the tree `root`, keeping permissions.
fn place_all(root: &Path, src: &Path, dest: &Path) -> anyhow::Result<()> {
    if !src.is_dir() {
        return guest::place(root, src, dest);
    }
    // Created even when it holds no file.
    fs::create_dir_all(guest::in_root(root, dest))?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        place_all(root, &entry.path(), &dest.join(entry.file_name()))?;
    }
    Ok(())
}

/// One case's verdict, as the guest printed it.
#[derive(Debug, PartialEq, Eq)]
struct Case {
    name: String,
    passed: bool,
    detail: String,
}

/// What the guest's driver reported.
#[derive(Debug, Default)]
struct Report {
    uname: Option<String>,
    cases: Vec<Case>,
    problems: Vec<String>,
}

impl Report {
    /// Reads the driver's lines: `{MARK} kernel`, `{MARK} plan NAME...`, `CASE NAME PASS|FAIL
    /// DETAIL`, `{MARK} error WHAT`, `{MARK} done`. A planned case that never reported fails.
    fn parse(lines: &[String]) -> Self {
        let mut report = Self::default();
        let mut plan: Option<Vec<String>> = None;
        let mut done = false;
        for line in lines {
            if let Some((word, rest)) = marker(line) {
                match word {
                    "kernel" => report.uname = Some(rest.to_owned()),
                    "plan" => plan = Some(rest.split_whitespace().map(str::to_owned).collect()),
                    "error" => report.problems.push(format!("guest: {rest}")),
                    "done" => done = true,
                    _ => {}
                }
            } else if let Some(rest) = line.strip_prefix("CASE ") {
                let mut words = rest.splitn(3, ' ');
                let (Some(name), Some(verdict)) = (words.next(), words.next()) else {
                    continue;
                };
                report.cases.push(Case {
                    name: name.to_owned(),
                    passed: verdict == "PASS",
                    detail: words.next().unwrap_or("").to_owned(),
                });
            }
        }
        match plan {
            None => report
                .problems
                .push("the guest's driver never announced its cases".to_owned()),
            Some(plan) => {
                for name in plan {
                    if !report.cases.iter().any(|c| c.name == name) {
                        report.cases.push(Case {
                            name,
                            passed: false,
                            detail: "never reported (the driver stopped before it)".to_owned(),
                        });
                    }
                }
            }
        }
        if !done {
            report
                .problems
                .push("the guest never printed its completion marker".to_owned());
        }
        report
    }

    /// (passed, failed).
    fn counts(&self) -> (usize, usize) {
        let passed = self.cases.iter().filter(|c| c.passed).count();
        (passed, self.cases.len() - passed)
    }

    fn ok(&self) -> bool {
        self.problems.is_empty() && !self.cases.is_empty() && self.counts().1 == 0
    }

    fn print(&self) {
        let width = self.cases.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.cases {
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            println!("  {verdict} {:<width$}  {}", c.name, c.detail);
        }
        for p in &self.problems {
            println!("  PROBLEM: {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn cases_are_read_and_unreported_ones_fail() {
        let r = Report::parse(&lines(
            "guardian-vm: kernel 6.1.0-56-cloud-amd64
guardian-vm: plan install reload stop
systemd[1]: noise
CASE install PASS (3.1 s) dpkg -i: ok
CASE reload FAIL (5.0 s) no reload record
guardian-vm: done
",
        ));
        assert_eq!(r.uname.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(r.counts(), (1, 2));
        assert_eq!(r.cases[1].detail, "(5.0 s) no reload record");
        assert_eq!(r.cases[2].name, "stop");
        assert!(!r.cases[2].passed);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(!r.ok());
    }

    #[test]
    fn a_guest_without_plan_or_end_fails() {
        let r = Report::parse(&lines("guardian-vm: error useradd failed\n"));
        assert!(!r.ok());
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        let r = Report::parse(&lines("guardian-vm: plan a\nCASE a PASS\n"));
        assert!(r.cases[0].passed);
        assert!(!r.ok(), "no completion marker");
    }
}
