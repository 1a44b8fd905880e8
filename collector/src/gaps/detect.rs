//! Turning what one chunk of a gateway's batches shows into gap rows: a pure function of the
//! readings watermark, the `seq`s about to be applied, the agent's gap records and the
//! quarantined batch files, so a retried pass derives the same rows.
//!
//! # The explanation rule
//! A *jump* is a run of `seq`s missing between two consecutive readings that reach the
//! collector (the watermark counts as the reading before the first). Readings a row-level rule
//! quarantines count as having reached it: they are in the `quarantined_rows` table, not lost.
//! 1. Every agent record becomes one row with the agent's reason, range and count. The `seq`s
//!    it covers are explained, so a jump over them adds no `seq_jump` row of its own.
//! 2. What remains of a jump is split at the quarantined batch files whose key's first `seq`
//!    falls in it: each such file explains from its first `seq` to its last (when its footer or
//!    rows could be read), else up to the next quarantined file or the end of the jump:
//!    reason `quarantined`, with the quarantine key.
//! 3. Whatever is still unexplained is a `seq_jump`, attributed to the batch that holds the
//!    reading after the jump.
//! 4. Nothing at or below `floor` (the higher of the gateway's gaps and readings watermarks) is
//!    recorded again: a row whose `first_seq` is at or below it is dropped, except an agent
//!    record that reaches above it, which is cut to start at `floor + 1` (its count capped at
//!    the new width). That keeps the key (`gateway`, `first_seq`) unique, and it is what a
//!    `damaged_buffer` record starting at `seq` 1 needs: only the readings the collector does
//!    not have are lost.
//! 5. Nothing inside the gateway's fresh range (batch contract v3) is a gap: the fresh lane put
//!    those readings in the table. A row reaching into the range is cut at it, or split in two
//!    around it ([`outside_fresh_range`]); a cut row keeps at most the new width as its count.

use crate::delta::{FreshRange, GapRow, REASON_QUARANTINED, REASON_SEQ_JUMP};

use super::agent::AgentGap;

/// `seq`s missing between two readings, and the batch that holds the reading after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub first_seq: i64,
    pub last_seq: i64,
    pub file_key: String,
}

/// A batch file in the quarantine: its key's first `seq`, its last `seq` when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRange {
    pub first_seq: i64,
    pub last_seq: Option<i64>,
    pub quarantine_key: String,
}

/// The jumps in `seqs` (each batch's applied `seq`s in order, with the batch's key), starting
/// after `previous` (the watermark; `None` when nothing came before).
pub fn find_jumps<'a>(
    mut previous: Option<i64>,
    seqs: impl IntoIterator<Item = (&'a str, &'a [i64])>,
) -> Vec<Jump> {
    let mut jumps = Vec::new();
    for (file_key, batch) in seqs {
        for &seq in batch {
            if let Some(p) = previous
                && seq > p + 1
            {
                jumps.push(Jump {
                    first_seq: p + 1,
                    last_seq: seq - 1,
                    file_key: file_key.to_owned(),
                });
            }
            previous = Some(previous.map_or(seq, |p| p.max(seq)));
        }
    }
    jumps
}

/// The gap rows for `jumps`, explained by the agent's records (each with the key of the batch
/// that carried it) and the quarantined files, sorted by `first_seq`, one per `first_seq`, all
/// above `floor`.
pub fn explain(
    gateway: &str,
    jumps: &[Jump],
    agent: &[(AgentGap, String)],
    quarantined: &[QuarantinedRange],
    floor: Option<i64>,
    now_us: i64,
) -> Vec<GapRow> {
    let mut rows: Vec<GapRow> = Vec::new();
    let mut covered: Vec<(i64, i64)> = Vec::new();
    for (record, file_key) in agent {
        let first = floor.map_or(record.first_seq, |f| record.first_seq.max(f + 1));
        if first > record.last_seq || rows.iter().any(|r| r.first_seq == first) {
            continue;
        }
        covered.push((first, record.last_seq));
        rows.push(GapRow {
            gateway: gateway.to_owned(),
            first_seq: first,
            last_seq: record.last_seq,
            readings: record.readings.min(record.last_seq - first + 1),
            reason: record.reason.clone(),
            detected_at_us: record.detected_at_us,
            file_key: file_key.clone(),
        });
    }
    let gap = |first: i64, last: i64, reason: &str, key: &str| GapRow {
        gateway: gateway.to_owned(),
        first_seq: first,
        last_seq: last,
        readings: last - first + 1,
        reason: reason.to_owned(),
        detected_at_us: now_us,
        file_key: key.to_owned(),
    };
    let mut files: Vec<&QuarantinedRange> = quarantined.iter().collect();
    files.sort_by_key(|q| q.first_seq);
    for jump in jumps {
        for (lo, hi) in subtract((jump.first_seq, jump.last_seq), &covered) {
            let inside: Vec<&&QuarantinedRange> = files
                .iter()
                .filter(|q| (lo..=hi).contains(&q.first_seq))
                .collect();
            let mut cursor = lo;
            for (k, q) in inside.iter().enumerate() {
                if q.first_seq > cursor {
                    rows.push(gap(
                        cursor,
                        q.first_seq - 1,
                        REASON_SEQ_JUMP,
                        &jump.file_key,
                    ));
                }
                let next_start = inside.get(k + 1).map_or(hi + 1, |n| n.first_seq);
                let end = q
                    .last_seq
                    .unwrap_or(hi)
                    .min(next_start - 1)
                    .min(hi)
                    .max(q.first_seq);
                rows.push(gap(q.first_seq, end, REASON_QUARANTINED, &q.quarantine_key));
                cursor = end + 1;
            }
            if cursor <= hi {
                rows.push(gap(cursor, hi, REASON_SEQ_JUMP, &jump.file_key));
            }
        }
    }
    rows.retain(|r| floor.is_none_or(|f| r.first_seq > f));
    rows.sort_by_key(|r| r.first_seq);
    rows.dedup_by_key(|r| r.first_seq);
    rows
}

/// `rows` (sorted by `first_seq`) with every part inside `fresh` taken out: what lies wholly
/// inside goes, what reaches into it is cut at it, what spans it is split around it.
pub fn outside_fresh_range(rows: Vec<GapRow>, fresh: Option<FreshRange>) -> Vec<GapRow> {
    let Some(fresh) = fresh else {
        return rows;
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        for (first, last) in subtract((row.first_seq, row.last_seq), &[(fresh.first, fresh.last)]) {
            out.push(GapRow {
                first_seq: first,
                last_seq: last,
                readings: row.readings.min(last - first + 1),
                ..row.clone()
            });
        }
    }
    out.sort_by_key(|r| r.first_seq);
    out.dedup_by_key(|r| r.first_seq);
    out
}

/// `range` minus the union of `cut`, as ordered sub-ranges.
fn subtract(range: (i64, i64), cut: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut cut: Vec<(i64, i64)> = cut
        .iter()
        .copied()
        .filter(|&(a, b)| b >= range.0 && a <= range.1)
        .collect();
    cut.sort_unstable();
    let mut out = Vec::new();
    let mut cursor = range.0;
    for (a, b) in cut {
        if a > cursor {
            out.push((cursor, a - 1));
        }
        cursor = cursor.max(b.saturating_add(1));
        if cursor > range.1 {
            return out;
        }
    }
    if cursor <= range.1 {
        out.push((cursor, range.1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_767_225_600_000_000;

    fn record(first: i64, last: i64, reason: &str) -> (AgentGap, String) {
        (
            AgentGap {
                first_seq: first,
                last_seq: last,
                readings: last - first + 1,
                reason: reason.into(),
                detected_at_us: 5,
            },
            "raw/b".into(),
        )
    }

    fn summary(rows: &[GapRow]) -> Vec<(i64, i64, &str, &str)> {
        rows.iter()
            .map(|r| {
                (
                    r.first_seq,
                    r.last_seq,
                    r.reason.as_str(),
                    r.file_key.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn jumps_are_found_between_readings_and_after_the_watermark() {
        let a = [4, 5, 9];
        let b = [10, 12];
        let jumps = find_jumps(Some(1), [("k1", &a[..]), ("k2", &b[..])]);
        assert_eq!(
            jumps,
            vec![
                Jump {
                    first_seq: 2,
                    last_seq: 3,
                    file_key: "k1".into()
                },
                Jump {
                    first_seq: 6,
                    last_seq: 8,
                    file_key: "k1".into()
                },
                Jump {
                    first_seq: 11,
                    last_seq: 11,
                    file_key: "k2".into()
                },
            ]
        );
        assert!(find_jumps(None, [("k", &[7, 8][..])]).is_empty());
    }

    #[test]
    fn an_agent_record_replaces_the_jump_it_explains() {
        let jumps = find_jumps(Some(5), [("raw/b", &[10][..])]);
        let rows = explain(
            "gw",
            &jumps,
            &[record(6, 9, "buffer_full")],
            &[],
            Some(5),
            NOW,
        );
        assert_eq!(summary(&rows), vec![(6, 9, "buffer_full", "raw/b")]);
        assert_eq!((rows[0].readings, rows[0].detected_at_us), (4, 5));
        // Partly explained: the rest stays a seq_jump.
        let rows = explain("gw", &jumps, &[record(8, 9, "max_age")], &[], Some(5), NOW);
        assert_eq!(
            summary(&rows),
            vec![(6, 7, "seq_jump", "raw/b"), (8, 9, "max_age", "raw/b")]
        );
        assert_eq!(rows[0].detected_at_us, NOW);
    }

    #[test]
    fn records_are_cut_at_the_floor_and_nothing_below_it_is_recorded_again() {
        // The gateway lost its buffer and cannot tell where the loss started: 1..=30.
        let jumps = find_jumps(Some(20), [("raw/b", &[31][..])]);
        let damaged = record(1, 30, "damaged_buffer");
        let rows = explain(
            "gw",
            &jumps,
            std::slice::from_ref(&damaged),
            &[],
            Some(20),
            NOW,
        );
        assert_eq!(summary(&rows), vec![(21, 30, "damaged_buffer", "raw/b")]);
        assert_eq!(rows[0].readings, 10);
        // Already recorded up to 25 (a retried pass): only what is above is new.
        let rows = explain("gw", &jumps, &[damaged], &[], Some(25), NOW);
        assert_eq!(summary(&rows), vec![(26, 30, "damaged_buffer", "raw/b")]);
        assert!(explain("gw", &jumps, &[], &[], Some(30), NOW).is_empty());
        let old = record(2, 4, "max_age");
        assert!(explain("gw", &[], &[old], &[], Some(4), NOW).is_empty());
    }

    #[test]
    fn quarantined_files_split_a_jump() {
        let jumps = vec![Jump {
            first_seq: 4,
            last_seq: 20,
            file_key: "raw/21".into(),
        }];
        let q = |first, last, key: &str| QuarantinedRange {
            first_seq: first,
            last_seq: last,
            quarantine_key: key.into(),
        };
        let rows = explain(
            "gw",
            &jumps,
            &[],
            &[
                q(6, Some(8), "q/6"),
                q(12, None, "q/12"),
                q(15, None, "q/15"),
            ],
            Some(3),
            NOW,
        );
        assert_eq!(
            summary(&rows),
            vec![
                (4, 5, "seq_jump", "raw/21"),
                (6, 8, "quarantined", "q/6"),
                (9, 11, "seq_jump", "raw/21"),
                (12, 14, "quarantined", "q/12"),
                (15, 20, "quarantined", "q/15"),
            ]
        );
        // Files outside every jump explain nothing.
        assert!(explain("gw", &[], &[], &[q(6, Some(8), "q/6")], None, NOW).is_empty());
    }

    #[test]
    fn nothing_inside_the_fresh_range_is_a_gap() {
        let jumps = [
            Jump {
                first_seq: 5,
                last_seq: 9,
                file_key: "raw/a".into(),
            },
            Jump {
                first_seq: 12,
                last_seq: 30,
                file_key: "raw/b".into(),
            },
            Jump {
                first_seq: 40,
                last_seq: 44,
                file_key: "raw/c".into(),
            },
        ];
        let rows = explain("gw", &jumps, &[], &[], None, NOW);
        let fresh = Some(FreshRange { first: 8, last: 20 });
        let cut = outside_fresh_range(rows.clone(), fresh);
        assert_eq!(
            summary(&cut),
            vec![
                (5, 7, REASON_SEQ_JUMP, "raw/a"),
                (21, 30, REASON_SEQ_JUMP, "raw/b"),
                (40, 44, REASON_SEQ_JUMP, "raw/c"),
            ]
        );
        assert_eq!(cut[0].readings, 3);
        // A range inside a gap splits it in two.
        let split = outside_fresh_range(
            rows,
            Some(FreshRange {
                first: 15,
                last: 16,
            }),
        );
        assert_eq!(
            summary(&split)[1..3],
            [
                (12, 14, REASON_SEQ_JUMP, "raw/b"),
                (17, 30, REASON_SEQ_JUMP, "raw/b")
            ]
        );
        assert_eq!(outside_fresh_range(Vec::new(), fresh), Vec::new());
    }

    #[test]
    fn subtracting_ranges_keeps_what_is_left_in_order() {
        assert_eq!(subtract((1, 10), &[]), vec![(1, 10)]);
        assert_eq!(subtract((1, 10), &[(3, 4), (8, 20)]), vec![(1, 2), (5, 7)]);
        assert_eq!(subtract((1, 10), &[(0, 10)]), vec![]);
        assert_eq!(subtract((5, 6), &[(1, 2)]), vec![(5, 6)]);
    }
}
