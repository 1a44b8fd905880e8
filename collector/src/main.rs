//! `collector`: the command line. Everything it does lives in the library; this file parses
//! arguments, sets up logging and signals, and maps outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use collector::config::{CollectorConfig, ConfigDuration};
use collector::maintenance::VacuumOptions;

/// Exit code for an invalid configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "collector",
    version,
    about = "Applies gateway batches to a Delta Lake table exactly once and loads Snowflake"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One pass over the raw zone, then exit: 0 when every gateway and tag catalog was applied
    /// (and Snowflake loaded, when configured), also when bad files were quarantined (they are
    /// listed), 1 when anything failed, 78 when the config is invalid.
    RunOnce {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Repeat passes every `run.interval` until SIGINT or SIGTERM, serving /metrics and
    /// /health on `metrics.listen` (127.0.0.1:9465 by default) and running OPTIMIZE and VACUUM
    /// on the schedule in [run].
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a config file and report every problem with its key and the fix.
    Validate { config: PathBuf },
    /// Apply the archived batches (`raw.archive_prefix`) again to the configured tables, per
    /// gateway in seq order, leaving the archive as it is; rows already in the table are
    /// filtered by the watermark, so a re-run resumes where a killed one stopped. Progress on
    /// stderr. Exit codes: 0 done, 1 a gateway failed, 78 invalid config.
    Backfill {
        #[arg(short, long)]
        config: PathBuf,
        /// Only this gateway (repeatable); default every gateway in the archive.
        #[arg(long = "gateway", value_name = "ID")]
        gateways: Vec<String>,
        /// Only archived files whose first seq is at or above this.
        #[arg(long, value_name = "SEQ")]
        from_seq: Option<i64>,
    },
    /// Move quarantined batch files (with their reason objects) back to the raw zone and apply
    /// them in a pass, after a rule or schema fix; files that fail again return to the
    /// quarantine with a fresh reason. Exit codes: 0 done, 1 a gateway failed, 78 invalid config.
    Reprocess {
        #[arg(short, long)]
        config: PathBuf,
        /// Only this gateway (repeatable); default every gateway in the quarantine.
        #[arg(long = "gateway", value_name = "ID")]
        gateways: Vec<String>,
        /// Only files whose reason names this kind (`rule_failed`, `foreign_schema`, ...) or
        /// this rule.
        #[arg(long, value_name = "KIND_OR_RULE")]
        reason: Option<String>,
    },
    /// Read the agents' Kinesis live stream (`[stream]`) into the live Delta table until SIGINT
    /// or SIGTERM, committing rows with each shard's position every `stream.flush_interval`.
    /// Exit codes: 0 stopped by a signal, 1 failed (table or stream unreachable), 78 invalid
    /// config.
    Stream {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Compact the readings table: each gateway's data files smaller than
    /// `maintenance.target_file_size_mb` are rewritten into files of about that size, in one
    /// commit with `dataChange = false` (the Snowflake loader skips it; no row changes).
    /// Exit codes: 0 done, 1 failed, 78 invalid config.
    Optimize {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Delete data files that left the readings, gaps and quarantined-rows tables longer ago
    /// than the retention. Refused when the retention is shorter than the Snowflake loader's lag
    /// (read from its control table through `[snowflake]`), so a file Snowflake has not loaded
    /// is never deleted. Exit codes: 0 done, 1 refused or failed, 78 invalid config.
    Vacuum {
        #[arg(short, long)]
        config: PathBuf,
        /// Files removed longer ago than this are deleted, like "168h"; default
        /// `maintenance.vacuum_retention`.
        #[arg(long, value_parser = parse_duration)]
        retention: Option<ConfigDuration>,
        /// Also delete files no commit references (left by commits that lost a race or
        /// crashed); needs a retention of at least 1h.
        #[arg(long)]
        full: bool,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not check the retention against the Snowflake loader; only for tables no
        /// Snowflake loads from (required when the config has no [snowflake] section).
        #[arg(long)]
        no_snowflake_check: bool,
    },
    /// Snowflake administration.
    Snowflake {
        #[command(subcommand)]
        command: SnowflakeCommand,
    },
    /// Run the whole pipeline locally: a simulated PLC, the edge agent, a local raw zone and a
    /// local Delta table; print what arrived.
    #[cfg(feature = "demo")]
    Demo(collector::demo::DemoArgs),
}

#[derive(Subcommand)]
enum SnowflakeCommand {
    /// Print the SQL a Snowflake admin runs once: database, schema, tables, analytics views, the
    /// loader and reporting roles with their grants, and a commented external-stage template.
    /// Exit codes: 0 done, 1 Snowflake refused a statement or is unreachable, 78 invalid config.
    Init {
        #[arg(short, long)]
        config: PathBuf,
        /// Also run the statements (not the templates) through the `[snowflake]` connection,
        /// one by one; safe to repeat.
        #[arg(long)]
        apply: bool,
        /// Leave the roles and grants out (print and apply), for accounts where a security admin
        /// applies them separately.
        #[arg(long)]
        skip_grants: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Our own components log at info; the libraries below (Delta kernel, HTTP, AWS) only when
    // something is wrong. The demo prints its own summary, so it logs warnings only.
    // Backfill and reprocess show progress and a summary instead of a log line per commit.
    let shows_progress = matches!(
        cli.command,
        Command::Backfill { .. } | Command::Reprocess { .. }
    );
    #[cfg(feature = "demo")]
    let default_filter = if matches!(cli.command, Command::Demo(_)) || shows_progress {
        "warn"
    } else {
        "warn,collector=info,edge_agent=info"
    };
    #[cfg(not(feature = "demo"))]
    let default_filter = if shows_progress {
        "warn"
    } else {
        "warn,collector=info,edge_agent=info"
    };
    edge_agent::process::init_logging(default_filter, false);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("collector: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Validate { config } => validate(&config),
            Command::Snowflake {
                command:
                    SnowflakeCommand::Init {
                        config,
                        apply,
                        skip_grants,
                    },
            } => snowflake_init(&config, apply, skip_grants).await,
            Command::Optimize { config } => optimize(&config).await,
            Command::Vacuum {
                config,
                retention,
                full,
                dry_run,
                no_snowflake_check,
            } => vacuum(&config, retention, full, dry_run, !no_snowflake_check).await,
            Command::RunOnce { config } => run_once(&config).await,
            Command::Stream { config } => stream(&config).await,
            Command::Backfill {
                config,
                gateways,
                from_seq,
            } => {
                let options = collector::backfill::BackfillOptions { gateways, from_seq };
                replay(&config, |c| async move {
                    collector::backfill::backfill(&c, &options).await
                })
                .await
            }
            Command::Reprocess {
                config,
                gateways,
                reason,
            } => {
                let options = collector::backfill::ReprocessOptions { gateways, reason };
                replay(&config, |c| async move {
                    collector::backfill::reprocess(&c, &options).await
                })
                .await
            }
            Command::Run { config } => run(&config).await,
            #[cfg(feature = "demo")]
            Command::Demo(args) => match collector::demo::run(args).await {
                Ok(summary) => {
                    println!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("demo failed: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

fn validate(path: &std::path::Path) -> ExitCode {
    match CollectorConfig::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run_once(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    match collector::run_once(&config).await {
        Ok(report) => {
            print!("{}", collector::summary::pass_summary(&report));
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            tracing::error!(component = "collector", "{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(edge_agent::process::cancel_on_signal(
        shutdown.clone(),
        "collector",
    ));
    match collector::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(component = "collector", "{e}");
            ExitCode::FAILURE
        }
    }
}

async fn snowflake_init(path: &std::path::Path, apply: bool, skip_grants: bool) -> ExitCode {
    use collector::snowflake::{InitScript, SnowflakeClient};
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let Some(snowflake) = &config.snowflake else {
        eprintln!(
            "{}: there is no [snowflake] section; add one with url, account, user, password_env, database and schema",
            path.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let script = match InitScript::new(snowflake, &config.delta.url) {
        Ok(script) => script.without_access_control(skip_grants),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !apply {
        print!("{}", script.render());
        return ExitCode::SUCCESS;
    }
    let mut client = match SnowflakeClient::login(snowflake).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("collector: {e}");
            return ExitCode::FAILURE;
        }
    };
    match script.apply(&mut client).await {
        Ok(applied) => {
            for object in &applied {
                println!("applied {object}");
            }
            println!("snowflake init: {} statements applied", applied.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("collector: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn stream(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    if config.stream.is_none() {
        eprintln!("{}: {}", path.display(), collector::StreamError::NoSection);
        return ExitCode::from(EXIT_CONFIG);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(edge_agent::process::cancel_on_signal(
        shutdown.clone(),
        "collector",
    ));
    let unhealthy_after = config
        .stream
        .as_ref()
        .map(collector::stream::StreamConfig::unhealthy_after)
        .unwrap_or_default();
    let metrics = std::sync::Arc::new(collector::stream::StreamMetrics::new(unhealthy_after));
    // Up before the live table opens, so /health says "starting" instead of refusing.
    let server_stop = shutdown.child_token();
    let server = collector::stream::serve_stream_metrics(
        &config,
        std::sync::Arc::clone(&metrics),
        server_stop.clone(),
    )
    .await;
    let outcome = collector::run_stream(&config, metrics, shutdown).await;
    server_stop.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(component = "stream", "{e}");
            ExitCode::FAILURE
        }
    }
}

async fn optimize(path: &std::path::Path) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    match collector::maintenance::optimize_readings(&config).await {
        Ok(report) => {
            print!("{}", collector::summary::optimize_summary(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("collector: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn vacuum(
    path: &std::path::Path,
    retention: Option<ConfigDuration>,
    full: bool,
    dry_run: bool,
    snowflake_check: bool,
) -> ExitCode {
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let options = VacuumOptions {
        retention: retention.unwrap_or(config.maintenance.vacuum_retention).0,
        full,
        dry_run,
    };
    match collector::maintenance::vacuum_tables(&config, &options, snowflake_check).await {
        Ok(reports) => {
            print!("{}", collector::summary::vacuum_summary(&reports));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("collector: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a backfill or reprocess and maps its outcome to an exit code.
async fn replay<F, Fut>(path: &std::path::Path, work: F) -> ExitCode
where
    F: FnOnce(CollectorConfig) -> Fut,
    Fut: std::future::Future<
            Output = Result<collector::backfill::WorkReport, collector::backfill::BackfillError>,
        >,
{
    let Some(config) = load(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    match work(config).await {
        Ok(report) => {
            print!("{}", report.summary());
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("collector: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_duration(text: &str) -> Result<ConfigDuration, String> {
    ConfigDuration::parse(text)
}

fn load(path: &std::path::Path) -> Option<CollectorConfig> {
    CollectorConfig::load(path)
        .map_err(|e| eprintln!("{e}"))
        .ok()
}
