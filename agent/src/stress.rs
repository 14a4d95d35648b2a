//! CPU stress: starts, supervises and stops worker processes inside a target's cgroups, each
//! holding a given share of one CPU.
//!
//! **Placement before work.** A worker is created straight into the target's v2 cgroup
//! (`clone3` with `CLONE_INTO_CGROUP`), then blocks reading a pipe until the parent has written
//! its pid into each v1 hierarchy's `cgroup.procs`; only then does it burn CPU. So it never
//! spends a cycle outside the target's quota. Without `clone3` (old kernels, seccomp profiles
//! that refuse it) the worker is forked and placed in every hierarchy while it waits.
//!
//! **No exec.** The worker is a copy of the engine's process that never returns into Rust code
//! that could allocate or lock: between `clone` and `_exit` it makes only async-signal-safe
//! calls (the other threads of the parent may hold the allocator's lock at the moment of the
//! clone). So `chaos-agent` and `chaosctl --local` need no hidden worker mode.
//!
//! **Dying with the engine.** Each worker sets `PR_SET_PDEATHSIG(SIGKILL)` and then checks that
//! its parent is still the one that created it (the parent may have died before the prctl).
//! The death signal fires when the *thread* that created the worker exits, so workers are
//! created only by one supervisor thread that lives as long as the process (blocking-pool
//! threads come and go). The engine's journal also records each worker's pid and start time,
//! so a later engine kills a survivor (never a process that reused the pid).
//!
//! **Stopping.** Through pidfds (from `CLONE_PIDFD`, so there is no window where the pid could
//! be reused): `SIGKILL`, then the worker is reaped, so no zombie is left.
use crate::cgroup::{self, Placement};
use crate::journal::{self, Owner};
use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StressError {
    #[error("open cgroup {path}: {source}")]
    OpenCgroup { path: PathBuf, source: io::Error },
    #[error("start a cpu worker: {0}")]
    Spawn(io::Error),
    #[error("place cpu worker {pid} in {path}: {source}")]
    Place {
        pid: u32,
        path: PathBuf,
        source: io::Error,
    },
    #[error("stop cpu worker {pid}: {source}")]
    Stop { pid: u32, source: io::Error },
    #[error("cpu worker {pid} did not exit within {timeout:?} of SIGKILL (frozen cgroup?)")]
    StopTimeout { pid: u32, timeout: Duration },
    #[error("the cpu stress supervisor thread is not running")]
    Supervisor,
}

/// How a worker's process was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `clone3`, into the v2 cgroup when there is one.
    Clone3,
    /// `fork`, then placed through `cgroup.procs` in every hierarchy.
    Fork,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Clone3 => "stress/clone3",
            Method::Fork => "stress/fork",
        }
    }
}

struct Worker {
    owner: Owner,
    pidfd: OwnedFd,
    reaped: bool,
}

/// Running CPU workers of one fault. Dropping it stops them.
pub struct CpuStress {
    workers: Vec<Worker>,
    method: Method,
    clock_ticks: u64,
    /// CPU time of the workers when they were killed (a killed worker's times are final).
    final_cpu: Option<Duration>,
}

/// How long a revert waits for a killed worker to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl CpuStress {
    /// Starts `count` workers in `placement`, each holding `load_percent` of one CPU. Either all
    /// start or none is left running.
    pub fn start(
        placement: &Placement,
        count: u32,
        load_percent: f64,
    ) -> Result<Self, StressError> {
        Self::start_with(placement, count, load_percent, Method::Clone3)
    }

    /// As [`Self::start`], beginning with `method` (`Fork` is what a kernel or seccomp profile
    /// without clone3 falls back to; tests ask for it directly).
    pub fn start_with(
        placement: &Placement,
        count: u32,
        load_percent: f64,
        method: Method,
    ) -> Result<Self, StressError> {
        let (reply, answer) = mpsc::channel();
        supervisor()?
            .send(Request {
                placement: placement.clone(),
                count,
                work: Work::Cpu {
                    load_ppm: (load_percent.clamp(0.0, 100.0) * 10_000.0).round() as i64,
                },
                method,
                reply,
            })
            .map_err(|_| StressError::Supervisor)?;
        let (workers, method) = answer.recv().map_err(|_| StressError::Supervisor)??;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Ok(CpuStress {
            workers,
            method,
            clock_ticks: if ticks > 0 { ticks as u64 } else { 100 },
            final_cpu: None,
        })
    }

    /// `count` workers in `placement` holding `bytes_each` of memory each (see [`Work::Memory`]).
    pub fn start_memory(
        placement: &Placement,
        count: u32,
        bytes_each: u64,
        ramp: Duration,
        first_to_die: bool,
    ) -> Result<Self, StressError> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let work = Work::Memory {
            bytes: bytes_each,
            ramp_ns: i64::try_from(ramp.as_nanos()).unwrap_or(i64::MAX),
            page: if page > 0 { page as u64 } else { 4096 },
            first_to_die,
        };
        let (reply, answer) = mpsc::channel();
        supervisor()?
            .send(Request {
                placement: placement.clone(),
                count,
                work,
                method: Method::Clone3,
                reply,
            })
            .map_err(|_| StressError::Supervisor)?;
        let (workers, method) = answer.recv().map_err(|_| StressError::Supervisor)??;
        Ok(CpuStress {
            workers,
            method,
            clock_ticks: 100,
            final_cpu: None,
        })
    }

    /// Memory the live workers have written (Private_Dirty: not the pages they still share
    /// with the engine they were forked from), in bytes.
    pub fn resident_bytes(&self) -> u64 {
        self.workers
            .iter()
            .filter(|w| !w.reaped)
            .filter_map(|w| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/smaps_rollup", w.owner.pid)).ok()?;
                let line = status.lines().find(|l| l.starts_with("Private_Dirty:"))?;
                let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb.saturating_mul(1024))
            })
            .sum()
    }

    /// Workers still alive (the OOM killer may have taken some).
    pub fn alive(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| {
                !w.reaped
                    && std::fs::read_to_string(format!("/proc/{}/stat", w.owner.pid)).is_ok_and(
                        |s| {
                            s.rsplit_once(')')
                                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
                        },
                    )
            })
            .count()
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Pid and start time of every worker (for the journal).
    pub fn owners(&self) -> Vec<Owner> {
        self.workers.iter().map(|w| w.owner).collect()
    }

    /// CPU time (user + system) the workers have consumed, from /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        if let Some(t) = self.final_cpu {
            return t;
        }
        let ticks: u64 = self
            .workers
            .iter()
            .filter(|w| !w.reaped)
            .filter_map(|w| cpu_ticks(w.owner.pid).ok())
            .sum();
        Duration::from_micros(ticks.saturating_mul(1_000_000) / self.clock_ticks)
    }

    /// SIGKILL to every worker: the load stops at once. Reaping comes after, in [`Self::stop`].
    pub fn kill(&mut self) -> Result<(), StressError> {
        if self.final_cpu.is_none() {
            self.final_cpu = Some(self.cpu_time());
        }
        let mut first_error = None;
        for w in self.workers.iter().filter(|w| !w.reaped) {
            if let Err(source) = pidfd_send_signal(w.pidfd.as_raw_fd(), libc::SIGKILL)
                && source.raw_os_error() != Some(libc::ESRCH)
            {
                first_error.get_or_insert(StressError::Stop {
                    pid: w.owner.pid,
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Kills and reaps every worker. A worker that did not exit in time (a frozen cgroup) is
    /// left to the journal, which keeps the fault's entry for the next start; it is not waited
    /// for again on drop.
    pub fn stop(mut self) -> Result<(), StressError> {
        let result = self.stop_in_place();
        self.workers.clear();
        result
    }

    fn stop_in_place(&mut self) -> Result<(), StressError> {
        let mut result = self.kill();
        for w in self.workers.iter_mut().filter(|w| !w.reaped) {
            match reap(&w.pidfd, STOP_TIMEOUT) {
                Ok(true) => w.reaped = true,
                Ok(false) => {
                    if result.is_ok() {
                        result = Err(StressError::StopTimeout {
                            pid: w.owner.pid,
                            timeout: STOP_TIMEOUT,
                        });
                    }
                }
                Err(source) => {
                    if result.is_ok() {
                        result = Err(StressError::Stop {
                            pid: w.owner.pid,
                            source,
                        });
                    }
                }
            }
        }
        result
    }
}

impl Drop for CpuStress {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| !w.reaped)
            && let Err(e) = self.stop_in_place()
        {
            tracing::error!("stopping cpu workers: {e}");
        }
    }
}

/// Kills the workers an earlier engine recorded that are still alive, checking each one's
/// start time through a pidfd so that a process which reused the pid is never touched.
/// Returns how many were killed.
pub fn kill_survivors(workers: &[Owner]) -> usize {
    let mut killed = 0;
    for w in workers {
        let Ok(fd) = pidfd_open(w.pid) else { continue };
        // The pidfd pins this process: if its start time is the recorded one now, the signal
        // below reaches our worker and nothing else.
        if journal::start_time(w.pid).ok() != Some(w.start_time) {
            continue;
        }
        if pidfd_send_signal(fd.as_raw_fd(), libc::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// What a worker does once placed.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    /// Hold this share of one CPU (parts per million).
    Cpu { load_ppm: i64 },
    /// Touch and hold this many bytes of anonymous memory, reaching them over `ramp_ns`; with
    /// `first_to_die`, the worker offers itself to the OOM killer before the target's processes.
    Memory {
        bytes: u64,
        ramp_ns: i64,
        page: u64,
        first_to_die: bool,
    },
}

struct Request {
    placement: Placement,
    count: u32,
    work: Work,
    method: Method,
    reply: mpsc::Sender<Result<(Vec<Worker>, Method), StressError>>,
}

/// The one thread that creates workers. It lives as long as the process (the static sender
/// keeps its loop going), so a worker's parent-death signal fires only when the process dies.
fn supervisor() -> Result<&'static mpsc::Sender<Request>, StressError> {
    static SUPERVISOR: OnceLock<Option<mpsc::Sender<Request>>> = OnceLock::new();
    SUPERVISOR
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Request>();
            // Before the first worker exists, so every worker shares the page.
            let beat = match Heartbeat::map() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("cpu stress heartbeat page: {e}");
                    return None;
                }
            };
            let spawned = std::thread::Builder::new()
                .name("chaos-stress".into())
                .spawn(move || {
                    loop {
                        beat.stamp();
                        match rx.recv_timeout(crate::heartbeat::INTERVAL) {
                            Ok(req) => {
                                let result = spawn_all(
                                    &req.placement,
                                    req.count,
                                    req.work,
                                    req.method,
                                    beat,
                                );
                                // A caller that went away drops the workers (and so stops them).
                                let _ = req.reply.send(result);
                            }
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!("cannot start the cpu stress supervisor thread: {e}");
                    None
                }
            }
        })
        .as_ref()
        .ok_or(StressError::Supervisor)
}

/// The engine process's heartbeat, as its CPU workers see it: one shared anonymous page (mapped
/// before any worker is cloned, so all of them share it) holding the CLOCK_MONOTONIC ns of the
/// supervisor's last beat. A worker whose engine is frozen (SIGSTOP, a debugger, a frozen VM
/// or cgroup) stops burning once the beat is older than the bound, as the datapath's rules go
/// inert; a dead engine's workers get their death signal.
#[derive(Clone, Copy)]
struct Heartbeat(&'static std::sync::atomic::AtomicI64);

impl Heartbeat {
    fn map() -> io::Result<Self> {
        // SAFETY: a fresh anonymous shared mapping of one page, never unmapped (it lives as
        // long as the process, like the supervisor); an AtomicI64 is valid for any bits.
        unsafe {
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if page == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let beat = Heartbeat(&*(page as *const std::sync::atomic::AtomicI64));
            beat.stamp();
            Ok(beat)
        }
    }

    fn stamp(self) {
        self.0.store(
            clock_ns(libc::CLOCK_MONOTONIC),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether the engine has not beaten for longer than the bound at `now`. Async-signal-safe.
    fn stale(self, now: i64) -> bool {
        let bound = chaos_abi::HEARTBEAT_BOUND_NS as i64;
        now.saturating_sub(self.0.load(std::sync::atomic::Ordering::Relaxed)) > bound
    }
}

fn spawn_all(
    placement: &Placement,
    count: u32,
    work: Work,
    mut method: Method,
    beat: Heartbeat,
) -> Result<(Vec<Worker>, Method), StressError> {
    let cgroup_fd = match &placement.v2 {
        Some(dir) => Some(open_dir(dir).map_err(|source| StressError::OpenCgroup {
            path: dir.clone(),
            source,
        })?),
        None => None,
    };
    let mut workers = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match spawn_one(placement, cgroup_fd.as_ref(), work, &mut method, beat) {
            Ok(w) => workers.push(w),
            Err(e) => {
                // All or nothing: the ones already started go (dropping them stops them).
                drop(CpuStress {
                    workers,
                    method,
                    clock_ticks: 100,
                    final_cpu: Some(Duration::ZERO),
                });
                return Err(e);
            }
        }
    }
    Ok((workers, method))
}

fn open_dir(dir: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let mut path = dir.as_os_str().as_bytes().to_vec();
    path.push(0);
    // SAFETY: a NUL-terminated path; the returned fd is owned below.
    let fd = unsafe {
        libc::open(
            path.as_ptr().cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// clone3's argument, up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const P_PIDFD: libc::idtype_t = 3;

fn spawn_one(
    placement: &Placement,
    cgroup_fd: Option<&OwnedFd>,
    work: Work,
    method: &mut Method,
    beat: Heartbeat,
) -> Result<Worker, StressError> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(StressError::Spawn(io::Error::last_os_error()));
    }
    // SAFETY: both are fresh descriptors we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };

    let mut placed_v2 = false;
    let mut child: Option<(libc::pid_t, OwnedFd)> = None;
    if *method == Method::Clone3 {
        let mut pidfd: c_int = -1;
        let mut args = CloneArgs {
            flags: CLONE_PIDFD,
            pidfd: (&mut pidfd as *mut c_int) as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let Some(fd) = cgroup_fd {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = fd.as_raw_fd() as u64;
        }
        // SAFETY: clone3 without CLONE_VM is fork: the child gets a copy of this address space
        // and continues here on a copy of this stack. It only runs `worker_main`, which makes
        // async-signal-safe calls and never returns.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            // SAFETY: we are the new process.
            unsafe { worker_main(rd.as_raw_fd(), parent, work, beat) }
        }
        if ret > 0 {
            // SAFETY: CLONE_PIDFD stored a fresh descriptor we own.
            child = Some((ret as libc::pid_t, unsafe { OwnedFd::from_raw_fd(pidfd) }));
            placed_v2 = cgroup_fd.is_some();
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No clone3, or no CLONE_INTO_CGROUP (E2BIG/EINVAL on kernels before 5.7):
                // fork and place through cgroup.procs from now on.
                Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL) | Some(libc::EPERM) => {
                    tracing::warn!("clone3 unavailable ({e}); cpu workers are forked");
                    *method = Method::Fork;
                }
                _ => return Err(StressError::Spawn(e)),
            }
        }
    }
    let (pid, pidfd) = match child {
        Some(c) => c,
        None => {
            // SAFETY: as above; the child only runs `worker_main`.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: we are the new process.
                unsafe { worker_main(rd.as_raw_fd(), parent, work, beat) }
            }
            if pid < 0 {
                return Err(StressError::Spawn(io::Error::last_os_error()));
            }
            // Our unreaped child: its pid cannot be reused, so pidfd_open names it.
            match pidfd_open(pid as u32) {
                Ok(fd) => (pid, fd),
                Err(e) => {
                    // Without a pidfd we cannot stop it safely later: stop it now.
                    drop(wr);
                    // SAFETY: our own unreaped child.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    return Err(StressError::Spawn(e));
                }
            }
        }
    };
    drop(rd);
    let pid_u = pid as u32;
    let worker = Worker {
        owner: Owner {
            pid: pid_u,
            start_time: journal::start_time(pid_u).unwrap_or(0),
        },
        pidfd,
        reaped: false,
    };
    // From here a failure drops `worker`'s pidfd only after killing and reaping it.
    let fail = |worker: Worker, e: StressError| {
        let mut s = CpuStress {
            workers: vec![worker],
            method: *method,
            clock_ticks: 100,
            final_cpu: Some(Duration::ZERO),
        };
        let _ = s.stop_in_place();
        Err(e)
    };
    let v2 = placement.v2.iter().filter(|_| !placed_v2);
    for dir in v2.chain(placement.v1.iter()) {
        if let Err(source) = cgroup::join(dir, pid_u) {
            // The worker reads EOF when `wr` goes and exits; it is killed and reaped anyway.
            drop(wr);
            return fail(
                worker,
                StressError::Place {
                    pid: pid_u,
                    path: dir.clone(),
                    source,
                },
            );
        }
    }
    // SAFETY: writing one byte from our buffer to our pipe.
    let n = unsafe { libc::write(wr.as_raw_fd(), b"g".as_ptr().cast(), 1) };
    if n != 1 {
        let e = io::Error::last_os_error();
        drop(wr);
        return fail(worker, StressError::Spawn(e));
    }
    Ok(worker)
}

/// The worker process. Only async-signal-safe system calls, no allocation, no locks, no
/// panicking arithmetic: the parent's other threads may have held any lock at the clone.
///
/// # Safety
/// Call only in a freshly cloned child; never returns.
unsafe fn worker_main(go: RawFd, parent: libc::pid_t, work: Work, beat: Heartbeat) -> ! {
    // SAFETY: plain system calls on our own process.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // The parent may have died before the prctl: then the signal will never come.
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        // Keep nothing of the engine's: a copy of a BPF link, a socket or a pipe held here would
        // keep it alive (a link attached, a client waiting for EOF) while the worker runs.
        close_all_but(go);
        let name = match work {
            Work::Cpu { .. } => c"chaos-cpu",
            Work::Memory { .. } => c"chaos-mem",
        };
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
        // The engine's signal handlers (tokio's) and mask are not ours.
        let mut sig = 1;
        while sig < 32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
            sig += 1;
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // Wait until the parent has placed us in every cgroup; EOF means it gave up.
        let mut byte = 0u8;
        loop {
            let n = libc::read(go, (&mut byte as *mut u8).cast(), 1);
            if n == 1 && byte == b'g' {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            libc::_exit(0);
        }
        libc::close(go);
        match work {
            Work::Cpu { load_ppm } => duty_cycle(load_ppm, beat),
            Work::Memory {
                bytes,
                ramp_ns,
                page,
                first_to_die,
            } => hold_memory(bytes, ramp_ns, page, first_to_die, beat),
        }
    }
}

/// Touches `bytes` of anonymous memory one page at a time (spread over `ramp_ns`), then holds
/// it asleep: no CPU while holding. While the engine is frozen past the heartbeat bound the
/// pages are given back (MADV_DONTNEED), and touched again when it beats. Async-signal-safe.
fn hold_memory(bytes: u64, ramp_ns: i64, page: u64, first_to_die: bool, beat: Heartbeat) -> ! {
    // SAFETY: plain system calls on our own process and a mapping of our own.
    unsafe {
        let adj: &[u8] = if first_to_die { b"1000" } else { b"0" };
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::write(fd, adj.as_ptr().cast(), adj.len());
            libc::close(fd);
        }
        let len = bytes.max(1) as usize;
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if base == libc::MAP_FAILED {
            libc::_exit(1);
        }
        let page = page.max(1);
        let start = clock_ns(libc::CLOCK_MONOTONIC);
        let mut touched: u64 = 0;
        loop {
            let now = clock_ns(libc::CLOCK_MONOTONIC);
            if beat.stale(now) {
                if touched > 0 {
                    libc::madvise(base, len, libc::MADV_DONTNEED);
                    touched = 0;
                }
            } else if touched < bytes {
                let due = if ramp_ns <= 0 {
                    bytes
                } else {
                    let f = now.saturating_sub(start) as f64 / ramp_ns as f64;
                    ((bytes as f64 * f.min(1.0)) as u64).max(page.min(bytes))
                };
                while touched < due.min(bytes) {
                    // One write per page makes it resident (and charged to our cgroups).
                    std::ptr::write_volatile((base as *mut u8).add(touched as usize), 1);
                    touched = touched.saturating_add(page);
                }
            }
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: if touched < bytes && !beat.stale(now) {
                    10_000_000
                } else {
                    200_000_000
                },
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
        }
    }
}

/// Closes every descriptor except `keep` (close_range, or a loop where it is missing).
pub(crate) unsafe fn close_all_but(keep: RawFd) {
    let keep = keep as libc::c_uint;
    // SAFETY: closing descriptors of our own process.
    unsafe {
        let mut ok = true;
        if keep > 0 {
            ok &= libc::syscall(libc::SYS_close_range, 0 as libc::c_uint, keep - 1, 0) == 0;
        }
        ok &= libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0) == 0;
        if !ok {
            let mut fd: c_int = 0;
            while fd < 65_536 {
                if fd as libc::c_uint != keep {
                    libc::close(fd);
                }
                fd += 1;
            }
        }
    }
}

// `time_t` and `c_long` are i32 on some 32-bit targets.
#[allow(clippy::useless_conversion)]
fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into our timespec; async-signal-safe.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i64::from(ts.tv_sec)
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(ts.tv_nsec))
}

/// Half-width of the control band: the worker switches from burning to sleeping when it is
/// this far ahead of its share and back when this far behind. At 50 % that is a 10 ms cycle of
/// 5 ms on and 5 ms off: fine-grained next to a CFS quota period (100 ms), coarse enough that
/// the cost of switching is negligible.
const BAND_NS: i64 = 2_500_000;
/// The most CPU time a worker remembers owing or being owed. A worker kept off the CPU (a
/// throttled cgroup, a saturated node) catches up at most this much, so it does not burst at
/// 100 % for seconds afterwards; its load is "P % of wall time while the CPU is available".
const WINDOW_NS: i64 = 100_000_000;

/// Holds `load_ppm` (parts per million of one CPU) by feedback: `credit` is the CPU time the
/// worker still owes, i.e. `load × wall time − CPU time consumed`, measured with the monotonic
/// clock and the thread's own CPU clock. Time spent preempted while burning is wall time
/// without CPU time, so it raises the credit and the worker burns longer: preemption and timer
/// slack do not bias the achieved load, only delay it.
fn duty_cycle(load_ppm: i64, beat: Heartbeat) -> ! {
    let load_ppm = load_ppm.clamp(1, 1_000_000);
    let mut wall = clock_ns(libc::CLOCK_MONOTONIC);
    let mut cpu = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    let mut credit: i64 = 0;
    let mut burning = true;
    loop {
        let (w, c) = (
            clock_ns(libc::CLOCK_MONOTONIC),
            clock_ns(libc::CLOCK_THREAD_CPUTIME_ID),
        );
        if beat.stale(w) {
            // The engine is frozen: hold no load until it beats again, and owe nothing for
            // the pause (no burst when it thaws).
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            // SAFETY: nanosleep reads our timespec.
            unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
            (wall, cpu, credit) = (
                clock_ns(libc::CLOCK_MONOTONIC),
                clock_ns(libc::CLOCK_THREAD_CPUTIME_ID),
                0,
            );
            continue;
        }
        let earned = w.saturating_sub(wall).saturating_mul(load_ppm) / 1_000_000;
        credit = credit
            .saturating_add(earned)
            .saturating_sub(c.saturating_sub(cpu))
            .clamp(-WINDOW_NS, WINDOW_NS);
        (wall, cpu) = (w, c);
        if burning {
            if credit <= -BAND_NS && load_ppm < 1_000_000 {
                burning = false;
                continue;
            }
            burn();
        } else {
            if credit >= BAND_NS {
                burning = true;
                continue;
            }
            // Sleep until the credit is back at the top of the band.
            let ns = BAND_NS.saturating_sub(credit).saturating_mul(1_000_000) / load_ppm;
            let ts = libc::timespec {
                // `as _`: time_t's width differs between targets (and musl versions).
                tv_sec: (ns / 1_000_000_000) as _,
                tv_nsec: (ns % 1_000_000_000) as _,
            };
            // SAFETY: nanosleep reads our timespec; EINTR just ends the sleep early.
            unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        }
    }
}

/// A few microseconds of integer and floating-point work between clock readings.
#[inline(never)]
fn burn() {
    let mut x = std::hint::black_box(1.000_1_f64);
    let mut n = std::hint::black_box(0x9E37_79B9_u64);
    for _ in 0..2_000 {
        x = x * 1.000_000_1 + 0.000_000_1;
        n = n.rotate_left(5) ^ n.wrapping_mul(0x2545_F491);
    }
    std::hint::black_box((x, n));
}

pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub(crate) fn pidfd_send_signal(pidfd: RawFd, sig: c_int) -> io::Result<()> {
    // SAFETY: no siginfo; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits up to `timeout` for the process to exit and reaps it. Ok(false): still running.
pub(crate) fn reap(pidfd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: one pollfd of ours.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(false);
        }
        break;
    }
    loop {
        // SAFETY: waitid fills our siginfo.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Reaped already (or not our child): nothing is left to wait for.
            Some(libc::ECHILD) => return Ok(true),
            _ => return Err(e),
        }
    }
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let mut fields = rest.split_whitespace().skip(11);
    let mut next = || fields.next().and_then(|v| v.parse::<u64>().ok());
    match (next(), next()) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => Err(io::Error::other(format!("malformed /proc/{pid}/stat"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_of_self() {
        let t = cpu_ticks(std::process::id()).unwrap();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(cpu_ticks(std::process::id()).unwrap() >= t);
    }
}
