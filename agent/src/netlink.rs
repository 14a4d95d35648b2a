//! The rtnetlink requests aya does not offer (qdiscs and classes), encoded by hand: a request is
//! a header, a `tcmsg` and a few attributes, not worth a dependency.
use std::io;

pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_DELQDISC: u16 = 37;
pub const RTM_GETQDISC: u16 = 38;
pub const RTM_NEWTCLASS: u16 = 40;
pub const RTM_DELTCLASS: u16 = 41;
pub const RTM_GETTCLASS: u16 = 42;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_GETTFILTER: u16 = 46;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
pub const TC_H_INGRESS: u32 = 0xFFFF_FFF1;
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_H_CLSACT: u32 = TC_H_INGRESS;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
pub const TCA_KIND: u16 = 1;
pub const TCA_OPTIONS: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const HDR: usize = 16;
const TCMSG: usize = 20;

/// One tc request under construction.
pub struct TcRequest {
    buf: Vec<u8>,
}

impl TcRequest {
    pub fn new(kind: u16, flags: i32, ifindex: u32, handle: u32, parent: u32) -> Self {
        let mut r = Self::with_header(kind, flags, TCMSG);
        // tcmsg: family, pad[3], ifindex, handle, parent, info
        r.buf[HDR + 4..HDR + 8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
        r.buf[HDR + 8..HDR + 12].copy_from_slice(&handle.to_ne_bytes());
        r.buf[HDR + 12..HDR + 16].copy_from_slice(&parent.to_ne_bytes());
        r
    }

    /// A netlink message of type `kind` with a zeroed family header of `len` bytes.
    fn with_header(kind: u16, flags: i32, len: usize) -> Self {
        let mut buf = vec![0u8; HDR + len];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | flags) as u16;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        TcRequest { buf }
    }

    /// tcmsg's `tcm_info`: for filters, priority << 16 | protocol (network byte order).
    pub fn info(&mut self, info: u32) -> &mut Self {
        self.buf[HDR + 16..HDR + 20].copy_from_slice(&info.to_ne_bytes());
        self
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        put_attr(&mut self.buf, ty, data);
        self
    }

    pub fn kind(&mut self, kind: &str) -> &mut Self {
        let mut v = kind.as_bytes().to_vec();
        v.push(0);
        self.attr(TCA_KIND, &v)
    }

    /// TCA_OPTIONS as a nest of attributes (htb, tbf).
    pub fn nested_options(&mut self, attrs: &[(u16, Vec<u8>)]) -> &mut Self {
        let mut inner = Vec::new();
        for (ty, data) in attrs {
            put_attr(&mut inner, *ty, data);
        }
        self.attr(TCA_OPTIONS | NLA_F_NESTED, &inner)
    }

    /// Sends the request in the calling thread's namespace and waits for the kernel's answer.
    pub fn send(mut self) -> io::Result<()> {
        let sock = Socket::open()?;
        sock.send(self.finish())?;
        sock.ack()
    }

    /// The message with its length filled in.
    fn finish(&mut self) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }
}

fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

struct Socket(i32);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned by the returned value.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: buf is valid for its length.
        if unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn ack(&self) -> io::Result<()> {
        let mut reply = vec![0u8; 8192];
        let n = self.recv(&mut reply)?;
        if n < HDR + 4 {
            return Err(io::Error::other("short netlink reply"));
        }
        if u16::from_ne_bytes([reply[4], reply[5]]) == libc::NLMSG_ERROR as u16 {
            let errno =
                -i32::from_ne_bytes([reply[HDR], reply[HDR + 1], reply[HDR + 2], reply[HDR + 3]]);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// A qdisc as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QdiscInfo {
    pub kind: String,
    pub handle: u32,
    pub parent: u32,
}

/// The qdiscs of `ifindex` in the calling thread's namespace (RTM_GETQDISC dump).
pub fn qdiscs(ifindex: u32) -> io::Result<Vec<QdiscInfo>> {
    Ok(dump(RTM_GETQDISC, ifindex, 0)?
        .into_iter()
        .map(|m| QdiscInfo {
            kind: m.kind(),
            handle: m.handle,
            parent: m.parent,
        })
        .collect())
}

/// One tc object (qdisc, class or filter) from a dump: its tcmsg and its attributes as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcMessage {
    pub handle: u32,
    pub parent: u32,
    pub info: u32,
    /// (type with its flags, payload)
    pub attrs: Vec<(u16, Vec<u8>)>,
}

impl TcMessage {
    pub fn attr(&self, ty: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _)| t & !NLA_F_NESTED == ty)
            .map(|(_, d)| d.as_slice())
    }

    pub fn kind(&self) -> String {
        self.attr(TCA_KIND)
            .map(|d| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_default()
    }
}

/// Dumps qdiscs, classes (`RTM_GETTCLASS`) or filters (`RTM_GETTFILTER`, of `parent`) of
/// `ifindex` in the calling thread's namespace.
pub fn dump(msg_type: u16, ifindex: u32, parent: u32) -> io::Result<Vec<TcMessage>> {
    let mut req = TcRequest::new(msg_type, libc::NLM_F_DUMP, ifindex, 0, parent);
    let sock = Socket::open()?;
    sock.send(req.finish())?;
    let reply_type = msg_type - 2;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock.recv(&mut buf)?;
        let mut off = 0;
        while off + HDR <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < HDR || off + len > n {
                return Err(io::Error::other("malformed netlink dump"));
            }
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(out),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno = -i32::from_ne_bytes(
                        buf[off + HDR..off + HDR + 4].try_into().unwrap_or_default(),
                    );
                    return Err(io::Error::from_raw_os_error(errno));
                }
                k if k == reply_type && len >= HDR + TCMSG => {
                    let m = &buf[off + HDR..off + len];
                    let word =
                        |i: usize| u32::from_ne_bytes(m[i..i + 4].try_into().unwrap_or_default());
                    // Qdisc dumps cover every device; the others honour the ifindex.
                    if word(4) == ifindex {
                        out.push(TcMessage {
                            handle: word(8),
                            parent: word(12),
                            info: word(16),
                            attrs: attrs(&m[TCMSG..]),
                        });
                    }
                }
                _ => {}
            }
            off += len.next_multiple_of(4);
        }
    }
}

fn attrs(mut data: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]);
        if len < 4 || len > data.len() {
            break;
        }
        out.push((ty, data[4..len].to_vec()));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

/// Creates an IFB device named `name`, up, in the calling thread's namespace.
pub fn ifb_add(name: &str) -> io::Result<()> {
    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFINFOMSG: usize = 16;
    let mut r = TcRequest::with_header(
        RTM_NEWLINK,
        libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        IFINFOMSG,
    );
    // ifinfomsg: family, pad, type, index, flags, change
    let up = libc::IFF_UP as u32;
    r.buf[HDR + 8..HDR + 12].copy_from_slice(&up.to_ne_bytes());
    r.buf[HDR + 12..HDR + 16].copy_from_slice(&up.to_ne_bytes());
    let mut ifname = name.as_bytes().to_vec();
    ifname.push(0);
    r.attr(IFLA_IFNAME, &ifname);
    let mut info = Vec::new();
    put_attr(&mut info, IFLA_INFO_KIND, b"ifb");
    r.attr(IFLA_LINKINFO | NLA_F_NESTED, &info);
    r.send()
}

/// Deletes the device `name` in the calling thread's namespace. Missing is fine.
pub fn link_del(name: &str) -> io::Result<()> {
    let Ok(index) = ifindex(name) else {
        return Ok(());
    };
    let mut r = TcRequest::with_header(RTM_DELLINK, libc::NLM_F_ACK, 16);
    r.buf[HDR + 4..HDR + 8].copy_from_slice(&(index as i32).to_ne_bytes());
    match r.send() {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// The kind of the link `name` (IFLA_INFO_KIND: "ifb", "veth", ...) in the calling thread's
/// namespace; `None` for a device without one (a physical NIC, lo). ENODEV if there is none.
pub fn link_kind(name: &str) -> io::Result<Option<String>> {
    const RTM_GETLINK: u16 = 18;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFINFOMSG: usize = 16;
    let index = ifindex(name)?;
    let mut r = TcRequest::with_header(RTM_GETLINK, 0, IFINFOMSG);
    r.buf[HDR + 4..HDR + 8].copy_from_slice(&(index as i32).to_ne_bytes());
    let sock = Socket::open()?;
    sock.send(r.finish())?;
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf)?;
    let reply = buf.get(..n).unwrap_or_default();
    if reply.len() < HDR + 4 {
        return Err(io::Error::other("short netlink reply"));
    }
    let len = (u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize).min(n);
    match u16::from_ne_bytes([reply[4], reply[5]]) {
        t if t == libc::NLMSG_ERROR as u16 => {
            let errno =
                -i32::from_ne_bytes([reply[HDR], reply[HDR + 1], reply[HDR + 2], reply[HDR + 3]]);
            Err(io::Error::from_raw_os_error(errno))
        }
        RTM_NEWLINK if len >= HDR + IFINFOMSG => {
            let kind = attrs(&reply[HDR + IFINFOMSG..len])
                .into_iter()
                .find(|(t, _)| t & !NLA_F_NESTED == IFLA_LINKINFO)
                .and_then(|(_, info)| {
                    attrs(&info)
                        .into_iter()
                        .find(|(t, _)| t & !NLA_F_NESTED == IFLA_INFO_KIND)
                })
                .map(|(_, k)| {
                    String::from_utf8_lossy(&k)
                        .trim_end_matches('\0')
                        .to_string()
                });
            Ok(kind)
        }
        _ => Err(io::Error::other("unexpected netlink reply to RTM_GETLINK")),
    }
}

pub fn ifindex(interface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::from_raw_os_error(libc::ENODEV)),
        i => Ok(i),
    }
}

/// The handles of the filters on the clsact qdisc of `ifindex` (both hooks), in the calling
/// thread's namespace. Empty if there is no clsact qdisc.
pub fn clsact_filter_handles(ifindex: u32) -> io::Result<Vec<u32>> {
    let mut handles = Vec::new();
    // TC_H_MIN_INGRESS, TC_H_MIN_EGRESS under the clsact major.
    for parent in [0xFFFF_FFF2, 0xFFFF_FFF3] {
        match dump(RTM_GETTFILTER, ifindex, parent) {
            // A dump lists each classifier instance (handle 0) before its filters.
            Ok(filters) => handles.extend(filters.iter().map(|f| f.handle).filter(|h| *h != 0)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(handles)
}

/// A classic (not direct-action) cls_bpf filter on clsact ingress running program `fd`, with a
/// mirred action that redirects what it matches to the egress of device `to` (an IFB).
pub fn add_mirred_filter(
    interface: &str,
    priority: u16,
    handle: u32,
    fd: u32,
    name: &str,
    to: u32,
) -> io::Result<()> {
    const TC_H_MIN_INGRESS: u32 = 0xFFFF_FFF2;
    const ETH_P_ALL: u16 = 0x0003;
    const TCA_BPF_ACT: u16 = 1;
    const TCA_BPF_FD: u16 = 6;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_FLAGS: u16 = 8;
    const TCA_ACT_KIND: u16 = 1;
    const TCA_ACT_OPTIONS: u16 = 2;
    const TCA_MIRRED_PARMS: u16 = 2;
    const TC_ACT_STOLEN: i32 = 4;
    const TCA_EGRESS_REDIR: i32 = 1;
    let ifindex = ifindex(interface)?;
    // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
    let mut parms = Vec::new();
    for v in [0i32, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR, to as i32] {
        parms.extend_from_slice(&v.to_ne_bytes());
    }
    let mirred_options = nest(&[(TCA_MIRRED_PARMS, parms)]);
    let action = nest(&[
        (TCA_ACT_KIND, b"mirred\0".to_vec()),
        (TCA_ACT_OPTIONS | NLA_F_NESTED, mirred_options),
    ]);
    let actions = nest(&[(1 | NLA_F_NESTED, action)]);
    let mut prog_name = name.as_bytes().to_vec();
    prog_name.push(0);
    let mut r = TcRequest::new(
        RTM_NEWTFILTER,
        libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        ifindex,
        handle,
        TC_H_MIN_INGRESS,
    );
    r.info((u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be()));
    r.kind("bpf").nested_options(&[
        (TCA_BPF_ACT | NLA_F_NESTED, actions),
        (TCA_BPF_FD, fd.to_ne_bytes().to_vec()),
        (TCA_BPF_NAME, prog_name),
        // Not TCA_BPF_FLAG_ACT_DIRECT: the program classifies, the action acts.
        (TCA_BPF_FLAGS, 0u32.to_ne_bytes().to_vec()),
    ]);
    r.send()
}

/// Attributes one after another, as the payload of a nest.
fn nest(attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ty, data) in attrs {
        put_attr(&mut out, *ty, data);
    }
    out
}

/// Deletes the clsact qdisc of `interface` in the calling thread's namespace, unless filters
/// remain on it (another fault's, or another tool's added since). Missing is fine.
pub fn delete_clsact(interface: &str) -> io::Result<()> {
    let result = ifindex(interface).and_then(|i| {
        if !clsact_filter_handles(i)?.is_empty() {
            return Ok(());
        }
        let mut r = TcRequest::new(RTM_DELQDISC, libc::NLM_F_ACK, i, CLSACT_HANDLE, TC_H_CLSACT);
        r.kind("clsact");
        r.send()
    });
    match result {
        // No such interface, or no clsact there (already gone).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Asks the kernel to create a root qdisc of `kind` on `lo` with no options, to learn whether
/// the kind exists: a missing one fails with ENOENT (no module to load), a present one succeeds
/// or rejects the empty options (EINVAL). Run it in a throwaway namespace.
pub fn qdisc_kind_exists(kind: &str) -> io::Result<bool> {
    let lo = ifindex("lo")?;
    let mut r = TcRequest::new(
        RTM_NEWQDISC,
        libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        lo,
        0x0001_0000,
        TC_H_ROOT,
    );
    r.kind(kind);
    match r.send() {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EOPNOTSUPP)) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(true),
        Err(e) => Err(e),
    }
}
