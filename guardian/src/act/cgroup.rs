//! Service cgroups for `cgroup = "own"`: created under `cgroup_parent`, limits written, kernel
//! counters read, removed once empty.
//!
//! Two layouts are supported: the unified hierarchy (cgroup v2) with the `memory` and `pids`
//! controllers, and the v1 `memory` and `pids` hierarchies (hybrid hosts keep those on v1). A
//! service with a `cpu_max` also needs the `cpu` controller: on v2 in the same hierarchy, on v1
//! its own (often `cpu,cpuacct`), where the service gets a third directory.
//!
//! guardian runs as root, and the names it uses come from a policy and from `/proc`: every access
//! goes through file descriptors so that none can lead outside the cgroup mount. Each
//! hierarchy's mount point is opened once and checked to be cgroupfs (`fstatfs`); below it, one
//! plain name at a time is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` relative to its parent's fd (before Linux 5.6, which
//! lacks openat2: `openat(O_NOFOLLOW)` and a same-device check), directories are made with
//! `mkdirat` and removed with `unlinkat` on the parent's fd, and files are written through the
//! service directory's fd, kept for the cgroup's life.
//!
//! Ownership: an existing directory on the way is used only if root owns it. Directories guardian
//! creates carry the extended attribute [`MARK`] (only root can set `trusted.*`), so that after
//! a restart guardian tells its own cgroups (reused, and removed once empty) from the
//! operator's (used, never removed).

use std::{
    fs,
    io::{self, Read as _},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use rustix::{
    event::{eventfd, EventfdFlags},
    fs::{
        fgetxattr_query, fsetxattr, fstat, fstatfs, inotify, mkdirat, open, openat, openat2,
        statat, unlinkat, AtFlags, FileType, Mode, OFlags, ResolveFlags, XattrFlags,
    },
    io::Errno,
};
use thiserror::Error;
use tracing::warn;

use crate::policy::{Budget, Budgets, CPU_PERIOD_US};

/// `statfs` type of a cgroup v1 hierarchy.
const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;
/// `statfs` type of the cgroup v2 hierarchy.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// The extended attribute on every directory guardian creates: the service's name on a service
/// directory, [`PARENT_MARK`] on the parents made for it. Only root can set `trusted.*`
/// attributes, so a marked directory was made by a root process.
pub const MARK: &str = "trusted.guardian";
const PARENT_MARK: &str = "parent";

/// How every name below a mount point is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// Set once openat2 turned out to be missing (ENOSYS); said once.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);
/// Set once a mark could not be written; said once.
static NO_XATTR: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy with the memory and pids controllers is mounted (cgroup v2 with \
         both enabled, or the v1 memory and pids hierarchies)"
    )]
    NoControllers,
    #[error(
        "no cpu controller for `cpu_max`: cgroup v2 has no `cpu` in cgroup.controllers, and no \
         v1 cpu hierarchy is mounted"
    )]
    NoCpu,
    #[error(
        "`{path}` was set up without the cpu controller (its service had no `cpu_max` then): a \
         cpu_max applies once the service's processes have ended and it starts again"
    )]
    NoCpuInCgroup { path: PathBuf },
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{value}` to `{path}`")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup `{path}`")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{path}` is not a cgroup filesystem (statfs type {fs_type:#x}, expected {expected:#x})"
    )]
    NotCgroupfs {
        path: PathBuf,
        fs_type: u64,
        expected: u64,
    },
    #[error("refused cgroup path `{path}`: `{component}` is not a plain directory name")]
    BadName { path: String, component: String },
    #[error("refused `{path}`: a symbolic link or another mount where a cgroup directory belongs")]
    NotBeneath { path: PathBuf },
    #[error(
        "refused `{path}`: owned by uid {uid}, not root; guardian writes nothing into a cgroup \
         another user controls"
    )]
    Owner { path: PathBuf, uid: u32 },
}

/// The lines of `/proc/PID/cgroup` ("ID:controllers:path") as (controllers, path); the v2
/// line has no controllers.
pub fn entries(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        Some((parts.next()?, parts.next()?))
    })
}

/// The hierarchies guardian uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2, mounted here, with `memory` and `pids` available, and `cpu` if `cpu`.
    V2 { mount: Hierarchy, cpu: bool },
    /// cgroup v1 `memory` and `pids` hierarchies, and the `cpu` one if mounted.
    V1 {
        memory: Hierarchy,
        pids: Hierarchy,
        cpu: Option<Hierarchy>,
    },
}

/// A mounted hierarchy: where it is mounted, which cgroup path the mount shows at its top
/// (`/` unless inside a container), and guardian's own cgroup in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub mount_root: String,
    pub own: String,
}

impl Hierarchy {
    /// The directory names, below the mount point, of a cgroup path (as in `/proc/PID/cgroup`).
    fn names<'a>(&self, cgroup: &'a str) -> impl Iterator<Item = &'a str> {
        let root = self.mount_root.trim_end_matches('/');
        let rel = match cgroup.strip_prefix(root) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => cgroup,
        };
        rel.split('/').filter(|n| !n.is_empty())
    }
}

impl Layout {
    /// Reads this process's mounts and cgroups.
    pub fn detect() -> Result<Self, CgroupError> {
        let read = |p: &str| {
            fs::read_to_string(p).map_err(|source| CgroupError::Read {
                path: p.into(),
                source,
            })
        };
        Self::from_proc(
            &read("/proc/self/mountinfo")?,
            &read("/proc/self/cgroup")?,
            |p| fs::read_to_string(p).ok(),
        )
    }

    /// Detection from the text of `/proc/self/mountinfo` and `/proc/self/cgroup`; `read` reads
    /// a file of a mounted hierarchy (cgroup v2's `cgroup.controllers`).
    pub fn from_proc(
        mountinfo: &str,
        cgroup: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Result<Self, CgroupError> {
        let own = |controller: &str| -> Option<String> {
            entries(cgroup).find_map(|(ctrls, path)| {
                let hit = if controller.is_empty() {
                    ctrls.is_empty()
                } else {
                    ctrls.split(',').any(|c| c == controller)
                };
                hit.then(|| path.to_owned())
            })
        };
        // mountinfo: id parent major:minor root mount-point options ... - fstype source super-options
        let mounts: Vec<(String, PathBuf, String, String)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                let pre: Vec<&str> = pre.split_whitespace().collect();
                let post: Vec<&str> = post.split_whitespace().collect();
                Some((
                    pre.get(3)?.to_string(),
                    PathBuf::from(pre.get(4)?),
                    post.first()?.to_string(),
                    post.get(2).unwrap_or(&"").to_string(),
                ))
            })
            .collect();
        if let Some((root, mount, _, _)) = mounts.iter().find(|m| m.2 == "cgroup2") {
            let controllers = read(&mount.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                return Ok(Self::V2 {
                    mount: Hierarchy {
                        mount: mount.clone(),
                        mount_root: root.clone(),
                        own: own("").unwrap_or_else(|| "/".into()),
                    },
                    cpu: has("cpu"),
                });
            }
        }
        let v1 = |controller: &str| {
            mounts
                .iter()
                .find(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == controller))
                .map(|(root, mount, _, _)| Hierarchy {
                    mount: mount.clone(),
                    mount_root: root.clone(),
                    own: own(controller).unwrap_or_else(|| "/".into()),
                })
        };
        match (v1("memory"), v1("pids")) {
            (Some(memory), Some(pids)) => Ok(Self::V1 {
                memory,
                pids,
                cpu: v1("cpu"),
            }),
            _ => Err(CgroupError::NoControllers),
        }
    }

    /// Whether `cpu_max` can be written: the cpu controller is available.
    pub fn has_cpu(&self) -> bool {
        match self {
            Self::V2 { cpu, .. } => *cpu,
            Self::V1 { cpu, .. } => cpu.is_some(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::V2 { .. } => "v2",
            Self::V1 { .. } => "v1",
        }
    }
}

/// Whether `name` is a directory name that stays where it is put.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Opens `name`, a plain name, in the directory `dir` (on the device `dev`): never through a
/// symlink, never onto another mount, never above `dir`.
fn open_beneath(
    dir: BorrowedFd<'_>,
    dev: u64,
    name: &str,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    if !plain_name(name) {
        return Err(Errno::INVAL);
    }
    let flags = flags | OFlags::CLOEXEC;
    // EAGAIN: the kernel could not rule out a race with a rename; it may be retried.
    for _ in 0..3 {
        if NO_OPENAT2.load(Ordering::Relaxed) {
            break;
        }
        match openat2(dir, name, flags, Mode::empty(), RESOLVE) {
            Err(Errno::AGAIN) => continue,
            Err(Errno::NOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                warn!(
                    "openat2 is unavailable (Linux < 5.6): cgroup directories are opened one name \
                     at a time with O_NOFOLLOW and a same-device check instead"
                );
            }
            other => return other,
        }
    }
    open_beneath_compat(dir, dev, name, flags)
}

/// [`open_beneath`] without openat2: `name` is one plain name, so O_NOFOLLOW refuses a symlink
/// and a device check refuses another mount (a bind mount of the same hierarchy passes, which
/// openat2's RESOLVE_NO_XDEV would refuse; it still leads only into that hierarchy).
fn open_beneath_compat(
    dir: BorrowedFd<'_>,
    dev: u64,
    name: &str,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    let fd = match openat(dir, name, flags | OFlags::NOFOLLOW, Mode::empty()) {
        Ok(fd) => fd,
        // O_NOFOLLOW with O_DIRECTORY fails on a symlink with ENOTDIR: say what openat2 would.
        Err(Errno::NOTDIR)
            if statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink) =>
        {
            return Err(Errno::LOOP)
        }
        Err(e) => return Err(e),
    };
    if fstat(&fd)?.st_dev != dev {
        return Err(Errno::XDEV);
    }
    Ok(fd)
}

/// Reads a file of the directory `dir`.
fn read_at(dir: BorrowedFd<'_>, dev: u64, file: &str) -> rustix::io::Result<String> {
    let fd = open_beneath(dir, dev, file, OFlags::RDONLY)?;
    let mut text = String::new();
    fs::File::from(fd)
        .read_to_string(&mut text)
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    Ok(text)
}

/// Writes a file of the directory `dir` in one write(2), as cgroupfs expects.
fn write_at(dir: BorrowedFd<'_>, dev: u64, file: &str, value: &str) -> rustix::io::Result<()> {
    let fd = open_beneath(dir, dev, file, OFlags::WRONLY | OFlags::TRUNC)?;
    if rustix::io::write(&fd, value.as_bytes())? != value.len() {
        return Err(Errno::IO);
    }
    Ok(())
}

/// The error for a directory that cannot be opened.
fn open_error(path: PathBuf, e: Errno) -> CgroupError {
    match e {
        // RESOLVE_NO_SYMLINKS / O_NOFOLLOW, and RESOLVE_NO_XDEV / the device check.
        Errno::LOOP | Errno::XDEV => CgroupError::NotBeneath { path },
        _ => CgroupError::Open {
            path,
            source: e.into(),
        },
    }
}

/// Marks a directory guardian created. Without extended attributes (or the right to set
/// `trusted.*`) guardian works as before marks existed: what it creates is removed by the same
/// run, and after a restart counts as the operator's.
fn mark(fd: &OwnedFd, value: &str) {
    if let Err(e) = fsetxattr(fd, MARK, value.as_bytes(), XattrFlags::empty()) {
        if !NO_XATTR.swap(true, Ordering::Relaxed) {
            warn!(
                "cannot set `{MARK}` on the cgroups guardian creates ({e}): they are removed by \
                 this run only; after a restart they count as the operator's and are kept"
            );
        }
    }
}

fn marked(fd: &OwnedFd) -> bool {
    fgetxattr_query(fd, MARK).is_ok()
}

/// A hierarchy's mount point, opened once.
#[derive(Debug)]
struct Mount {
    fd: OwnedFd,
    path: PathBuf,
    dev: u64,
}

/// The hierarchies of a [`Layout`], opened and checked to be cgroupfs.
#[derive(Debug)]
pub struct Cgroupfs {
    layout: Layout,
    /// v2: the unified mount; v1: the memory mount, the pids mount, then the cpu mount if any.
    mounts: Vec<Mount>,
    /// Who must own an existing directory for guardian to use it: root.
    owner: u32,
}

impl Cgroupfs {
    /// Opens each hierarchy's mount point and checks that it is the cgroup filesystem its layout
    /// says (v1 or v2).
    pub fn open(layout: Layout) -> Result<Self, CgroupError> {
        Self::open_checked(layout, |expected, found| expected == found, 0)
    }

    /// Unit tests stand a scratch directory (any filesystem, owned by whoever runs them) in for
    /// cgroupfs: the filesystem type check is skipped (it has its own test on the real mounts),
    /// and directories must be owned by the test's user instead of root.
    #[cfg(test)]
    pub(crate) fn open_scratch(layout: Layout) -> Result<Self, CgroupError> {
        Self::open_checked(layout, |_, _| true, rustix::process::geteuid().as_raw())
    }

    fn open_checked(
        layout: Layout,
        fs_ok: fn(u64, u64) -> bool,
        owner: u32,
    ) -> Result<Self, CgroupError> {
        let (expected, hierarchies) = match &layout {
            Layout::V2 { mount, .. } => (CGROUP2_SUPER_MAGIC, vec![mount]),
            Layout::V1 { memory, pids, cpu } => (
                CGROUP_SUPER_MAGIC,
                [memory, pids].into_iter().chain(cpu).collect(),
            ),
        };
        let mut mounts = Vec::new();
        for h in hierarchies {
            let path = h.mount.clone();
            let fd = open(
                &path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| open_error(path.clone(), e))?;
            let fs_type = fstatfs(&fd)
                .map_err(|e| open_error(path.clone(), e))?
                .f_type as u64;
            if !fs_ok(expected, fs_type) {
                return Err(CgroupError::NotCgroupfs {
                    path,
                    fs_type,
                    expected,
                });
            }
            let dev = fstat(&fd).map_err(|e| open_error(path.clone(), e))?.st_dev;
            mounts.push(Mount { fd, path, dev });
        }
        Ok(Self {
            layout,
            mounts,
            owner,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// The limit files a budget writes, and the values it writes there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub budget: Budget,
    /// The budget's value: tasks, bytes, or CPU µs per [`CPU_PERIOD_US`].
    pub value: u64,
    /// Which of the cgroup's directories the files are in, and its path.
    dir: usize,
    dir_path: PathBuf,
    /// The files, in the order they are written, with what each gets.
    writes: Vec<(&'static str, String)>,
}

impl Limit {
    /// `memory.max=209715200 to /sys/fs/cgroup/.../memory.max`, one such part per file.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .writes
            .iter()
            .map(|(file, value)| {
                format!("{file}={value} to {}", self.dir_path.join(file).display())
            })
            .collect();
        parts.join(", then ")
    }
}

/// The budgets a service sets, in the order their limits are written.
pub fn budget_values(b: &Budgets) -> impl Iterator<Item = (Budget, u64)> {
    [
        (Budget::TasksMax, b.tasks_max),
        (Budget::MemoryMax, b.memory_max),
        (Budget::MemoryHigh, b.memory_high),
        (Budget::CpuMax, b.cpu_max),
    ]
    .into_iter()
    .filter_map(|(budget, value)| value.map(|v| (budget, v)))
}

/// Counters the kernel keeps for a service cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Forks refused by `pids.max` (`pids.events` `max`).
    pub pids_max: u64,
    /// Processes killed by the kernel's OOM killer inside the cgroup.
    pub oom_kills: u64,
    /// Times usage went over `memory.high` (v2 only).
    pub high: u64,
}

/// Resolves `cgroup_parent` in one hierarchy: absolute from its root, relative below guardian's
/// own cgroup.
fn parent_path(h: &Hierarchy, parent: &str) -> String {
    if parent.starts_with('/') {
        parent.to_owned()
    } else {
        format!("{}/{parent}", h.own.trim_end_matches('/'))
    }
}

/// A service directory in one hierarchy, by name: nothing opened yet.
#[derive(Clone, Debug)]
struct PlannedDir {
    /// Index into [`Cgroupfs`]'s mounts.
    mount: usize,
    /// For messages.
    path: PathBuf,
    /// The directory names below the mount, the service's last.
    names: Vec<String>,
}

/// The controllers of a service cgroup, numbered as its v1 directories are.
#[derive(Clone, Copy)]
enum Controller {
    Memory = 0,
    Pids = 1,
    Cpu = 2,
}

/// Where a service's cgroup goes, checked to be plain names below each mount point.
#[derive(Clone, Debug)]
pub struct Plan {
    v2: bool,
    /// Whether the cgroup has the cpu controller: only for a service with a `cpu_max` (a cpu
    /// cgroup of its own would change how the service shares the CPUs even without a quota).
    cpu: bool,
    service: String,
    /// v2: one directory; v1: the memory one, the pids one, then the cpu one if `cpu`.
    dirs: Vec<PlannedDir>,
}

impl Plan {
    /// The cgroup of service `name`, with budgets `b`, under `parent`. A name that is not a
    /// plain directory name (`..`, `.`, a `/` in the service name) is refused before anything is
    /// opened, and so is a `cpu_max` where there is no cpu controller.
    pub fn new(
        layout: &Layout,
        parent: &str,
        name: &str,
        b: &Budgets,
    ) -> Result<Self, CgroupError> {
        let bad = |path: String, component: &str| CgroupError::BadName {
            path,
            component: component.to_owned(),
        };
        if !plain_name(name) {
            return Err(bad(format!("{parent}/{name}"), name));
        }
        let cpu = b.cpu_max.is_some();
        if cpu && !layout.has_cpu() {
            return Err(CgroupError::NoCpu);
        }
        let dir = |mount: usize, h: &Hierarchy| -> Result<PlannedDir, CgroupError> {
            let cgroup = format!("{}/{name}", parent_path(h, parent));
            let names: Vec<String> = h.names(&cgroup).map(str::to_owned).collect();
            if let Some(n) = names.iter().find(|n| !plain_name(n)) {
                return Err(bad(cgroup.clone(), n));
            }
            Ok(PlannedDir {
                mount,
                path: names.iter().fold(h.mount.clone(), |p, n| p.join(n)),
                names,
            })
        };
        let (v2, dirs) = match layout {
            Layout::V2 { mount, .. } => (true, vec![dir(0, mount)?]),
            Layout::V1 {
                memory,
                pids,
                cpu: cpu_hierarchy,
            } => {
                let mut dirs = vec![dir(0, memory)?, dir(1, pids)?];
                if let Some(h) = cpu_hierarchy.as_ref().filter(|_| cpu) {
                    dirs.push(dir(2, h)?);
                }
                (false, dirs)
            }
        };
        Ok(Self {
            v2,
            cpu,
            service: name.to_owned(),
            dirs,
        })
    }

    /// Which directory holds a controller's files: the only one on v2.
    fn dir_of(&self, c: Controller) -> usize {
        if self.v2 {
            0
        } else {
            c as usize
        }
    }

    /// The directories this cgroup consists of.
    pub fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    /// The limits budgets `b` set, in the order they are written. A `cpu_max` needs a cgroup
    /// planned with one (the cpu controller is only there for such a service).
    pub fn limits(&self, b: &Budgets) -> Result<Vec<Limit>, CgroupError> {
        if b.cpu_max.is_some() && !self.cpu {
            return Err(CgroupError::NoCpuInCgroup {
                path: self.dirs[0].path.clone(),
            });
        }
        let (max_file, high_file) = if self.v2 {
            ("memory.max", "memory.high")
        } else {
            // v1 has no throttling `high`; the soft limit is its nearest equivalent (reclaim
            // target under pressure). guardian enforces memory_high itself either way.
            ("memory.limit_in_bytes", "memory.soft_limit_in_bytes")
        };
        Ok(budget_values(b)
            .map(|(budget, value)| {
                let (controller, writes) = match budget {
                    Budget::TasksMax => (Controller::Pids, vec![("pids.max", value.to_string())]),
                    Budget::MemoryMax => (Controller::Memory, vec![(max_file, value.to_string())]),
                    Budget::MemoryHigh => {
                        (Controller::Memory, vec![(high_file, value.to_string())])
                    }
                    Budget::CpuMax if self.v2 => (
                        Controller::Cpu,
                        vec![("cpu.max", format!("{value} {CPU_PERIOD_US}"))],
                    ),
                    // The period first: the quota is checked against it.
                    Budget::CpuMax => (
                        Controller::Cpu,
                        vec![
                            ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                            ("cpu.cfs_quota_us", value.to_string()),
                        ],
                    ),
                };
                let dir = self.dir_of(controller);
                Limit {
                    budget,
                    value,
                    dir,
                    dir_path: self.dirs[dir].path.clone(),
                    writes,
                }
            })
            .collect())
    }

    /// Opens each directory from the mount point down, creating (and marking) those missing.
    /// An existing directory not owned by root is refused; a refusal or error removes what this
    /// call created. On v2, the memory and pids controllers (and cpu, if planned) are enabled on
    /// the way down.
    pub fn create(self, fs: &Cgroupfs) -> Result<ServiceCgroup, CgroupError> {
        let mut cg = ServiceCgroup {
            plan: self,
            dirs: Vec::new(),
        };
        let built = cg.open_dirs(fs).and_then(|()| cg.enable_controllers());
        match built {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove_dirs();
                Err(e)
            }
        }
    }
}

/// Who a directory of a service cgroup belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// This guardian created it.
    Created,
    /// Found root-owned and marked: guardian's, from an earlier run. Removed once empty.
    Marked,
    /// Found root-owned and unmarked: the operator's. Used, never removed.
    Operator,
}

/// One opened directory on the way from a mount point to a service directory.
#[derive(Debug)]
struct Level {
    name: String,
    fd: OwnedFd,
    origin: Origin,
}

/// A service directory in one hierarchy, opened.
#[derive(Debug)]
struct OpenDir {
    /// The mount point (the first level's parent).
    top: OwnedFd,
    dev: u64,
    /// From below the mount point down to the service directory.
    levels: Vec<Level>,
}

impl OpenDir {
    /// The service directory (all levels are opened before an `OpenDir` is used).
    fn fd(&self) -> BorrowedFd<'_> {
        self.levels
            .last()
            .map_or(self.top.as_fd(), |l| l.fd.as_fd())
    }

    fn parent_of(&self, level: usize) -> BorrowedFd<'_> {
        match level {
            0 => self.top.as_fd(),
            n => self.levels[n - 1].fd.as_fd(),
        }
    }

    /// Opens `names` one below the other from the mount point, creating (and marking) those
    /// missing; an existing one must be owned by [`Cgroupfs`]'s owner (root).
    fn open_levels(
        &mut self,
        fs: &Cgroupfs,
        mount: &Path,
        names: &[String],
        service: &str,
    ) -> Result<(), CgroupError> {
        let mut path = mount.to_path_buf();
        for (i, name) in names.iter().enumerate() {
            path.push(name);
            let parent = self.parent_of(i);
            let created = match mkdirat(parent, name.as_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => {
                    return Err(CgroupError::Create {
                        path,
                        source: e.into(),
                    })
                }
            };
            let fd = open_beneath(parent, self.dev, name, OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(|e| open_error(path.clone(), e))?;
            let origin = if created {
                let last = i + 1 == names.len();
                mark(&fd, if last { service } else { PARENT_MARK });
                Origin::Created
            } else {
                let uid = fstat(&fd).map_err(|e| open_error(path.clone(), e))?.st_uid;
                if uid != fs.owner {
                    return Err(CgroupError::Owner { path, uid });
                }
                if marked(&fd) {
                    Origin::Marked
                } else {
                    Origin::Operator
                }
            };
            self.levels.push(Level {
                name: name.clone(),
                fd,
                origin,
            });
        }
        Ok(())
    }

    fn read(&self, file: &str) -> rustix::io::Result<String> {
        read_at(self.fd(), self.dev, file)
    }

    fn write(&self, file: &str, value: &str) -> rustix::io::Result<()> {
        write_at(self.fd(), self.dev, file, value)
    }

    /// Removes the directories guardian owns, deepest first, down to the first one that is the
    /// operator's or cannot go (not empty, another service's cgroup in it). Returns whether the
    /// service directory is gone or is not guardian's to remove.
    fn remove(&mut self) -> bool {
        let mut service = true;
        while let Some(i) = self.levels.len().checked_sub(1) {
            let removed = self.levels[i].origin != Origin::Operator && self.remove_level(i);
            if !removed {
                let done = !service || self.levels[i].origin == Origin::Operator;
                if done {
                    self.levels.clear();
                }
                return done;
            }
            self.levels.pop();
            service = false;
        }
        true
    }

    /// `unlinkat(parent, name, AT_REMOVEDIR)`, once the name is checked to still be the
    /// directory opened (a directory renamed away and replaced is not removed).
    fn remove_level(&self, i: usize) -> bool {
        let level = &self.levels[i];
        let parent = self.parent_of(i);
        let same = match open_beneath(
            parent,
            self.dev,
            &level.name,
            OFlags::RDONLY | OFlags::DIRECTORY,
        ) {
            Ok(now) => match (fstat(&now), fstat(&level.fd)) {
                (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
                _ => false,
            },
            // Already gone (removed by someone else).
            Err(Errno::NOENT) => return true,
            Err(_) => false,
        };
        same && unlinkat(parent, &level.name, AtFlags::REMOVEDIR).is_ok()
    }
}

/// One service's cgroup, opened: one directory on v2, one per hierarchy on v1.
#[derive(Debug)]
pub struct ServiceCgroup {
    plan: Plan,
    dirs: Vec<OpenDir>,
}

impl ServiceCgroup {
    fn open_dirs(&mut self, fs: &Cgroupfs) -> Result<(), CgroupError> {
        for planned in &self.plan.dirs {
            let mount = &fs.mounts[planned.mount];
            let top = mount.fd.try_clone().map_err(|source| CgroupError::Open {
                path: mount.path.clone(),
                source,
            })?;
            let mut dir = OpenDir {
                top,
                dev: mount.dev,
                levels: Vec::new(),
            };
            let opened = dir.open_levels(fs, &mount.path, &planned.names, &self.plan.service);
            // Kept even when incomplete: what was created is removed again.
            self.dirs.push(dir);
            opened?;
        }
        Ok(())
    }

    /// Makes `memory` and `pids` (and `cpu`, if planned) available to the children of every v2
    /// cgroup on the way down.
    fn enable_controllers(&self) -> Result<(), CgroupError> {
        if !self.plan.v2 {
            return Ok(());
        }
        let wanted: &[&str] = if self.plan.cpu {
            &["memory", "pids", "cpu"]
        } else {
            &["memory", "pids"]
        };
        let dir = &self.dirs[0];
        let mut path = self.plan.dirs[0].path.clone();
        for _ in &dir.levels {
            path.pop();
        }
        for i in 0..dir.levels.len() {
            let fd = dir.parent_of(i);
            let file = "cgroup.subtree_control";
            let current = read_at(fd, dir.dev, file).unwrap_or_default();
            let missing: Vec<String> = wanted
                .iter()
                .filter(|c| !current.split_whitespace().any(|x| x == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !missing.is_empty() {
                let value = missing.join(" ");
                write_at(fd, dir.dev, file, &value).map_err(|e| CgroupError::Write {
                    path: path.join(file),
                    value,
                    source: e.into(),
                })?;
            }
            path.push(&dir.levels[i].name);
        }
        Ok(())
    }

    /// The directories this cgroup consists of.
    pub fn dirs(&self) -> Vec<&Path> {
        self.plan.dirs()
    }

    /// Who the directory a limit is written in belongs to.
    pub fn origin(&self, limit: &Limit) -> Option<Origin> {
        self.dirs[limit.dir].levels.last().map(|l| l.origin)
    }

    /// Writes the limits budgets `b` set, in order, and returns them: when the cgroup is set up,
    /// and again for a running service whose budgets changed. A budget `b` leaves out is not
    /// written (a limit the operator set there stays).
    pub fn apply_limits(&self, b: &Budgets) -> Result<Vec<Limit>, CgroupError> {
        let limits = self.plan.limits(b)?;
        for limit in &limits {
            for (file, value) in &limit.writes {
                self.dirs[limit.dir]
                    .write(file, value)
                    .map_err(|e| CgroupError::Write {
                        path: limit.dir_path.join(file),
                        value: value.clone(),
                        source: e.into(),
                    })?;
            }
        }
        Ok(limits)
    }

    /// Lifts the limits budgets `b` set (writes what the kernel reads as no limit): a reload
    /// removed them, or guardian no longer enforces anything on this cgroup. Every file is
    /// tried; the first failure is returned.
    pub fn lift_limits(&self, b: &Budgets) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for limit in self.plan.limits(b)? {
            for (file, _) in &limit.writes {
                let unlimited = match *file {
                    "pids.max" | "memory.max" | "memory.high" => "max",
                    "cpu.max" => "max",
                    "memory.limit_in_bytes" | "memory.soft_limit_in_bytes" | "cpu.cfs_quota_us" => {
                        "-1"
                    }
                    // The period stays: without a quota it limits nothing.
                    _ => continue,
                };
                let written = self.dirs[limit.dir].write(file, unlimited);
                if let (Err(e), Ok(())) = (written, &result) {
                    result = Err(CgroupError::Write {
                        path: limit.dir_path.join(file),
                        value: unlimited.to_owned(),
                        source: e.into(),
                    });
                }
            }
        }
        result
    }

    /// Moves a process (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        let value = pid.to_string();
        for (dir, planned) in self.dirs.iter().zip(&self.plan.dirs) {
            dir.write("cgroup.procs", &value)
                .map_err(|e| CgroupError::Write {
                    path: planned.path.join("cgroup.procs"),
                    value: value.clone(),
                    source: e.into(),
                })?;
        }
        Ok(())
    }

    /// The memory directory and the pids directory.
    fn memory(&self) -> &OpenDir {
        &self.dirs[self.plan.dir_of(Controller::Memory)]
    }

    fn pids(&self) -> &OpenDir {
        &self.dirs[self.plan.dir_of(Controller::Pids)]
    }

    /// The kernel's counters; a counter that cannot be read keeps its value in `before`, so a
    /// passing read failure is not taken for events.
    pub fn counters(&self, before: Counters) -> Counters {
        let keyed = |dir: &OpenDir, file: &str, key: &str| -> Option<u64> {
            dir.read(file).ok()?.lines().find_map(|l| {
                let (k, v) = l.split_once(char::is_whitespace)?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        };
        let pids_max = keyed(self.pids(), "pids.events", "max").unwrap_or(before.pids_max);
        if self.plan.v2 {
            Counters {
                pids_max,
                oom_kills: keyed(self.memory(), "memory.events", "oom_kill")
                    .unwrap_or(before.oom_kills),
                high: keyed(self.memory(), "memory.events", "high").unwrap_or(before.high),
            }
        } else {
            Counters {
                pids_max,
                oom_kills: keyed(self.memory(), "memory.oom_control", "oom_kill")
                    .unwrap_or(before.oom_kills),
                high: 0,
            }
        }
    }

    fn read_u64(dir: &OpenDir, file: &str) -> Option<u64> {
        dir.read(file).ok()?.trim().parse().ok()
    }

    /// Memory charged to the cgroup, in bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let file = if self.plan.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        Self::read_u64(self.memory(), file)
    }

    /// Tasks (processes and threads) in the cgroup.
    pub fn tasks(&self) -> Option<u64> {
        Self::read_u64(self.pids(), "pids.current")
    }

    /// Whether no process is left in any of the directories.
    pub fn is_empty(&self) -> bool {
        self.dirs.iter().all(|d| match d.read("cgroup.procs") {
            Ok(s) => s.trim().is_empty(),
            // Removed by someone else: nothing is left in it either.
            Err(e) => e == Errno::NOENT || e == Errno::NODEV,
        })
    }

    /// Removes the directories guardian owns (created by this run, or marked by an earlier one)
    /// if no process is left in them; the operator's are never removed. A cgroup with processes
    /// is kept (its limits stay in force). Returns whether nothing is left for guardian to
    /// remove.
    pub fn remove(&mut self) -> bool {
        self.is_empty() && self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> bool {
        // Every hierarchy is tried, whatever the others do.
        let removed: Vec<bool> = self.dirs.iter_mut().map(OpenDir::remove).collect();
        removed.into_iter().all(|r| r)
    }

    /// An fd that becomes readable when memory usage goes over `bytes` or back (or, on v2,
    /// whenever `memory.events` changes, which includes going over `memory.high`): v1 through
    /// `cgroup.event_control` and an eventfd, v2 through inotify.
    pub fn memory_watch(&self, bytes: u64) -> Result<OwnedFd, CgroupError> {
        let dir = self.memory();
        let base = &self.plan.dirs[0].path;
        let err = |file: &str, value: &str, e: Errno| CgroupError::Write {
            path: base.join(file),
            value: value.to_owned(),
            source: e.into(),
        };
        if self.plan.v2 {
            let file = "memory.events";
            let events = open_beneath(dir.fd(), dir.dev, file, OFlags::RDONLY)
                .map_err(|e| err(file, "inotify", e))?;
            let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
                .map_err(|e| err(file, "inotify", e))?;
            // The watch goes on the file already opened, through its /proc/self/fd link.
            inotify::add_watch(
                &fd,
                format!("/proc/self/fd/{}", events.as_raw_fd()),
                inotify::WatchFlags::MODIFY,
            )
            .map_err(|e| err(file, "inotify", e))?;
            Ok(fd)
        } else {
            let usage = open_beneath(dir.fd(), dir.dev, "memory.usage_in_bytes", OFlags::RDONLY)
                .map_err(|e| err("memory.usage_in_bytes", "eventfd", e))?;
            let efd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
                .map_err(|e| err("memory.usage_in_bytes", "eventfd", e))?;
            // The kernel counts thresholds in whole pages (rounded down) and signals one once
            // usage reaches it: the next page above `bytes` is signalled once usage is over
            // `bytes`, when the budget is crossed (at `bytes` exactly, the check the signal
            // wakes would find nothing to do yet).
            let page = rustix::param::page_size() as u64;
            let threshold = (bytes / page).saturating_add(1).saturating_mul(page);
            let value = format!("{} {} {threshold}", efd.as_raw_fd(), usage.as_raw_fd());
            dir.write("cgroup.event_control", &value)
                .map_err(|e| err("cgroup.event_control", &value, e))?;
            // The kernel holds its own reference to the usage file once registered.
            drop(usage);
            Ok(efd)
        }
    }
}

/// Drains a watch fd without blocking; true if it had fired.
pub fn fired(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 512];
    let mut any = false;
    for _ in 0..16 {
        match rustix::io::read(fd, &mut buf) {
            Ok(n) if n > 0 => any = true,
            _ => break,
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt as _};

    const HYBRID_MOUNTINFO: &str = "\
25 19 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 25 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 25 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 25 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
";
    const HYBRID_CGROUP: &str =
        "8:pids:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/cpu-own\n0::/\n";

    const BUDGETS: Budgets = Budgets {
        tasks_max: Some(8),
        memory_max: Some(200 << 20),
        memory_high: Some(100 << 20),
        cpu_max: None,
    };

    /// [`BUDGETS`] and 1.6 CPUs.
    const CPU_BUDGETS: Budgets = Budgets {
        cpu_max: Some(160_000),
        ..BUDGETS
    };

    /// A scratch directory removed when the test ends, pass or fail.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("guardian-cg-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            Self(root)
        }

        fn dir(&self, rel: &str) -> PathBuf {
            let d = self.0.join(rel);
            fs::create_dir_all(&d).unwrap();
            d
        }

        /// Every entry below `rel`, sorted, as paths relative to the scratch root.
        fn tree(&self, rel: &str) -> Vec<String> {
            fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
                for e in fs::read_dir(d).into_iter().flatten().flatten() {
                    let p = e.path();
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                    if e.file_type().unwrap().is_dir() {
                        walk(base, &p, out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.0, &self.0.join(rel), &mut out);
            out.sort();
            out
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A v1 layout whose memory and pids hierarchies are `m` and `p` in a scratch tree.
    fn scratch_v1(s: &Scratch) -> Cgroupfs {
        let mi = format!(
            "33 25 0:30 / {} rw - cgroup cgroup rw,memory\n35 25 0:32 / {} rw - cgroup cgroup rw,pids\n",
            s.dir("m").display(),
            s.dir("p").display()
        );
        let l = Layout::from_proc(&mi, "8:pids:/\n4:memory:/\n", |_| None).unwrap();
        Cgroupfs::open_scratch(l).unwrap()
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn mark_of(dir: &Path) -> Option<String> {
        let fd = open(dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).ok()?;
        let mut buf = [0u8; 64];
        let n = rustix::fs::fgetxattr(&fd, MARK, &mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn detects_hybrid_as_v1_when_v2_lacks_controllers() {
        let l = Layout::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| {
            Some("hugetlb\n".into())
        })
        .unwrap();
        let Layout::V1 { memory, pids, cpu } = &l else {
            panic!("{l:?}")
        };
        assert_eq!(memory.mount, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(memory.own, "/process_api/abc");
        assert_eq!(pids.own, "/");
        // Relative parents go below guardian's own cgroup, absolute ones below the root.
        let c = Plan::new(&l, "gtest", "svc", &BUDGETS).unwrap();
        assert_eq!(
            c.dirs(),
            vec![
                Path::new("/sys/fs/cgroup/memory/process_api/abc/gtest/svc"),
                Path::new("/sys/fs/cgroup/pids/gtest/svc")
            ]
        );
        let c = Plan::new(&l, "/guardian", "svc", &BUDGETS).unwrap();
        assert_eq!(c.dirs()[0], Path::new("/sys/fs/cgroup/memory/guardian/svc"));
        // The cpu hierarchy (co-mounted with cpuacct) only for a service with a cpu_max.
        let cpu = cpu.as_ref().unwrap();
        assert_eq!(cpu.mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu.own, "/cpu-own");
        let c = Plan::new(&l, "gtest", "svc", &CPU_BUDGETS).unwrap();
        assert_eq!(
            c.dirs()[2],
            Path::new("/sys/fs/cgroup/cpu,cpuacct/cpu-own/gtest/svc")
        );
        let cpuacct_only = HYBRID_MOUNTINFO.replace("rw,cpu,cpuacct", "rw,cpuacct");
        let l = Layout::from_proc(&cpuacct_only, HYBRID_CGROUP, |_| None).unwrap();
        assert!(!l.has_cpu(), "cpuacct is not cpu: {l:?}");
        assert!(matches!(
            Plan::new(&l, "g", "svc", &CPU_BUDGETS),
            Err(CgroupError::NoCpu)
        ));
        assert_eq!(Plan::new(&l, "g", "svc", &BUDGETS).unwrap().dirs().len(), 2);
    }

    #[test]
    fn detects_v2_with_controllers_and_container_roots() {
        let mi = "30 25 0:27 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = Layout::from_proc(mi, "0::/kubepods/pod1/app\n", |_| {
            Some("cpuset cpu io memory pids\n".into())
        })
        .unwrap();
        assert!(l.has_cpu());
        let c = Plan::new(&l, "g", "svc", &CPU_BUDGETS).unwrap();
        assert_eq!(c.dirs(), vec![Path::new("/sys/fs/cgroup/app/g/svc")]);
        // A sibling whose name merely starts like the mount's root is not below it.
        let l = Layout::from_proc(mi, "0::/kubepods/pod10/app\n", |_| {
            Some("memory pids\n".into())
        })
        .unwrap();
        assert!(!l.has_cpu());
        let c = Plan::new(&l, "g", "svc", &BUDGETS).unwrap();
        assert_eq!(
            c.dirs(),
            vec![Path::new("/sys/fs/cgroup/kubepods/pod10/app/g/svc")]
        );
        assert!(Layout::from_proc("", "", |_| None).is_err());
    }

    #[test]
    fn dot_dot_and_slashes_are_refused_before_anything_is_opened() {
        let l = Layout::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| None).unwrap();
        for (parent, name) in [
            ("/guardian", "../../../../tmp/x"),
            ("/guardian", ".."),
            ("/guardian", "."),
            ("/guardian", "a/b"),
            ("/guardian", ""),
            ("/guardian", "nul\0x"),
            ("/a/../../tmp", "svc"),
            ("a/./b", "svc"),
            ("..", "svc"),
        ] {
            match Plan::new(&l, parent, name, &BUDGETS) {
                Err(e @ CgroupError::BadName { .. }) => {
                    assert!(e.to_string().starts_with("refused cgroup path"), "{e}")
                }
                other => panic!("{parent:?} / {name:?}: {other:?}"),
            }
        }
        // guardian's own cgroup, from /proc, gets the same check when a relative parent uses it.
        let l = Layout::from_proc(HYBRID_MOUNTINFO, "8:pids:/..\n4:memory:/\n", |_| None).unwrap();
        assert!(matches!(
            Plan::new(&l, "g", "svc", &BUDGETS),
            Err(CgroupError::BadName { .. })
        ));
        assert!(Plan::new(&l, "/g", "svc@1.x-y_z", &BUDGETS).is_ok());
    }

    #[test]
    fn open_beneath_refuses_symlinks_and_other_mounts_with_and_without_openat2() {
        let s = Scratch::new("beneath");
        let top = s.dir("top");
        let outside = s.dir("outside");
        s.dir("top/sub");
        symlink(&outside, top.join("link")).unwrap();
        fs::write(outside.join("file"), "x").unwrap();
        symlink(outside.join("file"), top.join("file-link")).unwrap();
        let dir = open(&top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let dev = fstat(&dir).unwrap().st_dev;
        let root = open("/", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let root_dev = fstat(&root).unwrap().st_dev;
        let proc_on_its_own_mount = fs::metadata("/proc").unwrap().dev() != root_dev;
        for (how, f) in [
            ("openat2", open_beneath as fn(_, _, _, _) -> _),
            ("openat fallback", open_beneath_compat),
        ] {
            let dflags = OFlags::RDONLY | OFlags::DIRECTORY;
            assert_eq!(
                f(dir.as_fd(), dev, "link", dflags).unwrap_err(),
                Errno::LOOP,
                "{how}: a symlinked directory"
            );
            assert_eq!(
                f(dir.as_fd(), dev, "file-link", OFlags::WRONLY).unwrap_err(),
                Errno::LOOP,
                "{how}: a symlinked file"
            );
            if proc_on_its_own_mount {
                assert_eq!(
                    f(root.as_fd(), root_dev, "proc", dflags).unwrap_err(),
                    Errno::XDEV,
                    "{how}: another mount"
                );
            }
            f(dir.as_fd(), dev, "sub", dflags).expect("a plain directory opens");
        }
        assert_eq!(
            open_beneath(dir.as_fd(), dev, "..", OFlags::RDONLY).unwrap_err(),
            Errno::INVAL
        );
        assert_eq!(fs::read_to_string(outside.join("file")).unwrap(), "x");
    }

    /// The filesystem type check, on this machine's real mounts.
    #[test]
    fn mount_points_must_be_cgroupfs() {
        let s = Scratch::new("magic");
        let mi = format!(
            "30 25 0:27 / {} rw - cgroup2 cgroup2 rw\n",
            s.dir("fake").display()
        );
        let fake = Layout::from_proc(&mi, "0::/\n", |_| Some("memory pids".into())).unwrap();
        match Cgroupfs::open(fake) {
            Err(e @ CgroupError::NotCgroupfs { .. }) => {
                assert!(e.to_string().contains("not a cgroup filesystem"), "{e}")
            }
            other => panic!("a plain directory passed for cgroupfs: {other:?}"),
        }
        let layout = match Layout::detect() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("SKIPPED the real-mount half of mount_points_must_be_cgroupfs: {e}");
                return;
            }
        };
        let fs = Cgroupfs::open(layout.clone()).expect("the real hierarchies are cgroupfs");
        assert_eq!(
            fs.mounts.len(),
            match &layout {
                Layout::V2 { .. } => 1,
                Layout::V1 { cpu, .. } => 2 + usize::from(cpu.is_some()),
            }
        );
        // The right filesystem for its layout: a v1 hierarchy is not taken for v2, nor the
        // reverse.
        let swapped = match layout {
            Layout::V1 { memory, .. } => Layout::V2 {
                mount: memory,
                cpu: true,
            },
            Layout::V2 { mount, .. } => Layout::V1 {
                memory: mount.clone(),
                pids: mount.clone(),
                cpu: Some(mount),
            },
        };
        assert!(matches!(
            Cgroupfs::open(swapped),
            Err(CgroupError::NotCgroupfs { .. })
        ));
    }

    /// The v2 code path against a scratch directory laid out like cgroupfs (this machine's v2
    /// hierarchy has no memory or pids controller; the VM matrix runs it for real).
    #[test]
    fn v2_paths_limits_counters_in_a_scratch_tree() {
        eprintln!(
            "cgroup v2 code path exercised on a scratch directory laid out like cgroupfs \
             (the privileged suite runs it for real where the memory and pids controllers are on v2)"
        );
        let s = Scratch::new("v2");
        let root = s.dir("cg");
        fs::write(root.join("cgroup.subtree_control"), "cpu").unwrap();
        // The operator's parent (existing, unmarked); guardian creates the service below it.
        let parent = s.dir("cg/guardian");
        fs::write(parent.join("cgroup.subtree_control"), "").unwrap();
        let mi = format!("30 25 0:27 / {} rw - cgroup2 cgroup2 rw\n", root.display());
        let l = Layout::from_proc(&mi, "0::/\n", |_| Some("memory pids cpu".into())).unwrap();
        let fs = Cgroupfs::open_scratch(l).unwrap();
        let plan = Plan::new(fs.layout(), "/guardian", "svc", &CPU_BUDGETS).unwrap();
        let mut c = plan.create(&fs).unwrap();
        let origins: Vec<Origin> = c.dirs[0].levels.iter().map(|l| l.origin).collect();
        assert_eq!(origins, vec![Origin::Operator, Origin::Created]);
        // Controllers enabled on the way down, without repeating those already on.
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(
            fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        let dir = parent.join("svc");
        // What the kernel would have made in a new cgroup.
        for f in [
            "pids.max",
            "memory.max",
            "memory.high",
            "cpu.max",
            "cgroup.procs",
        ] {
            fs::write(dir.join(f), "").unwrap();
        }
        let written = c.apply_limits(&CPU_BUDGETS).unwrap();
        let cpu = written.last().unwrap();
        assert_eq!((cpu.budget, cpu.value), (Budget::CpuMax, 160_000));
        assert_eq!(
            cpu.describe(),
            format!("cpu.max=160000 100000 to {}", dir.join("cpu.max").display())
        );
        assert_eq!(
            fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "160000 100000"
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "8");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "209715200"
        );
        assert_eq!(
            fs::read_to_string(dir.join("memory.high")).unwrap(),
            "104857600"
        );
        fs::write(dir.join("pids.events"), "max 3\n").unwrap();
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 5\nmax 1\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let seen = c.counters(Counters::default());
        assert_eq!(
            seen,
            Counters {
                pids_max: 3,
                oom_kills: 1,
                high: 5
            }
        );
        // A counter that cannot be read keeps its last value: no phantom events when it comes
        // back.
        fs::remove_file(dir.join("pids.events")).unwrap();
        fs::write(dir.join("memory.events"), "garbage").unwrap();
        assert_eq!(c.counters(seen), seen);
        assert_eq!(c.counters(Counters::default()), Counters::default());
        fs::write(dir.join("memory.current"), "1234\n").unwrap();
        assert_eq!(c.memory_usage(), Some(1234));
        // The watch is set on the file opened beneath the service directory.
        let watch = c.memory_watch(100 << 20).unwrap();
        assert!(!fired(&watch));
        fs::write(dir.join("memory.events"), "high 6\n").unwrap();
        assert!(fired(&watch), "a change of memory.events wakes the check");
        assert_eq!(c.tasks(), None, "unreadable, not a panic");
        c.add(4242).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "4242"
        );
        assert!(!c.is_empty());
        assert!(!c.remove(), "never removes a cgroup with processes");
        assert!(dir.exists());
    }

    /// A v1 layout with a cpu hierarchy (`c`) too.
    fn scratch_v1_cpu(s: &Scratch) -> Cgroupfs {
        let mi = format!(
            "33 25 0:30 / {} rw - cgroup cgroup rw,memory\n35 25 0:32 / {} rw - cgroup cgroup rw,pids\n32 25 0:29 / {} rw - cgroup cgroup rw,cpu,cpuacct\n",
            s.dir("m").display(),
            s.dir("p").display(),
            s.dir("c").display()
        );
        let l =
            Layout::from_proc(&mi, "8:pids:/\n4:memory:/\n2:cpu,cpuacct:/\n", |_| None).unwrap();
        Cgroupfs::open_scratch(l).unwrap()
    }

    /// On v1 a service with a cpu_max gets a directory in the cpu hierarchy: its limits go there
    /// (the period before the quota), its processes are moved there too, and it goes with the
    /// others. A service without one gets none.
    #[test]
    fn v1_cpu_max_has_a_directory_of_its_own() {
        let s = Scratch::new("v1cpu");
        let fs = scratch_v1_cpu(&s);
        let plain = Plan::new(fs.layout(), "/guardian", "plain", &BUDGETS).unwrap();
        assert_eq!(plain.dirs().len(), 2, "no cpu cgroup without a cpu_max");
        let plan = Plan::new(fs.layout(), "/guardian", "svc", &CPU_BUDGETS).unwrap();
        let mut c = plan.create(&fs).unwrap();
        let cpu_dir = s.0.join("c/guardian/svc");
        assert_eq!(c.dirs()[2], cpu_dir);
        for (d, files) in [
            (
                "m",
                &["memory.limit_in_bytes", "memory.soft_limit_in_bytes"][..],
            ),
            ("p", &["pids.max"][..]),
            ("c", &["cpu.cfs_period_us", "cpu.cfs_quota_us"][..]),
        ] {
            for f in files.iter().chain(&["cgroup.procs"]) {
                fs::write(s.0.join(d).join("guardian/svc").join(f), "").unwrap();
            }
        }
        let written = c.apply_limits(&CPU_BUDGETS).unwrap();
        assert_eq!(written.len(), 4);
        let cpu = &written[3];
        assert_eq!(c.origin(cpu), Some(Origin::Created));
        assert_eq!(
            cpu.describe(),
            format!(
                "cpu.cfs_period_us=100000 to {}, then cpu.cfs_quota_us=160000 to {}",
                cpu_dir.join("cpu.cfs_period_us").display(),
                cpu_dir.join("cpu.cfs_quota_us").display()
            )
        );
        let read = |f: &str| fs::read_to_string(cpu_dir.join(f)).unwrap();
        assert_eq!(
            (read("cpu.cfs_period_us"), read("cpu.cfs_quota_us")),
            ("100000".into(), "160000".into())
        );
        assert_eq!(
            fs::read_to_string(s.0.join("p/guardian/svc/pids.max")).unwrap(),
            "8"
        );
        c.add(4242).unwrap();
        assert_eq!(
            read("cgroup.procs"),
            "4242",
            "moved into the cpu hierarchy too"
        );
        // Emptied (the scratch files stand in for the kernel's), it goes in every hierarchy.
        for d in ["m", "p", "c"] {
            let dir = s.0.join(d).join("guardian/svc");
            for e in fs::read_dir(&dir).unwrap() {
                fs::remove_file(e.unwrap().path()).unwrap();
            }
        }
        assert!(c.remove());
        assert!(s.tree("c").is_empty(), "{:?}", s.tree("c"));
    }

    /// A cpu_max given to a running service whose cgroup was made without one (a reload) is
    /// refused before anything is written; the same limits without it still apply.
    #[test]
    fn a_cgroup_without_cpu_refuses_a_cpu_max() {
        let s = Scratch::new("nocpu");
        let fs = scratch_v1_cpu(&s);
        let mut c = Plan::new(fs.layout(), "/guardian", "svc", &BUDGETS)
            .unwrap()
            .create(&fs)
            .unwrap();
        fs::write(s.0.join("p/guardian/svc/pids.max"), "").unwrap();
        match c.apply_limits(&CPU_BUDGETS) {
            Err(e @ CgroupError::NoCpuInCgroup { .. }) => {
                assert!(e.to_string().contains("without the cpu controller"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fs::read_to_string(s.0.join("p/guardian/svc/pids.max")).unwrap(),
            "",
            "nothing written"
        );
        assert!(
            s.tree("c").is_empty(),
            "no cpu cgroup made: {:?}",
            s.tree("c")
        );
        let only_tasks = Budgets {
            tasks_max: Some(5),
            ..Budgets::default()
        };
        assert_eq!(c.apply_limits(&only_tasks).unwrap().len(), 1);
        assert_eq!(
            fs::read_to_string(s.0.join("p/guardian/svc/pids.max")).unwrap(),
            "5"
        );
        fs::remove_file(s.0.join("p/guardian/svc/pids.max")).unwrap();
        assert!(c.remove());
    }

    /// A symlink planted where the service directory, or one of its parents, belongs: creation
    /// fails, and nothing is created or written where it points.
    #[test]
    fn symlinks_on_the_way_are_refused() {
        for (case, plant) in [
            (
                "service directory in the memory hierarchy",
                "m/guardian/svc",
            ),
            ("parent in the memory hierarchy", "m/guardian"),
            ("service directory in the pids hierarchy", "p/guardian/svc"),
            ("parent in the pids hierarchy", "p/guardian"),
        ] {
            let s = Scratch::new("symlink");
            let fs = scratch_v1(&s);
            let outside = s.dir("outside");
            let planted = s.0.join(plant);
            fs::create_dir_all(planted.parent().unwrap()).unwrap();
            symlink(&outside, &planted).unwrap();
            let before = (s.tree("m"), s.tree("p"));
            let plan = Plan::new(fs.layout(), "/guardian", "svc", &BUDGETS).unwrap();
            match plan.create(&fs) {
                Err(e @ CgroupError::NotBeneath { .. }) => {
                    assert!(
                        e.to_string().contains(&planted.display().to_string()),
                        "{case}: {e}"
                    );
                    assert!(e.to_string().contains("symbolic link"), "{case}: {e}");
                }
                other => panic!("{case}: {other:?}"),
            }
            assert!(
                s.tree("outside").is_empty(),
                "{case}: {:?}",
                s.tree("outside")
            );
            // What was made in the other hierarchy before the refusal is gone again.
            assert_eq!((s.tree("m"), s.tree("p")), before, "{case}");
        }
    }

    /// guardian marks what it creates, recognises it after a restart (reused, removed once empty,
    /// with the parents it made), uses an unmarked directory without ever removing it, and
    /// refuses a directory another user owns without writing into it.
    #[test]
    fn ownership_and_marks_decide_reuse_and_removal() {
        let s = Scratch::new("marks");
        let fs = scratch_v1(&s);
        let plan = || Plan::new(fs.layout(), "/guardian", "svc", &BUDGETS).unwrap();
        let origins = |c: &ServiceCgroup| -> Vec<Vec<Origin>> {
            c.dirs
                .iter()
                .map(|d| d.levels.iter().map(|l| l.origin).collect())
                .collect()
        };
        let first = plan().create(&fs).unwrap();
        let created = vec![Origin::Created, Origin::Created];
        assert_eq!(origins(&first), vec![created.clone(), created]);
        // A crash: the directories stay.
        drop(first);
        let mut again = plan().create(&fs).unwrap();
        if is_root() {
            assert_eq!(mark_of(&s.0.join("m/guardian")).as_deref(), Some("parent"));
            assert_eq!(mark_of(&s.0.join("p/guardian/svc")).as_deref(), Some("svc"));
            let marked = vec![Origin::Marked, Origin::Marked];
            assert_eq!(origins(&again), vec![marked.clone(), marked]);
            assert!(again.remove(), "guardian's own, empty: removed");
            assert!(
                s.tree("m").is_empty() && s.tree("p").is_empty(),
                "{:?}",
                s.tree("m")
            );
        } else {
            eprintln!(
                "SKIPPED the marked half of ownership_and_marks_decide_reuse_and_removal: only \
                 root can set `{MARK}`"
            );
            assert!(again.remove(), "nothing guardian may remove");
            assert!(s.0.join("p/guardian/svc").is_dir(), "unmarked: kept");
            fs::remove_dir_all(s.0.join("m/guardian")).unwrap();
            fs::remove_dir_all(s.0.join("p/guardian")).unwrap();
        }

        // The operator's directories: used, never removed.
        s.dir("m/guardian/svc");
        s.dir("p/guardian/svc");
        let mut theirs = plan().create(&fs).unwrap();
        let operator = vec![Origin::Operator, Origin::Operator];
        assert_eq!(origins(&theirs), vec![operator.clone(), operator]);
        assert!(theirs.remove());
        assert!(s.0.join("m/guardian/svc").is_dir() && s.0.join("p/guardian/svc").is_dir());

        if !is_root() {
            eprintln!(
                "SKIPPED the foreign-owner half of ownership_and_marks_decide_reuse_and_removal: \
                 needs root to chown"
            );
            return;
        }
        // Another user's service directory in the pids hierarchy: refused, nothing written in
        // it, and what was made meanwhile in the memory hierarchy goes again.
        fs::remove_dir_all(s.0.join("m/guardian")).unwrap();
        rustix::fs::chown(
            s.0.join("p/guardian/svc"),
            Some(rustix::fs::Uid::from_raw(65534)),
            None,
        )
        .unwrap();
        match plan().create(&fs) {
            Err(e @ CgroupError::Owner { uid: 65534, .. }) => {
                assert!(e.to_string().contains("uid 65534"), "{e}")
            }
            other => panic!("another user's directory was used: {other:?}"),
        }
        assert!(s.tree("p/guardian/svc").is_empty());
        assert!(s.tree("m").is_empty(), "{:?}", s.tree("m"));
    }
}
