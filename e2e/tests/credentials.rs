//! Device credentials over time: an agent renews its NATS JWT before it expires and keeps
//! working past the first JWT's expiry, with no restart and no human.

use anyhow::{Context, Result};
use fleet_contracts::{names, state::Heartbeat};
use fleet_e2e::{TestFleet, WAIT, eventually};

fn jwt_exp(jwt: &str) -> Result<u64> {
    let claims: fleet_operator::identity::jwt::Claims<serde_json::Value> =
        fleet_operator::identity::jwt::decode(jwt)?;
    claims.exp.context("the device JWT has no expiry")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_renews_its_credentials_and_outlives_its_first_jwt() -> Result<()> {
    // Nine-second device JWTs, so the agent renews every six seconds.
    let fleet = TestFleet::start_with(&["--device-jwt-ttl-secs", "9"]).await?;
    let (_sandbox, agent) = fleet.device("pi-01", &[("role", "r")]).await?;
    let jwt_file = agent.state_dir.join("identity/device.jwt");
    let first = eventually("the agent to enroll", WAIT, || async {
        Ok(std::fs::read_to_string(&jwt_file).ok())
    })
    .await?;
    let first_exp = jwt_exp(&first)?;

    // A renewed JWT arrives before the first one expires.
    let renewed = eventually("a renewed JWT", WAIT, || async {
        let current = std::fs::read_to_string(&jwt_file)?;
        Ok((jwt_exp(&current)? > first_exp).then_some(current))
    })
    .await?;
    assert_ne!(renewed, first);

    // And the agent is still at work after the first JWT's expiry: the server cut the old
    // connection at expiry and the agent came back with the renewed credentials.
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let reported = js.get_key_value(names::REPORTED_BUCKET).await?;
    eventually(
        "a heartbeat sent after the first JWT expired",
        WAIT,
        || async {
            let Some(bytes) = reported.get(names::info_key("pi-01")).await? else {
                return Ok(None);
            };
            let hb: Heartbeat = serde_json::from_slice(&bytes)?;
            Ok((hb.sent_at_ms > (first_exp + 3) * 1000).then_some(()))
        },
    )
    .await
}
