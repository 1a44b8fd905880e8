//! The Kinesis live stream against two independent Kinesis servers, moto server
//! (`pipeline_e2e::MotoServer`) and kinesalite (`pipeline_e2e::Kinesalite`, with AWS-shaped
//! sequence numbers): what arrives on the stream, and that a Kinesis that is away or stops
//! answering never holds up the batches. Each behaviour that needs a server runs once per
//! server, as the tests `<behaviour>::moto` and `<behaviour>::kinesalite`.
//!
//! Partial failures (a PutRecords answer that refuses some of its records) cannot be produced by
//! either server, so the retry of only the refused records is tested on the function that reads
//! the answer, in `sinks::kinesis::shipper`, and not here. Both store every record of a call or
//! fail the whole call: kinesalite 3.3.3 never sets a per-record `ErrorCode` (it has no
//! throughput limits; an oversized record, a bad hash key or a stream that is not ACTIVE fails
//! the whole call, and a call reads the stream's state once and writes all its records in one
//! batch, so a deletion or a reshard during the call cannot split its answer); moto 5.2 neither
//! (the same whole-call checks, and a partition key it rejects raises after the records before
//! it were stored: still one failed call). The agent runs as its own process here, with test
//! credentials in its environment, as an operator runs it.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use edge_agent::Reading;
use edge_agent::contract::Quality;
use edge_agent::sinks::kinesis::{KinesisShipper, LiveQueue};
use pipeline_e2e::{Kinesalite, MotoServer, PyModbusServer, S3_REGION, free_port};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The Kinesis servers each behaviour runs against.
#[derive(Debug, Clone, Copy)]
enum Peer {
    Moto,
    Kinesalite,
}

/// Runs each behaviour, an `async fn(Peer)`, once per Kinesis server: as the tests
/// `<behaviour>::moto` and `<behaviour>::kinesalite`.
macro_rules! on_each_peer {
    ($($behaviour:ident),+ $(,)?) => {$(
        mod $behaviour {
            #[tokio::test]
            async fn moto() {
                super::$behaviour(super::Peer::Moto).await;
            }

            #[tokio::test]
            async fn kinesalite() {
                super::$behaviour(super::Peer::Kinesalite).await;
            }
        }
    )+};
}

on_each_peer!(
    queued_readings_arrive_as_json_lines_per_device,
    the_agent_streams_every_committed_reading_with_its_seq,
    a_kinesis_that_stops_answering_never_holds_up_the_s3_uploads,
);

/// A running Kinesis server of either kind; dropping it stops the server.
enum KinesisServer {
    Moto(MotoServer),
    Kinesalite(Kinesalite),
}

impl KinesisServer {
    fn start(peer: Peer) -> Self {
        match peer {
            Peer::Moto => Self::Moto(MotoServer::start()),
            Peer::Kinesalite => Self::Kinesalite(Kinesalite::start()),
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Self::Moto(moto) => moto.endpoint(),
            Self::Kinesalite(kinesalite) => kinesalite.endpoint(),
        }
    }

    /// Freezes the server with SIGSTOP to its process group: the kernel still accepts
    /// connections on its port and nothing ever answers, a hung Kinesis, which a client cannot
    /// tell from a slow one as a closed port tells it at once. The guard's SIGKILL still ends it.
    fn freeze(&self) {
        let pid = match self {
            Self::Moto(moto) => moto.peer().pid(),
            Self::Kinesalite(kinesalite) => kinesalite.peer().pid(),
        };
        // The harness starts each peer as the leader of its own process group.
        let frozen = Command::new("kill")
            .args(["-STOP", "--", &format!("-{pid}")])
            .status()
            .unwrap();
        assert!(frozen.success(), "kill -STOP -{pid}");
    }
}

fn client(endpoint: &str) -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// Creates a one-shard stream with a fresh name and waits until it is active.
async fn create_stream(client: &aws_sdk_kinesis::Client) -> String {
    let name = format!("plantline-{}", uuid_like());
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(1)
        .send()
        .await
        .expect("the server creates the stream");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(&name)
            .send()
            .await
            .expect("the server describes the stream");
        if summary
            .stream_description_summary()
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
        {
            return name;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} not active in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A unique suffix from the clock and the process: streams of parallel tests never collide.
fn uuid_like() -> String {
    format!("{}-{}", std::process::id(), pipeline_e2e::now_us())
}

/// Every record on the stream's only shard, as (partition key, data).
async fn read_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String)> {
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("the server lists the shards");
    let shard = shards.shards()[0].shard_id().to_owned();
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("the server hands out a shard iterator")
        .shard_iterator()
        .map(str::to_owned);
    let mut records = Vec::new();
    while let Some(it) = iterator {
        let out = client
            .get_records()
            .shard_iterator(it)
            .send()
            .await
            .expect("the server returns records");
        if out.records().is_empty() {
            break;
        }
        for r in out.records() {
            records.push((
                r.partition_key().unwrap_or_default().to_owned(),
                String::from_utf8(r.data().as_ref().to_vec()).expect("records are JSON text"),
            ));
        }
        iterator = out.next_shard_iterator().map(str::to_owned);
    }
    records
}

fn reading(ts_us: i64, device: &str, tag: &str, value: Option<f64>, unit: Option<&str>) -> Reading {
    Reading {
        ts_us,
        device: device.into(),
        tag: tag.into(),
        value,
        value_text: None,
        quality: if value.is_some() {
            Quality::Good
        } else {
            Quality::Bad
        },
        unit: unit.map(str::to_owned),
    }
}

async fn queued_readings_arrive_as_json_lines_per_device(peer: Peer) {
    let server = KinesisServer::start(peer);
    let kinesis = client(&server.endpoint());
    let stream = create_stream(&kinesis).await;
    let queue = LiveQueue::new(100);
    let shipper = KinesisShipper::with_client(
        kinesis.clone(),
        &stream,
        "gw-line1",
        queue.clone(),
        Duration::from_millis(50),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(shipper.run(stop.clone()));
    queue.push(
        41,
        &[
            reading(
                1_700_000_000_000_001,
                "press-3",
                "oil_temp",
                Some(123.5),
                Some("degC"),
            ),
            reading(1_700_000_000_000_002, "press-4", "speed", None, None),
            reading(
                1_700_000_000_000_003,
                "press-3",
                "pressure",
                Some(-2.25),
                Some("bar"),
            ),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let records = loop {
        let records = read_stream(&kinesis, &stream).await;
        if records.len() >= 2 {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "records within 15 s: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        records,
        [
            (
                "press-3".to_owned(),
                "{\"gateway\":\"gw-line1\",\"seq\":41,\"device\":\"press-3\",\"tag\":\"oil_temp\",\"ts\":1700000000000001,\"value\":123.5,\"quality\":\"good\",\"unit\":\"degC\"}\n\
                 {\"gateway\":\"gw-line1\",\"seq\":43,\"device\":\"press-3\",\"tag\":\"pressure\",\"ts\":1700000000000003,\"value\":-2.25,\"quality\":\"good\",\"unit\":\"bar\"}\n"
                    .to_owned()
            ),
            (
                "press-4".to_owned(),
                "{\"gateway\":\"gw-line1\",\"seq\":42,\"device\":\"press-4\",\"tag\":\"speed\",\"ts\":1700000000000002,\"value\":null,\"quality\":\"bad\",\"unit\":null}\n"
                    .to_owned()
            ),
        ]
    );
}

/// The upload target of most tests: the folder `landing` beside the config.
const UPLOAD_TO_DIR: &str = "[upload.dir]\npath = \"landing\"";

/// The agent's config: one pymodbus PLC, `upload` (an `[upload.*]` table), and `kinesis`.
fn agent_config(plc_port: u16, metrics_port: u16, upload: &str, kinesis: &str) -> String {
    format!(
        r#"site = "plant-ost"
gateway = "gw-live"

[batch]
max_age = "1s"

{upload}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[kinesis]
{kinesis}

[[modbus]]
name = "press-3"
host = "127.0.0.1"
port = {plc_port}
poll_interval = "100ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 0
  type = "u16"
  scale = 0.1
  unit = "degC"

  [[modbus.tags]]
  name = "spare"
  register = "holding"
  address = 50
  type = "u16"
"#
    )
}

/// The agent binary with test credentials (both servers take any), and no instance-metadata
/// lookups.
fn start_agent(dir: &Path, config: &str) -> std::process::Child {
    let file = dir.join("agent.toml");
    std::fs::write(&file, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&file)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops the agent with SIGTERM and returns its JSON log lines.
fn stop_agent(child: std::process::Child) -> Vec<Value> {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Every uploaded reading as the JSON line the live stream carries for it, by `seq`.
fn uploaded_as_lines(dir: &Path) -> BTreeMap<i64, Value> {
    let mut lines = BTreeMap::new();
    for file in common::parquet_files(dir) {
        for row in edge_agent::batch::read_rows(std::fs::read(&file).unwrap().into()).unwrap() {
            lines.insert(
                row.seq,
                json!({
                    "gateway": row.gateway,
                    "seq": row.seq,
                    "device": row.device,
                    "tag": row.tag,
                    "ts": row.ts_us,
                    "value": row.value,
                    "quality": row.quality.as_str(),
                    "unit": row.unit,
                }),
            );
        }
    }
    lines
}

fn stopped_line(log: &[Value]) -> &Value {
    log.iter()
        .find(|l| l["message"] == "live stream stopped")
        .unwrap_or_else(|| panic!("no `live stream stopped` line in {log:#?}"))
}

/// A plain HTTP/1.1 GET of `/metrics`.
fn scrape(port: u16) -> String {
    pipeline_e2e::http_get(port, "/metrics", "").unwrap().1
}

fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn the_agent_streams_every_committed_reading_with_its_seq(peer: Peer) {
    let server = KinesisServer::start(peer);
    let kinesis = client(&server.endpoint());
    let stream = create_stream(&kinesis).await;
    let plc = PyModbusServer::start(&json!({"device_id": 1, "holding": {"0": [421]}}));
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(
        plc.address().port(),
        free_port(),
        UPLOAD_TO_DIR,
        &format!(
            "stream = \"{stream}\"\nendpoint = \"{}\"\nmax_linger = \"100ms\"",
            server.endpoint()
        ),
    );
    let agent = start_agent(dir.path(), &config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = stop_agent(agent);

    let uploaded = uploaded_as_lines(&dir.path().join("landing"));
    assert!(uploaded.len() >= 10, "{} readings uploaded", uploaded.len());
    let mut streamed = BTreeMap::new();
    let mut most_in_one_record = 0;
    // One device, so one shard's order is the device's: its readings in seq order.
    let mut last_seq = -1;
    for (key, data) in read_stream(&kinesis, &stream).await {
        assert!(data.ends_with('\n'), "{data:?}");
        most_in_one_record = most_in_one_record.max(data.lines().count());
        for line in data.lines() {
            let line: Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["device"], key, "the partition key is the device");
            let seq = line["seq"].as_i64().unwrap();
            assert!(seq > last_seq, "seq {seq} after {last_seq} on the shard");
            last_seq = seq;
            assert!(streamed.insert(seq, line).is_none(), "seq {seq} twice");
        }
    }
    // Two tags every 100 ms and 100 ms of linger: a record carries several readings.
    assert!(
        most_in_one_record >= 2,
        "at most {most_in_one_record} reading per record"
    );
    // Exactly what the batches hold: same seqs, same content, nothing more.
    assert_eq!(streamed, uploaded);
    let good = &uploaded.values().find(|l| l["tag"] == "oil_temp").unwrap();
    assert_eq!(
        (&good["value"], &good["quality"], &good["unit"]),
        (&json!(42.1), &json!("good"), &json!("degC"))
    );
    let bad = &uploaded.values().find(|l| l["tag"] == "spare").unwrap();
    assert_eq!(
        (&bad["value"], &bad["quality"], &bad["unit"]),
        (&Value::Null, &json!("bad"), &Value::Null)
    );
    let stopped = stopped_line(log.as_slice());
    assert_eq!(
        (
            &stopped["sent_total"],
            &stopped["dropped_total"],
            &stopped["unsent"]
        ),
        (&json!(uploaded.len()), &json!(0), &json!(0)),
        "{stopped}"
    );
}

#[tokio::test]
async fn an_absent_kinesis_drops_counted_readings_and_never_holds_up_the_batches() {
    let plc = PyModbusServer::start(&json!({"device_id": 1, "holding": {"0": [421]}}));
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    // Nothing listens on this port: Kinesis is away for the whole run.
    let closed = free_port();
    let config = agent_config(
        plc.address().port(),
        metrics_port,
        UPLOAD_TO_DIR,
        &format!(
            "stream = \"plantline-live\"\nendpoint = \"http://127.0.0.1:{closed}\"\nqueue_capacity = 5\nmax_linger = \"50ms\"\ntimeout = \"1s\""
        ),
    );
    let agent = start_agent(dir.path(), &config);
    let landing = dir.path().join("landing");
    // Batches are cut every second (`max_age`); with Kinesis away they still are. The margin
    // (8 s for 3 batches) absorbs a busy test machine; a blocked S3 path would give none.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let batches_while_running = common::parquet_files(&landing).len();
    let metrics = tokio::task::spawn_blocking(move || scrape(metrics_port))
        .await
        .unwrap();
    let log = stop_agent(agent);
    assert!(
        batches_while_running >= 3,
        "{batches_while_running} batches in 8 s with max_age = 1s"
    );
    assert_eq!(
        sample(&metrics, "plantline_agent_kinesis_readings_sent_total"),
        0
    );
    assert!(
        sample(&metrics, "plantline_agent_kinesis_dropped_total") > 0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "plantline_agent_kinesis_put_failures_total") > 0,
        "{metrics}"
    );

    // Every reading reached the batches, and the live stream accounts for each one: dropped
    // (counted) or still unsent at shutdown.
    let uploaded = uploaded_as_lines(&landing).len();
    let stopped = stopped_line(log.as_slice());
    assert_eq!(stopped["sent_total"], json!(0), "{stopped}");
    let dropped = stopped["dropped_total"].as_u64().unwrap();
    let unsent = stopped["unsent"].as_u64().unwrap();
    assert_eq!(
        dropped + unsent,
        u64::try_from(uploaded).unwrap(),
        "{stopped}"
    );
    assert!(
        unsent <= 10,
        "at most the queue (5) and one call in flight (5): {stopped}"
    );
    assert!(
        log.iter().any(|l| l["message"]
            == "live queue full: dropped the oldest readings (they still go to S3)"),
        "no drop warning in {log:#?}"
    );
}

/// How many Parquet batches `bucket` holds.
fn s3_batches(s3: &MotoServer, bucket: &str) -> usize {
    s3.list_keys(bucket, "")
        .iter()
        .filter(|key| key.ends_with(".parquet"))
        .count()
}

async fn a_kinesis_that_stops_answering_never_holds_up_the_s3_uploads(peer: Peer) {
    let server = KinesisServer::start(peer);
    let kinesis = client(&server.endpoint());
    let stream = create_stream(&kinesis).await;
    // S3 on a server of its own: freezing the Kinesis server must leave it answering.
    let s3 = MotoServer::start();
    let bucket = s3.create_bucket();
    let plc = PyModbusServer::start(&json!({"device_id": 1, "holding": {"0": [421]}}));
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = agent_config(
        plc.address().port(),
        metrics_port,
        &format!(
            "[upload.s3]\nbucket = \"{bucket}\"\nendpoint = \"{}\"\nregion = \"{S3_REGION}\"\ntimeout = \"10s\"",
            s3.endpoint()
        ),
        &format!(
            "stream = \"{stream}\"\nendpoint = \"{}\"\nqueue_capacity = 5\nmax_linger = \"50ms\"\ntimeout = \"1s\"",
            server.endpoint()
        ),
    );
    let agent = start_agent(dir.path(), &config);

    // The live stream works first, so what follows is Kinesis going away, not never being there:
    // records are on the stream and the agent has had the answer to at least one PutRecords
    // (a record can be readable before its answer reached the agent).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let on_stream = !read_stream(&kinesis, &stream).await.is_empty();
        let confirmed = on_stream && {
            let text = tokio::task::spawn_blocking(move || scrape(metrics_port))
                .await
                .unwrap();
            sample(&text, "plantline_agent_kinesis_readings_sent_total") > 0
        };
        if confirmed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no record on {stream} confirmed to the agent in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.freeze();

    // Batches are cut every second (`max_age`) and still reach S3. The deadline (10 s for 3
    // batches) absorbs a busy test machine; an S3 path waiting on Kinesis would give none.
    let at_freeze = s3_batches(&s3, &bucket);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s3_batches(&s3, &bucket) < at_freeze + 3 {
        assert!(
            Instant::now() < deadline,
            "{} batches reached S3 in the 10 s after Kinesis froze, with max_age = 1s",
            s3_batches(&s3, &bucket) - at_freeze
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = tokio::task::spawn_blocking(move || scrape(metrics_port))
        .await
        .unwrap();
    let log = stop_agent(agent);
    assert!(
        sample(&metrics, "plantline_agent_kinesis_readings_sent_total") > 0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "plantline_agent_kinesis_dropped_total") > 0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "plantline_agent_kinesis_put_failures_total") > 0,
        "{metrics}"
    );

    // The live stream accounts for every reading S3 got: sent, dropped (counted) or unsent.
    let landed = tempfile::tempdir().unwrap();
    s3.download_prefix(&bucket, "", landed.path());
    let uploaded = uploaded_as_lines(landed.path()).len();
    let stopped = stopped_line(log.as_slice());
    let count = |key: &str| {
        stopped[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {stopped}"))
    };
    assert_eq!(
        count("sent_total") + count("dropped_total") + count("unsent"),
        u64::try_from(uploaded).unwrap(),
        "{stopped}"
    );
    assert!(
        log.iter().any(|l| l["message"]
            == "live queue full: dropped the oldest readings (they still go to S3)"),
        "no drop warning in {log:#?}"
    );
}
