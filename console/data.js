/*
 * fhirbox console: the data page. It shows the resource counts (`GET /$counts`) as a bar
 * chart, one row per type; choosing a type lists its last changes (a native search sorted by
 * `-_lastUpdated`); and it opens one resource, from that list or from a `Type/id` typed in,
 * as FHIR, as native JSON, or its history, pretty-printed in `pre#resource-json`.
 */

import { fetchJson } from '/console/api.js';
import { byId, el, showMessage, fmt, handler } from '/console/dom.js';

const dataState = { type: null, view: 'fhir', token: 0 };

export async function loadCounts() {
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

/** Forgets the selected type and view (at sign-out). */
export function resetData() {
  byId('open-ref').value = '';
  Object.assign(dataState, { type: null, view: 'fhir' });
  updateViewToggles();
}

/** Wires the "Open a resource" controls. */
export function initData() {
  byId('open-button').addEventListener('click', () => openFromInput(dataState.view === 'native' ? 'native' : 'fhir')());
  byId('open-ref').addEventListener('keydown', (event) => {
    if (event.key === 'Enter') openFromInput(dataState.view === 'native' ? 'native' : 'fhir')(event);
  });
  byId('as-fhir').addEventListener('click', openFromInput('fhir'));
  byId('as-native').addEventListener('click', openFromInput('native'));
  byId('open-history').addEventListener('click', openFromInput('history'));
}
