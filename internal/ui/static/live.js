// Live updates. The console follows GET /v1/events?follow=true (server-sent events),
// read with fetch because EventSource cannot send the Authorization header, and tells
// every subscriber about each event. Where the stream cannot be had (a server without
// it answers 404), it polls instead: subscribers get a "poll" event every 2 s and
// refresh what they show.

import { stream, sse, APIError } from "./api.js";

const subscribers = new Set();
const pollEvery = 2000;
const probeEvery = 30000; // while polling, how often to look for the stream again

let onMode = () => {};
let stop = null;

export function subscribe(fn) {
  subscribers.add(fn);
  return () => subscribers.delete(fn);
}

function emit(ev) {
  for (const fn of [...subscribers]) {
    try {
      fn(ev);
    } catch (e) {
      console.error(e);
    }
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });

// start follows the event stream until stopLive; mode(m) hears "stream", "polling" or
// "offline" (with the reason) as that changes.
export function start(mode) {
  stopLive();
  onMode = mode;
  const ctl = new AbortController();
  stop = () => ctl.abort();
  run(ctl.signal);
}

export function stopLive() {
  if (stop) stop();
  stop = null;
}

async function run(signal) {
  let after = null;
  while (!signal.aborted) {
    try {
      const q = new URLSearchParams({ follow: "true" });
      if (after) q.set("after", after);
      await stream(
        "/v1/events?" + q,
        sse((ev) => {
          if (ev.id) after = ev.id;
          let data;
          try {
            data = JSON.parse(ev.data);
          } catch {
            return;
          }
          if (data && typeof data === "object") emit(data);
        }),
        signal,
        () => {
          onMode("stream");
          // What changed while we were not listening: views read it again.
          emit({ type: "resync" });
        },
      );
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof APIError && e.status === 401) {
        // The token is refused (revoked, expired): polling would be refused too.
        onMode("offline", e.message);
        await sleep(probeEvery, signal);
        continue;
      }
      // No stream here (404 before the server had one, 501 where it keeps no
      // journal), too many followers, or the connection dropped: poll, and look for
      // the stream again later.
      onMode("polling");
      await poll(signal);
      continue;
    }
    await sleep(1000, signal);
  }
}

async function poll(signal) {
  const until = Date.now() + probeEvery;
  while (!signal.aborted && Date.now() < until) {
    emit({ type: "poll" });
    await sleep(pollEvery, signal);
  }
}
