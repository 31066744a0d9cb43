//! The deployment files: docker-compose.yml is valid for Docker Compose, and its nodes are
//! the ones nginx/supersynk.conf sends traffic to. (The image itself is built only where a
//! Docker engine exists; the README says so.)

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `docker compose` (the plugin) where it exists, else `docker-compose`.
fn compose(args: &[&str]) -> std::process::Output {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    };
    cmd.current_dir(ROOT)
        .args(args)
        .output()
        .expect("docker compose or docker-compose is installed (scripts/deps.sh)")
}

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
