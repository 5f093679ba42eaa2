//! Checks the source before streaming and prepares the publication and the slot.
//!
//! walbridge owns the slot it is configured with: it creates it when missing and reuses it
//! otherwise, so a restart resumes from the slot's `confirmed_flush_lsn`. It refuses a slot that
//! is not `pgoutput`, belongs to another database, is in use, or has lost WAL, because streaming
//! from such a slot would silently skip or mix changes. A publication that lacks a configured
//! table is reported with the statement that fixes it rather than altered behind the
//! legacy team's back.
//!
//! A publication walbridge creates publishes `schema.*` selectors as `TABLES IN SCHEMA`, so a
//! table created mid-stream is captured from its first row without a restart; the pipeline
//! creates its topic when the table's first Relation message arrives.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::conn::{ConnError, ReplicationConnection, quote_ident};
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
    #[error(
        "configured schema {0} does not exist in the source database (or has no tables, on Postgres 14); check `source.tables`"
    )]
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
        "{tables} would break the legacy application if published: with no primary key and no replica identity, Postgres rejects UPDATE and DELETE on a published table. \
         Give each a primary key, or run ALTER TABLE <table> REPLICA IDENTITY FULL, or leave it out of `source.tables` (a `schema.*` selector includes it)"
    )]
    NoReplicaIdentity { tables: String },
    #[error("replication connection: {0}")]
    Conn(#[from] ConnError),
    #[error(
        "replication slot {slot:?} is in use by another consumer (pid {pid}); stop it, or choose another `source.slot` name"
    )]
    InUse { slot: String, pid: String },
}

/// Which tables to capture (`source.tables`): `schema.table`, or `schema.*` for every table of
/// a schema.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TableSelector {
    Table { schema: String, table: String },
    AllInSchema { schema: String },
}

impl TableSelector {
    pub fn schema(&self) -> &str {
        match self {
            TableSelector::Table { schema, .. } | TableSelector::AllInSchema { schema } => schema,
        }
    }

    /// The table's name; `None` for every table of the schema.
    pub fn table(&self) -> Option<&str> {
        match self {
            TableSelector::Table { table, .. } => Some(table),
            TableSelector::AllInSchema { .. } => None,
        }
    }

    pub fn matches(&self, schema: &str, table: &str) -> bool {
        match self {
            TableSelector::Table {
                schema: s,
                table: t,
            } => s == schema && t == table,
            TableSelector::AllInSchema { schema: s } => s == schema,
        }
    }
}

impl std::fmt::Display for TableSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableSelector::Table { schema, table } => write!(f, "{schema}.{table}"),
            TableSelector::AllInSchema { schema } => write!(f, "{schema}.*"),
        }
    }
}

/// What the slot looks like when streaming starts.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
}

/// Verifies `wal_level`, resolves the selectors to existing tables, and makes sure the
/// publication exists and covers them. Returns the tables as `schema.table`.
///
/// A `schema.*` selector becomes `TABLES IN SCHEMA` (Postgres 15+), so a table created in that
/// schema later joins the publication by itself and its changes are streamed from its first
/// insert. Where that is not possible (Postgres 14 or older, or a user who is not superuser,
/// which `TABLES IN SCHEMA` requires), the publication lists today's tables and a warning gives
/// the statement that would make new tables follow.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    selectors: &[TableSelector],
) -> Result<Vec<String>, SlotError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SlotError::WalLevel(wal_level));
    }
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let schema_publications = version >= 150_000;
    let mut tables = Vec::new();
    for sel in selectors {
        let rows = client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_tables \
                 WHERE schemaname = $1 AND ($2::text IS NULL OR tablename = $2) ORDER BY 2",
                &[&sel.schema(), &sel.table()],
            )
            .await?;
        if rows.is_empty() {
            match sel.table() {
                Some(t) => return Err(SlotError::MissingTable(format!("{}.{}", sel.schema(), t))),
                // An empty schema is fine when its future tables are captured; a schema that
                // does not exist is a typo in the config.
                None if !schema_publications || !schema_exists(client, sel.schema()).await? => {
                    return Err(SlotError::EmptySchema(sel.schema().to_owned()));
                }
                None => {}
            }
        }
        for r in rows {
            let name = format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1));
            if !tables.contains(&name) {
                tables.push(name);
            }
        }
    }
    refuse_tables_without_identity(client, &tables).await?;
    let schemas: Vec<&str> = selectors
        .iter()
        .filter(|s| s.table().is_none())
        .map(|s| s.schema())
        .fold(Vec::new(), |mut v, s| {
            if !v.contains(&s) {
                v.push(s);
            }
            v
        });
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        create_publication(client, publication, &tables, &schemas, schema_publications).await?;
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
    // Today's tables are covered; say so when tomorrow's would not be. Not an error: a
    // publication the legacy team keeps by hand may list tables on purpose.
    for schema in schemas {
        if !schema_published(client, publication, schema, schema_publications).await? {
            tracing::warn!(
                publication,
                schema,
                fix = %format!("ALTER PUBLICATION {} ADD TABLES IN SCHEMA {}", quote_ident(publication), quote_ident(schema)),
                "publication lists the schema's tables one by one; tables created in it later will not be streamed"
            );
        }
    }
    Ok(tables)
}

async fn schema_exists(client: &Client, schema: &str) -> Result<bool, SlotError> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await?
        .is_some())
}

/// Whether tables created in `schema` later join `publication` by themselves.
async fn schema_published(
    client: &Client,
    publication: &str,
    schema: &str,
    schema_publications: bool,
) -> Result<bool, SlotError> {
    let sql = if schema_publications {
        "SELECT 1 FROM pg_publication p WHERE p.pubname = $1 AND (p.puballtables OR EXISTS ( \
           SELECT 1 FROM pg_publication_namespace pn JOIN pg_namespace n ON n.oid = pn.pnnspid \
           WHERE pn.pnpubid = p.oid AND n.nspname = $2))"
    } else {
        "SELECT 1 FROM pg_publication p WHERE p.pubname = $1 AND p.puballtables AND $2::text IS NOT NULL"
    };
    Ok(client
        .query_opt(sql, &[&publication, &schema])
        .await?
        .is_some())
}

/// `CREATE PUBLICATION … FOR TABLES IN SCHEMA s, …, TABLE t, …`; tables of a listed schema are
/// not named again. Falls back to naming every table where schemas cannot be published.
async fn create_publication(
    client: &Client,
    publication: &str,
    tables: &[String],
    schemas: &[&str],
    schema_publications: bool,
) -> Result<(), SlotError> {
    let quote_table = |t: &String| {
        let (s, n) = t.split_once('.').unwrap_or(("public", t));
        format!("{}.{}", quote_ident(s), quote_ident(n))
    };
    let by_table = format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        quote_ident(publication),
        tables
            .iter()
            .map(quote_table)
            .collect::<Vec<_>>()
            .join(", ")
    );
    if schema_publications && !schemas.is_empty() {
        let others: Vec<String> = tables
            .iter()
            .filter(|t| {
                let s = t.split_once('.').map_or("public", |(s, _)| s);
                !schemas.contains(&s)
            })
            .map(quote_table)
            .collect();
        let mut sql = format!(
            "CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}",
            quote_ident(publication),
            schemas
                .iter()
                .map(|s| quote_ident(s))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !others.is_empty() {
            sql.push_str(", TABLE ");
            sql.push_str(&others.join(", "));
        }
        match client.batch_execute(&sql).await {
            Ok(()) => {
                tracing::info!(
                    publication,
                    schemas = schemas.len(),
                    tables = others.len(),
                    "created publication"
                );
                return Ok(());
            }
            // TABLES IN SCHEMA needs a superuser; a table owner can still publish by table.
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) && !tables.is_empty() => {
                tracing::warn!(
                    publication,
                    fix = %format!("ALTER PUBLICATION {} ADD TABLES IN SCHEMA {}", quote_ident(publication), schemas.iter().map(|s| quote_ident(s)).collect::<Vec<_>>().join(", ")),
                    "not allowed to publish whole schemas; publishing today's tables only, so tables created later will not be streamed until a superuser runs the fix"
                );
            }
            Err(e) => return Err(e.into()),
        }
    } else if !schemas.is_empty() {
        tracing::warn!(
            publication,
            "postgres before 15 cannot publish whole schemas; publishing today's tables only, so tables created later need ALTER PUBLICATION … ADD TABLE"
        );
    }
    client.batch_execute(&by_table).await?;
    tracing::info!(publication, tables = tables.len(), "created publication");
    Ok(())
}

/// Publishing a table without a replica identity makes Postgres refuse the application's UPDATE
/// and DELETE on it, which is the one thing walbridge must never do to the monolith. Such tables
/// are refused before any publication is created or used.
async fn refuse_tables_without_identity(
    client: &Client,
    tables: &[String],
) -> Result<(), SlotError> {
    let bad: Vec<String> = client
        .query(
            "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname::text || '.' || c.relname::text = ANY($1) \
               AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
                    (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
             ORDER BY 1",
            &[&tables],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(SlotError::NoReplicaIdentity {
            tables: bad.join(", "),
        })
    }
}

/// What the catalog says of a slot: read once, judged by [`SlotFacts::usable`] when starting
/// and reported as is by `walbridge doctor`.
#[derive(Debug, Clone)]
pub struct SlotFacts {
    pub name: String,
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub current_database: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<String>,
    pub wal_status: Option<String>,
    /// WAL the slot keeps from being recycled (current WAL position − restart_lsn).
    pub retained_bytes: Option<i64>,
}

/// Reads the slot's row of `pg_replication_slots`; `None` when there is no such slot.
pub async fn slot_facts(client: &Client, slot: &str) -> Result<Option<SlotFacts>, SlotError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, wal_status, current_database()::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotFacts {
        name: slot.to_owned(),
        plugin: row.get(0),
        slot_type: row.get(1),
        database: row.get(2),
        active: row.get(3),
        active_pid: row.get(4),
        confirmed_flush: row.get(5),
        wal_status: row.get(6),
        current_database: row.get(7),
        retained_bytes: row.get(8),
    }))
}

impl SlotFacts {
    /// Whether walbridge can stream from this slot now, and from where.
    pub fn usable(&self) -> Result<SlotState, SlotError> {
        self.ours()?;
        let bad = |problem: String| SlotError::BadSlot {
            slot: self.name.clone(),
            problem,
        };
        if self.wal_status.as_deref() == Some("lost") {
            return Err(bad(format!(
                "has lost WAL it needs (wal_status = lost, max_slot_wal_keep_size exceeded); drop it with SELECT pg_drop_replication_slot('{}') and start again with a new snapshot",
                self.name
            )));
        }
        let confirmed_flush = self
            .confirmed_flush
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .map_err(|e| bad(format!("has a bad confirmed_flush_lsn: {e}")))?;
        Ok(SlotState { confirmed_flush })
    }

    /// Whether the slot could be walbridge's at all: a logical pgoutput slot of this database,
    /// not in use by another process. Checked before anything is created for the pipeline.
    pub fn ours(&self) -> Result<(), SlotError> {
        let bad = |problem: String| SlotError::BadSlot {
            slot: self.name.clone(),
            problem,
        };
        let (plugin, slot_type) = (&self.plugin, &self.slot_type);
        if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
            return Err(bad(format!(
                "is a {slot_type} slot with plugin {plugin:?}; walbridge needs a logical pgoutput slot — choose another `source.slot` name"
            )));
        }
        if self.database.as_deref() != Some(self.current_database.as_str()) {
            return Err(bad(format!(
                "belongs to database {:?}, not {:?}; choose another `source.slot` name",
                self.database, self.current_database
            )));
        }
        if self.active {
            return Err(SlotError::InUse {
                slot: self.name.clone(),
                pid: self.active_pid.map_or("unknown".into(), |p| p.to_string()),
            });
        }
        Ok(())
    }
}

/// Checks an existing slot before streaming from it; `None` when there is no such slot.
pub async fn check_slot(client: &Client, slot: &str) -> Result<Option<SlotState>, SlotError> {
    slot_facts(client, slot)
        .await?
        .map(|f| f.usable())
        .transpose()
}

/// A slot just created on a replication connection, with the snapshot it exported.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The first LSN the slot streams: every transaction committed before it is in the snapshot,
    /// every one committed after it is streamed.
    pub consistent_point: Lsn,
    /// Name for `SET TRANSACTION SNAPSHOT`; valid only while the creating connection stays idle.
    pub snapshot_name: String,
}

/// Creates the slot on the replication connection and has it export its snapshot
/// (`CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`, Postgres 15 syntax). The caller must import
/// the snapshot before sending anything else on `conn`.
pub async fn create_slot_with_snapshot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<CreatedSlot, SlotError> {
    create(conn, slot, "").await
}

/// As [`create_slot_with_snapshot`], but the slot lives only as long as `conn`: it places one
/// exported snapshot at an exact point of the WAL (its consistent point) and is then dropped by
/// closing the connection. Used to copy a table while the main slot keeps streaming.
pub async fn create_temporary_slot_with_snapshot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<CreatedSlot, SlotError> {
    create(conn, slot, "TEMPORARY ").await
}

async fn create(
    conn: &mut ReplicationConnection,
    slot: &str,
    temporary: &str,
) -> Result<CreatedSlot, SlotError> {
    let bad = |problem: String| SlotError::BadSlot {
        slot: slot.to_owned(),
        problem,
    };
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} {temporary}LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot)
        ))
        .await?;
    // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
    let row = rows
        .first()
        .ok_or_else(|| bad("was created but the server returned no row".into()))?;
    let field = |i: usize, what: &str| {
        row.get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| bad(format!("was created but the server returned no {what}")))
    };
    let consistent_point = field(1, "consistent point")?
        .parse()
        .map_err(|e| bad(format!("returned a bad consistent point: {e}")))?;
    let snapshot_name = field(2, "snapshot name")?;
    tracing::info!(slot, lsn = %consistent_point, temporary = !temporary.is_empty(), "created replication slot with an exported snapshot");
    Ok(CreatedSlot {
        consistent_point,
        snapshot_name,
    })
}

/// Drops the slot from the replication connection that created it. Used when the initial
/// snapshot could not be completed: a slot left behind would make the next start skip the
/// snapshot, losing every row it had not yet delivered.
pub async fn drop_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<(), SlotError> {
    conn.simple_query(&format!("DROP_REPLICATION_SLOT {}", quote_ident(slot)))
        .await?;
    tracing::info!(slot, "dropped replication slot of an unfinished snapshot");
    Ok(())
}
