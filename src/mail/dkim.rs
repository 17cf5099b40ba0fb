//! DKIM keys of the alias domains: loading, generating, signing.
//!
//! Every forwarded message is signed with the keys of the alias domain it
//! was sent to (`d=` alias domain), so a receiver sees a valid signature of
//! a domain that takes responsibility for the forwarding, even when the
//! original sender's SPF no longer fits. The keys are files, the same on
//! every node (any node may forward any message).
//!
//! A domain may have several keys, typically an RSA-2048 key (verified by
//! every receiver) and an Ed25519 key (RFC 8463: smaller and much cheaper to
//! sign with, but not verified everywhere). Each key adds its own
//! `DKIM-Signature`, computed over the message as it arrived and never over
//! our other signatures, so each one verifies on its own (RFC 6376 4.2 asks
//! verifiers to evaluate signatures independently); RSA ones come first.

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

/// The smallest RSA key we sign with: RFC 8301 3.2 asks signers for 2048
/// bits (and receivers refuse below 1024), and the signing library (aws-lc)
/// refuses shorter keys anyway; said here with the key's size instead of
/// the library's terse rejection.
const MIN_RSA_BITS: usize = 2048;

/// The `k=` tag of the DNS record.
pub fn dns_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Rsa => "rsa",
        Algorithm::Ed25519 => "ed25519",
    }
}

/// Why a DKIM key could not be used or made. No variant carries any part of
/// a key: these messages go to `check-config`'s output and the log.
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
    #[error("{path}: neither an RSA nor an Ed25519 private key")]
    UnknownAlgorithm { path: String },
    #[error(
        "{path}: mode {mode:04o} lets other users read or change the private key \
         (chmod 600, or 640 with the node's group)"
    )]
    Permissions { path: String, mode: u32 },
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
    /// Reads and checks a PEM private key. Its algorithm is read from the
    /// key; `expected` (the configuration's `algorithm`, when given) must
    /// match it.
    ///
    /// # Errors
    /// [`DkimError`] when the file cannot be read, is not PEM, holds neither
    /// an RSA key of at least 2048 bits (`MIN_RSA_BITS`) nor an Ed25519
    /// key, or not a key of `expected`.
    pub fn load(path: &Path, expected: Option<Algorithm>) -> Result<Self, DkimError> {
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
        let rsa = rsa_bits(&der, pkcs1);
        let found = if pkcs1 || rsa.is_some() {
            Algorithm::Rsa
        } else if Ed25519Key::from_pkcs8_maybe_unchecked_der(&der).is_ok() {
            Algorithm::Ed25519
        } else {
            return Err(DkimError::UnknownAlgorithm { path: shown });
        };
        if let Some(expected) = expected.filter(|&e| e != found) {
            return Err(DkimError::BadKey {
                path: shown,
                algorithm: expected,
                reason: format!("the file holds an {} key", dns_name(found)),
            });
        }
        if let Some(bits) = rsa.filter(|&b| b < MIN_RSA_BITS) {
            return Err(DkimError::BadKey {
                path: shown,
                algorithm: found,
                reason: format!("{bits} bits; at least {MIN_RSA_BITS} are needed"),
            });
        }
        let material = Self {
            der,
            pkcs1,
            algorithm: found,
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

/// The modulus size of an RSA private key (PKCS#1 or PKCS#8 DER); `None`
/// when it is none.
fn rsa_bits(der: &[u8], pkcs1: bool) -> Option<usize> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = if pkcs1 {
        rsa::RsaPrivateKey::from_pkcs1_der(der).ok()?
    } else {
        rsa::RsaPrivateKey::from_pkcs8_der(der).ok()?
    };
    Some(key.size() * 8)
}

/// Everything wrong with one configured key file, for `check-config` and the
/// start: its permissions (a private key others can read is no longer
/// private; one they can change lets them sign as the domain), and whether
/// it loads as a key of `expected`. The messages name the file, never its
/// contents.
pub fn key_file_problems(path: &Path, expected: Option<Algorithm>) -> Vec<DkimError> {
    let mut out = Vec::new();
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        // Group read is allowed (root:tempalias 0640 is a usual way to
        // install secrets); group write and anything for others is not.
        if mode & 0o027 != 0 {
            out.push(DkimError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    if let Err(e) = KeyMaterial::load(path, expected) {
        out.push(e);
    }
    out
}

/// One key of a domain, ready to sign.
struct KeySigner {
    /// Over [`SIGNED_HEADERS`], for a message that has DKIM signatures.
    signer: Signer,
    /// The same without `DKIM-Signature`, for a message that has none (our
    /// own mail, unsigned forwarded mail). RFC 6376 5.4 allows the name in
    /// `h=` only to sign preexisting signatures; without one, verifiers
    /// (dkimpy among them) take the new signature itself for it and fail.
    unsigned_signer: Signer,
    selector: String,
    algorithm: Algorithm,
}

/// Signs messages for one alias domain, with each of its keys.
pub struct DomainSigner {
    /// RSA keys first, then Ed25519, each group in configuration order.
    keys: Vec<KeySigner>,
    pub domain: String,
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

    fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        match self {
            Signer::Rsa(s) => s.sign(message),
            Signer::Ed25519(s) => s.sign(message),
        }
        .map(|sig| sig.to_header())
        .map_err(|e| DkimError::Sign(e.to_string()))
    }
}

/// True when the header section of `message` has a `DKIM-Signature` field.
pub(crate) fn has_signature(message: &[u8]) -> bool {
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
    /// A signer with relaxed/relaxed canonicalization over [`SIGNED_HEADERS`]
    /// for each `(selector, key)`. The signatures come out RSA first: a
    /// verifier may stop after the first signatures it tries (RFC 6376 6.1
    /// lets it limit how many it evaluates; dkimpy's `verify` checks only
    /// the topmost), and RSA is the one every receiver can check.
    ///
    /// # Errors
    /// [`DkimError::BadKey`] when a key cannot be used.
    pub fn new(domain: &str, keys: &[(&str, &KeyMaterial)]) -> Result<Self, DkimError> {
        let without: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|h| !h.eq_ignore_ascii_case("DKIM-Signature"))
            .collect();
        let mut signers = Vec::with_capacity(keys.len());
        for (selector, material) in keys {
            signers.push(KeySigner {
                signer: Signer::new(material, domain, selector, SIGNED_HEADERS)?,
                unsigned_signer: Signer::new(material, domain, selector, &without)?,
                selector: selector.to_string(),
                algorithm: material.algorithm,
            });
        }
        // Stable: configuration order within one algorithm.
        signers.sort_by_key(|k| k.algorithm != Algorithm::Rsa);
        Ok(Self {
            keys: signers,
            domain: domain.to_string(),
        })
    }

    /// The selectors in signing order, with their algorithm (for the log).
    pub fn selectors(&self) -> Vec<(String, Algorithm)> {
        self.keys
            .iter()
            .map(|k| (k.selector.clone(), k.algorithm))
            .collect()
    }

    /// One `DKIM-Signature:` header field (with CRLF) per key for `message`,
    /// concatenated in signing order, to go in front of it.
    ///
    /// Each is computed over `message` alone, not over the others: its `h=`
    /// lists `DKIM-Signature` only when `message` already had one, and
    /// verifiers pick header instances from the bottom up (RFC 6376 5.4.2),
    /// so they find the sender's signature below ours, never one of ours.
    /// A receiver that cannot check Ed25519 (or strips what it cannot
    /// check) therefore leaves the RSA signature intact and valid.
    ///
    /// # Errors
    /// [`DkimError::Sign`] when the message has none of the headers to sign
    /// (the same for every key, so it is all or nothing).
    pub fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        let presigned = has_signature(message);
        let mut out = String::new();
        for k in &self.keys {
            let signer = if presigned {
                &k.signer
            } else {
                &k.unsigned_signer
            };
            out.push_str(&signer.sign(message)?);
        }
        Ok(out)
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
/// [`DkimError::Write`] when the file exists or cannot be written; in the
/// latter case it is removed again.
pub fn write_key_file(path: &Path, pem: &str) -> Result<(), DkimError> {
    use std::io::Write;
    create_new_with(path, |f| {
        f.write_all(pem.as_bytes())?;
        f.sync_all()
    })
}

/// Creates `path` (mode 0600, never over an existing file) and lets `fill`
/// write it. When `fill` fails the file is removed: a truncated key left
/// behind would be taken for a key, and its name would block a second try.
/// A file that was there already is never touched.
fn create_new_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), DkimError> {
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
    fill(&mut f).map_err(|e| {
        drop(f);
        let _ = std::fs::remove_file(path);
        err(e)
    })
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
        let m = KeyMaterial::load(&path, Some(alg)).unwrap();
        (dir, m)
    }

    /// The header fields of a block of header text, unfolded, top first.
    fn fields(headers: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
            if line.starts_with([' ', '\t']) {
                out.last_mut().unwrap().push_str(line.trim_start());
            } else {
                out.push(line.to_string());
            }
        }
        out
    }

    /// The value of tag `t` of a DKIM-Signature field, whitespace removed.
    fn tag(field: &str, t: &str) -> String {
        let value = field.split_once(':').unwrap().1;
        value
            .split(';')
            .find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k.trim() == t).then(|| v.split_whitespace().collect())
            })
            .unwrap_or_default()
    }

    #[test]
    fn ed25519_keys_sign_with_the_alias_domain() {
        let (_d, m) = material(Algorithm::Ed25519);
        let s = DomainSigner::new("tempalias.test", &[("s1", &m)]).unwrap();
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
        let s = DomainSigner::new("tempalias.test", &[("s1", &m)]).unwrap();
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
        let e = KeyMaterial::load(&dir.path().join("k.pem"), Some(Algorithm::Rsa));
        match e {
            Err(e @ DkimError::BadKey { .. }) => assert!(
                e.to_string()
                    .ends_with("not a usable rsa key: the file holds an ed25519 key"),
                "{e}"
            ),
            other => panic!("{:?}", other.err()),
        }
        std::fs::write(dir.path().join("junk"), "not a key").unwrap();
        assert!(matches!(
            KeyMaterial::load(&dir.path().join("junk"), Some(Algorithm::Rsa)),
            Err(DkimError::NotPem { .. })
        ));
    }

    #[test]
    fn the_algorithm_is_read_from_the_key() {
        for alg in [Algorithm::Rsa, Algorithm::Ed25519] {
            let (dir, _m) = material(alg);
            let m = KeyMaterial::load(&dir.path().join("k.pem"), None).unwrap();
            assert_eq!(m.algorithm(), alg);
        }
        // A PKCS#8 RSA key (as `openssl genpkey` writes it) is RSA too.
        use rsa::pkcs8::EncodePrivateKey;
        let dir = tempfile::tempdir().unwrap();
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let path = dir.path().join("p8.pem");
        write_key_file(&path, &pem).unwrap();
        let m = KeyMaterial::load(&path, None).unwrap();
        assert_eq!(m.algorithm(), Algorithm::Rsa);
    }

    #[test]
    fn short_rsa_keys_are_refused_with_their_size() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let dir = tempfile::tempdir().unwrap();
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pem = key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
        let path = dir.path().join("short.pem");
        write_key_file(&path, &pem).unwrap();
        let e = KeyMaterial::load(&path, None).err().unwrap().to_string();
        assert!(e.contains("1024 bits; at least 2048"), "{e}");
    }

    #[test]
    fn a_key_file_that_cannot_be_written_is_removed_again() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let failed = create_new_with(&path, |f| {
            f.write_all(b"-----BEGIN PRIVATE KEY-----\n")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(
            matches!(&failed, Err(DkimError::Write { error, .. }) if error.to_string() == "disk full"),
            "{failed:?}"
        );
        assert!(!path.exists());
        // The name is free again; an existing file is neither overwritten
        // nor removed when the create fails.
        write_key_file(&path, "first").unwrap();
        assert!(matches!(
            write_key_file(&path, "second"),
            Err(DkimError::Write { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
    }

    #[test]
    fn key_file_problems_name_the_file_never_the_key() {
        let (dir, _m) = material(Algorithm::Ed25519);
        let path = dir.path().join("k.pem");
        assert!(key_file_problems(&path, None).is_empty());
        assert!(key_file_problems(&path, Some(Algorithm::Ed25519)).is_empty());
        let pem = std::fs::read_to_string(&path).unwrap();
        let secret_line = pem.lines().nth(1).unwrap().to_string();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Group read is a usual way to install secrets; others are not.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            assert!(key_file_problems(&path, None).is_empty());
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let found = key_file_problems(&path, Some(Algorithm::Rsa));
            let texts: Vec<String> = found.iter().map(|e| e.to_string()).collect();
            assert_eq!(found.len(), 2, "{texts:?}");
            assert!(matches!(
                found[0],
                DkimError::Permissions { mode: 0o644, .. }
            ));
            assert!(texts[0].contains("mode 0644"), "{texts:?}");
            assert!(texts[1].contains("holds an ed25519 key"), "{texts:?}");
            for t in &texts {
                assert!(!t.contains(&secret_line), "key material in {t}");
            }
        }
        let missing = key_file_problems(&dir.path().join("none.pem"), None);
        assert!(matches!(missing[..], [DkimError::Read { .. }]));
        // A file of a broken key: the message has no part of it.
        let broken = dir.path().join("broken.pem");
        let body = "MC4CAQAwBQYDK2VwBCIEIDEADBEEF";
        write_key_file(
            &broken,
            &format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        for e in key_file_problems(&broken, None) {
            assert!(!e.to_string().contains("DEADBEEF"), "{e}");
        }
    }

    #[test]
    fn two_keys_give_two_independent_signatures_rsa_first() {
        let (_d1, ed) = material(Algorithm::Ed25519);
        let (_d2, rsa) = material(Algorithm::Rsa);
        // Configured Ed25519 first: RSA still signs first.
        let s = DomainSigner::new("tempalias.test", &[("e1", &ed), ("r1", &rsa)]).unwrap();
        assert_eq!(
            s.selectors(),
            vec![
                ("r1".to_string(), Algorithm::Rsa),
                ("e1".to_string(), Algorithm::Ed25519)
            ]
        );
        let single_rsa = DomainSigner::new("tempalias.test", &[("r1", &rsa)]).unwrap();
        let single_ed = DomainSigner::new("tempalias.test", &[("e1", &ed)]).unwrap();
        let presigned = [
            &b"DKIM-Signature: v=1; d=sender.example; b=x\r\n"[..],
            MESSAGE,
        ]
        .concat();
        for message in [MESSAGE, &presigned[..]] {
            let both = fields(&s.sign(message).unwrap());
            assert_eq!(both.len(), 2, "{both:?}");
            assert_eq!(tag(&both[0], "a"), "rsa-sha256");
            assert_eq!(tag(&both[0], "s"), "r1");
            assert_eq!(tag(&both[1], "a"), "ed25519-sha256");
            assert_eq!(tag(&both[1], "s"), "e1");
            for f in &both {
                assert_eq!(tag(f, "d"), "tempalias.test");
                // Neither covers the other: `h=` names DKIM-Signature at
                // most once, for the sender's signature below both.
                let h = tag(f, "h").to_ascii_lowercase();
                let n = h.split(':').filter(|x| *x == "dkim-signature").count();
                assert_eq!(n, usize::from(message.len() != MESSAGE.len()), "{h}");
            }
            // Each is what that key alone gives (Ed25519 and RSA PKCS#1
            // v1.5 are deterministic): adding a key changes no other
            // signature. `t=` is in seconds: tried again (a bounded few
            // times) when a second boundary falls between the signings.
            let same_second = (0..3).find_map(|_| {
                let both = fields(&s.sign(message).unwrap());
                let alone_rsa = fields(&single_rsa.sign(message).unwrap());
                let alone_ed = fields(&single_ed.sign(message).unwrap());
                let t = tag(&both[0], "t");
                (t == tag(&both[1], "t")
                    && t == tag(&alone_rsa[0], "t")
                    && t == tag(&alone_ed[0], "t"))
                .then_some((both, alone_rsa, alone_ed))
            });
            let (both, alone_rsa, alone_ed) = same_second.expect("three signings within a second");
            assert_eq!(tag(&both[0], "b"), tag(&alone_rsa[0], "b"));
            assert_eq!(tag(&both[1], "b"), tag(&alone_ed[0], "b"));
            assert_eq!(tag(&both[0], "bh"), tag(&both[1], "bh"));
        }
    }

    #[test]
    fn long_records_are_split_into_dns_strings() {
        let txt = format!("v=DKIM1; k=rsa; p={}", "A".repeat(392));
        let line = zone_line("tempalias.test", "s1", &txt);
        assert!(line.starts_with("s1._domainkey.tempalias.test. IN TXT ( \""));
        assert_eq!(line.matches('"').count(), 4, "{line}");
    }
}
