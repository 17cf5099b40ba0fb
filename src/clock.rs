//! The wall clock that a leader stamps into Raft entries.
//!
//! Expiry and lease decisions are made by the state machine from the time carried
//! in each entry, never from the applying node's clock, so every replica reaches
//! the same state. This module is the only place that reads the system time for
//! that purpose, which also gives tests one seam to move time forward.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// Environment variable naming a file whose content (a signed number of seconds)
/// is added to the system time. Meant for tests that need an alias to expire
/// without waiting for days; never set it in production.
pub const TEST_CLOCK_OFFSET_FILE_ENV: &str = "TEMPALIAS_TEST_CLOCK_OFFSET_FILE";

/// Source of "now" in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock, optionally shifted by the offset file used in tests.
#[derive(Debug, Clone, Default)]
pub struct SystemClock {
    /// Read on every call when set, so a test can move time while a node runs.
    offset_file: Option<PathBuf>,
}

impl SystemClock {
    /// The clock for a running node: honours [`TEST_CLOCK_OFFSET_FILE_ENV`].
    pub fn from_env() -> Self {
        Self {
            offset_file: std::env::var_os(TEST_CLOCK_OFFSET_FILE_ENV).map(PathBuf::from),
        }
    }

    fn offset_ms(&self) -> i64 {
        let Some(path) = &self.offset_file else {
            return 0;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(|secs| (secs * 1000.0) as i64)
            .unwrap_or(0)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (real + self.offset_ms()).max(0) as u64
    }
}

/// Formats epoch milliseconds as RFC 3339 UTC (`2026-01-02T03:04:05Z`).
pub fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Formats epoch milliseconds as an RFC 5322 date for `Received:` headers.
pub fn rfc5322(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_file_moves_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offset");
        let clock = SystemClock {
            offset_file: Some(path.clone()),
        };
        let before = clock.now_ms();
        std::fs::write(&path, "86400").unwrap();
        let after = clock.now_ms();
        assert!(after >= before + 86_400_000, "{before} -> {after}");
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
