//! The crash proof: the real agent binary, reading files at a high rate and uploading to moto,
//! is killed with `kill -9` at random instants (a fixed seed, so a failure can be replayed),
//! then run to completion. Every produced reading must be in S3 exactly once, under `seq`
//! values that run from 1 without a hole, whatever the kills interrupted: a commit, a cut, a
//! PUT, the delete after it. A longer soak: `PLANTLINE_CRASH_CYCLES=200 cargo test -p
//! edge-agent --test crash_loop -- --nocapture`.

mod store_and_forward;

use std::time::{Duration, Instant};

use pipeline_e2e::MotoServer;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use store_and_forward::{
    Agent, Producer, buffer_report, coverage, delivered_numbers, download, wait_until_drained,
    write_config,
};

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const CYCLES: usize = 8;

#[test]
fn every_reading_lands_in_s3_exactly_once_across_kill_9_at_random_instants() {
    let cycles = std::env::var("PLANTLINE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES);
    let moto = MotoServer::start();
    let bucket = moto.create_bucket();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    // Small batches, so the kills often land between a PUT and its delete.
    let config = write_config(
        dir.path(),
        &moto.endpoint(),
        &bucket,
        500,
        "[buffer]\npath = \"buffer.db\"\ncommit_interval = \"20ms\"\n",
    );
    // 200 rows every 40 ms: 5000 readings per second.
    let writer = Producer::start(dir.path(), 200, Duration::from_millis(40));
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    for cycle in 0..cycles {
        let agent = Agent::start(&config, &log);
        let life = Duration::from_millis(rng.random_range(150..1500));
        std::thread::sleep(life);
        agent.kill9();
        eprintln!(
            "cycle {cycle}: killed after {life:?}, {} readings produced so far",
            writer.produced()
        );
    }
    let produced = writer.finish();
    eprintln!(
        "{cycles} kills in {:?}; {produced} readings produced",
        started.elapsed()
    );

    let during_kills = std::fs::read_to_string(&log).unwrap();
    let uploaded_during_kills = during_kills.matches("batch uploaded").count();
    assert!(
        uploaded_during_kills >= cycles,
        "the killed lives were uploading, not just starting: {uploaded_during_kills} batches{}",
        store_and_forward::log_tail(&log)
    );

    // The last life runs until everything is in S3, then stops cleanly.
    let mut agent = Agent::start(&config, &log);
    wait_until_drained(dir.path(), &config, &mut agent, Duration::from_mins(3));
    let tail = agent.log_tail();
    assert_eq!(agent.terminate(), Some(0), "clean exit{tail}");
    let report = buffer_report(&config);
    assert_eq!(report["readings"], "0");
    assert_eq!(
        report["dropped"], "buffer_full 0, max_age 0, damaged_buffer 0",
        "the buffer dropped nothing"
    );

    let landed = download(&moto, &bucket, &dir.path().join("s3"));
    let cover = coverage(landed.values());
    assert!(
        cover.gaps.is_empty(),
        "no gap records: nothing was dropped or lost, found {:?}",
        cover.gaps
    );
    assert_eq!(
        cover.overlapping, 0,
        "every seq is in exactly one object (a re-upload after a kill overwrote its own key)"
    );
    let last = *cover.rows.keys().next_back().unwrap();
    assert_eq!(
        i64::try_from(cover.rows.len()).unwrap(),
        last,
        "seq runs from 1 to {last} without a hole"
    );
    let numbers = delivered_numbers(&cover);
    assert_eq!(
        numbers.len() as u64,
        produced,
        "every produced reading arrived once, under one seq"
    );
    assert_eq!(
        numbers.iter().next_back().copied(),
        Some(produced - 1),
        "and they are exactly 0..{produced}"
    );
    eprintln!(
        "{} batches, {} readings, seq 1..={last}",
        landed.len(),
        numbers.len()
    );
}
