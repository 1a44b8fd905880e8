//! The collector's configuration file (TOML): where the raw zone is, where the Delta table is, how
//! to reach S3, and how often to run. Every field has a doc comment and a named default; unknown
//! keys are errors. [`CollectorConfig::load`] reports *all* problems at once, each naming the
//! file, the key and the fix.
//!
//! ```toml
//! [raw]
//! url = "s3://plant-landing"      # or a local folder that plays the bucket
//! prefix = "raw/"
//! archive_prefix = "archive/"
//! quarantine_prefix = "quarantine/"
//!
//! [delta]
//! url = "s3://plant-lake/readings" # or a local folder
//! # gaps_url = "s3://plant-lake/readings_gaps"                         (the default)
//! # quarantined_rows_url = "s3://plant-lake/readings_quarantined_rows" (the default)
//!
//! [s3]
//! endpoint = "http://127.0.0.1:9000"
//! allow_http = true
//!
//! [run]
//! interval = "30s"
//! max_files_per_commit = 100
//! freshness_alert = "15m"          # per gateway: a log line and a 0/1 gauge when readings stop
//! optimize_interval = "24h"        # compaction on a schedule (off unless set)
//! vacuum_interval = "24h"          # VACUUM on a schedule (off unless set)
//!
//! [metrics]                        # /metrics and /health, loopback by default
//! listen = "127.0.0.1:9465"
//!
//! [maintenance]                    # checkpoints, log cleanup, OPTIMIZE and VACUUM
//! checkpoint_interval = 100
//! vacuum_retention = "168h"
//!
//! [[rules]]                          # row-level data-quality rules, see crate::rules
//! name = "oil-temp-range"
//! tags = "press-*/oil_temp"
//! range = [-20.0, 150.0]
//! action = "quarantine"
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use url::Url;

use crate::delta::{GAPS_SUFFIX, QUARANTINED_ROWS_SUFFIX, TableUrls};
use crate::rules::{RuleConfig, RuleSet};

/// The whole collector configuration, one TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// The raw zone the gateways upload their batches to.
    pub raw: RawConfig,
    /// The Delta table the readings are applied to.
    pub delta: DeltaConfig,
    /// How to reach S3 (or an S3-compatible store) for `s3://` URLs.
    #[serde(default)]
    pub s3: S3Config,
    /// How often and how much the collector works.
    #[serde(default)]
    pub run: RunConfig,
    /// Loading Snowflake from the Delta table; leave the section out to skip Snowflake.
    pub snowflake: Option<crate::snowflake::SnowflakeConfig>,
    /// Row-level data-quality rules (`[[rules]]`), applied in file order; none by default.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// The Prometheus `/metrics` and `/health` endpoint of `collector run`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Table care: checkpoints, expired-log cleanup, OPTIMIZE and VACUUM.
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// How new batches are found (listing, or S3 notifications through SQS) and which gateways
    /// this instance applies (`shard`).
    #[serde(default)]
    pub discovery: crate::discovery::DiscoveryConfig,
    /// `collector stream`: the agents' Kinesis live stream into a live Delta table; leave the
    /// section out if no agent streams.
    pub stream: Option<crate::stream::StreamConfig>,
}

/// The raw zone: the bucket (or local folder) the agents write batches into.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `s3://bucket` (optionally `s3://bucket/root/`, under which `prefix` and `archive_prefix`
    /// live), or a local folder that plays the bucket, as the agent's `[upload.dir]` does. A
    /// relative path is resolved against the config file's folder.
    pub url: String,
    /// Key prefix of the batches, the same as the agents' `prefix`; usually ending in `/`.
    #[serde(default = "RawConfig::default_prefix")]
    pub prefix: String,
    /// Key prefix the applied originals are moved to, keeping their `gateway=<id>/<seq>.parquet`
    /// name. Must not overlap `prefix`.
    #[serde(default = "RawConfig::default_archive_prefix")]
    pub archive_prefix: String,
    /// Key prefix files that break the batch contract are moved to, as
    /// `<quarantine_prefix>gateway=<id>/<file name>` with a `<file name>.reason.json` beside each.
    /// Must not overlap `prefix` or `archive_prefix`.
    #[serde(default = "RawConfig::default_quarantine_prefix")]
    pub quarantine_prefix: String,
}

impl RawConfig {
    fn default_prefix() -> String {
        "raw/".to_owned()
    }
    fn default_archive_prefix() -> String {
        "archive/".to_owned()
    }
    fn default_quarantine_prefix() -> String {
        crate::raw_zone::DEFAULT_QUARANTINE_PREFIX.to_owned()
    }
    /// The problems of the three prefixes: their form, and overlaps that would make the collector
    /// read its own archive or quarantine as new batches.
    fn prefix_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                message,
            });
        };
        for (key, prefix) in [
            ("raw.prefix", &self.prefix),
            ("raw.archive_prefix", &self.archive_prefix),
            ("raw.quarantine_prefix", &self.quarantine_prefix),
        ] {
            if prefix.starts_with('/') {
                problem(
                    key,
                    format!(
                        "`{prefix}` starts with `/`; object keys are relative, write it like \"raw/\""
                    ),
                );
            } else if !prefix.is_empty() && !prefix.ends_with('/') {
                problem(
                    key,
                    format!("`{prefix}` does not end with `/`; write it like \"{prefix}/\""),
                );
            }
        }
        let (p, a) = (&self.prefix, &self.archive_prefix);
        if a.starts_with(p.as_str()) || p.starts_with(a.as_str()) {
            problem(
                "raw.archive_prefix",
                format!(
                    "`{a}` overlaps `raw.prefix` `{p}`, so archived batches would be read again; use separate folders like \"raw/\" and \"archive/\""
                ),
            );
        }
        let q = &self.quarantine_prefix;
        let overlaps = |x: &str, y: &str| x.starts_with(y) || y.starts_with(x);
        if overlaps(q, p) {
            problem(
                "raw.quarantine_prefix",
                format!(
                    "`{q}` overlaps `raw.prefix` `{p}`, so quarantined files would be read again; use separate folders like \"raw/\" and \"quarantine/\""
                ),
            );
        } else if overlaps(q, a) {
            problem(
                "raw.quarantine_prefix",
                format!(
                    "`{q}` overlaps `raw.archive_prefix` `{a}`, so quarantined files would mix with applied ones (and their expiry rules); use separate folders like \"archive/\" and \"quarantine/\""
                ),
            );
        }
        problems
    }
}

/// The Delta tables (the processed zone): readings, and the data-quality tables beside it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaConfig {
    /// The readings table: `s3://bucket/path/to/table` or a local folder. A relative path is
    /// resolved against the config file's folder. The table is created with the batch
    /// contract's schema plus the nullable `dq_flags` column if missing.
    pub url: String,
    /// The gaps table (`seq` ranges that will never arrive, with the reason). Defaults to a
    /// folder beside the readings table named like it plus `_gaps`
    /// (`s3://lake/readings` → `s3://lake/readings_gaps`).
    pub gaps_url: Option<String>,
    /// The table of readings that a `quarantine` rule kept out of the readings table. Defaults
    /// to a folder beside the readings table named like it plus `_quarantined_rows`.
    pub quarantined_rows_url: Option<String>,
}

/// S3 connection settings, shared by the raw zone and the Delta table. Credentials come from the
/// AWS default environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible stores (`MinIO`, a test server). Leave out for AWS.
    pub endpoint: Option<String>,
    /// AWS region.
    #[serde(default = "S3Config::default_region")]
    pub region: String,
    /// Use path-style URLs (`endpoint/bucket/key`); needed by most S3-compatible stores.
    /// Defaults to true when `endpoint` is set, false otherwise.
    pub force_path_style: Option<bool>,
    /// Allow plain `http://` endpoints. Off by default so credentials never travel unencrypted
    /// by accident.
    #[serde(default)]
    pub allow_http: bool,
    /// Fixed credentials set by code (tests, the in-process demo); never read from the file,
    /// because credentials belong in the environment, not in a config that gets copied around.
    #[serde(skip)]
    pub static_credentials: Option<S3Credentials>,
}

/// An access key pair for S3.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl S3Config {
    fn default_region() -> String {
        "us-east-1".to_owned()
    }

    /// Whether requests use path-style URLs.
    pub fn path_style(&self) -> bool {
        self.force_path_style.unwrap_or(self.endpoint.is_some())
    }

    /// The storage options delta-rs (and `object_store`) understand for this S3 setup.
    ///
    /// Concurrent writers are made safe by conditional PUT (`If-None-Match: *` on the commit
    /// file), not by a locking provider.
    pub fn storage_options(&self) -> HashMap<String, String> {
        let mut options = HashMap::from([
            ("aws_region".to_owned(), self.region.clone()),
            (
                "aws_virtual_hosted_style_request".to_owned(),
                (!self.path_style()).to_string(),
            ),
            ("aws_allow_http".to_owned(), self.allow_http.to_string()),
            ("aws_conditional_put".to_owned(), "etag".to_owned()),
        ]);
        if let Some(endpoint) = &self.endpoint {
            options.insert("aws_endpoint".to_owned(), endpoint.clone());
        }
        if let Some(c) = &self.static_credentials {
            options.insert("aws_access_key_id".to_owned(), c.access_key_id.clone());
            options.insert(
                "aws_secret_access_key".to_owned(),
                c.secret_access_key.clone(),
            );
        }
        options
    }
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: Self::default_region(),
            force_path_style: None,
            allow_http: false,
            static_credentials: None,
        }
    }
}

/// Scheduling and batching of the collector's work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Pause between two passes over the raw zone when running as a service.
    #[serde(default = "RunConfig::default_interval")]
    pub interval: ConfigDuration,
    /// At most this many batch files of one gateway go into one Delta commit.
    #[serde(default = "RunConfig::default_max_files_per_commit")]
    pub max_files_per_commit: usize,
    /// How many times a commit that lost a race with another collector is re-filtered and
    /// retried before the gateway is left for the next pass.
    #[serde(default = "RunConfig::default_commit_attempts")]
    pub commit_attempts: u32,
    /// A gateway whose newest reading in the readings table is older than this counts as stale:
    /// `plantline_collector_gateway_stale{gateway}` turns 1 and one warning is logged when it
    /// turns stale (one info line when it recovers). Off when left out.
    pub freshness_alert: Option<ConfigDuration>,
    /// `collector run` compacts the readings table this often (as `collector optimize` does),
    /// after a pass. Off when left out.
    pub optimize_interval: Option<ConfigDuration>,
    /// `collector run` vacuums the three tables this often (as `collector vacuum` does, with the
    /// Snowflake check when `[snowflake]` is configured), after a pass. Off when left out.
    pub vacuum_interval: Option<ConfigDuration>,
}

impl RunConfig {
    fn default_interval() -> ConfigDuration {
        ConfigDuration::from_secs(30)
    }
    fn default_max_files_per_commit() -> usize {
        100
    }
    fn default_commit_attempts() -> u32 {
        5
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            interval: Self::default_interval(),
            max_files_per_commit: Self::default_max_files_per_commit(),
            commit_attempts: Self::default_commit_attempts(),
            freshness_alert: None,
            optimize_interval: None,
            vacuum_interval: None,
        }
    }
}

/// The `/metrics` (Prometheus text) and `/health` HTTP endpoint of `collector run`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve the endpoint while `collector run` runs. On by default; it listens on loopback
    /// only unless `listen` says otherwise.
    #[serde(default = "MetricsConfig::default_enabled")]
    pub enabled: bool,
    /// IP address and port to listen on. The default `127.0.0.1:9465` is reachable from the
    /// collector's host only (a sidecar or node exporter scrapes it there); `0.0.0.0:9465`
    /// exposes it to the network. Set a token before exposing it beyond loopback.
    #[serde(default = "MetricsConfig::default_listen")]
    pub listen: String,
    /// Name of an environment variable holding a token that `/metrics` then requires
    /// (`Authorization: Bearer <token>`). `/health` stays open for supervisors and load
    /// balancers.
    pub token_env: Option<String>,
    /// Like `token_env`, but the token is the first line of this file. Use one of the two. A
    /// relative path is resolved against the config file's folder.
    pub token_file: Option<PathBuf>,
    /// `/health` answers 503 when no pass has completed for this many `run.interval`s (counted
    /// from the start before the first pass).
    #[serde(default = "MetricsConfig::default_unhealthy_after_passes")]
    pub unhealthy_after_passes: u32,
}

impl MetricsConfig {
    fn default_enabled() -> bool {
        true
    }
    fn default_listen() -> String {
        "127.0.0.1:9465".to_owned()
    }
    fn default_unhealthy_after_passes() -> u32 {
        3
    }

    /// `listen` as a socket address.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, std::net::AddrParseError> {
        self.listen.parse()
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: Self::default_enabled(),
            listen: Self::default_listen(),
            token_env: None,
            token_file: None,
            unhealthy_after_passes: Self::default_unhealthy_after_passes(),
        }
    }
}

/// Table care (see `crate::maintenance`): checkpoints and log cleanup keep opening the tables
/// and committing to them fast as the log grows; OPTIMIZE compacts small files; VACUUM deletes
/// the files no version needs any more.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceConfig {
    /// Write a checkpoint every this many commits (of any writer) to each table. Recorded as
    /// the table property `delta.checkpointInterval`, so every Delta writer follows it.
    #[serde(default = "MaintenanceConfig::default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// Commit files older than this are deleted once a newer checkpoint covers them (never one
    /// the Snowflake loader has not read yet). Recorded as `delta.logRetentionDuration`; it is
    /// also how far back time travel reaches.
    #[serde(default = "MaintenanceConfig::default_log_retention")]
    pub log_retention: ConfigDuration,
    /// OPTIMIZE rewrites a gateway's files smaller than this into files of about this size, in
    /// MiB.
    #[serde(default = "MaintenanceConfig::default_target_file_size_mb")]
    pub target_file_size_mb: u64,
    /// VACUUM deletes files that left the table longer ago than this. Refused when shorter
    /// than the Snowflake loader's lag, so a file Snowflake still has to load is never deleted.
    #[serde(default = "MaintenanceConfig::default_vacuum_retention")]
    pub vacuum_retention: ConfigDuration,
    /// Scheduled VACUUM (`run.vacuum_interval`) checks the retention against the Snowflake
    /// loader's lag, read from `[snowflake]`. Set to false only when no Snowflake loads from this
    /// table (the same as `collector vacuum --no-snowflake-check`).
    #[serde(default = "MaintenanceConfig::default_snowflake_check")]
    pub snowflake_check: bool,
}

impl MaintenanceConfig {
    fn default_checkpoint_interval() -> u64 {
        100
    }
    fn default_log_retention() -> ConfigDuration {
        ConfigDuration::from_secs(30 * 24 * 3600)
    }
    fn default_target_file_size_mb() -> u64 {
        128
    }
    fn default_vacuum_retention() -> ConfigDuration {
        ConfigDuration::from_secs(7 * 24 * 3600)
    }
    fn default_snowflake_check() -> bool {
        true
    }

    /// The target file size in bytes.
    pub fn target_file_size(&self) -> u64 {
        self.target_file_size_mb.saturating_mul(1024 * 1024)
    }
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: Self::default_checkpoint_interval(),
            log_retention: Self::default_log_retention(),
            target_file_size_mb: Self::default_target_file_size_mb(),
            vacuum_retention: Self::default_vacuum_retention(),
            snowflake_check: Self::default_snowflake_check(),
        }
    }
}

pub use edge_agent::duration::ConfigDuration;

/// Where a store lives, resolved from a config URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local folder (absolute after [`CollectorConfig::load`]).
    Local(PathBuf),
    /// An S3 bucket and a root inside it (empty, or ending in `/`).
    S3 { bucket: String, root: String },
}

impl StoreLocation {
    /// Parses `s3://bucket[/root]`, `file:///path` or a plain path (resolved against `base`).
    pub fn parse(url: &str, base: &Path) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, root) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "`{url}` names no bucket; write it like \"s3://my-bucket\""
                ));
            }
            let root = root.trim_matches('/');
            let root = if root.is_empty() {
                String::new()
            } else {
                format!("{root}/")
            };
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                root,
            });
        }
        if url.starts_with("file://") {
            let parsed = Url::parse(url).map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
            return parsed.to_file_path().map(Self::Local).map_err(|()| {
                format!("`{url}` is not a local file URL; write it like \"file:///var/lib/plantline/raw\"")
            });
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(format!(
                "`{url}` uses the unsupported scheme `{scheme}`; use \"s3://bucket/...\" or a local folder path"
            ));
        }
        if url.trim().is_empty() {
            return Err("the URL is empty; use \"s3://bucket/...\" or a local folder path".into());
        }
        Ok(Self::Local(base.join(url)))
    }

    /// The URL delta-rs opens for this location.
    pub fn to_url(&self) -> Result<Url, String> {
        match self {
            Self::Local(path) => Url::from_directory_path(path)
                .map_err(|()| format!("`{}` is not an absolute path", path.display())),
            Self::S3 { bucket, root } => Url::parse(&format!("s3://{bucket}/{root}"))
                .map_err(|e| format!("`s3://{bucket}/{root}` is not a valid URL: {e}")),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(path) => write!(f, "{}", path.display()),
            Self::S3 { bucket, root } => write!(f, "s3://{bucket}/{root}"),
        }
    }
}

/// One thing wrong in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, like `raw.prefix`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a wrong type; `message` holds toml's
    /// line, column and explanation.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl CollectorConfig {
    /// Reads, parses and validates a config file. Relative local paths are resolved against the
    /// file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            std::path::absolute(&base).unwrap_or(base)
        };
        Self::from_toml(&text, &base).map_err(|e| match e {
            ParseOrInvalid::Parse(message) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ParseOrInvalid::Invalid(problems) => ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            },
        })
    }

    fn from_toml(text: &str, base: &Path) -> Result<Self, ParseOrInvalid> {
        let mut config: Self =
            toml::from_str(text).map_err(|e| ParseOrInvalid::Parse(e.to_string()))?;
        let mut problems = config.validate(base);
        problems.extend(crate::discovery::config::problems(&config, base));
        problems.extend(config.snowflake_problems());
        problems.extend(config.rule_problems());
        if let Some(stream) = &config.stream {
            problems.extend(stream.problems(base, &config.delta.url));
        }
        if problems.is_empty() {
            if let Some(token_file) = &mut config.metrics.token_file
                && token_file.is_relative()
            {
                *token_file = base.join(&*token_file);
            }
            // Store absolute local paths so later stages never depend on the working directory.
            let delta = &mut config.delta;
            for url in [&mut config.raw.url, &mut delta.url]
                .into_iter()
                .chain(delta.gaps_url.as_mut())
                .chain(delta.quarantined_rows_url.as_mut())
                .chain(config.stream.as_mut().map(|s| &mut s.table_url))
            {
                if let Ok(StoreLocation::Local(p)) = StoreLocation::parse(url, base) {
                    *url = p.display().to_string();
                }
            }
            Ok(config)
        } else {
            Err(ParseOrInvalid::Invalid(problems))
        }
    }

    /// Every semantic problem, in file order.
    fn validate(&self, base: &Path) -> Vec<Problem> {
        let prefix_problems = self.raw.prefix_problems();
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                message,
            });
        };
        let raw = StoreLocation::parse(&self.raw.url, base);
        if let Err(e) = &raw {
            problem("raw.url", e.clone());
        }
        for p in prefix_problems {
            problem(&p.key, p.message);
        }
        let delta = StoreLocation::parse(&self.delta.url, base);
        if let Err(e) = &delta {
            problem("delta.url", e.clone());
        }
        if let (Ok(raw), Ok(delta)) = (&raw, &delta)
            && raw == delta
        {
            problem(
                "delta.url",
                "is the same location as `raw.url`; give the Delta table its own folder or bucket path, like \"s3://lake/readings\"".to_owned(),
            );
        }
        if let Ok(readings) = &delta {
            for (key, message) in side_table_problems(&self.delta, readings, base) {
                problem(key, message);
            }
        }
        if let Some(endpoint) = &self.s3.endpoint {
            match Url::parse(endpoint) {
                Ok(u) if u.scheme() == "http" && !self.s3.allow_http => problem(
                    "s3.endpoint",
                    format!(
                        "`{endpoint}` is plain http but `s3.allow_http` is false; use https or set `allow_http = true`"
                    ),
                ),
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                Ok(u) => problem(
                    "s3.endpoint",
                    format!(
                        "`{endpoint}` uses the scheme `{}`; use an http(s) URL like \"https://s3.example.com\"",
                        u.scheme()
                    ),
                ),
                Err(e) => problem(
                    "s3.endpoint",
                    format!(
                        "`{endpoint}` is not a valid URL ({e}); write it like \"https://s3.example.com\""
                    ),
                ),
            }
        }
        if self.s3.region.trim().is_empty() {
            problem(
                "s3.region",
                "is empty; write the bucket's region, like \"eu-central-1\"".to_owned(),
            );
        }
        if self.run.interval.0.is_zero() {
            problem(
                "run.interval",
                "is zero, which would spin; use at least \"1s\"".to_owned(),
            );
        }
        if self.run.max_files_per_commit == 0 {
            problem(
                "run.max_files_per_commit",
                "is 0, so nothing would ever be applied; use at least 1 (default 100)".to_owned(),
            );
        }
        if self.run.commit_attempts == 0 {
            problem(
                "run.commit_attempts",
                "is 0, so no commit would ever be tried; use at least 1 (default 5)".to_owned(),
            );
        }
        for (key, value) in [
            ("run.freshness_alert", self.run.freshness_alert),
            ("run.optimize_interval", self.run.optimize_interval),
            ("run.vacuum_interval", self.run.vacuum_interval),
        ] {
            if value.is_some_and(|d| d.0.is_zero()) {
                problem(
                    key,
                    "is zero; write a duration like \"15m\" or \"24h\", or leave the key out to turn it off".to_owned(),
                );
            }
        }
        for (key, message) in self.metrics_problems() {
            problem(key, message);
        }
        for (key, message) in self.maintenance_problems() {
            problem(key, message);
        }
        problems
    }

    /// The `[metrics]` problems.
    fn metrics_problems(&self) -> Vec<(&'static str, String)> {
        let m = &self.metrics;
        let mut problems = Vec::new();
        if let Err(e) = m.listen_addr() {
            problems.push((
                "metrics.listen",
                format!(
                    "`{}` is not an IP address with a port ({e}); write it like \"127.0.0.1:9465\"",
                    m.listen
                ),
            ));
        }
        if m.token_env.is_some() && m.token_file.is_some() {
            problems.push((
                "metrics.token_file",
                "is set together with `metrics.token_env`; keep one of the two".to_owned(),
            ));
        }
        if m.token_env.as_deref().is_some_and(|n| n.trim().is_empty()) {
            problems.push((
                "metrics.token_env",
                "is empty; name the environment variable that holds the token, like \"PLANTLINE_METRICS_TOKEN\"".to_owned(),
            ));
        }
        if m.unhealthy_after_passes == 0 {
            problems.push((
                "metrics.unhealthy_after_passes",
                "is 0, so /health would always fail; use at least 1 (default 3)".to_owned(),
            ));
        }
        problems
    }

    /// The `[maintenance]` problems.
    fn maintenance_problems(&self) -> Vec<(&'static str, String)> {
        let m = &self.maintenance;
        let mut problems = Vec::new();
        if m.checkpoint_interval == 0 {
            problems.push((
                "maintenance.checkpoint_interval",
                "is 0; use at least 1 (default 100): without checkpoints opening the table gets slower with every commit".to_owned(),
            ));
        }
        if m.log_retention.0 < std::time::Duration::from_hours(1) {
            problems.push((
                "maintenance.log_retention",
                format!(
                    "is {}, shorter than 1h, so a reader in the middle of a query could lose the commit it reads; use at least \"1h\" (default \"720h\", 30 days)",
                    m.log_retention
                ),
            ));
        }
        if self.run.vacuum_interval.is_some() && m.snowflake_check && self.snowflake.is_none() {
            problems.push((
                "run.vacuum_interval",
                "is set but there is no [snowflake] section, so VACUUM cannot check which files Snowflake still has to load; add [snowflake], or set maintenance.snowflake_check = false if no Snowflake loads from this table".to_owned(),
            ));
        }
        if m.target_file_size_mb == 0 || m.target_file_size_mb > 4096 {
            problems.push((
                "maintenance.target_file_size_mb",
                format!(
                    "is {}; use 1 to 4096 MiB (default 128)",
                    m.target_file_size_mb
                ),
            ));
        }
        problems
    }

    /// The `[[rules]]` problems, keyed like `rules[2].range`.
    fn rule_problems(&self) -> Vec<Problem> {
        crate::rules::compile(&self.rules).err().unwrap_or_default()
    }

    /// The compiled `[[rules]]`. Valid after [`CollectorConfig::load`].
    pub fn rule_set(&self) -> Result<RuleSet, String> {
        crate::rules::compile(&self.rules).map_err(|problems| {
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// Where the readings, gaps and quarantined-rows tables live. Valid after
    /// [`CollectorConfig::load`].
    pub fn table_urls(&self) -> Result<TableUrls, String> {
        let base = Path::new("");
        let readings = self.delta_location()?;
        Ok(TableUrls {
            readings: readings.to_url()?,
            gaps: side_location(self.delta.gaps_url.as_deref(), &readings, GAPS_SUFFIX, base)?
                .to_url()?,
            quarantined_rows: side_location(
                self.delta.quarantined_rows_url.as_deref(),
                &readings,
                QUARANTINED_ROWS_SUFFIX,
                base,
            )?
            .to_url()?,
        })
    }

    /// The `[snowflake]` section's problems, keyed like the others.
    fn snowflake_problems(&self) -> Vec<Problem> {
        let Some(snowflake) = &self.snowflake else {
            return Vec::new();
        };
        snowflake
            .problems()
            .iter()
            .map(|p| {
                let (key, message) = p.split_once(": ").unwrap_or(("snowflake", p.as_str()));
                Problem {
                    key: key.to_owned(),
                    message: message.to_owned(),
                }
            })
            .collect()
    }

    /// Where the raw zone lives. Valid after [`CollectorConfig::load`].
    pub fn raw_location(&self) -> Result<StoreLocation, String> {
        StoreLocation::parse(&self.raw.url, Path::new(""))
    }

    /// Where the Delta table lives. Valid after [`CollectorConfig::load`].
    pub fn delta_location(&self) -> Result<StoreLocation, String> {
        StoreLocation::parse(&self.delta.url, Path::new(""))
    }
}

/// A data-quality table's location: as configured, or beside the readings table.
fn side_location(
    configured: Option<&str>,
    readings: &StoreLocation,
    suffix: &str,
    base: &Path,
) -> Result<StoreLocation, String> {
    if let Some(url) = configured {
        return StoreLocation::parse(url, base);
    }
    match readings {
        StoreLocation::Local(path) => {
            let name = path.file_name().ok_or_else(|| {
                format!(
                    "`{}` has no folder name to put `{suffix}` after",
                    path.display()
                )
            })?;
            let mut sibling = name.to_os_string();
            sibling.push(suffix);
            Ok(StoreLocation::Local(path.with_file_name(sibling)))
        }
        StoreLocation::S3 { bucket, root } => {
            let root = root.trim_end_matches('/');
            if root.is_empty() {
                return Err(format!(
                    "the readings table is the root of bucket `{bucket}`, so there is no folder beside it for the `{suffix}` table"
                ));
            }
            Ok(StoreLocation::S3 {
                bucket: bucket.clone(),
                root: format!("{root}{suffix}/"),
            })
        }
    }
}

/// The problems of `delta.gaps_url` and `delta.quarantined_rows_url`: unparsable, no default
/// possible, or overlapping another table (a table inside another's folder would have its files
/// deleted by the other's VACUUM).
fn side_table_problems(
    delta: &DeltaConfig,
    readings: &StoreLocation,
    base: &Path,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let mut located = vec![("delta.url", readings.clone())];
    for (key, configured, suffix) in [
        ("delta.gaps_url", delta.gaps_url.as_deref(), GAPS_SUFFIX),
        (
            "delta.quarantined_rows_url",
            delta.quarantined_rows_url.as_deref(),
            QUARANTINED_ROWS_SUFFIX,
        ),
    ] {
        match side_location(configured, readings, suffix, base) {
            Ok(location) => located.push((key, location)),
            Err(e) if configured.is_some() => problems.push((key, e)),
            Err(e) => problems.push((
                key,
                format!("is not set and {e}; set it, like \"s3://lake/readings{suffix}\""),
            )),
        }
    }
    for i in 1..located.len() {
        for j in 0..i {
            let ((key, a), (other, b)) = (&located[i], &located[j]);
            if let Some(overlap) = overlap(a, b) {
                problems.push((
                    key,
                    format!(
                        "`{a}` {overlap} `{other}` `{b}`; every table needs its own folder, side by side, like \"s3://lake/readings\" and \"s3://lake/readings_gaps\""
                    ),
                ));
            }
        }
    }
    problems
}

/// How two table locations collide, if they do.
fn overlap(a: &StoreLocation, b: &StoreLocation) -> Option<&'static str> {
    let (a, b) = (a.to_string(), b.to_string());
    let folder = |s: &str| format!("{}/", s.trim_end_matches('/'));
    let (a, b) = (folder(&a), folder(&b));
    if a == b {
        Some("is the same location as")
    } else if a.starts_with(&b) {
        Some("lies inside")
    } else if b.starts_with(&a) {
        Some("holds")
    } else {
        None
    }
}

enum ParseOrInvalid {
    Parse(String),
    Invalid(Vec<Problem>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Check, RuleAction};

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let (dir, path) =
            write("[raw]\nurl = \"landing\"\n[delta]\nurl = \"s3://lake/readings\"\n");
        let c = CollectorConfig::load(&path).unwrap();
        assert_eq!(
            c.raw_location().unwrap(),
            StoreLocation::Local(dir.path().join("landing"))
        );
        assert_eq!(c.raw.prefix, "raw/");
        assert_eq!(c.raw.archive_prefix, "archive/");
        assert_eq!(c.raw.quarantine_prefix, "quarantine/");
        assert_eq!(
            c.delta_location().unwrap(),
            StoreLocation::S3 {
                bucket: "lake".into(),
                root: "readings/".into()
            }
        );
        assert_eq!(c.run.interval, ConfigDuration::from_secs(30));
        assert_eq!(c.run.max_files_per_commit, 100);
        assert_eq!(c.run.commit_attempts, 5);
        assert_eq!(c.s3.region, "us-east-1");
        assert!(!c.s3.path_style());
    }

    #[test]
    fn storage_options_ask_for_conditional_put_and_path_style_with_an_endpoint() {
        let (_dir, path) = write(
            "[raw]\nurl = \"s3://landing\"\n[delta]\nurl = \"s3://lake/t\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\nregion = \"eu-central-1\"\n",
        );
        let c = CollectorConfig::load(&path).unwrap();
        let o = c.s3.storage_options();
        assert_eq!(o["aws_endpoint"], "http://127.0.0.1:9000");
        assert_eq!(o["aws_region"], "eu-central-1");
        assert_eq!(o["aws_virtual_hosted_style_request"], "false");
        assert_eq!(o["aws_allow_http"], "true");
        assert_eq!(o["aws_conditional_put"], "etag");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_and_fix() {
        let (_dir, path) = write(
            "[raw]\nurl = \"gs://x\"\nprefix = \"raw\"\narchive_prefix = \"raw/archive/\"\n[delta]\nurl = \"s3:///t\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\n[run]\ninterval = \"0s\"\nmax_files_per_commit = 0\n",
        );
        let err = CollectorConfig::load(&path).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "`raw.url`: `gs://x` uses the unsupported scheme `gs`; use \"s3://bucket/...\" or a local folder path",
                "`raw.prefix`: `raw` does not end with `/`; write it like \"raw/\"",
                "`raw.archive_prefix`: `raw/archive/` overlaps `raw.prefix` `raw`, so archived batches would be read again; use separate folders like \"raw/\" and \"archive/\"",
                "`delta.url`: `s3:///t` names no bucket; write it like \"s3://my-bucket\"",
                "`s3.endpoint`: `http://127.0.0.1:9000` is plain http but `s3.allow_http` is false; use https or set `allow_http = true`",
                "`run.interval`: is zero, which would spin; use at least \"1s\"",
                "`run.max_files_per_commit`: is 0, so nothing would ever be applied; use at least 1 (default 100)",
            ]
        );
        assert!(
            err.to_string()
                .starts_with(&format!("{}: 7 problem(s):\n  - `raw.url`", path.display())),
            "{err}"
        );
    }

    #[test]
    fn the_quarantine_prefix_must_stay_apart_from_raw_and_archive() {
        let problems = |quarantine: &str| {
            let (_dir, path) = write(&format!(
                "[raw]\nurl = \"landing\"\nquarantine_prefix = \"{quarantine}\"\n[delta]\nurl = \"lake\"\n"
            ));
            match CollectorConfig::load(&path) {
                Ok(c) => {
                    assert_eq!(c.raw.quarantine_prefix, quarantine);
                    Vec::new()
                }
                Err(ConfigError::Invalid { problems, .. }) => {
                    problems.iter().map(ToString::to_string).collect()
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            problems("raw/quarantine/"),
            vec![
                "`raw.quarantine_prefix`: `raw/quarantine/` overlaps `raw.prefix` `raw/`, so quarantined files would be read again; use separate folders like \"raw/\" and \"quarantine/\""
            ]
        );
        assert_eq!(
            problems("archive/bad/"),
            vec![
                "`raw.quarantine_prefix`: `archive/bad/` overlaps `raw.archive_prefix` `archive/`, so quarantined files would mix with applied ones (and their expiry rules); use separate folders like \"archive/\" and \"quarantine/\""
            ]
        );
        assert_eq!(
            problems("bad"),
            vec!["`raw.quarantine_prefix`: `bad` does not end with `/`; write it like \"bad/\""]
        );
        assert!(problems("bad-files/").is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_durations_name_the_line() {
        let (_dir, path) = write("[raw]\nurl = \"x\"\nprefixx = \"raw/\"\n[delta]\nurl = \"y\"\n");
        let err = CollectorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("unknown field `prefixx`"), "{err}");

        let (_dir, path) =
            write("[raw]\nurl = \"x\"\n[delta]\nurl = \"y\"\n[run]\ninterval = \"5d\"\n");
        let err = CollectorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 6"), "{err}");
        assert!(
            err.contains("`5d` has an unknown unit `d`; use ms, s, m or h"),
            "{err}"
        );
    }

    #[test]
    fn rules_compile_in_file_order_with_one_check_each() {
        let (_dir, path) = write(
            r#"[raw]
url = "landing"
[delta]
url = "lake/readings"

[[rules]]
name = "oil-temp-range"
tags = ["press-*/oil_temp", "*_temp"]
range = [-20, 150.5]
action = "quarantine"

[[rules]]
name = "no_future"
tags = "*"
max_future_skew = "5m"
action = "flag"

[[rules]]
name = "fresh"
tags = "*"
max_age = "720h"
action = "fail"
"#,
        );
        let c = CollectorConfig::load(&path).unwrap();
        let set = c.rule_set().unwrap();
        let summary: Vec<(&str, &str, RuleAction)> = set
            .rules()
            .iter()
            .map(|r| (r.name.as_str(), r.check.name(), r.action))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("oil-temp-range", "range", RuleAction::Quarantine),
                ("no_future", "max_future_skew", RuleAction::Flag),
                ("fresh", "max_age", RuleAction::Fail),
            ]
        );
        assert_eq!(
            set.rules()[0].check,
            Check::Range {
                min: -20.0,
                max: 150.5
            }
        );
    }

    #[test]
    fn every_rule_problem_names_the_rule_key_and_fix() {
        let (_dir, path) = write(
            r#"[raw]
url = "landing"
[delta]
url = "lake/readings"

[[rules]]
name = "Oil Range"
tags = []
action = "flag"

[[rules]]
name = "two"
tags = "a/b/c"
not_null = true
finite = true
action = "flag"

[[rules]]
name = "two"
tags = "*"
range = [5.0, 1.0]
action = "quarantine"

[[rules]]
name = "zero"
tags = "*"
max_age = "0s"
action = "fail"
"#,
        );
        let err = CollectorConfig::load(&path).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "`rules[0].name`: `Oil Range` is not a rule name; use 1-64 characters of lowercase letters, digits, `-` and `_`, like \"oil-temp-range\"",
                "`rules[0].tags`: rule `Oil Range` lists no tag pattern; write one like \"press-*/oil_temp\", or \"*\" for every tag",
                "`rules[0]`: rule `Oil Range` has no check; add exactly one of not_null = true, finite = true, range = [min, max], max_future_skew = \"5m\" or max_age = \"720h\"",
                "`rules[1].tags[0]`: `a/b/c` has more than one `/`; write `<device>/<tag>` like \"press-*/oil_temp\"",
                "`rules[1]`: rule `two` has 2 checks (not_null, finite); a rule has exactly one, so split it into one rule per check",
                "`rules[2].name`: `two` is already the name of rules[1]; give each rule its own name",
                "`rules[2].range`: [5, 1] has its min above its max; write [1, 5]",
                "`rules[3].max_age`: is zero, which every reading would break; write a duration like \"5m\" (units ms, s, m, h)",
            ]
        );

        let (_dir, path) = write(
            "[raw]\nurl = \"x\"\n[delta]\nurl = \"y\"\n[[rules]]\nname = \"r\"\ntags = \"*\"\nfinite = true\naction = \"drop\"\n",
        );
        let err = CollectorConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("line 9"), "{err}");
        assert!(
            err.contains("unknown variant `drop`, expected one of `flag`, `quarantine`, `fail`"),
            "{err}"
        );
    }

    #[test]
    fn the_data_quality_tables_sit_beside_the_readings_table_unless_configured() {
        let (dir, path) = write("[raw]\nurl = \"landing\"\n[delta]\nurl = \"lake/readings\"\n");
        let urls = CollectorConfig::load(&path).unwrap().table_urls().unwrap();
        let url = |p: &str| Url::from_directory_path(dir.path().join(p)).unwrap();
        assert_eq!(urls.readings, url("lake/readings"));
        assert_eq!(urls.gaps, url("lake/readings_gaps"));
        assert_eq!(urls.quarantined_rows, url("lake/readings_quarantined_rows"));

        let (_dir, path) = write(
            "[raw]\nurl = \"s3://landing\"\n[delta]\nurl = \"s3://lake/plant/readings\"\ngaps_url = \"s3://dq/gaps\"\n",
        );
        let urls = CollectorConfig::load(&path).unwrap().table_urls().unwrap();
        assert_eq!(urls.gaps.as_str(), "s3://dq/gaps/");
        assert_eq!(
            urls.quarantined_rows.as_str(),
            "s3://lake/plant/readings_quarantined_rows/"
        );

        let problems = |delta: &str| match CollectorConfig::load(
            &write(&format!("[raw]\nurl = \"s3://landing\"\n[delta]\n{delta}")).1,
        ) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            problems("url = \"s3://lake\"\nquarantined_rows_url = \"s3://lake/q\"\n"),
            vec![
                "`delta.gaps_url`: is not set and the readings table is the root of bucket `lake`, so there is no folder beside it for the `_gaps` table; set it, like \"s3://lake/readings_gaps\"",
                "`delta.quarantined_rows_url`: `s3://lake/q/` lies inside `delta.url` `s3://lake/`; every table needs its own folder, side by side, like \"s3://lake/readings\" and \"s3://lake/readings_gaps\"",
            ]
        );
        assert_eq!(
            problems("url = \"s3://lake/readings\"\ngaps_url = \"s3://lake/readings\"\n"),
            vec![
                "`delta.gaps_url`: `s3://lake/readings/` is the same location as `delta.url` `s3://lake/readings/`; every table needs its own folder, side by side, like \"s3://lake/readings\" and \"s3://lake/readings_gaps\"",
            ]
        );
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = CollectorConfig::load(Path::new("/nonexistent/collector.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /nonexistent/collector.toml: "),
            "{err}"
        );
    }

    #[test]
    fn every_config_example_is_valid() {
        let folder = pipeline_e2e::checkout().join("config-examples/collector");
        let mut checked = 0;
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(err) = CollectorConfig::load(&path) {
                    panic!("{err}");
                }
                checked += 1;
            }
        }
        assert!(checked > 0, "no examples in {}", folder.display());
    }
}
