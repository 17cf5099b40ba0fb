//! What a purge, the alias count, the first open after an upgrade and a
//! snapshot install cost in a large store, purging by the expiry indexes
//! against purging by scan (as earlier releases did) on copies of the same
//! database, alternately in one run. Prints figures; asserts only that both
//! purges deleted the same. Not part of the test run (ignored):
//!
//! ```text
//! cargo test --release --lib purge_bench -- --ignored --nocapture
//! ```
//!
//! Environment: `PURGE_BENCH_ALIASES` live aliases (default 1,000,000),
//! `PURGE_BENCH_TOMBSTONES` tombstones (default 1,000,000),
//! `PURGE_BENCH_RUNS` purges and counts per figure (default 5).
//!
//! The store: tombstones left by purges spread over 300 days of replicated
//! time, then the live aliases created over the last 30 days before the
//! bench time (valid 1-30 whole days, as the API's `days` gives, so some
//! have expired and some are due; one
//! in ten with an idempotency key; about three aliases per target). Purges
//! run at the bench time and then every 10 minutes, as the leader proposes
//! them, keeping 7 days (the default `keep_expired_days`). The backlog the
//! first purge finds is also deleted in bounded entries, on copies of their
//! own: at the default bound, until done, and at other bounds in turn.

use std::path::Path;
use std::time::Instant;

use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::raft::types::Request;

const MIN: u64 = 60_000;
const DAY: u64 = 1440 * MIN;
const KEEP: u64 = 7 * DAY;
const BATCH: u64 = 1000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn entry(index: u64, now_ms: u64, cmd: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request { now_ms, cmd }),
    }
}

fn create(rng: &mut StdRng, n: u64, targets: u64, valid_for_ms: u64) -> Command {
    let create = Command::CreateAlias {
        id: format!("{:012x}", rng.random::<u64>() & 0xffff_ffff_ffff),
        domain: "tempalias.example".into(),
        target: format!("user{}@example.net", rng.random_range(0..targets)),
        token_hash: format!("{:064x}", n),
        valid_for_ms,
        max_usage: 10,
    };
    if n.is_multiple_of(10) {
        Command::CreateAliasKeyed {
            key_hash: format!("{:064x}", rng.random::<u64>()),
            fingerprint: format!("{:064x}", n),
            create: Box::new(create),
        }
    } else {
        create
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn open_db(path: &Path) -> StateMachine {
    open(path).expect("open store").1
}

/// Fills the store; returns the bench time and the next log index.
fn fill(db: &Database, aliases: u64, tombstones: u64) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(7);
    let start = 1_700_000_000_000u64;
    let mut index = 1;
    let started = Instant::now();
    // Tombstones: ten generations 30 days apart, each purged a day later.
    let per_group = tombstones / 10;
    for g in 0..10 {
        let at = start + g * 30 * DAY;
        let mut left = per_group;
        while left > 0 {
            let n = left.min(BATCH);
            let cmds = (0..n)
                .map(|i| create(&mut rng, index * BATCH + i, 1 << 40, MIN))
                .collect();
            apply_entries(
                db,
                &[entry(index, at, Command::Batch { cmds })],
                PurgeBy::Index,
            )
            .unwrap();
            index += 1;
            left -= n;
        }
        apply_entries(
            db,
            &[entry(index, at + DAY, Command::Purge { keep_ms: 0 })],
            PurgeBy::Index,
        )
        .unwrap();
        index += 1;
    }
    let tomb_s = started.elapsed().as_secs_f64();
    let bench_at = start + 400 * DAY;
    let batches = aliases.div_ceil(BATCH);
    let started = Instant::now();
    for b in 0..batches {
        let at = bench_at - 30 * DAY + b * (30 * DAY / batches.max(1));
        let cmds = (0..BATCH.min(aliases - b * BATCH))
            .map(|i| {
                // `days` of the API: 1 to 30 whole days.
                let valid = rng.random_range(1..=30) * DAY;
                create(&mut rng, b * BATCH + i, aliases / 3 + 1, valid)
            })
            .collect();
        apply_entries(
            db,
            &[entry(index, at, Command::Batch { cmds })],
            PurgeBy::Index,
        )
        .unwrap();
        index += 1;
    }
    let live_s = started.elapsed().as_secs_f64();
    println!(
        "fill: {tombstones} tombstones in {tomb_s:.1} s, {aliases} aliases in {live_s:.1} s \
         ({:.1} us per create, in entries of {BATCH})",
        live_s * 1e6 / aliases as f64
    );
    (bench_at, index)
}

fn table_len(db: &Database, def: TableDefinition<&str, &[u8]>) -> u64 {
    db.begin_read()
        .unwrap()
        .open_table(def)
        .unwrap()
        .len()
        .unwrap()
}

#[test]
#[ignore = "benchmark: cargo test --release --lib purge_bench -- --ignored --nocapture"]
fn purge_bench() {
    let aliases = env("PURGE_BENCH_ALIASES", 1_000_000);
    let tombstones = env("PURGE_BENCH_TOMBSTONES", 1_000_000);
    let runs = env("PURGE_BENCH_RUNS", 5);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.redb");
    let (bench_at, mut index) = {
        let sm = open_db(&base);
        fill(&sm.db, aliases, tombstones)
    };
    let size = std::fs::metadata(&base).unwrap().len();
    println!(
        "database: {:.0} MiB ({} B per alias and tombstone)",
        size as f64 / 1048576.0,
        size / (aliases + tombstones).max(1)
    );
    let scan_path = dir.path().join("scan.redb");
    let index_path = dir.path().join("index.redb");
    let bounded_path = dir.path().join("bounded.redb");
    let sweep_path = dir.path().join("sweep.redb");
    for path in [&scan_path, &index_path, &bounded_path, &sweep_path] {
        std::fs::copy(&base, path).unwrap();
    }
    std::fs::remove_file(&base).unwrap();
    let scan = open_db(&scan_path);
    let indexed = open_db(&index_path);
    let stored = table_len(&indexed.db, ALIASES);

    // The first purge at the bench time deletes everything expired over a
    // week ago (about a fifth of the aliases); the next ones, ten minutes
    // apart, what expired in between.
    let mut first = None;
    let (mut by_scan, mut by_index, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..=runs {
        let at = bench_at + k * 10 * MIN;
        let e = [entry(index, at, Command::Purge { keep_ms: KEEP })];
        index += 1;
        // Alternate which goes first, so neither always finds a warmer cache.
        let mut times = [0.0; 2];
        let mut answers = [None, None];
        for turn in 0..2 {
            let which = (turn + k as usize) % 2;
            let t = Instant::now();
            let answer = if which == 0 {
                apply_entries(&scan.db, &e, PurgeBy::Scan).unwrap()
            } else {
                apply_entries(&indexed.db, &e, PurgeBy::Index).unwrap()
            };
            times[which] = ms(t);
            answers[which] = Some(answer);
        }
        assert_eq!(answers[0], answers[1]);
        let count = match answers[1].as_deref() {
            Some([Response::Purged { count, .. }]) => *count,
            other => panic!("{other:?}"),
        };
        if k == 0 {
            first = Some((times, count));
        } else {
            by_scan.push(times[0]);
            by_index.push(times[1]);
            deleted.push(count as f64);
        }
    }
    let (first_times, first_count) = first.unwrap();
    println!(
        "first purge ({first_count} of {stored} aliases due): scan {:.0} ms, index {:.0} ms",
        first_times[0], first_times[1]
    );
    bounded_backlog(&bounded_path, &sweep_path, bench_at, index, first_times[1]);
    println!(
        "purge every 10 min (median {:.0} aliases due), medians of {runs}: scan {:.1} ms, \
         index {:.2} ms, ratio {:.0}x (scan runs {:?}, index runs {:?})",
        median(deleted),
        median(by_scan.clone()),
        median(by_index.clone()),
        median(by_scan.clone()) / median(by_index.clone()),
        by_scan.iter().map(|v| v.round()).collect::<Vec<_>>(),
        by_index
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
    );

    // The alias count behind `tempalias_aliases_active`.
    let now = bench_at + (runs + 1) * 10 * MIN;
    let reader = indexed.reader();
    let (mut c_scan, mut c_index) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let old = count_aliases_by_scan(&scan.db, now).unwrap();
        c_scan.push(ms(t));
        let t = Instant::now();
        let new = reader.count(now).unwrap();
        c_index.push(ms(t));
        assert_eq!(old, new);
    }
    drop(reader);
    println!(
        "alias count, medians of {runs}: scan {:.0} ms, index {:.3} ms",
        median(c_scan),
        median(c_index)
    );

    // Snapshot: built from the indexed store, installed into empty stores
    // with and without building the expiry indexes, alternately.
    let t = Instant::now();
    let (meta, file) = indexed.files.build(&indexed.db).unwrap();
    let build_ms = ms(t);
    drop(file);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for k in 0..4 {
        let build = k % 2 == 1;
        let fresh = open_db(&dir.path().join(format!("installed{k}.redb")));
        let (_, file) = indexed.files.open_current(&indexed.db).unwrap().unwrap();
        let before = rss_kib("VmRSS:");
        reset_peak_rss();
        let t = Instant::now();
        fresh
            .files
            .install_with(&fresh.db, &meta, file, build)
            .unwrap();
        if build { &mut with } else { &mut without }.push(ms(t));
        if let (Some(before), Some(peak)) = (before, rss_kib("VmHWM:")) {
            println!(
                "install {} the expiry indexes: RSS of the process {:.0} MiB before, \
                 peak {:.0} MiB (+{:.0} MiB)",
                if build { "with" } else { "without" },
                before as f64 / 1024.0,
                peak as f64 / 1024.0,
                peak.saturating_sub(before) as f64 / 1024.0
            );
        }
        drop(fresh);
        std::fs::remove_file(dir.path().join(format!("installed{k}.redb"))).unwrap();
    }
    println!(
        "snapshot: build {build_ms:.0} ms; install without the expiry indexes {:?} ms, \
         with them {:?} ms",
        without.iter().map(|v| v.round()).collect::<Vec<_>>(),
        with.iter().map(|v| v.round()).collect::<Vec<_>>(),
    );

    // Restart: open as is, and open after an upgrade (no indexes yet).
    drop(scan);
    drop(indexed);
    let t = Instant::now();
    drop(open_db(&index_path));
    let reopen_ms = ms(t);
    {
        let db = Database::open(&index_path).unwrap();
        let txn = db.begin_write().unwrap();
        for def in expiry::ALL {
            txn.delete_table(def).unwrap();
        }
        txn.open_table(SM_META)
            .unwrap()
            .remove(expiry::VERSION_KEY)
            .unwrap();
        txn.commit().unwrap();
    }
    let t = Instant::now();
    drop(open_db(&index_path));
    println!(
        "open: {reopen_ms:.0} ms; first open of a database without the indexes \
         (builds them) {:.0} ms",
        ms(t)
    );
}

/// The same backlog as the first purge above, deleted in bounded entries
/// ([`Command::PurgeBounded`] of [`MAX_ROWS`], as the leader proposes them
/// while every member applies them) on a third copy: each entry's apply
/// time and the total, against `unbounded_ms` (the one unbounded purge by
/// the indexes measured above). Then, on a fourth copy, entries of other
/// bounds taken in turn, to show what one entry costs per row. The copies
/// are of their own: `first` is just the log index their entries start at.
fn bounded_backlog(
    bounded_path: &Path,
    sweep_path: &Path,
    bench_at: u64,
    first: u64,
    unbounded_ms: f64,
) {
    let mut index = first;
    use crate::raft::purge::MAX_ROWS;
    let sm = open_db(bounded_path);
    let (mut times, mut aliases, mut rows) = (Vec::new(), 0, 0);
    // Entry times of those that deleted aliases, and of the others.
    let (mut of_aliases, mut of_others) = (Vec::new(), Vec::new());
    let started = Instant::now();
    loop {
        let cmd = Command::PurgeBounded {
            keep_ms: KEEP,
            max_rows: MAX_ROWS,
        };
        let t = Instant::now();
        let answer = apply_entries(&sm.db, &[entry(index, bench_at, cmd)], PurgeBy::Index).unwrap();
        times.push(ms(t));
        index += 1;
        let Some(
            [Response::Purged {
                count,
                rows: r,
                more,
            }],
        ) = Some(answer.as_slice())
        else {
            panic!("{answer:?}");
        };
        assert!(*r <= MAX_ROWS);
        if *count > 0 {
            &mut of_aliases
        } else {
            &mut of_others
        }
        .push(*times.last().unwrap());
        aliases += count;
        rows += r;
        if !more {
            break;
        }
    }
    let wall = ms(started);
    let total: f64 = times.iter().sum();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    println!(
        "bounded purge of the backlog, max_rows {MAX_ROWS}: {} entries deleted {aliases} aliases \
         ({rows} rows); one entry median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         total apply {:.0} ms ({wall:.0} ms wall) against {unbounded_ms:.0} ms for the one \
         unbounded purge (ratio {:.2})",
        times.len(),
        median(times.clone()),
        pct(0.9),
        pct(0.99),
        pct(1.0),
        total,
        total / unbounded_ms,
    );
    let slowest = (0..times.len())
        .max_by(|a, b| times[*a].total_cmp(&times[*b]))
        .unwrap();
    println!(
        "  entries deleting aliases: {}, median {:.1} ms; the others: {}, median {:.1} ms; \
         first entry {:.1} ms; slowest: entry {} of {}",
        of_aliases.len(),
        median(of_aliases.clone()),
        of_others.len(),
        median(of_others.clone()),
        times[0],
        slowest + 1,
        times.len(),
    );
    drop(sm);

    // Other bounds, taken in turn on one copy of the backlog, so that each
    // sees about the same store and cache.
    let sm = open_db(sweep_path);
    let bounds = [250u64, 500, 1000, 2000, 4000];
    let mut by_bound: Vec<Vec<f64>> = vec![Vec::new(); bounds.len()];
    for _ in 0..7 {
        for (k, &max_rows) in bounds.iter().enumerate() {
            let cmd = Command::PurgeBounded {
                keep_ms: KEEP,
                max_rows,
            };
            let t = Instant::now();
            let answer =
                apply_entries(&sm.db, &[entry(index, bench_at, cmd)], PurgeBy::Index).unwrap();
            by_bound[k].push(ms(t));
            index += 1;
            assert!(matches!(
                answer.as_slice(),
                [Response::Purged { more: true, .. }]
            ));
        }
    }
    for (max_rows, times) in bounds.iter().zip(by_bound) {
        let m = median(times.clone());
        println!(
            "one bounded entry of {max_rows} rows, median of {}: {m:.1} ms ({:.1} us per row; \
             runs {:?})",
            times.len(),
            m * 1000.0 / *max_rows as f64,
            times.iter().map(|v| v.round()).collect::<Vec<_>>(),
        );
    }
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux;
/// elsewhere nothing happens and the peak read is the older one).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A field of `/proc/self/status` in KiB (`VmRSS:` now, `VmHWM:` the peak
/// since start or [`reset_peak_rss`]); `None` where there is none.
fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
