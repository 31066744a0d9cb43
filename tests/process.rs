//! The `supersynk` binary as a process: legacy environment variables, graceful shutdown on
//! SIGTERM, and memory held steady when a follower stops reading.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn legacy_port_variable_and_graceful_shutdown() {
    // PORT=0 (the original server's name) picks a free port; SOCKET_TIMEOUT is accepted.
    let (child, addr) = spawn(
        &[],
        &[
            ("PORT", "0"),
            ("SOCKET_TIMEOUT", "300000"),
            ("SOCKET_TIMEOUT_CHECK_INTERVAL", "80000"),
        ],
    );
    assert_ne!(addr.port(), 5001);
    let (status, _, body) = http(addr, "GET", "/version", "").await;
    assert_eq!((status, body.as_str()), (200, "0.1"));

    let mut a = plugin(addr).await;
    join(&mut a, "A", "bye", true).await;
    state(&mut a).await;
    sigterm(&child);
    // Every client is told, then closed with 1001.
    assert!(servermsg(&mut a).await.contains("shutting down"));
    assert_eq!(close_code(&mut a).await, Some(1001));
    assert!(exits_cleanly(child).await, "clean exit");
}

#[tokio::test]
async fn shutdown_waits_no_longer_than_the_grace_period() {
    let (child, addr) = spawn(&["--port", "0", "--shutdown-grace-ms", "500"], &[]);
    // A raw TCP client that upgrades and then never reads nor answers the close.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        b"GET /connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    // The 101, read to its end: from here on the server holds an upgraded socket.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tokio::time::timeout(WAIT, raw.read_exact(&mut byte))
            .await
            .expect("the 101 in time")
            .expect("the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let started = std::time::Instant::now();
    sigterm(&child);
    assert!(exits_cleanly(child).await);
    // The server waited for the socket that never answers its close, but no longer than the
    // grace period (a server that held no socket would exit at once).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "exited after {took:?}, not after the 500 ms grace period"
    );
    // What the server wrote meanwhile ends with its close: 1001.
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut rest))
        .await
        .expect("the socket ends with the process")
        .ok();
    let close = rest
        .windows(4)
        .rposition(|w| w[0] == 0x88 && w[2..] == [0x03, 0xE9]);
    assert!(close.is_some(), "no close 1001 in {rest:?}");
}

#[tokio::test]
async fn a_follower_that_stops_reading_is_cut_off_and_memory_stays_bounded() {
    // The leader pushes as fast as it can: lift the message rate limit for this test.
    let args = [
        "--port",
        "0",
        "--outbound-queue-bytes",
        "131072",
        "--messages-per-second",
        "1000000",
        "--message-burst",
        "1000000",
    ];
    let (child, addr) = spawn(&args, &[]);
    let (mut leader, mut good) = pair(addr, "slow").await;
    // The stuck follower joins without compression and then never reads again.
    let mut stuck = supersynk_client::HunterClient::connect(addr, "/connect", false)
        .await
        .unwrap();
    join(&mut stuck, "S", "slow", false).await;
    state(&mut good).await;
    state(&mut leader).await;

    let before = rss_kib(child.0.id());
    // 40 MB of pushes: far more than the stuck follower's socket buffers and queue hold.
    // The leader paces itself on the reading follower (8 pushes in flight, 64 KB, under its
    // 128 KiB queue), as a real session would; the stuck follower falls behind for good.
    let filler = "9".repeat(8000);
    let total = 5000;
    for n in 0..total {
        let p = format!(r#"{{"sessionId":"slow","type":"Push","data":[["em_{n}","{filler}"]]}}"#);
        leader.send_text(&p).await.unwrap();
        if n % 8 == 7 {
            let mut pushes = 0;
            while pushes < 8 {
                let text = tokio::time::timeout(WAIT, good.next_text())
                    .await
                    .expect("in time")
                    .unwrap()
                    .unwrap();
                if text.contains("\"Push\"") {
                    assert!(
                        text.contains(&format!("em_{}\"", n - 7 + pushes)),
                        "pushes in order"
                    );
                    pushes += 1;
                } else {
                    assert_eq!(
                        text,
                        r#"{"type":"sessionstate","leaderConnected":true,"playersCount":2}"#
                    );
                }
            }
        }
    }
    // Counted once its socket is dropped (up to the close timeout after the close).
    until_metric(&[addr], "supersynk_slow_consumer_disconnects_total", 1.0).await;
    // The leader was told the stuck follower is gone.
    let mut saw = false;
    for _ in 0..5 {
        let v = recv(&mut leader).await;
        if v["type"] == "sessionstate" && v["playersCount"] == 2 {
            saw = true;
            break;
        }
    }
    assert!(saw, "leader saw playersCount drop to 2");
    let after = rss_kib(child.0.id());
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    drop(stuck);
    // The reading follower is still in the session.
    leader.send_text(&push("slow", 1)).await.unwrap();
    assert_eq!(recv(&mut good).await["data"][0][0], "em_001");
}

#[tokio::test]
async fn floods_do_not_starve_a_well_behaved_session() {
    // Loopback is a trusted proxy here, so X-Forwarded-For makes every flood client come from
    // one public address, as it would behind nginx.
    let args = [
        "--port",
        "0",
        "--trusted-proxies",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "50",
    ];
    let (child, addr) = spawn(&args, &[]);
    let (mut leader, mut follower) = pair(addr, "calm").await;
    let before = rss_kib(child.0.id());

    let flood_address = [("X-Forwarded-For", "198.51.100.66")];
    // 1. Many connections from one address: 50 admitted, the rest refused with 429.
    let many = tokio::spawn(async move {
        let (mut held, mut refused) = (Vec::new(), 0);
        for _ in 0..200 {
            match supersynk_client::HunterClient::connect_with_headers(
                addr,
                "/connect",
                true,
                &flood_address,
            )
            .await
            {
                Ok(c) => held.push(c),
                Err(e) => {
                    assert!(e.to_string().contains("429"), "{e}");
                    refused += 1;
                }
            }
        }
        (held, refused)
    });
    // 2. A client sending as fast as it can: cut off by the message rate limit.
    let blaster = tokio::spawn(async move {
        let mut c = supersynk_client::HunterClient::connect(addr, "/connect", true)
            .await
            .unwrap();
        let mut sent = 0;
        while sent < 100_000
            && c.send_text(r#"{"type":"SetName","name":"spam"}"#)
                .await
                .is_ok()
        {
            sent += 1;
        }
        // However much the socket took, the connection ends (the close, or a reset once the
        // server stops waiting for the answer).
        tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = c.next_text().await {}
        })
        .await
        .is_ok()
    });
    // 3. A client opening and closing sockets in a loop.
    let churn = tokio::spawn(async move {
        for i in 0..300 {
            let mut c = supersynk_client::HunterClient::connect(addr, "/connect", i % 2 == 0)
                .await
                .unwrap();
            join(&mut c, "C", &format!("churn{}", i % 7), i % 3 == 0).await;
            drop(c);
        }
    });
    // Meanwhile the calm session keeps pushing and every push arrives, in order.
    for n in 0..100 {
        leader.send_text(&push("calm", n)).await.unwrap();
        assert_eq!(
            recv(&mut follower).await["data"][0][0],
            format!("em_{n:03}")
        );
        // The scenario, not a wait: the calm session's pace, so its pushes span the attack.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (held, refused) = many.await.unwrap();
    assert_eq!((held.len(), refused), (50, 150));
    assert!(
        blaster.await.unwrap(),
        "the blaster's connection stayed open"
    );
    until_metric(
        &[addr],
        r#"supersynk_closes_total{kind="rate_limited"}"#,
        1.0,
    )
    .await;
    churn.await.unwrap();
    assert_eq!(http(addr, "GET", "/healthz", "").await.0, 200);
    assert!(metric(addr, "supersynk_errors_total{kind=\"limit_message_rate\"}").await >= 1.0);
    let after = rss_kib(child.0.id());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

/// Runs the binary to completion with `args` and `env` (RUST_BACKTRACE=1 always, as an
/// operator's shell may have it); returns (exit code, stdout, stderr).
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_supersynk"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configuration_errors_are_one_plain_line_naming_the_flag() {
    let dir = data_dir();
    let zero_timeout = dir.join("zero.toml");
    std::fs::write(&zero_timeout, "socket-timeout-ms = 0\n").unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "prot = 5001\n").unwrap();
    // (flags, environment, what the error says)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--socket-timeout-ms", "0"],
            vec![],
            "--socket-timeout-ms must be above 0",
        ),
        (
            vec!["--socket-timeout-check-interval-ms", "0"],
            vec![],
            "--socket-timeout-check-interval-ms must be above 0",
        ),
        (
            vec!["--messages-per-second", "0"],
            vec![],
            "--messages-per-second must be above 0",
        ),
        (
            vec![],
            vec![("SUPERSYNK_LOG", "x=[")],
            "--log is not a valid filter",
        ),
        (
            vec![],
            vec![("PORT", "x")],
            "environment variable PORT (--port)",
        ),
        (
            vec!["--tls-cert", "c.pem"],
            vec![],
            "--tls-cert and --tls-key go together",
        ),
        (
            vec!["--config", zero_timeout.to_str().unwrap()],
            vec![],
            "--socket-timeout-ms must be above 0",
        ),
        (
            vec!["--config", typo.to_str().unwrap()],
            vec![],
            "unknown field `prot`",
        ),
        (vec!["--port", "x"], vec![], "'--port <PORT>'"),
    ];
    for (args, env, says) in cases {
        let (code, stdout, stderr) = run_to_end(&args, &env);
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} {env:?}: {stderr}");
        assert!(
            !stderr.to_lowercase().contains("backtrace") && !stderr.contains(".rs:"),
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
    // A port already taken: a runtime error (exit 1), as plain.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let data = dir.join("data");
    let args = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port,
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let (code, _, stderr) = run_to_end(&args, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "supersynk: cannot start on 127.0.0.1:{port}: Address already in use (os error 98)\n"
        )
    );
}

#[test]
fn check_config_validates_and_exits_like_nginx_t() {
    let dir = data_dir();
    let file = dir.join("supersynk.toml");
    std::fs::write(&file, "port = 6001\nlog-format = \"json\"\n").unwrap();
    let args = ["--config", file.to_str().unwrap(), "--check-config"];
    let (code, stdout, stderr) =
        run_to_end(&args, &[("SUPERSYNK_REDIS_URL", "redis://127.0.0.1:1")]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert_eq!(
        stdout,
        "supersynk: configuration ok: listens on 0.0.0.0:6001, store: SQLite in data, cluster node (Redis)\n"
    );
    // It starts nothing: nothing listens on the port, no data directory is made.
    assert!(std::net::TcpStream::connect("127.0.0.1:6001").is_err());
    let data = dir.join("never-made");
    let args = ["--data-dir", data.to_str().unwrap(), "--check-config"];
    assert_eq!(run_to_end(&args, &[]).0, 0);
    assert!(!data.exists());
    // Each source is checked: flag, environment, file, and the TLS files.
    let (code, _, stderr) = run_to_end(
        &["--check-config"],
        &[("SUPERSYNK_RELIABLE_HEARTBEAT_MS", "5")],
    );
    assert_eq!(code, 2);
    assert_eq!(
        stderr,
        "supersynk: configuration error: --reliable-heartbeat-ms must be at least 20\n"
    );
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let (code, _, stderr) = run_to_end(
        &[
            "--tls-cert",
            missing,
            "--tls-key",
            missing,
            "--check-config",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--tls-cert/--tls-key: TLS certificate") && stderr.contains(missing),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_clean_stop_warns_of_nothing_and_a_log_file_has_no_colour_codes() {
    let data = data_dir();
    let log_path = data.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // Text logs (the default) into a file, as `supersynk > server.log` does. The connection
    // cap fits the descriptors, whatever this machine's limit (else a deserved warning).
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_supersynk"))
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--max-connections",
            "1000",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(log)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let child = Proc(child);
    let addr: std::net::SocketAddr = eventually("a listening line in the log file", async || {
        let text = std::fs::read_to_string(&log_path).unwrap();
        let line = text.lines().find(|l| l.contains("listening"))?;
        let at = line.split("local_addr=").nth(1).unwrap();
        Some(at.split(' ').next().unwrap().parse().unwrap())
    })
    .await;
    let mut a = plugin(addr).await;
    join(&mut a, "A", "clean", true).await;
    state(&mut a).await;
    sigterm(&child);
    assert_eq!(close_code(&mut a).await, Some(1001));
    assert!(exits_cleanly(child).await);
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains('\x1b'), "colour codes in a file:\n{text}");
    assert!(
        text.lines()
            .last()
            .unwrap()
            .ends_with("supersynk::server: stopped"),
        "{text}"
    );
    assert!(
        !text.contains(" WARN ") && !text.contains("ERROR"),
        "{text}"
    );
    // The last events reached the log store too: a server started on the same data
    // directory finds them.
    let server = start(supersynk::config::Settings {
        data_dir: Some(data),
        ..Default::default()
    })
    .await;
    let (status, _, body) = http(
        server.local_addr,
        "GET",
        "/logs/query?user=server&text=stopped",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    let msgs: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["msg"].as_str())
        .collect();
    assert_eq!(msgs, ["stopped"], "{body}");
}
