//! Resource documents the tests apply.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use anyhow::Result;

/// A Device resource document.
pub fn device_doc(name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({"apiVersion": "fleet.dev/v1", "kind": "Device", "metadata": {"name": name, "labels": labels}})
}

/// A Deployment of the example HTTP server, published on `host_port`, saying `greeting`.
pub fn http_deployment(
    name: &str,
    role: &str,
    host_port: u16,
    greeting: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": role}},
            "template": {"containers": [{
                "name": name,
                "image": "localhost/fleet-example-http:1",
                "env": [{"name": "GREETING", "value": greeting}],
                "ports": [{"containerPort": 8080, "hostPort": host_port}]
            }]}
        }
    })
}

/// A fresh folder for one test; kept after the test when `FLEET_E2E_KEEP` is set (logs, stores).
pub(crate) fn test_dir() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("fleet-e2e-").tempdir()?;
    if std::env::var_os("FLEET_E2E_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// A Deployment of one busybox container on the devices labelled `role`, whose env
/// `VERSION` tells versions apart.
pub fn busybox_deployment(name: &str, role: &str, version: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": role}},
            "template": {"containers": [{
                "name": name,
                "image": "localhost/fleet-busybox:1",
                "env": [{"name": "VERSION", "value": version}]
            }]}
        }
    })
}
