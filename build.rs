//! Names the commit the binary is built from, for `amibake --version`: AMIBAKE_COMMIT when
//! the build sets it (a release job, a build from a source tarball), else git's HEAD, else
//! "unknown commit".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=AMIBAKE_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("AMIBAKE_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            let sha = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !sha.is_empty()).then_some(sha)
        })
        .unwrap_or_else(|| "unknown commit".into());
    println!("cargo:rustc-env=AMIBAKE_COMMIT={commit}");
}
