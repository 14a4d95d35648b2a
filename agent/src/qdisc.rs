//! Shaping faults (latency, bandwidth, reorder, duplicate): an HTB root qdisc with our reserved
//! handle, one class per fault (`c4a0:N`), and for netem kinds a netem leaf under it. The
//! classifier steers matched packets into its fault's class by setting skb->priority to the
//! class id (HTB classifies by priority first); everything else is unclassified, which HTB
//! sends straight through its direct queue with no shaping and no delay. EDT faults share an
//! fq root instead (nothing per fault: the classifier sets each packet's departure time).
//!
//! The device is the target interface for egress, or the IFB device that ingress traffic is
//! redirected through. A root the kernel created by default (handle 0: noqueue, pfifo_fast,
//! mq, fq_codel) is replaced, and deleting ours gives the device its default back. A root
//! someone else configured (a CNI's) is replaced only when asked (`--force`), after a
//! [`Snapshot`] of its whole tree, which is restored when ours goes.
use crate::netem_dist::Distribution;
use crate::netlink::{
    self, RTM_DELQDISC, RTM_DELTCLASS, RTM_NEWQDISC, RTM_NEWTCLASS, TC_H_ROOT, TCA_OPTIONS,
    TcRequest,
};
pub use crate::tc_snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use std::io;

/// `c4a0:` — our root.
pub const ROOT_HANDLE: u32 = 0xC4A0_0000;
/// Majors `c4a1:` and up: the netem leaf under each fault's class.
const LEAF_MAJOR_BASE: u32 = 0xC4A1;
/// Shaping faults one engine can hold at once (a leaf major each, up to `ffff:`).
pub const MAX_SLOTS: u16 = (0x1_0000 - LEAF_MAJOR_BASE) as u16;

/// `c4a0:N` — the class of the fault in slot N-1: the classifier's steering target.
pub fn classid(slot: u16) -> u32 {
    ROOT_HANDLE | (u32::from(slot) + 1)
}

/// The netem leaf under the class of `slot`.
fn leaf_handle(slot: u16) -> u32 {
    (LEAF_MAJOR_BASE + u32::from(slot)) << 16
}

/// What the shaped class does to the packets steered into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    Netem(Netem),
    /// Bytes per second.
    Rate(u64),
    /// An fq root that holds packets until the departure time the classifier set (EDT).
    Fq,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Netem {
    pub latency_ns: u64,
    pub jitter_ns: u64,
    /// Percent.
    pub delay_correlation: f64,
    pub distribution: Option<Distribution>,
    /// Percent of packets sent at once instead of after the delay (so they overtake).
    pub reorder: f64,
    pub reorder_correlation: f64,
    /// Percent of packets sent twice.
    pub duplicate: f64,
    /// Packets netem may hold; enough for long delays at high rates.
    pub limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(
        "the root qdisc of {interface} is {kind} {handle}, not ours; chaos replaces another tool's root qdisc only with --force (it is snapshotted and restored exactly on revert)"
    )]
    Foreign {
        interface: String,
        kind: String,
        handle: String,
    },
    #[error(
        "{interface} carries another chaos process's root qdisc (c4a0:); revert its faults first"
    )]
    Busy { interface: String },
    #[error(
        "{interface} already carries {have} shaping faults; a {want} one cannot share its root qdisc (revert them first)"
    )]
    Mixed {
        interface: String,
        have: &'static str,
        want: &'static str,
    },
    #[error(
        "the root qdisc tree of {interface} cannot be restored exactly ({reason}), so --force does not replace it"
    )]
    Unrestorable { interface: String, reason: String },
    #[error(
        "the root qdisc tree of {interface} changed while the fault was being applied; nothing was replaced"
    )]
    Changed { interface: String },
    #[error(
        "sch_{kind} is missing from this kernel: modprobe sch_{kind}, or install the distro's extra kernel modules package"
    )]
    Missing { kind: &'static str },
    #[error("{context}: {source}")]
    Kernel { context: String, source: io::Error },
}

fn kernel(context: impl Into<String>) -> impl FnOnce(io::Error) -> ShapeError {
    let context = context.into();
    move |source| ShapeError::Kernel { context, source }
}

/// Percent as netem's u32 fraction of 2^32-1.
fn fraction(percent: f64) -> u32 {
    ((percent / 100.0).clamp(0.0, 1.0) * u32::MAX as f64).round() as u32
}

/// TCA_OPTIONS for netem: `struct tc_netem_qopt` followed by attributes (not a nest; see
/// netem_change in net/sched/sch_netem.c). The 32-bit latency/jitter fields are in psched ticks
/// (64 ns); the 64-bit attributes carry nanoseconds and take precedence, as iproute2 sends them.
pub fn netem_options(n: &Netem) -> Vec<u8> {
    const TCA_NETEM_CORR: u16 = 1;
    const TCA_NETEM_DELAY_DIST: u16 = 2;
    const TCA_NETEM_REORDER: u16 = 3;
    const TCA_NETEM_LATENCY64: u16 = 10;
    const TCA_NETEM_JITTER64: u16 = 11;
    let ticks = |ns: u64| (ns / 64).min(u32::MAX as u64) as u32;
    // As iproute2: reordering applies to every packet (gap 1) unless a gap is given.
    let gap = if n.reorder > 0.0 { 1 } else { 0 };
    let mut out = Vec::new();
    // latency, limit, loss, gap, duplicate, jitter
    for v in [
        ticks(n.latency_ns),
        n.limit,
        0,
        gap,
        fraction(n.duplicate),
        ticks(n.jitter_ns),
    ] {
        out.extend_from_slice(&v.to_ne_bytes());
    }
    let mut attr = |ty: u16, data: &[u8]| {
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    let mut corr = Vec::new();
    for v in [fraction(n.delay_correlation), 0, 0] {
        corr.extend_from_slice(&v.to_ne_bytes());
    }
    attr(TCA_NETEM_CORR, &corr);
    if n.reorder > 0.0 {
        let r: Vec<u8> = [fraction(n.reorder), fraction(n.reorder_correlation)]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        attr(TCA_NETEM_REORDER, &r);
    }
    if let Some(d) = n.distribution {
        let table: Vec<u8> = d.table().iter().flat_map(|v| v.to_ne_bytes()).collect();
        attr(TCA_NETEM_DELAY_DIST, &table);
    }
    attr(TCA_NETEM_LATENCY64, &(n.latency_ns as i64).to_ne_bytes());
    attr(TCA_NETEM_JITTER64, &(n.jitter_ns as i64).to_ne_bytes());
    out
}

/// `struct tc_htb_opt` for a class of `rate` bytes/s (rate = ceil), and the 64-bit rate
/// attributes when it does not fit in 32 bits.
fn htb_class_options(rate: u64) -> Vec<(u16, Vec<u8>)> {
    const TCA_HTB_PARMS: u16 = 1;
    const TCA_HTB_RATE64: u16 = 6;
    const TCA_HTB_CEIL64: u16 = 7;
    const TC_LINKLAYER_ETHERNET: u8 = 1;
    // A burst like tc's default (one jiffy at 1000 Hz plus an MTU), as psched ticks at `rate`.
    let burst = rate / 1000 + 1600;
    let buffer =
        ((burst as u128 * 1_000_000_000 / rate.max(1) as u128) / 64).min(u32::MAX as u128) as u32;
    let rate32 = rate.min(u32::MAX as u64) as u32;
    let mut opt = Vec::new();
    for _ in 0..2 {
        // tc_ratespec: cell_log, linklayer, overhead, cell_align, mpu, rate
        opt.extend_from_slice(&[0, TC_LINKLAYER_ETHERNET]);
        opt.extend_from_slice(&0u16.to_ne_bytes());
        opt.extend_from_slice(&0i16.to_ne_bytes());
        opt.extend_from_slice(&0u16.to_ne_bytes());
        opt.extend_from_slice(&rate32.to_ne_bytes());
    }
    // buffer, cbuffer, quantum, level, prio
    for v in [buffer, buffer, 60_000, 0, 0] {
        opt.extend_from_slice(&v.to_ne_bytes());
    }
    let mut attrs = vec![(TCA_HTB_PARMS, opt)];
    if rate > u32::MAX as u64 {
        attrs.push((TCA_HTB_RATE64, rate.to_ne_bytes().to_vec()));
        attrs.push((TCA_HTB_CEIL64, rate.to_ne_bytes().to_vec()));
    }
    attrs
}

/// A latency-only class must never be what limits throughput: 100 Gbit/s.
const UNLIMITED: u64 = 100_000_000_000 / 8;

/// What is at the root of a device now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// What the kernel put there (handle 0: noqueue, pfifo_fast, mq, fq_codel): deleting ours
    /// brings it back.
    Default,
    /// Ours (`c4a0:`), of this kind.
    Ours(String),
    /// Someone else's.
    Foreign { kind: String, handle: u32 },
}

/// The root of `device`. Must run inside the target namespace.
pub fn root(device: &str) -> Result<Root, ShapeError> {
    let ifindex = netlink::ifindex(device).map_err(kernel(format!("interface {device}")))?;
    let qdiscs = netlink::qdiscs(ifindex).map_err(kernel(format!("list qdiscs of {device}")))?;
    Ok(match qdiscs.into_iter().find(|q| q.parent == TC_H_ROOT) {
        None => Root::Default,
        Some(q) if q.handle == 0 => Root::Default,
        Some(q) if q.handle == ROOT_HANDLE => Root::Ours(q.kind),
        Some(q) => Root::Foreign {
            kind: q.kind,
            handle: q.handle,
        },
    })
}

/// The kernel's kind name for the root a shape needs.
pub fn root_kind(shape: &Shape) -> &'static str {
    match shape {
        Shape::Fq => "fq",
        Shape::Netem(_) | Shape::Rate(_) => "htb",
    }
}

/// Puts our root for `shape` on `device`, which must have its default root, or the foreign
/// tree `replacing` (snapshotted and journaled by the caller; checked again here so nothing
/// that changed meanwhile is lost). Must run inside the target namespace.
pub fn install_root(
    device: &str,
    shape: &Shape,
    replacing: Option<&Snapshot>,
) -> Result<(), ShapeError> {
    let ifindex = netlink::ifindex(device).map_err(kernel(format!("interface {device}")))?;
    match (root(device)?, replacing) {
        (Root::Default, None) => {}
        (Root::Ours(_), _) => {
            return Err(ShapeError::Busy {
                interface: device.into(),
            });
        }
        (Root::Foreign { kind, handle }, None) => {
            return Err(ShapeError::Foreign {
                interface: device.into(),
                kind,
                handle: format!("{:x}:", handle >> 16),
            });
        }
        (Root::Foreign { kind, handle }, Some(snapshot)) => {
            let now = Snapshot::take(ifindex).map_err(kernel(format!("snapshot {device}")))?;
            if now != *snapshot {
                return Err(ShapeError::Changed {
                    interface: device.into(),
                });
            }
            let mut del = TcRequest::new(RTM_DELQDISC, libc::NLM_F_ACK, ifindex, handle, TC_H_ROOT);
            del.kind(&kind);
            del.send()
                .map_err(kernel(format!("delete the root qdisc of {device}")))?;
        }
        (Root::Default, Some(_)) => {
            return Err(ShapeError::Changed {
                interface: device.into(),
            });
        }
    }
    let create = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let result = match shape {
        Shape::Fq => install_fq(device, ifindex, create),
        Shape::Netem(_) | Shape::Rate(_) => install_htb(device, ifindex, create),
    };
    if result.is_err()
        && let Some(snapshot) = replacing
    {
        // Put back what we took away.
        if let Err(e) = snapshot.restore(ifindex) {
            tracing::error!("restoring the root qdisc tree of {device}: {e}");
        }
    }
    result
}

fn install_htb(device: &str, ifindex: u32, create: i32) -> Result<(), ShapeError> {
    const TCA_HTB_INIT: u16 = 2;
    const TCA_HTB_DIRECT_QLEN: u16 = 5;
    // tc_htb_glob: version 3, rate2quantum 10, defcls 0 (unclassified goes direct), debug, direct_pkts
    let glob: Vec<u8> = [3u32, 10, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let mut root = TcRequest::new(RTM_NEWQDISC, create, ifindex, ROOT_HANDLE, TC_H_ROOT);
    root.kind("htb").nested_options(&[
        (TCA_HTB_INIT, glob),
        // Unshaped traffic queues here; the kernel's default follows tx_queue_len, which is 0
        // on some devices and would drop bursts that were never meant to be touched.
        (TCA_HTB_DIRECT_QLEN, 10_000u32.to_ne_bytes().to_vec()),
    ]);
    root.send().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => ShapeError::Missing { kind: "htb" },
        _ => kernel(format!("add htb root to {device}"))(e),
    })
}

/// The fault's own class under our htb root (with its netem leaf). Several faults share one
/// root, each in its own class; an fq root needs nothing per fault. Must run inside the
/// target namespace.
pub fn add_class(device: &str, shape: &Shape, slot: u16) -> Result<(), ShapeError> {
    let rate = match shape {
        Shape::Fq => return Ok(()),
        Shape::Rate(r) => *r,
        Shape::Netem(_) => UNLIMITED,
    };
    if slot >= MAX_SLOTS {
        return Err(ShapeError::Kernel {
            context: format!("shaping class on {device}"),
            source: io::Error::other(format!("at most {MAX_SLOTS} shaping faults at once")),
        });
    }
    let ifindex = netlink::ifindex(device).map_err(kernel(format!("interface {device}")))?;
    let create = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    let mut class = TcRequest::new(RTM_NEWTCLASS, create, ifindex, classid(slot), ROOT_HANDLE);
    class.kind("htb").nested_options(&htb_class_options(rate));
    class
        .send()
        .map_err(kernel(format!("add htb class to {device}")))?;
    if let Shape::Netem(n) = shape {
        let mut leaf = TcRequest::new(
            RTM_NEWQDISC,
            create,
            ifindex,
            leaf_handle(slot),
            classid(slot),
        );
        leaf.kind("netem").attr(TCA_OPTIONS, &netem_options(n));
        if let Err(e) = leaf.send() {
            let _ = remove_class(device, slot);
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) => ShapeError::Missing { kind: "netem" },
                _ => kernel(format!("add netem to {device}"))(e),
            });
        }
    }
    Ok(())
}

/// Deletes the fault's class (and its leaf) from our htb root. Missing is fine. Must run
/// inside the target namespace.
pub fn remove_class(device: &str, slot: u16) -> io::Result<()> {
    let Ok(ifindex) = netlink::ifindex(device) else {
        return Ok(());
    };
    let mut r = TcRequest::new(
        RTM_DELTCLASS,
        libc::NLM_F_ACK,
        ifindex,
        classid(slot),
        ROOT_HANDLE,
    );
    r.kind("htb");
    match r.send() {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// fq's horizon: its default (10 s) drops packets timed beyond it; ours covers the longest
/// delay a fault may ask for, so every fault can share one fq root as it is.
const FQ_HORIZON_US: u32 = (crate::spec::MAX_DELAY_MS as u32 + 1_000) * 1_000;

/// EDT: our fq root. fq keeps a packet until its skb->tstamp; packets without one pass as
/// before. Limits are raised so that delayed packets are held, not dropped (fq's defaults: 100
/// packets per flow, 10,000 in all).
fn install_fq(device: &str, ifindex: u32, create: i32) -> Result<(), ShapeError> {
    const TCA_FQ_PLIMIT: u16 = 1;
    const TCA_FQ_FLOW_PLIMIT: u16 = 2;
    const TCA_FQ_HORIZON: u16 = 14;
    const TCA_FQ_HORIZON_DROP: u16 = 15;
    let mut root = TcRequest::new(RTM_NEWQDISC, create, ifindex, ROOT_HANDLE, TC_H_ROOT);
    root.kind("fq").nested_options(&[
        (TCA_FQ_PLIMIT, 100_000u32.to_ne_bytes().to_vec()),
        (TCA_FQ_FLOW_PLIMIT, 10_000u32.to_ne_bytes().to_vec()),
        (TCA_FQ_HORIZON, FQ_HORIZON_US.to_ne_bytes().to_vec()),
        // Cap rather than drop a packet timed beyond the horizon.
        (TCA_FQ_HORIZON_DROP, vec![0]),
    ]);
    root.send().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => ShapeError::Missing { kind: "fq" },
        _ => kernel(format!("add fq root to {device}"))(e),
    })
}

/// Deletes our root qdisc (and everything under it) if `device` has it, then puts back the
/// tree it replaced, if any. Must run inside the target namespace. Missing is fine: this also
/// cleans up after crashes.
pub fn remove_root(device: &str, replaced: Option<&Snapshot>) -> io::Result<()> {
    let Ok(ifindex) = netlink::ifindex(device) else {
        return Ok(());
    };
    let qdiscs = netlink::qdiscs(ifindex)?;
    if let Some(ours) = qdiscs
        .iter()
        .find(|q| q.parent == TC_H_ROOT && q.handle == ROOT_HANDLE)
    {
        let mut r = TcRequest::new(
            RTM_DELQDISC,
            libc::NLM_F_ACK,
            ifindex,
            ROOT_HANDLE,
            TC_H_ROOT,
        );
        r.kind(&ours.kind);
        r.send()?;
    }
    match replaced {
        // Only onto the default root: if someone configured the device since, theirs stays.
        Some(snapshot) if matches!(root(device), Ok(Root::Default)) => snapshot.restore(ifindex),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_layout() {
        let o = netem_options(&Netem {
            latency_ns: 100_000_000,
            jitter_ns: 10_000_000,
            delay_correlation: 25.0,
            limit: 10_000,
            ..Netem::default()
        });
        let word = |i: usize| u32::from_ne_bytes(o[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 100_000_000 / 64, "latency in psched ticks");
        assert_eq!(word(1), 10_000, "limit");
        assert_eq!(word(5), 10_000_000 / 64, "jitter in ticks");
        // TCA_NETEM_CORR: 4-byte header + 12 bytes, first the delay correlation.
        assert_eq!(u16::from_ne_bytes([o[24], o[25]]), 16);
        assert_eq!(u16::from_ne_bytes([o[26], o[27]]), 1);
        assert_eq!(
            u32::from_ne_bytes(o[28..32].try_into().unwrap()),
            fraction(25.0)
        );
        // LATENCY64 then JITTER64, nanoseconds.
        assert_eq!(u16::from_ne_bytes([o[42], o[43]]), 10);
        assert_eq!(
            i64::from_ne_bytes(o[44..52].try_into().unwrap()),
            100_000_000
        );
        assert_eq!(u16::from_ne_bytes([o[54], o[55]]), 11);
        assert_eq!(
            i64::from_ne_bytes(o[56..64].try_into().unwrap()),
            10_000_000
        );
        assert_eq!(o.len(), 64);
        let d = netem_options(&Netem {
            latency_ns: 10_000_000,
            reorder: 25.0,
            duplicate: 5.0,
            distribution: Some(Distribution::Normal),
            ..Netem::default()
        });
        let word = |i: usize| u32::from_ne_bytes(d[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(
            (word(3), word(4)),
            (1, fraction(5.0)),
            "gap 1 for reorder, duplicate"
        );
        assert_eq!(
            d.len(),
            64 + 12 + 4 + 8192,
            "reorder attribute and the 4,096-entry table"
        );
    }

    #[test]
    fn htb_rates() {
        let small = htb_class_options(125_000);
        assert_eq!(small.len(), 1, "1 Mbit/s fits in 32 bits");
        assert_eq!(small[0].1.len(), 44, "sizeof(struct tc_htb_opt)");
        assert_eq!(
            u32::from_ne_bytes(small[0].1[8..12].try_into().unwrap()),
            125_000
        );
        let big = htb_class_options(UNLIMITED);
        assert_eq!(big.len(), 3, "64-bit rate and ceil attributes");
        assert_eq!(
            u32::from_ne_bytes(big[0].1[8..12].try_into().unwrap()),
            u32::MAX
        );
    }
}
