//! Per-client-address accounting of failed recipients.
//!
//! The per-session cap alone lets a client guess alias ids over many
//! connections; counting by address across sessions (and nodes' worth of
//! tarpit time) makes enumeration slow enough to be pointless.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; beyond this, stale windows are dropped first and
/// the table is cleared as a last resort (failing open rather than growing).
const MAX_TRACKED: usize = 65_536;

/// Failed-RCPT counters per client address over a sliding window.
pub struct FailedRcpts {
    max: u32,
    window: Duration,
    /// Address -> (window start, failures in window). A std mutex: it is never
    /// held across an await.
    counts: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailedRcpts {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// True when `ip` has used up its failures for the current window.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= self.max)
    }

    /// Counts one failed recipient for `ip`.
    pub fn record(&self, ip: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_TRACKED && !counts.contains_key(&ip) {
            let window = self.window;
            counts.retain(|_, (start, _)| start.elapsed() < window);
            if counts.len() >= MAX_TRACKED {
                counts.clear();
            }
        }
        let entry = counts.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_within_window() {
        let f = FailedRcpts::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            f.record(ip);
        }
        assert!(!f.is_blocked(ip));
        f.record(ip);
        assert!(f.is_blocked(ip));
        assert!(!f.is_blocked(other));
    }

    #[test]
    fn window_expires() {
        let f = FailedRcpts::new(1, Duration::from_millis(1));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        f.record(ip);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!f.is_blocked(ip));
        f.record(ip);
        // The stale window was restarted: one failure, not two.
        assert_eq!(f.counts.lock().unwrap()[&ip].1, 1);
    }
}
