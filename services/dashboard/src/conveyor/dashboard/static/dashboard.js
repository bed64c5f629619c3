// Conveyor dashboard: confirmations and JSON POSTs for actions, the payload on request, live job
// progress over Server-Sent Events, and the throughput chart. No build step, nothing from elsewhere.
"use strict";

function flash(text, isError) {
  const box = document.getElementById("flash");
  box.textContent = text;
  box.className = isError ? "error" : "ok";
  box.hidden = false;
}

// The headers of every POST: JSON, and the session's CSRF token when the dashboard has sign-in.
function postHeaders() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const headers = { "Content-Type": "application/json" };
  if (meta) headers["X-CSRF-Token"] = meta.content;
  return headers;
}

// The services no longer accept the signed-in token (or the session ended): back to the sign-in page.
function signedOut(response, answer) {
  if (response.status !== 401 || !answer.login) return false;
  location.assign(`${answer.login}?${new URLSearchParams({ next: location.pathname + location.search, expired: "1" })}`);
  return true;
}

function confirmStep(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

async function post(button) {
  if (button.dataset.confirm && !(await confirmStep(button.dataset.confirm))) return;
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.post, {
      method: "POST",
      headers: postHeaders(),
      body: button.dataset.body || "{}",
    });
    const answer = await response.json().catch(() => ({}));
    if (signedOut(response, answer)) return;
    if (!response.ok) {
      flash(`${answer.code || response.status}: ${answer.error || response.statusText}`, true);
      button.disabled = false;
      return;
    }
    sessionStorage.setItem("conveyor-flash", `${button.textContent.trim()}: done ${JSON.stringify(answer)}`);
    location.reload();
  } catch (err) {
    flash(`request failed: ${err}`, true);
    button.disabled = false;
  }
}

// A form sent as a JSON POST (schedule edit, limits): its fields as strings, asked first when data-confirm.
async function postForm(form) {
  if (form.dataset.confirm && !(await confirmStep(form.dataset.confirm))) return;
  const body = Object.fromEntries(new FormData(form));
  const submit = form.querySelector("button[type=submit]");
  submit.disabled = true;
  try {
    const response = await fetch(form.dataset.post, {
      method: "POST",
      headers: postHeaders(),
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (signedOut(response, answer)) return;
    if (!response.ok) {
      flash(`${answer.code || response.status}: ${answer.error || response.statusText}`, true);
      return;
    }
    sessionStorage.setItem("conveyor-flash", `${submit.textContent.trim()}: done ${JSON.stringify(answer)}`);
    if (form.dataset.next) location.assign(form.dataset.next);
    else location.reload();
  } catch (err) {
    flash(`request failed: ${err}`, true);
  } finally {
    submit.disabled = false;
  }
}

// ---- bulk actions on the jobs page -------------------------------------------------------------

const BULK_VERBS = {
  retry: { verb: "Retry", note: "Only dead-lettered and failed jobs are retried; the others are refused." },
  cancel: { verb: "Cancel", note: "Finished jobs are refused." },
  delete: { verb: "Delete", note: "Their history is deleted for good; jobs not finished are refused." },
};

function selectedJobs() {
  return [...document.querySelectorAll("input.select-job:checked")].map((box) => box.value);
}

function countSelected() {
  setText("selected-count", String(selectedJobs().length));
}

function bulkSummary(answer) {
  const { verb } = BULK_VERBS[answer.action];
  let text = `${verb}: ${answer.succeeded} of ${answer.matched} done, ${answer.refused} refused`;
  const reasons = Object.entries(answer.reasons).map(([reason, n]) => `${n} × ${reason}`);
  if (reasons.length) text += ` (${reasons.join("; ")})`;
  if (answer.more) text += `. More jobs match than the ${answer.matched} one action takes: run it again for the rest.`;
  return text;
}

async function bulk(button, bar) {
  const action = button.dataset.action;
  const { verb, note } = BULK_VERBS[action];
  const filter = JSON.parse(bar.dataset.filter);
  let body;
  let question;
  if (button.dataset.scope === "selected") {
    const ids = selectedJobs();
    if (!ids.length) {
      flash("Select jobs first (the boxes on the left), or use the buttons for everything the filter matches.", true);
      return;
    }
    body = { job_ids: ids };
    question = `${verb} the ${ids.length} selected job${ids.length === 1 ? "" : "s"}? ${note}`;
  } else {
    const response = await fetch(`/api/jobs/count?${new URLSearchParams(filter)}`);
    const count = await response.json().catch(() => ({}));
    if (!response.ok) {
      flash(`${count.code || response.status}: ${count.error || response.statusText}`, true);
      return;
    }
    if (!count.count) {
      flash("No job matches this filter: nothing to do.", true);
      return;
    }
    body = { filter };
    question = count.more
      ? `${verb} the newest ${count.count} of more than ${count.count} matching jobs (${count.cap} per action)? ${note}`
      : `${verb} all ${count.count} matching job${count.count === 1 ? "" : "s"}? ${note}`;
  }
  if (!(await confirmStep(question))) return;
  for (const b of bar.querySelectorAll("button")) b.disabled = true;
  try {
    const response = await fetch(`/jobs/bulk/${action}`, {
      method: "POST",
      headers: postHeaders(),
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (signedOut(response, answer)) return;
    if (!response.ok) {
      flash(`${answer.code || response.status}: ${answer.error || response.statusText}`, true);
      return;
    }
    sessionStorage.setItem("conveyor-flash", bulkSummary(answer));
    sessionStorage.setItem("conveyor-bulk", JSON.stringify(answer, null, 2));
    location.reload();
  } catch (err) {
    flash(`request failed: ${err}`, true);
  } finally {
    for (const b of bar.querySelectorAll("button")) b.disabled = false;
  }
}

function setupBulk(bar) {
  for (const button of bar.querySelectorAll("button.bulk-action")) button.addEventListener("click", () => bulk(button, bar));
  for (const box of document.querySelectorAll("input.select-job")) box.addEventListener("change", countSelected);
  const all = document.getElementById("select-page");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll("input.select-job")) box.checked = all.checked;
      countSelected();
    });
  }
  const last = sessionStorage.getItem("conveyor-bulk");
  if (last) {
    sessionStorage.removeItem("conveyor-bulk");
    const box = document.getElementById("bulk-result");
    box.textContent = last;
    box.hidden = false;
  }
}

function setText(id, text) {
  const el = document.getElementById(id);
  if (el) el.textContent = text;
}

function detail(e) {
  if (e.progress) return `${e.progress.percent}% ${e.progress.message}`;
  if (e.error) return `${e.error.kind}: ${e.error.message}`;
  if (e.result) return e.result;
  if (e.next_run_at) return `next run ${e.next_run_at}`;
  return "";
}

function showEvent(e) {
  const body = document.querySelector("#timeline tbody");
  if (body && !body.querySelector(`tr[data-event-id="${CSS.escape(e.id)}"]`)) {
    const row = body.insertRow();
    row.dataset.eventId = e.id;
    row.dataset.type = e.type;
    for (const text of [e.time, e.type, String(e.attempt), e.worker, detail(e)]) row.insertCell().textContent = text;
  }
  const state = document.getElementById("job-state");
  if (state && e.state) {
    state.textContent = e.state;
    state.className = `state state-${e.state.toLowerCase()}`;
  }
  setText("job-attempt", String(e.attempt));
  if (e.type === "ACTIVE") {
    setText("job-started", e.time);
    setText("job-worker", e.worker);
  }
  const bar = document.getElementById("job-progress");
  if (e.progress) {
    bar.value = e.progress.percent;
    setText("job-progress-text", `${e.progress.percent}%`);
    setText("job-progress-message", e.progress.message);
  }
  if (e.type === "SUCCEEDED") bar.value = 100;
  if (e.result) {
    const result = document.getElementById("job-result");
    result.textContent = e.result;
    result.hidden = false;
  }
  if (e.error) {
    const error = document.getElementById("job-error");
    error.textContent = `${e.error.kind}: ${e.error.message}`;
    error.hidden = false;
  }
  if (e.final) {
    setText("job-finished", e.time);
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.remove();
  }
}

function watchJob(live) {
  // A finished job is watched only to replay a timeline the results service could not give.
  if (live.dataset.final === "true" && live.dataset.replay !== "true") return;
  const source = new EventSource(`/api/watch/${encodeURI(live.dataset.jobId)}`);
  live.dataset.watching = "true";
  source.onmessage = (message) => {
    const e = JSON.parse(message.data);
    showEvent(e);
    if (e.final) {
      live.dataset.final = "true";
      source.close();
    }
  };
  source.addEventListener("end", () => source.close());
  source.addEventListener("failure", (message) => {
    const answer = JSON.parse(message.data);
    flash(`live updates stopped: ${answer.code}: ${answer.error}`, true);
    source.close();
  });
}

async function showPayload(button) {
  const response = await fetch(button.dataset.url);
  const answer = await response.json();
  const box = document.getElementById("payload");
  box.textContent = response.ok ? JSON.stringify(answer.payload, null, 2) : `${answer.code}: ${answer.error}`;
  box.hidden = false;
  button.hidden = true;
}

function drawThroughput(canvas) {
  if (typeof Chart === "undefined") return;
  const windows = JSON.parse(canvas.dataset.windows);
  const outcome = (label, key, color) => ({ label, data: windows.map((w) => w[key]), backgroundColor: color });
  new Chart(canvas, {
    type: "bar",
    data: {
      labels: windows.map((w) => `last ${w.window}`),
      datasets: [
        outcome("succeeded", "succeeded", "#2e7d32"),
        outcome("failed", "failed", "#c62828"),
        outcome("dead-lettered", "dead_lettered", "#6a1b9a"),
        outcome("cancelled", "cancelled", "#757575"),
      ],
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      plugins: { title: { display: true, text: "Finished jobs per window" } },
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
    },
  });
  canvas.dataset.drawn = "true";
}

function chartOptions(title, stacked, unit) {
  return {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    plugins: { title: { display: true, text: title } },
    scales: {
      x: { stacked, ticks: { maxTicksLimit: 12 } },
      y: { stacked, beginAtZero: true, title: { display: Boolean(unit), text: unit } },
    },
  };
}

function drawSeries(throughput, latency) {
  if (typeof Chart === "undefined") return;
  const series = JSON.parse(throughput.dataset.series);
  const bars = (label, key, color) => ({ label, data: series[key], backgroundColor: color });
  new Chart(throughput, {
    type: "bar",
    data: {
      labels: series.labels,
      datasets: [
        bars("succeeded", "succeeded", "#2e7d32"),
        bars("failed", "failed", "#c62828"),
        bars("dead-lettered", "dead_lettered", "#6a1b9a"),
        bars("cancelled", "cancelled", "#757575"),
      ],
    },
    options: chartOptions(`Finished per ${series.bucket} (UTC)`, true, "jobs"),
  });
  const line = (label, key, color, dash) => ({
    label, data: series[key], borderColor: color, backgroundColor: color, borderDash: dash, pointRadius: 0, tension: 0.2,
  });
  new Chart(latency, {
    type: "line",
    data: {
      labels: series.labels,
      datasets: [
        line("wait p50", "wait_p50", "#1f5fbf", []),
        line("wait p95", "wait_p95", "#1f5fbf", [6, 4]),
        line("run p50", "run_p50", "#e65100", []),
        line("run p95", "run_p95", "#e65100", [6, 4]),
      ],
    },
    options: chartOptions("Wait (enqueue to start) and run time", false, "seconds"),
  });
  for (const canvas of [throughput, latency]) {
    canvas.dataset.drawn = "true";
    canvas.dataset.window = series.window;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const message = sessionStorage.getItem("conveyor-flash");
  if (message) {
    sessionStorage.removeItem("conveyor-flash");
    flash(message, false);
  }
  for (const button of document.querySelectorAll("button[data-post]")) button.addEventListener("click", () => post(button));
  for (const form of document.querySelectorAll("form[data-post]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      postForm(form);
    });
  }
  const payload = document.getElementById("show-payload");
  if (payload) payload.addEventListener("click", () => showPayload(payload));
  const live = document.getElementById("live");
  if (live) watchJob(live);
  const bar = document.getElementById("bulk");
  if (bar) setupBulk(bar);
});

window.addEventListener("load", () => {
  const canvas = document.getElementById("throughput");
  if (canvas) drawThroughput(canvas);
  const throughput = document.getElementById("throughput-chart");
  if (throughput) drawSeries(throughput, document.getElementById("latency-chart"));
});
