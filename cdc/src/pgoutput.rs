//! Decoder for the `pgoutput` logical decoding plugin's messages (protocol versions 1 and 2).
//!
//! Each `XLogData` payload from the walsender holds exactly one message. Values are sliced out of
//! the payload (`Bytes`), never copied: the decoder runs on the replication read loop, so it does
//! no allocation per column beyond the `Vec` of values.
//!
//! Protocol 2 adds streamed in-progress transactions: between `StreamStart` and `StreamStop` every
//! data message carries the streamed transaction's xid before its own fields. The caller says
//! whether it is inside such a block (`in_stream`), since the bytes alone do not tell.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, the Postgres epoch.
pub type PgTimestamp = i64;

/// Microseconds between the Unix epoch and the Postgres epoch.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts a Postgres timestamp to milliseconds since the Unix epoch.
pub fn pg_ts_to_unix_ms(ts: PgTimestamp) -> i64 {
    (ts + PG_EPOCH_OFFSET_MICROS).div_euclid(1000)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin { lsn: Lsn, name: String },
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart { xid: u32, first_segment: bool },
    StreamStop,
    StreamCommit { xid: u32, commit: Commit },
    StreamAbort { xid: u32, subxid: u32 },
}

impl Message {
    /// The (sub)transaction xid a data message carries inside a stream block (protocol 2).
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Insert(m) => m.xid,
            Message::Update(m) => m.xid,
            Message::Delete(m) => m.xid,
            Message::Truncate(m) => m.xid,
            Message::Message(m) => m.xid,
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the LSN to confirm once everything in the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_ts: PgTimestamp,
}

/// `relreplident`: what an UPDATE/DELETE carries of the old row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// Primary key columns only (`d`).
    Default,
    /// Nothing (`n`).
    Nothing,
    /// Every column (`f`).
    Full,
    /// The columns of a chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Result<Self, DecodeError> {
        Ok(match b {
            b'd' => Self::Default,
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            other => {
                return Err(DecodeError::Invalid(format!(
                    "replica identity byte {other:#x}"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`: e.g. numeric precision/scale, varchar length; -1 when none.
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TypeInfo {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// One column of a row as pgoutput sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value that the UPDATE did not change; pgoutput does not send it again.
    UnchangedToast,
    /// Text output of the type (the default, `binary` option off).
    Text(Bytes),
    Binary(Bytes),
}

impl Value {
    /// The text form as UTF-8, if this is a text value. Postgres sends text output in the
    /// database encoding; walbridge requires UTF-8 databases (checked at start).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

pub type Tuple = Vec<Value>;

/// What an UPDATE or DELETE says of the old row.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity key columns are set; the others are `Null`.
    Key(Tuple),
    /// The whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_id: u32,
    /// Present when the key changed or the table has REPLICA IDENTITY FULL.
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    pub xid: Option<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("pgoutput message truncated: needed {needed} more byte(s) while reading {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown pgoutput message tag {tag:#04x} ({ch:?})", tag = .0, ch = *.0 as char)]
    UnknownTag(u8),
    #[error("invalid pgoutput message: {0}")]
    Invalid(String),
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.remaining(),
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_i16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.u64(what).map(Lsn)
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    /// A NUL-terminated string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what, needed: 1 })?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec())
            .map_err(|_| DecodeError::Invalid(format!("{what} is not valid UTF-8")))
    }
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        let n = usize::try_from(n)
            .map_err(|_| DecodeError::Invalid(format!("negative column count {n}")))?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match self.u8("tuple value kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("tuple value length")?;
                    let len = usize::try_from(len).map_err(|_| {
                        DecodeError::Invalid(format!("negative value length {len}"))
                    })?;
                    let data = self.bytes(len, "tuple value")?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => {
                    return Err(DecodeError::Invalid(format!(
                        "tuple value kind {other:#04x}"
                    )));
                }
            };
            values.push(v);
        }
        Ok(values)
    }
    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32("streamed transaction xid").map(Some)
        } else {
            Ok(None)
        }
    }
    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        let got = self.u8(what)?;
        if got != want {
            return Err(DecodeError::Invalid(format!(
                "expected {:?} before {what}, got {:?}",
                want as char, got as char
            )));
        }
        Ok(())
    }
}

/// Decodes one pgoutput message. `in_stream` is true between `StreamStart` and `StreamStop`.
pub fn decode(buf: Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("message tag")?;
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("begin final LSN")?,
            commit_ts: r.i64("begin timestamp")?,
            xid: r.u32("begin xid")?,
        }),
        b'C' => Message::Commit(commit_body(&mut r)?),
        b'O' => Message::Origin {
            lsn: r.lsn("origin LSN")?,
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let _xid = r.stream_xid(in_stream)?;
            let id = r.u32("relation id")?;
            let namespace = r.cstr("relation namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = ReplicaIdentity::from_byte(r.u8("replica identity")?)?;
            let ncols = r.i16("relation column count")?;
            let mut columns = Vec::with_capacity(ncols.max(0) as usize);
            for _ in 0..ncols {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("column type oid")?,
                    type_modifier: r.i32("column type modifier")?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => {
            let _xid = r.stream_xid(in_stream)?;
            Message::Type(TypeInfo {
                oid: r.u32("type oid")?,
                namespace: r.cstr("type namespace")?,
                name: r.cstr("type name")?,
            })
        }
        b'I' => {
            let xid = r.stream_xid(in_stream)?;
            let relation_id = r.u32("insert relation id")?;
            r.expect(b'N', "insert tuple")?;
            Message::Insert(Insert {
                xid,
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = r.stream_xid(in_stream)?;
            let relation_id = r.u32("update relation id")?;
            let old = match r.u8("update tuple kind")? {
                b'K' => {
                    let t = r.tuple()?;
                    r.expect(b'N', "update new tuple")?;
                    Some(OldTuple::Key(t))
                }
                b'O' => {
                    let t = r.tuple()?;
                    r.expect(b'N', "update new tuple")?;
                    Some(OldTuple::Full(t))
                }
                b'N' => None,
                other => {
                    return Err(DecodeError::Invalid(format!(
                        "update tuple kind {:?}",
                        other as char
                    )));
                }
            };
            Message::Update(Update {
                xid,
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = r.stream_xid(in_stream)?;
            let relation_id = r.u32("delete relation id")?;
            let old = match r.u8("delete tuple kind")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => {
                    return Err(DecodeError::Invalid(format!(
                        "delete tuple kind {:?}",
                        other as char
                    )));
                }
            };
            Message::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        }
        b'T' => {
            let xid = r.stream_xid(in_stream)?;
            let n = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relation_ids = Vec::with_capacity(n.min(4096) as usize);
            for _ in 0..n {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            Message::Truncate(Truncate {
                xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            })
        }
        b'M' => {
            let xid = r.stream_xid(in_stream)?;
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstr("message prefix")?;
            let len = r.u32("message length")? as usize;
            let content = r.bytes(len, "message content")?;
            Message::Message(LogicalMessage {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            })
        }
        b'S' => Message::StreamStart {
            xid: r.u32("stream start xid")?,
            first_segment: r.u8("stream start flag")? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => {
            let xid = r.u32("stream commit xid")?;
            Message::StreamCommit {
                xid,
                commit: commit_body(&mut r)?,
            }
        }
        b'A' => Message::StreamAbort {
            xid: r.u32("stream abort xid")?,
            subxid: r.u32("stream abort subxid")?,
        },
        other => return Err(DecodeError::UnknownTag(other)),
    };
    Ok(msg)
}

fn commit_body(r: &mut Reader) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: r.u8("commit flags")?,
        commit_lsn: r.lsn("commit LSN")?,
        end_lsn: r.lsn("commit end LSN")?,
        commit_ts: r.i64("commit timestamp")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    #[test]
    fn decodes_relation_and_update_with_old_key() {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        cstr(&mut b, "oms");
        cstr(&mut b, "orders");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        cstr(&mut b, "id");
        b.put_u32(20);
        b.put_i32(-1);
        b.put_u8(0);
        cstr(&mut b, "status");
        b.put_u32(25);
        b.put_i32(-1);
        let Message::Relation(rel) = decode(b.freeze(), false).unwrap() else {
            panic!()
        };
        assert_eq!(rel.namespace, "oms");
        assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
        assert!(rel.columns[0].key && !rel.columns[1].key);

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'K');
        b.put_i16(2);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_slice(b"7");
        b.put_u8(b'n');
        b.put_u8(b'N');
        b.put_i16(2);
        b.put_u8(b't');
        b.put_i32(1);
        b.put_slice(b"8");
        b.put_u8(b'u');
        let Message::Update(u) = decode(b.freeze(), false).unwrap() else {
            panic!()
        };
        assert_eq!(
            u.old,
            Some(OldTuple::Key(vec![
                Value::Text(Bytes::from_static(b"7")),
                Value::Null
            ]))
        );
        assert_eq!(u.new[1], Value::UnchangedToast);
        assert_eq!(u.new[0].as_str(), Some("8"));
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors_not_panics() {
        let full = {
            let mut b = BytesMut::new();
            b.put_u8(b'C');
            b.put_u8(0);
            b.put_u64(1);
            b.put_u64(2);
            b.put_i64(3);
            b.freeze()
        };
        assert!(matches!(
            decode(full.clone(), false),
            Ok(Message::Commit(_))
        ));
        // Every strict prefix of a valid message must fail cleanly.
        for n in 0..full.len() {
            assert!(
                decode(full.slice(..n), false).is_err(),
                "prefix of {n} bytes decoded"
            );
        }
        assert_eq!(
            decode(Bytes::from_static(b"Z"), false),
            Err(DecodeError::UnknownTag(b'Z'))
        );
    }

    #[test]
    fn streamed_insert_carries_xid() {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(42);
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(0);
        let Message::Insert(i) = decode(b.freeze(), true).unwrap() else {
            panic!()
        };
        assert_eq!((i.xid, i.relation_id), (Some(42), 16384));
    }

    #[test]
    fn timestamps_convert_to_unix_millis() {
        assert_eq!(pg_ts_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_ts_to_unix_ms(-1), 946_684_799_999);
    }
}
