//! `walbridge contracts check -c pipelines.yaml`: what CI runs before a deploy.
//!
//! 1. Every mapping produces records valid under its contract: every expression types against
//!    the table's column types (read from the source catalog), each field's type fits the
//!    contract's field type, nothing that may be null goes into a non-nullable field, `when`
//!    is a condition, `old.*` is not read on insert nor `new.*` on delete. (Field coverage is
//!    checked when the config loads.)
//! 2. Every contract is compatible with what the registry already holds for its subject
//!    (`<topic>-<record full name>`), asked through the Confluent REST API
//!    (`POST /compatibility/subjects/{subject}/versions/latest`), so the registry's own level
//!    (BACKWARD by default) decides, as it will when walbridge registers the contract.
//!
//! Every problem is reported (not just the first), each naming the mapping's key path.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use avro::contract::{Record, Shape};

use super::config::{EventsConfig, On};
use super::expr::{Expr, Side, Ty, Typed, ty_of_pg};
use crate::config::Config;

/// One finding of the check.
#[derive(Debug, Clone)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
    pub message: String,
}

/// Column name → ((type, nullable), Postgres type name) of one table.
type Columns = HashMap<String, (Typed, String)>;

async fn columns(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> anyhow::Result<Option<Columns>> {
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, t.typtype::text, a.attnotnull \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await
        .with_context(|| format!("reading the columns of {schema}.{table}"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .map(|r| {
                let typname: String = r.get(1);
                let notnull: bool = r.get(3);
                (
                    r.get::<_, String>(0),
                    (
                        Typed {
                            ty: ty_of_pg(&typname),
                            nullable: !notnull,
                        },
                        typname,
                    ),
                )
            })
            .collect(),
    ))
}

/// Whether a value of `t` fits `shape`; the reason when not.
fn fits(shape: &Shape, t: Typed) -> Result<(), String> {
    if let Shape::Nullable { inner, .. } = shape {
        return if t.ty == Ty::Null {
            Ok(())
        } else {
            fits(
                inner,
                Typed {
                    nullable: false,
                    ..t
                },
            )
        };
    }
    if t.nullable || t.ty == Ty::Null {
        return Err(format!(
            "may be null but the contract's {shape} is not nullable; use coalesce(…, <default>) or make the field [\"null\", …] in the contract"
        ));
    }
    let ok = match shape {
        Shape::Int | Shape::Long => t.ty == Ty::Int,
        Shape::Float | Shape::Double => matches!(t.ty, Ty::Int | Ty::Float | Ty::Dec),
        Shape::Decimal { .. } => matches!(t.ty, Ty::Int | Ty::Dec),
        Shape::String | Shape::Uuid | Shape::Enum { .. } | Shape::Bytes => t.ty == Ty::Str,
        Shape::Boolean => t.ty == Ty::Bool,
        Shape::TimestampMillis | Shape::TimestampMicros => t.ty == Ty::Ts,
        Shape::Date => t.ty == Ty::Date,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let hint = match (shape, t.ty) {
            (Shape::String | Shape::Uuid, _) => " (cast with ::string)",
            (Shape::Int | Shape::Long, Ty::Dec | Ty::Float | Ty::Str) => " (cast with ::long)",
            (Shape::Decimal { .. }, Ty::Str) => " (cast with ::decimal)",
            _ => "",
        };
        Err(format!(
            "is a {} but the contract wants {shape}{hint}",
            t.ty
        ))
    }
}

fn typer<'a>(
    cols: &'a Columns,
    on: On,
    table: &'a str,
) -> impl Fn(Side, &str) -> Result<Typed, String> + 'a {
    move |side, name| {
        if side == Side::Old && on == On::Insert {
            return Err(format!(
                "old.{name} is read on insert, where there is no old row"
            ));
        }
        if side == Side::New && on == On::Delete {
            return Err(format!(
                "new.{name} is read on delete, where there is no new row"
            ));
        }
        cols.get(name)
            .map(|c| c.0)
            .ok_or_else(|| format!("{table} has no column {name:?}"))
    }
}

/// Why an integer expression may not fit Avro's 32-bit `int`, typed as Postgres types it
/// (int2/int4 columns, and arithmetic on them, are 32-bit; an int8 column, a 64-bit literal or
/// a cast to long are not). `None` when it fits.
fn wider_than_int(e: &Expr, typname: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    use super::expr::{Func, Val};
    match e {
        Expr::Lit(Val::Int(n)) if i32::try_from(*n).is_err() => {
            Some(format!("the literal {n} is outside int"))
        }
        Expr::Lit(_) | Expr::Not(_) | Expr::IsNull(..) | Expr::In(..) => None,
        Expr::Col { side, name, .. } => match typname(name).as_deref() {
            Some("int8") => Some(format!(
                "{}.{name} is a bigint (int8)",
                if *side == Side::Old { "old" } else { "new" }
            )),
            _ => None,
        },
        Expr::Neg(x) => wider_than_int(x, typname),
        Expr::Bin(_, a, b) => wider_than_int(a, typname).or_else(|| wider_than_int(b, typname)),
        Expr::Call(Func::If, args) => args.iter().skip(1).find_map(|a| wider_than_int(a, typname)),
        Expr::Call(_, args) => args.iter().find_map(|a| wider_than_int(a, typname)),
        Expr::Cast(x, Ty::Int) => match x.as_ref() {
            // A cast keeps an integer's width; of anything else (numeric, text) it may be wide.
            Expr::Lit(Val::Int(_)) => wider_than_int(x, typname),
            Expr::Col { name, .. }
                if matches!(typname(name).as_deref(), Some("int2" | "int4" | "int8")) =>
            {
                wider_than_int(x, typname)
            }
            _ => Some("a cast to long may be outside int".to_owned()),
        },
        Expr::Cast(..) => None,
    }
}

fn check_fields(
    record: &Record,
    fields: &[(String, Expr)],
    cols: &Columns,
    col: &dyn Fn(Side, &str) -> Result<Typed, String>,
    path: &str,
    problems: &mut Vec<String>,
) {
    let typname = |name: &str| cols.get(name).map(|c| c.1.clone());
    for (f, e) in fields {
        let Some(field) = record.field(f) else {
            continue;
        };
        match e.infer(col).and_then(|t| fits(&field.shape, t)) {
            Ok(()) => {}
            Err(m) => {
                problems.push(format!("{path}.{f}: {m}"));
                continue;
            }
        }
        // Both are Ty::Int; a value past 32 bits would be refused at runtime (a dead letter).
        let shape = match &field.shape {
            Shape::Nullable { inner, .. } => inner.as_ref(),
            s => s,
        };
        if *shape == Shape::Int
            && let Some(why) = wider_than_int(e, &typname)
        {
            problems.push(format!(
                "{path}.{f}: narrowing: {why}, but the contract's field is a 32-bit int; values past \
                 ±2147483647 would be dead letters. Make the field long in the contract (int → long is a \
                 compatible promotion), or map a 32-bit column"
            ));
        }
    }
}

/// Type-checks every mapping against the source catalog.
pub async fn check_mappings(
    client: &tokio_postgres::Client,
    ev: &EventsConfig,
) -> anyhow::Result<Vec<Finding>> {
    let mut out = Vec::new();
    let mut cache: HashMap<String, Option<Columns>> = HashMap::new();
    for m in &ev.mappings {
        let mut problems = Vec::new();
        let mut tables = vec![(m.schema.clone(), m.table.clone())];
        if let Some(l) = &m.lines {
            tables.push((l.schema.clone(), l.table.clone()));
        }
        for (s, t) in &tables {
            let q = format!("{s}.{t}");
            if !cache.contains_key(&q) {
                cache.insert(q.clone(), columns(client, s, t).await?);
            }
        }
        let q = format!("{}.{}", m.schema, m.table);
        match &cache[&q] {
            None => problems.push(format!(
                "{}.table: {q} does not exist in the source",
                m.path
            )),
            Some(cols) => {
                let col = typer(cols, m.on, &q);
                if let Some(w) = &m.when {
                    match w.infer(&col) {
                        Ok(t) if matches!(t.ty, Ty::Bool | Ty::Null) => {}
                        Ok(t) => problems.push(format!(
                            "{}.when: is a {} but must be a condition (true/false)",
                            m.path, t.ty
                        )),
                        Err(e) => problems.push(format!("{}.when: {e}", m.path)),
                    }
                }
                match m.key.infer(&col) {
                    Ok(t) if t.ty == Ty::Null => {
                        problems.push(format!("{}.key: is always null", m.path))
                    }
                    Ok(_) => {}
                    Err(e) => problems.push(format!("{}.key: {e}", m.path)),
                }
                check_fields(
                    &m.contract.root,
                    &m.fields,
                    cols,
                    &col,
                    &format!("{}.fields", m.path),
                    &mut problems,
                );
            }
        }
        if let Some(l) = &m.lines {
            let lq = format!("{}.{}", l.schema, l.table);
            match &cache[&lq] {
                None => problems.push(format!(
                    "{}.lines.table: {lq} does not exist in the source",
                    m.path
                )),
                Some(cols) => {
                    let col = typer(cols, On::Insert, &lq);
                    if let Err(e) = l.parent_key.infer(&col) {
                        problems.push(format!("{}.lines.parent_key: {e}", m.path));
                    }
                    check_fields(
                        &l.item,
                        &l.fields,
                        cols,
                        &col,
                        &format!("{}.lines.fields", m.path),
                        &mut problems,
                    );
                }
            }
        }
        let what = format!(
            "mapping {} ({}) → {} on {}",
            m.name, m.path, m.contract.name, m.topic
        );
        if problems.is_empty() {
            out.push(Finding {
                ok: true,
                what: what.clone(),
                message: "every field types against the contract".into(),
            });
        }
        for p in problems {
            out.push(Finding {
                ok: false,
                what: what.clone(),
                message: p,
            });
        }
    }
    Ok(out)
}

/// Asks the registry whether each (topic, contract) may be registered.
pub async fn check_registry(cfg: &Config, ev: &EventsConfig) -> anyhow::Result<Vec<Finding>> {
    let pairs: BTreeSet<(String, String)> = ev
        .mappings
        .iter()
        .map(|m| (m.topic.clone(), m.contract.name.clone()))
        .collect();
    let mut out = Vec::new();
    for (topic, name) in pairs {
        let Some(c) = ev.contract(&name) else {
            continue;
        };
        let subject = format!("{topic}-{}", c.full_name);
        let what = format!("contract {} ({}) as {subject}", c.name, c.path.display());
        match crate::contract::compatibility(cfg.registry.url.as_str(), &subject, &c.schema_json)
            .await?
        {
            None => out.push(Finding {
                ok: true,
                what,
                message: "no version registered yet; it will be version 1".into(),
            }),
            Some(messages) if messages.is_empty() => out.push(Finding {
                ok: true,
                what,
                message: "compatible with the registered versions".into(),
            }),
            Some(messages) => out.push(Finding {
                ok: false,
                what,
                message: format!(
                    "incompatible with the registered versions: {}. Make the change compatible (add fields with a default, don't change types or remove required fields), or publish it as a new contract version (e.g. namespace walbridge.retail.v2)",
                    messages.join("; ")
                ),
            }),
        }
    }
    Ok(out)
}

/// The whole check; prints the findings and returns whether everything passed.
pub async fn run(cfg: &Config, with_db: bool, with_registry: bool) -> anyhow::Result<bool> {
    let Some(ev) = &cfg.events else {
        anyhow::bail!("the config has no events: section, so there is nothing to check");
    };
    let mut findings = Vec::new();
    if with_db {
        let (client, conn) = cfg
            .source
            .pg_config()
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| {
                let hint = crate::pipeline::source_hint(&e);
                anyhow::Error::new(e).context(format!(
                    "connecting to the source {} to read column types ({hint}; --no-db skips this part)",
                    cfg.source.dsn.redacted()
                ))
            })?;
        tokio::spawn(conn);
        findings.extend(check_mappings(&client, ev).await?);
    }
    if with_registry {
        findings.extend(
            check_registry(cfg, ev).await.context(
                "asking the registry about the contracts (--no-registry skips this part)",
            )?,
        );
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    for f in &findings {
        println!(
            "{} {}: {}",
            if f.ok { "OK  " } else { "FAIL" },
            f.what,
            f.message
        );
    }
    println!(
        "{} mapping(s), {} contract(s): {}",
        ev.mappings.len(),
        ev.contracts.len(),
        if failed == 0 {
            "all checks passed".to_owned()
        } else {
            format!("{failed} problem(s)")
        }
    );
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::expr::parse;

    #[test]
    fn integers_wider_than_32_bits_are_named() {
        let types = |name: &str| {
            Some(
                match name {
                    "big" => "int8",
                    "small" => "int2",
                    "n" => "numeric",
                    _ => "int4",
                }
                .to_owned(),
            )
        };
        let wide = |src: &str| wider_than_int(&parse(src).unwrap(), &types);
        assert_eq!(
            wide("new.big").as_deref(),
            Some("new.big is a bigint (int8)")
        );
        assert_eq!(wide("old.qty - new.small"), None);
        assert_eq!(wide("coalesce(new.qty, new.small, 0)"), None);
        assert!(wide("new.qty + new.big").is_some());
        assert!(wide("new.n::long").is_some());
        assert_eq!(wide("new.qty::long"), None);
        assert!(wide("3000000000").is_some());
        assert_eq!(wide("-5"), None);
    }
}
