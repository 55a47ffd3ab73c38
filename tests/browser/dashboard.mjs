// The dashboard in a real browser: Debian's chromium driven by playwright-core.
// Run by crates/castellan/tests/dashboard.rs in two phases around a scripted denied request:
//   PHASE=login:  sign in with CREDENTIAL, check the services and edges, print the denials
//                 of the last hour, save the session (cookies) to STATE.
//   PHASE=denial: reuse STATE, require more denials than DENIED_BEFORE, open the
//                 CALLER→CALLEE edge's decisions, require a denied DENIED_PATH there, save a
//                 screenshot to SHOT.
// Every phase fails if the page requests anything from another host. Prints one JSON line.
import { chromium } from 'playwright-core';

const env = (k) => {
  const v = process.env[k];
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const base = env('BASE');
const phase = env('PHASE');
const baseHost = new URL(base).host;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const out = { phase };
try {
  const context = await browser.newContext({
    // The control plane's certificate is issued by the mesh CA, which this browser does not
    // trust; the operator may give the dashboard its own certificate (`dashboard:` config).
    ignoreHTTPSErrors: true,
    storageState: phase === 'denial' ? env('STATE') : undefined,
    viewport: { width: 1280, height: 1000 },
  });
  const foreign = [];
  context.on('request', (r) => {
    const u = new URL(r.url());
    if (u.host !== baseHost && u.protocol !== 'data:') foreign.push(r.url());
  });
  const page = await context.newPage();
  const check = (cond, msg) => {
    if (!cond) throw new Error(msg);
  };

  if (phase === 'login') {
    await page.goto(`${base}/dashboard`);
    check(new URL(page.url()).pathname === '/dashboard/login', `not sent to sign-in: ${page.url()}`);
    await page.fill('#credential', 'cadm_wrong');
    await page.click('button[type=submit]');
    check((await page.textContent('[role=alert]'))?.includes('unknown or revoked'), 'a wrong credential was not refused');
    await page.fill('#credential', env('CREDENTIAL'));
    await Promise.all([page.waitForURL(`${base}/dashboard`), page.click('button[type=submit]')]);
    check((await page.textContent('h1')) === 'Overview', 'overview not shown after sign-in');
    const edges = await page.$$eval('tr.edge', (rows) =>
      rows.map((r) => `${r.dataset.caller}->${r.dataset.callee}`));
    out.edges = edges;
    for (const want of (process.env.EDGES || '').split(',').filter(Boolean)) {
      check(edges.includes(want), `edge ${want} not shown: ${edges}`);
    }
    const nodes = await page.$$eval('svg.graph .node text', (t) => t.map((x) => x.textContent));
    out.services = nodes;
    for (const want of (process.env.SERVICES || '').split(',').filter(Boolean)) {
      check(nodes.includes(want), `service ${want} not in the graph: ${nodes}`);
    }
    out.denied = Number(await page.textContent('#denied-hour'));
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === '__Host-castellan_session');
    check(session && session.httpOnly && session.secure && session.sameSite === 'Strict',
      `session cookie not HttpOnly/Secure/SameSite=Strict: ${JSON.stringify(session)}`);
    await context.storageState({ path: env('STATE') });
  } else if (phase === 'denial') {
    await page.goto(`${base}/dashboard`);
    check((await page.textContent('h1')) === 'Overview', `session not kept: ${page.url()}`);
    out.denied = Number(await page.textContent('#denied-hour'));
    check(out.denied > Number(env('DENIED_BEFORE')), `no new denial shown: ${out.denied}`);
    const row = `tr.edge[data-caller="${env('CALLER')}"][data-callee="${env('CALLEE')}"]`;
    check(Number(await page.textContent(`${row} td:nth-child(5)`)) > 0, 'the edge shows no denial');
    await Promise.all([page.waitForURL(/\/dashboard\/decisions\?/), page.click(`${row} a.edge-link`)]);
    const rows = await page.$$eval('#decisions tbody tr', (trs) =>
      trs.map((tr) => Array.from(tr.querySelectorAll('td')).map((td) => td.textContent)));
    out.decisions = rows.length;
    const denied = rows.find((r) => r[6] === 'deny' && r[5].endsWith(env('DENIED_PATH')));
    check(denied, `the denied ${env('DENIED_PATH')} is not among the edge's decisions`);
    out.decision_id = denied[1];
    await page.goto(`${base}/dashboard`);
    await page.screenshot({ path: env('SHOT'), fullPage: true });
    out.screenshot = env('SHOT');
  } else {
    throw new Error(`unknown PHASE ${phase}`);
  }
  check(foreign.length === 0, `requests to other hosts: ${foreign}`);
  out.ok = true;
} catch (e) {
  out.ok = false;
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
process.exit(out.ok ? 0 : 1);
