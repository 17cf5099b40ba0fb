//! What a forwarded message gets on its way out: an SRS envelope sender, a
//! DKIM signature and an ARC set of the alias domain.
//!
//! [`Forwarding`] is the one entry point for the SMTP session: at RCPT it
//! turns a bounce to an SRS address back into the original sender
//! ([`Forwarding::reverse_recipient`]); after DATA it rewrites the envelope
//! and prepends the headers ([`Forwarding::prepare`]). The message itself is
//! never changed: headers are only added in front of it, so the original
//! sender's DKIM signatures still verify at the target.

pub mod arc;
pub mod dkim;
pub mod dsn;
#[cfg(test)]
mod sign_bench;
pub mod srs;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use arc::Incoming;
pub use srs::{Srs, SrsError};

use crate::config::{Config, ConfigError, Secret};
use crate::metrics::{AuthLabels, AuthResult};
use crate::relay::Envelope;

/// Why forwarding could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("dkim.keys ({domain}): {error}")]
    Dkim {
        domain: String,
        error: dkim::DkimError,
    },
    #[error("arc.dns_servers: {0}")]
    Resolver(#[from] arc::ResolverError),
}

/// The keys of one alias domain.
struct DomainKeys {
    signer: dkim::DomainSigner,
    sealer: Option<arc::DomainSealer>,
}

/// SRS, DKIM and ARC for forwarded mail, shared by all sessions of a node.
pub struct Forwarding {
    srs: Srs,
    /// By alias domain (lower case). A domain without keys is not signed.
    keys: HashMap<String, DomainKeys>,
    /// The resolver for the ARC evaluation; `None` when nothing is sealed.
    auth: Option<mail_auth::MessageAuthenticator>,
    /// `authserv-id` of our `ARC-Authentication-Results` (the SMTP hostname).
    authserv_id: String,
    arc_timeout: Duration,
    /// The alias domains (lower case): a sender that is already one of our
    /// own valid SRS addresses is kept, not wrapped into SRS1.
    domains: Vec<String>,
    /// `tempalias_forward_auth_total` (shared with the registry).
    counts: prometheus_client::metrics::family::Family<
        AuthLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// Whether `address` may go into an upstream MAIL FROM or RCPT TO. Like
/// lettre's check, but a local part may be longer than 64 characters: SRS
/// addresses (ours, and other forwarders' we bounce to) often are, and MTAs
/// accept them. The local part must be a dot-atom (what SRS produces from a
/// sender that passed lettre's check), the domain one lettre accepts.
pub fn is_valid_envelope_address(address: &str) -> bool {
    if address.parse::<lettre::Address>().is_ok() {
        return true;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let atext = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    local.len() <= 255
        && local
            .split('.')
            .all(|w| !w.is_empty() && w.bytes().all(atext))
        && lettre::Address::new("x", domain).is_ok()
}

/// The SRS key of a secret: an HMAC of it, so that the cluster secret (the
/// default) is never used directly as a key for something else.
fn srs_key(secret: &Secret) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes()).expect("any key length");
    mac.update(b"tempalias srs key v1");
    mac.finalize().into_bytes().to_vec()
}

impl Forwarding {
    /// Builds SRS from `srs.*` (or the cluster secret), and a signer (and
    /// sealer, with `arc.enabled`) for every domain of `dkim.keys`.
    ///
    /// # Errors
    /// [`ForwardingError`] naming the key that cannot be used.
    pub fn from_config(config: &Config) -> Result<Self, ForwardingError> {
        let keys = config.srs_secrets()?.iter().map(srs_key).collect();
        let srs = Srs::new(keys, config.srs.max_age_days);
        // The keys of each domain, in configuration order.
        let mut by_domain: Vec<(String, Vec<(&str, dkim::KeyMaterial)>)> = Vec::new();
        for k in &config.dkim.keys {
            let domain = k.domain.to_ascii_lowercase();
            let material = dkim::KeyMaterial::load(&k.key_file, k.algorithm).map_err(|error| {
                ForwardingError::Dkim {
                    domain: format!("{domain}, selector {}", k.selector),
                    error,
                }
            })?;
            match by_domain.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, keys)) => keys.push((&k.selector, material)),
                None => by_domain.push((domain, vec![(&k.selector, material)])),
            }
        }
        let mut domains = HashMap::new();
        for (domain, keys) in by_domain {
            let err = |error| ForwardingError::Dkim {
                domain: domain.clone(),
                error,
            };
            let refs: Vec<(&str, &dkim::KeyMaterial)> = keys.iter().map(|(s, m)| (*s, m)).collect();
            let signer = dkim::DomainSigner::new(&domain, &refs).map_err(err)?;
            // ARC seals with one key: the domain's first RSA key (RFC 8617
            // defines rsa-sha256 only), the same one that signs first.
            let arc_key = refs
                .iter()
                .find(|(_, m)| m.algorithm() == dkim::Algorithm::Rsa);
            let sealer = match arc_key {
                Some((selector, material)) if config.arc.enabled => {
                    arc::DomainSealer::new(&domain, selector, material).map_err(err)?
                }
                _ => None,
            };
            domains.insert(domain, DomainKeys { signer, sealer });
        }
        let auth = if domains.values().any(|d| d.sealer.is_some()) {
            Some(arc::authenticator(
                &config.arc.dns_servers,
                Duration::from_millis(config.arc.dns_timeout_ms),
            )?)
        } else {
            None
        };
        Ok(Self {
            srs,
            keys: domains,
            auth,
            authserv_id: config.smtp.hostname.clone(),
            arc_timeout: Duration::from_millis(config.arc.timeout_ms),
            domains: config
                .domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            counts: Default::default(),
        })
    }

    /// Counts outcomes into `metrics` (`tempalias_forward_auth_total`).
    pub fn with_metrics(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.counts = metrics.forward_auth.clone();
        self
    }

    fn count(&self, result: AuthResult) {
        self.counts.get_or_create(&AuthLabels { result }).inc();
    }

    /// Forwarding with SRS only (tests, and tools that sign nothing).
    pub fn srs_only(srs: Srs, authserv_id: &str) -> Self {
        Self {
            srs,
            keys: HashMap::new(),
            auth: None,
            authserv_id: authserv_id.to_string(),
            arc_timeout: Duration::from_secs(5),
            domains: Vec::new(),
            counts: Default::default(),
        }
    }

    /// Alias domains that have a DKIM key (for the start-up log).
    pub fn signed_domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self.keys.keys().cloned().collect();
        d.sort();
        d
    }

    /// Each signed domain with its selectors and algorithms in signing
    /// order, e.g. `tempalias.example (s1-rsa rsa, s1-ed25519 ed25519)`
    /// (for the start-up log).
    pub fn signing_keys(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .keys
            .iter()
            .map(|(domain, k)| {
                let keys: Vec<String> = k
                    .signer
                    .selectors()
                    .into_iter()
                    .map(|(s, a)| format!("{s} {}", dkim::dns_name(a)))
                    .collect();
                format!("{domain} ({})", keys.join(", "))
            })
            .collect();
        d.sort();
        d
    }

    /// Whether forwarded mail is ARC-sealed (for some domain).
    pub fn seals(&self) -> bool {
        self.auth.is_some()
    }

    /// Signed domains that are not sealed: ARC needs an RSA key, and these
    /// have Ed25519 keys only.
    pub fn unsealed_domains(&self) -> Vec<String> {
        let mut d: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, k)| k.sealer.is_none())
            .map(|(d, _)| d.clone())
            .collect();
        d.sort();
        d
    }

    /// True for a valid SRS address of one of our alias domains.
    fn is_own_srs(&self, address: &str, now_ms: u64) -> bool {
        address.rsplit_once('@').is_some_and(|(local, domain)| {
            self.domains.contains(&domain.to_ascii_lowercase())
                && self.srs.reverse(local, now_ms / 1000).is_ok()
        })
    }

    /// For a recipient `local@<alias domain>`: `None` when `local` is no SRS
    /// address (an alias, then); otherwise where the bounce must go, or why
    /// it must be refused (`550 5.7.1`, a failed recipient). Only bounces
    /// (null sender) are relayed: SRS addresses are return paths, not a way
    /// to reach the original sender.
    pub fn reverse_recipient(
        &self,
        local: &str,
        mail_from: &str,
        now_ms: u64,
    ) -> Option<Result<String, SrsError>> {
        if !srs::is_srs(local) {
            return None;
        }
        if !mail_from.is_empty() {
            return Some(Err(SrsError::NotBounce));
        }
        let reversed = self.srs.reverse(local, now_ms / 1000);
        // The reversed address goes into an upstream RCPT: it must be one.
        Some(reversed.and_then(|a| {
            if is_valid_envelope_address(&a) {
                Ok(a)
            } else {
                Err(SrsError::Malformed)
            }
        }))
    }

    /// The envelope and message to send upstream: the sender rewritten with
    /// SRS into the domain of `alias_address` (the first recipient), and the
    /// message with an ARC set and a DKIM signature of that domain in front.
    /// Without a key for the domain the message is passed on as it is.
    ///
    /// The body is copied once (into the buffer with the new headers); it is
    /// never altered.
    pub async fn prepare(
        &self,
        incoming: Incoming<'_>,
        alias_address: &str,
        mut envelope: Envelope,
        message: Vec<u8>,
        now_ms: u64,
    ) -> (Envelope, Arc<Vec<u8>>) {
        let domain = alias_address
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let rewritten = if self.is_own_srs(&envelope.mail_from, now_ms) {
            // Forwarded again through another alias: its bounce can go
            // straight back to the original sender.
            envelope.mail_from.clone()
        } else {
            self.srs
                .forward(&envelope.mail_from, &domain, now_ms / 1000)
        };
        if rewritten.is_empty() || is_valid_envelope_address(&rewritten) {
            envelope.mail_from = rewritten;
        } else {
            // Only a sender with a quoted local part gets here: it keeps its
            // own address (SPF at the target checks its domain then).
            tracing::info!("sender cannot be SRS-rewritten; forwarded unchanged");
        }
        let Some(keys) = self.keys.get(&domain) else {
            self.count(AuthResult::unsigned);
            return (envelope, Arc::new(message));
        };
        let arc_set = match (&keys.sealer, &self.auth) {
            (Some(sealer), Some(auth)) => {
                let sealing = arc::seal(auth, &self.authserv_id, sealer, incoming, &message);
                match tokio::time::timeout(self.arc_timeout, sealing).await {
                    Ok(arc::SealOutcome::Sealed(h)) => {
                        self.count(AuthResult::sealed);
                        h
                    }
                    Ok(arc::SealOutcome::ChainBroken) => {
                        self.count(AuthResult::chain_broken);
                        tracing::info!("not ARC-sealed: the message's ARC chain is broken");
                        String::new()
                    }
                    Ok(arc::SealOutcome::Failed(e)) => {
                        self.count(AuthResult::seal_failed);
                        tracing::warn!(error = %e, "not ARC-sealed");
                        String::new()
                    }
                    Err(_) => {
                        self.count(AuthResult::seal_timeout);
                        tracing::warn!("not ARC-sealed: the evaluation took too long");
                        String::new()
                    }
                }
            }
            _ => String::new(),
        };
        let signature = match keys.signer.sign(&message) {
            Ok(h) => {
                self.count(AuthResult::signed);
                h
            }
            Err(e) => {
                self.count(AuthResult::sign_failed);
                tracing::warn!(error = %e, "not DKIM-signed");
                String::new()
            }
        };
        let mut out = Vec::with_capacity(arc_set.len() + signature.len() + message.len());
        out.extend_from_slice(arc_set.as_bytes());
        out.extend_from_slice(signature.as_bytes());
        out.extend_from_slice(&message);
        (envelope, Arc::new(out))
    }

    /// Signs a message the node writes itself (the target-confirmation mail)
    /// with `domain`'s DKIM key, when it has one. No SRS (such mail goes out
    /// from the null sender) and no ARC (there is no incoming message whose
    /// authentication results could be passed on).
    pub fn sign_own(&self, domain: &str, message: Vec<u8>) -> Vec<u8> {
        let Some(keys) = self.keys.get(&domain.to_ascii_lowercase()) else {
            self.count(AuthResult::unsigned);
            return message;
        };
        match keys.signer.sign(&message) {
            Ok(signature) => {
                self.count(AuthResult::signed);
                let mut out = Vec::with_capacity(signature.len() + message.len());
                out.extend_from_slice(signature.as_bytes());
                out.extend_from_slice(&message);
                out
            }
            Err(e) => {
                self.count(AuthResult::sign_failed);
                tracing::warn!(error = %e, "not DKIM-signed");
                message
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DkimAlgorithm, DkimKey};

    const NOW_MS: u64 = 1_790_000_000_000;
    const MESSAGE: &[u8] = b"Received: from x (127.0.0.1)\r\n\tby mx1.tempalias.test; Sun, 29 Nov 2026 12:00:00 +0000\r\nFrom: Alice <alice@sender.example>\r\nTo: k7q2mz9xwd@tempalias.test\r\nSubject: hi\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\nbody line\r\n.. dot\r\n";

    fn incoming() -> Incoming<'static> {
        Incoming {
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client.sender.example",
            mail_from: "alice@sender.example",
        }
    }

    fn config(dir: &std::path::Path, arc: bool) -> Config {
        // ARC seals with RSA only (RFC 8617); DKIM alone is tested with Ed25519.
        let algorithm = if arc {
            DkimAlgorithm::Rsa
        } else {
            DkimAlgorithm::Ed25519
        };
        let key = dkim::generate(algorithm).unwrap();
        let path = dir.join("dkim.pem");
        dkim::write_key_file(&path, &key.private_pem).unwrap();
        let mut c = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        c.srs.secret = Some(Secret::new("an SRS secret of some length"));
        c.dkim.keys = vec![DkimKey {
            domain: "tempalias.test".into(),
            selector: "s1".into(),
            key_file: path,
            algorithm: Some(algorithm),
        }];
        c.arc.enabled = arc;
        // Nothing answers here: every lookup fails at once, nothing leaves.
        c.arc.dns_servers = vec!["127.0.0.1:1".into()];
        c.arc.dns_timeout_ms = 200;
        c
    }

    fn envelope(from: &str) -> Envelope {
        Envelope {
            mail_from: from.into(),
            rcpt_to: vec!["me@example.net".into()],
        }
    }

    /// The test message from alice to the test alias, as it leaves.
    async fn forward(f: &Forwarding) -> Arc<Vec<u8>> {
        f.prepare(
            incoming(),
            "k7q2mz9xwd@tempalias.test",
            envelope("alice@sender.example"),
            MESSAGE.to_vec(),
            NOW_MS,
        )
        .await
        .1
    }

    #[tokio::test]
    async fn signs_rewrites_and_keeps_the_message_intact() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwarding::from_config(&config(dir.path(), false)).unwrap();
        assert!(!f.seals());
        let (env, msg) = f
            .prepare(
                incoming(),
                "k7q2mz9xwd@tempalias.test",
                envelope("alice@sender.example"),
                MESSAGE.to_vec(),
                NOW_MS,
            )
            .await;
        assert!(env.mail_from.starts_with("SRS0="), "{}", env.mail_from);
        assert!(env
            .mail_from
            .ends_with("=sender.example=alice@tempalias.test"));
        assert_eq!(env.rcpt_to, vec!["me@example.net".to_string()]);
        let text = String::from_utf8(msg.to_vec()).unwrap();
        assert!(text.starts_with("DKIM-Signature:"), "{text}");
        assert!(text.contains("d=tempalias.test"), "{text}");
        assert!(msg.ends_with(MESSAGE), "the original follows unchanged");
        // The rewritten sender reverses for a bounce, and only for a bounce.
        let local = env.mail_from.rsplit_once('@').unwrap().0;
        assert_eq!(
            f.reverse_recipient(local, "", NOW_MS),
            Some(Ok("alice@sender.example".into()))
        );
        assert_eq!(
            f.reverse_recipient(local, "someone@else.example", NOW_MS),
            Some(Err(SrsError::NotBounce))
        );
        assert_eq!(f.reverse_recipient("k7q2mz9xwd", "", NOW_MS), None);
    }

    #[tokio::test]
    async fn domains_without_a_key_pass_unsigned_and_bounces_stay_null() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwarding::from_config(&config(dir.path(), false)).unwrap();
        let (env, msg) = f
            .prepare(
                incoming(),
                "abc@other.test",
                envelope(""),
                MESSAGE.to_vec(),
                NOW_MS,
            )
            .await;
        assert_eq!(env.mail_from, "");
        assert_eq!(msg.as_slice(), MESSAGE);
    }

    #[tokio::test]
    async fn seals_with_arc_even_when_dns_fails() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwarding::from_config(&config(dir.path(), true)).unwrap();
        assert!(f.seals());
        let msg = forward(&f).await;
        let text = String::from_utf8(msg.to_vec()).unwrap();
        let head = &text[..text.len() - MESSAGE.len()];
        for field in [
            "ARC-Seal: i=1",
            "ARC-Message-Signature: i=1",
            "ARC-Authentication-Results: i=1; mx1.tempalias.test",
            "DKIM-Signature:",
        ] {
            assert!(head.contains(field), "{field} missing in {head}");
        }
        assert!(head.contains("cv=none"), "{head}");
        assert!(msg.ends_with(MESSAGE));
        // MESSAGE has no DKIM signature: neither the seal nor our signature
        // signs that field (a verifier would take our signature for it).
        let unfolded: String = head.split_whitespace().collect();
        assert!(
            !unfolded.to_ascii_lowercase().contains(":dkim-signature"),
            "{head}"
        );
        // A message with one: both sign it.
        let signed = [
            &b"DKIM-Signature: v=1; d=sender.example; b=x\r\n"[..],
            MESSAGE,
        ]
        .concat();
        let (_, msg) = f
            .prepare(
                incoming(),
                "k7q2mz9xwd@tempalias.test",
                envelope("alice@sender.example"),
                signed.clone(),
                NOW_MS,
            )
            .await;
        let head = String::from_utf8_lossy(&msg[..msg.len() - signed.len()]);
        let unfolded: String = head
            .split_whitespace()
            .collect::<String>()
            .to_ascii_lowercase();
        assert_eq!(unfolded.matches(":dkim-signature").count(), 2, "{head}");
    }

    #[tokio::test]
    async fn ed25519_domains_are_signed_but_not_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), false);
        c.arc.enabled = true;
        let f = Forwarding::from_config(&c).unwrap();
        assert_eq!(f.unsealed_domains(), vec!["tempalias.test".to_string()]);
        assert!(!f.seals(), "no resolver without anything to seal");
        let msg = forward(&f).await;
        assert!(msg.starts_with(b"DKIM-Signature:"));
        assert!(!msg.windows(4).any(|w| w == b"ARC-"));
    }

    /// An RSA and an Ed25519 key for tempalias.test, listed Ed25519 first.
    fn two_keys(dir: &std::path::Path, arc: bool) -> Config {
        let mut c = config(dir, arc);
        let ed = dkim::generate(DkimAlgorithm::Ed25519).unwrap();
        let rsa = dkim::generate(DkimAlgorithm::Rsa).unwrap();
        let (ed_path, rsa_path) = (dir.join("ed.pem"), dir.join("rsa.pem"));
        dkim::write_key_file(&ed_path, &ed.private_pem).unwrap();
        dkim::write_key_file(&rsa_path, &rsa.private_pem).unwrap();
        c.dkim.keys = vec![
            DkimKey {
                domain: "tempalias.test".into(),
                selector: "e1".into(),
                key_file: ed_path,
                algorithm: None,
            },
            DkimKey {
                domain: "tempalias.test".into(),
                selector: "r1".into(),
                key_file: rsa_path,
                algorithm: None,
            },
        ];
        c
    }

    /// The names of the header fields in front of the original message, and
    /// the `s=` of each DKIM-Signature, top first.
    fn added(msg: &[u8]) -> (Vec<String>, Vec<String>) {
        let text = String::from_utf8(msg[..msg.len() - MESSAGE.len()].to_vec()).unwrap();
        let names = text
            .split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with([' ', '\t']))
            .map(|l| l.split(':').next().unwrap().to_string())
            .collect();
        let selectors = text
            .split("DKIM-Signature:")
            .skip(1)
            .map(|f| {
                let s = f.split(';').find_map(|t| t.trim().strip_prefix("s="));
                s.unwrap().trim().to_string()
            })
            .collect();
        (names, selectors)
    }

    #[tokio::test]
    async fn two_keys_sign_twice_rsa_first_and_arc_seals_with_rsa() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwarding::from_config(&two_keys(dir.path(), true)).unwrap();
        assert!(f.seals());
        assert!(f.unsealed_domains().is_empty());
        assert_eq!(
            f.signing_keys(),
            vec!["tempalias.test (r1 rsa, e1 ed25519)".to_string()]
        );
        let msg = forward(&f).await;
        assert!(msg.ends_with(MESSAGE));
        let (names, selectors) = added(&msg);
        assert_eq!(
            names,
            [
                "ARC-Seal",
                "ARC-Message-Signature",
                "ARC-Authentication-Results",
                "DKIM-Signature",
                "DKIM-Signature"
            ]
        );
        assert_eq!(selectors, ["r1", "e1"]);
        let text = String::from_utf8_lossy(&msg);
        // The seal and the message signature carry the RSA key's selector.
        assert_eq!(text.matches("a=rsa-sha256").count(), 3, "{text}");
        assert!(text.contains("a=ed25519-sha256"), "{text}");
        // Our own mail (confirmations, reports) gets both signatures too.
        let own = f.sign_own("TempAlias.test", MESSAGE.to_vec());
        assert_eq!(added(&own).1, ["r1", "e1"]);
        assert!(own.ends_with(MESSAGE));
    }

    #[tokio::test]
    async fn our_own_srs_sender_is_kept_when_forwarded_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = Forwarding::from_config(&config(dir.path(), false)).unwrap();
        let first = f
            .srs
            .forward("alice@sender.example", "tempalias.test", NOW_MS / 1000);
        let (env, _) = f
            .prepare(
                incoming(),
                "other@tempalias.test",
                envelope(&first),
                MESSAGE.to_vec(),
                NOW_MS,
            )
            .await;
        assert_eq!(env.mail_from, first);
        // Another forwarder's SRS0 (not ours) still becomes SRS1.
        let theirs = Srs::new(vec![b"theirs".to_vec()], 21).forward(
            "alice@sender.example",
            "tempalias.test",
            NOW_MS / 1000,
        );
        let (env, _) = f
            .prepare(
                incoming(),
                "other@tempalias.test",
                envelope(&theirs),
                MESSAGE.to_vec(),
                NOW_MS,
            )
            .await;
        assert!(env.mail_from.starts_with("SRS1="), "{}", env.mail_from);
    }

    #[test]
    fn long_srs_addresses_are_valid_envelope_addresses() {
        let srs = Srs::new(vec![b"k".to_vec()], 21);
        let long = format!("{}@lists.example.org", "newsletter-bounces+".repeat(3));
        assert!(long.parse::<lettre::Address>().is_ok());
        let fwd = srs.forward(&long, "tempalias.test", NOW_MS / 1000);
        assert!(fwd.split('@').next().unwrap().len() > 64, "{fwd}");
        assert!(
            fwd.parse::<lettre::Address>().is_err(),
            "lettre alone refuses it"
        );
        assert!(is_valid_envelope_address(&fwd));
        for bad in [
            "a b@example.org",
            "a..b@example.org",
            ".a@example.org",
            "a@",
            "a",
            "a@exa mple.org",
            "a\r\nRCPT@example.org",
        ] {
            assert!(!is_valid_envelope_address(bad), "{bad}");
        }
    }

    #[test]
    fn the_srs_key_is_shared_through_the_cluster_secret() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Config {
            data_dir: dir.path().join("a"),
            ..Config::default()
        };
        a.cluster.secret = Some(Secret::new("the cluster's shared secret"));
        let mut b = a.clone();
        b.data_dir = dir.path().join("b");
        let fa = Forwarding::from_config(&a).unwrap();
        let fb = Forwarding::from_config(&b).unwrap();
        let fwd = fa
            .srs
            .forward("x@y.example", "tempalias.test", NOW_MS / 1000);
        let local = fwd.rsplit_once('@').unwrap().0;
        assert_eq!(
            fb.reverse_recipient(local, "", NOW_MS),
            Some(Ok("x@y.example".into()))
        );
        // A different cluster cannot reverse it.
        let mut c = a.clone();
        c.cluster.secret = Some(Secret::new("another cluster's secret"));
        let fc = Forwarding::from_config(&c).unwrap();
        assert_eq!(
            fc.reverse_recipient(local, "", NOW_MS),
            Some(Err(SrsError::BadHash))
        );
    }
}
