//! A purge backlog (days without a leader, or `limits.keep_expired_days`
//! lowered) is deleted in bounded entries through the real store: each
//! entry deletes at most `raft::purge::MAX_ROWS` rows and says whether more
//! is due, writes applied between the entries go through, and the end state
//! is the one the single unbounded purge leaves.

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use tempalias::raft::purge::MAX_ROWS;
use tempalias::raft::store::{self, StateMachine};
use tempalias::raft::{Command, Request, Response, TypeConfig};

const DAY: u64 = 86_400_000;
/// Aliases in the backlog: enough for several bounded entries.
const BACKLOG: u64 = 3 * MAX_ROWS + MAX_ROWS / 2;
/// Creates per entry while filling.
const FILL_BATCH: u64 = 500;

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn create(id: String, valid_for_ms: u64) -> Command {
    Command::CreateAlias {
        id,
        domain: "t.example".into(),
        target: "me@example.net".into(),
        token_hash: "h".into(),
        valid_for_ms,
        max_usage: 3,
    }
}

/// A store with [`BACKLOG`] aliases that expired on days 1 to 10, and one
/// that lives on; returns the next log index.
async fn filled(sm: &mut StateMachine) -> u64 {
    let mut index = 1;
    let mut made = 0;
    while made < BACKLOG {
        let n = FILL_BATCH.min(BACKLOG - made);
        let cmds = (made..made + n)
            .map(|i| create(format!("old{i:06}"), (1 + i % 10) * DAY))
            .collect();
        sm.apply([entry(index, 0, Command::Batch { cmds })])
            .await
            .expect("apply");
        index += 1;
        made += n;
    }
    sm.apply([entry(index, 0, create("lives".into(), 100 * DAY))])
        .await
        .expect("apply");
    index + 1
}

fn answer(out: &[Response]) -> (u64, u64, bool) {
    match out {
        [Response::Purged { count, rows, more }] => (*count, *rows, *more),
        other => panic!("not a purge's answer: {other:?}"),
    }
}

#[tokio::test]
async fn a_backlog_goes_in_bounded_entries_with_writes_between_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_log, mut sm) = store::open(&dir.path().join("a.redb")).expect("open");
    let mut index = filled(&mut sm).await;
    // Twenty days on, keeping a week: every old alias is due.
    let now = 20 * DAY;
    let (mut aliases, mut rows, mut entries) = (0, 0, 0);
    loop {
        let purge = Command::PurgeBounded {
            keep_ms: 7 * DAY,
            max_rows: MAX_ROWS,
        };
        let out = sm.apply([entry(index, now, purge)]).await.expect("purge");
        index += 1;
        let (count, deleted, more) = answer(&out);
        assert!(deleted <= MAX_ROWS, "entry {entries}: {deleted} rows");
        if more {
            assert_eq!(deleted, MAX_ROWS, "stopped short of its bound");
        }
        aliases += count;
        rows += deleted;
        entries += 1;
        // A write the leader proposed meanwhile goes between two entries.
        let out = sm
            .apply([entry(index, now, create(format!("new{entries}"), DAY))])
            .await
            .expect("create");
        index += 1;
        assert!(matches!(out[0], Response::Created(_)), "{out:?}");
        if !more {
            break;
        }
        assert!(entries < 100, "the purge never ends");
    }
    assert_eq!(aliases, BACKLOG);
    // Every old alias and its per-target row.
    assert_eq!(rows, 2 * BACKLOG);
    assert_eq!(entries, (2 * BACKLOG).div_ceil(MAX_ROWS));
    let reader = sm.reader();
    for i in [0, BACKLOG / 2, BACKLOG - 1] {
        let id = format!("old{i:06}");
        assert!(reader.alias(&id).expect("read").is_none(), "{id}");
        assert!(reader.was_purged(&id).expect("read"), "{id}");
    }
    assert!(reader.alias("lives").expect("read").is_some());
    assert_eq!(
        reader.count(now).expect("count"),
        (1 + entries, 1 + entries)
    );

    // The same backlog under the one unbounded purge of older releases:
    // one entry, the same aliases gone.
    let (_log2, mut sm2) = store::open(&dir.path().join("b.redb")).expect("open");
    let index2 = filled(&mut sm2).await;
    let out = sm2
        .apply([entry(index2, now, Command::Purge { keep_ms: 7 * DAY })])
        .await
        .expect("purge");
    assert_eq!(answer(&out), (BACKLOG, 2 * BACKLOG, false));
    assert_eq!(sm2.reader().count(now).expect("count"), (1, 1));
}
