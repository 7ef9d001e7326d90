"use strict";
// The feature browser: SAE.index(table) renders the latent table; a latent's
// view loads data/latents-<n>.js, which calls SAE.chunk(latents). No network.
const SAE = {
  data: null, chunks: {}, sort: {key: "id", dir: 1}, page: 0, perPage: 100,
  index(d) { SAE.data = d; window.addEventListener("hashchange", route); route(); },
  chunk(latents) {
    const n = Math.floor(latents[0].id / SAE.data.chunk);
    SAE.chunks[n] = latents;
  },
};

const $ = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};
const fmt = v => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(3)) : v);

function route() {
  const m = location.hash.match(/^#latent=(\d+)$/);
  if (m) showLatent(Number(m[1])); else showIndex();
}

// --- The index -----------------------------------------------------------------
function columns() {
  const d = SAE.data;
  const cols = [
    {key: "id", label: "latent", get: j => j},
    {key: "density", label: "density (held out)", get: j => d.density[j]},
    {key: "mean", label: "mean activation", get: j => d.mean[j]},
  ];
  if (d.pool) cols.push({key: "pool", label: `in the pool (of ${d.pool_batches} batches)`,
                         get: j => d.pool[j]});
  if (d.truth) cols.push({key: "truth_cos", label: "true direction cos", get: j => d.truth_cos[j]});
  cols.push({key: "neighbours", label: "nearest decoders", get: j => d.neighbours[j].join(" "),
             text: true});
  return cols;
}

// The columns with min and max filters.
const filtered = () => ["density", "mean", "pool", "truth_cos"].filter(k => SAE.data[k]);

function rowsShown() {
  const d = SAE.data, cols = columns();
  const limits = filtered().map(k => [k, document.getElementById(`min-${k}`)?.value,
                                      document.getElementById(`max-${k}`)?.value]);
  let ids = [...Array(d.n_latents).keys()].filter(j => limits.every(([k, lo, hi]) =>
      (lo === "" || lo === undefined || d[k][j] >= Number(lo)) &&
      (hi === "" || hi === undefined || d[k][j] <= Number(hi))));
  const col = cols.find(c => c.key === SAE.sort.key);
  ids.sort((a, b) => (col.get(a) < col.get(b) ? -1 : col.get(a) > col.get(b) ? 1 : a - b)
                     * SAE.sort.dir);
  return ids;
}

function showIndex() {
  const d = SAE.data, main = document.getElementById("main");
  // The densities here are of the tokens read; summary.json's of the run's own
  // held-out tokens (--eval-tokens), so counts such as "never fired" can differ.
  const own = d.eval_rows != null && d.eval_rows !== d.held_out_rows
      ? `; the summary's metrics are of the run's ${d.eval_rows} held-out tokens` : "";
  document.getElementById("title").textContent =
      `${d.run}: ${d.n_latents} latents, densities over ${d.rows} tokens read ` +
      `(${d.held_out_rows} held out)${own}`;
  if (document.getElementById("latents")) { renderTable(); return; }
  main.replaceChildren();
  const summary = $("div", {class: "summary", id: "summary"});
  for (const [k, v] of Object.entries(d.summary)) summary.append($("span", {text: `${k}: ${fmt(v)}`}));
  main.append(summary, $("img", {src: "density.png", alt: "density histogram"}));
  const controls = $("div", {class: "controls"});
  const search = $("input", {id: "search", placeholder: "latent id"});
  search.addEventListener("keydown", e => {
    if (e.key === "Enter" && search.value !== "") location.hash = `latent=${Number(search.value)}`;
  });
  controls.append("go to ", search);
  for (const k of filtered()) {
    for (const side of ["min", "max"]) {
      const input = $("input", {id: `${side}-${k}`, placeholder: `${side} ${k}`});
      input.addEventListener("input", () => { SAE.page = 0; renderTable(); });
      controls.append(input);
    }
  }
  const pager = $("div", {id: "pager"});
  main.append(controls, pager, $("table", {id: "latents"}, $("thead"), $("tbody")));
  renderTable();
}

function renderTable() {
  const cols = columns(), ids = rowsShown();
  const table = document.getElementById("latents");
  const head = $("tr");
  for (const c of cols) {
    const th = $("th", {"data-key": c.key, text: c.label});
    if (c.key === SAE.sort.key) {
      th.classList.add("sorted");
      th.setAttribute("data-arrow", SAE.sort.dir > 0 ? " ▲" : " ▼");
    }
    th.addEventListener("click", () => {
      SAE.sort = {key: c.key, dir: SAE.sort.key === c.key ? -SAE.sort.dir : -1};
      SAE.page = 0;
      renderTable();
    });
    head.append(th);
  }
  table.tHead.replaceChildren(head);
  const body = $("tbody");
  const pages = Math.max(1, Math.ceil(ids.length / SAE.perPage));
  SAE.page = Math.min(SAE.page, pages - 1);
  for (const j of ids.slice(SAE.page * SAE.perPage, (SAE.page + 1) * SAE.perPage)) {
    const tr = $("tr", {"data-latent": j});
    for (const c of cols) {
      const td = $("td", {class: c.key});
      if (c.key === "id") td.append($("a", {href: `#latent=${j}`, text: String(j)}));
      else td.textContent = c.text ? c.get(j) : fmt(c.get(j));
      tr.append(td);
    }
    body.append(tr);
  }
  table.tBodies[0].replaceWith(body);
  const pager = document.getElementById("pager");
  const prev = $("button", {text: "◀"}), next = $("button", {text: "▶"});
  prev.onclick = () => { SAE.page = Math.max(0, SAE.page - 1); renderTable(); };
  next.onclick = () => { SAE.page = Math.min(pages - 1, SAE.page + 1); renderTable(); };
  pager.replaceChildren(prev, ` page ${SAE.page + 1} of ${pages} (${ids.length} latents) `, next);
}

// --- A latent ----------------------------------------------------------------------
function showLatent(j) {
  const d = SAE.data, main = document.getElementById("main");
  if (!(j >= 0 && j < d.n_latents)) {
    main.replaceChildren($("p", {id: "error", text: `no latent ${j}: ids are 0 to ${d.n_latents - 1}`}));
    return;
  }
  const n = Math.floor(j / d.chunk);
  if (!SAE.chunks[n]) {
    main.replaceChildren($("p", {text: `loading latent ${j}…`}));
    const s = $("script", {src: `data/latents-${n}.js`});
    s.onload = () => showLatent(j);
    document.body.append(s);
    return;
  }
  const f = SAE.chunks[n][j - n * d.chunk];
  document.getElementById("title").textContent = `${d.run}: latent ${j}`;
  const view = $("div", {id: "latent", "data-latent": j});
  view.append($("h2", {text: `Latent ${j}`}),
              $("p", {class: "stats", text: `density ${fmt(f.density)} (held out) · mean activation ${fmt(f.mean)}` +
                      (f.pool === undefined ? "" : ` · in the pool of ${fmt(100 * f.pool)}% of ${d.pool_batches} batches (P = ${d.pool_size})`)}));
  if (f.truth !== undefined) view.append($("p", {id: "truth", text: `closest true direction ${f.truth} (cosine ${fmt(f.truth_cos)})`}));
  const near = $("p", {id: "neighbours"}, "nearest decoders: ");
  for (const [i, c] of f.neighbours) near.append($("a", {href: `#latent=${i}`, text: `${i}`}), ` (${fmt(c)}) `);
  view.append(near);
  const cols = $("div", {class: "cols"});
  cols.append($("div", {}, $("h3", {text: "activations"}), histogram(f)));
  if (f.promotes) cols.append(lens("promotes", f.promotes), lens("suppresses", f.suppresses));
  view.append(cols);
  if (f.top) {
    view.append($("h3", {text: `top ${f.top.length} contexts`}), contexts(f.top, "top"));
    view.append($("h3", {text: `${f.samples.length} firings drawn at random`}), contexts(f.samples, "samples"));
  } else if (f.top_values) {
    view.append($("p", {text: `top activations: ${f.top_values.map(fmt).join(", ")}`}));
  }
  main.replaceChildren(view);
}

function contexts(list, id) {
  const box = $("div", {id});
  const top = Math.max(1e-9, ...list.flatMap(c => c.acts));
  for (const c of list) {
    const line = $("div", {class: "context", "data-row": c.row});
    c.tokens.forEach((t, i) => {
      const a = c.acts[i];
      const span = $("span", {class: i === c.peak ? "tok peak" : "tok", "data-act": a,
                              title: `activation ${a}`, text: t});
      if (a > 0) span.style.background = `rgba(230, 80, 40, ${0.15 + 0.85 * a / top})`;
      line.append(span);
    });
    box.append(line);
  }
  return box;
}

function histogram(f) {
  const edges = SAE.data.edges;  // the same bins for every latent
  const w = 260, h = 90, n = f.hist.length, top = Math.max(1, ...f.hist);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 16); svg.id = "histogram";
  f.hist.forEach((c, i) => {
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const bh = h * c / top;
    r.setAttribute("x", i * w / n); r.setAttribute("width", w / n - 1);
    r.setAttribute("y", h - bh); r.setAttribute("height", bh);
    r.innerHTML = `<title>${i === 0 ? "below " + edges[0] : i === n - 1 ? "above " + edges[n - 2] : edges[i - 1] + " to " + edges[i]}: ${c}</title>`;
    svg.append(r);
  });
  const text = (x, y, words, id) => {
    const t = document.createElementNS("http://www.w3.org/2000/svg", "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", 10);
    if (id) t.id = id;
    t.textContent = words;
    svg.append(t);
  };
  text(0, h + 13, `activation, log scale: ${edges[0]} … ${edges[edges.length - 1]}`);
  // The y axis: bars are token counts, the tallest one `top` tokens.
  text(w - 4, 10, `${top} tokens`, "histogram-top");
  svg.lastChild.setAttribute("text-anchor", "end");
  return svg;
}

function lens(name, list) {
  const t = $("table", {class: "lens", id: name});
  for (const [tok, v] of list) t.append($("tr", {}, $("td", {text: JSON.stringify(tok)}), $("td", {text: fmt(v)})));
  return $("div", {}, $("h3", {text: `logit lens: ${name}`}), t);
}
