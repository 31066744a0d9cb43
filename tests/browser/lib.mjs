// Shared helpers of the browser tests: start the real server binary, launch Debian's
// headless Chromium through playwright-core, wait for conditions.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

/** The server binary: SUPERSYNK_BIN (set by the Rust test that runs this script). */
export const BIN = process.env.SUPERSYNK_BIN ?? 'target/debug/supersynk';

/** A fresh data directory. */
export function dataDir() {
  return mkdtempSync(join(tmpdir(), 'supersynk-browser-'));
}

/**
 * Starts the server with `args` (on 127.0.0.1, port 0 unless args say otherwise) and resolves
 * to { url, port, stop() } once it logs "listening".
 */
export function startServer(args = []) {
  const all = ['--bind', '127.0.0.1', ...(args.includes('--port') ? [] : ['--port', '0']), ...args];
  if (!all.includes('--data-dir')) all.push('--data-dir', dataDir());
  const proc = spawn(BIN, all, {
    env: { ...process.env, SUPERSYNK_LOG_FORMAT: 'json' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  return new Promise((resolve, reject) => {
    proc.once('error', reject);
    proc.once('exit', (code) => reject(new Error(`server exited with ${code} before listening`)));
    const lines = createInterface({ input: proc.stdout });
    lines.on('line', (line) => {
      let v;
      try { v = JSON.parse(line); } catch { return; }
      if (v.fields?.message === 'listening') {
        const port = Number(v.fields.local_addr.split(':').pop());
        resolve({
          port,
          url: `http://127.0.0.1:${port}`,
          /** SIGTERM, and resolves once the process has exited. */
          stop: () => { proc.kill('SIGTERM'); return exited; },
        });
      }
    });
  });
}

/** Headless Chromium (CHROMIUM or /usr/bin/chromium). */
export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
}

/** Polls `check` (sync or async) until it returns a truthy value or `ms` pass. */
export async function eventually(what, check, ms = 10000) {
  const until = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > until) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
