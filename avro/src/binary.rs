//! Avro binary encoding primitives (Avro 1.11 specification, "Binary Encoding").
//!
//! The encoder writes straight into the caller's buffer instead of building
//! `apache_avro::types::Value` trees: this runs once per column of every change, and the
//! tree would cost an allocation per value. apache-avro decodes our output in the tests, which
//! is what keeps these few functions honest.

/// `int` and `long`: zig-zag, then variable-length base-128, least significant group first.
#[inline]
pub(crate) fn put_long(out: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[inline]
pub(crate) fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(v as u8);
}

#[inline]
pub(crate) fn put_float(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[inline]
pub(crate) fn put_double(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// `bytes` and `string`: a `long` length, then the bytes.
#[inline]
pub(crate) fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    put_long(out, v.len() as i64);
    out.extend_from_slice(v);
}

/// Union values are the zero-based branch index as a `long`, then the value.
#[inline]
pub(crate) fn put_union_branch(out: &mut Vec<u8>, index: i64) {
    put_long(out, index);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_varints_match_the_spec_examples() {
        // The table in the Avro specification.
        for (v, want) in [
            (0i64, vec![0x00u8]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-2, vec![0x03]),
            (2, vec![0x04]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_long(&mut out, v);
            assert_eq!(out, want, "encoding of {v}");
        }
        let mut out = Vec::new();
        put_long(&mut out, i64::MIN);
        assert_eq!(out.len(), 10);
    }
}
