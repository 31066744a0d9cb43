//! What nodes say to each other on a session's Redis channel, byte for byte.
//!
//! Two messages, each starting with its kind and the sending node's 16-byte id:
//! - `P` push: then the audience (`F` followers, `O` others), the kind of payload (`T` text,
//!   `B` binary) and the payload itself, unchanged.
//! - `R` report: then the node's members and leaders in the session (u32 each) and the
//!   report's version (u64), big-endian.
//!
//! The membership hash holds the same report as text: `"{members} {leaders} {version}"`.

use bytes::Bytes;

use crate::core::hub::{Audience, NodeId, Presence, Remote};

/// A message on a session channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Push {
        node: NodeId,
        audience: Audience,
        binary: bool,
        data: Bytes,
    },
    Report {
        node: NodeId,
        remote: Remote,
    },
}

/// Encodes a push.
pub fn push(node: NodeId, audience: Audience, binary: bool, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.push(b'P');
    out.extend_from_slice(&node.to_be_bytes());
    out.push(match audience {
        Audience::Followers => b'F',
        Audience::Others => b'O',
    });
    out.push(if binary { b'B' } else { b'T' });
    out.extend_from_slice(data);
    out
}

/// Encodes a membership report.
pub fn report(node: NodeId, remote: Remote) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.push(b'R');
    out.extend_from_slice(&node.to_be_bytes());
    out.extend_from_slice(&count(remote.presence.members).to_be_bytes());
    out.extend_from_slice(&count(remote.presence.leaders).to_be_bytes());
    out.extend_from_slice(&remote.version.to_be_bytes());
    out
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decodes a message; None for anything malformed (Redis is shared: never trust it blindly).
pub fn decode(bytes: &[u8]) -> Option<Message> {
    let (&kind, rest) = bytes.split_first()?;
    let (node, rest) = rest.split_first_chunk::<16>()?;
    let node = NodeId::from_be_bytes(*node);
    match kind {
        b'P' => {
            let (&audience, rest) = rest.split_first()?;
            let (&payload_kind, data) = rest.split_first()?;
            let audience = match audience {
                b'F' => Audience::Followers,
                b'O' => Audience::Others,
                _ => return None,
            };
            let binary = match payload_kind {
                b'B' => true,
                b'T' if std::str::from_utf8(data).is_ok() => false,
                _ => return None,
            };
            Some(Message::Push {
                node,
                audience,
                binary,
                data: Bytes::copy_from_slice(data),
            })
        }
        b'R' => {
            let (members, rest) = rest.split_first_chunk::<4>()?;
            let (leaders, rest) = rest.split_first_chunk::<4>()?;
            let version: [u8; 8] = rest.try_into().ok()?;
            Some(Message::Report {
                node,
                remote: Remote {
                    presence: Presence {
                        members: u32::from_be_bytes(*members) as usize,
                        leaders: u32::from_be_bytes(*leaders) as usize,
                    },
                    version: u64::from_be_bytes(version),
                },
            })
        }
        _ => None,
    }
}

/// A report as stored in the membership hash.
pub fn report_text(remote: Remote) -> String {
    format!(
        "{} {} {}",
        remote.presence.members, remote.presence.leaders, remote.version
    )
}

/// Parses a report stored in the membership hash.
pub fn parse_report_text(text: &str) -> Option<Remote> {
    let mut it = text.split(' ').map(|n| n.parse::<u64>().ok());
    let (members, leaders, version) = (it.next()??, it.next()??, it.next()??);
    Some(Remote {
        presence: Presence {
            members: usize::try_from(members).ok()?,
            leaders: usize::try_from(leaders).ok()?,
        },
        version,
    })
}

/// A node id as text (in hash fields, key names and control messages).
pub fn node_text(node: NodeId) -> String {
    format!("{node:032x}")
}

/// Parses [`node_text`].
pub fn parse_node_text(text: &str) -> Option<NodeId> {
    (text.len() == 32)
        .then(|| NodeId::from_str_radix(text, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let node = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        let push = push(node, Audience::Followers, false, br#"{"type":"Push"}"#);
        assert_eq!(
            decode(&push),
            Some(Message::Push {
                node,
                audience: Audience::Followers,
                binary: false,
                data: Bytes::from_static(br#"{"type":"Push"}"#),
            })
        );
        let remote = Remote {
            presence: Presence {
                members: 3,
                leaders: 1,
            },
            version: 42,
        };
        assert_eq!(
            decode(&report(node, remote)),
            Some(Message::Report { node, remote })
        );
        assert_eq!(parse_report_text(&report_text(remote)), Some(remote));
        assert_eq!(parse_node_text(&node_text(node)), Some(node));
        for bad in [
            &b""[..],
            b"P",
            b"X0123456789abcdef",
            &push[..17],
            &report(node, remote)[..30],
        ] {
            assert_eq!(decode(bad), None);
        }
        let mut not_utf8 = push.clone();
        not_utf8.push(0xff);
        assert_eq!(decode(&not_utf8), None);
        assert_eq!(parse_report_text("1 2"), None);
        assert_eq!(parse_node_text("zz"), None);
    }
}
