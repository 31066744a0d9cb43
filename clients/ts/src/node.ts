/**
 * The Node entry point: the same client, with the `ws` package as its WebSocket (Node 20 has
 * no global WebSocket). `import { connect } from "supersynk-reliable/node"` (or
 * `connectNode`, the same); `new ReliableClient(...)` from here uses `ws` too.
 */

import WebSocket from "ws";

import { type ClientOptions, ReliableClient as BaseClient, type SocketFactory } from "./index.js";

export * from "./index.js";

/** Node's WebSocket for the client. */
export const NodeWebSocket = WebSocket as unknown as SocketFactory;

/** The client, on `ws` unless `options.WebSocket` says otherwise. */
export class ReliableClient<T = unknown, Q = unknown, R = unknown> extends BaseClient<T, Q, R> {
  constructor(options: ClientOptions) {
    super({ WebSocket: NodeWebSocket, ...options });
  }
}

/**
 * Connects with `ws` (unless options.WebSocket is given); resolves once welcomed, rejects
 * with a `ConnectError` if the connection fails.
 */
export async function connectNode<T = unknown, Q = unknown, R = unknown>(
  options: ClientOptions,
): Promise<ReliableClient<T, Q, R>> {
  const c = new ReliableClient<T, Q, R>(options);
  await c.ready();
  return c;
}

/** `connectNode`, under the browser entry's name. */
export const connect = connectNode;
