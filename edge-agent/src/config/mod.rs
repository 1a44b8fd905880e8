//! Loading and validating the agent's configuration.

mod load;
mod model;
mod validate;

pub use crate::duration::ConfigDuration;
pub use load::{ConfigError, digest, load_file, load_file_with_digest, load_str};
pub use model::*;
pub(crate) use validate::is_safe_name;
pub use validate::{MIN_BATCH_AGE, MIN_POLL_INTERVAL, Problem, validate};
