//! The owner's heartbeat: how the kernel tells a live engine from a dead or frozen one.
//!
//! Every rule an engine puts in the datapath carries its deadline and its owner's heartbeat
//! slot; the classifier passes packets untouched once the deadline is past or the beat is older
//! than [`chaos_abi::HEARTBEAT_BOUND_NS`]. This thread refreshes the beat of every live fault
//! every [`chaos_abi::HEARTBEAT_INTERVAL_NS`], so a fault outlives its owner (kill -9, SIGSTOP,
//! a frozen VM) by at most the bound, whether or not anything is left to detach it.
//!
//! It works on duplicated map descriptors, never on the engine's state: an apply or a revert
//! holding the engine's lock cannot delay a beat.
use aya::maps::{Array, MapData};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// One fault's heartbeat map.
pub struct Beat(Array<MapData, u64>);

impl Beat {
    pub fn new(map: Array<MapData, u64>) -> Self {
        Beat(map)
    }

    fn stamp(&mut self, now: u64) -> Result<(), aya::maps::MapError> {
        self.0.set(0, now, 0)
    }
}

/// The heartbeat maps of an engine's live faults, by fault id.
#[derive(Default)]
pub struct Heartbeats {
    beats: Mutex<BTreeMap<String, Beat>>,
}

pub const INTERVAL: Duration = Duration::from_nanos(chaos_abi::HEARTBEAT_INTERVAL_NS);

impl Heartbeats {
    /// Starts the beating thread; it ends when the last `Arc` is dropped.
    pub fn start() -> Arc<Self> {
        let beats = Arc::new(Heartbeats::default());
        let weak: Weak<Heartbeats> = Arc::downgrade(&beats);
        let spawned = std::thread::Builder::new()
            .name("chaos-heartbeat".into())
            .spawn(move || {
                while let Some(beats) = weak.upgrade() {
                    beats.beat();
                    drop(beats);
                    std::thread::sleep(INTERVAL);
                }
            });
        if let Err(e) = spawned {
            // Without beats every rule goes inert after the bound: safe, and loud.
            tracing::error!("cannot start the heartbeat thread: {e}; faults end within 2 s");
        }
        beats
    }

    pub fn add(&self, id: &str, mut beat: Beat) {
        if let Err(e) = beat.stamp(monotonic_ns()) {
            tracing::warn!(%id, "heartbeat: {e}");
        }
        self.lock().insert(id.to_string(), beat);
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Stamps every live fault's heartbeat with the current time.
    pub fn beat(&self) {
        let now = monotonic_ns();
        for (id, beat) in self.lock().iter_mut() {
            if let Err(e) = beat.stamp(now) {
                tracing::warn!(%id, "heartbeat: {e}");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Beat>> {
        self.beats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
// `time_t` and `c_long` are i32 on some 32-bit targets.
#[allow(clippy::useless_conversion)]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(i64::from(ts.tv_sec))
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(i64::from(ts.tv_nsec)).unwrap_or(0))
}

/// A wall-clock deadline on the kernel's monotonic clock.
pub fn deadline_ns(deadline: std::time::SystemTime) -> u64 {
    let left = deadline
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    monotonic_ns().saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
}
