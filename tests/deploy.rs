//! The deployment files: docker-compose.yml is valid for Docker Compose, its nodes are the
//! ones nginx/supersynk.conf sends traffic to, and its healthchecks run here as written (the
//! node's against real servers, ready and not). (The image itself is built only where a
//! Docker engine exists; the README says so.)

mod common;

use std::process::Command;

use common::{compose, compose_json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn compose_file_is_valid_and_matches_the_nginx_upstream() {
    let check = compose(&["config", "-q"]);
    assert!(
        check.status.success(),
        "docker-compose.yml is invalid: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let services = compose(&["config", "--services"]);
    let services = String::from_utf8_lossy(&services.stdout);
    let mut services: Vec<&str> = services.lines().collect();
    services.sort();
    assert_eq!(
        services,
        ["nginx", "postgres", "redis", "supersynk-1", "supersynk-2"]
    );
    let site = std::fs::read_to_string(format!("{ROOT}/nginx/supersynk.conf")).unwrap();
    let mut upstream: Vec<&str> = site
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter_map(|l| l.split(':').next())
        .filter(|h| h.starts_with("supersynk-"))
        .collect();
    upstream.sort();
    upstream.dedup();
    assert_eq!(upstream, ["supersynk-1", "supersynk-2"]);
}

/// Runs a healthcheck's `test` as Docker would, here (`$$` is compose's escaped `$`).
fn run_healthcheck(test: &serde_json::Value, env: &[(&str, String)]) -> bool {
    let words: Vec<String> = test
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().replace("$$", "$"))
        .collect();
    let mut cmd = match words[0].as_str() {
        "CMD" => {
            let mut c = Command::new(&words[1]);
            c.args(&words[2..]);
            c
        }
        "CMD-SHELL" => {
            let mut c = Command::new("sh");
            c.args(["-c", &words[1]]);
            c
        }
        other => panic!("healthcheck form {other}"),
    };
    cmd.envs(env.iter().map(|(k, v)| (k, v.as_str())))
        .status()
        .expect("healthcheck command runs")
        .success()
}

#[tokio::test]
async fn healthchecks_gate_startup_and_the_node_check_follows_readyz() {
    let config = compose_json();
    let services = &config["services"];
    // nginx waits for both nodes to be ready, the nodes for Redis and PostgreSQL.
    let needs = |service: &str| -> Vec<(String, String)> {
        let mut deps: Vec<(String, String)> = services[service]["depends_on"]
            .as_object()
            .unwrap_or_else(|| panic!("{service} has long-form depends_on"))
            .iter()
            .map(|(k, v)| (k.clone(), v["condition"].as_str().unwrap().to_string()))
            .collect();
        deps.sort();
        deps
    };
    let healthy = |s: &str| (s.to_string(), "service_healthy".to_string());
    assert_eq!(
        needs("nginx"),
        [healthy("supersynk-1"), healthy("supersynk-2")]
    );
    for node in ["supersynk-1", "supersynk-2"] {
        assert_eq!(needs(node), [healthy("postgres"), healthy("redis")]);
    }
    // Every healthcheck runs here as written, against the machine's Redis and PostgreSQL.
    for service in ["redis", "postgres"] {
        let test = &services[service]["healthcheck"]["test"];
        assert!(
            run_healthcheck(test, &[]),
            "{service}'s healthcheck fails: {test}"
        );
    }
    // The node's: true for a ready node, false for one whose store is unusable and where
    // nothing listens.
    let test = &services["supersynk-1"]["healthcheck"]["test"];
    assert_eq!(test, &services["supersynk-2"]["healthcheck"]["test"]);
    let (_ready_proc, ready) = common::spawn(&["--port", "0"], &[]);
    let port = |a: std::net::SocketAddr| vec![("SUPERSYNK_PORT", a.port().to_string())];
    common::eventually("a ready node passes its healthcheck", async || {
        run_healthcheck(test, &port(ready)).then_some(())
    })
    .await;
    let (_broken_proc, broken) = common::spawn(&["--port", "0", "--data-dir", "/proc/nope"], &[]);
    assert_eq!(common::http(broken, "GET", "/readyz", "").await.0, 503);
    assert!(!run_healthcheck(test, &port(broken)));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    assert!(!run_healthcheck(test, &port(nobody)));
}
