//! The hub: every session and its members, and fan-out within a session.
//!
//! Owns membership; knows nothing of any wire protocol. A front-end joins a connection to a
//! session with its [`Outbound`] queue and a role, publishes payloads to an [`Audience`], and
//! gives the hub a function that renders the presence announcement its protocol sends after
//! every membership change (the hub sends it to every member, under the session lock, so
//! each member sees announcements and relayed messages in one consistent order).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::core::outbound::{Outbound, Payload};
use crate::metrics::Metrics;

/// Identifies one connection for the whole life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    /// A fresh id.
    pub fn next() -> ConnId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A member's role in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// One connection's place in a session.
#[derive(Debug, Clone)]
pub struct Member {
    pub conn: ConnId,
    pub role: Role,
    pub outbound: Outbound,
}

/// What a presence announcement reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Presence {
    pub members: usize,
    pub leaders: usize,
}

/// Who receives a published payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every follower (not the leaders, not the sender).
    Followers,
    /// Every member but the sender.
    Others,
}

/// Renders a protocol's presence announcement.
pub type Announce = fn(Presence) -> Arc<Payload>;

/// One session.
#[derive(Debug)]
pub struct Session {
    id: Arc<str>,
    /// A `std` mutex: held while pushing to members' queues (which never wait), never across
    /// `.await`. Lock order: the hub's map first, then a session.
    members: Mutex<Vec<Member>>,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn members(&self) -> MutexGuard<'_, Vec<Member>> {
        // Every mutation is one step on the Vec; a poisoned lock still holds a valid list.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The role of `conn` in this session, if it is a member.
    pub fn role_of(&self, conn: ConnId) -> Option<Role> {
        self.members()
            .iter()
            .find(|m| m.conn == conn)
            .map(|m| m.role)
    }

    /// Current presence.
    pub fn presence(&self) -> Presence {
        presence(&self.members())
    }

    /// Queues `payload` for the audience; returns how many receivers accepted it. A receiver
    /// whose queue is full is closed by its queue (slow consumer), never waited for.
    pub fn publish(&self, from: ConnId, payload: &Arc<Payload>, audience: Audience) -> usize {
        let members = self.members();
        let mut delivered = 0;
        for m in members.iter() {
            let wanted = match audience {
                Audience::Followers => m.role == Role::Follower,
                Audience::Others => true,
            };
            if wanted && m.conn != from && m.outbound.send(payload.clone()).is_ok() {
                delivered += 1;
            }
        }
        delivered
    }
}

fn presence(members: &[Member]) -> Presence {
    Presence {
        members: members.len(),
        leaders: members.iter().filter(|m| m.role == Role::Leader).count(),
    }
}

fn announce_to(members: &[Member], announce: Announce) {
    let payload = announce(presence(members));
    for m in members {
        // A member whose queue refuses is closing; its own leave will announce again.
        let _ = m.outbound.send(payload.clone());
    }
}

/// Every session of this node.
#[derive(Debug)]
pub struct Hub {
    /// A `std` mutex over the map: held for a lookup, an insert or a removal only.
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            sessions: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `member` to session `id` (creating it), or updates its role if it is already a
    /// member, then announces the new presence to every member.
    pub fn join(&self, id: &str, member: Member, announce: Announce) -> Arc<Session> {
        let mut sessions = self.sessions();
        let session = match sessions.get(id) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Session {
                    id: Arc::from(id),
                    members: Mutex::new(Vec::new()),
                });
                sessions.insert(s.id.clone(), s.clone());
                self.metrics.sessions.set(sessions.len() as i64);
                s
            }
        };
        let mut members = session.members();
        drop(sessions);
        match members.iter_mut().find(|m| m.conn == member.conn) {
            Some(m) => m.role = member.role,
            None => members.push(member),
        }
        announce_to(&members, announce);
        drop(members);
        session
    }

    /// Removes `conn` from `session`, announces the new presence to the others, and removes
    /// the session once it is empty.
    pub fn leave(&self, session: &Arc<Session>, conn: ConnId, announce: Announce) {
        let empty = {
            let mut members = session.members();
            let before = members.len();
            members.retain(|m| m.conn != conn);
            if members.len() == before {
                return;
            }
            if !members.is_empty() {
                announce_to(&members, announce);
            }
            members.is_empty()
        };
        if empty {
            let mut sessions = self.sessions();
            // Someone may have joined between the two locks: check again under both.
            if session.members().is_empty()
                && sessions
                    .get(&session.id)
                    .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.id);
                self.metrics.sessions.set(sessions.len() as i64);
            }
        }
    }

    /// The session `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions().get(id).cloned()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions().len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(p: Presence) -> Arc<Payload> {
        Payload::text(format!("{}/{}", p.members, p.leaders))
    }

    fn member(role: Role) -> Member {
        Member {
            conn: ConnId::next(),
            role,
            outbound: Outbound::new(1 << 20),
        }
    }

    async fn drain(m: &Member) -> Vec<String> {
        let mut batch = Vec::new();
        m.outbound.next_batch(&mut batch).await;
        batch
            .iter()
            .map(|p| String::from_utf8(p.data().to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn join_announces_to_everyone_and_publish_reaches_followers_only() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let (leader, a, b) = (
            member(Role::Leader),
            member(Role::Follower),
            member(Role::Follower),
        );
        let s = hub.join("s", leader.clone(), announce);
        hub.join("s", a.clone(), announce);
        hub.join("s", b.clone(), announce);
        assert_eq!(drain(&leader).await, ["1/1", "2/1", "3/1"]);
        assert_eq!(drain(&a).await, ["2/1", "3/1"]);
        assert_eq!(
            s.publish(leader.conn, &Payload::text("push"), Audience::Followers),
            2
        );
        assert_eq!(drain(&a).await, ["push"]);
        assert_eq!(drain(&b).await, ["3/1", "push"]);
        hub.leave(&s, leader.conn, announce);
        assert_eq!(drain(&a).await, ["2/0"]);
        hub.leave(&s, a.conn, announce);
        assert_eq!(hub.len(), 1);
        hub.leave(&s, b.conn, announce);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn rejoin_updates_role_without_duplicating() {
        let hub = Hub::new(Arc::new(Metrics::new()));
        let m = member(Role::Follower);
        hub.join("s", m.clone(), announce);
        let s = hub.join(
            "s",
            Member {
                role: Role::Leader,
                ..m.clone()
            },
            announce,
        );
        assert_eq!(
            s.presence(),
            Presence {
                members: 1,
                leaders: 1
            }
        );
        assert_eq!(drain(&m).await, ["1/0", "1/1"]);
    }
}
