//! The fault engine: a desired set of faults, reconciled onto the kernel by one function.
//!
//! Apply, revert, deadline expiry and shutdown all edit the desired set and call
//! [`Engine::reconcile`], which makes the installed set match it (the kube-runtime shape).
//! Crash recovery is the same idea at start: whatever orphaned journals say is installed, and
//! nobody desires, is removed.
use crate::cgroup;
use crate::datapath::{
    self, Attach, AttachMode, AttachmentRecord, Counters, DatapathError, Hook, RootPlan,
    ShapingSite,
};
use crate::heartbeat::{self, Heartbeats};
use crate::journal::{Entry, Journal, Owner, SiteEntry};
use crate::netns::{Netns, NetnsError, NetnsId};
use crate::qdisc::ShapeError;
use crate::registry::{Record, Registration};
use crate::spec::{DEFAULT_MAX_DURATION, FaultKind, FaultSpec, InvalidInput, NetnsRef};
use crate::stress::{CpuStress, StressError};
use crate::sweep::Claims;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("missing privileges: {0}")]
    Privileges(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Stress(#[from] StressError),
    #[error(transparent)]
    Process(crate::process::ProcessError),
    #[error(transparent)]
    Disk(crate::disk::DiskError),
    #[error(transparent)]
    Clock(crate::clock::ClockError),
    #[error("no active fault {0}")]
    NotFound(String),
    #[error("journal {path}: {source}")]
    Journal {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine registry {path}: {source}")]
    Registry {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<crate::memory::MemoryError> for EngineError {
    fn from(e: crate::memory::MemoryError) -> Self {
        match e {
            crate::memory::MemoryError::Invalid(i) => EngineError::Invalid(i),
            crate::memory::MemoryError::Stress(s) => EngineError::Stress(s),
        }
    }
}

impl From<crate::disk::DiskError> for EngineError {
    fn from(e: crate::disk::DiskError) -> Self {
        match e {
            crate::disk::DiskError::Invalid(i) => EngineError::Invalid(i),
            other => EngineError::Disk(other),
        }
    }
}

impl From<crate::clock::ClockError> for EngineError {
    fn from(e: crate::clock::ClockError) -> Self {
        match e {
            crate::clock::ClockError::Invalid(i) => EngineError::Invalid(i),
            other => EngineError::Clock(other),
        }
    }
}

impl From<crate::process::ProcessError> for EngineError {
    fn from(e: crate::process::ProcessError) -> Self {
        match e {
            crate::process::ProcessError::Invalid(i) => EngineError::Invalid(i),
            other => EngineError::Process(other),
        }
    }
}

impl EngineError {
    /// Errors the caller caused (bad input, missing netns/interface, privileges).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            EngineError::Invalid(_)
                | EngineError::Privileges(_)
                | EngineError::NotFound(_)
                | EngineError::Netns(NetnsError::Missing { .. } | NetnsError::NotNetns { .. })
                | EngineError::Datapath(DatapathError::Invalid(_))
                | EngineError::Datapath(DatapathError::Full(_))
                | EngineError::Datapath(DatapathError::Shape(
                    ShapeError::Foreign { .. }
                        | ShapeError::Busy { .. }
                        | ShapeError::Mixed { .. }
                        | ShapeError::Unrestorable { .. }
                        | ShapeError::Changed { .. }
                        | ShapeError::Missing { .. }
                ))
        )
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub journal_dir: PathBuf,
    pub max_duration: Duration,
    pub attach: AttachMode,
    /// Control-plane endpoints no fault may match.
    pub excluded: Vec<SocketAddr>,
    /// The node's engine registry (one for every engine on the node, whatever its journal).
    pub registry_dir: PathBuf,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            journal_dir: PathBuf::from("/run/chaos/journal"),
            max_duration: DEFAULT_MAX_DURATION,
            attach: AttachMode::detect(),
            excluded: Vec::new(),
            registry_dir: PathBuf::from(crate::registry::DEFAULT_DIR),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Reverted,
    Expired,
}

#[derive(Debug, Clone)]
pub struct FaultStatus {
    pub id: String,
    pub spec: FaultSpec,
    pub deadline: SystemTime,
    pub counters: Counters,
    pub backend: &'static str,
    /// Set once the fault is no longer active.
    pub ended: Option<EndReason>,
    /// For an ended fault: how long after the revert began packets stopped being affected
    /// (the disarm), which comes before the classifiers are detached.
    pub disarmed_after: Option<Duration>,
}

struct Desired {
    spec: FaultSpec,
    deadline: SystemTime,
    slot: u16,
}

struct Active {
    spec: FaultSpec,
    deadline: SystemTime,
    /// The target namespace; for kinds that are not network faults, the engine's own (nothing
    /// is attached there).
    netns: Netns,
    installed: Installed,
}

/// What a fault has put in place. Every kind answers the same four questions (counters,
/// disarm, uninstall, what the journal must name), so reconcile has one path for all.
enum Installed {
    /// Classifiers (and our root qdisc for shaping) in the target namespace.
    Net(crate::table::Installed),
    /// CPU stress workers in the target's cgroups.
    Cpu(CpuStress),
    /// A container-kill that has happened: nothing stays in place; its counters say how many
    /// processes it found and signalled.
    Killed(Counters),
    /// A process-pause: the target frozen, and its thaw guard.
    Paused(crate::process::Paused),
    /// A process-kill: its counters, and the loop of an interval's rounds.
    Killing(crate::process::Killer),
    /// A disk-fill's file, its keeper and its guard.
    Filled(crate::disk::Fill),
    /// Memory stress workers in the target's cgroups.
    Memory(crate::memory::MemoryStress),
    /// The clock-skew programs, the patched vDSOs and the thread that follows execs.
    Skewed(Box<crate::clock::ClockSkew>),
}

impl Installed {
    fn counters(&self) -> Result<Counters, EngineError> {
        match self {
            Installed::Net(i) => Ok(i.counters()?),
            Installed::Cpu(c) => Ok(Counters {
                cpu_time_us: c.cpu_time().as_micros() as u64,
                ..Counters::default()
            }),
            Installed::Killed(c) => Ok(*c),
            Installed::Paused(p) => Ok(p.counters()),
            Installed::Killing(k) => Ok(k.counters()),
            Installed::Filled(f) => Ok(f.counters()),
            Installed::Memory(m) => Ok(m.counters()),
            Installed::Skewed(c) => Ok(c.counters()),
        }
    }

    /// Stops the effect at once: classifiers pass everything, workers are killed.
    fn disarm(&mut self) -> Result<(), EngineError> {
        match self {
            Installed::Net(i) => Ok(i.disarm()?),
            Installed::Cpu(c) => Ok(c.kill()?),
            Installed::Killed(_) => Ok(()),
            Installed::Paused(p) => Ok(p.thaw()?),
            Installed::Killing(k) => {
                k.stop();
                Ok(())
            }
            Installed::Filled(f) => {
                f.remove();
                Ok(())
            }
            Installed::Memory(m) => Ok(m.kill()?),
            Installed::Skewed(c) => Ok(c.revert()?),
        }
    }

    /// Removes everything (detach and remove qdiscs inside `netns`; reap workers).
    fn uninstall(self, netns: &Netns) -> Result<(), EngineError> {
        match self {
            Installed::Net(i) => Ok(netns.run(move || i.uninstall())??),
            Installed::Cpu(c) => Ok(c.stop()?),
            Installed::Memory(m) => Ok(m.into_workers().stop()?),
            Installed::Killed(_)
            | Installed::Paused(_)
            | Installed::Killing(_)
            | Installed::Skewed(_)
            | Installed::Filled(_) => Ok(()),
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Installed::Net(i) => i.records().first().map_or("ebpf", |r| r.mode.name()),
            Installed::Cpu(c) => c.method().name(),
            Installed::Killed(_) | Installed::Killing(_) => "signal",
            Installed::Paused(p) => p.method(),
            Installed::Filled(_) => "fallocate",
            Installed::Memory(m) => m.workers().method().name(),
            Installed::Skewed(_) => "vdso+bpf",
        }
    }

    fn records(&self) -> Vec<AttachmentRecord> {
        match self {
            Installed::Net(i) => i.records(),
            Installed::Cpu(_)
            | Installed::Killed(_)
            | Installed::Paused(_)
            | Installed::Killing(_)
            | Installed::Filled(_)
            | Installed::Skewed(_)
            | Installed::Memory(_) => Vec::new(),
        }
    }

    /// The devices where a shaping fault has its class.
    fn shaped(&self) -> Vec<ShapingSite> {
        match self {
            Installed::Net(i) => i.shaped.clone(),
            Installed::Cpu(_)
            | Installed::Killed(_)
            | Installed::Paused(_)
            | Installed::Killing(_)
            | Installed::Filled(_)
            | Installed::Skewed(_)
            | Installed::Memory(_) => Vec::new(),
        }
    }

    /// What a host fault must undo, for a later engine if neither we nor its guard could.
    fn undo(&self) -> Vec<crate::undo::Undo> {
        match self {
            Installed::Paused(p) => p.undo(),
            Installed::Filled(f) => f.undo(),
            Installed::Skewed(c) => c.undo(),
            Installed::Net(_)
            | Installed::Cpu(_)
            | Installed::Memory(_)
            | Installed::Killed(_)
            | Installed::Killing(_) => Vec::new(),
        }
    }

    fn workers(&self) -> Vec<Owner> {
        match self {
            Installed::Net(_)
            | Installed::Killed(_)
            | Installed::Killing(_)
            | Installed::Skewed(_) => Vec::new(),
            Installed::Cpu(c) => c.owners(),
            // The thaw guard: a later engine kills one that outlived us (after it thaws).
            Installed::Paused(p) => vec![p.guard()],
            Installed::Filled(f) => vec![f.guard()],
            Installed::Memory(m) => m.workers().owners(),
        }
    }
}

#[derive(Default)]
struct State {
    desired: BTreeMap<String, Desired>,
    active: BTreeMap<String, Active>,
    /// Faults that ended recently, with final counters, for callers that ask after the fact.
    ended: VecDeque<FaultStatus>,
    /// Reverts that failed part-way: what may still be in the kernel stays in the journal, so
    /// the next start (of this or another engine) reclaims it.
    leftovers: Vec<Entry>,
    /// Devices carrying our root qdisc, with the faults that have a class there. A root goes
    /// when its last fault does.
    sites: BTreeMap<(NetnsId, String), Site>,
}

struct Site {
    entry: SiteEntry,
    /// "htb" or "fq": faults needing the other kind cannot share this root.
    root_kind: &'static str,
    users: BTreeSet<String>,
}

pub struct Engine {
    config: EngineConfig,
    journal: Journal,
    state: Mutex<State>,
    /// A loaded and verified datapath object for the next interface's first fault.
    spare: Mutex<Spare>,
    /// Keeps every network fault's rules alive in the kernel while this engine runs.
    heartbeats: Arc<Heartbeats>,
    /// This engine's slot in the node's registry, held for its life.
    registration: Registration,
}

/// The spare datapath object: at most one exists or is being prepared, so a burst of applies
/// never loads (and holds the memory of) several objects at once.
enum Spare {
    Empty,
    Preparing,
    Ready(datapath::Prepared),
}

const ENDED_HISTORY: usize = 1024;
/// How often deadlines are checked: the most a fault can outlive its deadline.
pub const DEADLINE_TICK: Duration = Duration::from_millis(50);
/// How often a chaos-agent sweeps the node for dead engines' leftovers.
pub const SWEEP_EVERY: Duration = Duration::from_secs(3);

/// Where a sweep looks for our objects by their marks.
#[derive(Debug, Clone, Copy)]
pub enum SweepScope<'a> {
    /// Every network namespace on the node.
    Node,
    /// The namespace a fault is about to use.
    Netns(&'a NetnsRef),
}

/// What reclaiming an earlier run's leftovers found.
#[derive(Debug, Default, Clone)]
pub struct Reclaimed {
    pub journals: usize,
    pub faults: usize,
    pub clsact_filters: usize,
    pub qdiscs: usize,
    /// CPU stress workers that outlived their engine (its death signal should have ended them).
    pub workers: usize,
    /// IFB devices deleted.
    pub devices: usize,
    /// What dead engines' host faults left (frozen targets thawed, fill files removed).
    pub undone: usize,
    /// Namespaces whose kernel objects were swept by their marks.
    pub namespaces: usize,
    /// One line per kernel object removed by its marks (no journal named it).
    pub removed: Vec<String>,
    /// What journals named that is not ours by the kernel's account (a garbled or hostile
    /// journal): left alone, and the journal's claim dropped with it.
    pub refused: Vec<String>,
    pub errors: Vec<String>,
}

impl Engine {
    /// Opens the journal and removes what crashed earlier engines left in the kernel.
    pub fn start(config: EngineConfig) -> Result<(Arc<Self>, Reclaimed), EngineError> {
        let journal =
            Journal::open(&config.journal_dir).map_err(|source| EngineError::Journal {
                path: config.journal_dir.clone(),
                source,
            })?;
        let registry_error = |source| EngineError::Registry {
            path: config.registry_dir.clone(),
            source,
        };
        let record = Record {
            owner: Owner::current().map_err(registry_error)?,
            journal: journal.path().to_path_buf(),
        };
        let registration = Registration::claim(&config.registry_dir, &record).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                EngineError::Privileges(format!(
                    "cannot register in {} ({e}): run as root",
                    config.registry_dir.display()
                ))
            } else {
                registry_error(e)
            }
        })?;
        let engine = Arc::new(Engine {
            config,
            journal,
            state: Mutex::new(State::default()),
            spare: Mutex::new(Spare::Empty),
            heartbeats: Heartbeats::start(),
            registration,
        });
        let reclaimed = {
            let _sites = engine.lock_sites(true);
            engine.reclaim_journals(&engine.claims())?
        };
        Ok((engine, reclaimed))
    }

    /// How this engine attaches: the configured mode at its own clsact priorities.
    fn attach(&self) -> Attach {
        Attach {
            mode: self.config.attach,
            priority: datapath::clsact_priority(self.registration.slot()),
        }
    }

    /// This engine's slot in the node's registry.
    pub fn registry_slot(&self) -> u16 {
        self.registration.slot()
    }

    fn lock_sites(&self, exclusive: bool) -> Option<crate::registry::SitesLock> {
        crate::registry::lock_sites(&self.config.registry_dir, exclusive)
            .map_err(|e| tracing::warn!("sites lock: {e}"))
            .ok()
    }

    /// Removes what dead engines left: their journals' leftovers (in this engine's journal
    /// directory and every directory the registry names), then, by their marks, our filters,
    /// roots and IFBs that no live engine owns in `scope`'s namespaces.
    pub fn sweep(&self, scope: SweepScope<'_>) -> Result<Reclaimed, EngineError> {
        let _sites = self.lock_sites(true);
        // Reclaiming dead engines' journals changes no live engine's claims: one read serves both.
        let claims = self.claims();
        let mut report = self.reclaim_journals(&claims)?;
        let namespaces = match scope {
            SweepScope::Node => crate::sweep::namespaces(),
            SweepScope::Netns(target) => vec![Netns::open(target)?],
        };
        for netns in &namespaces {
            let r = crate::sweep::sweep_netns(netns, &claims);
            report.clsact_filters += r.filters;
            report.qdiscs += r.roots;
            report.devices += r.ifbs;
            report.removed.extend(r.lines);
            report.errors.extend(r.errors);
        }
        report.namespaces = namespaces.len();
        Ok(report)
    }

    /// The registry and what live engines' journals name (this one's included: a site is
    /// journaled before it exists, under the sites lock the caller holds), read once.
    fn claims(&self) -> Claims {
        let mut claims = Claims {
            complete: true,
            ..Claims::default()
        };
        let Ok(slots) = crate::registry::slots(&self.config.registry_dir) else {
            claims.complete = false;
            return claims;
        };
        claims.journal_dirs = slots
            .iter()
            .filter_map(|s| s.record.as_ref()?.journal.parent().map(Path::to_path_buf))
            .collect();
        claims.live = slots.iter().filter(|s| s.live).map(|s| s.slot).collect();
        for slot in slots.into_iter().filter(|s| s.live) {
            let Some(record) = slot.record else {
                claims.complete = false;
                continue;
            };
            match std::fs::read(&record.journal) {
                // An engine holding nothing has no journal file.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => claims.complete = false,
                Ok(data) => match serde_json::from_slice::<crate::journal::JournalFile>(&data) {
                    Ok(file) => {
                        claims
                            .sites
                            .extend(file.sites.into_iter().map(|s| (s.netns_id, s.site.device)));
                        for fault in file.faults {
                            claims.filters.extend(
                                fault
                                    .attachments
                                    .into_iter()
                                    .filter(|a| a.mode == AttachMode::Clsact)
                                    .map(|a| (fault.netns_id, a.interface, a.hook, a.priority)),
                            );
                        }
                    }
                    Err(_) => claims.complete = false,
                },
            }
        }
        claims
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves state that still describes the kernel; go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `spec`, applies it and returns once it is live in the kernel.
    pub fn apply(self: &Arc<Self>, spec: FaultSpec) -> Result<FaultStatus, EngineError> {
        spec.validate(self.config.max_duration)?;
        let mut spec = crate::pod::resolve(spec, Path::new("/proc"))?;
        if spec.kind.is_network() && spec.target.interface.is_empty() {
            let ns = Netns::open(&spec.target.netns)?;
            spec.target.interface = ns.run(crate::netns::default_route_interface)??;
            tracing::info!(interface = %spec.target.interface, "no --interface: the default route's");
        }
        match &spec.kind {
            // A cgroup that exists nowhere is bad input, refused before anything starts.
            FaultKind::Cpu { cgroup, .. } => {
                cgroup::resolve(cgroup)?;
            }
            _ => check_privileges(&spec.target.netns)?,
        }
        // Fail on a missing netns before touching anything.
        Netns::open(&spec.target.netns)?;
        let network = spec.kind.is_network();
        let id = new_id();
        let mut st = self.lock();
        let slot = (0..u16::MAX)
            .find(|s| !st.desired.values().any(|d| d.slot == *s))
            .unwrap_or(0);
        let deadline = SystemTime::now() + spec.duration;
        st.desired.insert(
            id.clone(),
            Desired {
                spec,
                deadline,
                slot,
            },
        );
        let result = self.reconcile(&mut st).remove(&id);
        // Only network faults use the datapath object; a CPU fault loads nothing into the kernel.
        if network && holds_network_faults(&st) {
            self.refill_spare();
        }
        if let Some(Err(e)) = result {
            return Err(e);
        }
        status_of(
            &id,
            st.active
                .get(&id)
                .ok_or_else(|| EngineError::NotFound(id.clone()))?,
            None,
        )
    }

    /// Reverts one fault; returns it with its final counters.
    pub fn revert(&self, id: &str) -> Result<FaultStatus, EngineError> {
        let result = self.revert_one(id);
        return_freed_heap();
        result
    }

    /// Reverts everything (shutdown, `revert --all`).
    pub fn revert_all(&self) -> Vec<Result<FaultStatus, EngineError>> {
        let ids: Vec<String> = self.lock().desired.keys().cloned().collect();
        let results = ids.iter().map(|id| self.revert_one(id)).collect();
        return_freed_heap();
        results
    }

    /// A revert without the heap trim, which callers do once, outside the state lock.
    fn revert_one(&self, id: &str) -> Result<FaultStatus, EngineError> {
        let mut st = self.lock();
        if st.desired.remove(id).is_none() {
            return Err(EngineError::NotFound(id.to_string()));
        }
        if let Some(Err(e)) = self.reconcile(&mut st).remove(id) {
            return Err(e);
        }
        st.ended
            .iter()
            .rev()
            .find(|f| f.id == id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id.into()))
    }

    pub fn list(&self) -> Vec<FaultStatus> {
        let st = self.lock();
        st.active
            .iter()
            .filter_map(|(id, a)| status_of(id, a, None).ok())
            .collect()
    }

    /// The fault if active, or how it ended if it ended recently.
    pub fn status(&self, id: &str) -> Option<FaultStatus> {
        let st = self.lock();
        if let Some(a) = st.active.get(id) {
            return status_of(id, a, None).ok();
        }
        st.ended.iter().rev().find(|f| f.id == id).cloned()
    }

    /// Ends faults whose deadline passed. Returns them.
    pub fn expire(&self) -> Vec<FaultStatus> {
        let mut st = self.lock();
        let now = SystemTime::now();
        let expired: Vec<String> = st
            .desired
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        for id in &expired {
            st.desired.remove(id);
        }
        let results = self.reconcile_with(&mut st, EndReason::Expired);
        expired
            .iter()
            .filter_map(|id| match results.get(id) {
                Some(Err(e)) => {
                    tracing::error!(%id, "expiry revert failed: {e}");
                    None
                }
                _ => st.ended.iter().rev().find(|f| &f.id == id).cloned(),
            })
            .collect()
    }

    /// Enforces deadlines on a thread of its own until the engine is dropped (invariant 1: no
    /// controller is needed to end a fault).
    pub fn spawn_deadline_enforcer(self: &Arc<Self>) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("chaos-deadlines".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    for f in engine.expire() {
                        tracing::info!(id = %f.id, "fault expired and was reverted");
                    }
                    drop(engine);
                    std::thread::sleep(DEADLINE_TICK);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the deadline thread: {e}");
        }
    }

    /// Sweeps the node now and then every `every` while this engine lives: dead engines'
    /// leftovers go within `every` of their death (plus the sweep's own time).
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) {
        let weak: Weak<Engine> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("chaos-sweep".into())
            .spawn(move || {
                let mut reported = BTreeSet::new();
                while let Some(engine) = weak.upgrade() {
                    let started = std::time::Instant::now();
                    match engine.sweep(SweepScope::Node) {
                        Ok(r) => {
                            for line in &r.removed {
                                tracing::info!("sweep removed {line}");
                            }
                            if r.faults > 0 {
                                tracing::info!(
                                    journals = r.journals,
                                    faults = r.faults,
                                    "sweep reclaimed dead engines' journals"
                                );
                            }
                            // The same failure every few seconds is logged once.
                            for e in r.errors.iter().chain(&r.refused) {
                                if reported.insert(e.clone()) {
                                    tracing::warn!("sweep: {e}");
                                }
                            }
                            tracing::debug!(
                                namespaces = r.namespaces,
                                took = ?started.elapsed(),
                                "sweep"
                            );
                        }
                        Err(e) => tracing::warn!("sweep: {e}"),
                    }
                    drop(engine);
                    std::thread::sleep(every);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the sweep thread: {e}");
        }
    }

    fn reconcile(&self, st: &mut State) -> BTreeMap<String, Result<(), EngineError>> {
        self.reconcile_with(st, EndReason::Reverted)
    }

    /// Makes `active` match `desired`. `default_end` labels removals nobody labelled.
    fn reconcile_with(
        &self,
        st: &mut State,
        default_end: EndReason,
    ) -> BTreeMap<String, Result<(), EngineError>> {
        let mut results = BTreeMap::new();
        // Shared with other engines' changes, exclusive of any sweep: a sweep never reads
        // claims between a journal's change and the kernel's.
        let _sites = self.lock_sites(false);
        self.remove_undesired(st, default_end, &mut results);

        let to_add: Vec<String> = st
            .desired
            .keys()
            .filter(|id| !st.active.contains_key(*id))
            .cloned()
            .collect();
        let mut undo = BTreeMap::new();
        for id in to_add {
            let res = self.install(st, &id);
            if res.is_err() {
                st.desired.remove(&id);
            }
            results.insert(id, res);
        }
        // An install that failed after its change was in the kernel (the journal write after
        // it failed, say) is undone now, before its error is returned: a fault the caller was
        // told failed must not run on, unlisted, to its deadline.
        if st.active.keys().any(|id| !st.desired.contains_key(id)) {
            self.remove_undesired(st, EndReason::Reverted, &mut undo);
            for (id, res) in undo {
                if let Err(e) = res {
                    tracing::error!(%id, "undoing a failed install: {e}");
                }
            }
        }
        // Only what live faults need stays: with no network fault left, no spare object either
        // (its programs and maps in the kernel, its copy of the object here).
        if !holds_network_faults(st) {
            *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Spare::Empty;
        }

        results
    }

    /// Removes every active fault nobody desires any more, recording each one's result.
    fn remove_undesired(
        &self,
        st: &mut State,
        default_end: EndReason,
        results: &mut BTreeMap<String, Result<(), EngineError>>,
    ) {
        let to_remove: Vec<String> = st
            .active
            .keys()
            .filter(|id| !st.desired.contains_key(*id))
            .cloned()
            .collect();
        for id in to_remove {
            let Some(mut active) = st.active.remove(&id) else {
                continue;
            };
            let started = std::time::Instant::now();
            // Traffic first: stop affecting packets now, then take the classifiers away.
            if let Err(e) = active.installed.disarm() {
                tracing::error!(%id, "disarm: {e}");
            }
            self.heartbeats.remove(&id);
            let disarmed = started.elapsed();
            let counters = active.installed.counters().unwrap_or_default();
            let spec = active.spec.clone();
            let deadline = active.deadline;
            let backend = match active.installed {
                Installed::Net(_) => self.config.attach.name(),
                Installed::Cpu(_)
                | Installed::Killed(_)
                | Installed::Paused(_)
                | Installed::Killing(_)
                | Installed::Filled(_)
                | Installed::Skewed(_)
                | Installed::Memory(_) => active.installed.backend(),
            };
            let journaled = entry(
                &id,
                &active.spec,
                active.deadline,
                &active.netns,
                Some(&active.installed),
            );
            let sites = active.installed.shaped();
            let Active {
                netns, installed, ..
            } = active;
            let res = installed.uninstall(&netns);
            let res = res.and_then(|()| self.release_sites(st, &id, &netns, &sites));
            let detached = started.elapsed();
            let ended = FaultStatus {
                id: id.clone(),
                spec,
                deadline,
                counters,
                backend,
                ended: Some(default_end),
                disarmed_after: Some(disarmed),
            };
            st.ended.push_back(ended);
            if st.ended.len() > ENDED_HISTORY {
                st.ended.pop_front();
            }
            // The fault has ended either way; if removal failed part-way, the journal keeps
            // its entry so the leftovers are reclaimed at the next start.
            if let Err(e) = &res {
                tracing::error!(%id, "revert: {e}; kept in the journal for reclaim");
                st.leftovers.push(journaled);
            }
            if let Err(e) = self.write_journal(st, None) {
                tracing::error!("journal: {e}");
            }
            tracing::debug!(%id, ?disarmed, ?detached, total = ?started.elapsed(), "revert timings");
            results.insert(id, res);
        }
    }

    fn install(&self, st: &mut State, id: &str) -> Result<(), EngineError> {
        let d = st
            .desired
            .get(id)
            .ok_or_else(|| EngineError::NotFound(id.into()))?;
        let (spec, deadline, slot) = (d.spec.clone(), d.deadline, d.slot);
        let started = std::time::Instant::now();
        let netns = Netns::open(&spec.target.netns)?;
        match spec.kind {
            FaultKind::ContainerKill { .. } => {
                return self.install_kill(st, id, spec, deadline, netns);
            }
            FaultKind::Cpu { .. } => return self.install_cpu(st, id, spec, deadline, netns),
            FaultKind::ProcessPause { .. }
            | FaultKind::ProcessKill { .. }
            | FaultKind::DiskFill { .. }
            | FaultKind::ClockSkew { .. }
            | FaultKind::Memory { .. } => {
                return self.install_host(st, id, spec, deadline, netns);
            }
            FaultKind::Loss { .. }
            | FaultKind::Corrupt { .. }
            | FaultKind::Partition
            | FaultKind::Latency { .. }
            | FaultKind::Bandwidth { .. }
            | FaultKind::Reorder { .. }
            | FaultKind::Duplicate { .. }
            | FaultKind::Dns { .. } => {}
        }
        let sites = self.plan_sites(st, id, &spec, &netns)?;
        // The interface's table if this engine has one there already: then the fault is a row
        // written into it, with nothing to load or attach.
        let table = st.active.values().find_map(|a| match &a.installed {
            Installed::Net(i)
                if a.netns.id == netns.id && a.spec.target.interface == spec.target.interface =>
            {
                Some(i.table.clone())
            }
            _ => None,
        });
        // Intent first: if we crash mid-install, the journal already names what may be there.
        // A row in a table another fault holds adds nothing a reclaim could miss (the table's
        // attachments are journaled with that fault, and a row outlives neither its deadline
        // nor its owner's heartbeat), so only a new attachment or shaping site is written ahead.
        if table.is_none() || !sites.is_empty() {
            let planned = planned_attachments(&spec, self.attach());
            self.write_journal(
                st,
                Some(Entry {
                    attachments: planned,
                    ..entry(id, &spec, deadline, &netns, None)
                }),
            )?;
        }
        let journaled = started.elapsed();
        let prepared = match table {
            Some(_) => None,
            None => Some(self.take_prepared()?),
        };
        let prepared_at = started.elapsed();
        let (attach, excluded) = (self.attach(), self.config.excluded.clone());
        let spec_in = spec.clone();
        let sites_in = sites.clone();
        let deadline_ns = heartbeat::deadline_ns(deadline);
        let installed = netns
            .run(move || {
                let installed = crate::table::install(
                    table,
                    prepared,
                    &spec_in,
                    attach,
                    slot,
                    &excluded,
                    &sites_in,
                    deadline_ns,
                )?;
                // A fault nobody beats for goes inert within the bound: never leave one so.
                match installed.heartbeat() {
                    Ok(beat) => Ok((installed, beat)),
                    Err(e) => {
                        let _ = installed.uninstall();
                        Err(e)
                    }
                }
            })
            .map_err(EngineError::from)
            .and_then(|r| r.map_err(EngineError::from));
        let installed = match installed {
            Ok((installed, beat)) => {
                self.heartbeats.add(id, beat);
                installed
            }
            Err(e) => {
                // install took away what it put in place; forget the sites it would have used.
                self.forget_sites(st, id, &netns, &sites);
                self.rewrite_journal_after_failure(st);
                return Err(e);
            }
        };
        let attached = started.elapsed();
        st.active.insert(
            id.to_string(),
            Active {
                spec,
                deadline,
                netns,
                installed: Installed::Net(installed),
            },
        );
        let result = self.write_journal(st, None);
        tracing::debug!(
            %id,
            journal_intent = ?journaled,
            prepared = ?(prepared_at - journaled),
            attach = ?(attached - prepared_at),
            journal_done = ?(started.elapsed() - attached),
            "install timings"
        );
        result
    }

    /// Where a shaping fault's classes go and what to do about each root: share our root if
    /// this engine already has one there, else create it, or with `--force` replace another
    /// tool's tree (snapshotted here, so the journal holds it before anything is touched).
    /// Records the fault as a user of each site.
    fn plan_sites(
        &self,
        st: &mut State,
        id: &str,
        spec: &FaultSpec,
        netns: &Netns,
    ) -> Result<Vec<(ShapingSite, RootPlan)>, EngineError> {
        let Some(shape) = datapath::shape_for(&spec.kind)? else {
            return Ok(Vec::new());
        };
        let want = crate::qdisc::root_kind(&shape);
        let mut plans = Vec::new();
        for hook in Hook::for_direction(spec.target.direction) {
            let site = ShapingSite::for_hook(&spec.target.interface, hook);
            let key = (netns.id, site.device.clone());
            let plan = match st.sites.get(&key) {
                Some(s) if s.root_kind == want => RootPlan::Share,
                Some(s) => {
                    let name = |k| {
                        if k == "fq" {
                            "edt (fq)"
                        } else {
                            "netem/bandwidth (htb)"
                        }
                    };
                    return Err(DatapathError::Shape(ShapeError::Mixed {
                        interface: spec.target.interface.clone(),
                        have: name(s.root_kind),
                        want: name(want),
                    })
                    .into());
                }
                None if spec.target.force && site.ifb_for.is_none() => {
                    let device = site.device.clone();
                    match netns.run(move || datapath::snapshot_foreign(&device))?? {
                        Some(snapshot) => RootPlan::Replace(snapshot),
                        None => RootPlan::Create,
                    }
                }
                None => RootPlan::Create,
            };
            plans.push((site, plan));
        }
        for (site, plan) in &plans {
            let key = (netns.id, site.device.clone());
            st.sites
                .entry(key)
                .or_insert_with(|| Site {
                    entry: SiteEntry {
                        site: site.clone(),
                        netns_path: netns.path.clone(),
                        netns_id: netns.id,
                        replaced: match plan {
                            RootPlan::Replace(s) => Some(s.clone()),
                            _ => None,
                        },
                    },
                    root_kind: want,
                    users: BTreeSet::new(),
                })
                .users
                .insert(id.to_string());
        }
        Ok(plans)
    }

    /// Undoes `plan_sites` for an install that failed (and cleaned the kernel up itself).
    fn forget_sites(
        &self,
        st: &mut State,
        id: &str,
        netns: &Netns,
        plans: &[(ShapingSite, RootPlan)],
    ) {
        for (site, _) in plans {
            let key = (netns.id, site.device.clone());
            if let Some(s) = st.sites.get_mut(&key) {
                s.users.remove(id);
                if s.users.is_empty() {
                    st.sites.remove(&key);
                }
            }
        }
    }

    /// The fault `id` no longer uses `sites`: each site whose last user it was loses our root
    /// (and gets back what `--force` replaced). A site that cannot be removed stays in the
    /// journal, so the next start reclaims it.
    fn release_sites(
        &self,
        st: &mut State,
        id: &str,
        netns: &Netns,
        sites: &[ShapingSite],
    ) -> Result<(), EngineError> {
        let mut result = Ok(());
        for site in sites {
            let key = (netns.id, site.device.clone());
            let Some(s) = st.sites.get_mut(&key) else {
                continue;
            };
            s.users.remove(id);
            if !s.users.is_empty() {
                continue;
            }
            let entry = s.entry.clone();
            let removed = netns
                .run(move || datapath::remove_site(&entry.site, entry.replaced.as_ref()))
                .map_err(EngineError::from)
                .and_then(|r| r.map_err(EngineError::from));
            match removed {
                Ok(()) => {
                    st.sites.remove(&key);
                }
                Err(e) => {
                    tracing::error!(device = %site.device, "remove root qdisc: {e}; kept in the journal for reclaim");
                    result = result.and(Err(e));
                }
            }
        }
        result
    }

    /// Starts a CPU fault's workers. The journal names the fault first and its workers (pid and
    /// start time) once they exist; a crash in between leaves workers that the death signal
    /// ends with the engine.
    fn install_cpu(
        &self,
        st: &mut State,
        id: &str,
        spec: FaultSpec,
        deadline: SystemTime,
        netns: Netns,
    ) -> Result<(), EngineError> {
        let FaultKind::Cpu {
            workers,
            load_percent,
            ref cgroup,
        } = spec.kind
        else {
            return Err(crate::spec::invalid("kind", "is not cpu").into());
        };
        let placement = cgroup::resolve(cgroup)?;
        self.write_journal(st, Some(entry(id, &spec, deadline, &netns, None)))?;
        let stress = match CpuStress::start(&placement, workers, load_percent) {
            Ok(s) => s,
            Err(e) => {
                self.rewrite_journal_after_failure(st);
                return Err(e.into());
            }
        };
        tracing::debug!(%id, workers, load_percent, placement = ?placement, "cpu workers started");
        st.active.insert(
            id.to_string(),
            Active {
                spec,
                deadline,
                netns,
                installed: Installed::Cpu(stress),
            },
        );
        self.write_journal(st, None)
    }

    /// Signals the container's processes (found through the pod's cgroup) once. The sandbox
    /// process is never among them, so the pod and its network namespace stay.
    fn install_kill(
        &self,
        st: &mut State,
        id: &str,
        spec: FaultSpec,
        deadline: SystemTime,
        netns: Netns,
    ) -> Result<(), EngineError> {
        let FaultKind::ContainerKill {
            ref pod,
            ref container,
            signal,
        } = spec.kind
        else {
            return Err(crate::spec::invalid("kind", "is not container-kill").into());
        };
        let found = crate::pod::scan_uid(Path::new("/proc"), pod)?;
        let targets: Vec<u32> = found
            .containers()
            .into_iter()
            .filter(|(cid, _)| container.is_empty() || cid.starts_with(container.as_str()))
            .flat_map(|(_, pids)| pids)
            .collect();
        if targets.is_empty() {
            return Err(crate::spec::invalid(
                "--container-id",
                format!("pod {pod} has no running container {container}"),
            )
            .into());
        }
        let mut signalled = 0;
        for pid in &targets {
            // SAFETY: kill(2) has no memory effects; a pid that just exited fails with ESRCH.
            if unsafe { libc::kill(*pid as i32, signal.number()) } == 0 {
                signalled += 1;
            }
        }
        tracing::info!(%id, %pod, container = %container, signal = signal.name(), signalled, "container-kill");
        st.active.insert(
            id.to_string(),
            Active {
                spec,
                deadline,
                netns,
                installed: Installed::Killed(Counters {
                    seen: targets.len() as u64,
                    matched: targets.len() as u64,
                    affected: signalled,
                    ..Counters::default()
                }),
            },
        );
        Ok(())
    }

    /// Freezes or signals the target processes, or fills a disk. A fill is journaled before it
    /// acts (its guard undoes it if we die before the second write) and again with what it must
    /// undo; a pause only after, with what it must undo.
    fn install_host(
        &self,
        st: &mut State,
        id: &str,
        spec: FaultSpec,
        deadline: SystemTime,
        netns: Netns,
    ) -> Result<(), EngineError> {
        let installed = match &spec.kind {
            // Journaled once, after the freeze, with what to undo: an entry written before
            // could name nothing to thaw, and its fsync (10-30 ms here) would stand between
            // the apply and the freeze. Until the write, the guard (forked before the first
            // SIGSTOP or freezer write) is what thaws if this engine dies.
            FaultKind::ProcessPause { target, name } => {
                Installed::Paused(crate::process::Paused::start(target, name, deadline)?)
            }
            FaultKind::ProcessKill {
                target,
                name,
                signal,
                interval_ms,
            } => Installed::Killing(crate::process::Killer::start(
                target,
                name,
                signal.number(),
                Duration::from_millis(*interval_ms),
            )?),
            FaultKind::DiskFill {
                path,
                level,
                mount,
                force,
            } => {
                self.write_journal(st, Some(entry(id, &spec, deadline, &netns, None)))?;
                let protected = [
                    self.config.journal_dir.as_path(),
                    self.config.registry_dir.as_path(),
                ];
                match crate::disk::Fill::start(
                    id, path, *level, mount, *force, &protected, deadline,
                ) {
                    Ok(f) => Installed::Filled(f),
                    Err(e) => {
                        self.rewrite_journal_after_failure(st);
                        return Err(e.into());
                    }
                }
            }
            FaultKind::Memory {
                size,
                workers,
                cgroup,
                ramp_ms,
                oom,
            } => {
                // The workers are journaled (pid, start time) once they exist; a crash before
                // that leaves workers their death signal ends.
                self.write_journal(st, Some(entry(id, &spec, deadline, &netns, None)))?;
                match crate::memory::MemoryStress::start(
                    *size,
                    *workers,
                    cgroup,
                    Duration::from_millis(*ramp_ms),
                    *oom,
                ) {
                    Ok(m) => Installed::Memory(m),
                    Err(e) => {
                        self.rewrite_journal_after_failure(st);
                        return Err(e.into());
                    }
                }
            }
            FaultKind::ClockSkew {
                target,
                name,
                offset_ns,
                drift_ppm,
                clocks,
            } => {
                let (skew, beat) = crate::clock::ClockSkew::start(
                    id, target, name, *offset_ns, *drift_ppm, clocks, deadline,
                )?;
                self.heartbeats.add(id, beat);
                Installed::Skewed(Box::new(skew))
            }
            _ => return Err(crate::spec::invalid("kind", "is not a host fault").into()),
        };
        tracing::info!(%id, fault = %spec, counters = ?installed.counters().ok(), "process fault applied");
        st.active.insert(
            id.to_string(),
            Active {
                spec,
                deadline,
                netns,
                installed,
            },
        );
        self.write_journal(st, None)
    }

    /// The spare prepared object if there is one, else a new one. Once the engine has applied a
    /// fault it keeps a spare: loading and verifying is ~2/3 of an apply. Not at start, so an
    /// idle agent holds nothing in the kernel.
    fn take_prepared(&self) -> Result<datapath::Prepared, EngineError> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*spare, Spare::Ready(_))
            && let Spare::Ready(p) = std::mem::replace(&mut *spare, Spare::Empty)
        {
            return Ok(p);
        }
        drop(spare);
        Ok(datapath::prepare()?)
    }

    /// Prepares the next spare off the caller's path, unless one is ready or on its way.
    pub fn refill_spare(self: &Arc<Self>) {
        {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if !matches!(*spare, Spare::Empty) {
                return;
            }
            *spare = Spare::Preparing;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("chaos-prepare".into())
            .spawn(move || {
                let Some(engine) = weak.upgrade() else { return };
                let next = match datapath::prepare() {
                    Ok(p) => Spare::Ready(p),
                    Err(e) => {
                        tracing::warn!("preparing a spare datapath object: {e}");
                        Spare::Empty
                    }
                };
                // Kept only if a network fault is still live (lock order: state, then spare).
                let st = engine.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut spare = engine.spare.lock().unwrap_or_else(|p| p.into_inner());
                *spare = if holds_network_faults(&st) {
                    next
                } else {
                    Spare::Empty
                };
                drop((spare, st));
                // Loading and verifying leave megabytes of freed parser and log buffers in
                // this thread's arena.
                return_freed_heap();
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the thread that prepares a spare datapath object: {e}");
            *self.spare.lock().unwrap_or_else(|p| p.into_inner()) = Spare::Empty;
        }
    }

    fn write_journal(&self, st: &State, pending: Option<Entry>) -> Result<(), EngineError> {
        let mut entries: Vec<Entry> = st
            .active
            .iter()
            .map(|(id, a)| entry(id, &a.spec, a.deadline, &a.netns, Some(&a.installed)))
            .collect();
        entries.extend(st.leftovers.iter().cloned());
        entries.extend(pending);
        let sites: Vec<SiteEntry> = st.sites.values().map(|s| s.entry.clone()).collect();
        self.journal
            .write(&entries, &sites)
            .map_err(|source| EngineError::Journal {
                path: self.journal.path().to_path_buf(),
                source,
            })
    }

    /// After an install failed and undid itself: the journal's intent entry goes if it can. If
    /// the write fails too, the stale entry names nothing of ours that is left, so the
    /// install's own error is the one to report.
    fn rewrite_journal_after_failure(&self, st: &State) {
        if let Err(e) = self.write_journal(st, None) {
            tracing::warn!("journal after a failed install: {e}");
        }
    }

    /// Removes what orphaned journals recorded. TCX links died with their process; clsact
    /// filters (and clsact qdiscs we created) are removed here.
    /// Reclaims dead engines' journals in this engine's directory and every one the registry
    /// names. What a live engine now owns is left to it: a clsact filter or a site a live
    /// engine's journal claims. The caller holds the sites lock.
    fn reclaim_journals(&self, claims: &Claims) -> Result<Reclaimed, EngineError> {
        let mut report = Reclaimed::default();
        let mut orphans = self
            .journal
            .orphans()
            .map_err(|source| EngineError::Journal {
                path: self.config.journal_dir.clone(),
                source,
            })?;
        for dir in claims
            .journal_dirs
            .iter()
            .filter(|d| **d != self.config.journal_dir)
        {
            orphans
                .extend(crate::journal::orphans_in(dir, self.journal.path()).unwrap_or_default());
        }
        for (path, file) in orphans {
            let mut keep = false;
            report.journals += 1;
            for fault in &file.faults {
                report.faults += 1;
                report.workers += crate::stress::kill_survivors(&fault.workers);
                report.undone += crate::undo::reclaim(&fault.undo);
                let clsact: Vec<AttachmentRecord> = fault
                    .attachments
                    .iter()
                    .filter(|a| {
                        a.mode == AttachMode::Clsact
                            && (datapath::slot_of_priority(a.priority).is_none()
                                || claims.filter_is_dead(
                                    fault.netns_id,
                                    &a.interface,
                                    a.hook,
                                    a.priority,
                                ))
                    })
                    .cloned()
                    .collect();
                if clsact.is_empty() {
                    continue;
                }
                let Some(netns) = find_netns(&fault.netns_path, fault.netns_id) else {
                    // The namespace is gone, and everything attached inside it.
                    continue;
                };
                let n = clsact.len();
                match netns.run(move || datapath::remove_clsact_attachments(&clsact)) {
                    Ok(Ok(())) => report.clsact_filters += n,
                    Ok(Err(e)) => report.errors.push(format!("{}: {e}", fault.id)),
                    Err(e) => report.errors.push(format!("{}: {e}", fault.id)),
                }
            }
            // After the filters: nothing is steered into a class while its root goes.
            for site in file.sites {
                if !claims.complete {
                    // It may be a live engine's now: left for a sweep that can tell.
                    keep = true;
                    continue;
                }
                if claims
                    .sites
                    .contains(&(site.netns_id, site.site.device.clone()))
                {
                    continue;
                }
                let Some(netns) = find_netns(&site.netns_path, site.netns_id) else {
                    continue;
                };
                let device = site.site.device.clone();
                match netns.run(move || datapath::remove_site(&site.site, site.replaced.as_ref())) {
                    Ok(Ok(())) => report.qdiscs += 1,
                    Ok(Err(DatapathError::NotOurs(why))) => report.refused.push(why),
                    Ok(Err(e)) => report.errors.push(format!("{device}: {e}")),
                    Err(e) => report.errors.push(format!("{device}: {e}")),
                }
            }
            if report.errors.is_empty() && !keep {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(report)
    }
}

impl Drop for Engine {
    /// Shutdown is "nothing desired": revert everything still active.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        st.desired.clear();
        let mut st = std::mem::take(st);
        self.reconcile(&mut st);
    }
}

/// The namespace a journal entry was applied in, if it still exists and is the same one.
fn find_netns(path: &Option<PathBuf>, id: NetnsId) -> Option<Netns> {
    let candidates = path
        .iter()
        .cloned()
        .chain([PathBuf::from("/proc/self/ns/net")]);
    for path in candidates {
        if let Ok(n) = Netns::open_path(&path, "--netns")
            && n.id == id
        {
            return Some(n);
        }
    }
    None
}

fn entry(
    id: &str,
    spec: &FaultSpec,
    deadline: SystemTime,
    netns: &Netns,
    installed: Option<&Installed>,
) -> Entry {
    Entry {
        id: id.to_string(),
        spec: spec.clone(),
        deadline_unix_ms: unix_ms(deadline),
        netns_path: netns.path.clone(),
        netns_id: netns.id,
        attachments: installed.map(Installed::records).unwrap_or_default(),
        workers: installed.map(Installed::workers).unwrap_or_default(),
        undo: installed.map(Installed::undo).unwrap_or_default(),
    }
}

/// The clsact filters an install may put in place: our classifier on each hook the fault
/// needs, and at ingress the mirred filter shaping may need after it. (Filters its interface's table
/// already has are in the journal already; naming them again is harmless.)
fn planned_attachments(spec: &FaultSpec, attach: Attach) -> Vec<AttachmentRecord> {
    let Attach { mode, priority } = attach;
    if mode != AttachMode::Clsact {
        return Vec::new();
    }
    let record = |hook, priority| AttachmentRecord {
        interface: spec.target.interface.clone(),
        hook,
        mode,
        priority,
        handle: datapath::CLSACT_HANDLE,
        // Unknown until done; never claim a clsact qdisc someone else may own.
        created_clsact: false,
    };
    let mut planned: Vec<AttachmentRecord> = Hook::for_direction(spec.target.direction)
        .map(|hook| record(hook, priority))
        .collect();
    if spec.target.direction.ingress() {
        planned.push(record(Hook::Ingress, priority + 1));
    }
    planned
}

fn status_of(id: &str, a: &Active, ended: Option<EndReason>) -> Result<FaultStatus, EngineError> {
    Ok(FaultStatus {
        id: id.to_string(),
        spec: a.spec.clone(),
        deadline: a.deadline,
        counters: a.installed.counters()?,
        backend: a.installed.backend(),
        ended,
        disarmed_after: None,
    })
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether the engine holds a network fault (a row in some interface's rule table).
fn holds_network_faults(st: &State) -> bool {
    st.active
        .values()
        .any(|a| matches!(a.installed, Installed::Net(_)))
}

/// A fault id: `f-` and 8 random hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most bytes.len() bytes into our buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = (nanos ^ std::process::id()).to_le_bytes();
    }
    format!(
        "f-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities up front so the user gets one clear line instead of an
/// EPERM from deep inside the bpf or netlink calls.
pub fn check_privileges(netns: &NetnsRef) -> Result<(), EngineError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if *netns != NetnsRef::Current && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN (to enter the target netns)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Privileges(format!(
            "need {} (run as root)",
            missing.join(", ")
        )))
    }
}

/// Gives the heap pages that freed objects left behind back to the kernel. glibc keeps them
/// in its per-thread arenas, so without this an agent that once loaded datapath objects and
/// held many faults stays at its high-water mark long after they are gone.
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
