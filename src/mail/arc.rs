//! ARC sealing (RFC 8617) of forwarded mail.
//!
//! Forwarding breaks the original sender's SPF (the connection now comes
//! from us), and a receiver cannot tell whether the sender's DKIM signature
//! was valid when it reached us. An ARC set records what we saw (our own
//! SPF, DKIM and DMARC evaluation of the incoming message, in
//! `ARC-Authentication-Results`) and signs it, so a receiver that trusts this
//! service can use those results instead of failing DMARC.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, MessageAuthenticator};

use super::dkim::{DkimError, KeyMaterial, SIGNED_HEADERS};

/// Why the DNS resolver for the evaluation could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error("{0:?} is not an IP address or IP:port")]
    BadServer(String),
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
}

/// The DNS resolver the evaluation uses: the given servers (`IP` or
/// `IP:port`), or the system's (`/etc/resolv.conf`) when none are given.
///
/// # Errors
/// [`ResolverError`] for an entry that is not an address, or when the
/// system configuration cannot be read.
pub fn authenticator(
    servers: &[String],
    timeout: Duration,
) -> Result<MessageAuthenticator, ResolverError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    if servers.is_empty() {
        let (config, _) = mail_auth::hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| ResolverError::Setup(e.to_string()))?;
        return MessageAuthenticator::new(config, opts)
            .map_err(|e| ResolverError::Setup(e.to_string()));
    }
    let mut name_servers = Vec::new();
    for s in servers {
        let (ip, port) = match (s.parse::<SocketAddr>(), s.parse::<IpAddr>()) {
            (Ok(sa), _) => (sa.ip(), sa.port()),
            (_, Ok(ip)) => (ip, 53),
            _ => return Err(ResolverError::BadServer(s.clone())),
        };
        let mut ns = NameServerConfig::udp_and_tcp(ip);
        for c in &mut ns.connections {
            c.port = port;
        }
        name_servers.push(ns);
    }
    MessageAuthenticator::new(ResolverConfig::from_name_servers(name_servers), opts)
        .map_err(|e| ResolverError::Setup(e.to_string()))
}

/// What the session knows of the incoming connection.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub client_ip: IpAddr,
    /// The EHLO/HELO name.
    pub helo: &'a str,
    /// The envelope sender as received (empty for `<>`).
    pub mail_from: &'a str,
}

/// Seals messages for one alias domain. RSA only: RFC 8617 defines ARC
/// with `rsa-sha256` alone, and verifiers (dkimpy among them) fail an
/// Ed25519 seal.
pub struct DomainSealer {
    /// Over [`SIGNED_HEADERS`], for a message that has DKIM signatures.
    sealer: ArcSealer<RsaKey<Sha256>, Done>,
    /// The same without `DKIM-Signature`, for a message that has none. The
    /// `ARC-Message-Signature` would otherwise sign that field as absent,
    /// and a verifier, picking the field from the bottom up, would take our
    /// own DKIM signature (added after the seal, below it) for it and fail
    /// the seal: the same rule as for our DKIM signatures.
    unsigned_sealer: ArcSealer<RsaKey<Sha256>, Done>,
}

impl DomainSealer {
    /// A sealer with the domain's DKIM key and selector; `None` for an
    /// Ed25519 key (see above).
    ///
    /// # Errors
    /// [`DkimError::BadKey`] when the key cannot be used.
    pub fn new(
        domain: &str,
        selector: &str,
        material: &KeyMaterial,
    ) -> Result<Option<Self>, DkimError> {
        let build =
            |headers: &[&str]| -> Result<Option<ArcSealer<RsaKey<Sha256>, Done>>, DkimError> {
                let Some(key) = super::dkim::rsa_key(material)? else {
                    return Ok(None);
                };
                Ok(Some(
                    ArcSealer::from_key(key)
                        .domain(domain)
                        .selector(selector)
                        .headers(headers.iter().copied())
                        .header_canonicalization(Canonicalization::Relaxed)
                        .body_canonicalization(Canonicalization::Relaxed),
                ))
            };
        let without: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|h| !h.eq_ignore_ascii_case("DKIM-Signature"))
            .collect();
        Ok(match (build(SIGNED_HEADERS)?, build(&without)?) {
            (Some(sealer), Some(unsigned_sealer)) => Some(Self {
                sealer,
                unsigned_sealer,
            }),
            _ => None,
        })
    }
}

/// How sealing a message ended (for the log and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealOutcome {
    /// The ARC set (three header fields, CRLF-terminated).
    Sealed(String),
    /// An existing chain is broken (`cv=fail`): RFC 8617 forbids extending it.
    ChainBroken,
    /// The message could not be parsed or signed.
    Failed(String),
}

/// Evaluates the incoming message (SPF of the client and envelope sender,
/// its DKIM signatures, DMARC of its From domain, an existing ARC chain) and
/// seals it with the results.
pub async fn seal(
    auth: &MessageAuthenticator,
    authserv_id: &str,
    sealer: &DomainSealer,
    incoming: Incoming<'_>,
    message: &[u8],
) -> SealOutcome {
    let Some(msg) = AuthenticatedMessage::parse(message) else {
        return SealOutcome::Failed("message headers cannot be parsed".into());
    };
    let helo = if incoming.helo.is_empty() {
        "unknown"
    } else {
        incoming.helo
    };
    let spf = if incoming.mail_from.is_empty() {
        auth.verify_spf(SpfParameters::verify_ehlo(
            incoming.client_ip,
            helo,
            authserv_id,
        ))
        .await
    } else {
        auth.verify_spf(SpfParameters::verify_mail_from(
            incoming.client_ip,
            helo,
            authserv_id,
            incoming.mail_from,
        ))
        .await
    };
    let dkim = auth.verify_dkim(&msg).await;
    let arc = auth.verify_arc(&msg).await;
    let mail_from_domain = incoming.mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
    let dmarc = auth
        .verify_dmarc(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf))
        .await;
    let header_from = msg.from.first().map(String::as_str).unwrap_or("");
    let mut results = AuthenticationResults::new(authserv_id).with_dkim_results(&dkim, header_from);
    results = if incoming.mail_from.is_empty() {
        results.with_spf_ehlo_result(&spf, incoming.client_ip, helo)
    } else {
        results.with_spf_mailfrom_result(&spf, incoming.client_ip, incoming.mail_from, helo)
    };
    let results = results
        .with_dmarc_result(&dmarc)
        .with_arc_result(&arc, incoming.client_ip);
    if !arc.can_be_sealed() {
        return SealOutcome::ChainBroken;
    }
    let sealer = if super::dkim::has_signature(message) {
        &sealer.sealer
    } else {
        &sealer.unsigned_sealer
    };
    match sealer.seal(&msg, &results, &arc) {
        Ok(set) => SealOutcome::Sealed(set.to_header()),
        Err(e) => SealOutcome::Failed(e.to_string()),
    }
}
