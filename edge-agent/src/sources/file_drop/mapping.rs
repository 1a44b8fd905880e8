//! The column mapping of dropped files: file-name patterns, `device`/`tag` templates, timestamp
//! formats, and one row's cells turned into readings.

use std::collections::HashMap;

use crate::Reading;
use crate::config::{FileDrop, ValueType};
use crate::contract::Quality;
use crate::sources::mqtt::payload::parse_rfc3339;

/// Why a mapping setting or a row cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("`{template}` has an unclosed `{{`; close it with `}}`, or remove it")]
    Unclosed { template: String },
    #[error(
        "`{template}` has an empty `{{}}`; name a column like `{{station}}` or a file-name part like `{{file.station}}`"
    )]
    EmptyPlaceholder { template: String },
    #[error(
        "`{template}` uses `{{file.{part}}}`, but file_name captures no `{{{part}}}`; add `{{{part}}}` to file_name, or use a column"
    )]
    UnknownFilePart { template: String, part: String },
    #[error(
        "file_name `{pattern}` has two parts without text between them; put literal text between `{{...}}` and `*`"
    )]
    AdjacentWildcards { pattern: String },
    #[error(
        "timestamp_format `{format}` is not rfc3339, epoch_s, epoch_ms, epoch_us or a pattern with %Y, %m, %d, %H, %M and %S; write for example \"%Y-%m-%d %H:%M:%S\""
    )]
    UnknownTimestampFormat { format: String },
    #[error("column `{column}` is missing")]
    MissingColumn { column: String },
    #[error("{column} `{text}` is not {expected}")]
    BadTimestamp {
        column: String,
        text: String,
        expected: &'static str,
    },
    #[error("{column} `{text}` is not a number")]
    NotANumber { column: String, text: String },
    #[error("the {what} is empty after filling in `{template}`")]
    EmptyName {
        what: &'static str,
        template: String,
    },
}

/// One piece of a `device`/`tag` template or a file-name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Column(String),
    FilePart(String),
    /// `*` in a file-name pattern.
    Any,
}

/// A `device` or `tag` template: literal text, `{column}`, `{file.part}`.
#[derive(Debug, Clone)]
pub(super) struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template; `file_parts` are the captures `file_name` provides.
    pub(super) fn parse(template: &str, file_parts: &[String]) -> Result<Self, MappingError> {
        let pieces = split(template, false)?;
        for piece in &pieces {
            if let Piece::FilePart(part) = piece
                && !file_parts.contains(part)
            {
                return Err(MappingError::UnknownFilePart {
                    template: template.to_owned(),
                    part: part.clone(),
                });
            }
        }
        Ok(Self {
            source: template.to_owned(),
            pieces,
        })
    }

    /// A template that is this text and nothing else (the default tag: the column's name).
    pub(super) fn literal(text: &str) -> Self {
        Self {
            source: text.to_owned(),
            pieces: vec![Piece::Text(text.to_owned())],
        }
    }

    /// The columns the template reads.
    pub(super) fn columns(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Column(c) => Some(c.as_str()),
            _ => None,
        })
    }

    fn render(
        &self,
        what: &'static str,
        row: &dyn Fn(&str) -> Option<String>,
        file: &HashMap<String, String>,
    ) -> Result<String, MappingError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Column(c) => {
                    let value =
                        row(c).ok_or_else(|| MappingError::MissingColumn { column: c.clone() })?;
                    out.push_str(value.trim());
                }
                Piece::FilePart(p) => out.push_str(file.get(p).map_or("", String::as_str)),
                Piece::Any => out.push('*'),
            }
        }
        if out.trim().is_empty() {
            return Err(MappingError::EmptyName {
                what,
                template: self.source.clone(),
            });
        }
        Ok(out)
    }
}

/// Splits `{...}` placeholders from text; in a file-name pattern `*` is a wildcard and
/// `{name}` a capture.
fn split(template: &str, pattern: bool) -> Result<Vec<Piece>, MappingError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let mut name = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(MappingError::Unclosed {
                        template: template.to_owned(),
                    });
                }
                let name = name.trim().to_owned();
                if name.is_empty() || name == "file." {
                    return Err(MappingError::EmptyPlaceholder {
                        template: template.to_owned(),
                    });
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(match name.strip_prefix("file.") {
                    Some(part) if !pattern => Piece::FilePart(part.to_owned()),
                    _ if pattern => Piece::FilePart(name),
                    _ => Piece::Column(name),
                });
            }
            '*' if pattern => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Any);
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// A `file_name` pattern: literal text, `*` for any text, `{name}` capturing non-empty text.
#[derive(Debug, Clone)]
pub(super) struct FileNamePattern {
    pieces: Vec<Piece>,
}

impl FileNamePattern {
    pub(super) fn parse(pattern: &str) -> Result<Self, MappingError> {
        let pieces = split(pattern, true)?;
        // Two wildcards in a row make the split between them ambiguous.
        if pieces
            .windows(2)
            .any(|w| !matches!(w[0], Piece::Text(_)) && !matches!(w[1], Piece::Text(_)))
        {
            return Err(MappingError::AdjacentWildcards {
                pattern: pattern.to_owned(),
            });
        }
        Ok(Self { pieces })
    }

    /// The names of the captures, for `{file.name}` in templates.
    pub(super) fn parts(&self) -> Vec<String> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                Piece::FilePart(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    /// The captures when `name` matches, leftmost-shortest; `None` when it does not match.
    pub(super) fn captures(&self, name: &str) -> Option<HashMap<String, String>> {
        let mut found = HashMap::new();
        match_from(&self.pieces, name, &mut found).then_some(found)
    }
}

fn match_from(pieces: &[Piece], rest: &str, found: &mut HashMap<String, String>) -> bool {
    let Some((first, more)) = pieces.split_first() else {
        return rest.is_empty();
    };
    match first {
        Piece::Text(t) => rest
            .strip_prefix(t.as_str())
            .is_some_and(|r| match_from(more, r, found)),
        Piece::Any | Piece::FilePart(_) | Piece::Column(_) => {
            let min = usize::from(!matches!(first, Piece::Any));
            for (at, _) in rest.char_indices().chain([(rest.len(), ' ')]) {
                if at < min {
                    continue;
                }
                if match_from(more, &rest[at..], found) {
                    if let Piece::FilePart(n) = first {
                        found.insert(n.clone(), rest[..at].to_owned());
                    }
                    return true;
                }
            }
            false
        }
    }
}

/// How a row's time is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TimeFormat {
    Rfc3339,
    EpochS,
    EpochMs,
    EpochUs,
    /// A `%`-pattern read as UTC.
    Pattern(String),
}

impl TimeFormat {
    pub(super) fn parse(text: &str) -> Result<Self, MappingError> {
        Ok(match text {
            "rfc3339" => Self::Rfc3339,
            "epoch_s" => Self::EpochS,
            "epoch_ms" => Self::EpochMs,
            "epoch_us" => Self::EpochUs,
            p if ["%Y", "%m", "%d", "%H", "%M", "%S"]
                .iter()
                .all(|d| p.contains(d))
                && pattern_is_known(p) =>
            {
                Self::Pattern(p.to_owned())
            }
            _ => {
                return Err(MappingError::UnknownTimestampFormat {
                    format: text.to_owned(),
                });
            }
        })
    }

    fn expected(&self) -> &'static str {
        match self {
            Self::Rfc3339 => "an RFC 3339 time",
            Self::EpochS => "seconds since 1970",
            Self::EpochMs => "milliseconds since 1970",
            Self::EpochUs => "microseconds since 1970",
            Self::Pattern(_) => "a time in timestamp_format",
        }
    }

    /// Microseconds since the Unix epoch.
    pub(super) fn to_us(&self, text: &str) -> Option<i64> {
        let text = text.trim();
        match self {
            Self::Rfc3339 => parse_rfc3339(text),
            Self::EpochS => decimal_scaled(text, 6),
            Self::EpochMs => decimal_scaled(text, 3),
            Self::EpochUs => decimal_scaled(text, 0),
            Self::Pattern(p) => parse_pattern(p, text),
        }
    }
}

fn pattern_is_known(p: &str) -> bool {
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '%'
            && !matches!(
                chars.next(),
                Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 'f' | '%')
            )
        {
            return false;
        }
    }
    true
}

/// A decimal number times 10^`shift`, exactly (no float rounding), fractions below a
/// microsecond cut off.
fn decimal_scaled(text: &str, shift: u32) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut value = whole.parse::<i64>().ok()?.checked_mul(10_i64.pow(shift))?;
    let mut place = 10_i64.pow(shift);
    for b in fraction.bytes() {
        place /= 10;
        if place == 0 {
            break;
        }
        value = value.checked_add(i64::from(b - b'0') * place)?;
    }
    Some(if negative { -value } else { value })
}

/// Reads `text` against a `%`-pattern (`%Y %m %d %H %M %S`, `%f` fraction digits, `%%`), UTC.
fn parse_pattern(pattern: &str, text: &str) -> Option<i64> {
    let (mut year, mut month, mut day, mut hour, mut minute, mut second, mut micros) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut t = text.as_bytes();
    let mut p = pattern.chars();
    let number = |t: &mut &[u8], max_len: usize| -> Option<i64> {
        let len = t
            .iter()
            .take(max_len)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if len == 0 {
            return None;
        }
        let n = std::str::from_utf8(&t[..len]).ok()?.parse().ok()?;
        *t = &t[len..];
        Some(n)
    };
    while let Some(c) = p.next() {
        if c != '%' {
            let mut buf = [0; 4];
            t = t.strip_prefix(c.encode_utf8(&mut buf).as_bytes())?;
            continue;
        }
        match p.next()? {
            'Y' => year = number(&mut t, 4)?,
            'm' => month = number(&mut t, 2)?,
            'd' => day = number(&mut t, 2)?,
            'H' => hour = number(&mut t, 2)?,
            'M' => minute = number(&mut t, 2)?,
            'S' => second = number(&mut t, 2)?,
            'f' => {
                let len = t.iter().take_while(|b| b.is_ascii_digit()).count();
                if len == 0 {
                    return None;
                }
                let digits = std::str::from_utf8(&t[..len]).ok()?;
                let kept = &digits[..len.min(6)];
                micros =
                    kept.parse::<i64>().ok()? * 10_i64.pow(6 - u32::try_from(kept.len()).ok()?);
                t = &t[len..];
            }
            '%' => t = t.strip_prefix(b"%")?,
            _ => return None,
        }
    }
    if !t.is_empty() {
        return None;
    }
    // The RFC 3339 reader checks the calendar (month lengths, leap years) for us.
    let iso = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z");
    parse_rfc3339(&iso).map(|us| us + micros)
}

/// One value column, ready to map.
#[derive(Debug, Clone)]
pub(super) struct ValueColumn {
    pub(super) column: String,
    pub(super) tag: Template,
    pub(super) unit: Option<String>,
    pub(super) scale: f64,
    pub(super) offset: f64,
    /// `type = "string"`: the cell is recorded as text, unscaled.
    pub(super) text: bool,
}

/// A source's whole mapping, parsed once.
#[derive(Debug, Clone)]
pub(super) struct Mapping {
    pub(super) file_name: Option<FileNamePattern>,
    pub(super) timestamp: String,
    pub(super) time_format: TimeFormat,
    pub(super) device: Template,
    pub(super) values: Vec<ValueColumn>,
}

impl Mapping {
    /// The parsed mapping, or the first problem (validation reports them all, by key).
    pub(super) fn new(config: &FileDrop) -> Result<Self, MappingError> {
        let file_name = config
            .file_name
            .as_deref()
            .map(FileNamePattern::parse)
            .transpose()?;
        let parts = file_name
            .as_ref()
            .map(FileNamePattern::parts)
            .unwrap_or_default();
        let values = config
            .values
            .iter()
            .map(|v| {
                Ok(ValueColumn {
                    column: v.column.clone(),
                    tag: match &v.tag {
                        Some(tag) => Template::parse(tag, &parts)?,
                        None => Template::literal(&v.column),
                    },
                    unit: v.unit.clone(),
                    scale: v.scale,
                    offset: v.offset,
                    text: v.value_type == ValueType::String,
                })
            })
            .collect::<Result<_, MappingError>>()?;
        Ok(Self {
            file_name,
            timestamp: config.timestamp.clone(),
            time_format: TimeFormat::parse(&config.timestamp_format)?,
            device: Template::parse(&config.device, &parts)?,
            values,
        })
    }

    /// The readings of one row. `cell` gives a column's text (`None` when the row has no such
    /// column; an empty string is an empty cell). A row gives readings for all its non-empty
    /// value cells, or an error and none.
    pub(super) fn row(
        &self,
        cell: &dyn Fn(&str) -> Option<String>,
        file: &HashMap<String, String>,
    ) -> Result<Vec<Reading>, MappingError> {
        let ts_text = cell(&self.timestamp).ok_or_else(|| MappingError::MissingColumn {
            column: self.timestamp.clone(),
        })?;
        let ts_us = self
            .time_format
            .to_us(&ts_text)
            .ok_or_else(|| MappingError::BadTimestamp {
                column: self.timestamp.clone(),
                text: ts_text.trim().to_owned(),
                expected: self.time_format.expected(),
            })?;
        let device = self.device.render("device", cell, file)?;
        let mut readings = Vec::with_capacity(self.values.len());
        for value in &self.values {
            let Some(text) = cell(&value.column) else {
                continue;
            };
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            if value.text {
                readings.push(Reading {
                    ts_us,
                    device: device.clone(),
                    tag: value.tag.render("tag", cell, file)?,
                    value: None,
                    value_text: Some(text.to_owned()),
                    quality: Quality::Good,
                    unit: value.unit.clone(),
                });
                continue;
            }
            let raw = parse_number(text).ok_or_else(|| MappingError::NotANumber {
                column: value.column.clone(),
                text: text.to_owned(),
            })?;
            readings.push(Reading {
                ts_us,
                device: device.clone(),
                tag: value.tag.render("tag", cell, file)?,
                value: Some(raw * value.scale + value.offset),
                value_text: None,
                quality: Quality::Good,
                unit: value.unit.clone(),
            });
        }
        Ok(readings)
    }
}

/// A finite number, or `true`/`false` as 1/0 (status columns of test stands).
fn parse_number(text: &str) -> Option<f64> {
    match text {
        "true" | "TRUE" | "True" => Some(1.0),
        "false" | "FALSE" | "False" => Some(0.0),
        _ => text.parse::<f64>().ok().filter(|v| v.is_finite()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_name_patterns_capture_parts() {
        let p = FileNamePattern::parse("{station}_{run}_*.csv").unwrap();
        assert_eq!(p.parts(), vec!["station".to_owned(), "run".to_owned()]);
        let got = p.captures("ts-2_r17_2024-05-01.csv").unwrap();
        assert_eq!(got["station"], "ts-2");
        assert_eq!(got["run"], "r17");
        assert!(p.captures("ts-2.csv").is_none());
        assert!(
            p.captures("_r17_x.csv").is_none(),
            "a capture is never empty"
        );
        assert_eq!(
            FileNamePattern::parse("{a}*.csv").unwrap_err().to_string(),
            "file_name `{a}*.csv` has two parts without text between them; put literal text between `{...}` and `*`"
        );
    }

    #[test]
    fn templates_fill_columns_and_file_parts() {
        let t = Template::parse("{file.station}/{axis}", &["station".to_owned()]).unwrap();
        let file = HashMap::from([("station".to_owned(), "ts-2".to_owned())]);
        let row = |c: &str| (c == "axis").then(|| " x ".to_owned());
        assert_eq!(t.render("tag", &row, &file).unwrap(), "ts-2/x");
        assert_eq!(
            Template::parse("{file.line}", &[]).unwrap_err().to_string(),
            "`{file.line}` uses `{file.line}`, but file_name captures no `{line}`; add `{line}` to file_name, or use a column"
        );
        assert_eq!(
            Template::parse("press-{", &[]).unwrap_err().to_string(),
            "`press-{` has an unclosed `{`; close it with `}`, or remove it"
        );
    }

    #[test]
    fn timestamps_parse_in_every_format() {
        let us = 1_714_564_800_250_000; // 2024-05-01T12:00:00.25Z
        assert_eq!(
            TimeFormat::Rfc3339.to_us("2024-05-01T12:00:00.250Z"),
            Some(us)
        );
        assert_eq!(TimeFormat::EpochS.to_us("1714564800.25"), Some(us));
        assert_eq!(TimeFormat::EpochMs.to_us("1714564800250"), Some(us));
        assert_eq!(TimeFormat::EpochUs.to_us(" 1714564800250000 "), Some(us));
        assert_eq!(TimeFormat::EpochS.to_us("-1.5"), Some(-1_500_000));
        let p = TimeFormat::parse("%d.%m.%Y %H:%M:%S.%f").unwrap();
        assert_eq!(p.to_us("01.05.2024 12:00:00.25"), Some(us));
        assert_eq!(p.to_us("31.02.2024 12:00:00.25"), None, "no 31 February");
        assert_eq!(p.to_us("01.05.2024 12:00:00.25x"), None);
        assert_eq!(TimeFormat::EpochS.to_us("1e9"), None);
        assert_eq!(TimeFormat::EpochMs.to_us(""), None);
        assert_eq!(
            TimeFormat::parse("%Y-%m-%d").unwrap_err().to_string(),
            "timestamp_format `%Y-%m-%d` is not rfc3339, epoch_s, epoch_ms, epoch_us or a pattern with %Y, %m, %d, %H, %M and %S; write for example \"%Y-%m-%d %H:%M:%S\""
        );
        assert!(TimeFormat::parse("%Y-%m-%d %H:%M:%S %Z").is_err());
    }
}
