// The API as the console calls it. The token lives in sessionStorage (it goes when the
// tab closes) and travels only in the Authorization header, never in a URL, where logs
// and the browser's history would keep it.

const KEY = "kiln.token";

export const token = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

// APIError is a refusal from the server: its status and the message of its
// {"error": ...} body, which says what failed and what to do.
export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Bodies the page buffers whole are capped: API answers carry tenant-controlled text.
const maxBody = 8 << 20;
const maxError = 4096;
// A line of a streamed log is cut here; guest output is hostile.
export const maxLine = 16 << 10;

// path appends segments to base, escaping each: names come from the server and the URL.
export function path(base, ...segs) {
  return base + segs.map((s) => "/" + encodeURIComponent(s)).join("");
}

function init(method, signal, extra = {}) {
  return {
    method,
    signal,
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
    ...extra,
    headers: { Authorization: `Bearer ${token.get()}`, ...(extra.headers || {}) },
  };
}

// readText reads at most max characters of a body and drops the rest.
async function readText(res, max) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return out;
    out += value;
    if (out.length > max) {
      await reader.cancel();
      throw new APIError(res.status, `the server's answer is over ${max >> 20} MiB`);
    }
  }
}

async function refusal(res) {
  let msg = `${res.status} ${res.statusText}`;
  try {
    const body = JSON.parse(await readText(res, 64 << 10));
    if (body && typeof body.error === "string" && body.error !== "") msg = body.error;
  } catch {
    // not kiln's JSON error: the status says what there is to say
  }
  return new APIError(res.status, msg.slice(0, maxError));
}

// call makes one API call and returns its JSON answer, or throws an APIError.
export async function call(method, p, body, signal) {
  const extra = {};
  if (body !== undefined) {
    extra.headers = { "Content-Type": "application/json" };
    extra.body = JSON.stringify(body);
  }
  const res = await fetch(p, init(method, signal, extra));
  if (!res.ok) throw await refusal(res);
  const text = await readText(res, maxBody);
  return text === "" ? null : JSON.parse(text);
}

export const get = (p, signal) => call("GET", p, undefined, signal);

// stream calls p and hands each line of its body to onLine as it arrives, until the body
// ends or signal aborts. onOpen runs once the server has answered 200.
export async function stream(p, onLine, signal, onOpen) {
  const res = await fetch(p, init("GET", signal, { headers: { Accept: "text/event-stream, application/x-ndjson" } }));
  if (!res.ok) throw await refusal(res);
  if (onOpen) onOpen();
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let skipping = false; // the rest of a line already cut at maxLine
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).replace(/\r$/, "");
        buf = buf.slice(i + 1);
        if (skipping) skipping = false;
        else onLine(line);
      }
      if (buf.length > maxLine) {
        if (!skipping) onLine(buf.slice(0, maxLine) + " …[cut]");
        skipping = true;
        buf = "";
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  if (buf !== "" && !skipping) onLine(buf);
}

// sse turns lines of a text/event-stream into events {type, data, id} as the
// server-sent events format defines them; comments (": keepalive") are skipped.
export function sse(onEvent) {
  let type = "message";
  let data = [];
  let id = null;
  return (line) => {
    if (line === "") {
      if (data.length) onEvent({ type, data: data.join("\n"), id });
      type = "message";
      data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  };
}
