//! The `quarantined_rows` table: readings a row-level rule with action `quarantine` kept out of
//! the readings table, each with the rule, what it found and the batch file it came from.
//!
//! # Invariants
//! - A `seq` of a gateway is in the readings table or in this table, never both and never
//!   twice: this table's `txn` watermark for the gateway says up to which `seq` the decision is
//!   recorded here, and it is committed *before* the readings commit that moves past the same
//!   rows. A retried pass (after a crash or a lost race) reads the decided rows back
//!   ([`QuarantinedRowsTable::quarantined_seqs`]) instead of deciding them again, so a rule that
//!   depends on the clock (`max_age`, `max_future_skew`) cannot decide a row twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType};
use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::DeltaTable;
use deltalake::kernel::Version;
use edge_agent::contract::{self, Row};
use url::Url;

use super::commit::CommitFailure;
use super::open::TableSpec;
use super::side_table::SideTable;
use super::table::DeltaError;

/// One row of the `quarantined_rows` table.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantinedRow {
    /// The reading, in the batch contract's columns.
    pub row: Row,
    /// The name of the rule that moved it here.
    pub rule: String,
    /// The rule's check: `not_null`, `finite`, `range`, `max_future_skew` or `max_age`.
    pub check: String,
    /// What the check found, for a person (`value 180 is above the range's max 150`).
    pub detail: String,
    /// The raw-zone key of the batch file the row came in.
    pub file_key: String,
    /// When the collector decided, microseconds since the epoch, UTC.
    pub quarantined_at_us: i64,
}

/// The extra columns after the contract's.
const EXTRA: [&str; 5] = ["rule", "check", "detail", "file_key", "quarantined_at"];

/// The `quarantined_rows` table's columns: batch contract v1's, then the rule, its check, the
/// detail, the file key and the time of the decision, then the columns later contract versions
/// added (`value_text`), in the order a table gets them over its life.
pub fn quarantined_rows_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        let v1 = contract::schema_of_version(1).expect("contract v1 exists");
        let mut fields: Vec<Field> = v1.fields().iter().map(|f| f.as_ref().clone()).collect();
        for name in &EXTRA[..4] {
            fields.push(Field::new(*name, DataType::Utf8, false));
        }
        fields.push(Field::new(
            EXTRA[4],
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ));
        let current = contract::schema();
        for name in ADDED {
            let field = current
                .field_with_name(name)
                .expect("added columns are contract columns");
            fields.push(field.clone());
        }
        Arc::new(Schema::new(fields))
    });
    SCHEMA.clone()
}

/// Contract columns added after the table's first release, in order.
const ADDED: [&str; 1] = [contract::column::VALUE_TEXT];

const QUARANTINED_ROWS: TableSpec = TableSpec {
    name: "quarantined_rows",
    comment: "plantline quarantined rows: readings a data-quality rule kept out of the readings table",
    schema: quarantined_rows_schema,
    added_columns: &ADDED,
};

/// The `quarantined_rows` Delta table, loaded at its latest version.
#[derive(Debug)]
pub struct QuarantinedRowsTable {
    inner: SideTable,
}

impl QuarantinedRowsTable {
    /// Opens the table at `url`, creating it if nothing is there yet.
    pub async fn open_or_create(
        url: &Url,
        storage_options: &HashMap<String, String>,
    ) -> Result<Self, DeltaError> {
        Ok(Self {
            inner: SideTable::open_or_create(url, storage_options, QUARANTINED_ROWS).await?,
        })
    }

    /// The table URL.
    pub fn url(&self) -> &Url {
        self.inner.url()
    }

    /// The loaded table version.
    pub fn version(&self) -> Option<Version> {
        self.inner.version()
    }

    /// The underlying delta-rs table.
    pub fn delta_table(&self) -> &DeltaTable {
        self.inner.delta_table()
    }

    /// Loads the newest version.
    pub async fn reload(&mut self) -> Result<(), DeltaError> {
        self.inner.reload().await
    }

    /// The highest `seq` of `gateway` whose rule decision is recorded here.
    pub async fn watermark(&self, gateway: &str) -> Result<Option<i64>, DeltaError> {
        self.inner.watermark(gateway).await
    }

    /// Appends `rows` (all of `gateway`, sorted by `seq`) and moves its watermark to
    /// `watermark`.
    pub(crate) async fn commit(
        &mut self,
        gateway: &str,
        rows: &[QuarantinedRow],
        watermark: i64,
    ) -> Result<Version, CommitFailure> {
        self.inner.commit(gateway, to_batch(rows), watermark).await
    }

    /// The `seq`s of `gateway` in `lo..=hi` this table holds: the rows an earlier (crashed or
    /// raced) attempt already moved here. Reads only the files whose statistics allow them.
    pub async fn quarantined_seqs(
        &mut self,
        gateway: &str,
        lo: i64,
        hi: i64,
    ) -> Result<BTreeSet<i64>, DeltaError> {
        let batches = self
            .inner
            .read_matching(Some(gateway), contract::column::SEQ, Some((lo, hi)))
            .await?;
        let mut seqs = BTreeSet::new();
        for batch in &batches {
            let (Some(gw), Some(seq)) = (
                batch
                    .column_by_name(contract::column::GATEWAY)
                    .and_then(|c| c.as_string_opt::<i32>()),
                batch
                    .column_by_name(contract::column::SEQ)
                    .and_then(|c| c.as_primitive_opt::<Int64Type>()),
            ) else {
                return Err(self.read_err("the `gateway` or `seq` column is missing".into()));
            };
            for i in 0..batch.num_rows() {
                let s = seq.value(i);
                if gw.value(i) == gateway && (lo..=hi).contains(&s) {
                    seqs.insert(s);
                }
            }
        }
        Ok(seqs)
    }

    /// Every row in the latest version, sorted by gateway and `seq`. For small tables (tests,
    /// summaries).
    pub async fn current_rows(&mut self) -> Result<Vec<QuarantinedRow>, DeltaError> {
        self.inner.reload().await?;
        let batches = self
            .inner
            .read_matching(None, contract::column::SEQ, None)
            .await?;
        let mut rows = Vec::new();
        for batch in &batches {
            rows.extend(from_batch(batch).map_err(|m| self.read_err(m))?);
        }
        rows.sort_by(|a, b| (&a.row.gateway, a.row.seq).cmp(&(&b.row.gateway, b.row.seq)));
        Ok(rows)
    }

    fn read_err(&self, message: String) -> DeltaError {
        DeltaError::ReadFile {
            table: self.inner.url().to_string(),
            file: "(a data file)".to_owned(),
            message,
        }
    }
}

fn to_batch(rows: &[QuarantinedRow]) -> RecordBatch {
    let readings: Vec<Row> = rows.iter().map(|r| r.row.clone()).collect();
    let contract_batch = contract::to_record_batch(&readings);
    let text = |f: fn(&QuarantinedRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut extra: HashMap<&str, ArrayRef> = HashMap::from([
        (EXTRA[0], text(|r| &r.rule)),
        (EXTRA[1], text(|r| &r.check)),
        (EXTRA[2], text(|r| &r.detail)),
        (EXTRA[3], text(|r| &r.file_key)),
        (
            EXTRA[4],
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    rows.iter().map(|r| r.quarantined_at_us),
                )
                .with_timezone("UTC"),
            ) as ArrayRef,
        ),
    ]);
    let schema = quarantined_rows_schema();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| {
            extra.remove(f.name().as_str()).unwrap_or_else(|| {
                contract_batch
                    .column_by_name(f.name())
                    .expect("every other column is a contract column")
                    .clone()
            })
        })
        .collect();
    RecordBatch::try_new(schema, columns)
        .expect("columns are built from the quarantined_rows schema, in its order")
}

fn from_batch(batch: &RecordBatch) -> Result<Vec<QuarantinedRow>, String> {
    let readings = super::table::contract_columns(batch)
        .and_then(|b| contract::rows_from_batch(&b).map_err(|e| e.to_string()))?;
    let text = |name: &str| -> Result<StringArray, String> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .cloned()
            .ok_or_else(|| format!("column `{name}` is missing or not a string"))
    };
    let (rule, check, detail, file_key) = (
        text(EXTRA[0])?,
        text(EXTRA[1])?,
        text(EXTRA[2])?,
        text(EXTRA[3])?,
    );
    let at = batch
        .column_by_name(EXTRA[4])
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .cloned()
        .ok_or("column `quarantined_at` is missing or not a timestamp")?;
    Ok(readings
        .into_iter()
        .enumerate()
        .map(|(i, row)| QuarantinedRow {
            row,
            rule: rule.value(i).to_owned(),
            check: check.value(i).to_owned(),
            detail: detail.value(i).to_owned(),
            file_key: file_key.value(i).to_owned(),
            quarantined_at_us: at.value(i),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_agent::contract::Quality;

    #[test]
    fn quarantined_rows_survive_a_round_trip_through_arrow() {
        let rows = vec![QuarantinedRow {
            row: Row {
                seq: 7,
                ts_us: 1_700_000_000_000_000,
                site: "s".into(),
                gateway: "gw-1".into(),
                device: "press-3".into(),
                tag: "oil_temp".into(),
                value: Some(f64::INFINITY),
                quality: Quality::Good,
                unit: Some("degC".into()),
                value_text: None,
            },
            rule: "finite-temps".into(),
            check: "finite".into(),
            detail: "value inf is not a finite number".into(),
            file_key: "raw/gateway=gw-1/00000000000000000001.parquet".into(),
            quarantined_at_us: 1_700_000_001_000_000,
        }];
        let batch = to_batch(&rows);
        assert_eq!(batch.schema(), quarantined_rows_schema());
        assert_eq!(from_batch(&batch).unwrap(), rows);
        // A string reading keeps its text; the column comes last, as evolution adds it.
        let mut text = rows[0].clone();
        text.row.value = None;
        text.row.value_text = Some("MIX-7".into());
        let batch = to_batch(std::slice::from_ref(&text));
        let schema = batch.schema();
        assert_eq!(
            schema.field(schema.fields().len() - 1).name(),
            contract::column::VALUE_TEXT
        );
        assert_eq!(from_batch(&batch).unwrap(), vec![text]);
    }
}
