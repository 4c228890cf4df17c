//! Service cgroups for `cgroup = "own"`: created under `cgroup_parent`, limits written, kernel
//! counters read, removed once empty.
//!
//! Two layouts are supported: the unified hierarchy (cgroup v2) with the `memory` and `pids`
//! controllers, and the v1 `memory` and `pids` hierarchies (hybrid hosts keep those on v1).

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use rustix::{
    event::{eventfd, EventfdFlags},
    fs::inotify,
};
use thiserror::Error;

use crate::policy::{Budget, Budgets};

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup hierarchy with the memory and pids controllers is mounted (cgroup v2 with \
         both enabled, or the v1 memory and pids hierarchies)"
    )]
    NoControllers,
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
    /// cgroup v2, mounted here, with `memory` and `pids` available.
    V2 { mount: Hierarchy },
    /// cgroup v1 `memory` and `pids` hierarchies.
    V1 { memory: Hierarchy, pids: Hierarchy },
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
    /// The directory of a cgroup path (as in `/proc/PID/cgroup`).
    fn dir(&self, cgroup: &str) -> PathBuf {
        let rel = cgroup
            .strip_prefix(self.mount_root.trim_end_matches('/'))
            .unwrap_or(cgroup);
        self.mount.join(rel.trim_start_matches('/'))
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
            (Some(memory), Some(pids)) => Ok(Self::V1 { memory, pids }),
            _ => Err(CgroupError::NoControllers),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::V2 { .. } => "v2",
            Self::V1 { .. } => "v1",
        }
    }
}

/// A limit file and the value a budget writes there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub path: PathBuf,
    pub value: u64,
    pub budget: Budget,
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

/// One service's cgroup: one directory on v2, one per hierarchy on v1.
#[derive(Debug)]
pub struct ServiceCgroup {
    v2: bool,
    /// Where `memory.*` files live.
    memory: PathBuf,
    /// Where `pids.*` files live.
    pids: PathBuf,
    /// Directories guardian created, deepest last (removed in reverse).
    created: Vec<PathBuf>,
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

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// Creates each missing directory from `top` down to `dir`; returns those it created. On v2,
/// enables the memory and pids controllers in every parent on the way.
fn create_path(top: &Path, dir: &Path, v2: bool) -> Result<Vec<PathBuf>, CgroupError> {
    let mut created = Vec::new();
    let rel = dir.strip_prefix(top).unwrap_or(Path::new(""));
    let mut cur = top.to_path_buf();
    for part in rel.components() {
        if v2 {
            enable_controllers(&cur)?;
        }
        cur.push(part);
        match fs::create_dir(&cur) {
            Ok(()) => created.push(cur.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    path: cur.clone(),
                    source,
                })
            }
        }
    }
    Ok(created)
}

/// Makes `memory` and `pids` available to the children of a v2 cgroup.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let current = fs::read_to_string(&file).unwrap_or_default();
    let missing: Vec<&str> = ["memory", "pids"]
        .into_iter()
        .filter(|c| !current.split_whitespace().any(|x| x == *c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    write(&file, &value)
}

fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl ServiceCgroup {
    /// The cgroup of service `name` under `parent`; nothing is created yet.
    pub fn plan(layout: &Layout, parent: &str, name: &str) -> Self {
        let path_in = |h: &Hierarchy| h.dir(&format!("{}/{name}", parent_path(h, parent)));
        match layout {
            Layout::V2 { mount } => {
                let dir = path_in(mount);
                Self {
                    v2: true,
                    memory: dir.clone(),
                    pids: dir,
                    created: Vec::new(),
                }
            }
            Layout::V1 { memory, pids } => Self {
                v2: false,
                memory: path_in(memory),
                pids: path_in(pids),
                created: Vec::new(),
            },
        }
    }

    /// The directories this cgroup consists of.
    pub fn dirs(&self) -> Vec<&Path> {
        if self.v2 {
            vec![&self.memory]
        } else {
            vec![&self.memory, &self.pids]
        }
    }

    /// Creates the directories (and any missing parents) in `layout`.
    pub fn create(&mut self, layout: &Layout) -> Result<(), CgroupError> {
        match layout {
            Layout::V2 { mount } => self.created = create_path(&mount.mount, &self.memory, true)?,
            Layout::V1 { memory, pids } => {
                let mut created = create_path(&memory.mount, &self.memory, false)?;
                created.extend(create_path(&pids.mount, &self.pids, false)?);
                self.created = created;
            }
        }
        Ok(())
    }

    /// The limit files a service's budgets set, in the order they are written.
    pub fn limits(&self, b: &Budgets) -> Vec<Limit> {
        let (max_file, high_file) = if self.v2 {
            ("memory.max", "memory.high")
        } else {
            // v1 has no throttling `high`; the soft limit is its nearest equivalent (reclaim
            // target under pressure). guardian enforces memory_high itself either way.
            ("memory.limit_in_bytes", "memory.soft_limit_in_bytes")
        };
        [
            (b.tasks_max, &self.pids, "pids.max", Budget::TasksMax),
            (b.memory_max, &self.memory, max_file, Budget::MemoryMax),
            (b.memory_high, &self.memory, high_file, Budget::MemoryHigh),
        ]
        .into_iter()
        .filter_map(|(value, dir, file, budget)| {
            value.map(|value| Limit {
                path: dir.join(file),
                value,
                budget,
            })
        })
        .collect()
    }

    pub fn write_limits(&self, b: &Budgets) -> Result<(), CgroupError> {
        for limit in self.limits(b) {
            write(&limit.path, &limit.value.to_string())?;
        }
        Ok(())
    }

    /// Moves a process (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        let pids_max = read_keyed(&self.pids.join("pids.events"), "max").unwrap_or(0);
        if self.v2 {
            let events = self.memory.join("memory.events");
            Counters {
                pids_max,
                oom_kills: read_keyed(&events, "oom_kill").unwrap_or(0),
                high: read_keyed(&events, "high").unwrap_or(0),
            }
        } else {
            Counters {
                pids_max,
                oom_kills: read_keyed(&self.memory.join("memory.oom_control"), "oom_kill")
                    .unwrap_or(0),
                high: 0,
            }
        }
    }

    /// Memory charged to the cgroup, in bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        if self.v2 {
            read_u64(&self.memory.join("memory.current"))
        } else {
            read_u64(&self.memory.join("memory.usage_in_bytes"))
        }
    }

    /// Tasks (processes and threads) in the cgroup.
    pub fn tasks(&self) -> Option<u64> {
        read_u64(&self.pids.join("pids.current"))
    }

    /// Whether no process is left in any of the directories.
    pub fn is_empty(&self) -> bool {
        self.dirs()
            .iter()
            .all(|d| fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty()))
    }

    /// Removes the directories guardian created, if no process is left in them. A cgroup with
    /// processes is kept (its limits stay in force). Returns whether everything was removed.
    pub fn remove(&mut self) -> bool {
        if !self.is_empty() {
            return false;
        }
        // Deepest first; a parent still holding another service's cgroup stays.
        let mut kept: Vec<PathBuf> = std::mem::take(&mut self.created)
            .into_iter()
            .rev()
            .filter(|dir| fs::remove_dir(dir).is_err())
            .collect();
        kept.reverse();
        self.created = kept;
        self.dirs().iter().all(|d| !d.exists())
    }

    /// An fd that becomes readable when memory usage crosses `bytes` (or, on v2, whenever
    /// `memory.events` changes, which includes going over `memory.high`): v1 through
    /// `cgroup.event_control` and an eventfd, v2 through inotify.
    pub fn memory_watch(&self, bytes: u64) -> Result<OwnedFd, CgroupError> {
        let err = |path: &Path, value: &str, e: rustix::io::Errno| CgroupError::Write {
            path: path.to_path_buf(),
            value: value.to_owned(),
            source: e.into(),
        };
        if self.v2 {
            let events = self.memory.join("memory.events");
            let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
                .map_err(|e| err(&events, "inotify", e))?;
            inotify::add_watch(&fd, &events, inotify::WatchFlags::MODIFY)
                .map_err(|e| err(&events, "inotify", e))?;
            Ok(fd)
        } else {
            let usage = self.memory.join("memory.usage_in_bytes");
            let efd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
                .map_err(|e| err(&usage, "eventfd", e))?;
            let usage_file = fs::File::open(&usage).map_err(|source| CgroupError::Read {
                path: usage.clone(),
                source,
            })?;
            let control = self.memory.join("cgroup.event_control");
            let value = format!(
                "{} {} {bytes}",
                rustix::fd::AsRawFd::as_raw_fd(&efd.as_fd()),
                rustix::fd::AsRawFd::as_raw_fd(&usage_file)
            );
            write(&control, &value)?;
            // The kernel holds its own reference to the usage file once registered.
            drop(usage_file);
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

    const HYBRID_MOUNTINFO: &str = "\
25 19 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 25 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 25 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";
    const HYBRID_CGROUP: &str = "8:pids:/\n4:memory:/process_api/abc\n0::/\n";

    #[test]
    fn detects_hybrid_as_v1_when_v2_lacks_controllers() {
        let l = Layout::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| {
            Some("hugetlb\n".into())
        })
        .unwrap();
        let Layout::V1 { memory, pids } = &l else {
            panic!("{l:?}")
        };
        assert_eq!(memory.mount, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(memory.own, "/process_api/abc");
        assert_eq!(pids.own, "/");
        // Relative parents go below guardian's own cgroup, absolute ones below the root.
        let c = ServiceCgroup::plan(&l, "gtest", "svc");
        assert_eq!(
            c.memory,
            Path::new("/sys/fs/cgroup/memory/process_api/abc/gtest/svc")
        );
        assert_eq!(c.pids, Path::new("/sys/fs/cgroup/pids/gtest/svc"));
        let c = ServiceCgroup::plan(&l, "/guardian", "svc");
        assert_eq!(c.memory, Path::new("/sys/fs/cgroup/memory/guardian/svc"));
    }

    #[test]
    fn detects_v2_with_controllers_and_container_roots() {
        let mi = "30 25 0:27 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let l = Layout::from_proc(mi, "0::/kubepods/pod1/app\n", |_| {
            Some("cpuset cpu io memory pids\n".into())
        })
        .unwrap();
        let c = ServiceCgroup::plan(&l, "g", "svc");
        assert_eq!(c.memory, Path::new("/sys/fs/cgroup/app/g/svc"));
        assert!(Layout::from_proc("", "", |_| None).is_err());
    }

    /// The v2 code path against a scratch directory laid out like cgroupfs (this machine's v2
    /// hierarchy has no memory or pids controller; the VM matrix runs it for real).
    #[test]
    fn v2_paths_limits_counters_in_a_scratch_tree() {
        eprintln!(
            "cgroup v2 code path exercised on a scratch directory laid out like cgroupfs \
             (the privileged suite runs it for real where the memory and pids controllers are on v2)"
        );
        let root = std::env::temp_dir().join(format!("guardian-cg-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("cgroup.subtree_control"), "cpu").unwrap();
        let mi = format!("30 25 0:27 / {} rw - cgroup2 cgroup2 rw\n", root.display());
        let l = Layout::from_proc(&mi, "0::/\n", |_| Some("memory pids".into())).unwrap();
        let mut c = ServiceCgroup::plan(&l, "/guardian", "svc");
        c.create(&l).unwrap();
        assert_eq!(
            c.created,
            vec![root.join("guardian"), root.join("guardian/svc")]
        );
        // Controllers enabled on the way down, without repeating those already on.
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(
            fs::read_to_string(root.join("guardian/cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        let b = Budgets {
            tasks_max: Some(8),
            memory_max: Some(200 << 20),
            memory_high: Some(100 << 20),
        };
        c.write_limits(&b).unwrap();
        let dir = root.join("guardian/svc");
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
        assert_eq!(
            c.counters(),
            Counters {
                pids_max: 3,
                oom_kills: 1,
                high: 5
            }
        );
        fs::write(dir.join("memory.current"), "1234\n").unwrap();
        assert_eq!(c.memory_usage(), Some(1234));
        c.add(4242).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "4242"
        );
        assert!(!c.is_empty());
        assert!(!c.remove(), "never removes a cgroup with processes");
        assert!(dir.exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_limits_use_v1_files() {
        let l = Layout::from_proc(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| None).unwrap();
        let c = ServiceCgroup::plan(&l, "/guardian", "svc");
        let b = Budgets {
            tasks_max: Some(8),
            memory_max: Some(200 << 20),
            memory_high: Some(100 << 20),
        };
        let files: Vec<String> = c
            .limits(&b)
            .iter()
            .map(|l| format!("{}={}", l.path.display(), l.value))
            .collect();
        assert_eq!(
            files,
            vec![
                "/sys/fs/cgroup/pids/guardian/svc/pids.max=8",
                "/sys/fs/cgroup/memory/guardian/svc/memory.limit_in_bytes=209715200",
                "/sys/fs/cgroup/memory/guardian/svc/memory.soft_limit_in_bytes=104857600",
            ]
        );
    }
}
