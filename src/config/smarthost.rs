//! Smarthost entries and their URLs, parsed when the configuration is loaded.
//!
//! They live with the configuration (not in the relay) so that a bad URL is a
//! configuration error with its file line, and so that the configuration does
//! not depend on the relay: the relay reads the configuration, never the other
//! way round.

use std::path::PathBuf;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
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
    /// The AUTH user (from the URL or the entry's `user` key); the password
    /// comes from the entry's `password_file`, else `relay.password_file` or
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
                        "a password does not belong in the URL: put it in the entry's password_file, or relay.password_file (or TEMPALIAS_RELAY_PASSWORD)"
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

/// One `relay.smarthosts` entry: a URL string, or a table with the URL and
/// the AUTH settings of that smarthost alone.
///
/// Two providers rarely share a password, so each entry may name its own
/// `password_file` (and its `user`, which may contain `@` as many providers'
/// user names do); an entry that names none uses the relay-wide
/// `relay.password_file` / `relay.password`, so a list of plain URL strings
/// keeps working as before. A password itself is never accepted here: the
/// entries are printed at start-up and by `check-config`, files are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smarthost {
    /// The URL, with the entry's `user` (if any) filled in.
    pub url: SmarthostUrl,
    /// This smarthost's own AUTH password file; `None` uses the relay-wide one.
    pub password_file: Option<PathBuf>,
    /// This smarthost's own connection-reuse bounds, where they differ from
    /// the relay-wide `relay.reuse_*` keys.
    pub reuse: ReuseOverrides,
}

/// The `reuse_*` keys an entry may set for its smarthost alone: a large
/// provider may take many long-lived connections, while a small one should
/// get few, or none. Each key left out (`None`) takes the relay-wide value,
/// so an entry without any behaves as before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseOverrides {
    pub reuse_connections: Option<bool>,
    pub reuse_max_idle: Option<u32>,
    pub reuse_idle_secs: Option<u64>,
    pub reuse_max_messages: Option<u32>,
    pub reuse_max_age_secs: Option<u64>,
}

impl ReuseOverrides {
    /// True when the entry sets none of them.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Reads one `reuse_*` key of an entry into its field; `false` when
    /// `key` is none of them.
    fn read<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "reuse_connections" => self.reuse_connections = Some(map.next_value()?),
            "reuse_max_idle" => self.reuse_max_idle = Some(map.next_value()?),
            "reuse_idle_secs" => self.reuse_idle_secs = Some(map.next_value()?),
            "reuse_max_messages" => self.reuse_max_messages = Some(map.next_value()?),
            "reuse_max_age_secs" => self.reuse_max_age_secs = Some(map.next_value()?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Writes the keys the entry sets.
    fn write<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        if let Some(v) = self.reuse_connections {
            map.serialize_entry("reuse_connections", &v)?;
        }
        if let Some(v) = self.reuse_max_idle {
            map.serialize_entry("reuse_max_idle", &v)?;
        }
        if let Some(v) = self.reuse_idle_secs {
            map.serialize_entry("reuse_idle_secs", &v)?;
        }
        if let Some(v) = self.reuse_max_messages {
            map.serialize_entry("reuse_max_messages", &v)?;
        }
        if let Some(v) = self.reuse_max_age_secs {
            map.serialize_entry("reuse_max_age_secs", &v)?;
        }
        Ok(())
    }
}

impl Smarthost {
    /// An entry with no settings of its own.
    pub fn new(url: SmarthostUrl) -> Self {
        Self {
            url,
            password_file: None,
            reuse: ReuseOverrides::default(),
        }
    }

    /// # Errors
    /// A message saying what is wrong with the URL or the user.
    fn from_parts(
        url: &str,
        user: Option<String>,
        password_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let mut parsed = SmarthostUrl::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
        if let Some(user) = user {
            if parsed.user.is_some() {
                return Err(format!(
                    "url {url:?} names a user and so does user: name it once"
                ));
            }
            if user.is_empty() || user.chars().any(char::is_control) {
                return Err("user must be non-empty, without control characters".into());
            }
            parsed.user = Some(user);
        }
        if password_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("password_file must not be empty".into());
        }
        Ok(Self {
            url: parsed,
            password_file,
            reuse: ReuseOverrides::default(),
        })
    }
}

impl std::fmt::Display for Smarthost {
    /// The URL (with the user, never a password): what start-up prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.url.fmt(f)
    }
}

impl Serialize for Smarthost {
    /// A plain URL string when the entry has nothing else, else a table with
    /// the user apart (a user with `@` or `:` would not read back from a URL).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.url.user.is_none() && self.password_file.is_none() && self.reuse.is_empty() {
            return s.collect_str(&self.url);
        }
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("url", &self.url.label())?;
        if let Some(user) = &self.url.user {
            map.serialize_entry("user", user)?;
        }
        if let Some(path) = &self.password_file {
            map.serialize_entry("password_file", path)?;
        }
        self.reuse.write(&mut map)?;
        map.end()
    }
}

/// The keys of an entry's table form.
const ENTRY_KEYS: [&str; 8] = [
    "url",
    "user",
    "password_file",
    "reuse_connections",
    "reuse_max_idle",
    "reuse_idle_secs",
    "reuse_max_messages",
    "reuse_max_age_secs",
];

struct SmarthostVisitor;

impl<'de> Visitor<'de> for SmarthostVisitor {
    type Value = Smarthost;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a smarthost URL, or a table with url and optionally user, password_file and reuse_* keys",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Smarthost, E> {
        SmarthostUrl::parse(v)
            .map(Smarthost::new)
            .map_err(|e| E::custom(format!("{v:?}: {e}")))
    }

    /// Read by hand rather than derived, so that a mistake names the
    /// entry's URL (the error's line is that of the whole list) and a
    /// misspelt key gets a suggestion.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Smarthost, A::Error> {
        let (mut url, mut user, mut password_file) = (None::<String>, None, None);
        let mut reuse = ReuseOverrides::default();
        let mut problems = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if reuse.read(&key, &mut map)? {
                continue;
            }
            match key.as_str() {
                "url" => url = Some(map.next_value()?),
                "user" => user = Some(map.next_value::<String>()?),
                "password_file" => password_file = Some(map.next_value::<PathBuf>()?),
                "password" => {
                    map.next_value::<de::IgnoredAny>()?;
                    problems.push(
                        "a smarthost's password goes in a file named by its password_file, not in the configuration"
                            .to_string(),
                    );
                }
                other => {
                    map.next_value::<de::IgnoredAny>()?;
                    let hint = super::diagnose::suggest(other, ENTRY_KEYS)
                        .map(|k| format!("; did you mean {k}?"))
                        .unwrap_or_default();
                    problems.push(format!(
                        "unknown key {other:?} (an entry has url, user, password_file and the reuse_* keys of [relay]){hint}"
                    ));
                }
            }
        }
        let Some(url) = url else {
            return Err(de::Error::custom(
                "a smarthost table needs url = \"smtp://...\"",
            ));
        };
        if let Some(first) = problems.first() {
            return Err(de::Error::custom(format!("{url}: {first}")));
        }
        let mut entry =
            Smarthost::from_parts(&url, user, password_file).map_err(de::Error::custom)?;
        entry.reuse = reuse;
        Ok(entry)
    }
}

impl<'de> Deserialize<'de> for Smarthost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SmarthostVisitor)
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

    /// A config section holding smarthost entries, as `[relay]` does.
    #[derive(Debug, Serialize, Deserialize)]
    struct Entries {
        smarthosts: Vec<Smarthost>,
    }

    #[test]
    fn entries_may_set_their_own_reuse_bounds() {
        let w: Entries = toml::from_str(
            r#"
smarthosts = [
  "smtp://a.example",
  { url = "smtp://b.example", reuse_connections = false },
  { url = "smtp://c.example", reuse_max_idle = 64, reuse_idle_secs = 10, reuse_max_messages = 1000, reuse_max_age_secs = 600 },
]
"#,
        )
        .unwrap();
        assert!(w.smarthosts[0].reuse.is_empty());
        assert_eq!(
            w.smarthosts[1].reuse,
            ReuseOverrides {
                reuse_connections: Some(false),
                ..Default::default()
            }
        );
        assert_eq!(
            w.smarthosts[2].reuse,
            ReuseOverrides {
                reuse_connections: None,
                reuse_max_idle: Some(64),
                reuse_idle_secs: Some(10),
                reuse_max_messages: Some(1000),
                reuse_max_age_secs: Some(600),
            }
        );
        // Written as a table when it sets any, and read back the same.
        let text = toml::to_string(&w).unwrap();
        assert!(text.contains("reuse_max_age_secs = 600"), "{text}");
        let again: Entries = toml::from_str(&text).unwrap();
        assert_eq!(again.smarthosts, w.smarthosts);
    }

    #[test]
    fn entries_are_urls_or_tables() {
        let w: Entries = toml::from_str(
            r#"
smarthosts = [
  "smtps://fwd@a.example",
  { url = "smtp+starttls://b.example:2587", user = "postmaster@mg.b.example", password_file = "/run/b.pw" },
]
"#,
        )
        .unwrap();
        assert_eq!(w.smarthosts[0].url.user.as_deref(), Some("fwd"));
        assert_eq!(w.smarthosts[0].password_file, None);
        let b = &w.smarthosts[1];
        assert_eq!(b.url.user.as_deref(), Some("postmaster@mg.b.example"));
        assert_eq!(b.url.port, 2587);
        assert_eq!(b.password_file, Some(PathBuf::from("/run/b.pw")));
        assert_eq!(
            b.to_string(),
            "smtp+starttls://postmaster@mg.b.example@b.example:2587"
        );
        // The array-of-tables form reads the same.
        let tables: Entries = toml::from_str(
            r#"
[[smarthosts]]
url = "smtps://fwd@a.example"

[[smarthosts]]
url = "smtp+starttls://b.example:2587"
user = "postmaster@mg.b.example"
password_file = "/run/b.pw"
"#,
        )
        .unwrap();
        assert_eq!(tables.smarthosts, w.smarthosts);
        // And what is written reads back.
        let again: Entries = toml::from_str(&toml::to_string(&w).unwrap()).unwrap();
        assert_eq!(again.smarthosts, w.smarthosts);
        for (bad, why) in [
            (
                "smarthosts = [{ url = \"smtps://u@h\", user = \"v\" }]",
                "name it once",
            ),
            (
                "smarthosts = [{ url = \"smtps://h\", pasword_file = \"/x\" }]",
                "pasword_file",
            ),
            ("smarthosts = [{ user = \"v\" }]", "needs url"),
            ("smarthosts = [{ url = \"ftp://h\" }]", "ftp://h"),
            (
                "smarthosts = [{ url = \"smtps://h\", user = \"\" }]",
                "user",
            ),
            (
                "smarthosts = [{ url = \"smtps://h\", password = \"pw\" }]",
                "password_file",
            ),
            ("smarthosts = [1]", "smarthost URL"),
            (
                "smarthosts = [{ url = \"smtps://h\", reuse_max_idel = 2 }]",
                "did you mean reuse_max_idle?",
            ),
            (
                "smarthosts = [{ url = \"smtps://h\", reuse_max_idle = -1 }]",
                "invalid value",
            ),
            (
                "smarthosts = [{ url = \"smtps://h\", reuse_connections = \"yes\" }]",
                "invalid type",
            ),
        ] {
            let e = toml::from_str::<Entries>(bad).err().unwrap();
            assert!(e.message().contains(why), "{bad}: {}", e.message());
        }
    }
}
