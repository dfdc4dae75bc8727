//! The wire formats, pinned: each value below is written to exactly the JSON shown and read
//! back to the same value. A type moved between modules, renamed or reordered must still
//! produce these bytes, so devices and operators of different versions keep talking.

use std::fmt::Debug;

use fleet_contracts::rpc::{
    EnrollReply, EnrollRequest, ExecReply, ExecRequest, FollowAck, LogsChunk, LogsReply,
    LogsRequest,
};
use fleet_contracts::spec::{
    Container, EnvVar, ExecProbe, HttpGetProbe, InitContainer, Lifecycle, PodTemplate, Port, Probe,
    Protocol, RestartPolicy, RunningProbe, TcpProbe, VolumeMount,
};
use fleet_contracts::state::{
    Audit, DeviceIdentity, EnrollmentToken, ExecAudit, Lease, Revocations, Revoked, RevokedFor,
    RolloutResume,
};
use serde::{Serialize, de::DeserializeOwned};

/// `value` serializes to exactly `json`, and `json` reads back to `value`.
fn pinned<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T, json: &str) {
    assert_eq!(serde_json::to_string(&value).unwrap(), json, "{value:?}");
    assert_eq!(serde_json::from_str::<T>(json).unwrap(), value, "{json}");
}

fn audit() -> Audit {
    Audit {
        by: "ops".into(),
        at_ms: 5,
        reason: "stolen".into(),
    }
}

#[test]
fn kv_values() {
    pinned(
        Lease {
            schema: 1,
            holder: "op-a".into(),
            ttl_ms: 6000,
            renewed_at_ms: 7,
        },
        r#"{"schema":1,"holder":"op-a","ttl_ms":6000,"renewed_at_ms":7}"#,
    );
    pinned(
        EnrollmentToken {
            schema: 1,
            id: "t1".into(),
            labels: [("role".to_owned(), "edge".to_owned())].into(),
            created_ms: 1,
            expires_ms: 2,
            used_by: Some("pi-01".into()),
            used_ms: Some(3),
            revoked: true,
            user_key: Some("UKEY".into()),
        },
        r#"{"schema":1,"id":"t1","labels":{"role":"edge"},"created_ms":1,"expires_ms":2,"used_by":"pi-01","used_ms":3,"revoked":true,"user_key":"UKEY"}"#,
    );
    pinned(
        DeviceIdentity {
            schema: 1,
            device: "pi-01".into(),
            public_key: "UKEY".into(),
            enrolled_ms: 9,
            token: "t1".into(),
            blacklist: Some(audit()),
            last_unblacklist: None,
            jwt_expires_secs: Some(11),
        },
        r#"{"schema":1,"device":"pi-01","public_key":"UKEY","enrolled_ms":9,"token":"t1","blacklist":{"by":"ops","at_ms":5,"reason":"stolen"},"jwt_expires_secs":11}"#,
    );
    pinned(
        Revocations {
            schema: 1,
            keys: [
                (
                    "UA".to_owned(),
                    Revoked {
                        device: "pi-01".into(),
                        at_secs: 3,
                        reason: RevokedFor::Deleted,
                        until_secs: Some(4),
                    },
                ),
                (
                    "UB".to_owned(),
                    Revoked {
                        device: "t1".into(),
                        at_secs: 5,
                        reason: RevokedFor::Token,
                        until_secs: None,
                    },
                ),
            ]
            .into(),
        },
        r#"{"schema":1,"keys":{"UA":{"device":"pi-01","at_secs":3,"reason":"deleted","until_secs":4},"UB":{"device":"t1","at_secs":5,"reason":"token"}}}"#,
    );
    pinned(
        RolloutResume {
            schema: 1,
            generation: 4,
            by: "ops".into(),
            at_ms: 8,
        },
        r#"{"schema":1,"generation":4,"by":"ops","at_ms":8}"#,
    );
    pinned(
        ExecAudit {
            schema: 1,
            by: "ops".into(),
            device: "pi-01".into(),
            deployment: "web".into(),
            command: vec!["ls".into(), "-l".into()],
            at_ms: 12,
            outcome: "exit 0".into(),
        },
        r#"{"schema":1,"by":"ops","device":"pi-01","deployment":"web","command":["ls","-l"],"at_ms":12,"outcome":"exit 0"}"#,
    );
}

#[test]
fn request_reply_messages() {
    pinned(
        EnrollRequest {
            schema: 1,
            device: "pi-01".into(),
            public_key: "UKEY".into(),
        },
        r#"{"schema":1,"device":"pi-01","public_key":"UKEY"}"#,
    );
    pinned(
        EnrollReply::Enrolled {
            jwt: "J".into(),
            expires_at: 9,
        },
        r#"{"enrolled":{"jwt":"J","expires_at":9}}"#,
    );
    pinned(
        EnrollReply::Refused {
            reason: "no".into(),
        },
        r#"{"refused":{"reason":"no"}}"#,
    );
    pinned(
        LogsRequest {
            schema: 1,
            deployment: "web".into(),
            tail: 10,
            follow_session: Some("s1".into()),
        },
        r#"{"schema":1,"deployment":"web","tail":10,"follow_session":"s1"}"#,
    );
    pinned(
        LogsChunk {
            seq: 2,
            lines: vec!["a".into()],
            end: Some("stopped".into()),
        },
        r#"{"seq":2,"lines":["a"],"end":"stopped"}"#,
    );
    pinned(FollowAck { seq: 3, stop: true }, r#"{"seq":3,"stop":true}"#);
    pinned(
        LogsReply::Lines {
            lines: vec!["a".into()],
            truncated: false,
        },
        r#"{"lines":{"lines":["a"],"truncated":false}}"#,
    );
    pinned(
        LogsReply::Error {
            message: "gone".into(),
        },
        r#"{"error":{"message":"gone"}}"#,
    );
    pinned(
        ExecRequest {
            schema: 1,
            deployment: "web".into(),
            command: vec!["true".into()],
            timeout_secs: 30,
        },
        r#"{"schema":1,"deployment":"web","command":["true"],"timeout_secs":30}"#,
    );
    pinned(
        ExecReply::Done {
            exit_code: 1,
            stdout: "o".into(),
            stderr: "e".into(),
            truncated: true,
        },
        r#"{"done":{"exit_code":1,"stdout":"o","stderr":"e","truncated":true}}"#,
    );
    pinned(
        ExecReply::TimedOut { after_secs: 4 },
        r#"{"timed_out":{"after_secs":4}}"#,
    );
}

#[test]
fn values_and_messages_that_did_not_move() {
    use fleet_contracts::rpc::{
        DesiredChanged, ReportEntry, ReportReply, ReportRequest, SyncReply, SyncRequest,
    };
    use fleet_contracts::state::{
        DesiredDeployment, HealthFlag, Heartbeat, Phase, ReportedDeployment, StorageChecks,
        StoreIdentity, StoreRef,
    };
    let store = |epoch| StoreRef {
        fleet_id: "ab12".into(),
        epoch,
    };
    pinned(
        ExecReply::Error {
            message: "no such container".into(),
        },
        r#"{"error":{"message":"no such container"}}"#,
    );
    pinned(SyncRequest { schema: 1 }, r#"{"schema":1}"#);
    pinned(
        SyncReply::Desired {
            revision: 7,
            desired: [("web".to_owned(), serde_json::json!({"schema": 1}))].into(),
            store: Some(store(2)),
            accept: Some(store(1)),
            release_held: true,
            os: None,
        },
        r#"{"result":"desired","revision":7,"desired":{"web":{"schema":1}},"store":{"fleetId":"ab12","epoch":2},"accept":{"fleetId":"ab12","epoch":1},"releaseHeld":true}"#,
    );
    pinned(
        SyncReply::Desired {
            revision: 8,
            desired: Default::default(),
            store: Some(store(2)),
            accept: None,
            release_held: false,
            os: Some(serde_json::json!({"upgrade": "up"})),
        },
        r#"{"result":"desired","revision":8,"desired":{},"store":{"fleetId":"ab12","epoch":2},"os":{"upgrade":"up"}}"#,
    );
    pinned(SyncReply::NotReady, r#"{"result":"notReady"}"#);
    pinned(
        SyncReply::Refused {
            reason: "blacklisted".into(),
        },
        r#"{"result":"refused","reason":"blacklisted"}"#,
    );
    pinned(
        ReportRequest {
            schema: 1,
            entries: vec![
                ReportEntry {
                    key: "_info".into(),
                    value: Some(serde_json::json!({"x": 1})),
                },
                ReportEntry {
                    key: "web".into(),
                    value: None,
                },
            ],
        },
        r#"{"schema":1,"entries":[{"key":"_info","value":{"x":1}},{"key":"web"}]}"#,
    );
    pinned(
        ReportReply::Stored {
            refused: [("a.b".to_owned(), "not a name".to_owned())].into(),
        },
        r#"{"result":"stored","refused":{"a.b":"not a name"}}"#,
    );
    pinned(
        ReportReply::Failed {
            reason: "nats".into(),
        },
        r#"{"result":"failed","reason":"nats"}"#,
    );
    pinned(DesiredChanged { schema: 1 }, r#"{"schema":1}"#);
    pinned(
        DesiredDeployment {
            schema: 1,
            deployment: "web".into(),
            generation: 3,
            spec: PodTemplate::single(Container::new("web", "localhost/http:1")),
        },
        r#"{"schema":1,"deployment":"web","generation":3,"spec":{"containers":[{"name":"web","image":"localhost/http:1"}],"restartPolicy":"Always","lifecycle":{"stopSignal":"SIGTERM","graceSeconds":30,"sigkillFallback":true}}}"#,
    );
    pinned(
        ReportedDeployment {
            schema: 1,
            deployment: "web".into(),
            observed_generation: 3,
            phase: Phase::Failed,
            message: "image not found".into(),
            container_id: Some("c1".into()),
            since_ms: 9,
        },
        r#"{"schema":1,"deployment":"web","observed_generation":3,"phase":"Failed","message":"image not found","container_id":"c1","since_ms":9}"#,
    );
    pinned(
        Heartbeat {
            schema: 1,
            device: "pi-01".into(),
            agent_version: "0.1.0".into(),
            os: "Debian GNU/Linux 13 (trixie)".into(),
            uptime_secs: 5,
            sent_at_ms: 6,
            interval_ms: 10_000,
            health_flags: vec![
                HealthFlag::StoreChanged {
                    cached: store(1),
                    found: store(2),
                },
                HealthFlag::HeldDeployments {
                    deployments: vec!["old".into()],
                },
                HealthFlag::PodmanUnavailable {
                    message: "down".into(),
                },
            ],
            deployments: 2,
            last_reconcile_ms: Some(7),
            storage: Some(StorageChecks {
                pool_repairs: 1,
                pool_repair_boots: 0,
                last_pool: "repaired".into(),
                fat_repairs: 2,
                last_fat: String::new(),
            }),
            dropped_requests: 3,
            public_key: "UKEY".into(),
        },
        r#"{"schema":1,"device":"pi-01","agent_version":"0.1.0","os":"Debian GNU/Linux 13 (trixie)","uptime_secs":5,"sent_at_ms":6,"interval_ms":10000,"health_flags":[{"storeChanged":{"cached":{"fleetId":"ab12","epoch":1},"found":{"fleetId":"ab12","epoch":2}}},{"heldDeployments":{"deployments":["old"]}},{"podmanUnavailable":{"message":"down"}}],"deployments":2,"last_reconcile_ms":7,"storage":{"pool_repairs":1,"pool_repair_boots":0,"last_pool":"repaired","fat_repairs":2},"dropped_requests":3,"public_key":"UKEY"}"#,
    );
    pinned(
        StoreIdentity {
            schema: 1,
            store: store(4),
            restoring: true,
            created_ms: 8,
        },
        r#"{"schema":1,"fleetId":"ab12","epoch":4,"restoring":true,"createdMs":8}"#,
    );
}

#[test]
fn a_degraded_device_phase_reads_under_its_old_name_too() {
    use fleet_contracts::state::Phase;
    pinned(Phase::Degraded, r#""Degraded""#);
    assert_eq!(
        serde_json::from_str::<Phase>(r#""Running""#).unwrap(),
        Phase::Degraded
    );
}

#[test]
fn pod_template() {
    let template = PodTemplate {
        init_containers: vec![InitContainer {
            name: "migrate".into(),
            image: "localhost/app:1".into(),
            command: vec!["migrate".into()],
            args: vec![],
            env: vec![],
            volumes: vec![],
            timeout_seconds: 60,
        }],
        containers: vec![Container {
            args: vec!["--port".into(), "8080".into()],
            env: vec![EnvVar {
                name: "GREETING".into(),
                value: "hi".into(),
            }],
            ports: vec![Port {
                container_port: 8080,
                host_port: Some(18080),
                protocol: Protocol::Udp,
            }],
            volumes: vec![VolumeMount {
                name: "data".into(),
                mount_path: "/data".into(),
                host_path: Some("/srv/data".into()),
                read_only: true,
            }],
            probes: vec![
                Probe {
                    name: "live".into(),
                    http_get: Some(HttpGetProbe {
                        port: 8080,
                        path: "/healthz".into(),
                        status_min: 200,
                        status_max: 299,
                    }),
                    tcp: None,
                    exec: None,
                    running: None,
                    period_seconds: 5,
                    timeout_seconds: 1,
                    failure_threshold: 2,
                },
                Probe {
                    name: "ready".into(),
                    http_get: None,
                    tcp: Some(TcpProbe { port: 8080 }),
                    exec: Some(ExecProbe {
                        command: vec!["true".into()],
                    }),
                    running: Some(RunningProbe {}),
                    period_seconds: 10,
                    timeout_seconds: 2,
                    failure_threshold: 3,
                },
            ],
            ..Container::new("web", "localhost/http:1")
        }],
        restart_policy: RestartPolicy::OnFailure,
        lifecycle: Lifecycle {
            stop_signal: "SIGINT".into(),
            grace_seconds: 9,
            sigkill_fallback: false,
        },
    };
    pinned(
        template,
        r#"{"initContainers":[{"name":"migrate","image":"localhost/app:1","command":["migrate"],"timeoutSeconds":60}],"containers":[{"name":"web","image":"localhost/http:1","args":["--port","8080"],"env":[{"name":"GREETING","value":"hi"}],"ports":[{"containerPort":8080,"hostPort":18080,"protocol":"UDP"}],"volumes":[{"name":"data","mountPath":"/data","hostPath":"/srv/data","readOnly":true}],"probes":[{"name":"live","httpGet":{"port":8080,"path":"/healthz","statusMin":200,"statusMax":299},"periodSeconds":5,"timeoutSeconds":1,"failureThreshold":2},{"name":"ready","tcp":{"port":8080},"exec":{"command":["true"]},"running":{},"periodSeconds":10,"timeoutSeconds":2,"failureThreshold":3}]}],"restartPolicy":"OnFailure","lifecycle":{"stopSignal":"SIGINT","graceSeconds":9,"sigkillFallback":false}}"#,
    );
}

#[test]
fn os_upgrade_values_are_pinned() {
    use fleet_contracts::{
        spec::OsRelease,
        state::{DesiredOs, OsOutcome, OsPhase, OsReport, OsUpgradeReport},
    };
    let release = OsRelease {
        name: "r2".into(),
        sources: vec!["deb http://x/ ./".into()],
        packages: [("fleet-os-marker".to_owned(), "2".to_owned())].into(),
        full_upgrade: false,
    };
    pinned(
        DesiredOs {
            schema: 1,
            upgrade: "up".into(),
            generation: 2,
            release,
            check_in_deadline_seconds: 600,
            boot_attempts: 3,
            checks: vec![],
        },
        r#"{"schema":1,"upgrade":"up","generation":2,"release":{"name":"r2","sources":["deb http://x/ ./"],"packages":{"fleet-os-marker":"2"}},"checkInDeadlineSeconds":600,"bootAttempts":3}"#,
    );
    pinned(
        DesiredOs {
            schema: 1,
            upgrade: "up".into(),
            generation: 2,
            release: OsRelease {
                name: "r2".into(),
                sources: vec!["deb http://x/ ./".into()],
                packages: Default::default(),
                full_upgrade: true,
            },
            check_in_deadline_seconds: 600,
            boot_attempts: 3,
            checks: vec![fleet_contracts::spec::CheckInCommand {
                name: "db".into(),
                command: vec!["/usr/bin/pg_isready".into()],
            }],
        },
        r#"{"schema":1,"upgrade":"up","generation":2,"release":{"name":"r2","sources":["deb http://x/ ./"],"fullUpgrade":true},"checkInDeadlineSeconds":600,"bootAttempts":3,"checks":[{"name":"db","command":["/usr/bin/pg_isready"]}]}"#,
    );
    pinned(
        OsReport {
            schema: 1,
            release: "r1".into(),
            upgrade: Some(OsUpgradeReport {
                upgrade: "up".into(),
                generation: 2,
                phase: OsPhase::RolledBack,
                from_release: "r1".into(),
                to_release: "r2".into(),
                message: "rolled back: x".into(),
                since_ms: 5,
            }),
            history: vec![OsOutcome {
                upgrade: "old".into(),
                generation: 1,
                phase: OsPhase::Committed,
            }],
        },
        r#"{"schema":1,"release":"r1","upgrade":{"upgrade":"up","generation":2,"phase":"RolledBack","fromRelease":"r1","toRelease":"r2","message":"rolled back: x","sinceMs":5},"history":[{"upgrade":"old","generation":1,"phase":"Committed"}]}"#,
    );
    pinned(
        OsReport {
            schema: 1,
            release: "unknown".into(),
            upgrade: None,
            history: vec![],
        },
        r#"{"schema":1,"release":"unknown"}"#,
    );
}
