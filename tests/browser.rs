//! Pages of the server in headless Chromium (scripts in tests/browser/): the status page
//! and admin dashboard at `/` with real plugin clients in real sessions, and the log
//! viewer's login, rows and phone layout. Screenshots go to target/screenshots/.

mod common;

use std::time::Duration;

use common::*;
use supersynk::config::Settings;
use supersynk_client::HunterClient;
use tokio::sync::oneshot;

#[tokio::test]
async fn status_page_renders_in_chromium() {
    common::browser::run("status.mjs").await;
}

/// What one plugin client saw until its socket closed: the servermsg texts and the close
/// code. It reads all the while, as the plugin does.
fn watch_client(mut c: HunterClient) -> oneshot::Receiver<(Vec<String>, Option<u16>)> {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut texts = Vec::new();
        let code = loop {
            match c.ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if v["type"] == "servermsg" {
                        texts.push(v["text"].as_str().unwrap_or_default().to_string());
                    }
                }
                Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            }
        };
        // The test may have stopped listening.
        let _ = tx.send((texts, code));
    });
    rx
}

#[tokio::test]
async fn admin_dashboard_in_chromium_with_real_sessions() {
    const TOKEN: &str = "dashboard-t0ken";
    const PARTY: &str = "c3@uTKeQR3Mp:Host";
    const SOLO: &str = "c9@Zz81solo:Solo";
    let server = start(Settings {
        admin_token: Some(TOKEN.into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;

    // A party of three (the plugin's SetName and SetSession), a session of one, and a
    // client connected but in no session.
    let mut host = plugin(addr).await;
    join(&mut host, "Host", PARTY, true).await;
    assert_eq!(state(&mut host).await, (1, true));
    let mut members = Vec::new();
    for name in ["Guest", "Kicked"] {
        let mut c = plugin(addr).await;
        join(&mut c, name, PARTY, false).await;
        state(&mut c).await;
        state(&mut host).await;
        members.push(c);
    }
    let mut solo = plugin(addr).await;
    join(&mut solo, "Solo", SOLO, true).await;
    assert_eq!(state(&mut solo).await, (1, true));
    // The guest saw the third member join.
    assert_eq!(state(&mut members[0]).await, (3, true));
    let mut loner = plugin(addr).await;
    loner
        .send_text(r#"{"type":"SetName","name":"Loner"}"#)
        .await
        .unwrap();
    // A follower that pushes is refused (a refusal the dashboard lists by kind).
    members[0].send_text(&push(PARTY, 0)).await.unwrap();
    assert!(
        servermsg(&mut members[0])
            .await
            .contains("only the session leader")
    );

    // The host pushes ten times a second while the page watches.
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let pushing = tokio::spawn(async move {
        let mut n = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                _ = tick.tick() => {
                    if host.send_text(&push(PARTY, n % 7)).await.is_err() {
                        break;
                    }
                    n += 1;
                }
            }
        }
        host
    });
    let kicked = members.pop().unwrap();
    let guest = members.pop().unwrap();
    let (guest_saw, kicked_saw, loner_saw, solo_saw) = (
        watch_client(guest),
        watch_client(kicked),
        watch_client(loner),
        watch_client(solo),
    );

    let party_message = "Restart at 20:00, from the dashboard";
    let everyone_message = "Maintenance in 5 minutes";
    let expect = serde_json::json!({
        "connections": 5, "sessions": 2, "members": 4, "party": PARTY, "solo": SOLO,
        "partyMessage": party_message, "everyoneMessage": everyone_message,
    })
    .to_string();
    let url = format!("http://{addr}");
    common::browser::run_with(
        "dashboard.mjs",
        &[
            ("SUPERSYNK_URL", &url),
            ("ADMIN_TOKEN", TOKEN),
            ("EXPECT", &expect),
        ],
    )
    .await;

    // What the players saw: the party's members the party's message, everyone the
    // broadcast, and the kicked member a close 4003 after both.
    let (texts, code) = tokio::time::timeout(WAIT, kicked_saw)
        .await
        .expect("the kicked member's socket closed")
        .unwrap();
    assert_eq!(code, Some(4003));
    assert_eq!(texts, [party_message, everyone_message]);
    let _ = stop_tx.send(());
    let mut host = pushing.await.unwrap();
    // The host's queue holds the sessionstate of the kick among the servermsgs: read up to
    // both messages.
    let mut host_saw = Vec::new();
    while host_saw.len() < 2 {
        let v = recv(&mut host).await;
        if v["type"] == "servermsg" {
            host_saw.push(v["text"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(host_saw, [party_message, everyone_message]);
    server.shutdown().await;
    for (who, saw) in [
        ("guest", guest_saw),
        ("loner", loner_saw),
        ("solo", solo_saw),
    ] {
        let (texts, _) = tokio::time::timeout(WAIT, saw).await.unwrap().unwrap();
        let want: &[&str] = if who == "guest" {
            &[party_message, everyone_message]
        } else {
            &[everyone_message]
        };
        let got: Vec<&str> = texts
            .iter()
            .map(String::as_str)
            .filter(|t| *t != supersynk::hunterpie::SHUTDOWN_TEXT)
            .collect();
        assert_eq!(got, want, "{who}");
    }
}

#[tokio::test]
async fn log_viewer_in_chromium_logs_in_opens_rows_and_fits_a_phone() {
    common::browser::run("viewer.mjs").await;
}

/// The dashboard of a cluster: two nodes on one Redis, a session split across them
/// (tests/browser/dashboard_nodes.mjs checks the table of nodes, the summed cards, the
/// members' nodes, and a stopped node named as not answering).
#[tokio::test]
async fn admin_dashboard_in_chromium_shows_every_node_of_a_cluster() {
    use common::cluster::{follower, node, redis_url, unique_prefix};
    const TOKEN: &str = "cluster-dashboard-t0ken";
    const PARTY: &str = "c3@uTKeQR3Mp:Split";
    let (redis, prefix) = (redis_url(), unique_prefix());
    let admin = ["--admin-token", TOKEN];
    let (_a_proc, a) = node(&redis, &prefix, &admin).await;
    let (b_proc, b) = node(&redis, &prefix, &admin).await;
    let mut host = plugin(a).await;
    join(&mut host, "Host", PARTY, true).await;
    assert_eq!(state(&mut host).await, (1, true));
    let mut guests = Vec::new();
    for (n, name) in [(2, "Far"), (3, "Farther")] {
        let mut c = follower(b, name, PARTY).await;
        assert_eq!(state(&mut c).await, (n, true));
        guests.push(c);
    }
    let names: Vec<String> = {
        let auth = [("Authorization", "Bearer cluster-dashboard-t0ken")];
        let (_, _, body) = http_with(a, "GET", "/admin/stats", &auth, "").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names.len(), 2, "{names:?}");
    let expect = serde_json::json!({
        "nodes": [
            { "name": names[0], "connections": 1 },
            { "name": names[1], "connections": 2 },
        ],
        "session": PARTY,
        "members": [["Host", names[0]], ["Far", names[1]], ["Farther", names[1]]],
        "stopPid": b_proc.0.id(),
    })
    .to_string();
    let url = format!("http://{a}");
    common::browser::run_with(
        "dashboard_nodes.mjs",
        &[
            ("SUPERSYNK_URL", &url),
            ("ADMIN_TOKEN", TOKEN),
            ("EXPECT", &expect),
        ],
    )
    .await;
    drop(host);
}
