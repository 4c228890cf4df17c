//! The systemd guest's Debian 12 root filesystem, built by mmdebstrap from the mirror of the
//! host's apt configuration and packed as an initramfs: Debian's kernels keep `virtio_blk` and
//! ext4 as modules, so the whole root filesystem as the initramfs boots with no disk and no
//! initrd of its own. Cached under `target/systemd/` with the recipe it was built from; a
//! changed recipe builds it again (about 30 s).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{
    util::{is_root, run, step},
    vm::kernel::host_mirrors,
};

pub const RELEASE: &str = "bookworm";
/// systemd as pid 1 (`systemctl` needs dbus), Python and uvicorn for the seed's services, and
/// supervisord for its other setup.
const PACKAGES: [&str; 5] = [
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-uvicorn",
    "supervisor",
];
/// Files no test reads; the guest's kernel would unpack them at every boot.
const EXCLUDED: [&str; 4] = [
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
];

/// The root filesystem as an uncompressed newc archive (the kernel copies it faster than it
/// would decompress it under emulation), built unless the cache holds one of the same recipe.
pub fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    step(&format!("Debian {RELEASE} root filesystem"));
    let archive = dir.join("rootfs.cpio");
    let recipe_file = dir.join("rootfs.recipe");
    let options = options();
    // The mirror is not part of the recipe: any mirror serves the same release.
    let recipe = format!("{}\n", options.join("\n"));
    if archive.is_file() && fs::read_to_string(&recipe_file).ok().as_deref() == Some(&recipe) {
        eprintln!("{} (cached)", archive.display());
        return Ok(archive);
    }
    if !is_root() {
        bail!("building the guest's root filesystem needs root (mmdebstrap's root mode, files only root reads)");
    }
    fs::create_dir_all(dir)?;
    let tree = dir.join("rootfs");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let _ = fs::remove_file(&recipe_file);
    let sources = host_mirrors()?.sources(RELEASE);
    run(Command::new("mmdebstrap")
        .args(&options)
        .arg(RELEASE)
        .arg(&tree)
        .args(&sources))
    .context("mmdebstrap failed (its output above says why)")?;
    let partial = dir.join("rootfs.cpio.partial");
    pack(&tree, fs::File::create(&partial)?)?;
    fs::rename(&partial, &archive)?;
    fs::remove_dir_all(&tree)?;
    fs::write(&recipe_file, recipe)?;
    eprintln!(
        "{} ({} MiB)",
        archive.display(),
        fs::metadata(&archive)?.len() >> 20
    );
    Ok(archive)
}

/// mmdebstrap's options: everything about the tree but its suite, target and mirror.
fn options() -> Vec<String> {
    let mut options = vec![
        "--variant=minbase".to_owned(),
        format!("--include={}", PACKAGES.join(",")),
        "--format=directory".to_owned(),
    ];
    options.extend(
        EXCLUDED
            .iter()
            .map(|p| format!("--dpkgopt=path-exclude={p}")),
    );
    options
}

/// `find . | cpio -o -H newc` in `tree`, as root, written to `out` (a file opened for appending
/// gets it after what it holds): the archive keeps owners, modes, devices and hard links.
pub fn pack(tree: &Path, out: fs::File) -> anyhow::Result<()> {
    crate::util::pipe(
        Command::new("find")
            .args([".", "-print0"])
            .current_dir(tree),
        Command::new("cpio")
            .args(["--null", "--create", "--format=newc", "--quiet"])
            .current_dir(tree)
            .stdout(out),
    )
    .with_context(|| format!("packing {}", tree.display()))
}
