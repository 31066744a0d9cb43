// /messages.html in Chromium: two peers side by side exchange messages, a message to a
// closed peer is queued and shown when it logs in again, and a refused login says so.
import assert from 'node:assert/strict';
import { startServer, launchBrowser, eventually } from './lib.mjs';

const server = await startServer();
const browser = await launchBrowser();
try {
  const page = await browser.newPage();
  await page.goto(server.url + '/messages.html');
  const [a, b] = await page.locator('section.peer').all();
  await a.locator('.login').click();
  await b.locator('.login').click();
  await eventually('both online', async () =>
    (await a.locator('.status').textContent()) === 'online as A' &&
    (await b.locator('.status').textContent()) === 'online as B');

  await a.locator('.msg').fill('hello from A');
  await a.locator('.send-button').click();
  await eventually('B shows the message', async () =>
    (await b.locator('li.in').allTextContents()).includes('A: hello from A'));

  // B closes; A's next message is queued, with the original's answer.
  await b.locator('.logout').click();
  await eventually('B offline', async () =>
    (await b.locator('.status').textContent()).startsWith('offline'));
  await a.locator('.msg').fill('while B was away');
  await a.locator('.send-button').click();
  await eventually('A told B is offline', async () =>
    (await a.locator('li.error').allTextContents()).includes(
      'connection to B closed, messages will be sent as B comes back online'));

  await b.locator('.login').click();
  await eventually('B gets the queued message', async () =>
    (await b.locator('li.in').allTextContents()).includes('A: while B was away'));
} finally {
  await server.stop();
}

// A server with a secret: a login without a token is refused, and the page says so.
const guarded = await startServer(['--messages-secret', 's3cret']);
try {
  const page = await browser.newPage();
  await page.goto(guarded.url + '/messages.html');
  const [a] = await page.locator('section.peer').all();
  await a.locator('.login').click();
  await eventually('the refusal shown as the status', async () =>
    (await a.locator('.status').textContent()) === 'not logged in: login as A requires a token');
  assert.equal(await a.locator('.login').isDisabled(), false);
} finally {
  await browser.close();
  await guarded.stop();
}
