// The status page at / renders in Chromium and shows the protocol version.
import assert from 'node:assert/strict';
import { startServer, launchBrowser } from './lib.mjs';

const server = await startServer();
const browser = await launchBrowser();
try {
  const page = await browser.newPage();
  const res = await page.goto(server.url + '/');
  assert.equal(res.status(), 200);
  assert.match(await page.textContent('h1'), /^supersynk /);
  assert.equal(await page.textContent('#sessions'), '0');
} finally {
  await browser.close();
  await server.stop();
}
