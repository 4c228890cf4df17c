//! Debian kernel packages, fetched through apt with a private state under `target/vm/apt/` (the
//! host's own package state is never touched). The mirror is the one the host's apt
//! configuration uses; a release other than the host's only needs its suite names.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use super::Series;
use crate::util::{output, run, step};

/// Flavours in order of preference: the cloud kernel boots fastest under emulation (lz4, few
/// drivers); the generic one has everything guardian needs too.
const FLAVOURS: [&str; 2] = ["cloud-amd64", "amd64"];
/// Packages tried, newest first, before giving up on a series.
const MAX_TRIES: usize = 4;

/// A kernel image ready to boot.
pub struct Kernel {
    pub package: String,
    pub version: String,
    pub vmlinuz: PathBuf,
}

/// Resolves each series to its newest package and returns its kernel image, downloading only
/// what `target/vm/kernels/` does not hold yet (one version per series is kept).
pub fn fetch(vm_dir: &Path, series: &[&Series]) -> anyhow::Result<Vec<Kernel>> {
    step("kernel packages");
    let mirrors = host_mirrors()?;
    let releases: BTreeSet<&str> = series.iter().map(|s| s.release).collect();
    let mut apts = Vec::new();
    for release in releases {
        let apt = Apt::new(vm_dir, release);
        apt.update(&mirrors)?;
        apts.push(apt);
    }
    series
        .iter()
        .map(|s| {
            let apt = apts
                .iter()
                .find(|a| a.release == s.release)
                .expect("updated above");
            apt.candidates(s.series)
                .and_then(|c| apt.image(vm_dir, s.series, &c))
                .with_context(|| format!("kernel {}", s.series))
        })
        .collect()
}

/// Where the host's apt configuration fetches Debian from.
#[derive(Debug, PartialEq, Eq)]
pub struct Mirrors {
    /// Serves the releases themselves (`bookworm`, `bullseye`).
    pub archive: String,
    /// Serves the security suites (`bookworm-security`), where most kernel updates land.
    pub security: Option<String>,
}

impl Mirrors {
    /// The `deb` lines of a release's main component and its security updates.
    pub fn sources(&self, release: &str) -> Vec<String> {
        let mut lines = vec![format!("deb {} {release} main", self.archive)];
        if let Some(security) = &self.security {
            lines.push(format!("deb {security} {release}-security main"));
        }
        lines
    }
}

/// The host's sources, as apt itself parses them (one-line and deb822 files alike).
pub fn host_mirrors() -> anyhow::Result<Mirrors> {
    let text = output(Command::new("apt-get").args([
        "indextargets",
        "--no-release-info",
        "--format",
        "$(TARGET_OF) $(REPO_URI) $(RELEASE)",
        "Created-By: Packages",
    ]))
    .context("cannot read the host's apt sources (`apt-get indextargets` failed)")?;
    parse_mirrors(&text).context(
        "the host's apt configuration has no `deb` source for a Debian release (a suite like \
         `bookworm`): the guests' packages come from its mirror",
    )
}

/// Parses `TARGET_OF REPO_URI RELEASE` lines.
fn parse_mirrors(text: &str) -> Option<Mirrors> {
    let sources: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["deb", uri, suite] => Some((uri, suite)),
            _ => None,
        })
        .collect();
    let archive = sources
        .iter()
        .find(|(_, suite)| suite.chars().all(|c| c.is_ascii_alphanumeric()))?
        .0;
    let security = sources
        .iter()
        .find(|(_, suite)| suite.ends_with("-security"))
        .map(|(uri, _)| uri.to_string());
    Some(Mirrors {
        archive: archive.to_owned(),
        security,
    })
}

/// apt with its own lists, cache and sources for one Debian release.
struct Apt {
    release: &'static str,
    dir: PathBuf,
}

impl Apt {
    fn new(vm_dir: &Path, release: &'static str) -> Self {
        Self {
            release,
            dir: vm_dir.join("apt").join(release),
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(program);
        for opt in [
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            format!("Dir::Etc::Preferences={}", d("preferences")),
            format!("Dir::Etc::PreferencesParts={}", d("preferences.d")),
            "APT::Architecture=amd64".to_owned(),
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            // As root, apt downloads as `_apt`, which cannot write to a root-owned target/.
            "APT::Sandbox::User=root".to_owned(),
        ] {
            cmd.args(["-o", &opt]);
        }
        cmd
    }

    /// Writes the release's sources and refreshes its package lists.
    fn update(&self, mirrors: &Mirrors) -> anyhow::Result<()> {
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let r = self.release;
        let sources: String = mirrors
            .sources(r)
            .iter()
            .map(|l| l.clone() + "\n")
            .collect();
        fs::write(self.dir.join("sources.list"), &sources)?;
        eprintln!("Debian {r}: refreshing package lists");
        run(self.cmd("apt-get").args(["-qq", "update"])).with_context(|| {
            format!(
                "fetching Debian {r}'s package lists failed (sources taken from the host's apt \
                 configuration, written to {}); check the host's network and apt sources",
                self.dir.join("sources.list").display()
            )
        })
    }

    /// The kernel image packages of a series, newest version first, the preferred flavour first
    /// among equal versions: (name, version).
    fn candidates(&self, series: &str) -> anyhow::Result<Vec<(String, String)>> {
        let pattern = format!("^linux-image-{}[.-]", series.replace('.', "\\."));
        let found = output(
            self.cmd("apt-cache")
                .args(["search", "--names-only", &pattern]),
        )
        .context("`apt-cache search` failed")?;
        let names: Vec<&str> = found
            .lines()
            .filter_map(|l| l.split(' ').next())
            .filter(|n| FLAVOURS.iter().any(|f| is_image_of(n, series, f)))
            .collect();
        if names.is_empty() {
            bail!(
                "Debian {} has no linux-image-{series}.*-{{{}}}-unsigned package",
                self.release,
                FLAVOURS.join(",")
            );
        }
        let table = output(self.cmd("apt-cache").arg("madison").args(&names))
            .context("`apt-cache madison` failed")?;
        let flavour = |name: &str| FLAVOURS.iter().position(|f| is_image_of(name, series, f));
        let mut ranked: Vec<(String, String)> = Vec::new();
        for line in table.lines() {
            let [name, version, ..] = line.split('|').map(str::trim).collect::<Vec<_>>()[..] else {
                continue;
            };
            // Insertion sort: dpkg is the authority on version order, one comparison a call.
            let mut at = ranked.len();
            for (i, (n, v)) in ranked.iter().enumerate() {
                let first = version_gt(version, v)?
                    || (!version_gt(v, version)? && flavour(name) < flavour(n));
                if first {
                    at = i;
                    break;
                }
            }
            ranked.insert(at, (name.to_owned(), version.to_owned()));
        }
        Ok(ranked)
    }

    /// The kernel image of the newest candidate that the cache holds or the mirror serves (a
    /// mirror can list a package whose file it lacks). Other versions leave the cache.
    fn image(
        &self,
        vm_dir: &Path,
        series: &str,
        candidates: &[(String, String)],
    ) -> anyhow::Result<Kernel> {
        let series_dir = vm_dir.join("kernels").join(series);
        let mut failures = Vec::new();
        for (package, version) in candidates.iter().take(MAX_TRIES) {
            let name = format!("{package}_{version}").replace([':', '/'], "_");
            let vmlinuz = series_dir.join(&name).join("vmlinuz");
            if vmlinuz.is_file() {
                eprintln!("kernel {series}: {package} {version} (cached)");
            } else {
                eprintln!("kernel {series}: downloading {package} {version}");
                if let Err(e) = self.download(package, version, &series_dir, &vmlinuz) {
                    eprintln!("kernel {series}: {e:#}; trying the next newest");
                    failures.push(format!("{package} {version}: {e:#}"));
                    continue;
                }
            }
            for entry in fs::read_dir(&series_dir)?.flatten() {
                if entry.file_name() != name.as_str() {
                    fs::remove_dir_all(entry.path())?;
                }
            }
            return Ok(Kernel {
                package: package.clone(),
                version: version.clone(),
                vmlinuz,
            });
        }
        bail!(
            "no kernel package of the series could be downloaded:\n  {}",
            failures.join("\n  ")
        )
    }

    /// Downloads a package and extracts its kernel image to `vmlinuz`.
    fn download(
        &self,
        package: &str,
        version: &str,
        series_dir: &Path,
        vmlinuz: &Path,
    ) -> anyhow::Result<()> {
        let work = series_dir.join("download");
        if work.exists() {
            fs::remove_dir_all(&work)?;
        }
        fs::create_dir_all(&work)?;
        let status = self
            .cmd("apt-get")
            .args(["-qq", "download", &format!("{package}={version}")])
            .current_dir(&work)
            .status()
            .context("starting apt-get")?;
        if !status.success() {
            // apt has printed why (often a mirror listing a file it does not hold).
            bail!("`apt-get download` failed ({status})");
        }
        let deb = only_file(&work, |n| n.ends_with(".deb"))?;
        extract_boot(&deb, &work)?;
        let image = only_file(&work.join("boot"), |n| n.starts_with("vmlinuz-"))?;
        fs::create_dir_all(vmlinuz.parent().expect("has a folder"))?;
        fs::rename(&image, vmlinuz)?;
        fs::remove_dir_all(&work)?;
        Ok(())
    }
}

/// `a > b` in Debian's version order.
fn version_gt(a: &str, b: &str) -> anyhow::Result<bool> {
    Ok(Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .context("running dpkg --compare-versions")?
        .success())
}

/// Whether a package name is the kernel image of `series` in `flavour`:
/// `linux-image-<ABI>-<flavour>-unsigned`, where the ABI (`5.10.0-46`, `6.12.117+deb12`) starts
/// with the series and each `-` part of it starts with a digit (flavours start with a letter, so
/// `6.1.0-56-cloud` is not the generic flavour's ABI).
fn is_image_of(name: &str, series: &str, flavour: &str) -> bool {
    let Some(abi) = name
        .strip_prefix("linux-image-")
        .and_then(|n| n.strip_suffix(&format!("-{flavour}-unsigned")))
    else {
        return false;
    };
    abi.strip_prefix(series)
        .is_some_and(|rest| rest.starts_with(['.', '-']))
        && abi
            .split('-')
            .all(|p| p.starts_with(|c: char| c.is_ascii_digit()))
}

/// The one file in `dir` whose name passes `pred`.
fn only_file(dir: &Path, pred: impl Fn(&str) -> bool) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter(|e| pred(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    if found.len() != 1 {
        bail!(
            "expected one matching file in {}, found {found:?}",
            dir.display()
        );
    }
    Ok(found.remove(0))
}

/// `dpkg-deb --fsys-tarfile DEB | tar -x ./boot`, into `dir`.
fn extract_boot(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    crate::util::pipe(
        Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb),
        Command::new("tar")
            .args(["-x", "-C"])
            .arg(dir)
            .arg("./boot"),
    )
    .with_context(|| format!("extracting ./boot from {}", deb.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_from_the_release_and_security_sources() {
        let text = "deb http://mirror.example/debian/ bookworm\n\
                    deb http://mirror.example/debian/ bookworm-updates\n\
                    deb-src http://mirror.example/debian/ bookworm\n\
                    deb http://mirror.example/debian-security/ bookworm-security\n";
        assert_eq!(
            parse_mirrors(text),
            Some(Mirrors {
                archive: "http://mirror.example/debian/".into(),
                security: Some("http://mirror.example/debian-security/".into()),
            })
        );
        assert_eq!(parse_mirrors("deb http://x.example/ ./\n"), None);
    }

    #[test]
    fn image_names_select_series_and_flavour() {
        let cloud = "cloud-amd64";
        assert!(is_image_of(
            "linux-image-5.10.0-46-cloud-amd64-unsigned",
            "5.10",
            cloud
        ));
        assert!(is_image_of(
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "6.12",
            cloud
        ));
        assert!(!is_image_of(
            "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            "6.1",
            cloud
        ));
        assert!(is_image_of(
            "linux-image-6.1.0-56-amd64-unsigned",
            "6.1",
            "amd64"
        ));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "6.1",
            "amd64"
        ));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-rt-amd64-unsigned",
            "6.1",
            "amd64"
        ));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-cloud-amd64-dbg",
            "6.1",
            cloud
        ));
    }
}
