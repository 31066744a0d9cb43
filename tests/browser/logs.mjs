// The log viewer at /logs.html in Chromium: entries posted to /logs/add appear, filters
// work as you type, pause holds entries back, the page reconnects by itself after a server
// restart and backfills from /logs/query what was stored while it was away, Clear and "Load
// older" start over, a page told it missed entries loads them, and 100,000 entries keep the
// DOM small (virtual scrolling). Prints the measured numbers (they are reported, not
// asserted).
import assert from 'node:assert/strict';
import { startServer, launchBrowser, eventually, dataDir } from './lib.mjs';

const dir = dataDir();
// A big listener buffer: this test loads 100,000 entries as fast as it can post them.
const args = ['--data-dir', dir, '--logs-listener-buffer-bytes', String(256 << 20)];
let server = await startServer(args);
const browser = await launchBrowser();

function entry(user, room, level, msg) {
  const now = Date.now();
  return { timestamp: now, level, msg, text: `00:00:00:000 [${level}] ${msg}`, user, room };
}

async function post(url, body) {
  const res = await fetch(url + '/logs/add', { method: 'POST', body: JSON.stringify(body) });
  assert.equal(res.status, 200, await res.text());
}

try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on('pageerror', (e) => { throw e; });
  // The page runs under its own Content-Security-Policy: nothing of it may be blocked.
  const blocked = [];
  page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) blocked.push(m.text()); });
  const res = await page.goto(server.url + '/logs.html');
  assert.match(res.headers()['content-security-policy'], /script-src 'sha256-/);
  assert.equal(res.headers()['x-frame-options'], 'DENY');
  assert.equal(res.headers()['referrer-policy'], 'no-referrer');
  await eventually('the viewer connects', () => page.evaluate(() => window.logViewer.connected));

  const shown = () => page.evaluate(() => window.logViewer.shownMessages());
  const visible = () => page.evaluate(() => window.logViewer.visibleMessages());

  // Posted entries appear, in order, and on screen.
  await post(server.url, entry('Hunter1', 'A', 'Info', 'hello from A'));
  await post(server.url, [
    entry('Hunter2', 'B', 'Error', 'needle in B'),
    entry('Hunter1', 'A', 'Warn', 'warned in A'),
    entry('Hunter3', '', 'Debug', 'room-less debug'),
  ]);
  await eventually('entries appear', async () => {
    const v = await visible();
    return ['hello from A', 'needle in B', 'warned in A', 'room-less debug'].every((m) => v.includes(m));
  });
  const order = (await shown()).filter((m) => /from A|needle|warned|room-less/.test(m));
  assert.deepEqual(order, ['hello from A', 'needle in B', 'warned in A', 'room-less debug']);
  assert.match(await page.textContent('#status'), /live/);
  // Only the server's own events are styled as the server's (by a flag only the server
  // sets): an entry posted with user "server" is not.
  await post(server.url, entry('server', 'A', 'Info', 'posing as the server'));
  await eventually('the impostor appears', async () => (await visible()).includes('posing as the server'));
  const styled = await page.evaluate(() => [...document.querySelectorAll('.row')]
    .map((r) => [r.children[4]?.textContent, r.classList.contains('server')]));
  assert.deepEqual(styled.filter(([m]) => m === 'posing as the server'), [['posing as the server', false]]);
  assert.ok(styled.some(([m, s]) => s && /listening/.test(m)), JSON.stringify(styled));
  // Really on screen, not just in the DOM: the message's own pixels are hit at its centre
  // (a clipped or zero-width row would hide it).
  const onScreen = await page.evaluate(() => {
    const m = [...document.querySelectorAll('.row')].find((r) => r.children[4]?.textContent === 'needle in B')?.children[4];
    if (!m) return 'no row';
    const b = m.getBoundingClientRect();
    if (b.width < 20 || b.height < 5) return `too small: ${b.width}x${b.height}`;
    return document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2) === m || 'hidden';
  });
  assert.equal(onScreen, true);

  // Filtering as you type: text, user, level.
  await page.fill('#text', 'NEEDLE');
  await eventually('text filter', async () => JSON.stringify(await visible()) === '["needle in B"]');
  await page.fill('#text', '');
  await page.fill('#user', 'hunter1');
  await eventually('user filter', async () =>
    JSON.stringify(await visible()) === '["hello from A","warned in A"]');
  await page.fill('#user', '');
  await page.uncheck('input[data-level="info"]');
  await eventually('level filter', async () => {
    const v = await visible();
    return !v.includes('hello from A') && v.includes('needle in B');
  });
  await page.check('input[data-level="info"]');

  // Pause holds new entries back; resume shows them.
  await page.click('#pause');
  await post(server.url, entry('Hunter1', 'A', 'Info', 'while paused'));
  await eventually('held while paused', async () => /new while paused/.test(await page.textContent('#counts')));
  assert.ok(!(await shown()).includes('while paused'));
  await page.click('#pause');
  await eventually('shown after resume', async () => (await shown()).includes('while paused'));

  // Following one room: its entries and the room-less ones, older ones loaded from the store.
  await page.fill('#room', 'B');
  await eventually('room B', async () => {
    const v = await shown();
    return v.includes('needle in B') && v.includes('room-less debug') && !v.includes('hello from A');
  });
  await page.fill('#room', '');
  await eventually('all rooms again', async () => (await shown()).includes('hello from A'));

  // The server restarts on the same port and data: the page reconnects by itself. While it
  // is down, another server on the same data stores entries this page can only get from
  // /logs/query: once reconnected, it backfills them, in order, each once.
  const port = server.port;
  await server.stop();
  await eventually('the page sees the server go', async () =>
    !(await page.evaluate(() => window.logViewer.connected)));
  // Retrying: the status says so until the next attempt (250 ms later), then "connecting".
  assert.match(await page.textContent('#status'), /retrying|connecting/);
  const down = Date.now();
  const other = await startServer(args);
  await post(other.url, [1, 2, 3].map((i) => entry('Hunter7', 'A', 'Info', `gap ${i}`)));
  await other.stop();
  server = await startServer(['--port', String(port), ...args]);
  await eventually('the page reconnects', () => page.evaluate(() => window.logViewer.connected), 15000);
  const reconnectMs = Date.now() - down;
  await post(server.url, entry('Hunter9', 'A', 'Info', 'after the restart'));
  await eventually('a new entry after the restart', async () => (await visible()).includes('after the restart'));
  const story = /^(while paused|gap \d|after the restart)$/;
  await eventually('the gap backfilled', async () =>
    (await page.evaluate(() => window.logViewer.allMessages())).filter((m) => story.test(m)).length === 5);
  assert.deepEqual((await page.evaluate(() => window.logViewer.allMessages())).filter((m) => story.test(m)),
    ['while paused', 'gap 1', 'gap 2', 'gap 3', 'after the restart']);

  // Clear forgets everything; "Load older" then loads the newest stored page again.
  await page.click('#clear');
  assert.equal(await page.evaluate(() => window.logViewer.total), 0);
  await page.click('#older');
  await eventually('older entries after Clear', async () => {
    const all = await page.evaluate(() => window.logViewer.allMessages());
    return ['gap 2', 'after the restart', 'hello from A'].every((m) => all.includes(m));
  });
  await eventually('the older page loaded', async () =>
    /^(No older entries stored \(check again\)|Load older entries)$/.test(await page.textContent('#older')));

  // 100,000 entries: the DOM keeps a few dozen rows and filtering stays quick.
  const N = 100000, BATCH = 1000;
  const before = await page.evaluate(() => window.logViewer.total);
  const t0 = Date.now();
  for (let i = 0; i < N; i += BATCH) {
    const batch = [];
    for (let j = i; j < i + BATCH; j++) {
      batch.push(entry(`user${j % 50}`, `room${j % 7}`, ['Info', 'Warn', 'Error', 'Debug'][j % 4], `bulk entry ${j}`));
    }
    await post(server.url, batch);
  }
  await eventually('100,000 entries in the page', () =>
    page.evaluate((n) => window.logViewer.total >= n, before + N), 60000);
  const loadMs = Date.now() - t0;
  const rowsInDom = await page.evaluate(() => document.querySelectorAll('#rows .row').length);
  assert.ok(rowsInDom < 150, `only the visible rows are in the DOM (${rowsInDom})`);
  const filterMs = await page.evaluate(async () => {
    const input = document.getElementById('text');
    const t = performance.now();
    input.value = 'bulk entry 9999';
    input.dispatchEvent(new Event('input'));
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    return performance.now() - t;
  });
  assert.equal(await page.evaluate(() => window.logViewer.shown), 11); // 9999 and 99990..99999
  const clearMs = await page.evaluate(async () => {
    const input = document.getElementById('text');
    const t = performance.now();
    input.value = '';
    input.dispatchEvent(new Event('input'));
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    return performance.now() - t;
  });
  const scrollMs = await page.evaluate(async () => {
    const list = document.getElementById('list');
    const t = performance.now();
    list.scrollTop = list.scrollHeight / 2;
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
    return performance.now() - t;
  });
  const middle = await visible();
  assert.ok(middle.some((m) => m.startsWith('bulk entry 4')), `mid-scroll rows: ${middle.slice(0, 3)}`);
  const heapMb = await page.evaluate(() => (performance.memory?.usedJSHeapSize ?? 0) / 1048576);

  // A page that cannot keep up is told how many entries it missed, and loads them.
  const small = await startServer(['--logs-listener-buffer-bytes', '200000', '--logs-server-level', 'off']);
  let missed;
  try {
    const page2 = await browser.newPage();
    page2.on('pageerror', (e) => { throw e; });
    await page2.goto(small.url + '/logs.html');
    await eventually('the second page connects', () => page2.evaluate(() => window.logViewer.connected));
    await eventually('the second page loaded its first page', () => page2.evaluate(() => window.logViewer.backfills > 0));
    // The page is busy for a while (its socket is then not read: Chromium stops reading
    // when the page does not take what came) while a burst larger than the socket buffers
    // arrives.
    const busy = page2.evaluate(() => { const until = Date.now() + 2500; while (Date.now() < until); });
    const burst = [];
    for (let i = 0; i < 12; i++) {
      const body = [];
      for (let j = 0; j < 9; j++) {
        // 100 KB each, as msg only (entry() repeats it in text): 900 KB a post.
        body.push({ timestamp: Date.now(), level: 'Info', user: 'B', room: 'r', msg: `burst ${i}-${j} ` + 'q'.repeat(100000) });
        burst.push(`burst ${i}-${j}`);
      }
      await post(small.url, body);
    }
    await busy;
    await post(small.url, entry('B', 'r', 'Info', 'after burst'));
    const burstMsgs = () => page2.evaluate(() =>
      window.logViewer.allMessages().filter((m) => /^(burst|after burst)/.test(m)).map((m) => m.split(' q')[0]));
    await eventually('every burst entry in the page', async () => (await burstMsgs()).length === burst.length + 1, 20000);
    assert.deepEqual(await burstMsgs(), [...burst, 'after burst']);
    missed = await page2.evaluate(() => window.logViewer.missedNotices());
    assert.ok(missed > 0, 'the page was told it missed entries');
    await page2.close();
  } finally {
    await small.stop();
  }

  assert.deepEqual(blocked, []);
  console.log(JSON.stringify({
    reconnectMs, loadMs, missedInBurst: missed, rowsInDom, filterMs: Math.round(filterMs), clearFilterMs: Math.round(clearMs),
    scrollMs: Math.round(scrollMs), heapMb: Math.round(heapMb),
  }));
} finally {
  await browser.close();
  await server.stop();
}
