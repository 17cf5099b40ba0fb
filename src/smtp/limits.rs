//! Per-client-address accounting of failed recipients.
//!
//! The per-session cap alone lets a client guess alias ids over many
//! connections; counting by address across sessions (and nodes' worth of
//! tarpit time) makes enumeration slow enough to be pointless.
//!
//! Clients in `[smtp] trusted_networks` (an own relay, a load generator) are
//! exempt from both per-address caps; the per-session limits still apply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Networks exempt from the per-address caps (`[smtp] trusted_networks`).
#[derive(Debug, Clone, Default)]
pub struct TrustedNets(Arc<Vec<ipnet::IpNet>>);

impl TrustedNets {
    pub fn new(nets: Vec<ipnet::IpNet>) -> Self {
        Self(Arc::new(nets))
    }

    /// True when `ip` (an IPv4-mapped IPv6 address counts as IPv4) lies in
    /// one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

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
    /// Clients that are not counted at all.
    trusted: TrustedNets,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot of a client; gives it back when dropped. A
/// trusted client's slot counts nothing.
pub struct ConnectionSlot<'a> {
    owner: &'a ConnectionCounts,
    key: Option<IpAddr>,
}

impl ConnectionCounts {
    pub fn new(max: usize, trusted: TrustedNets) -> Self {
        Self {
            max,
            trusted,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `ip`, or `None` when it already has `max` connections.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnectionSlot<'_>> {
        if self.trusted.contains(ip) {
            return Some(ConnectionSlot {
                owner: self,
                key: None,
            });
        }
        let key = client_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            owner: self,
            key: Some(key),
        })
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut counts = self.owner.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
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
        let c = ConnectionCounts::new(2, TrustedNets::default());
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
    fn trusted_networks_are_not_capped() {
        let c = ConnectionCounts::new(1, trusted(&["127.0.0.0/8", "2001:db8::/32"]));
        let local: IpAddr = "127.0.0.5".parse().unwrap();
        let slots: Vec<_> = (0..50).map(|_| c.acquire(local).unwrap()).collect();
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        assert!(c.acquire(mapped).is_some());
        assert!(c.acquire("2001:db8::1".parse().unwrap()).is_some());
        assert!(c.counts.lock().unwrap().is_empty());
        drop(slots);
        // Others are still capped.
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let _held = c.acquire(other).unwrap();
        assert!(c.acquire(other).is_none());
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
