//! A Confluent-compatible schema registry server: the REST subset that serializers and
//! deserializers use, for local runs, tests and demos where no registry is available.
//!
//! # Semantics (as Confluent's)
//!
//! - Schema ids are global. Registering a schema already known under any subject reuses its id;
//!   under the same subject it also reuses the version (no new version is created).
//! - Two schema texts are "the same" when their JSON is equal after dropping whitespace and
//!   ordering object keys. (Confluent compares Avro's full string form, which also ignores
//!   formatting; unlike Avro's Parsing Canonical Form this keeps `logicalType`, defaults and
//!   custom properties, so a schema that only adds a logical type gets a new id, as it must.)
//! - Only AVRO schemas without references are accepted. Compatibility is reported as BACKWARD
//!   but not enforced.
//!
//! # Durability
//!
//! Every new (subject, version, id, schema) is one line appended to `schemas.jsonl` in the data
//! directory and `fsync`ed before the HTTP answer, so an id a producer has used is never handed
//! out again after a crash. On start the log is replayed; a torn last line (crash mid-write) is
//! cut off, any other damage is an error.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::RegistryError;

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
const LOG_FILE: &str = "schemas.jsonl";

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
struct LogEntry {
    subject: String,
    version: u32,
    id: u32,
    schema: String,
}

#[derive(Debug)]
struct Store {
    path: PathBuf,
    file: File,
    /// Bytes of complete lines in the file; a failed append is cut back to this.
    len: u64,
    /// Schema text by id - 1, as first registered.
    schemas: Vec<Arc<str>>,
    ids_by_normal_form: HashMap<String, u32>,
    /// Ids of each subject's versions, version - 1 as index.
    subjects: BTreeMap<String, Vec<u32>>,
}

/// Outcome of a registration.
#[derive(Debug, PartialEq, Eq)]
struct Registered {
    id: u32,
    version: u32,
    created: bool,
}

impl Store {
    fn open(dir: &FsPath) -> Result<Store, RegistryError> {
        let io = |path: &FsPath| {
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
            match serde_json::from_slice::<LogEntry>(&line) {
                Ok(entry) => store.apply(entry).map_err(corrupt)?,
                // Each line is written with one write and fsynced before the answer, so a torn
                // last line was never acknowledged to anyone: safe to drop.
                Err(_) if lines.peek().is_none() => {
                    tracing::warn!(path = %path.display(), line = i + 1, "cutting torn last line of schema log");
                    break;
                }
                Err(e) => return Err(corrupt(e.to_string())),
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

    /// Applies a replayed log entry, checking it continues the ids and versions seen so far.
    fn apply(&mut self, e: LogEntry) -> Result<(), String> {
        let next_id = self.schemas.len() as u32 + 1;
        if e.id == next_id {
            self.ids_by_normal_form
                .insert(normal_form(&e.schema)?, e.id);
            self.schemas.push(e.schema.into());
        } else if e.id == 0 || e.id > next_id {
            return Err(format!("schema id {} skips ahead of {next_id}", e.id));
        }
        let versions = self.subjects.entry(e.subject).or_default();
        if e.version as usize != versions.len() + 1 {
            return Err(format!(
                "version {} does not follow {}",
                e.version,
                versions.len()
            ));
        }
        versions.push(e.id);
        Ok(())
    }

    fn register(&mut self, subject: &str, schema: &str) -> Result<Registered, ApiError> {
        apache_avro::Schema::parse_str(schema).map_err(|e| ApiError::invalid_schema(&e))?;
        let normal = normal_form(schema).map_err(|e| ApiError::invalid_schema(&e))?;
        let known = self.ids_by_normal_form.get(&normal).copied();
        let versions = self.subjects.get(subject).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(id) = known
            && let Some(v) = versions.iter().position(|&x| x == id)
        {
            return Ok(Registered {
                id,
                version: v as u32 + 1,
                created: false,
            });
        }
        let id = known.unwrap_or(self.schemas.len() as u32 + 1);
        let version = versions.len() as u32 + 1;
        let entry = LogEntry {
            subject: subject.to_owned(),
            version,
            id,
            schema: schema.to_owned(),
        };
        self.append(&entry).map_err(ApiError::storage)?;
        if known.is_none() {
            self.schemas.push(entry.schema.into());
            self.ids_by_normal_form.insert(normal, id);
        }
        self.subjects.entry(entry.subject).or_default().push(id);
        Ok(Registered {
            id,
            version,
            created: true,
        })
    }

    /// Appends one line and makes it durable; on failure the file is cut back so the log never
    /// keeps a half-written line in the middle.
    fn append(&mut self, entry: &LogEntry) -> Result<(), RegistryError> {
        let mut line = serde_json::to_vec(entry).map_err(|e| RegistryError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let result = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            let _ = self.file.set_len(self.len);
            return Err(RegistryError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += line.len() as u64;
        Ok(())
    }

    fn lookup(&self, subject: &str, schema: &str) -> Result<(u32, u32), ApiError> {
        let versions = self
            .subjects
            .get(subject)
            .ok_or_else(|| ApiError::subject_not_found(subject))?;
        let normal = normal_form(schema).map_err(|e| ApiError::invalid_schema(&e))?;
        self.ids_by_normal_form
            .get(&normal)
            .and_then(|id| {
                versions
                    .iter()
                    .position(|v| v == id)
                    .map(|i| (*id, i as u32 + 1))
            })
            .ok_or_else(ApiError::schema_not_found)
    }

    fn schema(&self, id: u32) -> Option<&Arc<str>> {
        (id as usize)
            .checked_sub(1)
            .and_then(|i| self.schemas.get(i))
    }
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

/// An error answer in Confluent's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn subject_not_found(subject: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: 40401,
            message: format!("Subject '{subject}' not found."),
        }
    }
    fn version_not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: 40402,
            message: "Version not found.".into(),
        }
    }
    fn schema_not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: 40403,
            message: "Schema not found".into(),
        }
    }
    fn invalid_schema(reason: &dyn std::fmt::Display) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: 42201,
            message: format!("Invalid schema: {reason}"),
        }
    }
    fn invalid_version(v: &str) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: 42202,
            message: format!(
                "The specified version '{v}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ),
        }
    }
    fn bad_request(reason: &dyn std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: 400,
            message: format!("Bad request: {reason}"),
        }
    }
    fn storage(e: RegistryError) -> Self {
        tracing::error!(error = %e, "schema registry could not store a schema");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: 50001,
            message: "Error in the backend data store".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(
            self.status,
            json!({ "error_code": self.code, "message": self.message }),
        )
    }
}

fn reply(status: StatusCode, body: Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        body.to_string(),
    )
        .into_response()
}

type Shared = Arc<Mutex<Store>>;

fn lock(store: &Shared) -> MutexGuard<'_, Store> {
    // Store updates memory only after the log write succeeded, so a panic elsewhere cannot leave
    // it half-changed: a poisoned lock is safe to keep using.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Json>,
}

fn parse_body(body: &[u8]) -> Result<SchemaBody, ApiError> {
    let body: SchemaBody = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(&e))?;
    if let Some(t) = body.schema_type.as_deref()
        && !t.eq_ignore_ascii_case("AVRO")
    {
        return Err(ApiError::invalid_schema(&format_args!(
            "schema type {t} is not supported, only AVRO"
        )));
    }
    if !body.references.is_empty() {
        return Err(ApiError::invalid_schema(
            &"schema references are not supported",
        ));
    }
    Ok(body)
}

async fn register(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let task_store = store.clone();
    let task_subject = subject.clone();
    // The write fsyncs: keep it off the async workers.
    let registered = tokio::task::spawn_blocking(move || {
        lock(&task_store).register(&task_subject, &body.schema)
    })
    .await
    .map_err(|e| ApiError::storage(RegistryError::Serve(std::io::Error::other(e))))??;
    if registered.created {
        tracing::info!(subject = %subject, id = registered.id, version = registered.version, "registered schema");
    }
    Ok(reply(StatusCode::OK, json!({ "id": registered.id })))
}

async fn lookup(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let store = lock(&store);
    let (id, version) = store.lookup(&subject, &body.schema)?;
    let schema = store
        .schema(id)
        .cloned()
        .ok_or_else(ApiError::schema_not_found)?;
    Ok(reply(
        StatusCode::OK,
        json!({ "subject": subject, "id": id, "version": version, "schema": &*schema }),
    ))
}

async fn schema_by_id(
    State(store): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u32 = id.parse().map_err(|_| ApiError::schema_not_found())?;
    let schema = lock(&store)
        .schema(id)
        .cloned()
        .ok_or_else(ApiError::schema_not_found)?;
    Ok(reply(StatusCode::OK, json!({ "schema": &*schema })))
}

async fn subjects(State(store): State<Shared>) -> Response {
    let names: Vec<String> = lock(&store).subjects.keys().cloned().collect();
    reply(StatusCode::OK, json!(names))
}

async fn versions(
    State(store): State<Shared>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let store = lock(&store);
    let versions = store
        .subjects
        .get(&subject)
        .ok_or_else(|| ApiError::subject_not_found(&subject))?;
    let numbers: Vec<u32> = (1..=versions.len() as u32).collect();
    Ok(reply(StatusCode::OK, json!(numbers)))
}

/// `(id, version, schema)` of `subject` at `version` (`latest`, `-1`, or a number).
fn find_version(
    store: &Store,
    subject: &str,
    version: &str,
) -> Result<(u32, u32, Arc<str>), ApiError> {
    let versions = store
        .subjects
        .get(subject)
        .ok_or_else(|| ApiError::subject_not_found(subject))?;
    let n: u32 = match version {
        "latest" | "-1" => versions.len() as u32,
        v => v
            .parse()
            .ok()
            .filter(|&n| n >= 1 && n <= i32::MAX as u32)
            .ok_or_else(|| ApiError::invalid_version(v))?,
    };
    let id = *n
        .checked_sub(1)
        .and_then(|i| versions.get(i as usize))
        .ok_or_else(ApiError::version_not_found)?;
    let schema = store
        .schema(id)
        .cloned()
        .ok_or_else(ApiError::schema_not_found)?;
    Ok((id, n, schema))
}

async fn version(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (id, n, schema) = find_version(&lock(&store), &subject, &version)?;
    Ok(reply(
        StatusCode::OK,
        json!({ "subject": subject, "id": id, "version": n, "schema": &*schema }),
    ))
}

async fn version_schema(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (_, _, schema) = find_version(&lock(&store), &subject, &version)?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        schema.to_string(),
    )
        .into_response())
}

async fn config() -> Response {
    reply(StatusCode::OK, json!({ "compatibilityLevel": "BACKWARD" }))
}

/// The registry: its durable store and HTTP routes.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    store: Shared,
}

impl RegistryServer {
    /// Opens (or creates) the store in `data_dir` and replays its log.
    pub fn open(data_dir: impl AsRef<FsPath>) -> Result<RegistryServer, RegistryError> {
        Ok(RegistryServer {
            store: Arc::new(Mutex::new(Store::open(data_dir.as_ref())?)),
        })
    }

    /// The HTTP routes, to serve or to nest into another router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions", get(versions).post(register))
            .route("/subjects/{subject}/versions/{version}", get(version))
            .route(
                "/subjects/{subject}/versions/{version}/schema",
                get(version_schema),
            )
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/config", get(config))
            .with_state(self.store.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RegistryError> {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "schema registry listening");
        }
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(RegistryError::Serve)
    }

    /// Serves on `listener` in a background task; stop it with [`RunningRegistry::stop`].
    pub fn spawn(self, listener: TcpListener) -> Result<RunningRegistry, RegistryError> {
        let addr = listener.local_addr().map_err(RegistryError::Serve)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listener, async move {
            let _ = stopped.await;
        }));
        Ok(RunningRegistry { addr, stop, task })
    }
}

/// Opens the store in `data_dir` and serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    data_dir: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RegistryError> {
    RegistryServer::open(data_dir)?
        .serve(listener, shutdown)
        .await
}

/// A registry serving in a background task.
#[derive(Debug)]
pub struct RunningRegistry {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), RegistryError>>,
}

impl RunningRegistry {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for clients, e.g. `http://127.0.0.1:8081`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, and waits for the server task.
    pub async fn stop(self) -> Result<(), RegistryError> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| RegistryError::Serve(std::io::Error::other(e)))?
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

    #[test]
    fn ids_are_global_and_formatting_does_not_matter() {
        let dir = temp_dir("ids");
        let mut s = Store::open(&dir).unwrap();
        assert_eq!(
            s.register("t-value", A).unwrap(),
            Registered {
                id: 1,
                version: 1,
                created: true
            }
        );
        assert_eq!(
            s.register("t-value", A_REFORMATTED).unwrap(),
            Registered {
                id: 1,
                version: 1,
                created: false
            }
        );
        assert_eq!(
            s.register("u-value", A).unwrap(),
            Registered {
                id: 1,
                version: 1,
                created: true
            }
        );
        // Adding a logical type is a different schema (Parsing Canonical Form would say equal).
        assert_eq!(
            s.register("t-value", B).unwrap(),
            Registered {
                id: 2,
                version: 2,
                created: true
            }
        );
        let err = s
            .register("t-value", r#"{"type":"record","name":"A"}"#)
            .unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::UNPROCESSABLE_ENTITY, 42201)
        );
        drop(s);

        let s = Store::open(&dir).unwrap();
        assert_eq!(s.subjects["t-value"], vec![1, 2]);
        assert_eq!(s.subjects["u-value"], vec![1]);
        assert_eq!(s.lookup("t-value", A_REFORMATTED).unwrap(), (1, 1));
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
        torn.extend_from_slice(br#"{"subject":"t-val"#);
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
}
