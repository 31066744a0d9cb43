// Direct messages: delivery rate to an online peer, queueing rate to an offline one (each
// message committed with an fsync before its answer), and the drain at login.
//   node bench/messages.mjs ws://127.0.0.1:5001/messages [N] [K]
// K senders queue at once in the last phase (default 16). Start the server with a raised rate
// limit (--messages-per-second 1000000 --message-burst 1000000 --messages-queue-limit 100000):
// the online phase sends as fast as it can. Uses the ws package of clients/ts (npm ci there
// first).
import WebSocket from '../clients/ts/node_modules/ws/wrapper.mjs';

const url = process.argv[2] ?? 'ws://127.0.0.1:5001/messages';
const n = Number(process.argv[3] ?? 20000);
const k = Number(process.argv[4] ?? 16);
const run = Date.now().toString(36);
const [A, B] = ['A' + run, 'B' + run];

const open = (name) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.on('open', () => { ws.send(JSON.stringify({ login: name })); resolve(ws); });
  ws.on('error', reject);
});
const settle = () => new Promise((r) => setTimeout(r, 300));
const rate = (count, ms) => `${Math.round(count / (ms / 1000)).toLocaleString('en')}/s`;

// Online: A sends n messages as fast as it can; B counts them.
let a = await open(A);
let b = await open(B);
await settle();
let got = 0;
let t0 = Date.now();
const allIn = new Promise((resolve) => b.on('message', () => { if (++got === n) resolve(); }));
for (let i = 0; i < n; i++) a.send(JSON.stringify({ from: A, to: B, msg: `m${i}` }));
await allIn;
const online = Date.now() - t0;

// Offline: B leaves; A sends m messages one after another, each waiting for its answer.
const m = Math.min(n, 2000);
b.close();
await settle();
let answered = 0;
t0 = Date.now();
await new Promise((resolve) => {
  a.on('message', () => {
    if (++answered === m) resolve();
    else a.send(JSON.stringify({ from: A, to: B, msg: `q${answered}` }));
  });
  a.send(JSON.stringify({ from: A, to: B, msg: 'q0' }));
});
const queued = Date.now() - t0;

// Login: B gets the m queued messages.
got = 0;
t0 = Date.now();
b = new WebSocket(url);
await new Promise((resolve) => {
  b.on('open', () => b.send(JSON.stringify({ login: B })));
  b.on('message', () => { if (++got === m) resolve(); });
});
const drained = Date.now() - t0;

// Offline again: K senders at once, each sending m/K messages one after another, to B and
// (the second time) each to an offline peer of its own.
b.close();
const others = await Promise.all([...Array(k).keys()].map((i) => open(`R${i}${run}`)));
await settle();
for (const o of others) o.close();
const senders = await Promise.all([...Array(k).keys()].map((i) => open(`S${i}${run}`)));
await settle();
const each = Math.ceil(m / k);
const queueAll = (to) => Promise.all(senders.map((s, i) => new Promise((resolve) => {
  let done = 0;
  const from = `S${i}${run}`;
  const send = () => s.send(JSON.stringify({ from, to: to(i), msg: `c${done}` }));
  s.removeAllListeners('message');
  s.on('message', () => { if (++done === each) resolve(); else send(); });
  send();
})));
t0 = Date.now();
await queueAll(() => B);
const concurrent = Date.now() - t0;
t0 = Date.now();
await queueAll((i) => `R${i}${run}`);
const spread = Date.now() - t0;
a.close();
for (const s of senders) s.close();

console.log(`online delivery:  ${n} messages in ${online} ms (${rate(n, online)})`);
console.log(`queued (offline): ${m} messages one at a time in ${queued} ms (${rate(m, queued)}; ${(queued / m).toFixed(2)} ms each, fsync included)`);
console.log(`drain at login:   ${m} messages in ${drained} ms (${rate(m, drained)})`);
console.log(`queued by ${k} senders at once, to one peer: ${each * k} messages in ${concurrent} ms (${rate(each * k, concurrent)})`);
console.log(`queued by ${k} senders at once, to ${k} peers: ${each * k} messages in ${spread} ms (${rate(each * k, spread)})`);
