//! The record format on the stream and how records are packed into PutRecords calls.
//!
//! A record's data is JSON lines: one compact JSON object per reading, each ending in `\n`,
//! all of one device, in `seq` order:
//!
//! ```text
//! {"gateway":"gw-line1","seq":12,"device":"press-3","tag":"oil_temp","ts":1700000000001000,"value":123.5,"quality":"good","unit":"degC"}
//! ```
//!
//! `ts` is the reading's time in microseconds since the Unix epoch (UTC), as in the batches;
//! `value` is `null` when `quality` is `bad`; `unit` is `null` when the tag has none. A string
//! tag's reading has `value` `null` and one more key at the end, `"value_text"` with its text
//! (batch contract v2); numeric readings leave the key out. The partition key is the device
//! name, so one device's records stay on one shard in order.

use serde::Serialize;

use super::LiveReading;

/// PutRecords accepts at most this many records per call.
pub const MAX_RECORDS_PER_CALL: usize = 500;
/// PutRecords accepts at most this many bytes (data plus partition keys) per call.
pub const MAX_CALL_BYTES: usize = 5 * 1024 * 1024;
/// One record's data plus its partition key may be at most this many bytes.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// One Kinesis record: several readings of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The device name.
    pub partition_key: String,
    /// JSON lines, one per reading.
    pub data: Vec<u8>,
    /// How many readings `data` holds.
    pub readings: usize,
}

impl Record {
    /// What the record counts against the service limits.
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

#[derive(Serialize)]
struct Line<'a> {
    gateway: &'a str,
    seq: i64,
    device: &'a str,
    tag: &'a str,
    ts: i64,
    value: Option<f64>,
    quality: &'a str,
    unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_text: Option<&'a str>,
}

/// Packs readings into records: grouped by device (devices in order of first appearance),
/// readings in the order given, each record as full as [`MAX_RECORD_BYTES`] allows.
pub fn encode(gateway: &str, readings: &[LiveReading]) -> Vec<Record> {
    let mut records: Vec<Record> = Vec::new();
    // Index of each device's open record in `records`.
    let mut open: Vec<(&str, usize)> = Vec::new();
    for live in readings {
        let r = &live.reading;
        let mut line = serde_json::to_vec(&Line {
            gateway,
            seq: live.seq,
            device: &r.device,
            tag: &r.tag,
            ts: r.ts_us,
            value: r.value.filter(|v| v.is_finite()),
            quality: r.quality.as_str(),
            unit: r.unit.as_deref(),
            value_text: r.value_text.as_deref(),
        })
        .expect("a struct of strings and numbers always serializes");
        line.push(b'\n');
        let slot = open.iter().position(|(d, _)| *d == r.device.as_str());
        let fits = |i: usize| records[i].size() + line.len() <= MAX_RECORD_BYTES;
        match slot {
            Some(s) if fits(open[s].1) => {
                let record = &mut records[open[s].1];
                record.data.extend_from_slice(&line);
                record.readings += 1;
            }
            _ => {
                records.push(Record {
                    partition_key: r.device.clone(),
                    data: line,
                    readings: 1,
                });
                let index = records.len() - 1;
                match slot {
                    Some(s) => open[s].1 = index,
                    None => open.push((&r.device, index)),
                }
            }
        }
    }
    records
}

/// Splits records into PutRecords calls of at most [`MAX_RECORDS_PER_CALL`] records and
/// [`MAX_CALL_BYTES`] bytes, keeping their order.
pub fn plan_calls(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut calls: Vec<Vec<Record>> = Vec::new();
    let mut bytes = 0;
    for record in records {
        let start_new = calls.last().is_none_or(|call| {
            call.len() == MAX_RECORDS_PER_CALL || bytes + record.size() > MAX_CALL_BYTES
        });
        if start_new {
            calls.push(Vec::new());
            bytes = 0;
        }
        bytes += record.size();
        calls
            .last_mut()
            .expect("a call was pushed above when there was none")
            .push(record);
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Reading;
    use crate::contract::Quality;

    fn live(seq: i64, device: &str, tag: &str, value: Option<f64>) -> LiveReading {
        LiveReading {
            seq,
            reading: Reading {
                ts_us: 1_700_000_000_001_000 + seq,
                device: device.into(),
                tag: tag.into(),
                value,
                value_text: None,
                quality: if value.is_some() {
                    Quality::Good
                } else {
                    Quality::Bad
                },
                unit: value.map(|_| "degC".to_owned()),
            },
        }
    }

    #[test]
    fn readings_are_grouped_per_device_as_json_lines() {
        let records = encode(
            "gw-1",
            &[
                live(1, "press-3", "oil_temp", Some(123.5)),
                live(2, "press-4", "speed", None),
                live(3, "press-3", "pressure", Some(-2.0)),
            ],
        );
        let shown: Vec<(String, String, usize)> = records
            .into_iter()
            .map(|r| {
                (
                    r.partition_key,
                    String::from_utf8(r.data).unwrap(),
                    r.readings,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "press-3".to_owned(),
                    "{\"gateway\":\"gw-1\",\"seq\":1,\"device\":\"press-3\",\"tag\":\"oil_temp\",\"ts\":1700000000001001,\"value\":123.5,\"quality\":\"good\",\"unit\":\"degC\"}\n\
                     {\"gateway\":\"gw-1\",\"seq\":3,\"device\":\"press-3\",\"tag\":\"pressure\",\"ts\":1700000000001003,\"value\":-2.0,\"quality\":\"good\",\"unit\":\"degC\"}\n"
                        .to_owned(),
                    2
                ),
                (
                    "press-4".to_owned(),
                    "{\"gateway\":\"gw-1\",\"seq\":2,\"device\":\"press-4\",\"tag\":\"speed\",\"ts\":1700000000001002,\"value\":null,\"quality\":\"bad\",\"unit\":null}\n"
                        .to_owned(),
                    1
                ),
            ]
        );
    }

    #[test]
    fn a_string_reading_carries_its_text_after_the_other_keys() {
        let mut recipe = live(4, "mixer-1", "recipe", None);
        recipe.reading.value_text = Some("MIX-7 \"night\"".to_owned());
        recipe.reading.quality = Quality::Good;
        recipe.reading.unit = None;
        let records = encode("gw-1", &[recipe]);
        assert_eq!(
            String::from_utf8(records[0].data.clone()).unwrap(),
            "{\"gateway\":\"gw-1\",\"seq\":4,\"device\":\"mixer-1\",\"tag\":\"recipe\",\"ts\":1700000000001004,\"value\":null,\"quality\":\"good\",\"unit\":null,\"value_text\":\"MIX-7 \\\"night\\\"\"}\n"
        );
    }

    #[test]
    fn a_record_never_exceeds_one_mebibyte() {
        let readings: Vec<LiveReading> = (0..20_000)
            .map(|i| live(i, "press-3", "oil_temperature_upper_bearing", Some(1.25)))
            .collect();
        let records = encode("gw-1", &readings);
        assert!(records.len() > 1, "{} records", records.len());
        assert!(records.iter().all(|r| r.size() <= MAX_RECORD_BYTES));
        assert_eq!(records.iter().map(|r| r.readings).sum::<usize>(), 20_000);
        // A full record leaves less room than one more line.
        let line = records[1].data.len() / records[1].readings;
        assert!(records[0].size() + line > MAX_RECORD_BYTES);
    }

    fn record(size: usize) -> Record {
        Record {
            partition_key: "d".into(),
            data: vec![b'x'; size - 1],
            readings: 1,
        }
    }

    #[test]
    fn calls_hold_at_most_500_records_and_5_mebibytes() {
        let counts: Vec<usize> = plan_calls((0..1201).map(|_| record(10)).collect())
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(counts, [500, 500, 201]);
        let sizes: Vec<Vec<usize>> = plan_calls((0..7).map(|_| record(MAX_RECORD_BYTES)).collect())
            .iter()
            .map(|call| call.iter().map(Record::size).collect())
            .collect();
        assert_eq!(
            sizes,
            [vec![MAX_RECORD_BYTES; 5], vec![MAX_RECORD_BYTES; 2]]
        );
    }
}
