//! The web page: `GET /` (create an alias), `GET /manage` (one alias's status,
//! with the id and token in the URL fragment), `POST /create` (the same create
//! for browsers without JavaScript, answered with HTML) and `GET /openapi.yaml`.
//!
//! The HTML, CSS and JavaScript live in `page/` beside this file and are
//! embedded at build time, so a node serves its page with no files to deploy
//! and nothing fetched from elsewhere (it works offline on a LAN). The inline
//! `<style>` and `<script>` blocks are allowed by a Content-Security-Policy
//! that lists their SHA-256 hashes, computed at start-up from the very strings
//! that are inserted into the pages, so the policy cannot drift from the
//! content. Pages that do not depend on the request are rendered once, when the
//! router is built, and served with an `ETag` (answered `304` on a match).

mod confirm;
mod form;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::AppState;
use crate::config::Config;

const STYLE: &str = include_str!("page/style.css");
const CREATE_JS: &str = include_str!("page/create.js");
const MANAGE_JS: &str = include_str!("page/manage.js");
const INDEX_HTML: &str = include_str!("page/index.html");
const MANAGE_HTML: &str = include_str!("page/manage.html");
const CREATED_HTML: &str = include_str!("page/created.html");
/// The API description, served as it is in the repository.
const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");

/// Days and messages the form proposes, unless the operator's limits are lower.
const DEFAULT_DAYS: u32 = 3;
const DEFAULT_USES: u32 = 10;

/// Routes of the page, built from the node's configuration (the limits and
/// the alias domain appear on the page).
pub(super) fn routes(config: &Config) -> Router<AppState> {
    let site = Arc::new(Site::new(config));
    let index = site.clone();
    let manage = site.clone();
    let openapi = site.clone();
    let (confirm_get, confirm_post) = (site.clone(), site.clone());
    Router::new()
        .route(
            "/v1/confirm/{token}",
            get(move |state: State<AppState>, token| confirm::show(confirm_get.clone(), state, token))
                .post(move |state: State<AppState>, token| {
                    confirm::confirm(confirm_post.clone(), state, token)
                }),
        )
        .route(
            "/",
            get(move |headers: HeaderMap| async move { index.index.serve(&headers, &index.csp) }),
        )
        .route(
            "/manage",
            get(move |headers: HeaderMap| async move { manage.manage.serve(&headers, &manage.csp) }),
        )
        .route(
            "/create",
            post(
                move |state: State<AppState>,
                      refused: Option<axum::Extension<crate::http::ratelimit::CreateRefused>>,
                      headers: HeaderMap,
                      body: axum::body::Body| {
                    let refused = refused.map(|r| r.0 .0);
                    form::create(site.clone(), state, refused, headers, body)
                },
            ),
        )
        .route(
            "/openapi.yaml",
            get(move |headers: HeaderMap| async move {
                openapi.openapi.serve(&headers, &openapi.csp)
            }),
        )
}

/// Everything the page routes serve, prepared once.
struct Site {
    /// `GET /` with default values and no errors.
    index: Asset,
    manage: Asset,
    openapi: Asset,
    /// The Content-Security-Policy of every HTML answer.
    csp: HeaderValue,
    max_days: u32,
    max_uses: u32,
    domain: String,
}

impl Site {
    fn new(config: &Config) -> Self {
        let max_days = config.limits.max_days;
        let max_uses = config.limits.max_usage;
        let domain = config.domains.first().cloned().unwrap_or_default();
        let csp = content_security_policy();
        let mut site = Self {
            index: Asset::html(String::new()),
            manage: Asset::html(render(
                MANAGE_HTML,
                &[("style", STYLE.into()), ("script", MANAGE_JS.into())],
            )),
            openapi: Asset::new(OPENAPI_YAML.to_string(), "application/yaml; charset=utf-8"),
            csp: HeaderValue::from_str(&csp).expect("the CSP is ASCII"),
            max_days,
            max_uses,
            domain,
        };
        let defaults = FormValues {
            target: String::new(),
            days: DEFAULT_DAYS.min(max_days).to_string(),
            uses: DEFAULT_USES.min(max_uses).to_string(),
        };
        site.index = Asset::html(site.render_index(&defaults, &FormErrors::default()));
        site
    }

    /// The create form with the given values and errors.
    fn render_index(&self, values: &FormValues, errors: &FormErrors) -> String {
        let invalid = |e: &str| if e.is_empty() { "false" } else { "true" };
        render(
            INDEX_HTML,
            &[
                ("style", STYLE.into()),
                ("script", CREATE_JS.into()),
                ("max_days", self.max_days.to_string()),
                ("max_uses", self.max_uses.to_string()),
                ("domain", escape(&self.domain)),
                ("target", escape(&values.target)),
                ("days", escape(&values.days)),
                ("uses", escape(&values.uses)),
                ("form_error", escape(&errors.form)),
                ("target_error", escape(&errors.target)),
                ("days_error", escape(&errors.days)),
                ("uses_error", escape(&errors.uses)),
                ("target_invalid", invalid(&errors.target).into()),
                ("days_invalid", invalid(&errors.days).into()),
                ("uses_invalid", invalid(&errors.uses).into()),
            ],
        )
    }
}

/// What the visitor typed, echoed back into the form after an error.
#[derive(Debug, Default, Clone)]
struct FormValues {
    target: String,
    days: String,
    uses: String,
}

/// Plain-words errors, each shown next to its field (`form`: above the form).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FormErrors {
    form: String,
    target: String,
    days: String,
    uses: String,
}

/// The policy for every HTML answer: nothing but the page's own inline style
/// and scripts (by hash), requests only to this origin, no framing.
fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src {} {}; style-src {}; img-src data:; \
         connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        sha256_source(CREATE_JS),
        sha256_source(MANAGE_JS),
        sha256_source(STYLE),
    )
}

/// A CSP hash source for an inline block, `'sha256-<base64>'`.
fn sha256_source(content: &str) -> String {
    let digest = Sha256::digest(content.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// One prepared answer with its validator.
struct Asset {
    body: axum::body::Bytes,
    /// Weak, because the compression layer may send the same content encoded
    /// differently; weak comparison is what `If-None-Match` uses anyway.
    etag: HeaderValue,
    content_type: &'static str,
    html: bool,
}

impl Asset {
    fn new(body: String, content_type: &'static str) -> Self {
        let digest = hex::encode(Sha256::digest(body.as_bytes()));
        let etag = HeaderValue::from_str(&format!("W/\"{}\"", &digest[..20]))
            .expect("hex digits are a valid header value");
        Self {
            body: body.into(),
            etag,
            content_type,
            html: false,
        }
    }

    fn html(body: String) -> Self {
        Self {
            html: true,
            ..Self::new(body, "text/html; charset=utf-8")
        }
    }

    /// `200` with the body, or `304` when the client already has it. Browsers
    /// revalidate on every use (`no-cache`), so a new version shows at once.
    fn serve(&self, req: &HeaderMap, csp: &HeaderValue) -> Response {
        let mut resp = if etag_matches(req, &self.etag) {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            let mut r = self.body.clone().into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            );
            r
        };
        let h = resp.headers_mut();
        h.insert(header::ETAG, self.etag.clone());
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if self.html {
            security_headers(h, csp);
        }
        resp
    }
}

/// Weak comparison (RFC 9110 13.1.2): `W/` prefixes are ignored.
fn etag_matches(req: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or("").trim_start_matches("W/");
    req.get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

/// The headers every HTML answer carries.
fn security_headers(h: &mut HeaderMap, csp: &HeaderValue) {
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// An HTML answer made for one request: never stored by caches (it may hold
/// a token or what the visitor typed).
fn dynamic_html(status: StatusCode, body: String, csp: &HeaderValue) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    security_headers(h, csp);
    resp
}

/// Replaces each `{{name}}` in one pass; inserted values are not scanned
/// again, so a value containing `{{` stays as it is. Values must already be
/// escaped where they need it.
fn render(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 8192);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = &after[..end];
                match vars.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Escapes text for HTML element content and double-quoted attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site::new(&Config::default())
    }

    fn body(a: &Asset) -> String {
        String::from_utf8(a.body.to_vec()).unwrap()
    }

    #[test]
    fn every_placeholder_is_filled() {
        let s = site();
        for page in [body(&s.index), body(&s.manage)] {
            assert!(!page.contains("{{"), "unfilled placeholder in:\n{page}");
        }
        let created = form::render_created(&form::Created::example());
        assert!(
            !created.contains("{{"),
            "unfilled placeholder in:\n{created}"
        );
    }

    #[test]
    fn csp_hashes_match_the_inline_blocks() {
        let s = site();
        let csp = s.csp.to_str().unwrap();
        for page in [body(&s.index), body(&s.manage)] {
            for (open, close) in [("<script>", "</script>"), ("<style>", "</style>")] {
                let start = page.find(open).unwrap() + open.len();
                let end = page[start..].find(close).unwrap() + start;
                let hash = sha256_source(&page[start..end]);
                assert!(csp.contains(&hash), "{hash} not in {csp}");
            }
            assert_eq!(
                page.matches("<script").count(),
                1,
                "one inline script per page"
            );
            assert_eq!(
                page.matches("<style").count(),
                1,
                "one inline style per page"
            );
            assert!(
                !page.contains(" style="),
                "style attributes are blocked by the CSP"
            );
        }
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("default-src 'none'"));
        assert!(!csp.contains("unsafe"));
    }

    #[test]
    fn render_is_single_pass_and_keeps_unknown_names() {
        let out = render(
            "a{{x}}b{{y}}c{{",
            &[("x", "{{y}}".into()), ("z", "no".into())],
        );
        assert_eq!(out, "a{{y}}b{{y}}c{{");
    }

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn etag_comparison_is_weak_and_handles_lists() {
        let tag = HeaderValue::from_static("W/\"abc\"");
        let mut h = HeaderMap::new();
        assert!(!etag_matches(&h, &tag));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", \"abc\""),
        );
        assert!(etag_matches(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("W/\"abc\""));
        assert!(etag_matches(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(etag_matches(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"abd\""));
        assert!(!etag_matches(&h, &tag));
    }

    #[test]
    fn index_shows_the_configured_limits_and_escapes_values() {
        let mut config = Config::default();
        config.limits.max_days = 2;
        config.limits.max_usage = 7;
        let s = Site::new(&config);
        let page = body(&s.index);
        assert!(page.contains(r#"max="2""#) && page.contains(r#"max="7""#));
        assert!(page.contains(r#"id="days" name="days" type="number" min="1" max="2" step="1" inputmode="numeric" value="2""#));
        let errors = FormErrors {
            target: "bad <address>".into(),
            ..Default::default()
        };
        let values = FormValues {
            target: "\"><script>".into(),
            ..Default::default()
        };
        let page = s.render_index(&values, &errors);
        assert!(page.contains("value=\"&quot;&gt;&lt;script&gt;\""));
        assert!(page.contains("bad &lt;address&gt;"));
        assert!(page.contains(r#"id="target" name="target""#));
        assert!(page.contains(r#"aria-describedby="target-error" aria-invalid="true""#));
    }
}
