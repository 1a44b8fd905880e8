//! `edge-agent`: the command line. Everything it does lives in the library; this file parses
//! arguments, sets up logging and signals, and maps outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use edge_agent::config;

/// Exit code for an invalid configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Reads PLCs and sensors, buffers every reading durably, ships Parquet batches to S3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// The agent's config file (sensor map, buffer, upload target).
        #[arg(short, long, default_value = "/etc/edge-agent/agent.toml")]
        config: PathBuf,
    },
    /// Check config files and report every problem with its key and the fix. Exit code 78 when
    /// any file is invalid.
    Validate {
        /// One or more config files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging("warn,edge_agent=info");
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Run { config } => run(&config),
    }
}

/// Logs go to stderr; `RUST_LOG` overrides `default_filter`.
fn init_logging(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut invalid = false;
    for file in files {
        match config::load_file(file) {
            Ok(cfg) => {
                let tags: usize = cfg.modbus.iter().map(|d| d.tags.len()).sum();
                println!(
                    "{}: ok ({} devices, {tags} tags, gateway `{}`)",
                    file.display(),
                    cfg.modbus.len(),
                    cfg.gateway
                );
            }
            Err(e) => {
                invalid = true;
                eprintln!("{e}");
            }
        }
    }
    if invalid {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let cfg = match config::load_file(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match edge_agent::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(component = "agent", "{e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::error!("cannot listen for SIGTERM; stop the agent with SIGINT");
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(component = "agent", "shutdown requested");
    token.cancel();
}
