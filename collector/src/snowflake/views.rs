//! The analytics views `collector snowflake init` creates over the readings table.
//!
//! They are plain SQL that Snowflake accepts and that local stand-ins built on `DuckDB` can run
//! too (`QUALIFY`, `COUNT_IF`, `IFF`, `DATEDIFF`, sliding window frames). All timestamps stay in
//! UTC, as the loader writes them; BI tools convert to the plant's time zone for display.
//!
//! Views are recreated with `CREATE OR REPLACE VIEW` on every `init`, so a new collector version
//! can change them; they hold no data.

/// Readings that precede a reading and form its baseline for the anomaly flag.
pub const ANOMALY_WINDOW: u32 = 30;
/// A reading is only judged against a baseline of at least this many good readings: with fewer,
/// the standard deviation says little and the flag would fire on start-up noise.
pub const ANOMALY_MIN_BASELINE: u32 = 10;
/// A reading is an anomaly when it lies more than this many standard deviations from the mean
/// of its baseline.
pub const ANOMALY_Z_LIMIT: f64 = 3.0;

/// Hourly aggregates per tag.
pub const HOURLY: &str = "READINGS_HOURLY";
/// The latest reading per tag, with its age.
pub const LATEST: &str = "TAG_LATEST";
/// Data freshness per gateway.
pub const FRESHNESS: &str = "GATEWAY_FRESHNESS";
/// Readings with their rolling z-score and anomaly flag.
pub const ANOMALIES: &str = "READINGS_ANOMALIES";
/// Known gaps with the number of readings each one lost and the times around them.
pub const KNOWN_GAPS: &str = "KNOWN_GAPS";

/// One view: its unqualified name, what it answers (for the script's comments) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) name: &'static str,
    pub(crate) purpose: &'static str,
    pub(crate) query: String,
}

/// The views over `readings` and `gaps` (both written into the SQL as given, normally
/// fully qualified so the views do not depend on the session's schema).
pub(crate) fn views(readings: &str, gaps: &str) -> Vec<View> {
    let tag_key = "SITE, GATEWAY, DEVICE, TAG";
    // The window is "the previous N good readings of the same tag", excluding the reading
    // itself, so an outlier does not dilute its own baseline.
    let baseline = format!(
        "OVER (PARTITION BY {tag_key} ORDER BY TS, SEQ ROWS BETWEEN {ANOMALY_WINDOW} PRECEDING AND 1 PRECEDING)"
    );
    vec![
        View {
            name: HOURLY,
            purpose: "min, max, avg and count of each tag's values per UTC hour; bad readings (no value) are counted but not aggregated",
            query: format!(
                "SELECT {tag_key},
       DATE_TRUNC('HOUR', TS) AS HOUR_START,
       MAX(UNIT) AS UNIT,
       COUNT(*) AS READING_COUNT,
       COUNT(VALUE) AS VALUE_COUNT,
       COUNT_IF(QUALITY = 'good') AS GOOD_COUNT,
       COUNT_IF(QUALITY = 'uncertain') AS UNCERTAIN_COUNT,
       COUNT_IF(QUALITY = 'bad') AS BAD_COUNT,
       MIN(VALUE) AS MIN_VALUE,
       MAX(VALUE) AS MAX_VALUE,
       AVG(VALUE) AS AVG_VALUE
  FROM {readings}
 GROUP BY {tag_key}, DATE_TRUNC('HOUR', TS)"
            ),
        },
        View {
            name: LATEST,
            purpose: "each tag's most recent reading and how many seconds old it is",
            query: format!(
                "SELECT {tag_key}, SEQ, TS, VALUE, QUALITY, UNIT,
       DATEDIFF('second', TS, CURRENT_TIMESTAMP()) AS AGE_SECONDS
  FROM {readings}
QUALIFY ROW_NUMBER() OVER (PARTITION BY {tag_key} ORDER BY TS DESC, SEQ DESC) = 1"
            ),
        },
        View {
            name: FRESHNESS,
            purpose: "per gateway: the newest reading, its age in seconds and the readings of the last hour; an old LAST_TS means the gateway or its uplink is down",
            query: format!(
                "SELECT SITE, GATEWAY,
       MAX(TS) AS LAST_TS,
       MAX(SEQ) AS LAST_SEQ,
       DATEDIFF('second', MAX(TS), CURRENT_TIMESTAMP()) AS AGE_SECONDS,
       COUNT(DISTINCT DEVICE || '/' || TAG) AS TAG_COUNT,
       COUNT_IF(TS >= DATEADD('hour', -1, CURRENT_TIMESTAMP())) AS READINGS_LAST_HOUR
  FROM {readings}
 GROUP BY SITE, GATEWAY"
            ),
        },
        View {
            name: ANOMALIES,
            purpose: "every good reading with the mean and sample standard deviation of the tag's previous good readings (the baseline) and its z-score; IS_ANOMALY when |z| exceeds the limit",
            query: format!(
                "SELECT {tag_key}, SEQ, TS, VALUE, UNIT,
       BASELINE_COUNT, BASELINE_MEAN, BASELINE_STDDEV,
       IFF(BASELINE_COUNT >= {ANOMALY_MIN_BASELINE} AND BASELINE_STDDEV > 0,
           (VALUE - BASELINE_MEAN) / BASELINE_STDDEV, NULL) AS Z_SCORE,
       COALESCE(ABS(Z_SCORE) > {ANOMALY_Z_LIMIT:.1}, FALSE) AS IS_ANOMALY
  FROM (SELECT {tag_key}, SEQ, TS, VALUE, UNIT,
               COUNT(VALUE) {baseline} AS BASELINE_COUNT,
               AVG(VALUE) {baseline} AS BASELINE_MEAN,
               STDDEV_SAMP(VALUE) {baseline} AS BASELINE_STDDEV
          FROM {readings}
         WHERE QUALITY = 'good' AND VALUE IS NOT NULL) BASELINES"
            ),
        },
        View {
            name: KNOWN_GAPS,
            purpose: "seq ranges that will never arrive, with the readings each lost, the reason and the times of the readings around the gap (the last before it, the first after it), so reports can tell missing data from lost data",
            query: format!(
                "SELECT G.GATEWAY, G.FIRST_SEQ, G.LAST_SEQ, G.READINGS AS MISSING_READINGS,
       G.REASON, G.FILE_KEY, G.DETECTED_AT,
       BEFORE_GAP.TS AS LAST_TS_BEFORE, AFTER_GAP.TS AS FIRST_TS_AFTER
  FROM {gaps} G
  LEFT JOIN {readings} BEFORE_GAP
    ON BEFORE_GAP.GATEWAY = G.GATEWAY AND BEFORE_GAP.SEQ = G.FIRST_SEQ - 1
  LEFT JOIN {readings} AFTER_GAP
    ON AFTER_GAP.GATEWAY = G.GATEWAY AND AFTER_GAP.SEQ = G.LAST_SEQ + 1"
            ),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_anomaly_view_looks_back_over_the_previous_readings_only() {
        let views = views("PLANT.RAW.READINGS", "PLANT.RAW.GAPS");
        let names: Vec<&str> = views.iter().map(|v| v.name).collect();
        assert_eq!(
            names,
            [HOURLY, LATEST, FRESHNESS, ANOMALIES, KNOWN_GAPS],
            "views"
        );
        let anomalies = &views[3].query;
        assert!(anomalies.contains("ROWS BETWEEN 30 PRECEDING AND 1 PRECEDING"));
        assert!(anomalies.contains("BASELINE_COUNT >= 10 AND BASELINE_STDDEV > 0"));
        assert!(anomalies.contains("ABS(Z_SCORE) > 3.0"));
    }
}
