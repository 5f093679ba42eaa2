//! Avro schema compatibility, judged as Confluent's registry judges it: by Avro's schema
//! resolution rules (can a reader with schema R decode data written with schema W?), applied
//! in the directions a compatibility level asks for.
//!
//! ```text
//!   BACKWARD  new reads old     (consumers upgrade first)
//!   FORWARD   old reads new     (producers upgrade first)
//!   FULL      both
//!   *_TRANSITIVE  against every live version, not only the latest
//! ```
//!
//! # Why our own checker
//!
//! apache-avro 0.22 ships `schema_compatibility::SchemaCompatibility::can_read`, but it differs
//! from Avro's Java implementation, which Confluent uses, in ways a registry would expose:
//! a named type that one schema defines inline and the other refers to by name (`Schema::Ref`,
//! e.g. after fields are reordered) is reported as a type mismatch; decimals with a different
//! precision are rejected, while Java compares logical types by their underlying type; and a
//! missing enum symbol or union branch is only "partial", where Java says incompatible. Its
//! errors also do not say where in the schema the problem is. The rules here follow the Avro
//! specification's "Schema Resolution" section and Java's `SchemaCompatibility`:
//!
//! - Named types (record, enum, fixed) match when their unqualified names are equal or the
//!   reader lists the writer's name among its aliases.
//! - Records: every reader field must be found in the writer (by name, then by the reader
//!   field's aliases) with a compatible type, or have a default. Writer fields the reader lacks
//!   are skipped.
//! - Enums: every writer symbol must be in the reader, unless the reader has a default symbol.
//! - Fixed: sizes must be equal.
//! - Arrays and maps: their item and value types must be compatible.
//! - Unions: every writer branch must be readable by the reader; a non-union writer must be
//!   readable by some branch of a union reader.
//! - Promotions: int → long, float, double; long → float, double; float → double;
//!   string ↔ bytes.
//! - Logical types count as their underlying type (a decimal is bytes or fixed, a timestamp
//!   a long), as in Java.
//!
//! Recursive types are handled by assuming a pair of named types compatible while it is being
//! checked (the standard co-inductive argument: if no other mismatch shows up, none exists).

use std::collections::{HashMap, HashSet};
use std::fmt;

use apache_avro::Schema;
use apache_avro::schema::{
    EnumSchema, FixedSchema, InnerDecimalSchema, Name, RecordSchema, UuidSchema,
};

/// A subject's compatibility policy, as named in Confluent's `/config` API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompatibilityLevel {
    None,
    /// Confluent's default.
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl CompatibilityLevel {
    pub const ALL: [CompatibilityLevel; 7] = [
        CompatibilityLevel::None,
        CompatibilityLevel::Backward,
        CompatibilityLevel::BackwardTransitive,
        CompatibilityLevel::Forward,
        CompatibilityLevel::ForwardTransitive,
        CompatibilityLevel::Full,
        CompatibilityLevel::FullTransitive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CompatibilityLevel::None => "NONE",
            CompatibilityLevel::Backward => "BACKWARD",
            CompatibilityLevel::BackwardTransitive => "BACKWARD_TRANSITIVE",
            CompatibilityLevel::Forward => "FORWARD",
            CompatibilityLevel::ForwardTransitive => "FORWARD_TRANSITIVE",
            CompatibilityLevel::Full => "FULL",
            CompatibilityLevel::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Parses a level name, ignoring case (`"backward"` and `"BACKWARD"` both work).
    pub fn parse(name: &str) -> Option<CompatibilityLevel> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(name))
    }

    /// Whether a new schema is checked against every live version rather than the latest.
    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::FullTransitive
        )
    }

    /// Whether the new schema must read data written with the old one.
    fn new_reads_old(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Backward
                | CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }

    /// Whether the old schema must read data written with the new one.
    fn old_reads_new(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Forward
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of incompatibility, named as Avro's Java `SchemaIncompatibilityType` (and so as
/// Confluent's verbose answers) name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncompatibilityKind {
    NameMismatch,
    FixedSizeMismatch,
    MissingEnumSymbols,
    ReaderFieldMissingDefaultValue,
    TypeMismatch,
    MissingUnionBranch,
}

impl IncompatibilityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IncompatibilityKind::NameMismatch => "NAME_MISMATCH",
            IncompatibilityKind::FixedSizeMismatch => "FIXED_SIZE_MISMATCH",
            IncompatibilityKind::MissingEnumSymbols => "MISSING_ENUM_SYMBOLS",
            IncompatibilityKind::ReaderFieldMissingDefaultValue => {
                "READER_FIELD_MISSING_DEFAULT_VALUE"
            }
            IncompatibilityKind::TypeMismatch => "TYPE_MISMATCH",
            IncompatibilityKind::MissingUnionBranch => "MISSING_UNION_BRANCH",
        }
    }
}

/// One reason a reader cannot decode a writer's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    pub kind: IncompatibilityKind,
    /// Where in the reader schema, as a JSON pointer (`/fields/2/type`).
    pub path: String,
    /// The specifics: the field name, the missing symbols, the two types.
    pub detail: String,
}

impl Incompatibility {
    /// Confluent's description of this problem, with `reader` and `writer` named as the caller
    /// sees them ("new" and "old" for a BACKWARD check).
    pub fn describe(&self, reader: &str, writer: &str) -> String {
        let p = &self.path;
        match self.kind {
            IncompatibilityKind::NameMismatch => {
                format!("The name of the schema has changed (path '{p}')")
            }
            IncompatibilityKind::FixedSizeMismatch => format!(
                "The size of FIXED type field at path '{p}' in the {reader} schema does not \
                 match with the {writer} schema"
            ),
            IncompatibilityKind::MissingEnumSymbols => format!(
                "The {reader} schema is missing enum symbols '{}' at path '{p}' in the {writer} \
                 schema",
                self.detail
            ),
            IncompatibilityKind::ReaderFieldMissingDefaultValue => format!(
                "The field '{}' at path '{p}' in the {reader} schema has no default value and is \
                 missing in the {writer} schema",
                self.detail
            ),
            IncompatibilityKind::TypeMismatch => format!(
                "The type (path '{p}') of a field in the {reader} schema does not match with the \
                 {writer} schema"
            ),
            IncompatibilityKind::MissingUnionBranch => format!(
                "The {reader} schema is missing a type inside a union field at path '{p}' in the \
                 {writer} schema"
            ),
        }
    }
}

/// Why `reader` cannot decode data written with `writer`; empty when it can.
pub fn can_read(writer: &Schema, reader: &Schema) -> Vec<Incompatibility> {
    let mut c = Checker {
        writer_names: named_types(writer),
        reader_names: named_types(reader),
        in_progress: HashSet::new(),
        found: Vec::new(),
    };
    let mut path = String::new();
    c.check(writer, reader, &mut path);
    c.found
}

/// The problems that keep `new` from joining a subject whose version `old` is checked under
/// `level`: each with the direction it was found in (`true`: the new schema as reader).
pub fn check_pair(
    level: CompatibilityLevel,
    new: &Schema,
    old: &Schema,
) -> Vec<(bool, Incompatibility)> {
    let mut out = Vec::new();
    if level.new_reads_old() {
        out.extend(can_read(old, new).into_iter().map(|i| (true, i)));
    }
    if level.old_reads_new() {
        out.extend(can_read(new, old).into_iter().map(|i| (false, i)));
    }
    out
}

/// Every named type a schema defines, to follow `Schema::Ref`.
fn named_types(schema: &Schema) -> HashMap<&Name, &Schema> {
    fn walk<'s>(s: &'s Schema, out: &mut HashMap<&'s Name, &'s Schema>) {
        match s {
            Schema::Record(r) => {
                out.insert(&r.name, s);
                r.fields.iter().for_each(|f| walk(&f.schema, out));
            }
            Schema::Enum(EnumSchema { name, .. })
            | Schema::Fixed(FixedSchema { name, .. })
            | Schema::Duration(FixedSchema { name, .. })
            | Schema::Uuid(UuidSchema::Fixed(FixedSchema { name, .. })) => {
                out.insert(name, s);
            }
            Schema::Decimal(d) => {
                if let InnerDecimalSchema::Fixed(f) = &d.inner {
                    out.insert(&f.name, s);
                }
            }
            Schema::Array(a) => walk(&a.items, out),
            Schema::Map(m) => walk(&m.types, out),
            Schema::Union(u) => u.variants().iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = HashMap::new();
    walk(schema, &mut out);
    out
}

/// A schema reduced to its underlying Avro type.
enum Ty<'a> {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Array(&'a Schema),
    Map(&'a Schema),
    Union(&'a [Schema]),
    Record(&'a RecordSchema),
    Enum(&'a EnumSchema),
    Fixed(&'a FixedSchema),
    /// A reference to a type the schema does not define (cannot happen in a parsed schema).
    Unknown,
}

impl Ty<'_> {
    fn name(&self) -> &'static str {
        match self {
            Ty::Null => "NULL",
            Ty::Boolean => "BOOLEAN",
            Ty::Int => "INT",
            Ty::Long => "LONG",
            Ty::Float => "FLOAT",
            Ty::Double => "DOUBLE",
            Ty::Bytes => "BYTES",
            Ty::String => "STRING",
            Ty::Array(_) => "ARRAY",
            Ty::Map(_) => "MAP",
            Ty::Union(_) => "UNION",
            Ty::Record(_) => "RECORD",
            Ty::Enum(_) => "ENUM",
            Ty::Fixed(_) => "FIXED",
            Ty::Unknown => "UNKNOWN",
        }
    }
}

fn ty<'a>(schema: &'a Schema, names: &HashMap<&'a Name, &'a Schema>) -> Ty<'a> {
    match schema {
        Schema::Null => Ty::Null,
        Schema::Boolean => Ty::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Ty::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Ty::Long,
        Schema::Float => Ty::Float,
        Schema::Double => Ty::Double,
        Schema::Bytes | Schema::BigDecimal | Schema::Uuid(UuidSchema::Bytes) => Ty::Bytes,
        Schema::String | Schema::Uuid(UuidSchema::String) => Ty::String,
        Schema::Decimal(d) => match &d.inner {
            InnerDecimalSchema::Bytes => Ty::Bytes,
            InnerDecimalSchema::Fixed(f) => Ty::Fixed(f),
        },
        Schema::Uuid(UuidSchema::Fixed(f)) | Schema::Fixed(f) | Schema::Duration(f) => Ty::Fixed(f),
        Schema::Array(a) => Ty::Array(&a.items),
        Schema::Map(m) => Ty::Map(&m.types),
        Schema::Union(u) => Ty::Union(u.variants()),
        Schema::Record(r) => Ty::Record(r),
        Schema::Enum(e) => Ty::Enum(e),
        Schema::Ref { name } => match names.get(name) {
            // A Ref always points at a definition, never at another Ref.
            Some(def) if !matches!(def, Schema::Ref { .. }) => ty(def, names),
            _ => Ty::Unknown,
        },
    }
}

struct Checker<'a> {
    writer_names: HashMap<&'a Name, &'a Schema>,
    reader_names: HashMap<&'a Name, &'a Schema>,
    /// Pairs of named types (writer, reader) being checked further up the stack.
    in_progress: HashSet<(&'a Name, &'a Name)>,
    found: Vec<Incompatibility>,
}

impl<'a> Checker<'a> {
    fn report(&mut self, kind: IncompatibilityKind, path: &str, detail: String) {
        self.found.push(Incompatibility {
            kind,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.to_owned()
            },
            detail,
        });
    }

    /// Whether `reader` reads `writer`, without recording why not.
    fn reads(&mut self, writer: &'a Schema, reader: &'a Schema, path: &mut String) -> bool {
        let before = self.found.len();
        self.check(writer, reader, path);
        let ok = self.found.len() == before;
        self.found.truncate(before);
        ok
    }

    fn check(&mut self, writer: &'a Schema, reader: &'a Schema, path: &mut String) {
        let w = ty(writer, &self.writer_names);
        let r = ty(reader, &self.reader_names);
        match (&w, &r) {
            (Ty::Union(wb), Ty::Union(rb)) => {
                for (i, branch) in wb.iter().enumerate() {
                    let readable = rb.iter().any(|rb| self.reads(branch, rb, path));
                    if !readable {
                        let detail = format!(
                            "reader union lacking writer type: {}",
                            ty(branch, &self.writer_names).name()
                        );
                        let at = format!("{path}/{i}");
                        self.report(IncompatibilityKind::MissingUnionBranch, &at, detail);
                    }
                }
            }
            (Ty::Union(wb), _) => {
                for branch in wb.iter() {
                    self.check(branch, reader, path);
                }
            }
            (_, Ty::Union(rb)) => {
                if !rb.iter().any(|rb| self.reads(writer, rb, path)) {
                    let detail = format!("reader union lacking writer type: {}", w.name());
                    self.report(IncompatibilityKind::MissingUnionBranch, path, detail);
                }
            }
            (Ty::Null, Ty::Null)
            | (Ty::Boolean, Ty::Boolean)
            | (Ty::Int, Ty::Int | Ty::Long | Ty::Float | Ty::Double)
            | (Ty::Long, Ty::Long | Ty::Float | Ty::Double)
            | (Ty::Float, Ty::Float | Ty::Double)
            | (Ty::Double, Ty::Double)
            | (Ty::Bytes | Ty::String, Ty::Bytes | Ty::String) => {}
            (Ty::Array(wi), Ty::Array(ri)) => {
                let len = path.len();
                path.push_str("/items");
                self.check(wi, ri, path);
                path.truncate(len);
            }
            (Ty::Map(wv), Ty::Map(rv)) => {
                let len = path.len();
                path.push_str("/values");
                self.check(wv, rv, path);
                path.truncate(len);
            }
            (Ty::Fixed(wf), Ty::Fixed(rf)) => {
                if self.names_match(&wf.name, &rf.name, rf.aliases.as_deref(), path)
                    && wf.size != rf.size
                {
                    let at = format!("{path}/size");
                    let detail = format!("expected: {}, found: {}", wf.size, rf.size);
                    self.report(IncompatibilityKind::FixedSizeMismatch, &at, detail);
                }
            }
            (Ty::Enum(we), Ty::Enum(re)) => {
                if self.names_match(&we.name, &re.name, re.aliases.as_deref(), path)
                    && re.default.is_none()
                {
                    let missing: Vec<&str> = we
                        .symbols
                        .iter()
                        .filter(|s| !re.symbols.contains(s))
                        .map(String::as_str)
                        .collect();
                    if !missing.is_empty() {
                        let at = format!("{path}/symbols");
                        let detail = format!("[{}]", missing.join(", "));
                        self.report(IncompatibilityKind::MissingEnumSymbols, &at, detail);
                    }
                }
            }
            (Ty::Record(wr), Ty::Record(rr)) => {
                if !self.names_match(&wr.name, &rr.name, rr.aliases.as_deref(), path) {
                    return;
                }
                if !self.in_progress.insert((&wr.name, &rr.name)) {
                    return;
                }
                for (i, rf) in rr.fields.iter().enumerate() {
                    let wf = std::iter::once(&rf.name)
                        .chain(rf.aliases.iter())
                        .find_map(|n| wr.fields.iter().find(|wf| &wf.name == n));
                    let len = path.len();
                    match wf {
                        Some(wf) => {
                            path.push_str(&format!("/fields/{i}/type"));
                            self.check(&wf.schema, &rf.schema, path);
                        }
                        None if rf.default.is_none() => {
                            path.push_str(&format!("/fields/{i}"));
                            let detail = rf.name.clone();
                            self.report(
                                IncompatibilityKind::ReaderFieldMissingDefaultValue,
                                path,
                                detail,
                            );
                        }
                        None => {}
                    }
                    path.truncate(len);
                }
                self.in_progress.remove(&(&wr.name, &rr.name));
            }
            _ => {
                let detail = format!(
                    "reader type: {} not compatible with writer type: {}",
                    r.name(),
                    w.name()
                );
                self.report(IncompatibilityKind::TypeMismatch, path, detail);
            }
        }
    }

    /// Named types resolve when the unqualified names are equal or a reader alias names the
    /// writer; reports a mismatch otherwise.
    fn names_match(
        &mut self,
        writer: &Name,
        reader: &Name,
        reader_aliases: Option<&[apache_avro::schema::Alias]>,
        path: &str,
    ) -> bool {
        let aliased = reader_aliases.unwrap_or_default().iter().any(|a| {
            a.name() == writer.name()
                && a.namespace()
                    .is_none_or(|ns| Some(ns) == writer.namespace())
        });
        if writer.name() == reader.name() || aliased {
            return true;
        }
        let at = format!("{path}/name");
        let detail = format!("expected: {}", writer.fullname(None));
        self.report(IncompatibilityKind::NameMismatch, &at, detail);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Schema {
        Schema::parse_str(s).unwrap()
    }

    #[test]
    fn refs_resolve_to_their_definitions_wherever_they_are_defined() {
        // The writer defines Addr in `home` and refers to it in `work`; the reader has the
        // fields in the other order, so the definitions sit at different places.
        let writer = parse(
            r#"{"type":"record","name":"P","fields":[
                {"name":"home","type":{"type":"record","name":"Addr","fields":[{"name":"city","type":"string"}]}},
                {"name":"work","type":"Addr"}]}"#,
        );
        let reader = parse(
            r#"{"type":"record","name":"P","fields":[
                {"name":"work","type":{"type":"record","name":"Addr","fields":[{"name":"city","type":"string"}]}},
                {"name":"home","type":"Addr"}]}"#,
        );
        assert_eq!(can_read(&writer, &reader), vec![]);
        assert_eq!(can_read(&reader, &writer), vec![]);
    }

    #[test]
    fn recursive_types_terminate() {
        let list = r#"{"type":"record","name":"Node","fields":[
            {"name":"v","type":"int"},{"name":"next","type":["null","Node"],"default":null}]}"#;
        let wider = r#"{"type":"record","name":"Node","fields":[
            {"name":"v","type":"long"},{"name":"next","type":["null","Node"],"default":null}]}"#;
        assert!(can_read(&parse(list), &parse(wider)).is_empty());
        let found = can_read(&parse(wider), &parse(list));
        assert_eq!(found[0].kind, IncompatibilityKind::TypeMismatch);
        assert_eq!(found[0].path, "/fields/0/type");
    }

    #[test]
    fn logical_types_count_as_their_underlying_type() {
        let dec = |p: u32| {
            parse(&format!(
                r#"{{"type":"bytes","logicalType":"decimal","precision":{p},"scale":2}}"#
            ))
        };
        assert!(can_read(&dec(10), &dec(12)).is_empty());
        let ts = parse(r#"{"type":"long","logicalType":"timestamp-micros"}"#);
        assert!(can_read(&ts, &Schema::Long).is_empty());
        assert!(can_read(&parse(r#"{"type":"int","logicalType":"date"}"#), &ts).is_empty());
        assert!(!can_read(&ts, &Schema::Int).is_empty());
    }

    #[test]
    fn names_aliases_and_fixed_sizes() {
        let fixed = |name: &str, size: u32, aliases: &str| {
            parse(&format!(
                r#"{{"type":"fixed","name":"{name}","size":{size},"aliases":[{aliases}]}}"#
            ))
        };
        assert!(can_read(&fixed("a.F", 4, ""), &fixed("b.F", 4, "")).is_empty());
        assert_eq!(
            can_read(&fixed("F", 4, ""), &fixed("G", 4, ""))[0].kind,
            IncompatibilityKind::NameMismatch
        );
        assert!(can_read(&fixed("F", 4, ""), &fixed("G", 4, r#""F""#)).is_empty());
        assert_eq!(
            can_read(&fixed("F", 4, ""), &fixed("F", 8, ""))[0].kind,
            IncompatibilityKind::FixedSizeMismatch
        );
    }

    #[test]
    fn level_names_parse_ignoring_case() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(CompatibilityLevel::parse(level.as_str()), Some(level));
            let lower = level.as_str().to_ascii_lowercase();
            assert_eq!(CompatibilityLevel::parse(&lower), Some(level));
        }
        assert_eq!(CompatibilityLevel::parse("SIDEWAYS"), None);
    }
}
