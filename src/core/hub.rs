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

use crate::core::link::{Forward, Link};
use crate::core::outbound::{Outbound, Payload};
use crate::metrics::Metrics;

/// Identifies one node of a cluster (one per process).
pub type NodeId = u128;

/// What another node reported of its members of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub presence: Presence,
    /// Increases with every report of that node, so a late report never undoes a newer one.
    pub version: u64,
}

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
    /// The name the client gave (for operators), its address, and when it connected
    /// (unix ms).
    pub name: Arc<str>,
    pub addr: std::net::IpAddr,
    pub since: i64,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("session is full: at most {0} members")]
    Full(usize),
}

/// The result of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    pub session: Arc<Session>,
    /// The role granted: a leader without the session's leader key joins as a follower.
    pub role: Role,
    pub leadership_refused: bool,
    /// Whether the session has a leader key (after this join).
    pub protected: bool,
}

/// One member as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberInfo {
    pub conn: u64,
    pub name: String,
    pub leader: bool,
    pub addr: String,
    /// When the member's connection opened, unix ms.
    pub since: i64,
}

/// One session as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub protected: bool,
    pub members: Vec<MemberInfo>,
}

/// What a presence announcement reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    state: Mutex<SessionState>,
    announce: Announce,
    /// Where pushes for members on other nodes go (cluster mode).
    link: Option<Arc<Link>>,
}

#[derive(Debug, Default)]
struct SessionState {
    members: Vec<Member>,
    /// Set by the session's first leader if it presents one; from then on only it makes a
    /// leader. Never set once the session has had a leader without one, so a key cannot be
    /// used to take over a session that a leader without credentials (the plugin) leads.
    leader_key: Option<Box<str>>,
    /// A leader has joined this session on this node (with or without a key).
    led: bool,
    /// Members on other nodes, by node (cluster mode). A node that left keeps an entry with
    /// no members, so that a late report of it cannot bring it back.
    remote: HashMap<NodeId, Remote>,
    /// Nodes whose report predates the backplane's last reconnection and is not confirmed
    /// yet: counted until [`Hub::drop_stale`], so that a Redis restart does not make members
    /// vanish while their nodes reconnect.
    stale: Vec<NodeId>,
    /// False while a clustered session waits for its first view of the other nodes; its
    /// announcements wait too, so that no member is told a count that is about to change.
    synced: bool,
    /// An announcement is owed (one was held while the session was not in sync).
    held: bool,
    /// The presence last announced.
    announced: Option<Presence>,
}

impl SessionState {
    fn local(&self) -> Presence {
        presence(&self.members)
    }

    /// Members on every node.
    fn presence(&self) -> Presence {
        self.remote.values().fold(self.local(), |acc, r| Presence {
            members: acc.members + r.presence.members,
            leaders: acc.leaders + r.presence.leaders,
        })
    }

    /// Sends the session-wide presence to every local member.
    fn announce(&mut self, announce: Announce) {
        if !self.synced {
            self.held = true;
            return;
        }
        self.held = false;
        let now = self.presence();
        self.announced = Some(now);
        let payload = announce(now);
        for m in &self.members {
            // A member whose queue refuses is closing; its own leave will announce again.
            let _ = m.outbound.send(payload.clone());
        }
    }

    /// Announces if the session-wide presence differs from what was last announced, or if
    /// an announcement is owed.
    fn announce_if_changed(&mut self, announce: Announce) {
        if self.held || self.announced != Some(self.presence()) {
            self.announce(announce);
        }
    }
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> MutexGuard<'_, SessionState> {
        // Every mutation is one step; a poisoned lock still holds a valid state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What operators see of this session.
    pub fn info(&self) -> SessionInfo {
        let state = self.state();
        SessionInfo {
            id: self.id.to_string(),
            protected: state.leader_key.is_some(),
            members: state
                .members
                .iter()
                .map(|m| MemberInfo {
                    conn: m.conn.0,
                    name: m.name.to_string(),
                    leader: m.role == Role::Leader,
                    addr: m.addr.to_string(),
                    since: m.since,
                })
                .collect(),
        }
    }

    /// Sends `payload` to every member.
    pub fn broadcast(&self, payload: &Arc<Payload>) -> usize {
        self.state()
            .members
            .iter()
            .filter(|m| m.outbound.send(payload.clone()).is_ok())
            .count()
    }

    /// Current presence, on every node.
    pub fn presence(&self) -> Presence {
        self.state().presence()
    }

    /// Queues `payload` for the audience on this node, and forwards it to other nodes that
    /// have members of that audience; returns how many receivers on this node accepted it.
    /// A receiver whose queue is full is closed by its queue (slow consumer), never waited
    /// for.
    pub fn publish(&self, from: ConnId, payload: &Arc<Payload>, audience: Audience) -> usize {
        let state = self.state();
        if let Some(link) = &self.link {
            let elsewhere = state.remote.values().any(|r| match audience {
                Audience::Followers => r.presence.members > r.presence.leaders,
                Audience::Others => r.presence.members > 0,
            });
            if elsewhere {
                link.forward(Forward {
                    session: self.id.clone(),
                    payload: payload.clone(),
                    audience,
                });
            }
        }
        deliver(&state.members, from, payload, audience)
    }
}

/// Queues `payload` for the members of `audience`, but `from`.
fn deliver(members: &[Member], from: ConnId, payload: &Arc<Payload>, audience: Audience) -> usize {
    let wanted = |m: &&Member| match audience {
        Audience::Followers => m.role == Role::Follower,
        Audience::Others => true,
    };
    members
        .iter()
        .filter(wanted)
        .filter(|m| m.conn != from && m.outbound.send(payload.clone()).is_ok())
        .count()
}

fn presence(members: &[Member]) -> Presence {
    Presence {
        members: members.len(),
        leaders: members.iter().filter(|m| m.role == Role::Leader).count(),
    }
}

/// Every session of this node.
#[derive(Debug)]
pub struct Hub {
    /// A `std` mutex over the map: held for a lookup, an insert or a removal only.
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Every connection of a front-end that registers, for operator broadcasts and kicks.
    /// A `std` mutex held for one map operation.
    connections: Mutex<HashMap<ConnId, Outbound>>,
    max_members: usize,
    metrics: Arc<Metrics>,
    /// The outbox to other nodes, in cluster mode.
    link: Option<Arc<Link>>,
}

impl Hub {
    /// A hub; with a `link`, a node of a cluster.
    pub fn new(metrics: Arc<Metrics>, max_members: usize, link: Option<Arc<Link>>) -> Hub {
        Hub {
            sessions: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            max_members,
            metrics,
            link,
        }
    }

    /// The outbox to other nodes, in cluster mode.
    pub fn link(&self) -> Option<&Arc<Link>> {
        self.link.as_ref()
    }

    fn changed(&self, session: &Session) {
        if let Some(link) = &self.link {
            link.changed(&session.id);
        }
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<ConnId, Outbound>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes a connection reachable by [`Hub::broadcast_all`] and [`Hub::close_connection`].
    pub fn register(&self, conn: ConnId, outbound: Outbound) {
        self.connections().insert(conn, outbound);
    }

    /// Forgets a registered connection.
    pub fn unregister(&self, conn: ConnId) {
        self.connections().remove(&conn);
    }

    /// Sends `payload` to every registered connection; returns how many took it.
    pub fn broadcast_all(&self, payload: &Arc<Payload>) -> usize {
        let all: Vec<Outbound> = self.connections().values().cloned().collect();
        all.iter()
            .filter(|o| o.send(payload.clone()).is_ok())
            .count()
    }

    /// Closes a registered connection; false if there is none with that id.
    pub fn close_connection(&self, conn: ConnId, close: crate::core::outbound::Close) -> bool {
        let outbound = self.connections().get(&conn).cloned();
        outbound.map(|o| o.close(close)).is_some()
    }

    /// What operators see of every session, by id.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self.all().iter().map(|s| s.info()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every session, taken out of the map's lock (session locks are taken after it).
    fn all(&self) -> Vec<Arc<Session>> {
        self.sessions().values().cloned().collect()
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `member` to session `id` (creating it), or updates its role if it is already a
    /// member, then announces the new presence to every member. A leader must present the
    /// session's leader key once one is set (`key`). The key is set by the session's first
    /// leader, if it presents one and no leader is known on any node; a key presented later
    /// is ignored (the session stays unprotected). A leader without the right key joins as
    /// a follower.
    pub fn join(
        &self,
        id: &str,
        mut member: Member,
        key: Option<&str>,
        announce: Announce,
    ) -> Result<Joined, JoinError> {
        let mut sessions = self.sessions();
        let session = match sessions.get(id) {
            Some(s) => s.clone(),
            None => {
                // A clustered session waits for its view of the other nodes before it
                // announces, unless the backplane is down.
                let synced = self.link.as_ref().is_none_or(|l| !l.is_up());
                let s = Arc::new(Session {
                    id: Arc::from(id),
                    state: Mutex::new(SessionState {
                        synced,
                        ..SessionState::default()
                    }),
                    announce,
                    link: self.link.clone(),
                });
                sessions.insert(s.id.clone(), s.clone());
                self.metrics.sessions.set(sessions.len() as i64);
                s
            }
        };
        let mut state = session.state();
        drop(sessions);
        let existing = state.members.iter().position(|m| m.conn == member.conn);
        if existing.is_none() && state.members.len() >= self.max_members {
            drop(state);
            self.remove_if_empty(&session);
            return Err(JoinError::Full(self.max_members));
        }
        let mut leadership_refused = false;
        if member.role == Role::Leader {
            match (&state.leader_key, key) {
                (Some(k), Some(given)) if crate::core::secret_eq(k, given) => {}
                (Some(_), _) => {
                    member.role = Role::Follower;
                    leadership_refused = true;
                }
                (None, Some(given)) if !state.led && state.presence().leaders == 0 => {
                    state.leader_key = Some(given.into());
                }
                (None, _) => {}
            }
            if member.role == Role::Leader {
                state.led = true;
            }
        }
        let protected = state.leader_key.is_some();
        let role = member.role;
        match existing {
            Some(i) => {
                state.members[i].role = role;
                state.members[i].name = member.name;
            }
            None => state.members.push(member),
        }
        state.announce(session.announce);
        drop(state);
        self.changed(&session);
        Ok(Joined {
            session,
            role,
            leadership_refused,
            protected,
        })
    }

    /// Removes `conn` from `session`, announces the new presence to the others, and removes
    /// the session once it has no member on this node.
    pub fn leave(&self, session: &Arc<Session>, conn: ConnId) {
        {
            let mut state = session.state();
            let before = state.members.len();
            state.members.retain(|m| m.conn != conn);
            if state.members.len() == before {
                return;
            }
            state.announce(session.announce);
            if !state.members.is_empty() {
                drop(state);
                self.changed(session);
                return;
            }
        }
        self.remove_if_empty(session);
        self.changed(session);
    }

    fn remove_if_empty(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions();
        // Someone may have joined between the two locks: check again under both.
        if session.state().members.is_empty()
            && sessions
                .get(&session.id)
                .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.id);
            self.metrics.sessions.set(sessions.len() as i64);
        }
    }

    /// The session `id`, if it exists.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions().get(id).cloned()
    }

    /// The ids of every session.
    pub fn ids(&self) -> Vec<Arc<str>> {
        self.sessions().keys().cloned().collect()
    }

    /// The members of session `id` on this node (none if there is no such session).
    pub fn local_presence(&self, id: &str) -> Presence {
        self.get(id).map(|s| s.state().local()).unwrap_or_default()
    }

    /// Delivers a payload that a member on another node published; returns how many
    /// receivers on this node took it.
    pub fn deliver_remote(&self, id: &str, payload: &Arc<Payload>, audience: Audience) -> usize {
        self.get(id).map_or(0, |s| {
            deliver(&s.state().members, ConnId(0), payload, audience)
        })
    }

    /// Records another node's report on session `id`, and announces the new presence if
    /// it changed. A report older than the one held is ignored.
    pub fn update_remote(&self, id: &str, node: NodeId, remote: Remote) {
        if let Some(s) = self.get(id) {
            let mut state = s.state();
            if state
                .remote
                .get(&node)
                .is_none_or(|r| r.version < remote.version)
            {
                state.remote.insert(node, remote);
                state.stale.retain(|n| *n != node);
                state.announce_if_changed(s.announce);
            }
        }
    }

    /// Whether session `id` waits for its first view of the other nodes.
    pub fn is_unsynced(&self, id: &str) -> bool {
        self.get(id).is_some_and(|s| !s.state().synced)
    }

    /// Holds session `id`'s announcements until [`Hub::sync_remote`] (the backplane is
    /// about to read the other nodes' reports afresh), and marks what it knew of them as
    /// stale.
    pub fn unsync(&self, id: &str) {
        if let Some(s) = self.get(id) {
            let mut state = s.state();
            state.stale = state.remote.keys().copied().collect();
            state.synced = false;
        }
    }

    /// Forgets the reports of session `id` that no node confirmed since [`Hub::unsync`].
    pub fn drop_stale(&self, id: &str) {
        if let Some(s) = self.get(id) {
            let mut state = s.state();
            for node in std::mem::take(&mut state.stale) {
                state.remote.remove(&node);
            }
            state.announce_if_changed(s.announce);
        }
    }

    /// Merges a full read of the other nodes' reports on session `id` (newer reports that
    /// arrived meanwhile win), and announces: the session is in sync.
    pub fn sync_remote(&self, id: &str, reports: &[(NodeId, Remote)]) {
        if let Some(s) = self.get(id) {
            let mut state = s.state();
            for (node, remote) in reports {
                if state
                    .remote
                    .get(node)
                    .is_none_or(|r| r.version < remote.version)
                {
                    state.remote.insert(*node, *remote);
                }
                state.stale.retain(|n| n != node);
            }
            state.synced = true;
            state.announce_if_changed(s.announce);
        }
    }

    /// Forgets a node that is gone from every session, announcing where that changes the
    /// presence.
    pub fn node_gone(&self, node: NodeId) {
        for s in self.all() {
            let mut state = s.state();
            state.stale.retain(|n| *n != node);
            if state.remote.remove(&node).is_some() {
                state.announce_if_changed(s.announce);
            }
        }
    }

    /// Releases every held announcement with the presence known now (the backplane is down
    /// and cannot complete a sync).
    pub fn sync_all_local(&self) {
        for s in self.all() {
            let mut state = s.state();
            state.synced = true;
            state.announce_if_changed(s.announce);
        }
    }

    /// Members of every session on this node.
    pub fn local_members(&self) -> usize {
        self.all().iter().map(|s| s.state().members.len()).sum()
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
            name: Arc::from("n"),
            addr: [127, 0, 0, 1].into(),
            since: 0,
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
        let hub = Hub::new(Arc::new(Metrics::new()), 16, None);
        let (leader, a, b) = (
            member(Role::Leader),
            member(Role::Follower),
            member(Role::Follower),
        );
        let s = hub
            .join("s", leader.clone(), None, announce)
            .unwrap()
            .session;
        hub.join("s", a.clone(), None, announce).unwrap();
        hub.join("s", b.clone(), None, announce).unwrap();
        assert_eq!(drain(&leader).await, ["1/1", "2/1", "3/1"]);
        assert_eq!(drain(&a).await, ["2/1", "3/1"]);
        assert_eq!(
            s.publish(leader.conn, &Payload::text("push"), Audience::Followers),
            2
        );
        assert_eq!(drain(&a).await, ["push"]);
        assert_eq!(drain(&b).await, ["3/1", "push"]);
        hub.leave(&s, leader.conn);
        assert_eq!(drain(&a).await, ["2/0"]);
        hub.leave(&s, a.conn);
        assert_eq!(hub.len(), 1);
        hub.leave(&s, b.conn);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn rejoin_updates_role_without_duplicating() {
        let hub = Hub::new(Arc::new(Metrics::new()), 16, None);
        let m = member(Role::Follower);
        hub.join("s", m.clone(), None, announce).unwrap();
        let leader = Member {
            role: Role::Leader,
            ..m.clone()
        };
        let s = hub.join("s", leader, None, announce).unwrap().session;
        assert_eq!(
            s.presence(),
            Presence {
                members: 1,
                leaders: 1
            }
        );
        assert_eq!(drain(&m).await, ["1/0", "1/1"]);
    }

    #[tokio::test]
    async fn leader_key_and_member_cap() {
        let hub = Hub::new(Arc::new(Metrics::new()), 3, None);
        let first = hub
            .join("p", member(Role::Leader), Some("k1"), announce)
            .unwrap();
        assert_eq!(
            (first.role, first.leadership_refused),
            (Role::Leader, false)
        );
        let thief = hub.join("p", member(Role::Leader), None, announce).unwrap();
        assert_eq!(
            (thief.role, thief.leadership_refused),
            (Role::Follower, true)
        );
        let wrong = hub.join("p", member(Role::Leader), Some("k2"), announce);
        assert!(wrong.unwrap().leadership_refused);
        assert_eq!(
            hub.join("p", member(Role::Follower), None, announce)
                .unwrap_err(),
            JoinError::Full(3)
        );
        assert_eq!(
            first.session.presence(),
            Presence {
                members: 3,
                leaders: 1
            }
        );
        let unprotected = hub.join("q", member(Role::Leader), None, announce).unwrap();
        assert!(!unprotected.session.info().protected);
        // A key presented once the session had a leader without one protects nothing.
        let late = hub
            .join("q", member(Role::Leader), Some("k3"), announce)
            .unwrap();
        assert_eq!((late.role, late.protected), (Role::Leader, false));
        let plain = hub.join("q", member(Role::Leader), None, announce).unwrap();
        assert_eq!(
            (plain.role, plain.leadership_refused),
            (Role::Leader, false)
        );
        // Nor does one presented after a keyless leader has left.
        let r = hub
            .join("r", member(Role::Follower), None, announce)
            .unwrap();
        let keyless = member(Role::Leader);
        hub.join("r", keyless.clone(), None, announce).unwrap();
        hub.leave(&r.session, keyless.conn);
        let after = hub
            .join("r", member(Role::Leader), Some("k4"), announce)
            .unwrap();
        assert!(!after.protected);
    }

    #[tokio::test]
    async fn clustered_presence_waits_for_sync_then_follows_remote_reports() {
        let link = Arc::new(Link::new(1 << 20, Arc::new(Metrics::new())));
        link.set_up(true);
        let hub = Hub::new(Arc::new(Metrics::new()), 16, Some(link.clone()));
        let f = member(Role::Follower);
        let s = hub.join("s", f.clone(), None, announce).unwrap().session;
        let report = |members, leaders, version| Remote {
            presence: Presence { members, leaders },
            version,
        };
        // Held until the backplane's first read of the other nodes.
        hub.update_remote("s", 7, report(1, 1, 5));
        hub.sync_remote("s", &[(7, report(1, 1, 4)), (8, report(2, 0, 1))]);
        assert_eq!(drain(&f).await, ["4/1"], "the newer report of node 7 wins");
        // Pushes reach the link only while other nodes have members of the audience.
        s.publish(ConnId(0), &Payload::text("p"), Audience::Followers);
        assert_eq!(link.next(10).await.forwards.len(), 1);
        hub.update_remote("s", 8, report(0, 0, 2));
        hub.update_remote("s", 8, report(2, 0, 1));
        assert_eq!(
            drain(&f).await,
            ["p", "2/1"],
            "a stale report changes nothing"
        );
        hub.node_gone(7);
        assert_eq!(drain(&f).await, ["1/0"]);
        s.publish(ConnId(0), &Payload::text("p"), Audience::Followers);
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(50), link.next(10));
        assert!(
            nothing.await.is_err(),
            "no member elsewhere: nothing forwarded"
        );
        assert_eq!(
            hub.deliver_remote("s", &Payload::text("r"), Audience::Followers),
            1
        );
        assert_eq!(drain(&f).await, ["p", "r"]);
    }
}
