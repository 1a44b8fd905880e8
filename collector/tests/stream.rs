//! The live path, `collector stream`, against kinesalite (Kinesis with AWS-shaped 56-digit
//! sequence numbers) and a local live Delta table, checked with `DuckDB`'s Delta reader.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use collector::config::CollectorConfig;
use collector::stream::{ShardReader, StreamReport, run_stream_with};
use edge_agent::Reading;
use edge_agent::contract::Quality;
use edge_agent::sinks::kinesis::{KinesisShipper, LiveQueue, LiveReading, encode};
use pipeline_e2e::{Kinesalite, duckdb_query};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "support/kinesis.rs"]
mod kinesis;
use kinesis::{client, create_stream};

fn config(dir: &Path, stream: &str, endpoint: &str, flush: &str) -> CollectorConfig {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "[raw]\nurl = \"raw\"\n[delta]\nurl = \"readings\"\n[stream]\nstream = \"{stream}\"\nendpoint = \"{endpoint}\"\ntable_url = \"live\"\nflush_interval = \"{flush}\"\n"
        ),
    )
    .unwrap();
    CollectorConfig::load(&path).unwrap()
}

fn start(
    config: &CollectorConfig,
    client: &Client,
    stream: &str,
) -> (CancellationToken, JoinHandle<StreamReport>) {
    let stop = CancellationToken::new();
    let config = config.clone();
    let reader = ShardReader::with_client(client.clone(), stream);
    let token = stop.clone();
    let task = tokio::spawn(async move {
        run_stream_with(&config, reader, Arc::default(), token)
            .await
            .unwrap()
    });
    (stop, task)
}

fn reading(seq: i64, device: &str) -> LiveReading {
    LiveReading {
        seq,
        reading: Reading {
            ts_us: 1_767_225_600_000_000 + seq * 1000,
            device: device.to_owned(),
            tag: "oil_temp".to_owned(),
            value: Some(seq as f64 / 4.0),
            value_text: None,
            quality: Quality::Good,
            unit: Some("degC".to_owned()),
        },
    }
}

/// Readings `seqs` of `gateway`, spread over eight devices, so both shards get records.
fn readings(seqs: std::ops::RangeInclusive<i64>) -> Vec<LiveReading> {
    seqs.map(|s| reading(s, &format!("press-{}", s % 8)))
        .collect()
}

/// Puts `readings` with the agent's record encoding, several readings per record.
async fn put(client: &Client, stream: &str, gateway: &str, readings: &[LiveReading]) {
    for record in encode(gateway, readings) {
        put_raw(client, stream, &record.partition_key, record.data).await;
    }
}

async fn put_raw(client: &Client, stream: &str, partition_key: &str, data: Vec<u8>) {
    client
        .put_record()
        .stream_name(stream)
        .partition_key(partition_key)
        .data(Blob::new(data))
        .send()
        .await
        .unwrap();
}

/// (`gateway`, `seq`) of every row of the live table, sorted, as `DuckDB` reads it.
fn live_keys(table: &Path) -> Vec<(String, i64)> {
    if !table.join("_delta_log").is_dir() {
        return Vec::new();
    }
    duckdb_query(&format!(
        "SELECT gateway, seq FROM delta_scan('{}') ORDER BY gateway, seq",
        table.display()
    ))
    .iter()
    .map(|r| {
        (
            r["gateway"].as_str().unwrap().to_owned(),
            r["seq"].as_i64().unwrap(),
        )
    })
    .collect()
}

/// Polls the live table until it holds `want` rows (or more), at most `within`.
async fn wait_for_rows(table: &Path, want: usize, within: Duration) -> Vec<(String, i64)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let path = table.to_owned();
        let keys = tokio::task::spawn_blocking(move || live_keys(&path))
            .await
            .unwrap();
        if keys.len() >= want || tokio::time::Instant::now() >= deadline {
            return keys;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn keys(gateway: &str, seqs: std::ops::RangeInclusive<i64>) -> Vec<(String, i64)> {
    seqs.map(|s| (gateway.to_owned(), s)).collect()
}

fn live_table(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("live")
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_shipped_by_the_agent_are_in_the_live_table_within_seconds() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &stream, &kinesis.endpoint(), "500ms");
    let (stop, consumer) = start(&config, &client, &stream);

    // The agent's own sink: the live queue and the shipper that puts it on the stream.
    let queue = LiveQueue::new(10_000);
    let shipper = KinesisShipper::with_client(
        client.clone(),
        &stream,
        "gw-line1",
        queue.clone(),
        Duration::from_millis(50),
    );
    let ship_stop = CancellationToken::new();
    let shipping = tokio::spawn(shipper.run(ship_stop.clone()));
    let mut recipe = reading(0, "mixer-1").reading;
    recipe.tag = "recipe".to_owned();
    recipe.value = None;
    recipe.unit = None;
    recipe.value_text = Some("MIX-7".to_owned());
    let mut batch: Vec<Reading> = readings(1..=99).into_iter().map(|l| l.reading).collect();
    batch.push(recipe);
    let pushed_at = tokio::time::Instant::now();
    queue.push(1, &batch);

    let seen = wait_for_rows(&live_table(&dir), 100, Duration::from_secs(20)).await;
    let took = pushed_at.elapsed();
    assert_eq!(seen, keys("gw-line1", 1..=100));
    assert!(took < Duration::from_secs(10), "rows took {took:?}");

    let text = duckdb_query(&format!(
        "SELECT value, value_text, quality, unit, site, length(sequence_number) AS digits, shard_id FROM delta_scan('{}') WHERE seq IN (4, 100) ORDER BY seq",
        live_table(&dir).display()
    ));
    assert_eq!(text[0]["value"], serde_json::json!(1.0));
    assert_eq!(text[0]["unit"], "degC");
    assert_eq!(text[1]["value_text"], "MIX-7");
    assert_eq!(text[1]["value"], serde_json::Value::Null);
    assert_eq!(text[1]["quality"], "good");
    assert_eq!(text[1]["site"], "");
    // kinesalite's sequence numbers are AWS-shaped: far beyond an i64.
    assert!(text[0]["digits"].as_i64().unwrap() > 40, "{text:?}");

    ship_stop.cancel();
    shipping.await.unwrap();
    stop.cancel();
    let report = consumer.await.unwrap();
    assert_eq!((report.rows, report.bad_records), (100, 0));
    let shards: Vec<serde_json::Value> = duckdb_query(&format!(
        "SELECT DISTINCT shard_id FROM delta_scan('{}')",
        live_table(&dir).display()
    ));
    assert_eq!(shards.len(), 2, "eight devices over two shards: {shards:?}");
    kinesis.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_between_read_and_commit_resumes_without_loss_or_duplicates() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let table = live_table(&dir);
    // A long flush interval keeps records read but uncommitted when the consumer dies.
    let config = config(dir.path(), &stream, &kinesis.endpoint(), "3s");

    let (_stop, consumer) = start(&config, &client, &stream);
    put(&client, &stream, "gw-line1", &readings(1..=200)).await;
    assert_eq!(
        wait_for_rows(&table, 200, Duration::from_secs(20)).await,
        keys("gw-line1", 1..=200)
    );
    put(&client, &stream, "gw-line1", &readings(201..=400)).await;
    // Long enough to read the records (polls every 250 ms), too short to commit them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    consumer.abort();
    assert!(consumer.await.unwrap_err().is_cancelled());
    assert_eq!(
        live_keys(&table),
        keys("gw-line1", 1..=200),
        "nothing of 201..=400 was committed"
    );

    put(&client, &stream, "gw-line1", &readings(401..=600)).await;
    let (stop, consumer) = start(&config, &client, &stream);
    let seen = wait_for_rows(&table, 600, Duration::from_secs(20)).await;
    assert_eq!(seen, keys("gw-line1", 1..=600));

    // A graceful stop and another start read nothing again.
    stop.cancel();
    let report = consumer.await.unwrap();
    assert_eq!(report.rows, 400);
    let (stop, consumer) = start(&config, &client, &stream);
    put(&client, &stream, "gw-line1", &readings(601..=610)).await;
    let seen = wait_for_rows(&table, 610, Duration::from_secs(20)).await;
    stop.cancel();
    assert_eq!(consumer.await.unwrap().rows, 10);
    assert_eq!(seen, keys("gw-line1", 1..=610));
    let counts = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT (gateway, seq)) AS d FROM delta_scan('{}')",
        table.display()
    ));
    assert_eq!(
        (counts[0]["n"].as_i64(), counts[0]["d"].as_i64()),
        (Some(610), Some(610))
    );
    kinesis.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_record_is_skipped_and_a_resent_reading_lands_once() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let table = live_table(&dir);
    let config = config(dir.path(), &stream, &kinesis.endpoint(), "300ms");
    let (stop, consumer) = start(&config, &client, &stream);

    put(&client, &stream, "gw-a", &readings(1..=10)).await;
    put_raw(&client, &stream, "press-1", b"not json\n".to_vec()).await;
    put_raw(
        &client,
        &stream,
        "press-2",
        b"{\"gateway\":\"gw-a\",\"seq\":11}\n".to_vec(),
    )
    .await;
    // The agent retried a record whose answer it lost: the same readings arrive twice.
    put(&client, &stream, "gw-a", &readings(5..=12)).await;
    put(&client, &stream, "gw-b", &readings(1..=3)).await;

    let mut want = keys("gw-a", 1..=12);
    want.extend(keys("gw-b", 1..=3));
    let seen = wait_for_rows(&table, want.len(), Duration::from_secs(20)).await;
    assert_eq!(seen, want);
    stop.cancel();
    let report = consumer.await.unwrap();
    assert_eq!(
        (report.rows, report.bad_records, report.duplicates),
        (15, 2, 6)
    );
    kinesis.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_command_commits_what_it_read_and_exits_0_on_sigterm() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 1).await;
    let dir = tempfile::tempdir().unwrap();
    // A long flush interval: the rows reach the table only through the flush at SIGTERM.
    config(dir.path(), &stream, &kinesis.endpoint(), "1h");
    put(&client, &stream, "gw-cli", &readings(1..=20)).await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(["stream", "--config"])
        .arg(dir.path().join("collector.toml"))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The live table exists once the consumer started; give it a few polls to read the records.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !live_table(&dir).join("_delta_log").is_dir() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live table was never created"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(live_keys(&live_table(&dir)).is_empty());
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(live_keys(&live_table(&dir)), keys("gw-cli", 1..=20));
    kinesis.stop();
}

#[test]
fn the_stream_command_without_a_stream_section_exits_78_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, "[raw]\nurl = \"raw\"\n[delta]\nurl = \"readings\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_collector"))
        .args(["stream", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("has no [stream] section; add one with `stream`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn records_after_a_shard_split_are_read_from_the_children_after_the_parent() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let table = live_table(&dir);
    let config = config(dir.path(), &stream, &kinesis.endpoint(), "300ms");
    let (stop, consumer) = start(&config, &client, &stream);
    put(&client, &stream, "gw-split", &readings(1..=50)).await;
    assert_eq!(
        wait_for_rows(&table, 50, Duration::from_secs(20)).await,
        keys("gw-split", 1..=50)
    );
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1_u128 << 127).to_string())
        .send()
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let shards = client.list_shards().stream_name(&stream).send().await;
        if shards.is_ok_and(|s| s.shards().len() == 3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the split never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put(&client, &stream, "gw-split", &readings(51..=150)).await;
    let seen = wait_for_rows(&table, 150, Duration::from_secs(20)).await;
    stop.cancel();
    consumer.await.unwrap();
    assert_eq!(seen, keys("gw-split", 1..=150));
    let shards = duckdb_query(&format!(
        "SELECT DISTINCT shard_id FROM delta_scan('{}') WHERE seq > 50",
        table.display()
    ));
    assert_eq!(shards.len(), 2, "the children: {shards:?}");
    kinesis.stop();
}
