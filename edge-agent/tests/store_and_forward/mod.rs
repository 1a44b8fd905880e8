//! Shared by the store-and-forward proofs (`crash_loop.rs`, `s3_outage.rs`): the real
//! `edge-agent` binary reading CSV files from a file-drop folder and uploading to moto, a
//! producer that writes those files at a steady rate, and the reader that checks what landed
//! in S3 against what was produced.
//!
//! Every produced row has a unique number `n` (0, 1, 2, ...) as its value, and the file drop
//! commits a file's rows and its progress in one transaction, so each row is accepted exactly
//! once however often the agent dies. Uploaded batches are read back with boto3 (`s3ctl`), an
//! S3 client independent of the agent's.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_agent::contract::{BatchKey, Gap, Row};
use pipeline_e2e::{MotoServer, S3_ACCESS_KEY_ID, S3_REGION, S3_SECRET_ACCESS_KEY};

pub(crate) const GATEWAY: &str = "gw-sf";
pub(crate) const PREFIX: &str = "raw/";

/// The agent's config: one file-drop folder `drop/` whose CSV rows `time,n` become readings of
/// tag `n`, uploads to `bucket` on `endpoint`; `extra` is appended (`[buffer]` bounds).
pub(crate) fn write_config(
    dir: &Path,
    endpoint: &str,
    bucket: &str,
    max_rows: usize,
    extra: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("drop")).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"site = "plant-a"
gateway = "{GATEWAY}"

[batch]
max_rows = {max_rows}
max_age = "1s"

[upload.s3]
bucket = "{bucket}"
endpoint = "{endpoint}"
region = "{S3_REGION}"
timeout = "10s"

[metrics]
enabled = false

[[file_drop]]
name = "stand"
folder = "drop"
format = "csv"
settle = "0s"
poll_interval = "20ms"
timestamp = "time"
timestamp_format = "epoch_ms"
device = "stand-1"

  [[file_drop.values]]
  column = "n"

{extra}
"#
        ),
    )
    .unwrap();
    path
}

/// A running `edge-agent run` process. Dropping it kills it.
pub(crate) struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent on `config`; its stderr goes to `log` (appended, for the failure report).
    pub(crate) fn start(config: &Path, log: &Path) -> Self {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--reload-interval", "off", "--config"])
            .arg(config)
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY)
            .env("AWS_REGION", S3_REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "edge_agent=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the edge-agent binary was built for this test");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no shutdown, no flush.
    pub(crate) fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Freezes the process (SIGSTOP), so a look at S3 is not raced by an upload.
    pub(crate) fn freeze(&self) {
        self.signal("STOP");
    }

    pub(crate) fn thaw(&self) {
        self.signal("CONT");
    }

    /// SIGTERM and the exit code of the clean shutdown.
    pub(crate) fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop within 60 s of SIGTERM{}",
                log_tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "\n--- agent log (last lines) ---\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

/// Writes CSV files of `rows_per_file` rows into `drop/` every `every`, each under a temporary
/// name first and renamed when complete, until stopped.
pub(crate) struct Producer {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    task: Option<JoinHandle<u64>>,
}

impl Producer {
    pub(crate) fn start(dir: &Path, rows_per_file: u64, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let folder = dir.join("drop");
        let task = std::thread::spawn({
            let stop = Arc::clone(&stop);
            let produced = Arc::clone(&produced);
            move || {
                let mut n = 0u64;
                let mut file = 0u64;
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let mut text = String::from("time,n\n");
                    for _ in 0..rows_per_file {
                        let _ = writeln!(text, "{},{n}", 1_700_000_000_000u64 + n);
                        n += 1;
                    }
                    let part = folder.join(format!("f{file:06}.csv.part"));
                    let mut f = std::fs::File::create(&part).unwrap();
                    f.write_all(text.as_bytes()).unwrap();
                    drop(f);
                    std::fs::rename(&part, folder.join(format!("f{file:06}.csv"))).unwrap();
                    file += 1;
                    produced.store(n, Ordering::SeqCst);
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                n
            }
        });
        Self {
            stop,
            produced,
            task: Some(task),
        }
    }

    pub(crate) fn produced(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }

    /// Stops writing and returns how many rows were written in all.
    pub(crate) fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.take().unwrap().join().unwrap()
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Files still waiting in the drop folder (not yet moved to `done/`).
pub(crate) fn files_waiting(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("drop"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "csv")
        })
        .count()
}

/// `edge-agent buffer` on the config: its report lines by their label.
pub(crate) fn buffer_report(config: &Path) -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["buffer", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "edge-agent buffer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (label, value) = l.split_at(l.len().min(16));
            (!label.trim().is_empty()).then(|| (label.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Waits until every produced file was read and the buffer is empty (all uploaded).
pub(crate) fn wait_until_drained(dir: &Path, config: &Path, agent: &mut Agent, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        assert!(agent.is_running(), "the agent exited{}", agent.log_tail());
        if files_waiting(dir) == 0
            && buffer_report(config).get("readings").map(String::as_str) == Some("0")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "files or readings still waiting after {within:?}: {} files, buffer {:?}{}",
            files_waiting(dir),
            buffer_report(config),
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One uploaded batch as read back from S3.
pub(crate) struct Landed {
    pub(crate) key: String,
    pub(crate) bytes: Vec<u8>,
    pub(crate) rows: Vec<Row>,
    pub(crate) gaps: Vec<Gap>,
}

/// Downloads every batch of the gateway from `moto` into `into` (a folder of its own) and reads
/// the main-lane ones (every reading once), checking each against the batch contract. Fresh-lane
/// copies (batch contract v3) land in `into/fresh/` and are not read here.
pub(crate) fn download(moto: &MotoServer, bucket: &str, into: &Path) -> BTreeMap<String, Landed> {
    let prefix = BatchKey::gateway_prefix(PREFIX, GATEWAY);
    std::fs::create_dir_all(into).unwrap();
    moto.download_prefix(bucket, &prefix, into);
    let mut landed = BTreeMap::new();
    for entry in std::fs::read_dir(into).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let key = format!("{prefix}{name}");
        let bytes = std::fs::read(&path).unwrap();
        let rows = edge_agent::batch::read_rows(Bytes::from(bytes.clone()))
            .unwrap_or_else(|e| panic!("{key} breaks the batch contract: {e}"));
        let gaps = edge_agent::batch::read_gaps(Bytes::from(bytes.clone())).unwrap();
        let first = BatchKey::parse(PREFIX, &key)
            .unwrap_or_else(|e| panic!("{key} is not a batch key: {e}"))
            .first_seq;
        assert_eq!(
            rows.first().map(|r| r.seq),
            Some(first),
            "{key}: the key names the first seq"
        );
        assert!(
            rows.windows(2).all(|w| w[0].seq < w[1].seq),
            "{key}: seq strictly increases"
        );
        landed.insert(
            key.clone(),
            Landed {
                key,
                bytes,
                rows,
                gaps,
            },
        );
    }
    landed
}

/// What the batches in S3 add up to.
pub(crate) struct Coverage {
    /// Every `seq` with its row, each once.
    pub(crate) rows: BTreeMap<i64, Row>,
    /// `seq` values found in more than one batch (with identical rows; see [`coverage`]).
    pub(crate) overlapping: usize,
    /// The gap records, one per (first seq, reason).
    pub(crate) gaps: BTreeMap<(i64, String), Gap>,
}

/// Puts the batches together and checks the delivery chain: a `seq` found in two batches must
/// carry the same row in both (the collector's `seq > watermark` filter then drops the second
/// copy and the table is the same), no gap record covers a delivered `seq`, and every `seq`
/// from 1 to the highest delivered is either delivered or inside a gap record.
pub(crate) fn coverage<'a>(batches: impl IntoIterator<Item = &'a Landed>) -> Coverage {
    let mut rows: BTreeMap<i64, Row> = BTreeMap::new();
    let mut overlapping = 0;
    let mut gaps = BTreeMap::new();
    for batch in batches {
        for row in &batch.rows {
            if let Some(before) = rows.get(&row.seq) {
                assert_eq!(
                    before, row,
                    "seq {} differs between two batches (second in {})",
                    row.seq, batch.key
                );
                overlapping += 1;
            } else {
                rows.insert(row.seq, row.clone());
            }
        }
        for gap in &batch.gaps {
            gaps.insert((gap.first_seq, gap.reason.as_str().to_owned()), gap.clone());
        }
    }
    let last = rows.keys().next_back().copied().unwrap_or(0);
    let mut in_gaps = BTreeSet::new();
    for gap in gaps.values() {
        for seq in gap.first_seq..=gap.last_seq {
            assert!(
                !rows.contains_key(&seq),
                "gap record {gap:?} covers seq {seq}, which was delivered"
            );
            in_gaps.insert(seq);
        }
    }
    let unexplained: Vec<i64> = (1..=last)
        .filter(|s| !rows.contains_key(s) && !in_gaps.contains(s))
        .collect();
    assert!(
        unexplained.is_empty(),
        "{} seq values between 1 and {last} are neither in a batch nor in a gap record, first {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)]
    );
    Coverage {
        rows,
        overlapping,
        gaps,
    }
}

/// The produced numbers `n` carried by the delivered rows, checking that none came twice.
pub(crate) fn delivered_numbers(coverage: &Coverage) -> BTreeSet<u64> {
    let mut numbers = BTreeSet::new();
    for row in coverage.rows.values() {
        let value = row.value.expect("every produced row has a number");
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = value as u64;
        assert!(
            numbers.insert(n),
            "row number {n} was delivered under two seq values (the second is {})",
            row.seq
        );
    }
    numbers
}
