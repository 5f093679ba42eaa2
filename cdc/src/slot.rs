//! Checks the source before streaming and prepares the publication and the slot.
//!
//! walbridge owns the slot it is configured with: it creates it when missing and reuses it
//! otherwise, so a restart resumes from the slot's `confirmed_flush_lsn`. It refuses a slot that
//! is not `pgoutput`, belongs to another database, is in use, or has lost WAL, because streaming
//! from such a slot would silently skip or mix changes. A publication that lacks a configured
//! table is reported with the statement that fixes it rather than altered behind the
//! legacy team's back.

use tokio_postgres::Client;

use crate::conn::quote_ident;
use crate::lsn::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "wal_level is {0:?} on the source; logical replication needs `wal_level = logical` (ALTER SYSTEM SET wal_level = logical; then restart Postgres)"
    )]
    WalLevel(String),
    #[error(
        "configured table {0} does not exist in the source database; check `source.tables` in the config"
    )]
    MissingTable(String),
    #[error("configured schema {0} has no tables in the source database; check `source.tables`")]
    EmptySchema(String),
    #[error(
        "publication {publication:?} does not include {missing}; add it with: ALTER PUBLICATION {publication} ADD TABLE {missing}"
    )]
    PublicationMissingTables {
        publication: String,
        missing: String,
    },
    #[error("replication slot {slot:?} {problem}")]
    BadSlot { slot: String, problem: String },
    #[error(
        "replication slot {slot:?} is in use by another consumer (pid {pid}); stop it, or choose another `source.slot` name"
    )]
    InUse { slot: String, pid: String },
}

/// A table chosen in the config: `schema.table`, or `schema.*` for all tables of a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSelector {
    pub schema: String,
    /// `None` means every table of the schema.
    pub table: Option<String>,
}

/// What the slot looks like when streaming starts.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub created: bool,
    pub confirmed_flush: Lsn,
}

/// Verifies `wal_level`, resolves the selectors to existing tables, and makes sure the
/// publication exists and covers them. Returns the tables as `schema.table`.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    selectors: &[TableSelector],
) -> Result<Vec<String>, SlotError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SlotError::WalLevel(wal_level));
    }
    let mut tables = Vec::new();
    for sel in selectors {
        let rows = client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_tables \
                 WHERE schemaname = $1 AND ($2::text IS NULL OR tablename = $2) ORDER BY 2",
                &[&sel.schema, &sel.table],
            )
            .await?;
        if rows.is_empty() {
            return Err(match &sel.table {
                Some(t) => SlotError::MissingTable(format!("{}.{}", sel.schema, t)),
                None => SlotError::EmptySchema(sel.schema.clone()),
            });
        }
        for r in rows {
            let name = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            if !tables.contains(&name) {
                tables.push(name);
            }
        }
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    let quoted: Vec<String> = tables
        .iter()
        .map(|t| {
            let (s, n) = t.split_once('.').unwrap_or(("public", t));
            format!("{}.{}", quote_ident(s), quote_ident(n))
        })
        .collect();
    if !exists {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(publication),
            quoted.join(", ")
        );
        client.batch_execute(&sql).await?;
        tracing::info!(publication, tables = tables.len(), "created publication");
        return Ok(tables);
    }
    let published: Vec<String> = client
        .query(
            "SELECT schemaname::text || '.' || tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
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
    if !missing.is_empty() {
        return Err(SlotError::PublicationMissingTables {
            publication: publication.to_owned(),
            missing: missing.join(", "),
        });
    }
    Ok(tables)
}

/// Creates the slot if it does not exist, otherwise checks that it is usable.
pub async fn ensure_slot(client: &Client, slot: &str) -> Result<SlotState, SlotError> {
    let bad = |problem: String| SlotError::BadSlot {
        slot: slot.to_owned(),
        problem,
    };
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, wal_status, current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = row else {
        let r = client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        let lsn: String = r.get(0);
        let confirmed_flush = lsn
            .parse()
            .map_err(|e| bad(format!("returned a bad LSN: {e}")))?;
        tracing::info!(slot, lsn = %confirmed_flush, "created replication slot");
        return Ok(SlotState {
            created: true,
            confirmed_flush,
        });
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: String = row.get(1);
    let database: Option<String> = row.get(2);
    let active: bool = row.get(3);
    let active_pid: Option<i32> = row.get(4);
    let confirmed: Option<String> = row.get(5);
    let wal_status: Option<String> = row.get(6);
    let current_db: String = row.get(7);
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(bad(format!(
            "is a {slot_type} slot with plugin {plugin:?}; walbridge needs a logical pgoutput slot — choose another `source.slot` name"
        )));
    }
    if database.as_deref() != Some(current_db.as_str()) {
        return Err(bad(format!(
            "belongs to database {database:?}, not {current_db:?}; choose another `source.slot` name"
        )));
    }
    if active {
        return Err(SlotError::InUse {
            slot: slot.to_owned(),
            pid: active_pid.map_or("unknown".into(), |p| p.to_string()),
        });
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(bad(
            "has lost WAL it needs (wal_status = lost, max_slot_wal_keep_size exceeded); drop it with SELECT pg_drop_replication_slot('<slot>') and start again with a new snapshot".into(),
        ));
    }
    let confirmed_flush = confirmed
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .map_err(|e| bad(format!("has a bad confirmed_flush_lsn: {e}")))?;
    Ok(SlotState {
        created: false,
        confirmed_flush,
    })
}
