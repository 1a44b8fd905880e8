//! The collector's compaction against DuckDB and PySpark doing the same work on the same files.
//!
//! The work: many small batch files as gateways upload them, with replayed rows (every batch
//! starts 10% back into the one before it, as after a crash between upload and delete), turned
//! into one deduplicated, date-partitioned table. The collector does it with a normal pass (one
//! Delta commit per `run.max_files_per_commit` files of a gateway, watermark filter, archive of
//! every applied file); DuckDB with `COPY ... (PARTITION_BY (date))` over a `DISTINCT ON
//! (gateway, seq)`; PySpark 4 in local mode with `dropDuplicates` and `partitionBy("date")`.
//! DuckDB and PySpark write plain Parquet folders and commit nothing, so the comparison is
//! tilted their way.
//!
//! Each engine's output is counted afterwards (distinct `(gateway, seq)` pairs must equal the
//! generated unique readings), so a fast wrong answer cannot pass. The figures are printed with
//! the machine named and the two ratios; the timing of each engine covers its work only (not
//! Python's or the JVM's start-up, which is printed separately for PySpark).
//!
//! Not run in CI. `collector/benches/compaction.sh` makes the PySpark venv when it is missing and
//! runs it; by hand: `cargo bench -p collector --bench compaction` with the venvs in place.
//! `PLANTLINE_BENCH_FILES` (800) and `PLANTLINE_BENCH_ROWS` (2,000,000) change the size.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use edge_agent::contract::{BatchKey, Quality, Row};

const GATEWAYS: usize = 8;
const TAGS: usize = 50;
/// One reading per second per gateway, starting 2026-01-01T20:00:00Z, so the data crosses
/// several midnights and the output has several date partitions.
const START_US: i64 = 1_767_297_600_000_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!(
        "{cpu} ({} CPUs)",
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    )
}

/// Writes the batch files under `input/raw/gateway=G/`, as the agent names them. Returns the
/// number of rows written and the number of distinct readings among them.
fn generate(input: &Path, files: usize, rows: usize) -> (usize, usize) {
    let files_per_gateway = (files / GATEWAYS).max(1);
    let rows_per_file = (rows / (files_per_gateway * GATEWAYS)).max(10);
    let step = rows_per_file - rows_per_file / 10;
    let mut written = 0;
    let mut unique = 0;
    for g in 0..GATEWAYS {
        let gateway = format!("gw-{g:02}");
        for f in 0..files_per_gateway {
            let first = i64::try_from(1 + f * step).expect("seq fits i64");
            let batch: Vec<Row> = (first..first + i64::try_from(rows_per_file).unwrap())
                .map(|seq| {
                    let tag = usize::try_from(seq).unwrap() % TAGS;
                    Row {
                        seq,
                        ts_us: START_US + seq * 1_000_000,
                        site: "plant-ost".into(),
                        gateway: gateway.clone(),
                        device: format!("press-{}", tag % 5),
                        tag: format!("tag-{tag:02}"),
                        value: Some((seq as f64 / 17.0).sin() * 40.0 + 60.0),
                        quality: Quality::Good,
                        unit: Some("degC".into()),
                        value_text: None,
                    }
                })
                .collect();
            let bytes = edge_agent::batch::encode(&batch, &[]).expect("generated rows encode");
            let path = input.join(BatchKey::new(&gateway, first).to_key("raw/"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
            written += batch.len();
        }
        unique += (files_per_gateway - 1) * step + rows_per_file;
    }
    (written, unique)
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs one pass of the collector over a copy of the files; returns the seconds of the pass and
/// the distinct readings in the table, counted by DuckDB's Delta reader.
fn run_collector(dir: &Path, input: &Path, duckdb_python: &Path, script: &Path) -> (f64, u64) {
    let root = dir.join("collector");
    std::fs::create_dir_all(root.join("landing")).unwrap();
    copy_tree(input, &root.join("landing"));
    let config_path = root.join("cloud.toml");
    std::fs::write(
        &config_path,
        "[raw]\nurl = \"landing\"\n\n[delta]\nurl = \"lake/readings\"\n",
    )
    .unwrap();
    let config = collector::config::CollectorConfig::load(&config_path).expect("bench config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let report = runtime
        .block_on(collector::run_once(&config))
        .expect("collector pass");
    let seconds = started.elapsed().as_secs_f64();
    assert!(report.is_clean(), "the collector's pass was not clean");
    let counted = count(
        duckdb_python,
        script,
        "count-delta",
        &root.join("lake/readings"),
    );
    (seconds, counted)
}

/// Runs `script ENGINE INPUT OUTPUT` and returns the seconds it printed as `seconds=S` and, on
/// a `startup=S` line, the start-up time.
fn run_baseline(
    python: &Path,
    script: &Path,
    engine: &str,
    input: &Path,
    output: &Path,
) -> (f64, Option<f64>) {
    let out = Command::new(python)
        .arg(script)
        .arg(engine)
        .arg(input)
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{engine} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    (
        field("seconds=").unwrap_or_else(|| panic!("{engine} printed no seconds:\n{stdout}")),
        field("startup="),
    )
}

fn count(python: &Path, script: &Path, what: &str, path: &Path) -> u64 {
    let out = Command::new(python)
        .arg(script)
        .arg(what)
        .arg(path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} {}:\n{stdout}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("distinct="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what} printed no count:\n{stdout}"))
}

fn venv_python(name: &str, how: &str) -> PathBuf {
    let python = pipeline_e2e::cache_dir()
        .join("venv")
        .join(name)
        .join("bin/python");
    assert!(python.exists(), "{} is missing: {how}", python.display());
    python
}

fn main() {
    let files = env_usize("PLANTLINE_BENCH_FILES", 800);
    let rows = env_usize("PLANTLINE_BENCH_ROWS", 2_000_000);
    let script = pipeline_e2e::checkout().join("collector/benches/compaction_baselines.py");
    let duckdb = venv_python("duckdb", "run ./tests/run.sh --install-only");
    let pyspark = venv_python(
        "pyspark",
        "run collector/benches/compaction.sh, which makes it",
    );

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    let (written, unique) = generate(&input, files, rows);
    println!(
        "compaction: {files} batch files, {written} rows ({} replayed), {unique} distinct readings, on {}",
        written - unique,
        machine()
    );

    let (collector_s, collector_rows) = run_collector(dir.path(), &input, &duckdb, &script);
    let duck_out = dir.path().join("duckdb-out");
    let (duck_s, _) = run_baseline(&duckdb, &script, "duckdb", &input, &duck_out);
    let duck_rows = count(&duckdb, &script, "count-parquet", &duck_out);
    let spark_out = dir.path().join("pyspark-out");
    let (spark_s, spark_startup) = run_baseline(&pyspark, &script, "pyspark", &input, &spark_out);
    let spark_rows = count(&duckdb, &script, "count-parquet", &spark_out);

    let expected = u64::try_from(unique).unwrap();
    for (engine, got) in [
        ("collector", collector_rows),
        ("duckdb", duck_rows),
        ("pyspark", spark_rows),
    ] {
        assert_eq!(
            got, expected,
            "{engine} wrote {got} distinct readings, {expected} expected"
        );
    }
    println!(
        "  collector (Delta commits, watermark, archive): {collector_s:>7.2} s  {:>9.0} rows/s",
        written as f64 / collector_s
    );
    println!(
        "  DuckDB COPY ... PARTITION_BY (plain Parquet):  {duck_s:>7.2} s  {:>9.0} rows/s",
        written as f64 / duck_s
    );
    println!(
        "  PySpark local (plain Parquet):                 {spark_s:>7.2} s  {:>9.0} rows/s{}",
        written as f64 / spark_s,
        spark_startup.map_or_else(String::new, |s| format!(
            "  (+{s:.1} s JVM and session start)"
        ))
    );
    println!(
        "ratios: collector time / DuckDB time = {:.2}, collector time / PySpark time = {:.2} (below 1: the collector is faster)",
        collector_s / duck_s,
        collector_s / spark_s
    );
}
