//! DNS failure in the datapath: find the QNAME of a query leaving the interface, gather the
//! rules whose patterns match it, and (once the rules have decided) turn it into the answer in
//! place.
//!
//! Only well-formed standard queries are touched (QR 0, opcode QUERY, one question, no answer
//! or authority records, an uncompressed QNAME that ends inside the packet, followed by its type
//! and class); anything else passes untouched, so a malformed or unusual packet is never
//! answered in the server's name.
use aya_ebpf::{
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use chaos_abi::{
    DNS_EXACT, DNS_NAME_MAX, DNS_WILDCARD, DnsKey, DnsScratch, FAMILY_V4, FNV_OFFSET, MAX_DNS_PATTERNS, RULE_WORDS, RuleSet,
    dns_hash_step,
};

use crate::{IPPROTO_TCP, IPPROTO_UDP, Packet};

#[map]
static DNS_NAMES: HashMap<DnsKey, RuleSet> = HashMap::with_max_entries(MAX_DNS_PATTERNS, 0);
#[map]
static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

const DNS_HEADER: usize = 12;
/// Labels we walk at most: a 255-byte name has at most 127.
const MAX_LABELS: usize = 128;
/// bpf_l4_csum_replace: the field is 2 bytes; a zero UDP checksum (IPv4: none) stays zero.
const CSUM_2_BYTES: u64 = 2;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Whether the packet is a standard query. If so, [`names_contain`] then answers for each rule
/// whether its patterns match the QNAME (exact, or `*.suffix` for any of its suffixes).
#[inline(always)]
pub fn query(ctx: &TcContext, pkt: &Packet) -> bool {
    query_names(ctx, pkt).is_some()
}

/// Whether rule `slot`'s patterns matched the name of the query [`query`] last accepted.
#[inline(always)]
pub fn names_contain(slot: u32) -> bool {
    scratch().is_some_and(|s| s.names.contains(slot))
}

#[inline(always)]
fn query_names(ctx: &TcContext, pkt: &Packet) -> Option<()> {
    let mut off = pkt.payload_offset as usize;
    match pkt.protocol {
        IPPROTO_UDP => {}
        // The 2-byte length prefix of DNS over TCP.
        IPPROTO_TCP => off += 2,
        _ => return None,
    }
    let hdr: [u8; DNS_HEADER] = ctx.load(off).ok()?;
    let flags = u16::from_be_bytes([hdr[2], hdr[3]]);
    // QR (response) or an opcode other than QUERY.
    if flags & 0xF800 != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([hdr[i], hdr[i + 1]]);
    if count(4) != 1 || count(6) != 0 || count(8) != 0 {
        return None;
    }
    let qname = off + DNS_HEADER;
    let avail = (ctx.len() as usize).checked_sub(qname)?;
    // The root label, QTYPE and QCLASS at least.
    if avail < 5 {
        return None;
    }
    let n = if avail > DNS_NAME_MAX { DNS_NAME_MAX } else { avail };
    let scratch = DNS_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: slot 0 of a per-CPU array exists and this CPU owns it for the program's run.
    let scratch = unsafe { &mut *scratch };
    // The length as the verifier needs to see it: 1..=256 by construction. Read through a
    // volatile so the compiler keeps the mask it would otherwise prove redundant (6.1 rejects
    // the unmasked value, whose signed range it cannot bound).
    // SAFETY: a read of a local.
    let len = ((unsafe { core::ptr::read_volatile(&n) } as u32).wrapping_sub(1) & 0xFF) + 1;
    // SAFETY: the buffer is DNS_NAME_MAX (256) bytes and 1 <= len <= 256.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            qname as u32,
            scratch.name.as_mut_ptr().cast(),
            len,
        )
    };
    if ret != 0 {
        return None;
    }
    // Walk the labels to the root: the name's length in wire form. Each loop is a bpf_loop
    // callback with its state in the scratch map (see `DnsScratch`), which the verifier checks
    // once rather than once per iteration and per path into it.
    scratch.pos = 0;
    scratch.limit = n as u64;
    scratch.status = WALKING;
    run(MAX_LABELS, walk_label);
    // Borrowed afresh after each loop: the callbacks wrote to it.
    let scratch = self::scratch()?;
    if scratch.status != ROOT_FOUND {
        return None;
    }
    let qlen = scratch.pos as usize + 1;
    if qlen > DNS_NAME_MAX {
        return None;
    }
    // QTYPE and QCLASS must follow inside the packet.
    if qlen + 4 > avail {
        return None;
    }
    // The hash of every suffix, in one pass from the root byte backwards.
    scratch.pos = qlen as u64;
    scratch.hash = FNV_OFFSET;
    run(DNS_NAME_MAX, hash_byte);
    let scratch = self::scratch()?;
    // The whole name against exact patterns, then each shorter suffix against wildcards.
    scratch.pos = 0;
    scratch.limit = qlen as u64;
    scratch.status = WALKING;
    let mut i = 0;
    while i < RULE_WORDS {
        scratch.names.words[i] = 0;
        i += 1;
    }
    run(MAX_LABELS, find_suffix);
    Some(())
}

const WALKING: u64 = 0;
const ROOT_FOUND: u64 = 1;
const MALFORMED: u64 = 2;

type Step = extern "C" fn(u32, *mut c_void) -> i64;

#[inline(always)]
fn run(times: usize, step: Step) {
    // SAFETY: a helper call with one of the callbacks below; they take no context pointer.
    unsafe { bpf_loop(times as u32, step as *mut c_void, core::ptr::null_mut(), 0) };
}

#[inline(always)]
fn scratch() -> Option<&'static mut DnsScratch> {
    // SAFETY: slot 0 of a per-CPU array exists and this CPU owns it for the program's run.
    DNS_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// One label of the walk to the root (`pos`: the current length byte). Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_label(_index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let len = s.name[s.pos as usize & (DNS_NAME_MAX - 1)] as u64;
    if len == 0 {
        s.status = ROOT_FOUND;
        return 1;
    }
    // Compression pointers (0xC0) and reserved label types: not in a query's question.
    if len > 63 {
        s.status = MALFORMED;
        return 1;
    }
    s.pos += len + 1;
    if s.pos >= s.limit {
        s.status = MALFORMED;
        return 1;
    }
    0
}

/// One byte of the backwards hash (`pos`: bytes still to hash); stores the hash of the suffix
/// that starts there.
#[inline(never)]
extern "C" fn hash_byte(_index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    if s.pos == 0 {
        return 1;
    }
    s.pos -= 1;
    let at = s.pos as usize & (DNS_NAME_MAX - 1);
    s.hash = dns_hash_step(s.hash, s.name[at]);
    s.suffix_hash[at] = s.hash;
    0
}

/// One suffix lookup (`pos`: where it starts, `limit`: the name's length): the whole name as
/// an exact pattern, each shorter suffix as a wildcard; the rules of every pattern found are
/// gathered in `names`.
#[inline(never)]
extern "C" fn find_suffix(_index: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else {
        return 1;
    };
    let at = s.pos as usize & (DNS_NAME_MAX - 1);
    let key = DnsKey {
        hash: s.suffix_hash[at],
        len: s.limit.wrapping_sub(s.pos) as u32,
        kind: if s.pos == 0 { DNS_EXACT } else { DNS_WILDCARD },
    };
    // SAFETY: a lookup; the value is copied out at once.
    if let Some(rules) = unsafe { DNS_NAMES.get(&key) } {
        let mut i = 0;
        while i < RULE_WORDS {
            s.names.words[i] |= rules.words[i];
            i += 1;
        }
    }
    let len = s.name[at] as u64;
    if len == 0 {
        return 1;
    }
    s.pos += len + 1;
    if s.pos >= s.limit {
        return 1;
    }
    0
}

/// Rewrites the query into its answer: the header gets QR, RA and the RCODE (opcode, RD and
/// CD kept; the question and any EDNS OPT record stay, as a server echoes them), addresses,
/// ports and MACs are swapped. Swapping leaves both checksums as they were (one's complement
/// sums commute); only the flags word needs a checksum update.
#[inline(always)]
pub fn answer(ctx: &TcContext, l3_offset: u32, rcode: u32, pkt: &Packet) -> Option<()> {
    let l4 = pkt.payload_offset as usize - 8;
    let flags_at = pkt.payload_offset as usize + 2;
    let old: [u8; 2] = ctx.load(flags_at).ok()?;
    let old_flags = u16::from_be_bytes(old);
    let new_flags = 0x8000 | (old_flags & 0x7910) | 0x0080 | (rcode as u16 & 0xF);
    let new = new_flags.to_be_bytes();
    ctx.store(flags_at, &new, 0).ok()?;
    ctx.l4_csum_replace(
        l4 + 6,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        CSUM_2_BYTES | BPF_F_MARK_MANGLED_0,
    )
    .ok()?;
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    ctx.store(l4, &[ports[2], ports[3], ports[0], ports[1]], 0).ok()?;
    let l3 = l3_offset as usize;
    if pkt.family == FAMILY_V4 {
        let addrs: [u8; 8] = ctx.load(l3 + 12).ok()?;
        let mut swapped = [0u8; 8];
        swapped[..4].copy_from_slice(&addrs[4..]);
        swapped[4..].copy_from_slice(&addrs[..4]);
        ctx.store(l3 + 12, &swapped, 0).ok()?;
    } else {
        ctx.store(l3 + 8, &pkt.dst, 0).ok()?;
        ctx.store(l3 + 24, &pkt.src, 0).ok()?;
    }
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).ok()?;
    Some(())
}
