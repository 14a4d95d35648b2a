//! clock-skew: the clocks of exactly the target processes move; no other process's do.
//!
//! **Two halves.** A program reads the clock either through the vDSO (no system call: nothing
//! in the kernel sees it) or through a system call. So each target's vDSO has its
//! clock_gettime and gettimeofday (and on x86_64 time) replaced by a few instructions that make
//! the system call (written through /proc/PID/mem, which gives that process its own copy of
//! the page; every other process keeps the shared one). The calls then reach the tracepoints
//! of [clock.bpf.o](../../agent-ebpf/src/clock.rs), which move the result of a target's read
//! before it returns to user space: one mechanism for vDSO reads, direct system calls, Go's
//! runtime (it calls the vDSO too), x86_64 and arm64 alike.
//!
//! **Which processes.** The target's processes at apply (`--pid`: the process and its
//! descendants), then whatever they fork (the kernel side adds a fork's tgid at once, in
//! task_newtask; threads share their tgid already). A fork inherits the patched page; an exec
//! maps a fresh vDSO, so the kernel side reports every exec of a target and a thread here
//! patches the new program (its system calls are moved from the first one). For a cgroup or a
//! pod, processes that join it later are found by a rescan every [`RESCAN`].
//!
//! **How it ends.** Revert disarms the rule (one map write), restores each vDSO from the
//! engine's own (every process maps the same image), and detaches the programs. Without us:
//! the programs are attached through the engine's descriptors, so they go with a killed
//! engine; a frozen one stops beating, and the rule passes reads untouched once its heartbeat
//! is 1 s old; the deadline is in the rule. A vDSO left patched still reads true time, through
//! the system call (slower: that is the only thing left).
use crate::heartbeat::{Beat, deadline_ns, monotonic_ns};
use crate::journal;
use crate::process::{self, Proc};
use crate::spec::{InvalidInput, ProcessRef, SkewedClock, invalid};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use chaos_abi::{ClockCounters, ClockRule};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

static OBJECT: &[u8] = aya::include_bytes_aligned!("../../agent-ebpf/clock.bpf.o");

/// How often the processes of a cgroup or pod target are looked for again.
const RESCAN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
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

/// The programs and the tracepoints they attach to.
const ATTACH: [(&str, &str, &str); 7] = [
    ("chaos_clk_enter", "syscalls", "sys_enter_clock_gettime"),
    ("chaos_tod_enter", "syscalls", "sys_enter_gettimeofday"),
    ("chaos_clk_exit", "syscalls", "sys_exit_clock_gettime"),
    ("chaos_clk_exit", "syscalls", "sys_exit_gettimeofday"),
    ("chaos_clk_fork", "task", "task_newtask"),
    ("chaos_clk_exec", "sched", "sched_process_exec"),
    ("chaos_clk_gone", "sched", "sched_process_exit"),
];

/// The processes (by tgid) some live clock fault of this engine holds, and which fault: two
/// faults on one process would compose their patches badly, so the second is refused.
fn held() -> &'static Mutex<BTreeMap<u32, String>> {
    static HELD: std::sync::OnceLock<Mutex<BTreeMap<u32, String>>> = std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The vDSO: where its clock functions are and what replaces them.
mod vdso {
    use super::*;

    /// The replacement for one vDSO function: the same call as a system call.
    pub struct Stub {
        pub symbol: &'static str,
        pub code: &'static [u8],
    }

    /// `mov eax, NR; syscall; ret`
    #[cfg(target_arch = "x86_64")]
    pub const STUBS: &[Stub] = &[
        Stub {
            symbol: "__vdso_clock_gettime",
            code: &[0xb8, 0xe4, 0, 0, 0, 0x0f, 0x05, 0xc3],
        },
        Stub {
            symbol: "__vdso_gettimeofday",
            code: &[0xb8, 0x60, 0, 0, 0, 0x0f, 0x05, 0xc3],
        },
        // time(t): clock_gettime(CLOCK_REALTIME) into 16 bytes of stack, then the seconds in
        // rax and *t. (The time system call returns its value in a register, which a
        // tracepoint cannot change.)
        Stub {
            symbol: "__vdso_time",
            code: &[
                0x57, // push rdi
                0x50, 0x50, // push rax; push rax
                0x48, 0x89, 0xe6, // mov rsi, rsp
                0x31, 0xff, // xor edi, edi
                0xb8, 0xe4, 0, 0, 0, // mov eax, 228
                0x0f, 0x05, // syscall
                0x58, // pop rax (tv_sec)
                0x5a, // pop rdx (tv_nsec)
                0x5f, // pop rdi
                0x48, 0x85, 0xff, // test rdi, rdi
                0x74, 0x03, // je +3
                0x48, 0x89, 0x07, // mov [rdi], rax
                0xc3, // ret
            ],
        },
    ];

    /// `mov x8, #NR; svc #0; ret`
    #[cfg(target_arch = "aarch64")]
    pub const STUBS: &[Stub] = &[
        Stub {
            symbol: "__kernel_clock_gettime",
            code: &[
                0x28, 0x0e, 0x80, 0xd2, 0x01, 0, 0, 0xd4, 0xc0, 0x03, 0x5f, 0xd6,
            ],
        },
        Stub {
            symbol: "__kernel_gettimeofday",
            code: &[
                0x28, 0x15, 0x80, 0xd2, 0x01, 0, 0, 0xd4, 0xc0, 0x03, 0x5f, 0xd6,
            ],
        },
    ];

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    pub const STUBS: &[Stub] = &[];

    /// One function to patch: its offset in the image, the stub, and the true code (from the
    /// engine's own vDSO).
    pub struct Site {
        pub offset: u64,
        pub code: &'static [u8],
        pub original: Vec<u8>,
    }

    /// The [vdso] mapping of `pid`: start and length.
    pub fn mapping(pid: &str) -> io::Result<(u64, u64)> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        for line in maps.lines() {
            if !line.ends_with("[vdso]") {
                continue;
            }
            let range = line.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("", ""));
            let (a, b) = (
                u64::from_str_radix(a, 16).map_err(io::Error::other)?,
                u64::from_str_radix(b, 16).map_err(io::Error::other)?,
            );
            return Ok((a, b.saturating_sub(a)));
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "no [vdso] mapping"))
    }

    /// The sites of the engine's own vDSO: every process on this kernel maps the same image.
    pub fn sites() -> Result<Vec<Site>, ClockError> {
        let (base, len) = mapping("self").map_err(|e| kernel("find this process's vDSO", e))?;
        let mut image = vec![0u8; usize::try_from(len).unwrap_or(0)];
        File::open("/proc/self/mem")
            .and_then(|f| f.read_exact_at(&mut image, base))
            .map_err(|e| kernel("read this process's vDSO", e))?;
        use object::{Object, ObjectSegment, ObjectSymbol};
        let elf = object::File::parse(&*image).map_err(|e| kernel("parse the vDSO", e))?;
        let vaddr = elf.segments().next().map_or(0, |s| s.address());
        let mut sites = Vec::new();
        for stub in STUBS {
            let Some(sym) = elf.dynamic_symbols().find(|s| s.name() == Ok(stub.symbol)) else {
                continue;
            };
            let offset = sym.address().saturating_sub(vaddr);
            if sym.size() < stub.code.len() as u64 {
                tracing::warn!(symbol = stub.symbol, "vDSO function too small to patch");
                continue;
            }
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let Some(original) = image.get(start..start.saturating_add(stub.code.len())) else {
                continue;
            };
            sites.push(Site {
                offset,
                code: stub.code,
                original: original.to_vec(),
            });
        }
        if sites.is_empty() {
            return Err(ClockError::Unsupported(
                "this architecture's vDSO has no clock function we can patch".into(),
            ));
        }
        Ok(sites)
    }

    /// Writes the stub (`stub`) or the true code of every site into `pid`'s vDSO, if that
    /// vDSO holds either form (a 32-bit process's does not: left alone, and false).
    pub fn write(pid: u32, sites: &[Site], stub: bool) -> io::Result<bool> {
        let (base, _) = mapping(&pid.to_string())?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        for site in sites {
            let mut have = vec![0u8; site.code.len()];
            mem.read_exact_at(&mut have, base + site.offset)?;
            if have != site.original && have != site.code {
                return Ok(false);
            }
        }
        for site in sites {
            let code: &[u8] = if stub { site.code } else { &site.original };
            mem.write_all_at(code, base + site.offset)?;
        }
        Ok(true)
    }
}

/// What the fault's thread and its revert share.
struct Shared {
    id: String,
    sites: Vec<vdso::Site>,
    /// The patched targets and the start time of each (a pid reused since is not ours).
    patched: Mutex<BTreeMap<u32, u64>>,
    stop: AtomicBool,
}

impl Shared {
    /// Patches `pid`'s vDSO (again, after an exec) and notes it.
    fn patch(&self, pid: u32) {
        let Ok(start_time) = journal::start_time(pid) else {
            return;
        };
        match vdso::write(pid, &self.sites, true) {
            Ok(true) => {
                lock(&self.patched).insert(pid, start_time);
                lock(held()).insert(pid, self.id.clone());
            }
            Ok(false) => tracing::debug!(pid, "vDSO of another kind: left alone"),
            Err(e) => tracing::debug!(pid, "patch vDSO: {e}"),
        }
    }

    /// Puts the true vDSO back in every process still running the program we patched.
    fn restore(&self) -> usize {
        let patched = std::mem::take(&mut *lock(&self.patched));
        let mut held = lock(held());
        let mut restored = 0;
        for (pid, start_time) in patched {
            if held.get(&pid) == Some(&self.id) {
                held.remove(&pid);
            }
            if journal::start_time(pid).ok() != Some(start_time) {
                continue;
            }
            match vdso::write(pid, &self.sites, false) {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => tracing::debug!(pid, "restore vDSO: {e}"),
            }
        }
        restored
    }
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

fn refuse_under_lockdown() -> Result<(), ClockError> {
    match lockdown().as_deref() {
        None | Some("none") => Ok(()),
        Some(mode) => Err(ClockError::Unsupported(format!(
            "the kernel is locked down ({mode}), which forbids bpf_probe_write_user, the \
             helper that moves a clock read's result; nothing was applied"
        ))),
    }
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
        refuse_under_lockdown()?;
        let sites = vdso::sites()?;
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
        let rule = ClockRule {
            offset_ns,
            drift_ppm_abs: drift_ppm.unsigned_abs(),
            drift_negative: u32::from(drift_ppm < 0),
            clocks: mask,
            origin_ns: monotonic_ns(),
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
        for (program, category, tracepoint) in ATTACH {
            let prog: &mut TracePoint =
                ebpf.program_mut(program)
                    .and_then(|p| p.try_into().ok())
                    .ok_or_else(|| kernel("clock.bpf.o", format!("has no tracepoint {program}")))?;
            if prog.fd().is_err() {
                prog.load().map_err(|e| {
                    let text = format!("{e:#}");
                    if text.contains("bpf_probe_write_user") {
                        ClockError::Unsupported(
                            "this kernel refuses bpf_probe_write_user, the helper that moves a \
                             clock read's result; nothing was applied"
                                .into(),
                        )
                    } else {
                        kernel(format!("load {program} (verifier)"), e)
                    }
                })?;
            }
            prog.attach(category, tracepoint)
                .map_err(|e| kernel(format!("attach {program} to {category}/{tracepoint}"), e))?;
        }
        let shared = Arc::new(Shared {
            id: id.to_string(),
            sites,
            patched: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
        });
        for p in &found.procs {
            shared.patch(p.owner.pid);
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
    while !shared.stop.load(Ordering::Relaxed) {
        let mut fds = [libc::pollfd {
            fd: execs.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd; a 50 ms wait, so a stop is seen soon.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
        while let Some(item) = execs.next() {
            if let Some(pid) = item.get(..4).and_then(|b| b.try_into().ok()) {
                shared.patch(u32::from_ne_bytes(pid));
            }
        }
        if rescan && last_scan.elapsed() >= RESCAN {
            last_scan = Instant::now();
            let Ok(found) = process::find(target, name, false, &Default::default()) else {
                continue;
            };
            for Proc { owner, .. } in found.procs {
                let known = lock(&shared.patched).contains_key(&owner.pid);
                if !known && targets.insert(owner.pid, 1, 0).is_ok() {
                    shared.patch(owner.pid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_bytes(pid: &str, sites: &[vdso::Site]) -> Vec<Vec<u8>> {
        let (base, _) = vdso::mapping(pid).expect("vdso");
        let mem = File::open(format!("/proc/{pid}/mem")).expect("mem");
        sites
            .iter()
            .map(|s| {
                let mut b = vec![0u8; s.code.len()];
                mem.read_exact_at(&mut b, base + s.offset).expect("read");
                b
            })
            .collect()
    }

    #[test]
    fn the_vdso_has_the_clock_functions_we_patch() {
        let sites = vdso::sites().expect("sites");
        // clock_gettime and gettimeofday everywhere, time too on x86_64.
        assert!(sites.len() >= 2, "{} sites", sites.len());
        for s in &sites {
            assert_ne!(s.original, s.code, "a site already holds its stub");
        }
    }

    /// The patch goes into the target's own copy of the page and comes out again; this
    /// process's vDSO (every other process's) never changes. Needs root (or ptrace rights over
    /// the child), as the agent has.
    #[test]
    fn a_patch_is_the_target_s_alone_and_restores_exactly() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let sites = vdso::sites().expect("sites");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        // The child's mappings are its own program's once it has exec'd.
        let started = Instant::now();
        while vdso::mapping(&pid.to_string()).is_err() && started.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let originals: Vec<Vec<u8>> = sites.iter().map(|s| s.original.clone()).collect();
        let stubs: Vec<Vec<u8>> = sites.iter().map(|s| s.code.to_vec()).collect();
        assert_eq!(image_bytes(&pid.to_string(), &sites), originals);
        assert!(vdso::write(pid, &sites, true).expect("patch"));
        assert_eq!(image_bytes(&pid.to_string(), &sites), stubs);
        assert_eq!(
            image_bytes("self", &sites),
            originals,
            "our own vDSO changed"
        );
        assert!(vdso::write(pid, &sites, false).expect("restore"));
        assert_eq!(image_bytes(&pid.to_string(), &sites), originals);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Reads lines of `<seconds or ns> ...` from a child's stdout on a thread.
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

    /// The stubs are code that runs: a patched Python (clock_gettime through the vDSO) and
    /// Perl (time) keep reading true time, through the system call now (the vDSO's own code
    /// is gone), and keep running.
    #[test]
    fn patched_programs_keep_reading_true_time_through_the_stubs() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let sites = vdso::sites().expect("sites");
        let spawn = |program: &str, script: &str| {
            std::process::Command::new(program)
                .args(["-e", script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect(program)
        };
        let mut python = std::process::Command::new("python3")
            .args([
                "-u",
                "-c",
                "import time\nwhile True:\n print(time.time_ns(), time.monotonic_ns()); time.sleep(0.02)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut perl = spawn(
            "perl",
            "$|=1; while (1) { print time(), \"\\n\"; select(undef, undef, undef, 0.02) }",
        );
        let (py, pl) = (lines_of(&mut python), lines_of(&mut perl));
        py.recv_timeout(Duration::from_secs(10))
            .expect("python runs");
        pl.recv_timeout(Duration::from_secs(10)).expect("perl runs");
        for pid in [python.id(), perl.id()] {
            assert!(vdso::write(pid, &sites, true).expect("patch"));
        }
        while py.try_recv().is_ok() {}
        while pl.try_recv().is_ok() {}
        for _ in 0..10 {
            let line = py
                .recv_timeout(Duration::from_secs(5))
                .expect("python still runs");
            let real: i64 = line
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .expect("ns");
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos() as i64;
            assert!(
                (now - real).abs() < 1_000_000_000,
                "python read {real}, true {now}"
            );
            let line = pl
                .recv_timeout(Duration::from_secs(5))
                .expect("perl still runs");
            let secs: i64 = line.trim().parse().expect("seconds");
            assert!((now / 1_000_000_000 - secs).abs() <= 1, "perl read {secs}");
        }
        for pid in [python.id(), perl.id()] {
            assert!(vdso::write(pid, &sites, false).expect("restore"));
        }
        py.recv_timeout(Duration::from_secs(5))
            .expect("python runs after the restore");
        pl.recv_timeout(Duration::from_secs(5))
            .expect("perl runs after the restore");
        for mut c in [python, perl] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
