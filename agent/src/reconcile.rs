//! The executor: runs [`plan`](crate::plan) against podman, applies its actions and reports the
//! outcome per deployment.
//!
//! It owns the desired map and the memory of failed creates (so a missing image is retried
//! with backoff instead of every pass). It never decides what to do; `plan` does.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    state::{DesiredDeployment, Phase, ReportedDeployment},
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{
    plan::{self, Action, Wanted},
    podman::{CreateSpec, InitOutcome, Observed, Podman},
    runner::CommandRunner,
    sync::{DesiredEvent, DesiredValue},
};

/// First wait before retrying a create that failed; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Failure {
    hash: String,
    message: String,
    retry_at: Instant,
    wait: Duration,
}

/// Where reports go: the NATS outbox in the agent, a vector in tests.
pub trait Reporter {
    fn report(&mut self, key: String, value: Option<Vec<u8>>);
}

impl Reporter for crate::sync::Outbox {
    fn report(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.put(key, v),
            None => self.delete(key),
        }
    }
}

#[derive(Debug)]
pub struct Reconciler<R> {
    device: String,
    podman: Podman<R>,
    /// `None` until the desired state is known (from the cache or a complete replay): the
    /// agent does not touch containers while it does not know what should run.
    desired: Option<BTreeMap<String, DesiredValue>>,
    failures: HashMap<String, Failure>,
    /// What was last reported per deployment, so only changes are sent.
    reported: BTreeMap<String, ReportedDeployment>,
    /// The last podman error, surfaced as a health flag on the heartbeat.
    pub podman_error: Option<String>,
    /// When the last complete pass ended.
    pub last_pass_ms: Option<u64>,
    probes: crate::probe::Probes,
    /// Why each running deployment is not ready, from the last probe round.
    not_ready: HashMap<String, String>,
}

impl<R: CommandRunner> Reconciler<R> {
    pub fn new(device: String, podman: Podman<R>) -> Self {
        Reconciler {
            device,
            podman,
            desired: None,
            failures: HashMap::new(),
            reported: BTreeMap::new(),
            podman_error: None,
            last_pass_ms: None,
            probes: Default::default(),
            not_ready: HashMap::new(),
        }
    }

    /// The desired state to cache, when known; unreadable values are left out.
    pub fn desired_for_cache(&self) -> Option<BTreeMap<String, DesiredDeployment>> {
        let desired = self.desired.as_ref()?;
        Some(
            desired
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_ref().ok()?.clone())))
                .collect(),
        )
    }

    pub fn deployment_count(&self) -> usize {
        self.desired.as_ref().map_or(0, BTreeMap::len)
    }

    /// Seeds the desired state from the on-disk cache.
    pub fn load_cached(&mut self, cached: BTreeMap<String, DesiredDeployment>) {
        self.desired = Some(cached.into_iter().map(|(k, v)| (k, Ok(v))).collect());
    }

    /// Applies a change from NATS. Returns whether the desired state changed.
    pub fn apply(&mut self, event: DesiredEvent) -> bool {
        let desired = self.desired.get_or_insert_with(BTreeMap::new);
        match event {
            DesiredEvent::Snapshot(all) => {
                let changed = *desired != all;
                *desired = all;
                changed
            }
            DesiredEvent::Put(name, value) => desired.insert(name, value.clone()) != Some(value),
            DesiredEvent::Delete(name) => desired.remove(&name).is_some(),
        }
    }

    /// One level-triggered pass: observe, plan, act, observe again, report.
    pub async fn pass(&mut self, reporter: &mut impl Reporter, now_ms: u64) {
        let Some(desired) = &self.desired else { return };
        let observed = match self.podman.list(&self.device).await {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "cannot list containers; will retry");
                self.podman_error = Some(e.to_string());
                return;
            }
        };
        self.podman_error = None;
        let wanted = wanted(desired, &observed, &self.failures);
        let actions = plan::plan(&wanted, &observed);
        let observed = if actions.is_empty() {
            observed
        } else {
            self.act(actions, &wanted, reporter, now_ms).await;
            match self.podman.list(&self.device).await {
                Ok(observed) => observed,
                Err(e) => {
                    self.podman_error = Some(e.to_string());
                    return;
                }
            }
        };
        self.probe(&wanted, &observed).await;
        self.report(&wanted, &observed, reporter, now_ms);
        self.last_pass_ms = Some(now_ms);
    }

    /// Runs the due probes of every running container with the current spec.
    async fn probe(&mut self, wanted: &BTreeMap<String, Wanted>, observed: &[Observed]) {
        let Some(desired) = &self.desired else { return };
        self.not_ready.clear();
        for (deployment, w) in wanted {
            let Some(Ok(d)) = desired.get(deployment) else {
                continue;
            };
            let Some(container) = d.spec.containers.first() else {
                continue;
            };
            let running = observed.iter().find(|o| {
                &o.deployment == deployment
                    && o.spec_hash == w.hash
                    && o.state == crate::podman::ContainerState::Running
            });
            if let (Some(o), false) = (running, container.probes.is_empty()) {
                if let Some(why) = self
                    .probes
                    .check(&self.podman, deployment, &o.id, container)
                    .await
                {
                    self.not_ready.insert(deployment.clone(), why);
                }
            }
        }
        self.probes.retain(|d| wanted.contains_key(d));
    }

    async fn act(
        &mut self,
        actions: Vec<Action>,
        wanted: &BTreeMap<String, Wanted>,
        reporter: &mut impl Reporter,
        now_ms: u64,
    ) {
        for action in actions {
            if let Some(deployment) = creates(&action) {
                let has_init = matches!(
                    self.desired.as_ref().and_then(|d| d.get(deployment)),
                    Some(Ok(d)) if !d.spec.init_containers.is_empty()
                );
                let phase = match (&action, has_init) {
                    (Action::Replace { .. }, _) => Phase::Upgrading,
                    (_, true) => Phase::Initializing,
                    _ => Phase::Creating,
                };
                self.report_one(
                    deployment,
                    &wanted[deployment],
                    phase,
                    String::new(),
                    None,
                    reporter,
                    now_ms,
                );
            }
            self.execute(action, wanted).await;
        }
    }

    async fn execute(&mut self, action: Action, wanted: &BTreeMap<String, Wanted>) {
        let Some(desired) = &self.desired else { return };
        let result = match &action {
            Action::Remove { id, name } => {
                info!(container = %name, "removing a container no deployment wants");
                self.podman.remove(id).await
            }
            Action::Start { deployment, id } => {
                info!(%deployment, "starting a stopped container");
                self.podman.start(id).await
            }
            Action::Create { deployment } | Action::Replace { deployment, .. } => {
                let Some(Ok(d)) = desired.get(deployment) else {
                    return;
                };
                let d = d.clone();
                let w = &wanted[deployment];
                let result = self.create(&action, &d, w).await;
                match &result {
                    Ok(()) => {
                        self.failures.remove(deployment);
                    }
                    Err(e) => {
                        let wait = match self.failures.get(deployment) {
                            Some(f) if f.hash == w.hash => (f.wait * 2).min(MAX_RETRY),
                            _ => FIRST_RETRY,
                        };
                        warn!(%deployment, error = %e, retry_in = ?wait, "deployment failed");
                        self.failures.insert(
                            deployment.clone(),
                            Failure {
                                hash: w.hash.clone(),
                                message: e.to_string(),
                                retry_at: Instant::now() + wait,
                                wait,
                            },
                        );
                    }
                }
                return;
            }
        };
        if let Err(e) = result {
            warn!(error = %e, ?action, "action failed; the next pass retries");
        }
    }

    async fn create(
        &self,
        action: &Action,
        d: &DesiredDeployment,
        w: &Wanted,
    ) -> Result<(), String> {
        if let Action::Replace { old_id, .. } = action {
            let lc = &d.spec.lifecycle;
            info!(deployment = %d.deployment, generation = d.generation, signal = %lc.stop_signal, grace = lc.grace_seconds, "stopping the old container for the new spec");
            let stopped = self
                .podman
                .stop(old_id, lc)
                .await
                .map_err(|e| e.to_string())?;
            if !stopped {
                return Err(format!(
                    "the old container did not exit within {}s of its stop signal and sigkillFallback is off; it keeps running",
                    lc.grace_seconds
                ));
            }
            self.podman
                .remove_now(old_id)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            info!(deployment = %d.deployment, generation = d.generation, "creating the container");
        }
        let container = d
            .spec
            .containers
            .first()
            .ok_or("the desired spec has no container")?;
        // Init containers, in order, each to completion: before every fresh main container.
        for init in &d.spec.init_containers {
            info!(deployment = %d.deployment, init = %init.name, "running init container");
            match self
                .podman
                .run_init(&self.device, &d.deployment, init)
                .await
                .map_err(|e| e.to_string())?
            {
                InitOutcome::Exited { code: 0, .. } => {}
                InitOutcome::Exited { code, log_tail } => {
                    return Err(format!(
                        "init container {:?} exited with code {code}: {log_tail}",
                        init.name
                    ));
                }
                InitOutcome::TimedOut { log_tail } => {
                    return Err(format!(
                        "init container {:?} did not finish within {}s: {log_tail}",
                        init.name, init.timeout_seconds
                    ));
                }
            }
        }
        let id = self
            .podman
            .create(&CreateSpec {
                device: &self.device,
                deployment: &d.deployment,
                generation: d.generation,
                spec_hash: &w.hash,
                container,
                restart: d.spec.restart_policy,
                lifecycle: &d.spec.lifecycle,
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Err(e) = self.podman.start(&id).await {
            // Leave nothing half-made: a created-but-unstartable container would hold the name.
            let _ = self.podman.remove_now(&id).await;
            return Err(e.to_string());
        }
        Ok(())
    }

    fn report(
        &mut self,
        wanted: &BTreeMap<String, Wanted>,
        observed: &[Observed],
        reporter: &mut impl Reporter,
        now_ms: u64,
    ) {
        let Some(desired) = &self.desired else { return };
        let mut lines = Vec::new();
        for (deployment, w) in wanted {
            let value = &desired[deployment];
            let o = observed.iter().find(|o| &o.deployment == deployment);
            let (phase, message) = match value {
                Err(e) => (Phase::Failed, e.clone()),
                Ok(_) => {
                    let failure = self
                        .failures
                        .get(deployment)
                        .filter(|f| f.hash == w.hash)
                        .map(|f| f.message.as_str());
                    let not_ready = self.not_ready.get(deployment).map(String::as_str);
                    plan::phase(w, o, failure, not_ready)
                }
            };
            let container_id = o.filter(|o| o.spec_hash == w.hash).map(|o| o.id.clone());
            lines.push((deployment.clone(), w.clone(), phase, message, container_id));
        }
        for (deployment, w, phase, message, id) in lines {
            self.report_one(&deployment, &w, phase, message, id, reporter, now_ms);
        }
        let gone: Vec<String> = self
            .reported
            .keys()
            .filter(|d| !wanted.contains_key(*d))
            .cloned()
            .collect();
        for deployment in gone {
            self.reported.remove(&deployment);
            self.failures.remove(&deployment);
            reporter.report(names::deployment_key(&self.device, &deployment), None);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn report_one(
        &mut self,
        deployment: &str,
        w: &Wanted,
        phase: Phase,
        message: String,
        container_id: Option<String>,
        reporter: &mut impl Reporter,
        now_ms: u64,
    ) {
        let previous = self.reported.get(deployment);
        let since_ms = match previous {
            Some(p) if p.phase == phase && p.observed_generation == w.generation => p.since_ms,
            _ => now_ms,
        };
        let report = ReportedDeployment {
            schema: SCHEMA_VERSION,
            deployment: deployment.to_owned(),
            observed_generation: w.generation,
            phase,
            message,
            container_id,
            since_ms,
        };
        if previous == Some(&report) {
            return;
        }
        if previous.is_none_or(|p| p.phase != report.phase) {
            info!(%deployment, generation = w.generation, phase = %report.phase, message = %report.message, "deployment phase");
        }
        let bytes = serde_json::to_vec(&report).expect("a report always serializes");
        self.reported.insert(deployment.to_owned(), report);
        reporter.report(names::deployment_key(&self.device, deployment), Some(bytes));
    }
}

fn creates(action: &Action) -> Option<&str> {
    match action {
        Action::Create { deployment } | Action::Replace { deployment, .. } => Some(deployment),
        _ => None,
    }
}

/// The planner's view of the desired state.
fn wanted(
    desired: &BTreeMap<String, DesiredValue>,
    observed: &[Observed],
    failures: &HashMap<String, Failure>,
) -> BTreeMap<String, Wanted> {
    let now = Instant::now();
    desired
        .iter()
        .map(|(name, value)| {
            let w = match value {
                Ok(d) => {
                    let hash = plan::spec_hash(d);
                    let hold = failures
                        .get(name)
                        .is_some_and(|f| f.hash == hash && f.retry_at > now);
                    Wanted {
                        generation: d.generation,
                        hash,
                        restart: d.spec.restart_policy,
                        hold,
                    }
                }
                // Unreadable (a newer schema, say): keep whatever runs, exactly as it is.
                Err(_) => {
                    let current = observed.iter().find(|o| &o.deployment == name);
                    Wanted {
                        generation: current.map_or(0, |o| o.generation),
                        hash: current.map(|o| o.spec_hash.clone()).unwrap_or_default(),
                        restart: fleet_contracts::resource::RestartPolicy::Never,
                        hold: true,
                    }
                }
            };
            (name.clone(), w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::PodmanConfig, runner::RecordingRunner};
    use fleet_contracts::resource::{Container, PodTemplate};

    #[derive(Default)]
    struct Reports(Vec<(String, Option<ReportedDeployment>)>);
    impl Reporter for Reports {
        fn report(&mut self, key: String, value: Option<Vec<u8>>) {
            self.0
                .push((key, value.map(|v| serde_json::from_slice(&v).unwrap())));
        }
    }

    fn desired(image: &str) -> DesiredDeployment {
        DesiredDeployment::new("web", 1, PodTemplate::single(Container::new("web", image)))
    }

    fn reconciler(runner: RecordingRunner) -> Reconciler<RecordingRunner> {
        Reconciler::new(
            "pi-01".into(),
            Podman::new(runner, &PodmanConfig::default()),
        )
    }

    #[tokio::test]
    async fn unknown_desired_state_touches_nothing() {
        let mut r = reconciler(RecordingRunner::default());
        let mut reports = Reports::default();
        r.pass(&mut reports, 1).await;
        assert!(r.podman.runner().calls().is_empty());
        assert!(reports.0.is_empty());
    }

    #[tokio::test]
    async fn failed_create_is_reported_with_podmans_reason_and_held() {
        let runner = RecordingRunner::default();
        runner.answer(0, "[]", ""); // ps
        runner.answer(125, "", "Error: localhost/nope:1: image not known"); // create
        runner.answer(0, "[]", ""); // ps after
        runner.answer(0, "[]", ""); // ps on the next pass
        let mut r = reconciler(runner);
        r.apply(DesiredEvent::Snapshot(
            [("web".to_owned(), Ok(desired("localhost/nope:1")))].into(),
        ));
        let mut reports = Reports::default();
        r.pass(&mut reports, 1).await;
        let phases: Vec<_> = reports
            .0
            .iter()
            .map(|(_, r)| r.as_ref().unwrap().phase)
            .collect();
        assert_eq!(phases, vec![Phase::Creating, Phase::Failed]);
        let failed = reports.0[1].1.as_ref().unwrap();
        assert_eq!(
            failed.message,
            "podman create failed: Error: localhost/nope:1: image not known"
        );
        assert_eq!(reports.0[1].0, "pi-01.web");
        // The next pass, before the retry time, does not call create again nor re-report.
        r.pass(&mut reports, 2).await;
        assert_eq!(reports.0.len(), 2);
        let creates = r
            .podman
            .runner()
            .calls()
            .iter()
            .filter(|c| c.contains(" create "))
            .count();
        assert_eq!(creates, 1);
    }

    #[tokio::test]
    async fn unreadable_desired_value_keeps_the_running_container() {
        let runner = RecordingRunner::default();
        let ps = r#"[{"Id":"c1","Names":["fleet-web"],"State":"running","Labels":{"fleet.device":"pi-01",
            "fleet.deployment":"web","fleet.generation":"1","fleet.spec-hash":"old"}}]"#;
        runner.answer(0, ps, "");
        let mut r = reconciler(runner);
        r.apply(DesiredEvent::Snapshot(
            [("web".to_owned(), Err("cannot read: schema 9".to_owned()))].into(),
        ));
        let mut reports = Reports::default();
        r.pass(&mut reports, 1).await;
        assert_eq!(
            r.podman.runner().calls().len(),
            1,
            "only ps: {:?}",
            r.podman.runner().calls()
        );
        let report = reports.0[0].1.as_ref().unwrap();
        assert_eq!(
            (report.phase, report.message.as_str()),
            (Phase::Failed, "cannot read: schema 9")
        );
    }
}
