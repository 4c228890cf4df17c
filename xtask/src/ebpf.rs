//! Building the eBPF object: finds a toolchain that can compile `core` for bpfel-unknown-none and
//! the bpf-linker, and builds `guardian-ebpf` with it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::util::{output, run, step, tools_dir, which, workspace_root};

pub const TARGET: &str = "bpfel-unknown-none";
/// Debian's Rust with a prebuilt `core` for BPF (packages rustc-web, libstd-rust-web-dev-bpf).
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_BPF_CORE_DIR: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const RUSTFLAGS: &str = "--cfg bpf_target_arch=\"x86_64\" -Cdebuginfo=2 -Clink-arg=--btf";

/// A toolchain that can build the eBPF crate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// rustup's nightly with the rust-src component: builds `core` itself.
    RustupNightly,
    /// Debian's rustc-web with its prebuilt BPF `core`.
    Debian,
}

impl Toolchain {
    pub fn detect() -> Option<Self> {
        if rustup_nightly_has_rust_src() {
            Some(Self::RustupNightly)
        } else if debian_has_bpf_core() {
            Some(Self::Debian)
        } else {
            None
        }
    }
}

fn rustup_nightly_has_rust_src() -> bool {
    let Some(sysroot) =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
    else {
        return false;
    };
    Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}

pub fn debian_has_bpf_core() -> bool {
    Path::new(DEBIAN_RUSTC).is_file()
        && Path::new(DEBIAN_CARGO).is_file()
        && fs::read_dir(DEBIAN_BPF_CORE_DIR)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
            })
            .unwrap_or(false)
}

/// bpf-linker from the project's tool folder, or from PATH.
pub fn bpf_linker() -> Option<PathBuf> {
    let local = tools_dir().join("bin/bpf-linker");
    if local.is_file() {
        return Some(local);
    }
    which("bpf-linker")
}

/// PATH with the bpf-linker's folder first.
fn path_with_linker(linker: &Path) -> std::ffi::OsString {
    let mut dirs = vec![linker.parent().expect("linker has a folder").to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries are valid")
}

/// A command for the chosen toolchain's cargo, cleaned of the variables that rustup and the
/// outer cargo set (they would point the inner build at the wrong compiler).
fn ebpf_cargo(tc: &Toolchain, linker: &Path) -> Command {
    let mut cmd = match tc {
        Toolchain::RustupNightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo"]);
            c
        }
        Toolchain::Debian => {
            let mut c = Command::new(DEBIAN_CARGO);
            c.env("RUSTC", DEBIAN_RUSTC);
            // aya-ebpf uses an unstable feature; Debian's stable compiler allows it with this.
            c.env("RUSTC_BOOTSTRAP", "1");
            c
        }
    };
    for var in [
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    if *tc != Toolchain::Debian {
        cmd.env_remove("RUSTC");
    }
    cmd.env("PATH", path_with_linker(linker));
    cmd.env("RUSTFLAGS", RUSTFLAGS);
    cmd.current_dir(workspace_root().join("guardian-ebpf"));
    cmd
}

/// Builds the eBPF object and returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    step("build eBPF object");
    let Some(tc) = Toolchain::detect() else {
        bail!("no toolchain can build the eBPF program; run `cargo xtask setup` (as root) or see the README");
    };
    let Some(linker) = bpf_linker() else {
        bail!("bpf-linker not found; run `cargo xtask setup` (as root) or see the README");
    };
    let target_dir = workspace_root().join("target/ebpf");
    let mut cmd = ebpf_cargo(&tc, &linker);
    cmd.args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    if tc == Toolchain::RustupNightly {
        cmd.args(["-Z", "build-std=core"]);
    }
    eprintln!("toolchain: {tc:?}, linker: {}", linker.display());
    run(&mut cmd)?;
    let object = target_dir.join(TARGET).join("release/guardian");
    check_object(&object)?;
    Ok(object)
}

/// The object must be a BPF ELF file (EM_BPF = 247).
fn check_object(path: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < 20
        || &bytes[..4] != b"\x7fELF"
        || u16::from_le_bytes([bytes[18], bytes[19]]) != 247
    {
        bail!("{} is not a BPF ELF object", path.display());
    }
    Ok(())
}

/// Lints the eBPF crate. Clippy runs for the host target: the lints are the same and no BPF
/// toolchain ships clippy.
pub fn clippy() -> anyhow::Result<()> {
    run(crate::util::cargo()
        .args(["clippy", "--manifest-path"])
        .arg(workspace_root().join("guardian-ebpf/Cargo.toml"))
        .arg("--target-dir")
        .arg(workspace_root().join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]))
}
