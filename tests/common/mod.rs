//! Shared test helpers: start the real server on port 0, talk HTTP and WebSocket to it.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod logs;
pub mod messages;
pub mod postgres;
pub mod reliable;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use supersynk::Server;
use supersynk::config::{Config, Settings};
use supersynk_client::HunterClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(5);

/// Starts a server on 127.0.0.1:0 with `settings` over the defaults.
pub async fn start(settings: Settings) -> Server {
    let base = Settings {
        bind: Some([127, 0, 0, 1].into()),
        port: Some(0),
        data_dir: Some(data_dir()),
        ..Settings::default()
    };
    let config = Config::resolve(settings.over(base)).expect("valid test config");
    Server::start(config).await.expect("server starts")
}

/// A fresh data directory under cargo's temporary directory for tests (kept after the test,
/// so a restarted server can be pointed at it).
pub fn data_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("data-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary directory")
        .keep()
}

/// Settings without the per-connection message rate, for tests that send thousands of
/// messages as fast as they can.
pub fn unthrottled() -> Settings {
    Settings {
        messages_per_second: Some(1_000_000),
        message_burst: Some(1_000_000),
        ..Settings::default()
    }
}

/// Starts a server with default settings.
pub async fn start_default() -> Server {
    start(Settings::default()).await
}

/// A plain HTTP/1.1 request; returns (status, headers, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
    http_with(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// A plugin-like client on `/connect`.
pub async fn plugin(addr: SocketAddr) -> HunterClient {
    HunterClient::connect(addr, "/connect", true)
        .await
        .expect("plugin connects")
}

/// The next JSON message, within [`WAIT`].
pub async fn recv(c: &mut HunterClient) -> Value {
    let text = tokio::time::timeout(WAIT, c.next_text())
        .await
        .expect("a message in time")
        .expect("socket open")
        .expect("no socket error");
    match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => Value::String(text),
    }
}

/// The next message, which must be a sessionstate; returns (playersCount, leaderConnected).
pub async fn state(c: &mut HunterClient) -> (u64, bool) {
    let v = recv(c).await;
    assert_eq!(v["type"], "sessionstate", "expected sessionstate, got {v}");
    (
        v["playersCount"].as_u64().unwrap(),
        v["leaderConnected"].as_bool().unwrap(),
    )
}

/// The next message, which must be a servermsg; returns its text.
pub async fn servermsg(c: &mut HunterClient) -> String {
    let v = recv(c).await;
    assert_eq!(v["type"], "servermsg", "expected servermsg, got {v}");
    assert!(["trace", "debug", "info", "warn", "error"].contains(&v["level"].as_str().unwrap()));
    v["text"].as_str().unwrap().to_string()
}

/// Sends SetName and SetSession the way the plugin does.
pub async fn join(c: &mut HunterClient, name: &str, session: &str, leader: bool) {
    c.send_text(&format!(r#"{{"type":"SetName","name":"{name}"}}"#))
        .await
        .unwrap();
    c.send_text(&format!(
        r#"{{"sessionId":"{session}","type":"SetSession","isLeader":{leader}}}"#
    ))
    .await
    .unwrap();
}

/// A realistic push of a full monster, as the plugin sends it.
pub fn push(session: &str, n: usize) -> String {
    format!(
        r#"{{"sessionId":"{session}","type":"Push","data":[["em_{n:03}",[[0,32.42],[1,23.42],[2,100.0],[3,0],[4,87.5],[5,12.25]],[[42,41.23],[7,0],[12,100.0]]]]}}"#
    )
}

/// Reads until the peer closes; returns the close code.
pub async fn close_code(c: &mut HunterClient) -> Option<u16> {
    close_code_of(&mut c.ws, WAIT).await
}

/// Reads `ws` until the peer closes, within `within`: the close code it sent, or `None`
/// when the socket broke (or closed) without one.
pub async fn close_code_of<S>(ws: &mut S, within: Duration) -> Option<u16>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    use futures::StreamExt;
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("closed in time")
}

/// Reads a metric's value from /metrics (sums every series of that name).
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, _, body) = http(addr, "GET", "/metrics", "").await;
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plugin leader and a plugin follower joined to `session`, their sessionstates read.
pub async fn pair(addr: SocketAddr, session: &str) -> (HunterClient, HunterClient) {
    let mut leader = plugin(addr).await;
    join(&mut leader, "L", session, true).await;
    assert_eq!(state(&mut leader).await, (1, true));
    let mut follower = plugin(addr).await;
    join(&mut follower, "F", session, false).await;
    assert_eq!(state(&mut follower).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));
    (leader, follower)
}

/// The server process; killed if a test fails before it stops it.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited in the tests that stop it themselves.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `args` and `env`; returns the child and its address (read from
/// the "listening" log line).
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let (child, addr, _) = spawn_command(Command::new(env!("CARGO_BIN_EXE_supersynk")), args, env);
    (child, addr)
}

/// [`spawn`] under a shell that first runs `setup` (e.g. `ulimit -Sn 128`); also returns
/// the log lines before "listening".
pub fn spawn_after(
    setup: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, SocketAddr, Vec<serde_json::Value>) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("{setup} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_supersynk"));
    spawn_command(cmd, args, env)
}

fn spawn_command(
    mut cmd: Command,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, SocketAddr, Vec<serde_json::Value>) {
    if !args.contains(&"--data-dir") {
        cmd.arg("--data-dir").arg(data_dir());
    }
    let mut child = cmd
        .args(["--bind", "127.0.0.1"])
        .args(args)
        .envs(env.iter().copied())
        .env("SUPERSYNK_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    let addr = loop {
        let line = lines.next().expect("log line").expect("readable");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
        if v["fields"]["message"] == "listening" {
            break v["fields"]["local_addr"].as_str().unwrap().parse().unwrap();
        }
        before.push(v);
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr, before)
}

pub fn sigterm(child: &Proc) {
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit and returns whether it exited with success.
pub async fn exits_cleanly(mut child: Proc) -> bool {
    tokio::task::spawn_blocking(move || child.0.wait().map(|s| s.success()).unwrap_or(false))
        .await
        .unwrap()
}

/// A WebSocket client of the tests' own (not the plugin's).
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The next message of a watch socket, as JSON, within [`WAIT`]; the server's pings (a
/// quiet log listener gets them) are skipped.
pub async fn next_json(ws: &mut Ws) -> Value {
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .expect("no socket error");
        if msg.is_ping() || msg.is_pong() {
            continue;
        }
        return serde_json::from_str(msg.to_text().unwrap()).unwrap();
    }
}

/// (info string, body) of every fenced block of a markdown file: how the protocol docs'
/// examples are found by the tests that check them.
pub fn fenced_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        if let Some(info) = line.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((info.trim().to_string(), String::new())),
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// Waits until `name` on `addrs`, summed, equals `want` (within [`WAIT`]).
pub async fn until_metric(addrs: &[SocketAddr], name: &str, want: f64) {
    let mut last = 0.0;
    let seen = eventually_within(WAIT, async || {
        last = 0.0;
        for a in addrs {
            last += metric(*a, name).await;
        }
        (last == want).then_some(())
    })
    .await;
    assert!(seen.is_some(), "{name} is {last}, not {want}");
}

/// How often [`eventually`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` until it answers `Some`, within [`WAIT`]; panics naming `what` otherwise.
/// For what the server does on its own and tells nobody (a metric, a stored row, a socket
/// given back): the only place the tests sleep to wait for something.
pub async fn eventually<T>(what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    match eventually_within(WAIT, probe).await {
        Some(v) => v,
        None => panic!("not within {WAIT:?}: {what}"),
    }
}

/// [`eventually`] with another deadline, returning `None` when it passes.
pub async fn eventually_within<T>(
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a blocking `probe` on a thread of its own (a process starting to
/// listen, before any runtime is involved).
pub fn eventually_blocking<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {WAIT:?}: {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// `docker compose` (the plugin) where it exists, else `docker-compose`.
pub fn compose(args: &[&str]) -> std::process::Output {
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
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("docker compose or docker-compose is installed (scripts/deps.sh)")
}

/// `docker compose config` as JSON: the plugin's `--format json`, else Debian's
/// docker-compose (YAML) through its own PyYAML.
pub fn compose_json() -> serde_json::Value {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let text = if plugin {
        let out = compose(&["config", "--format", "json"]);
        String::from_utf8(out.stdout).unwrap()
    } else {
        let yaml = compose(&["config"]).stdout;
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (docker-compose's own)");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(&yaml).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    serde_json::from_str(&text).expect("compose config as JSON")
}
