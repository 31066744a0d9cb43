// Test helpers: the real server binary on port 0, and a proxy that loses, delays and cuts.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { WebSocketServer, WebSocket } from "ws";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");

/**
 * Starts $SUPERSYNK_BIN, else debug/supersynk under $CARGO_TARGET_DIR (relative to the
 * repository, as cargo takes it) or target/, on 127.0.0.1:0; resolves with its address.
 */
export async function startServer(args = []) {
  const target = path.resolve(root, process.env.CARGO_TARGET_DIR ?? "target");
  const bin = process.env.SUPERSYNK_BIN ?? path.join(target, "debug/supersynk");
  // The server's durable store (other front-ends) goes to a directory of its own.
  const dataDir = mkdtempSync(path.join(tmpdir(), "supersynk-ts-test-"));
  const child = spawn(
    bin,
    // The server's default limits (rate, sizes): the client must live within them.
    ["--bind", "127.0.0.1", "--port", "0", "--data-dir", dataDir, "--log-format", "json", "--log", "warn,supersynk=info", ...args],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: child.stdout });
  const addr = await new Promise((resolve, reject) => {
    child.once("exit", (code) => reject(new Error(`server exited with ${code}`)));
    lines.on("line", (line) => {
      try {
        const v = JSON.parse(line);
        if (v.fields?.message === "listening") resolve(v.fields.local_addr);
      } catch {
        // Not a JSON log line.
      }
    });
  });
  return {
    addr,
    url: `ws://${addr}/v1/reliable`,
    stop: () =>
      new Promise((resolve) => {
        const done = () => {
          rmSync(dataDir, { recursive: true, force: true });
          resolve();
        };
        if (child.exitCode !== null) return done();
        child.once("exit", done);
        child.kill("SIGTERM");
      }),
  };
}

/**
 * A WebSocket proxy working on whole messages (two `ws` sockets per client): drops each
 * message with probability `dropRate`, delays each by up to `maxDelayMs` (keeping the order
 * of each direction, as TCP would), and every `cutEveryMs` cuts one connection (both sides
 * terminated, no close handshake). `blackhole(true)` drops everything until
 * `blackhole(false)`, connections staying open.
 */
export async function startProxy(upstream, { dropRate = 0, maxDelayMs = 0, cutEveryMs = 0 } = {}) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.once("listening", r));
  const stats = { forwarded: 0, dropped: 0, cuts: 0, connections: 0 };
  const pairs = new Set();
  let dropAll = false;
  const pipe = (from, to, toOpen) => {
    // One FIFO per direction, released by one timer: frames are delayed, never reordered
    // (a WebSocket never reorders; drops and cuts are what the client must survive).
    let releaseAt = 0;
    const queue = [];
    let timer = null;
    const send = ({ data, isBinary }) => {
      toOpen.then(() => {
        if (to.readyState === WebSocket.OPEN) {
          stats.forwarded++;
          to.send(data, { binary: isBinary });
        }
      });
    };
    const pump = () => {
      timer = null;
      const now = Date.now();
      while (queue.length && queue[0].at <= now) send(queue.shift());
      if (queue.length) timer = setTimeout(pump, queue[0].at - now);
    };
    from.on("message", (data, isBinary) => {
      if (dropAll || Math.random() < dropRate) {
        stats.dropped++;
        return;
      }
      releaseAt = Math.max(releaseAt, Date.now() + Math.random() * maxDelayMs);
      queue.push({ at: releaseAt, data, isBinary });
      if (!timer) timer = setTimeout(pump, Math.max(0, releaseAt - Date.now()));
    });
  };
  wss.on("connection", (client) => {
    stats.connections++;
    const server = new WebSocket(upstream);
    const serverOpen = new Promise((r) => server.once("open", r));
    const pair = { client, server };
    pairs.add(pair);
    pipe(client, server, serverOpen);
    pipe(server, client, Promise.resolve());
    const end = () => {
      pairs.delete(pair);
      client.terminate();
      server.terminate();
    };
    client.on("close", end);
    server.on("close", end);
    client.on("error", end);
    server.on("error", end);
  });
  let cutter = null;
  if (cutEveryMs > 0) {
    cutter = setInterval(() => {
      const all = [...pairs];
      if (all.length === 0) return;
      const p = all[Math.floor(Math.random() * all.length)];
      stats.cuts++;
      p.client.terminate();
      p.server.terminate();
    }, cutEveryMs);
  }
  return {
    url: `ws://127.0.0.1:${wss.address().port}/v1/reliable`,
    stats,
    blackhole: (on) => {
      dropAll = on;
    },
    close: () => {
      if (cutter) clearInterval(cutter);
      for (const p of pairs) {
        p.client.terminate();
        p.server.terminate();
      }
      return new Promise((r) => wss.close(r));
    },
  };
}

/** Resolves when `predicate()` holds, polling every 10 ms; rejects after `ms`. */
export function until(predicate, ms = 10000, what = "condition") {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const check = () => {
      if (predicate()) return resolve();
      if (Date.now() - started > ms) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(check, 10);
    };
    check();
  });
}

/** A metric of the server at `addr`, summed over its labels (0 if absent). */
export async function metric(addr, name) {
  const body = await (await fetch(`http://${addr}/metrics`)).text();
  let sum = 0;
  for (const line of body.split("\n")) {
    if (line.startsWith(name) && /^[ {]/.test(line.slice(name.length))) sum += Number(line.split(" ").pop());
  }
  return sum;
}

/** The server's count of connections it closed for going over the message rate. */
export async function rateLimited(addr) {
  const body = await (await fetch(`http://${addr}/metrics`)).text();
  const line = body.split("\n").find((l) => l.startsWith('supersynk_errors_total{kind="limit_message_rate"}'));
  return line ? Number(line.split(" ").pop()) : 0;
}
