//! The fault engine in chaosctl's own process, for `--local` runs.
use anyhow::{Context, Result};
use chaos_agent::datapath::AttachMode;
use chaos_agent::engine::{Engine, EngineConfig};
use std::path::PathBuf;
use std::sync::Arc;

/// Starts the engine (reclaiming what a crashed local run left) with its deadline enforcer.
pub async fn start(journal_dir: PathBuf) -> Result<Arc<Engine>> {
    let attach = match std::env::var("CHAOS_ATTACH").as_deref() {
        Ok("tcx") => AttachMode::Tcx,
        Ok("clsact") => AttachMode::Clsact,
        _ => AttachMode::detect(),
    };
    let config = EngineConfig {
        journal_dir,
        attach,
        ..EngineConfig::default()
    };
    let engine = tokio::task::spawn_blocking(move || Engine::start(config))
        .await?
        .context("start the fault engine")?
        .0;
    engine.spawn_deadline_enforcer();
    Ok(engine)
}
