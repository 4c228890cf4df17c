//! `cargo xtask setup`: installs what building the eBPF program and running the kernel matrix
//! need, on Debian or Ubuntu. Commands call the part they need, so a fresh root shell needs no
//! separate setup step.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::{
    ebpf::{bpf_linker, Toolchain},
    util::{is_root, is_static_elf, output, run, step, tools_dir, which, workspace_root},
};

/// Debian's Rust with a prebuilt `core` for BPF targets.
const RUST_PACKAGES: [&str; 4] = [
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "libstd-rust-web-dev-bpf",
];
/// bpf-linker links through LLVM; version 0.13.0 builds against LLVM 22.
const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER: &str = "bpf-linker@0.13.0";
/// Validates the Kubernetes manifests (from the Python package index).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The kernel matrix's tools, (package, command): qemu emulates the guests, and the static
/// busybox is their userland.
const VM_PACKAGES: [(&str, &str); 2] = [
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
];
/// The systemd guest's tools: mmdebstrap builds its Debian root filesystem from the mirror,
/// cpio packs that tree into the initramfs the guest boots from.
const SYSTEMD_PACKAGES: [(&str, &str); 3] = [
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("mmdebstrap", "mmdebstrap"),
    ("cpio", "cpio"),
];

/// Everything: the eBPF toolchain, the kernel matrix's and the systemd guest's tools.
pub fn setup(check_only: bool) -> anyhow::Result<()> {
    ebpf_toolchain(check_only)?;
    vm_tools(check_only)?;
    systemd_tools(check_only)
}

/// The toolchain that builds the eBPF program.
pub fn ebpf_toolchain(check_only: bool) -> anyhow::Result<()> {
    step("setup (eBPF toolchain)");
    let need_rust = Toolchain::detect().is_none();
    let need_linker = bpf_linker().is_none();
    if !need_rust && !need_linker {
        eprintln!(
            "eBPF toolchain ready: {:?}, bpf-linker at {}",
            Toolchain::detect().expect("detected above"),
            bpf_linker().expect("found above").display()
        );
        return Ok(());
    }

    let mut packages: Vec<&str> = Vec::new();
    if need_rust {
        packages.extend(RUST_PACKAGES);
    }
    if need_linker && !Path::new(LLVM_PREFIX).join("bin/llvm-config").is_file() {
        packages.push(LLVM_PACKAGE);
    }
    let linker_cmd = format!(
        "LLVM_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH cargo install --locked {BPF_LINKER} \
         --no-default-features --features llvm-22 --root {}",
        tools_dir().display()
    );
    let can_install = is_root() && which("apt-get").is_some();
    if check_only || !can_install {
        eprintln!("missing for the eBPF build; install with:");
        if !packages.is_empty() {
            eprintln!(
                "  apt-get update && apt-get install -y --no-install-recommends {}",
                packages.join(" ")
            );
        }
        if need_linker {
            eprintln!("  {linker_cmd}");
        }
        eprintln!("(or: rustup toolchain install nightly --component rust-src && cargo install bpf-linker)");
        if check_only {
            return Ok(());
        }
        bail!("the eBPF toolchain is incomplete and this is not a root shell on Debian/Ubuntu: run the commands above");
    }

    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    if need_linker {
        step("build bpf-linker");
        let path = format!(
            "{LLVM_PREFIX}/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(crate::util::cargo()
            .args([
                "install",
                "--locked",
                BPF_LINKER,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--root",
            ])
            .arg(tools_dir())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path))?;
    }
    if Toolchain::detect().is_none() || bpf_linker().is_none() {
        bail!("setup finished but the eBPF toolchain is still incomplete");
    }
    Ok(())
}

/// What the host integration tests need beyond Rust: the Prometheus client library's parser,
/// which checks guardian's metrics (Debian's package, for the system python3).
pub fn test_tools() -> anyhow::Result<()> {
    step("setup (integration tests)");
    let has_parser = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_parser {
        eprintln!("integration test tools ready: python3-prometheus-client");
        return Ok(());
    }
    if !(is_root() && which("apt-get").is_some()) {
        eprintln!(
            "missing for the metrics tests (they will fail under GUARDIAN_REQUIRE_PRIVILEGED=1): \
             apt-get install -y python3-prometheus-client"
        );
        return Ok(());
    }
    apt_install(&["python3-prometheus-client"])
}

/// promtool, which checks the Prometheus alert rules: on PATH, or taken out of Debian's
/// `prometheus` package into `target/deploy-tools/`. Downloading the package instead of
/// installing it needs no root and starts no Prometheus server (the package's own service).
/// None when it cannot be had.
pub fn promtool() -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = which("promtool") {
        return Ok(Some(path));
    }
    let dir = deploy_tools_dir();
    let promtool = dir.join("usr/bin/promtool");
    if promtool.is_file() {
        return Ok(Some(promtool));
    }
    if which("apt-get").is_none() {
        return Ok(None);
    }
    step("setup (promtool, from Debian's prometheus package)");
    std::fs::create_dir_all(&dir)?;
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "prometheus"])
            .current_dir(&dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        // Stale package lists: only root may refresh them.
        if !is_root() {
            return Ok(None);
        }
        run(Command::new("apt-get").args(["update", "-q"]))?;
        if !download() {
            return Ok(None);
        }
    }
    for entry in std::fs::read_dir(&dir)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            crate::util::pipe(
                Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&deb),
                Command::new("tar")
                    .args(["-x", "-C"])
                    .arg(&dir)
                    .arg("./usr/bin/promtool"),
            )?;
            std::fs::remove_file(&deb)?;
        }
    }
    if !promtool.is_file() {
        bail!("the prometheus package held no usr/bin/promtool");
    }
    Ok(Some(promtool))
}

/// The Kubernetes schema validator, pinned, in a virtual environment under
/// `target/deploy-tools/`. None when Python cannot make one and root is not here to install
/// python3-venv.
pub fn kubernetes_validate() -> anyhow::Result<Option<PathBuf>> {
    let venv = deploy_tools_dir().join("kubernetes-validate");
    let validate = venv.join("bin/kubernetes-validate");
    let installed = output(Command::new(&validate).arg("--version"))
        .is_some_and(|v| v.trim().ends_with(KUBERNETES_VALIDATE_VERSION));
    if installed {
        return Ok(Some(validate));
    }
    step("setup (kubernetes-validate)");
    let python = if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        match which("python3") {
            Some(p) => p,
            None => return Ok(None),
        }
    };
    let make_venv = || {
        Command::new(&python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
    };
    // Debian's python3 makes virtual environments only with python3-venv.
    if !make_venv() {
        if !(is_root() && which("apt-get").is_some()) {
            return Ok(None);
        }
        apt_install(&["python3-venv"])?;
        if !make_venv() {
            bail!(
                "{} -m venv failed with python3-venv installed",
                python.display()
            );
        }
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!(
            "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
        )))?;
    Ok(Some(validate))
}

fn deploy_tools_dir() -> PathBuf {
    workspace_root().join("target/deploy-tools")
}

/// The kernel matrix's packages that are missing (a dynamically linked busybox counts as
/// missing: the guests have no C library).
pub fn vm_tools_missing() -> Vec<&'static str> {
    missing(&VM_PACKAGES)
}

/// What `cargo xtask integration-test vm` needs.
pub fn vm_tools(check_only: bool) -> anyhow::Result<()> {
    tools("kernel matrix", &VM_PACKAGES, check_only)
}

/// What `cargo xtask integration-test systemd` needs.
pub fn systemd_tools(check_only: bool) -> anyhow::Result<()> {
    tools("systemd guest", &SYSTEMD_PACKAGES, check_only)
}

/// What builds the container image (it builds one here; it cannot run one: see the README).
pub fn image_tools(check_only: bool) -> anyhow::Result<()> {
    tools("container image", &[("podman", "podman")], check_only)
}

fn missing(packages: &[(&'static str, &str)]) -> Vec<&'static str> {
    packages
        .iter()
        .filter(|(package, command)| match which(command) {
            None => true,
            Some(path) => *package == "busybox-static" && !is_static_elf(&path).unwrap_or(false),
        })
        .map(|(package, _)| *package)
        .collect()
}

/// Installs the (package, command) pairs whose command is missing.
fn tools(what: &str, packages: &[(&'static str, &str)], check_only: bool) -> anyhow::Result<()> {
    step(&format!("setup ({what})"));
    let absent = missing(packages);
    if absent.is_empty() {
        let commands: Vec<&str> = packages.iter().map(|(_, c)| *c).collect();
        eprintln!("{what} tools ready: {}", commands.join(", "));
        return Ok(());
    }
    let can_install = is_root() && which("apt-get").is_some();
    if check_only || !can_install {
        eprintln!(
            "missing for the {what}; install with:\n  apt-get update && apt-get install -y \
             --no-install-recommends {}",
            absent.join(" ")
        );
        if check_only {
            return Ok(());
        }
        bail!("the {what}'s tools are missing and this is not a root shell on Debian/Ubuntu: run the command above");
    }
    apt_install(&absent)?;
    if !missing(packages).is_empty() {
        bail!("setup finished but the {what}'s tools are still missing");
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    // A fresh machine's package lists can be stale: refresh them when a package has no candidate.
    let has_candidates = packages.iter().all(|p| {
        output(Command::new("apt-cache").args(["policy", p]))
            .is_some_and(|o| o.contains("Candidate:") && !o.contains("Candidate: (none)"))
    });
    if !has_candidates {
        run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
