//! The HTTP front end: the alias API, the web page, health endpoints and
//! `/metrics`.

mod aliases;
mod error;
mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::compression::CompressionLayer;

pub use error::ApiError;

use crate::config::Config;
use crate::metrics::{HttpLabels, Metrics};
use crate::raft::Node;

/// Largest request body accepted by the API.
pub const MAX_BODY: usize = 4096;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub node: Node,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Requests in progress; when none is free the node sheds load with `503`.
    permits: Arc<Semaphore>,
}

impl AppState {
    pub fn new(node: Node, config: Arc<Config>, metrics: Arc<Metrics>) -> Self {
        let permits = Arc::new(Semaphore::new(config.http.max_concurrent_requests));
        Self {
            node,
            config,
            metrics,
            permits,
        }
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
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(page::routes(&state.config))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        // gzip or br when the client accepts it (HTML, JSON, metrics alike;
        // Prometheus asks for gzip). Outermost, so shed and timed-out answers
        // are compressed too and the guard's metrics see the real status.
        .layer(CompressionLayer::new().gzip(true).br(true))
        .with_state(state)
}

/// Load shedding, request timeout and per-route metrics for every request.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
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
    let response = match tokio::time::timeout(timeout, next.run(req)).await {
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

async fn readyz(State(state): State<AppState>) -> Response {
    let store_ok = state.node.reader().alias("readyz-probe").is_ok();
    let leader = state
        .node
        .is_ready(Duration::from_millis(
            state.config.cluster.election_timeout_ms,
        ))
        .await;
    let body =
        serde_json::json!({ "ready": store_ok && leader, "store": store_ok, "leader": leader });
    let status = if store_ok && leader {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
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
