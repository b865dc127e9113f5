//! Reading a template's TOML into the schema: serde's errors in a person's words, and every
//! wrong key reported in one run (each is set aside and the parse tried again).

use std::ops::Range;

use super::diagnostic::{explain_unknown_field, Diagnostic, SourceMap, TemplateErrors};
use super::schema::TemplateFile;

/// The template as parsed, and what parsing found wrong on the way.
pub struct Parsed {
    pub file: TemplateFile,
    pub errors: Vec<Diagnostic>,
    /// The keys that were wrong and set aside (`bake.provisioner[0].inline`): a later
    /// check of what holds them (a provisioner without its `inline`) says nothing new.
    pub set_aside: Vec<String>,
}

/// Parses the TOML into the schema. serde stops at the first wrong key, so each wrong key
/// is set aside (blanked, lines kept) and the parse tried again, to report every one in
/// one run. Ends with the errors when a problem cannot be set aside (a syntax error, a
/// missing key).
pub fn deserialize(map: &SourceMap, text: &str) -> Result<Parsed, TemplateErrors> {
    // Enough for any template a person writes; a bound, so the loop surely ends.
    const MAX_SET_ASIDE: usize = 50;
    let mut current = text.to_string();
    let mut errors = Vec::new();
    // The dotted path of each key set aside.
    let mut set_aside: Vec<String> = Vec::new();
    loop {
        let deserializer = toml::Deserializer::new(&current);
        let err = match serde_path_to_error::deserialize::<_, TemplateFile>(deserializer) {
            Ok(file) => {
                return Ok(Parsed {
                    file,
                    errors,
                    set_aside,
                })
            }
            Err(err) => err,
        };
        let mut steps = path_steps(err.path());
        let inner = err.into_inner();
        let message = inner.message().to_string();
        // A key we set aside is now missing: that is the first error again.
        if let Some(missing) = message.strip_prefix("missing field `") {
            let field = missing.split('`').next().unwrap_or_default();
            let mut path = steps.clone();
            path.push(Step::Key(field.to_string()));
            if set_aside.contains(&steps_key(&path)) {
                break;
            }
        }
        let diagnostic = explain(map, &current, &steps, &inner, &message);
        errors.push(diagnostic);
        if let Some(field) = explain_unknown_field(&message)
            .and_then(|_| message.split('`').nth(1).map(str::to_string))
        {
            if !matches!(steps.last(), Some(Step::Key(k)) if *k == field) {
                steps.push(Step::Key(field));
            }
        }
        let Some((range, depth)) = settable_aside(&current, &steps) else {
            break;
        };
        if set_aside.len() >= MAX_SET_ASIDE {
            break;
        }
        current = blank(&current, range);
        set_aside.push(steps_key(&steps[..depth]));
    }
    Err(TemplateErrors(errors))
}

/// One serde error as a diagnostic: its key path, and our words for serde's.
fn explain(
    map: &SourceMap,
    text: &str,
    steps: &[Step],
    inner: &toml::de::Error,
    message: &str,
) -> Diagnostic {
    let key = steps_key(steps);
    let (key, message) = match explain_unknown_field(message) {
        Some(explained) => {
            let field = message.split('`').nth(1).unwrap_or_default();
            let key = if key.is_empty() || key.ends_with(field) {
                key
            } else {
                format!("{key}.{field}")
            };
            (key, explained)
        }
        None => (key, plain_message(message)),
    };
    let key = match (key.is_empty(), inner.span()) {
        // A syntax error has no serde path: name the key written on that line instead.
        (true, Some(span)) => key_at(text, span.start),
        _ => key,
    };
    map.at(inner.span(), &key, message)
}

/// Whether the key `outer` holds the key `inner` (`bake.provisioner[0]` holds
/// `bake.provisioner[0].inline`).
pub(super) fn holds(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// serde_path_to_error's path without toml's span wrappers, which a person never wrote.
fn path_steps(path: &serde_path_to_error::Path) -> Vec<Step> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } if !key.contains("$__serde_spanned") => {
                Some(Step::Key(key.clone()))
            }
            Segment::Enum { variant } => Some(Step::Key(variant.clone())),
            _ => None,
        })
        .collect()
}

/// The dotted key a person would write: `bake.provisioner[1].script`.
fn steps_key(steps: &[Step]) -> String {
    let mut key = String::new();
    for step in steps {
        match step {
            Step::Key(k) if key.is_empty() => key.push_str(k),
            Step::Key(k) => {
                key.push('.');
                key.push_str(k)
            }
            Step::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    key
}

/// The bytes of the `key = value` line (or lines) that holds what `steps` leads to, and
/// how many steps lead to that key; None when it is a table header or cannot be found.
fn settable_aside(text: &str, steps: &[Step]) -> Option<(Range<usize>, usize)> {
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &toml_edit::Table = document.as_table();
    let mut depth = 0;
    while let Some(Step::Key(name)) = steps.get(depth) {
        depth += 1;
        let (key, item) = table.get_key_value(name)?;
        match item {
            toml_edit::Item::Table(inner) => table = inner,
            toml_edit::Item::ArrayOfTables(array) => match steps.get(depth) {
                Some(Step::Index(i)) => {
                    depth += 1;
                    table = array.get(*i)?
                }
                _ => return None,
            },
            toml_edit::Item::Value(value) => {
                let (mut from, to) = (key.span()?.start, value.span()?.end);
                // A dotted key (`bake.dest = 5`) goes whole, from its first part.
                let line_start = text[..from].rfind('\n').map_or(0, |i| i + 1);
                let before = &text[line_start..from];
                if before.trim_end().ends_with('.') {
                    from = line_start + (before.len() - before.trim_start().len());
                }
                return Some((from..to, depth));
            }
            toml_edit::Item::None => return None,
        }
    }
    None
}

/// `text` with `range` turned to spaces, its line breaks kept so every line and column
/// after it stays where it was.
fn blank(text: &str, range: Range<usize>) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for byte in &mut bytes[range] {
        if *byte != b'\n' {
            *byte = b' ';
        }
    }
    // Every byte of a character became ASCII, so the text is still UTF-8.
    String::from_utf8(bytes).expect("blanked text is UTF-8")
}

/// The dotted key a line of TOML sets: its table header plus the key before `=`.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .unwrap_or("");
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default();
    [table.as_str(), key]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(".")
}

/// serde's wording, made readable: "missing field `x`" → "missing required key `x`";
/// "invalid type: string \"a\", expected a sequence" → "expected an array of strings,
/// like [\"a\"], not the string \"a\"".
fn plain_message(message: &str) -> String {
    let message = message.trim_end();
    if let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        return format!(
            "expected {}, not {}",
            expected_in_words(expected, found),
            found_in_words(found)
        );
    }
    message.replace("missing field", "missing required key")
}

/// What serde expected, as the template's reader writes it.
fn expected_in_words(expected: &str, found: &str) -> String {
    let example = found
        .strip_prefix("string ")
        .map(|quoted| format!("[{quoted}]"))
        .unwrap_or_else(|| "[\"…\"]".into());
    match expected {
        "a sequence" => format!("an array, like {example}"),
        "a boolean" => "true or false".into(),
        "a string" => "a string in quotes".into(),
        "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" | "an integer" => {
            "a whole number".into()
        }
        other if other.starts_with("struct ") || other == "a map" => "a table".into(),
        other => other.to_string(),
    }
}

/// What serde found, as the template's reader sees it.
fn found_in_words(found: &str) -> String {
    if let Some(quoted) = found.strip_prefix("string ") {
        return format!("the string {quoted}");
    }
    for (serde, words) in [
        ("integer", "the number"),
        ("floating point", "the number"),
        ("boolean", ""),
    ] {
        if let Some(value) = found
            .strip_prefix(serde)
            .map(|v| v.trim().trim_matches('`'))
        {
            return format!("{words} {value}").trim_start().to_string();
        }
    }
    match found {
        "sequence" => "an array".into(),
        "map" => "a table".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_name_the_key_on_their_line() {
        let text = "[bake]\nname = \"x\nother = 1\n";
        assert_eq!(key_at(text, text.find("\"x").unwrap()), "bake.name");
        assert_eq!(key_at("a = [", 4), "a");
    }

    #[test]
    fn serdes_type_errors_read_as_a_person_writes() {
        assert_eq!(
            plain_message("invalid type: string \"echo hi\", expected a sequence"),
            "expected an array, like [\"echo hi\"], not the string \"echo hi\""
        );
        assert_eq!(
            plain_message("invalid type: string \"yes\", expected a boolean"),
            "expected true or false, not the string \"yes\""
        );
        assert_eq!(
            plain_message("invalid type: integer `1`, expected a string"),
            "expected a string in quotes, not the number 1"
        );
        assert_eq!(
            plain_message("invalid type: boolean `true`, expected u64"),
            "expected a whole number, not true"
        );
        assert_eq!(
            plain_message("missing field `dest`"),
            "missing required key `dest`"
        );
    }

    #[test]
    fn a_wrong_key_is_set_aside_whole_and_lines_stay_put() {
        let text = "[bake]\nname = \"x\"\n\n[[bake.provisioner]]\ninline = [\n  \"é\",\n]\nenv = { A = 1 }\n";
        let steps = |path: &[&str]| -> Vec<Step> {
            path.iter()
                .map(|p| {
                    p.parse()
                        .map(Step::Index)
                        .unwrap_or(Step::Key(p.to_string()))
                })
                .collect()
        };
        let (range, depth) =
            settable_aside(text, &steps(&["bake", "provisioner", "0", "inline", "0"])).unwrap();
        assert_eq!(depth, 4, "bake.provisioner[0].inline");
        let blanked = blank(text, range);
        assert_eq!(blanked.lines().count(), text.lines().count());
        assert!(
            !blanked.contains("inline") && !blanked.contains('é'),
            "{blanked}"
        );
        assert!(
            blanked.contains("env = { A = 1 }"),
            "the rest stays: {blanked}"
        );
        // Inside an inline table: the whole `env = {…}` goes.
        let (range, depth) =
            settable_aside(text, &steps(&["bake", "provisioner", "0", "env", "A"])).unwrap();
        assert_eq!((depth, &text[range]), (4, "env = { A = 1 }"));
        // A dotted key goes from its first part.
        let text = "bake.dest = 5\n";
        let (range, _) = settable_aside(text, &steps(&["bake", "dest"])).unwrap();
        assert_eq!(&text[range], "bake.dest = 5");
        // A table header is not set aside.
        assert!(settable_aside(text, &steps(&["bake"])).is_none());
    }
}
