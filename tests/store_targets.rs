//! Per-target rules through the real store: the cap on live aliases, target
//! confirmation, and both carried by snapshots.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tempalias::raft::store::{self, StateMachine};
use tempalias::raft::targets::{token_hash, LinkState, CONFIRM_REQUEST_TTL_MS};
use tempalias::raft::{Command, Refusal, Request, Response, TargetPolicy, TypeConfig};

const DAY: u64 = 86_400_000;

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn create(id: &str, target: &str, days: u64) -> Command {
    Command::CreateAlias {
        id: id.into(),
        domain: "t.example".into(),
        target: target.into(),
        token_hash: format!("h-{id}"),
        valid_for_ms: days * DAY,
        max_usage: 5,
    }
}

fn limited(policy: &TargetPolicy, inner: Command) -> Command {
    Command::CreateLimited {
        policy: policy.clone(),
        create: Box::new(inner),
    }
}

fn cap(max: u32) -> TargetPolicy {
    TargetPolicy {
        max_per_target: max,
        ..Default::default()
    }
}

fn confirming(token: &str) -> TargetPolicy {
    TargetPolicy {
        max_per_target: 0,
        confirm_within_ms: 30 * DAY,
        confirm_token_hash: Some(token_hash(token)),
    }
}

fn reserve(id: &str, reservation: u64) -> Command {
    Command::Reserve {
        id: id.into(),
        lease_ms: 60_000,
        reservation,
    }
}

/// Applies entries one per index after `*next`, returning the answers.
async fn apply(
    sm: &mut StateMachine,
    next: &mut u64,
    now: u64,
    cmds: Vec<Command>,
) -> Vec<Response> {
    let entries = cmds
        .into_iter()
        .map(|c| {
            *next += 1;
            entry(*next, now, c)
        })
        .collect::<Vec<_>>();
    sm.apply(entries).await.expect("apply")
}

fn open() -> (tempfile::TempDir, StateMachine) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, sm) = store::open(&dir.path().join("s.redb")).expect("open store");
    (dir, sm)
}

#[tokio::test]
async fn the_cap_is_decided_in_apply_and_frees_on_revoke_use_and_expiry() {
    let (_d, mut sm) = open();
    let mut n = 0;
    // Two nodes racing: both creates land in one batch; the second is refused.
    let out = apply(
        &mut sm,
        &mut n,
        0,
        vec![
            limited(&cap(2), create("aaaaaaaaaa", "Me@example.net", 1)),
            limited(&cap(2), create("bbbbbbbbbb", "me@example.net", 10)),
            limited(&cap(2), create("cccccccccc", "ME@EXAMPLE.NET", 10)),
            // Another target is not affected.
            limited(&cap(2), create("dddddddddd", "you@example.net", 10)),
        ],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
    assert!(matches!(out[1], Response::Created(_)), "{out:?}");
    assert_eq!(out[2], Response::TargetFull { max: 2 });
    assert!(matches!(out[3], Response::Created(_)), "{out:?}");
    assert!(sm.reader().alias("cccccccccc").unwrap().is_none());
    // A retried create of an existing alias is not counted again.
    let out = apply(
        &mut sm,
        &mut n,
        1,
        vec![limited(&cap(2), create("bbbbbbbbbb", "me@example.net", 10))],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
    // Revoking one frees its place.
    let out = apply(
        &mut sm,
        &mut n,
        2,
        vec![
            Command::Revoke {
                id: "bbbbbbbbbb".into(),
            },
            limited(&cap(2), create("eeeeeeeeee", "me@example.net", 10)),
            limited(&cap(2), create("ffffffffff", "me@example.net", 10)),
        ],
    )
    .await;
    assert!(matches!(out[1], Response::Created(_)), "{out:?}");
    assert_eq!(out[2], Response::TargetFull { max: 2 });
    // Expiry frees a place without any entry about it (aaaaaaaaaa: one day).
    let out = apply(
        &mut sm,
        &mut n,
        DAY,
        vec![limited(&cap(2), create("gggggggggg", "me@example.net", 10))],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
    // Using an alias up frees its place.
    let out = apply(
        &mut sm,
        &mut n,
        DAY + 1,
        vec![limited(&cap(2), create("hhhhhhhhhh", "me@example.net", 10))],
    )
    .await;
    assert_eq!(out[0], Response::TargetFull { max: 2 });
    let mut cmds = Vec::new();
    for r in 1..=5u64 {
        cmds.push(reserve("eeeeeeeeee", r));
        cmds.push(Command::Commit {
            id: "eeeeeeeeee".into(),
            reservation: r,
        });
    }
    cmds.push(limited(&cap(2), create("hhhhhhhhhh", "me@example.net", 10)));
    let out = apply(&mut sm, &mut n, DAY + 2, cmds).await;
    assert!(matches!(out.last(), Some(Response::Created(_))), "{out:?}");
    // Without a cap (0) nothing is refused.
    let out = apply(
        &mut sm,
        &mut n,
        DAY + 3,
        vec![limited(&cap(0), create("iiiiiiiiii", "me@example.net", 10))],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");

    // A node that catches up by snapshot counts the same.
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot");
    let (_d2, mut sm2) = open();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .expect("install");
    let mut n2 = n;
    let out = apply(
        &mut sm2,
        &mut n2,
        DAY + 4,
        vec![limited(&cap(3), create("jjjjjjjjjj", "me@example.net", 10))],
    )
    .await;
    assert_eq!(out[0], Response::TargetFull { max: 3 });
    let out = apply(
        &mut sm2,
        &mut n2,
        DAY + 4,
        vec![limited(&cap(4), create("jjjjjjjjjj", "me@example.net", 10))],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
}

#[tokio::test]
async fn unconfirmed_targets_are_asked_once_and_confirmation_lets_mail_through() {
    let (_d, mut sm) = open();
    let mut n = 0;
    let out = apply(
        &mut sm,
        &mut n,
        1000,
        vec![
            limited(
                &confirming("t1"),
                create("aaaaaaaaaa", "me@example.net", 10),
            ),
            limited(
                &confirming("t2"),
                create("bbbbbbbbbb", "Me@Example.net", 10),
            ),
            reserve("aaaaaaaaaa", 1),
        ],
    )
    .await;
    let Response::CreatedUnconfirmed {
        alias,
        send_confirmation,
    } = &out[0]
    else {
        panic!("{out:?}");
    };
    assert!(alias.awaiting_confirmation && *send_confirmation);
    // The second create waits too but sends nothing: one mail per target.
    assert!(
        matches!(
            &out[1],
            Response::CreatedUnconfirmed {
                send_confirmation: false,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        out[2],
        Response::Refused {
            reason: Refusal::Unconfirmed
        }
    );
    // A retry of the first create (its answer lost) still says "send".
    let out = apply(
        &mut sm,
        &mut n,
        1001,
        vec![limited(
            &confirming("t1"),
            create("aaaaaaaaaa", "me@example.net", 10),
        )],
    )
    .await;
    assert!(
        matches!(
            &out[0],
            Response::CreatedUnconfirmed {
                send_confirmation: true,
                ..
            }
        ),
        "{out:?}"
    );
    let reader = sm.reader();
    assert_eq!(
        reader.confirmation_link(&token_hash("t1"), 1002).unwrap(),
        LinkState::Pending
    );
    assert_eq!(
        reader.confirmation_link(&token_hash("t2"), 1002).unwrap(),
        LinkState::Invalid
    );

    // A wrong token confirms nothing; the right one, once, for every alias.
    let out = apply(
        &mut sm,
        &mut n,
        2000,
        vec![
            Command::ConfirmTarget {
                token_hash: token_hash("t2"),
            },
            Command::ConfirmTarget {
                token_hash: token_hash("t1"),
            },
            Command::ConfirmTarget {
                token_hash: token_hash("t1"),
            },
            reserve("aaaaaaaaaa", 2),
            reserve("bbbbbbbbbb", 3),
            // Created after the confirmation: forwards at once.
            limited(
                &confirming("t3"),
                create("cccccccccc", "me@example.net", 10),
            ),
        ],
    )
    .await;
    assert_eq!(out[0], Response::NotFound);
    assert_eq!(out[1], Response::TargetConfirmed);
    assert_eq!(
        out[2],
        Response::TargetConfirmed,
        "applied again: same answer"
    );
    assert!(matches!(out[3], Response::Reserved { .. }), "{out:?}");
    assert!(matches!(out[4], Response::Reserved { .. }), "{out:?}");
    assert!(
        matches!(&out[5], Response::Created(rec) if !rec.awaiting_confirmation),
        "{out:?}"
    );
    assert_eq!(
        reader.confirmation_link(&token_hash("t1"), 2001).unwrap(),
        LinkState::Confirmed
    );

    // After the validity, a new alias waits and asks again.
    let later = 2000 + 30 * DAY;
    let out = apply(
        &mut sm,
        &mut n,
        later,
        vec![limited(
            &confirming("t4"),
            create("dddddddddd", "me@example.net", 10),
        )],
    )
    .await;
    assert!(
        matches!(
            &out[0],
            Response::CreatedUnconfirmed {
                send_confirmation: true,
                ..
            }
        ),
        "{out:?}"
    );
    // Its mail failed: withdrawn, so the next create asks again at once.
    let out = apply(
        &mut sm,
        &mut n,
        later + 1,
        vec![
            Command::WithdrawConfirmation {
                token_hash: token_hash("t4"),
            },
            Command::WithdrawConfirmation {
                token_hash: token_hash("t4"),
            },
            limited(
                &confirming("t5"),
                create("eeeeeeeeee", "me@example.net", 10),
            ),
        ],
    )
    .await;
    assert_eq!(out[0], Response::Withdrawn);
    assert_eq!(out[1], Response::Withdrawn);
    assert!(
        matches!(
            &out[2],
            Response::CreatedUnconfirmed {
                send_confirmation: true,
                ..
            }
        ),
        "{out:?}"
    );

    // The pending request and the waiting aliases survive a snapshot.
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot");
    let (_d2, mut sm2) = open();
    sm2.install_snapshot(&snap.meta, snap.snapshot)
        .await
        .expect("install");
    assert_eq!(
        sm2.reader()
            .confirmation_link(&token_hash("t5"), later + 2)
            .unwrap(),
        LinkState::Pending
    );
    let mut n2 = n;
    let out = apply(
        &mut sm2,
        &mut n2,
        later + 3,
        vec![
            reserve("eeeeeeeeee", 9),
            Command::ConfirmTarget {
                token_hash: token_hash("t5"),
            },
            reserve("eeeeeeeeee", 10),
            reserve("dddddddddd", 11),
        ],
    )
    .await;
    assert_eq!(
        out[0],
        Response::Refused {
            reason: Refusal::Unconfirmed
        }
    );
    assert_eq!(out[1], Response::TargetConfirmed);
    assert!(matches!(out[2], Response::Reserved { .. }), "{out:?}");
    assert!(matches!(out[3], Response::Reserved { .. }), "{out:?}");

    // Links lapse, and the purge forgets them.
    let out = apply(
        &mut sm,
        &mut n,
        later + 1 + CONFIRM_REQUEST_TTL_MS,
        vec![
            Command::ConfirmTarget {
                token_hash: token_hash("t5"),
            },
            Command::Purge { keep_ms: 365 * DAY },
        ],
    )
    .await;
    assert_eq!(out[0], Response::NotFound);
    assert_eq!(
        sm.reader()
            .confirmation_link(&token_hash("t1"), later + 2 + CONFIRM_REQUEST_TTL_MS)
            .unwrap(),
        LinkState::Invalid
    );
}

#[tokio::test]
async fn keyed_creates_follow_the_rules_and_claim_only_what_they_create() {
    let (_d, mut sm) = open();
    let mut n = 0;
    let keyed = |id: &str, key: &str| Command::CreateAliasKeyed {
        key_hash: key.into(),
        fingerprint: "fp".into(),
        create: Box::new(create(id, "me@example.net", 10)),
    };
    let out = apply(
        &mut sm,
        &mut n,
        0,
        vec![
            limited(&cap(1), keyed("aaaaaaaaaa", "k1")),
            // Same key, another id (a replay through another node).
            limited(&cap(1), keyed("bbbbbbbbbb", "k1")),
            // Another key: over the cap, and its key stays unclaimed.
            limited(&cap(1), keyed("cccccccccc", "k2")),
            Command::Revoke {
                id: "aaaaaaaaaa".into(),
            },
            limited(&cap(1), keyed("dddddddddd", "k2")),
        ],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
    assert!(
        matches!(&out[1], Response::Replayed(r) if r.id == "aaaaaaaaaa"),
        "{out:?}"
    );
    assert_eq!(out[2], Response::TargetFull { max: 1 });
    assert!(
        matches!(&out[4], Response::Created(r) if r.id == "dddddddddd"),
        "{out:?}"
    );
}

#[tokio::test]
async fn unlimited_creates_are_counted_too() {
    // Aliases created while no cap was configured count once one is.
    let (_d, mut sm) = open();
    let mut n = 0;
    let out = apply(
        &mut sm,
        &mut n,
        0,
        vec![
            create("aaaaaaaaaa", "me@example.net", 10),
            limited(&cap(1), create("bbbbbbbbbb", "me@example.net", 10)),
        ],
    )
    .await;
    assert!(matches!(out[0], Response::Created(_)), "{out:?}");
    assert_eq!(out[1], Response::TargetFull { max: 1 });
}
