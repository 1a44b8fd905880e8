//! File drop: CSV or JSON-lines files that machines write into a folder (test stands, CNC
//! controllers) become readings.
//!
//! # The rules
//! - A file is read once its size and modification time have not changed for `settle`, and
//!   never while its name starts with `.` or ends in `.tmp` or `.part` (write under such a name
//!   and rename when finished, and the file is read at the next listing after `settle`).
//! - Its readings are delivered in chunks that commit with their progress (see [`state`]), and
//!   the file is moved to `done/` (or `failed/`) only after the last chunk committed; a reason
//!   file `<name>.reason.txt` is written next to it first whenever a row was bad.
//! - A file with some bad rows goes to `done/`: its good rows are in the buffer and the reason
//!   file lists every bad line. It goes to `failed/` when nothing in it could be used: its name
//!   does not match `file_name`, a mapped column is missing from the CSV header, or every row
//!   was bad.
//! - Restarts never read a row twice nor skip one: the buffer database records how far each
//!   file (name, size, modification time) was committed, in the same transaction as the
//!   readings. A file must therefore not change once it has settled.

pub(crate) mod check;
mod mapping;
mod records;
mod source;
mod state;

pub use mapping::MappingError;
pub use source::{FileDropError, run_file_drop};
