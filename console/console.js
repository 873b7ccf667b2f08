/*
 * fhirbox console: a single-page client of fhirbox's public HTTP API (jobs, data, SQL, views,
 * health). It has no privileges of its own: it sees exactly what the signed-in subject may see.
 * This module is the entry point: sign-in and sign-out, hash routing, start-up; each page
 * lives in its own module (jobs.js, data.js, sql.js, health.js).
 *
 * Signing in: the Client id and secret live in a variable of session.js only (no cookie, no
 * localStorage; reloading the page forgets them). Every request carries them as
 * `Authorization: Basic ...` together with `X-Requested-With: XMLHttpRequest`; with that
 * header the server's 401s carry no `WWW-Authenticate` challenge, so the browser never opens
 * its own password dialog. Signing in is a `GET /$jobs` that answers 200.
 *
 * The page is served under a strict CSP (no inline code, no eval). Server data, error messages
 * included, is untrusted: the DOM is built with createElement and textContent, never innerHTML.
 */

import { basicAuth, request, checked } from '/console/api.js';
import { loadCounts, resetData, initData } from '/console/data.js';
import { byId, showMessage, handler } from '/console/dom.js';
import { loadHealth } from '/console/health.js';
import { startPolling, stopPolling, resetJobs, redrawCharts, initJobs } from '/console/jobs.js';
import { initLoad } from '/console/load.js';
import {
  ROUTES, signedIn, subject, beginSession, endSession, currentRoute,
} from '/console/session.js';
import { abortSql, initSql } from '/console/sql.js';

// ---------------------------------------------------------------------------------------------
// Sign-in, sign-out

async function signIn() {
  const id = byId('client-id').value.trim();
  const auth = basicAuth(id, byId('secret').value);
  const button = byId('signin-button');
  showMessage(byId('signin-error'), '');
  button.disabled = true;
  try {
    await checked(await request('/$jobs', { headers: { Accept: 'application/json' }, auth }));
    beginSession(auth, id === 'root' ? 'root' : `Client/${id}`);
    byId('secret').value = '';
    byId('whoami').textContent = subject();
    byId('signin').hidden = true;
    byId('app').hidden = false;
    route();
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  endSession();
  stopPolling();
  abortSql();
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
  resetData();
}

// ---------------------------------------------------------------------------------------------
// Routing: `#/jobs` (the default), `#/data`, `#/sql`, `#/views`, `#/health`

const PAGE_ENTER = {
  jobs: () => { startPolling(); redrawCharts(); },
  data: handler('data-error', loadCounts),
  health: handler('health-error', loadHealth),
};

function route() {
  if (!signedIn()) return;
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
// Start-up (a module script runs once the document is parsed)

function init() {
  initJobs();
  initLoad();
  initData();
  initSql();

  byId('signin').addEventListener('submit', handler('signin-error', signIn));
  byId('signout').addEventListener('click', signOut);

  window.addEventListener('hashchange', route);
  window.addEventListener('resize', redrawCharts);
  // Polling pauses while the tab is hidden (jobs.js) and resumes when it shows again.
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && currentRoute() === 'jobs' && signedIn()) startPolling();
  });
  byId('client-id').focus();
}

init();
