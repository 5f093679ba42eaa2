//! The analysts' SQL endpoint: the live views over the Postgres wire protocol.
//!
//! `psql`, psycopg, JDBC and BI tools connect as to a Postgres server; DataFusion plans and runs
//! the queries (datafusion-postgres speaks the protocol, simple and extended). Every view of the
//! [`Catalog`] is a table of the `public` schema, looked up when a query is planned, so views a
//! processor registers later appear without a restart.
//!
//! Consistency: a scan takes the view's current [`Snapshot`](crate::view::Snapshot) (an `Arc`)
//! once, when the query is planned, and reads only that; a publish that lands meanwhile swaps the
//! catalog's pointer and leaves the running query's snapshot alone. So one query sees one epoch of
//! each view it reads. (A query that reads the *same* view twice, e.g. a self-join, takes two
//! snapshots, which may be one epoch apart.)
//!
//! Read-only: every statement that is not a query, `EXPLAIN`, `SET`/`SHOW`, a cursor or a
//! transaction statement is refused before planning with SQLSTATE 25006
//! (`read_only_sql_transaction`), also `COPY` (DataFusion's `COPY … TO` would write files on
//! this machine) and `SELECT … INTO`. The schema provider refuses to register tables as well.
//!
//! Authentication: SCRAM-SHA-256 with the one configured user, so the password never crosses the
//! wire. The password is hashed once at start and never logged. With a certificate configured
//! ([`SqlTls`]) the endpoint speaks TLS and refuses clients that do not ask for it (SQLSTATE
//! 28000), so query results never cross the network in the clear either.
//!
//! Cancel: a client's cancel request (psql's Ctrl-C, psycopg's `cancel()`, JDBC's
//! `Statement.cancel`) names the connection by the process id and secret key sent at login.
//! It ends the query running on that connection with SQLSTATE 57014 (`query_canceled`),
//! whether the query is still being planned or already streaming rows (DataFusion computes as
//! rows are pulled, so the row stream is where a long query spends its time). The connection
//! stays usable. A cancel with an unknown key, or for an idle connection, does nothing, as in
//! Postgres.
//!
//! Connections beyond [`SqlOptions::max_connections`] are refused at startup with SQLSTATE 53300
//! (`too_many_connections`), as Postgres does, instead of piling up: every connection holds a
//! DataFusion session.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::SchemaProvider;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::{DataFusionError, ParamValues};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::{
    BinaryExpr, Expr, LogicalPlan, Operator, TableProviderFilterPushDown,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Statement};
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::sasl::SASLAuthStartupHandler;
use datafusion_postgres::pgwire::api::auth::sasl::scram::{
    ScramAuth, gen_salted_password, random_nonce,
};
use datafusion_postgres::pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use datafusion_postgres::pgwire::api::cancel::CancelHandler;
use datafusion_postgres::pgwire::api::portal::Portal;
use datafusion_postgres::pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::cancel::CancelRequest;
use datafusion_postgres::{DfSessionService, QueryHook};
use futures_util::StreamExt;
use std::collections::HashMap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::view::{Catalog, ViewDef};

/// PBKDF2 rounds of the SCRAM hash (RFC 7677's minimum; the work is done by the client).
const SCRAM_ITERATIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "sql: cannot listen on {addr}: {source}; pick a free address for sql.listen (port 0 picks one)"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("sql: {0}")]
    Config(String),
    #[error("sql: cannot set up the query engine: {0}")]
    Engine(#[from] DataFusionError),
    #[error("sql: TLS: {what} {path}: {reason}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// The endpoint's certificate chain and private key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Connections served at once when nothing else is configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Where to listen and who may connect.
#[derive(Clone)]
pub struct SqlOptions {
    /// `host:port`; port 0 picks a free port (see [`ServerHandle::local_addr`]).
    pub listen: String,
    pub user: String,
    pub password: String,
    /// TLS, required of every client when set.
    pub tls: Option<SqlTls>,
    /// Connections beyond this are refused with SQLSTATE 53300.
    pub max_connections: usize,
}

impl fmt::Debug for SqlOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlOptions")
            .field("listen", &self.listen)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("tls", &self.tls)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// A running endpoint. Dropping it (or [`ServerHandle::shutdown`]) stops accepting connections
/// and closes the open ones.
pub struct ServerHandle {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl ServerHandle {
    /// The address actually bound (the port chosen when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(self) {}
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.accept.abort();
    }
}

/// Starts serving `catalog` on `opts.listen`. Returns once the socket is bound.
pub async fn serve(catalog: Arc<Catalog>, opts: SqlOptions) -> Result<ServerHandle, SqlError> {
    if opts.user.is_empty() {
        return Err(SqlError::Config(
            "sql.user is empty; set the user analysts log in as".into(),
        ));
    }
    if opts.password.is_empty() {
        return Err(SqlError::Config(
            "sql.password is empty; the endpoint always requires a password".into(),
        ));
    }
    let ctx = Arc::new(session_context(catalog)?);
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        // First, so nothing else sees a statement that writes.
        Arc::new(ReadOnlyHook),
        Arc::new(CursorStatementHook),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    let salt = random_nonce().into_bytes();
    let login = Arc::new(Login {
        user: opts.user.clone(),
        salt: salt.clone(),
        salted: gen_salted_password(&opts.password, &salt, SCRAM_ITERATIONS),
    });
    let tls = opts.tls.as_ref().map(tls_acceptor).transpose()?;
    let handlers = Handlers {
        session: Arc::new(Cancelable(Arc::new(DfSessionService::new_with_hooks(
            ctx, hooks,
        )))),
        cancels: Arc::new(Cancels::default()),
        login,
        require_tls: tls.is_some(),
        refuse: None,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections.max(1)));
    let max = opts.max_connections.max(1);

    let listener = TcpListener::bind(&opts.listen)
        .await
        .map_err(|source| SqlError::Bind {
            addr: opts.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| SqlError::Bind {
        addr: opts.listen.clone(),
        source,
    })?;
    tracing::info!(listen = %addr, user = %opts.user, "sql endpoint listening");
    let accept = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let permit = slots.clone().try_acquire_owned().ok();
                        let mut handlers = handlers.clone();
                        if permit.is_none() {
                            tracing::warn!(peer = %peer, max_connections = max, "sql connection refused: too many connections");
                            handlers.refuse = Some(format!(
                                "sorry, too many clients already: this endpoint serves {max} connections at once (processors.sql.max_connections)"
                            ));
                        }
                        let tls = tls.clone();
                        connections.spawn(async move {
                            let _permit = permit;
                            if let Err(e) =
                                datafusion_postgres::pgwire::tokio::process_socket(socket, tls, Arc::new(handlers)).await
                            {
                                tracing::debug!(peer = %peer, error = %e, "sql connection ended with an error");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "sql endpoint cannot accept a connection"),
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok(ServerHandle { addr, accept })
}

fn session_context(catalog: Arc<Catalog>) -> Result<SessionContext, SqlError> {
    // One partition per query plan: a view is one in-memory partition of at most some
    // hundred thousand rows, so spreading a query over the cores buys little, while planning
    // the repartitioning costs most of a point lookup's time (p50 1.7 → 1.0 ms measured for
    // the views bench's probe query on 40,000 rows, idle machine). Concurrent clients still
    // use every core.
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(1)
        .with_default_catalog_and_schema("walbridge", "public");
    let ctx = SessionContext::new_with_config(config);
    let cat = ctx.catalog("walbridge").ok_or_else(|| {
        SqlError::Config("the query engine has no default catalog (a bug)".into())
    })?;
    cat.register_schema("public", Arc::new(ViewSchema { catalog }))?;
    // Clients such as psql's \d and BI tools read pg_catalog; datafusion-postgres emulates it.
    datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog(
        &ctx,
        "walbridge",
        datafusion_postgres::auth::AuthManager::new(),
    )
    .map_err(|e| SqlError::Engine(*e))?;
    Ok(ctx)
}

/// The `public` schema: one table per view of the catalog, looked up at planning time.
#[derive(Debug)]
struct ViewSchema {
    catalog: Arc<Catalog>,
}

#[async_trait]
impl SchemaProvider for ViewSchema {
    fn table_names(&self) -> Vec<String> {
        self.catalog.views().into_iter().map(|d| d.name).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self
            .catalog
            .views()
            .into_iter()
            .find(|d| d.name == name)
            .map(|def| {
                Arc::new(ViewTable {
                    catalog: self.catalog.clone(),
                    def,
                }) as Arc<dyn TableProvider>
            }))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalog.views().iter().any(|d| d.name == name)
    }
}

/// One view; each scan reads the snapshot that is current when the scan is planned.
#[derive(Debug)]
struct ViewTable {
    catalog: Arc<Catalog>,
    def: ViewDef,
}

#[async_trait]
impl TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.def.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    /// `column = literal` narrows what the scan reads (see [`point_condition`]); the query
    /// applies every filter itself all the same.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>, DataFusionError> {
        Ok(filters
            .iter()
            .map(|f| match point_condition(&self.def.schema, f) {
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let snapshots = self.catalog.snapshots(&self.def.name);
        // Partial views of several shards are combined into the view's own rows, which a
        // condition on a partial row cannot narrow.
        let merge = self.def.merge.filter(|_| snapshots.len() > 1);
        let equal: Vec<_> = match merge {
            Some(_) => Vec::new(),
            None => filters
                .iter()
                .filter_map(|f| point_condition(&self.def.schema, f))
                .collect(),
        };
        let mut batches = Vec::new();
        for s in &snapshots {
            // Building the chunks that changed since the last reader happens here, once. A
            // point lookup leaves them to the next reader: it reads only the matching rows of
            // changed chunks, and only matching rows at all when it names the first key column
            // (the chunks' index).
            match equal.is_empty() {
                true => batches.extend(s.rows.batches()?),
                false => batches.extend(s.rows.batches_where(&equal)?),
            }
        }
        if let Some(merge) = merge {
            batches = vec![merge(&batches)?];
        }
        let plan = MemorySourceConfig::try_new_exec(
            &[batches],
            self.def.schema.clone(),
            projection.cloned(),
        )?;
        Ok(plan)
    }
}

/// A filter `column = literal` (either way round) on a text or bigint column of `schema`, as the
/// column's index and the cell a matching row holds there. Anything else (another operator,
/// a cast, a NULL, another type) is None: the scan reads every row for it.
fn point_condition(schema: &SchemaRef, filter: &Expr) -> Option<(usize, crate::table::Cell)> {
    use crate::table::Cell;
    use datafusion::arrow::datatypes::DataType;
    let Expr::BinaryExpr(BinaryExpr {
        left,
        op: Operator::Eq,
        right,
    }) = filter
    else {
        return None;
    };
    let (column, value) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => (c, v),
        _ => return None,
    };
    let i = schema.index_of(&column.name).ok()?;
    let cell = match (schema.field(i).data_type(), value) {
        (
            DataType::Utf8,
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
        ) => Cell::text(s),
        (DataType::Int64, ScalarValue::Int64(Some(v))) => Cell::Int(*v),
        _ => return None,
    };
    Some((i, cell))
}

/// The one login: user name and the SCRAM-salted password.
#[derive(Debug)]
struct Login {
    user: String,
    salt: Vec<u8>,
    salted: Vec<u8>,
}

#[async_trait]
impl AuthSource for Login {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        match login.user() {
            Some(user) if user == self.user => {
                Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
            }
            other => {
                let user = other.unwrap_or_default().to_owned();
                tracing::info!(user = %user, "sql login refused: unknown user");
                Err(PgWireError::InvalidPassword(user))
            }
        }
    }
}

#[derive(Clone)]
struct Handlers {
    session: Arc<Cancelable>,
    cancels: Arc<Cancels>,
    login: Arc<Login>,
    require_tls: bool,
    /// Set for a connection over the limit: its startup is answered with this (53300).
    refuse: Option<String>,
}

/// Reads the PEM files into a TLS acceptor (rustls on ring, as the rest of walbridge).
fn tls_acceptor(t: &SqlTls) -> Result<tokio_rustls::TlsAcceptor, SqlError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| SqlError::Tls {
            what: "cannot read the certificate",
            path: t.cert.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SqlError::Tls {
            what: "no certificate in",
            path: t.cert.clone(),
            reason: "expected a PEM file with -----BEGIN CERTIFICATE-----".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| SqlError::Tls {
        what: "cannot read the private key",
        path: t.key.clone(),
        reason: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| SqlError::Tls {
        what: "the certificate and key do not make a TLS server",
        path: t.cert.clone(),
        reason: e.to_string(),
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The per-connection checks before authentication: the connection limit, and TLS when the
/// endpoint has a certificate.
struct Guarded<H> {
    inner: H,
    require_tls: bool,
    refuse: Option<String>,
    cancels: Arc<Cancels>,
}

#[async_trait]
impl<H: StartupHandler> StartupHandler for Guarded<H> {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: datafusion_postgres::pgwire::messages::PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo
            + futures_util::Sink<datafusion_postgres::pgwire::messages::PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::Error: fmt::Debug,
        PgWireError: From<
            <C as futures_util::Sink<
                datafusion_postgres::pgwire::messages::PgWireBackendMessage,
            >>::Error,
        >,
    {
        let fatal = |code: &str, message: String| {
            PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".to_owned(),
                code.to_owned(),
                message,
            )))
        };
        if let Some(why) = &self.refuse {
            return Err(fatal("53300", why.clone()));
        }
        if self.require_tls && !client.is_secure() {
            return Err(fatal(
                "28000",
                "this endpoint accepts TLS connections only: connect with sslmode=require, or verify-full with sslrootcert naming its CA".to_owned(),
            ));
        }
        self.inner.on_startup(client, message).await?;
        // The login handler sets the connection's key when the password was accepted.
        let (pid, key) = client.pid_and_secret_key();
        if pid != 0 && client.session_extensions().get::<CancelToken>().is_none() {
            let token = self.cancels.register(pid, key.to_bytes().to_vec());
            client.session_extensions().insert(token);
        }
        Ok(())
    }
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.session.clone()
    }

    // Called once per connection: the SASL handler keeps the exchange's state, so each
    // connection gets its own.
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        let mut params = DefaultServerParameterProvider::default();
        params.default_transaction_read_only = true;
        let mut scram = ScramAuth::new(self.login.clone());
        scram.set_iterations(SCRAM_ITERATIONS);
        Arc::new(Guarded {
            inner: SASLAuthStartupHandler::new(Arc::new(params)).with_scram(scram),
            require_tls: self.require_tls,
            refuse: self.refuse.clone(),
            cancels: self.cancels.clone(),
        })
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancels.clone()
    }
}

/// The logged-in connections by cancel key (pid, secret): each has a counter that a cancel
/// request bumps; a query is canceled when the counter moves while it runs.
/// A connection's process id and secret key, as its cancel requests carry them.
type CancelKey = (i32, Vec<u8>);

#[derive(Default)]
struct Cancels {
    by_key: std::sync::Mutex<HashMap<CancelKey, tokio::sync::watch::Sender<u64>>>,
}

impl Cancels {
    fn register(self: &Arc<Self>, pid: i32, secret: Vec<u8>) -> CancelToken {
        let (tx, rx) = tokio::sync::watch::channel(0);
        let key = (pid, secret);
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        // Keys are random; a clash (one in 2^32) leaves the newer connection uncancelable
        // rather than letting one client cancel another's queries.
        let registered = !map.contains_key(&key);
        if registered {
            map.insert(key.clone(), tx);
        }
        CancelToken {
            rx,
            key: registered.then_some(key),
            cancels: self.clone(),
        }
    }
}

#[async_trait]
impl CancelHandler for Cancels {
    async fn on_cancel_request(&self, req: CancelRequest) {
        let key = (req.pid, req.secret_key.to_bytes().to_vec());
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&key) {
            Some(tx) => {
                tx.send_modify(|n| *n += 1);
                tracing::info!(pid = req.pid, "sql query cancel requested");
            }
            None => tracing::debug!(pid = req.pid, "sql cancel request for no known connection"),
        }
    }
}

/// A connection's end of [`Cancels`], kept in its session; unregisters when the connection ends.
struct CancelToken {
    rx: tokio::sync::watch::Receiver<u64>,
    key: Option<CancelKey>,
    cancels: Arc<Cancels>,
}

impl Drop for CancelToken {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut map = self
                .cancels
                .by_key
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.remove(&key);
        }
    }
}

/// The query handlers with cancel requests honoured (see the module doc).
struct Cancelable(Arc<DfSessionService>);

/// Runs `work` unless the connection's cancel counter moves first; wraps the row streams of
/// its responses the same way.
async fn cancelable<T>(
    token: Option<Arc<CancelToken>>,
    work: impl std::future::Future<Output = PgWireResult<T>>,
    wrap: impl Fn(T, tokio::sync::watch::Receiver<u64>, u64) -> T,
) -> PgWireResult<T> {
    let Some(token) = token else {
        return work.await;
    };
    let mut rx = token.rx.clone();
    let at = *rx.borrow_and_update();
    let mut canceled = rx.clone();
    let done = tokio::select! {
        biased;
        _ = canceled.wait_for(|n| *n != at) => None,
        r = work => Some(r),
    };
    match done {
        None => Err(PgWireError::QueryCanceled),
        Some(r) => r.map(|t| wrap(t, rx, at)),
    }
}

fn cancelable_response(r: Response, rx: tokio::sync::watch::Receiver<u64>, at: u64) -> Response {
    match r {
        Response::Query(mut q) => {
            let data_rows =
                std::mem::replace(q.data_rows(), Box::pin(futures_util::stream::empty()));
            let rows = futures_util::stream::unfold(
                (data_rows, rx, false),
                move |(mut rows, mut rx, ended)| async move {
                    if ended {
                        return None;
                    }
                    let next = tokio::select! {
                        biased;
                        _ = rx.wait_for(|n| *n != at) => None,
                        r = rows.next() => Some(r),
                    };
                    match next {
                        // The error ends the statement; the client gets 57014.
                        None => Some((Err(PgWireError::QueryCanceled), (rows, rx, true))),
                        Some(Some(row)) => Some((row, (rows, rx, false))),
                        Some(None) => None,
                    }
                },
            );
            *q.data_rows() = Box::pin(rows);
            Response::Query(q)
        }
        other => other,
    }
}

#[async_trait]
impl SimpleQueryHandler for Cancelable {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo
            + ClientPortalStore
            + futures_util::Sink<datafusion_postgres::pgwire::messages::PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::PortalStore: PortalStore,
        C::Error: fmt::Debug,
        PgWireError: From<
            <C as futures_util::Sink<
                datafusion_postgres::pgwire::messages::PgWireBackendMessage,
            >>::Error,
        >,
    {
        let token = client.session_extensions().get::<CancelToken>();
        cancelable(
            token,
            SimpleQueryHandler::do_query(self.0.as_ref(), client, query),
            |rs: Vec<Response>, rx, at| {
                rs.into_iter()
                    .map(|r| cancelable_response(r, rx.clone(), at))
                    .collect()
            },
        )
        .await
    }
}

#[async_trait]
impl ExtendedQueryHandler for Cancelable {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.0.query_parser()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo
            + ClientPortalStore
            + futures_util::Sink<datafusion_postgres::pgwire::messages::PgWireBackendMessage>
            + Unpin
            + Send
            + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: fmt::Debug,
        PgWireError: From<
            <C as futures_util::Sink<
                datafusion_postgres::pgwire::messages::PgWireBackendMessage,
            >>::Error,
        >,
    {
        let token = client.session_extensions().get::<CancelToken>();
        cancelable(
            token,
            ExtendedQueryHandler::do_query(self.0.as_ref(), client, portal, max_rows),
            cancelable_response,
        )
        .await
    }
}

/// Refuses every statement that could change something.
struct ReadOnlyHook;

impl ReadOnlyHook {
    fn check(statement: &Statement) -> PgWireResult<()> {
        if is_read_only(statement) {
            return Ok(());
        }
        let verb = statement
            .to_string()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_uppercase();
        Err(PgWireError::UserError(Box::new(ErrorInfo::new(
            "ERROR".to_owned(),
            "25006".to_owned(),
            format!(
                "walbridge's SQL endpoint is read-only: {verb} is not allowed; the views change only \
                 through the stream (query them with SELECT)"
            ),
        ))))
    }
}

fn is_read_only(statement: &Statement) -> bool {
    match statement {
        Statement::Query(q) => query_is_read_only(q),
        Statement::Explain { statement, .. } => is_read_only(statement),
        Statement::ExplainTable { .. }
        | Statement::Set(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Discard { .. }
        | Statement::Deallocate { .. } => true,
        _ => false,
    }
}

fn query_is_read_only(q: &Query) -> bool {
    let ctes_ok = q
        .with
        .as_ref()
        .is_none_or(|w| w.cte_tables.iter().all(|c| query_is_read_only(&c.query)));
    ctes_ok && set_expr_is_read_only(&q.body)
}

fn set_expr_is_read_only(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_none(),
        SetExpr::Query(q) => query_is_read_only(q),
        SetExpr::SetOperation { left, right, .. } => {
            set_expr_is_read_only(left) && set_expr_is_read_only(right)
        }
        SetExpr::Values(_) | SetExpr::Table(_) => true,
        _ => false,
    }
}

#[async_trait]
impl QueryHook for ReadOnlyHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        Self::check(statement).err().map(Err)
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        Self::check(statement).err().map(Err)
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        Self::check(statement).err().map(Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn read_only(sql: &str) -> bool {
        let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect("parses");
        stmts.iter().all(is_read_only)
    }

    /// A view of 3,000 rows whose chunks were read once, then two rows changed: what point
    /// lookups, other conditions and a full read answer must agree with the rows as they are.
    #[tokio::test]
    async fn point_lookups_answer_as_a_full_scan_does() {
        use crate::table::{Cell, ViewTable as Rows};
        use crate::view::{Catalog, Snapshot, ViewDef};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let def = ViewDef {
            name: "v".into(),
            schema: Arc::new(Schema::new(vec![
                Field::new("sku", DataType::Utf8, false),
                Field::new("loc", DataType::Utf8, false),
                Field::new("n", DataType::Int64, true),
            ])),
            key: vec![0, 1],
            doc: String::new(),
            merge: None,
        };
        let mut rows = Rows::new(def.clone());
        let set = |rows: &mut Rows, i: i64, n: i64| {
            let (s, l) = (
                Cell::text(&format!("s{}", i / 3)),
                Cell::text(&format!("l{}", i % 3)),
            );
            rows.set(vec![s.clone(), l.clone()], Some(vec![s, l, Cell::Int(n)]));
        };
        for i in 0..3000 {
            set(&mut rows, i, i);
        }
        let catalog = Catalog::new();
        let publish = |rows: &Rows| {
            catalog.publish(
                &def,
                Snapshot {
                    epoch: 1,
                    offsets: Default::default(),
                    rows: rows.published(),
                },
            )
        };
        publish(&rows);
        let ctx = session_context(catalog.clone()).unwrap();
        let ask = |sql: &'static str| {
            let ctx = ctx.clone();
            async move {
                let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
                datafusion::arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string()
            }
        };
        ask("select count(*) from v").await;
        set(&mut rows, 2999, -1);
        set(&mut rows, 4, -2);
        publish(&rows);
        assert!(
            ask("select n from v where sku = 's999' and loc = 'l2'")
                .await
                .contains("| -1 |")
        );
        assert!(
            ask("select n from v where 's1' = sku and loc = 'l1'")
                .await
                .contains("| -2 |")
        );
        assert_eq!(
            ask("select sku, loc from v where n = -2").await,
            ask("select sku, loc from v where n + 0 = -2").await
        );
        assert_eq!(
            ask("select count(*) from v where loc = 'l0'").await,
            ask("select count(*) from v where loc || '' = 'l0'").await
        );
        assert!(
            ask("select count(*) from v where loc = 'l0'")
                .await
                .contains("| 1000 ")
        );
        assert!(
            ask("select count(*) from v where sku = 'none'")
                .await
                .contains("| 0 ")
        );
        assert!(ask("select count(*) from v").await.contains("| 3000 "));
    }

    #[test]
    fn queries_pass_and_writes_are_refused() {
        assert!(read_only("select * from v where a < 0"));
        assert!(read_only(
            "with x as (select 1) select * from x union select 2"
        ));
        assert!(read_only("explain select 1"));
        assert!(read_only("set timezone = 'UTC'"));
        assert!(read_only("begin; commit"));
        for sql in [
            "create table t (a int)",
            "insert into v values (1)",
            "update v set a = 1",
            "delete from v",
            "drop table v",
            "copy v to '/tmp/x.csv'",
            "copy v from '/tmp/x.csv'",
            "select * into t2 from v",
            "explain analyze insert into v values (1)",
            "create view v2 as select 1",
        ] {
            assert!(!read_only(sql), "{sql} should be refused");
        }
    }
}
