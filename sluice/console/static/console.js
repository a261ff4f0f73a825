/* sluice console: the live figures of the overview and pipeline pages.
 * Reads the server's event stream (/ui/live: one "history" event, then a "tick" a second),
 * keeps each pipeline's series in window.sluiceConsole.series (columns: t, rate_per_s,
 * in_flight, limit, backlog, error_share, p50_ms, p99_ms, paused), updates the table's cells and
 * draws the small charts with uPlot (vendored, no CDN). */
(function () {
  "use strict";
  var host = document.querySelector("[data-live]");
  if (!host || typeof EventSource === "undefined") { return; }
  var KEEP = 300;
  var FIELDS = ["t", "rate_per_s", "in_flight", "limit", "backlog", "error_share", "p50_ms", "p99_ms", "paused"];
  var state = { series: {}, ticks: 0, connected: false };
  window.sluiceConsole = state;
  var charts = [];  // {el, name, kind, plot}
  var statusEl = document.querySelector("[data-live-state]");

  function fmt(field, v) {
    if (v === null || v === undefined) { return "\u2014"; }
    if (field === "rate_per_s") { return v.toLocaleString("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 }); }
    if (field === "error_share") { return (v * 100).toFixed(1) + "%"; }
    if (field === "p50_ms" || field === "p99_ms") { return Math.round(v).toLocaleString("en-US") + " ms"; }
    return Math.round(v).toLocaleString("en-US");
  }

  function columns(name, kind) {
    var s = state.series[name];
    if (!s) { return null; }
    if (kind === "rate") { return [s.t, s.rate_per_s]; }
    if (kind === "concurrency") { return [s.t, s.limit, s.in_flight]; }
    return [s.t, s.p50_ms, s.p99_ms];
  }

  var LINES = {
    rate: [{ label: "done/s", stroke: "#1f6feb", width: 1.5, fill: "rgba(31,111,235,0.10)" }],
    concurrency: [{ label: "limit", stroke: "#d97706", width: 1.5 },
                  { label: "in flight", stroke: "#1f6feb", width: 1, fill: "rgba(31,111,235,0.08)" }],
    latency: [{ label: "p50 ms", stroke: "#0e9f6e", width: 1.5 },
              { label: "p99 ms", stroke: "#9333ea", width: 1.5 }]
  };

  function makeChart(el) {
    var name = el.getAttribute("data-pipeline");
    var kind = el.getAttribute("data-chart");
    var data = columns(name, kind);
    if (!data) { return null; }
    var axis = { stroke: "#667085", size: 36, font: "11px system-ui, sans-serif",
                 grid: { stroke: "#eef0f3", width: 1 }, ticks: { show: false } };
    var opts = {
      width: Math.max(120, el.clientWidth), height: el.clientHeight || 130,
      legend: { show: false }, cursor: { show: false }, select: { show: false },
      padding: [6, 6, 0, 0],
      scales: { x: { time: true }, y: { range: function (u, lo, hi) { return [0, Math.max(1, hi * 1.15)]; } } },
      axes: [Object.assign({}, axis, { size: 24, space: 70, values: function (u, splits) {
                return splits.map(function (v) { return new Date(v * 1000).toISOString().substr(11, 8); });
              } }),
             Object.assign({}, axis, { size: 42 })],
      series: [{}].concat(LINES[kind].map(function (l) { return Object.assign({ points: { show: false }, spanGaps: false }, l); }))
    };
    var plot = new uPlot(opts, data, el);
    return { el: el, name: name, kind: kind, plot: plot };
  }

  function drawAll() {
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      var found = charts.find(function (c) { return c.el === el; });
      if (found) {
        var data = columns(found.name, found.kind);
        if (data) { found.plot.setData(data); }
      } else if (typeof uPlot !== "undefined") {
        var made = makeChart(el);
        if (made) { charts.push(made); }
      }
    });
  }

  function updateCells(name, point) {
    document.querySelectorAll('[data-live-field][data-pipeline="' + CSS.escape(name) + '"]').forEach(function (el) {
      el.textContent = fmt(el.getAttribute("data-live-field"), point[el.getAttribute("data-live-field")]);
    });
  }

  function setStatus(text, on) {
    if (!statusEl) { return; }
    statusEl.textContent = text;
    statusEl.className = "live-state " + (on ? "on" : "off");
  }

  var source = new EventSource(host.getAttribute("data-live"));
  source.addEventListener("history", function (e) {
    var data = JSON.parse(e.data);
    state.series = data.series;
    state.connected = true;
    setStatus("live", true);
    drawAll();
  });
  source.addEventListener("tick", function (e) {
    var tick = JSON.parse(e.data);
    state.ticks += 1;
    Object.keys(tick).forEach(function (name) {
      var point = tick[name];
      var s = state.series[name];
      if (!s) {
        s = state.series[name] = {};
        FIELDS.forEach(function (f) { s[f] = []; });
      }
      FIELDS.forEach(function (f) {
        s[f].push(point[f] === undefined ? null : point[f]);
        if (s[f].length > KEEP) { s[f].shift(); }
      });
      updateCells(name, point);
    });
    drawAll();
  });
  source.addEventListener("error", function () {
    state.connected = false;
    setStatus("reconnecting\u2026", false);
  });
  window.addEventListener("beforeunload", function () { source.close(); });

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      charts.forEach(function (c) { c.plot.setSize({ width: Math.max(120, c.el.clientWidth), height: c.el.clientHeight || 130 }); });
    }, 100);
  });
}());
