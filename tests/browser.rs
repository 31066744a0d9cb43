//! Pages of the server in headless Chromium (scripts in tests/browser/).

mod common;

#[tokio::test]
async fn status_page_renders_in_chromium() {
    common::browser::run("status.mjs").await;
}
