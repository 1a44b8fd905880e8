//! Helpers shared by the agent's integration tests.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_agent::Reading;
use edge_agent::config::ModbusDevice;
use edge_agent::contract::{Quality, Row};
use edge_agent::sources::modbus::run_device;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One device's poller under test; readings arrive in the sensor map's tag order.
pub(crate) struct Poller {
    rx: mpsc::Receiver<Reading>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    tags: Vec<String>,
}

impl Poller {
    pub(crate) fn start(device: ModbusDevice) -> Self {
        let tags = device.tags.iter().map(|t| t.name.clone()).collect();
        let (tx, rx) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_device(device, tx, stop.clone()));
        Self {
            rx,
            stop,
            task,
            tags,
        }
    }

    pub(crate) async fn next(&mut self) -> Reading {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a reading within 10 s")
            .expect("the poller is running")
    }

    /// The readings of one tick, in tag order. Call it at a tick boundary.
    pub(crate) async fn round(&mut self) -> Vec<Reading> {
        let mut round = Vec::with_capacity(self.tags.len());
        for name in self.tags.clone() {
            let reading = self.next().await;
            assert_eq!(reading.tag, name, "readings come in tag order");
            round.push(reading);
        }
        round
    }

    /// Skips ticks until one whose first tag has `quality`, and returns that tick.
    pub(crate) async fn round_with(&mut self, quality: Quality) -> Vec<Reading> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {quality} tick within 20 s"
            );
            let reading = self.next().await;
            if reading.tag == self.tags[0] && reading.quality == quality {
                let mut round = vec![reading];
                for name in self.tags.clone().into_iter().skip(1) {
                    let reading = self.next().await;
                    assert_eq!(reading.tag, name, "readings come in tag order");
                    round.push(reading);
                }
                return round;
            }
        }
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("the poller ends without panicking");
    }
}

/// Every main-lane Parquet file below `dir` (the upload folder of a `[upload.dir]` agent),
/// sorted: the batches that carry every reading once. Fresh-lane copies (`fresh/` folders, batch
/// contract v3) are left out; see [`fresh_parquet_files`].
pub(crate) fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    lane_files(dir, false)
}

/// Every fresh-lane Parquet file below `dir`, sorted.
#[allow(dead_code)]
pub(crate) fn fresh_parquet_files(dir: &Path) -> Vec<PathBuf> {
    lane_files(dir, true)
}

fn lane_files(dir: &Path, fresh: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![(dir.to_owned(), false)];
    while let Some((folder, in_fresh)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a listed entry can be read").path();
            if path.is_dir() {
                let is_fresh = in_fresh || path.file_name().is_some_and(|n| n == "fresh");
                stack.push((path, is_fresh));
            } else if in_fresh == fresh && path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every row of every batch uploaded below `dir`, checked against the contract, in `seq` order.
pub(crate) fn uploaded_rows(dir: &Path) -> Vec<Row> {
    let mut rows: Vec<Row> = parquet_files(dir)
        .into_iter()
        .flat_map(|f| {
            let bytes = std::fs::read(&f).expect("an uploaded batch can be read");
            edge_agent::batch::read_rows(bytes.into())
                .unwrap_or_else(|e| panic!("{} breaks the batch contract: {e}", f.display()))
        })
        .collect();
    rows.sort_by_key(|r| r.seq);
    rows
}
