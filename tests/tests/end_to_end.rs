//! One reading's way from a PLC register to a Snowflake row, across both binaries and real peers:
//! pymodbus (the PLC) → `edge-agent` → moto (S3 raw zone) → `collector` → Delta on moto S3 →
//! fakesnow (Snowflake). DuckDB's Delta reader checks the table independently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use collector::config::{CollectorConfig, S3Credentials};
use collector::snowflake::{BindValue, SnowflakeClient};
use edge_agent::buffer::Buffer;
use edge_agent::config::Durability;
use edge_agent::contract::{BatchKey, Lane, Quality, Row};
use pipeline_e2e::{
    FakeSnow, MotoServer, PyModbusServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY,
    duckdb_query, free_port,
};
use serde_json::json;

const GATEWAY: &str = "gw-e2e";
const SNOWFLAKE_PASSWORD: &str = "e2e-password";

/// The PLC's registers: every value encoded by hand in the order its tag names, so the agent's
/// decoding is checked against an independent encoding.
fn register_map() -> serde_json::Value {
    json!({
        "holding": {
            "100": [
                0x41AC, 0x0000, // 100: f32 ABCD 21.5
                0x0000, 0xC050, // 102: f32 CDAB -3.25
                0x1170, 0x0001, // 104: u32 CDAB 70000
                0xFFFE, 0x1DC0, // 106: i32 ABCD -123456
                512,            // 108: u16 x0.01 -> 5.12
                0x3412, 0x7856, // 109: u32 BADC 0x12345678 = 305419896
                0x0000, 0xC03F, // 111: f32 DCBA 1.5
                0xFFF6          // 113: i16 -10, x0.5 + 20 -> 15
            ],
            // 114-121: an ASCII part number, low byte of each register first, NUL-padded.
            "114": {"type": "string", "value": PART_NUMBER, "length": 8, "order": "BADC"}
        },
        "input": { "0": [0xFFE7] } // i16 -25 x0.1 -> -2.5
    })
}

/// The text of the string tag `part_number` (contract v2's `value_text`).
const PART_NUMBER: &str = "PN-4471 rev B";

/// (tag, expected value) for every numeric tag of the map; `None` marks the tag the PLC does not
/// have. `part_number` is the one string tag: [`PART_NUMBER`].
const EXPECTED: [(&str, Option<f64>); 10] = [
    ("oil_temp", Some(21.5)),
    ("return_temp", Some(-3.25)),
    ("stroke_count", Some(70000.0)),
    ("position", Some(-123_456.0)),
    ("pressure", Some(5.12)),
    ("serial_number", Some(305_419_896.0)),
    ("flow", Some(1.5)),
    ("offset_temp", Some(15.0)),
    ("motor_current", Some(-2.5)),
    ("missing_register", None),
];

/// The [batch] and upload tuning of the agent's config.
struct Tuning {
    batch: &'static str,
    upload: &'static str,
}

/// Small batches, no cap: a batch every half second at the PLC's rate.
const SMALL_BATCHES: Tuning = Tuning {
    batch: "max_rows = 50\nmax_age = \"1s\"",
    upload: "",
};

#[allow(clippy::too_many_lines)] // one TOML template, read top to bottom
fn agent_toml(
    dir: &Path,
    plc_port: u16,
    endpoint: &str,
    bucket: &str,
    metrics_port: u16,
    tuning: &Tuning,
) -> String {
    format!(
        r#"
site = "plant-e2e"
gateway = "{GATEWAY}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[buffer]
path = "{buffer}"

[batch]
{batch}

[upload.s3]
bucket = "{bucket}"
prefix = "raw/"
region = "{S3_REGION}"
endpoint = "{endpoint}"
timeout = "10s"
{upload}

[[modbus]]
name = "press-7"
host = "127.0.0.1"
port = {plc_port}
poll_interval = "100ms"
timeout = "500ms"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 100
  type = "f32"
  unit = "degC"

  [[modbus.tags]]
  name = "return_temp"
  register = "holding"
  address = 102
  type = "f32"
  byte_order = "CDAB"
  unit = "degC"

  [[modbus.tags]]
  name = "stroke_count"
  register = "holding"
  address = 104
  type = "u32"
  byte_order = "CDAB"
  unit = "strokes"

  [[modbus.tags]]
  name = "position"
  register = "holding"
  address = 106
  type = "i32"
  unit = "um"

  [[modbus.tags]]
  name = "pressure"
  register = "holding"
  address = 108
  type = "u16"
  scale = 0.01
  unit = "bar"

  [[modbus.tags]]
  name = "serial_number"
  register = "holding"
  address = 109
  type = "u32"
  byte_order = "BADC"

  [[modbus.tags]]
  name = "flow"
  register = "holding"
  address = 111
  type = "f32"
  byte_order = "DCBA"
  unit = "m3/h"

  [[modbus.tags]]
  name = "offset_temp"
  register = "holding"
  address = 113
  type = "i16"
  scale = 0.5
  offset = 20.0
  unit = "degC"

  [[modbus.tags]]
  name = "motor_current"
  register = "input"
  address = 0
  type = "i16"
  scale = 0.1
  unit = "A"

  [[modbus.tags]]
  name = "missing_register"
  register = "holding"
  address = 500
  type = "u16"

  [[modbus.tags]]
  name = "part_number"
  register = "holding"
  address = 114
  type = "string"
  length = 8
  byte_order = "BADC"
"#,
        buffer = dir.join("buffer.db").display(),
        batch = tuning.batch,
        upload = tuning.upload,
    )
}

/// The collector's config for the raw zone and the Delta table, without Snowflake.
fn lake_toml(moto: &MotoServer, raw: &str, lake: &str) -> String {
    format!(
        r#"
[raw]
url = "s3://{raw}"

[delta]
url = "s3://{lake}/readings"

[s3]
endpoint = "{endpoint}"
region = "{S3_REGION}"
allow_http = true
"#,
        endpoint = moto.endpoint(),
    )
}

fn collector_toml(moto: &MotoServer, raw: &str, lake: &str, snow: &FakeSnow, db: &str) -> String {
    format!(
        r#"{lake}
[snowflake]
url = "{snow}"
account = "plantline"
user = "LOADER"
password_env = "E2E_SNOWFLAKE_PASSWORD"
database = "{db}"
schema = "RAW"
warehouse = "LOAD_WH"
request_timeout = "30s"
"#,
        lake = lake_toml(moto, raw, lake),
        snow = snow.url(),
    )
}

/// The workspace's binaries, built once per test process with the flags `./tests/run.sh` uses,
/// so this is a no-op there and correct when the test runs on its own.
fn binary(name: &str) -> PathBuf {
    static BINS: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    let bins = BINS.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let output = Command::new(cargo)
            .args([
                "build",
                "--workspace",
                "--all-features",
                "--bins",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(pipeline_e2e::checkout())
            .output()
            .expect("cargo runs the tests, so it can be started again");
        assert!(
            output.status.success(),
            "building the binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|msg| {
                let exe = msg.get("executable")?.as_str()?;
                let name = msg.pointer("/target/name")?.as_str()?;
                Some((name.to_owned(), PathBuf::from(exe)))
            })
            .collect()
    });
    bins.get(name)
        .unwrap_or_else(|| panic!("cargo built no binary named {name}: {bins:?}"))
        .clone()
}

/// Environment for both binaries: credentials for moto, the Snowflake password.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(binary(name));
    cmd.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
        .env("AWS_REGION", S3_REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("E2E_SNOWFLAKE_PASSWORD", SNOWFLAKE_PASSWORD)
        .env("RUST_LOG", "warn,edge_agent=info,collector=info");
    cmd
}

/// A running agent process, killed if the test ends early.
struct AgentProcess(Option<Child>);

impl AgentProcess {
    fn start(config: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("the test's temporary folder is writable");
        let child = command("edge-agent")
            .args(["run", "--config"])
            .arg(config)
            .stdout(log.try_clone().expect("a file handle can be duplicated"))
            .stderr(log)
            .spawn()
            .expect("the edge-agent binary was just built");
        Self(Some(child))
    }

    /// `kill -9`: no chance to flush anything.
    fn kill_hard(mut self) {
        let mut child = self.0.take().expect("the agent is running");
        child.kill().expect("the agent is our child");
        child.wait().expect("the agent is our child");
    }

    /// SIGSTOP: the agent holds still (nothing uploaded) until [`AgentProcess::thaw`].
    fn freeze(&self) {
        self.signal(rustix::process::Signal::STOP);
    }

    /// SIGCONT after [`AgentProcess::freeze`].
    fn thaw(&self) {
        self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let child = self.0.as_ref().expect("the agent is running");
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"))
                .expect("a running child has a positive pid");
        rustix::process::kill_process(pid, signal).expect("the agent is our child");
    }

    /// SIGTERM, then the exit code of the clean shutdown.
    fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.0.take().expect("the agent is running");
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"))
                .expect("a running child has a positive pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("the agent is our child");
        child.wait().expect("the agent is our child")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET on loopback, as a scraper or a load balancer sends it.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("the agent serves metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The gateway's main-lane batches under `prefix`: every reading once, in `seq` order.
fn batch_keys(moto: &MotoServer, bucket: &str, prefix: &str) -> Vec<String> {
    lane_keys(moto, bucket, prefix, Lane::Main)
}

/// The gateway's batches of one lane under `prefix`, in key (= `seq`) order.
fn lane_keys(moto: &MotoServer, bucket: &str, prefix: &str, lane: Lane) -> Vec<String> {
    moto.list_keys(bucket, &BatchKey::gateway_prefix(prefix, GATEWAY))
        .into_iter()
        .filter(|key| BatchKey::parse(prefix, key).is_ok_and(|k| k.lane == lane))
        .collect()
}

fn wait_for_batches(moto: &MotoServer, bucket: &str, at_least: usize, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = batch_keys(moto, bucket, "raw/").len();
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {at_least} batches arrived in S3; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_collector(config: &Path) -> Output {
    let output = command("collector")
        .args(["run-once", "--config"])
        .arg(config)
        .output()
        .expect("the collector binary was just built");
    assert!(
        output.status.success(),
        "collector run-once failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Every row of every main-lane batch in S3, in key order, checked against the batch contract.
fn rows_in_s3(moto: &MotoServer, bucket: &str, prefix: &str) -> Vec<Row> {
    rows_of(moto, bucket, prefix, &batch_keys(moto, bucket, prefix))
}

/// The rows of the batches `keys`, in that order, each checked against the batch contract.
fn rows_of(moto: &MotoServer, bucket: &str, prefix: &str, keys: &[String]) -> Vec<Row> {
    let mut rows = Vec::new();
    for key in keys {
        let body = moto
            .get_object(bucket, key)
            .expect("a listed key can be read");
        let batch = edge_agent::batch::read_rows(body.into())
            .unwrap_or_else(|e| panic!("{key} breaks the batch contract: {e}"));
        let parsed = BatchKey::parse(prefix, key).expect("the agent writes contract keys");
        assert_eq!(
            parsed.first_seq, batch[0].seq,
            "{key} is named after its first seq"
        );
        rows.extend(batch);
    }
    rows
}

fn assert_exact_values(rows: &[Row], stage: &str) {
    let expected: BTreeMap<&str, Option<f64>> = EXPECTED.into_iter().collect();
    for row in rows {
        if row.tag == "part_number" {
            assert_eq!(
                (row.value, row.value_text.as_deref(), row.quality),
                (None, Some(PART_NUMBER), Quality::Good),
                "{stage}: part_number at seq {}",
                row.seq
            );
            continue;
        }
        assert_eq!(
            row.value_text, None,
            "{stage}: {} at seq {}",
            row.tag, row.seq
        );
        let want = expected
            .get(row.tag.as_str())
            .unwrap_or_else(|| panic!("{stage}: unexpected tag {}", row.tag));
        assert_eq!(row.value, *want, "{stage}: {} at seq {}", row.tag, row.seq);
        let quality = if want.is_some() {
            Quality::Good
        } else {
            Quality::Bad
        };
        assert_eq!(
            row.quality, quality,
            "{stage}: {} at seq {}",
            row.tag, row.seq
        );
        assert_eq!(
            (row.site.as_str(), row.gateway.as_str(), row.device.as_str()),
            ("plant-e2e", GATEWAY, "press-7")
        );
    }
}

async fn snowflake_count(client: &mut SnowflakeClient, sql: &str, binds: &[BindValue]) -> i64 {
    let result = client
        .execute(sql, binds)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    result
        .i64_at(0, 0)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or(0)
}

/// Runs the agent twice against the PLC: the first run is killed with SIGKILL after three
/// batches, the second stops cleanly. Checks the Parquet stage and returns every row shipped.
fn run_agent_with_a_hard_restart(
    dir: &Path,
    plc: &PyModbusServer,
    moto: &MotoServer,
    raw_bucket: &str,
) -> Vec<Row> {
    let metrics_port = free_port();
    let agent_config = dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        agent_toml(
            dir,
            plc.address().port(),
            &moto.endpoint(),
            raw_bucket,
            metrics_port,
            &SMALL_BATCHES,
        ),
    )
    .unwrap();
    let validate = command("edge-agent")
        .arg("validate")
        .arg(&agent_config)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    // First run, killed hard in the middle of its work.
    let log1 = dir.join("agent-1.log");
    let agent = AgentProcess::start(&agent_config, &log1);
    wait_for_batches(moto, raw_bucket, 3, &log1);
    agent.kill_hard();
    let after_kill = batch_keys(moto, raw_bucket, "raw/").len();

    // Second run resumes from the buffer, then stops cleanly and ships everything.
    let log2 = dir.join("agent-2.log");
    let agent = AgentProcess::start(&agent_config, &log2);
    wait_for_batches(moto, raw_bucket, after_kill + 3, &log2);
    // The operator's view of the same run: healthy, and the uploads counted.
    let health = http_get(metrics_port, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http_get(metrics_port, "/metrics");
    assert!(
        metrics.contains("plantline_agent_batches_uploaded_total "),
        "{metrics}"
    );
    let status = agent.stop();
    assert!(
        status.success(),
        "clean shutdown exits 0, got {status}:\n{}",
        std::fs::read_to_string(&log2).unwrap_or_default()
    );
    let buffer = Buffer::open(&dir.join("buffer.db"), Durability::Full, GATEWAY).unwrap();
    assert_eq!(
        buffer.stats().unwrap().rows,
        0,
        "a clean stop ships the whole buffer"
    );
    assert_eq!(buffer.pending_batch().unwrap(), None);

    // Parquet stage: every seq exactly once, none missing, exact values.
    // Three batches before the kill and three after it; a batch holds up to 50 rows, fewer when
    // `max_age` cut it (the second run cuts what the first left in the buffer at once, as it is
    // older than a second by then).
    let batches = batch_keys(moto, raw_bucket, "raw/");
    assert!(
        batches.len() >= 6,
        "three batches before the kill and three after it, found {batches:?}"
    );
    let parquet_rows = rows_in_s3(moto, raw_bucket, "raw/");
    let n = i64::try_from(parquet_rows.len()).unwrap();
    assert!(
        n >= i64::try_from(batches.len()).unwrap(),
        "no batch is empty: {n} rows in {batches:?}"
    );
    let seqs: Vec<i64> = parquet_rows.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "every committed reading arrives once across the restart, in seq order"
    );
    assert_exact_values(&parquet_rows, "parquet");
    for tag in EXPECTED.iter().map(|(tag, _)| *tag).chain(["part_number"]) {
        assert!(
            parquet_rows.iter().any(|r| r.tag == tag),
            "no reading of {tag}"
        );
    }
    parquet_rows
}

/// Snowflake holds every row once, each with its exact value.
async fn check_snowflake(client: &mut SnowflakeClient, rows: &[Row]) {
    let n = i64::try_from(rows.len()).unwrap();
    let count_of = |tag: &str| i64::try_from(rows.iter().filter(|r| r.tag == tag).count()).unwrap();
    assert_eq!(
        snowflake_count(client, "SELECT COUNT(*) FROM READINGS", &[]).await,
        n
    );
    assert_eq!(
        snowflake_count(client, "SELECT COUNT(DISTINCT SEQ) FROM READINGS", &[]).await,
        n
    );
    for (tag, value) in EXPECTED {
        let exact = match value {
            Some(v) => {
                snowflake_count(
                    client,
                    "SELECT COUNT(*) FROM READINGS WHERE TAG = ? AND VALUE = ? AND QUALITY = 'good' AND GATEWAY = ?",
                    &[BindValue::Text(tag.to_owned()), BindValue::Real(v), BindValue::Text(GATEWAY.to_owned())],
                )
                .await
            }
            None => {
                snowflake_count(
                    client,
                    "SELECT COUNT(*) FROM READINGS WHERE TAG = ? AND VALUE IS NULL AND QUALITY = 'bad'",
                    &[BindValue::Text(tag.to_owned())],
                )
                .await
            }
        };
        assert_eq!(
            exact,
            count_of(tag),
            "snowflake rows of {tag} with the exact value"
        );
    }
    // The string tag's rows arrive with their number null (its text is in Delta's
    // `value_text`; this check does not depend on Snowflake having that column).
    assert_eq!(
        snowflake_count(
            client,
            "SELECT COUNT(*) FROM READINGS WHERE TAG = 'part_number' AND VALUE IS NULL AND QUALITY = 'good'",
            &[],
        )
        .await,
        count_of("part_number")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_travels_from_plc_register_to_snowflake_exactly_once() {
    let plc = PyModbusServer::start(&register_map());
    let moto = MotoServer::start();
    let snow = FakeSnow::start();
    let raw_bucket = moto.create_bucket();
    let lake_bucket = moto.create_bucket();
    let dir = tempfile::tempdir().expect("/tmp is writable");

    let parquet_rows = run_agent_with_a_hard_restart(dir.path(), &plc, &moto, &raw_bucket);
    let n = i64::try_from(parquet_rows.len()).unwrap();

    // Collector: Delta on S3, archive, Snowflake.
    let db = format!("E2E_{}", uuid::Uuid::new_v4().simple());
    let collector_config = dir.path().join("collector.toml");
    std::fs::write(
        &collector_config,
        collector_toml(&moto, &raw_bucket, &lake_bucket, &snow, &db),
    )
    .unwrap();
    let first = run_collector(&collector_config);
    let summary = String::from_utf8_lossy(&first.stdout);
    assert!(
        summary.contains(&format!("gateway {GATEWAY}: "))
            && summary.contains(&format!("{n} rows applied")),
        "{summary}"
    );
    assert!(
        batch_keys(&moto, &raw_bucket, "raw/").is_empty(),
        "applied batches leave the raw zone"
    );
    assert_eq!(
        rows_in_s3(&moto, &raw_bucket, "archive/"),
        parquet_rows,
        "the archive holds the originals unchanged"
    );

    // Delta stage, read through the collector's own table code.
    let mut config = CollectorConfig::load(&collector_config).unwrap();
    config.s3.static_credentials = Some(S3Credentials {
        access_key_id: S3_ACCESS_KEY_ID.to_owned(),
        secret_access_key: S3_SECRET_ACCESS_KEY.to_owned(),
    });
    let (_, mut table) = collector::open_stores(&config).await.unwrap();
    let delta_rows = table.current_rows().await.unwrap();
    assert_eq!(
        delta_rows, parquet_rows,
        "the Delta table holds exactly the batches' rows"
    );
    assert_eq!(table.watermark(GATEWAY).await.unwrap(), Some(n));

    // Delta stage, read by an independent implementation.
    let local_table = dir.path().join("readings");
    moto.download_prefix(&lake_bucket, "readings/", &local_table);
    let duck = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT seq) AS distinct_seq, sum(seq) AS seq_sum, \
         count(*) FILTER (WHERE tag = 'pressure' AND value = 5.12) AS pressure_ok, \
         count(*) FILTER (WHERE tag = 'missing_register' AND value IS NULL AND quality = 'bad') AS bad_ok, \
         count(*) FILTER (WHERE tag = 'part_number' AND value IS NULL AND value_text = '{PART_NUMBER}') AS text_ok, \
         count(value_text) AS texts \
         FROM delta_scan('{}')",
        local_table.display()
    ));
    let count_of = |tag: &str| parquet_rows.iter().filter(|r| r.tag == tag).count();
    assert_eq!(
        duck,
        vec![json!({
            "n": n,
            "distinct_seq": n,
            "seq_sum": n * (n + 1) / 2,
            "pressure_ok": count_of("pressure"),
            "bad_ok": count_of("missing_register"),
            "text_ok": count_of("part_number"),
            "texts": count_of("part_number"),
        })]
    );

    // Snowflake stage.
    let sf_config = config.snowflake.clone().unwrap();
    let mut client =
        SnowflakeClient::login_with_password(&sf_config, SNOWFLAKE_PASSWORD.to_owned())
            .await
            .unwrap();
    check_snowflake(&mut client, &parquet_rows).await;

    // A second collector run loads nothing twice.
    let second = run_collector(&collector_config);
    let summary = String::from_utf8_lossy(&second.stdout);
    assert!(summary.contains("0 rows inserted"), "{summary}");
    assert_eq!(
        table.current_rows().await.unwrap().len(),
        parquet_rows.len()
    );
    assert_eq!(
        snowflake_count(&mut client, "SELECT COUNT(*) FROM READINGS", &[]).await,
        n
    );
}

/// Waits until `ready` holds, polling every 200 ms, or fails naming `what` with the agent's log.
fn wait_until(what: &str, limit: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; agent log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One row of DuckDB's answer about the Delta table: readings, distinct `seq`, lowest and
/// highest `seq`.
fn table_seqs(moto: &MotoServer, lake_bucket: &str, local: &Path) -> (i64, i64, i64, i64) {
    let _ = std::fs::remove_dir_all(local);
    moto.download_prefix(lake_bucket, "readings/", local);
    let rows = duckdb_query(&format!(
        "SELECT count(*) AS n, count(DISTINCT seq) AS d, min(seq) AS lo, max(seq) AS hi \
         FROM delta_scan('{}')",
        local.display()
    ));
    let get = |name: &str| rows[0][name].as_i64().unwrap_or(0);
    (get("n"), get("d"), get("lo"), get("hi"))
}

/// The fresh lane's rows in S3 now and the last `seq` of the main lane, after checking that the
/// fresh rows start ahead of where the main lane has got to, with readings of the backlog
/// between the two.
fn fresh_ahead_of_main(moto: &MotoServer, raw_bucket: &str) -> (Vec<Row>, i64) {
    let fresh_keys = lane_keys(moto, raw_bucket, "raw/", Lane::Fresh);
    let main_keys = batch_keys(moto, raw_bucket, "raw/");
    let fresh_rows = rows_of(moto, raw_bucket, "raw/", &fresh_keys);
    let main_rows = rows_of(moto, raw_bucket, "raw/", &main_keys);
    assert_exact_values(&fresh_rows, "fresh lane");
    let fresh_first = fresh_rows[0].seq;
    let main_last = main_rows.last().map_or(0, |r| r.seq);
    assert!(
        fresh_first > main_last + 1,
        "the fresh lane starts ahead of the backlog: fresh from seq {fresh_first}, the main lane \
         has reached seq {main_last}"
    );
    (fresh_rows, main_last)
}

/// Runs the collector while the agent is held still in the middle of a drain and checks that
/// the table holds the main lane's readings so far and the fresh readings, each once, with the
/// rest of the backlog not in it yet.
fn collector_shows_fresh_before_backlog(
    moto: &MotoServer,
    (raw_bucket, lake_bucket): (&str, &str),
    collector_config: &Path,
    local: &Path,
) {
    let (fresh_rows, main_last) = fresh_ahead_of_main(moto, raw_bucket);
    let fresh_last = fresh_rows.last().expect("a fresh batch holds rows").seq;
    run_collector(collector_config);
    let mid_drain = table_seqs(moto, lake_bucket, local);
    let expected_n = main_last + i64::try_from(fresh_rows.len()).unwrap();
    assert_eq!(
        mid_drain,
        (
            expected_n,
            expected_n,
            if main_last > 0 { 1 } else { fresh_rows[0].seq },
            fresh_last
        ),
        "mid-drain the table holds the main lane's first {main_last} readings and the fresh \
         readings up to seq {fresh_last}, each once: the present before the backlog"
    );
}

/// Waits until the agent's buffer is down to less than one batch of 400 (by its metrics).
fn wait_for_drain(metrics_port: u16, log: &Path) {
    wait_until("the backlog drained", Duration::from_mins(2), log, || {
        // The restarted agent opens its metrics port once it is up.
        if std::net::TcpStream::connect(("127.0.0.1", metrics_port)).is_err() {
            return false;
        }
        let metrics = http_get(metrics_port, "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("plantline_agent_buffer_readings "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|depth| depth < 400.0)
    });
}

/// An uplink outage, then a slow (capped) link: the backlog drains in `seq` order in the main
/// lane while the fresh lane puts the newest readings into the raw zone ahead of it, so a
/// collector run in the middle of the drain already shows the present. When the drain is over
/// the table holds every reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_uplink_outage_fresh_readings_reach_the_table_ahead_of_the_backlog() {
    const CAPPED: Tuning = Tuning {
        batch: "max_rows = 400\nmax_age = \"1s\"",
        upload: "max_bytes_per_second = \"4 KiB\"",
    };
    let plc = PyModbusServer::start(&register_map());
    let dir = tempfile::tempdir().expect("/tmp is writable");
    // The uplink is down from the start; moto comes up later on the same port, empty.
    let stopped = MotoServer::start().stop();
    let endpoint = format!("http://127.0.0.1:{}", stopped.port());
    let (raw_bucket, lake_bucket) = ("plantline-fresh-raw", "plantline-fresh-lake");
    let metrics_port = free_port();
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        agent_toml(
            dir.path(),
            plc.address().port(),
            &endpoint,
            raw_bucket,
            metrics_port,
            &CAPPED,
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let agent = AgentProcess::start(&agent_config, &log);
    // About 110 readings per second pile up: some 1,300 by the time the uplink returns.
    std::thread::sleep(Duration::from_secs(12));
    let moto = stopped.start_again();
    moto.create_named_bucket(raw_bucket);
    moto.create_named_bucket(lake_bucket);

    wait_until(
        "a fresh-lane batch in S3",
        Duration::from_mins(1),
        &log,
        || !lane_keys(&moto, raw_bucket, "raw/", Lane::Fresh).is_empty(),
    );
    // Held still, so what S3 holds stays put while the collector reads it; an upload in flight
    // has half a second to land.
    agent.freeze();
    std::thread::sleep(Duration::from_millis(500));
    // A collector run now shows the present while the backlog is still on its way.
    let collector_config = dir.path().join("collector.toml");
    std::fs::write(&collector_config, lake_toml(&moto, raw_bucket, lake_bucket)).unwrap();
    let local = dir.path().join("readings");
    collector_shows_fresh_before_backlog(
        &moto,
        (raw_bucket, lake_bucket),
        &collector_config,
        &local,
    );
    agent.thaw();

    // The link gets its full speed back: a clean stop, and a restart without the cap. The fresh
    // lane carries on with its run from the buffer while the rest of the backlog drains.
    let status = agent.stop();
    assert!(status.success(), "clean shutdown exits 0, got {status}");
    std::fs::write(
        &agent_config,
        agent_toml(
            dir.path(),
            plc.address().port(),
            &endpoint,
            raw_bucket,
            metrics_port,
            &Tuning {
                upload: "",
                ..CAPPED
            },
        ),
    )
    .unwrap();
    let agent = AgentProcess::start(&agent_config, &log);
    wait_for_drain(metrics_port, &log);
    let status = agent.stop();
    assert!(
        status.success(),
        "clean shutdown exits 0, got {status}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let buffer = Buffer::open(&dir.path().join("buffer.db"), Durability::Full, GATEWAY).unwrap();
    assert_eq!(
        buffer.stats().unwrap().rows,
        0,
        "a clean stop ships the rest"
    );
    let last_seq = rows_in_s3(&moto, raw_bucket, "raw/")
        .last()
        .expect("the drain left main-lane batches for the second collector run")
        .seq;

    run_collector(&collector_config);
    let (n, distinct, lo, hi) = table_seqs(&moto, lake_bucket, &local);
    assert_eq!(
        (n, distinct, lo, hi),
        (last_seq, last_seq, 1, last_seq),
        "after the drain every reading the agent took is in the table exactly once"
    );
    let archived_main = rows_in_s3(&moto, raw_bucket, "archive/");
    assert_eq!(
        archived_main.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=last_seq).collect::<Vec<_>>(),
        "the main lane carried every reading once, in seq order"
    );
    assert!(
        lane_keys(&moto, raw_bucket, "raw/", Lane::Fresh).is_empty()
            && batch_keys(&moto, raw_bucket, "raw/").is_empty(),
        "applied batches of both lanes leave the raw zone"
    );
}
