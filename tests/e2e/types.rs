//! Column types and TOAST through the whole stack: a value written to Postgres comes out of
//! Kafka, decoded through the registry, as what Postgres holds. Expected values are computed by
//! Postgres itself from the stored row (epoch arithmetic, `array_to_json`, text output), so a
//! wrong mapping in walbridge shows up as a difference, not as two copies of the same constant.

use serde_json::{Value as Json, json};
use walbridge::tail::Event;

use crate::harness::{TestDb, field};

/// `SELECT <json expression>` rows as `(id, json)`.
async fn json_rows(db: &TestDb, sql: &str) -> Vec<(i64, Json)> {
    db.client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| {
            let text: String = r.get(1);
            (
                r.get(0),
                serde_json::from_str(&text).expect("json from postgres"),
            )
        })
        .collect()
}

fn changes_on<'a>(events: &'a [Event], topic: &str, op: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.topic == topic && e.op() == Some(op))
        .collect()
}

const ZOO_COLUMNS: &str = "id, i2, i4, i8, amount, free, r, d, d_nan, b, t, vc, c3, raw, day, \
                           tod, todtz, ts, tstz, iv, u, j, jb, m, ints, tags, pos";

/// Typical values, then edge values (extremes, ±Infinity, BC, before the epoch, empty), then a
/// NaN numeric among NULLs, then all NULLs.
const ZOO_ROWS: &str = r#"
(1, -32768, 2147483647, -9223372036854775808, -1234567890.12,
 12345678901234567890.123456789, 3.14, 1e300, 'NaN', true,
 E'héllo "wörld"\n\ttab', 'abc', 'ab', '\x00ff7f',
 '2024-02-29', '12:34:56.789', '12:34:56.789+05:30',
 '2024-05-01 12:34:56.789012', '2024-05-01 14:34:56.789012+02',
 '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
 '{"b": [1, 2.50],  "a": null}', '{"b": [1, 2.50],  "a": null}', 'on fire',
 '{1,NULL,3}', '{a,"b c",NULL,"NULL","x\"y","{}"}', 42),
(2, 32767, -1, 0, 0, -0.000000001, '-Infinity', 'Infinity', '-Infinity', false,
 '', '', '', '\x', '0044-03-15 BC', '24:00:00', '00:00:00-15:59',
 '1900-01-01 00:00:00.000001', '1969-12-31 23:59:59.999999+00',
 '-1 days +00:00:00.000001', '00000000-0000-0000-0000-000000000000',
 '[]', '{}', 'calm', '{}', '{}', 1),
(3, NULL, NULL, NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#;

/// What a consumer should read for each column of `oms.type_zoo`, derived by Postgres from the
/// stored row. Each line says which Avro type walbridge maps the column to and how
/// `RegistryClient::decode` shows it.
const ZOO_EXPECTED: &str = "
SELECT id, json_build_object(
    'id', id,
    'i2', i2, 'i4', i4, 'i8', i8,                       -- int / int / long
    'amount', amount::text,                             -- decimal(12,2): plain-notation string
    'free', free::text,                                 -- unconstrained numeric: its text, lossless
    'r', r::float8,                                     -- float: the float4 widened exactly
    'd', d, 'd_nan', d_nan,                             -- double; Postgres spells NaN/±Infinity as strings
    'b', b,
    't', t, 'vc', vc, 'c3', c3,                         -- strings; char(3) keeps its padding
    'raw', CASE WHEN raw IS NOT NULL THEN coalesce(     -- bytes: an array of numbers
        (SELECT json_agg(get_byte(raw, i) ORDER BY i)
           FROM generate_series(0, length(raw) - 1) i), '[]') END,
    'day', day - date '1970-01-01',                     -- date: days since the epoch
    'tod', (extract(epoch FROM tod) * 1000000)::bigint, -- time-micros
    'todtz', todtz::text,                               -- string, Postgres text output
    'ts', (extract(epoch FROM ts) * 1000000)::bigint,   -- local-timestamp-micros
    'tstz', (extract(epoch FROM tstz) * 1000000)::bigint, -- timestamp-micros, UTC
    'iv', iv::text,                                     -- string, ISO 8601 (see below)
    'u', u::text,                                       -- uuid string
    'j', j::text, 'jb', jb::text,                       -- Json as its text
    'm', m::text,                                       -- enum: its label
    'ints', array_to_json(ints), 'tags', array_to_json(tags), -- arrays with null items
    'pos', pos                                          -- domain over int
)::text FROM oms.type_zoo ORDER BY id";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_common_type_round_trips_through_kafka() {
    let db = TestDb::new("types").await;
    db.exec(&[
        "CREATE TYPE oms.mood AS ENUM ('calm', 'busy', 'on fire')",
        "CREATE DOMAIN oms.positive_int AS int CHECK (VALUE > 0)",
        "CREATE TABLE oms.type_zoo (
                id bigint PRIMARY KEY,
                i2 int2, i4 int4, i8 int8,
                amount numeric(12,2), free numeric,
                r real, d double precision, d_nan double precision,
                b bool, t text, vc varchar(20), c3 char(3), raw bytea,
                day date, tod time, todtz timetz, ts timestamp, tstz timestamptz,
                iv interval, u uuid, j json, jb jsonb, m oms.mood,
                ints int4[], tags text[], pos oms.positive_int)",
    ])
    .await;
    let mut wb = db.start().await;
    db.exec(&[&format!(
        "INSERT INTO oms.type_zoo ({ZOO_COLUMNS}) VALUES {ZOO_ROWS}"
    )])
    .await;
    db.wait_caught_up(&mut wb).await;
    let topic = format!("{}.oms.type_zoo", db.name);
    let events = db
        .events_until(|ev| changes_on(ev, &topic, "c").len() >= 4)
        .await;
    let inserts = changes_on(&events, &topic, "c");
    assert_eq!(inserts.len(), 4, "one create per row");

    // walbridge's replication connection prints intervals as ISO 8601 durations.
    db.exec(&["SET IntervalStyle = iso_8601"]).await;
    let expected = json_rows(&db, ZOO_EXPECTED).await;
    assert_eq!(expected.len(), 4);
    let mut mismatches = Vec::new();
    for (id, want) in &expected {
        let event = inserts
            .iter()
            .find(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(*id))
            .unwrap_or_else(|| panic!("no create for row {id}"));
        let after = event.value.as_ref().unwrap()["after"]
            .as_object()
            .expect("after is a record");
        let want = want.as_object().unwrap();
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "row {id}: the Avro record has exactly the table's columns"
        );
        for (col, want) in want {
            if after[col] != *want {
                mismatches.push(format!(
                    "row {id} column {col}: kafka {} vs postgres {want}",
                    after[col]
                ));
            }
        }
        assert_eq!(
            event.key.as_ref().unwrap(),
            &json!({ "id": id }),
            "key of row {id}"
        );
        assert_eq!(
            event.value.as_ref().unwrap()["unavailable_columns"],
            Json::Null,
            "an insert sends every value"
        );
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));

    // The expectations above come from Postgres; these pin the shapes a consumer relies on, so
    // that a query mistake cannot make both sides agree on something wrong.
    let row = |id: i64| {
        inserts
            .iter()
            .find(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(id))
            .unwrap()
            .value
            .as_ref()
            .unwrap()["after"]
            .clone()
    };
    let (r1, r2, r3) = (row(1), row(2), row(3));
    assert_eq!(r1["amount"], "-1234567890.12");
    assert_eq!(r1["free"], "12345678901234567890.123456789");
    assert_eq!(r1["d"], 1e300);
    assert_eq!(r1["d_nan"], "NaN");
    assert_eq!(r2["r"], "-Infinity");
    assert_eq!(r1["c3"], "ab ");
    assert_eq!(r1["raw"], json!([0, 255, 127]));
    assert_eq!(r2["raw"], json!([]));
    assert_eq!(r1["day"], 19782);
    assert_eq!(r1["tstz"], 1_714_566_896_789_012_i64);
    assert_eq!(r1["ts"], r1["tstz"], "the same wall clock, UTC");
    assert!(
        r2["day"].as_i64().unwrap() < -700_000,
        "BC dates stay negative"
    );
    assert_eq!(r2["tstz"], -1);
    assert_eq!(r1["ints"], json!([1, null, 3]));
    assert_eq!(r1["tags"], json!(["a", "b c", null, "NULL", "x\"y", "{}"]));
    assert_eq!(r2["tags"], json!([]));
    assert_eq!(r1["iv"], "P1Y2M3DT4H5M6.789S");
    assert_eq!(r1["todtz"], "12:34:56.789+05:30");
    assert_eq!(r1["t"], "h\u{e9}llo \"w\u{f6}rld\"\n\ttab");
    assert_eq!(r1["m"], "on fire");
    assert_eq!(r1["pos"], 42);
    assert_eq!(r3["free"], "NaN");
    let all_null = row(4);
    let all_null = all_null.as_object().unwrap();
    assert!(
        all_null.iter().all(|(k, v)| k == "id" || v.is_null()),
        "a row of NULLs reads as nulls: {all_null:?}"
    );
    assert!(wb.stop().success());
}

/// About 12.8 KB of hex digits from md5 of random numbers: too big to stay inline, and pglz finds
/// little to compress, so Postgres stores it out of line in the TOAST table.
const BIG_TEXT: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_marked_not_faked() {
    let db = TestDb::new("toast").await;
    db.exec(&[
        "CREATE TABLE oms.toast_default (id bigint PRIMARY KEY, n int, body text)",
        "CREATE TABLE oms.toast_full (id bigint PRIMARY KEY, n int, body text)",
        "ALTER TABLE oms.toast_full REPLICA IDENTITY FULL",
    ])
    .await;
    let mut wb = db.start().await;
    db.exec(&[
        &format!("INSERT INTO oms.toast_default VALUES (1, 1, {BIG_TEXT}), (2, 1, {BIG_TEXT})"),
        &format!("INSERT INTO oms.toast_full VALUES (1, 1, {BIG_TEXT})"),
        // Only the small column changes: pgoutput sends `u` for body.
        "UPDATE oms.toast_default SET n = 2 WHERE id = 1",
        "UPDATE oms.toast_full SET n = 2 WHERE id = 1",
        // A key change under FULL: sent as delete + create, and the create must still carry
        // the unchanged body (from the old row), not a null.
        &format!("INSERT INTO oms.toast_full VALUES (10, 1, {BIG_TEXT})"),
        "UPDATE oms.toast_full SET id = 11 WHERE id = 10",
        // A real NULL, for contrast.
        "UPDATE oms.toast_default SET n = 2, body = NULL WHERE id = 2",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let body = |table: &'static str| {
        let db = &db;
        async move {
            let row = db
                .client
                .query_one(&format!("SELECT body FROM oms.{table} WHERE id = 1"), &[])
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let (body_default, body_full) = (body("toast_default").await, body("toast_full").await);
    assert!(body_default.len() > 8192);

    let (td, tf) = (
        format!("{}.oms.toast_default", db.name),
        format!("{}.oms.toast_full", db.name),
    );
    let events = db
        .events_until(|ev| {
            changes_on(ev, &td, "u").len() >= 2
                && !changes_on(ev, &tf, "u").is_empty()
                && changes_on(ev, &tf, "c")
                    .iter()
                    .any(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(11))
        })
        .await;
    let updated = |topic: &str, id: i64| -> &Event {
        let found: Vec<&Event> = changes_on(&events, topic, "u")
            .into_iter()
            .filter(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(id))
            .collect();
        assert_eq!(found.len(), 1, "one update of {topic} row {id}");
        found[0]
    };

    // The insert carries the whole value.
    let insert = changes_on(&events, &td, "c")
        .into_iter()
        .find(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(1))
        .expect("insert of row 1");
    assert_eq!(field(insert, "after", "body").unwrap(), &body_default);

    // DEFAULT identity: no old row, so the value is unknown. Null, and named as unavailable.
    let u = updated(&td, 1);
    assert_eq!(field(u, "after", "n").unwrap(), 2);
    assert_eq!(field(u, "after", "body"), Some(&Json::Null));
    let v = u.value.as_ref().unwrap();
    assert_eq!(v["unavailable_columns"], json!(["body"]));
    assert!(v["before"].is_null(), "DEFAULT identity sends no old row");
    // No placeholder text anywhere in the event.
    assert!(!v.to_string().contains("unavailable_value"));

    // A real NULL is not listed: that is how a consumer tells the two apart.
    let set_null = updated(&td, 2);
    assert_eq!(field(set_null, "after", "body"), Some(&Json::Null));
    assert_eq!(
        set_null.value.as_ref().unwrap()["unavailable_columns"],
        Json::Null
    );

    // FULL identity: the old row carries the value, and it is the unchanged new value.
    let u = updated(&tf, 1);
    assert_eq!(field(u, "after", "n").unwrap(), 2);
    assert_eq!(field(u, "before", "n").unwrap(), 1);
    assert_eq!(field(u, "after", "body").unwrap(), &body_full);
    assert_eq!(field(u, "before", "body").unwrap(), &body_full);
    assert_eq!(u.value.as_ref().unwrap()["unavailable_columns"], Json::Null);

    let moved = changes_on(&events, &tf, "c")
        .into_iter()
        .find(|e| field(e, "after", "id").and_then(Json::as_i64) == Some(11))
        .expect("create of the new key 11");
    let body_11: String = db
        .client
        .query_one("SELECT body FROM oms.toast_full WHERE id = 11", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        field(moved, "after", "body").unwrap(),
        &body_11,
        "filled from the old row"
    );
    assert_eq!(
        moved.value.as_ref().unwrap()["unavailable_columns"],
        Json::Null
    );
    assert!(wb.stop().success());
}
