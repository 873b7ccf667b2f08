/*
 * fhirbox console: a single-page client of fhirbox's public HTTP API (jobs, data, SQL, views,
 * health). It has no privileges of its own: it sees exactly what the signed-in subject may see.
 *
 * Signing in: the Client id and secret live in a variable of this script only (no cookie, no
 * localStorage; reloading the page forgets them). Every request carries them as
 * `Authorization: Basic ...` together with `X-Requested-With: XMLHttpRequest`; with that
 * header the server's 401s carry no `WWW-Authenticate` challenge, so the browser never opens
 * its own password dialog. Signing in is a `GET /$jobs` that answers 200.
 *
 * The page is served under a strict CSP (no inline code, no eval). Server data, error messages
 * included, is untrusted: the DOM is built with createElement and textContent, never innerHTML.
 */
'use strict';

const POLL_MS = 1000;
const MAX_SAMPLES = 600;
const ROUTES = ['jobs', 'data', 'sql', 'views', 'health'];
const ACTIVE = new Set(['waiting', 'in-progress']);

const EXAMPLE_IMPORT = {
  id: 'my-import',
  inputFormat: 'application/fhir+ndjson',
  mode: 'bulk',
  inputs: [{ resourceType: 'Patient', url: 'file:///path/Patient.ndjson' }],
};
const EXAMPLE_VIEW = {
  resourceType: 'ViewDefinition',
  resource: 'Patient',
  status: 'active',
  select: [{
    column: [
      { name: 'id', path: 'getResourceKey()' },
      { name: 'family', path: 'name.first().family' },
    ],
  }],
};
const EXAMPLE_SQL = "select id, resource#>>'{name,0,family}' as family\nfrom patient\nlimit 10";

// The signed-in subject. `generation` changes at each sign-in and sign-out so that answers to
// an earlier session's requests are dropped instead of painted over the new session.
const session = { auth: null, who: '', generation: 0 };

// ---------------------------------------------------------------------------------------------
// DOM and formatting helpers

const byId = (id) => document.getElementById(id);

/** Creates an element; `text` sets textContent, `dataset` data-* attributes. */
function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'text') node.textContent = value == null ? '' : String(value);
    else if (key === 'className') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  node.append(...[].concat(children));
  return node;
}

/** Shows a message (or hides the element when `text` is empty). */
function showMessage(node, text, kind = 'error') {
  node.replaceChildren(text ? String(text) : '');
  node.hidden = !text;
  node.classList.toggle('error', kind === 'error');
  node.classList.toggle('ok', kind === 'ok');
}

const errorText = (error) => (error instanceof Error ? error.message : String(error));
const isSignedOut = (error) => Boolean(error) && error.name === 'SignedOut';
const fmt = (n) => Number(n || 0).toLocaleString();

function fmtBytes(n) {
  const value = Number(n || 0);
  const one = (x) => x.toLocaleString(undefined, { maximumFractionDigits: 1 });
  if (value < 1024) return `${fmt(value)} B`;
  if (value < 1024 ** 2) return `${one(value / 1024)} KB`;
  if (value < 1024 ** 3) return `${one(value / 1024 ** 2)} MB`;
  return `${one(value / 1024 ** 3)} GB`;
}

function fmtTime(iso) {
  const date = new Date(iso);
  return iso && !Number.isNaN(date.getTime()) ? date.toLocaleString() : '';
}

function positiveInt(text, fallback) {
  const n = Number.parseInt(text, 10);
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

/**
 * Wraps an async event handler so that its failures are shown in the page (element
 * `errorId`), never left as unhandled rejections in the console.
 */
function handler(errorId, action) {
  return (event) => {
    if (event) event.preventDefault();
    Promise.resolve()
      .then(() => action(event))
      .catch((error) => {
        if (!isSignedOut(error)) showMessage(byId(errorId), errorText(error));
      });
  };
}

// ---------------------------------------------------------------------------------------------
// HTTP

/** `Basic base64(id:secret)`, UTF-8 safe (btoa alone only takes Latin-1). */
function basicAuth(id, secret) {
  const bytes = new TextEncoder().encode(`${id}:${secret}`);
  let binary = '';
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return `Basic ${btoa(binary)}`;
}

/**
 * The server builds absolute URLs (statusUrl, manifest files) from the request's host, which
 * may not be the origin the browser sees; CSP only lets us talk to our own origin, so keep
 * the path and query and send them here.
 */
function sameOrigin(url) {
  const parsed = new URL(url, window.location.href);
  return parsed.origin === window.location.origin ? parsed.href : parsed.pathname + parsed.search;
}

class HttpError extends Error {
  constructor(status, message, issue = null) {
    super(message);
    this.name = 'HttpError';
    this.status = status;
    this.issue = issue;
  }
}

/** The message of an OperationOutcome's first issue, with its expression if any. */
function outcomeError(status, outcome) {
  const issue = (outcome && Array.isArray(outcome.issue) && outcome.issue[0]) || {};
  let message = issue.diagnostics || (issue.details && issue.details.text) || issue.code || '';
  const expression = [].concat(issue.expression || []).filter(Boolean);
  if (message && expression.length) message += ` (at ${expression.join(', ')})`;
  return new HttpError(status, message || `HTTP ${status}`, issue);
}

/** Turns a non-2xx response into an HttpError: the OperationOutcome's message, or the text. */
async function failure(response) {
  const text = await response.text().catch(() => '');
  try {
    const json = JSON.parse(text);
    if (json && Array.isArray(json.issue)) return outcomeError(response.status, json);
  } catch (_) {
    // Not JSON: shown as text below.
  }
  const body = text.trim().slice(0, 2000);
  const line = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ''}`;
  return new HttpError(response.status, body ? `${line}: ${body}` : line);
}

/**
 * fetch with the session's credentials. A network failure becomes an Error with a readable
 * message; an answer that arrives after a sign-out becomes a 'SignedOut' error, ignored.
 */
async function request(url, { method = 'GET', headers = {}, body, signal, auth } = {}) {
  const generation = session.generation;
  const all = { 'X-Requested-With': 'XMLHttpRequest', ...headers };
  const credentials = auth || session.auth;
  if (credentials) all.Authorization = credentials;
  let response;
  try {
    // no-store: the page sends its own If-None-Match and wants to see the 304.
    response = await fetch(sameOrigin(url), { method, headers: all, body, signal, cache: 'no-store' });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new Error(`Network error: the server could not be reached (${errorText(error)})`);
  }
  if (generation !== session.generation) {
    const stale = new Error('signed out');
    stale.name = 'SignedOut';
    throw stale;
  }
  return response;
}

async function checked(response) {
  if (!response.ok) throw await failure(response);
  return response;
}

async function fetchJson(url, headers = {}) {
  const response = await checked(await request(url, { headers: { Accept: 'application/json', ...headers } }));
  return response.json();
}

/** Saves a Blob through a temporary `<a download>`: the browser's own download. */
function saveBlob(blob, name) {
  const href = URL.createObjectURL(blob);
  const link = el('a', { href, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  // Revoking at once can cancel the download in some browsers.
  setTimeout(() => URL.revokeObjectURL(href), 60000);
}

async function download(url, name, options) {
  const response = await checked(await request(url, options));
  saveBlob(await response.blob(), name);
}

function fileName(url) {
  const last = new URL(url, window.location.href).pathname.split('/').pop() || 'download.ndjson';
  try {
    return decodeURIComponent(last);
  } catch (_) {
    return last;
  }
}

// ---------------------------------------------------------------------------------------------
// Sign-in, sign-out, routing

async function signIn() {
  const id = byId('client-id').value.trim();
  const auth = basicAuth(id, byId('secret').value);
  const button = byId('signin-button');
  showMessage(byId('signin-error'), '');
  button.disabled = true;
  try {
    await checked(await request('/$jobs', { headers: { Accept: 'application/json' }, auth }));
    session.auth = auth;
    session.who = id === 'root' ? 'root' : `Client/${id}`;
    session.generation += 1;
    byId('secret').value = '';
    byId('whoami').textContent = session.who;
    byId('signin').hidden = true;
    byId('app').hidden = false;
    route();
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  session.auth = null;
  session.who = '';
  session.generation += 1;
  stopPolling();
  if (sqlState.controller) sqlState.controller.abort();
  sqlState.controller = null; // its run sees it was superseded and shows nothing
  resetJobs();
  resetPages();
  byId('app').hidden = true;
  byId('signin').hidden = false;
  byId('client-id').focus();
}

/** Clears what the previous subject saw, so the next one starts from a blank page. */
function resetPages() {
  for (const id of ['counts', 'recent', 'health-checks', 'sql-results', 'view-results', 'limits']) {
    byId(id).replaceChildren();
  }
  for (const id of ['resource-json', 'view-sql', 'sql-status', 'recent-type', 'health-status', 'whoami']) {
    byId(id).textContent = '';
  }
  for (const id of ['signin-error', 'start-message', 'jobs-error', 'data-error', 'sql-error', 'view-error', 'health-error']) {
    showMessage(byId(id), '');
  }
  byId('open-ref').value = '';
  Object.assign(dataState, { type: null, view: 'fhir' });
  updateViewToggles();
}

function currentRoute() {
  const name = window.location.hash.replace(/^#\/?/, '');
  return ROUTES.includes(name) ? name : null;
}

const PAGE_ENTER = {
  jobs: () => { startPolling(); redrawCharts(); },
  data: handler('data-error', loadCounts),
  health: handler('health-error', loadHealth),
};

function route() {
  if (!session.auth) return;
  let name = currentRoute();
  if (!name) {
    name = 'jobs';
    // replaceState fires no hashchange: we go on routing here.
    window.history.replaceState(null, '', '#/jobs');
  }
  for (const page of ROUTES) {
    byId(`page-${page}`).hidden = page !== name;
    const link = byId(`nav-${page}`);
    if (page === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (name !== 'jobs') stopPolling();
  if (PAGE_ENTER[name]) PAGE_ENTER[name]();
}

// ---------------------------------------------------------------------------------------------
// Jobs: polling

const jobsState = { etag: null, records: new Map(), timer: null, inFlight: false, again: false };

const pollingWanted = () => Boolean(session.auth) && !document.hidden && currentRoute() === 'jobs';

function startPolling() {
  if (!jobsState.timer && !jobsState.inFlight) pollJobs();
}

function stopPolling() {
  clearTimeout(jobsState.timer);
  jobsState.timer = null;
}

/** Polls now (after a start or a cancel); if a poll is running, right after it. */
function refreshNow() {
  stopPolling();
  pollJobs();
}

/** One poll at a time: the next is scheduled only once this one has finished. */
async function pollJobs() {
  jobsState.timer = null;
  if (jobsState.inFlight) {
    jobsState.again = true;
    return;
  }
  if (!pollingWanted()) return;
  jobsState.inFlight = true;
  try {
    await refreshJobs();
  } catch (error) {
    if (!isSignedOut(error)) showMessage(byId('jobs-error'), errorText(error));
  } finally {
    jobsState.inFlight = false;
    const delay = jobsState.again ? 0 : POLL_MS;
    jobsState.again = false;
    if (pollingWanted() && !jobsState.timer) jobsState.timer = setTimeout(pollJobs, delay);
  }
}

async function refreshJobs() {
  const headers = { Accept: 'application/json' };
  if (jobsState.etag) headers['If-None-Match'] = jobsState.etag;
  const response = await request('/$jobs', { headers });
  if (response.status !== 304) {
    await checked(response);
    const body = await response.json();
    jobsState.etag = response.headers.get('ETag');
    renderJobs(Array.isArray(body.jobs) ? body.jobs : []);
  } else {
    // 304: the list on screen is current; only a manifest that was not ready is asked again.
    for (const record of jobsState.records.values()) maybeLoadDetails(record);
  }
  showMessage(byId('jobs-error'), '');
}

function resetJobs() {
  jobsState.etag = null;
  jobsState.records.clear();
  byId('jobs-list').replaceChildren();
  byId('jobs-empty').hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Jobs: rendering. Each job's element is made once and updated in place, so that its canvas
// and its samples survive the polls.

function renderJobs(jobs) {
  const list = byId('jobs-list');
  const now = Date.now();
  const seen = new Set();
  let cursor = list.firstElementChild;
  for (const job of jobs) {
    const key = `${job.kind}/${job.id}`;
    seen.add(key);
    let record = jobsState.records.get(key);
    if (!record) {
      record = createJobRecord(job);
      jobsState.records.set(key, record);
    }
    updateJob(record, job, now);
    // The server's order (newest first), moving nodes only when it changed: a moved node
    // loses focus and selection.
    if (record.root === cursor) cursor = cursor.nextElementSibling;
    else list.insertBefore(record.root, cursor);
  }
  for (const [key, record] of jobsState.records) {
    if (!seen.has(key)) {
      record.root.remove();
      jobsState.records.delete(key);
    }
  }
  byId('jobs-empty').hidden = jobs.length > 0;
}

function createJobRecord(job) {
  const parts = {
    status: el('span', { className: 'job-status badge' }),
    started: el('span', { className: 'job-started' }),
    cancel: el('button', { className: 'job-cancel', type: 'button', text: 'Cancel' }),
    fill: el('div', { className: 'job-bar-fill' }),
    progress: el('span', { className: 'job-progress' }),
    throughput: el('span', { className: 'job-throughput' }),
    chart: el('canvas', { className: 'job-chart' }),
    files: el('div', { className: 'job-files' }),
    errors: el('div', { className: 'job-errors' }),
    message: el('p', { className: 'message error', hidden: '' }),
  };
  parts.bar = el('div', { className: 'job-bar', dataset: { percent: '0' } }, parts.fill);
  parts.head = el('div', { className: 'job-head' }, [
    el('span', { className: 'kind', text: job.kind }),
    el('strong', { className: 'job-id', text: job.id }),
    parts.status,
    el('span', { className: 'muted', text: 'started' }),
    parts.started,
    el('span', { className: 'spacer' }),
  ]);
  const root = el('article', { className: 'job', dataset: { jobId: job.id, kind: job.kind } }, [
    parts.head,
    parts.bar,
    el('div', { className: 'job-numbers' }, [parts.progress, parts.throughput]),
    parts.chart,
    parts.files,
    parts.errors,
    parts.message,
  ]);
  const record = {
    root, parts, job, samples: [], progressKey: '', details: 'none',
    files: [], errorFiles: [], detailErrors: [], shownErrors: null,
  };
  parts.cancel.addEventListener('click', () => cancelJob(record));
  return record;
}

function updateJob(record, job, now) {
  const { parts, root } = record;
  record.job = job;
  const done = (job.resources && job.resources.done) || 0;
  const progressKey = [job.status, done, job.bytes && job.bytes.done].join('|');
  if (progressKey !== record.progressKey) {
    record.progressKey = progressKey;
    root.dataset.updatedAt = String(now); // the tests measure update intervals from it
    addSample(record, now, done);
  }
  parts.status.textContent = job.status;
  parts.status.dataset.status = job.status;
  parts.started.textContent = fmtTime(job.startedAt) || '—';
  setBar(parts, jobPercent(job), ACTIVE.has(job.status));
  parts.progress.textContent = progressText(job);
  const points = rates(record.samples);
  parts.throughput.textContent = throughputText(job, points);
  if (!ACTIVE.has(job.status)) parts.cancel.remove();
  else if (!parts.cancel.isConnected) parts.head.append(parts.cancel);
  drawChart(parts.chart, points);
  renderJobErrors(record);
  maybeLoadDetails(record);
}

/** Percent done, or null when unknown (no total yet). */
function jobPercent(job) {
  if (job.status === 'completed') return 100;
  const measure = job.kind === 'import' ? job.bytes : job.resources;
  if (!measure || !measure.total) return null;
  return Math.min(100, Math.max(0, Math.floor((100 * (measure.done || 0)) / measure.total)));
}

function setBar(parts, percent, active) {
  const value = percent == null ? 0 : percent;
  parts.bar.dataset.percent = String(value);
  parts.fill.style.width = `${value}%`;
  parts.bar.classList.toggle('indeterminate', percent == null && active);
}

function progressText(job) {
  const resources = job.resources || {};
  const bytes = job.bytes || {};
  const texts = [resources.total != null
    ? `${fmt(resources.done)} of ${fmt(resources.total)} resources`
    : `${fmt(resources.done)} resources`];
  if (bytes.total != null) texts.push(`${fmtBytes(bytes.done)} of ${fmtBytes(bytes.total)}`);
  else if (bytes.done != null) texts.push(fmtBytes(bytes.done));
  return texts.join(' · ');
}

// ---------------------------------------------------------------------------------------------
// Jobs: throughput, from the samples this page has seen (one per change of the count)

function addSample(record, t, resources) {
  const samples = record.samples;
  const last = samples[samples.length - 1];
  if (last && last.resources === resources) return; // a status change alone is no new sample
  samples.push({ t, resources });
  if (samples.length > MAX_SAMPLES) samples.shift();
}

/** Resources per second between successive samples. */
function rates(samples) {
  const points = [];
  for (let i = 1; i < samples.length; i += 1) {
    const seconds = (samples[i].t - samples[i - 1].t) / 1000;
    if (seconds > 0) {
      const rate = (samples[i].resources - samples[i - 1].resources) / seconds;
      points.push({ t: samples[i].t, rate: Math.max(0, rate) });
    }
  }
  return points;
}

function throughputText(job, points) {
  if (ACTIVE.has(job.status)) {
    const last = points[points.length - 1];
    return last ? `${fmt(Math.round(last.rate))} resources/s` : '— resources/s';
  }
  // Ended: the average over the job's life, from the server's own times.
  const seconds = (Date.parse(job.finishedAt) - Date.parse(job.startedAt)) / 1000;
  if (!(seconds > 0)) return '';
  const done = (job.resources && job.resources.done) || 0;
  return `${fmt(Math.round(done / seconds))} resources/s on average`;
}

/** A line of resources/s over time on the canvas, sized for the screen's pixel ratio. */
function drawChart(canvas, points) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return; // not displayed (another page): drawn when shown
  const ratio = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#6b7280';
  if (points.length < 2) {
    ctx.fillText('resources/s: not enough samples yet', 6, height / 2 + 4);
    return;
  }
  const t0 = points[0].t;
  const span = Math.max(1, points[points.length - 1].t - t0);
  const max = Math.max(1, ...points.map((p) => p.rate));
  const top = 16;
  const bottom = height - 2;
  const x = (t) => 2 + ((t - t0) / span) * (width - 4);
  const y = (rate) => bottom - (rate / max) * (bottom - top);
  ctx.fillText(`peak ${fmt(Math.round(max))} resources/s`, 6, 11);
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.rate)) : ctx.moveTo(x(p.t), y(p.rate))));
  ctx.strokeStyle = '#2563eb';
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineTo(x(points[points.length - 1].t), bottom);
  ctx.lineTo(x(t0), bottom);
  ctx.closePath();
  ctx.fillStyle = 'rgba(37, 99, 235, 0.12)';
  ctx.fill();
}

function redrawCharts() {
  for (const record of jobsState.records.values()) {
    drawChart(record.parts.chart, rates(record.samples));
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs: errors, files and details of ended jobs

/** Error lines: the tasks' errors from /$jobs, then those of the job's own status. */
function renderJobErrors(record) {
  const taskLines = (record.job.tasks || [])
    .filter((task) => task && task.error)
    .map((task) => `${task.type || 'task'}: ${typeof task.error === 'string' ? task.error : JSON.stringify(task.error)}`);
  const lines = [...new Set([...taskLines, ...record.detailErrors])];
  const key = JSON.stringify([lines, record.errorFiles]);
  if (key === record.shownErrors) return; // unchanged: leave the DOM (and any selection) alone
  record.shownErrors = key;
  const box = record.parts.errors;
  box.replaceChildren(...lines.map((line) => el('div', { className: 'job-error', text: line })));
  for (const file of record.errorFiles) {
    box.append(el('div', {}, fileLink(record, file, 'job-error-file')));
  }
  box.hidden = !box.childElementCount;
}

function renderJobFiles(record) {
  const links = record.files.map((file) => el('span', { className: 'file' }, [
    fileLink(record, file, 'job-file'),
    el('span', { className: 'muted', text: file.count != null ? ` ${fmt(file.count)}` : '' }),
  ]));
  record.parts.files.replaceChildren(...links);
}

/** A link that downloads a manifest file with the credentials (a plain link would have none). */
function fileLink(record, file, className) {
  const url = String(file.url || '');
  const link = el('a', {
    className, href: url, dataset: { url },
    text: `${file.type || 'file'} · ${fileName(url)}`,
  });
  link.addEventListener('click', (event) => {
    event.preventDefault();
    showMessage(record.parts.message, '');
    download(url, fileName(url), { headers: { Accept: 'application/fhir+ndjson' } }).catch((error) => {
      if (!isSignedOut(error)) showMessage(record.parts.message, `Download failed: ${errorText(error)}`);
    });
  });
  return link;
}

/** Once a job has ended, its status URL tells what it produced (export) or what failed. */
function maybeLoadDetails(record) {
  const { job } = record;
  if (record.details !== 'none' || !job.statusUrl) return;
  if (job.status !== 'completed' && job.status !== 'failed') return;
  record.details = 'loading';
  const load = job.kind === 'export' ? loadManifest : loadImportStatus;
  load(record)
    .then((ready) => { record.details = ready === false ? 'none' : 'done'; })
    .catch((error) => {
      record.details = 'done';
      if (!isSignedOut(error)) record.detailErrors = [errorText(error)];
    })
    .finally(() => {
      renderJobFiles(record);
      renderJobErrors(record);
    });
}

/** An export's manifest, following `next` links of a paged manifest. */
async function loadManifest(record) {
  const files = [];
  const errorFiles = [];
  let url = record.job.statusUrl;
  for (let page = 0; url && page < 100; page += 1) {
    const response = await checked(await request(url, { headers: { Accept: 'application/json' } }));
    // 202: still finishing on the server's side; try again at the next poll.
    if (response.status === 202) return false;
    const manifest = await response.json();
    files.push(...(manifest.output || []));
    errorFiles.push(...(manifest.error || []));
    const next = (manifest.link || []).find((link) => link && link.relation === 'next');
    url = next ? next.url : null;
  }
  record.files = files;
  record.errorFiles = errorFiles;
  return true;
}

async function loadImportStatus(record) {
  const status = await fetchJson(record.job.statusUrl);
  record.detailErrors = collectErrors(status, []);
  return true;
}

const ERROR_KEYS = new Set(['error', 'errors', 'outcome', 'issue']);

/**
 * The error texts anywhere in an import's status (its exact shape is not fixed): the values of
 * error/errors/outcome/issue keys, labelled with the resourceType of the object holding them.
 */
function collectErrors(value, lines, label = '') {
  if (Array.isArray(value)) {
    value.forEach((item) => collectErrors(item, lines, label));
  } else if (value && typeof value === 'object') {
    const type = value.resourceType;
    const here = type && type !== 'BulkImportStatus' && type !== 'OperationOutcome' ? type : label;
    for (const [key, item] of Object.entries(value)) {
      if (ERROR_KEYS.has(key)) {
        errorTexts(item).forEach((text) => lines.push(here ? `${here}: ${text}` : text));
      } else if (item && typeof item === 'object') {
        collectErrors(item, lines, here);
      }
    }
  }
  return lines;
}

function errorTexts(value) {
  if (value == null || value === false) return [];
  if (typeof value === 'string') return value ? [value] : [];
  if (Array.isArray(value)) return value.flatMap(errorTexts);
  if (typeof value === 'object') {
    if (Array.isArray(value.issue)) return errorTexts(value.issue);
    const text = value.diagnostics || value.message || (value.details && value.details.text);
    return [typeof text === 'string' ? text : JSON.stringify(value)];
  }
  return [String(value)];
}

async function cancelJob(record) {
  const button = record.parts.cancel;
  button.disabled = true;
  try {
    await checked(await request(record.job.statusUrl, { method: 'DELETE', headers: { Accept: 'application/json' } }));
    showMessage(record.parts.message, '');
  } catch (error) {
    if (!isSignedOut(error)) showMessage(record.parts.message, `Cancel failed: ${errorText(error)}`);
  } finally {
    button.disabled = false;
    refreshNow();
  }
}

// ---------------------------------------------------------------------------------------------
// Jobs: starting one

async function startImport() {
  const message = byId('start-message');
  showMessage(message, '');
  const text = byId('import-body').value;
  try {
    JSON.parse(text);
  } catch (error) {
    throw new Error(`The import body is not valid JSON: ${error.message}`);
  }
  const response = await checked(await request('/fhir/$import', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
    body: text,
  }));
  const status = await response.json().catch(() => ({}));
  showMessage(message, `Import ${status.id || ''} started (${status.status || response.status}).`, 'ok');
  refreshNow();
}

async function startExport() {
  const message = byId('start-message');
  showMessage(message, '');
  const types = byId('export-types').value.split(',').map((t) => t.trim()).filter(Boolean);
  const query = types.length ? `?_type=${types.map(encodeURIComponent).join(',')}` : '';
  const response = await checked(await request(`/fhir/$export${query}`, {
    headers: { Prefer: 'respond-async', Accept: 'application/fhir+json' },
  }));
  const outcome = await response.json().catch(() => null);
  const notes = ((outcome && outcome.issue) || []).map((issue) => issue.diagnostics).filter(Boolean);
  showMessage(message, notes.length ? notes.join(' · ') : 'Export started.', 'ok');
  refreshNow();
}

// ---------------------------------------------------------------------------------------------
// Data page: counts, last changes, one resource

const dataState = { type: null, view: 'fhir', token: 0 };

async function loadCounts() {
  showMessage(byId('data-error'), '');
  const body = await fetchJson('/$counts');
  const rows = (body.counts || [])
    .filter((row) => row && row.count > 0)
    .sort((a, b) => b.count - a.count);
  const max = rows.length ? rows[0].count : 1;
  const chart = byId('counts');
  chart.replaceChildren(...rows.map((row) => countRow(row, max)));
  if (!rows.length) chart.append(el('p', { className: 'muted', text: 'No resources yet.' }));
  markSelectedType();
}

function countRow({ type, count }, max) {
  const fill = el('div', { className: 'count-fill' });
  fill.style.width = `${Math.max(0.5, (100 * count) / max)}%`;
  const row = el('div', {
    className: 'count-row', role: 'button', tabindex: '0',
    dataset: { type, count: String(count) },
  }, [
    el('span', { className: 'count-type', text: type }),
    el('div', { className: 'count-bar' }, fill),
    el('span', { className: 'count-value', text: fmt(count) }),
  ]);
  const select = handler('data-error', () => selectType(type));
  row.addEventListener('click', select);
  row.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') select(event);
  });
  return row;
}

function markSelectedType() {
  for (const row of byId('counts').querySelectorAll('.count-row')) {
    row.classList.toggle('selected', row.dataset.type === dataState.type);
  }
}

async function selectType(type) {
  dataState.type = type;
  markSelectedType();
  byId('recent-type').textContent = type;
  showMessage(byId('data-error'), '');
  const bundle = await fetchJson(`/${encodeURIComponent(type)}?_sort=-_lastUpdated&_count=20`);
  if (dataState.type !== type) return; // another type was chosen meanwhile
  const resources = (bundle.entry || []).map((entry) => entry && entry.resource).filter(Boolean);
  const list = byId('recent');
  list.replaceChildren(...resources.map((resource) => recentItem(type, resource)));
  if (!resources.length) list.append(el('li', { className: 'muted', text: 'No resources.' }));
}

function recentItem(type, resource) {
  const id = String(resource.id);
  const item = el('li', { className: 'recent-item', role: 'button', tabindex: '0', dataset: { id } }, [
    el('span', { className: 'recent-id', text: id }),
    el('span', { className: 'muted', text: (resource.meta && resource.meta.lastUpdated) || '' }),
  ]);
  const open = handler('data-error', () => openResource({ type, id }, 'fhir'));
  item.addEventListener('click', open);
  item.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') open(event);
  });
  return item;
}

function parseRef(text) {
  const match = /^\s*([^/\s]+)\/([^/\s]+)\s*$/.exec(text);
  if (!match) throw new Error('Enter a reference as Type/id, for example Patient/pt-1.');
  return { type: match[1], id: match[2] };
}

/** Shows a resource as FHIR, as native JSON, or its history, in `pre#resource-json`. */
async function openResource(ref, view) {
  dataState.view = view;
  const token = ++dataState.token;
  byId('open-ref').value = `${ref.type}/${ref.id}`;
  updateViewToggles();
  showMessage(byId('data-error'), '');
  const pre = byId('resource-json');
  pre.textContent = 'Loading…';
  const path = `/${encodeURIComponent(ref.type)}/${encodeURIComponent(ref.id)}`;
  const url = view === 'native' ? path : `/fhir${path}${view === 'history' ? '/_history' : ''}`;
  const accept = view === 'native' ? 'application/json' : 'application/fhir+json';
  try {
    const json = await fetchJson(url, { Accept: accept });
    if (token === dataState.token) pre.textContent = JSON.stringify(json, null, 2);
  } catch (error) {
    if (token === dataState.token) pre.textContent = '';
    throw error;
  }
}

function openFromInput(view) {
  return handler('data-error', () => openResource(parseRef(byId('open-ref').value), view));
}

function updateViewToggles() {
  const pressed = { 'as-fhir': 'fhir', 'as-native': 'native', 'open-history': 'history' };
  for (const [id, view] of Object.entries(pressed)) {
    byId(id).setAttribute('aria-pressed', String(dataState.view === view));
  }
}

// ---------------------------------------------------------------------------------------------
// SQL page

const sqlState = { controller: null };

async function runSql() {
  const query = byId('sql-editor').value;
  const limit = positiveInt(byId('sql-limit').value, 100);
  const table = byId('sql-results');
  const status = byId('sql-status');
  showMessage(byId('sql-error'), '');
  table.replaceChildren();
  status.textContent = 'Running…';
  if (sqlState.controller) sqlState.controller.abort(); // a new run replaces the last
  const controller = new AbortController();
  sqlState.controller = controller;
  try {
    const response = await checked(await request('/$dump-sql?_format=ndjson', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ query }),
      signal: controller.signal,
    }));
    const result = await readNdjson(response, limit, controller);
    renderTable(table, result.rows);
    const n = fmt(result.rows.length);
    status.textContent = result.truncated ? `first ${n} rows (limit)` : `${n} row${result.rows.length === 1 ? '' : 's'}`;
    if (result.outcome) showSqlError(outcomeError(200, result.outcome), query);
  } catch (error) {
    if (controller !== sqlState.controller || isSignedOut(error)) return; // superseded
    status.textContent = '';
    showSqlError(error, query);
  } finally {
    if (controller === sqlState.controller) sqlState.controller = null;
  }
}

/**
 * Reads NDJSON rows from a streamed body: up to `limit` rows (one more tells that there are
 * more), or up to an OperationOutcome line (an error after the first row). Stops the transfer
 * (abort) once it has what it needs.
 */
async function readNdjson(response, limit, controller) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const result = { rows: [], truncated: false, outcome: null };
  let buffer = '';
  let finished = false;
  const take = (line) => {
    if (!line.trim()) return true;
    const value = JSON.parse(line);
    if (value && value.resourceType === 'OperationOutcome') result.outcome = value;
    else if (result.rows.length >= limit) result.truncated = true;
    else result.rows.push(value);
    return !result.outcome && !result.truncated;
  };
  try {
    reading: for (;;) {
      const { done, value } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(0), { stream: !done });
      const lines = buffer.split('\n');
      buffer = done ? '' : lines.pop();
      for (const line of lines) {
        if (!take(line)) break reading;
      }
      if (done) {
        finished = true;
        break;
      }
    }
  } catch (error) {
    if (!(error instanceof TypeError)) throw error; // an abort, or a line that is not JSON
    throw new Error(`The result stopped after ${fmt(result.rows.length)} rows: ${errorText(error)}`);
  } finally {
    if (!finished) controller.abort();
  }
  return result;
}

/** The error, and when it names a position in the query, that line with a caret under it. */
function showSqlError(error, query) {
  const box = byId('sql-error');
  showMessage(box, errorText(error));
  const position = errorPosition(error);
  if (position) box.append(caretView(query, position));
}

function errorPosition(error) {
  const issue = error.issue || {};
  const texts = [issue.diagnostics, ...[].concat(issue.location || []), ...[].concat(issue.expression || [])];
  for (const text of texts) {
    const match = typeof text === 'string' && /(?:position|character)\s+(\d+)/i.exec(text);
    if (match) return Number(match[1]);
  }
  return null;
}

/** PostgreSQL counts positions in characters from 1 over the whole query. */
function caretView(query, position) {
  const chars = Array.from(query);
  const index = Math.max(0, Math.min(position, chars.length) - 1);
  let start = index;
  while (start > 0 && chars[start - 1] !== '\n') start -= 1;
  let end = index;
  while (end < chars.length && chars[end] !== '\n') end += 1;
  const lineNumber = chars.slice(0, start).filter((c) => c === '\n').length + 1;
  // Tabs stay tabs so that the caret lines up under them.
  const pad = chars.slice(start, index).map((c) => (c === '\t' ? '\t' : ' ')).join('');
  const line = chars.slice(start, end).join('');
  return el('pre', { className: 'caret', text: `line ${lineNumber}:\n${line}\n${pad}^` });
}

async function downloadSql(format) {
  const query = byId('sql-editor').value;
  const params = format === 'tsv' ? '_format=tsv&_header=true' : '_format=ndjson';
  showMessage(byId('sql-error'), '');
  try {
    await download(`/$dump-sql?${params}`, `query.${format}`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ query }),
    });
  } catch (error) {
    if (!isSignedOut(error)) showSqlError(error, query);
  }
}

/** A table with a head from the first row's keys; objects and arrays shown as JSON. */
function renderTable(table, rows) {
  const objects = rows.map((row) => (row && typeof row === 'object' && !Array.isArray(row) ? row : { value: row }));
  if (!objects.length) {
    table.replaceChildren();
    return;
  }
  const columns = Object.keys(objects[0]);
  const head = el('thead', {}, el('tr', {}, columns.map((name) => el('th', { text: name }))));
  const body = el('tbody', {}, objects.map((row) => el('tr', {}, columns.map((name) => tableCell(row[name])))));
  table.replaceChildren(head, body);
}

function tableCell(value) {
  if (value == null) return el('td', { className: 'null', text: 'null' });
  const text = typeof value === 'object' ? JSON.stringify(value) : String(value);
  return el('td', { className: typeof value === 'number' ? 'number' : '', text });
}

// ---------------------------------------------------------------------------------------------
// Views page

async function previewView() {
  const errorBox = byId('view-error');
  showMessage(errorBox, '');
  let view;
  try {
    view = JSON.parse(byId('view-editor').value);
  } catch (error) {
    showMessage(errorBox, `The ViewDefinition is not valid JSON: ${error.message}`);
    return;
  }
  const limit = positiveInt(byId('view-limit').value, 20);
  const body = JSON.stringify({ resourceType: 'Parameters', parameter: [{ name: 'viewResource', resource: view }] });
  const run = async (query) => checked(await request(`/fhir/ViewDefinition/$viewdefinition-run?${query}`, {
    method: 'POST', headers: { 'Content-Type': 'application/fhir+json' }, body,
  }));
  const [rows, sql] = await Promise.allSettled([
    run(`_format=json&_limit=${limit}`).then((response) => response.json()),
    run('_format=sql').then((response) => response.text()),
  ]);
  renderTable(byId('view-results'), rows.status === 'fulfilled' && Array.isArray(rows.value) ? rows.value : []);
  byId('view-sql').textContent = sql.status === 'fulfilled' ? sql.value : '';
  const errors = [rows, sql].filter((r) => r.status === 'rejected' && !isSignedOut(r.reason));
  showMessage(errorBox, [...new Set(errors.map((r) => errorText(r.reason)))].join('\n'));
}

// ---------------------------------------------------------------------------------------------
// Health page

async function loadHealth() {
  showMessage(byId('health-error'), '');
  const [health, status] = await Promise.allSettled([fetchJson('/health'), fetchJson('/$status')]);
  const line = byId('health-status');
  const healthy = health.status === 'fulfilled';
  line.textContent = healthy ? `Server: ${health.value.status || 'ok'}` : `Server: ${errorText(health.reason)}`;
  line.classList.toggle('bad', !healthy);
  if (status.status === 'fulfilled') {
    renderStatus(status.value || {});
  } else {
    byId('health-checks').replaceChildren();
    byId('limits').replaceChildren();
    if (!isSignedOut(status.reason)) showMessage(byId('health-error'), errorText(status.reason));
  }
}

function renderStatus(status) {
  const checks = [];
  if (status.database) checks.push(checkItem('database', 'Database', status.database.up, status.database.detail));
  (status.replicas || []).forEach((replica, i) => {
    checks.push(checkItem(`replica-${i + 1}`, replica.name || `replica ${i + 1}`, replica.up, replica.detail));
  });
  if (status.storage) {
    const { kind, location } = status.storage;
    checks.push(checkItem('storage', 'Storage', status.storage.up !== false, [kind, location].filter(Boolean).join(': ')));
  }
  byId('health-checks').replaceChildren(...checks);
  const limits = Object.entries(status.limits || {});
  byId('limits').replaceChildren(
    el('thead', {}, el('tr', {}, [el('th', { text: 'Flag' }), el('th', { text: 'Value' })])),
    el('tbody', {}, limits.map(([flag, value]) => el('tr', {}, [
      el('td', {}, el('code', { text: flag })),
      el('td', { text: typeof value === 'object' && value !== null ? JSON.stringify(value) : String(value) }),
    ]))),
  );
}

function checkItem(id, label, up, detail) {
  const ok = up === true;
  return el('div', { className: 'check', dataset: { check: id, ok: String(ok) } }, [
    el('span', { className: 'dot' }),
    el('strong', { text: label }),
    el('span', { className: 'check-state', text: ok ? 'up' : 'down' }),
    el('span', { className: 'muted', text: detail || '' }),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Start-up

function init() {
  byId('import-body').value = JSON.stringify(EXAMPLE_IMPORT, null, 2);
  byId('view-editor').value = JSON.stringify(EXAMPLE_VIEW, null, 2);
  byId('sql-editor').value = EXAMPLE_SQL;

  byId('signin').addEventListener('submit', handler('signin-error', signIn));
  byId('signout').addEventListener('click', signOut);
  byId('import-start').addEventListener('click', handler('start-message', startImport));
  byId('export-start').addEventListener('click', handler('start-message', startExport));

  byId('open-button').addEventListener('click', () => openFromInput(dataState.view === 'native' ? 'native' : 'fhir')());
  byId('open-ref').addEventListener('keydown', (event) => {
    if (event.key === 'Enter') openFromInput(dataState.view === 'native' ? 'native' : 'fhir')(event);
  });
  byId('as-fhir').addEventListener('click', openFromInput('fhir'));
  byId('as-native').addEventListener('click', openFromInput('native'));
  byId('open-history').addEventListener('click', openFromInput('history'));

  byId('sql-run').addEventListener('click', handler('sql-error', runSql));
  byId('sql-download-tsv').addEventListener('click', () => downloadSql('tsv'));
  byId('sql-download-ndjson').addEventListener('click', () => downloadSql('ndjson'));
  byId('view-preview').addEventListener('click', handler('view-error', previewView));

  window.addEventListener('hashchange', route);
  window.addEventListener('resize', redrawCharts);
  // Polling pauses while the tab is hidden (pollingWanted) and resumes when it shows again.
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && currentRoute() === 'jobs' && session.auth) startPolling();
  });
  byId('client-id').focus();
}

init();
