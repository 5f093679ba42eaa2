//! Client for any Confluent-compatible schema registry, on `schema_registry_converter`.
//!
//! Registration is cached per (subject, schema text): a pipeline re-registers on every
//! pgoutput `Relation` message, which Postgres resends after each reconnect and schema change,
//! and the answer for an unchanged schema never changes. Schemas by id are cached by the
//! converter's `AvroDecoder`, which also decodes messages independently of our encoder.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::schema::{Name, RecordSchema};
use apache_avro::types::Value as Avro;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde_json::Value as Json;

use super::RegistryError;
use crate::wire;

pub struct RegistryClient {
    settings: SrSettings,
    decoder: AvroDecoder,
    registered: Mutex<HashMap<(String, String), u32>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client for the registry at `url` (e.g. `http://127.0.0.1:8081`), with a 30 s timeout.
    /// Credentials in the URL (`http://user:password@host:port`) are sent as HTTP basic auth.
    pub fn new(url: &str) -> Result<RegistryClient, RegistryError> {
        let (base, credentials) = split_credentials(url);
        let mut builder = SrSettings::new_builder(base.trim_end_matches('/').to_owned());
        builder.set_timeout(Duration::from_secs(30));
        if let Some((user, password)) = &credentials {
            builder.set_basic_authorization(user, Some(password));
        }
        let settings = builder.build().map_err(|source| RegistryError::Request {
            what: format!("set up client for {url}"),
            source,
        })?;
        Ok(Self::with_settings(settings))
    }

    /// A client with settings built by the caller (authentication, proxy, several URLs).
    pub fn with_settings(settings: SrSettings) -> RegistryClient {
        RegistryClient {
            decoder: AvroDecoder::new(settings.clone()),
            settings,
            registered: Mutex::new(HashMap::new()),
        }
    }

    /// Registers `schema_json` under `subject` (or finds it already there) and returns its id.
    pub async fn register(&self, subject: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_owned(), schema_json.to_owned());
        if let Some(id) = self.cache().get(&key) {
            return Ok(*id);
        }
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema_json.to_owned());
        let registered = post_schema(&self.settings, subject.to_owned(), supplied)
            .await
            .map_err(|source| RegistryError::Request {
                what: format!("register schema under subject {subject}"),
                source,
            })?;
        tracing::debug!(subject, id = registered.id, "schema registered");
        self.cache().insert(key, registered.id);
        Ok(registered.id)
    }

    /// The writer schema with this id.
    pub async fn schema_by_id(&self, id: u32) -> Result<Schema, RegistryError> {
        let schema =
            self.decoder
                .get_schema(id)
                .await
                .map_err(|source| RegistryError::Request {
                    what: format!("fetch schema id {id}"),
                    source,
                })?;
        Ok(schema.parsed.clone())
    }

    /// Decodes a Confluent-framed Avro message to JSON, fetching its writer schema by id.
    ///
    /// Unions become their value (or null), `bytes` an array of numbers, and decimals a string
    /// in plain notation (`"-12.30"`), which is what a person reading `tail` output expects.
    /// JSON has no NaN or infinity: such floats become the strings Postgres prints for them
    /// (`"NaN"`, `"Infinity"`, `"-Infinity"`), as Postgres' own `to_json` does.
    pub async fn decode(&self, framed: &[u8]) -> Result<Json, RegistryError> {
        let (id, _) = wire::unframe(framed)?;
        let decoded = self
            .decoder
            .decode_with_schema(Some(framed))
            .await
            .map_err(|source| RegistryError::Request {
                what: format!("decode message with schema id {id}"),
                source,
            })?
            .ok_or(RegistryError::Decode {
                id,
                reason: "empty message".into(),
            })?;
        let mut names = HashMap::new();
        collect_names(&decoded.schema.parsed, &mut names);
        to_json(decoded.value, &decoded.schema.parsed, &names)
            .map_err(|reason| RegistryError::Decode { id, reason })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u32>> {
        self.registered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Named schemas by full name, to follow `Schema::Ref`.
/// Splits `scheme://user:password@host…` into the URL without credentials and the
/// (percent-decoded) user and password.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let host_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..host_end].rfind('@') else {
        return (url.to_owned(), None);
    };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (
        format!("{scheme}://{host}"),
        Some((percent_decode(user), percent_decode(password))),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), b.get(i + 2).and_then(|&c| hex(c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn collect_names<'s>(schema: &'s Schema, names: &mut HashMap<Name, &'s Schema>) {
    match schema {
        Schema::Record(RecordSchema { name, fields, .. }) => {
            names.insert(name.clone(), schema);
            for f in fields {
                collect_names(&f.schema, names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.clone(), schema);
        }
        Schema::Fixed(f) => {
            names.insert(f.name.clone(), schema);
        }
        Schema::Array(a) => collect_names(&a.items, names),
        Schema::Map(m) => collect_names(&m.types, names),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// Avro value → JSON, guided by the schema where the value alone is not enough (decimal scale).
fn to_json(value: Avro, schema: &Schema, names: &HashMap<Name, &Schema>) -> Result<Json, String> {
    let schema = match schema {
        Schema::Ref { name } => *names
            .get(name)
            .ok_or_else(|| format!("unknown type {name}"))?,
        s => s,
    };
    match (value, schema) {
        (Avro::Union(i, v), Schema::Union(u)) => {
            let branch = u
                .variants()
                .get(i as usize)
                .ok_or_else(|| format!("union branch {i} out of range"))?;
            to_json(*v, branch, names)
        }
        (Avro::Record(fields), Schema::Record(r)) => {
            let mut out = serde_json::Map::with_capacity(fields.len());
            for ((name, v), f) in fields.into_iter().zip(&r.fields) {
                out.insert(name, to_json(v, &f.schema, names)?);
            }
            Ok(Json::Object(out))
        }
        (Avro::Array(items), Schema::Array(a)) => items
            .into_iter()
            .map(|v| to_json(v, &a.items, names))
            .collect::<Result<Vec<_>, _>>()
            .map(Json::Array),
        (Avro::Decimal(d), Schema::Decimal(ds)) => {
            let unscaled: Vec<u8> = Vec::try_from(&d).map_err(|e| e.to_string())?;
            Ok(Json::String(decimal_string(&unscaled, ds.scale)))
        }
        (Avro::Float(f), _) if !f.is_finite() => Ok(non_finite(f64::from(f))),
        (Avro::Double(d), _) if !d.is_finite() => Ok(non_finite(d)),
        (v, _) => Json::try_from(v).map_err(|e| e.to_string()),
    }
}

fn non_finite(v: f64) -> Json {
    let text = if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    };
    Json::String(text.to_owned())
}

/// Big-endian two's complement unscaled value at `scale` → plain decimal notation.
fn decimal_string(unscaled: &[u8], scale: usize) -> String {
    let neg = unscaled.first().is_some_and(|b| b & 0x80 != 0);
    // Magnitude, big-endian.
    let mut mag: Vec<u8> = unscaled.to_vec();
    if neg {
        let mut carry = 1u16;
        for b in mag.iter_mut().rev() {
            let x = u16::from(!*b) + carry;
            *b = x as u8;
            carry = x >> 8;
        }
    }
    // Repeated division by 10 of the base-256 number gives the decimal digits.
    let mut digits = Vec::new();
    while mag.iter().any(|&b| b != 0) {
        let mut rem = 0u16;
        for b in mag.iter_mut() {
            let cur = (rem << 8) | u16::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
    }
    while digits.len() <= scale {
        digits.push(b'0');
    }
    digits.reverse();
    let (int, frac) = digits.split_at(digits.len() - scale);
    let mut s = String::with_capacity(digits.len() + 2);
    if neg {
        s.push('-');
    }
    s.push_str(std::str::from_utf8(int).unwrap_or("0"));
    if scale > 0 {
        s.push('.');
        s.push_str(std::str::from_utf8(frac).unwrap_or(""));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use apache_avro::Schema;
    use apache_avro::types::Value as Avro;
    use serde_json::json;

    use super::{decimal_string, to_json};

    #[test]
    fn non_finite_floats_decode_to_postgres_spellings() {
        let names = HashMap::new();
        let cases = [
            (Avro::Double(f64::NAN), Schema::Double, json!("NaN")),
            (
                Avro::Double(f64::INFINITY),
                Schema::Double,
                json!("Infinity"),
            ),
            (
                Avro::Float(f32::NEG_INFINITY),
                Schema::Float,
                json!("-Infinity"),
            ),
            (Avro::Double(1e300), Schema::Double, json!(1e300)),
            (Avro::Float(1.5), Schema::Float, json!(1.5)),
        ];
        for (value, schema, want) in cases {
            assert_eq!(to_json(value, &schema, &names).unwrap(), want);
        }
    }

    #[test]
    fn decimal_strings_keep_scale_and_sign() {
        assert_eq!(decimal_string(&[0x04, 0xce], 2), "12.30");
        assert_eq!(decimal_string(&[0xff], 2), "-0.01");
        assert_eq!(decimal_string(&[0x00], 2), "0.00");
        assert_eq!(decimal_string(&[0x80], 0), "-128");
        assert_eq!(decimal_string(&[0x07], 0), "7");
    }
}
