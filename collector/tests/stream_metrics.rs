//! `collector stream` serves `/metrics` and `/health` on `stream.metrics_listen`: counters that
//! match what was put on a kinesalite stream, a lag gauge per shard, `[metrics]`'s token.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use edge_agent::Reading;
use edge_agent::contract::Quality;
use edge_agent::sinks::kinesis::{LiveReading, encode};
use pipeline_e2e::{Kinesalite, duckdb_query, free_port};

#[path = "support/kinesis.rs"]
mod kinesis;
#[path = "support/process.rs"]
mod process;
use kinesis::{client, create_stream};
use process::{Running, get, sample};

const TOKEN: &str = "s3cret-stream-token";

/// Readings `seqs`, spread over eight devices, so both shards get records.
fn readings(seqs: std::ops::RangeInclusive<i64>) -> Vec<LiveReading> {
    seqs.map(|seq| LiveReading {
        seq,
        reading: Reading {
            ts_us: 1_767_225_600_000_000 + seq * 1000,
            device: format!("press-{}", seq % 8),
            tag: "oil_temp".to_owned(),
            value: Some(seq as f64 / 4.0),
            value_text: None,
            quality: Quality::Good,
            unit: Some("degC".to_owned()),
        },
    })
    .collect()
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

/// Puts `readings` with the agent's record encoding; returns how many records that took.
async fn put(client: &Client, stream: &str, gateway: &str, readings: &[LiveReading]) -> usize {
    let records = encode(gateway, readings);
    let n = records.len();
    for record in records {
        put_raw(client, stream, &record.partition_key, record.data).await;
    }
    n
}

/// The sum of every sample of the counter `name` (any labels).
fn total(scrape: &str, name: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
#[allow(clippy::too_many_lines)] // one scrape, every series asserted
async fn the_stream_command_serves_counters_that_match_what_was_put_and_a_healthy_status() {
    let kinesis = Kinesalite::start();
    let client = client(&kinesis.endpoint());
    let stream = create_stream(&client, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[raw]\nurl = \"raw\"\n[delta]\nurl = \"readings\"\n[metrics]\ntoken_env = \"STREAM_METRICS_TOKEN\"\n[stream]\nstream = \"{stream}\"\nendpoint = \"{}\"\ntable_url = \"live\"\nflush_interval = \"300ms\"\nmetrics_listen = \"127.0.0.1:{port}\"\n",
            kinesis.endpoint()
        ),
    )
    .unwrap();

    let mut records = put(&client, &stream, "gw-a", &readings(1..=60)).await;
    put_raw(&client, &stream, "press-1", b"not json\n".to_vec()).await;
    records += 1;
    // The agent retried a record whose answer it lost: readings 50..=60 arrive twice.
    records += put(&client, &stream, "gw-a", &readings(50..=60)).await;
    records += put(&client, &stream, "gw-b", &readings(1..=5)).await;
    let started = SystemTime::now();
    let mut consumer = Running::start(
        "stream",
        &config,
        dir.path(),
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("STREAM_METRICS_TOKEN", TOKEN),
        ],
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        if let Some((200, body)) = get(port, "/metrics", Some(TOKEN))
            && sample(&body, "plantline_collector_stream_rows_committed_total") == Some(65.0)
            && total(&body, "plantline_collector_stream_records_read_total") == records as u64
        {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the counters never reached 65 rows and {records} records; last scrape:\n{:?}\nlog:\n{}",
            get(port, "/metrics", Some(TOKEN)),
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every reading put once is in the table, as many as the counter says.
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n FROM delta_scan('{}')",
        dir.path().join("live").display()
    ));
    assert_eq!(rows[0]["n"].as_i64(), Some(65));
    assert_eq!(
        total(&scrape, "plantline_collector_stream_rows_decoded_total"),
        76,
        "65 readings plus 11 put twice"
    );
    assert_eq!(
        sample(
            &scrape,
            "plantline_collector_stream_duplicates_dropped_total"
        ),
        Some(11.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "plantline_collector_stream_bad_records_total{reason=\"not_json\"}"
        ),
        Some(1.0)
    );
    assert!(sample(&scrape, "plantline_collector_stream_commits_total").unwrap() >= 1.0);
    assert_eq!(
        total(&scrape, "plantline_collector_stream_commit_failures_total"),
        0
    );
    let started_s = started.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(
        sample(
            &scrape,
            "plantline_collector_stream_last_commit_timestamp_seconds"
        )
        .unwrap()
            >= started_s.floor()
    );
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let lag = sample(
            &scrape,
            &format!("plantline_collector_stream_shard_lag_seconds{{shard=\"{shard}\"}}"),
        );
        assert!(
            lag.is_some_and(|l| l >= 0.0),
            "no lag for {shard}:\n{scrape}"
        );
        let committed = sample(
            &scrape,
            &format!(
                "plantline_collector_stream_shard_last_commit_timestamp_seconds{{shard=\"{shard}\"}}"
            ),
        );
        assert!(
            committed.is_some_and(|t| t >= started_s.floor()),
            "no commit of this run moved {shard}:\n{scrape}"
        );
    }
    assert_eq!(
        sample(
            &scrape,
            "plantline_collector_stream_shards{state=\"reading\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&scrape, "plantline_collector_stream_ready"),
        Some(1.0)
    );

    assert_eq!(
        get(port, "/health", None),
        Some((200, "{\"status\":\"ok\"}\n".to_owned()))
    );
    // `[metrics]`'s token guards this /metrics too.
    assert_eq!(get(port, "/metrics", None).map(|(s, _)| s), Some(401));

    assert_eq!(consumer.stop(), Some(0), "{}", consumer.log());
    assert!(
        consumer
            .log()
            .contains("serving the live path's /metrics and /health"),
        "{}",
        consumer.log()
    );
    kinesis.stop();
}
