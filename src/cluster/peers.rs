//! Questions to every other node of the cluster, and their answers: a request/reply over
//! the cluster's Redis connection (for the admin API, which must see every node).
//!
//! Owns this node's id and name, the request and reply channels and the waiting for
//! answers; what a question means is the asker's (the body is opaque JSON, answered by the
//! function given to [`Peers::new`]). Names, under `--redis-prefix`:
//! - every node subscribes to the channel `ask`; a question published there is
//!   `{"from": node, "reply": channel, "body": ...}`;
//! - each question has a reply channel of its own, `reply:{asking node}:{question id}`,
//!   matched by the asking node's one pattern subscription `reply:{node}:*`; an answer is
//!   `{"node": id, "name": name, "body": ...}`;
//! - the nodes asked are those of the set `nodes` whose key `node:{id}` (which holds the
//!   node's name) has not expired. A node that does not answer within the answer time (a
//!   third of `--node-timeout-ms`, at most 3 s) is named as missing.
//!
//! The Redis connections are the epoch's ([`super::run`]): it hands the command connection
//! here while it is up ([`Peers::set_connection`]) and its subscriber task passes on what
//! arrives on the two channels ([`Peers::on_question`], [`Peers::on_answer`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

use super::wire::node_text;
use crate::core::hub::NodeId;
use crate::server::App;

/// What a node answers to a question's body.
pub type Answerer = fn(&App, &Value) -> Value;

/// One node's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The node's name.
    pub name: String,
    pub body: Value,
}

/// The answers to one question.
#[derive(Debug, Default)]
pub struct Answers {
    /// Those of the nodes that answered in time (not this one), by name.
    pub answers: Vec<Answer>,
    /// The names of the nodes asked that did not answer in time.
    pub missing: Vec<String>,
    /// False when Redis was unreachable: nobody was asked, and who exists is unknown.
    pub reached: bool,
}

/// This node's side of the request/reply: a cheap-to-clone handle.
#[derive(Clone, Debug)]
pub struct Peers(Arc<Inner>);

struct Inner {
    node: NodeId,
    node_text: String,
    name: String,
    prefix: String,
    /// How long an asker waits for the answers.
    answer_time: Duration,
    answerer: Answerer,
    /// The epoch's command connection while Redis is up (a clone: the connection is
    /// multiplexed). A std mutex, held only to clone or replace it, never across `.await`.
    cmd: Mutex<Option<MultiplexedConnection>>,
    /// The questions waiting for answers, by question id, each with the sender of its
    /// asker's unbounded channel (answers are few: one per node). A std mutex, never held
    /// across `.await`.
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Answer>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("node", &self.node_text)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Removes a question from the pending ones however its asker ends.
struct PendingGuard<'a> {
    peers: &'a Inner,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.peers.pending).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `text` with the glob characters of a Redis pattern escaped.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Peers {
    /// A node named `name` (unique in the cluster) in the cluster under `prefix`, with the
    /// cluster's `node_timeout`; `answerer` answers the other nodes' questions.
    pub fn new(prefix: &str, name: String, node_timeout: Duration, answerer: Answerer) -> Peers {
        let node: NodeId = uuid::Uuid::new_v4().as_u128();
        Peers(Arc::new(Inner {
            node,
            node_text: node_text(node),
            name,
            prefix: prefix.to_string(),
            answer_time: answer_time(node_timeout),
            answerer,
            cmd: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        }))
    }

    /// This node's id in the cluster.
    pub fn node(&self) -> NodeId {
        self.0.node
    }

    /// This node's name, as its answers give it.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The channel every node subscribes to for questions.
    pub fn ask_channel(&self) -> String {
        format!("{}ask", self.0.prefix)
    }

    fn reply_prefix(&self) -> String {
        format!("{}reply:{}:", self.0.prefix, self.0.node_text)
    }

    /// The pattern of this node's reply channels.
    pub fn reply_pattern(&self) -> String {
        format!("{}*", glob_escape(&self.reply_prefix()))
    }

    /// Set by the epoch as it connects (Some) and loses its connection (None).
    pub fn set_connection(&self, cmd: Option<MultiplexedConnection>) {
        *lock(&self.0.cmd) = cmd;
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        lock(&self.0.cmd).clone()
    }

    /// Asks every other live node `body`; waits for their answers for at most the answer
    /// time.
    pub async fn ask(&self, body: Value) -> Answers {
        let Some(mut cmd) = self.connection() else {
            return Answers::default();
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.0.pending).insert(id.clone(), tx);
        let _pending = PendingGuard {
            peers: &self.0,
            id: id.clone(),
        };
        let deadline = tokio::time::Instant::now() + self.0.answer_time;
        let asked = tokio::time::timeout_at(deadline, async {
            let nodes: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{}nodes", self.0.prefix))
                .query_async(&mut cmd)
                .await?;
            let others: Vec<String> = nodes
                .into_iter()
                .filter(|n| *n != self.0.node_text)
                .collect();
            if others.is_empty() {
                return Ok(HashMap::new());
            }
            let keys: Vec<String> = others
                .iter()
                .map(|n| format!("{}node:{n}", self.0.prefix))
                .collect();
            let names: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut cmd).await?;
            // Nodes whose key expired are dead (and about to be removed): not asked.
            let expected: HashMap<String, String> = others
                .into_iter()
                .zip(names)
                .filter_map(|(node, name)| Some((name?, node)))
                .collect();
            if !expected.is_empty() {
                let question = json!({
                    "from": self.0.node_text,
                    "reply": format!("{}{id}", self.reply_prefix()),
                    "body": body,
                });
                redis::cmd("PUBLISH")
                    .arg(self.ask_channel())
                    .arg(question.to_string())
                    .query_async::<()>(&mut cmd)
                    .await?;
            }
            Ok::<_, redis::RedisError>(expected)
        })
        .await;
        let mut expected = match asked {
            Ok(Ok(expected)) => expected,
            Ok(Err(e)) => {
                debug!(error = %e, "asking the other nodes failed");
                return Answers::default();
            }
            Err(_) => return Answers::default(),
        };
        let mut answers = Vec::new();
        while !expected.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(answer)) => {
                    if expected.remove(&answer.name).is_some() {
                        answers.push(answer);
                    }
                }
                // The sender lives in `pending` until the guard drops: only the deadline ends
                // this wait.
                Ok(None) | Err(_) => break,
            }
        }
        let mut missing: Vec<String> = expected.into_keys().collect();
        missing.sort();
        answers.sort_by(|a, b| a.name.cmp(&b.name));
        Answers {
            answers,
            missing,
            reached: true,
        }
    }

    /// A question from another node, as published on the ask channel: answers it on its
    /// reply channel (in a task of its own, so that the subscriber goes on at once).
    pub fn on_question(&self, app: &App, payload: &[u8]) {
        let Ok(question) = serde_json::from_slice::<Value>(payload) else {
            debug!("malformed question ignored");
            return;
        };
        let (Some(from), Some(reply)) = (question["from"].as_str(), question["reply"].as_str())
        else {
            debug!("malformed question ignored");
            return;
        };
        // Redis is shared: answer only on a reply channel of this cluster's.
        if from == self.0.node_text
            || !reply.starts_with(&format!("{}reply:{from}:", self.0.prefix))
        {
            return;
        }
        let Some(mut cmd) = self.connection() else {
            return;
        };
        let body = (self.0.answerer)(app, &question["body"]);
        let answer = json!({ "node": self.0.node_text, "name": self.0.name, "body": body });
        let reply = reply.to_string();
        let limit = self.0.answer_time;
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                limit,
                redis::cmd("PUBLISH")
                    .arg(&reply)
                    .arg(answer.to_string())
                    .query_async::<()>(&mut cmd),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!("an answer to another node could not be sent");
            }
        });
    }

    /// An answer to one of this node's questions, as published on `channel`.
    pub fn on_answer(&self, channel: &str, payload: &[u8]) {
        let Some(id) = channel.strip_prefix(&self.reply_prefix()) else {
            return;
        };
        let Ok(answer) = serde_json::from_slice::<Value>(payload) else {
            debug!("malformed answer ignored");
            return;
        };
        let Some(name) = answer["name"].as_str() else {
            debug!("malformed answer ignored");
            return;
        };
        let answer = Answer {
            name: name.to_string(),
            body: answer["body"].clone(),
        };
        if let Some(tx) = lock(&self.0.pending).get(id) {
            // The asker may have stopped waiting (its deadline passed) a moment ago.
            let _ = tx.send(answer);
        }
    }
}

/// How long one answer from Redis, or from the other nodes, may take: a third of the node
/// timeout, at most 3 s.
pub fn answer_time(node_timeout: Duration) -> Duration {
    (node_timeout / 3).min(Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_escape_the_prefix() {
        assert_eq!(glob_escape("a*b?[c]\\d:"), "a\\*b\\?\\[c\\]\\\\d:");
        assert_eq!(answer_time(Duration::from_secs(10)), Duration::from_secs(3));
        assert_eq!(
            answer_time(Duration::from_millis(1500)),
            Duration::from_millis(500)
        );
    }
}
