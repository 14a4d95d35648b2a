//! The few rtnetlink requests aya does not offer, encoded by hand (a request is a header, a
//! `tcmsg` and an attribute; not worth a dependency yet).
use std::io;

const RTM_DELQDISC: u16 = 37;
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
const TCA_KIND: u16 = 1;

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct TcMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

/// Deletes the clsact qdisc of `interface` in the calling thread's namespace. Missing is fine.
pub fn delete_clsact(interface: &str) -> io::Result<()> {
    match request(
        RTM_DELQDISC,
        0,
        interface,
        CLSACT_HANDLE,
        TC_H_CLSACT,
        "clsact",
    ) {
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

/// Sends one qdisc request (`tcmsg` + TCA_KIND) and waits for the kernel's acknowledgement.
fn request(
    kind_msg: u16,
    extra_flags: i32,
    interface: &str,
    handle: u32,
    parent: u32,
    kind: &str,
) -> io::Result<()> {
    let name = std::ffi::CString::new(interface).map_err(io::Error::other)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    let kind = std::ffi::CString::new(kind).map_err(io::Error::other)?;
    let kind = kind.as_bytes_with_nul();
    let attr_len = 4 + kind.len();
    let total = size_of::<NlMsgHdr>() + size_of::<TcMsg>() + attr_len.next_multiple_of(4);
    let mut buf = vec![0u8; total];
    let hdr = NlMsgHdr {
        len: total as u32,
        kind: kind_msg,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK | extra_flags) as u16,
        seq: 1,
        pid: 0,
    };
    let tc = TcMsg {
        family: libc::AF_UNSPEC as u8,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        handle,
        parent,
        info: 0,
    };
    let mut off = 0;
    // SAFETY: both structs are repr(C) POD and the buffer is sized for them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &hdr as *const _ as *const u8,
            buf.as_mut_ptr(),
            size_of::<NlMsgHdr>(),
        );
        off += size_of::<NlMsgHdr>();
        std::ptr::copy_nonoverlapping(
            &tc as *const _ as *const u8,
            buf.as_mut_ptr().add(off),
            size_of::<TcMsg>(),
        );
        off += size_of::<TcMsg>();
    }
    buf[off..off + 2].copy_from_slice(&(attr_len as u16).to_ne_bytes());
    buf[off + 2..off + 4].copy_from_slice(&TCA_KIND.to_ne_bytes());
    buf[off + 4..off + 4 + kind.len()].copy_from_slice(kind);

    // SAFETY: a netlink socket we own and close; buffers are valid for their lengths.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            if libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut reply = [0u8; 4096];
            let n = libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < (size_of::<NlMsgHdr>() + 4) as isize {
                return Err(io::Error::last_os_error());
            }
            if u16::from_ne_bytes([reply[4], reply[5]]) == libc::NLMSG_ERROR as u16 {
                let o = size_of::<NlMsgHdr>();
                let errno =
                    -i32::from_ne_bytes([reply[o], reply[o + 1], reply[o + 2], reply[o + 3]]);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            Ok(())
        })();
        libc::close(fd);
        result
    }
}

const RTM_NEWQDISC: u16 = 36;
const TC_H_ROOT: u32 = 0xFFFF_FFFF;

/// Asks the kernel to create a root qdisc of `kind` on `lo` with no options, to learn whether
/// the kind exists: a missing one fails with ENOENT (no module to load), a present one succeeds
/// or rejects the empty options (EINVAL). Run it in a throwaway namespace.
pub fn qdisc_kind_exists(kind: &str) -> io::Result<bool> {
    match request(
        RTM_NEWQDISC,
        libc::NLM_F_CREATE | libc::NLM_F_EXCL,
        "lo",
        0x0001_0000,
        TC_H_ROOT,
        kind,
    ) {
        Ok(()) => Ok(true),
        Err(e)
            if e.raw_os_error() == Some(libc::ENOENT)
                || e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
        {
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(true),
        Err(e) => Err(e),
    }
}
