//! Our hand-written Avro encoder, checked against an independent decoder (apache-avro): every
//! mapped Postgres type, encoded from pgoutput text and decoded back, gives the expected value.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value as Avro;
use apache_avro::{Decimal, Schema, Uuid};
use avro::{Change, EncodeReason, Op, SchemaError, Source, TableSchema, TypeNames};
use bytes::Bytes;
use cdc::pgoutput::{Column, Relation, ReplicaIdentity, Tuple, TypeInfo, Value};

const TOPIC: &str = "legacy.oms.orders";

fn col(name: &str, type_oid: u32, type_modifier: i32, key: bool) -> Column {
    Column {
        key,
        name: name.to_owned(),
        type_oid,
        type_modifier,
    }
}

fn numeric_typmod(precision: i32, scale: i32) -> i32 {
    ((precision << 16) | (scale & 0x7ff)) + 4
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn relation(columns: Vec<Column>) -> Relation {
    Relation {
        id: 16384,
        namespace: "oms".into(),
        name: "orders".into(),
        replica_identity: ReplicaIdentity::Default,
        columns,
    }
}

fn source() -> Source<'static> {
    Source {
        name: "legacy",
        db: "shop",
        schema: "oms",
        table: "orders",
        ts_ms: 1_714_566_896_789,
        tx_id: 4242,
        lsn: 0x16B_3748,
        snapshot: false,
    }
}

/// Decodes a whole datum, failing if apache-avro leaves bytes over (a framing bug).
fn decode(schema: &Schema, datum: &[u8]) -> Avro {
    let mut reader = datum;
    let value = GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut reader))
        .expect("apache-avro decodes our datum");
    assert!(
        reader.is_empty(),
        "{} byte(s) left after decoding",
        reader.len()
    );
    value
}

fn record_fields(v: Avro) -> Vec<(String, Avro)> {
    match v {
        Avro::Record(fields) => fields,
        other => panic!("expected a record, got {other:?}"),
    }
}

fn field(fields: &[(String, Avro)], name: &str) -> Avro {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no field {name}"))
        .1
        .clone()
}

fn some(v: Avro) -> Avro {
    Avro::Union(1, Box::new(v))
}

fn null() -> Avro {
    Avro::Union(0, Box::new(Avro::Null))
}

fn dec(unscaled: i128) -> Avro {
    Avro::Decimal(Decimal::from(unscaled.to_be_bytes()))
}

/// Encodes `row` as an insert and returns the fields of `after`.
fn after_fields(schema: &TableSchema, row: &Tuple) -> Vec<(String, Avro)> {
    let change = Change {
        op: Op::Create,
        before: None,
        after: Some(row),
        source: source(),
        ts_ms: 1,
    };
    let mut out = Vec::new();
    schema.encode_value(&change, &mut out).expect("encodes");
    let envelope = record_fields(decode(schema.value_schema(), &out));
    match field(&envelope, "after") {
        Avro::Union(1, v) => record_fields(*v),
        other => panic!("after is {other:?}"),
    }
}

#[test]
fn every_mapped_type_decodes_back_to_the_expected_avro_value() {
    let mut types = TypeNames::new();
    types.insert(&TypeInfo {
        oid: 16500,
        namespace: "oms".into(),
        name: "order_status".into(),
    });
    // Domains: pgoutput's Type message names the base type, pg_catalog as "".
    for (oid, name) in [
        (16600, "int4"),
        (16601, "_text"),
        (16602, "numeric"),
        (16603, "inet"),
    ] {
        types.insert(&TypeInfo {
            oid,
            namespace: String::new(),
            name: name.into(),
        });
    }
    #[rustfmt::skip]
    let cases: Vec<(Column, &str, Avro)> = vec![
        (col("b", 16, -1, false), "t", Avro::Boolean(true)),
        (col("i2", 21, -1, false), "-32768", Avro::Int(-32768)),
        (col("i4", 23, -1, false), "2147483647", Avro::Int(i32::MAX)),
        (col("i8", 20, -1, false), "-9223372036854775808", Avro::Long(i64::MIN)),
        (col("o", 26, -1, false), "4294967295", Avro::Long(4_294_967_295)),
        (col("f4", 700, -1, false), "1.5", Avro::Float(1.5)),
        (col("f8", 701, -1, false), "-Infinity", Avro::Double(f64::NEG_INFINITY)),
        (col("f8b", 701, -1, false), "0.1", Avro::Double(0.1)),
        (col("money", 1700, numeric_typmod(10, 2), false), "-12345678.90", dec(-1_234_567_890)),
        (col("qty", 1700, numeric_typmod(5, 0), false), "7", dec(7)),
        // 39 digits: more than i128's fast path, checked against i128::MIN + 1.
        (col("wide", 1700, numeric_typmod(39, 0), false),
            "-170141183460469231731687303715884105727", dec(i128::MIN + 1)),
        (col("free", 1700, -1, false), "123456789012345678901234567890.000000000000000001",
            Avro::String("123456789012345678901234567890.000000000000000001".into())),
        (col("free_nan", 1700, -1, false), "NaN", Avro::String("NaN".into())),
        (col("t", 25, -1, false), "héllo, \"wörld\"", Avro::String("héllo, \"wörld\"".into())),
        (col("vc", 1043, 14, false), "abc", Avro::String("abc".into())),
        (col("bp", 1042, 8, false), "ab  ", Avro::String("ab  ".into())),
        (col("nm", 19, -1, false), "pg_class", Avro::String("pg_class".into())),
        (col("raw", 17, -1, false), "\\x00ff7f", Avro::Bytes(vec![0x00, 0xff, 0x7f])),
        (col("d", 1082, -1, false), "2024-05-01", Avro::Date(19844)),
        (col("d_bc", 1082, -1, false), "0001-12-31 BC", Avro::Date(-719_163)),
        (col("tm", 1083, -1, false), "12:34:56.789", Avro::TimeMicros(45_296_789_000)),
        (col("ttz", 1266, -1, false), "12:34:56+02", Avro::String("12:34:56+02".into())),
        (col("ts", 1114, -1, false), "2024-05-01 12:34:56.789",
            Avro::LocalTimestampMicros(1_714_566_896_789_000)),
        (col("tstz", 1184, -1, false), "2024-05-01 14:34:56.789+02",
            Avro::TimestampMicros(1_714_566_896_789_000)),
        (col("iv", 1186, -1, false), "1 year 2 mons 3 days 04:05:06",
            Avro::String("1 year 2 mons 3 days 04:05:06".into())),
        (col("u", 2950, -1, false), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            Avro::Uuid(Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap())),
        (col("j", 114, -1, false), r#"{"a": [1, 2]}"#, Avro::String(r#"{"a": [1, 2]}"#.into())),
        (col("jb", 3802, -1, false), r#"{"a": [1, 2]}"#, Avro::String(r#"{"a": [1, 2]}"#.into())),
        (col("ints", 1007, -1, false), "{1,NULL,3}",
            Avro::Array(vec![some(Avro::Int(1)), null(), some(Avro::Int(3))])),
        (col("tags", 1009, -1, false), r#"{a,"b c",NULL,"NULL"}"#,
            Avro::Array(vec![some(Avro::String("a".into())), some(Avro::String("b c".into())),
                null(), some(Avro::String("NULL".into()))])),
        (col("prices", 1231, numeric_typmod(5, 2), false), "{1.50,-2.00}",
            Avro::Array(vec![some(dec(150)), some(dec(-200))])),
        (col("flags", 1000, -1, false), "{}", Avro::Array(vec![])),
        (col("longs", 1016, -1, false), "{9223372036854775807}",
            Avro::Array(vec![some(Avro::Long(i64::MAX))])),
        (col("ids", 2951, -1, false), "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            Avro::Array(vec![some(Avro::Uuid(Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap()))])),
        (col("days", 1182, -1, false), "{2024-05-01,NULL}",
            Avro::Array(vec![some(Avro::Date(19844)), null()])),
        (col("status", 16500, -1, false), "shipped", Avro::String("shipped".into())),
        (col("mystery", 99999, -1, false), "(1,2)", Avro::String("(1,2)".into())),
        (col("dom_int", 16600, -1, false), "42", Avro::Int(42)),
        (col("dom_tags", 16601, -1, false), "{x,NULL}",
            Avro::Array(vec![some(Avro::String("x".into())), null()])),
        (col("dom_num", 16602, -1, false), "1.50", Avro::String("1.50".into())),
        (col("dom_inet", 16603, -1, false), "10.0.0.1", Avro::String("10.0.0.1".into())),
    ];
    let rel = relation(cases.iter().map(|(c, _, _)| c.clone()).collect());
    let schema = TableSchema::new(TOPIC, &rel, &types).unwrap();
    let row: Tuple = cases.iter().map(|(_, t, _)| text(t)).collect();
    let after = after_fields(&schema, &row);
    assert_eq!(after.len(), cases.len());
    for ((c, _, want), (name, got)) in cases.iter().zip(after) {
        assert_eq!(name, c.name);
        assert_eq!(got, some(want.clone()), "column {}", c.name);
    }
    // User types are named in the schema so consumers can tell them from plain text.
    assert!(
        schema
            .value_schema_json()
            .contains(r#""pg.type":"oms.order_status""#)
    );
    assert!(
        schema
            .value_schema_json()
            .contains(r#""connect.name":"io.debezium.data.Json""#)
    );
    // A domain over a type walbridge does not map keeps a readable name.
    assert!(
        schema
            .value_schema_json()
            .contains(r#""pg.type":"pg_catalog.inet""#)
    );
}

#[test]
fn nan_floats_and_nulls_survive() {
    let rel = relation(vec![
        col("f4", 700, -1, false),
        col("f8", 701, -1, false),
        col("n", 25, -1, false),
    ]);
    let schema = TableSchema::new(TOPIC, &rel, &TypeNames::new()).unwrap();
    let row = vec![text("NaN"), text("NaN"), Value::Null];
    let after = after_fields(&schema, &row);
    assert!(
        matches!(&after[0].1, Avro::Union(1, v) if matches!(**v, Avro::Float(f) if f.is_nan()))
    );
    assert!(
        matches!(&after[1].1, Avro::Union(1, v) if matches!(**v, Avro::Double(f) if f.is_nan()))
    );
    assert_eq!(after[2].1, null());
}

#[test]
fn update_envelope_carries_before_after_source_and_op() {
    let rel = relation(vec![col("id", 20, -1, true), col("status", 25, -1, false)]);
    let schema = TableSchema::new(TOPIC, &rel, &TypeNames::new()).unwrap();
    let before = vec![text("7"), Value::Null];
    let after = vec![text("7"), text("shipped")];
    let change = Change {
        op: Op::Update,
        before: Some(&before),
        after: Some(&after),
        source: Source {
            snapshot: true,
            ..source()
        },
        ts_ms: 1_714_566_897_000,
    };
    let mut out = vec![0xee]; // encoders append
    schema.encode_value(&change, &mut out).unwrap();
    assert_eq!(out[0], 0xee);
    let got = decode(schema.value_schema(), &out[1..]);
    let row = |id: i64, status: Option<&str>| {
        some(Avro::Record(vec![
            ("id".into(), some(Avro::Long(id))),
            (
                "status".into(),
                status.map_or(null(), |s| some(Avro::String(s.into()))),
            ),
        ]))
    };
    let want = Avro::Record(vec![
        ("before".into(), row(7, None)),
        ("after".into(), row(7, Some("shipped"))),
        (
            "source".into(),
            Avro::Record(vec![
                (
                    "version".into(),
                    Avro::String(concat!("walbridge-", env!("CARGO_PKG_VERSION")).into()),
                ),
                ("connector".into(), Avro::String("postgresql".into())),
                ("name".into(), Avro::String("legacy".into())),
                ("ts_ms".into(), Avro::Long(1_714_566_896_789)),
                ("snapshot".into(), Avro::String("true".into())),
                ("db".into(), Avro::String("shop".into())),
                ("sequence".into(), null()),
                ("schema".into(), Avro::String("oms".into())),
                ("table".into(), Avro::String("orders".into())),
                ("txId".into(), some(Avro::Long(4242))),
                ("lsn".into(), some(Avro::Long(0x16B_3748))),
                ("xmin".into(), null()),
            ]),
        ),
        ("op".into(), Avro::String("u".into())),
        ("ts_ms".into(), some(Avro::Long(1_714_566_897_000))),
        ("transaction".into(), null()),
        ("unavailable_columns".into(), null()),
    ]);
    assert_eq!(got, want);

    // Deletes and truncates have no after; truncate has no before either.
    for (op, code, before) in [(Op::Delete, "d", Some(&before)), (Op::Truncate, "t", None)] {
        let change = Change {
            op,
            before,
            after: None,
            source: source(),
            ts_ms: 0,
        };
        let mut out = Vec::new();
        schema.encode_value(&change, &mut out).unwrap();
        let fields = record_fields(decode(schema.value_schema(), &out));
        assert_eq!(field(&fields, "op"), Avro::String(code.into()));
        assert_eq!(field(&fields, "after"), null());
        assert_eq!(field(&fields, "before") == null(), before.is_none());
    }
}

#[test]
fn key_holds_only_key_columns_and_is_not_nullable() {
    let rel = relation(vec![
        col("tenant", 23, -1, true),
        col("note", 25, -1, false),
        col("order_no", 1043, -1, true),
    ]);
    let schema = TableSchema::new(TOPIC, &rel, &TypeNames::new()).unwrap();
    assert!(schema.has_key());
    let mut out = Vec::new();
    schema
        .encode_key(&vec![text("3"), text("secret"), text("A-17")], &mut out)
        .unwrap();
    assert_eq!(
        decode(schema.key_schema(), &out),
        Avro::Record(vec![
            ("tenant".into(), Avro::Int(3)),
            ("order_no".into(), Avro::String("A-17".into())),
        ])
    );
    let key: serde_json::Value = serde_json::from_str(schema.key_schema_json()).unwrap();
    assert_eq!(key["name"], "legacy.oms.orders.Key");
    assert_eq!(key["fields"][0]["type"], "int");

    // A null key column is an error, and the buffer is left as it was.
    let mut out = vec![1, 2, 3];
    let err = schema
        .encode_key(&vec![Value::Null, text("x"), text("A-17")], &mut out)
        .unwrap_err();
    assert_eq!(err.reason, EncodeReason::NullKey);
    assert_eq!(err.column, "tenant");
    assert_eq!(out, [1, 2, 3]);

    // The primary key can be given explicitly, e.g. for REPLICA IDENTITY FULL tables.
    let by_note = TableSchema::with_key(TOPIC, &rel, &TypeNames::new(), &["order_no"]).unwrap();
    let mut out = Vec::new();
    by_note
        .encode_key(&vec![text("3"), Value::Null, text("A-17")], &mut out)
        .unwrap();
    assert_eq!(
        decode(by_note.key_schema(), &out),
        Avro::Record(vec![("order_no".into(), Avro::String("A-17".into()))])
    );
    assert!(matches!(
        TableSchema::with_key(TOPIC, &rel, &TypeNames::new(), &["nope"]),
        Err(SchemaError::UnknownKeyColumn { .. })
    ));

    let keyless = relation(vec![col("note", 25, -1, false)]);
    assert!(
        !TableSchema::new(TOPIC, &keyless, &TypeNames::new())
            .unwrap()
            .has_key()
    );
}

#[test]
fn errors_name_table_column_and_type_but_never_the_value() {
    let rel = relation(vec![
        col("id", 20, -1, true),
        col("price", 1700, numeric_typmod(5, 2), false),
        col("placed_at", 1184, -1, false),
        col("tags", 1009, -1, false),
        col("note", 25, -1, false),
    ]);
    let schema = TableSchema::new(TOPIC, &rel, &TypeNames::new()).unwrap();
    let good = || {
        vec![
            text("1"),
            text("1.00"),
            text("2024-05-01 12:00:00+00"),
            text("{}"),
            text("ok"),
        ]
    };
    let cases: Vec<(usize, Value, &str, EncodeReason)> = vec![
        (
            1,
            text("123456.78"),
            "price",
            EncodeReason::PrecisionExceeded {
                precision: 5,
                scale: 2,
            },
        ),
        (
            1,
            text("NaN"),
            "price",
            EncodeReason::Unrepresentable {
                what: "NaN",
                target: "decimal",
            },
        ),
        (
            2,
            text("infinity"),
            "placed_at",
            EncodeReason::Unrepresentable {
                what: "infinity",
                target: "timestamp-micros",
            },
        ),
        (3, text("{{a},{b}}"), "tags", EncodeReason::MultiDimArray),
        (
            4,
            Value::Text(Bytes::from_static(b"secret\xff")),
            "note",
            EncodeReason::NotUtf8 { len: 7 },
        ),
        (
            4,
            Value::Binary(Bytes::from_static(b"secret")),
            "note",
            EncodeReason::BinaryFormat,
        ),
    ];
    for (i, value, column, reason) in cases {
        let mut row = good();
        row[i] = value;
        let change = Change {
            op: Op::Create,
            before: None,
            after: Some(&row),
            source: source(),
            ts_ms: 0,
        };
        let mut out = Vec::new();
        let err = schema.encode_value(&change, &mut out).unwrap_err();
        assert_eq!((err.column.as_str(), &err.reason), (column, &reason));
        assert!(out.is_empty(), "partial output left behind");
        let msg = err.to_string();
        assert!(msg.contains("oms.orders") && msg.contains(column), "{msg}");
        for value in ["secret", "123456"] {
            assert!(!msg.contains(value), "value leaked into error: {msg}");
        }
    }
    let short = vec![text("1")];
    let change = Change {
        op: Op::Create,
        before: None,
        after: Some(&short),
        source: source(),
        ts_ms: 0,
    };
    let err = schema.encode_value(&change, &mut Vec::new()).unwrap_err();
    assert_eq!(
        err.reason,
        EncodeReason::ColumnCount {
            expected: 5,
            got: 1
        }
    );
}

#[test]
fn names_are_sanitized_for_avro_and_clashes_rejected() {
    let rel = relation(vec![
        col("Order Id", 23, -1, true),
        col("1st-choice", 25, -1, false),
        col("größe", 25, -1, false),
    ]);
    let schema = TableSchema::new("legacy-db.oms.order$s", &rel, &TypeNames::new()).unwrap();
    let v: serde_json::Value = serde_json::from_str(schema.value_schema_json()).unwrap();
    assert_eq!(v["name"], "legacy_db.oms.order_s.Envelope");
    let value = &v["fields"][0]["type"][1];
    let names: Vec<&str> = value["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Order_Id", "_1st_choice", "gr__e"]);
    // The data still round-trips under the sanitized names.
    let after = after_fields(&schema, &vec![text("1"), text("x"), text("y")]);
    assert_eq!(
        after[2],
        ("gr__e".to_owned(), some(Avro::String("y".into())))
    );

    let clash = relation(vec![col("a-b", 23, -1, false), col("a_b", 23, -1, false)]);
    let err = TableSchema::new(TOPIC, &clash, &TypeNames::new()).unwrap_err();
    assert!(
        matches!(err, SchemaError::FieldNameClash { ref field, .. } if field == "a_b"),
        "{err}"
    );
}

#[test]
fn added_column_is_backward_compatible_and_old_data_reads_as_null() {
    let v1 = relation(vec![col("id", 20, -1, true), col("status", 25, -1, false)]);
    let mut v2 = v1.clone();
    v2.columns.push(col("carrier", 25, -1, false));
    let s1 = TableSchema::new(TOPIC, &v1, &TypeNames::new()).unwrap();
    let s2 = TableSchema::new(TOPIC, &v2, &TypeNames::new()).unwrap();
    SchemaCompatibility::can_read(s1.value_schema(), s2.value_schema())
        .expect("new reader schema reads old data");

    let row = vec![text("7"), text("new")];
    let change = Change {
        op: Op::Create,
        before: None,
        after: Some(&row),
        source: source(),
        ts_ms: 0,
    };
    let mut out = Vec::new();
    s1.encode_value(&change, &mut out).unwrap();
    let mut reader = &out[..];
    let read = GenericDatumReader::builder(s1.value_schema())
        .reader_schema(s2.value_schema())
        .build()
        .and_then(|r| r.read_value(&mut reader))
        .unwrap();
    let after = match field(&record_fields(read), "after") {
        Avro::Union(1, v) => record_fields(*v),
        other => panic!("{other:?}"),
    };
    assert_eq!(field(&after, "carrier"), null());

    // Same relation, same schema text: the registry will hand out the same id.
    let again = TableSchema::new(TOPIC, &v1, &TypeNames::new()).unwrap();
    assert_eq!(again.value_schema_json(), s1.value_schema_json());
}

/// Columns for the TOAST tests: a key, a small column, two TOASTable ones (one whose name needs
/// sanitizing, so the list is seen to hold Avro field names) and a nullable one.
fn toast_schema() -> TableSchema {
    let rel = relation(vec![
        col("id", 20, -1, true),
        col("qty", 23, -1, false),
        col("long note", 25, -1, false),
        col("doc", 3802, -1, false),
        col("memo", 25, -1, false),
    ]);
    TableSchema::new(TOPIC, &rel, &TypeNames::new()).unwrap()
}

/// Encodes the change and returns the envelope's fields.
fn envelope(
    schema: &TableSchema,
    op: Op,
    before: Option<&Tuple>,
    after: Option<&Tuple>,
) -> Vec<(String, Avro)> {
    let change = Change {
        op,
        before,
        after,
        source: source(),
        ts_ms: 0,
    };
    let mut out = Vec::new();
    schema.encode_value(&change, &mut out).expect("encodes");
    record_fields(decode(schema.value_schema(), &out))
}

fn row_fields(envelope: &[(String, Avro)], which: &str) -> Vec<(String, Avro)> {
    match field(envelope, which) {
        Avro::Union(1, v) => record_fields(*v),
        other => panic!("{which} is {other:?}"),
    }
}

fn listed(names: &[&str]) -> Avro {
    some(Avro::Array(
        names.iter().map(|n| Avro::String((*n).into())).collect(),
    ))
}

#[test]
fn unchanged_toast_without_old_value_is_null_and_listed_unavailable() {
    let schema = toast_schema();
    // REPLICA IDENTITY DEFAULT, key unchanged: no old tuple at all.
    let after = vec![
        text("7"),
        text("3"),
        Value::UnchangedToast,
        Value::UnchangedToast,
        Value::Null,
    ];
    let env = envelope(&schema, Op::Update, None, Some(&after));
    let row = row_fields(&env, "after");
    assert_eq!(field(&row, "qty"), some(Avro::Int(3)));
    assert_eq!(field(&row, "long_note"), null());
    assert_eq!(field(&row, "doc"), null());
    // A real NULL is not listed: that is how a consumer tells the two apart.
    assert_eq!(field(&row, "memo"), null());
    assert_eq!(
        field(&env, "unavailable_columns"),
        listed(&["long_note", "doc"])
    );

    // Key change under DEFAULT: the old tuple has only the key, so nothing to fill from.
    let key_only = vec![
        text("6"),
        Value::Null,
        Value::Null,
        Value::Null,
        Value::Null,
    ];
    let env = envelope(&schema, Op::Update, Some(&key_only), Some(&after));
    assert_eq!(field(&row_fields(&env, "after"), "long_note"), null());
    assert_eq!(
        field(&env, "unavailable_columns"),
        listed(&["long_note", "doc"])
    );

    // Every value sent: the field is null, not an empty list.
    let full = vec![text("7"), text("3"), text("n"), text("{}"), Value::Null];
    let env = envelope(&schema, Op::Update, None, Some(&full));
    assert_eq!(field(&env, "unavailable_columns"), null());
}

#[test]
fn unchanged_toast_is_taken_from_a_full_old_row_and_not_listed() {
    let schema = toast_schema();
    let big = "x".repeat(10_000);
    // REPLICA IDENTITY FULL: the old row carries every value, TOASTed ones inlined.
    let before = vec![
        text("7"),
        text("2"),
        text(&big),
        text(r#"{"a": 1}"#),
        Value::Null,
    ];
    let after = vec![
        text("7"),
        text("3"),
        Value::UnchangedToast,
        Value::UnchangedToast,
        Value::Null,
    ];
    let env = envelope(&schema, Op::Update, Some(&before), Some(&after));
    let row = row_fields(&env, "after");
    assert_eq!(field(&row, "qty"), some(Avro::Int(3)));
    assert_eq!(field(&row, "long_note"), some(Avro::String(big.clone())));
    assert_eq!(field(&row, "doc"), some(Avro::String(r#"{"a": 1}"#.into())));
    assert_eq!(field(&row, "memo"), null());
    assert_eq!(
        field(&row_fields(&env, "before"), "qty"),
        some(Avro::Int(2))
    );
    assert_eq!(field(&env, "unavailable_columns"), null());
}

#[test]
fn unchanged_toast_in_the_old_row_is_listed_too() {
    // Postgres inlines TOASTed values in the old row, but should a `u` ever arrive there, it is
    // marked like one in the new row rather than read as NULL.
    let schema = toast_schema();
    let before = vec![
        text("7"),
        text("2"),
        Value::UnchangedToast,
        text("{}"),
        Value::Null,
    ];
    let env = envelope(&schema, Op::Delete, Some(&before), None);
    assert_eq!(field(&row_fields(&env, "before"), "long_note"), null());
    assert_eq!(field(&env, "unavailable_columns"), listed(&["long_note"]));
}

#[test]
fn unavailable_columns_keeps_the_envelope_compatible_both_ways() {
    // The envelope as registered before the field existed.
    let schema = toast_schema();
    let mut old: serde_json::Value = serde_json::from_str(schema.value_schema_json()).unwrap();
    let fields = old["fields"].as_array_mut().unwrap();
    assert_eq!(fields.last().unwrap()["name"], "unavailable_columns");
    fields.pop();
    let old = Schema::parse_str(&old.to_string()).unwrap();
    SchemaCompatibility::can_read(&old, schema.value_schema())
        .expect("new consumers read events written before the field existed");
    SchemaCompatibility::can_read(schema.value_schema(), &old)
        .expect("old consumers read new events");

    // And an old reader really does skip the list.
    let after = vec![
        text("7"),
        text("3"),
        Value::UnchangedToast,
        text("{}"),
        Value::Null,
    ];
    let change = Change {
        op: Op::Update,
        before: None,
        after: Some(&after),
        source: source(),
        ts_ms: 0,
    };
    let mut out = Vec::new();
    schema.encode_value(&change, &mut out).unwrap();
    let mut reader = &out[..];
    let read = GenericDatumReader::builder(schema.value_schema())
        .reader_schema(&old)
        .build()
        .and_then(|r| r.read_value(&mut reader))
        .unwrap();
    let fields = record_fields(read);
    assert!(fields.iter().all(|(n, _)| n != "unavailable_columns"));
    assert_eq!(field(&fields, "op"), Avro::String("u".into()));
}
