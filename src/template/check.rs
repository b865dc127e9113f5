//! Checks a parsed template against the rules AWS and amibake impose, resolving `${...}`
//! references as it goes, and collects every problem with where it is.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::diagnostic::{explain_unknown_field, nearest, Diagnostic, SourceMap, TemplateErrors};
use super::interpolate::{self, interpolate, Commit, Context, Secrets};
use super::schema::{
    BakeSection, BaseSection, ProvisionerEntry, SshInterface, StageEntry, TemplateFile, Variable,
};
use super::variables::{self, VariableInputs};
use super::{
    AmiRef, BakePlan, BasePlan, Distribution, ExistingKeyPair, InstancePlan, LoadOptions, Network,
    Provisioner, ProvisionerAction, SandboxMode, SsmPublish, StageCommand, Template, Variant, When,
};

/// How long `base` waits for SSH when the template does not say: vendor images on small
/// instance types can take minutes to boot.
const DEFAULT_SSH_TIMEOUT: Duration = Duration::from_secs(300);

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
    // Each key set aside: its dotted path, and its own name.
    let mut set_aside: Vec<(String, String)> = Vec::new();
    loop {
        let deserializer = toml::Deserializer::new(&current);
        let err = match serde_path_to_error::deserialize::<_, TemplateFile>(deserializer) {
            Ok(file) => {
                return Ok(Parsed {
                    file,
                    errors,
                    set_aside: set_aside.into_iter().map(|(path, _)| path).collect(),
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
            if set_aside.iter().any(|(_, key)| key == field) {
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
        let name = match &steps[depth - 1] {
            Step::Key(name) => name.clone(),
            Step::Index(_) => String::new(),
        };
        set_aside.push((steps_key(&steps[..depth]), name));
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
fn holds(outer: &str, inner: &str) -> bool {
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
                let (from, to) = (key.span()?.start, value.span()?.end);
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

/// Checks every section and resolves it into a plan.
/// `options.commit` applies to `[bake]`; `[base]` never has one.
pub fn resolve(
    path: &Path,
    map: &SourceMap,
    parsed: Parsed,
    options: &LoadOptions,
) -> Result<Template, TemplateErrors> {
    let Parsed {
        file,
        errors,
        set_aside,
    } = parsed;
    let mut checker = Checker {
        map,
        set_aside,
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        errors: Vec::new(),
        ctx: Context {
            vars: BTreeMap::new(),
            commit: options.commit.clone(),
            timestamp: options.timestamp.clone(),
            build_id: options.build_id.clone(),
            unset_env: options.secret_free.then(Default::default),
        },
        sensitive: BTreeSet::new(),
        without_value: Vec::new(),
    };
    checker.errors = errors;
    checker.variables(&file.variables, &options.variables);
    if file.base.is_none() && file.bake.is_none() {
        checker.error(
            None,
            "",
            "the template has neither a [base] nor a [bake] table".into(),
        );
    }
    // Tests without an instance of their own boot the image as `[base]` launches its.
    let untested_at = file
        .bake
        .as_ref()
        .filter(|b| b.test_instance.is_none())
        .and_then(|b| b.tests.first().map(|t| t.span()));
    let mut bake = file.bake.map(|s| checker.bake(s));
    // A base image is not built from a commit, so `${commit}` has no value there.
    checker.ctx.commit = Commit::NotInThisSection;
    let base = file.base.map(|s| checker.base(s));
    if let (Some(plan), Some(span)) = (bake.as_mut(), untested_at) {
        match &base {
            Some(base) => plan.test_instance = Some(base.instance.clone()),
            None => checker.error(
                Some(span),
                "bake.test",
                "a test runs on an instance of the new image: add [bake.test_instance] with `instance_type` and `ssh_username` (a [base] table's instance is used when there is one)".into(),
            ),
        }
    }
    if checker.errors.is_empty() {
        let sensitive_values = checker
            .sensitive
            .iter()
            .filter_map(|name| checker.ctx.vars.get(name).cloned());
        let secrets = Secrets::default().with(sensitive_values);
        let unset_env = checker
            .ctx
            .unset_env
            .take()
            .unwrap_or_default()
            .into_inner();
        let mut needed_at_run_time: Vec<String> = unset_env
            .into_iter()
            .map(|name| format!("env.{name}"))
            .collect();
        if options.secret_free {
            needed_at_run_time.append(&mut checker.without_value);
        }
        Ok(Template {
            path: path.to_path_buf(),
            base,
            bake,
            secrets,
            needed_at_run_time,
        })
    } else {
        checker.errors.sort_by_key(|d| (d.line, d.column));
        Err(TemplateErrors(checker.errors))
    }
}

struct Checker<'a> {
    map: &'a SourceMap<'a>,
    /// Keys the parse set aside (see `Parsed`).
    set_aside: Vec<String>,
    dir: PathBuf,
    ctx: Context,
    errors: Vec<Diagnostic>,
    /// Variables declared `sensitive = true`.
    sensitive: BTreeSet<String>,
    /// Variables with no value, as `var.NAME`: a sample stands in for each.
    without_value: Vec<String>,
}

impl Checker<'_> {
    fn error(&mut self, span: Option<Range<usize>>, key: &str, message: String) {
        if span.as_ref().is_some_and(|s| self.takes_a_sample(s))
            || self.set_aside.iter().any(|aside| holds(key, aside))
        {
            return;
        }
        let found = self.map.at(span, key, message);
        // A value has one error: what follows from the first (a sample that is no account
        // id) is noise.
        if !self
            .errors
            .iter()
            .any(|e| (e.line, e.column) == (found.line, found.column))
        {
            self.errors.push(found);
        }
    }

    /// Whether the value at `span` takes something the check does not have (a variable
    /// without a value, said once where it is declared; with `--syntax-only`, an unset
    /// `${env.…}`), so a sample stood in for it and what the sample breaks says nothing
    /// of the template.
    fn takes_a_sample(&self, span: &Range<usize>) -> bool {
        let unset_env = self.ctx.unset_env.as_ref().map(|u| u.borrow());
        interpolate::references(self.map.slice(span.clone()))
            .iter()
            .any(|r| match r.split_once('.') {
                Some(("var", _)) => self.without_value.contains(r),
                Some(("env", name)) => unset_env.as_ref().is_some_and(|u| u.contains(name)),
                _ => false,
            })
    }

    /// Resolves `${...}` in a string value; on error, records it and returns the raw text.
    fn text(&mut self, key: &str, value: &Spanned<String>) -> String {
        match interpolate(value.get_ref(), &self.ctx) {
            Ok(resolved) => resolved,
            Err(message) => {
                self.error(Some(value.span()), key, message);
                value.get_ref().clone()
            }
        }
    }

    fn opt_text(&mut self, key: &str, value: &Option<Spanned<String>>) -> Option<String> {
        value.as_ref().map(|v| self.text(key, v))
    }

    /// Gives every declared variable its value, weakest source first (see `variables`),
    /// and notes the sensitive ones.
    fn variables(
        &mut self,
        declared: &BTreeMap<String, Spanned<Variable>>,
        inputs: &VariableInputs,
    ) {
        for (name, decl) in declared {
            if !is_identifier(name) {
                self.error(
                    Some(decl.span()),
                    &format!("variables.{name}"),
                    "variable names use letters, digits and _ and do not start with a digit".into(),
                );
            }
            if let Some(default) = &decl.get_ref().0.default {
                self.ctx.vars.insert(name.clone(), default.clone());
            }
            if decl.get_ref().0.sensitive {
                self.sensitive.insert(name.clone());
            }
        }
        for (name, value) in &inputs.env {
            if declared.contains_key(name) {
                self.ctx.vars.insert(name.clone(), value.clone());
            }
        }
        let (from_files, file_errors) = variables::read_files(&inputs.files);
        self.errors.extend(file_errors);
        for set in from_files {
            if declared.contains_key(&set.name) {
                self.ctx.vars.insert(set.name, set.value);
                continue;
            }
            let mut message = format!(
                "`{}` is not declared under [variables] in {}",
                set.name,
                self.map.file().display()
            );
            if let Some(best) = nearest(&set.name, declared.keys().map(String::as_str)) {
                message.push_str(&format!("; did you mean `{best}`?"));
            }
            self.errors.push(Diagnostic { message, ..set.at });
        }
        for (name, value) in &inputs.cli {
            if declared.contains_key(name) {
                self.ctx.vars.insert(name.clone(), value.clone());
                continue;
            }
            let mut message = format!("--var {name}: not declared under [variables]");
            if let Some(best) = nearest(name, declared.keys().map(String::as_str)) {
                message.push_str(&format!("; did you mean `{best}`?"));
            }
            self.error(None, "variables", message);
        }
        for (name, decl) in declared {
            if self.ctx.vars.contains_key(name) {
                continue;
            }
            self.without_value.push(format!("var.{name}"));
            self.ctx.vars.insert(name.clone(), format!("sample-{name}"));
            if self.ctx.unset_env.is_none() {
                let what = match &decl.get_ref().0.description {
                    Some(description) => format!("`{name}` ({description})"),
                    None => format!("`{name}`"),
                };
                self.error(
                    Some(decl.span()),
                    &format!("variables.{name}"),
                    format!(
                        "{what} has no default and no value: set it with --var {name}=…, a --var-file, or {}{name} in the environment",
                        variables::ENV_PREFIX
                    ),
                );
            }
        }
    }

    /// The value of a key AWS stores and shows to anyone who can list images (a name, a
    /// description, a tag): a sensitive variable there would be masked in our output and
    /// in the clear everywhere else, so it is refused.
    fn public_text(&mut self, key: &str, value: &Spanned<String>) -> String {
        let leaked: Vec<String> = interpolate::references(value.get_ref())
            .into_iter()
            .filter_map(|r| r.strip_prefix("var.").map(str::to_string))
            .filter(|name| self.sensitive.contains(name))
            .collect();
        for name in leaked {
            self.error(
                Some(value.span()),
                key,
                format!(
                    "`${{var.{name}}}` is sensitive, and AWS shows this value to everyone who can list the image; pass it to a provisioner's `env` instead"
                ),
            );
        }
        self.text(key, value)
    }

    fn opt_public_text(&mut self, key: &str, value: &Option<Spanned<String>>) -> Option<String> {
        value.as_ref().map(|v| self.public_text(key, v))
    }

    fn ami_name(&mut self, key: &str, value: &Spanned<String>) -> String {
        let errors_before = self.errors.len();
        let name = self.public_text(key, value);
        // A name whose references did not resolve has been reported already.
        if self.errors.len() > errors_before {
            return name;
        }
        if let Err(message) = check_ami_name(&name) {
            self.error(Some(value.span()), key, message);
        }
        name
    }

    fn ami_ref(&mut self, key: &str, value: &Spanned<AmiRef>) -> AmiRef {
        let ctx = &self.ctx;
        match value.get_ref().interpolated(|s| interpolate(s, ctx)) {
            Ok(resolved) => resolved,
            Err(message) => {
                self.error(Some(value.span()), key, message);
                value.get_ref().clone()
            }
        }
    }

    fn tags(
        &mut self,
        section: &str,
        tags: &BTreeMap<String, Spanned<String>>,
    ) -> BTreeMap<String, String> {
        // AWS's own limits on tag keys and values.
        const MAX_TAG_KEY: usize = 128;
        const MAX_TAG_VALUE: usize = 256;
        let mut out = BTreeMap::new();
        for (k, v) in tags {
            let key = format!("{section}.tags.{k}");
            let value = self.public_text(&key, v);
            if k.starts_with("aws:") || k.starts_with("amibake:") || k == "Name" {
                self.error(
                    Some(v.span()),
                    &key,
                    format!("tag `{k}` is set by AWS or by amibake itself; choose another key"),
                );
            } else if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
                self.error(
                    Some(v.span()),
                    &key,
                    format!("tag keys are 1 to {MAX_TAG_KEY} characters"),
                );
            } else if value.chars().count() > MAX_TAG_VALUE {
                self.error(
                    Some(v.span()),
                    &key,
                    format!("tag values are at most {MAX_TAG_VALUE} characters"),
                );
            }
            out.insert(k.clone(), value);
        }
        out
    }

    fn volume(
        &mut self,
        key_prefix: &str,
        size: &Option<Spanned<i32>>,
        kind: &Option<Spanned<String>>,
    ) -> (Option<i32>, Option<String>) {
        // EBS's own bounds for gp2/gp3 volumes.
        const MAX_VOLUME_GIB: i32 = 16_384;
        const VOLUME_TYPES: [&str; 7] = ["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"];
        if let Some(s) = size {
            if !(1..=MAX_VOLUME_GIB).contains(s.get_ref()) {
                self.error(
                    Some(s.span()),
                    &format!("{key_prefix}size_gb"),
                    format!("a volume is 1 to {MAX_VOLUME_GIB} GiB, not {}", s.get_ref()),
                );
            }
        }
        let kind_value = kind.as_ref().map(|k| {
            let v = self.text(&format!("{key_prefix}type"), k);
            if !VOLUME_TYPES.contains(&v.as_str()) {
                let mut message = format!(
                    "`{v}` is not an EBS volume type ({})",
                    VOLUME_TYPES.join(", ")
                );
                if let Some(best) = nearest(&v, VOLUME_TYPES) {
                    message = format!("`{v}` is not an EBS volume type; did you mean `{best}`?");
                }
                self.error(Some(k.span()), &format!("{key_prefix}type"), message);
            }
            v
        });
        (size.as_ref().map(|s| *s.get_ref()), kind_value)
    }

    /// `[[SECTION.provisioner]]`: what makes the image.
    fn provisioners(
        &mut self,
        section: &str,
        entries: &[Spanned<ProvisionerEntry>],
    ) -> Vec<Provisioner> {
        self.entries(&format!("{section}.provisioner"), entries, None)
    }

    /// `[[SECTION.test]]`: what an instance of the new image must pass. Each has a timeout,
    /// so a test that hangs fails instead of holding the run.
    fn tests(&mut self, section: &str, entries: &[Spanned<ProvisionerEntry>]) -> Vec<Provisioner> {
        const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(600);
        self.entries(
            &format!("{section}.test"),
            entries,
            Some(DEFAULT_TEST_TIMEOUT),
        )
    }

    fn entries(
        &mut self,
        list_key: &str,
        entries: &[Spanned<ProvisionerEntry>],
        default_timeout: Option<Duration>,
    ) -> Vec<Provisioner> {
        entries
            .iter()
            .enumerate()
            .filter_map(|(i, entry)| {
                let mut p = self.provisioner(&format!("{list_key}[{i}]"), entry)?;
                p.timeout = p.timeout.or(default_timeout);
                Some(p)
            })
            .collect()
    }

    fn provisioner(&mut self, key: &str, entry: &Spanned<ProvisionerEntry>) -> Option<Provisioner> {
        let span = entry.span();
        let e = entry.get_ref();
        let kinds: Vec<&str> = [
            e.script.as_ref().map(|_| "script"),
            e.inline.as_ref().map(|_| "inline"),
            e.file.as_ref().map(|_| "file"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if kinds.len() != 1 {
            let message = if kinds.is_empty() {
                "a provisioner needs one of `script`, `inline` or `file`".to_string()
            } else {
                format!("a provisioner does one thing: `{}` cannot be combined; split it into separate [[provisioner]] entries", kinds.join("` and `"))
            };
            self.error(Some(span), key, message);
            return None;
        }
        if let (Some(dest), None) = (&e.destination, &e.file) {
            self.error(
                Some(dest.span()),
                &format!("{key}.destination"),
                "`destination` goes with `file` only".into(),
            );
        }
        let env = self.env(key, &e.env);
        let when = self.when(key, &e.when);
        let network = self.network(key, e);
        let timeout = self.timeout(key, &e.timeout_seconds);
        let action = if let Some(script) = &e.script {
            ProvisionerAction::Script(self.local_file(&format!("{key}.script"), script)?)
        } else if let Some(inline) = &e.inline {
            if inline.get_ref().is_empty() {
                self.error(
                    Some(inline.span()),
                    &format!("{key}.inline"),
                    "`inline` needs at least one command".into(),
                );
            }
            let commands = inline
                .get_ref()
                .iter()
                .enumerate()
                .map(|(i, c)| self.text(&format!("{key}.inline[{i}]"), c))
                .collect();
            ProvisionerAction::Inline(commands)
        } else {
            let file = e.file.as_ref()?;
            let source = self.local_file(&format!("{key}.file"), file)?;
            let Some(dest) = &e.destination else {
                self.error(
                    Some(span),
                    &format!("{key}.destination"),
                    "`file` needs a `destination` path in the image".into(),
                );
                return None;
            };
            let destination = self.text(&format!("{key}.destination"), dest);
            if !destination.starts_with('/') {
                self.error(
                    Some(dest.span()),
                    &format!("{key}.destination"),
                    format!("`{destination}` must be an absolute path in the image"),
                );
            }
            ProvisionerAction::Upload {
                source,
                destination,
            }
        };
        let name = match &e.name {
            Some(n) => self.text(&format!("{key}.name"), n),
            None => match &action {
                ProvisionerAction::Script(p) => p
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                ProvisionerAction::Inline(_) => "inline".into(),
                ProvisionerAction::Upload { destination, .. } => format!("upload {destination}"),
            },
        };
        Some(Provisioner {
            name,
            action,
            env,
            network,
            when,
            timeout,
        })
    }

    /// An `env` table: names a shell would take, values interpolated.
    fn env(
        &mut self,
        key: &str,
        entries: &BTreeMap<String, Spanned<String>>,
    ) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (name, value) in entries {
            let env_key = format!("{key}.env.{name}");
            if !is_identifier(name) {
                self.error(
                    Some(value.span()),
                    &env_key,
                    format!("`{name}` is not a valid environment variable name"),
                );
            }
            env.insert(name.clone(), self.text(&env_key, value));
        }
        env
    }

    /// An entry's `timeout_seconds`, when it sets a usable one.
    fn timeout(&mut self, key: &str, value: &Option<Spanned<u64>>) -> Option<Duration> {
        let t = value.as_ref()?;
        if *t.get_ref() == 0 {
            self.error(
                Some(t.span()),
                &format!("{key}.timeout_seconds"),
                "at least 1 second".into(),
            );
            return None;
        }
        Some(Duration::from_secs(*t.get_ref()))
    }

    /// `when = "normal" | "destructive"`; unset: both variants.
    fn when(&mut self, key: &str, when: &Option<Spanned<String>>) -> When {
        let Some(w) = when else {
            return When::Always;
        };
        match w.get_ref().as_str() {
            "normal" => When::Normal,
            "destructive" => When::Destructive,
            other => {
                self.error(
                    Some(w.span()),
                    &format!("{key}.when"),
                    format!("`{other}`: a variant is \"normal\" or \"destructive\" (leave `when` out to run in both)"),
                );
                When::Always
            }
        }
    }

    /// `[[SECTION.pre]]` or `[[SECTION.post]]`: commands run on this machine.
    fn stage(&mut self, key: &str, entries: &[Spanned<StageEntry>]) -> Vec<StageCommand> {
        // Long enough for a smoke test or an upload; a hung command is cut.
        const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
        let mut commands = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("{key}[{i}]");
            let e = entry.get_ref();
            let argv: Vec<String> = e
                .command
                .get_ref()
                .iter()
                .enumerate()
                .map(|(j, a)| self.text(&format!("{key}.command[{j}]"), a))
                .collect();
            if argv.first().is_none_or(|program| program.is_empty()) {
                self.error(
                    Some(e.command.span()),
                    &format!("{key}.command"),
                    "a command and its arguments, like [\"./smoke-test.sh\", \"--quick\"]".into(),
                );
                continue;
            }
            // A program named by a path runs from the template's directory, so it must be
            // there now; a bare name is looked up on the PATH of the run, not this check's.
            if argv[0].contains('/') {
                let program = self.dir.join(&argv[0]);
                if !program.is_file() {
                    self.error(
                        Some(e.command.get_ref()[0].span()),
                        &format!("{key}.command[0]"),
                        format!("`{}` does not exist (looked for {}; paths are relative to the template's directory)", argv[0], program.display()),
                    );
                }
            }
            let timeout = self
                .timeout(&key, &e.timeout_seconds)
                .unwrap_or(DEFAULT_TIMEOUT);
            commands.push(StageCommand {
                name: self
                    .opt_text(&format!("{key}.name"), &e.name)
                    .unwrap_or_else(|| argv.join(" ")),
                env: self.env(&key, &e.env),
                when: self.when(&key, &e.when),
                timeout,
                // Absolute: a template named without a directory has an empty one, which
                // no command can run in.
                dir: std::path::absolute(Path::new(".").join(&self.dir))
                    .unwrap_or_else(|_| self.dir.clone()),
                argv,
            });
        }
        commands
    }

    /// A bake provisioner's `network`, `allow_imds` and `host_ports`.
    fn network(&mut self, key: &str, e: &ProvisionerEntry) -> Network {
        let on = |flag: &Option<Spanned<bool>>| flag.as_ref().is_some_and(|f| *f.get_ref());
        let holder = if key.starts_with("bake.provisioner[") {
            None
        } else if key.starts_with("base.provisioner[") {
            Some("a base instance")
        } else {
            Some("a test's instance")
        };
        let given = [
            ("network", e.network.as_ref().map(|f| f.span())),
            ("allow_imds", e.allow_imds.as_ref().map(|f| f.span())),
            ("host_ports", e.host_ports.as_ref().map(|f| f.span())),
        ];
        if let Some(holder) = holder {
            for (name, span) in given {
                if let Some(span) = span {
                    self.error(
                        Some(span),
                        &format!("{key}.{name}"),
                        format!("`{name}` is for bake provisioners, which have no network unless they ask; {holder} has its own"),
                    );
                }
            }
            return Network::None;
        }
        let mut host_ports = Vec::new();
        for (i, port) in e.host_ports.iter().flat_map(|p| p.get_ref()).enumerate() {
            match u16::try_from(*port.get_ref()) {
                Ok(number) if number > 0 => host_ports.push(number),
                _ => self.error(
                    Some(port.span()),
                    &format!("{key}.host_ports[{i}]"),
                    format!(
                        "{} is no port: a port of the build host's loopback is 1 to 65535",
                        port.get_ref()
                    ),
                ),
            }
        }
        if !on(&e.network) {
            let needs_network = "that has a network: it needs `network = true`";
            if on(&e.allow_imds) {
                self.error(
                    given[1].1.clone(),
                    &format!("{key}.allow_imds"),
                    format!("`allow_imds` opens the build host's instance metadata to a command {needs_network}"),
                );
            }
            if e.host_ports.is_some() {
                self.error(
                    given[2].1.clone(),
                    &format!("{key}.host_ports"),
                    format!("`host_ports` opens ports of the build host's loopback to a command {needs_network}"),
                );
            }
            return Network::None;
        }
        Network::Outside {
            metadata: on(&e.allow_imds),
            host_ports,
        }
    }

    /// A file the template names, relative to the template's own directory so a build gives
    /// the same result from any working directory.
    fn local_file(&mut self, key: &str, value: &Spanned<String>) -> Option<PathBuf> {
        let raw = self.text(key, value);
        let path = self.dir.join(&raw);
        if path.is_file() {
            Some(path)
        } else {
            self.error(
                Some(value.span()),
                key,
                format!("`{raw}` does not exist (looked for {}; paths are relative to the template's directory)", path.display()),
            );
            None
        }
    }

    fn base(&mut self, s: BaseSection) -> BasePlan {
        let name = self.ami_name("base.name", &s.name);
        let description = self.opt_public_text("base.description", &s.description);
        let source_ami = self.ami_ref("base.source_ami", &s.source_ami);
        let instance = self.instance(
            "base",
            InstanceKeys {
                instance_type: &s.instance_type,
                ssh_username: &s.ssh_username,
                ssh_interface: &s.ssh_interface,
                ssh_timeout_seconds: &s.ssh_timeout_seconds,
                ssh_keypair_name: &s.ssh_keypair_name,
                ssh_private_key_file: &s.ssh_private_key_file,
                ssh_cidrs: &s.ssh_cidrs,
                subnet_id: &s.subnet_id,
                security_group_ids: &s.security_group_ids,
                associate_public_ip: s.associate_public_ip,
                iam_instance_profile: &s.iam_instance_profile,
                user_data: &s.user_data,
                root_volume_size_gb: &s.root_volume_size_gb,
                root_volume_type: &s.root_volume_type,
            },
        );
        let publish = self.publish("base", &s.publish_ssm, &s.publish_label);
        let distribution = self.distribution(
            "base",
            DistributionKeys {
                copy_to_regions: &s.copy_to_regions,
                share_with_accounts: &s.share_with_accounts,
                kms_key_ids: &s.kms_key_ids,
                deprecate_after: &s.deprecate_after,
                imds_support: &s.imds_support,
            },
        );
        BasePlan {
            name,
            description,
            source_ami,
            instance,
            publish,
            distribution,
            tags: self.tags("base", &s.tags),
            provisioners: self.provisioners("base", &s.provisioners),
            pre: self.stage("base.pre", &s.pre),
            post: self.stage("base.post", &s.post),
            tests: self.tests("base", &s.tests),
            variant: Variant::default(),
        }
    }

    /// How a temporary instance is launched and reached; `section` prefixes every key.
    fn instance(&mut self, section: &str, s: InstanceKeys) -> InstancePlan {
        let key = |name: &str| format!("{section}.{name}");
        let instance_type = self.text(&key("instance_type"), s.instance_type);
        if !instance_type.contains('.')
            || instance_type.starts_with('.')
            || instance_type.ends_with('.')
        {
            self.error(
                Some(s.instance_type.span()),
                &key("instance_type"),
                format!("`{instance_type}` is not an instance type like `t3.small`"),
            );
        }
        let ssh_username = self.text(&key("ssh_username"), s.ssh_username);
        if ssh_username.is_empty() {
            self.error(
                Some(s.ssh_username.span()),
                &key("ssh_username"),
                "the SSH user cannot be empty".into(),
            );
        }
        let ssh_timeout = match s.ssh_timeout_seconds {
            Some(t) if *t.get_ref() == 0 => {
                self.error(
                    Some(t.span()),
                    &key("ssh_timeout_seconds"),
                    "must be more than 0".into(),
                );
                DEFAULT_SSH_TIMEOUT
            }
            Some(t) => Duration::from_secs(*t.get_ref()),
            None => DEFAULT_SSH_TIMEOUT,
        };
        let ssh_keypair = match (s.ssh_keypair_name, s.ssh_private_key_file) {
            (Some(name), Some(file)) => {
                let name = self.text(&key("ssh_keypair_name"), name);
                self.local_file(&key("ssh_private_key_file"), file)
                    .map(|private_key_file| ExistingKeyPair {
                        name,
                        private_key_file,
                    })
            }
            (Some(name), None) => {
                self.error(
                    Some(name.span()),
                    &key("ssh_keypair_name"),
                    "an existing key pair needs `ssh_private_key_file`, the private key to log in with".into(),
                );
                None
            }
            (None, Some(file)) => {
                self.error(
                    Some(file.span()),
                    &key("ssh_private_key_file"),
                    "a private key file goes with `ssh_keypair_name`, the key pair EC2 installs it from".into(),
                );
                None
            }
            (None, None) => None,
        };
        if let (Some(cidrs), Some(_)) = (s.ssh_cidrs, s.security_group_ids) {
            self.error(
                Some(cidrs.span()),
                &key("ssh_cidrs"),
                "`ssh_cidrs` shapes the temporary security group, which `security_group_ids` replaces: set one of them".into(),
            );
        }
        let ssh_cidrs = s.ssh_cidrs.as_ref().map(|list| {
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let key = key(&format!("ssh_cidrs[{i}]"));
                    let v = self.text(&key, c);
                    if !is_ipv4_cidr(&v) {
                        self.error(
                            Some(c.span()),
                            &key,
                            format!("`{v}` is not an IPv4 CIDR like 203.0.113.7/32"),
                        );
                    }
                    v
                })
                .collect()
        });
        let security_group_ids = s.security_group_ids.as_ref().map(|list| {
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(i, g)| self.prefixed_id(&key(&format!("security_group_ids[{i}]")), g, "sg-"))
                .collect()
        });
        let subnet_id = s
            .subnet_id
            .as_ref()
            .map(|v| self.prefixed_id(&key("subnet_id"), v, "subnet-"));
        let (root_volume_size_gb, root_volume_type) = self.volume(
            &key("root_volume_"),
            s.root_volume_size_gb,
            s.root_volume_type,
        );
        InstancePlan {
            instance_type,
            ssh_username,
            ssh_interface: s.ssh_interface.as_ref().map(|i| *i.get_ref()),
            ssh_timeout,
            ssh_keypair,
            ssh_cidrs,
            subnet_id,
            security_group_ids,
            associate_public_ip: s.associate_public_ip,
            iam_instance_profile: self
                .opt_text(&key("iam_instance_profile"), s.iam_instance_profile),
            user_data: self.opt_text(&key("user_data"), s.user_data),
            root_volume_size_gb,
            root_volume_type,
        }
    }

    fn prefixed_id(&mut self, key: &str, value: &Spanned<String>, prefix: &str) -> String {
        let v = self.text(key, value);
        if !v.starts_with(prefix) {
            self.error(
                Some(value.span()),
                key,
                format!("`{v}` is not an id starting with `{prefix}`"),
            );
        }
        v
    }

    fn publish(
        &mut self,
        section: &str,
        parameter: &Option<Spanned<String>>,
        label: &Option<Spanned<String>>,
    ) -> Option<SsmPublish> {
        if let (None, Some(l)) = (parameter, label) {
            self.error(
                Some(l.span()),
                &format!("{section}.publish_label"),
                "`publish_label` labels a version of `publish_ssm`, which is not set".into(),
            );
        }
        let p = parameter.as_ref()?;
        let name = self.text(&format!("{section}.publish_ssm"), p);
        if !name.starts_with('/')
            || name.len() < 2
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        {
            self.error(Some(p.span()), &format!("{section}.publish_ssm"), format!("`{name}` is not an SSM parameter name: start with `/`, use letters, digits and / _ . -"));
        } else if name.starts_with("/aws/") || name.starts_with("/ssm/") {
            self.error(
                Some(p.span()),
                &format!("{section}.publish_ssm"),
                format!(
                    "`{name}` is under a prefix AWS reserves; use your own, like /amibake/APP/{section}"
                ),
            );
        }
        let label = label.as_ref().map(|l| {
            let v = self.text(&format!("{section}.publish_label"), l);
            let lower = v.to_ascii_lowercase();
            if v.is_empty() || v.starts_with(|c: char| c.is_ascii_digit()) || lower.starts_with("aws") || lower.starts_with("ssm") {
                self.error(Some(l.span()), &format!("{section}.publish_label"), format!("`{v}` is not a valid SSM label: it cannot be empty, start with a digit, or with aws/ssm"));
            }
            v
        });
        Some(SsmPublish {
            parameter: name,
            label,
        })
    }

    /// A list of distinct values, each `valid` (else "is not `what`"): an entry that is not,
    /// or that is listed twice, is an error at its own line and column.
    fn distinct_list(
        &mut self,
        key: &str,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
        valid: impl Fn(&str) -> bool,
        what: &str,
    ) -> Vec<String> {
        let mut values: Vec<String> = Vec::new();
        for (i, entry) in list.iter().flat_map(|l| l.get_ref().iter().enumerate()) {
            let key = format!("{key}[{i}]");
            let value = self.text(&key, entry);
            if !valid(&value) {
                self.error(Some(entry.span()), &key, format!("`{value}` is not {what}"));
            } else if values.contains(&value) {
                self.error(
                    Some(entry.span()),
                    &key,
                    format!("`{value}` is listed twice"),
                );
            } else {
                values.push(value);
            }
        }
        values
    }

    /// Where the image goes beyond its own region and who may launch it; the keys are the
    /// same in both sections.
    fn distribution(&mut self, section: &str, keys: DistributionKeys) -> Distribution {
        let copy_to_regions = self.distinct_list(
            &format!("{section}.copy_to_regions"),
            keys.copy_to_regions.as_ref(),
            is_region_name,
            "a region name like eu-west-1",
        );
        let share_with_accounts = self.distinct_list(
            &format!("{section}.share_with_accounts"),
            keys.share_with_accounts.as_ref(),
            |account| account.len() == 12 && account.chars().all(|c| c.is_ascii_digit()),
            "an AWS account id (12 digits)",
        );
        let mut kms_key_ids = BTreeMap::new();
        for (region, k) in keys.kms_key_ids {
            let key = format!("{section}.kms_key_ids.{region}");
            let value = self.text(&key, k);
            if !copy_to_regions.contains(region) {
                self.error(Some(k.span()), &key, format!("`{region}` is not in `{section}.copy_to_regions`: a key here encrypts that region's copy"));
            } else if value.is_empty() {
                self.error(Some(k.span()), &key, "a KMS key id, ARN or alias".into());
            }
            kms_key_ids.insert(region.clone(), value);
        }
        let deprecate_after = keys.deprecate_after.as_ref().and_then(|d| {
            let key = format!("{section}.deprecate_after");
            let text = self.text(&key, d);
            // EC2 takes a deprecation time at most 10 years ahead.
            const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
            match humantime::parse_duration(&text) {
                Ok(after) if after >= Duration::from_secs(60) && after <= TEN_YEARS => Some(after),
                Ok(_) => {
                    self.error(
                        Some(d.span()),
                        &key,
                        format!("`{text}`: between a minute and 10 years, as EC2 takes it"),
                    );
                    None
                }
                Err(e) => {
                    self.error(
                        Some(d.span()),
                        &key,
                        format!("`{text}` is not a duration like 90d or 12w: {e}"),
                    );
                    None
                }
            }
        });
        let imds_v2_only = keys.imds_support.as_ref().is_some_and(|v| {
            let key = format!("{section}.imds_support");
            let text = self.text(&key, v);
            if text != "v2.0" {
                self.error(
                    Some(v.span()),
                    &key,
                    format!("`{text}`: the one value EC2 takes is \"v2.0\""),
                );
            }
            text == "v2.0"
        });
        Distribution {
            copy_to_regions,
            share_with_accounts,
            kms_key_ids,
            deprecate_after,
            imds_v2_only,
        }
    }

    fn sandbox_mode(&mut self, value: &Option<Spanned<String>>) -> SandboxMode {
        let Some(value) = value else {
            return SandboxMode::default();
        };
        let text = self.text("bake.sandbox", value);
        match text.as_str() {
            "private" => SandboxMode::Private,
            "compat" => SandboxMode::Compat,
            _ => {
                self.error(
                    Some(value.span()),
                    "bake.sandbox",
                    format!("`{text}`: expected \"private\" (the default) or \"compat\""),
                );
                SandboxMode::default()
            }
        }
    }

    fn bake(&mut self, s: BakeSection) -> BakePlan {
        let name = self.ami_name("bake.name", &s.name);
        let description = self.opt_public_text("bake.description", &s.description);
        let base_ami = self.ami_ref("bake.base_ami", &s.base_ami);
        let dest = self.text("bake.dest", &s.dest);
        if !dest.starts_with('/') || dest.split('/').any(|part| part == ".." || part == ".") {
            self.error(
                Some(s.dest.span()),
                "bake.dest",
                format!("`{dest}` must be an absolute path in the image without `.` or `..`"),
            );
        }
        let owner = s.owner.as_ref().map(|o| {
            let v = self.text("bake.owner", o);
            let valid =
                !v.is_empty() && v.split(':').count() <= 2 && v.split(':').all(is_account_name);
            if !valid {
                self.error(
                    Some(o.span()),
                    "bake.owner",
                    format!("`{v}` is not `user` or `user:group`"),
                );
            }
            v
        });
        // GPT allows 128 partitions; anything above is a typo.
        const MAX_PARTITION: u32 = 128;
        if let Some(p) = &s.root_partition {
            if *p.get_ref() > MAX_PARTITION {
                self.error(Some(p.span()), "bake.root_partition", format!("partition {} is beyond the {MAX_PARTITION} a disk can have (0 means the whole device)", p.get_ref()));
            }
        }
        let (root_volume_size_gb, root_volume_type) = self.volume(
            "bake.root_volume_",
            &s.root_volume_size_gb,
            &s.root_volume_type,
        );
        let test_instance = s.test_instance.as_ref().map(|t| {
            self.instance(
                "bake.test_instance",
                InstanceKeys {
                    instance_type: &t.instance_type,
                    ssh_username: &t.ssh_username,
                    ssh_interface: &t.ssh_interface,
                    ssh_timeout_seconds: &t.ssh_timeout_seconds,
                    ssh_keypair_name: &t.ssh_keypair_name,
                    ssh_private_key_file: &t.ssh_private_key_file,
                    ssh_cidrs: &t.ssh_cidrs,
                    subnet_id: &t.subnet_id,
                    security_group_ids: &t.security_group_ids,
                    associate_public_ip: t.associate_public_ip,
                    iam_instance_profile: &t.iam_instance_profile,
                    user_data: &t.user_data,
                    root_volume_size_gb: &t.root_volume_size_gb,
                    root_volume_type: &t.root_volume_type,
                },
            )
        });
        let distribution = self.distribution(
            "bake",
            DistributionKeys {
                copy_to_regions: &s.copy_to_regions,
                share_with_accounts: &s.share_with_accounts,
                kms_key_ids: &s.kms_key_ids,
                deprecate_after: &s.deprecate_after,
                imds_support: &s.imds_support,
            },
        );
        BakePlan {
            name,
            description,
            base_ami,
            // `/` stays itself: a tarball may lay files over the whole image.
            dest: match dest.trim_end_matches('/') {
                "" => "/".to_string(),
                trimmed => trimmed.to_string(),
            },
            owner,
            keep_setuid: s.keep_setuid.map(|k| *k.get_ref()).unwrap_or(false),
            sandbox: self.sandbox_mode(&s.sandbox),
            root_partition: s.root_partition.map(|p| *p.get_ref()),
            root_volume_type,
            root_volume_size_gb,
            kms_key_id: self.opt_text("bake.kms_key_id", &s.kms_key_id),
            test_instance,
            publish: self.publish("bake", &s.publish_ssm, &s.publish_label),
            distribution,
            tags: self.tags("bake", &s.tags),
            provisioners: self.provisioners("bake", &s.provisioners),
            pre: self.stage("bake.pre", &s.pre),
            post: self.stage("bake.post", &s.post),
            tests: self.tests("bake", &s.tests),
            variant: Variant::default(),
        }
    }
}

/// EC2's rule for AMI names: 3 to 128 characters of letters, digits and ( ) [ ] space . / - ' @ _
pub fn check_ami_name(name: &str) -> Result<(), String> {
    const MIN: usize = 3;
    const MAX: usize = 128;
    let len = name.chars().count();
    if !(MIN..=MAX).contains(&len) {
        return Err(format!(
            "AMI names are {MIN} to {MAX} characters; \"{name}\" has {len}"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(format!(
            "AMI names may not contain `{bad}` (allowed: letters, digits and ( ) [ ] space . / - ' @ _); got \"{name}\""
        ));
    }
    Ok(())
}

/// The keys of a temporary instance, as `[base]` and `[bake.test_instance]` both write them.
struct InstanceKeys<'a> {
    instance_type: &'a Spanned<String>,
    ssh_username: &'a Spanned<String>,
    ssh_interface: &'a Option<Spanned<SshInterface>>,
    ssh_timeout_seconds: &'a Option<Spanned<u64>>,
    ssh_keypair_name: &'a Option<Spanned<String>>,
    ssh_private_key_file: &'a Option<Spanned<String>>,
    ssh_cidrs: &'a Option<Spanned<Vec<Spanned<String>>>>,
    subnet_id: &'a Option<Spanned<String>>,
    security_group_ids: &'a Option<Spanned<Vec<Spanned<String>>>>,
    associate_public_ip: Option<bool>,
    iam_instance_profile: &'a Option<Spanned<String>>,
    user_data: &'a Option<Spanned<String>>,
    root_volume_size_gb: &'a Option<Spanned<i32>>,
    root_volume_type: &'a Option<Spanned<String>>,
}

/// The distribution keys of a section, as written.
struct DistributionKeys<'a> {
    copy_to_regions: &'a Option<Spanned<Vec<Spanned<String>>>>,
    share_with_accounts: &'a Option<Spanned<Vec<Spanned<String>>>>,
    kms_key_ids: &'a BTreeMap<String, Spanned<String>>,
    deprecate_after: &'a Option<Spanned<String>>,
    imds_support: &'a Option<Spanned<String>>,
}

/// `eu-west-1`, `us-gov-west-1`, `ap-southeast-4`: lowercase words and a number.
fn is_region_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok()
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_account_name(name: &str) -> bool {
    !name.is_empty()
        && (name.chars().all(|c| c.is_ascii_digit())
            || (name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))))
}

/// `a.b.c.d/n`, as a security group rule takes it.
pub fn is_ipv4_cidr(text: &str) -> bool {
    let Some((addr, prefix)) = text.split_once('/') else {
        return false;
    };
    addr.parse::<std::net::Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ami_name_rules() {
        assert!(check_ami_name("shop-abc-20261123 (web) [x] ./'@_").is_ok());
        assert!(check_ami_name("ab").unwrap_err().contains("3 to 128"));
        assert!(check_ami_name(&"a".repeat(129)).is_err());
        assert!(check_ami_name("shop:1").unwrap_err().contains("`:`"));
    }

    #[test]
    fn small_validators() {
        assert!(is_ipv4_cidr("10.0.0.0/8"));
        assert!(!is_ipv4_cidr("10.0.0.0/33"));
        assert!(!is_ipv4_cidr("10.0.0.0"));
        assert!(is_account_name("www-data") && is_account_name("33"));
        assert!(!is_account_name("Www") && !is_account_name(""));
        assert!(is_identifier("_a1") && !is_identifier("1a") && !is_identifier("a-b"));
        assert!(is_region_name("eu-west-1") && is_region_name("us-gov-west-1"));
        assert!(
            !is_region_name("eu-west") && !is_region_name("EU-west-1") && !is_region_name("eu--1")
        );
    }

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
        // A table header is not set aside.
        assert!(settable_aside(text, &steps(&["bake"])).is_none());
    }
}
