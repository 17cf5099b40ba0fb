//! Idempotent creates: what a [`Command::CreateAliasKeyed`] does, as a pure
//! function of the stored key, the aliases it may name and the entry time.
//!
//! The key is claimed in the same entry that creates the alias, so two
//! concurrent requests with one key (to the same node or two) are ordered by
//! the log: the first creates and claims, the second finds the claim and gets
//! the first one's alias. No node ever holds a "claimed but not yet created"
//! state that a crash could strand.

use super::state::{self, Change};
use super::types::{AliasRecord, Command, IdempotencyRecord, Response, IDEMPOTENCY_KEY_TTL_MS};

/// True once a claimed key is forgotten: a later request with it is new.
pub fn expired(rec: &IdempotencyRecord, now_ms: u64) -> bool {
    now_ms >= rec.claimed_ms.saturating_add(IDEMPOTENCY_KEY_TTL_MS)
}

/// The replicated time from which a claim is [`expired`] (and the purge
/// forgets it): the time its row is indexed by (`expiry.rs`).
pub fn expires_at(rec: &IdempotencyRecord) -> u64 {
    rec.claimed_ms.saturating_add(IDEMPOTENCY_KEY_TTL_MS)
}

/// What applying a keyed create changes.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// A new claim to store under the key (only when an alias was created).
    pub claim: Option<IdempotencyRecord>,
    /// The change to the alias named by the create command.
    pub change: Change,
    pub response: Response,
}

/// Applies a keyed create.
///
/// - `key`: the stored claim of this key, if any;
/// - `claimed_alias`: the alias that claim names, if it still exists;
/// - `current`: the stored alias under the id the create command chose;
/// - `fingerprint`: the request's fingerprint; `create`: the inner
///   [`Command::CreateAlias`].
pub fn apply(
    key: Option<&IdempotencyRecord>,
    claimed_alias: Option<&AliasRecord>,
    current: Option<&AliasRecord>,
    fingerprint: &str,
    create: &Command,
    now_ms: u64,
) -> Outcome {
    let Command::CreateAlias { id, .. } = create else {
        return Outcome {
            claim: None,
            change: Change::Keep,
            response: Response::None,
        };
    };
    if let Some(claim) = key.filter(|k| !expired(k, now_ms)) {
        if claim.fingerprint != fingerprint {
            return Outcome {
                claim: None,
                change: Change::Keep,
                response: Response::KeyReused,
            };
        }
        // The same entry applied again (a forward retried after an unknown
        // outcome) is not a replay: fall through so the create answers
        // `Created` for its own id, as an unkeyed retried create does.
        if claim.alias_id != *id {
            if let Some(rec) = claimed_alias {
                return Outcome {
                    claim: None,
                    change: Change::Keep,
                    response: Response::Replayed(rec.clone()),
                };
            }
            // The alias is gone (purged): the key no longer protects
            // anything, so the request counts as new.
        }
    }
    let (change, response) = state::apply(current, create, now_ms);
    let claim = match &response {
        Response::Created(rec) => Some(IdempotencyRecord {
            alias_id: rec.id.clone(),
            fingerprint: fingerprint.to_string(),
            claimed_ms: now_ms,
        }),
        _ => None,
    };
    Outcome {
        claim,
        change,
        response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(id: &str, token_hash: &str) -> Command {
        Command::CreateAlias {
            id: id.into(),
            domain: "t.example".into(),
            target: "me@example.net".into(),
            token_hash: token_hash.into(),
            valid_for_ms: 86_400_000,
            max_usage: 3,
        }
    }

    fn created(o: &Outcome) -> AliasRecord {
        match (&o.change, &o.response) {
            (Change::Put(rec), Response::Created(view)) => {
                assert_eq!(rec, view);
                rec.clone()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_request_creates_and_claims() {
        let o = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&o);
        assert_eq!(
            o.claim,
            Some(IdempotencyRecord {
                alias_id: rec.id.clone(),
                fingerprint: "fp".into(),
                claimed_ms: 1000
            })
        );
    }

    #[test]
    fn replay_with_another_id_answers_the_first_alias() {
        let first = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&first);
        let claim = first.claim.unwrap();
        let o = apply(
            Some(&claim),
            Some(&rec),
            None,
            "fp",
            &create("bbbbbbbbbb", "h2"),
            5000,
        );
        assert_eq!(o.change, Change::Keep);
        assert_eq!(o.claim, None);
        assert_eq!(o.response, Response::Replayed(rec));
    }

    #[test]
    fn same_key_different_body_is_refused() {
        let first = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&first);
        let claim = first.claim.unwrap();
        let o = apply(
            Some(&claim),
            Some(&rec),
            None,
            "other",
            &create("bbbbbbbbbb", "h2"),
            5000,
        );
        assert_eq!(
            o,
            Outcome {
                claim: None,
                change: Change::Keep,
                response: Response::KeyReused
            }
        );
    }

    #[test]
    fn retried_entry_answers_created_not_replayed() {
        let first = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&first);
        let claim = first.claim.clone().unwrap();
        let o = apply(
            Some(&claim),
            Some(&rec),
            Some(&rec),
            "fp",
            &create("aaaaaaaaaa", "h1"),
            1001,
        );
        assert_eq!(o.change, Change::Keep);
        assert_eq!(o.response, Response::Created(rec));
    }

    #[test]
    fn expired_key_is_free_again() {
        let first = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&first);
        let claim = first.claim.unwrap();
        let later = 1000 + IDEMPOTENCY_KEY_TTL_MS;
        assert!(expired(&claim, later));
        assert!(!expired(&claim, later - 1));
        assert_eq!(expires_at(&claim), later);
        let o = apply(
            Some(&claim),
            Some(&rec),
            None,
            "different body is fine now",
            &create("bbbbbbbbbb", "h2"),
            later,
        );
        let new = created(&o);
        assert_eq!(new.id, "bbbbbbbbbb");
        assert_eq!(o.claim.unwrap().claimed_ms, later);
    }

    #[test]
    fn claim_of_a_purged_alias_does_not_block() {
        let claim = IdempotencyRecord {
            alias_id: "aaaaaaaaaa".into(),
            fingerprint: "fp".into(),
            claimed_ms: 1000,
        };
        let o = apply(
            Some(&claim),
            None,
            None,
            "fp",
            &create("bbbbbbbbbb", "h2"),
            2000,
        );
        assert_eq!(created(&o).id, "bbbbbbbbbb");
    }

    #[test]
    fn taken_id_is_reported_and_claims_nothing() {
        let first = apply(None, None, None, "fp", &create("aaaaaaaaaa", "h1"), 1000);
        let rec = created(&first);
        let o = apply(
            None,
            None,
            Some(&rec),
            "fp2",
            &create("aaaaaaaaaa", "h9"),
            2000,
        );
        assert_eq!(o.response, Response::IdTaken);
        assert_eq!(o.claim, None);
    }
}
