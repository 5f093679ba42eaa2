//! The `events:` section of `pipelines.yaml`: parsed with the rest of the file, validated here
//! (every problem with its line, column and key path, like the other sections).
//!
//! ```yaml
//! events:
//!   contracts_dir: avro/contracts         # the .avsc files (default avro/contracts)
//!   max_transaction_bytes: 268435456      # rows one transaction may hold until its commit
//!   mappings:
//!     - name: order_status_changed        # unique; part of each event's id
//!       table: oms.orders
//!       on: update                        # insert, update or delete
//!       when: "old.status <> new.status"  # optional condition (null counts as false)
//!       event: OrderStatusChanged         # the contract (record name of an .avsc)
//!       key: new.id                       # the aggregate id: one order, one partition
//!       topic: retail.orders
//!       fields:                           # contract field: expression
//!         order_id: new.id
//!         from_status: old.status
//!       lines:                            # optional: child rows of the same transaction
//!         field: lines                    # the contract's array field
//!         table: oms.order_lines
//!         parent_key: new.order_id        # on the line row: its parent's id
//!         parent_id: new.id               # on the parent row (default: the mapping's key)
//!         fields: { sku: new.sku, qty: new.qty }
//!   outbox:
//!     table: public.outbox                # optional outbox table (inserts become events)
//!     message_prefix: walbridge.outbox    # optional pg_logical_emit_message prefix
//!     topic_prefix: retail                # topic = <topic_prefix>.<aggregate_type>
//! ```
//!
//! Field coverage against the contract is checked here (every mapped field exists, every
//! non-nullable field is mapped); types need the source catalog and are checked by
//! `walbridge contracts check`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use avro::contract::{Contract, METADATA_FIELDS, Record, Shape};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::expr::{self, Expr};
use crate::config::TableSelector;

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    contracts_dir: Option<S<String>>,
    max_transaction_bytes: Option<S<i64>>,
    #[serde(default)]
    mappings: Vec<S<RawMapping>>,
    outbox: Option<S<RawOutbox>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    name: S<String>,
    table: S<String>,
    on: S<String>,
    when: Option<S<String>>,
    event: S<String>,
    key: S<String>,
    topic: S<String>,
    fields: BTreeMap<String, S<String>>,
    lines: Option<S<RawLines>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLines {
    field: S<String>,
    table: S<String>,
    parent_key: S<String>,
    parent_id: Option<S<String>>,
    fields: BTreeMap<String, S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    table: Option<S<String>>,
    message_prefix: Option<S<String>>,
    topic_prefix: Option<S<String>>,
}

/// The validated `events:` section.
#[derive(Debug)]
pub struct EventsConfig {
    pub contracts_dir: PathBuf,
    /// Bound on the rows one transaction holds until its commit (see the events module doc).
    pub max_transaction_bytes: usize,
    pub contracts: Vec<Arc<Contract>>,
    pub mappings: Vec<Mapping>,
    pub outbox: Option<Outbox>,
}

/// What kind of row change a mapping reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Insert,
    Update,
    Delete,
}

/// One `events.mappings[i]`.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub name: String,
    /// `events.mappings[i]`, for messages.
    pub path: String,
    pub schema: String,
    pub table: String,
    pub on: On,
    pub when: Option<Expr>,
    pub contract: Arc<Contract>,
    pub key: Expr,
    pub topic: String,
    /// (contract field, expression), in the config's order.
    pub fields: Vec<(String, Expr)>,
    pub lines: Option<Lines>,
}

/// Child rows collected into one array field of the event (transaction-aware).
#[derive(Debug, Clone)]
pub struct Lines {
    pub field: String,
    pub schema: String,
    pub table: String,
    /// On the line row: the id of its parent.
    pub parent_key: Expr,
    /// On the parent row: what `parent_key` must equal (default: the mapping's key).
    pub parent_id: Option<Expr>,
    pub fields: Vec<(String, Expr)>,
    /// The array's item record.
    pub item: Record,
}

#[derive(Debug, Clone)]
pub struct Outbox {
    pub table: Option<(String, String)>,
    pub message_prefix: Option<String>,
    pub topic_prefix: Option<String>,
}

impl Outbox {
    pub fn topic(&self, aggregate_type: &str) -> String {
        match &self.topic_prefix {
            Some(p) => format!("{p}.{aggregate_type}"),
            None => aggregate_type.to_owned(),
        }
    }
}

impl EventsConfig {
    pub fn contract(&self, name: &str) -> Option<&Arc<Contract>> {
        self.contracts
            .iter()
            .find(|c| c.name == name || c.full_name == name)
    }
}

/// `events.max_transaction_bytes` when not given: 256 MiB.
pub const DEFAULT_MAX_TRANSACTION_BYTES: usize = 256 << 20;
const MIN_TRANSACTION_BYTES: i64 = 4096;

/// Where errors go: (location, key path, message).
pub type Report<'a> = dyn FnMut(&Location, &str, String) + 'a;

fn qualified(s: &str) -> Option<(String, String)> {
    let (a, b) = s.split_once('.')?;
    let ok = |x: &str| !x.is_empty() && !x.contains('*') && !x.contains('.');
    (ok(a) && ok(b)).then(|| (a.to_owned(), b.to_owned()))
}

fn captured(tables: &[TableSelector], schema: &str, table: &str) -> bool {
    tables.iter().any(|t| match t {
        TableSelector::Table {
            schema: s,
            table: t,
        } => s == schema && t == table,
        TableSelector::AllInSchema { schema: s } => s == schema,
    })
}

fn parse_expr(e: &S<String>, path: &str, report: &mut Report<'_>) -> Option<Expr> {
    match expr::parse(&e.value) {
        Ok(x) => Some(x),
        Err(err) => {
            report(
                &e.referenced,
                path,
                format!("cannot parse the expression {:?} {err}", e.value),
            );
            None
        }
    }
}

fn topic_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Validates the section; `None` after reporting when anything is wrong.
pub fn validate(
    raw: &S<RawEvents>,
    tables: &[TableSelector],
    report: &mut Report<'_>,
) -> Option<EventsConfig> {
    let r = &raw.value;
    let mut ok = true;
    let contracts_dir = PathBuf::from(
        r.contracts_dir
            .as_ref()
            .map_or("avro/contracts", |d| d.value.as_str()),
    );
    let at_dir = r
        .contracts_dir
        .as_ref()
        .map_or(&raw.referenced, |d| &d.referenced);
    let contracts: Vec<Arc<Contract>> = match avro::contract::load_dir(&contracts_dir) {
        Ok(c) => c.into_iter().map(Arc::new).collect(),
        Err(e) => {
            report(at_dir, "events.contracts_dir", e.to_string());
            return None;
        }
    };
    let max_transaction_bytes = match &r.max_transaction_bytes {
        None => DEFAULT_MAX_TRANSACTION_BYTES,
        Some(v) if (MIN_TRANSACTION_BYTES..=64 << 30).contains(&v.value) => v.value as usize,
        Some(v) => {
            report(
                &v.referenced,
                "events.max_transaction_bytes",
                format!(
                    "{} is outside {MIN_TRANSACTION_BYTES}..={}; give a byte count, e.g. 268435456 (256 MiB)",
                    v.value,
                    64i64 << 30
                ),
            );
            ok = false;
            DEFAULT_MAX_TRANSACTION_BYTES
        }
    };
    let mut names = HashSet::new();
    let mut mappings = Vec::new();
    for (i, m) in r.mappings.iter().enumerate() {
        let path = format!("events.mappings[{i}]");
        match mapping(&m.value, &path, &contracts, tables, &mut names, report) {
            Some(x) => mappings.push(x),
            None => ok = false,
        }
    }
    let outbox = match &r.outbox {
        None => None,
        Some(o) => {
            let o = &o.value;
            let table = match &o.table {
                None => None,
                Some(t) => match qualified(&t.value) {
                    Some((s, n)) if captured(tables, &s, &n) => Some((s, n)),
                    Some(_) => {
                        report(
                            &t.referenced,
                            "events.outbox.table",
                            format!(
                                "{} is not captured: add it to source.tables so its inserts reach walbridge",
                                t.value
                            ),
                        );
                        ok = false;
                        None
                    }
                    None => {
                        report(
                            &t.referenced,
                            "events.outbox.table",
                            format!("expected \"schema.table\", got {:?}", t.value),
                        );
                        ok = false;
                        None
                    }
                },
            };
            let prefix = o.message_prefix.as_ref().map(|p| p.value.clone());
            if let (Some(p), Some(raw_p)) = (&prefix, &o.message_prefix)
                && (p.is_empty()
                    || p == crate::pipeline::HEARTBEAT_PREFIX
                    || p == crate::snapshot::SIGNAL_PREFIX)
            {
                report(
                    &raw_p.referenced,
                    "events.outbox.message_prefix",
                    format!(
                        "{p:?} is empty or one of walbridge's own prefixes; choose e.g. walbridge.outbox"
                    ),
                );
                ok = false;
            }
            if let Some(tp) = &o.topic_prefix
                && !topic_ok(&tp.value)
            {
                report(
                    &tp.referenced,
                    "events.outbox.topic_prefix",
                    "expected Kafka topic-name characters [a-zA-Z0-9._-]".into(),
                );
                ok = false;
            }
            if table.is_none() && prefix.is_none() && ok {
                report(
                    &raw.referenced,
                    "events.outbox",
                    "give table, message_prefix or both".into(),
                );
                ok = false;
            }
            Some(Outbox {
                table,
                message_prefix: prefix,
                topic_prefix: o.topic_prefix.as_ref().map(|t| t.value.clone()),
            })
        }
    };
    ok.then_some(EventsConfig {
        contracts_dir,
        max_transaction_bytes,
        contracts,
        mappings,
        outbox,
    })
}

fn fields_against(
    record: &Record,
    raw: &BTreeMap<String, S<String>>,
    path: &str,
    at: &Location,
    skip: &[&str],
    report: &mut Report<'_>,
) -> Option<Vec<(String, Expr)>> {
    let mut ok = true;
    let mut out = Vec::new();
    for (name, e) in raw {
        let p = format!("{path}.{name}");
        if record.field(name).is_none() {
            let valid: Vec<&str> = record
                .fields
                .iter()
                .map(|f| f.name.as_str())
                .filter(|f| !METADATA_FIELDS.contains(f) && !skip.contains(f))
                .collect();
            report(
                &e.referenced,
                &p,
                format!(
                    "{} has no field {name:?} (its fields: {})",
                    record.name,
                    valid.join(", ")
                ),
            );
            ok = false;
            continue;
        }
        match parse_expr(e, &p, report) {
            Some(x) => out.push((name.clone(), x)),
            None => ok = false,
        }
    }
    let missing: Vec<&str> = record
        .fields
        .iter()
        .filter(|f| {
            !matches!(f.shape, Shape::Nullable { .. })
                && !raw.contains_key(&f.name)
                && !skip.contains(&f.name.as_str())
        })
        .map(|f| f.name.as_str())
        .collect();
    if !missing.is_empty() {
        report(
            at,
            path,
            format!(
                "{} requires {} (not nullable), which the mapping does not set",
                record.name,
                missing.join(", ")
            ),
        );
        ok = false;
    }
    ok.then_some(out)
}

fn mapping(
    m: &RawMapping,
    path: &str,
    contracts: &[Arc<Contract>],
    tables: &[TableSelector],
    names: &mut HashSet<String>,
    report: &mut Report<'_>,
) -> Option<Mapping> {
    let mut ok = true;
    let name = m.name.value.clone();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        report(
            &m.name.referenced,
            &format!("{path}.name"),
            format!("expected [a-z0-9_]+, got {name:?}"),
        );
        ok = false;
    } else if !names.insert(name.clone()) {
        report(
            &m.name.referenced,
            &format!("{path}.name"),
            format!(
                "{name:?} is used by another mapping; names must be unique (they are part of event ids)"
            ),
        );
        ok = false;
    }
    let table = |t: &S<String>, p: &str, report: &mut Report<'_>| match qualified(&t.value) {
        Some((s, n)) if captured(tables, &s, &n) => Some((s, n)),
        Some(_) => {
            report(
                &t.referenced,
                p,
                format!("{} is not captured: add it to source.tables", t.value),
            );
            None
        }
        None => {
            report(
                &t.referenced,
                p,
                format!("expected \"schema.table\", got {:?}", t.value),
            );
            None
        }
    };
    let tab = table(&m.table, &format!("{path}.table"), report);
    let on = match m.on.value.as_str() {
        "insert" => Some(On::Insert),
        "update" => Some(On::Update),
        "delete" => Some(On::Delete),
        other => {
            report(
                &m.on.referenced,
                &format!("{path}.on"),
                format!("expected insert, update or delete, got {other:?}"),
            );
            None
        }
    };
    let contract = contracts
        .iter()
        .find(|c| c.name == m.event.value || c.full_name == m.event.value)
        .cloned();
    if contract.is_none() {
        let known: Vec<&str> = contracts.iter().map(|c| c.name.as_str()).collect();
        report(
            &m.event.referenced,
            &format!("{path}.event"),
            format!(
                "no contract named {:?} (known: {})",
                m.event.value,
                known.join(", ")
            ),
        );
    }
    let when = match &m.when {
        None => Some(None),
        Some(w) => parse_expr(w, &format!("{path}.when"), report).map(Some),
    };
    let key = parse_expr(&m.key, &format!("{path}.key"), report);
    if !topic_ok(&m.topic.value) {
        report(
            &m.topic.referenced,
            &format!("{path}.topic"),
            format!(
                "expected Kafka topic-name characters [a-zA-Z0-9._-], got {:?}",
                m.topic.value
            ),
        );
        ok = false;
    }
    let contract = contract?;
    let lines = match &m.lines {
        None => Some(None),
        Some(l) => {
            let lp = format!("{path}.lines");
            let l = &l.value;
            let item = match contract.root.field(&l.field.value).map(|f| &f.shape) {
                Some(Shape::Array(item)) => match item.as_ref() {
                    Shape::Record(r) => Some(r.clone()),
                    _ => None,
                },
                _ => None,
            };
            if item.is_none() {
                report(
                    &l.field.referenced,
                    &format!("{lp}.field"),
                    format!(
                        "{} has no array-of-records field {:?}",
                        contract.name, l.field.value
                    ),
                );
            }
            let t = table(&l.table, &format!("{lp}.table"), report);
            let pk = parse_expr(&l.parent_key, &format!("{lp}.parent_key"), report);
            let parent_id = match &l.parent_id {
                None => Some(None),
                Some(e) => parse_expr(e, &format!("{lp}.parent_id"), report).map(Some),
            };
            let fields = item.as_ref().and_then(|item| {
                fields_against(
                    item,
                    &l.fields,
                    &format!("{lp}.fields"),
                    &l.field.referenced,
                    &[],
                    report,
                )
            });
            match (item, t, pk, fields, parent_id) {
                (
                    Some(item),
                    Some((schema, table)),
                    Some(parent_key),
                    Some(fields),
                    Some(parent_id),
                ) => Some(Some(Lines {
                    field: l.field.value.clone(),
                    schema,
                    table,
                    parent_key,
                    parent_id,
                    fields,
                    item,
                })),
                _ => None,
            }
        }
    };
    let skip: Vec<&str> = m
        .lines
        .as_ref()
        .map(|l| l.value.field.value.as_str())
        .into_iter()
        .chain(METADATA_FIELDS)
        .collect();
    let fields = fields_against(
        &contract.root,
        &m.fields,
        &format!("{path}.fields"),
        &m.event.referenced,
        &skip,
        report,
    );
    // Metadata set in `fields` is refused above only without `lines`; check it here too.
    for meta in METADATA_FIELDS {
        if let Some(e) = m.fields.get(meta) {
            report(
                &e.referenced,
                &format!("{path}.fields.{meta}"),
                format!("{meta} is filled in by walbridge (event metadata); remove it"),
            );
            ok = false;
        }
    }
    let (Some((schema, table)), Some(on), Some(when), Some(key), Some(lines), Some(fields)) =
        (tab, on, when, key, lines, fields)
    else {
        return None;
    };
    if lines.is_some() && on != On::Insert {
        report(&m.on.referenced, &format!("{path}.on"), "lines: collects the child rows inserted together with the parent, so the mapping must be on: insert".into());
        return None;
    }
    ok.then_some(Mapping {
        name,
        path: path.to_owned(),
        schema,
        table,
        on,
        when,
        contract,
        key,
        topic: m.topic.value.clone(),
        fields,
        lines,
    })
}

#[cfg(test)]
mod tests {
    fn load(events: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/avro/contracts");
        let yaml = format!(
            "source:\n  dsn: \"host=h user=u dbname=d\"\n  publication: p\n  slot: s\n  tables: [oms.*, wms.*]\n\
             kafka:\n  brokers: \"127.0.0.1:9092\"\n  topic_prefix: t\n\
             registry:\n  url: \"http://127.0.0.1:8081\"\n\
             events:\n  contracts_dir: \"{dir}\"\n  mappings:\n{events}"
        );
        crate::config::from_str(&yaml, "p.yaml")
    }

    const OK: &str = "    - name: stock
      table: wms.stock_levels
      on: update
      when: \"new.on_hand <> old.on_hand\"
      event: StockAdjusted
      key: \"new.sku || '@' || new.location_code\"
      topic: retail.stock
      fields:
        sku: new.sku
        location_code: new.location_code
        delta: new.on_hand - old.on_hand
        reason: \"'adjustment'\"
        on_hand: new.on_hand
        previous_on_hand: old.on_hand
";

    #[test]
    fn a_valid_mapping_loads() {
        let c = load(OK).unwrap();
        let ev = c.events.unwrap();
        assert_eq!(ev.mappings[0].contract.name, "StockAdjusted");
        assert_eq!(ev.contracts.len(), 12);
    }

    #[test]
    fn errors_name_the_line_the_key_path_and_the_character() {
        let e = load(&OK.replace("new.on_hand - old.on_hand", "new.on_hand - * old.on_hand"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.yaml:24:") && e.contains(": events.mappings[0].fields.delta: cannot parse the expression \"new.on_hand - * old.on_hand\" at character 15: expected a value, found `*`"),
            "{e}"
        );
        let e = load(&OK.replace(
            "        reason: \"'adjustment'\"\n",
            "        reasn: \"'x'\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("StockAdjusted has no field \"reasn\""), "{e}");
        assert!(e.contains("requires reason (not nullable)"), "{e}");
        let e = load(&OK.replace("      table:", "      tabel:"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `tabel` — did you mean `table`?"),
            "{e}"
        );
        let e = load(&OK.replace("StockAdjusted", "StockMoved"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no contract named \"StockMoved\""), "{e}");
    }

    #[test]
    fn max_transaction_bytes_defaults_and_is_bounded() {
        let ev = load(OK).unwrap().events.unwrap();
        assert_eq!(
            ev.max_transaction_bytes,
            super::DEFAULT_MAX_TRANSACTION_BYTES
        );
        let with = |v: &str| {
            load(&format!("{OK}  max_transaction_bytes: {v}\n"))
                .map(|c| c.events.unwrap().max_transaction_bytes)
        };
        assert_eq!(with("1048576").unwrap(), 1 << 20);
        let e = with("10").unwrap_err().to_string();
        assert!(
            e.contains("events.max_transaction_bytes: 10 is outside 4096..="),
            "{e}"
        );
    }
}
