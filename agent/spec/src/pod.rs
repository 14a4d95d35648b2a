//! Pod UIDs: the one pod identity a fault names, checked where specs are parsed.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PodError {
    #[error("invalid pod uid: `{0}` must be a UUID like 6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c")]
    BadUid(String),
    #[error("pod {0}: no process of it runs on this node (no /proc/*/cgroup names it)")]
    NotFound(String),
    #[error("{0}: {1}")]
    Io(String, String),
}

/// A pod UID in its canonical form (lowercase, with dashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUid(String);

impl std::str::FromStr for PodUid {
    type Err = PodError;
    fn from_str(s: &str) -> Result<Self, PodError> {
        let canon = s.trim().to_ascii_lowercase().replace('_', "-");
        let groups: Vec<&str> = canon.split('-').collect();
        let shape = [8, 4, 4, 4, 12];
        let ok = groups.len() == 5
            && groups
                .iter()
                .zip(shape)
                .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
        if ok {
            Ok(PodUid(canon))
        } else {
            Err(PodError::BadUid(s.to_string()))
        }
    }
}

impl PodUid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
