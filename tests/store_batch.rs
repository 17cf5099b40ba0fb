//! Group proposal: an entry carrying several commands (`Command::Batch`)
//! leaves the same state and gives the same answers as the same commands in
//! entries of their own.

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tempalias::raft::store;
use tempalias::raft::{Command, Request, Response, TypeConfig};

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn create(id: &str, max_usage: u32) -> Command {
    Command::CreateAlias {
        id: id.into(),
        domain: "t.example".into(),
        target: "me@example.net".into(),
        token_hash: "h".into(),
        valid_for_ms: 1_000_000,
        max_usage,
    }
}

/// Creates, reserves (more than the alias allows), commits and releases,
/// with commands that depend on the ones before them in the same batch.
fn commands() -> Vec<Command> {
    let reserve = |reservation| Command::Reserve {
        id: "aaaaaaaaaaaa".into(),
        lease_ms: 60_000,
        reservation,
    };
    vec![
        create("aaaaaaaaaaaa", 2),
        create("bbbbbbbbbbbb", 1),
        reserve(1),
        reserve(2),
        // No use left: refused as held.
        reserve(3),
        Command::Commit {
            id: "aaaaaaaaaaaa".into(),
            reservation: 1,
        },
        Command::Release {
            id: "aaaaaaaaaaaa".into(),
            reservation: 2,
            lease_ms: 60_000,
        },
        // The released use is free again.
        reserve(4),
        // A repeated Reserve finds its reservation.
        reserve(4),
        Command::Revoke {
            id: "bbbbbbbbbbbb".into(),
        },
        Command::SetMaintenance { on: true },
    ]
}

#[tokio::test]
async fn a_batch_applies_like_separate_entries() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_l1, mut separate) = store::open(&dir.path().join("a.redb")).expect("open");
    let (_l2, mut batched) = store::open(&dir.path().join("b.redb")).expect("open");

    let entries: Vec<_> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| entry(i as u64 + 1, 5_000, c))
        .collect();
    let one_by_one = separate.apply(entries).await.expect("apply");

    let out = batched
        .apply(vec![
            entry(1, 5_000, Command::Batch { cmds: commands() }),
            // A batch of one, after it, sees its effects.
            entry(
                2,
                6_000,
                Command::Batch {
                    cmds: vec![Command::Revoke {
                        id: "aaaaaaaaaaaa".into(),
                    }],
                },
            ),
        ])
        .await
        .expect("apply");
    assert_eq!(out.len(), 2);
    let Response::Batch { responses } = &out[0] else {
        panic!("a batch answered {:?}", out[0]);
    };
    assert_eq!(responses, &one_by_one);
    assert!(
        matches!(responses[4], Response::Refused { .. }),
        "{responses:?}"
    );
    assert!(
        matches!(responses[7], Response::Reserved { reservation: 4, .. }),
        "{responses:?}"
    );
    assert_eq!(
        out[1],
        Response::Batch {
            responses: vec![Response::Revoked]
        }
    );

    let id = "bbbbbbbbbbbb";
    assert_eq!(
        separate.reader().alias(id).expect("read"),
        batched.reader().alias(id).expect("read")
    );
    let a = batched
        .reader()
        .alias("aaaaaaaaaaaa")
        .expect("read")
        .expect("alias");
    assert!(a.revoked);
    assert_eq!(a.used, 1);
    assert!(batched.reader().cluster_maintenance().expect("read").on);
    let (applied, _) = batched.applied_state().await.expect("state");
    assert_eq!(applied.map(|l| l.index), Some(2));
}
