//! Parquet encoding of a batch, per the batch contract (`crate::contract`).

use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::contract::{self, CONTRACT_VERSION, Gap, Row, metadata};

/// Encodes rows (sorted by `seq`, one gateway) as a Parquet file, with the gap records the
/// batch carries in its `plantline.gaps` metadata (left out when there are none). The bytes
/// depend only on the rows, the gaps and this binary's version, so re-encoding a retried batch
/// gives identical bytes.
pub fn encode(rows: &[Row], gaps: &[Gap]) -> Result<Bytes, parquet::errors::ParquetError> {
    let batch = contract::to_record_batch(rows);
    let mut kv = vec![KeyValue::new(
        metadata::CONTRACT_VERSION.to_owned(),
        CONTRACT_VERSION.to_string(),
    )];
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        kv.push(KeyValue::new(
            metadata::GATEWAY.to_owned(),
            first.gateway.clone(),
        ));
        kv.push(KeyValue::new(
            metadata::FIRST_SEQ.to_owned(),
            first.seq.to_string(),
        ));
        kv.push(KeyValue::new(
            metadata::LAST_SEQ.to_owned(),
            last.seq.to_string(),
        ));
    }
    if !gaps.is_empty() {
        kv.push(KeyValue::new(
            metadata::GAPS.to_owned(),
            contract::gaps_to_json(gaps),
        ));
    }
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("3 is inside zstd's level range 1..=22"),
        ))
        .set_dictionary_enabled(true)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(rows.len().max(1)))
        .set_created_by(format!(
            "plantline edge-agent {}",
            env!("CARGO_PKG_VERSION")
        ))
        .set_key_value_metadata(Some(kv))
        .build();
    let mut out = Vec::with_capacity(rows.len() * 16 + 1024);
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(out))
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
        assert_eq!(kv[metadata::CONTRACT_VERSION], "1");
        assert_eq!(kv[metadata::GATEWAY], "gw-1");
        assert_eq!(kv[metadata::FIRST_SEQ], "1");
        assert_eq!(kv[metadata::LAST_SEQ], "100");
        assert_eq!(
            kv[metadata::GAPS],
            r#"[{"first_seq":101,"last_seq":250,"readings":150,"reason":"buffer_full","detected_at_us":1700000100000000}]"#
        );
        let col = builder.metadata().row_group(0).column(0);
        assert!(matches!(col.compression(), Compression::ZSTD(_)));
    }
}
