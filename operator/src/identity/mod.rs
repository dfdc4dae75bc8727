//! The fleet's NATS identity: the operator, system and fleet account keys, the JWTs that make
//! nats-server trust them, the operator service's credentials, and device user JWTs.
//!
//! Devices authenticate with NATS decentralized JWT auth (docs/adr/0005): each device's JWT is
//! signed by the fleet account's *scoped* signing key `device`, whose permission template
//! (below) confines it to its own subjects through `{{name()}}`. A device JWT carries
//! no permissions of its own; its `name` is the device id, validated by [`check_name`] so no
//! wildcard can ever reach the template.
//!
//! Key seeds live in `<dir>/keys/*.nk` with mode 0600 and never leave the operator's host.

pub mod jwt;
pub mod tls;

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use fleet_contracts::names::{self, OPERATOR_INBOX, check_name, device_inbox};
use nkeys::KeyPair;

use jwt::{
    AccountLimits, AccountNats, Claims, OperatorNats, Permission, ResponsePermission, SigningKey,
    UserNats, UserPermissions, UserScope,
};

/// The server's template for the connecting user's name in a signing key's permissions: the
/// device id or the enrollment token id.
const NAME: &str = "{{name()}}";

/// The issue time of the account JWTs preloaded in the server config: older than anything the
/// operator pushes later. The full resolver stores a preload only when it is not older than
/// the JWT it already holds, so a restart can never bring back an account without the
/// revocations pushed since.
const PRELOAD_IAT: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a valid {kind} seed: {message}")]
    BadSeed {
        path: PathBuf,
        kind: &'static str,
        message: String,
    },
    #[error("invalid device id {device:?}: {message}")]
    DeviceId { device: String, message: String },
    #[error("{key:?} is not a user public key")]
    UserKey { key: String },
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
    #[error("cannot create the fleet's TLS certificates: {0}")]
    Tls(String),
}

/// The keys of the fleet's NATS trust chain.
#[derive(Debug)]
pub struct Identity {
    dir: PathBuf,
    operator: KeyPair,
    sys_account: KeyPair,
    fleet_account: KeyPair,
    /// Plain signing key of the fleet account: signs the operator service's user.
    service_signing: KeyPair,
    /// Scoped signing key `device` of the fleet account: signs device users.
    device_signing: KeyPair,
    /// Scoped signing key `enroll` of the fleet account: signs enrollment-token users.
    enroll_signing: KeyPair,
    /// The secret the HTTP API requires (`<dir>/admin.token`), until OIDC replaces it.
    admin_token: String,
}

fn now_secs() -> u64 {
    crate::clock::unix_secs()
}

impl Identity {
    /// Loads the keys from `dir`, creating any that are missing (idempotent).
    pub fn init_or_load(dir: &Path) -> Result<Identity, IdentityError> {
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).map_err(|source| IdentityError::Io {
            path: keys.clone(),
            source,
        })?;
        let _ = std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700));
        Ok(Identity {
            dir: dir.to_owned(),
            operator: seed(&keys.join("operator.nk"), "operator", KeyPair::new_operator)?,
            sys_account: seed(
                &keys.join("sys-account.nk"),
                "account",
                KeyPair::new_account,
            )?,
            fleet_account: seed(
                &keys.join("fleet-account.nk"),
                "account",
                KeyPair::new_account,
            )?,
            service_signing: seed(
                &keys.join("fleet-service-signing.nk"),
                "account",
                KeyPair::new_account,
            )?,
            device_signing: seed(
                &keys.join("fleet-device-signing.nk"),
                "account",
                KeyPair::new_account,
            )?,
            enroll_signing: seed(
                &keys.join("fleet-enroll-signing.nk"),
                "account",
                KeyPair::new_account,
            )?,
            admin_token: admin_token(&dir.join("admin.token"))?,
        })
    }

    /// The HTTP API's admin token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn fleet_account_key(&self) -> String {
        self.fleet_account.public_key()
    }

    pub fn sys_account_key(&self) -> String {
        self.sys_account.public_key()
    }

    pub fn operator_jwt(&self) -> Result<String, IdentityError> {
        let claims = Claims {
            jti: jwt::new_jti(),
            iat: now_secs(),
            iss: self.operator.public_key(),
            name: "fleet".into(),
            sub: self.operator.public_key(),
            exp: None,
            nats: OperatorNats {
                kind: "operator".into(),
                version: 2,
                system_account: self.sys_account.public_key(),
            },
        };
        Ok(jwt::encode(&claims, &self.operator)?)
    }

    pub fn sys_account_jwt(&self, iat: u64) -> Result<String, IdentityError> {
        self.account_jwt(
            iat,
            &self.sys_account,
            "SYS",
            AccountLimits::unlimited(false),
            vec![],
            Default::default(),
        )
    }

    /// The fleet account's JWT with `revocations` (user key -> unix seconds).
    pub fn fleet_account_jwt(
        &self,
        revocations: std::collections::BTreeMap<String, u64>,
    ) -> Result<String, IdentityError> {
        self.fleet_account_jwt_issued(revocations, now_secs())
    }

    fn fleet_account_jwt_issued(
        &self,
        revocations: std::collections::BTreeMap<String, u64>,
        iat: u64,
    ) -> Result<String, IdentityError> {
        let signing_keys = vec![
            SigningKey::Plain(self.service_signing.public_key()),
            SigningKey::Scoped(Box::new(UserScope {
                kind: "user_scope".into(),
                key: self.device_signing.public_key(),
                role: "device".into(),
                template: device_template(),
            })),
            SigningKey::Scoped(Box::new(UserScope {
                kind: "user_scope".into(),
                key: self.enroll_signing.public_key(),
                role: "enroll".into(),
                template: enroll_template(),
            })),
        ];
        self.account_jwt(
            iat,
            &self.fleet_account,
            "FLEET",
            AccountLimits::unlimited(true),
            signing_keys,
            revocations,
        )
    }

    fn account_jwt(
        &self,
        iat: u64,
        account: &KeyPair,
        name: &str,
        limits: AccountLimits,
        signing_keys: Vec<SigningKey>,
        revocations: std::collections::BTreeMap<String, u64>,
    ) -> Result<String, IdentityError> {
        let claims = Claims {
            jti: jwt::new_jti(),
            iat,
            iss: self.operator.public_key(),
            name: name.into(),
            sub: account.public_key(),
            exp: None,
            nats: AccountNats {
                kind: "account".into(),
                version: 2,
                limits,
                signing_keys,
                revocations,
            },
        };
        Ok(jwt::encode(&claims, &self.operator)?)
    }

    /// A device's user JWT: `name` is the device id, permissions come from the template.
    pub fn device_jwt(
        &self,
        device: &str,
        device_key: &str,
        expires_at: u64,
    ) -> Result<String, IdentityError> {
        check_name(device).map_err(|message| IdentityError::DeviceId {
            device: device.into(),
            message,
        })?;
        if !device_key.starts_with('U') || KeyPair::from_public_key(device_key).is_err() {
            return Err(IdentityError::UserKey {
                key: device_key.into(),
            });
        }
        let claims = Claims {
            jti: jwt::new_jti(),
            iat: now_secs(),
            iss: self.device_signing.public_key(),
            name: device.into(),
            sub: device_key.into(),
            exp: Some(expires_at),
            nats: UserNats {
                kind: "user".into(),
                version: 2,
                issuer_account: Some(self.fleet_account.public_key()),
                // Scoped users must carry no permissions or limits of their own.
                permissions: UserPermissions::scoped(),
                bearer_token: false,
            },
        };
        Ok(jwt::encode(&claims, &self.device_signing)?)
    }

    /// A new enrollment token: `<seed>:<jwt>` of a throwaway user named `token_id` that can do
    /// one thing, ask for enrollment on `fleet.enroll.<token_id>`, until `expires_at`. Returns
    /// the token and the user's public key (revoked once the token is used or revoked).
    pub fn enrollment_token(
        &self,
        token_id: &str,
        expires_at: u64,
    ) -> Result<(String, String), IdentityError> {
        check_name(token_id).map_err(|message| IdentityError::DeviceId {
            device: token_id.into(),
            message,
        })?;
        let user = KeyPair::new_user();
        let claims = Claims {
            jti: jwt::new_jti(),
            iat: now_secs(),
            iss: self.enroll_signing.public_key(),
            name: token_id.into(),
            sub: user.public_key(),
            exp: Some(expires_at),
            nats: UserNats {
                kind: "user".into(),
                version: 2,
                issuer_account: Some(self.fleet_account.public_key()),
                permissions: UserPermissions::scoped(),
                bearer_token: false,
            },
        };
        let token = jwt::encode(&claims, &self.enroll_signing)?;
        let seed = user.seed().map_err(|e| IdentityError::BadSeed {
            path: self.dir.clone(),
            kind: "user",
            message: e.to_string(),
        })?;
        Ok((format!("{seed}:{token}"), user.public_key()))
    }

    /// Credentials of the operator service in the fleet account: JetStream (it is the only
    /// JetStream client of the fleet), requests and doorbells to devices, and nothing that
    /// would let it answer a device's request (that is the responder's connection,
    /// [`Identity::responder_creds`]).
    pub fn service_creds(&self) -> Result<String, IdentityError> {
        let user = KeyPair::new_user();
        let permissions = UserPermissions {
            publish: Permission::allow(&[
                "$JS.API.>",
                "$KV.>",
                "$JS.FC.>",
                &names::device_subjects("*"),
            ]),
            subscribe: Permission::allow(&[&format!("{OPERATOR_INBOX}.>")]),
            resp: None,
            subs: Some(-1),
            data: Some(-1),
            payload: Some(-1),
        };
        self.user_creds(
            &user,
            "fleet-operator",
            &self.service_signing,
            Some(self.fleet_account.public_key()),
            permissions,
        )
    }

    /// Credentials of the connection that hears the requests of devices and enrollment
    /// tokens (enroll, renew, sync, report): it may hear them and publish to enrollment-token
    /// and device inboxes, and nothing else. No JetStream: a responder tricked into answering
    /// somewhere else could reach no stream or bucket.
    pub fn responder_creds(&self) -> Result<String, IdentityError> {
        let permissions = UserPermissions {
            publish: Permission::allow(&[
                &format!("{}.>", names::enroll_inbox("*")),
                &format!("{}.>", device_inbox("*")),
            ]),
            subscribe: Permission::allow(&[
                &names::enroll_subject("*"),
                &names::renew_subject("*"),
                &names::sync_subject("*"),
                &names::report_subject("*"),
            ]),
            resp: None,
            subs: Some(-1),
            data: Some(-1),
            payload: Some(64 * 1024),
        };
        self.user_creds(
            &KeyPair::new_user(),
            "fleet-operator-responder",
            &self.service_signing,
            Some(self.fleet_account.public_key()),
            permissions,
        )
    }

    /// Credentials of a user `name` in the fleet account with exactly `permissions`, signed by
    /// the operator service's key: for tools that act as a fleet of their own (the benchmark's
    /// hollow devices). Whoever holds the identity folder can mint these anyway.
    pub fn fleet_user_creds(
        &self,
        name: &str,
        permissions: UserPermissions,
    ) -> Result<String, IdentityError> {
        self.user_creds(
            &KeyPair::new_user(),
            name,
            &self.service_signing,
            Some(self.fleet_account.public_key()),
            permissions,
        )
    }

    /// Credentials in the system account, for pushing account JWT updates.
    pub fn sys_creds(&self) -> Result<String, IdentityError> {
        let user = KeyPair::new_user();
        let permissions = UserPermissions {
            publish: Permission::allow(&[
                "$SYS.REQ.CLAIMS.UPDATE",
                "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE",
            ]),
            subscribe: Permission::allow(&[&format!("{OPERATOR_INBOX}.>")]),
            resp: None,
            subs: Some(-1),
            data: Some(-1),
            payload: Some(-1),
        };
        self.user_creds(
            &user,
            "fleet-operator-sys",
            &self.sys_account,
            None,
            permissions,
        )
    }

    fn user_creds(
        &self,
        user: &KeyPair,
        name: &str,
        signer: &KeyPair,
        issuer_account: Option<String>,
        permissions: UserPermissions,
    ) -> Result<String, IdentityError> {
        let claims = Claims {
            jti: jwt::new_jti(),
            iat: now_secs(),
            iss: signer.public_key(),
            name: name.into(),
            sub: user.public_key(),
            exp: None,
            nats: UserNats {
                kind: "user".into(),
                version: 2,
                issuer_account,
                permissions,
                bearer_token: false,
            },
        };
        let token = jwt::encode(&claims, signer)?;
        let seed = user.seed().map_err(|e| IdentityError::BadSeed {
            path: self.dir.clone(),
            kind: "user",
            message: e.to_string(),
        })?;
        Ok(jwt::creds_file(&token, &seed))
    }

    /// The nats-server configuration block that trusts this identity: operator, system account,
    /// a full resolver (revocations survive a restart) preloaded with both accounts.
    pub fn server_config(&self, resolver_dir: &Path) -> Result<String, IdentityError> {
        Ok(format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: {{\n  type: full\n  dir: \"{}\"\n  allow_delete: false\n  interval: \"2m\"\n  timeout: \"3s\"\n}}\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt()?,
            self.sys_account.public_key(),
            resolver_dir.display(),
            self.sys_account.public_key(),
            self.sys_account_jwt(PRELOAD_IAT)?,
            self.fleet_account.public_key(),
            self.fleet_account_jwt_issued(Default::default(), PRELOAD_IAT)?,
        ) + &format!(
            "tls: {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  timeout: 5\n}}\n",
            tls::server_cert_path(&self.dir).display(),
            tls::server_key_path(&self.dir).display(),
        ))
    }

    /// Writes `<dir>/nats-auth.conf` (trust and TLS for nats-server), `<dir>/operator.creds`,
    /// `<dir>/sys.creds` and the TLS certificates for `tls_hosts`, each only if missing.
    ///
    /// Never rewritten: the resolver keeps account updates (revocations) pushed later, and a
    /// fresh preload must not compete with them.
    pub fn write_files(&self, tls_hosts: &[String]) -> Result<(), IdentityError> {
        tls::ensure(&self.dir, tls_hosts)?;
        let conf = self.dir.join("nats-auth.conf");
        if !conf.exists() {
            write_private(&conf, self.server_config(&self.dir.join("jwt"))?.as_bytes())?;
        }
        let creds = self.dir.join("operator.creds");
        if !creds.exists() {
            write_private(&creds, self.service_creds()?.as_bytes())?;
        }
        let sys = self.dir.join("sys.creds");
        if !sys.exists() {
            write_private(&sys, self.sys_creds()?.as_bytes())?;
        }
        Ok(())
    }
}

/// What a device may do, with `{{name()}}` its device id (docs/adr/0010): ask the operator on
/// its own request subjects (its desired state, its reports, a fresh JWT), hear the
/// operator's requests and doorbell on `fleet.dev.<device>.>` and answers on its own inbox,
/// and answer the requests it received. Deliberately absent: anything of JetStream (`$JS.>`,
/// `$KV.>`: a device is no JetStream client, so the server never publishes for it to a subject
/// it chose), another device's subjects, `_INBOX.>`.
pub fn device_template() -> UserPermissions {
    UserPermissions {
        publish: Permission::allow(&[
            &names::sync_subject(NAME),
            &names::report_subject(NAME),
            &names::renew_subject(NAME),
        ]),
        subscribe: Permission {
            allow: vec![
                format!("{}.>", device_inbox(NAME)),
                names::device_subjects(NAME),
            ],
            deny: vec![],
        },
        // Replies to the operator's requests (logs, exec).
        resp: Some(ResponsePermission {
            max: -1,
            ttl: 600_000_000_000,
        }),
        subs: Some(100),
        data: Some(-1),
        payload: Some(1024 * 1024),
    }
}

/// What an enrollment token may do: ask once, on its own subject, and hear the answer.
pub fn enroll_template() -> UserPermissions {
    UserPermissions {
        publish: Permission::allow(&[&names::enroll_subject(NAME)]),
        subscribe: Permission::allow(&[&format!("{}.>", names::enroll_inbox(NAME))]),
        resp: None,
        subs: Some(10),
        data: Some(-1),
        payload: Some(64 * 1024),
    }
}

fn seed(path: &Path, kind: &'static str, new: fn() -> KeyPair) -> Result<KeyPair, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => KeyPair::from_seed(text.trim()).map_err(|e| IdentityError::BadSeed {
            path: path.to_owned(),
            kind,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = new();
            let seed = kp.seed().map_err(|e| IdentityError::BadSeed {
                path: path.to_owned(),
                kind,
                message: e.to_string(),
            })?;
            write_private(path, seed.as_bytes())?;
            Ok(kp)
        }
        Err(source) => Err(IdentityError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Reads the admin token at `path`, creating a random one (256 bits) if missing or empty.
fn admin_token(path: &Path) -> Result<String, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IdentityError::Io {
                path: path.to_owned(),
                source,
            });
        }
    }
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    let token = data_encoding::BASE64URL_NOPAD.encode(&b);
    write_private(path, token.as_bytes())?;
    Ok(token)
}

/// Compares secrets without leaking through timing where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Creates `path` with mode 0600 (never readable by others, not even briefly) and syncs it.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::init_or_load(dir.path()).unwrap();
        let b = Identity::init_or_load(dir.path()).unwrap();
        assert_eq!(a.fleet_account_key(), b.fleet_account_key());
        a.write_files(&["127.0.0.1".into()]).unwrap();
        for f in [
            "keys/operator.nk",
            "keys/fleet-device-signing.nk",
            "operator.creds",
            "sys.creds",
            "nats-auth.conf",
            "tls/ca-key.pem",
            "tls/server-key.pem",
        ] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }

    #[test]
    fn device_jwts_refuse_wildcard_ids_and_non_user_keys() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::init_or_load(dir.path()).unwrap();
        let user = KeyPair::new_user().public_key();
        for bad in ["*", ">", "a.b", "A", ""] {
            assert!(
                matches!(
                    id.device_jwt(bad, &user, 1),
                    Err(IdentityError::DeviceId { .. })
                ),
                "{bad}"
            );
        }
        let account = KeyPair::new_account().public_key();
        assert!(matches!(
            id.device_jwt("pi-01", &account, 1),
            Err(IdentityError::UserKey { .. })
        ));
        let token = id.device_jwt("pi-01", &user, 1).unwrap();
        let claims: Claims<UserNats> = jwt::decode(&token).unwrap();
        assert_eq!(
            (claims.name.as_str(), claims.sub.as_str()),
            ("pi-01", user.as_str())
        );
        assert_eq!(claims.nats.issuer_account, Some(id.fleet_account_key()));
        assert_eq!(claims.nats.permissions.publish, Permission::default());
    }
}
