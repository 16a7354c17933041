// neuron atlas: client-side parts of the static pages (copied to atlas/assets/atlas.js).
// Every model-written string (descriptions, keywords, class names) reaches the page through
// textContent or as a plain attribute value, never through innerHTML; plotly only gets text
// from which markup characters were removed.
"use strict";
(function () {
  const body = document.body;
  const root = body.dataset.root || "";
  const DATA = window.ATLAS_DATA || {};
  const CHUNK = 120; // cards added at a time while scrolling

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1 ? v.toPrecision(3) : v.toFixed(3);
  }

  // Text for plotly, which interprets a few tags in labels: no markup characters at all.
  function plain(s) { return String(s === null || s === undefined ? "" : s).replace(/[<>&"]/g, " "); }

  function value(n, key) {
    if (key === "channel") return n.c;
    if (key === "top_activation") return n.a;
    if (key === "cluster") return n.cl;
    const v = n.s[key];
    return v === undefined ? null : v;
  }

  // A column's plain name (n), card-chip label (s) and one-line tooltip (t), from the glossary
  // (common/glossary.py) as the layer's data script carries them; its own key when unknown.
  function term(layer, key) {
    const t = (layer.terms || {})[key];
    return t || { n: key, s: key, t: "" };
  }

  function chip(layer, key, v) {
    const t = term(layer, key), span = el("span", "score", t.s + " " + fmt(v));
    if (t.t) span.title = t.n + ": " + t.t;
    return span;
  }

  function card(layer, n, extra) {
    const a = el("a", "card");
    a.href = root + n.u;
    a.dataset.channel = n.c;
    a.dataset.layer = layer.name;
    const img = el("img");
    img.loading = "lazy";
    img.alt = layer.name + " neuron " + n.c;
    if (n.t) img.src = root + n.t;
    a.append(img);
    const head = el("div", "head");
    head.append(el("span", "ch", (extra && extra.showLayer ? layer.name + " " : "") + "#" + n.c));
    if (n.cl !== null) head.append(el("span", "tag", "cluster " + n.cl));
    if (n.dead) head.append(el("span", "tag dead", "dead"));
    else if (VERDICT_TAGS[n.v]) head.append(el("span", "tag v-" + VERDICT_TAGS[n.v][1], VERDICT_TAGS[n.v][0]));
    if (n.lb) {
      const lb = el("span", "tag label", n.lb), t = term(layer, "concept_label");
      if (t.t) lb.title = t.n + ": " + t.t;
      head.append(lb);
    }
    if (extra && extra.score !== undefined) head.append(el("span", "tag", "match " + fmt(extra.score)));
    a.append(head);
    a.append(el("p", "desc", n.d || "(no description)"));
    if (n.sub && n.sub.length) {
      const ul = el("ul", "subs");
      n.sub.forEach(function (s) { ul.append(el("li", null, s)); });
      a.append(ul);
    }
    const scores = el("div", "scores");
    scores.append(chip(layer, "top_activation", n.a));
    // The card's key scores, and the score the list is sorted by when it is not one of them.
    const shown = layer.key.slice();
    if (extra && extra.sortKey && n.s[extra.sortKey] !== undefined && shown.indexOf(extra.sortKey) < 0) {
      shown.push(extra.sortKey);
    }
    shown.forEach(function (k) {
      if (n.s[k] !== undefined && n.s[k] !== null) scores.append(chip(layer, k, n.s[k]));
    });
    a.append(scores);
    return a;
  }

  // Cards added CHUNK at a time as the sentinel scrolls into view (a 2,048-neuron layer stays fast).
  function pager(grid, sentinel, make) {
    let rows = [], shown = 0;
    function more() {
      const frag = document.createDocumentFragment();
      rows.slice(shown, shown + CHUNK).forEach(function (r) { frag.append(make(r)); });
      grid.append(frag);
      shown = Math.min(rows.length, shown + CHUNK);
      sentinel.hidden = shown >= rows.length;
    }
    new IntersectionObserver(function (entries) {
      if (entries.some(function (e) { return e.isIntersecting; })) more();
    }, { rootMargin: "600px" }).observe(sentinel);
    sentinel.querySelector("button").addEventListener("click", more);
    return function (newRows) { rows = newRows; shown = 0; grid.replaceChildren(); more(); };
  }

  // The layer page's presets: a sort and filters each (docs/atlas.md#layer-pages). "trust" is
  // the default of a scored layer: every neuron in the trust order of the glossary.
  const PRESETS = {
    trust: { sort: "trust", order: "asc", verdict: "", beats: false },
    reliable: { sort: "trust", order: "asc", verdict: "reliable", beats: true },
    selective: { sort: "selectivity", order: "desc", verdict: "alive", beats: false },
    polysemantic: { sort: "polysemanticity", order: "desc", verdict: "alive", beats: false },
    weak: { sort: "trust", order: "desc", verdict: "poor", beats: false }
  };
  // Which verdicts (v: r, w, c, n, "" unscored) each choice of the verdict filter keeps.
  const VERDICTS = {
    alive: function (n) { return !n.dead; },
    reliable: function (n) { return !n.dead && n.v === "r"; },
    good: function (n) { return !n.dead && (n.v === "r" || n.v === "w"); },
    poor: function (n) { return n.dead || n.v !== "r"; }
  };
  const VERDICT_TAGS = { r: ["reliable", "good"], w: ["weak", "weak"], c: ["chance", "bad"] };

  function initLayer() {
    const layer = DATA[body.dataset.layer];
    const grid = document.getElementById("cards");
    const $ = function (id) { return document.getElementById(id); };
    const sortSel = $("sort"), orderSel = $("order"), filter = $("filter"), clusterSel = $("cluster");
    const presetSel = $("preset"), verdictSel = $("verdict"), beats = $("beats");
    const tcol = $("tcol"), tmin = $("tmin"), count = $("count");
    const scored = layer.columns.indexOf("trust") >= 0;
    layer.neurons.forEach(function (n) { n.text = [n.d, n.lb || ""].concat(n.sub || []).join(" ").toLowerCase(); });
    layer.columns.concat(["channel", "top_activation", "cluster"]).forEach(function (k) {
      const t = term(layer, k), option = new Option(t.n, k);
      if (t.t) option.title = t.t;
      sortSel.append(option);
      if (k !== "channel" && k !== "cluster" && k !== "trust") {
        const o = new Option(t.n, k);
        if (t.t) o.title = t.t;
        tcol.append(o);
      }
    });
    layer.clusters.forEach(function (c) {
      clusterSel.append(new Option("cluster " + c.id + " (" + c.size + "): " + c.keywords, String(c.id)));
    });
    // Presets that need a score this layer lacks are not offered.
    if (presetSel) {
      Array.from(presetSel.options).forEach(function (o) {
        const p = PRESETS[o.value];
        if (p && layer.columns.indexOf(p.sort) < 0) o.remove();
      });
    }

    function setPreset(name) {
      const p = PRESETS[name];
      if (!p) return;
      sortSel.value = p.sort;
      orderSel.value = p.order;
      if (verdictSel) verdictSel.value = p.verdict;
      if (beats) beats.checked = p.beats;
      tcol.value = "";
      tmin.value = "";
    }

    // The state lives in the URL's fragment: a page reloaded, a link shared or a fragment
    // followed (#cluster=3 from the trace) shows the same list.
    function load() {
      const state = new URLSearchParams(location.hash.slice(1));
      if (scored) setPreset(state.get("preset") || "trust");
      else { sortSel.value = "channel"; orderSel.value = "asc"; }
      if (state.get("sort")) sortSel.value = state.get("sort");
      if (state.get("order")) orderSel.value = state.get("order");
      filter.value = state.get("q") || "";
      clusterSel.value = state.get("cluster") || "";
      if (verdictSel && state.has("verdict")) verdictSel.value = state.get("verdict");
      if (beats && state.has("beats")) beats.checked = state.get("beats") === "1";
      if (state.get("t")) { tcol.value = state.get("t"); tmin.value = state.get("min") || ""; }
    }
    load();
    const show = pager(grid, $("more"), function (n) {
      return card(layer, n, { sortKey: sortSel.value });
    });

    // The preset the controls match, or "" (own choice).
    function matching() {
      const name = Object.keys(PRESETS).find(function (k) {
        const p = PRESETS[k];
        return p.sort === sortSel.value && p.order === orderSel.value && p.beats === beats.checked &&
          p.verdict === verdictSel.value && !(tcol.value && tmin.value !== "");
      });
      return name && presetSel.querySelector('option[value="' + name + '"]') ? name : "";
    }

    function apply() {
      const q = filter.value.trim().toLowerCase(), cl = clusterSel.value, key = sortSel.value;
      const sign = orderSel.value === "desc" ? -1 : 1;
      const keep = verdictSel && VERDICTS[verdictSel.value];
      const mustBeat = beats && beats.checked;
      const tk = tcol.value, tv = tmin.value === "" ? null : Number(tmin.value);
      const rows = layer.neurons.filter(function (n) {
        if (cl !== "" && String(n.cl) !== cl) return false;
        if (q && !n.text.includes(q)) return false;
        if (keep && !keep(n)) return false;
        if (mustBeat && !(value(n, "margin") > 0)) return false;  // margin over its control
        if (tk && tv !== null && !Number.isNaN(tv)) {
          const v = value(n, tk);
          if (v === null || v < tv) return false;
        }
        return true;
      });
      rows.sort(function (a, b) {
        const va = value(a, key), vb = value(b, key);
        if (va === null && vb !== null) return 1;  // missing values last, whatever the order
        if (vb === null && va !== null) return -1;
        if (va !== vb && va !== null) return sign * (va < vb ? -1 : 1);
        return a.c - b.c;
      });
      count.textContent = rows.length + " of " + layer.neurons.length + " neurons";
      const h = new URLSearchParams();
      if (presetSel) {
        presetSel.value = matching();
        if (presetSel.value) h.set("preset", presetSel.value);
      }
      if (!presetSel || !presetSel.value) {
        h.set("sort", key);
        h.set("order", orderSel.value);
        if (verdictSel && verdictSel.value) h.set("verdict", verdictSel.value);
        if (mustBeat) h.set("beats", "1");
      }
      if (q) h.set("q", filter.value.trim());
      if (cl) h.set("cluster", cl);
      if (tk && tmin.value !== "") { h.set("t", tk); h.set("min", tmin.value); }
      history.replaceState(null, "", "#" + h.toString());
      show(rows);
    }
    if (presetSel) presetSel.addEventListener("change", function () { setPreset(presetSel.value); apply(); });
    sortSel.addEventListener("change", function () {
      // Channels and the trust rank read best from the first; for a score the best ones come first.
      orderSel.value = sortSel.value === "channel" || sortSel.value === "trust" ? "asc" : "desc";
      apply();
    });
    [orderSel, clusterSel, verdictSel, beats, tcol].forEach(function (e) {
      if (e) e.addEventListener("change", apply);
    });
    [filter, tmin].forEach(function (e) { e.addEventListener("input", apply); });
    window.addEventListener("hashchange", function () { load(); apply(); });
    apply();
    body.dataset.ready = "1";
  }

  function hoverPanel() {
    const panel = el("div");
    panel.id = "hover";
    panel.hidden = true;
    const img = el("img"), title = el("div", "ch"), text = el("div", "desc");
    panel.append(img, title, text);
    body.append(panel);
    return {
      show: function (n, layerName, ev, others) {
        img.src = n.t ? root + n.t : "";
        title.textContent = layerName + " #" + n.c + (n.cl !== null ? " · cluster " + n.cl : "");
        text.textContent = n.d || "(no description)";
        if (others && others.length) {
          const listed = others.slice(0, 12).map(function (o) { return "#" + o.c; }).join(", ");
          text.textContent += " — and " + others.length + " more neuron" + (others.length > 1 ? "s" : "") +
            " with this sentence: " + listed + (others.length > 12 ? ", …" : "") + " (click to list them)";
        }
        panel.hidden = false;
        const x = ev && ev.clientX !== undefined ? ev.clientX : 20, y = ev && ev.clientY !== undefined ? ev.clientY : 80;
        panel.style.left = Math.min(x + 16, window.innerWidth - 260) + "px";
        panel.style.top = Math.min(y + 16, window.innerHeight - 340) + "px";
      },
      hide: function () { panel.hidden = true; }
    };
  }

  const LEGEND_MAX = 20; // clusters a map lists in its legend
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"]; // plotly's default colour cycle

  function initMap() {
    const layer = DATA[body.dataset.layer];
    const pts = layer.neurons.filter(function (n) { return n.x !== null; });
    const groups = new Map();
    pts.forEach(function (n) {
      const k = n.cl === null ? "none" : n.cl;
      if (!groups.has(k)) groups.set(k, []);
      groups.get(k).push(n);
    });
    const names = new Map(layer.clusters.map(function (c) { return [c.id, c.keywords]; }));
    // Legend in cluster order, neurons without a cluster last.
    const entries = Array.from(groups.entries()).sort(function (a, b) {
      if (a[0] === "none" || b[0] === "none") return (a[0] === "none") - (b[0] === "none");
      return a[0] - b[0];
    });
    // Neurons with the same sentence share a point (05 maps each distinct sentence once): one
    // marker per point, its area growing with the neurons on it (capped at 16). The sentence is
    // part of the key, so two sentences whose rounded coordinates happen to agree stay apart.
    function pointKey(n) { return n.x + "," + n.y + "\u0000" + n.d; }
    const shared = new Map(); // point and sentence → the neurons there
    pts.forEach(function (n) {
      const key = pointKey(n);
      if (!shared.has(key)) shared.set(key, []);
      shared.get(key).push(n);
    });
    function together(n) { return shared.get(pointKey(n)); }
    function points(ns, name, marker) {
      const first = ns.filter(function (n) { return together(n)[0] === n; });
      marker.size = first.map(function (n) { return 9 * Math.sqrt(Math.min(together(n).length, 16)); });
      if (Array.isArray(marker.color)) {
        const colour = new Map(ns.map(function (n, i) { return [n, marker.color[i]]; }));
        marker.color = first.map(function (n) { return colour.get(n); });
      }
      return { type: "scatter", mode: "markers", x: first.map(function (n) { return n.x; }),
               y: first.map(function (n) { return n.y; }), customdata: first.map(function (n) { return n.c; }),
               name: name, hoverinfo: "none", marker: marker };
    }
    // A trace and a legend entry per cluster while a legend can be read; past LEGEND_MAX one
    // trace coloured by cluster: plotly's colours repeat after 10 anyway, and the 100 traces
    // and legend entries of a 4,000-neuron layer took 3.4 of its 4.2 s to draw (one trace: 0.7).
    const many = entries.length > LEGEND_MAX;
    const traces = many
      ? [points([].concat.apply([], entries.map(function (e) { return e[1]; })), "neurons", {
          size: 9, opacity: 0.85, color: [].concat.apply([], entries.map(function (e) {
            return e[1].map(function () { return e[0] === "none" ? "#999" : COLORS[e[0] % COLORS.length]; });
          })) })]
      : entries.map(function (entry) {
        const k = entry[0];
        return points(entry[1], plain(k === "none" ? "no cluster" : "cluster " + k + ": " +
                                      (names.get(k) || "")), { size: 9, opacity: 0.85 });
      });
    if (many) {
      document.getElementById("map").before(el("p", "small muted", entries.length + " clusters: " +
        "too many for a legend; hover a point for its cluster, or filter the layer's cards by one."));
    }
    const byChannel = new Map(layer.neurons.map(function (n) { return [n.c, n]; }));
    // maps/<layer>.html#c=12 (linked from a neuron page) rings that neuron; without c, none.
    const asked = new URLSearchParams(location.hash.slice(1)).get("c");
    const mark = asked !== null && asked.trim() !== "" ? byChannel.get(Number(asked)) : undefined;
    if (mark && mark.x !== null) {
      traces.push({ type: "scatter", mode: "markers", x: [mark.x], y: [mark.y], customdata: [mark.c],
                    name: "neuron " + mark.c, hoverinfo: "none",
                    marker: { size: 22, color: "rgba(0,0,0,0)", line: { width: 3, color: "#000" } } });
    }
    const panel = hoverPanel();
    const div = document.getElementById("map");
    // The legend sits below the plot on a narrow screen, else right of it below the top margin
    // that holds plotly's toolbar, so the toolbar never covers it.
    const narrow = div.clientWidth < 700;
    Plotly.newPlot(div, traces, {
      margin: { l: 30, r: 10, t: 40, b: 30 }, hovermode: "closest", showlegend: !many,
      // (itemsizing: a cluster's legend symbol keeps one size whatever its points' sizes)
      legend: narrow ? { font: { size: 11 }, orientation: "h", x: 0, y: -0.02, yanchor: "top", itemsizing: "constant" }
                     : { font: { size: 11 }, x: 1.02, y: 1, yanchor: "top", itemsizing: "constant" },
      xaxis: { zeroline: false, showticklabels: false }, yaxis: { zeroline: false, showticklabels: false }
    }, { responsive: true, displaylogo: false }).then(function () { body.dataset.ready = "1"; });
    div.on("plotly_hover", function (d) {
      const n = byChannel.get(d.points[0].customdata);
      if (n) panel.show(n, layer.name, d.event, n.x === null ? [] : together(n).slice(1));
    });
    div.on("plotly_unhover", panel.hide);
    // A shared point opens the layer's cards filtered to its sentence, a single one its neuron.
    div.on("plotly_click", function (d) {
      const n = byChannel.get(d.points[0].customdata);
      if (!n) return;
      location.href = n.x !== null && together(n).length > 1 && n.d
        ? body.dataset.cards + "#q=" + encodeURIComponent(n.d) : root + n.u;
    });
  }

  function initSankey() {
    // Every cluster in its layer's column (fixed, so that a click is a click, not a drag); a
    // cluster without a link is grey and kept on the page by an invisible loop onto itself,
    // since plotly drops nodes no link touches.
    const S = window.ATLAS_SANKEY;
    const div = document.getElementById("sankey"), note = document.getElementById("trace-note");
    const cols = Math.max(S.layers.length, 1), colPx = 230;
    const tallest = Math.max.apply(null, S.layers.map(function (name) {
      return S.nodes.filter(function (n) { return n.layer === name; }).length;
    }).concat([1]));
    function draw(kind) {
      const mode = S.modes[kind], linked = new Set();
      mode.links.forEach(function (l) { linked.add(l.s); linked.add(l.t); });
      const alone = S.nodes.map(function (n, i) { return i; }).filter(function (i) { return !linked.has(i); });
      const links = mode.links.concat(alone.map(function (i) { return { s: i, t: i, v: Math.max(1, S.nodes[i].size), loop: true }; }));
      const xOf = function (col) { return cols < 2 ? 0.5 : 0.001 + 0.998 * col / (cols - 1); };
      const what = kind === "sentence" ? "cosine " : "strength ";
      const width = Math.max(div.parentElement.clientWidth, cols * colPx);
      note.textContent = note.dataset[kind];
      return Plotly.react(div, [{
        type: "sankey", arrangement: "fixed",
        node: { label: S.nodes.map(function (n) { return plain("#" + n.cluster + ": " + n.keywords.split(", ").slice(0, 3).join(", ")); }),
                x: S.nodes.map(function (n) { return xOf(n.col); }), y: mode.y, pad: 10, thickness: 16,
                color: S.nodes.map(function (n, i) { return linked.has(i) ? "rgba(31,119,180,0.9)" : "rgba(150,150,150,0.6)"; }),
                customdata: S.nodes.map(function (n, i) { return plain(n.layer + ", cluster " + n.cluster + " (" + n.size + " neurons): " + n.keywords + (linked.has(i) ? "" : " (no link)")); }),
                hovertemplate: "%{customdata}<extra></extra>" },
        link: { source: links.map(function (l) { return l.s; }), target: links.map(function (l) { return l.t; }),
                value: links.map(function (l) { return l.v; }),
                color: links.map(function (l) { return l.loop ? "rgba(0,0,0,0)" : l.weak ? "rgba(170,170,170,0.15)" : "rgba(140,140,140,0.35)"; }),
                customdata: links.map(function (l) {
                  if (l.loop) return "no link";
                  if (l.p === null || l.p === undefined) return what + fmt(l.sim);
                  return what + fmt(l.sim) + ", p = " + fmt(l.p) + (l.weak ? " (random clusters do as well: faint)" : "");
                }),
                hovertemplate: "%{customdata}<extra></extra>" }
      }], { width: width, height: Math.max(420, 30 * tallest + 90), margin: { l: 10, r: 10, t: 40, b: 10 },
            font: { size: 12 },
            annotations: S.layers.map(function (name, col) {
              return { text: "<b>" + plain(name) + "</b>", x: xOf(col), y: 1, xref: "paper", yref: "paper",
                       yanchor: "bottom", xanchor: col === cols - 1 && cols > 1 ? "right" : "left", showarrow: false };
            }) }, { displaylogo: false, displayModeBar: false });
    }
    const radios = Array.from(document.querySelectorAll("#trace-kind input"));
    const wanted = new URLSearchParams(location.search).get("by");
    radios.forEach(function (r) {
      if (r.value === wanted && !r.disabled) r.checked = true;
      r.addEventListener("change", function () {
        const url = new URL(location.href);
        url.searchParams.set("by", r.value);
        history.replaceState(null, "", url);
        draw(r.value);
      });
    });
    const first = radios.find(function (r) { return r.checked; });
    draw(first ? first.value : "sentence").then(function () { body.dataset.ready = "1"; });
    div.on("plotly_click", function (d) {
      const p = d.points[0];
      if (!p || p.sourceLinks === undefined) return; // a link, not a cluster
      const n = S.nodes[p.pointNumber];
      if (n) location.href = root + "layers/" + n.slug + ".html#cluster=" + n.cluster;
    });
  }

  function initSearch() {
    const all = [];
    (window.ATLAS_LAYERS || []).forEach(function (name) {
      const layer = DATA[name];
      if (!layer) return;
      layer.neurons.forEach(function (n) {
        n.text = [n.d].concat(n.sub || []).join(" ").toLowerCase();
        all.push({ layer: layer, n: n });
      });
    });
    const find = new Map(all.map(function (r) { return [r.layer.name + "\u0000" + r.n.c, r]; }));
    const input = document.getElementById("q"), count = document.getElementById("count");
    const layerSel = document.getElementById("layer"), noMatch = document.getElementById("no-match");
    const grid = document.getElementById("cards");
    const show = pager(grid, document.getElementById("more"), function (r) {
      const a = card(r.layer, r.n, { showLayer: true, score: r.score });
      if (r.weak) { a.classList.add("weak"); a.querySelector(".head").append(el("span", "tag", "weak match")); }
      return a;
    });
    const params = new URLSearchParams(location.search);
    if (params.get("q")) input.value = params.get("q");
    if (params.get("layer")) layerSel.value = params.get("layer");
    let byMeaning = null; // the last answer by meaning, shown until the query changes
    function filterText() {
      const q = input.value.trim().toLowerCase(), only = layerSel.value;
      const rows = q ? all.filter(function (r) {
        return (!only || r.layer.name === only) && r.n.text.includes(q);
      }) : [];
      count.textContent = q ? rows.length + " neurons whose sentences contain this text" : "";
      noMatch.hidden = true;
      show(rows);
    }
    input.addEventListener("input", function () { byMeaning = null; filterText(); });
    layerSel.addEventListener("change", function () { if (byMeaning) byMeaning(); else filterText(); });
    filterText();
    body.dataset.ready = "1";

    // Live semantic search: only when the page is served by `07_search.py --serve` (make serve).
    const live = document.getElementById("live"), status = document.getElementById("live-status");
    if (!location.protocol.startsWith("http")) return;
    function showHits(resp) {
      if (resp.error) { status.textContent = resp.error; return; }
      const rows = [];
      resp.hits.forEach(function (h) {
        const r = find.get(h.layer + "\u0000" + h.channel);
        if (r) rows.push({ layer: r.layer, n: r.n, score: h.score, weak: h.weak });
      });
      const weak = rows.filter(function (r) { return r.weak; }).length;
      count.textContent = rows.length + " neurons by meaning (" + resp.note + ")" +
        (weak ? ", " + weak + " of them weak" : "");
      // A query nothing matches well says so, instead of passing its closest neurons off as hits.
      noMatch.hidden = !(rows.length && resp.good === false);
      noMatch.textContent = "No good match: the best cosine, " + fmt(resp.hits.length ? resp.hits[0].cosine : null) +
        ", is below " + fmt(resp.weak_below) + " (docs/search.md: what that threshold separates). " +
        "The closest neurons are shown faded.";
      show(rows);
      status.textContent = "";
    }
    function ask(url, opts) {
      status.textContent = "searching…";
      fetch(url, opts).then(function (r) { return r.json(); }).then(showHits)
        .catch(function (e) { status.textContent = "search failed: " + e; });
    }
    fetch(root + "api/status").then(function (r) { return r.json(); }).then(function (s) {
      live.hidden = false;
      document.getElementById("image-form").hidden = !s.image;
      status.textContent = "";
      const only = function () { return layerSel.value ? "&layer=" + encodeURIComponent(layerSel.value) : ""; };
      function meaning() {
        const q = input.value.trim();
        if (!q) return;
        byMeaning = meaning;
        ask(root + "api/search?k=" + s.k + only() + "&q=" + encodeURIComponent(q));
      }
      document.getElementById("text-form").addEventListener("submit", function (ev) {
        ev.preventDefault();
        meaning();
      });
      document.getElementById("image-form").addEventListener("submit", function (ev) {
        ev.preventDefault();
        const file = document.getElementById("image").files[0];
        if (file) ask(root + "api/search-image?k=" + s.k + only(), { method: "POST", body: file });
      });
      // A query from the top bar's box is searched by meaning when the server can.
      if (params.get("q")) meaning();
    }).catch(function () { /* served by a plain file server: the text filter still works */ });
  }

  // A neuron page's mosaic, drawn from its top images (images/<id>.jpg, as the network saw them)
  // at their own resolution, and the lightbox that a click on a tile opens: the whole image with
  // the neuron's activation map over it (or the tile's window where 01 stored no map), its
  // activation, label and the model's prediction. Text goes in through textContent only.
  function initNeuron() {
    const T = window.ATLAS_TILES;
    if (!T) { body.dataset.ready = "1"; return; }
    const INFO = window.ATLAS_IMAGES || {};
    const $ = function (id) { return document.getElementById(id); };
    const box = el("dialog");
    box.id = "lightbox";
    box.setAttribute("aria-label", "a top image of this neuron");
    const head = el("div", "lb-head"), stage = el("div", "lb-stage"), tools = el("span");
    head.append(el("b"), tools);
    head.firstChild.id = "lb-title";
    [["lb-prev", "←", "previous image"], ["lb-next", "→", "next image"],
     ["lb-close", "✕", "close"]].forEach(function (b) {
      const button = el("button", null, b[1]);
      button.type = "button";
      button.id = b[0];
      button.setAttribute("aria-label", b[2]);
      tools.append(button, " ");
    });
    const photo = el("img"), overlay = el("canvas");
    photo.id = "lb-image";
    photo.alt = "the whole top image";
    overlay.id = "lb-overlay";
    stage.append(photo, overlay);
    const facts = el("p"), toggle = el("p", "small"), label = el("label"), show = el("input");
    facts.id = "lb-facts";
    show.type = "checkbox";
    show.id = "lb-show";
    show.checked = true;
    label.append(show, " show the ", el("span"));
    label.lastChild.id = "lb-kind";
    toggle.append(label);
    const note = el("p", "small muted");
    note.id = "lb-note";
    box.append(head, stage, facts, toggle, note);
    body.append(box);
    const mosaic = $("mosaic");
    const SIDE = 2 * T.tile; // canvas pixels per tile: sharp on a high-density screen
    const pictures = new Map();
    function picture(id) { // one Image per file, shared by its tile and the lightbox
      if (!pictures.has(id)) {
        const img = new Image();
        img.loaded = new Promise(function (ok) {
          img.onload = function () { ok(true); };
          img.onerror = function () { ok(false); };
        });
        img.src = root + "images/" + id + ".webp";
        pictures.set(id, img);
      }
      return pictures.get(id);
    }
    // Tile k like 02's: the window of the input at (top, left), one scale for the layer, centred,
    // grey where the window runs past the image (the network saw padding there).
    function drawTile(ctx, img, top, left) {
      const wh = T.window[0], ww = T.window[1], scale = SIDE / Math.max(wh, ww);
      const ox = (SIDE - ww * scale) / 2, oy = (SIDE - wh * scale) / 2;
      ctx.fillStyle = "rgb(128,128,128)";
      ctx.fillRect(0, 0, SIDE, SIDE);
      ctx.imageSmoothingEnabled = scale < 1; // small windows: the image's pixels, enlarged
      const y0 = Math.max(top, 0), x0 = Math.max(left, 0);
      const y1 = Math.min(top + wh, T.size[0]), x1 = Math.min(left + ww, T.size[1]);
      if (img && y1 > y0 && x1 > x0) {
        ctx.drawImage(img, x0, y0, x1 - x0, y1 - y0, ox + (x0 - left) * scale,
                      oy + (y0 - top) * scale, (x1 - x0) * scale, (y1 - y0) * scale);
      }
    }
    const drawn = [];
    if (mosaic.tagName === "IMG") { // a mosaic 02 cut otherwise (CROP=mask): tiles by position
      mosaic.style.cursor = "zoom-in";
      mosaic.addEventListener("click", function (ev) {
        const r = mosaic.getBoundingClientRect();
        const col = Math.floor((ev.clientX - r.left) / r.width * T.grid);
        const row = Math.floor((ev.clientY - r.top) / r.height * T.grid);
        const k = row * T.grid + col;
        if (col >= 0 && col < T.grid && k >= 0 && k < T.tiles.length) open(k);
      });
    } else {
      mosaic.style.gridTemplateColumns = "repeat(" + T.grid + ", 1fr)";
      T.tiles.forEach(function (t, k) {
        const button = el("button", "tile");
        button.type = "button";
        button.setAttribute("role", "listitem");
        button.setAttribute("aria-label", "image " + t[0] + ", activation " + fmt(t[1]));
        button.title = "#" + (k + 1) + " · activation " + fmt(t[1]);
        const canvas = el("canvas");
        canvas.width = canvas.height = SIDE;
        button.append(canvas);
        mosaic.append(button);
        button.addEventListener("click", function () { open(k); });
        const ctx = canvas.getContext("2d");
        if (t[0] < 0) { drawTile(ctx, null, t[2], t[3]); return; }
        const img = picture(t[0]);
        drawn.push(img.loaded.then(function (ok) { drawTile(ctx, ok ? img : null, t[2], t[3]); }));
      });
    }
    let current = 0;
    const strip = T.map ? new Image() : null;
    if (strip) strip.src = root + T.map;
    $("lb-kind").textContent = T.map ? "activation map" : "tile's window";
    $("lb-note").textContent = T.map
      ? "The neuron's activation map on this image (" + T.map_cell[0] + " × " + T.map_cell[1] +
        " cells, stretched over it): the image stays bright where the neuron fires and is " +
        "dimmed where it is silent; one scale for all its images, so a weaker image is darker."
      : "Outside the box is dimmed: the box is the tile's window, the receptive field of the " +
        "cell where the neuron fired most (01 keeps no activation map for this layer).";
    function paint() {
      const t = T.tiles[current], H = T.size[0], W = T.size[1];
      overlay.width = W; overlay.height = H;
      overlay.classList.toggle("multiply", Boolean(strip));
      const ctx = overlay.getContext("2d");
      ctx.clearRect(0, 0, W, H);
      if (!$("lb-show").checked) return;
      if (strip) {
        const h = T.map_cell[0], w = T.map_cell[1], c = current % T.map_columns;
        const r = Math.floor(current / T.map_columns);
        // Grey 64 plus 3/4 of the map, multiplied into the image by the canvas's blend mode:
        // the image as it is where the neuron fires most, dimmed to a quarter where it is silent.
        const go = function () {
          ctx.globalCompositeOperation = "source-over";
          ctx.fillStyle = "rgb(64,64,64)";
          ctx.fillRect(0, 0, W, H);
          ctx.globalCompositeOperation = "lighter";
          ctx.globalAlpha = 0.75;
          ctx.imageSmoothingEnabled = true;
          ctx.drawImage(strip, c * w, r * h, w, h, 0, 0, W, H);
          ctx.globalAlpha = 1;
          ctx.globalCompositeOperation = "source-over";
        };
        if (strip.complete) go(); else strip.addEventListener("load", go, { once: true });
      } else {
        ctx.fillStyle = "rgba(0,0,0,0.5)";
        ctx.fillRect(0, 0, W, H);
        ctx.clearRect(t[3], t[2], T.window[1], T.window[0]);
        ctx.strokeStyle = "#ffd400";
        ctx.lineWidth = Math.max(1, W / 150);
        ctx.strokeRect(t[3], t[2], T.window[1], T.window[0]);
      }
    }
    function open(k) {
      current = k;
      const t = T.tiles[k], info = INFO[String(t[0])] || [];
      $("lb-title").textContent = "top image " + (k + 1) + " of " + T.tiles.length +
        (t[0] >= 0 ? " · image " + t[0] : " · image not readable");
      facts.replaceChildren();
      const add = function (name, id, text) {
        if (facts.childNodes.length) facts.append(" · ");
        facts.append(name + " ");
        const b = el("b", null, text);
        b.id = id;
        facts.append(b);
      };
      add("activation", "lb-value", fmt(t[1]));
      add("label", "lb-label", info[0] || "none");
      add("predicted", "lb-pred", (info[1] || "?") +
          (typeof info[2] === "number" ? " (" + (100 * info[2]).toFixed(1) + " %)" : ""));
      if (t[0] >= 0) photo.src = root + "images/" + t[0] + ".webp"; else photo.removeAttribute("src");
      paint();
      if (!box.open) box.showModal();
    }
    $("lb-show").addEventListener("change", paint);
    $("lb-close").addEventListener("click", function () { box.close(); });
    $("lb-prev").addEventListener("click", function () { open((current + T.tiles.length - 1) % T.tiles.length); });
    $("lb-next").addEventListener("click", function () { open((current + 1) % T.tiles.length); });
    box.addEventListener("click", function (ev) { if (ev.target === box) box.close(); });
    box.addEventListener("keydown", function (ev) {
      if (ev.key === "ArrowLeft") $("lb-prev").click();
      if (ev.key === "ArrowRight") $("lb-next").click();
    });
    Promise.all(drawn).then(function () { body.dataset.ready = "1"; });
  }

  // Tooltips of score names: an element names its score (data-term) and takes the one-line tip
  // from assets/terms.js, so that no page repeats the glossary's texts.
  const TIPS = window.ATLAS_TERMS || {};
  document.querySelectorAll("[data-term]").forEach(function (e) {
    const tip = TIPS[e.dataset.term];
    if (tip) e.title = tip;
  });

  // A pair's z grid: the cell under the pointer (or focused) is named in the line below it,
  // beside its native tooltip, so that a touch screen shows it too.
  const readout = document.getElementById("zreadout");
  if (readout) {
    const show = function (ev) {
      const cell = ev.target.closest(".zgrid a");
      if (cell) readout.textContent = cell.title;
    };
    document.querySelectorAll(".zgrid").forEach(function (grid) {
      grid.addEventListener("mouseover", show);
      grid.addEventListener("focusin", show);
    });
  }

  const pages = { layer: initLayer, map: initMap, sankey: initSankey, search: initSearch,
                  neuron: initNeuron };
  if (pages[body.dataset.page]) pages[body.dataset.page]();
  else body.dataset.ready = "1";
})();
