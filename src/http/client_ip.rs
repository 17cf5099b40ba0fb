//! Which address a request comes from.
//!
//! The socket peer, unless the peer is one of `[http] trusted_proxies`: then
//! the forwarding headers it added say who the client is. `Forwarded`
//! (RFC 7239) is preferred over `X-Forwarded-For`. Either lists addresses
//! from the original client to the last proxy; the client is the rightmost
//! address that is not itself a trusted proxy, because everything left of it
//! was written by a party we do not trust. Without trusted proxies the headers
//! are ignored: anyone can send them.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;

use super::AppState;

/// The client's address, as far as this node can tell.
pub(super) fn client_ip(state: &AppState, req: &Request) -> Option<IpAddr> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    Some(resolve(peer, req.headers(), &state.trusted_proxies))
}

fn trusted(ip: IpAddr, proxies: &[ipnet::IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    proxies.iter().any(|n| n.contains(&ip))
}

/// The client address given the socket peer, the headers and the trusted
/// proxies.
pub(super) fn resolve(peer: IpAddr, headers: &HeaderMap, proxies: &[ipnet::IpNet]) -> IpAddr {
    if !trusted(peer, proxies) {
        return peer;
    }
    let chain = forwarded_for(headers).or_else(|| x_forwarded_for(headers));
    let Some(chain) = chain else {
        return peer;
    };
    for hop in chain.iter().rev() {
        match hop {
            Some(ip) if trusted(*ip, proxies) => continue,
            Some(ip) => return *ip,
            // An obfuscated or unknown hop: nothing reliable beyond it.
            None => return peer,
        }
    }
    // Every hop is a trusted proxy: the leftmost is the origin.
    chain.first().copied().flatten().unwrap_or(peer)
}

/// The `for=` of every `Forwarded` element, in order (`None`: unparseable).
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut out = Vec::new();
    for value in headers.get_all("forwarded") {
        let value = value.to_str().ok()?;
        for element in value.split(',') {
            let for_value = element.split(';').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
            });
            if let Some(v) = for_value {
                out.push(parse_node(v.trim_matches('"')));
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Every address of every `X-Forwarded-For` header, in order.
fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut out = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let value = value.to_str().ok()?;
        out.extend(value.split(',').map(|v| parse_node(v.trim())));
    }
    (!out.is_empty()).then_some(out)
}

/// `192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]`, `[2001:db8::1]:80`, `2001:db8::1`.
fn parse_node(v: &str) -> Option<IpAddr> {
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = v.strip_prefix('[')?.split(']').next()?;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_count_only_from_trusted_proxies() {
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = h(&[("x-forwarded-for", "203.0.113.9")]);
        // From an untrusted peer the header is ignored.
        assert_eq!(
            resolve(ip("198.51.100.1"), &xff, &proxies),
            ip("198.51.100.1")
        );
        assert_eq!(resolve(ip("10.1.1.1"), &xff, &proxies), ip("203.0.113.9"));
        // No proxies configured: never trusted.
        assert_eq!(resolve(ip("10.1.1.1"), &xff, &[]), ip("10.1.1.1"));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // A client spoofing a first hop cannot choose its address.
        let spoofed = h(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.0.0.2")]);
        assert_eq!(
            resolve(ip("10.0.0.1"), &spoofed, &proxies),
            ip("203.0.113.9")
        );
        let two_headers = h(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            resolve(ip("10.0.0.1"), &two_headers, &proxies),
            ip("203.0.113.9")
        );
        let garbage = h(&[("x-forwarded-for", "1.2.3.4, nonsense")]);
        assert_eq!(resolve(ip("10.0.0.1"), &garbage, &proxies), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_is_preferred_and_parsed() {
        let proxies: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let both = h(&[
            (
                "forwarded",
                "for=1.2.3.4, for=\"[2001:db8:cafe::17]:4711\";proto=https",
            ),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(
            resolve(ip("10.0.0.1"), &both, &proxies),
            ip("2001:db8:cafe::17")
        );
        let port = h(&[("forwarded", "For=\"192.0.2.60:8080\";by=10.0.0.1")]);
        assert_eq!(resolve(ip("10.0.0.1"), &port, &proxies), ip("192.0.2.60"));
        let hidden = h(&[("forwarded", "for=_hidden")]);
        assert_eq!(resolve(ip("10.0.0.1"), &hidden, &proxies), ip("10.0.0.1"));
        let mapped_peer = ip("::ffff:10.0.0.1");
        assert_eq!(resolve(mapped_peer, &port, &proxies), ip("192.0.2.60"));
    }
}
