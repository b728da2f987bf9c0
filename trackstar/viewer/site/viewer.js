// TrackStar viewer: plain JavaScript, no dependencies. Data come from data/index.js and data/page-N.js
// (JSON wrapped in TRACKSTAR.index(...) / TRACKSTAR.page(n, ...) calls, so file:// works), or from
// result files in the TDA-viewer format (?jsonl_path=..&sxs_jsonl_path=..&example_id=.., over http).
(function () {
  'use strict';
  const T = window.TRACKSTAR = window.TRACKSTAR || {};
  const CATS = ['relevant', 'both', 'one', 'neither'];
  const CAT_CODE = {r: 'relevant', b: 'both', o: 'one', n: 'neither'};
  const CAT_LABEL = {relevant: 'relevant', both: 'entity + target', one: 'one of them', neither: 'neither'};
  const NAMES = {trackstar: 'TrackStar', bm25: 'BM25', dot: 'dot (ladder)', cosine: 'cosine (ladder)',
    optimizer: 'optimizer (ladder)', r_train: 'R_train (ladder)', random: 'random'};
  const LIST_STEP = 200;
  const pages = {};
  let index = null;
  let store = null;
  let state = {text: '', correct: '', hit: '', shown: LIST_STEP, selected: null, visible: []};
  let rendered = null;  // {id, promise} of the last panel render

  T.index = function (data) { index = data; };
  T.page = function (n, data) { const p = pages[n] = pages[n] || deferred(); p.loaded = true; p.resolve(data); };

  function deferred() {
    let resolve, reject;
    const p = new Promise(function (a, b) { resolve = a; reject = b; });
    p.resolve = resolve; p.reject = reject;
    return p;
  }
  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === 'text') e.textContent = attrs[k];
      else if (k === 'cls') e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    for (const c of children || []) if (c != null) e.append(c);
    return e;
  }
  const SVGNS = 'http://www.w3.org/2000/svg';
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function name(m) { return NAMES[m] || m; }
  function fmt(x, d) { return (x == null || !isFinite(x)) ? '–' : Number(x).toFixed(d == null ? 3 : d); }
  function pct(x) { return (x == null || !isFinite(x)) ? '–' : (100 * x).toFixed(0) + '%'; }
  function status(msg, isError) { const s = $('status'); s.textContent = msg || ''; s.className = isError ? 'error' : 'muted'; }

  // ------------------------------------------------------------------ text matching (as trackstar/breakdown.py)
  function pattern(phrase) {
    const p = (phrase || '').trim();
    if (!p) return null;
    const esc = p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    return new RegExp('(?<![\\p{L}\\p{N}_])' + esc + '(?![\\p{L}\\p{N}_])', 'giu');
  }
  function classify(text, target, entity, relevant) {
    if (relevant) return 'relevant';
    let n = 0;
    for (const ph of [target, entity]) { const re = pattern(ph); if (re && re.test(text)) n += 1; }
    return ['neither', 'one', 'both'][n];
  }
  // text with entity and target mentions wrapped in <mark> (DOM nodes: passages never become HTML)
  function highlight(text, entity, target) {
    const spans = [];
    for (const [ph, cls] of [[target, 'tgt'], [entity, 'ent']]) {
      const re = pattern(ph);
      if (!re) continue;
      let m;
      while ((m = re.exec(text)) !== null) {
        if (!m[0].length) { re.lastIndex++; continue; }
        const a = m.index, b = a + m[0].length;
        if (!spans.some(function (s) { return a < s[1] && s[0] < b; })) spans.push([a, b, cls]);
      }
    }
    spans.sort(function (x, y) { return x[0] - y[0]; });
    const out = [];
    let at = 0;
    for (const [a, b, cls] of spans) {
      if (a > at) out.push(document.createTextNode(text.slice(at, a)));
      out.push(el('mark', {cls: cls, text: text.slice(a, b)}));
      at = b;
    }
    if (at < text.length) out.push(document.createTextNode(text.slice(at)));
    return out;
  }

  // ------------------------------------------------------------------ stores
  // A store has: methods, metrics, ladder, summaries [{id, prompt, target, entity, prediction, target_prob,
  // correct, page, first: {method: rank}}] and detail(summary) -> Promise<{relevant, methods: {m: {p, o}}, passages}>
  function reportStore(ix) {
    const summaries = ix.queries.map(function (row) {
      const s = {};
      ix.fields.forEach(function (f, i) { s[f] = row[i]; });
      const first = {};
      ix.methods.forEach(function (m, i) { first[m] = s.first[i]; });
      s.first = first;
      return s;
    });
    return {
      title: ix.title, methods: ix.methods, ladder: ix.ladder, metrics: ix.metrics, tailPatch: ix.tail_patch || null, top: ix.top,
      summaries: summaries,
      detail: function (s) {
        return loadPage(s.page).then(function (pg) {
          const q = pg.queries[s.id];
          if (!q) throw new Error('query ' + s.id + ' missing from data page ' + s.page);
          return {relevant: q.relevant, methods: q.methods, passages: pg.passages};
        });
      },
    };
  }
  function loadPage(n) {
    const p = pages[n] = pages[n] || deferred();
    if (!p.loaded && !p.requested) {
      p.requested = true;
      const s = document.createElement('script');
      s.src = 'data/page-' + String(n).padStart(5, '0') + '.js';
      s.onerror = function () { p.reject(new Error('cannot load ' + s.src)); };
      document.head.append(s);
    }
    return p;
  }

  // TDA-viewer result files (jsonl): streamed line by line; only the top hits of each record are kept
  async function readLines(resp, onLine) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      buf += r.value;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.trim()) onLine(line);
      }
    }
    if (buf.trim()) onLine(buf);
  }
  async function jsonlStore(sources, top) {
    const methods = [];
    const byId = new Map();
    const passages = {};
    for (const src of sources) {
      let m = src.name.replace(/^.*[\\/]/, '').replace(/\.jsonl?$/, '');
      while (methods.includes(m)) m += "'";
      methods.push(m);
      let lineNo = 0;
      await readLines(await src.open(), function (line) {
        lineNo += 1;
        let r;
        try { r = JSON.parse(line); } catch (e) { throw new Error(src.name + ':' + lineNo + ': invalid JSON: ' + e.message); }
        const id = String(r.example_id != null ? r.example_id : (r.trex_id != null ? r.trex_id : lineNo - 1));
        let s = byId.get(id);
        if (!s) {
          s = {id: id, prompt: r.inputs_plaintext || '', target: r.targets_plaintext || '', entity: r.entity || null,
               prediction: r.prediction != null ? r.prediction : null, target_prob: r.target_prob != null ? r.target_prob : null,
               correct: r.correct != null ? r.correct : (r.is_8b_correct != null ? r.is_8b_correct : null),
               row: byId.size, first: {}, detail: {relevant: [], methods: {}}};
          byId.set(id, s);
        }
        const ids = r.proponent_ids || [];
        const rel = new Set(r.relevant_ids || ids.filter(function (_, i) { return (r.proponent_correct || [])[i]; }));
        rel.forEach(function (x) { if (!s.detail.relevant.includes(x)) s.detail.relevant.push(x); });
        const firstRel = ids.findIndex(function (x) { return rel.has(x); });
        s.first[m] = firstRel < 0 ? 0 : firstRel + 1;
        const keep = function (idsK, scores, texts) {
          return (idsK || []).slice(0, top).map(function (pid, i) {
            const text = (texts || [])[i] != null ? texts[i] : '';
            passages[pid] = text;
            return [pid, (scores || [])[i], classify(text, s.target, s.entity, rel.has(pid))[0]];
          });
        };
        s.detail.methods[m] = {p: keep(ids, r.proponent_scores, r.proponents), o: keep(r.opponent_ids, r.opponent_scores, r.opponents)};
      });
    }
    const summaries = Array.from(byId.values());
    return {
      title: 'Results: ' + methods.join(' vs '), methods: methods, ladder: [], metrics: null, tailPatch: null, top: top,
      summaries: summaries,
      detail: function (s) {
        const d = {relevant: s.detail.relevant, methods: {}, passages: passages};
        for (const m of methods) d.methods[m] = s.detail.methods[m] || {p: [], o: []};
        return Promise.resolve(d);
      },
    };
  }

  // ------------------------------------------------------------------ overview: metrics table and charts
  function renderOverview() {
    const M = store.metrics;
    if (!M || !Object.keys(M).length) return;
    $('overview').hidden = false;
    const methods = Object.keys(M);
    const cols = [['mrr', 'MRR'], ['recall@10', 'recall@10'], ['tail_patch@10', 'tail-patch@10'],
      ['top10_relevant', 'top-10 relevant'], ['top10_both', 'entity+target'], ['top10_one', 'one of them'], ['top10_neither', 'neither']]
      .filter(function (c) { return methods.some(function (m) { return M[m][c[0]] != null; }); });
    // the tail-patch record: figures the probe or the random-proponent guard distrusts are flagged where they show
    const tp = store.tailPatch, flagged = !!tp && tp.trustworthy === false;
    const tpLabel = function (label) { return flagged ? label + ' \u26a0' : label; };
    const head = el('tr', {}, [el('th', {text: 'method'})].concat(cols.map(function (c) {
      return el('th', {text: c[0].startsWith('tail') ? tpLabel(c[1]) : c[1], cls: c[0].startsWith('tail') && flagged ? 'tp-flag' : ''});
    })));
    const rows = methods.map(function (m) {
      return el('tr', {cls: m === 'trackstar' ? 'hl' : ''}, [el('td', {text: name(m)})].concat(cols.map(function (c) {
        const v = M[m][c[0]];
        return el('td', {text: c[0].startsWith('top10_') ? pct(v) : fmt(v, c[0].startsWith('tail') ? 4 : 3)});
      })));
    });
    const acc = store.summaries.filter(function (s) { return s.correct != null; });
    const nOk = acc.filter(function (s) { return s.correct; }).length;
    $('metrics').append(el('table', {cls: 'metrics'}, [el('thead', {}, [head]), el('tbody', {}, rows)]));
    if (acc.length) $('metrics').append(el('p', {cls: 'muted', text: 'Model accuracy: ' + pct(nOk / acc.length) + ' of ' + acc.length + ' queries (greedy prediction equals the target).'}));
    if (tp) $('metrics').append(tailPatchNote(tp));
    const order = store.ladder.concat(methods.filter(function (m) { return !store.ladder.includes(m); }));
    const charts = el('div', {cls: 'legend'});
    for (const [key, label] of [['mrr', 'MRR'], ['recall@10', 'recall@10'], ['tail_patch@10', tpLabel('tail-patch@10')]]) {
      const ms = order.filter(function (m) { return M[m] && M[m][key] != null; });
      if (ms.length) charts.append(barChart(label, ms, ms.map(function (m) { return M[m][key]; })));
    }
    $('ladder').append(charts, el('p', {cls: 'muted', text: 'Rungs from plain gradient dot products up to TrackStar; BM25 and random proponents for reference.'}));
    const bm = order.filter(function (m) { return M[m] && M[m].top10_relevant != null; });
    if (bm.length) $('breakdown').append(stackChart(bm.map(function (m) { return [name(m), CATS.map(function (c) { return M[m]['top10_' + c]; })]; })), legend());
    else $('breakdown').append(el('p', {cls: 'muted', text: 'No breakdown in the metrics.'}));
  }
  function tailPatchNote(tp) {
    const step = 'one step at lr ' + (tp.lr == null ? '–' : Number(tp.lr).toExponential(1)) + (tp.lr_param === 'auto' ? ' (chosen by the linearity probe)' : '') +
      ' over ' + tp.queries + ' queries';
    if (tp.trustworthy === false) {
      return el('p', {cls: 'tp-flag', id: 'tail-patch-flag', role: 'note',
        text: '\u26a0 Tail-patch figures are not trustworthy (' + step + '): ' + (tp.reasons || []).join('; ')});
    }
    return el('p', {cls: 'muted', id: 'tail-patch-flag', text: 'Tail-patch: ' + step + '; the step is linear (probe) and random proponents\' mean change is near 0 (guard).'});
  }
  function barChart(title, methods, values) {
    const w = 235, rowH = 18, left = 105, h = 22 + rowH * methods.length;
    const max = Math.max.apply(null, values.map(function (v) { return Math.abs(v); }).concat([1e-12]));
    const svg = sv('svg', {width: w, height: h, viewBox: '0 0 ' + w + ' ' + h, role: 'img', 'aria-label': title});
    svg.append(sv('text', {x: 0, y: 12, 'font-weight': 600}, title));
    methods.forEach(function (m, i) {
      const y = 20 + i * rowH, v = values[i], bw = Math.max(0, (w - left - 44) * Math.abs(v) / max);
      svg.append(sv('text', {x: left - 4, y: y + 12, 'text-anchor': 'end'}, name(m)));
      svg.append(sv('rect', {x: left, y: y + 2, width: bw, height: rowH - 6, class: 'bar' + (store.ladder.includes(m) ? '' : ' base')}));
      svg.append(sv('text', {x: left + bw + 3, y: y + 12}, fmt(v, 3)));
    });
    return svg;
  }
  function stackChart(rows) {
    const w = 420, rowH = 20, left = 110, h = 6 + rowH * rows.length, bw = w - left - 4;
    const svg = sv('svg', {width: w, height: h, viewBox: '0 0 ' + w + ' ' + h, role: 'img', 'aria-label': 'breakdown of the top-10 proponents'});
    rows.forEach(function (r, i) {
      const y = 3 + i * rowH;
      svg.append(sv('text', {x: left - 4, y: y + 13, 'text-anchor': 'end'}, r[0]));
      let x = left;
      r[1].forEach(function (v, j) {
        const ww = bw * (v || 0);
        const rect = sv('rect', {x: x, y: y + 2, width: ww, height: rowH - 5, class: 'c-' + CATS[j]});
        rect.append(sv('title', {}, r[0] + ': ' + CAT_LABEL[CATS[j]] + ' ' + pct(v)));
        svg.append(rect);
        if (ww > 26) svg.append(sv('text', {x: x + 3, y: y + 13, fill: '#fff', style: 'fill:#fff'}, pct(v)));
        x += ww;
      });
    });
    return svg;
  }
  function legend() {
    return el('div', {cls: 'legend'}, CATS.map(function (c) {
      return el('span', {}, [el('span', {cls: 'sw c-' + c}), CAT_LABEL[c]]);
    }));
  }

  // ------------------------------------------------------------------ query list, search and filters
  function matches(s) {
    if (state.correct !== '' && (s.correct == null || (s.correct ? '1' : '0') !== state.correct)) return false;
    if (state.hit !== '') {
      const m = store.methods.includes('trackstar') ? 'trackstar' : store.methods[0];
      const r = s.first[m];
      if (((r > 0 && r <= 10) ? '1' : '0') !== state.hit) return false;
    }
    if (state.text) {
      const hay = [s.id, s.prompt, s.target, s.entity || '', s.prediction || ''].join(' ').toLowerCase();
      if (!state.text.toLowerCase().split(/\s+/).every(function (w) { return hay.includes(w); })) return false;
    }
    return true;
  }
  function renderList() {
    state.visible = store.summaries.filter(matches);
    const list = $('qlist');
    list.replaceChildren();
    state.visible.slice(0, state.shown).forEach(function (s) {
      const flags = [];
      if (s.correct != null) flags.push(el('span', {cls: 'flag ' + (s.correct ? 'ok' : 'bad'), text: s.correct ? 'correct' : 'wrong'}));
      const r = s.first.trackstar;
      if (r > 0 && r <= 10) flags.push(el('span', {cls: 'flag hit', text: 'TS@' + r}));
      const li = el('li', {'data-qid': s.id, cls: s.id === state.selected ? 'sel' : '', tabindex: '0'},
        [el('span', {cls: 'qid', text: s.id})].concat(highlight(s.prompt + s.target, s.entity, s.target), flags));
      li.addEventListener('click', function () { select(s.id); });
      li.addEventListener('keydown', function (e) { if (e.key === 'Enter') select(s.id); });
      list.append(li);
    });
    $('count').textContent = state.visible.length + ' of ' + store.summaries.length + ' queries';
    $('more').hidden = state.visible.length <= state.shown;
    return state.visible.length;
  }

  // ------------------------------------------------------------------ the per-query panel
  function renderPanel(s, d, methods) {
    methods = methods || store.methods;
    const panel = $('panel');
    const rel = new Set(d.relevant || []);
    const pred = s.prediction == null ? null : el('span', {}, [el('span', {text: JSON.stringify(s.prediction) + ' '}),
      s.correct == null ? null : el('span', {cls: 'flag ' + (s.correct ? 'ok' : 'bad'), text: s.correct ? 'correct' : 'wrong'})]);
    const facts = [['target', el('span', {}, highlight(s.target, null, s.target))], ['entity', s.entity ? el('mark', {cls: 'ent', text: s.entity}) : null],
      ['greedy prediction', pred], ['p(target | prompt)', s.target_prob == null ? null : (s.target_prob < 1e-3 ? Number(s.target_prob).toExponential(2) : fmt(s.target_prob, 4))],
      ['relevant passages', rel.size ? String(rel.size) : null]].filter(function (f) { return f[1] != null; });
    const head = el('div', {cls: 'qhead'}, [
      el('h2', {}, [el('span', {cls: 'muted', text: s.live ? 'Live trace ' : 'Query '}), s.id]),
      el('p', {cls: 'prompt'}, highlight(s.prompt, s.entity, null).concat([el('mark', {cls: 'tgt', text: s.target})])),
      el('dl', {}, facts.map(function (f) { return el('div', {cls: 'pair'}, [el('dt', {text: f[0]}), el('dd', {}, [f[1]])]); })),
    ]);
    const ref = methods.includes('trackstar') ? 'trackstar' : methods[0];
    const refTop = new Set((d.methods[ref] ? d.methods[ref].p : []).slice(0, 10).map(function (h) { return h[0]; }));
    const cols = methods.map(function (m) {
      const md = d.methods[m] || {p: [], o: []};
      const counts = {relevant: 0, both: 0, one: 0, neither: 0};
      md.p.slice(0, 10).forEach(function (h) { counts[CAT_CODE[h[2]]] += 1; });
      const n = Math.max(1, md.p.slice(0, 10).length);
      const mini = el('div', {cls: 'mini', title: CATS.map(function (c) { return CAT_LABEL[c] + ' ' + counts[c]; }).join(', ')},
        CATS.map(function (c) { const x = el('span', {cls: 'sw c-' + c}); x.style.width = (100 * counts[c] / n) + '%'; x.style.margin = '0'; x.style.borderRadius = '0'; return x; }));
      const r = s.first[m];
      const shared = m === ref ? null : md.p.slice(0, 10).filter(function (h) { return refTop.has(h[0]); }).length;
      const stat = (r ? 'first relevant at rank ' + r : (rel.size ? 'no relevant passage retrieved' : 'no ground truth')) +
        (shared == null ? '' : ' · top-10 shared with ' + name(ref) + ': ' + shared);
      const hits = function (list, kind) {
        return el('ol', {cls: 'hits ' + kind}, list.map(function (h, i) {
          const cat = CAT_CODE[h[2]] || 'neither';
          const text = d.passages[h[0]] != null ? d.passages[h[0]] : '';
          return el('li', {cls: 'hit ' + (kind === 'proponents' ? 'proponent' : 'opponent') + ' cat-' + cat + (rel.has(h[0]) ? ' rel' : ''), 'data-pid': h[0]}, [
            el('div', {cls: 'meta'}, [el('span', {cls: 'rank', text: '#' + (i + 1)}), el('span', {cls: 'score', text: fmt(h[1], 4)}),
              el('span', {cls: 'pid', text: h[0]}), (m !== ref && refTop.has(h[0]) && kind === 'proponents') ? el('span', {cls: 'shared', title: 'also in ' + name(ref) + "'s top 10", text: '◆'}) : null,
              el('span', {cls: 'chip c-' + cat, text: rel.has(h[0]) ? '✓ relevant' : CAT_LABEL[cat]})]),
            el('div', {cls: 'text'}, highlight(text, s.entity, s.target)),
          ]);
        }));
      };
      return el('div', {cls: 'method', 'data-method': m}, [
        el('h3', {text: name(m)}), el('p', {cls: 'stat', text: stat}), mini,
        md.p.length ? hits(md.p, 'proponents') : el('p', {cls: 'muted', text: 'no proponents'}),
        md.o.length ? el('details', {cls: 'opp'}, [el('summary', {text: 'opponents (' + md.o.length + ')'}), hits(md.o, 'opponents')]) : null,
      ]);
    });
    panel.replaceChildren(head, el('div', {cls: 'methods'}, cols), legend());
    panel.setAttribute('data-qid', s.id);
  }

  function select(id) {
    const s = store.summaries.find(function (x) { return x.id === id; });
    if (!s) { status('no query with id ' + id, true); return Promise.resolve(false); }
    state.selected = id;
    document.querySelectorAll('#qlist li').forEach(function (li) { li.classList.toggle('sel', li.getAttribute('data-qid') === id); });
    if (location.hash !== '#q=' + encodeURIComponent(id)) history.replaceState(null, '', '#q=' + encodeURIComponent(id));
    const p = store.detail(s).then(function (d) {
      if (state.selected === id) renderPanel(s, d);
      return true;
    }).catch(function (e) { status(String(e.message || e), true); throw e; });
    rendered = {id: id, promise: p};
    return p;
  }

  function bind() {
    $('search').addEventListener('input', function (e) { state.text = e.target.value.trim(); state.shown = LIST_STEP; renderList(); });
    $('f-correct').addEventListener('change', function (e) { state.correct = e.target.value; state.shown = LIST_STEP; renderList(); });
    $('f-hit').addEventListener('change', function (e) { state.hit = e.target.value; state.shown = LIST_STEP; renderList(); });
    $('more').addEventListener('click', function () { state.shown += LIST_STEP; renderList(); });
    $('file').addEventListener('change', function (e) {
      const files = Array.from(e.target.files).slice(0, 2);
      if (files.length) open(files.map(function (f) { return {name: f.name, open: function () { return Promise.resolve(new Response(f.stream())); }}; }));
    });
    window.addEventListener('hashchange', function () {
      const id = decodeURIComponent((location.hash.match(/^#q=(.*)$/) || [])[1] || '');
      if (id && id !== state.selected) select(id);
    });
  }

  function show(st, initial) {
    store = st;
    document.title = store.title;
    $('title').textContent = store.title;
    $('subtitle').textContent = store.summaries.length + ' queries · methods: ' + store.methods.map(name).join(', ');
    renderOverview();
    renderList();
    const fromHash = decodeURIComponent((location.hash.match(/^#q=(.*)$/) || [])[1] || '');
    let id = initial || fromHash;
    if (id && !store.summaries.some(function (s) { return s.id === id; }) && /^\d+$/.test(id) && store.summaries[+id]) id = store.summaries[+id].id;
    if (!id && store.summaries.length) id = store.summaries[0].id;
    return id ? select(id) : Promise.resolve(false);
  }

  async function open(sources, exampleId) {
    status('loading ' + sources.map(function (s) { return s.name; }).join(', ') + ' …');
    $('overview').hidden = true;
    for (const k of ['metrics', 'ladder', 'breakdown']) $(k).replaceChildren();
    const st = await jsonlStore(sources, 10);
    status('');
    return show(st, exampleId);
  }

  // ------------------------------------------------------------------ "trace your own prompt" (trackstar serve)
  const LIVE_METHODS = ['trackstar', 'bm25'];
  const live = {n: 0, info: null};
  function liveStatus(msg, isError) {
    const p = $('live-status');
    p.replaceChildren.apply(p, Array.isArray(msg) ? msg : [msg || '']);
    p.className = isError ? 'error' : 'muted';
  }
  function howToServe(why) {
    return [why + ' To trace your own prompt, run ', el('code', {text: 'trackstar serve'}),
      ' in the pipeline folder and open the address it prints.'];
  }
  function apiUrl(path) { return new URL('../api/' + path, location.href).href; }
  function apiHeaders(json) {
    const h = json ? {'Content-Type': 'application/json'} : {};
    const token = $('live-token').value || sessionStorage.getItem('trackstar-token');
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }
  function liveEnable(on) {
    for (const e of $('live-form').elements) e.disabled = !on;
    if (on) $('live-target').disabled = $('live-greedy').checked;
  }
  function liveInit() {
    liveEnable(false);
    $('live-form').addEventListener('submit', function (e) { e.preventDefault(); T.traced = liveTrace(); });
    $('live-greedy').addEventListener('change', function (e) { $('live-target').disabled = e.target.checked; });
    if (location.protocol === 'file:') { liveStatus(howToServe('This page was opened from a file.')); return Promise.resolve(false); }
    return fetch(apiUrl('info'), {headers: apiHeaders(false)}).then(function (r) {
      if (r.status === 401) {
        $('live-token-row').hidden = false;
        liveEnable(true);
        liveStatus('This server needs its token (ask whoever started it).');
        return true;
      }
      if (!r.ok) { liveStatus(howToServe('This server has no trace API.')); return false; }
      return r.json().then(function (info) {
        if (!info.trace) { liveStatus(howToServe('This server (trackstar view) has no trace API.')); return false; }
        live.info = info;
        $('live-k').max = info.max_k;
        liveEnable(true);
        $('live').open = true;
        liveStatus('Traces over ' + info.passages + ' passages with ' + LIVE_METHODS.map(name).join(' and ') + '.');
        return true;
      });
    }).catch(function () { liveStatus(howToServe('No trace server answers here.')); return false; });
  }
  async function postTrace(body) {
    const r = await fetch(apiUrl('trace'), {method: 'POST', headers: apiHeaders(true), body: JSON.stringify(body)});
    let data;
    try { data = await r.json(); } catch (e) { data = {error: 'HTTP ' + r.status}; }
    if (!r.ok) { const err = new Error(data.error || ('HTTP ' + r.status)); err.field = data.field; err.status = r.status; throw err; }
    return data;
  }
  async function liveTrace() {
    for (const id of ['live-prompt', 'live-target', 'live-k', 'live-token']) $(id).classList.remove('bad');
    const greedy = $('live-greedy').checked;
    const body = {prompt: $('live-prompt').value, target: greedy ? null : $('live-target').value,
                  k: Number($('live-k').value)};
    if ($('live-token').value) sessionStorage.setItem('trackstar-token', $('live-token').value);
    $('live-go').disabled = true;
    liveStatus('tracing …');
    try {
      const records = {};
      for (const m of LIVE_METHODS) {  // TrackStar first: it settles the greedy answer BM25 then uses
        records[m] = await postTrace(Object.assign({}, body, {method: m}));
        body.target = records[m].targets_plaintext;
      }
      renderLive(body, records, greedy ? records.trackstar.prediction : null);
      liveStatus('');
      return true;
    } catch (e) {
      const input = {prompt: 'live-prompt', target: 'live-target', k: 'live-k', token: 'live-token'}[e.field];
      if (input) $(input).classList.add('bad');
      if (e.field === 'token') $('live-token-row').hidden = false;
      liveStatus((e.field ? e.field + ': ' : '') + e.message, true);
      return false;
    } finally {
      $('live-go').disabled = false;
    }
  }
  function renderLive(body, records, prediction) {
    live.n += 1;
    const entity = $('live-entity').value.trim() || null;
    const s = {id: 'live-' + live.n, live: true, prompt: body.prompt, target: body.target, entity: entity,
               prediction: prediction, target_prob: null, correct: null, first: {}};
    const d = {relevant: [], methods: {}, passages: {}};
    for (const m of LIVE_METHODS) {
      const r = records[m];
      const hits = function (ids, scores, texts) {
        return ids.map(function (pid, i) {
          d.passages[pid] = texts[i];
          return [pid, scores[i], classify(texts[i], s.target, entity, false)[0]];
        });
      };
      d.methods[m] = {p: hits(r.proponent_ids, r.proponent_scores, r.proponents), o: hits(r.opponent_ids, r.opponent_scores, r.opponents)};
    }
    state.selected = null;
    document.querySelectorAll('#qlist li.sel').forEach(function (li) { li.classList.remove('sel'); });
    renderPanel(s, d, LIVE_METHODS);
    $('panel').scrollIntoView({block: 'start'});
  }

  // ------------------------------------------------------------------ start, and a small API for tests
  T.start = function () {
    bind();
    T.live = liveInit();
    const params = new URLSearchParams(location.search);
    const paths = [params.get('jsonl_path'), params.get('sxs_jsonl_path')].filter(Boolean);
    let ready;
    if (paths.length) {
      ready = open(paths.map(function (p) {
        return {name: p, open: function () { return fetch(p).then(function (r) { if (!r.ok) throw new Error(p + ': HTTP ' + r.status); return r; }); }};
      }), params.get('example_id'));
    } else if (index) {
      ready = show(reportStore(index), params.get('example_id'));
    } else {
      status('No data: open result files below, or pass ?jsonl_path=… when served over http.');
      ready = Promise.resolve(false);
    }
    T.ready = ready.then(function (v) { T.readyAt = performance.now(); return v; },
      function (e) { status(String(e.message || e), true); throw e; });
  };
  T.api = {
    ids: function () { return store.summaries.map(function (s) { return s.id; }); },
    methods: function () { return store.methods.slice(); },
    show: function (id) { return select(id); },
    filter: function (f) {
      if ('text' in f) { $('search').value = f.text; $('search').dispatchEvent(new Event('input')); }
      if ('correct' in f) { $('f-correct').value = f.correct; $('f-correct').dispatchEvent(new Event('change')); }
      if ('hit' in f) { $('f-hit').value = f.hit; $('f-hit').dispatchEvent(new Event('change')); }
      return state.visible.map(function (s) { return s.id; });
    },
  };
})();
