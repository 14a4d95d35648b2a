//! The journal: what this engine has put in the kernel, written atomically before and after each
//! change, so a later run can find and remove what a crashed one left behind.
//!
//! One file per engine instance (`<pid>.json`), so `chaosctl --local` and the daemon can run side
//! by side. A file whose owner is gone (pid dead, or reused by a process that started at another
//! time) is an orphan.
use crate::datapath::{AttachmentRecord, ShapingSite};
use crate::netns::NetnsId;
use crate::qdisc::Snapshot;
use crate::spec::FaultSpec;
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): tells pid reuse apart.
    pub start_time: u64,
}

impl Owner {
    pub fn current() -> io::Result<Self> {
        let pid = std::process::id();
        Ok(Owner {
            pid,
            start_time: start_time(pid)?,
        })
    }

    pub fn is_alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|t| t == self.start_time)
    }
}

/// A process's start time in clock ticks since boot: with the pid, it names one process.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("malformed /proc/{pid}/stat")))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub spec: FaultSpec,
    pub deadline_unix_ms: u64,
    pub netns_path: Option<PathBuf>,
    pub netns_id: NetnsId,
    pub attachments: Vec<AttachmentRecord>,
    /// CPU stress workers (pid and start time), so a later engine kills any that survived.
    #[serde(default)]
    pub workers: Vec<Owner>,
    /// What a host fault must undo (a frozen cgroup, stopped processes, a file), so a later
    /// engine undoes it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo: Vec<crate::undo::Undo>,
}

/// A device where this engine put its root qdisc (shared by its shaping faults there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteEntry {
    pub site: ShapingSite,
    pub netns_path: Option<PathBuf>,
    pub netns_id: NetnsId,
    /// The other tool's tree our root replaced (`--force`), to put back.
    pub replaced: Option<Snapshot>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JournalFile {
    pub owner: Owner,
    pub faults: Vec<Entry>,
    #[serde(default)]
    pub sites: Vec<SiteEntry>,
}

pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    owner: Owner,
}

impl Journal {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let owner = Owner::current()?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            path: dir.join(format!("{}.json", owner.pid)),
            owner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a write is staged before its rename: named by pid *and* start time, so no two
    /// engines (nor a reused pid) ever share one, and a reader can tell whose it is.
    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!(
            "{}.{}.json.tmp",
            self.owner.pid, self.owner.start_time
        ))
    }

    /// Replaces the journal with `faults`: write a temporary file, fsync, rename over the old
    /// one, fsync the directory. A reader sees the old or the new journal, never half of one.
    pub fn write(&self, faults: &[Entry], sites: &[SiteEntry]) -> io::Result<()> {
        if faults.is_empty() && sites.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let file = JournalFile {
            owner: self.owner,
            faults: faults.to_vec(),
            sites: sites.to_vec(),
        };
        let tmp = self.tmp_path();
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&file).map_err(io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Journals left by engines that are no longer running.
    pub fn orphans(&self) -> io::Result<Vec<(PathBuf, JournalFile)>> {
        orphans_in(&self.dir, &self.path)
    }
}

/// Journals in `dir` left by engines that are no longer running (`own` is never one).
pub fn orphans_in(dir: &Path, own: &Path) -> io::Result<Vec<(PathBuf, JournalFile)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path == own {
            continue;
        }
        if path.extension().is_some_and(|e| e == "tmp") {
            // A dead engine's interrupted write (the rename never happened, so its real
            // file is current) goes; a live engine's write in flight is its own business.
            if tmp_owner(&path).is_none_or(|o| !o.is_alive()) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<JournalFile>(&data) {
            Ok(file) if !file.owner.is_alive() => out.push((path, file)),
            Ok(_) => {}
            Err(e) => tracing::warn!(path = %path.display(), "unreadable journal: {e}"),
        }
    }
    Ok(out)
}

/// The engine a staged write (`<pid>.<start time>.json.tmp`) belongs to; `None` for any other
/// name (an older engine's `<pid>.json.tmp`, which a live engine no longer writes).
fn tmp_owner(path: &Path) -> Option<Owner> {
    let name = path.file_name()?.to_str()?.strip_suffix(".json.tmp")?;
    let (pid, start_time) = name.split_once('.')?;
    Some(Owner {
        pid: pid.parse().ok()?,
        start_time: start_time.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{AttachMode, Hook};
    use crate::spec::{Direction, FaultKind, NetnsRef, Protocol, Target};
    use std::time::Duration;

    fn entry(id: &str) -> Entry {
        Entry {
            id: id.into(),
            spec: FaultSpec {
                kind: FaultKind::Partition,
                target: Target {
                    netns: NetnsRef::Current,
                    interface: "eth0".into(),
                    remote: vec!["10.0.0.0/8".parse().unwrap()],
                    local: vec![],
                    ports: vec!["80".parse().unwrap()],
                    protocol: Protocol::Tcp,
                    direction: Direction::Both,
                    force: false,
                },
                duration: Duration::from_secs(30),
            },
            deadline_unix_ms: 1,
            netns_path: None,
            netns_id: NetnsId { dev: 1, ino: 2 },
            attachments: vec![AttachmentRecord {
                interface: "eth0".into(),
                hook: Hook::Egress,
                mode: AttachMode::Clsact,
                priority: 0x0C00,
                handle: 0xC4A0_0001,
                created_clsact: true,
            }],
            workers: vec![Owner {
                pid: 4242,
                start_time: 17,
            }],
            undo: vec![],
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("chaos-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn write_replaces_atomically_and_empty_removes() {
        let dir = tempdir("write");
        let j = Journal::open(&dir).unwrap();
        j.write(&[entry("f-1"), entry("f-2")], &[]).unwrap();
        let file: JournalFile = serde_json::from_slice(&std::fs::read(j.path()).unwrap()).unwrap();
        assert_eq!(file.faults.len(), 2);
        assert_eq!(file.faults[0], entry("f-1"), "round trip");
        assert_eq!(file.owner, Owner::current().unwrap());
        assert!(!j.tmp_path().exists(), "temporary file left");
        j.write(&[], &[]).unwrap();
        assert!(!j.path().exists(), "an empty journal is no file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn orphans_are_files_of_dead_or_reused_owners() {
        let dir = tempdir("orphans");
        let j = Journal::open(&dir).unwrap();
        j.write(&[entry("mine")], &[]).unwrap();
        let me = Owner::current().unwrap();
        let write = |name: &str, owner: Owner| {
            let f = JournalFile {
                owner,
                faults: vec![entry(name)],
                sites: vec![],
            };
            std::fs::write(
                dir.join(format!("{name}.json")),
                serde_json::to_vec(&f).unwrap(),
            )
            .unwrap();
        };
        // pid 1 is alive but started at another time than recorded: pid reuse, so an orphan.
        write(
            "reused",
            Owner {
                pid: 1,
                start_time: u64::MAX,
            },
        );
        // A pid that cannot exist.
        write(
            "dead",
            Owner {
                pid: u32::MAX - 1,
                start_time: 1,
            },
        );
        // Our own process under another file name: alive, not an orphan.
        write("alive", me);
        std::fs::write(dir.join("half.json.tmp"), b"{").unwrap();
        let dead_tmp = dir.join(format!("{}.1.json.tmp", u32::MAX - 1));
        std::fs::write(&dead_tmp, b"{").unwrap();
        // Another live engine's write in flight (here: ours, as if from another journal).
        let live_tmp = dir.join(format!("{}.{}.json.tmp", me.pid, me.start_time));
        std::fs::write(&live_tmp, b"{").unwrap();
        let mut names: Vec<String> = j
            .orphans()
            .unwrap()
            .into_iter()
            .map(|(_, f)| f.faults[0].id.clone())
            .collect();
        names.sort();
        assert_eq!(names, ["dead", "reused"]);
        assert!(
            !dir.join("half.json.tmp").exists() && !dead_tmp.exists(),
            "interrupted writes of dead engines not cleaned"
        );
        assert!(live_tmp.exists(), "a live engine's write in flight deleted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
