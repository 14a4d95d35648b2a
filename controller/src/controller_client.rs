//! chaosctl's connection to a chaos-controller: mutual TLS with a user certificate, or
//! plaintext on loopback when asked for explicitly.
use anyhow::{Context, Result, bail};
use chaos_agent::tls::{self, TlsFiles};
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};

/// How to reach the controller (global chaosctl flags).
#[derive(Debug, Clone)]
pub struct ControllerFlags {
    pub url: String,
    pub tls_dir: Option<PathBuf>,
    pub user: String,
    pub insecure_plaintext: bool,
}

pub async fn connect(f: &ControllerFlags) -> Result<Channel> {
    let url = &f.url;
    let parsed = tls::service_url("--controller", url, f.insecure_plaintext)?;
    let mut ep = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--controller `{url}`"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true);
    if parsed.tls {
        let Some(dir) = &f.tls_dir else {
            bail!("--tls-dir: is required for an https:// controller (see `chaosctl certs init`)");
        };
        let files = TlsFiles::in_dir(dir, &format!("user-{}", f.user));
        ep = ep.tls_config(files.client(&parsed.host)?).context("TLS")?;
    }
    ep.connect()
        .await
        .with_context(|| format!("cannot reach chaos-controller at {url}"))
}
