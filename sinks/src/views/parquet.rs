//! Views as Parquet changelog files for the lake.
//!
//! Every write adds one file per view the epoch changed,
//! `<dir>/<view>/date=YYYY-MM-DD/part-<position>.parquet` (UTC date of the write; `position` =
//! the sum of the epoch's next offsets, zero-padded, so files sort in epoch order).
//! `walbridge process` lets epochs gather for up to a checkpoint interval before it hands them
//! to this sink as one (and sooner when a checkpoint waits for them), so the lake gets a file
//! per changed view per checkpoint, not one per epoch (which were tens per second under load). A file holds
//! the view's columns (all nullable) plus `_op` (`upsert` with the full row, `delete` with the key
//! columns only) and `_position`. Replaying the files in name order and applying each row by key
//! gives the view; a query engine reads them as a Hive-partitioned table.
//!
//! Crash safety: each file is written as `.part-….parquet.tmp`, fsynced, then renamed (atomic on
//! one filesystem) and the directory fsynced, so a reader never sees a torn file; leftover
//! `.tmp` files are removed on open. After the epoch's files, `<dir>/_walbridge_offsets.json`
//! is replaced the same way: it is the sink's commit point.
//!
//! Guarantee: at-least-once per epoch. On start the sink reads the offsets file and skips epochs
//! it holds. A crash after an epoch's files and before the offsets file makes the epoch be
//! written again; its file name comes from its offsets, so it replaces its own file (a duplicate
//! remains only if the replay happens on a later UTC day; its rows equal the first copy's and
//! carry the same `_position`, so readers can drop it).
//!
//! Shards: processors that share the partitions (`processors.instances: group`) each write
//! their shard's epochs into the same directory ([`ParquetViewSink::open_shard`]): file names
//! carry the shard (`part-<shard>-<position>.parquet`) and each shard has its own offsets file
//! (`_walbridge_offsets.<shard>.json`) and touches only its own temp files. Shards hold disjoint
//! keys, so replaying each shard's files in name order gives the view.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, new_null_array};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use transforms::view::{Epoch, Offsets, ViewChanges};

use super::{ViewSink, ViewSinkError, Written, advance, holds, indices, key_names};

const OFFSETS_FILE: &str = "_walbridge_offsets.json";

/// Cloned for each write, which runs on a blocking thread; the copy's offsets replace these
/// once it succeeded.
#[derive(Clone)]
pub struct ParquetViewSink {
    name: String,
    dir: PathBuf,
    offsets: Offsets,
    /// `-<shard>` in file names, or empty.
    shard: String,
}

impl ParquetViewSink {
    /// Opens (creating) `dir`, removes temp files a crash left, reads the stored offsets.
    pub fn open(name: &str, dir: &Path) -> Result<Self, ViewSinkError> {
        Self::open_shard(name, dir, None)
    }

    /// [`ParquetViewSink::open`] for one shard of the views (see the module doc).
    pub fn open_shard(name: &str, dir: &Path, shard: Option<&str>) -> Result<Self, ViewSinkError> {
        let shard = shard.map_or(String::new(), |s| format!("-{s}"));
        let err = |what: &str, path: &Path, e: &dyn std::fmt::Display| ViewSinkError::Parquet {
            sink: name.to_owned(),
            path: path.display().to_string(),
            what: what.to_owned(),
            reason: e.to_string(),
        };
        fs::create_dir_all(dir).map_err(|e| err("cannot create the directory", dir, &e))?;
        if let Some(other) = other_mode_offsets(dir, &shard) {
            let mode = if shard.is_empty() { "group" } else { "single" };
            return Err(err(
                &format!("the directory holds a lake written with processors.instances: {mode}"),
                &dir.join(other),
                &"the changelogs of the two modes do not mix (one cannot take back the other's rows); \
                  point this sink at a new directory, or remove this one to rewrite it from the topics",
            ));
        }
        remove_temp_files(dir, &shard);
        let path = dir.join(offsets_file(&shard));
        let offsets = match fs::read(&path) {
            Ok(bytes) => parse_offsets(&bytes).map_err(|e| {
                err(
                    "cannot read the stored offsets; fix or remove the file to rewrite from the start",
                    &path,
                    &e,
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Offsets::default(),
            Err(e) => return Err(err("cannot read the stored offsets", &path, &e)),
        };
        tracing::info!(sink = %name, dir = %dir.display(), partitions = offsets.0.len(), "parquet view sink opened");
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            offsets,
            shard,
        })
    }

    fn err(&self, what: &str, path: &Path, e: impl std::fmt::Display) -> ViewSinkError {
        ViewSinkError::Parquet {
            sink: self.name.clone(),
            path: path.display().to_string(),
            what: what.to_owned(),
            reason: e.to_string(),
        }
    }

    fn write_view(
        &self,
        changes: &ViewChanges,
        position: i64,
        date: &str,
    ) -> Result<(), ViewSinkError> {
        let batch = changelog(&self.name, changes, position)?;
        let dir = self.dir.join(&changes.view).join(format!("date={date}"));
        fs::create_dir_all(&dir).map_err(|e| self.err("cannot create the directory", &dir, e))?;
        let file = format!("part{}-{position:020}.parquet", self.shard);
        let tmp = dir.join(format!(".{file}.tmp"));
        let path = dir.join(&file);
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let f = File::create(&tmp).map_err(|e| self.err("cannot create", &tmp, e))?;
        let mut w = ArrowWriter::try_new(f, batch.schema(), Some(props))
            .map_err(|e| self.err("cannot start the file", &tmp, e))?;
        w.write(&batch)
            .map_err(|e| self.err("cannot write rows", &tmp, e))?;
        let f = w
            .into_inner()
            .map_err(|e| self.err("cannot finish the file", &tmp, e))?;
        f.sync_all()
            .map_err(|e| self.err("cannot fsync", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| self.err("cannot rename into place", &path, e))?;
        sync_dir(&dir).map_err(|e| self.err("cannot fsync the directory", &dir, e))?;
        Ok(())
    }

    fn store_offsets(&self, offsets: &Offsets) -> Result<(), ViewSinkError> {
        let file = offsets_file(&self.shard);
        let path = self.dir.join(&file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        let json = serde_json::Value::Array(
            offsets
                .0
                .iter()
                .map(
                    |((t, p), o)| serde_json::json!({"topic": t, "partition": p, "next_offset": o}),
                )
                .collect(),
        );
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(json.to_string().as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        };
        write().map_err(|e| self.err("cannot store the offsets", &path, e))
    }
}

/// The epoch's changes of one view as changelog rows: upserts (full rows), then deletes (keys,
/// other columns null), each with `_op` and `_position`.
fn changelog(
    sink: &str,
    changes: &ViewChanges,
    position: i64,
) -> Result<RecordBatch, ViewSinkError> {
    let view = changes.upserts.schema();
    let arrow = |source| ViewSinkError::Arrow {
        sink: sink.to_owned(),
        view: changes.view.clone(),
        source,
    };
    let mut fields: Vec<Field> = view
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.push(Field::new("_op", DataType::Utf8, false));
    fields.push(Field::new("_position", DataType::Int64, false));
    let schema: SchemaRef = Arc::new(Schema::new(fields));

    let keys = key_names(changes);
    let key_idx = indices(sink, &changes.view, &changes.upserts, &keys)?;
    let with_meta = |mut cols: Vec<ArrayRef>, op: &str, n: usize| {
        cols.push(Arc::new(StringArray::from(vec![op; n])));
        cols.push(Arc::new(Int64Array::from(vec![position; n])));
        RecordBatch::try_new(schema.clone(), cols)
    };
    let ups = with_meta(
        changes.upserts.columns().to_vec(),
        "upsert",
        changes.upserts.num_rows(),
    )
    .map_err(arrow)?;
    let n = changes.deletes.num_rows();
    let del_cols: Vec<ArrayRef> = view
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| match key_idx.iter().position(|k| *k == i) {
            Some(k) => changes.deletes.column(k).clone(),
            None => new_null_array(f.data_type(), n),
        })
        .collect();
    let dels = with_meta(del_cols, "delete", n).map_err(arrow)?;
    concat_batches(&schema, [&ups, &dels]).map_err(arrow)
}

fn parse_offsets(bytes: &[u8]) -> Result<Offsets, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut offsets = Offsets::default();
    for e in v.as_array().ok_or("expected a JSON array")? {
        let topic = e["topic"].as_str().ok_or("topic missing")?;
        let partition = e["partition"].as_i64().ok_or("partition missing")?;
        let next = e["next_offset"].as_i64().ok_or("next_offset missing")?;
        let partition = i32::try_from(partition).map_err(|e| e.to_string())?;
        offsets.0.insert((topic.to_owned(), partition), next);
    }
    Ok(offsets)
}

/// Temp files a crash left (never visible as data: readers skip dot files, and they go here).
/// `_walbridge_offsets.json`, or `_walbridge_offsets.<shard>.json` (`shard` = `-<shard>`).
/// The offsets file of the other mode in `dir`, if there is one: a shard's when this sink is
/// unsharded (`shard` empty), the unsharded one when it is a shard.
fn other_mode_offsets(dir: &Path, shard: &str) -> Option<String> {
    if !shard.is_empty() {
        return dir
            .join(OFFSETS_FILE)
            .exists()
            .then(|| OFFSETS_FILE.to_owned());
    }
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        (name != OFFSETS_FILE && name.starts_with("_walbridge_offsets.") && name.ends_with(".json"))
            .then_some(name)
    })
}

fn offsets_file(shard: &str) -> String {
    match shard.strip_prefix('-') {
        Some(s) => format!("_walbridge_offsets.{s}.json"),
        None => OFFSETS_FILE.to_owned(),
    }
}

/// Removes the temp files a crash left: every one, or only `shard`'s (the other shards may be
/// writing theirs right now).
fn remove_temp_files(dir: &Path, shard: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let own = |name: &str| {
        shard.is_empty()
            || name.starts_with(&format!(".part{shard}-"))
            || name == format!(".{}.tmp", offsets_file(shard))
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            remove_temp_files(&path, shard);
        } else if name.starts_with('.') && name.ends_with(".tmp") && own(&name) {
            let _ = fs::remove_file(&path);
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `YYYY-MM-DD` of a Unix time in seconds (UTC), proleptic Gregorian (Hinnant's civil_from_days).
fn utc_date(secs: i64) -> String {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[async_trait]
impl ViewSink for ParquetViewSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn committed_offsets(&self) -> Option<&Offsets> {
        Some(&self.offsets)
    }

    async fn write(&mut self, epoch: &Epoch) -> Result<Written, ViewSinkError> {
        if holds(&self.offsets, &epoch.offsets) {
            return Ok(Written::AlreadyHeld);
        }
        // Compressing and fsyncing a checkpoint interval's changes takes tens of ms: on a
        // thread for blocking work, not on the runtime's workers, which serve the SQL endpoint
        // (and, in one process with the pipeline, the change capture).
        let mut sink = self.clone();
        let epoch = epoch.clone();
        let offsets = tokio::task::spawn_blocking(move || {
            sink.write_files(&epoch)?;
            Ok::<_, ViewSinkError>(sink.offsets)
        })
        .await
        .map_err(|e| self.err("the writing thread failed", &self.dir, e))??;
        self.offsets = offsets;
        Ok(Written::Stored)
    }
}

impl ParquetViewSink {
    /// Writes the epoch's files and then its offsets (blocking).
    fn write_files(&mut self, epoch: &Epoch) -> Result<(), ViewSinkError> {
        let position: i64 = epoch.offsets.0.values().sum();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let date = utc_date(now);
        for changes in &epoch.changes {
            if changes.upserts.num_rows() + changes.deletes.num_rows() == 0 {
                continue;
            }
            self.write_view(changes, position, &date)?;
        }
        let mut next = self.offsets.clone();
        advance(&mut next, &epoch.offsets);
        self.store_offsets(&next)?;
        self.offsets = next;
        tracing::debug!(sink = %self.name, epoch = epoch.number, "view epoch written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shards_in_one_directory_keep_their_own_offsets_and_temp_files() {
        let dir =
            std::env::temp_dir().join(format!("walbridge-lake-shards-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let epoch = |p: i32, next: i64| Epoch {
            number: 1,
            offsets: Offsets([(("t".to_owned(), p), next)].into_iter().collect()),
            changes: Vec::new(),
        };
        let mut a = ParquetViewSink::open_shard("lake", &dir, Some("skus-0")).unwrap();
        let mut b = ParquetViewSink::open_shard("lake", &dir, Some("skus-1")).unwrap();
        assert!(matches!(
            a.write(&epoch(0, 5)).await.unwrap(),
            Written::Stored
        ));
        assert!(matches!(
            b.write(&epoch(1, 7)).await.unwrap(),
            Written::Stored
        ));
        // A write of shard 1 in flight while shard 0 reopens: not shard 0's to remove.
        let theirs = dir.join(".part-skus-1-00000000000000000007.parquet.tmp");
        fs::write(&theirs, b"partial").unwrap();
        let a = ParquetViewSink::open_shard("lake", &dir, Some("skus-0")).unwrap();
        assert_eq!(
            a.committed_offsets().unwrap().0.keys().collect::<Vec<_>>(),
            [&("t".to_owned(), 0)],
            "each shard reads back only its own offsets"
        );
        assert!(theirs.exists());
        let b = ParquetViewSink::open_shard("lake", &dir, Some("skus-1")).unwrap();
        assert!(!theirs.exists(), "a shard's own leftovers go on its reopen");
        assert_eq!(
            b.committed_offsets()
                .unwrap()
                .0
                .values()
                .collect::<Vec<_>>(),
            [&7]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lake_of_one_mode_refuses_the_other() {
        let dir = std::env::temp_dir().join(format!("walbridge-lake-modes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ParquetViewSink::open_shard("lake", &dir, Some("skus-0")).unwrap();
        fs::write(dir.join("_walbridge_offsets.skus-0.json"), b"[]").unwrap();
        ParquetViewSink::open_shard("lake", &dir, Some("skus-1")).expect("another shard");
        let e = ParquetViewSink::open_shard("lake", &dir, None)
            .err()
            .expect("one processor over a group's lake")
            .to_string();
        assert!(
            e.contains("_walbridge_offsets.skus-0.json") && e.contains("new directory"),
            "{e}"
        );
        fs::remove_file(dir.join("_walbridge_offsets.skus-0.json")).unwrap();
        fs::write(dir.join(OFFSETS_FILE), b"[]").unwrap();
        ParquetViewSink::open_shard("lake", &dir, None).expect("the same mode");
        let e = ParquetViewSink::open_shard("lake", &dir, Some("skus-0"))
            .err()
            .expect("a shard over one processor's lake")
            .to_string();
        assert!(e.contains(OFFSETS_FILE), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_767_225_599), "2025-12-31");
        assert_eq!(utc_date(1_767_225_600), "2026-01-01");
    }
}
