//! A client nobody here wrote: Confluent's Python client (confluent-kafka's
//! SchemaRegistryClient, AvroSerializer, AvroDeserializer) against walbridge's registry and a
//! topic walbridge wrote. If its registry calls and decoding work, producers, consumers and tools
//! built on Confluent's libraries work too. The script is `tests/python/confluent_client.py`;
//! `tests/install-prereqs.sh` installs the client.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value as Json;

use crate::harness::TestDb;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/python/confluent_client.py"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluents_python_client_uses_the_registry_and_decodes_walbridge_topics() {
    let python = std::env::var("WALBRIDGE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import confluent_kafka.schema_registry.avro"])
        .output()
        .unwrap_or_else(|e| panic!("run {python}: {e}"));
    assert!(
        probe.status.success(),
        "confluent-kafka is not importable by {python} (run tests/install-prereqs.sh): {}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let db = TestDb::new("pyclient").await;
    let mut wb = db.start().await;
    let customers = [
        (910001_i64, "ada@example.com"),
        (910002, "grace@example.com"),
        (910003, "edsger@example.com"),
    ];
    for (id, email) in customers {
        db.client
            .execute(
                "INSERT INTO oms.customers (id, email, first_name, last_name) VALUES ($1, $2, 'F', 'L')",
                &[&id, &email],
            )
            .await
            .unwrap();
    }
    // Confirmed by the slot means acked by the broker: the messages are in the topic.
    db.wait_caught_up(&mut wb).await;

    let topic = format!("{}.oms.customers", db.name);
    let (registry, brokers, prefix) =
        (db.registry_url.clone(), db.brokers.clone(), db.name.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(SCRIPT)
            .args(["--registry", &registry, "--prefix", &prefix])
            .args(["--bootstrap", &brokers, "--topic", &topic])
            .args(["--expect", "3", "--timeout", "60"])
            .output()
            .expect("run confluent_client.py")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "confluent_client.py failed ({}):\nstderr:\n{}\nstdout:\n{stdout}\nwalbridge log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        wb.log()
    );

    let lines: Vec<Json> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let checks: Vec<&str> = lines.iter().filter_map(|l| l["check"].as_str()).collect();
    for want in [
        "register",
        "get_latest_version",
        "get_schema",
        "set_compatibility",
        "get_compatibility",
        "test_compatibility_ok",
        "test_compatibility_bad",
        "register_incompatible_409",
        "deserialize_round_trip",
        "delete_subject_soft",
        "delete_subject_permanent",
        "ids_answer_after_delete",
    ] {
        assert!(checks.contains(&want), "check {want} did not run: {stdout}");
    }

    // Decoded by fastavro through Confluent's deserializer, from the Debezium envelope.
    let mut emails = BTreeMap::new();
    for m in lines.iter().filter(|l| l.get("offset").is_some()) {
        let value = &m["value"];
        assert_eq!(value["op"], "c", "{m}");
        assert_eq!(value["source"]["table"], "customers", "{m}");
        assert!(value["before"].is_null(), "an insert has no before: {m}");
        let id = value["after"]["id"].as_i64().unwrap();
        assert_eq!(m["key"]["id"], id, "key is the primary key: {m}");
        emails.insert(id, value["after"]["email"].as_str().unwrap().to_owned());
    }
    let want: BTreeMap<i64, String> = customers
        .iter()
        .map(|(id, e)| (*id, (*e).to_owned()))
        .collect();
    assert_eq!(emails, want, "rows decoded by Confluent's client");
    assert!(wb.stop().success());
}
