//! Compiled rules and their evaluation on the rows of a batch.
//!
//! A reading carries a number (`value`), the text of a string tag (`value_text`, batch contract
//! v2) or neither (quality `bad`); see [`Observed`]. `not_null` passes on either; `finite` and
//! `range` judge numbers and let texts (and nulls) pass; the time checks judge every reading.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch, StringArray};
use chrono::{DateTime, SecondsFormat};
use edge_agent::contract::column;

use super::config::RuleAction;
use super::pattern::TagPattern;

/// The value of one reading as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Observed<'a> {
    /// Neither a number nor a text: a bad reading.
    Null,
    /// A number (`value`).
    Number(f64),
    /// The text of a string tag (`value_text`).
    Text(&'a str),
}

impl Observed<'_> {
    fn number(self) -> Option<f64> {
        match self {
            Observed::Number(v) => Some(v),
            Observed::Null | Observed::Text(_) => None,
        }
    }
}

impl From<Option<f64>> for Observed<'_> {
    fn from(value: Option<f64>) -> Self {
        value.map_or(Observed::Null, Observed::Number)
    }
}

/// What a rule checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// The reading has a value: a number or a text.
    NotNull,
    /// A number is not NaN or infinite (null and text pass).
    Finite,
    /// `min <= value <= max` for a number (null and text pass, NaN does not).
    Range { min: f64, max: f64 },
    /// `ts - now <= skew`.
    MaxFutureSkew(Duration),
    /// `now - ts <= age`.
    MaxAge(Duration),
}

impl Check {
    /// The check's name, as in the config and the `quarantined_rows.check` column.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotNull => "not_null",
            Self::Finite => "finite",
            Self::Range { .. } => "range",
            Self::MaxFutureSkew(_) => "max_future_skew",
            Self::MaxAge(_) => "max_age",
        }
    }

    /// `None` when the reading passes, otherwise what is wrong with it.
    pub fn test(&self, value: Observed<'_>, ts_us: i64, now_us: i64) -> Option<String> {
        match *self {
            Self::NotNull => (value == Observed::Null).then(|| "value is null".to_owned()),
            Self::Finite => value
                .number()
                .filter(|v| !v.is_finite())
                .map(|v| format!("value {v} is not a finite number")),
            Self::Range { min, max } => value
                .number()
                .filter(|v| !(min <= *v && *v <= max))
                .map(|v| format!("value {v} is outside the range [{min}, {max}]")),
            Self::MaxFutureSkew(skew) => {
                let ahead = ts_us.saturating_sub(now_us);
                (ahead > micros(skew)).then(|| {
                    format!(
                        "timestamp {} is {} ahead of the collector's clock, more than the allowed {}",
                        rfc3339(ts_us),
                        human(ahead),
                        human(micros(skew))
                    )
                })
            }
            Self::MaxAge(age) => {
                let behind = now_us.saturating_sub(ts_us);
                (behind > micros(age)).then(|| {
                    format!(
                        "timestamp {} is {} old, more than the allowed {}",
                        rfc3339(ts_us),
                        human(behind),
                        human(micros(age))
                    )
                })
            }
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us).map_or_else(
        || format!("{us} µs"),
        |t| t.to_rfc3339_opts(SecondsFormat::Micros, true),
    )
}

/// A span of microseconds as a person reads it: `90 s`, `2 h 5 min`.
fn human(us: i64) -> String {
    let s = us / 1_000_000;
    if s < 120 {
        format!("{}.{:03} s", s, (us % 1_000_000) / 1000)
    } else if s < 7200 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

/// One compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub patterns: Vec<TagPattern>,
    pub check: Check,
    pub action: RuleAction,
}

impl Rule {
    fn applies_to(&self, device: &str, tag: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(device, tag))
    }
}

/// The configured rules, in config order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether any rule has `action`.
    pub fn has(&self, action: RuleAction) -> bool {
        self.rules.iter().any(|r| r.action == action)
    }
}

/// A broken rule on one reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Index of the rule in the [`RuleSet`].
    pub rule: usize,
    /// What the check found.
    pub detail: String,
}

/// What the rules say about one reading. Every broken `flag` rule is listed; of the
/// `quarantine` and `fail` rules, the first broken one (config order) is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowVerdict {
    pub flags: Vec<usize>,
    pub quarantine: Option<Violation>,
    pub fail: Option<Violation>,
}

/// The first reading of a batch that breaks a `fail` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub seq: i64,
    pub device: String,
    pub tag: String,
    pub violation: Violation,
}

/// Evaluates rules against one clock reading, remembering which rules apply to which tag.
#[derive(Debug)]
pub struct Judge<'a> {
    set: &'a RuleSet,
    now_us: i64,
    /// device → tag → indices of the rules whose patterns match.
    applicable: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl<'a> Judge<'a> {
    /// A judge for `set` whose time checks compare against `now_us` (the collector's clock,
    /// microseconds since the epoch).
    pub fn new(set: &'a RuleSet, now_us: i64) -> Self {
        Self {
            set,
            now_us,
            applicable: HashMap::new(),
        }
    }

    pub fn rules(&self) -> &'a RuleSet {
        self.set
    }

    /// The verdict on one reading.
    pub fn judge(
        &mut self,
        device: &str,
        tag: &str,
        value: Observed<'_>,
        ts_us: i64,
    ) -> RowVerdict {
        let Self {
            set,
            now_us,
            applicable,
        } = self;
        let by_tag = if let Some(m) = applicable.get_mut(device) {
            m
        } else {
            applicable.entry(device.to_owned()).or_default()
        };
        let indices = if let Some(v) = by_tag.get(tag) {
            v
        } else {
            let found = set
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.applies_to(device, tag))
                .map(|(i, _)| i)
                .collect();
            by_tag.entry(tag.to_owned()).or_insert(found)
        };
        let mut verdict = RowVerdict::default();
        for &i in indices {
            let rule = &set.rules[i];
            let slot = match rule.action {
                RuleAction::Flag => None,
                RuleAction::Quarantine if verdict.quarantine.is_some() => continue,
                RuleAction::Quarantine => Some(&mut verdict.quarantine),
                RuleAction::Fail if verdict.fail.is_some() => continue,
                RuleAction::Fail => Some(&mut verdict.fail),
            };
            if let Some(detail) = rule.check.test(value, ts_us, *now_us) {
                match slot {
                    None => verdict.flags.push(i),
                    Some(slot) => *slot = Some(Violation { rule: i, detail }),
                }
            }
        }
        verdict
    }

    /// The verdicts on every row of `batch` (in the contract's schema).
    pub fn judge_batch(&mut self, batch: &RecordBatch) -> Vec<RowVerdict> {
        let cols = Columns::of(batch);
        (0..batch.num_rows())
            .map(|i| {
                let value = cols.observed(i);
                self.judge(
                    cols.device.value(i),
                    cols.tag.value(i),
                    value,
                    cols.ts.value(i),
                )
            })
            .collect()
    }

    /// The first row of `batch` with `seq` above `above` that breaks a `fail` rule.
    pub fn first_failure(&mut self, batch: &RecordBatch, above: Option<i64>) -> Option<Failure> {
        if !self.set.has(RuleAction::Fail) {
            return None;
        }
        let cols = Columns::of(batch);
        for i in 0..batch.num_rows() {
            let seq = cols.seq.value(i);
            if above.is_some_and(|a| seq <= a) {
                continue;
            }
            let (device, tag) = (cols.device.value(i), cols.tag.value(i));
            let value = cols.observed(i);
            if let Some(violation) = self.judge(device, tag, value, cols.ts.value(i)).fail {
                return Some(Failure {
                    seq,
                    device: device.to_owned(),
                    tag: tag.to_owned(),
                    violation,
                });
            }
        }
        None
    }
}

/// The columns the rules read, by name.
struct Columns<'b> {
    seq: &'b arrow_array::PrimitiveArray<Int64Type>,
    ts: &'b arrow_array::PrimitiveArray<TimestampMicrosecondType>,
    device: &'b arrow_array::StringArray,
    tag: &'b arrow_array::StringArray,
    value: &'b arrow_array::PrimitiveArray<Float64Type>,
    /// Absent in a batch of contract v1 that was not upgraded: no row has a text.
    value_text: Option<&'b StringArray>,
}

impl<'b> Columns<'b> {
    fn of(batch: &'b RecordBatch) -> Self {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .expect("batches are validated against the contract before rules see them")
        };
        Self {
            seq: col(column::SEQ).as_primitive(),
            ts: col(column::TS).as_primitive(),
            device: col(column::DEVICE).as_string(),
            tag: col(column::TAG).as_string(),
            value: col(column::VALUE).as_primitive(),
            value_text: batch
                .column_by_name(column::VALUE_TEXT)
                .map(AsArray::as_string),
        }
    }

    fn observed(&self, i: usize) -> Observed<'b> {
        if !self.value.is_null(i) {
            return Observed::Number(self.value.value(i));
        }
        match self.value_text {
            Some(text) if !text.is_null(i) => Observed::Text(text.value(i)),
            _ => Observed::Null,
        }
    }
}

/// What the rules did in a pass, per rule name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    /// Readings kept with the rule named in `dq_flags` (`flag` rules).
    pub flagged: usize,
    /// Readings moved to the `quarantined_rows` table (`quarantine` rules; a reading counts for
    /// the first such rule it broke).
    pub quarantined: usize,
    /// Batch files moved to the file quarantine (`fail` rules).
    pub failed_files: usize,
}

impl RuleCounts {
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    pub fn add(&mut self, other: &Self) {
        self.flagged += other.flagged;
        self.quarantined += other.quarantined;
        self.failed_files += other.failed_files;
    }
}

/// Counts per rule name, sorted by name.
pub type RuleCountsByName = BTreeMap<String, RuleCounts>;

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000_000;

    fn rule(name: &str, tags: &str, check: Check, action: RuleAction) -> Rule {
        Rule {
            name: name.into(),
            patterns: vec![TagPattern::parse(tags).unwrap()],
            check,
            action,
        }
    }

    #[test]
    fn each_check_names_what_it_found() {
        let t = |c: Check, v: Option<f64>, ts: i64| c.test(v.into(), ts, NOW);
        assert_eq!(t(Check::NotNull, None, NOW).unwrap(), "value is null");
        assert_eq!(t(Check::NotNull, Some(1.0), NOW), None);
        assert_eq!(
            t(Check::Finite, Some(f64::NAN), NOW).unwrap(),
            "value NaN is not a finite number"
        );
        assert_eq!(t(Check::Finite, None, NOW), None);
        let range = Check::Range {
            min: -20.0,
            max: 150.0,
        };
        assert_eq!(
            t(range, Some(180.5), NOW).unwrap(),
            "value 180.5 is outside the range [-20, 150]"
        );
        assert!(t(range, Some(f64::NAN), NOW).is_some());
        assert_eq!(t(range, Some(150.0), NOW), None);
        assert_eq!(t(range, None, NOW), None);
        let skew = Check::MaxFutureSkew(Duration::from_mins(5));
        assert_eq!(t(skew, Some(1.0), NOW + 300_000_000), None);
        assert_eq!(
            t(skew, Some(1.0), NOW + 3_600_000_000).unwrap(),
            "timestamp 2026-01-01T01:00:00.000000Z is 60 min 0 s ahead of the collector's clock, more than the allowed 5 min 0 s"
        );
        let age = Check::MaxAge(Duration::from_hours(1));
        assert_eq!(t(age, Some(1.0), NOW - 3_600_000_000), None);
        assert_eq!(
            t(age, Some(1.0), NOW - 90_000_000_000).unwrap(),
            "timestamp 2025-12-30T23:00:00.000000Z is 25 h 0 min old, more than the allowed 60 min 0 s"
        );
    }

    #[test]
    fn a_row_gets_every_broken_flag_and_the_first_broken_quarantine_and_fail_rule() {
        let set = RuleSet::new(vec![
            rule("finite", "*", Check::Finite, RuleAction::Flag),
            rule(
                "range-a",
                "*_temp",
                Check::Range { min: 0.0, max: 1.0 },
                RuleAction::Flag,
            ),
            rule(
                "range-q1",
                "press-*/oil_temp",
                Check::Range { min: 0.0, max: 1.0 },
                RuleAction::Quarantine,
            ),
            rule(
                "range-q2",
                "oil_temp",
                Check::Range { min: 0.0, max: 1.0 },
                RuleAction::Quarantine,
            ),
            rule("null-fail", "*", Check::NotNull, RuleAction::Fail),
        ]);
        let mut judge = Judge::new(&set, NOW);
        let v = judge.judge("press-3", "oil_temp", Some(5.0).into(), NOW);
        assert_eq!(v.flags, vec![1]);
        assert_eq!(v.quarantine.as_ref().map(|q| q.rule), Some(2));
        assert_eq!(v.fail, None);
        let v = judge.judge("pump-1", "oil_temp", Some(5.0).into(), NOW);
        assert_eq!(v.quarantine.as_ref().map(|q| q.rule), Some(3));
        let v = judge.judge("pump-1", "flow", Observed::Null, NOW);
        assert_eq!(
            v.fail,
            Some(Violation {
                rule: 4,
                detail: "value is null".into()
            })
        );
        assert_eq!(
            judge.judge("pump-1", "flow", Some(0.5).into(), NOW),
            RowVerdict::default()
        );
    }

    #[test]
    fn a_string_reading_has_a_value_and_skips_the_number_checks() {
        let text = Observed::Text("MIX-7");
        let empty = Observed::Text("");
        for check in [
            Check::NotNull,
            Check::Finite,
            Check::Range { min: 0.0, max: 1.0 },
        ] {
            assert_eq!(check.test(text, NOW, NOW), None, "{check:?}");
            assert_eq!(check.test(empty, NOW, NOW), None, "{check:?}");
        }
        // The time checks judge texts as any reading.
        let age = Check::MaxAge(Duration::from_hours(1));
        assert!(age.test(text, NOW - 7_200_000_000, NOW).is_some());
        assert_eq!(
            Check::NotNull.test(Observed::Null, NOW, NOW).unwrap(),
            "value is null"
        );
    }

    #[test]
    fn a_batch_of_numbers_and_texts_is_judged_by_what_each_row_carries() {
        use edge_agent::contract::{Quality, Row, to_record_batch};
        let row = |seq: i64, value: Option<f64>, text: Option<&str>| Row {
            seq,
            ts_us: NOW,
            site: "s".into(),
            gateway: "gw".into(),
            device: "mixer-1".into(),
            tag: "t".into(),
            value,
            quality: if value.is_some() || text.is_some() {
                Quality::Good
            } else {
                Quality::Bad
            },
            unit: None,
            value_text: text.map(str::to_owned),
        };
        let batch = to_record_batch(&[
            row(1, Some(5.0), None),
            row(2, None, Some("MIX-7")),
            row(3, None, None),
        ]);
        let set = RuleSet::new(vec![
            rule("present", "*", Check::NotNull, RuleAction::Flag),
            rule(
                "in-range",
                "*",
                Check::Range { min: 0.0, max: 1.0 },
                RuleAction::Flag,
            ),
        ]);
        let flags: Vec<Vec<usize>> = Judge::new(&set, NOW)
            .judge_batch(&batch)
            .into_iter()
            .map(|v| v.flags)
            .collect();
        assert_eq!(flags, vec![vec![1], vec![], vec![0]]);
    }
}
