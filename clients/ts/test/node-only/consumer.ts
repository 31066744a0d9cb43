// Compiled (not run) by `npm run test:types`: the package's types in a Node-only project.
import {
  connectNode,
  importKey,
  ProtocolError,
  ReliableClient,
  type Key,
  type RoomMessage,
  type SavedSession,
} from "../../dist/node.js";

export async function use(saved: SavedSession | null): Promise<void> {
  const key: Key = await importKey("k", { salt: "app" });
  const c = await connectNode<{ n: number }, string, number>({
    url: "ws://x/v1/reliable",
    e2eKey: key,
    session: saved ?? undefined,
  });
  c.on("message", (m: RoomMessage<{ n: number }>) => {
    const n: number = m.data.n;
    void n;
  });
  c.on("reset", (r) => {
    const rooms: string[] = r.rooms;
    void rooms;
  });
  const r: number = await c.request("id", "q");
  await c.publish("room", { n: 1 });
  // @ts-expect-error wrong payload type
  await c.publish("room", { n: "x" });
  const s: SavedSession | null = c.session;
  const x: ReliableClient = c as unknown as ReliableClient;
  const e = new ProtocolError("reset", "m", 1, true);
  void x, r, s, e.outcomeUnknown;
}
