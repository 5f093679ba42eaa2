//! The built-in registry server and the client, end to end over HTTP: register a table's
//! schemas, send a framed change through the client's decoder, restart on the same data, and
//! check the Confluent error codes clients rely on.

use std::path::PathBuf;

use avro::{
    Change, Op, RegistryClient, RegistryServer, RunningRegistry, Source, TableSchema, TypeNames,
    wire,
};
use bytes::Bytes;
use cdc::pgoutput::{Column, Relation, ReplicaIdentity, Value};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY_SUBJECT: &str = "legacy.oms.orders-key";
const VALUE_SUBJECT: &str = "legacy.oms.orders-value";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "walbridge-registry-it-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start(dir: &PathBuf) -> RunningRegistry {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    RegistryServer::open(dir).unwrap().spawn(listener).unwrap()
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn orders() -> TableSchema {
    let col = |name: &str, type_oid, type_modifier, key| Column {
        key,
        name: name.into(),
        type_oid,
        type_modifier,
    };
    let rel = Relation {
        id: 1,
        namespace: "oms".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, -1, true),
            col("status", 25, -1, false),
            col("amount", 1700, ((10 << 16) | 2) + 4, false),
            col("placed_at", 1184, -1, false),
            col("tags", 1009, -1, false),
            // Wider than i128 and longer than a one-byte Avro length prefix.
            col("big", 1700, ((200 << 16) | 3) + 4, false),
        ],
    };
    TableSchema::new("legacy.oms.orders", &rel, &TypeNames::new()).unwrap()
}

/// One HTTP/1.1 request on a fresh connection: (status, JSON body).
async fn http(registry: &RunningRegistry, method: &str, path: &str, body: &str) -> (u16, Json) {
    let mut stream = TcpStream::connect(registry.addr()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/vnd.schemaregistry.v1+json"),
        "{head}"
    );
    (
        status,
        serde_json::from_str(body).unwrap_or(Json::String(body.to_owned())),
    )
}

#[tokio::test]
async fn change_round_trips_through_registry_and_survives_restart() {
    let dir = temp_dir("roundtrip");
    let table = orders();
    let registry = start(&dir).await;
    let client = RegistryClient::new(&registry.url()).unwrap();

    let key_id = client
        .register(KEY_SUBJECT, table.key_schema_json())
        .await
        .unwrap();
    let value_id = client
        .register(VALUE_SUBJECT, table.value_schema_json())
        .await
        .unwrap();
    assert_ne!(key_id, value_id);
    // A fresh client (no cache) gets the same ids: the server deduplicates.
    let fresh = RegistryClient::new(&registry.url()).unwrap();
    assert_eq!(
        fresh
            .register(VALUE_SUBJECT, table.value_schema_json())
            .await
            .unwrap(),
        value_id
    );
    // The same schema under another subject reuses the global id, as Confluent does.
    assert_eq!(
        fresh
            .register("other-value", table.value_schema_json())
            .await
            .unwrap(),
        value_id
    );

    let big = format!("-{}.125", "9".repeat(150));
    let before = vec![
        text("7"),
        text("placed"),
        text("12.30"),
        text("2024-05-01 12:34:56.789+00"),
        text("{}"),
        text("0.000"),
    ];
    let after = vec![
        text("7"),
        text("shipped"),
        text("-0.05"),
        text("2024-05-01 14:34:56.789+02"),
        text(r#"{a,NULL,"b c"}"#),
        text(&big),
    ];
    let change = Change {
        op: Op::Update,
        before: Some(&before),
        after: Some(&after),
        source: Source {
            name: "legacy",
            db: "shop",
            schema: "oms",
            table: "orders",
            ts_ms: 1_714_566_896_789,
            tx_id: 991,
            lsn: 23_400_000,
            snapshot: false,
        },
        ts_ms: 1_714_566_897_000,
    };
    let mut datum = Vec::new();
    table.encode_value(&change, &mut datum).unwrap();
    let mut framed = Vec::new();
    wire::frame(value_id, &datum, &mut framed);
    let row = |status: &str, amount: &str, tags: Json, big: &str| {
        json!({
            "id": 7, "status": status, "amount": amount,
            "placed_at": 1_714_566_896_789_000_i64, "tags": tags, "big": big,
        })
    };
    let expected = json!({
        "before": row("placed", "12.30", json!([]), "0.000"),
        "after": row("shipped", "-0.05", json!(["a", null, "b c"]), &big),
        "source": {
            "version": concat!("walbridge-", env!("CARGO_PKG_VERSION")),
            "connector": "postgresql", "name": "legacy", "ts_ms": 1_714_566_896_789_i64,
            "snapshot": "false", "db": "shop", "sequence": null, "schema": "oms",
            "table": "orders", "txId": 991, "lsn": 23_400_000, "xmin": null,
        },
        "op": "u",
        "ts_ms": 1_714_566_897_000_i64,
        "transaction": null,
        "unavailable_columns": null,
    });
    assert_eq!(client.decode(&framed).await.unwrap(), expected);

    let mut key = Vec::new();
    table.encode_key(&after, &mut key).unwrap();
    let mut framed_key = Vec::new();
    wire::frame(key_id, &key, &mut framed_key);
    assert_eq!(
        client.decode(&framed_key).await.unwrap(),
        json!({ "id": 7 })
    );

    registry.stop().await.unwrap();

    // Restart on the same data directory (and a new port).
    let registry = start(&dir).await;
    let client = RegistryClient::new(&registry.url()).unwrap();
    assert_eq!(
        client.schema_by_id(value_id).await.unwrap(),
        *table.value_schema()
    );
    assert_eq!(
        client.schema_by_id(key_id).await.unwrap(),
        *table.key_schema()
    );
    assert_eq!(
        client
            .register(KEY_SUBJECT, table.key_schema_json())
            .await
            .unwrap(),
        key_id
    );
    assert_eq!(
        client
            .register(VALUE_SUBJECT, table.value_schema_json())
            .await
            .unwrap(),
        value_id
    );
    assert_eq!(client.decode(&framed).await.unwrap(), expected);
    let (status, versions) = http(
        &registry,
        "GET",
        &format!("/subjects/{VALUE_SUBJECT}/versions"),
        "",
    )
    .await;
    assert_eq!((status, versions), (200, json!([1])));

    // An unknown id is a definite error, not one to retry.
    let err = client.schema_by_id(999).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(client.decode(b"{\"not\":\"avro\"}").await.is_err());

    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn rest_api_answers_with_confluent_shapes_and_error_codes() {
    let dir = temp_dir("rest");
    let registry = start(&dir).await;
    let table = orders();
    let body = json!({ "schema": table.key_schema_json() }).to_string();

    let (status, reply) = http(
        &registry,
        "POST",
        &format!("/subjects/{KEY_SUBJECT}/versions"),
        &body,
    )
    .await;
    assert_eq!((status, &reply), (200, &json!({ "id": 1 })));
    let with_type =
        json!({ "schema": table.value_schema_json(), "schemaType": "AVRO" }).to_string();
    let (status, reply) = http(
        &registry,
        "POST",
        &format!("/subjects/{VALUE_SUBJECT}/versions"),
        &with_type,
    )
    .await;
    assert_eq!((status, &reply), (200, &json!({ "id": 2 })));

    let (status, reply) = http(
        &registry,
        "POST",
        &format!("/subjects/{KEY_SUBJECT}"),
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        reply,
        json!({ "subject": KEY_SUBJECT, "id": 1, "version": 1, "schema": table.key_schema_json() })
    );
    for version in ["1", "latest", "-1"] {
        let (status, reply) = http(
            &registry,
            "GET",
            &format!("/subjects/{KEY_SUBJECT}/versions/{version}"),
            "",
        )
        .await;
        assert_eq!(
            (status, reply["id"].clone(), reply["version"].clone()),
            (200, json!(1), json!(1))
        );
    }
    let (status, reply) = http(&registry, "GET", "/schemas/ids/2?deleted=true", "").await;
    assert_eq!(
        (status, reply),
        (200, json!({ "schema": table.value_schema_json() }))
    );
    let (status, reply) = http(&registry, "GET", "/subjects", "").await;
    assert_eq!((status, reply), (200, json!([KEY_SUBJECT, VALUE_SUBJECT])));
    let (status, reply) = http(&registry, "GET", "/config", "").await;
    assert_eq!(
        (status, reply),
        (200, json!({ "compatibilityLevel": "BACKWARD" }))
    );

    let code = |reply: &Json| reply["error_code"].as_u64().unwrap();
    let other = json!({ "schema": r#"{"type":"record","name":"X","fields":[]}"# }).to_string();
    let cases: Vec<(&str, String, String, u16, u64)> = vec![
        ("GET", "/schemas/ids/99".into(), String::new(), 404, 40403),
        ("GET", "/schemas/ids/abc".into(), String::new(), 404, 40403),
        (
            "GET",
            "/subjects/nope/versions".into(),
            String::new(),
            404,
            40401,
        ),
        (
            "GET",
            "/subjects/nope/versions/latest".into(),
            String::new(),
            404,
            40401,
        ),
        (
            "GET",
            format!("/subjects/{KEY_SUBJECT}/versions/2"),
            String::new(),
            404,
            40402,
        ),
        (
            "GET",
            format!("/subjects/{KEY_SUBJECT}/versions/zero"),
            String::new(),
            422,
            42202,
        ),
        ("POST", "/subjects/nope".into(), body.clone(), 404, 40401),
        (
            "POST",
            format!("/subjects/{KEY_SUBJECT}"),
            other,
            404,
            40403,
        ),
        (
            "POST",
            "/subjects/bad-value/versions".into(),
            json!({ "schema": r#"{"type":"record","name":"X"}"# }).to_string(),
            422,
            42201,
        ),
        (
            "POST",
            "/subjects/bad-value/versions".into(),
            json!({ "schema": "{}", "schemaType": "PROTOBUF" }).to_string(),
            422,
            42201,
        ),
    ];
    for (method, path, body, want_status, want_code) in cases {
        let (status, reply) = http(&registry, method, &path, &body).await;
        assert_eq!(
            (status, code(&reply)),
            (want_status, want_code),
            "{method} {path}: {reply}"
        );
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A rejected schema leaves no trace.
    let (_, reply) = http(&registry, "GET", "/subjects", "").await;
    assert_eq!(reply, json!([KEY_SUBJECT, VALUE_SUBJECT]));

    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
