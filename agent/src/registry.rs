//! The node's engine registry: one slot per live engine (the agent and every `chaosctl
//! --local`), whatever its journal directory.
//!
//! An engine holds an exclusive flock on `<dir>/<slot>.lock` for its whole life. The kernel
//! drops a flock when its holder dies, however it dies, so "is the engine of slot N alive" is
//! one non-blocking flock away and needs no pid (a containerized agent's pids are not the
//! host's). What an engine may put in places engines share is named by its slot: its clsact
//! filter priorities (`datapath::clsact_priority`), so no engine ever replaces or removes
//! another's filter. The slot file also says where its holder's journal is, so a sweep can tell
//! which of our roots a live engine claims.
//!
//! `<dir>/sites.lock` orders shaping changes (engines hold it shared from the journal's intent
//! until the root exists, and from the root's removal until the journal no longer names it)
//! against the sweep (exclusive), so a sweep never reads claims between the two.
use crate::journal::Owner;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_DIR: &str = "/run/chaos/engines";
/// Engines per node; a clsact priority range of two per slot.
pub const SLOTS: u16 = 64;

/// What a slot's holder wrote about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub owner: Owner,
    /// Its journal file (as its mount namespace sees it: the DaemonSet mounts /run/chaos at the
    /// same path as the host).
    pub journal: PathBuf,
}

/// A held slot: released when dropped or when the process dies.
pub struct Registration {
    slot: u16,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("slot", &self.slot)
            .finish()
    }
}

fn slot_path(dir: &Path, slot: u16) -> PathBuf {
    dir.join(format!("{slot}.lock"))
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

impl Registration {
    /// Takes the lowest free slot in `dir` and writes `record` into it.
    pub fn claim(dir: &Path, record: &Record) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for slot in 0..SLOTS {
            match Flock::lock(
                open(&slot_path(dir, slot))?,
                FlockArg::LockExclusiveNonblock,
            ) {
                Ok(mut lock) => {
                    lock.set_len(0)?;
                    lock.rewind()?;
                    lock.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
                    return Ok(Registration { slot, _lock: lock });
                }
                Err((_, Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(e.into()),
            }
        }
        Err(io::Error::other(format!(
            "all {SLOTS} engine slots in {} are held by live engines (at most {SLOTS} engines per node)",
            dir.display()
        )))
    }

    pub fn slot(&self) -> u16 {
        self.slot
    }
}

/// One slot as a sweep sees it.
#[derive(Debug, Clone)]
pub struct Slot {
    pub slot: u16,
    pub live: bool,
    /// What its (last) holder wrote; `None` if unreadable.
    pub record: Option<Record>,
}

/// Every slot that has a file in `dir`, live or not. A missing directory has none.
pub fn slots(dir: &Path) -> io::Result<Vec<Slot>> {
    let mut out = Vec::new();
    for slot in 0..SLOTS {
        let path = slot_path(dir, slot);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let (live, mut file) = match Flock::lock(file, FlockArg::LockSharedNonblock) {
            // We got it: nobody holds it exclusively. Read, then let go at once.
            Ok(lock) => (false, lock.unlock().map_err(|(_, e)| io::Error::from(e))?),
            Err((file, Errno::EWOULDBLOCK)) => (true, file),
            Err((_, e)) => return Err(e.into()),
        };
        let mut data = Vec::new();
        let record = file
            .read_to_end(&mut data)
            .ok()
            .and_then(|_| serde_json::from_slice(&data).ok());
        out.push(Slot { slot, live, record });
    }
    Ok(out)
}

/// The shaping-sites lock, shared (an engine changing a site) or exclusive (a sweep).
pub struct SitesLock(#[allow(dead_code)] Flock<File>);

pub fn lock_sites(dir: &Path, exclusive: bool) -> io::Result<SitesLock> {
    std::fs::create_dir_all(dir)?;
    let arg = if exclusive {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockShared
    };
    Flock::lock(open(&dir.join("sites.lock"))?, arg)
        .map(SitesLock)
        .map_err(|(_, e)| e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            owner: Owner::current().expect("owner"),
            journal: PathBuf::from("/nowhere/1.json"),
        }
    }

    #[test]
    fn slots_are_exclusive_and_freed_on_drop() {
        let dir = std::env::temp_dir().join(format!("chaos-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Registration::claim(&dir, &record()).expect("a");
        let b = Registration::claim(&dir, &record()).expect("b");
        assert_eq!((a.slot(), b.slot()), (0, 1));
        let live = |dir| -> Vec<u16> {
            slots(dir)
                .expect("slots")
                .iter()
                .filter(|s| s.live)
                .map(|s| s.slot)
                .collect()
        };
        assert_eq!(live(&dir), vec![0, 1]);
        drop(a);
        assert_eq!(live(&dir), vec![1], "a dropped registration frees its slot");
        let seen = slots(&dir).expect("slots");
        assert_eq!(seen.len(), 2);
        assert!(!seen[0].live && seen[1].live);
        assert_eq!(
            seen[0].record,
            Some(record()),
            "a dead slot still says whose it was"
        );
        let c = Registration::claim(&dir, &record()).expect("c");
        assert_eq!(c.slot(), 0, "the lowest free slot is reused");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
