//! Business events: row changes mapped declaratively (`events.mappings` in `pipelines.yaml`) and
//! outbox rows/messages, produced under versioned contracts (`avro/contracts/*.avsc`).
//!
//! ```text
//!  Begin ─ change ─ change ─ … ─ Commit
//!            │        │            │
//!            ▼        ▼            ▼
//!    mapping matches? (table, on, when)      at Commit, in trigger order:
//!    ├ plain event: rows kept ──────────────▶ evaluate key + fields ─▶ check + encode under
//!    ├ `lines:` parent: aggregate opened ──▶ (parent's final row,      the contract ─┬▶ topic
//!    │   later updates of the same row fold     lines collected)                      └▶ DLQ
//!    └ `lines:` child: appended to the open aggregate with the same key   (reason, rows)
//!  outbox insert / pg_logical_emit_message(true, prefix, json) ─▶ same path
//! ```
//!
//! **Transaction-aware.** Events are built at the transaction's commit, not at each change, so
//! `oms.place_order` (header insert, line inserts, then an update of the header's total) becomes
//! one `OrderPlaced` carrying its final total and every line. Events are emitted in the order of
//! the changes that triggered them, all before the commit is handed to [`Progress`]: each owes
//! one ack to the transaction's entry, so the slot moves past a transaction only once its row
//! changes *and* its events (or their dead letters) are acked (invariant 1).
//!
//! **Ids.** A mapped event's id is `<commit LSN>:<index of the triggering change>:<mapping>`,
//! deterministic across redeliveries (invariant 2); its causation id is the triggering row
//! change's event id, its correlation id the source transaction. Outbox events keep the id the
//! application gave them.
//!
//! **Order.** The key is the mapping's `key` expression as text (the aggregate id): every event
//! of one order goes to one partition, in commit order (invariant 3). Topics may hold several
//! event types; each contract is registered under `<topic>-<record full name>` (Confluent's
//! TopicRecordNameStrategy), so a topic's event types evolve independently.
//!
//! **Old values need REPLICA IDENTITY FULL.** A mapping on `update` that reads `old.<col>` (a
//! status transition, a stock delta), or on `delete` reading a non-key `old.<col>`, needs the
//! old row, which Postgres only logs under `REPLICA IDENTITY FULL`. The alternative, keeping a
//! copy of every such table's rows in walbridge, was rejected: the copy would have to be
//! persisted atomically with the confirmed LSN (a crash between produce and ack replays the
//! transaction against state that already contains it, corrupting every delta), would grow with
//! the table (wms.stock_levels is every SKU × location), and would need its own snapshot to
//! start. FULL costs only extra WAL for the few tables named, is exact by construction, and is
//! the one change the design allows the legacy team. So walbridge refuses to start mappings
//! that need it on a table without it, naming the table and the `ALTER TABLE`, and
//! `walbridge doctor` lists them ([`needs_full`]).
//!
//! **Memory (invariant 5).** A transaction's pending events are held until its commit, with the
//! rows they are built from (as sent, for a dead letter, and parsed): so they grow with what
//! the transaction changes in mapped tables (a bulk reprice of 100k prices holds 100k small
//! rows, ~40 MB). `events.max_transaction_bytes` (default 256 MiB) bounds the estimate: a
//! transaction past it stops the pipeline with an error naming the key, before its commit is
//! confirmed, rather than spilling to disk (a transaction that large in mapped tables is a
//! bulk job the mappings were not meant for; raising the bound or splitting the job are the
//! ways on). Row changes themselves are not held: they stream to Kafka as they arrive.
//!
//! **Dead letters are replayable.** An event that cannot be built or violates its contract
//! goes to the dead-letter topic with its rows; after the mapping or contract is fixed,
//! `walbridge dlq replay` builds it again under the same id ([`replay`]).

pub mod check;
pub mod config;
pub mod expr;
pub mod replay;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, bail};
use avro::RegistryClient;
use avro::contract::{Contract, Datum};
use cdc::pgoutput::{Relation, ReplicaIdentity, Tuple, Value};
use serde_json::Value as Json;

pub use config::{EventsConfig, Mapping, On};
use expr::{Rows, Side, Val};

use crate::dlq::{EventOrigin, Letter, Reason, Row};
use crate::emit::{EventMeta, EventRecord, Out};

/// A table that needs `REPLICA IDENTITY FULL` for the mappings on it.
#[derive(Debug, Clone, PartialEq)]
pub struct FullNeeded {
    /// `schema.table`.
    pub table: String,
    /// The mappings (`name (events.mappings[i])`) and the old columns they read.
    pub why: Vec<String>,
}

impl FullNeeded {
    pub fn fix(&self) -> String {
        format!("ALTER TABLE {} REPLICA IDENTITY FULL;", self.table)
    }
}

/// Old columns a mapping reads that Postgres sends only under FULL, given the table's replica
/// identity key columns (under DEFAULT: the primary key).
fn old_needing_full(m: &Mapping, key_cols: &[String]) -> Vec<String> {
    if m.on == On::Insert {
        return Vec::new();
    }
    let mut cols = Vec::new();
    for e in m
        .when
        .iter()
        .chain([&m.key])
        .chain(m.fields.iter().map(|(_, e)| e))
    {
        e.columns(&mut cols);
    }
    let mut out: Vec<String> = cols
        .into_iter()
        .filter(|(side, name)| {
            *side == Side::Old
                // An UPDATE under DEFAULT sends no old row at all (unless the key changed).
                && (m.on == On::Update || !key_cols.contains(name))
        })
        .map(|(_, n)| n)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Which mapped tables lack the FULL replica identity their mappings need (see the module doc).
pub async fn needs_full(
    client: &tokio_postgres::Client,
    cfg: &EventsConfig,
) -> anyhow::Result<Vec<FullNeeded>> {
    let mut by_table: Vec<FullNeeded> = Vec::new();
    for m in &cfg.mappings {
        let qualified = format!("{}.{}", m.schema, m.table);
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                        coalesce((SELECT array_agg(a.attname::text) FROM pg_index i \
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                                  WHERE i.indrelid = c.oid AND i.indisprimary), '{}') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&m.schema, &m.table],
            )
            .await
            .with_context(|| format!("reading the replica identity of {qualified}"))?;
        let Some(row) = row else { continue };
        let ident: String = row.get(0);
        if ident == "f" {
            continue;
        }
        let pk: Vec<String> = row.get(1);
        let cols = old_needing_full(m, &pk);
        if cols.is_empty() {
            continue;
        }
        let why = format!(
            "{} ({}) reads old.{} on {}",
            m.name,
            m.path,
            cols.join(", old."),
            match m.on {
                On::Update => "update",
                On::Delete => "delete",
                On::Insert => "insert",
            }
        );
        match by_table.iter_mut().find(|f| f.table == qualified) {
            Some(f) => f.why.push(why),
            None => by_table.push(FullNeeded {
                table: qualified,
                why: vec![why],
            }),
        }
    }
    Ok(by_table)
}

/// The refusal when [`needs_full`] found tables.
pub fn refusal(need: &[FullNeeded]) -> String {
    let list: Vec<String> = need
        .iter()
        .map(|f| format!("{} ({})", f.table, f.why.join("; ")))
        .collect();
    let fixes: Vec<String> = need.iter().map(FullNeeded::fix).collect();
    format!(
        "events: these mappings read old row values, which Postgres logs only under REPLICA IDENTITY FULL, and their tables have less: {}. \
         Without it the old values would be missing and the events wrong, so the mappings do not start. \
         Run on the source: {} (walbridge doctor lists every table that needs it)",
        list.join("; "),
        fixes.join(" ")
    )
}

/// A table with mappings, as bound to its latest Relation message.
struct Rel {
    schema: String,
    table: String,
    names: Vec<String>,
    oids: Vec<u32>,
    /// Mappings triggered by this table's changes.
    triggers: Vec<usize>,
    /// Mappings whose `lines:` come from this table.
    children: Vec<usize>,
    /// Whether this is the outbox table.
    outbox: bool,
}

/// One event waiting for its transaction's commit.
struct Pending {
    /// `None` for outbox events.
    mapping: Option<usize>,
    rel: Option<u32>,
    /// Index of the triggering change in its transaction.
    index: u32,
    op: &'static str,
    old: Option<Vec<Val>>,
    new: Option<Vec<Val>>,
    /// The rows as Postgres sent them: a dead letter keeps them, so that `walbridge dlq
    /// replay` can build the event again under a corrected mapping or contract.
    old_raw: Option<Tuple>,
    new_raw: Option<Tuple>,
    lines: Vec<Datum>,
    /// The `lines:` child rows as sent (relation id, row), for the same reason.
    line_rows: Vec<(u32, Tuple)>,
    /// An outbox message's JSON text (`pg_logical_emit_message`).
    message: Option<String>,
    /// Set when the event already failed (e.g. its condition could not be evaluated).
    error: Option<String>,
}

/// The business-event stage of one pipeline attempt (see the module doc).
pub struct Engine {
    cfg: Arc<EventsConfig>,
    /// The config's mappings, with expressions bound to their tables' columns.
    mappings: Vec<Mapping>,
    rels: HashMap<u32, Rel>,
    registry: RegistryClient,
    /// (topic, contract full name) → schema id.
    schema_ids: HashMap<(String, String), u32>,
    topics: HashSet<String>,
    pending: Vec<Pending>,
    /// Estimated bytes `pending` holds, against `events.max_transaction_bytes`.
    pending_bytes: usize,
    /// (mapping, key) → index into `pending` of an open `lines:` aggregate.
    open: HashMap<(usize, String), usize>,
    /// `source.system` in every event (the topic prefix).
    system: String,
    db: String,
}

fn to_vals(rel: &Rel, t: &Tuple, fill: Option<&[Val]>) -> Vec<Val> {
    t.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Text(b) => {
                expr::from_pg_text(rel.oids[i], std::str::from_utf8(b).unwrap_or_default())
            }
            // Unchanged TOAST: the old row (under FULL) has it.
            Value::UnchangedToast => fill.and_then(|f| f.get(i).cloned()).unwrap_or(Val::Null),
            Value::Null | Value::Binary(_) => Val::Null,
        })
        .collect()
}

fn key_text(v: Val) -> Result<String, String> {
    match v {
        Val::Null => Err("the key expression gave null; every event needs an aggregate id".into()),
        v => Ok(v.text()),
    }
}

impl Engine {
    /// Checks the source (replica identities), registers every mapping's contract under its
    /// topic, and makes sure the topics exist.
    pub async fn start(
        cfg: Arc<EventsConfig>,
        meta: &tokio_postgres::Client,
        registry_url: &str,
        out: &Out,
        db: &str,
    ) -> anyhow::Result<Engine> {
        let need = needs_full(meta, &cfg).await?;
        if !need.is_empty() {
            bail!("{}", refusal(&need));
        }
        let mut e = Engine {
            mappings: cfg.mappings.clone(),
            cfg,
            rels: HashMap::new(),
            registry: RegistryClient::new(registry_url)?,
            schema_ids: HashMap::new(),
            topics: HashSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            open: HashMap::new(),
            system: out.name.to_string(),
            db: db.to_owned(),
        };
        let pairs: Vec<(String, Arc<Contract>)> = e
            .mappings
            .iter()
            .map(|m| (m.topic.clone(), m.contract.clone()))
            .collect();
        for (topic, contract) in pairs {
            e.schema_id(out, &topic, &contract).await?;
        }
        tracing::info!(
            mappings = e.mappings.len(),
            topics = e.topics.len(),
            "business-event mappings ready"
        );
        Ok(e)
    }

    /// An engine for replaying one dead letter: only mapping `only` (none for an outbox
    /// event), no source checks; contracts are registered when an event is built.
    fn offline(
        cfg: Arc<EventsConfig>,
        only: Option<usize>,
        registry_url: &str,
        out: &Out,
        db: &str,
    ) -> anyhow::Result<Engine> {
        Ok(Engine {
            mappings: only.map(|i| cfg.mappings[i].clone()).into_iter().collect(),
            cfg,
            rels: HashMap::new(),
            registry: RegistryClient::new(registry_url)?,
            schema_ids: HashMap::new(),
            topics: HashSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            open: HashMap::new(),
            system: out.name.to_string(),
            db: db.to_owned(),
        })
    }

    /// The schema id of `contract` on `topic`, registering it (and creating the topic) on
    /// first use.
    async fn schema_id(&mut self, out: &Out, topic: &str, c: &Contract) -> anyhow::Result<u32> {
        let k = (topic.to_owned(), c.full_name.clone());
        if let Some(id) = self.schema_ids.get(&k) {
            return Ok(*id);
        }
        self.ensure_topic(out, topic).await?;
        let subject = format!("{topic}-{}", c.full_name);
        let id = self
            .registry
            .register(&subject, &c.schema_json)
            .await
            .with_context(|| {
                format!(
                    "registering contract {} ({}) under {subject}; `walbridge contracts check` tells whether it is compatible with the registered versions",
                    c.name,
                    c.path.display()
                )
            })?;
        self.schema_ids.insert(k, id);
        Ok(id)
    }

    async fn ensure_topic(&mut self, out: &Out, topic: &str) -> anyhow::Result<()> {
        if !self.topics.contains(topic) {
            out.sink.ensure_topics(&[topic.to_owned()]).await?;
            self.topics.insert(topic.to_owned());
        }
        Ok(())
    }

    /// Whether `rel_id` is the outbox table (its rows become events, not row changes).
    pub fn is_outbox(&self, rel_id: u32) -> bool {
        self.rels.get(&rel_id).is_some_and(|r| r.outbox)
    }

    /// A Relation message: binds the mappings on this table to its columns.
    pub fn relation(&mut self, rel: &Relation) -> anyhow::Result<()> {
        let names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut triggers = Vec::new();
        let mut children = Vec::new();
        let keys: Vec<String> = rel
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.clone())
            .collect();
        let qualified = format!("{}.{}", rel.namespace, rel.name);
        for (i, m) in self.mappings.iter_mut().enumerate() {
            let bind = |e: &mut expr::Expr, what: &str| {
                e.bind(&refs)
                    .map_err(|err| anyhow::anyhow!("{}.{what} (mapping {}): {err}", m.path, m.name))
            };
            if m.schema == rel.namespace && m.table == rel.name {
                let need = old_needing_full(m, &keys);
                if rel.replica_identity != ReplicaIdentity::Full && !need.is_empty() {
                    bail!(
                        "{}",
                        refusal(&[FullNeeded {
                            table: qualified.clone(),
                            why: vec![format!(
                                "{} ({}) reads old.{}",
                                m.name,
                                m.path,
                                need.join(", old.")
                            )],
                        }])
                    );
                }
                if let Some(w) = &mut m.when {
                    bind(w, "when")?;
                }
                bind(&mut m.key, "key")?;
                if let Some(p) = m.lines.as_mut().and_then(|l| l.parent_id.as_mut()) {
                    bind(p, "lines.parent_id")?;
                }
                for (f, e) in &mut m.fields {
                    bind(e, &format!("fields.{f}"))?;
                }
                triggers.push(i);
            }
            if let Some(l) = &mut m.lines
                && l.schema == rel.namespace
                && l.table == rel.name
            {
                l.parent_key
                    .bind(&refs)
                    .map_err(|err| anyhow::anyhow!("{}.lines.parent_key: {err}", m.path))?;
                for (f, e) in &mut l.fields {
                    e.bind(&refs)
                        .map_err(|err| anyhow::anyhow!("{}.lines.fields.{f}: {err}", m.path))?;
                }
                children.push(i);
            }
        }
        let outbox = self
            .cfg
            .outbox
            .as_ref()
            .and_then(|o| o.table.as_ref())
            .is_some_and(|(s, t)| *s == rel.namespace && *t == rel.name);
        if outbox {
            for col in ["aggregate_type", "aggregate_id", "event_type", "payload"] {
                if !names.iter().any(|n| n == col) {
                    bail!(
                        "the outbox table {qualified} has no column {col}; it needs id, aggregate_type, aggregate_id, event_type and payload (jsonb)"
                    );
                }
            }
        }
        if triggers.is_empty() && children.is_empty() && !outbox {
            self.rels.remove(&rel.id);
            return Ok(());
        }
        self.rels.insert(
            rel.id,
            Rel {
                schema: rel.namespace.clone(),
                table: rel.name.clone(),
                names,
                oids: rel.columns.iter().map(|c| c.type_oid).collect(),
                triggers,
                children,
                outbox,
            },
        );
        Ok(())
    }

    /// A row change of the open transaction (`index`: its position in the transaction).
    /// Fails when the transaction's pending events outgrow `events.max_transaction_bytes`.
    pub fn change(
        &mut self,
        rel_id: u32,
        on: On,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        index: u32,
    ) -> anyhow::Result<()> {
        let Some(rel) = self.rels.get(&rel_id) else {
            return Ok(());
        };
        let held = self.pending.len();
        let (old_raw, new_raw) = (old, new);
        let old = old.map(|t| to_vals(rel, t, None));
        let new = new.map(|t| to_vals(rel, t, old.as_deref()));
        let raw_new = || new_raw.cloned();
        let op = match on {
            On::Insert => "c",
            On::Update => "u",
            On::Delete => "d",
        };
        if rel.outbox {
            if on == On::Insert {
                self.pending.push(Pending {
                    mapping: None,
                    rel: Some(rel_id),
                    index,
                    op,
                    old: None,
                    new,
                    old_raw: None,
                    new_raw: raw_new(),
                    lines: Vec::new(),
                    line_rows: Vec::new(),
                    message: None,
                    error: None,
                });
                return self.hold(tuple_bytes(None, new_raw));
            }
            return Ok(());
        }
        let rows = Rows {
            old: old.as_deref(),
            new: new.as_deref(),
        };
        // A later update of a row an open aggregate was built from: the event carries the
        // row as committed (place_order sets the total after inserting the lines).
        if on == On::Update {
            for &i in &rel.triggers {
                let m = &self.mappings[i];
                let Some(l) = &m.lines else {
                    continue;
                };
                if let Ok(k) = l
                    .parent_id
                    .as_ref()
                    .unwrap_or(&m.key)
                    .eval(&rows)
                    .and_then(key_text)
                    && let Some(&p) = self.open.get(&(i, k))
                {
                    self.pending[p].new = new.clone();
                    self.pending[p].new_raw = raw_new();
                }
            }
        }
        if on == On::Insert {
            for &i in &rel.children {
                let Some(l) = &self.mappings[i].lines else {
                    continue;
                };
                let Ok(k) = l.parent_key.eval(&rows).and_then(key_text) else {
                    continue;
                };
                let Some(&p) = self.open.get(&(i, k)) else {
                    continue;
                };
                let mut fields = Vec::with_capacity(l.fields.len());
                for (f, e) in &l.fields {
                    match e.eval(&rows) {
                        Ok(v) => fields.push((f.clone(), v.into_datum())),
                        Err(err) => {
                            self.pending[p].error.get_or_insert(format!(
                                "{}.lines.fields.{f}: {err}",
                                self.mappings[i].path
                            ));
                        }
                    }
                }
                self.pending[p].lines.push(Datum::Record(fields));
                if let Some(t) = raw_new() {
                    self.pending_bytes += tuple_bytes(None, Some(&t));
                    self.pending[p].line_rows.push((rel_id, t));
                }
            }
        }
        for &i in &rel.triggers {
            let m = &self.mappings[i];
            if m.on != on {
                continue;
            }
            let mut error = None;
            if let Some(w) = &m.when {
                match w.eval(&rows) {
                    Ok(Val::Bool(true)) => {}
                    Ok(Val::Bool(false) | Val::Null) => continue,
                    Ok(v) => {
                        error = Some(format!(
                            "{}.when gave a {} instead of a boolean",
                            m.path,
                            v.ty()
                        ))
                    }
                    Err(err) => error = Some(format!("{}.when: {err}", m.path)),
                }
            }
            if let Some(l) = &m.lines
                && let Ok(k) = l
                    .parent_id
                    .as_ref()
                    .unwrap_or(&m.key)
                    .eval(&rows)
                    .and_then(key_text)
            {
                self.open.insert((i, k), self.pending.len());
            }
            self.pending.push(Pending {
                mapping: Some(i),
                rel: Some(rel_id),
                index,
                op,
                old: old.clone(),
                new: new.clone(),
                old_raw: old_raw.cloned(),
                new_raw: raw_new(),
                lines: Vec::new(),
                line_rows: Vec::new(),
                message: None,
                error,
            });
        }
        let added = self.pending.len() - held;
        self.hold(added * tuple_bytes(old_raw, new_raw))
    }

    /// Counts `bytes` more held until the commit; fails past the bound (invariant 5).
    fn hold(&mut self, bytes: usize) -> anyhow::Result<()> {
        self.pending_bytes += bytes;
        let max = self.cfg.max_transaction_bytes;
        if self.pending_bytes > max {
            bail!(
                "the transaction holds more than events.max_transaction_bytes ({max} bytes) of rows waiting to become \
                 business events: mapped rows, `lines:` children and outbox rows/messages are held until the commit \
                 (events are built from the transaction as committed). walbridge stops here rather than grow without \
                 bound, and confirms nothing from this transaction on. Raise events.max_transaction_bytes if the memory \
                 is there, or split the transaction in the application, then start walbridge again"
            );
        }
        Ok(())
    }

    /// A logical message; outbox messages become events (`Ok(true)`).
    pub fn message(&mut self, prefix: &str, content: &[u8], index: u32) -> anyhow::Result<bool> {
        let ours = self
            .cfg
            .outbox
            .as_ref()
            .and_then(|o| o.message_prefix.as_deref())
            == Some(prefix);
        if ours {
            self.pending.push(Pending {
                mapping: None,
                rel: None,
                index,
                op: "m",
                old: None,
                new: None,
                old_raw: None,
                new_raw: None,
                lines: Vec::new(),
                line_rows: Vec::new(),
                message: Some(String::from_utf8_lossy(content).into_owned()),
                error: None,
            });
            self.hold(PENDING_OVERHEAD + content.len() * 2)?;
        }
        Ok(ours)
    }

    /// Whether a transaction left events to emit.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Drops what a transaction left (e.g. a snapshot chunk, or an attempt that failed).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.open.clear();
    }

    /// The transaction commits: builds, checks and produces its events in trigger order.
    pub async fn commit(&mut self, out: &Out, m: &EventMeta<'_>) -> anyhow::Result<()> {
        self.open.clear();
        self.pending_bytes = 0;
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            let built = self.build(out, m, p).await?;
            send(out, m, built).await?;
        }
        Ok(())
    }

    /// What a dead letter keeps so that replay can build the event again.
    fn origin(&self, mapping: Option<usize>, p: &Pending) -> EventOrigin {
        let mut lines_table = None;
        let lines = p
            .line_rows
            .iter()
            .filter_map(|(rel, t)| {
                let r = self.rels.get(rel)?;
                lines_table.get_or_insert_with(|| format!("{}.{}", r.schema, r.table));
                Some(Row::of_names(&r.names, t))
            })
            .collect();
        EventOrigin {
            mapping: mapping.map(|i| self.mappings[i].name.clone()),
            index: p.index,
            lines_table,
            lines,
        }
    }

    fn source(&self, m: &EventMeta<'_>, table: Option<String>) -> Datum {
        Datum::Record(vec![
            ("system".into(), Datum::Str(self.system.clone())),
            ("db".into(), Datum::Str(self.db.clone())),
            ("table".into(), table.map_or(Datum::Null, Datum::Str)),
            ("lsn".into(), Datum::Str(m.lsn_text.to_owned())),
            ("txid".into(), Datum::Long(i64::from(m.xid))),
        ])
    }

    /// Builds one event: the record for its topic, or the dead letter saying why not.
    async fn build(&mut self, out: &Out, m: &EventMeta<'_>, p: Pending) -> anyhow::Result<Built> {
        let causation = format!("{}:{}", m.lsn_text, p.index);
        let Some(mi) = p.mapping else {
            return self.build_outbox(out, m, p, causation).await;
        };
        let map = &self.mappings[mi];
        let event_id = format!("{causation}:{}", map.name);
        let rows = Rows {
            old: p.old.as_deref(),
            new: p.new.as_deref(),
        };
        let (topic, contract) = (map.topic.clone(), map.contract.clone());
        let key = map.key.eval(&rows).and_then(key_text);
        let mut fields = vec![
            ("event_id".to_owned(), Datum::Str(event_id.clone())),
            (
                "occurred_at".to_owned(),
                Datum::TimestampMicros(m.commit_ms * 1000),
            ),
        ];
        let rel = p.rel.and_then(|r| self.rels.get(&r));
        let table = rel.map(|r| format!("{}.{}", r.schema, r.table));
        fields.push(("source".into(), self.source(m, table.clone())));
        let mut error = p.error.clone();
        for (f, e) in &map.fields {
            match e.eval(&rows) {
                Ok(v) => fields.push((f.clone(), v.into_datum())),
                Err(err) => {
                    error.get_or_insert(format!("{}.fields.{f}: {err}", map.path));
                }
            }
        }
        if let Some(l) = &map.lines {
            fields.push((l.field.clone(), Datum::Array(p.lines.clone())));
        }
        let mut payload = Vec::new();
        let result = match (error, &key) {
            (Some(e), _) => Err((e, None)),
            (None, Err(e)) => Err((format!("{}.key: {e}", map.path), None)),
            (None, Ok(_)) => contract
                .encode(&fields, &mut payload)
                .map_err(|v| (v.to_string(), Some(v.path))),
        };
        match result {
            Ok(()) => {
                let id = self.schema_id(out, &topic, &contract).await?;
                let mut framed = Vec::with_capacity(payload.len() + 5);
                avro::frame(id, &payload, &mut framed);
                Ok(Built::Event {
                    topic,
                    key: key.unwrap_or_default(),
                    payload: framed,
                    event_id,
                    causation,
                    event_type: contract.name.clone(),
                    schema_id: Some(id),
                    op: p.op,
                })
            }
            Err((message, field)) => {
                let rel = p.rel.and_then(|r| self.rels.get(&r));
                let letter = Letter {
                    reason: Reason {
                        message: format!(
                            "{} event of mapping {} violates contract {}: {message}",
                            contract.name,
                            self.mappings[mi].name,
                            contract.path.display()
                        ),
                        column: field,
                        pg_type: None,
                        fix: format!(
                            "fix the mapping ({}) in pipelines.yaml or the contract ({}), then run `walbridge dlq replay`: \
                             it builds the event again from the rows kept here, under the same event id. \
                             The row change itself is on its table's topic",
                            self.mappings[mi].path,
                            contract.path.display()
                        ),
                    },
                    before: rel
                        .zip(p.old_raw.as_ref())
                        .map(|(r, t)| Row::of_names(&r.names, t)),
                    after: rel
                        .zip(p.new_raw.as_ref())
                        .map(|(r, t)| Row::of_names(&r.names, t)),
                    event: Some(self.origin(Some(mi), &p)),
                    ..letter_head(&event_id, rel, topic.clone(), p.op, m)
                };
                Ok(Built::Letter {
                    letter: Box::new(letter),
                    key: key.ok(),
                    event_type: contract.name.clone(),
                    causation,
                })
            }
        }
    }

    async fn build_outbox(
        &mut self,
        out: &Out,
        m: &EventMeta<'_>,
        p: Pending,
        causation: String,
    ) -> anyhow::Result<Built> {
        let Some(ob) = self.cfg.outbox.clone() else {
            bail!("an outbox event without events.outbox configured");
        };
        let rel = p.rel.and_then(|r| self.rels.get(&r));
        let table = rel.map(|r| format!("{}.{}", r.schema, r.table));
        // The fields, from the row's columns or the message's JSON.
        let parsed: Result<(Json, Option<String>), String> = match (&p.message, rel, &p.new) {
            (Some(text), _, _) => serde_json::from_str::<Json>(text)
                .map_err(|e| format!("the outbox message is not JSON: {e}"))
                .map(|j| (j, None)),
            (None, Some(r), Some(vals)) => {
                let get = |c: &str| {
                    r.names
                        .iter()
                        .position(|n| n == c)
                        .and_then(|i| vals.get(i))
                        .filter(|v| **v != Val::Null)
                        .map(Val::text)
                };
                let payload = match get("payload") {
                    Some(t) => {
                        serde_json::from_str(&t).map_err(|e| format!("payload is not JSON: {e}"))
                    }
                    None => Ok(Json::Null),
                };
                payload.map(|payload| {
                    (
                        serde_json::json!({
                            "id": get("id"),
                            "aggregate_type": get("aggregate_type"),
                            "aggregate_id": get("aggregate_id"),
                            "event_type": get("event_type"),
                            "payload": payload,
                        }),
                        table.clone(),
                    )
                })
            }
            _ => Err("outbox row without values".into()),
        };
        let text = |j: &Json, k: &str| match &j[k] {
            Json::String(s) if !s.is_empty() => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let (json, _) = match &parsed {
            Ok(x) => x.clone(),
            Err(_) => (Json::Null, None),
        };
        let event_id = text(&json, "id").unwrap_or_else(|| format!("{causation}:outbox"));
        let event_type = text(&json, "event_type").unwrap_or_default();
        let aggregate_type = text(&json, "aggregate_type");
        let key = text(&json, "aggregate_id");
        let topic = aggregate_type.as_deref().map(|a| ob.topic(a));
        let contract = self.cfg.contract(&event_type).cloned();
        let built: Result<Encoded, Failure> = (|| {
            let json = parsed.clone().map_err(|e| (e, None))?.0;
            let topic = topic.as_ref().ok_or_else(|| {
                (
                    "aggregate_type is missing: it names the topic".to_owned(),
                    None,
                )
            })?;
            if key.is_none() {
                return Err((
                    "aggregate_id is missing: it is the event key".to_owned(),
                    None,
                ));
            }
            if event_type.is_empty() {
                return Err(("event_type is missing".to_owned(), None));
            }
            if !topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err((
                    format!("topic {topic:?} (from aggregate_type) has characters Kafka refuses"),
                    None,
                ));
            }
            let Some(c) = &contract else {
                // No contract: the payload goes as JSON, unchecked.
                return Ok((
                    serde_json::to_vec(&json["payload"]).unwrap_or_default(),
                    None,
                ));
            };
            let payload = match &json["payload"] {
                Json::Object(o) => o.clone(),
                _ => {
                    return Err((
                        "payload must be a JSON object with the contract's fields".into(),
                        None,
                    ));
                }
            };
            let mut fields = vec![
                ("event_id".to_owned(), Datum::Str(event_id.clone())),
                (
                    "occurred_at".to_owned(),
                    Datum::TimestampMicros(m.commit_ms * 1000),
                ),
                ("source".to_owned(), self.source(m, None)),
            ];
            for (k, v) in &payload {
                if avro::contract::METADATA_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                let f = c.root.field(k).ok_or_else(|| {
                    (
                        format!("field {k}: {} has no such field", c.full_name),
                        Some(k.clone()),
                    )
                })?;
                let d = avro::contract::datum_from_json(&f.shape, v, k)
                    .map_err(|v| (v.to_string(), Some(v.path)))?;
                fields.push((k.clone(), d));
            }
            let mut out = Vec::new();
            c.encode(&fields, &mut out)
                .map_err(|v| (format!("violates contract {}: {v}", c.name), Some(v.path)))?;
            Ok((out, Some(0)))
        })();
        match built {
            Ok((payload, schema)) => {
                let topic = topic.unwrap_or_default();
                let (payload, schema_id) = match (schema, &contract) {
                    (Some(_), Some(c)) => {
                        let id = self.schema_id(out, &topic, c).await?;
                        let mut framed = Vec::with_capacity(payload.len() + 5);
                        avro::frame(id, &payload, &mut framed);
                        (framed, Some(id))
                    }
                    _ => {
                        self.ensure_topic(out, &topic).await?;
                        (payload, None)
                    }
                };
                Ok(Built::Event {
                    topic,
                    key: key.unwrap_or_default(),
                    payload,
                    event_id,
                    causation,
                    event_type,
                    schema_id,
                    op: p.op,
                })
            }
            Err((message, field)) => {
                let letter = Letter {
                    reason: Reason {
                        message: format!("outbox event {event_id} ({event_type}): {message}"),
                        column: field,
                        pg_type: None,
                        fix: "fix the contract (the contracts dir) or events.outbox in pipelines.yaml, then run `walbridge dlq replay`; \
                              if the application wrote a wrong event, fix its outbox write (aggregate_type, aggregate_id, event_type, payload)".into(),
                    },
                    before: None,
                    after: match (rel, &p.new_raw, &p.message) {
                        (Some(r), Some(t), _) => Some(Row::of_names(&r.names, t)),
                        (_, _, Some(text)) => Some(Row {
                            values: vec![("content".into(), Some(text.clone()))],
                            unchanged_toast: Vec::new(),
                            hex: Vec::new(),
                        }),
                        _ => None,
                    },
                    event: Some(self.origin(None, &p)),
                    ..letter_head(&event_id, rel, topic.unwrap_or_default(), p.op, m)
                };
                Ok(Built::Letter {
                    letter: Box::new(letter),
                    key,
                    event_type,
                    causation,
                })
            }
        }
    }
}

/// An outbox payload and whether it is framed under a contract.
type Encoded = (Vec<u8>, Option<u32>);
/// Why an event could not be built, and the field at fault.
type Failure = (String, Option<String>);

/// An event built at commit, ready to send.
enum Built {
    Event {
        topic: String,
        key: String,
        payload: Vec<u8>,
        event_id: String,
        causation: String,
        event_type: String,
        schema_id: Option<u32>,
        op: &'static str,
    },
    /// It could not be built (mapping error, contract violation, bad outbox write).
    Letter {
        letter: Box<Letter>,
        key: Option<String>,
        event_type: String,
        causation: String,
    },
}

async fn send(out: &Out, m: &EventMeta<'_>, b: Built) -> anyhow::Result<()> {
    match b {
        Built::Event {
            topic,
            key,
            payload,
            event_id,
            causation,
            event_type,
            schema_id,
            op,
        } => {
            crate::emit::send_event(
                out,
                m,
                &EventRecord {
                    topic: &topic,
                    key: key.as_bytes(),
                    payload: &payload,
                    event_id: &event_id,
                    causation_id: &causation,
                    event_type: &event_type,
                    schema_id,
                    op,
                },
            )
            .await
        }
        Built::Letter {
            letter,
            key,
            event_type,
            causation,
        } => {
            crate::emit::dead_letter_event(
                out,
                m,
                &letter,
                key.as_deref().map(str::as_bytes),
                &event_type,
                &causation,
            )
            .await
        }
    }
}

/// Fixed cost of one pending event beyond its rows (vectors, strings, the datums built).
const PENDING_OVERHEAD: usize = 256;

/// Estimated bytes a pending row pair holds: its text twice (as sent, kept for dead letters,
/// and parsed into values) plus a per-column cost.
fn tuple_bytes(old: Option<&Tuple>, new: Option<&Tuple>) -> usize {
    let one = |t: &Tuple| {
        t.iter()
            .map(|v| {
                48 + match v {
                    Value::Text(b) | Value::Binary(b) => 2 * b.len(),
                    Value::Null | Value::UnchangedToast => 0,
                }
            })
            .sum::<usize>()
    };
    PENDING_OVERHEAD + old.map_or(0, one) + new.map_or(0, one)
}

/// The fields every business-event dead letter fills the same way; the caller adds the reason,
/// the rows and the origin.
fn letter_head(
    event_id: &str,
    rel: Option<&Rel>,
    topic: String,
    op: &str,
    m: &EventMeta<'_>,
) -> Letter {
    Letter {
        format: crate::dlq::FORMAT.into(),
        event_id: event_id.to_owned(),
        schema: rel.map(|r| r.schema.clone()).unwrap_or_default(),
        table: rel.map(|r| r.table.clone()).unwrap_or_default(),
        topic,
        op: op.into(),
        commit_lsn: m.lsn_text.into(),
        txid: m.xid,
        commit_ts_ms: m.commit_ms,
        snapshot: false,
        dead_lettered_at_ms: crate::pipeline::now_ms(),
        reason: Reason::default(),
        before: None,
        after: None,
        event: None,
    }
}
