//! TLS for the SMTP listeners: STARTTLS and the optional implicit-TLS port.
//!
//! The certificate sits behind a resolver that can be swapped while the node
//! runs: SIGHUP re-reads the files, new handshakes use the new certificate,
//! and sessions already in TLS keep the one they negotiated (rustls copies
//! what it needs at handshake time). A file that does not load leaves the
//! current certificate in place, so a botched renewal never takes TLS down.
//!
//! rustls with the `aws-lc-rs` provider (the one mail-auth signs with; see
//! docs/architecture.md for why not ring), TLS 1.2 and 1.3 only.
//!
//! Sessions resume: sending MTAs keep a TLS session cache (Postfix's
//! `smtp_tls_session_cache_database`, Exim, ...), and a resumed handshake
//! skips the key exchange's certificate signature, the largest part of
//! what a new connection costs the node. With `smtp.tls_session_tickets`
//! (the default) the session travels in a ticket sealed with keys that
//! rustls makes at random and rotates every 6 hours (tickets live 12), so
//! the node keeps nothing per client; without it, a bounded in-memory cache
//! of 256 sessions (rustls' default) serves the clients that come back soon.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::SmtpConfig;

/// Why TLS could not be set up or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate and key do not fit together: {0}")]
    Key(rustls::Error),
    #[error("TLS settings: {0}")]
    Settings(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where the certificate comes from, so a reload reads the same place.
#[derive(Debug, Clone)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
}

/// The certificate in use, swapped whole on reload.
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // The lock is held only to clone an Arc, never across an await.
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A node's TLS server side: the acceptor every session uses, and the
/// means to reload its certificate.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
    source: Source,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("source", &self.source).finish()
    }
}

/// What was negotiated, for the `Received:` header and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// The cipher suite as rustls names it, such as `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl Negotiated {
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            other => format!("{other:?}"),
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        Self { version, cipher }
    }
}

/// Names of the cipher suites `[smtp] tls_cipher_suites` may list.
pub fn known_cipher_suites() -> Vec<String> {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .map(|s| format!("{:?}", s.suite()))
        .collect()
}

impl Tls {
    /// Sets TLS up from `[smtp]`: the configured certificate files, or else
    /// (with `tls_self_signed`) a self-signed certificate for the host name,
    /// made once and kept in `data_dir`. `None` when neither is configured:
    /// STARTTLS is then not offered.
    ///
    /// # Errors
    /// [`TlsError`] when the files cannot be read, do not fit together, or
    /// the settings name an unknown version or cipher suite.
    pub fn from_config(config: &SmtpConfig, data_dir: &Path) -> Result<Option<Arc<Tls>>, TlsError> {
        let source = if !config.tls_cert_file.is_empty() {
            Source {
                cert: PathBuf::from(&config.tls_cert_file),
                key: PathBuf::from(&config.tls_key_file),
            }
        } else if config.tls_self_signed {
            let dir = data_dir.join("tls");
            let source = Source {
                cert: dir.join("selfsigned-cert.pem"),
                key: dir.join("selfsigned-key.pem"),
            };
            if !source.cert.exists() || !source.key.exists() {
                write_self_signed(&config.hostname, 3650, &source.cert, &source.key)?;
                tracing::info!(cert = %source.cert.display(), host = %config.hostname, "made a self-signed certificate for STARTTLS");
            }
            source
        } else {
            return Ok(None);
        };
        let provider = Arc::new(provider(&config.tls_cipher_suites)?);
        let versions: &[&'static rustls::SupportedProtocolVersion] =
            match config.tls_min_version.as_str() {
                "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
                "1.3" => &[&rustls::version::TLS13],
                other => {
                    return Err(TlsError::Settings(format!(
                        "tls_min_version {other:?}: must be \"1.2\" or \"1.3\""
                    )))
                }
            };
        let key = load(&source, &provider)?;
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(key)),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Settings(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // The builder's defaults stay otherwise: the 256-session cache (for
        // TLS 1.2 clients that ask for no ticket, or for everyone when
        // tickets are off) and 2 TLS 1.3 tickets per handshake, so a client
        // has a spare when one is used up.
        if config.tls_session_tickets {
            server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError::Settings(format!("session ticket keys: {e}")))?;
        }
        Ok(Some(Arc::new(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            resolver,
            provider,
            source,
        })))
    }

    /// The acceptor for new handshakes.
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the certificate and key. On error the current ones stay.
    ///
    /// # Errors
    /// [`TlsError`] when the files cannot be read or do not fit together.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.source, &self.provider)?;
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }
}

/// Reloads the certificate on every SIGHUP until `shutdown`. Without TLS a
/// SIGHUP is logged and otherwise ignored: it must never end the node (the
/// default action of SIGHUP), since `systemctl reload` sends it.
pub async fn reload_on_hangup(tls: Option<Arc<Tls>>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate reload is off");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                s = hangups.recv() => if s.is_none() { return },
            }
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: no TLS certificate to reload");
                continue;
            };
            match tls.reload() {
                Ok(()) => {
                    tracing::info!(cert = %tls.source.cert.display(), "TLS certificate reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the current one")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tls;
        shutdown.cancelled().await;
    }
}

/// Checks that the configured certificate files load and fit together,
/// without setting anything up or writing anything (for `check-config`).
/// Nothing to check when no files are configured.
///
/// # Errors
/// [`TlsError`] as [`Tls::from_config`] would report it.
pub fn check_files(config: &SmtpConfig) -> Result<(), TlsError> {
    if config.tls_cert_file.is_empty() {
        return Ok(());
    }
    let source = Source {
        cert: PathBuf::from(&config.tls_cert_file),
        key: PathBuf::from(&config.tls_key_file),
    };
    load(&source, &provider(&config.tls_cipher_suites)?).map(|_| ())
}

/// The aws-lc-rs provider, with only the named cipher suites when any are
/// named.
fn provider(names: &[String]) -> Result<CryptoProvider, TlsError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if names.is_empty() {
        return Ok(provider);
    }
    let mut suites = Vec::new();
    for name in names {
        let suite = rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .find(|s| format!("{:?}", s.suite()).eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                TlsError::Settings(format!(
                    "unknown cipher suite {name:?}; known: {}",
                    known_cipher_suites().join(", ")
                ))
            })?;
        suites.push(*suite);
    }
    provider.cipher_suites = suites;
    Ok(provider)
}

fn load(source: &Source, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let pem = |path: &Path, e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(error) => TlsError::Read {
            path: path.to_path_buf(),
            error,
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    };
    let certs = CertificateDer::pem_file_iter(&source.cert)
        .map_err(|e| pem(&source.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(&source.cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: source.cert.clone(),
            message: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&source.key).map_err(|e| pem(&source.key, e))?;
    CertifiedKey::from_der(certs, key, provider).map_err(TlsError::Key)
}

/// Writes a new self-signed certificate for `host`, valid for `days`, and
/// its key (readable by the owner only).
///
/// # Errors
/// [`TlsError`] when generation or writing fails.
pub fn write_self_signed(host: &str, days: u32, cert: &Path, key: &Path) -> Result<(), TlsError> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()])?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, host);
    let pair = rcgen::KeyPair::generate()?;
    let certificate = params.self_signed(&pair)?;
    let write = |path: &Path, text: &str, private: bool| -> Result<(), TlsError> {
        let err = |error| TlsError::Write {
            path: path.to_path_buf(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        use std::io::Write;
        let mut file = options.open(path).map_err(err)?;
        file.write_all(text.as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)
    };
    // The key first: a certificate without its key is useless.
    write(key, &pair.serialize_pem(), true)?;
    write(cert, &certificate.pem(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_config_makes_and_reuses_a_self_signed_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::from_config(&SmtpConfig::default(), dir.path())
            .unwrap()
            .expect("self-signed by default");
        let first = std::fs::read(&tls.source.cert).unwrap();
        let again = Tls::from_config(&SmtpConfig::default(), dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read(&again.source.cert).unwrap(), first);
        tls.reload().unwrap();
    }

    #[test]
    fn session_tickets_are_on_by_default_and_can_be_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let tls = Tls::from_config(&SmtpConfig::default(), dir.path())
            .unwrap()
            .unwrap();
        let server = tls.acceptor().config();
        assert!(server.ticketer.enabled());
        assert!(server.session_storage.can_cache());
        let c = SmtpConfig {
            tls_session_tickets: false,
            ..SmtpConfig::default()
        };
        let tls = Tls::from_config(&c, dir.path()).unwrap().unwrap();
        let server = tls.acceptor().config();
        assert!(!server.ticketer.enabled());
        // Resumption still works from the cache.
        assert!(server.session_storage.can_cache());
    }

    #[test]
    fn no_certificate_means_no_tls() {
        let dir = tempfile::tempdir().unwrap();
        let c = SmtpConfig {
            tls_self_signed: false,
            ..SmtpConfig::default()
        };
        assert!(Tls::from_config(&c, dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_broken_reload_keeps_the_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_self_signed("mx.example", 30, &cert, &key).unwrap();
        let c = SmtpConfig {
            tls_cert_file: cert.display().to_string(),
            tls_key_file: key.display().to_string(),
            ..SmtpConfig::default()
        };
        let tls = Tls::from_config(&c, dir.path()).unwrap().unwrap();
        let before = tls.resolver.current.read().unwrap().clone();
        // A key that belongs to another certificate is refused.
        let other = dir.path().join("other.pem");
        write_self_signed("mx.example", 30, &dir.path().join("oc.pem"), &other).unwrap();
        std::fs::copy(&other, &key).unwrap();
        assert!(
            matches!(tls.reload(), Err(TlsError::Key(_))),
            "mismatched key accepted"
        );
        let after = tls.resolver.current.read().unwrap().clone();
        assert!(Arc::ptr_eq(&before, &after));
        // A fitting pair is taken.
        write_self_signed("mx.example", 30, &cert, &key).unwrap();
        tls.reload().unwrap();
        let renewed = tls.resolver.current.read().unwrap().clone();
        assert!(!Arc::ptr_eq(&before, &renewed));
    }

    #[test]
    fn cipher_suites_are_checked_by_name() {
        assert!(provider(&["TLS13_AES_256_GCM_SHA384".into()]).is_ok());
        assert!(matches!(
            provider(&["TLS_RSA_WITH_RC4_128_MD5".into()]),
            Err(TlsError::Settings(_))
        ));
        assert!(known_cipher_suites().contains(&"TLS13_CHACHA20_POLY1305_SHA256".to_string()));
    }
}
