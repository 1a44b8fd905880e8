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
//! The two comparison tables slow down with every commit (without OPTIMIZE each commit costs
//! time in the number of data files), so they stop at `PLANTLINE_BENCH_BASELINE_COMMITS` (1,000);
//! the table kept the way the collector keeps it goes on to `PLANTLINE_BENCH_COMMITS` (10,000),
//! and its figures at the later marks are printed beside the baselines' last ones.
//!
//! `cargo bench -p collector --bench log_growth` (about 20 minutes on 2 cores);
//! `PLANTLINE_BENCH_COMMITS=2000` for a shorter run.

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

/// The figures as a Markdown table for the README; the baselines' cells stay empty past the
/// mark where they stopped.
fn print_readme_table(rows: &[(usize, [Duration; 3], [Duration; 3], bool)]) {
    println!("\nfor the README:\n");
    println!(
        "| commits | open: checkpoints + OPTIMIZE | open: checkpoints | open: none | commit: checkpoints + OPTIMIZE | commit: checkpoints | commit: none |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (mark, open, commit, baselines_run) in rows {
        let cell = |d: Duration, ours: Duration| {
            if *baselines_run {
                format!("{:.0} ms ({:.1}x)", ms(d), ms(d) / ms(ours))
            } else {
                "stopped".to_owned()
            }
        };
        println!(
            "| {mark} | {:.0} ms | {} | {} | {:.0} ms | {} | {} |",
            ms(open[2]),
            cell(open[0], open[2]),
            cell(open[1], open[2]),
            ms(commit[2]),
            cell(commit[0], commit[2]),
            cell(commit[1], commit[2]),
        );
    }
}

#[allow(clippy::too_many_lines)] // one run read top to bottom: set-up, the marks, the table
fn main() {
    let total: usize = std::env::var("PLANTLINE_BENCH_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let baseline_total: usize = std::env::var("PLANTLINE_BENCH_BASELINE_COMMITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
        .min(total);
    let mut marks: Vec<usize> = vec![
        (baseline_total / 10).max(1),
        (baseline_total / 2).max(1),
        baseline_total,
    ];
    for mark in [total / 2, total] {
        if mark > *marks.last().unwrap_or(&0) {
            marks.push(mark);
        }
    }
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
            "log growth: {total} commits of {ROWS_PER_COMMIT} readings to three local tables, on {} ({} CPUs)",
            machine,
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        );
        println!(
            "{:>8}  {:>10} {:>10} {:>10} {:>7}  {:>10} {:>10} {:>10} {:>7}",
            "commits",
            "open ckpt",
            "open none",
            "open c+o",
            "none/c+o",
            "commit ckpt",
            "commit none",
            "commit c+o",
            "none/c+o"
        );
        let mut made = 0;
        let mut rows = Vec::new();
        // The baselines' figures at their last mark, repeated at the later marks.
        let mut baseline = ([Duration::ZERO; 2], [Duration::ZERO; 2]);
        for mark in marks {
            let baselines_run = mark <= baseline_total;
            while made < mark {
                if baselines_run {
                    with.commit().await;
                    without.commit().await;
                }
                optimized.commit().await;
                made += 1;
                if made % OPTIMIZE_EVERY == 0 {
                    optimized.optimize().await;
                }
            }
            let mut open = [Duration::ZERO; 3];
            let mut commit = [Duration::ZERO; 3];
            open[2] = optimized.open_time().await;
            if baselines_run {
                open[0] = with.open_time().await;
                open[1] = without.open_time().await;
            }
            for _ in 0..TIMED_COMMITS {
                if baselines_run {
                    commit[0] += with.commit().await;
                    commit[1] += without.commit().await;
                }
                commit[2] += optimized.commit().await;
            }
            made += TIMED_COMMITS;
            let n = u32::try_from(TIMED_COMMITS).unwrap();
            let mut commit = commit.map(|c| c / n);
            if baselines_run {
                baseline = ([open[0], open[1]], [commit[0], commit[1]]);
            } else {
                [open[0], open[1]] = baseline.0;
                [commit[0], commit[1]] = baseline.1;
            }
            let note = if baselines_run {
                String::new()
            } else {
                format!("  (baselines as at {baseline_total})")
            };
            println!(
                "{mark:>8}  {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>6.1}x  {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>6.1}x{note}",
                ms(open[0]),
                ms(open[1]),
                ms(open[2]),
                ms(open[1]) / ms(open[2]),
                ms(commit[0]),
                ms(commit[1]),
                ms(commit[2]),
                ms(commit[1]) / ms(commit[2]),
            );
            rows.push((mark, open, commit, baselines_run));
        }
        print_readme_table(&rows);
        println!(
            "\n(tables: {}, {}, {}; OPTIMIZE every {OPTIMIZE_EVERY} commits)",
            with.name, without.name, optimized.name
        );
    });
}
