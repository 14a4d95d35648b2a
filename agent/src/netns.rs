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

/// The interface of the calling thread's network namespace's default route (IPv4 first, then
/// IPv6; the lowest metric wins), for a network fault that names none. Call it inside the
/// target namespace ([`Netns::run`]): /proc/thread-self/net is the thread's own namespace.
/// Without a default route, one line names the candidates.
pub fn default_route_interface() -> Result<String, crate::spec::InvalidInput> {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{f}"));
    let v4 = read("route").unwrap_or_default();
    let v6 = read("ipv6_route").unwrap_or_default();
    if let Some(i) = default_route(&v4, &v6) {
        return Ok(i);
    }
    let candidates: Vec<String> = read("dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
        .filter(|n| n != "lo")
        .collect();
    Err(crate::spec::invalid(
        "--interface",
        if candidates.is_empty() {
            "is required: the target's network namespace has no default route and no interface but lo".to_string()
        } else {
            format!(
                "is required: the target's network namespace has no default route; one of: lo, {}",
                candidates.join(", ")
            )
        },
    ))
}

/// The default route's interface in /proc/net/route and /proc/net/ipv6_route text.
fn default_route(v4: &str, v6: &str) -> Option<String> {
    // Iface Destination Gateway Flags RefCnt Use Metric Mask ... (hex, host order); RTF_UP = 1.
    let ipv4 = v4.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
        (up && f.get(1)? == &"00000000" && f.get(7)? == &"00000000")
            .then(|| Some((u32::from_str_radix(f.get(6)?, 16).ok()?, f[0].to_string())))?
    });
    // dest prefixlen src srclen nexthop metric refcnt use flags iface; RTF_REJECT = 0x200 marks
    // the kernel's unreachable entries on lo.
    let ipv6 = v6.lines().filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
        let default = f.first()?.bytes().all(|b| b == b'0') && f.get(1)? == &"00";
        (default && flags & 0x200 == 0 && flags & 1 == 1 && f.get(9)? != &"lo")
            .then(|| Some((u32::from_str_radix(f.get(5)?, 16).ok()?, f[9].to_string())))?
    });
    ipv4.min().or_else(|| ipv6.min()).map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::default_route;

    #[test]
    fn the_default_route_names_the_interface() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth1\t000A0A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  wlan0\t00000000\t010A0A0A\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t010B0A0A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(default_route(v4, "").as_deref(), Some("eth0"));
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     veth6\n";
        assert_eq!(default_route("Iface\n", v6).as_deref(), Some("veth6"));
        // Only a link route and the unreachable entry on lo: no default.
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                  eth1\t000A0A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_route(v4, &v6[..v6.find('\n').unwrap()]), None);
    }
}
