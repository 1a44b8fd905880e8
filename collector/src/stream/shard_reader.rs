//! The Kinesis calls of the live path: listing shards, opening shard iterators at a position,
//! reading records. Each call is one attempt; the consumer owns retries and backoff, because
//! only it knows which position a retry must start from.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::types::ShardIteratorType;

use super::config::{StartPosition, StreamConfig};

/// GetRecords returns at most this many records per call (Kinesis allows up to 10 000).
const RECORDS_PER_CALL: i32 = 5_000;

/// A failed Kinesis call. Every variant names the stream and, where there is one, the shard.
#[derive(Debug, thiserror::Error)]
pub enum KinesisError {
    /// The shard's read limits (5 calls, 2 MiB per second) are used up: wait and retry.
    #[error("stream {stream}, shard {shard}: read throughput exceeded ({message}); backing off")]
    Throttled {
        stream: String,
        shard: String,
        message: String,
    },
    /// The iterator is older than 5 minutes: open a new one at the last position read.
    #[error("stream {stream}, shard {shard}: the shard iterator expired; reopening it")]
    ExpiredIterator { stream: String, shard: String },
    #[error("stream {stream}{}: {operation} failed: {message}", shard.as_deref().map(|s| format!(", shard {s}")).unwrap_or_default())]
    Call {
        stream: String,
        shard: Option<String>,
        operation: &'static str,
        message: String,
    },
}

/// A shard and the shards it was split or merged from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub id: String,
    pub parents: Vec<String>,
}

/// Where to open a shard iterator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Right after this sequence number (a position the live table holds, or the last read).
    After(String),
    /// A shard with no position yet.
    Start(StartPosition),
}

/// One record as read from a shard.
#[derive(Debug, Clone)]
pub struct FetchedRecord {
    pub sequence_number: String,
    pub data: Vec<u8>,
    /// Kinesis's approximate arrival time, microseconds since the Unix epoch.
    pub arrival_us: Option<i64>,
}

/// What one GetRecords call returned.
#[derive(Debug)]
pub struct Fetched {
    pub records: Vec<FetchedRecord>,
    /// `None` once a closed shard (split or merged away) has been read to its end.
    pub next_iterator: Option<String>,
    /// How far the call's last record is behind the tip of the stream (`MillisBehindLatest`);
    /// 0 when the shard is read up to the tip. `None` when the server did not say.
    pub millis_behind_latest: Option<i64>,
}

/// A Kinesis client for one stream.
#[derive(Debug, Clone)]
pub struct ShardReader {
    client: aws_sdk_kinesis::Client,
    stream: String,
}

impl ShardReader {
    /// A client for `config`'s stream, with credentials from the AWS default chain, looked up
    /// at the first call.
    pub async fn connect(config: &StreamConfig) -> Self {
        let timeouts = TimeoutConfig::builder()
            .operation_attempt_timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(timeouts)
            // The consumer retries each shard on its own schedule from its own position.
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
        )
    }

    /// A reader on a client built elsewhere (other credentials, a test server).
    pub fn with_client(client: aws_sdk_kinesis::Client, stream: &str) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    fn call_error<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
        &self,
        operation: &'static str,
        shard: Option<&str>,
        e: &SdkError<E, R>,
    ) -> KinesisError {
        KinesisError::Call {
            stream: self.stream.clone(),
            shard: shard.map(str::to_owned),
            operation,
            message: describe(e),
        }
    }

    /// Every shard the stream still retains, open and closed, in Kinesis's order.
    pub async fn list_shards(&self) -> Result<Vec<ShardInfo>, KinesisError> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // With a token Kinesis refuses the stream name: the token already names it.
            let request = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.stream),
            };
            let out = request
                .send()
                .await
                .map_err(|e| self.call_error("ListShards", None, &e))?;
            shards.extend(out.shards().iter().map(|s| {
                ShardInfo {
                    id: s.shard_id().to_owned(),
                    parents: s
                        .parent_shard_id()
                        .into_iter()
                        .chain(s.adjacent_parent_shard_id())
                        .map(str::to_owned)
                        .collect(),
                }
            }));
            match out.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(shards),
            }
        }
    }

    /// An iterator on `shard` starting at `from`.
    pub async fn iterator(&self, shard: &str, from: &StartAt) -> Result<String, KinesisError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&self.stream)
            .shard_id(shard);
        let request = match from {
            StartAt::After(sequence_number) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence_number),
            StartAt::Start(StartPosition::TrimHorizon) => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            StartAt::Start(StartPosition::Latest) => {
                request.shard_iterator_type(ShardIteratorType::Latest)
            }
        };
        let out = request
            .send()
            .await
            .map_err(|e| self.call_error("GetShardIterator", Some(shard), &e))?;
        out.shard_iterator()
            .map(str::to_owned)
            .ok_or_else(|| KinesisError::Call {
                stream: self.stream.clone(),
                shard: Some(shard.to_owned()),
                operation: "GetShardIterator",
                message: "the answer holds no iterator".to_owned(),
            })
    }

    /// The next records of `shard` after `iterator`.
    pub async fn get_records(&self, shard: &str, iterator: &str) -> Result<Fetched, KinesisError> {
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(RECORDS_PER_CALL)
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(
                    GetRecordsError::ProvisionedThroughputExceededException(_)
                    | GetRecordsError::KmsThrottlingException(_),
                ) => KinesisError::Throttled {
                    stream: self.stream.clone(),
                    shard: shard.to_owned(),
                    message: describe(&e),
                },
                Some(GetRecordsError::ExpiredIteratorException(_)) => {
                    KinesisError::ExpiredIterator {
                        stream: self.stream.clone(),
                        shard: shard.to_owned(),
                    }
                }
                _ => self.call_error("GetRecords", Some(shard), &e),
            })?;
        let records = out
            .records()
            .iter()
            .map(|r| FetchedRecord {
                sequence_number: r.sequence_number().to_owned(),
                data: r.data().as_ref().to_vec(),
                arrival_us: r
                    .approximate_arrival_timestamp()
                    .and_then(|t| t.to_millis().ok())
                    .map(|ms| ms.saturating_mul(1000)),
            })
            .collect();
        Ok(Fetched {
            records,
            next_iterator: out.next_shard_iterator().map(str::to_owned),
            millis_behind_latest: out.millis_behind_latest(),
        })
    }
}

/// The service's error code and message, or the transport error.
fn describe<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    e: &SdkError<E, R>,
) -> String {
    match e {
        SdkError::ServiceError(service) => {
            let err = service.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("unknown error"),
                err.message().unwrap_or("no message")
            )
        }
        other => format!("{other:?}"),
    }
}
