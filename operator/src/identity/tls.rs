//! The fleet's own certificate authority and the NATS server certificate it signs, so every
//! NATS connection is TLS and devices pin the fleet CA rather than trusting the web PKI.
//!
//! Created once by `fleet-operator init-identity` under `<identity>/tls/`; the private keys are
//! written with mode 0600. Re-running keeps what exists.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{IdentityError, write_private};

/// Where the CA certificate is: what devices and the operator pin.
pub fn ca_path(identity_dir: &Path) -> PathBuf {
    identity_dir.join("tls/ca.pem")
}

pub fn server_cert_path(identity_dir: &Path) -> PathBuf {
    identity_dir.join("tls/server.pem")
}

pub fn server_key_path(identity_dir: &Path) -> PathBuf {
    identity_dir.join("tls/server-key.pem")
}

/// Creates the CA and a server certificate for `hosts` (names or IP addresses) if missing.
pub fn ensure(identity_dir: &Path, hosts: &[String]) -> Result<(), IdentityError> {
    if server_cert_path(identity_dir).exists() {
        return Ok(());
    }
    let tls = |e: rcgen::Error| IdentityError::Tls(e.to_string());
    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Fleet NATS CA");
    ca_params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls)?;

    let server_key = KeyPair::generate().map_err(tls)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(tls)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Fleet NATS server");
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let server = params.signed_by(&server_key, &ca).map_err(tls)?;

    write_private(&identity_dir.join("tls/ca-key.pem"), ca_key_pem.as_bytes())?;
    write_private(
        &server_key_path(identity_dir),
        server_key.serialize_pem().as_bytes(),
    )?;
    write_private(&ca_path(identity_dir), ca.pem().as_bytes())?;
    // Written last: its presence means the set is complete.
    write_private(&server_cert_path(identity_dir), server.pem().as_bytes())
}
