//! `edge-agent`: the command line. Everything it does lives in the library; this file parses
//! arguments, sets up logging and signals, and maps outcomes to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use edge_agent::config;
use edge_agent::tools::{import_tags, probe};

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
    /// Run the agent until SIGINT or SIGTERM. Edits of the config file are applied while it
    /// runs (checked every --reload-interval, and on SIGHUP).
    Run {
        /// The agent's config file (sensor map, buffer, upload target).
        #[arg(short, long, default_value = "/etc/edge-agent/agent.toml")]
        config: PathBuf,
        /// `text` (default): one human-readable line per event. `json`: one JSON object per
        /// line, with the event's fields and its span's `component` and `device`, for journald
        /// or a log shipper.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// How often the config file is checked for edits, which are applied without a
        /// restart (the sensor map: devices, brokers, folders; see the README). `off`: only
        /// when the agent gets SIGHUP (`systemctl reload edge-agent`), which always works.
        #[arg(long, default_value = "3s", value_parser = parse_reload_interval)]
        reload_interval: ReloadInterval,
    },
    /// Show what the buffer holds: readings waiting, seq range, oldest and newest reading, the
    /// pending batch, the file size, and the dead letters (bad MQTT payloads) with the latest
    /// few. Read-only, safe while the agent runs. Exit code 78 for a bad config, 1 when the
    /// buffer file is missing or unreadable.
    Buffer {
        /// The agent's config file; its `[buffer]` section names the file.
        #[arg(short, long, default_value = "/etc/edge-agent/agent.toml")]
        config: PathBuf,
        /// How many of the latest dead letters to show.
        #[arg(long, default_value_t = 5)]
        dead_letters: usize,
    },
    /// Check config files and report every problem with its key and the fix. Exit code 78 when
    /// any file is invalid.
    Validate {
        /// One or more config files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Read a device now and print what the agent would record: with --config and --device,
    /// the device's tags from the sensor map (a slave on a bus over its serial port or serial
    /// gateway); with --host (Modbus TCP, or RTU over TCP with --rtu-over-tcp) or --serial, a
    /// raw register range; with --config and --mqtt, the messages of a broker for a few seconds
    /// and their mapping. Exit code 1 when the device or broker did not answer or refused, 78
    /// for a bad config or bad arguments.
    Probe(Box<ProbeArgs>),
    /// Convert a Kepware or Ignition CSV tag export into sensor-map TOML ([[modbus.tags]]
    /// tables) on stdout. Bad rows are reported on stderr by line; exit code 65 when any row
    /// was left out.
    ImportTags {
        /// The CSV tag export.
        file: PathBuf,
        /// The tool that wrote the export (the columns each accepts are in the README).
        #[arg(long, value_enum, default_value = "kepware")]
        format: ImportFormat,
        /// Ignition: convert only the rows of this device (the `[device]` in OPCItemPath).
        /// Kepware: the device the export belongs to, named in the output's header.
        #[arg(long)]
        device: Option<String>,
    },
}

/// `edge-agent probe` arguments. Three exclusive modes: a sensor map's device, a sensor map's
/// MQTT broker, or a raw range (over TCP, RTU over TCP or a serial port).
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("map_target").args(["device", "mqtt"])))]
#[command(group(clap::ArgGroup::new("raw_target").args(["host", "serial"])))]
#[command(group(clap::ArgGroup::new("rtu_line").args(["serial", "rtu_over_tcp"]).multiple(true)))]
struct ProbeArgs {
    /// The sensor map holding the device or the broker (tags and MQTT modes).
    #[arg(long, requires = "map_target", conflicts_with = "raw_target")]
    config: Option<PathBuf>,
    /// Listen to this MQTT broker, by its name in the sensor map, and show what each message
    /// maps to (MQTT mode; own client id, clean session, QoS 0: the agent's session is untouched).
    #[arg(long, requires = "config")]
    mqtt: Option<String>,
    /// Listen only to this subscription, by its topic filter as written in the map (MQTT mode;
    /// default: every subscription of the broker).
    #[arg(long, requires = "mqtt")]
    subscription: Option<String>,
    /// How long to listen once subscribed (MQTT mode).
    #[arg(long, requires = "mqtt", default_value = "5s", value_parser = config::ConfigDuration::parse)]
    listen: config::ConfigDuration,
    /// Stop after this many messages, if that comes before --listen is over (MQTT mode).
    #[arg(long, requires = "mqtt")]
    messages: Option<usize>,
    /// The device to read, by its name in the sensor map.
    #[arg(long, requires = "config")]
    device: Option<String>,
    /// Read only this tag of the device (default: every tag).
    #[arg(long, requires = "device")]
    tag: Option<String>,
    /// Host name or IP address of the device, or of the serial gateway with --rtu-over-tcp
    /// (raw mode).
    #[arg(long, required_unless_present_any = ["config", "serial"], requires_all = ["register", "address"])]
    host: Option<String>,
    /// TCP port (raw mode).
    #[arg(long, default_value_t = 502)]
    port: u16,
    /// Send RTU frames over the TCP connection to --host, as to a serial device server in
    /// transparent mode (raw mode).
    #[arg(long, requires = "host")]
    rtu_over_tcp: bool,
    /// Serial port of an RTU line, for example /dev/ttyUSB0, in place of --host (raw mode).
    #[arg(long, requires_all = ["register", "address"])]
    serial: Option<String>,
    /// Baud rate of the serial line (with --rtu-over-tcp: of the line behind the gateway, which
    /// only sets the pause between frames).
    #[arg(long, requires = "rtu_line", default_value_t = 19_200)]
    baud: u32,
    /// Parity of the serial line: none, even or odd.
    #[arg(long, requires = "rtu_line", default_value = "even")]
    parity: String,
    /// Stop bits of the serial line: 1 or 2.
    #[arg(long, requires = "rtu_line", default_value_t = 1)]
    stop_bits: u8,
    /// Modbus unit id (raw mode; on a serial line, the slave address 1 to 247).
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// Table to read: holding, input, coil or discrete (raw mode).
    #[arg(long, requires = "raw_target")]
    register: Option<String>,
    /// First address, zero-based as on the wire (raw mode).
    #[arg(long, requires = "raw_target")]
    address: Option<u16>,
    /// How many registers or bits (default: what one --type value needs, else 1).
    #[arg(long, requires = "raw_target")]
    count: Option<u16>,
    /// Decode the registers as this type: u16, i16, u32, i32, u64, i64, f32, f64, or string
    /// (the whole --count range as one ASCII text).
    #[arg(long = "type", requires = "raw_target")]
    data_type: Option<String>,
    /// Byte order of the decoded type: ABCD (default), CDAB, BADC, DCBA.
    #[arg(long, requires = "data_type")]
    byte_order: Option<String>,
    /// Multiply the decoded value by this.
    #[arg(long, requires = "data_type", allow_negative_numbers = true)]
    scale: Option<f64>,
    /// Add this after scaling.
    #[arg(long, requires = "data_type", allow_negative_numbers = true)]
    offset: Option<f64>,
    /// How long the device may take to connect and to answer (raw mode; tags mode uses the
    /// device's timeout).
    #[arg(long, default_value = "1s", value_parser = config::ConfigDuration::parse)]
    timeout: config::ConfigDuration,
}

/// `--reload-interval`: a duration, or `off` for SIGHUP only.
#[derive(Clone, Copy, Debug)]
struct ReloadInterval(Option<std::time::Duration>);

/// The shortest `--reload-interval`: a look costs a `stat`, but a busy loop helps no one.
const MIN_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn parse_reload_interval(text: &str) -> Result<ReloadInterval, String> {
    if text.trim() == "off" {
        return Ok(ReloadInterval(None));
    }
    let interval = config::ConfigDuration::parse(text)?.0;
    if interval < MIN_RELOAD_INTERVAL {
        return Err(format!(
            "`{text}` is shorter than {}ms; give a longer interval, or `off` to reload on SIGHUP only",
            MIN_RELOAD_INTERVAL.as_millis()
        ));
    }
    Ok(ReloadInterval(Some(interval)))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ImportFormat {
    Kepware,
    Ignition,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let log_format = match &cli.command {
        Command::Run { log_format, .. } => *log_format,
        _ => LogFormat::Text,
    };
    edge_agent::process::init_logging("warn,edge_agent=info", log_format == LogFormat::Json);
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Probe(args) => probe(*args),
        Command::ImportTags {
            file,
            format,
            device,
        } => import_tags(&file, format, device.as_deref()),
        Command::Run {
            config,
            reload_interval,
            ..
        } => run(&config, reload_interval),
        Command::Buffer {
            config,
            dead_letters,
        } => show_buffer(&config, dead_letters),
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut invalid = false;
    for file in files {
        match config::load_file(file) {
            Ok(cfg) => {
                let tags: usize = cfg.modbus.iter().map(|d| d.tags.len()).sum();
                let devices = modbus_summary(&cfg);
                let subscriptions: usize = cfg.mqtt.iter().map(|b| b.subscriptions.len()).sum();
                let mqtt = if cfg.mqtt.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} mqtt brokers, {subscriptions} subscriptions",
                        cfg.mqtt.len()
                    )
                };
                println!(
                    "{}: ok ({devices}, {tags} tags{mqtt}, gateway `{}`)",
                    file.display(),
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

/// The Modbus devices of a map for `validate`'s summary: `3 devices`, and with buses
/// `3 devices on TCP, 2 buses with 4 slaves`.
fn modbus_summary(cfg: &config::AgentConfig) -> String {
    let plural = |n: usize, one: &str, many: &str| {
        if n == 1 {
            format!("1 {one}")
        } else {
            format!("{n} {many}")
        }
    };
    if cfg.modbus_bus.is_empty() {
        return format!("{} devices", cfg.modbus.len());
    }
    let slaves = cfg.modbus.iter().filter(|d| d.bus.is_some()).count();
    format!(
        "{} on TCP, {} with {}",
        plural(cfg.modbus.len() - slaves, "device", "devices"),
        plural(cfg.modbus_bus.len(), "bus", "buses"),
        plural(slaves, "slave", "slaves")
    )
}

/// Loads a config file, or prints why not and gives the exit code for an invalid config.
fn load_config(path: &std::path::Path) -> Result<config::AgentConfig, ExitCode> {
    config::load_file(path).map_err(|e| config_exit(&e))
}

/// Prints why a config file was refused and gives the exit code for an invalid config.
fn config_exit(error: &config::ConfigError) -> ExitCode {
    eprintln!("{error}");
    ExitCode::from(EXIT_CONFIG)
}

fn show_buffer(path: &std::path::Path, dead_letters: usize) -> ExitCode {
    let cfg = match load_config(path) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let reports = edge_agent::buffer::inspect(&cfg.buffer.path).and_then(|report| {
        let letters = edge_agent::buffer::dead_letter::inspect(&cfg.buffer.path, dead_letters)?;
        Ok((report, letters))
    });
    match reports {
        Ok((report, letters)) => {
            print!("{report}{letters}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, reload_interval: ReloadInterval) -> ExitCode {
    let (cfg, digest) = match config::load_file_with_digest(path).map_err(|e| config_exit(&e)) {
        Ok(loaded) => loaded,
        Err(code) => return code,
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
        tokio::spawn(edge_agent::process::cancel_on_signal(
            shutdown.clone(),
            "agent",
        ));
        let reload = edge_agent::ReloadOptions {
            watch_interval: reload_interval.0,
            // The reloader's first look then parses the file only if it was edited meanwhile.
            started_digest: Some(digest),
            ..edge_agent::ReloadOptions::new(path)
        };
        match edge_agent::run_with_reload(cfg, reload, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(component = "agent", "{e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// clap's own exit codes, except that `probe` promises 78 for bad arguments, as for a bad config.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    let is_probe = std::env::args_os().nth(1).is_some_and(|a| a == "probe");
    if e.use_stderr() && is_probe {
        ExitCode::from(probe::EXIT_CONFIG)
    } else {
        ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
    }
}

fn probe(args: ProbeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(file), Some(broker)) = (&args.config, &args.mqtt) {
        let cfg = match load_config(file) {
            Ok(cfg) => cfg,
            Err(code) => return code,
        };
        let mqtt = probe::MqttProbeArgs {
            broker: broker.clone(),
            subscription: args.subscription,
            listen: args.listen,
            max_messages: args.messages,
        };
        // Lines are printed as messages arrive; stdout flushes at every line end.
        return match runtime.block_on(probe::probe_mqtt(&cfg, file, &mqtt, |line| {
            println!("{line}");
        })) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => probe_failed(&e),
        };
    }
    let outcome = if let (Some(file), Some(device)) = (&args.config, &args.device) {
        let cfg = match load_config(file) {
            Ok(cfg) => cfg,
            Err(code) => return code,
        };
        runtime.block_on(probe::probe_tags(&cfg, file, device, args.tag.as_deref()))
    } else {
        probe::RawProbe::new(probe::RawArgs {
            host: args.host.unwrap_or_default(),
            port: args.port,
            rtu_over_tcp: args.rtu_over_tcp,
            serial: args.serial,
            baud_rate: args.baud,
            parity: args.parity,
            stop_bits: args.stop_bits,
            unit_id: args.unit,
            register: args.register.unwrap_or_default(),
            address: args.address.unwrap_or_default(),
            count: args.count,
            data_type: args.data_type,
            byte_order: args.byte_order,
            scale: args.scale,
            offset: args.offset,
            timeout: args.timeout,
        })
        .and_then(|raw| runtime.block_on(probe::probe_raw(&raw)))
    };
    match outcome {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            if report.device_failed {
                ExitCode::from(probe::EXIT_DEVICE)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => probe_failed(&e),
    }
}

fn probe_failed(e: &probe::ProbeError) -> ExitCode {
    for line in e.to_string().lines() {
        eprintln!("edge-agent probe: {line}");
    }
    ExitCode::from(e.exit_code())
}

fn import_tags(file: &std::path::Path, format: ImportFormat, device: Option<&str>) -> ExitCode {
    let format = match format {
        ImportFormat::Kepware => import_tags::Format::Kepware,
        ImportFormat::Ignition => import_tags::Format::Ignition,
    };
    match import_tags::import_file(file, format, device) {
        Ok(imported) => {
            print!("{}", imported.toml);
            for bad in &imported.bad_rows {
                eprintln!("{bad}");
            }
            if imported.bad_rows.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(import_tags::EXIT_DATAERR)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
