//! disk-fill: one file of a reserved name (`.chaos-disk-fill-<fault id>`) that takes a
//! filesystem to the asked level and holds it there.
//!
//! **Where.** The path is resolved inside the target's root (`/proc/PID/root`, or a pod's
//! container process's) with `openat2(RESOLVE_IN_ROOT)`, so a symlink planted by the target
//! cannot point the fill at the host's own directories.
//!
//! **How full.** Levels are counted as `df` counts them: used / (used + available to an
//! application). The file is `fallocate`d (instant, no data written), falling back to writing
//! zeros where the filesystem cannot; then the level is measured again and corrected once (a
//! filesystem's metadata takes its share). A level that leaves nothing available also takes the
//! blocks reserved for root, so a root writer gets ENOSPC too. A keeper thread measures every
//! 500 ms: if the application freed space, the file grows back to the asked level (never
//! beyond it; a `--bytes` fill stays at its size).
//!
//! **Nothing left.** A [guard](crate::guard) holding the directory unlinks the file if the
//! engine dies or the deadline passes; the journal names the file (path, device, inode) for the
//! next engine if both die. Revert unlinks it and closes the engine's only descriptor, so no
//! deleted-but-open file keeps the space. A filesystem that holds the engine's journal is
//! refused unless forced: a full journal disk would keep the engine from recording faults.
use crate::guard::{Guard, Op};
use crate::spec::{FillLevel, InvalidInput, MountRef, invalid};
use crate::undo::Undo;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("disk-fill {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// The reserved name's prefix (the fault id follows).
pub const FILE_PREFIX: &str = ".chaos-disk-fill-";
/// How often the keeper measures the level.
const KEEP_EVERY: Duration = Duration::from_millis(500);
/// Chunk of the write fallback.
const CHUNK: usize = 1 << 20;

/// A filesystem's space as an application sees it.
#[derive(Debug, Clone, Copy)]
struct Space {
    /// Bytes an unprivileged writer may still use (f_bavail).
    avail: u64,
    /// Bytes free including root's reserve (f_bfree).
    free: u64,
    /// used + avail: what df's percentage is of.
    capacity: u64,
}

fn space(fd: RawFd) -> io::Result<Space> {
    // SAFETY: fstatvfs fills our struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    let blocks = st.f_blocks as u64;
    let free = (st.f_bfree as u64).saturating_mul(unit);
    let avail = (st.f_bavail as u64).saturating_mul(unit);
    let used = blocks.saturating_mul(unit).saturating_sub(free);
    Ok(Space {
        avail,
        free,
        capacity: used.saturating_add(avail),
    })
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// Opens directory `path` inside `root` as if `root` were `/`.
fn open_in_root(root: &Path, path: &str) -> io::Result<OwnedFd> {
    let root = File::open(root)?;
    let rel = CString::new(path.trim_start_matches('/').to_string().into_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let rel = if rel.as_bytes().is_empty() {
        c".".to_owned()
    } else {
        rel
    };
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads our struct and path; returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The root the path is in, as the engine can reach it.
fn root_of(mount: &MountRef) -> Result<PathBuf, InvalidInput> {
    match mount {
        MountRef::Own => Ok(PathBuf::from("/")),
        MountRef::Pid(pid) => {
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            if !root.exists() {
                return Err(invalid("--pid", format!("no process {pid}")));
            }
            Ok(root)
        }
        MountRef::Pod(uid) => {
            let pod = crate::pod::scan_uid(Path::new("/proc"), uid)?;
            let pid = pod
                .containers()
                .into_values()
                .flatten()
                .next()
                .ok_or_else(|| {
                    invalid("--pod-uid", format!("pod {uid} has no running container"))
                })?;
            Ok(PathBuf::from(format!("/proc/{pid}/root")))
        }
    }
}

/// The file size that takes `s` to `level`, given the file already holds `held`.
fn wanted_size(level: FillLevel, s: Space, held: u64) -> Option<u64> {
    match level {
        FillLevel::Bytes(b) => Some(b),
        FillLevel::Leave(0) => Some(held.saturating_add(s.free)),
        FillLevel::Percent(p) if p >= 100.0 => Some(held.saturating_add(s.free)),
        FillLevel::Leave(left) => s
            .avail
            .checked_sub(left)
            .map(|more| held.saturating_add(more)),
        FillLevel::Percent(p) => {
            let left = (s.capacity as f64 * (100.0 - p) / 100.0).round() as u64;
            s.avail
                .checked_sub(left)
                .map(|more| held.saturating_add(more))
        }
    }
}

/// A filled filesystem.
pub struct Fill {
    file: Option<File>,
    dir: OwnedFd,
    name: CString,
    /// The file as the engine reaches it (for the journal and messages).
    path: PathBuf,
    dev: u64,
    ino: u64,
    guard: Guard,
    held: Arc<AtomicU64>,
    capacity: u64,
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

impl Fill {
    /// Fills the filesystem holding `path` (in `mount`'s root) to `level` until `deadline`.
    /// `protected`: directories whose filesystem is refused without `force`.
    pub fn start(
        id: &str,
        path: &str,
        level: FillLevel,
        mount: &MountRef,
        force: bool,
        protected: &[&Path],
        deadline: SystemTime,
    ) -> Result<Fill, DiskError> {
        let root = root_of(mount)?;
        let shown = root.join(path.trim_start_matches('/'));
        let dir = open_in_root(&root, path).map_err(|e| {
            invalid(
                "--path",
                format!("`{path}` is not a directory the target can see: {e}"),
            )
        })?;
        let io_err = |what, source| DiskError::Io {
            path: shown.clone(),
            what,
            source,
        };
        // SAFETY: fstat fills our struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(dir.as_raw_fd(), &mut st) } != 0 {
            return Err(io_err("stat", io::Error::last_os_error()));
        }
        if !force {
            for p in protected {
                if std::fs::metadata(p).is_ok_and(|m| m.dev() == st.st_dev as u64) {
                    return Err(invalid(
                        "--path",
                        format!(
                            "`{path}` is on the filesystem holding the engine's journal ({}); filling it could stop the engine recording faults (add --force to fill it anyway)",
                            p.display()
                        ),
                    )
                    .into());
                }
            }
        }
        let before = space(dir.as_raw_fd()).map_err(|e| io_err("statvfs", e))?;
        let size = wanted_size(level, before, 0).ok_or_else(|| {
            invalid(
                level_field(level),
                format!(
                    "the filesystem of `{path}` is already past that ({} of {} available)",
                    crate::spec::format_size(before.avail),
                    crate::spec::format_size(before.capacity)
                ),
            )
        })?;
        if let FillLevel::Bytes(b) = level
            && b > before.free
        {
            return Err(invalid(
                "--bytes",
                format!(
                    "{} is more than the {} free on the filesystem of `{path}`",
                    crate::spec::format_size(b),
                    crate::spec::format_size(before.free)
                ),
            )
            .into());
        }
        let name = CString::new(format!("{FILE_PREFIX}{id}"))
            .map_err(|_| invalid("id", "contains a NUL"))?;
        // SAFETY: openat with our NUL-terminated name; returns a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o600,
            )
        };
        if fd < 0 {
            return Err(io_err("create the fill file", io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file
            .metadata()
            .map_err(|e| io_err("stat the fill file", e))?;
        // The guard exists before a byte is taken: from here on the file goes whatever happens.
        let guard = match Guard::spawn(&[Op::Unlink(dir.as_raw_fd(), name.as_ptr())], deadline) {
            Ok(g) => g,
            Err(e) => {
                // SAFETY: unlinking the file we just created, by its directory and name.
                unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) };
                return Err(io_err("start the guard", e));
            }
        };
        let mut fill = Fill {
            file: Some(file),
            dir,
            name,
            path: shown.join(format!("{FILE_PREFIX}{id}")),
            dev: meta.dev(),
            ino: meta.ino(),
            guard,
            held: Arc::new(AtomicU64::new(0)),
            capacity: before.capacity,
            stop: None,
            keeper: None,
        };
        if let Err(e) = fill.grow_to(size).and_then(|()| fill.correct(level)) {
            fill.remove();
            return Err(io_err("allocate", e));
        }
        fill.keep(level);
        Ok(fill)
    }

    /// Grows the file to `size` bytes of allocated space (never shrinks it).
    fn grow_to(&self, size: u64) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        grow(file, size, &self.held)
    }

    /// Measures again and grows once more if the filesystem's own overhead left the level short.
    fn correct(&self, level: FillLevel) -> io::Result<()> {
        if matches!(level, FillLevel::Bytes(_)) {
            return Ok(());
        }
        let s = space(self.dir.as_raw_fd())?;
        match wanted_size(level, s, self.held.load(Ordering::Relaxed)) {
            Some(size) => self.grow_to(size),
            None => Ok(()),
        }
    }

    /// Starts the keeper: every KEEP_EVERY, tops the file up if the application freed space.
    fn keep(&mut self, level: FillLevel) {
        if matches!(level, FillLevel::Bytes(_)) {
            return;
        }
        let Some(file) = self.file.as_ref().and_then(|f| f.try_clone().ok()) else {
            return;
        };
        let Ok(dir) = self.dir.try_clone() else {
            return;
        };
        let held = Arc::clone(&self.held);
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("chaos-disk-fill".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(KEEP_EVERY) {
                    let Ok(s) = space(dir.as_raw_fd()) else {
                        continue;
                    };
                    if let Some(size) = wanted_size(level, s, held.load(Ordering::Relaxed))
                        && let Err(e) = grow(&file, size, &held)
                    {
                        tracing::warn!("disk-fill top-up: {e}");
                    }
                }
            });
        if let Ok(t) = spawned {
            self.stop = Some(stop);
            self.keeper = Some(t);
        }
    }

    /// Stops the keeper, unlinks the file and closes it (its space is free once this returns),
    /// then dismisses the guard.
    pub fn remove(&mut self) {
        self.stop = None;
        if let Some(t) = self.keeper.take() {
            let _ = t.join();
        }
        // SAFETY: unlinking our file by its directory and name.
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        self.file = None;
        self.guard.stop();
    }

    pub fn undo(&self) -> Vec<Undo> {
        vec![Undo::File {
            path: self.path.clone(),
            dev: self.dev,
            ino: self.ino,
        }]
    }

    pub fn guard(&self) -> crate::journal::Owner {
        self.guard.owner()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// seen_bytes: the filesystem's capacity; affected_bytes: what the file holds.
    pub fn counters(&self) -> crate::spec::Counters {
        crate::spec::Counters {
            seen_bytes: self.capacity,
            affected_bytes: self.held.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if self.file.is_some() {
            self.remove();
        }
    }
}

fn level_field(level: FillLevel) -> &'static str {
    match level {
        FillLevel::Percent(_) => "--fill-percent",
        FillLevel::Leave(_) => "--leave",
        FillLevel::Bytes(_) => "--bytes",
    }
}

/// Grows `file` to `size` bytes: fallocate, or zeros written where it is unsupported. A full
/// filesystem ends the growth where it is (that is the point).
fn grow(file: &File, size: u64, held: &AtomicU64) -> io::Result<()> {
    let have = held.load(Ordering::Relaxed);
    if size <= have {
        return Ok(());
    }
    // A request past what the filesystem can allocate (its metadata takes a share of "free")
    // fails as a whole on some filesystems: ask again for a little less, down to what we hold.
    let mut want = size;
    let step = ((size - have) / 64).max(1 << 20);
    loop {
        let len = i64::try_from(want).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fallocate on our descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
            held.store(allocated(file).unwrap_or(want).max(want), Ordering::Relaxed);
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSPC) if want > have.saturating_add(step) => want -= step,
            Some(libc::ENOSPC) => {
                held.store(allocated(file).unwrap_or(have), Ordering::Relaxed);
                return Ok(());
            }
            Some(libc::EOPNOTSUPP) => return write_zeros(file, have, size, held),
            _ => return Err(e),
        }
    }
}

fn allocated(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks().saturating_mul(512))
}

fn write_zeros(file: &File, from: u64, to: u64, held: &AtomicU64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; CHUNK];
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).unwrap_or(CHUNK).min(CHUNK);
        match file.write_at(&zeros[..n], at) {
            Ok(0) => break,
            Ok(w) => at += w as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e),
        }
        held.store(at, Ordering::Relaxed);
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_counted_as_df_counts_them() {
        let s = Space {
            avail: 600,
            free: 650,
            capacity: 1000,
        };
        // 90 %: 100 left available, so 500 more.
        assert_eq!(wanted_size(FillLevel::Percent(90.0), s, 0), Some(500));
        assert_eq!(wanted_size(FillLevel::Percent(30.0), s, 0), None);
        assert_eq!(wanted_size(FillLevel::Leave(100), s, 20), Some(520));
        // Nothing left: root's reserve too.
        assert_eq!(wanted_size(FillLevel::Leave(0), s, 0), Some(650));
        assert_eq!(wanted_size(FillLevel::Bytes(42), s, 0), Some(42));
    }
}
