//! Template errors a person can act on: every one names the file, the line and column, the
//! key, what is wrong and, for a typo, the nearest valid key.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a template, located in its source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, as a person would write it: `bake.provisioner[1].script`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            if self.key.is_empty() {
                "(top level)"
            } else {
                &self.key
            },
            self.message
        )
    }
}

/// Every problem found in one template. Parse errors stop at the first; the semantic checks
/// report all they find, so a person fixes a template in one round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateErrors(pub Vec<Diagnostic>);

impl fmt::Display for TemplateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateErrors {}

/// Builds diagnostics for one source file: turns byte spans into 1-based line and column.
pub struct SourceMap<'a> {
    file: &'a Path,
    text: &'a str,
}

impl<'a> SourceMap<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        SourceMap { file, text }
    }

    pub fn file(&self) -> &Path {
        self.file
    }

    pub fn text(&self) -> &str {
        self.text
    }

    /// The source text at `span`, or "" when it lies outside.
    pub fn slice(&self, span: Range<usize>) -> &str {
        self.text.get(span).unwrap_or("")
    }

    pub fn at(&self, span: Option<Range<usize>>, key: &str, message: String) -> Diagnostic {
        let (line, column) = span.map(|s| self.line_column(s.start)).unwrap_or((1, 1));
        Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message,
        }
    }

    fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        (line, before[line_start..].chars().count() + 1)
    }
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub fn nearest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    // Beyond this distance a "did you mean" is noise rather than help.
    const MAX_TYPO_DISTANCE: usize = 3;
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= MAX_TYPO_DISTANCE && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into our wording with a
/// suggestion. serde builds that message itself (`de::Error::unknown_field`) before toml sees
/// it, so its text is the only place the expected keys are available.
pub fn explain_unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected
        .split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    // serde lists an alias beside its key; only the current name is offered.
    let (old, candidates): (Vec<&str>, Vec<&str>) = candidates
        .into_iter()
        .partition(|key| super::schema::OLD_NAMES.iter().any(|(o, _)| o == key));
    let mut text = format!("unknown key `{field}`");
    let best = nearest(field, candidates.iter().copied()).or_else(|| {
        let close = nearest(field, old.iter().copied())?;
        super::schema::OLD_NAMES
            .iter()
            .find(|(o, _)| *o == close)
            .map(|(_, new)| *new)
    });
    match best {
        Some(best) => text.push_str(&format!("; did you mean `{best}`?")),
        None if !candidates.is_empty() => {
            text.push_str(&format!("; valid keys here: {}", candidates.join(", ")))
        }
        None => {}
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\n[base]\nnäme = 2\n";
        let map = SourceMap::new(Path::new("t.toml"), text);
        let offset = text.find("= 2").unwrap();
        let d = map.at(Some(offset..offset + 1), "base.näme", "x".into());
        assert_eq!((d.line, d.column), (3, 6));
        assert_eq!(d.to_string(), "t.toml:3:6: base.näme: x");
    }

    #[test]
    fn unknown_field_gets_the_nearest_key() {
        let m = "unknown field `nmae`, expected one of `name`, `source_ami`, `tags`";
        assert_eq!(
            explain_unknown_field(m).unwrap(),
            "unknown key `nmae`; did you mean `name`?"
        );
    }

    #[test]
    fn unknown_field_far_from_all_lists_the_valid_keys() {
        let m = "unknown field `zzzzzzzz`, expected `name` or `tags`";
        assert_eq!(
            explain_unknown_field(m).unwrap(),
            "unknown key `zzzzzzzz`; valid keys here: name, tags"
        );
    }

    #[test]
    fn nearest_refuses_wild_guesses() {
        assert_eq!(nearest("x", ["name", "tags"]), None);
        assert_eq!(
            nearest("instance_typ", ["instance_type", "tags"]),
            Some("instance_type")
        );
    }
}
