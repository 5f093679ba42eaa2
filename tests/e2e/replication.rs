//! The replication connection and the pgoutput decoder against a real walsender: every message
//! kind of protocol version 1 arrives and decodes with the right content.

use std::time::Duration;

use cdc::conn::{ReplicationConnection, StreamMessage};
use cdc::pgoutput::{self, Message, OldTuple, ReplicaIdentity, Value};

use crate::harness::shared;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pgoutput_v1_message_kind_decodes_from_a_real_server() {
    let s = shared();
    s.pg.create_database("protocol").await.unwrap();
    let dsn = s.pg.dsn("protocol");
    let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    // One statement per call: a multi-statement string runs as one transaction, and a slot
    // cannot be created in a transaction that has written.
    for sql in [
        "CREATE TYPE mood AS ENUM ('calm', 'busy')",
        "CREATE TABLE t (id int PRIMARY KEY, v text, m mood)",
        "CREATE TABLE full_t (id int PRIMARY KEY, v text)",
        "ALTER TABLE full_t REPLICA IDENTITY FULL",
        "CREATE PUBLICATION p FOR TABLE t, full_t",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        "INSERT INTO t VALUES (1, 'one', 'calm')",
        "UPDATE t SET v = 'uno' WHERE id = 1",
        "UPDATE t SET id = 2 WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "INSERT INTO full_t VALUES (7, 'x')",
        "UPDATE full_t SET v = 'y'",
        "TRUNCATE t",
        "SELECT pg_logical_emit_message(true, 'acme', 'in-tx')",
        "SELECT pg_logical_emit_message(false, 'acme', 'no-tx')",
        "SELECT pg_replication_origin_create('upstream')",
        "SELECT pg_replication_origin_session_setup('upstream')",
        "INSERT INTO t VALUES (3, 'from upstream', 'busy')",
        "SELECT pg_replication_origin_session_reset()",
        "INSERT INTO t VALUES (4, 'last', NULL)",
    ] {
        c.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    let cfg: tokio_postgres::Config = dsn.parse().unwrap();
    let conn = ReplicationConnection::connect(&cfg, &cdc::tls::PgTls::disabled())
        .await
        .unwrap();
    let opts = [
        ("proto_version", "1".to_owned()),
        ("publication_names", "\"p\"".to_owned()),
        ("messages", "true".to_owned()),
    ];
    let mut stream = conn
        .start_replication("s", cdc::Lsn::ZERO, &opts)
        .await
        .unwrap();
    let mut msgs = Vec::new();
    // Read until the insert of id 4, the last change written.
    let done = |m: &Message| matches!(m, Message::Insert(i) if i.new[0] == Value::Text("4".into()));
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let StreamMessage::XLogData { data, .. } = stream.next().await.unwrap() {
                let m = pgoutput::decode(data, false).unwrap();
                let last = done(&m);
                msgs.push(m);
                if last {
                    break;
                }
            }
        }
    })
    .await
    .expect("all messages within 30 s");
    stream.close().await.unwrap();

    let text = |v: &Value| v.as_str().map(str::to_owned);
    let rel = msgs.iter().find_map(|m| match m {
        Message::Relation(r) if r.name == "t" => Some(r),
        _ => None,
    });
    let rel = rel.expect("Relation for t");
    assert_eq!(rel.namespace, "public");
    assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        rel.columns
            .iter()
            .map(|c| (c.name.as_str(), c.key))
            .collect::<Vec<_>>(),
        [("id", true), ("v", false), ("m", false)]
    );
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Type(t) if t.name == "mood")),
        "Type message for the enum"
    );
    assert!(msgs.iter().any(|m| matches!(m, Message::Begin(_))));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Commit(c) if c.end_lsn > c.commit_lsn))
    );
    let updates: Vec<_> = msgs
        .iter()
        .filter_map(|m| {
            if let Message::Update(u) = m {
                Some(u)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        updates[0].old, None,
        "a non-key update under DEFAULT identity sends no old tuple"
    );
    assert_eq!(text(&updates[0].new[1]).as_deref(), Some("uno"));
    match &updates[1].old {
        Some(OldTuple::Key(k)) => assert_eq!(text(&k[0]).as_deref(), Some("1")),
        other => panic!("key change must carry the old key, got {other:?}"),
    }
    match &updates[2].old {
        Some(OldTuple::Full(o)) => assert_eq!(text(&o[1]).as_deref(), Some("x")),
        other => panic!("REPLICA IDENTITY FULL must carry the old row, got {other:?}"),
    }
    assert!(msgs.iter().any(|m| matches!(m, Message::Delete(d) if matches!(&d.old, OldTuple::Key(k) if text(&k[0]).as_deref() == Some("2")))));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Truncate(t) if t.relation_ids == [rel.id]))
    );
    assert!(msgs.iter().any(|m| matches!(m, Message::Message(l) if l.transactional && l.prefix == "acme" && &l.content[..] == b"in-tx")));
    assert!(msgs.iter().any(
        |m| matches!(m, Message::Message(l) if !l.transactional && &l.content[..] == b"no-tx")
    ));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Origin { name, .. } if name == "upstream")),
        "Origin message"
    );
    let last = msgs
        .iter()
        .rev()
        .find_map(|m| {
            if let Message::Insert(i) = m {
                Some(i)
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(last.new[2], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_on_start_replication_is_reported_with_its_sqlstate() {
    let s = shared();
    let cfg: tokio_postgres::Config = s.pg.dsn("postgres").parse().unwrap();
    let conn = ReplicationConnection::connect(&cfg, &cdc::tls::PgTls::disabled())
        .await
        .unwrap();
    let err = match conn
        .start_replication(
            "no_such_slot",
            cdc::Lsn::ZERO,
            &[("proto_version", "1".into())],
        )
        .await
    {
        Ok(_) => panic!("started replication on a missing slot"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some("42704"), "undefined_object: {err}");
    assert!(err.to_string().contains("no_such_slot"), "{err}");
}
