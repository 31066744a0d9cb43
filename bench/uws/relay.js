// A reference relay of the HunterPie protocol (protocol/hunterpie.md) on native µWebSockets,
// the peer that `bench/run.sh compare` measures supersynk against. It speaks what the bench
// uses: SetName, SetSession (join, leave the previous session), a leader's Push relayed
// byte for byte to the session's followers through µWS's pub/sub (one topic of followers
// and one of members per session), sessionstate to every member after each membership
// change, LeaveSession/Close, the text `ping`. No limits, no compression (the plugin then
// sends plain text), one thread: µWS's own model.
//   node bench/uws/relay.js [--port 5301] [--host 127.0.0.1]
'use strict';

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
// The native build only: the package silently falls back to a JavaScript server otherwise.
const uWS = require(`uWebSockets.js/binaries/uws_${process.platform}_${process.arch}_${process.versions.modules}.node`);

const sessions = new Map(); // id -> { members, leaders }
const decoder = new TextDecoder();

function state(id) {
  const s = sessions.get(id);
  const text = JSON.stringify({ type: 'sessionstate', leaderConnected: s.leaders > 0, playersCount: s.members });
  app.publish(`m:${id}`, text);
}

function leave(ws) {
  const me = ws.getUserData();
  if (me.session === null) return;
  const id = me.session;
  const s = sessions.get(id);
  s.members -= 1;
  if (me.leader) s.leaders -= 1;
  me.session = null;
  if (!me.closed) {
    ws.unsubscribe(`m:${id}`);
    ws.unsubscribe(`f:${id}`);
  }
  if (s.members === 0) sessions.delete(id);
  else state(id);
}

function servermsg(ws, text) {
  ws.send(JSON.stringify({ type: 'servermsg', level: 'warn', text }));
}

const app = uWS.App()
  .get('/version', (res) => res.end('0.1'))
  .get('/healthz', (res) => res.end('ok'))
  .ws('/connect', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    idleTimeout: 120,
    maxBackpressure: 16 * 1024 * 1024,
    upgrade: (res, req, context) => {
      res.upgrade({ name: '', session: null, leader: false, closed: false },
        req.getHeader('sec-websocket-key'), req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'), context);
    },
    message: (ws, message, isBinary) => {
      if (isBinary) return servermsg(ws, 'Binary messages are not supported');
      const text = decoder.decode(message);
      if (text === 'ping') return void ws.send('pong');
      let m;
      try { m = JSON.parse(text); } catch { return servermsg(ws, 'Invalid message'); }
      const me = ws.getUserData();
      switch (String(m.type).toLowerCase()) {
        case 'setname': me.name = String(m.name); break;
        case 'setsession': {
          const id = typeof m.sessionId === 'string' ? m.sessionId : '';
          leave(ws);
          if (id === '') return servermsg(ws, 'Session id cannot be empty!');
          let s = sessions.get(id);
          if (!s) sessions.set(id, (s = { members: 0, leaders: 0 }));
          me.session = id;
          me.leader = m.isLeader === true;
          s.members += 1;
          if (me.leader) s.leaders += 1;
          ws.subscribe(`m:${id}`);
          if (!me.leader) ws.subscribe(`f:${id}`);
          state(id);
          break;
        }
        case 'push':
          if (!me.leader || m.sessionId !== me.session) return servermsg(ws, 'Push refused');
          app.publish(`f:${me.session}`, message, false);
          break;
        case 'leavesession': case 'close':
          leave(ws);
          ws.end(1000);
          break;
        default: servermsg(ws, 'Unknown message type');
      }
    },
    close: (ws) => {
      ws.getUserData().closed = true;
      leave(ws);
    },
  });

const port = Number(arg('--port', 5301));
app.listen(arg('--host', '127.0.0.1'), port, (token) => {
  if (!token) {
    console.error(`uws relay: cannot listen on port ${port}`);
    process.exit(1);
  }
  console.error(`uws relay: listening on port ${port}`);
});
process.on('SIGTERM', () => process.exit(0));
