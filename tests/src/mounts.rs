//! Filesystems a test or benchmark mounts for itself (tmpfs, an ext4 image on a loop device),
//! unmounted on drop even when it fails, and their level as `df` counts it.
use std::path::PathBuf;
use std::process::Command;

/// A filesystem the test mounts (and unmounts on drop, even when the test fails).
pub struct TestMount {
    pub dir: PathBuf,
    image: Option<PathBuf>,
}

impl TestMount {
    pub fn tmpfs(tag: &str, size: &str) -> TestMount {
        crate::require_root();
        let dir = std::env::temp_dir().join(format!("chaos-disk-{tag}-{}", std::process::id()));
        let _ = Command::new("umount").arg(&dir).output();
        std::fs::create_dir_all(&dir).expect("mount point");
        crate::sh_ok(&format!(
            "mount -t tmpfs -o size={size} chaos-test {}",
            dir.display()
        ));
        TestMount { dir, image: None }
    }

    /// An ext4 filesystem of `mib` MiB in a sparse image on a loop device.
    pub fn ext4(tag: &str, mib: u64) -> TestMount {
        crate::require_root();
        let dir = std::env::temp_dir().join(format!("chaos-disk-{tag}-{}", std::process::id()));
        let image = dir.with_extension("img");
        let _ = Command::new("umount").arg(&dir).output();
        std::fs::create_dir_all(&dir).expect("mount point");
        crate::sh_ok(&format!(
            "truncate -s {mib}M {img} && mkfs.ext4 -q -F {img} && mount -o loop {img} {dir}",
            img = image.display(),
            dir = dir.display()
        ));
        TestMount {
            dir,
            image: Some(image),
        }
    }

    pub fn path(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    /// (used percent as df counts it, available bytes).
    pub fn level(&self) -> (f64, u64) {
        let c = std::ffi::CString::new(self.path()).expect("path");
        // SAFETY: statvfs fills our struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs");
        let unit = st.f_frsize as u64;
        let used = (st.f_blocks - st.f_bfree) as u64 * unit;
        let avail = st.f_bavail as u64 * unit;
        (100.0 * used as f64 / (used + avail) as f64, avail)
    }

    pub fn fill_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".chaos-disk-fill-"))
            .collect()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(img) = &self.image {
            let _ = std::fs::remove_file(img);
        }
    }
}
