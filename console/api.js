/*
 * fhirbox console: HTTP. Every request goes through `request`, which adds the session's
 * credentials (`Authorization: Basic ...`) and `X-Requested-With: XMLHttpRequest` (so the
 * server's 401s carry no challenge and the browser never opens its own password dialog),
 * keeps requests on our own origin, and drops answers that arrive after a sign-out. Non-2xx
 * answers become HttpErrors carrying the OperationOutcome's message (or the body's text), and
 * downloads are saved through a Blob and a temporary `<a download>`.
 */

import { el, errorText } from '/console/dom.js';
import { authorization, generation } from '/console/session.js';

/** `Basic base64(id:secret)`, UTF-8 safe (btoa alone only takes Latin-1). */
export function basicAuth(id, secret) {
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
export function outcomeError(status, outcome) {
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
export async function request(url, { method = 'GET', headers = {}, body, signal, auth } = {}) {
  const started = generation();
  const all = { 'X-Requested-With': 'XMLHttpRequest', ...headers };
  const credentials = auth || authorization();
  if (credentials) all.Authorization = credentials;
  let response;
  try {
    // no-store: the page sends its own If-None-Match and wants to see the 304.
    response = await fetch(sameOrigin(url), { method, headers: all, body, signal, cache: 'no-store' });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new Error(`Network error: the server could not be reached (${errorText(error)})`);
  }
  if (started !== generation()) {
    const stale = new Error('signed out');
    stale.name = 'SignedOut';
    throw stale;
  }
  return response;
}

export async function checked(response) {
  if (!response.ok) throw await failure(response);
  return response;
}

export async function fetchJson(url, headers = {}) {
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

export async function download(url, name, options) {
  const response = await checked(await request(url, options));
  saveBlob(await response.blob(), name);
}

export function fileName(url) {
  const last = new URL(url, window.location.href).pathname.split('/').pop() || 'download.ndjson';
  try {
    return decodeURIComponent(last);
  } catch (_) {
    return last;
  }
}
