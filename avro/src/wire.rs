//! Confluent wire format: every Kafka key or value is `0x00`, the schema id as a big-endian
//! `u32`, then the raw Avro datum. Consumers use the id to fetch the writer schema.

/// First byte of a framed message.
pub const MAGIC: u8 = 0;

/// Header length: magic byte and schema id.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "message of {len} byte(s) is too short for the Confluent wire format (needs at least 5: \
         magic byte and schema id)"
    )]
    TooShort { len: usize },
    #[error(
        "message starts with byte {found:#04x}, not the Confluent magic byte 0x00; it was not \
         written with a schema registry serializer"
    )]
    BadMagic { found: u8 },
}

/// Appends the framed datum to `out`.
pub fn frame(schema_id: u32, datum: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + datum.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
}

/// Splits a framed message into its schema id and datum.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), WireError> {
    match bytes {
        [MAGIC, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [found, _, _, _, _, ..] => Err(WireError::BadMagic { found: *found }),
        _ => Err(WireError::TooShort { len: bytes.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_then_unframe_round_trips() {
        let mut out = vec![0xaa]; // frame appends
        frame(0x0102_0304, b"datum", &mut out);
        assert_eq!(out, [0xaa, 0, 1, 2, 3, 4, b'd', b'a', b't', b'u', b'm']);
        assert_eq!(unframe(&out[1..]), Ok((0x0102_0304, &b"datum"[..])));
        assert_eq!(unframe(&[0, 0, 0, 0, 7]), Ok((7, &[][..])));
    }

    #[test]
    fn rejects_short_and_foreign_messages() {
        assert_eq!(unframe(&[0, 0, 0, 1]), Err(WireError::TooShort { len: 4 }));
        assert_eq!(
            unframe(b"{\"json\":1}"),
            Err(WireError::BadMagic { found: b'{' })
        );
    }
}
