//! The pure decision step of the reconciler: desired state and what podman shows in, actions
//! out. No I/O, no clock; table-tested below.
//!
//! Level-triggered: `plan` does not know why it runs (a change, a restart, a periodic resync),
//! so every action it returns must be right to take whatever happened before.

use std::collections::BTreeMap;

use fleet_contracts::{
    spec::RestartPolicy,
    state::{DesiredDeployment, Phase},
};
use sha2::{Digest, Sha256};

use crate::{
    podman::{ContainerState, Observed},
    probe::Readiness,
};

/// A short, stable hash of what runs; a container whose label differs must be replaced.
///
/// Generation is deliberately not part of it: a new generation with the same spec (a label
/// change on the Deployment, say) must not restart a healthy container.
pub fn spec_hash(desired: &DesiredDeployment) -> String {
    let bytes = serde_json::to_vec(&desired.spec).expect("a spec always serializes");
    let digest = Sha256::digest(&bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// One deployment as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub generation: u64,
    pub hash: String,
    pub restart: RestartPolicy,
    /// The last attempt to create this exact spec failed and its retry time has not come:
    /// do not try again yet.
    pub hold: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No container for this deployment: create and start one.
    Create { deployment: String },
    /// The container runs an outdated spec: stop and remove it, then create the new one.
    Replace { deployment: String, old_id: String },
    /// The container exists with the right spec but is not running and should be.
    Start { deployment: String, id: String },
    /// A container no desired deployment accounts for (deleted, or a duplicate).
    Remove {
        deployment: String,
        id: String,
        name: String,
    },
}

impl Action {
    /// The deployment this action works on; the agent runs at most one action per
    /// deployment at a time.
    pub fn deployment(&self) -> &str {
        match self {
            Action::Create { deployment }
            | Action::Replace { deployment, .. }
            | Action::Start { deployment, .. }
            | Action::Remove { deployment, .. } => deployment,
        }
    }
}

pub fn plan(wanted: &BTreeMap<String, Wanted>, observed: &[Observed]) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut seen: BTreeMap<&str, &Observed> = BTreeMap::new();
    for o in observed {
        let Some(w) = wanted.get(&o.deployment) else {
            actions.push(Action::Remove {
                deployment: o.deployment.clone(),
                id: o.id.clone(),
                name: o.name.clone(),
            });
            continue;
        };
        // More than one container for a deployment cannot come from names alone (they are
        // unique), but keep the planner total: keep the one with the current spec, drop others.
        match seen.get(o.deployment.as_str()) {
            None => {
                seen.insert(&o.deployment, o);
            }
            Some(kept) if kept.spec_hash != w.hash && o.spec_hash == w.hash => {
                actions.push(Action::Remove {
                    deployment: kept.deployment.clone(),
                    id: kept.id.clone(),
                    name: kept.name.clone(),
                });
                seen.insert(&o.deployment, o);
            }
            Some(_) => actions.push(Action::Remove {
                deployment: o.deployment.clone(),
                id: o.id.clone(),
                name: o.name.clone(),
            }),
        }
    }
    for (deployment, w) in wanted {
        match seen.get(deployment.as_str()) {
            None if w.hold => {}
            None => actions.push(Action::Create {
                deployment: deployment.clone(),
            }),
            Some(o) if o.spec_hash != w.hash => {
                if !w.hold {
                    actions.push(Action::Replace {
                        deployment: deployment.clone(),
                        old_id: o.id.clone(),
                    });
                }
            }
            Some(o) if should_start(&o.state, w.restart) => {
                actions.push(Action::Start {
                    deployment: deployment.clone(),
                    id: o.id.clone(),
                });
            }
            Some(_) => {}
        }
    }
    actions
}

fn should_start(state: &ContainerState, restart: RestartPolicy) -> bool {
    match (state, restart) {
        (ContainerState::Created, _) => true,
        (ContainerState::Exited { .. }, RestartPolicy::Always) => true,
        (ContainerState::Exited { code }, RestartPolicy::OnFailure) => *code != 0,
        _ => false,
    }
}

/// The phase to report for a deployment whose container (if any) podman shows as `observed`,
/// and whose last create failed with `failure` (for the current spec).
/// `readiness` is what the probes of the running container say (`None`: it has none).
pub fn phase(
    w: &Wanted,
    observed: Option<&Observed>,
    failure: Option<&str>,
    readiness: Option<&Readiness>,
) -> (Phase, String) {
    if let Some(message) = failure {
        return (Phase::Failed, message.to_owned());
    }
    let Some(o) = observed.filter(|o| o.spec_hash == w.hash) else {
        return (Phase::Pending, String::new());
    };
    match (&o.state, w.restart) {
        (ContainerState::Running, _) => match readiness {
            None | Some(Readiness::Ready) => (Phase::Ready, String::new()),
            Some(Readiness::Starting(why)) => (Phase::Starting, why.clone()),
            Some(Readiness::Failing(why)) => (Phase::Degraded, why.clone()),
        },
        (ContainerState::Exited { code: 0 }, RestartPolicy::Never | RestartPolicy::OnFailure) => {
            (Phase::Completed, "exited with code 0".into())
        }
        (ContainerState::Exited { code }, RestartPolicy::Never) => {
            (Phase::Failed, format!("container exited with code {code}"))
        }
        (ContainerState::Exited { code }, _) => (
            Phase::Failed,
            format!("container exited with code {code}; restarting it"),
        ),
        (ContainerState::Created, _) => (Phase::Starting, "created, not started yet".into()),
        (ContainerState::Other(s), _) => (Phase::Pending, format!("container is {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(entries: &[(&str, &str, RestartPolicy, bool)]) -> BTreeMap<String, Wanted> {
        entries
            .iter()
            .map(|(d, h, restart, hold)| {
                (
                    d.to_string(),
                    Wanted {
                        generation: 1,
                        hash: h.to_string(),
                        restart: *restart,
                        hold: *hold,
                    },
                )
            })
            .collect()
    }

    fn obs(deployment: &str, hash: &str, state: ContainerState) -> Observed {
        Observed {
            id: format!("id-{deployment}-{hash}"),
            name: format!("fleet-{deployment}"),
            deployment: deployment.into(),
            generation: 1,
            spec_hash: hash.into(),
            state,
        }
    }

    fn check(wanted: BTreeMap<String, Wanted>, observed: Vec<Observed>, expected: &[&str]) {
        let got: Vec<String> = plan(&wanted, &observed)
            .into_iter()
            .map(|a| match a {
                Action::Create { deployment } => format!("create {deployment}"),
                Action::Replace { deployment, old_id } => format!("replace {deployment} {old_id}"),
                Action::Start { deployment, id } => format!("start {deployment} {id}"),
                Action::Remove { id, .. } => format!("remove {id}"),
            })
            .collect();
        assert_eq!(got, expected);
    }

    use ContainerState::*;
    use RestartPolicy::*;

    #[test]
    fn plans() {
        // Nothing desired, nothing running.
        check(wanted(&[]), vec![], &[]);
        // New deployment.
        check(
            wanted(&[("web", "h1", Always, false)]),
            vec![],
            &["create web"],
        );
        // Adopted after an agent restart: same hash, running: nothing to do.
        check(
            wanted(&[("web", "h1", Always, false)]),
            vec![obs("web", "h1", Running)],
            &[],
        );
        // Spec changed.
        check(
            wanted(&[("web", "h2", Always, false)]),
            vec![obs("web", "h1", Running)],
            &["replace web id-web-h1"],
        );
        // Deleted deployment.
        check(
            wanted(&[]),
            vec![obs("web", "h1", Running)],
            &["remove id-web-h1"],
        );
        // Crashed container with restart Always, after a reboot too.
        check(
            wanted(&[("web", "h1", Always, false)]),
            vec![obs("web", "h1", Exited { code: 137 })],
            &["start web id-web-h1"],
        );
        // Created but never started (agent died between create and start).
        check(
            wanted(&[("web", "h1", Never, false)]),
            vec![obs("web", "h1", Created)],
            &["start web id-web-h1"],
        );
        // Run-once job finished: leave it.
        check(
            wanted(&[("job", "h1", Never, false)]),
            vec![obs("job", "h1", Exited { code: 1 })],
            &[],
        );
        check(
            wanted(&[("job", "h1", OnFailure, false)]),
            vec![obs("job", "h1", Exited { code: 0 })],
            &[],
        );
        check(
            wanted(&[("job", "h1", OnFailure, false)]),
            vec![obs("job", "h1", Exited { code: 2 })],
            &["start job id-job-h1"],
        );
        // Held after a failed create: no retry, no replace, but deletions still happen.
        check(wanted(&[("web", "h1", Always, true)]), vec![], &[]);
        check(
            wanted(&[("web", "h2", Always, true)]),
            vec![obs("web", "h1", Running)],
            &[],
        );
        check(
            wanted(&[("a", "h1", Always, false), ("b", "h1", Always, false)]),
            vec![obs("c", "h1", Running), obs("b", "h1", Running)],
            &["remove id-c-h1", "create a"],
        );
        // Duplicates are removed.
        check(
            wanted(&[("web", "h1", Always, false)]),
            vec![obs("web", "h1", Running), obs("web", "h0", Running)],
            &["remove id-web-h0"],
        );
        check(
            wanted(&[("web", "h1", Always, false)]),
            vec![obs("web", "h0", Running), obs("web", "h1", Running)],
            &["remove id-web-h0"],
        );
    }

    #[test]
    fn phases() {
        let w = |restart| Wanted {
            generation: 1,
            hash: "h".into(),
            restart,
            hold: false,
        };
        let p = |w: Wanted, o: Option<Observed>, f: Option<&str>| phase(&w, o.as_ref(), f, None);
        assert_eq!(p(w(Always), None, None), (Phase::Pending, String::new()));
        assert_eq!(
            p(w(Always), Some(obs("web", "h", Running)), None).0,
            Phase::Ready
        );
        let probed =
            |r: Readiness| phase(&w(Always), Some(&obs("web", "h", Running)), None, Some(&r));
        assert_eq!(probed(Readiness::Ready).0, Phase::Ready);
        assert_eq!(
            probed(Readiness::Starting("probe \"http\" failing".into())),
            (Phase::Starting, "probe \"http\" failing".into())
        );
        assert_eq!(
            probed(Readiness::Failing("probe \"http\" failing".into())),
            (Phase::Degraded, "probe \"http\" failing".into())
        );
        assert_eq!(
            p(w(Always), Some(obs("web", "h", Created)), None).0,
            Phase::Starting
        );
        assert_eq!(
            p(w(Always), Some(obs("web", "old", Running)), None).0,
            Phase::Pending
        );
        assert_eq!(
            p(
                w(Always),
                None,
                Some("podman create failed: Error: no such image")
            ),
            (
                Phase::Failed,
                "podman create failed: Error: no such image".into()
            )
        );
        assert_eq!(
            p(w(Never), Some(obs("j", "h", Exited { code: 0 })), None).0,
            Phase::Completed
        );
        assert_eq!(
            p(w(Never), Some(obs("j", "h", Exited { code: 3 })), None),
            (Phase::Failed, "container exited with code 3".into())
        );
        assert_eq!(
            p(w(Always), Some(obs("j", "h", Exited { code: 0 })), None).0,
            Phase::Failed
        );
    }

    #[test]
    fn hash_ignores_generation_and_follows_spec() {
        use fleet_contracts::spec::{Container, PodTemplate};
        let spec = |image: &str| PodTemplate::single(Container::new("web", image));
        let a = DesiredDeployment::new("web", 1, spec("img:1"));
        let b = DesiredDeployment::new("web", 2, spec("img:1"));
        let c = DesiredDeployment::new("web", 2, spec("img:2"));
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_ne!(spec_hash(&a), spec_hash(&c));
        assert_eq!(spec_hash(&a).len(), 16);
    }
}
