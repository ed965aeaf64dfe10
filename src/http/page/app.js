// LeukNet clinician page: pick or drop images, POST them to /v1/classify?explain=true, show each
// result (label, probability bar with threshold and indeterminate band, Grad-CAM overlay, OOD
// warning, IDs, model, disclaimer) and a clear message for every API error.
// No framework, no inline script or style (the page's CSP forbids both).
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);

  // Plain-language line for every error code of the API (src/http/error.rs ERROR_CODES).
  // `limits` is runtime info from /v1/models, when it loaded.
  const ERROR_HELP = {
    empty_body: () => 'The upload was empty. Choose at least one image file and try again.',
    missing_image: () => 'No image reached the server. Choose at least one image file and try again.',
    bad_request: () => 'The server could not read the upload. Reload the page and try again.',
    invalid_identifier: () =>
      'An accession or specimen ID is not valid: use 1 to 64 letters, digits or the characters . _ : / - (no spaces).',
    not_an_image: () =>
      'A file is not an image the service can read. Use PNG, JPEG, TIFF or BMP files (no PDFs, documents or renamed files).',
    corrupt_image: () =>
      'A file is damaged or truncated. Export or copy the image again and retry.',
    unsupported_media_type: () =>
      'The server did not accept the upload format. Reload the page and try again.',
    body_too_large: (l) =>
      'The upload is too large' + (l && l.max_body_bytes ? ' (limit ' + mb(l.max_body_bytes) + ')' : '') +
      '. Send fewer images at once, or smaller files.',
    body_timeout: () =>
      'The upload took too long to reach the server (slow or interrupted network). Retry, or send fewer images at once.',
    too_many_pixels: (l) =>
      'An image has too many pixels' + (l && l.max_pixels ? ' (limit ' + (l.max_pixels / 1e6).toFixed(0) + ' megapixels)' : '') +
      '. Crop the region of interest or downscale the image.',
    too_many_images: (l) =>
      'Too many images in one upload' + (l && l.max_images_per_request ? ': send at most ' + l.max_images_per_request + ' at once' : '') + '.',
    not_found: () => 'The page and the server do not match (wrong address or version). Reload the page.',
    method_not_allowed: () => 'The page and the server do not match (wrong address or version). Reload the page.',
    queue_full: () => 'The server is busy with other images. Wait and retry.',
    deadline_exceeded: () => 'The server took too long and no result was produced. Retry in a moment.',
    inference_failed: () => 'The model failed on these images. Retry; if it happens again, contact the administrator.',
    shutting_down: () => 'The server is restarting. Retry in a minute.',
    not_ready: () => 'The model is still loading. Retry in a minute.',
    unauthorized: () =>
      'This server needs a valid API key: enter it in the "API key" field (ask your administrator) and retry.',
    internal: () => 'The server had an internal error. Retry; if it happens again, contact the administrator with the request ID.',
  };

  const state = {
    files: [],
    urls: [],
    model: null,
    runtime: null,
    busy: false,
    resultCount: 0,
  };

  function mb(bytes) {
    return (bytes / (1024 * 1024)).toFixed(0) + ' MB';
  }

  function fmtProb(p) {
    if (typeof p !== 'number' || !isFinite(p)) return '–';
    if (p > 0 && p < 0.001) return '< 0.001';
    if (p < 1 && p > 0.999) return '> 0.999';
    return p.toFixed(3);
  }

  function fmtNum(x, digits) {
    return typeof x === 'number' && isFinite(x) ? x.toFixed(digits) : '–';
  }

  function clamp01(x) {
    return Math.min(1, Math.max(0, x));
  }

  function text(el, s) {
    el.textContent = s;
    return el;
  }

  function setStatus(s) {
    text($('status'), s);
  }

  // ---- API key (only when the server asks for one: 401 unauthorized) -------------------------
  function apiHeaders() {
    const h = { Accept: 'application/json' };
    const key = $('api-key').value.trim();
    if (key) h.Authorization = 'Bearer ' + key;
    return h;
  }

  function askForKey() {
    $('api-key-field').hidden = false;
  }

  // ---- model info ---------------------------------------------------------------------------
  async function loadModel() {
    try {
      const resp = await fetch('/v1/models', { headers: apiHeaders() });
      if (resp.status === 401) {
        askForKey();
        text($('model-name'), 'API key needed');
        return;
      }
      if (!resp.ok) throw new Error('HTTP ' + resp.status);
      const body = await resp.json();
      const m = body && Array.isArray(body.models) ? body.models[0] : null;
      if (!m || !m.card) throw new Error('no model in the answer');
      state.model = m.card;
      state.runtime = m.runtime || null;
      const card = m.card;
      let s = (card.name || 'unknown') + ' ' + (card.version || '');
      if (card.decision && typeof card.decision.threshold === 'number') {
        s += ' · threshold ' + card.decision.threshold.toFixed(3);
      }
      if (m.runtime && m.runtime.execution_provider) s += ' · ' + m.runtime.execution_provider;
      if (m.ready === false) s += ' · still loading';
      text($('model-name'), s);
      // The banner already starts with "Research use only."; show the card's wording after it.
      const rest = typeof card.disclaimer === 'string'
        ? card.disclaimer.replace(/^\s*research use only\.?\s*/i, '') : '';
      if (rest) text($('page-disclaimer'), rest);
    } catch (e) {
      text($('model-name'), 'unavailable (' + (e && e.message ? e.message : e) + ')');
    }
  }

  // ---- file selection -----------------------------------------------------------------------
  function setFiles(list) {
    state.files = Array.from(list || []).filter((f) => f && typeof f.size === 'number');
    const n = state.files.length;
    let s;
    if (n === 0) s = 'No image selected.';
    else if (n === 1) s = '1 image selected: ' + state.files[0].name;
    else s = n + ' images selected: ' + state.files.map((f) => f.name).join(', ');
    text($('selected-files'), s);
    $('classify').disabled = n === 0 || state.busy;
    $('clear').disabled = n === 0 && state.resultCount === 0;
  }

  function bindDropzone() {
    const zone = $('dropzone');
    const input = $('files');
    input.addEventListener('change', () => setFiles(input.files));
    let depth = 0;
    zone.addEventListener('dragenter', (e) => {
      e.preventDefault();
      depth += 1;
      zone.classList.add('dropzone--over');
    });
    zone.addEventListener('dragover', (e) => {
      e.preventDefault();
      if (e.dataTransfer) e.dataTransfer.dropEffect = 'copy';
    });
    zone.addEventListener('dragleave', () => {
      depth = Math.max(0, depth - 1);
      if (depth === 0) zone.classList.remove('dropzone--over');
    });
    zone.addEventListener('drop', (e) => {
      e.preventDefault();
      depth = 0;
      zone.classList.remove('dropzone--over');
      const files = e.dataTransfer ? e.dataTransfer.files : null;
      if (files && files.length) {
        input.value = '';
        setFiles(files);
        $('classify').focus();
      }
    });
    // A file dropped beside the zone must not make the browser navigate away from the page.
    window.addEventListener('dragover', (e) => e.preventDefault());
    window.addEventListener('drop', (e) => e.preventDefault());
  }

  // ---- errors -------------------------------------------------------------------------------
  function hideError() {
    $('error').hidden = true;
    $('error').removeAttribute('data-code');
  }

  function showError(code, status, message, requestId, retryAfter) {
    const box = $('error');
    box.dataset.code = code;
    let plain;
    if (code === 'queue_full') {
      plain = retryAfter != null
        ? 'Server busy, retry in ' + retryAfter + ' s.'
        : ERROR_HELP.queue_full(state.runtime);
    } else if (code === 'network') {
      plain = 'Could not reach the server. Check the network connection and that LeukNet is running, then retry.';
    } else if (code === 'bad_response') {
      plain = 'The server gave an unexpected answer. Retry; if it happens again, contact the administrator.';
    } else {
      const help = ERROR_HELP[code];
      plain = help ? help(state.runtime) : 'The server refused the request.';
    }
    text($('error-plain'), plain);
    text($('error-message'), message || '(none)');
    const meta = [];
    if (status) meta.push('HTTP ' + status);
    meta.push('code ' + code);
    if (requestId) meta.push('request ID ' + requestId);
    text($('error-meta'), meta.join(' · '));
    box.hidden = false;
  }

  // ---- results ------------------------------------------------------------------------------
  function revokeUrls() {
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    state.urls = [];
  }

  function clearResults() {
    revokeUrls();
    $('results').replaceChildren();
    state.resultCount = 0;
    $('results-empty').hidden = false;
  }

  // Where the heat map is strongest, in words, from the 7x7 Grad-CAM grid.
  function hottestRegion(grid) {
    if (!Array.isArray(grid) || grid.length === 0) return null;
    let best = -Infinity;
    let br = 0;
    let bc = 0;
    grid.forEach((row, r) => {
      if (!Array.isArray(row)) return;
      row.forEach((v, c) => {
        if (typeof v === 'number' && v > best) {
          best = v;
          br = r;
          bc = c;
        }
      });
    });
    const rows = grid.length;
    const cols = Array.isArray(grid[0]) ? grid[0].length : 1;
    const third = (i, n, names) => names[Math.min(2, Math.floor((3 * i) / Math.max(1, n)))];
    const v = third(br, rows, ['upper', 'middle', 'lower']);
    const h = third(bc, cols, ['left', 'centre', 'right']);
    return v === 'middle' && h === 'centre' ? 'the centre' : 'the ' + v + ' ' + h + ' part';
  }

  function addFact(dl, term, value) {
    if (value == null || value === '') return;
    const dt = document.createElement('dt');
    const dd = document.createElement('dd');
    text(dt, term);
    text(dd, String(value));
    dl.append(dt, dd);
  }

  function renderResult(result, index, file, response) {
    const n = index + 1;
    const id = 'r' + n;
    const node = $('result-template').content.firstElementChild.cloneNode(true);
    const q = (sel) => node.querySelector(sel);
    const label = typeof result.label === 'string' ? result.label : 'unknown';
    const name = (result.image && result.image.filename) || (file && file.name) || 'image ' + n;
    node.id = id;
    node.dataset.label = label;
    node.classList.add('result--' + (['leukemic', 'healthy', 'indeterminate'].includes(label) ? label : 'unknown'));
    node.setAttribute('aria-labelledby', id + '-title');
    const title = q('.result__title');
    title.id = id + '-title';
    text(title, n + '. ' + name);

    // Image and overlay.
    const img = q('.image-box__image');
    img.alt = 'Uploaded blood-smear image ' + n + ': ' + name;
    if (file) {
      const url = URL.createObjectURL(file);
      state.urls.push(url);
      // Browsers cannot show TIFF: keep the result, drop the preview and the heat map over it.
      img.addEventListener('error', () => {
        img.hidden = true;
        q('.image-box').classList.add('image-box--nopreview');
        q('.image-box__nopreview').hidden = false;
        q('.image-box__overlay').hidden = true;
        q('.overlay-toggle').disabled = true;
        q('.overlay-opacity').disabled = true;
        text(q('.overlay-note'), 'No heat map without a preview of the image.');
      });
      img.src = url;
    } else {
      img.hidden = true;
      q('.image-box__nopreview').hidden = false;
    }

    const overlay = q('.image-box__overlay');
    const toggle = q('.overlay-toggle');
    const opacity = q('.overlay-opacity');
    const box = q('.image-box');
    toggle.id = id + '-overlay';
    q('.overlay-toggle-label').htmlFor = toggle.id;
    opacity.id = id + '-opacity';
    q('.overlay-opacity-label').htmlFor = opacity.id;
    const ex = result.explanation;
    if (ex && typeof ex.overlay_png_base64 === 'string' && ex.overlay_png_base64.length > 0) {
      overlay.src = 'data:image/png;base64,' + ex.overlay_png_base64;
      const where = hottestRegion(ex.grid);
      overlay.alt = 'Heat map (' + (ex.method || 'grad-cam') + ') over image ' + n +
        (where ? ': the model looked most at ' + where + ' of the image' : '');
      overlay.hidden = false;
      box.style.setProperty('--overlay-opacity', String(Number(opacity.value) / 100));
      toggle.addEventListener('change', () => {
        overlay.hidden = !toggle.checked;
        opacity.disabled = !toggle.checked;
      });
      opacity.addEventListener('input', () => {
        box.style.setProperty('--overlay-opacity', String(Number(opacity.value) / 100));
      });
      text(q('.overlay-note'), 'Heat map (' + (ex.method || 'grad-cam') +
        '): the warmest regions weighed most in the score. It is not a segmentation of the cells.');
    } else {
      toggle.checked = false;
      toggle.disabled = true;
      opacity.disabled = true;
      text(q('.overlay-note'), state.model && !state.model.explain
        ? 'This model gives no heat map.' : 'No heat map in this answer.');
    }

    // Verdict.
    const labelEl = q('.verdict__label');
    const labelText = { leukemic: 'Leukemic', healthy: 'Healthy', indeterminate: 'Indeterminate' }[label] || label;
    text(labelEl, labelText);
    labelEl.classList.add('verdict__label--' + label);

    const p = typeof result.probability === 'number' ? result.probability : NaN;
    const thr = typeof result.threshold === 'number' ? result.threshold
      : (state.model && state.model.decision ? state.model.decision.threshold : NaN);
    // `low == high` means the model has no indeterminate band.
    const b = result.indeterminate_band;
    const band = b && typeof b.low === 'number' && typeof b.high === 'number' && b.high > b.low ? b : null;
    const pv = q('.probability__value');
    text(pv, fmtProb(p));
    pv.dataset.probability = String(p);
    text(q('.probability__threshold'), isFinite(thr) ? '(threshold ' + fmtNum(thr, 3) + ')' : '');

    const bar = q('.bar');
    bar.style.setProperty('--p', String(isFinite(p) ? clamp01(p) : 0));
    bar.style.setProperty('--t', String(isFinite(thr) ? clamp01(thr) : 0));
    let aria = 'probability ' + fmtProb(p) + (isFinite(thr) ? ', threshold ' + fmtNum(thr, 3) : '');
    if (band) {
      bar.style.setProperty('--band-low', String(clamp01(band.low)));
      bar.style.setProperty('--band-high', String(clamp01(band.high)));
      aria += ', indeterminate between ' + fmtNum(band.low, 2) + ' and ' + fmtNum(band.high, 2);
    } else {
      q('.bar__band').hidden = true;
    }
    if (!isFinite(thr)) q('.bar__threshold').hidden = true;
    bar.setAttribute('aria-label', aria);
    text(q('.bar-legend'), 'Bar: probability of leukemia' + (isFinite(thr) ? '; line: decision threshold ' + fmtNum(thr, 3) : '') +
      (band ? '; shaded: indeterminate band ' + fmtNum(band.low, 2) + '–' + fmtNum(band.high, 2) : '') + '.');

    // Out-of-distribution warning.
    if (result.in_distribution === false) {
      const w = q('.ood-warning');
      w.hidden = false;
      text(q('.ood-warning__text'),
        'This image looks unlike the images the model was trained on' +
        (typeof result.ood_score === 'number' && typeof result.ood_threshold === 'number'
          ? ' (OOD score ' + fmtNum(result.ood_score, 1) + ' above ' + fmtNum(result.ood_threshold, 1) + ')'
          : '') +
        ': the result may be unreliable. Check the image (stain, magnification, focus) before reading it.');
    }

    // Facts.
    const dl = q('.facts');
    const acc = result.accession_id || response.accession_id;
    const spec = result.specimen_id || response.specimen_id;
    addFact(dl, 'Accession ID', acc);
    addFact(dl, 'Specimen ID', spec);
    if (result.model) addFact(dl, 'Model', (result.model.name || '') + ' ' + (result.model.version || ''));
    if (result.in_distribution === true) addFact(dl, 'Image check', 'similar to the training images');
    if (result.image) {
      addFact(dl, 'Image', (result.image.width || '?') + ' × ' + (result.image.height || '?') + ' ' +
        (result.image.format || ''));
    }
    if (result.timings) {
      const t = result.timings;
      addFact(dl, 'Time', fmtNum((t.decode_ms || 0) + (t.queue_ms || 0) + (t.inference_ms || 0), 0) +
        ' ms' + (result.execution_provider ? ' (' + result.execution_provider + ')' : ''));
    }
    if (result.image && result.image.sha256) addFact(dl, 'SHA-256', result.image.sha256.slice(0, 16) + '…');
    text(q('.result__disclaimer'), result.disclaimer ||
      (state.model && state.model.disclaimer) || 'Research use only. Not a medical device.');
    return node;
  }

  // ---- submit -------------------------------------------------------------------------------
  async function submit(e) {
    e.preventDefault();
    if (state.busy || state.files.length === 0) return;
    const files = state.files.slice();
    const results = $('results');
    state.busy = true;
    $('classify').disabled = true;
    hideError();
    clearResults();
    results.dataset.state = 'busy';
    results.setAttribute('aria-busy', 'true');
    setStatus('Classifying ' + files.length + (files.length === 1 ? ' image…' : ' images…'));

    const form = new FormData();
    const acc = $('accession-id').value.trim();
    const spec = $('specimen-id').value.trim();
    if (acc) form.append('accession_id', acc);
    if (spec) form.append('specimen_id', spec);
    files.forEach((f) => form.append('image', f, f.name));

    // The model card may not have loaded yet (server starting, or an API key entered since).
    if (!state.model) await loadModel();
    // Ask for the Grad-CAM heat map when the model has one (the card lists `explain`); the
    // server refuses explain=true for a model without it. Unknown model: ask.
    const explain = state.model ? !!state.model.explain : true;
    const started = performance.now();
    let outcome = 'error';
    try {
      let resp;
      try {
        resp = await fetch(explain ? '/v1/classify?explain=true' : '/v1/classify', {
          method: 'POST',
          body: form,
          headers: apiHeaders(),
        });
      } catch (err) {
        showError('network', 0, err && err.message ? err.message : String(err), null, null);
        setStatus('Failed: the server could not be reached.');
        return;
      }
      const requestId = resp.headers.get('x-request-id');
      let body = null;
      try {
        body = await resp.json();
      } catch (err) {
        body = null;
      }
      if (!resp.ok) {
        const err = body && body.error ? body.error : null;
        if (resp.status === 401) askForKey();
        const ra = resp.headers.get('retry-after');
        const retry = ra != null && /^\d+$/.test(ra.trim()) ? Number(ra.trim()) : null;
        showError(err && err.code ? err.code : 'bad_response', resp.status,
          err && err.message ? err.message : 'HTTP ' + resp.status + ' ' + resp.statusText, requestId, retry);
        setStatus('Failed: ' + (err && err.code ? err.code.replace(/_/g, ' ') : 'HTTP ' + resp.status) + '.');
        return;
      }
      if (!body || !Array.isArray(body.results)) {
        showError('bad_response', resp.status, 'the answer has no results', requestId, null);
        setStatus('Failed: unexpected answer.');
        return;
      }
      const frag = document.createDocumentFragment();
      body.results.forEach((r, i) => frag.append(renderResult(r || {}, i, files[i], body)));
      results.append(frag);
      state.resultCount = body.results.length;
      $('results-empty').hidden = state.resultCount > 0;
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      setStatus(body.results.length + (body.results.length === 1 ? ' result' : ' results') + ' in ' + secs + ' s' +
        (body.request_id ? ' (request ' + body.request_id + ')' : '') + '.');
      outcome = 'done';
    } finally {
      state.busy = false;
      results.dataset.state = outcome;
      results.removeAttribute('aria-busy');
      setFiles(state.files);
    }
  }

  function reset() {
    $('files').value = '';
    hideError();
    clearResults();
    $('results').dataset.state = 'idle';
    setStatus('');
    setFiles([]);
    $('files').focus();
  }

  function init() {
    bindDropzone();
    $('upload-form').addEventListener('submit', submit);
    $('clear').addEventListener('click', reset);
    window.addEventListener('pagehide', revokeUrls);
    setFiles($('files').files);
    document.documentElement.classList.add('js');
    loadModel();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
