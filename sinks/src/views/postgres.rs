//! Views as Postgres read-model tables, for services that want to query them with plain SQL.
//!
//! Each view gets a table of the same name (typed columns from the view's Arrow schema, primary
//! key = the view's key), created when the sink first sees the view. One epoch is one
//! transaction: per view one `DELETE … USING unnest(…)` and one
//! `INSERT … SELECT … FROM unnest(…) ON CONFLICT (key) DO UPDATE` (arrays as parameters: a
//! statement per view, not a round trip per row), then the epoch's offsets into
//! `walbridge_offsets` (per sink, topic, partition; only ever moved forward).
//!
//! `reconciliation_summary` also gets a SQL view `reconciliation_summary_total`: the whole
//! summary in one row (`scope` = `all`), added up over the table's rows, so a reader needs not
//! know that a processor group stores a row per shard
//! ([`transforms::state::summary_total_sql`]).
//!
//! Guarantee: the tables and the offsets commit together, so after a crash the table holds
//! exactly the epochs up to the stored offsets. On start the sink reads them
//! ([`ViewSink::committed_offsets`]) and skips every epoch it holds ([`Written::AlreadyHeld`]):
//! no duplicates, nothing missing. A lost connection fails `write`; the runtime reconnects by
//! opening the sink again.

use std::collections::BTreeMap;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, TimeUnit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use transforms::view::{Epoch, Offsets, ViewChanges};

use super::{ViewSink, ViewSinkError, Written, advance, holds, indices, key_names};

/// Settings of the Postgres view sink.
#[derive(Clone)]
pub struct PostgresViewSettings {
    /// libpq-style connection string (`host=… user=… password=… dbname=…`).
    pub dsn: String,
    /// Schema the tables go to (created if missing).
    pub schema: String,
}

impl std::fmt::Debug for PostgresViewSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The DSN may hold a password.
        f.debug_struct("PostgresViewSettings")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

pub struct PostgresViewSink {
    name: String,
    schema: String,
    client: Client,
    offsets: Offsets,
    /// Views whose table this process has ensured, with their column types.
    tables: BTreeMap<String, Vec<PgColumn>>,
}

/// How one Arrow column travels: as which array parameter, and the cast to the column's type.
#[derive(Debug, Clone)]
struct PgColumn {
    name: String,
    /// The column's SQL type.
    sql_type: String,
    /// How values are sent.
    wire: Wire,
}

#[derive(Debug, Clone, Copy)]
enum Wire {
    Bool,
    I16,
    I32,
    I64,
    F32,
    F64,
    Text,
    Bytes,
    /// Sent as text, cast by Postgres to `sql_type` (dates, times, decimals, big unsigned).
    TextCast,
}

impl Wire {
    fn array_type(self) -> &'static str {
        match self {
            Wire::Bool => "bool[]",
            Wire::I16 => "int2[]",
            Wire::I32 => "int4[]",
            Wire::I64 => "int8[]",
            Wire::F32 => "float4[]",
            Wire::F64 => "float8[]",
            Wire::Text | Wire::TextCast => "text[]",
            Wire::Bytes => "bytea[]",
        }
    }
}

fn pg_column(field: &Field) -> Option<PgColumn> {
    let (sql_type, wire) = match field.data_type() {
        DataType::Boolean => ("boolean".to_owned(), Wire::Bool),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => ("smallint".to_owned(), Wire::I16),
        DataType::Int32 | DataType::UInt16 => ("integer".to_owned(), Wire::I32),
        DataType::Int64 | DataType::UInt32 => ("bigint".to_owned(), Wire::I64),
        DataType::UInt64 => ("numeric(20,0)".to_owned(), Wire::TextCast),
        DataType::Float16 | DataType::Float32 => ("real".to_owned(), Wire::F32),
        DataType::Float64 => ("double precision".to_owned(), Wire::F64),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            ("text".to_owned(), Wire::Text)
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            ("bytea".to_owned(), Wire::Bytes)
        }
        DataType::Date32 | DataType::Date64 => ("date".to_owned(), Wire::TextCast),
        DataType::Timestamp(_, None) => ("timestamp".to_owned(), Wire::TextCast),
        DataType::Timestamp(_, Some(_)) => ("timestamptz".to_owned(), Wire::TextCast),
        DataType::Time32(_) | DataType::Time64(TimeUnit::Microsecond | TimeUnit::Nanosecond) => {
            ("time".to_owned(), Wire::TextCast)
        }
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => {
            (format!("numeric({p},{s})"), Wire::TextCast)
        }
        _ => return None,
    };
    Some(PgColumn {
        name: field.name().clone(),
        sql_type,
        wire,
    })
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The first statement of a transaction that changes the tables of `schema` (quoted): the
/// shards of a processor group open their sinks at once, and concurrent `CREATE … IF NOT
/// EXISTS` of one name fail with a unique violation, so such transactions take turns.
fn ddl_lock(schema: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('walbridge view sink ddl ' || {}));",
        literal(schema)
    )
}

/// One column's values as an array parameter.
fn param(col: &PgColumn, array: &ArrayRef) -> Result<Box<dyn ToSql + Sync + Send>, ArrowErr> {
    fn typed<T: Array + 'static>(a: &ArrayRef) -> Result<&T, ArrowErr> {
        a.as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| ArrowErr::CastError("unexpected array type after cast".into()))
    }
    Ok(match col.wire {
        Wire::Bool => {
            let a = cast(array, &DataType::Boolean)?;
            Box::new(typed::<BooleanArray>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::I16 => {
            let a = cast(array, &DataType::Int16)?;
            Box::new(typed::<Int16Array>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::I32 => {
            let a = cast(array, &DataType::Int32)?;
            Box::new(typed::<Int32Array>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::I64 => {
            let a = cast(array, &DataType::Int64)?;
            Box::new(typed::<Int64Array>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::F32 => {
            let a = cast(array, &DataType::Float32)?;
            Box::new(typed::<Float32Array>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::F64 => {
            let a = cast(array, &DataType::Float64)?;
            Box::new(typed::<Float64Array>(&a)?.iter().collect::<Vec<_>>())
        }
        Wire::Text | Wire::TextCast => {
            let a = cast(array, &DataType::Utf8)?;
            let v: Vec<Option<String>> = typed::<StringArray>(&a)?
                .iter()
                .map(|s| s.map(str::to_owned))
                .collect();
            Box::new(v)
        }
        Wire::Bytes => {
            let a = cast(array, &DataType::Binary)?;
            let v: Vec<Option<Vec<u8>>> = typed::<BinaryArray>(&a)?
                .iter()
                .map(|b| b.map(<[u8]>::to_vec))
                .collect();
            Box::new(v)
        }
    })
}

type ArrowErr = datafusion::arrow::error::ArrowError;

impl PostgresViewSink {
    /// Connects, creates the schema and `walbridge_offsets` if missing, and reads the offsets
    /// this sink (by `name`) stored.
    pub async fn open(name: &str, settings: &PostgresViewSettings) -> Result<Self, ViewSinkError> {
        let pg = |what: &str| {
            let sink = name.to_owned();
            let what = what.to_owned();
            move |source| ViewSinkError::Postgres { sink, what, source }
        };
        let (mut client, conn) = tokio_postgres::connect(&settings.dsn, NoTls)
            .await
            .map_err(pg("cannot connect; check the sink's dsn"))?;
        let sink_name = name.to_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(sink = %sink_name, error = %e, "view sink lost its postgres connection");
            }
        });
        let schema = ident(&settings.schema);
        let tx = client
            .transaction()
            .await
            .map_err(pg("cannot create walbridge_offsets"))?;
        tx.batch_execute(&format!(
            "{}
             CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.walbridge_offsets (
                 sink text NOT NULL,
                 topic text NOT NULL,
                 partition integer NOT NULL,
                 next_offset bigint NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (sink, topic, partition));",
            ddl_lock(&schema)
        ))
        .await
        .map_err(pg("cannot create walbridge_offsets"))?;
        tx.commit()
            .await
            .map_err(pg("cannot create walbridge_offsets"))?;
        let rows = client
            .query(
                &format!(
                    "SELECT topic, partition, next_offset FROM {schema}.walbridge_offsets WHERE sink = $1"
                ),
                &[&name],
            )
            .await
            .map_err(pg("cannot read walbridge_offsets"))?;
        let mut offsets = Offsets::default();
        for r in rows {
            offsets.0.insert((r.get(0), r.get(1)), r.get(2));
        }
        tracing::info!(sink = %name, partitions = offsets.0.len(), "postgres view sink opened");
        Ok(Self {
            name: name.to_owned(),
            schema,
            client,
            offsets,
            tables: BTreeMap::new(),
        })
    }

    fn table(&self, view: &str) -> String {
        format!("{}.{}", self.schema, ident(view))
    }

    fn view_err(&self, view: &str, reason: String) -> ViewSinkError {
        ViewSinkError::View {
            sink: self.name.clone(),
            view: view.to_owned(),
            reason,
        }
    }

    /// The view's columns, creating its table the first time.
    async fn ensure_table(
        &mut self,
        changes: &ViewChanges,
    ) -> Result<Vec<PgColumn>, ViewSinkError> {
        if let Some(cols) = self.tables.get(&changes.view) {
            return Ok(cols.clone());
        }
        let schema = changes.upserts.schema();
        let cols = schema
            .fields()
            .iter()
            .map(|f| {
                pg_column(f).ok_or_else(|| {
                    self.view_err(
                        &changes.view,
                        format!(
                            "column {} has type {}, which the postgres sink cannot store yet",
                            f.name(),
                            f.data_type()
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let keys = key_names(changes);
        if keys.is_empty() {
            return Err(self.view_err(&changes.view, "the view has no key columns".into()));
        }
        let defs: Vec<String> = cols
            .iter()
            .map(|c| format!("{} {}", ident(&c.name), c.sql_type))
            .collect();
        let pk: Vec<String> = keys.iter().map(|k| ident(k)).collect();
        let sql = format!(
            "{} CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}));",
            ddl_lock(&self.schema),
            self.table(&changes.view),
            defs.join(", "),
            pk.join(", ")
        );
        let err = |what: String| {
            let sink = self.name.clone();
            move |source| ViewSinkError::Postgres { sink, what, source }
        };
        let table_err = err(format!("cannot create the table of view {}", changes.view));
        let table = self.table(&changes.view);
        // A failed statement rolls the transaction back when it drops.
        let tx = self.client.transaction().await.map_err(table_err.clone())?;
        tx.batch_execute(&sql).await.map_err(table_err.clone())?;
        if changes.view == transforms::state::RECON_SUMMARY {
            // Created when missing only: replacing it would wait for (and block) every reader.
            let total = format!(
                "{}.{}",
                self.schema,
                ident(transforms::state::RECON_SUMMARY_TOTAL)
            );
            let view_err = err(format!(
                "cannot create the view {}",
                transforms::state::RECON_SUMMARY_TOTAL
            ));
            let missing: bool = tx
                .query_one("SELECT to_regclass($1::text) IS NULL", &[&total])
                .await
                .map_err(view_err.clone())?
                .get(0);
            if missing {
                let query = transforms::state::summary_total_sql(&table);
                tx.batch_execute(&format!("CREATE VIEW {total} AS {query}"))
                    .await
                    .map_err(view_err)?;
            }
        }
        tx.commit().await.map_err(table_err)?;
        self.tables.insert(changes.view.clone(), cols.clone());
        Ok(cols)
    }
}

/// `u.c1, u.c2::date, …` and `$1::int8[], $2::text[], …` for the given columns.
fn unnest_parts(cols: &[&PgColumn], alias: &str) -> (String, String, String) {
    let mut selects = Vec::new();
    let mut params = Vec::new();
    let mut names = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        names.push(format!("c{i}"));
        params.push(format!("${}::{}", i + 1, c.wire.array_type()));
        selects.push(match c.wire {
            Wire::TextCast => format!("{alias}.c{i}::{}", c.sql_type),
            _ => format!("{alias}.c{i}"),
        });
    }
    (selects.join(", "), params.join(", "), names.join(", "))
}

#[async_trait]
impl ViewSink for PostgresViewSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn committed_offsets(&self) -> Option<&Offsets> {
        Some(&self.offsets)
    }

    async fn write(&mut self, epoch: &Epoch) -> Result<Written, ViewSinkError> {
        if holds(&self.offsets, &epoch.offsets) {
            tracing::debug!(sink = %self.name, epoch = epoch.number, "epoch already held, skipped");
            return Ok(Written::AlreadyHeld);
        }
        // Tables first (DDL outside the epoch's transaction: creating one is idempotent).
        let mut plans = Vec::new();
        for changes in &epoch.changes {
            let cols = self.ensure_table(changes).await?;
            plans.push((changes, cols));
        }
        let name = self.name.clone();
        let pg = |what: String| {
            let sink = name.clone();
            move |source| ViewSinkError::Postgres { sink, what, source }
        };
        let arrow = |view: &str| {
            let sink = name.clone();
            let view = view.to_owned();
            move |source| ViewSinkError::Arrow { sink, view, source }
        };
        let tables: Vec<String> = plans.iter().map(|(c, _)| self.table(&c.view)).collect();
        let schema = self.schema.clone();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(pg("cannot begin".into()))?;
        for ((changes, cols), table) in plans.iter().zip(&tables) {
            let keys = key_names(changes);
            let key_cols: Vec<&PgColumn> = keys
                .iter()
                .filter_map(|k| cols.iter().find(|c| &c.name == k))
                .collect();
            if key_cols.len() != keys.len() {
                // Names the missing key column in the error.
                indices(&name, &changes.view, &changes.upserts, &keys)?;
            }
            // Deletes first, then upserts: should a key be in both, the row stays (last wins).
            if changes.deletes.num_rows() > 0 {
                let (selects, params, names) = unnest_parts(&key_cols, "d");
                let on: Vec<String> = key_cols
                    .iter()
                    .zip(selects.split(", "))
                    .map(|(c, s)| format!("t.{} = {s}", ident(&c.name)))
                    .collect();
                let sql = format!(
                    "DELETE FROM {table} t USING unnest({params}) AS d({names}) WHERE {}",
                    on.join(" AND ")
                );
                let values = key_cols
                    .iter()
                    .zip(changes.deletes.columns())
                    .map(|(c, a)| param(c, a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(arrow(&changes.view))?;
                let refs: Vec<&(dyn ToSql + Sync)> = values
                    .iter()
                    .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                tx.execute(&sql, &refs)
                    .await
                    .map_err(pg(format!("cannot delete from {}", changes.view)))?;
            }
            if changes.upserts.num_rows() > 0 {
                let all: Vec<&PgColumn> = cols.iter().collect();
                let (selects, params, names) = unnest_parts(&all, "u");
                let col_list: Vec<String> = cols.iter().map(|c| ident(&c.name)).collect();
                let pk: Vec<String> = keys.iter().map(|k| ident(k)).collect();
                let set: Vec<String> = cols
                    .iter()
                    .filter(|c| !keys.contains(&c.name))
                    .map(|c| format!("{0} = EXCLUDED.{0}", ident(&c.name)))
                    .collect();
                let action = if set.is_empty() {
                    "NOTHING".to_owned()
                } else {
                    format!("UPDATE SET {}", set.join(", "))
                };
                let sql = format!(
                    "INSERT INTO {table} ({}) SELECT {selects} FROM unnest({params}) AS u({names}) \
                     ON CONFLICT ({}) DO {action}",
                    col_list.join(", "),
                    pk.join(", ")
                );
                let values = cols
                    .iter()
                    .zip(changes.upserts.columns())
                    .map(|(c, a)| param(c, a))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(arrow(&changes.view))?;
                let refs: Vec<&(dyn ToSql + Sync)> = values
                    .iter()
                    .map(|v| v.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                tx.execute(&sql, &refs)
                    .await
                    .map_err(pg(format!("cannot upsert into {}", changes.view)))?;
            }
        }
        let (topics, (partitions, nexts)): (Vec<&str>, (Vec<i32>, Vec<i64>)) = epoch
            .offsets
            .0
            .iter()
            .map(|((t, p), o)| (t.as_str(), (*p, *o)))
            .unzip();
        tx.execute(
            &format!(
                "INSERT INTO {schema}.walbridge_offsets AS o (sink, topic, partition, next_offset)
                 SELECT $1, * FROM unnest($2::text[], $3::int4[], $4::int8[])
                 ON CONFLICT (sink, topic, partition) DO UPDATE
                 SET next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), updated_at = now()"
            ),
            &[&name, &topics, &partitions, &nexts],
        )
        .await
        .map_err(pg("cannot store the offsets".into()))?;
        tx.commit().await.map_err(pg("cannot commit".into()))?;
        advance(&mut self.offsets, &epoch.offsets);
        tracing::debug!(sink = %self.name, epoch = epoch.number, "view epoch committed");
        Ok(Written::Stored)
    }
}
