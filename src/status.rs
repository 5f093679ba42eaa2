//! `walbridge status`: a running instance's state at a glance, read from its own `/metrics` and
//! `/ready` (the same numbers a dashboard shows, without needing one).
//!
//! Rates come from two scrapes one second apart, so the command takes about a second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdc::Lsn;

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (0.0.4); comment and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches([',', ' ']);
            if let Some(r) = body.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = body.find('=')?;
            let key = body[..eq].trim().to_owned();
            let (value, used) = quoted(&body[eq + 1..])?;
            labels.insert(key, value);
            body = &body[eq + 1 + used..];
        }
    }
    let value = rest.split_whitespace().next()?;
    Some(Sample {
        name,
        labels,
        value: parse_value(value)?,
    })
}

/// A `"..."` label value at the start of `s`: (unescaped value, bytes consumed).
fn quoted(s: &str) -> Option<(String, usize)> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut value = String::new();
    let mut escaped = false;
    for (i, c) in chars {
        match (escaped, c) {
            (true, 'n') => {
                value.push('\n');
                escaped = false;
            }
            (true, c) => {
                value.push(c);
                escaped = false;
            }
            (false, '\\') => escaped = true,
            (false, '"') => return Some((value, i + 1)),
            (false, c) => value.push(c),
        }
    }
    None
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

/// Metrics by name, summed over series that match a label filter.
struct Scrape {
    samples: Vec<Sample>,
}

impl Scrape {
    fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.value)
    }

    fn labelled<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// Per value of label `by`: the sum of `name` over its series.
    fn sum_by(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.labelled(name) {
            if let Some(k) = s.labels.get(by) {
                *out.entry(k.clone()).or_insert(0.0) += s.value;
            }
        }
        out
    }
}

/// One table's line in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    pub table: String,
    pub events_total: f64,
    pub events_per_sec: f64,
    pub bytes_per_sec: f64,
    pub snapshot: Option<(f64, Option<f64>)>,
}

/// What `walbridge status` prints.
#[derive(Debug, Clone)]
pub struct Report {
    pub url: String,
    pub ready: Result<(), String>,
    pub slot: Option<String>,
    pub publication: Option<String>,
    pub wal_status: Option<String>,
    pub confirmed: Option<Lsn>,
    pub received: Option<Lsn>,
    pub lag_ms: Option<f64>,
    pub retained_bytes: Option<f64>,
    pub kafka_queue: Option<f64>,
    pub delivery_errors: Option<f64>,
    pub dead_letters: Option<f64>,
    pub attempts: Option<f64>,
    pub last_error: Option<String>,
    pub tables: Vec<TableRow>,
}

async fn get(client: &reqwest::Client, url: &str) -> anyhow::Result<(u16, String)> {
    let resp = client.get(url).send().await.with_context(|| {
        format!("cannot reach walbridge at {url} (is `walbridge run` running, with metrics.listen at this address?)")
    })?;
    let code = resp.status().as_u16();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    Ok((code, body))
}

/// Scrapes `base` (e.g. `http://127.0.0.1:9187`) twice, `interval` apart, and builds the report.
pub async fn collect(base: &str, interval: Duration) -> anyhow::Result<Report> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let metrics_url = format!("{base}/metrics");
    let scrape = |text: String| Scrape {
        samples: parse(&text),
    };
    let (code, first) = get(&client, &metrics_url).await?;
    if code != 200 {
        bail!("{metrics_url} answered HTTP {code}; is this a walbridge metrics endpoint?");
    }
    let t0 = Instant::now();
    let first = scrape(first);
    if first.value("walbridge_pipeline_attempts_total").is_none() {
        bail!("{metrics_url} has no walbridge metrics; is this a walbridge metrics endpoint?");
    }
    tokio::time::sleep(interval).await;
    let (_, second) = get(&client, &metrics_url).await?;
    let secs = t0.elapsed().as_secs_f64().max(1e-3);
    let second = scrape(second);
    let (code, ready_body) = get(&client, &format!("{base}/ready")).await?;
    let ready = if code == 200 {
        Ok(())
    } else {
        let reason = serde_json::from_str::<serde_json::Value>(&ready_body)
            .ok()
            .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("HTTP {code}"));
        Err(reason)
    };

    let info = second.labelled("walbridge_info").next();
    let label = |k: &str| info.and_then(|s| s.labels.get(k).cloned());
    let lsn = |name: &str| second.value(name).map(|v| Lsn(v as u64));
    let events0 = first.sum_by("walbridge_events_total", "table");
    let events1 = second.sum_by("walbridge_events_total", "table");
    let bytes0 = first.sum_by("walbridge_produced_bytes_total", "table");
    let bytes1 = second.sum_by("walbridge_produced_bytes_total", "table");
    let copied = second.sum_by("walbridge_snapshot_rows_copied", "table");
    let estimate = second.sum_by("walbridge_snapshot_rows_estimate", "table");
    let rate = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, t: &str| {
        (b.get(t).copied().unwrap_or(0.0) - a.get(t).copied().unwrap_or(0.0)).max(0.0) / secs
    };
    let tables = events1
        .iter()
        .map(|(t, total)| TableRow {
            table: t.clone(),
            events_total: *total,
            events_per_sec: rate(&events0, &events1, t),
            bytes_per_sec: rate(&bytes0, &bytes1, t),
            snapshot: copied
                .get(t)
                .filter(|c| **c > 0.0)
                .map(|c| (*c, estimate.get(t).copied())),
        })
        .collect();
    Ok(Report {
        url: base.to_owned(),
        ready,
        slot: label("slot"),
        publication: label("publication"),
        wal_status: second
            .labelled("walbridge_slot_wal_status")
            .find(|s| s.value == 1.0)
            .and_then(|s| s.labels.get("status").cloned()),
        confirmed: lsn("walbridge_confirmed_flush_lsn"),
        received: lsn("walbridge_received_lsn"),
        lag_ms: second.value("walbridge_lag_milliseconds"),
        retained_bytes: second.value("walbridge_slot_retained_wal_bytes"),
        kafka_queue: second.value("walbridge_kafka_queue_messages"),
        delivery_errors: second.value("walbridge_kafka_delivery_errors_total"),
        dead_letters: second.value("walbridge_dead_letters_total"),
        attempts: second.value("walbridge_pipeline_attempts_total"),
        last_error: second
            .labelled("walbridge_last_error_info")
            .next()
            .and_then(|s| s.labels.get("reason").cloned()),
        tables,
    })
}

fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Report {
    pub fn render(&self) -> String {
        let dash = || "-".to_owned();
        let num = |v: Option<f64>| v.map_or_else(dash, |v| format!("{v:.0}"));
        let lsn = |v: Option<Lsn>| v.map_or_else(dash, |l| l.to_string());
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<18}{v}");
        };
        line("walbridge", self.url.clone());
        line(
            "ready",
            match &self.ready {
                Ok(()) => "yes".to_owned(),
                Err(r) => format!("no ({r})"),
            },
        );
        let slot = self.slot.clone().unwrap_or_else(dash);
        let wal = self
            .wal_status
            .as_ref()
            .map_or(String::new(), |w| format!(" (wal_status {w})"));
        line("slot", format!("{slot}{wal}"));
        line("publication", self.publication.clone().unwrap_or_else(dash));
        line("confirmed LSN", lsn(self.confirmed));
        line("received LSN", lsn(self.received));
        line(
            "lag",
            self.lag_ms.map_or_else(dash, |v| format!("{v:.0} ms")),
        );
        // Without a wal_status the poller has not seen the slot (yet): no number to show.
        let retained = self.retained_bytes.filter(|_| self.wal_status.is_some());
        line("retained WAL", retained.map_or_else(dash, bytes));
        line("kafka queue", num(self.kafka_queue));
        line("delivery errors", num(self.delivery_errors));
        line("dead letters", num(self.dead_letters));
        line("attempts", num(self.attempts));
        if let Some(e) = &self.last_error {
            line("last error", e.clone());
        }
        let _ = writeln!(out);
        let width = self
            .tables
            .iter()
            .map(|t| t.table.len())
            .max()
            .unwrap_or(0)
            .max(5);
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>12}  {:>12}  snapshot",
            "table", "events/s", "events", "bytes/s"
        );
        if self.tables.is_empty() {
            let _ = writeln!(out, "(no events yet)");
        }
        for t in &self.tables {
            let snap = match t.snapshot {
                None => String::new(),
                Some((copied, Some(est))) if est > 0.0 => {
                    format!("{copied:.0} of ~{est:.0} rows")
                }
                Some((copied, _)) => format!("{copied:.0} rows"),
            };
            let _ = writeln!(
                out,
                "{:<width$}  {:>10.1}  {:>12.0}  {:>12}  {snap}",
                t.table,
                t.events_per_sec,
                t.events_total,
                format!("{}/s", bytes(t.bytes_per_sec))
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_registry_renders() {
        let r = crate::metrics::Registry::default();
        r.counter("a_total", "A.", &[("table", "x\"y"), ("op", "c")])
            .add(7);
        r.gauge("b", "B.", &[]).set(42);
        let samples = parse(&r.render());
        assert_eq!(samples.len(), 2, "{samples:?}");
        assert_eq!(samples[0].name, "a_total");
        assert_eq!(samples[0].labels["table"], "x\"y");
        assert_eq!(samples[0].labels["op"], "c");
        assert_eq!(samples[0].value, 7.0);
        assert_eq!(samples[1].value, 42.0);
        assert_eq!(
            parse("h_bucket{le=\"+Inf\"} 3\nbad line here\n")[0].value,
            3.0
        );
    }

    #[test]
    fn sizes_are_readable() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
    }
}
