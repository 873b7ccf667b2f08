/*
 * fhirbox console: DOM and formatting helpers shared by every page. Elements are built with
 * createElement and textContent only (server data, error messages included, is untrusted),
 * messages are shown and hidden in place, numbers, byte sizes and times are formatted for the
 * reader's locale, and `handler` wraps async event handlers so that their failures are shown
 * in the page instead of becoming unhandled rejections in the browser's console.
 */

export const byId = (id) => document.getElementById(id);

/** Creates an element; `text` sets textContent, `dataset` data-* attributes. */
export function el(tag, props = {}, children = []) {
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
export function showMessage(node, text, kind = 'error') {
  node.replaceChildren(text ? String(text) : '');
  node.hidden = !text;
  node.classList.toggle('error', kind === 'error');
  node.classList.toggle('ok', kind === 'ok');
}

export const errorText = (error) => (error instanceof Error ? error.message : String(error));
export const isSignedOut = (error) => Boolean(error) && error.name === 'SignedOut';
export const fmt = (n) => Number(n || 0).toLocaleString();

export function fmtBytes(n) {
  const value = Number(n || 0);
  const one = (x) => x.toLocaleString(undefined, { maximumFractionDigits: 1 });
  if (value < 1024) return `${fmt(value)} B`;
  if (value < 1024 ** 2) return `${one(value / 1024)} KB`;
  if (value < 1024 ** 3) return `${one(value / 1024 ** 2)} MB`;
  return `${one(value / 1024 ** 3)} GB`;
}

export function fmtTime(iso) {
  const date = new Date(iso);
  return iso && !Number.isNaN(date.getTime()) ? date.toLocaleString() : '';
}

export function positiveInt(text, fallback) {
  const n = Number.parseInt(text, 10);
  return Number.isFinite(n) && n > 0 ? n : fallback;
}

/**
 * Wraps an async event handler so that its failures are shown in the page (element
 * `errorId`), never left as unhandled rejections in the console.
 */
export function handler(errorId, action) {
  return (event) => {
    if (event) event.preventDefault();
    Promise.resolve()
      .then(() => action(event))
      .catch((error) => {
        if (!isSignedOut(error)) showMessage(byId(errorId), errorText(error));
      });
  };
}
