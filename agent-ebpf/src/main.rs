//! The chaos datapath: one TC classifier family that decides whether a packet matches a fault's
//! target and, if so, acts on it (drop or corrupt).
//!
//! One copy of this object is loaded per fault, so every map below belongs to exactly one fault
//! and a packet that matches nothing pays a fixed number of map lookups however many CIDRs or
//! ports the fault lists (LPM tries and a port bitmap).
#![no_std]
#![no_main]

mod dns;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use chaos_abi::{
    ACTION_CORRUPT, ACTION_DELAY, ACTION_DNS, ACTION_DROP, ACTION_NONE, ACTION_STEER, CpuState, Endpoint, FAMILY_V4, FAMILY_V6,
    HEARTBEAT_BOUND_NS, HEARTBEAT_SLOTS, MATCH_LOCAL, MATCH_PORTS, MATCH_REMOTE, MAX_CIDRS, MAX_EXCLUDED, PROTO_ALL, PROTO_ICMP,
    PortBitmap, Rule,
};

#[map]
static RULE: Array<Rule> = Array::with_max_entries(1, 0);
#[map]
static PORTS: Array<PortBitmap> = Array::with_max_entries(1, 0);
#[map]
static REMOTE_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static REMOTE_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static LOCAL_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static LOCAL_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map]
static EXCLUDED: HashMap<Endpoint, u8> = HashMap::with_max_entries(MAX_EXCLUDED, 0);
#[map]
static STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);
/// CLOCK_MONOTONIC ns of each owner's last heartbeat (see `Rule::heartbeat_slot`).
#[map]
static HEARTBEAT: Array<u64> = Array::with_max_entries(HEARTBEAT_SLOTS, 0);

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

#[classifier]
pub fn chaos_egress(ctx: TcContext) -> i32 {
    egress(&ctx, classify::<false>(&ctx, Direction::Egress))
}

/// `chaos_egress` with the DNS matcher: a program of its own, so the other faults' classifier
/// carries none of its code (it needs bpf_loop, Linux 5.17).
#[classifier]
pub fn chaos_dns(ctx: TcContext) -> i32 {
    egress(&ctx, classify::<true>(&ctx, Direction::Egress))
}

#[inline(always)]
fn egress(ctx: &TcContext, verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => PASS,
        // TC_ACT_SHOT on egress is reported to the sending socket (ENOBUFS, TCP local
        // congestion), which real network loss never is. A redirect to an ifindex that cannot
        // exist frees the packet and tells the stack it was sent. Works under TCX and clsact.
        Verdict::Drop => unsafe { bpf_redirect(u32::MAX, 0) as i32 },
        // Only ingress redirects (egress shaping happens in this device's own root qdisc).
        Verdict::Redirect(_) => PASS,
        // A DNS answer made from the query: into this device's ingress, as if from the server.
        Verdict::Answer => unsafe {
            bpf_redirect((*ctx.skb.skb).ifindex, BPF_F_INGRESS) as i32
        },
    }
}

#[classifier]
pub fn chaos_ingress(ctx: TcContext) -> i32 {
    match classify::<false>(&ctx, Direction::Ingress) {
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
/// as a classic cls_bpf filter (not direct-action) whose mirred action redirects what this
/// program matches to the IFB. Returns -1 (match: run the filter's action) for a packet to
/// shape, 0 (no match: go on to the next filter) for everything else.
#[classifier]
pub fn chaos_ingress_mirred(ctx: TcContext) -> i32 {
    match classify::<false>(&ctx, Direction::Ingress) {
        Verdict::Redirect(_) => -1,
        _ => 0,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Egress,
    Ingress,
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

/// `DNS`: whether this program carries the DNS matcher (`chaos_dns` only).
#[inline(always)]
fn classify<const DNS: bool>(ctx: &TcContext, direction: Direction) -> Verdict {
    let Some(state) = STATE.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: per-CPU array slot 0 exists (max_entries 1) and this CPU owns it.
    let state = unsafe { &mut *state };
    // A GSO super-packet is several packets on the wire: count what a receiver counts.
    // SAFETY: `gso_segs` and `len` are readable fields of __sk_buff.
    let (segments, bytes) = unsafe {
        let skb = ctx.skb.skb;
        let segs = (*skb).gso_segs as u64;
        (if segs == 0 { 1 } else { segs }, (*skb).len as u64)
    };
    state.seen += segments;
    state.seen_bytes += bytes;
    let Some(rule) = RULE.get(0) else {
        return Verdict::Pass;
    };
    let Some(pkt) = parse(ctx, rule.l3_offset) else {
        return Verdict::Pass;
    };
    // The remote CIDR's value: a per-destination delay in microseconds (0: the rule's).
    let Some(remote_value) = matches(rule, &pkt, direction) else {
        return Verdict::Pass;
    };
    // Only a matched packet pays for the clock: unmatched ones pass above.
    let now = unsafe { bpf_ktime_get_ns() };
    if !live(rule, now) {
        return Verdict::Pass;
    }
    state.matched += segments;
    state.matched_bytes += bytes;
    if rule.action == ACTION_NONE {
        return Verdict::Pass;
    }

    let threshold = if state.last_affected != 0 {
        rule.probability_after_hit
    } else {
        rule.probability_after_miss
    };
    let hit = (unsafe { bpf_get_prandom_u32() } as u64) < threshold;
    state.last_affected = hit as u64;
    if !hit {
        return Verdict::Pass;
    }
    match rule.action {
        ACTION_DROP => {
            affect(state, segments, bytes);
            Verdict::Drop
        }
        ACTION_STEER => {
            // SAFETY: `priority` is a field of __sk_buff that tc programs may write.
            unsafe { (*ctx.skb.skb).priority = rule.classid };
            affect(state, segments, bytes);
            if direction == Direction::Ingress && rule.redirect_ifindex != 0 {
                return Verdict::Redirect(rule.redirect_ifindex);
            }
            Verdict::Pass
        }
        ACTION_DELAY => {
            let delay = if remote_value != 0 { remote_value as u64 * 1000 } else { rule.delay_ns };
            // Earliest departure time for fq: never earlier than a time the stack already set
            // (TCP pacing), so we only ever add delay.
            let at = now + delay;
            // SAFETY: `tstamp` is a field of __sk_buff that tc programs may write.
            unsafe {
                let skb = ctx.skb.skb;
                if (*skb).tstamp < at {
                    (*skb).tstamp = at;
                }
            }
            affect(state, segments, bytes);
            Verdict::Pass
        }
        ACTION_DNS if DNS => match dns::act(ctx, rule, &pkt) {
            dns::Action::Pass => Verdict::Pass,
            dns::Action::Drop => {
                affect(state, segments, bytes);
                Verdict::Drop
            }
            dns::Action::Answer => {
                affect(state, segments, bytes);
                Verdict::Answer
            }
        },
        ACTION_CORRUPT => {
            if corrupt(ctx, &pkt) {
                affect(state, segments, bytes);
            }
            Verdict::Pass
        }
        _ => Verdict::Pass,
    }
}

#[inline(always)]
fn affect(state: &mut CpuState, segments: u64, bytes: u64) {
    state.affected += segments;
    state.affected_bytes += bytes;
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

/// `Some(value of the remote CIDR, 0 if the rule has none)` when the packet matches.
#[inline(always)]
fn matches(rule: &Rule, pkt: &Packet, direction: Direction) -> Option<u32> {
    if rule.protocol != PROTO_ALL {
        let proto = match pkt.protocol {
            IPPROTO_ICMP | IPPROTO_ICMPV6 => PROTO_ICMP,
            p => p as u32,
        };
        if proto != rule.protocol {
            return None;
        }
    }
    // The remote end is the destination of what we send and the source of what we receive.
    let (remote, local) = match direction {
        Direction::Egress => (&pkt.dst, &pkt.src),
        Direction::Ingress => (&pkt.src, &pkt.dst),
    };
    let mut remote_value = 0;
    if rule.match_flags & MATCH_REMOTE != 0 {
        remote_value = in_cidrs(pkt.family, remote, &REMOTE_V4, &REMOTE_V6)?;
    }
    if rule.match_flags & MATCH_LOCAL != 0 {
        in_cidrs(pkt.family, local, &LOCAL_V4, &LOCAL_V6)?;
    }
    if rule.match_flags & MATCH_PORTS != 0 {
        let (sport, dport) = pkt.ports?;
        let ports = PORTS.get(0)?;
        if !ports.contains(sport) && !ports.contains(dport) {
            return None;
        }
    }
    if is_excluded(pkt) { None } else { Some(remote_value) }
}

#[inline(always)]
fn in_cidrs(
    family: u8,
    addr: &[u8; 16],
    v4: &LpmTrie<[u8; 4], u32>,
    v6: &LpmTrie<[u8; 16], u32>,
) -> Option<u32> {
    if family == FAMILY_V4 {
        let key = Key::new(32, [addr[0], addr[1], addr[2], addr[3]]);
        v4.get(&key).copied()
    } else {
        v6.get(&Key::new(128, *addr)).copied()
    }
}

/// The agent's own control traffic (invariant 3). Only matched packets pay for this check.
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
