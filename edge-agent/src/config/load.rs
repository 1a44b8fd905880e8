//! Reading a configuration file: TOML parsing, path resolution and validation, with errors that
//! name the file, the line and the key.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::model::AgentConfig;
use super::validate::{Problem, validate};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration file; check the path and its permissions", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, or does not fit the configuration's shape (unknown key,
    /// missing key, wrong type). `line` and `column` are 1-based.
    #[error("{}:{line}:{column}: {}{message}", path.display(), KeyPrefix(key.as_deref()))]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        /// The key path the error is about, when it could be found.
        key: Option<String>,
        message: String,
    },
    /// The file parsed, but its content is not usable; every problem found is listed.
    #[error("{}", ProblemList { path, problems })]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

struct KeyPrefix<'a>(Option<&'a str>);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(key) => write!(f, "{key}: "),
            None => Ok(()),
        }
    }
}

struct ProblemList<'a> {
    path: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match problem.line {
                Some(line) => write!(f, "{}:{line}: {problem}", self.path.display())?,
                None => write!(f, "{}: {problem}", self.path.display())?,
            }
        }
        Ok(())
    }
}

/// Reads, parses and validates the configuration file at `path`. Relative paths inside it
/// (`buffer.path`, `upload.dir.path`) are resolved against the file's folder, so the agent does
/// not depend on the folder it was started from.
pub fn load_file(path: &Path) -> Result<AgentConfig, ConfigError> {
    load_file_with_digest(path).map(|(config, _)| config)
}

/// Like [`load_file`], and also returns the [`digest`] of the bytes it parsed, so that the
/// reloader can tell whether the file still holds them without parsing it again (a sensor map of
/// 10,000 tags takes tens of megabytes while it is parsed).
pub fn load_file_with_digest(path: &Path) -> Result<(AgentConfig, u64), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let digest = digest(text.as_bytes());
    load_str(&text, path).map(|config| (config, digest))
}

/// A digest of a config file's bytes, to notice that they changed. Stable within one process
/// only; never store it.
pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Parses and validates configuration text as if it had been read from `path` (used in error
/// messages and to resolve relative paths; the file itself is not read).
pub fn load_str(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
    let mut config: AgentConfig = toml::from_str(text).map_err(|err| {
        let offset = err.span().map_or(0, |span| span.start);
        let (line, column) = line_column(text, offset);
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            key: DeTable::parse(text)
                .ok()
                .and_then(|doc| key_at(&doc, offset)),
            message: with_fix(err.message()),
        }
    })?;

    // Before validation, which reads the TLS files.
    let base = path.parent().unwrap_or(Path::new(""));
    for broker in &mut config.mqtt {
        broker.resolve_paths(base);
    }
    let mut problems = validate(&config);
    if !problems.is_empty() {
        // The document parsed a moment ago, so parsing it again for spans succeeds.
        if let Ok(doc) = DeTable::parse(text) {
            for problem in &mut problems {
                problem.line =
                    line_of_key(&doc, &problem.key).map(|offset| line_column(text, offset).0);
            }
        }
        // Top to bottom, as the reader scrolls; problems without a line first.
        problems.sort_by_key(|p| p.line);
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        });
    }

    if config.buffer.path.is_relative() {
        config.buffer.path = base.join(&config.buffer.path);
    }
    if let Some(dir) = &mut config.upload.dir
        && dir.path.is_relative()
    {
        dir.path = base.join(&dir.path);
    }
    for drop in &mut config.file_drop {
        if drop.folder.is_relative() {
            drop.folder = base.join(&drop.folder);
        }
    }
    if let Some(file) = &mut config.metrics.token_file
        && file.is_relative()
    {
        *file = base.join(&*file);
    }
    Ok(config)
}

/// serde's "missing field" says what is wrong but not where to fix it.
fn with_fix(message: &str) -> String {
    match message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        Some(field) => format!("{message}; add `{field}` to this table"),
        None => message.to_owned(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The most specific key path whose key or value covers `offset`.
fn key_at(doc: &Spanned<DeTable<'_>>, offset: usize) -> Option<String> {
    let mut best = None;
    walk_spans(doc.get_ref(), "", offset, &mut best);
    best.map(|(_, path)| path)
}

fn walk_spans(table: &DeTable<'_>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    for (key, child) in table {
        let child_path = if path.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{path}.{}", key.get_ref())
        };
        consider(key.span(), &child_path, offset, best);
        walk_value(child, &child_path, offset, best);
    }
}

fn walk_value(
    value: &Spanned<DeValue<'_>>,
    path: &str,
    offset: usize,
    best: &mut Option<(usize, String)>,
) {
    consider(value.span(), path, offset, best);
    match value.get_ref() {
        DeValue::Table(table) => walk_spans(table, path, offset, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                walk_value(item, &format!("{path}[{i}]"), offset, best);
            }
        }
        _ => {}
    }
}

/// Keeps `path` if its span covers `offset` at least as tightly as the best so far; on a tie
/// the later-visited, deeper path wins (an array of tables shares its span with its first table).
fn consider(span: Range<usize>, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
    let covers = span.start <= offset && offset < span.end.max(span.start + 1);
    if covers && best.as_ref().is_none_or(|(len, _)| span.len() <= *len) {
        *best = Some((span.len(), path.to_owned()));
    }
}

/// The byte offset of the value at a key path like `modbus[1].tags[3].name`, or of the nearest
/// enclosing table or array that exists (a missing key is reported at its table).
fn line_of_key(doc: &Spanned<DeTable<'_>>, key: &str) -> Option<usize> {
    let mut table = doc.get_ref();
    let mut found: Option<usize> = None;
    for segment in key.split('.') {
        let (name, indexes) = match segment.find('[') {
            Some(at) => segment.split_at(at),
            None => (segment, ""),
        };
        let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref() == name) else {
            return found;
        };
        let mut value = value;
        found = Some(value.span().start);
        for index in indexes
            .split(['[', ']'])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse::<usize>().ok())
        {
            let Some(item) = value.get_ref().as_array().and_then(|a| a.get(index)) else {
                return found;
            };
            value = item;
            found = Some(value.span().start);
        }
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => return found,
        }
    }
    found
}

#[cfg(test)]
// Exact float comparisons are the point: decoding and scaling must produce these very bits.
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    const VALID: &str = r#"site = "plant-ost"
gateway = "gw-1"

[upload.dir]
path = "outbox"

[[modbus]]
name = "press-3"
host = "127.0.0.1"

[[modbus.tags]]
name = "oil_temp"
register = "holding"
address = 0
type = "f32"
unit = "degC"
"#;

    fn parse_error(text: &str) -> String {
        load_str(text, Path::new("plant.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_valid_file_loads_with_defaults_and_paths_resolved_against_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plant.toml");
        std::fs::write(&path, VALID).unwrap();
        let config = load_file(&path).unwrap();
        assert_eq!(config.buffer.path, dir.path().join("buffer.db"));
        assert_eq!(
            config.upload.dir.as_ref().unwrap().path,
            dir.path().join("outbox")
        );
        assert_eq!(config.modbus[0].port, 502);
        assert_eq!(config.modbus[0].tags[0].scale, 1.0);
        assert_eq!(config.batch.max_rows, 50_000);
    }

    #[test]
    fn absolute_paths_are_kept() {
        let text = VALID.replace("path = \"outbox\"", "path = \"/srv/outbox\"")
            + "\n[buffer]\npath = \"/var/lib/plantline/buffer.db\"\n";
        let config = load_str(&text, Path::new("/etc/plantline/plant.toml")).unwrap();
        assert_eq!(
            config.buffer.path,
            Path::new("/var/lib/plantline/buffer.db")
        );
        assert_eq!(config.upload.dir.unwrap().path, Path::new("/srv/outbox"));
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let err = load_file(Path::new("/nonexistent/plant.toml")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert_eq!(
            err.to_string(),
            "/nonexistent/plant.toml: cannot read the configuration file; check the path and its permissions"
        );
    }

    #[test]
    fn a_toml_syntax_error_names_line_and_column() {
        let text = VALID.replace("address = 0", "address = = 0");
        assert_eq!(
            parse_error(&text),
            "plant.toml:14:11: extra `=`, expected nothing"
        );
    }

    #[test]
    fn an_unknown_key_names_its_path_and_line() {
        let text = VALID.replace("unit = \"degC\"", "units = \"degC\"");
        let err = load_str(&text, Path::new("plant.toml")).unwrap_err();
        let ConfigError::Parse {
            line, column, key, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*line, *column), (16, 1));
        assert_eq!(key.as_deref(), Some("modbus[0].tags[0].units"));
        assert_eq!(
            err.to_string(),
            "plant.toml:16:1: modbus[0].tags[0].units: unknown field `units`, expected one of `name`, `register`, `address`, `type`, `bit`, `length`, `byte_order`, `scale`, `offset`, `unit`, `description`, `range`, `deadband`, `deadband_percent`, `heartbeat`"
        );
    }

    #[test]
    fn a_wrong_type_names_the_value() {
        let text = VALID.replace("type = \"f32\"", "type = \"f16\"");
        assert_eq!(
            parse_error(&text),
            "plant.toml:15:8: modbus[0].tags[0].type: unknown variant `f16`, expected one of `bool`, `bit`, `u16`, `i16`, `u32`, `i32`, `u64`, `i64`, `f32`, `f64`, `string`"
        );
        let text = VALID.replace(
            "host = \"127.0.0.1\"",
            "host = \"127.0.0.1\"\npoll_interval = \"5\"",
        );
        assert_eq!(
            parse_error(&text),
            "plant.toml:10:17: modbus[0].poll_interval: `5` has no unit; write it like \"500ms\", \"5s\", \"2m\" or \"1h\""
        );
    }

    #[test]
    fn a_missing_key_names_its_table() {
        let text = VALID.replace("name = \"press-3\"\n", "");
        assert_eq!(
            parse_error(&text),
            "plant.toml:7:1: modbus[0]: missing field `name`; add `name` to this table"
        );
    }

    #[test]
    fn every_config_example_is_valid() {
        let folder = pipeline_e2e::checkout().join("config-examples/agent");
        let mut checked = 0;
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(err) = load_file(&path) {
                    panic!("{err}");
                }
                checked += 1;
            }
        }
        assert!(checked > 0, "no examples in {}", folder.display());
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("a = 1\nb = 2\n", 0), (1, 1));
        assert_eq!(line_column("a = 1\nb = 2\n", 6), (2, 1));
        assert_eq!(line_column("a = \"ü\"\nb", 9), (2, 1));
        assert_eq!(line_column("x = \"üü\" y", 10), (1, 9));
        assert_eq!(line_column("a", 10), (1, 2));
    }
}
