//! Starts a local cloud (tests/localcloud) for one test and always stops it, so no loop
//! device, mount, /dev link or process outlives the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct LocalCloud {
    state: tempfile::TempDir,
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
            .expect("temp dir");
        let out = run(state.path(), &["up", "--latency", latency]);
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
        let info = serde_json::from_str(
            &std::fs::read_to_string(state.path().join("ready.json")).unwrap(),
        )
        .unwrap();
        LocalCloud { state, env, info }
    }

    pub fn build_host(&self) -> &str {
        self.info["build_host"].as_str().unwrap()
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Runs `localcloud ARGS` against this cloud.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = run(self.state.path(), args);
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
        let out = run(self.state.path(), &["down"]);
        if !out.status.success() && !std::thread::panicking() {
            panic!(
                "localcloud down failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
