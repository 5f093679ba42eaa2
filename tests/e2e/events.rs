//! Business events against the real stack: the demo config's `events:` mappings (topics under
//! the test's prefix) over the legacy functions' transactions, the outbox in both forms,
//! contract violations to the dead-letter topic, the REPLICA IDENTITY refusal, and
//! `walbridge contracts check`.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value as Json;
use walbridge::tail::Event;

use crate::harness::TestDb;

/// The repo's `pipelines.yaml` `events:` section with topics under the test's prefix and
/// `extra_mappings` (YAML list items, indented by four spaces) added.
fn events_yaml(db: &TestDb, extra_mappings: &str, outbox_table: Option<&str>) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/pipelines.yaml")).unwrap();
    let section = &text[text.find("\nevents:\n").expect("events section") + 1..];
    let mut section = section
        .replace("topic: retail.", &format!("topic: {}.retail.", db.name))
        .replace(
            "topic_prefix: retail",
            &format!("topic_prefix: {}.retail", db.name),
        )
        .replace(
            "contracts_dir: avro/contracts",
            &format!("contracts_dir: \"{root}/avro/contracts\""),
        )
        .replace(
            "message_prefix: walbridge.outbox",
            &format!("message_prefix: {}.outbox", db.name),
        );
    if let Some(t) = outbox_table {
        section = section.replace("  outbox:\n", &format!("  outbox:\n    table: {t}\n"));
    }
    section.replace("  mappings:\n", &format!("  mappings:\n{extra_mappings}"))
}

fn write_config(db: &TestDb, events: &str) -> std::path::PathBuf {
    let p = db.dir.join("pipelines.yaml");
    std::fs::write(&p, db.config_yaml() + events).unwrap();
    p
}

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

const FULL: &[&str] = &[
    "ALTER TABLE oms.orders REPLICA IDENTITY FULL",
    "ALTER TABLE oms.prices REPLICA IDENTITY FULL",
    "ALTER TABLE wms.stock_levels REPLICA IDENTITY FULL",
];

fn of_type<'a>(events: &'a [Event], ty: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| {
            e.headers.get("walbridge.event_type").map(String::as_str) == Some(ty)
                && !e.topic.ends_with(".dlq")
        })
        .collect()
}

fn value(e: &Event) -> &Json {
    e.value.as_ref().expect("an event has a value")
}

/// Decoded Avro nullable unions may come wrapped; this reads the plain value.
fn plain(v: &Json) -> &Json {
    match v {
        Json::Object(o) if o.len() == 1 => o.values().next().unwrap_or(v),
        _ => v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_workload_becomes_the_twelve_business_events() {
    let db = TestDb::new("events").await;
    db.exec(FULL).await;
    let config = write_config(&db, &events_yaml(&db, "", None));
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    wait_streaming(&db, &mut wb).await;

    // One order of 1 line and one of 50 lines through the legacy function.
    let skus: Vec<String> = db
        .client
        .query(
            "SELECT sku FROM wms.stock_levels GROUP BY sku HAVING max(on_hand - reserved) >= 5 ORDER BY sku LIMIT 50",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(skus.len(), 50, "fixture has 50 SKUs in stock");
    let one = format!("[{{\"sku\":\"{}\",\"qty\":2}}]", skus[0]);
    let fifty = format!(
        "[{}]",
        skus.iter()
            .map(|s| format!("{{\"sku\":\"{s}\",\"qty\":1}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let on_hand_before = on_hand(&db).await;
    let order1: i64 = db
        .client
        .query_one("SELECT oms.place_order(1, $1::text::jsonb)", &[&one])
        .await
        .unwrap()
        .get(0);
    let order50: i64 = db
        .client
        .query_one("SELECT oms.place_order(2, $1::text::jsonb)", &[&fifty])
        .await
        .unwrap()
        .get(0);
    // The simulator drives everything else (pay, ship, deliver, cancel, return, reprice, …).
    legacy_fixtures::simulate(
        &db.client,
        &legacy_fixtures::SimulateOptions {
            seed: 7,
            rate: 10_000.0,
            max_transactions: Some(600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    db.wait_caught_up(&mut wb).await;

    let types = [
        "OrderPlaced",
        "OrderStatusChanged",
        "OrderCancelled",
        "PaymentAuthorized",
        "PaymentFailed",
        "ItemReserved",
        "ReservationReleased",
        "StockAdjusted",
        "ShipmentCreated",
        "ReturnInitiated",
        "PriceChanged",
        "CustomerUpdated",
    ];
    let events = db
        .events_until(|ev| types.iter().all(|t| !of_type(ev, t).is_empty()))
        .await;
    let seen: BTreeSet<&str> = types
        .iter()
        .copied()
        .filter(|t| !of_type(&events, t).is_empty())
        .collect();
    assert_eq!(seen.len(), 12, "every event type arrives: {seen:?}");
    assert!(
        !events.iter().any(|e| e.topic.ends_with(".dlq")),
        "no dead letters from the demo mappings: {:?}",
        events
            .iter()
            .filter(|e| e.topic.ends_with(".dlq"))
            .map(value)
            .collect::<Vec<_>>()
    );

    // OrderPlaced: one event per order, with every line and the final total.
    let placed = |id: i64| -> Vec<&Event> {
        of_type(&events, "OrderPlaced")
            .into_iter()
            .filter(|e| value(e)["order_id"] == id)
            .collect()
    };
    for (id, lines) in [(order1, 1usize), (order50, 50)] {
        let p = placed(id);
        assert_eq!(p.len(), 1, "one OrderPlaced for order {id}");
        let v = value(p[0]);
        assert_eq!(v["lines"].as_array().unwrap().len(), lines, "{v}");
        let total: String = db
            .client
            .query_one("SELECT total::text FROM oms.orders WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(p[0].key.as_ref().unwrap(), &Json::String(id.to_string()));
        assert_eq!(p[0].topic, format!("{}.retail.orders", db.name));
        assert_ne!(total, "0.00");
        // Decimals decode as strings or numbers depending on the decoder; compare as text.
        let got = v["total"].to_string().trim_matches('"').to_owned();
        assert!(
            got.starts_with(total.trim_end_matches('0').trim_end_matches('.')),
            "total {got} vs {total}"
        );
        assert!(
            v["source"]["table"].to_string().contains("oms.orders"),
            "{v}"
        );
        let id_header = p[0].event_id().unwrap();
        assert!(id_header.ends_with(":order_placed"), "{id_header}");
        assert_eq!(v["event_id"], id_header);
        assert!(p[0].headers.contains_key("walbridge.causation_id"));
        assert!(p[0].headers["traceparent"].starts_with("00-"));
    }
    let v50 = value(placed(order50)[0]);
    let line_skus: Vec<&str> = v50["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["sku"].as_str().unwrap())
        .collect();
    assert_eq!(
        line_skus,
        skus.iter().map(String::as_str).collect::<Vec<_>>()
    );

    // StockAdjusted: delta = new - old; per stock item the deltas add up to how far on_hand
    // moved over the run (items without events did not move).
    let mut by_item: std::collections::BTreeMap<String, i64> = Default::default();
    for e in of_type(&events, "StockAdjusted") {
        let v = value(e);
        assert_eq!(
            v["on_hand"].as_i64().unwrap() - v["previous_on_hand"].as_i64().unwrap(),
            v["delta"].as_i64().unwrap()
        );
        *by_item
            .entry(format!(
                "{}@{}",
                v["sku"].as_str().unwrap(),
                v["location_code"].as_str().unwrap()
            ))
            .or_default() += v["delta"].as_i64().unwrap();
    }
    assert!(!by_item.is_empty());
    let on_hand_after = on_hand(&db).await;
    for (item, before) in &on_hand_before {
        let after = on_hand_after[item];
        assert_eq!(
            by_item.get(item).copied().unwrap_or(0),
            after - before,
            "deltas of {item}"
        );
    }

    // A status change carries both sides of the transition.
    let s = of_type(&events, "OrderStatusChanged");
    assert!(
        s.iter()
            .all(|e| value(e)["from_status"] != value(e)["to_status"])
    );
    assert!(
        s.iter()
            .any(|e| value(e)["from_status"] == "pending" && value(e)["to_status"] == "paid")
    );
    let c = of_type(&events, "OrderCancelled");
    assert!(
        c.iter()
            .all(|e| ["pending", "paid"].contains(&value(e)["previous_status"].as_str().unwrap()))
    );
    let pc = of_type(&events, "PriceChanged");
    assert!(
        pc.iter()
            .all(|e| plain(&value(e)["old_price"]) != &value(e)["new_price"])
    );
    let sh = of_type(&events, "ShipmentCreated");
    assert!(
        sh.iter()
            .all(|e| !value(e)["lines"].as_array().unwrap().is_empty())
    );
    wb.stop();
}

async fn on_hand(db: &TestDb) -> std::collections::BTreeMap<String, i64> {
    db.client
        .query(
            "SELECT sku || '@' || location_code, on_hand::int8 FROM wms.stock_levels",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn wait_streaming(db: &TestDb, wb: &mut crate::harness::Walbridge) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let streaming = db
            .client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = $1 AND r.state IN ('streaming', 'catchup')",
                &[&db.name],
            )
            .await
            .unwrap()
            .is_some();
        if streaming {
            return;
        }
        if let Some(status) = wb.try_exit() {
            panic!(
                "walbridge exited ({status}) before streaming; log:\n{}",
                wb.log()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not streaming; log:\n{}",
            wb.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mappings_reading_old_values_are_refused_without_replica_identity_full() {
    let db = TestDb::new("events_ident").await;
    let config = write_config(&db, &events_yaml(&db, "", None));
    let (ok, doctor) = walbridge(&["doctor"], &config);
    assert!(!ok, "{doctor}");
    for t in ["oms.orders", "oms.prices", "wms.stock_levels"] {
        assert!(
            doctor.contains(&format!("ALTER TABLE {t} REPLICA IDENTITY FULL;")),
            "doctor names {t}:\n{doctor}"
        );
    }
    assert!(
        doctor.contains("stock_adjusted (events.mappings[7]) reads old.on_hand, old.reserved"),
        "{doctor}"
    );
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    let status = wb.wait(std::time::Duration::from_secs(50));
    assert!(!status.success());
    let log = wb.log();
    assert!(
        log.contains("ALTER TABLE wms.stock_levels REPLICA IDENTITY FULL;"),
        "{log}"
    );
    assert!(log.contains("REPLICA IDENTITY FULL"), "{log}");
}

const OUTBOX: &str = "CREATE TABLE oms.outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
    aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL)";

/// A mapping that writes a nullable column into a non-nullable contract field: a customer
/// without a phone violates it.
const BAD_MAPPING: &str = "    - name: customer_phone_as_email
      table: oms.customers
      on: update
      event: CustomerUpdated
      key: new.id
      topic: TOPIC
      fields:
        customer_id: new.id
        email: new.phone
        first_name: new.first_name
        last_name: new.last_name
        country: new.country
        marketing_opt_in: new.marketing_opt_in
        updated_at: new.updated_at
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_and_messages_become_events_and_violations_go_to_the_dead_letter_topic() {
    let db = TestDb::new("events_outbox").await;
    db.exec(FULL).await;
    db.exec(&[OUTBOX]).await;
    let bad = BAD_MAPPING.replace("TOPIC", &format!("{}.retail.customers", db.name));
    let config = write_config(&db, &events_yaml(&db, &bad, Some("oms.outbox")));
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    wait_streaming(&db, &mut wb).await;
    let prefix = format!("{}.outbox", db.name);
    db.exec(&[
        // Outbox row, deleted in the same transaction: only the insert counts.
        "BEGIN; INSERT INTO oms.outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES \
         ('00000000-0000-0000-0000-00000000000a', 'loyalty', 'c-1', 'PointsGranted', '{\"points\": 5}'); \
         DELETE FROM oms.outbox; COMMIT",
        // A contract event through the outbox table.
        "INSERT INTO oms.outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES \
         ('00000000-0000-0000-0000-00000000000b', 'prices', 'SKU-X', 'PriceChanged', \
          '{\"sku\": \"SKU-X\", \"currency\": \"EUR\", \"old_price\": \"1.00\", \"new_price\": \"2.50\", \"valid_from\": \"2024-05-01\"}')",
        // The same through a logical message, and one that violates the contract (new_price missing).
        &format!("SELECT pg_logical_emit_message(true, '{prefix}', '{{\"id\": \"m-1\", \"aggregate_type\": \"prices\", \"aggregate_id\": \"SKU-Y\", \"event_type\": \"PriceChanged\", \"payload\": {{\"sku\": \"SKU-Y\", \"currency\": \"EUR\", \"new_price\": 3.25, \"valid_from\": \"2024-05-02\"}}}}')"),
        &format!("SELECT pg_logical_emit_message(true, '{prefix}', '{{\"id\": \"m-2\", \"aggregate_type\": \"prices\", \"aggregate_id\": \"SKU-Z\", \"event_type\": \"PriceChanged\", \"payload\": {{\"sku\": \"SKU-Z\", \"currency\": \"EUR\", \"valid_from\": \"2024-05-02\"}}}}')"),
        // The bad mapping: customer 5 has no phone.
        "UPDATE oms.customers SET phone = NULL WHERE id = 5",
        "UPDATE oms.customers SET city = 'Leeds' WHERE id = 5",
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    let dlq = format!("{}.dlq", db.name);
    let events = db
        .events_until(|ev| {
            ev.iter().filter(|e| e.topic == dlq).count() >= 3
                && ev
                    .iter()
                    .filter(|e| e.topic.ends_with(".retail.prices"))
                    .count()
                    >= 2
                && ev.iter().any(|e| e.topic.ends_with(".retail.loyalty"))
        })
        .await;
    let loyalty: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == format!("{}.retail.loyalty", db.name))
        .collect();
    assert_eq!(
        loyalty.len(),
        1,
        "the deleted outbox row still became one event"
    );
    assert_eq!(value(loyalty[0])["points"], 5);
    assert_eq!(
        loyalty[0].event_id(),
        Some("00000000-0000-0000-0000-00000000000a")
    );
    assert_eq!(loyalty[0].key.as_ref().unwrap(), "c-1");
    assert_eq!(loyalty[0].headers["walbridge.event_type"], "PointsGranted");
    let prices: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == format!("{}.retail.prices", db.name))
        .collect();
    let ids: BTreeSet<&str> = prices.iter().filter_map(|e| e.event_id()).collect();
    assert_eq!(
        ids,
        BTreeSet::from(["00000000-0000-0000-0000-00000000000b", "m-1"]),
        "{prices:?}"
    );
    for p in &prices {
        assert_eq!(p.headers["walbridge.event_type"], "PriceChanged");
        assert!(p.headers.contains_key("walbridge.schema_id"));
        assert_eq!(value(p)["event_id"].as_str(), p.event_id());
    }
    assert!(
        !events.iter().any(|e| e.topic.ends_with("oms.outbox")),
        "outbox rows are events, not row changes"
    );
    let letters: Vec<&Json> = events
        .iter()
        .filter(|e| e.topic == dlq)
        .map(value)
        .collect();
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"]["message"].as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("m-2") && r.contains("new_price")),
        "{reasons:?}"
    );
    let bad: Vec<&&Json> = letters
        .iter()
        .filter(|l| {
            l["event_id"]
                .as_str()
                .unwrap()
                .ends_with(":customer_phone_as_email")
        })
        .collect();
    assert_eq!(
        bad.len(),
        2,
        "both updates of the phoneless customer: {reasons:?}"
    );
    assert_eq!(bad[0]["reason"]["column"], "email");
    assert!(
        bad[0]["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("is null but the contract requires string"),
        "{}",
        bad[0]
    );
    assert_eq!(bad[0]["after"]["values"]["id"], "5");
    // The good mapping on the same table still produced its events.
    assert_eq!(of_type(&events, "CustomerUpdated").len(), 2);
    wb.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_check_passes_on_the_demo_mapping_and_names_each_problem() {
    let db = TestDb::new("events_check").await;
    let good = write_config(&db, &events_yaml(&db, "", None));
    let (ok, out) = walbridge(&["contracts", "check"], &good);
    assert!(ok, "{out}");
    assert!(
        out.contains("12 mapping(s), 12 contract(s): all checks passed"),
        "{out}"
    );

    // A type error, a nullable column into a required field, and a registry conflict.
    let bad_mapping = "    - name: broken
      table: oms.order_lines
      on: insert
      event: ItemReserved
      key: new.order_id
      topic: TOPIC
      fields:
        sku: new.sku
        location_code: new.reserved_location
        qty: new.sku
        order_id: new.order_id
        line_no: new.line_no
"
    .replace("TOPIC", &format!("{}.retail.stock", db.name));
    // An older PriceChanged without valid_from is registered: the current contract adds a
    // required field, which BACKWARD refuses.
    let c = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/avro/contracts/PriceChanged.avsc"
    ))
    .unwrap();
    let mut old: Json = serde_json::from_str(&c).unwrap();
    old["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "valid_from");
    let subject = format!("{}.retail.prices-walbridge.retail.v1.PriceChanged", db.name);
    let res = reqwest::Client::new()
        .post(format!("{}/subjects/{subject}/versions", db.registry_url))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "schema": old.to_string() }).to_string())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    let bad = write_config(&db, &events_yaml(&db, &bad_mapping, None));
    let (ok, out) = walbridge(&["contracts", "check"], &bad);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL mapping broken (events.mappings[0])"),
        "{out}"
    );
    assert!(
        out.contains("events.mappings[0].fields.qty: is a string but the contract wants int"),
        "{out}"
    );
    assert!(
        out.contains("events.mappings[0].fields.location_code: may be null"),
        "{out}"
    );
    assert!(
        out.contains("FAIL contract PriceChanged") && out.contains("incompatible"),
        "{out}"
    );
    assert!(out.contains("3 problem(s)"), "{out}");

    // Narrowing: a bigint column into an Avro int is reported; smallint and integer fit.
    let narrow = "    - name: narrow
      table: oms.order_lines
      on: insert
      event: ItemReserved
      key: new.order_id
      topic: TOPIC
      fields:
        sku: new.sku
        location_code: \"coalesce(new.reserved_location, '')\"
        qty: new.order_id
        order_id: new.order_id
        line_no: new.line_no
    - name: wide_enough
      table: oms.order_lines
      on: insert
      event: ItemReserved
      key: new.order_id
      topic: TOPIC
      fields:
        sku: new.sku
        location_code: \"coalesce(new.reserved_location, '')\"
        qty: new.qty * 2
        order_id: new.order_id
        line_no: new.line_no
"
    .replace("TOPIC", &format!("{}.retail.stock", db.name));
    let cfg = write_config(&db, &events_yaml(&db, &narrow, None));
    let (ok, out) = walbridge(&["contracts", "check", "--no-registry"], &cfg);
    assert!(!ok, "{out}");
    assert!(
        out.contains("events.mappings[0].fields.qty: narrowing: new.order_id is a bigint (int8), but the contract's field is a 32-bit int"),
        "{out}"
    );
    assert!(out.contains("1 problem(s)"), "only the bigint: {out}");

    // Parse errors point at the line, the key path and the character.
    let broken = write_config(
        &db,
        &events_yaml(&db, "", None).replace(
            "when: \"old.status <> new.status\"",
            "when: \"old.status <> \"",
        ),
    );
    let (ok, out) = walbridge(&["check"], &broken);
    assert!(!ok);
    assert!(out.contains("events.mappings[1].when: cannot parse the expression \"old.status <> \" at character 15: expected a value"), "{out}");
}

/// Copies the repo's contracts into the test's directory (so a test can fix one) and points
/// the config at the copy.
fn own_contracts(db: &TestDb, events: &str) -> (String, std::path::PathBuf) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = db.dir.join("contracts");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(format!("{root}/avro/contracts")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let events = events.replace(
        &format!("contracts_dir: \"{root}/avro/contracts\""),
        &format!("contracts_dir: \"{}\"", dir.display()),
    );
    (events, dir)
}

fn ids_on<'a>(events: &'a [Event], topic: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e.topic == topic)
        .filter_map(|e| e.event_id())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_business_events_are_replayed_after_the_mapping_or_contract_is_fixed() {
    let db = TestDb::new("events_replay").await;
    db.exec(FULL).await;
    let customers = format!("{}.retail.customers", db.name);
    let prices = format!("{}.retail.prices", db.name);
    let bad = BAD_MAPPING.replace("TOPIC", &customers);
    let (events, contracts) = own_contracts(&db, &events_yaml(&db, &bad, None));
    let config = write_config(&db, &events);
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    wait_streaming(&db, &mut wb).await;
    let prefix = format!("{}.outbox", db.name);
    db.exec(&[
        // The mapping puts a null phone into the required `email`.
        "UPDATE oms.customers SET phone = NULL WHERE id = 7",
        // An outbox message without the contract's required new_price.
        &format!("SELECT pg_logical_emit_message(true, '{prefix}', '{{\"id\": \"r-1\", \"aggregate_type\": \"prices\", \"aggregate_id\": \"SKU-R\", \"event_type\": \"PriceChanged\", \"payload\": {{\"sku\": \"SKU-R\", \"currency\": \"EUR\", \"valid_from\": \"2024-05-03\"}}}}')"),
    ])
    .await;
    db.wait_caught_up(&mut wb).await;
    assert!(wb.stop().success());
    let dlq = format!("{}.dlq", db.name);
    let events = db
        .events_until(|ev| ev.iter().filter(|e| e.topic == dlq).count() >= 2)
        .await;
    let letters: Vec<&Event> = events.iter().filter(|e| e.topic == dlq).collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mapped = letters
        .iter()
        .find(|l| l.event_id().unwrap().ends_with(":customer_phone_as_email"))
        .expect("the mapping's letter");
    let mapped_id = mapped.event_id().unwrap().to_owned();
    assert_eq!(value(mapped)["event"]["mapping"], "customer_phone_as_email");
    assert!(
        value(mapped)["reason"]["fix"]
            .as_str()
            .unwrap()
            .contains("walbridge dlq replay"),
        "{}",
        value(mapped)
    );
    assert!(
        ids_on(&events, &customers)
            .iter()
            .all(|id| *id != mapped_id)
    );
    assert!(!ids_on(&events, &prices).contains(&"r-1"));

    // Before the fix: both refused with the reason, both kept.
    let (ok, out) = walbridge(&["dlq", "replay"], &config);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("failed   {mapped_id}")) && out.contains("still invalid"),
        "{out}"
    );
    assert!(
        out.contains("failed   r-1") && out.contains("new_price"),
        "{out}"
    );
    assert!(out.contains("0 replayed, 2 still dead letters"), "{out}");

    // The fixes: the mapping falls back to the customer's email; the contract makes
    // new_price optional (a compatible change).
    let fixed = std::fs::read_to_string(&config).unwrap().replace(
        "email: new.phone",
        "email: \"coalesce(new.phone, new.email)\"",
    );
    std::fs::write(&config, fixed).unwrap();
    let path = contracts.join("PriceChanged.avsc");
    let mut c: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for f in c["fields"].as_array_mut().unwrap() {
        if f["name"] == "new_price" {
            f["type"] = serde_json::json!(["null", f["type"].clone()]);
            f["default"] = Json::Null;
        }
    }
    std::fs::write(&path, c.to_string()).unwrap();
    let (ok, out) = walbridge(&["dlq", "replay"], &config);
    assert!(ok, "{out}");
    assert!(out.contains("2 replayed, 0 still dead letters"), "{out}");

    let events = db
        .events_until(|ev| {
            ids_on(ev, &customers).contains(&mapped_id.as_str())
                && ids_on(ev, &prices).contains(&"r-1")
        })
        .await;
    let got: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == customers && e.event_id() == Some(&mapped_id))
        .collect();
    assert_eq!(got.len(), 1, "the replayed event arrives once: {got:?}");
    let v = value(got[0]);
    assert_eq!(v["event_id"], mapped_id.as_str(), "same id in the value");
    let email: String = db
        .client
        .query_one("SELECT email FROM oms.customers WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v["email"], email.as_str(), "built under the fixed mapping");
    assert_eq!(got[0].key.as_ref().unwrap(), "7");
    // Metadata from the original commit, not from the replay.
    assert_eq!(
        got[0].headers["walbridge.lsn"],
        mapped.headers["walbridge.lsn"]
    );
    assert_eq!(got[0].headers["walbridge.event_type"], "CustomerUpdated");
    assert_eq!(
        got[0].headers["walbridge.correlation_id"],
        mapped.headers["walbridge.correlation_id"]
    );
    let r1: Vec<&Event> = events
        .iter()
        .filter(|e| e.topic == prices && e.event_id() == Some("r-1"))
        .collect();
    assert_eq!(r1.len(), 1);
    assert!(plain(&value(r1[0])["new_price"]).is_null());
    assert_eq!(r1[0].key.as_ref().unwrap(), "SKU-R");

    // A second replay sends nothing.
    let (ok, out) = walbridge(&["dlq", "replay"], &config);
    assert!(
        ok && out.contains("0 replayed, 0 still dead letters"),
        "{out}"
    );
    let (_, out) = walbridge(&["dlq", "list"], &config);
    assert!(out.contains("0 dead letter(s) waiting"), "{out}");
    let events = db.events_until(|_| true).await;
    assert_eq!(
        ids_on(&events, &customers)
            .iter()
            .filter(|id| **id == mapped_id)
            .count(),
        1
    );
    assert_eq!(
        ids_on(&events, &prices)
            .iter()
            .filter(|id| **id == "r-1")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_transactional_outbox_message_becomes_one_event_and_the_slot_moves_past_it() {
    let db = TestDb::new("events_nontx").await;
    db.exec(FULL).await;
    let config = write_config(&db, &events_yaml(&db, "", None));
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    wait_streaming(&db, &mut wb).await;
    let prefix = format!("{}.outbox", db.name);
    // Outside any transaction: no Begin/Commit around it, so it is acked on its own.
    db.exec(&[&format!(
        "SELECT pg_logical_emit_message(false, '{prefix}', '{{\"id\": \"nt-1\", \"aggregate_type\": \"loyalty\", \"aggregate_id\": \"c-9\", \"event_type\": \"PointsGranted\", \"payload\": {{\"points\": 3}}}}')"
    )])
    .await;
    // The slot confirms past the message (wait_caught_up waits for the current WAL end).
    db.wait_caught_up(&mut wb).await;
    let topic = format!("{}.retail.loyalty", db.name);
    let events = db.events_until(|ev| !ids_on(ev, &topic).is_empty()).await;
    let got: Vec<&Event> = events.iter().filter(|e| e.topic == topic).collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].event_id(), Some("nt-1"));
    assert_eq!(got[0].key.as_ref().unwrap(), "c-9");
    assert_eq!(got[0].headers["walbridge.op"], "m");
    assert_eq!(value(got[0])["points"], 3);
    // A restart does not send it again: the slot had confirmed it.
    assert!(wb.stop().success());
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge2.log"));
    wait_streaming(&db, &mut wb).await;
    db.exec(&["UPDATE oms.customers SET city = 'Bath' WHERE id = 3"])
        .await;
    db.wait_caught_up(&mut wb).await;
    let events = db
        .events_until(|ev| {
            ev.iter().any(|e| {
                e.headers.get("walbridge.event_type").map(String::as_str) == Some("CustomerUpdated")
            })
        })
        .await;
    assert_eq!(ids_on(&events, &topic), ["nt-1"]);
    assert!(wb.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_max_transaction_bytes_stops_walbridge_with_the_bound_named() {
    let db = TestDb::new("events_bound").await;
    db.exec(FULL).await;
    let events = events_yaml(&db, "", None).replacen(
        "events:\n",
        "events:\n  max_transaction_bytes: 65536\n",
        1,
    );
    let config = write_config(&db, &events);
    let mut wb = crate::harness::Walbridge::start(&config, &db.dir.join("walbridge.log"));
    wait_streaming(&db, &mut wb).await;
    // Small transactions pass.
    db.exec(&["UPDATE oms.prices SET price = price + 1 WHERE sku IN (SELECT sku FROM oms.prices ORDER BY sku LIMIT 2)"])
        .await;
    db.wait_caught_up(&mut wb).await;
    // One transaction repricing every SKU holds far more than 64 KiB of rows until its commit.
    db.exec(&["UPDATE oms.prices SET price = price + 1"]).await;
    let end = db.current_lsn().await;
    let status = wb.wait(std::time::Duration::from_secs(60));
    assert!(!status.success());
    let log = wb.log();
    assert!(
        log.contains("events.max_transaction_bytes (65536 bytes)")
            && log.contains("split the transaction")
            && log.contains("commit LSN"),
        "{log}"
    );
    assert!(
        db.confirmed().await.unwrap() < end,
        "confirmed past the transaction"
    );
}
