//! The file-drop source through the whole agent loop (`edge_agent::run`) with a local folder as
//! the upload target: real files in a temporary folder, readings checked in the Parquet batches
//! the agent wrote, and the files checked in `done/` and `failed/`.

// Exact float comparisons are the point: every value must arrive with these very bits.
#![allow(clippy::float_cmp)]

mod common;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use edge_agent::config::load_str;
use edge_agent::contract::{Quality, Row};
use tokio_util::sync::CancellationToken;

/// 2024-05-01T12:00:00Z in microseconds.
const NOON_US: i64 = 1_714_564_800_000_000;

/// One agent's files and its `[[file_drop]]` section.
struct Setup {
    dir: tempfile::TempDir,
    file_drop: String,
}

impl Setup {
    fn new(file_drop: &str) -> Self {
        let setup = Self {
            dir: tempfile::tempdir().unwrap(),
            file_drop: file_drop.to_owned(),
        };
        std::fs::create_dir(setup.drop_folder()).unwrap();
        setup
    }

    fn drop_folder(&self) -> PathBuf {
        self.dir.path().join("drop")
    }

    fn config_text(&self) -> String {
        // A batch is cut only at shutdown (max_age 1h), so the buffer shows what arrived.
        format!(
            "site = \"plant-ost\"\ngateway = \"gw-files\"\n[buffer]\npath = \"buffer.db\"\ncommit_interval = \"20ms\"\n[batch]\nmax_age = \"1h\"\n[upload.dir]\npath = \"outbox\"\n[metrics]\nenabled = false\n[[file_drop]]\nfolder = \"drop\"\nsettle = \"300ms\"\npoll_interval = \"20ms\"\n{}",
            self.file_drop
        )
    }

    fn start(&self) -> Agent {
        let config = load_str(&self.config_text(), &self.dir.path().join("agent.toml"))
            .expect("the test config is valid");
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(config, stop.clone()));
        Agent { stop, task }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.drop_folder().join(name), text).unwrap();
    }

    fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.drop_folder().join(relative))
            .unwrap_or_else(|e| panic!("{relative}: {e}"))
    }

    fn exists(&self, relative: &str) -> bool {
        self.drop_folder().join(relative).exists()
    }

    fn buffered(&self) -> u64 {
        edge_agent::buffer::inspect(&self.dir.path().join("buffer.db")).map_or(0, |r| r.rows)
    }

    /// Waits until `relative` exists under the drop folder.
    async fn wait_for(&self, relative: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.exists(relative) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {relative}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every row of every batch the agent uploaded, in `seq` order.
    fn uploaded(&self) -> Vec<Row> {
        common::uploaded_rows(&self.dir.path().join("outbox"))
    }

    /// The uploaded readings as `(ts_us, device, tag, value, unit)`, in `seq` order.
    fn readings(&self) -> Vec<(i64, String, String, f64, Option<String>)> {
        self.uploaded()
            .into_iter()
            .map(|r| {
                assert_eq!(r.quality, Quality::Good);
                assert_eq!(r.gateway, "gw-files");
                (r.ts_us, r.device, r.tag, r.value.unwrap(), r.unit)
            })
            .collect()
    }
}

struct Agent {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the agent does not panic")
            .expect("the agent stops cleanly");
    }
}

fn reading(
    ts_us: i64,
    device: &str,
    tag: &str,
    value: f64,
    unit: Option<&str>,
) -> (i64, String, String, f64, Option<String>) {
    (
        ts_us,
        device.to_owned(),
        tag.to_owned(),
        value,
        unit.map(str::to_owned),
    )
}

const STAND: &str = "name = \"stand\"
format = \"csv\"
file_name = \"{station}_*.csv\"
timestamp = \"time\"
timestamp_format = \"rfc3339\"
device = \"{file.station}\"
[[file_drop.values]]
column = \"temp\"
unit = \"degC\"
scale = 0.1
[[file_drop.values]]
column = \"pressure\"
tag = \"{axis}_pressure\"
unit = \"bar\"
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_file_becomes_exact_readings_and_moves_to_done() {
    let setup = Setup::new(STAND);
    let agent = setup.start();
    setup.write(
        "ts-2_run17.csv",
        "time,axis,temp,pressure\n\
         2024-05-01T12:00:00Z,x,215,1.5\n\
         \"2024-05-01T12:00:00.250Z\", y ,\"216\",\n\
         2024-05-01T14:00:01+02:00,x,,2.25\n",
    );
    setup.wait_for("done/ts-2_run17.csv").await;
    agent.stop().await;
    assert_eq!(
        setup.readings(),
        vec![
            reading(NOON_US, "ts-2", "temp", 21.5, Some("degC")),
            reading(NOON_US, "ts-2", "x_pressure", 1.5, Some("bar")),
            reading(NOON_US + 250_000, "ts-2", "temp", 21.6, Some("degC")),
            reading(NOON_US + 1_000_000, "ts-2", "x_pressure", 2.25, Some("bar")),
        ]
    );
    assert!(!setup.exists("ts-2_run17.csv"));
    assert!(
        !setup.exists("done/ts-2_run17.csv.reason.txt"),
        "no reason file for a clean file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_take_device_and_time_from_the_row() {
    let setup = Setup::new(
        "name = \"cnc\"
format = \"jsonl\"
timestamp = \"t\"
timestamp_format = \"epoch_ms\"
device = \"cnc-{machine}\"
[[file_drop.values]]
column = \"spindle_rpm\"
[[file_drop.values]]
column = \"load\"
unit = \"%\"
",
    );
    let agent = setup.start();
    setup.write(
        "shift.jsonl",
        "{\"t\": 1714564800000, \"machine\": 7, \"spindle_rpm\": 12000, \"load\": \"41.5\"}\n\
         \n\
         {\"t\": \"1714564800500\", \"machine\": \"8\", \"spindle_rpm\": 0, \"load\": null, \"extra\": [1]}\n",
    );
    setup.wait_for("done/shift.jsonl").await;
    agent.stop().await;
    assert_eq!(
        setup.readings(),
        vec![
            reading(NOON_US, "cnc-7", "spindle_rpm", 12000.0, None),
            reading(NOON_US, "cnc-7", "load", 41.5, Some("%")),
            reading(NOON_US + 500_000, "cnc-8", "spindle_rpm", 0.0, None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_listed_by_line_and_unusable_files_fail() {
    let setup = Setup::new(STAND);
    let agent = setup.start();
    setup.write(
        "ts-1_a.csv",
        "time,axis,temp,pressure\n\
         2024-05-01T12:00:00Z,x,200,1\n\
         yesterday,x,201,1\n\
         2024-05-01T12:00:01Z,x,hot,1\n\
         2024-05-01T12:00:02Z,\"x\"y,202,1\n\
         2024-05-01T12:00:03Z,x,203,\n",
    );
    setup.write("ts-1_b.csv", "time,axis,temp,pressure\nnow,x,1,1\n");
    setup.write(
        "ts-1_c.csv",
        "time,axis,temperature,pressure\n2024-05-01T12:00:00Z,x,1,1\n",
    );
    setup.write("notes.txt", "not a log\n");
    for done in [
        "done/ts-1_a.csv",
        "failed/ts-1_b.csv",
        "failed/ts-1_c.csv",
        "failed/notes.txt",
    ] {
        setup.wait_for(done).await;
    }
    agent.stop().await;
    assert_eq!(
        setup.readings(),
        vec![
            reading(NOON_US, "ts-1", "temp", 20.0, Some("degC")),
            reading(NOON_US, "ts-1", "x_pressure", 1.0, Some("bar")),
            reading(NOON_US + 3_000_000, "ts-1", "temp", 20.3, Some("degC")),
        ]
    );
    assert_eq!(
        setup.read("done/ts-1_a.csv.reason.txt"),
        "ts-1_a.csv: 3 of 5 rows could not be read; the 3 readings of the other rows are in the buffer\n\
         line 3: time `yesterday` is not an RFC 3339 time\n\
         line 4: temp `hot` is not a number\n\
         line 5: text after a closing quote; write \"\" for a quote inside a quoted field\n"
    );
    assert_eq!(
        setup.read("failed/ts-1_b.csv.reason.txt"),
        "ts-1_b.csv: none of its 1 rows could be read\n\
         line 2: time `now` is not an RFC 3339 time\n"
    );
    assert_eq!(
        setup.read("failed/ts-1_c.csv.reason.txt"),
        "ts-1_c.csv: column `temp` is not in the header (line 1), which has `time`, `axis`, `temperature`, `pressure`; fix the file or the mapping\n"
    );
    assert_eq!(
        setup.read("failed/notes.txt.reason.txt"),
        "notes.txt: the file name does not match file_name `{station}_*.csv`\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_being_written_is_read_once_it_is_complete() {
    let setup = Setup::new(STAND);
    let agent = setup.start();
    let path = setup.drop_folder().join("ts-3_slow.csv");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(b"time,axis,temp,pressure\n").unwrap();
    // Each row comes well within `settle` (300ms) of the one before, so the file never settles
    // until the writer is done; the second row is written in two pieces.
    for piece in [
        "2024-05-01T12:00:00Z,x,100,1\n",
        "2024-05-01T12:00:01Z,x,",
        "101,2\n",
        "2024-05-01T12:00:02Z,x,102,3\n",
    ] {
        tokio::time::sleep(Duration::from_millis(150)).await;
        file.write_all(piece.as_bytes()).unwrap();
        file.flush().unwrap();
        assert!(setup.exists("ts-3_slow.csv"), "not taken while growing");
    }
    drop(file);
    // The rename convention: a `.part` file is never read, however long it sits.
    setup.write(
        "ts-3_next.csv.part",
        "time,axis,temp,pressure\n2024-05-01T12:00:03Z,x,103,4\n",
    );
    setup.wait_for("done/ts-3_slow.csv").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(setup.exists("ts-3_next.csv.part"));
    std::fs::rename(
        setup.drop_folder().join("ts-3_next.csv.part"),
        setup.drop_folder().join("ts-3_next.csv"),
    )
    .unwrap();
    setup.wait_for("done/ts-3_next.csv").await;
    agent.stop().await;
    let temps: Vec<(i64, f64)> = setup
        .readings()
        .into_iter()
        .filter(|r| r.2 == "temp")
        .map(|r| (r.0, r.3))
        .collect();
    assert_eq!(
        temps,
        vec![
            // value = raw * scale, as f64 computes it (101 * 0.1 is 10.100000000000001).
            (NOON_US, 100.0 * 0.1),
            (NOON_US + 1_000_000, 101.0 * 0.1),
            (NOON_US + 2_000_000, 102.0 * 0.1),
            (NOON_US + 3_000_000, 103.0 * 0.1),
        ]
    );
    assert_eq!(setup.readings().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_large_file_reads_every_row_exactly_once() {
    const ROWS: i64 = 60_000;
    let setup = Setup::new(
        "name = \"rig\"
format = \"csv\"
delimiter = \";\"
timestamp = \"us\"
timestamp_format = \"epoch_us\"
device = \"rig-1\"
[[file_drop.values]]
column = \"v\"
",
    );
    let mut text = String::from("us;v\n");
    for i in 0..ROWS {
        writeln!(text, "{};{i}", NOON_US + i).unwrap();
    }
    setup.write("big.csv", &text);

    let agent = setup.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while setup.buffered() < 4_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no readings arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.stop().await;
    let first_run = setup.uploaded().len();
    assert!(
        setup.exists("big.csv") && first_run < usize::try_from(ROWS).unwrap(),
        "stopped in the middle of the file (after {first_run} rows)"
    );

    let agent = setup.start();
    setup.wait_for("done/big.csv").await;
    agent.stop().await;
    let values: Vec<(i64, f64)> = setup.readings().into_iter().map(|r| (r.0, r.3)).collect();
    #[allow(clippy::cast_precision_loss)]
    let expected: Vec<(i64, f64)> = (0..ROWS).map(|i| (NOON_US + i, i as f64)).collect();
    assert_eq!(values.len(), expected.len());
    assert!(values == expected, "every row once, in file order");

    // A crash after the last commit but before the move leaves the file in the folder: put it
    // back exactly as it was (same size and time) and nothing is read again.
    std::fs::rename(
        setup.drop_folder().join("done/big.csv"),
        setup.drop_folder().join("big.csv"),
    )
    .unwrap();
    let agent = setup.start();
    setup.wait_for("done/big.csv").await;
    agent.stop().await;
    assert_eq!(setup.uploaded().len(), expected.len(), "nothing read twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_column_is_recorded_as_text_and_a_number_column_still_refuses_text() {
    let setup = Setup::new(
        "name = \"stand\"
format = \"csv\"
timestamp = \"time\"
timestamp_format = \"rfc3339\"
device = \"ts-3\"
[[file_drop.values]]
column = \"recipe\"
type = \"string\"
[[file_drop.values]]
column = \"temp\"
unit = \"degC\"
",
    );
    let agent = setup.start();
    setup.write(
        "run.csv",
        "time,recipe,temp\n\
         2024-05-01T12:00:00Z,\"PX-200, Öl\",21.5\n\
         2024-05-01T12:00:01Z,4711,\n\
         2024-05-01T12:00:02Z,,22\n\
         2024-05-01T12:00:03Z,PX-201,warm\n",
    );
    setup.wait_for("done/run.csv").await;
    agent.stop().await;
    let rows: Vec<TextOrNumber> = setup
        .uploaded()
        .into_iter()
        .map(|r| {
            assert_eq!(r.quality, Quality::Good);
            (r.ts_us, r.tag, r.value, r.value_text, r.unit)
        })
        .collect();
    let text = |s: u8, tag: &str, text: &str| {
        (
            NOON_US + i64::from(s) * 1_000_000,
            tag.to_owned(),
            None,
            Some(text.to_owned()),
            None,
        )
    };
    let number = |s: u8, v: f64| {
        (
            NOON_US + i64::from(s) * 1_000_000,
            "temp".to_owned(),
            Some(v),
            None,
            Some("degC".to_owned()),
        )
    };
    assert_eq!(
        rows,
        vec![
            text(0, "recipe", "PX-200, Öl"),
            number(0, 21.5),
            text(1, "recipe", "4711"),
            // An empty cell gives no reading, for text as for numbers.
            number(2, 22.0),
        ]
    );
    assert_eq!(
        setup.read("done/run.csv.reason.txt"),
        "run.csv: 1 of 4 rows could not be read; the 4 readings of the other rows are in the buffer\n\
         line 5: temp `warm` is not a number\n"
    );
}

/// A reading as the text-value tests compare it: time, tag, number, text, unit.
type TextOrNumber = (i64, String, Option<f64>, Option<String>, Option<String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_a_large_file_loses_no_row_and_reads_none_twice() {
    const ROWS: i64 = 60_000;
    let setup = Setup::new(
        "name = \"rig\"
format = \"csv\"
timestamp = \"us\"
timestamp_format = \"epoch_us\"
device = \"rig-1\"
[[file_drop.values]]
column = \"v\"
",
    );
    let mut text = String::from("us,v\n");
    for i in 0..ROWS {
        writeln!(text, "{},{i}", NOON_US + i).unwrap();
    }
    setup.write("big.csv", &text);
    let config = setup.dir.path().join("agent.toml");
    std::fs::write(&config, setup.config_text()).unwrap();

    // The agent as a process, so that it can die without any shutdown: no flush, no last
    // commit, the file half read.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while setup.buffered() < 4_000 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no readings arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = setup.buffered();
    assert!(
        setup.exists("big.csv") && at_kill < u64::try_from(ROWS).unwrap(),
        "killed in the middle of the file (after {at_kill} rows)"
    );

    let agent = setup.start();
    setup.wait_for("done/big.csv").await;
    agent.stop().await;
    let values: Vec<(i64, f64)> = setup.readings().into_iter().map(|r| (r.0, r.3)).collect();
    #[allow(clippy::cast_precision_loss)]
    let expected: Vec<(i64, f64)> = (0..ROWS).map(|i| (NOON_US + i, i as f64)).collect();
    assert_eq!(values.len(), expected.len(), "no row lost, none read twice");
    assert!(values == expected, "every row once, in file order");
}
