//! Fixed-length ASCII string tags (`type = "string"`) from a real, independently written Modbus
//! server to the uploaded Parquet: pymodbus 3.16 through the shared peer harness
//! (`tests/peers/modbus_server.py` puts the text into registers itself, padded with NULs or
//! spaces, in either byte order), the whole agent in process with the folder sink, and
//! `edge-agent probe` on the same sensor map.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edge_agent::contract::{MAIN_LANE_VERSION, Quality, Row, metadata};
use pipeline_e2e::PyModbusServer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A mixer PLC: a recipe name (ABCD, NUL-padded), a batch code (BADC, space-padded), an
/// operator name in input registers, an empty text, a text with a Latin-1 `é` (0xE9) in it, and
/// a plain counter.
fn mixer_plc() -> PyModbusServer {
    PyModbusServer::start(&json!({
        "holding": {
            "0": {"type": "string", "value": "MIX-7 (night)", "length": 10},
            "10": {"type": "string", "value": "BATCH 0042", "length": 8, "order": "BADC", "pad": "space"},
            "20": {"type": "string", "value": "", "length": 2},
            // "Caf" then 0xE9 (é in Latin-1), then NULs: not ASCII.
            "30": [0x4361, 0x66E9, 0x0000],
            "40": [1234]
        },
        "input": {
            "0": {"type": "string", "value": "OPERATOR-ANNA", "length": 7}
        }
    }))
}

fn sensor_map(dir: &Path, port: u16) -> std::path::PathBuf {
    let file = dir.join("mixer.toml");
    std::fs::write(
        &file,
        format!(
            r#"site = "plant-ost"
gateway = "gw-mixer"

[buffer]
commit_interval = "50ms"

[batch]
max_age = "1s"

[upload.dir]
path = "landing"

[[modbus]]
name = "mixer-1"
host = "127.0.0.1"
port = {port}
poll_interval = "100ms"
timeout = "2s"

  [[modbus.tags]]
  name = "recipe"
  register = "holding"
  address = 0
  type = "string"
  length = 10
  heartbeat = "1h"

  [[modbus.tags]]
  name = "batch_code"
  register = "holding"
  address = 10
  type = "string"
  length = 8
  byte_order = "BADC"

  [[modbus.tags]]
  name = "note"
  register = "holding"
  address = 20
  type = "string"
  length = 2

  [[modbus.tags]]
  name = "cafe"
  register = "holding"
  address = 30
  type = "string"
  length = 3

  [[modbus.tags]]
  name = "count"
  register = "holding"
  address = 40
  type = "u16"

  [[modbus.tags]]
  name = "operator"
  register = "input"
  address = 0
  type = "string"
  length = 7
"#
        ),
    )
    .unwrap();
    file
}

/// The rows of each tag, in `seq` order.
fn by_tag(rows: &[Row]) -> BTreeMap<&str, Vec<&Row>> {
    let mut out: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for row in rows {
        out.entry(row.tag.as_str()).or_default().push(row);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_tags_arrive_as_exact_text_in_the_uploaded_parquet() {
    let plc = mixer_plc();
    let dir = tempfile::tempdir().unwrap();
    let file = sensor_map(dir.path(), plc.address().port());
    let landing = dir.path().join("landing");
    let config = edge_agent::config::load_file(&file).expect("the sensor map is valid");
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(config, stop.clone()));

    // At least ten polls of every tag uploaded.
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let rows = common::uploaded_rows(&landing);
        let tags = by_tag(&rows);
        if ["batch_code", "note", "cafe", "count", "operator"]
            .iter()
            .all(|t| tags.get(t).is_some_and(|r| r.len() >= 10))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every tag uploaded 10 times within 60 s: {:?}",
            tags.iter().map(|(t, r)| (*t, r.len())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    agent.await.unwrap().expect("the agent stops cleanly");

    let rows = common::uploaded_rows(&landing);
    let tags = by_tag(&rows);
    let texts = |tag: &str| -> Vec<(Option<f64>, Option<&str>, Quality)> {
        let mut seen: Vec<_> = tags[tag]
            .iter()
            .map(|r| (r.value, r.value_text.as_deref(), r.quality))
            .collect();
        seen.dedup();
        seen
    };
    assert_eq!(
        texts("batch_code"),
        [(None, Some("BATCH 0042"), Quality::Good)]
    );
    assert_eq!(texts("note"), [(None, Some(""), Quality::Good)]);
    assert_eq!(texts("cafe"), [(None, None, Quality::Bad)]);
    assert_eq!(texts("count"), [(Some(1234.0), None, Quality::Good)]);
    assert_eq!(
        texts("operator"),
        [(None, Some("OPERATOR-ANNA"), Quality::Good)]
    );
    // With a heartbeat of an hour an unchanged text goes out once.
    assert_eq!(
        tags["recipe"]
            .iter()
            .map(|r| (r.value, r.value_text.as_deref(), r.quality))
            .collect::<Vec<_>>(),
        [(None, Some("MIX-7 (night)"), Quality::Good)]
    );
    assert!(rows.iter().all(|r| r.unit.is_none()));

    // Every (main-lane) batch names contract v2 in its footer.
    for path in common::parquet_files(&landing) {
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let version = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|e| e.key == metadata::CONTRACT_VERSION))
            .and_then(|e| e.value.clone());
        assert_eq!(
            version,
            Some(MAIN_LANE_VERSION.to_string()),
            "{}",
            path.display()
        );
    }
}

#[test]
fn probe_shows_the_text_of_a_string_tag_and_names_the_byte_that_is_not_ascii() {
    let plc = mixer_plc();
    let dir = tempfile::tempdir().unwrap();
    let file = sensor_map(dir.path(), plc.address().port());
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["probe", "--config"])
        .arg(&file)
        .args(["--device", "mixer-1"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "recipe: holding 0-9 = 0x4D49 0x582D 0x3720 0x286E 0x6967 0x6874 0x2900 0x0000 0x0000 0x0000 (19785 22573 14112 10350 26983 26740 10496 0 0 0) -> \"MIX-7 (night)\", good\n\
         batch_code: holding 10-17 = 0x4142 0x4354 0x2048 0x3030 0x3234 0x2020 0x2020 0x2020 (16706 17236 8264 12336 12852 8224 8224 8224) -> \"BATCH 0042\", good\n\
         note: holding 20-21 = 0x0000 0x0000 (0 0) -> \"\", good\n\
         cafe: holding 30-32 = 0x4361 0x66E9 0x0000 (17249 26345 0) -> bad: character 4 of the string is byte 0xe9, which is not printable ASCII (0x20 to 0x7e); check the tag's address, length and byte_order against the device's manual\n\
         count: holding 40 = 0x04D2 (1234) -> 1234, good\n\
         operator: input 0-6 = 0x4F50 0x4552 0x4154 0x4F52 0x2D41 0x4E4E 0x4100 (20304 17746 16724 20306 11585 20046 16640) -> \"OPERATOR-ANNA\", good\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));

    // Raw mode reads a register range as one text.
    let port = plc.address().port().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args([
            "probe",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--register",
            "holding",
            "--address",
            "10",
            "--count",
            "8",
            "--type",
            "string",
            "--byte-order",
            "BADC",
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.ends_with("string BADC at holding 10 -> \"BATCH 0042\"\n"),
        "{shown}"
    );
    assert_eq!(out.status.code(), Some(0));
}
