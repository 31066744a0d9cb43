// Compiled (not run) by `npm run test:types`: the package's types in a Node-only project.
import {
  connect,
  connectNode,
  ConnectError,
  importKey,
  ProtocolError,
  ReliableClient,
  type ErrorCode,
  type Key,
  type Room,
  type RoomMessage,
  type SavedSession,
} from "../../dist/node.js";

export async function use(saved: SavedSession | null, signal: AbortSignal): Promise<void> {
  const key: Key = await importKey("k", { salt: "app" });
  const c = await connectNode<{ n: number }, string, number>({
    url: "ws://x/v1/reliable",
    e2eKey: key,
    session: saved ?? undefined,
    connectTimeoutMs: 3000,
    signal,
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
  // Codes are the documented union.
  c.on("error", (err) => {
    const code: ErrorCode = err.code;
    // @ts-expect-error not a documented code
    const wrong = err.code === "no_such_code";
    void code, wrong;
    if (err instanceof ConnectError && err.code === "connect_http") {
      const status: number | undefined = err.status;
      void status;
    }
  });
  // Rooms have payload types of their own.
  const chat: Room<{ text: string }> = c.room<{ text: string }>("chat");
  await chat.join();
  chat.on("message", (m) => {
    const text: string = m.data.text;
    void text, m.from;
  });
  await chat.publish({ text: "hi" });
  // @ts-expect-error wrong payload type for this room
  await chat.publish({ n: 1 });
  const other = await connect<string>({ url: "ws://x/v1/reliable" });
  await other.publish("r", "text");
}
