//! Which fleet store the device's desired state comes from, and what an answer from another
//! store may do. Pure: the agent's loop hands it each answer and gets back what to run.
//!
//! Each answer names the store it was derived from (a fleet id made when the store was first
//! created, and an epoch a restore moves forward); the device keeps the one its cache came
//! from. An answer is applied whole, removals included, only from that same store. Anything
//! else could be a store that lost data (a wiped or rebuilt cluster, an older backup, an
//! operator pointed at the wrong cluster), and must not remove what runs:
//!
//! | the answer's store                          | the device                                  |
//! |---------------------------------------------|---------------------------------------------|
//! | none known, nothing running yet             | applies it and records its store            |
//! | none known, a cache from before store ids    | same as a restore, and records its store    |
//! | the same fleet and epoch                    | applies it whole                            |
//! | the same fleet, a later epoch (a restore)   | applies it, keeps what it omits as *held*   |
//! | adopted by an admin from the device's store | same as a restore                           |
//! | another fleet, an older epoch, or none      | keeps everything as it is and holds         |
//!
//! Held deployments keep running from the cache until the store mentions them again (then
//! they are managed as usual) or an admin releases them in the current store.

use std::collections::{BTreeMap, BTreeSet};

use fleet_contracts::state::{HealthFlag, StoreRef};

use crate::sync::{DesiredSnapshot, DesiredValue};

/// What to do with an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it whole.
    Apply,
    /// Apply what it says; keep what it omits running, as held.
    Restore,
    /// Change nothing: the answer comes from another store.
    Hold,
}

/// The rule of the module docs' table. `running` says whether the device runs a desired state
/// already: one that names no store (a cache written before stores had an identity) is kept
/// like a restore's, since the answer's store may be one that lost data.
pub fn verdict(
    cached: Option<&StoreRef>,
    arriving: Option<&StoreRef>,
    accept: Option<&StoreRef>,
    running: bool,
) -> Verdict {
    let Some(cached) = cached else {
        return if running {
            Verdict::Restore
        } else {
            Verdict::Apply
        };
    };
    let Some(arriving) = arriving else {
        return Verdict::Hold;
    };
    let restored = cached.fleet_id == arriving.fleet_id && arriving.epoch > cached.epoch;
    if cached == arriving {
        Verdict::Apply
    } else if restored || accept == Some(cached) {
        Verdict::Restore
    } else {
        Verdict::Hold
    }
}

/// The device's side of the store: saved with the desired-state cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreState {
    /// The store the running desired state came from.
    pub store: Option<StoreRef>,
    /// Deployments kept from an earlier store (their specs are in the desired state).
    pub held: BTreeSet<String>,
    /// Set while answers come from another store: (the device's, the answer's).
    pub holding: Option<(StoreRef, StoreRef)>,
}

impl StoreState {
    /// Takes an answer against `running`, the desired state in force (held deployments
    /// included). Returns the desired state to run from now on, or `None` to keep `running`.
    pub fn take(
        &mut self,
        answer: &DesiredSnapshot,
        running: Option<&BTreeMap<String, DesiredValue>>,
    ) -> Option<BTreeMap<String, DesiredValue>> {
        let empty = BTreeMap::new();
        let running = running.unwrap_or(&empty);
        match verdict(
            self.store.as_ref(),
            answer.store.as_ref(),
            answer.accept.as_ref(),
            !running.is_empty(),
        ) {
            Verdict::Hold => {
                let cached = self.store.clone().expect("a verdict to hold has a store");
                let found = answer.store.clone().unwrap_or(StoreRef {
                    fleet_id: "(an operator that names no store)".into(),
                    epoch: 0,
                });
                self.holding = Some((cached, found));
                return None;
            }
            Verdict::Restore => {
                self.held.extend(
                    running
                        .keys()
                        .filter(|k| !answer.desired.contains_key(*k))
                        .cloned(),
                );
                self.store = answer.store.clone();
            }
            Verdict::Apply => {
                if self.store.is_none() {
                    self.store = answer.store.clone();
                }
            }
        }
        self.holding = None;
        if answer.release_held {
            self.held.clear();
        }
        let mut merged = answer.desired.clone();
        // An unreadable value is held too (the reconciler leaves its container alone); only
        // readable ones survive a restart, since the cache keeps no unreadable value.
        self.held
            .retain(|k| !merged.contains_key(k) && running.contains_key(k));
        for name in &self.held {
            merged.insert(name.clone(), running[name].clone());
        }
        Some(merged)
    }

    /// What the heartbeat says about the store.
    pub fn health_flags(&self) -> Vec<HealthFlag> {
        let mut flags = Vec::new();
        if let Some((cached, found)) = &self.holding {
            flags.push(HealthFlag::StoreChanged {
                cached: cached.clone(),
                found: found.clone(),
            });
        }
        if !self.held.is_empty() {
            flags.push(HealthFlag::HeldDeployments {
                deployments: self.held.iter().cloned().collect(),
            });
        }
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_contracts::{
        spec::{Container, PodTemplate},
        state::DesiredDeployment,
    };

    fn store(fleet: &str, epoch: u64) -> StoreRef {
        StoreRef {
            fleet_id: fleet.into(),
            epoch,
        }
    }

    fn value(name: &str, image: &str) -> DesiredValue {
        Ok(DesiredDeployment::new(
            name,
            1,
            PodTemplate::single(Container::new(name, image)),
        ))
    }

    fn desired(names: &[&str]) -> BTreeMap<String, DesiredValue> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), value(n, "img:1")))
            .collect()
    }

    fn answer(
        names: &[&str],
        at: Option<StoreRef>,
        accept: Option<StoreRef>,
        release_held: bool,
    ) -> DesiredSnapshot {
        DesiredSnapshot {
            desired: desired(names),
            store: at,
            accept,
            release_held,
            os: None,
        }
    }

    #[test]
    fn verdicts_follow_the_table() {
        let a1 = store("a", 1);
        use Verdict::*;
        assert_eq!(verdict(None, Some(&a1), None, false), Apply);
        assert_eq!(verdict(None, None, None, false), Apply);
        assert_eq!(
            verdict(None, Some(&a1), None, true),
            Restore,
            "a cache from before store ids removes nothing on its first answer"
        );
        for running in [false, true] {
            assert_eq!(verdict(Some(&a1), Some(&a1), None, running), Apply);
            let a2 = store("a", 2);
            assert_eq!(verdict(Some(&a1), Some(&a2), None, running), Restore);
            assert_eq!(verdict(Some(&a2), Some(&a1), None, running), Hold);
            assert_eq!(
                verdict(Some(&a1), Some(&store("b", 1)), None, running),
                Hold
            );
            assert_eq!(
                verdict(Some(&a1), Some(&store("b", 9)), None, running),
                Hold
            );
            assert_eq!(verdict(Some(&a1), None, None, running), Hold);
            assert_eq!(
                verdict(Some(&a1), Some(&store("b", 1)), Some(&a2), running),
                Hold,
                "an adoption from another store than the device's is not one"
            );
            assert_eq!(
                verdict(Some(&a1), Some(&store("b", 1)), Some(&a1), running),
                Restore
            );
        }
    }

    #[test]
    fn the_same_store_removes_and_another_store_removes_nothing() {
        let mut s = StoreState::default();
        let running = s
            .take(
                &answer(&["web", "db"], Some(store("a", 1)), None, false),
                None,
            )
            .unwrap();
        assert_eq!(s.store, Some(store("a", 1)));
        // A real deletion in the same store is applied.
        let after = s
            .take(
                &answer(&["web"], Some(store("a", 1)), None, false),
                Some(&running),
            )
            .unwrap();
        assert_eq!(after.keys().collect::<Vec<_>>(), ["web"]);
        // An empty answer from a wiped store (another fleet id) changes nothing.
        assert_eq!(
            s.take(&answer(&[], Some(store("b", 1)), None, false), Some(&after)),
            None
        );
        assert_eq!(s.store, Some(store("a", 1)), "the device keeps its store");
        assert!(matches!(
            s.health_flags().as_slice(),
            [HealthFlag::StoreChanged { cached, found }] if *cached == store("a", 1) && *found == store("b", 1)
        ));
        // So does one from an older epoch of the same fleet, and one naming no store.
        let mut newer = StoreState {
            store: Some(store("a", 3)),
            ..Default::default()
        };
        assert_eq!(
            newer.take(&answer(&[], Some(store("a", 2)), None, false), Some(&after)),
            None
        );
        assert_eq!(
            newer.take(&answer(&[], None, None, false), Some(&after)),
            None
        );
    }

    #[test]
    fn a_restore_keeps_what_it_omits_until_mentioned_or_released() {
        let mut s = StoreState {
            store: Some(store("a", 1)),
            ..Default::default()
        };
        let running = desired(&["old", "new"]);
        // The backup has only `old`, with another image: it is updated; `new` is held.
        let mut restored = answer(&[], Some(store("a", 2)), None, false);
        restored
            .desired
            .insert("old".into(), value("old", "img:backup"));
        let after = s.take(&restored, Some(&running)).unwrap();
        assert_eq!(after["old"], value("old", "img:backup"));
        assert_eq!(after["new"], running["new"], "held as it ran");
        assert_eq!(s.store, Some(store("a", 2)));
        assert_eq!(s.held, BTreeSet::from(["new".to_owned()]));
        // Later answers of the new epoch keep it held: it is not removed as a deletion.
        let again = s
            .take(&answer(&[], Some(store("a", 2)), None, false), Some(&after))
            .unwrap();
        assert!(again.contains_key("new") && !again.contains_key("old"));
        assert!(matches!(
            s.health_flags().as_slice(),
            [HealthFlag::HeldDeployments { deployments }] if deployments == &["new"]
        ));
        // Mentioned again, it is managed as usual (and a later removal applies).
        let managed = s
            .take(
                &answer(&["new"], Some(store("a", 2)), None, false),
                Some(&again),
            )
            .unwrap();
        assert!(s.held.is_empty());
        assert!(managed.contains_key("new"));
        let removed = s
            .take(
                &answer(&[], Some(store("a", 2)), None, false),
                Some(&managed),
            )
            .unwrap();
        assert!(removed.is_empty());
    }

    #[test]
    fn a_cache_from_before_store_ids_holds_what_the_first_answer_omits() {
        let mut s = StoreState::default();
        let running = desired(&["web", "db"]);
        let after = s
            .take(
                &answer(&["web"], Some(store("b", 1)), None, false),
                Some(&running),
            )
            .unwrap();
        assert_eq!(after, running, "nothing removed");
        assert_eq!(s.store, Some(store("b", 1)));
        assert_eq!(s.held, BTreeSet::from(["db".to_owned()]));
        // An unreadable value omitted by a restore is held (left alone) too.
        let mut s = StoreState {
            store: Some(store("a", 1)),
            ..Default::default()
        };
        let mut running = desired(&["web"]);
        running.insert("odd".into(), Err("schema 9".into()));
        let after = s
            .take(
                &answer(&["web"], Some(store("a", 2)), None, false),
                Some(&running),
            )
            .unwrap();
        assert_eq!(after["odd"], running["odd"]);
    }

    #[test]
    fn an_adoption_switches_store_and_a_release_drops_the_held() {
        let mut s = StoreState {
            store: Some(store("a", 1)),
            ..Default::default()
        };
        let running = desired(&["web"]);
        assert_eq!(
            s.take(
                &answer(&[], Some(store("b", 1)), None, false),
                Some(&running)
            ),
            None
        );
        let adopted = s
            .take(
                &answer(&[], Some(store("b", 1)), Some(store("a", 1)), false),
                Some(&running),
            )
            .unwrap();
        assert_eq!(adopted, running, "nothing is removed by an adoption");
        assert_eq!(s.store, Some(store("b", 1)));
        assert_eq!(s.holding, None);
        assert_eq!(s.held, BTreeSet::from(["web".to_owned()]));
        let released = s
            .take(
                &answer(&["db"], Some(store("b", 1)), None, true),
                Some(&adopted),
            )
            .unwrap();
        assert_eq!(released.keys().collect::<Vec<_>>(), ["db"]);
        assert!(s.health_flags().is_empty());
    }
}
