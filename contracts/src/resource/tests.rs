//! Reading and validating documents: every refusal names its field.

use super::*;
use crate::spec::{Container, InitContainer, Protocol, RestartPolicy};
use serde_json::json;

fn deployment() -> serde_json::Value {
    json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "selector": {"matchLabels": {"role": "edge"}},
            "template": {"containers": [{
                "name": "web",
                "image": "localhost/http:1",
                "env": [{"name": "GREETING", "value": "hi"}],
                "ports": [{"containerPort": 8080, "hostPort": 18080}],
                "volumes": [{"name": "data", "mountPath": "/data"}]
            }]}
        }
    })
}

/// Applies `edit` to a valid Deployment and checks the errors it produces.
fn check(edit: impl FnOnce(&mut serde_json::Value), expected: &[&str]) {
    check_doc(deployment(), edit, expected)
}

/// Applies `edit` to `doc` and checks the errors it produces.
fn check_doc(
    mut doc: serde_json::Value,
    edit: impl FnOnce(&mut serde_json::Value),
    expected: &[&str],
) {
    edit(&mut doc);
    let got: Vec<String> = match Resource::from_user(doc) {
        Ok(_) => vec![],
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    };
    assert_eq!(got, expected);
}

#[test]
fn valid_deployment_parses_with_defaults() {
    let Resource::Deployment(d) = Resource::from_user(deployment()).unwrap() else {
        panic!("not a deployment")
    };
    assert_eq!(d.spec.template.restart_policy, RestartPolicy::Always);
    assert_eq!(
        d.spec.template.containers[0].ports[0].protocol,
        Protocol::Tcp
    );
}

#[test]
fn validation_names_the_field() {
    check(|_| {}, &[]);
    check(
        |d| d["spec"]["template"]["containers"][0]["image"] = json!(""),
        &["spec.template.containers[0].image: must not be empty"],
    );
    check(
        |d| d["spec"]["template"]["containers"][0]["imagee"] = json!("x"),
        &["spec.template.containers[0].imagee: unknown field"],
    );
    check(
        |d| {
            d["spec"]["template"]["containers"][0]["imagee"] = json!("x");
            d["spec"]["template"]["containers"][0]["image"] = json!("");
        },
        &[
            "spec.template.containers[0].imagee: unknown field",
            "spec.template.containers[0].image: must not be empty",
        ],
    );
    check(|d| d["spex"] = json!({}), &["spex: unknown field"]);
    check(
        |d| {
            d["spec"]["template"]["containers"][0]["ports"] =
                json!([{"containerPort": 80, "hostPort": 8080}, {"containerPort": 8080}])
        },
        &[
            "spec.template.containers[0].ports[1].hostPort: duplicate host port 8080/tcp (also in ports[0])",
        ],
    );
    check(
        |d| {
            d["spec"]["template"]["containers"][0]["ports"] =
                json!([{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 53}])
        },
        &[],
    );
    check(
        |d| d["metadata"]["name"] = json!("Web"),
        &["metadata.name: must contain only lower-case letters, digits and '-', found 'W'"],
    );
    check(
        |d| d["spec"]["selector"]["matchLabels"] = json!({}),
        &[
            "spec.selector.matchLabels: must name at least one label (to target every device, give them all a label)",
        ],
    );
    check(
        |d| d["spec"]["template"]["containers"] = json!([]),
        &["spec.template.containers: must hold one container"],
    );
    check(
        |d| d["spec"]["template"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}, {"name": "1X", "value": ""}]),
        &[
            "spec.template.containers[0].env[1].name: duplicate \"A\"",
            "spec.template.containers[0].env[2].name: must be letters, digits and '_', not starting with a digit",
        ],
    );
    check(
        |d| {
            d["spec"]["template"]["containers"][0]["volumes"] =
                json!([{"name": "data", "mountPath": "data", "hostPath": "rel"}])
        },
        &[
            "spec.template.containers[0].volumes[0].mountPath: must be an absolute path",
            "spec.template.containers[0].volumes[0].hostPath: must be an absolute path",
        ],
    );
    check(
        |d| {
            d["spec"]["template"]["lifecycle"] = json!({"stopSignal": "TERM", "graceSeconds": 7200})
        },
        &[
            "spec.template.lifecycle.stopSignal: must be one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGKILL",
            "spec.template.lifecycle.graceSeconds: must be at most 3600",
        ],
    );
    check(
        |d| {
            d["spec"]["template"]["initContainers"] = json!([
                {"name": "setup", "image": "img", "command": ["sh", "-c", "true"]},
                {"name": "web", "image": "", "timeoutSeconds": 0}
            ])
        },
        &[
            "spec.template.initContainers[1].image: must not be empty",
            "spec.template.initContainers[1].timeoutSeconds: must be 1-3600",
            "spec.template.initContainers[1].name: duplicate container name \"web\"",
        ],
    );
    check(
        |d| d["apiVersion"] = json!("v1"),
        &["apiVersion: must be \"fleet.dev/v1\", got \"v1\""],
    );
    check(
        |d| d["kind"] = json!("Pod"),
        &["kind: unknown kind \"Pod\"; one of Deployment, Device, OsUpgrade"],
    );
    check(
        |d| d["spec"]["template"]["containers"][0]["ports"][0]["containerPort"] = json!(70000),
        &["spec.template.containers[0].ports[0].containerPort: 70000 is out of range (1-65535)"],
    );
}

/// One line per kind of hostile or mistaken value: the exact message, field path first.
#[test]
fn hostile_values_are_refused_naming_the_field() {
    let c = "spec.template.containers[0]";
    let cases: Vec<(&str, serde_json::Value, String)> = vec![
        (
            "image",
            json!("--privileged"),
            format!("{c}.image: must not start with '-'"),
        ),
        (
            "image",
            json!("-v"),
            format!("{c}.image: must not start with '-'"),
        ),
        (
            "image",
            json!("a\0b"),
            format!("{c}.image: must not contain a NUL byte"),
        ),
        (
            "image",
            json!("img\nx"),
            format!("{c}.image: must not contain '\\n'"),
        ),
        (
            "image",
            json!("Upper/case"),
            format!(
                "{c}.image: repository path component \"Upper\" must be lower-case letters and digits, joined by '.', '_', '__' or '-'"
            ),
        ),
        ("image", json!(""), format!("{c}.image: must not be empty")),
        (
            "image",
            json!("a".repeat(600)),
            format!("{c}.image: must be at most 512 characters, got 600"),
        ),
        (
            "image",
            json!(7),
            format!("{c}.image: invalid type: integer `7`, expected a string"),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/data:O"}]),
            format!("{c}.volumes[0].mountPath: must not contain ':'"),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/x", "hostPath": "/etc:/evil"}]),
            format!("{c}.volumes[0].hostPath: must not contain ':'"),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/"}]),
            format!(
                "{c}.volumes[0].mountPath: must not be / (it would hide the image's whole file system)"
            ),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/data"}, {"name": "e", "mountPath": "/data/"}]),
            format!(
                "{c}.volumes[1].mountPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/data\"?)"
            ),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/a/../etc"}]),
            format!(
                "{c}.volumes[0].mountPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/etc\"?)"
            ),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/x", "hostPath": "/srv/../etc"}]),
            format!(
                "{c}.volumes[0].hostPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/etc\"?)"
            ),
        ),
        (
            "volumes",
            json!([{"name": "d", "mountPath": "/x", "readOnly": "yes"}]),
            format!("{c}.volumes[0].readOnly: invalid type: string \"yes\", expected a boolean"),
        ),
        (
            "ports",
            json!([{"containerPort": 70000}]),
            format!("{c}.ports[0].containerPort: 70000 is out of range (1-65535)"),
        ),
        (
            "ports",
            json!([{"containerPort": -1}]),
            format!("{c}.ports[0].containerPort: -1 is out of range (1-65535)"),
        ),
        (
            "ports",
            json!([{"containerPort": 80, "hostPort": 1.5}]),
            format!("{c}.ports[0].hostPort: must be a whole number, got 1.5"),
        ),
        (
            "ports",
            json!([{"containerPort": 80, "protocol": "SCTP"}]),
            format!("{c}.ports[0].protocol: unknown value \"SCTP\"; expected TCP or UDP"),
        ),
        (
            "ports",
            json!([{"hostPort": 80}]),
            format!("{c}.ports[0].containerPort: is required"),
        ),
        (
            "probes",
            json!([{"name": "h", "httpGet": {"port": 8080, "path": "/a\r\nX-Evil: 1"}}]),
            format!(
                "{c}.probes[0].httpGet.path: must be visible ASCII without '#' (percent-encode other characters), found '\\r'"
            ),
        ),
        (
            "probes",
            json!([{"name": "h", "httpGet": {"port": 8080, "path": "/a b"}}]),
            format!(
                "{c}.probes[0].httpGet.path: must be visible ASCII without '#' (percent-encode other characters), found ' '"
            ),
        ),
        (
            "probes",
            json!([{"name": "h", "tcp": {"port": 8080}, "periodSeconds": 4294967296u64}]),
            format!("{c}.probes[0].periodSeconds: 4294967296 is out of range (0-4294967295)"),
        ),
        (
            "command",
            json!(["sh", "-c", "a\0"]),
            format!("{c}.command[2]: must not contain a NUL byte"),
        ),
        (
            "args",
            json!(["x\0"]),
            format!("{c}.args[0]: must not contain a NUL byte"),
        ),
        (
            "env",
            json!([{"name": "A", "value": "x\0y"}]),
            format!("{c}.env[0].value: must not contain a NUL byte"),
        ),
        (
            "env",
            json!([{"name": "A"}]),
            format!("{c}.env[0].value: is required"),
        ),
    ];
    for (field, value, expected) in cases {
        check(
            |d| d["spec"]["template"]["containers"][0][field] = value,
            &[expected.as_str()],
        );
    }
    let r = "spec.rollout";
    check(
        |d| d["spec"]["rollout"] = json!({"waveSize": 1, "maxUnavailable": 0}),
        &[&format!(
            "{r}.maxUnavailable: must be at least 1: with 0 no wave could ever be admitted (leave it out for no limit)"
        )],
    );
    check(
        |d| d["spec"]["template"]["restartPolicy"] = json!("Sometimes"),
        &[
            "spec.template.restartPolicy: unknown value \"Sometimes\"; expected one of Always, OnFailure, Never",
        ],
    );
    check(
        |d| d["spec"]["template"]["lifecycle"] = json!({"graceSeconds": -1}),
        &["spec.template.lifecycle.graceSeconds: -1 is out of range (0-3600)"],
    );
    check(
        |d| d["metadata"] = json!({"labels": {}}),
        &["metadata.name: is required"],
    );
}

#[test]
fn user_status_and_generation_are_dropped() {
    let mut doc = deployment();
    doc["status"] = json!({"anything": true});
    doc["metadata"]["generation"] = json!(99);
    let r = Resource::from_user(doc).unwrap();
    assert_eq!(r.metadata().generation, 0);
}

#[test]
fn stored_documents_tolerate_unknown_fields() {
    let mut doc = deployment();
    doc["spec"]["template"]["containers"][0]["fromTheFuture"] = json!(1);
    let d: Deployment = serde_json::from_value(doc).unwrap();
    assert_eq!(d.metadata.name, "web");
}

#[test]
fn idempotency_warnings() {
    let warn = |script: &str| {
        let t = PodTemplate {
            init_containers: vec![InitContainer {
                name: "i".into(),
                image: "img".into(),
                command: vec!["sh".into(), "-c".into(), script.into()],
                args: vec![],
                env: vec![],
                volumes: vec![],
                timeout_seconds: 5,
            }],
            ..PodTemplate::single(Container::new("m", "img"))
        };
        t.idempotency_warnings()
            .iter()
            .map(|w| w.split(':').nth(1).unwrap_or("").trim().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(warn("mkdir -p /data && touch /data/x").is_empty());
    assert!(warn("echo a >> /data/log 2>&1").is_empty());
    assert_eq!(
        warn("mkdir /data"),
        [
            "`mkdir` without -p fails when it runs again (init containers rerun before every fresh main container)"
        ]
    );
    assert_eq!(warn("mkdir -v /data").len(), 1);
    assert_eq!(warn("echo 1 > /data/state").len(), 1);
}

#[test]
fn selector() {
    let sel = LabelSelector {
        match_labels: [("role".into(), "edge".into())].into(),
    };
    assert!(sel.matches(&[("role".into(), "edge".into()), ("x".into(), "y".into())].into()));
    assert!(!sel.matches(&[("role".into(), "core".into())].into()));
    assert!(!sel.matches(&Labels::new()));
}

fn os_upgrade() -> serde_json::Value {
    json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "OsUpgrade",
        "metadata": {"name": "trixie-2"},
        "spec": {
            "selector": {"matchLabels": {"role": "pi"}},
            "release": {
                "name": "2026.12.2",
                "sources": ["deb [trusted=yes] http://10.0.2.2:8000/ ./"],
                "packages": {"fleet-os-marker": "2", "linux-image-arm64": "6.12.57-1"}
            }
        }
    })
}

fn check_os(edit: impl FnOnce(&mut serde_json::Value), expected: &[&str]) {
    check_doc(os_upgrade(), edit, expected)
}

#[test]
fn an_os_upgrade_parses_with_its_defaults() {
    let Resource::OsUpgrade(u) = Resource::from_user(os_upgrade()).unwrap() else {
        panic!("not an OsUpgrade")
    };
    assert_eq!(u.spec.canaries, 1);
    assert_eq!(u.spec.halt_after_failures, 1);
    assert_eq!(u.spec.check_in_deadline_seconds, 600);
    assert_eq!(u.spec.boot_attempts, 3);
    assert_eq!(u.spec.wave_size, None);
    assert!(!u.spec.release.full_upgrade);
}

#[test]
fn os_upgrade_validation_names_the_field() {
    check_os(|_| {}, &[]);
    check_os(
        |d| d["spec"]["release"]["name"] = json!("a/b"),
        &["spec.release.name: found '/'; letters, digits and .+~_- only"],
    );
    check_os(
        |d| d["spec"]["release"]["sources"] = json!([]),
        &["spec.release.sources: must name at least one apt source"],
    );
    check_os(
        |d| d["spec"]["release"]["sources"][0] = json!("deb http://x/ ./\ndeb http://evil/ ./"),
        &["spec.release.sources[0]: must not contain '\\n'"],
    );
    check_os(
        |d| d["spec"]["release"]["packages"] = json!({"-oAPT::x": "1"}),
        &["spec.release.packages.-oAPT::x: must start with a lower-case letter or digit"],
    );
    check_os(
        |d| d["spec"]["release"]["packages"] = json!({"curl": "1 other=2"}),
        &["spec.release.packages.curl: found ' '; letters, digits and .+~:- only"],
    );
    check_os(
        |d| d["spec"]["release"]["packages"] = json!({}),
        &["spec.release.packages: must pin at least one package, or set fullUpgrade: true"],
    );
    check_os(
        |d| {
            d["spec"]["release"]["packages"] = json!({});
            d["spec"]["release"]["fullUpgrade"] = json!(true);
        },
        &[],
    );
    check_os(
        |d| d["spec"]["checkInDeadlineSeconds"] = json!(5),
        &["spec.checkInDeadlineSeconds: must be 60-3600"],
    );
    check_os(
        |d| d["spec"]["bootAttempts"] = json!(0),
        &["spec.bootAttempts: must be 1-10"],
    );
    check_os(
        |d| d["spec"]["haltAfterFailures"] = json!(0),
        &["spec.haltAfterFailures: must be at least 1"],
    );
    check_os(
        |d| d["spec"]["waveSize"] = json!(0),
        &["spec.waveSize: must be at least 1 (leave it out for all at once)"],
    );
    check_os(
        |d| d["spec"]["canaries"] = json!(-1),
        &["spec.canaries: -1 is out of range (0-4294967295)"],
    );
    check_os(
        |d| d["spec"]["release"]["fullupgrade"] = json!(true),
        &["spec.release.fullupgrade: unknown field"],
    );
    check_os(
        |d| {
            d["spec"]["checks"] = json!([
                {"name": "db", "command": ["/usr/bin/pg_isready", "-h", "127.0.0.1"]},
                {"name": "disk", "command": ["/usr/bin/test", "-w", "/var/lib/fleet"]}
            ])
        },
        &[],
    );
    check_os(
        |d| {
            d["spec"]["checks"] = json!([
                {"name": "db", "command": ["pg_isready"]},
                {"name": "db", "command": ["/bin/sh", "-c", "ok\nrm -rf /"]},
                {"name": "Bad_Name", "command": []},
                {"name": "up", "command": ["/usr/bin/../bin/true"]}
            ])
        },
        &[
            "spec.checks[0].command[0]: the program must be an absolute path (no shell looks it up)",
            "spec.checks[1].name: \"db\" is named twice",
            "spec.checks[1].command[2]: must not contain '\\n'",
            "spec.checks[2].name: must contain only lower-case letters, digits and '-', found 'B'",
            "spec.checks[2].command: must hold 1-32 words (the program, then its arguments), got 0",
            "spec.checks[3].command[0]: the program must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/usr/bin/true\"?) (no shell looks it up)",
        ],
    );
    check_os(
        |d| {
            d["spec"]["checks"] = json!([{"name": "x", "command": ["/bin/echo", "ok\u{202E}kcab"]}])
        },
        &["spec.checks[0].command[1]: must not contain '\\u{202e}'"],
    );
    check_os(
        |d| {
            d["spec"]["checks"] = json!(
                (0..9)
                    .map(|i| json!({"name": format!("c{i}"), "command": ["/bin/true"]}))
                    .collect::<Vec<_>>()
            )
        },
        &["spec.checks: at most 8 checks, got 9"],
    );
    check_os(
        |d| d["spec"]["checks"] = json!([{"name": "x", "command": ["/bin/true"], "shell": true}]),
        &["spec.checks[0].shell: unknown field"],
    );
    check_os(
        |d| d["spec"]["selector"]["matchLabels"] = json!({}),
        &[
            "spec.selector.matchLabels: must name at least one label (to target every device, give them all a label)",
        ],
    );
}
