//! Watching the policy file's directory, so that a changed policy is reloaded without a signal:
//! an edit saved in place or renamed over the file, and a Kubernetes ConfigMap update (the
//! kubelet writes a new timestamped directory and renames a `..data` symlink over the old one;
//! the policy file is a symlink through `..data`).

use std::{
    ffi::OsString,
    mem::MaybeUninit,
    os::{fd::OwnedFd, unix::ffi::OsStrExt as _},
    path::Path,
};

use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
use tokio::io::{unix::AsyncFd, Interest};

/// The kubelet's symlink to the ConfigMap's current contents.
const CONFIGMAP_DATA: &str = "..data";

pub struct PolicyWatch {
    fd: AsyncFd<OwnedFd>,
    /// The policy file's name in its directory.
    name: OsString,
}

impl PolicyWatch {
    pub fn new(policy: &Path) -> std::io::Result<Self> {
        let dir = match policy.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = policy
            .file_name()
            .ok_or_else(|| std::io::Error::other("the policy path names no file"))?
            .to_owned();
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::CLOSE_WRITE | WatchFlags::MOVED_TO | WatchFlags::CREATE,
        )?;
        // SAFETY: the inotify fd is owned by the wrapper and stays open as long as it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { fd, name })
    }

    /// Waits until events are waiting, then reads them all; whether one concerns the policy.
    pub async fn changed(&mut self) -> std::io::Result<bool> {
        let mut guard = self.fd.readable_mut().await?;
        guard.clear_ready();
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(guard.get_inner(), &mut buf);
        let mut relevant = false;
        loop {
            match reader.next() {
                Ok(event) => {
                    let name = event.file_name().map(|n| n.to_bytes()).unwrap_or_default();
                    relevant |= name == self.name.as_bytes() || name == CONFIGMAP_DATA.as_bytes();
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(relevant),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
