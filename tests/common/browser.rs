//! Runs a browser test script of `tests/browser/` (Node + playwright-core + Debian's
//! Chromium, installed by `scripts/deps.sh`) against the server binary of this build.

use std::process::Command;

/// Runs `node tests/browser/<script>` and panics with its output unless it succeeds.
pub async fn run(script: &str) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run scripts/deps.sh (or npm ci in tests/browser)"
    );
    let script = script.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .current_dir(dir)
            .env("SUPERSYNK_BIN", env!("CARGO_BIN_EXE_supersynk"))
            .output()
            .expect("node runs")
    })
    .await
    .expect("node finished");
    assert!(
        out.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
