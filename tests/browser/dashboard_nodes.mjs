// The admin dashboard of a cluster in Chromium, against two nodes on one Redis that the Rust
// test started (tests/browser.rs): SUPERSYNK_URL (node A), ADMIN_TOKEN, EXPECT (JSON: the
// nodes' names, A first, and each one's connections; the session split across them). After
// logging in on node A: the table of nodes has a row per node with its connections, the
// cards are the sums, the split session lists the members of both nodes with their node;
// then node B is stopped (SIGSTOP to EXPECT.stopPid, SIGCONT at the end) and its row says
// it did not answer. Screenshots in SCREENSHOTS.
import assert from 'node:assert/strict';
import { launchBrowser, eventually, screenshot, watch, overflowing } from './lib.mjs';

const url = process.env.SUPERSYNK_URL;
const token = process.env.ADMIN_TOKEN;
const expect = JSON.parse(process.env.EXPECT);
const text = (page, sel) => page.textContent(sel).then((t) => t.trim());
const rows = (page) => page.$$eval('#nodes tbody tr', (trs) => trs.map((tr) => ({
  node: tr.dataset.node, cls: tr.className, cells: [...tr.cells].map((c) => c.textContent.trim()),
})));

const browser = await launchBrowser();
let stopped = false;
try {
  for (const [size, viewport] of [['desktop', { width: 1280, height: 860 }], ['phone', { width: 390, height: 844 }]]) {
    const context = await browser.newContext({ viewport });
    const page = await context.newPage();
    const problems = watch(page);
    await page.goto(url + '/');
    await page.waitForSelector('#login-form', { state: 'visible' });
    await page.fill('#token', token);
    await page.click('#login-button');
    await page.waitForSelector('#dash', { state: 'visible' });

    // A row per node, this one first, each with its own connections.
    await eventually('a row per node', async () => (await rows(page)).length === expect.nodes.length);
    const got = await rows(page);
    assert.deepEqual(got.map((r) => r.node), expect.nodes.map((n) => n.name));
    assert.equal(got[0].cls, 'local');
    for (const [i, n] of expect.nodes.entries()) {
      assert.equal(got[i].cells[0], n.name);
      assert.equal(got[i].cells[3], String(n.connections), `${n.name}: ${got[i].cells}`);
    }
    assert.equal(await text(page, '#nodes-count'), `${expect.nodes.length} nodes`);
    // The cards sum the nodes.
    const total = expect.nodes.reduce((a, n) => a + n.connections, 0);
    assert.equal(await text(page, '#k-connections'), String(total));
    // The split session has both nodes' members, each naming its node.
    const session = page.locator(`[data-session="${expect.session}"]`);
    await session.waitFor();
    for (const [name, node] of expect.members) {
      const member = session.locator(`.member[data-member="${name}"]`);
      await member.waitFor();
      assert.match(await member.locator('.node').textContent(), new RegExp(node.replace(/[.]/g, '\\.')));
    }
    const cut = await overflowing(page, '#nodes-panel, #nodes td');
    assert.deepEqual(cut, [], `${size}: ${cut}`);
    await screenshot(page, `dashboard-nodes-${size}`);
    problems.check();
    await context.close();
  }

  // Node B stops answering: its row says so, the table keeps node A's.
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  await page.goto(url + '/');
  await page.fill('#token', token);
  await page.click('#login-button');
  await page.waitForSelector('#dash', { state: 'visible' });
  await eventually('a row per node', async () => (await rows(page)).length === expect.nodes.length);
  process.kill(expect.stopPid, 'SIGSTOP');
  stopped = true;
  const b = expect.nodes[1].name;
  await eventually('the missing node', async () => {
    const now = await rows(page);
    return now.some((r) => r.node === b && r.cls === 'missing' && /did not answer/.test(r.cells[1]));
  }, 20000);
  assert.match(await text(page, '#nodes-count'), /1 node, 1 not answering/);
  await screenshot(page, 'dashboard-nodes-missing');
  console.log('nodes table: checked with ' + expect.nodes.length + ' nodes');
} finally {
  if (stopped) process.kill(expect.stopPid, 'SIGCONT');
  await browser.close();
}
