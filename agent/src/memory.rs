//! Memory stress: workers (the CPU stress machinery's, placed in the target's cgroups before
//! they touch a page) that touch and hold memory asleep, so holding it costs no CPU.
//!
//! **How much.** `--bytes`, or `--percent` of the cgroup's memory limit (v2 `memory.max`, v1
//! `memory.limit_in_bytes`; the node's MemTotal when there is none), split evenly between the
//! workers. Without `--oom` an ask beyond the cgroup's headroom (its limit less its usage) is
//! refused, and the workers set `oom_score_adj` 1000 so that if the application grows into
//! them the OOM killer takes a worker, not the application. With `--oom` the workers are
//! ordinary candidates and the cgroup's OOM killer may act; the fault counts its kills
//! (`memory.events` or `memory.oom_control`) and how many of them were our workers. With no
//! limit at all, an ask beyond the node's MemAvailable is refused either way: that would be
//! the node's OOM killer, which may kill anything.
use crate::cgroup::{self, Placement};
use crate::spec::{CgroupRef, Counters, InvalidInput, MemorySize, format_size, invalid};
use crate::stress::{CpuStress, StressError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error(transparent)]
    Stress(#[from] StressError),
}

/// How long an apply waits for an unramped ask to be resident.
const RESIDENT_WAIT: Duration = Duration::from_secs(10);

/// The cgroup's memory accounting files.
#[derive(Debug, Clone)]
enum Accounting {
    V2(PathBuf),
    V1(PathBuf),
}

impl Accounting {
    fn find(p: &Placement) -> Option<Accounting> {
        if let Some(d) = p.v2.as_ref().filter(|d| d.join("memory.max").is_file()) {
            return Some(Accounting::V2(d.clone()));
        }
        p.v1.iter()
            .find(|d| d.join("memory.limit_in_bytes").is_file())
            .map(|d| Accounting::V1(d.clone()))
    }

    fn read(&self, v2: &str, v1: &str) -> Option<String> {
        let path = match self {
            Accounting::V2(d) => d.join(v2),
            Accounting::V1(d) => d.join(v1),
        };
        std::fs::read_to_string(path).ok()
    }

    /// The limit, if there is one (v1 shows "none" as a huge number).
    fn limit(&self) -> Option<u64> {
        let text = self.read("memory.max", "memory.limit_in_bytes")?;
        let v: u64 = text.trim().parse().ok()?;
        (v < 1 << 60).then_some(v)
    }

    fn usage(&self) -> u64 {
        self.read("memory.current", "memory.usage_in_bytes")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// OOM kills in this cgroup so far.
    fn oom_kills(&self) -> u64 {
        self.read("memory.events", "memory.oom_control")
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Held memory of one fault. Dropping it stops the workers (the memory is freed at once).
pub struct MemoryStress {
    workers: CpuStress,
    started: usize,
    asked: u64,
    /// The limit the ask was measured against (the node's memory without one).
    of: u64,
    accounting: Option<Accounting>,
    oom_before: u64,
    /// The counters when the workers were killed (after that they would read as all gone).
    last: Option<Counters>,
}

impl MemoryStress {
    pub fn start(
        size: MemorySize,
        count: u32,
        target: &CgroupRef,
        ramp: Duration,
        oom: bool,
    ) -> Result<Self, MemoryError> {
        let placement = cgroup::resolve(target)?;
        let accounting = Accounting::find(&placement);
        let limit = accounting.as_ref().and_then(Accounting::limit);
        let node = meminfo("MemTotal:").unwrap_or(0);
        let of = limit.unwrap_or(node);
        let asked = match size {
            MemorySize::Bytes(b) => b,
            MemorySize::Percent(p) => (of as f64 * p / 100.0) as u64,
        };
        let field = match size {
            MemorySize::Bytes(_) => "--bytes",
            MemorySize::Percent(_) => "--percent",
        };
        match (limit, &accounting) {
            (Some(limit), Some(acc)) if !oom => {
                let headroom = limit.saturating_sub(acc.usage());
                if asked > headroom {
                    return Err(invalid(
                        field,
                        format!(
                            "{} is more than the {} {target} has left under its memory limit of {} (ask less, or add --oom to let its OOM killer act)",
                            format_size(asked),
                            format_size(headroom),
                            format_size(limit)
                        ),
                    )
                    .into());
                }
            }
            (None, _) => {
                let available = meminfo("MemAvailable:").unwrap_or(0);
                if asked > available {
                    return Err(invalid(
                        field,
                        format!(
                            "{} is more than the node's {} available, and {target} has no memory limit to hold it (the node's OOM killer could kill anything)",
                            format_size(asked),
                            format_size(available)
                        ),
                    )
                    .into());
                }
            }
            _ => {}
        }
        let each = asked.div_ceil(u64::from(count.max(1)));
        let oom_before = accounting.as_ref().map_or(0, Accounting::oom_kills);
        let workers = CpuStress::start_memory(&placement, count, each, ramp, !oom)?;
        let stress = MemoryStress {
            workers,
            started: count as usize,
            asked,
            of,
            accounting,
            oom_before,
            last: None,
        };
        if ramp.is_zero() {
            stress.wait_resident();
        }
        Ok(stress)
    }

    /// Until the ask is resident (99 %), a worker is gone, or the wait is over.
    fn wait_resident(&self) {
        let started = Instant::now();
        while started.elapsed() < RESIDENT_WAIT {
            if self.workers.resident_bytes() >= self.asked / 100 * 99
                || self.workers.alive() < self.started
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn workers(&self) -> &CpuStress {
        &self.workers
    }

    /// Kills the workers (the memory is free at once); the counters stay as they were.
    pub fn kill(&mut self) -> Result<(), StressError> {
        if self.last.is_none() {
            self.last = Some(self.counters());
        }
        self.workers.kill()
    }

    pub fn into_workers(self) -> CpuStress {
        self.workers
    }

    /// seen_bytes: the limit (or the node's memory); matched_bytes: asked; affected_bytes:
    /// resident in the workers. affected: OOM kills in the cgroup since apply; matched: how many
    /// of our workers are gone (the OOM killer's choice).
    pub fn counters(&self) -> Counters {
        if let Some(c) = self.last {
            return c;
        }
        let kills = self
            .accounting
            .as_ref()
            .map_or(0, |a| a.oom_kills().saturating_sub(self.oom_before));
        Counters {
            seen_bytes: self.of,
            matched_bytes: self.asked,
            affected_bytes: self.workers.resident_bytes(),
            affected: kills,
            matched: self.started.saturating_sub(self.workers.alive()) as u64,
            ..Counters::default()
        }
    }
}
