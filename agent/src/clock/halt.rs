//! Holding every thread of a process still while its code is rewritten.
//!
//! A thread that is part-way through an instruction we overwrite would run half of the old
//! and half of the new. So each thread is seized with ptrace and interrupted (invisible to the
//! process and its parent, unlike SIGSTOP), and the rewrite happens only when no thread's
//! program counter is inside the bytes that change; otherwise the threads run on for a moment
//! and we try again. The kernel detaches a tracer's tracees when it dies, so a killed engine
//! leaves nothing stopped.
use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

/// How long a thread may take to report its stop (a frozen one never does).
const STOP_WAIT: Duration = Duration::from_secs(1);
/// How many times the threads are stopped before a busy range gives up.
const ATTEMPTS: u32 = 50;

/// Runs `f` while every thread of `pid` is stopped outside `ranges` (absolute addresses,
/// half-open). Every thread is let go again before this returns, whatever `f` did.
pub fn with_threads_stopped<T>(
    pid: u32,
    ranges: &[(u64, u64)],
    f: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    for attempt in 0..ATTEMPTS {
        let mut held = Held::default();
        held.stop_all(pid)?;
        if !held.busy(pid, ranges) {
            return f();
        }
        drop(held);
        std::thread::sleep(Duration::from_micros(200 * u64::from(attempt + 1)));
    }
    Err(io::Error::other(format!(
        "pid {pid}: a thread was inside the code to rewrite {ATTEMPTS} times in a row"
    )))
}

/// The threads seized so far, and the signal each was stopped with (given back at detach).
#[derive(Default)]
struct Held(BTreeMap<i32, i32>);

impl Held {
    /// Seizes and stops every thread, again until a listing finds none new (a thread may
    /// clone before its stop lands).
    fn stop_all(&mut self, pid: u32) -> io::Result<()> {
        loop {
            let fresh: Vec<i32> = threads(pid)?
                .into_iter()
                .filter(|t| !self.0.contains_key(t))
                .collect();
            if fresh.is_empty() {
                return Ok(());
            }
            for tid in fresh {
                // SAFETY: ptrace with integer arguments only.
                let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
                if seized != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        continue; // the thread has exited
                    }
                    return Err(io::Error::new(e.kind(), format!("ptrace seize {tid}: {e}")));
                }
                self.0.insert(tid, 0);
                // SAFETY: as above; the tracee is ours.
                unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) };
                self.wait(tid)?;
            }
        }
    }

    /// Waits for `tid`'s stop; a signal it was about to take is kept for the detach.
    fn wait(&mut self, tid: i32) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: status is ours; __WALL reaches a tracee that is not our child.
            let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
            if r == tid {
                if libc::WIFSTOPPED(status) {
                    let event = (status >> 16) & 0xff;
                    let sig = libc::WSTOPSIG(status);
                    if event == 0 && sig != libc::SIGTRAP && sig != libc::SIGSTOP {
                        self.0.insert(tid, sig);
                    }
                } else {
                    self.0.remove(&tid); // exited meanwhile
                }
                return Ok(());
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ECHILD) {
                    self.0.remove(&tid);
                    return Ok(());
                }
                return Err(e);
            }
            if started.elapsed() > STOP_WAIT {
                return Err(io::Error::other(format!(
                    "thread {tid} did not stop within {STOP_WAIT:?} (is it frozen?)"
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether some stopped thread's program counter is inside `ranges`.
    fn busy(&self, pid: u32, ranges: &[(u64, u64)]) -> bool {
        self.0.keys().any(|tid| match pc(pid, *tid) {
            Some(pc) => ranges.iter().any(|(a, b)| (*a..*b).contains(&pc)),
            None => true,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for (tid, sig) in std::mem::take(&mut self.0) {
            // SAFETY: detaching our own tracee, handing back the signal it was stopped with.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, sig) };
        }
    }
}

fn threads(pid: u32) -> io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

/// A stopped thread's program counter: the last field of /proc/PID/task/TID/syscall ("-1 sp
/// pc" outside a system call, "nr args... sp pc" inside one).
fn pc(pid: u32, tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let last = text.split_whitespace().last()?;
    u64::from_str_radix(last.trim_start_matches("0x"), 16).ok()
}
