//! DNS failure in the datapath: find the QNAME of a query leaving the interface, match it
//! against the fault's patterns, and drop the query or turn it into the answer in place.
//!
//! Only well-formed standard queries are touched (QR 0, opcode QUERY, one question, no answer
//! or authority records, an uncompressed QNAME that ends inside the packet, followed by its type
//! and class); anything else passes untouched, so a malformed or unusual packet is never
//! answered in the server's name.
use aya_ebpf::{
    helpers::generated::bpf_skb_load_bytes,
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use chaos_abi::{
    DNS_EXACT, DNS_NAME_MAX, DNS_WILDCARD, DnsKey, DnsScratch, FAMILY_V4, FNV_OFFSET,
    MATCH_DNS_NAMES, MAX_DNS_PATTERNS, Rule, dns_hash_step,
};

use crate::{IPPROTO_TCP, IPPROTO_UDP, Packet};

#[map]
static DNS_NAMES: HashMap<DnsKey, u8> = HashMap::with_max_entries(MAX_DNS_PATTERNS, 0);
#[map]
static DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

const DNS_HEADER: usize = 12;
/// Labels we walk at most: a 255-byte name has at most 127.
const MAX_LABELS: usize = 128;
/// bpf_l4_csum_replace: the field is 2 bytes; a zero UDP checksum (IPv4: none) stays zero.
const CSUM_2_BYTES: u64 = 2;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

pub enum Action {
    Pass,
    Drop,
    /// The packet is now the answer: send it to this interface's ingress.
    Answer,
}

#[inline(always)]
pub fn act(ctx: &TcContext, rule: &Rule, pkt: &Packet) -> Action {
    match query_matches(ctx, rule, pkt) {
        Some(true) => {}
        _ => return Action::Pass,
    }
    // TCP: queries are dropped in every mode (answering would mean forging a TCP stream).
    if rule.dns_rcode == 0 || pkt.protocol == IPPROTO_TCP {
        return Action::Drop;
    }
    // Answering needs an Ethernet header to turn around; L3 devices pass.
    if rule.l3_offset != 14 {
        return Action::Pass;
    }
    if answer(ctx, rule, pkt).is_some() {
        Action::Answer
    } else {
        Action::Pass
    }
}

/// An index into the scratch arrays that the compiler cannot turn into a pointer walking past
/// them (the verifier checks every access against the array's bounds, and a strength-reduced
/// pointer loop loses the mask).
#[inline(always)]
fn idx(i: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&i) & (DNS_NAME_MAX - 1) }
}

/// `Some(true)` if the packet is a standard query whose QNAME matches the rule.
#[inline(always)]
fn query_matches(ctx: &TcContext, rule: &Rule, pkt: &Packet) -> Option<bool> {
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
    // SAFETY: the buffer is DNS_NAME_MAX bytes and 5 <= n <= DNS_NAME_MAX.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            qname as u32,
            scratch.name.as_mut_ptr().cast(),
            (n as u32) & 0x1FF,
        )
    };
    if ret != 0 {
        return None;
    }
    // Walk the labels to the root: the name's length in wire form.
    let mut end = 0usize;
    let mut found_root = false;
    for _ in 0..MAX_LABELS {
        let len = scratch.name[idx(end)] as usize;
        if len == 0 {
            found_root = true;
            break;
        }
        // Compression pointers (0xC0) and reserved label types: not in a query's question.
        if len > 63 {
            return None;
        }
        end += len + 1;
        if end >= n {
            return None;
        }
    }
    if !found_root {
        return None;
    }
    scratch.qlen = (end + 1) as u64;
    // SAFETY: a plain read of the field just written; volatile so it is really re-read.
    let qlen = unsafe { core::ptr::read_volatile(&scratch.qlen) } as usize;
    if qlen == 0 || qlen > DNS_NAME_MAX {
        return None;
    }
    // QTYPE and QCLASS must follow inside the packet.
    if qlen + 4 > avail {
        return None;
    }
    if rule.match_flags & MATCH_DNS_NAMES == 0 {
        return Some(true);
    }
    // The hash of every suffix, in one pass from the root byte backwards.
    let mut hash = FNV_OFFSET;
    let mut i = qlen;
    for _ in 0..DNS_NAME_MAX {
        if i == 0 {
            break;
        }
        i -= 1;
        let at = idx(i);
        hash = dns_hash_step(hash, scratch.name[at]);
        scratch.suffix_hash[at] = hash;
    }
    // The whole name against exact patterns, then each proper suffix against wildcards.
    let mut start = 0usize;
    for _ in 0..MAX_LABELS {
        let at = idx(start);
        let key = DnsKey {
            hash: scratch.suffix_hash[at],
            len: (qlen - start) as u32,
            kind: if start == 0 { DNS_EXACT } else { DNS_WILDCARD },
        };
        // SAFETY: a lookup; the value is not kept.
        if unsafe { DNS_NAMES.get(&key) }.is_some() {
            return Some(true);
        }
        let len = scratch.name[at] as usize;
        if len == 0 {
            break;
        }
        start += len + 1;
        if start >= qlen {
            break;
        }
    }
    Some(false)
}

/// Rewrites the query into its answer: the header gets QR, RA and the RCODE (opcode, RD and
/// CD kept; the question and any EDNS OPT record stay, as a server echoes them), addresses,
/// ports and MACs are swapped. Swapping leaves both checksums as they were (one's complement
/// sums commute); only the flags word needs a checksum update.
#[inline(always)]
fn answer(ctx: &TcContext, rule: &Rule, pkt: &Packet) -> Option<()> {
    let l4 = pkt.payload_offset as usize - 8;
    let flags_at = pkt.payload_offset as usize + 2;
    let old: [u8; 2] = ctx.load(flags_at).ok()?;
    let old_flags = u16::from_be_bytes(old);
    let new_flags = 0x8000 | (old_flags & 0x7910) | 0x0080 | (rule.dns_rcode as u16 & 0xF);
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
    let l3 = rule.l3_offset as usize;
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
