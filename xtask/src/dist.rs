//! What guardian ships as: `cargo xtask dist`, the Debian package
//! `target/dist/guardian_VERSION_ARCH.deb`, built with `dpkg-deb` from a staged tree (every
//! Debian has dpkg-deb; no cargo-deb needed), and `cargo xtask image`, the container image.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::util::{is_static_elf, output, run, step, which, workspace_root};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The example policy both the package and the Kubernetes ConfigMap are made from.
const EXAMPLE: &str = "policies/analyticbot.toml";
const POLICY: &str = "etc/guardian/policy.toml";
const UNIT: &str = "deploy/systemd/guardian.service";
const CONTAINERFILE: &str = "deploy/kubernetes/Containerfile";
/// Where a Debian package puts what `guardian generate` writes.
const GENERATED: [(&str, &str); 3] = [
    (
        "guardian.bash",
        "usr/share/bash-completion/completions/guardian",
    ),
    ("_guardian", "usr/share/zsh/vendor-completions/_guardian"),
    (
        "guardian.fish",
        "usr/share/fish/vendor_completions.d/guardian.fish",
    ),
];
const MAN_DIR: &str = "usr/share/man/man8";
const DOC_DIR: &str = "usr/share/doc/guardian";

/// The package's conffile opens with this, above [`audit_example`].
const PACKAGE_POLICY_HEADER: &str = "\
# /etc/guardian/policy.toml: guardian's policy. The package installs this example in AUDIT
# mode: guardian decides exactly as in enforce mode and records every decision (`journalctl -u
# guardian -o cat`, `guardian status`), but signals nothing and makes no cgroup, so installing
# it kills nothing. To enforce, once its decisions are the ones you want:
#   1. describe your services below (these are analyticbot's) and set mode = \"enforce\";
#   2. guardian check --policy /etc/guardian/policy.toml
#   3. systemctl reload guardian   (an invalid policy is refused: the one in force stays)
# Keep this file root's and not writable by others: guardian refuses to enforce it otherwise.
# It is a conffile: upgrades of the package keep your changes.
";

/// Builds the package and returns its path.
pub fn run_dist(guardian: &Path) -> anyhow::Result<PathBuf> {
    step("Debian package");
    let arch = debian_arch()?;
    let dist = workspace_root().join("target/dist");
    let name = format!("guardian_{VERSION}_{arch}");
    let stage = dist.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    let sbin = stage.join("usr/sbin/guardian");
    mkdir(sbin.parent().expect("has a parent"))?;
    // Symbols are of no use to users and make up a third of the binary.
    run(Command::new("strip")
        .args(["--strip-unneeded", "-o"])
        .arg(&sbin)
        .arg(guardian))?;
    set_mode(&sbin, 0o755)?;
    install(
        &stage,
        "lib/systemd/system/guardian.service",
        &read(&workspace_root().join(UNIT))?,
    )?;
    install(
        &stage,
        POLICY,
        format!("{PACKAGE_POLICY_HEADER}\n{}", audit_example()?).as_bytes(),
    )?;
    generated_files(&stage, &sbin)?;
    install(
        &stage,
        &format!("{DOC_DIR}/copyright"),
        copyright()?.as_bytes(),
    )?;
    install(
        &stage,
        &format!("{DOC_DIR}/changelog.gz"),
        &gzip(&changelog()?)?,
    )?;
    control(&stage, &sbin)?;

    // The shipped policy must load, and in audit mode.
    let check = Command::new(&sbin)
        .args(["check", "--policy"])
        .arg(stage.join(POLICY))
        .output()
        .context("running `guardian check`")?;
    let summary = String::from_utf8_lossy(&check.stdout);
    if !check.status.success()
        || !summary
            .lines()
            .next()
            .is_some_and(|l| l.contains("mode audit"))
    {
        bail!(
            "the package's policy is invalid or not in audit mode:\n{summary}{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    verify_unit(&dist, &stage)?;

    let deb = dist.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&stage)
        .arg(&deb))?;
    run(Command::new("dpkg-deb").arg("--info").arg(&deb))?;
    run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    if which("lintian").is_some() {
        // Warnings are printed for whoever builds; errors fail the build.
        run(Command::new("lintian")
            .args(["--fail-on", "error"])
            .arg(&deb))?;
    } else {
        eprintln!("lintian is not installed: the package was not linted (apt-get install lintian)");
    }
    eprintln!("built {}", deb.display());
    Ok(deb)
}

/// `cargo xtask image`: the container image's build context, `target/image/` (the statically
/// linked daemon, as the kernel matrix's guests run it), and the image itself with podman or
/// buildah when one is installed.
pub fn image(object: &Path) -> anyhow::Result<()> {
    step("container image");
    let guardian = crate::vm::static_guardian(object)?;
    if !is_static_elf(&guardian)? {
        bail!(
            "{} is dynamically linked: a FROM scratch image has no C library",
            guardian.display()
        );
    }
    let context = workspace_root().join("target/image");
    if context.exists() {
        fs::remove_dir_all(&context)?;
    }
    mkdir(&context)?;
    run(Command::new("strip")
        .args(["--strip-unneeded", "-o"])
        .arg(context.join("guardian"))
        .arg(&guardian))?;
    let containerfile = workspace_root().join(CONTAINERFILE);
    let tag = format!("localhost/guardian:{VERSION}");
    let Some(builder) = ["podman", "buildah"]
        .into_iter()
        .find(|b| which(b).is_some())
    else {
        bail!(
            "neither podman nor buildah is installed: the build context is ready; build it with\n  \
             podman build -f {CONTAINERFILE} --build-arg VERSION={VERSION} -t {tag} {}",
            context.display()
        );
    };
    run(Command::new(builder)
        .arg("build")
        .arg("--build-arg")
        .arg(format!("VERSION={VERSION}"))
        .arg("-f")
        .arg(&containerfile)
        .args(["-t", &tag])
        .arg(&context))?;
    eprintln!("built {tag}");
    Ok(())
}

/// `policies/analyticbot.toml` without its opening comment and in audit mode: the example the
/// package installs and the Kubernetes ConfigMap holds (each under a header of its own).
pub fn audit_example() -> anyhow::Result<String> {
    let text = String::from_utf8(read(&workspace_root().join(EXAMPLE))?)?;
    // The opening comment tells how to run the file from the repository: it goes.
    let body = text
        .split_once("\n\n")
        .filter(|(head, _)| head.lines().all(|l| l.starts_with('#')))
        .map(|(_, body)| body)
        .with_context(|| format!("{EXAMPLE} no longer opens with a comment and a blank line"))?;
    let enforce = "\nmode = \"enforce\"\n";
    if body.matches(enforce).count() != 1 {
        bail!("{EXAMPLE} no longer has one `mode = \"enforce\"` line to turn into audit mode");
    }
    Ok(body.replace(enforce, "\nmode = \"audit\"\n"))
}

/// Debian's name for the architecture the daemon was built for (the eBPF object is built for
/// x86_64 only).
fn debian_arch() -> anyhow::Result<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        other => bail!("no Debian package for {other}: the eBPF object is built for x86_64"),
    }
}

/// guardian(8) and the subcommands' pages, gzipped, and the shell completions, all written by
/// the packaged binary itself.
fn generated_files(stage: &Path, guardian: &Path) -> anyhow::Result<()> {
    let out = stage.parent().expect("has a parent").join("generated");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    mkdir(&out)?;
    run(Command::new(guardian).arg("generate").arg(&out))?;
    let mut pages = 0;
    for entry in fs::read_dir(&out)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".8") {
            let page = gzip(&read(&out.join(&name))?)?;
            install(stage, &format!("{MAN_DIR}/{name}.gz"), &page)?;
            pages += 1;
        } else if !GENERATED.iter().any(|(n, _)| *n == name) {
            bail!("`guardian generate` wrote {name}, which the package does not place");
        }
    }
    if pages == 0 {
        bail!("`guardian generate` wrote no man page");
    }
    for (name, dest) in GENERATED {
        install(stage, dest, &read(&out.join(name))?)?;
    }
    Ok(())
}

/// DEBIAN/: control, conffiles, md5sums and the maintainer scripts.
fn control(stage: &Path, guardian: &Path) -> anyhow::Result<()> {
    let md5sums = output(
        Command::new("find")
            .args([".", "-type", "f", "-exec", "md5sum", "{}", "+"])
            .current_dir(stage),
    )
    .context("md5sum of the staged files failed")?;
    let mut md5sums: Vec<String> = md5sums
        .lines()
        .map(|l| l.replacen("  ./", "  ", 1))
        .collect();
    md5sums.sort_by(|a, b| a[34..].cmp(&b[34..]));
    let installed_kib: u64 = walk_files(stage)?
        .iter()
        .map(|f| Ok(fs::metadata(f)?.len().div_ceil(1024)))
        .sum::<anyhow::Result<u64>>()?;
    let control = format!(
        "Package: guardian
Version: {VERSION}
Architecture: {arch}
Maintainer: {maintainer}
Installed-Size: {installed_kib}
Depends: {depends}
Section: admin
Priority: optional
Description: policy-driven eBPF resource guardian
 guardian watches fork, exec and exit in the kernel (eBPF tracepoints) and
 kills a service's orphaned workers the moment their parent dies: uvicorn,
 Celery, multiprocessing and process-pool workers left behind by a killed
 parent. It also enforces per-service task and memory budgets, and has an
 audit mode that decides the same way and does nothing.
 .
 The package installs the daemon, a hardened systemd unit (neither enabled
 nor started) and an example policy in audit mode.
",
        arch = debian_arch()?,
        maintainer = maintainer()?,
        depends = depends(guardian)?,
    );
    let debian = stage.join("DEBIAN");
    mkdir(&debian)?;
    install(stage, "DEBIAN/control", control.as_bytes())?;
    install(stage, "DEBIAN/conffiles", format!("/{POLICY}\n").as_bytes())?;
    install(
        stage,
        "DEBIAN/md5sums",
        (md5sums.join("\n") + "\n").as_bytes(),
    )?;
    for (script, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = debian.join(script);
        fs::write(&path, text)?;
        set_mode(&path, 0o755)?;
    }
    Ok(())
}

/// The packages providing the shared libraries the binary needs, at the newest symbol version
/// it uses (what dpkg-shlibdeps would say, without needing a debian/ source tree).
fn depends(binary: &Path) -> anyhow::Result<String> {
    let headers = output(Command::new("objdump").arg("-p").arg(binary))
        .context("objdump -p failed (binutils)")?;
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))
        .context("objdump -T failed (binutils)")?;
    let newest = |prefix: &str| {
        symbols
            .split_whitespace()
            // `(GLIBC_2.34)`, or without parentheses for the default version of a symbol.
            .filter_map(|w| w.trim_matches(['(', ')']).strip_prefix(prefix))
            .filter_map(|v| {
                v.split('.')
                    .map(str::parse::<u32>)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
            })
            .max()
            .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join("."))
    };
    let mut depends = Vec::new();
    for lib in headers
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
    {
        let (package, prefix) = match lib.trim() {
            "libc.so.6" | "libm.so.6" | "ld-linux-x86-64.so.2" => ("libc6", "GLIBC_"),
            "libgcc_s.so.1" => ("libgcc-s1", "GCC_"),
            other => bail!("the binary needs {other}: add its Debian package to `depends`"),
        };
        let dep = match newest(prefix) {
            Some(v) => format!("{package} (>= {})", v.trim_end_matches(".0")),
            None => package.to_owned(),
        };
        if !depends.contains(&dep) {
            depends.push(dep);
        }
    }
    depends.sort();
    Ok(depends.join(", "))
}

/// `DEBFULLNAME <DEBEMAIL>` as Debian's tools take it, else git's identity.
fn maintainer() -> anyhow::Result<String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let git = |k: &str| {
        output(
            Command::new("git")
                .args(["config", k])
                .current_dir(workspace_root()),
        )
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
    };
    let name = env("DEBFULLNAME").or_else(|| git("user.name"));
    let email = env("DEBEMAIL").or_else(|| git("user.email"));
    match (name, email) {
        (Some(name), Some(email)) => Ok(format!("{name} <{email}>")),
        _ => {
            bail!("no maintainer: set DEBFULLNAME and DEBEMAIL (or git's user.name and user.email)")
        }
    }
}

fn git(args: &[&str]) -> anyhow::Result<String> {
    output(Command::new("git").args(args).current_dir(workspace_root()))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("git {args:?} failed"))
}

/// A Debian changelog of one entry: the version and the commit it was built from.
fn changelog() -> anyhow::Result<Vec<u8>> {
    let commit = git(&["describe", "--always", "--dirty", "--abbrev=12"])?;
    // The commit's date, not the build's: the same commit gives the same file.
    let date = git(&["log", "-1", "--format=%aD"])?;
    Ok(format!(
        "guardian ({VERSION}) unstable; urgency=medium\n\n  * Built from commit {commit}.\n\n \
         -- {}  {date}\n",
        maintainer()?
    )
    .into_bytes())
}

/// `systemd-analyze verify` on the unit as shipped. It checks that the programs it runs exist:
/// the copy it reads runs the staged binary instead of /usr/sbin/guardian, and `man` looks in
/// the staged pages for `Documentation=man:guardian(8)`.
fn verify_unit(dist: &Path, stage: &Path) -> anyhow::Result<()> {
    if which("systemd-analyze").is_none() {
        eprintln!("SKIPPED: systemd-analyze is not installed: the unit was not verified");
        return Ok(());
    }
    let unit = String::from_utf8(read(&workspace_root().join(UNIT))?)?;
    let staged = stage.join("usr/sbin/guardian");
    let dir = dist.join("verify");
    mkdir(&dir)?;
    let copy = dir.join("guardian.service");
    fs::write(
        &copy,
        unit.replace("=/usr/sbin/guardian ", &format!("={} ", staged.display())),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("MANPATH", stage.join("usr/share/man"))
        .output()
        .context("running systemd-analyze verify")?;
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify {UNIT}:\n{said}");
    }
    eprintln!("systemd-analyze verify {UNIT}: ok");
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&copy),
    )
    .context("systemd-analyze security --offline=true failed")?;
    eprintln!("{}", security.lines().last().unwrap_or_default());
    Ok(())
}

fn install(stage: &Path, rel: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = stage.join(rel);
    mkdir(path.parent().expect("has a parent"))?;
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    set_mode(&path, 0o644)
}

/// Creates a directory and its parents, 0755 whatever the umask.
fn mkdir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for d in dir
        .ancestors()
        .take_while(|d| d.starts_with(workspace_root().join("target/dist")))
    {
        set_mode(d, 0o755)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `gzip -9n`: no name or time stamp in the header, so the same input gives the same bytes.
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-9n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    child.stdin.take().expect("piped").write_all(bytes)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn walk_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(walk_files(&path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

/// Installing guardian neither enables nor starts it: its policy is an example in audit mode,
/// and when guardian runs is the operator's decision (`systemctl enable --now guardian`).
const POSTINST: &str = "#!/bin/sh
set -e
if [ \"$1\" = configure ] && [ -d /run/systemd/system ]; then
\tsystemctl daemon-reload
\t# An upgrade: a running guardian restarts on the new binary (it rebuilds its view from
\t# /proc and finds its cgroups again); a stopped one stays stopped.
\tif [ -n \"$2\" ]; then
\t\tsystemctl try-restart guardian.service
\tfi
fi
";

/// Removal stops guardian before its binary goes, and disables it while its unit file is
/// still there to say what to disable.
const PRERM: &str = "#!/bin/sh
set -e
if [ \"$1\" = remove ] && [ -d /run/systemd/system ]; then
\tsystemctl disable --now guardian.service
fi
";

const POSTRM: &str = "#!/bin/sh
set -e
if { [ \"$1\" = remove ] || [ \"$1\" = purge ]; } && [ -d /run/systemd/system ]; then
\tsystemctl daemon-reload
fi
";

/// The machine-readable copyright file; its years are those of the first and the last commit.
fn copyright() -> anyhow::Result<String> {
    let years = git(&["log", "--format=%ad", "--date=format:%Y"])?;
    let years = match (years.lines().last(), years.lines().next()) {
        (Some(first), Some(last)) if first != last => format!("{first}-{last}"),
        (Some(first), _) => first.to_owned(),
        _ => bail!("git log printed no commit"),
    };
    Ok(COPYRIGHT.replace("{years}", &years))
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: guardian

Files: *
Copyright: {years} the guardian developers
License: MIT or Apache-2.0

License: Apache-2.0
 On Debian systems, the complete text of the Apache License, Version 2.0 can
 be found in `/usr/share/common-licenses/Apache-2.0'.

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the \"Software\"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_analyticbot_in_audit_mode() {
        let example = audit_example().unwrap();
        assert!(example.contains("\nmode = \"audit\"\n"), "{example}");
        assert!(!example.contains("mode = \"enforce\"\n"), "{example}");
        // The repository's how-to-run comment is gone; the services are all there.
        assert!(!example.contains("policies/analyticbot.toml"), "{example}");
        assert_eq!(example.matches("[[service]]").count(), 3, "{example}");
    }
}
