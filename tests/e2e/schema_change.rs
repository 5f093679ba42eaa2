//! Schema changes while walbridge streams: DDL on a captured table and a table created in a
//! captured schema. Nothing may stop the pipeline or lose a change, and every row must arrive in
//! the shape its table had when the row was written.

use std::collections::BTreeSet;

use serde_json::Value as Json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walbridge::tail::Event;

use crate::harness::{self, TestDb, field};

/// `GET {base}{path}` against the registry, as JSON. HTTP/1.0 keeps the answer unchunked and
/// closes the connection at its end, which is all this needs.
async fn registry_get(base: &str, path: &str) -> Json {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = tokio::net::TcpStream::connect(host)
        .await
        .unwrap_or_else(|e| panic!("connect to the registry at {host}: {e}"));
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP answer: {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}\n{body}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"))
}

/// Names of the fields of the row image `which` (`before`/`after`).
fn row_fields(e: &Event, which: &str) -> BTreeSet<String> {
    e.value
        .as_ref()
        .and_then(|v| v.get(which))
        .and_then(Json::as_object)
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// The Avro type of field `name` in the `after` record of a value schema, without the null
/// branch of its union.
fn after_field_type(value_schema: &Json, name: &str) -> Json {
    let after = value_schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "after")
        .expect("envelope has after");
    // `after` is ["null", <record or its name>]; the record is defined on `before` first, so
    // take it from whichever branch carries the definition.
    let before = value_schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "before")
        .expect("envelope has before");
    let record = [before, after]
        .iter()
        .flat_map(|f| f["type"].as_array().cloned().unwrap_or_default())
        .find(|t| t.get("fields").is_some())
        .expect("row record defined in the envelope");
    let field = record["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("row record has no field {name}: {record}"));
    match &field["type"] {
        Json::Array(branches) => branches
            .iter()
            .find(|b| *b != "null")
            .cloned()
            .expect("non-null branch"),
        t => t.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_changes_mid_stream_register_new_versions_and_lose_nothing() {
    let db = TestDb::new("ddl").await;
    db.exec(&[
        "CREATE TABLE oms.shapeshift (id int PRIMARY KEY, qty int, code varchar(10), note text)",
    ])
    .await;
    let mut wb = db.start().await;
    db.exec(&[
        "INSERT INTO oms.shapeshift VALUES (1, 1, 'a', 'first')",
        "ALTER TABLE oms.shapeshift ADD COLUMN color text NOT NULL DEFAULT 'red'",
        "INSERT INTO oms.shapeshift (id, qty, code, note) VALUES (2, 2, 'b', 'second')",
        "INSERT INTO oms.shapeshift VALUES (3, 3, 'c', 'third', 'blue')",
        "ALTER TABLE oms.shapeshift DROP COLUMN note",
        "INSERT INTO oms.shapeshift VALUES (4, 4, 'd', 'green')",
        "ALTER TABLE oms.shapeshift RENAME COLUMN code TO sku",
        "INSERT INTO oms.shapeshift VALUES (5, 5, 'e', 'green')",
        // DDL between rows of one transaction: row 6 has the old types, row 7 the new.
        "BEGIN;
             INSERT INTO oms.shapeshift VALUES (6, 6, 'f', 'grey');
             ALTER TABLE oms.shapeshift ALTER COLUMN qty TYPE bigint;
             ALTER TABLE oms.shapeshift ALTER COLUMN sku TYPE text;
             INSERT INTO oms.shapeshift VALUES (7, 1099511627776, 'longer than ten', 'black');
             COMMIT",
        // A row written before all the DDL, updated after it: its event has today's shape.
        "UPDATE oms.shapeshift SET qty = 10 WHERE id = 1",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let topic = format!("{}.oms.shapeshift", db.name);
    let events = db
        .events_until(|ev| {
            harness::has_inserts(ev, &topic, 1..8)
                && ev.iter().any(|e| e.topic == topic && e.op() == Some("u"))
        })
        .await;
    assert!(
        wb.try_exit().is_none(),
        "walbridge stopped on a schema change; log:\n{}",
        wb.log()
    );

    let on_topic: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == topic && e.value.is_some())
        .collect();
    let insert = |id: i64| -> &Event {
        let found: Vec<&&Event> = on_topic
            .iter()
            .filter(|e| e.op() == Some("c") && field(e, "after", "id") == Some(&Json::from(id)))
            .collect();
        assert_eq!(found.len(), 1, "one insert event for id {id}");
        found[0]
    };
    let original = set(&["id", "qty", "code", "note"]);
    let added = set(&["id", "qty", "code", "note", "color"]);
    let dropped = set(&["id", "qty", "code", "color"]);
    let renamed = set(&["id", "qty", "sku", "color"]);
    for (id, want, what) in [
        (1, &original, "before any DDL"),
        (2, &added, "after ADD COLUMN"),
        (3, &added, "after ADD COLUMN"),
        (4, &dropped, "after DROP COLUMN"),
        (5, &renamed, "after RENAME COLUMN"),
        (6, &renamed, "before the type change, same transaction"),
        (7, &renamed, "after the type change"),
    ] {
        assert_eq!(&row_fields(insert(id), "after"), want, "row {id}, {what}");
    }
    assert_eq!(
        field(insert(2), "after", "color").unwrap(),
        "red",
        "column default"
    );
    assert_eq!(field(insert(3), "after", "color").unwrap(), "blue");
    assert_eq!(field(insert(4), "after", "code").unwrap(), "d");
    assert_eq!(field(insert(5), "after", "sku").unwrap(), "e");
    assert_eq!(field(insert(6), "after", "qty").unwrap(), 6);
    assert_eq!(
        field(insert(7), "after", "qty").unwrap(),
        1_099_511_627_776_i64,
        "a bigint beyond int's range"
    );
    assert_eq!(field(insert(7), "after", "sku").unwrap(), "longer than ten");
    let update: Vec<&&Event> = on_topic.iter().filter(|e| e.op() == Some("u")).collect();
    assert_eq!(update.len(), 1);
    assert_eq!(row_fields(update[0], "after"), renamed);
    assert_eq!(field(update[0], "after", "qty").unwrap(), 10);
    assert_eq!(
        field(update[0], "after", "color").unwrap(),
        "red",
        "an old row shows the default of a column added after it"
    );

    // One value schema version per shape: original, +color, -note, code→sku, new types.
    let subject = format!("{topic}-value");
    let versions = registry_get(&db.registry_url, &format!("/subjects/{subject}/versions")).await;
    assert_eq!(
        versions.as_array().map(Vec::len),
        Some(5),
        "versions of {subject}: {versions}"
    );
    let first = registry_get(&db.registry_url, &format!("/subjects/{subject}/versions/1")).await;
    let latest = registry_get(
        &db.registry_url,
        &format!("/subjects/{subject}/versions/latest"),
    )
    .await;
    let first: Json = serde_json::from_str(first["schema"].as_str().unwrap()).unwrap();
    let latest: Json = serde_json::from_str(latest["schema"].as_str().unwrap()).unwrap();
    assert_eq!(
        after_field_type(&first, "qty"),
        "int",
        "int column in version 1"
    );
    assert_eq!(
        after_field_type(&latest, "qty"),
        "long",
        "bigint after ALTER TYPE"
    );
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_mid_stream_is_captured() {
    let db = TestDb::new("newtable").await;
    let mut wb = db.start().await;
    db.exec(&[
        // Created and filled in one transaction: the first rows must not be missed.
        "BEGIN;
             CREATE TABLE oms.new_thing (id bigint PRIMARY KEY, label text);
             INSERT INTO oms.new_thing SELECT g, 'early ' || g FROM generate_series(1, 10) g;
             COMMIT",
        "INSERT INTO oms.new_thing SELECT g, 'later ' || g FROM generate_series(11, 20) g",
        "UPDATE oms.new_thing SET label = 'changed' WHERE id = 20",
        // Tables known from the start keep flowing.
        "UPDATE oms.customers SET loyalty_points = 4242 WHERE id = 1",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let topic = format!("{}.oms.new_thing", db.name);
    let customers = format!("{}.oms.customers", db.name);
    let events = db
        .events_until(|ev| {
            harness::has_inserts(ev, &topic, 1..21)
                && ev.iter().any(|e| e.topic == topic && e.op() == Some("u"))
                && ev.iter().any(|e| e.topic == customers)
        })
        .await;
    let ids: Vec<i64> = events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some("c"))
        .filter_map(|e| field(e, "after", "id")?.as_i64())
        .collect();
    harness::assert_same_ids(&ids, 1..21, "inserts into the new table");
    assert_eq!(ids.len(), 20, "each insert once");
    let early = events
        .iter()
        .find(|e| e.topic == topic && field(e, "after", "id") == Some(&Json::from(1)))
        .unwrap();
    assert_eq!(field(early, "after", "label").unwrap(), "early 1");
    assert_eq!(
        early.key.as_ref().unwrap()["id"],
        1,
        "keyed by its primary key"
    );
    let update = events
        .iter()
        .find(|e| e.topic == topic && e.op() == Some("u"))
        .unwrap();
    assert_eq!(field(update, "after", "label").unwrap(), "changed");
    assert!(
        events.iter().any(|e| e.topic == customers
            && field(e, "after", "loyalty_points") == Some(&Json::from(4242))),
        "the tables known at start still stream"
    );
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_naming_tables_one_by_one_is_used_and_its_gap_reported() {
    let db = TestDb::new("bytable").await;
    // A publication the legacy team made by hand, listing today's tables of oms and wms.
    let tables: Vec<String> = db
        .client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables \
             WHERE schemaname IN ('oms', 'wms')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.exec(&[&format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        db.name,
        tables.join(", ")
    )])
    .await;
    let mut wb = db.start().await;
    db.exec(&["UPDATE oms.customers SET loyalty_points = 77 WHERE id = 1"])
        .await;
    db.wait_caught_up(&mut wb).await;
    let customers = format!("{}.oms.customers", db.name);
    let events = db
        .events_until(|ev| ev.iter().any(|e| e.topic == customers))
        .await;
    assert!(
        events.iter().any(|e| e.topic == customers
            && field(e, "after", "loyalty_points") == Some(&Json::from(77))),
        "the existing publication is streamed"
    );
    let log = wb.log();
    for schema in ["oms", "wms"] {
        assert!(
            log.contains(&format!(
                "ALTER PUBLICATION \"{}\" ADD TABLES IN SCHEMA \"{schema}\"",
                db.name
            )),
            "the log gives the fix for schema {schema}:\n{log}"
        );
    }
    assert!(wb.stop().success());
}

/// A type change the registry calls incompatible (int → text under BACKWARD): by default
/// walbridge stops before sending anything of the new shape and the slot keeps the change;
/// with `registry.on_incompatible: new_version` the next start registers it and streams on;
/// with `dead_letter` a later incompatible change (text → int) goes to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_change_stops_or_becomes_a_new_version_or_dead_letters_as_configured() {
    let mut db = TestDb::new("incompat").await;
    db.exec(&["CREATE TABLE oms.strict (id int PRIMARY KEY, qty int)"])
        .await;
    let mut wb = db.start().await;
    db.exec(&["INSERT INTO oms.strict VALUES (1, 1)"]).await;
    db.wait_caught_up(&mut wb).await;
    db.exec(&[
        "ALTER TABLE oms.strict ALTER COLUMN qty TYPE text",
        "INSERT INTO oms.strict VALUES (2, 'two')",
    ])
    .await;
    let end = db.current_lsn().await;
    let status = wb.wait(std::time::Duration::from_secs(60));
    assert!(
        !status.success(),
        "walbridge went on with an incompatible shape"
    );
    let log = wb.log();
    assert!(
        log.contains("oms.strict")
            && log.contains("incompatible")
            && log.contains("on_incompatible"),
        "the error names the table and the way out:\n{log}"
    );
    assert!(
        db.confirmed().await.unwrap() < end,
        "the slot confirmed past a change that was not sent"
    );

    db.registry_extra = "  on_incompatible: new_version\n".into();
    let mut wb = db.start().await;
    db.wait_confirmed(end, &mut wb).await;
    let topic = format!("{}.oms.strict", db.name);
    let events = db
        .events_until(|ev| harness::has_inserts(ev, &topic, 1..3))
        .await;
    assert!(wb.stop().success());
    let two = events
        .iter()
        .find(|e| e.topic == topic && harness::field(e, "after", "id") == Some(&Json::from(2)))
        .expect("row 2");
    assert_eq!(
        harness::field(two, "after", "qty"),
        Some(&Json::from("two"))
    );
    let versions = registry_get(
        &db.registry_url,
        &format!("/subjects/{topic}-value/versions"),
    )
    .await;
    assert_eq!(versions.as_array().map(Vec::len), Some(2), "{versions}");
    // The subject is back at the registry's level, not left at NONE.
    let level = registry_get(
        &db.registry_url,
        &format!("/config/{topic}-value?defaultToGlobal=true"),
    )
    .await;
    assert_eq!(level["compatibilityLevel"], "BACKWARD", "{level}");

    // dead_letter: the table's changes in a refused shape become dead letters; the rest
    // streams on and the slot advances.
    db.registry_extra = "  on_incompatible: dead_letter\n".into();
    let mut wb = db.start().await;
    db.exec(&[
        "ALTER TABLE oms.strict ALTER COLUMN qty TYPE int USING length(qty)",
        "INSERT INTO oms.strict VALUES (3, 3)",
        "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES (7000001, 'after@example.com', 'A', 'B')",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let dlq = format!("{}.dlq", db.name);
    let customers = format!("{}.oms.customers", db.name);
    let events = db
        .events_until(|ev| {
            ev.iter().any(|e| e.topic == dlq)
                && harness::has_inserts(ev, &customers, 7_000_001..7_000_002)
        })
        .await;
    assert!(wb.try_exit().is_none(), "walbridge stopped:\n{}", wb.log());
    assert!(wb.stop().success());
    let letter = events.iter().find(|e| e.topic == dlq).unwrap();
    let v = letter.value.as_ref().unwrap();
    assert_eq!(v["table"], "strict", "{v}");
    assert!(
        v["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("incompatible"),
        "{v}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.topic == topic && harness::field(e, "after", "id") == Some(&Json::from(3))),
        "a row of the refused shape reached the table's topic"
    );
    let versions = registry_get(
        &db.registry_url,
        &format!("/subjects/{topic}-value/versions"),
    )
    .await;
    assert_eq!(
        versions.as_array().map(Vec::len),
        Some(2),
        "nothing registered for the refused shape"
    );
}
