//! Talking to a running agent.

use std::path::Path;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Status};

async fn send(socket: &Path, req: &Request) -> anyhow::Result<BufReader<UnixStream>> {
    let mut stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `netpol agent` running?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await?;
    Ok(BufReader::new(stream))
}

async fn one_line<T: serde::de::DeserializeOwned>(
    socket: &Path,
    req: &Request,
) -> anyhow::Result<T> {
    let mut reader = send(socket, req).await?;
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.is_empty() {
        anyhow::bail!("the agent at {} closed the connection", socket.display());
    }
    Ok(serde_json::from_str(&line)?)
}

pub async fn status(socket: &Path) -> anyhow::Result<Status> {
    one_line(socket, &Request::Status).await
}

pub async fn counters(socket: &Path) -> anyhow::Result<super::Counters> {
    one_line(socket, &Request::Counters).await
}

pub async fn tally(socket: &Path) -> anyhow::Result<crate::events::TallyReport> {
    one_line(socket, &Request::Tally).await
}

/// The flow judged on the agent's live maps (`Request::Explain`).
pub async fn explain(
    socket: &Path,
    req: &Request,
) -> anyhow::Result<netpol_engine::explain::Explanation> {
    let reply: serde_json::Value = one_line(socket, req).await?;
    if let Some(e) = reply.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or_default());
    }
    Ok(serde_json::from_value(reply)?)
}

/// Returns once the agent's datapath has converged to `digest` (empty: its current input).
pub async fn wait(socket: &Path, digest: &str) -> anyhow::Result<Status> {
    one_line(
        socket,
        &Request::Wait {
            digest: digest.to_string(),
        },
    )
    .await
}

/// Streams raw event lines (JSON) to `on_line` until the agent hangs up or it returns false.
pub async fn observe(socket: &Path, mut on_line: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
    let mut reader = send(socket, &Request::Observe).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if !on_line(line.trim_end()) {
            return Ok(());
        }
    }
}
