/*
 * fhirbox console: the SQL and views pages. The SQL console runs a query through
 * `POST /$dump-sql?_format=ndjson`, reads the streamed rows up to the limit (then aborts the
 * transfer), shows them as a table, shows errors with a caret under the position they name,
 * and downloads the whole result as TSV or NDJSON. The ViewDefinition editor previews a view's
 * rows and the SQL it compiles to, through `$viewdefinition-run`.
 */

import { request, checked, outcomeError, download } from '/console/api.js';
import { byId, el, showMessage, errorText, isSignedOut, fmt, positiveInt, handler } from '/console/dom.js';

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

/** Stops a running query; its run sees it was superseded and shows nothing (at sign-out). */
export function abortSql() {
  if (sqlState.controller) sqlState.controller.abort();
  sqlState.controller = null;
}

/** Fills the examples in and wires the SQL and views pages' buttons. */
export function initSql() {
  byId('view-editor').value = JSON.stringify(EXAMPLE_VIEW, null, 2);
  byId('sql-editor').value = EXAMPLE_SQL;
  byId('sql-run').addEventListener('click', handler('sql-error', runSql));
  byId('sql-download-tsv').addEventListener('click', () => downloadSql('tsv'));
  byId('sql-download-ndjson').addEventListener('click', () => downloadSql('ndjson'));
  byId('view-preview').addEventListener('click', handler('view-error', previewView));
}
