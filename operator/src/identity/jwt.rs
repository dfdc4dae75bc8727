//! NATS decentralized-auth JWTs: the operator, account and user claims Fleet mints, their
//! encoding, and signature verification (for tests and for reading stored JWTs back).
//!
//! Only the fields Fleet uses are modelled; the layout follows nats-io/jwt v2 (the server
//! accepts these tokens, checked by the e2e tests against a real nats-server). `jti` is random:
//! the server never checks it.

use std::collections::BTreeMap;

use data_encoding::BASE64URL_NOPAD;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("a JWT has three dot-separated parts")]
    Shape,
    #[error("the JWT is not valid base64url or JSON: {0}")]
    Decode(String),
    #[error("the JWT's signature does not verify against its issuer {0}")]
    Signature(String),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// The claims every NATS JWT carries, around the `nats` section `T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims<T> {
    pub jti: String,
    pub iat: u64,
    pub iss: String,
    pub name: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    pub nats: T,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorNats {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    pub system_account: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountNats {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    pub limits: AccountLimits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<SigningKey>,
    /// User public key -> unix seconds: JWTs issued at or before are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revocations: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountLimits {
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    pub imports: i64,
    pub exports: i64,
    pub wildcards: bool,
    pub conn: i64,
    pub leaf: i64,
    /// JetStream limits; without them JetStream is off for the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_storage: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_storage: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<i64>,
}

impl AccountLimits {
    pub fn unlimited(jetstream: bool) -> AccountLimits {
        let js = jetstream.then_some(-1);
        AccountLimits {
            subs: -1,
            data: -1,
            payload: -1,
            imports: -1,
            exports: -1,
            wildcards: true,
            conn: -1,
            leaf: -1,
            mem_storage: js,
            disk_storage: js,
            streams: js,
            consumer: js,
        }
    }
}

/// An account signing key: plain (users carry their own permissions) or scoped (the account
/// holds the permissions as a template; users must carry none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SigningKey {
    Plain(String),
    Scoped(Box<UserScope>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserScope {
    /// Always `user_scope`.
    pub kind: String,
    pub key: String,
    pub role: String,
    pub template: UserPermissions,
}

/// Permissions and limits of a user, or of a scoped signing key's template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserPermissions {
    #[serde(rename = "pub", default, skip_serializing_if = "Permission::is_empty")]
    pub publish: Permission,
    #[serde(rename = "sub", default, skip_serializing_if = "Permission::is_empty")]
    pub subscribe: Permission,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp: Option<ResponsePermission>,
    /// Limits; `None` leaves them out, as users of a scoped signing key must (the server
    /// refuses a scoped user with any permission or limit of its own; -1 means unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subs: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<i64>,
}

impl UserPermissions {
    /// No permissions and no limits: what a scoped user carries.
    pub fn scoped() -> UserPermissions {
        UserPermissions::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Permission {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl Permission {
    pub fn allow(subjects: &[&str]) -> Permission {
        Permission {
            allow: subjects.iter().map(|s| s.to_string()).collect(),
            deny: vec![],
        }
    }

    fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponsePermission {
    /// Responses allowed per request; -1 for any number within `ttl`.
    pub max: i64,
    /// Nanoseconds.
    pub ttl: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserNats {
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    /// The account, when the user is signed by one of its signing keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_account: Option<String>,
    #[serde(flatten)]
    pub permissions: UserPermissions,
    /// A bearer token connects without signing the server's nonce.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bearer_token: bool,
}

/// Encodes and signs `claims` with `signer` (whose public key must be `claims.iss`).
pub fn encode<T: Serialize>(claims: &Claims<T>, signer: &KeyPair) -> Result<String, JwtError> {
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = serde_json::to_vec(claims).map_err(|e| JwtError::Sign(e.to_string()))?;
    let signed = format!("{header}.{}", BASE64URL_NOPAD.encode(&body));
    let sig = signer
        .sign(signed.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", BASE64URL_NOPAD.encode(&sig)))
}

/// Decodes a JWT and verifies its signature against its `iss`.
pub fn decode<T: DeserializeOwned>(jwt: &str) -> Result<Claims<T>, JwtError> {
    let mut parts = jwt.trim().split('.');
    let (Some(header), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    let bytes = |s: &str| {
        BASE64URL_NOPAD
            .decode(s.as_bytes())
            .map_err(|e| JwtError::Decode(e.to_string()))
    };
    let claims: Claims<T> =
        serde_json::from_slice(&bytes(body)?).map_err(|e| JwtError::Decode(e.to_string()))?;
    let issuer =
        KeyPair::from_public_key(&claims.iss).map_err(|e| JwtError::Signature(e.to_string()))?;
    issuer
        .verify(format!("{header}.{body}").as_bytes(), &bytes(sig)?)
        .map_err(|_| JwtError::Signature(claims.iss.clone()))?;
    Ok(claims)
}

/// A random `jti`.
pub fn new_jti() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    data_encoding::BASE32_NOPAD.encode(&b)
}

/// The text of a `.creds` file, as nats tools and async-nats read it.
pub fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let claims = Claims {
            jti: new_jti(),
            iat: 1,
            iss: account.public_key(),
            name: "pi-01".into(),
            sub: user.public_key(),
            exp: Some(99),
            nats: UserNats {
                kind: "user".into(),
                version: 2,
                issuer_account: None,
                permissions: UserPermissions {
                    subs: Some(-1),
                    data: Some(-1),
                    payload: Some(-1),
                    ..Default::default()
                },
                bearer_token: false,
            },
        };
        let jwt = encode(&claims, &account).unwrap();
        let back: Claims<UserNats> = decode(&jwt).unwrap();
        assert_eq!(back, claims);
        let json = String::from_utf8(
            BASE64URL_NOPAD
                .decode(jwt.split('.').nth(1).unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
        assert!(
            json.contains(r#""nats":{"type":"user","version":2,"subs":-1,"data":-1,"payload":-1}"#),
            "{json}"
        );

        // Signed by a key that is not the claimed issuer.
        let forged = encode(&claims, &KeyPair::new_account()).unwrap();
        assert!(matches!(
            decode::<UserNats>(&forged),
            Err(JwtError::Signature(_))
        ));
        assert!(matches!(decode::<UserNats>("a.b"), Err(JwtError::Shape)));
    }

    #[test]
    fn scoped_signing_keys_serialize_as_nats_expects() {
        let nats = AccountNats {
            kind: "account".into(),
            version: 2,
            limits: AccountLimits::unlimited(true),
            signing_keys: vec![
                SigningKey::Plain("AKEY1".into()),
                SigningKey::Scoped(Box::new(UserScope {
                    kind: "user_scope".into(),
                    key: "AKEY2".into(),
                    role: "device".into(),
                    template: UserPermissions {
                        publish: Permission::allow(&["a.{{name()}}"]),
                        subs: Some(-1),
                        data: Some(-1),
                        payload: Some(-1),
                        ..Default::default()
                    },
                })),
            ],
            revocations: [("UKEY".to_owned(), 5)].into(),
        };
        let json = serde_json::to_string(&nats).unwrap();
        assert!(json.contains(r#""signing_keys":["AKEY1",{"kind":"user_scope","key":"AKEY2","role":"device","template":{"pub":{"allow":["a.{{name()}}"]},"subs":-1,"data":-1,"payload":-1}}]"#), "{json}");
        assert!(json.contains(r#""revocations":{"UKEY":5}"#));
        assert_eq!(serde_json::from_str::<AccountNats>(&json).unwrap(), nats);
    }
}
