//! The peers logged in on this node, each behind its own delivery lock.
//!
//! Owns who is online here and whether their durable queue must go first. Everything that
//! delivers to a peer (a sender, a round of the drain of its queue, a takeover, a logout)
//! holds that peer's lock, so a peer sees its queued messages before any new one and two
//! senders' messages in one order. The lock is held for one decision and one store call,
//! never while waiting for a socket. Slots exist only while a peer is online or someone
//! holds its lock: memory follows the peers online, not every name ever seen.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, Notify, OwnedMutexGuard};

use crate::core::hub::ConnId;
use crate::core::outbound::Outbound;

/// A logged-in connection.
#[derive(Debug, Clone)]
pub struct Online {
    pub conn: ConnId,
    pub outbound: Outbound,
    /// Wakes the connection's drain task: something was queued for it.
    pub wake: Arc<Notify>,
}

/// One peer name's delivery state on this node.
#[derive(Debug, Default)]
pub struct Slot {
    pub online: Option<Online>,
    /// The durable queue may hold messages for the online peer: new messages are queued
    /// behind them (and the drain task woken) instead of written, so nothing overtakes.
    /// Set at login and when a message spills into the queue; cleared by the drain task
    /// when it finds the queue empty, under this lock.
    pub backlog: bool,
    /// Held by a drain for a whole cycle, so the drain of a newer login here waits for the
    /// older connection's batch in flight to be removed before it reads the queue (no
    /// message delivered to both).
    pub drain_gate: Arc<AsyncMutex<()>>,
}

type SlotRef = Arc<AsyncMutex<Slot>>;

/// Every peer name with a slot on this node.
#[derive(Debug, Default)]
pub struct Peers {
    /// A std mutex, held only to find or drop a slot; the slot's own lock is the async one
    /// held across deliveries.
    slots: Mutex<HashMap<Arc<str>, SlotRef>>,
}

/// A held delivery lock on one peer; the slot is forgotten on drop if nobody is online
/// there and nobody else waits for it.
pub struct SlotGuard<'a> {
    peers: &'a Peers,
    name: Arc<str>,
    slot: SlotRef,
    guard: Option<OwnedMutexGuard<Slot>>,
}

impl Peers {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, SlotRef>> {
        // Every mutation under this lock is one map operation: poisoning cannot leave it torn.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `name`'s delivery lock.
    pub async fn lock(&self, name: &str) -> SlotGuard<'_> {
        let (name, slot) = {
            let mut slots = self.slots();
            match slots.get_key_value(name) {
                Some((k, v)) => (k.clone(), v.clone()),
                None => {
                    let k: Arc<str> = name.into();
                    let v = SlotRef::default();
                    slots.insert(k.clone(), v.clone());
                    (k, v)
                }
            }
        };
        let guard = slot.clone().lock_owned().await;
        SlotGuard {
            peers: self,
            name,
            slot,
            guard: Some(guard),
        }
    }
}

impl Peers {
    /// Names with a slot (online here, or being delivered to right now).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.slots().keys().cloned().collect()
    }
}

impl Deref for SlotGuard<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.guard.as_ref().expect("held until drop")
    }
}

impl DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let empty = self.guard.take().is_some_and(|g| g.online.is_none());
        if !empty {
            return;
        }
        let mut slots = self.peers.slots();
        // The map's reference and ours: nobody else holds or waits for this slot, and
        // nobody can get it without the map lock we hold.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_live_while_online() {
        let peers = Peers::default();
        {
            let mut g = peers.lock("A").await;
            g.online = Some(Online {
                conn: ConnId(1),
                outbound: Outbound::new(1024),
                wake: Arc::default(),
            });
        }
        assert_eq!(peers.slots().len(), 1);
        peers.lock("A").await.online = None;
        assert!(peers.slots().is_empty());
        // A lock on a name nobody uses leaves nothing behind either.
        drop(peers.lock("B").await);
        assert!(peers.slots().is_empty());
    }
}
