//! Records the git commit nodedns is built from (`nodedns --version`, `nodedns_build_info`):
//! `git rev-parse --short=12 HEAD` when git and the repository are there, else "unknown"
//! (a build from a source tarball, or an image build without `.git`). `NODEDNS_GIT_COMMIT` in
//! the environment wins (for builds that know the commit but have no `.git`).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NODEDNS_GIT_COMMIT");
    let commit = std::env::var("NODEDNS_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            let c = String::from_utf8(out.stdout).ok()?.trim().to_string();
            c.chars()
                .all(|ch| ch.is_ascii_hexdigit())
                .then_some(c)
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves (a worktree's .git is a file pointing at the real git dir).
    if let Ok(out) = Command::new("git")
        .args(["rev-parse", "--git-dir", "--git-common-dir"])
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut dirs = text.lines();
        if let (Some(git_dir), Some(common)) = (dirs.next(), dirs.next()) {
            // Only paths that exist: cargo counts a missing one as changed on every build
            // (`packed-refs` is absent until git packs refs), which rebuilt the crate each time.
            for p in [
                format!("{git_dir}/HEAD"),
                format!("{common}/refs/heads"),
                format!("{common}/packed-refs"),
            ] {
                if std::path::Path::new(&p).exists() {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=NODEDNS_GIT_COMMIT={commit}");
}
