//! The buffer's bounds against an upload target that is away: `max_bytes` with drop-oldest (the
//! batcher's real loop uploading to a folder that cannot be written until the test frees it),
//! `max_age`, the gap records that reach the uploaded Parquet metadata, `edge-agent buffer`,
//! and backpressure through the whole agent with Mosquitto as the MQTT broker that keeps what
//! the agent does not take.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::Reading;
use edge_agent::batch::Batcher;
use edge_agent::buffer::{Bounds, Buffer};
use edge_agent::config::{
    BatchConfig, ConfigDuration, DirUpload, Durability, FullPolicy, UploadConfig, load_str,
};
use edge_agent::contract::{Gap, GapReason, Quality, Row};
use edge_agent::sinks::BatchSink;
use pipeline_e2e::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const TS0: i64 = 1_700_000_000_000_000;

/// Tests that read the process-wide drop counter take turns, so each sees only its own drops.
async fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

/// The batcher's real loop over `buffer`, uploading to `outbox`, until the token is cancelled.
async fn start_batcher(
    buffer: &Arc<Buffer>,
    outbox: &Outbox,
    max_rows: usize,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), edge_agent::batch::BatcherError>>,
) {
    let sink = Arc::new(
        BatchSink::from_config(&outbox.upload_config())
            .await
            .unwrap(),
    );
    let config = BatchConfig {
        max_rows,
        max_age: ConfigDuration::from_secs(1),
        // These tests count every file in the outbox as a main-lane batch.
        fresh_lane: false,
    };
    let mut batcher = Batcher::new(Arc::clone(buffer), sink, config, "plant-a".into());
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { batcher.run(stop).await }
    });
    (stop, task)
}

fn reading(i: i64) -> Reading {
    Reading {
        ts_us: TS0 + i * 1000,
        device: "press-3".into(),
        tag: format!("hydraulic_oil_temp_{:03}", i % 200),
        value: Some(i as f64 * 0.25),
        value_text: None,
        quality: Quality::Good,
        unit: Some("degC".into()),
    }
}

/// A folder upload target that cannot be written while a plain file sits where its folder
/// belongs (the agent runs as root in CI, so permissions would not stop it).
struct Outbox {
    path: PathBuf,
}

impl Outbox {
    fn blocked(dir: &Path) -> Self {
        let path = dir.join("outbox");
        std::fs::write(&path, "not a folder").unwrap();
        Self { path }
    }

    fn unblock(&self) {
        std::fs::remove_file(&self.path).unwrap();
    }

    fn upload_config(&self) -> UploadConfig {
        UploadConfig {
            s3: None,
            dir: Some(DirUpload {
                path: self.path.clone(),
                prefix: "raw/".into(),
            }),
        }
    }

    /// Every uploaded batch: its rows and its gap records, in key order.
    fn batches(&self) -> Vec<(Vec<Row>, Vec<Gap>)> {
        common::parquet_files(&self.path)
            .into_iter()
            .map(|f| {
                let bytes: bytes::Bytes = std::fs::read(&f).unwrap().into();
                (
                    edge_agent::batch::read_rows(bytes.clone()).unwrap(),
                    edge_agent::batch::read_gaps(bytes).unwrap(),
                )
            })
            .collect()
    }
}

/// Bytes of the buffer on disk: the database file and its write-ahead log.
fn on_disk(db: &Path) -> (u64, u64) {
    let len = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    (len(db.to_owned()), len(PathBuf::from(wal)))
}

/// Checks the delivery of `1..=last`: every seq is either uploaded exactly once (with the
/// reading appended under it) or inside exactly one gap record, and every jump in the uploaded
/// seqs is exactly one gap. Returns the gaps.
fn assert_delivered_or_reported(batches: &[(Vec<Row>, Vec<Gap>)], last: i64) -> Vec<Gap> {
    let mut seqs = Vec::new();
    let mut gaps = Vec::new();
    for (rows, batch_gaps) in batches {
        // A batch carries only gaps that lie before its own rows: the collector can account
        // for a jump as soon as it sees the batch after it.
        for gap in batch_gaps {
            assert!(
                gap.last_seq < rows[0].seq,
                "{gap:?} in batch at {}",
                rows[0].seq
            );
        }
        gaps.extend(batch_gaps.iter().cloned());
        for row in rows {
            let want = reading(row.seq);
            assert_eq!(
                (&row.device, &row.tag, row.ts_us, row.value),
                (&want.device, &want.tag, want.ts_us, want.value),
                "seq {}",
                row.seq
            );
            seqs.push(row.seq);
        }
    }
    let unique: BTreeSet<i64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "a seq was uploaded twice");
    let mut covered = unique.clone();
    for gap in &gaps {
        assert_eq!(
            gap.readings,
            u64::try_from(gap.last_seq - gap.first_seq + 1).unwrap(),
            "{gap:?}: every seq in a dropped range held a reading"
        );
        for seq in gap.first_seq..=gap.last_seq {
            assert!(covered.insert(seq), "seq {seq} is uploaded or in two gaps");
        }
    }
    assert_eq!(covered, (1..=last).collect::<BTreeSet<_>>());
    let sorted: Vec<i64> = unique.into_iter().collect();
    for pair in sorted.windows(2) {
        if pair[1] != pair[0] + 1 {
            assert!(
                gaps.iter()
                    .any(|g| g.first_seq == pair[0] + 1 && g.last_seq == pair[1] - 1),
                "the jump from {} to {} is not one gap record: {gaps:?}",
                pair[0],
                pair[1]
            );
        }
    }
    gaps
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_its_oldest_while_uploads_fail_and_the_gaps_reach_the_cloud() {
    let _serial = serial().await;
    let dropped_before = edge_agent::metrics::global().buffer_dropped_total("buffer_full");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    let outbox = Outbox::blocked(dir.path());
    let bounds = Bounds {
        max_bytes: MIB,
        max_age: Duration::from_hours(1),
        on_full: FullPolicy::DropOldest,
    };
    let buffer = Arc::new(Buffer::open_bounded(&db, Durability::Full, "gw-1", bounds).unwrap());
    let (stop, batcher_task) = start_batcher(&buffer, &outbox, 2000).await;

    // The first batch is cut as soon as it is full, and its upload fails.
    buffer
        .append(&(1..=2000).map(reading).collect::<Vec<_>>())
        .unwrap();
    wait_until("the first batch to be cut", Duration::from_secs(10), || {
        buffer.pending_batch().unwrap().is_some()
    })
    .await;
    // About six times what fits, committed the way the buffer writer does, while every
    // upload fails.
    let last: i64 = 60_000;
    let mut max_db = 0;
    let mut max_wal = 0;
    for start in (2001..=last).step_by(500) {
        let chunk: Vec<Reading> = (start..start + 500).map(reading).collect();
        let b = Arc::clone(&buffer);
        tokio::task::spawn_blocking(move || b.append(&chunk).unwrap())
            .await
            .unwrap();
        assert!(buffer.used_bytes().unwrap() <= MIB);
        let (db_bytes, wal_bytes) = on_disk(&db);
        max_db = max_db.max(db_bytes);
        max_wal = max_wal.max(wal_bytes);
    }
    // On disk: the bound, plus one commit of pages the drop frees right after, plus a
    // write-ahead log kept at a sixteenth of the bound (at least 64 pages) between checkpoints.
    assert!(
        max_db <= MIB + 128 * 1024,
        "database file grew to {max_db} bytes"
    );
    assert!(
        max_wal <= 512 * 1024,
        "write-ahead log grew to {max_wal} bytes"
    );
    let report = edge_agent::buffer::inspect(&db).unwrap();
    let pending = report
        .pending
        .clone()
        .expect("a batch waits for the target");
    assert_eq!((pending.first_seq, pending.last_seq), (1, 2000));
    let dropped = report.dropped[0].1;
    assert_eq!(report.dropped[0].0, "buffer_full");
    assert!(dropped > 40_000, "{report}");
    assert_eq!(report.rows, u64::try_from(last).unwrap() - dropped);
    assert_eq!(
        edge_agent::metrics::global().buffer_dropped_total("buffer_full") - dropped_before,
        dropped
    );
    // The oldest readings after the batch in flight went; one record says so.
    assert_eq!(report.waiting_gaps.len(), 1, "{report}");
    let gap = &report.waiting_gaps[0];
    assert_eq!(
        (gap.first_seq, gap.readings, gap.reason.clone()),
        (2001, dropped, GapReason::BufferFull)
    );
    assert_eq!(report.seq, Some((1, last)));
    let shown = report.to_string();
    assert!(
        shown.contains(&format!(
            "unshipped gaps  seq 2001..={}: {dropped} readings, buffer_full at ",
            gap.last_seq
        )),
        "{shown}"
    );
    assert!(shown.contains("of max_bytes 1 MiB ("), "{shown}");
    assert!(
        shown.contains(&format!(
            "dropped         buffer_full {dropped}, max_age 0, damaged_buffer 0"
        )),
        "{shown}"
    );

    // The target comes back: the backlog drains and the gap goes out with the next batch.
    outbox.unblock();
    wait_until("the backlog to drain", Duration::from_mins(1), || {
        buffer.stats().unwrap().rows == 0 && buffer.pending_batch().unwrap().is_none()
    })
    .await;
    stop.cancel();
    batcher_task.await.unwrap().unwrap();

    let uploaded = outbox.batches();
    let gaps = assert_delivered_or_reported(&uploaded, last);
    assert_eq!(gaps, report.waiting_gaps);
    // It travelled in the batch right after the one that was pending during the outage.
    assert_eq!(uploaded[1].0[0].seq, gap.last_seq + 1);
    assert_eq!(uploaded[1].1, gaps);
    // Shipped gaps leave the buffer with their batch.
    let after = edge_agent::buffer::inspect(&db).unwrap();
    assert_eq!((after.pending_gaps.len(), after.waiting_gaps.len()), (0, 0));
    assert_eq!(after.dropped[0], ("buffer_full".to_owned(), dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_past_max_age_are_dropped_while_the_target_is_away_even_with_room() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    let outbox = Outbox::blocked(dir.path());
    let bounds = Bounds {
        max_bytes: 64 * MIB,
        max_age: Duration::from_secs(2),
        on_full: FullPolicy::DropOldest,
    };
    let buffer = Arc::new(Buffer::open_bounded(&db, Durability::Full, "gw-1", bounds).unwrap());
    let (stop, batcher_task) = start_batcher(&buffer, &outbox, 100).await;
    buffer
        .append(&(1..=300).map(reading).collect::<Vec<_>>())
        .unwrap();
    // No commit follows: the batcher's rounds age the readings out. The batch in flight
    // (1..=100) stays whatever its age.
    wait_until(
        "the old readings to age out",
        Duration::from_secs(20),
        || buffer.stats().unwrap().rows == 100,
    )
    .await;
    let report = edge_agent::buffer::inspect(&db).unwrap();
    assert_eq!(report.dropped[1], ("max_age".to_owned(), 200));
    assert_eq!(
        report
            .waiting_gaps
            .iter()
            .map(|g| (g.first_seq, g.last_seq, g.readings, g.reason.clone()))
            .collect::<Vec<_>>(),
        [(101, 300, 200, GapReason::MaxAge)]
    );
    assert!(report.used_bytes < MIB, "there was room: {report}");

    // The target comes back and takes the batch in flight; the gap waits for a batch to
    // ride with.
    outbox.unblock();
    wait_until(
        "the batch in flight to go out",
        Duration::from_mins(1),
        || buffer.stats().unwrap().rows == 0 && buffer.pending_batch().unwrap().is_none(),
    )
    .await;
    assert_eq!(
        edge_agent::buffer::inspect(&db).unwrap().waiting_gaps.len(),
        1
    );
    // Fresh readings go out, with the gap ahead of them.
    buffer
        .append(&(301..=350).map(reading).collect::<Vec<_>>())
        .unwrap();
    wait_until(
        "the fresh readings to go out",
        Duration::from_mins(1),
        || buffer.stats().unwrap().rows == 0 && buffer.pending_batch().unwrap().is_none(),
    )
    .await;
    stop.cancel();
    batcher_task.await.unwrap().unwrap();
    let gaps = assert_delivered_or_reported(&outbox.batches(), 350);
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0].first_seq, gaps[0].last_seq), (101, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losses_found_in_a_damaged_buffer_travel_as_gap_records() {
    let _serial = serial().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("buffer.db");
    {
        let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
        buffer
            .append(&(1..=3000).map(reading).collect::<Vec<_>>())
            .unwrap();
    }
    let len = std::fs::metadata(&db).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let buffer = Buffer::open(&db, Durability::Full, "gw-1").unwrap();
    let recovery = buffer.recovery().unwrap().clone();
    let (_, last_saved) = recovery.saved_seq.unwrap();
    // The damaged file still says which seq was handed out last. Which pages the cut takes
    // depends on where SQLite placed them (a leaf of later rows can sit before one of earlier
    // rows), so the loss may come in more than one range; together with the saved rows they
    // cover every seq handed out, and the last range ends at the last seq.
    let lost_last = 3000;
    let lost: Vec<(i64, i64)> = recovery
        .lost
        .iter()
        .map(|l| (l.first.unwrap(), l.last.unwrap()))
        .collect();
    assert_eq!(lost.last(), Some(&(last_saved + 1, lost_last)), "{lost:?}");
    let width: i64 = lost.iter().map(|(a, b)| b - a + 1).sum();
    assert_eq!(recovery.lost_readings, u64::try_from(width).unwrap());
    assert_eq!(recovery.saved_rows + recovery.lost_readings, 3000);
    let batch = buffer.cut_batch(100_000, "plant-a").unwrap().unwrap();
    let saved: Vec<i64> = buffer
        .batch_rows(&batch)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    let expected_saved: Vec<i64> = (1..=lost_last)
        .filter(|s| !lost.iter().any(|(a, b)| (a..=b).contains(&s)))
        .collect();
    assert_eq!(saved, expected_saved);
    // One gap record per lost range (saved readings lie between them).
    assert_eq!(
        buffer
            .batch_gaps(&batch)
            .unwrap()
            .iter()
            .map(|g| (g.first_seq, g.last_seq, g.readings, g.reason.clone()))
            .collect::<Vec<_>>(),
        lost.iter()
            .map(|&(a, b)| (
                a,
                b,
                u64::try_from(b - a + 1).unwrap(),
                GapReason::DamagedBuffer
            ))
            .collect::<Vec<_>>()
    );
    let report = edge_agent::buffer::inspect(&db).unwrap();
    assert_eq!(
        report.dropped[2],
        ("damaged_buffer".to_owned(), recovery.lost_readings)
    );
}

/// One message per tick of a simulated multi-sensor: 10 fields, one reading each.
const FIELDS: usize = 10;

fn subscription() -> String {
    let mut text = String::from(
        "[[mqtt.subscriptions]]\ntopic = \"line/+/sensors\"\ndevice = \"{1}\"\ntimestamp = \"/ts\"\ntimestamp_format = \"epoch_us\"\n",
    );
    for f in 0..FIELDS {
        let _ = write!(
            text,
            "[[mqtt.subscriptions.fields]]\ntag = \"channel_{f:02}_temperature_in_degc\"\nvalue = \"/c{f:02}\"\n"
        );
    }
    text
}

fn payload(message: usize) -> Vec<u8> {
    let mut text = format!("{{\"ts\":{}", TS0 + i64::try_from(message).unwrap() * 1000);
    for f in 0..FIELDS {
        let _ = write!(text, ",\"c{f:02}\":{}", message * 100 + f);
    }
    text.push('}');
    text.into_bytes()
}

/// Publishes at QoS 1 and returns once the broker acknowledged every message.
async fn publish(port: u16, messages: std::ops::Range<usize>) {
    let mut options = MqttOptions::new("bounds-publisher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let count = messages.len();
    let sender = tokio::spawn(async move {
        for m in messages {
            client
                .publish("line/ms-1/sensors", QoS::AtLeastOnce, false, payload(m))
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    tokio::time::timeout(Duration::from_mins(1), async {
        while acked < count {
            if let Event::Incoming(Packet::PubAck(_)) =
                eventloop.poll().await.expect("the broker is up")
            {
                acked += 1;
            }
        }
    })
    .await
    .expect("the broker acknowledges every message");
    let client = sender.await.unwrap();
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) = eventloop.poll().await {
                break;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_drops_nothing_and_the_broker_keeps_what_the_agent_does_not_take() {
    let _serial = serial().await;
    // The broker keeps far more than Mosquitto's default of 1000 messages for a client that
    // does not take them; a gateway's broker must be sized for the outage it rides through.
    let broker = Mosquitto::start_with_config("max_queued_messages 10000");
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::blocked(dir.path());
    let text = format!(
        "site = \"plant-ost\"\ngateway = \"gw-bp\"\n\
         [buffer]\npath = \"buffer.db\"\ncommit_interval = \"50ms\"\nmax_bytes = \"1 MiB\"\nmax_age = \"1h\"\non_full = \"backpressure\"\n\
         [batch]\nmax_rows = 2000\nmax_age = \"1s\"\n\
         [upload.dir]\npath = \"outbox\"\n\
         [metrics]\nenabled = false\n\
         [[mqtt]]\nname = \"bp\"\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"gw-bp\"\nkeep_alive = \"30s\"\n{}",
        broker.port(),
        subscription()
    );
    let config = load_str(&text, &dir.path().join("agent.toml")).unwrap();
    let db = config.buffer.path.clone();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(config, stop.clone()));
    wait_until("the agent's buffer", Duration::from_secs(20), || {
        edge_agent::buffer::inspect(&db).is_ok_and(|r| r.bounds.is_some())
    })
    .await;
    // Give the subscription a moment to be confirmed before publishing (a persistent session
    // would keep the messages anyway once it exists).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 4000 messages of 10 readings: about three times what a 1 MiB buffer holds, and more
    // than the agent's queues between the broker and the buffer take.
    let messages = 4000;
    publish(broker.port(), 0..messages).await;
    let buffered = || edge_agent::buffer::inspect(&db).unwrap();
    wait_until("the buffer to fill", Duration::from_secs(30), || {
        buffered().used_bytes >= MIB
    })
    .await;
    // Held back: nothing more is committed while the target is away, nothing is dropped.
    let held = buffered().rows;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = buffered();
    assert_eq!(report.rows, held, "the writer kept committing: {report}");
    // What the agent holds (the buffer, its queue of 1000 messages for the writer, 256 read
    // from the connection, the broker's window of 20 in flight) is well short of what was
    // published: the rest waits on the broker.
    let in_agent = report.rows + ((1000 + 256 + 20) * FIELDS) as u64;
    assert!(in_agent < (messages * FIELDS) as u64, "{report}");
    assert!(report.used_bytes < MIB + 256 * 1024, "{report}");
    assert!(report.dropped.iter().all(|(_, n)| *n == 0), "{report}");
    assert_eq!(report.waiting_gaps, []);

    // The target comes back: the batches free room and the broker's messages come in.
    outbox.unblock();
    let all = messages * FIELDS;
    wait_until(
        "every message to be uploaded",
        Duration::from_secs(90),
        || common::uploaded_rows(&outbox.path).len() >= all,
    )
    .await;
    stop.cancel();
    agent.await.unwrap().unwrap();

    let rows = common::uploaded_rows(&outbox.path);
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=i64::try_from(rows.len()).unwrap()).collect::<Vec<_>>()
    );
    for (rows, gaps) in outbox.batches() {
        assert_eq!(
            gaps,
            [],
            "no gap records under backpressure (batch at {})",
            rows[0].seq
        );
    }
    // Every published reading arrived; a message the broker sent again after a reconnect may
    // arrive twice (at least once), never not at all.
    let got: BTreeSet<(i64, String, u64)> = rows
        .iter()
        .map(|r| (r.ts_us, r.tag.clone(), r.value.unwrap().to_bits()))
        .collect();
    let want: BTreeSet<(i64, String, u64)> = (0..messages)
        .flat_map(|m| {
            (0..FIELDS).map(move |f| {
                (
                    TS0 + i64::try_from(m).unwrap() * 1000,
                    format!("channel_{f:02}_temperature_in_degc"),
                    ((m * 100 + f) as f64).to_bits(),
                )
            })
        })
        .collect();
    assert_eq!(got, want);
    let report = edge_agent::buffer::inspect(&db).unwrap();
    assert!(report.dropped.iter().all(|(_, n)| *n == 0), "{report}");
}
