//! chaosctl's connection to a chaos-controller: mutual TLS with a user certificate, or
//! plaintext on loopback when asked for explicitly.
use anyhow::{Context, Result, bail};
use chaos_agent::tls::{self, TlsFiles};
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint};

/// How to reach the controller (global chaosctl flags).
#[derive(Debug, Clone)]
pub struct ControllerFlags {
    pub url: String,
    pub tls_dir: Option<PathBuf>,
    /// `--as`; unset: the only user certificate in the directory.
    pub user: Option<String>,
    pub insecure_plaintext: bool,
}

/// The user certificate `--as` names, or the only one in `dir`; a missing one names the fix.
pub fn user_files(dir: &Path, user: Option<&str>) -> Result<TlsFiles> {
    let issue = |name: &str| {
        format!(
            "chaosctl certs issue --tls-dir {} --user {name}",
            dir.display()
        )
    };
    if let Some(name) = user {
        let files = TlsFiles::in_dir(dir, &format!("user-{name}"));
        if !files.cert.exists() {
            bail!(
                "--as {name}: no {} (issue one: {})",
                files.cert.display(),
                issue(name)
            );
        }
        return Ok(files);
    }
    let mut users: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("--tls-dir {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let user = name.strip_prefix("user-")?.strip_suffix(".pem")?;
            (!user.ends_with("-key")).then(|| user.to_string())
        })
        .collect();
    users.sort();
    match users.as_slice() {
        [one] => Ok(TlsFiles::in_dir(dir, &format!("user-{one}"))),
        [] => bail!(
            "--as: no user certificate (user-NAME.pem) in {} (issue one: {})",
            dir.display(),
            issue("NAME")
        ),
        many => bail!(
            "--as: {} user certificates in {} ({}): name one",
            many.len(),
            dir.display(),
            many.join(", ")
        ),
    }
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
        let files = user_files(dir, f.user.as_deref())?;
        ep = ep.tls_config(files.client(&parsed.host)?).context("TLS")?;
    }
    ep.connect()
        .await
        .with_context(|| format!("cannot reach chaos-controller at {url}"))
}

/// A call the controller answered with an error that is not the user's (those are refusals,
/// exit 2). The status is kept so the error line can ask TLS why ([`refusal`]).
#[derive(Debug, thiserror::Error)]
#[error("controller: {}", .0.message())]
pub struct CallFailed(pub tonic::Status);

/// Whether a call's failure may hide a refused certificate: the codes hyper's connection errors
/// become.
fn may_hide_tls(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
    )
}

/// Why the controller refused this user's certificate, when `e` is a failure that hides it
/// (tonic's "transport error", "operation was canceled": see [`tls::refusal`]). `None` when the
/// error already says why, or TLS is not the reason.
pub async fn refusal(f: &ControllerFlags, e: &anyhow::Error) -> Option<String> {
    if e.chain().find_map(tls::explain).is_some() {
        return None;
    }
    let hidden = e.chain().any(|c| {
        c.downcast_ref::<tonic::transport::Error>().is_some()
            || c.downcast_ref::<CallFailed>()
                .is_some_and(|CallFailed(s)| may_hide_tls(s.code()))
    });
    let url = tls::ServiceUrl::parse(&f.url).ok().filter(|u| u.tls)?;
    let dir = f.tls_dir.as_ref().filter(|_| hidden)?;
    let files = user_files(dir, f.user.as_deref()).ok()?;
    tls::refusal(&files, &url).await
}

/// A failed call's line: the controller's message, and TLS's reason when the status hides one.
pub async fn failed_line(f: &ControllerFlags, s: tonic::Status) -> String {
    let e = anyhow::Error::new(CallFailed(s));
    match refusal(f, &e).await {
        Some(why) => format!("{e}: {why}"),
        None => e.to_string(),
    }
}
