//! The registry's state and its rules, kept durable in one append-only JSON-lines log.
//!
//! # Semantics (as Confluent's)
//!
//! - Schema ids are global and stable forever. Registering a schema already known under any
//!   subject reuses its id; under the same subject (live version) it also reuses the version.
//!   A schema stays answerable by id after every subject using it is deleted, even permanently:
//!   messages framed with that id may still sit in a topic. Ids are never reused.
//! - Two schema texts are "the same" when their JSON is equal after dropping whitespace and
//!   ordering object keys. (Confluent compares Avro's full string form, which also ignores
//!   formatting; unlike Avro's Parsing Canonical Form this keeps `logicalType`, defaults and
//!   custom properties, so a schema that only adds a logical type gets a new id, as it must.)
//! - Versions of a subject are numbered from 1; a new version is one past the highest number
//!   still stored (soft-deleted versions included, permanently deleted ones not).
//! - Deleting is two-step: a soft delete hides a version (or every version of a subject) from
//!   reads, lookups and compatibility checks; only a soft-deleted version may then be deleted
//!   permanently. A permanent subject delete also drops the subject's compatibility setting.
//! - A new schema must pass the subject's compatibility level (its own, else the global one,
//!   else BACKWARD) against the latest live version, or every live version for the transitive
//!   levels (see [`super::compat`]).
//! - Only AVRO schemas without references are accepted.
//!
//! # Durability
//!
//! Every change is one line appended to `schemas.jsonl` and `fsync`ed before the HTTP answer,
//! so an id a producer has used is never handed out again after a crash:
//!
//! ```text
//! {"subject":"t-value","version":1,"id":1,"schema":"..."}           a version (the original format)
//! {"op":"config","subject":"t-value","compatibility":"FULL"}        a level; subject null = global,
//!                                                                    compatibility null = removed
//! {"op":"delete","subject":"t-value","version":2,"permanent":false} version null = whole subject
//! ```
//!
//! Logs written before config and delete lines existed hold only version lines and load as
//! they are. On start the log is replayed through the same checks the live requests pass; a
//! torn last line (crash mid-write, never acknowledged) is cut off, any other damage is an
//! error.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::Schema;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::RegistryError;
use super::compat::{self, CompatibilityLevel};

pub(crate) const LOG_FILE: &str = "schemas.jsonl";

/// A version line of the log (the only kind the first format had).
#[derive(Debug, Serialize, Deserialize)]
struct VersionLine {
    subject: String,
    version: u32,
    id: u32,
    schema: String,
}

/// The other lines, told apart from version lines by their `op` field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum OpLine {
    Config {
        subject: Option<String>,
        compatibility: Option<CompatibilityLevel>,
    },
    Delete {
        subject: String,
        version: Option<u32>,
        permanent: bool,
    },
}

impl Serialize for CompatibilityLevel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CompatibilityLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        CompatibilityLevel::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!("unknown compatibility level {name:?}"))
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Version {
    pub id: u32,
    pub deleted: bool,
}

#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    file: File,
    /// Bytes of complete lines in the file; a failed append is cut back to this.
    len: u64,
    /// Schema text by id - 1, as first registered. Never shrinks.
    schemas: Vec<Arc<str>>,
    ids_by_normal_form: HashMap<String, u32>,
    /// Each subject's stored versions (soft-deleted included); a subject with none is removed.
    pub subjects: BTreeMap<String, BTreeMap<u32, Version>>,
    global: Option<CompatibilityLevel>,
    subject_levels: BTreeMap<String, CompatibilityLevel>,
}

/// Outcome of a registration.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Registered {
    pub id: u32,
    pub version: u32,
    pub created: bool,
}

/// A version of a subject, found for an answer.
#[derive(Debug)]
pub(crate) struct Found {
    pub id: u32,
    pub version: u32,
    pub schema: Arc<str>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, RegistryError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        if !existed {
            // Make the new file's directory entry durable too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        let mut store = Store {
            path: path.clone(),
            file,
            len: 0,
            schemas: Vec::new(),
            ids_by_normal_form: HashMap::new(),
            subjects: BTreeMap::new(),
            global: None,
            subject_levels: BTreeMap::new(),
        };
        let reader = BufReader::new(File::open(&path).map_err(io(&path))?);
        let mut good_len = 0u64;
        let mut lines = reader.split(b'\n').enumerate().peekable();
        while let Some((i, line)) = lines.next() {
            let line = line.map_err(io(&path))?;
            let corrupt = |reason: String| RegistryError::Corrupt {
                path: path.clone(),
                line: i + 1,
                reason,
            };
            match parse_line(&line) {
                Ok(entry) => store.replay(entry).map_err(corrupt)?,
                // Each line is written with one write and fsynced before the answer, so a torn
                // last line was never acknowledged to anyone: safe to drop.
                Err(_) if lines.peek().is_none() => {
                    tracing::warn!(path = %path.display(), line = i + 1, "cutting torn last line of schema log");
                    break;
                }
                Err(e) => return Err(corrupt(e)),
            }
            good_len += line.len() as u64 + 1;
        }
        let actual = store.file.metadata().map_err(io(&path))?.len();
        if good_len < actual {
            store.file.set_len(good_len).map_err(io(&path))?;
            store.file.sync_all().map_err(io(&path))?;
        } else if good_len == actual + 1 {
            // A complete last record without its newline: finish the line before appending.
            store
                .file
                .write_all(b"\n")
                .and_then(|()| store.file.sync_data())
                .map_err(io(&path))?;
        }
        store.len = good_len;
        tracing::info!(
            path = %path.display(),
            schemas = store.schemas.len(),
            subjects = store.subjects.len(),
            "schema registry store opened"
        );
        Ok(store)
    }

    /// Applies a replayed line, checking it as the live request was checked.
    fn replay(&mut self, line: Line) -> Result<(), String> {
        match line {
            Line::Version(e) => {
                let next_id = self.schemas.len() as u32 + 1;
                if e.id == 0 || e.id > next_id {
                    return Err(format!("schema id {} skips ahead of {next_id}", e.id));
                }
                let next_version = self.next_version(&e.subject);
                if e.version != next_version {
                    return Err(format!(
                        "version {} of subject {} is not the next one ({next_version})",
                        e.version, e.subject
                    ));
                }
                let normal = if e.id == next_id {
                    Some(normal_form(&e.schema)?)
                } else {
                    None
                };
                self.apply_version(e, normal);
            }
            Line::Op(OpLine::Config {
                subject,
                compatibility,
            }) => self.apply_config(subject, compatibility),
            Line::Op(OpLine::Delete {
                subject,
                version,
                permanent,
            }) => {
                let affected = self
                    .check_delete(&subject, version, permanent)
                    .map_err(|e| e.message)?;
                self.apply_delete(&subject, version, permanent, &affected);
            }
        }
        Ok(())
    }

    fn apply_version(&mut self, e: VersionLine, normal: Option<String>) {
        if let Some(normal) = normal {
            self.schemas.push(e.schema.into());
            self.ids_by_normal_form.insert(normal, e.id);
        }
        self.subjects.entry(e.subject).or_default().insert(
            e.version,
            Version {
                id: e.id,
                deleted: false,
            },
        );
    }

    fn apply_config(&mut self, subject: Option<String>, level: Option<CompatibilityLevel>) {
        match (subject, level) {
            (None, level) => self.global = level,
            (Some(s), Some(level)) => {
                self.subject_levels.insert(s, level);
            }
            (Some(s), None) => {
                self.subject_levels.remove(&s);
            }
        }
    }

    fn apply_delete(
        &mut self,
        subject: &str,
        version: Option<u32>,
        permanent: bool,
        affected: &[u32],
    ) {
        let Some(versions) = self.subjects.get_mut(subject) else {
            return;
        };
        for v in affected {
            if permanent {
                versions.remove(v);
            } else if let Some(entry) = versions.get_mut(v) {
                entry.deleted = true;
            }
        }
        if versions.is_empty() {
            self.subjects.remove(subject);
        }
        if permanent && version.is_none() {
            self.subject_levels.remove(subject);
        }
    }

    /// The versions a delete would affect, or why it may not happen.
    fn check_delete(
        &self,
        subject: &str,
        version: Option<u32>,
        permanent: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let versions = self
            .subjects
            .get(subject)
            .ok_or_else(|| ApiError::subject_not_found(subject))?;
        match version {
            None => {
                let live: Vec<u32> = versions
                    .iter()
                    .filter(|(_, v)| !v.deleted)
                    .map(|(n, _)| *n)
                    .collect();
                match (permanent, live.is_empty()) {
                    (false, true) => Err(ApiError::subject_soft_deleted(subject)),
                    (false, false) => Ok(live),
                    (true, false) => Err(ApiError::subject_not_soft_deleted(subject)),
                    (true, true) => Ok(versions.keys().copied().collect()),
                }
            }
            Some(n) => {
                let v = versions
                    .get(&n)
                    .ok_or_else(|| ApiError::version_not_found(n))?;
                match (permanent, v.deleted) {
                    (false, true) => Err(ApiError::version_soft_deleted(subject, n)),
                    (true, false) => Err(ApiError::version_not_soft_deleted(subject, n)),
                    _ => Ok(vec![n]),
                }
            }
        }
    }

    /// Appends one line and makes it durable; on failure the file is cut back so the log never
    /// keeps a half-written line in the middle.
    fn append(&mut self, line: &impl Serialize) -> Result<(), ApiError> {
        let mut bytes = serde_json::to_vec(line).map_err(|e| {
            ApiError::storage(RegistryError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(e),
            })
        })?;
        bytes.push(b'\n');
        let result = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            let _ = self.file.set_len(self.len);
            return Err(ApiError::storage(RegistryError::Io {
                path: self.path.clone(),
                source,
            }));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn next_version(&self, subject: &str) -> u32 {
        self.subjects
            .get(subject)
            .and_then(|v| v.keys().next_back())
            .map_or(1, |n| n + 1)
    }

    /// `(version, id)` of a subject's versions, oldest first; soft-deleted ones only when asked.
    pub fn versions(&self, subject: &str, deleted: bool) -> Vec<(u32, u32)> {
        self.subjects
            .get(subject)
            .into_iter()
            .flatten()
            .filter(|(_, v)| deleted || !v.deleted)
            .map(|(n, v)| (*n, v.id))
            .collect()
    }

    /// Subjects with a live version (or any version, when `deleted`).
    pub fn subject_names(&self, deleted: bool) -> Vec<String> {
        self.subjects
            .iter()
            .filter(|(_, vs)| deleted || vs.values().any(|v| !v.deleted))
            .map(|(s, _)| s.clone())
            .collect()
    }

    pub fn schema(&self, id: u32) -> Option<&Arc<str>> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.schemas.get(i))
    }

    /// `(subject, version)` pairs that use schema `id`.
    pub fn uses_of(&self, id: u32, deleted: bool) -> Vec<(String, u32)> {
        self.subjects
            .iter()
            .flat_map(|(s, vs)| {
                vs.iter()
                    .filter(move |(_, v)| v.id == id && (deleted || !v.deleted))
                    .map(move |(n, _)| (s.clone(), *n))
            })
            .collect()
    }

    /// Subject `subject` at `version` (`latest`, `-1`, or a number).
    pub fn find_version(
        &self,
        subject: &str,
        version: &str,
        deleted: bool,
    ) -> Result<Found, ApiError> {
        let versions = self.versions(subject, deleted);
        if versions.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        let (version, id) = match parse_version(version)? {
            None => *versions.last().expect("not empty"),
            Some(n) => *versions
                .iter()
                .find(|(v, _)| *v == n)
                .ok_or_else(|| ApiError::version_not_found(n))?,
        };
        let schema = self
            .schema(id)
            .cloned()
            .ok_or_else(ApiError::schema_not_found)?;
        Ok(Found {
            id,
            version,
            schema,
        })
    }

    pub fn lookup(&self, subject: &str, schema: &str, deleted: bool) -> Result<Found, ApiError> {
        let versions = self.versions(subject, deleted);
        if versions.is_empty() {
            return Err(ApiError::subject_not_found(subject));
        }
        let normal = normal_form(schema).map_err(|e| ApiError::invalid_schema(&e))?;
        let id = self
            .ids_by_normal_form
            .get(&normal)
            .copied()
            .ok_or_else(ApiError::schema_not_found)?;
        let (version, _) = versions
            .iter()
            .rev()
            .find(|(_, v)| *v == id)
            .copied()
            .ok_or_else(ApiError::schema_not_found)?;
        let schema = self
            .schema(id)
            .cloned()
            .ok_or_else(ApiError::schema_not_found)?;
        Ok(Found {
            id,
            version,
            schema,
        })
    }

    pub fn register(&mut self, subject: &str, schema: &str) -> Result<Registered, ApiError> {
        let parsed = parse_schema(schema)?;
        let normal = normal_form(schema).map_err(|e| ApiError::invalid_schema(&e))?;
        let known = self.ids_by_normal_form.get(&normal).copied();
        let live = self.versions(subject, false);
        if let Some(id) = known
            && let Some((version, _)) = live.iter().rev().find(|(_, v)| *v == id)
        {
            return Ok(Registered {
                id,
                version: *version,
                created: false,
            });
        }
        let level = self.level(subject);
        let against: &[(u32, u32)] = if level.is_transitive() {
            &live
        } else {
            live.last().map(std::slice::from_ref).unwrap_or(&[])
        };
        let problems = self.incompatibilities(level, &parsed, against)?;
        if !problems.is_empty() {
            return Err(ApiError::incompatible(subject, &problems));
        }
        let line = VersionLine {
            subject: subject.to_owned(),
            version: self.next_version(subject),
            id: known.unwrap_or(self.schemas.len() as u32 + 1),
            schema: schema.to_owned(),
        };
        self.append(&line)?;
        let registered = Registered {
            id: line.id,
            version: line.version,
            created: true,
        };
        self.apply_version(line, known.is_none().then_some(normal));
        Ok(registered)
    }

    /// Confluent's verbose messages for every way `candidate` breaks `level` against the given
    /// `(version, id)`s; empty when compatible.
    pub fn incompatibilities(
        &self,
        level: CompatibilityLevel,
        candidate: &Schema,
        against: &[(u32, u32)],
    ) -> Result<Vec<String>, ApiError> {
        let mut messages = Vec::new();
        // Newest first, as Confluent reports.
        for &(version, id) in against.iter().rev() {
            let text = self.schema(id).ok_or_else(ApiError::schema_not_found)?;
            // Stored schemas parsed when they were registered; one that no longer parses (a
            // stricter library) cannot be checked against, which is the store's problem.
            let old = Schema::parse_str(text).map_err(|e| {
                ApiError::storage(RegistryError::InvalidSchema {
                    id,
                    source: Box::new(e),
                })
            })?;
            let found = compat::check_pair(level, candidate, &old);
            if found.is_empty() {
                continue;
            }
            for (new_is_reader, problem) in &found {
                let (reader, writer) = if *new_is_reader {
                    ("new", "old")
                } else {
                    ("old", "new")
                };
                messages.push(format!(
                    "{{errorType:'{}', description:'{}', additionalInfo:'{}'}}",
                    problem.kind.as_str(),
                    problem.describe(reader, writer),
                    problem.detail
                ));
            }
            messages.push(format!("{{oldSchemaVersion: {version}}}"));
            messages.push(format!("{{oldSchema: '{text}'}}"));
            messages.push(format!("{{compatibility: '{level}'}}"));
        }
        Ok(messages)
    }

    /// The level in force for `subject`.
    pub fn level(&self, subject: &str) -> CompatibilityLevel {
        self.subject_levels
            .get(subject)
            .copied()
            .unwrap_or_else(|| self.global_level())
    }

    pub fn global_level(&self) -> CompatibilityLevel {
        self.global.unwrap_or_default()
    }

    pub fn subject_level(&self, subject: &str) -> Option<CompatibilityLevel> {
        self.subject_levels.get(subject).copied()
    }

    /// Sets (or with `None` removes) the global level or a subject's.
    pub fn set_level(
        &mut self,
        subject: Option<&str>,
        level: Option<CompatibilityLevel>,
    ) -> Result<(), ApiError> {
        let line = OpLine::Config {
            subject: subject.map(str::to_owned),
            compatibility: level,
        };
        self.append(&line)?;
        self.apply_config(subject.map(str::to_owned), level);
        Ok(())
    }

    /// Deletes a subject's version (`Some`) or every version; returns the versions deleted.
    pub fn delete(
        &mut self,
        subject: &str,
        version: Option<u32>,
        permanent: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let affected = self.check_delete(subject, version, permanent)?;
        let line = OpLine::Delete {
            subject: subject.to_owned(),
            version,
            permanent,
        };
        self.append(&line)?;
        self.apply_delete(subject, version, permanent, &affected);
        Ok(affected)
    }

    /// Resolves `latest` for a delete: the newest live version, or for a permanent delete the
    /// newest stored one.
    pub fn resolve_for_delete(
        &self,
        subject: &str,
        version: &str,
        permanent: bool,
    ) -> Result<u32, ApiError> {
        match parse_version(version)? {
            Some(n) => Ok(n),
            None => self
                .versions(subject, permanent)
                .last()
                .map(|(n, _)| *n)
                .ok_or_else(|| ApiError::subject_not_found(subject)),
        }
    }
}

enum Line {
    Version(VersionLine),
    Op(OpLine),
}

fn parse_line(bytes: &[u8]) -> Result<Line, String> {
    let json: Json = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if json.get("op").is_some() {
        serde_json::from_value(json)
            .map(Line::Op)
            .map_err(|e| e.to_string())
    } else {
        serde_json::from_value(json)
            .map(Line::Version)
            .map_err(|e| e.to_string())
    }
}

/// `None` for `latest` (or `-1`), else a version number in Confluent's range.
pub(crate) fn parse_version(v: &str) -> Result<Option<u32>, ApiError> {
    match v {
        "latest" | "-1" => Ok(None),
        v => v
            .parse()
            .ok()
            .filter(|&n| n >= 1 && n <= i32::MAX as u32)
            .map(Some)
            .ok_or_else(|| ApiError::invalid_version(v)),
    }
}

pub(crate) fn parse_schema(schema: &str) -> Result<Schema, ApiError> {
    Schema::parse_str(schema).map_err(|e| ApiError::invalid_schema(&e))
}

/// Whitespace-free JSON with object keys sorted, used to tell equal schemas apart from
/// formatting differences.
fn normal_form(schema: &str) -> Result<String, String> {
    fn write(v: &Json, out: &mut String) {
        match v {
            Json::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Json::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let v: Json = serde_json::from_str(schema).map_err(|e| format!("schema is not JSON: {e}"))?;
    let mut out = String::with_capacity(schema.len());
    write(&v, &mut out);
    Ok(out)
}

/// An error answer in Confluent's shape: HTTP status, `error_code`, `message`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: u32,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: String) -> Self {
        Self {
            status,
            code,
            message,
        }
    }
    pub fn subject_not_found(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        )
    }
    pub fn version_not_found(version: u32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        )
    }
    pub fn schema_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, 40403, "Schema not found".into())
    }
    pub fn schema_id_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        )
    }
    fn subject_soft_deleted(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40404,
            format!(
                "Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"
            ),
        )
    }
    fn subject_not_soft_deleted(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40405,
            format!("Subject '{subject}' was not deleted first before being permanently deleted"),
        )
    }
    fn version_soft_deleted(subject: &str, version: u32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40406,
            format!(
                "Subject '{subject}' Version {version} was soft deleted.Set permanent=true to \
                 delete permanently"
            ),
        )
    }
    fn version_not_soft_deleted(subject: &str, version: u32) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40407,
            format!(
                "Subject '{subject}' Version {version} was not deleted first before being \
                 permanently deleted"
            ),
        )
    }
    pub fn subject_level_not_configured(subject: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        )
    }
    fn incompatible(subject: &str, details: &[String]) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \
                 \"{subject}\", details: [{}]",
                details.join(", ")
            ),
        )
    }
    pub fn invalid_schema(reason: &dyn std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {reason}"),
        )
    }
    pub fn invalid_version(v: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{v}' is not a valid version id. Allowed values are \
                 between [1, 2^31-1] and the string \"latest\""
            ),
        )
    }
    pub fn invalid_level() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, \
             backward_transitive, forward_transitive, and full_transitive"
                .into(),
        )
    }
    pub fn bad_request(reason: &dyn std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            400,
            format!("Bad request: {reason}"),
        )
    }
    pub fn not_found_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found".into())
    }
    pub fn storage(e: RegistryError) -> Self {
        tracing::error!(error = %e, "schema registry store failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "Error in the backend data store".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("walbridge-registry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    const A: &str = r#"{"type":"record","name":"A","fields":[{"name":"x","type":"long"}]}"#;
    const A_REFORMATTED: &str =
        r#"{ "name": "A", "type": "record", "fields": [ { "type": "long", "name": "x" } ] }"#;
    const B: &str = r#"{"type":"record","name":"A","fields":[{"name":"x","type":{"type":"long","logicalType":"timestamp-micros"}}]}"#;

    fn ids(s: &Store, subject: &str) -> Vec<u32> {
        s.versions(subject, true)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    #[test]
    fn ids_are_global_and_formatting_does_not_matter() {
        let dir = temp_dir("ids");
        let mut s = Store::open(&dir).unwrap();
        let reg = |id, version, created| Registered {
            id,
            version,
            created,
        };
        assert_eq!(s.register("t-value", A).unwrap(), reg(1, 1, true));
        assert_eq!(
            s.register("t-value", A_REFORMATTED).unwrap(),
            reg(1, 1, false)
        );
        assert_eq!(s.register("u-value", A).unwrap(), reg(1, 1, true));
        // Adding a logical type is a different schema (Parsing Canonical Form would say equal).
        assert_eq!(s.register("t-value", B).unwrap(), reg(2, 2, true));
        let err = s
            .register("t-value", r#"{"type":"record","name":"A"}"#)
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::UNPROCESSABLE_ENTITY, 42201)
        );
        drop(s);

        let s = Store::open(&dir).unwrap();
        assert_eq!(ids(&s, "t-value"), vec![1, 2]);
        assert_eq!(ids(&s, "u-value"), vec![1]);
        assert_eq!(
            s.lookup("t-value", A_REFORMATTED, false).unwrap().version,
            1
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_last_line_is_cut_but_damage_elsewhere_is_an_error() {
        let dir = temp_dir("torn");
        let mut s = Store::open(&dir).unwrap();
        s.register("t-value", A).unwrap();
        drop(s);
        let path = dir.join(LOG_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut torn = good.clone();
        torn.extend_from_slice(br#"{"op":"delete","subj"#);
        std::fs::write(&path, &torn).unwrap();

        let mut s = Store::open(&dir).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good, "torn line must be cut");
        assert_eq!(s.register("t-value", B).unwrap().id, 2);
        drop(s);

        let mut damaged = b"not json\n".to_vec();
        damaged.extend_from_slice(&std::fs::read(&path).unwrap());
        std::fs::write(&path, &damaged).unwrap();
        assert!(matches!(
            Store::open(&dir),
            Err(RegistryError::Corrupt { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_of_the_first_format_loads_and_a_replayed_delete_is_checked() {
        let dir = temp_dir("oldlog");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LOG_FILE);
        let old = format!(
            "{}\n{}\n",
            serde_json::json!({"subject":"t-value","version":1,"id":1,"schema":A}),
            serde_json::json!({"subject":"t-value","version":2,"id":2,"schema":B}),
        );
        std::fs::write(&path, &old).unwrap();
        let s = Store::open(&dir).unwrap();
        assert_eq!(ids(&s, "t-value"), vec![1, 2]);
        drop(s);

        // A permanent delete of a version never soft-deleted cannot have been accepted.
        let bad = format!(
            "{old}{}\n{}\n",
            r#"{"op":"delete","subject":"t-value","version":1,"permanent":true}"#,
            r#"{"op":"config","subject":null,"compatibility":"FULL"}"#
        );
        std::fs::write(&path, bad).unwrap();
        let err = Store::open(&dir).unwrap_err();
        assert!(
            matches!(&err, RegistryError::Corrupt { line: 3, reason, .. } if reason.contains("not deleted first")),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
