//! The audit log: one JSON line per apply and revert (who, what, where, when, result),
//! appended and flushed before the caller gets its answer.
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Audit {
    file: Mutex<File>,
}

impl Audit {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Audit {
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, who: &str, action: &str, node: &str, id: &str, what: &str, result: &str) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = json!({
            "unix_ms": unix_ms, "who": who, "action": action, "agent": node,
            "fault": id, "what": what, "result": result,
        });
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
            tracing::error!("audit log write failed: {e}");
        }
    }
}
