//! Events per key within a time window, in a table bounded in size whatever
//! the keys: the bounce cap per SRS address (`smtp::bounces`) and the
//! once-an-hour log line per host whose `STARTTLS` refusal sends mail in
//! plaintext (`relay::client`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` events per key within `window`, counted from the key's
/// first event of the window.
pub struct WindowCounts {
    max: u32,
    window: Duration,
    /// Keys tracked at most; when full, expired entries are dropped first,
    /// and a new key is refused while none has expired (the table never
    /// grows past this, whatever the keys).
    capacity: usize,
    /// Key -> (events in the window, its start). A std mutex: never held
    /// across an await.
    counts: Mutex<HashMap<String, (u32, Instant)>>,
}

impl WindowCounts {
    pub fn new(max: u32, window: Duration, capacity: usize) -> Self {
        Self {
            max,
            window,
            capacity,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one event for `key` now; `false` when the key has had its
    /// `max` within the window (or the table is full of live keys).
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    /// [`WindowCounts::allow`] at `now`.
    pub fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, since)) = counts.get_mut(key) {
            if now.saturating_duration_since(*since) >= self.window {
                *n = 0;
                *since = now;
            }
            if *n >= self.max {
                return false;
            }
            *n += 1;
            return true;
        }
        if counts.len() >= self.capacity {
            let window = self.window;
            counts.retain(|_, (_, since)| now.saturating_duration_since(*since) < window);
            if counts.len() >= self.capacity {
                return false;
            }
        }
        counts.insert(key.to_string(), (1, now));
        true
    }

    /// Keys tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_period_lets_one_line_through_per_key() {
        let throttle = WindowCounts::new(1, Duration::from_secs(60), 1024);
        let t0 = Instant::now();
        assert!(throttle.allow_at("mx1", t0));
        assert!(!throttle.allow_at("mx1", t0 + Duration::from_secs(59)));
        assert!(throttle.allow_at("mx2", t0 + Duration::from_secs(1)));
        assert!(throttle.allow_at("mx1", t0 + Duration::from_secs(60)));
        assert!(!throttle.allow_at("mx1", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let throttle = WindowCounts::new(1, Duration::from_secs(60), 1024);
        let t0 = Instant::now();
        for i in 0..1024 * 3 {
            throttle.allow_at(&format!("mx{i}"), t0);
        }
        let held = throttle.tracked();
        assert!(held <= 1024, "{held}");
    }
}
