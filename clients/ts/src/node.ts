/**
 * The Node entry point: the same client, with the `ws` package as its WebSocket (Node 20 has
 * no global WebSocket). `import { connect } from "supersynk-reliable/node"`.
 */

import WebSocket from "ws";

import { type ClientOptions, ReliableClient, type SocketFactory } from "./index.js";

export * from "./index.js";

/** Node's WebSocket for the client. */
export const NodeWebSocket = WebSocket as unknown as SocketFactory;

/** Connects with `ws` (unless options.WebSocket is given); resolves once welcomed. */
export async function connectNode<T = unknown, Q = unknown, R = unknown>(
  options: ClientOptions,
): Promise<ReliableClient<T, Q, R>> {
  const c = new ReliableClient<T, Q, R>({ WebSocket: NodeWebSocket, ...options });
  await c.ready();
  return c;
}
