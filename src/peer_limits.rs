//! Open connections per client address, shared by the SMTP and HTTP
//! listeners.
//!
//! A global connection cap alone lets one client take every slot: an address
//! that opens thousands of idle connections locks everyone else out. Counting
//! by address caps each client at a share of the listener. Clients are counted
//! by IPv4 address or IPv6 /64 (one host can rotate through a whole /64), the
//! same unit as the HTTP rate limiter uses.
//!
//! Some peers legitimately stand for many clients (an own relay, a reverse
//! proxy): they are listed as trusted networks and never counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Networks exempt from per-address caps (`[smtp] trusted_networks`,
/// `[http] trusted_proxies`).
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
///
/// An entry exists only while a slot of its client is held, and is removed
/// when the last one is dropped, so the table never holds more entries than
/// there are open connections: the listener's global cap bounds it.
pub struct ConnectionCounts {
    /// Connections one client may hold; 0 turns the cap off.
    max: usize,
    /// Clients that are not counted at all.
    trusted: TrustedNets,
    /// A std mutex: it is held for a map operation, never across an await.
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Holds one connection slot of a client; gives it back when dropped. A
/// trusted client's slot counts nothing.
pub struct ConnectionSlot<'a> {
    owner: &'a ConnectionCounts,
    key: Option<IpAddr>,
}

/// A [`ConnectionSlot`] that owns its table, for a connection served by a
/// task of its own.
pub struct OwnedConnectionSlot {
    owner: Arc<ConnectionCounts>,
    key: Option<IpAddr>,
}

impl ConnectionCounts {
    /// `max` connections per client (0: no cap), `trusted` never counted.
    pub fn new(max: usize, trusted: TrustedNets) -> Self {
        Self {
            max,
            trusted,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `ip`, or `None` when it already has `max` connections.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnectionSlot<'_>> {
        let key = self.take(ip)?;
        Some(ConnectionSlot { owner: self, key })
    }

    /// As [`acquire`](Self::acquire), for a slot that outlives the borrow.
    pub fn acquire_owned(self: &Arc<Self>, ip: IpAddr) -> Option<OwnedConnectionSlot> {
        let key = self.take(ip)?;
        Some(OwnedConnectionSlot {
            owner: self.clone(),
            key,
        })
    }

    /// Clients counted now (for tests and diagnostics).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one connection of `ip`: `Some(key)` to give back later
    /// (`Some(None)`: nothing counted), `None` when the client is at its cap.
    fn take(&self, ip: IpAddr) -> Option<Option<IpAddr>> {
        if self.max == 0 || self.trusted.contains(ip) {
            return Some(None);
        }
        let key = client_key(ip);
        let mut counts = self.lock();
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Some(key))
    }

    fn give_back(&self, key: Option<IpAddr>) {
        let Some(key) = key else { return };
        let mut counts = self.lock();
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

impl Drop for ConnectionSlot<'_> {
    fn drop(&mut self) {
        self.owner.give_back(self.key);
    }
}

impl Drop for OwnedConnectionSlot {
    fn drop(&mut self) {
        self.owner.give_back(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(cidrs: &[&str]) -> TrustedNets {
        TrustedNets::new(cidrs.iter().map(|c| c.parse().unwrap()).collect())
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
    fn owned_slots_free_their_entry_at_zero() {
        let c = Arc::new(ConnectionCounts::new(2, TrustedNets::default()));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::2".parse().unwrap();
        let s1 = c.acquire_owned(a).unwrap();
        let s2 = c.acquire_owned(b).unwrap();
        // Same /64: the third is refused.
        assert!(c
            .acquire_owned("2001:db8:1:2::3".parse().unwrap())
            .is_none());
        assert_eq!(c.tracked(), 1);
        drop(s1);
        assert_eq!(c.tracked(), 1);
        drop(s2);
        assert_eq!(c.tracked(), 0);
        // A slot moved into a task and dropped there gives back as well.
        let s = c.acquire_owned(a).unwrap();
        std::thread::spawn(move || drop(s)).join().unwrap();
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn zero_turns_the_cap_off_and_tracks_nothing() {
        let c = Arc::new(ConnectionCounts::new(0, TrustedNets::default()));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| c.acquire_owned(ip).unwrap()).collect();
        assert_eq!(c.tracked(), 0);
        drop(slots);
    }

    #[test]
    fn trusted_networks_are_not_capped() {
        let c = ConnectionCounts::new(1, trusted(&["127.0.0.0/8", "2001:db8::/32"]));
        let local: IpAddr = "127.0.0.5".parse().unwrap();
        let slots: Vec<_> = (0..50).map(|_| c.acquire(local).unwrap()).collect();
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        assert!(c.acquire(mapped).is_some());
        assert!(c.acquire("2001:db8::1".parse().unwrap()).is_some());
        assert_eq!(c.tracked(), 0);
        drop(slots);
        // Others are still capped.
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let _held = c.acquire(other).unwrap();
        assert!(c.acquire(other).is_none());
    }
}
