//! Per-client-address accounting of failed recipients.
//!
//! The per-session cap alone lets a client guess alias ids over many
//! connections; counting by address across sessions (and nodes' worth of
//! tarpit time) makes enumeration slow enough to be pointless.
//!
//! Clients in `[smtp] trusted_networks` (an own relay, a load generator) are
//! exempt from both per-address caps; the per-session limits still apply.
//! The connection count per address is shared with the HTTP listener and
//! lives in [`crate::peer_limits`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::peer_limits::{client_key, ConnectionCounts, ConnectionSlot, TrustedNets};

/// Addresses tracked at most; beyond this, stale windows are dropped first and
/// the table is cleared as a last resort (failing open rather than growing).
const MAX_TRACKED: usize = 65_536;

/// Failed-RCPT counters per client address over a sliding window.
pub struct FailedRcpts {
    max: u32,
    window: Duration,
    /// Clients never blocked (nor counted).
    trusted: TrustedNets,
    /// Address -> (window start, failures in window). A std mutex: it is never
    /// held across an await.
    counts: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailedRcpts {
    pub fn new(max: u32, window: Duration, trusted: TrustedNets) -> Self {
        Self {
            max,
            window,
            trusted,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// True when `ip` has used up its failures for the current window.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        if self.trusted.contains(ip) {
            return false;
        }
        let ip = client_key(ip);
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= self.max)
    }

    /// Counts one failed recipient for `ip`.
    pub fn record(&self, ip: IpAddr) {
        if self.trusted.contains(ip) {
            return;
        }
        let ip = client_key(ip);
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
        let f = FailedRcpts::new(3, Duration::from_secs(60), TrustedNets::default());
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
        let f = FailedRcpts::new(1, Duration::from_millis(1), TrustedNets::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        f.record(ip);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!f.is_blocked(ip));
        f.record(ip);
        // The stale window was restarted: one failure, not two.
        assert_eq!(f.counts.lock().unwrap()[&ip].1, 1);
    }

    fn trusted(cidrs: &[&str]) -> TrustedNets {
        TrustedNets::new(cidrs.iter().map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn trusted_networks_are_never_blocked_for_failures() {
        let f = FailedRcpts::new(1, Duration::from_secs(60), trusted(&["10.0.0.0/8"]));
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            f.record(inside);
            f.record(outside);
        }
        assert!(!f.is_blocked(inside));
        assert!(f.is_blocked(outside));
    }
}
