//! Process faults: finding the target processes, freezing them (process-pause) and signalling
//! them (process-kill).
//!
//! **Which processes.** `--pid P` is P and its descendants (never the rest of its cgroup);
//! `--cgroup PATH` every process in that cgroup and below it, in any hierarchy where it exists;
//! `--pod-uid` the pod's container processes (its sandbox is spared). `--name` keeps those
//! whose name (comm) or command line matches. Kernel threads are never targets, and neither is
//! this engine or any of its ancestors (freezing one would hang the engine, or its caller).
//! Every process is held through a pidfd whose start time was checked after it was opened, so
//! a pid reused between the scan and the signal is never touched.
//!
//! **How a pause ends without us.** Before anything is frozen, a [guard](crate::guard) is
//! forked holding what the thaw needs (the cgroup's freeze file, or pidfds of the stopped
//! processes): it thaws when the engine dies or at the deadline. The journal names what was
//! frozen, so if the engine and the guard die together (a container's cgroup killed whole)
//! the next engine thaws it.
//!
//! **Freezer or signal.** A whole cgroup (no `--name`) is frozen by the cgroup v2 freezer
//! (`cgroup.freeze`) or else the v1 freezer (`freezer.state`), which also holds processes the
//! target forks meanwhile. Otherwise each process gets SIGSTOP (and SIGCONT at the end): the
//! freezer cannot freeze part of a cgroup.
use crate::cgroup;
use crate::guard::{Guard, Op};
use crate::journal::{self, Owner};
use crate::spec::{InvalidInput, ProcessRef, invalid, name_pattern};
use crate::stress::{pidfd_open, pidfd_send_signal};
use crate::undo::{Undo, cgroup_frozen, freezer_file};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("freeze {path}: {source}")]
    Freeze { path: PathBuf, source: io::Error },
    #[error("{what} did not freeze within {timeout:?}")]
    FreezeTimeout { what: String, timeout: Duration },
    #[error("start the thaw guard: {0}")]
    Guard(io::Error),
    #[error("thaw {what}: {source}")]
    Thaw { what: String, source: io::Error },
    #[error("start the process-kill thread: {0}")]
    Thread(io::Error),
}

/// How long an apply waits for the target to be frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds of "stop what was found, look again" for a process tree that forks meanwhile.
const STOP_ROUNDS: usize = 8;

/// One target process, pinned by a pidfd.
pub(crate) struct Proc {
    pub(crate) owner: Owner,
    pub(crate) pidfd: OwnedFd,
}

/// What one scan found: how many processes were in scope and the ones that matched.
pub(crate) struct Found {
    pub(crate) seen: u64,
    pub(crate) procs: Vec<Proc>,
}

/// A process as /proc/PID/stat shows it.
struct Stat {
    ppid: u32,
    state: char,
    start: u64,
    kernel_thread: bool,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    const PF_KTHREAD: u64 = 0x0020_0000;
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        kernel_thread: f.get(6)?.parse::<u64>().ok()? & PF_KTHREAD != 0,
        start: f.get(19)?.parse().ok()?,
    })
}

fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` has a SIGSTOP pending: it stops the moment it leaves the kernel, so it runs
/// none of its own code until a SIGCONT (which discards the pending stop). A shell that
/// vfork()ed a child we stopped before its exec waits so, in state D, until that child runs.
pub fn stop_pending(pid: u32) -> bool {
    const SIGSTOP_BIT: u64 = 1 << (libc::SIGSTOP - 1);
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|t| {
        t.lines()
            .filter_map(|l| {
                l.strip_prefix("SigPnd:")
                    .or_else(|| l.strip_prefix("ShdPnd:"))
            })
            .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
            .any(|mask| mask & SIGSTOP_BIT != 0)
    })
}

/// `pid` and its descendants: down from `pid` through each thread's
/// `/proc/PID/task/TID/children`, a few reads however many processes the node runs (a full
/// scan of /proc took 2-3 ms of the 10 ms in which a pause should have frozen its target).
/// Children forked meanwhile may be missed; the pause's next round finds them. Where the
/// kernel has no such files (CONFIG_PROC_CHILDREN), from every process's parent.
fn tree(pid: u32) -> BTreeSet<u32> {
    if !Path::new("/proc/thread-self/children").exists() {
        return tree_by_parents(pid);
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if !out.insert(p) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `pid` and its descendants, from every process's parent.
fn tree_by_parents(pid: u32) -> BTreeSet<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in all_pids() {
        if let Some(s) = stat(p) {
            children.entry(s.ppid).or_default().push(p);
        }
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if out.insert(p) {
            todo.extend(children.get(&p).into_iter().flatten());
        }
    }
    out
}

/// The processes in cgroup directory `dir` and below it.
fn cgroup_procs(dir: &Path, out: &mut BTreeSet<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_procs(&e.path(), out);
            }
        }
    }
}

/// This engine's process and its ancestors: never targets.
fn protected() -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let mut pid = std::process::id();
    while pid > 0 && out.insert(pid) {
        pid = stat(pid).map_or(0, |s| s.ppid);
    }
    out
}

fn field(target: &ProcessRef) -> &'static str {
    match target {
        ProcessRef::Pid(_) => "--pid",
        ProcessRef::Cgroup(_) => "--cgroup",
        ProcessRef::Pod(_) => "--pod-uid",
    }
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim_end()
                .to_string()
        })
        .unwrap_or_default()
}

/// The pids in the target's scope, before the name filter. A target that names nothing that
/// exists is bad input.
fn scope(target: &ProcessRef) -> Result<BTreeSet<u32>, InvalidInput> {
    match target {
        ProcessRef::Pid(pid) => {
            if stat(*pid).is_none() {
                return Err(invalid("--pid", format!("no process {pid}")));
            }
            Ok(tree(*pid))
        }
        ProcessRef::Cgroup(path) => {
            let placement = cgroup::resolve(&crate::spec::CgroupRef::Path(path.clone()))?;
            let mut out = BTreeSet::new();
            for dir in placement.dirs() {
                cgroup_procs(dir, &mut out);
            }
            Ok(out)
        }
        ProcessRef::Pod(uid) => {
            let pod = crate::pod::scan_uid(Path::new("/proc"), uid)?;
            Ok(pod.containers().into_values().flatten().collect())
        }
    }
}

/// Finds and pins the target's processes. With `strict`, a target that includes this engine or
/// an ancestor is refused (at apply); a later round of a kill loop skips them instead.
pub(crate) fn find(
    target: &ProcessRef,
    name: &str,
    strict: bool,
    skip: &BTreeSet<u32>,
) -> Result<Found, InvalidInput> {
    let pattern = (!name.is_empty()).then(|| name_pattern(name)).transpose()?;
    let protected = protected();
    let mut seen = 0;
    let mut procs = Vec::new();
    for pid in scope(target)? {
        let Some(s) = stat(pid) else { continue };
        if s.kernel_thread || skip.contains(&pid) {
            continue;
        }
        seen += 1;
        if let Some(re) = &pattern
            && !re.is_match(&comm(pid))
            && !re.is_match(&cmdline(pid))
        {
            continue;
        }
        if protected.contains(&pid) || pid == 1 {
            if strict {
                return Err(invalid(
                    field(target),
                    format!(
                        "{target} includes pid {pid} ({}), which is init, this engine or one of its ancestors; narrow it (--name) or pick another target",
                        comm(pid)
                    ),
                ));
            }
            continue;
        }
        // Pin it, then check it is still the process the scan saw.
        let Ok(pidfd) = pidfd_open(pid) else { continue };
        if journal::start_time(pid).ok() != Some(s.start) {
            continue;
        }
        procs.push(Proc {
            owner: Owner {
                pid,
                start_time: s.start,
            },
            pidfd,
        });
    }
    if strict && procs.is_empty() {
        let which = if name.is_empty() {
            String::new()
        } else {
            format!(" named /{name}/")
        };
        return Err(invalid(
            field(target),
            format!("{target} has no process{which} ({seen} in scope)"),
        ));
    }
    Ok(Found { seen, procs })
}

/// A paused target. Dropping it does not thaw: [`Paused::thaw`] does, and the guard does if
/// the engine never gets to.
pub struct Paused {
    frozen: Vec<Undo>,
    /// Open freezer files (cgroup target) or pidfds of the stopped processes (in `frozen`'s
    /// order for the stopped ones).
    freezer: Option<OwnedFd>,
    stopped: Vec<Proc>,
    guard: Guard,
    seen: u64,
    matched: u64,
}

impl Paused {
    /// Freezes `target` until `deadline`.
    pub fn start(
        target: &ProcessRef,
        name: &str,
        deadline: SystemTime,
    ) -> Result<Self, ProcessError> {
        let found = find(target, name, true, &BTreeSet::new())?;
        let freezer = match target {
            ProcessRef::Cgroup(path) if name.is_empty() => freezer_of(path)?,
            _ => None,
        };
        match freezer {
            Some((frozen, file)) => {
                let guard = Guard::spawn(
                    &[Op::Write(file.as_raw_fd(), freezer_thaw(&frozen))],
                    deadline,
                )
                .map_err(ProcessError::Guard)?;
                let mut paused = Paused {
                    frozen: vec![frozen],
                    freezer: Some(file),
                    stopped: Vec::new(),
                    guard,
                    seen: found.seen,
                    matched: found.procs.len() as u64,
                };
                if let Err(e) = paused.freeze_cgroup() {
                    let _ = paused.thaw();
                    return Err(e);
                }
                Ok(paused)
            }
            None => Self::stop_each(target, name, found, deadline),
        }
    }

    fn freeze_cgroup(&mut self) -> Result<(), ProcessError> {
        let Some(frozen) = self.frozen.first().cloned() else {
            return Ok(());
        };
        let Some((path, freeze, _)) = freezer_file(&frozen) else {
            return Ok(());
        };
        std::fs::write(&path, freeze).map_err(|source| ProcessError::Freeze {
            path: path.clone(),
            source,
        })?;
        let started = Instant::now();
        loop {
            if cgroup_frozen(&frozen) {
                return Ok(());
            }
            if started.elapsed() > FREEZE_TIMEOUT {
                return Err(ProcessError::FreezeTimeout {
                    what: path.display().to_string(),
                    timeout: FREEZE_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGSTOP to each process; then look again for children forked meanwhile, and stop them
    /// too. The guard is respawned with each round's pidfds (it must hold every one).
    fn stop_each(
        target: &ProcessRef,
        name: &str,
        found: Found,
        deadline: SystemTime,
    ) -> Result<Self, ProcessError> {
        let seen = found.seen;
        let mut stopped: Vec<Proc> = Vec::new();
        let mut next = found.procs;
        let mut guard: Option<Guard> = None;
        for _ in 0..STOP_ROUNDS {
            if next.is_empty() {
                break;
            }
            let fresh = next.len();
            stopped.append(&mut next);
            let ops: Vec<Op> = stopped
                .iter()
                .map(|p| Op::Signal(p.pidfd.as_raw_fd()))
                .collect();
            // The new guard holds every pidfd before the new ones are stopped; the old one goes.
            let new_guard = Guard::spawn(&ops, deadline).map_err(ProcessError::Guard)?;
            if let Some(old) = guard.replace(new_guard) {
                old.dismiss();
            }
            for p in &stopped[stopped.len() - fresh..] {
                let _ = pidfd_send_signal(p.pidfd.as_raw_fd(), libc::SIGSTOP);
            }
            let skip: BTreeSet<u32> = stopped.iter().map(|p| p.owner.pid).collect();
            next = find(target, name, false, &skip)?.procs;
        }
        let Some(guard) = guard else {
            return Err(ProcessError::Guard(io::Error::other("no process to stop")));
        };
        let mut paused = Paused {
            frozen: stopped.iter().map(|p| Undo::Stopped(p.owner)).collect(),
            freezer: None,
            matched: stopped.len() as u64,
            stopped,
            guard,
            seen,
        };
        if let Err(e) = paused.wait_stopped() {
            let _ = paused.thaw();
            return Err(e);
        }
        Ok(paused)
    }

    /// Waits until every stopped process that still lives shows state T, or holds our SIGSTOP
    /// in the kernel (see [`stop_pending`]).
    fn wait_stopped(&self) -> Result<(), ProcessError> {
        let started = Instant::now();
        loop {
            let pending = self.stopped.iter().find(|p| {
                stat(p.owner.pid).is_some_and(|s| !matches!(s.state, 'T' | 'Z'))
                    && !stop_pending(p.owner.pid)
            });
            let Some(p) = pending else { return Ok(()) };
            if started.elapsed() > FREEZE_TIMEOUT {
                return Err(ProcessError::FreezeTimeout {
                    what: format!("pid {}", p.owner.pid),
                    timeout: FREEZE_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What the journal must name.
    pub fn undo(&self) -> Vec<Undo> {
        self.frozen.clone()
    }

    /// The guard process (for the journal: a later engine kills a survivor).
    pub fn guard(&self) -> Owner {
        self.guard.owner()
    }

    pub fn method(&self) -> &'static str {
        self.frozen.first().map_or("signal/stop", Undo::method)
    }

    pub fn counters(&self) -> crate::spec::Counters {
        crate::spec::Counters {
            seen: self.seen,
            matched: self.matched,
            affected: self.matched,
            ..Default::default()
        }
    }

    /// Thaws the target (from the engine, so an error is seen here), then dismisses the guard.
    pub fn thaw(&mut self) -> Result<(), ProcessError> {
        let mut first_error = None;
        if let (Some(file), Some(frozen)) = (&self.freezer, self.frozen.first()) {
            let thaw = freezer_thaw(frozen);
            // SAFETY: writing our buffer to our descriptor.
            let r = unsafe { libc::pwrite(file.as_raw_fd(), thaw.as_ptr().cast(), thaw.len(), 0) };
            if r < 0 {
                first_error = Some(ProcessError::Thaw {
                    what: format!("{frozen:?}"),
                    source: io::Error::last_os_error(),
                });
            }
        }
        for p in &self.stopped {
            match pidfd_send_signal(p.pidfd.as_raw_fd(), libc::SIGCONT) {
                // ESRCH: it exited meanwhile; nothing to thaw.
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) && first_error.is_none() => {
                    first_error = Some(ProcessError::Thaw {
                        what: format!("pid {}", p.owner.pid),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        self.guard.stop();
        first_error.map_or(Ok(()), Err)
    }
}

fn freezer_thaw(f: &Undo) -> &'static [u8] {
    freezer_file(f).map_or(b"", |(_, _, thaw)| thaw)
}

/// The freezer for a whole cgroup: v2's `cgroup.freeze` where the cgroup exists in the v2
/// hierarchy, else v1's `freezer.state`; `None` when neither is there (SIGSTOP then).
fn freezer_of(path: &str) -> Result<Option<(Undo, OwnedFd)>, ProcessError> {
    let placement = cgroup::resolve(&crate::spec::CgroupRef::Path(path.to_string()))?;
    let candidates = placement
        .v2
        .iter()
        .map(|d| Undo::CgroupV2(d.clone()))
        .chain(placement.v1.iter().map(|d| Undo::CgroupV1(d.clone())));
    for f in candidates {
        let Some((file, _, _)) = freezer_file(&f) else {
            continue;
        };
        if !file.is_file() {
            continue;
        }
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|source| ProcessError::Freeze {
                path: file.clone(),
                source,
            })?;
        return Ok(Some((f, OwnedFd::from(opened))));
    }
    Ok(None)
}

/// A process-kill: the first round at apply, then (with an interval) a thread that signals
/// again every interval until it is stopped. The thread dies with the engine.
pub struct Killer {
    counters: Arc<KillCounters>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct KillCounters {
    seen: AtomicU64,
    matched: AtomicU64,
    signalled: AtomicU64,
    rounds: AtomicU64,
}

impl KillCounters {
    fn round(
        &self,
        target: &ProcessRef,
        name: &str,
        signal: i32,
        strict: bool,
    ) -> Result<(), InvalidInput> {
        let found = find(target, name, strict, &BTreeSet::new())?;
        let mut signalled = 0;
        for p in &found.procs {
            if pidfd_send_signal(p.pidfd.as_raw_fd(), signal).is_ok() {
                signalled += 1;
            }
        }
        self.seen.fetch_add(found.seen, Ordering::Relaxed);
        self.matched
            .fetch_add(found.procs.len() as u64, Ordering::Relaxed);
        self.signalled.fetch_add(signalled, Ordering::Relaxed);
        self.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Killer {
    pub fn start(
        target: &ProcessRef,
        name: &str,
        signal: i32,
        interval: Duration,
    ) -> Result<Self, ProcessError> {
        let counters = Arc::new(KillCounters::default());
        counters.round(target, name, signal, true)?;
        if interval.is_zero() {
            return Ok(Killer {
                counters,
                stop: None,
                thread: None,
            });
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let c = Arc::clone(&counters);
        let (target, name) = (target.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name("chaos-kill".into())
            .spawn(move || {
                // A message or the sender's drop ends the loop.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    if let Err(e) = c.round(&target, &name, signal, false) {
                        tracing::warn!("process-kill round: {e}");
                    }
                }
            })
            .map_err(ProcessError::Thread)?;
        Ok(Killer {
            counters,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Ends the loop (no further signal once this returns).
    pub fn stop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn rounds(&self) -> u64 {
        self.counters.rounds.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> crate::spec::Counters {
        let c = &self.counters;
        crate::spec::Counters {
            seen: c.seen.load(Ordering::Relaxed),
            matched: c.matched.load(Ordering::Relaxed),
            affected: c.signalled.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_and_its_ancestors_are_never_targets() {
        let own = std::process::id();
        let err = find(&ProcessRef::Pid(own), "", true, &BTreeSet::new())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("this engine or one of its ancestors"), "{err}");
    }

    /// The walk down the children files finds what the scan of every process's parent finds:
    /// a child and its grandchildren; and the child of a thread that is not the main one (its
    /// own task's children file names it).
    #[test]
    fn the_tree_walk_finds_what_the_full_scan_finds() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let (spawned, done) = (mpsc::channel(), mpsc::channel::<()>());
        let thread = std::thread::spawn(move || {
            let mut c = std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("sleep");
            let _ = spawned.0.send(c.id());
            let _ = done.1.recv();
            let _ = c.kill();
            let _ = c.wait();
        });
        let from_thread = spawned.1.recv().expect("spawned");
        let deadline = Instant::now() + Duration::from_secs(5);
        while tree_by_parents(child.id()).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (walked, scanned) = (tree(child.id()), tree_by_parents(child.id()));
        let own = (
            tree(std::process::id()),
            tree_by_parents(std::process::id()),
        );
        let _ = done.0.send(());
        let _ = thread.join();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(scanned.len(), 3, "{scanned:?}");
        assert_eq!(walked, scanned);
        assert!(own.1.contains(&from_thread), "{:?}", own.1);
        assert!(own.0.contains(&from_thread), "{:?}", own.0);
    }

    #[test]
    fn a_name_that_matches_nothing_is_one_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let err = find(&ProcessRef::Pid(pid), "^nomatch$", true, &BTreeSet::new())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let found = find(&ProcessRef::Pid(pid), "^sleep$", true, &BTreeSet::new());
        let _ = child.kill();
        let _ = child.wait();
        assert!(err.contains("has no process named /^nomatch$/"), "{err}");
        assert_eq!(found.map(|f| f.procs.len()).ok(), Some(1));
    }
}
