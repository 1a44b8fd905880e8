//! Settings for the Snowflake loader, as they appear in the collector's config file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::auth::{AuthError, Authenticator, Credentials, KeyPair, SecretSource};

/// Where and how the collector loads Snowflake.
///
/// Secrets are never part of the config: keys ending in `_env` name an environment variable and
/// keys ending in `_file` a file that holds the secret, so config files can be checked in and
/// logged. They are read at each login.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnowflakeConfig {
    /// Base URL of the account, e.g. `https://myorg-myaccount.snowflakecomputing.com`, or
    /// `http://127.0.0.1:PORT` for a local stand-in.
    pub url: String,
    /// Account identifier, e.g. `myorg-myaccount` (or an account locator like
    /// `xy12345.eu-central-1`).
    pub account: String,
    /// Login name of the loading user.
    pub user: String,
    /// How the collector logs in: `"SNOWFLAKE"` (password, the default), `"SNOWFLAKE_JWT"`
    /// (key pair) or `"OAUTH"` (an OAuth access token).
    #[serde(default)]
    pub authenticator: Authenticator,
    /// `SNOWFLAKE`: the environment variable that holds the user's password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `SNOWFLAKE`: a file that holds the user's password (one line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `SNOWFLAKE_JWT`: the user's RSA private key, PKCS#8 PEM (`rsa_key.p8`), plain or
    /// encrypted.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// `SNOWFLAKE_JWT`: the environment variable that holds the passphrase of an encrypted key.
    #[serde(default)]
    pub private_key_passphrase_env: Option<String>,
    /// `SNOWFLAKE_JWT`: a file that holds the passphrase of an encrypted key.
    #[serde(default)]
    pub private_key_passphrase_file: Option<PathBuf>,
    /// `OAUTH`: the environment variable that holds the access token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// `OAUTH`: a file that holds the access token, re-read at every login, so a token
    /// refresher can replace it while the collector runs.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
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
    /// Table the Delta gaps table is loaded into.
    #[serde(default = "SnowflakeConfig::default_gaps_table")]
    pub gaps_table: String,
    /// Table the Delta quarantined-rows table is loaded into.
    #[serde(default = "SnowflakeConfig::default_quarantined_rows_table")]
    pub quarantined_rows_table: String,
    /// Longest wait for one HTTP request, e.g. `"60s"`. Snowflake answers a statement that runs
    /// longer with a "still running" reply, which the client polls, so this bounds one round trip,
    /// not one statement.
    #[serde(
        default = "SnowflakeConfig::default_request_timeout",
        deserialize_with = "edge_agent::duration::deserialize"
    )]
    pub request_timeout: Duration,
    /// Attempts for a request or a load transaction that failed on a timeout, a broken
    /// connection, an HTTP 5xx or 429 answer or an expired session, the first one included.
    /// Waits between them double from 250 ms up to `retry_max_backoff`. After the last one the
    /// pass reports the error and the next pass starts over from the Snowflake watermark.
    #[serde(default = "SnowflakeConfig::default_retry_attempts")]
    pub retry_attempts: u32,
    /// Longest wait between two attempts, e.g. `"30s"`.
    #[serde(
        default = "SnowflakeConfig::default_retry_max_backoff",
        deserialize_with = "edge_agent::duration::deserialize"
    )]
    pub retry_max_backoff: Duration,
    /// Rows per multi-row `INSERT` into the staging table. The default keeps a request well
    /// below Snowflake's statement size limits.
    #[serde(default = "SnowflakeConfig::default_insert_chunk_rows")]
    pub insert_chunk_rows: usize,
    /// Delta versions are grouped into one Snowflake transaction until the group holds at
    /// least this many rows.
    #[serde(default = "SnowflakeConfig::default_rows_per_transaction")]
    pub rows_per_transaction: usize,
    /// How the readings table is loaded: `"rows"` (the default) sends the rows of each added
    /// file as bindings; `"internal_stage"` uploads the files with `PUT` into
    /// `internal_stage` and loads them with `COPY INTO`; `"external_stage"` loads them with
    /// `COPY INTO` straight from `external_stage`, a stage over the Delta table. The gaps and
    /// quarantined-rows tables are always loaded as rows (they are small).
    #[serde(default)]
    pub load_mode: LoadMode,
    /// `internal_stage`: the named internal stage the files are uploaded to;
    /// `collector snowflake init --apply` creates it.
    #[serde(default = "SnowflakeConfig::default_internal_stage")]
    pub internal_stage: String,
    /// `external_stage`: the stage whose URL is the readings Delta table's root (the
    /// `delta.url` folder), e.g. `PLANTLINE_DELTA_STAGE` from the template `init` prints.
    #[serde(default)]
    pub external_stage: Option<String>,
    /// Stage modes: files named in one `COPY INTO` statement, at most 1000 (Snowflake's limit
    /// for a `FILES` list); a group of Delta versions with more files takes several statements
    /// in the same transaction.
    #[serde(default = "SnowflakeConfig::default_copy_chunk_files")]
    pub copy_chunk_files: usize,
    /// Session parameters sent with every login, e.g. `QUERY_TAG = "plantline-collector"` or
    /// `STATEMENT_TIMEOUT_IN_SECONDS = 600`. `AUTOCOMMIT` and `TIMEZONE` are the loader's.
    #[serde(default)]
    pub session_parameters: BTreeMap<String, SessionParameter>,
}

/// How Delta files reach the readings table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadMode {
    /// Rows read by the collector and sent as bindings (no stage needed).
    #[default]
    Rows,
    /// Files uploaded with `PUT` to a named internal stage, then `COPY INTO`.
    InternalStage,
    /// Files loaded with `COPY INTO` from an external stage over the Delta table.
    ExternalStage,
}

impl LoadMode {
    /// The name as written in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rows => "rows",
            Self::InternalStage => "internal_stage",
            Self::ExternalStage => "external_stage",
        }
    }
}

/// A session parameter's value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SessionParameter {
    Bool(bool),
    Int(i64),
    Text(String),
}

impl SessionParameter {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => (*b).into(),
            Self::Int(i) => (*i).into(),
            Self::Text(t) => t.clone().into(),
        }
    }
}

/// The name of the table that records, per loaded table, the last Delta version loaded.
pub const CONTROL_TABLE: &str = "PLANTLINE_LOAD_CONTROL";
/// The most files one `COPY INTO` may name in its `FILES` list.
pub(crate) const COPY_FILES_LIMIT: usize = 1000;
/// Session parameters the loader sets itself.
const RESERVED_PARAMETERS: [&str; 2] = ["AUTOCOMMIT", "TIMEZONE"];

impl SnowflakeConfig {
    fn default_table() -> String {
        "READINGS".to_owned()
    }

    fn default_gaps_table() -> String {
        "PLANTLINE_GAPS".to_owned()
    }

    fn default_quarantined_rows_table() -> String {
        "PLANTLINE_QUARANTINED_ROWS".to_owned()
    }

    fn default_internal_stage() -> String {
        "PLANTLINE_LOAD_STAGE".to_owned()
    }

    fn default_copy_chunk_files() -> usize {
        COPY_FILES_LIMIT
    }

    fn default_request_timeout() -> Duration {
        Duration::from_mins(1)
    }

    fn default_retry_attempts() -> u32 {
        6
    }

    fn default_retry_max_backoff() -> Duration {
        Duration::from_secs(30)
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

    /// The gaps table's name as Snowflake stores it.
    pub fn gaps_table_name(&self) -> String {
        self.gaps_table.to_ascii_uppercase()
    }

    /// The quarantined-rows table's name as Snowflake stores it.
    pub fn quarantined_rows_table_name(&self) -> String {
        self.quarantined_rows_table.to_ascii_uppercase()
    }

    /// Where the secret of the configured authenticator comes from: `(secret, passphrase)`;
    /// for `SNOWFLAKE_JWT` the secret is the key file and the passphrase optional.
    fn secret_source(&self) -> Option<SecretSource> {
        let env = |key, var: &Option<String>| var.clone().map(|var| SecretSource::Env { key, var });
        let file =
            |key, path: &Option<PathBuf>| path.clone().map(|path| SecretSource::File { key, path });
        match self.authenticator {
            Authenticator::Password => env("password_env", &self.password_env)
                .or_else(|| file("password_file", &self.password_file)),
            Authenticator::KeyPair => env(
                "private_key_passphrase_env",
                &self.private_key_passphrase_env,
            )
            .or_else(|| {
                file(
                    "private_key_passphrase_file",
                    &self.private_key_passphrase_file,
                )
            }),
            Authenticator::OAuth => {
                env("token_env", &self.token_env).or_else(|| file("token_file", &self.token_file))
            }
        }
    }

    /// Reads the configured authenticator's secrets now (environment variables, files, the
    /// private key) and returns what a login sends.
    pub fn credentials(&self) -> Result<Credentials, AuthError> {
        match self.authenticator {
            Authenticator::Password | Authenticator::OAuth => {
                let source = self.secret_source().ok_or(AuthError::NotConfigured {
                    authenticator: self.authenticator.as_str(),
                })?;
                let secret = source.read()?;
                Ok(if self.authenticator == Authenticator::OAuth {
                    Credentials::OAuth(secret)
                } else {
                    Credentials::Password(secret)
                })
            }
            Authenticator::KeyPair => {
                let passphrase = self.secret_source().map(|s| s.read()).transpose()?;
                let path = self
                    .private_key_file
                    .as_deref()
                    .ok_or(AuthError::NotConfigured {
                        authenticator: self.authenticator.as_str(),
                    })?;
                Ok(Credentials::KeyPair(Box::new(KeyPair::from_pem_file(
                    path,
                    passphrase.as_ref(),
                )?)))
            }
        }
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
            ("database", &self.database),
            ("schema", &self.schema),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("snowflake.{key}: must not be empty"));
            }
        }
        self.credential_problems(&mut problems);
        for (key, name) in [
            ("table", &self.table),
            ("gaps_table", &self.gaps_table),
            ("quarantined_rows_table", &self.quarantined_rows_table),
        ] {
            if !is_plain_identifier(name) {
                problems.push(format!(
                    "snowflake.{key}: `{name}` is not a plain SQL identifier; use letters, digits, `_` and `$`, starting with a letter or `_`"
                ));
            }
        }
        let names = [
            self.table_name(),
            self.gaps_table_name(),
            self.quarantined_rows_table_name(),
        ];
        if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
            problems.push(format!(
                "snowflake.gaps_table: table, gaps_table and quarantined_rows_table must name three different tables; they are {}, {} and {}",
                names[0], names[1], names[2]
            ));
        }
        if names.iter().any(|n| n == CONTROL_TABLE) {
            problems.push(format!(
                "snowflake.table: {CONTROL_TABLE} is the load-control table; choose another name"
            ));
        }
        if self.request_timeout.is_zero() {
            problems.push(
                "snowflake.request_timeout: must be longer than zero; write it like \"60s\""
                    .to_owned(),
            );
        }
        if self.retry_attempts == 0 {
            problems.push(
                "snowflake.retry_attempts: must be at least 1 (the first attempt counts)"
                    .to_owned(),
            );
        }
        if self.retry_max_backoff.is_zero() {
            problems.push(
                "snowflake.retry_max_backoff: must be longer than zero; write it like \"30s\""
                    .to_owned(),
            );
        }
        if self.insert_chunk_rows == 0 {
            problems.push("snowflake.insert_chunk_rows: must be at least 1".to_owned());
        }
        if self.rows_per_transaction == 0 {
            problems.push("snowflake.rows_per_transaction: must be at least 1".to_owned());
        }
        self.stage_problems(&mut problems);
        for name in self.session_parameters.keys() {
            if RESERVED_PARAMETERS.contains(&name.to_ascii_uppercase().as_str()) {
                problems.push(format!(
                    "snowflake.session_parameters.{name}: is set by the loader itself (autocommit around its own transactions, UTC timestamps); remove it"
                ));
            }
        }
        problems
    }

    /// The stage the load mode needs: named, and a name the loader may write into SQL.
    fn stage_problems(&self, problems: &mut Vec<String>) {
        let mode = self.load_mode.as_str();
        match (self.load_mode, &self.external_stage) {
            (LoadMode::ExternalStage, None) => problems.push(format!(
                "snowflake.external_stage: load_mode = \"{mode}\" needs the stage over the readings Delta table; create it with the template `collector snowflake init` prints and set external_stage = \"PLANTLINE_DELTA_STAGE\""
            )),
            (LoadMode::ExternalStage, Some(stage)) if !is_stage_name(stage) => problems.push(format!(
                "snowflake.external_stage: `{stage}` is not a stage name; write it like \"PLANTLINE_DELTA_STAGE\" or \"DB.SCHEMA.STAGE\", without `@` or a path"
            )),
            (LoadMode::Rows | LoadMode::InternalStage, Some(_)) => problems.push(format!(
                "snowflake.external_stage: is not used with load_mode = \"{mode}\"; remove it or set load_mode = \"external_stage\""
            )),
            _ => {}
        }
        if !(1..=COPY_FILES_LIMIT).contains(&self.copy_chunk_files) {
            problems.push(format!(
                "snowflake.copy_chunk_files: must be between 1 and {COPY_FILES_LIMIT} (Snowflake's limit for the files of one COPY INTO)"
            ));
        }
        if !is_stage_name(&self.internal_stage) {
            problems.push(format!(
                "snowflake.internal_stage: `{}` is not a stage name; write it like \"PLANTLINE_LOAD_STAGE\" or \"DB.SCHEMA.STAGE\", without `@` or a path",
                self.internal_stage
            ));
        }
    }

    /// The keys of each authenticator: exactly one source of its secret, and no key of another.
    fn credential_problems(&self, problems: &mut Vec<String>) {
        let set = |present: bool, key: &'static str| present.then_some(key);
        let password = [
            set(self.password_env.is_some(), "password_env"),
            set(self.password_file.is_some(), "password_file"),
        ];
        let key_pair = [
            set(self.private_key_file.is_some(), "private_key_file"),
            set(
                self.private_key_passphrase_env.is_some(),
                "private_key_passphrase_env",
            ),
            set(
                self.private_key_passphrase_file.is_some(),
                "private_key_passphrase_file",
            ),
        ];
        let oauth = [
            set(self.token_env.is_some(), "token_env"),
            set(self.token_file.is_some(), "token_file"),
        ];
        let auth = self.authenticator.as_str();
        let others: Vec<&str> = match self.authenticator {
            Authenticator::Password => key_pair.iter().chain(&oauth).flatten().copied().collect(),
            Authenticator::KeyPair => password.iter().chain(&oauth).flatten().copied().collect(),
            Authenticator::OAuth => password
                .iter()
                .chain(&key_pair)
                .flatten()
                .copied()
                .collect(),
        };
        for key in others {
            problems.push(format!(
                "snowflake.{key}: is not used with authenticator = \"{auth}\"; remove it or change the authenticator"
            ));
        }
        let one_of = |a: &str, b: &str, what: &str, problems: &mut Vec<String>| {
            problems.push(format!(
                "snowflake: authenticator = \"{auth}\" needs {what}: set {a} (an environment variable) or {b} (a file), not both"
            ));
        };
        match self.authenticator {
            Authenticator::Password => {
                if self.password_env.is_some() == self.password_file.is_some() {
                    one_of("password_env", "password_file", "the password", problems);
                }
            }
            Authenticator::OAuth => {
                if self.token_env.is_some() == self.token_file.is_some() {
                    one_of("token_env", "token_file", "an OAuth access token", problems);
                }
            }
            Authenticator::KeyPair => {
                if self.private_key_file.is_none() {
                    problems.push(format!(
                        "snowflake.private_key_file: authenticator = \"{auth}\" needs the user's PKCS#8 private key file (rsa_key.p8)"
                    ));
                }
                if self.private_key_passphrase_env.is_some()
                    && self.private_key_passphrase_file.is_some()
                {
                    problems.push("snowflake.private_key_passphrase_file: set the passphrase in private_key_passphrase_env or private_key_passphrase_file, not both".to_owned());
                }
            }
        }
        for (key, value) in [
            ("password_env", &self.password_env),
            (
                "private_key_passphrase_env",
                &self.private_key_passphrase_env,
            ),
            ("token_env", &self.token_env),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                problems.push(format!("snowflake.{key}: must not be empty"));
            }
        }
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

/// True for a plain stage name, optionally qualified by schema or database and schema.
fn is_stage_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 3 && parts.iter().all(|p| is_plain_identifier(p))
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
        assert_eq!(cfg.authenticator, Authenticator::Password);
        assert_eq!(cfg.retry_attempts, 6);
        assert_eq!(cfg.retry_max_backoff, Duration::from_secs(30));
        assert_eq!(cfg.gaps_table_name(), "PLANTLINE_GAPS");
        assert_eq!(
            cfg.quarantined_rows_table_name(),
            "PLANTLINE_QUARANTINED_ROWS"
        );
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
    fn each_authenticator_names_its_missing_and_foreign_keys() {
        let base = minimal().replace("password_env = \"SNOWFLAKE_PASSWORD\"", "");
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{base}\nauthenticator = \"SNOWFLAKE_JWT\"\npassword_env = \"PW\""
        ))
        .unwrap();
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake.password_env: is not used with authenticator = \"SNOWFLAKE_JWT\"; remove it or change the authenticator",
                "snowflake.private_key_file: authenticator = \"SNOWFLAKE_JWT\" needs the user's PKCS#8 private key file (rsa_key.p8)",
            ]
        );
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{base}\nauthenticator = \"OAUTH\"\ntoken_env = \"T\"\ntoken_file = \"/run/t\""
        ))
        .unwrap();
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake: authenticator = \"OAUTH\" needs an OAuth access token: set token_env (an environment variable) or token_file (a file), not both"
            ]
        );
        let cfg: SnowflakeConfig = toml::from_str(&base).unwrap();
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake: authenticator = \"SNOWFLAKE\" needs the password: set password_env (an environment variable) or password_file (a file), not both"
            ]
        );
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{base}\nauthenticator = \"snowflake_jwt\"\nprivate_key_file = \"/etc/k.p8\"\nprivate_key_passphrase_env = \"P\""
        ))
        .unwrap();
        assert_eq!(cfg.authenticator, Authenticator::KeyPair);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let err = toml::from_str::<SnowflakeConfig>(&format!("{base}\nauthenticator = \"okta\""))
            .unwrap_err();
        assert!(err.to_string().contains("unknown variant `okta`"), "{err}");
    }

    #[test]
    fn load_modes_name_the_stage_they_need() {
        let cfg: SnowflakeConfig = toml::from_str(minimal()).unwrap();
        assert_eq!(cfg.load_mode, LoadMode::Rows);
        assert_eq!(cfg.internal_stage, "PLANTLINE_LOAD_STAGE");
        assert_eq!(cfg.copy_chunk_files, 1000);
        let cfg: SnowflakeConfig =
            toml::from_str(&format!("{}\nload_mode = \"external_stage\"", minimal())).unwrap();
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake.external_stage: load_mode = \"external_stage\" needs the stage over the readings Delta table; create it with the template `collector snowflake init` prints and set external_stage = \"PLANTLINE_DELTA_STAGE\""
            ]
        );
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{}\nload_mode = \"internal_stage\"\nexternal_stage = \"@S/readings\"\ninternal_stage = \"a b\"\ncopy_chunk_files = 1001",
            minimal()
        ))
        .unwrap();
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake.external_stage: is not used with load_mode = \"internal_stage\"; remove it or set load_mode = \"external_stage\"",
                "snowflake.copy_chunk_files: must be between 1 and 1000 (Snowflake's limit for the files of one COPY INTO)",
                "snowflake.internal_stage: `a b` is not a stage name; write it like \"PLANTLINE_LOAD_STAGE\" or \"DB.SCHEMA.STAGE\", without `@` or a path",
            ]
        );
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{}\nload_mode = \"external_stage\"\nexternal_stage = \"PLANT.RAW.PLANTLINE_DELTA_STAGE\"",
            minimal()
        ))
        .unwrap();
        assert_eq!(cfg.load_mode, LoadMode::ExternalStage);
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        let err =
            toml::from_str::<SnowflakeConfig>(&format!("{}\nload_mode = \"copy\"", minimal()))
                .unwrap_err();
        assert!(err.to_string().contains("unknown variant `copy`"), "{err}");
    }

    #[test]
    fn session_parameters_pass_through_except_the_loaders_own() {
        let cfg: SnowflakeConfig = toml::from_str(&format!(
            "{}\n[session_parameters]\nQUERY_TAG = \"plantline\"\nSTATEMENT_TIMEOUT_IN_SECONDS = 600\nautocommit = false",
            minimal()
        ))
        .unwrap();
        assert_eq!(
            cfg.session_parameters["STATEMENT_TIMEOUT_IN_SECONDS"],
            SessionParameter::Int(600)
        );
        assert_eq!(
            cfg.problems(),
            vec![
                "snowflake.session_parameters.autocommit: is set by the loader itself (autocommit around its own transactions, UTC timestamps); remove it"
            ]
        );
    }
}
