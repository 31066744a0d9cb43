//! The repository's nginx configuration, run by a real nginx in front of two cluster nodes:
//! the plugin's handshake, compression, pushes and sessionstate through the proxy, and the
//! reliable protocol's clients kept on one node.
//!
//! The configuration is the one in `nginx/`, adapted only where a test must: the upstream
//! servers become the test's nodes, `listen 80` a free local port, and the paths that need
//! root (pid, temp files) go to a temporary directory.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::cluster::*;
use common::*;
use supersynk_client::HunterClient;

struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (a SIGKILLed master would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is installed (scripts/deps.sh installs it)")
}

/// The repository's supersynk.conf with the test's nodes and port: `server supersynk-K:5001`
/// of every upstream becomes the test's K-th node, with the same parameters.
fn adapted_site(nodes: &[SocketAddr], port: u16) -> String {
    let site =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/supersynk.conf"))
            .expect("nginx/supersynk.conf");
    let mut out = String::new();
    let mut servers = 0;
    for line in site.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("server supersynk-") {
            let (k, params) = rest.split_once(':').expect("server supersynk-K:port");
            let k: usize = k.parse().expect("a node number");
            let params = params.split_once(' ').map_or("", |(_, p)| p);
            out.push_str(&format!("    server {} {params}\n", nodes[k - 1]));
            servers += 1;
        } else if t == "listen 80;" {
            out.push_str(&format!("    listen 127.0.0.1:{port};\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        servers >= nodes.len(),
        "supersynk.conf lists its upstream nodes"
    );
    out
}

fn start_nginx(nodes: &[SocketAddr]) -> Nginx {
    let dir = std::env::temp_dir().join(format!("supersynk-nginx-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(dir.join("supersynk.conf"), adapted_site(nodes, port)).unwrap();
    // The repository's nginx.conf, with the pid file and temp paths in the test's directory
    let main = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx/nginx.conf"))
        .expect("nginx/nginx.conf");
    let d = dir.display();
    // (and without raising the fd limit, which needs privileges this machine may not give).
    let main = main
        .replace("pid /tmp/nginx.pid;", &format!("pid {d}/nginx.pid;"))
        .replace("worker_rlimit_nofile 40000;", "")
        .replace(
            "include supersynk.conf;",
            &format!(
                "client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n    \
                 fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n    \
                 include {d}/supersynk.conf;"
            ),
        );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let conf = dir.join("nginx.conf");
    let check = Command::new(nginx_binary())
        .args(["-t", "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let child = Command::new(nginx_binary())
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    eventually_blocking("nginx listens", || std::net::TcpStream::connect(addr).ok());
    Nginx { child, dir, addr }
}

#[tokio::test]
async fn the_plugin_through_nginx_to_two_nodes() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let admin = ["--admin-token", "t0ken"];
    let (_a_proc, a) = node(&redis, &prefix, &admin).await;
    let (_b_proc, b) = node(&redis, &prefix, &admin).await;
    let nginx = start_nginx(&[a, b]);

    // What the plugin asks first, through the proxy; what the public must not see.
    assert_eq!(http(nginx.addr, "GET", "/version", "").await.2, "0.1");
    assert_eq!(http(nginx.addr, "GET", "/metrics", "").await.0, 404);
    // The admin API and its login stay on the nodes; the public status page passes.
    let login = r#"{"token":"t0ken"}"#;
    assert_eq!(http(a, "POST", "/admin/login", login).await.0, 200);
    assert_eq!(http(nginx.addr, "POST", "/admin/login", login).await.0, 404);
    assert_eq!(http(nginx.addr, "GET", "/admin/sessions", "").await.0, 404);
    assert_eq!(http(nginx.addr, "GET", "/readyz", "").await.0, 404);
    assert_eq!(http(a, "GET", "/readyz", "").await.0, 200);
    // The status page links nothing the proxy does not serve.
    let (status, _, page) = http(nginx.addr, "GET", "/", "").await;
    assert_eq!(status, 200);
    // Links shown to the public: the dashboard's own (hidden until an operator logs in on
    // a node, which the proxy does not allow) and inline data aside.
    for tag in page.split('<').filter(|t| !t.contains(" hidden")) {
        let Some(link) = tag[..tag.find('>').unwrap_or(tag.len())]
            .split("href=")
            .nth(1)
        else {
            continue;
        };
        let target = link.trim_start_matches(['"', '\'']);
        let target = &target[..target.find(['"', '\'', ' ', '>']).unwrap_or(target.len())];
        if target.starts_with("data:") {
            continue;
        }
        let (status, _, _) = http(nginx.addr, "GET", target, "").await;
        assert_ne!(
            status, 404,
            "the status page links {target}, which nginx does not serve"
        );
    }

    // The plugin's exact handshake (permessage-deflate offered), through nginx.
    let session = "nginx@Session:Hunter";
    let mut leader = HunterClient::connect(nginx.addr, "/connect", true)
        .await
        .expect("upgrade through nginx");
    join(&mut leader, "L", session, true).await;
    assert_eq!(state(&mut leader).await, (1, true));
    let mut follower = HunterClient::connect(nginx.addr, "/connect", true)
        .await
        .expect("upgrade through nginx");
    join(&mut follower, "F", session, false).await;
    assert_eq!(state(&mut follower).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));

    // least_conn put the two sockets on different nodes: this session spans the cluster.
    assert_eq!(metric(a, "supersynk_connections_open").await, 1.0);
    assert_eq!(metric(b, "supersynk_connections_open").await, 1.0);

    // Pushes arrive unchanged and compressed.
    let before = follower.inflated_messages();
    for n in 0..10 {
        leader.send_text(&push(session, n)).await.unwrap();
    }
    for n in 0..10 {
        assert_eq!(recv_text(&mut follower).await, push(session, n));
    }
    assert_eq!(
        follower.inflated_messages() - before,
        10,
        "pushes came compressed"
    );

    // The leader goes; the follower is told through the proxy.
    drop(leader);
    assert_eq!(state(&mut follower).await, (1, false));
}

#[tokio::test]
async fn a_follower_whose_node_dies_reconnects_through_nginx_to_the_other() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let fast = ["--node-timeout-ms", "1500"];
    let (a_proc, a) = node(&redis, &prefix, &fast).await;
    let (b_proc, b) = node(&redis, &prefix, &fast).await;
    let nginx = start_nginx(&[a, b]);
    let session = "failover@Session:Hunter";
    let mut leader = HunterClient::connect(nginx.addr, "/connect", true)
        .await
        .unwrap();
    join(&mut leader, "L", session, true).await;
    assert_eq!(state(&mut leader).await, (1, true));
    // The follower lands on the other node (least_conn); that node dies.
    let leader_on_a = metric(a, "supersynk_connections_open").await == 1.0;
    let mut follower = HunterClient::connect(nginx.addr, "/connect", true)
        .await
        .unwrap();
    join(&mut follower, "F", session, false).await;
    assert_eq!(state(&mut follower).await, (2, true));
    assert_eq!(state(&mut leader).await, (2, true));
    let (mut doomed, _survivor) = if leader_on_a {
        (b_proc, a_proc)
    } else {
        (a_proc, b_proc)
    };
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();

    // The plugin notices the broken socket and reconnects through the same address: nginx
    // skips the dead node.
    let gone = tokio::time::timeout(WAIT, follower.next_text())
        .await
        .unwrap();
    assert!(!matches!(gone, Some(Ok(_))), "the socket broke: {gone:?}");
    let mut follower = HunterClient::connect(nginx.addr, "/connect", true)
        .await
        .expect("nginx sends the reconnect to the live node");
    join(&mut follower, "F", session, false).await;
    // Until the dead node is removed its member may still be counted; then 2 everywhere.
    until_state(&mut follower, (2, true)).await;
    until_state(&mut leader, (2, true)).await;
    leader.send_text(&push(session, 1)).await.unwrap();
    assert_eq!(next_push(&mut follower).await, push(session, 1));
}

/// A bare client of the reliable protocol: JSON frames on `/v1/reliable` through nginx.
struct Reliable(Ws);

impl Reliable {
    async fn hello(addr: SocketAddr) -> (Reliable, serde_json::Value) {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/reliable"))
            .await
            .expect("upgrade through nginx");
        let mut c = Reliable(ws);
        c.send(serde_json::json!({ "t": "hello" })).await;
        let welcome = c.next_of("welcome").await;
        (c, welcome)
    }

    async fn send(&mut self, v: serde_json::Value) {
        use futures::SinkExt;
        self.0
            .send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
            .await
            .expect("sent");
    }

    /// The next frame of type `t` (acks, heartbeats and others in between are skipped).
    async fn next_of(&mut self, t: &str) -> serde_json::Value {
        use futures::StreamExt;
        loop {
            let m = tokio::time::timeout(WAIT, self.0.next())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("no error");
            if let tokio_tungstenite::tungstenite::Message::Text(text) = m {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if v["t"] == t {
                    return v;
                }
            }
        }
    }

    /// The next room message with `data`, acknowledged.
    async fn next_data(&mut self) -> serde_json::Value {
        loop {
            let m = self.next_of("msg").await;
            self.send(serde_json::json!({ "t": "ack", "seq": m["seq"] }))
                .await;
            if !m["data"].is_null() {
                return m["data"].clone();
            }
        }
    }
}

#[tokio::test]
async fn reliable_clients_through_nginx_share_one_node_and_its_rooms() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let (a_proc, a) = node(&redis, &prefix, &[]).await;
    let (_b_proc, b) = node(&redis, &prefix, &[]).await;
    let nginx = start_nginx(&[a, b]);

    // However many there are, they all reach the first node, so a room has every member.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (mut c, _) = Reliable::hello(nginx.addr).await;
        c.send(serde_json::json!({ "t": "msg", "seq": 1, "op": "join", "room": "r" }))
            .await;
        clients.push(c);
    }
    assert_eq!(metric(a, "supersynk_connections_open").await, 4.0);
    assert_eq!(metric(b, "supersynk_connections_open").await, 0.0);
    clients[0]
        .send(serde_json::json!({ "t": "msg", "seq": 2, "op": "publish", "room": "r", "data": "to all" }))
        .await;
    for c in &mut clients[1..] {
        assert_eq!(c.next_data().await, "to all");
    }

    // When that node dies, clients start over on the other one: told, never silently.
    drop(a_proc);
    drop(clients);
    let (_c, welcome) = Reliable::hello(nginx.addr).await;
    assert_eq!(welcome["resumed"], false);
    assert_eq!(metric(b, "supersynk_connections_open").await, 1.0);
}
