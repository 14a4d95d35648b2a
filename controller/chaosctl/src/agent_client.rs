//! A gRPC client for a chaos-agent on a unix socket.
use anyhow::{Context, Result, bail};
use chaos_proto::agent::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

pub const DEFAULT_AGENT: &str = "unix:///run/chaos/agent.sock";

pub async fn connect(url: &str) -> Result<AgentClient<Channel>> {
    let Some(path) = url.strip_prefix("unix://") else {
        bail!("invalid --agent: `{url}` must be unix:///path/to/agent.sock");
    };
    let path = path.to_string();
    // Dialled once first for a plain answer: tonic's error repeats the OS error and says nothing
    // of what to do.
    if let Err(e) = tokio::net::UnixStream::connect(&path).await {
        let why = e.to_string();
        let why = why
            .split(" (os error")
            .next()
            .unwrap_or(&why)
            .to_lowercase();
        bail!("no chaos-agent at {url} ({why}): start chaos-agent, or add --local");
    }
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://agent.local")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("cannot reach chaos-agent at {url}"))?;
    Ok(AgentClient::new(channel))
}
