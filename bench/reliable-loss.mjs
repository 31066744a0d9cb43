// Recovery under loss on the reliable protocol: the TypeScript client (clients/ts, built)
// on both ends, each through its own lossy proxy (the tests' proxy: each WebSocket message
// dropped with probability LOSS, both directions). A publishes N messages to a room at once;
// the run ends when B has all of them and every publish of A is acknowledged. Checks exactly
// once and in order; prints each run's time and the median, and writes the runs as JSON.
//   node bench/reliable-loss.mjs ws://127.0.0.1:5001/v1/reliable [N=600] [LOSS=0.03] [RUNS=5] [out.json]
// Run it against a server with the default limits (the client paces itself to them):
// bench/run.sh reliable does.
import { writeFileSync } from 'node:fs';

import { connectNode } from '../clients/ts/dist/node.js';
import { startProxy } from '../clients/ts/test/helpers.mjs';

const url = process.argv[2] ?? 'ws://127.0.0.1:5001/v1/reliable';
const n = Number(process.argv[3] ?? 600);
const loss = Number(process.argv[4] ?? 0.03);
const runs = Number(process.argv[5] ?? 5);
const out = process.argv[6];
const deadlineMs = 180_000;

async function once(run) {
  const pa = await startProxy(url, { dropRate: loss });
  const pb = await startProxy(url, { dropRate: loss });
  const a = await connectNode({ url: pa.url });
  const b = await connectNode({ url: pb.url });
  const room = `loss-${process.pid}-${run}`;
  try {
    await b.join(room);
    await a.join(room);
    const got = [];
    let done;
    const all = new Promise((resolve) => (done = resolve));
    b.on('message', (m) => {
      got.push(m.data.n);
      if (got.length === n) done();
    });
    const started = performance.now();
    const sends = Array.from({ length: n }, (_, i) => a.publish(room, { n: i + 1 }));
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`not done in ${deadlineMs} ms: B has ${got.length}`)), deadlineMs);
    });
    await Promise.race([Promise.all([all, Promise.all(sends)]), late]);
    clearTimeout(timer);
    const ms = performance.now() - started;
    const inOrder = got.length === n && got.every((v, i) => v === i + 1);
    if (!inOrder) throw new Error(`not exactly once in order: ${JSON.stringify(got.slice(0, 20))}...`);
    const dropped = pa.stats.dropped + pb.stats.dropped;
    const forwarded = pa.stats.forwarded + pb.stats.forwarded;
    return { ms: Math.round(ms), dropped, forwarded };
  } finally {
    a.close();
    b.close();
    await pa.close();
    await pb.close();
  }
}

const results = [];
for (let run = 1; run <= runs; run++) {
  const r = await once(run);
  results.push(r);
  console.log(`run ${run}: ${n} messages at ${loss * 100}% loss in ${r.ms} ms (${r.dropped} of ${r.dropped + r.forwarded} frames dropped)`);
}
const times = results.map((r) => r.ms).sort((x, y) => x - y);
const median = times[Math.floor(times.length / 2)];
console.log(`reliable-loss: n=${n} loss=${loss} runs=${runs} median_ms=${median} min_ms=${times[0]} max_ms=${times.at(-1)}`);
if (out) writeFileSync(out, JSON.stringify({ n, loss, runs: results, median_ms: median }, null, 1));
process.exit(0);
