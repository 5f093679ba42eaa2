//! A Confluent-compatible schema registry server: the REST API that serializers,
//! deserializers and tools use, for local runs, tests and demos where no registry is available.
//!
//! The rules and the durable log live in [`super::store`]; compatibility in [`super::compat`].
//! This module maps Confluent's routes, query flags and bodies onto them:
//!
//! ```text
//! GET    /                                          {}
//! GET    /subjects                    ?deleted      names
//! POST   /subjects/{s}                ?deleted      look a schema up in a subject
//! DELETE /subjects/{s}                ?permanent    versions deleted
//! GET    /subjects/{s}/versions       ?deleted      version numbers
//! POST   /subjects/{s}/versions                     register → {"id"}
//! GET    /subjects/{s}/versions/{v}   ?deleted      {subject, id, version, schema}
//! DELETE /subjects/{s}/versions/{v}   ?permanent    the version deleted
//! GET    /subjects/{s}/versions/{v}/schema          the schema text
//! GET    /subjects/{s}/versions/{v}/referencedby    [] (no references)
//! GET    /schemas/ids/{id}                          {schema}, also after deletes
//! GET    /schemas/ids/{id}/schema                   the schema text
//! GET    /schemas/ids/{id}/versions   ?deleted      [{subject, version}]
//! GET    /schemas/ids/{id}/subjects   ?deleted      subject names
//! GET    /schemas/types                             ["AVRO"]
//! POST   /compatibility/subjects/{s}/versions[/{v}] ?verbose  {is_compatible[, messages]}
//! GET|PUT|DELETE /config[/{s}]        ?defaultToGlobal
//! GET    /mode[/{s}]                                {"mode":"READWRITE"}
//! ```
//!
//! Writes fsync, so they run on the blocking pool; reads take the lock briefly.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::RegistryError;
use super::compat::CompatibilityLevel;
use super::store::{ApiError, Store, parse_schema, parse_version};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

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

fn ok(body: Json) -> Result<Response, ApiError> {
    Ok(reply(StatusCode::OK, body))
}

type Shared = Arc<Mutex<Store>>;

fn lock(store: &Shared) -> MutexGuard<'_, Store> {
    // Store updates memory only after the log write succeeded, so a panic elsewhere cannot leave
    // it half-changed: a poisoned lock is safe to keep using.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a write (it fsyncs) on the blocking pool.
async fn write<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&mut Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&store)))
        .await
        .map_err(|e| ApiError::storage(RegistryError::Serve(std::io::Error::other(e))))?
}

type Flags = Query<HashMap<String, String>>;

/// A boolean query flag: `?deleted=true` (any case; Python's client sends `True`).
fn flag(q: &Flags, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Option<Vec<Json>>,
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
    if body.references.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::invalid_schema(
            &"schema references are not supported",
        ));
    }
    Ok(body)
}

async fn root() -> Response {
    reply(StatusCode::OK, json!({}))
}

async fn not_found() -> ApiError {
    ApiError::not_found_route()
}

async fn subjects(State(store): State<Shared>, q: Flags) -> Result<Response, ApiError> {
    ok(json!(lock(&store).subject_names(flag(&q, "deleted"))))
}

async fn register(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let task_subject = subject.clone();
    let registered = write(&store, move |s| s.register(&task_subject, &body.schema)).await?;
    if registered.created {
        tracing::info!(subject = %subject, id = registered.id, version = registered.version, "registered schema");
    }
    ok(json!({ "id": registered.id }))
}

async fn lookup(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let found = lock(&store).lookup(&subject, &body.schema, flag(&q, "deleted"))?;
    ok(json!({
        "subject": subject, "id": found.id, "version": found.version, "schema": &*found.schema,
    }))
}

async fn delete_subject(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, ApiError> {
    let permanent = flag(&q, "permanent");
    let task_subject = subject.clone();
    let deleted = write(&store, move |s| s.delete(&task_subject, None, permanent)).await?;
    tracing::info!(subject = %subject, permanent, versions = ?deleted, "deleted subject");
    ok(json!(deleted))
}

async fn versions(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, ApiError> {
    let versions = lock(&store).versions(&subject, flag(&q, "deleted"));
    if versions.is_empty() {
        return Err(ApiError::subject_not_found(&subject));
    }
    ok(json!(versions.iter().map(|(v, _)| *v).collect::<Vec<_>>()))
}

async fn version(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
) -> Result<Response, ApiError> {
    let found = lock(&store).find_version(&subject, &version, flag(&q, "deleted"))?;
    ok(json!({
        "subject": subject, "id": found.id, "version": found.version, "schema": &*found.schema,
    }))
}

async fn delete_version(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
) -> Result<Response, ApiError> {
    let permanent = flag(&q, "permanent");
    let task_subject = subject.clone();
    let deleted = write(&store, move |s| {
        let n = s.resolve_for_delete(&task_subject, &version, permanent)?;
        s.delete(&task_subject, Some(n), permanent)
    })
    .await?;
    tracing::info!(subject = %subject, permanent, version = ?deleted, "deleted subject version");
    ok(json!(deleted.first()))
}

fn raw(schema: &str) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        schema.to_owned(),
    )
        .into_response()
}

async fn version_schema(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
) -> Result<Response, ApiError> {
    let found = lock(&store).find_version(&subject, &version, flag(&q, "deleted"))?;
    Ok(raw(&found.schema))
}

async fn referenced_by(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    // References are not supported, so nothing refers to anything; still answer 404s as
    // Confluent does for a missing subject or version.
    lock(&store).find_version(&subject, &version, false)?;
    ok(json!([]))
}

fn schema_id(store: &Store, id: &str) -> Result<(u32, Arc<str>), ApiError> {
    id.parse::<u32>()
        .ok()
        .and_then(|n| store.schema(n).map(|s| (n, s.clone())))
        .ok_or_else(|| ApiError::schema_id_not_found(id))
}

async fn schema_by_id(
    State(store): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (_, schema) = schema_id(&lock(&store), &id)?;
    ok(json!({ "schema": &*schema }))
}

async fn schema_text_by_id(
    State(store): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (_, schema) = schema_id(&lock(&store), &id)?;
    Ok(raw(&schema))
}

async fn schema_versions(
    State(store): State<Shared>,
    Path(id): Path<String>,
    q: Flags,
) -> Result<Response, ApiError> {
    let store = lock(&store);
    let (id, _) = schema_id(&store, &id)?;
    let uses: Vec<Json> = store
        .uses_of(id, flag(&q, "deleted"))
        .into_iter()
        .map(|(subject, version)| json!({ "subject": subject, "version": version }))
        .collect();
    ok(json!(uses))
}

async fn schema_subjects(
    State(store): State<Shared>,
    Path(id): Path<String>,
    q: Flags,
) -> Result<Response, ApiError> {
    let store = lock(&store);
    let (id, _) = schema_id(&store, &id)?;
    let mut subjects: Vec<String> = store
        .uses_of(id, flag(&q, "deleted"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    subjects.dedup();
    ok(json!(subjects))
}

async fn schema_types() -> Response {
    reply(StatusCode::OK, json!(["AVRO"]))
}

fn compatibility_answer(messages: Vec<String>, verbose: bool) -> Result<Response, ApiError> {
    let mut body = json!({ "is_compatible": messages.is_empty() });
    if verbose {
        body["messages"] = json!(messages);
    }
    ok(body)
}

async fn compatibility_with_version(
    State(store): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    parse_version(&version)?;
    let candidate = parse_schema(&body.schema)?;
    let store = lock(&store);
    let found = store.find_version(&subject, &version, false)?;
    let level = store.level(&subject);
    let messages = store.incompatibilities(level, &candidate, &[(found.version, found.id)])?;
    compatibility_answer(messages, flag(&q, "verbose"))
}

async fn compatibility_with_all(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let candidate = parse_schema(&body.schema)?;
    let store = lock(&store);
    let level = store.level(&subject);
    let live = store.versions(&subject, false);
    // As a registration would check: the latest, or every live version when transitive. A
    // subject without versions accepts anything.
    let against = if level.is_transitive() {
        &live[..]
    } else {
        &live[live.len().saturating_sub(1)..]
    };
    let messages = store.incompatibilities(level, &candidate, against)?;
    compatibility_answer(messages, flag(&q, "verbose"))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: Option<String>,
}

fn parse_level(body: &[u8]) -> Result<CompatibilityLevel, ApiError> {
    let body: ConfigBody = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(&e))?;
    body.compatibility
        .as_deref()
        .and_then(CompatibilityLevel::parse)
        .ok_or_else(ApiError::invalid_level)
}

fn level_answer(level: CompatibilityLevel) -> Result<Response, ApiError> {
    ok(json!({ "compatibilityLevel": level.as_str() }))
}

async fn get_global_config(State(store): State<Shared>) -> Result<Response, ApiError> {
    level_answer(lock(&store).global_level())
}

async fn put_global_config(State(store): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    write(&store, move |s| s.set_level(None, Some(level))).await?;
    tracing::info!(level = %level, "set global compatibility level");
    ok(json!({ "compatibility": level.as_str() }))
}

async fn delete_global_config(State(store): State<Shared>) -> Result<Response, ApiError> {
    let before = write(&store, |s| {
        let before = s.global_level();
        s.set_level(None, None)?;
        Ok(before)
    })
    .await?;
    level_answer(before)
}

async fn get_subject_config(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, ApiError> {
    let store = lock(&store);
    match store.subject_level(&subject) {
        Some(level) => level_answer(level),
        None if flag(&q, "defaultToGlobal") => level_answer(store.global_level()),
        None => Err(ApiError::subject_level_not_configured(&subject)),
    }
}

async fn put_subject_config(
    State(store): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let level = parse_level(&body)?;
    let task_subject = subject.clone();
    write(&store, move |s| {
        s.set_level(Some(&task_subject), Some(level))
    })
    .await?;
    tracing::info!(subject = %subject, level = %level, "set subject compatibility level");
    ok(json!({ "compatibility": level.as_str() }))
}

async fn delete_subject_config(
    State(store): State<Shared>,
    Path(subject): Path<String>,
) -> Result<Response, ApiError> {
    let before = write(&store, move |s| {
        let Some(before) = s.subject_level(&subject) else {
            return Err(if s.versions(&subject, true).is_empty() {
                ApiError::subject_not_found(&subject)
            } else {
                ApiError::subject_level_not_configured(&subject)
            });
        };
        s.set_level(Some(&subject), None)?;
        Ok(before)
    })
    .await?;
    level_answer(before)
}

async fn mode() -> Response {
    // Always read-write: there is no import mode.
    reply(StatusCode::OK, json!({ "mode": "READWRITE" }))
}

/// The registry: its durable store and HTTP routes.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    store: Shared,
    /// `Authorization` header value the write endpoints require (HTTP basic), if any.
    write_auth: Option<Arc<str>>,
}

impl RegistryServer {
    /// Opens (or creates) the store in `data_dir` and replays its log.
    pub fn open(data_dir: impl AsRef<FsPath>) -> Result<RegistryServer, RegistryError> {
        Ok(RegistryServer {
            store: Arc::new(Mutex::new(Store::open(data_dir.as_ref())?)),
            write_auth: None,
        })
    }

    /// Requires HTTP basic authentication with `user` and `password` for every request that
    /// changes the registry (POST, PUT, DELETE); reads stay open, as serializers and
    /// deserializers of every team need them. Compatibility checks are POSTs but change
    /// nothing, so they stay open too.
    pub fn with_write_auth(mut self, user: &str, password: &str) -> RegistryServer {
        self.write_auth = Some(basic_auth(user, password).into());
        self
    }

    /// The HTTP routes, to serve or to nest into another router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}", post(lookup).delete(delete_subject))
            .route("/subjects/{subject}/versions", get(versions).post(register))
            .route(
                "/subjects/{subject}/versions/{version}",
                get(version).delete(delete_version),
            )
            .route(
                "/subjects/{subject}/versions/{version}/schema",
                get(version_schema),
            )
            .route(
                "/subjects/{subject}/versions/{version}/referencedby",
                get(referenced_by),
            )
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/schemas/ids/{id}/schema", get(schema_text_by_id))
            .route("/schemas/ids/{id}/versions", get(schema_versions))
            .route("/schemas/ids/{id}/subjects", get(schema_subjects))
            .route("/schemas/types", get(schema_types))
            .route(
                "/compatibility/subjects/{subject}/versions",
                post(compatibility_with_all),
            )
            .route(
                "/compatibility/subjects/{subject}/versions/{version}",
                post(compatibility_with_version),
            )
            .route(
                "/config",
                get(get_global_config)
                    .put(put_global_config)
                    .delete(delete_global_config),
            )
            .route(
                "/config/{subject}",
                get(get_subject_config)
                    .put(put_subject_config)
                    .delete(delete_subject_config),
            )
            .route("/mode", get(mode))
            .route("/mode/{subject}", get(mode))
            .fallback(not_found)
            .method_not_allowed_fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(
                self.write_auth.clone(),
                require_write_auth,
            ))
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

/// Lets reads through, and writes only with the configured credentials (see
/// [`RegistryServer::with_write_auth`]).
async fn require_write_auth(
    State(expected): State<Option<Arc<str>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(expected) = expected else {
        return next.run(request).await;
    };
    let method = request.method();
    let read = method == axum::http::Method::GET
        || method == axum::http::Method::HEAD
        || request.uri().path().starts_with("/compatibility/");
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if read || given == Some(&*expected) {
        return next.run(request).await;
    }
    let mut response = reply(
        StatusCode::UNAUTHORIZED,
        json!({
            "error_code": 40101,
            "message": "this registry requires HTTP basic authentication for writes; put the user and password in the client's registry URL (http://user:password@host:port)"
        }),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"walbridge-registry\""),
    );
    response
}

/// The `Authorization` header value of HTTP basic authentication.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (RFC 4648), for the basic-auth header.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
