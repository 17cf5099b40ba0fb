//! `POST /aliases`, `POST /v1/aliases`, `GET` and `DELETE /v1/aliases/{id}`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{idempotency, ApiError, AppState, MAX_BODY};
use crate::alias;
use crate::clock::rfc3339;
use crate::raft::node::WriteError;
use crate::raft::{AliasRecord, Command, Response as SmResponse, TargetPolicy};

const DAY_MS: u64 = 86_400_000;
/// Attempts at a fresh id when a random one is already taken.
const ID_ATTEMPTS: usize = 3;

/// Body of a create request.
///
/// Read field by field rather than derived with serde, so that every refusal
/// speaks the API's words (serde's messages name Rust types such as "struct
/// CreateRequest"). Unknown fields are refused, so a typo is reported instead
/// of silently ignored; `max_usage` is accepted as an alias of `max-usage`,
/// because the response spells it that way and sending it back is natural.
#[derive(Debug, Default)]
struct CreateRequest {
    target: String,
    days: Option<i64>,
    max_usage: Option<i64>,
}

/// The fields, as listed in error messages.
const FIELDS: &str = "target, days and max-usage (or max_usage)";

impl CreateRequest {
    fn from_json(value: serde_json::Value) -> Result<Self, ApiError> {
        let serde_json::Value::Object(fields) = value else {
            return Err(ApiError::InvalidRequest(format!(
                "the body must be a JSON object with the fields {FIELDS}, such as {{\"target\": \"me@example.net\", \"days\": 3, \"max-usage\": 5}}"
            )));
        };
        let mut req = CreateRequest::default();
        let mut target = None;
        for (name, value) in fields {
            match name.as_str() {
                "target" => match value {
                    serde_json::Value::String(t) => target = Some(t),
                    _ => {
                        return Err(ApiError::InvalidRequest(
                            "target must be a string: the e-mail address to forward to".into(),
                        ))
                    }
                },
                "days" => req.days = Some(whole_number("days", &value)?),
                "max-usage" | "max_usage" => {
                    if req.max_usage.is_some() {
                        return Err(ApiError::InvalidRequest(
                            "give max-usage or max_usage, not both".into(),
                        ));
                    }
                    req.max_usage = Some(whole_number("max-usage", &value)?);
                }
                other => {
                    let other: String = other.chars().take(64).collect();
                    return Err(ApiError::InvalidRequest(format!(
                        "unknown field {other:?}; the fields are {FIELDS}"
                    )));
                }
            }
        }
        req.target = target.ok_or_else(|| ApiError::InvalidRequest("target is required".into()))?;
        Ok(req)
    }
}

fn whole_number(name: &str, value: &serde_json::Value) -> Result<i64, ApiError> {
    match value {
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| {
            ApiError::InvalidRequest(format!("{name} must be a whole number, not {n}"))
        }),
        _ => Err(ApiError::InvalidRequest(format!(
            "{name} must be a whole number such as 3, not a {}",
            match value {
                serde_json::Value::String(_) => "string",
                serde_json::Value::Bool(_) => "boolean",
                serde_json::Value::Array(_) => "array",
                serde_json::Value::Object(_) => "object",
                _ => "null",
            }
        ))),
    }
}

/// How an alias is shown by the API.
#[derive(Debug, Serialize)]
struct AliasView {
    alias: String,
    id: String,
    target: String,
    created_at: String,
    valid_until: String,
    max_usage: u32,
    remaining: u32,
    /// `active`, `awaiting_confirmation`, `expired`, `used_up` or `revoked`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl AliasView {
    fn new(rec: &AliasRecord, now_ms: u64, token: Option<String>) -> Self {
        let state = if rec.revoked {
            "revoked"
        } else if now_ms >= rec.valid_until_ms {
            "expired"
        } else if rec.used >= rec.max_usage {
            "used_up"
        } else if rec.awaiting_confirmation {
            "awaiting_confirmation"
        } else {
            "active"
        };
        Self {
            alias: rec.address(),
            id: rec.id.clone(),
            target: rec.target.clone(),
            created_at: rfc3339(rec.created_ms),
            valid_until: rfc3339(rec.valid_until_ms),
            max_usage: rec.max_usage,
            remaining: rec.remaining(),
            state,
            token,
        }
    }
}

fn unavailable(e: WriteError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

/// Reads the body, enforcing content type and size before parsing anything.
async fn read_json(headers: &HeaderMap, body: Body) -> Result<CreateRequest, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::BodyTooLarge(MAX_BODY))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::InvalidJson(format!("body is not valid JSON: {e}")))?;
    CreateRequest::from_json(value)
}

/// Checks one numeric limit: positive and within the operator's cap.
fn limit(name: &str, value: Option<i64>, cap: u32) -> Result<u32, ApiError> {
    match value {
        None => Ok(cap),
        Some(v) if v <= 0 => Err(ApiError::InvalidLimit(format!(
            "{name} must be a positive integer"
        ))),
        Some(v) if v > i64::from(cap) => Err(ApiError::LimitExceeded(format!(
            "{name} is {v}, above this service's limit of {cap}"
        ))),
        Some(v) => Ok(v as u32),
    }
}

/// The `201` of a create (or of its replay).
fn created(rec: &AliasRecord, token: String, replayed: bool) -> Response {
    let view = AliasView::new(rec, rec.created_ms, Some(token));
    let location = format!("/v1/aliases/{}", rec.id);
    let mut resp = (StatusCode::CREATED, axum::Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = idempotency::key(&headers)?;
    let req = read_json(&headers, body).await?;
    let target = alias::parse_mailbox(&req.target)
        .map_err(|e| ApiError::InvalidTarget(format!("target: {e}")))?;
    if state.config.domains.contains(&target.domain) {
        return Err(ApiError::InvalidTarget(
            "target: an alias cannot forward to another alias".into(),
        ));
    }
    if req.days.is_none() && req.max_usage.is_none() {
        return Err(ApiError::InvalidRequest(
            "give at least one of days and max-usage".into(),
        ));
    }
    let limits = &state.config.limits;
    let days = limit("days", req.days, limits.max_days)?;
    let max_usage = limit("max-usage", req.max_usage, limits.max_usage)?;
    let domain = state.config.domains[0].clone();
    // With an Idempotency-Key the token is derived (so any node can answer a
    // replay with it); without one it is random.
    let keyed = key.map(|k| {
        let key_hash = idempotency::key_hash(&k);
        let fingerprint = idempotency::fingerprint(&target.to_string(), days, max_usage);
        (key_hash, fingerprint)
    });
    let random_token = alias::new_token();
    // Per-target rules, decided by the state machine (`raft/targets.rs`).
    // The confirmation token is made here, as only this node may mail it.
    let confirm_token = state
        .confirmer
        .as_ref()
        .map(|_| crate::confirm::new_token());
    let policy = TargetPolicy {
        max_per_target: limits.max_aliases_per_target,
        confirm_within_ms: match &state.confirmer {
            Some(_) => u64::from(limits.confirm_valid_days) * DAY_MS,
            None => 0,
        },
        confirm_token_hash: confirm_token
            .as_deref()
            .map(crate::raft::targets::token_hash),
    };
    let limited = policy.max_per_target > 0 || policy.confirm_within_ms > 0;
    for _ in 0..ID_ATTEMPTS {
        let id = alias::new_id();
        let token = match &keyed {
            Some((key_hash, _)) => state.token_key.token(key_hash, &id),
            None => random_token.clone(),
        };
        let create = Command::CreateAlias {
            id,
            domain: domain.clone(),
            target: target.to_string(),
            token_hash: alias::token_hash(&token),
            valid_for_ms: u64::from(days) * DAY_MS,
            max_usage,
        };
        let cmd = match &keyed {
            Some((key_hash, fingerprint)) => Command::CreateAliasKeyed {
                key_hash: key_hash.clone(),
                fingerprint: fingerprint.clone(),
                create: Box::new(create),
            },
            None => create,
        };
        let cmd = if limited {
            Command::CreateLimited {
                policy: policy.clone(),
                create: Box::new(cmd),
            }
        } else {
            cmd
        };
        match state.node.write(cmd).await.map_err(unavailable)? {
            SmResponse::CreatedUnconfirmed {
                alias: rec,
                send_confirmation,
            } => {
                state.metrics.aliases_created.inc();
                tracing::info!(id = %rec.id, days, max_usage, keyed = keyed.is_some(), send_confirmation, "alias created, awaiting its target's confirmation");
                if let (true, Some(confirmer), Some(t)) =
                    (send_confirmation, &state.confirmer, &confirm_token)
                {
                    confirmer.request(rec.target.clone(), t.clone());
                }
                return Ok(created(&rec, token, false));
            }
            SmResponse::TargetFull { max } => return Err(ApiError::TargetFull(max)),
            SmResponse::Created(rec) => {
                state.metrics.aliases_created.inc();
                tracing::info!(id = %rec.id, days, max_usage, keyed = keyed.is_some(), "alias created");
                return Ok(created(&rec, token, false));
            }
            SmResponse::Replayed(rec) => {
                let Some((key_hash, _)) = &keyed else {
                    return Err(ApiError::Internal);
                };
                let token = state.token_key.token(key_hash, &rec.id);
                if alias::token_hash(&token) != rec.token_hash {
                    tracing::warn!(id = %rec.id, "idempotent replay: token cannot be derived again (cluster secret changed?)");
                    return Err(ApiError::IdempotencyConflict);
                }
                tracing::info!(id = %rec.id, "idempotent create replayed");
                // The answer the first request got: the alias as created.
                let mut first = rec.clone();
                first.used = 0;
                first.revoked = false;
                return Ok(created(&first, token, true));
            }
            SmResponse::KeyReused => return Err(ApiError::IdempotencyKeyReused),
            SmResponse::IdTaken => continue,
            other => {
                tracing::error!(response = ?other, "unexpected answer to create");
                return Err(ApiError::Internal);
            }
        }
    }
    Err(ApiError::Unavailable(
        "could not find a free alias id".into(),
    ))
}

/// Finds the alias and checks the bearer token. A wrong token and an unknown id
/// give the same answer, so the API reveals nothing without the token.
///
/// The read is linearizable: this replica first catches up with everything the
/// leader had committed, so a node never shows counts older than a write the
/// client already saw acknowledged elsewhere; a node that cannot confirm that
/// (no quorum) answers `503`.
async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
) -> Result<AliasRecord, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized)?;
    if !alias::is_valid_id(id) {
        return Err(ApiError::NotFound);
    }
    state
        .barriers
        .wait(&state.node, &state.metrics)
        .await
        .map_err(ApiError::Unavailable)?;
    let rec = state.node.reader().alias(id).map_err(|e| {
        tracing::error!(error = %e, "reading the store");
        ApiError::Internal
    })?;
    match rec {
        Some(rec) if alias::token_matches(token, &rec.token_hash) => Ok(rec),
        _ => Err(ApiError::NotFound),
    }
}

/// `GET /v1/aliases/{id}`. Takes the request rather than a `HeaderMap`
/// extractor, which would clone every header of every status read.
pub(super) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let headers = req.headers();
    let rec = authorize(&state, headers, &id).await?;
    let view = AliasView::new(&rec, state.node.now_ms(), None);
    let body = serde_json::to_vec(&view).map_err(|_| ApiError::Internal)?;
    let etag = etag_of(&body);
    let etag = std::str::from_utf8(&etag).map_err(|_| ApiError::Internal)?;
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        .unwrap_or(false);
    let etag_value = HeaderValue::from_str(etag).map_err(|_| ApiError::Internal)?;
    if not_modified {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (header::ETAG, etag_value),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}

/// A strong ETag for a status body: the first 8 bytes of its SHA-256 in
/// hex, quoted (18 bytes, no allocation).
fn etag_of(body: &[u8]) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = <sha2::Sha256 as sha2::Digest>::digest(body);
    let mut tag = [b'"'; 18];
    for (i, b) in digest[..8].iter().enumerate() {
        tag[1 + 2 * i] = HEX[usize::from(b >> 4)];
        tag[2 + 2 * i] = HEX[usize::from(b & 0x0f)];
    }
    tag
}

pub(super) async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rec = authorize(&state, &headers, &id).await?;
    match state
        .node
        .write(Command::Revoke { id: rec.id.clone() })
        .await
        .map_err(unavailable)?
    {
        SmResponse::Revoked => {
            tracing::info!(id = %rec.id, "alias revoked");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        SmResponse::NotFound => Err(ApiError::NotFound),
        other => {
            tracing::error!(response = ?other, "unexpected answer to revoke");
            Err(ApiError::Internal)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<CreateRequest, ApiError> {
        CreateRequest::from_json(serde_json::from_str(body).unwrap())
    }

    #[test]
    fn etag_is_the_quoted_hex_of_the_first_eight_digest_bytes() {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(b"{}");
        let want = format!("\"{}\"", hex::encode(&digest[..8]));
        assert_eq!(std::str::from_utf8(&etag_of(b"{}")).unwrap(), want);
    }

    #[test]
    fn max_usage_is_an_alias_of_max_hyphen_usage() {
        let r = parse(r#"{"target":"a@b.example","max_usage":3}"#).unwrap();
        assert_eq!(r.max_usage, Some(3));
        let r = parse(r#"{"target":"a@b.example","max-usage":4,"days":2}"#).unwrap();
        assert_eq!((r.max_usage, r.days), (Some(4), Some(2)));
        assert!(parse(r#"{"target":"a@b.example","max-usage":4,"max_usage":4}"#).is_err());
    }

    #[test]
    fn refusals_speak_the_api_words() {
        for body in [
            "[]",
            r#"["a@b.example", 3]"#,
            r#"{"target":"a@b.example","days":"3"}"#,
            r#"{"target":"a@b.example","days":1.5}"#,
            r#"{"target":3}"#,
            r#"{"days":3}"#,
            r#"{"target":"a@b.example","colour":"red"}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert!(matches!(e, ApiError::InvalidRequest(_)), "{body}: {e:?}");
            let m = e.to_string();
            for internal in ["struct", "CreateRequest", "i64", "u32", "sequence"] {
                assert!(!m.contains(internal), "{body}: {m}");
            }
        }
    }

    #[test]
    fn limits_default_to_the_cap_and_refuse_bad_values() {
        assert_eq!(limit("days", None, 60).unwrap(), 60);
        assert_eq!(limit("days", Some(3), 60).unwrap(), 3);
        assert!(matches!(
            limit("days", Some(0), 60),
            Err(ApiError::InvalidLimit(_))
        ));
        assert!(matches!(
            limit("days", Some(-2), 60),
            Err(ApiError::InvalidLimit(_))
        ));
        let e = limit("max-usage", Some(101), 100).unwrap_err();
        assert!(matches!(e, ApiError::LimitExceeded(_)));
        assert!(e.to_string().contains("100"), "{e}");
    }
}
