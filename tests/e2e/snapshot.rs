//! The initial snapshot meets the stream: with the application writing all along, the snapshot
//! rows (`r`) followed by the streamed changes rebuild exactly the table's final state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::Value as Json;

use crate::harness::{TestDb, field};

/// (email, loyalty_points) per customer id.
type State = BTreeMap<i64, (String, i64)>;

/// Folds the events of `topic` per key, in Kafka order per partition (a key lives on one
/// partition): `r`/`c`/`u` put the `after` row, `d` removes the key.
fn fold(events: &[walbridge::tail::Event], topic: &str) -> State {
    let mut ordered: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topic && e.value.is_some())
        .collect();
    ordered.sort_by_key(|e| (e.partition, e.offset));
    let mut state = State::new();
    for e in ordered {
        let id = e
            .key
            .as_ref()
            .and_then(|k| k["id"].as_i64())
            .expect("key id");
        match e.op() {
            Some("r" | "c" | "u") => {
                let email = field(e, "after", "email").and_then(Json::as_str);
                let points = field(e, "after", "loyalty_points").and_then(Json::as_i64);
                state.insert(id, (email.unwrap().to_owned(), points.unwrap()));
            }
            Some("d") => {
                state.remove(&id);
            }
            other => panic!("unexpected op {other:?} on {topic}"),
        }
    }
    state
}

async fn table_state(db: &TestDb) -> State {
    db.client
        .query(
            "SELECT id, email::text, loyalty_points::int8 FROM oms.customers",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Inserts, updates (also of seeded rows, also with text that COPY must escape) and deletes
/// customers, one small transaction at a time, until `stop`.
fn spawn_writer(
    dsn: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let new_id = 2_000_000 + i;
            let seeded = 1 + (i * 7) % 300;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO oms.customers (id, email, first_name, last_name, loyalty_points)
                   VALUES ({new_id}, 'w{i}@example.com', 'W', 'R', {i});
                 UPDATE oms.customers SET loyalty_points = loyalty_points + 1,
                   email = E'tab\\there\\\\back\\nline{i}@example.com' WHERE id = {seeded};
                 UPDATE oms.customers SET loyalty_points = loyalty_points + 5 WHERE id = {new_id} - 1;
                 DELETE FROM oms.customers WHERE id = {new_id} - 3;
                 COMMIT;"
            ))
            .await
            .unwrap();
            i += 1;
            done.store(i as u64, Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
    })
}

/// `n` more customers with ids from 1,000,000 and names `name_len` long (to size the table).
async fn bulk_customers(db: &TestDb, n: i64, name_len: i32) {
    db.client
        .execute(
            "INSERT INTO oms.customers (id, email, first_name, last_name, loyalty_points) \
             SELECT g, 'bulk' || g || '@example.com', repeat('F', $2), repeat('L', $2), g % 1000 \
             FROM generate_series(1000000, 999999 + $1::int8) g",
            &[&n, &name_len],
        )
        .await
        .unwrap();
}

/// Lets the writer make `more` transactions from now, then stops it.
async fn finish_writes(
    done: &AtomicU64,
    stop: &AtomicBool,
    writer: tokio::task::JoinHandle<()>,
    more: u64,
) {
    let from = done.load(Ordering::Relaxed);
    wait_writes(done, from + more).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

async fn wait_writes(done: &AtomicU64, at_least: u64) {
    while done.load(Ordering::Relaxed) < at_least {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_meets_the_stream_without_loss_or_duplicates() {
    let mut db = TestDb::new("snapshot").await;
    db.snapshot = "initial";
    // Enough customers for several 1 MiB chunks, copied by three workers at once.
    bulk_customers(&db, 30_000, 40).await;
    db.source_extra = "  snapshot_workers: 3\n  snapshot_chunk_mb: 1\n".into();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(db.dsn.clone(), stop.clone(), done.clone());
    // Writing before, while and after the slot is created and the tables are copied.
    wait_writes(&done, 30).await;
    let mut wb = db.start().await;
    finish_writes(&done, &stop, writer, 150).await;
    db.wait_caught_up(&mut wb).await;

    let want = table_state(&db).await;
    let topic = format!("{}.oms.customers", db.name);
    let events = db.events_until(|ev| fold(ev, &topic) == want).await;
    assert!(wb.stop().success());

    assert_state_matches(&want, &fold(&events, &topic));

    let on_topic: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topic && e.value.is_some())
        .collect();
    let reads: Vec<_> = on_topic.iter().filter(|e| e.op() == Some("r")).collect();
    let read_keys: HashSet<i64> = reads
        .iter()
        .map(|e| e.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        read_keys.len(),
        reads.len(),
        "a row was read twice by the snapshot"
    );
    // The writer inserted before the slot existed: the snapshot holds the seeds and those.
    assert!(
        reads.len() > 30_300,
        "{} snapshot rows; the 30,300 seeded customers and the early inserts expected",
        reads.len()
    );
    // The copy really was split: chunk numbers appear in the event ids.
    let chunks: HashSet<&str> = reads
        .iter()
        .filter_map(|e| e.event_id().unwrap().rsplit(':').nth(1))
        .collect();
    assert!(chunks.len() >= 3, "snapshot chunks seen: {chunks:?}");
    for r in &reads {
        let v = r.value.as_ref().unwrap();
        assert_eq!(
            v["source"]["snapshot"], "true",
            "source.snapshot of a snapshot row"
        );
        assert!(v["before"].is_null(), "a snapshot row has no before");
    }
    // A row created after the consistent point is streamed, never also in the snapshot; a
    // streamed insert of a key the snapshot holds would mean the two overlap.
    let created_twice: Vec<i64> = on_topic
        .iter()
        .filter(|e| e.op() == Some("c"))
        .map(|e| e.key.as_ref().unwrap()["id"].as_i64().unwrap())
        .filter(|id| read_keys.contains(id))
        .collect();
    assert!(
        created_twice.is_empty(),
        "inserted after the snapshot yet read by it: {created_twice:?}"
    );
    // Snapshot events come before every streamed event of their key.
    let mut first_streamed: HashMap<i64, i64> = HashMap::new();
    for e in on_topic.iter().filter(|e| e.op() != Some("r")) {
        let id = e.key.as_ref().unwrap()["id"].as_i64().unwrap();
        let o = first_streamed.entry(id).or_insert(e.offset);
        *o = (*o).min(e.offset);
    }
    for r in &reads {
        let id = r.key.as_ref().unwrap()["id"].as_i64().unwrap();
        if let Some(o) = first_streamed.get(&id) {
            assert!(
                r.offset < *o,
                "key {id}: snapshot row after a streamed change"
            );
        }
    }

    let mut ids = HashSet::new();
    for e in events.iter().filter(|e| e.value.is_some()) {
        let id = e.event_id().unwrap();
        assert!(ids.insert(id), "event id {id} delivered twice");
    }
    assert!(
        reads
            .iter()
            .all(|e| e.event_id().unwrap().starts_with("snapshot:")),
        "snapshot event ids are distinct from streamed ones"
    );
}

/// Chunk ids (first block) of the snapshot rows of `topic`, per snapshot point.
fn chunks_by_point(
    events: &[walbridge::tail::Event],
    topic: &str,
) -> BTreeMap<String, HashSet<String>> {
    let mut out: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("r"))
    {
        // snapshot:<point>:<table>:<chunk>:<n>
        let parts: Vec<&str> = e.event_id().unwrap().split(':').collect();
        out.entry(parts[1].to_owned())
            .or_default()
            .insert(parts[3].to_owned());
    }
    out
}

fn assert_state_matches(want: &State, got: &State) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(k)).collect();
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(k).is_some_and(|g| g != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "Kafka state != table: missing {:?}, extra {:?}, different {:?}",
        &missing[..missing.len().min(20)],
        &extra[..extra.len().min(20)],
        &differ[..differ.len().min(20)]
    );
}

/// `kill -9` in the middle of the initial snapshot, with the application writing: the next start
/// copies only the chunks not yet acked (at a point of the stream), and the state folded from
/// Kafka equals the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_resumes_from_its_finished_chunks() {
    let mut db = TestDb::new("snapresume").await;
    db.snapshot = "initial";
    bulk_customers(&db, 60_000, 60).await;
    db.source_extra = "  snapshot_workers: 1\n  snapshot_chunk_mb: 1\n".into();
    let pending_path = db
        .dir
        .join("state")
        .join(format!("{}.snapshot.json", db.name));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(db.dsn.clone(), stop.clone(), done.clone());
    wait_writes(&done, 10).await;

    let wb = walbridge_start(&db, "walbridge-1.log");
    // Wait until some chunks of oms.customers are acked (they leave the pending record) while
    // others are not; then hold the broker so that the snapshot cannot finish, and kill.
    let customers_left = |text: &str| -> Option<usize> {
        let v: Json = serde_json::from_str(text).ok()?;
        v["tables"]
            .as_array()?
            .iter()
            .find(|t| t["table"] == "oms.customers")
            .and_then(|t| t["ranges"].as_array().map(Vec::len))
    };
    let mut planned = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "snapshot never got midway:\n{}",
            wb.log()
        );
        if let Some(left) = std::fs::read_to_string(&pending_path)
            .ok()
            .and_then(|t| customers_left(&t))
        {
            let total = *planned.get_or_insert(left);
            if left < total {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    db.broker.pause().unwrap();
    wb.kill9();
    db.broker.resume().unwrap();
    let planned = planned.unwrap();
    let left = customers_left(&std::fs::read_to_string(&pending_path).unwrap()).unwrap();
    assert!(
        left > 0 && left < planned,
        "{left} of {planned} chunks left at the kill"
    );

    // The second run streams from the consistent point and copies the chunks left.
    let mut wb = walbridge_start(&db, "walbridge-2.log");
    finish_writes(&done, &stop, writer, 100).await;
    db.wait_caught_up(&mut wb).await;
    // The record goes once every chunk left is copied and acked.
    wait_gone(&pending_path, &mut wb).await;
    let want = table_state(&db).await;
    let topic = format!("{}.oms.customers", db.name);
    let events = db.events_until(|ev| fold(ev, &topic) == want).await;
    assert!(
        wb.log().contains("resuming an unfinished snapshot"),
        "{}",
        wb.log()
    );
    assert!(wb.stop().success());
    assert_state_matches(&want, &fold(&events, &topic));

    // Resumed, not restarted: the second run copied at most the chunks that were left (plus
    // none of the finished ones).
    let points = chunks_by_point(&events, &topic);
    assert!(
        points.len() >= 2,
        "one initial point and at least one resume point: {points:?}"
    );
    let resumed: usize = points.values().skip(1).map(HashSet::len).sum();
    assert!(
        resumed <= left,
        "copied {resumed} chunks again, {left} were left"
    );
}

/// `walbridge snapshot --table` against a running pipeline: the table's rows arrive as `r`
/// events placed in the stream so that per key nothing goes back in time, while the application
/// keeps writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_is_resnapshotted_while_streaming_in_stream_order() {
    let mut db = TestDb::new("resnap").await;
    bulk_customers(&db, 20_000, 1).await;
    db.source_extra = "  snapshot_workers: 2\n  snapshot_chunk_mb: 1\n".into();
    let mut wb = db.start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(db.dsn.clone(), stop.clone(), done.clone());
    wait_writes(&done, 20).await;

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["snapshot", "-c"])
        .arg(db.write_config())
        .args(["--table", "oms.nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("oms.nope") && msg.contains("oms.customers"),
        "{msg}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["snapshot", "-c"])
        .arg(db.write_config())
        .args(["--table", "oms.customers"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    finish_writes(&done, &stop, writer, 150).await;
    db.wait_caught_up(&mut wb).await;

    let want = table_state(&db).await;
    let topic = format!("{}.oms.customers", db.name);
    let pending_path = db
        .dir
        .join("state")
        .join(format!("{}.snapshot.json", db.name));
    // The record goes once every chunk is copied and acked.
    wait_gone(&pending_path, &mut wb).await;
    let events = db
        .events_until(|ev| {
            fold(ev, &topic) == want && ev.iter().filter(|e| e.op() == Some("r")).count() >= 20_300
        })
        .await;
    let log = wb.log();
    assert!(wb.stop().success());
    assert!(
        log.contains("snapshot chunks copied at a point of the stream"),
        "{log}"
    );
    // The stream alone already gives the right state; the re-snapshot must not break it: a
    // snapshot row older than a streamed change of its key, delivered after it, would.
    assert_state_matches(&want, &fold(&events, &topic));
    let reads: Vec<_> = events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("r"))
        .collect();
    // Within one point a row is copied once. (A row updated between two points can be copied
    // at both, moved to a later block: each copy sits where its state belongs in the stream.)
    let mut per_point: HashSet<(String, i64)> = HashSet::new();
    for e in &reads {
        let point = e.event_id().unwrap().split(':').nth(1).unwrap().to_owned();
        let id = e.key.as_ref().unwrap()["id"].as_i64().unwrap();
        assert!(
            per_point.insert((point, id)),
            "row {id} copied twice at one point"
        );
    }
    let keys: HashSet<i64> = per_point.iter().map(|(_, id)| *id).collect();
    let bulk = (1_000_000..1_020_000)
        .filter(|id| keys.contains(id))
        .count();
    assert_eq!(bulk, 20_000, "bulk rows copied");
    assert!(
        chunks_by_point(&events, &topic)
            .values()
            .map(HashSet::len)
            .sum::<usize>()
            >= 2,
        "the table was copied in chunks"
    );
}

/// Waits until the pending-snapshot record is gone (every chunk copied and acked).
async fn wait_gone(path: &std::path::Path, wb: &mut crate::harness::Walbridge) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while path.exists() {
        assert!(wb.try_exit().is_none(), "walbridge exited:\n{}", wb.log());
        assert!(
            std::time::Instant::now() < deadline,
            "the pending record {} is still there: {}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn walbridge_start(db: &TestDb, log: &str) -> crate::harness::Walbridge {
    crate::harness::Walbridge::start(&db.write_config(), &db.dir.join(log))
}

/// `initial_only` copies the tables, drops its slot and exits 0; `when_needed` replaces a slot
/// whose snapshot walbridge cannot vouch for (here: one it never recorded) with a new snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_only_copies_and_leaves_no_slot_and_when_needed_resnapshots_an_unknown_slot() {
    let mut db = TestDb::new("snapmodes").await;
    db.snapshot = "initial_only";
    let mut wb = walbridge_start(&db, "walbridge-1.log");
    let status = wb.wait(std::time::Duration::from_secs(120));
    assert!(status.success(), "{}", wb.log());
    let slots = db
        .client
        .query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert!(slots.is_empty(), "initial_only left its slot behind");
    let topic = format!("{}.oms.customers", db.name);
    let reads = |ev: &[walbridge::tail::Event]| {
        ev.iter()
            .filter(|e| e.topic == topic && e.op() == Some("r"))
            .count()
    };
    let events = db.events_until(|ev| reads(ev) >= 300).await;
    assert_eq!(reads(&events), 300, "every customer copied once");

    // A slot walbridge has no record of: `initial` refuses it, `when_needed` starts over.
    db.exec(&[&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.name
    )])
    .await;
    db.snapshot = "when_needed";
    let wb = db.start().await;
    let events = db.events_until(|ev| reads(ev) >= 600).await;
    assert!(wb.log().contains("taking a new snapshot"), "{}", wb.log());
    assert!(wb.stop().success());
    assert_eq!(reads(&events), 600, "a second full copy");
}

/// On a terminal the snapshot draws a progress line per table (bar, rows, rows/s, ETA).
/// `script` gives walbridge a pseudo-terminal, as a person running it would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_shows_snapshot_progress() {
    let mut db = TestDb::new("snapbar").await;
    db.snapshot = "initial_only";
    bulk_customers(&db, 40_000, 40).await;
    db.exec(&["ANALYZE oms.customers"]).await;
    db.source_extra = "  snapshot_workers: 1\n  snapshot_chunk_mb: 1\n".into();
    let cmd = format!(
        "{} run -c {}",
        env!("CARGO_BIN_EXE_walbridge"),
        db.write_config().display()
    );
    let typescript = db.dir.join("typescript");
    let out = std::process::Command::new("script")
        .args(["-qfec", &cmd])
        .arg(&typescript)
        .output()
        .expect("run walbridge under script(1)");
    let shown = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(out.status.success(), "{shown}");
    let bar = shown
        .split('\r')
        .find(|l| l.contains("oms.customers [") && l.contains("rows") && l.contains("ETA"))
        .unwrap_or_else(|| panic!("no progress line for oms.customers in:\n{shown}"));
    assert!(bar.contains('%') && bar.contains("/s"), "{bar}");
}
