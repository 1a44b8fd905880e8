//! Row-level data-quality rules: which readings they apply to (a tag pattern), what they check
//! (`not_null`, `finite`, `range`, `max_future_skew`, `max_age`) and what a broken rule does
//! (`flag`, `quarantine`, `fail`). The rules are documented for users in
//! `docs/data-quality.md`. String readings (`value_text`) count as present for `not_null` and
//! pass `finite` and `range`, which judge numbers only.
//!
//! # Invariants
//! - A rule has exactly one check and one action; names are unique.
//! - The time checks compare a reading's `ts` with the collector's clock, read once per
//!   gateway chunk, so all rows of one commit are judged at the same instant.
//! - A reading breaks a `fail` rule → its whole batch file goes to the file quarantine (nothing
//!   of the file is applied). Otherwise a broken `quarantine` rule moves the reading to the
//!   `quarantined_rows` table. Otherwise every broken `flag` rule is named in its `dq_flags`.

mod config;
mod evaluate;
mod pattern;

pub use config::{Patterns, RuleAction, RuleConfig, compile};
pub use evaluate::{
    Check, Failure, Judge, Observed, RowVerdict, Rule, RuleCounts, RuleCountsByName, RuleSet,
    Violation,
};
pub use pattern::TagPattern;
