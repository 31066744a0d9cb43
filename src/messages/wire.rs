//! The direct-message protocol's frames: what a client may send and the errors it gets back
//! (see protocol/messages.md).

use std::sync::Arc;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::core::outbound::Payload;

/// Longest peer name, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `{"login":"A"}`, with `"token"` when the server requires one.
    Login { name: String, token: Option<String> },
    /// `{"from":"A","to":"B","msg":"..."}`.
    Send { from: String, to: String },
}

/// Reads one text frame. The error is the text of the `{"error": ...}` answer.
pub fn parse(text: &str) -> Result<Request, String> {
    let mut obj = match serde_json::from_str(text) {
        Ok(Object::Unique(obj)) => obj,
        Ok(Object::Duplicate(key)) => return Err(format!("duplicate field {key:?}")),
        Err(e) if e.is_data() => return Err("expected a JSON object".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    if obj.contains_key("login") {
        only(&obj, &["login", "token"])?;
        let name = string(&mut obj, "login")?;
        check_name(&name)?;
        let token = match obj.remove("token") {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) => Some(t),
            Some(_) => return Err("\"token\" must be a string".into()),
        };
        return Ok(Request::Login { name, token });
    }
    if ["from", "to", "msg"].iter().any(|k| obj.contains_key(*k)) {
        only(&obj, &["from", "to", "msg"])?;
        let from = string(&mut obj, "from")?;
        let to = string(&mut obj, "to")?;
        string(&mut obj, "msg")?;
        check_name(&to).map_err(|e| format!("\"to\": {e}"))?;
        return Ok(Request::Send { from, to });
    }
    Err(r#"expected {"login":"<name>"} or {"from":"<name>","to":"<name>","msg":"<text>"}"#.into())
}

/// A JSON object read with its duplicate keys noticed (serde_json would keep the last one,
/// so `{"from":"Z","from":"A"}` would pass the name check while other parsers read `Z`).
enum Object {
    Unique(Map<String, Value>),
    Duplicate(String),
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Object, A::Error> {
                let mut obj = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if obj.contains_key(&key) {
                        // The rest is still read, so invalid JSON after it is reported.
                        while access.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                        return Ok(Object::Duplicate(key));
                    }
                    obj.insert(key, value);
                }
                Ok(Object::Unique(obj))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

fn only(obj: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown field {k:?}")),
        None => Ok(()),
    }
}

fn string(obj: &mut Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{key:?} must be a string")),
        None => Err(format!("missing field {key:?}")),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a peer name cannot be empty".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "a peer name has at most {MAX_NAME_CHARS} characters"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("a peer name cannot contain control characters".into());
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return Err(format!(
            "a peer name cannot contain invisible or direction-changing characters (U+{:04X})",
            u32::from(c)
        ));
    }
    if name.starts_with(' ') || name.ends_with(' ') {
        return Err("a peer name cannot start or end with a space".into());
    }
    Ok(())
}

/// Characters that would let a name pass for another on screen: formatting characters
/// (bidi overrides and isolates such as U+202E, zero-width spaces and joiners, the BOM, soft
/// hyphen), line and paragraph separators, private-use characters, blank letters (Hangul
/// fillers) and every space but U+0020.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory as G, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        G::Format | G::LineSeparator | G::ParagraphSeparator | G::PrivateUse | G::Surrogate
    ) || (c.general_category() == G::SpaceSeparator && c != ' ')
        || matches!(
            c,
            '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
        )
}

/// `{"error": text}`.
pub fn error(text: impl Into<String>) -> Arc<Payload> {
    let v = serde_json::json!({ "error": text.into() });
    Payload::text(v.to_string())
}

/// The original server's answer for a peer that never logged in.
pub fn unknown_peer(name: &str) -> Arc<Payload> {
    error(format!("peer {name} does not exist"))
}

/// The original server's answer for a peer that is offline (its message is queued).
pub fn offline_peer(name: &str) -> Arc<Payload> {
    error(format!(
        "connection to {name} closed, messages will be sent as {name} comes back online"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn login_and_send() {
        assert_eq!(
            parse(r#"{"login":"A"}"#),
            Ok(Request::Login {
                name: "A".into(),
                token: None
            })
        );
        assert_eq!(
            parse(r#"{"login":"A","token":"ab"}"#),
            Ok(Request::Login {
                name: "A".into(),
                token: Some("ab".into())
            })
        );
        assert_eq!(
            parse(r#"{"from":"A","to":"B","msg":"hi"}"#),
            Ok(Request::Send {
                from: "A".into(),
                to: "B".into()
            })
        );
    }

    #[test]
    fn bad_frames_name_the_problem() {
        let err = |t: &str| parse(t).unwrap_err();
        assert!(err("{").starts_with("invalid JSON"));
        assert_eq!(err("[1]"), "expected a JSON object");
        assert_eq!(err("\"text\""), "expected a JSON object");
        assert_eq!(
            err(r#"{"from":"Z","from":"A","to":"B","msg":"x"}"#),
            "duplicate field \"from\""
        );
        assert!(err(r#"{"a":1,"a":2,"#).starts_with("invalid JSON"));
        assert!(err("{}").starts_with("expected {"));
        assert_eq!(err(r#"{"login":5}"#), "\"login\" must be a string");
        assert_eq!(err(r#"{"login":""}"#), "a peer name cannot be empty");
        assert_eq!(err(r#"{"login":"A","x":1}"#), "unknown field \"x\"");
        assert_eq!(err(r#"{"from":"A","to":"B"}"#), "missing field \"msg\"");
        assert_eq!(
            err(r#"{"from":"A","to":"B","msg":{"x":1}}"#),
            "\"msg\" must be a string"
        );
        assert_eq!(
            err(r#"{"from":"A","to":"B","msg":"m","cc":"C"}"#),
            "unknown field \"cc\""
        );
        assert!(err(&format!(r#"{{"login":"{}"}}"#, "x".repeat(65))).contains("at most 64"));
    }

    #[test]
    fn names_that_would_pass_for_others_are_refused() {
        let login = |name: &str| parse(&json!({ "login": name }).to_string());
        for bad in [
            "adm\u{202E}nimda",    // right-to-left override
            "Bob\u{200B}",         // zero-width space
            "A\u{200D}B",          // zero-width joiner
            "\u{2066}Eve\u{2069}", // isolates
            "\u{FEFF}Ann",         // byte order mark
            "Al\u{00AD}ice",       // soft hyphen
            "A\u{2028}B",          // line separator
            "\u{3164}",            // Hangul filler
            "Bob\u{00A0}",         // no-break space
            "\u{E000}",            // private use
        ] {
            let e = login(bad).unwrap_err();
            assert!(
                e.contains("invisible or direction-changing"),
                "{bad:?}: {e}"
            );
        }
        assert!(login("A\u{0007}").unwrap_err().contains("control"));
        assert!(login(" Bob").unwrap_err().contains("space"));
        for good in ["Bob", "Alice Smith", "Zoë", "Хантер", "ハンター", "😀"] {
            assert!(login(good).is_ok(), "{good}");
        }
        let to = parse(r#"{"from":"A","to":"B\u202e","msg":"x"}"#).unwrap_err();
        assert!(to.starts_with("\"to\": a peer name cannot"), "{to}");
    }

    #[test]
    fn original_error_texts() {
        assert_eq!(
            unknown_peer("B").data().as_ref(),
            br#"{"error":"peer B does not exist"}"#
        );
        assert_eq!(
            offline_peer("B").data().as_ref(),
            br#"{"error":"connection to B closed, messages will be sent as B comes back online"}"#
        );
    }
}
