//! `[[…provisioner]]`, `[[…test]]`, `[[…pre]]` and `[[…post]]`: what runs, where, with what
//! environment and network, for how long.

use super::*;

impl Checker<'_> {
    /// `[[SECTION.provisioner]]`: what makes the image.
    pub(super) fn provisioners(
        &mut self,
        section: &str,
        entries: &[Spanned<ProvisionerEntry>],
    ) -> Vec<Provisioner> {
        self.entries(&format!("{section}.provisioner"), entries, None)
    }

    /// `[[SECTION.test]]`: what an instance of the new image must pass. Each has a timeout,
    /// so a test that hangs fails instead of holding the run.
    pub(super) fn tests(
        &mut self,
        section: &str,
        entries: &[Spanned<ProvisionerEntry>],
    ) -> Vec<Provisioner> {
        const DEFAULT_TEST_TIMEOUT: Duration = Duration::from_secs(600);
        self.entries(
            &format!("{section}.test"),
            entries,
            Some(DEFAULT_TEST_TIMEOUT),
        )
    }

    pub(super) fn entries(
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

    /// One `[[…provisioner]]` or `[[…test]]` entry, checked key by key in the order they
    /// are documented: long because an entry has many keys.
    pub(super) fn provisioner(
        &mut self,
        key: &str,
        entry: &Spanned<ProvisionerEntry>,
    ) -> Option<Provisioner> {
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
    pub(super) fn env(
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
    pub(super) fn timeout(&mut self, key: &str, value: &Option<Spanned<u64>>) -> Option<Duration> {
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
    pub(super) fn when(&mut self, key: &str, when: &Option<Spanned<String>>) -> When {
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
    pub(super) fn stage(
        &mut self,
        key: &str,
        entries: &[Spanned<StageEntry>],
    ) -> Vec<StageCommand> {
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
    pub(super) fn network(&mut self, key: &str, e: &ProvisionerEntry) -> Network {
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
    pub(super) fn local_file(&mut self, key: &str, value: &Spanned<String>) -> Option<PathBuf> {
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
}
