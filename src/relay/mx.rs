//! Direct delivery to the MX hosts of each target's domain.
//!
//! For each domain: its MX records in preference order, equal preferences in
//! random order (RFC 5321 5.1, spreading load as the domain's owner asked);
//! no MX record at all means the domain itself (the implicit MX); a null MX
//! (RFC 7505) refuses mail. Each host's A and AAAA addresses are tried in
//! turn, each host bounded by `relay.timeout_secs`. STARTTLS is used when
//! offered, without certificate verification, as MTAs do between each other.
//!
//! A temporary failure at one host moves on to the next; when every host
//! failed temporarily the sender hears 451. A 5xx from any host is final and
//! passed on (as a real MTA would bounce). A host that cannot take this
//! message (it lacks 8BITMIME or SMTPUTF8 that the message needs, or its
//! `SIZE` is below the message) is passed over like a failed one; only when
//! every host is passed over is the message refused (`554 5.6.3`,
//! `553 5.6.7`, `552 5.3.4`; see `PassedOver`).
//!
//! No circuit breaker here: MX hosts are unbounded and per-destination, and a
//! dead one costs one connect timeout per message at most.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use lettre::transport::smtp::extension::ClientId;
use rand::seq::SliceRandom;
use tokio::time::Instant;

use super::client::{self, AttemptError, Target, TlsPolicy};
use super::{counted_attempt, to_lettre, Delivery, Envelope, PassedOver, RelayError};
use crate::config::RelayConfig;
use crate::metrics::Metrics;

/// The metric label of all MX deliveries together.
const MX_LABEL: &str = "mx";

/// Sends each message straight to its targets' MX hosts.
pub struct MxRelay {
    resolver: TokioResolver,
    port: u16,
    helo: ClientId,
    host_timeout: Duration,
    budget: Duration,
    metrics: Arc<Metrics>,
}

/// Where one domain's mail can go, best first.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Hosts(Vec<String>),
    /// Refused for good (null MX, domain does not exist).
    Refused(Delivery),
    /// DNS did not answer usefully; may clear.
    Unknown(String),
}

impl MxRelay {
    /// # Errors
    /// [`RelayError::Resolver`] when the resolver cannot be configured.
    pub fn new(
        config: &RelayConfig,
        helo_name: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Self, RelayError> {
        let servers = config
            .dns_server_addrs()
            .map_err(|e| RelayError::Resolver(e.to_string()))?;
        let provider = TokioConnectionProvider::default();
        let mut builder = if servers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| RelayError::Resolver(format!("system resolver configuration: {e}")))?
        } else {
            let mut group = NameServerConfigGroup::new();
            for addr in &servers {
                group.push(NameServerConfig::new(*addr, Protocol::Udp));
                group.push(NameServerConfig::new(*addr, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                provider,
            )
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        if !servers.is_empty() {
            // Configured servers are the only source of answers.
            opts.use_hosts_file = ResolveHosts::Never;
        }
        Ok(Self {
            resolver: builder.build(),
            port: config.mx_port,
            helo: ClientId::Domain(helo_name.to_string()),
            host_timeout: Duration::from_secs(config.timeout_secs),
            budget: Duration::from_secs(config.delivery_timeout_secs),
            metrics,
        })
    }

    pub fn describe(&self) -> String {
        format!("MX hosts of each target domain (port {})", self.port)
    }

    /// Delivers to every target domain in turn.
    ///
    /// Several target domains in one transaction are delivered one after the
    /// other; if a later one fails after an earlier one accepted, the failure
    /// is reported (the sender retries, and the earlier domain may see the
    /// message twice: a duplicate rather than a loss).
    pub async fn deliver(
        &self,
        envelope: &Envelope,
        message: &[u8],
        deadline: Instant,
    ) -> Delivery {
        let deadline = deadline.min(Instant::now() + self.budget);
        let mut domains: Vec<(String, Vec<String>)> = Vec::new();
        for rcpt in &envelope.rcpt_to {
            let domain = rcpt
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default();
            match domains.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, list)) => list.push(rcpt.clone()),
                None => domains.push((domain, vec![rcpt.clone()])),
            }
        }
        for (domain, rcpts) in domains {
            let one = Envelope {
                mail_from: envelope.mail_from.clone(),
                rcpt_to: rcpts,
            };
            let outcome = self.deliver_domain(&domain, &one, message, deadline).await;
            if outcome != Delivery::Accepted {
                return outcome;
            }
        }
        Delivery::Accepted
    }

    async fn deliver_domain(
        &self,
        domain: &str,
        envelope: &Envelope,
        message: &[u8],
        deadline: Instant,
    ) -> Delivery {
        let lettre_envelope = match to_lettre(envelope) {
            Ok(e) => e,
            Err(text) => {
                return Delivery::PermFail {
                    code: 550,
                    enhanced: "5.1.3".into(),
                    text,
                }
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let hosts = match tokio::time::timeout(remaining, self.route(domain)).await {
            Err(_) => return Delivery::TempFail(format!("{domain}: MX lookup timed out")),
            Ok(Route::Hosts(h)) => h,
            Ok(Route::Refused(d)) => return d,
            Ok(Route::Unknown(e)) => return Delivery::TempFail(format!("{domain}: {e}")),
        };
        let mut last = format!("{domain}: no MX host answered");
        // Hosts left untried (the deadline) are not passed over: they may
        // take it later.
        let mut passed_over = PassedOver::new(hosts.len());
        for (i, host) in hosts.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let limit = self.host_timeout.min(deadline - now);
            let attempt = async {
                let addrs = self.addresses(host).await?;
                let tls = TlsPolicy::Opportunistic(
                    client::unverified_tls(host.trim_end_matches('.'))
                        .map_err(AttemptError::Failed)?,
                );
                let target = Target {
                    name: host,
                    addrs: &addrs,
                    tls: &tls,
                    credentials: None,
                    helo: &self.helo,
                    connect_timeout: limit,
                    // A connection per message: MX hosts are many and
                    // each gets few messages from one node.
                    pool: None,
                };
                client::send(&target, &lettre_envelope, message).await
            };
            let outcome = counted_attempt(&self.metrics, MX_LABEL, host, limit, attempt).await;
            match outcome {
                Ok(()) => return Delivery::Accepted,
                Err(AttemptError::Reply {
                    code,
                    enhanced,
                    text,
                }) if code >= 500 => {
                    tracing::warn!(%domain, mx = %host, code, %enhanced, %text, "MX refused the message");
                    return Delivery::PermFail {
                        code,
                        enhanced,
                        text,
                    };
                }
                Err(AttemptError::Unsupported { reason, text }) => {
                    tracing::warn!(%domain, mx = %host, ?reason, %text, "MX cannot take this message, trying the next");
                    last = text.clone();
                    passed_over.add(i, reason, text);
                }
                Err(e) => {
                    tracing::warn!(%domain, mx = %host, error = %e, "MX did not accept");
                    last = e.to_string();
                }
            }
        }
        passed_over.outcome(last)
    }

    /// The hosts to try for `domain`, best first.
    async fn route(&self, domain: &str) -> Route {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let records: Vec<(u16, String)> = lookup
                    .iter()
                    .map(|mx| (mx.preference(), mx.exchange().to_ascii()))
                    .collect();
                order_mx(records, &mut rand::rng())
            }
            Err(e) if e.is_nx_domain() => Route::Refused(Delivery::PermFail {
                code: 550,
                enhanced: "5.1.2".into(),
                text: format!("{domain}: no such domain"),
            }),
            // No MX records: the domain itself is the mail host (RFC 5321 5.1).
            Err(e) if e.is_no_records_found() => Route::Hosts(vec![fqdn]),
            Err(e) => Route::Unknown(format!("MX lookup: {e}")),
        }
    }

    async fn addresses(&self, host: &str) -> Result<Vec<SocketAddr>, AttemptError> {
        if let Ok(ip) = host.trim_end_matches('.').parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let lookup = self
            .resolver
            .lookup_ip(host)
            .await
            .map_err(|e| AttemptError::Failed(format!("{host}: address lookup: {e}")))?;
        let addrs: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect();
        if addrs.is_empty() {
            return Err(AttemptError::Failed(format!("{host}: no A or AAAA record")));
        }
        Ok(addrs)
    }
}

/// Orders MX records: lowest preference first, equal ones shuffled; a lone
/// `.` exchange is a null MX.
fn order_mx(mut records: Vec<(u16, String)>, rng: &mut impl rand::Rng) -> Route {
    if records.len() == 1 && (records[0].1 == "." || records[0].1.is_empty()) {
        return Route::Refused(Delivery::PermFail {
            code: 556,
            enhanced: "5.1.10".into(),
            text: "the domain accepts no mail (null MX)".into(),
        });
    }
    records.retain(|(_, h)| h != "." && !h.is_empty());
    records.shuffle(rng);
    // A stable sort keeps the shuffled order among equal preferences.
    records.sort_by_key(|(pref, _)| *pref);
    if records.is_empty() {
        return Route::Unknown("no usable MX record".into());
    }
    Route::Hosts(records.into_iter().map(|(_, h)| h).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_order_is_by_preference_with_equal_ones_shuffled() {
        let records = vec![
            (20, "c.example.".to_string()),
            (10, "a.example.".to_string()),
            (10, "b.example.".to_string()),
            (30, "d.example.".to_string()),
        ];
        let mut firsts = std::collections::BTreeSet::new();
        let mut rng = rand::rng();
        for _ in 0..64 {
            let Route::Hosts(h) = order_mx(records.clone(), &mut rng) else {
                panic!()
            };
            assert_eq!(&h[2..], ["c.example.", "d.example."]);
            firsts.insert(h[0].clone());
        }
        assert_eq!(
            firsts.len(),
            2,
            "equal preferences are not always in the same order"
        );
    }

    #[test]
    fn null_mx_refuses() {
        let mut rng = rand::rng();
        match order_mx(vec![(0, ".".into())], &mut rng) {
            Route::Refused(Delivery::PermFail { code, .. }) => assert_eq!(code, 556),
            other => panic!("{other:?}"),
        }
    }
}
