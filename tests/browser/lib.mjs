// Shared helpers of the browser tests: start the real server binary, launch Debian's
// headless Chromium through playwright-core, wait for conditions.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdtempSync, mkdirSync } from 'node:fs';
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

/** Where screenshots go: SCREENSHOTS (target/screenshots when run by cargo test). */
export const SCREENSHOTS = process.env.SCREENSHOTS ?? join(tmpdir(), 'supersynk-screenshots');

/** A full-page screenshot named `name`.png in SCREENSHOTS; prints its path. */
export async function screenshot(page, name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  const path = join(SCREENSHOTS, name + '.png');
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path, fullPage: true });
  console.log('screenshot: ' + path);
  return path;
}

/**
 * Collects what must not happen on a page: script errors and anything its
 * Content-Security-Policy blocked. `check()` throws if either happened.
 */
export function watch(page) {
  const problems = [];
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) problems.push('CSP: ' + m.text()); });
  return { check() { if (problems.length) throw new Error(problems.join('\n')); } };
}

/**
 * What does not fit the page's width: the page scrolls sideways, or an element that should be
 * seen (matching `selector`) is cut off or outside the viewport. Returns a list (empty: fine).
 */
export function overflowing(page, selector) {
  return page.evaluate((selector) => {
    const out = [];
    const width = document.documentElement.clientWidth;
    if (document.documentElement.scrollWidth > width) out.push(`page is ${document.documentElement.scrollWidth}px wide`);
    for (const el of document.querySelectorAll(selector)) {
      const b = el.getBoundingClientRect();
      if (b.width === 0 && b.height === 0) continue; // not shown at all
      if (b.left < 0 || b.right > width + 0.5) out.push(`${el.id || el.className}: ${b.left}..${b.right}`);
      if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible' && el.tagName !== 'CANVAS') {
        out.push(`${el.id || el.className} cuts its content (${el.scrollWidth} > ${el.clientWidth}): ${el.textContent.slice(0, 40)}`);
      }
    }
    return out;
  }, selector);
}
