//! Chaos Toolkit experiments (placeholder until the importer lands).
use crate::LoadError;
use crate::model::Experiment;

pub fn is_chaos_toolkit(v: &serde_json::Value) -> bool {
    let typed = |key: &str| {
        v.get(key)
            .and_then(|m| m.as_array())
            .is_some_and(|a| a.iter().any(|s| s.get("type").is_some()))
    };
    typed("method")
        || v.get("steady-state-hypothesis")
            .and_then(|h| h.get("probes"))
            .and_then(|p| p.as_array())
            .is_some_and(|a| a.iter().any(|p| p.get("provider").is_some()))
}

pub fn import(_v: &serde_json::Value, source: &str) -> Result<Experiment, LoadError> {
    Err(LoadError(format!(
        "{source}: Chaos Toolkit import is not implemented yet"
    )))
}
