// The explorer: asks the service's JSON API (relative URLs, so it also works behind a proxy's path prefix) and
// draws its answers. Plain DOM and SVG; every label is inserted as text, never as HTML.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 720;
  const HEIGHT = 460;
  const NODE = 15; // node radius
  let perQuestion = 10; // predictions asked per question: 10, or every entity of a smaller index

  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  };
  const signed = (x) => (x > 0 ? "+" : "") + Number(x).toPrecision(3);
  const spaced = (t) => `${t.head} ${t.relation} ${t.tail}`;
  const value = (selector) => $(selector).value.trim();

  // ------------------------------------------------------------------ talking to the service

  function showError(message) {
    const box = $("#error");
    box.textContent = message;
    box.hidden = false;
  }

  function clearError() {
    const box = $("#error");
    box.textContent = "";
    box.hidden = true;
  }

  async function api(path, body) {
    const init = body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    };
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new Error(`the service did not answer (${err.message})`);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (data && data.build) $("#build").textContent = data.build;
    if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
    return data;
  }

  // one user action: its error, if any, goes to the error area
  async function act(task) {
    clearError();
    document.body.classList.add("busy");
    try {
      await task();
    } catch (err) {
      showError(err.message);
    } finally {
      document.body.classList.remove("busy");
    }
  }

  // ------------------------------------------------------------------ label completion

  function fill(list, labels) {
    list.replaceChildren(...labels.map((label) => {
      const option = document.createElement("option");
      option.value = label;
      return option;
    }));
  }

  async function complete(kind, prefix, list, limit) {
    try {
      const data = await api(`api/labels?kind=${kind}&prefix=${encodeURIComponent(prefix)}&limit=${limit}`);
      fill(list, data.labels);
    } catch (err) {
      // completion only helps: a wrong label is reported when the form is sent
    }
  }

  function completer(input, kind, list) {
    let timer = null;
    input.addEventListener("input", () => {
      clearTimeout(timer);
      const prefix = input.value.trim();
      if (prefix === "?") return;
      timer = setTimeout(() => complete(kind, prefix, list, 20), 120);
    });
  }

  // ------------------------------------------------------------------ predictions

  function questionOf(head, relation, tail) {
    return { head: head || "?", relation, tail: tail || "?" };
  }

  function showPredictions(question, predictions) {
    const list = $("#predictions");
    list.replaceChildren();
    $("#question").textContent = spaced(question);
    $("#predictions-empty").hidden = predictions.length > 0;
    if (!predictions.length) $("#predictions-empty").textContent = "The model has no prediction here.";
    for (const p of predictions) {
      const li = el("li");
      li.dataset.label = p.label;
      li.dataset.rank = p.rank;
      li.append(el("span", "label", p.label), el("span", "score", Number(p.score).toPrecision(4)));
      li.title = `rank ${p.rank}, score ${p.score}`;
      li.addEventListener("click", () => act(async () => {
        for (const other of list.children) other.classList.remove("active");
        li.classList.add("active");
        const target = p.target || (question.tail === "?" ? "tail" : "head");
        const triple = target === "tail" ? { ...question, tail: p.label } : { ...question, head: p.label };
        await influence(triple, p);
      }));
      list.append(li);
    }
  }

  // ------------------------------------------------------------------ influence: bars and graph

  async function influence(triple, prediction) {
    const k = Number($("#k").value) || 10;
    const body = { triples: [[triple.head, triple.relation, triple.tail].join("\t")], k, mode: $("#mode").value };
    const data = await api("api/query", body);
    showInfluence(data.results[0], prediction);
  }

  function showInfluence(result, prediction) {
    let pros = result.proponents || [];
    let opps = result.opponents || [];
    if (result.top) { // abs mode: one list, split by sign
      pros = result.top.filter((i) => i.influence > 0);
      opps = result.top.filter((i) => i.influence < 0);
    }
    const max = Math.max(1e-300, ...pros.concat(opps).map((i) => Math.abs(i.influence)));
    let title = spaced(result.test);
    if (prediction) title += `  (prediction ${prediction.rank}, score ${Number(prediction.score).toPrecision(4)})`;
    $("#test-triple").textContent = title;
    bars($("#proponents"), pros, "proponent", max);
    bars($("#opponents"), opps, "opponent", max);
    drawGraph(result.test, pros, opps, max);
  }

  function bars(box, items, kind, max) {
    box.replaceChildren();
    if (!items.length) {
      box.append(el("div", "none", `no ${kind}s`));
      return;
    }
    for (const i of items) {
      const row = el("div", `row ${kind}`);
      const label = el("span", "triple", spaced(i));
      label.title = `${spaced(i)}  (training triple #${i.train_index})`;
      const track = el("div", "track");
      const bar = el("div", `bar ${kind}`);
      bar.style.width = `${((100 * Math.abs(i.influence)) / max).toFixed(2)}%`;
      bar.title = signed(i.influence);
      track.append(bar);
      row.append(label, track, el("span", "value", signed(i.influence)));
      box.append(row);
    }
  }

  function marker(defs, kind) {
    const m = svgEl("marker", {
      id: `arrow-${kind}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 9, markerHeight: 9,
      markerUnits: "userSpaceOnUse", orient: "auto",
    });
    m.append(svgEl("path", { d: "M0,0 L10,5 L0,10 z", class: `arrow ${kind}` }));
    defs.append(m);
  }

  // entity nodes on a circle (the test triple's head on the left, its tail on the right), one edge per triple
  function drawGraph(test, pros, opps, max) {
    const svg = $("#graph");
    svg.replaceChildren();
    const defs = svgEl("defs");
    for (const kind of ["test", "proponent", "opponent"]) marker(defs, kind);
    svg.append(defs);
    const colours = { test: "#0969da", proponent: "#1a7f37", opponent: "#cf222e" };
    for (const path of defs.querySelectorAll("path")) {
      path.setAttribute("fill", colours[path.getAttribute("class").split(" ")[1]]);
    }

    const triples = [{ ...test, kind: "test" }]
      .concat(pros.map((i) => ({ ...i, kind: "proponent" })), opps.map((i) => ({ ...i, kind: "opponent" })));
    const others = [];
    for (const t of triples) {
      for (const name of [t.head, t.tail]) {
        if (name !== test.head && name !== test.tail && !others.includes(name)) others.push(name);
      }
    }
    const half = Math.ceil(others.length / 2);
    const order = [test.head, ...others.slice(0, half)];
    if (test.tail !== test.head) order.push(test.tail);
    order.push(...others.slice(half));

    const cx = WIDTH / 2;
    const cy = HEIGHT / 2;
    const rx = WIDTH / 2 - 120; // an ellipse: room for the labels at the left and right ends
    const ry = HEIGHT / 2 - 50;
    const place = new Map();
    const tailAt = order.indexOf(test.tail);
    order.forEach((name, i) => {
      // the tail sits opposite the head: the nodes before it fill the upper arc, those after it the lower one
      let angle;
      if (order.length === 1) angle = null;
      else if (i <= tailAt) angle = Math.PI + (Math.PI * i) / Math.max(1, tailAt);
      else angle = (Math.PI * (i - tailAt)) / (order.length - tailAt);
      const x = angle === null ? cx : cx + rx * Math.cos(angle);
      const y = angle === null ? cy : cy + ry * Math.sin(angle);
      place.set(name, { x, y, angle });
    });

    // edges between the same two nodes fan out; each gets its own bend
    const pairs = new Map();
    for (const t of triples) {
      const key = [t.head, t.tail].sort().join("\u0000");
      if (!pairs.has(key)) pairs.set(key, []);
      pairs.get(key).push(t);
    }
    const drawn = [];
    for (const group of pairs.values()) {
      group.forEach((t, j) => drawn.push({ t, j, m: group.length }));
    }
    drawn.sort((a, b) => (a.t.kind === "test") - (b.t.kind === "test")); // the test edge on top
    const edges = svgEl("g", { class: "edges" });
    for (const { t, j, m } of drawn) edges.append(edge(t, j, m, place, cx, cy, max));
    svg.append(edges);

    const nodes = svgEl("g", { class: "nodes" });
    for (const name of order) {
      const { x, y, angle } = place.get(name);
      const focus = name === test.head || name === test.tail;
      const g = svgEl("g", { class: focus ? "node focus" : "node", transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` });
      g.dataset.label = name;
      const title = svgEl("title");
      title.textContent = name;
      g.append(title, svgEl("circle", { r: NODE }));
      const cos = angle === null ? 0 : Math.cos(angle);
      const sin = angle === null ? 1 : Math.sin(angle);
      // the label outside the circle: beside it on the left and right, above or below it at the top and bottom
      const side = Math.abs(cos) >= 0.3;
      const text = svgEl("text", {
        x: (cos * (NODE + 5)).toFixed(1),
        y: (side ? sin * (NODE + 5) + 4 : sin * (NODE + 10) + (sin > 0 ? 8 : 0)).toFixed(1),
        "text-anchor": cos > 0.3 ? "start" : cos < -0.3 ? "end" : "middle",
      });
      text.textContent = name;
      g.append(text);
      nodes.append(g);
    }
    svg.append(nodes);
  }

  function edge(t, j, m, place, cx, cy, max) {
    const a = place.get(t.head);
    const b = place.get(t.tail);
    const width = t.kind === "test" ? 3.5 : 1.2 + (3.3 * Math.abs(t.influence)) / max;
    let d;
    let mid;
    if (t.head === t.tail) {
      // a loop pointing away from the centre, larger for each further loop on the node
      let ux = a.x - cx;
      let uy = a.y - cy;
      const n = Math.hypot(ux, uy) || 1;
      [ux, uy] = n === 1 && ux === 0 && uy === 0 ? [0, -1] : [ux / n, uy / n];
      const rot = (s) => [ux * Math.cos(s) - uy * Math.sin(s), ux * Math.sin(s) + uy * Math.cos(s)];
      const size = NODE + 28 + 12 * j;
      const [s1x, s1y] = rot(0.45);
      const [s2x, s2y] = rot(-0.45);
      const [c1x, c1y] = rot(0.7);
      const [c2x, c2y] = rot(-0.7);
      d = `M${a.x + s1x * NODE},${a.y + s1y * NODE} C${a.x + c1x * size * 1.5},${a.y + c1y * size * 1.5} `
        + `${a.x + c2x * size * 1.5},${a.y + c2y * size * 1.5} ${a.x + s2x * (NODE + 2)},${a.y + s2y * (NODE + 2)}`;
      mid = { x: a.x + ux * size * 1.15, y: a.y + uy * size * 1.15 };
    } else {
      // the bend is measured in the pair's own frame (from the label first in order), so a -> b and b -> a differ
      const flip = t.head > t.tail ? -1 : 1;
      const dx = (b.x - a.x) * flip;
      const dy = (b.y - a.y) * flip;
      const len = Math.hypot(dx, dy) || 1;
      const nx = -dy / len;
      const ny = dx / len;
      const bend = m === 1 ? 0 : (j - (m - 1) / 2) * Math.min(24, 150 / m);
      const c = { x: (a.x + b.x) / 2 + nx * bend * 2, y: (a.y + b.y) / 2 + ny * bend * 2 };
      const toward = (p, q, r) => {
        const l = Math.hypot(q.x - p.x, q.y - p.y) || 1;
        return { x: p.x + ((q.x - p.x) * r) / l, y: p.y + ((q.y - p.y) * r) / l };
      };
      const s = toward(a, c, NODE);
      const e = toward(b, c, NODE + 2);
      d = `M${s.x.toFixed(1)},${s.y.toFixed(1)} Q${c.x.toFixed(1)},${c.y.toFixed(1)} ${e.x.toFixed(1)},${e.y.toFixed(1)}`;
      mid = { x: 0.25 * a.x + 0.5 * c.x + 0.25 * b.x, y: 0.25 * a.y + 0.5 * c.y + 0.25 * b.y };
    }
    const g = svgEl("g");
    const path = svgEl("path", { d, class: `edge ${t.kind}`, "stroke-width": width.toFixed(2), "marker-end": `url(#arrow-${t.kind})` });
    const title = svgEl("title");
    title.textContent = t.kind === "test" ? `${spaced(t)} (the triple)` : `${spaced(t)}  ${signed(t.influence)} (${t.kind})`;
    path.append(title);
    g.append(path);
    if (t.kind === "test") {
      const label = svgEl("text", { x: mid.x.toFixed(1), y: (mid.y - 6).toFixed(1), "text-anchor": "middle", class: "edge-label" });
      label.textContent = t.relation;
      g.append(label);
    }
    return g;
  }

  // ------------------------------------------------------------------ self-influence

  let selfLoaded = false;

  async function loadSelf() {
    const top = Number($("#top").value) || 20;
    const data = await api(`api/self-influence?top=${top}`);
    const body = $("#self-table tbody");
    body.replaceChildren();
    const max = Math.max(1e-300, ...data.ranking.map((i) => Math.abs(i.influence)));
    for (const i of data.ranking) {
      const tr = el("tr");
      const track = el("div", "track");
      const bar = el("div", "bar self");
      bar.style.width = `${((100 * Math.abs(i.influence)) / max).toFixed(2)}%`;
      track.append(bar);
      const cell = el("td", "barcell");
      cell.append(track);
      tr.append(el("td", "num", String(i.rank)), el("td", "", i.head), el("td", "", i.relation), el("td", "", i.tail),
        el("td", "num", Number(i.influence).toPrecision(4)), cell, el("td", "num", `#${i.train_index}`));
      body.append(tr);
    }
    selfLoaded = true;
  }

  // ------------------------------------------------------------------ wiring

  function showTab(button) {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.classList.toggle("active", tab === button);
      $(`#${tab.dataset.panel}`).hidden = tab !== button;
    }
    if (button.id === "tab-self" && !selfLoaded) act(loadSelf);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showTab(tab));

    $("#ask-form").addEventListener("submit", (event) => {
      event.preventDefault();
      act(async () => {
        const relation = value("#relation");
        if (!relation) throw new Error("give a relation");
        const q = questionOf(value("#head"), relation, value("#tail"));
        if (q.head === "?" || q.tail === "?") {
          const question = [q.head, q.relation, q.tail].join("\t");
          const data = await api("api/predict", { question, n: perQuestion, filtered: $("#filtered").checked });
          showPredictions(q, data.predictions);
        } else {
          for (const li of $("#predictions").children) li.classList.remove("active");
          await influence(q, null);
        }
      });
    });

    $("#self-form").addEventListener("submit", (event) => {
      event.preventDefault();
      act(loadSelf);
    });

    completer($("#head"), "entity", $("#entities"));
    completer($("#tail"), "entity", $("#entities"));
    completer($("#relation"), "relation", $("#relations"));
    complete("entity", "", $("#entities"), 50);
    complete("relation", "", $("#relations"), 200);

    act(async () => {
      const info = await api("api/info");
      const p = info.projection;
      perQuestion = Math.max(1, Math.min(10, info.num_entities));
      $("#index-info").textContent = `${info.model_class} · ${info.num_rows.toLocaleString()} training triples · `
        + `loss ${info.loss} · ${p.kind} projection, dim ${p.dim} · ${info.checkpoints.length} checkpoint(s)`;
    });
  });
})();
