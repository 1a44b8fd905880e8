//! Discovery through S3 event notifications delivered by SQS (`[discovery] mode = "sqs"`), the
//! mechanism of Auto Loader's notification mode and Snowpipe's auto-ingest.
//!
//! A notification only says "look at gateway G": the gateways named by one receive go through
//! the same per-gateway pass as list mode ([`crate::ingest::ingest_gateway`]), which lists that
//! gateway's folder (it holds only unapplied batches; applied ones are archived) and applies its
//! batches in `seq` order above the Delta `txn` watermark. So notifications that arrive out of
//! order, twice, or not at all for a batch cost nothing in correctness: guarantee 4 of the batch
//! contract (a gateway uploads batch k+1 only after batch k's PUT succeeded) means the listing
//! triggered by batch k+1's notification already shows batch k.
//!
//! # The message rules
//! - A message is deleted only when every batch it names is settled: the gateway's watermark in
//!   the readings table covers the batch's first `seq` (its commit is done, by this instance or
//!   another one), or the file was quarantined, or it is no longer in the raw zone (archived or
//!   quarantined by another instance). A fresh-lane batch (contract v3, `gateway=<id>/fresh/`)
//!   is settled once it is no longer in the raw zone, was quarantined, or its gateway's pass left
//!   it for later (deferred: a later pass of the gateway, which the main lane's next
//!   notification triggers, applies it; the main lane carries its readings anyway).
//! - A batch that is not settled after its gateway's pass (the pass stopped on a store or Delta
//!   failure before it, or its predecessor's did) waits: its message is not deleted and comes
//!   back after `visibility_timeout`, the work lease. While a receive's gateways are applied the
//!   lease of its messages is renewed every half lease, so a long batch does not lose it.
//! - A message that keeps coming back (the failure is not transient after all, or the body is
//!   not an S3 event at all) moves to the dead-letter queue once the queue's redrive policy
//!   (`maxReceiveCount`) says so. Nothing is lost with it: the file stays under the raw prefix,
//!   and the next notification for the gateway, or one list-mode pass, applies it.
//! - A file that breaks the batch contract is quarantined with its reason, like in list mode;
//!   its message is then settled and deleted.
//! - Messages naming nothing the collector applies are deleted with a log line: the `s3:TestEvent`,
//!   other event kinds, objects of another bucket, under the archive or quarantine prefix, or
//!   outside any gateway folder.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName,
};
use edge_agent::contract::{self, BatchKey, Lane};
use object_store::ObjectStoreExt as _;
use object_store::path::Path;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::config::DiscoveryConfig;
use super::events::{self, Notice};
use super::report::merge_gateway;
use crate::config::{S3Config, StoreLocation};
use crate::delta::Tables;
use crate::ingest::{GatewayReport, IngestOptions, IngestReport, ingest_gateway};
use crate::raw_zone::RawZone;

/// Receives per pass at most; a queue that never runs dry still lets the pass go on to Snowflake
/// and the metrics.
const MAX_RECEIVES_PER_PASS: usize = 50;

/// Errors of the queue itself; each names the queue and what to check.
#[derive(Debug, thiserror::Error)]
pub enum SqsError {
    #[error(
        "discovery: cannot receive from SQS queue `{queue_url}`: {detail}; check `discovery.queue_url`, the region (`s3.region`) and the sqs:ReceiveMessage permission"
    )]
    Receive { queue_url: String, detail: String },
    #[error(
        "discovery: `raw.url` must be an s3:// bucket for mode = \"sqs\"; use mode = \"list\" for a local raw zone"
    )]
    LocalRawZone,
}

/// What a message's object means for the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A batch file of a gateway, in either lane.
    Batch {
        gateway: String,
        first_seq: i64,
        lane: Lane,
        raw_key: String,
    },
    /// Another object in a gateway's folder, which the gateway's pass quarantines (or leaves
    /// alone while it is an upload in flight).
    GatewayObject { gateway: String, raw_key: String },
    /// Nothing to apply, with why.
    Ignored(&'static str),
}

impl Target {
    fn gateway(&self) -> Option<&str> {
        match self {
            Self::Batch { gateway, .. } | Self::GatewayObject { gateway, .. } => Some(gateway),
            Self::Ignored(_) => None,
        }
    }
}

/// The queue, opened.
#[derive(Debug, Clone)]
pub struct SqsDiscovery {
    client: Client,
    queue_url: String,
    bucket: String,
    root: String,
    lease: Duration,
    max_messages: i32,
    wait: Duration,
}

impl SqsDiscovery {
    /// A client for `discovery.queue_url` in `s3.region`, with the fixed test credentials when
    /// the code set them, the AWS default chain otherwise.
    pub async fn connect(
        discovery: &DiscoveryConfig,
        s3: &S3Config,
        raw: &StoreLocation,
    ) -> Result<Self, SqsError> {
        let StoreLocation::S3 { bucket, root } = raw else {
            return Err(SqsError::LocalRawZone);
        };
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(s3.region.clone()));
        if let Some(c) = &s3.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                None,
                None,
                "plantline-static",
            ));
        }
        if let Some(endpoint) = &discovery.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let client = Client::new(&loader.load().await);
        Ok(Self {
            client,
            queue_url: discovery.queue_url.clone().unwrap_or_default(),
            bucket: bucket.clone(),
            root: root.clone(),
            lease: discovery.visibility_timeout.0,
            max_messages: i32::try_from(discovery.max_messages).unwrap_or(10),
            wait: discovery.wait_time.0,
        })
    }

    /// Receives until the queue has nothing visible (or [`MAX_RECEIVES_PER_PASS`]), applying the
    /// gateways each receive names, and deletes the settled messages. A failing gateway is
    /// recorded in its report; only failing to receive is an error.
    pub async fn ingest(
        &self,
        raw: &RawZone,
        tables: &mut Tables,
        options: &IngestOptions,
    ) -> Result<IngestReport, SqsError> {
        let mut report = IngestReport::default();
        for _ in 0..MAX_RECEIVES_PER_PASS {
            let messages = self.receive().await?;
            if messages.is_empty() {
                break;
            }
            self.handle(raw, tables, options, &messages, &mut report)
                .await;
        }
        report.gateways.sort_by(|a, b| a.gateway.cmp(&b.gateway));
        Ok(report)
    }

    async fn receive(&self) -> Result<Vec<Message>, SqsError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(self.max_messages)
            .wait_time_seconds(whole_seconds(self.wait))
            .visibility_timeout(whole_seconds(self.lease))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| SqsError::Receive {
                queue_url: self.queue_url.clone(),
                detail: DisplayErrorContext(&e).to_string(),
            })?;
        Ok(output.messages.unwrap_or_default())
    }

    async fn handle(
        &self,
        raw: &RawZone,
        tables: &mut Tables,
        options: &IngestOptions,
        messages: &[Message],
        report: &mut IngestReport,
    ) {
        let (mut settled, waiting) = self.sort(raw, messages);

        let gateways: BTreeSet<String> = waiting
            .iter()
            .flat_map(|(_, targets)| targets.iter().filter_map(Target::gateway))
            .map(str::to_owned)
            .collect();
        let renewal = CancellationToken::new();
        let renewer = tokio::spawn(renew_leases(
            self.client.clone(),
            self.queue_url.clone(),
            waiting
                .iter()
                .filter_map(|(m, _)| m.receipt_handle().map(str::to_owned))
                .collect(),
            self.lease,
            renewal.clone(),
        ));
        let mut quarantined: BTreeSet<String> = BTreeSet::new();
        let mut deferred: BTreeSet<String> = BTreeSet::new();
        let mut watermarks: BTreeMap<String, Option<i64>> = BTreeMap::new();
        for gateway in &gateways {
            let gw = match ingest_gateway(raw, tables, gateway, options).await {
                Ok(gw) => gw,
                Err(e) => {
                    error!(component = "discovery", gateway = %gateway, error = %e, "gateway pass ended early; its messages come back after the visibility timeout");
                    GatewayReport {
                        gateway: gateway.clone(),
                        error: Some(e.to_string()),
                        ..GatewayReport::default()
                    }
                }
            };
            quarantined.extend(gw.quarantined.iter().map(|q| q.key.clone()));
            deferred.extend(gw.fresh_deferred.iter().cloned());
            // Read again rather than taken from the report: a pass that failed half-way still
            // committed its first chunks.
            let watermark = tables.readings.watermark(gateway).await.ok().flatten();
            watermarks.insert(gateway.clone(), watermark);
            merge_gateway(report, gw);
        }
        renewal.cancel();
        let _ = renewer.await;

        for (message, targets) in waiting {
            let mut done = true;
            for target in &targets {
                if !self
                    .is_settled(raw, target, &watermarks, &quarantined, &deferred)
                    .await
                {
                    done = false;
                    break;
                }
            }
            if done {
                settled.push(message);
            } else {
                info!(
                    component = "discovery",
                    message_id = message.message_id().unwrap_or_default(),
                    "batch not applied yet; its message waits for the next delivery"
                );
            }
        }
        self.delete(&settled).await;
    }

    /// Sorts received messages into those to delete now and those naming gateways to apply.
    /// Messages that are not S3 events are in neither: they are left for the redrive policy.
    fn sort<'m>(
        &self,
        raw: &RawZone,
        messages: &'m [Message],
    ) -> (Vec<&'m Message>, Vec<(&'m Message, Vec<Target>)>) {
        let mut settled = Vec::new();
        let mut waiting = Vec::new();
        for message in messages {
            let id = message.message_id().unwrap_or_default();
            match events::parse(message.body().unwrap_or_default()) {
                Err(problem) => {
                    error!(
                        component = "discovery",
                        message_id = id,
                        receive_count = receive_count(message),
                        "SQS message {problem}; left in the queue, its redrive policy moves it to the dead-letter queue"
                    );
                }
                Ok(Notice::Test) => {
                    info!(
                        component = "discovery",
                        message_id = id,
                        "s3:TestEvent received: the bucket notification reaches the queue; deleted"
                    );
                    settled.push(message);
                }
                Ok(Notice::Created(objects)) => {
                    let targets: Vec<Target> = objects
                        .iter()
                        .map(|(bucket, key)| {
                            let target = self.classify(raw, bucket, key);
                            if let Target::Ignored(why) = &target {
                                info!(component = "discovery", message_id = id, bucket = %bucket, key = %key, "notification for an object {why}; ignored");
                            }
                            target
                        })
                        .filter(|t| t.gateway().is_some())
                        .collect();
                    if targets.is_empty() {
                        settled.push(message);
                    } else {
                        waiting.push((message, targets));
                    }
                }
            }
        }
        (settled, waiting)
    }

    /// Maps an object of a notification to what the collector does with it.
    pub(crate) fn classify(&self, raw: &RawZone, bucket: &str, key: &str) -> Target {
        if bucket != self.bucket {
            return Target::Ignored("in another bucket than `raw.url`");
        }
        let Some(key) = key.strip_prefix(self.root.as_str()) else {
            return Target::Ignored("outside the root of `raw.url`");
        };
        if key.starts_with(raw.archive_prefix()) {
            return Target::Ignored("under the archive prefix");
        }
        if key.starts_with(raw.quarantine_prefix()) {
            return Target::Ignored("under the quarantine prefix");
        }
        if let Ok(batch) = BatchKey::parse(raw.prefix(), key) {
            return Target::Batch {
                gateway: batch.gateway,
                first_seq: batch.first_seq,
                lane: batch.lane,
                raw_key: key.to_owned(),
            };
        }
        let gateway = key
            .strip_prefix(raw.prefix())
            .and_then(|rest| rest.strip_prefix("gateway="))
            .and_then(|rest| rest.split_once('/'))
            .map(|(gateway, _)| gateway)
            .filter(|g| contract::check_gateway_id(g).is_ok());
        match gateway {
            Some(gateway) => Target::GatewayObject {
                gateway: gateway.to_owned(),
                raw_key: key.to_owned(),
            },
            None => Target::Ignored("outside every gateway folder of `raw.prefix`"),
        }
    }

    async fn is_settled(
        &self,
        raw: &RawZone,
        target: &Target,
        watermarks: &BTreeMap<String, Option<i64>>,
        quarantined: &BTreeSet<String>,
        deferred: &BTreeSet<String>,
    ) -> bool {
        let raw_key = match target {
            Target::Ignored(_) => return true,
            Target::Batch {
                gateway,
                first_seq,
                lane,
                raw_key,
            } => {
                // A fresh batch at or below the watermark may still hold readings above it.
                let applied = *lane == Lane::Main
                    && watermarks
                        .get(gateway)
                        .copied()
                        .flatten()
                        .is_some_and(|w| w >= *first_seq);
                if applied || quarantined.contains(raw_key) || deferred.contains(raw_key) {
                    return true;
                }
                raw_key
            }
            Target::GatewayObject { raw_key, .. } => raw_key,
        };
        // Still in the raw zone: it waits. Gone: another instance archived or quarantined it.
        let Ok(path) = Path::parse(raw_key) else {
            return true;
        };
        matches!(
            raw.store().head(&path).await,
            Err(object_store::Error::NotFound { .. })
        )
    }

    async fn delete(&self, messages: &[&Message]) {
        for chunk in messages.chunks(10) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle()?)
                        .build()
                        .ok()
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            let result = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await;
            match result {
                Ok(out) if out.failed().is_empty() => {}
                Ok(out) => {
                    for failed in out.failed() {
                        warn!(component = "discovery", queue = %self.queue_url, entry = failed.id(), code = failed.code(), "cannot delete a settled message; it comes back after the visibility timeout and is deleted then as already applied");
                    }
                }
                Err(e) => {
                    warn!(component = "discovery", queue = %self.queue_url, error = %DisplayErrorContext(&e), "cannot delete settled messages; they come back after the visibility timeout and are deleted then as already applied");
                }
            }
        }
    }
}

/// Renews the lease of `receipts` every half lease until `stop`.
async fn renew_leases(
    client: Client,
    queue_url: String,
    receipts: Vec<String>,
    lease: Duration,
    stop: CancellationToken,
) {
    if receipts.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(lease / 2) => {}
        }
        for chunk in receipts.chunks(10) {
            let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, receipt)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(whole_seconds(lease))
                        .build()
                        .ok()
                })
                .collect();
            if let Err(e) = client
                .change_message_visibility_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                warn!(component = "discovery", queue = %queue_url, error = %DisplayErrorContext(&e), "cannot renew the lease of messages being applied; another instance may receive them and find them applied");
            }
        }
    }
}

fn whole_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

fn receive_count(message: &Message) -> u32 {
    message
        .attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}
