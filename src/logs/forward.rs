//! The server's own log events in the log stream: a `tracing_subscriber` [`Layer`] that
//! turns each event into an entry with `user: "server"` for every running server of the
//! process.
//!
//! Owns the process-wide list of servers to forward to (weak handles, registered by
//! [`super::Logs::start`]) and the event-to-entry formatting. The binary installs the layer
//! (`--logs-server-level`, default `info`); a program that embeds the library installs
//! [`forward_layer`] itself, or server events simply stay out of the stream.
//!
//! Loops are impossible by construction: events of this front-end's own modules
//! (`supersynk::logs::*`, e.g. the store's warnings) are never forwarded, and a
//! thread-local guard drops any event raised while forwarding.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::{Mutex, Weak};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use super::LogsInner;
use super::entry::{Posted, now_ms};
use super::stream::clock;

/// Servers of this process whose streams get the server's events.
static SINKS: Mutex<Vec<Weak<LogsInner>>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while an event is being forwarded on this thread.
    static FORWARDING: Cell<bool> = const { Cell::new(false) };
}

/// Adds a server's stream to the forwarding list (dead ones are dropped on the way).
pub(super) fn register(sink: Weak<LogsInner>) {
    let mut sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
    sinks.retain(|s| s.strong_count() > 0);
    sinks.push(sink);
}

/// The layer that forwards events to every registered server's log stream. Filter it
/// (e.g. `.with_filter(LevelFilter::INFO)`) to choose the levels.
pub fn forward_layer() -> ForwardLayer {
    ForwardLayer { _private: () }
}

/// See [`forward_layer`].
#[derive(Debug)]
pub struct ForwardLayer {
    _private: (),
}

impl<S: Subscriber> Layer<S> for ForwardLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let target = event.metadata().target();
        if target.starts_with("supersynk::logs") || FORWARDING.with(|f| f.get()) {
            return;
        }
        let sinks: Vec<_> = {
            let sinks = SINKS.lock().unwrap_or_else(|p| p.into_inner());
            sinks.iter().filter_map(Weak::upgrade).collect()
        };
        if sinks.is_empty() {
            return;
        }
        FORWARDING.with(|f| f.set(true));
        let posted = to_posted(event);
        for sink in sinks {
            sink.publish_own(vec![posted.clone()]);
        }
        FORWARDING.with(|f| f.set(false));
    }
}

/// The plugin's level names.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "Error",
        Level::WARN => "Warn",
        Level::INFO => "Info",
        Level::DEBUG => "Debug",
        Level::TRACE => "Trace",
    }
}

/// `msg` is the event's message followed by its fields (`key=value`), like the text log.
fn to_posted(event: &Event<'_>) -> Posted {
    struct Fields {
        message: String,
        rest: String,
    }
    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message.push_str(value);
            } else {
                let _ = write!(self.rest, " {}={}", field.name(), value);
            }
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            // Writing into a String cannot fail.
            if field.name() == "message" {
                let _ = write!(self.message, "{value:?}");
            } else {
                let _ = write!(self.rest, " {}={:?}", field.name(), value);
            }
        }
    }
    let mut fields = Fields {
        message: String::new(),
        rest: String::new(),
    };
    event.record(&mut fields);
    let level = level_name(event.metadata().level());
    let msg = format!("{}{}", fields.message, fields.rest);
    let now = now_ms();
    Posted {
        client_time: Some(now),
        level: Some(level.into()),
        text: Some(format!("{} [{level}] {msg}", clock(now))),
        msg: Some(msg),
        user: Some("server".into()),
        room: None,
        from_server: true,
    }
}
