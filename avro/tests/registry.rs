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

/// A record `R` with the given fields (JSON), as the body of a register request.
fn record(fields: &str) -> String {
    json!({ "schema": format!(r#"{{"type":"record","name":"R","fields":[{fields}]}}"#) })
        .to_string()
}

const A_INT: &str = r#"{"name":"a","type":"int"}"#;

/// (case, v1 fields, v2 fields, new reads old, old reads new)
fn changes() -> Vec<(&'static str, String, String, bool, bool)> {
    let e = |symbols: &str| {
        format!(r#"{{"name":"e","type":{{"type":"enum","name":"E","symbols":[{symbols}]}}}}"#)
    };
    vec![
        (
            "add-field-with-default",
            A_INT.into(),
            format!(r#"{A_INT},{{"name":"b","type":"string","default":""}}"#),
            true,
            true,
        ),
        (
            "add-field-without-default",
            A_INT.into(),
            format!(r#"{A_INT},{{"name":"b","type":"string"}}"#),
            false,
            true,
        ),
        (
            "remove-field-with-default",
            format!(r#"{A_INT},{{"name":"b","type":"string","default":""}}"#),
            A_INT.into(),
            true,
            true,
        ),
        (
            "remove-field-without-default",
            format!(r#"{A_INT},{{"name":"b","type":"string"}}"#),
            A_INT.into(),
            true,
            false,
        ),
        (
            "promote-int-to-long",
            A_INT.into(),
            r#"{"name":"a","type":"long"}"#.into(),
            true,
            false,
        ),
        (
            "change-int-to-string",
            A_INT.into(),
            r#"{"name":"a","type":"string"}"#.into(),
            false,
            false,
        ),
        (
            "enum-add-symbol",
            e(r#""X","Y""#),
            e(r#""X","Y","Z""#),
            true,
            false,
        ),
        (
            "enum-remove-symbol",
            e(r#""X","Y","Z""#),
            e(r#""X","Y""#),
            false,
            true,
        ),
        (
            "union-widening",
            r#"{"name":"u","type":["null","int"],"default":null}"#.into(),
            r#"{"name":"u","type":["null","int","string"],"default":null}"#.into(),
            true,
            false,
        ),
    ]
}

#[tokio::test]
async fn every_level_accepts_exactly_the_changes_it_allows() {
    let dir = temp_dir("matrix");
    let registry = start(&dir).await;
    let levels = [
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    ];
    for level in levels {
        for (case, v1, v2, backward, forward) in changes() {
            let subject = format!("{case}-{level}");
            let (status, reply) = http(
                &registry,
                "PUT",
                &format!("/config/{subject}"),
                &json!({ "compatibility": level }).to_string(),
            )
            .await;
            assert_eq!((status, reply), (200, json!({ "compatibility": level })));
            let path = format!("/subjects/{subject}/versions");
            assert_eq!(http(&registry, "POST", &path, &record(&v1)).await.0, 200);

            let want = match level {
                "NONE" => true,
                l if l.starts_with("BACKWARD") => backward,
                l if l.starts_with("FORWARD") => forward,
                _ => backward && forward,
            };
            // The dry run answers as the registration then does.
            let (status, check) = http(
                &registry,
                "POST",
                &format!("/compatibility/subjects/{subject}/versions/latest"),
                &record(&v2),
            )
            .await;
            assert_eq!(
                (status, check),
                (200, json!({ "is_compatible": want })),
                "{level} {case}"
            );
            let (status, reply) = http(&registry, "POST", &path, &record(&v2)).await;
            if want {
                assert_eq!(status, 200, "{level} {case}: {reply}");
            } else {
                assert_eq!(status, 409, "{level} {case}: {reply}");
                assert_eq!(reply["error_code"], 409);
                let message = reply["message"].as_str().unwrap();
                assert!(
                    message.starts_with(&format!(
                        "Schema being registered is incompatible with an earlier schema for \
                         subject \"{subject}\""
                    )),
                    "{message}"
                );
                let (_, versions) = http(&registry, "GET", &path, "").await;
                assert_eq!(versions, json!([1]), "a rejected schema is not stored");
            }
        }
    }
    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn transitive_levels_check_every_live_version_and_plain_ones_only_the_latest() {
    let dir = temp_dir("transitive");
    let registry = start(&dir).await;
    let b_default = r#"{"name":"b","type":"string","default":"x"}"#;
    let b_required = r#"{"name":"b","type":"string"}"#;
    // v3 reads v2 and v2 reads v3, but v3 cannot read v1 (b has no default there) …
    let growing = [
        A_INT.to_owned(),
        format!("{A_INT},{b_default}"),
        format!("{A_INT},{b_required}"),
    ];
    // … and here v1 cannot read v3.
    let shrinking = [
        format!("{A_INT},{b_required}"),
        format!("{A_INT},{b_default}"),
        A_INT.to_owned(),
    ];
    let cases = [
        ("BACKWARD", &growing, 200),
        ("BACKWARD_TRANSITIVE", &growing, 409),
        ("FORWARD", &shrinking, 200),
        ("FORWARD_TRANSITIVE", &shrinking, 409),
        ("FULL", &growing, 200),
        ("FULL_TRANSITIVE", &growing, 409),
        ("FULL_TRANSITIVE", &shrinking, 409),
    ];
    for (i, (level, steps, want)) in cases.into_iter().enumerate() {
        let subject = format!("t{i}-{level}");
        let config = json!({ "compatibility": level }).to_string();
        http(&registry, "PUT", &format!("/config/{subject}"), &config).await;
        let path = format!("/subjects/{subject}/versions");
        for v in &steps[..2] {
            assert_eq!(http(&registry, "POST", &path, &record(v)).await.0, 200);
        }
        // The dry run against all versions follows the level too.
        let (_, check) = http(
            &registry,
            "POST",
            &format!("/compatibility/subjects/{subject}/versions?verbose=true"),
            &record(&steps[2]),
        )
        .await;
        assert_eq!(
            check["is_compatible"],
            json!(want == 200),
            "{level}: {check}"
        );
        if want == 409 {
            let messages = check["messages"].as_array().unwrap();
            assert!(
                messages.iter().any(|m| m
                    .as_str()
                    .unwrap()
                    .contains("READER_FIELD_MISSING_DEFAULT_VALUE")),
                "{level}: {check}"
            );
            assert!(
                messages.contains(&json!("{oldSchemaVersion: 1}")),
                "{check}"
            );
        }
        let (status, reply) = http(&registry, "POST", &path, &record(&steps[2])).await;
        assert_eq!(status, want, "{level}: {reply}");
    }
    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn deletes_are_soft_then_hard_and_ids_stay_answerable() {
    let dir = temp_dir("deletes");
    let registry = start(&dir).await;
    let s = "orders-value";
    let v1 = record(A_INT);
    let v2 = record(&format!(
        r#"{A_INT},{{"name":"b","type":"string","default":""}}"#
    ));
    let path = format!("/subjects/{s}/versions");
    let (_, r1) = http(&registry, "POST", &path, &v1).await;
    let (_, r2) = http(&registry, "POST", &path, &v2).await;
    let (id1, id2) = (r1["id"].as_u64().unwrap(), r2["id"].as_u64().unwrap());
    let schema2 = serde_json::from_str::<Json>(&v2).unwrap()["schema"].clone();

    let code = |(status, reply): (u16, Json)| (status, reply["error_code"].as_u64().unwrap_or(0));
    // Hard delete needs a soft delete first.
    let v1_path = format!("/subjects/{s}/versions/1");
    assert_eq!(
        code(
            http(
                &registry,
                "DELETE",
                &format!("{v1_path}?permanent=true"),
                ""
            )
            .await
        ),
        (404, 40407)
    );
    assert_eq!(
        http(&registry, "DELETE", &v1_path, "").await,
        (200, json!(1))
    );
    assert_eq!(
        code(http(&registry, "DELETE", &v1_path, "").await),
        (404, 40406)
    );
    assert_eq!(http(&registry, "GET", &path, "").await, (200, json!([2])));
    assert_eq!(
        http(&registry, "GET", &format!("{path}?deleted=true"), "").await,
        (200, json!([1, 2]))
    );
    assert_eq!(
        code(http(&registry, "GET", &v1_path, "").await),
        (404, 40402)
    );
    let (status, found) = http(&registry, "GET", &format!("{v1_path}?deleted=true"), "").await;
    assert_eq!((status, &found["id"]), (200, &json!(id1)));
    assert_eq!(
        http(
            &registry,
            "DELETE",
            &format!("{v1_path}?permanent=true"),
            ""
        )
        .await,
        (200, json!(1))
    );
    assert_eq!(
        http(&registry, "GET", &format!("{path}?deleted=true"), "").await,
        (200, json!([2]))
    );

    // The whole subject: the same two steps.
    let subject_path = format!("/subjects/{s}");
    assert_eq!(
        code(
            http(
                &registry,
                "DELETE",
                &format!("{subject_path}?permanent=true"),
                ""
            )
            .await
        ),
        (404, 40405)
    );
    assert_eq!(
        http(&registry, "DELETE", &subject_path, "").await,
        (200, json!([2]))
    );
    assert_eq!(
        code(http(&registry, "DELETE", &subject_path, "").await),
        (404, 40404)
    );
    assert_eq!(
        http(&registry, "GET", "/subjects", "").await,
        (200, json!([]))
    );
    assert_eq!(
        http(&registry, "GET", "/subjects?deleted=true", "").await,
        (200, json!([s]))
    );
    assert_eq!(code(http(&registry, "GET", &path, "").await), (404, 40401));
    assert_eq!(
        code(http(&registry, "POST", &subject_path, &v2).await),
        (404, 40401)
    );
    let (status, found) = http(
        &registry,
        "POST",
        &format!("{subject_path}?deleted=true"),
        &v2,
    )
    .await;
    assert_eq!((status, &found["version"]), (200, &json!(2)));
    assert_eq!(
        http(
            &registry,
            "GET",
            &format!("/schemas/ids/{id2}/versions"),
            ""
        )
        .await,
        (200, json!([]))
    );
    assert_eq!(
        http(
            &registry,
            "GET",
            &format!("/schemas/ids/{id2}/versions?deleted=true"),
            ""
        )
        .await,
        (200, json!([{ "subject": s, "version": 2 }]))
    );
    assert_eq!(
        http(
            &registry,
            "DELETE",
            &format!("{subject_path}?permanent=true"),
            ""
        )
        .await,
        (200, json!([2]))
    );
    assert_eq!(
        http(&registry, "GET", "/subjects?deleted=true", "").await,
        (200, json!([]))
    );
    assert_eq!(
        code(http(&registry, "DELETE", &subject_path, "").await),
        (404, 40401)
    );

    // Ids outlive every delete: messages framed with them may still be in a topic.
    for (id, schema) in [(id1, None), (id2, Some(schema2))] {
        let (status, reply) = http(&registry, "GET", &format!("/schemas/ids/{id}"), "").await;
        assert_eq!(status, 200, "{reply}");
        if let Some(schema) = schema {
            assert_eq!(reply["schema"], schema);
        }
    }
    // Registering again starts the subject anew but keeps the schema's id; a new schema gets
    // a new id, never a used one.
    assert_eq!(
        http(&registry, "POST", &path, &v2).await,
        (200, json!({ "id": id2 }))
    );
    assert_eq!(http(&registry, "GET", &path, "").await, (200, json!([1])));
    let v3 = record(&format!(
        r#"{A_INT},{{"name":"b","type":"string","default":""}},{{"name":"c","type":"int","default":0}}"#
    ));
    let (_, r3) = http(&registry, "POST", &path, &v3).await;
    assert_eq!(r3["id"].as_u64().unwrap(), id2.max(id1) + 1);

    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn config_and_deletes_survive_a_restart() {
    let dir = temp_dir("config");
    let registry = start(&dir).await;
    let level = |l: &str| json!({ "compatibility": l }).to_string();
    let code = |(status, reply): (u16, Json)| (status, reply["error_code"].as_u64().unwrap_or(0));

    assert_eq!(
        http(&registry, "GET", "/config", "").await,
        (200, json!({ "compatibilityLevel": "BACKWARD" }))
    );
    assert_eq!(
        http(&registry, "PUT", "/config", &level("none")).await,
        (200, json!({ "compatibility": "NONE" }))
    );
    assert_eq!(
        code(http(&registry, "PUT", "/config", &level("SIDEWAYS")).await),
        (422, 42203)
    );
    assert_eq!(
        http(&registry, "PUT", "/config/strict-value", &level("FULL")).await,
        (200, json!({ "compatibility": "FULL" }))
    );
    assert_eq!(
        code(http(&registry, "GET", "/config/loose-value", "").await),
        (404, 40408)
    );
    assert_eq!(
        http(
            &registry,
            "GET",
            "/config/loose-value?defaultToGlobal=true",
            ""
        )
        .await,
        (200, json!({ "compatibilityLevel": "NONE" }))
    );
    // The subject's own level wins over the global one.
    let incompatible_pair = [record(A_INT), record(r#"{"name":"a","type":"string"}"#)];
    for (subject, want) in [("strict-value", 409), ("loose-value", 200)] {
        let path = format!("/subjects/{subject}/versions");
        assert_eq!(
            http(&registry, "POST", &path, &incompatible_pair[0])
                .await
                .0,
            200
        );
        let (status, reply) = http(&registry, "POST", &path, &incompatible_pair[1]).await;
        assert_eq!(status, want, "{subject}: {reply}");
    }
    // A level set and removed again leaves no trace; a soft delete is remembered.
    http(&registry, "PUT", "/config/loose-value", &level("FORWARD")).await;
    assert_eq!(
        http(&registry, "DELETE", "/config/loose-value", "").await,
        (200, json!({ "compatibilityLevel": "FORWARD" }))
    );
    assert_eq!(
        http(&registry, "DELETE", "/subjects/loose-value/versions/1", "").await,
        (200, json!(1))
    );
    registry.stop().await.unwrap();

    let registry = start(&dir).await;
    assert_eq!(
        http(&registry, "GET", "/config", "").await,
        (200, json!({ "compatibilityLevel": "NONE" }))
    );
    assert_eq!(
        http(&registry, "GET", "/config/strict-value", "").await,
        (200, json!({ "compatibilityLevel": "FULL" }))
    );
    assert_eq!(
        code(http(&registry, "GET", "/config/loose-value", "").await),
        (404, 40408)
    );
    assert_eq!(
        http(&registry, "GET", "/subjects/loose-value/versions", "").await,
        (200, json!([2]))
    );
    assert_eq!(
        code(http(&registry, "DELETE", "/subjects/loose-value/versions/1", "").await),
        (404, 40406)
    );
    // Still enforced after the restart.
    let (status, _) = http(
        &registry,
        "POST",
        "/subjects/strict-value/versions",
        &incompatible_pair[1],
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        http(&registry, "DELETE", "/config", "").await,
        (200, json!({ "compatibilityLevel": "NONE" }))
    );
    assert_eq!(
        http(&registry, "GET", "/config", "").await,
        (200, json!({ "compatibilityLevel": "BACKWARD" }))
    );

    // The small endpoints tools probe.
    assert_eq!(http(&registry, "GET", "/", "").await, (200, json!({})));
    assert_eq!(
        http(&registry, "GET", "/schemas/types", "").await,
        (200, json!(["AVRO"]))
    );
    assert_eq!(
        code(http(&registry, "GET", "/no/such/route", "").await),
        (404, 404)
    );
    assert_eq!(
        code(
            http(
                &registry,
                "POST",
                "/compatibility/subjects/nope/versions/latest",
                &record(A_INT)
            )
            .await
        ),
        (404, 40401)
    );
    assert_eq!(
        http(
            &registry,
            "POST",
            "/compatibility/subjects/nope/versions",
            &record(A_INT)
        )
        .await,
        (200, json!({ "is_compatible": true }))
    );
    registry.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With write auth, reads stay open, writes need the credentials, and the client takes them
/// from the URL.
#[tokio::test]
async fn write_endpoints_require_basic_auth_and_the_client_sends_it_from_the_url() {
    let dir = temp_dir("writeauth");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = RegistryServer::open(&dir)
        .unwrap()
        .with_write_auth("walbridge", "s3cr%t:x")
        .spawn(listener)
        .unwrap();
    let schema = orders();
    let body = json!({ "schema": schema.value_schema_json() }).to_string();

    // Without credentials: 401 with Confluent's shape and a way out; nothing is stored.
    let (status, answer) = http(
        &registry,
        "POST",
        &format!("/subjects/{VALUE_SUBJECT}/versions"),
        &body,
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["error_code"], 40101);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("user:password@")
    );
    let (status, _) = http(&registry, "GET", "/subjects", "").await;
    assert_eq!(status, 200, "reads stay open");
    let (status, _) = http(&registry, "PUT", "/config", r#"{"compatibility":"NONE"}"#).await;
    assert_eq!(status, 401, "config changes are writes");
    let (status, _) = http(
        &registry,
        "POST",
        &format!("/compatibility/subjects/{VALUE_SUBJECT}/versions/latest"),
        &body,
    )
    .await;
    assert_ne!(status, 401, "a compatibility check changes nothing");

    let anonymous = RegistryClient::new(&registry.url()).unwrap();
    assert!(
        anonymous
            .register(VALUE_SUBJECT, schema.value_schema_json())
            .await
            .is_err()
    );
    let wrong = RegistryClient::new(&format!("http://walbridge:nope@{}", registry.addr())).unwrap();
    assert!(
        wrong
            .register(VALUE_SUBJECT, schema.value_schema_json())
            .await
            .is_err()
    );
    // The password has ':' and '%' in it: percent-encoded in the URL.
    let client = RegistryClient::new(&format!(
        "http://walbridge:s3cr%25t%3Ax@{}",
        registry.addr()
    ))
    .unwrap();
    let id = client
        .register(VALUE_SUBJECT, schema.value_schema_json())
        .await
        .unwrap();
    let (status, versions) = http(
        &registry,
        "GET",
        &format!("/subjects/{VALUE_SUBJECT}/versions"),
        "",
    )
    .await;
    assert_eq!((status, versions), (200, json!([1])));
    assert!(id > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
