//! The state-machine logic: what each command does to one alias record.
//!
//! This is deliberately a pure function of (record, command, entry time) so
//! that the redb store only loads and saves records, and every rule
//! about expiry, leases and use counting is tested here without storage.

use super::types::{AliasRecord, Command, Refusal, Response};

/// The outcome of applying one command to the record it names.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Leave the stored record as it is.
    Keep,
    /// Store this record under its id.
    Put(AliasRecord),
    /// Remove the record.
    Delete,
}

/// Applies `cmd` to `current` (the stored record with the id the command names).
///
/// `now_ms` is the entry's replicated time.
pub fn apply(current: Option<&AliasRecord>, cmd: &Command, now_ms: u64) -> (Change, Response) {
    match cmd {
        Command::CreateAlias {
            id,
            domain,
            target,
            token_hash,
            valid_for_ms,
            max_usage,
        } => {
            if let Some(existing) = current {
                // The same request applied again (a retried forward): the
                // token digest is 256 random bits, so equality proves it.
                if existing.token_hash == *token_hash && existing.target == *target {
                    return (Change::Keep, Response::Created(existing.clone()));
                }
                return (Change::Keep, Response::IdTaken);
            }
            let rec = AliasRecord {
                id: id.clone(),
                domain: domain.clone(),
                target: target.clone(),
                token_hash: token_hash.clone(),
                created_ms: now_ms,
                valid_until_ms: now_ms.saturating_add(*valid_for_ms),
                max_usage: *max_usage,
                used: 0,
                reservations: Default::default(),
                committed: Default::default(),
                released: Default::default(),
                revoked: false,
                // Decided by the per-target rules (`targets.rs`) afterwards.
                awaiting_confirmation: false,
            };
            (Change::Put(rec.clone()), Response::Created(rec))
        }
        Command::Reserve {
            lease_ms,
            reservation,
            ..
        } => {
            let Some(rec) = current else {
                return (
                    Change::Keep,
                    Response::Refused {
                        reason: Refusal::Unknown,
                    },
                );
            };
            if rec
                .released
                .get(reservation)
                .is_some_and(|until| *until > now_ms)
            {
                // Applied after its own Release: the node that asked has given
                // up on it, so hold nothing.
                return (
                    Change::Keep,
                    Response::Refused {
                        reason: Refusal::Held,
                    },
                );
            }
            if rec.reservations.contains_key(reservation) || rec.committed.contains(reservation) {
                // A retried Reserve: already holding (or spent) this use.
                return (
                    Change::Keep,
                    Response::Reserved {
                        reservation: *reservation,
                        target: rec.target.clone(),
                    },
                );
            }
            let mut rec = rec.clone();
            // Lapsed leases belong to transactions whose node died: drop them so
            // their uses return to the alias.
            let before = rec.reservations.len() + rec.released.len();
            rec.reservations.retain(|_, until| *until > now_ms);
            rec.released.retain(|_, until| *until > now_ms);
            let pruned = rec.reservations.len() + rec.released.len() != before;
            let refusal = if rec.revoked {
                Some(Refusal::Revoked)
            } else if now_ms >= rec.valid_until_ms {
                Some(Refusal::Expired)
            } else if rec.used >= rec.max_usage {
                Some(Refusal::UsedUp)
            } else if rec.awaiting_confirmation {
                Some(Refusal::Unconfirmed)
            } else if rec.available(now_ms) == 0 {
                Some(Refusal::Held)
            } else {
                None
            };
            if let Some(reason) = refusal {
                let change = if pruned {
                    Change::Put(rec)
                } else {
                    Change::Keep
                };
                return (change, Response::Refused { reason });
            }
            rec.reservations
                .insert(*reservation, now_ms.saturating_add(*lease_ms));
            let target = rec.target.clone();
            (
                Change::Put(rec),
                Response::Reserved {
                    reservation: *reservation,
                    target,
                },
            )
        }
        Command::Commit { reservation, .. } => {
            let Some(rec) = current else {
                return (Change::Keep, Response::NotFound);
            };
            if rec.committed.contains(reservation) {
                // A retried commit: already counted.
                return (Change::Keep, Response::Committed);
            }
            let mut rec = rec.clone();
            // The message was delivered, so the use is spent even if the lease had
            // already lapsed (a very slow upstream): counting it is the safe side.
            rec.reservations.remove(reservation);
            if rec.used < rec.max_usage {
                rec.used += 1;
                rec.committed.insert(*reservation);
            }
            (Change::Put(rec), Response::Committed)
        }
        Command::Release {
            reservation,
            lease_ms,
            ..
        } => {
            let Some(rec) = current else {
                return (Change::Keep, Response::NotFound);
            };
            if rec.committed.contains(reservation) {
                return (Change::Keep, Response::Released);
            }
            let mut rec = rec.clone();
            // Remember the id until its Reserve could no longer hold anything
            // (its lease would have lapsed), whether or not it was applied.
            let until = rec
                .reservations
                .remove(reservation)
                .unwrap_or(0)
                .max(now_ms.saturating_add(*lease_ms));
            rec.released.retain(|_, u| *u > now_ms);
            if until > now_ms {
                rec.released.insert(*reservation, until);
            }
            (Change::Put(rec), Response::Released)
        }
        Command::Revoke { .. } => {
            let Some(rec) = current else {
                return (Change::Keep, Response::NotFound);
            };
            let mut rec = rec.clone();
            rec.revoked = true;
            (Change::Put(rec), Response::Revoked)
        }
        // Applied by the store against their own tables (maintenance flag,
        // idempotency keys, targets); see `store.rs`, `idempotency.rs` and
        // `targets.rs`. The store applies a batch's commands one by one.
        Command::SetMaintenance { .. }
        | Command::CreateAliasKeyed { .. }
        | Command::CreateLimited { .. }
        | Command::ConfirmTarget { .. }
        | Command::WithdrawConfirmation { .. }
        | Command::Batch { .. } => (Change::Keep, Response::None),
        Command::Purge { keep_ms } | Command::PurgeBounded { keep_ms, .. } => {
            let purged = |count| Response::Purged {
                count,
                rows: count,
                more: false,
            };
            match current {
                Some(rec) if rec.purgeable(now_ms, *keep_ms) => (Change::Delete, purged(1)),
                _ => (Change::Keep, purged(0)),
            }
        }
    }
}

/// The alias id a command addresses; `None` for commands over all aliases
/// and for those that address no alias by id (targets, maintenance).
pub fn command_id(cmd: &Command) -> Option<&str> {
    match cmd {
        Command::CreateAlias { id, .. }
        | Command::Reserve { id, .. }
        | Command::Commit { id, .. }
        | Command::Release { id, .. }
        | Command::Revoke { id } => Some(id),
        Command::CreateAliasKeyed { create, .. } | Command::CreateLimited { create, .. } => {
            command_id(create)
        }
        // A batch addresses several aliases; the store splits it first.
        Command::Purge { .. }
        | Command::PurgeBounded { .. }
        | Command::SetMaintenance { .. }
        | Command::ConfirmTarget { .. }
        | Command::WithdrawConfirmation { .. }
        | Command::Batch { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    /// Creates an alias at time 0 that is valid until `valid_until_ms`.
    fn create(max_usage: u32, valid_until_ms: u64) -> AliasRecord {
        let cmd = Command::CreateAlias {
            id: "abcdefghij".into(),
            domain: "t.example".into(),
            target: "me@example.net".into(),
            token_hash: "h".into(),
            valid_for_ms: valid_until_ms,
            max_usage,
        };
        match apply(None, &cmd, 0) {
            (Change::Put(rec), Response::Created(view)) => {
                assert_eq!(rec, view);
                rec
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_liveness_view_of_a_stored_record_decides_as_the_record_does() {
        use crate::raft::types::AliasLiveness;
        let fresh = create(3, 10 * DAY);
        let mut used_up = fresh.clone();
        used_up.used = 3;
        used_up.committed = (1..=3).collect();
        let mut revoked = fresh.clone();
        revoked.revoked = true;
        let mut held = fresh.clone();
        held.reservations.insert(7, 20 * DAY);
        for rec in [fresh, used_up, revoked, held] {
            let view: AliasLiveness =
                serde_json::from_slice(&serde_json::to_vec(&rec).unwrap()).unwrap();
            for now in [0, 10 * DAY - 1, 10 * DAY, 17 * DAY, 20 * DAY, 30 * DAY] {
                assert_eq!(view.is_dead(now), rec.is_dead(now), "{rec:?} at {now}");
                assert_eq!(
                    view.purgeable(now, 7 * DAY),
                    rec.purgeable(now, 7 * DAY),
                    "{rec:?} at {now}"
                );
            }
        }
    }

    /// Reserves with reservation id `index`.
    fn reserve(rec: &AliasRecord, now: u64, index: u64, lease: u64) -> (Change, Response) {
        apply(
            Some(rec),
            &Command::Reserve {
                id: rec.id.clone(),
                lease_ms: lease,
                reservation: index,
            },
            now,
        )
    }

    fn put(change: Change) -> AliasRecord {
        match change {
            Change::Put(r) => r,
            other => panic!("expected a stored record, got {other:?}"),
        }
    }

    #[test]
    fn create_refuses_taken_id() {
        let rec = create(2, DAY);
        let cmd = Command::CreateAlias {
            id: rec.id.clone(),
            domain: "t.example".into(),
            target: "other@example.net".into(),
            token_hash: "x".into(),
            valid_for_ms: DAY,
            max_usage: 1,
        };
        assert_eq!(
            apply(Some(&rec), &cmd, 5),
            (Change::Keep, Response::IdTaken)
        );
    }

    #[test]
    fn reserve_commit_counts_each_use_once() {
        let mut rec = create(2, DAY);
        for i in 0..2u64 {
            let (change, resp) = reserve(&rec, 2000, 10 + i, 60_000);
            assert_eq!(
                resp,
                Response::Reserved {
                    reservation: 10 + i,
                    target: "me@example.net".into()
                }
            );
            rec = put(change);
            let (change, resp) = apply(
                Some(&rec),
                &Command::Commit {
                    id: rec.id.clone(),
                    reservation: 10 + i,
                },
                2001,
            );
            assert_eq!(resp, Response::Committed);
            rec = put(change);
        }
        assert_eq!(rec.used, 2);
        assert_eq!(rec.remaining(), 0);
        assert!(rec.reservations.is_empty());
        let (_, resp) = reserve(&rec, 3000, 30, 60_000);
        assert_eq!(
            resp,
            Response::Refused {
                reason: Refusal::UsedUp
            }
        );
    }

    #[test]
    fn reservations_hold_uses_until_released() {
        let rec = create(1, DAY);
        let rec = put(reserve(&rec, 2000, 5, 60_000).0);
        assert_eq!(rec.available(2000), 0);
        // A second concurrent message cannot take the only use; the refusal
        // says it may clear (SMTP answers 4xx, not 5xx).
        let (_, resp) = reserve(&rec, 2001, 6, 60_000);
        assert_eq!(
            resp,
            Response::Refused {
                reason: Refusal::Held
            }
        );
        // Releasing gives it back; the use is not spent.
        let (change, resp) = apply(
            Some(&rec),
            &Command::Release {
                id: rec.id.clone(),
                reservation: 5,
                lease_ms: 60_000,
            },
            2002,
        );
        assert_eq!(resp, Response::Released);
        let rec = put(change);
        assert_eq!(rec.used, 0);
        assert!(matches!(
            reserve(&rec, 2003, 8, 60_000).1,
            Response::Reserved { .. }
        ));
        // Releasing an unknown reservation holds nothing and says released
        // (its id is remembered, see below).
        let release = Command::Release {
            id: rec.id.clone(),
            reservation: 99,
            lease_ms: 60_000,
        };
        let (change, resp) = apply(Some(&rec), &release, 2004);
        assert_eq!(resp, Response::Released);
        let again = put(change);
        assert_eq!(again.available(2004), rec.available(2004));
        // Releasing it again holds nothing either (it only remembers longer).
        let (change, _) = apply(Some(&again), &release, 2005);
        let twice = put(change);
        assert_eq!(twice.available(2005), rec.available(2005));
        assert_eq!(
            twice.released.keys().collect::<Vec<_>>(),
            again.released.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn reserve_applied_after_its_release_holds_nothing() {
        let rec = create(1, DAY);
        // The taking node gave up on a forwarded Reserve and released it; the
        // late Reserve is applied afterwards.
        let (change, _) = apply(
            Some(&rec),
            &Command::Release {
                id: rec.id.clone(),
                reservation: 7,
                lease_ms: 60_000,
            },
            1000,
        );
        let rec = put(change);
        let (change, resp) = reserve(&rec, 1001, 7, 60_000);
        assert_eq!(
            resp,
            Response::Refused {
                reason: Refusal::Held
            }
        );
        assert_eq!(change, Change::Keep);
        assert_eq!(rec.available(1001), 1, "the use is not held");
        // Another message still gets the use.
        assert!(matches!(
            reserve(&rec, 1002, 8, 60_000).1,
            Response::Reserved { .. }
        ));
        // The remembered id is pruned once its lease would have ended.
        let rec = put(reserve(&rec, 61_001, 9, 60_000).0);
        assert!(rec.released.is_empty(), "{:?}", rec.released);
    }

    #[test]
    fn release_after_commit_changes_nothing() {
        let rec = create(2, DAY);
        let rec = put(reserve(&rec, 1000, 5, 60_000).0);
        let (change, _) = apply(
            Some(&rec),
            &Command::Commit {
                id: rec.id.clone(),
                reservation: 5,
            },
            1001,
        );
        let rec = put(change);
        let (change, resp) = apply(
            Some(&rec),
            &Command::Release {
                id: rec.id.clone(),
                reservation: 5,
                lease_ms: 60_000,
            },
            1002,
        );
        assert_eq!((change, resp), (Change::Keep, Response::Released));
        assert_eq!(rec.used, 1);
    }

    #[test]
    fn lapsed_lease_returns_the_use() {
        let rec = create(1, DAY);
        // Reserved by a node that then died: never committed nor released.
        let rec = put(reserve(&rec, 2000, 5, 60_000).0);
        assert_eq!(
            reserve(&rec, 61_999, 6, 60_000).1,
            Response::Refused {
                reason: Refusal::Held
            }
        );
        let (change, resp) = reserve(&rec, 62_000, 7, 60_000);
        assert!(matches!(resp, Response::Reserved { reservation: 7, .. }));
        let rec = put(change);
        assert_eq!(
            rec.reservations.keys().copied().collect::<Vec<_>>(),
            vec![7]
        );
    }

    #[test]
    fn retried_reserve_holds_one_use() {
        let rec = create(2, DAY);
        let rec = put(reserve(&rec, 2000, 77, 60_000).0);
        let (change, resp) = reserve(&rec, 2001, 77, 60_000);
        assert_eq!(change, Change::Keep);
        assert!(matches!(
            resp,
            Response::Reserved {
                reservation: 77,
                ..
            }
        ));
        assert_eq!(rec.available(2001), 1);
    }

    #[test]
    fn retried_create_returns_the_alias() {
        let rec = create(2, DAY);
        let again = Command::CreateAlias {
            id: rec.id.clone(),
            domain: rec.domain.clone(),
            target: rec.target.clone(),
            token_hash: rec.token_hash.clone(),
            valid_for_ms: DAY,
            max_usage: 2,
        };
        assert_eq!(
            apply(Some(&rec), &again, 5),
            (Change::Keep, Response::Created(rec.clone()))
        );
    }

    #[test]
    fn retried_commit_counts_once() {
        let rec = create(3, DAY);
        let rec = put(reserve(&rec, 2000, 5, 60_000).0);
        let commit = Command::Commit {
            id: rec.id.clone(),
            reservation: 5,
        };
        let rec = put(apply(Some(&rec), &commit, 2001).0);
        assert_eq!(rec.used, 1);
        assert_eq!(
            apply(Some(&rec), &commit, 2002),
            (Change::Keep, Response::Committed)
        );
    }

    #[test]
    fn commit_after_lapsed_lease_still_counts() {
        let rec = create(3, DAY);
        let rec = put(reserve(&rec, 2000, 5, 10).0);
        let (change, _) = apply(
            Some(&rec),
            &Command::Commit {
                id: rec.id.clone(),
                reservation: 5,
            },
            50_000,
        );
        assert_eq!(put(change).used, 1);
    }

    #[test]
    fn expiry_is_decided_by_entry_time() {
        let rec = create(5, 10 * DAY);
        assert!(matches!(
            reserve(&rec, 10 * DAY - 1, 2, 1000).1,
            Response::Reserved { .. }
        ));
        assert_eq!(
            reserve(&rec, 10 * DAY, 3, 1000).1,
            Response::Refused {
                reason: Refusal::Expired
            }
        );
        assert!(rec.is_dead(10 * DAY));
        assert!(!rec.is_dead(10 * DAY - 1));
    }

    #[test]
    fn revoke_disables() {
        let rec = create(5, DAY);
        let (change, resp) = apply(Some(&rec), &Command::Revoke { id: rec.id.clone() }, 3);
        assert_eq!(resp, Response::Revoked);
        let rec = put(change);
        assert_eq!(
            reserve(&rec, 4, 3, 1000).1,
            Response::Refused {
                reason: Refusal::Revoked
            }
        );
    }

    #[test]
    fn purge_deletes_long_expired_aliases_only() {
        let rec = create(5, 10 * DAY);
        let purge = Command::Purge { keep_ms: 7 * DAY };
        assert_eq!(command_id(&purge), None);
        let purged = |count| Response::Purged {
            count,
            rows: count,
            more: false,
        };
        assert_eq!(
            apply(Some(&rec), &purge, 17 * DAY - 1),
            (Change::Keep, purged(0))
        );
        assert_eq!(
            apply(Some(&rec), &purge, 17 * DAY),
            (Change::Delete, purged(1))
        );
        // A live reservation keeps the record until its lease lapses.
        let mut held = rec.clone();
        held.reservations.insert(9, 18 * DAY);
        assert_eq!(
            apply(Some(&held), &purge, 17 * DAY),
            (Change::Keep, purged(0))
        );
    }

    #[test]
    fn an_alias_awaiting_confirmation_holds_nothing() {
        let mut rec = create(2, DAY);
        rec.awaiting_confirmation = true;
        let (change, resp) = reserve(&rec, 10, 1, 60_000);
        assert_eq!(
            resp,
            Response::Refused {
                reason: Refusal::Unconfirmed
            }
        );
        assert_eq!(change, Change::Keep);
        // Permanent refusals come first: they do not clear by confirming.
        assert_eq!(
            reserve(&rec, DAY, 2, 60_000).1,
            Response::Refused {
                reason: Refusal::Expired
            }
        );
        rec.awaiting_confirmation = false;
        assert!(matches!(
            reserve(&rec, 10, 3, 60_000).1,
            Response::Reserved { .. }
        ));
    }

    #[test]
    fn unknown_alias() {
        let cmd = Command::Reserve {
            id: "nope".into(),
            lease_ms: 1,
            reservation: 1,
        };
        assert_eq!(
            apply(None, &cmd, 1),
            (
                Change::Keep,
                Response::Refused {
                    reason: Refusal::Unknown
                }
            )
        );
        for cmd in [
            Command::Commit {
                id: "n".into(),
                reservation: 1,
            },
            Command::Release {
                id: "n".into(),
                reservation: 1,
                lease_ms: 0,
            },
            Command::Revoke { id: "n".into() },
        ] {
            assert_eq!(apply(None, &cmd, 1), (Change::Keep, Response::NotFound));
            assert_eq!(command_id(&cmd), Some("n"));
        }
    }
}
