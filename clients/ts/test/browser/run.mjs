// The browser test: the built client (dist/, ES modules served as they are) in headless
// Chromium against the real server. Chromium: $CHROMIUM, else /usr/bin/chromium.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

import { startServer } from "../helpers.mjs";

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
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" });
let failed = false;
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log(`browser: ${m.text()}`));
  page.on("pageerror", (e) => console.log(`browser error: ${e}`));
  const pageUrl = `http://127.0.0.1:${http.address().port}/test/browser/page.html?ws=${encodeURIComponent(server.url)}`;
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 30000 });
  const r = await page.evaluate(() => window.__result);
  assert.equal(r.error, undefined, r.error);
  assert.deepEqual(r.got, Array.from({ length: 50 }, (_, i) => i + 1));
  assert.equal(r.answer, "SHOUT");
  assert.equal(r.members, 2);
  assert.equal(r.sameIds, true);
  assert.equal(r.timeout, "timeout");
  console.log(`browser test: ok (${await browser.version()})`);
} catch (e) {
  failed = true;
  console.error(`browser test: FAILED: ${e.stack ?? e}`);
} finally {
  await browser.close();
  await server.stop();
  http.close();
}
process.exit(failed ? 1 : 0);
