//! Runs a browser test script of `tests/browser/` (Node + playwright-core + Debian's
//! Chromium, installed by `scripts/deps.sh`) against the server binary of this build.
//! Screenshots the scripts take go to `target/screenshots/` (`SCREENSHOTS`); the scripts
//! print their paths.

use std::process::Command;

/// Runs `node tests/browser/<script>` and panics with its output unless it succeeds.
pub async fn run(script: &str) {
    run_with(script, &[]).await;
}

/// [`run`] with extra environment variables (a server the test started, what it expects);
/// returns what the script printed.
pub async fn run_with(script: &str, env: &[(&str, &str)]) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run scripts/deps.sh (or npm ci in tests/browser)"
    );
    let screenshots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("screenshots");
    std::fs::create_dir_all(&screenshots).expect("target/screenshots");
    let mut command = Command::new("node");
    command
        .arg(script)
        .current_dir(dir)
        .env("SUPERSYNK_BIN", env!("CARGO_BIN_EXE_supersynk"))
        .env("SCREENSHOTS", &screenshots);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || command.output().expect("node runs"))
        .await
        .expect("node finished");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Shown with --nocapture: the measured numbers and the screenshots' paths.
    println!("{stdout}");
    stdout
}
