//! `Idempotency-Key` on creates: the key, the request fingerprint and the
//! token a keyed create hands out.
//!
//! The cluster stores only the SHA-256 of a management token, yet a replay
//! to any node must answer the same token as the first request. So the token
//! of a keyed create is not random: it is
//! `HMAC-SHA256(k, key_hash || alias_id)`, where `k` is derived from the
//! cluster secret (which every node holds) and `alias_id` is the id the first
//! request created (which the claim in the replicated state names). Any node
//! can recompute it, and nothing in the replicated state or the logs lets
//! anyone else do so. Including the alias id means that a key reused after
//! it expired (24 h) never yields the token of an earlier alias. See
//! docs/architecture.md for the alternatives considered.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::config::Secret;

/// Shortest key accepted: the key is a credential (whoever presents it with
/// the same body within 24 h gets the alias and its token), so it must not be
/// guessable. A UUID is 36 characters.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// The request header.
pub const HEADER: &str = "idempotency-key";

/// The key of a request, if it carries one.
///
/// Accepts the key bare or as a quoted string (the IETF draft defines the
/// header as a structured-field string: `Idempotency-Key: "8e03…"`).
///
/// # Errors
/// [`ApiError::InvalidIdempotencyKey`] for a key that is too short, too long,
/// repeated, or not printable ASCII.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidIdempotencyKey(
            "send one Idempotency-Key header".into(),
        ));
    }
    let raw = value.to_str().map_err(|_| {
        ApiError::InvalidIdempotencyKey("Idempotency-Key must be printable ASCII".into())
    })?;
    let raw = raw.trim();
    let key = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(ApiError::InvalidIdempotencyKey(format!(
            "Idempotency-Key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} characters (a random UUID is a good key)"
        )));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(ApiError::InvalidIdempotencyKey(
            "Idempotency-Key must be printable ASCII without quotes or backslashes".into(),
        ));
    }
    Ok(Some(key.to_string()))
}

/// What the replicated state stores for a key: its SHA-256, never the key.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(format!("tempalias idempotency key\0{key}")))
}

/// The fingerprint of a create request after defaults are applied, so that
/// `{"target": "a@b", "days": 3}` and the same with the default `max-usage`
/// spelt out count as the same request.
pub fn fingerprint(target: &str, days: u32, max_usage: u32) -> String {
    let canonical = serde_json::json!({
        "target": target,
        "days": days,
        "max_usage": max_usage,
    });
    hex::encode(Sha256::digest(canonical.to_string()))
}

/// The key that derives tokens of keyed creates; itself derived from the
/// cluster secret so that the secret is not used for two purposes.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey([redacted])")
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

impl TokenKey {
    pub fn from_secret(secret: &Secret) -> Self {
        Self(hmac(
            secret.expose().as_bytes(),
            &[b"tempalias idempotent-create token key v1"],
        ))
    }

    /// The management token of the alias `alias_id` created under `key_hash`
    /// (64 hex digits, like a random token).
    pub fn token(&self, key_hash: &str, alias_id: &str) -> String {
        hex::encode(hmac(
            &self.0,
            &[key_hash.as_bytes(), b"\0", alias_id.as_bytes()],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(key(&headers(&[])).unwrap(), None);
        let uuid = "0b0e3f4c-3d2b-4d0e-9a55-5c1b0d2d1e9f";
        assert_eq!(key(&headers(&[uuid])).unwrap().as_deref(), Some(uuid));
        let quoted = format!("\"{uuid}\"");
        assert_eq!(key(&headers(&[&quoted])).unwrap().as_deref(), Some(uuid));
        for bad in ["short", &"x".repeat(256), "sixteen chars ok but space"] {
            assert!(
                matches!(
                    key(&headers(&[bad])),
                    Err(ApiError::InvalidIdempotencyKey(_))
                ),
                "{bad:?}"
            );
        }
        assert!(key(&headers(&[uuid, uuid])).is_err());
    }

    #[test]
    fn tokens_depend_on_secret_key_and_alias() {
        let a = TokenKey::from_secret(&Secret::new("a-cluster-secret-of-some-length"));
        let b = TokenKey::from_secret(&Secret::new("another-cluster-secret-entirely"));
        let kh = key_hash("0b0e3f4c-3d2b-4d0e-9a55-5c1b0d2d1e9f");
        let t = a.token(&kh, "abcdefghij");
        assert_eq!(t.len(), 64);
        assert_eq!(t, a.token(&kh, "abcdefghij"));
        assert_ne!(t, a.token(&kh, "abcdefghik"));
        assert_ne!(t, b.token(&kh, "abcdefghij"));
        assert_ne!(
            t,
            a.token(&key_hash("another key, long enough"), "abcdefghij")
        );
        assert!(!t.contains(&kh));
    }

    #[test]
    fn fingerprint_sees_every_field() {
        let f = fingerprint("me@example.net", 3, 5);
        assert_eq!(f, fingerprint("me@example.net", 3, 5));
        assert_ne!(f, fingerprint("me@example.net", 4, 5));
        assert_ne!(f, fingerprint("me@example.net", 3, 6));
        assert_ne!(f, fingerprint("you@example.net", 3, 5));
    }
}
