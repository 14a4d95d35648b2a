//! The sweep that needs no journal: our objects found in the kernel by their marks, and those
//! no live engine owns removed.
//!
//! Marks: clsact filters with our handle and a priority in our range (the priority names the
//! registry slot of the engine that put it there), root qdiscs with our handle `c4a0:`, and
//! IFB devices named `chifb…`. TCX links need no sweep: the kernel detaches them when their
//! owner's descriptors close. A root or an IFB names no owner, so it goes when no live engine's
//! journal claims its device (journals name a site before it exists, under the sites lock).
use crate::datapath::{self, AttachMode, AttachmentRecord, CLSACT_HANDLE, Hook};
use crate::netlink;
use crate::netns::{Netns, NetnsId};
use crate::qdisc;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// What live engines' journals name: sites (namespace, device) and clsact filters
/// (namespace, interface, hook, priority), with the registry as read once under the sites lock:
/// the live slots, and the journal directories every slot names. `complete` is false when some
/// live engine's journal could not be read: then nothing it might own is removed.
#[derive(Debug, Default, Clone)]
pub struct Claims {
    pub sites: BTreeSet<(NetnsId, String)>,
    pub filters: BTreeSet<(NetnsId, String, Hook, u16)>,
    pub live: BTreeSet<u16>,
    pub journal_dirs: BTreeSet<PathBuf>,
    pub complete: bool,
}

impl Claims {
    /// Whether a clsact filter of ours belongs to a dead engine: the engine of its priority's
    /// slot is dead, or the slot's live holder does not claim it (it is a dead predecessor's in
    /// that slot).
    pub fn filter_is_dead(
        &self,
        netns: NetnsId,
        interface: &str,
        hook: Hook,
        priority: u16,
    ) -> bool {
        let Some(slot) = datapath::slot_of_priority(priority) else {
            return false;
        };
        !self.live.contains(&slot)
            || (self.complete
                && !self
                    .filters
                    .contains(&(netns, interface.to_string(), hook, priority)))
    }
}

/// Every network namespace on the node that we can open: the named ones (/run/netns) and
/// those of running processes, each once.
pub fn namespaces() -> Vec<Netns> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let of_processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_pid))
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(of_processes) {
        // stat before open: most processes share a few namespaces.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let id = NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if !seen.insert(id) {
            continue;
        }
        if let Ok(n) = Netns::open_path(&path, "--netns")
            && n.id == id
        {
            out.push(n);
        }
    }
    out
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// What a namespace holds of ours, and whose.
#[derive(Debug, Default)]
struct Found {
    /// (interface, hook, priority) of filters whose engine is dead.
    dead_filters: Vec<(String, Hook, u16)>,
    /// Devices with our root qdisc (not IFBs).
    roots: Vec<String>,
    ifbs: Vec<String>,
}

/// Lists our objects in the calling thread's namespace (`netns`); live engines' filters are
/// left out.
fn scan(netns: NetnsId, claims: &Claims) -> std::io::Result<Found> {
    let mut found = Found::default();
    let links = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    for link in links.iter() {
        let name = link.name().to_string_lossy().into_owned();
        let index = link.index();
        for (hook, parent) in [(Hook::Ingress, 0xFFFF_FFF2), (Hook::Egress, 0xFFFF_FFF3)] {
            let filters = match netlink::dump(netlink::RTM_GETTFILTER, index, parent) {
                Ok(f) => f,
                // No clsact qdisc on this device.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut priorities: Vec<u16> = filters
                .iter()
                .filter(|f| f.handle == CLSACT_HANDLE)
                .map(|f| (f.info >> 16) as u16)
                .filter(|p| claims.filter_is_dead(netns, &name, hook, *p))
                .collect();
            priorities.dedup();
            found
                .dead_filters
                .extend(priorities.into_iter().map(|p| (name.clone(), hook, p)));
        }
        let is_ifb = name.starts_with(datapath::IFB_PREFIX)
            && netlink::link_kind(&name).is_ok_and(|k| k.as_deref() == Some("ifb"));
        if is_ifb {
            found.ifbs.push(name);
        } else if matches!(qdisc::root(&name), Ok(qdisc::Root::Ours(_))) {
            found.roots.push(name);
        }
    }
    Ok(found)
}

/// What a sweep of one namespace removed and what failed.
#[derive(Debug, Default)]
pub struct Removed {
    pub filters: usize,
    pub roots: usize,
    pub ifbs: usize,
    /// One line per object removed, for `chaosctl cleanup`.
    pub lines: Vec<String>,
    pub errors: Vec<String>,
}

/// Sweeps one namespace: dead engines' filters, and roots and IFBs nobody live claims.
pub fn sweep_netns(netns: &Netns, claims: &Claims) -> Removed {
    let id = netns.id;
    let label = netns
        .path
        .as_ref()
        .map_or_else(|| "this namespace".to_string(), |p| p.display().to_string());
    let claims = claims.clone();
    let result = netns.run(move || {
        let mut removed = Removed::default();
        let found = match scan(id, &claims) {
            Ok(f) => f,
            Err(e) => {
                removed.errors.push(format!("scan: {e}"));
                return removed;
            }
        };
        for (interface, hook, priority) in found.dead_filters {
            let record = AttachmentRecord {
                interface: interface.clone(),
                hook,
                mode: AttachMode::Clsact,
                priority,
                handle: CLSACT_HANDLE,
                created_clsact: false,
            };
            match datapath::remove_clsact_attachments(&[record]) {
                Ok(()) => {
                    removed.filters += 1;
                    removed.lines.push(format!(
                        "clsact filter {interface} {hook:?} priority {priority} (its engine is dead)"
                    ));
                    // Ours were the last filters there: the clsact qdisc carried only them.
                    let _ = netlink::delete_clsact(&interface);
                }
                Err(e) => removed.errors.push(format!("{interface}: {e}")),
            }
        }
        if !claims.complete {
            return removed;
        }
        let unclaimed = |device: &String| !claims.sites.contains(&(id, device.clone()));
        for device in found.roots.iter().filter(|d| unclaimed(d)) {
            match qdisc::remove_root(device, None) {
                Ok(()) => {
                    removed.roots += 1;
                    removed
                        .lines
                        .push(format!("root qdisc c4a0: on {device} (no live engine claims it)"));
                }
                Err(e) => removed.errors.push(format!("{device}: {e}")),
            }
        }
        for device in found.ifbs.iter().filter(|d| unclaimed(d)) {
            match netlink::link_del(device) {
                Ok(()) => {
                    removed.ifbs += 1;
                    removed
                        .lines
                        .push(format!("IFB {device} (no live engine claims it)"));
                }
                Err(e) => removed.errors.push(format!("{device}: {e}")),
            }
        }
        removed
    });
    let mut removed = result.unwrap_or_else(|e| Removed {
        errors: vec![e.to_string()],
        ..Removed::default()
    });
    for line in removed.lines.iter_mut().chain(removed.errors.iter_mut()) {
        *line = format!("{label}: {line}");
    }
    removed
}
