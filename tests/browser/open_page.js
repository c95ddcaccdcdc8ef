// Opens one dashboard page in Debian's chromium and waits until it has drawn; then touches
// --ready FILE, saves a screenshot (--shot FILE) and/or keeps the page open, live, for --stay
// SECONDS (0: until killed). scripts/bench_dashboard.sh uses it.
// Usage: NODE_PATH=src/serve/web/node_modules node open_page.js URL '#/run?path=X' [--ready F] [--shot F] [--stay S]
'use strict';
const fs = require('fs');
const { launch } = require('./chromium');

const [url, hash, ...rest] = process.argv.slice(2);
const opt = (name) => { const i = rest.indexOf(name); return i >= 0 ? rest[i + 1] : undefined; };

let stopping = false;  // closing on SIGTERM: the pending wait's error is expected
(async () => {
  const { context: browser, close } = await launch();
  const stop = async () => { stopping = true; await close(); };
  process.on('SIGTERM', () => stop().then(() => process.exit(0)));
  try {
    const page = await browser.newPage();
    await page.goto(url + hash);
    await page.waitForSelector('body[data-ready]', { timeout: 300000 });
    if (opt('--ready')) fs.writeFileSync(opt('--ready'), '');
    if (opt('--shot')) await page.screenshot({ path: opt('--shot'), fullPage: true });
    const stay = opt('--stay');
    if (stay !== undefined) await page.waitForTimeout(Number(stay) > 0 ? Number(stay) * 1000 : 2 ** 31 - 1);
  } finally {
    await stop();
  }
})().catch(e => { if (!stopping) { console.error(e); process.exit(1); } });
