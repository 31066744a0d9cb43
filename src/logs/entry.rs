//! One log entry: parsing and checking what the plugin posts to `/logs/add`, and the JSON
//! form listeners and queries see.
//!
//! Owns the entry's fields and their limits. Knows nothing of streams or stores. A body is
//! accepted whole or refused whole with an [`EntryError`] that names the entry and the field,
//! so a client never has half of a batch stored. A UTF-8 byte order mark before the JSON is
//! skipped (some .NET writers send one), and a NUL character in any field becomes U+FFFD
//! (PostgreSQL's `text` cannot hold NUL; doing it here means the live stream, both stores
//! and queries all see the same entry).

use serde_json::{Map, Value};

/// Longest `user` and `room` accepted, in characters (the plugin sends at most 10).
pub const MAX_NAME_CHARS: usize = 64;
/// Longest `level` accepted, in characters.
pub const MAX_LEVEL_CHARS: usize = 16;

/// What a client posted for one entry, checked; not yet stamped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Posted {
    /// The client's clock, unix ms (`timestamp`).
    pub client_time: Option<i64>,
    pub level: Option<String>,
    pub msg: Option<String>,
    pub text: Option<String>,
    pub user: Option<String>,
    /// `None` for a room-less entry (`room` missing, null or empty).
    pub room: Option<String>,
    /// One of the server's own events (`fromServer: true`): never set from a posted body,
    /// so what a client posts (as `user: "server"`) never passes for the server.
    pub from_server: bool,
}

/// A stamped entry, as listeners, the store and queries see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Strictly increasing over the server's life, across restarts (`seqNumber`).
    pub seq: i64,
    /// When the server received it, unix ms (`serverTime`).
    pub server_time: i64,
    pub posted: Posted,
}

/// Why a body was refused; the text is the 400 answer's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body must be a JSON object or an array of objects")]
    NotObjectOrArray,
    #[error("entry {0} is not a JSON object")]
    NotObject(usize),
    #[error("entry {index}: \"{field}\" must be {what}")]
    Field {
        index: usize,
        field: &'static str,
        what: &'static str,
    },
    #[error("entry {index}: \"{field}\" is longer than {max} characters")]
    TooLong {
        index: usize,
        field: &'static str,
        max: usize,
    },
}

/// Parses a `/logs/add` body: one entry object or an array of them. Unknown fields are
/// ignored; every known field may be missing or null.
pub fn parse_body(body: &[u8]) -> Result<Vec<Posted>, EntryError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value: Value = serde_json::from_slice(body).map_err(|e| EntryError::Json(e.to_string()))?;
    match value {
        Value::Object(o) => Ok(vec![parse_entry(0, &o)?]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Object(o) => parse_entry(i, o),
                _ => Err(EntryError::NotObject(i)),
            })
            .collect(),
        _ => Err(EntryError::NotObjectOrArray),
    }
}

fn parse_entry(index: usize, o: &Map<String, Value>) -> Result<Posted, EntryError> {
    let string = |field: &'static str, max: Option<usize>| -> Result<Option<String>, EntryError> {
        match o.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => match max {
                Some(max) if s.chars().count() > max => {
                    Err(EntryError::TooLong { index, field, max })
                }
                _ if s.contains('\0') => Ok(Some(s.replace('\0', "\u{FFFD}"))),
                _ => Ok(Some(s.clone())),
            },
            Some(_) => Err(EntryError::Field {
                index,
                field,
                what: "a string",
            }),
        }
    };
    let client_time = match o.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64() {
            Some(t) => Some(t),
            // A fractional or huge number: keep its whole milliseconds when they fit.
            None => match n.as_f64() {
                Some(f) if f.is_finite() && f.abs() < 9.0e15 => Some(f as i64),
                _ => {
                    return Err(EntryError::Field {
                        index,
                        field: "timestamp",
                        what: "a number (unix ms)",
                    });
                }
            },
        },
        Some(_) => {
            return Err(EntryError::Field {
                index,
                field: "timestamp",
                what: "a number (unix ms)",
            });
        }
    };
    Ok(Posted {
        client_time,
        level: string("level", Some(MAX_LEVEL_CHARS))?,
        msg: string("msg", None)?,
        text: string("text", None)?,
        user: string("user", Some(MAX_NAME_CHARS))?,
        room: string("room", Some(MAX_NAME_CHARS))?.filter(|r| !r.is_empty()),
        from_server: false,
    })
}

impl Entry {
    /// About how many bytes the entry holds in memory (its strings and its fixed part): what
    /// the store's queue counts against `--logs-store-queue-bytes`.
    pub fn size(&self) -> usize {
        let p = &self.posted;
        let strings: usize = [&p.level, &p.msg, &p.text, &p.user, &p.room]
            .iter()
            .map(|s| s.as_deref().map_or(0, str::len))
            .sum();
        // The Arc's two counters with the entry.
        std::mem::size_of::<Entry>() + 16 + strings
    }

    /// The entry's JSON object, as the original server sent it: the plugin's fields, then
    /// `serverTime` and `seqNumber`, then `fromServer: true` on the server's own events.
    /// Missing fields are null.
    pub fn to_json(&self) -> String {
        let p = &self.posted;
        let mut out = String::with_capacity(
            96 + p.msg.as_deref().map_or(0, str::len) + p.text.as_deref().map_or(0, str::len),
        );
        out.push_str("{\"timestamp\":");
        match p.client_time {
            Some(t) => out.push_str(&t.to_string()),
            None => out.push_str("null"),
        }
        for (name, value) in [
            ("level", &p.level),
            ("msg", &p.msg),
            ("text", &p.text),
            ("user", &p.user),
            ("room", &p.room),
        ] {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            push_json_string(&mut out, value.as_deref());
        }
        out.push_str(",\"serverTime\":");
        out.push_str(&self.server_time.to_string());
        out.push_str(",\"seqNumber\":");
        out.push_str(&self.seq.to_string());
        if p.from_server {
            out.push_str(",\"fromServer\":true");
        }
        out.push('}');
        out
    }

    /// Whether a listener or query following `room` sees this entry: its room's entries and
    /// the room-less ones; without a room, everything.
    pub fn visible_in(&self, room: Option<&str>) -> bool {
        match (room, self.posted.room.as_deref()) {
            (None, _) | (_, None) => true,
            (Some(want), Some(have)) => want == have,
        }
    }
}

fn push_json_string(out: &mut String, s: Option<&str>) {
    match s {
        // Serializing a &str cannot fail.
        Some(s) => out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "null".into())),
        None => out.push_str("null"),
    }
}

/// A JSON array of already-serialized objects.
pub fn json_array<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// Unix time now, in ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN_ONE: &str = r#"{"timestamp":1700000000123,"level":"Info","msg":"Connected to session","text":"22:13:20:123 [Info] Connected to session","user":"Hunter1","room":"abc123"}"#;

    #[test]
    fn the_plugins_object_and_array() {
        let one = parse_body(PLUGIN_ONE.as_bytes()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].client_time, Some(1700000000123));
        assert_eq!(one[0].level.as_deref(), Some("Info"));
        assert_eq!(one[0].user.as_deref(), Some("Hunter1"));
        assert_eq!(one[0].room.as_deref(), Some("abc123"));
        let five = format!("[{0},{0},{0},{0},{0}]", PLUGIN_ONE);
        assert_eq!(parse_body(five.as_bytes()).unwrap().len(), 5);
        assert!(parse_body(b"[]").unwrap().is_empty());
    }

    #[test]
    fn missing_null_and_empty_fields() {
        let p = parse_body(br#"{"msg":"x","room":"","user":null,"extra":[1]}"#).unwrap();
        assert_eq!(
            p[0],
            Posted {
                msg: Some("x".into()),
                ..Posted::default()
            }
        );
        let p = parse_body(br#"{"timestamp":1.5e12}"#).unwrap();
        assert_eq!(p[0].client_time, Some(1_500_000_000_000));
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        let err = |b: &str| parse_body(b.as_bytes()).unwrap_err().to_string();
        assert!(err("{nope").starts_with("body is not valid JSON"));
        assert_eq!(
            err("42"),
            "body must be a JSON object or an array of objects"
        );
        assert_eq!(err(r#"[{"msg":"a"},7]"#), "entry 1 is not a JSON object");
        assert_eq!(
            err(r#"{"timestamp":"yesterday"}"#),
            "entry 0: \"timestamp\" must be a number (unix ms)"
        );
        assert_eq!(
            err(r#"[{},{"msg":3}]"#),
            "entry 1: \"msg\" must be a string"
        );
        assert_eq!(
            err(&format!(r#"{{"user":"{}"}}"#, "u".repeat(65))),
            "entry 0: \"user\" is longer than 64 characters"
        );
        assert!(parse_body(b"\xff\xfe").is_err());
    }

    #[test]
    fn a_byte_order_mark_is_skipped_and_nul_replaced() {
        let mut body = b"\xEF\xBB\xBF".to_vec();
        body.extend_from_slice(PLUGIN_ONE.as_bytes());
        assert_eq!(
            parse_body(&body).unwrap()[0].user.as_deref(),
            Some("Hunter1")
        );
        let p = parse_body(br#"{"msg":"a\u0000b","user":"\u0000","room":"r\u0000"}"#).unwrap();
        assert_eq!(p[0].msg.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(p[0].user.as_deref(), Some("\u{FFFD}"));
        assert_eq!(p[0].room.as_deref(), Some("r\u{FFFD}"));
        // Only at the start.
        assert!(parse_body(b"{}\xEF\xBB\xBF").is_err());
    }

    #[test]
    fn json_form_round_trips() {
        let e = Entry {
            seq: 7,
            server_time: 1700000000200,
            posted: parse_body(PLUGIN_ONE.as_bytes()).unwrap().remove(0),
        };
        let v: Value = serde_json::from_str(&e.to_json()).unwrap();
        let mut want: Value = serde_json::from_str(PLUGIN_ONE).unwrap();
        want["serverTime"] = 1700000000200i64.into();
        want["seqNumber"] = 7.into();
        assert_eq!(v, want);
        let quoted = Entry {
            seq: 1,
            server_time: 0,
            posted: Posted {
                msg: Some("a \"quoted\"\n\u{1}line".into()),
                ..Posted::default()
            },
        };
        let v: Value = serde_json::from_str(&quoted.to_json()).unwrap();
        assert_eq!(v["msg"], "a \"quoted\"\n\u{1}line");
        assert_eq!(v["room"], Value::Null);
    }

    #[test]
    fn room_visibility() {
        let mut e = Entry {
            seq: 1,
            server_time: 0,
            posted: Posted::default(),
        };
        assert!(e.visible_in(None) && e.visible_in(Some("a")));
        e.posted.room = Some("a".into());
        assert!(e.visible_in(None) && e.visible_in(Some("a")) && !e.visible_in(Some("b")));
    }
}
