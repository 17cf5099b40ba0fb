//! Per-client-address accounting of failed recipients.
//!
//! The per-session cap alone lets a client guess alias ids over many
//! connections; counting by address across sessions (and nodes' worth of
//! tarpit time) makes enumeration slow enough to be pointless.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The unit a client is counted by: its IPv4 address, or its IPv6 /64 (one
/// host can have a whole /64 to rotate through).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Open connections per client, so one client cannot take every slot.
pub struct ConnectionCounts {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot of a client; gives it back when dropped.
pub struct ConnectionSlot<'a> {
    owner: &'a ConnectionCounts,
    key: IpAddr,
}

impl ConnectionCounts {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `ip`, or `None` when it already has `max` connections.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnectionSlot<'_>> {
        let key = client_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot { owner: self, key })
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

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
        let ip = client_key(ip);
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&ip)
            .is_some_and(|(start, n)| start.elapsed() < self.window && *n >= self.max)
    }

    /// Counts one failed recipient for `ip`.
    pub fn record(&self, ip: IpAddr) {
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
    fn ipv6_counts_by_slash_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn connection_slots_are_capped_and_returned() {
        let c = ConnectionCounts::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = c.acquire(ip).unwrap();
        let _s2 = c.acquire(ip).unwrap();
        assert!(c.acquire(ip).is_none());
        assert!(c.acquire("192.0.2.2".parse().unwrap()).is_some());
        drop(s1);
        assert!(c.acquire(ip).is_some());
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
