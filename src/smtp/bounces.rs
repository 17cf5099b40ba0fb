//! A cap on bounces reversed per SRS address.
//!
//! An SRS address is a return path for the mail forwarded with it: a real
//! bounce arrives once per failed delivery, so a handful at most. Without a
//! cap, anyone who forwarded one message through their own alias with a
//! victim's address as the sender could then send that victim any number of
//! null-sender "bounces" through this node, signed with the alias domain, for
//! `srs.max_age_days`. With it, each forwarded message buys at most
//! `srs.max_bounces_per_address` messages to its sender per node and window.
//!
//! Counted per node and in memory (like the per-address SMTP limits), in a
//! table bounded in size whatever the number of addresses.

use std::time::Duration;

use crate::window_counts::WindowCounts;

/// Most addresses tracked at once; when full, expired entries are dropped
/// first, and a new address is refused while none has expired (the table
/// never grows past this, whatever a client sends).
const MAX_TRACKED: usize = 100_000;

/// How long the bounces to one address are counted.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Bounces accepted per SRS address within [`WINDOW`].
pub struct BounceCounts {
    /// `None`: no cap (`srs.max_bounces_per_address = 0`).
    counts: Option<WindowCounts>,
}

impl BounceCounts {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            counts: (max > 0).then(|| WindowCounts::new(max, window, MAX_TRACKED)),
        }
    }

    /// Counts one bounce to `address` (an SRS address, any case); `false`
    /// when the address has had its share within the window.
    pub fn allow(&self, address: &str) -> bool {
        self.counts
            .as_ref()
            .is_none_or(|c| c.allow(&address.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_share_then_is_refused_case_insensitively() {
        let b = BounceCounts::new(2, WINDOW);
        assert!(b.allow("SRS0=abcdef=TT=example.org=a@tempalias.test"));
        assert!(b.allow("srs0=ABCDEF=tt=example.org=a@tempalias.test"));
        assert!(!b.allow("SRS0=abcdef=TT=example.org=a@tempalias.test"));
        assert!(b.allow("SRS0=abcdef=TT=example.org=b@tempalias.test"));
    }

    #[test]
    fn the_window_resets_the_count() {
        let b = BounceCounts::new(1, Duration::from_millis(0));
        assert!(b.allow("x@tempalias.test"));
        assert!(b.allow("x@tempalias.test"), "a zero window never refuses");
        let b = BounceCounts::new(1, WINDOW);
        assert!(b.allow("x@tempalias.test"));
        assert!(!b.allow("x@tempalias.test"));
    }

    #[test]
    fn zero_means_no_cap() {
        let b = BounceCounts::new(0, WINDOW);
        assert!((0..100).all(|_| b.allow("x@tempalias.test")));
    }
}
