//! Validation of the `[[file_drop]]` sections: what serde cannot check (patterns, templates,
//! timestamp formats, folders used twice). Every problem names its key and the fix.

use std::collections::HashMap;
use std::time::Duration;

use super::mapping::{FileNamePattern, Template, TimeFormat};
use crate::config::{FileDrop, Problem, ValueType};

/// The shortest folder listing interval accepted.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        line: None,
        message: message.into(),
    }
}

/// Every problem of the configured file-drop folders, in the order of the file.
pub(crate) fn check_file_drops(drops: &[FileDrop]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut folders: HashMap<&std::path::Path, usize> = HashMap::new();
    for (i, drop) in drops.iter().enumerate() {
        let key = format!("file_drop[{i}]");
        if drop.name.trim().is_empty() {
            problems.push(problem(
                format!("{key}.name"),
                "the name is empty; name the source for the logs, for example name = \"test-stand-2\"",
            ));
        } else if let Some(first) = names.get(drop.name.as_str()) {
            problems.push(problem(
                format!("{key}.name"),
                format!(
                    "duplicate file drop name `{}` (first used by file_drop[{first}]); give each [[file_drop]] its own name",
                    drop.name
                ),
            ));
        } else {
            names.insert(&drop.name, i);
        }
        if drop.folder.as_os_str().is_empty() {
            problems.push(problem(
                format!("{key}.folder"),
                "the folder is empty; name the folder the machine writes into, for example folder = \"/srv/drop/test-stand-2\"",
            ));
        } else if let Some(first) = folders.get(drop.folder.as_path()) {
            problems.push(problem(
                format!("{key}.folder"),
                format!(
                    "folder `{}` is already watched by file_drop[{first}]; each file would be read by both, give each [[file_drop]] its own folder",
                    drop.folder.display()
                ),
            ));
        } else {
            folders.insert(&drop.folder, i);
        }
        check_one(&mut problems, &key, drop);
    }
    problems
}

fn check_one(problems: &mut Vec<Problem>, key: &str, drop: &FileDrop) {
    if matches!(drop.delimiter, '"' | '\n' | '\r') {
        problems.push(problem(
            format!("{key}.delimiter"),
            format!(
                "{:?} cannot separate fields; use \",\", \";\" or \"\\t\"",
                drop.delimiter
            ),
        ));
    }
    let mut parts = Vec::new();
    if let Some(pattern) = &drop.file_name {
        match FileNamePattern::parse(pattern) {
            Ok(p) => parts = p.parts(),
            Err(e) => problems.push(problem(format!("{key}.file_name"), e.to_string())),
        }
    }
    if drop.poll_interval.0 < MIN_POLL_INTERVAL {
        problems.push(problem(
            format!("{key}.poll_interval"),
            format!(
                "{} is shorter than the minimum of 10ms; use at least that, for example \"1s\"",
                drop.poll_interval
            ),
        ));
    }
    if drop.timestamp.trim().is_empty() {
        problems.push(problem(
            format!("{key}.timestamp"),
            "the timestamp column is empty; name the column holding each row's time, for example timestamp = \"time\"",
        ));
    }
    if let Err(e) = TimeFormat::parse(&drop.timestamp_format) {
        problems.push(problem(format!("{key}.timestamp_format"), e.to_string()));
    }
    if let Err(e) = Template::parse(&drop.device, &parts) {
        problems.push(problem(format!("{key}.device"), e.to_string()));
    } else if drop.device.trim().is_empty() {
        problems.push(problem(
            format!("{key}.device"),
            "the device is empty; write a name like \"press-3\", a column like \"{station}\" or a file-name part like \"{file.station}\"",
        ));
    }
    if drop.values.is_empty() {
        problems.push(problem(
            format!("{key}.values"),
            "no value columns; add at least one [[file_drop.values]] table with column = \"...\"",
        ));
    }
    check_values(problems, key, drop, &parts);
}

#[allow(clippy::float_cmp)] // scale and offset are left out exactly when they are 1 and 0
fn check_values(problems: &mut Vec<Problem>, key: &str, drop: &FileDrop, parts: &[String]) {
    let mut columns: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    for (j, value) in drop.values.iter().enumerate() {
        let vkey = format!("{key}.values[{j}]");
        if value.column.trim().is_empty() {
            problems.push(problem(
                format!("{vkey}.column"),
                "the column is empty; name the column holding the number, for example column = \"temp\"",
            ));
        }
        if let Some(first) = columns.get(&(value.column.as_str(), value.tag.as_deref())) {
            problems.push(problem(
                format!("{vkey}.column"),
                format!(
                    "column `{}` is already mapped to the same tag by values[{first}]; every reading would be recorded twice, remove one",
                    value.column
                ),
            ));
        } else {
            columns.insert((value.column.as_str(), value.tag.as_deref()), j);
        }
        if let Some(tag) = &value.tag {
            if let Err(e) = Template::parse(tag, parts) {
                problems.push(problem(format!("{vkey}.tag"), e.to_string()));
            } else if tag.trim().is_empty() {
                problems.push(problem(
                    format!("{vkey}.tag"),
                    "the tag is empty; name the value, or leave the key out to use the column's name",
                ));
            }
        }
        if value.value_type == ValueType::String {
            for (name, set) in [
                ("scale", value.scale != 1.0),
                ("offset", value.offset != 0.0),
            ] {
                if set {
                    problems.push(problem(
                        format!("{vkey}.{name}"),
                        format!(
                            "{name} does not apply to type = \"string\" (the cell is recorded as text, as it is); remove the key"
                        ),
                    ));
                }
            }
        }
        if !value.scale.is_finite() || value.scale == 0.0 {
            problems.push(problem(
                format!("{vkey}.scale"),
                format!(
                    "scale {} would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
                    value.scale
                ),
            ));
        }
        if !value.offset.is_finite() {
            problems.push(problem(
                format!("{vkey}.offset"),
                format!(
                    "offset {} is not a finite number; use a finite number such as -40",
                    value.offset
                ),
            ));
        }
        if value.unit.as_deref().is_some_and(|u| u.trim().is_empty()) {
            problems.push(problem(
                format!("{vkey}.unit"),
                "the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{ConfigError, load_str};

    const HEAD: &str = "site = \"plant-ost\"\ngateway = \"gw-1\"\n[upload.dir]\npath = \"out\"\n";

    fn problems(text: &str) -> Vec<String> {
        match load_str(text, Path::new("plant.toml")) {
            Err(err @ ConfigError::Invalid { .. }) => {
                err.to_string().lines().map(str::to_owned).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn every_file_drop_problem_names_line_key_and_fix() {
        let text = format!(
            "{HEAD}[[file_drop]]
name = \"stand\"
folder = \"drop\"
format = \"csv\"
delimiter = '\"'
file_name = \"{{station}}*.csv\"
poll_interval = \"1ms\"
timestamp = \"\"
timestamp_format = \"%Y-%m-%d\"
device = \"{{file.line}}\"
[[file_drop.values]]
column = \"temp\"
scale = 0.0
unit = \"\"
[[file_drop.values]]
column = \"temp\"
tag = \"t-{{\"
[[file_drop]]
name = \"stand\"
folder = \"drop\"
format = \"jsonl\"
timestamp = \"t\"
timestamp_format = \"epoch_ms\"
device = \"rig\"
values = []
"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:9: file_drop[0].delimiter: '\"' cannot separate fields; use \",\", \";\" or \"\\t\"",
                "plant.toml:10: file_drop[0].file_name: file_name `{station}*.csv` has two parts without text between them; put literal text between `{...}` and `*`",
                "plant.toml:11: file_drop[0].poll_interval: 1ms is shorter than the minimum of 10ms; use at least that, for example \"1s\"",
                "plant.toml:12: file_drop[0].timestamp: the timestamp column is empty; name the column holding each row's time, for example timestamp = \"time\"",
                "plant.toml:13: file_drop[0].timestamp_format: timestamp_format `%Y-%m-%d` is not rfc3339, epoch_s, epoch_ms, epoch_us or a pattern with %Y, %m, %d, %H, %M and %S; write for example \"%Y-%m-%d %H:%M:%S\"",
                "plant.toml:14: file_drop[0].device: `{file.line}` uses `{file.line}`, but file_name captures no `{line}`; add `{line}` to file_name, or use a column",
                "plant.toml:17: file_drop[0].values[0].scale: scale 0 would make every reading meaningless; use a finite, non-zero multiplier such as 0.1",
                "plant.toml:18: file_drop[0].values[0].unit: the unit is empty; name the unit, for example unit = \"degC\", or leave the key out",
                "plant.toml:21: file_drop[0].values[1].tag: `t-{` has an unclosed `{`; close it with `}`, or remove it",
                "plant.toml:23: file_drop[1].name: duplicate file drop name `stand` (first used by file_drop[0]); give each [[file_drop]] its own name",
                "plant.toml:24: file_drop[1].folder: folder `drop` is already watched by file_drop[0]; each file would be read by both, give each [[file_drop]] its own folder",
                "plant.toml:29: file_drop[1].values: no value columns; add at least one [[file_drop.values]] table with column = \"...\"",
            ]
        );
    }

    #[test]
    fn a_text_column_takes_no_scale_or_offset() {
        let text = format!(
            "{HEAD}[[file_drop]]
name = \"stand\"
folder = \"drop\"
format = \"csv\"
timestamp = \"t\"
timestamp_format = \"epoch_ms\"
device = \"rig\"
[[file_drop.values]]
column = \"recipe\"
type = \"string\"
scale = 2.0
offset = 1.0
"
        );
        assert_eq!(
            problems(&text),
            vec![
                "plant.toml:15: file_drop[0].values[0].scale: scale does not apply to type = \"string\" (the cell is recorded as text, as it is); remove the key",
                "plant.toml:16: file_drop[0].values[0].offset: offset does not apply to type = \"string\" (the cell is recorded as text, as it is); remove the key",
            ]
        );
    }
}
