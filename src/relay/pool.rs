//! Idle connections to one smarthost, kept for the next message (Postfix's
//! connection cache).
//!
//! The pool holds connections only while nobody uses them. A send takes one
//! out and owns it (dropping the send closes it); only the code that read
//! the final reply of a complete transaction puts it back (see
//! [`super::client::send`]). So a connection in the pool never has a reply
//! on its way, and a send cut off by a timeout cannot hand the next message
//! a connection in the middle of its transaction: it no longer has one to
//! hand back.
//!
//! Expiry needs no timer per connection: age and idle time are checked when
//! a connection is taken, and one sweeper task per pool, running only while
//! the pool holds connections, closes those that waited too long.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::client::{ConnKey, Session};
use crate::metrics::{Metrics, UpstreamLabels};

/// The bounds of one pool: its smarthost entry's `reuse_*` keys, else
/// the relay-wide `relay.reuse_*` ones.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// False: every connection is closed after its message.
    pub enabled: bool,
    /// Most idle connections kept.
    pub max_idle: usize,
    /// Longest a connection waits idle before it is closed.
    pub idle: Duration,
    /// Messages one connection carries at most.
    pub max_messages: u32,
    /// Age (from connecting) after which a connection is not used again.
    pub max_age: Duration,
}

/// The idle connections of one smarthost.
pub struct Pool {
    /// What every connection in it was made under (see [`ConnKey`]).
    key: ConnKey,
    settings: PoolSettings,
    /// The smarthost's metric label.
    label: UpstreamLabels,
    metrics: Arc<Metrics>,
    /// A std mutex: held for a push or a pop, never across an `.await`.
    inner: Mutex<Inner>,
    /// Handed to the sweeper, so that it ends when the pool is dropped.
    this: Weak<Pool>,
}

struct Inner {
    /// Oldest first: taken from the back (the most recently used, so that
    /// spare connections age and go when the load drops), swept from the
    /// front.
    idle: VecDeque<Idle>,
    /// Whether a sweeper task runs.
    sweeping: bool,
    /// Set at shutdown: nothing is kept any more.
    closed: bool,
    /// What this pool added to the `relay_idle` gauge: two smarthost
    /// entries for one host and port (other accounts) share its label, so
    /// each pool adds its changes instead of setting the value.
    shown: i64,
}

struct Idle {
    session: Session,
    since: Instant,
}

impl Pool {
    pub fn new(
        key: ConnKey,
        settings: PoolSettings,
        label: &str,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let label = UpstreamLabels {
            upstream: label.to_string(),
        };
        for family in [
            &metrics.relay_connections,
            &metrics.relay_reused,
            &metrics.relay_stale,
        ] {
            let _ = family.get_or_create(&label);
        }
        let _ = metrics.relay_idle.get_or_create(&label);
        Arc::new_cyclic(|this| Self {
            key,
            settings,
            label,
            metrics,
            inner: Mutex::new(Inner {
                idle: VecDeque::new(),
                sweeping: false,
                closed: false,
                shown: 0,
            }),
            this: this.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change is one push or pop: a panic cannot leave it torn.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `session` may still be used at `now`, idle since `since`.
    fn fresh(&self, session: &Session, since: Instant, now: Instant) -> bool {
        now.duration_since(since) < self.settings.idle
            && now.duration_since(session.opened()) < self.settings.max_age
    }

    /// An idle connection to use, if one is fit: not expired, and neither
    /// closed by the upstream nor with anything to read. Expired ones are
    /// closed with `QUIT`, dead ones dropped (counted as stale).
    pub fn take(&self) -> Option<Session> {
        let now = Instant::now();
        loop {
            let Idle { session, since } = {
                let mut inner = self.lock();
                let idle = inner.idle.pop_back();
                self.show(&mut inner);
                idle?
            };
            if !self.fresh(&session, since, now) {
                session.quit_in_background();
            } else if !session.quiet() {
                self.count_stale();
            } else {
                return Some(session);
            }
        }
    }

    /// Whether connections are kept at all (`relay.reuse_connections`).
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Takes back a connection after a complete transaction, or closes it
    /// when reuse is off, it is spent or old, it was made under other
    /// settings, or the node is shutting down.
    pub fn put(&self, session: Session) {
        let now = Instant::now();
        if !self.settings.enabled
            || session.key() != self.key
            || session.messages() >= self.settings.max_messages
            || now.duration_since(session.opened()) >= self.settings.max_age
        {
            session.quit_in_background();
            return;
        }
        let (evicted, sweep) = {
            let mut inner = self.lock();
            if inner.closed {
                drop(inner);
                session.quit_in_background();
                return;
            }
            let evicted = if inner.idle.len() >= self.settings.max_idle {
                inner.idle.pop_front()
            } else {
                None
            };
            inner.idle.push_back(Idle {
                session,
                since: now,
            });
            let sweep = !inner.sweeping;
            inner.sweeping = true;
            self.show(&mut inner);
            (evicted, sweep)
        };
        if let Some(old) = evicted {
            old.session.quit_in_background();
        }
        if sweep {
            tokio::spawn(sweeper(self.this.clone()));
        }
    }

    /// Closes every idle connection with `QUIT` (waiting up to `limit` for
    /// their answers together) and keeps none from now on.
    pub async fn close(&self, limit: Duration) {
        let idle: Vec<Idle> = {
            let mut inner = self.lock();
            inner.closed = true;
            let idle = inner.idle.drain(..).collect();
            self.show(&mut inner);
            idle
        };
        let mut quits = tokio::task::JoinSet::new();
        for Idle { session, .. } in idle {
            quits.spawn(session.quit(limit));
        }
        while quits.join_next().await.is_some() {}
    }

    /// Closes the connections that have waited or lived too long; the time
    /// the next one will have, if any is left.
    fn sweep(&self) -> Option<Instant> {
        let now = Instant::now();
        let (expired, next) = {
            let mut inner = self.lock();
            let (keep, expired): (VecDeque<Idle>, VecDeque<Idle>) = inner
                .idle
                .drain(..)
                .partition(|i| self.fresh(&i.session, i.since, now));
            inner.idle = keep;
            let next = inner
                .idle
                .iter()
                .map(|i| {
                    (i.since + self.settings.idle).min(i.session.opened() + self.settings.max_age)
                })
                .min();
            if next.is_none() {
                inner.sweeping = false;
            }
            self.show(&mut inner);
            (expired, next)
        };
        for i in expired {
            i.session.quit_in_background();
        }
        next
    }

    /// Brings this pool's share of the `relay_idle` gauge up to date.
    fn show(&self, inner: &mut Inner) {
        let now = inner.idle.len() as i64;
        self.metrics
            .relay_idle
            .get_or_create(&self.label)
            .inc_by(now - inner.shown);
        inner.shown = now;
    }

    /// A connection was opened (whether or not it will be kept).
    pub fn count_opened(&self) {
        self.metrics
            .relay_connections
            .get_or_create(&self.label)
            .inc();
    }

    /// A message was accepted over a connection taken from the pool.
    pub fn count_reused(&self) {
        self.metrics.relay_reused.get_or_create(&self.label).inc();
    }

    /// An idle connection was found closed by the upstream.
    pub fn count_stale(&self) {
        self.metrics.relay_stale.get_or_create(&self.label).inc();
    }
}

/// Closes a pool's idle connections as they expire; ends when the pool is
/// empty (the next [`Pool::put`] starts another) or dropped.
async fn sweeper(pool: Weak<Pool>) {
    loop {
        let Some(next) = pool.upgrade().and_then(|p| p.sweep()) else {
            return;
        };
        // A little after the first expiry, so that one wake-up catches it
        // and those that follow closely.
        tokio::time::sleep_until(next + Duration::from_millis(10)).await;
    }
}
