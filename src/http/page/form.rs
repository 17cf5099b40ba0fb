//! `POST /create`: the create form for browsers without JavaScript.
//!
//! The form fields (`target`, `days`, `uses`, form-encoded) are turned into the
//! JSON body of `POST /v1/aliases` and handed to that very handler, so both
//! paths share one set of checks and one way of creating; this module only
//! translates the answer into HTML: the new alias, or the form again with each
//! error next to its field.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{dynamic_html, escape, render, FormErrors, FormValues, Site, CREATED_HTML, STYLE};
use crate::http::aliases;
use crate::http::{AppState, MAX_BODY};

/// The form as browsers send it. Missing fields read as empty.
#[derive(Debug, Default, Deserialize)]
struct CreateForm {
    #[serde(default)]
    target: String,
    #[serde(default)]
    days: String,
    #[serde(default)]
    uses: String,
}

/// The parts of the API's `201` body the result page shows.
#[derive(Debug, Deserialize)]
pub(super) struct Created {
    alias: String,
    id: String,
    target: String,
    valid_until: String,
    max_usage: u32,
    remaining: u32,
    token: String,
    /// `awaiting_confirmation` when the target must confirm first.
    #[serde(default)]
    state: String,
}

#[cfg(test)]
impl Created {
    pub(super) fn example() -> Self {
        Self {
            alias: "z4wqczxatah0@tempalias.test".into(),
            id: "z4wqczxatah0".into(),
            target: "me@example.net".into(),
            valid_until: "2026-11-24T06:21:40Z".into(),
            max_usage: 2,
            remaining: 2,
            token: "12b7bfe3f32f491737cbf6981d49f0472a60cecbead0d9cecfe826fbe43c2fd5".into(),
            state: "awaiting_confirmation".into(),
        }
    }
}

/// The API's error body.
#[derive(Debug, Default, Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

/// `POST /create`: the API's create for a form, answered with a page.
/// `refused`: the client is out of creates (`ratelimit::CreateRefused`, the
/// seconds until it may try again); it is told so on the page.
pub(super) async fn create(
    site: Arc<Site>,
    State(state): State<AppState>,
    refused: Option<u64>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form_error = |status: StatusCode, text: &str| {
        let errors = FormErrors {
            form: text.into(),
            ..Default::default()
        };
        dynamic_html(
            status,
            site.render_index(&FormValues::default(), &errors),
            &site.csp,
        )
    };
    if !is_form(&headers) {
        return form_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "The form must be sent as application/x-www-form-urlencoded.",
        );
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
        return form_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("The form is larger than {MAX_BODY} bytes."),
        );
    };
    let Ok(form) = serde_urlencoded::from_bytes::<CreateForm>(&bytes) else {
        return form_error(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    let values = FormValues {
        target: form.target.trim().to_string(),
        days: form.days.trim().to_string(),
        uses: form.uses.trim().to_string(),
    };
    let (days, uses, errors) = parse_numbers(&values, site.max_days, site.max_uses);
    if errors != FormErrors::default() {
        let page = site.render_index(&values, &errors);
        return dynamic_html(StatusCode::BAD_REQUEST, page, &site.csp);
    }

    let mut json = serde_json::Map::new();
    json.insert("target".into(), values.target.clone().into());
    if let Some(d) = days {
        json.insert("days".into(), d.into());
    }
    if let Some(u) = uses {
        json.insert("max-usage".into(), u.into());
    }
    // The request's other headers go along, so whatever the API reads from
    // them (client address, idempotency) applies to the form as well.
    let mut api_headers = headers.clone();
    api_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    api_headers.remove(header::CONTENT_LENGTH);
    let api_body = Body::from(serde_json::Value::Object(json).to_string());
    let answer = match refused {
        Some(secs) => crate::http::error::ApiError::RateLimited(secs).into_response(),
        None => match aliases::create(State(state), api_headers, api_body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    };
    let status = answer.status();
    let passed_on = passed_on_headers(answer.headers());
    let bytes = axum::body::to_bytes(answer.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();

    let mut resp = if status == StatusCode::CREATED {
        match serde_json::from_slice::<Created>(&bytes) {
            Ok(created) => dynamic_html(status, render_created(&created), &site.csp),
            Err(e) => {
                tracing::error!(error = %e, "the create answer did not parse");
                form_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong on our side.",
                )
            }
        }
    } else {
        let err: ApiErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let errors = explain(status, &err, &site, passed_on.get(header::RETRY_AFTER));
        dynamic_html(status, site.render_index(&values, &errors), &site.csp)
    };
    resp.headers_mut().extend(passed_on);
    resp
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Headers of the API's answer that mean the same on the HTML answer.
fn passed_on_headers(api: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in api {
        if name == header::RETRY_AFTER
            || name == header::LOCATION
            || name.as_str().starts_with("ratelimit")
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Reads the two numbers; an empty field means "not given".
fn parse_numbers(
    values: &FormValues,
    max_days: u32,
    max_uses: u32,
) -> (Option<i64>, Option<i64>, FormErrors) {
    fn number(text: &str, what: &str, max: u32, error: &mut String) -> Option<i64> {
        if text.is_empty() {
            return None;
        }
        let n = text.parse::<i64>().ok();
        if n.is_none() {
            *error = if text.bytes().all(|b| b.is_ascii_digit()) {
                // Digits only, but beyond any integer: above the limit anyway.
                format!("Choose from 1 to {max} {what}.")
            } else {
                format!("Enter a whole number of {what}.")
            };
        }
        n
    }
    let mut errors = FormErrors::default();
    let days = number(&values.days, "days", max_days, &mut errors.days);
    let uses = number(&values.uses, "messages", max_uses, &mut errors.uses);
    if values.target.is_empty() {
        errors.target = "Enter the address the alias should forward to.".into();
    }
    (days, uses, errors)
}

/// Puts an API error next to the field it concerns, in plain words. The
/// page's script does the same for the JavaScript path (`create.js`).
fn explain(
    status: StatusCode,
    err: &ApiErrorBody,
    site: &Site,
    retry_after: Option<&HeaderValue>,
) -> FormErrors {
    let mut e = FormErrors::default();
    let retry = retry_after.and_then(|v| v.to_str().ok()).unwrap_or("a few");
    match err.error.as_str() {
        "invalid_target" => {
            let detail = err.message.trim_start_matches("target:").trim();
            e.target = format!("This address cannot receive forwarded mail: {detail}.");
        }
        "target_limit_reached" => {
            e.target = "This address already has as many live aliases as this service allows. Revoke one, or wait until one expires.".into();
        }
        "invalid_limit" | "limit_exceeded" if err.message.starts_with("days") => {
            e.days = format!("Choose from 1 to {} days.", site.max_days);
        }
        "invalid_limit" | "limit_exceeded" => {
            e.uses = format!("Choose from 1 to {} messages.", site.max_uses);
        }
        "invalid_request" if err.message.contains("at least one") => {
            e.days = "Give a number of days or a number of messages, or both.".into();
        }
        _ if status == StatusCode::TOO_MANY_REQUESTS => {
            e.form =
                format!("Too many new aliases from your address. Try again in {retry} seconds.");
        }
        _ if status == StatusCode::SERVICE_UNAVAILABLE => {
            e.form =
                "The service cannot create an alias right now. Try again in a few seconds.".into();
        }
        _ if err.message.is_empty() => {
            e.form = format!("The alias could not be created (HTTP {}).", status.as_u16());
        }
        _ => e.form = format!("The alias could not be created: {}.", err.message),
    }
    e
}

/// The result page of a create without JavaScript. The expiry is shown in UTC
/// (local time needs the browser's help).
pub(super) fn render_created(a: &Created) -> String {
    let manage = format!("/manage#id={}&token={}", a.id, a.token);
    render(
        CREATED_HTML,
        &[
            ("style", STYLE.into()),
            ("alias", escape(&a.alias)),
            ("target", escape(&a.target)),
            ("valid_until", escape(&a.valid_until)),
            ("valid_until_text", escape(&utc_text(&a.valid_until))),
            ("remaining", a.remaining.to_string()),
            ("max_usage", a.max_usage.to_string()),
            ("manage_path", escape(&manage)),
            ("token", escape(&a.token)),
            (
                "notice",
                if a.state == "awaiting_confirmation" {
                    "<p id=\"r-notice\" class=\"warning\">Mail to this alias is refused until the target address confirms: we sent it a link (once; a later alias for the same address uses the same confirmation).</p>".into()
                } else {
                    String::new()
                },
            ),
        ],
    )
}

/// `2026-11-24T06:21:40Z` as `2026-11-24 06:21 UTC`.
fn utc_text(rfc3339: &str) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| rfc3339.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn values(target: &str, days: &str, uses: &str) -> FormValues {
        FormValues {
            target: target.into(),
            days: days.into(),
            uses: uses.into(),
        }
    }

    #[test]
    fn numbers_are_optional_but_must_be_whole() {
        let (d, u, e) = parse_numbers(&values("me@example.net", "3", ""), 60, 100);
        assert_eq!((d, u), (Some(3), None));
        assert_eq!(e, FormErrors::default());
        let (_, _, e) = parse_numbers(
            &values("a@example.net", "99999999999999999999", ""),
            60,
            100,
        );
        assert_eq!(e.days, "Choose from 1 to 60 days.");
        let (_, _, e) = parse_numbers(&values("", "2.5", "x"), 60, 100);
        assert!(e.target.contains("Enter the address"), "{e:?}");
        assert!(e.days.contains("whole number of days"), "{e:?}");
        assert!(e.uses.contains("whole number of messages"), "{e:?}");
    }

    #[test]
    fn api_errors_land_next_to_their_field() {
        let site = Site::new(&Config::default());
        let err = |code: &str, message: &str| ApiErrorBody {
            error: code.into(),
            message: message.into(),
        };
        let bad = StatusCode::BAD_REQUEST;
        let e = explain(
            bad,
            &err(
                "limit_exceeded",
                "days is 61, above this service's limit of 60",
            ),
            &site,
            None,
        );
        assert_eq!(e.days, "Choose from 1 to 60 days.");
        let e = explain(
            bad,
            &err("invalid_limit", "max-usage must be a positive integer"),
            &site,
            None,
        );
        assert_eq!(e.uses, "Choose from 1 to 100 messages.");
        let e = explain(
            bad,
            &err("invalid_target", "target: address is empty"),
            &site,
            None,
        );
        assert_eq!(
            e.target,
            "This address cannot receive forwarded mail: address is empty."
        );
        let e = explain(
            bad,
            &err("invalid_request", "give at least one of days and max-usage"),
            &site,
            None,
        );
        assert!(e.days.starts_with("Give a number of days"), "{e:?}");
        let e = explain(
            StatusCode::TOO_MANY_REQUESTS,
            &err("rate_limited", "slow down"),
            &site,
            Some(&HeaderValue::from_static("17")),
        );
        assert!(e.form.contains("17 seconds"), "{e:?}");
        let e = explain(
            StatusCode::SERVICE_UNAVAILABLE,
            &err("unavailable", "x"),
            &site,
            None,
        );
        assert!(e.form.contains("right now"), "{e:?}");
    }

    #[test]
    fn expiry_is_shown_in_utc_words() {
        assert_eq!(utc_text("2026-11-24T06:21:40Z"), "2026-11-24 06:21 UTC");
        assert_eq!(utc_text("garbage"), "garbage");
    }
}
