//! The reliable protocol's frames (protocol/reliable.md): parsing what clients send and
//! rendering what the server sends. Pure functions, no state and no I/O.
//!
//! Parsing is two-staged so that a bad frame is answered precisely: the envelope (`t` and
//! `seq`) first, then the operation of a `msg`. A `msg` with a valid `seq` but a bad
//! operation still parses (as [`ClientFrame::Msg`] with an `Err` op), so the server can
//! consume its sequence number and acknowledge it: otherwise the client would resend it
//! forever. Every field is read as raw JSON first and then checked, so a wrong type names the
//! field instead of failing the whole frame.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The largest sequence number, request id or ack: 2^53 - 1, the largest integer a
/// JavaScript number holds exactly.
pub const MAX_NUMBER: u64 = (1 << 53) - 1;
/// The longest room name, in bytes.
pub const MAX_ROOM_BYTES: usize = 128;
/// The most ranges an ack's `missing` field may name.
pub const MAX_MISSING_RANGES: usize = 64;

/// Error codes of `{"t":"error"}` frames and of error responses (protocol/reliable.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadJson,
    BadFrame,
    BinaryFrame,
    HelloRequired,
    AlreadyWelcomed,
    SeqGap,
    BadAck,
    BadOp,
    NotMember,
    RoomFull,
    UnknownClient,
    UnknownRequest,
    DuplicateRequest,
    BadRequest,
    Timeout,
    Overflow,
    Replaced,
    TooManyClients,
    TooManyRooms,
    ServerBusy,
}

impl Code {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadJson => "bad_json",
            Code::BadFrame => "bad_frame",
            Code::BinaryFrame => "binary_frame",
            Code::HelloRequired => "hello_required",
            Code::AlreadyWelcomed => "already_welcomed",
            Code::SeqGap => "seq_gap",
            Code::BadAck => "bad_ack",
            Code::BadOp => "bad_op",
            Code::NotMember => "not_member",
            Code::RoomFull => "room_full",
            Code::UnknownClient => "unknown_client",
            Code::UnknownRequest => "unknown_request",
            Code::DuplicateRequest => "duplicate_request",
            Code::BadRequest => "bad_request",
            Code::Timeout => "timeout",
            Code::Overflow => "overflow",
            Code::Replaced => "replaced",
            Code::TooManyClients => "too_many_clients",
            Code::TooManyRooms => "too_many_rooms",
            Code::ServerBusy => "server_busy",
        }
    }
}

/// A refusal: a code and a message for the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct WireError {
    pub code: Code,
    pub message: String,
}

impl WireError {
    pub fn new(code: Code, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// A `hello` that asks to resume.
#[derive(Debug, PartialEq)]
pub struct Resume<'a> {
    pub client_id: Cow<'a, str>,
    pub last_seq: u64,
    pub token: Option<Cow<'a, str>>,
}

/// Whom a request is for.
#[derive(Debug, PartialEq)]
pub enum Target<'a> {
    Server,
    Client(Cow<'a, str>),
}

/// The operation a client's `msg` carries.
#[derive(Debug)]
pub enum Op<'a> {
    Join {
        room: Cow<'a, str>,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Publish {
        room: Cow<'a, str>,
        data: &'a RawValue,
    },
    Request {
        id: u64,
        to: Target<'a>,
        data: &'a RawValue,
        timeout_ms: Option<u64>,
    },
    Response {
        id: u64,
        to: Cow<'a, str>,
        data: Option<&'a RawValue>,
        error: Option<&'a RawValue>,
    },
}

/// An acknowledgement, from an `ack` or a heartbeat: everything up to `seq` was received,
/// and, when `missing` is not empty, the receiver holds messages after `seq` but not the
/// ones in these ranges (inclusive, each after `seq`), which it asks to have resent at once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
    pub missing: Vec<(u64, u64)>,
}

/// One frame from a client.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Hello(Option<Resume<'a>>),
    /// An `ack`, or an `hb` (`heartbeat` true).
    Ack {
        ack: Ack,
        heartbeat: bool,
    },
    /// A data message: its sequence number and its operation, or why the operation is refused.
    Msg(u64, Result<Op<'a>, WireError>),
}

/// Every field any client frame may have, as raw JSON. Unknown fields are ignored (room for
/// extensions), duplicate fields are refused by serde.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    t: Option<&'a RawValue>,
    #[serde(borrow, rename = "clientId")]
    client_id: Option<&'a RawValue>,
    #[serde(borrow, rename = "lastSeq")]
    last_seq: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    ack: Option<&'a RawValue>,
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow, rename = "timeoutMs")]
    timeout_ms: Option<&'a RawValue>,
    #[serde(borrow)]
    missing: Option<&'a RawValue>,
}

fn bad(code: Code, message: impl Into<String>) -> WireError {
    WireError::new(code, message)
}

fn required<'a>(
    v: Option<&'a RawValue>,
    name: &str,
    code: Code,
) -> Result<&'a RawValue, WireError> {
    // A JSON null counts as missing.
    v.filter(|v| v.get() != "null")
        .ok_or_else(|| bad(code, format!("missing field {name}")))
}

fn string<'a>(v: &'a RawValue, name: &str, code: Code) -> Result<Cow<'a, str>, WireError> {
    serde_json::from_str::<Cow<'a, str>>(v.get())
        .map_err(|_| bad(code, format!("{name} must be a string")))
}

/// A whole number in 0..=[`MAX_NUMBER`].
fn number(v: &RawValue, name: &str, code: Code) -> Result<u64, WireError> {
    match serde_json::from_str::<u64>(v.get()) {
        Ok(n) if n <= MAX_NUMBER => Ok(n),
        _ => Err(bad(
            code,
            format!("{name} must be a whole number from 0 to {MAX_NUMBER}"),
        )),
    }
}

fn room<'a>(f: &Fields<'a>) -> Result<Cow<'a, str>, WireError> {
    let room = string(required(f.room, "room", Code::BadOp)?, "room", Code::BadOp)?;
    if room.is_empty() || room.len() > MAX_ROOM_BYTES {
        return Err(bad(
            Code::BadOp,
            format!("room must be 1 to {MAX_ROOM_BYTES} bytes"),
        ));
    }
    // NUL and other control characters would end up in logs, metrics labels and other
    // clients' screens.
    if room.chars().any(char::is_control) {
        return Err(bad(Code::BadOp, "room must not contain control characters"));
    }
    Ok(room)
}

/// An ack's cumulative `seq` and its optional `missing` ranges.
fn parse_ack(seq: &RawValue, name: &str, missing: Option<&RawValue>) -> Result<Ack, WireError> {
    let seq = number(seq, name, Code::BadFrame)?;
    let Some(missing) = missing.filter(|v| v.get() != "null") else {
        return Ok(Ack {
            seq,
            missing: Vec::new(),
        });
    };
    let shape = || {
        bad(
            Code::BadFrame,
            format!(
                "missing must be at most {MAX_MISSING_RANGES} ranges [from, to] of whole \
                 numbers, with {name} < from <= to <= {MAX_NUMBER}"
            ),
        )
    };
    let ranges: Vec<(u64, u64)> = serde_json::from_str(missing.get()).map_err(|_| shape())?;
    if ranges.len() > MAX_MISSING_RANGES
        || ranges
            .iter()
            .any(|&(from, to)| from <= seq || from > to || to > MAX_NUMBER)
    {
        return Err(shape());
    }
    Ok(Ack {
        seq,
        missing: ranges,
    })
}

fn op<'a>(f: &Fields<'a>) -> Result<Op<'a>, WireError> {
    let op = string(required(f.op, "op", Code::BadOp)?, "op", Code::BadOp)?;
    Ok(match op.as_ref() {
        "join" => Op::Join { room: room(f)? },
        "leave" => Op::Leave { room: room(f)? },
        "publish" => Op::Publish {
            room: room(f)?,
            data: f.data.unwrap_or(RawValue::NULL),
        },
        "request" => {
            let id = number(required(f.id, "id", Code::BadOp)?, "id", Code::BadOp)?;
            let to = string(required(f.to, "to", Code::BadOp)?, "to", Code::BadOp)?;
            Op::Request {
                id,
                to: if to == "server" {
                    Target::Server
                } else {
                    Target::Client(to)
                },
                data: f.data.unwrap_or(RawValue::NULL),
                timeout_ms: match f.timeout_ms.filter(|v| v.get() != "null") {
                    Some(v) => Some(number(v, "timeoutMs", Code::BadOp)?),
                    None => None,
                },
            }
        }
        "response" => {
            let error = f.error.filter(|v| v.get() != "null");
            if error.is_some_and(|e| !e.get().starts_with('{')) {
                return Err(bad(
                    Code::BadOp,
                    r#"error must be an object, like {"code":"...","message":"..."}"#,
                ));
            }
            Op::Response {
                id: number(required(f.id, "id", Code::BadOp)?, "id", Code::BadOp)?,
                to: string(required(f.to, "to", Code::BadOp)?, "to", Code::BadOp)?,
                data: f.data,
                error,
            }
        }
        other => {
            return Err(bad(
                Code::BadOp,
                format!(
                    "unknown op {:?}: join, leave, publish, request or response",
                    truncate(other)
                ),
            ));
        }
    })
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses one text frame from a client.
pub fn parse(text: &str) -> Result<ClientFrame<'_>, WireError> {
    let f: Fields = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            bad(Code::BadFrame, format!("not a frame object: {e}"))
        } else {
            bad(Code::BadJson, format!("invalid JSON: {e}"))
        }
    })?;
    let t = string(required(f.t, "t", Code::BadFrame)?, "t", Code::BadFrame)?;
    match t.as_ref() {
        "hello" => {
            let resume = match f.client_id.filter(|v| v.get() != "null") {
                None => None,
                Some(id) => Some(Resume {
                    client_id: string(id, "clientId", Code::BadFrame)?,
                    last_seq: number(
                        required(f.last_seq, "lastSeq", Code::BadFrame)?,
                        "lastSeq",
                        Code::BadFrame,
                    )?,
                    token: match f.token.filter(|v| v.get() != "null") {
                        Some(t) => Some(string(t, "token", Code::BadFrame)?),
                        None => None,
                    },
                }),
            };
            Ok(ClientFrame::Hello(resume))
        }
        "ack" => Ok(ClientFrame::Ack {
            ack: parse_ack(required(f.seq, "seq", Code::BadFrame)?, "seq", f.missing)?,
            heartbeat: false,
        }),
        "hb" => Ok(ClientFrame::Ack {
            ack: parse_ack(required(f.ack, "ack", Code::BadFrame)?, "ack", f.missing)?,
            heartbeat: true,
        }),
        "msg" => {
            let seq = number(
                required(f.seq, "seq", Code::BadFrame)?,
                "seq",
                Code::BadFrame,
            )?;
            if seq == 0 {
                return Err(bad(Code::BadFrame, "seq starts at 1"));
            }
            Ok(ClientFrame::Msg(seq, op(&f)))
        }
        other => Err(bad(
            Code::BadFrame,
            format!("unknown t {:?}: hello, msg, ack or hb", truncate(other)),
        )),
    }
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    // Serializing a str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

/// The server's limits a welcome announces, so a client can stay within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest frame accepted, in bytes.
    pub max_message_bytes: usize,
    /// Frames a connection may send per second, sustained, and in a burst.
    pub messages_per_second: u32,
    pub message_burst: u32,
}

/// `{"t":"welcome",...}`.
pub fn welcome(
    client_id: &str,
    heartbeat_ms: u64,
    resumed: bool,
    seq: u64,
    token: &str,
    limits: &Limits,
) -> Bytes {
    format!(
        r#"{{"t":"welcome","clientId":{},"heartbeatMs":{heartbeat_ms},"resumed":{resumed},"seq":{seq},"token":{},"maxMessageBytes":{},"messagesPerSecond":{},"messageBurst":{}}}"#,
        json_str(client_id),
        json_str(token),
        limits.max_message_bytes,
        limits.messages_per_second,
        limits.message_burst,
    )
    .into()
}

/// `,"missing":[[a,b],...]` when `missing` is not empty.
fn missing_field(s: &mut String, missing: &[(u64, u64)]) {
    if missing.is_empty() {
        return;
    }
    s.push_str(r#","missing":["#);
    for (i, (from, to)) in missing.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Writing into a String cannot fail.
        let _ = write!(s, "[{from},{to}]");
    }
    s.push(']');
}

/// `{"t":"ack","seq":n}`, with the ranges the server misses after `n` (it holds later ones).
pub fn ack(seq: u64, missing: &[(u64, u64)]) -> Bytes {
    let mut s = format!(r#"{{"t":"ack","seq":{seq}"#);
    missing_field(&mut s, missing);
    s.push('}');
    s.into()
}

/// `{"t":"hb","ack":n}`, with the ranges the server misses after `n`.
pub fn hb(ack: u64, missing: &[(u64, u64)]) -> Bytes {
    let mut s = format!(r#"{{"t":"hb","ack":{ack}"#);
    missing_field(&mut s, missing);
    s.push('}');
    s.into()
}

/// `{"t":"error",...}`, with the `seq` of the message it concerns when there is one.
pub fn error(e: &WireError, seq: Option<u64>) -> Bytes {
    let mut s = format!(
        r#"{{"t":"error","code":"{}","message":{}"#,
        e.code.as_str(),
        json_str(&e.message)
    );
    if let Some(seq) = seq {
        // Writing into a String cannot fail.
        let _ = write!(s, r#","seq":{seq}"#);
    }
    s.push('}');
    s.into()
}

const MSG_HEAD: &[u8] = br#"{"t":"msg","seq":"#;

/// A data message to one client: `{"t":"msg","seq":<seq>` followed by a tail shared by every
/// receiver (from one of the `*_tail` functions).
pub fn msg(seq: u64, tail: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(msg_len(seq, tail.len()));
    out.extend_from_slice(MSG_HEAD);
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(tail);
    out.into()
}

/// The length of [`msg`]`(seq, tail)`.
pub fn msg_len(seq: u64, tail_len: usize) -> usize {
    MSG_HEAD.len() + seq.checked_ilog10().unwrap_or(0) as usize + 1 + tail_len
}

/// The tail of a room publish: `,"room":..,"from":..,"data":..}`.
pub fn publish_tail(room: &str, from: &str, data: &RawValue) -> Vec<u8> {
    format!(
        r#","room":{},"from":{},"data":{}}}"#,
        json_str(room),
        json_str(from),
        data.get()
    )
    .into_bytes()
}

/// The tail of a join or leave announcement: `,"op":"join","room":..,"from":..}`.
pub fn announce_tail(op: &str, room: &str, who: &str) -> Vec<u8> {
    format!(
        r#","op":"{op}","room":{},"from":{}}}"#,
        json_str(room),
        json_str(who)
    )
    .into_bytes()
}

/// The tail of a relayed request: `,"op":"request","id":k,"from":..,"data":..}`.
pub fn request_tail(id: u64, from: &str, data: &RawValue) -> Vec<u8> {
    format!(
        r#","op":"request","id":{id},"from":{},"data":{}}}"#,
        json_str(from),
        data.get()
    )
    .into_bytes()
}

/// The tail of a response: `,"op":"response","id":k,"from":..` then `"data"` and/or
/// `"error"` (raw JSON).
pub fn response_tail(id: u64, from: &str, data: Option<&str>, error: Option<&str>) -> Vec<u8> {
    let mut s = format!(r#","op":"response","id":{id},"from":{}"#, json_str(from));
    if let Some(d) = data {
        let _ = write!(s, r#","data":{d}"#);
    }
    if let Some(e) = error {
        let _ = write!(s, r#","error":{e}"#);
    }
    s.push('}');
    s.into_bytes()
}

/// The `error` object of a response the server makes up (timeout, unknown client).
pub fn response_error(code: Code, message: &str) -> String {
    format!(
        r#"{{"code":"{}","message":{}}}"#,
        code.as_str(),
        json_str(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> Code {
        match parse(text) {
            Err(e) => e.code,
            Ok(ClientFrame::Msg(_, Err(e))) => e.code,
            Ok(f) => panic!("{text} parsed as {f:?}"),
        }
    }

    #[test]
    fn hellos() {
        assert!(matches!(
            parse(r#"{"t":"hello"}"#),
            Ok(ClientFrame::Hello(None))
        ));
        let Ok(ClientFrame::Hello(Some(r))) =
            parse(r#"{"t":"hello","clientId":"a\"b","lastSeq":7,"token":"k"}"#)
        else {
            panic!()
        };
        assert_eq!(r.client_id, "a\"b");
        assert_eq!(r.last_seq, 7);
        assert_eq!(r.token.as_deref(), Some("k"));
        assert_eq!(code(r#"{"t":"hello","clientId":"x"}"#), Code::BadFrame);
        assert_eq!(
            code(r#"{"t":"hello","clientId":5,"lastSeq":1}"#),
            Code::BadFrame
        );
    }

    #[test]
    fn msgs_and_ops() {
        let Ok(ClientFrame::Msg(3, Ok(Op::Publish { room, data }))) =
            parse(r#"{"t":"msg","seq":3,"op":"publish","room":"r","data":{"x":[1,2]}}"#)
        else {
            panic!()
        };
        assert_eq!(room, "r");
        assert_eq!(data.get(), r#"{"x":[1,2]}"#);
        let Ok(ClientFrame::Msg(1, Ok(Op::Request { id, to, .. }))) =
            parse(r#"{"t":"msg","seq":1,"op":"request","id":9,"to":"server","data":null}"#)
        else {
            panic!()
        };
        assert_eq!((id, to), (9, Target::Server));
        // The seq survives a bad op, so the server can consume and acknowledge it.
        assert!(matches!(
            parse(r#"{"t":"msg","seq":4,"op":"dance"}"#),
            Ok(ClientFrame::Msg(
                4,
                Err(WireError {
                    code: Code::BadOp,
                    ..
                })
            ))
        ));
        assert_eq!(
            code(r#"{"t":"msg","seq":4,"op":"join","room":7}"#),
            Code::BadOp
        );
        assert_eq!(
            code(r#"{"t":"msg","seq":4,"op":"join","room":""}"#),
            Code::BadOp
        );
        assert_eq!(
            code(r#"{"t":"msg","seq":4,"op":"publish","data":1}"#),
            Code::BadOp
        );
        // A response's error is an object (the doc's shape), nothing else.
        for error in [r#""oops""#, "7", "[1]", "true"] {
            let text =
                format!(r#"{{"t":"msg","seq":4,"op":"response","id":1,"to":"x","error":{error}}}"#);
            assert_eq!(code(&text), Code::BadOp, "{text}");
        }
        assert!(matches!(
            parse(r#"{"t":"msg","seq":4,"op":"response","id":1,"to":"x","error":{"code":"no"}}"#),
            Ok(ClientFrame::Msg(4, Ok(Op::Response { error: Some(_), .. })))
        ));
    }

    #[test]
    fn bad_frames() {
        assert_eq!(code("nope"), Code::BadJson);
        assert_eq!(code("{\"t\":"), Code::BadJson);
        assert_eq!(code("[1,2]"), Code::BadFrame);
        assert_eq!(code("{}"), Code::BadFrame);
        assert_eq!(code(r#"{"t":"dance"}"#), Code::BadFrame);
        assert_eq!(code(r#"{"t":7}"#), Code::BadFrame);
        assert_eq!(
            code(r#"{"t":"msg","seq":0,"op":"join","room":"r"}"#),
            Code::BadFrame
        );
        assert_eq!(code(r#"{"t":"msg","seq":-1}"#), Code::BadFrame);
        assert_eq!(code(r#"{"t":"msg","seq":1.5}"#), Code::BadFrame);
        assert_eq!(code(r#"{"t":"msg","seq":"1"}"#), Code::BadFrame);
        assert_eq!(
            code(r#"{"t":"msg","seq":9007199254740992}"#),
            Code::BadFrame
        );
        assert_eq!(code(r#"{"t":"msg","seq":1e400}"#), Code::BadFrame);
        assert_eq!(
            code(r#"{"t":"ack","seq":99999999999999999999999}"#),
            Code::BadFrame
        );
        assert_eq!(code(r#"{"t":"hb"}"#), Code::BadFrame);
        assert_eq!(code(r#"{"t":"ack","t":"ack","seq":1}"#), Code::BadFrame);
    }

    #[test]
    fn acks_with_missing_ranges() {
        let Ok(ClientFrame::Ack { ack, heartbeat }) =
            parse(r#"{"t":"ack","seq":3,"missing":[[5,5],[7,9]]}"#)
        else {
            panic!()
        };
        assert!(!heartbeat);
        assert_eq!(ack.seq, 3);
        assert_eq!(ack.missing, vec![(5, 5), (7, 9)]);
        let Ok(ClientFrame::Ack { ack, heartbeat }) = parse(r#"{"t":"hb","ack":2}"#) else {
            panic!()
        };
        assert!(heartbeat);
        assert_eq!(
            ack,
            Ack {
                seq: 2,
                missing: vec![]
            }
        );
        for bad in [
            r#"{"t":"ack","seq":3,"missing":[[3,4]]}"#,
            r#"{"t":"ack","seq":3,"missing":[[6,5]]}"#,
            r#"{"t":"ack","seq":3,"missing":[5]}"#,
            r#"{"t":"ack","seq":3,"missing":"5"}"#,
            r#"{"t":"hb","ack":3,"missing":[[4,9007199254740992]]}"#,
        ] {
            assert_eq!(code(bad), Code::BadFrame, "{bad}");
        }
        let many: Vec<_> = (0..=MAX_MISSING_RANGES as u64)
            .map(|i| [10 + 2 * i, 10 + 2 * i])
            .collect();
        let text = serde_json::json!({"t":"ack","seq":1,"missing":many}).to_string();
        assert_eq!(code(&text), Code::BadFrame);
        let v: serde_json::Value =
            serde_json::from_slice(&super::ack(4, &[(6, 6), (8, 10)])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"t":"ack","seq":4,"missing":[[6,6],[8,10]]})
        );
        assert_eq!(&hb(4, &[])[..], br#"{"t":"hb","ack":4}"#);
    }

    #[test]
    fn room_names_refuse_control_characters() {
        for room in [r"a\u0000b", r"tab\there", r"\u007f", r"\u0085"] {
            let text = format!(r#"{{"t":"msg","seq":1,"op":"join","room":"{room}"}}"#);
            assert_eq!(code(&text), Code::BadOp, "{text}");
        }
        assert!(matches!(
            parse(r#"{"t":"msg","seq":1,"op":"join","room":"café ☕ 1"}"#),
            Ok(ClientFrame::Msg(1, Ok(Op::Join { .. })))
        ));
    }

    #[test]
    fn msg_len_is_the_rendered_length() {
        for seq in [1, 9, 10, 99, 100, 12345, MAX_NUMBER] {
            assert_eq!(msg(seq, b"}").len(), msg_len(seq, 1), "{seq}");
        }
    }

    #[test]
    fn rendering_is_json() {
        let tail = publish_tail("r\"", "id", &RawValue::from_string("[1]".into()).unwrap());
        let m = msg(12, &tail);
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["seq"], 12);
        assert_eq!(v["room"], "r\"");
        let e = error(&WireError::new(Code::SeqGap, "a \"b\""), Some(3));
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["code"], "seq_gap");
        assert_eq!(v["seq"], 3);
        let r = msg(
            1,
            &response_tail(4, "server", None, Some(&response_error(Code::Timeout, "x"))),
        );
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["error"]["code"], "timeout");
    }
}
