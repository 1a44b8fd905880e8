//! Shard positions as the live table stores them.
//!
//! Kinesis sequence numbers are decimal strings of up to 129 digits (56 in practice), far
//! beyond the `i64` version of a Delta `txn` action, so they cannot be stored the way the batch
//! path stores a gateway's `seq`. The live table keeps them in its own metadata instead: the
//! table configuration holds `plantline.kinesis.position.<shard id>` = the sequence number of
//! the last record of that shard whose rows are in the table, and `plantline.kinesis.stream` =
//! the stream they belong to. Every commit of rows carries a `metaData` action with the
//! positions moved by those rows, so rows and positions land in one atomic commit file. The
//! metadata survives checkpoints and expired-log cleanup (a checkpoint holds the latest
//! `metaData`), and a second consumer of the same table conflicts on it instead of
//! interleaving.

use std::collections::{BTreeMap, HashMap};

/// The table configuration key holding the stream the positions belong to.
pub const STREAM_KEY: &str = "plantline.kinesis.stream";
/// Prefix of the table configuration key holding one shard's position.
pub const POSITION_PREFIX: &str = "plantline.kinesis.position.";

/// Shard id → sequence number of the last record whose rows are committed.
pub type Positions = BTreeMap<String, String>;

/// The positions a table configuration holds.
pub(super) fn read(configuration: &HashMap<String, String>) -> Positions {
    configuration
        .iter()
        .filter_map(|(key, value)| {
            key.strip_prefix(POSITION_PREFIX)
                .map(|shard| (shard.to_owned(), value.clone()))
        })
        .collect()
}

/// The configuration entries that record `positions` of `stream`.
pub(super) fn entries(stream: &str, positions: &Positions) -> Vec<(String, String)> {
    std::iter::once((STREAM_KEY.to_owned(), stream.to_owned()))
        .chain(
            positions
                .iter()
                .map(|(shard, seq)| (format!("{POSITION_PREFIX}{shard}"), seq.clone())),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_the_table_configuration() {
        let positions = Positions::from([
            (
                "shardId-000000000000".to_owned(),
                "49590338271490256608559692538361571095921575989136588898".to_owned(),
            ),
            ("shardId-000000000001".to_owned(), "7".to_owned()),
        ]);
        let mut configuration: HashMap<String, String> =
            entries("live", &positions).into_iter().collect();
        configuration.insert("delta.checkpointInterval".to_owned(), "100".to_owned());
        assert_eq!(configuration[STREAM_KEY], "live");
        assert_eq!(read(&configuration), positions);
    }
}
