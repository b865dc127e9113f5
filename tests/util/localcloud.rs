//! Starts a local cloud (tests/localcloud) for one test and always stops it, so no loop
//! device, mount, /dev link or process outlives the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct LocalCloud {
    /// Not a TempDir: it is removed only once nothing is mounted beneath it (an instance's
    /// root holds a bind of /dev, and a recursive delete would walk into the host's).
    state: PathBuf,
    /// The `export` lines of `localcloud up`: what every AWS SDK reads.
    pub env: Vec<(String, String)>,
    info: serde_json::Value,
}

fn localcloud_bin() -> PathBuf {
    super::repo_root().join("tests/localcloud/localcloud")
}

impl LocalCloud {
    /// `latency`: none, quick or realistic.
    pub fn start(latency: &str) -> LocalCloud {
        let state = tempfile::Builder::new()
            .prefix("amibake-localcloud-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let out = run(&state, &["up", "--latency", latency]);
        assert!(
            out.status.success(),
            "localcloud up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let info =
            serde_json::from_str(&std::fs::read_to_string(state.join("ready.json")).unwrap())
                .unwrap();
        LocalCloud { state, env, info }
    }

    /// amibake's clients for this cloud, configured as a user's would be: from the process
    /// environment. That environment is the whole test binary's, so a binary that calls this
    /// holds one test and one cloud.
    pub async fn clients(&self) -> amibake::aws::Clients {
        for (key, value) in &self.env {
            std::env::set_var(key, value);
        }
        let config = amibake::aws::sdk_config(&amibake::aws::AwsOptions::default()).await;
        amibake::aws::Clients::new(&config).expect("the local cloud names a region")
    }

    pub fn build_host(&self) -> &str {
        self.info["build_host"].as_str().unwrap()
    }

    /// Runs `localcloud ARGS` against this cloud.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = run(&self.state, args);
        assert!(
            out.status.success(),
            "localcloud {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn calls(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.cli(&["calls"]).stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(localcloud_bin())
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("localcloud runs")
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        let out = run(&self.state, &["down"]);
        let prefix = format!("{}/", self.state.display());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let still_mounted: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        if still_mounted.is_empty() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
        if std::thread::panicking() {
            return;
        }
        assert!(
            out.status.success(),
            "localcloud down failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            still_mounted.is_empty(),
            "not removing {}: still mounted there: {still_mounted:?}",
            self.state.display()
        );
    }
}
