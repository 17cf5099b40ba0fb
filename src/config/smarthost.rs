//! Smarthost URLs, parsed when the configuration is loaded.
//!
//! They live with the configuration (not in the relay) so that a bad URL is a
//! configuration error with its file line, and so that the configuration does
//! not depend on the relay: the relay reads the configuration, never the other
//! way round.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How the connection to a smarthost is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `smtp://`: STARTTLS when the smarthost offers it, plaintext when it
    /// does not. The certificate is not verified (RFC 7435 opportunistic
    /// security: an attacker who can present a bad certificate can also strip
    /// the STARTTLS offer, so verifying buys nothing here), and no password is
    /// ever sent over such a connection.
    Opportunistic,
    /// `smtp+starttls://`: STARTTLS is required and the certificate verified;
    /// a smarthost that does not offer it, or presents a certificate that does
    /// not verify, is a failed attempt, never a plaintext delivery.
    Required,
    /// `smtps://`: TLS from the first byte (RFC 8314), certificate verified.
    Implicit,
}

/// A parsed smarthost URL: `smtp://`, `smtp+starttls://` or `smtps://`, an
/// optional user name for AUTH (`smtps://user@host`), a host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmarthostUrl {
    pub tls: TlsMode,
    /// The AUTH user; the password comes from `relay.password_file` or
    /// `relay.password`, never from the URL (URLs end up in logs).
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

impl SmarthostUrl {
    /// # Errors
    /// A message saying what is wrong with the URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest, default_port) = if let Some(r) = url.strip_prefix("smtp://") {
            (TlsMode::Opportunistic, r, 25)
        } else if let Some(r) = url.strip_prefix("smtp+starttls://") {
            (TlsMode::Required, r, 587)
        } else if let Some(r) = url.strip_prefix("smtps://") {
            (TlsMode::Implicit, r, 465)
        } else {
            return Err("must start with smtp://, smtp+starttls:// or smtps://".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, rest) = match rest.rsplit_once('@') {
            Some((u, r)) => {
                if u.contains(':') {
                    return Err(
                        "a password does not belong in the URL: put it in relay.password_file (or TEMPALIAS_RELAY_PASSWORD)"
                            .into(),
                    );
                }
                if u.is_empty() || u.contains('/') {
                    return Err("the user name before @ is empty or contains /".into());
                }
                (Some(u.to_string()), r)
            }
            None => (None, rest),
        };
        if rest.is_empty() || rest.contains('/') {
            return Err("must be scheme://[user@]host[:port] with nothing after the port".into());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| "an IPv6 address needs its closing ]".to_string())?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("unexpected {after:?} after the address")),
            };
            (h, port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => {
                    (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
                }
                Some(_) => return Err("write an IPv6 address in brackets: [::1]:25".into()),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err("host and port must not be empty or zero".into());
        }
        Ok(Self {
            tls,
            user,
            host: host.to_string(),
            port,
        })
    }

    fn scheme(&self) -> &'static str {
        match self.tls {
            TlsMode::Opportunistic => "smtp",
            TlsMode::Required => "smtp+starttls",
            TlsMode::Implicit => "smtps",
        }
    }

    /// `scheme://host:port` without the user: the metric label and log name.
    pub fn label(&self) -> String {
        if self.host.contains(':') {
            format!("{}://[{}]:{}", self.scheme(), self.host, self.port)
        } else {
            format!("{}://{}:{}", self.scheme(), self.host, self.port)
        }
    }
}

impl std::fmt::Display for SmarthostUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let label = self.label();
        match &self.user {
            Some(u) => {
                let (scheme, rest) = label.split_once("://").unwrap_or(("smtp", &label));
                write!(f, "{scheme}://{u}@{rest}")
            }
            None => f.write_str(&label),
        }
    }
}

impl Serialize for SmarthostUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SmarthostUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SmarthostUrl::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            SmarthostUrl::parse("smtp://127.0.0.1:2526").unwrap(),
            SmarthostUrl {
                tls: TlsMode::Opportunistic,
                user: None,
                host: "127.0.0.1".into(),
                port: 2526
            }
        );
        let u = SmarthostUrl::parse("smtps://relay.example").unwrap();
        assert_eq!((u.tls, u.port), (TlsMode::Implicit, 465));
        let u = SmarthostUrl::parse("smtp+starttls://fwd@relay.example").unwrap();
        assert_eq!((u.tls, u.port), (TlsMode::Required, 587));
        assert_eq!(u.user.as_deref(), Some("fwd"));
        assert_eq!(u.to_string(), "smtp+starttls://fwd@relay.example:587");
        assert_eq!(u.label(), "smtp+starttls://relay.example:587");
        assert_eq!(
            SmarthostUrl::parse("smtp://relay.example/").unwrap().port,
            25
        );
        let v6 = SmarthostUrl::parse("smtp://[::1]:26").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 26));
        assert_eq!(v6.to_string(), "smtp://[::1]:26");
        assert_eq!(SmarthostUrl::parse("smtps://[::1]").unwrap().port, 465);
        assert!(SmarthostUrl::parse("http://x").is_err());
        assert!(SmarthostUrl::parse("smtp://").is_err());
        assert!(SmarthostUrl::parse("smtp://h:notaport").is_err());
        assert!(SmarthostUrl::parse("smtp://h:0").is_err());
        assert!(SmarthostUrl::parse("smtp://::1:25").is_err());
        let e = SmarthostUrl::parse("smtps://u:pw@h").unwrap_err();
        assert!(e.contains("password_file"), "{e}");
    }

    #[test]
    fn round_trips_through_serde() {
        #[derive(Serialize, Deserialize)]
        struct W {
            u: SmarthostUrl,
        }
        let w: W = toml::from_str("u = \"smtps://a@h.example:2465\"").unwrap();
        assert_eq!(
            toml::to_string(&w).unwrap().trim(),
            "u = \"smtps://a@h.example:2465\""
        );
        let e = toml::from_str::<W>("u = \"ftp://x\"").err().unwrap();
        assert!(e.message().contains("ftp://x"), "{}", e.message());
    }
}
