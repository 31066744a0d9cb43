// The TypeScript client against the real server (started here, with its default limits:
// rate 200 frames/s, bursts of 400, 64 KiB messages), directly and through a proxy that drops
// and delays messages and cuts connections.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";

import { createServer } from "node:net";

import { connect, connectNode, ConnectError, NodeWebSocket, ProtocolError, ReliableClient, importKey } from "../dist/node.js";
import { startServer, startProxy, until, metric, rateLimited } from "./helpers.mjs";

let server;
before(async () => {
  server = await startServer([
    "--reliable-heartbeat-ms", "300",
    "--reliable-resend-ms", "150",
    "--reliable-request-timeout-ms", "30000",
  ]);
});
after(async () => {
  await server?.stop();
});

const fast = { resendMs: 150, backoffMs: 20, maxBackoffMs: 200, helloTimeoutMs: 1000 };

test("rooms, presence, request/response and timeouts", async () => {
  const a = await connectNode({ url: server.url, ...fast });
  const b = await connectNode({ url: server.url, ...fast });
  try {
    await a.join("lobby");
    const joined = b.once("join");
    const heardJoin = a.once("join");
    await b.join("lobby");
    assert.deepEqual(await joined, { room: "lobby", clientId: b.clientId });
    assert.deepEqual(await heardJoin, { room: "lobby", clientId: b.clientId });
    assert.deepEqual(await a.presence("lobby"), [a.clientId, b.clientId]);

    const got = a.once("message");
    await b.publish("lobby", { text: "hi" });
    assert.deepEqual(await got, { room: "lobby", from: b.clientId, data: { text: "hi" } });

    b.onRequest(async ({ from, data }) => ({ echo: data, from }));
    assert.deepEqual(await a.request(b.clientId, 42), { echo: 42, from: a.clientId });

    b.onRequest(() => new Promise(() => {})); // never answers
    await assert.rejects(a.request(b.clientId, 1, { timeoutMs: 200 }), (e) => {
      assert.ok(e instanceof ProtocolError);
      assert.equal(e.code, "timeout");
      return true;
    });
    await assert.rejects(a.request("nobody", 1), (e) => e.code === "unknown_client");

    const left = a.once("leave");
    await b.leave("lobby");
    assert.deepEqual(await left, { room: "lobby", clientId: b.clientId });
  } finally {
    a.close();
    b.close();
  }
});

test("end-to-end encryption: members read the payload, the server and outsiders do not", async () => {
  const a = await connectNode({ url: server.url, ...fast, e2eKey: "shared secret" });
  const b = await connectNode({ url: server.url, ...fast, e2eKey: await importKey("shared secret") });
  // A raw protocol client in the same room sees what the server relays.
  const raw = new WebSocket(server.url);
  const frames = [];
  raw.on("message", (d) => frames.push(JSON.parse(d.toString())));
  await new Promise((r) => raw.once("open", r));
  raw.send(JSON.stringify({ t: "hello" }));
  raw.send(JSON.stringify({ t: "msg", seq: 1, op: "join", room: "secret" }));
  try {
    await until(() => frames.some((f) => f.t === "ack"), 5000, "raw join");
    await a.join("secret");
    await b.join("secret");
    const got = b.once("message");
    await a.publish("secret", { card: "ace of spades" });
    assert.deepEqual((await got).data, { card: "ace of spades" });
    await until(() => frames.some((f) => f.t === "msg" && f.data !== undefined), 5000, "relayed frame");
    const relayed = frames.find((f) => f.t === "msg" && f.data !== undefined);
    assert.equal(relayed.data.enc, "A256GCM");
    assert.ok(!JSON.stringify(relayed).includes("spades"), JSON.stringify(relayed));
  } finally {
    raw.terminate();
    a.close();
    b.close();
  }
});

test("a client resumes after its connection is cut and misses nothing", async () => {
  const proxy = await startProxy(server.url);
  const a = await connectNode({ url: server.url, ...fast });
  const b = await connectNode({ url: proxy.url, ...fast });
  try {
    await b.join("r");
    await a.join("r");
    const got = [];
    b.on("message", (m) => got.push(m.data));
    const id = b.clientId;
    const reopened = b.once("open");
    await proxy.close(); // cuts B; B reconnects to nowhere until the proxy is back
    for (let i = 1; i <= 20; i++) a.publish("r", i);
    const proxy2 = await startProxy(server.url);
    // B's client retries the old URL: point it at the new proxy the way an app would.
    b["opts"].url = proxy2.url;
    const { resumed, clientId } = await reopened;
    assert.equal(resumed, true);
    assert.equal(clientId, id);
    await until(() => got.length >= 20, 5000, "20 messages");
    assert.deepEqual(got, Array.from({ length: 20 }, (_, i) => i + 1));
    await proxy2.close();
  } finally {
    a.close();
    b.close();
  }
});

test("through a lossy, slow, cutting proxy every message arrives exactly once and in order", { timeout: 90000 }, async () => {
  const proxy = await startProxy(server.url, { dropRate: 0.1, maxDelayMs: 15, cutEveryMs: 400 });
  const opts = { url: proxy.url, ...fast };
  const a = await connectNode(opts);
  const b = await connectNode(opts);
  const resets = [];
  a.on("reset", (r) => resets.push(r));
  b.on("reset", (r) => resets.push(r));
  const N = 300;
  try {
    await b.join("chaos");
    await a.join("chaos");
    const atA = [];
    const atB = [];
    a.on("message", (m) => m.from === b.clientId && atA.push(m.data.n));
    b.on("message", (m) => m.from === a.clientId && atB.push(m.data.n));
    b.onRequest(({ data }) => data * 2);
    const sends = [];
    const answers = [];
    for (let n = 1; n <= N; n++) {
      sends.push(a.publish("chaos", { n }));
      sends.push(b.publish("chaos", { n }));
      if (n % 15 === 0) answers.push(a.request(b.clientId, n, { timeoutMs: 30000 }).then((v) => [n, v], (e) => [n, e.code]));
    }
    await Promise.all(sends);
    await until(() => atA.length >= N && atB.length >= N, 60000, `all messages (A ${atA.length}, B ${atB.length})`);
    const expected = Array.from({ length: N }, (_, i) => i + 1);
    assert.deepEqual(atB, expected, "A to B: exactly once, in order");
    assert.deepEqual(atA, expected, "B to A: exactly once, in order");
    const results = await Promise.all(answers);
    // A request may time out if its response was cut off for longer than the timeout, but
    // it never gets a wrong answer.
    for (const [n, v] of results) assert.ok(v === n * 2 || v === "timeout", `request ${n}: ${v}`);
    assert.ok(results.filter(([n, v]) => v === n * 2).length > 0, "some requests answered");
    assert.deepEqual(resets, []);
    assert.equal(await rateLimited(server.addr), 0, "no connection closed for its rate");
    assert.ok(proxy.stats.dropped > 20, `dropped ${proxy.stats.dropped}`);
    assert.ok(proxy.stats.cuts > 0, `cuts ${proxy.stats.cuts}`);
    console.log(`proxy: ${JSON.stringify(proxy.stats)}`);
  } finally {
    a.close();
    b.close();
    await proxy.close();
  }
});

test("a resume after the window is reported as a reset and the client starts over", async () => {
  const short = await startServer(["--reliable-resume-window-ms", "100", "--reliable-heartbeat-ms", "300"]);
  let proxy = await startProxy(short.url);
  const b = await connectNode({ url: proxy.url, ...fast, backoffMs: 300, maxBackoffMs: 300 });
  try {
    await b.join("r");
    const old = b.clientId;
    const reset = b.once("reset");
    await proxy.close();
    proxy = await startProxy(short.url);
    b["opts"].url = proxy.url;
    const r = await reset;
    assert.equal(r.previousId, old);
    assert.notEqual(r.clientId, old);
    // Rooms are rejoined under the new id.
    await until(() => b.pending === 0, 5000, "rejoin acked");
    assert.deepEqual(await b.presence("r"), [b.clientId]);
  } finally {
    b.close();
    await proxy.close();
    await short.stop();
  }
});

/** Resolves once `f()` resolves to something `ok` accepts, polling every 20 ms. */
async function eventually(f, ok, ms = 10000, what = "condition") {
  const started = Date.now();
  for (;;) {
    const v = await f();
    if (ok(v)) return v;
    if (Date.now() - started > ms) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("a message larger than the server accepts is refused at once and never sent", async () => {
  // Accepted before the welcome (the limit is not known yet): refused when it comes.
  const early = new ReliableClient({ WebSocket: NodeWebSocket, url: server.url, ...fast });
  const a = await connectNode({ url: server.url, ...fast });
  const b = await connectNode({ url: server.url, ...fast });
  try {
    await assert.rejects(early.publish("big", "x".repeat(70000)), (e) => e.code === "too_big" && !e.outcomeUnknown);
    await a.join("big");
    await b.join("big");
    const states = [];
    a.on("state", (s) => states.push(s));
    const got = b.once("message");
    // 64 KiB is the server's default maximum: the JSON frame of this one is above it.
    await assert.rejects(a.publish("big", "é".repeat(33000)), (e) => {
      assert.equal(e.code, "too_big");
      return true;
    });
    assert.equal(a.pending, 0, "not queued for resending");
    await a.publish("big", "after");
    assert.equal((await got).data, "after");
    assert.deepEqual(states, [], "the connection never closed");
  } finally {
    early.close();
    a.close();
    b.close();
  }
});

test("a burst of publishes keeps to the server's rate and loses nothing", { timeout: 30000 }, async () => {
  const a = await connectNode({ url: server.url, ...fast });
  const b = await connectNode({ url: server.url, ...fast });
  const before = await rateLimited(server.addr);
  try {
    await b.join("burst");
    await a.join("burst");
    const got = [];
    b.on("message", (m) => got.push(m.data));
    const states = [];
    a.on("state", (s) => states.push(s));
    const N = 1000; // the default maxPending, over twice the server's burst of 400
    const started = Date.now();
    await Promise.all(Array.from({ length: N }, (_, i) => a.publish("burst", i)));
    await until(() => got.length >= N, 20000, `${N} messages (got ${got.length})`);
    assert.deepEqual(got, Array.from({ length: N }, (_, i) => i));
    assert.deepEqual(states, [], "never disconnected");
    assert.equal(await rateLimited(server.addr), before, "no connection closed for its rate");
    console.log(`${N} publishes in ${Date.now() - started} ms`);
    // The queue is bounded: past maxPending, a send is refused at once.
    const c = await connectNode({ url: server.url, ...fast, maxPending: 3 });
    try {
      await c.join("burst");
      const sends = [1, 2, 3, 4].map((n) => c.publish("burst", n).then(() => "ok", (e) => e.code));
      assert.deepEqual(await Promise.all(sends), ["ok", "ok", "ok", "queue_full"]);
    } finally {
      c.close();
    }
  } finally {
    a.close();
    b.close();
  }
});

test("the server's refusals reject the matching promise, and a refused join adds no room", async () => {
  const small = await startServer(["--max-session-members", "1"]);
  const a = await connectNode({ url: small.url, ...fast });
  const b = await connectNode({ url: small.url, ...fast });
  const errors = [];
  b.on("error", (e) => errors.push(e.code));
  try {
    await a.join("solo");
    await assert.rejects(b.join("solo"), (e) => e instanceof ProtocolError && e.code === "room_full");
    assert.deepEqual(b.session.rooms, [], "not in the room it was refused");
    await assert.rejects(b.publish("nowhere", 1), (e) => e.code === "not_member");
    await assert.rejects(b.leave("nowhere"), (e) => e.code === "not_member");
    // A timeout the server refuses (not a whole number): the request fails at once.
    const started = Date.now();
    await assert.rejects(b.request(a.clientId, 1, { timeoutMs: 1.5 }), (e) => e.code === "bad_op");
    assert.ok(Date.now() - started < 1000);
    await b.join("other");
    assert.deepEqual(b.session.rooms, ["other"]);
    assert.deepEqual(errors, [], "refusals go to their promises, not to the error event");
  } finally {
    a.close();
    b.close();
    await small.stop();
  }
});

test("after a reset, what was never sent is sent and what may have arrived is reported", async () => {
  const short = await startServer(["--reliable-resume-window-ms", "200", "--reliable-heartbeat-ms", "300"]);
  const a = await connectNode({ url: short.url, ...fast });
  let proxy = await startProxy(short.url);
  const b = await connectNode({ url: proxy.url, ...fast, backoffMs: 300, maxBackoffMs: 300 });
  const watcher = await connectNode({ url: short.url, ...fast });
  const calls = [];
  a.onRequest(({ data }) => {
    calls.push(data);
    return `done:${data}`;
  });
  const errors = [];
  b.on("error", (e) => errors.push(e.code));
  try {
    await watcher.join("stay");
    await b.join("stay");
    await b.join("go");
    // Sent, never acknowledged: the proxy swallows it.
    proxy.blackhole(true);
    const maybe = b.publish("stay", "maybe");
    await until(() => b["unacked"].length === 1, 5000, "the publish written");
    await proxy.close();
    await until(() => b.state === "reconnecting", 5000, "B to notice");
    // Offline: neither of these is sent before the reset.
    const answer = b.request(a.clientId, "charge-card", { timeoutMs: 20000 });
    const left = b.leave("go");
    const reset = b.once("reset");
    const old = b.clientId;
    // B's state expires on the server (its rooms empty out).
    await eventually(() => watcher.presence("stay"), (m) => m.length === 1, 5000, "B's state to expire");
    proxy = await startProxy(short.url);
    b["opts"].url = proxy.url;
    const r = await reset;
    assert.equal(r.previousId, old);
    assert.deepEqual(r.lost, [{ op: "publish", room: "stay", data: "maybe" }]);
    assert.deepEqual(r.rooms.sort(), ["go", "stay"], "rooms whose traffic may have been missed");
    await assert.rejects(maybe, (e) => e.code === "reset" && e.outcomeUnknown === true);
    // The request made offline is carried out once, in the new session, and answered.
    assert.equal(await answer, "done:charge-card");
    assert.deepEqual(calls, ["charge-card"]);
    // The leave is done by the reset: no rejoin of "go", no not_member.
    await left;
    await until(() => b.pending === 0, 5000, "rejoin acknowledged");
    assert.deepEqual(await b.presence("stay"), [watcher.clientId, b.clientId]);
    await assert.rejects(b.presence("go"), (e) => e.code === "not_member");
    assert.deepEqual(b.session.rooms, ["stay"]);
    assert.deepEqual(errors, []);
  } finally {
    a.close();
    b.close();
    watcher.close();
    await proxy.close();
    await short.stop();
  }
});

test("end-to-end encryption refuses plaintext, other rooms' ciphertext and garbage", async () => {
  const a = await connectNode({ url: server.url, ...fast, e2eKey: "k" });
  const b = await connectNode({ url: server.url, ...fast, e2eKey: "k" });
  const other = await connectNode({ url: server.url, ...fast, e2eKey: await importKey("k", { salt: "another app" }) });
  const raw = new WebSocket(server.url);
  const frames = [];
  raw.on("message", (d) => frames.push(JSON.parse(d.toString())));
  await new Promise((r) => raw.once("open", r));
  let seq = 0;
  const rawSend = (f) => raw.send(JSON.stringify({ t: "msg", seq: ++seq, ...f }));
  raw.send(JSON.stringify({ t: "hello" }));
  try {
    await a.join("r1");
    await b.join("r1");
    await b.join("r2");
    await other.join("r1");
    rawSend({ op: "join", room: "r1" });
    rawSend({ op: "join", room: "r2" });
    await until(() => frames.filter((f) => f.t === "ack").length >= 2, 5000, "raw joins");
    const got = [];
    b.on("message", (m) => got.push({ room: m.room, from: m.from, data: m.data }));
    const bErrors = [];
    b.on("error", (e) => bErrors.push(e.code));
    const otherErrors = [];
    other.on("error", (e) => otherErrors.push(e.code));
    await a.publish("r1", { pay: 100 });
    await until(() => frames.some((f) => f.t === "msg" && f.data?.enc), 5000, "ciphertext relayed");
    const ct = frames.find((f) => f.t === "msg" && f.data?.enc).data;
    rawSend({ op: "publish", room: "r1", data: { pay: 999999 } }); // plaintext
    rawSend({ op: "publish", room: "r2", data: ct }); // A's ciphertext, moved to another room
    rawSend({ op: "publish", room: "r1", data: { ...ct, ct: ct.ct.replace(/^./, (c) => (c === "A" ? "B" : "A")) } }); // altered
    rawSend({ op: "publish", room: "r1", data: { enc: "A256GCM", v: 2, iv: "AAAA", ct: "AAAA" } }); // garbage
    await a.publish("r1", "after");
    await until(() => got.length >= 2 && bErrors.length >= 4, 5000, "deliveries and refusals");
    assert.deepEqual(got, [
      { room: "r1", from: a.clientId, data: { pay: 100 } },
      { room: "r1", from: a.clientId, data: "after" },
    ]);
    assert.deepEqual(bErrors, ["e2e_plaintext", "e2e_decrypt", "e2e_decrypt", "e2e_decrypt"]);
    // Same passphrase, another application salt: another key.
    // All five messages of r1 (two of A's, three of the raw client's).
    await until(() => otherErrors.length >= 5, 5000, "the other app's refusals");
    assert.ok(otherErrors.every((c) => c.startsWith("e2e_")), JSON.stringify(otherErrors));
  } finally {
    raw.terminate();
    a.close();
    b.close();
    other.close();
  }
});

test("a saved session resumes in a new client (a page reload, a process restart)", async () => {
  const proxy = await startProxy(server.url);
  const a = await connectNode({ url: server.url, ...fast });
  const first = await connectNode({ url: proxy.url, ...fast });
  try {
    await a.join("saved");
    await first.join("saved");
    const got1 = [];
    first.on("message", (m) => got1.push(m.data));
    await a.publish("saved", 1);
    await until(() => got1.length === 1, 5000, "first message");
    const saved = first.session;
    assert.equal(saved.clientId, first.clientId);
    // The first client goes away without a word, as a killed process does.
    await proxy.close();
    first.close();
    await a.publish("saved", 2);
    await a.publish("saved", 3);
    const second = new ReliableClient({ WebSocket: NodeWebSocket, url: server.url, ...fast, session: saved });
    try {
      const got2 = [];
      second.on("message", (m) => got2.push(m.data));
      const opened = await second.once("open");
      assert.deepEqual(opened, { clientId: saved.clientId, resumed: true });
      await until(() => got2.length === 2, 5000, "missed messages");
      assert.deepEqual(got2, [2, 3]);
      const heard = a.once("message");
      await second.publish("saved", "back");
      assert.deepEqual(await heard, { room: "saved", from: saved.clientId, data: "back" });
    } finally {
      second.close();
    }
  } finally {
    a.close();
    first.close();
  }
});

/** A TCP server that accepts connections and never answers (a stuck proxy). */
async function silentServer() {
  const sockets = new Set();
  const srv = createServer((s) => sockets.add(s));
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return {
    url: `ws://127.0.0.1:${srv.address().port}/v1/reliable`,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise((r) => srv.close(r));
    },
  };
}

/** A port nothing listens on. */
async function deadPort() {
  const srv = createServer();
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const port = srv.address().port;
  await new Promise((r) => srv.close(r));
  return port;
}

test("connecting fails with a typed error and an error event: refused, HTTP status, timeout, aborted", async () => {
  const expectFailure = async (options, code, check = () => {}) => {
    const c = new ReliableClient(options);
    const events = [];
    c.on("error", (e) => events.push(e));
    const started = Date.now();
    await assert.rejects(c.ready(), (e) => {
      assert.ok(e instanceof ConnectError, String(e));
      assert.ok(e instanceof ProtocolError);
      assert.equal(e.code, code, e.message);
      check(e);
      return true;
    });
    assert.equal(events.length, 1, "one error event");
    assert.equal(events[0].code, code);
    assert.equal(c.state, "closed", "no retries after the first connection failed");
    // A message accepted meanwhile fails with the same error, and nothing is left pending.
    return Date.now() - started;
  };
  await expectFailure({ url: `ws://127.0.0.1:${await deadPort()}/v1/reliable` }, "connect_refused");
  await assert.rejects(connectNode({ url: `ws://127.0.0.1:${await deadPort()}/v1/reliable` }), (e) => e.code === "connect_refused");
  // The right server, the wrong path: the HTTP status says so.
  await expectFailure({ url: `ws://${server.addr}/v1/wrong` }, "connect_http", (e) => assert.equal(e.status, 404));
  const silent = await silentServer();
  try {
    const took = await expectFailure({ url: silent.url, connectTimeoutMs: 300 }, "connect_timeout");
    assert.ok(took >= 250 && took < 5000, `${took} ms`);
    const abort = new AbortController();
    const c = new ReliableClient({ url: silent.url, signal: abort.signal });
    const pending = c.publish("r", 1);
    setTimeout(() => abort.abort(), 50);
    await assert.rejects(c.ready(), (e) => e instanceof ConnectError && e.code === "aborted");
    await assert.rejects(pending, (e) => e.code === "aborted" && !e.outcomeUnknown);
    // Aborted before it started: no connection at all.
    await assert.rejects(connectNode({ url: silent.url, signal: AbortSignal.abort() }), (e) => e.code === "aborted");
  } finally {
    await silent.close();
  }
  // A bad URL is a connect failure too, not an exception from the constructor.
  await assert.rejects(connectNode({ url: "not a url" }), (e) => e.code === "connect_failed");
  // Once connected, the signal closes the client.
  const abort = new AbortController();
  const c = await connectNode({ url: server.url, signal: abort.signal });
  abort.abort();
  assert.equal(c.state, "closed");
});

test("connect and ReliableClient from supersynk-reliable/node work on Node without a global WebSocket", async () => {
  if (process.versions.node.split(".")[0] === "20") assert.equal(globalThis.WebSocket, undefined, "Node 20 has no WebSocket");
  const a = await connect({ url: server.url, ...fast });
  const b = new ReliableClient({ url: server.url, ...fast });
  try {
    await b.ready();
    assert.equal(a.state, "open");
    assert.equal(b.state, "open");
  } finally {
    a.close();
    b.close();
  }
});

test("room handles: typed payloads, their own events, presence for members", async () => {
  const a = await connectNode({ url: server.url, ...fast });
  const b = await connectNode({ url: server.url, ...fast });
  try {
    const chatA = a.room("chat");
    const chatB = b.room("chat");
    const otherB = b.room("other");
    await chatA.join();
    const joined = chatA.once("join");
    await chatB.join();
    await otherB.join();
    assert.deepEqual(await joined, { clientId: b.clientId });
    const inChat = [];
    const inOther = [];
    chatB.on("message", (m) => inChat.push(m));
    otherB.on("message", (m) => inOther.push(m));
    await chatA.publish({ text: "hi" });
    await until(() => inChat.length === 1, 5000, "the chat message");
    assert.deepEqual(inChat, [{ from: a.clientId, data: { text: "hi" } }]);
    assert.deepEqual(inOther, []);
    assert.deepEqual(await chatA.presence(), [a.clientId, b.clientId]);
    // Presence is for members: A is not in "other".
    await assert.rejects(a.room("other").presence(), (e) => e.code === "not_member");
    const left = chatA.once("leave");
    await chatB.leave();
    assert.deepEqual(await left, { clientId: b.clientId });
  } finally {
    a.close();
    b.close();
  }
});

test("600 messages through a proxy losing 3% arrive exactly once, in order, and fast", { timeout: 120000 }, async () => {
  // Default server timers (resend 2 s): what recovers a loss fast is each side naming what it
  // misses, and the other resending that at once.
  const plain = await startServer();
  const pa = await startProxy(plain.url, { dropRate: 0.03 });
  const pb = await startProxy(plain.url, { dropRate: 0.03 });
  const a = await connectNode({ url: pa.url });
  const b = await connectNode({ url: pb.url });
  const N = 600;
  try {
    await b.join("lossy");
    await a.join("lossy");
    const got = [];
    b.on("message", (m) => got.push(m.data));
    const started = Date.now();
    await Promise.all(Array.from({ length: N }, (_, i) => a.publish("lossy", i + 1)));
    await until(() => got.length >= N, 60000, `${N} messages (got ${got.length})`);
    const took = Date.now() - started;
    assert.deepEqual(got, Array.from({ length: N }, (_, i) => i + 1));
    assert.ok(pa.stats.dropped + pb.stats.dropped > 5, "the proxies dropped something");
    console.log(`${N} messages at 3% loss in ${took} ms (${pa.stats.dropped + pb.stats.dropped} frames dropped)`);
    // The old Go-back-N on a 2 s timer took 40-60 s here; the bench has the figures.
    assert.ok(took < 20000, `${took} ms`);
  } finally {
    a.close();
    b.close();
    await pa.close();
    await pb.close();
    await plain.stop();
  }
});
