//! The HunterPie wire messages: parsing what clients send, rendering what the server sends.
//!
//! Owns the JSON shapes of protocol/hunterpie.md and nothing else. Parsing borrows from the
//! frame and checks each field's type itself, so every refusal names the field at fault.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::core::hub::Presence;
use crate::core::outbound::Payload;

/// Longest accepted session id, in bytes.
pub const MAX_SESSION_ID: usize = 256;
/// Longest accepted player name, in bytes.
pub const MAX_NAME: usize = 64;

/// A message from a client, interpreted.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    SetName(String),
    /// `SetSession` with an empty id is `session_id: ""` (the client is then removed from its
    /// session, as the original server does).
    SetSession {
        session_id: String,
        leader: bool,
        /// A session secret chosen by the first leader, and an HMAC-signed leader token: both
        /// optional, the deployed plugin sends neither.
        secret: Option<String>,
        token: Option<String>,
    },
    /// A push; the frame itself is what gets relayed.
    Push {
        session_id: String,
    },
    /// `LeaveSession`, or `Close` as the seed README calls it.
    Leave,
}

/// Why a message was refused; the text goes to the client in a servermsg.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Invalid JSON: {0}")]
    Json(String),
    #[error("Message must be a JSON object with a \"type\"")]
    NotObject,
    #[error("Missing \"type\"")]
    MissingType,
    #[error("\"{0}\" must be {1}")]
    WrongType(&'static str, &'static str),
    #[error("Unknown message type \"{0}\"")]
    UnknownType(String),
    #[error("\"{0}\" is too long (at most {1} bytes)")]
    TooLong(&'static str, usize),
    #[error("Push needs \"data\"")]
    MissingData,
}

impl ParseError {
    /// Metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ParseError::Json(_) => "invalid_json",
            ParseError::NotObject
            | ParseError::MissingType
            | ParseError::WrongType(..)
            | ParseError::MissingData => "invalid_message",
            ParseError::UnknownType(_) => "unknown_type",
            ParseError::TooLong(..) => "field_too_long",
        }
    }
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<&'a RawValue>,
    #[serde(rename = "sessionId", borrow, default)]
    session_id: Option<&'a RawValue>,
    #[serde(rename = "isLeader", borrow, default)]
    is_leader: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    secret: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<&'a RawValue>,
}

/// A string field: `None` if absent or null.
fn string_field(v: Option<&RawValue>, field: &'static str) -> Result<Option<String>, ParseError> {
    match v.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str::<String>(raw)
            .map(Some)
            .map_err(|_| ParseError::WrongType(field, "a string")),
    }
}

/// Parses one text message.
pub fn parse(text: &str) -> Result<Command, ParseError> {
    if !text.trim_start().starts_with('{') {
        // serde would read a JSON array as a struct: tell JSON from not-an-object first.
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => ParseError::NotObject,
            Err(e) => ParseError::Json(e.to_string()),
        });
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let ty = string_field(raw.ty, "type")?.ok_or(ParseError::MissingType)?;
    match ty.to_ascii_lowercase().as_str() {
        "setname" => {
            let name = string_field(raw.name, "name")?.unwrap_or_default();
            if name.len() > MAX_NAME {
                return Err(ParseError::TooLong("name", MAX_NAME));
            }
            Ok(Command::SetName(name))
        }
        "setsession" => {
            let session_id = string_field(raw.session_id, "sessionId")?.unwrap_or_default();
            if session_id.len() > MAX_SESSION_ID {
                return Err(ParseError::TooLong("sessionId", MAX_SESSION_ID));
            }
            let leader = match raw.is_leader.map(RawValue::get) {
                None | Some("null") | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(ParseError::WrongType("isLeader", "true or false")),
            };
            let secret = string_field(raw.secret, "secret")?.filter(|s| !s.is_empty());
            let token = string_field(raw.token, "token")?.filter(|s| !s.is_empty());
            for (field, value) in [("secret", &secret), ("token", &token)] {
                if value.as_ref().is_some_and(|v| v.len() > MAX_SESSION_ID) {
                    return Err(ParseError::TooLong(field, MAX_SESSION_ID));
                }
            }
            Ok(Command::SetSession {
                session_id,
                leader,
                secret,
                token,
            })
        }
        "push" => {
            if raw.data.is_none() {
                return Err(ParseError::MissingData);
            }
            let session_id = string_field(raw.session_id, "sessionId")?.unwrap_or_default();
            Ok(Command::Push { session_id })
        }
        "leavesession" | "close" => Ok(Command::Leave),
        _ => Err(ParseError::UnknownType(ty)),
    }
}

/// `{"type":"sessionstate","leaderConnected":..,"playersCount":..}`
pub fn session_state(p: Presence) -> Arc<Payload> {
    Payload::text(format!(
        r#"{{"type":"sessionstate","leaderConnected":{},"playersCount":{}}}"#,
        p.leaders > 0,
        p.members
    ))
}

/// Levels the client understands.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// `{"type":"servermsg","level":..,"text":..}`
pub fn server_msg(level: Level, text: &str) -> Arc<Payload> {
    let level = match level {
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    };
    // Serializing a &str cannot fail.
    let text = serde_json::to_string(text).unwrap_or_default();
    Payload::text(format!(
        r#"{{"type":"servermsg","level":"{level}","text":{text}}}"#
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_messages() {
        assert_eq!(
            parse(r#"{"type":"SetName","name":"Hunter"}"#),
            Ok(Command::SetName("Hunter".into()))
        );
        assert_eq!(
            parse(r#"{"sessionId":"c3@uTKeQR3Mp:Hunter","type":"SetSession","isLeader":true}"#),
            Ok(Command::SetSession {
                session_id: "c3@uTKeQR3Mp:Hunter".into(),
                leader: true,
                secret: None,
                token: None
            })
        );
        assert_eq!(
            parse(
                r#"{"sessionId":"s","type":"Push","data":[["em_001",[[0,32.42]],[[42,41.23]]]]}"#
            ),
            Ok(Command::Push {
                session_id: "s".into()
            })
        );
        assert_eq!(parse(r#"{"type":"LeaveSession"}"#), Ok(Command::Leave));
        assert_eq!(parse(r#"{"type":"close"}"#), Ok(Command::Leave));
        assert_eq!(
            parse(r#"{"type":"SETSESSION","sessionId":"x"}"#),
            Ok(Command::SetSession {
                session_id: "x".into(),
                leader: false,
                secret: None,
                token: None
            })
        );
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(matches!(parse("{nope"), Err(ParseError::Json(_))));
        assert_eq!(parse("[1,2]"), Err(ParseError::NotObject));
        assert_eq!(parse("{}"), Err(ParseError::MissingType));
        assert_eq!(
            parse(r#"{"type":5}"#),
            Err(ParseError::WrongType("type", "a string"))
        );
        assert_eq!(
            parse(r#"{"type":"SetSession","sessionId":1}"#),
            Err(ParseError::WrongType("sessionId", "a string"))
        );
        assert_eq!(
            parse(r#"{"type":"SetSession","sessionId":"a","isLeader":"yes"}"#),
            Err(ParseError::WrongType("isLeader", "true or false"))
        );
        assert_eq!(
            parse(r#"{"type":"Dance"}"#),
            Err(ParseError::UnknownType("Dance".into()))
        );
        assert_eq!(
            parse(r#"{"type":"Push","sessionId":"s"}"#),
            Err(ParseError::MissingData)
        );
        assert_eq!(
            parse(r#"{"type":"SetName","name":7}"#),
            Err(ParseError::WrongType("name", "a string"))
        );
    }

    #[test]
    fn outgoing_shapes() {
        let s = session_state(Presence {
            members: 3,
            leaders: 1,
        });
        assert_eq!(
            &s.data()[..],
            br#"{"type":"sessionstate","leaderConnected":true,"playersCount":3}"#
        );
        let m = server_msg(Level::Warn, "say \"hi\"");
        let v: serde_json::Value = serde_json::from_slice(m.data()).unwrap();
        assert_eq!(v["text"], "say \"hi\"");
        assert_eq!(v["level"], "warn");
    }
}
