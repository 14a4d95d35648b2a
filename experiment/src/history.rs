//! The controller's history of runs: one JSON file per run in a directory, written to a
//! temporary name, fsynced and renamed into place, so a crash leaves either the whole record
//! or none of it. A directory of files is the whole "database": it needs no schema migration,
//! `ls` and `jq` read it, and a few thousand game days a year are nowhere near its limits.
use crate::record::{RunRecord, Verdict};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct History {
    dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub id: String,
    pub title: String,
    pub verdict: Option<Verdict>,
    pub started_unix_ms: i64,
    pub duration_ms: u64,
    /// Set when the file could not be read or decoded: listed, not hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl History {
    pub fn open(dir: &Path) -> std::io::Result<History> {
        std::fs::create_dir_all(dir)?;
        Ok(History {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn put(&self, r: &RunRecord) -> std::io::Result<()> {
        if !valid_id(&r.id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("run id `{}` must be letters, digits, - or _", r.id),
            ));
        }
        let tmp = self.dir.join(format!(".{}.tmp", r.id));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(crate::report::json(r).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.path(&r.id))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    pub fn get(&self, id: &str) -> std::io::Result<Option<RunRecord>> {
        if !valid_id(id) {
            return Ok(None);
        }
        match std::fs::read(self.path(id)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("run {id}: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every run, newest first.
    pub fn list(&self) -> std::io::Result<Vec<Summary>> {
        let mut out = vec![];
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|i| valid_id(i)) else {
                continue;
            };
            out.push(match self.get(id) {
                Ok(Some(r)) => Summary {
                    id: r.id,
                    title: r.title,
                    verdict: Some(r.verdict),
                    started_unix_ms: r.started_unix_ms,
                    duration_ms: r.duration_ms,
                    error: None,
                },
                Ok(None) => continue,
                Err(e) => Summary {
                    id: id.to_string(),
                    title: String::new(),
                    verdict: None,
                    started_unix_ms: 0,
                    duration_ms: 0,
                    error: Some(e.to_string()),
                },
            });
        }
        out.sort_by(|a, b| {
            b.started_unix_ms
                .cmp(&a.started_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_list_get_survive_a_reopen_and_report_a_broken_file() {
        let dir = std::env::temp_dir().join(format!("chaos-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = std::sync::Arc::new(History::open(&dir).unwrap());
        let mut tasks = vec![];
        for i in 0..20 {
            let h = h.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut r = crate::report::tests::violated();
                r.id = format!("run-{i:02}");
                r.started_unix_ms += i;
                h.put(&r).unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        std::fs::write(dir.join("broken.json"), b"{not json").unwrap();
        let h = History::open(&dir).unwrap();
        let list = h.list().unwrap();
        assert_eq!(list.len(), 21);
        let good: Vec<&Summary> = list.iter().filter(|s| s.error.is_none()).collect();
        assert_eq!(good[0].id, "run-19");
        assert_eq!(good[19].id, "run-00");
        assert!(list.iter().any(|s| s.id == "broken" && s.error.is_some()));
        let r = h.get("run-07").unwrap().unwrap();
        assert_eq!(r.faults.len(), 2);
        assert!(h.get("nope").unwrap().is_none());
        assert!(h.get("../etc/passwd").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
