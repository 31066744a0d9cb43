//! The admin API's dashboard side and the browser logins (protocol/hunterpie.md, "Admin
//! API"; protocol/logs.md), over real HTTP with real plugin clients: `/admin/stats` and the
//! fields of `/admin/sessions`, logging in with the token for a cookie, what the cookie may
//! do without and with its CSRF token, logout, the log viewer's login and its socket.

mod common;

use common::*;
use serde_json::Value;
use supersynk::config::Settings;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "adm1n-t0ken";

async fn admin() -> supersynk::Server {
    start(Settings {
        admin_token: Some(TOKEN.into()),
        ..Settings::default()
    })
    .await
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The `name=value` of the response's Set-Cookie, and the whole header line.
fn set_cookie(head: &str) -> (String, String) {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("a Set-Cookie in {head}"))
        .to_string();
    let pair = line["set-cookie:".len()..]
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (pair, line)
}

/// Logs in on `/admin/login` (or `/logs/login`); returns the cookie pair and the CSRF token.
async fn login(addr: std::net::SocketAddr, path: &str, token: &str) -> (String, String) {
    let (status, head, body) = http_with(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        &format!(r#"{{"token":"{token}"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: no-store")
    );
    let (cookie, _) = set_cookie(&head);
    (cookie, json(&body)["csrf"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn stats_and_sessions_report_the_real_members_with_their_node() {
    let server = admin().await;
    let addr = server.local_addr;
    let auth = [("Authorization", "Bearer adm1n-t0ken")];
    let (mut leader, mut follower) = pair(addr, "c3@uTKeQR3Mp:L").await;
    let mut other = plugin(addr).await;
    join(&mut other, "Other", "elsewhere:Other", true).await;
    state(&mut other).await;
    for n in 0..3 {
        leader.send_text(&push("c3@uTKeQR3Mp:L", n)).await.unwrap();
        recv(&mut follower).await;
    }
    follower
        .send_text(&push("c3@uTKeQR3Mp:L", 9))
        .await
        .unwrap();
    servermsg(&mut follower).await;

    let (status, _, stats_body) = http_with(addr, "GET", "/admin/stats", &auth, "").await;
    assert_eq!(status, 200, "{stats_body}");
    let v = json(&stats_body);
    assert!(v["time"].as_i64().unwrap() > 1_600_000_000_000);
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(node["local"], true);
    let name = node["node"].as_str().unwrap().to_string();
    assert!(!name.is_empty());
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (&node["connections"], &node["sessions"], &node["members"]),
        (&3.into(), &2.into(), &3.into())
    );
    assert_eq!(node["totals"]["pushes"], 3);
    assert_eq!(node["totals"]["connections"], 3);
    assert!(node["totals"]["relayedBytes"].as_u64().unwrap() > 300);
    assert_eq!(node["refusals"]["push_refused"], 1);

    let (status, _, body) = http_with(addr, "GET", "/admin/sessions", &auth, "").await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(v["total"], 2);
    let s = &v["sessions"][0];
    assert_eq!(s["id"], "c3@uTKeQR3Mp:L");
    let m = &s["members"][0];
    assert_eq!(
        (&m["name"], &m["leader"], &m["addr"]),
        (&"L".into(), &true.into(), &"127.0.0.1".into())
    );
    assert_eq!(m["node"], name.as_str());
    let since = m["since"].as_i64().unwrap();
    assert!(since <= now_ms() && since > now_ms() - 60_000, "{since}");

    // The examples of protocol/hunterpie.md have the answers' fields, all of them.
    assert_same_keys(&doc_example(r#"{"time":"#), &json(&stats_body), "stats");
    assert_same_keys(&doc_example(r#"{"total":"#), &v, "sessions");

    // Search (session id, member name or address, any case) and limit.
    let (_, _, body) = http_with(addr, "GET", "/admin/sessions?search=OTHER", &auth, "").await;
    let v = json(&body);
    assert_eq!(
        (v["total"].clone(), v["sessions"][0]["id"].clone()),
        (1.into(), "elsewhere:Other".into())
    );
    let (_, _, body) = http_with(addr, "GET", "/admin/sessions?limit=1", &auth, "").await;
    let v = json(&body);
    assert_eq!(
        (v["total"].clone(), v["sessions"].as_array().unwrap().len()),
        (2.into(), 1)
    );
    for bad in ["?limit=0", "?limit=x", "?nope=1"] {
        let (status, _, body) =
            http_with(addr, "GET", &format!("/admin/sessions{bad}"), &auth, "").await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(json(&body)["error"].is_string());
    }
    // A kick names the node; another node's connection is not found here.
    let conn = s["members"][1]["conn"].as_u64().unwrap();
    let auth_json = [auth[0], ("Content-Type", "application/json")];
    let (status, _, _) = http_with(
        addr,
        "POST",
        "/admin/kick",
        &auth_json,
        &format!(r#"{{"conn":{conn},"node":"another-node"}}"#),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _) = http_with(
        addr,
        "POST",
        "/admin/kick",
        &auth_json,
        &format!(r#"{{"conn":{conn},"node":"{name}"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(close_code(&mut follower).await, Some(4003));
    server.shutdown().await;
}

/// The inline JSON example of protocol/hunterpie.md that starts with `start`.
fn doc_example(start: &str) -> Value {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/protocol/hunterpie.md"
    ))
    .unwrap();
    let at = doc
        .find(&format!("`{start}"))
        .unwrap_or_else(|| panic!("an example {start}"));
    let rest = &doc[at + 1..];
    json(&rest[..rest.find('`').unwrap()])
}

/// Objects with the same keys at every level (the first element of arrays; `refusals` is a
/// map of kinds, whatever they are).
fn assert_same_keys(doc: &Value, real: &Value, at: &str) {
    match (doc, real) {
        (Value::Object(d), Value::Object(r)) if !at.ends_with("refusals") => {
            let (mut dk, mut rk): (Vec<_>, Vec<_>) = (d.keys().collect(), r.keys().collect());
            dk.sort();
            rk.sort();
            assert_eq!(dk, rk, "{at}");
            for (k, dv) in d {
                assert_same_keys(dv, &r[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(d), Value::Array(r)) => {
            if let (Some(d), Some(r)) = (d.first(), r.first()) {
                assert_same_keys(d, r, &format!("{at}[0]"));
            }
        }
        _ => assert_eq!(
            std::mem::discriminant(doc),
            std::mem::discriminant(real),
            "{at}: {doc} and {real}"
        ),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_dashboard_login_is_a_cookie_whose_actions_need_its_csrf_token() {
    let server = admin().await;
    let addr = server.local_addr;
    let mut member = plugin(addr).await;
    join(&mut member, "M", "party", true).await;
    state(&mut member).await;

    // Not logged in; a wrong token; a body that is not the login's.
    assert_eq!(http(addr, "GET", "/admin/login", "").await.0, 401);
    let (status, head, body) = http(addr, "POST", "/admin/login", r#"{"token":"wrong"}"#).await;
    assert_eq!(
        (status, json(&body)["error"].as_str()),
        (401, Some("wrong token"))
    );
    assert!(!head.to_ascii_lowercase().contains("set-cookie"));
    assert_eq!(http(addr, "POST", "/admin/login", "token=x").await.0, 400);
    assert_eq!(
        metric(addr, "supersynk_errors_total{kind=\"admin_login_refused\"}").await,
        1.0
    );

    // The right token: an HttpOnly, SameSite=Strict cookie for /admin, not Secure over
    // plain HTTP; behind a TLS proxy, Secure.
    let (status, head, body) = http(
        addr,
        "POST",
        "/admin/login",
        &format!(r#"{{"token":"{TOKEN}"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    let (cookie, line) = set_cookie(&head);
    assert!(
        cookie.starts_with("supersynk_admin=") && !cookie.contains(TOKEN),
        "{line}"
    );
    for attr in [
        "Path=/admin",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=43200",
    ] {
        assert!(line.contains(attr), "{line}");
    }
    assert!(!line.contains("Secure"), "{line}");
    let csrf = json(&body)["csrf"].as_str().unwrap().to_string();
    let (_, head, _) = http_with(
        addr,
        "POST",
        "/admin/login",
        &[("X-Forwarded-Proto", "https")],
        &format!(r#"{{"token":"{TOKEN}"}}"#),
    )
    .await;
    assert!(set_cookie(&head).1.ends_with("; Secure"), "{head}");

    // The cookie reads; it tells its CSRF token again.
    let with_cookie = [("Cookie", cookie.as_str())];
    let (status, _, body) = http_with(addr, "GET", "/admin/login", &with_cookie, "").await;
    assert_eq!(
        (status, json(&body)["csrf"].as_str()),
        (200, Some(csrf.as_str()))
    );
    assert_eq!(
        http_with(addr, "GET", "/admin/sessions", &with_cookie, "")
            .await
            .0,
        200
    );
    assert_eq!(
        http_with(addr, "GET", "/admin/stats", &with_cookie, "")
            .await
            .0,
        200
    );
    // It does not act without its CSRF token, nor with another.
    let message = r#"{"text":"from the dashboard","session":"party"}"#;
    for csrf_header in [None, Some("forged")] {
        let mut h = vec![
            ("Cookie", cookie.as_str()),
            ("Content-Type", "application/json"),
        ];
        h.extend(csrf_header.map(|c| ("X-CSRF-Token", c)));
        let (status, _, body) = http_with(addr, "POST", "/admin/message", &h, message).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("X-CSRF-Token"), "{body}");
    }
    // With it, it does.
    let acting = [
        ("Cookie", cookie.as_str()),
        ("X-CSRF-Token", csrf.as_str()),
        ("Content-Type", "application/json"),
    ];
    let (status, _, body) = http_with(addr, "POST", "/admin/message", &acting, message).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"complete":true,"delivered":1,"missing":[]}"#)
    );
    assert_eq!(servermsg(&mut member).await, "from the dashboard");
    // The bearer token still works alone (scripts have no CSRF token).
    let bearer = [("Authorization", "Bearer adm1n-t0ken")];
    let (status, _, _) = http_with(addr, "POST", "/admin/message", &bearer, message).await;
    assert_eq!(status, 200);
    servermsg(&mut member).await;
    // A cookie that is not a login's is nobody.
    let made_up = [("Cookie", "supersynk_admin=AAAA")];
    assert_eq!(
        http_with(addr, "GET", "/admin/sessions", &made_up, "")
            .await
            .0,
        401
    );

    // Logout needs the CSRF token too, ends the login, and clears the cookie.
    assert_eq!(
        http_with(addr, "POST", "/admin/logout", &with_cookie, "")
            .await
            .0,
        403
    );
    let (status, head, _) = http_with(addr, "POST", "/admin/logout", &acting, "").await;
    assert_eq!(status, 200);
    assert!(set_cookie(&head).1.contains("Max-Age=0"), "{head}");
    assert_eq!(
        http_with(addr, "GET", "/admin/sessions", &with_cookie, "")
            .await
            .0,
        401
    );
    assert_eq!(
        http_with(addr, "GET", "/admin/login", &with_cookie, "")
            .await
            .0,
        401
    );

    // A login's body is read within the body limits like every other.
    let big = format!(r#"{{"token":"{}"}}"#, "x".repeat(2 << 20));
    assert_eq!(http(addr, "POST", "/admin/login", &big).await.0, 413);
    server.shutdown().await;
}

#[tokio::test]
async fn without_the_admin_token_there_is_no_login_and_slash_is_the_public_status() {
    let server = start_default().await;
    let addr = server.local_addr;
    for (method, path) in [
        ("GET", "/admin/login"),
        ("POST", "/admin/login"),
        ("GET", "/admin/stats"),
    ] {
        assert_eq!(
            http(addr, method, path, r#"{"token":""}"#).await.0,
            404,
            "{path}"
        );
    }
    let (status, head, body) = http(addr, "GET", "/", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy")
    );
    assert!(body.contains(r#"data-admin="off""#), "{body}");
    assert!(body.contains("The admin dashboard is off"));
    let on = admin().await;
    let (_, _, body) = http(on.local_addr, "GET", "/", "").await;
    assert!(body.contains(r#"data-admin="on""#));
    // The page holds no session, member or token: those come from the API after login.
    assert!(!body.contains(TOKEN));
    server.shutdown().await;
    on.shutdown().await;
}

#[tokio::test]
async fn the_log_viewer_logs_in_with_a_cookie_that_opens_query_and_the_socket() {
    let server = start(Settings {
        logs_token: Some("l0gs".into()),
        ..Settings::default()
    })
    .await;
    let addr = server.local_addr;
    // The page itself is served (it asks for the token); the API is closed.
    let (status, _, body) = http(addr, "GET", "/logs.html", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("login-form"));
    assert_eq!(http(addr, "GET", "/logs/query", "").await.0, 401);
    assert_eq!(http(addr, "GET", "/logs/login", "").await.0, 401);
    assert_eq!(
        http(addr, "POST", "/logs/login", r#"{"token":"nope"}"#)
            .await
            .0,
        401
    );
    let (cookie, csrf) = login(addr, "/logs/login", "l0gs").await;
    assert!(cookie.starts_with("supersynk_logs="));
    let with_cookie = [("Cookie", cookie.as_str())];
    assert_eq!(
        http_with(addr, "GET", "/logs/query", &with_cookie, "")
            .await
            .0,
        200
    );
    assert_eq!(
        http_with(addr, "GET", "/logs/login", &with_cookie, "")
            .await
            .0,
        200
    );

    // The socket with the cookie, from this server's own page.
    let ws_request = |origin: &str| {
        let mut req = format!("ws://{addr}/logs/listen")
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Cookie", cookie.parse().unwrap());
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_request(&format!("http://{addr}")))
        .await
        .expect("the viewer's socket opens with its cookie");
    until_metric(&[addr], "supersynk_logs_listeners", 1.0).await;
    http(
        addr,
        "POST",
        "/logs/add",
        r#"{"msg":"over the cookie","user":"u"}"#,
    )
    .await;
    let got = loop {
        let v = next_json(&mut ws).await;
        if let Some(e) = v
            .as_array()
            .and_then(|a| a.iter().find(|e| e["user"] == "u"))
        {
            break e["msg"].clone();
        }
    };
    assert_eq!(got, "over the cookie");
    // Another site's page cannot use the cookie for the socket.
    let refused = tokio_tungstenite::connect_async(ws_request("https://evil.example")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("a cross-site socket with the cookie: {other:?}"),
    }
    // `?token=` keeps working for scripts.
    assert_eq!(http(addr, "GET", "/logs/query?token=l0gs", "").await.0, 200);
    // Logout ends it.
    let acting = [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())];
    assert_eq!(
        http_with(addr, "POST", "/logs/logout", &acting, "").await.0,
        200
    );
    assert_eq!(
        http_with(addr, "GET", "/logs/query", &with_cookie, "")
            .await
            .0,
        401
    );

    // Without --logs-token the logs are open and there is nothing to log in to.
    let open = start_default().await;
    let (status, _, body) = http(open.local_addr, "GET", "/logs/login", "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"open":true}"#));
    assert_eq!(
        http(open.local_addr, "POST", "/logs/login", r#"{"token":""}"#)
            .await
            .0,
        404
    );
    open.shutdown().await;
    server.shutdown().await;
}
