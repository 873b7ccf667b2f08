/*
 * fhirbox console: what a job's list entry shows beyond its progress: its error lines (the
 * tasks' errors from /$jobs, then those found in the job's own status) and, once it has ended,
 * the details from its status URL, loaded once: an export's manifest (its files, as links that
 * download with the credentials) or an import's status (its error texts, of whatever shape).
 */

import { download, fetchJson, request, checked, fileName } from '/console/api.js';
import { el, showMessage, errorText, isSignedOut, fmt } from '/console/dom.js';

/** Error lines: the tasks' errors from /$jobs, then those of the job's own status. */
export function renderJobErrors(record) {
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
export function maybeLoadDetails(record) {
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
