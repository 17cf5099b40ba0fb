//! The drained node's HTTP face: a self-contained `503` for everyone outside
//! `[maintenance] allow` (HTML for browsers, JSON for API clients), with
//! `Retry-After`. Probes and scrapes pass: `/healthz` stays `200`, `/readyz`
//! says `503` itself, and `/metrics` keeps the node observable.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// The `503` a draining node answers instead of serving the request, or
/// `None` when the request is served: the node is not draining, the route is
/// a probe or scrape (`exempt`: `/healthz`, `/readyz`, `/metrics`), or the
/// client is in an allowed network.
pub(super) fn refusal(state: &AppState, req: &Request, exempt: bool) -> Option<Response> {
    if !state.maintenance.draining() || exempt {
        return None;
    }
    let allowed = super::client_ip::client_ip(state, req)
        .is_some_and(|ip| state.maintenance_allow.iter().any(|net| net.contains(&ip)));
    if allowed {
        return None;
    }
    Some(page(
        req.headers(),
        state.config.maintenance.retry_after_secs,
    ))
}

/// True when the client prefers HTML (a browser) to JSON.
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// The maintenance answer itself.
pub(super) fn page(headers: &HeaderMap, retry_after_secs: u64) -> Response {
    let retry = HeaderValue::from(retry_after_secs);
    let mut resp = if wants_html(headers) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            )],
            PAGE,
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "error": "maintenance",
                "message": "this node is in maintenance; retry later or use another node",
            })),
        )
            .into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, retry);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Self-contained: no scripts, fonts or other requests.
const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tempalias: down for maintenance</title>
<style>
:root { color-scheme: light dark; }
body { font: 1.1rem/1.5 system-ui, sans-serif; max-width: 34rem; margin: 15vh auto; padding: 0 1rem; }
h1 { font-size: 1.5rem; }
</style>
</head>
<body>
<main>
<h1>Down for maintenance</h1>
<p>This tempalias node is being maintained. Your aliases are safe and mail to
them is handled by the other nodes; please try again in a few minutes.</p>
</main>
</body>
</html>
"#;
