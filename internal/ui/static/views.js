// The console's pages. Each view fills root, reads the API, and refreshes when the
// event stream (or the poll that stands in for it) says something it shows changed. It
// offers an action only where env.ident.may says the token's role allows it; the server
// decides regardless, and its refusal is shown in the error banner.

import { call, get, path, stream, sse } from "./api.js";
import { h, replace, table, state, when, ms, bytes, facts, LogView } from "./dom.js";

// refresher runs load now and again on each trigger, one at a time: triggers that come
// while it runs coalesce into one more run.
function refresher(load, env) {
  let running = false;
  let again = false;
  const run = async () => {
    if (env.signal.aborted) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await load();
    } catch (e) {
      env.fail(e);
    } finally {
      running = false;
      if (again) {
        again = false;
        run();
      }
    }
  };
  return run;
}

// changed says whether v differs from what key last held, so that a refresh with nothing
// new leaves the page (and a half-made click) alone.
function changed(memo, key, v) {
  const s = JSON.stringify(v);
  if (memo[key] === s) return false;
  memo[key] = s;
  return true;
}

const isPoll = (ev) => ev.type === "poll" || ev.type === "resync";

const link = (href, text) => h("a", { href }, text);
const appHref = (app) => "#/apps/" + encodeURIComponent(app);
const machineHref = (app, id) => appHref(app) + "/machines/" + encodeURIComponent(id);
const projectHref = (p) => "#/projects/" + encodeURIComponent(p);
const buildHref = (p, id) => projectHref(p) + "/builds/" + encodeURIComponent(id);

// ---- apps

async function appsView(root, _params, env) {
  const list = h("div");
  replace(root, h("h1", {}, "Apps"), list);
  const memo = {};
  const load = refresher(async () => {
    const out = await get("/v1/apps", env.signal);
    const apps = (out && out.apps) || [];
    if (!changed(memo, "apps", apps)) return;
    replace(
      list,
      table(
        ["App", "Status", "Machines", "Volumes"],
        apps.map((a) => h("tr", { data: { app: a.name } }, h("td", {}, link(appHref(a.name), a.name)), h("td", {}, state(a.status)), h("td", { className: "num" }, a.machine_count), h("td", { className: "num" }, a.volume_count))),
        "No apps this token reaches.",
      ),
    );
  }, env);
  env.live((ev) => (isPoll(ev) || ev.app) && load());
  await load();
}

// ---- machines

// Per-machine UI state that outlives a re-render: a destroy waiting for its confirmation
// and an action on its way.
const confirming = new Set();
const pending = new Set();

// machineActions offers start, stop, suspend and destroy (confirmed in the page) to a
// token with the deploy role on the app, and nothing to one without.
function machineActions(env, app, m, after) {
  if (!env.ident.may("app", app, "deploy")) return null;
  const box = h("div", { className: "actions", data: { actionsFor: m.id } });
  const act = async (name, method, p) => {
    pending.add(m.id);
    draw();
    try {
      await call(method, p, undefined, env.signal);
      env.clearError();
    } catch (e) {
      env.fail(e);
    } finally {
      pending.delete(m.id);
      confirming.delete(m.id);
      // A refresh while the call was on its way may have drawn a newer box.
      for (const el of document.querySelectorAll(".actions[data-actions-for]")) if (el.dataset.actionsFor === m.id) el.redraw();
      after();
    }
  };
  const base = path("/v1/apps", app, "machines", m.id);
  const button = (name, label, onclick, cls = "") => h("button", { type: "button", className: cls, data: { action: name }, disabled: pending.has(m.id), onclick }, label);
  const draw = () => {
    if (confirming.has(m.id)) {
      replace(
        box,
        h("span", {}, `Destroy ${m.id}?`),
        button("confirm-destroy", "Confirm destroy", () => act("destroy", "DELETE", base), "danger"),
        button("cancel-destroy", "Keep", () => {
          confirming.delete(m.id);
          draw();
        }),
      );
      return;
    }
    replace(
      box,
      button("start", "Start", () => act("start", "POST", base + "/start")),
      button("stop", "Stop", () => act("stop", "POST", base + "/stop")),
      button("suspend", "Suspend", () => act("suspend", "POST", base + "/suspend")),
      button(
        "destroy",
        "Destroy",
        () => {
          confirming.add(m.id);
          draw();
        },
        "danger",
      ),
    );
  };
  box.redraw = draw;
  draw();
  return box;
}

async function appView(root, { app }, env) {
  const machines = h("div", { id: "machines" });
  const volumes = h("div", { id: "volumes" });
  replace(root, h("h1", {}, "App ", h("span", { className: "mono" }, app)), h("h2", {}, "Machines"), machines, h("h2", {}, "Volumes"), volumes);
  const memo = {};
  const load = refresher(async () => {
    const [ms_, vs] = await Promise.all([get(path("/v1/apps", app, "machines"), env.signal), get(path("/v1/apps", app, "volumes"), env.signal)]);
    if (changed(memo, "m", ms_)) {
      replace(
        machines,
        table(
          ["Machine", "Name", "State", "Image", "Host", "Updated", ""],
          (ms_ || []).map((m) =>
            h(
              "tr",
              { data: { machine: m.id } },
              h("td", { className: "mono" }, link(machineHref(app, m.id), m.id)),
              h("td", {}, m.name),
              h("td", {}, state(m.state)),
              h("td", { className: "mono" }, (m.config && m.config.image) || ""),
              h("td", {}, m.host || ""),
              h("td", {}, when(m.updated_at)),
              h("td", {}, machineActions(env, app, m, load)),
            ),
          ),
          "No machines.",
        ),
      );
    }
    if (changed(memo, "v", vs)) {
      replace(
        volumes,
        table(
          ["Volume", "Name", "State", "Size", "Used", "Attached to"],
          (vs || []).map((v) => h("tr", { data: { volume: v.id } }, h("td", { className: "mono" }, v.id), h("td", {}, v.name), h("td", {}, state(v.state)), h("td", { className: "num" }, `${v.size_gb} GB`), h("td", { className: "num" }, bytes(v.used_bytes)), h("td", { className: "mono" }, v.attached_machine_id || ""))),
          "No volumes.",
        ),
      );
    }
  }, env);
  env.live((ev) => (isPoll(ev) || ev.app === app) && load());
  await load();
}

async function machineView(root, { app, id }, env) {
  const head = h("div", { id: "machine" });
  const evs = h("div", { id: "machine-events" });
  const logs = new LogView("machine-logs");
  replace(root, h("h1", {}, "Machine ", h("span", { className: "mono" }, id), " in ", link(appHref(app), app)), head, h("h2", {}, "Events"), evs, h("h2", {}, "Logs"), logs.el);
  const memo = {};
  const load = refresher(async () => {
    const base = path("/v1/apps", app, "machines", id);
    const [m, events] = await Promise.all([get(base, env.signal), get(base + "/events?limit=50", env.signal)]);
    if (changed(memo, "m", m)) {
      replace(
        head,
        facts([
          ["State", h("span", { id: "machine-state", className: `state ${m.state}` }, m.state)],
          ["Name", m.name],
          ["Image", (m.config && m.config.image) || ""],
          ["Host", m.host || ""],
          ["Private IP", m.private_ip || ""],
          ["Created", when(m.created_at)],
          ["Updated", when(m.updated_at)],
        ]),
        h("div", { id: "machine-actions" }, machineActions(env, app, m, load)),
      );
    }
    if (changed(memo, "e", events)) {
      replace(
        evs,
        table(
          ["Time", "Type", "Status", "Source", "Message"],
          (events || []).map((e) => [when(e.timestamp), e.type, e.status, e.source, e.message || (e.request && e.request.exit_event ? `exit ${e.request.exit_event.exit_code}` : "")]),
          "No events.",
        ),
      );
    }
  }, env);
  env.live((ev) => (isPoll(ev) || (ev.app === app && ev.machine_id === id)) && load());
  followMachineLogs(app, id, logs, env);
  await load();
}

// followMachineLogs streams the machine's log (NDJSON of api.LogLine) into logs for as
// long as the view lives; a stream that ends is read again from the start.
async function followMachineLogs(app, id, logs, env) {
  const p = path("/v1/apps", app, "machines", id, "logs") + "?follow=true";
  while (!env.signal.aborted) {
    logs.clear();
    try {
      await stream(
        p,
        (line) => {
          if (line === "") return;
          let l;
          try {
            l = JSON.parse(line);
          } catch {
            return;
          }
          logs.add(String(l.message ?? ""), l.stream === "stderr" ? "stderr" : "");
        },
        env.signal,
      );
    } catch (e) {
      env.fail(e);
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---- builds

const terminal = (s) => s === "succeeded" || s === "failed" || s === "canceled";
const seenProjects = new Set();

async function buildsView(root, _params, env) {
  const own = env.ident.limited ? env.ident.projects : [];
  const list = h("ul", { id: "projects" });
  const draw = () => replace(list, [...new Set([...own, ...seenProjects])].sort().map((p) => h("li", {}, link(projectHref(p), p))));
  const input = h("input", { id: "project-name", placeholder: "project", required: true, spellcheck: false });
  const form = h(
    "form",
    {
      className: "inline",
      onsubmit: (ev) => {
        ev.preventDefault();
        if (input.value.trim()) location.hash = projectHref(input.value.trim());
      },
    },
    h("label", { for: "project-name" }, "Open project"),
    input,
    h("button", { type: "submit" }, "Open"),
  );
  replace(root, h("h1", {}, "Builds"), form, list);
  draw();
  env.live((ev) => {
    if (ev.project && !seenProjects.has(ev.project)) {
      seenProjects.add(String(ev.project));
      draw();
    }
  });
}

function cancelButton(env, p, b, after) {
  if (terminal(b.state) || !env.ident.may("project", p, "deploy")) return null;
  return h(
    "button",
    {
      type: "button",
      className: "danger",
      data: { action: "cancel" },
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          await call("POST", path("/v1/projects", p, "builds", b.id, "cancel"), undefined, env.signal);
          env.clearError();
        } catch (e) {
          env.fail(e);
        }
        after();
      },
    },
    "Cancel",
  );
}

async function projectView(root, { project }, env) {
  seenProjects.add(project);
  const list = h("div", { id: "builds" });
  replace(root, h("h1", {}, "Builds of ", h("span", { className: "mono" }, project)), list);
  const memo = {};
  const load = refresher(async () => {
    const bs = await get(path("/v1/projects", project, "builds"), env.signal);
    if (!changed(memo, "b", bs)) return;
    replace(
      list,
      table(
        ["Build", "State", "Tags", "Created", "Duration", "Cached steps", "Attempt", ""],
        (bs || []).map((b) =>
          h(
            "tr",
            { data: { build: b.id } },
            h("td", { className: "mono" }, link(buildHref(project, b.id), b.id)),
            h("td", {}, state(b.state), b.error ? h("div", { className: "muted" }, b.error) : null),
            h("td", { className: "mono" }, (b.spec && b.spec.tags ? b.spec.tags : []).join(" ")),
            h("td", {}, when(b.created_at)),
            h("td", { className: "num" }, ms(b.duration_ms)),
            h("td", { className: "num" }, b.total_steps ? `${b.cached_steps}/${b.total_steps}` : ""),
            h("td", { className: "num" }, b.attempt),
            h("td", {}, cancelButton(env, project, b, load)),
          ),
        ),
        "No builds.",
      ),
    );
  }, env);
  env.live((ev) => (isPoll(ev) || ev.project === project) && load());
  await load();
}

// Steps reads BuildKit's plain progress lines ("#5 [2/3] RUN make", "#5 CACHED",
// "#5 DONE 1.2s") into steps while a build runs; the build's record replaces them when
// it ends.
class Steps {
  constructor() {
    this.byID = new Map();
  }
  line(text) {
    const m = /^#(\d+) (.*)$/.exec(text);
    if (!m) return false;
    const [, n, rest] = m;
    let s = this.byID.get(n);
    if (!s) {
      if (/^\d+\.\d+ /.test(rest)) return false;
      this.byID.set(n, { name: rest, cached: false, ms: null });
      return true;
    }
    if (rest === "CACHED") s.cached = true;
    else if (/^DONE \d+(\.\d+)?s$/.test(rest)) s.ms = Math.round(parseFloat(rest.slice(5)) * 1000);
    else return false;
    return true;
  }
  list() {
    return [...this.byID.values()];
  }
}

function stepsTable(steps) {
  return table(
    ["Step", "Cache", "Time"],
    steps.map((s) => h("tr", { className: s.cached ? "cached" : "" }, h("td", { className: "mono" }, s.name), h("td", {}, s.cached ? "cached" : "run"), h("td", { className: "num" }, s.ms === null ? "" : ms(s.ms)))),
    "No steps yet.",
  );
}

async function buildView(root, { project, id }, env) {
  const head = h("div", { id: "build" });
  const stepsEl = h("div", { id: "build-steps" });
  const logs = new LogView("build-log", 5000);
  replace(root, h("h1", {}, "Build ", h("span", { className: "mono" }, id), " of ", link(projectHref(project), project)), head, h("h2", {}, "Steps"), stepsEl, h("h2", {}, "Log"), logs.el);
  const memo = {};
  let live = new Steps();
  let recorded = false; // the steps shown are the build record's, not read from the log
  const showBuild = (b) => {
    if (!changed(memo, "b", b)) return;
    replace(
      head,
      facts([
        ["State", h("span", { id: "build-state", className: `state ${b.state}` }, b.state)],
        ["Tags", (b.spec && b.spec.tags ? b.spec.tags : []).join(" ")],
        ["Queue position", b.queue_position || ""],
        ["Attempt", b.attempt],
        ["Builder", b.builder ? `${b.builder}${b.builder_ready_ms ? ` (ready in ${ms(b.builder_ready_ms)})` : ""}` : ""],
        ["Cached steps", b.total_steps ? `${b.cached_steps} of ${b.total_steps}` : ""],
        ["Duration", ms(b.duration_ms)],
        ["Image", b.image || ""],
        ["Retries", (b.retries || []).join("; ")],
        ["Error", b.error ? h("span", { className: "state failed" }, b.error) : ""],
        ["Created", when(b.created_at)],
      ]),
      h("div", { className: "actions" }, cancelButton(env, project, b, load)),
    );
    if (b.steps && b.steps.length) {
      recorded = true;
      replace(stepsEl, stepsTable(b.steps.map((s) => ({ name: s.name, cached: s.cached, ms: s.ms }))));
    }
  };
  const load = refresher(async () => showBuild(await get(path("/v1/projects", project, "builds", id), env.signal)), env);
  env.live((ev) => (isPoll(ev) || ev.build_id === id) && load());
  replace(stepsEl, stepsTable([]));
  await load();
  // The log: server-sent "log" events, one line each, then an "end" event with the
  // build; a stream cut before its end is read again from the start.
  const p = path("/v1/projects", project, "builds", id, "logs") + "?follow=true";
  let ended = false;
  while (!ended && !env.signal.aborted) {
    logs.clear();
    live = new Steps();
    try {
      await stream(
        p,
        sse((ev) => {
          if (ev.type === "log") {
            logs.add(ev.data);
            if (live.line(ev.data) && !recorded) replace(stepsEl, stepsTable(live.list()));
          } else if (ev.type === "end") {
            ended = true;
            try {
              showBuild(JSON.parse(ev.data));
            } catch {
              load();
            }
          }
        }),
        env.signal,
      );
    } catch (e) {
      env.fail(e);
    }
    if (!ended) await new Promise((r) => setTimeout(r, 2000));
  }
}

// ---- hosts and limits

function capacityBar(id, used, offered, unit) {
  return h(
    "span",
    { className: "bar" },
    h("meter", { id, min: 0, max: Math.max(offered, 1), value: used, low: offered * 0.7, high: offered * 0.9, optimum: 0 }),
    ` ${used} / ${offered} ${unit}`,
  );
}

async function hostsView(root, _params, env) {
  if (!env.ident.may("operator")) {
    replace(root, h("h1", {}, "Hosts"), h("p", {}, "Hosts and their capacity are the operator's: sign in with the operator's token."));
    return;
  }
  const list = h("div", { id: "hosts" });
  replace(root, h("h1", {}, "Hosts"), list);
  const memo = {};
  const load = refresher(async () => {
    const hs = await get("/v1/hosts", env.signal);
    if (!changed(memo, "h", hs)) return;
    replace(
      list,
      table(
        ["Host", "State", "CPUs used / offered", "Memory used / offered", "Has", "Overcommit"],
        (hs || []).map((x) =>
          h(
            "tr",
            { data: { host: x.name } },
            h("td", {}, x.name),
            h("td", {}, state(x.state)),
            h("td", {}, capacityBar(`cpu-${x.name}`, x.cpus_used, x.cpus_offered, "CPUs")),
            h("td", {}, capacityBar(`mem-${x.name}`, x.memory_used_mib, x.memory_offered_mib, "MiB")),
            h("td", {}, `${x.cpus} CPUs, ${x.memory_mib} MiB (reserve ${x.reserve_cpus} CPUs, ${x.reserve_memory_mib} MiB)`),
            h("td", {}, `CPU ×${x.cpu_overcommit}, memory ×${x.memory_overcommit}`),
          ),
        ),
        "No hosts.",
      ),
    );
  }, env);
  env.live((ev) => (isPoll(ev) || ev.host || ev.machine_id) && load());
  await load();
}

async function limitsView(root, _params, env) {
  const ls = await get("/v1/limits", env.signal);
  replace(
    root,
    h("h1", {}, "Limits"),
    table(
      ["Limit", "Value", "Source", "What it bounds"],
      (ls || []).map((l) => [h("span", { className: "mono" }, l.name), `${l.value}${l.unit ? " " + l.unit : ""}`, l.source, l.description]),
    ),
  );
}

// routes maps hash paths to views; section names the nav link that is current.
const route = (pattern, section, view) => ({
  section,
  view,
  match: (parts) => {
    const segs = pattern.split("/").filter(Boolean);
    if (segs.length !== parts.length) return null;
    const params = {};
    for (let i = 0; i < segs.length; i++) {
      if (segs[i].startsWith(":")) params[segs[i].slice(1)] = parts[i];
      else if (segs[i] !== parts[i]) return null;
    }
    return params;
  },
});

export const routes = [
  route("apps", "apps", appsView),
  route("apps/:app", "apps", appView),
  route("apps/:app/machines/:id", "apps", machineView),
  route("builds", "builds", buildsView),
  route("projects/:project", "builds", projectView),
  route("projects/:project/builds/:id", "builds", buildView),
  route("hosts", "hosts", hostsView),
  route("limits", "limits", limitsView),
];
