//! Reading the rows of a dropped file, each with the line it starts on: CSV (RFC 4180 quoting,
//! a header line naming the columns) and JSON lines.

use std::collections::HashMap;
use std::io::BufRead;

use serde_json::Value;

use crate::config::FileFormat;

/// One row of a file.
#[derive(Debug)]
pub(super) enum Record {
    Csv {
        line: usize,
        fields: Vec<String>,
    },
    Json {
        line: usize,
        object: serde_json::Map<String, Value>,
    },
    /// A row that cannot be split into cells at all.
    Bad {
        line: usize,
        reason: String,
    },
}

/// The rows of one file, read lazily so a large file never sits in memory whole.
pub(super) struct Records<R> {
    reader: R,
    format: FileFormat,
    delimiter: char,
    /// The next physical line number (1-based).
    line: usize,
    /// CSV column name to field index, from the header line.
    header: Option<HashMap<String, usize>>,
}

impl<R: BufRead> Records<R> {
    pub(super) fn new(reader: R, format: FileFormat, delimiter: char) -> Self {
        Self {
            reader,
            format,
            delimiter,
            line: 1,
            header: None,
        }
    }

    /// The CSV header (read on first use); `None` for JSON lines or an empty file.
    pub(super) fn header(&mut self) -> std::io::Result<Option<&HashMap<String, usize>>> {
        if self.format == FileFormat::Csv && self.header.is_none() {
            match self.next_csv()? {
                Some(Record::Csv { fields, .. }) => {
                    self.header = Some(
                        fields
                            .into_iter()
                            .enumerate()
                            .map(|(i, name)| (name.trim().to_owned(), i))
                            .collect(),
                    );
                }
                Some(_) | None => return Ok(None),
            }
        }
        Ok(self.header.as_ref())
    }

    /// The line the next row starts on (or would, past the end).
    pub(super) fn next_line(&self) -> usize {
        self.line
    }

    /// The text of `column` in `record`: `None` when the row has no such column.
    pub(super) fn cell(&self, record: &Record, column: &str) -> Option<String> {
        match record {
            Record::Csv { fields, .. } => {
                let at = *self.header.as_ref()?.get(column)?;
                fields.get(at).cloned()
            }
            Record::Json { object, .. } => match object.get(column)? {
                Value::Null => Some(String::new()),
                Value::String(s) => Some(s.clone()),
                Value::Bool(b) => Some(b.to_string()),
                Value::Number(n) => Some(n.to_string()),
                other => Some(other.to_string()),
            },
            Record::Bad { .. } => None,
        }
    }

    /// The next row, or `None` at the end of the file.
    pub(super) fn next_record(&mut self) -> std::io::Result<Option<Record>> {
        match self.format {
            FileFormat::Csv => {
                self.header()?;
                self.next_csv()
            }
            FileFormat::Jsonl => loop {
                let line = self.line;
                let Some(text) = self.read_line()? else {
                    return Ok(None);
                };
                let text = match text {
                    Ok(text) => text,
                    Err(reason) => return Ok(Some(Record::Bad { line, reason })),
                };
                if text.trim().is_empty() {
                    continue;
                }
                return Ok(Some(match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(object)) => Record::Json { line, object },
                    Ok(_) => Record::Bad {
                        line,
                        reason: "not a JSON object".to_owned(),
                    },
                    Err(e) => Record::Bad {
                        line,
                        reason: format!("not JSON: {e}"),
                    },
                }));
            },
        }
    }

    /// One physical line without its line end: `Err(reason)` when it is not UTF-8.
    fn read_line(&mut self) -> std::io::Result<Option<Result<String, String>>> {
        let mut bytes = Vec::new();
        if self.reader.read_until(b'\n', &mut bytes)? == 0 {
            return Ok(None);
        }
        self.line += 1;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        Ok(Some(
            String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned()),
        ))
    }

    /// One CSV record; a quoted field may run over several lines.
    fn next_csv(&mut self) -> std::io::Result<Option<Record>> {
        loop {
            let line = self.line;
            let Some(text) = self.read_line()? else {
                return Ok(None);
            };
            let mut text = match text {
                Ok(text) => text,
                Err(reason) => return Ok(Some(Record::Bad { line, reason })),
            };
            if text.trim().is_empty() {
                continue;
            }
            loop {
                match split_csv(&text, self.delimiter) {
                    Ok(fields) => return Ok(Some(Record::Csv { line, fields })),
                    Err(CsvError::OpenQuote) => match self.read_line()? {
                        Some(Ok(more)) => {
                            text.push('\n');
                            text.push_str(&more);
                        }
                        Some(Err(reason)) => return Ok(Some(Record::Bad { line, reason })),
                        None => {
                            return Ok(Some(Record::Bad {
                                line,
                                reason: "a quoted field is not closed before the end of the file"
                                    .to_owned(),
                            }));
                        }
                    },
                    Err(CsvError::TextAfterQuote) => {
                        return Ok(Some(Record::Bad {
                            line,
                            reason: "text after a closing quote; write \"\" for a quote inside a quoted field".to_owned(),
                        }));
                    }
                }
            }
        }
    }
}

enum CsvError {
    OpenQuote,
    TextAfterQuote,
}

/// Splits one CSV record: fields separated by `delimiter`, `"`-quoted fields with `""` for a
/// quote. Unquoted fields keep their spaces (the mapping trims where it matters).
fn split_csv(text: &str, delimiter: char) -> Result<Vec<String>, CsvError> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    loop {
        // At the start of a field.
        while chars.peek() == Some(&' ') && delimiter != ' ' {
            field.push(' ');
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            field.clear();
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(CsvError::OpenQuote),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            while chars.peek() == Some(&' ') && delimiter != ' ' {
                chars.next();
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(c) if c == delimiter => fields.push(std::mem::take(&mut field)),
                Some(_) => return Err(CsvError::TextAfterQuote),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(c) if c == delimiter => {
                        fields.push(std::mem::take(&mut field));
                        break;
                    }
                    Some(c) => field.push(c),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str) -> Vec<String> {
        let mut records = Records::new(text.as_bytes(), FileFormat::Csv, ',');
        let mut out = Vec::new();
        while let Some(r) = records.next_record().unwrap() {
            out.push(match r {
                Record::Csv { line, fields } => format!("{line}: {}", fields.join("|")),
                Record::Bad { line, reason } => format!("{line}: bad: {reason}"),
                Record::Json { .. } => unreachable!("CSV gives no JSON"),
            });
        }
        out
    }

    #[test]
    fn csv_records_keep_their_first_line_number() {
        assert_eq!(
            csv(
                "time,a,note\r\n1,2,x\n\n3, 4 ,\"multi\nline \"\"q\"\"\"\n5,\"6\"x,y\n7,8,\"open\n"
            ),
            vec![
                "2: 1|2|x",
                "4: 3| 4 |multi\nline \"q\"",
                "6: bad: text after a closing quote; write \"\" for a quote inside a quoted field",
                "7: bad: a quoted field is not closed before the end of the file",
            ]
        );
    }

    #[test]
    fn json_lines_name_bad_lines() {
        let text = "{\"t\": 1, \"v\": 2.5}\n\n[1]\n{\"t\": \nnull\n";
        let mut records = Records::new(text.as_bytes(), FileFormat::Jsonl, ',');
        let mut seen = Vec::new();
        while let Some(r) = records.next_record().unwrap() {
            seen.push(match &r {
                Record::Json { line, .. } => {
                    format!("{line}: v={}", records.cell(&r, "v").unwrap())
                }
                Record::Bad { line, reason } => format!("{line}: {reason}"),
                Record::Csv { .. } => unreachable!("JSON lines give no CSV"),
            });
        }
        assert_eq!(
            seen,
            vec![
                "1: v=2.5",
                "3: not a JSON object",
                "4: not JSON: EOF while parsing a value at line 1 column 6",
                "5: not a JSON object",
            ]
        );
    }
}
