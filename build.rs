//! Build info for `supersynk_build_info`: the git commit being built, from
//! `SUPERSYNK_GIT_COMMIT` when set (the Dockerfile's build argument: an image is built
//! without `.git`), else from `git rev-parse HEAD`, else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=SUPERSYNK_GIT_COMMIT");
    let commit = match std::env::var("SUPERSYNK_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Built again when HEAD moves: HEAD itself (a branch switch) and the ref it names.
            if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
                println!("cargo:rerun-if-changed={head}");
            }
            // A path that does not exist would rerun this script at every build: a packed
            // ref is watched through packed-refs.
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                for path in [branch.as_str(), "packed-refs"] {
                    if let Some(path) = git(&["rev-parse", "--git-path", path])
                        && std::path::Path::new(&path).exists()
                    {
                        println!("cargo:rerun-if-changed={path}");
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=SUPERSYNK_GIT_COMMIT={commit}");
}
