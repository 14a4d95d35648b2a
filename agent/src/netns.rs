//! Running kernel work inside a target network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread*. Doing it on a tokio or
//! main thread would silently move unrelated work (the agent's own sockets, other faults) into
//! the target namespace, so every operation runs on a fresh thread that enters the namespace,
//! does its work and exits (invariant 7).
use crate::spec::NetnsRef;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid {field}: {path} does not exist")]
    Missing { field: &'static str, path: PathBuf },
    #[error("invalid {field}: {path} is not a network namespace")]
    NotNetns { field: &'static str, path: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {path}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("netns worker thread: {0}")]
    Thread(String),
    /// A bug, not input: pods are resolved to a process before a namespace is opened, and a
    /// pod must never fall back to the current (host) namespace.
    #[error("the netns of pod {0} was not resolved to a process")]
    Unresolved(String),
}

/// Whether `file` is a network namespace (NS_GET_NSTYPE answers CLONE_NEWNET): a regular file
/// or another kind of namespace is the user's mistake, said so before anything starts, not a
/// failed setns later.
fn is_netns(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: an ioctl without arguments on a descriptor we own; it only reads.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

/// The identity of a namespace (device and inode of its nsfs file), so a journal entry is never
/// applied to a different namespace that reuses a name or a pid.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// An opened target namespace; holding the file keeps the namespace alive while we work in it.
pub struct Netns {
    file: Option<File>,
    pub path: Option<PathBuf>,
    pub id: NetnsId,
}

impl Netns {
    pub fn open(target: &NetnsRef) -> Result<Self, NetnsError> {
        let field = match target {
            NetnsRef::Pid(_) => "--pid",
            NetnsRef::Pod(uid) => return Err(NetnsError::Unresolved(uid.clone())),
            _ => "--netns",
        };
        let Some(path) = target.path() else {
            return Self::open_path(Path::new("/proc/thread-self/ns/net"), field).map(|mut n| {
                n.file = None;
                n.path = None;
                n
            });
        };
        Self::open_path(&path, field)
    }

    pub fn open_path(path: &Path, field: &'static str) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Missing {
                field,
                path: path.to_path_buf(),
            },
            _ => NetnsError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
        use NetnsError::Missing;
        if !is_netns(&file) {
            return Err(NetnsError::NotNetns {
                field,
                path: path.to_path_buf(),
            });
        }
        let meta = file.metadata().map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Netns {
            file: Some(file),
            path: Some(path.to_path_buf()),
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// Runs `f` on a dedicated thread inside this namespace and returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = match &self.file {
            Some(f) => Some(f.try_clone().map_err(|source| NetnsError::Open {
                path: self.display_path(),
                source,
            })?),
            None => None,
        };
        let path = self.display_path();
        std::thread::Builder::new()
            .name("chaos-netns".into())
            .spawn(move || {
                if let Some(file) = file {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|source| NetnsError::Setns { path, source })?;
                }
                Ok(f())
            })
            .map_err(|e| NetnsError::Thread(e.to_string()))?
            .join()
            .map_err(|_| NetnsError::Thread("panicked".into()))?
    }

    fn display_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from("(current)"))
    }
}
