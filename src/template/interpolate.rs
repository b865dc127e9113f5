//! `${...}` references in template strings: `${var.NAME}`, `${env.NAME}`, `${commit}`,
//! `${timestamp}` and `${build_id}`. `$${` writes a literal `${`.

use std::collections::BTreeMap;

use super::diagnostic::nearest;

/// What `${commit}` stands for in the section being resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// A real run that knows its commit.
    Known(String),
    /// `validate`: any commit will do, so check the rest of the string with a stand-in.
    Placeholder,
    /// A section where no commit exists (`[base]` is not built from a commit).
    NotInThisSection,
}

/// The values references resolve to during one run.
#[derive(Debug, Clone)]
pub struct Context {
    pub vars: BTreeMap<String, String>,
    pub commit: Commit,
    pub timestamp: String,
    pub build_id: String,
    /// `validate --syntax-only`: an unset `${env.NAME}` stands for a sample value and is
    /// noted here, since a pull request's check has none of the pipeline's secrets.
    pub unset_env: Option<std::cell::RefCell<std::collections::BTreeSet<String>>>,
}

/// Stand-in for `${commit}` while validating: as long as a full git SHA-1.
const PLACEHOLDER_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Values a template takes from the environment (`${env.NAME}`): CI secrets, as a rule.
/// They are masked wherever amibake prints; values under `MIN_MASKED` characters are
/// left alone, as masking them would garble every line without hiding anything.
#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<String>);

pub const MIN_MASKED: usize = 4;
const MASK: &str = "***";

impl Secrets {
    /// The values of the `${env.NAME}` references in `text` (a `$${` escape is no reference).
    pub fn referenced_in(text: &str) -> Secrets {
        let values = references(text)
            .into_iter()
            .filter_map(|r| r.strip_prefix("env.").map(str::to_string))
            .filter_map(|name| std::env::var(name).ok());
        Secrets::default().with(values)
    }

    /// These secrets and `values` (a sensitive variable's, say). A value of several lines
    /// (a key, a JSON document) is masked line by line too, as output comes in lines.
    pub fn with(mut self, values: impl IntoIterator<Item = String>) -> Secrets {
        for value in values {
            let lines: Vec<String> = value.lines().map(|l| l.trim().to_string()).collect();
            for part in std::iter::once(value).chain(lines) {
                if part.len() >= MIN_MASKED && !self.0.contains(&part) {
                    self.0.push(part);
                }
            }
        }
        // Longest first, so a secret that contains another is masked whole.
        self.0.sort_by_key(|v| std::cmp::Reverse(v.len()));
        self
    }

    /// `text` with every secret value replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut masked = text.to_string();
        for value in &self.0 {
            if masked.contains(value.as_str()) {
                masked = masked.replace(value.as_str(), MASK);
            }
        }
        masked
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What each `${...}` in `text` names, trimmed (`var.app`, `env.TOKEN`, `commit`); a `$${`
/// escape is no reference.
pub fn references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else { break };
            found.push(tail[..end].trim().to_string());
            rest = &tail[end + 1..];
        } else {
            rest = &after[1..];
        }
    }
    found
}

/// Why a `${…}` reference cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterpolateError {
    #[error("`${{` without a closing `}}` in \"{text}\"")]
    Unclosed { text: String },
    #[error("unknown variable `{name}`; {}", variable_hint(.nearest))]
    UnknownVariable {
        name: String,
        nearest: Option<String>,
    },
    #[error("environment variable `{name}` is not set (used as ${{env.{name}}}); `validate --syntax-only` checks a template without it")]
    EnvUnset { name: String },
    #[error("`${{commit}}` exists only in [bake]: a base image is not built from a commit")]
    CommitNotHere,
    #[error("unknown reference `${{{reference}}}`; {}", reference_hint(.nearest))]
    UnknownReference {
        reference: String,
        nearest: Option<String>,
    },
}

fn variable_hint(nearest: &Option<String>) -> String {
    match nearest {
        Some(best) => format!("did you mean `{best}`?"),
        None => "declare it under [variables] or pass --var".into(),
    }
}

fn reference_hint(nearest: &Option<String>) -> String {
    match nearest {
        Some(best) => format!("did you mean `${{{best}}}`?"),
        None => "use ${var.NAME}, ${env.NAME}, ${commit}, ${timestamp} or ${build_id}".into(),
    }
}

/// Expands every reference in `text`, or says what is wrong with the first bad one.
pub fn interpolate(text: &str, ctx: &Context) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail.find('}').ok_or_else(|| InterpolateError::Unclosed {
                text: text.to_string(),
            })?;
            out.push_str(&resolve_reference(tail[..end].trim(), ctx)?);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve_reference(reference: &str, ctx: &Context) -> Result<String, InterpolateError> {
    if let Some(name) = reference.strip_prefix("var.") {
        return ctx
            .vars
            .get(name)
            .cloned()
            .ok_or_else(|| InterpolateError::UnknownVariable {
                name: name.to_string(),
                nearest: nearest(name, ctx.vars.keys().map(String::as_str)).map(str::to_string),
            });
    }
    if let Some(name) = reference.strip_prefix("env.") {
        return match (std::env::var(name), &ctx.unset_env) {
            (Ok(value), _) => Ok(value),
            (Err(_), Some(unset)) => {
                unset.borrow_mut().insert(name.to_string());
                Ok(format!("sample-{name}"))
            }
            (Err(_), None) => Err(InterpolateError::EnvUnset {
                name: name.to_string(),
            }),
        };
    }
    match reference {
        "timestamp" => Ok(ctx.timestamp.clone()),
        "build_id" => Ok(ctx.build_id.clone()),
        "commit" => match &ctx.commit {
            Commit::Known(sha) => Ok(sha.clone()),
            Commit::Placeholder => Ok(PLACEHOLDER_COMMIT.into()),
            Commit::NotInThisSection => Err(InterpolateError::CommitNotHere),
        },
        other => Err(InterpolateError::UnknownReference {
            reference: other.to_string(),
            nearest: nearest(other, ["timestamp", "build_id", "commit"]).map(str::to_string),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_masked_longest_first_and_escapes_and_short_values_are_not() {
        std::env::set_var("AMIBAKE_TEST_MASK_TOKEN", "tok-123456");
        std::env::set_var("AMIBAKE_TEST_MASK_LONGER", "tok-123456-and-more");
        std::env::set_var("AMIBAKE_TEST_MASK_SHORT", "ab");
        std::env::set_var("AMIBAKE_TEST_MASK_ESCAPED", "not-a-reference");
        let secrets = Secrets::referenced_in(
            "a = \"${env.AMIBAKE_TEST_MASK_TOKEN}\"\nb = \"${env.AMIBAKE_TEST_MASK_LONGER}\"\n\
             c = \"${env.AMIBAKE_TEST_MASK_SHORT}\"\nd = \"$${env.AMIBAKE_TEST_MASK_ESCAPED}\"",
        );
        assert_eq!(
            secrets.mask("x tok-123456-and-more y tok-123456 z ab not-a-reference"),
            "x *** y *** z ab not-a-reference"
        );
        assert!(Secrets::referenced_in("no references").is_empty());
        let pem =
            Secrets::default().with(["-----BEGIN KEY-----\nMIIEabc123\n-----END KEY-----".into()]);
        assert_eq!(pem.mask("line: MIIEabc123"), "line: ***");
    }

    fn ctx() -> Context {
        let mut vars = BTreeMap::new();
        vars.insert("app".to_string(), "shop".to_string());
        Context {
            vars,
            commit: Commit::Known("abc123".into()),
            timestamp: "20261123150000".into(),
            build_id: "ab-x".into(),
            unset_env: None,
        }
    }

    #[test]
    fn references_skip_escapes_and_trim() {
        assert_eq!(
            references("$${var.no} ${ var.app }-${commit}$5 ${env.X}"),
            ["var.app", "commit", "env.X"]
        );
    }

    #[test]
    fn an_unset_env_is_an_error_unless_the_check_is_secret_free() {
        let mut c = ctx();
        let err = interpolate("${env.AMIBAKE_TEST_NEVER_SET}", &c).unwrap_err();
        assert!(err.to_string().contains("is not set"), "{err}");
        c.unset_env = Some(Default::default());
        assert_eq!(
            interpolate("${env.AMIBAKE_TEST_NEVER_SET}", &c).unwrap(),
            "sample-AMIBAKE_TEST_NEVER_SET"
        );
        let unset = c.unset_env.unwrap().into_inner();
        assert!(unset.contains("AMIBAKE_TEST_NEVER_SET"));
    }

    #[test]
    fn expands_every_kind_of_reference() {
        std::env::set_var("AMIBAKE_TEST_INTERP", "blue");
        let got = interpolate(
            "${var.app}-${commit}-${timestamp}-${build_id}-${env.AMIBAKE_TEST_INTERP}",
            &ctx(),
        );
        assert_eq!(got.unwrap(), "shop-abc123-20261123150000-ab-x-blue");
    }

    #[test]
    fn dollar_escapes_and_lone_dollars_pass_through() {
        assert_eq!(
            interpolate("$${HOME} costs $5", &ctx()).unwrap(),
            "${HOME} costs $5"
        );
    }

    #[test]
    fn unknown_variable_suggests_the_nearest() {
        let err = interpolate("${var.ap}", &ctx()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown variable `ap`; did you mean `app`?"
        );
    }

    #[test]
    fn unclosed_reference_is_an_error() {
        assert!(interpolate("x-${var.app", &ctx())
            .unwrap_err()
            .to_string()
            .contains("without a closing"));
    }

    #[test]
    fn commit_is_refused_where_there_is_none() {
        let mut c = ctx();
        c.commit = Commit::NotInThisSection;
        assert!(interpolate("${commit}", &c)
            .unwrap_err()
            .to_string()
            .contains("only in [bake]"));
    }

    #[test]
    fn misspelt_builtin_is_named() {
        let err = interpolate("${timestmp}", &ctx()).unwrap_err().to_string();
        assert!(err.contains("did you mean `${timestamp}`"), "{err}");
    }
}
