//! `GET` and `POST /v1/confirm/{token}`: a target confirms that it wants mail
//! forwarded from this service (`[limits] confirm_targets`).
//!
//! `GET` only shows a page with a button; the button `POST`s. Mail scanners
//! and link previews fetch links in mails before (or without) the person
//! reading them, so a confirmation on `GET` would confirm for everyone.
//! A wrong token is a `404`, which the rate limiter counts as a failed
//! lookup, so tokens cannot be guessed at the status rate.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::{dynamic_html, escape, render, Site, STYLE};
use crate::http::AppState;
use crate::metrics::{ConfirmEvent, ConfirmLabels};
use crate::raft::targets::{token_hash, LinkState};
use crate::raft::{Command, Response as SmResponse};

const CONFIRM_HTML: &str = include_str!("confirm.html");

/// The page: a title, a sentence and (for a pending link) the button.
fn page(site: &Site, status: StatusCode, title: &str, message: &str, form: String) -> Response {
    let body = render(
        CONFIRM_HTML,
        &[
            ("style", STYLE.into()),
            ("title", escape(title)),
            ("message", escape(message)),
            ("form", form),
        ],
    );
    dynamic_html(status, body, &site.csp)
}

fn invalid(site: &Site) -> Response {
    page(
        site,
        StatusCode::NOT_FOUND,
        "Link not valid",
        "This confirmation link is not valid: it is incomplete, it has expired (links work for two days), or a newer one was sent. Creating a new alias for your address sends a new link.",
        String::new(),
    )
}

fn confirmed(site: &Site) -> Response {
    page(
        site,
        StatusCode::OK,
        "Address confirmed",
        "Thank you. Mail to the aliases that forward to your address is forwarded from now on.",
        String::new(),
    )
}

fn unavailable(site: &Site) -> Response {
    let mut resp = page(
        site,
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again",
        "The service cannot answer right now. Try again in a few seconds.",
        String::new(),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    resp
}

pub(super) async fn show(
    site: std::sync::Arc<Site>,
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Response {
    if !crate::confirm::is_token(&token) {
        return invalid(&site);
    }
    match link_state(&state, &token_hash(&token)).await {
        Ok(LinkState::Pending) => {
            let form = format!(
                "<form method=\"post\" action=\"/v1/confirm/{}\"><button type=\"submit\" id=\"confirm\">Yes, forward mail to me</button></form>",
                escape(&token)
            );
            page(
                &site,
                StatusCode::OK,
                "Confirm your address",
                "Someone created a temporary alias that forwards to your address. Mail is forwarded to you only once you confirm. If you did not ask for it, close this page: nothing will be forwarded.",
                form,
            )
        }
        Ok(LinkState::Confirmed) => confirmed(&site),
        Ok(LinkState::Invalid) => invalid(&site),
        Err(()) => unavailable(&site),
    }
}

/// Where a link stands, read from this replica once it has caught up with
/// the leader (the link is mailed right after the create commits, and this
/// node may not have applied it yet). `Err` when it cannot catch up.
async fn link_state(state: &AppState, token_hash: &str) -> Result<LinkState, ()> {
    state
        .barriers
        .wait(&state.node, &state.metrics)
        .await
        .map_err(|_| ())?;
    state
        .node
        .reader()
        .confirmation_link(token_hash, state.node.now_ms())
        .map_err(|e| tracing::error!(error = %e, "reading the store"))
}

pub(super) async fn confirm(
    site: std::sync::Arc<Site>,
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Response {
    if !crate::confirm::is_token(&token) {
        return invalid(&site);
    }
    let token_hash = token_hash(&token);
    // Only a pending link costs a Raft write: a guessed or used one is
    // answered from the replica (after catching up with the leader, so a
    // link mailed a moment ago is not refused by a lagging node).
    match link_state(&state, &token_hash).await {
        Ok(LinkState::Pending) => {}
        Ok(LinkState::Confirmed) => return confirmed(&site),
        Ok(LinkState::Invalid) => return invalid(&site),
        Err(()) => return unavailable(&site),
    }
    let cmd = Command::ConfirmTarget { token_hash };
    match state.node.write(cmd).await {
        Ok(SmResponse::TargetConfirmed) => {
            state
                .metrics
                .confirmations
                .get_or_create(&ConfirmLabels {
                    event: ConfirmEvent::confirmed,
                })
                .inc();
            tracing::info!("target confirmed");
            confirmed(&site)
        }
        Ok(SmResponse::NotFound) => invalid(&site),
        Ok(other) => {
            tracing::error!(response = ?other, "unexpected answer to a confirmation");
            unavailable(&site)
        }
        Err(e) => {
            tracing::warn!(error = %e, "confirmation not committed");
            unavailable(&site)
        }
    }
}
