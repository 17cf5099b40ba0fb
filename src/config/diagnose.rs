//! Finding every mistake in a configuration at once, each with its place.
//!
//! `check-config` is run by someone fixing a file: stopping at the first error
//! turns three typos into three round trips. So the file is walked key by key
//! against the known keys (taken from the defaults, so they cannot drift from
//! the structs), every problem keeps where it came from (a file line or an
//! environment variable) and misspelt names get a "did you mean".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Config;

/// Where a configuration value came from, so an error can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a configuration file (1-based).
    File { path: PathBuf, line: usize },
    /// A `TEMPALIAS_*` environment variable.
    Env(String),
    /// Not set anywhere: the built-in default (or a combination of keys).
    Default,
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// The dotted key (`smtp.listen`), or the name as written when unknown.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.origin {
            Origin::File { path, line } => {
                write!(f, "{}:{line}: ", path.display())?;
                if !self.key.is_empty() {
                    write!(f, "{}: ", self.key)?;
                }
            }
            // Named by the variable the user set; the key in brackets so the
            // reference in docs/configuration.md is easy to find.
            Origin::Env(var) if self.key.is_empty() => write!(f, "{var}: ")?,
            Origin::Env(var) => write!(f, "{var} ({}): ", self.key)?,
            Origin::Default => {
                if !self.key.is_empty() {
                    write!(f, "{}: ", self.key)?;
                }
            }
        }
        f.write_str(&self.message)
    }
}

/// The keys a configuration may contain.
pub struct Schema {
    /// Top-level keys that are values (`node_id`, `data_dir`, `domains`,
    /// `worker_threads`).
    pub top: Vec<String>,
    /// Section name to its keys.
    pub sections: BTreeMap<String, Vec<String>>,
}

impl Schema {
    /// Derived from the serialized defaults; optional keys without a default
    /// (which serialize to nothing) are added by hand.
    pub fn new() -> Self {
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        let mut top = Vec::new();
        let mut sections = BTreeMap::new();
        for (k, v) in defaults {
            match v {
                toml::Value::Table(t) => {
                    sections.insert(k, t.keys().cloned().collect::<Vec<_>>());
                }
                _ => top.push(k),
            }
        }
        for (section, extras) in [
            ("cluster", &["secret", "secret_file"][..]),
            ("relay", &["ca_file", "password", "password_file"][..]),
        ] {
            if let Some(keys) = sections.get_mut(section) {
                for extra in extras {
                    if !keys.iter().any(|k| k == extra) {
                        keys.push(extra.to_string());
                    }
                }
            }
        }
        if let Some(srs) = sections.get_mut("srs") {
            for extra in ["secret", "secret_file"] {
                if !srs.iter().any(|k| k == extra) {
                    srs.push(extra.to_string());
                }
            }
        }
        Self { top, sections }
    }

    /// Every key as its environment variable, for suggestions.
    fn env_vars(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> =
            self.top.iter().map(|k| (env_var(k), k.clone())).collect();
        for (section, keys) in &self.sections {
            for k in keys {
                let dotted = format!("{section}.{k}");
                out.push((env_var(&dotted), dotted));
            }
        }
        out
    }
}

/// `smtp.listen` → `TEMPALIAS_SMTP_LISTEN`.
pub fn env_var(dotted: &str) -> String {
    format!(
        "{}{}",
        super::ENV_PREFIX,
        dotted.replace('.', "_").to_ascii_uppercase()
    )
}

/// The candidate closest to `word`, if it is close enough to be a typo
/// (transpositions count as one edit: `domians` → `domains`).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.len() / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word, &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn did_you_mean(found: Option<&str>, fmt: impl Fn(&str) -> String) -> String {
    found
        .map(|c| format!("; did you mean {}?", fmt(c)))
        .unwrap_or_default()
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A value set by the file or the environment, with where it was set.
pub struct Setting {
    pub key: String,
    pub value: toml::Value,
    pub origin: Origin,
}

/// Reads a configuration file into settings, reporting every syntax error,
/// unknown section and unknown key with its line.
pub fn read_file(path: &Path, text: &str, schema: &Schema) -> (Vec<Setting>, Vec<Problem>) {
    let at = |offset: usize| Origin::File {
        path: path.to_path_buf(),
        line: line_of(text, offset),
    };
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        // The structure after a syntax error is a guess; report only these.
        let problems = errors
            .iter()
            .map(|e| Problem {
                origin: e.span().map(|s| at(s.start)).unwrap_or(Origin::Default),
                key: String::new(),
                message: format!("TOML syntax: {}", e.message()),
            })
            .collect();
        return (Vec::new(), problems);
    }
    let values: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let origin = e.span().map(|s| at(s.start)).unwrap_or(Origin::Default);
            let problem = Problem {
                origin,
                key: String::new(),
                message: format!("TOML: {}", e.message()),
            };
            return (Vec::new(), vec![problem]);
        }
    };
    let mut settings = Vec::new();
    let mut problems = Vec::new();
    let top_names: Vec<&str> = schema
        .top
        .iter()
        .chain(schema.sections.keys())
        .map(String::as_str)
        .collect();
    for (key, value) in doc.get_ref().iter() {
        let name: &str = key.get_ref();
        let origin = at(key.span().start);
        let Some(toml_value) = values.get(name) else {
            continue;
        };
        if schema.top.iter().any(|k| k == name) {
            settings.push(Setting {
                key: name.to_string(),
                value: toml_value.clone(),
                origin,
            });
            continue;
        }
        let Some(known) = schema.sections.get(name) else {
            let is_table = value.get_ref().is_table();
            let message = if is_table {
                format!(
                    "unknown section [{name}]{}",
                    did_you_mean(
                        suggest(name, schema.sections.keys().map(String::as_str)),
                        |c| { format!("[{c}]") }
                    )
                )
            } else {
                format!(
                    "unknown key{}",
                    did_you_mean(suggest(name, top_names.iter().copied()), |c| c.to_string())
                )
            };
            problems.push(Problem {
                origin,
                key: name.to_string(),
                message,
            });
            continue;
        };
        let (Some(section), toml::Value::Table(section_values)) =
            (value.get_ref().as_table(), toml_value)
        else {
            problems.push(Problem {
                origin,
                key: name.to_string(),
                message: format!("must be a section ([{name}]), not a value"),
            });
            continue;
        };
        for (sub, _) in section.iter() {
            let sub_name: &str = sub.get_ref();
            let origin = at(sub.span().start);
            let dotted = format!("{name}.{sub_name}");
            if !known.iter().any(|k| k == sub_name) {
                problems.push(Problem {
                    origin,
                    key: dotted,
                    message: format!(
                        "unknown key in [{name}]{}",
                        did_you_mean(suggest(sub_name, known.iter().map(String::as_str)), |c| {
                            c.to_string()
                        })
                    ),
                });
                continue;
            }
            if let Some(v) = section_values.get(sub_name) {
                settings.push(Setting {
                    key: dotted,
                    value: v.clone(),
                    origin,
                });
            }
        }
    }
    (settings, problems)
}

/// Variables with the prefix that are not configuration keys.
const NOT_CONFIG: &[&str] = &[
    crate::clock::TEST_CLOCK_OFFSET_FILE_ENV,
    crate::raft::purge::TEST_PURGE_EVERY_ENV,
    "TEMPALIAS_API",
    "TEMPALIAS_TOKEN",
    "TEMPALIAS_TOKEN_FILE",
];

/// Reads `TEMPALIAS_*` overrides, reporting each unknown variable by name.
pub fn read_env(
    env: impl IntoIterator<Item = (String, String)>,
    schema: &Schema,
) -> (Vec<Setting>, Vec<Problem>) {
    let vars = schema.env_vars();
    let mut settings = Vec::new();
    let mut problems = Vec::new();
    for (var, raw) in env {
        if !var.starts_with(super::ENV_PREFIX) || NOT_CONFIG.contains(&var.as_str()) {
            continue;
        }
        match vars.iter().find(|(v, _)| *v == var) {
            Some((_, key)) => settings.push(Setting {
                key: key.clone(),
                value: parse_env_value(&raw),
                origin: Origin::Env(var),
            }),
            None => {
                let hint = did_you_mean(suggest(&var, vars.iter().map(|(v, _)| v.as_str())), |c| {
                    c.to_string()
                });
                problems.push(Problem {
                    origin: Origin::Env(var),
                    key: String::new(),
                    message: format!("not a configuration variable{hint}"),
                });
            }
        }
    }
    (settings, problems)
}

/// Environment values are TOML values when they parse as one (numbers, arrays,
/// inline tables), and plain strings otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets a dotted key in a table of sections.
pub fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
        }
        Some((section, sub)) => {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                t.insert(sub.to_string(), value);
            }
        }
    }
}

/// The reason of a serde error without the location toml appends (we give
/// our own, which also covers the environment).
pub fn type_error(e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    msg.lines().next().unwrap_or(msg).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_catch_typos_and_nothing_else() {
        let keys = ["domains", "data_dir", "node_id"];
        assert_eq!(suggest("domians", keys), Some("domains"));
        assert_eq!(suggest("dommains", keys), Some("domains"));
        assert_eq!(suggest("colour", keys), None);
        assert_eq!(
            suggest("smpt", ["http", "smtp", "relay", "log"]),
            Some("smtp")
        );
    }

    #[test]
    fn schema_knows_optional_keys() {
        let s = Schema::new();
        assert!(s.top.contains(&"domains".to_string()));
        assert!(s.sections["cluster"].contains(&"secret_file".to_string()));
        assert!(s.sections["relay"].contains(&"password_file".to_string()));
        assert!(s.sections["smtp"].contains(&"listen".to_string()));
        assert_eq!(env_var("http.listen"), "TEMPALIAS_HTTP_LISTEN");
    }
}
