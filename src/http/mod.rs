//! The HTTP front end: the alias API, the web page, health endpoints and
//! `/metrics`.

mod aliases;
mod barrier;
mod client_ip;
mod error;
mod idempotency;
pub mod listener;
mod maintenance;
mod page;
mod ratelimit;
mod readiness;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;

pub use error::ApiError;
pub use idempotency::TokenKey;

use crate::config::Config;
use crate::maintenance::Maintenance;
use crate::metrics::{HttpLabels, Metrics};
use crate::raft::Node;

/// Largest request body accepted by the API.
pub const MAX_BODY: usize = 4096;

/// Shared state of all handlers. One `Arc`, because every middleware layer
/// and handler clones it for every request (cloning the fields one by one
/// showed up at several per cent of a status read's CPU time).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub node: Node,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Requests in progress; when none is free the node sheds load with `503`.
    permits: Arc<Semaphore>,
    /// Whether the node drains (answers `503` to all but `maintenance_allow`).
    pub maintenance: Arc<Maintenance>,
    /// `[maintenance] allow`, parsed.
    maintenance_allow: Arc<Vec<ipnet::IpNet>>,
    /// The cached `/readyz` verdict.
    readiness: Arc<readiness::Readiness>,
    /// Derives the tokens of keyed creates (see `idempotency.rs`).
    token_key: TokenKey,
    /// `[http] trusted_proxies`, parsed (see `client_ip.rs`).
    trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// Per-client rate limits; `None` when `[ratelimit] enabled = false`.
    ratelimits: Option<Arc<ratelimit::RateLimits>>,
    /// Read barriers shared by concurrent status reads.
    barriers: Arc<barrier::Barriers>,
    /// Mails confirmation links; `None` unless `[limits] confirm_targets`.
    confirmer: Option<Arc<crate::confirm::Confirmer>>,
}

impl AppState {
    pub fn new(
        node: Node,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        maintenance: Arc<Maintenance>,
        token_key: TokenKey,
        confirmer: Option<Arc<crate::confirm::Confirmer>>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(config.http.max_concurrent_requests));
        // Validated with the rest of the configuration.
        let maintenance_allow = Arc::new(config.maintenance.allow_nets().unwrap_or_default());
        let trusted_proxies = Arc::new(config.http.trusted_proxy_nets().unwrap_or_default());
        let ratelimits = ratelimit::RateLimits::from_config(&config.ratelimit).map(Arc::new);
        Self(Arc::new(Shared {
            node,
            config,
            metrics,
            permits,
            maintenance,
            maintenance_allow,
            readiness: Arc::default(),
            token_key,
            trusted_proxies,
            ratelimits,
            barriers: Arc::default(),
            confirmer,
        }))
    }
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/aliases", post(aliases::create))
        .route("/v1/aliases", post(aliases::create))
        .route(
            "/v1/aliases/{id}",
            get(aliases::show).delete(aliases::revoke),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readiness::readyz))
        .route("/metrics", get(metrics))
        .merge(page::routes(&state.config))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        // gzip or br when the client accepts it (HTML, JSON, metrics alike;
        // Prometheus asks for gzip). Outermost, so shed and timed-out answers
        // are compressed too and the guard's metrics see the real status.
        .layer(CompressionLayer::new().gzip(true).br(true))
        .with_state(state)
}

/// Every request passes here once: load shedding, the request timeout and
/// per-route metrics, then the drain (maintenance) check and the rate limits.
///
/// One middleware rather than three stacked ones: each `from_fn` layer boxes
/// the request's future and clones the inner service for every request, which
/// showed up in the CPU profile of status reads.
async fn front(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    // Probes and scrapes are never shed: an overloaded node must still say
    // how it is.
    let exempt = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics");
    let permit = if exempt {
        None
    } else {
        match state.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let response = ApiError::Overloaded.into_response();
                count(&state, route, &response);
                return response;
            }
        }
    };
    let timeout = Duration::from_secs(state.config.http.request_timeout_secs);
    let inner = async {
        if let Some(refusal) = maintenance::refusal(&state, &req, exempt) {
            return refusal;
        }
        ratelimit::limit(&state, req, next).await
    };
    let response = match tokio::time::timeout(timeout, inner).await {
        Ok(r) => r,
        Err(_) => ApiError::Unavailable("request timed out".into()).into_response(),
    };
    drop(permit);
    count(&state, route, &response);
    response
}

fn count(state: &AppState, route: String, response: &Response) {
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// OpenMetrics when the client asks for it (Prometheus does), the classic
/// text format otherwise.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.metrics.encode_classic(),
        )
            .into_response()
    }
}
