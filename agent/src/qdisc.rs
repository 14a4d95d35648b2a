//! Shaping faults (latency, bandwidth): an HTB root qdisc with our reserved handle, one class
//! for the fault, and for latency a netem leaf under it. The classifier steers matched packets
//! into the class by setting skb->priority to its id (HTB classifies by priority first);
//! everything else is unclassified, which HTB sends straight through its direct queue with no
//! shaping and no delay.
//!
//! Only a root qdisc the kernel created by default (handle 0: noqueue, pfifo_fast, mq,
//! fq_codel) is replaced; deleting ours gives the device its default back. A root someone else
//! configured (a CNI's) is left alone and the fault is refused.
use crate::netem_dist::Distribution;
use crate::netlink::{
    self, RTM_DELQDISC, RTM_NEWQDISC, RTM_NEWTCLASS, TC_H_ROOT, TCA_OPTIONS, TcRequest,
};
use serde::{Deserialize, Serialize};
use std::io;

/// `c4a0:` — our root.
pub const ROOT_HANDLE: u32 = 0xC4A0_0000;
/// `c4a0:1` — the shaped class; the classifier's steering target.
pub const SHAPE_CLASSID: u32 = 0xC4A0_0001;
/// `c4a1:` — netem under the shaped class.
pub const LEAF_HANDLE: u32 = 0xC4A1_0000;

/// What the shaped class does to the packets steered into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Shape {
    Netem(Netem),
    /// Bytes per second.
    Rate(u64),
    /// An fq root that holds packets until the departure time the classifier set (EDT).
    Fq {
        horizon_ns: u64,
    },
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
        "the root qdisc of {interface} is {kind} {handle}, not ours; chaos does not replace another tool's root qdisc (a --force with snapshot and exact restore is not implemented yet)"
    )]
    Foreign {
        interface: String,
        kind: String,
        handle: String,
    },
    #[error("{interface} already has a shaping fault (root qdisc c4a0:); revert it first")]
    Busy { interface: String },
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

/// Builds the tree on `interface`. Must run inside the target namespace.
pub fn install(interface: &str, shape: &Shape) -> Result<(), ShapeError> {
    let ifindex = netlink::ifindex(interface).map_err(kernel(format!("interface {interface}")))?;
    let qdiscs = netlink::qdiscs(ifindex).map_err(kernel(format!("list qdiscs of {interface}")))?;
    if let Some(root) = qdiscs.iter().find(|q| q.parent == TC_H_ROOT) {
        if root.handle == ROOT_HANDLE {
            return Err(ShapeError::Busy {
                interface: interface.into(),
            });
        }
        if root.handle != 0 {
            return Err(ShapeError::Foreign {
                interface: interface.into(),
                kind: root.kind.clone(),
                handle: format!("{:x}:", root.handle >> 16),
            });
        }
    }
    let create = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    if let Shape::Fq { horizon_ns } = shape {
        return install_fq(interface, ifindex, *horizon_ns, create);
    }
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
        _ => kernel(format!("add htb root to {interface}"))(e),
    })?;
    let result = (|| {
        let rate = match shape {
            Shape::Rate(r) => *r,
            Shape::Netem(_) | Shape::Fq { .. } => UNLIMITED,
        };
        let mut class = TcRequest::new(RTM_NEWTCLASS, create, ifindex, SHAPE_CLASSID, ROOT_HANDLE);
        class.kind("htb").nested_options(&htb_class_options(rate));
        class
            .send()
            .map_err(kernel(format!("add htb class to {interface}")))?;
        if let Shape::Netem(n) = shape {
            let mut leaf =
                TcRequest::new(RTM_NEWQDISC, create, ifindex, LEAF_HANDLE, SHAPE_CLASSID);
            leaf.kind("netem").attr(TCA_OPTIONS, &netem_options(n));
            leaf.send().map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => ShapeError::Missing { kind: "netem" },
                _ => kernel(format!("add netem to {interface}"))(e),
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = remove(interface);
    }
    result
}

/// EDT: our fq root. fq keeps a packet until its skb->tstamp; packets without one pass as
/// before. Limits are raised so that delayed packets are held, not dropped (fq's defaults: 100
/// packets per flow, 10,000 in all), and the horizon covers our longest delay.
fn install_fq(
    interface: &str,
    ifindex: u32,
    horizon_ns: u64,
    create: i32,
) -> Result<(), ShapeError> {
    const TCA_FQ_PLIMIT: u16 = 1;
    const TCA_FQ_FLOW_PLIMIT: u16 = 2;
    const TCA_FQ_HORIZON: u16 = 14;
    const TCA_FQ_HORIZON_DROP: u16 = 15;
    let horizon_us = (horizon_ns / 1000).min(u32::MAX as u64) as u32;
    let mut root = TcRequest::new(RTM_NEWQDISC, create, ifindex, ROOT_HANDLE, TC_H_ROOT);
    root.kind("fq").nested_options(&[
        (TCA_FQ_PLIMIT, 100_000u32.to_ne_bytes().to_vec()),
        (TCA_FQ_FLOW_PLIMIT, 10_000u32.to_ne_bytes().to_vec()),
        (TCA_FQ_HORIZON, horizon_us.to_ne_bytes().to_vec()),
        // Cap rather than drop a packet timed beyond the horizon.
        (TCA_FQ_HORIZON_DROP, vec![0]),
    ]);
    root.send().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => ShapeError::Missing { kind: "fq" },
        _ => kernel(format!("add fq root to {interface}"))(e),
    })
}

/// Deletes our root qdisc (and everything under it) if `interface` has it. Must run inside the
/// target namespace. Missing is fine: this also cleans up after crashes.
pub fn remove(interface: &str) -> io::Result<()> {
    let Ok(ifindex) = netlink::ifindex(interface) else {
        return Ok(());
    };
    let qdiscs = netlink::qdiscs(ifindex)?;
    let Some(ours) = qdiscs
        .iter()
        .find(|q| q.parent == TC_H_ROOT && q.handle == ROOT_HANDLE)
    else {
        return Ok(());
    };
    let mut r = TcRequest::new(
        RTM_DELQDISC,
        libc::NLM_F_ACK,
        ifindex,
        ROOT_HANDLE,
        TC_H_ROOT,
    );
    r.kind(&ours.kind);
    r.send()
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
