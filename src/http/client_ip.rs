//! Which address a request comes from.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};

use super::AppState;

/// The client's address: the socket peer.
pub(super) fn client_ip(_state: &AppState, req: &Request) -> Option<IpAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}
