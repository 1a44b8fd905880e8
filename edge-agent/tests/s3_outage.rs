//! The outage proofs: S3 (moto) goes away while readings keep arriving and comes back later on
//! the same port. The backlog drains in `seq` order and coverage is exact; with a buffer too
//! small for the outage, the overflow is counted exactly and reaches S3 as gap records.
//!
//! moto keeps its objects in memory, so before stopping it the test freezes the agent
//! (SIGSTOP), saves what S3 holds, stops moto and lets the agent go on (SIGCONT). A batch that
//! was in flight is sent again after the outage; it must then have the same key and bytes as
//! any copy saved before.

mod store_and_forward;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use edge_agent::contract::{BatchKey, GapReason};
use pipeline_e2e::MotoServer;
use store_and_forward::{
    Agent, Landed, PREFIX, Producer, buffer_report, coverage, delivered_numbers, download,
    wait_until_drained, write_config,
};

/// Waits until S3 holds at least `count` of the gateway's batches.
fn wait_for_batches(moto: &MotoServer, bucket: &str, count: usize, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_mins(1);
    let prefix = BatchKey::gateway_prefix(PREFIX, store_and_forward::GATEWAY);
    while moto.list_keys(bucket, &prefix).len() < count {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} batches in S3 after 60 s{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the outage: uploads flow, S3 goes away for `outage`, comes back; returns every batch
/// seen (before and after, merged by key, with equal bytes checked), the rows produced and the
/// buffer report after the clean stop.
fn run_outage(
    dir: &Path,
    max_rows: usize,
    buffer: &str,
    outage: Duration,
) -> (BTreeMap<String, Landed>, u64, BTreeMap<String, String>) {
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let config = write_config(dir, &moto.endpoint(), &bucket, max_rows, buffer);
    let log = dir.join("agent.log");
    let mut agent = Agent::start(&config, &log);
    // 200 rows every 50 ms: 4000 readings per second.
    let writer = Producer::start(dir, 200, Duration::from_millis(50));
    wait_for_batches(&moto, &bucket, 3, &agent);

    agent.freeze();
    let before = download(&moto, &bucket, &dir.join("s3-before"));
    let stopped = moto.stop();
    agent.thaw();
    let at_stop = writer.produced();
    std::thread::sleep(outage);
    let during = writer.produced() - at_stop;
    let waiting: u64 = buffer_report(&config)["readings"].parse().unwrap();
    eprintln!(
        "outage of {outage:?}: {during} readings arrived, {waiting} wait in the buffer, {} batches were in S3",
        before.len()
    );
    assert!(
        agent.is_running(),
        "the agent survives the outage{}",
        agent.log_tail()
    );

    let moto = stopped.start_again();
    moto.create_named_bucket(&bucket);
    // Readings keep arriving until the drain has begun (the agent's upload backoff decides when):
    // the fresh lane sends copies of readings that arrived within `max_age`, so a producer that
    // stopped before the drain would leave it nothing to send.
    let deadline = Instant::now() + Duration::from_mins(1);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("draining a backlog in seq order")
    {
        assert!(
            Instant::now() < deadline,
            "no drain began within a minute of S3 coming back{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let produced = writer.finish();
    wait_until_drained(dir, &config, &mut agent, Duration::from_mins(4));
    let tail = agent.log_tail();
    assert_eq!(agent.terminate(), Some(0), "clean exit{tail}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("draining a backlog in seq order")
            && log_text.contains("backlog drained"),
        "the drain is logged{tail}"
    );

    let after = download(&moto, &bucket, &dir.join("s3-after"));
    // The fresh lane (on by default) sent copies of the newest readings ahead of the backlog:
    // each is a contiguous range whose rows the main lane delivered too, byte for byte the same
    // readings, and they never go backwards. The one exception is a full buffer that drops its
    // oldest readings: a reading copied in the fresh lane can be dropped before the main lane
    // reaches it, and then a `buffer_full` gap record of the main lane must cover it.
    let fresh = read_fresh(&dir.join("s3-after").join("fresh"));
    assert!(
        !fresh.is_empty() && log_text.contains("fresh batch uploaded"),
        "the fresh lane went ahead of the backlog{tail}"
    );
    check_fresh(&fresh, &after, &tail);
    let mut all = before;
    for (key, batch) in after {
        if let Some(earlier) = all.get(&key) {
            assert!(
                earlier.bytes == batch.bytes,
                "{key} was uploaded twice with different bytes"
            );
        } else {
            all.insert(key, batch);
        }
    }
    (all, produced, buffer_report(&config))
}

/// Checks the fresh lane's batches against the main lane's: contiguous, never backwards, and each
/// row a copy of the main lane's row, or, for a reading the full buffer dropped after it was
/// copied, inside one of the main lane's `buffer_full` gap records.
fn check_fresh(
    fresh: &[Vec<edge_agent::contract::Row>],
    main: &BTreeMap<String, Landed>,
    tail: &str,
) {
    let main_rows: BTreeMap<i64, &edge_agent::contract::Row> = main
        .values()
        .flat_map(|b| &b.rows)
        .map(|r| (r.seq, r))
        .collect();
    let dropped: Vec<(i64, i64)> = main
        .values()
        .flat_map(|b| &b.gaps)
        .filter(|g| g.reason == GapReason::BufferFull)
        .map(|g| (g.first_seq, g.last_seq))
        .collect();
    let mut previous_last = 0;
    let mut copied_then_dropped = 0;
    for rows in fresh {
        let (first, last) = (rows[0].seq, rows[rows.len() - 1].seq);
        assert!(first > previous_last, "fresh batches never go backwards");
        assert_eq!(i64::try_from(rows.len()).unwrap(), last - first + 1);
        previous_last = last;
        for row in rows {
            if let Some(main) = main_rows.get(&row.seq) {
                assert_eq!(row, *main, "a copy of the main lane's row");
            } else {
                assert!(
                    dropped
                        .iter()
                        .any(|&(first, last)| (first..=last).contains(&row.seq)),
                    "fresh row {row:?} is neither in the main lane nor in a buffer_full gap record{tail}"
                );
                copied_then_dropped += 1;
            }
        }
    }
    if copied_then_dropped > 0 {
        eprintln!(
            "{copied_then_dropped} readings went up in the fresh lane and were dropped by the full buffer before the main lane reached them"
        );
    }
}

/// The fresh-lane batches downloaded into `folder`, in key order.
fn read_fresh(folder: &Path) -> Vec<Vec<edge_agent::contract::Row>> {
    pipeline_e2e::sorted_files(folder)
        .iter()
        .map(|f| edge_agent::batch::read_rows(std::fs::read(f).unwrap().into()).unwrap())
        .collect()
}

#[test]
fn after_an_s3_outage_the_backlog_drains_in_seq_order_and_every_reading_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let (landed, produced, report) = run_outage(
        dir.path(),
        2000,
        "[buffer]\npath = \"buffer.db\"\ncommit_interval = \"50ms\"\n",
        Duration::from_secs(8),
    );
    assert_eq!(
        report["dropped"],
        "buffer_full 0, max_age 0, damaged_buffer 0"
    );
    let cover = coverage(landed.values());
    assert!(
        cover.gaps.is_empty(),
        "nothing was dropped: {:?}",
        cover.gaps
    );
    assert_eq!(cover.overlapping, 0);
    let last = *cover.rows.keys().next_back().unwrap();
    assert_eq!(
        i64::try_from(cover.rows.len()).unwrap(),
        last,
        "seq 1..={last} without a hole"
    );
    let numbers = delivered_numbers(&cover);
    assert_eq!(numbers.len() as u64, produced, "every reading arrived once");
    // Contiguous batches in key order: each starts right after the one before it.
    let mut next = 1;
    for batch in landed.values() {
        assert_eq!(
            batch.rows[0].seq, next,
            "{} follows its predecessor",
            batch.key
        );
        assert!(
            batch.rows.len() <= 2000,
            "batch.max_rows bounds {}",
            batch.key
        );
        next = batch.rows.last().unwrap().seq + 1;
    }
}

#[test]
fn an_outage_longer_than_the_buffer_holds_is_counted_exactly_and_reported_as_gaps() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB holds roughly 25 000 of these short readings; the outage brings about 48 000.
    let (landed, produced, report) = run_outage(
        dir.path(),
        1000,
        "[buffer]\npath = \"buffer.db\"\ncommit_interval = \"50ms\"\nmax_bytes = \"1 MiB\"\non_full = \"drop_oldest\"\n",
        Duration::from_secs(12),
    );
    let cover = coverage(landed.values());
    let numbers = delivered_numbers(&cover);
    let lost = produced - numbers.len() as u64;
    assert!(
        lost > 5_000,
        "the outage overflowed the buffer: {lost} lost of {produced}"
    );
    let gap_readings: u64 = cover.gaps.values().map(|g| g.readings).sum();
    assert_eq!(
        gap_readings, lost,
        "the gap records count exactly the readings that never arrived: {:?}",
        cover.gaps
    );
    assert!(
        cover
            .gaps
            .values()
            .all(|g| g.reason == GapReason::BufferFull
                && i64::try_from(g.readings).unwrap() == g.last_seq - g.first_seq + 1),
        "buffer_full records with exact ranges: {:?}",
        cover.gaps
    );
    assert_eq!(
        report["dropped"],
        format!("buffer_full {lost}, max_age 0, damaged_buffer 0"),
        "the agent's own counter agrees"
    );
    assert_eq!(
        report["unshipped gaps"], "none",
        "every gap record reached S3"
    );
    // Drop-oldest: what was lost is a middle stretch of the outage, never the newest readings.
    let last_produced = produced - 1;
    assert!(
        numbers.contains(&last_produced),
        "the newest reading arrived"
    );
}
