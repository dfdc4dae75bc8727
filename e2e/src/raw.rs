//! A raw NATS connection with someone's credentials (an enrolled device's key and JWT, or an
//! enrollment token's throwaway user), the way an attacker holding them would connect: no
//! Fleet code in between, only async-nats. It keeps the server's errors, so a test can assert
//! the permission violation the server answered with.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use nkeys::KeyPair;
use tokio::sync::mpsc;

use crate::{TestFleet, WAIT};

/// A connection and the server errors it received.
#[derive(Debug)]
pub struct Conn {
    pub client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Conn {
    /// Waits for the server's permission error naming `what` (e.g. `Publish to "x"`).
    pub async fn violation(&mut self, what: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.errors.recv()).await {
                Ok(Some(e)) if e.contains("Permissions Violation") && e.contains(what) => {
                    return Ok(());
                }
                Ok(Some(e)) => seen.push(e),
                Ok(None) | Err(_) => {
                    bail!("no permission violation for {what}; server errors seen: {seen:?}")
                }
            }
        }
    }

    /// Every server error received so far.
    pub fn errors(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = self.errors.try_recv() {
            out.push(e);
        }
        out
    }

    pub fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client.clone())
    }
}

/// Connects to `fleet` as user `key` with `jwt`, using inbox prefix `inbox` (a device's is
/// `_INBOX.dev.<device>`). No reconnects: a connection the server closes stays closed.
pub async fn connect(fleet: &TestFleet, key: &KeyPair, jwt: &str, inbox: &str) -> Result<Conn> {
    let (tx, errors) = mpsc::unbounded_channel();
    let key = Arc::new(KeyPair::from_seed(&key.seed()?)?);
    let client = async_nats::ConnectOptions::with_jwt(jwt.to_owned(), move |nonce| {
        let key = key.clone();
        async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .add_root_certificates(fleet.nats.ca())
    .require_tls(true)
    .custom_inbox_prefix(inbox)
    .request_timeout(Some(Duration::from_secs(2)))
    .max_reconnects(Some(0))
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            match event {
                async_nats::Event::ServerError(e) => {
                    let _ = tx.send(e.to_string());
                }
                async_nats::Event::Disconnected => {
                    let _ = tx.send("disconnected".to_owned());
                }
                _ => {}
            }
        }
    })
    .connect(fleet.nats.url())
    .await?;
    Ok(Conn { client, errors })
}

/// Connects as a device: `name`'s key and JWT, its own inbox prefix.
pub async fn device(fleet: &TestFleet, name: &str, key: &KeyPair, jwt: &str) -> Result<Conn> {
    connect(fleet, key, jwt, &fleet_contracts::names::device_inbox(name)).await
}

/// Connects as the holder of enrollment token `token` (`<seed>:<jwt>`).
pub async fn token_holder(fleet: &TestFleet, token: &str) -> Result<Conn> {
    let (seed, jwt) = token.split_once(':').context("a token is <seed>:<jwt>")?;
    let key = KeyPair::from_seed(seed)?;
    let claims: fleet_operator::identity::jwt::Claims<fleet_operator::identity::jwt::UserNats> =
        fleet_operator::identity::jwt::decode(jwt)?;
    connect(
        fleet,
        &key,
        jwt,
        &fleet_contracts::names::enroll_inbox(&claims.name),
    )
    .await
}

/// Enrolls device `name` with a fresh key and a token carrying `labels`; returns its key and
/// JWT, as the device would hold them.
pub async fn enroll(
    fleet: &TestFleet,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<(KeyPair, String)> {
    let token = fleet.enrollment_token(labels)?;
    enroll_with(fleet, name, &token).await
}

/// Enrolls device `name` with a fresh key and `token`.
pub async fn enroll_with(fleet: &TestFleet, name: &str, token: &str) -> Result<(KeyPair, String)> {
    let key = KeyPair::new_user();
    let jwt = fleet_agent::identity::enroll(&fleet.nats.url(), &fleet.nats.ca(), name, &key, token)
        .await?;
    Ok((key, jwt))
}
