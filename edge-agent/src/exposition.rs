//! Pieces of the Prometheus text exposition format (version 0.0.4) that both programs' `/metrics`
//! write: the `# HELP`/`# TYPE` header, label escaping and a fixed-bucket histogram. Standard
//! library only, so the collector shares it with the agent's runtime features off.

use std::fmt::Write as _;

/// Writes the `# HELP` and `# TYPE` lines of one metric.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format requires: backslash, quote and newline escaped.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Observations counted into `N` buckets whose upper bounds the owner keeps (one constant per
/// metric), plus the implicit `+Inf` bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram<const N: usize> {
    /// Observations per bucket (not cumulative; summed when rendered).
    buckets: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    /// Counts `value` into the first bucket whose bound is at least `value` (or only `+Inf`).
    pub fn observe(&mut self, bounds: &[f64; N], value: f64) {
        if let Some(i) = bounds.iter().position(|&le| value <= le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += value;
    }

    /// Writes the histogram `name` with its header: cumulative buckets, `_sum` and `_count`.
    pub fn render(&self, out: &mut String, name: &str, help: &str, bounds: &[f64; N]) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (le, n) in bounds.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_backslash_quote_and_newline() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn buckets_render_cumulatively_with_infinity_sum_and_count() {
        const BOUNDS: [f64; 2] = [0.5, 1.0];
        let mut h = Histogram::<2>::default();
        for value in [0.25, 0.75, 3.0] {
            h.observe(&BOUNDS, value);
        }
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Some time.", &BOUNDS);
        assert_eq!(
            out,
            "# HELP x_seconds Some time.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.5\"} 1\nx_seconds_bucket{le=\"1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 4\nx_seconds_count 3\n"
        );
    }
}
