//! The rtnetlink requests aya does not offer (qdiscs and classes), encoded by hand: a request is
//! a header, a `tcmsg` and a few attributes, not worth a dependency.
use std::io;

pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_DELQDISC: u16 = 37;
pub const RTM_GETQDISC: u16 = 38;
pub const RTM_NEWTCLASS: u16 = 40;
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
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
        let mut buf = vec![0u8; HDR + TCMSG];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | flags) as u16;
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // tcmsg: family, pad[3], ifindex, handle, parent, info
        buf[HDR + 4..HDR + 8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
        buf[HDR + 8..HDR + 12].copy_from_slice(&handle.to_ne_bytes());
        buf[HDR + 12..HDR + 16].copy_from_slice(&parent.to_ne_bytes());
        TcRequest { buf }
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
    let mut req = TcRequest::new(RTM_GETQDISC, libc::NLM_F_DUMP, 0, 0, 0);
    let sock = Socket::open()?;
    sock.send(req.finish())?;
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
                RTM_NEWQDISC if len >= HDR + TCMSG => {
                    let m = &buf[off + HDR..off + len];
                    let word =
                        |i: usize| u32::from_ne_bytes(m[i..i + 4].try_into().unwrap_or_default());
                    if word(4) == ifindex {
                        out.push(QdiscInfo {
                            kind: attr_string(&m[TCMSG..], TCA_KIND),
                            handle: word(8),
                            parent: word(12),
                        });
                    }
                }
                _ => {}
            }
            off += len.next_multiple_of(4);
        }
    }
}

fn attr_string(mut attrs: &[u8], want: u16) -> String {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        if ty == want {
            return String::from_utf8_lossy(&attrs[4..len])
                .trim_end_matches('\0')
                .to_string();
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    String::new()
}

pub fn ifindex(interface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::from_raw_os_error(libc::ENODEV)),
        i => Ok(i),
    }
}

/// Deletes the clsact qdisc of `interface` in the calling thread's namespace. Missing is fine.
pub fn delete_clsact(interface: &str) -> io::Result<()> {
    let result = ifindex(interface).and_then(|i| {
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
