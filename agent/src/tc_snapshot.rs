//! An exact copy of a device's root qdisc tree (qdiscs, classes, filters), taken before
//! `--force` replaces another tool's root and replayed when ours goes.
//!
//! Each object is kept as the kernel dumped it: its tcmsg (handle, parent, info) and its kind
//! and options attributes byte for byte. Replaying sends them back as creation requests,
//! parents before children. Statistics are not configuration and are left out. A snapshot is
//! only trusted once it has been replayed onto a scratch device and dumped back identical
//! ([`Snapshot::rehearse`]), so a tree we cannot restore is never taken away.
use crate::netlink::{
    self, RTM_GETQDISC, RTM_GETTCLASS, RTM_GETTFILTER, RTM_NEWQDISC, RTM_NEWTCLASS, RTM_NEWTFILTER,
    TC_H_INGRESS, TC_H_ROOT, TCA_KIND, TCA_OPTIONS, TcMessage, TcRequest,
};
use serde::{Deserialize, Serialize};
use std::io;

/// TCA_CHAIN: the filter chain a filter sits in.
const TCA_CHAIN: u16 = 11;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Object {
    Qdisc,
    Class,
    Filter,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcObject {
    pub object: Object,
    pub handle: u32,
    pub parent: u32,
    /// Filters: priority << 16 | protocol.
    pub info: u32,
    pub kind: String,
    /// (attribute type with flags, payload): TCA_OPTIONS and TCA_CHAIN as dumped.
    pub attrs: Vec<(u16, Vec<u8>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub objects: Vec<TcObject>,
}

/// The configuration part of a dumped object, in the form a request takes.
fn object(object: Object, m: TcMessage) -> io::Result<TcObject> {
    let kind = m.kind();
    let mut attrs = Vec::new();
    for (ty, data) in m.attrs {
        match ty & 0x3FFF {
            TCA_CHAIN => attrs.push((ty, data)),
            TCA_OPTIONS => attrs.push((ty, options(object, &kind, &data)?)),
            _ => {}
        }
    }
    Ok(TcObject {
        object,
        handle: m.handle,
        parent: m.parent,
        // For qdiscs and classes the kernel reports a reference count or the leaf's handle
        // here; only a filter's (priority, protocol) is configuration.
        info: if object == Object::Filter { m.info } else { 0 },
        kind,
        attrs,
    })
}

/// Options as a request would carry them. Dumps mix in state: htb reports its version as
/// 0x30011 (requests carry 3) and counts direct packets; classifiers report hit counters and
/// whether hardware took the filter. Those are dropped or reset, so snapshots taken at
/// different times compare equal and replay is accepted. Filters whose restore would need more
/// than their options (actions with their own state and indexes; bpf, which names a program by
/// id) are refused.
fn options(object: Object, kind: &str, data: &[u8]) -> io::Result<Vec<u8>> {
    // TCA_CLS_FLAGS_IN_HW | TCA_CLS_FLAGS_NOT_IN_HW: status, not settable.
    const HW_STATUS: u32 = (1 << 2) | (1 << 3);
    /// (kind, counters to drop, flags attribute, action/police attributes)
    type FilterAttrs = (&'static str, &'static [u16], Option<u16>, &'static [u16]);
    const FILTERS: &[FilterAttrs] = &[
        ("u32", &[8], Some(11), &[6, 7]),
        ("matchall", &[4], Some(3), &[2]),
        ("flower", &[85], Some(22), &[3]),
        ("basic", &[], None, &[3, 4]),
        ("fw", &[], None, &[2, 4]),
        ("route", &[], None, &[5, 6]),
    ];
    match (object, kind) {
        (Object::Qdisc, "htb") => Ok(rewrite(data, |ty, v| {
            const TCA_HTB_INIT: u16 = 2;
            if ty == TCA_HTB_INIT && v.len() >= 20 {
                let version = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) >> 16;
                v[0..4].copy_from_slice(&version.to_ne_bytes());
                // direct_pkts
                v[16..20].fill(0);
            }
            true
        })),
        // codel times are kept in 1024 ns units and dumped as whole microseconds, rounded
        // down: send the microsecond value that maps back to the same units.
        (Object::Qdisc, "fq_codel" | "codel") => {
            let times: &[u16] = if kind == "codel" {
                &[1, 3, 5]
            } else {
                &[1, 3, 7]
            };
            Ok(rewrite(data, |ty, v| {
                if times.contains(&ty) && v.len() == 4 {
                    let dumped = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
                    v.copy_from_slice(&codel_request_us(dumped).to_ne_bytes());
                }
                true
            }))
        }
        (Object::Filter, "bpf") => Err(io::Error::other(
            "a bpf filter names its program by id, which cannot be re-attached by value",
        )),
        (Object::Filter, _) => {
            let Some((_, counters, flags, actions)) = FILTERS.iter().find(|f| f.0 == kind) else {
                return Err(io::Error::other(format!(
                    "{kind} filters are not known to restore exactly"
                )));
            };
            let mut refused = false;
            let out = rewrite(data, |ty, v| {
                if actions.contains(&ty) {
                    refused = true;
                }
                if Some(ty) == *flags && v.len() >= 4 {
                    let f = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) & !HW_STATUS;
                    v[0..4].copy_from_slice(&f.to_ne_bytes());
                }
                !counters.contains(&ty)
            });
            if refused {
                return Err(io::Error::other(format!(
                    "a {kind} filter has actions, whose state cannot be restored exactly"
                )));
            }
            Ok(out)
        }
        _ => Ok(data.to_vec()),
    }
}

/// The microseconds to request so codel stores the units it reported as `dumped` µs.
fn codel_request_us(dumped: u32) -> u32 {
    let units = |us: u64| (us * 1000) >> 10;
    let to_us = |u: u64| (u << 10) / 1000;
    let d = u64::from(dumped);
    [d, d + 1]
        .into_iter()
        .find(|us| to_us(units(*us)) == d)
        .map_or(dumped, |us| us as u32)
}

/// A nest of attributes with `edit` applied to each (type without flags, payload); attributes
/// for which it returns false are dropped. A payload that is not a nest is returned as is.
fn rewrite(data: &[u8], mut edit: impl FnMut(u16, &mut Vec<u8>) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut off = 0;
    while off + 4 <= data.len() {
        let len = u16::from_ne_bytes([data[off], data[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([data[off + 2], data[off + 3]]);
        if len < 4 || off + len > data.len() {
            return data.to_vec();
        }
        let mut payload = data[off + 4..off + len].to_vec();
        if edit(ty & 0x3FFF, &mut payload) {
            out.extend_from_slice(&data[off..off + 4]);
            out.extend_from_slice(&payload);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        off += len.next_multiple_of(4);
    }
    out
}

/// The class id space a qdisc's handle opens: its major number.
fn major(id: u32) -> u32 {
    id & 0xFFFF_0000
}

impl Snapshot {
    /// The root tree of `ifindex` as it is now: every qdisc but the ingress/clsact one and
    /// the defaults the kernel makes itself (handle 0 under a classful parent), every class,
    /// and every filter attached to any of them.
    pub fn take(ifindex: u32) -> io::Result<Self> {
        let qdiscs: Vec<TcObject> = netlink::dump(RTM_GETQDISC, ifindex, 0)?
            .into_iter()
            .filter(|m| m.parent != TC_H_INGRESS && (m.handle != 0 || m.parent == TC_H_ROOT))
            .map(|m| object(Object::Qdisc, m))
            .collect::<io::Result<_>>()?;
        let classes: Vec<TcObject> = netlink::dump(RTM_GETTCLASS, ifindex, 0)?
            .into_iter()
            .filter(|m| qdiscs.iter().any(|q| major(q.handle) == major(m.handle)))
            .map(|m| object(Object::Class, m))
            .collect::<io::Result<_>>()?;
        let mut filters = Vec::new();
        for parent in qdiscs
            .iter()
            .map(|q| q.handle)
            .chain(classes.iter().map(|c| c.handle))
        {
            for m in netlink::dump(RTM_GETTFILTER, ifindex, parent)? {
                filters.push(object(Object::Filter, m)?);
            }
        }
        let mut objects = qdiscs;
        objects.extend(classes);
        objects.extend(filters);
        Ok(Snapshot { objects })
    }

    /// Recreates the tree on `ifindex`, whose root must be the default one, then checks that
    /// the kernel reports it back exactly as snapshotted.
    pub fn restore(&self, ifindex: u32) -> io::Result<()> {
        self.replay(ifindex)?;
        let now = Snapshot::take(ifindex)?;
        match self.difference(&now) {
            None => Ok(()),
            Some(d) => Err(io::Error::other(format!("restored tree differs: {d}"))),
        }
    }

    /// Proves the snapshot can be restored: replays it onto a scratch IFB device in the
    /// calling thread's namespace and compares. Trees that need a particular device (mq on a
    /// multiqueue NIC, offloads) fail here, before anything is taken away.
    pub fn rehearse(&self) -> io::Result<()> {
        let scratch = format!("chrh{}", std::process::id() % 1_000_000_000);
        netlink::ifb_add(&scratch)?;
        let result = netlink::ifindex(&scratch).and_then(|i| self.restore(i));
        netlink::link_del(&scratch)?;
        result
    }

    /// Sends every object back, parents before children: the root qdisc, then classes and
    /// qdiscs as their parents appear, then filters.
    fn replay(&self, ifindex: u32) -> io::Result<()> {
        let create = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        // Ids that exist: qdisc handles, class ids.
        let mut present: Vec<u32> = vec![TC_H_ROOT];
        let mut pending: Vec<&TcObject> = self
            .objects
            .iter()
            .filter(|o| o.object != Object::Filter)
            .collect();
        while !pending.is_empty() {
            // A class at the top of its qdisc reports the root as its parent; it needs its qdisc.
            let ready = pending.iter().position(|o| match o.object {
                Object::Class if o.parent == TC_H_ROOT => present.contains(&major(o.handle)),
                _ => present.contains(&o.parent),
            });
            let Some(i) = ready else {
                return Err(io::Error::other(format!(
                    "{} {:x} has no parent {:x} in the snapshot",
                    pending[0].kind, pending[0].handle, pending[0].parent
                )));
            };
            let o = pending.remove(i);
            let (msg, flags) = match o.object {
                // A child qdisc takes the place of the default one its parent class made.
                Object::Qdisc if o.parent != TC_H_ROOT => (
                    RTM_NEWQDISC,
                    libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
                ),
                Object::Qdisc => (RTM_NEWQDISC, create),
                _ => (RTM_NEWTCLASS, create),
            };
            if o.object == Object::Class && class_exists(ifindex, o.handle)? {
                // Made by its qdisc (mq's per-queue classes).
                present.push(o.handle);
                continue;
            }
            send(ifindex, msg, flags, o)?;
            present.push(o.handle);
        }
        for f in self.objects.iter().filter(|o| o.object == Object::Filter) {
            match send(ifindex, RTM_NEWTFILTER, create, f) {
                // Made by its classifier along with an earlier entry (u32's root hash table
                // comes with the classifier itself); the comparison after replay decides.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The first way `other` differs from `self`, ignoring order.
    fn difference(&self, other: &Snapshot) -> Option<String> {
        for o in &self.objects {
            if !other.objects.contains(o) {
                return Some(format!(
                    "{:?} {} {:x} (parent {:x}) is missing or has other options",
                    o.object, o.kind, o.handle, o.parent
                ));
            }
        }
        other
            .objects
            .iter()
            .find(|o| !self.objects.contains(o))
            .map(|o| format!("{:?} {} {:x} is extra", o.object, o.kind, o.handle))
    }
}

fn class_exists(ifindex: u32, id: u32) -> io::Result<bool> {
    Ok(netlink::dump(RTM_GETTCLASS, ifindex, 0)?
        .iter()
        .any(|m| m.handle == id))
}

fn send(ifindex: u32, msg: u16, flags: i32, o: &TcObject) -> io::Result<()> {
    let mut r = TcRequest::new(msg, flags, ifindex, o.handle, o.parent);
    r.info(o.info);
    let mut kind = o.kind.as_bytes().to_vec();
    kind.push(0);
    r.attr(TCA_KIND, &kind);
    for (ty, data) in &o.attrs {
        r.attr(*ty, data);
    }
    r.send().map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => e,
        _ => io::Error::new(
            e.kind(),
            format!("recreate {:?} {} {:x}: {e}", o.object, o.kind, o.handle),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codel_times_round_trip() {
        // tc's "target 3ms": 3000 us -> 2929 units, dumped as 2999 us.
        assert_eq!(codel_request_us(2999), 3000);
        for us in [1u64, 5_000, 100_000, 3_000, 1_234_567] {
            let units = (us * 1000) >> 10;
            let dumped = ((units << 10) / 1000) as u32;
            let again = (u64::from(codel_request_us(dumped)) * 1000) >> 10;
            assert_eq!(again, units, "{us} us");
        }
    }

    #[test]
    fn htb_dump_state_is_normalised() {
        // TCA_HTB_INIT: version 0x30011, rate2quantum 10, defcls 0x20, debug 0, direct_pkts 7.
        let mut init = Vec::new();
        for v in [0x30011u32, 10, 0x20, 0, 7] {
            init.extend_from_slice(&v.to_ne_bytes());
        }
        let mut nest = Vec::new();
        nest.extend_from_slice(&24u16.to_ne_bytes());
        nest.extend_from_slice(&2u16.to_ne_bytes());
        nest.extend_from_slice(&init);
        let out = options(Object::Qdisc, "htb", &nest).unwrap();
        let word = |i: usize| u32::from_ne_bytes(out[4 + i * 4..8 + i * 4].try_into().unwrap());
        assert_eq!((word(0), word(2), word(4)), (3, 0x20, 0));
        assert!(options(Object::Filter, "bpf", &[]).is_err());
    }
}
