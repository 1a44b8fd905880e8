//! `collector snowflake init`: everything a Snowflake admin needs for Plantline, as one SQL
//! script that can be printed for review or applied through [`SnowflakeClient`].
//!
//! # Invariants
//! - Every statement is idempotent (`IF NOT EXISTS`, `CREATE OR REPLACE VIEW`, `GRANT`), so the
//!   script can run again after an upgrade or a half-finished run and never drops data.
//! - Tables come from [`super::ddl`], the same definitions the loader creates on its first load.
//! - The script carries no secrets: it names the password's environment variable at most.
//! - Templates (storage integration, external stage) are printed as comments and never applied:
//!   they need an AWS role ARN only the admin knows.

use std::fmt::Write as _;

use tracing::info;

use super::client::{SnowflakeClient, SnowflakeError};
use super::config::{CONTROL_TABLE, LoadMode, SnowflakeConfig, is_plain_identifier};
use super::ddl;
use super::views;

/// The loading role when `[snowflake] role` is not set.
pub const DEFAULT_LOADER_ROLE: &str = "PLANTLINE_LOADER";
/// The read-only role for dashboards and analysts.
pub const REPORTING_ROLE: &str = "PLANTLINE_REPORTING";
/// The tags dimension table.
pub const TAGS_TABLE: &str = "PLANTLINE_TAGS";
/// The known-gaps table, unless `[snowflake] gaps_table` names another.
pub const GAPS_TABLE: &str = "PLANTLINE_GAPS";
/// The quarantined-rows table, unless `[snowflake] quarantined_rows_table` names another.
pub const QUARANTINED_ROWS_TABLE: &str = "PLANTLINE_QUARANTINED_ROWS";
/// The quarantined-files table.
pub const QUARANTINE_TABLE: &str = "PLANTLINE_QUARANTINE";
/// The storage integration in the external-stage template.
const STORAGE_INTEGRATION: &str = "PLANTLINE_S3";
/// The external stage in the template.
const DELTA_STAGE: &str = "PLANTLINE_DELTA_STAGE";

/// Why `init --apply` stopped. Statements before the failing one stay applied; running the
/// script again is safe.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("snowflake settings are not usable: {}", problems.join("; "))]
    Config { problems: Vec<String> },
    #[error("creating {object} failed (statement {index} of {total}): {source}")]
    Statement {
        object: String,
        index: usize,
        total: usize,
        #[source]
        source: Box<SnowflakeError>,
    },
}

/// What a statement does to the account, which decides who may run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// Databases, schemas, tables, views: a role like `SYSADMIN`.
    Object,
    /// Roles and grants: a role like `SECURITYADMIN`.
    AccessControl,
}

/// One statement of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitStatement {
    /// What it creates or grants, for progress lines and errors, e.g. `table PLANT.RAW.READINGS`.
    pub object: String,
    /// The SQL, without a trailing `;`.
    pub sql: String,
    /// Who may run it.
    pub kind: StatementKind,
}

/// A titled block of the script: comment lines, then statements (or a commented template).
#[derive(Debug, Clone)]
struct Section {
    title: &'static str,
    notes: Vec<String>,
    statements: Vec<InitStatement>,
    /// Printed as comments, never applied.
    template: Option<String>,
}

/// The whole script for one `[snowflake]` section.
#[derive(Debug, Clone)]
pub struct InitScript {
    header: Vec<String>,
    sections: Vec<Section>,
    /// False leaves roles and grants out of the printed and the applied script.
    access_control: bool,
}

/// `name` as Snowflake resolves it when written into SQL: plain names stay unquoted (and are
/// matched case-insensitively, as the loader's login does); anything else is double-quoted.
fn ident(name: &str) -> String {
    if is_plain_identifier(name) {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

impl InitScript {
    /// Builds the script for `cfg`; `delta_url` is the collector's `delta.url`, used for the
    /// external-stage template when it is an `s3://` location.
    // One linear builder that reads top to bottom like the script it prints; splitting it
    // would scatter the order of the SQL over several functions.
    #[allow(clippy::too_many_lines)]
    pub fn new(cfg: &SnowflakeConfig, delta_url: &str) -> Result<Self, InitError> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            return Err(InitError::Config { problems });
        }
        let db = ident(&cfg.database);
        let schema = format!("{db}.{}", ident(&cfg.schema));
        let q = |table: &str| format!("{schema}.{}", ident(table));
        let readings = q(&cfg.table_name());
        let control = q(CONTROL_TABLE);
        let tags = q(TAGS_TABLE);
        let gaps = q(&cfg.gaps_table_name());
        let quarantined_rows = q(&cfg.quarantined_rows_table_name());
        let quarantine = q(QUARANTINE_TABLE);
        let loader = ident(cfg.role.as_deref().unwrap_or(DEFAULT_LOADER_ROLE));
        // a qualified stage name stays as written; a bare one lives beside the tables
        let internal_stage = if cfg.internal_stage.contains('.') {
            cfg.internal_stage.to_ascii_uppercase()
        } else {
            q(&cfg.internal_stage)
        };
        let reporting = ident(REPORTING_ROLE);
        let object = |object: String, sql: String| InitStatement {
            object,
            sql,
            kind: StatementKind::Object,
        };
        let grant = |object: String, sql: String| InitStatement {
            object,
            sql,
            kind: StatementKind::AccessControl,
        };

        let header = vec![
            format!(
                "Plantline objects in Snowflake for database {db}, schema {schema}, readings table {readings}."
            ),
            format!(
                "Generated by `collector snowflake init` (collector {}).",
                env!("CARGO_PKG_VERSION")
            ),
            "Safe to run again: every statement is IF NOT EXISTS, CREATE OR REPLACE VIEW or GRANT; nothing is dropped.".to_owned(),
            "Run the objects as a role that may create databases (SYSADMIN) and the roles and grants as one that may manage grants (SECURITYADMIN), or all of it as ACCOUNTADMIN.".to_owned(),
        ];

        let mut sections = vec![
            Section {
                title: "Database and schema",
                notes: vec![],
                statements: vec![
                    object(
                        format!("database {db}"),
                        format!("CREATE DATABASE IF NOT EXISTS {db}"),
                    ),
                    object(
                        format!("schema {schema}"),
                        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
                    ),
                ],
                template: None,
            },
            Section {
                title: "Tables",
                notes: vec![
                    format!(
                        "{readings}: one row per reading, the batch contract's columns; unique on (GATEWAY, SEQ), which the loader enforces by inserting only new keys."
                    ),
                    format!(
                        "Clustered by ({}): dashboards filter a time range first and a gateway or tag second; the day, not the raw timestamp, keeps reclustering cheap.",
                        ddl::READINGS_CLUSTER_KEY
                    ),
                    format!(
                        "{control}: per readings table, the last Delta version loaded; moved in the same transaction as the rows."
                    ),
                    format!(
                        "{gaps}: seq ranges of a gateway that will never arrive, with the reason, unique on (GATEWAY, FIRST_SEQ); {quarantined_rows}: readings a row rule kept out, unique on (GATEWAY, SEQ, RULE). Both are loaded from their Delta tables like the readings, each with its own row in {control}."
                    ),
                    format!(
                        "{tags}: the tags dimension, each tag's site, area, line, machine, unit, data type and source as type-2 history (VALID_FROM inclusive, VALID_TO exclusive, null while in force); the loader replaces its rows with the Delta tags table's snapshot whenever that changed, in one transaction with its row in {control}."
                    ),
                    "Join a reading to its tag as it was: t.GATEWAY = r.GATEWAY AND t.DEVICE = r.DEVICE AND t.TAG = r.TAG AND r.TS >= t.VALID_FROM AND (t.VALID_TO IS NULL OR r.TS < t.VALID_TO).".to_owned(),
                    format!(
                        "{quarantine}: quarantined batch files; filled by a later collector stage."
                    ),
                    "ALTER TABLE ... ADD COLUMN IF NOT EXISTS brings tables an earlier collector created up to date; columns are only ever added, never dropped.".to_owned(),
                ],
                statements: vec![
                    object(
                        format!("table {readings}"),
                        ddl::create_readings_table(&readings),
                    ),
                    object(
                        format!("table {control}"),
                        ddl::create_control_table(&control),
                    ),
                    object(format!("table {tags}"), ddl::TAGS.create(&tags)),
                    object(format!("table {gaps}"), ddl::GAPS.create(&gaps)),
                    object(
                        format!("table {quarantined_rows}"),
                        ddl::QUARANTINED_ROWS.create(&quarantined_rows),
                    ),
                    object(
                        format!("table {quarantine}"),
                        ddl::create_quarantine_table(&quarantine),
                    ),
                ]
                .into_iter()
                .chain(
                    [
                        (&ddl::READINGS, &readings),
                        (&ddl::GAPS, &gaps),
                        (&ddl::QUARANTINED_ROWS, &quarantined_rows),
                        (&ddl::TAGS, &tags),
                    ]
                    .into_iter()
                    .flat_map(|(def, table)| {
                        def.upgrade_columns().map(move |c| {
                            object(
                                format!("column {table}.{}", c.name),
                                ddl::TableDef::add_column(table, c),
                            )
                        })
                    }),
                )
                .chain(
                    (cfg.load_mode == LoadMode::InternalStage).then(|| {
                        object(
                            format!("stage {internal_stage}"),
                            format!("CREATE STAGE IF NOT EXISTS {internal_stage} FILE_FORMAT = (TYPE = PARQUET)"),
                        )
                    }),
                )
                .collect(),
                template: None,
            },
        ];

        let all_views = views::views(&readings, &gaps);
        let view_names: Vec<String> = all_views.iter().map(|v| q(v.name)).collect();
        sections.push(Section {
            title: "Analytics views",
            notes: all_views
                .iter()
                .zip(&view_names)
                .map(|(v, name)| format!("{name}: {}.", v.purpose))
                .chain([format!(
                    "Anomaly flag: z = (VALUE - mean) / stddev over the tag's previous {} good readings, judged once at least {} are there; |z| > {} is flagged.",
                    views::ANOMALY_WINDOW,
                    views::ANOMALY_MIN_BASELINE,
                    views::ANOMALY_Z_LIMIT
                )])
                .collect(),
            statements: all_views
                .iter()
                .zip(&view_names)
                .map(|(v, name)| {
                    object(
                        format!("view {name}"),
                        format!("CREATE OR REPLACE VIEW {name} AS\n{}", v.query),
                    )
                })
                .collect(),
            template: None,
        });

        let mut loader_grants = vec![grant(
            format!("role {loader}"),
            format!("CREATE ROLE IF NOT EXISTS {loader}"),
        )];
        let mut loader_notes = vec![
            format!(
                "{loader} is what the collector logs in as ([snowflake] role); it can read and add rows, and delete the tags table's rows to replace them with a newer snapshot, but not drop or alter any table."
            ),
            "CREATE TABLE on the schema: the loader creates its session's temporary staging table, and runs CREATE TABLE IF NOT EXISTS on each load, which Snowflake checks even when the table exists. It owns no table created here.".to_owned(),
        ];
        if let Some(wh) = &cfg.warehouse {
            let wh = ident(wh);
            loader_grants.push(grant(
                format!("usage on warehouse {wh} to {loader}"),
                format!("GRANT USAGE ON WAREHOUSE {wh} TO ROLE {loader}"),
            ));
        } else {
            loader_notes.push(
                "No [snowflake] warehouse is set: grant USAGE on the user's default warehouse to this role yourself.".to_owned(),
            );
        }
        loader_grants.extend([
            grant(
                format!("usage on database {db} to {loader}"),
                format!("GRANT USAGE ON DATABASE {db} TO ROLE {loader}"),
            ),
            grant(
                format!("usage on schema {schema} to {loader}"),
                format!("GRANT USAGE, CREATE TABLE ON SCHEMA {schema} TO ROLE {loader}"),
            ),
            grant(
                format!("select, insert on {readings} to {loader}"),
                format!("GRANT SELECT, INSERT ON TABLE {readings} TO ROLE {loader}"),
            ),
            grant(
                format!("select, insert, update on {control} to {loader}"),
                format!("GRANT SELECT, INSERT, UPDATE ON TABLE {control} TO ROLE {loader}"),
            ),
        ]);
        for table in [&gaps, &quarantined_rows, &quarantine] {
            loader_grants.push(grant(
                format!("select, insert on {table} to {loader}"),
                format!("GRANT SELECT, INSERT ON TABLE {table} TO ROLE {loader}"),
            ));
        }
        // The tags load replaces the table's rows with the Delta snapshot: DELETE on this table
        // only, the others stay insert-only.
        loader_grants.push(grant(
            format!("select, insert, delete on {tags} to {loader}"),
            format!("GRANT SELECT, INSERT, DELETE ON TABLE {tags} TO ROLE {loader}"),
        ));
        if cfg.load_mode == LoadMode::InternalStage {
            // PUT needs WRITE, COPY ... PURGE needs READ and WRITE
            loader_grants.push(grant(
                format!("read, write on stage {internal_stage} to {loader}"),
                format!("GRANT READ, WRITE ON STAGE {internal_stage} TO ROLE {loader}"),
            ));
        }
        let user = ident(&cfg.user);
        loader_grants.extend([
            grant(
                format!("role {loader} to user {user}"),
                format!("GRANT ROLE {loader} TO USER {user}"),
            ),
            // Snowflake's recommended hierarchy: custom roles roll up to SYSADMIN, so admins
            // see what the role does.
            grant(
                format!("role {loader} to SYSADMIN"),
                format!("GRANT ROLE {loader} TO ROLE SYSADMIN"),
            ),
        ]);
        sections.push(Section {
            title: "Loader role (least privilege)",
            notes: loader_notes,
            statements: loader_grants,
            template: None,
        });

        let mut reporting_grants = vec![
            grant(
                format!("role {reporting}"),
                format!("CREATE ROLE IF NOT EXISTS {reporting}"),
            ),
            grant(
                format!("usage on database {db} to {reporting}"),
                format!("GRANT USAGE ON DATABASE {db} TO ROLE {reporting}"),
            ),
            grant(
                format!("usage on schema {schema} to {reporting}"),
                format!("GRANT USAGE ON SCHEMA {schema} TO ROLE {reporting}"),
            ),
        ];
        for table in [&readings, &tags, &gaps, &quarantined_rows] {
            reporting_grants.push(grant(
                format!("select on {table} to {reporting}"),
                format!("GRANT SELECT ON TABLE {table} TO ROLE {reporting}"),
            ));
        }
        for view in &view_names {
            reporting_grants.push(grant(
                format!("select on {view} to {reporting}"),
                format!("GRANT SELECT ON VIEW {view} TO ROLE {reporting}"),
            ));
        }
        reporting_grants.push(grant(
            format!("role {reporting} to SYSADMIN"),
            format!("GRANT ROLE {reporting} TO ROLE SYSADMIN"),
        ));
        sections.push(Section {
            title: "Reporting role (read only, for PowerBI, Tableau and analysts)",
            notes: vec![
                format!(
                    "Grant {reporting} to the BI service user and to analysts: GRANT ROLE {reporting} TO USER <bi_user>;"
                ),
                format!(
                    "Give it a warehouse of its own so dashboards never queue behind loads: GRANT USAGE ON WAREHOUSE <bi_warehouse> TO ROLE {reporting};"
                ),
            ],
            statements: reporting_grants,
            template: None,
        });

        sections.push(Section {
            title: "Template: storage integration and external stage over the Delta table",
            notes: vec![
                "Not applied by --apply: fill in the AWS role ARN, run it as ACCOUNTADMIN, then DESC INTEGRATION to get the IAM user ARN and external id for the role's trust policy.".to_owned(),
                "The AWS role needs s3:GetObject, s3:GetObjectVersion on the table's objects and s3:ListBucket on its bucket with that prefix; nothing else.".to_owned(),
            ],
            statements: vec![],
            template: Some(stage_template(delta_url, &schema, &loader)),
        });

        Ok(Self {
            header,
            sections,
            access_control: true,
        })
    }

    /// With `skip` true, leaves roles and grants out of [`Self::render`] and [`Self::apply`],
    /// for accounts where a security admin applies them separately.
    #[must_use]
    pub fn without_access_control(mut self, skip: bool) -> Self {
        self.access_control = !skip;
        self
    }

    /// The statements [`Self::apply`] runs, in order.
    pub fn statements(&self) -> Vec<&InitStatement> {
        self.sections()
            .flat_map(|s| &s.statements)
            .filter(|s| self.access_control || s.kind == StatementKind::Object)
            .collect()
    }

    /// The sections to print: a section made only of grants goes when access control is off.
    fn sections(&self) -> impl Iterator<Item = &Section> {
        self.sections.iter().filter(|s| {
            self.access_control
                || s.statements.is_empty()
                || s.statements
                    .iter()
                    .any(|st| st.kind == StatementKind::Object)
        })
    }

    /// The script as an admin reads it: comments explain each block, every statement ends in `;`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.header {
            let _ = writeln!(out, "-- {line}");
        }
        for section in self.sections() {
            let _ = writeln!(out, "\n-- ==== {} ====", section.title);
            for note in &section.notes {
                let _ = writeln!(out, "-- {note}");
            }
            for statement in &section.statements {
                let _ = writeln!(out, "{};", statement.sql);
            }
            if let Some(template) = &section.template {
                for line in template.lines() {
                    let _ = writeln!(out, "-- {line}");
                }
            }
        }
        out
    }

    /// Runs [`Self::statements`] one by one through `client`, in autocommit (Snowflake commits
    /// DDL implicitly anyway), and returns the objects applied.
    pub async fn apply(&self, client: &mut SnowflakeClient) -> Result<Vec<String>, InitError> {
        let statements = self.statements();
        let total = statements.len();
        let mut applied = Vec::with_capacity(total);
        for (i, statement) in statements.into_iter().enumerate() {
            client
                .execute(&statement.sql, &[])
                .await
                .map_err(|source| InitError::Statement {
                    object: statement.object.clone(),
                    index: i + 1,
                    total,
                    source: Box::new(source),
                })?;
            info!(component = "snowflake", object = %statement.object, "applied");
            applied.push(statement.object.clone());
        }
        Ok(applied)
    }
}

/// The storage integration and external stage, as text to be commented out.
fn stage_template(delta_url: &str, schema: &str, loader: &str) -> String {
    let location = if delta_url.starts_with("s3://") {
        format!("{}/", delta_url.trim_end_matches('/'))
    } else {
        "s3://<bucket>/<path-to-the-delta-table>/".to_owned()
    };
    let mut t = String::new();
    if !delta_url.starts_with("s3://") {
        let _ = writeln!(
            t,
            "delta.url is not an s3:// location; put the table's S3 location below."
        );
    }
    let _ = writeln!(
        t,
        "CREATE STORAGE INTEGRATION IF NOT EXISTS {STORAGE_INTEGRATION}"
    );
    let _ = writeln!(
        t,
        "  TYPE = EXTERNAL_STAGE STORAGE_PROVIDER = 'S3' ENABLED = TRUE"
    );
    let _ = writeln!(
        t,
        "  STORAGE_AWS_ROLE_ARN = 'arn:aws:iam::<aws-account-id>:role/<snowflake-delta-reader>'"
    );
    let _ = writeln!(t, "  STORAGE_ALLOWED_LOCATIONS = ('{location}');");
    let _ = writeln!(t, "DESC INTEGRATION {STORAGE_INTEGRATION};");
    let _ = writeln!(
        t,
        "GRANT USAGE ON INTEGRATION {STORAGE_INTEGRATION} TO ROLE SYSADMIN;"
    );
    let _ = writeln!(t, "CREATE STAGE IF NOT EXISTS {schema}.{DELTA_STAGE}");
    let _ = writeln!(t, "  URL = '{location}'");
    let _ = writeln!(t, "  STORAGE_INTEGRATION = {STORAGE_INTEGRATION}");
    let _ = writeln!(t, "  FILE_FORMAT = (TYPE = PARQUET);");
    let _ = write!(
        t,
        "GRANT USAGE ON STAGE {schema}.{DELTA_STAGE} TO ROLE {loader};"
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> SnowflakeConfig {
        toml::from_str(&format!(
            r#"
                url = "https://acme.snowflakecomputing.com"
                account = "acme"
                user = "loader@acme.example"
                password_env = "PW"
                database = "PLANT"
                schema = "RAW"
                {extra}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn names_that_are_not_plain_identifiers_are_quoted() {
        assert_eq!(ident("PLANT"), "PLANT");
        assert_eq!(ident("loader@acme.example"), "\"loader@acme.example\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        let script = InitScript::new(&cfg(""), "s3://lake/readings").unwrap();
        assert!(
            script
                .render()
                .contains("GRANT ROLE PLANTLINE_LOADER TO USER \"loader@acme.example\";")
        );
    }

    #[test]
    fn without_a_warehouse_the_script_says_which_grant_is_left_to_the_admin() {
        let script = InitScript::new(&cfg(""), "/data/lake").unwrap();
        let text = script.render();
        assert!(text.contains("-- No [snowflake] warehouse is set: grant USAGE on the user's default warehouse to this role yourself.\n"));
        assert!(!text.contains("ON WAREHOUSE PLANT"));
        assert!(text.contains(
            "-- delta.url is not an s3:// location; put the table's S3 location below.\n"
        ));
        assert!(text.contains("--   URL = 's3://<bucket>/<path-to-the-delta-table>/'\n"));
    }

    #[test]
    fn the_internal_stage_mode_gets_its_stage_and_the_loader_may_put_into_it() {
        let script = InitScript::new(&cfg("load_mode = \"internal_stage\""), "s3://l/t").unwrap();
        let sql: Vec<&str> = script.statements().iter().map(|s| s.sql.as_str()).collect();
        assert!(sql.contains(
            &"CREATE STAGE IF NOT EXISTS PLANT.RAW.PLANTLINE_LOAD_STAGE FILE_FORMAT = (TYPE = PARQUET)"
        ));
        assert!(sql.contains(
            &"GRANT READ, WRITE ON STAGE PLANT.RAW.PLANTLINE_LOAD_STAGE TO ROLE PLANTLINE_LOADER"
        ));
        let rows = InitScript::new(&cfg(""), "s3://l/t").unwrap();
        assert!(!rows.render().contains("PLANTLINE_LOAD_STAGE"));
    }

    #[test]
    fn access_control_can_be_left_out_of_the_applied_statements() {
        let script = InitScript::new(&cfg("warehouse = \"LOAD_WH\""), "s3://l/t").unwrap();
        let all = script.clone().statements().len();
        let script = script.without_access_control(true);
        let objects = script.statements();
        assert_eq!(
            objects.len(),
            23,
            "database, schema, 6 tables, 10 added columns, 5 views"
        );
        assert!(objects.iter().all(|s| s.kind == StatementKind::Object));
        assert_eq!(
            all,
            23 + 13 + 12,
            "23 objects, 13 loader and 12 reporting grants"
        );
        let text = script.render();
        assert!(!text.lines().any(|l| l.starts_with("GRANT")), "{text}");
        assert!(!text.contains("-- ==== Loader role"), "{text}");
    }

    #[test]
    fn unusable_settings_are_refused_with_every_problem() {
        let mut bad = cfg("");
        bad.table = "x y".into();
        let err = InitScript::new(&bad, "s3://l/t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "snowflake settings are not usable: snowflake.table: `x y` is not a plain SQL identifier; use letters, digits, `_` and `$`, starting with a letter or `_`"
        );
    }
}
