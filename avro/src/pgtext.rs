//! Parsers for Postgres text output, as pgoutput sends column values when `binary` is off.
//!
//! They read exactly what the server's output functions write under the settings the cdc
//! replication connection uses (`DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`), and accept
//! the other forms Postgres may produce under those settings (time zone offsets with minutes or
//! seconds, BC years, years past 9999, `bytea` escape format). Anything else is an error that says
//! what was expected and how long the text was — never the text itself, which may be personal data.
//!
//! Numbers are parsed as digit strings, never through `f64`, so `numeric` keeps every digit.

use std::borrow::Cow;

use crate::schema::EncodeReason;

/// Microseconds per day.
const DAY_MICROS: i64 = 86_400_000_000;

fn malformed(expected: &'static str, text: &[u8]) -> EncodeReason {
    EncodeReason::Malformed {
        expected,
        len: text.len(),
    }
}

pub(crate) fn parse_bool(text: &[u8]) -> Result<bool, EncodeReason> {
    match text {
        b"t" | b"true" => Ok(true),
        b"f" | b"false" => Ok(false),
        _ => Err(malformed("boolean (t/f)", text)),
    }
}

/// Parses a decimal integer without going through `str`: this runs for most key columns.
pub(crate) fn parse_i64(text: &[u8], target: &'static str) -> Result<i64, EncodeReason> {
    let (neg, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return Err(malformed(target, text));
    }
    // Accumulate negatively so that i64::MIN parses.
    let mut acc: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return Err(malformed(target, text));
        }
        acc = acc
            .checked_mul(10)
            .and_then(|a| a.checked_sub(i64::from(b - b'0')))
            .ok_or(EncodeReason::OutOfRange { target })?;
    }
    if neg {
        Ok(acc)
    } else {
        acc.checked_neg().ok_or(EncodeReason::OutOfRange { target })
    }
}

pub(crate) fn parse_i32(text: &[u8], target: &'static str) -> Result<i32, EncodeReason> {
    let v = parse_i64(text, target)?;
    i32::try_from(v).map_err(|_| EncodeReason::OutOfRange { target })
}

/// `float4`/`float8`: Rust's parser accepts Postgres' `NaN`, `Infinity` and `-Infinity`.
pub(crate) fn parse_f64(text: &[u8]) -> Result<f64, EncodeReason> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| malformed("float8", text))
}

pub(crate) fn parse_f32(text: &[u8]) -> Result<f32, EncodeReason> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f32>().ok())
        .ok_or_else(|| malformed("float4", text))
}

/// Writes the unscaled value of a `numeric` at `scale` as big-endian two's complement, the
/// minimal number of bytes, appended to `buf` — the Avro `decimal` on `bytes` form.
pub(crate) fn decimal_unscaled(
    text: &[u8],
    precision: u32,
    scale: u32,
    buf: &mut Vec<u8>,
) -> Result<(), EncodeReason> {
    const WHAT: &str = "numeric";
    if text.eq_ignore_ascii_case(b"nan") {
        return Err(EncodeReason::Unrepresentable {
            what: "NaN",
            target: "decimal",
        });
    }
    let (neg, rest) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if rest.eq_ignore_ascii_case(b"infinity") || rest.eq_ignore_ascii_case(b"inf") {
        return Err(EncodeReason::Unrepresentable {
            what: "infinity",
            target: "decimal",
        });
    }
    let (int_part, frac_part) = match rest.iter().position(|&b| b == b'.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.iter().all(u8::is_ascii_digit)
        || !frac_part.iter().all(u8::is_ascii_digit)
    {
        return Err(malformed(WHAT, text));
    }
    let scale_len = scale as usize;
    // Postgres prints exactly `scale` fractional digits for a constrained numeric; more would
    // only be trailing zeros, anything else would lose digits.
    let (frac_kept, frac_extra) = frac_part.split_at(frac_part.len().min(scale_len));
    if frac_extra.iter().any(|&b| b != b'0') {
        return Err(EncodeReason::PrecisionExceeded { precision, scale });
    }
    let int_digits = {
        let start = int_part
            .iter()
            .position(|&b| b != b'0')
            .unwrap_or(int_part.len());
        &int_part[start..]
    };
    if int_digits.len() > (precision - scale) as usize {
        return Err(EncodeReason::PrecisionExceeded { precision, scale });
    }
    let pad = scale_len - frac_kept.len();
    let digits = int_digits
        .iter()
        .chain(frac_kept.iter())
        .chain(std::iter::repeat_n(&b'0', pad));
    let ndigits = int_digits.len() + scale_len;

    if ndigits <= 38 {
        // Fast path: every numeric(p,s) with p <= 38 fits an i128.
        let mut v: i128 = 0;
        for &d in digits {
            v = v * 10 + i128::from(d - b'0');
        }
        if neg {
            v = -v;
        }
        let bytes = v.to_be_bytes();
        buf.extend_from_slice(&bytes[minimal_start(&bytes)..]);
    } else {
        // Magnitude in base 256, least significant byte first: multiply by 10 and add.
        let mut mag: Vec<u8> = Vec::with_capacity(ndigits / 2 + 1);
        for &d in digits {
            let mut carry = u32::from(d - b'0');
            for byte in mag.iter_mut() {
                let x = u32::from(*byte) * 10 + carry;
                *byte = x as u8;
                carry = x >> 8;
            }
            while carry > 0 {
                mag.push(carry as u8);
                carry >>= 8;
            }
        }
        // Room for the sign bit.
        mag.push(0);
        if neg {
            // Two's complement: invert and add one.
            let mut carry = 1u16;
            for byte in mag.iter_mut() {
                let x = u16::from(!*byte) + carry;
                *byte = x as u8;
                carry = x >> 8;
            }
        }
        mag.reverse();
        buf.extend_from_slice(&mag[minimal_start(&mag)..]);
    }
    Ok(())
}

/// Where the minimal two's complement form starts: leading bytes that only repeat the sign
/// are dropped.
fn minimal_start(bytes: &[u8]) -> usize {
    let mut start = 0;
    while start + 1 < bytes.len() {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    start
}

/// `bytea` in hex (`\x0a0b`) or escape (`a\\b\001`) output format, appended to `out`.
pub(crate) fn bytea(text: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeReason> {
    if let Some(hex) = text.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err(malformed("bytea hex", text));
        }
        out.reserve(hex.len() / 2);
        for pair in hex.chunks_exact(2) {
            let hi = hex_val(pair[0]).ok_or_else(|| malformed("bytea hex", text))?;
            let lo = hex_val(pair[1]).ok_or_else(|| malformed("bytea hex", text))?;
            out.push(hi << 4 | lo);
        }
        return Ok(());
    }
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\\' if text.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            b'\\' => {
                let oct = text
                    .get(i + 1..i + 4)
                    .ok_or_else(|| malformed("bytea escape", text))?;
                let mut v: u32 = 0;
                for &d in oct {
                    if !(b'0'..=b'7').contains(&d) {
                        return Err(malformed("bytea escape", text));
                    }
                    v = v * 8 + u32::from(d - b'0');
                }
                out.push(u8::try_from(v).map_err(|_| malformed("bytea escape", text))?);
                i += 4;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (astronomical year numbering).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A small cursor over ASCII text.
struct Cursor<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn digits(&mut self, min: usize, max: usize) -> Option<(i64, usize)> {
        let start = self.pos;
        let mut v: i64 = 0;
        while self.pos < self.text.len()
            && self.pos - start < max
            && self.text[self.pos].is_ascii_digit()
        {
            v = v * 10 + i64::from(self.text[self.pos] - b'0');
            self.pos += 1;
        }
        let n = self.pos - start;
        (n >= min).then_some((v, n))
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.text.get(self.pos) == Some(&b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn done(&self) -> bool {
        self.pos == self.text.len()
    }
}

/// Splits a trailing ` BC` off, as Postgres prints years before 1 AD.
fn split_era(text: &[u8]) -> (&[u8], bool) {
    match text.strip_suffix(b" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

fn reject_infinity(text: &[u8], target: &'static str) -> Result<(), EncodeReason> {
    if text == b"infinity" || text == b"-infinity" {
        return Err(EncodeReason::Unrepresentable {
            what: "infinity",
            target,
        });
    }
    Ok(())
}

/// `YYYY-MM-DD` (year may be longer than four digits) → days since the Unix epoch.
fn date_part(c: &mut Cursor<'_>, bc: bool) -> Option<i64> {
    let (year, _) = c.digits(4, 9)?;
    if !c.eat(b'-') {
        return None;
    }
    let (month, _) = c.digits(2, 2)?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, _) = c.digits(2, 2)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year == 0 {
        return None;
    }
    // Postgres' 1 BC is astronomical year 0.
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

/// `HH:MM:SS[.ffffff]` → microseconds since midnight (`24:00:00` is valid in Postgres).
fn time_part(c: &mut Cursor<'_>) -> Option<i64> {
    let (h, _) = c.digits(2, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (m, _) = c.digits(2, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (s, _) = c.digits(2, 2)?;
    let mut micros = 0;
    if c.eat(b'.') {
        let (f, n) = c.digits(1, 6)?;
        micros = f * 10_i64.pow((6 - n) as u32);
    }
    if h > 24 || m > 59 || s > 60 {
        return None;
    }
    Some(((h * 60 + m) * 60 + s) * 1_000_000 + micros)
}

/// `+HH[:MM[:SS]]` → offset east of UTC in microseconds.
fn offset_part(c: &mut Cursor<'_>) -> Option<i64> {
    let sign = if c.eat(b'+') {
        1
    } else if c.eat(b'-') {
        -1
    } else {
        return None;
    };
    let (h, _) = c.digits(2, 2)?;
    let mut secs = h * 3600;
    if c.eat(b':') {
        secs += c.digits(2, 2)?.0 * 60;
        if c.eat(b':') {
            secs += c.digits(2, 2)?.0;
        }
    }
    Some(sign * secs * 1_000_000)
}

/// `date` → days since 1970-01-01.
pub(crate) fn date(text: &[u8]) -> Result<i32, EncodeReason> {
    const WHAT: &str = "date in ISO DateStyle (YYYY-MM-DD)";
    reject_infinity(text, "date")?;
    let (body, bc) = split_era(text);
    let mut c = Cursor { text: body, pos: 0 };
    let days = date_part(&mut c, bc)
        .filter(|_| c.done())
        .ok_or_else(|| malformed(WHAT, text))?;
    i32::try_from(days).map_err(|_| EncodeReason::OutOfRange {
        target: "Avro date (int days)",
    })
}

/// `time` → microseconds since midnight.
pub(crate) fn time(text: &[u8]) -> Result<i64, EncodeReason> {
    let mut c = Cursor { text, pos: 0 };
    time_part(&mut c)
        .filter(|_| c.done())
        .ok_or_else(|| malformed("time (HH:MM:SS[.ffffff])", text))
}

/// `timestamp` (`with_offset` false) or `timestamptz` (true) → microseconds since the Unix
/// epoch; for `timestamptz` the offset is applied, so the result is UTC.
pub(crate) fn timestamp(text: &[u8], with_offset: bool) -> Result<i64, EncodeReason> {
    let (what, target): (&'static str, &'static str) = if with_offset {
        (
            "timestamptz in ISO DateStyle (YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM])",
            "timestamp-micros",
        )
    } else {
        (
            "timestamp in ISO DateStyle (YYYY-MM-DD HH:MM:SS[.ffffff])",
            "local-timestamp-micros",
        )
    };
    reject_infinity(text, target)?;
    let (body, bc) = split_era(text);
    let mut c = Cursor { text: body, pos: 0 };
    let parsed = (|| {
        let days = date_part(&mut c, bc)?;
        if !c.eat(b' ') {
            return None;
        }
        let tod = time_part(&mut c)?;
        let offset = if with_offset { offset_part(&mut c)? } else { 0 };
        c.done().then_some((days, tod, offset))
    })();
    let (days, tod, offset) = parsed.ok_or_else(|| malformed(what, text))?;
    days.checked_mul(DAY_MICROS)
        .and_then(|v| v.checked_add(tod))
        .and_then(|v| v.checked_sub(offset))
        .ok_or(EncodeReason::OutOfRange { target })
}

/// Splits a one-dimensional array literal (`{a,"b c",NULL}`) into its elements; `None` is a SQL
/// NULL element. Quoted elements with backslash escapes are unescaped into an owned string.
pub(crate) fn array_elements(text: &[u8]) -> Result<Vec<Option<Cow<'_, [u8]>>>, EncodeReason> {
    const WHAT: &str = "array literal ({...})";
    let mut body = text;
    // Arrays with non-default lower bounds are printed as `[0:2]={...}`.
    if body.first() == Some(&b'[') {
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| malformed(WHAT, text))?;
        body = &body[eq + 1..];
    }
    let inner = body
        .strip_prefix(b"{")
        .and_then(|b| b.strip_suffix(b"}"))
        .ok_or_else(|| malformed(WHAT, text))?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Ok(items);
    }
    let mut i = 0;
    loop {
        while inner.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        match inner.get(i) {
            Some(b'{') => return Err(EncodeReason::MultiDimArray),
            Some(b'"') => {
                i += 1;
                let start = i;
                let mut owned: Option<Vec<u8>> = None;
                loop {
                    match inner.get(i) {
                        None => return Err(malformed(WHAT, text)),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            let buf = owned.get_or_insert_with(|| inner[start..i].to_vec());
                            let escaped = *inner.get(i + 1).ok_or_else(|| malformed(WHAT, text))?;
                            buf.push(escaped);
                            i += 2;
                        }
                        Some(&b) => {
                            if let Some(buf) = owned.as_mut() {
                                buf.push(b);
                            }
                            i += 1;
                        }
                    }
                }
                items.push(Some(match owned {
                    Some(v) => Cow::Owned(v),
                    None => Cow::Borrowed(&inner[start..i]),
                }));
                i += 1; // closing quote
                while inner.get(i).is_some_and(u8::is_ascii_whitespace) {
                    i += 1;
                }
            }
            Some(_) => {
                let start = i;
                let mut owned: Option<Vec<u8>> = None;
                while let Some(&b) = inner.get(i) {
                    if b == b',' {
                        break;
                    }
                    if b == b'\\' {
                        let buf = owned.get_or_insert_with(|| inner[start..i].to_vec());
                        buf.push(*inner.get(i + 1).ok_or_else(|| malformed(WHAT, text))?);
                        i += 2;
                        continue;
                    }
                    if let Some(buf) = owned.as_mut() {
                        buf.push(b);
                    }
                    i += 1;
                }
                let item: Cow<'_, [u8]> = match owned {
                    Some(v) => Cow::Owned(v.trim_ascii_end().to_vec()),
                    None => Cow::Borrowed(inner[start..i].trim_ascii_end()),
                };
                if item.is_empty() {
                    return Err(malformed(WHAT, text));
                }
                let is_null = matches!(item, Cow::Borrowed(b) if b.eq_ignore_ascii_case(b"NULL"));
                items.push(if is_null { None } else { Some(item) });
            }
            None => return Err(malformed(WHAT, text)),
        }
        match inner.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return Err(malformed(WHAT, text)),
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str, p: u32, s: u32) -> Result<Vec<u8>, EncodeReason> {
        let mut buf = Vec::new();
        decimal_unscaled(text.as_bytes(), p, s, &mut buf).map(|()| buf)
    }

    #[test]
    fn integers_parse_to_their_limits_and_reject_overflow() {
        assert_eq!(parse_i64(b"-9223372036854775808", "int8"), Ok(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775807", "int8"), Ok(i64::MAX));
        assert!(matches!(
            parse_i64(b"9223372036854775808", "int8"),
            Err(EncodeReason::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_i32(b"2147483648", "int4"),
            Err(EncodeReason::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_i64(b"12a", "int8"),
            Err(EncodeReason::Malformed { len: 3, .. })
        ));
        assert!(parse_i64(b"-", "int8").is_err());
    }

    #[test]
    fn decimals_become_minimal_twos_complement() {
        assert_eq!(dec("0.00", 5, 2).unwrap(), vec![0x00]);
        assert_eq!(dec("1.28", 5, 2).unwrap(), vec![0x00, 0x80]); // 128 needs a sign byte
        assert_eq!(dec("-1.28", 5, 2).unwrap(), vec![0x80]); // -128
        assert_eq!(dec("-1.29", 5, 2).unwrap(), vec![0xff, 0x7f]); // -129
        assert_eq!(dec("-0.01", 5, 2).unwrap(), vec![0xff]);
        assert_eq!(dec("12.3", 5, 2).unwrap(), vec![0x04, 0xce]); // pads to scale: 1230
        assert_eq!(dec("7", 5, 0).unwrap(), vec![0x07]);
        assert_eq!(
            dec("999.99", 5, 2).unwrap(),
            99999i32.to_be_bytes()[1..].to_vec()
        );
        assert!(matches!(
            dec("1000.00", 5, 2),
            Err(EncodeReason::PrecisionExceeded { .. })
        ));
        assert!(matches!(
            dec("1.234", 5, 2),
            Err(EncodeReason::PrecisionExceeded { .. })
        ));
        assert!(matches!(
            dec("NaN", 5, 2),
            Err(EncodeReason::Unrepresentable { .. })
        ));
        assert!(matches!(
            dec("1e5", 5, 2),
            Err(EncodeReason::Malformed { .. })
        ));
    }

    #[test]
    fn wide_decimals_take_the_slow_path_without_losing_digits() {
        // 40 nines: larger than i128's 38 digits.
        let nines = "9".repeat(40);
        let got = dec(&nines, 40, 0).unwrap();
        let want = (1..=40).fold(vec![0u8], |acc, _| mul10_add(&acc, 9));
        assert_eq!(got, want);
        let neg = dec(&format!("-{nines}"), 40, 0).unwrap();
        // x + (-x) == 0 in two's complement of the same width.
        let width = got.len().max(neg.len());
        let sext = |v: &[u8]| {
            let fill = if v[0] & 0x80 != 0 { 0xff } else { 0 };
            let mut out = vec![fill; width - v.len()];
            out.extend_from_slice(v);
            out
        };
        let (a, b) = (sext(&got), sext(&neg));
        let mut carry = 0u16;
        let mut sum = vec![0u8; width];
        for i in (0..width).rev() {
            let x = u16::from(a[i]) + u16::from(b[i]) + carry;
            sum[i] = x as u8;
            carry = x >> 8;
        }
        assert!(sum.iter().all(|&b| b == 0));
    }

    /// Big-endian unsigned multiply-by-ten-and-add, as an independent reference.
    fn mul10_add(v: &[u8], d: u16) -> Vec<u8> {
        let mut out = v.to_vec();
        let mut carry = d;
        for b in out.iter_mut().rev() {
            let x = u16::from(*b) * 10 + carry;
            *b = x as u8;
            carry = x >> 8;
        }
        if carry > 0 {
            out.insert(0, carry as u8);
        }
        if out[0] & 0x80 != 0 {
            out.insert(0, 0);
        }
        while out.len() > 1 && out[0] == 0 && out[1] & 0x80 == 0 {
            out.remove(0);
        }
        out
    }

    #[test]
    fn dates_and_timestamps_cover_offsets_bc_and_infinity() {
        assert_eq!(date(b"1970-01-01"), Ok(0));
        assert_eq!(date(b"2024-05-01"), Ok(19844));
        assert_eq!(date(b"1969-12-31"), Ok(-1));
        // 1 BC is year 0; 0001-01-01 is 719162 days before the epoch.
        assert_eq!(date(b"0001-01-01"), Ok(-719_162));
        assert_eq!(date(b"0001-12-31 BC"), Ok(-719_163));
        assert!(matches!(
            date(b"infinity"),
            Err(EncodeReason::Unrepresentable { .. })
        ));
        assert!(matches!(
            date(b"05/01/2024"),
            Err(EncodeReason::Malformed { .. })
        ));

        assert_eq!(time(b"00:00:00"), Ok(0));
        assert_eq!(time(b"12:34:56.789"), Ok(45_296_789_000));
        assert_eq!(time(b"24:00:00"), Ok(DAY_MICROS));

        let base = 1_714_566_896_789_000; // 2024-05-01 12:34:56.789 UTC
        assert_eq!(timestamp(b"2024-05-01 12:34:56.789", false), Ok(base));
        assert_eq!(timestamp(b"2024-05-01 12:34:56.789+00", true), Ok(base));
        assert_eq!(timestamp(b"2024-05-01 14:34:56.789+02", true), Ok(base));
        assert_eq!(timestamp(b"2024-05-01 07:04:56.789-05:30", true), Ok(base));
        assert_eq!(
            timestamp(b"2024-05-01 12:35:05.789+00:00:09", true),
            Ok(base)
        );
        assert!(timestamp(b"0044-03-15 12:00:00 BC", false).unwrap() < 0);
        assert!(matches!(
            timestamp(b"-infinity", true),
            Err(EncodeReason::Unrepresentable { .. })
        ));
        assert!(matches!(
            timestamp(b"2024-05-01 12:34:56", true),
            Err(EncodeReason::Malformed { .. })
        ));
        assert!(matches!(
            timestamp(b"2024-05-01T12:34:56", false),
            Err(EncodeReason::Malformed { .. })
        ));
        // Past the i64 microsecond range from 1970: an error, not a wrap or a panic.
        assert!(matches!(
            timestamp(b"294276-12-31 23:59:59.999999", false),
            Err(EncodeReason::OutOfRange { .. })
        ));
    }

    #[test]
    fn array_literals_split_with_quotes_escapes_and_nulls() {
        let items = array_elements(br#"{a,"b c",NULL,"NULL","x\"y\\z",  d }"#).unwrap();
        let items: Vec<Option<&[u8]>> = items.iter().map(|i| i.as_deref()).collect();
        assert_eq!(
            items,
            vec![
                Some(&b"a"[..]),
                Some(b"b c"),
                None,
                Some(b"NULL"),
                Some(br#"x"y\z"#),
                Some(b"d"),
            ]
        );
        assert!(array_elements(b"{}").unwrap().is_empty());
        assert_eq!(array_elements(b"[0:1]={1,2}").unwrap().len(), 2);
        assert_eq!(
            array_elements(b"{{1,2},{3,4}}"),
            Err(EncodeReason::MultiDimArray)
        );
        assert!(array_elements(br#"{"open}"#).is_err());
        assert!(array_elements(b"{a,,b}").is_err());
        assert!(array_elements(b"a,b").is_err());
    }

    #[test]
    fn bytea_hex_and_escape_forms() {
        let mut out = Vec::new();
        bytea(b"\\x00ff10", &mut out).unwrap();
        assert_eq!(out, [0x00, 0xff, 0x10]);
        out.clear();
        bytea(b"a\\\\b\\001", &mut out).unwrap();
        assert_eq!(out, b"a\\b\x01");
        assert!(bytea(b"\\x0", &mut out).is_err());
        assert!(bytea(b"\\xzz", &mut out).is_err());
    }
}
