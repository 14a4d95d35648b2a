//! The chaos datapath: one classifier per hook whose faults are the rows of a rule table.
//!
//! One copy of this object is loaded per interface an engine faults; its maps are that
//! interface's table. A packet is parsed once. Which rules it can match is a handful of ANDs
//! over rule sets (`SETS`, and the sets stored with the CIDRs in the LPM tries), so a packet
//! that matches nothing pays the parse, two trie lookups and those ANDs however many faults the
//! interface carries; only the rules left are visited, in a bpf_loop (Linux 5.17+).
//!
//! How matching rules compose (ARCHITECTURE.md, "Packet path"):
//! 1. Rules that lose the packet (loss, partition, DNS timeouts) draw first, each on its own
//!    Markov chain: the packet is lost if any draw hits, so losses p and q lose 1-(1-p)(1-q).
//! 2. A lost packet goes no further: the other rules count it as matched, never as affected.
//! 3. Otherwise the first shaping rule (lowest slot) puts it in its class or sets its delay
//!    (a packet is in one class), every corrupt rule that hits flips a bit, and the first DNS
//!    rule that hits answers the query.
//!
//! Every rule ends by itself: past its deadline, or once its owner's heartbeat is stale, it
//! passes packets untouched (see `live`).
#![no_std]
#![no_main]

mod dns;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    cty::c_void,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_redirect},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use chaos_abi::{
    ACTION_CORRUPT, ACTION_DELAY, ACTION_DNS, ACTION_DROP, ACTION_NONE, ACTION_STEER, Endpoint, FAMILY_V4, FAMILY_V6,
    HEARTBEAT_BOUND_NS, HEARTBEAT_SLOTS, HookCounters, MATCH_DNS_NAMES, MATCH_PORTS, MAX_CIDRS, MAX_EXCLUDED, MAX_RULES,
    PortBitmap, RULE_WORDS, Rule, RuleCounters, RuleSet, SET_ACTIVE, SET_ANY_LOCAL, SET_ANY_REMOTE, SET_COUNT, SET_DROPS,
    SET_EGRESS, SET_ICMP, SET_INGRESS, SET_DNS, SET_OTHER_PROTOCOL, SET_TCP, SET_UDP, SHAPING_MAJOR, Scratch, TableConfig,
};

#[map]
static CONFIG: Array<TableConfig> = Array::with_max_entries(1, 0);
#[map]
static RULES: Array<Rule> = Array::with_max_entries(MAX_RULES, 0);
#[map]
static SETS: Array<RuleSet> = Array::with_max_entries(SET_COUNT, 0);
/// Port bitmaps by slot, for rules with `MATCH_PORTS` (8 KiB each: allocated only for them).
#[map]
static PORTS: HashMap<u32, PortBitmap> = HashMap::with_max_entries(MAX_RULES, BPF_F_NO_PREALLOC);
/// CIDR -> the rules whose remote (local) CIDRs contain it. User space stores with each CIDR
/// every rule listing it or a shorter prefix of it, so the longest match alone answers.
#[map]
static REMOTE_V4: LpmTrie<[u8; 4], RuleSet> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static REMOTE_V6: LpmTrie<[u8; 16], RuleSet> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static LOCAL_V4: LpmTrie<[u8; 4], RuleSet> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static LOCAL_V6: LpmTrie<[u8; 16], RuleSet> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
/// EDT per-destination delays (microseconds) of a rule: the key is its slot (2 bytes, big
/// endian) and then the address, so one trie holds every rule's table.
#[map]
static DELAY_V4: LpmTrie<[u8; 6], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static DELAY_V6: LpmTrie<[u8; 18], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static EXCLUDED: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_EXCLUDED, 0);
#[map]
static COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map]
static SEEN: PerCpuArray<HookCounters> = PerCpuArray::with_max_entries(2, 0);
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// CLOCK_MONOTONIC ns of each owner's last heartbeat (see `Rule::heartbeat_slot`).
#[map]
static HEARTBEAT: Array<u64> = Array::with_max_entries(HEARTBEAT_SLOTS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers we step over to find the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;

/// Pass without ending the chain: with TCX this is TCX_NEXT, with cls_bpf "continue", so a CNI's
/// programs after ours still run.
const PASS: i32 = TC_ACT_UNSPEC as i32;
const EGRESS: u32 = 0;
const INGRESS: u32 = 1;
/// At most this many bits are flipped in one packet, however many corrupt rules hit it.
const MAX_CORRUPTIONS: u32 = 4;

#[classifier]
pub fn chaos_egress(ctx: TcContext) -> i32 {
    match classify(&ctx, EGRESS) {
        Verdict::Pass => PASS,
        // TC_ACT_SHOT on egress is reported to the sending socket (ENOBUFS, TCP local
        // congestion), which real network loss never is. A redirect to an ifindex that cannot
        // exist frees the packet and tells the stack it was sent. Works under TCX and clsact.
        Verdict::Drop => unsafe { bpf_redirect(u32::MAX, 0) as i32 },
        // Only ingress redirects (egress shaping happens in this device's own root qdisc).
        Verdict::Redirect(_) => PASS,
        // A DNS answer made from the query: into this device's ingress, as if from the server.
        Verdict::Answer => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS) as i32 },
    }
}

#[classifier]
pub fn chaos_ingress(ctx: TcContext) -> i32 {
    match classify(&ctx, INGRESS) {
        Verdict::Pass => PASS,
        // On ingress the sender is elsewhere: a plain drop is invisible to it.
        Verdict::Drop => TC_ACT_SHOT as i32,
        // Into the IFB's egress queue, where our shaping tree holds it; IFB then hands it back
        // to this device's ingress path, skipping tc ingress (so it is not classified twice).
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        // DNS faults act on queries leaving the interface only.
        Verdict::Answer => PASS,
    }
}

/// Ingress shaping on kernels before 6.4, where IFB drops what bpf_redirect hands it: attached
/// after `chaos_ingress` as a classic cls_bpf filter (not direct-action) whose mirred action
/// redirects to the IFB. `chaos_ingress` has already decided and put the packet in one of our
/// classes (skb->priority); this returns -1 (match: run the action) for exactly those, 0 (no
/// match: next filter) for everything else. It parses nothing and counts nothing.
#[classifier]
pub fn chaos_ingress_mirred(ctx: TcContext) -> i32 {
    // SAFETY: `priority` is a readable field of __sk_buff.
    let priority = unsafe { (*ctx.skb.skb).priority };
    if priority >> 16 == SHAPING_MAJOR && priority & 0xFFFF != 0 { -1 } else { 0 }
}

enum Verdict {
    Pass,
    Drop,
    Redirect(u32),
    Answer,
}

const BPF_F_INGRESS: u64 = 1;

/// What the parser learned about one packet. Addresses are kept as the packet has them;
/// `remote`/`local` are chosen by direction when matching.
pub(crate) struct Packet {
    pub(crate) family: u8,
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    pub(crate) protocol: u8,
    /// Host byte order; `None` for non-first fragments and protocols without ports.
    pub(crate) ports: Option<(u16, u16)>,
    /// Offset of the transport payload, for corruption.
    pub(crate) payload_offset: u32,
}

#[inline(always)]
fn classify(ctx: &TcContext, direction: u32) -> Verdict {
    // A GSO super-packet is several packets on the wire: count what a receiver counts.
    // SAFETY: `gso_segs` and `len` are readable fields of __sk_buff.
    let (segments, bytes) = unsafe {
        let skb = ctx.skb.skb;
        let segs = (*skb).gso_segs as u64;
        (if segs == 0 { 1 } else { segs }, (*skb).len as u64)
    };
    if let Some(seen) = SEEN.get_ptr_mut(direction) {
        // SAFETY: a per-CPU slot this CPU owns for the program's run.
        unsafe {
            (*seen).seen += segments;
            (*seen).seen_bytes += bytes;
        }
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    let Some(pkt) = parse(ctx, config.l3_offset) else {
        return Verdict::Pass;
    };
    let Some(s) = scratch() else {
        return Verdict::Pass;
    };
    if !candidates(s, &pkt, direction) {
        return Verdict::Pass;
    }
    // The agent's own control traffic (invariant 3): only candidates pay for this check.
    if is_excluded(&pkt) {
        return Verdict::Pass;
    }
    s.now = unsafe { bpf_ktime_get_ns() };
    s.segments = segments;
    s.bytes = bytes;
    s.direction = direction;
    s.family = pkt.family as u32;
    s.remote = if direction == EGRESS { pkt.dst } else { pkt.src };
    s.protocol = pkt.protocol as u32;
    (s.has_ports, s.sport, s.dport) = match pkt.ports {
        Some((sp, dp)) => (1, sp as u32, dp as u32),
        None => (0, 0, 0),
    };
    s.dns_query = 0;
    s.dropped = 0;
    s.classid = 0;
    s.redirect_ifindex = 0;
    s.dns_rcode = 0;
    s.corruptions = 0;
    s.delay_ns = 0;
    // Only queries leaving the interface are answered or dropped as DNS, and only a packet
    // that may meet a DNS rule pays for parsing one.
    if direction == EGRESS && meets(&s.candidates, SET_DNS) && dns::query(ctx, &pkt) {
        s.dns_query = 1;
    }
    // The rules that lose the packet first, then the others (see the module's doc).
    for phase in 0..2u32 {
        let Some(s) = scratch() else {
            return Verdict::Pass;
        };
        s.phase = phase;
        s.pos = 0;
        // SAFETY: a helper call with a callback that takes no context pointer.
        unsafe {
            bpf_loop(MAX_RULES + RULE_WORDS as u32, visit as *mut c_void, core::ptr::null_mut(), 0);
        }
    }
    // Borrowed afresh: the callbacks wrote to it.
    let Some(s) = scratch() else {
        return Verdict::Pass;
    };
    if s.dropped != 0 {
        return Verdict::Drop;
    }
    let mut verdict = Verdict::Pass;
    if s.dns_rcode != 0 && config.l3_offset == 14 && dns::answer(ctx, config.l3_offset, s.dns_rcode, &pkt).is_some() {
        verdict = Verdict::Answer;
    } else if s.classid != 0 {
        // SAFETY: `priority` is a field of __sk_buff that tc programs may write.
        unsafe { (*ctx.skb.skb).priority = s.classid };
        if direction == INGRESS && s.redirect_ifindex != 0 && config.ingress_via_mirred == 0 {
            verdict = Verdict::Redirect(s.redirect_ifindex);
        }
    } else if s.delay_ns != 0 {
        // Earliest departure time for fq: never earlier than a time the stack already set
        // (TCP pacing), so we only ever add delay.
        let at = s.now + s.delay_ns;
        // SAFETY: `tstamp` is a field of __sk_buff that tc programs may write.
        unsafe {
            let skb = ctx.skb.skb;
            if (*skb).tstamp < at {
                (*skb).tstamp = at;
            }
        }
    }
    let corruptions = s.corruptions;
    let mut i = 0;
    while i < MAX_CORRUPTIONS {
        if i >= corruptions {
            break;
        }
        corrupt(ctx, &pkt);
        i += 1;
    }
    verdict
}

#[inline(always)]
fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: slot 0 of a per-CPU array exists and this CPU owns it for the program's run.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn set(index: u32) -> Option<&'static RuleSet> {
    SETS.get(index)
}

/// Whether any of `candidates` is in the set `index`.
#[inline(always)]
fn meets(candidates: &RuleSet, index: u32) -> bool {
    let Some(other) = set(index) else {
        return false;
    };
    let mut any = 0;
    let mut i = 0;
    while i < RULE_WORDS {
        any |= candidates.words[i] & other.words[i];
        i += 1;
    }
    any != 0
}

/// Fills `s.candidates` with the rules this packet can match by hook, protocol and addresses;
/// false if there are none (the common case for an unmatched packet, which then passes).
#[inline(always)]
fn candidates(s: &mut Scratch, pkt: &Packet, direction: u32) -> bool {
    let (Some(active), Some(hook)) = (set(SET_ACTIVE), set(if direction == EGRESS { SET_EGRESS } else { SET_INGRESS })) else {
        return false;
    };
    let protocol = match pkt.protocol {
        IPPROTO_TCP => SET_TCP,
        IPPROTO_UDP => SET_UDP,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => SET_ICMP,
        _ => SET_OTHER_PROTOCOL,
    };
    let (Some(protocol), Some(any_remote), Some(any_local)) = (set(protocol), set(SET_ANY_REMOTE), set(SET_ANY_LOCAL)) else {
        return false;
    };
    // The remote end is the destination of what we send and the source of what we receive.
    let (remote, local) = if direction == EGRESS { (&pkt.dst, &pkt.src) } else { (&pkt.src, &pkt.dst) };
    let remote = in_cidrs(pkt.family, remote, &REMOTE_V4, &REMOTE_V6);
    let local = in_cidrs(pkt.family, local, &LOCAL_V4, &LOCAL_V6);
    let mut any = 0;
    let mut i = 0;
    while i < RULE_WORDS {
        let mut w = active.words[i] & hook.words[i] & protocol.words[i];
        w &= any_remote.words[i] | remote.map_or(0, |r| r.words[i]);
        w &= any_local.words[i] | local.map_or(0, |l| l.words[i]);
        s.candidates.words[i] = w;
        any |= w;
        i += 1;
    }
    any != 0
}

#[inline(always)]
fn in_cidrs(
    family: u8,
    addr: &[u8; 16],
    v4: &'static LpmTrie<[u8; 4], RuleSet>,
    v6: &'static LpmTrie<[u8; 16], RuleSet>,
) -> Option<&'static RuleSet> {
    if family == FAMILY_V4 {
        let key = Key::new(32, [addr[0], addr[1], addr[2], addr[3]]);
        v4.get(&key)
    } else {
        v6.get(&Key::new(128, *addr))
    }
}

/// One step of the rule walk: skips an empty word of candidates, or visits the next candidate
/// rule of this phase. Returns 1 when the walk is done.
#[inline(never)]
extern "C" fn visit(_index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let pos = s.pos;
    if pos >= MAX_RULES as u64 {
        return 1;
    }
    let word = s.candidates.words[(pos / 64) as usize & (RULE_WORDS - 1)] >> (pos % 64);
    if word == 0 {
        s.pos = (pos | 63) + 1;
        return 0;
    }
    let slot = pos + trailing_zeros(word);
    s.pos = slot + 1;
    let Some(drops) = set(SET_DROPS) else {
        return 1;
    };
    let dropping = drops.contains(slot as u32);
    if dropping == (s.phase == 0) {
        apply(s, slot as u32);
    }
    0
}

/// Trailing zeros of a non-zero word (BPF has no instruction for it).
#[inline(always)]
fn trailing_zeros(mut w: u64) -> u64 {
    let mut n = 0;
    if w & 0xFFFF_FFFF == 0 {
        n += 32;
        w >>= 32;
    }
    if w & 0xFFFF == 0 {
        n += 16;
        w >>= 16;
    }
    if w & 0xFF == 0 {
        n += 8;
        w >>= 8;
    }
    if w & 0xF == 0 {
        n += 4;
        w >>= 4;
    }
    if w & 0x3 == 0 {
        n += 2;
        w >>= 2;
    }
    if w & 0x1 == 0 {
        n += 1;
    }
    n
}

/// Whether the rule still acts at `now`: before its deadline, and while its owner's heartbeat
/// is fresh. The kernel ends a fault by itself, so a killed or frozen owner cannot keep it on.
#[inline(always)]
fn live(rule: &Rule, now: u64) -> bool {
    if now >= rule.deadline_ns {
        return false;
    }
    match HEARTBEAT.get(rule.heartbeat_slot) {
        // A beat stamped a moment "after" now on another CPU is fresh.
        Some(beat) => now.saturating_sub(*beat) < HEARTBEAT_BOUND_NS,
        None => false,
    }
}

/// One candidate rule: the rest of its target, its counters, its draw, and its part of the
/// outcome.
#[inline(always)]
fn apply(s: &mut Scratch, slot: u32) {
    let Some(rule) = RULES.get(slot) else {
        return;
    };
    if !live(rule, s.now) {
        return;
    }
    if rule.match_flags & MATCH_PORTS != 0 {
        if s.has_ports == 0 {
            return;
        }
        // SAFETY: a lookup; the value is only read here.
        let Some(ports) = (unsafe { PORTS.get(&slot) }) else {
            return;
        };
        if !ports.contains(s.sport as u16) && !ports.contains(s.dport as u16) {
            return;
        }
    }
    let Some(c) = COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a per-CPU slot this CPU owns for the program's run.
    let c = unsafe { &mut *c };
    c.matched += s.segments;
    c.matched_bytes += s.bytes;
    if rule.action == ACTION_NONE || s.dropped != 0 {
        return;
    }
    if rule.action == ACTION_DNS {
        // Only a standard query whose name matches is the rule's to act on.
        if s.dns_query == 0 || (rule.match_flags & MATCH_DNS_NAMES != 0 && !dns::names_contain(slot)) {
            return;
        }
    }
    let threshold = if c.last_affected != 0 { rule.probability_after_hit } else { rule.probability_after_miss };
    let hit = (unsafe { bpf_get_prandom_u32() } as u64) < threshold;
    c.last_affected = hit as u64;
    if !hit {
        return;
    }
    let affected = match rule.action {
        ACTION_DROP => {
            s.dropped = 1;
            true
        }
        // TCP: queries are dropped in every mode (answering would mean forging a TCP stream).
        ACTION_DNS if rule.dns_rcode == 0 || s.protocol == IPPROTO_TCP as u32 => {
            s.dropped = 1;
            true
        }
        ACTION_DNS if s.dns_rcode == 0 => {
            s.dns_rcode = rule.dns_rcode;
            true
        }
        ACTION_STEER if s.classid == 0 && s.delay_ns == 0 => {
            s.classid = rule.classid;
            s.redirect_ifindex = rule.redirect_ifindex;
            true
        }
        ACTION_DELAY if s.classid == 0 && s.delay_ns == 0 => {
            s.delay_ns = delay_of(s, slot, rule);
            true
        }
        ACTION_CORRUPT if s.corruptions < MAX_CORRUPTIONS => {
            s.corruptions += 1;
            true
        }
        _ => false,
    };
    if affected {
        c.affected += s.segments;
        c.affected_bytes += s.bytes;
    }
}

/// The rule's delay for this packet's remote address: the one stored with the longest of its
/// per-destination CIDRs that contains it, else the rule's own.
#[inline(always)]
fn delay_of(s: &Scratch, slot: u32, rule: &Rule) -> u64 {
    let [hi, lo] = (slot as u16).to_be_bytes();
    let a = &s.remote;
    let us = if s.family == FAMILY_V4 as u32 {
        let key = Key::new(48, [hi, lo, a[0], a[1], a[2], a[3]]);
        DELAY_V4.get(&key).copied()
    } else {
        let mut k = [0u8; 18];
        k[0] = hi;
        k[1] = lo;
        let mut i = 0;
        while i < 16 {
            k[i + 2] = a[i];
            i += 1;
        }
        DELAY_V6.get(&Key::new(144, k)).copied()
    };
    match us {
        Some(us) if us != 0 => us as u64 * 1000,
        _ => rule.delay_ns,
    }
}

#[inline(always)]
fn is_excluded(pkt: &Packet) -> bool {
    let Some((sport, dport)) = pkt.ports else {
        return false;
    };
    let src = Endpoint { addr: pkt.src, port: sport, family: pkt.family, _pad: 0 };
    let dst = Endpoint { addr: pkt.dst, port: dport, family: pkt.family, _pad: 0 };
    unsafe { EXCLUDED.get(&src).is_some() || EXCLUDED.get(&dst).is_some() }
}

#[inline(always)]
fn parse(ctx: &TcContext, l3: u32) -> Option<Packet> {
    let l3 = l3 as usize;
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let mut pkt = Packet {
        family: 0,
        src: [0; 16],
        dst: [0; 16],
        protocol: 0,
        ports: None,
        payload_offset: 0,
    };
    let l4;
    let mut first_fragment = true;
    if ethertype == ETH_P_IP {
        pkt.family = FAMILY_V4;
        let vihl: u8 = ctx.load(l3).ok()?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        let frag: u16 = u16::from_be(ctx.load(l3 + 6).ok()?);
        first_fragment = frag & 0x1fff == 0;
        pkt.protocol = ctx.load(l3 + 9).ok()?;
        let src: [u8; 4] = ctx.load(l3 + 12).ok()?;
        let dst: [u8; 4] = ctx.load(l3 + 16).ok()?;
        pkt.src[..4].copy_from_slice(&src);
        pkt.dst[..4].copy_from_slice(&dst);
        l4 = l3 + ihl;
    } else if ethertype == ETH_P_IPV6 {
        pkt.family = FAMILY_V6;
        let mut next: u8 = ctx.load(l3 + 6).ok()?;
        pkt.src = ctx.load(l3 + 8).ok()?;
        pkt.dst = ctx.load(l3 + 24).ok()?;
        let mut off = l3 + 40;
        // A bounded walk over extension headers (the verifier needs the bound).
        let mut i = 0;
        while i < 4 {
            match next {
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                    let hdr: [u8; 2] = ctx.load(off).ok()?;
                    next = hdr[0];
                    off += (hdr[1] as usize + 1) * 8;
                }
                IPV6_FRAGMENT => {
                    let hdr: [u8; 4] = ctx.load(off).ok()?;
                    next = hdr[0];
                    first_fragment = u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 == 0;
                    off += 8;
                }
                _ => break,
            }
            i += 1;
        }
        pkt.protocol = next;
        l4 = off;
    } else {
        return None;
    }
    pkt.payload_offset = l4 as u32;
    if !first_fragment {
        return Some(pkt);
    }
    match pkt.protocol {
        IPPROTO_TCP => {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            pkt.ports = Some(port_pair(ports));
            let doff: u8 = ctx.load(l4 + 12).ok()?;
            pkt.payload_offset = (l4 + ((doff >> 4) as usize) * 4) as u32;
        }
        IPPROTO_UDP => {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            pkt.ports = Some(port_pair(ports));
            pkt.payload_offset = (l4 + 8) as u32;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => pkt.payload_offset = (l4 + 8) as u32,
        _ => {}
    }
    Some(pkt)
}

#[inline(always)]
fn port_pair(b: [u8; 4]) -> (u16, u16) {
    (u16::from_be_bytes([b[0], b[1]]), u16::from_be_bytes([b[2], b[3]]))
}

/// Flips one random bit of the transport payload. Headers are left alone so the packet still
/// reaches its flow. Checksums are not fixed up: where the checksum is already final (forwarded
/// or received packets) the receiver's stack drops the packet, as it would drop a packet damaged
/// on the wire; where checksum offload computes it later (locally sent packets) the damage
/// reaches the receiving application. Returns whether a bit was flipped (no payload, no flip).
#[inline(always)]
fn corrupt(ctx: &TcContext, pkt: &Packet) -> bool {
    let len = ctx.len();
    if len <= pkt.payload_offset {
        return false;
    }
    let span = len - pkt.payload_offset;
    let r = unsafe { bpf_get_prandom_u32() };
    let off = (pkt.payload_offset + (r >> 3) % span) as usize;
    let Ok(byte) = ctx.load::<u8>(off) else {
        return false;
    };
    let flipped = byte ^ (1u8 << (r & 7));
    ctx.store(off, &flipped, 0).is_ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
