//! `/metrics` as Prometheus tooling reads it: the text format 0.0.4 by default (checked by
//! `promtool check metrics`: help on every metric, counters named `_total`), OpenMetrics
//! when the scraper asks for it, the process metrics and the build info, the relay latency
//! and outbound queue histograms filled by real pushes, and the shipped Grafana dashboard,
//! whose every query names a metric a real server exports and parses as PromQL (promtool).

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Runs promtool with `args`, `stdin` fed in; returns (success, stdout + stderr).
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/deps.sh: Debian's prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The names a text-format exposition defines (its TYPE lines), with the sample names of
/// its histograms.
fn exported_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        names.insert(name.to_string());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Traffic of every kind, so that the labelled families (errors, closes, direct messages),
/// which have no series before their first event, are exported too.
async fn traffic(addr: std::net::SocketAddr) {
    use futures::{SinkExt, StreamExt};
    let (mut leader, mut follower) = pair(addr, "traffic").await;
    leader.send_text(&push("traffic", 1)).await.unwrap();
    recv(&mut follower).await;
    follower.send_text("{not json").await.unwrap();
    servermsg(&mut follower).await;
    drop(leader);
    drop(follower);
    let (mut peer, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/messages"))
        .await
        .unwrap();
    let to_nobody = r#"{"from":"A","to":"nobody","msg":"hi"}"#;
    for frame in [r#"{"login":"A"}"#, to_nobody] {
        peer.send(tokio_tungstenite::tungstenite::Message::text(frame))
            .await
            .unwrap();
    }
    let answer = tokio::time::timeout(WAIT, peer.next()).await.unwrap();
    assert!(
        answer
            .unwrap()
            .unwrap()
            .to_text()
            .unwrap()
            .contains("does not exist")
    );
    drop(peer);
    until_metric(&[addr], "supersynk_connections_open", 0.0).await;
}

#[tokio::test]
async fn promtool_accepts_the_default_format_after_real_traffic() {
    let server = start_default().await;
    let addr = server.local_addr;
    traffic(addr).await;

    let (status, head, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(!body.contains("# EOF") && !body.contains("# UNIT"));
    let (ok, out) = promtool(&["check", "metrics"], &body);
    assert!(ok && out.trim().is_empty(), "promtool: {out}\n{body}");
    // Every family has its help text, and every counter's TYPE names its samples.
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "no help for {name}"
        );
        if line.ends_with(" counter") {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
    assert!(body.contains("supersynk_errors_total{kind=\"invalid_json\"} 1"));
    assert!(body.contains("supersynk_direct_messages_total{kind=\"refused\"} 1"));
}

#[tokio::test]
async fn openmetrics_when_the_scraper_asks_for_it() {
    let server = start_default().await;
    let (status, head, body) = http_with(
        server.local_addr,
        "GET",
        "/metrics",
        &[("Accept", PROMETHEUS_ACCEPT)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"));
    // OpenMetrics names a counter's family without `_total`, its samples with it.
    assert!(body.contains("# TYPE supersynk_connections counter\n"));
    assert!(body.contains("\nsupersynk_connections_total 0\n"));
    assert!(body.contains("# TYPE supersynk_build info\n"));
    assert!(body.contains("# UNIT supersynk_relay_latency_seconds seconds\n"));
    // Asked for the text format, or for nothing we make: the text format.
    for accept in ["text/plain;version=0.0.4", "application/json"] {
        let (_, head, _) = http_with(
            server.local_addr,
            "GET",
            "/metrics",
            &[("Accept", accept)],
            "",
        )
        .await;
        assert!(head.contains("version=0.0.4"), "{accept}: {head}");
    }
}

#[tokio::test]
async fn process_metrics_and_build_info() {
    let server = start_default().await;
    // CPU time is counted in ticks: work until one has passed.
    let deadline = std::time::Instant::now() + WAIT;
    while metric(server.local_addr, "process_cpu_seconds_total").await == 0.0 {
        assert!(std::time::Instant::now() < deadline, "no CPU time counted");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }
    let (_, _, body) = http(server.local_addr, "GET", "/metrics", "").await;
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    // This test process is the server's process.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let rss = value("process_resident_memory_bytes");
    assert!(
        rss > rss_kib * 1024.0 / 2.0 && rss < rss_kib * 1024.0 * 2.0,
        "{rss} vs {rss_kib} KiB"
    );
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_threads") >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 3600.0, "{started}");
    let build = body
        .lines()
        .find(|l| l.starts_with("supersynk_build_info{"))
        .unwrap();
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    // Built from a git checkout: the commit is known.
    let commit = build.split("git_commit=\"").nth(1).unwrap();
    let commit = &commit[..commit.find('"').unwrap()];
    assert!(
        commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{build}"
    );
}

#[tokio::test]
async fn relay_latency_and_queue_histograms_count_real_deliveries() {
    let server = start_default().await;
    let addr = server.local_addr;
    let session = "histograms";
    let (mut leader, mut f1) = pair(addr, session).await;
    let mut f2 = plugin(addr).await;
    join(&mut f2, "F2", session, false).await;
    assert_eq!(state(&mut f2).await, (3, true));
    assert_eq!(state(&mut f1).await, (3, true));
    assert_eq!(state(&mut leader).await, (3, true));
    const PUSHES: usize = 20;
    for n in 0..PUSHES {
        leader.send_text(&push(session, n)).await.unwrap();
    }
    for f in [&mut f1, &mut f2] {
        for n in 0..PUSHES {
            assert_eq!(
                recv(f).await,
                serde_json::from_str::<serde_json::Value>(&push(session, n)).unwrap()
            );
        }
    }
    // Each connection merges at most once a second, and when it ends: closed, every
    // delivery is counted.
    drop(f1);
    drop(f2);
    drop(leader);
    until_metric(&[addr], "supersynk_connections_open", 0.0).await;
    until_metric(
        &[addr],
        "supersynk_relay_latency_seconds_count",
        (2 * PUSHES) as f64,
    )
    .await;
    let (_, _, body) = http(addr, "GET", "/metrics", "").await;
    let sample = |line_start: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line_start} missing"))
    };
    // Loopback deliveries on this machine, however loaded, take well under 5 s.
    assert_eq!(
        sample("supersynk_relay_latency_seconds_bucket{le=\"5.0\"}"),
        (2 * PUSHES) as f64
    );
    let sum = sample("supersynk_relay_latency_seconds_sum");
    assert!(sum > 0.0 && sum < 5.0 * (2 * PUSHES) as f64, "{sum}");
    // Every batch any connection wrote (pushes, sessionstates) was observed.
    let batches = sample("supersynk_outbound_queue_bytes_count");
    assert!(batches >= 2.0 && batches <= sample("supersynk_messages_out_total"));
    assert!(
        sample("supersynk_outbound_queue_bytes_sum")
            >= (2 * PUSHES * push(session, 0).len()) as f64
    );
}

/// Every PromQL query of a Grafana dashboard (panel targets and variable queries).
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The metric names a query mentions (every name of this server's or the process's).
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_name = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &query[i..];
        if starts_name && (rest.starts_with("supersynk_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            names.push(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_the_server_exports() {
    let server = start_default().await;
    traffic(server.local_addr).await;
    let (_, _, body) = http(server.local_addr, "GET", "/metrics", "").await;
    let exported = exported_names(&body);
    let text = std::fs::read_to_string(format!("{ROOT}/grafana/supersynk.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() > 20, "{} queries", all.len());
    let mut panel_exprs = Vec::new();
    for q in &all {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query names no metric: {q}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{name} is not exported (query: {q})"
            );
        }
        if !q.starts_with("label_values(") {
            panel_exprs.push(q.clone());
        }
    }
    // Every panel query parses as PromQL: promtool checks them as recording rules, with
    // Grafana's variables given values.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, q) in panel_exprs.iter().enumerate() {
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    let file = tempfile::Builder::new()
        .suffix(".yml")
        .tempfile_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    std::fs::write(file.path(), rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.path().to_str().unwrap()], "");
    assert!(ok, "promtool check rules: {out}");
    // The histograms, the process metrics and the cluster's health are on it.
    for name in [
        "supersynk_relay_latency_seconds_bucket",
        "supersynk_outbound_queue_bytes_bucket",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "supersynk_redis_up",
        "supersynk_build_info",
    ] {
        assert!(text.contains(name), "{name} is not on the dashboard");
    }
}
