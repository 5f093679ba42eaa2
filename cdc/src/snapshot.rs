//! The initial snapshot: the rows that existed before the slot's consistent point, read so that
//! they meet the stream exactly (invariant 4).
//!
//! ```text
//!  replication conn: CREATE_REPLICATION_SLOT … (SNAPSHOT 'export') ─┐ consistent point C,
//!                    (idle: the exported snapshot lives until the    │ snapshot S
//!                     next command on this connection)               │
//!  snapshot conn:    BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT S; COPY t1; COPY t2; COMMIT
//!  replication conn: START_REPLICATION … C  (first transaction streamed commits after C)
//! ```
//!
//! Why this neither loses nor doubles a change: Postgres builds the exported snapshot at the
//! consistent point, so it sees exactly the transactions whose commit precedes C, and the slot
//! streams exactly those that commit after C. Every committed transaction is on one side. The
//! importing transaction is REPEATABLE READ, so every COPY reads that same state however long
//! the copy takes and whatever the application writes meanwhile.
//!
//! The Relation messages of pgoutput only come with a table's first streamed change, so the
//! snapshot builds its own from the catalog ([`catalog_relation`]): pgoutput sends the columns
//! in `attnum` order without dropped and generated ones, with `atttypid`/`atttypmod`, and flags
//! the replica identity's columns; the same rules are used here so that the later streamed
//! Relation compares equal.
//!
//! COPY's text format carries each value in the type's text output, as pgoutput does, only
//! escaped (see [`decode_line`]); rows are decoded one by one as they arrive, so memory does not
//! grow with the table.
//!
//! Uncertain / not done: a crash in the middle of the copy leaves the slot behind, and the next
//! start then streams without a snapshot (a clean failure drops the slot instead). Publication
//! row filters and column lists are not applied to snapshot rows.

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};

use crate::conn::quote_ident;
use crate::pgoutput::{Column, Relation, ReplicaIdentity, Tuple, TypeInfo, Value};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot of {table}: {source}")]
    Postgres {
        table: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "cannot import the slot's exported snapshot {name:?}: {source}; it is only valid while the replication connection that created the slot stays idle"
    )]
    Import {
        name: String,
        source: tokio_postgres::Error,
    },
    #[error("table {0} is not in the catalog (dropped while starting?); restart walbridge")]
    MissingTable(String),
    #[error("snapshot of {table}: row {row} has {got} columns, expected {want}")]
    ColumnCount {
        table: String,
        row: u64,
        got: usize,
        want: usize,
    },
}

/// Opens the snapshot transaction on `client` (a normal connection, not the replication one).
/// Every later [`copy_table`] on it reads the state as of the slot's consistent point.
///
/// The session gets the settings the replication connection has (see `conn`), because text
/// output depends on them and snapshot rows must read like streamed ones.
pub async fn import(client: &Client, snapshot_name: &str) -> Result<(), SnapshotError> {
    let sql = format!(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET IntervalStyle = 'iso_8601'; \
         SET extra_float_digits = 3; \
         BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        snapshot_name.replace('\'', "''")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|source| SnapshotError::Import {
            name: snapshot_name.to_owned(),
            source,
        })
}

/// Ends the snapshot transaction.
pub async fn finish(client: &Client) -> Result<(), SnapshotError> {
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|source| SnapshotError::Postgres {
            table: "(commit)".into(),
            source,
        })
}

/// The table as pgoutput would describe it in a Relation message, plus the user-defined types
/// its columns use (pgoutput's Type messages), read inside the snapshot transaction.
pub async fn catalog_relation(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<(Relation, Vec<TypeInfo>), SnapshotError> {
    let qualified = format!("{schema}.{table}");
    let pg = |source| SnapshotError::Postgres {
        table: qualified.clone(),
        source,
    };
    let Some(rel) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(pg)?
    else {
        return Err(SnapshotError::MissingTable(qualified));
    };
    let oid: u32 = rel.get(0);
    let ident: String = rel.get(1);
    let replica_identity = match ident.as_str() {
        "n" => ReplicaIdentity::Nothing,
        "f" => ReplicaIdentity::Full,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    // Key flags as pgoutput sets them: the columns of the replica identity index (the primary
    // key by default), every column under FULL, none under NOTHING.
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                    ($2 = 'f' OR EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid \
                       AND a.attnum = ANY(i.indkey) \
                       AND (($2 = 'd' AND i.indisprimary) OR ($2 = 'i' AND i.indisreplident)))) \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid, &ident],
        )
        .await
        .map_err(pg)?;
    let columns: Vec<Column> = rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            key: r.get(3),
        })
        .collect();
    // pgoutput sends a Type message for types outside the bootstrap catalog (oid >= 10000), and
    // names a domain by its base type, with "" for pg_catalog.
    let user_types: Vec<u32> = columns
        .iter()
        .map(|c| c.type_oid)
        .filter(|&o| o >= 10_000)
        .collect();
    let mut types = Vec::new();
    if !user_types.is_empty() {
        let rows = client
            .query(
                "WITH RECURSIVE b(orig, cur) AS ( \
                   SELECT t.oid, t.oid FROM pg_type t WHERE t.oid = ANY($1) \
                   UNION ALL SELECT b.orig, t.typbasetype FROM b JOIN pg_type t ON t.oid = b.cur \
                   WHERE t.typbasetype <> 0) \
                 SELECT b.orig, CASE WHEN n.nspname = 'pg_catalog' THEN '' ELSE n.nspname::text END, \
                        t.typname::text \
                 FROM b JOIN pg_type t ON t.oid = b.cur JOIN pg_namespace n ON n.oid = t.typnamespace \
                 WHERE t.typbasetype = 0",
                &[&user_types],
            )
            .await
            .map_err(pg)?;
        types = rows
            .iter()
            .map(|r| TypeInfo {
                oid: r.get(0),
                namespace: r.get(1),
                name: r.get(2),
            })
            .collect();
    }
    Ok((
        Relation {
            id: oid,
            namespace: schema.to_owned(),
            name: table.to_owned(),
            replica_identity,
            columns,
        },
        types,
    ))
}

/// A range of heap blocks of one table: `[lo, hi)`, or `[lo, end of table)` when `hi` is `None`.
///
/// Chunks are ctid ranges because a TID range scan (Postgres 14+) reads exactly those blocks,
/// whatever the table's keys look like, so chunks cost the same however the table is indexed.
/// The last chunk is open-ended: the block count is read at planning time and the table may have
/// grown since; rows the snapshot can see are all in blocks that existed when it was taken, but
/// an open end costs nothing and removes the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub lo: u32,
    pub hi: Option<u32>,
}

/// Splits a table of `pages` blocks into ranges of `chunk_pages` blocks (one open-ended range
/// for a small table).
pub fn plan_chunks(pages: u32, chunk_pages: u32) -> Vec<BlockRange> {
    let chunk_pages = chunk_pages.max(1);
    let mut out = Vec::new();
    let mut lo = 0;
    while pages.saturating_sub(lo) > chunk_pages {
        out.push(BlockRange {
            lo,
            hi: Some(lo + chunk_pages),
        });
        lo += chunk_pages;
    }
    out.push(BlockRange { lo, hi: None });
    out
}

/// The table's size in heap blocks (exact, from the file size) and Postgres's row estimate
/// (`reltuples`, -1 or 0 when never analyzed), for planning chunks and showing an ETA.
pub async fn table_size(client: &Client, rel: &Relation) -> Result<(u32, f64), SnapshotError> {
    let row = client
        .query_one(
            "SELECT (pg_relation_size($1::oid) / current_setting('block_size')::bigint)::int8, \
                    reltuples::float8 FROM pg_class WHERE oid = $1::oid",
            &[&rel.id],
        )
        .await
        .map_err(|source| SnapshotError::Postgres {
            table: format!("{}.{}", rel.namespace, rel.name),
            source,
        })?;
    let pages: i64 = row.get(0);
    Ok((u32::try_from(pages).unwrap_or(u32::MAX), row.get(1)))
}

/// Whether the server scans a ctid range by reading only its blocks (TID Range Scan, Postgres
/// 14). Older servers would scan the whole table for each chunk, so they get one chunk per table.
pub async fn supports_block_ranges(client: &Client) -> Result<bool, SnapshotError> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|source| SnapshotError::Postgres {
            table: "(server version)".into(),
            source,
        })?;
    Ok(row.get::<_, i32>(0) >= 140_000)
}

/// Starts `COPY … TO STDOUT` of the relation's columns (named, so the order is the Relation's
/// and generated columns are left out as pgoutput leaves them out), of the whole table or of the
/// blocks in `range`.
pub async fn copy_table(
    client: &Client,
    rel: &Relation,
    range: Option<BlockRange>,
) -> Result<CopyRows, SnapshotError> {
    let table = format!("{}.{}", rel.namespace, rel.name);
    let cols: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let filter = match range {
        None | Some(BlockRange { lo: 0, hi: None }) => String::new(),
        Some(BlockRange { lo, hi: None }) => format!(" WHERE ctid >= '({lo},0)'::tid"),
        Some(BlockRange { lo, hi: Some(hi) }) => {
            format!(" WHERE ctid >= '({lo},0)'::tid AND ctid < '({hi},0)'::tid")
        }
    };
    let sql = format!(
        "COPY (SELECT {} FROM {}.{}{filter}) TO STDOUT",
        if cols.is_empty() {
            String::new()
        } else {
            cols.join(", ")
        },
        quote_ident(&rel.namespace),
        quote_ident(&rel.name)
    );
    let stream = client
        .copy_out(sql.as_str())
        .await
        .map_err(|source| SnapshotError::Postgres {
            table: table.clone(),
            source,
        })?;
    Ok(CopyRows {
        stream: Box::pin(stream),
        buf: BytesMut::new(),
        table,
        width: rel.columns.len(),
        rows: 0,
        done: false,
        tuple: Vec::with_capacity(rel.columns.len()),
    })
}

/// The rows of one COPY, decoded as they arrive.
pub struct CopyRows {
    stream: Pin<Box<CopyOutStream>>,
    /// Data not yet split into lines (Postgres sends one row per CopyData, but nothing in the
    /// protocol promises it).
    buf: BytesMut,
    table: String,
    width: usize,
    rows: u64,
    done: bool,
    tuple: Tuple,
}

impl CopyRows {
    /// The next row, or `None` at the end of the table. The row lives in a buffer reused from
    /// row to row (one allocation per row was measurable in the snapshot's profile).
    pub async fn next(&mut self) -> Result<Option<&Tuple>, SnapshotError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1).freeze();
                self.row(line.slice(..pos))?;
                return Ok(Some(&self.tuple));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = self.buf.split().freeze();
                self.row(line)?;
                return Ok(Some(&self.tuple));
            }
            match self.stream.next().await {
                Some(Ok(data)) => self.buf.extend_from_slice(&data),
                Some(Err(source)) => {
                    return Err(SnapshotError::Postgres {
                        table: self.table.clone(),
                        source,
                    });
                }
                None => self.done = true,
            }
        }
    }

    /// Rows returned so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn row(&mut self, line: Bytes) -> Result<(), SnapshotError> {
        self.rows += 1;
        self.tuple.clear();
        // A table with no columns yields empty lines, which would read as one empty field.
        if !(self.width == 0 && line.is_empty()) {
            decode_line_into(&line, &mut self.tuple);
        }
        let tuple = &self.tuple;
        if tuple.len() != self.width {
            return Err(SnapshotError::ColumnCount {
                table: self.table.clone(),
                row: self.rows,
                got: tuple.len(),
                want: self.width,
            });
        }
        Ok(())
    }
}

/// Decodes one line of COPY's text format (without its newline) into the values pgoutput would
/// send: tab-separated fields, `\N` for NULL, backslash escapes (`\b \f \n \r \t \v`, `\\`,
/// octal `\ooo`, hex `\xhh`, and `\c` for any other character c). A field without a backslash
/// shares `line`'s memory.
pub fn decode_line(line: &Bytes) -> Tuple {
    let mut out = Vec::new();
    decode_line_into(line, &mut out);
    out
}

/// [`decode_line`] into `out` (appended).
pub fn decode_line_into(line: &Bytes, out: &mut Tuple) {
    // An empty line is a row of one empty field; `CopyRows` handles tables without columns.
    let mut start = 0;
    loop {
        let end = line[start..]
            .iter()
            .position(|&b| b == b'\t')
            .map_or(line.len(), |p| start + p);
        out.push(decode_field(line.slice(start..end)));
        if end == line.len() {
            return;
        }
        start = end + 1;
    }
}

fn decode_field(field: Bytes) -> Value {
    if field.as_ref() == b"\\N" {
        return Value::Null;
    }
    if !field.contains(&b'\\') {
        return Value::Text(field);
    }
    let mut v = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i == field.len() {
            v.push(b);
            continue;
        }
        let e = field[i];
        i += 1;
        match e {
            b'b' => v.push(0x08),
            b'f' => v.push(0x0c),
            b'n' => v.push(b'\n'),
            b'r' => v.push(b'\r'),
            b't' => v.push(b'\t'),
            b'v' => v.push(0x0b),
            b'0'..=b'7' => {
                let mut n = u32::from(e - b'0');
                let mut k = 0;
                while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    n = n * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    k += 1;
                }
                v.push((n & 0xff) as u8);
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                let mut n = 0u32;
                let mut k = 0;
                while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                    n = n * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                v.push(n as u8);
            }
            other => v.push(other),
        }
    }
    Value::Text(Bytes::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn chunks_cover_every_block_once_and_the_last_is_open() {
        assert_eq!(plan_chunks(0, 100), vec![BlockRange { lo: 0, hi: None }]);
        assert_eq!(plan_chunks(100, 100), vec![BlockRange { lo: 0, hi: None }]);
        assert_eq!(
            plan_chunks(250, 100),
            vec![
                BlockRange {
                    lo: 0,
                    hi: Some(100)
                },
                BlockRange {
                    lo: 100,
                    hi: Some(200)
                },
                BlockRange { lo: 200, hi: None },
            ]
        );
    }

    #[test]
    fn fields_split_on_tabs_with_null_and_empty() {
        let row = decode_line(&Bytes::from_static(b"1\t\\N\t\tabc"));
        assert_eq!(row, vec![text("1"), Value::Null, text(""), text("abc")]);
    }

    #[test]
    fn escapes_become_the_raw_text_output() {
        let row = decode_line(&Bytes::from_static(
            b"a\\tb\\nc\\\\d\\re\\bf\\fg\\vh\t\\101\\x42\\q\t\\\\N",
        ));
        assert_eq!(
            row,
            vec![
                text("a\tb\nc\\d\re\u{8}f\u{c}g\u{b}h"),
                text("ABq"),
                // An escaped backslash followed by N is the two-character text, not NULL.
                text("\\N"),
            ]
        );
    }

    #[test]
    fn utf8_passes_through_untouched() {
        let row = decode_line(&Bytes::from("Zoë\t日本\\t語".as_bytes().to_vec()));
        assert_eq!(row, vec![text("Zoë"), text("日本\t語")]);
    }
}
