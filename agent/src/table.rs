//! One engine's classifier on one interface, and its faults as rows of a rule table.
//!
//! The first network fault an engine puts on an interface loads the datapath object there and
//! attaches its classifier to the hooks the fault needs; every later fault on that interface is
//! a row written into the object's maps (a rule, its counters, its bits in the rule sets and
//! the CIDR tries) with no attach at all. The last row to go detaches the classifier, so the
//! kernel holds at most one program of ours per interface and hook (TCX allows 64 per hook, a
//! CNI's included) and a packet is parsed once however many faults the interface carries.
//!
//! A row is armed by its bit in `SETS[SET_ACTIVE]`, written last when it is added and cleared
//! first when it goes: one map write starts or stops a fault's effect.
use crate::datapath::{
    self, Attach, AttachMode, AttachmentRecord, CLSACT_HANDLE, Counters, DatapathError, Hook,
    Prepared, RootPlan, ShapingSite, Steering, kernel,
};
use crate::qdisc::{self, Shape};
use crate::rules::{CidrIndex, Prefix, TrieUpdate};
use crate::spec::{Cidr, FaultKind, FaultSpec, Protocol, invalid};
use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key};
use aya::programs::LinkOrder;
use aya::programs::links::Link as _;
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use chaos_abi::{
    ACTION_DELAY, ACTION_DNS, ACTION_DROP, DnsKey, HookCounters, MAX_RULES, PortBitmap, Rule,
    RuleCounters, RuleSet, SET_ACTIVE, SET_ANY_LOCAL, SET_ANY_REMOTE, SET_COUNT, SET_DNS,
    SET_DROPS, SET_EGRESS, SET_ICMP, SET_INGRESS, SET_OTHER_PROTOCOL, SET_TCP, SET_UDP,
    TableConfig,
};
use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

macro_rules! ctx {
    ($e:expr, $($arg:tt)+) => {
        $e.map_err(|e| kernel(format!($($arg)+))(Box::new(e)))
    };
}

/// The priority is this engine's (its registry slot's) and its table has nothing on this hook
/// yet, so a filter there is a dead predecessor's in the slot (clsact filters outlive their
/// process): it goes, and the attach does not fail on it.
fn clear_predecessor(record: &AttachmentRecord) -> Result<(), DatapathError> {
    datapath::remove_clsact_attachments(&[AttachmentRecord {
        created_clsact: false,
        ..record.clone()
    }])
}

/// What a row put in the maps besides its rule, so removing it takes exactly that away.
struct Row {
    remote: Vec<Cidr>,
    local: Vec<Cidr>,
    /// EDT per-destination delays: keys of `DELAY_V4`/`DELAY_V6`.
    delays: Vec<Prefix>,
    dns: Vec<DnsKey>,
    ports: bool,
    hooks: Vec<Hook>,
    /// What the row's hooks had seen when it was added (its `seen` is the growth since).
    seen_base: HookCounters,
}

/// The hook table of one interface.
pub struct Table {
    ebpf: Ebpf,
    interface: String,
    mode: AttachMode,
    /// This engine's clsact priority (its registry slot's): the classifier's; mirred's is next.
    priority: u16,
    tcx_links: Vec<SchedClassifierLink>,
    attached: Vec<Hook>,
    mirred: bool,
    /// clsact filters this table put in place (journaled by the engine before they exist).
    records: Vec<AttachmentRecord>,
    sets: Vec<RuleSet>,
    remote: CidrIndex,
    local: CidrIndex,
    dns: StdHashMap<DnsKey, RuleSet>,
    rows: BTreeMap<u32, Row>,
}

use aya::Ebpf;

impl Table {
    /// A table on `interface` (whose IP header starts at `l3_offset`) from a prepared object:
    /// settings, control-plane exclusions and a first heartbeat written, nothing attached.
    pub fn new(
        prepared: Prepared,
        interface: &str,
        l3_offset: u32,
        attach: Attach,
        excluded: &[SocketAddr],
    ) -> Result<Self, DatapathError> {
        let Attach { mode, priority } = attach;
        let mut table = Table {
            ebpf: prepared.into_ebpf(),
            interface: interface.to_string(),
            mode,
            priority,
            tcx_links: Vec::new(),
            attached: Vec::new(),
            mirred: false,
            records: Vec::new(),
            sets: vec![RuleSet::empty(); SET_COUNT as usize],
            remote: CidrIndex::default(),
            local: CidrIndex::default(),
            dns: StdHashMap::new(),
            rows: BTreeMap::new(),
        };
        let config = TableConfig {
            l3_offset,
            // Before 6.4 IFB drops packets bpf_redirect hands it (and TCX needs 6.6): ingress
            // shaping then goes through a classic cls_bpf filter with a mirred action.
            ingress_via_mirred: u32::from(
                mode == AttachMode::Clsact && !crate::caps::has_ingress_redirect(),
            ),
        };
        let mut c: Array<&mut MapData, TableConfig> =
            ctx!(Array::try_from(table.map("CONFIG")?), "CONFIG")?;
        ctx!(c.set(0, config, 0), "set CONFIG")?;
        let mut ex: HashMap<&mut MapData, chaos_abi::Endpoint, u8> =
            ctx!(HashMap::try_from(table.map("EXCLUDED")?), "EXCLUDED")?;
        for addr in excluded {
            ctx!(ex.insert(datapath::endpoint(*addr), 1, 0), "exclude {addr}")?;
        }
        table.beat_at(crate::heartbeat::monotonic_ns())?;
        Ok(table)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Kernel {
                context: "chaos.bpf.o".into(),
                message: format!("has no map {name}"),
            })
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The clsact filters in place (for the journal).
    pub fn records(&self) -> Vec<AttachmentRecord> {
        self.records.clone()
    }

    /// Writes `spec` as a new row and arms it; returns its slot. Attaches nothing. On failure
    /// the maps hold nothing of it.
    pub fn load_rule(
        &mut self,
        spec: &FaultSpec,
        shape: Option<&Shape>,
        steering: Steering,
        deadline_ns: u64,
    ) -> Result<u32, DatapathError> {
        let slot = (0..MAX_RULES)
            .find(|s| !self.rows.contains_key(s))
            .ok_or_else(|| {
                invalid(
                    "--interface",
                    format!(
                        "`{}` already carries {MAX_RULES} faults of this engine (the limit per interface)",
                        self.interface
                    ),
                )
            })?;
        let rule = datapath::rule_for(spec, shape, steering, deadline_ns);
        let mut remote = spec.target.remote.clone();
        let mut delays: Vec<(Cidr, u32)> = Vec::new();
        if let FaultKind::Latency {
            per_destination, ..
        } = &spec.kind
            && rule.action == ACTION_DELAY
        {
            // A remote CIDR without its own delay keeps the rule's (0); a later pair for the
            // same CIDR overrides an earlier one.
            delays.extend(remote.iter().map(|c| (*c, 0)));
            delays.extend(
                per_destination
                    .iter()
                    .map(|d| (d.cidr, (d.ms * 1000.0).round() as u32)),
            );
            remote.extend(per_destination.iter().map(|d| d.cidr));
        }
        let dns: Vec<DnsKey> = match &spec.kind {
            FaultKind::Dns { domains, .. } => domains.iter().map(|d| d.key()).collect(),
            _ => Vec::new(),
        };
        let ports = datapath::ports_of(spec);
        let row = Row {
            local: spec.target.local.clone(),
            remote,
            delays: delays.iter().map(|(c, _)| Prefix::of(c)).collect(),
            dns,
            ports: !ports.is_empty(),
            hooks: Hook::for_direction(spec.target.direction).collect(),
            seen_base: HookCounters::default(),
        };
        self.rows.insert(slot, row);
        let written = self.write_row(slot, &rule, &ports, &delays, spec.target.protocol);
        if let Err(e) = written {
            let _ = self.erase_row(slot);
            return Err(e);
        }
        Ok(slot)
    }

    fn write_row(
        &mut self,
        slot: u32,
        rule: &Rule,
        ports: &[crate::spec::PortRange],
        delays: &[(Cidr, u32)],
        protocol: Protocol,
    ) -> Result<(), DatapathError> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| kernel("number of CPUs")(Box::new(e)))?
            .max(1);
        {
            let mut counters: PerCpuArray<&mut MapData, RuleCounters> =
                ctx!(PerCpuArray::try_from(self.map("COUNTERS")?), "COUNTERS")?;
            let zero = ctx!(
                PerCpuValues::try_from(vec![RuleCounters::default(); cpus]),
                "counters"
            )?;
            ctx!(counters.set(slot, zero, 0), "reset COUNTERS")?;
        }
        let mut rules: Array<&mut MapData, Rule> =
            ctx!(Array::try_from(self.map("RULES")?), "RULES")?;
        ctx!(rules.set(slot, *rule, 0), "set RULES")?;
        if !ports.is_empty() {
            let mut bitmap = PortBitmap::empty();
            for p in ports {
                bitmap.set_range(p.first, p.last);
            }
            let mut map: HashMap<&mut MapData, u32, PortBitmap> =
                ctx!(HashMap::try_from(self.map("PORTS")?), "PORTS")?;
            ctx!(map.insert(slot, bitmap, 0), "set PORTS")?;
        }
        for (cidr, us) in delays {
            self.delay_entry(slot, Prefix::of(cidr), Some(*us))?;
        }
        let keys = self
            .rows
            .get(&slot)
            .map(|r| r.dns.clone())
            .unwrap_or_default();
        for key in keys {
            let mut set = self.dns.get(&key).copied().unwrap_or_default();
            set.insert(slot);
            let mut map: HashMap<&mut MapData, DnsKey, RuleSet> =
                ctx!(HashMap::try_from(self.map("DNS_NAMES")?), "DNS_NAMES")?;
            ctx!(map.insert(key, set, 0), "add a --domain pattern")?;
            self.dns.insert(key, set);
        }
        let (remote, local, hooks) = match self.rows.get(&slot) {
            Some(r) => (r.remote.clone(), r.local.clone(), r.hooks.clone()),
            None => return Ok(()),
        };
        let updates = self.remote.add(slot, &remote);
        self.write_trie("REMOTE", updates)?;
        let updates = self.local.add(slot, &local);
        self.write_trie("LOCAL", updates)?;
        let mut member = vec![];
        member.extend(hooks.iter().map(|h| match h {
            Hook::Egress => SET_EGRESS,
            Hook::Ingress => SET_INGRESS,
        }));
        member.extend(match protocol {
            Protocol::All => vec![SET_TCP, SET_UDP, SET_ICMP, SET_OTHER_PROTOCOL],
            Protocol::Tcp => vec![SET_TCP],
            Protocol::Udp => vec![SET_UDP],
            Protocol::Icmp => vec![SET_ICMP],
        });
        if remote.is_empty() {
            member.push(SET_ANY_REMOTE);
        }
        if local.is_empty() {
            member.push(SET_ANY_LOCAL);
        }
        if rule.action == ACTION_DROP || (rule.action == ACTION_DNS && rule.dns_rcode == 0) {
            member.push(SET_DROPS);
        }
        if rule.action == ACTION_DNS {
            member.push(SET_DNS);
        }
        for set in member {
            self.set_bit(set, slot, true)?;
        }
        let base = self.seen(&hooks)?;
        if let Some(r) = self.rows.get_mut(&slot) {
            r.seen_base = base;
        }
        // Last: the row is complete before it acts.
        self.set_bit(SET_ACTIVE, slot, true)
    }

    fn set_bit(&mut self, set: u32, slot: u32, on: bool) -> Result<(), DatapathError> {
        let Some(value) = self.sets.get_mut(set as usize) else {
            return Ok(());
        };
        let before = *value;
        if on {
            value.insert(slot);
        } else {
            value.remove(slot);
        }
        let value = *value;
        if value == before {
            return Ok(());
        }
        let mut sets: Array<&mut MapData, RuleSet> =
            ctx!(Array::try_from(self.map("SETS")?), "SETS")?;
        ctx!(sets.set(set, value, 0), "set SETS[{set}]")
    }

    fn write_trie(&mut self, name: &str, updates: Vec<TrieUpdate>) -> Result<(), DatapathError> {
        for update in updates {
            let (prefix, value) = match update {
                TrieUpdate::Set(p, v) => (p, Some(v)),
                TrieUpdate::Remove(p) => (p, None),
            };
            let octets = prefix.octets();
            let len = u32::from(prefix.len);
            if prefix.v6 {
                let mut key = [0u8; 16];
                key.copy_from_slice(&octets);
                let mut trie: LpmTrie<&mut MapData, [u8; 16], RuleSet> = ctx!(
                    LpmTrie::try_from(self.map(&format!("{name}_V6"))?),
                    "{name}_V6"
                )?;
                trie_write(&mut trie, &Key::new(len, key), value)?;
            } else {
                let mut key = [0u8; 4];
                key.copy_from_slice(&octets);
                let mut trie: LpmTrie<&mut MapData, [u8; 4], RuleSet> = ctx!(
                    LpmTrie::try_from(self.map(&format!("{name}_V4"))?),
                    "{name}_V4"
                )?;
                trie_write(&mut trie, &Key::new(len, key), value)?;
            }
        }
        Ok(())
    }

    /// Writes (or with `None` removes) one per-destination delay of rule `slot`.
    fn delay_entry(
        &mut self,
        slot: u32,
        prefix: Prefix,
        us: Option<u32>,
    ) -> Result<(), DatapathError> {
        let [hi, lo] = (slot as u16).to_be_bytes();
        let octets = prefix.octets();
        let len = 16 + u32::from(prefix.len);
        if prefix.v6 {
            let mut key = [0u8; 18];
            key[0] = hi;
            key[1] = lo;
            key[2..].copy_from_slice(&octets);
            let mut trie: LpmTrie<&mut MapData, [u8; 18], u32> =
                ctx!(LpmTrie::try_from(self.map("DELAY_V6")?), "DELAY_V6")?;
            trie_write(&mut trie, &Key::new(len, key), us)
        } else {
            let mut key = [0u8; 6];
            key[0] = hi;
            key[1] = lo;
            key[2..].copy_from_slice(&octets);
            let mut trie: LpmTrie<&mut MapData, [u8; 6], u32> =
                ctx!(LpmTrie::try_from(self.map("DELAY_V4")?), "DELAY_V4")?;
            trie_write(&mut trie, &Key::new(len, key), us)
        }
    }

    /// Stops rule `slot` affecting packets, at once (one map write; nothing detached).
    pub fn disarm(&mut self, slot: u32) -> Result<(), DatapathError> {
        self.set_bit(SET_ACTIVE, slot, false)
    }

    /// Takes rule `slot` out of every map. The first error is returned, after trying the rest.
    fn erase_row(&mut self, slot: u32) -> Result<(), DatapathError> {
        let mut first_error = None;
        let mut note = |r: Result<(), DatapathError>| {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        };
        note(self.disarm(slot));
        for set in 0..SET_COUNT {
            note(self.set_bit(set, slot, false));
        }
        let Some(row) = self.rows.remove(&slot) else {
            return first_error.map_or(Ok(()), Err);
        };
        let updates = self.remote.remove(slot, &row.remote);
        note(self.write_trie("REMOTE", updates));
        let updates = self.local.remove(slot, &row.local);
        note(self.write_trie("LOCAL", updates));
        for prefix in &row.delays {
            note(self.delay_entry(slot, *prefix, None));
        }
        for key in &row.dns {
            let Some(mut set) = self.dns.get(key).copied() else {
                continue;
            };
            set.remove(slot);
            let result = (|| {
                let mut map: HashMap<&mut MapData, DnsKey, RuleSet> =
                    ctx!(HashMap::try_from(self.map("DNS_NAMES")?), "DNS_NAMES")?;
                if set.is_empty() {
                    ctx!(map.remove(key), "remove a --domain pattern")
                } else {
                    ctx!(map.insert(*key, set, 0), "update a --domain pattern")
                }
            })();
            note(result);
            if set.is_empty() {
                self.dns.remove(key);
            } else {
                self.dns.insert(*key, set);
            }
        }
        if row.ports {
            let result = (|| {
                let mut map: HashMap<&mut MapData, u32, PortBitmap> =
                    ctx!(HashMap::try_from(self.map("PORTS")?), "PORTS")?;
                ctx!(map.remove(&slot), "remove PORTS")
            })();
            note(result);
        }
        let result = (|| {
            let mut rules: Array<&mut MapData, Rule> =
                ctx!(Array::try_from(self.map("RULES")?), "RULES")?;
            ctx!(rules.set(slot, Rule::default(), 0), "clear RULES")
        })();
        note(result);
        first_error.map_or(Ok(()), Err)
    }

    /// What `hooks` have seen so far, summed over CPUs.
    fn seen(&self, hooks: &[Hook]) -> Result<HookCounters, DatapathError> {
        let data = self.ebpf.map("SEEN").ok_or_else(|| DatapathError::Kernel {
            context: "chaos.bpf.o".into(),
            message: "has no map SEEN".into(),
        })?;
        let seen: PerCpuArray<&MapData, HookCounters> = ctx!(PerCpuArray::try_from(data), "SEEN")?;
        let mut total = HookCounters::default();
        for hook in hooks {
            let index = match hook {
                Hook::Egress => 0,
                Hook::Ingress => 1,
            };
            for v in ctx!(seen.get(&index, 0), "read SEEN")?.iter() {
                total.seen = total.seen.saturating_add(v.seen);
                total.seen_bytes = total.seen_bytes.saturating_add(v.seen_bytes);
            }
        }
        Ok(total)
    }

    pub fn counters(&self, slot: u32) -> Result<Counters, DatapathError> {
        let Some(row) = self.rows.get(&slot) else {
            return Ok(Counters::default());
        };
        let data = self
            .ebpf
            .map("COUNTERS")
            .ok_or_else(|| DatapathError::Kernel {
                context: "chaos.bpf.o".into(),
                message: "has no map COUNTERS".into(),
            })?;
        let counters: PerCpuArray<&MapData, RuleCounters> =
            ctx!(PerCpuArray::try_from(data), "COUNTERS")?;
        let seen = self.seen(&row.hooks)?;
        let mut c = Counters {
            seen: seen.seen.saturating_sub(row.seen_base.seen),
            seen_bytes: seen.seen_bytes.saturating_sub(row.seen_base.seen_bytes),
            ..Counters::default()
        };
        for v in ctx!(counters.get(&slot, 0), "read COUNTERS")?.iter() {
            c.matched = c.matched.saturating_add(v.matched);
            c.affected = c.affected.saturating_add(v.affected);
            c.matched_bytes = c.matched_bytes.saturating_add(v.matched_bytes);
            c.affected_bytes = c.affected_bytes.saturating_add(v.affected_bytes);
        }
        Ok(c)
    }

    /// Stamps the owner's heartbeat as beaten at `now_ns` (CLOCK_MONOTONIC).
    pub fn beat_at(&mut self, now_ns: u64) -> Result<(), DatapathError> {
        let mut beats: Array<&mut MapData, u64> =
            ctx!(Array::try_from(self.map("HEARTBEAT")?), "HEARTBEAT")?;
        ctx!(beats.set(0, now_ns, 0), "beat HEARTBEAT")
    }

    /// A handle on the heartbeat map that needs no access to the table (a dup of the map's
    /// descriptor), for the engine's heartbeat thread.
    pub fn heartbeat(&self) -> Result<crate::heartbeat::Beat, DatapathError> {
        use std::os::fd::AsFd;
        let data: &MapData = match self.ebpf.map("HEARTBEAT") {
            Some(aya::maps::Map::Array(data)) => data,
            _ => {
                return Err(DatapathError::Kernel {
                    context: "chaos.bpf.o".into(),
                    message: "has no array HEARTBEAT".into(),
                });
            }
        };
        let fd = ctx!(data.fd().as_fd().try_clone_to_owned(), "dup HEARTBEAT")?;
        let data = ctx!(MapData::from_fd(fd), "HEARTBEAT")?;
        Ok(crate::heartbeat::Beat::new(ctx!(
            Array::try_from(aya::maps::Map::Array(data)),
            "HEARTBEAT"
        )?))
    }

    /// Attaches the classifier to `hook` unless it is already there; with `mirred_to` (an IFB,
    /// on kernels whose ingress shaping needs it) also the mirred filter. Must run inside the
    /// interface's namespace.
    pub fn attach(&mut self, hook: Hook, mirred_to: Option<u32>) -> Result<(), DatapathError> {
        if !self.attached.contains(&hook) {
            self.attach_classifier(hook)?;
            self.attached.push(hook);
        }
        if let Some(ifb) = mirred_to
            && !self.mirred
            && hook == Hook::Ingress
        {
            self.attach_mirred(ifb)?;
            self.mirred = true;
        }
        Ok(())
    }

    fn attach_classifier(&mut self, hook: Hook) -> Result<(), DatapathError> {
        let interface = self.interface.clone();
        let mode = self.mode;
        match mode {
            AttachMode::Tcx => {
                let prog = datapath::loaded(&mut self.ebpf, hook.program())?;
                // First in the chain: a CNI program that redirects would otherwise end the chain
                // before we see the packet.
                let id = ctx!(
                    prog.attach_with_options(
                        &interface,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::first())
                    ),
                    "attach {} to {interface} (tcx)",
                    hook.program()
                )?;
                let link = ctx!(prog.take_link(id), "take link")?;
                self.tcx_links.push(link);
            }
            AttachMode::Clsact => {
                let record = AttachmentRecord {
                    interface: interface.clone(),
                    hook,
                    mode,
                    priority: self.priority,
                    handle: CLSACT_HANDLE,
                    created_clsact: datapath::ensure_clsact(&interface)?,
                };
                clear_predecessor(&record)?;
                // Recorded before attaching: removal of a half-done attach must see it.
                self.records.push(record.clone());
                let prog = datapath::loaded(&mut self.ebpf, hook.program())?;
                let options = NlOptions {
                    priority: record.priority,
                    handle: TcHandle::from(CLSACT_HANDLE),
                    classid: None,
                };
                let id = ctx!(
                    prog.attach_with_options(
                        &interface,
                        hook.attach_type(),
                        TcAttachOptions::Netlink(options)
                    ),
                    "attach {} to {interface} (clsact, priority {})",
                    hook.program(),
                    record.priority
                )?;
                // Dropping a netlink link detaches it through a netlink socket of whatever
                // thread drops it, possibly in another namespace. We detach explicitly instead.
                std::mem::forget(ctx!(prog.take_link(id), "take link")?);
            }
        }
        Ok(())
    }

    /// Ingress shaping without bpf_redirect into IFB: `chaos_ingress_mirred` as a classic
    /// cls_bpf filter on clsact ingress right after our classifier (which marks what to
    /// shape), with a mirred action to the IFB `ifb`.
    fn attach_mirred(&mut self, ifb: u32) -> Result<(), DatapathError> {
        use std::os::fd::{AsFd, AsRawFd};
        const PROGRAM: &str = "chaos_ingress_mirred";
        let interface = self.interface.clone();
        let record = AttachmentRecord {
            interface: interface.clone(),
            hook: Hook::Ingress,
            mode: AttachMode::Clsact,
            priority: self.priority + 1,
            handle: CLSACT_HANDLE,
            created_clsact: datapath::ensure_clsact(&interface)?,
        };
        clear_predecessor(&record)?;
        self.records.push(record.clone());
        let prog = datapath::loaded(&mut self.ebpf, PROGRAM)?;
        let fd = ctx!(prog.fd(), "{PROGRAM} fd")?.as_fd().as_raw_fd();
        crate::netlink::add_mirred_filter(
            &interface,
            record.priority,
            CLSACT_HANDLE,
            fd as u32,
            PROGRAM,
            ifb,
        )
        .map_err(|e| {
            kernel(format!("attach {PROGRAM} to {interface} (clsact, mirred)"))(Box::new(e))
        })
    }

    /// Removes every attachment. Must run inside the interface's namespace.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        let mut first_error = None;
        for link in self.tcx_links.drain(..) {
            if let Err(e) = ctx!(link.detach(), "detach tcx link") {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = datapath::remove_clsact_attachments(&self.records) {
            first_error.get_or_insert(e);
        } else {
            self.records.clear();
        }
        self.attached.clear();
        self.mirred = false;
        first_error.map_or(Ok(()), Err)
    }

    /// Runs the `program` classifier over `packet` `repeat` times in the kernel
    /// (BPF_PROG_TEST_RUN) and returns the mean nanoseconds per run and the last verdict. For
    /// tests and benchmarks: the classifier alone, without any traffic or qdisc around it.
    pub fn test_run(
        &mut self,
        program: &str,
        packet: &[u8],
        repeat: u32,
    ) -> std::io::Result<(u32, i32)> {
        datapath::test_run(&mut self.ebpf, program, packet, repeat)
    }
}

fn trie_write<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<&mut MapData, K, V>,
    key: &Key<K>,
    value: Option<V>,
) -> Result<(), DatapathError> {
    match value {
        Some(v) => match trie.insert(key, v, 0) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOSPC) =>
            {
                Err(DatapathError::Full(format!(
                    "the interface's CIDR table is full: at most {} prefixes per address family \
                     and end (--dest or --source), counted over all the faults on the interface",
                    chaos_abi::MAX_CIDRS
                )))
            }
            r => ctx!(r, "insert a CIDR"),
        },
        None => match trie.remove(key) {
            Ok(()) => Ok(()),
            // Already gone (an erase after a half-done write).
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => ctx!(Err(e), "remove a CIDR"),
        },
    }
}

/// A table shared by the faults on one interface (the engine keeps one per namespace and
/// interface).
pub type SharedTable = Arc<Mutex<Table>>;

pub fn lock(table: &SharedTable) -> MutexGuard<'_, Table> {
    // A panic while holding the lock leaves maps that still describe the kernel; go on.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// A network fault live in the kernel: its row in its interface's table, and its shaping
/// classes.
pub struct Installed {
    pub table: SharedTable,
    pub slot: u32,
    /// Shaping faults: the devices where this fault has its class.
    pub shaped: Vec<ShapingSite>,
    /// The engine's slot, which names the fault's shaping classes.
    class_slot: u16,
}

/// Puts `spec` in place inside the target namespace: its shaping classes (under our root,
/// which `sites` says what to do about), then its row in the interface's `table` (a new table
/// from `prepared` when there is none yet), then the hooks it needs attached. On failure it
/// undoes exactly what it did: a table it created is gone, an existing one loses only the row.
#[allow(clippy::too_many_arguments)]
pub fn install(
    table: Option<SharedTable>,
    prepared: Option<Prepared>,
    spec: &FaultSpec,
    attach: Attach,
    class_slot: u16,
    excluded: &[SocketAddr],
    sites: &[(ShapingSite, RootPlan)],
    deadline_ns: u64,
) -> Result<Installed, DatapathError> {
    let interface = spec.target.interface.as_str();
    let l3 = datapath::l3_offset(interface)?;
    let shape = datapath::shape_for(&spec.kind)?;
    let mut steering = Steering::default();
    let mut done: Vec<&(ShapingSite, RootPlan)> = Vec::new();
    if let Some(shape) = &shape {
        steering.classid = qdisc::classid(class_slot);
        // The classes must exist before anything is steered into them.
        for planned @ (site, plan) in sites {
            let added = datapath::add_to_site(site, plan, shape, class_slot).and_then(|()| {
                done.push(planned);
                if site.ifb_for.is_none() {
                    return Ok(());
                }
                steering.redirect_ifindex = crate::netlink::ifindex(&site.device)
                    .map_err(|e| kernel(format!("interface {}", site.device))(Box::new(e)))?;
                Ok(())
            });
            if let Err(e) = added {
                datapath::undo_sites(&done, class_slot);
                return Err(e);
            }
        }
    }
    let table = match (table, prepared) {
        (Some(t), _) => t,
        (None, Some(p)) => match Table::new(p, interface, l3, attach, excluded) {
            Ok(t) => Arc::new(Mutex::new(t)),
            Err(e) => {
                datapath::undo_sites(&done, class_slot);
                return Err(e);
            }
        },
        (None, None) => {
            return Err(DatapathError::Kernel {
                context: "install".into(),
                message: "neither a table nor a prepared object".into(),
            });
        }
    };
    let result = (|| {
        let mut t = lock(&table);
        let slot = t.load_rule(spec, shape.as_ref(), steering, deadline_ns)?;
        for hook in Hook::for_direction(spec.target.direction) {
            let mirred = (hook == Hook::Ingress
                && attach.mode == AttachMode::Clsact
                && steering.redirect_ifindex != 0
                && !crate::caps::has_ingress_redirect())
            .then_some(steering.redirect_ifindex);
            if let Err(e) = t.attach(hook, mirred) {
                let _ = t.erase_row(slot);
                return Err(e);
            }
        }
        Ok(slot)
    })();
    match result {
        Ok(slot) => Ok(Installed {
            table,
            slot,
            shaped: done.iter().map(|(site, _)| site.clone()).collect(),
            class_slot,
        }),
        Err(e) => {
            {
                let mut t = lock(&table);
                if t.is_empty() {
                    let _ = t.detach();
                }
            }
            datapath::undo_sites(&done, class_slot);
            Err(e)
        }
    }
}

impl Installed {
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        lock(&self.table).counters(self.slot)
    }

    pub fn disarm(&mut self) -> Result<(), DatapathError> {
        lock(&self.table).disarm(self.slot)
    }

    pub fn records(&self) -> Vec<AttachmentRecord> {
        lock(&self.table).records()
    }

    pub fn heartbeat(&self) -> Result<crate::heartbeat::Beat, DatapathError> {
        lock(&self.table).heartbeat()
    }

    /// Takes the row away, detaches the table if it was the last, and removes the fault's
    /// shaping classes (after the classifier: nothing is steered into a class while it goes).
    /// Must run inside the target namespace.
    pub fn uninstall(self) -> Result<(), DatapathError> {
        let mut first_error = None;
        {
            let mut t = lock(&self.table);
            if let Err(e) = t.erase_row(self.slot) {
                first_error.get_or_insert(e);
            }
            if t.is_empty()
                && let Err(e) = t.detach()
            {
                first_error.get_or_insert(e);
            }
        }
        for site in &self.shaped {
            if let Err(e) = qdisc::remove_class(&site.device, self.class_slot) {
                first_error.get_or_insert(kernel(format!(
                    "remove the shaping class of {}",
                    site.device
                ))(Box::new(e)));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
