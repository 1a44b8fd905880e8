//! How opening a table and committing to it grow with the length of its log, with and without
//! checkpoints (delta-rs #2518 reports 20-30 s opens at 6k-20k commits without them).
//!
//! Three local readings tables get the same small commits (one gateway batch of 10 readings
//! each, as the collector makes them), interleaved so all see the same machine noise: one with
//! the collector's default `maintenance.checkpoint_interval` of 100, one with checkpoints pushed
//! out of reach (`delta.checkpointInterval` = 1,000,000), and one with checkpoints and an
//! OPTIMIZE every 500 commits (what `run.optimize_interval` does). At 1k, 5k and 10k commits it
//! prints the median time to open each table and the mean time of the next commits, and the
//! ratios against the table without checkpoints. Expired-log cleanup does not act here: every
//! commit is younger than the log retention.
//!
//! `cargo bench -p collector --bench log_growth` (about 10 minutes on 2 cores);
//! `PLANTLINE_BENCH_COMMITS=2000` for a shorter run (marks at 1/10, 1/2 and all of it).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use collector::config::{ConfigDuration, MaintenanceConfig};
use collector::delta::{ReadingsTable, TableUrls, Tables};
use edge_agent::contract::{self, Quality, Row};
use url::Url;

const ROWS_PER_COMMIT: i64 = 10;
const OPENS: usize = 3;
const TIMED_COMMITS: usize = 20;
const OPTIMIZE_EVERY: usize = 500;

fn batch(seq0: i64) -> arrow_array::RecordBatch {
    let rows: Vec<Row> = (seq0..seq0 + ROWS_PER_COMMIT)
        .map(|seq| Row {
            seq,
            ts_us: 1_767_225_600_000_000 + seq * 1_000_000,
            site: "plant-ost".into(),
            gateway: "gw-bench".into(),
            device: "press-3".into(),
            tag: format!("tag-{}", seq % 7),
            value: Some(seq as f64 / 3.0),
            quality: Quality::Good,
            unit: Some("bar".into()),
            value_text: None,
        })
        .collect();
    contract::to_record_batch(&rows)
}

struct Subject {
    name: &'static str,
    url: Url,
    table: ReadingsTable,
    next_seq: i64,
}

impl Subject {
    async fn create(root: &std::path::Path, name: &'static str, interval: u64) -> Self {
        let path = root.join(name).join("readings");
        std::fs::create_dir_all(&path).unwrap();
        let url = Url::from_directory_path(&path).unwrap();
        let urls = TableUrls::beside(&url).unwrap();
        let mut tables = Tables::open_or_create(&urls, HashMap::new()).await.unwrap();
        let config = MaintenanceConfig {
            checkpoint_interval: interval,
            log_retention: ConfigDuration::from_secs(30 * 24 * 3600),
            ..MaintenanceConfig::default()
        };
        collector::maintenance::apply_table_properties(&mut tables, &config)
            .await
            .unwrap();
        Self {
            name,
            url,
            table: tables.readings,
            next_seq: 1,
        }
    }

    async fn commit(&mut self) -> Duration {
        let b = batch(self.next_seq);
        self.next_seq += ROWS_PER_COMMIT;
        let started = Instant::now();
        let outcome = self.table.apply("gw-bench", &[b]).await.unwrap();
        let took = started.elapsed();
        assert_eq!(
            outcome.rows_applied,
            usize::try_from(ROWS_PER_COMMIT).unwrap()
        );
        took
    }

    async fn optimize(&mut self) {
        let mut table = self.table.delta_table().clone();
        collector::maintenance::optimize(&mut table, &self.url, 128 * 1024 * 1024)
            .await
            .unwrap();
        self.table.reload().await.unwrap();
    }

    async fn open_time(&self) -> Duration {
        let mut times = Vec::with_capacity(OPENS);
        for _ in 0..OPENS {
            let started = Instant::now();
            let table = ReadingsTable::open_or_create(&self.url, HashMap::new())
                .await
                .unwrap();
            times.push(started.elapsed());
            assert!(table.version().is_some());
        }
        times.sort();
        times[OPENS / 2]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The figures as a Markdown table for the README.
fn print_readme_table(rows: &[(usize, [Duration; 3], [Duration; 3])]) {
    println!("\nfor the README:\n");
    println!(
        "| commits | open: checkpoints | open: none | commit: checkpoints | commit: checkpoints + OPTIMIZE | commit: none |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (mark, open, commit) in rows {
        println!(
            "| {mark} | {:.0} ms | {:.0} ms ({:.1}x) | {:.0} ms | {:.0} ms | {:.0} ms ({:.1}x) |",
            ms(open[0]),
            ms(open[1]),
            ms(open[1]) / ms(open[0]),
            ms(commit[0]),
            ms(commit[2]),
            ms(commit[1]),
            ms(commit[1]) / ms(commit[2]),
        );
    }
}

fn main() {
    let total: usize = std::env::var("PLANTLINE_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let marks: Vec<usize> = if total >= 10_000 {
        vec![1_000, 5_000, total]
    } else {
        vec![(total / 10).max(1), (total / 2).max(1), total]
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut with = Subject::create(dir.path(), "with_checkpoints", 100).await;
        let mut without = Subject::create(dir.path(), "without_checkpoints", 1_000_000).await;
        let mut optimized = Subject::create(dir.path(), "checkpoints_and_optimize", 100).await;
        let machine = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        println!(
            "log growth: {total} commits of {ROWS_PER_COMMIT} readings to two local tables, on {} ({} CPUs)",
            machine,
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        );
        println!(
            "{:>8}  {:>10} {:>10} {:>10} {:>7}  {:>10} {:>10} {:>10} {:>7}",
            "commits",
            "open ckpt",
            "open none",
            "open c+o",
            "ratio",
            "commit ckpt",
            "commit none",
            "commit c+o",
            "ratio"
        );
        let mut made = 0;
        let mut rows = Vec::new();
        for mark in marks {
            while made < mark {
                with.commit().await;
                without.commit().await;
                optimized.commit().await;
                made += 1;
                if made % OPTIMIZE_EVERY == 0 {
                    optimized.optimize().await;
                }
            }
            let open = [
                with.open_time().await,
                without.open_time().await,
                optimized.open_time().await,
            ];
            let mut commit = [Duration::ZERO; 3];
            for _ in 0..TIMED_COMMITS {
                commit[0] += with.commit().await;
                commit[1] += without.commit().await;
                commit[2] += optimized.commit().await;
            }
            made += TIMED_COMMITS;
            let n = u32::try_from(TIMED_COMMITS).unwrap();
            let commit = commit.map(|c| c / n);
            println!(
                "{mark:>8}  {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>6.1}x  {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>6.1}x",
                ms(open[0]),
                ms(open[1]),
                ms(open[2]),
                ms(open[1]) / ms(open[0]),
                ms(commit[0]),
                ms(commit[1]),
                ms(commit[2]),
                ms(commit[1]) / ms(commit[2]),
            );
            rows.push((mark, open, commit));
        }
        print_readme_table(&rows);
        println!(
            "\n(tables: {}, {}, {}; OPTIMIZE every {OPTIMIZE_EVERY} commits)",
            with.name, without.name, optimized.name
        );
    });
}
