// The status page at / renders in Chromium: the server's version and the public figures,
// and, without --admin-token, the note that the admin dashboard is off.
import assert from 'node:assert/strict';
import { startServer, launchBrowser, watch } from './lib.mjs';

const server = await startServer();
const browser = await launchBrowser();
try {
  const page = await browser.newPage();
  const problems = watch(page);
  const res = await page.goto(server.url + '/');
  assert.equal(res.status(), 200);
  assert.match(await page.title(), /^supersynk \d+\.\d+\.\d+/);
  assert.match(await page.textContent('.brand'), /supersynk\s+v\d+\.\d+\.\d+/);
  assert.equal(await page.textContent('#sessions'), '0');
  assert.equal(await page.isVisible('#admin-off'), true);
  problems.check();
} finally {
  await browser.close();
  await server.stop();
}
