//! A small Snowflake client speaking the drivers' REST protocol (the one the official Python,
//! JDBC and Go drivers use): `login-request` for a session token, then one `query-request` per
//! statement.
//!
//! A session keeps its state on the server between requests, so `BEGIN` ... `COMMIT` sent as
//! separate statements form one transaction, and temporary tables live as long as the session.
//!
//! The login carries the credentials of the configured authenticator (see `auth`): a password,
//! a key-pair JWT or an OAuth token. The session token it returns is renewed by logging in again
//! a margin before it expires (Snowflake's `validityInSeconds`), never inside a transaction.
//!
//! The HTTP protocol sits behind [`Transport`], so another protocol (the SQL API v2) can be
//! added without touching callers. [`SnowflakeClient`] adds what every protocol needs on top:
//! session renewal, retries with capped exponential backoff (timeouts, refused connections,
//! 5xx and 429 answers) for statements that are safe to repeat, and transaction bookkeeping.

use std::fmt;
use std::future::Future;
use std::io::Cursor;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, Int16Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

use super::auth::{AuthError, Credentials, Secret};
use super::config::{SessionParameter, SnowflakeConfig};
use super::s3_stage::{EncryptionMaterial, StageCredentials, StageUploadError, upload_to_s3_stage};

/// How much of a statement's SQL an error message carries.
const SQL_IN_ERRORS: usize = 200;
/// The first wait before a retry; later waits double up to the configured maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// How long a session token is valid when the login answer does not say (Snowflake's default).
const DEFAULT_SESSION_VALIDITY: Duration = Duration::from_hours(1);
/// Snowflake answers with these codes while a statement is still running; the result is then
/// fetched from `getResultUrl`.
const STILL_RUNNING: [&str; 2] = ["333333", "333334"];
/// Codes meaning the session token is no longer valid and a new login is needed.
const SESSION_GONE: [&str; 5] = ["390104", "390110", "390112", "390113", "390114"];

/// Everything that can go wrong talking to Snowflake.
#[derive(Debug, thiserror::Error)]
pub enum SnowflakeError {
    #[error(
        "the Snowflake password is not set: export it in the environment variable `{env}` (named by snowflake.password_env)"
    )]
    MissingPassword { env: String },
    #[error("{0}")]
    Credentials(AuthError),
    #[error("snowflake settings are not usable: {}", problems.join("; "))]
    Config { problems: Vec<String> },
    #[error("request to {endpoint} timed out after {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("request to {endpoint} failed: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{endpoint} answered HTTP {status}: {body}")]
    HttpStatus {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("login as `{user}` to account `{account}` failed with code {code}: {message}")]
    Login {
        account: String,
        user: String,
        code: String,
        message: String,
    },
    #[error(
        "the Snowflake session expired (code {code}) while a transaction was open; the transaction is lost"
    )]
    SessionExpired { code: String },
    #[error("statement failed with code {code} (SQL state {sql_state}): {message}; SQL: {sql}")]
    Statement {
        code: String,
        sql_state: String,
        message: String,
        sql: String,
    },
    #[error("unexpected answer from Snowflake for `{sql}`: {detail}")]
    Protocol { sql: String, detail: String },
    #[error("the Arrow result of `{sql}` could not be decoded: {source}")]
    Arrow {
        sql: String,
        #[source]
        source: ArrowError,
    },
    #[error(
        "the result of `{sql}` is split into {chunks} remote chunks, which this client does not download; select fewer rows"
    )]
    RemoteChunks { sql: String, chunks: usize },
    #[error(
        "uploading `{file}` for a PUT failed: {detail}; use load_mode = \"external_stage\" or \"rows\" with this account"
    )]
    Upload { file: String, detail: String },
    #[error("uploading `{file}` for a PUT into an S3 stage failed: {source}")]
    StageUpload {
        file: String,
        // boxed: S3's errors are large, and every statement's result carries this type
        #[source]
        source: Box<StageUploadError>,
    },
    #[error("column {column} of the result of `{sql}` holds {found}, expected {expected}")]
    Value {
        sql: String,
        column: usize,
        found: String,
        expected: &'static str,
    },
}

impl SnowflakeError {
    /// The Snowflake error code, when Snowflake gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Login { code, .. }
            | Self::Statement { code, .. }
            | Self::SessionExpired { code } => Some(code),
            _ => None,
        }
    }

    /// True when repeating the same request may succeed: timeouts, broken connections (also one
    /// that breaks while the answer's body is read, which reqwest reports as a decode error),
    /// 5xx and 429 answers.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Http { source, .. } => {
                source.is_connect() || source.is_request() || source.is_body() || source.is_decode()
            }
            Self::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// True when the request never reached Snowflake (the connection was refused or could not
    /// be opened), so even a statement that is not safe to repeat may be sent again.
    pub fn was_not_sent(&self) -> bool {
        matches!(self, Self::Http { source, .. } if source.is_connect())
    }

    /// True when the session is gone (expired, or the server forgot it); a new login helps.
    pub fn is_session_gone(&self) -> bool {
        matches!(self, Self::SessionExpired { .. })
    }
}

impl From<AuthError> for SnowflakeError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingPassword { var } => Self::MissingPassword { env: var },
            other => Self::Credentials(other),
        }
    }
}

/// Shortens SQL for error messages and logs: statements with thousands of bind markers would
/// otherwise drown the message.
pub(crate) fn truncate_sql(sql: &str) -> String {
    let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if sql.chars().count() <= SQL_IN_ERRORS {
        sql
    } else {
        let cut: String = sql.chars().take(SQL_IN_ERRORS).collect();
        format!("{cut}...")
    }
}

/// A value bound to a `?` placeholder.
#[derive(Debug, Clone, PartialEq)]
pub enum BindValue {
    /// A whole number (`NUMBER` with scale 0).
    Fixed(i64),
    /// A double (`FLOAT`). NaN and infinities are sent the way Snowflake spells them.
    Real(f64),
    /// A string.
    Text(String),
    /// An instant in UTC, microseconds since the Unix epoch (`TIMESTAMP_TZ` with offset 0).
    TimestampTzMicros(i64),
    /// SQL `NULL`.
    Null,
}

impl BindValue {
    /// The driver protocol's binding: a type name and the value as a string.
    fn to_json(&self) -> Value {
        match self {
            Self::Fixed(v) => json!({"type": "FIXED", "value": v.to_string()}),
            Self::Real(v) => {
                let text = if v.is_nan() {
                    "NaN".to_owned()
                } else if v.is_infinite() {
                    if *v > 0.0 { "inf" } else { "-inf" }.to_owned()
                } else {
                    v.to_string()
                };
                json!({"type": "REAL", "value": text})
            }
            Self::Text(v) => json!({"type": "TEXT", "value": v}),
            // nanoseconds since the epoch, then the UTC offset in minutes plus 1440, as the
            // drivers encode TIMESTAMP_TZ
            Self::TimestampTzMicros(us) => json!({
                "type": "TIMESTAMP_TZ",
                "value": format!("{} 1440", i128::from(*us) * 1000),
            }),
            Self::Null => json!({"type": "ANY", "value": null}),
        }
    }
}

/// One column of a result, as Snowflake describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ColumnInfo {
    /// Column name as Snowflake reports it (upper-case for unquoted names).
    pub name: String,
    /// Snowflake's type name in lower case: `fixed`, `real`, `text`, `timestamp_tz`, ...
    #[serde(rename = "type")]
    pub sf_type: String,
    /// Digits after the decimal point for `fixed` columns.
    #[serde(default)]
    pub scale: Option<i64>,
    /// Whether the column may hold `NULL`.
    #[serde(default)]
    pub nullable: bool,
}

/// The rows of a result in the format Snowflake chose to send them.
#[derive(Debug, Clone)]
pub enum Rowset {
    /// Arrow record batches (queries). Snowflake encodes `TIMESTAMP_*` columns as structs of
    /// `epoch` seconds, `fraction` nanoseconds and, for `TIMESTAMP_TZ`, `timezone`.
    Arrow(Vec<RecordBatch>),
    /// Rows of strings (DML results, or sessions that ask for JSON).
    Json(Vec<Vec<Option<String>>>),
}

/// The answer to one statement.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// Snowflake's id for the statement, for looking it up in the query history.
    pub query_id: Option<String>,
    /// Result columns, in order.
    pub columns: Vec<ColumnInfo>,
    /// Result rows.
    pub rows: Rowset,
    /// For a `PUT`: where the client must upload the file itself.
    pub upload: Option<UploadTarget>,
    /// The SQL that produced this result, shortened, for error messages.
    sql: String,
}

/// Snowflake's answer to a `PUT`: the server never sees the file, it tells the client where to
/// upload it (the drivers' `stageInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadTarget {
    /// `S3`, `AZURE`, `GCS` or `LOCAL_FS`.
    pub location_type: String,
    /// The bucket and prefix, or for `LOCAL_FS` the folder.
    pub location: String,
    /// A URL the file can be sent to with a plain HTTP `PUT` (GCS stages).
    #[serde(default)]
    pub presigned_url: Option<String>,
    /// The bucket's region (S3 stages).
    #[serde(default)]
    pub region: Option<String>,
    /// Temporary credentials for the upload (S3 stages); `Debug` redacts the secrets.
    #[serde(default)]
    pub creds: StageCredentials,
    /// A host name replacing the default S3 endpoint (FIPS, `PrivateLink`).
    #[serde(default)]
    pub end_point: Option<String>,
    /// Whether to use the bucket's regional S3 endpoint.
    #[serde(default, rename = "useS3RegionalUrl")]
    pub use_s3_regional_url: bool,
    /// The key to encrypt the file with before uploading: the answer's `encryptionMaterial`,
    /// which sits beside `stageInfo`; `None` for stages without client-side encryption.
    #[serde(skip)]
    pub encryption: Option<EncryptionMaterial>,
}

impl QueryResult {
    /// A JSON result with these columns (all text) and rows, for unit tests of result readers.
    #[cfg(test)]
    pub(crate) fn for_test(columns: &[&str], rows: &[&[&str]]) -> Self {
        Self {
            query_id: None,
            columns: columns
                .iter()
                .map(|name| ColumnInfo {
                    name: (*name).to_owned(),
                    sf_type: "text".to_owned(),
                    scale: None,
                    nullable: true,
                })
                .collect(),
            rows: Rowset::Json(
                rows.iter()
                    .map(|r| r.iter().map(|v| Some((*v).to_owned())).collect())
                    .collect(),
            ),
            upload: None,
            sql: "test".to_owned(),
        }
    }

    /// Number of rows in the result.
    pub fn num_rows(&self) -> usize {
        match &self.rows {
            Rowset::Arrow(batches) => batches.iter().map(RecordBatch::num_rows).sum(),
            Rowset::Json(rows) => rows.len(),
        }
    }

    /// Rows a DML statement inserted, updated or deleted: Snowflake reports them as the
    /// columns `number of rows ...` of a one-row result. `None` for other statements.
    pub fn rows_affected(&self) -> Option<u64> {
        let counted: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            // "number of multi-joined rows updated" counts rows already counted as updated
            .filter(|(_, c)| c.name.starts_with("number of rows"))
            .map(|(i, _)| i)
            .collect();
        if counted.is_empty() || self.num_rows() != 1 {
            return None;
        }
        counted.iter().try_fold(0u64, |sum, &col| {
            let n = self.i64_at(0, col).ok().flatten()?;
            Some(sum + u64::try_from(n).ok()?)
        })
    }

    /// The string in row `row`, column `col`, or `None` for SQL `NULL`.
    pub fn text_at(&self, row: usize, col: usize) -> Result<Option<String>, SnowflakeError> {
        let bad = |found: String| SnowflakeError::Value {
            sql: self.sql.clone(),
            column: col,
            found,
            expected: "a string",
        };
        match &self.rows {
            Rowset::Json(rows) => rows
                .get(row)
                .and_then(|r| r.get(col))
                .cloned()
                .ok_or_else(|| bad(format!("no cell at row {row}"))),
            Rowset::Arrow(batches) => {
                let (batch, i) =
                    locate(batches, row).ok_or_else(|| bad(format!("no row {row}")))?;
                let array = batch
                    .columns()
                    .get(col)
                    .ok_or_else(|| bad(format!("no column {col}")))?;
                if array.is_null(i) {
                    return Ok(None);
                }
                match array.data_type() {
                    DataType::Utf8 => Ok(Some(array.as_string::<i32>().value(i).to_owned())),
                    DataType::LargeUtf8 => Ok(Some(array.as_string::<i64>().value(i).to_owned())),
                    DataType::Utf8View => Ok(Some(array.as_string_view().value(i).to_owned())),
                    other => Err(bad(format!("type {other}"))),
                }
            }
        }
    }

    /// The whole number in row `row`, column `col`, or `None` for SQL `NULL`.
    pub fn i64_at(&self, row: usize, col: usize) -> Result<Option<i64>, SnowflakeError> {
        let bad = |found: String| SnowflakeError::Value {
            sql: self.sql.clone(),
            column: col,
            found,
            expected: "a whole number",
        };
        match &self.rows {
            Rowset::Json(rows) => {
                let cell = rows
                    .get(row)
                    .and_then(|r| r.get(col))
                    .ok_or_else(|| bad(format!("no cell at row {row}")))?;
                cell.as_deref()
                    .map(|s| s.parse::<i64>().map_err(|_| bad(format!("`{s}`"))))
                    .transpose()
            }
            Rowset::Arrow(batches) => {
                let (batch, i) =
                    locate(batches, row).ok_or_else(|| bad(format!("no row {row}")))?;
                let array = batch
                    .columns()
                    .get(col)
                    .ok_or_else(|| bad(format!("no column {col}")))?;
                if array.is_null(i) {
                    return Ok(None);
                }
                let value = match array.data_type() {
                    DataType::Int8 => i64::from(array.as_primitive::<Int8Type>().value(i)),
                    DataType::Int16 => i64::from(array.as_primitive::<Int16Type>().value(i)),
                    DataType::Int32 => i64::from(array.as_primitive::<Int32Type>().value(i)),
                    DataType::Int64 => array.as_primitive::<Int64Type>().value(i),
                    DataType::Decimal128(_, 0) => {
                        let v = array
                            .as_primitive::<arrow_array::types::Decimal128Type>()
                            .value(i);
                        i64::try_from(v).map_err(|_| bad(format!("{v}")))?
                    }
                    other => return Err(bad(format!("type {other}"))),
                };
                Ok(Some(value))
            }
        }
    }
}

fn locate(batches: &[RecordBatch], mut row: usize) -> Option<(&RecordBatch, usize)> {
    for batch in batches {
        if row < batch.num_rows() {
            return Some((batch, row));
        }
        row -= batch.num_rows();
    }
    None
}

/// A statement as handed to a [`Transport`].
#[derive(Debug, Clone)]
pub struct StatementRequest<'a> {
    pub sql: &'a str,
    pub bindings: &'a [BindValue],
    /// Stays the same across retries of one statement, so Snowflake can recognise a repeat.
    pub request_id: uuid::Uuid,
    /// 0 for the first attempt.
    pub retry_count: u32,
}

/// The future a [`Transport`] returns.
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<QueryResult, SnowflakeError>> + Send + 'a>>;

/// A way to run statements in one Snowflake session.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Runs one statement and returns its complete result.
    fn execute<'a>(&'a self, request: StatementRequest<'a>) -> TransportFuture<'a>;
    /// Starts a fresh session after the old one expired. Session state (open transaction,
    /// temporary tables) is lost.
    fn renew_session(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + '_>>;
    /// When the session should be renewed (some time before its token expires); `None` when
    /// the transport's sessions do not expire.
    fn renew_at(&self) -> Option<Instant>;
    /// Uploads `bytes` as `file_name` where a `PUT` answer said. Protocols without `PUT`
    /// (the SQL API) keep this default.
    fn upload<'a>(
        &'a self,
        target: &'a UploadTarget,
        file_name: &'a str,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + 'a>> {
        let _ = (target, bytes);
        Box::pin(async move {
            Err(SnowflakeError::Upload {
                file: file_name.to_owned(),
                detail: "this transport has no PUT".to_owned(),
            })
        })
    }
}

/// Where a transport gets its credentials at each login.
#[derive(Debug, Clone)]
enum CredentialSource {
    /// Read from the `[snowflake]` settings (environment, files) at every login, so rotated
    /// secrets are picked up.
    Config(Box<SnowflakeConfig>),
    /// Given by the caller (a secret manager, a test).
    Fixed(Credentials),
}

impl CredentialSource {
    fn credentials(&self) -> Result<Credentials, SnowflakeError> {
        match self {
            Self::Config(cfg) => Ok(cfg.credentials()?),
            Self::Fixed(credentials) => Ok(credentials.clone()),
        }
    }
}

/// The current session token and when to renew it.
struct Session {
    token: Secret,
    renew_at: Instant,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token)
            .field("renew_at", &self.renew_at)
            .finish()
    }
}

/// How long before its token expires a session is renewed: a tenth of its validity, at least
/// 30 s and at most 5 minutes, so a statement never starts on a token about to lapse.
pub(crate) fn renewal_margin(validity: Duration) -> Duration {
    (validity / 10).clamp(Duration::from_secs(30), Duration::from_mins(5))
}

/// True when a session whose renewal time is `renew_at` should be renewed before work that
/// needs it for `ahead` more, at `now`.
pub(crate) fn renewal_due(renew_at: Instant, now: Instant, ahead: Duration) -> bool {
    now + ahead >= renew_at
}

/// The drivers' REST protocol: `/session/v1/login-request` and `/queries/v1/query-request`.
#[derive(Debug)]
pub struct ConnectorTransport {
    http: reqwest::Client,
    base: String,
    account: String,
    user: String,
    credentials: CredentialSource,
    database: String,
    schema: String,
    warehouse: Option<String>,
    role: Option<String>,
    session_parameters: Vec<(String, SessionParameter)>,
    timeout: Duration,
    retry: RetryPolicy,
    session: Mutex<Session>,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryData {
    #[serde(default)]
    rowtype: Vec<ColumnInfo>,
    #[serde(default)]
    query_result_format: Option<String>,
    #[serde(default)]
    rowset_base64: Option<String>,
    #[serde(default)]
    rowset: Option<Vec<Vec<Option<String>>>>,
    #[serde(default)]
    chunks: Option<Vec<Value>>,
    #[serde(default)]
    query_id: Option<String>,
    #[serde(default)]
    sql_state: Option<String>,
    #[serde(default)]
    stage_info: Option<UploadTarget>,
    /// Present when the stage encrypts client-side; the file must then be encrypted with it.
    #[serde(default)]
    encryption_material: Option<Value>,
}

impl ConnectorTransport {
    /// Logs in with the credentials the `[snowflake]` settings name (read now, and again at
    /// every renewal) and returns a transport bound to the new session.
    pub async fn login(cfg: &SnowflakeConfig) -> Result<Self, SnowflakeError> {
        Self::login_from(cfg, CredentialSource::Config(Box::new(cfg.clone()))).await
    }

    /// Logs in with credentials obtained by the caller (a secret manager, say), used again for
    /// every renewal.
    pub async fn login_with(
        cfg: &SnowflakeConfig,
        credentials: Credentials,
    ) -> Result<Self, SnowflakeError> {
        Self::login_from(cfg, CredentialSource::Fixed(credentials)).await
    }

    async fn login_from(
        cfg: &SnowflakeConfig,
        credentials: CredentialSource,
    ) -> Result<Self, SnowflakeError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(SnowflakeError::Config { problems });
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(30)))
            .user_agent(concat!("plantline-collector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| SnowflakeError::Http {
                endpoint: cfg.url.clone(),
                source,
            })?;
        let transport = Self {
            http,
            base: cfg.url.trim_end_matches('/').to_owned(),
            account: cfg.account.clone(),
            user: cfg.user.clone(),
            credentials,
            database: cfg.database.clone(),
            schema: cfg.schema.clone(),
            warehouse: cfg.warehouse.clone(),
            role: cfg.role.clone(),
            session_parameters: cfg
                .session_parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout: cfg.request_timeout,
            retry: RetryPolicy::from_config(cfg),
            session: Mutex::new(Session {
                token: Secret::new(String::new()),
                renew_at: Instant::now(),
            }),
        };
        transport.new_session().await?;
        Ok(transport)
    }

    /// Logs in, retrying timeouts, broken connections and 5xx answers (a login changes nothing
    /// but the session, so repeating it is safe). Credentials are read once per call.
    async fn new_session(&self) -> Result<(), SnowflakeError> {
        let credentials = self.credentials.credentials()?;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.login_once(&credentials).await {
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    let wait = jittered(backoff);
                    warn!(component = "snowflake", error = %e, attempt, ?wait, "login failed, retrying");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn login_once(&self, credentials: &Credentials) -> Result<(), SnowflakeError> {
        let endpoint = "/session/v1/login-request";
        let mut query = vec![
            ("databaseName", self.database.clone()),
            ("schemaName", self.schema.clone()),
            ("requestId", uuid::Uuid::new_v4().to_string()),
        ];
        if let Some(w) = &self.warehouse {
            query.push(("warehouse", w.clone()));
        }
        if let Some(r) = &self.role {
            query.push(("roleName", r.clone()));
        }
        let mut parameters = serde_json::Map::new();
        for (name, value) in &self.session_parameters {
            parameters.insert(name.clone(), value.to_json());
        }
        parameters.insert("AUTOCOMMIT".into(), true.into());
        parameters.insert("TIMEZONE".into(), "UTC".into());
        let mut data = serde_json::Map::new();
        data.insert("CLIENT_APP_ID".into(), "plantline-collector".into());
        data.insert(
            "CLIENT_APP_VERSION".into(),
            env!("CARGO_PKG_VERSION").into(),
        );
        data.insert("ACCOUNT_NAME".into(), self.account.clone().into());
        data.insert("LOGIN_NAME".into(), self.user.clone().into());
        data.extend(credentials.login_fields(&self.account, &self.user, SystemTime::now())?);
        data.insert("SESSION_PARAMETERS".into(), Value::Object(parameters));
        let body = json!({ "data": data });
        let request = self
            .http
            .post(format!("{}{endpoint}", self.base))
            .query(&query)
            .header(reqwest::header::ACCEPT, "application/snowflake")
            .json(&body);
        let envelope = self.send(endpoint, request).await?;
        let data = envelope.data.as_ref().filter(|_| envelope.success);
        let token = data.and_then(|d| d.get("token")).and_then(Value::as_str);
        match token {
            Some(token) => {
                let validity = data
                    .and_then(|d| d.get("validityInSeconds"))
                    .and_then(Value::as_u64)
                    .filter(|s| *s > 0)
                    .map_or(DEFAULT_SESSION_VALIDITY, Duration::from_secs);
                let now = Instant::now();
                *self
                    .session
                    .lock()
                    .expect("the session lock is never held across a panic") = Session {
                    token: Secret::new(token),
                    renew_at: now + validity.saturating_sub(renewal_margin(validity)),
                };
                debug!(
                    component = "snowflake",
                    account = %self.account,
                    authenticator = credentials.authenticator().as_str(),
                    validity_s = validity.as_secs(),
                    "logged in"
                );
                Ok(())
            }
            None => Err(SnowflakeError::Login {
                account: self.account.clone(),
                user: self.user.clone(),
                code: envelope.code.unwrap_or_default(),
                message: envelope
                    .message
                    .unwrap_or_else(|| "no session token in the answer".to_owned()),
            }),
        }
    }

    fn authorization(&self) -> String {
        let session = self
            .session
            .lock()
            .expect("the session lock is never held across a panic");
        format!("Snowflake Token=\"{}\"", session.token.expose())
    }

    async fn send(
        &self,
        endpoint: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Envelope, SnowflakeError> {
        let response = request
            .send()
            .await
            .map_err(|e| self.http_error(endpoint, e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.http_error(endpoint, e))?;
        // Snowflake reports statement errors with HTTP 200 and `success: false`; an error
        // status with a JSON envelope still carries the code worth showing.
        match serde_json::from_slice::<Envelope>(&body) {
            Ok(envelope)
                if status.is_success() || envelope.code.is_some() && status.as_u16() < 500 =>
            {
                Ok(envelope)
            }
            _ if !status.is_success() => Err(SnowflakeError::HttpStatus {
                endpoint: endpoint.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            }),
            Ok(envelope) => Ok(envelope),
            Err(e) => Err(SnowflakeError::HttpStatus {
                endpoint: endpoint.to_owned(),
                status: status.as_u16(),
                body: format!("not a JSON answer ({e})"),
            }),
        }
    }

    fn http_error(&self, endpoint: &str, source: reqwest::Error) -> SnowflakeError {
        if source.is_timeout() {
            SnowflakeError::Timeout {
                endpoint: endpoint.to_owned(),
                timeout: self.timeout,
            }
        } else {
            SnowflakeError::Http {
                endpoint: endpoint.to_owned(),
                source,
            }
        }
    }

    async fn run(&self, request: StatementRequest<'_>) -> Result<QueryResult, SnowflakeError> {
        let endpoint = "/queries/v1/query-request";
        let short_sql = truncate_sql(request.sql);
        let mut body = json!({
            "sqlText": request.sql,
            "asyncExec": false,
            "sequenceId": 1,
            "queryContextDTO": {},
        });
        if !request.bindings.is_empty() {
            let bindings: serde_json::Map<String, Value> = request
                .bindings
                .iter()
                .enumerate()
                .map(|(i, b)| ((i + 1).to_string(), b.to_json()))
                .collect();
            body["bindings"] = Value::Object(bindings);
        }
        let mut query = vec![
            ("requestId", request.request_id.to_string()),
            ("request_guid", uuid::Uuid::new_v4().to_string()),
        ];
        if request.retry_count > 0 {
            query.push(("retryCount", request.retry_count.to_string()));
        }
        let http = self
            .http
            .post(format!("{}{endpoint}", self.base))
            .query(&query)
            .header(reqwest::header::ACCEPT, "application/snowflake")
            .header(reqwest::header::AUTHORIZATION, self.authorization())
            .json(&body);
        let mut envelope = self.send(endpoint, http).await?;

        let mut wait = Duration::from_millis(100);
        while envelope
            .code
            .as_deref()
            .is_some_and(|c| STILL_RUNNING.contains(&c))
        {
            let url = envelope
                .data
                .as_ref()
                .and_then(|d| d.get("getResultUrl"))
                .and_then(Value::as_str)
                .ok_or_else(|| SnowflakeError::Protocol {
                    sql: short_sql.clone(),
                    detail: "a still-running answer without getResultUrl".to_owned(),
                })?
                .to_owned();
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            let poll = self
                .http
                .get(format!("{}{url}", self.base))
                .header(reqwest::header::ACCEPT, "application/snowflake")
                .header(reqwest::header::AUTHORIZATION, self.authorization());
            envelope = self.send(&url, poll).await?;
        }
        decode_query_answer(envelope, short_sql)
    }
}

impl ConnectorTransport {
    /// Moves a file where a `PUT` answer said: a presigned URL takes a plain HTTP `PUT`, a
    /// `LOCAL_FS` stage (a server on this machine) a file write, an S3 stage an S3 `PUT` with
    /// the answer's temporary credentials, encrypted client-side when the answer carries
    /// encryption material. Azure stages are not supported.
    async fn upload_file(
        &self,
        target: &UploadTarget,
        file_name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), SnowflakeError> {
        let upload_err = |detail: String| SnowflakeError::Upload {
            file: file_name.to_owned(),
            detail,
        };
        if let Some(url) = &target.presigned_url {
            if target.encryption.is_some() {
                // GCS stages carry the key material in other headers; sending the plain file
                // would leave Snowflake a file it cannot read
                return Err(upload_err(format!(
                    "the stage on {} encrypts files client-side, which this client does only for S3 stages",
                    target.location_type
                )));
            }
            let response = self
                .http
                .put(url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(bytes)
                .send()
                .await
                .map_err(|e| self.http_error("the stage's presigned URL", e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(SnowflakeError::HttpStatus {
                    endpoint: "the stage's presigned URL".to_owned(),
                    status: status.as_u16(),
                    body: String::new(),
                });
            }
            return Ok(());
        }
        if target.location_type == "LOCAL_FS" {
            let folder = std::path::Path::new(&target.location);
            tokio::fs::create_dir_all(folder)
                .await
                .map_err(|e| upload_err(format!("creating {}: {e}", folder.display())))?;
            let path = folder.join(file_name);
            return tokio::fs::write(&path, bytes)
                .await
                .map_err(|e| upload_err(format!("writing {}: {e}", path.display())));
        }
        if target.location_type == "S3" {
            return upload_to_s3_stage(target, file_name, bytes)
                .await
                .map_err(|source| SnowflakeError::StageUpload {
                    file: file_name.to_owned(),
                    source: Box::new(source),
                });
        }
        Err(upload_err(format!(
            "the stage is on {} at `{}`, which this client cannot upload to (only S3, presigned URLs and LOCAL_FS)",
            target.location_type, target.location
        )))
    }
}

fn decode_query_answer(envelope: Envelope, sql: String) -> Result<QueryResult, SnowflakeError> {
    let data: Option<QueryData> = envelope
        .data
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| SnowflakeError::Protocol {
            sql: sql.clone(),
            detail: format!("the data object does not parse: {e}"),
        })?;
    if !envelope.success {
        let code = envelope.code.unwrap_or_default();
        if SESSION_GONE.contains(&code.as_str()) {
            return Err(SnowflakeError::SessionExpired { code });
        }
        return Err(SnowflakeError::Statement {
            code,
            sql_state: data
                .and_then(|d| d.sql_state)
                .unwrap_or_else(|| "unknown".to_owned()),
            message: envelope.message.unwrap_or_default(),
            sql,
        });
    }
    let data = data.ok_or_else(|| SnowflakeError::Protocol {
        sql: sql.clone(),
        detail: "success without a data object".to_owned(),
    })?;
    if let Some(chunks) = data.chunks.as_ref().filter(|c| !c.is_empty()) {
        return Err(SnowflakeError::RemoteChunks {
            sql,
            chunks: chunks.len(),
        });
    }
    let encryption = data
        .encryption_material
        .as_ref()
        .map(EncryptionMaterial::from_answer)
        .transpose()
        .map_err(|e| SnowflakeError::Protocol {
            sql: sql.clone(),
            detail: format!("encryptionMaterial does not parse: {e}"),
        })?
        .flatten();
    let rows = match data.query_result_format.as_deref() {
        Some("arrow") => {
            let encoded = data.rowset_base64.unwrap_or_default();
            Rowset::Arrow(decode_arrow(&encoded, &sql)?)
        }
        Some("json") | None => Rowset::Json(data.rowset.unwrap_or_default()),
        Some(other) => {
            return Err(SnowflakeError::Protocol {
                sql,
                detail: format!("unknown result format `{other}`"),
            });
        }
    };
    Ok(QueryResult {
        query_id: data.query_id,
        columns: data.rowtype,
        rows,
        upload: data.stage_info.map(|target| UploadTarget {
            encryption,
            ..target
        }),
        sql,
    })
}

fn decode_arrow(encoded: &str, sql: &str) -> Result<Vec<RecordBatch>, SnowflakeError> {
    if encoded.is_empty() {
        return Ok(Vec::new());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| SnowflakeError::Protocol {
            sql: sql.to_owned(),
            detail: format!("rowsetBase64 is not base64: {e}"),
        })?;
    let arrow_err = |source| SnowflakeError::Arrow {
        sql: sql.to_owned(),
        source,
    };
    let reader =
        arrow_ipc::reader::StreamReader::try_new(Cursor::new(bytes), None).map_err(arrow_err)?;
    reader.collect::<Result<Vec<_>, _>>().map_err(arrow_err)
}

impl Transport for ConnectorTransport {
    fn execute<'a>(&'a self, request: StatementRequest<'a>) -> TransportFuture<'a> {
        Box::pin(self.run(request))
    }

    fn upload<'a>(
        &'a self,
        target: &'a UploadTarget,
        file_name: &'a str,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + 'a>> {
        Box::pin(self.upload_file(target, file_name, bytes))
    }

    fn renew_session(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + '_>> {
        Box::pin(self.new_session())
    }

    fn renew_at(&self) -> Option<Instant> {
        Some(
            self.session
                .lock()
                .expect("the session lock is never held across a panic")
                .renew_at,
        )
    }
}

/// Statements that change nothing when repeated, so a retry after a lost answer is safe.
fn is_idempotent(sql: &str) -> bool {
    let upper = sql.trim_start().to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or_default();
    match first {
        // a repeated PUT asks for the same upload target again
        "SELECT" | "SHOW" | "DESCRIBE" | "DESC" | "USE" | "ROLLBACK" | "PUT" => true,
        "CREATE" => upper.contains(" IF NOT EXISTS "),
        _ => false,
    }
}

/// How often and how patiently requests are repeated after transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts, the first one included; at least 1.
    pub attempts: u32,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// `[snowflake] retry_attempts` and `retry_max_backoff`.
    pub fn from_config(cfg: &SnowflakeConfig) -> Self {
        Self {
            attempts: cfg.retry_attempts.max(1),
            max_backoff: cfg.retry_max_backoff,
        }
    }

    /// The wait before attempt `attempt + 1` (attempt counts from 1), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(16);
        (FIRST_BACKOFF * 2u32.pow(doublings)).min(self.max_backoff)
    }

    /// Sleeps before attempt `attempt + 1`, spreading several collectors' retries apart.
    pub async fn wait(&self, attempt: u32) {
        tokio::time::sleep(jittered(self.backoff(attempt))).await;
    }
}

/// Renew a session that would expire within this much of starting a statement outside a
/// transaction.
const STATEMENT_RENEWAL_AHEAD: Duration = Duration::ZERO;

/// A Snowflake session with retries, session renewal and transaction bookkeeping.
#[derive(Debug)]
pub struct SnowflakeClient {
    transport: Box<dyn Transport>,
    retry: RetryPolicy,
    in_transaction: bool,
}

impl SnowflakeClient {
    /// Logs in with the driver protocol and the authenticator the settings name
    /// (`SNOWFLAKE`, `SNOWFLAKE_JWT` or `OAUTH`); secrets are read from their environment
    /// variables or files now and at every renewal.
    pub async fn login(cfg: &SnowflakeConfig) -> Result<Self, SnowflakeError> {
        let transport = ConnectorTransport::login(cfg).await?;
        Ok(Self::with_transport(
            Box::new(transport),
            RetryPolicy::from_config(cfg),
        ))
    }

    /// Logs in with the driver protocol and a password obtained by the caller.
    pub async fn login_with_password(
        cfg: &SnowflakeConfig,
        password: String,
    ) -> Result<Self, SnowflakeError> {
        Self::login_with(cfg, Credentials::Password(Secret::new(password))).await
    }

    /// Logs in with the driver protocol and credentials obtained by the caller.
    pub async fn login_with(
        cfg: &SnowflakeConfig,
        credentials: Credentials,
    ) -> Result<Self, SnowflakeError> {
        let transport = ConnectorTransport::login_with(cfg, credentials).await?;
        Ok(Self::with_transport(
            Box::new(transport),
            RetryPolicy::from_config(cfg),
        ))
    }

    /// Wraps an already logged-in transport.
    pub fn with_transport(transport: Box<dyn Transport>, retry: RetryPolicy) -> Self {
        Self {
            transport,
            retry,
            in_transaction: false,
        }
    }

    /// The retry policy of this client.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// True between [`SnowflakeClient::begin`] and [`SnowflakeClient::commit`] or
    /// [`SnowflakeClient::rollback`].
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Starts a fresh session now. Session state (an open transaction, temporary tables) is
    /// lost, so callers redo their work from a known point.
    pub async fn renew_session(&mut self) -> Result<(), SnowflakeError> {
        self.in_transaction = false;
        self.transport.renew_session().await
    }

    /// Renews the session when its token would need renewal within `ahead`. Does nothing
    /// inside a transaction (a new session would lose it). Returns whether it renewed.
    pub async fn renew_if_due(&mut self, ahead: Duration) -> Result<bool, SnowflakeError> {
        if self.in_transaction {
            return Ok(false);
        }
        match self.transport.renew_at() {
            Some(at) if renewal_due(at, Instant::now(), ahead) => {
                debug!(
                    component = "snowflake",
                    "session token due for renewal, logging in again"
                );
                self.transport.renew_session().await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Runs one statement with `?` placeholders bound in order.
    ///
    /// Outside a transaction, a session whose token is due is renewed first, and an expired
    /// session is renewed and the statement re-run once. Statements that are safe to repeat
    /// (queries, `CREATE ... IF NOT EXISTS`) are retried with capped exponential backoff after
    /// timeouts, broken connections and 5xx/429 answers, up to the policy's attempts; others
    /// only when the request provably never reached Snowflake (connection refused), because the
    /// first attempt may have been applied.
    pub async fn execute(
        &mut self,
        sql: &str,
        bindings: &[BindValue],
    ) -> Result<QueryResult, SnowflakeError> {
        self.execute_with(sql, bindings, self.retry.attempts).await
    }

    async fn execute_with(
        &mut self,
        sql: &str,
        bindings: &[BindValue],
        attempts: u32,
    ) -> Result<QueryResult, SnowflakeError> {
        self.renew_if_due(STATEMENT_RENEWAL_AHEAD).await?;
        let idempotent = is_idempotent(sql);
        let request_id = uuid::Uuid::new_v4();
        let mut renewed = false;
        let mut attempt = 1;
        loop {
            let request = StatementRequest {
                sql,
                bindings,
                request_id,
                retry_count: attempt - 1,
            };
            match self.transport.execute(request).await {
                Ok(result) => return Ok(result),
                Err(SnowflakeError::SessionExpired { code })
                    if !renewed && !self.in_transaction =>
                {
                    debug!(component = "snowflake", code = %code, "session expired, logging in again");
                    self.transport.renew_session().await?;
                    renewed = true;
                }
                Err(SnowflakeError::SessionExpired { code }) => {
                    self.in_transaction = false;
                    return Err(SnowflakeError::SessionExpired { code });
                }
                Err(e)
                    if (e.was_not_sent() || idempotent && e.is_transient())
                        && attempt < attempts =>
                {
                    warn!(
                        component = "snowflake",
                        error = %e,
                        attempt,
                        of = attempts,
                        sql = %truncate_sql(sql),
                        "statement failed, retrying"
                    );
                    self.retry.wait(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Uploads `bytes` as `file_name` into `stage_dir` (`STAGE/path/`, no `@`) with `PUT`:
    /// Snowflake answers with where to send the file and the client sends it. Uploading the
    /// same file again overwrites it with the same bytes, so the whole step is retried after
    /// transient failures.
    pub async fn put(
        &mut self,
        stage_dir: &str,
        file_name: &str,
        bytes: Vec<u8>,
    ) -> Result<(), SnowflakeError> {
        // the local path is only a name here: the bytes come from the caller
        let sql = format!(
            "PUT 'file:///{file_name}' @{stage_dir} AUTO_COMPRESS = FALSE SOURCE_COMPRESSION = NONE OVERWRITE = TRUE"
        );
        let mut attempt = 1;
        loop {
            let answer = self.execute(&sql, &[]).await?;
            let target = answer.upload.ok_or_else(|| SnowflakeError::Protocol {
                sql: truncate_sql(&sql),
                detail: "a PUT answer without stageInfo".to_owned(),
            })?;
            match self
                .transport
                .upload(&target, file_name, bytes.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    warn!(component = "snowflake", error = %e, attempt, file = file_name, "upload failed, retrying");
                    self.retry.wait(attempt).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens a transaction: statements until [`SnowflakeClient::commit`] apply together.
    pub async fn begin(&mut self) -> Result<(), SnowflakeError> {
        self.execute("BEGIN", &[]).await?;
        self.in_transaction = true;
        Ok(())
    }

    /// Commits the open transaction.
    pub async fn commit(&mut self) -> Result<(), SnowflakeError> {
        let result = self.execute("COMMIT", &[]).await;
        // After a failed COMMIT the outcome is unknown to us, but the session no longer
        // holds our transaction open either way from the caller's point of view.
        self.in_transaction = false;
        result.map(drop)
    }

    /// Rolls the open transaction back, with one attempt: after a failure the session is
    /// usually gone, and Snowflake rolls back what a lost session left open.
    pub async fn rollback(&mut self) -> Result<(), SnowflakeError> {
        let result = self.execute_with("ROLLBACK", &[], 1).await;
        self.in_transaction = false;
        result.map(drop)
    }
}

/// Spreads retries of several collectors over time: between half and all of `base`.
fn jittered(base: Duration) -> Duration {
    // uuid's v4 generator is the process's randomness source already; one more dependency
    // for a jitter factor is not worth it
    let random = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    base / 2 + base / 2 * random / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_use_the_driver_encoding() {
        assert_eq!(
            BindValue::TimestampTzMicros(1_700_000_000_123_456).to_json(),
            json!({"type": "TIMESTAMP_TZ", "value": "1700000000123456000 1440"})
        );
        assert_eq!(
            BindValue::Real(21.5).to_json(),
            json!({"type": "REAL", "value": "21.5"})
        );
        assert_eq!(
            BindValue::Real(f64::NEG_INFINITY).to_json(),
            json!({"type": "REAL", "value": "-inf"})
        );
        assert_eq!(
            BindValue::Fixed(-3).to_json(),
            json!({"type": "FIXED", "value": "-3"})
        );
        assert_eq!(
            BindValue::Null.to_json(),
            json!({"type": "ANY", "value": null})
        );
    }

    #[test]
    fn a_put_answer_for_an_s3_stage_carries_its_encryption_material_to_the_upload() {
        let envelope: Envelope = serde_json::from_value(json!({
            "success": true,
            "data": {
                "command": "UPLOAD",
                "src_locations": ["part-0.parquet"],
                "stageInfo": {
                    "locationType": "S3",
                    "location": "sfc-bucket/stages/abc/",
                    "region": "us-west-2",
                    "creds": {"AWS_KEY_ID": "ASIA1", "AWS_SECRET_KEY": "s3cret-v4lue", "AWS_TOKEN": "t0ken-v4lue"},
                    "endPoint": null,
                    "useS3RegionalUrl": true
                },
                "encryptionMaterial": {
                    "queryStageMasterKey": "AAAAAAAAAAAAAAAAAAAAAA==",
                    "queryId": "q-1",
                    "smkId": 42
                },
                "rowtype": []
            }
        }))
        .unwrap();
        let answer = decode_query_answer(envelope, "PUT".into()).unwrap();
        let target = answer.upload.unwrap();
        assert_eq!(target.location_type, "S3");
        assert_eq!(target.region.as_deref(), Some("us-west-2"));
        assert!(target.use_s3_regional_url);
        assert!(target.encryption.is_some());
        let shown = format!("{target:?}");
        assert!(
            !shown.contains("v4lue") && !shown.contains("AAAA"),
            "{shown}"
        );
    }

    #[test]
    fn only_repeatable_statements_are_retried() {
        assert!(is_idempotent("  select 1"));
        assert!(is_idempotent("CREATE TABLE IF NOT EXISTS T (A INT)"));
        assert!(!is_idempotent("CREATE TABLE T (A INT)"));
        assert!(!is_idempotent("INSERT INTO T VALUES (1)"));
        assert!(!is_idempotent("COMMIT"));
    }

    #[test]
    fn long_sql_is_shortened_in_errors() {
        let sql = format!("INSERT INTO T VALUES {}", vec!["(?, ?)"; 200].join(",\n "));
        let short = truncate_sql(&sql);
        assert_eq!(short.chars().count(), SQL_IN_ERRORS + 3);
        assert!(short.starts_with("INSERT INTO T VALUES (?, ?), (?, ?)"));
        assert!(short.ends_with("..."));
    }

    /// What a [`Scripted`] transport answers and saw.
    #[derive(Debug)]
    struct Script {
        answers: Mutex<std::collections::VecDeque<Result<(), SnowflakeError>>>,
        executed: Mutex<Vec<(String, u32)>>,
        renewals: Mutex<u32>,
        renew_at: Mutex<Instant>,
    }

    /// A transport that answers from a script, for the client's retry and renewal decisions
    /// (fakesnow never expires a session nor answers 503).
    #[derive(Debug)]
    struct Scripted(std::sync::Arc<Script>);

    impl Transport for Scripted {
        fn execute<'a>(&'a self, request: StatementRequest<'a>) -> TransportFuture<'a> {
            self.0
                .executed
                .lock()
                .unwrap()
                .push((request.sql.to_owned(), request.retry_count));
            let answer = self.0.answers.lock().unwrap().pop_front().unwrap_or(Ok(()));
            let sql = request.sql.to_owned();
            Box::pin(async move {
                answer.map(|()| QueryResult {
                    query_id: None,
                    columns: Vec::new(),
                    rows: Rowset::Json(Vec::new()),
                    upload: None,
                    sql,
                })
            })
        }

        fn renew_session(
            &self,
        ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + '_>> {
            *self.0.renewals.lock().unwrap() += 1;
            *self.0.renew_at.lock().unwrap() = Instant::now() + Duration::from_mins(55);
            Box::pin(async { Ok(()) })
        }

        fn renew_at(&self) -> Option<Instant> {
            Some(*self.0.renew_at.lock().unwrap())
        }
    }

    fn scripted(
        answers: Vec<Result<(), SnowflakeError>>,
        renew_at: Instant,
        attempts: u32,
    ) -> (SnowflakeClient, std::sync::Arc<Script>) {
        let script = std::sync::Arc::new(Script {
            answers: Mutex::new(answers.into()),
            executed: Mutex::new(Vec::new()),
            renewals: Mutex::new(0),
            renew_at: Mutex::new(renew_at),
        });
        let client = SnowflakeClient::with_transport(
            Box::new(Scripted(script.clone())),
            RetryPolicy {
                attempts,
                max_backoff: Duration::from_secs(2),
            },
        );
        (client, script)
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_mins(50)
    }

    fn expired() -> SnowflakeError {
        SnowflakeError::SessionExpired {
            code: "390112".into(),
        }
    }

    fn unavailable() -> SnowflakeError {
        SnowflakeError::HttpStatus {
            endpoint: "/queries/v1/query-request".into(),
            status: 503,
            body: "down".into(),
        }
    }

    #[tokio::test]
    async fn a_token_due_for_renewal_is_renewed_before_a_statement_but_not_inside_a_transaction() {
        let (mut client, script) = scripted(vec![], later(), 3);
        client.begin().await.unwrap();
        // the token becomes due while the transaction is open
        *script.renew_at.lock().unwrap() = Instant::now();
        client
            .execute("INSERT INTO T VALUES (1)", &[])
            .await
            .unwrap();
        assert_eq!(
            *script.renewals.lock().unwrap(),
            0,
            "a renewal would lose the transaction"
        );
        client.commit().await.unwrap();
        client.execute("SELECT 1", &[]).await.unwrap();
        assert_eq!(*script.renewals.lock().unwrap(), 1);
        // the fresh token is good for a while: no renewal per statement
        client.execute("SELECT 2", &[]).await.unwrap();
        assert_eq!(*script.renewals.lock().unwrap(), 1);
        assert!(!client.renew_if_due(Duration::from_mins(1)).await.unwrap());
        assert!(client.renew_if_due(Duration::from_hours(1)).await.unwrap());
    }

    #[tokio::test]
    async fn an_expired_session_is_renewed_and_the_statement_rerun_outside_a_transaction_only() {
        let (mut client, script) = scripted(vec![Err(expired())], later(), 3);
        client
            .execute("INSERT INTO T VALUES (1)", &[])
            .await
            .unwrap();
        assert_eq!(*script.renewals.lock().unwrap(), 1);
        assert_eq!(script.executed.lock().unwrap().len(), 2);

        let (mut client, script) = scripted(vec![Ok(()), Err(expired())], later(), 3);
        client.begin().await.unwrap();
        let err = client
            .execute("INSERT INTO T VALUES (1)", &[])
            .await
            .unwrap_err();
        assert!(err.is_session_gone(), "{err:?}");
        assert!(!client.in_transaction());
        assert_eq!(*script.renewals.lock().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn only_repeatable_statements_are_retried_and_only_as_often_as_configured() {
        let (mut client, script) = scripted(
            vec![Err(unavailable()), Err(unavailable()), Ok(())],
            later(),
            3,
        );
        client.execute("SELECT 1", &[]).await.unwrap();
        let retries: Vec<u32> = script
            .executed
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(retries, [0, 1, 2], "the retry count goes with each attempt");

        let (mut client, script) =
            scripted((0..5).map(|_| Err(unavailable())).collect(), later(), 3);
        let err = client.execute("SELECT 1", &[]).await.unwrap_err();
        assert!(matches!(
            err,
            SnowflakeError::HttpStatus { status: 503, .. }
        ));
        assert_eq!(script.executed.lock().unwrap().len(), 3);

        let (mut client, script) =
            scripted((0..5).map(|_| Err(unavailable())).collect(), later(), 3);
        client
            .execute("INSERT INTO T VALUES (1)", &[])
            .await
            .unwrap_err();
        assert_eq!(
            script.executed.lock().unwrap().len(),
            1,
            "an insert that may have been applied is not sent again"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_configured_maximum() {
        let policy = RetryPolicy {
            attempts: 10,
            max_backoff: Duration::from_secs(2),
        };
        let waits: Vec<Duration> = (1..=6).map(|a| policy.backoff(a)).collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 2000, 2000].map(Duration::from_millis)
        );
    }

    #[test]
    fn sessions_are_renewed_a_margin_before_their_token_expires() {
        assert_eq!(
            renewal_margin(Duration::from_hours(1)),
            Duration::from_mins(5)
        );
        assert_eq!(
            renewal_margin(Duration::from_mins(1)),
            Duration::from_secs(30)
        );
        assert_eq!(
            renewal_margin(Duration::from_mins(20)),
            Duration::from_mins(2)
        );
        let now = Instant::now();
        let renew_at = now + Duration::from_secs(90);
        assert!(!renewal_due(renew_at, now, Duration::ZERO));
        assert!(!renewal_due(renew_at, now, Duration::from_secs(89)));
        assert!(renewal_due(renew_at, now, Duration::from_mins(2)));
        assert!(renewal_due(
            renew_at,
            now + Duration::from_secs(90),
            Duration::ZERO
        ));
    }

    #[test]
    fn jitter_stays_within_half_and_whole_backoff() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
