//! `collector demo`: the whole pipeline in one process on embedded defaults.
//!
//! Two simulated PLCs serve Modbus TCP on loopback ports; the edge agent polls them, buffers in
//! SQLite and uploads Parquet batches to a local folder that plays the S3 raw zone; the collector
//! applies the batches to a local Delta table; the summary is read back from that table. With
//! `--snowflake-config` the collector loads Snowflake too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_agent::config::{
    AgentConfig, BatchConfig, BufferConfig, ConfigDuration, DirUpload, Durability, UploadConfig,
};
use edge_agent::simulator::SimulatedPlc;
use tokio_util::sync::CancellationToken;

use crate::config::CollectorConfig;
use crate::summary::{pass_summary, tag_table};

/// Marks a folder the demo created, so a re-run may clear it and nothing else.
const MARKER: &str = ".plantline-demo";

/// Arguments of `collector demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Folder for the demo's buffer, raw zone and Delta table. Cleared at the start of every
    /// run, but only if an earlier demo created it.
    #[arg(long, default_value = "demo-data")]
    pub dir: PathBuf,
    /// How long the agent polls the simulated PLCs.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// A collector config file whose `[snowflake]` section is used to load Snowflake as well.
    #[arg(long)]
    pub snowflake_config: Option<PathBuf>,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "{0} exists, is not empty and was not created by the demo; choose another folder with --dir"
    )]
    ForeignFolder(PathBuf),
    #[error("demo folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the simulated PLC: {0}")]
    Simulator(std::io::Error),
    #[error("the generated agent config is invalid (a bug in the demo): {0}")]
    AgentConfig(String),
    #[error(transparent)]
    Agent(Box<edge_agent::AgentError>),
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    #[error("{0} has no [snowflake] section")]
    NoSnowflake(PathBuf),
    #[error(transparent)]
    Collector(Box<crate::CollectorError>),
    #[error(transparent)]
    Delta(Box<crate::delta::DeltaError>),
}

// The wrapped errors are large; boxing them keeps every `Result` of the demo small.
macro_rules! boxed_from {
    ($($source:ty => $variant:ident),* $(,)?) => {$(
        impl From<$source> for DemoError {
            fn from(e: $source) -> Self {
                Self::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(
    edge_agent::AgentError => Agent,
    crate::config::ConfigError => Config,
    crate::CollectorError => Collector,
    crate::delta::DeltaError => Delta,
);

/// Runs the demo and returns the summary to print.
pub async fn run(args: DemoArgs) -> Result<String, DemoError> {
    let dir = prepare_folder(&args.dir)?;
    let snowflake = match &args.snowflake_config {
        None => None,
        Some(path) => Some(
            CollectorConfig::load(path)?
                .snowflake
                .ok_or_else(|| DemoError::NoSnowflake(path.clone()))?,
        ),
    };

    let press =
        SimulatedPlc::start_with_seed(0x9E37_79B9_7F4A_7C15).map_err(DemoError::Simulator)?;
    let oven =
        SimulatedPlc::start_with_seed(0xD1B5_4A32_D192_ED03).map_err(DemoError::Simulator)?;
    let agent_config = agent_config(
        &dir,
        &[
            press.device_config("press-3"),
            oven.device_config("press-4"),
        ],
    )?;
    println!(
        "demo: simulated PLCs on {} and {}; the agent polls them for {} s",
        press.addr(),
        oven.addr(),
        args.seconds
    );

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(agent_config, shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shutdown.cancel();
    agent
        .await
        .map_err(|e| DemoError::AgentConfig(format!("agent task failed: {e}")))??;
    press.shutdown().await;
    oven.shutdown().await;

    let collector_toml = dir.join("collector.toml");
    std::fs::write(&collector_toml, collector_config_text()).map_err(|source| DemoError::Io {
        path: collector_toml.clone(),
        source,
    })?;
    let mut config = CollectorConfig::load(&collector_toml)?;
    config.snowflake = snowflake;
    let report = crate::run_once(&config).await?;
    let (_, mut table) = crate::open_stores(&config).await?;
    let rows = table.current_rows().await?;

    Ok(format!(
        "\n{}\nDelta table {} (version {}) holds {} readings:\n\n{}\nFiles: buffer {}, raw zone {}, archive {}, Delta table {}\n",
        pass_summary(&report),
        table.url(),
        table
            .version()
            .map_or_else(|| "none".to_owned(), |v| v.to_string()),
        rows.len(),
        tag_table(&rows),
        dir.join("buffer.db").display(),
        dir.join("landing/raw").display(),
        dir.join("landing/archive").display(),
        dir.join("lake/readings").display(),
    ))
}

/// Creates the folder, or clears one an earlier demo created.
fn prepare_folder(dir: &Path) -> Result<PathBuf, DemoError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DemoError::Io { path, source }
    };
    if dir.exists() {
        let ours = dir.join(MARKER).exists();
        let empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
        if !ours && !empty {
            return Err(DemoError::ForeignFolder(dir.to_owned()));
        }
        if ours {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::write(
        dir.join(MARKER),
        "created by `collector demo`; cleared on the next demo run\n",
    )
    .map_err(io(dir))?;
    std::path::absolute(dir).map_err(io(dir))
}

fn agent_config(
    dir: &Path,
    devices: &[edge_agent::config::ModbusDevice],
) -> Result<AgentConfig, DemoError> {
    let config = AgentConfig {
        site: "demo-plant".to_owned(),
        gateway: "gw-demo".to_owned(),
        buffer: BufferConfig {
            path: dir.join("buffer.db"),
            durability: Durability::Full,
            commit_interval: ConfigDuration::from_millis(200),
            // The agent's own bounds (size, age, what to drop when full) keep their defaults.
            ..BufferConfig::default()
        },
        batch: BatchConfig {
            max_rows: 200,
            max_age: ConfigDuration::from_secs(2),
            // The demo uploads to a local folder with no backlog to speak of.
            fresh_lane: true,
        },
        upload: UploadConfig {
            s3: None,
            dir: Some(DirUpload {
                path: dir.join("landing"),
                prefix: "raw/".to_owned(),
            }),
        },
        modbus: devices
            .iter()
            .cloned()
            .map(|mut d| {
                d.poll_interval = ConfigDuration::from_millis(250);
                d
            })
            .collect(),
        modbus_bus: Vec::new(),
        mqtt: Vec::new(),
        file_drop: Vec::new(),
        // The demo may run next to a real agent (or another demo): no fixed port to collide on.
        metrics: edge_agent::config::MetricsConfig {
            enabled: false,
            ..edge_agent::config::MetricsConfig::default()
        },
        kinesis: None,
        assets: edge_agent::config::Assets::default(),
    };
    let problems = edge_agent::config::validate(&config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(DemoError::AgentConfig(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ))
    }
}

/// The collector config the demo writes next to its data, so it can be run by hand afterwards
/// (`collector run-once --config demo-data/collector.toml`).
fn collector_config_text() -> &'static str {
    "# Written by `collector demo`. Paths are relative to this file.\n\
     [raw]\n\
     url = \"landing\"\n\
     prefix = \"raw/\"\n\
     archive_prefix = \"archive/\"\n\
     \n\
     [delta]\n\
     url = \"lake/readings\"\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_clear_a_folder_it_did_not_create() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("precious.txt"), "keep").unwrap();
        let err = prepare_folder(tmp.path()).unwrap_err();
        assert!(matches!(err, DemoError::ForeignFolder(_)), "{err}");
        assert!(tmp.path().join("precious.txt").exists());

        let ours = tmp.path().join("demo");
        prepare_folder(&ours).unwrap();
        std::fs::write(ours.join("old.parquet"), "x").unwrap();
        prepare_folder(&ours).unwrap();
        assert!(!ours.join("old.parquet").exists());
        assert!(ours.join(MARKER).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_delivers_every_simulated_tag_to_the_delta_table() {
        let tmp = tempfile::tempdir().unwrap();
        let summary = run(DemoArgs {
            dir: tmp.path().join("demo"),
            seconds: 3,
            snowflake_config: None,
        })
        .await
        .unwrap();
        let config = CollectorConfig::load(&tmp.path().join("demo/collector.toml")).unwrap();
        let (_, mut table) = crate::open_stores(&config).await.unwrap();
        let rows = table.current_rows().await.unwrap();
        let stats = crate::summary::tag_stats(&rows);
        // Two PLCs with five tags each, polled every 250 ms for 3 s.
        assert_eq!(stats.len(), 10, "{summary}");
        for ((_, device, tag), s) in &stats {
            assert!(
                s.rows >= 8,
                "{device}/{tag} has only {} rows\n{summary}",
                s.rows
            );
            assert_eq!(s.bad, 0, "{device}/{tag}\n{summary}");
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let expected: Vec<i64> = (1..=i64::try_from(rows.len()).unwrap()).collect();
        assert_eq!(seqs, expected, "every reading arrives once, in seq order");
        assert!(
            summary.contains("press-3") && summary.contains("oil_temp"),
            "{summary}"
        );
        // Everything was applied, so the raw zone is empty and the originals are archived.
        let raw = tmp.path().join("demo/landing/raw/gateway=gw-demo");
        assert_eq!(std::fs::read_dir(&raw).map_or(0, Iterator::count), 0);
    }
}
