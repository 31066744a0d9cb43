//! The admin API of a cluster (protocol/hunterpie.md, "Admin API"): two real nodes on one
//! real Redis, each answering for both: stats per node and summed, the sessions of both
//! with each member's node, messages and kicks that reach the other node, and a node that
//! does not answer in time named as missing.

mod common;

use std::net::SocketAddr;

use common::cluster::*;
use common::*;
use serde_json::Value;

const TOKEN: &str = "cluster-adm1n";
const AUTH: (&str, &str) = ("Authorization", "Bearer cluster-adm1n");

async fn get(addr: SocketAddr, path: &str) -> Value {
    let (status, _, body) = http_with(addr, "GET", path, &[AUTH], "").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    let headers = [AUTH, ("Content-Type", "application/json")];
    let (status, _, body) = http_with(addr, "POST", path, &headers, body).await;
    (status, serde_json::from_str(&body).unwrap())
}

fn names(stats: &Value) -> Vec<String> {
    stats["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_admin_api_of_either_node_lists_and_acts_on_both() {
    let (redis, prefix) = (redis_url(), unique_prefix());
    let admin = ["--admin-token", TOKEN];
    let (_a_proc, a) = node(&redis, &prefix, &admin).await;
    let (b_proc, b) = node(&redis, &prefix, &admin).await;
    let party = "c3@uTKeQR3Mp:Party";
    let mut host = plugin(a).await;
    join(&mut host, "Host", party, true).await;
    assert_eq!(state(&mut host).await, (1, true));
    let mut far = follower(b, "Far", party).await;
    assert_eq!(state(&mut far).await, (2, true));
    assert_eq!(state(&mut host).await, (2, true));
    let mut solo = plugin(b).await;
    join(&mut solo, "Solo", "solo:Solo", true).await;
    assert_eq!(state(&mut solo).await, (1, true));
    host.send_text(&push(party, 1)).await.unwrap();
    assert_eq!(next_push(&mut far).await, push(party, 1));

    // Stats: this node's row first, the other's, and the sums; each node names itself.
    let stats = get(a, "/admin/stats").await;
    let (name_a, name_b) = (format!(":{}", a.port()), format!(":{}", b.port()));
    let found = names(&stats);
    assert_eq!(found.len(), 2, "{stats}");
    assert!(
        found[0].ends_with(&name_a) && found[1].ends_with(&name_b),
        "{found:?}"
    );
    let (name_a, name_b) = (found[0].clone(), found[1].clone());
    assert_eq!(stats["nodes"][0]["local"], true);
    assert_eq!(stats["nodes"][1]["local"], false);
    assert_eq!(
        (
            &stats["nodes"][0]["connections"],
            &stats["nodes"][1]["connections"]
        ),
        (&1.into(), &2.into())
    );
    let all = &stats["cluster"];
    assert_eq!(
        (
            &all["nodes"],
            &all["connections"],
            &all["members"],
            &all["sessions"]
        ),
        (&2.into(), &3.into(), &3.into(), &3.into()),
        "{all}"
    );
    assert_eq!(all["totals"]["pushes"], 1);
    assert_eq!(
        (&stats["missing"], &stats["complete"]),
        (&Value::Array(vec![]), &true.into())
    );
    // Node B sees the same nodes, itself first.
    assert_eq!(
        names(&get(b, "/admin/stats").await),
        [name_b.clone(), name_a.clone()]
    );

    // Sessions: both nodes' sessions, the party's members from both, each with its node.
    let v = get(b, "/admin/sessions").await;
    assert_eq!(v["total"], 2, "{v}");
    let s = &v["sessions"][0];
    assert_eq!(s["id"], party);
    let mut members: Vec<(String, String, bool)> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["node"].as_str().unwrap().to_string(),
                m["leader"].as_bool().unwrap(),
            )
        })
        .collect();
    members.sort();
    assert_eq!(
        members,
        [
            ("Far".to_string(), name_b.clone(), false),
            ("Host".to_string(), name_a.clone(), true)
        ]
    );
    assert_eq!(v["sessions"][1]["id"], "solo:Solo");
    let limited = get(a, "/admin/sessions?limit=1&search=o").await;
    assert_eq!(
        (
            &limited["total"],
            limited["sessions"].as_array().unwrap().len()
        ),
        (&2.into(), 1)
    );
    assert_eq!(
        limited["sessions"][0]["members"].as_array().unwrap().len(),
        2
    );

    // A message from node A to a session that only has members on node B.
    let (status, v) = post(
        a,
        "/admin/message",
        r#"{"text":"hello solo","session":"solo:Solo"}"#,
    )
    .await;
    assert_eq!((status, &v["delivered"]), (200, &1.into()), "{v}");
    assert_eq!(servermsg(&mut solo).await, "hello solo");
    // To everyone: every client of both nodes.
    let (status, v) = post(a, "/admin/message", r#"{"text":"to all","level":"info"}"#).await;
    assert_eq!((status, &v["delivered"]), (200, &3.into()), "{v}");
    for c in [&mut host, &mut far, &mut solo] {
        assert_eq!(servermsg(c).await, "to all");
    }
    let (status, _) = post(a, "/admin/message", r#"{"text":"x","session":"nowhere"}"#).await;
    assert_eq!(status, 404);

    // A kick from node A of a member on node B; the host sees it go.
    let far_conn = get(a, "/admin/sessions?search=far").await["sessions"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "Far")
        .unwrap()["conn"]
        .clone();
    let kick = |conn: &Value, node: &str| format!(r#"{{"conn":{conn},"node":"{node}"}}"#);
    let (status, v) = post(a, "/admin/kick", &kick(&far_conn, &name_b)).await;
    assert_eq!((status, &v["kicked"]), (200, &far_conn), "{v}");
    assert_eq!(close_code(&mut far).await, Some(4003));
    until_state(&mut host, (1, true)).await;
    let (status, _) = post(a, "/admin/kick", &kick(&far_conn, &name_b)).await;
    assert_eq!(status, 404);
    let (status, _) = post(a, "/admin/kick", &kick(&far_conn, "nobody:1")).await;
    assert_eq!(status, 404);

    // A node that does not answer (stopped, its key not yet expired) is named as missing,
    // and the answer still comes, after the answer time.
    let pid = b_proc.0.id().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let stats = get(a, "/admin/stats").await;
    let sessions = get(a, "/admin/sessions").await;
    signal("-CONT");
    assert_eq!(names(&stats), std::slice::from_ref(&name_a));
    assert_eq!(stats["missing"], serde_json::json!([name_b]));
    assert_eq!(stats["cluster"]["nodes"], 1);
    assert_eq!(
        (&sessions["total"], &sessions["missing"]),
        (&1.into(), &serde_json::json!([name_b]))
    );
    // Back: both again.
    assert_eq!(names(&get(a, "/admin/stats").await).len(), 2);
}
