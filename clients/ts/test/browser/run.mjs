// The browser test: the built client (dist/, ES modules served as they are) in headless
// Chromium against the real server. Chromium: $CHROMIUM, else /usr/bin/chromium.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

import { createServer as createTcpServer } from "node:net";

import { startProxy, startServer } from "../helpers.mjs";

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const types = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json" };

// A static server for the package directory (the page and dist/).
const http = createServer(async (req, res) => {
  const rel = decodeURIComponent(new URL(req.url, "http://x").pathname);
  const file = path.join(pkg, path.normalize(rel));
  if (!file.startsWith(pkg + path.sep)) {
    res.writeHead(403).end();
    return;
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" }).end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((r) => http.listen(0, "127.0.0.1", r));
const server = await startServer();
const lossy = await startProxy(server.url, { dropRate: 0.03 });
// A port nothing listens on.
const probe = createTcpServer();
await new Promise((r) => probe.listen(0, "127.0.0.1", r));
const dead = `ws://127.0.0.1:${probe.address().port}/v1/reliable`;
await new Promise((r) => probe.close(r));
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" });
let failed = false;
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log(`browser: ${m.text()}`));
  page.on("pageerror", (e) => console.log(`browser error: ${e}`));
  const pageUrl = `http://127.0.0.1:${http.address().port}/test/browser/page.html?ws=${encodeURIComponent(server.url)}&lossy=${encodeURIComponent(lossy.url)}&dead=${encodeURIComponent(dead)}`;
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 60000 });
  const r = await page.evaluate(() => window.__result);
  assert.equal(r.error, undefined, r.error);
  assert.deepEqual(r.got, Array.from({ length: 50 }, (_, i) => i + 1));
  assert.equal(r.answer, "SHOUT");
  assert.equal(r.members, 2);
  assert.equal(r.sameIds, true);
  assert.equal(r.timeout, "timeout");
  assert.equal(r.resumed, true, "a saved session resumes with its token");
  // Browsers do not say why a connection failed: refused and HTTP errors are connect_failed.
  assert.equal(r.dead, "connect_failed");
  assert.equal(r.aborted, "aborted");
  assert.equal(r.errorEvent, "connect_failed");
  assert.equal(r.lossOk, true, "through the lossy proxy: exactly once, in order");
  assert.ok(lossy.stats.dropped > 0, "the proxy dropped frames");
  console.log(`browser test: ok (${await browser.version()})`);
} catch (e) {
  failed = true;
  console.error(`browser test: FAILED: ${e.stack ?? e}`);
} finally {
  await browser.close();
  await lossy.close();
  await server.stop();
  http.close();
}
process.exit(failed ? 1 : 0);
