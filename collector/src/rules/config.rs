//! The `[[rules]]` entries of the collector config, and their compilation into a [`RuleSet`].
//!
//! ```toml
//! [[rules]]
//! name = "oil-temp-range"
//! tags = ["press-*/oil_temp"]
//! range = [-20.0, 150.0]
//! action = "quarantine"
//! ```

use std::time::Duration;

use serde::Deserialize;

use super::evaluate::{Check, Rule, RuleSet};
use super::pattern::TagPattern;
use crate::config::{ConfigDuration, Problem};

/// One row-level data-quality rule as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name: 1-64 characters of lowercase letters, digits, `-` and `_`, unique in
    /// the file. It is what `dq_flags`, the `quarantined_rows` table, the quarantine's reason
    /// object and the pass report show.
    pub name: String,
    /// Which readings the rule applies to: a tag name, a glob on the tag name (`*_temp`), or a
    /// glob on `device/tag` (`press-*/oil_temp`); one pattern or a list.
    pub tags: Patterns,
    /// What happens to a reading that breaks the rule: `flag` keeps it and names the rule in
    /// its `dq_flags` column; `quarantine` moves it to the `quarantined_rows` table; `fail`
    /// moves its whole batch file to the file quarantine.
    pub action: RuleAction,
    /// Check: the reading has a value, a number in `value` or a string tag's text in
    /// `value_text` (neither means the reading has quality `bad`).
    #[serde(default)]
    pub not_null: bool,
    /// Check: the value is a finite number (not NaN, not infinite); a null value and a string
    /// tag's text pass.
    #[serde(default)]
    pub finite: bool,
    /// Check: `[min, max]`, the value lies within, both ends included; NaN lies outside, a
    /// null value and a string tag's text pass.
    pub range: Option<[f64; 2]>,
    /// Check: the reading's timestamp is at most this far ahead of the collector's clock.
    pub max_future_skew: Option<ConfigDuration>,
    /// Check: the reading's timestamp is at most this far behind the collector's clock (the
    /// horizon).
    pub max_age: Option<ConfigDuration>,
}

/// One tag pattern or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a tag pattern like \"press-*/oil_temp\" or a list of them"
)]
pub enum Patterns {
    One(String),
    Many(Vec<String>),
}

impl Patterns {
    fn as_slice(&self) -> &[String] {
        match self {
            Self::One(p) => std::slice::from_ref(p),
            Self::Many(ps) => ps,
        }
    }
}

/// What a broken rule does to the reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Keep the reading; name the rule in its `dq_flags` column.
    Flag,
    /// Move the reading to the `quarantined_rows` table.
    Quarantine,
    /// Move the reading's whole batch file to the file quarantine.
    Fail,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flag => "flag",
            Self::Quarantine => "quarantine",
            Self::Fail => "fail",
        }
    }
}

impl std::fmt::Display for RuleAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The checks, as written, for messages.
const CHECK_HELP: &str = "not_null = true, finite = true, range = [min, max], max_future_skew = \"5m\" or max_age = \"720h\"";

/// Compiles the rules, or reports every problem (keys like `rules[2].range`) with the fix.
#[allow(clippy::too_many_lines)] // one check after the other, in the order of the fields
pub fn compile(rules: &[RuleConfig]) -> Result<RuleSet, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut compiled = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        let at = |field: &str| {
            if field.is_empty() {
                format!("rules[{i}]")
            } else {
                format!("rules[{i}].{field}")
            }
        };
        let mut problem = |field: &str, message: String| {
            problems.push(Problem {
                key: at(field),
                message,
            });
        };
        let name = &rule.name;
        if !valid_name(name) {
            problem(
                "name",
                format!(
                    "`{name}` is not a rule name; use 1-64 characters of lowercase letters, digits, `-` and `_`, like \"oil-temp-range\""
                ),
            );
        } else if let Some(first) = rules[..i].iter().position(|r| r.name == *name) {
            problem(
                "name",
                format!(
                    "`{name}` is already the name of rules[{first}]; give each rule its own name"
                ),
            );
        }
        let mut patterns = Vec::new();
        if rule.tags.as_slice().is_empty() {
            problem(
                "tags",
                format!(
                    "rule `{name}` lists no tag pattern; write one like \"press-*/oil_temp\", or \"*\" for every tag"
                ),
            );
        }
        for (j, text) in rule.tags.as_slice().iter().enumerate() {
            match TagPattern::parse(text) {
                Ok(p) => patterns.push(p),
                Err(e) => problem(&format!("tags[{j}]"), e),
            }
        }
        let mut checks = Vec::new();
        if rule.not_null {
            checks.push(Check::NotNull);
        }
        if rule.finite {
            checks.push(Check::Finite);
        }
        if let Some([min, max]) = rule.range {
            if !min.is_finite() || !max.is_finite() {
                problem(
                    "range",
                    format!(
                        "[{min}, {max}] has an end that is not a finite number; write two numbers like [-20.0, 150.0]"
                    ),
                );
            } else if min > max {
                problem(
                    "range",
                    format!("[{min}, {max}] has its min above its max; write [{max}, {min}]"),
                );
            }
            checks.push(Check::Range { min, max });
        }
        for (field, duration, make) in [
            (
                "max_future_skew",
                rule.max_future_skew,
                Check::MaxFutureSkew as fn(Duration) -> Check,
            ),
            (
                "max_age",
                rule.max_age,
                Check::MaxAge as fn(Duration) -> Check,
            ),
        ] {
            if let Some(d) = duration {
                if d.0.is_zero() {
                    problem(
                        field,
                        "is zero, which every reading would break; write a duration like \"5m\" (units ms, s, m, h)"
                            .to_owned(),
                    );
                }
                checks.push(make(d.0));
            }
        }
        match checks.len() {
            0 => problem(
                "",
                format!("rule `{name}` has no check; add exactly one of {CHECK_HELP}"),
            ),
            1 => compiled.push(Rule {
                name: name.clone(),
                patterns,
                check: checks.remove(0),
                action: rule.action,
            }),
            _ => problem(
                "",
                format!(
                    "rule `{name}` has {} checks ({}); a rule has exactly one, so split it into one rule per check",
                    checks.len(),
                    checks
                        .iter()
                        .map(Check::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
    if problems.is_empty() {
        Ok(RuleSet::new(compiled))
    } else {
        Err(problems)
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
