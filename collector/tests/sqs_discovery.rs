//! Scale-out discovery against moto: S3 `ObjectCreated` notifications that moto's S3 itself
//! delivers to its SQS queue (configured with PutBucketNotificationConfiguration, as on AWS),
//! a redrive policy that moves poison messages to a dead-letter queue, and instances that split
//! the gateways by `shard`. The readings table is read back with `DuckDB`.

use std::collections::BTreeSet;
use std::path::Path as FsPath;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::types::QueueAttributeName;
use bytes::Bytes;
use collector::config::{CollectorConfig, S3Credentials};
use collector::discovery::Shard;
use edge_agent::contract::{self, BatchKey, Quality, Row};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pipeline_e2e::{
    MotoServer, PeerVenv, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY, duckdb_query,
};

fn row(gateway: &str, seq: i64) -> Row {
    Row {
        seq,
        ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
        site: "plant-ost".into(),
        gateway: gateway.into(),
        device: "press-3".into(),
        tag: "oil_temp".into(),
        value: Some(seq as f64 / 2.0),
        quality: Quality::Good,
        unit: Some("degC".into()),
        value_text: None,
    }
}

fn parquet(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<u8> {
    let rows: Vec<Row> = seqs.map(|s| row(gateway, s)).collect();
    let mut out = Vec::new();
    let batch = contract::to_record_batch(&rows);
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// moto with a raw bucket whose `raw/` notifications go to a queue with a dead-letter queue.
struct Peers {
    moto: MotoServer,
    raw: String,
    lake: String,
    sqs: Client,
    queue_url: String,
    dlq_url: String,
    store: Arc<dyn ObjectStore>,
}

impl Peers {
    async fn start() -> Self {
        let moto = MotoServer::start();
        let (raw, lake) = (moto.create_bucket(), moto.create_bucket());
        let sqs = Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(S3_REGION))
                .endpoint_url(moto.endpoint())
                .credentials_provider(Credentials::new(
                    S3_ACCESS_KEY_ID,
                    S3_SECRET_ACCESS_KEY,
                    None,
                    None,
                    "test",
                ))
                .build(),
        );
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let dlq_url = create_queue(&sqs, &format!("plantline-dlq-{suffix}"), None).await;
        let dlq_arn = queue_arn(&sqs, &dlq_url).await;
        let redrive = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"});
        let queue_url = create_queue(
            &sqs,
            &format!("plantline-raw-{suffix}"),
            Some(redrive.to_string()),
        )
        .await;
        let arn = queue_arn(&sqs, &queue_url).await;
        notify_queue(&moto, &raw, &arn);
        let store: Arc<dyn ObjectStore> = Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(&raw)
                .with_region(S3_REGION)
                .with_endpoint(moto.endpoint())
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false)
                .with_access_key_id(S3_ACCESS_KEY_ID)
                .with_secret_access_key(S3_SECRET_ACCESS_KEY)
                .build()
                .unwrap(),
        );
        Self {
            moto,
            raw,
            lake,
            sqs,
            queue_url,
            dlq_url,
            store,
        }
    }

    async fn upload(&self, gateway: &str, seqs: std::ops::RangeInclusive<i64>) {
        let key = BatchKey::new(gateway, *seqs.start()).to_key("raw/");
        self.put(&key, parquet(gateway, seqs)).await;
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.store
            .put(
                &Path::parse(key).unwrap(),
                PutPayload::from(Bytes::from(body)),
            )
            .await
            .unwrap();
    }

    async fn send(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Visible plus in-flight messages of a queue.
    async fn messages_in(&self, queue_url: &str) -> u64 {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        out.attributes()
            .unwrap()
            .values()
            .map(|v| v.parse::<u64>().unwrap())
            .sum()
    }

    fn config(&self, dir: &FsPath, discovery: &str) -> CollectorConfig {
        let path = dir.join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "[raw]\nurl = \"s3://{}\"\n\n[delta]\nurl = \"s3://{}/readings\"\n\n[s3]\nendpoint = \"{}\"\nallow_http = true\n\n[discovery]\n{discovery}\n",
                self.raw,
                self.lake,
                self.moto.endpoint()
            ),
        )
        .unwrap();
        let mut config = CollectorConfig::load(&path).unwrap();
        config.s3.static_credentials = Some(S3Credentials {
            access_key_id: S3_ACCESS_KEY_ID.into(),
            secret_access_key: S3_SECRET_ACCESS_KEY.into(),
        });
        config
    }

    fn sqs_config(&self, dir: &FsPath) -> CollectorConfig {
        self.config(
            dir,
            &format!(
                "mode = \"sqs\"\nqueue_url = \"{}\"\nendpoint = \"{}\"\nvisibility_timeout = \"1s\"\nwait_time = \"1s\"",
                self.queue_url,
                self.moto.endpoint()
            ),
        )
    }

    /// `count`, distinct (gateway, seq), `sum(seq)` and the gateways of the readings table.
    fn table(&self) -> (i64, i64, i64, BTreeSet<String>) {
        let copy = tempfile::tempdir().unwrap();
        self.moto
            .download_prefix(&self.lake, "readings/", copy.path());
        let table = copy.path().display().to_string();
        let r = &duckdb_query(&format!(
            "SELECT count(*) AS n, count(DISTINCT (gateway, seq)) AS d, sum(seq) AS s FROM delta_scan('{table}')"
        ))[0];
        let gateways = duckdb_query(&format!(
            "SELECT DISTINCT gateway FROM delta_scan('{table}') ORDER BY gateway"
        ))
        .iter()
        .map(|g| g["gateway"].as_str().unwrap().to_owned())
        .collect();
        (
            r["n"].as_i64().unwrap(),
            r["d"].as_i64().unwrap(),
            r["s"].as_i64().unwrap_or(0),
            gateways,
        )
    }
}

async fn create_queue(sqs: &Client, name: &str, redrive: Option<String>) -> String {
    let mut request = sqs.create_queue().queue_name(name);
    if let Some(policy) = redrive {
        request = request.attributes(QueueAttributeName::RedrivePolicy, policy);
    }
    request
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned()
}

async fn queue_arn(sqs: &Client, url: &str) -> String {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    out.attributes().unwrap()[&QueueAttributeName::QueueArn].clone()
}

/// The bucket notification of the operations guide, set with boto3 (an independent client).
fn notify_queue(moto: &MotoServer, bucket: &str, queue_arn: &str) {
    let script = r#"
import json, sys, boto3
endpoint, bucket, arn, key, secret, region = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name=region)
s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
    "QueueConfigurations": [{
        "QueueArn": arn,
        "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "raw/"}]}},
    }]})
"#;
    let output = Command::new(PeerVenv::peers().python())
        .args(["-c", script, &moto.endpoint(), bucket, queue_arn])
        .args([S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "put_bucket_notification_configuration failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An S3 event as S3 writes it (key form-encoded), for replays and foreign objects.
fn s3_event(bucket: &str, key: &str) -> String {
    let encoded = key.replace('=', "%3D");
    serde_json::json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": S3_REGION,
        "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": {"key": encoded, "size": 1}},
    }]})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_several_gateways_arrive_through_sqs_and_are_applied_exactly_once() {
    let peers = Peers::start().await;
    // Setting the notification sent the s3:TestEvent.
    assert_eq!(peers.messages_in(&peers.queue_url).await, 1);
    for gateway in ["gw-1", "gw-2", "gw-3"] {
        for first in [1, 6, 11] {
            peers.upload(gateway, first..=first + 4).await;
        }
    }
    assert_eq!(peers.messages_in(&peers.queue_url).await, 10);
    let dir = tempfile::tempdir().unwrap();
    let config = peers.sqs_config(dir.path());

    let report = collector::run_once(&config).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.ingest.rows_applied(), 45);
    let applied: Vec<(&str, usize, Option<i64>)> = report
        .ingest
        .gateways
        .iter()
        .map(|g| (g.gateway.as_str(), g.files_applied, g.watermark))
        .collect();
    assert_eq!(
        applied,
        vec![
            ("gw-1", 3, Some(15)),
            ("gw-2", 3, Some(15)),
            ("gw-3", 3, Some(15))
        ]
    );
    assert_eq!(peers.messages_in(&peers.queue_url).await, 0);
    assert!(peers.moto.list_keys(&peers.raw, "raw/").is_empty());

    // A replayed notification of an applied batch, the collector's own archive copy, an object
    // outside every gateway folder and one of another bucket: deleted, nothing applied.
    let applied_key = BatchKey::new("gw-1", 1).to_key("raw/");
    peers.send(&s3_event(&peers.raw, &applied_key)).await;
    peers
        .send(&s3_event(
            &peers.raw,
            &BatchKey::new("gw-1", 6).to_key("archive/"),
        ))
        .await;
    peers.send(&s3_event(&peers.raw, "raw/readme.txt")).await;
    peers
        .send(&s3_event("someone-elses-bucket", &applied_key))
        .await;
    // A new batch, delivered by moto's own notification.
    peers.upload("gw-2", 16..=20).await;
    let report = collector::run_once(&config).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.ingest.rows_applied(), 5);
    let seen: Vec<&str> = report
        .ingest
        .gateways
        .iter()
        .map(|g| g.gateway.as_str())
        .collect();
    assert_eq!(seen, vec!["gw-1", "gw-2"]);
    assert_eq!(peers.messages_in(&peers.queue_url).await, 0);
    assert_eq!(peers.messages_in(&peers.dlq_url).await, 0);

    let sum = 2 * (1..=15).sum::<i64>() + (1..=20).sum::<i64>();
    let (n, distinct, seq_sum, gateways) = peers.table();
    assert_eq!((n, distinct, seq_sum), (50, 50, sum));
    assert_eq!(gateways.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_file_is_quarantined_and_an_unreadable_message_ends_in_the_dead_letter_queue() {
    let peers = Peers::start().await;
    peers.upload("gw-1", 1..=5).await;
    let corrupt = BatchKey::new("gw-1", 6).to_key("raw/");
    peers.put(&corrupt, b"not parquet at all".to_vec()).await;
    peers.upload("gw-1", 11..=15).await;
    peers.send("this is not an S3 event").await;
    let dir = tempfile::tempdir().unwrap();
    let config = peers.sqs_config(dir.path());

    let first = collector::run_once(&config).await.unwrap();
    let gw = first.ingest.gateway("gw-1").unwrap();
    assert_eq!((gw.rows_applied, gw.watermark), (10, Some(15)), "{gw:?}");
    let quarantined: Vec<(&str, &str)> = gw
        .quarantined
        .iter()
        .map(|q| (q.key.as_str(), q.reason.kind.as_str()))
        .collect();
    assert_eq!(quarantined, vec![(corrupt.as_str(), "not_parquet")]);
    assert!(
        peers
            .moto
            .get_object(
                &peers.raw,
                "quarantine/gateway=gw-1/00000000000000000006.parquet.reason.json"
            )
            .is_some()
    );

    // The unreadable message is never deleted: after maxReceiveCount (2) deliveries the redrive
    // policy moves it to the dead-letter queue.
    let deadline = Instant::now() + Duration::from_mins(1);
    while peers.messages_in(&peers.dlq_url).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the unreadable message did not reach the dead-letter queue"
        );
        collector::run_once(&config).await.unwrap();
    }
    let moved = peers
        .sqs
        .receive_message()
        .queue_url(&peers.dlq_url)
        .send()
        .await
        .unwrap();
    let bodies: Vec<&str> = moved.messages().iter().filter_map(|m| m.body()).collect();
    assert_eq!(bodies, vec!["this is not an S3 event"]);
    assert_eq!(peers.messages_in(&peers.queue_url).await, 0);

    let (n, distinct, seq_sum, _) = peers.table();
    assert_eq!(
        (n, distinct, seq_sum),
        (10, 10, (1..=5).sum::<i64>() + (11..=15).sum::<i64>())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_with_shards_0_of_2_and_1_of_2_apply_their_own_gateways_and_together_all() {
    let peers = Peers::start().await;
    let gateways: Vec<String> = (1..=6).map(|n| format!("gw-{n}")).collect();
    let owned_by = |index: u64| -> Vec<String> {
        gateways
            .iter()
            .filter(|g| Shard::of(g, 2) == index)
            .cloned()
            .collect()
    };
    let (zero, one) = (owned_by(0), owned_by(1));
    assert!(!zero.is_empty() && !one.is_empty(), "{zero:?} {one:?}");
    for gateway in &gateways {
        for first in [1, 11, 21] {
            peers.upload(gateway, first..=first + 9).await;
        }
    }
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = peers.config(dir_a.path(), "shard = \"0/2\"");
    let b = peers.config(dir_b.path(), "shard = \"1/2\"");

    let (ra, rb) = tokio::join!(collector::run_once(&a), collector::run_once(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let names = |r: &collector::PassReport| -> Vec<String> {
        r.ingest
            .gateways
            .iter()
            .inspect(|g| assert!(g.error.is_none(), "{g:?}"))
            .map(|g| g.gateway.clone())
            .collect()
    };
    assert_eq!(names(&ra), zero);
    assert_eq!(names(&rb), one);
    assert_eq!(ra.ingest.rows_applied(), 30 * zero.len());
    assert_eq!(rb.ingest.rows_applied(), 30 * one.len());
    assert!(peers.moto.list_keys(&peers.raw, "raw/").is_empty());

    let (n, distinct, seq_sum, in_table) = peers.table();
    assert_eq!(
        (n, distinct, seq_sum),
        (180, 180, 6 * (1..=30).sum::<i64>())
    );
    assert_eq!(in_table, gateways.iter().cloned().collect());
}
