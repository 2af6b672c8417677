// The console's shell: sign-in, the token's identity and what it may do, the error
// banner, and the router that mounts one view per hash route (#/apps/web, ...).

import { get, token, APIError } from "./api.js";
import { $, replace } from "./dom.js";
import * as live from "./live.js";
import { routes } from "./views.js";

const roles = ["none", "read", "exec", "deploy", "admin"];

// Identity is what GET /v1/tokens/current says of the token; it decides which actions the
// page offers. The server checks every call regardless.
class Identity {
  constructor(raw) {
    this.tokenID = String(raw.token_id || "");
    this.role = String(raw.role || "none");
    this.apps = Array.isArray(raw.apps) ? raw.apps.map(String) : [];
    this.projects = Array.isArray(raw.projects) ? raw.projects.map(String) : [];
    this.operator = raw.operator === true;
    this.limited = raw.limited === true;
  }
  reaches(kind, name) {
    if (!this.limited) return true;
    return (kind === "app" ? this.apps : this.projects).includes(name);
  }
  // may says whether the token reaches kind/name with at least role; "operator" needs
  // the operator's token.
  may(kind, name, role) {
    if (kind === "operator") return this.operator;
    return this.reaches(kind, name) && roles.indexOf(this.role) >= roles.indexOf(role);
  }
  describe() {
    if (this.operator) return "operator";
    const scope = this.limited ? [...this.apps.map((a) => "app:" + a), ...this.projects.map((p) => "project:" + p)].join(", ") || "nothing" : "everything";
    return `${this.role} on ${scope}`;
  }
}

// showError puts a message in the banner, where it stays until dismissed or replaced.
export function showError(e) {
  const msg = e instanceof Error ? e.message : String(e);
  replace($("#error-text"), msg);
  $("#error").hidden = false;
  if (!(e instanceof APIError)) console.error(e);
}

export function clearError() {
  $("#error").hidden = true;
  replace($("#error-text"));
}

let ident = null;
let current = null; // the mounted view's AbortController

function setLive(mode, why) {
  const el = $("#live");
  el.hidden = false;
  el.className = `live ${mode}`;
  el.dataset.mode = mode;
  el.textContent = mode === "stream" ? "live" : mode === "polling" ? "polling every 2 s" : `offline: ${why || ""}`;
}

function showSignIn(message) {
  if (current) current.abort();
  live.stopLive();
  ident = null;
  for (const id of ["#nav", "#whoami", "#signout", "#live", "#view"]) $(id).hidden = true;
  replace($("#whoami"));
  replace($("#view"));
  $("#signin").hidden = false;
  $("#token").value = "";
  if (message) showError(message);
  $("#token").focus();
}

async function signIn(t) {
  token.set(t);
  let raw;
  try {
    raw = await get("/v1/tokens/current");
  } catch (e) {
    token.clear();
    showSignIn(e);
    return;
  }
  ident = new Identity(raw || {});
  clearError();
  $("#signin").hidden = true;
  $("#nav").hidden = false;
  $("#nav-hosts").hidden = !ident.operator;
  const who = $("#whoami");
  who.hidden = false;
  who.dataset.role = ident.operator ? "operator" : ident.role;
  who.textContent = `${ident.tokenID} · ${ident.describe()}`;
  $("#signout").hidden = false;
  $("#view").hidden = false;
  live.start(setLive);
  route();
}

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  try {
    return parts.map(decodeURIComponent);
  } catch {
    return [];
  }
}

// route mounts the view the hash names, ending the one before: its requests, streams
// and subscriptions go with its AbortController.
function route() {
  if (!ident) return;
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const parts = parseHash();
  let match = null;
  for (const r of routes) {
    const params = r.match(parts);
    if (params) {
      match = { r, params };
      break;
    }
  }
  if (!match) {
    location.hash = "#/apps";
    return;
  }
  for (const a of $("#nav").querySelectorAll("a")) a.classList.toggle("current", a.getAttribute("href") === "#/" + match.r.section);
  const root = replace($("#view"));
  const env = {
    ident,
    signal,
    fail: (e) => {
      if (!signal.aborted && !(e instanceof DOMException && e.name === "AbortError")) showError(e);
    },
    clearError,
    // live subscribes fn to updates for as long as the view is mounted.
    live: (fn) => {
      const off = live.subscribe(fn);
      signal.addEventListener("abort", off);
    },
  };
  Promise.resolve(match.r.view(root, match.params, env)).catch(env.fail);
}

function boot() {
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#token").value.trim();
    if (t) signIn(t);
  });
  $("#signout").addEventListener("click", () => {
    token.clear();
    clearError();
    showSignIn();
  });
  $("#error-close").addEventListener("click", clearError);
  window.addEventListener("hashchange", () => {
    clearError();
    route();
  });
  const t = token.get();
  if (t) signIn(t);
  else showSignIn();
}

boot();
