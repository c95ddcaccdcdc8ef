// The dashboard in Debian's chromium (playwright-core): every page draws its data, the live
// view follows appended metrics, sampling is reproducible, bad requests get a 4xx.
// Usage: node dashboard.test.js URL RUNS_DIR LIVE_REST_JSONL   (see test_dashboard.sh)
'use strict';
const fs = require('fs');
const path = require('path');
const { launch } = require('./chromium');

const [url, runs, liveRest] = process.argv.slice(2);
const shots = process.env.MOE_SCREENSHOTS;
let passed = 0, failed = 0;

function check(ok, what) {
  if (ok) passed++;
  else { failed++; console.error('FAIL: ' + what); }
}

async function open(page, hash, ready) {
  await page.goto(url + hash);
  await page.waitForSelector(`body[data-ready="${ready}"]`, { timeout: 60000 });
  const err = await page.$('.error');
  check(!err, `${hash}: no error shown` + (err ? ': ' + await err.textContent() : ''));
}

async function points(page, selector) {
  return Number(await page.getAttribute(selector, 'data-points'));
}

// Pixels of the chart's canvas that are not background: a chart that drew lines has many.
async function inked(page, selector) {
  return page.$eval(selector + ' canvas', c => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) n++;
    return n;
  });
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: path.join(shots, name + '.png'), fullPage: true });
}

async function sample(page, seed) {
  await page.fill('#seed', String(seed));
  await page.click('#generate');
  await page.waitForSelector('#sample-out[data-done="true"]', { timeout: 60000 });
  return page.textContent('#sample-out');
}

async function status(pathAndQuery, init) {
  const r = await fetch(url.replace(/\/$/, '') + pathAndQuery, init);
  const body = await r.json().catch(() => ({}));
  return [r.status, body.error || ''];
}

(async () => {
  const { context: browser, close } = await launch();
  try {
    const page = await browser.newPage();
    page.on('pageerror', e => check(false, 'page error: ' + e.message));

    // Runs: every run and the sweep, with their status.
    await open(page, '#/runs', 'runs');
    const rows = await page.$$eval('#runs tr', trs => trs.slice(1).map(tr => [...tr.children].map(td => td.textContent)));
    const byPath = Object.fromEntries(rows.map(r => [r[1], r]));
    check(rows.length === 5, `5 runs listed (finished, live, 3 trials), got ${rows.length}`);
    check(byPath.finished && byPath.finished[2] === 'finished' && byPath.finished[3] === '40 / 40', 'finished run: finished, 40 / 40');
    check(byPath.live && byPath.live[2] === 'running', 'live run: running');
    check(byPath.finished && Number(byPath.finished[4]) > 0, 'finished run: best val shown');
    check(await page.$$eval('#sweeps tr', t => t.length) === 2, 'one sweep listed');
    await shot(page, 'runs');

    // A finished run: every chart drew its points, the load heatmap its cells.
    await open(page, '#/run?path=finished', 'run');
    const metrics = fs.readFileSync(path.join(runs, 'finished', 'metrics.jsonl'), 'utf8').trim().split('\n').map(JSON.parse);
    const trainLines = metrics.filter(l => 'loss' in l).length, evalLines = metrics.filter(l => 'val_loss' in l).length;
    check(await points(page, '#chart-loss') === trainLines + 2 * evalLines,
      `loss chart: ${trainLines} + 2 x ${evalLines} points, got ${await points(page, '#chart-loss')}`);
    for (const id of ['lr', 'grad', 'tps']) check(await points(page, '#chart-' + id) === trainLines, `${id} chart: ${trainLines} points`);
    check(await points(page, '#chart-entropy') === 2 * trainLines, 'router entropy: 2 layers of points');
    check(await inked(page, '#chart-loss') > 500, 'loss chart canvas has lines drawn');
    const cells = await page.$$eval('#load-heatmaps canvas', cs => cs.map(c => Number(c.dataset.cells)));
    check(cells.length === 2 && cells.every(n => n === 4 * trainLines), `load heatmaps: 2 x ${4 * trainLines} cells, got ${cells}`);
    check((await page.textContent('#config')).includes('"num_experts": 4'), 'resolved config shown');
    await shot(page, 'run');

    // The live run: a partial line is not shown; complete lines appear without a reload.
    await open(page, '#/run?path=live', 'run');
    const before = Number(await page.getAttribute('#run-status', 'data-lines'));
    check(before === 4, `live run: 4 lines at first, got ${before}`);
    const rest = fs.readFileSync(liveRest, 'utf8');
    const live = path.join(runs, 'live', 'metrics.jsonl');
    const firstLine = rest.indexOf('\n') + 1;
    fs.appendFileSync(live, rest.slice(0, firstLine - 5));  // a line cut short, as if being written
    await page.waitForTimeout(2500);
    check(Number(await page.getAttribute('#run-status', 'data-lines')) === 4, 'live run: a partial line is skipped');
    fs.appendFileSync(live, rest.slice(firstLine - 5));
    const total = 4 + rest.trim().split('\n').length;
    await page.waitForFunction(n => Number(document.querySelector('#run-status').dataset.lines) === n, total, { timeout: 15000 });
    check(await points(page, '#chart-loss') === trainLines + 2 * evalLines, 'live run: the loss chart shows every appended line');
    check((await page.textContent('#run-status')).includes('finished'), 'live run: finished once the last step is in');
    await shot(page, 'live');

    // Compare two runs.
    await open(page, '#/compare?runs=finished,sweeps/lr/trial_000', 'compare');
    const valPoints = await points(page, '#chart-val');
    const trialEvals = fs.readFileSync(path.join(runs, 'sweeps/lr/trial_000/metrics.jsonl'), 'utf8').trim().split('\n')
      .map(JSON.parse).filter(l => 'val_loss' in l).length;
    check(valPoints === evalLines + trialEvals, `compare: ${evalLines} + ${trialEvals} val points, got ${valPoints}`);
    check(await inked(page, '#chart-val') > 500, 'compare chart canvas has lines drawn');
    await shot(page, 'compare');

    // A sweep: the trials table sorts; loss against the swept parameter has a point per trial.
    await open(page, '#/sweep?path=sweeps/lr', 'sweep');
    check(await points(page, '#chart-param-0') === 3, 'sweep: 3 points of loss against optimizer.lr');
    const lrCol = async () => page.$$eval('#trials tr', trs => trs.slice(1).map(tr => Number(tr.children[2].textContent)));
    await page.click('#trials th:nth-child(3)');
    const up = await lrCol();
    await page.click('#trials th:nth-child(3)');
    const down = await lrCol();
    check(JSON.stringify(up) === JSON.stringify([0.003, 0.01, 0.03]) && JSON.stringify(down) === JSON.stringify([0.03, 0.01, 0.003]),
      `sweep table sorts by lr both ways: ${up} / ${down}`);
    await shot(page, 'sweep');

    // Sample: the same seed gives the same text, another seed another.
    await open(page, '#/sample', 'sample');
    await page.selectOption('#checkpoint', 'finished/last.safetensors');
    await page.fill('#length', '120');
    const a = await sample(page, 7), b = await sample(page, 7), c = await sample(page, 8);
    check(a.startsWith('ROMEO:') && a.length === 'ROMEO:'.length + 120, `sample: prompt and 120 characters (${JSON.stringify(a)})`);
    check(a === b, 'sample: same seed, same text');
    check(a !== c, 'sample: another seed, another text');
    await shot(page, 'sample');

    // Inspect: heatmaps of classes, positions and characters per layer, and the transition.
    await open(page, '#/inspect?checkpoint=finished/last.safetensors', 'inspect');
    const maps = await page.$$eval('#inspect-maps canvas', cs => cs.map(c => Number(c.dataset.cells)));
    check(maps.length === 6 && maps.every(n => n > 0), `inspect: 6 heatmaps with cells, got ${maps}`);
    check(await page.$$eval('#transitions tr', t => t.length) === 2, 'inspect: one layer transition');
    await shot(page, 'inspect');

    // Bad requests: a 4xx with a message, and the server keeps serving.
    const ck = 'finished/last.safetensors';
    const post = body => ({ method: 'POST', body });
    const bad = [
      ['/api/run?path=../x', undefined, 400], ['/api/run?path=%2Fetc', undefined, 400],
      ['/api/run?path=escape', undefined, 403], ['/api/sweep?path=finished/../../x', undefined, 400],
      ['/api/run', undefined, 400], ['/api/run?path=finished&offset=abc', undefined, 400],
      ['/api/inspect?checkpoint=finished/config.json', undefined, 404],
      ['/api/sample', post('{not json'), 400],
      ['/api/sample', post(JSON.stringify({ checkpoint: 'finished/nope.safetensors' })), 404],
      ['/api/sample', post(JSON.stringify({ checkpoint: '../' + ck })), 400],
      ['/api/sample', post(JSON.stringify({ checkpoint: ck, max_new_tokens: 1e9 })), 400],
      ['/api/sample', post(JSON.stringify({ checkpoint: ck, max_new_tokens: 'many' })), 400],
      ['/api/sample', post(JSON.stringify({ checkpoint: ck, prompt: '\u4e2d' })), 400],
      ['/nothing/here', undefined, 404],
    ];
    for (const [u, init, want] of bad) {
      const [got, msg] = await status(u, init);
      check(got === want && msg.length > 0, `${u} ${init ? init.body : ''}: ${want} with a message, got ${got} ${msg}`);
    }
    check((await status('/api/runs'))[0] === 200, 'the server still serves after bad requests');
  } finally {
    await close();
  }
  console.log(`dashboard: ${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})().catch(e => { console.error(e); process.exit(1); });
