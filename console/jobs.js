/*
 * fhirbox console: the jobs page. It polls `GET /$jobs` every second while shown (one poll at
 * a time, with `If-None-Match` of the last ETag; a 304 keeps what is on screen) and keeps one
 * element per job, made once and updated in place so that its canvas and its samples survive
 * the polls. It also cancels a running job (`DELETE` on its status URL) and starts imports
 * (`POST /fhir/$import`) and exports (`GET /fhir/$export`). Progress and throughput are drawn
 * by job-progress.js, errors and files by job-details.js.
 */

import { request, checked } from '/console/api.js';
import { byId, el, showMessage, errorText, isSignedOut, fmtTime, handler } from '/console/dom.js';
import {
  ACTIVE, jobPercent, setBar, progressText, addSample, rates, throughputText, drawChart,
} from '/console/job-progress.js';
import { renderJobErrors, maybeLoadDetails } from '/console/job-details.js';
import { signedIn, currentRoute } from '/console/session.js';

const POLL_MS = 1000;

const EXAMPLE_IMPORT = {
  id: 'my-import',
  inputFormat: 'application/fhir+ndjson',
  mode: 'bulk',
  inputs: [{ resourceType: 'Patient', url: 'file:///path/Patient.ndjson' }],
};

const jobsState = { etag: null, records: new Map(), timer: null, inFlight: false, again: false };

const pollingWanted = () => signedIn() && !document.hidden && currentRoute() === 'jobs';

export function startPolling() {
  if (!jobsState.timer && !jobsState.inFlight) pollJobs();
}

export function stopPolling() {
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

export function resetJobs() {
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


export function redrawCharts() {
  for (const record of jobsState.records.values()) {
    drawChart(record.parts.chart, rates(record.samples));
  }
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

/** Fills the import example in and wires the start buttons. */
export function initJobs() {
  byId('import-body').value = JSON.stringify(EXAMPLE_IMPORT, null, 2);
  byId('import-start').addEventListener('click', handler('start-message', startImport));
  byId('export-start').addEventListener('click', handler('start-message', startExport));
}
