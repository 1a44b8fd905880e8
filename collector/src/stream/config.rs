//! The `[stream]` section: which Kinesis stream `collector stream` reads and where its live
//! Delta table lives.
//!
//! ```toml
//! [stream]
//! stream = "plantline-live"               # the agents' `[kinesis] stream`
//! table_url = "s3://plant-lake/live_readings"
//! # region = "eu-central-1"
//! # endpoint = "http://127.0.0.1:4567"   # a Kinesis-compatible server (tests)
//! # flush_interval = "1s"
//! # max_rows_per_commit = 50000
//! # start = "TRIM_HORIZON"                # or "LATEST", for a table that has no position yet
//! # metrics_listen = "127.0.0.1:9466"     # /metrics and /health of `collector stream`
//! # unhealthy_after = "5m"
//! ```

use std::path::Path;

use serde::Deserialize;
use url::Url;

use crate::config::{ConfigDuration, Problem, StoreLocation};

/// Where a shard is read from when the live table holds no position for it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StartPosition {
    /// The oldest record the stream still retains: nothing the stream holds is missed.
    TrimHorizon,
    /// Only records put after the shard was first opened; older ones are skipped.
    Latest,
}

/// `collector stream`: the Kinesis live stream into its own Delta table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The Kinesis data stream the agents put their live readings on (their `[kinesis] stream`).
    pub stream: String,
    /// The stream's AWS region.
    #[serde(default = "StreamConfig::default_region")]
    pub region: String,
    /// A Kinesis-compatible endpoint instead of AWS's (kinesalite, moto, LocalStack), like
    /// "http://127.0.0.1:4567". Credentials come from the AWS default chain either way.
    pub endpoint: Option<String>,
    /// The live Delta table: `s3://bucket/path` (reached through `[s3]`) or a local folder. Its
    /// own table, never the batch readings table of `[delta]`.
    pub table_url: String,
    /// At most this long between reading a record and committing it: the live table's
    /// freshness. Each flush is one Delta commit.
    #[serde(default = "StreamConfig::default_flush_interval")]
    pub flush_interval: ConfigDuration,
    /// A commit is made as soon as this many rows wait, before `flush_interval` is up.
    #[serde(default = "StreamConfig::default_max_rows_per_commit")]
    pub max_rows_per_commit: usize,
    /// Where a shard without a position in the live table starts: "TRIM_HORIZON" (default)
    /// or "LATEST".
    #[serde(default = "StreamConfig::default_start")]
    pub start: StartPosition,
    /// How long a shard that returned no records waits before it is asked again. Kinesis
    /// allows 5 GetRecords calls per second and shard.
    #[serde(default = "StreamConfig::default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// IP address and port of `collector stream`'s `/metrics` and `/health`. The default
    /// `127.0.0.1:9466` is reachable from the host only and differs from `collector run`'s
    /// `metrics.listen` (9465), so both commands can run on one host; "0.0.0.0:9466" exposes
    /// it. `[metrics]`'s `token_env` or `token_file`, when set, guards this `/metrics` too.
    #[serde(default = "StreamConfig::default_metrics_listen")]
    pub metrics_listen: String,
    /// `/health` answers 503 when records read this long ago are still not committed (the
    /// commits keep failing), or when no shard could be read for this long. Default: 5 minutes,
    /// or three `flush_interval`s when that is longer.
    pub unhealthy_after: Option<ConfigDuration>,
}

/// `stream.unhealthy_after` when neither it nor a long `flush_interval` says otherwise.
pub(super) const DEFAULT_UNHEALTHY_AFTER: std::time::Duration = std::time::Duration::from_mins(5);

impl StreamConfig {
    fn default_region() -> String {
        "us-east-1".to_owned()
    }
    fn default_flush_interval() -> ConfigDuration {
        ConfigDuration::from_millis(1000)
    }
    fn default_max_rows_per_commit() -> usize {
        50_000
    }
    fn default_start() -> StartPosition {
        StartPosition::TrimHorizon
    }
    fn default_poll_interval() -> ConfigDuration {
        ConfigDuration::from_millis(250)
    }
    fn default_metrics_listen() -> String {
        "127.0.0.1:9466".to_owned()
    }

    /// The shortest `unhealthy_after` that leaves room for healthy commits `flush_interval`
    /// apart and a few retries, so `/health` does not flap on a working consumer.
    fn unhealthy_floor(&self) -> std::time::Duration {
        (self.flush_interval.0 * 3).max(std::time::Duration::from_secs(10))
    }

    /// The bound `/health` judges by: `unhealthy_after`, or its default.
    pub fn unhealthy_after(&self) -> std::time::Duration {
        self.unhealthy_after.map_or_else(
            || DEFAULT_UNHEALTHY_AFTER.max(self.unhealthy_floor()),
            |d| d.0,
        )
    }

    /// Every problem of the section, keyed like `stream.table_url`. `delta_url` is the batch
    /// readings table, which the live table must not share.
    pub(crate) fn problems(&self, base: &Path, delta_url: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: format!("stream.{key}"),
                message,
            });
        };
        // Kinesis stream names: 1-128 of letters, digits, `_`, `-` and `.`.
        let name_ok = !self.stream.is_empty()
            && self.stream.len() <= 128
            && self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            problem(
                "stream",
                format!(
                    "`{}` is not a Kinesis stream name; use 1-128 letters, digits, `_`, `-` or `.`, the same as the agents' `[kinesis] stream`",
                    self.stream
                ),
            );
        }
        if self.region.trim().is_empty() {
            problem(
                "region",
                "is empty; write the stream's region, like \"eu-central-1\"".to_owned(),
            );
        }
        if let Some(endpoint) = &self.endpoint {
            match Url::parse(endpoint) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => problem(
                    "endpoint",
                    format!(
                        "`{endpoint}` is not an http(s) URL; write it like \"http://127.0.0.1:4567\", or leave the key out for AWS"
                    ),
                ),
            }
        }
        match StoreLocation::parse(&self.table_url, base) {
            Err(e) => problem("table_url", e),
            Ok(live) => {
                if StoreLocation::parse(delta_url, base).is_ok_and(|readings| readings == live) {
                    problem(
                        "table_url",
                        "is the same location as `delta.url`; the live table needs its own folder, like \"s3://lake/live_readings\"".to_owned(),
                    );
                }
            }
        }
        if self.flush_interval.0.is_zero() {
            problem(
                "flush_interval",
                "is zero, which would commit on every poll; use at least \"100ms\" (default \"1s\")"
                    .to_owned(),
            );
        }
        if self.poll_interval.0 < std::time::Duration::from_millis(200) {
            problem(
                "poll_interval",
                format!(
                    "is {}, more often than the 5 GetRecords calls per second a shard allows; use at least \"200ms\" (default \"250ms\")",
                    self.poll_interval
                ),
            );
        }
        if self.max_rows_per_commit == 0 {
            problem(
                "max_rows_per_commit",
                "is 0, so nothing would ever be committed; use at least 1 (default 50000)"
                    .to_owned(),
            );
        }
        if let Err(e) = self.metrics_listen.parse::<std::net::SocketAddr>() {
            problem(
                "metrics_listen",
                format!(
                    "`{}` is not an IP address with a port ({e}); write it like \"127.0.0.1:9466\"",
                    self.metrics_listen
                ),
            );
        }
        if let Some(set) = self.unhealthy_after
            && set.0 < self.unhealthy_floor()
        {
            problem(
                "unhealthy_after",
                format!(
                    "is {set}, too short: /health would fail between healthy commits; use at least {} (three flush_intervals, at least 10s), or leave the key out (default \"5m\")",
                    ConfigDuration(self.unhealthy_floor())
                ),
            );
        }
        problems
    }

    /// The live table's URL. Valid after [`crate::config::CollectorConfig::load`].
    pub fn table_url(&self) -> Result<Url, String> {
        StoreLocation::parse(&self.table_url, Path::new("/"))?.to_url()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> StreamConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_read_from_the_trim_horizon_and_flush_every_second() {
        let c = parse("stream = \"live\"\ntable_url = \"/lake/live\"\n");
        assert_eq!(c.start, StartPosition::TrimHorizon);
        assert_eq!(c.flush_interval.0, std::time::Duration::from_secs(1));
        assert_eq!(c.max_rows_per_commit, 50_000);
        assert_eq!(c.metrics_listen, "127.0.0.1:9466");
        assert_eq!(c.unhealthy_after(), std::time::Duration::from_mins(5));
        let slow = parse("stream = \"s\"\ntable_url = \"t\"\nflush_interval = \"1h\"\n");
        assert_eq!(slow.unhealthy_after(), std::time::Duration::from_hours(3));
        assert!(c.problems(Path::new("/etc"), "/lake/readings").is_empty());
        assert_eq!(
            parse("stream = \"s\"\ntable_url = \"t\"\nstart = \"LATEST\"\n").start,
            StartPosition::Latest
        );
    }

    #[test]
    fn every_problem_names_its_key_and_the_fix() {
        let c = parse(
            "stream = \"bad name\"\ntable_url = \"/lake/readings\"\nendpoint = \"ftp://x\"\nflush_interval = \"0s\"\npoll_interval = \"50ms\"\nmax_rows_per_commit = 0\nmetrics_listen = \"localhost:9466\"\nunhealthy_after = \"5s\"\n",
        );
        let problems: Vec<String> = c
            .problems(Path::new("/etc"), "/lake/readings")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            problems,
            [
                "`stream.stream`: `bad name` is not a Kinesis stream name; use 1-128 letters, digits, `_`, `-` or `.`, the same as the agents' `[kinesis] stream`",
                "`stream.endpoint`: `ftp://x` is not an http(s) URL; write it like \"http://127.0.0.1:4567\", or leave the key out for AWS",
                "`stream.table_url`: is the same location as `delta.url`; the live table needs its own folder, like \"s3://lake/live_readings\"",
                "`stream.flush_interval`: is zero, which would commit on every poll; use at least \"100ms\" (default \"1s\")",
                "`stream.poll_interval`: is 50ms, more often than the 5 GetRecords calls per second a shard allows; use at least \"200ms\" (default \"250ms\")",
                "`stream.max_rows_per_commit`: is 0, so nothing would ever be committed; use at least 1 (default 50000)",
                "`stream.metrics_listen`: `localhost:9466` is not an IP address with a port (invalid socket address syntax); write it like \"127.0.0.1:9466\"",
                "`stream.unhealthy_after`: is 5s, too short: /health would fail between healthy commits; use at least 10s (three flush_intervals, at least 10s), or leave the key out (default \"5m\")",
            ]
        );
    }

    /// The example's `[stream]` block is commented out (so `collector run` users need no
    /// stream); uncommented, it must still be valid.
    #[test]
    fn the_commented_stream_block_of_the_cloud_example_is_valid() {
        #[derive(Deserialize)]
        struct Wrapper {
            stream: StreamConfig,
        }
        let example = std::fs::read_to_string(
            pipeline_e2e::checkout().join("config-examples/collector/cloud.toml"),
        )
        .unwrap();
        let mut block = String::new();
        for l in example
            .lines()
            .skip_while(|l| *l != "# [stream]")
            .take_while(|l| l.starts_with('#'))
        {
            let line = l.strip_prefix('#').unwrap_or(l);
            block.push_str(line.strip_prefix(' ').unwrap_or(line));
            block.push('\n');
        }
        assert!(block.starts_with("[stream]\n"), "{block}");
        let wrapper: Wrapper = toml::from_str(&block).unwrap();
        assert_eq!(
            wrapper
                .stream
                .problems(Path::new("/etc"), "s3://acme-plant-lake/readings"),
            []
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<StreamConfig>("stream = \"s\"\ntable_url = \"t\"\nshards = 2\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `shards`"), "{e}");
    }
}
