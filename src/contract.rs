//! What walbridge does when a table's new shape (after `ALTER TABLE`) is incompatible with the
//! schemas already registered for its topic (`registry.on_incompatible`).
//!
//! The registry decides compatibility (its level for the subject: BACKWARD by default, as
//! Confluent's), so walbridge asks it before registering, through the Confluent REST API any
//! registry implements (`POST /compatibility/subjects/{s}/versions/latest`):
//!
//! - `stop` (default): stop before sending any change of the new shape, saying which table,
//!   which subject, and the ways forward. Nothing is lost: the slot keeps the changes, and the
//!   next start after the fix streams them. Safe, because consumers of the topic never see
//!   records they cannot read.
//! - `new_version`: register the new shape anyway as the subject's next version (its level is
//!   set to NONE for that one registration and put back after), and go on. For teams whose
//!   consumers read by writer schema id and accept any shape.
//! - `dead_letter`: register nothing; every change of the table in the new shape goes to the
//!   dead-letter topic with the reason, and the other tables go on. After a fix (the change made
//!   compatible, or the subject's level relaxed) `walbridge dlq replay` sends them.

use anyhow::{Context, bail};
use serde_json::{Value as Json, json};

use crate::config::OnIncompatible;

/// What [`admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Register as usual (already registered, for `new_version`).
    Register,
    /// `dead_letter`: the shape is refused, for this reason.
    Refused(String),
}

/// Checks `schema` against `subject`'s latest version and applies the policy when it is
/// incompatible: an error (`stop`), a forced registration (`new_version`), or a refusal the
/// caller turns into dead letters (`dead_letter`).
pub async fn admit(
    registry_url: &str,
    subject: &str,
    schema: &str,
    table: &str,
    policy: OnIncompatible,
) -> anyhow::Result<Admission> {
    // Credentials in the URL are sent as basic auth; errors name the URL without them.
    let (base, credentials) = avro::registry::client::split_credentials(registry_url);
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some((user, password)) = credentials {
        let value =
            reqwest::header::HeaderValue::from_str(&avro::registry::basic_auth(&user, &password))
                .context("the registry credentials are not valid in an HTTP header")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .context("setting up the registry HTTP client")?;
    let base = base.trim_end_matches('/');
    let body = json!({ "schema": schema }).to_string();
    let res = http
        .post(format!(
            "{base}/compatibility/subjects/{subject}/versions/latest?verbose=true"
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(body.clone())
        .send()
        .await
        .with_context(|| {
            format!(
                "asking the registry at {base} whether {subject} may take the new shape of {table} \
                 (check registry.url and that the registry is up; walbridge retries with backoff \
                 and sends nothing of {table} until it answers)"
            )
        })?;
    let status = res.status().as_u16();
    let answer: Json = res.json_or_null().await;
    if status == 404 {
        // No version yet (40401/40402): anything goes.
        return Ok(Admission::Register);
    }
    if status != 200 {
        bail!("the registry answered {status} to a compatibility check of {subject}: {answer}");
    }
    if answer["is_compatible"].as_bool() != Some(false) {
        return Ok(Admission::Register);
    }
    let why = answer["messages"].to_string();
    match policy {
        OnIncompatible::Stop => bail!(
            "the new shape of {table} is incompatible with the schemas registered under {subject} ({why}); \
             nothing of the new shape was sent and the slot keeps every change. Either make the change compatible \
             (e.g. add columns instead of changing a type), allow it for this subject \
             (PUT {base}/config/{subject} with {{\"compatibility\":\"NONE\"}}), or set registry.on_incompatible: new_version"
        ),
        OnIncompatible::DeadLetter => {
            tracing::warn!(table, subject, reason = %why, "incompatible shape: the table's changes go to the dead-letter topic (registry.on_incompatible: dead_letter)");
            Ok(Admission::Refused(format!("subject {subject}: {why}")))
        }
        OnIncompatible::NewVersion => {
            tracing::warn!(table, subject, reason = %why, "incompatible shape registered as a new version (registry.on_incompatible: new_version)");
            let config_url = format!("{base}/config/{subject}");
            let before = http.get(&config_url).send().await?;
            let had_own = before.status().is_success();
            let level: Json = before.json_or_null().await;
            let put = |level: &str| {
                http.put(&config_url)
                    .header("content-type", "application/vnd.schemaregistry.v1+json")
                    .body(json!({ "compatibility": level }).to_string())
                    .send()
            };
            put("NONE").await?.error_for_status()?;
            let registered = http
                .post(format!("{base}/subjects/{subject}/versions"))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            // Put the subject's level back whatever happened.
            match level["compatibilityLevel"].as_str() {
                Some(l) if had_own => {
                    put(l).await?.error_for_status()?;
                }
                _ => {
                    http.delete(&config_url).send().await?;
                }
            }
            registered
                .with_context(|| format!("registering the new shape of {table} under {subject}"))?;
            Ok(Admission::Register)
        }
    }
}

/// Whether `schema` may be registered under `subject`: `None` when the subject has no version
/// yet, else the registry's incompatibility messages (empty when compatible).
pub async fn compatibility(
    registry_url: &str,
    subject: &str,
    schema: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let (base, credentials) = avro::registry::client::split_credentials(registry_url);
    let mut req = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("setting up the registry HTTP client")?
        .post(format!(
            "{}/compatibility/subjects/{subject}/versions/latest?verbose=true",
            base.trim_end_matches('/')
        ))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(json!({ "schema": schema }).to_string());
    if let Some((user, password)) = credentials {
        req = req.header(
            reqwest::header::AUTHORIZATION,
            avro::registry::basic_auth(&user, &password),
        );
    }
    let res = req
        .send()
        .await
        .with_context(|| format!("asking the registry at {base} about {subject}"))?;
    let status = res.status().as_u16();
    let answer: Json = res.json_or_null().await;
    match status {
        404 => Ok(None),
        200 if answer["is_compatible"].as_bool() == Some(false) => Ok(Some(
            answer["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
                .collect(),
        )),
        200 => Ok(Some(Vec::new())),
        _ => {
            bail!("the registry answered {status} to a compatibility check of {subject}: {answer}")
        }
    }
}

trait JsonOrNull {
    async fn json_or_null(self) -> Json;
}

impl JsonOrNull for reqwest::Response {
    async fn json_or_null(self) -> Json {
        self.bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Json::Null)
    }
}
