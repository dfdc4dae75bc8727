//! Reading a document a person sent, before it is typed: JSON (the HTTP API) or YAML
//! (`fleetctl`), into a [`serde_json::Value`] that holds only what a person can mean.
//!
//! serde_json's own `Value` takes the last of two equal keys, turns YAML's `.nan` and `.inf`
//! into `null` (so an optional field silently disappears) and keeps NUL bytes that no podman
//! argument, file name or HTTP header can carry. [`Strict`] refuses each of them, and every
//! error names the place in the document (`spec.template.containers[0].image`), through
//! `serde_path_to_error`. A leading UTF-8 byte order mark is skipped.
//!
//! [`MAX_RESOURCE_BYTES`] bounds one resource: it is stored as one NATS KV value and sent to
//! devices as one, and NATS refuses a message above its `max_payload` (1 MiB by default).

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::FieldError;

/// The largest resource, as stored (compact JSON), that the operator accepts: half of NATS'
/// default `max_payload`. It bounds one resource only: a device's sync reply carries all of
/// its Deployments in one message, which this does not bound (a known gap).
pub const MAX_RESOURCE_BYTES: usize = 512 * 1024;

/// The largest request body the operator reads: a resource sent with indentation is larger
/// than stored, and one somewhat above the limit should hear its stored size, so this is four
/// times [`MAX_RESOURCE_BYTES`].
pub const MAX_BODY_BYTES: usize = 4 * MAX_RESOURCE_BYTES;

/// A value read strictly: no duplicate keys, no YAML merge keys, no non-finite numbers, no
/// NUL bytes, in keys or values, at any depth.
#[derive(Debug, Clone, PartialEq)]
pub struct Strict(pub Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

/// Parses a JSON document strictly; the error names where the problem is.
/// A syntax error has no path (the caller says "not valid JSON"); what the strict reading
/// refuses has one.
pub fn from_json(bytes: &[u8]) -> Result<Value, FieldError> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    serde_json::from_slice::<de::IgnoredAny>(bytes)
        .map_err(|e| FieldError::new("", e.to_string()))?;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = from_deserializer(&mut de)?;
    de.end().map_err(|e| FieldError::new("", e.to_string()))?;
    Ok(value)
}

/// Reads one document from any self-describing deserializer (a YAML document) strictly.
pub fn from_deserializer<'de, D>(de: D) -> Result<Value, FieldError>
where
    D: Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize::<_, Strict>(de)
        .map(|s| s.0)
        .map_err(|e| {
            let path = path_of(e.path());
            let message = e.inner().to_string();
            // serde_yaml starts its messages with its own (shorter) idea of the path.
            let message = match message.split_once(": ") {
                Some((own, rest)) if !own.is_empty() && path.starts_with(own) => rest.to_owned(),
                _ => message,
            };
            FieldError::new(path, message)
        })
}

/// A `serde_path_to_error` path as the documents write it: `a.b[0].c`, empty for the root or
/// where no path is known (a syntax error).
pub fn path_of(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." || p == "?" {
        String::new()
    } else {
        p
    }
}

/// A text of a document with a byte order mark skipped.
pub fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a plain value: a mapping, a list, a string, a number, a boolean or null")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} is not a number this field can hold")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        no_nul(v)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        no_nul(&v)?;
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            let refusal = if out.contains_key(&key) {
                Some("appears twice in this mapping; give each key once")
            } else if key == "<<" {
                Some("YAML merge keys are not supported; write the fields out")
            } else {
                None
            };
            if let Some(why) = refusal {
                // Refused while reading the key's value, so the error's path ends in the key.
                return map.next_value_seed(Refuse(why));
            }
            let Strict(value) = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

fn no_nul<E: de::Error>(s: &str) -> Result<(), E> {
    if s.contains('\0') {
        Err(E::custom("must not contain a NUL byte"))
    } else {
        Ok(())
    }
}

/// A mapping key: a string without NUL.
struct Key(String);

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                no_nul(v)?;
                Ok(Key(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// Fails with its message when asked for a value.
struct Refuse(&'static str);

impl<'de> DeserializeSeed<'de> for Refuse {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, _: D) -> Result<Value, D::Error> {
        Err(de::Error::custom(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_err(text: &str) -> String {
        from_json(text.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn duplicate_keys_are_refused_where_they_are() {
        assert_eq!(
            json_err(r#"{"spec": {"a": 1, "a": 2}}"#),
            "spec.a: appears twice in this mapping; give each key once at line 1 column 23"
        );
        assert_eq!(
            json_err(r#"{"kind": "Device", "kind": "Deployment"}"#),
            "kind: appears twice in this mapping; give each key once at line 1 column 27"
        );
    }

    #[test]
    fn nul_bytes_are_refused_in_values_and_keys() {
        assert_eq!(
            json_err(r#"{"a": [{"b": "x\u0000y"}]}"#),
            "a[0].b: must not contain a NUL byte at line 1 column 23"
        );
        assert!(json_err(r#"{"a\u0000": 1}"#).contains("must not contain a NUL byte"));
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_trailing_text_refused() {
        let v = from_json("\u{feff}{\"a\": 1}".as_bytes()).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1}));
        assert!(json_err("{} x").contains("trailing characters"));
        // A syntax error deep inside is still a syntax error, with no path.
        let e = from_json(br#"{"metadata": {"name": "a",}}"#).unwrap_err();
        assert_eq!(e.path, "");
        assert!(e.message.contains("at line 1 column 27"), "{e}");
        assert_eq!(from_json(br#"{"spec": {"a": [1, "#).unwrap_err().path, "");
    }
}
