// flowkeeper dashboard: renders the runs list and the run page from JSON and
// keeps them live by short polling.  No framework, no build step.  Every piece
// of data goes into the page through textContent, never as HTML.
(() => {
  "use strict";

  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const BASE = meta("fk-base");
  const CSRF = meta("fk-csrf");
  const app = document.getElementById("app");
  const PAGE = document.body.dataset.page;
  const LIVE = new Set(["queued", "running", "sleeping", "retrying", "waiting"]);
  const FINISHED = new Set(["completed", "failed", "cancelled"]);
  const STATUSES = ["queued", "running", "sleeping", "retrying", "waiting", "completed", "failed", "cancelled"];

  // DOM -----------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const badge = (status) => el("span", { class: `badge s-${status}`, text: status });
  const runLink = (id) => el("a", { href: `${BASE}/runs/${id}`, class: "mono", title: id, text: `${id.slice(0, 8)}…${id.slice(-4)}` });
  const eventLink = (number, props) => el("a", { href: `${BASE}/events/${number}`, ...(props || {}) }, `event #${number}`);

  // time ------------------------------------------------------------------------------
  const ms = (iso) => (iso ? Date.parse(iso) : null);

  function duration(millis) {
    if (millis === null || millis === undefined || Number.isNaN(millis)) return "–";
    const abs = Math.abs(millis);
    if (abs < 1000) return `${Math.round(millis)} ms`;
    if (abs < 60e3) return `${(millis / 1000).toFixed(abs < 10e3 ? 2 : 1)} s`;
    const s = Math.round(abs / 1000);
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function stamp(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return d.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  function ago(iso) {
    if (!iso) return "–";
    const delta = Date.now() - Date.parse(iso);
    if (delta < 0) return `in ${duration(-delta)}`;
    if (delta < 5000) return "just now";
    return `${duration(delta)} ago`;
  }

  const timeCell = (iso) => el("time", { datetime: iso || "", title: stamp(iso), text: ago(iso) });

  function pretty(value) {
    if (value === undefined) return "";
    return JSON.stringify(value, null, 2);
  }

  // network ------------------------------------------------------------------------
  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    if (options.method === "POST") {
      headers["Content-Type"] = "application/json";
      headers["X-CSRF-Token"] = CSRF;
    }
    const response = await fetch(BASE + path, { credentials: "same-origin", ...options, headers });
    if (response.status === 401) {
      window.location.assign(`${BASE}/login?next=${encodeURIComponent(location.pathname + location.search)}`);
      throw new Error("signed out");
    }
    return response;
  }

  async function act(path, body) {
    const response = await api(path, { method: "POST", body: JSON.stringify(body || {}) });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      toast(data?.error?.message || `Failed (HTTP ${response.status})`, "bad");
      return null;
    }
    toast(data.message || "Done.", "good");
    return data;
  }

  let toastTimer = null;
  function toast(message, kind) {
    const box = document.getElementById("toast");
    box.textContent = message;
    box.className = `show ${kind || ""}`;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.className = ""; }, 4000);
  }

  const liveDot = document.getElementById("live");
  function setLive(state) {
    if (liveDot) liveDot.className = `live ${state}`;
  }

  // Poll while the tab is visible; back off when the server cannot be reached.
  function poll(fn, interval) {
    let timer = null;
    let failures = 0;
    const tick = async () => {
      timer = null;
      if (document.hidden) return;
      try {
        await fn();
        failures = 0;
        setLive("ok");
      } catch (err) {
        failures += 1;
        setLive("down");
      }
      timer = setTimeout(tick, interval * Math.min(8, 2 ** failures));
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer === null) tick();
    });
    timer = setTimeout(tick, interval);
  }

  // confirmation dialog --------------------------------------------------------------
  function confirmAction(title, text, label) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-yes").textContent = label;
    const reason = document.getElementById("confirm-reason");
    reason.value = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        resolve(dialog.returnValue === "ok" ? { reason: reason.value.trim() } : null);
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  // ================================================================================
  // Runs list
  // ================================================================================
  function runsPage(initial) {
    const params = new URLSearchParams(location.search);
    let data = initial;

    const header = el("div", { class: "page-head" });
    const counts = el("div", { class: "counts", id: "counts" });
    const filters = filterForm(params);
    const bulk = el("div", { class: "bulk", id: "bulk" });
    const table = el("table", { class: "runs", id: "runs" });
    const pager = el("nav", { class: "pager", id: "pager" });
    const problem = el("p", { class: "error", id: "list-error" });
    const patches = el("div", { class: "card", id: "patches", hidden: true });
    // Driver health (flowkeeper.health): nothing ticking, runs overdue.
    const banner = el("section", { class: "card banner-warn", id: "health-banner", hidden: "" });
    app.replaceChildren(header, banner, problem, counts, filters, bulk,
      el("div", { class: "card flush" }, table), pager, patches);
    loadPatches();

    // Versioning: live runs per branch of each ctx.patched id (may the old code go?).
    async function loadPatches() {
      let body;
      try {
        const response = await api("/api/patches");
        if (!response.ok) return;
        body = await response.json();
      } catch { return; }
      const rows = body.patches || [];
      if (!rows.length) return;
      const head = el("tr", {}, ...["Patch", "Workflow", "Old branch", "New branch", ""]
        .map((h) => el("th", { text: h })));
      const lines = rows.map((p) => el("tr", { dataset: { patch: p.patch } },
        el("td", { class: "mono", text: p.patch }),
        el("td", { text: p.workflow }),
        el("td", { class: "num old", text: String(p.old) }),
        el("td", { class: "num new", text: String(p.new) }),
        el("td", { class: "dim", text: p.old ? "old code still needed" : "old branch can go: ctx.deprecate_patch" })));
      patches.replaceChildren(el("h2", { text: "Patches in live runs" }),
        el("table", { class: "runs" }, el("thead", {}, head), el("tbody", {}, ...lines)));
      patches.hidden = false;
    }

    function render() {
      header.replaceChildren(el("h1", { text: "Runs" }),
        el("span", { class: "muted", text: `${data.total ?? 0} in range` }));
      problem.textContent = data.error || "";
      problem.hidden = !data.error;
      const problems = data.health?.problems || [];
      banner.hidden = !problems.length;
      banner.replaceChildren(...problems.map((p) => el("p", { text: p })));
      renderCounts();
      renderBulk();
      renderTable();
      renderPager();
    }

    function link(overrides) {
      const next = new URLSearchParams(params);
      for (const [k, v] of Object.entries(overrides)) {
        if (v === null || v === "") next.delete(k); else next.set(k, v);
      }
      const qs = next.toString();
      return `${BASE}/${qs ? `?${qs}` : ""}`;
    }

    function renderCounts() {
      const current = params.get("status") || "";
      const pills = [el("a", {
        class: `pill ${current ? "" : "on"}`, href: link({ status: null, before: null }),
      }, "all ", el("b", { text: String(data.total ?? 0) }))];
      for (const status of STATUSES) {
        const n = data.counts?.[status] || 0;
        pills.push(el("a", {
          class: `pill p-${status} ${current === status ? "on" : ""}`,
          href: link({ status, before: null }),
          dataset: { status },
        }, `${status} `, el("b", { text: String(n) })));
      }
      counts.replaceChildren(...pills);
    }

    function renderBulk() {
      const workflow = params.get("workflow");
      const failed = data.counts?.failed || 0;
      if (!workflow || !failed) { bulk.replaceChildren(); return; }
      bulk.replaceChildren(el("button", {
        class: "danger-outline", id: "bulk-replay",
        onclick: async () => {
          const answer = await confirmAction(
            `Replay ${failed} failed run${failed === 1 ? "" : "s"}?`,
            `Every failed run of “${workflow}” runs again from the step that failed; the results of earlier steps are kept. Each replay is recorded on its run's history.`,
            "Replay failed runs");
          if (!answer) return;
          if (await act("/api/replay-failed", { workflow, reason: answer.reason })) refresh();
        },
      }, `Replay ${failed} failed run${failed === 1 ? "" : "s"} of ${workflow}`));
    }

    function renderTable() {
      const head = el("thead", {}, el("tr", {},
        ["Status", "Run", "Workflow", "Key", "Steps", "Created", "Duration", "Error"]
          .map((t) => el("th", { text: t }))));
      const body = el("tbody");
      if (!data.runs.length) {
        body.append(el("tr", {}, el("td", { colspan: 8, class: "empty", text: "No runs match." })));
      }
      for (const run of data.runs) {
        const href = `${BASE}/runs/${run.id}`;
        const end = run.finished_at ? ms(run.finished_at) : (LIVE.has(run.status) ? Date.now() : null);
        const started = ms(run.started_at || run.created_at);
        const err = run.error ? `${shortType(run.error.type)}: ${run.error.message || ""}` : "";
        body.append(el("tr", { class: `row s-${run.status}`, dataset: { id: run.id } },
          el("td", {}, badge(run.status)),
          el("td", { class: "mono" }, el("a", { href, title: run.id, text: run.id.slice(0, 8) + "…" + run.id.slice(-4) })),
          el("td", { text: run.workflow }),
          el("td", { class: "mono dim", text: run.idempotency_key || "" }),
          el("td", { class: "num", text: String(run.steps) }),
          el("td", {}, timeCell(run.created_at)),
          el("td", { class: "num", text: end && started ? duration(end - started) : "–" }),
          el("td", { class: "err", title: err, text: err }),
        ));
      }
      table.replaceChildren(head, body);
    }

    function renderPager() {
      const parts = [];
      if (params.get("before")) parts.push(el("a", { href: link({ before: null }), class: "ghost-link", text: "« Newest" }));
      if (data.next_before) parts.push(el("a", { href: link({ before: data.next_before }), class: "ghost-link", id: "older", text: "Older »" }));
      pager.replaceChildren(...parts);
    }

    async function refresh() {
      const response = await api(`/api/runs${location.search}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      data = await response.json();
      render();
    }

    render();
    poll(refresh, 2500);
  }

  function filterForm(params) {
    const data = JSON.parse(document.getElementById("fk-data").textContent);
    const select = (name, options, current) => el("select", { name, id: `f-${name}` },
      options.map(([value, label]) => el("option", { value, selected: value === current, text: label })));
    const form = el("form", { class: "filters", method: "get", action: `${BASE}/` },
      el("label", {}, "Workflow", select("workflow",
        [["", "all workflows"], ...(data.workflows || []).map((w) => [w, w])], params.get("workflow") || "")),
      el("label", {}, "Status", select("status",
        [["", "any status"], ...STATUSES.map((s) => [s, s])], params.get("status") || "")),
      el("label", {}, "Created", select("since", [["", "any time"], ["15m", "last 15 minutes"],
        ["1h", "last hour"], ["24h", "last 24 hours"], ["7d", "last 7 days"], ["30d", "last 30 days"]],
      params.get("since") || "")),
      el("label", { class: "grow" }, "Search", el("input", {
        type: "search", name: "q", id: "f-q", value: params.get("q") || "",
        placeholder: "run id or idempotency key",
      })),
      el("button", { type: "submit", class: "primary", text: "Apply" }));
    // Keep a custom since (e.g. an ISO time from a link) as an option.
    const since = params.get("since");
    const sinceSelect = form.querySelector("#f-since");
    if (since && ![...sinceSelect.options].some((o) => o.value === since)) {
      sinceSelect.append(el("option", { value: since, selected: true, text: `since ${since}` }));
    }
    for (const name of ["until", "limit"]) {
      if (params.get(name)) form.append(el("input", { type: "hidden", name, value: params.get(name) }));
    }
    form.addEventListener("submit", () => {
      for (const input of form.querySelectorAll("select, input")) {
        if (!input.value) input.disabled = true; // keep the URL short
      }
    });
    return form;
  }

  const shortType = (type) => (type || "").split(".").pop();

  // ================================================================================
  // Run page
  // ================================================================================
  function runPage(initial) {
    if (initial.missing) {
      app.replaceChildren(el("p", {}, el("a", { href: `${BASE}/`, text: "← Runs" })),
        el("h1", { text: "Run not found" }), el("p", { class: "muted", text: initial.missing }));
      return;
    }
    let run = initial;
    const open = new Set();
    const stepFilter = { text: "", failedOnly: false };

    const head = el("section", { class: "run-head" });
    const errorBox = el("section", { id: "run-error" });
    const timelineCard = el("section", { class: "card", id: "timeline-card" });
    const stepsCard = el("section", { class: "card flush", id: "steps-card" });
    const ioCard = el("section", { class: "grid2", id: "io" });
    const historyCard = el("section", { class: "card", id: "history" });
    const streamCard = el("section", { class: "card", id: "stream-card", hidden: "" });
    const childrenCard = el("section", { class: "card flush", id: "children-card", hidden: "" });
    app.replaceChildren(head, errorBox, timelineCard, streamCard, stepsCard, childrenCard, ioCard, historyCard);
    const timeline = makeTimeline(timelineCard, (key) => focusStep(key));

    function render() {
      document.title = `${run.workflow} ${run.status} · flowkeeper`;
      renderHead();
      renderError();
      timeline.render(run.timeline);
      renderSteps();
      renderChildren();
      renderIO();
      renderHistory();
      const outside = [...(run.workflow_logs || []), ...(run.other_logs || [])];
      if (outside.length) historyCard.append(logBlock(`Logs outside steps (${outside.length})`, outside));
    }

    // Child runs (ctx.invoke / ctx.start_child): each row links to the child's own page.
    function renderChildren() {
      const kids = run.children || [];
      if (!kids.length) { childrenCard.hidden = true; childrenCard.replaceChildren(); return; }
      childrenCard.hidden = false;
      const counts = {};
      for (const k of kids) counts[k.status] = (counts[k.status] || 0) + 1;
      const summary = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(" · ");
      const more = run.children_total > kids.length ? ` (first ${kids.length} of ${run.children_total})` : "";
      const body = el("tbody", {});
      for (const k of kids) {
        body.append(el("tr", { class: "child", "data-id": k.id },
          el("td", {}, el("a", { href: `${BASE}/runs/${k.id}`, class: "mono", text: k.id })),
          el("td", {}, el("code", { text: k.step || "" })),
          el("td", { text: k.workflow }),
          el("td", {}, badge(k.status)),
          el("td", { title: stamp(k.created_at), text: ago(k.created_at) })));
      }
      childrenCard.replaceChildren(
        el("details", { open: kids.length <= 50 ? "" : null },
          el("summary", { class: "steps-bar" }, el("h2", {}, "Child runs ",
            el("span", { class: "muted", text: `(${run.children_total}${more}: ${summary})` }))),
          el("table", { class: "steps", id: "children" },
            el("thead", {}, el("tr", {}, ["Run", "Started by", "Workflow", "Status", "Created"].map((h) => el("th", { text: h })))),
            body)));
    }

    function renderHead() {
      const started = ms(run.started_at);
      const end = run.finished_at ? ms(run.finished_at) : ms(run.timeline.now);
      const facts = [
        ["Run", el("span", { class: "mono", id: "run-id", text: run.id })],
        ["Idempotency key", el("span", { class: "mono", text: run.idempotency_key || "–" })],
        ["Created", el("span", { title: stamp(run.created_at), text: stamp(run.created_at) })],
        ["Duration", el("span", { text: started ? duration(end - started) : "–" })],
        ["Invocations", el("span", { text: String(run.invocations) })],
      ];
      if (run.parent) {
        facts.push(["Parent run", el("span", { id: "parent-run" },
          el("a", { href: `${BASE}/runs/${run.parent.id}`, class: "mono", text: run.parent.id }),
          run.parent.step ? [" · step ", el("code", { text: run.parent.step })] : null)]);
      }
      if (run.code_version) facts.push(["Code version", el("span", { class: "mono", id: "code-version", text: run.code_version })]);
      if (run.status === "sleeping" || run.status === "retrying" || run.status === "queued") {
        facts.push([run.status === "retrying" ? "Retry at" : run.status === "sleeping" ? "Wakes at" : "Due",
          el("span", { title: stamp(run.due_at), text: run.due_at ? `${stamp(run.due_at)} (${ago(run.due_at)})` : "–" })]);
      }
      if (run.queued_reason) {
        facts.push(["Not started", el("span", { id: "queued-reason", text: run.queued_reason })]);
      }
      const waits = run.waits || [];
      const current = waits.filter((w) => w.kind !== "cancel" && w.state === "waiting").pop();
      if (run.status === "waiting" && current) {
        facts.push(["Waiting for", el("span", { id: "waiting-for" }, el("code", { text: current.label }),
          current.timeout_at ? ` until ${stamp(current.timeout_at)} (${ago(current.timeout_at)})` : " (no timeout)")]);
      }
      for (const rule of waits.filter((w) => w.kind === "cancel")) {
        facts.push(["Cancel on", el("span", { class: "cancel-rule" }, el("code", { text: rule.label.replace(/^cancel on /, "") }),
          rule.outcome === "cancelled" && rule.event_number ? [" · cancelled by ", eventLink(rule.event_number)] : null)]);
      }
      const actions = el("div", { class: "actions" });
      const failedStep = run.error?.step;
      if (run.status === "failed") {
        actions.append(el("button", {
          class: "primary", id: "replay-failed-step",
          onclick: () => replayFrom(failedStep || null),
        }, failedStep ? `Replay from “${failedStep}”` : "Replay"));
      }
      if (run.status === "failed" || run.status === "retrying") {
        actions.append(el("button", { class: "ghost", id: "retry", onclick: retryNow, text: "Retry now" }));
      }
      if (run.status === "cancelled") {
        actions.append(el("button", { class: "ghost", id: "resume", onclick: () => replayFrom(null), text: "Resume" }));
      }
      if (LIVE.has(run.status)) {
        actions.append(el("button", { class: "danger-outline", id: "cancel", onclick: cancelRun, text: "Cancel run" }));
      }
      head.replaceChildren(
        el("a", { href: `${BASE}/?workflow=${encodeURIComponent(run.workflow)}`, class: "back", text: "← Runs" }),
        el("div", { class: "title-row" },
          el("h1", {}, run.workflow, " ", el("span", { id: "run-status" }, badge(run.status))),
          actions),
        el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", {}, v)))),
      );
    }

    function renderError() {
      if (run.overdue) {
        errorBox.className = "card banner-warn";
        errorBox.replaceChildren(el("p", { id: "run-overdue", text: run.overdue }));
        return;
      }
      if (!run.error) { errorBox.replaceChildren(); errorBox.className = ""; return; }
      // A retrying run keeps its last attempt's error: it has not failed (yet).
      const retrying = run.status === "retrying";
      errorBox.className = retrying ? "card error-card retrying-card" : "card error-card";
      const e = run.error;
      const title = retrying ? "Retrying" : "Failed";
      const where = retrying ? " after a failed attempt at step " : " at step ";
      errorBox.replaceChildren(
        el("h2", {}, title, e.step ? el("span", { class: "muted" }, where, el("code", { text: e.step })) : null,
          retrying && run.due_at ? el("span", { class: "muted" }, " · next attempt ", timeCell(run.due_at)) : null),
        el("p", { class: "err-line" }, el("b", { text: shortType(e.type) }), `: ${e.message || ""}`),
        e.traceback ? el("details", {}, el("summary", { text: "Traceback" }), el("pre", { class: "tb", text: e.traceback })) : null,
      );
    }

    function stepMatches(step) {
      if (stepFilter.failedOnly && !(step.status === "failed" || step.failed_attempts.length)) return false;
      return !stepFilter.text || step.key.toLowerCase().includes(stepFilter.text);
    }

    function renderSteps() {
      const finished = FINISHED.has(run.status);
      const filterBar = el("div", { class: "steps-bar" },
        el("h2", {}, "Steps ", el("span", { class: "muted", text: `(${run.steps.length})` })),
        el("input", {
          type: "search", placeholder: "Filter steps…", value: stepFilter.text, id: "step-filter",
          oninput: (ev) => { stepFilter.text = ev.target.value.toLowerCase(); renderStepRows(); },
        }),
        el("label", { class: "check" }, el("input", {
          type: "checkbox", checked: stepFilter.failedOnly,
          onchange: (ev) => { stepFilter.failedOnly = ev.target.checked; renderStepRows(); },
        }), " with failures only"));
      const table = el("table", { class: "steps", id: "steps" });
      stepsCard.replaceChildren(filterBar, table);

      function renderStepRows() {
        const body = el("tbody");
        for (const step of run.steps) {
          if (!stepMatches(step)) continue;
          const failures = step.failed_attempts.length;
          const row = el("tr", {
            class: `step s-${step.status} ${open.has(step.key) ? "open" : ""}`,
            dataset: { key: step.key },
            onclick: (ev) => { if (ev.target.tagName !== "BUTTON") toggle(step.key); },
          },
          el("td", { class: "num dim", text: String(step.position + 1) }),
          el("td", { class: "mono" }, el("span", { class: "caret", text: open.has(step.key) ? "▾" : "▸" }), " ", step.key,
            step.kind !== "step" ? el("span", { class: "tag", text: step.kind }) : null),
          el("td", {}, badge(step.status)),
          el("td", { class: "num", title: failures ? `${failures} failed attempt${failures === 1 ? "" : "s"}` : "" ,
            text: step.kind === "step" ? String(step.attempts) : "–" }),
          el("td", { class: "num", text: step.kind === "sleep"
            ? (step.wake_at && step.started_at ? duration(ms(step.wake_at) - ms(step.started_at)) : "–")
            : step.kind === "wait" && step.status === "waiting" && step.started_at
              ? duration(ms(run.timeline.now) - ms(step.started_at))
              : duration(step.duration === null ? null : step.duration * 1000) }),
          el("td", {}, timeCell(step.started_at)),
          el("td", { class: "row-actions" }, finished ? el("button", {
            class: "small ghost replay-from", dataset: { key: step.key },
            onclick: () => replayFrom(step.key), text: "Replay from here",
          }) : null, step.kind !== "patch" ? el("button", {
            class: "small ghost fork-from", dataset: { key: step.key },
            onclick: () => forkFrom(step.key), text: "Fork from here",
          }) : null));
          body.append(row);
          if (open.has(step.key)) body.append(el("tr", { class: "detail" }, el("td", { colspan: 7 }, stepDetail(step))));
        }
        if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "empty", text: run.steps.length ? "No step matches." : "No step recorded yet." })));
        table.replaceChildren(el("thead", {}, el("tr", {},
          ["#", "Step", "Status", "Attempts", "Duration", "Started", ""].map((t) => el("th", { text: t })))), body);
      }
      renderStepRows();
    }

    function stepDetail(step) {
      const parts = [];
      const block = (title, value) => el("div", { class: "io" }, el("h3", { text: title }),
        el("pre", { class: "json", text: value === null || value === undefined ? "null" : pretty(value) }));
      if (step.kind === "step") parts.push(el("div", { class: "grid2" }, block("Input", step.input), block("Output", step.output)));
      else if (step.kind === "wait") parts.push(waitDetail(step));
      else parts.push(el("p", { class: "muted", text: `Sleeps until ${stamp(step.wake_at)}` }));
      if (step.error) {
        parts.push(el("div", { class: "err-block" }, el("h3", { text: "Error" }),
          el("p", {}, el("b", { text: shortType(step.error.type) }), `: ${step.error.message || ""}`),
          step.error.traceback ? el("pre", { class: "tb", text: step.error.traceback }) : null));
      }
      if (step.failed_attempts.length) {
        parts.push(el("h3", { text: "Failed attempts" }));
        parts.push(el("ol", { class: "attempts" }, step.failed_attempts.map((a) => el("li", {},
          el("span", { class: "dim", text: `#${a.attempt} · ${stamp(a.finished_at)} · ` }),
          el("b", { text: shortType(a.error_type) }), `: ${a.message}`,
          a.retry_at ? el("span", { class: "dim", text: ` → retry at ${stamp(a.retry_at)}` }) : null,
          a.traceback ? el("details", {}, el("summary", { text: "traceback" }), el("pre", { class: "tb", text: a.traceback })) : null))));
      }
      if (step.logs && step.logs.length) parts.push(logBlock(`Logs (${step.logs.length})`, step.logs));
      return el("div", { class: "step-detail" }, parts);
    }

    // The log lines a step (or the workflow function) emitted, with their attempt (flowkeeper.steplogs).
    function logBlock(title, lines) {
      return el("div", { class: "logs" }, el("h3", { text: title }),
        el("pre", { class: "log-lines" }, lines.map((l) => el("div", { class: `log log-${l.level.toLowerCase()}` },
          el("span", { class: "dim", text: `${stamp(l.at)} ${l.attempt ? "#" + l.attempt + " " : ""}` }),
          el("b", { text: `${l.level} ` }), el("span", { class: "dim", text: `${l.logger} ` }), l.message))));
    }

    function waitDetail(step) {
      const w = (run.waits || []).find((x) => x.key === step.key);
      const label = w ? w.label : (step.input?.event || step.key);
      const until = w ? w.timeout_at : step.wake_at;
      const what = el("p", { class: "wait-what" }, "Waits for ", el("code", { text: label }),
        until ? ` until ${stamp(until)}` : " with no timeout");
      let how = null;
      if (w && w.outcome === "event" && w.event_number) {
        how = el("p", {}, "Resolved by ", eventLink(w.event_number, { class: "wait-event" }), ` at ${stamp(w.resolved_at)}`);
      } else if (w && w.outcome === "token") {
        how = el("p", { text: `The token was completed at ${stamp(w.resolved_at)}` });
      } else if (step.status === "timed_out") {
        how = el("p", { class: "muted", text: `Timed out at ${stamp(step.finished_at)}: the workflow got None` });
      }
      const received = step.status === "completed"
        ? el("div", { class: "io" }, el("h3", { text: w?.kind === "token" ? "Completed with" : "Event data" }),
          el("pre", { class: "json", text: pretty(step.output ?? null) }))
        : null;
      return el("div", { class: "wait-detail" }, what, how, received);
    }

    function toggle(key) {
      if (open.has(key)) open.delete(key); else open.add(key);
      renderSteps();
    }

    function focusStep(key) {
      if (!run.steps.some((s) => s.key === key)) return;
      open.add(key);
      stepFilter.text = "";
      stepFilter.failedOnly = false;
      renderSteps();
      const row = stepsCard.querySelector(`tr.step[data-key="${CSS.escape(key)}"]`);
      row?.scrollIntoView({ behavior: "smooth", block: "center" });
      row?.classList.add("flash");
    }

    function renderIO() {
      const box = (title, value, id) => el("div", { class: "card" }, el("h2", { text: title }),
        el("pre", { class: "json", id, text: value === null || value === undefined ? "null" : pretty(value) }));
      ioCard.replaceChildren(box("Input", run.input, "run-input"), box("Output", run.output, "run-output"));
    }

    function renderHistory() {
      const items = run.events.slice().reverse().map((e) => el("li", { class: `ev ev-${e.kind}` },
        el("time", { title: stamp(e.at), text: stamp(e.at) }),
        el("b", { text: e.kind.replace(/_/g, " ") }),
        e.step_key ? el("code", { text: e.step_key }) : null,
        e.attempt ? el("span", { class: "dim", text: `attempt ${e.attempt}` }) : null,
        el("span", { class: "dim", text: describeEvent(e) }),
        e.kind === "cancelled" && e.detail?.event_id ? eventLink(e.detail.event_id) : null));
      historyCard.replaceChildren(el("h2", { text: "History" }),
        items.length ? el("ul", { class: "history", id: "events" }, items) : el("p", { class: "muted", text: "Nothing but its steps so far." }));
    }

    function describeEvent(e) {
      const d = e.detail || {};
      switch (e.kind) {
        case "attempt_failed": return `${shortType(d.error?.type)}: ${d.error?.message || ""}${d.retry_in !== undefined ? ` · retry in ${duration(d.retry_in * 1000)}` : ""}`;
        case "replayed": case "retried":
          return `${d.from_step ? `from ${d.from_step}` : ""}${d.by ? ` · by ${d.by}` : ""}${d.reason ? ` · “${d.reason}”` : ""}${d.forgotten?.length ? ` · ran again: ${d.forgotten.join(", ")}` : ""}`;
        case "attempt_lost": return "the invocation ended during this attempt (process killed, out of memory, host time limit or os._exit); it counts as failed";
        case "throttled": return d.rate_limit
          ? `step waits for rate limit “${d.rate_limit}” · starts ${stamp(d.until)}`
          : `start throttled by ${(d.keys || []).join(", ")}${d.late ? " · woken late: a new start time" : ""} · starts ${stamp(d.until)}`;
        case "step_hung": return `a sync step overran its timeout of ${d.timeout}s; its thread is still running, and the next attempt waits until it returns`;
        case "stopped": return `${d.how || ""}${d.step ? ` (${d.step}, attempt ${d.attempt})` : ""}`;
        case "cancelled": return `${d.reason || ""}${d.stopping ? " · stopping the step that was executing" : ""}`;
        case "workflow_unknown": // an endpoint without the workflow deferred the run (a rolling deploy?)
          return d.failed ? (d.message || "")
            : `${d.message || `no workflow “${d.workflow}” on that endpoint`}${d.retry_at ? ` · tries again ${stamp(d.retry_at)}` : ""}${d.fails_at ? ` · fails after ${stamp(d.fails_at)}` : ""}${d.occurrences > 1 ? ` · ${d.occurrences}× since ${stamp(d.since)}` : ""}`;
        case "alert_sent": return `to ${(d.destinations || []).join(", ")}`;
        case "alert_failed": case "alert_abandoned": return Object.entries(d.errors || {}).map(([k, v]) => `${k}: ${v}`).join("; ");
        default: return Object.keys(d).length ? JSON.stringify(d).slice(0, 200) : "";
      }
    }

    // actions ---------------------------------------------------------------------
    async function replayFrom(key) {
      const steps = run.steps;
      const index = key ? steps.findIndex((s) => s.key === key) : steps.length;
      const again = key ? steps.length - index : 0;
      const kept = Math.max(0, index);
      const text = key
        ? `“${key}” and the ${again - 1} step${again - 1 === 1 ? "" : "s"} after it run again; the results of ${kept} earlier step${kept === 1 ? "" : "s"} are kept.`
        : "The run goes on after its recorded steps; nothing recorded runs again.";
      const answer = await confirmAction(key ? `Replay from “${key}”?` : "Resume this run?", text, key ? "Replay" : "Resume");
      if (!answer) return;
      if (await act(`/api/runs/${run.id}/replay`, { from_step: key, reason: answer.reason })) refresh();
    }

    // A new run with this run's history before the step; this run stays as it is.
    async function forkFrom(key) {
      const answer = await confirmAction(`Fork from “${key}”?`,
        `A new run starts with the results recorded before “${key}”; it runs “${key}” and every later step. This run is not changed.`, "Fork");
      if (!answer) return;
      const body = await act(`/api/runs/${run.id}/fork`, { from_step: key, reason: answer.reason });
      if (body && body.run_id) location.assign(`${BASE}/runs/${body.run_id}`);
    }

    async function retryNow() {
      const answer = await confirmAction("Retry now?", run.status === "failed"
        ? `The failed step${run.error?.step ? ` “${run.error.step}”` : ""} runs again now, and the run goes on from there.`
        : "The waiting step is retried now instead of after its backoff.", "Retry now");
      if (!answer) return;
      if (await act(`/api/runs/${run.id}/retry`, { reason: answer.reason })) refresh();
    }

    async function cancelRun() {
      const answer = await confirmAction("Cancel this run?", "A step executing right now is stopped (an async step is cancelled, a sync one is waited for) and nothing after it runs; a cancelled run can be replayed once it has stopped.", "Cancel run");
      if (!answer) return;
      if (await act(`/api/runs/${run.id}/cancel`, { reason: answer.reason })) refresh();
    }

    let etag = initial.version ? `"${initial.version}"` : null;
    // A poll and the refresh after an action can overlap.  An answer to an
    // older request that arrives last is dropped: shown, it would sit beside
    // the newer answer's ETag and the page would never fetch the run again.
    let asked = 0;
    let shown = 0;
    async function refresh() {
      const mine = ++asked;
      const response = await api(`/api/runs/${run.id}`, { headers: etag ? { "If-None-Match": etag } : {} });
      if (response.status === 304) {
        if (LIVE.has(run.status)) timeline.render(run.timeline, Date.now());
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const body = await response.json();
      if (mine < shown) return;
      shown = mine;
      etag = response.headers.get("etag");
      run = body;
      render();
    }

    // The run's stream (ctx.publish): read from a cursor, live while the run is.
    const streamList = el("ol", { class: "stream", id: "stream" });
    let streamCursor = 0;
    let streamDone = false;
    async function refreshStream() {
      if (streamDone) return;
      const response = await api(`/api/runs/${run.id}/stream?after=${streamCursor}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      for (const m of data.messages) {
        streamList.append(el("li", { class: `msg f-${m.finality}`, "data-cursor": String(m.cursor) },
          el("time", { title: stamp(m.at), text: stamp(m.at) }),
          el("b", { text: m.topic }),
          m.step ? el("code", { text: `${m.step} #${m.attempt}` }) : null,
          m.finality !== "final" ? el("span", { class: "dim", text: m.finality === "superseded" ? "attempt did not count" : "step running" }) : null,
          el("span", { class: "json", text: JSON.stringify(m.data) })));
      }
      streamCursor = data.cursor;
      if (streamList.children.length && streamCard.hidden) {
        streamCard.hidden = false;
        streamCard.replaceChildren(el("h2", { text: "Stream" }), streamList);
        streamList.lastElementChild?.scrollIntoView({ block: "nearest" });
      }
      if (data.finished && !data.messages.length) streamDone = true;
    }

    render();
    poll(refresh, 1500);
    poll(refreshStream, 1000);
  }

  // ================================================================================
  // Timeline: a time axis, one lane per step, one bar per attempt.  Lanes are
  // virtualised: only the rows in view are in the DOM, so 300 steps stay smooth.
  // ================================================================================
  function makeTimeline(card, onPick) {
    const ROW = 26;
    const MAX_VIEW = 440;
    const axis = el("div", { class: "tl-axis" });
    const viewport = el("div", { class: "tl-viewport", id: "timeline" });
    const spacer = el("div", { class: "tl-spacer" });
    const nowLine = el("div", { class: "tl-now", title: "now" });
    viewport.append(spacer);
    const legend = el("div", { class: "legend" },
      [["completed", "attempt ok"], ["failed", "attempt failed"], ["waiting", "retry backoff"],
        ["sleeping", "sleep"], ["wait", "wait for event / token"], ["running", "executing"]].map(([k, t]) => el("span", {}, el("i", { class: `sw o-${k}` }), t)));
    card.replaceChildren(el("div", { class: "tl-head" }, el("h2", { text: "Timeline" }), legend), axis, viewport);

    let model = null;
    let t0 = 0;
    let span = 1;
    let clientNow = null;
    let serverNow = 0;
    let lastNow = 0;

    const x = (t) => Math.max(0, Math.min(100, ((t - t0) / span) * 100));

    function render(timeline, browserNow) {
      model = timeline;
      serverNow = ms(timeline.now);
      // Between polls a live run's "now" moves with the browser clock.
      const now = browserNow && timeline.live ? serverNow + (browserNow - (clientNow ?? browserNow)) : serverNow;
      if (!browserNow) clientNow = Date.now();
      t0 = ms(timeline.start);
      const end = Math.max(ms(timeline.end), timeline.live ? now : 0);
      span = Math.max(1, end - t0);
      lastNow = now;
      renderAxis(now);
      spacer.style.height = `${timeline.lanes.length * ROW}px`;
      viewport.style.height = `${Math.min(MAX_VIEW, Math.max(ROW * 2, timeline.lanes.length * ROW + 4))}px`;
      paint(now);
    }

    function renderAxis(now) {
      const ticks = [];
      const step = niceStep(span / 6);
      for (let t = 0; t <= span + 1; t += step) {
        // The start as a short time (the full date is its tooltip): a long label overlaps the next.
        ticks.push(el("span", t === 0
          ? { class: "tick", title: stamp(model.start), text: new Date(model.start).toLocaleTimeString() }
          : { class: "tick", text: `+${duration(t)}` }));
        ticks[ticks.length - 1].style.left = `${x(t0 + t)}%`;
      }
      const markers = model.markers.map((m) => {
        const mark = el("span", { class: `marker m-${m.kind}`, title: `${m.kind.replace(/_/g, " ")}${m.step_key ? ` (${m.step_key})` : ""} · ${stamp(m.at)}` });
        mark.style.left = `${x(ms(m.at))}%`;
        return mark;
      });
      const track = el("div", { class: "tl-axis-track" }, ticks, markers);
      if (model.live) {
        const n = el("span", { class: "tick now", text: "now" });
        n.style.left = `${x(now)}%`;
        track.append(n);
      }
      axis.replaceChildren(el("div", { class: "tl-label" }), track);
      declutter(track);
    }

    // Hide axis labels that would overlap a label already shown ("now" first, then left to right).
    function declutter(track) {
      const all = [...track.querySelectorAll(".tick")];
      const order = [...all.filter((t) => t.classList.contains("now")), ...all.filter((t) => !t.classList.contains("now"))];
      const shown = [];
      for (const tick of order) {
        tick.style.visibility = "";
        const r = tick.getBoundingClientRect();
        if (shown.some((o) => r.left < o.right + 4 && o.left < r.right + 4)) tick.style.visibility = "hidden";
        else shown.push(r);
      }
    }

    function paint(now) {
      if (!model) return;
      const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - 5);
      const last = Math.min(model.lanes.length, Math.ceil((viewport.scrollTop + MAX_VIEW) / ROW) + 5);
      const rows = [];
      for (let i = first; i < last; i++) rows.push(lane(model.lanes[i], i, now));
      spacer.replaceChildren(...rows);
      if (model.live) {
        nowLine.style.left = `calc(var(--tl-label) + (100% - var(--tl-label)) * ${x(now) / 100})`;
        spacer.append(nowLine);
      }
    }

    function lane(l, i, now) {
      const track = el("div", { class: "tl-track" });
      for (const s of l.spans) {
        const start = ms(s.start);
        const end = s.end ? ms(s.end) : now;
        const cls = s.kind === "attempt" ? `o-${s.outcome}` : s.kind === "backoff" ? "o-waiting"
          : s.kind === "wait" ? `o-wait w-${s.outcome}` : s.kind === "sleep" ? `o-sleeping ${s.outcome === "completed" ? "done" : ""}` : "o-running";
        const label = [`${l.key}`, s.attempt ? `attempt ${s.attempt}` : s.kind, s.outcome, duration(end - start)];
        if (s.error) label.push(s.error);
        if (s.kind === "wait") {
          label.splice(1, 1, `waits for ${s.label}`);
          if (s.until) label.push(`until ${stamp(s.until)}`);
          if (s.event) label.push(`resolved by event #${s.event}`);
        }
        const bar = el("span", { class: `bar ${cls}`, title: label.join(" · "), dataset: { kind: s.kind, outcome: s.outcome } });
        bar.style.left = `${x(start)}%`;
        bar.style.width = `max(3px, ${x(end) - x(start)}%)`;
        track.append(bar);
        if (s.kind === "wait") track.append(waitCaption(s, start));
      }
      const row = el("div", { class: `tl-row s-${l.status}`, dataset: { key: l.key }, onclick: () => onPick(l.key) },
        el("div", { class: "tl-label mono", title: l.key, text: l.key }), track);
      row.style.top = `${i * ROW}px`;
      return row;
    }

    // What a wait awaits, written on its lane: left of its bar when the bar
    // starts far right, else from the bar's start; a resolved one links its event.
    function waitCaption(s, start) {
      const words = s.outcome === "waiting" ? "waiting for" : s.outcome === "timed_out" ? "timed out waiting for"
        : s.outcome === "completed" ? "received" : `${s.outcome} while waiting for`;
      const caption = el("span", { class: `wait-caption w-${s.outcome}`, dataset: { outcome: s.outcome } },
        `${words} `, el("code", { text: s.label || "" }),
        s.until && s.outcome === "waiting" ? ` until ${stamp(s.until)}` : null,
        s.event ? [" · ", eventLink(s.event, { class: "wait-event", onclick: (ev) => ev.stopPropagation() })] : null);
      const at = x(start);
      if (at > 55) { caption.style.right = `${100 - at}%`; caption.classList.add("before"); }
      else caption.style.left = `${at}%`;
      return caption;
    }

    viewport.addEventListener("scroll", () => requestAnimationFrame(() => paint(lastNow)));
    return { render };
  }

  function niceStep(raw) {
    const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3,
      120e3, 300e3, 600e3, 900e3, 1800e3, 3600e3, 7200e3, 21600e3, 43200e3, 86400e3, 172800e3, 604800e3];
    return steps.find((s) => s >= raw) || raw;
  }

  // ================================================================================
  // Events: the events sent, newest first, searchable by name and sender id;
  // each event's page shows its data and the runs it woke, started or cancelled.
  // ================================================================================
  function eventsPage(initial) {
    const params = new URLSearchParams(location.search);
    let data = initial;
    const problem = el("p", { class: "error", id: "list-error" });
    const table = el("table", { class: "runs", id: "event-list" });
    const pager = el("nav", { class: "pager", id: "pager" });
    const form = el("form", { class: "filters", method: "get", action: `${BASE}/events`, id: "event-filters" },
      el("label", {}, "Event name", el("input", {
        type: "search", name: "name", id: "f-name", value: params.get("name") || "", placeholder: "e.g. invoice.paid",
      })),
      el("label", { class: "grow" }, "Sender id", el("input", {
        type: "search", name: "id", id: "f-id", value: params.get("id") || "", placeholder: "the id given to send_event (exact)",
      })),
      el("button", { type: "submit", class: "primary", text: "Search" }));
    if (params.get("limit")) form.append(el("input", { type: "hidden", name: "limit", value: params.get("limit") }));
    form.addEventListener("submit", () => {
      for (const input of form.querySelectorAll("input")) if (!input.value) input.disabled = true;
    });
    app.replaceChildren(el("div", { class: "page-head" }, el("h1", { text: "Events" }),
      el("span", { class: "muted", text: "newest first" })), problem, form,
    el("div", { class: "card flush" }, table), pager);

    function link(overrides) {
      const next = new URLSearchParams(params);
      for (const [k, v] of Object.entries(overrides)) {
        if (v === null || v === "") next.delete(k); else next.set(k, v);
      }
      const qs = next.toString();
      return `${BASE}/events${qs ? `?${qs}` : ""}`;
    }

    function render() {
      problem.textContent = data.error || "";
      problem.hidden = !data.error;
      const head = el("thead", {}, el("tr", {},
        ["#", "Name", "Sender id", "Sent", "Sent by", "Woke", "Started", "Cancelled", "Data"].map((t, i) => el("th", { class: i >= 5 && i <= 7 ? "num" : null, text: t }))));
      const body = el("tbody");
      if (!data.events.length) {
        body.append(el("tr", {}, el("td", { colspan: 9, class: "empty", text: data.error ? "" : "No event matches." })));
      }
      const count = (n) => el("td", { class: `num ${n ? "" : "dim"}`, text: String(n) });
      for (const e of data.events) {
        body.append(el("tr", { class: "row event-row", dataset: { number: String(e.number) } },
          el("td", { class: "num" }, el("a", { href: `${BASE}/events/${e.number}`, text: `#${e.number}` })),
          el("td", { class: "mono" }, el("a", { href: `${BASE}/events/${e.number}`, text: e.name })),
          el("td", { class: "mono dim", text: e.event_id || "" }),
          el("td", {}, timeCell(e.sent_at)),
          el("td", {}, e.sent_by_run ? runLink(e.sent_by_run) : el("span", { class: "dim", text: "app" })),
          count(e.woke), count(e.started), count(e.cancelled),
          el("td", { class: "mono dim preview", title: e.preview, text: e.preview })));
      }
      table.replaceChildren(head, body);
      const parts = [];
      if (params.get("before")) parts.push(el("a", { href: link({ before: null }), class: "ghost-link", text: "« Newest" }));
      if (data.next_before) parts.push(el("a", { href: link({ before: data.next_before }), class: "ghost-link", id: "older", text: "Older »" }));
      pager.replaceChildren(...parts);
    }

    async function refresh() {
      const response = await api(`/api/events${location.search}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      data = await response.json();
      render();
    }

    render();
    // Only the newest page moves; older pages (and a refused filter) stay as they are.
    if (!params.get("before") && !data.error) poll(refresh, 3000);
  }

  function eventPage(initial) {
    const back = el("a", { href: `${BASE}/events`, class: "back", text: "← Events" });
    if (initial.missing) {
      app.replaceChildren(el("p", {}, back), el("h1", { text: "Event not found" }),
        el("p", { class: "muted", id: "event-missing", text: initial.missing }));
      return;
    }
    let ev = initial;
    const head = el("section", { class: "run-head" });
    const effectsCard = el("section", { class: "card flush", id: "effects-card" });
    const dataCard = el("section", { class: "card", id: "event-data-card" });
    app.replaceChildren(head, effectsCard, dataCard);
    const VERB = { woke: "woke", started: "started", cancelled: "cancelled" };

    function render() {
      document.title = `event #${ev.number} ${ev.name} · flowkeeper`;
      const facts = [
        ["Number", el("span", { class: "mono", id: "event-number", text: `#${ev.number}` })],
        ["Sender id", el("span", { class: "mono", text: ev.event_id || "–" })],
        ["Sent", el("span", { title: stamp(ev.sent_at), text: `${stamp(ev.sent_at)} (${ago(ev.sent_at)})` })],
        ["Sent by", ev.sent_by_run ? el("span", { id: "sent-by" }, "run ", runLink(ev.sent_by_run))
          : el("span", { class: "dim", text: "application code (fk.send_event)" })],
        ["Effect", el("span", { text: `woke ${ev.woke} · started ${ev.started} · cancelled ${ev.cancelled}` })],
      ];
      head.replaceChildren(back, el("div", { class: "title-row" },
        el("h1", {}, el("span", { class: "muted", text: `Event #${ev.number} ` }), el("span", { class: "mono", id: "event-name", text: ev.name }))),
      el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", {}, v)))));

      const body = el("tbody");
      for (const x of ev.effects) {
        body.append(el("tr", { class: `row effect e-${x.outcome}`, dataset: { run: x.run_id, outcome: x.outcome } },
          el("td", {}, el("span", { class: `verb v-${x.outcome}`, text: VERB[x.outcome] || x.outcome })),
          el("td", {}, runLink(x.run_id)),
          el("td", { text: x.workflow }),
          el("td", {}, badge(x.status)),
          el("td", { class: "mono dim", text: x.wait || "" }),
          el("td", {}, timeCell(x.at))));
      }
      if (!ev.effects.length) {
        body.append(el("tr", {}, el("td", { colspan: 6, class: "empty", text: "It woke, started and cancelled no run." })));
      }
      effectsCard.replaceChildren(el("div", { class: "steps-bar" }, el("h2", { text: "Runs it woke, started or cancelled" })),
        el("table", { class: "runs", id: "effects" }, el("thead", {}, el("tr", {},
          ["What", "Run", "Workflow", "Status now", "Wait / rule", "When"].map((t) => el("th", { text: t })))), body));
      dataCard.replaceChildren(el("h2", { text: "Data" }), el("pre", { class: "json", id: "event-data", text: pretty(ev.data ?? null) }));
    }

    async function refresh() {
      const response = await api(`/api/events/${ev.number}`);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      ev = await response.json();
      render();
    }

    render();
    poll(refresh, 3000);
  }

  // schedules, concurrency keys, storage -----------------------------------------------
  function bytes(n) {
    let size = n;
    for (const unit of ["B", "kB", "MB", "GB"]) {
      if (size < 1024 || unit === "GB") return unit === "B" ? `${size} B` : `${size.toFixed(1)} ${unit}`;
      size /= 1024;
    }
    return `${n} B`;
  }

  function schedulesPage(initial) {
    let page = initial;
    const schedCard = el("section", { class: "card flush", id: "schedules-card" });
    const keysCard = el("section", { class: "card flush", id: "keys-card" });
    const storageCard = el("section", { class: "card flush", id: "storage-card" });
    app.replaceChildren(el("h1", { text: "Schedules" }), schedCard, keysCard, storageCard);

    async function action(workflow, what) {
      if (await act(`/api/schedules/${encodeURIComponent(workflow)}/${what}`, {})) refresh();
    }

    function render() {
      const body = el("tbody");
      for (const s of page.schedules) {
        const buttons = el("td", { class: "actions" });
        if (s.state === "active") buttons.append(el("button", { class: "ghost", dataset: { action: "pause" }, onclick: () => action(s.workflow, "pause"), text: "Pause" }));
        if (s.state === "paused") buttons.append(el("button", { class: "ghost", dataset: { action: "resume" }, onclick: () => action(s.workflow, "resume"), text: "Resume" }));
        if (s.state !== "removed") buttons.append(el("button", { class: "ghost", dataset: { action: "run-now" }, onclick: () => action(s.workflow, "run-now"), text: "Run now" }));
        body.append(el("tr", { class: "row schedule", dataset: { workflow: s.workflow, state: s.state } },
          el("td", {}, el("a", { href: `${BASE}/?workflow=${encodeURIComponent(s.workflow)}`, text: s.workflow })),
          el("td", {}, el("code", { text: s.cron })),
          el("td", { text: s.timezone }),
          el("td", {}, el("span", { class: `badge st-${s.state}`, text: s.state })),
          el("td", { title: s.next_at || "", text: s.next_at ? `${stamp(s.next_at)} (${ago(s.next_at)})` : "–" }),
          el("td", {}, s.last_run ? [runLink(s.last_run), " ", s.last_status ? badge(s.last_status) : null] : "–"),
          el("td", { text: `${s.fired} fired · ${s.skipped} skipped · catch-up ${s.catch_up}` }),
          buttons));
      }
      if (!page.schedules.length) body.append(el("tr", {}, el("td", { colspan: 8, class: "empty", text: "No schedules. Declare one with @fk.workflow(..., cron=\"0 9 * * *\"); it is written when the app starts." })));
      schedCard.replaceChildren(el("div", { class: "steps-bar" }, el("h2", { text: "Cron schedules" })),
        el("table", { class: "runs", id: "schedules" }, el("thead", {}, el("tr", {},
          ["Workflow", "Cron", "Time zone", "State", "Next slot", "Last run", "Slots", ""].map((t) => el("th", { text: t })))), body));

      const keys = el("tbody");
      for (const k of page.keys) {
        keys.append(el("tr", { class: "row key", dataset: { key: k.key } },
          el("td", {}, el("code", { text: k.key })),
          el("td", { text: `${k.held} / ${k.limit ?? "?"}` }),
          el("td", { text: String(k.parked) })));
      }
      if (!page.keys.length) keys.append(el("tr", {}, el("td", { colspan: 3, class: "empty", text: "No concurrency key holds a slot or has runs waiting." })));
      keysCard.replaceChildren(el("div", { class: "steps-bar" }, el("h2", { text: "Concurrency keys" })),
        el("table", { class: "runs", id: "keys" }, el("thead", {}, el("tr", {},
          ["Key", "Slots held / limit", "Runs waiting"].map((t) => el("th", { text: t })))), keys));

      const st = page.storage;
      const tables = el("tbody");
      for (const t of st.tables) {
        tables.append(el("tr", { class: "row table", dataset: { table: t.name } },
          el("td", {}, el("code", { text: t.name })),
          el("td", { text: t.estimated ? `~${t.rows}` : String(t.rows) }),
          el("td", { text: bytes(t.bytes) })));
      }
      storageCard.replaceChildren(el("div", { class: "steps-bar" },
        el("h2", {}, "Storage ", el("span", { class: "muted", id: "schema-size", text: `schema ${st.schema}: ${bytes(st.bytes)} on disk` }))),
        el("table", { class: "runs", id: "tables" }, el("thead", {}, el("tr", {},
          ["Table", "Rows", "Size (with indexes)"].map((t) => el("th", { text: t })))), tables));
    }

    async function refresh() {
      const response = await api("/api/schedules");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      page = await response.json();
      render();
    }

    render();
    poll(refresh, 5000);
  }

  // ================================================================================
  const data = JSON.parse(document.getElementById("fk-data").textContent);
  if (PAGE === "runs") runsPage(data);
  else if (PAGE === "run") runPage(data);
  else if (PAGE === "events") eventsPage(data);
  else if (PAGE === "event") eventPage(data);
  else if (PAGE === "schedules") schedulesPage(data);
})();
