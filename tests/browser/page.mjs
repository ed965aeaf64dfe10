// Drives the clinician's page (GET /) of a running leuknet-server in Debian's Chromium with
// playwright-core, and writes what it saw to <out-dir>/report.json plus screenshots.
//
//   NODE_PATH=.native/node/node_modules node tests/browser/page.mjs <base-url> <out-dir> <image>...
//
// Run by tests/browser.rs, which compares the report with the API's own answers. Browser-side
// checks (console errors, CSP violations, keyboard access, heat-map overlay and its toggle, no
// horizontal scroll at 768 px, error messages) are made here; each failure is listed in
// report.failures and makes the exit status 1.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');

const [base, outDir, ...images] = process.argv.slice(2);
if (!base || !outDir || images.length === 0) {
  console.error('usage: page.mjs <base-url> <out-dir> <image>...');
  process.exit(2);
}
fs.mkdirSync(outDir, { recursive: true });

const ACCESSION = 'ACC-2024-0042';
const SPECIMEN = 'SPEC-7';
const failures = [];
// Heat-map checks apart, so that tests/browser.rs can report them after everything else.
const heatmapFailures = [];
const report = { base, images, failures, heatmap_failures: heatmapFailures, steps: [] };
const consoleErrors = [];
let phase = 'load';

function check(cond, what) {
  if (!cond) failures.push(what);
  return cond;
}

function checkHeatmap(cond, what) {
  if (!cond) heatmapFailures.push(what);
  return cond;
}

function step(name) {
  report.steps.push({ name, at_ms: Math.round(performance.now()) });
  console.log('page.mjs: ' + name);
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'leuknet-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.LEUKNET_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: 1280, height: 900 },
  deviceScaleFactor: 1,
  acceptDownloads: false,
});

try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(30_000);
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push({ phase, text: msg.text() });
  });
  page.on('pageerror', (err) => consoleErrors.push({ phase, text: 'page error: ' + err.message }));
  // CSP violations, seen from inside the page (init scripts run outside the page's CSP).
  await page.addInitScript(() => {
    window.__csp = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || '') + ' ' + (e.sourceFile || '') + ':' + e.lineNumber);
    });
  });

  // ---- load ---------------------------------------------------------------------------------
  step('load the page');
  const resp = await page.goto(base + '/', { waitUntil: 'load' });
  check(resp && resp.status() === 200, 'GET / answered ' + (resp && resp.status()));
  report.csp_header = resp ? resp.headers()['content-security-policy'] || null : null;
  await page.waitForFunction(() => {
    const t = document.getElementById('model-name').textContent;
    return t && !t.startsWith('loading');
  });
  report.model_text = await page.textContent('#model-name');
  report.page_disclaimer = await page.textContent('.disclaimer');
  report.title = await page.title();

  // ---- keyboard: Tab reaches the file picker, Space opens it ------------------------------
  step('keyboard: Tab to the file picker');
  const focusPath = [];
  let reached = false;
  for (let i = 0; i < 15 && !reached; i++) {
    await page.keyboard.press('Tab');
    const id = await page.evaluate(() => {
      const a = document.activeElement;
      return a ? (a.id || a.tagName.toLowerCase() + (a.className ? '.' + a.className : '')) : null;
    });
    focusPath.push(id);
    reached = id === 'files';
  }
  report.focus_path = focusPath;
  check(reached, 'Tab never focused the file picker (#files): ' + focusPath.join(' -> '));
  report.focus_outline = await page.evaluate(() => {
    const s = getComputedStyle(document.querySelector('.dropzone__label'));
    return { style: s.outlineStyle, width: s.outlineWidth };
  });
  check(report.focus_outline.style !== 'none' && report.focus_outline.width !== '0px',
    'no visible focus ring on the drop zone while the file picker has focus');
  report.file_input_label = await page.evaluate(() => {
    const input = document.getElementById('files');
    return Array.from(input.labels || []).map((l) => l.textContent.replace(/\s+/g, ' ').trim()).join(' ');
  });
  check(report.file_input_label.includes('Choose images'), 'file picker has no label');

  step('keyboard: Space opens the file chooser; choose ' + images.length + ' images');
  const [chooser] = await Promise.all([
    page.waitForEvent('filechooser', { timeout: 10_000 }),
    page.keyboard.press('Space'),
  ]);
  check(chooser.isMultiple(), 'the file chooser does not allow several files');
  await chooser.setFiles(images);
  report.selected_text = await page.textContent('#selected-files');

  await page.fill('#accession-id', ACCESSION);
  await page.fill('#specimen-id', SPECIMEN);

  // ---- classify -----------------------------------------------------------------------------
  step('classify');
  phase = 'classify';
  const t0 = performance.now();
  await page.click('#classify');
  await page.waitForSelector('#results[data-state="done"], #results[data-state="error"]', { state: 'attached', timeout: 180_000 });
  report.classify_ms = Math.round(performance.now() - t0);
  report.results_state = await page.getAttribute('#results', 'data-state');
  if (report.results_state !== 'done') {
    report.unexpected_error = await page.textContent('#error');
  }
  check(report.results_state === 'done', 'classification did not finish: ' + (report.unexpected_error || ''));
  report.results_aria_live = await page.getAttribute('#results', 'aria-live');
  // Wait until every preview and overlay image has loaded (or failed).
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#results img'))
    .every((img) => img.hidden || img.complete), null, { timeout: 20_000 }).catch(() => {});

  report.results = await page.$$eval('#results .result', (nodes) => nodes.map((n) => {
    const q = (s) => n.querySelector(s);
    const img = q('.image-box__image');
    const ov = q('.image-box__overlay');
    const rect = (el) => {
      const r = el.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height };
    };
    const visible = (el) => !!el && !el.hidden && el.getBoundingClientRect().width > 0 &&
      getComputedStyle(el).display !== 'none' && getComputedStyle(el).visibility !== 'hidden' &&
      Number(getComputedStyle(el).opacity) > 0;
    const facts = {};
    const dts = n.querySelectorAll('.facts dt');
    dts.forEach((dt) => { facts[dt.textContent] = dt.nextElementSibling.textContent; });
    return {
      title: q('.result__title').textContent,
      label: n.dataset.label,
      label_text: q('.verdict__label').textContent,
      probability_text: q('.probability__value').textContent,
      probability_attr: Number(q('.probability__value').dataset.probability),
      threshold_text: q('.probability__threshold').textContent,
      bar_label: q('.bar').getAttribute('aria-label'),
      bar_role: q('.bar').getAttribute('role'),
      bar_fill_width: q('.bar__fill').getBoundingClientRect().width,
      bar_width: q('.bar').getBoundingClientRect().width,
      threshold_left: q('.bar__threshold').getBoundingClientRect().x - q('.bar').getBoundingClientRect().x,
      band_visible: visible(q('.bar__band')),
      image_alt: img.alt,
      image_loaded: img.complete && img.naturalWidth > 0,
      image_visible: visible(img),
      image_rect: rect(img),
      overlay_present: !!(ov && ov.getAttribute('src') && ov.getAttribute('src').startsWith('data:image/png;base64,')),
      overlay_loaded: !!(ov && ov.complete && ov.naturalWidth > 0),
      overlay_natural: ov ? [ov.naturalWidth, ov.naturalHeight] : null,
      overlay_visible: visible(ov),
      overlay_rect: ov ? rect(ov) : null,
      overlay_alt: ov ? ov.alt : null,
      overlay_opacity: ov ? Number(getComputedStyle(ov).opacity) : null,
      toggle_label: (() => {
        const t = q('.overlay-toggle');
        return t && t.labels && t.labels[0] ? t.labels[0].textContent : null;
      })(),
      ood_visible: visible(q('.ood-warning')),
      ood_text: q('.ood-warning').textContent.replace(/\s+/g, ' ').trim(),
      facts,
      disclaimer: q('.result__disclaimer').textContent,
    };
  }));
  step('read ' + report.results.length + ' results');
  check(report.results.length === images.length,
    'expected ' + images.length + ' results, saw ' + report.results.length);

  report.results.forEach((r, i) => {
    const n = i + 1;
    check(r.image_loaded && r.image_visible, `result ${n}: the uploaded image is not shown`);
    check(r.image_alt && r.image_alt.length > 10, `result ${n}: image has no alt text`);
    check(r.bar_role === 'img' && /^probability ([<>] )?\d\.\d{3}, threshold \d\.\d{3}/.test(r.bar_label || ''),
      `result ${n}: probability bar has no accessible text: ${r.bar_label}`);
    check(Math.abs(r.bar_fill_width - r.probability_attr * r.bar_width) < 3,
      `result ${n}: bar fill ${r.bar_fill_width}px does not match probability ${r.probability_attr}`);
    check(r.disclaimer && /research use only/i.test(r.disclaimer), `result ${n}: no disclaimer`);
    // The heat map: present, loaded, visible and stretched exactly over the image.
    if (checkHeatmap(r.overlay_present, `result ${n}: no heat-map overlay (explanation.overlay_png_base64 missing from the API answer?)`)) {
      checkHeatmap(r.overlay_loaded, `result ${n}: heat-map PNG did not load`);
      checkHeatmap(r.overlay_visible, `result ${n}: heat map not visible`);
      const a = r.image_rect;
      const b = r.overlay_rect;
      checkHeatmap(b && Math.abs(a.x - b.x) < 1 && Math.abs(a.y - b.y) < 1 &&
        Math.abs(a.width - b.width) < 1 && Math.abs(a.height - b.height) < 1,
        `result ${n}: overlay ${JSON.stringify(b)} does not cover the image ${JSON.stringify(a)}`);
      checkHeatmap(r.overlay_alt && r.overlay_alt.length > 10, `result ${n}: heat map has no alt text`);
      checkHeatmap(r.toggle_label === 'Show heat map', `result ${n}: heat-map toggle is not labelled`);
    }
  });

  // Toggle and opacity of the first overlay.
  if (report.results.length && report.results[0].overlay_present) {
    step('toggle the heat map off and on; change its opacity');
    const ov = page.locator('#r1 .image-box__overlay');
    await page.click('#r1 .overlay-toggle-label');
    report.overlay_visible_after_toggle_off = await ov.isVisible();
    checkHeatmap(!report.overlay_visible_after_toggle_off, 'unchecking "Show heat map" did not hide the overlay');
    await page.focus('#r1-overlay');
    await page.keyboard.press('Space');
    report.overlay_visible_after_toggle_on = await ov.isVisible();
    checkHeatmap(report.overlay_visible_after_toggle_on, 'checking "Show heat map" again did not show the overlay');
    await page.fill('#r1-opacity', '80');
    report.overlay_opacity_after_slider = await ov.evaluate((el) => Number(getComputedStyle(el).opacity));
    checkHeatmap(Math.abs(report.overlay_opacity_after_slider - 0.8) < 0.01,
      'the opacity slider did not change the overlay opacity: ' + report.overlay_opacity_after_slider);
    await page.fill('#r1-opacity', '50');
  } else {
    checkHeatmap(false, 'no heat-map overlay to toggle');
  }

  report.status_text = await page.textContent('#status');
  await page.evaluate(() => {
    if (document.activeElement) document.activeElement.blur();
    window.scrollTo(0, 0);
  });
  await page.screenshot({ path: path.join(outDir, 'page.png'), fullPage: true });

  // ---- tablet width -------------------------------------------------------------------------
  step('tablet: 768 px wide');
  await page.setViewportSize({ width: 768, height: 1024 });
  await page.waitForTimeout(100);
  report.tablet = await page.evaluate(() => ({
    scroll_width: document.documentElement.scrollWidth,
    client_width: document.documentElement.clientWidth,
  }));
  check(report.tablet.scroll_width <= report.tablet.client_width,
    `horizontal scroll at 768 px: scrollWidth ${report.tablet.scroll_width} > ${report.tablet.client_width}`);
  await page.screenshot({ path: path.join(outDir, 'page-768.png'), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });

  // ---- errors -------------------------------------------------------------------------------
  phase = 'errors';
  const readError = async () => ({
    visible: await page.isVisible('#error'),
    code: await page.getAttribute('#error', 'data-code'),
    message: await page.textContent('#error-message'),
    plain: await page.textContent('#error-plain'),
    meta: await page.textContent('#error-meta'),
    role: await page.getAttribute('#error', 'role'),
  });
  const classifyAndWait = async () => {
    await page.click('#classify');
    await page.waitForSelector('#results[data-state="error"], #results[data-state="done"]', { state: 'attached', timeout: 60_000 });
  };

  step('drop a text file named .png on the drop zone');
  await page.evaluate(() => {
    const file = new File(['patient notes, not an image\n'], 'notes.png', { type: 'image/png' });
    const dt = new DataTransfer();
    dt.items.add(file);
    const zone = document.getElementById('dropzone');
    zone.dispatchEvent(new DragEvent('dragenter', { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  });
  report.selected_after_drop = await page.textContent('#selected-files');
  check(report.selected_after_drop.includes('notes.png'), 'the drop zone did not take the dropped file');
  await classifyAndWait();
  report.not_an_image = await readError();
  check(report.not_an_image.visible && report.not_an_image.code === 'not_an_image',
    'no not_an_image error shown: ' + JSON.stringify(report.not_an_image));
  check(report.not_an_image.role === 'alert', 'the error box is not role=alert');
  check(await page.locator('#results .result').count() === 0, 'old results still shown after an error');
  await page.screenshot({ path: path.join(outDir, 'page-error.png'), fullPage: true });

  step('429 with Retry-After (simulated)');
  await page.route('**/v1/classify*', (route) => route.fulfill({
    status: 429,
    headers: { 'content-type': 'application/json', 'retry-after': '7' },
    body: JSON.stringify({ error: { code: 'queue_full', message: 'the queue is full (64 images); retry after 7 s' } }),
  }));
  await classifyAndWait();
  report.queue_full = await readError();
  check(report.queue_full.code === 'queue_full' && /server busy, retry in 7 s/i.test(report.queue_full.plain),
    'queue_full not explained: ' + JSON.stringify(report.queue_full));
  await page.unroute('**/v1/classify*');

  step('401 unauthorized (simulated): the page asks for an API key and sends it');
  let authSeen = null;
  await page.route('**/v1/classify*', (route) => {
    authSeen = route.request().headers()['authorization'] || null;
    return route.fulfill({
      status: 401,
      headers: { 'content-type': 'application/json', 'www-authenticate': 'Bearer' },
      body: JSON.stringify({ error: { code: 'unauthorized', message: 'missing API key' } }),
    });
  });
  await classifyAndWait();
  report.unauthorized = await readError();
  report.api_key_field_visible = await page.isVisible('#api-key');
  check(report.unauthorized.code === 'unauthorized' && /API key/.test(report.unauthorized.plain),
    'unauthorized not explained: ' + JSON.stringify(report.unauthorized));
  check(report.api_key_field_visible, 'no API key field after 401');
  await page.fill('#api-key', 'test-key-123');
  await classifyAndWait();
  check(authSeen === 'Bearer test-key-123', 'the API key was not sent: ' + authSeen);
  await page.fill('#api-key', '');
  await page.unroute('**/v1/classify*');

  step('network failure (simulated)');
  await page.route('**/v1/classify*', (route) => route.abort('connectionrefused'));
  await classifyAndWait();
  report.network = await readError();
  check(report.network.code === 'network' && /could not reach the server/i.test(report.network.plain),
    'network failure not explained: ' + JSON.stringify(report.network));
  await page.unroute('**/v1/classify*');

  // ---- console and CSP ----------------------------------------------------------------------
  report.csp_violations = await page.evaluate(() => window.__csp);
  check(report.csp_violations.length === 0, 'CSP violations: ' + report.csp_violations.join('; '));
  report.console_errors = consoleErrors;
  // In the error phase the browser itself logs the refused requests (422, 429, aborted).
  const unexpected = consoleErrors.filter((e) => !(e.phase === 'errors' &&
    /status of (401|422|429)|ERR_CONNECTION_REFUSED|Failed to fetch/.test(e.text)));
  check(unexpected.length === 0, 'console errors: ' + JSON.stringify(unexpected));
} catch (e) {
  failures.push('exception: ' + (e && e.stack ? e.stack : e));
} finally {
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
  fs.writeFileSync(path.join(outDir, 'report.json'), JSON.stringify(report, null, 2));
}

const all = failures.concat(heatmapFailures);
if (all.length) {
  console.error('page.mjs: ' + all.length + ' failure(s):\n  - ' + all.join('\n  - '));
  process.exit(1);
}
console.log('page.mjs: all browser checks passed');
