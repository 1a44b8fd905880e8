//! MQTT topic filters (`+` one level, trailing `#` any number of levels) and the `{N}` templates
//! that take a device or tag name from a level of the message's topic.

/// Why a topic filter or a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic filter `{filter}` is empty")]
    EmptyFilter { filter: String },
    #[error("topic filter `{filter}` has `{wildcard}` inside level {level} (`{text}`)")]
    WildcardInsideLevel {
        filter: String,
        wildcard: char,
        level: usize,
        text: String,
    },
    #[error("topic filter `{filter}` has `#` before its last level")]
    HashNotLast { filter: String },
    #[error("template `{template}` has an unclosed `{{` at byte {at}")]
    Unclosed { template: String, at: usize },
    #[error("template `{template}` has `{{{text}}}`, which is not a topic level number")]
    NotALevel { template: String, text: String },
    #[error(
        "template `{template}` uses topic level {level}, but topics matching `{filter}` have only {levels} levels (0-{last})",
        last = levels - 1
    )]
    LevelBeyondFilter {
        template: String,
        filter: String,
        level: usize,
        levels: usize,
    },
    #[error("topic `{topic}` has no level {level} for template `{template}`")]
    MissingLevel {
        topic: String,
        template: String,
        level: usize,
    },
}

/// Checks a filter as MQTT 3.1.1 section 4.7 defines it.
pub fn check_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::EmptyFilter {
            filter: filter.to_owned(),
        });
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        for wildcard in ['+', '#'] {
            if level.contains(wildcard) && level.len() > 1 {
                return Err(TopicError::WildcardInsideLevel {
                    filter: filter.to_owned(),
                    wildcard,
                    level: i,
                    text: (*level).to_owned(),
                });
            }
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(TopicError::HashNotLast {
                filter: filter.to_owned(),
            });
        }
    }
    Ok(())
}

/// Whether `topic` (a published topic, no wildcards) matches a valid `filter`.
pub fn matches(filter: &str, topic: &str) -> bool {
    // Topics starting with `$` (broker internals such as `$SYS`) are not matched by a leading
    // wildcard (MQTT 3.1.1 section 4.7.2).
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Whether some topic could match both valid filters, so two mappings would compete for it.
pub fn overlap(a: &str, b: &str) -> bool {
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// How many levels a topic matching `filter` has: `Some(n)` exactly, or `None` when a `#` makes
/// it open-ended.
pub fn level_count(filter: &str) -> Option<usize> {
    if filter.ends_with('#') {
        None
    } else {
        Some(filter.split('/').count())
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Level(usize),
}

/// A name built from literal text and topic levels: `line-{1}` on topic `plant/7/temp` is
/// `line-7`. `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(template: &str) -> Result<Self, TopicError> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().is_some_and(|&(_, n)| n == '{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().is_some_and(|&(_, n)| n == '}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let Some(len) = template[at + 1..].find('}') else {
                        return Err(TopicError::Unclosed {
                            template: template.to_owned(),
                            at,
                        });
                    };
                    let inner = &template[at + 1..at + 1 + len];
                    let level = inner
                        .parse::<usize>()
                        .ok()
                        .filter(|_| inner.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| TopicError::NotALevel {
                            template: template.to_owned(),
                            text: inner.to_owned(),
                        })?;
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Level(level));
                    for _ in 0..=len {
                        chars.next();
                    }
                }
                other => text.push(other),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self {
            source: template.to_owned(),
            pieces,
        })
    }

    /// Checks that every level the template uses exists in topics matching `filter`.
    pub fn check_against(&self, filter: &str) -> Result<(), TopicError> {
        let Some(levels) = level_count(filter) else {
            return Ok(());
        };
        match self.levels().find(|&level| level >= levels) {
            Some(level) => Err(TopicError::LevelBeyondFilter {
                template: self.source.clone(),
                filter: filter.to_owned(),
                level,
                levels,
            }),
            None => Ok(()),
        }
    }

    /// The name for one message's topic.
    pub fn render(&self, topic: &str) -> Result<String, TopicError> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Level(level) => {
                    let value = levels.get(*level).ok_or_else(|| TopicError::MissingLevel {
                        topic: topic.to_owned(),
                        template: self.source.clone(),
                        level: *level,
                    })?;
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }

    fn levels(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Level(level) => Some(*level),
            Piece::Text(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_matches_exactly_one_level() {
        assert!(matches(
            "plant/+/+/telemetry",
            "plant/press-3/oil/telemetry"
        ));
        assert!(!matches("plant/+/+/telemetry", "plant/press-3/telemetry"));
        assert!(!matches("plant/+/+/telemetry", "plant/a/b/c/telemetry"));
        assert!(matches("plant/+", "plant/"));
        assert!(!matches("plant/+", "plant"));
    }

    #[test]
    fn hash_matches_the_parent_and_any_depth_below() {
        assert!(matches("plant/#", "plant"));
        assert!(matches("plant/#", "plant/a"));
        assert!(matches("plant/#", "plant/a/b/c"));
        assert!(!matches("plant/#", "other/a"));
        assert!(matches("#", "a/b"));
    }

    #[test]
    fn leading_wildcards_do_not_match_dollar_topics() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
    }

    #[test]
    fn literal_levels_must_be_equal() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/B"));
        assert!(!matches("a/b", "a/b/c"));
    }

    #[test]
    fn filters_are_checked_as_the_standard_says() {
        assert_eq!(check_filter("a/+/#"), Ok(()));
        assert_eq!(
            check_filter(""),
            Err(TopicError::EmptyFilter {
                filter: String::new()
            })
        );
        assert_eq!(
            check_filter("a/b+/c").unwrap_err().to_string(),
            "topic filter `a/b+/c` has `+` inside level 1 (`b+`)"
        );
        assert_eq!(
            check_filter("a/#/c").unwrap_err().to_string(),
            "topic filter `a/#/c` has `#` before its last level"
        );
        assert_eq!(
            check_filter("a/x#").unwrap_err().to_string(),
            "topic filter `a/x#` has `#` inside level 1 (`x#`)"
        );
    }

    #[test]
    fn overlapping_filters_are_found() {
        assert!(overlap("plant/+/temp", "plant/press/+"));
        assert!(overlap("plant/#", "plant/a/b"));
        assert!(overlap("a/b", "a/b"));
        assert!(!overlap("plant/+/temp", "plant/+/pressure"));
        assert!(!overlap("a/+", "a/b/c"));
        assert!(!overlap("a/b", "a"));
    }

    #[test]
    fn templates_take_names_from_topic_levels() {
        let t = Template::parse("line-{1}.{2}").unwrap();
        assert_eq!(t.render("plant/7/temp").unwrap(), "line-7.temp");
        assert_eq!(
            Template::parse("{{x}}-{0}").unwrap().render("a/b").unwrap(),
            "{x}-a"
        );
        assert_eq!(
            t.render("plant/7").unwrap_err().to_string(),
            "topic `plant/7` has no level 2 for template `line-{1}.{2}`"
        );
    }

    #[test]
    fn bad_templates_are_rejected_with_the_reason() {
        assert_eq!(
            Template::parse("dev-{x}").unwrap_err().to_string(),
            "template `dev-{x}` has `{x}`, which is not a topic level number"
        );
        assert_eq!(
            Template::parse("dev-{1").unwrap_err().to_string(),
            "template `dev-{1` has an unclosed `{` at byte 4"
        );
        assert_eq!(
            Template::parse("{4}")
                .unwrap()
                .check_against("plant/+/+/telemetry")
                .unwrap_err()
                .to_string(),
            "template `{4}` uses topic level 4, but topics matching `plant/+/+/telemetry` have only 4 levels (0-3)"
        );
        assert_eq!(
            Template::parse("{9}").unwrap().check_against("plant/#"),
            Ok(())
        );
    }
}
