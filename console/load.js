/*
 * fhirbox console: `$load` from the jobs page. A load is not a job (it streams one NDJSON
 * source into one type and answers when it is done), so it is not in the job list: the page
 * shows it on its own line, a bar that runs while the request does and fills when it
 * answers, and what the answer says it loaded.
 */
import { checked, request } from '/console/api.js';
import { byId, fmt, handler, showMessage } from '/console/dom.js';

function setBar(state) {
  const bar = byId('load-bar');
  bar.hidden = state === 'hidden';
  bar.classList.toggle('indeterminate', state === 'running');
  bar.dataset.percent = state === 'done' ? '100' : '0';
  bar.firstElementChild.style.width = state === 'done' ? '100%' : '0%';
}

async function startLoad() {
  const type = byId('load-type').value.trim();
  const source = byId('load-source').value.trim();
  const message = byId('load-message');
  showMessage(message, '');
  if (!/^[A-Z][A-Za-z]+$/.test(type)) throw new Error('Name a resource type, like Patient.');
  if (!source) throw new Error('Give the URL of an NDJSON source (gzipped or not).');
  const button = byId('load-start');
  button.disabled = true;
  setBar('running');
  try {
    const response = await checked(await request(`/fhir/${type}/$load`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: JSON.stringify({ source }),
    }));
    const answer = await response.json().catch(() => ({}));
    setBar('done');
    const total = answer.total != null ? fmt(answer.total) : 'the';
    showMessage(message, `Loaded ${total} ${type} resources.`, 'ok');
  } catch (error) {
    setBar('hidden');
    throw error;
  } finally {
    button.disabled = false;
  }
}

/** Wires the load form. */
export function initLoad() {
  byId('load-start').addEventListener('click', handler('load-message', startLoad));
}
