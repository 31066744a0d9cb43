/**
 * Client of supersynk's reliable session protocol (`/v1/reliable`, protocol/reliable.md).
 *
 * Works in browsers (native `WebSocket`, WebCrypto) and in Node (import `supersynk-reliable/node`,
 * which supplies the `ws` package). Every message is numbered, acknowledged, resent until
 * acknowledged, and delivered once and in order; the client resumes its session across
 * reconnects (with backoff), sends heartbeats, joins rooms, makes and answers requests, and can
 * encrypt room payloads end to end with a shared key (AES-GCM): the server relays ciphertext.
 */

import { decrypt, encrypt, isEncrypted, type Key, importKey } from "./crypto.js";

export { importKey, type Key } from "./crypto.js";

/** The subset of the WebSocket API the client uses (browser `WebSocket` and `ws` both fit). */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

/** A WebSocket constructor. */
export type SocketFactory = new (url: string) => SocketLike;

/** Where the connection stands. */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

export interface ClientOptions {
  /** `ws://host:port/v1/reliable` */
  url: string;
  /** The WebSocket constructor; defaults to `globalThis.WebSocket`. */
  WebSocket?: SocketFactory;
  /** Resend what is unacknowledged after this long, in ms (default 1000). */
  resendMs?: number;
  /** Acknowledge received messages within this long, in ms (default 100). */
  ackDelayMs?: number;
  /** Acknowledge at once after this many unacknowledged messages (default 64). */
  ackEvery?: number;
  /** Default timeout of `request`, in ms (default 10000; the server caps it). */
  requestTimeoutMs?: number;
  /** Reconnect backoff: first delay, cap, in ms (defaults 100 and 5000), with jitter. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** Give up on a connection that has not been welcomed within this long, in ms (default 5000). */
  helloTimeoutMs?: number;
  /**
   * End-to-end encryption of room payloads: a passphrase (AES-256-GCM key derived with
   * PBKDF2-SHA-256) or a `CryptoKey` from `importKey`. Every member of a room must use the same.
   */
  e2eKey?: string | Key;
}

/** A message published to a room, as a member receives it. */
export interface RoomMessage<T> {
  room: string;
  from: string;
  data: T;
}

/** A request from another client; answer by returning from the handler given to `onRequest`. */
export interface IncomingRequest<Q> {
  id: number;
  from: string;
  data: Q;
}

/** An error the server reported (`{"t":"error"}`) or an error response. */
export class ProtocolError extends Error {
  constructor(
    public readonly code: string,
    message: string,
    public readonly seq?: number,
  ) {
    super(`${code}: ${message}`);
    this.name = "ProtocolError";
  }
}

export interface Events<T> {
  /** Welcomed: a fresh session (`resumed` false) or the same one resumed. */
  open: { clientId: string; resumed: boolean };
  /** The server could not resume the session: a new id, rooms rejoined, `lost` not delivered. */
  reset: { previousId: string; clientId: string; lost: unknown[] };
  state: ConnectionState;
  message: RoomMessage<T>;
  join: { room: string; clientId: string };
  leave: { room: string; clientId: string };
  error: ProtocolError;
}

type Listener<V> = (value: V) => void;

interface Outgoing {
  seq: number;
  body: Record<string, unknown>;
  text: string;
  /** When it was last written to a socket; 0 = never. */
  sentAt: number;
  acked: () => void;
  failed: (e: Error) => void;
}

interface Waiting<R> {
  resolve: (value: R) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

const OPEN = 1;

/**
 * Marks a promise as handled, so that one the caller does not await (a fire-and-forget
 * publish) cannot crash Node with an unhandled rejection when the client closes; a caller
 * that awaits it still sees the rejection.
 */
function handled<V>(p: Promise<V>): Promise<V> {
  p.catch(() => undefined);
  return p;
}

function now(): number {
  return typeof performance !== "undefined" ? performance.now() : Date.now();
}

/**
 * One client session. `T`: room payloads; `Q`/`R`: request and response payloads.
 */
export class ReliableClient<T = unknown, Q = unknown, R = unknown> {
  clientId: string | null = null;
  state: ConnectionState = "connecting";

  private token: string | null = null;
  private ws: SocketLike | null = null;
  private readonly opts: Required<Omit<ClientOptions, "e2eKey" | "WebSocket">>;
  private readonly factory: SocketFactory;
  private key: Promise<Key> | null = null;
  private heartbeatMs = 15000;

  /** Last seq given to an outgoing message, and those not acknowledged yet (in order). */
  private outSeq = 0;
  private unacked: Outgoing[] = [];
  /** Last seq received in order from the server; acks owed. */
  private inSeq = 0;
  private ackOwed = 0;
  private ackTimer: ReturnType<typeof setTimeout> | null = null;

  private rooms = new Set<string>();
  private nextRequestId = 1;
  private waiting = new Map<number, Waiting<R>>();
  private handler: ((req: IncomingRequest<Q>) => R | Promise<R>) | null = null;

  private timer: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private helloTimer: ReturnType<typeof setTimeout> | null = null;
  private lastHeard = 0;
  private lastHb = 0;
  private lastFastResend = 0;
  private attempts = 0;
  private welcomed = false;
  private closedByUser = false;
  /** Encryption and decryption are async: chains keep sends and deliveries in order. */
  private sendChain: Promise<unknown> = Promise.resolve();
  private deliverChain: Promise<unknown> = Promise.resolve();
  private listeners: { [K in keyof Events<T>]?: Listener<Events<T>[K]>[] } = {};

  constructor(options: ClientOptions) {
    const ws = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!ws) {
      throw new Error("no WebSocket: pass options.WebSocket (in Node, import supersynk-reliable/node)");
    }
    this.factory = ws;
    this.opts = {
      url: options.url,
      resendMs: options.resendMs ?? 1000,
      ackDelayMs: options.ackDelayMs ?? 100,
      ackEvery: options.ackEvery ?? 64,
      requestTimeoutMs: options.requestTimeoutMs ?? 10000,
      backoffMs: options.backoffMs ?? 100,
      maxBackoffMs: options.maxBackoffMs ?? 5000,
      helloTimeoutMs: options.helloTimeoutMs ?? 5000,
    };
    if (options.e2eKey !== undefined) {
      this.key = typeof options.e2eKey === "string" ? importKey(options.e2eKey) : Promise.resolve(options.e2eKey);
    }
    this.open();
  }

  // ---- events ----

  on<K extends keyof Events<T>>(event: K, listener: Listener<Events<T>[K]>): () => void {
    const list = (this.listeners[event] ??= []) as Listener<Events<T>[K]>[];
    list.push(listener);
    return () => {
      const i = list.indexOf(listener);
      if (i >= 0) list.splice(i, 1);
    };
  }

  /** Resolves with the next `event`. */
  once<K extends keyof Events<T>>(event: K): Promise<Events<T>[K]> {
    return new Promise((resolve) => {
      const off = this.on(event, (v) => {
        off();
        resolve(v);
      });
    });
  }

  private emit<K extends keyof Events<T>>(event: K, value: Events<T>[K]): void {
    for (const l of [...((this.listeners[event] ?? []) as Listener<Events<T>[K]>[])]) {
      try {
        l(value);
      } catch (e) {
        // A listener's bug must not break the protocol.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  private setState(s: ConnectionState): void {
    if (this.state !== s) {
      this.state = s;
      this.emit("state", s);
    }
  }

  // ---- API ----

  /** Resolves once welcomed (at once if already). */
  async ready(): Promise<void> {
    if (this.welcomed) return;
    await this.once("open");
  }

  /** Joins a room; resolves when the server has acknowledged it. */
  join(room: string): Promise<void> {
    this.rooms.add(room);
    return this.send({ op: "join", room });
  }

  leave(room: string): Promise<void> {
    this.rooms.delete(room);
    return this.send({ op: "leave", room });
  }

  /** Publishes to a room (encrypted with `e2eKey` if set); resolves when acknowledged. */
  publish(room: string, data: T): Promise<void> {
    const key = this.key;
    if (!key) return this.send({ op: "publish", room, data });
    return this.send({ op: "publish", room }, async () => ({ data: await encrypt(await key, data) }));
  }

  /** Sends a request to another client (by id); resolves with its response. */
  request(to: string, data: Q, options: { timeoutMs?: number } = {}): Promise<R> {
    const id = this.nextRequestId++;
    const timeoutMs = options.timeoutMs ?? this.opts.requestTimeoutMs;
    const answer = this.wait(id, timeoutMs);
    this.send({ op: "request", id, to, data, timeoutMs }).catch(() => undefined);
    return answer;
  }

  /** The ids of a room's members, asked from the server. */
  async presence(room: string): Promise<string[]> {
    const id = this.nextRequestId++;
    const answer = this.wait(id, this.opts.requestTimeoutMs) as Promise<unknown>;
    this.send({ op: "request", id, to: "server", data: { presence: room } }).catch(() => undefined);
    const r = (await answer) as { members: string[] };
    return r.members;
  }

  /** Answers requests from other clients: the handler's result (or throw) is the response. */
  onRequest(handler: (req: IncomingRequest<Q>) => R | Promise<R>): void {
    this.handler = handler;
  }

  /** Closes for good: no reconnect. Unacknowledged messages are abandoned. */
  close(): void {
    this.closedByUser = true;
    this.stopTimers();
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.ws?.close(1000, "bye");
    this.ws = null;
    for (const [id, w] of this.waiting) {
      clearTimeout(w.timer);
      w.reject(new ProtocolError("closed", "client closed"));
      this.waiting.delete(id);
    }
    for (const o of this.unacked) o.failed(new ProtocolError("closed", "client closed before the server acknowledged it"));
    this.unacked = [];
    this.setState("closed");
  }

  /** Messages sent and not yet acknowledged (for tests and back-pressure). */
  get pending(): number {
    return this.unacked.length;
  }

  // ---- sending ----

  private wait(id: number, timeoutMs: number): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.waiting.delete(id)) {
          reject(new ProtocolError("timeout", `no response within ${timeoutMs} ms`));
        }
        // The server's own timeout is the same: a margin covers a response in flight.
      }, timeoutMs + 1000);
      this.waiting.set(id, { resolve, reject, timer });
    });
  }

  /**
   * Numbers a message and writes it (or keeps it for the next connection). `late` computes
   * fields asynchronously (encryption); the chain keeps numbering in call order.
   */
  private send(
    body: Record<string, unknown>,
    late?: () => Promise<Record<string, unknown>>,
  ): Promise<void> {
    if (this.closedByUser) return handled(Promise.reject(new ProtocolError("closed", "client closed")));
    return handled(new Promise<void>((resolve, reject) => {
      this.sendChain = this.sendChain.then(async () => {
        try {
          const extra = late ? await late() : {};
          this.enqueue({ ...body, ...extra }, resolve, reject);
        } catch (e) {
          reject(e as Error);
        }
      });
    }));
  }

  private enqueue(body: Record<string, unknown>, acked: () => void, failed: (e: Error) => void): void {
    const seq = ++this.outSeq;
    const out: Outgoing = { seq, body, text: "", sentAt: 0, acked, failed };
    out.text = JSON.stringify({ t: "msg", seq, ...body });
    this.unacked.push(out);
    if (this.welcomed) this.write(out);
  }

  private write(out: Outgoing): void {
    out.sentAt = now();
    this.raw(out.text);
  }

  private raw(text: string): void {
    if (this.ws && this.ws.readyState === OPEN) {
      try {
        this.ws.send(text);
      } catch {
        // The socket is closing: onclose reconnects and everything unacked is resent.
      }
    }
  }

  private resendAll(): void {
    for (const out of this.unacked) this.write(out);
  }

  // ---- connection ----

  private open(): void {
    this.welcomed = false;
    this.setState(this.attempts === 0 && !this.clientId ? "connecting" : "reconnecting");
    let ws: SocketLike;
    try {
      ws = new this.factory(this.opts.url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      const hello: Record<string, unknown> = { t: "hello" };
      if (this.clientId && this.token) {
        hello.clientId = this.clientId;
        hello.lastSeq = this.inSeq;
        hello.token = this.token;
      }
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = now();
      const text = typeof ev.data === "string" ? ev.data : String(ev.data);
      let frame: any;
      try {
        frame = JSON.parse(text);
      } catch {
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.lost();
    };
    ws.onerror = () => {
      // Followed by onclose.
    };
    this.helloTimer = setTimeout(() => {
      if (this.ws === ws && !this.welcomed) this.drop(ws);
    }, this.opts.helloTimeoutMs);
  }

  /** Abandons a socket that is dead or stuck and reconnects. */
  private drop(ws: SocketLike): void {
    try {
      ws.close(4000, "heartbeat timeout");
    } catch {
      // Already closed.
    }
    if (this.ws === ws) this.lost();
  }

  private lost(): void {
    this.stopTimers();
    this.ws = null;
    this.welcomed = false;
    if (this.closedByUser) return;
    this.setState("reconnecting");
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    const base = Math.min(this.opts.maxBackoffMs, this.opts.backoffMs * 2 ** Math.min(this.attempts, 16));
    this.attempts++;
    const delay = base / 2 + Math.random() * (base / 2);
    this.reconnectTimer = setTimeout(() => this.open(), delay);
  }

  private stopTimers(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.helloTimer) clearTimeout(this.helloTimer);
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.timer = this.helloTimer = this.ackTimer = null;
  }

  private onWelcome(f: any): void {
    if (this.helloTimer) clearTimeout(this.helloTimer);
    this.heartbeatMs = Number(f.heartbeatMs) || 15000;
    const previousId = this.clientId;
    if (f.resumed) {
      this.ack(Number(f.seq));
    } else if (previousId !== null) {
      // A new session: what the old one did not acknowledge may or may not have been carried
      // out, so it is reported, not resent; what was never written is renumbered and sent.
      const lostOut = this.unacked.filter((o) => o.sentAt > 0);
      const lost = lostOut.map((o) => o.body);
      const unsent = this.unacked.filter((o) => o.sentAt === 0);
      for (const o of lostOut) o.failed(new ProtocolError("reset", "session lost before the server acknowledged it"));
      this.unacked = [];
      this.outSeq = 0;
      this.inSeq = 0;
      this.ackOwed = 0;
      for (const [id, w] of this.waiting) {
        clearTimeout(w.timer);
        w.reject(new ProtocolError("reset", "session lost before the response"));
        this.waiting.delete(id);
      }
      this.clientId = f.clientId;
      this.token = f.token;
      const ignore = () => undefined;
      for (const room of this.rooms) this.enqueue({ op: "join", room }, ignore, ignore);
      for (const o of unsent) {
        if (o.body.op !== "join") this.enqueue(o.body, o.acked, o.failed);
        else o.acked();
      }
      this.emit("reset", { previousId, clientId: f.clientId, lost });
    }
    this.clientId = f.clientId;
    this.token = f.token;
    this.welcomed = true;
    this.attempts = 0;
    this.lastHeard = this.lastHb = now();
    this.setState("open");
    this.resendAll();
    const tick = Math.max(5, Math.min(this.heartbeatMs, this.opts.resendMs) / 4);
    if (this.timer) clearInterval(this.timer);
    this.timer = setInterval(() => this.onTick(), tick);
    this.emit("open", { clientId: f.clientId, resumed: !!f.resumed });
  }

  private onTick(): void {
    const ws = this.ws;
    if (!ws) return;
    const t = now();
    if (t - this.lastHeard >= 2 * this.heartbeatMs) {
      this.drop(ws);
      return;
    }
    if (t - this.lastHb >= this.heartbeatMs) {
      this.lastHb = t;
      this.raw(JSON.stringify({ t: "hb", ack: this.inSeq }));
      this.ackOwed = 0;
    }
    for (const out of this.unacked) {
      if (t - out.sentAt < this.opts.resendMs) break;
      this.write(out);
    }
  }

  /** A cumulative ack from the server. */
  private ack(seq: number): void {
    while (this.unacked.length > 0 && this.unacked[0].seq <= seq) {
      const out = this.unacked.shift()!;
      out.acked();
    }
  }

  private owe(): void {
    this.ackOwed++;
    if (this.ackOwed >= this.opts.ackEvery) {
      this.sendAck();
    } else if (!this.ackTimer) {
      this.ackTimer = setTimeout(() => this.sendAck(), this.opts.ackDelayMs);
    }
  }

  private sendAck(): void {
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.ackTimer = null;
    this.ackOwed = 0;
    this.raw(JSON.stringify({ t: "ack", seq: this.inSeq }));
  }

  private onFrame(f: any): void {
    switch (f?.t) {
      case "welcome":
        this.onWelcome(f);
        return;
      case "ack":
        this.ack(Number(f.seq));
        return;
      case "hb":
        this.ack(Number(f.ack));
        return;
      case "error": {
        const e = new ProtocolError(String(f.code), String(f.message), f.seq);
        if (f.code === "seq_gap") {
          // Something we sent was lost: resend everything unacknowledged now, at most once
          // per half resend period (every message after the lost one reports the same gap).
          const t = now();
          if (t - this.lastFastResend >= this.opts.resendMs / 2) {
            this.lastFastResend = t;
            this.resendAll();
          }
          return;
        }
        this.emit("error", e);
        return;
      }
      case "msg":
        break;
      default:
        return;
    }
    const seq = Number(f.seq);
    if (seq <= this.inSeq) {
      // A duplicate or a stale resend: acknowledge again so the server stops.
      this.owe();
      return;
    }
    if (seq !== this.inSeq + 1) {
      // Ahead of a gap: dropped; the server resends from the gap.
      return;
    }
    this.inSeq = seq;
    this.owe();
    this.deliverChain = this.deliverChain.then(() => this.deliver(f)).catch((e) => {
      this.emit("error", new ProtocolError("client", String(e)));
    });
  }

  private async deliver(f: any): Promise<void> {
    switch (f.op) {
      case undefined: {
        let data = f.data;
        if (this.key && isEncrypted(data)) {
          data = await decrypt(await this.key, data);
        }
        this.emit("message", { room: f.room, from: f.from, data });
        return;
      }
      case "join":
        this.emit("join", { room: f.room, clientId: f.from });
        return;
      case "leave":
        this.emit("leave", { room: f.room, clientId: f.from });
        return;
      case "response": {
        const w = this.waiting.get(Number(f.id));
        if (!w) return;
        this.waiting.delete(Number(f.id));
        clearTimeout(w.timer);
        if (f.error !== undefined) {
          w.reject(new ProtocolError(String(f.error?.code ?? "error"), String(f.error?.message ?? "")));
        } else {
          w.resolve(f.data as R);
        }
        return;
      }
      case "request": {
        const handler = this.handler;
        const reply = (body: Record<string, unknown>) =>
          this.send({ op: "response", id: f.id, to: f.from, ...body }).catch(() => undefined);
        if (!handler) {
          reply({ error: { code: "no_handler", message: "this client answers no requests" } });
          return;
        }
        // Answered asynchronously: a slow handler must not hold up later deliveries.
        Promise.resolve()
          .then(() => handler({ id: Number(f.id), from: f.from, data: f.data as Q }))
          .then(
            (data) => reply({ data: data === undefined ? null : data }),
            (e) => reply({ error: { code: "handler_error", message: String(e?.message ?? e) } }),
          );
        return;
      }
    }
  }
}

/** Connects; resolves once welcomed. */
export async function connect<T = unknown, Q = unknown, R = unknown>(
  options: ClientOptions,
): Promise<ReliableClient<T, Q, R>> {
  const c = new ReliableClient<T, Q, R>(options);
  await c.ready();
  return c;
}
