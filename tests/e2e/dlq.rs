//! Dead letters against the real stack: a change Postgres accepts but Avro cannot carry (`NaN`
//! in a `numeric(8,2)` column: Avro's decimal has no NaN) goes to `<prefix>.dlq` with its reason
//! and original values while everything around it streams on; `walbridge dlq list` shows it;
//! after the column is made an unconstrained numeric (sent as a string), `walbridge dlq replay`
//! delivers it under its event id, once. With `kafka.dead_letter: stop` the pipeline stops at it.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use walbridge::tail::Event;

use crate::harness::{TestDb, field, has_inserts};

const TABLE: &str = "CREATE TABLE oms.dl_items (id int PRIMARY KEY, price numeric(8,2), note text)";

fn walbridge(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .expect("run walbridge");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn on_id<'a>(events: &'a [Event], topic: &str, id: i64) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.topic == topic && field(e, "after", "id") == Some(&Json::from(id)))
        .collect()
}

async fn dead_letters_metric(base: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    walbridge::status::parse(&text)
        .iter()
        .find(|s| s.name == "walbridge_dead_letters_total")
        .map(|s| s.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencodable_change_is_dead_lettered_listed_and_replayed_once_after_a_fix() {
    let mut db = TestDb::new("dlq").await;
    let port = walbridge::stack::free_port();
    db.metrics_listen = Some(format!("127.0.0.1:{port}"));
    db.exec(&[TABLE]).await;
    let mut wb = db.start().await;
    db.exec(&[
        "BEGIN; INSERT INTO oms.dl_items VALUES (1, 1.50, 'a'); \
         INSERT INTO oms.dl_items VALUES (2, 'NaN', 'b'); \
         INSERT INTO oms.dl_items VALUES (3, 2.00, 'c'); COMMIT",
        "INSERT INTO oms.dl_items VALUES (4, 3.00, 'd')",
    ])
    .await;
    // The slot moves past the dead-lettered change (its record is acked like any other).
    db.wait_caught_up(&mut wb).await;

    let topic = format!("{}.oms.dl_items", db.name);
    let dlq = format!("{}.dlq", db.name);
    let events = db
        .events_until(|ev| has_inserts(ev, &topic, 3..5) && ev.iter().any(|e| e.topic == dlq))
        .await;
    // Keys spread over partitions: compare as a set.
    let mut ok: Vec<i64> = events
        .iter()
        .filter(|e| e.topic == topic)
        .filter_map(|e| field(e, "after", "id")?.as_i64())
        .collect();
    ok.sort_unstable();
    assert_eq!(
        ok,
        [1, 3, 4],
        "the rows around the bad one arrive, the bad one does not"
    );
    let letters: Vec<&Event> = events.iter().filter(|e| e.topic == dlq).collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = letters[0];
    let v = letter.value.as_ref().expect("a letter has a value");
    // Same transaction as row 1 (index 0), so the letter's id is <commit LSN>:1.
    let first = on_id(&events, &topic, 1)[0];
    let lsn = first.headers["walbridge.lsn"].clone();
    let id = format!("{lsn}:1");
    assert_eq!(letter.event_id(), Some(id.as_str()));
    assert_eq!(
        on_id(&events, &topic, 3)[0].event_id(),
        Some(format!("{lsn}:2").as_str())
    );
    assert_eq!(v["format"], "walbridge.dlq/1");
    assert_eq!(v["event_id"], id.as_str());
    assert_eq!(v["commit_lsn"], lsn.as_str());
    assert_eq!(v["txid"].to_string(), first.headers["walbridge.txid"]);
    assert_eq!(
        (v["schema"].as_str(), v["table"].as_str(), v["op"].as_str()),
        (Some("oms"), Some("dl_items"), Some("c"))
    );
    assert_eq!(v["reason"]["column"], "price");
    assert_eq!(v["reason"]["pg_type"], "numeric(8,2)");
    let message = v["reason"]["message"].as_str().unwrap();
    assert!(message.contains("NaN"), "{message}");
    assert!(
        v["reason"]["fix"].as_str().unwrap().contains("dlq replay"),
        "{v}"
    );
    assert_eq!(v["after"]["values"]["id"], "2");
    assert_eq!(v["after"]["values"]["price"], "NaN");
    assert_eq!(v["after"]["values"]["note"], "b");
    assert!(v["before"].is_null());
    assert_eq!(letter.headers["walbridge.dlq.reason"], message);
    assert_eq!(letter.headers["walbridge.lsn"], lsn);
    assert_eq!(letter.key.as_ref().expect("the row's key")["id"], 2);

    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_letters_metric(&base).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "walbridge_dead_letters_total is not 1: {:?}",
            dead_letters_metric(&base).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let config = db.dir.join("pipelines.yaml");
    let (listed, out) = walbridge(&["dlq", "list"], &config);
    assert!(listed, "{out}");
    assert!(
        out.contains("oms.dl_items")
            && out.contains(&id)
            && out.contains(&lsn)
            && out.contains("NaN"),
        "{out}"
    );
    assert!(out.contains("1 dead letter(s) waiting"), "{out}");

    // Still NaN, so replaying before the fix fails and the letter stays.
    let (replayed, out) = walbridge(&["dlq", "replay"], &config);
    assert!(!replayed, "{out}");
    assert!(out.contains(&format!("failed   {id}")), "{out}");

    // The fix: an unconstrained numeric is sent as a string, which carries NaN (and the
    // registry accepts bytes → string as compatible).
    db.exec(&["ALTER TABLE oms.dl_items ALTER COLUMN price TYPE numeric"])
        .await;
    let (replayed, out) = walbridge(&["dlq", "replay", "--event-id", &id], &config);
    assert!(replayed, "{out}");
    assert!(
        out.contains(&format!("replayed {id}")) && out.contains("1 replayed"),
        "{out}"
    );
    let events = db.events_until(|ev| on_id(ev, &topic, 2).len() == 1).await;
    let two = on_id(&events, &topic, 2);
    assert_eq!(two.len(), 1);
    assert_eq!(
        two[0].event_id(),
        Some(id.as_str()),
        "the replayed change keeps its event id"
    );
    assert_eq!(field(two[0], "after", "price"), Some(&Json::from("NaN")));
    assert_eq!(two[0].headers["walbridge.lsn"], lsn);
    assert_eq!(two[0].key.as_ref().unwrap()["id"], 2);

    // Idempotent: nothing left to replay, nothing sent twice.
    let (replayed, out) = walbridge(&["dlq", "replay"], &config);
    assert!(replayed && out.contains("0 replayed"), "{out}");
    let (_, out) = walbridge(&["dlq", "list"], &config);
    assert!(
        out.contains("0 dead letter(s) waiting in") && out.contains("1 replayed"),
        "{out}"
    );
    let events = db.events_until(|_| true).await;
    assert_eq!(
        on_id(&events, &topic, 2).len(),
        1,
        "a second replay re-sent the change"
    );
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dead_letter_stop_the_pipeline_stops_at_the_change_and_confirms_nothing_past_it() {
    let mut db = TestDb::new("dlqstop").await;
    db.exec(&[TABLE]).await;
    db.kafka_extra = "  dead_letter: stop\n".into();
    let mut wb = db.start().await;
    db.exec(&["INSERT INTO oms.dl_items VALUES (1, 1.50, 'a')"])
        .await;
    db.wait_caught_up(&mut wb).await;
    db.exec(&[
        "INSERT INTO oms.dl_items VALUES (2, 'NaN', 'b')",
        "INSERT INTO oms.dl_items VALUES (3, 2.00, 'c')",
    ])
    .await;
    let end = db.current_lsn().await;
    let status = wb.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "walbridge went on past an unencodable change"
    );
    let log = wb.log();
    assert!(
        log.contains("kafka.dead_letter is stop")
            && log.contains("\"price\"")
            && log.contains("oms.dl_items")
            && log.contains("NaN has no Avro decimal"),
        "the error says what, where and the way out:\n{log}"
    );
    assert!(
        db.confirmed().await.unwrap() < end,
        "the slot confirmed past a change that was not sent"
    );
    let topic = format!("{}.oms.dl_items", db.name);
    let events = db.events_until(|ev| has_inserts(ev, &topic, 1..2)).await;
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.topic == topic)
        .filter_map(|e| field(e, "after", "id")?.as_i64())
        .collect();
    assert_eq!(ids, [1]);
    assert!(
        !events.iter().any(|e| e.topic.ends_with(".dlq")),
        "stop sends nothing to a dead-letter topic"
    );
}
