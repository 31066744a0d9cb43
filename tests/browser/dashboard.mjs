// The admin dashboard at / in Chromium, against a server the Rust test started
// (tests/browser.rs) with real plugin clients in real sessions: SUPERSYNK_URL, ADMIN_TOKEN,
// and EXPECT (JSON: what the test set up). At desktop and phone sizes: the login (a wrong
// token refused, the token never in the URL, an HttpOnly SameSite=Strict cookie), the live
// figures against the real sessions, the members with name, role, address and connected
// since, a message to a session and to everyone, a kick (the Rust test then checks what the
// clients received), the CSRF and cross-site refusals, logout. Without --admin-token, / is
// the public status and says that the dashboard is off. Screenshots in SCREENSHOTS.
import assert from 'node:assert/strict';
import { startServer, launchBrowser, eventually, screenshot, watch, overflowing } from './lib.mjs';

const url = process.env.SUPERSYNK_URL;
const token = process.env.ADMIN_TOKEN;
const expect = JSON.parse(process.env.EXPECT);
const port = new URL(url).port;
const bearer = { Authorization: 'Bearer ' + token };
const adminApi = async (path) => (await fetch(url + path, { headers: bearer })).json();
const text = (page, sel) => page.textContent(sel).then((t) => t.trim());

const browser = await launchBrowser();
try {
  // ---- desktop ----
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  const problems = watch(page);
  const res = await page.goto(url + '/');
  assert.equal(res.status(), 200);
  assert.match(res.headers()['content-security-policy'], /script-src 'sha256-/);
  assert.equal(res.headers()['x-frame-options'], 'DENY');
  // Logged out: the public figures and the login form, nothing of the sessions.
  await page.waitForSelector('#login-form', { state: 'visible' });
  assert.equal(await text(page, '#sessions'), String(expect.sessions));
  assert.equal(await text(page, '#sockets'), String(expect.connections));
  assert.equal(await page.isVisible('#dash'), false);
  assert.equal(await page.locator('[data-session]').count(), 0);
  await screenshot(page, 'dashboard-login-desktop');

  // A wrong token is refused, and says so.
  await page.fill('#token', 'not-the-token');
  await page.click('#login-button');
  await eventually('the refusal', async () => (await text(page, '#login-error')) === 'Wrong token.');
  assert.equal(await page.isVisible('#dash'), false);
  assert.deepEqual(await context.cookies(), []);

  // The right one logs in: a session cookie the page's scripts cannot read; the token is
  // nowhere in the URL.
  await page.fill('#token', token);
  await page.click('#login-button');
  await page.waitForSelector('#dash', { state: 'visible' });
  assert.ok(!page.url().includes(token), page.url());
  const [cookie, ...others] = await context.cookies();
  assert.equal(others.length, 0);
  assert.equal(cookie.name, 'supersynk_admin');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, 'Strict');
  assert.equal(cookie.path, '/admin');
  assert.ok(!cookie.value.includes(token));
  assert.equal(await page.evaluate(() => document.cookie), '');
  assert.equal(await page.inputValue('#token'), '');

  // The figures are the real ones.
  await eventually('live figures', async () => (await text(page, '#k-connections')) === String(expect.connections));
  assert.equal(await text(page, '#k-sessions'), String(expect.sessions));
  assert.equal(await text(page, '#k-members-hint'), `${expect.members} members`);
  assert.match(await text(page, '#live'), /live/);
  // The leader pushes ten times a second: the rate shows, and the chart's legend says it.
  await eventually('pushes per second', async () => Number(await text(page, '#k-pushes')) >= 3, 15000);
  assert.match(await text(page, '#l-push'), /pushes relayed \d/);
  // A follower's push was refused: its kind is listed.
  await eventually('refusals by kind', async () =>
    (await page.locator('#refusals tr[data-kind="push_refused"]').count()) === 1);

  // Sessions with their members: name, role, address, connected since.
  const party = page.locator(`[data-session="${expect.party}"]`);
  await party.waitFor();
  assert.equal(await page.locator('[data-session]').count(), expect.sessions);
  assert.match(await party.locator('.count').textContent(), /^3 members$/);
  const rowOf = (name) => party.locator(`.member[data-member="${name}"]`);
  for (const [name, role] of [['Host', 'leader'], ['Guest', 'follower'], ['Kicked', 'follower']]) {
    const row = rowOf(name);
    assert.equal((await row.locator('.name').textContent()).trim(), name);
    assert.equal((await row.locator('.role').textContent()).trim(), role);
    assert.match(await row.locator('.addr').textContent(), /127\.0\.0\.1/);
    assert.match(await row.locator('.since').textContent(), /\d+ (s|min)/);
    assert.equal(await row.locator('button', { hasText: 'Kick' }).isVisible(), true);
  }
  // The whole session id shows.
  assert.equal((await party.locator('.sid').textContent()).trim(), expect.party);
  // Search narrows the list.
  await page.fill('#search', 'solo');
  await eventually('search', async () => (await page.locator('[data-session]').count()) === 1);
  assert.equal(await page.locator(`[data-session="${expect.solo}"]`).count(), 1);
  await page.fill('#search', '');
  await eventually('search cleared', async () => (await page.locator('[data-session]').count()) === expect.sessions);
  await page.waitForTimeout(1500); // a few points on the charts for the screenshot
  await screenshot(page, 'dashboard-desktop');

  // A message to the party: its members get a servermsg (checked by the Rust test).
  await party.locator('.shead button', { hasText: 'Message' }).click();
  const composer = party.locator('.composer');
  await composer.locator('input').fill(expect.partyMessage);
  await composer.locator('select').selectOption('info');
  await composer.locator('button', { hasText: 'Send' }).click();
  await eventually('delivered to the party', async () => (await text(page, '#toast')) === 'Message sent to 3 connections');
  assert.equal(await party.locator('.composer').count(), 0);
  // A message to everyone: every connection, in a session or not.
  await page.click('#message-all');
  await page.fill('#composer-all input', expect.everyoneMessage);
  await page.click('#composer-all button.primary');
  await eventually('delivered to everyone', async () =>
    (await text(page, '#toast')) === `Message sent to ${expect.connections} connections`);

  // The cookie alone cannot act: a request without the login's CSRF token is refused.
  const guestConn = Number(await rowOf('Guest').getAttribute('data-conn'));
  const forged = await page.evaluate(async (conn) => {
    const r = await fetch('/admin/kick', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ conn }) });
    return [r.status, await r.text()];
  }, guestConn);
  assert.equal(forged[0], 403, forged[1]);
  // Nor can another site's page: the browser does not send the SameSite=Strict cookie with
  // its request (localhost is another site than 127.0.0.1).
  const other = await context.newPage();
  await other.goto(`http://localhost:${port}/version`);
  await other.evaluate(async ([target, conn]) => {
    await fetch(target + '/admin/kick', { method: 'POST', mode: 'no-cors', credentials: 'include', body: JSON.stringify({ conn }) });
  }, [url, guestConn]);
  await other.close();
  const stillThere = await adminApi('/admin/sessions');
  assert.ok(stillThere.sessions.some((s) => s.members.some((m) => m.conn === guestConn)), 'the cross-site kick did nothing');

  // Kick: two clicks (Kick, then Confirm kick); the member leaves the list and the figures.
  const kick = rowOf('Kicked').locator('button');
  await kick.click();
  assert.equal((await kick.textContent()).trim(), 'Confirm kick');
  await kick.click();
  await eventually('kicked', async () => (await text(page, '#toast')) === 'Kicked Kicked');
  await eventually('the member is gone', async () => (await rowOf('Kicked').count()) === 0);
  assert.match(await party.locator('.count').textContent(), /^2 members$/);
  await eventually('the figures follow', async () =>
    (await text(page, '#k-connections')) === String(expect.connections - 1) &&
    (await text(page, '#k-members-hint')) === `${expect.members - 1} members`);
  problems.check();

  // ---- phone (390 px) ----
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const small = await phone.newPage();
  const smallProblems = watch(small);
  await small.goto(url + '/');
  await small.fill('#token', token);
  await small.click('#login-button');
  await small.waitForSelector(`[data-session="${expect.party}"] .member[data-member="Host"]`);
  await eventually('phone figures', async () => (await text(small, '#k-connections')) === String(expect.connections - 1));
  await small.waitForTimeout(1500);
  // Nothing is cut off or outside the screen: figures, charts, session ids, members, buttons.
  const cut = await overflowing(small, '.card .value, .panel, .sid, .member .name, .member .addr, .member button, #message-all, nav a');
  assert.deepEqual(cut, []);
  for (const name of ['Host', 'Guest']) {
    const row = small.locator(`[data-session="${expect.party}"] .member[data-member="${name}"]`);
    await row.scrollIntoViewIfNeeded();
    for (const part of ['.name', '.role', '.addr', '.since', 'button']) {
      assert.equal(await row.locator(part).isVisible(), true, `${name} ${part} on a phone`);
    }
  }
  await screenshot(small, 'dashboard-phone');
  smallProblems.check();

  // Logout ends the login: the form again, and the cookie no longer opens the API.
  await page.click('#logout');
  await page.waitForSelector('#login-form', { state: 'visible' });
  assert.equal(await text(page, '#login-error'), 'Logged out.');
  assert.deepEqual((await context.cookies()).filter((c) => c.name === 'supersynk_admin'), []);
  const after = await page.evaluate(async () => (await fetch('/admin/sessions')).status);
  assert.equal(after, 401);
  // The other login (the phone's) is its own and still works.
  assert.equal(await small.evaluate(async () => (await fetch('/admin/stats')).status), 200);
  await context.close();
  await phone.close();

  // ---- without --admin-token: the public status only ----
  const open = await startServer();
  try {
    const p = await browser.newPage({ viewport: { width: 1280, height: 600 } });
    const openProblems = watch(p);
    await p.goto(open.url + '/');
    assert.equal(await text(p, '#sessions'), '0');
    await p.waitForSelector('#admin-off', { state: 'visible' });
    assert.match(await text(p, '#admin-off'), /admin dashboard is off/);
    assert.equal(await p.isVisible('#login'), false);
    assert.equal(await p.isVisible('#dash'), false);
    assert.equal((await fetch(open.url + '/admin/sessions')).status, 404);
    assert.equal((await fetch(open.url + '/admin/login', { method: 'POST', body: '{"token":""}' })).status, 404);
    await screenshot(p, 'status-public-desktop');
    openProblems.check();
  } finally {
    await open.stop();
  }
} finally {
  await browser.close();
}
