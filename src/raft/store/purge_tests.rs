//! The purge by expiry indexes against the purge by scan of earlier
//! releases: the same random logs applied both ways must leave the same
//! tables and answers (a replicated state machine), the indexes must always
//! equal indexes built afresh from the tables, and a database or snapshot
//! without indexes must get them.

use std::path::Path;

use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::raft::targets::{CONFIRM_TOKENS, TARGETS, TARGET_ALIASES};
use crate::raft::types::{Request, TargetPolicy};

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

/// Random commands over small pools of ids, targets, keys and tokens, so
/// that commands meet each other's rows: ids are created again after their
/// purge (a tombstone rewritten), keys are replayed and reclaimed, targets
/// are capped, asked, confirmed and withdrawn.
struct Gen {
    rng: StdRng,
}

impl Gen {
    fn id(&mut self) -> String {
        format!("alias{:02}", self.rng.random_range(0..40))
    }

    fn token(&mut self) -> String {
        format!("tok{}", self.rng.random_range(0..12))
    }

    fn create(&mut self) -> Command {
        let targets = ["a@x.example", "A@X.example", "b@x.example", "c@y.example"];
        let valid = [0, MIN, HOUR, DAY, 3 * DAY, 30 * DAY, 400 * DAY];
        Command::CreateAlias {
            id: self.id(),
            domain: "t.example".into(),
            target: targets[self.rng.random_range(0..targets.len())].into(),
            token_hash: format!("h{}", self.rng.random_range(0..3)),
            valid_for_ms: valid[self.rng.random_range(0..valid.len())],
            max_usage: self.rng.random_range(1..4),
        }
    }

    fn keyed(&mut self) -> Command {
        Command::CreateAliasKeyed {
            key_hash: format!("key{}", self.rng.random_range(0..8)),
            fingerprint: format!("fp{}", self.rng.random_range(0..2)),
            create: Box::new(self.create()),
        }
    }

    fn plain(&mut self) -> Command {
        let reservation = self.rng.random_range(0..16);
        let lease_ms = [MIN, HOUR, 2 * DAY][self.rng.random_range(0..3)];
        match self.rng.random_range(0..100) {
            0..=17 => self.create(),
            18..=27 => self.keyed(),
            28..=39 => {
                let create = if self.rng.random_bool(0.5) {
                    self.create()
                } else {
                    self.keyed()
                };
                let confirm = self.rng.random_bool(0.6);
                Command::CreateLimited {
                    policy: TargetPolicy {
                        max_per_target: self.rng.random_range(0..4),
                        confirm_within_ms: if confirm { 30 * DAY } else { 0 },
                        confirm_token_hash: confirm.then(|| self.token()),
                    },
                    create: Box::new(create),
                }
            }
            40..=44 => Command::ConfirmTarget {
                token_hash: self.token(),
            },
            45..=47 => Command::WithdrawConfirmation {
                token_hash: self.token(),
            },
            48..=63 => Command::Reserve {
                id: self.id(),
                lease_ms,
                reservation,
            },
            64..=73 => Command::Commit {
                id: self.id(),
                reservation,
            },
            74..=79 => Command::Release {
                id: self.id(),
                reservation,
                lease_ms,
            },
            80..=83 => Command::Revoke { id: self.id() },
            84..=85 => Command::SetMaintenance {
                on: self.rng.random_bool(0.5),
            },
            _ => Command::Purge {
                keep_ms: [0, MIN, DAY, 7 * DAY][self.rng.random_range(0..4)],
            },
        }
    }

    fn command(&mut self) -> Command {
        if self.rng.random_bool(0.1) {
            let n = self.rng.random_range(2..5);
            Command::Batch {
                cmds: (0..n).map(|_| self.plain()).collect(),
            }
        } else {
            self.plain()
        }
    }

    /// The next entry time: mostly small steps, sometimes days, now and
    /// then more than a year (tombstones and confirmations lapse), and
    /// sometimes earlier than the last (a leader whose clock lags).
    fn advance(&mut self, now: u64) -> u64 {
        match self.rng.random_range(0..100) {
            0..=4 => now.saturating_sub(self.rng.random_range(0..HOUR)),
            5..=59 => now + self.rng.random_range(0..10 * MIN),
            60..=89 => now + self.rng.random_range(0..DAY),
            90..=97 => now + self.rng.random_range(0..10 * DAY),
            _ => now + self.rng.random_range(100 * DAY..500 * DAY),
        }
    }
}

/// The rows of one table: key and stored value.
type Rows = Vec<(String, Vec<u8>)>;

/// Every replicated table of a database, as stored (what a snapshot
/// carries, plus the state-machine metadata).
fn replicated(db: &Database) -> Vec<(&'static str, Rows)> {
    let txn = db.begin_read().unwrap();
    let json = |def: TableDefinition<&str, &[u8]>| -> Rows {
        txn.open_table(def)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                (k.value().to_string(), v.value().to_vec())
            })
            .collect()
    };
    let times = |def: TableDefinition<&str, u64>| -> Rows {
        txn.open_table(def)
            .unwrap()
            .iter()
            .unwrap()
            .map(|i| {
                let (k, v) = i.unwrap();
                (k.value().to_string(), v.value().to_le_bytes().to_vec())
            })
            .collect()
    };
    vec![
        ("aliases", json(ALIASES)),
        ("purged", times(PURGED)),
        ("idempotency_keys", json(IDEMPOTENCY)),
        ("settings", json(SETTINGS)),
        // A node that installed a snapshot has a membership record even if
        // the log had no membership entry.
        (
            "sm_meta",
            json(SM_META)
                .into_iter()
                .filter(|(k, _)| k != "last_membership")
                .collect(),
        ),
        ("targets", json(TARGETS)),
        ("confirm_tokens", json(CONFIRM_TOKENS)),
        ("target_aliases", times(TARGET_ALIASES)),
    ]
}

type IndexRows = Vec<Vec<(u64, String)>>;

fn index_rows(txn: &redb::WriteTransaction) -> IndexRows {
    let ix = expiry::Indexes::open(txn).unwrap();
    [
        &ix.aliases,
        &ix.purged,
        &ix.keys,
        &ix.target_aliases,
        &ix.tokens,
        &ix.targets,
    ]
    .iter()
    .map(|t| expiry::due(t, u64::MAX).unwrap())
    .collect()
}

/// The indexes as stored, and as built afresh from the tables.
fn indexes_and_rebuilt(db: &Database) -> (IndexRows, IndexRows) {
    let txn = db.begin_write().unwrap();
    let stored = index_rows(&txn);
    expiry::rebuild(&txn).unwrap();
    let rebuilt = index_rows(&txn);
    txn.abort().unwrap();
    (stored, rebuilt)
}

/// Times at which some stored row becomes due (for each purge retention
/// the generator uses), so the run can land on them exactly and on either
/// side: where an off-by-one in an index bound would show.
fn boundaries(db: &Database) -> Vec<u64> {
    let txn = db.begin_read().unwrap();
    let mut out = Vec::new();
    for item in txn.open_table(ALIASES).unwrap().iter().unwrap() {
        let (_, v) = item.unwrap();
        let rec: AliasRecord = serde_json::from_slice(v.value()).unwrap();
        for keep in [0, MIN, DAY, 7 * DAY] {
            out.push(rec.valid_until_ms.saturating_add(keep));
        }
        out.extend(rec.reservations.values());
    }
    for item in txn.open_table(PURGED).unwrap().iter().unwrap() {
        out.push(item.unwrap().1.value() + TOMBSTONE_KEEP_MS);
    }
    for item in txn.open_table(TARGET_ALIASES).unwrap().iter().unwrap() {
        out.push(item.unwrap().1.value());
    }
    for (def, time) in [
        (IDEMPOTENCY, expiry::key_time as fn(&[u8]) -> u64),
        (CONFIRM_TOKENS, expiry::token_time),
        (TARGETS, expiry::target_time),
    ] {
        for item in txn.open_table(def).unwrap().iter().unwrap() {
            out.push(time(item.unwrap().1.value()));
        }
    }
    out
}

fn sizes(db: &Database) -> Vec<usize> {
    replicated(db).iter().map(|(_, rows)| rows.len()).collect()
}

fn open_at(path: &Path) -> StateMachine {
    open(path).expect("open store").1
}

/// Applies `steps` random entries to `scan` (purging by scan) and `index`
/// (purging by the indexes) and checks they stay alike. Returns the last
/// entry time and index, and per replicated table whether some purge
/// shrank it.
fn run(
    seed: u64,
    steps: u64,
    scan: &Database,
    index: &Arc<Database>,
    first: u64,
    start_ms: u64,
) -> (u64, u64, Vec<bool>) {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
    };
    let mut now = start_ms;
    let mut shrank = vec![false; 8];
    for i in first..first + steps {
        let mut cmd = g.command();
        let due: Vec<u64> = boundaries(scan).into_iter().filter(|t| *t > now).collect();
        if !due.is_empty() && g.rng.random_bool(0.2) {
            let at = due[g.rng.random_range(0..due.len())];
            now = at + 1 - g.rng.random_range(0..3);
            cmd = Command::Purge {
                keep_ms: [0, MIN, DAY, 7 * DAY][g.rng.random_range(0..4)],
            };
        } else {
            now = g.advance(now);
        }
        let before = sizes(index);
        let e = [entry(i, now, cmd.clone())];
        let by_scan = apply_entries(scan, &e, PurgeBy::Scan).unwrap();
        let by_index = apply_entries(index, &e, PurgeBy::Index).unwrap();
        assert_eq!(by_scan, by_index, "seed {seed} entry {i}: {cmd:?}");
        let purges = match &cmd {
            Command::Purge { .. } => true,
            Command::Batch { cmds } => cmds.iter().any(|c| matches!(c, Command::Purge { .. })),
            _ => false,
        };
        if purges {
            for (s, (b, a)) in shrank.iter_mut().zip(before.iter().zip(sizes(index))) {
                *s |= a < *b;
            }
        }
        if purges || i % 25 == 0 {
            assert_eq!(
                replicated(scan),
                replicated(index),
                "seed {seed} entry {i}: {cmd:?}"
            );
            let (stored, rebuilt) = indexes_and_rebuilt(index);
            assert_eq!(stored, rebuilt, "seed {seed} entry {i}: {cmd:?}");
            let last_now: u64 = {
                let txn = index.begin_read().unwrap();
                get_json(&txn.open_table(SM_META).unwrap(), "last_now")
                    .unwrap()
                    .unwrap()
            };
            let reader = StateReader { db: index.clone() };
            for probe in [last_now, last_now + HOUR, last_now + 5 * DAY] {
                assert_eq!(
                    reader.count(probe).unwrap(),
                    count_aliases_by_scan(scan, probe).unwrap(),
                    "seed {seed} entry {i} at {probe}"
                );
            }
        }
    }
    (now, first + steps, shrank)
}

#[test]
fn purge_by_index_leaves_what_purge_by_scan_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut shrank_any = vec![false; 8];
    for seed in 0..6u64 {
        let scan = open_at(&dir.path().join(format!("scan{seed}.redb")));
        let index = open_at(&dir.path().join(format!("index{seed}.redb")));
        let (_, _, shrank) = run(seed, 700, &scan.db, &index.db, 1, 0);
        for (a, s) in shrank_any.iter_mut().zip(shrank) {
            *a |= s;
        }
    }
    // Every table the purge deletes from was purged at least once, so the
    // comparison covered each index (settings and sm_meta are never purged).
    let names = [
        "aliases",
        "purged",
        "idempotency_keys",
        "settings",
        "sm_meta",
        "targets",
        "confirm_tokens",
        "target_aliases",
    ];
    for (name, shrank) in names.iter().zip(&shrank_any) {
        let expected = !matches!(*name, "settings" | "sm_meta");
        assert_eq!(*shrank, expected, "table {name}");
    }
}

#[test]
fn a_database_without_indexes_gets_them_at_open_and_purges_alike() {
    let dir = tempfile::tempdir().unwrap();
    let scan = open_at(&dir.path().join("scan.redb"));
    let path = dir.path().join("index.redb");
    let index = open_at(&path);
    let (now, next, _) = run(11, 300, &scan.db, &index.db, 1, 0);
    // One row at least in each index: a keyed create that asks its target.
    let cmd = Command::CreateLimited {
        policy: TargetPolicy {
            max_per_target: 0,
            confirm_within_ms: 30 * DAY,
            confirm_token_hash: Some("fresh-token".into()),
        },
        create: Box::new(Command::CreateAliasKeyed {
            key_hash: "fresh-key".into(),
            fingerprint: "fp".into(),
            create: Box::new(Command::CreateAlias {
                id: "fresh".into(),
                domain: "t.example".into(),
                target: "fresh@x.example".into(),
                token_hash: "h".into(),
                valid_for_ms: DAY,
                max_usage: 1,
            }),
        }),
    };
    let e = [entry(next, now, cmd)];
    let answer = apply_entries(&scan.db, &e, PurgeBy::Scan).unwrap();
    assert_eq!(
        answer,
        apply_entries(&index.db, &e, PurgeBy::Index).unwrap()
    );
    let next = next + 1;
    let (maintained, _) = indexes_and_rebuilt(&index.db);
    assert!(
        maintained.iter().all(|rows| !rows.is_empty()),
        "{maintained:?}"
    );
    drop(index);
    // As an earlier release left it: no index tables, no version marker.
    {
        let db = Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        for def in expiry::ALL {
            assert!(txn.delete_table(def).unwrap());
        }
        txn.open_table(SM_META)
            .unwrap()
            .remove(expiry::VERSION_KEY)
            .unwrap();
        txn.commit().unwrap();
    }
    let index = open_at(&path);
    let (built, _) = indexes_and_rebuilt(&index.db);
    assert_eq!(built, maintained);
    // Opened again, it is not built again (nor changed).
    drop(index);
    let index = open_at(&path);
    assert_eq!(indexes_and_rebuilt(&index.db).0, maintained);
    run(12, 300, &scan.db, &index.db, next, now);
}

#[test]
fn an_installed_snapshot_brings_indexes_built_from_its_tables() {
    let dir = tempfile::tempdir().unwrap();
    let scan = open_at(&dir.path().join("scan.redb"));
    let index = open_at(&dir.path().join("index.redb"));
    let (now, next, _) = run(21, 300, &scan.db, &index.db, 1, 0);
    let (meta, file) = index.files.build(&index.db).unwrap();
    // A node with rows (and index rows) of its own, which the snapshot
    // replaces.
    let installed = open_at(&dir.path().join("installed.redb"));
    let other = open_at(&dir.path().join("other.redb"));
    run(22, 100, &other.db, &installed.db, 1, 0);
    installed.files.install(&installed.db, &meta, file).unwrap();
    assert_eq!(replicated(&installed.db), replicated(&index.db));
    let (theirs, _) = indexes_and_rebuilt(&index.db);
    let (ours, rebuilt) = indexes_and_rebuilt(&installed.db);
    assert_eq!(ours, theirs);
    assert_eq!(ours, rebuilt);
    // And it goes on purging as the scan does.
    run(23, 200, &scan.db, &installed.db, next, now);
}

/// Writes `rows` into the indexes in place of what they hold.
fn restore_indexes(db: &Database, rows: &IndexRows) {
    let txn = db.begin_write().unwrap();
    {
        for def in expiry::ALL {
            txn.delete_table(def).unwrap();
        }
        let ix = expiry::Indexes::open(&txn).unwrap();
        let mut tables = [
            ix.aliases,
            ix.purged,
            ix.keys,
            ix.target_aliases,
            ix.tokens,
            ix.targets,
        ];
        for (table, rows) in tables.iter_mut().zip(rows) {
            for (at, key) in rows {
                table.insert((*at, key.as_str()), ()).unwrap();
            }
        }
    }
    txn.commit().unwrap();
}

fn meta_value(db: &Database, key: &str) -> Option<Vec<u8>> {
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(SM_META).unwrap();
    let v = meta.get(key).unwrap().map(|v| v.value().to_vec());
    v
}

#[test]
fn indexes_left_stale_by_an_earlier_release_are_built_again_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let scan = open_at(&dir.path().join("scan.redb"));
    let path = dir.path().join("index.redb");
    let index = open_at(&path);
    let (now, next, _) = run(31, 200, &scan.db, &index.db, 1, 0);
    let (before, _) = indexes_and_rebuilt(&index.db);
    let marker = meta_value(&index.db, expiry::APPLIED_KEY);
    assert_eq!(marker, meta_value(&index.db, "last_applied"));
    // An earlier release applies more entries (purges included) on this
    // database: the tables move on, the indexes and both markers stay as
    // they were.
    let (now, next, _) = run(32, 200, &scan.db, &index.db, next, now);
    restore_indexes(&index.db, &before);
    {
        let txn = index.db.begin_write().unwrap();
        txn.open_table(SM_META)
            .unwrap()
            .insert(expiry::APPLIED_KEY, marker.unwrap().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let (stale, rebuilt) = indexes_and_rebuilt(&index.db);
    assert_ne!(stale, rebuilt, "the simulated release left nothing stale");
    drop(index);
    // Upgraded again: the marker is behind `last_applied`, so the indexes
    // are built again rather than trusted.
    let index = open_at(&path);
    let (stored, rebuilt) = indexes_and_rebuilt(&index.db);
    assert_eq!(stored, rebuilt);
    assert_eq!(
        meta_value(&index.db, expiry::APPLIED_KEY),
        meta_value(&index.db, "last_applied")
    );
    // And purges go on deleting what the scan deletes.
    run(33, 300, &scan.db, &index.db, next, now);
}

#[test]
fn a_purge_drops_index_rows_without_their_alias() {
    let dir = tempfile::tempdir().unwrap();
    let scan = open_at(&dir.path().join("scan.redb"));
    let index = open_at(&dir.path().join("index.redb"));
    let (now, next, _) = run(41, 200, &scan.db, &index.db, 1, 0);
    // Rows no write of the alias table leaves, due and not yet due.
    {
        let txn = index.db.begin_write().unwrap();
        {
            let mut ix = txn.open_table(expiry::ALIASES_BY_EXPIRY).unwrap();
            ix.insert((0, "stray-due"), ()).unwrap();
            ix.insert((u64::MAX, "stray-later"), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let e = [entry(next, now, Command::Purge { keep_ms: 0 })];
    assert_eq!(
        apply_entries(&scan.db, &e, PurgeBy::Scan).unwrap(),
        apply_entries(&index.db, &e, PurgeBy::Index).unwrap()
    );
    assert_eq!(replicated(&scan.db), replicated(&index.db));
    let (mut stored, rebuilt) = indexes_and_rebuilt(&index.db);
    let aliases = &mut stored[0];
    assert!(
        !aliases.iter().any(|(_, k)| k == "stray-due"),
        "{aliases:?}"
    );
    assert_eq!(aliases.pop(), Some((u64::MAX, "stray-later".to_string())));
    assert_eq!(stored, rebuilt);
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Blank,
    }
}

/// The answer of a purge: aliases, rows, more.
fn purged(answer: &[Response]) -> (u64, u64, bool) {
    match answer {
        [Response::Purged { count, rows, more }] => (*count, *rows, *more),
        other => panic!("not a purge's answer: {other:?}"),
    }
}

fn alias_ids(db: &Database) -> Vec<String> {
    replicated(db)[0].1.iter().map(|(k, _)| k.clone()).collect()
}

#[test]
fn a_bounded_purge_deletes_the_first_due_in_index_order_and_says_more() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open_at(&dir.path().join("a.redb"));
    // Ten aliases whose expiry runs against their ids ("a09" expires
    // first), so index order is not id order; "held" expires before all of
    // them and holds a live reservation at the purge's time.
    let mut entries = Vec::new();
    for i in 0..10u64 {
        entries.push(entry(
            i + 1,
            0,
            Command::CreateAlias {
                id: format!("a{:02}", 9 - i),
                domain: "t.example".into(),
                target: "me@x.example".into(),
                token_hash: "h".into(),
                valid_for_ms: (i + 1) * MIN,
                max_usage: 1,
            },
        ));
    }
    entries.push(entry(
        11,
        0,
        Command::CreateAlias {
            id: "held".into(),
            domain: "t.example".into(),
            target: "me@x.example".into(),
            token_hash: "h".into(),
            valid_for_ms: MIN / 2,
            max_usage: 1,
        },
    ));
    entries.push(entry(
        12,
        0,
        Command::Reserve {
            id: "held".into(),
            lease_ms: DAY,
            reservation: 1,
        },
    ));
    apply_entries(&sm.db, &entries, PurgeBy::Index).unwrap();
    let now = HOUR;
    let bounded = Command::PurgeBounded {
        keep_ms: 0,
        max_rows: 3,
    };
    let mut next = 13;
    let mut apply = |cmd: &Command| {
        let answer = apply_entries(&sm.db, &[entry(next, now, cmd.clone())], PurgeBy::Index);
        next += 1;
        purged(&answer.unwrap())
    };
    // The three that expired first go, whatever their ids; the held alias
    // is read and skipped without spending the bound.
    assert_eq!(apply(&bounded), (3, 3, true));
    let left = alias_ids(&sm.db);
    assert_eq!(
        left,
        ["a00", "a01", "a02", "a03", "a04", "a05", "a06", "held"]
    );
    assert_eq!(apply(&bounded), (3, 3, true));
    assert_eq!(alias_ids(&sm.db), ["a00", "a01", "a02", "a03", "held"]);
    // Three aliases and nothing else due: whether more is due is known
    // only by looking on, into the per-target rows (eleven, every alias
    // counted against its target: the held one's expired too).
    assert_eq!(apply(&bounded), (3, 3, true));
    assert_eq!(alias_ids(&sm.db), ["a00", "held"]);
    // The last alias, then two per-target rows.
    assert_eq!(apply(&bounded), (1, 3, true));
    assert_eq!(alias_ids(&sm.db), ["held"]);
    let per_target = |db: &Database| replicated(db)[7].1.len();
    assert_eq!(per_target(&sm.db), 9);
    assert_eq!(apply(&bounded), (0, 3, true));
    assert_eq!(apply(&bounded), (0, 3, true));
    assert_eq!(apply(&bounded), (0, 3, false));
    assert_eq!(per_target(&sm.db), 0);
    // Done: the held alias stays, and does not make the purge say more.
    assert_eq!(apply(&bounded), (0, 0, false));
    assert_eq!(alias_ids(&sm.db), ["held"]);
    let tombstones: Vec<String> = replicated(&sm.db)[1]
        .1
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(tombstones.len(), 10);
    let (stored, rebuilt) = indexes_and_rebuilt(&sm.db);
    assert_eq!(stored, rebuilt);
    // Once its lease has lapsed it goes too.
    let late = apply_entries(
        &sm.db,
        &[entry(next, 2 * DAY, bounded.clone())],
        PurgeBy::Index,
    )
    .unwrap();
    assert_eq!(purged(&late), (1, 1, false));
}

/// Purges `scan` once, unbounded, at `now` (then blank entries), and
/// `index` in bounded entries of `max_rows` at the same `now` until none
/// says more; checks that both end alike, and that no bounded entry went
/// over its bound. Returns the next index, and the bounded entries.
fn purge_both_ways(
    scan: &Database,
    index: &Database,
    first: u64,
    now: u64,
    keep_ms: u64,
    max_rows: u64,
) -> (u64, u64) {
    let once = apply_entries(
        scan,
        &[entry(first, now, Command::Purge { keep_ms })],
        PurgeBy::Scan,
    )
    .unwrap();
    let (count, rows, more) = purged(&once);
    assert!(!more);
    let (mut aliases, mut deleted, mut entries) = (0, 0, 0);
    let mut i = first;
    loop {
        let cmd = Command::PurgeBounded { keep_ms, max_rows };
        let answer = apply_entries(index, &[entry(i, now, cmd)], PurgeBy::Index).unwrap();
        let (c, r, more) = purged(&answer);
        assert!(r <= max_rows, "{r} rows in an entry bounded to {max_rows}");
        assert!(c <= r);
        aliases += c;
        deleted += r;
        entries += 1;
        if i > first {
            apply_entries(scan, &[blank(i)], PurgeBy::Scan).unwrap();
        }
        i += 1;
        if !more {
            break;
        }
        assert!(entries <= rows + 1, "more said after every row was gone");
    }
    assert_eq!((aliases, deleted), (count, rows));
    assert!(entries >= rows.div_ceil(max_rows));
    assert_eq!(replicated(scan), replicated(index), "at {now}");
    let (stored, rebuilt) = indexes_and_rebuilt(index);
    assert_eq!(stored, rebuilt);
    (i, entries)
}

#[test]
fn bounded_purges_until_done_leave_what_one_unbounded_purge_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut several = 0;
    for seed in 0..4u64 {
        let scan = open_at(&dir.path().join(format!("scan{seed}.redb")));
        let index = open_at(&dir.path().join(format!("index{seed}.redb")));
        let (mut now, mut next) = (0, 1);
        for round in 0..6u64 {
            let (n, i, _) = run(seed * 100 + round, 150, &scan.db, &index.db, next, now);
            now = n;
            next = i;
            // Land on a time at which some row becomes due, or after a long
            // pause (a backlog of everything).
            let due: Vec<u64> = boundaries(&scan.db)
                .into_iter()
                .filter(|t| *t > now)
                .collect();
            now = match (round % 3, due.is_empty()) {
                (0, _) | (_, true) => now + 400 * DAY,
                _ => due[(seed as usize * 7 + round as usize) % due.len()],
            };
            let keep = [0, MIN, DAY, 7 * DAY][(seed + round) as usize % 4];
            let max_rows = [1, 2, 5][round as usize % 3];
            let (i, entries) = purge_both_ways(&scan.db, &index.db, next, now, keep, max_rows);
            next = i;
            if entries > 2 {
                several += 1;
            }
        }
    }
    assert!(several > 4, "few purges took several entries: {several}");
}

#[test]
fn replicas_applying_the_same_bounded_purges_agree() {
    let dir = tempfile::tempdir().unwrap();
    let scan = open_at(&dir.path().join("scan.redb"));
    let a = open_at(&dir.path().join("a.redb"));
    let (now, next, _) = run(51, 400, &scan.db, &a.db, 1, 0);
    // A replica that caught up by snapshot: its indexes were built from
    // the snapshot's records, not kept entry by entry.
    let (meta, file) = a.files.build(&a.db).unwrap();
    let b = open_at(&dir.path().join("b.redb"));
    b.files.install(&b.db, &meta, file).unwrap();
    let now = now + 400 * DAY;
    let mut i = next;
    let mut entries = 0;
    loop {
        let e = [entry(
            i,
            now,
            Command::PurgeBounded {
                keep_ms: DAY,
                max_rows: 2,
            },
        )];
        let on_a = apply_entries(&a.db, &e, PurgeBy::Index).unwrap();
        let on_b = apply_entries(&b.db, &e, PurgeBy::Index).unwrap();
        assert_eq!(on_a, on_b, "entry {i}");
        assert_eq!(replicated(&a.db), replicated(&b.db), "entry {i}");
        entries += 1;
        i += 1;
        if !purged(&on_a).2 {
            break;
        }
        assert!(entries < 10_000);
    }
    assert!(entries > 3, "{entries}");
    assert_eq!(indexes_and_rebuilt(&a.db).0, indexes_and_rebuilt(&b.db).0);
}
