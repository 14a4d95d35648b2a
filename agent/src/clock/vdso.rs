//! The vDSO: where this kernel's image has room for [stub.c](stub.c), which of its functions
//! jump there, and the writes that patch a target's copy and restore it.
//!
//! The stub goes into the slack after the ELF image (the mapping is whole pages; the bytes
//! past the file's end are zeros nothing reads), so the only code that changes in place is one
//! jump at each function's entry, written while the target's threads are held outside it
//! ([halt](super::halt)). Every process on a kernel maps the same image, so the engine's own
//! vDSO is the true copy to restore from.
use super::{ClockError, halt, kernel};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Offsets into the stub (generated from its symbols).
pub struct Layout {
    pub data: u64,
    pub clock_gettime: u64,
    pub gettimeofday: u64,
    pub time: Option<u64>,
}

include!("stub_layout.rs");

#[cfg(target_arch = "x86_64")]
const STUB: (&[u8], &Layout) = (include_bytes!("stub_x86_64.bin"), &X86_64);
#[cfg(target_arch = "aarch64")]
const STUB: (&[u8], &Layout) = (include_bytes!("stub_aarch64.bin"), &AARCH64);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const STUB: (&[u8], &Layout) = (&[], &X86_64);

/// The vDSO functions that jump to the stub, and where in it.
fn entry_points(l: &Layout) -> Vec<(&'static str, u64)> {
    let mut e = if cfg!(target_arch = "x86_64") {
        vec![
            ("__vdso_clock_gettime", l.clock_gettime),
            ("__vdso_gettimeofday", l.gettimeofday),
        ]
    } else if cfg!(target_arch = "aarch64") {
        vec![
            ("__kernel_clock_gettime", l.clock_gettime),
            ("__kernel_gettimeofday", l.gettimeofday),
        ]
    } else {
        Vec::new()
    };
    if let (true, Some(time)) = (cfg!(target_arch = "x86_64"), l.time) {
        e.push(("__vdso_time", time));
    }
    e
}

/// The stub's data (`struct skew` in stub.c): what it moves, and until when. (The target
/// cannot write its vDSO, so the stub keeps no counts.)
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Page {
    /// Bit n set: clock id n is moved by the stub itself (none where the kernel side moves
    /// results).
    pub clocks: u64,
    pub offset_ns: i64,
    pub drift_ppm: i64,
    pub origin_ns: i64,
    pub deadline_ns: i64,
    pub bound_ns: i64,
    pub heartbeat_ns: i64,
}

/// Where in [`Page`] the heartbeat is.
const HEARTBEAT_AT: u64 = 48;
const PAGE_LEN: usize = 56;

impl Page {
    fn bytes(&self) -> [u8; PAGE_LEN] {
        let words = [
            self.clocks,
            self.offset_ns as u64,
            self.drift_ppm as u64,
            self.origin_ns as u64,
            self.deadline_ns as u64,
            self.bound_ns as u64,
            self.heartbeat_ns as u64,
        ];
        let mut out = [0u8; PAGE_LEN];
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        out
    }
}

/// One function's entry: where, the jump that replaces its first bytes, and those bytes.
pub struct Entry {
    pub offset: u64,
    pub jump: Vec<u8>,
    pub original: Vec<u8>,
}

/// This kernel's vDSO as the stub sees it.
pub struct Image {
    pub len: u64,
    /// Where the stub goes, and the (zero) bytes it covers.
    pub stub_at: u64,
    pub slack: Vec<u8>,
    pub entries: Vec<Entry>,
}

/// The [vdso] mapping of `pid`: start and length.
pub fn mapping(pid: &str) -> io::Result<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    for line in maps.lines() {
        if !line.ends_with("[vdso]") {
            continue;
        }
        let range = line.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("", ""));
        let (a, b) = (
            u64::from_str_radix(a, 16).map_err(io::Error::other)?,
            u64::from_str_radix(b, 16).map_err(io::Error::other)?,
        );
        return Ok((a, b.saturating_sub(a)));
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "no [vdso] mapping"))
}

/// The jump from `from` to `to` (offsets in one image).
fn jump(from: u64, to: u64) -> Option<Vec<u8>> {
    let rel = i64::try_from(to)
        .ok()?
        .checked_sub(i64::try_from(from).ok()?)?;
    if cfg!(target_arch = "aarch64") {
        // b imm26: a word-aligned offset within ±128 MiB.
        if rel % 4 != 0 || !(-(1 << 27)..(1 << 27)).contains(&rel) {
            return None;
        }
        let word = 0x1400_0000u32 | ((rel >> 2) as u32 & 0x03ff_ffff);
        Some(word.to_le_bytes().to_vec())
    } else {
        // jmp rel32, relative to the next instruction.
        let rel = i32::try_from(rel.checked_sub(5)?).ok()?;
        let mut code = vec![0xe9];
        code.extend_from_slice(&rel.to_le_bytes());
        Some(code)
    }
}

/// Where the ELF file ends in `image`: past its last section, segment and section header.
fn file_end(image: &[u8], elf: &object::File) -> u64 {
    use object::{Object, ObjectSection, ObjectSegment};
    let word = |at: usize, n: usize| -> u64 {
        image.get(at..at + n).map_or(0, |b| {
            b.iter()
                .rev()
                .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte))
        })
    };
    // ELF64: e_shoff at 0x28, e_shentsize at 0x3a, e_shnum at 0x3c (little-endian on both
    // architectures we build for).
    let headers = word(0x28, 8).saturating_add(word(0x3a, 2).saturating_mul(word(0x3c, 2)));
    let sections = elf.sections().filter_map(|s| s.file_range());
    let segments = elf.segments().map(|s| s.file_range());
    sections
        .chain(segments)
        .map(|(at, len)| at.saturating_add(len))
        .fold(headers, u64::max)
}

/// This kernel's vDSO, read from the engine's own once (it is the kernel's, the same for every
/// process until reboot).
pub fn image() -> Result<&'static Image, ClockError> {
    static IMAGE: std::sync::OnceLock<Result<Image, ClockError>> = std::sync::OnceLock::new();
    IMAGE.get_or_init(read_image).as_ref().map_err(Clone::clone)
}

fn read_image() -> Result<Image, ClockError> {
    let (stub, layout) = STUB;
    let (base, len) = mapping("self").map_err(|e| kernel("find this process's vDSO", e))?;
    let mut image = vec![0u8; usize::try_from(len).unwrap_or(0)];
    File::open("/proc/self/mem")
        .and_then(|f| f.read_exact_at(&mut image, base))
        .map_err(|e| kernel("read this process's vDSO", e))?;
    use object::{Object, ObjectSegment, ObjectSymbol};
    let elf = object::File::parse(&*image).map_err(|e| kernel("parse the vDSO", e))?;
    let vaddr = elf.segments().next().map_or(0, |s| s.address());
    let stub_at = file_end(&image, &elf).next_multiple_of(16);
    let end = stub_at.saturating_add(stub.len() as u64);
    let slack = usize::try_from(stub_at)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(a, b)| image.get(a..b))
        .filter(|s| !stub.is_empty() && s.iter().all(|b| *b == 0))
        .ok_or_else(|| {
            ClockError::Unsupported(format!(
                "this kernel's vDSO has {} spare bytes after its image, and the clock stub \
                 needs {}",
                len.saturating_sub(stub_at),
                stub.len()
            ))
        })?
        .to_vec();
    let mut entries = Vec::new();
    for (symbol, at) in entry_points(layout) {
        let Some(sym) = elf.dynamic_symbols().find(|s| s.name() == Ok(symbol)) else {
            continue;
        };
        let offset = sym.address().saturating_sub(vaddr);
        let Some(code) = jump(offset, stub_at.saturating_add(at)) else {
            continue;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let original = image.get(start..start.saturating_add(code.len()));
        match original {
            Some(original) if sym.size() >= code.len() as u64 => entries.push(Entry {
                offset,
                jump: code,
                original: original.to_vec(),
            }),
            _ => tracing::warn!(symbol, "vDSO function too small to patch"),
        }
    }
    if entries.is_empty() {
        return Err(ClockError::Unsupported(
            "this architecture's vDSO has no clock function we can patch".into(),
        ));
    }
    Ok(Image {
        len,
        stub_at,
        slack,
        entries,
    })
}

/// A patched process: its vDSO's address and its memory, held open (a pid reused since
/// is another process, and this descriptor does not reach it).
pub struct Target {
    pub base: u64,
    mem: File,
}

impl Image {
    /// The bytes a patch changes, as absolute ranges in a process whose vDSO is at `base`.
    fn ranges(&self, base: u64) -> Vec<(u64, u64)> {
        let mut r: Vec<(u64, u64)> = self
            .entries
            .iter()
            .map(|e| (base + e.offset, base + e.offset + e.jump.len() as u64))
            .collect();
        r.push((
            base + self.stub_at,
            base + self.stub_at + self.slack.len() as u64,
        ));
        r
    }

    fn page_at(&self) -> u64 {
        self.stub_at + STUB.1.data
    }

    /// Patches `pid` with `page` as the stub's data; None if its vDSO is not this image (a
    /// 32-bit process's) and so was left alone.
    pub fn patch(&self, pid: u32, page: &Page) -> io::Result<Option<Target>> {
        let Some(target) = self.open_if(pid, |e, have| have == e.original || have == e.jump)?
        else {
            return Ok(None);
        };
        let (base, mem) = (target.base, &target.mem);
        let mut stub = STUB.0.to_vec();
        let data = usize::try_from(STUB.1.data).unwrap_or(usize::MAX);
        if let Some(slot) = stub.get_mut(data..data.saturating_add(PAGE_LEN)) {
            slot.copy_from_slice(&page.bytes());
        }
        halt::with_threads_stopped(pid, &self.ranges(base), || {
            mem.write_all_at(&stub, base + self.stub_at)?;
            for e in &self.entries {
                mem.write_all_at(&e.jump, base + e.offset)?;
            }
            Ok(())
        })?;
        Ok(Some(target))
    }

    /// `pid` if its vDSO holds this image's jumps (a patch some engine left), to restore.
    pub fn patched(&self, pid: u32) -> io::Result<Option<Target>> {
        self.open_if(pid, |e, have| have == e.jump)
    }

    /// `pid`'s memory, held open, if its vDSO is this image and every entry's bytes pass
    /// `accept`; None otherwise (a 32-bit process's vDSO, or code we did not write).
    fn open_if(
        &self,
        pid: u32,
        accept: impl Fn(&Entry, &[u8]) -> bool,
    ) -> io::Result<Option<Target>> {
        let (base, len) = mapping(&pid.to_string())?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))?;
        if len != self.len {
            return Ok(None);
        }
        for e in &self.entries {
            let mut have = vec![0u8; e.jump.len()];
            mem.read_exact_at(&mut have, base + e.offset)?;
            if !accept(e, &have) {
                return Ok(None);
            }
        }
        Ok(Some(Target { base, mem }))
    }

    /// Puts the true vDSO back; false if the process has gone (or exec'd: a new image).
    pub fn restore(&self, pid: u32, target: &Target) -> io::Result<bool> {
        if mapping(&pid.to_string()).ok().map(|m| m.0) != Some(target.base) {
            return Ok(false);
        }
        let base = target.base;
        let mut have = vec![0u8; 1];
        if target.mem.read_exact_at(&mut have, base).is_err() {
            return Ok(false); // the descriptor's process is gone
        }
        halt::with_threads_stopped(pid, &self.ranges(base), || {
            for e in &self.entries {
                target.mem.write_all_at(&e.original, base + e.offset)?;
            }
            target.mem.write_all_at(&self.slack, base + self.stub_at)
        })?;
        Ok(true)
    }

    /// Tells the stub in `target` that its owner is alive (data, not code: no stop needed).
    pub fn beat(&self, target: &Target, now_ns: i64) -> io::Result<()> {
        let at = target.base + self.page_at() + HEARTBEAT_AT;
        target.mem.write_all_at(&now_ns.to_ne_bytes(), at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_s_data_is_aligned_and_its_entries_inside_it() {
        for (stub, l) in [
            (&include_bytes!("stub_x86_64.bin")[..], &X86_64),
            (&include_bytes!("stub_aarch64.bin")[..], &AARCH64),
        ] {
            assert_eq!(l.data % 8, 0);
            assert!(l.data as usize + PAGE_LEN <= stub.len());
            for at in [Some(l.clock_gettime), Some(l.gettimeofday), l.time]
                .into_iter()
                .flatten()
            {
                assert!((at as usize) < stub.len());
                assert!(!(l.data..l.data + PAGE_LEN as u64).contains(&at));
            }
        }
    }

    #[test]
    fn jumps_encode_their_distance() {
        if cfg!(target_arch = "x86_64") {
            assert_eq!(jump(0x100, 0x200), Some(vec![0xe9, 0xfb, 0, 0, 0]));
            assert_eq!(jump(0x200, 0x100), Some(vec![0xe9, 0xfb, 0xfe, 0xff, 0xff]));
        } else {
            // b #0x100
            assert_eq!(
                jump(0x100, 0x200),
                Some(0x1400_0040u32.to_le_bytes().to_vec())
            );
            assert_eq!(jump(0x100, 0x102), None);
        }
    }
}
