//! A small Snowflake client speaking the drivers' REST protocol (the one the official Python,
//! JDBC and Go drivers use): `login-request` for a session token, then one `query-request` per
//! statement.
//!
//! A session keeps its state on the server between requests, so `BEGIN` ... `COMMIT` sent as
//! separate statements form one transaction, and temporary tables live as long as the session.
//!
//! The HTTP protocol sits behind [`Transport`], so another protocol (the SQL API v2) can be
//! added without touching callers. [`SnowflakeClient`] adds what every protocol needs on top:
//! retries with backoff for statements that are safe to repeat, and transaction bookkeeping.

use std::fmt;
use std::future::Future;
use std::io::Cursor;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, Int16Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{ArrowError, DataType};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

use super::config::{Password, SnowflakeConfig};

/// How much of a statement's SQL an error message carries.
const SQL_IN_ERRORS: usize = 200;
/// Attempts for a statement that may be repeated (the first try included).
const MAX_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Snowflake answers with these codes while a statement is still running; the result is then
/// fetched from `getResultUrl`.
const STILL_RUNNING: [&str; 2] = ["333333", "333334"];
/// Codes meaning the session token is no longer valid and a new login is needed.
const SESSION_GONE: [&str; 3] = ["390104", "390112", "390114"];

/// Everything that can go wrong talking to Snowflake.
#[derive(Debug, thiserror::Error)]
pub enum SnowflakeError {
    #[error(
        "the Snowflake password is not set: export it in the environment variable `{env}` (named by snowflake.password_env)"
    )]
    MissingPassword { env: String },
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

    /// True when repeating the same request may succeed: timeouts, broken connections, 5xx and
    /// 429 answers.
    fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Http { source, .. } => source.is_connect() || source.is_request(),
            Self::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
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
    /// The SQL that produced this result, shortened, for error messages.
    sql: String,
}

impl QueryResult {
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
}

/// The drivers' REST protocol: `/session/v1/login-request` and `/queries/v1/query-request`.
#[derive(Debug)]
pub struct ConnectorTransport {
    http: reqwest::Client,
    base: String,
    account: String,
    user: String,
    password: Password,
    database: String,
    schema: String,
    warehouse: Option<String>,
    role: Option<String>,
    timeout: Duration,
    token: Mutex<String>,
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
}

impl ConnectorTransport {
    /// Logs in and returns a transport bound to the new session.
    ///
    /// The password comes from `password`, not from [`SnowflakeConfig::password_env`]: use
    /// this when the secret is fetched from elsewhere (a secret manager).
    pub async fn login(cfg: &SnowflakeConfig, password: String) -> Result<Self, SnowflakeError> {
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
            password: Password::new(password),
            database: cfg.database.clone(),
            schema: cfg.schema.clone(),
            warehouse: cfg.warehouse.clone(),
            role: cfg.role.clone(),
            timeout: cfg.request_timeout,
            token: Mutex::new(String::new()),
        };
        transport.new_session().await?;
        Ok(transport)
    }

    async fn new_session(&self) -> Result<(), SnowflakeError> {
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
        let body = json!({"data": {
            "CLIENT_APP_ID": "plantline-collector",
            "CLIENT_APP_VERSION": env!("CARGO_PKG_VERSION"),
            "ACCOUNT_NAME": self.account,
            "LOGIN_NAME": self.user,
            "PASSWORD": self.password.expose(),
            "SESSION_PARAMETERS": {"AUTOCOMMIT": true, "TIMEZONE": "UTC"},
        }});
        let request = self
            .http
            .post(format!("{}{endpoint}", self.base))
            .query(&query)
            .header(reqwest::header::ACCEPT, "application/snowflake")
            .json(&body);
        let envelope = self.send(endpoint, request).await?;
        let token = envelope
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(Value::as_str)
            .filter(|_| envelope.success);
        match token {
            Some(token) => {
                token.clone_into(
                    &mut self
                        .token
                        .lock()
                        .expect("the token lock is never held across a panic"),
                );
                debug!(component = "snowflake", account = %self.account, "logged in");
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
        let token = self
            .token
            .lock()
            .expect("the token lock is never held across a panic");
        format!("Snowflake Token=\"{token}\"")
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

    fn renew_session(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<(), SnowflakeError>> + Send + '_>> {
        Box::pin(self.new_session())
    }
}

/// Statements that change nothing when repeated, so a retry after a lost answer is safe.
fn is_idempotent(sql: &str) -> bool {
    let upper = sql.trim_start().to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or_default();
    match first {
        "SELECT" | "SHOW" | "DESCRIBE" | "DESC" | "USE" | "ROLLBACK" => true,
        "CREATE" => upper.contains(" IF NOT EXISTS "),
        _ => false,
    }
}

/// A Snowflake session with retries and transaction bookkeeping.
#[derive(Debug)]
pub struct SnowflakeClient {
    transport: Box<dyn Transport>,
    in_transaction: bool,
}

impl SnowflakeClient {
    /// Logs in with the driver protocol, with the password read from the environment
    /// variable named by [`SnowflakeConfig::password_env`].
    pub async fn login(cfg: &SnowflakeConfig) -> Result<Self, SnowflakeError> {
        let password = std::env::var(&cfg.password_env)
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| SnowflakeError::MissingPassword {
                env: cfg.password_env.clone(),
            })?;
        Self::login_with_password(cfg, password).await
    }

    /// Logs in with the driver protocol and a password obtained by the caller.
    pub async fn login_with_password(
        cfg: &SnowflakeConfig,
        password: String,
    ) -> Result<Self, SnowflakeError> {
        let transport = ConnectorTransport::login(cfg, password).await?;
        Ok(Self::with_transport(Box::new(transport)))
    }

    /// Wraps an already logged-in transport.
    pub fn with_transport(transport: Box<dyn Transport>) -> Self {
        Self {
            transport,
            in_transaction: false,
        }
    }

    /// True between [`SnowflakeClient::begin`] and [`SnowflakeClient::commit`] or
    /// [`SnowflakeClient::rollback`].
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Runs one statement with `?` placeholders bound in order.
    ///
    /// Statements that are safe to repeat (queries, `CREATE ... IF NOT EXISTS`) are retried
    /// with capped exponential backoff after timeouts, broken connections and 5xx answers;
    /// others fail on the first such error, because the first attempt may have been applied.
    /// An expired session is renewed and the statement re-run, unless a transaction was open.
    pub async fn execute(
        &mut self,
        sql: &str,
        bindings: &[BindValue],
    ) -> Result<QueryResult, SnowflakeError> {
        let idempotent = is_idempotent(sql);
        let request_id = uuid::Uuid::new_v4();
        let mut backoff = FIRST_BACKOFF;
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            let request = StatementRequest {
                sql,
                bindings,
                request_id,
                retry_count: attempt,
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
                Err(e) if idempotent && e.is_transient() && attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    let wait = jittered(backoff);
                    warn!(component = "snowflake", error = %e, attempt, ?wait, "retrying statement");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
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

    /// Rolls the open transaction back.
    pub async fn rollback(&mut self) -> Result<(), SnowflakeError> {
        let result = self.execute("ROLLBACK", &[]).await;
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
