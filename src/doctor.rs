//! `walbridge doctor`: inspects the source database and says what to change and why, before a
//! pipeline is started against it. Read-only: it creates nothing.
//!
//! Each finding is OK, WARN (works, but a consumer or the disk may suffer) or FAIL (walbridge
//! will not start, or will lose information). The exit status is non-zero when anything fails.

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub topic: String,
    pub message: String,
    /// What to do about it, when something should be done.
    /// (Large columns: unbounded variable-length types, or a declared length over 255, which
    /// Postgres may store out of line; short varchar never is in practice.)
    pub fix: Option<String>,
}

fn ok(topic: &str, message: String) -> Finding {
    Finding {
        level: Level::Ok,
        topic: topic.into(),
        message,
        fix: None,
    }
}
fn warn(topic: &str, message: String, fix: String) -> Finding {
    Finding {
        level: Level::Warn,
        topic: topic.into(),
        message,
        fix: Some(fix),
    }
}
fn fail(topic: &str, message: String, fix: String) -> Finding {
    Finding {
        level: Level::Fail,
        topic: topic.into(),
        message,
        fix: Some(fix),
    }
}

/// Runs every check against the configured source.
pub async fn inspect(cfg: &Config) -> anyhow::Result<Vec<Finding>> {
    let (client, conn) = cfg
        .source
        .pg_config()
        .connect(cfg.source.tls())
        .await
        .map_err(|e| {
            let hint = crate::pipeline::source_hint(&e);
            anyhow::Error::new(e).context(format!(
                "connecting to the source {} ({hint})",
                cfg.source.dsn.redacted()
            ))
        })?;
    tokio::spawn(conn);
    let mut out = Vec::new();
    server(&client, &mut out).await?;
    let tables = tables(&client, cfg, &mut out).await?;
    publication(&client, &cfg.source.publication, &tables, &mut out).await?;
    slot(&client, &cfg.source.slot, &mut out).await?;
    if let Some(ev) = &cfg.events {
        events(&client, ev, &mut out).await?;
    }
    Ok(out)
}

/// Tables whose business-event mappings read old row values need REPLICA IDENTITY FULL;
/// walbridge refuses to start those mappings without it (see `crate::events`).
async fn events(
    client: &Client,
    ev: &crate::events::EventsConfig,
    out: &mut Vec<Finding>,
) -> anyhow::Result<()> {
    let need = crate::events::needs_full(client, ev).await?;
    if need.is_empty() {
        out.push(ok(
            "events",
            format!(
                "{} mapping(s): every table whose old values they read has REPLICA IDENTITY FULL",
                ev.mappings.len()
            ),
        ));
    }
    for n in need {
        out.push(fail(
            "events",
            format!(
                "{} needs REPLICA IDENTITY FULL: {}; without it Postgres logs no old values and walbridge will not start these mappings",
                n.table,
                n.why.join("; ")
            ),
            n.fix(),
        ));
    }
    Ok(())
}

async fn setting(client: &Client, name: &str) -> anyhow::Result<String> {
    Ok(client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?
        .get(0))
}

async fn server(client: &Client, out: &mut Vec<Finding>) -> anyhow::Result<()> {
    let version: i32 = setting(client, "server_version_num").await?.parse()?;
    if version < 140000 {
        out.push(fail(
            "server",
            format!("Postgres {} is too old", version / 10000),
            "walbridge needs Postgres 14 or later (pgoutput logical messages)".into(),
        ));
    } else {
        out.push(ok(
            "server",
            format!("Postgres {}", setting(client, "server_version").await?),
        ));
    }
    let wal_level = setting(client, "wal_level").await?;
    if wal_level == "logical" {
        out.push(ok("wal_level", "logical".into()));
    } else {
        out.push(fail(
            "wal_level",
            format!("{wal_level}: logical decoding is off"),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres".into(),
        ));
    }
    let max_slots: i64 = setting(client, "max_replication_slots").await?.parse()?;
    let used: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    if used >= max_slots {
        out.push(fail(
            "max_replication_slots",
            format!("{used} of {max_slots} slots in use: none left for walbridge"),
            "drop unused slots, or raise max_replication_slots (restart needed)".into(),
        ));
    } else {
        out.push(ok(
            "max_replication_slots",
            format!("{used} of {max_slots} in use"),
        ));
    }
    let senders: i64 = setting(client, "max_wal_senders").await?.parse()?;
    let active: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_replication", &[])
        .await?
        .get(0);
    if active >= senders {
        out.push(fail(
            "max_wal_senders",
            format!("{active} of {senders} WAL senders busy"),
            "raise max_wal_senders (restart needed)".into(),
        ));
    } else {
        out.push(ok("max_wal_senders", format!("{active} of {senders} busy")));
    }
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    if row.get::<_, bool>(0) {
        out.push(ok("privileges", "the user may replicate".into()));
    } else {
        out.push(fail(
            "privileges",
            "the user has neither REPLICATION nor SUPERUSER".into(),
            "ALTER ROLE <user> WITH REPLICATION (and grant SELECT on the captured tables)".into(),
        ));
    }
    let encoding = setting(client, "server_encoding").await?;
    if encoding == "UTF8" {
        out.push(ok("encoding", "UTF8".into()));
    } else {
        out.push(warn(
            "encoding",
            format!("{encoding}: text is sent in the database encoding"),
            "walbridge expects UTF8; values that are not valid UTF-8 fail to encode".into(),
        ));
    }
    let keep: String = setting(client, "max_slot_wal_keep_size").await?;
    if keep == "-1" {
        out.push(warn(
            "max_slot_wal_keep_size",
            "unlimited: a stalled consumer makes Postgres keep WAL until the disk is full".into(),
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (sized to your disk); then SELECT pg_reload_conf()".into(),
        ));
    } else {
        out.push(ok("max_slot_wal_keep_size", keep));
    }
    Ok(())
}

/// One captured table as the catalog describes it.
struct TableFacts {
    name: String,
    identity: char,
    primary_key: Vec<String>,
    toast_columns: Vec<String>,
}

async fn tables(
    client: &Client,
    cfg: &Config,
    out: &mut Vec<Finding>,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for sel in &cfg.source.tables {
        let (schema, table) = (sel.schema(), sel.table());
        let rows = client
            .query(
                "SELECT c.oid, n.nspname::text || '.' || c.relname::text, c.relreplident::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname = $1 AND ($2::text IS NULL OR c.relname = $2) \
                 ORDER BY 2",
                &[&schema, &table],
            )
            .await?;
        if rows.is_empty() {
            out.push(fail(
                "tables",
                format!("{sel} matches no table"),
                "fix `source.tables` in the config, or create the table".into(),
            ));
        }
        for r in rows {
            let oid: u32 = r.get(0);
            let facts = TableFacts {
                name: r.get(1),
                identity: r.get::<_, String>(2).chars().next().unwrap_or('d'),
                primary_key: client
                    .query(
                        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
                         ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1 AND i.indisprimary ORDER BY 1",
                        &[&oid],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
                toast_columns: client
                    .query(
                        "SELECT a.attname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                         WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
                         AND t.typlen = -1 AND a.attstorage IN ('x', 'e') \
                         AND (a.atttypmod = -1 OR a.atttypmod - 4 > 255) ORDER BY a.attnum",
                        &[&oid],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
            };
            out.push(table_finding(&facts));
            names.push(facts.name);
        }
    }
    Ok(names)
}

/// What the table's replica identity gives consumers, and what to change.
fn table_finding(t: &TableFacts) -> Finding {
    let topic = format!("table {}", t.name);
    let full = format!("ALTER TABLE {} REPLICA IDENTITY FULL", t.name);
    match (t.identity, t.primary_key.is_empty()) {
        ('n', _) => fail(
            &topic,
            "REPLICA IDENTITY NOTHING: updates and deletes carry no old row and no key".into(),
            full,
        ),
        ('f', _) => ok(&topic, "REPLICA IDENTITY FULL: `before` is the whole old row".into()),
        // Publishing such a table breaks the legacy application: Postgres refuses its UPDATEs
        // and DELETEs ("cannot update table ... because it does not have a replica identity").
        (_, true) if t.identity == 'd' => fail(
            &topic,
            "no primary key and DEFAULT identity: once published, Postgres rejects the application's UPDATE and DELETE on it".into(),
            format!("add a primary key, or {full}"),
        ),
        _ if !t.toast_columns.is_empty() => warn(
            &topic,
            format!(
                "key ({}); large column(s) {} are not resent when an UPDATE leaves them unchanged (named in unavailable_columns)",
                t.primary_key.join(", "),
                t.toast_columns.join(", ")
            ),
            format!("if consumers need full old rows or every value on update: {full}"),
        ),
        _ => ok(&topic, format!("key ({}); `before` holds the key only", t.primary_key.join(", "))),
    }
}

async fn publication(
    client: &Client,
    name: &str,
    tables: &[String],
    out: &mut Vec<Finding>,
) -> anyhow::Result<()> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?;
    if exists.is_none() {
        out.push(ok(
            "publication",
            format!("{name} does not exist yet; walbridge creates it on start"),
        ));
        return Ok(());
    }
    let published: Vec<String> = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&str> = tables
        .iter()
        .filter(|t| !published.contains(t))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        out.push(ok(
            "publication",
            format!("{name} covers all {} table(s)", tables.len()),
        ));
    } else {
        out.push(fail(
            "publication",
            format!("{name} lacks {}", missing.join(", ")),
            format!("ALTER PUBLICATION {name} ADD TABLE {}", missing.join(", ")),
        ));
    }
    Ok(())
}

async fn slot(client: &Client, name: &str, out: &mut Vec<Finding>) -> anyhow::Result<()> {
    let Some(facts) = cdc::slot::slot_facts(client, name).await? else {
        out.push(ok(
            "slot",
            format!("{name} does not exist yet; walbridge creates it on start"),
        ));
        return Ok(());
    };
    // The same judgment `walbridge run` makes; a slot in use is expected while walbridge runs.
    match facts.usable() {
        Ok(_) | Err(cdc::slot::SlotError::InUse { .. }) => {
            let mib = facts.retained_bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0);
            let msg = format!(
                "{name}: {}, retaining {mib:.1} MiB of WAL",
                if facts.active { "in use" } else { "idle" }
            );
            if mib > 1024.0 {
                out.push(warn(
                    "slot",
                    msg,
                    "is walbridge running and keeping up? `walbridge run` advances it".into(),
                ));
            } else {
                out.push(ok("slot", msg));
            }
        }
        // The error already says what to do.
        Err(e) => out.push(Finding {
            level: Level::Fail,
            topic: "slot".into(),
            message: e.to_string(),
            fix: None,
        }),
    }
    Ok(())
}

/// The findings as a readable report.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(s, "{tag}  {:<24} {}", f.topic, f.message);
        if let Some(fix) = &f.fix {
            let _ = writeln!(s, "      {:<24} fix: {fix}", "");
        }
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    let _ = writeln!(
        s,
        "\n{}",
        match worst {
            Level::Ok => "ready: nothing to change",
            Level::Warn => "ready, with warnings: read the fixes above",
            Level::Fail => "not ready: fix the FAIL lines above",
        }
    );
    s
}
