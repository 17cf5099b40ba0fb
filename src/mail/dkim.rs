//! DKIM keys of the alias domains: loading, generating, signing.
//!
//! Every forwarded message is signed with the key of the alias domain it was
//! sent to (`d=` alias domain), so a receiver sees a valid signature of a
//! domain that takes responsibility for the forwarding, even when the
//! original sender's SPF no longer fits. The keys are files, the same on
//! every node (any node may forward any message).

use std::path::Path;

use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

/// Headers a signature covers when present (and, when absent, signs their
/// absence so they cannot be added later). `DKIM-Signature` covers the
/// original sender's signatures, so they cannot be stripped unnoticed.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "DKIM-Signature",
];

pub use crate::config::DkimAlgorithm as Algorithm;

/// The `k=` tag of the DNS record.
fn dns_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Rsa => "rsa",
        Algorithm::Ed25519 => "ed25519",
    }
}

/// Why a DKIM key could not be used or made.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: not a PEM private key (PKCS#1 or PKCS#8)")]
    NotPem { path: String },
    #[error("{path}: not a usable {} key: {reason}", dns_name(*algorithm))]
    BadKey {
        path: String,
        algorithm: Algorithm,
        reason: String,
    },
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A private key in the form the signers need.
enum Key {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// The DER of a private key file, kept so that the DKIM signer and the ARC
/// sealer (which each own a key) can be built from one read.
pub struct KeyMaterial {
    der: Vec<u8>,
    pkcs1: bool,
    algorithm: Algorithm,
    path: String,
}

impl KeyMaterial {
    /// Reads and checks a PEM private key.
    ///
    /// # Errors
    /// [`DkimError`] when the file cannot be read, is not PEM, or does not
    /// hold a key of `algorithm`.
    pub fn load(path: &Path, algorithm: Algorithm) -> Result<Self, DkimError> {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|error| DkimError::Read {
            path: shown.clone(),
            error,
        })?;
        let (der, pkcs1) = match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(PrivateKeyDer::Pkcs1(k)) => (k.secret_pkcs1_der().to_vec(), true),
            Ok(PrivateKeyDer::Pkcs8(k)) => (k.secret_pkcs8_der().to_vec(), false),
            _ => return Err(DkimError::NotPem { path: shown }),
        };
        let material = Self {
            der,
            pkcs1,
            algorithm,
            path: shown,
        };
        material.key()?;
        Ok(material)
    }

    fn key(&self) -> Result<Key, DkimError> {
        let bad = |reason: String| DkimError::BadKey {
            path: self.path.clone(),
            algorithm: self.algorithm,
            reason,
        };
        match self.algorithm {
            Algorithm::Rsa => {
                let der = if self.pkcs1 {
                    PrivateKeyDer::Pkcs1(self.der.clone().into())
                } else {
                    PrivateKeyDer::Pkcs8(self.der.clone().into())
                };
                RsaKey::<Sha256>::from_key_der(der)
                    .map(Key::Rsa)
                    .map_err(|e| bad(e.to_string()))
            }
            Algorithm::Ed25519 if self.pkcs1 => Err(bad("an RSA key (PKCS#1)".into())),
            Algorithm::Ed25519 => Ed25519Key::from_pkcs8_maybe_unchecked_der(&self.der)
                .map(Key::Ed25519)
                .map_err(|e| bad(e.to_string())),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// Signs messages for one alias domain.
pub struct DomainSigner {
    /// Over [`SIGNED_HEADERS`], for a message that has DKIM signatures.
    signer: Signer,
    /// The same without `DKIM-Signature`, for a message that has none (our
    /// own mail, unsigned forwarded mail). RFC 6376 5.4 allows the name in
    /// `h=` only to sign preexisting signatures; without one, verifiers
    /// (dkimpy among them) take the new signature itself for it and fail.
    unsigned_signer: Signer,
    pub domain: String,
    pub selector: String,
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

impl Signer {
    fn new(
        material: &KeyMaterial,
        domain: &str,
        selector: &str,
        headers: &[&str],
    ) -> Result<Self, DkimError> {
        Ok(match material.key()? {
            Key::Rsa(k) => Signer::Rsa(
                DkimSigner::from_key(k)
                    .domain(domain)
                    .selector(selector)
                    .headers(headers.iter().copied())
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            ),
            Key::Ed25519(k) => Signer::Ed25519(
                DkimSigner::from_key(k)
                    .domain(domain)
                    .selector(selector)
                    .headers(headers.iter().copied())
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed),
            ),
        })
    }
}

/// True when the header section of `message` has a `DKIM-Signature` field.
fn has_signature(message: &[u8]) -> bool {
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"dkim-signature:") {
            return true;
        }
    }
    false
}

impl DomainSigner {
    /// A signer with relaxed/relaxed canonicalization over [`SIGNED_HEADERS`].
    ///
    /// # Errors
    /// [`DkimError::BadKey`] when the key cannot be used.
    pub fn new(domain: &str, selector: &str, material: &KeyMaterial) -> Result<Self, DkimError> {
        let without: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|h| !h.eq_ignore_ascii_case("DKIM-Signature"))
            .collect();
        Ok(Self {
            signer: Signer::new(material, domain, selector, SIGNED_HEADERS)?,
            unsigned_signer: Signer::new(material, domain, selector, &without)?,
            domain: domain.to_string(),
            selector: selector.to_string(),
        })
    }

    /// The `DKIM-Signature:` header field (with CRLF) for `message`.
    ///
    /// # Errors
    /// [`DkimError::Sign`] when the message has none of the headers to sign.
    pub fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        let signer = if has_signature(message) {
            &self.signer
        } else {
            &self.unsigned_signer
        };
        let sig = match signer {
            Signer::Rsa(s) => s.sign(message),
            Signer::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(sig.to_header())
    }
}

/// The RSA key for ARC sealing (ARC signs like DKIM, with the same key);
/// `None` for an Ed25519 key.
pub(crate) fn rsa_key(material: &KeyMaterial) -> Result<Option<RsaKey<Sha256>>, DkimError> {
    match material.key()? {
        Key::Rsa(k) => Ok(Some(k)),
        Key::Ed25519(_) => Ok(None),
    }
}

/// A generated key pair: the private key as PEM and the DNS record.
pub struct GeneratedKey {
    pub private_pem: String,
    /// The TXT record's value (`v=DKIM1; k=...; p=...`).
    pub txt: String,
}

/// Generates a key: RSA-2048 (PKCS#1 PEM) or Ed25519 (PKCS#8 PEM).
///
/// # Errors
/// [`DkimError::Generate`] if the system's random source fails.
pub fn generate(algorithm: Algorithm) -> Result<GeneratedKey, DkimError> {
    let gen = |e: &dyn std::fmt::Display| DkimError::Generate(e.to_string());
    let (private_pem, public) = match algorithm {
        Algorithm::Rsa => {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            use rsa::pkcs8::EncodePublicKey;
            let key =
                rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| gen(&e))?;
            let pem = key
                .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
                .map_err(|e| gen(&e))?
                .to_string();
            // DNS publishes the SubjectPublicKeyInfo, as opendkim does.
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| gen(&e))?
                .as_bytes()
                .to_vec();
            (pem, public)
        }
        Algorithm::Ed25519 => {
            let pkcs8 = Ed25519Key::generate_pkcs8().map_err(|e| gen(&e))?;
            let key = Ed25519Key::from_pkcs8_der(&pkcs8).map_err(|e| gen(&e))?;
            (pem_encode("PRIVATE KEY", &pkcs8), key.public_key())
        }
    };
    let p = base64::engine::general_purpose::STANDARD.encode(public);
    Ok(GeneratedKey {
        private_pem,
        txt: format!("v=DKIM1; k={}; p={p}", dns_name(algorithm)),
    })
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The TXT record as a zone-file line, split into strings of at most 255
/// characters (a DNS character-string's limit; a 2048-bit key needs two).
pub fn zone_line(domain: &str, selector: &str, txt: &str) -> String {
    let parts: Vec<String> = txt
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        parts.join(" ")
    )
}

/// Writes a new private key file readable by its owner only; refuses to
/// overwrite an existing one (a published key would silently stop working).
///
/// # Errors
/// [`DkimError::Write`] when the file exists or cannot be written.
pub fn write_key_file(path: &Path, pem: &str) -> Result<(), DkimError> {
    use std::io::Write;
    let err = |error| DkimError::Write {
        path: path.display().to_string(),
        error,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(pem.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"From: Alice <alice@sender.example>\r\nTo: k7q2mz9xwd@tempalias.test\r\nSubject: hi\r\nDate: Sun, 29 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\nbody\r\n";

    fn material(alg: Algorithm) -> (tempfile::TempDir, KeyMaterial) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = generate(alg).unwrap();
        write_key_file(&path, &key.private_pem).unwrap();
        let m = KeyMaterial::load(&path, alg).unwrap();
        (dir, m)
    }

    #[test]
    fn ed25519_keys_sign_with_the_alias_domain() {
        let (_d, m) = material(Algorithm::Ed25519);
        let s = DomainSigner::new("tempalias.test", "s1", &m).unwrap();
        let h = s.sign(MESSAGE).unwrap();
        assert!(h.starts_with("DKIM-Signature:"), "{h}");
        assert!(h.contains("a=ed25519-sha256"), "{h}");
        assert!(h.contains("d=tempalias.test"), "{h}");
        assert!(h.contains("s=s1"), "{h}");
        assert!(h.contains("c=relaxed/relaxed"), "{h}");
        assert!(h.ends_with("\r\n"), "{h:?}");
    }

    #[test]
    fn dkim_signature_is_signed_only_when_the_message_has_one() {
        let (_d, m) = material(Algorithm::Ed25519);
        let s = DomainSigner::new("tempalias.test", "s1", &m).unwrap();
        let h_tag = |h: &str| {
            let unfolded: String = h.split_whitespace().collect();
            unfolded.to_ascii_lowercase()
        };
        assert!(!h_tag(&s.sign(MESSAGE).unwrap()).contains(":dkim-signature"));
        let signed = [&b"DKIM-Signature: v=1; d=sender.example\r\n"[..], MESSAGE].concat();
        assert!(h_tag(&s.sign(&signed).unwrap()).contains(":dkim-signature"));
        // A field in the body is no signature.
        let body = [MESSAGE, b"DKIM-Signature: x\r\n"].concat();
        assert!(!has_signature(&body));
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_key_file(&path, "x").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            write_key_file(&path, "y"),
            Err(DkimError::Write { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
    }

    #[test]
    fn a_key_of_the_wrong_algorithm_is_refused() {
        let (dir, _m) = material(Algorithm::Ed25519);
        let e = KeyMaterial::load(&dir.path().join("k.pem"), Algorithm::Rsa);
        assert!(matches!(e, Err(DkimError::BadKey { .. })));
        std::fs::write(dir.path().join("junk"), "not a key").unwrap();
        assert!(matches!(
            KeyMaterial::load(&dir.path().join("junk"), Algorithm::Rsa),
            Err(DkimError::NotPem { .. })
        ));
    }

    #[test]
    fn long_records_are_split_into_dns_strings() {
        let txt = format!("v=DKIM1; k=rsa; p={}", "A".repeat(392));
        let line = zone_line("tempalias.test", "s1", &txt);
        assert!(line.starts_with("s1._domainkey.tempalias.test. IN TXT ( \""));
        assert_eq!(line.matches('"').count(), 4, "{line}");
    }
}
