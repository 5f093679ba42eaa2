//! Replaying a dead-lettered business event (`walbridge dlq replay`, see [`crate::dlq`]).
//!
//! A business event is dead-lettered when its mapping fails on the rows (a null key, an
//! expression error), when the record violates its contract, or when an outbox write is
//! malformed or off-contract. The letter keeps what the event was built from, as Postgres sent
//! it: the triggering rows (`before`/`after`), the `lines:` child rows of the transaction, or
//! the outbox row / message, plus the mapping's name and the change's index
//! ([`EventOrigin`]). After a fix (the mapping corrected in `pipelines.yaml`, or the contract
//! in the contracts dir), replay feeds those rows through the *current* config exactly as the
//! pipeline would have at the commit (one [`Engine`] holding only that mapping, its tables
//! bound to their current catalog shape), so:
//!
//! - the event id is rebuilt from the same parts (`<commit LSN>:<index>:<mapping>`, or the
//!   outbox id), and is checked against the letter's: a replayed event is the event that
//!   should have been sent, and consumers dedupe by its id;
//! - `occurred_at`, `source`, and the correlation/causation/trace headers come from the
//!   original commit, not from the replay;
//! - if the current config still cannot build a valid event, the reason is returned and the
//!   letter stays.
//!
//! The caller ([`crate::dlq::replay`]) produces the event and writes the replay marker only
//! after Kafka acked it, which makes a second replay send nothing.

use std::sync::Arc;

use cdc::pgoutput::Relation;

use super::{Built, Engine, EventsConfig, On, send};
use crate::dlq::{EventOrigin, Letter, Row};
use crate::emit::{EventMeta, Out};

/// Builds and sends the event of `l` under the current `cfg`; `Err` says why it is still a
/// dead letter.
pub async fn replay(
    cfg: Option<&Arc<EventsConfig>>,
    meta: &tokio_postgres::Client,
    registry_url: &str,
    out: &Out,
    l: &Letter,
    origin: &EventOrigin,
    m: &EventMeta<'_>,
) -> Result<(), String> {
    let cfg = cfg.ok_or(
        "the config has no events: section any more; restore it (or the mapping) to replay business events",
    )?;
    let mapping = match &origin.mapping {
        None => None,
        Some(name) => Some(
            cfg.mappings
                .iter()
                .position(|x| &x.name == name)
                .ok_or_else(|| {
                    format!(
                        "mapping {name} is no longer in events.mappings; restore it under the same name \
                         (the name is part of the event id) to replay its events"
                    )
                })?,
        ),
    };
    let mut e = Engine::offline(cfg.clone(), mapping, registry_url, out, &out.db)
        .map_err(|e| format!("{e:#}"))?;
    let on = match l.op.as_str() {
        "c" | "r" => On::Insert,
        "u" => On::Update,
        "d" => On::Delete,
        _ => On::Insert,
    };
    let bound = |e: anyhow::Error| format!("the current mapping does not fit the table: {e:#}");
    match mapping {
        Some(mi) => {
            let rel = relation(meta, &l.schema, &l.table).await?;
            e.relation(&rel).map_err(bound)?;
            let old = tuple(l.before.as_ref(), &rel)?;
            let new = tuple(l.after.as_ref(), &rel)?;
            e.change(rel.id, on, old.as_ref(), new.as_ref(), origin.index)
                .map_err(|e| format!("{e:#}"))?;
            if let (Some(lt), Some(lines)) = (&origin.lines_table, &cfg.mappings[mi].lines) {
                if *lt != format!("{}.{}", lines.schema, lines.table) {
                    return Err(format!(
                        "the mapping's lines now come from {}.{}, but the letter holds rows of {lt}",
                        lines.schema, lines.table
                    ));
                }
                let child = relation(meta, &lines.schema, &lines.table).await?;
                e.relation(&child).map_err(bound)?;
                for row in &origin.lines {
                    let t = tuple(Some(row), &child)?;
                    e.change(child.id, On::Insert, None, t.as_ref(), origin.index)
                        .map_err(|e| format!("{e:#}"))?;
                }
            }
        }
        None => {
            let ob = cfg.outbox.as_ref().ok_or(
                "events.outbox is no longer configured; restore it to replay outbox events",
            )?;
            if l.table.is_empty() {
                let prefix = ob.message_prefix.as_deref().ok_or(
                    "events.outbox.message_prefix is no longer set; restore it to replay outbox messages",
                )?;
                let content = l
                    .after
                    .as_ref()
                    .and_then(|r| r.values.iter().find(|(k, _)| k == "content"))
                    .and_then(|(_, v)| v.clone())
                    .ok_or("the stored outbox message has no content")?;
                e.message(prefix, content.as_bytes(), origin.index)
                    .map_err(|e| format!("{e:#}"))?;
            } else {
                let rel = relation(meta, &l.schema, &l.table).await?;
                e.relation(&rel).map_err(bound)?;
                if !e.is_outbox(rel.id) {
                    return Err(format!(
                        "{}.{} is no longer events.outbox.table; restore it to replay its events",
                        l.schema, l.table
                    ));
                }
                let new = tuple(l.after.as_ref(), &rel)?;
                e.change(rel.id, On::Insert, None, new.as_ref(), origin.index)
                    .map_err(|e| format!("{e:#}"))?;
            }
        }
    }
    let mut pending = std::mem::take(&mut e.pending);
    if pending.len() != 1 {
        return Err(
            "under the current mapping these rows no longer make this event (its `on` or `when` no longer \
             matches them); the letter stays: restore the condition to replay it"
                .into(),
        );
    }
    e.open.clear();
    let built = e
        .build(out, m, pending.remove(0))
        .await
        .map_err(|e| format!("{e:#}"))?;
    match &built {
        Built::Letter { letter, .. } => {
            return Err(format!("still invalid: {}", letter.reason.message));
        }
        Built::Event { event_id, .. } if *event_id != l.event_id => {
            return Err(format!(
                "the current config builds it with event id {event_id}, not {}; replaying it would \
                 make a different event",
                l.event_id
            ));
        }
        Built::Event { .. } => {}
    }
    send(out, m, built).await.map_err(|e| format!("{e:#}"))
}

async fn relation(
    meta: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> Result<Relation, String> {
    cdc::snapshot::catalog_relation(meta, schema, table)
        .await
        .map(|(rel, _)| rel)
        .map_err(|e| format!("reading {schema}.{table} from the source catalog: {e}"))
}

fn tuple(row: Option<&Row>, rel: &Relation) -> Result<Option<cdc::pgoutput::Tuple>, String> {
    row.map(|r| r.tuple(rel))
        .transpose()
        .map_err(|e| format!("the stored rows are damaged: {e:#}"))
}
