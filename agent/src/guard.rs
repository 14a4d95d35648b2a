//! The guard: a small process that undoes a host fault when its engine cannot.
//!
//! A fault whose effect outlives the engine's process (a frozen cgroup, stopped processes, a
//! file filling a disk) is applied only after a guard has been forked holding what the undo
//! needs: descriptors (a freezer file, pidfds, a directory) and the read end of a pipe whose
//! only writer is the engine. The guard undoes when the pipe breaks (the engine died, however),
//! at the deadline (so a frozen or stopped engine still ends its fault on time), or on
//! SIGTERM/SIGINT/SIGHUP, then exits. Between fork and exit it makes only async-signal-safe
//! system calls on memory prepared before the fork (the engine is multithreaded: another
//! thread may hold the allocator's lock at the moment of the fork). A revert undoes from the
//! engine, where an error can be seen, and then stops the guard.
use crate::journal::{self, Owner};
use crate::stress::{pidfd_open, pidfd_send_signal, reap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, SystemTime};

/// What the guard does to undo, on descriptors it inherited.
#[derive(Clone, Copy)]
pub enum Op {
    /// SIGCONT through a pidfd.
    Signal(RawFd),
    /// Write this text to a file (a freezer's), at offset 0.
    Write(RawFd, &'static [u8]),
    /// Unlink this name in this directory. The name must live until `Guard::spawn` returns.
    Unlink(RawFd, *const libc::c_char),
}

/// The guard: a child process that undoes a fault when the engine dies or the deadline passes.
pub struct Guard {
    owner: Owner,
    pidfd: OwnedFd,
    /// The write end of the guard's pipe; closing it (or dying) tells the guard to thaw.
    pipe: Option<OwnedFd>,
}

impl Guard {
    pub fn spawn(ops: &[Op], deadline: SystemTime) -> io::Result<Guard> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let deadline_ns =
            mono_ns().saturating_add(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX));
        let mut keep: Vec<RawFd> = ops
            .iter()
            .map(|op| match op {
                Op::Signal(fd) | Op::Write(fd, _) | Op::Unlink(fd, _) => *fd,
            })
            .collect();
        keep.push(read.as_raw_fd());
        keep.sort_unstable();
        keep.dedup();
        let read_fd = read.as_raw_fd();
        // SAFETY: the child makes only async-signal-safe calls on memory prepared above (no
        // allocation, no locks) and ends in _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above.
            unsafe { guard_main(read_fd, ops, &keep, deadline_ns) }
        }
        drop(read);
        let pid = pid as u32;
        let pidfd = pidfd_open(pid)?;
        let start_time = journal::start_time(pid).unwrap_or(0);
        Ok(Guard {
            owner: Owner { pid, start_time },
            pidfd,
            pipe: Some(write),
        })
    }

    /// The guard's process (for the journal: a later engine kills a survivor).
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Ends the guard without an undo of its own (the engine has undone, or a newer guard holds
    /// the undo): SIGKILL, then reap.
    pub fn stop(&mut self) {
        let _ = pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
        self.pipe = None;
        let _ = reap(&self.pidfd, Duration::from_secs(2));
    }

    pub fn dismiss(mut self) {
        self.stop();
    }
}

fn mono_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    #[allow(clippy::useless_conversion)]
    i64::from(ts.tv_sec)
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.tv_nsec))
}

/// The guard's life: wait for the pipe to break, a signal, or the deadline; undo; exit.
///
/// # Safety
/// Called in a freshly forked child of a multithreaded process: only async-signal-safe calls.
unsafe fn guard_main(read: RawFd, ops: &[Op], keep: &[RawFd], deadline_ns: i64) -> ! {
    // SAFETY: system calls on our own descriptors and signal mask.
    unsafe {
        // Only what the thaw needs stays open: not the engine's pipe ends of other guards (they
        // would keep those guards from seeing the engine die), not its sockets or terminal.
        let mut next: libc::c_uint = 0;
        for &fd in keep {
            let fd = fd as libc::c_uint;
            if fd > next {
                libc::syscall(libc::SYS_close_range, next, fd - 1, 0);
            }
            next = fd + 1;
        }
        libc::syscall(libc::SYS_close_range, next, libc::c_uint::MAX, 0);
        // A terminal's Ctrl-C or a group kill aimed at the engine's caller is not for us.
        libc::setsid();
        libc::prctl(libc::PR_SET_NAME, c"chaos-guard".as_ptr());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let sfd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        loop {
            let left = deadline_ns.saturating_sub(mono_ns());
            if left <= 0 {
                break;
            }
            let mut pfds = [
                libc::pollfd {
                    fd: read,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = (left / 1_000_000 + 1).min(i64::from(i32::MAX)) as libc::c_int;
            let n = if sfd >= 0 { 2 } else { 1 };
            let r = libc::poll(pfds.as_mut_ptr(), n, ms);
            if r > 0 {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
        for op in ops {
            match *op {
                Op::Signal(fd) => {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd,
                        libc::SIGCONT,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
                Op::Write(fd, text) => {
                    libc::pwrite(fd, text.as_ptr().cast(), text.len(), 0);
                }
                Op::Unlink(dir, name) => {
                    libc::unlinkat(dir, name, 0);
                }
            }
        }
        libc::_exit(0)
    }
}
