//! Build, test and benchmark orchestration: `cargo xtask <command>`.

mod bench;
mod deploy;
mod dist;
mod ebpf;
mod setup;
mod util;
mod vm;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::util::{cargo, is_root, run, workspace_root};

#[derive(Debug, Parser)]
#[command(about = "guardian's build, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building the eBPF program and the kernel matrix need (Debian/Ubuntu, as
    /// root); idempotent.
    Setup {
        /// Only report what is missing and how to install it.
        #[arg(long)]
        check: bool,
    },
    /// Build the eBPF object (embedded into the daemon at its next build).
    BuildEbpf,
    /// Build the eBPF object and the daemon (release).
    Build,
    /// Build everything, then run guardian with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package `target/dist/guardian_VERSION_amd64.deb` (release daemon with
    /// the eBPF object, systemd unit, example policy in audit mode, man pages, completions).
    Dist,
    /// Build the container image (a FROM scratch image of the statically linked daemon) with
    /// podman or buildah; without them, only its build context `target/image/`.
    Image,
    /// The whole suite: setup, build, fmt, clippy, unit tests, the deployment files' checks,
    /// the Debian package, privileged integration tests, the same integration tests on the
    /// kernel matrix in VMs, and the package under systemd in a Debian guest.
    Test {
        /// Skip the Debian package and the privileged integration tests (here and in VMs).
        #[arg(long)]
        unit_only: bool,
        /// Skip the VMs: the kernel matrix and the systemd guest (quick local runs).
        #[arg(long)]
        no_vm: bool,
    },
    /// Integration tests in other environments.
    IntegrationTest {
        #[command(subcommand)]
        which: IntegrationTest,
    },
    /// Benchmarks that print figures (every one, and a summary, without a name).
    Bench(bench::Args),
}

#[derive(Debug, Subcommand)]
enum IntegrationTest {
    /// Boot each kernel of the matrix under qemu and run the privileged suite inside it.
    Vm {
        /// A kernel series to run (repeatable; default: the whole matrix).
        #[arg(long = "kernel", value_name = "SERIES",
              value_parser = clap::builder::PossibleValuesParser::new(vm::series_names()))]
        kernels: Vec<String>,
    },
    /// Boot a Debian 12 guest with systemd as pid 1, install guardian's package and run it
    /// beside the production guide's systemd units and supervisord programs.
    Systemd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup { check } => setup::setup(check),
        Command::BuildEbpf => ebpf::build().map(|_| ()),
        Command::Build => build_release().map(|_| ()),
        Command::Dist => dist::run_dist(&build_release()?).map(|_| ()),
        Command::Image => {
            setup::ebpf_toolchain(false)?;
            dist::image(&ebpf::build()?)
        }
        Command::Run { args } => {
            let bin = build_release()?;
            let status = std::process::Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Command::Test { unit_only, no_vm } => test(unit_only, no_vm),
        Command::IntegrationTest {
            which: IntegrationTest::Vm { kernels },
        } => {
            setup::ebpf_toolchain(false)?;
            vm::run(&ebpf::build()?, &kernels)
        }
        Command::IntegrationTest {
            which: IntegrationTest::Systemd,
        } => vm::systemd::run(&dist::run_dist(&build_release()?)?),
        Command::Bench(args) => bench::run(args),
    }
}

/// Builds the eBPF object and the release daemon; returns the daemon's path.
fn build_release() -> anyhow::Result<PathBuf> {
    setup::ebpf_toolchain(false)?;
    let object = ebpf::build()?;
    run(cargo()
        .args(["build", "--release", "-p", "guardian"])
        .env("GUARDIAN_EBPF_OBJECT", &object))?;
    Ok(workspace_root().join("target/release/guardian"))
}

fn test(unit_only: bool, no_vm: bool) -> anyhow::Result<()> {
    let root = workspace_root();
    setup::ebpf_toolchain(false)?;
    let object = ebpf::build()?;

    util::step("format");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(root.join("guardian-ebpf/Cargo.toml")))?;

    util::step("clippy (userspace)");
    run(cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("GUARDIAN_EBPF_OBJECT", &object))?;
    util::step("clippy (eBPF crate)");
    ebpf::clippy()?;

    util::step("unit tests");
    run(cargo()
        .args([
            "test",
            "-p",
            "guardian",
            "-p",
            "guardian-common",
            "-p",
            "xtask",
        ])
        .env("GUARDIAN_EBPF_OBJECT", &object))?;

    deploy::check()?;

    if unit_only {
        return Ok(());
    }
    let deb = dist::run_dist(&build_release()?)?;

    util::step("privileged integration tests");
    if is_root() {
        setup::test_tools()?;
        host_integration_tests(&object)?;
    } else {
        eprintln!(
            "SKIPPED: the integration tests load eBPF programs and signal processes; run \
             `sudo cargo xtask test` (or as root) to run them"
        );
    }

    if no_vm {
        eprintln!("SKIPPED: the kernel matrix and the systemd guest (--no-vm)");
        return Ok(());
    }
    util::step("kernel matrix");
    // The guests need no root on the host, only qemu and busybox, which root can install.
    if !is_root() && !setup::vm_tools_missing().is_empty() {
        eprintln!(
            "SKIPPED: the kernel matrix needs {}: run `sudo cargo xtask setup`, or pass --no-vm",
            setup::vm_tools_missing().join(" and ")
        );
    } else {
        vm::run(&object, &[])?;
    }
    util::step("systemd guest");
    if !is_root() {
        eprintln!(
            "SKIPPED: the systemd guest's root filesystem is built as root (mmdebstrap) and the \
             container image by root's podman: run `sudo cargo xtask test`, or pass --no-vm"
        );
        return Ok(());
    }
    vm::systemd::run(&deb)?;
    // The guests' static binary is built by now: the image reuses it.
    setup::image_tools(false)?;
    dist::image(&object)
}

/// The privileged integration tests on this machine's kernel.
fn host_integration_tests(object: &std::path::Path) -> anyhow::Result<()> {
    let root = workspace_root();
    run(cargo()
        .args(["build", "-p", "guardian"])
        .env("GUARDIAN_EBPF_OBJECT", object))?;
    run(cargo()
        .args(["test", "-p", "guardian-tests", "--", "--test-threads=1"])
        .env("GUARDIAN_EBPF_OBJECT", object)
        .env("GUARDIAN_BIN", root.join("target/debug/guardian"))
        // Inside the suite, a missing capability fails instead of skipping.
        .env("GUARDIAN_REQUIRE_PRIVILEGED", "1"))?;
    Ok(())
}
