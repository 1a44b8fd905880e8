//! `[discovery]`: how the collector finds new batches (listing or S3 event notifications through
//! SQS) and which gateways this instance owns (`shard`).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::shard::Shard;
use crate::config::{CollectorConfig, ConfigDuration, Problem, StoreLocation};

/// How new batch files are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// List every gateway's folder each pass. No extra infrastructure; one LIST per gateway per
    /// pass, which is what costs money with thousands of gateways.
    #[default]
    List,
    /// Receive the bucket's `ObjectCreated` notifications from an SQS queue and look only at
    /// the gateways they name.
    Sqs,
}

/// The `[discovery]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `"list"` (the default) or `"sqs"`.
    #[serde(default)]
    pub mode: DiscoveryMode,
    /// `"<index>/<count>"`, like `"0/4"`: this instance applies only the gateways whose stable
    /// hash (FNV-1a 64 of the gateway id, modulo count) is `index`. List mode only; leave it out
    /// to apply every gateway. Changing the count is safe: the Delta `txn` watermark, not the
    /// shard, keeps every reading exactly once.
    pub shard: Option<String>,
    /// SQS mode: the URL of the queue the raw bucket's `s3:ObjectCreated:*` notifications go to,
    /// like `https://sqs.eu-central-1.amazonaws.com/123456789012/plantline-raw`. The queue is in
    /// the bucket's region (`s3.region`).
    pub queue_url: Option<String>,
    /// SQS mode: the SQS endpoint for an SQS-compatible server (a test server). Leave out for
    /// AWS. Plain `http://` needs `s3.allow_http = true`.
    pub endpoint: Option<String>,
    /// SQS mode: the work lease. A received message stays invisible to every other instance
    /// this long (renewed while its gateway is being applied); a message not deleted by then is
    /// delivered again, and after the queue's `maxReceiveCount` deliveries SQS moves it to the
    /// dead-letter queue. 1s to 12h.
    #[serde(default = "DiscoveryConfig::default_visibility_timeout")]
    pub visibility_timeout: ConfigDuration,
    /// SQS mode: messages per receive call, 1 to 10.
    #[serde(default = "DiscoveryConfig::default_max_messages")]
    pub max_messages: u32,
    /// SQS mode: how long a receive call waits for a message (long polling), 0s to 20s. A pass
    /// ends with the first receive that returns nothing.
    #[serde(default = "DiscoveryConfig::default_wait_time")]
    pub wait_time: ConfigDuration,
}

impl DiscoveryConfig {
    fn default_visibility_timeout() -> ConfigDuration {
        ConfigDuration::from_secs(300)
    }
    fn default_max_messages() -> u32 {
        10
    }
    fn default_wait_time() -> ConfigDuration {
        ConfigDuration::from_secs(20)
    }

    /// The parsed `shard` (`None`: every gateway). Valid after [`crate::config::CollectorConfig::load`].
    pub fn shard(&self) -> Result<Option<Shard>, String> {
        self.shard.as_deref().map(Shard::parse).transpose()
    }

    /// Every problem of the section, as (key, message with the fix). `raw_is_s3` and
    /// `allow_http` come from `[raw]` and `[s3]`.
    fn problems(&self, raw_is_s3: bool, allow_http: bool) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if let Err(e) = self.shard() {
            problems.push(("discovery.shard", e));
        }
        let sqs = self.mode == DiscoveryMode::Sqs;
        if sqs && self.shard.is_some() {
            problems.push((
                "discovery.shard",
                "is set with mode = \"sqs\"; SQS hands each message to one instance already, so run every instance on the same queue and leave shard out".to_owned(),
            ));
        }
        if sqs && !raw_is_s3 {
            problems.push((
                "discovery.mode",
                "is \"sqs\" but `raw.url` is a local folder; S3 event notifications need an \"s3://bucket\" raw zone, or use mode = \"list\"".to_owned(),
            ));
        }
        match (&self.queue_url, sqs) {
            (None, true) => problems.push((
                "discovery.queue_url",
                "is missing but mode = \"sqs\"; set the queue's URL, like \"https://sqs.eu-central-1.amazonaws.com/123456789012/plantline-raw\"".to_owned(),
            )),
            (Some(_), false) => problems.push((
                "discovery.queue_url",
                "is set but mode is \"list\", so the queue would be ignored; set mode = \"sqs\" or remove queue_url".to_owned(),
            )),
            (Some(url), true) => {
                if let Err(e) = http_url(url, allow_http) {
                    problems.push(("discovery.queue_url", e));
                }
            }
            (None, false) => {}
        }
        if let Some(endpoint) = &self.endpoint
            && let Err(e) = http_url(endpoint, allow_http)
        {
            problems.push(("discovery.endpoint", e));
        }
        let lease = self.visibility_timeout.0;
        if lease < Duration::from_secs(1) || lease > Duration::from_hours(12) {
            problems.push((
                "discovery.visibility_timeout",
                format!(
                    "is {}; SQS takes whole seconds from 1s to 12h, use something like \"5m\" (longer than applying one gateway's batches takes)",
                    self.visibility_timeout
                ),
            ));
        }
        if !(1..=10).contains(&self.max_messages) {
            problems.push((
                "discovery.max_messages",
                format!(
                    "is {}; SQS returns 1 to 10 messages per receive, use 10 (the default)",
                    self.max_messages
                ),
            ));
        }
        if self.wait_time.0 > Duration::from_secs(20) {
            problems.push((
                "discovery.wait_time",
                format!(
                    "is {}; SQS long polling waits at most 20s, use \"20s\" (the default) or less",
                    self.wait_time
                ),
            ));
        }
        problems
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            mode: DiscoveryMode::default(),
            shard: None,
            queue_url: None,
            endpoint: None,
            visibility_timeout: Self::default_visibility_timeout(),
            max_messages: Self::default_max_messages(),
            wait_time: Self::default_wait_time(),
        }
    }
}

/// The `[discovery]` problems of a parsed config whose relative paths resolve against `base`.
pub(crate) fn problems(config: &CollectorConfig, base: &Path) -> Vec<Problem> {
    let raw_is_s3 = matches!(
        StoreLocation::parse(&config.raw.url, base),
        Ok(StoreLocation::S3 { .. })
    );
    config
        .discovery
        .problems(raw_is_s3, config.s3.allow_http)
        .into_iter()
        .map(|(key, message)| Problem {
            key: key.to_owned(),
            message,
        })
        .collect()
}

fn http_url(url: &str, allow_http: bool) -> Result<(), String> {
    match Url::parse(url) {
        Ok(u) if u.scheme() == "http" && !allow_http => Err(format!(
            "`{url}` is plain http but `s3.allow_http` is false; use https or set `allow_http = true`"
        )),
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(u) => Err(format!(
            "`{url}` uses the scheme `{}`; use an https URL like \"https://sqs.eu-central-1.amazonaws.com/123456789012/plantline-raw\"",
            u.scheme()
        )),
        Err(e) => Err(format!(
            "`{url}` is not a valid URL ({e}); write it like \"https://sqs.eu-central-1.amazonaws.com/123456789012/plantline-raw\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn load(raw_url: &str, discovery: &str) -> Result<CollectorConfig, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "[raw]\nurl = \"{raw_url}\"\n[delta]\nurl = \"s3://lake/readings\"\n[discovery]\n{discovery}\n"
            ),
        )
        .unwrap();
        match CollectorConfig::load(&path) {
            Ok(c) => Ok(c),
            Err(ConfigError::Invalid { problems, .. }) => {
                Err(problems.iter().map(ToString::to_string).collect())
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_defaults_list_every_gateway_and_a_valid_sqs_section_loads() {
        let c = load("s3://raw", "").unwrap();
        assert_eq!(c.discovery, DiscoveryConfig::default());
        assert_eq!(c.discovery.shard().unwrap(), None);
        let c = load("s3://raw", "shard = \"2/3\"").unwrap();
        assert_eq!(c.discovery.shard().unwrap(), Shard::new(2, 3));
        let c = load(
            "s3://raw",
            "mode = \"sqs\"\nqueue_url = \"https://sqs.eu-central-1.amazonaws.com/1/q\"\nwait_time = \"5s\"",
        )
        .unwrap();
        assert_eq!(c.discovery.mode, DiscoveryMode::Sqs);
        assert_eq!(
            c.discovery.visibility_timeout,
            ConfigDuration::from_secs(300)
        );
        assert_eq!(c.discovery.max_messages, 10);
        assert_eq!(c.discovery.wait_time, ConfigDuration::from_secs(5));
    }

    #[test]
    fn every_discovery_problem_names_the_key_and_the_fix() {
        assert_eq!(
            load(
                "landing",
                "mode = \"sqs\"\nshard = \"3/3\"\nendpoint = \"http://127.0.0.1:5000\"\nvisibility_timeout = \"500ms\"\nmax_messages = 11\nwait_time = \"30s\""
            )
            .unwrap_err(),
            vec![
                "`discovery.shard`: `3/3`: index 3 is not below count 3; the shards of 3 instances are 0/3 to 2/3",
                "`discovery.shard`: is set with mode = \"sqs\"; SQS hands each message to one instance already, so run every instance on the same queue and leave shard out",
                "`discovery.mode`: is \"sqs\" but `raw.url` is a local folder; S3 event notifications need an \"s3://bucket\" raw zone, or use mode = \"list\"",
                "`discovery.queue_url`: is missing but mode = \"sqs\"; set the queue's URL, like \"https://sqs.eu-central-1.amazonaws.com/123456789012/plantline-raw\"",
                "`discovery.endpoint`: `http://127.0.0.1:5000` is plain http but `s3.allow_http` is false; use https or set `allow_http = true`",
                "`discovery.visibility_timeout`: is 500ms; SQS takes whole seconds from 1s to 12h, use something like \"5m\" (longer than applying one gateway's batches takes)",
                "`discovery.max_messages`: is 11; SQS returns 1 to 10 messages per receive, use 10 (the default)",
                "`discovery.wait_time`: is 30s; SQS long polling waits at most 20s, use \"20s\" (the default) or less",
            ]
        );
        assert_eq!(
            load(
                "s3://raw",
                "queue_url = \"https://sqs.eu-central-1.amazonaws.com/1/q\""
            )
            .unwrap_err(),
            vec![
                "`discovery.queue_url`: is set but mode is \"list\", so the queue would be ignored; set mode = \"sqs\" or remove queue_url"
            ]
        );
    }
}
