//! Hostile documents for property tests (feature `testing`): a valid Deployment that uses every
//! field, with a few of its values replaced by what a careless or hostile user writes (option
//! look-alikes, separators, NUL, CR/LF, `..`, huge and negative numbers, wrong types) and some
//! keys removed or added. The agent's tests use the same documents for its podman arguments.

use proptest::prelude::*;
use serde_json::{Value, json};

/// A Deployment using every field, valid as it is.
pub fn full_deployment() -> Value {
    json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "selector": {"matchLabels": {"role": "edge"}},
            "rollout": {"waveSize": 2, "pauseSeconds": 5, "maxUnavailable": 1},
            "template": {
                "initContainers": [{
                    "name": "setup",
                    "image": "docker.io/library/busybox:1.36",
                    "command": ["sh", "-c"],
                    "args": ["mkdir -p /data/x"],
                    "env": [{"name": "MODE", "value": "init"}],
                    "volumes": [{"name": "data", "mountPath": "/data"}],
                    "timeoutSeconds": 60
                }],
                "containers": [{
                    "name": "web",
                    "image": "localhost:5000/team/http:1.2@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                    "command": ["/bin/httpd"],
                    "args": ["-f", "-p", "8080"],
                    "env": [{"name": "GREETING", "value": "hello world"}],
                    "ports": [{"containerPort": 8080, "hostPort": 18080, "protocol": "TCP"}],
                    "volumes": [
                        {"name": "data", "mountPath": "/data"},
                        {"name": "logs", "mountPath": "/var/log/app", "hostPath": "/srv/logs", "readOnly": true}
                    ],
                    "probes": [
                        {"name": "page", "httpGet": {"port": 8080, "path": "/healthz?x=1"}},
                        {"name": "alive", "running": {}}
                    ]
                }],
                "restartPolicy": "OnFailure",
                "lifecycle": {"stopSignal": "SIGINT", "graceSeconds": 10}
            }
        }
    })
}

/// Strings a user should not get through: podman option look-alikes, volume separators, path
/// escapes, request-line breaks, NUL, non-ASCII, and plain random text.
pub fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("--privileged".to_owned()),
        Just("-v".to_owned()),
        Just("-".to_owned()),
        Just("--".to_owned()),
        Just("/data:O".to_owned()),
        Just("/etc:/evil".to_owned()),
        Just("/".to_owned()),
        Just("/data/".to_owned()),
        Just("/a/../etc".to_owned()),
        Just("/x\r\nX-Evil: 1".to_owned()),
        Just("a\0b".to_owned()),
        Just(String::new()),
        Just("SIGKILL".to_owned()),
        "[-a-z0-9:/._@ ]{0,24}",
        "\\PC{0,12}",
        "[\\x00-\\x7f]{0,8}",
    ]
}

/// A value of any JSON type, hostile where it is a string or a number.
pub fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        4 => hostile_string().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => prop_oneof![Just(0u64), Just(1), Just(65535), Just(65536), Just(u64::from(u32::MAX) + 1)]
            .prop_map(Value::from),
        1 => any::<f64>().prop_filter("JSON holds finite numbers", |f| f.is_finite()).prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One change to a document: the `n`-th of its places (taken modulo their number) replaced
/// with a value, removed, or given an extra key.
#[derive(Debug, Clone)]
pub enum Mutation {
    Replace(usize, Value),
    Remove(usize),
    AddKey(usize, String, Value),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (any::<usize>(), hostile_value()).prop_map(|(n, v)| Mutation::Replace(n, v)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => (any::<usize>(), "[a-zA-Z<]{1,12}", hostile_value())
            .prop_map(|(n, k, v)| Mutation::AddKey(n, k, v)),
    ]
}

/// [`full_deployment`] with 1-4 [`Mutation`]s applied.
pub fn hostile_deployment() -> impl Strategy<Value = Value> {
    prop::collection::vec(mutation(), 1..5).prop_map(|mutations| {
        let mut doc = full_deployment();
        for m in mutations {
            apply(&mut doc, m);
        }
        doc
    })
}

/// The JSON pointer of every place in `v` (the root excluded).
fn places(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                places(child, p, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                places(child, p, out);
            }
        }
        _ => {}
    }
}

fn apply(doc: &mut Value, m: Mutation) {
    let mut all = Vec::new();
    places(doc, String::new(), &mut all);
    if all.is_empty() {
        return;
    }
    let pick = |n: usize| all[n % all.len()].clone();
    match m {
        Mutation::Replace(n, v) => {
            if let Some(place) = doc.pointer_mut(&pick(n)) {
                *place = v;
            }
        }
        Mutation::Remove(n) => {
            let p = pick(n);
            let (parent, last) = p.rsplit_once('/').unwrap_or(("", &p));
            match doc.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(items)) => {
                    if let Ok(i) = last.parse::<usize>()
                        && i < items.len()
                    {
                        items.remove(i);
                    }
                }
                _ => {}
            }
        }
        Mutation::AddKey(n, k, v) => {
            if let Some(Value::Object(map)) = doc.pointer_mut(&pick(n)) {
                map.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::test_runner::{Config, TestRunner};

    use super::*;
    use crate::{document, resource::Resource};

    /// How many documents each property tries in the test suite.
    const CASES: u32 = 2000;

    fn runner() -> TestRunner {
        TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        })
    }

    /// Mutated documents never panic the parser; what it accepts round-trips byte for byte
    /// (stored, read back, stored again). Both outcomes must occur, or the property says nothing.
    #[test]
    fn hostile_documents_never_panic_and_accepted_ones_round_trip() {
        let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
        runner()
            .run(&hostile_deployment(), |doc| {
                let Ok(Resource::Deployment(d)) = Resource::from_user(doc) else {
                    refused.set(refused.get() + 1);
                    return Ok(());
                };
                accepted.set(accepted.get() + 1);
                let stored = serde_json::to_vec(&d).unwrap();
                let read = document::from_json(&stored).expect("stored bytes read back");
                let Ok(Resource::Deployment(again)) = Resource::from_user(read) else {
                    panic!(
                        "accepted once, refused when read back: {}",
                        String::from_utf8_lossy(&stored)
                    );
                };
                prop_assert_eq!(&again, &d);
                prop_assert_eq!(serde_json::to_vec(&again).unwrap(), stored);
                Ok(())
            })
            .unwrap();
        assert!(
            accepted.get() > 0 && refused.get() > 0,
            "accepted {accepted:?}, refused {refused:?}"
        );
    }

    /// Arbitrary bytes, a valid document's text with bytes changed, and hostile documents as
    /// JSON text (NUL written as `\u0000`) never panic the strict reader, and what it reads
    /// holds no NUL anywhere.
    #[test]
    fn arbitrary_bytes_never_panic_the_reader() {
        fn nul_free(v: &Value) -> bool {
            match v {
                Value::String(s) => !s.contains('\0'),
                Value::Array(items) => items.iter().all(nul_free),
                Value::Object(map) => map.iter().all(|(k, v)| !k.contains('\0') && nul_free(v)),
                _ => true,
            }
        }
        let text = serde_json::to_vec(&full_deployment()).unwrap();
        let edited = (
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            Just(text),
        )
            .prop_map(|(edits, mut text)| {
                for (at, byte) in edits {
                    let i = at % text.len();
                    text[i] = byte;
                }
                text
            });
        let hostile = hostile_deployment().prop_map(|doc| serde_json::to_vec(&doc).unwrap());
        let bytes = prop_oneof![prop::collection::vec(any::<u8>(), 0..256), edited, hostile];
        let refused_nul = std::cell::Cell::new(0u32);
        runner()
            .run(&bytes, |bytes| {
                match document::from_json(&bytes) {
                    Ok(v) => {
                        prop_assert!(nul_free(&v), "a NUL got through: {v}");
                        let _ = Resource::from_user(v);
                    }
                    Err(e) if e.message.contains("NUL") => refused_nul.set(refused_nul.get() + 1),
                    Err(_) => {}
                }
                Ok(())
            })
            .unwrap();
        assert!(refused_nul.get() > 0, "no document with a NUL was tried");
    }
}
