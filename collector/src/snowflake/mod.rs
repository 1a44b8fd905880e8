//! Loading Snowflake from the Delta tables, exactly once: the readings table, the two
//! data-quality tables beside it (gaps, quarantined rows) and the tags dimension.
//!
//! # Invariants
//! - Each loaded table holds at most one row per merge key: (`GATEWAY`, `SEQ`) for readings,
//!   (`GATEWAY`, `FIRST_SEQ`) for gaps, (`GATEWAY`, `SEQ`, `RULE`) for quarantined rows. Rows are
//!   inserted only when no row with the same key exists, so replaying a Delta version changes
//!   nothing.
//! - `PLANTLINE_TAGS` holds exactly the rows of one snapshot of the Delta tags table: the one
//!   at its watermark. A newer snapshot replaces every row (`DELETE`, then `INSERT`) in the
//!   transaction that moves the watermark, because closing a tag's row rewrites it in Delta.
//! - `PLANTLINE_LOAD_CONTROL.LAST_VERSION` for a table is the last version of its Delta table
//!   whose added files are all in it (for the tags table: whose snapshot it holds). It changes
//!   in the same Snowflake transaction as the rows of the versions it covers, and only if it
//!   still holds the value the loader read first, so two loaders never apply the same versions
//!   concurrently.
//! - Only files added with `dataChange = true` carry new rows; files rewritten by `OPTIMIZE`
//!   (`dataChange = false`) are skipped.
//! - A failed transaction is retried whole, in a new session, after the watermark showed it was
//!   not applied; a `COMMIT` whose answer was lost is never run twice.
//! - Columns are only added to a Snowflake table (nullable), never dropped or retyped.
//! - Secrets (password, private key and its passphrase, OAuth token) are read from the
//!   environment or files at each login and never logged or printed.

mod auth;
mod client;
mod config;
mod ddl;
mod init;
mod loader;
mod s3_stage;
mod stage;
pub mod views;

pub use auth::{
    AuthError, Authenticator, Credentials, JWT_LIFETIME, JWT_MAX_LIFETIME, KeyPair, Secret,
    SecretSource, jwt_account, public_key_fingerprint,
};
pub use client::{
    BindValue, ColumnInfo, ConnectorTransport, QueryResult, RetryPolicy, Rowset, SnowflakeClient,
    SnowflakeError, StatementRequest, Transport, TransportFuture, UploadTarget,
};
pub use config::{CONTROL_TABLE, LoadMode, SessionParameter, SnowflakeConfig};
pub use ddl::READINGS_CLUSTER_KEY;
pub use init::{
    DEFAULT_LOADER_ROLE, GAPS_TABLE, InitError, InitScript, InitStatement, QUARANTINE_TABLE,
    QUARANTINED_ROWS_TABLE, REPORTING_ROLE, StatementKind, TAGS_TABLE,
};
pub use loader::{LoadError, LoadReport, load, load_tables};
pub use s3_stage::{
    EncryptedFile, EncryptionMaterial, StageCredentials, StageUploadError, encrypt_for_stage,
    upload_to_s3_stage,
};
