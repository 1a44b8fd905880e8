//! The agent's counters, gauges and the upload-latency histogram, and their Prometheus text.
//!
//! # What always holds
//! - One registry per process ([`global`]), as Prometheus client libraries keep a default
//!   registry: the sources, the buffer writer and the batcher count into it without being handed
//!   a handle, and counters only ever grow for the life of the process.
//! - A reading is counted once, when its commit to the buffer succeeded; a batch and its rows
//!   once, when the upload target confirmed the PUT. So after a clean shutdown that uploaded
//!   everything, `readings_total` summed equals `rows_uploaded_total`.
//! - Buffer depth and age are not kept here: they are read from the buffer file at scrape time,
//!   so they are never stale.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Reading;
use crate::buffer::BufferReport;
use crate::exposition::{Histogram, escape, header};
use crate::sources::modbus::PollError;

/// Upper bounds (seconds) of the upload-latency histogram buckets: from a LAN folder (tens of
/// milliseconds) to an S3 PUT over a slow uplink that nearly hits the default 60 s timeout.
pub const UPLOAD_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The batcher counts as stalled when its loop has not come round for this long. One round is
/// at most an upload (S3 timeout, 60 s by default) plus the longest retry wait (60 s), so this
/// leaves room for a slow disk before `/health` says so.
pub const BATCHER_STALL: Duration = Duration::from_mins(5);

/// Every metric of the agent. Use [`global`].
#[derive(Debug, Default)]
pub struct Metrics {
    /// Readings committed, by (device, quality).
    readings: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Modbus errors, by (device, kind).
    modbus_errors: Mutex<BTreeMap<(String, &'static str), u64>>,
    batches_uploaded: AtomicU64,
    rows_uploaded: AtomicU64,
    /// Fresh-lane batches (copies, batch contract v3) and their readings: not in the two above,
    /// which count every reading once.
    fresh_batches_uploaded: AtomicU64,
    fresh_rows_uploaded: AtomicU64,
    upload_failures: AtomicU64,
    upload_latency: Mutex<Histogram<{ UPLOAD_BUCKETS.len() }>>,
    /// Unix time of the last confirmed upload in milliseconds; 0 before the first.
    last_upload_ms: AtomicU64,
    /// The last buffer commit's error, until a commit succeeds again.
    commit_error: Mutex<Option<String>>,
    /// Unix time of the batcher loop's last round in milliseconds; 0 when it is not running.
    batcher_beat_ms: AtomicU64,
    /// Whether the Kinesis live stream is configured; its metrics are shown only then.
    kinesis_enabled: AtomicBool,
    kinesis_sent: AtomicU64,
    kinesis_dropped: AtomicU64,
    kinesis_put_failures: AtomicU64,
    /// Readings the buffer dropped, by reason (`buffer_full`, `max_age`, `damaged_buffer`).
    buffer_dropped: Mutex<BTreeMap<String, u64>>,
    /// Whether the agent watches its config file; the reload counters are shown only then.
    config_reload_enabled: AtomicBool,
    config_reloads_applied: AtomicU64,
    config_reloads_rejected: AtomicU64,
    /// MQTT messages with a bad payload, by (broker, subscription, reason of the first problem).
    mqtt_bad_payloads: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Dead letters dropped by a broker's `max_dead_letters`, by broker.
    mqtt_dead_letters_dropped: Mutex<BTreeMap<String, u64>>,
    /// Sparkplug B `seq` gaps, by (broker, edge node as `group/node`).
    mqtt_sparkplug_seq_gaps: Mutex<BTreeMap<(String, String), u64>>,
}

/// Uploads since the agent started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct UploadSummary {
    pub batches: u64,
    pub rows: u64,
    pub failures: u64,
    /// When the target last confirmed a batch (ms since the epoch).
    pub last_upload_ms: Option<u64>,
}

/// Whether the agent can do its job, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Why not, in words for the operator.
    Failing(String),
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

/// A poisoned lock only means another thread panicked mid-increment; the counts stay usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

impl Metrics {
    /// Counts readings whose commit to the buffer succeeded, and marks the buffer writable.
    pub fn readings_committed(&self, readings: &[Reading]) {
        let mut map = lock(&self.readings);
        for r in readings {
            let key = (r.device.clone(), r.quality.as_str());
            *map.entry(key).or_default() += 1;
        }
        drop(map);
        *lock(&self.commit_error) = None;
        super::live::live().committed(readings);
    }

    /// Records that a commit to the buffer failed, for `/health`.
    pub fn commit_failed(&self, error: &dyn std::fmt::Display) {
        *lock(&self.commit_error) = Some(error.to_string());
    }

    /// Counts one failed connection attempt or one tag of `device` that read bad this poll.
    pub fn modbus_error(&self, device: &str, error: &PollError) {
        let kind = match error {
            // Not a request of its own: the failed connection attempt was counted already.
            PollError::NotConnected { .. } => return,
            PollError::Resolve { .. } => "resolve",
            PollError::Connect { .. } => "connect",
            PollError::NoSuchAddress { .. } => "no_such_address",
            PollError::Timeout { .. } => "timeout",
            PollError::Exception { .. } => "exception",
            PollError::Transport { .. } => "transport",
            PollError::Decode { .. } => "decode",
        };
        super::live::live().device_error(device, error);
        *lock(&self.modbus_errors)
            .entry((device.to_owned(), kind))
            .or_default() += 1;
    }

    /// Counts a batch the upload target confirmed, with its rows and how long the PUT took.
    pub fn batch_uploaded(&self, rows: usize, took: Duration) {
        self.batches_uploaded.fetch_add(1, Ordering::Relaxed);
        self.rows_uploaded
            .fetch_add(u64::try_from(rows).unwrap_or(u64::MAX), Ordering::Relaxed);
        lock(&self.upload_latency).observe(&UPLOAD_BUCKETS, took.as_secs_f64());
        self.last_upload_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    /// Uploads so far, for the status page.
    pub fn uploads(&self) -> UploadSummary {
        UploadSummary {
            batches: self.batches_uploaded.load(Ordering::Relaxed),
            rows: self.rows_uploaded.load(Ordering::Relaxed),
            failures: self.upload_failures.load(Ordering::Relaxed),
            last_upload_ms: match self.last_upload_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(ms),
            },
        }
    }

    /// Counts a fresh-lane batch the upload target confirmed, with its rows (copies of readings
    /// the main lane uploads too, so not part of `rows_uploaded_total`).
    pub fn fresh_batch_uploaded(&self, rows: usize) {
        self.fresh_batches_uploaded.fetch_add(1, Ordering::Relaxed);
        self.fresh_rows_uploaded
            .fetch_add(u64::try_from(rows).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts an upload attempt the target refused or did not answer.
    pub fn upload_failed(&self) {
        self.upload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The batcher loop came round: it is alive.
    pub fn batcher_alive(&self) {
        self.batcher_beat_ms
            .store(unix_ms(SystemTime::now()).max(1), Ordering::Relaxed);
    }

    /// The Kinesis live stream is configured: its metrics appear from now on.
    pub fn kinesis_enabled(&self) {
        self.kinesis_enabled.store(true, Ordering::Relaxed);
    }

    /// Counts readings Kinesis accepted.
    pub fn kinesis_sent(&self, readings: usize) {
        self.kinesis_sent.fetch_add(
            u64::try_from(readings).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts readings the live stream dropped because Kinesis was slow or away.
    pub fn kinesis_dropped(&self, readings: u64) {
        self.kinesis_dropped.fetch_add(readings, Ordering::Relaxed);
    }

    /// Readings Kinesis accepted so far.
    pub fn kinesis_sent_total(&self) -> u64 {
        self.kinesis_sent.load(Ordering::Relaxed)
    }

    /// Readings the live stream dropped so far.
    pub fn kinesis_dropped_total(&self) -> u64 {
        self.kinesis_dropped.load(Ordering::Relaxed)
    }

    /// Counts a PutRecords call that failed or had refused records (each is retried).
    pub fn kinesis_put_failed(&self) {
        self.kinesis_put_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts readings the buffer dropped (each drop also goes out as a gap record).
    pub fn buffer_dropped(&self, reason: &str, readings: u64) {
        *lock(&self.buffer_dropped)
            .entry(reason.to_owned())
            .or_default() += readings;
    }

    /// Readings the buffer dropped for `reason` since the process started.
    pub fn buffer_dropped_total(&self, reason: &str) -> u64 {
        lock(&self.buffer_dropped).get(reason).copied().unwrap_or(0)
    }

    /// The batcher loop has returned (shutdown or a fatal error).
    /// The agent applies edits of its config file while it runs: the reload counters appear
    /// from now on.
    pub fn config_reload_enabled(&self) {
        self.config_reload_enabled.store(true, Ordering::Relaxed);
    }

    /// Counts one attempt to apply an edited config file: `applied`, or rejected (invalid, or
    /// a change that cannot be made while the agent runs) with the running map kept.
    pub fn config_reloaded(&self, applied: bool) {
        let counter = if applied {
            &self.config_reloads_applied
        } else {
            &self.config_reloads_rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Config reloads so far: (applied, rejected).
    pub fn config_reloads(&self) -> (u64, u64) {
        (
            self.config_reloads_applied.load(Ordering::Relaxed),
            self.config_reloads_rejected.load(Ordering::Relaxed),
        )
    }

    pub fn batcher_stopped(&self) {
        self.batcher_beat_ms.store(0, Ordering::Relaxed);
    }

    /// Whether the buffer takes commits and the batcher loop is alive, at `now`.
    pub fn health(&self, now: SystemTime) -> Health {
        if let Some(error) = lock(&self.commit_error).as_ref() {
            return Health::Failing(format!("the buffer is not writable: {error}"));
        }
        let beat = self.batcher_beat_ms.load(Ordering::Relaxed);
        if beat == 0 {
            return Health::Failing("the batcher is not running".to_owned());
        }
        let silent = Duration::from_millis(unix_ms(now).saturating_sub(beat));
        if silent > BATCHER_STALL {
            return Health::Failing(format!(
                "the batcher loop has not run for {}s (limit {}s)",
                silent.as_secs(),
                BATCHER_STALL.as_secs()
            ));
        }
        Health::Ok
    }

    /// Every metric in the Prometheus text exposition format (version 0.0.4). `buffer` is the
    /// buffer as read for this scrape; without it the buffer gauges are left out.
    // One exposition read top to bottom; its sections are split out where they stand alone.
    #[allow(clippy::too_many_lines)]
    pub fn render(&self, buffer: Option<&BufferReport>, now: SystemTime) -> String {
        let mut out = String::with_capacity(4096);
        let p = "plantline_agent";
        header(
            &mut out,
            &format!("{p}_readings_total"),
            "counter",
            "Readings committed to the buffer, by device and quality.",
        );
        for ((device, quality), n) in lock(&self.readings).iter() {
            let _ = writeln!(
                out,
                "{p}_readings_total{{device=\"{}\",quality=\"{quality}\"}} {n}",
                escape(device)
            );
        }
        header(
            &mut out,
            &format!("{p}_modbus_errors_total"),
            "counter",
            "Failed Modbus connection attempts and failed tag reads (one per tag and poll), by device and kind (resolve, connect, timeout, exception, transport, decode, no_such_address).",
        );
        for ((device, kind), n) in lock(&self.modbus_errors).iter() {
            let _ = writeln!(
                out,
                "{p}_modbus_errors_total{{device=\"{}\",kind=\"{kind}\"}} {n}",
                escape(device)
            );
        }
        if let Some(b) = buffer {
            header(
                &mut out,
                &format!("{p}_buffer_readings"),
                "gauge",
                "Readings waiting in the buffer, including the batch being uploaded.",
            );
            let _ = writeln!(out, "{p}_buffer_readings {}", b.rows);
            header(
                &mut out,
                &format!("{p}_buffer_oldest_reading_age_seconds"),
                "gauge",
                "Age of the oldest reading waiting in the buffer; 0 when it is empty.",
            );
            let now_us = i64::try_from(unix_ms(now))
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let age = b
                .time_us
                .map_or(0.0, |(oldest, _)| (now_us - oldest).max(0) as f64 / 1e6);
            let _ = writeln!(out, "{p}_buffer_oldest_reading_age_seconds {age}");
        }
        self.render_buffer_dropped(&mut out);
        let counters = [
            (
                "batches_uploaded_total",
                "Batches the upload target confirmed.",
                &self.batches_uploaded,
            ),
            (
                "rows_uploaded_total",
                "Readings in batches the upload target confirmed.",
                &self.rows_uploaded,
            ),
            (
                "fresh_batches_uploaded_total",
                "Fresh-lane batches (copies of the newest readings sent ahead of a backlog) the upload target confirmed.",
                &self.fresh_batches_uploaded,
            ),
            (
                "fresh_rows_uploaded_total",
                "Readings in fresh-lane batches the upload target confirmed (each also goes up once in the main lane).",
                &self.fresh_rows_uploaded,
            ),
            (
                "upload_failures_total",
                "Upload attempts the target refused or did not answer (each is retried).",
                &self.upload_failures,
            ),
        ];
        for (name, help, value) in counters {
            header(&mut out, &format!("{p}_{name}"), "counter", help);
            let _ = writeln!(out, "{p}_{name} {}", value.load(Ordering::Relaxed));
        }
        lock(&self.upload_latency).render(
            &mut out,
            &format!("{p}_upload_duration_seconds"),
            "Time from the start of a batch's PUT to the target's confirmation.",
            &UPLOAD_BUCKETS,
        );
        header(
            &mut out,
            &format!("{p}_last_upload_timestamp_seconds"),
            "gauge",
            "Unix time of the last confirmed upload; 0 before the first.",
        );
        let last = self.last_upload_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{p}_last_upload_timestamp_seconds {last}");
        self.render_kinesis(&mut out);
        self.render_reloads(&mut out);
        self.render_mqtt(&mut out);
        out
    }

    /// The config reload counters, when the agent watches its config file.
    fn render_reloads(&self, out: &mut String) {
        if !self.config_reload_enabled.load(Ordering::Relaxed) {
            return;
        }
        let name = "plantline_agent_config_reloads_total";
        header(
            out,
            name,
            "counter",
            "Edits of the config file the running agent applied, or rejected (invalid, or a gateway change) and kept the running map.",
        );
        let (applied, rejected) = self.config_reloads();
        let _ = writeln!(out, "{name}{{result=\"applied\"}} {applied}");
        let _ = writeln!(out, "{name}{{result=\"rejected\"}} {rejected}");
    }

    /// Readings the buffer dropped, by reason.
    fn render_buffer_dropped(&self, out: &mut String) {
        let name = "plantline_agent_buffer_dropped_total";
        header(
            out,
            name,
            "counter",
            "Readings the buffer dropped, by reason (buffer_full, max_age, damaged_buffer); each drop is also sent to the cloud as a gap record.",
        );
        for (reason, n) in lock(&self.buffer_dropped).iter() {
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", escape(reason));
        }
    }

    /// The live stream's counters, when it is configured.
    fn render_kinesis(&self, out: &mut String) {
        if !self.kinesis_enabled.load(Ordering::Relaxed) {
            return;
        }
        let p = "plantline_agent";
        let counters = [
            (
                "kinesis_readings_sent_total",
                "Readings the Kinesis live stream delivered.",
                &self.kinesis_sent,
            ),
            (
                "kinesis_dropped_total",
                "Readings the Kinesis live stream dropped because Kinesis was slow or away (they still go to S3).",
                &self.kinesis_dropped,
            ),
            (
                "kinesis_put_failures_total",
                "PutRecords calls that failed or had refused records (each is retried).",
                &self.kinesis_put_failures,
            ),
        ];
        for (name, help, value) in counters {
            header(out, &format!("{p}_{name}"), "counter", help);
            let _ = writeln!(out, "{p}_{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

/// The MQTT source's bad payloads and dead letters.
impl Metrics {
    /// An MQTT source started on `broker`: its dead-letter counter is shown (at 0) from now on,
    /// so an alert on its rate has a series before the first drop.
    pub fn mqtt_broker_started(&self, broker: &str) {
        lock(&self.mqtt_dead_letters_dropped)
            .entry(broker.to_owned())
            .or_default();
    }

    /// Counts one message of `subscription` whose payload had a problem of kind `reason`.
    pub fn mqtt_bad_payload(&self, broker: &str, subscription: &str, reason: &'static str) {
        *lock(&self.mqtt_bad_payloads)
            .entry((broker.to_owned(), subscription.to_owned(), reason))
            .or_default() += 1;
    }

    /// Counts dead letters of `broker` that its bound dropped.
    pub fn mqtt_dead_letters_dropped(&self, broker: &str, dropped: u64) {
        *lock(&self.mqtt_dead_letters_dropped)
            .entry(broker.to_owned())
            .or_default() += dropped;
    }

    /// A Sparkplug B edge node sent an NBIRTH: its seq-gap counter is shown (at 0) from now on.
    pub fn mqtt_sparkplug_node_born(&self, broker: &str, node: &str) {
        lock(&self.mqtt_sparkplug_seq_gaps)
            .entry((broker.to_owned(), node.to_owned()))
            .or_default();
    }

    /// Counts a message of a Sparkplug B edge node whose `seq` was not the next one.
    pub fn mqtt_sparkplug_seq_gap(&self, broker: &str, node: &str) {
        *lock(&self.mqtt_sparkplug_seq_gaps)
            .entry((broker.to_owned(), node.to_owned()))
            .or_default() += 1;
    }

    /// The Sparkplug B seq gaps, once an edge node was born.
    fn render_sparkplug(&self, out: &mut String) {
        let gaps = lock(&self.mqtt_sparkplug_seq_gaps);
        if gaps.is_empty() {
            return;
        }
        let name = "plantline_mqtt_sparkplug_seq_gaps_total";
        header(
            out,
            name,
            "counter",
            "Sparkplug B messages whose seq was not the next one of their edge node (lost or reordered messages), by broker and edge node (group/node).",
        );
        for ((broker, node), n) in gaps.iter() {
            let _ = writeln!(
                out,
                "{name}{{broker=\"{}\",node=\"{}\"}} {n}",
                escape(broker),
                escape(node)
            );
        }
    }

    /// The MQTT counters, once an MQTT source has started.
    fn render_mqtt(&self, out: &mut String) {
        let dropped = lock(&self.mqtt_dead_letters_dropped);
        if dropped.is_empty() {
            return;
        }
        header(
            out,
            "plantline_mqtt_bad_payloads_total",
            "counter",
            "MQTT messages whose payload gave no reading or not all of them, by broker, subscription (topic filter) and reason (not_json, not_text, not_a_number, missing_field, not_numeric, not_finite, bad_timestamp, empty_name, topic_level; for Sparkplug B sparkplug_topic, sparkplug_decode, sparkplug_no_birth, sparkplug_unknown_alias, sparkplug_unknown_metric, sparkplug_bad_metric, sparkplug_bad_value).",
        );
        for ((broker, subscription, reason), n) in lock(&self.mqtt_bad_payloads).iter() {
            let _ = writeln!(
                out,
                "plantline_mqtt_bad_payloads_total{{broker=\"{}\",subscription=\"{}\",reason=\"{reason}\"}} {n}",
                escape(broker),
                escape(subscription)
            );
        }
        header(
            out,
            "plantline_mqtt_dead_letters_dropped_total",
            "counter",
            "Dead letters deleted from the buffer's dead-letter table to stay within the broker's max_dead_letters (oldest first).",
        );
        for (broker, n) in dropped.iter() {
            let _ = writeln!(
                out,
                "plantline_mqtt_dead_letters_dropped_total{{broker=\"{}\"}} {n}",
                escape(broker)
            );
        }
        drop(dropped);
        self.render_sparkplug(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Quality;

    fn reading(device: &str, quality: Quality) -> Reading {
        Reading {
            ts_us: 0,
            device: device.into(),
            tag: "t".into(),
            value: None,
            value_text: None,
            quality,
            unit: None,
        }
    }

    #[test]
    fn renders_counters_gauges_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.readings_committed(&[
            reading("press-3", Quality::Good),
            reading("press-3", Quality::Good),
            reading("press\"4", Quality::Bad),
        ]);
        m.modbus_error(
            "press-3",
            &PollError::NotConnected {
                device: "press-3".into(),
            },
        );
        m.modbus_error(
            "press-3",
            &PollError::Timeout {
                kind: "holding register",
                address: 1,
                timeout: Duration::from_secs(1),
            },
        );
        m.batch_uploaded(2, Duration::from_millis(500));
        m.batch_uploaded(1, Duration::from_secs(90));
        m.fresh_batch_uploaded(4);
        m.upload_failed();
        let now = UNIX_EPOCH + Duration::from_secs(100);
        let buffer = BufferReport {
            path: "b.db".into(),
            gateway: Some("gw-1".into()),
            rows: 3,
            seq: Some((4, 6)),
            time_us: Some((97_500_000, 99_000_000)),
            pending: None,
            file_bytes: 0,
            wal_bytes: 0,
            ..BufferReport::default()
        };
        let text = m.render(Some(&buffer), now);
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("plantline_agent_last_upload"))
            .collect();
        assert_eq!(
            samples,
            [
                "plantline_agent_readings_total{device=\"press\\\"4\",quality=\"bad\"} 1",
                "plantline_agent_readings_total{device=\"press-3\",quality=\"good\"} 2",
                "plantline_agent_modbus_errors_total{device=\"press-3\",kind=\"timeout\"} 1",
                "plantline_agent_buffer_readings 3",
                "plantline_agent_buffer_oldest_reading_age_seconds 2.5",
                "plantline_agent_batches_uploaded_total 2",
                "plantline_agent_rows_uploaded_total 3",
                "plantline_agent_fresh_batches_uploaded_total 1",
                "plantline_agent_fresh_rows_uploaded_total 4",
                "plantline_agent_upload_failures_total 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"0.05\"} 0",
                "plantline_agent_upload_duration_seconds_bucket{le=\"0.1\"} 0",
                "plantline_agent_upload_duration_seconds_bucket{le=\"0.25\"} 0",
                "plantline_agent_upload_duration_seconds_bucket{le=\"0.5\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"1\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"2.5\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"5\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"10\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"30\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"60\"} 1",
                "plantline_agent_upload_duration_seconds_bucket{le=\"+Inf\"} 2",
                "plantline_agent_upload_duration_seconds_sum 90.5",
                "plantline_agent_upload_duration_seconds_count 2",
            ]
        );
        assert!(text.contains("# TYPE plantline_agent_upload_duration_seconds histogram\n"));
    }

    #[test]
    fn health_names_the_failing_part() {
        let m = Metrics::default();
        assert_eq!(
            m.health(SystemTime::now()),
            Health::Failing("the batcher is not running".into())
        );
        m.batcher_alive();
        let now = SystemTime::now();
        assert_eq!(m.health(now), Health::Ok);
        assert_eq!(
            m.health(now + Duration::from_secs(301)),
            Health::Failing("the batcher loop has not run for 301s (limit 300s)".into())
        );
        m.commit_failed(&"disk I/O error");
        assert_eq!(
            m.health(now),
            Health::Failing("the buffer is not writable: disk I/O error".into())
        );
        m.readings_committed(&[]);
        assert_eq!(m.health(now), Health::Ok);
    }

    #[test]
    fn kinesis_counters_appear_once_the_live_stream_is_configured() {
        let m = Metrics::default();
        let now = UNIX_EPOCH;
        assert!(!m.render(None, now).contains("kinesis"));
        m.kinesis_enabled();
        m.kinesis_sent(7);
        m.kinesis_dropped(3);
        m.kinesis_dropped(2);
        m.kinesis_put_failed();
        let text = m.render(None, now);
        let kinesis: Vec<&str> = text.lines().filter(|l| l.contains("kinesis")).collect();
        assert_eq!(
            kinesis,
            [
                "# HELP plantline_agent_kinesis_readings_sent_total Readings the Kinesis live stream delivered.",
                "# TYPE plantline_agent_kinesis_readings_sent_total counter",
                "plantline_agent_kinesis_readings_sent_total 7",
                "# HELP plantline_agent_kinesis_dropped_total Readings the Kinesis live stream dropped because Kinesis was slow or away (they still go to S3).",
                "# TYPE plantline_agent_kinesis_dropped_total counter",
                "plantline_agent_kinesis_dropped_total 5",
                "# HELP plantline_agent_kinesis_put_failures_total PutRecords calls that failed or had refused records (each is retried).",
                "# TYPE plantline_agent_kinesis_put_failures_total counter",
                "plantline_agent_kinesis_put_failures_total 1",
            ]
        );
    }

    #[test]
    fn mqtt_counters_appear_once_a_broker_started() {
        let m = Metrics::default();
        let now = UNIX_EPOCH;
        assert!(!m.render(None, now).contains("plantline_mqtt"));
        m.mqtt_broker_started("line3");
        m.mqtt_bad_payload("line3", "meters/+/kwh", "not_a_number");
        m.mqtt_bad_payload("line3", "meters/+/kwh", "not_a_number");
        m.mqtt_bad_payload("line3", "plant/\"x\"/#", "not_json");
        m.mqtt_dead_letters_dropped("line3", 4);
        let text = m.render(None, now);
        let mqtt: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("plantline_mqtt"))
            .collect();
        assert_eq!(
            mqtt,
            [
                "plantline_mqtt_bad_payloads_total{broker=\"line3\",subscription=\"meters/+/kwh\",reason=\"not_a_number\"} 2",
                "plantline_mqtt_bad_payloads_total{broker=\"line3\",subscription=\"plant/\\\"x\\\"/#\",reason=\"not_json\"} 1",
                "plantline_mqtt_dead_letters_dropped_total{broker=\"line3\"} 4",
            ]
        );
        assert!(text.contains("# TYPE plantline_mqtt_bad_payloads_total counter\n"));
        assert!(text.contains("# TYPE plantline_mqtt_dead_letters_dropped_total counter\n"));
    }

    #[test]
    fn sparkplug_seq_gaps_are_counted_per_edge_node_from_its_birth() {
        let m = Metrics::default();
        let now = UNIX_EPOCH;
        m.mqtt_broker_started("line3");
        assert!(
            !m.render(None, now)
                .contains("plantline_mqtt_sparkplug_seq_gaps_total")
        );
        m.mqtt_sparkplug_node_born("line3", "assembly/press-7");
        m.mqtt_sparkplug_node_born("line3", "assembly/press-8");
        m.mqtt_sparkplug_seq_gap("line3", "assembly/press-7");
        m.mqtt_sparkplug_seq_gap("line3", "assembly/press-7");
        m.mqtt_sparkplug_node_born("line3", "assembly/press-7");
        let text = m.render(None, now);
        let gaps: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("plantline_mqtt_sparkplug"))
            .collect();
        assert_eq!(
            gaps,
            vec![
                "plantline_mqtt_sparkplug_seq_gaps_total{broker=\"line3\",node=\"assembly/press-7\"} 2",
                "plantline_mqtt_sparkplug_seq_gaps_total{broker=\"line3\",node=\"assembly/press-8\"} 0",
            ]
        );
        assert!(text.contains("# TYPE plantline_mqtt_sparkplug_seq_gaps_total counter\n"));
    }

    #[test]
    fn config_reload_counters_appear_once_reloads_are_enabled() {
        let m = Metrics::default();
        assert!(!m.render(None, UNIX_EPOCH).contains("config_reloads"));
        m.config_reload_enabled();
        m.config_reloaded(true);
        m.config_reloaded(false);
        m.config_reloaded(true);
        assert_eq!(m.config_reloads(), (2, 1));
        let text = m.render(None, UNIX_EPOCH);
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("plantline_agent_config_reloads_total"))
            .collect();
        assert_eq!(
            samples,
            [
                "plantline_agent_config_reloads_total{result=\"applied\"} 2",
                "plantline_agent_config_reloads_total{result=\"rejected\"} 1",
            ]
        );
        assert!(text.contains("# TYPE plantline_agent_config_reloads_total counter\n"));
    }
}
