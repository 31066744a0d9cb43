// The TypeScript client against the real server (started here), directly and through a
// proxy that drops and delays messages and cuts connections.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";

import { connectNode, ProtocolError, importKey } from "../dist/node.js";
import { startServer, startProxy, until } from "./helpers.mjs";

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
