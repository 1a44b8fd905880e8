//! Parquet encoding of a batch, per the batch contract (`crate::contract`).
//!
//! Every column is dictionary-encoded (the writer falls back to plain pages only when a
//! column chunk's dictionary grows past the default 1 MiB page limit): device, tag, unit and the
//! few texts a string tag cycles through (`value_text`, contract v2) repeat all through a batch.

use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::contract::{self, Gap, Lane, Row, column, metadata};

/// Rows handed to the Parquet writer at a time. A batch is read from the buffer and encoded in
/// slices of this many rows, so the agent's memory holds one slice as rows and Arrow arrays plus
/// the batch's compressed pages, not the whole batch three times over (rows, arrays, pages): at
/// the default `batch.max_rows` of 50,000 that is the difference between a few MB and about
/// 30 MB at every cut. The slicing decides where the writer checks its page limits, so every
/// encoder of a batch uses this one size and a retried batch keeps its bytes.
pub const ENCODE_CHUNK_ROWS: usize = 4096;

/// Encodes rows (sorted by `seq`, one gateway) as a Parquet file, with the gap records the
/// batch carries in its `plantline.gaps` metadata (left out when there are none). The bytes
/// depend only on the rows, the gaps and this binary's version, so re-encoding a retried batch
/// gives identical bytes; they equal those of [`BatchEncoder`] fed the same rows. A main-lane
/// batch; see [`encode_lane`] for the fresh lane.
pub fn encode(rows: &[Row], gaps: &[Gap]) -> Result<Bytes, parquet::errors::ParquetError> {
    encode_lane(rows, gaps, Lane::Main)
}

/// [`encode`] for a batch of `lane`. A fresh-lane file names contract v3 and carries
/// `plantline.lane = fresh`; it never carries gap records (they ride the main lane only), so
/// `gaps` must be empty for it. A main-lane file is exactly what [`encode`] writes.
pub fn encode_lane(
    rows: &[Row],
    gaps: &[Gap],
    lane: Lane,
) -> Result<Bytes, parquet::errors::ParquetError> {
    let mut encoder = BatchEncoder::for_lane(rows.len(), lane)?;
    for chunk in rows.chunks(ENCODE_CHUNK_ROWS) {
        encoder.write(chunk)?;
    }
    encoder.finish(gaps)
}

/// Encodes one batch file from slices of rows, in `seq` order, of at most
/// [`ENCODE_CHUNK_ROWS`] each (all but the last exactly that many, or the bytes differ from
/// [`encode`]'s). The whole batch is one row group, as the contract says; what the writer keeps
/// of it until [`BatchEncoder::finish`] is its compressed pages.
pub struct BatchEncoder {
    writer: ArrowWriter<Vec<u8>>,
    gateway: Option<String>,
    first_seq: Option<i64>,
    last_seq: i64,
    lane: Lane,
}

impl BatchEncoder {
    /// An encoder of a main-lane batch. `expected_rows` only sizes the output buffer.
    pub fn new(expected_rows: usize) -> Result<Self, parquet::errors::ParquetError> {
        Self::for_lane(expected_rows, Lane::Main)
    }

    /// An encoder of a batch of `lane`: the same encoding, with the lane's contract version and
    /// (fresh lane) its `plantline.lane` entry in the footer.
    pub fn for_lane(
        expected_rows: usize,
        lane: Lane,
    ) -> Result<Self, parquet::errors::ParquetError> {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).expect("3 is inside zstd's level range 1..=22"),
            ))
            .set_dictionary_enabled(true)
            // Already on through the line above; named so a later change of the default for all
            // columns cannot silently turn it off for the texts of string tags.
            .set_column_dictionary_enabled(ColumnPath::from(column::VALUE_TEXT), true)
            .set_statistics_enabled(EnabledStatistics::Chunk)
            // One row group per batch (batch contract); the batch's size is bounded by
            // `batch.max_rows`, so the writer needs no bound of its own.
            .set_max_row_group_row_count(None)
            .set_created_by(format!(
                "plantline edge-agent {}",
                env!("CARGO_PKG_VERSION")
            ))
            .set_key_value_metadata(Some(vec![KeyValue::new(
                metadata::CONTRACT_VERSION.to_owned(),
                lane.contract_version().to_string(),
            )]))
            .build();
        // About what zstd makes of a reading; a larger batch grows the buffer as it goes.
        let out = Vec::with_capacity(expected_rows.min(1 << 20) * 16 + 1024);
        Ok(Self {
            writer: ArrowWriter::try_new(out, contract::schema(), Some(props))?,
            gateway: None,
            first_seq: None,
            last_seq: 0,
            lane,
        })
    }

    /// Encodes the next slice of the batch.
    pub fn write(&mut self, rows: &[Row]) -> Result<(), parquet::errors::ParquetError> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(());
        };
        if self.first_seq.is_none() {
            self.first_seq = Some(first.seq);
            self.gateway = Some(first.gateway.clone());
        }
        self.last_seq = last.seq;
        self.writer.write(&contract::to_record_batch(rows))
    }

    /// Writes the footer, with the batch's ends, its lane (fresh lane only) and its gap records
    /// (left out when there are none), and returns the file.
    pub fn finish(mut self, gaps: &[Gap]) -> Result<Bytes, parquet::errors::ParquetError> {
        debug_assert!(
            gaps.is_empty() || self.lane == Lane::Main,
            "gap records ride the main lane only"
        );
        if let (Some(gateway), Some(first_seq)) = (self.gateway.take(), self.first_seq) {
            for (key, value) in [
                (metadata::GATEWAY, gateway),
                (metadata::FIRST_SEQ, first_seq.to_string()),
                (metadata::LAST_SEQ, self.last_seq.to_string()),
            ] {
                self.writer
                    .append_key_value_metadata(KeyValue::new(key.to_owned(), value));
            }
        }
        if let Some(lane) = self.lane.metadata_value() {
            self.writer.append_key_value_metadata(KeyValue::new(
                metadata::LANE.to_owned(),
                lane.to_owned(),
            ));
        }
        if !gaps.is_empty() {
            self.writer.append_key_value_metadata(KeyValue::new(
                metadata::GAPS.to_owned(),
                contract::gaps_to_json(gaps),
            ));
        }
        Ok(Bytes::from(self.writer.into_inner()?))
    }
}

/// Reads the gap records of a batch file (empty when it has no `plantline.gaps` metadata).
pub fn read_gaps(bytes: Bytes) -> Result<Vec<Gap>, String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| e.to_string())?;
    let value = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == metadata::GAPS))
        .and_then(|kv| kv.value.clone());
    match value {
        Some(text) => contract::gaps_from_json(&text).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}

/// Reads a batch file back into rows, checking it against the contract.
pub fn read_rows(bytes: Bytes) -> Result<Vec<Row>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| e.to_string())?
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        rows.extend(contract::rows_from_batch(&batch).map_err(|e| e.to_string())?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Quality;

    fn rows() -> Vec<Row> {
        (1..=100)
            .map(|seq| Row {
                seq,
                ts_us: 1_700_000_000_000_000 + seq * 1_000_000,
                site: "plant-a".into(),
                gateway: "gw-1".into(),
                device: "press-3".into(),
                tag: if seq % 2 == 0 { "oil_temp" } else { "pressure" }.into(),
                value: (seq % 10 != 0).then_some(seq as f64 / 4.0),
                quality: if seq % 10 == 0 {
                    Quality::Bad
                } else {
                    Quality::Good
                },
                unit: Some("bar".into()),
                value_text: None,
            })
            .collect()
    }

    fn gaps() -> Vec<Gap> {
        vec![Gap {
            first_seq: 101,
            last_seq: 250,
            readings: 150,
            reason: crate::contract::GapReason::BufferFull,
            detected_at_us: 1_700_000_100_000_000,
        }]
    }

    #[test]
    fn encoding_is_deterministic_and_round_trips() {
        let rows = rows();
        let a = encode(&rows, &gaps()).unwrap();
        let b = encode(&rows, &gaps()).unwrap();
        assert_eq!(a, b, "a retried batch must have identical bytes");
        assert_eq!(read_rows(a.clone()).unwrap(), rows);
        assert_eq!(read_gaps(a).unwrap(), gaps());
        assert_eq!(read_gaps(encode(&rows, &[]).unwrap()).unwrap(), []);
    }

    /// Numbers and the texts of a string tag that cycles through two recipes, with a bad read.
    fn mixed_rows() -> Vec<Row> {
        let mut rows = rows();
        for seq in 101..=160 {
            let bad = seq == 130;
            rows.push(Row {
                seq,
                tag: "recipe".into(),
                value: None,
                value_text: (!bad)
                    .then(|| if seq < 140 { "MIX-7" } else { "MIX-8 (night)" }.into()),
                quality: if bad { Quality::Bad } else { Quality::Good },
                unit: None,
                ..rows[0].clone()
            });
        }
        rows
    }

    #[test]
    fn string_readings_round_trip_in_a_dictionary_encoded_value_text_column() {
        let rows = mixed_rows();
        let a = encode(&rows, &[]).unwrap();
        assert_eq!(
            a,
            encode(&rows, &[]).unwrap(),
            "retries stay byte-identical"
        );
        assert_eq!(read_rows(a.clone()).unwrap(), rows);
        let builder = ParquetRecordBatchReaderBuilder::try_new(a).unwrap();
        let schema = builder.schema().clone();
        assert_eq!(schema.fields(), contract::schema().fields());
        let group = builder.metadata().row_group(0);
        let index = group
            .columns()
            .iter()
            .position(|c| c.column_path().string() == column::VALUE_TEXT)
            .unwrap();
        let chunk = group.column(index);
        assert!(
            chunk.dictionary_page_offset().is_some(),
            "value_text has a dictionary page"
        );
        assert!(
            chunk
                .encodings()
                .any(|e| e == parquet::basic::Encoding::RLE_DICTIONARY),
            "{:?}",
            chunk.encodings().collect::<Vec<_>>()
        );
    }

    #[test]
    fn file_carries_contract_metadata_and_zstd() {
        let bytes = encode(&rows(), &gaps()).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        let meta = builder.metadata().file_metadata();
        let kv: std::collections::HashMap<_, _> = meta
            .key_value_metadata()
            .unwrap()
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
            .collect();
        assert_eq!(kv[metadata::CONTRACT_VERSION], "2");
        assert_eq!(kv[metadata::GATEWAY], "gw-1");
        assert_eq!(kv[metadata::FIRST_SEQ], "1");
        assert_eq!(kv[metadata::LAST_SEQ], "100");
        assert_eq!(
            kv[metadata::GAPS],
            r#"[{"first_seq":101,"last_seq":250,"readings":150,"reason":"buffer_full","detected_at_us":1700000100000000}]"#
        );
        assert!(
            !kv.contains_key(metadata::LANE),
            "a main-lane file names no lane"
        );
        let col = builder.metadata().row_group(0).column(0);
        assert!(matches!(col.compression(), Compression::ZSTD(_)));
    }

    fn footer(bytes: Bytes) -> std::collections::BTreeMap<String, String> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
            .collect()
    }

    #[test]
    fn a_fresh_lane_file_names_v3_and_its_lane_and_carries_no_gaps() {
        let rows = rows();
        let fresh = encode_lane(&rows, &[], Lane::Fresh).unwrap();
        assert_eq!(fresh, encode_lane(&rows, &[], Lane::Fresh).unwrap());
        assert_eq!(read_rows(fresh.clone()).unwrap(), rows);
        let kv = footer(fresh);
        assert_eq!(
            kv.into_iter()
                .filter(|(k, _)| k.starts_with("plantline."))
                .collect::<Vec<_>>(),
            [
                (metadata::CONTRACT_VERSION, "3"),
                (metadata::FIRST_SEQ, "1"),
                (metadata::GATEWAY, "gw-1"),
                (metadata::LANE, "fresh"),
                (metadata::LAST_SEQ, "100"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        // The main lane is what it always was: `encode` and the main-lane encoder agree.
        assert_eq!(
            encode(&rows, &gaps()).unwrap(),
            encode_lane(&rows, &gaps(), Lane::Main).unwrap()
        );
        assert_eq!(
            footer(encode(&rows, &[]).unwrap())[metadata::CONTRACT_VERSION],
            "2"
        );
    }
}
