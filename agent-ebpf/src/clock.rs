//! The clock-skew object: moves the result of the clock reads of chosen processes.
//!
//! Only reads that reach the kernel are seen here; user space (agent/src/clock.rs) patches the
//! target's vDSO so that its clock_gettime and gettimeofday make the system call. At the
//! call's entry the result buffer is remembered (per thread); at its exit, if the caller's
//! process is a target and the rule is live, the result is read back, moved, and written with
//! bpf_probe_write_user. Forks of a target become targets (threads share the tgid already); an
//! exec of a target is reported to user space, which patches the new program's vDSO.
//!
//! The rule ends by itself: past its deadline, or once its owner's heartbeat is older than
//! [`CLOCK_HEARTBEAT_BOUND_NS`], reads pass untouched. A killed owner's programs are detached
//! with its descriptors, so its skew ends at once.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_write_user,
        generated::{bpf_ktime_get_ns, bpf_send_signal},
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use chaos_abi::{
    CALL_CLOCK_GETTIME, CALL_GETTIMEOFDAY, CLOCK_HEARTBEAT_BOUND_NS, ClockCall, ClockCounters,
    ClockRule, MAX_CLOCK_TARGETS,
};

const BPF_F_NO_PREALLOC: u32 = 1;
const CLONE_THREAD: u64 = 0x0001_0000;
const NS_PER_SEC: u64 = 1_000_000_000;
const SIGSTOP: u32 = 19;
/// The second word of a CLOCK_EXECS event: 0 an exec, 1 an exec held stopped, 2 a fork.
const EVENT_FORK: u32 = 2;

#[map]
static CLOCK_RULE: Array<ClockRule> = Array::with_max_entries(1, 0);
#[map]
static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);
/// The target processes, by tgid.
#[map]
static CLOCK_TARGETS: HashMap<u32, u32> =
    HashMap::with_max_entries(MAX_CLOCK_TARGETS, BPF_F_NO_PREALLOC);
/// Calls between entry and exit, by pid_tgid (a thread is in one call at a time).
#[map]
static CLOCK_INFLIGHT: LruHashMap<u64, ClockCall> = LruHashMap::with_max_entries(16_384, 0);
#[map]
static CLOCK_COUNTERS: PerCpuArray<ClockCounters> = PerCpuArray::with_max_entries(1, 0);
/// Targets that exec'd (their new vDSO needs the patch) or were forked (their copy of the
/// patched page needs the heartbeat), by tgid.
#[map]
static CLOCK_EXECS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

fn tgid_of(pid_tgid: u64) -> u32 {
    (pid_tgid >> 32) as u32
}

fn is_target(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { CLOCK_TARGETS.get(&tgid) }.is_some()
}

fn enter(call: ClockCall) {
    let id = bpf_get_current_pid_tgid();
    if call.ptr == 0 || !is_target(tgid_of(id)) {
        return;
    }
    let _ = CLOCK_INFLIGHT.insert(&id, &call, 0);
}

/// syscalls/sys_enter_clock_gettime: which_clock at 16, tp at 24.
#[tracepoint]
pub fn chaos_clk_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format (the same on every architecture).
    let clockid: u64 = unsafe { ctx.read_at(16) }.unwrap_or(u64::MAX);
    let ptr: u64 = unsafe { ctx.read_at(24) }.unwrap_or(0);
    enter(ClockCall {
        ptr,
        clockid: clockid.min(u32::MAX as u64) as u32,
        call: CALL_CLOCK_GETTIME,
    });
    0
}

/// syscalls/sys_enter_gettimeofday: tv at 16.
#[tracepoint]
pub fn chaos_tod_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: as above.
    let ptr: u64 = unsafe { ctx.read_at(16) }.unwrap_or(0);
    enter(ClockCall {
        ptr,
        clockid: 0,
        call: CALL_GETTIMEOFDAY,
    });
    0
}

fn live(rule: &ClockRule, now: u64) -> bool {
    if now >= rule.deadline_ns {
        return false;
    }
    let beat = HEARTBEAT.get(0).copied().unwrap_or(0);
    now.saturating_sub(beat) < CLOCK_HEARTBEAT_BOUND_NS
}

fn skew_ns(rule: &ClockRule, now: u64) -> i64 {
    let elapsed_us = now.saturating_sub(rule.origin_ns) / 1000;
    let drift = (elapsed_us.wrapping_mul(rule.drift_ppm_abs) / 1000) as i64;
    if rule.drift_negative != 0 {
        rule.offset_ns.wrapping_sub(drift)
    } else {
        rule.offset_ns.wrapping_add(drift)
    }
}

/// `sec` and `sub` (units of `unit` ns) moved by `skew` ns; never before 0.
fn shift(sec: i64, sub: i64, unit: u64, skew: i64) -> [i64; 2] {
    let total = sec
        .wrapping_mul(NS_PER_SEC as i64)
        .wrapping_add(sub.wrapping_mul(unit as i64))
        .wrapping_add(skew);
    let total = if total < 0 { 0 } else { total as u64 };
    [(total / NS_PER_SEC) as i64, ((total % NS_PER_SEC) / unit) as i64]
}

/// syscalls/sys_exit_clock_gettime and sys_exit_gettimeofday: ret at 16.
#[tracepoint]
pub fn chaos_clk_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { CLOCK_INFLIGHT.get(&id) }).copied() else {
        return 0;
    };
    let _ = CLOCK_INFLIGHT.remove(&id);
    // SAFETY: as above.
    let ret: i64 = unsafe { ctx.read_at(16) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let Some(counters) = CLOCK_COUNTERS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a per-CPU value: nothing else writes it while we run.
    let counters = unsafe { &mut *counters };
    counters.reads += 1;
    let Some(rule) = CLOCK_RULE.get(0) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if !live(rule, now) || call.clockid >= 32 || rule.clocks & (1 << call.clockid) == 0 {
        return 0;
    }
    let unit = if call.call == CALL_GETTIMEOFDAY { 1000 } else { 1 };
    let ptr = call.ptr as *mut [i64; 2];
    // SAFETY: a user pointer the kernel has just written the result to; the helpers check it.
    let Ok(value) = (unsafe { bpf_probe_read_user(ptr as *const [i64; 2]) }) else {
        return 0;
    };
    let moved = shift(value[0], value[1], unit, skew_ns(rule, now));
    // SAFETY: as above.
    if unsafe { bpf_probe_write_user(ptr, &moved as *const [i64; 2]) }.is_ok() {
        counters.skewed += 1;
    }
    0
}

/// task/task_newtask: pid at 8, clone_flags at 32. A new process forked by a target is one.
#[tracepoint]
pub fn chaos_clk_fork(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format.
    let flags: u64 = unsafe { ctx.read_at(32) }.unwrap_or(CLONE_THREAD);
    if flags & CLONE_THREAD != 0 || !is_target(tgid_of(bpf_get_current_pid_tgid())) {
        return 0;
    }
    let child: i32 = unsafe { ctx.read_at(8) }.unwrap_or(0);
    if child <= 0 {
        return 0;
    }
    if CLOCK_TARGETS.insert(&(child as u32), &1, 0).is_err() {
        if let Some(c) = CLOCK_COUNTERS.get_ptr_mut(0) {
            // SAFETY: per-CPU, as above.
            unsafe { (*c).lost_forks += 1 };
        }
        return 0;
    }
    // User space keeps the fork's copy of the patched page beating and restores it.
    let _ = CLOCK_EXECS.output::<[u32; 2]>(&[child as u32, EVENT_FORK], 0);
    0
}

/// sched/sched_process_exec: a target runs a new program, whose vDSO user space must patch.
/// While the rule is live the program is stopped (SIGSTOP, taken before its first
/// instruction) so that even a short one (`date`) reads the moved clock: user space patches
/// it and sends SIGCONT. The event says whether it was stopped.
#[tracepoint]
pub fn chaos_clk_exec(_ctx: TracePointContext) -> u32 {
    let tgid = tgid_of(bpf_get_current_pid_tgid());
    if is_target(tgid) {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let hold = CLOCK_RULE.get(0).is_some_and(|r| live(r, now))
            // SAFETY: signals the current task, which is in exec.
            && unsafe { bpf_send_signal(SIGSTOP) } == 0;
        let _ = CLOCK_EXECS.output::<[u32; 2]>(&[tgid, u32::from(hold)], 0);
    }
    0
}

/// sched/sched_process_exit: a target's leader exits; its tgid may be reused.
#[tracepoint]
pub fn chaos_clk_gone(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if id as u32 == tgid_of(id) {
        let _ = CLOCK_TARGETS.remove(&tgid_of(id));
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
