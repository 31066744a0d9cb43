/**
 * Client of supersynk's reliable session protocol (`/v1/reliable`, protocol/reliable.md).
 *
 * Works in browsers (native `WebSocket`, WebCrypto) and in Node (import `supersynk-reliable/node`,
 * which supplies the `ws` package). Every message is numbered, acknowledged, resent until
 * acknowledged, and delivered once and in order; the client resumes its session across
 * reconnects (with backoff), sends heartbeats, joins rooms, makes and answers requests, and can
 * encrypt room payloads end to end with a shared key (AES-GCM): the server relays ciphertext.
 *
 * How sending works: a message is accepted into a bounded queue (`maxPending`), numbered when
 * it is first written, and kept until acknowledged. Writes (resends and acks included) are
 * paced to the rate the server announces in its welcome, and at most `maxInFlight` messages
 * (`maxInFlightBytes`) are unacknowledged at once. A message the server refuses rejects its
 * promise with the server's code; one larger than the server's `maxMessageBytes` is rejected
 * at once (`too_big`) and never sent.
 *
 * Losses: a message that arrives ahead of a gap is kept (up to `MAX_AHEAD` numbers ahead)
 * and the ack names what is missing (`missing`); what the server names missing is resent at
 * once. Both sides also resend on a timeout.
 *
 * Connecting: `connect` (and `ready`) reject with a `ConnectError` (refused, HTTP status,
 * timeout, aborted) when the first connection fails, and the client closes; once welcomed,
 * a lost connection is reconnected with backoff and the session resumed with its token.
 */

import { E2EKey, type Key } from "./crypto.js";

export { importKey, E2EKey, type Key, type Encrypted } from "./crypto.js";

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

/** What it takes to resume a session in another process or page (see `ClientOptions.session`). */
export interface SavedSession {
  clientId: string;
  /** The welcome's secret: the id alone never resumes. Keep it like a password. */
  token: string;
  /** The last `seq` received from the server in order. */
  lastSeq: number;
  /** The rooms it is in (rejoined if the session cannot be resumed). */
  rooms?: string[];
}

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
  /**
   * The first welcome must come within this long, in ms (default 10000), else `connect`
   * rejects with `connect_timeout`. Until then, a connection that opened and was lost before
   * its welcome is tried again; one that could not be made at all (refused, an HTTP status)
   * rejects at once.
   */
  connectTimeoutMs?: number;
  /** Try again when an open connection has not been welcomed within this long, in ms (default 5000). */
  helloTimeoutMs?: number;
  /**
   * Aborts connecting (`connect` rejects with `aborted`), or closes the client once
   * connected, when it fires.
   */
  signal?: AbortSignal;
  /**
   * Messages accepted and not yet acknowledged, at most (default 1000): past it, `publish`,
   * `join`, `leave` and `request` reject at once with `queue_full`. `pending` says how many.
   */
  maxPending?: number;
  /**
   * Messages written and not yet acknowledged, at most, and their bytes (defaults 256 and
   * 128 KiB; keep the bytes below the server's `--outbound-queue-bytes`, what it keeps of
   * messages that arrive ahead of a lost one). Others wait in the queue.
   */
  maxInFlight?: number;
  maxInFlightBytes?: number;
  /**
   * End-to-end encryption of room payloads: a passphrase, or a key from `importKey` (which
   * takes an application salt). Every member of a room must use the same. A client with a
   * key refuses room messages that are not encrypted with it (an `error` event, codes
   * `e2e_plaintext` and `e2e_decrypt`).
   */
  e2eKey?: string | Key;
  /**
   * A session saved with `client.session` (in another page or process): the client resumes
   * it, and if the server cannot, starts over with a `reset` event. Save it when the last
   * message was handled (a session saved before later messages were acknowledged no longer
   * resumes).
   */
  session?: SavedSession;
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

/** The codes of the server's `error` frames and error responses (protocol/reliable.md). */
export type ServerErrorCode =
  | "bad_json"
  | "bad_frame"
  | "binary_frame"
  | "hello_required"
  | "already_welcomed"
  | "seq_gap"
  | "bad_ack"
  | "bad_op"
  | "not_member"
  | "room_full"
  | "too_many_rooms"
  | "server_busy"
  | "unknown_client"
  | "unknown_request"
  | "duplicate_request"
  | "bad_request"
  | "too_many_clients"
  | "timeout"
  | "overflow"
  | "replaced";

/** Codes of error responses made by (TypeScript) clients. */
export type ResponseErrorCode = "no_handler" | "handler_error";

/**
 * Why connecting failed: refused (nothing listens, unreachable, DNS), an HTTP answer instead
 * of the upgrade (`status`: a wrong path, a proxy), failed (in browsers, which do not say
 * which of those it was; or a bad URL), no welcome in time, aborted by the `signal`.
 */
export type ConnectErrorCode = "connect_refused" | "connect_http" | "connect_failed" | "connect_timeout" | "aborted";

/** The client's own codes. */
export type ClientErrorCode =
  | "closed"
  | "reset"
  | "queue_full"
  | "too_big"
  | "timeout"
  | "e2e_plaintext"
  | "e2e_decrypt"
  | "client"
  | ConnectErrorCode;

/**
 * Every code a `ProtocolError` may have. A code the client does not know (a newer server's,
 * or another client's own error response code) is `unknown_error`, with the code as received
 * at the start of the message.
 */
export type ErrorCode = ServerErrorCode | ResponseErrorCode | ClientErrorCode | "unknown_error";

const KNOWN_CODES = new Set<string>([
  "bad_json", "bad_frame", "binary_frame", "hello_required", "already_welcomed", "seq_gap", "bad_ack",
  "bad_op", "not_member", "room_full", "too_many_rooms", "server_busy", "unknown_client", "unknown_request",
  "duplicate_request", "bad_request", "too_many_clients", "timeout", "overflow", "replaced",
  "no_handler", "handler_error",
]);

/** A ProtocolError from a code and message as received on the wire. */
function wireError(code: unknown, message: unknown, seq?: number): ProtocolError {
  const c = String(code);
  return KNOWN_CODES.has(c)
    ? new ProtocolError(c as ErrorCode, String(message ?? ""), seq)
    : new ProtocolError("unknown_error", `${c}: ${String(message ?? "")}`, seq);
}

/**
 * An error the server reported (`{"t":"error"}`), an error response, or the client's own
 * (`closed`, `reset`, `queue_full`, `too_big`, `timeout`, `e2e_*`, `connect_*`, `aborted`).
 */
export class ProtocolError extends Error {
  constructor(
    public readonly code: ErrorCode,
    message: string,
    public readonly seq?: number,
    /**
     * True when the message this error is about may still have been carried out by the
     * server (it was sent, and the session ended before it was acknowledged: `reset`,
     * `closed`). False means it certainly was not.
     */
    public readonly outcomeUnknown: boolean = false,
  ) {
    super(`${code}: ${message}`);
    this.name = "ProtocolError";
  }
}

/** Connecting failed (see `ConnectErrorCode`); `status` is the HTTP status of `connect_http`. */
export class ConnectError extends ProtocolError {
  constructor(
    code: ConnectErrorCode,
    message: string,
    public readonly status?: number,
  ) {
    super(code, message);
    this.name = "ConnectError";
  }
}

export interface Events<T> {
  /** Welcomed: a fresh session (`resumed` false) or the same one resumed. */
  open: { clientId: string; resumed: boolean };
  /**
   * The server could not resume the session: a new id, and the old session's rooms
   * (`rooms`) rejoined, except those being left. Incoming room messages, requests and
   * responses sent to the old id since the last one delivered are lost: re-read the state of
   * those rooms. `lost`: the bodies of messages sent but not acknowledged, which may or may
   * not have been carried out; they are not resent (their promises reject with `reset`,
   * `outcomeUnknown` true). Messages never sent are sent in the new session.
   */
  reset: { previousId: string; clientId: string; lost: unknown[]; rooms: string[] };
  state: ConnectionState;
  message: RoomMessage<T>;
  join: { room: string; clientId: string };
  leave: { room: string; clientId: string };
  /** Errors no promise reports: server errors without a `seq`, refusals of the client's own
   * messages (rejoins, responses), undecryptable room messages, and the failure of the first
   * connection (a `ConnectError`, also the rejection of `connect` and `ready`). */
  error: ProtocolError;
}

type Listener<V> = (value: V) => void;

interface Outgoing {
  /** 0 until numbered, which happens when it is first written. */
  seq: number;
  body: Record<string, unknown>;
  text: string;
  /** UTF-8 bytes of `text` (before numbering: with the longest seq). */
  bytes: number;
  /** When it was last written on the current connection; 0: due now. */
  sentAt: number;
  /**
   * Times resent on the current connection after its timeout: each doubles the next timeout
   * (up to 8x), so that a congested path is not flooded with copies.
   */
  resends: number;
  /** When it was last resent because the server named it missing (0: never). */
  requestedAt: number;
  /** The server's refusal (an error with this seq), settled when the ack comes. */
  refused: ProtocolError | null;
  /** No caller awaits it (rejoins after a reset, responses): refusals go to `error`. */
  internal: boolean;
  requestId?: number;
  acked: () => void;
  failed: (e: ProtocolError) => void;
}

interface Waiting<R> {
  resolve: (value: R) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
  /** Its request was written (numbered): the server may have it. */
  sent: boolean;
}

const OPEN = 1;
/** The longest `seq` (2^53 - 1), for sizes before numbering. */
const MAX_SEQ = 9007199254740991;
/** How far past the last message received in order one ahead of a gap is kept. */
export const MAX_AHEAD = 1024;
/** The most ranges one ack names missing (the protocol's maximum). */
const MAX_MISSING_RANGES = 64;

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

function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

const noop = () => undefined;

/**
 * The server's per-connection frame rate, mirrored: a token bucket a little smaller and
 * slower than the server's (80% of the burst, 90% of the rate), so that network jitter never
 * bunches frames past its limit. Data messages leave a reserve for acks and heartbeats.
 */
class Pacer {
  private tokens: number;
  private last = now();
  private readonly cap: number;
  private readonly perMs: number;
  readonly reserve: number;

  constructor(perSecond: number, burst: number) {
    this.cap = Math.max(1, Math.floor(burst * 0.8));
    this.perMs = Math.max(0.001, (perSecond * 0.9) / 1000);
    this.reserve = Math.max(1, Math.min(10, Math.floor(this.cap / 10)));
    // The hello, sent before the limits were known.
    this.tokens = this.cap - 1;
  }

  private refill(): void {
    const t = now();
    this.tokens = Math.min(this.cap, this.tokens + (t - this.last) * this.perMs);
    this.last = t;
  }

  /** Takes a token if more than `reserve` are left. */
  take(reserve: number): boolean {
    this.refill();
    if (this.tokens >= 1 + reserve) {
      this.tokens -= 1;
      return true;
    }
    return false;
  }

  /** How long until `take(reserve)` can succeed, in ms. */
  waitMs(reserve: number): number {
    this.refill();
    return Math.max(1, Math.ceil((1 + reserve - this.tokens) / this.perMs));
  }
}

/**
 * One client session. `T`: room payloads; `Q`/`R`: request and response payloads.
 */
export class ReliableClient<T = unknown, Q = unknown, R = unknown> {
  clientId: string | null = null;
  state: ConnectionState = "connecting";

  private token: string | null = null;
  private ws: SocketLike | null = null;
  private readonly opts: Required<Omit<ClientOptions, "e2eKey" | "WebSocket" | "session" | "signal">>;
  private readonly factory: SocketFactory;
  private readonly key: E2EKey | null = null;
  private heartbeatMs = 15000;
  /** From the welcome; null until the first one. */
  private maxMessageBytes: number | null = null;
  private pacer: Pacer | null = null;

  /** Last seq given to an outgoing message. */
  private outSeq = 0;
  /** Accepted, never written (not numbered), in order. */
  private queue: Outgoing[] = [];
  /** Written (numbered) and not acknowledged, in seq order. */
  private unacked: Outgoing[] = [];
  private inFlightBytes = 0;
  /** Sends accepted and still being prepared (encryption). */
  private preparing = 0;
  /** Last seq received in order from the server; acks owed. */
  private inSeq = 0;
  private ackOwed = 0;
  /** Messages received ahead of a gap, by seq, on the current connection. */
  private ahead = new Map<number, any>();
  /** When an ack last named what is missing. */
  private missingToldAt = 0;
  private ackTimer: ReturnType<typeof setTimeout> | null = null;
  private pumpTimer: ReturnType<typeof setTimeout> | null = null;

  /** Rooms the server accepted this session into (and it has not accepted a leave of). */
  private rooms = new Set<string>();
  private nextRequestId = 1;
  private waiting = new Map<number, Waiting<R>>();
  private handler: ((req: IncomingRequest<Q>) => R | Promise<R>) | null = null;
  /** Bumped at every reset: answers to requests of an older session are not sent. */
  private epoch = 0;

  private timer: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private helloTimer: ReturnType<typeof setTimeout> | null = null;
  /** The deadline of the first welcome. */
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  /** Whether the current socket opened (a failure before is final for the first connection). */
  private opened = false;
  /** Settled by the first welcome, or by the failure of the first connection. */
  private readonly first: Promise<void>;
  private settleFirst: (e?: ProtocolError) => void = noop;
  /** What the current connection attempt failed with, as far as the socket said. */
  private failure: { message?: string; code?: string } | null = null;
  /** An error frame received before the first welcome (`too_many_clients`). */
  private refusal: ProtocolError | null = null;
  private lastHeard = 0;
  private lastHb = 0;
  private lastFastResend = 0;
  private attempts = 0;
  private welcomed = false;
  private everWelcomed = false;
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
      connectTimeoutMs: options.connectTimeoutMs ?? 10000,
      helloTimeoutMs: options.helloTimeoutMs ?? 5000,
      maxPending: options.maxPending ?? 1000,
      maxInFlight: options.maxInFlight ?? 256,
      maxInFlightBytes: options.maxInFlightBytes ?? 128 * 1024,
    };
    if (options.e2eKey !== undefined) {
      this.key = typeof options.e2eKey === "string" ? new E2EKey(options.e2eKey) : options.e2eKey;
    }
    if (options.session) {
      this.clientId = options.session.clientId;
      this.token = options.session.token;
      this.inSeq = options.session.lastSeq;
      this.rooms = new Set(options.session.rooms ?? []);
    }
    this.first = handled(
      new Promise<void>((resolve, reject) => {
        this.settleFirst = (e) => {
          this.settleFirst = noop;
          if (e) reject(e);
          else resolve();
        };
      }),
    );
    const signal = options.signal;
    if (signal) {
      const onAbort = () => {
        if (this.everWelcomed) this.close();
        else this.fail(new ConnectError("aborted", String(signal.reason ?? "aborted")));
      };
      if (signal.aborted) {
        queueMicrotask(onAbort);
      } else {
        signal.addEventListener("abort", onAbort, { once: true });
      }
    }
    if (signal?.aborted) return;
    this.connectTimer = setTimeout(() => {
      this.connectTimer = null;
      if (this.everWelcomed) return;
      const ws = this.ws;
      this.ws = null;
      try {
        ws?.close();
      } catch {
        // Not open yet: dropping it is all that can be done.
      }
      this.fail(new ConnectError("connect_timeout", `not welcomed within ${this.opts.connectTimeoutMs} ms`));
    }, this.opts.connectTimeoutMs);
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

  /**
   * Resolves once welcomed (at once if already). Before the first welcome, rejects with a
   * `ConnectError` (or the server's refusal, `too_many_clients`) if connecting fails.
   */
  async ready(): Promise<void> {
    if (this.welcomed) return;
    if (!this.everWelcomed) return this.first;
    if (this.closedByUser) throw new ProtocolError("closed", "client closed");
    await this.once("open");
  }

  /** A handle on one room: its own payload type, events and operations. */
  room<U = T>(name: string): Room<U> {
    return new Room<U>(this as unknown as ReliableClient<U, any, any>, name);
  }

  /** Joins a room; resolves when the server has accepted it (rejects with its refusal, e.g. `room_full`). */
  join(room: string): Promise<void> {
    return this.send({ op: "join", room });
  }

  /** Leaves a room; resolves when the server has accepted it (`not_member` if not joined). */
  leave(room: string): Promise<void> {
    return this.send({ op: "leave", room });
  }

  /** Publishes to a room (encrypted with `e2eKey` if set); resolves when accepted. */
  publish(room: string, data: T): Promise<void> {
    const key = this.key;
    if (!key) return this.send({ op: "publish", room, data });
    return this.send({ op: "publish", room }, { late: async () => ({ data: await key.encrypt(room, data) }) });
  }

  /** Sends a request to another client (by id); resolves with its response. */
  request(to: string, data: Q, options: { timeoutMs?: number } = {}): Promise<R> {
    return this.ask({ op: "request", to, data, timeoutMs: options.timeoutMs ?? this.opts.requestTimeoutMs });
  }

  /** The ids of a room's members, asked from the server. */
  async presence(room: string): Promise<string[]> {
    const r = (await this.ask({ op: "request", to: "server", data: { presence: room } })) as unknown as { members: string[] };
    return r.members;
  }

  /** Answers requests from other clients: the handler's result (or throw) is the response. */
  onRequest(handler: (req: IncomingRequest<Q>) => R | Promise<R>): void {
    this.handler = handler;
  }

  /**
   * Closes for good: no reconnect. Messages not yet sent reject with `closed`; messages sent
   * and not acknowledged reject with `closed` and `outcomeUnknown`.
   */
  close(): void {
    this.end(new ProtocolError("closed", "client closed before it was sent"));
  }

  /** The first connection failed: the client ends, and `connect` rejects with `e`. */
  private fail(e: ProtocolError): void {
    if (this.closedByUser) return;
    this.emit("error", e);
    this.end(e);
  }

  /** Ends the client for good; messages never sent reject with `unsent`. */
  private end(unsent: ProtocolError): void {
    if (this.closedByUser) return;
    this.closedByUser = true;
    this.settleFirst(unsent);
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.stopTimers();
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    this.pumpTimer = null;
    this.ws?.close(1000, "bye");
    this.ws = null;
    for (const [id, w] of this.waiting) {
      clearTimeout(w.timer);
      w.reject(w.sent ? new ProtocolError("closed", "client closed before the response", undefined, true) : unsent);
      this.waiting.delete(id);
    }
    for (const o of this.unacked) {
      o.failed(new ProtocolError("closed", "client closed before the server acknowledged it: it may or may not have been carried out", o.seq, true));
    }
    for (const o of this.queue) o.failed(unsent);
    this.unacked = [];
    this.queue = [];
    this.inFlightBytes = 0;
    this.setState("closed");
  }

  /** Messages accepted and not yet acknowledged. */
  get pending(): number {
    return this.queue.length + this.unacked.length + this.preparing;
  }

  /**
   * What `ClientOptions.session` needs to resume this session elsewhere (null before the
   * first welcome).
   */
  get session(): SavedSession | null {
    if (!this.everWelcomed || !this.clientId || !this.token) return null;
    return { clientId: this.clientId, token: this.token, lastSeq: this.inSeq, rooms: [...this.rooms] };
  }

  // ---- sending ----

  /** A request (to a client or the server): its promise ends with the response. */
  private ask(body: Record<string, unknown>): Promise<R> {
    const id = this.nextRequestId++;
    const timeoutMs = (body.timeoutMs as number | undefined) ?? this.opts.requestTimeoutMs;
    return handled(
      new Promise<R>((resolve, reject) => {
        const timer = setTimeout(() => this.requestTimedOut(id, timeoutMs), timeoutMs + 1000);
        this.waiting.set(id, { resolve, reject, timer, sent: false });
        // A refusal, a reset, a close: the request's own failure ends it.
        this.send({ ...body, id }, { requestId: id }).catch((e) => this.endRequest(id, e));
      }),
    );
  }

  private endRequest(id: number, e: Error): void {
    const w = this.waiting.get(id);
    if (!w) return;
    this.waiting.delete(id);
    clearTimeout(w.timer);
    w.reject(e);
  }

  private requestTimedOut(id: number, timeoutMs: number): void {
    if (!this.waiting.has(id)) return;
    // Never sent: it will not be (the timeout must not be a lie).
    const i = this.queue.findIndex((o) => o.requestId === id);
    if (i >= 0) {
      const [o] = this.queue.splice(i, 1);
      o.failed(new ProtocolError("timeout", "not sent in time"));
    }
    // The server's own timeout is the same: the margin covers a response in flight.
    this.endRequest(id, new ProtocolError("timeout", `no response within ${timeoutMs} ms`));
  }

  /**
   * Accepts a message: it waits in the queue until it can be written. `late` computes
   * fields asynchronously (encryption); the chain keeps the queue in call order.
   */
  private send(
    body: Record<string, unknown>,
    how: { late?: () => Promise<Record<string, unknown>>; internal?: boolean; requestId?: number } = {},
  ): Promise<void> {
    if (this.closedByUser) return handled(Promise.reject(new ProtocolError("closed", "client closed")));
    if (!how.internal && this.pending >= this.opts.maxPending) {
      return handled(
        Promise.reject(new ProtocolError("queue_full", `${this.pending} messages wait already (maxPending ${this.opts.maxPending})`)),
      );
    }
    this.preparing++;
    return handled(
      new Promise<void>((resolve, reject) => {
        this.sendChain = this.sendChain.then(async () => {
          let extra: Record<string, unknown> = {};
          try {
            if (how.late) extra = await how.late();
          } catch (e) {
            reject(e as Error);
            return;
          } finally {
            this.preparing--;
          }
          if (this.closedByUser) {
            reject(new ProtocolError("closed", "client closed"));
            return;
          }
          if (how.requestId !== undefined && !this.waiting.has(how.requestId)) {
            reject(new ProtocolError("timeout", "not sent in time"));
            return;
          }
          const out = this.outgoing({ ...body, ...extra }, resolve, reject, how);
          const tooBig = this.tooBig(out);
          if (tooBig) {
            reject(tooBig);
            return;
          }
          this.queue.push(out);
          this.pump();
        });
      }),
    );
  }

  private outgoing(
    body: Record<string, unknown>,
    acked: () => void,
    failed: (e: ProtocolError) => void,
    how: { internal?: boolean; requestId?: number },
  ): Outgoing {
    return {
      seq: 0,
      body,
      text: "",
      bytes: utf8Length(JSON.stringify({ t: "msg", seq: MAX_SEQ, ...body })),
      sentAt: 0,
      resends: 0,
      requestedAt: 0,
      refused: null,
      internal: !!how.internal,
      requestId: how.requestId,
      acked,
      failed,
    };
  }

  private tooBig(o: Outgoing): ProtocolError | null {
    if (this.maxMessageBytes === null || o.bytes <= this.maxMessageBytes) return null;
    return new ProtocolError("too_big", `${o.bytes} bytes: the server accepts at most ${this.maxMessageBytes} per message`);
  }

  /**
   * Writes what is due, paced: resends first (oldest first), then queued messages while the
   * in-flight window has room. Called whenever something may have become writable.
   */
  private pump(): void {
    const ws = this.ws;
    const pacer = this.pacer;
    if (!this.welcomed || !ws || ws.readyState !== OPEN || !pacer) return;
    const t = now();
    for (const out of this.unacked) {
      if (out.sentAt !== 0) {
        if (t - out.sentAt < this.opts.resendMs * 2 ** Math.min(out.resends, 3)) continue;
        out.resends++;
      }
      if (!pacer.take(pacer.reserve)) return this.pumpLater();
      this.write(out);
    }
    while (
      this.queue.length > 0 &&
      this.unacked.length < this.opts.maxInFlight &&
      (this.unacked.length === 0 || this.inFlightBytes + this.queue[0].bytes <= this.opts.maxInFlightBytes)
    ) {
      if (!pacer.take(pacer.reserve)) return this.pumpLater();
      const out = this.queue.shift()!;
      out.seq = ++this.outSeq;
      out.text = JSON.stringify({ t: "msg", seq: out.seq, ...out.body });
      out.bytes = utf8Length(out.text);
      this.unacked.push(out);
      this.inFlightBytes += out.bytes;
      if (out.requestId !== undefined) {
        const w = this.waiting.get(out.requestId);
        if (w) w.sent = true;
      }
      this.write(out);
    }
  }

  private pumpLater(): void {
    if (this.pumpTimer || !this.pacer) return;
    this.pumpTimer = setTimeout(() => {
      this.pumpTimer = null;
      this.pump();
    }, this.pacer.waitMs(this.pacer.reserve));
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

  /** Writes a frame that is not a message (ack, hb) if the pace allows. */
  private control(frame: Record<string, unknown>): boolean {
    if (!this.pacer || !this.pacer.take(0)) return false;
    this.raw(JSON.stringify(frame));
    return true;
  }

  // ---- connection ----

  private open(): void {
    this.welcomed = false;
    this.setState(this.attempts === 0 && !this.everWelcomed ? "connecting" : "reconnecting");
    let ws: SocketLike;
    this.failure = null;
    this.opened = false;
    try {
      ws = new this.factory(this.opts.url);
    } catch (e) {
      // A bad URL: it will not get better.
      const message = String((e as Error)?.message ?? e);
      if (!this.everWelcomed) queueMicrotask(() => this.fail(new ConnectError("connect_failed", message)));
      else this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.opened = true;
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
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      if (!this.everWelcomed && (!this.opened || this.refusal)) {
        this.ws = null;
        this.fail(this.refusal ?? connectError(this.failure, ev?.code));
        return;
      }
      this.lost();
    };
    ws.onerror = (ev) => {
      // Followed by onclose. Node's `ws` says why (browsers do not).
      if (this.ws === ws) this.failure = { message: ev?.message ?? ev?.error?.message, code: ev?.error?.code };
    };
    this.helloTimer = setTimeout(() => {
      // A first connection still opening is left to the connect deadline.
      if (this.ws === ws && !this.welcomed && (this.opened || this.everWelcomed)) this.drop(ws);
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
    this.pacer = null;
    // The resume resends everything after inSeq.
    this.ahead.clear();
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
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    this.timer = this.helloTimer = this.ackTimer = this.pumpTimer = null;
  }

  private onWelcome(f: any): void {
    if (this.helloTimer) clearTimeout(this.helloTimer);
    const num = (v: unknown, d: number) => (typeof v === "number" && v > 0 ? v : d);
    this.heartbeatMs = num(f.heartbeatMs, 15000);
    // Servers before these fields: their defaults, and no size known.
    this.maxMessageBytes = typeof f.maxMessageBytes === "number" ? f.maxMessageBytes : null;
    this.pacer = new Pacer(num(f.messagesPerSecond, 200), num(f.messageBurst, 400));
    const previousId = this.clientId;
    if (f.resumed) {
      this.ack(Number(f.seq));
      // A session restored from `session` learns its numbering here.
      this.outSeq = Math.max(this.outSeq, Number(f.seq));
      // Everything unacknowledged is resent on the new connection.
      for (const o of this.unacked) {
        o.sentAt = 0;
        o.resends = 0;
      }
    } else if (previousId !== null) {
      this.reset(previousId, f);
    }
    this.clientId = f.clientId;
    this.token = f.token;
    this.welcomed = true;
    this.everWelcomed = true;
    this.attempts = 0;
    this.lastHeard = this.lastHb = now();
    // Messages accepted before the limit was known.
    for (const o of [...this.queue]) {
      const e = this.tooBig(o);
      if (e) {
        this.queue.splice(this.queue.indexOf(o), 1);
        o.failed(e);
      }
    }
    this.setState("open");
    const tick = Math.max(5, Math.min(this.heartbeatMs, this.opts.resendMs) / 4);
    if (this.timer) clearInterval(this.timer);
    this.timer = setInterval(() => this.onTick(), tick);
    this.emit("open", { clientId: f.clientId, resumed: !!f.resumed });
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.settleFirst();
    this.pump();
  }

  /**
   * A new session replaces the old one: what may have reached the old one is reported, not
   * resent; what never left is sent in the new one; rooms are rejoined.
   */
  private reset(previousId: string, f: any): void {
    const leaving = new Set<string>();
    const lost: unknown[] = [];
    for (const o of this.unacked) {
      if (o.refused) {
        // Refused: certainly not carried out.
        if (o.internal) this.emit("error", o.refused);
        o.failed(o.refused);
      } else if (o.body.op === "leave") {
        // Done: the new session is in no room.
        leaving.add(o.body.room as string);
        o.acked();
      } else if (!o.internal) {
        lost.push(o.body);
        o.failed(new ProtocolError("reset", "the session was reset before the server acknowledged it: it may or may not have been carried out", o.seq, true));
      }
    }
    const keep: Outgoing[] = [];
    for (const o of this.queue) {
      if (o.body.op === "leave") {
        leaving.add(o.body.room as string);
        o.acked();
      } else if (!o.internal) {
        // Answers to the old session's requests and its rejoins are dropped.
        keep.push(o);
      }
    }
    for (const [id, w] of this.waiting) {
      if (w.sent) this.endRequest(id, new ProtocolError("reset", "the session was reset before the response: the request may or may not have been carried out", undefined, true));
    }
    const rooms = [...this.rooms];
    this.rooms = new Set();
    this.unacked = [];
    this.inFlightBytes = 0;
    this.outSeq = 0;
    this.inSeq = 0;
    this.ackOwed = 0;
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.ackTimer = null;
    this.epoch++;
    this.clientId = f.clientId;
    this.token = f.token;
    const rejoin = rooms
      .filter((room) => !leaving.has(room))
      .map((room) => this.outgoing({ op: "join", room }, noop, noop, { internal: true }));
    this.queue = [...rejoin, ...keep];
    this.emit("reset", { previousId, clientId: f.clientId, lost, rooms });
  }

  private onTick(): void {
    const ws = this.ws;
    if (!ws) return;
    const t = now();
    if (t - this.lastHeard >= 2 * this.heartbeatMs) {
      this.drop(ws);
      return;
    }
    if (t - this.lastHb >= this.heartbeatMs && this.control(this.withMissing({ t: "hb", ack: this.inSeq }))) {
      this.lastHb = t;
      this.ackOwed = 0;
    } else if (this.ahead.size > 0 && t - this.missingToldAt >= this.opts.resendMs / 8) {
      // Still a gap: say so again, in case that ack was lost too.
      this.ackOwed = Math.max(this.ackOwed, 1);
      this.sendAck();
    }
    this.pump();
  }

  /** Adds `missing` (the gaps before the messages kept ahead) to an ack or heartbeat. */
  private withMissing(frame: Record<string, unknown>): Record<string, unknown> {
    if (this.ahead.size === 0) return frame;
    const missing: [number, number][] = [];
    let next = this.inSeq + 1;
    for (const seq of [...this.ahead.keys()].sort((a, b) => a - b)) {
      if (seq > next) {
        if (missing.length === MAX_MISSING_RANGES) break;
        missing.push([next, seq - 1]);
      }
      next = seq + 1;
    }
    this.missingToldAt = now();
    return { ...frame, missing };
  }

  /** The server names messages it misses (it has later ones): resent at once. */
  private resendMissing(missing: unknown): void {
    if (!Array.isArray(missing)) return;
    const t = now();
    let any = false;
    for (const range of missing) {
      if (!Array.isArray(range)) continue;
      const [from, to] = [Number(range[0]), Number(range[1])];
      for (const o of this.unacked) {
        if (o.seq < from || o.seq > to || o.sentAt === 0) continue;
        // Asked again before the resend could arrive: one copy is enough.
        if (o.requestedAt !== 0 && t - o.requestedAt < this.opts.resendMs / 8) continue;
        o.requestedAt = t;
        o.sentAt = 0;
        any = true;
      }
    }
    if (any) this.pump();
  }

  /** A cumulative ack from the server: settles what it covers. */
  private ack(seq: number): void {
    let settled = false;
    while (this.unacked.length > 0 && this.unacked[0].seq <= seq) {
      const out = this.unacked.shift()!;
      this.inFlightBytes -= out.bytes;
      settled = true;
      if (out.refused) {
        if (out.internal) this.emit("error", out.refused);
        out.failed(out.refused);
        continue;
      }
      if (out.body.op === "join") this.rooms.add(out.body.room as string);
      if (out.body.op === "leave") this.rooms.delete(out.body.room as string);
      out.acked();
    }
    if (settled) this.pump();
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
    if (this.ackOwed === 0) return;
    if (!this.control(this.withMissing({ t: "ack", seq: this.inSeq }))) {
      // Out of pace: one cumulative ack a little later covers everything owed by then.
      if (this.pacer) this.ackTimer = setTimeout(() => this.sendAck(), this.pacer.waitMs(0));
      return;
    }
    this.ackOwed = 0;
  }

  private onFrame(f: any): void {
    switch (f?.t) {
      case "welcome":
        this.onWelcome(f);
        return;
      case "ack":
        this.ack(Number(f.seq));
        this.resendMissing(f.missing);
        return;
      case "hb":
        this.ack(Number(f.ack));
        this.resendMissing(f.missing);
        return;
      case "error": {
        const seq = typeof f.seq === "number" ? f.seq : undefined;
        const e = wireError(f.code, f.message, seq);
        if (!this.everWelcomed) {
          // A refusal of the hello (too_many_clients): the rejection of `connect`.
          this.refusal = e;
          return;
        }
        if (f.code === "seq_gap") {
          // Something we sent was lost: resend everything unacknowledged now, at most once
          // per half resend period (every message after the lost one reports the same gap).
          const t = now();
          if (t - this.lastFastResend >= this.opts.resendMs / 2) {
            this.lastFastResend = t;
            for (const o of this.unacked) o.sentAt = 0;
            this.pump();
          }
          return;
        }
        // A refusal of one of our messages: settled (rejected) when its ack comes.
        const out = seq === undefined ? undefined : this.unacked.find((o) => o.seq === seq);
        if (out) {
          out.refused = e;
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
      // Ahead of a gap (a message before it was lost): kept, and the gap named at once,
      // unless it was just named (every message after a loss would repeat it).
      if (seq - this.inSeq > MAX_AHEAD || this.ahead.has(seq)) {
        this.owe();
        return;
      }
      this.ahead.set(seq, f);
      this.ackOwed++;
      if (now() - this.missingToldAt >= this.opts.resendMs / 8) this.sendAck();
      else this.owe();
      return;
    }
    this.accept(f);
    for (let next = this.ahead.get(this.inSeq + 1); next !== undefined; next = this.ahead.get(this.inSeq + 1)) {
      this.ahead.delete(this.inSeq + 1);
      this.accept(next);
    }
  }

  /** The next message in order: counted, acknowledged in time, delivered. */
  private accept(f: any): void {
    this.inSeq = Number(f.seq);
    this.owe();
    this.deliverChain = this.deliverChain
      .then(() => this.deliver(f))
      .catch((e) => {
        this.emit("error", new ProtocolError("client", String(e)));
      });
  }

  private async deliver(f: any): Promise<void> {
    switch (f.op) {
      case undefined: {
        let data = f.data;
        if (this.key) {
          try {
            data = await this.key.decrypt(String(f.room), data);
          } catch (e) {
            const plain = !(typeof data === "object" && data !== null && "enc" in data);
            this.emit(
              "error",
              plain
                ? new ProtocolError("e2e_plaintext", `unencrypted message in room ${f.room} from ${f.from}: not delivered`)
                : new ProtocolError("e2e_decrypt", `message in room ${f.room} from ${f.from} does not decrypt (${String((e as Error)?.message ?? e)}): not delivered`),
            );
            return;
          }
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
          w.reject(wireError(f.error?.code, f.error?.message));
        } else {
          w.resolve(f.data as R);
        }
        return;
      }
      case "request": {
        const handler = this.handler;
        const epoch = this.epoch;
        const reply = (body: Record<string, unknown>) => {
          // The requester asked the old session: a new one cannot answer.
          if (this.epoch !== epoch) return;
          this.send({ op: "response", id: f.id, to: f.from, ...body }, { internal: true }).catch(noop);
        };
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

/** What a room handle's listeners receive. */
export interface RoomEvents<T> {
  message: { from: string; data: T };
  join: { clientId: string };
  leave: { clientId: string };
}

/**
 * One room of a client (`client.room<T>(name)`), with its own payload type: its operations,
 * and its events only. Handles are cheap: any number may exist for a room.
 */
export class Room<T = unknown> {
  constructor(
    // Request and response types do not matter to a room.
    private readonly client: ReliableClient<T, any, any>,
    public readonly name: string,
  ) {}

  /** Joins it (see `ReliableClient.join`). */
  join(): Promise<void> {
    return this.client.join(this.name);
  }

  leave(): Promise<void> {
    return this.client.leave(this.name);
  }

  publish(data: T): Promise<void> {
    return this.client.publish(this.name, data);
  }

  /** Its members' ids (the client must be a member). */
  presence(): Promise<string[]> {
    return this.client.presence(this.name);
  }

  /** Listens to this room's messages, joins or leaves; returns the function that stops it. */
  on<K extends keyof RoomEvents<T>>(event: K, listener: (value: RoomEvents<T>[K]) => void): () => void {
    const name = this.name;
    switch (event) {
      case "message":
        return this.client.on("message", (m) => {
          if (m.room === name) (listener as (v: RoomEvents<T>["message"]) => void)({ from: m.from, data: m.data });
        });
      case "join":
      case "leave":
        return this.client.on(event as "join" | "leave", (m) => {
          if (m.room === name) (listener as (v: { clientId: string }) => void)({ clientId: m.clientId });
        });
      default:
        throw new TypeError(`no room event ${String(event)}`);
    }
  }

  /** Resolves with the next `event` of this room. */
  once<K extends keyof RoomEvents<T>>(event: K): Promise<RoomEvents<T>[K]> {
    return new Promise((resolve) => {
      const off = this.on(event, (v) => {
        off();
        resolve(v);
      });
    });
  }
}

/**
 * Connects; resolves once welcomed, rejects with a `ConnectError` if the connection fails
 * (see `ClientOptions.connectTimeoutMs` and `signal`).
 */
export async function connect<T = unknown, Q = unknown, R = unknown>(
  options: ClientOptions,
): Promise<ReliableClient<T, Q, R>> {
  const c = new ReliableClient<T, Q, R>(options);
  await c.ready();
  return c;
}

/** The ConnectError for a socket that closed before its welcome. */
function connectError(failure: { message?: string; code?: string } | null, closeCode?: number): ConnectError {
  const message = failure?.message ?? `connection closed before the welcome${closeCode ? ` (close ${closeCode})` : ""}`;
  const status = /Unexpected server response: (\d+)/.exec(message);
  if (status) return new ConnectError("connect_http", message, Number(status[1]));
  const refused = ["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ECONNRESET"];
  if (failure?.code && refused.includes(failure.code)) return new ConnectError("connect_refused", message);
  return new ConnectError("connect_failed", message);
}
