//! What a host fault must undo, named in the journal so that the next engine can undo it when
//! neither the engine nor its [guard](crate::guard) could.
use crate::journal::{self, Owner};
use crate::stress::{pidfd_open, pidfd_send_signal};
use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// What a host fault left that must be undone, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Undo {
    /// A v2 cgroup directory whose `cgroup.freeze` we set.
    CgroupV2(PathBuf),
    /// A v1 freezer cgroup directory whose `freezer.state` we set.
    CgroupV1(PathBuf),
    /// A process we sent SIGSTOP.
    Stopped(Owner),
    /// A disk-fill's file, by the path the engine sees it at and its identity (a file that is
    /// not this one by device and inode is never unlinked).
    File { path: PathBuf, dev: u64, ino: u64 },
    /// A process whose vDSO holds the clock-skew stub (it reads true time once its owner's
    /// heartbeat is old, but through a system call: slower until restored).
    Vdso(Owner),
}

impl Undo {
    pub fn method(&self) -> &'static str {
        match self {
            Undo::CgroupV2(_) => "freezer/v2",
            Undo::CgroupV1(_) => "freezer/v1",
            Undo::Stopped(_) => "signal/stop",
            Undo::File { .. } => "fallocate",
            Undo::Vdso(_) => "vdso+bpf",
        }
    }
}

/// A cgroup freezer file and the text that thaws it.
pub fn freezer_file(f: &Undo) -> Option<(PathBuf, &'static [u8], &'static [u8])> {
    match f {
        Undo::CgroupV2(d) => Some((d.join("cgroup.freeze"), b"1", b"0")),
        Undo::CgroupV1(d) => Some((d.join("freezer.state"), b"FROZEN", b"THAWED")),
        Undo::Stopped(_) | Undo::File { .. } | Undo::Vdso(_) => None,
    }
}

/// Whether a freezer cgroup is frozen through and through (v2: `cgroup.events` says so once
/// every task is; v1: `freezer.state` reads FROZEN, not FREEZING). False for anything else.
pub fn cgroup_frozen(f: &Undo) -> bool {
    match f {
        Undo::CgroupV2(d) => std::fs::read_to_string(d.join("cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l == "frozen 1")),
        Undo::CgroupV1(d) => {
            std::fs::read_to_string(d.join("freezer.state")).is_ok_and(|t| t.trim() == "FROZEN")
        }
        Undo::Stopped(_) | Undo::File { .. } | Undo::Vdso(_) => false,
    }
}

/// Undoes what an earlier engine's journal names. Returns how many were undone.
pub fn reclaim(undo: &[Undo]) -> usize {
    let mut thawed = 0;
    for f in undo {
        match f {
            Undo::File { path, dev, ino } => {
                use std::os::unix::fs::MetadataExt;
                let ours = std::fs::symlink_metadata(path)
                    .is_ok_and(|m| m.is_file() && m.dev() == *dev && m.ino() == *ino);
                if ours && std::fs::remove_file(path).is_ok() {
                    thawed += 1;
                }
            }
            Undo::Vdso(o) => {
                if crate::clock::restore_left(o) {
                    thawed += 1;
                }
            }
            Undo::Stopped(o) => {
                let Ok(fd) = pidfd_open(o.pid) else { continue };
                if journal::start_time(o.pid).ok() == Some(o.start_time)
                    && pidfd_send_signal(fd.as_raw_fd(), libc::SIGCONT).is_ok()
                {
                    thawed += 1;
                }
            }
            _ => {
                if let Some((file, _, thaw)) = freezer_file(f)
                    && std::fs::write(&file, thaw).is_ok()
                {
                    thawed += 1;
                }
            }
        }
    }
    thawed
}
