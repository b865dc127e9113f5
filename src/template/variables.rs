//! Where a run's template variables come from, weakest first: the declaration's default,
//! `AMIBAKE_VAR_<name>` in the environment, each `--var-file` in the order given, each
//! `--var`. The order Packer and Terraform users know.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::diagnostic::{Diagnostic, SourceMap};

/// The environment variable prefix that sets a template variable: `AMIBAKE_VAR_app=shop`.
pub const ENV_PREFIX: &str = "AMIBAKE_VAR_";

/// What a run was given to set variables with, before any template is read.
#[derive(Debug, Clone, Default)]
pub struct VariableInputs {
    /// `AMIBAKE_VAR_<name>`: names no template declares are ignored, as one environment
    /// serves many templates.
    pub env: BTreeMap<String, String>,
    /// `--var-file FILE`: TOML, `name = "value"` at the top level.
    pub files: Vec<PathBuf>,
    /// `--var NAME=VALUE`.
    pub cli: BTreeMap<String, String>,
}

impl VariableInputs {
    /// The flags' variables and this process's `AMIBAKE_VAR_` ones.
    pub fn with_environment(cli: BTreeMap<String, String>, files: Vec<PathBuf>) -> Self {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter_map(|(k, v)| Some((k.strip_prefix(ENV_PREFIX)?.to_string(), v)))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        VariableInputs { env, files, cli }
    }
}

/// One value a variables file sets, with where, for an error about it.
pub(super) struct FileValue {
    pub name: String,
    pub value: String,
    pub at: Diagnostic,
}

/// Reads every variables file; each problem names its file, line and column.
pub(super) fn read_files(files: &[PathBuf]) -> (Vec<FileValue>, Vec<Diagnostic>) {
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match read_file(file) {
            Ok(mut found) => values.append(&mut found),
            Err(mut found) => errors.append(&mut found),
        }
    }
    (values, errors)
}

fn read_file(path: &Path) -> Result<Vec<FileValue>, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![SourceMap::new(path, "").at(
            None,
            "",
            format!("cannot read this variables file (--var-file): {e}"),
        )]
    })?;
    let map = SourceMap::new(path, &text);
    let table: BTreeMap<String, Spanned<toml::Value>> = toml::from_str(&text)
        .map_err(|e| vec![map.at(e.span(), "", e.message().trim_end().to_string())])?;
    let mut values = Vec::new();
    let mut errors = Vec::new();
    for (name, value) in table {
        let span = value.span();
        let text = match value.into_inner() {
            toml::Value::String(s) => s,
            // A number or a boolean is taken as written: `instance_count = 3` sets "3".
            scalar
            @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)) => {
                scalar.to_string()
            }
            other => {
                errors.push(map.at(
                    Some(span),
                    &name,
                    format!(
                        "a variable's value is a string, not {} {}",
                        article(other.type_str()),
                        other.type_str()
                    ),
                ));
                continue;
            }
        };
        values.push(FileValue {
            at: map.at(Some(span), &name, String::new()),
            name,
            value: text,
        });
    }
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors)
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variables_file_takes_strings_and_scalars_and_names_what_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "app = \"shop\"\ncount = 3\nflag = true\n").unwrap();
        let (values, errors) = read_files(std::slice::from_ref(&good));
        assert!(errors.is_empty(), "{errors:?}");
        let got: Vec<(String, String)> = values.into_iter().map(|v| (v.name, v.value)).collect();
        assert_eq!(
            got,
            [("app", "shop"), ("count", "3"), ("flag", "true")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "app = \"shop\"\nzones = [\"a\"]\n").unwrap();
        let (_, errors) = read_files(&[bad.clone(), dir.path().join("missing.toml")]);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert_eq!(
            text[0],
            format!(
                "{}:2:9: zones: a variable's value is a string, not an array",
                bad.display()
            )
        );
        assert!(
            text[1].contains("missing.toml:1:1") && text[1].contains("cannot read"),
            "{}",
            text[1]
        );
    }

    #[test]
    fn the_environment_prefix_sets_variables() {
        std::env::set_var("AMIBAKE_VAR_amibake_test_region", "eu-west-1");
        let inputs = VariableInputs::with_environment(BTreeMap::new(), Vec::new());
        assert_eq!(
            inputs.env.get("amibake_test_region").map(String::as_str),
            Some("eu-west-1")
        );
    }
}
