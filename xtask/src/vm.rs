//! `cargo xtask integration-test vm`: the privileged suite on the kernels guardian's users run.
//!
//! Each kernel of [`MATRIX`] boots under qemu from one initramfs holding busybox and statically
//! linked guardian, workload and test binaries. The guest's init runs every test binary and
//! prints markers on the serial console; qemu exits 0 whatever happened, so the host decides
//! pass or fail from the console output alone.

mod console;
mod guest;
mod kernel;
pub mod systemd;

pub use guest::static_guardian;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    setup,
    util::{step, workspace_root},
};

/// A kernel series and the Debian release whose archive publishes it.
pub struct Series {
    pub series: &'static str,
    pub release: &'static str,
}

/// The kernel matrix, pinned here and nowhere else. Each series resolves at run time to the
/// newest package the archive has, so a version leaving the archive does not break the run.
pub const MATRIX: [Series; 3] = [
    // Debian 11.
    Series {
        series: "5.10",
        release: "bullseye",
    },
    // Debian 12.
    Series {
        series: "6.1",
        release: "bookworm",
    },
    // Debian 12 also ships 6.12 (source package linux-6.12, in its security suite).
    Series {
        series: "6.12",
        release: "bookworm",
    },
];

/// Generous bound on one guest (boot and whole suite; about 30 s when all goes well). A guest
/// still running then is killed and counted as failed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The series names, for the command line.
pub fn series_names() -> impl Iterator<Item = &'static str> {
    MATRIX.iter().map(|s| s.series)
}

/// Boots the selected kernels (all of the matrix when `only` is empty) one after the other and
/// runs the suite in each. Fails if a test failed or a guest did not complete. Two guests at
/// once saved a third of the time on 2 cores, but the suite's bounded waits (an orphan gone
/// within 1 s) then compete for the CPUs: one at a time keeps the verdicts about guardian.
pub fn run(object: &Path, only: &[String]) -> anyhow::Result<()> {
    setup::vm_tools(false)?;
    let selected: Vec<&Series> = MATRIX
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.series))
        .collect();
    let dir = workspace_root().join("target/vm");

    // Kernels first: a registry problem shows before the long build.
    let kernels = kernel::fetch(&dir, &selected)?;

    let started = Instant::now();
    let binaries = guest::build(object)?;
    let build_time = started.elapsed();
    let initramfs = guest::initramfs(&dir, &binaries)?;

    let mut rows = Vec::new();
    for (s, k) in selected.iter().zip(&kernels) {
        step(&format!(
            "kernel {}: boot {} {} and run the suite",
            s.series, k.package, k.version
        ));
        let log = |kind: &str| dir.join(format!("logs/{}.{kind}.log", s.series));
        let started = Instant::now();
        let report = console::boot(
            &k.vmlinuz,
            &initramfs,
            &log("console"),
            &log("kernel"),
            GUEST_TIMEOUT,
        )
        .with_context(|| format!("kernel {}: running qemu", s.series))?;
        let took = started.elapsed();
        report.print(s.series);
        let (passed, failed, skipped) = report.counts();
        println!(
            "kernel {} ({}): {passed} passed, {failed} failed, {skipped} skipped in {:.1} s \
             (boot {}); logs {}, {}",
            s.series,
            report.uname.as_deref().unwrap_or("did not boot"),
            took.as_secs_f64(),
            report
                .boot_time
                .map_or("-".to_owned(), |b| format!("{:.1} s", b.as_secs_f64())),
            log("console").display(),
            log("kernel").display(),
        );
        rows.push((s.series, report, took));
    }

    println!(
        "\nkernel matrix (static build {:.0} s):",
        build_time.as_secs_f64()
    );
    let mut bad = Vec::new();
    for (series, report, took) in &rows {
        let (passed, failed, skipped) = report.counts();
        let verdict = if report.ok() { "ok" } else { "FAILED" };
        println!(
            "  {series:<5} {verdict:<6} {passed:>3} passed {failed:>3} failed {skipped:>3} skipped {:>6.1} s",
            took.as_secs_f64()
        );
        if !report.ok() {
            bad.push(*series);
        }
    }
    if !bad.is_empty() {
        bail!(
            "the suite failed on kernel {} (console logs in {})",
            bad.join(", "),
            dir.join("logs").display()
        );
    }
    Ok(())
}
