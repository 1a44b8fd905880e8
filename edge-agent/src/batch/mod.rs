//! Batches: cutting contiguous `seq` ranges from the buffer, encoding them as Parquet and
//! uploading them.

mod batcher;
mod parquet_file;

pub use batcher::{Batcher, BatcherError};
pub use parquet_file::{
    BatchEncoder, ENCODE_CHUNK_ROWS, encode, encode_lane, read_gaps, read_rows,
};
