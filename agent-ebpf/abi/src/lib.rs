//! The map ABI shared by the eBPF datapath (`agent-ebpf`) and the agent.
//!
//! Every type here is `#[repr(C)]` plain old data with explicit padding, so the kernel side and
//! user space agree on the layout byte for byte. Nothing else belongs in this crate.
#![no_std]

/// Largest number of CIDR entries per trie (and of ports, which live in a bitmap anyway).
pub const MAX_CIDRS: u32 = 65_536;

/// Rows of one hook table: the faults one engine can hold on one interface. A packet pays for
/// the rules it matches, not for the rows: which rules a packet can match is a few ANDs over
/// [`RuleSet`]s, and only the rules left are visited.
pub const MAX_RULES: u32 = 1024;
/// `u64` words of a [`RuleSet`].
pub const RULE_WORDS: usize = (MAX_RULES / 64) as usize;

/// One bit per rule slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub words: [u64; RULE_WORDS],
}

impl RuleSet {
    pub const fn empty() -> Self {
        RuleSet {
            words: [0; RULE_WORDS],
        }
    }

    pub fn insert(&mut self, slot: u32) {
        self.words[(slot as usize / 64) % RULE_WORDS] |= 1 << (slot % 64);
    }

    pub fn remove(&mut self, slot: u32) {
        self.words[(slot as usize / 64) % RULE_WORDS] &= !(1 << (slot % 64));
    }

    #[inline(always)]
    pub fn contains(&self, slot: u32) -> bool {
        self.words[(slot as usize / 64) % RULE_WORDS] & (1 << (slot % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::empty()
    }
}

/// Indices of the `SETS` array: which rules each property admits. A packet's candidate rules
/// are `ACTIVE & hook & protocol & (remote trie | ANY_REMOTE) & (local trie | ANY_LOCAL)`.
/// Rules whose action is armed (cleared first on revert: one map write disarms a fault).
pub const SET_ACTIVE: u32 = 0;
pub const SET_EGRESS: u32 = 1;
pub const SET_INGRESS: u32 = 2;
/// Rules for TCP (and for all protocols), likewise UDP, ICMP, and any other protocol.
pub const SET_TCP: u32 = 3;
pub const SET_UDP: u32 = 4;
pub const SET_ICMP: u32 = 5;
pub const SET_OTHER_PROTOCOL: u32 = 6;
/// Rules without remote (local) CIDRs: they match every remote (local) address.
pub const SET_ANY_REMOTE: u32 = 7;
pub const SET_ANY_LOCAL: u32 = 8;
/// Rules that lose the packet (loss, partition, DNS timeouts): they are consulted first.
pub const SET_DROPS: u32 = 9;
/// DNS rules: only a packet that may meet one pays for parsing a DNS query.
pub const SET_DNS: u32 = 10;
pub const SET_COUNT: u32 = 11;

/// A hook table's settings (index 0 of `CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableConfig {
    /// Offset of the IP header in the frame: 14 on Ethernet, 0 on L3 devices (tun, wireguard).
    pub l3_offset: u32,
    /// 1 where ingress shaping goes through the separate mirred filter (kernels before 6.4,
    /// whose IFB drops what bpf_redirect hands it): the classifier then only marks the packet.
    pub ingress_via_mirred: u32,
}

/// The major number of our shaping classes: `chaos_ingress_mirred` hands the IFB exactly the
/// packets the classifier steered into one of them.
pub const SHAPING_MAJOR: u32 = 0xC4A0;
/// Control-plane endpoints that a fault must never match (invariant: the agent never cuts its
/// own control channel).
pub const MAX_EXCLUDED: u32 = 64;
/// One bit per port: 65,536 bits.
pub const PORT_BITMAP_WORDS: usize = 2048;

/// `Rule::probability_*` are fractions of 2^32: 0 never, `PROBABILITY_ONE` always.
pub const PROBABILITY_ONE: u64 = 1 << 32;

/// Match and count, affect nothing.
pub const ACTION_NONE: u32 = 0;
pub const ACTION_DROP: u32 = 1;
pub const ACTION_CORRUPT: u32 = 2;
/// Steer the packet into a shaping class (netem, rate) the agent created under its own root
/// qdisc, by setting skb->priority to `Rule::classid` (and at ingress by redirecting it to
/// `Rule::redirect_ifindex`, an IFB device). Unmatched packets never get that priority, so they
/// bypass the shaped class entirely.
pub const ACTION_STEER: u32 = 3;
/// Set the packet's earliest departure time (skb->tstamp) `Rule::delay_ns` ahead, or the
/// delay stored with its remote CIDR; an fq root qdisc holds it until then (EDT).
pub const ACTION_DELAY: u32 = 4;

/// Answer or drop DNS queries (UDP, and TCP for dropping) whose QNAME matches the `DNS_NAMES`
/// patterns (or any name without `MATCH_DNS_NAMES`): `Rule::dns_rcode` 0 drops them (the client
/// times out), else the query is turned into a response with that RCODE in place and handed
/// back to the interface's ingress path at once.
pub const ACTION_DNS: u32 = 5;

/// The rule has ports: a packet matches if its source or destination port is in the bitmap.
pub const MATCH_PORTS: u32 = 1 << 2;
/// `ACTION_DNS` only: the rule has name patterns in `DNS_NAMES` (else every name matches).
pub const MATCH_DNS_NAMES: u32 = 1 << 3;

/// `DnsKey::kind`: the whole QNAME equals the pattern.
pub const DNS_EXACT: u32 = 1;
/// `DnsKey::kind`: the QNAME ends in `.` + the pattern (`*.example.com`: names below it).
pub const DNS_WILDCARD: u32 = 2;
/// Name patterns per DNS fault.
pub const MAX_DNS_PATTERNS: u32 = 4096;
/// Longest QNAME in wire form (RFC 1035), and the size of the datapath's copy of it.
pub const DNS_NAME_MAX: usize = 256;

/// A name pattern as the datapath looks it up: the hash of a QNAME suffix in wire form (label
/// lengths and labels, through the root's zero byte), its length, and the kind of match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub hash: u64,
    pub len: u32,
    pub kind: u32,
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// One step of the suffix hash: FNV-1a over the suffix's bytes taken from the last to the
/// first, ASCII letters lowercased (DNS names compare case-insensitively; label length bytes
/// are below 64 and never letters). Taken backwards so one pass over a QNAME yields the hash of
/// every suffix. Shared by the datapath and the agent, so both hash alike.
#[inline(always)]
pub fn dns_hash_step(hash: u64, byte: u8) -> u64 {
    let b = if byte.is_ascii_uppercase() {
        byte | 0x20
    } else {
        byte
    };
    (hash ^ b as u64).wrapping_mul(FNV_PRIME)
}

/// Per-CPU scratch space for the DNS matcher: the QNAME and the hash of each of its suffixes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsScratch {
    pub name: [u8; DNS_NAME_MAX],
    pub suffix_hash: [u64; DNS_NAME_MAX],
    /// The matcher's loop state. It lives here, not on the stack, so the verifier sees every
    /// value read back as unknown: a bpf_loop callback's states then agree after one pass
    /// (kernels from 6.7 verify callbacks until they do) instead of once per possible value.
    pub pos: u64,
    pub limit: u64,
    pub hash: u64,
    pub status: u64,
    /// The rules whose patterns the name matched, gathered over every suffix.
    pub names: RuleSet,
}

/// What one fault does: a row of its hook table (`RULES`, indexed by slot). Which packets it
/// may see is in the `SETS` and tries; the rest of its target (ports, DNS names) is checked
/// here.
///
/// Whether a matched packet is affected follows a two-state Markov chain (the simple
/// Gilbert model): after an affected packet the chance is `probability_after_hit`, otherwise
/// `probability_after_miss`. Independent loss sets both to p; correlation c gives
/// `p + c(1-p)` and `p(1-c)`, which keeps the mean at p with lag-1 correlation c.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub action: u32,
    pub match_flags: u32,
    pub probability_after_hit: u64,
    pub probability_after_miss: u64,
    /// For `ACTION_STEER`: the class (major:minor) matched packets go to.
    pub classid: u32,
    /// For `ACTION_STEER` at ingress: the IFB device whose egress queue (our shaping root)
    /// matched packets are redirected to; it hands them back to the ingress path afterwards.
    /// Ignored at egress, where the target interface's own root qdisc shapes.
    pub redirect_ifindex: u32,
    /// For `ACTION_DELAY`: the delay of destinations whose CIDR carries none.
    pub delay_ns: u64,
    /// For `ACTION_DNS`: the RCODE of the synthesized answer (2 SERVFAIL, 3 NXDOMAIN, 5
    /// REFUSED), or 0 to drop the query.
    pub dns_rcode: u32,
    /// The owner's slot in `HEARTBEAT`. The rule passes every packet untouched once that
    /// heartbeat is older than [`HEARTBEAT_BOUND_NS`]: a dead or frozen owner's fault ends by
    /// itself, with nobody left to detach it (a clsact filter outlives its process).
    pub heartbeat_slot: u32,
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) nanoseconds from which the rule passes every packet
    /// untouched: the kernel ends the fault at its deadline whether or not its owner runs.
    pub deadline_ns: u64,
}

/// How old the owner's heartbeat may be before its rules go inert. The owner refreshes it every
/// [`HEARTBEAT_INTERVAL_NS`]; eight missed beats is a dead or frozen owner, not a busy one.
pub const HEARTBEAT_BOUND_NS: u64 = 2_000_000_000;
pub const HEARTBEAT_INTERVAL_NS: u64 = 250_000_000;
/// Entries of the `HEARTBEAT` array (CLOCK_MONOTONIC ns of the owner's last beat).
pub const HEARTBEAT_SLOTS: u32 = 1;

/// Per-CPU counters of one rule and the per-CPU state of its Markov chain (`COUNTERS`, by
/// slot). Summed by user space.
///
/// Packets count as segments: a GSO/TSO super-packet of n segments (one skb at the hook)
/// counts n, as the wire and a receiver see it. Bytes are the skb's length at the hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub matched: u64,
    pub affected: u64,
    pub matched_bytes: u64,
    pub affected_bytes: u64,
    /// 1 if the last matched packet on this CPU was affected.
    pub last_affected: u64,
}

/// Per-CPU count of what one hook saw (`SEEN`: 0 egress, 1 ingress); a rule's `seen` is the
/// growth since it was added.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounters {
    pub seen: u64,
    pub seen_bytes: u64,
}

/// The classifier's per-CPU working state for one packet: the candidate rules, what the packet
/// is, and the outcome the rules have composed so far. In a map, not on the stack: the rule
/// walk is a bpf_loop callback, and 512 bytes of stack would not hold it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub candidates: RuleSet,
    /// Next slot to look at.
    pub pos: u64,
    pub now: u64,
    pub segments: u64,
    pub bytes: u64,
    /// The remote address (IPv4 in the first four bytes), for per-destination delays.
    pub remote: [u8; 16],
    pub family: u32,
    pub direction: u32,
    pub sport: u32,
    pub dport: u32,
    pub has_ports: u32,
    /// 1: a standard DNS query (UDP or TCP) whose name was looked up.
    pub dns_query: u32,
    pub protocol: u32,
    /// 0: the rules that lose packets; 1: all others.
    pub phase: u32,
    // The outcome.
    pub dropped: u32,
    pub classid: u32,
    pub redirect_ifindex: u32,
    pub dns_rcode: u32,
    pub corruptions: u32,
    pub _pad: u32,
    pub delay_ns: u64,
}

/// Ports as a bitmap so a lookup costs the same for one port or a range of 65,536.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PortBitmap {
    pub words: [u32; PORT_BITMAP_WORDS],
}

impl PortBitmap {
    pub const fn empty() -> Self {
        Self {
            words: [0; PORT_BITMAP_WORDS],
        }
    }

    pub fn set_range(&mut self, first: u16, last: u16) {
        let mut p = first as u32;
        while p <= last as u32 {
            self.words[(p >> 5) as usize] |= 1 << (p & 31);
            p += 1;
        }
    }

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let word = (port >> 5) as usize & (PORT_BITMAP_WORDS - 1);
        self.words[word] & (1 << (port & 31)) != 0
    }
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An address and port excluded from every fault (the agent's control traffic). IPv4 addresses
/// use the first four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C) with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::RuleCounters {}
    unsafe impl aya::Pod for super::HookCounters {}
    unsafe impl aya::Pod for super::RuleSet {}
    unsafe impl aya::Pod for super::TableConfig {}
    unsafe impl aya::Pod for super::PortBitmap {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::DnsKey {}
}

// ---- clock-skew (agent-ebpf/src/clock.rs, agent/src/clock.rs) ----

/// Processes (by tgid) one clock-skew object can hold: the target and what it forks while the
/// fault lasts. A fork past this is not skewed (and counted).
pub const MAX_CLOCK_TARGETS: u32 = 65_536;
/// How old the owner's heartbeat may be before the clock rule goes inert: the bound
/// for "back on true time after the agent's death" is 1 s (a killed owner's programs are
/// detached at once; this covers a frozen one).
pub const CLOCK_HEARTBEAT_BOUND_NS: u64 = 1_000_000_000;

/// The clock calls whose results the object rewrites (`ClockCall::call`).
pub const CALL_CLOCK_GETTIME: u32 = 0;
pub const CALL_GETTIMEOFDAY: u32 = 1;
pub const CALL_TIME: u32 = 2;

/// What one clock-skew fault does (index 0 of `CLOCK_RULE`): the result of every clock read of
/// a target process whose clock id is in `clocks` is moved by
/// `offset_ns + drift_ppm * (now - origin_ns) / 10^6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockRule {
    pub offset_ns: i64,
    /// |drift| in parts per million, and its sign (the datapath has no signed division on
    /// kernels before 6.6, so the arithmetic stays unsigned).
    pub drift_ppm_abs: u64,
    pub drift_negative: u32,
    /// Bit n: clock id n (CLOCK_REALTIME = 0 ...); gettimeofday and time count as 0.
    pub clocks: u32,
    /// CLOCK_MONOTONIC ns the drift is counted from (the apply).
    pub origin_ns: u64,
    /// CLOCK_MONOTONIC ns from which reads pass untouched.
    pub deadline_ns: u64,
}

/// A clock call between its entry and its exit (`CLOCK_INFLIGHT`, by pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCall {
    /// The user buffer the result goes to (timespec, timeval or time_t).
    pub ptr: u64,
    pub clockid: u32,
    pub call: u32,
}

/// Per-CPU counters of a clock-skew object (`CLOCK_COUNTERS`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCounters {
    /// Clock reads by target processes that reached the kernel.
    pub reads: u64,
    /// Reads whose result was moved.
    pub skewed: u64,
    /// Forks that could not be added (the target table was full).
    pub lost_forks: u64,
}

#[cfg(feature = "user")]
mod clock_user {
    // SAFETY: repr(C), explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for super::ClockRule {}
    unsafe impl aya::Pod for super::ClockCall {}
    unsafe impl aya::Pod for super::ClockCounters {}
}
