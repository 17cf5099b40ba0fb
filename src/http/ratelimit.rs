//! Per-client token buckets for the API, with the IETF `RateLimit` headers.
//!
//! Three policies, each its own table of buckets keyed by client network
//! (IPv4 /32, IPv6 /64: one home or host, not one of its many addresses):
//!
//! - `create`: `POST /aliases`, `POST /v1/aliases` and `POST /create` (the
//!   page's form);
//! - `status`: `GET` and `DELETE /v1/aliases/{id}`, and `GET`/`POST
//!   /v1/confirm/{token}` (target confirmation);
//! - `failed`: lookups that end in `404` (unknown id or wrong token). A client
//!   whose `failed` bucket is empty is refused before the lookup, so ids and
//!   tokens cannot be guessed at the status rate.
//!
//! A policy is "`quota` requests per `window` seconds": a bucket holds at most
//! `quota` tokens and refills at `quota / window` per second, so a client may
//! burst `quota` requests and then goes at the average rate.
//!
//! Limits are per node: a cluster of N nodes behind round-robin DNS lets a
//! client make up to N times the rate. Replicating buckets through Raft would
//! cost a write per request.
//!
//! Memory is bounded whatever the number of distinct addresses: each table
//! holds at most `max_clients` buckets. When it is full, buckets that have
//! refilled completely (they say nothing a new bucket would not) are dropped;
//! when none has, new clients share one overflow bucket per policy until room
//! is made. A flood from many addresses therefore gets limited as one client
//! instead of pushing real clients' state out or growing the table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// How often a full table may be swept for refilled buckets.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One policy: at most `quota` requests per `window`.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub name: &'static str,
    pub quota: u32,
    pub window: Duration,
}

impl Policy {
    fn rate_per_sec(&self) -> f64 {
        f64::from(self.quota) / self.window.as_secs_f64()
    }
}

/// Client network a bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
    /// The shared bucket of clients that found the table full.
    Overflow,
}

impl Key {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Key::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(u32::from(v4)),
                None => Key::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// What a check says, and what the headers report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Whole requests left after this one.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until one request is allowed again (0 when allowed).
    pub retry_after_secs: u64,
}

/// The buckets of one policy.
pub struct Limiter {
    policy: Policy,
    max_clients: usize,
    state: Mutex<Table>,
}

struct Table {
    buckets: HashMap<Key, Bucket>,
    last_sweep: Option<Instant>,
}

impl Limiter {
    pub fn new(policy: Policy, max_clients: usize) -> Self {
        Self {
            policy,
            max_clients: max_clients.max(1),
            state: Mutex::new(Table {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Buckets held now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().buckets.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock leaves only counters behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ip` has a request left at `now`; takes it when `take`.
    pub fn check(&self, ip: IpAddr, take: bool, now: Instant) -> Decision {
        let p = self.policy;
        let quota = f64::from(p.quota);
        let rate = p.rate_per_sec();
        let mut table = self.lock();
        let mut key = Key::of(ip);
        if !table.buckets.contains_key(&key) && table.buckets.len() >= self.max_clients {
            let due = table
                .last_sweep
                .is_none_or(|t| now.duration_since(t) >= SWEEP_EVERY);
            if due {
                table.last_sweep = Some(now);
                table.buckets.retain(|k, b| {
                    *k == Key::Overflow
                        || b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate
                            < quota
                });
            }
            if table.buckets.len() >= self.max_clients {
                key = Key::Overflow;
            }
        }
        let bucket = table.buckets.entry(key).or_insert(Bucket {
            tokens: quota,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(quota);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed && take {
            bucket.tokens -= 1.0;
        }
        let tokens = bucket.tokens;
        drop(table);
        let secs_until = |target: f64| ((target - tokens).max(0.0) / rate).ceil() as u64;
        Decision {
            allowed,
            remaining: tokens.floor().max(0.0) as u32,
            reset_secs: secs_until(quota),
            retry_after_secs: if allowed { 0 } else { secs_until(1.0).max(1) },
        }
    }
}

/// Adds the rate-limit headers of `policy` and `decision` to `headers`:
/// `RateLimit-Policy` and `RateLimit` as in draft-ietf-httpapi-ratelimit-headers
/// (`"create";q=10;w=300`, `"create";r=9;t=30`), and the widely deployed
/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`.
pub fn add_headers(headers: &mut HeaderMap, policy: &Policy, d: &Decision) {
    // Every status read carries these five headers: numbers go in without a
    // `String` each, and the map grows once.
    headers.reserve(5);
    let mut put = |name: &'static str, value: Option<HeaderValue>| {
        if let Some(v) = value {
            headers.insert(HeaderName::from_static(name), v);
        }
    };
    put(
        "ratelimit-policy",
        HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            policy.name,
            policy.quota,
            policy.window.as_secs()
        ))
        .ok(),
    );
    put(
        "ratelimit",
        HeaderValue::from_str(&format!(
            "\"{}\";r={};t={}",
            policy.name, d.remaining, d.reset_secs
        ))
        .ok(),
    );
    put("ratelimit-limit", Some(HeaderValue::from(policy.quota)));
    put("ratelimit-remaining", Some(HeaderValue::from(d.remaining)));
    put("ratelimit-reset", Some(HeaderValue::from(d.reset_secs)));
}

/// The three policies of a node.
pub struct RateLimits {
    pub create: Limiter,
    pub status: Limiter,
    pub failed: Limiter,
}

impl RateLimits {
    pub fn from_config(c: &crate::config::RateLimitConfig) -> Option<Self> {
        if !c.enabled {
            return None;
        }
        let policy = |name, quota, secs| Policy {
            name,
            quota,
            window: Duration::from_secs(secs),
        };
        Some(Self {
            create: Limiter::new(
                policy("create", c.create_quota, c.create_window_secs),
                c.max_clients,
            ),
            status: Limiter::new(
                policy("status", c.status_quota, c.status_window_secs),
                c.max_clients,
            ),
            failed: Limiter::new(
                policy("failed", c.failed_quota, c.failed_window_secs),
                c.max_clients,
            ),
        })
    }
}

/// `429` with `Retry-After` and the headers of the policy that refused.
fn refuse(policy: &Policy, d: &Decision) -> Response {
    let mut resp = ApiError::RateLimited(d.retry_after_secs).into_response();
    add_headers(resp.headers_mut(), policy, d);
    resp
}

/// Set on a `POST /create` whose client is out of creates (the seconds
/// until it may try again): the form answers with its own HTML page saying
/// so, instead of the API's JSON refusal, and creates nothing.
#[derive(Debug, Clone, Copy)]
pub struct CreateRefused(pub u64);

/// Applies the policy of the route, if it has one.
pub(super) async fn limit(state: &AppState, mut req: Request, next: Next) -> Response {
    let Some(limits) = state.ratelimits.clone() else {
        return next.run(req).await;
    };
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    // `POST /create` (the page's form for browsers without JavaScript)
    // creates through the same handler: the same bucket, or the form would
    // be a way around it.
    let is_create = matches!(route, Some("/aliases" | "/v1/aliases" | "/create"))
        && req.method() == Method::POST;
    let is_form = route == Some("/create");
    // Confirmation links are lookups by a secret too: a wrong token is a
    // failed lookup like a wrong alias token.
    let is_status = (route == Some("/v1/aliases/{id}")
        && matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE))
        || (route == Some("/v1/confirm/{token}")
            && matches!(*req.method(), Method::GET | Method::HEAD | Method::POST));
    if !is_create && !is_status {
        return next.run(req).await;
    }
    let Some(ip) = super::client_ip::client_ip(state, &req) else {
        return next.run(req).await;
    };
    let now = Instant::now();
    if is_create {
        let d = limits.create.check(ip, true, now);
        if !d.allowed && !is_form {
            return refuse(limits.create.policy(), &d);
        }
        if !d.allowed {
            req.extensions_mut()
                .insert(CreateRefused(d.retry_after_secs));
        }
        let mut resp = next.run(req).await;
        add_headers(resp.headers_mut(), limits.create.policy(), &d);
        return resp;
    }
    // A client out of failed lookups may not look any more until it has one.
    let f = limits.failed.check(ip, false, now);
    if !f.allowed {
        return refuse(limits.failed.policy(), &f);
    }
    let d = limits.status.check(ip, true, now);
    if !d.allowed {
        return refuse(limits.status.policy(), &d);
    }
    let mut resp = next.run(req).await;
    if resp.status() == StatusCode::NOT_FOUND {
        let f = limits.failed.check(ip, true, Instant::now());
        add_headers(resp.headers_mut(), limits.failed.policy(), &f);
    } else {
        add_headers(resp.headers_mut(), limits.status.policy(), &d);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(quota: u32, secs: u64) -> Policy {
        Policy {
            name: "test",
            quota,
            window: Duration::from_secs(secs),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_refill() {
        let l = Limiter::new(policy(3, 30), 100);
        let t0 = Instant::now();
        for left in [2, 1, 0] {
            let d = l.check(ip("192.0.2.1"), true, t0);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let d = l.check(ip("192.0.2.1"), true, t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 10);
        assert_eq!(d.reset_secs, 30);
        // Another client is not affected.
        assert!(l.check(ip("192.0.2.2"), true, t0).allowed);
        // One token back after 10 s.
        let d = l.check(ip("192.0.2.1"), true, t0 + Duration::from_secs(10));
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
        assert!(
            !l.check(ip("192.0.2.1"), true, t0 + Duration::from_secs(11))
                .allowed
        );
    }

    #[test]
    fn looking_costs_nothing() {
        let l = Limiter::new(policy(1, 60), 100);
        let t0 = Instant::now();
        assert!(l.check(ip("192.0.2.1"), false, t0).allowed);
        assert!(l.check(ip("192.0.2.1"), false, t0).allowed);
        assert!(l.check(ip("192.0.2.1"), true, t0).allowed);
        let d = l.check(ip("192.0.2.1"), false, t0);
        assert!(!d.allowed && d.remaining == 0 && d.retry_after_secs == 60);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = Limiter::new(policy(2, 60), 100);
        let t0 = Instant::now();
        assert!(l.check(ip("2001:db8:1:2::1"), true, t0).allowed);
        assert!(l.check(ip("2001:db8:1:2:ffff::9"), true, t0).allowed);
        assert!(!l.check(ip("2001:db8:1:2::77"), true, t0).allowed);
        assert!(l.check(ip("2001:db8:1:3::1"), true, t0).allowed);
        // An IPv4-mapped address is its IPv4 client.
        assert!(l.check(ip("192.0.2.7"), true, t0).allowed);
        assert!(l.check(ip("::ffff:192.0.2.7"), true, t0).allowed);
        assert!(!l.check(ip("192.0.2.7"), true, t0).allowed);
    }

    #[test]
    fn table_is_bounded_and_a_spray_shares_one_bucket() {
        let cap = 50;
        let l = Limiter::new(policy(2, 60), cap);
        let t0 = Instant::now();
        let mut refused = 0;
        for i in 0..10_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if !l.check(addr, true, t0).allowed {
                refused += 1;
            }
            assert!(l.tracked() <= cap + 1, "{} buckets", l.tracked());
        }
        // 50 buckets of their own, then all others share the overflow bucket.
        assert_eq!(refused, 10_000 - cap as u32 - 2);
        // Once the buckets have refilled, a sweep makes room for new clients.
        let later = t0 + Duration::from_secs(61);
        assert!(l.check(ip("198.51.100.1"), true, later).allowed);
        assert!(l.tracked() <= 3, "{} buckets", l.tracked());
    }

    #[test]
    fn headers_follow_the_draft() {
        let p = Policy {
            name: "create",
            quota: 10,
            window: Duration::from_secs(300),
        };
        let d = Decision {
            allowed: true,
            remaining: 9,
            reset_secs: 30,
            retry_after_secs: 0,
        };
        let mut h = HeaderMap::new();
        add_headers(&mut h, &p, &d);
        assert_eq!(h["ratelimit-policy"], "\"create\";q=10;w=300");
        assert_eq!(h["ratelimit"], "\"create\";r=9;t=30");
        assert_eq!(h["ratelimit-limit"], "10");
        assert_eq!(h["ratelimit-remaining"], "9");
        assert_eq!(h["ratelimit-reset"], "30");
    }
}
