//! Bytes per reading of a Parquet batch on the demo's signal mix, against CSV and JSON lines of
//! the same readings, in the same run:
//!
//!     cargo bench -p edge-agent --bench parquet_size
//!
//! The readings (20 presses of 5 tags, one poll a second; see `signal_mix`) go through the real
//! buffer and are cut into batches of `batch.max_rows` (50 000 by default, and smaller sizes
//! for comparison); each batch is encoded exactly as the agent uploads it. CSV and JSON lines
//! hold the same columns as the batch (seq, ts, site, gateway, device, tag, value, quality,
//! unit), uncompressed, as a line-based shipper would send them.

#[path = "signal_mix/mod.rs"]
mod signal_mix;

use std::fmt::Write as _;

use edge_agent::buffer::Buffer;
use edge_agent::config::Durability;
use edge_agent::contract::Row;

const DEVICES: usize = 20;
const TICKS: usize = 2_000;

fn main() {
    println!("parquet size benchmark on {}", signal_mix::machine());
    let readings = signal_mix::readings(DEVICES, TICKS);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let buffer = Buffer::open(&dir.path().join("b.db"), Durability::Normal, "gw-line1")
        .expect("a fresh buffer");
    for chunk in readings.chunks(10_000) {
        buffer.append(chunk).expect("the buffer takes the readings");
    }
    let mut rows = Vec::with_capacity(readings.len());
    while let Some(batch) = buffer.cut_batch(50_000, "plant-ost").expect("cut") {
        rows.extend(buffer.batch_rows(&batch).expect("rows"));
        buffer.complete_batch(&batch).expect("complete");
    }
    println!(
        "{} readings: {DEVICES} devices x 5 tags x {TICKS} polls\n",
        rows.len()
    );
    let csv = csv(&rows).len();
    let jsonl = jsonl(&rows).len();
    println!(
        "{:<28} {:>12} {:>16} {:>10} {:>10}",
        "format", "bytes", "bytes/reading", "vs CSV", "vs JSONL"
    );
    let line = |name: &str, bytes: usize| {
        #[allow(clippy::cast_precision_loss)]
        let (per, vs_csv, vs_json) = (
            bytes as f64 / rows.len() as f64,
            csv as f64 / bytes as f64,
            jsonl as f64 / bytes as f64,
        );
        println!("{name:<28} {bytes:>12} {per:>16.2} {vs_csv:>9.1}x {vs_json:>9.1}x");
    };
    line("CSV", csv);
    line("JSON lines", jsonl);
    for batch_rows in [1_000, 10_000, 50_000] {
        let bytes: usize = rows
            .chunks(batch_rows)
            .map(|b| edge_agent::batch::encode(b, &[]).expect("encode").len())
            .sum();
        line(&format!("Parquet, batches of {batch_rows}"), bytes);
    }
    println!("\n(vs CSV / vs JSONL: how many times smaller the Parquet batches are)");
}

fn csv(rows: &[Row]) -> String {
    let mut out = String::from("seq,ts,site,gateway,device,tag,value,quality,unit\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            r.seq,
            r.ts_us,
            r.site,
            r.gateway,
            r.device,
            r.tag,
            r.value.map(|v| v.to_string()).unwrap_or_default(),
            r.quality.as_str(),
            r.unit.as_deref().unwrap_or_default()
        );
    }
    out
}

fn jsonl(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        let value = serde_json::json!({
            "seq": r.seq,
            "ts": r.ts_us,
            "site": r.site,
            "gateway": r.gateway,
            "device": r.device,
            "tag": r.tag,
            "value": r.value,
            "quality": r.quality.as_str(),
            "unit": r.unit,
        });
        out.push_str(&value.to_string());
        out.push('\n');
    }
    out
}
