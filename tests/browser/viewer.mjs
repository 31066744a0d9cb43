// The log viewer at /logs.html in Chromium, on a server with --logs-token, with entries
// posted to /logs/add as the plugin posts them: without the token the page is a login form
// (not a JSON 401); a wrong token is refused; a right one logs in with an HttpOnly cookie
// and the token is in no URL; ?token= in a link is taken out of the URL at once; a row
// opens to show a multi-line stack trace whole and every field of the entry, and closes; the
// room box holds a whole session id; at 390 px (a phone) the messages are on screen and
// nothing is cut off. Screenshots in SCREENSHOTS.
import assert from 'node:assert/strict';
import { startServer, launchBrowser, eventually, screenshot, watch, overflowing } from './lib.mjs';

const TOKEN = 'l0gs-t0ken';
const ROOM = 'c3@uTKeQR3Mp:HunterName';
const server = await startServer(['--logs-token', TOKEN]);
const browser = await launchBrowser();

const STACK = [
  'System.NullReferenceException: Object reference not set to an instance of an object.',
  '   at HunterPie.Core.Game.Rise.Entities.MHRMonster.UpdateHealth() in D:\\HunterPie\\Core\\MHRMonster.cs:line 212',
  '   at HunterPie.Core.Game.Rise.Entities.MHRMonster.Update() in D:\\HunterPie\\Core\\MHRMonster.cs:line 98',
  '   at HunterPie.Core.Scan.ScanManager.Scan() in D:\\HunterPie\\Core\\ScanManager.cs:line 41',
  '   at System.Threading.ExecutionContext.RunInternal(ExecutionContext executionContext)',
].join('\n');

function entry(user, room, level, msg) {
  return { timestamp: Date.now(), level, msg, text: `12:00:00:000 [${level}] ${msg}`, user, room };
}
async function post(body) {
  const res = await fetch(server.url + '/logs/add', { method: 'POST', body: JSON.stringify(body) });
  assert.equal(res.status, 200, await res.text());
}
const messages = (page) => page.evaluate(() => window.logViewer.visibleMessages());

try {
  await post([
    entry('HunterName', ROOM, 'Info', 'Connected to the sync server'),
    entry('HunterName', ROOM, 'Error', STACK),
    entry('Friend', ROOM, 'Warn', 'Monster em_001 lost sync for 3 s, resynchronizing from the leader'),
    entry('Friend', '', 'Debug', 'room-less entry'),
  ]);

  // ---- desktop ----
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const problems = watch(page);
  const res = await page.goto(server.url + '/logs.html');
  // The page is served (it holds no entry) and asks for the token.
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-type'], /text\/html/);
  await page.waitForSelector('#login-form', { state: 'visible' });
  assert.equal(await page.isVisible('#list'), false);
  assert.match(await page.textContent('#status'), /login needed/);
  await screenshot(page, 'logs-login-desktop');
  // The API stays closed without it.
  assert.equal((await fetch(server.url + '/logs/query')).status, 401);

  await page.fill('#token', 'wrong');
  await page.click('#login-button');
  await eventually('the refusal', async () => (await page.textContent('#login-error')) === 'Wrong token.');
  assert.equal(await page.isVisible('#list'), false);

  await page.fill('#token', TOKEN);
  await page.click('#login-button');
  await eventually('the viewer connects', () => page.evaluate(() => window.logViewer.connected));
  assert.ok(!page.url().includes(TOKEN));
  const cookies = await context.cookies();
  assert.deepEqual(cookies.map((c) => [c.name, c.httpOnly, c.sameSite, c.path]), [['supersynk_logs', true, 'Strict', '/logs']]);
  assert.equal(await page.evaluate(() => document.cookie), '');
  await eventually('stored entries shown', async () => (await messages(page)).includes(STACK));
  // Live entries arrive over the cookie-authenticated socket.
  await post(entry('HunterName', ROOM, 'Info', 'live after login'));
  await eventually('a live entry', async () => (await messages(page)).includes('live after login'));

  // A closed row is one line: the stack trace's first line only.
  const row = page.locator('#rows .row', { has: page.locator('.m', { hasText: 'System.NullReferenceException' }) });
  const closedHeight = (await row.boundingBox()).height;
  assert.ok(closedHeight < 30, `closed row height ${closedHeight}`);
  // Clicked, it opens: the whole trace, wrapped, and every field of the entry.
  await row.locator('.m').click();
  const full = row.locator('.detail pre');
  await full.waitFor();
  assert.equal(await full.textContent(), STACK);
  assert.equal(await full.evaluate((e) => e.scrollHeight <= e.clientHeight + 1 && e.scrollWidth <= e.clientWidth + 1), true,
    'the whole trace is on screen, wrapped');
  const fields = await row.locator('.detail dt').allTextContents();
  for (const f of ['timestamp', 'level', 'msg', 'text', 'user', 'room', 'serverTime', 'seqNumber']) {
    assert.ok(fields.includes(f), `field ${f} in ${fields}`);
  }
  assert.ok((await row.boundingBox()).height > closedHeight * 4);
  // The rows after it move down and stay readable.
  const next = page.locator('#rows .row', { has: page.locator('.m', { hasText: 'lost sync' }) });
  const openBox = await row.boundingBox();
  assert.ok((await next.boundingBox()).y >= openBox.y + openBox.height - 1, 'the next row is below the open one');
  assert.equal(await page.evaluate(() => window.logViewer.openRows), 1);
  // New entries do not move the open row away.
  const before = (await row.boundingBox()).y;
  await post(entry('HunterName', ROOM, 'Info', 'arrived while a row was open'));
  await eventually('the new entry', async () =>
    (await page.evaluate(() => window.logViewer.allMessages())).includes('arrived while a row was open'));
  assert.equal((await row.boundingBox()).y, before);
  await screenshot(page, 'logs-open-row-desktop');
  // Clicking its line again closes it.
  await row.locator('.m').click();
  await eventually('closed again', async () =>
    (await page.evaluate(() => window.logViewer.openRows)) === 0 && (await row.boundingBox()).height < 30);

  // The room box holds a whole session id.
  await page.fill('#room', ROOM);
  assert.equal(await page.$eval('#room', (e) => e.scrollWidth <= e.clientWidth || `${e.scrollWidth} > ${e.clientWidth}`), true, 'the room box shows the whole id');
  await eventually('following the room', async () => {
    const v = await page.evaluate(() => window.logViewer.shownMessages());
    return v.includes('live after login') && v.includes('room-less entry');
  });
  problems.check();

  // ---- a token in a link: exchanged for the cookie, taken out of the URL ----
  const linked = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const linkPage = await linked.newPage();
  await linkPage.goto(`${server.url}/logs.html?room=${encodeURIComponent(ROOM)}&token=${TOKEN}`);
  await eventually('the linked page connects', () => linkPage.evaluate(() => window.logViewer.connected));
  assert.ok(!linkPage.url().includes('token'), linkPage.url());
  assert.ok(linkPage.url().includes('room='), linkPage.url());
  // Logging out ends it: the form again, and the API refuses the old cookie.
  await linkPage.click('#logout');
  await linkPage.waitForSelector('#login-form', { state: 'visible' });
  assert.equal(await linkPage.evaluate(async () => (await fetch('/logs/query')).status), 401);
  const wrongLink = await linked.newPage();
  await wrongLink.goto(`${server.url}/logs.html?token=wrong`);
  await eventually('a wrong link token', async () => (await wrongLink.textContent('#login-error')) === 'The token in the link is wrong.');
  assert.ok(!wrongLink.url().includes('token'));
  await linked.close();

  // ---- phone (390 px) ----
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const small = await phone.newPage();
  const smallProblems = watch(small);
  await small.goto(server.url + '/logs.html');
  await screenshot(small, 'logs-login-phone');
  await small.fill('#token', TOKEN);
  await small.click('#login-button');
  await eventually('the phone connects', () => small.evaluate(() => window.logViewer.connected));
  await eventually('entries on the phone', async () => (await messages(small)).includes('live after login'));
  // Every message row: its message is on screen, wide enough to read, and not covered.
  const seen = await small.evaluate(() => [...document.querySelectorAll('#rows .row')]
    .filter((r) => r.style.display !== 'none')
    .map((r) => {
      const m = r.children[4];
      const b = m.getBoundingClientRect();
      const hit = document.elementFromPoint(b.x + 4, b.y + b.height / 2);
      return { msg: m.textContent.slice(0, 30), width: Math.round(b.width), onScreen: b.x >= 0 && b.right <= innerWidth && m.contains(hit) };
    }));
  assert.ok(seen.length >= 5, JSON.stringify(seen));
  for (const s of seen) {
    assert.ok(s.onScreen && s.width > 300, `message shown on a phone: ${JSON.stringify(s)}`);
  }
  // The controls fit: nothing sideways, the room box and its id whole.
  assert.deepEqual(await overflowing(small, 'header input, header button, #status, #counts'), []);
  await small.fill('#room', ROOM);
  assert.equal(await small.$eval('#room', (e) => e.scrollWidth <= e.clientWidth), true);
  await small.fill('#room', '');
  await small.waitForTimeout(600);
  // The list has most of the screen.
  const listBox = await small.locator('#list').boundingBox();
  assert.ok(listBox.height > 844 * 0.6, `list height ${listBox.height}`);
  // A row opens on a phone too, its trace wrapped to the screen's width.
  const phoneRow = small.locator('#rows .row', { has: small.locator('.m', { hasText: 'System.NullReferenceException' }) });
  await eventually('the trace row', async () => (await phoneRow.count()) === 1);
  await phoneRow.locator('.m').tap();
  const phoneFull = phoneRow.locator('.detail pre');
  await phoneFull.waitFor();
  assert.equal(await phoneFull.textContent(), STACK);
  assert.equal(await phoneFull.evaluate((e) => e.scrollWidth <= e.clientWidth + 1), true, 'wrapped, not cut');
  assert.deepEqual(await overflowing(small, '.detail pre, .detail dd'), []);
  await screenshot(small, 'logs-phone');
  smallProblems.check();
  await phone.close();
  await context.close();
} finally {
  await browser.close();
  await server.stop();
}
