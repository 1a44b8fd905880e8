//! Gaps: `seq` ranges of a gateway that will never reach the readings table. Two sources: the
//! collector's own view (a jump in `seq`, a quarantined batch file) and the agent's gap records
//! in the batch footer ([`agent`]). [`detect`] merges them into the rows of the gaps table
//! ([`crate::delta::GapsTable`]); the rule is documented there and in `docs/data-quality.md`.

pub mod agent;
pub mod detect;

pub use agent::{AgentGap, METADATA_KEY};
pub use detect::{Jump, QuarantinedRange, explain, find_jumps, outside_fresh_range};
