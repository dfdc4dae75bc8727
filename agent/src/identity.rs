//! The device's identity: its NKey (generated on the device, seed never leaves it), the NATS
//! user JWT the operator minted for it, and enrollment, which trades a one-time token for that
//! JWT.
//!
//! Both files live in `<state_dir>/identity/` with mode 0600, on the data partition, so an OS
//! rollback never loses the device's identity. The JWT is re-read at every (re)connect, so a
//! renewed JWT needs no restart.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    rpc::{EnrollReply, EnrollRequest},
};
use nkeys::KeyPair;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} does not hold a valid device key: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error(
        "the enrollment token is malformed ({0}); create a new one with `fleetctl enroll-token create`"
    )]
    BadToken(String),
    #[error("enrollment refused: {0}")]
    Refused(String),
    #[error(
        "the enrollment token {id} expired at unix time {expired_at}; create a new one with `fleetctl enroll-token create` (or check this device's clock)"
    )]
    TokenExpired { id: String, expired_at: u64 },
    #[error("enrollment did not get an answer: {0}")]
    Unanswered(String),
    #[error(
        "NATS refused the enrollment token {id}: it was used or revoked (its user is revoked at once); create a new one with `fleetctl enroll-token create`"
    )]
    TokenRevoked { id: String },
}

impl IdentityError {
    /// Worth retrying (NATS or the operator not reachable yet), or final.
    pub fn is_transient(&self) -> bool {
        matches!(self, IdentityError::Unanswered(_))
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

pub fn jwt_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("device.jwt")
}

/// The device's key pair, created on first use.
pub fn load_or_create_key(state_dir: &Path) -> Result<KeyPair, IdentityError> {
    let path = dir(state_dir).join("device.nk");
    match std::fs::read_to_string(&path) {
        Ok(seed) => KeyPair::from_seed(seed.trim()).map_err(|e| IdentityError::BadKey {
            path: path.clone(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = KeyPair::new_user();
            let seed = kp.seed().map_err(|e| IdentityError::BadKey {
                path: path.clone(),
                message: e.to_string(),
            })?;
            write_private(&path, seed.as_bytes())?;
            Ok(kp)
        }
        Err(source) => Err(IdentityError::Io { path, source }),
    }
}

/// True once the device holds a JWT.
pub fn is_enrolled(state_dir: &Path) -> bool {
    jwt_path(state_dir).exists()
}

/// Stores the JWT (temp file, fsync, rename) with mode 0600.
pub fn save_jwt(state_dir: &Path, jwt: &str) -> Result<(), IdentityError> {
    write_private(&jwt_path(state_dir), jwt.as_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(io)?;
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
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// An enrollment token: the seed and JWT of a throwaway NATS user, and its id (the JWT's name).
#[derive(Debug)]
struct Token {
    key: KeyPair,
    jwt: String,
    id: String,
    expires_at: Option<u64>,
}

fn parse_token(token: &str) -> Result<Token, IdentityError> {
    let (seed, jwt) = token
        .trim()
        .split_once(':')
        .ok_or_else(|| IdentityError::BadToken("no ':'".into()))?;
    let key = KeyPair::from_seed(seed).map_err(|e| IdentityError::BadToken(e.to_string()))?;
    let payload = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| IdentityError::BadToken("not a JWT".into()))?;
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .map_err(|e| IdentityError::BadToken(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Claims {
        name: String,
        exp: Option<u64>,
    }
    let claims = serde_json::from_slice::<Claims>(&bytes)
        .map_err(|e| IdentityError::BadToken(e.to_string()))?;
    names::check_name(&claims.name).map_err(IdentityError::BadToken)?;
    Ok(Token {
        key,
        jwt: jwt.to_owned(),
        id: claims.name,
        expires_at: claims.exp,
    })
}

/// Asks the operator for a JWT over NATS, connected as the enrollment token's user.
pub async fn enroll(
    nats_url: &str,
    ca: &Path,
    device: &str,
    key: &KeyPair,
    token: &str,
) -> Result<String, IdentityError> {
    let token = parse_token(token)?;
    let now = crate::clock::unix_secs();
    if let Some(expired_at) = token.expires_at.filter(|exp| *exp <= now) {
        // The server would refuse the token's connection without saying why: say it here.
        return Err(IdentityError::TokenExpired {
            id: token.id,
            expired_at,
        });
    }
    let signer = Arc::new(token.key);
    let client = async_nats::ConnectOptions::with_jwt(token.jwt, move |nonce| {
        let signer = signer.clone();
        async move { signer.sign(&nonce).map_err(async_nats::AuthError::new) }
    })
    .add_root_certificates(ca.to_owned())
    .require_tls(true)
    .name(format!("fleet-agent {device} (enrolling)"))
    .custom_inbox_prefix(names::enroll_inbox(&token.id))
    .connection_timeout(Duration::from_secs(10))
    .request_timeout(Some(Duration::from_secs(15)))
    .connect(crate::sync::servers(nats_url))
    .await
    .map_err(|e| match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation => IdentityError::TokenRevoked {
            id: token.id.clone(),
        },
        _ => IdentityError::Unanswered(format!(
            "cannot connect to {nats_url} with the enrollment token: {e}"
        )),
    })?;
    let request = EnrollRequest {
        schema: SCHEMA_VERSION,
        device: device.to_owned(),
        public_key: key.public_key(),
    };
    let result = client
        .request(
            names::enroll_subject(&token.id),
            serde_json::to_vec(&request).expect("serializes").into(),
        )
        .await;
    drop(client);
    let reply = result
        .map_err(|e| IdentityError::Unanswered(format!("the operator did not answer: {e}")))?;
    match serde_json::from_slice::<EnrollReply>(&reply.payload) {
        Ok(EnrollReply::Enrolled { jwt, .. }) => Ok(jwt),
        Ok(EnrollReply::Refused { reason }) => Err(IdentityError::Refused(reason)),
        Err(e) => Err(IdentityError::Unanswered(format!("unreadable answer: {e}"))),
    }
}

/// The `iat` and `exp` of the stored JWT, in unix seconds.
fn jwt_times(state_dir: &Path) -> Option<(u64, u64)> {
    let jwt = std::fs::read_to_string(jwt_path(state_dir)).ok()?;
    let payload = jwt.trim().split('.').nth(1)?;
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(payload.as_bytes())
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Times {
        iat: u64,
        exp: Option<u64>,
    }
    let t: Times = serde_json::from_slice(&bytes).ok()?;
    Some((t.iat, t.exp?))
}

/// When to renew a JWT issued at `iat` that expires at `exp`: once two thirds have passed.
pub fn renew_at(iat: u64, exp: u64) -> u64 {
    iat + exp.saturating_sub(iat) * 2 / 3
}

/// Keeps the device's JWT fresh for as long as the agent runs: asks the operator on
/// `fleet.renew.<device>` once two thirds of its lifetime have passed, and stores the answer for
/// the next (re)connect. A refusal (blacklisted, deleted) is logged and asked again later.
pub async fn renew_forever(client: async_nats::Client, state_dir: PathBuf, device: String) {
    let mut retry = Duration::from_secs(1);
    loop {
        let now = now_secs();
        let Some((iat, exp)) = jwt_times(&state_dir) else {
            // No expiry: nothing to renew (or an unreadable file: check again later).
            tokio::time::sleep(Duration::from_secs(3600)).await;
            continue;
        };
        let due = renew_at(iat, exp);
        if now < due {
            tokio::time::sleep(Duration::from_secs((due - now).clamp(1, 3600))).await;
            continue;
        }
        let answer = client
            .request(names::renew_subject(&device), "".into())
            .await;
        let result = match answer {
            Ok(msg) => match serde_json::from_slice::<EnrollReply>(&msg.payload) {
                Ok(EnrollReply::Enrolled { jwt, expires_at }) => save_jwt(&state_dir, &jwt)
                    .map(|()| expires_at)
                    .map_err(|e| e.to_string()),
                Ok(EnrollReply::Refused { reason }) => Err(format!("refused: {reason}")),
                Err(e) => Err(format!("unreadable answer: {e}")),
            },
            Err(e) => Err(format!("no answer: {e}")),
        };
        match result {
            Ok(expires_at) => {
                tracing::info!(%device, expires_at, "NATS credentials renewed");
                retry = Duration::from_secs(1);
            }
            Err(e) => {
                let left = exp.saturating_sub(now_secs());
                tracing::warn!(%device, error = %e, expires_in_secs = left, retry_in = ?retry, "cannot renew the NATS credentials");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(300));
            }
        }
    }
}

fn now_secs() -> u64 {
    crate::clock::unix_secs()
}

/// Connect options that authenticate as this device, reading the JWT at every (re)connect.
pub fn connect_options(state_dir: &Path, key: KeyPair) -> async_nats::ConnectOptions {
    let key = Arc::new(key);
    let path = jwt_path(state_dir);
    async_nats::ConnectOptions::with_auth_callback(move |nonce| {
        let key = key.clone();
        let path = path.clone();
        async move {
            let jwt = std::fs::read_to_string(&path).map_err(|e| {
                async_nats::AuthError::new(format!("cannot read {}: {e}", path.display()))
            })?;
            let signature = key.sign(&nonce).map_err(async_nats::AuthError::new)?;
            let mut auth = async_nats::Auth::new();
            auth.jwt = Some(jwt.trim().to_owned());
            auth.signature = Some(signature);
            Ok(auth)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_key(dir.path()).unwrap();
        let b = load_or_create_key(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(dir.path().join("identity/device.nk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!is_enrolled(dir.path()));
        save_jwt(dir.path(), "x.y.z").unwrap();
        assert!(is_enrolled(dir.path()));
    }

    #[test]
    fn renewal_is_due_after_two_thirds() {
        assert_eq!(renew_at(1000, 1000 + 30 * 86_400), 1000 + 20 * 86_400);
        assert_eq!(renew_at(10, 16), 14);
        assert_eq!(renew_at(10, 10), 10);
    }

    #[test]
    fn malformed_tokens_are_refused_before_any_connection() {
        for bad in [
            "",
            "nocolon",
            "SUAXXX:a.b.c",
            &format!("{}:not-a-jwt", KeyPair::new_user().seed().unwrap()),
        ] {
            assert!(
                matches!(parse_token(bad), Err(IdentityError::BadToken(_))),
                "{bad}"
            );
        }
        let payload = data_encoding::BASE64URL_NOPAD.encode(br#"{"name":"abc123"}"#);
        let token = parse_token(&format!(
            "{}:h.{payload}.s",
            KeyPair::new_user().seed().unwrap()
        ))
        .unwrap();
        assert_eq!(token.id, "abc123");
    }
}
