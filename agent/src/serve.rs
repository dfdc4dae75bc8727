//! Answers the operator's requests to this device over NATS request/reply: the tail of a
//! deployment's logs and one-shot exec in its container.
//!
//! Only the operator can publish them: NATS lets a device subscribe to its own
//! `fleet.dev.<device>.>` subjects only, and only the operator may publish there. But a
//! JetStream consumer's deliveries reach any subject its creator names, whatever the creator
//! may publish, so another device can make the server deliver stream messages here. A request
//! is served only when its reply subject is under the operator's inbox
//! ([`names::OPERATOR_INBOX`]) and its body is a well-formed request; anything else is dropped
//! and counted (the count goes out with the heartbeat). Replies are capped at
//! [`MAX_REPLY_BYTES`] so an oversized output cannot break the connection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use fleet_contracts::{
    names,
    names::follow_ack_subject,
    rpc::{
        ExecReply, ExecRequest, FOLLOW_ACK_TIMEOUT_SECS, FOLLOW_MAX_BYTES, FOLLOW_WINDOW,
        FollowAck, LogsChunk, LogsReply, LogsRequest, MAX_REPLY_BYTES,
    },
};
use futures::StreamExt;
use tracing::{debug, info, warn};

use crate::{
    podman::{Podman, container_name},
    runner::CommandRunner,
};

/// A request of the operator to this device, as received.
#[derive(Debug)]
enum Request {
    Logs(LogsRequest),
    Exec(ExecRequest),
}

/// The request in `payload` if it is a well-formed operator request answering to `reply`:
/// `None` for anything else (a reply outside the operator's inbox, a body that is not the
/// request, a follow session id that is not a plain subject token).
fn accept(is_logs: bool, reply: Option<&str>, payload: &[u8]) -> Option<Request> {
    if !reply.is_some_and(|r| names::is_reply_under(r, names::OPERATOR_INBOX)) {
        return None;
    }
    if is_logs {
        let req: LogsRequest = serde_json::from_slice(payload).ok()?;
        if let Some(session) = &req.follow_session {
            names::check_name(session).ok()?;
        }
        Some(Request::Logs(req))
    } else {
        serde_json::from_slice(payload).ok().map(Request::Exec)
    }
}

/// Serves logs and exec requests until the connection closes; `dropped` counts what was not a
/// well-formed operator request.
pub async fn serve<R: CommandRunner + 'static>(
    client: async_nats::Client,
    device: String,
    podman: Arc<Podman<R>>,
    dropped: Arc<AtomicU64>,
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
        let reply = msg.reply.clone();
        let Some(request) = accept(is_logs, reply.as_deref(), &msg.payload) else {
            let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
            debug!(subject = %msg.subject, reply = ?reply.as_deref().map(|r| r.chars().take(80).collect::<String>()),
                dropped = n, "dropped a message that is not a well-formed operator request");
            continue;
        };
        let reply = reply.expect("accepted requests have a reply subject");
        let (client, podman, device) = (client.clone(), podman.clone(), device.clone());
        // Each request on its own task: a slow exec must not hold up a logs request.
        tokio::spawn(async move {
            let body = match request {
                Request::Logs(LogsRequest {
                    follow_session: Some(session),
                    deployment,
                    tail,
                    ..
                }) => {
                    let f = Follow {
                        client: &client,
                        device: &device,
                        session: &session,
                        reply,
                    };
                    return f.run(&podman, &deployment, tail).await;
                }
                Request::Logs(req) => serde_json::to_vec(&logs_reply(&podman, &req).await),
                Request::Exec(req) => serde_json::to_vec(&exec_reply(&podman, &req).await),
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
    match podman.logs(&name, req.tail, MAX_REPLY_BYTES).await {
        Ok((lines, truncated)) => LogsReply::Lines { lines, truncated },
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

/// One live-follow session: `podman logs -f`, batched into [`LogsChunk`]s sent to the
/// follower's inbox, at most [`FOLLOW_WINDOW`] chunks ahead of its acknowledgements. It ends
/// when the follower says stop or goes quiet, the container's log ends, or a cap is reached.
struct Follow<'a> {
    client: &'a async_nats::Client,
    device: &'a str,
    session: &'a str,
    reply: async_nats::Subject,
}

/// A follow session ends after this long (NATS lets a device answer a request for 10 minutes);
/// the follower starts a new one.
const FOLLOW_MAX_DURATION: Duration = Duration::from_secs(9 * 60);
const BATCH_LINES: usize = 256;
const BATCH_BYTES: usize = 32 * 1024;

impl Follow<'_> {
    async fn run<R: CommandRunner>(self, podman: &Podman<R>, deployment: &str, tail: u32) {
        let name = container_name(deployment);
        if names::check_name(deployment).is_err() || !podman.exists(&name).await {
            let reason = format!("deployment {deployment} has no container on this device");
            return self.send(0, vec![], Some(reason)).await;
        }
        let acks = self
            .client
            .subscribe(follow_ack_subject(self.device, self.session))
            .await;
        let (Ok(mut acks), Ok(mut lines)) = (acks, podman.follow(&name, tail)) else {
            return self
                .send(0, vec![], Some("cannot start following the log".into()))
                .await;
        };
        info!(%deployment, session = %self.session, "following logs");
        let started = crate::clock::now();
        let (mut seq, mut acked, mut sent_bytes) = (0u64, 0u64, 0u64);
        let mut last_ack = started;
        let (mut batch, mut batch_bytes) = (Vec::new(), 0usize);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let end = loop {
            let room = seq < acked + FOLLOW_WINDOW;
            tokio::select! {
                ack = acks.next() => match ack.map(|m| serde_json::from_slice::<FollowAck>(&m.payload)) {
                    Some(Ok(a)) if a.stop => break "stopped by the follower".to_owned(),
                    Some(Ok(a)) => {
                        acked = acked.max(a.seq);
                        last_ack = crate::clock::now();
                    }
                    Some(Err(_)) => {}
                    None => break "the acknowledgement subscription closed".to_owned(),
                },
                line = lines.next(), if room => match line {
                    Some(line) => {
                        batch_bytes += line.len() + 1;
                        batch.push(line);
                        if batch.len() >= BATCH_LINES || batch_bytes >= BATCH_BYTES {
                            seq += 1;
                            sent_bytes += batch_bytes as u64;
                            self.send(seq, std::mem::take(&mut batch), None).await;
                            batch_bytes = 0;
                        }
                    }
                    None => break "the container's log ended".to_owned(),
                },
                _ = tick.tick() => {
                    if !batch.is_empty() && room {
                        seq += 1;
                        sent_bytes += batch_bytes as u64;
                        self.send(seq, std::mem::take(&mut batch), None).await;
                        batch_bytes = 0;
                    }
                    if last_ack.elapsed() > Duration::from_secs(FOLLOW_ACK_TIMEOUT_SECS) {
                        break "the follower went away".to_owned();
                    }
                    if sent_bytes > FOLLOW_MAX_BYTES {
                        break format!("the session reached its {FOLLOW_MAX_BYTES}-byte cap");
                    }
                    if started.elapsed() > FOLLOW_MAX_DURATION {
                        break "the session reached its time limit; follow again".to_owned();
                    }
                }
            }
        };
        // Dropping `lines` stops podman logs -f.
        drop(lines);
        info!(%deployment, session = %self.session, reason = %end, "follow ended");
        self.send(seq + 1, std::mem::take(&mut batch), Some(end))
            .await;
    }

    async fn send(&self, seq: u64, lines: Vec<String>, end: Option<String>) {
        let chunk = LogsChunk { seq, lines, end };
        let bytes = serde_json::to_vec(&chunk).expect("chunks serialize");
        if let Err(e) = self.client.publish(self.reply.clone(), bytes.into()).await {
            warn!(error = %e, "cannot send a log chunk");
        }
    }
}
