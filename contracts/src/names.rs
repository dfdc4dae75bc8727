//! Names of buckets, keys and subjects, and the one rule every device and resource name obeys.
//!
//! Names end up inside NATS subjects and permission templates, so a name is a single literal
//! subject token: `[a-z0-9-]`, starting and ending with a letter or digit, at most 63 bytes.
//! A device called `*` or `a.b` would otherwise widen a permission to other devices' keys.

/// KV bucket of desired state, written by the operator only.
pub const DESIRED_BUCKET: &str = "fleet-desired";
/// KV bucket of reported state, each key written by its device only.
pub const REPORTED_BUCKET: &str = "fleet-reported";
/// KV bucket of resource documents, written by the operator's API only.
pub const RESOURCES_BUCKET: &str = "fleet-resources";
/// Key of the store identity ([`crate::state::StoreIdentity`]) in [`RESOURCES_BUCKET`]; no
/// resource kind is called `fleet`.
pub const STORE_KEY: &str = "fleet.store";

/// Key in [`DESIRED_BUCKET`] naming the store identity the bucket was last completely derived
/// from; written by the leader after every device key of that store. No device name starts
/// with `_`, so it is never a device's key.
pub const DESIRED_STORE_KEY: &str = "_store";

/// Key of an admin's adoption record ([`crate::state::Adoption`]) for `device` in
/// [`RESOURCES_BUCKET`].
pub fn adoption_key(device: &str) -> String {
    format!("adoption.{device}")
}

/// KV bucket of enrollment tokens (`token.<id>`) and enrolled device keys (`device.<name>`),
/// written by the operator only.
pub const ENROLLMENT_BUCKET: &str = "fleet-enrollment";

/// Where a device holding enrollment token `token_id` sends its enrollment request.
pub fn enroll_subject(token_id: &str) -> String {
    format!("fleet.enroll.{token_id}")
}

/// KV bucket of audit records (exec), written by the operator only.
pub const AUDIT_BUCKET: &str = "fleet-audit";

/// KV bucket of the operators' leadership lease; the key is [`LEASE_KEY`].
pub const LEASE_BUCKET: &str = "fleet-lease";
pub const LEASE_KEY: &str = "operator";

/// Where a device answers log requests.
pub fn logs_subject(device: &str) -> String {
    format!("fleet.dev.{device}.logs")
}

/// Where a device answers exec requests.
pub fn exec_subject(device: &str) -> String {
    format!("fleet.dev.{device}.exec")
}

/// Where a device asks the operator for its whole desired state
/// ([`crate::rpc::SyncRequest`]).
pub fn sync_subject(device: &str) -> String {
    format!("fleet.sync.{device}")
}

/// Where a device sends its reports for the operator to store ([`crate::rpc::ReportRequest`]).
pub fn report_subject(device: &str) -> String {
    format!("fleet.report.{device}")
}

/// Every subject the operator sends to `device` on (requests and the doorbell): what a
/// device may hear besides its own inbox.
pub fn device_subjects(device: &str) -> String {
    format!("fleet.dev.{device}.>")
}

/// The queue group the operators hear devices' requests in: one operator answers each.
pub const OPERATOR_QUEUE: &str = "fleet-operator";

/// Where the operator tells a device its desired state changed
/// ([`crate::rpc::DesiredChanged`]).
pub fn desired_doorbell_subject(device: &str) -> String {
    format!("fleet.dev.{device}.desired")
}

/// Where an enrolled device asks for a fresh JWT before its current one expires; answered with
/// an [`crate::api::EnrollReply`].
pub fn renew_subject(device: &str) -> String {
    format!("fleet.renew.{device}")
}

/// The inbox prefix of a connection made with enrollment token `token_id`: the operator
/// answers an enrollment request only on a subject under it.
pub fn enroll_inbox(token_id: &str) -> String {
    format!("_INBOX.enroll.{token_id}")
}

/// The inbox prefix of a device's connection: the operator answers a renewal only on a subject
/// under it, and a device may subscribe to nothing else of `_INBOX`.
pub fn device_inbox(device: &str) -> String {
    format!("_INBOX.dev.{device}")
}

/// The inbox prefix of the operator's connections; no device id or token can produce it. A
/// device answers only requests whose reply subject is under it.
pub const OPERATOR_INBOX: &str = "_INBOX.ctl";

/// Whether `reply` is a single reply subject under inbox prefix `prefix`: `<prefix>.<tokens>`,
/// with no wildcard and nothing that is not a plain subject token. What a responder checks
/// before answering, so a request cannot turn it into a publisher on someone else's subject.
pub fn is_reply_under(reply: &str, prefix: &str) -> bool {
    let Some(rest) = reply.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) else {
        return false;
    };
    !rest.is_empty()
        && rest.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

/// Where a follower acknowledges chunks (`{"seq":N}`) or says stop (`{"stop":true}`).
pub fn follow_ack_subject(device: &str, session: &str) -> String {
    format!("fleet.dev.{device}.logs.ack.{session}")
}

/// The key suffix of a device's heartbeat in the reported bucket (`<device>._info`).
/// It starts with `_`, which no deployment name can, so it never collides with one.
pub const INFO_KEY: &str = "_info";

/// The key suffix of a device's OS upgrade: in the desired bucket the upgrade to make
/// ([`crate::state::DesiredOs`]), in the reported bucket where it stands
/// ([`crate::state::OsReport`]). Like [`INFO_KEY`] it starts with `_`.
pub const OS_KEY: &str = "_os";

/// Key of a device's OS upgrade in the desired and reported buckets.
pub fn os_key(device: &str) -> String {
    format!("{device}.{OS_KEY}")
}

/// Longest allowed name, the DNS label limit.
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `name` can be used as a device or resource name; the error says why not.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "must be at most {MAX_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(format!(
            "must contain only lower-case letters, digits and '-', found {c:?}"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// The JetStream stream behind a KV bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The subject a KV key is stored under.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Key of one deployment on one device, in the desired and reported buckets.
pub fn deployment_key(device: &str, deployment: &str) -> String {
    format!("{device}.{deployment}")
}

/// Key of a device's heartbeat in the reported bucket.
pub fn info_key(device: &str) -> String {
    format!("{device}.{INFO_KEY}")
}

/// Subject filter covering every key of one device in a bucket.
pub fn device_filter(bucket: &str, device: &str) -> String {
    format!("$KV.{bucket}.{device}.>")
}

/// Key of a resource document in the resources bucket.
pub fn resource_key(kind: &str, name: &str) -> String {
    format!("{}.{name}", kind.to_ascii_lowercase())
}

/// What a key of the desired or reported bucket refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKey<'a> {
    Deployment {
        device: &'a str,
        deployment: &'a str,
    },
    Info {
        device: &'a str,
    },
    Os {
        device: &'a str,
    },
}

/// Splits a desired or reported key; `None` for a key no Fleet component writes.
pub fn parse_device_key(key: &str) -> Option<DeviceKey<'_>> {
    let (device, rest) = key.split_once('.')?;
    check_name(device).ok()?;
    if rest == INFO_KEY {
        return Some(DeviceKey::Info { device });
    }
    if rest == OS_KEY {
        return Some(DeviceKey::Os { device });
    }
    check_name(rest).ok()?;
    Some(DeviceKey::Deployment {
        device,
        deployment: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_requesters_own_inbox_is_a_reply_subject() {
        let dev = device_inbox("pi-01");
        for (reply, ok) in [
            ("_INBOX.dev.pi-01.AbC.1", true),
            ("_INBOX.dev.pi-01.x", true),
            ("_INBOX.dev.pi-01", false),
            ("_INBOX.dev.pi-01.", false),
            ("_INBOX.dev.pi-01..x", false),
            ("_INBOX.dev.pi-01.*", false),
            ("_INBOX.dev.pi-01.>", false),
            ("_INBOX.dev.pi-01.a b", false),
            ("_INBOX.dev.pi-012.x", false),
            ("_INBOX.dev.pi-02.x", false),
            ("$JS.API.STREAM.PURGE.KV_fleet-desired", false),
            ("$KV.fleet-desired.pi-02.web", false),
            ("fleet.dev.pi-02.exec", false),
            ("", false),
        ] {
            assert_eq!(is_reply_under(reply, &dev), ok, "{reply:?}");
        }
        assert!(is_reply_under(
            "_INBOX.enroll.tok1.z",
            &enroll_inbox("tok1")
        ));
        assert!(!is_reply_under(
            "_INBOX.enroll.tok1.z",
            &enroll_inbox("tok2")
        ));
        assert!(is_reply_under("_INBOX.ctl.abc.def", OPERATOR_INBOX));
        assert!(!is_reply_under("_INBOX.ctlx.abc", OPERATOR_INBOX));
    }

    #[test]
    fn names() {
        for ok in ["a", "pi-01", "web", "0", &"x".repeat(63)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "must not be empty"),
            ("*", "found '*'"),
            (">", "found '>'"),
            ("a.b", "found '.'"),
            ("Pi", "found 'P'"),
            ("a b", "found ' '"),
            ("-a", "start and end"),
            ("a-", "start and end"),
            (&"x".repeat(64), "at most 63"),
        ] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn keys() {
        assert_eq!(deployment_key("pi-01", "web"), "pi-01.web");
        assert_eq!(
            parse_device_key("pi-01.web"),
            Some(DeviceKey::Deployment {
                device: "pi-01",
                deployment: "web"
            })
        );
        assert_eq!(
            parse_device_key("pi-01._info"),
            Some(DeviceKey::Info { device: "pi-01" })
        );
        assert_eq!(
            parse_device_key("pi-01._os"),
            Some(DeviceKey::Os { device: "pi-01" })
        );
        assert_eq!(os_key("pi-01"), "pi-01._os");
        assert_eq!(parse_device_key("pi-01._other"), None);
        assert_eq!(parse_device_key("pi-01"), None);
        assert_eq!(parse_device_key("pi-01.a.b"), None);
        assert_eq!(parse_device_key("*.web"), None);
        assert_eq!(
            device_filter(DESIRED_BUCKET, "pi-01"),
            "$KV.fleet-desired.pi-01.>"
        );
        assert_eq!(resource_key("Deployment", "web"), "deployment.web");
    }

    /// The operator's responder hears `subject("*")` and takes the requester's name from what
    /// follows `subject("")`: that only works while the name is the subject's last token.
    #[test]
    fn request_subjects_end_with_the_requesters_name() {
        let subjects: [fn(&str) -> String; 4] =
            [enroll_subject, renew_subject, sync_subject, report_subject];
        for subject in subjects {
            let prefix = subject("");
            assert!(prefix.ends_with('.'), "{prefix}");
            assert_eq!(subject("pi-01"), format!("{prefix}pi-01"));
            assert_eq!(subject("*"), format!("{prefix}*"));
        }
    }
}
