//! Settings for the Snowflake loader, as they appear in the collector's config file.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Where and how the collector loads Snowflake.
///
/// The password is never part of the config: [`SnowflakeConfig::password_env`] names the
/// environment variable that holds it, so config files can be checked in and logged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnowflakeConfig {
    /// Base URL of the account, e.g. `https://myorg-myaccount.snowflakecomputing.com`, or
    /// `http://127.0.0.1:PORT` for a local stand-in.
    pub url: String,
    /// Account identifier, e.g. `myorg-myaccount`.
    pub account: String,
    /// Login name of the loading user.
    pub user: String,
    /// Name of the environment variable that holds the user's password.
    pub password_env: String,
    /// Database that holds the readings table and the load control table.
    pub database: String,
    /// Schema that holds the readings table and the load control table.
    pub schema: String,
    /// Virtual warehouse to run the loads on; the user's default warehouse when absent.
    #[serde(default)]
    pub warehouse: Option<String>,
    /// Role to load as; the user's default role when absent.
    #[serde(default)]
    pub role: Option<String>,
    /// Readings table, created on the first load when missing. A plain identifier
    /// (letters, digits, `_`, `$`), stored upper-case as Snowflake does for unquoted names.
    #[serde(default = "SnowflakeConfig::default_table")]
    pub table: String,
    /// Longest wait for one HTTP request, e.g. `"60s"`. Snowflake answers a statement that runs
    /// longer with a "still running" reply, which the client polls, so this bounds one round trip,
    /// not one statement.
    #[serde(
        default = "SnowflakeConfig::default_request_timeout",
        deserialize_with = "edge_agent::duration::deserialize"
    )]
    pub request_timeout: Duration,
    /// Rows per multi-row `INSERT` into the staging table. Each row carries 9 bind values,
    /// so the default keeps a request well below Snowflake's statement size limits.
    #[serde(default = "SnowflakeConfig::default_insert_chunk_rows")]
    pub insert_chunk_rows: usize,
    /// Delta versions are grouped into one Snowflake transaction until the group holds at
    /// least this many rows.
    #[serde(default = "SnowflakeConfig::default_rows_per_transaction")]
    pub rows_per_transaction: usize,
}

/// The name of the table that records, per readings table, the last Delta version loaded.
pub const CONTROL_TABLE: &str = "PLANTLINE_LOAD_CONTROL";

impl SnowflakeConfig {
    fn default_table() -> String {
        "READINGS".to_owned()
    }

    fn default_request_timeout() -> Duration {
        Duration::from_mins(1)
    }

    fn default_insert_chunk_rows() -> usize {
        1000
    }

    fn default_rows_per_transaction() -> usize {
        100_000
    }

    /// The readings table's name as Snowflake stores it (unquoted identifiers are upper-cased).
    pub fn table_name(&self) -> String {
        self.table.to_ascii_uppercase()
    }

    /// Every problem with these settings, each naming the key under `[snowflake]` and the fix.
    /// An empty list means the settings are usable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match url::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => problems.push(format!(
                "snowflake.url: `{}` is not an http(s) URL; write it like \"https://<account>.snowflakecomputing.com\"",
                self.url
            )),
        }
        for (key, value) in [
            ("account", &self.account),
            ("user", &self.user),
            ("password_env", &self.password_env),
            ("database", &self.database),
            ("schema", &self.schema),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("snowflake.{key}: must not be empty"));
            }
        }
        if !is_plain_identifier(&self.table) {
            problems.push(format!(
                "snowflake.table: `{}` is not a plain SQL identifier; use letters, digits, `_` and `$`, starting with a letter or `_`",
                self.table
            ));
        }
        if self.request_timeout.is_zero() {
            problems.push(
                "snowflake.request_timeout: must be longer than zero; write it like \"60s\""
                    .to_owned(),
            );
        }
        if self.insert_chunk_rows == 0 {
            problems.push("snowflake.insert_chunk_rows: must be at least 1".to_owned());
        }
        if self.rows_per_transaction == 0 {
            problems.push("snowflake.rows_per_transaction: must be at least 1".to_owned());
        }
        problems
    }
}

/// True for names that Snowflake accepts unquoted, which the loader writes into SQL text.
pub(crate) fn is_plain_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    (1..=255).contains(&name.len())
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
}

/// A password read from the environment. Its `Debug` never shows the secret.
#[derive(Clone)]
pub(crate) struct Password(String);

impl Password {
    pub(crate) fn new(secret: String) -> Self {
        Self(secret)
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        r#"
            url = "https://myorg-acct.snowflakecomputing.com"
            account = "myorg-acct"
            user = "LOADER"
            password_env = "SNOWFLAKE_PASSWORD"
            database = "PLANT"
            schema = "RAW"
        "#
    }

    #[test]
    fn defaults_fill_the_optional_settings() {
        let cfg: SnowflakeConfig = toml::from_str(minimal()).unwrap();
        assert_eq!(cfg.table, "READINGS");
        assert_eq!(cfg.request_timeout, Duration::from_mins(1));
        assert_eq!(cfg.insert_chunk_rows, 1000);
        assert_eq!(cfg.rows_per_transaction, 100_000);
        assert_eq!(cfg.warehouse, None);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err = toml::from_str::<SnowflakeConfig>(&format!("{}\npassword = \"x\"", minimal()))
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `password`"),
            "{err}"
        );
        let err =
            toml::from_str::<SnowflakeConfig>(&format!("{}\nrequest_timeout = \"5d\"", minimal()))
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("`5d` has an unknown unit `d`; use ms, s, m or h"),
            "{err}"
        );
    }

    #[test]
    fn problems_name_every_bad_key() {
        let mut cfg: SnowflakeConfig = toml::from_str(minimal()).unwrap();
        cfg.url = "snowflake".into();
        cfg.table = "readings; drop table x".into();
        cfg.user = " ".into();
        cfg.insert_chunk_rows = 0;
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake.url: `snowflake` is not an http(s) URL; write it like \"https://<account>.snowflakecomputing.com\"",
                "snowflake.user: must not be empty",
                "snowflake.table: `readings; drop table x` is not a plain SQL identifier; use letters, digits, `_` and `$`, starting with a letter or `_`",
                "snowflake.insert_chunk_rows: must be at least 1",
            ]
        );
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let p = Password::new("hunter2".into());
        assert_eq!(format!("{p:?}"), "Password(***)");
    }
}
