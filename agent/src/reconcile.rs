//! The executor: runs [`plan`](crate::plan) against podman, applies its actions and reports the
//! outcome per deployment.
//!
//! It owns the desired map and the memory of failed creates (so a missing image is retried
//! with backoff instead of every pass). It never decides what to do; `plan` does.
//!
//! Each action runs as its own task, at most one per deployment: a 30 s stop grace or a slow
//! init container of one deployment does not hold up the others. A task reports the steps it
//! enters ([`Work::Step`]) and its end ([`Work::Done`]) to the agent's loop, which hands them
//! to [`Reconciler::finish`] and runs the next pass. A deployment whose action is in flight is
//! left alone by the planner until the action ends, and a change that arrives meanwhile is
//! applied right after (roll forward, one step at a time).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    state::{DesiredDeployment, Phase, ReportedDeployment},
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    plan::{self, Action, Wanted},
    podman::{CreateSpec, InitOutcome, Observed, Podman},
    probe::Readiness,
    runner::CommandRunner,
    sync::DesiredValue,
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

/// What an action's task tells the loop.
#[derive(Debug)]
pub enum Work {
    /// A create or replace of spec `hash` entered `phase`.
    Step {
        deployment: String,
        hash: String,
        generation: u64,
        phase: Phase,
    },
    /// The action on `deployment` ended.
    Done {
        deployment: String,
        outcome: Outcome,
    },
}

/// How an action ended.
#[derive(Debug)]
pub enum Outcome {
    /// A stopped container was started (or the start failed; the next resync looks again).
    Started,
    /// A container no deployment wants was removed (or the removal failed).
    Removed,
    /// A create or replace towards spec `hash` ended.
    Created {
        hash: String,
        result: Result<(), String>,
    },
}

/// The receiving end of the actions' reports; the agent's loop owns it.
pub type WorkReceiver = mpsc::UnboundedReceiver<Work>;

#[derive(Debug)]
pub struct Reconciler<R> {
    device: String,
    podman: Arc<Podman<R>>,
    /// `None` until the desired state is known (from the cache or a complete replay): the
    /// agent does not touch containers while it does not know what should run.
    desired: Option<BTreeMap<String, DesiredValue>>,
    failures: HashMap<String, Failure>,
    /// Deployments with an action in flight, with the spec hash a create works towards ("" for
    /// other actions).
    in_flight: HashMap<String, String>,
    work: mpsc::UnboundedSender<Work>,
    /// What was last reported per deployment, so only changes are sent.
    reported: BTreeMap<String, ReportedDeployment>,
    /// The last podman error, surfaced as a health flag on the heartbeat.
    pub podman_error: Option<String>,
    /// When the last complete pass ended.
    pub last_pass_ms: Option<u64>,
    probes: crate::probe::Probes,
    /// What the probes of each running deployment say, from the last probe round.
    readiness: HashMap<String, Readiness>,
}

impl<R: CommandRunner + 'static> Reconciler<R> {
    pub fn new(device: String, podman: Podman<R>) -> (Self, WorkReceiver) {
        let (work, rx) = mpsc::unbounded_channel();
        let r = Reconciler {
            device,
            podman: Arc::new(podman),
            desired: None,
            failures: HashMap::new(),
            in_flight: HashMap::new(),
            work,
            reported: BTreeMap::new(),
            podman_error: None,
            last_pass_ms: None,
            probes: Default::default(),
            readiness: HashMap::new(),
        };
        (r, rx)
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

    /// The deployments not Ready (or Completed) at their desired generation, each with its
    /// phase; `None` while the desired state is unknown.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let desired = self.desired.as_ref()?;
        Some(
            desired
                .iter()
                .filter_map(|(name, value)| {
                    let generation = value.as_ref().ok().map(|d| d.generation);
                    match self.reported.get(name) {
                        Some(r)
                            if Some(r.observed_generation) == generation
                                && matches!(r.phase, Phase::Ready | Phase::Completed) =>
                        {
                            None
                        }
                        Some(r) => Some(format!("{name}: {}", r.phase)),
                        None => Some(format!("{name}: not reported")),
                    }
                })
                .collect(),
        )
    }

    /// Whether an action is still running.
    pub fn busy(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Seeds the desired state from the on-disk cache.
    pub fn load_cached(&mut self, cached: BTreeMap<String, DesiredDeployment>) {
        self.desired = Some(cached.into_iter().map(|(k, v)| (k, Ok(v))).collect());
    }

    /// The desired state in force, once known.
    pub fn desired(&self) -> Option<&BTreeMap<String, DesiredValue>> {
        self.desired.as_ref()
    }

    /// Replaces the desired state (what [`crate::store`] decided to run). Returns whether it
    /// changed.
    pub fn apply(&mut self, all: BTreeMap<String, DesiredValue>) -> bool {
        let desired = self.desired.get_or_insert_with(BTreeMap::new);
        let changed = *desired != all;
        *desired = all;
        changed
    }

    /// One level-triggered pass: observe, plan, start the actions, probe, report. The
    /// actions' outcomes come back through [`Reconciler::finish`].
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
        for action in plan::plan(&wanted, &observed) {
            if !self.in_flight.contains_key(action.deployment()) {
                self.spawn(action, &wanted);
            }
        }
        self.probe(&wanted, &observed).await;
        self.report(&wanted, &observed, reporter, now_ms);
        self.last_pass_ms = Some(now_ms);
    }

    /// Takes a report of an action's task. Returns whether a pass should follow (an action
    /// that changed what runs ended).
    pub fn finish(&mut self, work: Work, reporter: &mut impl Reporter, now_ms: u64) -> bool {
        match work {
            Work::Step {
                deployment,
                hash,
                generation,
                phase,
            } => {
                if self.in_flight.get(&deployment) == Some(&hash) && self.is_desired(&deployment) {
                    self.report_one(
                        &deployment,
                        generation,
                        phase,
                        String::new(),
                        None,
                        reporter,
                        now_ms,
                    );
                }
                false
            }
            Work::Done {
                deployment,
                outcome,
            } => {
                self.in_flight.remove(&deployment);
                let (hash, result) = match outcome {
                    // The next resync looks again, so a container that keeps exiting is not
                    // restarted in a tight loop.
                    Outcome::Started => return false,
                    Outcome::Removed => return true,
                    Outcome::Created { hash, result } => (hash, result),
                };
                match result {
                    Ok(()) => {
                        self.failures.remove(&deployment);
                    }
                    // Deleted meanwhile: nothing to retry.
                    Err(_) if !self.is_desired(&deployment) => {}
                    Err(message) => {
                        let wait = match self.failures.get(&deployment) {
                            Some(f) if f.hash == hash => (f.wait * 2).min(MAX_RETRY),
                            _ => FIRST_RETRY,
                        };
                        warn!(%deployment, error = %message, retry_in = ?wait, "deployment failed");
                        let retry_at = crate::clock::now() + wait;
                        self.failures.insert(
                            deployment,
                            Failure {
                                hash,
                                message,
                                retry_at,
                                wait,
                            },
                        );
                    }
                }
                true
            }
        }
    }

    fn is_desired(&self, deployment: &str) -> bool {
        self.desired
            .as_ref()
            .is_some_and(|d| d.contains_key(deployment))
    }

    /// Starts `action` on its own task.
    fn spawn(&mut self, action: Action, wanted: &BTreeMap<String, Wanted>) {
        let deployment = action.deployment().to_owned();
        let podman = self.podman.clone();
        let tx = self.work.clone();
        match action {
            Action::Remove { id, name, .. } => {
                info!(container = %name, "removing a container no deployment wants");
                self.in_flight.insert(deployment.clone(), String::new());
                tokio::spawn(async move {
                    if let Err(e) = podman.remove(&id).await {
                        warn!(container = %name, error = %e, "remove failed; the next pass retries");
                    }
                    let _ = tx.send(Work::Done {
                        deployment,
                        outcome: Outcome::Removed,
                    });
                });
            }
            Action::Start { id, .. } => {
                info!(%deployment, "starting a stopped container");
                self.in_flight.insert(deployment.clone(), String::new());
                tokio::spawn(async move {
                    if let Err(e) = podman.start(&id).await {
                        // A container that does not start is made again from its spec (its
                        // own writable layer goes; volumes stay): an unclean shutdown can leave
                        // a container's layer files empty, and then no start ever works.
                        warn!(%deployment, error = %e, "the container does not start; removing it so the next pass makes it again from its spec");
                        if let Err(e) = podman.remove_now(&id).await {
                            warn!(%deployment, error = %e, "remove failed; the next pass retries");
                        }
                    }
                    let _ = tx.send(Work::Done {
                        deployment,
                        outcome: Outcome::Started,
                    });
                });
            }
            Action::Create { .. } | Action::Replace { .. } => {
                let Some(Some(Ok(d))) = self.desired.as_ref().map(|x| x.get(&deployment)) else {
                    return;
                };
                let d = d.clone();
                let hash = wanted[&deployment].hash.clone();
                let old_id = match action {
                    Action::Replace { old_id, .. } => Some(old_id),
                    _ => None,
                };
                self.in_flight.insert(deployment.clone(), hash.clone());
                let device = self.device.clone();
                tokio::spawn(async move {
                    let step = |phase| {
                        let _ = tx.send(Work::Step {
                            deployment: deployment.clone(),
                            hash: hash.clone(),
                            generation: d.generation,
                            phase,
                        });
                    };
                    let result = create(&podman, &device, &d, &hash, old_id.as_deref(), step).await;
                    let _ = tx.send(Work::Done {
                        deployment,
                        outcome: Outcome::Created { hash, result },
                    });
                });
            }
        }
    }

    /// Runs the due probes of every running container with the current spec.
    async fn probe(&mut self, wanted: &BTreeMap<String, Wanted>, observed: &[Observed]) {
        let Some(desired) = &self.desired else { return };
        self.readiness.clear();
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
                let readiness = self
                    .probes
                    .check(&self.podman, deployment, &o.id, container)
                    .await;
                self.readiness.insert(deployment.clone(), readiness);
            }
        }
        self.probes.retain(|d| wanted.contains_key(d));
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
            if self.in_flight.contains_key(deployment) {
                // Its task reports the steps it takes.
                continue;
            }
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
                    plan::phase(w, o, failure, self.readiness.get(deployment))
                }
            };
            let container_id = o.filter(|o| o.spec_hash == w.hash).map(|o| o.id.clone());
            lines.push((
                deployment.clone(),
                w.generation,
                phase,
                message,
                container_id,
            ));
        }
        for (deployment, generation, phase, message, id) in lines {
            self.report_one(
                &deployment,
                generation,
                phase,
                message,
                id,
                reporter,
                now_ms,
            );
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
        generation: u64,
        phase: Phase,
        message: String,
        container_id: Option<String>,
        reporter: &mut impl Reporter,
        now_ms: u64,
    ) {
        let previous = self.reported.get(deployment);
        let since_ms = match previous {
            Some(p) if p.phase == phase && p.observed_generation == generation => p.since_ms,
            _ => now_ms,
        };
        let report = ReportedDeployment {
            schema: SCHEMA_VERSION,
            deployment: deployment.to_owned(),
            observed_generation: generation,
            phase,
            message,
            container_id,
            since_ms,
        };
        if previous == Some(&report) {
            return;
        }
        if previous.is_none_or(|p| p.phase != report.phase) {
            info!(%deployment, generation, phase = %report.phase, message = %report.message, "deployment phase");
        }
        let bytes = serde_json::to_vec(&report).expect("a report always serializes");
        self.reported.insert(deployment.to_owned(), report);
        reporter.report(names::deployment_key(&self.device, deployment), Some(bytes));
    }
}

/// Replaces `old_id` (when set) with a fresh container for `d`: stop the old one its way,
/// run the init containers, create, start. `step` hears each phase as it begins.
async fn create<R: CommandRunner>(
    podman: &Podman<R>,
    device: &str,
    d: &DesiredDeployment,
    hash: &str,
    old_id: Option<&str>,
    step: impl Fn(Phase),
) -> Result<(), String> {
    if let Some(old_id) = old_id {
        step(Phase::Upgrading);
        let lc = &d.spec.lifecycle;
        info!(deployment = %d.deployment, generation = d.generation, signal = %lc.stop_signal, grace = lc.grace_seconds, "stopping the old container for the new spec");
        let stopped = podman.stop(old_id, lc).await.map_err(|e| e.to_string())?;
        if !stopped {
            return Err(format!(
                "the old container did not exit within {}s of its stop signal and sigkillFallback is off; it keeps running",
                lc.grace_seconds
            ));
        }
        podman.remove_now(old_id).await.map_err(|e| e.to_string())?;
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
        step(Phase::Initializing);
        info!(deployment = %d.deployment, init = %init.name, "running init container");
        match podman
            .run_init(device, &d.deployment, init)
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
    step(Phase::Creating);
    let id = podman
        .create(&CreateSpec {
            device,
            deployment: &d.deployment,
            generation: d.generation,
            spec_hash: hash,
            container,
            restart: d.spec.restart_policy,
            lifecycle: &d.spec.lifecycle,
        })
        .await
        .map_err(|e| e.to_string())?;
    // Podman writes a new container's layer files (and a pulled image's) without fsync: a
    // power cut in the next half minute could leave them empty and the container unstartable.
    if let Err(e) = tokio::task::spawn_blocking(rustix::fs::sync).await {
        warn!(error = %e, "sync after creating the container failed");
    }
    step(Phase::Starting);
    if let Err(e) = podman.start(&id).await {
        // Leave nothing half-made: a created-but-unstartable container would hold the name.
        let _ = podman.remove_now(&id).await;
        return Err(e.to_string());
    }
    Ok(())
}

/// The planner's view of the desired state.
fn wanted(
    desired: &BTreeMap<String, DesiredValue>,
    observed: &[Observed],
    failures: &HashMap<String, Failure>,
) -> BTreeMap<String, Wanted> {
    let now = crate::clock::now();
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
                        restart: fleet_contracts::spec::RestartPolicy::Never,
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
    use fleet_contracts::spec::{Container, PodTemplate};

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

    fn reconciler(runner: RecordingRunner) -> (Reconciler<RecordingRunner>, WorkReceiver) {
        Reconciler::new(
            "pi-01".into(),
            Podman::new(runner, &PodmanConfig::default()),
        )
    }

    /// A pass, then what the agent's loop does with the actions' reports until none is left.
    async fn settle(
        r: &mut Reconciler<RecordingRunner>,
        rx: &mut WorkReceiver,
        reports: &mut Reports,
        now_ms: u64,
    ) {
        r.pass(reports, now_ms).await;
        while r.busy() {
            let work = rx.recv().await.expect("an action in flight reports");
            if r.finish(work, reports, now_ms) {
                r.pass(reports, now_ms).await;
            }
        }
    }

    #[tokio::test]
    async fn unknown_desired_state_touches_nothing() {
        let (mut r, _rx) = reconciler(RecordingRunner::default());
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
        let (mut r, mut rx) = reconciler(runner);
        r.apply([("web".to_owned(), Ok(desired("localhost/nope:1")))].into());
        let mut reports = Reports::default();
        settle(&mut r, &mut rx, &mut reports, 1).await;
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
        runner.answer(0, &format!("[{}]", ps_entry("web", "c1", "old")), "");
        let (mut r, mut rx) = reconciler(runner);
        r.apply([("web".to_owned(), Err("cannot read: schema 9".to_owned()))].into());
        let mut reports = Reports::default();
        settle(&mut r, &mut rx, &mut reports, 1).await;
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

    fn ps_entry(deployment: &str, id: &str, hash: &str) -> String {
        ps_entry_in(deployment, id, hash, "running")
    }

    fn ps_entry_in(deployment: &str, id: &str, hash: &str, state: &str) -> String {
        format!(
            r#"{{"Id":"{id}","Names":["fleet-{deployment}"],"State":"{state}","Labels":{{"fleet.device":"pi-01",
            "fleet.deployment":"{deployment}","fleet.generation":"1","fleet.spec-hash":"{hash}"}}}}"#
        )
    }

    #[tokio::test]
    async fn a_replace_reports_each_step_and_ends_ready() {
        let new = desired("img:2");
        let hash = plan::spec_hash(&new);
        let runner = RecordingRunner::default();
        runner.answer(0, &format!("[{}]", ps_entry("web", "c1", "old")), "");
        runner.answer(0, "", ""); // stop
        runner.answer(0, "", ""); // rm
        runner.answer(0, "c2\n", ""); // create
        runner.answer(0, "", ""); // start
        runner.answer(0, &format!("[{}]", ps_entry("web", "c2", &hash)), "");
        let (mut r, mut rx) = reconciler(runner);
        r.apply([("web".to_owned(), Ok(new))].into());
        let mut reports = Reports::default();
        settle(&mut r, &mut rx, &mut reports, 1).await;
        let steps: Vec<_> = reports
            .0
            .iter()
            .map(|(_, r)| r.as_ref().unwrap().phase)
            .collect();
        assert_eq!(
            steps,
            [
                Phase::Upgrading,
                Phase::Creating,
                Phase::Starting,
                Phase::Ready
            ]
        );
        let calls = r.podman.runner().calls();
        let verbs: Vec<_> = calls
            .iter()
            .map(|c| c.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(verbs, ["ps", "stop", "rm", "create", "start", "ps"]);
        assert_eq!(
            reports.0[3].1.as_ref().unwrap().container_id.as_deref(),
            Some("c2")
        );
    }

    #[tokio::test]
    async fn a_stopped_container_that_does_not_start_is_made_again_from_its_spec() {
        // What an unclean shutdown shortly after a create leaves: the layer's files empty.
        let d = desired("img:1");
        let hash = plan::spec_hash(&d);
        let runner = RecordingRunner::default();
        runner.answer(
            0,
            &format!("[{}]", ps_entry_in("web", "c1", &hash, "exited")),
            "",
        );
        runner.answer(
            125,
            "",
            "Error: unable to start container \"c1\": mounting storage for container c1: no such file or directory",
        );
        runner.answer(0, "", ""); // rm
        runner.answer(0, "[]", "");
        runner.answer(0, "c2\n", ""); // create
        runner.answer(0, "", ""); // start
        runner.answer(0, &format!("[{}]", ps_entry("web", "c2", &hash)), "");
        let (mut r, mut rx) = reconciler(runner);
        r.apply([("web".to_owned(), Ok(d))].into());
        let mut reports = Reports::default();
        settle(&mut r, &mut rx, &mut reports, 1).await;
        // The next pass finds no container and makes one.
        settle(&mut r, &mut rx, &mut reports, 2).await;
        let calls = r.podman.runner().calls();
        let verbs: Vec<_> = calls
            .iter()
            .map(|c| c.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(verbs, ["ps", "start", "rm", "ps", "create", "start", "ps"]);
        assert!(calls[2].ends_with(" c1"), "{}", calls[2]);
        let last = reports.0.last().unwrap().1.as_ref().unwrap();
        assert_eq!(
            (last.phase, last.container_id.as_deref()),
            (Phase::Ready, Some("c2"))
        );
    }

    #[tokio::test]
    async fn actions_of_different_deployments_are_in_flight_together_and_one_at_a_time_each() {
        let runner = RecordingRunner::default();
        runner.answer(0, "[]", "");
        runner.answer(0, "[]", "");
        let (mut r, mut rx) = reconciler(runner);
        let two = [
            ("api".to_owned(), Ok(desired("img:1"))),
            ("web".to_owned(), Ok(desired("img:1"))),
        ];
        r.apply(two.into());
        let mut reports = Reports::default();
        r.pass(&mut reports, 1).await;
        let mut busy: Vec<_> = r.in_flight.keys().cloned().collect();
        busy.sort();
        assert_eq!(busy, ["api", "web"]);
        // A second pass while both still run starts nothing more.
        r.pass(&mut reports, 2).await;
        let mut done = 0;
        while done < 2 {
            if let Work::Done { .. } = rx.recv().await.unwrap() {
                done += 1;
            }
        }
        let creates = r
            .podman
            .runner()
            .calls()
            .iter()
            .filter(|c| c.contains(" create "))
            .count();
        assert_eq!(creates, 2);
    }
}
