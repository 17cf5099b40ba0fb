//! A circuit breaker per smarthost, and the backoff between rounds.
//!
//! Without a breaker, every message pays a full connect timeout to a dead
//! smarthost before it fails over. With one, after `threshold` consecutive
//! failed attempts the smarthost is skipped outright (costing nothing) until a
//! cool-down has passed; then exactly one message probes it (half-open) while
//! the others keep skipping. The probe's outcome closes or re-opens it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What the metrics gauge shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// One smarthost's breaker. The state sits behind a std mutex that is never
/// held across an `.await`: every method is a short synchronous update.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

/// Leave to try the smarthost once. Dropped without [`Breaker::record`] (the
/// delivery was cancelled mid-attempt), a probe hands the probe slot back, so
/// a cancelled send can never leave the breaker half-open with nobody probing.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it cannot leave a half-written state (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit to try now, or `None` to skip this smarthost.
    pub fn try_acquire(&self, now: Instant) -> Option<Permit<'_>> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } | State::HalfOpen { probing: true } => return None,
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
        };
        Some(Permit {
            breaker: self,
            probe,
            recorded: false,
        })
    }

    /// Whether [`Breaker::try_acquire`] would give a permit now (without
    /// taking it), so a round is not waited for when nothing could be tried.
    pub fn would_allow(&self, now: Instant) -> bool {
        match *self.lock() {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// Records the outcome of an attempt. `failed` means the smarthost gave no
    /// usable answer (connect, TLS, AUTH, timeout, lost connection); a reply,
    /// even a refusal, shows it alive. Returns true when this opened the breaker.
    pub fn record(&self, mut permit: Permit<'_>, failed: bool, now: Instant) -> bool {
        permit.recorded = true;
        let mut state = self.lock();
        let open = State::Open {
            until: now + self.cooldown,
        };
        match (*state, failed) {
            (_, false) => {
                *state = State::Closed { failures: 0 };
                false
            }
            (State::HalfOpen { .. }, true) => {
                *state = open;
                true
            }
            (State::Closed { failures }, true) => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    *state = open;
                    true
                } else {
                    *state = State::Closed { failures };
                    false
                }
            }
            // Another message's attempt opened it meanwhile.
            (State::Open { .. }, true) => false,
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.lock();
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
        }
    }
}

/// Full jitter (the AWS Architecture Blog's "Exponential Backoff And Jitter"):
/// a uniformly random pause in `[0, min(cap, base * 2^round)]`, so messages
/// that failed together do not come back together.
pub fn full_jitter(round: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = base
        .saturating_mul(2u32.saturating_pow(round.min(20)))
        .min(cap);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_half_opens_after_cooldown() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            let p = b.try_acquire(t0).unwrap();
            assert!(!b.record(p, true, t0));
        }
        // A success in between resets the count.
        let p = b.try_acquire(t0).unwrap();
        b.record(p, false, t0);
        for _ in 0..2 {
            let p = b.try_acquire(t0).unwrap();
            assert!(!b.record(p, true, t0));
        }
        let p = b.try_acquire(t0).unwrap();
        assert!(b.record(p, true, t0), "third consecutive failure opens it");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.would_allow(t0 + Duration::from_secs(9)));
        assert!(b.try_acquire(t0 + Duration::from_secs(9)).is_none());
        assert!(b.would_allow(t0 + Duration::from_secs(10)));

        // After the cool-down exactly one probe goes through.
        let t1 = t0 + Duration::from_secs(10);
        let probe = b.try_acquire(t1).unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(t1).is_none(), "only one probe at a time");
        assert!(b.record(probe, true, t1), "a failed probe re-opens");
        assert!(b.try_acquire(t1 + Duration::from_secs(5)).is_none());
        let t2 = t1 + Duration::from_secs(10);
        let probe = b.try_acquire(t2).unwrap();
        b.record(probe, false, t2);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire(t2).is_some());
    }

    #[test]
    fn a_cancelled_probe_gives_the_slot_back() {
        let b = Breaker::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        let p = b.try_acquire(t0).unwrap();
        b.record(p, true, t0);
        let t1 = t0 + Duration::from_secs(1);
        let probe = b.try_acquire(t1).unwrap();
        drop(probe); // the delivery future was dropped mid-attempt
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(t1).is_some(), "the next message may probe");
    }

    #[test]
    fn jitter_stays_under_the_capped_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(1000);
        let mut seen_nonzero = false;
        for round in 0..40 {
            let d = full_jitter(round, base, cap);
            let ceiling = (base * 2u32.pow(round.min(20))).min(cap);
            assert!(d <= ceiling, "round {round}: {d:?} > {ceiling:?}");
            seen_nonzero |= d > Duration::ZERO;
        }
        assert!(seen_nonzero);
    }
}
