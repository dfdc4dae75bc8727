//! The one way the operator answers a request from a device or an enrollment token: hear
//! `fleet.<verb>.<token>` in the operators' queue group, on the responder's own connection
//! (it may publish to device and enrollment inboxes only), and answer only on the requester's
//! own inbox. The reply subject is the requester's free choice, so a request whose reply is
//! anywhere else is refused before any work, logged and counted: answering it would be a
//! publish with the operator's rights to a subject the requester chose.
//!
//! What each verb does with a request is the caller's ([`crate::enroll`], [`crate::gateway`]).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
};

use fleet_contracts::names::{self, check_name};
use futures::StreamExt;
use tracing::warn;

use crate::controller::Operator;

/// What to send back, and what to do once it is on its way.
pub struct Answer {
    pub body: Vec<u8>,
    /// Runs after the answer was flushed to the server (never before: e.g. a spent token's
    /// user is revoked only once its holder has its credentials).
    pub then: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("then", &self.then.is_some())
            .finish()
    }
}

impl Answer {
    pub fn json(value: &impl serde::Serialize) -> Answer {
        Answer {
            body: serde_json::to_vec(value).expect("answers serialize"),
            then: None,
        }
    }
}

/// Most requests of one verb handled at once when `concurrent`.
const MAX_IN_FLIGHT: usize = 256;

/// Serves `subject("*")` (a [`names`] function: `fleet.<verb>.*`) on `client` until it closes.
/// `inbox(token)` is the inbox prefix the requester named by `token` owns; `answer(token,
/// payload)` makes the answer. With `concurrent`, requests are handled side by side (at most
/// [`MAX_IN_FLIGHT`]); otherwise one after another, in the order they came.
pub async fn serve<F, Fut>(
    client: async_nats::Client,
    subject: fn(&str) -> String,
    inbox: fn(&str) -> String,
    shared: Arc<Operator>,
    concurrent: bool,
    answer: F,
) where
    F: Fn(String, bytes::Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let prefix = subject("");
    let verb: Arc<str> = prefix.trim_end_matches('.').into();
    // A queue group: with several operators (active/passive), one of them answers each request.
    let subscribed = client
        .queue_subscribe(subject("*"), names::OPERATOR_QUEUE.to_owned())
        .await;
    let mut sub = match subscribed {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, %verb, "cannot serve requests");
            return;
        }
    };
    let answer = Arc::new(answer);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(msg) = sub.next().await {
        let token = msg.subject.as_str().trim_start_matches(&prefix).to_owned();
        let reply = match msg.reply.as_ref().map(|r| r.as_str()) {
            Some(r) if check_name(&token).is_ok() && names::is_reply_under(r, &inbox(&token)) => {
                r.to_owned()
            }
            other => {
                shared
                    .metrics
                    .refused_requests
                    .fetch_add(1, Ordering::Relaxed);
                let shown: String = other.unwrap_or("(none)").chars().take(120).collect();
                warn!(%verb, token = %token.chars().take(64).collect::<String>(), reply = %shown,
                    "refused a request whose reply subject is not the requester's own inbox");
                continue;
            }
        };
        let work = {
            let (client, answer, verb) = (client.clone(), answer.clone(), verb.clone());
            async move {
                let Answer { body, then } = answer(token, msg.payload).await;
                if let Err(e) = client.publish(reply, body.into()).await {
                    warn!(error = %e, %verb, "cannot answer a request");
                }
                if let Some(then) = then {
                    let _ = client.flush().await;
                    then.await;
                }
            }
        };
        if concurrent {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            tokio::spawn(async move {
                work.await;
                drop(slot);
            });
        } else {
            work.await;
        }
    }
}
