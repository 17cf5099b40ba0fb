//! `tempalias alias create|show|revoke`: a client of a node's HTTP API that
//! prints a summary for people (or the API's JSON with `--json`).

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::{style, AliasCmd, TokenArgs};

/// How long one API call may take (a create waits for a Raft commit, which
/// during a leader election takes a few seconds).
const TIMEOUT: Duration = Duration::from_secs(30);

/// An alias as the API shows it (the fields the summary needs).
#[derive(Debug, Deserialize)]
struct AliasView {
    alias: String,
    id: String,
    target: String,
    created_at: String,
    valid_until: String,
    max_usage: u32,
    remaining: u32,
    state: String,
    token: Option<String>,
}

/// The API's error body.
#[derive(Debug, Deserialize)]
struct ApiErrorBody {
    error: String,
    message: String,
}

/// `--api` as a base URL: `127.0.0.1:8080` means `http://127.0.0.1:8080`.
fn api_base(api: &str) -> anyhow::Result<String> {
    let api = api.trim().trim_end_matches('/');
    let with_scheme = if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .with_context(|| format!("--api {api:?} is not a URL such as http://127.0.0.1:8080"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--api {api:?}: the scheme must be http or https");
    }
    Ok(with_scheme)
}

/// The token from `--token-file` (first line; `-` is stdin), else `--token`
/// or `TEMPALIAS_TOKEN`.
fn token(args: TokenArgs) -> anyhow::Result<String> {
    let token = match (&args.token_file, args.token) {
        (Some(path), _) => {
            let mut text = String::new();
            if path.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the token from standard input")?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("--token-file {}", path.display()))?;
            }
            text.lines().next().unwrap_or("").trim().to_string()
        }
        (None, Some(t)) => t.trim().to_string(),
        (None, None) => {
            bail!("the alias's token is needed: set TEMPALIAS_TOKEN, or give --token-file FILE or --token TOKEN")
        }
    };
    if token.is_empty() {
        bail!("the token is empty");
    }
    Ok(token)
}

pub(super) async fn run(
    api: &str,
    json: bool,
    action: AliasCmd,
    local_offset: time::UtcOffset,
) -> anyhow::Result<ExitCode> {
    let base = api_base(api)?;
    let client = reqwest::Client::builder().timeout(TIMEOUT).build()?;
    let (request, what) = match action {
        AliasCmd::Create {
            target,
            days,
            max_usage,
        } => {
            if days.is_none() && max_usage.is_none() {
                bail!("give --days N, --max-usage N or both");
            }
            let mut body = serde_json::json!({ "target": target });
            if let Some(d) = days {
                body["days"] = d.into();
            }
            if let Some(m) = max_usage {
                body["max-usage"] = m.into();
            }
            (
                client.post(format!("{base}/v1/aliases")).json(&body),
                Action::Create,
            )
        }
        AliasCmd::Show { id, token: t } => (
            client
                .get(format!("{base}/v1/aliases/{id}"))
                .bearer_auth(token(t)?),
            Action::Show,
        ),
        AliasCmd::Revoke { id, token: t } => (
            client
                .delete(format!("{base}/v1/aliases/{id}"))
                .bearer_auth(token(t)?),
            Action::Revoke(id),
        ),
    };
    let resp = request.send().await.map_err(|e| {
        let reason = if e.is_timeout() {
            "no answer in time".to_string()
        } else if e.is_connect() {
            "cannot connect; is a node running there? (--api URL or TEMPALIAS_API)".to_string()
        } else {
            e.to_string()
        };
        anyhow::anyhow!("{base}: {reason}")
    })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(b) => format!("{} ({} {})", b.message, status.as_u16(), b.error),
            Err(_) => {
                let snippet: String = text.chars().take(200).collect();
                format!("HTTP {status}: {snippet}")
            }
        };
        eprintln!("{}: {message}", style::error_label());
        return Ok(ExitCode::FAILURE);
    }
    if json {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
            Err(_) if text.is_empty() => println!("{{}}"),
            Err(_) => println!("{text}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    match what {
        Action::Revoke(id) => println!("revoked {id}"),
        Action::Create | Action::Show => {
            let view: AliasView =
                serde_json::from_str(&text).context("the API answered with an unexpected body")?;
            let now = time::OffsetDateTime::now_utc();
            print!("{}", summary(&view, now, local_offset));
            if view.token.is_some() {
                eprintln!(
                    "{}: the token is shown only this once; keep it to show or revoke the alias \
                     (tempalias alias show {} with TEMPALIAS_TOKEN or --token-file)",
                    style::warning_label(),
                    view.id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

enum Action {
    Create,
    Show,
    Revoke(String),
}

/// The summary printed for a created or shown alias.
fn summary(view: &AliasView, now: time::OffsetDateTime, offset: time::UtcOffset) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "alias        {}", view.alias);
    let _ = writeln!(s, "forwards to  {}", view.target);
    let _ = writeln!(s, "state        {}", view.state.replace('_', " "));
    let _ = writeln!(s, "expires      {}", when(&view.valid_until, now, offset));
    let _ = writeln!(s, "uses left    {} of {}", view.remaining, view.max_usage);
    let _ = writeln!(s, "created      {}", when(&view.created_at, now, offset));
    if let Some(t) = &view.token {
        let _ = writeln!(s, "token        {t}");
    }
    s
}

/// An RFC 3339 time in local time, with how far away it is.
fn when(rfc3339: &str, now: time::OffsetDateTime, offset: time::UtcOffset) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute] [offset_hour sign:mandatory]:[offset_minute]"
    );
    let Ok(t) =
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
    else {
        return rfc3339.to_string();
    };
    let local = t.to_offset(offset).format(&fmt).unwrap_or_default();
    let delta = t - now;
    // Rounded to the minute: "in 2 d 0 h", not "in 1 d 23 h" a second later.
    let secs = (delta.whole_seconds().abs() + 30) / 60 * 60;
    let span = if secs >= 86_400 {
        format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600)
    } else if secs >= 3600 {
        format!("{} h {} min", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{} min", secs / 60)
    };
    if delta.is_negative() {
        format!("{local} ({span} ago)")
    } else {
        format!("{local} (in {span})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_without_scheme_means_http() {
        assert_eq!(api_base("127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080");
        assert_eq!(api_base("https://a.example/").unwrap(), "https://a.example");
        assert!(api_base("ftp://a.example").is_err());
    }

    #[test]
    fn summary_shows_local_time_and_uses() {
        let view = AliasView {
            alias: "abcdefghij12@tempalias.test".into(),
            id: "abcdefghij12".into(),
            target: "me@example.net".into(),
            created_at: "2026-11-21T06:21:40Z".into(),
            valid_until: "2026-11-24T06:21:40Z".into(),
            max_usage: 2,
            remaining: 1,
            state: "used_up".into(),
            token: None,
        };
        let now = time::macros::datetime!(2026-11-21 06:21:40 UTC);
        let out = summary(&view, now, time::macros::offset!(+1));
        assert!(
            out.contains("expires      2026-11-24 07:21 +01:00 (in 3 d 0 h)"),
            "{out}"
        );
        assert!(out.contains("uses left    1 of 2"), "{out}");
        assert!(out.contains("state        used up"), "{out}");
        assert!(!out.contains("token"), "{out}");
    }
}
