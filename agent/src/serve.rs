//! Answers the operator's requests to this device over NATS request/reply: the tail of a
//! deployment's logs and one-shot exec in its container.
//!
//! Only the operator can send them: NATS lets a device subscribe to its own
//! `fleet.dev.<device>.>` subjects only, and only the operator may publish there. Replies are
//! capped at [`MAX_REPLY_BYTES`] so an oversized output cannot break the connection.

use std::{sync::Arc, time::Duration};

use fleet_contracts::{
    api::{ExecReply, ExecRequest, LogsReply, LogsRequest, MAX_REPLY_BYTES},
    names,
};
use futures::StreamExt;
use tracing::{info, warn};

use crate::{
    podman::{Podman, container_name},
    runner::CommandRunner,
};

/// Serves logs and exec requests until the connection closes.
pub async fn serve<R: CommandRunner + 'static>(
    client: async_nats::Client,
    device: String,
    podman: Arc<Podman<R>>,
) {
    let subscribe = |subject: String| {
        let client = client.clone();
        async move { client.subscribe(subject).await }
    };
    let (logs, exec) = match (
        subscribe(names::logs_subject(&device)).await,
        subscribe(names::exec_subject(&device)).await,
    ) {
        (Ok(l), Ok(e)) => (l, e),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot serve logs and exec requests");
            return;
        }
    };
    let mut requests = futures::stream::select(logs.map(|m| (true, m)), exec.map(|m| (false, m)));
    while let Some((is_logs, msg)) = requests.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (client, podman) = (client.clone(), podman.clone());
        // Each request on its own task: a slow exec must not hold up a logs request.
        tokio::spawn(async move {
            let body = if is_logs {
                let answer = match serde_json::from_slice::<LogsRequest>(&msg.payload) {
                    Ok(req) => logs_reply(&podman, &req).await,
                    Err(e) => LogsReply::Error {
                        message: format!("malformed logs request: {e}"),
                    },
                };
                serde_json::to_vec(&answer)
            } else {
                let answer = match serde_json::from_slice::<ExecRequest>(&msg.payload) {
                    Ok(req) => exec_reply(&podman, &req).await,
                    Err(e) => ExecReply::Error {
                        message: format!("malformed exec request: {e}"),
                    },
                };
                serde_json::to_vec(&answer)
            };
            if let Err(e) = client
                .publish(reply, body.expect("replies serialize").into())
                .await
            {
                warn!(error = %e, "cannot answer a request");
            }
        });
    }
}

async fn logs_reply<R: CommandRunner>(podman: &Podman<R>, req: &LogsRequest) -> LogsReply {
    if names::check_name(&req.deployment).is_err() {
        return LogsReply::Error {
            message: format!("invalid deployment name {:?}", req.deployment),
        };
    }
    let name = container_name(&req.deployment);
    if !podman.exists(&name).await {
        return LogsReply::Error {
            message: format!(
                "deployment {} has no container on this device",
                req.deployment
            ),
        };
    }
    match podman.logs(&name, req.tail).await {
        Ok(mut lines) => {
            // Keep the newest lines within the cap.
            let mut size: usize = lines.iter().map(|l| l.len() + 1).sum();
            let mut truncated = false;
            while size > MAX_REPLY_BYTES && !lines.is_empty() {
                size -= lines.remove(0).len() + 1;
                truncated = true;
            }
            LogsReply::Lines { lines, truncated }
        }
        Err(e) => LogsReply::Error {
            message: e.to_string(),
        },
    }
}

async fn exec_reply<R: CommandRunner>(podman: &Podman<R>, req: &ExecRequest) -> ExecReply {
    if names::check_name(&req.deployment).is_err() {
        return ExecReply::Error {
            message: format!("invalid deployment name {:?}", req.deployment),
        };
    }
    if req.command.is_empty() {
        return ExecReply::Error {
            message: "no command given".into(),
        };
    }
    let name = container_name(&req.deployment);
    if !podman.exists(&name).await {
        return ExecReply::Error {
            message: format!(
                "deployment {} has no container on this device",
                req.deployment
            ),
        };
    }
    info!(deployment = %req.deployment, command = ?req.command, "exec requested by the operator");
    let timeout = Duration::from_secs(u64::from(req.timeout_secs.max(1)));
    match tokio::time::timeout(timeout, podman.exec_output(&name, &req.command)).await {
        Err(_) => ExecReply::TimedOut {
            after_secs: req.timeout_secs,
        },
        Ok(Err(e)) => ExecReply::Error {
            message: e.to_string(),
        },
        Ok(Ok(out)) => {
            let cap = MAX_REPLY_BYTES / 2;
            let truncated = out.stdout.len() > cap || out.stderr.len() > cap;
            let text = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(cap)]).into_owned();
            ExecReply::Done {
                exit_code: out.code.unwrap_or(-1),
                stdout: text(&out.stdout),
                stderr: text(&out.stderr),
                truncated,
            }
        }
    }
}
