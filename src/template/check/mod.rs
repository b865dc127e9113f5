//! Checks a parsed template against the rules AWS and amibake impose, resolving `${...}`
//! references as it goes, and collects every problem with where it is.
//!
//! The checker is one value walked over the file; its methods live by what they check:
//! `entries` (provisioners, tests, stage commands), `sections` (`[base]`, `[bake]`, an
//! instance, a channel, distribution), `rules` (AWS's naming rules).

mod entries;
mod rules;
mod sections;

pub use rules::is_ipv4_cidr;
use rules::{check_ami_name, is_identifier};

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::diagnostic::{nearest, Diagnostic, SourceMap, TemplateErrors};
use super::interpolate::{self, interpolate, Commit, Context, Secrets};
use super::read::{holds, Parsed};
use super::schema::{
    BakeSection, BaseSection, ImageKeys, InstanceKeys, ProvisionerEntry, StageEntry, Variable,
};
use super::variables::{self, VariableInputs};
use super::{
    AmiRef, BakeBuild, BakePlan, BaseBuild, BasePlan, Distribution, ExistingKeyPair, ImagePlan,
    InstancePlan, LoadOptions, Network, Plan, Provisioner, ProvisionerAction, SandboxMode,
    SsmPublish, StageCommand, Template, Variant, When,
};

/// Checks every section and resolves it into a plan.
/// `options.commit` applies to `[bake]`; `[base]` never has one.
/// Long because it is the order of the whole check: variables, sections, what depends on
/// both, then the secrets and what a `--syntax-only` check did without.
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
            Some(base) => plan.build.test_instance = Some(base.build.instance.clone()),
            None => checker.error(
                Some(span),
                "bake.test",
                "a test runs on an instance of the new image: add [bake.test_instance] with `instance_type` and `ssh_username` or `communicator = \"ssm\"` (a [base] table's instance is used when there is one)".into(),
            ),
        }
    }
    // What the run must never print: the values of `${env.…}` and sensitive variables,
    // masked in the errors too (a message may quote a resolved value).
    let sensitive_values = checker
        .sensitive
        .iter()
        .filter_map(|name| checker.ctx.vars.get(name).cloned());
    let secrets = Secrets::referenced_in(map.text()).with(sensitive_values);
    if checker.errors.is_empty() {
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
        for error in &mut checker.errors {
            error.message = secrets.mask(&error.message);
        }
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
        if !self.errors.iter().any(|e| {
            (&e.file, e.line, e.column, &e.key)
                == (&found.file, found.line, found.column, &found.key)
        }) {
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
            Err(e) => {
                self.error(Some(value.span()), key, e.to_string());
                value.get_ref().clone()
            }
        }
    }

    fn opt_text(&mut self, key: &str, value: &Option<Spanned<String>>) -> Option<String> {
        value.as_ref().map(|v| self.text(key, v))
    }

    /// Gives every declared variable its value, weakest source first (see `variables`),
    /// and notes the sensitive ones. Long because every source of a value is weighed here,
    /// in one order, so the precedence reads top to bottom.
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
        // Masking a value this short would garble every line without hiding anything, so
        // a sensitive one must be longer.
        for (name, decl) in declared {
            let value = self.ctx.vars.get(name).map_or(0, String::len);
            if self.sensitive.contains(name) && (1..interpolate::MIN_MASKED).contains(&value) {
                self.error(
                    Some(decl.span()),
                    &format!("variables.{name}"),
                    format!(
                        "`{name}` is sensitive, but its value is under {} characters: too short to mask in the output",
                        interpolate::MIN_MASKED
                    ),
                );
            }
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

    /// The sensitive variables `text` names.
    fn sensitive_references(&self, text: &str) -> Vec<String> {
        interpolate::references(text)
            .into_iter()
            .filter_map(|r| r.strip_prefix("var.").map(str::to_string))
            .filter(|name| self.is_sensitive(name))
            .collect()
    }

    fn is_sensitive(&self, variable: &str) -> bool {
        self.sensitive.contains(variable)
    }

    /// The value of a key AWS stores and shows in the clear (an image's name, description
    /// and tags to anyone who may list it; an instance's user data to anyone who may
    /// describe it): a sensitive variable there would be masked in our output and in the
    /// clear everywhere else, so it is refused.
    fn public_text(&mut self, key: &str, value: &Spanned<String>) -> String {
        let leaked = self.sensitive_references(value.get_ref());
        for name in leaked {
            self.error(
                Some(value.span()),
                key,
                format!(
                    "`${{var.{name}}}` is sensitive, and AWS shows this value in the clear to whoever may list the image or describe the instance; pass it to a provisioner's `env` instead"
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
        if let Err(e) = check_ami_name(&name) {
            self.error(Some(value.span()), key, e.to_string());
        }
        name
    }

    fn ami_ref(&mut self, key: &str, value: &Spanned<AmiRef>) -> AmiRef {
        let ctx = &self.ctx;
        match value.get_ref().interpolated(|s| interpolate(s, ctx)) {
            Ok(resolved) => resolved,
            Err(e) => {
                self.error(Some(value.span()), key, e.to_string());
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
}
