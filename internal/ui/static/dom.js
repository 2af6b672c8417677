// Building the page. Everything the server says (names, log lines, error messages) is
// tenant-controlled, so it only ever becomes text nodes: nothing here parses markup.

// h makes an element. attrs sets properties (className, href, hidden, onclick, dataset
// entries as data: {...}); children are nodes or strings (text), nulls are skipped.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "data") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "for") el.htmlFor = v;
    else if (k in el) el[k] = v;
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// replace empties el and fills it with children.
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (sel) => document.querySelector(sel);

// table makes a table with a header row and the given rows (arrays of cells or <tr>s).
export function table(headers, rows, empty = "None yet.") {
  const body = h("tbody", {}, rows.map((r) => (r instanceof Node ? r : h("tr", {}, r.map((c) => (c instanceof Node && c.tagName === "TD" ? c : h("td", {}, c)))))));
  if (rows.length === 0) body.append(h("tr", {}, h("td", { colSpan: headers.length, className: "muted" }, empty)));
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), body);
}

export function state(s) {
  return h("span", { className: `state ${s}` }, s);
}

export function when(t) {
  if (!t) return "";
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleString();
}

export function ms(n) {
  if (n === undefined || n === null) return "";
  return n < 1000 ? `${n} ms` : `${(n / 1000).toFixed(1)} s`;
}

export function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

// facts makes a definition list from [label, value] pairs.
export function facts(pairs) {
  return h("dl", { className: "facts" }, pairs.filter(([, v]) => v !== undefined && v !== "").flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

// LogView shows the newest max lines of a log, appended as they come.
export class LogView {
  constructor(id, max = 2000) {
    this.max = max;
    this.el = h("pre", { className: "log", id });
  }
  add(text, cls) {
    const atBottom = this.el.scrollTop + this.el.clientHeight >= this.el.scrollHeight - 4;
    this.el.append(h("div", { className: cls || "" }, text));
    while (this.el.childElementCount > this.max) this.el.firstElementChild.remove();
    if (atBottom) this.el.scrollTop = this.el.scrollHeight;
  }
  clear() {
    this.el.replaceChildren();
  }
}
