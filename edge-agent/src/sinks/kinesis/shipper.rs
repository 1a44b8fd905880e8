//! The task that ships the live queue to Kinesis with PutRecords.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{LiveQueue, Record, encode, plan_calls};
use crate::config::KinesisConfig;

/// How many readings one round takes from the queue; more wait for the next round.
const READINGS_PER_ROUND: usize = 20_000;
/// Retry waits after a failed call or failed records: doubling from the first to the cap.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// At shutdown, how long the readings still queued may take to go out.
const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Problems talking to Kinesis. Every one is retried; none stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    #[error("PutRecords to stream {stream} failed: {message}")]
    Put { stream: String, message: String },
    #[error(
        "{failed} of {sent} records to stream {stream} were refused, first with {code}: {message}"
    )]
    Refused {
        stream: String,
        failed: usize,
        sent: usize,
        code: String,
        message: String,
    },
}

/// What a PutRecords answer means for the records sent with it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Readings in the records Kinesis accepted.
    pub accepted_readings: usize,
    /// The records to send again, in their original order.
    pub failed: Vec<Record>,
    /// The first refusal's error code and message, for the log.
    pub first_error: Option<(String, String)>,
}

/// Splits `sent` by the per-record results of a PutRecords answer (same order as sent). A
/// record with an error code (throttling, an internal failure) failed; so does one the answer
/// has no entry for, since nothing says it was stored.
pub fn failed_records(sent: Vec<Record>, results: &[PutRecordsResultEntry]) -> Outcome {
    let mut outcome = Outcome::default();
    for (i, record) in sent.into_iter().enumerate() {
        let error = match results.get(i) {
            Some(entry) => entry.error_code().map(|code| {
                (
                    code.to_owned(),
                    entry.error_message().unwrap_or_default().to_owned(),
                )
            }),
            None => Some((
                "Missing".to_owned(),
                "the answer has no entry for this record".to_owned(),
            )),
        };
        match error {
            None => outcome.accepted_readings += record.readings,
            Some(e) => {
                outcome.first_error.get_or_insert(e);
                outcome.failed.push(record);
            }
        }
    }
    outcome
}

/// Ships the live queue to one stream until cancelled.
pub struct KinesisShipper {
    client: aws_sdk_kinesis::Client,
    stream: String,
    gateway: String,
    queue: LiveQueue,
    linger: Duration,
}

impl KinesisShipper {
    /// Builds the client. Credentials come from the AWS default chain and are looked up at the
    /// first call, so a gateway without network yet still starts.
    pub async fn new(config: &KinesisConfig, gateway: &str, queue: LiveQueue) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(config.timeout.0)
            .connect_timeout(Duration::from_secs(5))
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .http_client(crate::sinks::aws_https_client())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(timeouts)
            // This loop owns the retries: it retries only failed records and gives up on
            // records the queue has overtaken, which the SDK's retries cannot know.
            .retry_config(RetryConfig::disabled())
            .load()
            .await;
        let mut builder = aws_sdk_kinesis::config::Builder::from(&shared);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self::with_client(
            aws_sdk_kinesis::Client::from_conf(builder.build()),
            &config.stream,
            gateway,
            queue,
            config.max_linger.0,
        )
    }

    /// A shipper on a client built elsewhere (other credentials, a test server).
    pub fn with_client(
        client: aws_sdk_kinesis::Client,
        stream: &str,
        gateway: &str,
        queue: LiveQueue,
        linger: Duration,
    ) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
            gateway: gateway.to_owned(),
            queue,
            linger,
        }
    }

    /// Sends what the queue holds, round after round, until `stop` is cancelled; then sends what
    /// is still queued within a short deadline. What misses it is logged as `unsent`: the live
    /// stream is best effort, the batches carry every reading.
    pub async fn run(self, stop: CancellationToken) {
        info!(
            component = "kinesis",
            stream = self.stream,
            "live stream started"
        );
        let mut unsent = self.rounds(&stop).await;
        if unsent == 0 {
            // What the last commits queued goes out too, unless Kinesis cannot take it in time.
            let flush_stop = CancellationToken::new();
            let timer = {
                let flush_stop = flush_stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(FLUSH_DEADLINE).await;
                    flush_stop.cancel();
                })
            };
            unsent = self.drain(&flush_stop).await.unwrap_or(0);
            timer.abort();
        }
        // Every committed reading was sent, dropped (counted) or is one of these.
        let metrics = crate::metrics::global();
        info!(
            component = "kinesis",
            stream = self.stream,
            sent_total = metrics.kinesis_sent_total(),
            dropped_total = metrics.kinesis_dropped_total(),
            unsent = self.queue.len() + unsent,
            "live stream stopped"
        );
    }

    /// Rounds of wait, linger and drain until `stop`; returns how many taken readings were
    /// not sent then.
    async fn rounds(&self, stop: &CancellationToken) -> usize {
        loop {
            tokio::select! {
                () = stop.cancelled() => return 0,
                () = self.queue.arrived() => {},
            }
            // Let more readings join this round's calls.
            tokio::select! {
                () = stop.cancelled() => return 0,
                () = tokio::time::sleep(self.linger) => {},
            }
            if let Some(unsent) = self.drain(stop).await {
                return unsent;
            }
        }
    }

    /// Sends what the queue holds until it is empty; when `stop` comes first, returns how many
    /// taken readings were not sent.
    async fn drain(&self, stop: &CancellationToken) -> Option<usize> {
        loop {
            let readings = self.queue.take(READINGS_PER_ROUND);
            if readings.is_empty() {
                return None;
            }
            let mut calls = plan_calls(encode(&self.gateway, &readings)).into_iter();
            while let Some(call) = calls.next() {
                if let Some(unsent) = self.send(call, stop).await {
                    let later: usize = calls.flatten().map(|r| r.readings).sum();
                    return Some(unsent + later);
                }
            }
        }
    }

    /// Sends one call's records until all are accepted, the queue overtakes them, or `stop`.
    /// Returns the readings still unsent when stopped.
    async fn send(&self, mut records: Vec<Record>, stop: &CancellationToken) -> Option<usize> {
        let mut wait = FIRST_RETRY;
        loop {
            match self.put(&records).await {
                Ok(results) => {
                    let sent = records.len();
                    let outcome = failed_records(records, &results);
                    crate::metrics::global().kinesis_sent(outcome.accepted_readings);
                    if outcome.failed.is_empty() {
                        debug!(component = "kinesis", records = sent, "records accepted");
                        return None;
                    }
                    let (code, message) = outcome.first_error.unwrap_or_default();
                    let error = KinesisError::Refused {
                        stream: self.stream.clone(),
                        failed: outcome.failed.len(),
                        sent,
                        code,
                        message,
                    };
                    crate::metrics::global().kinesis_put_failed();
                    warn!(
                        component = "kinesis",
                        retry_in_ms = crate::millis(wait),
                        "{error}"
                    );
                    records = outcome.failed;
                }
                Err(error) => {
                    crate::metrics::global().kinesis_put_failed();
                    warn!(
                        component = "kinesis",
                        retry_in_ms = crate::millis(wait),
                        "{error}"
                    );
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Some(records.iter().map(|r| r.readings).sum()),
                () = tokio::time::sleep(jitter(wait)) => {},
            }
            wait = (wait * 2).min(MAX_RETRY);
            if self.queue.is_full() {
                // Newer readings are being dropped already; these are older still, so they
                // give way too, and the stream resumes with fresh readings when Kinesis is back.
                let dropped: usize = records.iter().map(|r| r.readings).sum();
                let dropped = u64::try_from(dropped).unwrap_or(u64::MAX);
                crate::metrics::global().kinesis_dropped(dropped);
                warn!(
                    component = "kinesis",
                    dropped,
                    "live queue full while retrying: dropped the unsent readings (they still go to S3)"
                );
                return None;
            }
        }
    }

    async fn put(&self, records: &[Record]) -> Result<Vec<PutRecordsResultEntry>, KinesisError> {
        let entries = records
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&r.partition_key)
                    .data(Blob::new(r.data.clone()))
                    .build()
                    .expect("data and partition key, the required fields, are set")
            })
            .collect();
        self.client
            .put_records()
            .stream_name(&self.stream)
            .set_records(Some(entries))
            .send()
            .await
            .map(|out| out.records().to_vec())
            .map_err(|e| KinesisError::Put {
                stream: self.stream.clone(),
                message: aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
            })
    }
}

/// `wait` give or take a quarter, so gateways that lost Kinesis together do not retry in step.
fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(rand::random_range(0.75..1.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(device: &str, readings: usize) -> Record {
        Record {
            partition_key: device.into(),
            data: device.as_bytes().to_vec(),
            readings,
        }
    }

    fn ok() -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .sequence_number("1")
            .shard_id("shardId-000000000000")
            .build()
    }

    fn refused(code: &str) -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .error_code(code)
            .error_message("Rate exceeded for shard shardId-000000000000")
            .build()
    }

    // moto accepts every record of a call, so the partial failure Kinesis reports under
    // throttling is tested here, on the function that reads the answer.
    #[test]
    fn only_the_refused_records_are_sent_again() {
        let sent = vec![
            record("a", 3),
            record("b", 4),
            record("c", 5),
            record("d", 6),
        ];
        let outcome = failed_records(
            sent,
            &[
                ok(),
                refused("ProvisionedThroughputExceededException"),
                ok(),
                refused("InternalFailure"),
            ],
        );
        assert_eq!(
            outcome,
            Outcome {
                accepted_readings: 8,
                failed: vec![record("b", 4), record("d", 6)],
                first_error: Some((
                    "ProvisionedThroughputExceededException".to_owned(),
                    "Rate exceeded for shard shardId-000000000000".to_owned()
                )),
            }
        );
    }

    #[test]
    fn records_the_answer_does_not_mention_are_sent_again() {
        let outcome = failed_records(vec![record("a", 1), record("b", 2)], &[ok()]);
        assert_eq!(outcome.accepted_readings, 1);
        assert_eq!(outcome.failed, vec![record("b", 2)]);
        assert_eq!(outcome.first_error.unwrap().0, "Missing");
    }
}
