// The search page: plain JS against the service's own API (see API.md beside this file). No build step,
// no library, nothing fetched from elsewhere. Text is always inserted with textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
const TOP_REGIONS = 3; // regions outlined per word
const PAGE = 24; // gallery images per picker page

const state = {
  info: null,
  pictures: false, // the service has an image folder: thumbnails and pictures by id
  maxK: 100,
  pickOffset: 0,
  imageCount: 0,
  upload: null, // {name, bytes} of an uploaded .npy
  explanation: null, // the last /v1/explain answer
};

// ---------------------------------------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setStatus(text, stateName) {
  const status = $("#status");
  status.textContent = text;
  status.dataset.state = stateName;
}

// Every call goes to this origin; a non-2xx answer throws its {"error"} message.
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error(`the service cannot be reached (${e.message})`);
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function postNpy(path, bytes) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: bytes });
}

function readK(input) {
  const k = Math.round(Number(input.value));
  return Number.isFinite(k) && k >= 1 ? Math.min(k, state.maxK) : 10;
}

function wordColour(i) {
  return `hsl(${(i * 137.5) % 360}, 75%, 45%)`;
}

function pictureURL(id) {
  return `/v1/images/${encodeURIComponent(id)}`;
}

// A thumbnail, or the name when there is no picture (no image folder, or no file for this image).
function thumbnail(id, name) {
  const label = name ?? `image ${id}`;
  if (!state.pictures) return el("span", { class: "thumb placeholder", text: label });
  const img = el("img", { class: "thumb", src: pictureURL(id), alt: label, loading: "lazy" });
  img.addEventListener("error", () => img.replaceWith(el("span", { class: "thumb placeholder", text: label })));
  return img;
}

function formatScore(score) {
  return score === null || score === undefined ? "–" : Number(score).toFixed(4);
}

// ---------------------------------------------------------------------------------------------- URL

function readURL() {
  const params = new URLSearchParams(window.location.search);
  return {
    q: params.get("q"),
    k: params.get("k"),
    open: params.get("open"),
    image: params.get("image"),
  };
}

function writeURL(params, replace = false) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== null && value !== undefined) search.set(key, value);
  const url = `${window.location.pathname}${search.toString() ? `?${search}` : ""}`;
  if (url === `${window.location.pathname}${window.location.search}`) return;
  if (replace) window.history.replaceState(null, "", url);
  else window.history.pushState(null, "", url);
}

// ---------------------------------------------------------------------------------------------- tabs

function showTab(name) {
  for (const tab of ["text", "image"]) {
    const on = tab === name;
    $(`#tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`#panel-${tab}`).hidden = !on;
  }
  if (name === "image") loadPicker();
}

// ---------------------------------------------------------------------------------------------- hits

// Hits in rank order: li.hit[data-id]; ids of -1 (past the end of a small gallery) are left out.
function renderHits(list, answer, kind, onPick) {
  list.replaceChildren();
  const ids = answer.ids[0];
  const scores = answer.scores[0];
  const names = answer.names ? answer.names[0] : ids.map(() => null);
  let count = 0;
  ids.forEach((id, rank) => {
    if (id < 0) return;
    count += 1;
    const name = names[rank];
    const item = el(
      "li",
      { class: "hit", "data-id": String(id), tabindex: "0", role: "button" },
      ...(kind === "image" ? [thumbnail(id, name)] : []),
      el("span", { class: "name", text: name ?? (kind === "image" ? `image ${id}` : `caption ${id}`) }),
      el("span", { class: "score", text: formatScore(scores[rank]) }),
    );
    const pick = () => {
      for (const other of list.querySelectorAll(".hit.selected")) other.classList.remove("selected");
      item.classList.add("selected");
      onPick(id, name);
    };
    item.addEventListener("click", pick);
    item.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        pick();
      }
    });
    list.append(item);
  });
  return count;
}

async function searchText(q, k, open = null) {
  $("#q").value = q;
  $("#k").value = String(k);
  closeExplanation();
  setStatus(`searching for “${q}”…`, "busy");
  try {
    const answer = await postJSON("/v1/search/text", { queries: [q], k });
    const count = renderHits($("#hits"), answer, "image", (id, name) => explainText(q, id, name));
    setStatus(`${count} results`, "done");
    if (open !== null) {
      const item = $(`#hits .hit[data-id="${CSS.escape(String(open))}"]`);
      if (item) item.classList.add("selected");
      await explainText(q, Number(open), item ? item.querySelector(".name").textContent : null, true);
    }
  } catch (e) {
    $("#hits").replaceChildren();
    setStatus(e.message, "error");
  }
}

async function searchImage(query, k, open = null) {
  closeExplanation();
  $("#picker").open = false;
  const label = query.id !== undefined ? query.name ?? `image ${query.id}` : query.name;
  setStatus(`searching captions for ${label}…`, "busy");
  const box = $("#query-image");
  box.hidden = false;
  box.replaceChildren(
    el("span", { class: "muted", text: "query: " }),
    ...(query.id !== undefined ? [thumbnail(query.id, query.name)] : []),
    el("span", { class: "name", text: label }),
  );
  try {
    const answer =
      query.id !== undefined
        ? await postJSON("/v1/search/images", { ids: [query.id], k })
        : await postNpy(`/v1/search/images?k=${k}`, query.bytes);
    const count = renderHits($("#caption-hits"), answer, "caption", (id, text) => explainImage(query, id, text));
    setStatus(`${count} results`, "done");
    if (open !== null) {
      const item = $(`#caption-hits .hit[data-id="${CSS.escape(String(open))}"]`);
      if (item) item.classList.add("selected");
      await explainImage(query, Number(open), item ? item.querySelector(".name").textContent : null, true);
    }
  } catch (e) {
    $("#caption-hits").replaceChildren();
    setStatus(e.message, "error");
  }
}

// ---------------------------------------------------------------------------------------------- gallery picker

async function loadPicker() {
  const list = $("#gallery");
  try {
    const page = await api(`/v1/images?offset=${state.pickOffset}&limit=${PAGE}`);
    state.imageCount = page.count;
    list.replaceChildren(
      ...page.ids.map((id, i) => {
        const name = page.names ? page.names[i] : null;
        const item = el(
          "li",
          { class: "pick", "data-id": String(id), tabindex: "0", role: "button", title: name ?? `image ${id}` },
          thumbnail(id, name),
          el("span", { class: "name", text: name ?? `image ${id}` }),
        );
        const pick = () => {
          writeURL({ image: id, k: readK($("#k2")) });
          searchImage({ id, name }, readK($("#k2")));
        };
        item.addEventListener("click", pick);
        item.addEventListener("keydown", (e) => e.key === "Enter" && pick());
        return item;
      }),
    );
    const last = Math.min(state.pickOffset + PAGE, page.count);
    $("#page").textContent = page.count ? `${state.pickOffset + 1}–${last} of ${page.count}` : "no images";
    $("#prev").disabled = state.pickOffset === 0;
    $("#next").disabled = last >= page.count;
  } catch (e) {
    list.replaceChildren(el("li", { class: "muted", text: `gallery images unavailable: ${e.message}` }));
    $("#prev").disabled = $("#next").disabled = true;
  }
}

// ---------------------------------------------------------------------------------------------- explanations

async function explainText(q, id, name, fromURL = false) {
  if (!fromURL) writeURL({ q, k: readK($("#k")), open: id });
  await explain(postJSON("/v1/explain", { query: q, id }), `“${q}” and ${name ?? `image ${id}`}`);
}

async function explainImage(query, id, text, fromURL = false) {
  if (!fromURL && query.id !== undefined) writeURL({ image: query.id, k: readK($("#k2")), open: id });
  const request =
    query.id !== undefined
      ? postJSON("/v1/explain", { image_id: query.id, id })
      : postNpy(`/v1/explain?id=${encodeURIComponent(id)}`, query.bytes);
  await explain(request, `${query.name ?? `image ${query.id}`} and “${text ?? `caption ${id}`}”`);
}

// The search's #status is left as it is (a browser test reads it); the panel says what it is doing.
async function explain(request, title) {
  const panel = $("#explain");
  $("#explain-title").textContent = `${title}: explaining…`;
  try {
    const answer = await request;
    state.explanation = answer;
    panel.hidden = false;
    panel.dataset.id = String(answer.id);
    panel.dataset.score = String(answer.score);
    $("#explain-title").textContent = `${title}: score ${formatScore(answer.score)}`;
    const choice = $("#member-choice");
    const select = $("#member");
    if (answer.members) {
      choice.hidden = false;
      select.replaceChildren(
        ...answer.members.map((m, i) =>
          el("option", {
            value: String(i),
            text: `${i + 1}: ${m.cross_attn}, score ${formatScore(m.score)}, weight ${Number(answer.weights[i]).toFixed(2)}`,
          }),
        ),
      );
    } else {
      choice.hidden = true;
    }
    renderBlock(answer, answer.members ? answer.members[0] : answer);
    panel.scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (e) {
    setStatus(e.message, "error");
  }
}

function closeExplanation() {
  $("#explain").hidden = true;
  state.explanation = null;
}

// The attention each region gives word w: row w (t2i, words x regions) or column w (i2t, regions x words).
function wordAttention(block, w) {
  return block.cross_attn === "t2i" ? block.attention[w] : block.attention.map((row) => row[w]);
}

// A word's most attended regions, strongest first; padding regions (zero-area boxes) are left out.
function topRegions(weights, boxes, n) {
  const order = weights.map((weight, region) => ({ region, weight }));
  const usable = boxes ? order.filter(({ region }) => boxArea(boxes[region]) > 0) : order;
  return usable.sort((a, b) => b.weight - a.weight || a.region - b.region).slice(0, n);
}

function boxArea(box) {
  return box ? Math.max(0, box[2] - box[0]) * Math.max(0, box[3] - box[1]) : 0;
}

// Word relevance: the cosine of the word (t2i) or, i2t, the mean over regions weighted by attention to it.
function wordRelevance(block, w) {
  if (block.cross_attn === "t2i") return block.relevance[w];
  const weights = wordAttention(block, w);
  const total = weights.reduce((a, b) => a + b, 0);
  return total > 0 ? weights.reduce((acc, a, r) => acc + a * block.relevance[r], 0) / total : 0;
}

function renderBlock(answer, block) {
  const words = block.words || answer.words || [];
  const boxes = answer.boxes;
  const perWord = words.map((_, w) => topRegions(wordAttention(block, w), boxes, TOP_REGIONS));
  const wordsBox = $("#words");
  wordsBox.replaceChildren(
    ...words.map((word, w) =>
      el(
        "button",
        {
          type: "button",
          class: "word",
          "data-word": String(w),
          style: `--word: ${wordColour(w)}`,
          title: `relevance ${formatScore(wordRelevance(block, w))}`,
        },
        el("span", { class: "swatch" }),
        word,
      ),
    ),
  );
  for (const button of wordsBox.querySelectorAll(".word")) {
    const w = button.dataset.word;
    button.addEventListener("mouseenter", () => focusWord(w));
    button.addEventListener("mouseleave", () => focusWord(null));
    button.addEventListener("focus", () => focusWord(w));
    button.addEventListener("blur", () => focusWord(null));
    button.addEventListener("click", () => focusWord(wordsBox.dataset.focus === w ? null : w, true));
  }

  const figure = $("#figure");
  const table = $("#regions-table");
  if (answer.picture && boxes) {
    figure.hidden = false;
    table.hidden = true;
    const img = $("#picture");
    img.alt = `image ${answer.image_id}`;
    img.onload = () => drawBoxes(img, boxes, perWord);
    img.onerror = () => {
      figure.hidden = true;
      renderTable(table, words, block, perWord);
    };
    if (img.getAttribute("src") === answer.picture && img.complete && img.naturalWidth) drawBoxes(img, boxes, perWord);
    else img.src = answer.picture;
  } else {
    figure.hidden = true;
    renderTable(table, words, block, perWord);
  }
}

function drawBoxes(img, boxes, perWord) {
  const svg = $("#overlay");
  svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
  const stroke = Math.max(1.5, img.naturalWidth / 120);
  svg.replaceChildren();
  // Weakest first, so each word's strongest region is drawn on top.
  const rects = [];
  perWord.forEach((regions, w) => regions.forEach(({ region, weight }, rank) => rects.push({ w, region, weight, rank })));
  rects.sort((a, b) => b.rank - a.rank);
  for (const { w, region, weight, rank } of rects) {
    const [x1, y1, x2, y2] = boxes[region];
    const rect = document.createElementNS(SVG, "rect");
    const inset = rank * stroke * 0.6; // nested boxes stay visible when several words pick one region
    rect.setAttribute("x", String(x1 + inset));
    rect.setAttribute("y", String(y1 + inset));
    rect.setAttribute("width", String(Math.max(0, x2 - x1 - 2 * inset)));
    rect.setAttribute("height", String(Math.max(0, y2 - y1 - 2 * inset)));
    rect.setAttribute("class", `box rank-${rank}`);
    rect.setAttribute("stroke", wordColour(w));
    rect.setAttribute("stroke-width", String(stroke));
    rect.dataset.word = String(w);
    rect.dataset.region = String(region);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `region ${region}: weight ${weight.toFixed(3)}`;
    rect.append(title);
    svg.append(rect);
  }
}

function renderTable(table, words, block, perWord) {
  table.hidden = false;
  table.tBodies[0].replaceChildren(
    ...words.map((word, w) =>
      el(
        "tr",
        { "data-word": String(w) },
        el("td", {}, el("span", { class: "swatch", style: `--word: ${wordColour(w)}` }), word),
        el("td", { text: formatScore(wordRelevance(block, w)) }),
        el("td", { text: perWord[w].map(({ region, weight }) => `#${region} (${weight.toFixed(3)})`).join(", ") }),
      ),
    ),
  );
}

// One word's regions highlighted (null: every word's). A tap pins it until tapped again.
function focusWord(w, pin = false) {
  const wordsBox = $("#words");
  if (!pin && wordsBox.dataset.pinned) return;
  if (pin) {
    if (w === null) delete wordsBox.dataset.pinned;
    else wordsBox.dataset.pinned = "1";
  }
  if (w === null) delete wordsBox.dataset.focus;
  else wordsBox.dataset.focus = w;
  const figure = $("#figure");
  figure.classList.toggle("focused", w !== null);
  for (const node of document.querySelectorAll("#overlay .box, #words .word, #regions-table tr")) {
    node.classList.toggle("on", w !== null && node.dataset.word === w);
  }
}

// ---------------------------------------------------------------------------------------------- start

async function start() {
  $("#tab-text").addEventListener("click", () => showTab("text"));
  $("#tab-image").addEventListener("click", () => showTab("image"));
  $("#close-explain").addEventListener("click", closeExplanation);
  $("#member").addEventListener("change", (e) => {
    const answer = state.explanation;
    if (answer && answer.members) renderBlock(answer, answer.members[Number(e.target.value)]);
  });
  $("#text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("#q").value.trim();
    if (!q) return;
    const k = readK($("#k"));
    writeURL({ q, k });
    searchText(q, k);
  });
  $("#npy").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    state.upload = { name: file.name, bytes: await file.arrayBuffer() };
    writeURL({});
    searchImage(state.upload, readK($("#k2")));
  });
  $("#prev").addEventListener("click", () => {
    state.pickOffset = Math.max(0, state.pickOffset - PAGE);
    loadPicker();
  });
  $("#next").addEventListener("click", () => {
    state.pickOffset += PAGE;
    loadPicker();
  });
  window.addEventListener("popstate", route);

  try {
    state.info = await api("/v1/info");
    const info = state.info;
    if (info.limits && info.limits.max_k) state.maxK = Math.min(info.limits.max_k, 1000);
    $("#k").max = $("#k2").max = String(state.maxK);
    const galleries = info.galleries || {};
    const model = info.model || {};
    const config = model.config || {};
    const count = (g) => (g && g.count !== undefined ? g.count : null);
    $("#model").textContent = [
      model.name ? `model ${model.name}` : null,
      config.cross_attn ? `cross attention ${config.cross_attn}` : null,
      count(galleries.images) !== null ? `${count(galleries.images)} images` : "no image gallery",
      count(galleries.captions) !== null ? `${count(galleries.captions)} captions` : "no caption gallery",
      info.ready === false ? "loading…" : null,
    ]
      .filter(Boolean)
      .join(" · ");
  } catch (e) {
    $("#model").textContent = `service info unavailable: ${e.message}`;
  }
  try {
    state.pictures = Boolean((await api("/v1/images?offset=0&limit=1")).pictures);
  } catch {
    state.pictures = false;
  }
  await route();
}

// The page's state from its URL: ?q= text search, ?image= the other direction; open= an explanation of a hit.
async function route() {
  const { q, k, open, image } = readURL();
  if (image !== null && image !== "") {
    showTab("image");
    if (k) $("#k2").value = k;
    const id = Number(image);
    let name = null;
    try {
      const page = await api(`/v1/images?offset=${id}&limit=1`);
      if (page.names && page.ids[0] === id) name = page.names[0];
    } catch {
      // the name is only a label: search without it
    }
    await searchImage({ id, name }, readK($("#k2")), open);
    return;
  }
  showTab("text");
  if (q) await searchText(q, k ? readK({ value: k }) : readK($("#k")), open);
}

start();
