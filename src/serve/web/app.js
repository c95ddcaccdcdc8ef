// moe serve's front end: one page per hash route (#/runs, #/run?path=, #/compare?runs=,
// #/sweep?path=, #/sample, #/inspect?checkpoint=). Charts are uPlot (line charts) and plain
// canvases (heatmaps). Every chart records what it drew in the DOM (data-points, data-cells),
// so that tests can tell a chart with data from an empty one.
'use strict';

const page = document.getElementById('page');
let stopPolling = null;  // the live view's timer, cleared when the page changes

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'onclick' || k === 'onchange') e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmt(v, digits = 4) {
  return typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : (v ?? '');
}

function showError(e) {
  page.append(el('p', { class: 'error' }, e.message || String(e)));
}

function done(route) {
  document.body.dataset.ready = route;
}

// ---- charts ----

const PALETTE = ['#1565c0', '#c62828', '#2e7d32', '#6a1b9a', '#ef6c00', '#00838f', '#ad1457', '#4e342e',
                 '#283593', '#9e9d24', '#37474f', '#d84315'];

// A line chart of series [{label, points: [[x, y], ...]}] over a shared x axis, drawn or
// updated in `box`. scatter: points only.
function lineChart(box, title, series, { scatter = false, xLabel = 'step', log = false } = {}) {
  const xs = [...new Set(series.flatMap(s => s.points.map(p => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const data = [xs];
  let drawn = 0;
  for (const s of series) {
    const ys = new Array(xs.length).fill(null);
    for (const [x, y] of s.points) {
      if (y !== null && Number.isFinite(y)) { ys[index.get(x)] = y; drawn++; }
    }
    data.push(ys);
  }
  box.dataset.points = drawn;
  const labels = series.map(s => s.label).join('|');
  if (box._plot && box._labels === labels) {
    box._plot.setData(data);
    return;
  }
  if (box._plot) box._plot.destroy();
  box.innerHTML = '';
  box._labels = labels;
  box._plot = new uPlot({
    title, width: 460, height: 240,
    scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
    axes: [{ label: xLabel }, { size: 64 }],
    series: [{ label: xLabel }, ...series.map((s, i) => ({
      label: s.label, stroke: PALETTE[i % PALETTE.length], spanGaps: true,
      width: scatter ? 0 : 1.5, points: { show: scatter || undefined, size: scatter ? 7 : 4 },
    }))],
  }, data, box);
}

function chartBox(parent, id) {
  let box = parent.querySelector('#' + id);
  if (!box) { box = el('div', { class: 'chart', id }); parent.append(box); }
  return box;
}

// A heatmap of rows × columns (values[r][c]) with labels; colour scale from 0 to max (or
// centred on 1 for lifts, on a log scale).
function heatmap(parent, title, rowLabels, colLabels, values, { lift = false, cell = 18 } = {}) {
  const longest = Math.max(1, ...colLabels.map(l => String(l).length));
  const left = 70, top = 22 + Math.ceil(longest * 4.5);
  const W = Math.max(left + colLabels.length * cell + 10, title.length * 6.5 + 8), H = top + rowLabels.length * cell + 10;
  const canvas = el('canvas', { width: W, height: H });
  const box = el('div', { class: 'heatmap' }, canvas);
  parent.append(box);
  const ctx = canvas.getContext('2d');
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, W, H);
  ctx.fillStyle = '#222';
  ctx.font = '12px sans-serif';
  ctx.fillText(title, 4, 12);
  const max = Math.max(1e-12, ...values.flat().filter(Number.isFinite));
  let cells = 0;
  values.forEach((row, r) => row.forEach((v, c) => {
    if (!Number.isFinite(v)) {  // nothing to show (e.g. a class absent from the text)
      ctx.fillStyle = '#e0e0e0';
      ctx.fillRect(left + c * cell, top + r * cell, cell - 1, cell - 1);
      return;
    }
    let t;  // 0..1: white to the colour
    if (lift) {
      const l = Math.log2(Math.max(v, 1 / 16));  // -4..4 around lift 1
      t = Math.max(-1, Math.min(1, l / 2));
      ctx.fillStyle = t >= 0 ? `rgba(198,40,40,${t})` : `rgba(21,101,192,${-t})`;
    } else {
      t = v / max;
      ctx.fillStyle = `rgba(21,101,192,${t})`;
    }
    ctx.fillRect(left + c * cell, top + r * cell, cell - 1, cell - 1);
    cells++;
  }));
  ctx.fillStyle = '#222';
  ctx.font = '10px monospace';
  rowLabels.forEach((l, r) => ctx.fillText(l, 2, top + r * cell + cell * 0.7));
  colLabels.forEach((l, c) => {
    ctx.save();
    ctx.translate(left + c * cell + cell * 0.35, top - 3);
    ctx.rotate(-Math.PI / 4);
    ctx.fillText(l, 0, 0);
    ctx.restore();
  });
  canvas.dataset.cells = cells;
  box.title = lift ? 'red: taken more often than the corpus frequency, blue: less (lift, log scale)' : '';
  return box;
}

// ---- Runs ----

async function runsPage() {
  const d = await api('/api/runs');
  page.append(el('h2', {}, `Runs under ${d.root}`));
  const table = el('table', { id: 'runs' }, el('tr', {}, ...['', 'run', 'status', 'steps', 'best val', 'last val',
    'layers', 'experts', 'top-k', 'lr'].map(h => el('th', {}, h))));
  for (const r of d.runs) {
    const c = r.config || {};
    const m = c.model || {}, ro = c.router || {}, o = c.optimizer || {};
    table.append(el('tr', {},
      el('td', {}, el('input', { type: 'checkbox', value: r.path, class: 'pick' })),
      el('td', {}, el('a', { href: '#/run?path=' + encodeURIComponent(r.path) }, r.path || '.')),
      el('td', { class: 'status-' + r.status }, r.status),
      el('td', {}, `${r.steps} / ${r.max_steps}`), el('td', {}, fmt(r.best_val_loss)), el('td', {}, fmt(r.last_val_loss)),
      el('td', {}, fmt(m.n_layer)), el('td', {}, fmt(ro.num_experts)), el('td', {}, fmt(ro.top_k)), el('td', {}, fmt(o.lr))));
  }
  page.append(table, el('button', { id: 'compare-picked', onclick: () => {
    const picked = [...document.querySelectorAll('.pick:checked')].map(x => x.value);
    location.hash = '#/compare?runs=' + picked.map(encodeURIComponent).join(',');
  } }, 'Compare the ticked runs'));
  page.append(el('h2', {}, 'Sweeps'));
  const sweeps = el('table', { id: 'sweeps' }, el('tr', {}, ...['sweep', 'trials', 'method', 'parameters', 'best val']
    .map(h => el('th', {}, h))));
  for (const s of d.sweeps) {
    sweeps.append(el('tr', {}, el('td', {}, el('a', { href: '#/sweep?path=' + encodeURIComponent(s.path) }, s.path)),
      el('td', {}, s.trials), el('td', {}, s.method), el('td', {}, Object.keys(s.params).join(', ')),
      el('td', {}, fmt(s.best_val_loss))));
  }
  page.append(sweeps);
  done('runs');
}

// ---- A run (live) ----

function runCharts(lines, charts, heatBox) {
  const train = lines.filter(l => 'loss' in l), evals = lines.filter(l => 'val_loss' in l);
  const pts = (rows, f) => rows.map(l => [l.step, f(l)]);
  lineChart(chartBox(charts, 'chart-loss'), 'loss', [
    { label: 'train (window)', points: pts(train, l => l.loss) },
    { label: 'train estimate', points: pts(evals, l => l.train_loss) },
    { label: 'val estimate', points: pts(evals, l => l.val_loss) }]);
  lineChart(chartBox(charts, 'chart-lr'), 'learning rate', [{ label: 'lr', points: pts(train, l => l.lr) }]);
  lineChart(chartBox(charts, 'chart-grad'), 'gradient norm', [{ label: 'grad norm', points: pts(train, l => l.grad_norm) }]);
  lineChart(chartBox(charts, 'chart-tps'), 'tokens/s', [{ label: 'tokens/s', points: pts(train, l => l.tokens_per_s) }]);
  const layers = train.length && train[0].router ? train[0].router.length : 0;
  // A dense block's entry is null (no router): its layer gets no series, the others keep their numbers.
  const perLayer = (key) => [...Array(layers).keys()].filter(i => train.some(l => l.router && l.router[i])).map(i => ({
    label: 'layer ' + i, points: pts(train, l => (l.router && l.router[i] ? l.router[i][key] : null)) }));
  lineChart(chartBox(charts, 'chart-entropy'), 'router entropy (nats)', perLayer('router_entropy'));
  lineChart(chartBox(charts, 'chart-violation'), 'max load violation', perLayer('max_violation'));
  lineChart(chartBox(charts, 'chart-drops'), 'dropped fraction', perLayer('dropped_frac'));
  // Expert load over time: per layer, experts × logging windows.
  heatBox.innerHTML = '';
  const withLoad = train.filter(l => l.router);
  for (let i = 0; i < layers; i++) {
    if (!withLoad[0].router[i]) continue;  // null: a dense block, no router
    const E = withLoad[0].router[i].load.length;
    const values = [...Array(E).keys()].map(e => withLoad.map(l => l.router[i].load[e]));
    heatmap(heatBox, `layer ${i}: share of routed slots per expert, by step`, [...Array(E).keys()].map(e => 'expert ' + e),
      withLoad.map(l => String(l.step)), values, { cell: Math.max(4, Math.min(18, Math.floor(600 / withLoad.length))) });
  }
}

async function runPage(params) {
  const path = params.get('path');
  const head = el('h2', {}, 'Run ' + path);
  const status = el('p', { id: 'run-status' });
  const charts = el('div', { class: 'charts', id: 'charts' });
  const heat = el('div', { id: 'load-heatmaps' });
  const config = el('pre', { id: 'config' });
  page.append(head, status, charts, el('h3', {}, 'Expert load over training'), heat, el('h3', {}, 'Resolved config'), config);
  let offset = 0, lines = [], stopped = false;
  const poll = async () => {
    const d = await api(`/api/run?path=${encodeURIComponent(path)}&offset=${offset}`);
    if (d.reset) lines = [];
    lines = lines.concat(d.lines);
    offset = d.offset;
    status.textContent = `${d.status}: step ${d.steps} of ${d.max_steps}, best val ${fmt(d.best_val_loss)}`;
    status.className = 'status-' + d.status;
    status.dataset.lines = lines.length;
    if (d.lines.length || d.reset || !charts.children.length) runCharts(lines, charts, heat);
    if (!config.textContent) config.textContent = JSON.stringify(d.config, null, 2);
  };
  await poll();
  const timer = setInterval(() => { if (!stopped) poll().catch(() => {}); }, 1000);
  stopPolling = () => { stopped = true; clearInterval(timer); };
  done('run');
}

// ---- Compare ----

async function comparePage(params) {
  const paths = (params.get('runs') || '').split(',').filter(Boolean);
  page.append(el('h2', {}, 'Compare'));
  if (!paths.length) {
    page.append(el('p', {}, 'Tick runs on the Runs page and press Compare.'));
    done('compare');
    return;
  }
  const runs = await Promise.all(paths.map(p => api('/api/run?path=' + encodeURIComponent(p))));
  const charts = el('div', { class: 'charts' });
  page.append(charts);
  lineChart(chartBox(charts, 'chart-val'), 'val loss', runs.map((r, i) => ({
    label: paths[i], points: r.lines.filter(l => 'val_loss' in l).map(l => [l.step, l.val_loss]) })));
  lineChart(chartBox(charts, 'chart-train'), 'train loss (window)', runs.map((r, i) => ({
    label: paths[i], points: r.lines.filter(l => 'loss' in l).map(l => [l.step, l.loss]) })));
  done('compare');
}

// ---- A sweep ----

async function sweepPage(params) {
  const d = await api('/api/sweep?path=' + encodeURIComponent(params.get('path')));
  const names = Object.keys(d.spec.params);
  const cols = ['trial', 'status', ...names, 'final_val_loss', 'best_val_loss', 'tokens_per_s', 'wall_s', 'parameters'];
  page.append(el('h2', {}, `Sweep ${d.path} (${d.spec.method}, ${d.trials.length} trials)`));
  const table = el('table', { id: 'trials' });
  let sortKey = 'best_val_loss', ascending = true;
  const render = () => {
    const rows = [...d.trials].sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    table.innerHTML = '';
    table.append(el('tr', {}, ...cols.map(c => el('th', { class: 'sortable', onclick: () => {
      ascending = sortKey === c ? !ascending : true;
      sortKey = c;
      render();
    } }, c + (c === sortKey ? (ascending ? ' ▲' : ' ▼') : '')))));
    for (const t of rows) {
      const dir = t.dir ? t.dir.split('/').pop() : null;
      table.append(el('tr', {}, ...cols.map(c => el('td', {}, c === 'trial' && dir
        ? el('a', { href: '#/run?path=' + encodeURIComponent(d.path + '/' + dir) }, t.trial) : fmt(t[c])))));
    }
  };
  render();
  const charts = el('div', { class: 'charts' });
  page.append(table, charts);
  names.forEach((name, i) => {
    const done = d.trials.filter(t => typeof t[name] === 'number' && typeof t.best_val_loss === 'number');
    lineChart(chartBox(charts, 'chart-param-' + i), `best val loss against ${name}`,
      [{ label: 'best val loss', points: done.map(t => [t[name], t.best_val_loss]) }], { scatter: true, xLabel: name });
  });
  done('sweep');
}

// ---- Sample ----

async function checkpointPicker(selected) {
  const d = await api('/api/runs');
  const select = el('select', { id: 'checkpoint' });
  for (const c of d.checkpoints) {
    const o = el('option', { value: c }, c);
    if (c === selected) o.selected = true;
    select.append(o);
  }
  return select;
}

async function samplePage() {
  page.append(el('h2', {}, 'Sample'));
  const select = await checkpointPicker();
  const prompt = el('input', { id: 'prompt', value: 'ROMEO:', size: 40 });
  const temperature = el('input', { id: 'temperature', type: 'number', value: '0.8', step: '0.1' });
  const topk = el('input', { id: 'top-k', type: 'number', value: '0' });
  const seed = el('input', { id: 'seed', type: 'number', value: '1337' });
  const length = el('input', { id: 'length', type: 'number', value: '300' });
  const out = el('pre', { id: 'sample-out' });
  const go = el('button', { id: 'generate', onclick: async () => {
    out.textContent = '';
    out.dataset.done = 'false';
    go.disabled = true;
    try {
      const r = await fetch('/api/sample', { method: 'POST', body: JSON.stringify({
        checkpoint: select.value, prompt: prompt.value, temperature: Number(temperature.value),
        top_k: Number(topk.value), seed: Number(seed.value), max_new_tokens: Number(length.value) }) });
      if (!r.ok) throw new Error((await r.json()).error);
      out.textContent = prompt.value;
      const reader = r.body.getReader(), decoder = new TextDecoder();
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        out.textContent += decoder.decode(value, { stream: true });
      }
    } catch (e) {
      out.textContent = 'error: ' + e.message;
    }
    out.dataset.done = 'true';
    go.disabled = false;
  } }, 'Generate');
  page.append(el('p', {}, el('label', {}, 'checkpoint ', select)),
    el('p', {}, el('label', {}, 'prompt ', prompt), el('label', {}, 'temperature ', temperature),
      el('label', {}, 'top-k ', topk), el('label', {}, 'seed ', seed), el('label', {}, 'characters ', length), go), out);
  done('sample');
}

// ---- Inspect ----

async function inspectPage(params) {
  page.append(el('h2', {}, 'Inspect'));
  const select = await checkpointPicker(params.get('checkpoint'));
  select.onchange = () => { location.hash = '#/inspect?checkpoint=' + encodeURIComponent(select.value); };
  page.append(el('p', {}, el('label', {}, 'checkpoint ', select)));
  const ckpt = params.get('checkpoint');
  if (!ckpt) {
    page.append(el('p', {}, 'Pick a checkpoint: its experts are inspected over the validation split (this takes a moment).'));
    done('inspect');
    return;
  }
  page.append(el('p', { id: 'inspect-wait' }, 'Inspecting…'));
  const r = await api('/api/inspect?checkpoint=' + encodeURIComponent(ckpt));
  document.getElementById('inspect-wait').textContent =
    `${r.tokens} validation tokens of ${r.data}, loss ${fmt(r.loss)}; colours: lift over the corpus frequency`;
  const maps = el('div', { id: 'inspect-maps' });
  page.append(maps);
  const experts = [...Array(r.experts).keys()].map(e => 'expert ' + e);
  // Lifts of what the text does not contain are left blank.
  const present = (values, corpus) => values.map((v, i) => (corpus[i] > 0 ? v : null));
  for (const layer of r.layers) {
    maps.append(el('h3', {}, `layer ${layer.layer}: slot share ` +
      layer.experts.map(e => (100 * e.slot_share).toFixed(1) + '%').join(' ') + ` | mean gate ` +
      layer.experts.map(e => e.mean_gate.toFixed(2)).join(' ')));
    heatmap(maps, 'expert × class', experts, r.classes, layer.experts.map(e => present(e.class_lift, r.corpus.classes)), { lift: true });
    heatmap(maps, 'expert × word position', experts, r.positions, layer.experts.map(e => present(e.position_lift, r.corpus.positions)), { lift: true });
    heatmap(maps, 'expert × character', experts, r.vocab, layer.experts.map(e => present(e.char_lift, r.corpus.chars)), { lift: true, cell: 12 });
  }
  const t = el('table', { id: 'transitions' }, el('tr', {}, ...['layers', 'mutual information (bits)', 'of H(next)',
    'next first choice predicted', 'commonest'].map(h => el('th', {}, h))));
  for (const x of r.transitions) {
    t.append(el('tr', {}, el('td', {}, `${x.from} → ${x.to}`), el('td', {}, fmt(x.mutual_information_bits, 3)),
      el('td', {}, (100 * x.normalized_mi).toFixed(1) + '%'), el('td', {}, (100 * x.prediction_accuracy).toFixed(1) + '%'),
      el('td', {}, (100 * x.baseline_accuracy).toFixed(1) + '%')));
  }
  page.append(el('h3', {}, 'Across layers (first choices)'), t);
  done('inspect');
}

// ---- routing ----

async function route() {
  if (stopPolling) { stopPolling(); stopPolling = null; }
  delete document.body.dataset.ready;
  page.innerHTML = '';
  const [name, query] = (location.hash.slice(2) || 'runs').split('?');
  const params = new URLSearchParams(query || '');
  const pages = { runs: runsPage, run: runPage, compare: comparePage, sweep: sweepPage, sample: samplePage,
                  inspect: inspectPage };
  try {
    await (pages[name] || runsPage)(params);
  } catch (e) {
    showError(e);
    done('error');
  }
}

window.addEventListener('hashchange', route);
route();
