//! clock-skew: the clocks of exactly the target processes move; no other process's do.
//!
//! **Two halves.** A program reads the clock either through the vDSO (no system call: nothing
//! in the kernel sees it) or through a system call. Each target's vDSO clock functions
//! (clock_gettime, gettimeofday, on x86_64 time) become jumps to [a stub](clock/stub.c) placed
//! in the slack after the vDSO image, written through /proc/PID/mem (which gives that process
//! its own copy of the page; every other process keeps the shared one) while the target's
//! threads are [held](halt) outside the bytes that change. The stub makes the system call.
//! Where the kernel allows bpf_probe_write_user, the tracepoints of
//! [clock.bpf.o](../../agent-ebpf/src/clock.rs) move the result of every read that reaches
//! the kernel: vDSO reads (now system calls), direct system calls, Go's runtime (it calls the
//! vDSO too). Where the kernel is locked down (Secure Boot machines; this project's CI host)
//! the helper is refused to everyone, so the stub moves the result itself, from the data the
//! engine wrote beside it (offset, drift, clocks, deadline, heartbeat); direct system calls
//! then keep true time, and `doctor` says so.
//!
//! **Which processes.** The target's processes at apply (`--pid`: the process and its
//! descendants), then whatever they fork (a fork inherits the patched page; the kernel side
//! adds its tgid at once, in task_newtask; threads share their tgid already). An exec maps a
//! fresh vDSO, so the kernel side stops a target at exec (SIGSTOP, taken before the new
//! program's first instruction, while the rule is live) and reports it; a thread here patches
//! the new program and sends SIGCONT (~4 ms here), so even `date` reads the moved clock. For a cgroup or a pod, processes that join it later are found by a
//! rescan every [`RESCAN`].
//!
//! **How it ends.** Revert disarms the rule (one map write), restores each vDSO from the
//! engine's own (every process maps the same image), and detaches the programs. Without us:
//! the programs are attached through the engine's descriptors, so they go with a killed
//! engine; the rule and the stub both pass true time past the deadline and once the engine's
//! heartbeat (every [`BEAT`]) is [`CLOCK_HEARTBEAT_BOUND_NS`] old, so a killed or frozen
//! engine leaves true time within a second. A stub left behind reads true time through the
//! system call (slower); the journal names each patched process and the next engine restores
//! its vDSO.
use crate::heartbeat::{Beat, deadline_ns, monotonic_ns};
use crate::journal;
use crate::process::{self, Proc};
use crate::spec::{InvalidInput, ProcessRef, SkewedClock, invalid};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use chaos_abi::{CLOCK_HEARTBEAT_BOUND_NS, ClockCounters, ClockRule};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

static OBJECT: &[u8] = aya::include_bytes_aligned!("../../agent-ebpf/clock.bpf.o");

/// A CLOCK_EXECS event's second word for a fork (an exec is 0, or 1 if held stopped).
const FORKED: u32 = 2;

/// How often the processes of a cgroup or pod target are looked for again.
const RESCAN: Duration = Duration::from_millis(500);
/// How often each target's stub hears that the engine is alive (it stops moving the clock
/// once the last beat is [`CLOCK_HEARTBEAT_BOUND_NS`] old).
const BEAT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClockError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("{context}: {message}")]
    Kernel { context: String, message: String },
    #[error("clock-skew is not supported here: {0}")]
    Unsupported(String),
}

fn kernel(context: impl Into<String>, e: impl std::fmt::Display) -> ClockError {
    ClockError::Kernel {
        context: context.into(),
        message: e.to_string(),
    }
}

/// The programs and the tracepoints they attach to; the rewriting ones first (where the
/// kernel refuses them, the rest still follow forks and execs).
const ATTACH: [(&str, &str, &str); 7] = [
    ("chaos_clk_exit", "syscalls", "sys_exit_clock_gettime"),
    ("chaos_clk_exit", "syscalls", "sys_exit_gettimeofday"),
    ("chaos_clk_enter", "syscalls", "sys_enter_clock_gettime"),
    ("chaos_tod_enter", "syscalls", "sys_enter_gettimeofday"),
    ("chaos_clk_fork", "task", "task_newtask"),
    ("chaos_clk_exec", "sched", "sched_process_exec"),
    ("chaos_clk_gone", "sched", "sched_process_exit"),
];

/// The programs that move results (bpf_probe_write_user) and those that only feed them.
const REWRITERS: [&str; 3] = ["chaos_clk_exit", "chaos_clk_enter", "chaos_tod_enter"];

/// The processes (by tgid) some live clock fault of this engine holds, and which fault: two
/// faults on one process would compose their patches badly, so the second is refused.
fn held() -> &'static Mutex<BTreeMap<u32, String>> {
    static HELD: std::sync::OnceLock<Mutex<BTreeMap<u32, String>>> = std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

mod halt;
mod vdso;

/// What the fault's thread and its revert share.
struct Shared {
    id: String,
    image: &'static vdso::Image,
    /// The stub's data as every target gets it (its heartbeat rewritten as it beats).
    page: vdso::Page,
    /// The patched targets, with the start time of each (a pid reused since is not ours).
    patched: Mutex<BTreeMap<u32, (u64, vdso::Target)>>,
    stop: AtomicBool,
}

impl Shared {
    /// Patches `pid`'s vDSO (again, after an exec) and notes it.
    fn patch(&self, pid: u32) -> io::Result<()> {
        let start_time = journal::start_time(pid)?;
        let page = vdso::Page {
            heartbeat_ns: now_ns(),
            ..self.page
        };
        match self.image.patch(pid, &page)? {
            Some(target) => {
                lock(&self.patched).insert(pid, (start_time, target));
                lock(held()).insert(pid, self.id.clone());
            }
            None => tracing::debug!(pid, "vDSO of another kind: left alone"),
        }
        Ok(())
    }

    /// Notes a fork of a target: it inherited the patched page (its own copy now, which the
    /// heartbeat must reach and revert must restore).
    fn adopt(&self, pid: u32) {
        let Ok(start_time) = journal::start_time(pid) else {
            return;
        };
        if let Ok(Some(target)) = self.image.patched(pid) {
            let _ = self.image.beat(&target, now_ns());
            lock(&self.patched).insert(pid, (start_time, target));
            lock(held()).insert(pid, self.id.clone());
        }
    }

    /// Tells every patched target's stub that the engine is alive.
    fn beat(&self) {
        let now = now_ns();
        for (_, target) in lock(&self.patched).values() {
            let _ = self.image.beat(target, now);
        }
    }

    /// Puts the true vDSO back in every process still running the program we patched.
    fn restore(&self) -> usize {
        let patched = std::mem::take(&mut *lock(&self.patched));
        let mut held = lock(held());
        let mut restored = 0;
        for (pid, (start_time, target)) in patched {
            if held.get(&pid) == Some(&self.id) {
                held.remove(&pid);
            }
            if journal::start_time(pid).ok() != Some(start_time) {
                continue;
            }
            match self.image.restore(pid, &target) {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(pid, "restore vDSO: {e}"),
            }
        }
        restored
    }
}

fn now_ns() -> i64 {
    i64::try_from(monotonic_ns()).unwrap_or(i64::MAX)
}

/// A live clock-skew fault.
pub struct ClockSkew {
    /// The programs and their attachments: dropping it detaches them.
    ebpf: Option<Ebpf>,
    rule: Array<MapData, ClockRule>,
    counters: PerCpuArray<MapData, ClockCounters>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Targets found at apply.
    targets: u64,
}

/// The kernel's lockdown mode, if securityfs shows one: in `integrity` or `confidentiality`
/// mode bpf_probe_write_user is refused to everyone (Secure Boot machines run so).
/// securityfs is mounted here if nothing has mounted it (a fresh boot often has not).
pub fn lockdown() -> Option<String> {
    const FILE: &str = "/sys/kernel/security/lockdown";
    if !std::path::Path::new(FILE).exists() {
        // A failure leaves the file missing, read below as "no lockdown known" (the verifier
        // then says no).
        let _ = mount_pseudo(c"securityfs", c"/sys/kernel/security");
    }
    let text = std::fs::read_to_string(FILE).ok()?;
    let mode = text.split_whitespace().find(|w| w.starts_with('['))?;
    Some(mode.trim_matches(['[', ']']).to_string())
}

/// Restores the vDSO of a process an earlier engine patched and left (it died): true if it
/// was still that process and still held the patch.
pub fn restore_left(owner: &journal::Owner) -> bool {
    if journal::start_time(owner.pid).ok() != Some(owner.start_time) {
        return false;
    }
    let Ok(image) = vdso::image() else {
        return false;
    };
    match image.patched(owner.pid) {
        Ok(Some(target)) => image.restore(owner.pid, &target).unwrap_or(false),
        _ => false,
    }
}

/// Whether this kernel's vDSO has room for the stub and functions to patch (the reason if not).
pub fn room() -> Result<(), String> {
    vdso::image().map(|_| ()).map_err(|e| e.to_string())
}

/// Whether the kernel lets a program write user memory (bpf_probe_write_user).
pub fn writes_allowed() -> bool {
    matches!(lockdown().as_deref(), None | Some("none"))
}

/// tracefs, where the tracepoints' ids are read; mounted if nothing has (the first attach in
/// this process looks for it once).
fn ensure_tracefs() -> Result<(), ClockError> {
    let events = std::path::Path::new("/sys/kernel/tracing/events");
    if events.exists() || std::path::Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    mount_pseudo(c"tracefs", c"/sys/kernel/tracing").map_err(|e| {
        ClockError::Unsupported(format!(
            "tracefs is not mounted and mounting it on /sys/kernel/tracing failed: {e}"
        ))
    })
}

/// Mounts the kernel pseudo-filesystem `fs` (its type and source alike) on `at`.
fn mount_pseudo(fs: &std::ffi::CStr, at: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            fs.as_ptr(),
            at.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ClockSkew {
    pub fn start(
        id: &str,
        target: &ProcessRef,
        name: &str,
        offset_ns: i64,
        drift_ppm: i64,
        clocks: &[SkewedClock],
        deadline: SystemTime,
    ) -> Result<(ClockSkew, Beat), ClockError> {
        let found = process::find(target, name, true, &Default::default())?;
        {
            let held = lock(held());
            if let Some((pid, other)) = found
                .procs
                .iter()
                .find_map(|p| held.get(&p.owner.pid).map(|o| (p.owner.pid, o)))
            {
                return Err(invalid(
                    "--pid",
                    format!("pid {pid} is already skewed by fault {other}; revert it first"),
                )
                .into());
            }
        }
        let image = vdso::image()?;
        ensure_tracefs()?;
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .map_err(|e| kernel("load clock.bpf.o", e))?;
        let mut rule_map: Array<MapData, ClockRule> = take(&mut ebpf, "CLOCK_RULE")?;
        let mask = clocks
            .iter()
            .flat_map(|c| c.ids())
            .fold(0u32, |m, id| m | (1 << id));
        let origin_ns = monotonic_ns();
        let rule = ClockRule {
            offset_ns,
            drift_ppm_abs: drift_ppm.unsigned_abs(),
            drift_negative: u32::from(drift_ppm < 0),
            clocks: mask,
            origin_ns,
            deadline_ns: deadline_ns(deadline),
        };
        rule_map
            .set(0, rule, 0)
            .map_err(|e| kernel("CLOCK_RULE", e))?;
        let beat = heartbeat(&ebpf)?;
        let mut targets: BpfHashMap<MapData, u32, u32> = take(&mut ebpf, "CLOCK_TARGETS")?;
        for p in &found.procs {
            targets
                .insert(p.owner.pid, 1, 0)
                .map_err(|e| kernel("CLOCK_TARGETS", e))?;
        }
        let counters: PerCpuArray<MapData, ClockCounters> = take(&mut ebpf, "CLOCK_COUNTERS")?;
        let execs: RingBuf<MapData> = take(&mut ebpf, "CLOCK_EXECS")?;
        // Where the kernel allows bpf_probe_write_user, its tracepoints move every read that
        // reaches it, direct system calls too; where it does not (a locked-down kernel), the
        // stub moves the vDSO's reads itself and the rewriting programs are left out.
        let mut direct = writes_allowed();
        for (program, category, tracepoint) in ATTACH {
            let rewrites = REWRITERS.contains(&program);
            if rewrites && !direct {
                continue;
            }
            let prog: &mut TracePoint =
                ebpf.program_mut(program)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| kernel("clock.bpf.o", format!("has no tracepoint {program}")))?;
            if prog.fd().is_err()
                && let Err(e) = prog.load()
            {
                if rewrites && format!("{e:#}").contains("bpf_probe_write_user") {
                    direct = false;
                    continue;
                }
                return Err(kernel(format!("load {program} (verifier)"), e));
            }
            prog.attach(category, tracepoint)
                .map_err(|e| kernel(format!("attach {program} to {category}/{tracepoint}"), e))?;
        }
        if !direct {
            tracing::warn!(
                "clock-skew: this kernel refuses bpf_probe_write_user (lockdown: {}), so the \
                 targets' vDSO reads are moved and their direct system calls keep true time",
                lockdown().unwrap_or_else(|| "unknown".into())
            );
        }
        let page = vdso::Page {
            clocks: if direct { 0 } else { u64::from(mask) },
            offset_ns,
            drift_ppm,
            origin_ns: i64::try_from(origin_ns).unwrap_or(i64::MAX),
            deadline_ns: i64::try_from(rule.deadline_ns).unwrap_or(i64::MAX),
            bound_ns: i64::try_from(CLOCK_HEARTBEAT_BOUND_NS).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            id: id.to_string(),
            image,
            page,
            patched: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
        });
        let mut failures = Vec::new();
        for p in &found.procs {
            if let Err(e) = shared.patch(p.owner.pid) {
                failures.push(format!("pid {}: {e}", p.owner.pid));
            }
        }
        if !failures.is_empty() {
            if lock(&shared.patched).is_empty() {
                shared.restore();
                return Err(kernel("patch the targets' vDSO", failures.join("; ")));
            }
            tracing::warn!(failures = %failures.join("; "), "clock-skew: some targets left alone");
        }
        let thread = {
            let shared = shared.clone();
            let target = target.clone();
            let name = name.to_string();
            std::thread::Builder::new()
                .name("chaos-clock".into())
                .spawn(move || follow(&shared, &target, &name, targets, execs))
                .map_err(|e| kernel("start the clock-skew thread", e))?
        };
        let skew = ClockSkew {
            ebpf: Some(ebpf),
            rule: rule_map,
            counters,
            shared,
            thread: Some(thread),
            targets: found.procs.len() as u64,
        };
        Ok((skew, beat))
    }

    pub fn counters(&self) -> crate::spec::Counters {
        let (mut reads, mut skewed) = (0u64, 0u64);
        if let Ok(values) = self.counters.get(&0, 0) {
            for c in values.iter() {
                reads = reads.saturating_add(c.reads);
                skewed = skewed.saturating_add(c.skewed);
            }
        }

        crate::spec::Counters {
            seen: reads,
            matched: self.targets.max(lock(&self.shared.patched).len() as u64),
            affected: skewed,
            ..Default::default()
        }
    }

    /// The targets patched so far, for a later engine to restore if we cannot.
    pub fn undo(&self) -> Vec<crate::undo::Undo> {
        lock(&self.shared.patched)
            .iter()
            .map(|(pid, (start_time, _))| {
                crate::undo::Undo::Vdso(journal::Owner {
                    pid: *pid,
                    start_time: *start_time,
                })
            })
            .collect()
    }

    /// Ends the skew at once: the rule passes every read, the thread stops, each vDSO is
    /// restored, and the programs are detached.
    pub fn revert(&mut self) -> Result<(), ClockError> {
        let ended = ClockRule::default();
        let disarmed = self.rule.set(0, ended, 0);
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let restored = self.shared.restore();
        tracing::debug!(id = %self.shared.id, restored, "clock-skew: vDSOs restored");
        self.ebpf = None;
        disarmed.map_err(|e| kernel("CLOCK_RULE", e))
    }
}

impl Drop for ClockSkew {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.revert();
        }
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, ClockError>
where
    T: TryFrom<Map>,
    <T as TryFrom<Map>>::Error: std::fmt::Display,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| kernel("clock.bpf.o", format!("has no map {name}")))?;
    T::try_from(map).map_err(|e| kernel(name.to_string(), e))
}

/// A handle on the object's heartbeat for the engine's heartbeat thread (a dup of the map's
/// descriptor: it needs nothing of the fault's state).
fn heartbeat(ebpf: &Ebpf) -> Result<Beat, ClockError> {
    let data: &MapData = match ebpf.map("HEARTBEAT") {
        Some(Map::Array(data)) => data,
        _ => return Err(kernel("clock.bpf.o", "has no array HEARTBEAT")),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| kernel("dup HEARTBEAT", e))?;
    let data = MapData::from_fd(fd).map_err(|e| kernel("HEARTBEAT", e))?;
    let array = Array::try_from(Map::Array(data)).map_err(|e| kernel("HEARTBEAT", e))?;
    Ok(Beat::new(array))
}

/// The fault's thread: patches each target that exec'd (reported by the kernel side) and,
/// for a cgroup or pod, adds processes that joined it.
fn follow(
    shared: &Shared,
    target: &ProcessRef,
    name: &str,
    mut targets: BpfHashMap<MapData, u32, u32>,
    mut execs: RingBuf<MapData>,
) {
    let rescan = !matches!(target, ProcessRef::Pid(_));
    let mut last_scan = Instant::now();
    let mut last_beat = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        if last_beat.elapsed() >= BEAT {
            last_beat = Instant::now();
            shared.beat();
        }
        let mut fds = [libc::pollfd {
            fd: execs.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd; a 50 ms wait, so a stop is seen soon.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
        while let Some(item) = execs.next() {
            let word = |at: usize| {
                item.get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
            };
            if let (Some(pid), Some(FORKED)) = (word(0), word(4)) {
                shared.adopt(pid);
            } else if let Some(pid) = word(0) {
                if let Err(e) = shared.patch(pid) {
                    tracing::warn!(pid, "clock-skew: patch after exec: {e}");
                }
                // The kernel side stopped it before its first instruction: patched (or not
                // ours), it runs on.
                if word(4) == Some(1)
                    && let Ok(pid) = i32::try_from(pid)
                {
                    // SAFETY: kill with a plain pid and signal.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                }
            }
        }
        if rescan && last_scan.elapsed() >= RESCAN {
            last_scan = Instant::now();
            let Ok(found) = process::find(target, name, false, &Default::default()) else {
                continue;
            };
            for Proc { owner, .. } in found.procs {
                let known = lock(&shared.patched).contains_key(&owner.pid);
                if !known
                    && targets.insert(owner.pid, 1, 0).is_ok()
                    && let Err(e) = shared.patch(owner.pid)
                {
                    tracing::debug!(pid = owner.pid, "clock-skew: patch a newcomer: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!(
                "skipped: needs root (ptrace and /proc/PID/mem of a child), as the agent has"
            );
        }
        root
    }

    /// The bytes at each entry, then the stub's bytes, in `pid`'s vDSO.
    fn image_bytes(pid: &str, image: &vdso::Image) -> Vec<Vec<u8>> {
        let (base, _) = vdso::mapping(pid).expect("vdso");
        let mem = File::open(format!("/proc/{pid}/mem")).expect("mem");
        let read = |at: u64, len: usize| {
            let mut b = vec![0u8; len];
            mem.read_exact_at(&mut b, base + at).expect("read");
            b
        };
        let mut out: Vec<Vec<u8>> = image
            .entries
            .iter()
            .map(|e| read(e.offset, e.jump.len()))
            .collect();
        out.push(read(image.stub_at, image.slack.len()));
        out
    }

    fn spawned(program: &str, args: &[&str]) -> std::process::Child {
        let child = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect(program);
        // The child's mappings are its own program's once it has exec'd.
        let started = Instant::now();
        while vdso::mapping(&child.id().to_string()).is_err()
            && started.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    #[test]
    fn the_vdso_has_room_for_the_stub_and_the_functions_we_patch() {
        let image = vdso::image().expect("image");
        // clock_gettime and gettimeofday everywhere, time too on x86_64.
        assert!(image.entries.len() >= 2, "{} entries", image.entries.len());
        for e in &image.entries {
            assert_ne!(e.original, e.jump, "an entry already holds its jump");
        }
        assert!(image.slack.iter().all(|b| *b == 0));
    }

    /// The patch goes into the target's own copy of the page and comes out again; this
    /// process's vDSO (every other process's) never changes.
    #[test]
    fn a_patch_is_the_target_s_alone_and_restores_exactly() {
        if !root() {
            return;
        }
        let image = vdso::image().expect("image");
        let mut child = spawned("sleep", &["30"]);
        let pid = child.id();
        let before = image_bytes(&pid.to_string(), image);
        let target = image
            .patch(pid, &vdso::Page::default())
            .expect("patch")
            .expect("a vDSO like ours");
        let after = image_bytes(&pid.to_string(), image);
        for (e, have) in image.entries.iter().zip(&after) {
            assert_eq!(have, &e.jump);
        }
        assert_ne!(after.last(), before.last(), "the stub is not in the slack");
        assert_eq!(image_bytes("self", image), before, "our own vDSO changed");
        assert!(image.restore(pid, &target).expect("restore"));
        assert_eq!(image_bytes(&pid.to_string(), image), before);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Reads lines from a child's stdout on a thread.
    fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufRead::lines(io::BufReader::new(out)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }

    fn wall_ns() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as i64
    }

    /// A Python printing time_ns and monotonic_ns (clock_gettime through the vDSO) and a Perl
    /// printing time() (x86_64: the vDSO's time; elsewhere gettimeofday), every 20 ms.
    struct Readers {
        children: Vec<std::process::Child>,
        python: std::sync::mpsc::Receiver<String>,
        perl: std::sync::mpsc::Receiver<String>,
    }

    impl Readers {
        fn start() -> Readers {
            let mut python = spawned(
                "python3",
                &[
                    "-u",
                    "-c",
                    "import time\nwhile True:\n print(time.time_ns(), time.monotonic_ns()); time.sleep(0.02)",
                ],
            );
            let mut perl = spawned(
                "perl",
                &[
                    "-e",
                    "$|=1; while (1) { print time(), \"\\n\"; select(undef, undef, undef, 0.02) }",
                ],
            );
            let (py, pl) = (lines_of(&mut python), lines_of(&mut perl));
            py.recv_timeout(Duration::from_secs(10))
                .expect("python runs");
            pl.recv_timeout(Duration::from_secs(10)).expect("perl runs");
            Readers {
                children: vec![python, perl],
                python: py,
                perl: pl,
            }
        }

        /// The next fresh reads: (python's wall clock - ours, its monotonic - ours) in ns and
        /// (perl's seconds - ours).
        fn offsets(&self) -> (i64, i64, i64) {
            while self.python.try_recv().is_ok() {}
            while self.perl.try_recv().is_ok() {}
            let line = self
                .python
                .recv_timeout(Duration::from_secs(5))
                .expect("python still runs");
            let (wall, mono) = (wall_ns(), i64::try_from(monotonic_ns()).unwrap_or(0));
            let mut v = line
                .split_whitespace()
                .map(|v| v.parse::<i64>().expect("ns"));
            let (w, m) = (v.next().expect("wall"), v.next().expect("mono"));
            let secs: i64 = self
                .perl
                .recv_timeout(Duration::from_secs(5))
                .expect("perl still runs")
                .trim()
                .parse()
                .expect("seconds");
            (w - wall, m - mono, secs - wall_ns() / 1_000_000_000)
        }
    }

    impl Drop for Readers {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// With no clock to move (where the kernel side moves results), the stub is the system
    /// call: patched programs keep running and keep reading true time.
    #[test]
    fn patched_programs_keep_reading_true_time_through_the_stub() {
        if !root() {
            return;
        }
        let image = vdso::image().expect("image");
        let readers = Readers::start();
        let targets: Vec<_> = readers
            .children
            .iter()
            .map(|c| image.patch(c.id(), &vdso::Page::default()).expect("patch"))
            .collect();
        for _ in 0..5 {
            let (wall, mono, secs) = readers.offsets();
            assert!(
                wall.abs() < 1_000_000_000,
                "python's wall clock is {wall} ns off"
            );
            assert!(
                mono.abs() < 1_000_000_000,
                "python's monotonic is {mono} ns off"
            );
            assert!(secs.abs() <= 1, "perl's time() is {secs} s off");
        }
        for (c, t) in readers.children.iter().zip(targets) {
            assert!(image.restore(c.id(), &t.expect("ours")).expect("restore"));
        }
        readers.offsets();
    }

    /// Where the kernel cannot move results, the stub moves the clocks it is told to: the
    /// wall clock of the patched programs is an hour ahead, their monotonic clock untouched;
    /// with no heartbeat for the bound, they are back on true time.
    #[test]
    fn the_stub_moves_the_wall_clock_until_its_heartbeat_stops() {
        if !root() {
            return;
        }
        const HOUR: i64 = 3_600_000_000_000;
        let image = vdso::image().expect("image");
        let readers = Readers::start();
        let now = i64::try_from(monotonic_ns()).unwrap_or(0);
        let page = vdso::Page {
            clocks: 1 << libc::CLOCK_REALTIME,
            offset_ns: HOUR,
            origin_ns: now,
            deadline_ns: now + 60_000_000_000,
            bound_ns: 1_000_000_000,
            heartbeat_ns: now,
            ..Default::default()
        };
        let targets: Vec<_> = readers
            .children
            .iter()
            .map(|c| image.patch(c.id(), &page).expect("patch").expect("ours"))
            .collect();
        let (wall, mono, secs) = readers.offsets();
        assert!(
            (wall - HOUR).abs() < 1_000_000_000,
            "python's wall clock is {wall} ns off"
        );
        assert!(
            mono.abs() < 1_000_000_000,
            "python's monotonic moved by {mono} ns"
        );
        assert!((secs - 3600).abs() <= 1, "perl's time() is {secs} s off");
        // No beat since `now`: once it is a second old the stub passes true time.
        std::thread::sleep(Duration::from_millis(1_200));
        let (wall, _, secs) = readers.offsets();
        assert!(
            wall.abs() < 1_000_000_000,
            "still {wall} ns off without a heartbeat"
        );
        assert!(
            secs.abs() <= 1,
            "perl still {secs} s off without a heartbeat"
        );
        // A beat brings the skew back (the stub reads its heartbeat on every call).
        for t in &targets {
            image
                .beat(t, i64::try_from(monotonic_ns()).unwrap_or(0))
                .expect("beat");
        }
        let (wall, _, _) = readers.offsets();
        assert!(
            (wall - HOUR).abs() < 1_000_000_000,
            "a beat did not bring it back: {wall}"
        );
        for (c, t) in readers.children.iter().zip(&targets) {
            assert!(image.restore(c.id(), t).expect("restore"));
        }
        let (wall, _, secs) = readers.offsets();
        assert!(
            wall.abs() < 1_000_000_000 && secs.abs() <= 1,
            "restored, yet {wall} ns off"
        );
    }

    /// Drift: the stub's offset grows with the time since the fault's origin (here 10 s ago at
    /// +500,000 ppm: 5 s ahead, half a second more each second).
    #[test]
    fn the_stub_drifts_from_its_origin() {
        if !root() {
            return;
        }
        let image = vdso::image().expect("image");
        let readers = Readers::start();
        let now = i64::try_from(monotonic_ns()).unwrap_or(0);
        let page = vdso::Page {
            clocks: 1 << libc::CLOCK_REALTIME,
            drift_ppm: 500_000,
            origin_ns: now - 10_000_000_000,
            deadline_ns: now + 60_000_000_000,
            bound_ns: 60_000_000_000,
            heartbeat_ns: now,
            ..Default::default()
        };
        let target = image
            .patch(readers.children[0].id(), &page)
            .expect("patch")
            .expect("ours");
        let (first, _, _) = readers.offsets();
        std::thread::sleep(Duration::from_secs(1));
        let (second, _, _) = readers.offsets();
        assert!(
            (first - 5_000_000_000).abs() < 500_000_000,
            "{first} ns ahead, not ~5 s"
        );
        let grew = second - first;
        assert!(
            (grew - 500_000_000).abs() < 250_000_000,
            "grew {grew} ns in ~1 s, not ~0.5 s"
        );
        assert!(
            image
                .restore(readers.children[0].id(), &target)
                .expect("restore")
        );
    }
}
