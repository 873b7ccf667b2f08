/*
 * fhirbox console: the health page. `GET /health` (public) tells whether the server is up;
 * `GET /$status` (for subjects allowed to read it) lists the database, the replicas and the
 * storage, each as a check that is up or down, and the server's limits (its flags and their
 * values) as a table. A subject that may not read the status sees the server's message.
 */

import { fetchJson } from '/console/api.js';
import { byId, el, showMessage, errorText, isSignedOut } from '/console/dom.js';

export async function loadHealth() {
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
