//! The optional Kinesis live stream: committed readings, teed from the buffer writer into a
//! bounded in-memory queue, shipped to a Kinesis data stream with PutRecords.
//!
//! # What always holds
//! - The live stream never blocks or slows the durable path: the buffer writer only pushes into
//!   [`LiveQueue`] (a short critical section, no await, no I/O). When the queue is full its oldest
//!   readings are dropped and counted (`plantline_agent_kinesis_dropped_total`); they still reach
//!   S3 in the batches.
//! - Only committed readings are streamed, each with its buffer `seq`, so a consumer can join the
//!   live stream with the batches in the warehouse on (`gateway`, `seq`).
//! - Calls stay within the service limits ([`records`]): at most 500 records and 5 MiB per
//!   PutRecords call, at most 1 MiB per record (data plus partition key).
//! - A partially failed call retries only the records that failed, with capped exponential
//!   backoff and jitter. Delivery is at least once: a record whose answer was lost may arrive twice.

mod queue;
mod records;
mod shipper;

pub use queue::{LiveQueue, LiveReading};
pub use records::{
    MAX_CALL_BYTES, MAX_RECORD_BYTES, MAX_RECORDS_PER_CALL, Record, encode, plan_calls,
};
pub use shipper::{KinesisError, KinesisShipper, failed_records};
