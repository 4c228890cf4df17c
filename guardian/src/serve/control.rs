//! The control socket: `guardian status` and `guardian explain` ask the running daemon.
//!
//! A Unix stream socket, created 0600 in a directory only its owner may enter (0700): only
//! root (the daemon's user) can connect, and the peer's credentials are checked again on every
//! connection. One request per connection: a JSON line in, a JSON line out.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
        net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

/// Where the daemon listens unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/guardian/control.sock";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;
/// A client has this long to send its request, and the daemon this long to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum Query {
    Status,
    /// Read the policy again; answered once it is in force (or refused).
    Reload,
    /// With `text`, the explanation comes rendered for a terminal (a JSON string); otherwise
    /// as its JSON object.
    Explain {
        pid: u32,
        #[serde(default)]
        text: bool,
    },
}

/// The daemon's answer: a JSON value, or why there is none.
pub type Answer = Result<serde_json::Value, String>;

/// A query on its way to the event loop, with where its answer goes.
pub struct Ask {
    pub query: Query,
    pub reply: oneshot::Sender<Answer>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(serde_json::Value),
    Error(String),
}

/// Creates the socket (and its directory) now, so that problems are start-up errors.
pub fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .with_context(|| format!("--socket {}: needs a directory", path.display()))?;
    let euid = rustix::process::geteuid().as_raw();
    if !dir.exists() {
        // `/run` itself may be missing (a minimal container or VM).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
        bail!(
            "{}: the control socket's directory must be a directory of guardian's user only \
             (mode 0700); it is {:o}, owner uid {}",
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid()
        );
    }
    match StdUnixStream::connect(path) {
        Ok(_) => bail!(
            "{}: another guardian is answering on this control socket (give this one --socket)",
            path.display()
        ),
        // A socket left by a guardian that was killed: nobody answers it.
        Err(_) if path.exists() => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?
        }
        Err(_) => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("{}: cannot listen", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}: chmod 0600", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Removes the socket file when dropped: at a clean stop, and when start-up fails after it was
/// bound.
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Accepts connections until the process ends; each query is handed to the event loop.
pub async fn serve(listener: std::os::unix::net::UnixListener, asks: mpsc::Sender<Ask>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("control socket unusable: {e}");
            return;
        }
    };
    let euid = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                debug!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let asks = asks.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, euid, asks).await {
                debug!("control connection: {e:#}");
            }
        });
    }
}

async fn connection(
    mut stream: UnixStream,
    euid: u32,
    asks: mpsc::Sender<Ask>,
) -> anyhow::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let reply = if uid != 0 && uid != euid {
        warn!(uid, "control socket: refused a client that is not root");
        Reply::Error("refused: only root may ask guardian".into())
    } else {
        let mut line = String::new();
        let mut reader =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(&mut stream, MAX_REQUEST));
        tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
            .await
            .context("no request in time")??;
        match serde_json::from_str::<Query>(&line) {
            Err(e) => Reply::Error(format!("bad request: {e}")),
            Ok(query) => {
                let (tx, rx) = oneshot::channel();
                match asks.try_send(Ask { query, reply: tx }) {
                    Err(_) => Reply::Error("busy: try again".into()),
                    Ok(()) => match tokio::time::timeout(IO_TIMEOUT, rx).await {
                        Ok(Ok(Ok(v))) => Reply::Ok(v),
                        Ok(Ok(Err(e))) => Reply::Error(e),
                        _ => Reply::Error("the daemon did not answer".into()),
                    },
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, stream.write_all(&out))
        .await
        .context("client not reading")??;
    Ok(())
}

/// Asks the daemon listening on `socket` (the client side of `status` and `explain`).
pub fn ask(socket: &Path, query: &Query) -> anyhow::Result<serde_json::Value> {
    let mut stream = StdUnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => " (only root may ask guardian)",
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is guardian running? its --socket must be the same)"
            }
            _ => "",
        };
        anyhow::anyhow!("{}: {e}{hint}", socket.display())
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT * 2))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = serde_json::to_vec(query)?;
    line.push(b'\n');
    // A client the daemon refuses gets its answer without its request being read: the write
    // may then fail (broken pipe) with the answer waiting to be read.
    let sent = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        sent.with_context(|| format!("{}: sending the request", socket.display()))?;
        read.with_context(|| format!("{}: no answer", socket.display()))?;
        bail!("{}: no answer", socket.display());
    }
    match serde_json::from_str::<Reply>(&answer)
        .with_context(|| format!("{}: unreadable answer", socket.display()))?
    {
        Reply::Ok(v) => Ok(v),
        Reply::Error(e) => bail!("guardian: {e}"),
    }
}

/// The default socket, or the one given.
pub fn socket_path(given: Option<&Path>) -> PathBuf {
    given.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_one_json_object() {
        let q = serde_json::to_string(&Query::Explain {
            pid: 42,
            text: false,
        })
        .unwrap();
        assert_eq!(q, r#"{"query":"explain","pid":42,"text":false}"#);
        assert_eq!(
            serde_json::from_str::<Query>(r#"{"query":"status"}"#).unwrap(),
            Query::Status
        );
        assert!(serde_json::from_str::<Query>(r#"{"query":"kill","pid":1}"#).is_err());
    }

    #[test]
    fn a_directory_others_can_enter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = bind(&dir.path().join("control.sock")).unwrap_err();
        assert!(err.to_string().contains("mode 0700"), "{err}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = dir.path().join("control.sock");
        let _l = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second daemon on the same socket is refused while the first answers.
        assert!(bind(&sock)
            .unwrap_err()
            .to_string()
            .contains("another guardian"));
    }
}
