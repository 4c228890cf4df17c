//! Small helpers for running commands.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// The repository root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// The folder of tools the project installs for itself (bpf-linker).
pub fn tools_dir() -> PathBuf {
    workspace_root().join(".tools")
}

/// The cargo that runs xtask (rustup's, for the userspace crates).
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command and fails with its command line if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Runs `producer | consumer` and fails unless both succeed.
pub fn pipe(producer: &mut Command, consumer: &mut Command) -> anyhow::Result<()> {
    let mut first = producer
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {producer:?}"))?;
    let second = consumer
        .stdin(first.stdout.take().expect("piped"))
        .status()
        .with_context(|| format!("starting {consumer:?}"));
    let first = first.wait()?;
    let second = second?;
    if !first.success() || !second.success() {
        bail!("{producer:?} ({first}) | {consumer:?} ({second}) failed");
    }
    Ok(())
}

/// Runs a command and returns its stdout if it succeeds.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a step header.
pub fn step(name: &str) {
    eprintln!("\n==> {name}");
}

/// Whether an ELF executable runs without a dynamic loader (it has no `PT_INTERP` header).
pub fn is_static_elf(path: &Path) -> anyhow::Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> anyhow::Result<u64> {
        let b = bytes
            .get(at..at + len)
            .with_context(|| format!("{} is truncated", path.display()))?;
        Ok(b.iter().rev().fold(0, |acc, &x| (acc << 8) | u64::from(x)))
    };
    // 64-bit little-endian ELF only: the guests are x86_64.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let (phoff, phentsize, phnum) = (field(32, 8)?, field(54, 2)?, field(56, 2)?);
    for i in 0..phnum {
        const PT_INTERP: u64 = 3;
        if field((phoff + i * phentsize) as usize, 4)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}
